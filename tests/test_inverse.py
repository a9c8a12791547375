"""Inverse problems: operators against their dense matrices, DDNM / DDNM+ in the sampler loop,
SMC weights and resampling against brute force and exact evidences, the GMM posterior of a
linear measurement against importance sampling, and the Python API."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stmd_fast import sampling
from stmd_fast.checkpoint import Model
from stmd_fast.gmm import GaussianMixture, default_mixture, energy_distance
from stmd_fast.models import NetConfig, build_net
from stmd_fast.objectives import METHODS
from stmd_fast.operators import DDNM, AvgPool, Grayscale, Mask, Matrix, make_operator
from stmd_fast.smc import ess, smc_sample, systematic_indices

UNET = dict(kind="unet", channels=(8, 16), norm_groups=4, head_dim=4, time_freqs=16,
            attention_levels=(1,), mid_attention=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_net(method: str, shape: tuple[int, ...], seed: int = 0):
    torch.manual_seed(seed)
    m = METHODS[method]
    return build_net(NetConfig(**UNET), shape, m.conditional, len(m.times)).eval().requires_grad_(False)


def random_mask(shape, seed):
    return (torch.rand(shape, generator=gen(seed)) < 0.5).double()


# (operator, data shape): each kind, on awkward shapes
OPERATORS = {
    "mask": (lambda: Mask(random_mask((1, 4, 3), 1)), (2, 4, 3)),
    "sr2": (lambda: AvgPool(2), (2, 4, 6)),
    "sr4": (lambda: AvgPool(4), (1, 8, 4)),
    "gray": (lambda: Grayscale(), (3, 2, 3)),
    "matrix": (lambda: Matrix(torch.randn(3, 5, generator=gen(2), dtype=torch.float64)), (5,)),
}


def dense(op, shape) -> torch.Tensor:
    """The matrix of op on flattened samples: column j is A e_j."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return op(basis).reshape(d, -1).T


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_against_its_dense_matrix(name):
    """A^+ equals torch.linalg.pinv of the dense A, the Penrose identities hold, the singular
    values are the dense ones, and range_scale is V diag(f(s)) V^T."""
    make, shape = OPERATORS[name]
    op = make()
    op.check(shape)
    a = dense(op, shape)
    y_shape = op(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:]
    m = math.prod(y_shape)
    a_pinv = op.pinv(torch.eye(m, dtype=torch.float64).reshape(m, *y_shape)).reshape(m, -1).T
    torch.testing.assert_close(a_pinv, torch.linalg.pinv(a), atol=1e-12, rtol=0)
    torch.testing.assert_close(a @ a_pinv @ a, a, atol=1e-12, rtol=0)  # A A^+ A = A
    torch.testing.assert_close(a_pinv @ a @ a_pinv, a_pinv, atol=1e-12, rtol=0)  # A^+ A A^+ = A^+
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    nonzero = s > 1e-9
    distinct = op.singular_values()
    assert torch.allclose(s[nonzero].min(), distinct.min()) and torch.allclose(s[nonzero].max(), distinct.max())
    assert op.measurement_dim(shape) == int(nonzero.sum())
    factors = torch.rand(len(distinct), generator=gen(3), dtype=torch.float64) + 0.5
    # the dense V diag(f(s_i)) V^T, f looked up by singular value
    f = factors[(s[nonzero, None] - distinct[None]).abs().argmin(1)]
    v = vh[nonzero].T
    x = torch.randn(4, *shape, generator=gen(4), dtype=torch.float64)
    expected = (x.reshape(4, -1) @ v * f) @ v.T
    torch.testing.assert_close(op.range_scale(x, factors).reshape(4, -1), expected, atol=1e-12, rtol=0)
    # the projection: A of it is y, and it keeps x0's null-space part
    y = op(torch.randn(4, *shape, generator=gen(5), dtype=torch.float64))
    p = op.project(x, y)
    torch.testing.assert_close(op(p), y, atol=1e-12, rtol=0)
    null = torch.eye(a.shape[1], dtype=torch.float64) - a_pinv @ a
    torch.testing.assert_close(p.reshape(4, -1) @ null, x.reshape(4, -1) @ null, atol=1e-12, rtol=0)


def test_operator_checks_are_one_line_errors():
    with pytest.raises(ValueError, match="divide"):
        AvgPool(4).check((1, 6, 8))
    with pytest.raises(ValueError, match="RGB"):
        Grayscale().check((1, 8, 8))
    with pytest.raises(ValueError, match="full row rank"):
        Matrix([[1.0, 2.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="0 .missing. or 1"):
        Mask(torch.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="unknown operator 'blur'"):
        make_operator("blur")
    with pytest.raises(ValueError, match="sigma_y > 0"):
        AvgPool(2).log_likelihood(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1), 0.0)


def test_log_likelihood_is_the_gaussian_density():
    op = Matrix(torch.randn(2, 3, generator=gen(6), dtype=torch.float64))
    x, y = torch.randn(5, 3, generator=gen(7), dtype=torch.float64), torch.randn(5, 2, generator=gen(8), dtype=torch.float64)
    from scipy.stats import multivariate_normal

    ref = [multivariate_normal(mean=(op.matrix @ xi).numpy(), cov=0.3**2 * np.eye(2)).logpdf(yi.numpy()) for xi, yi in zip(x, y)]
    np.testing.assert_allclose(op.log_likelihood(x, y, 0.3).numpy(), ref, rtol=1e-12)
    # a mask measures only its observed entries: unobserved entries of y do not count
    mask = Mask(torch.tensor([1.0, 0.0, 1.0]))
    x3 = torch.randn(4, 3, generator=gen(9), dtype=torch.float64)
    y3 = torch.randn(4, 3, generator=gen(10), dtype=torch.float64)
    ref = -0.5 * ((x3 - y3)[:, [0, 2]] ** 2).sum(1) / 0.2**2 - math.log(2 * math.pi * 0.2**2)
    torch.testing.assert_close(mask.log_likelihood(x3, y3, 0.2), ref)


# ----------------------------------------------------------------------------- DDNM and DDNM+

@pytest.mark.parametrize("method,steps,flow_steps", [("stmd", 3, 2), ("ddpm", 4, 1), ("meanflow", 1, 2)])
@pytest.mark.parametrize("name", ["inpaint", "sr2", "sr4", "gray"])
def test_noiseless_ddnm_outputs_satisfy_the_measurement(name, method, steps, flow_steps):
    shape = (3, 8, 8) if name == "gray" else (1, 8, 8)
    op = make_operator(name, random_mask((1, 8, 8), 11).float() if name == "inpaint" else None)
    net = tiny_net(method, shape)
    y = op(torch.randn(1, *shape, generator=gen(12)))[0]
    outs = [sampling.sample(net, method, 3, shape, steps, flow_steps, gen(seed), project=DDNM(op, y))
            for seed in (13, 14)]
    for out in outs:  # float32 rounding, relative to the (untrained) network's scale
        assert (op(out) - y).abs().max() < 1e-6 * (1 + out.abs().max())
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # still stochastic in the null space


@pytest.mark.parametrize("c_x0,tau", [(0.9, 0.5), (0.9, 0.05), (0.3, 0.2)])
def test_ddnm_plus_keeps_the_bridge_noise_budget(c_x0, tau):
    """With x0_hat at the truth, c_x0 (x0_hat' - x_0) + tau eps' is the noise the step adds: the
    measurement noise DDNM+ injects plus the shrunk bridge noise. Both are linear in (n, eps), so
    its covariance is computed exactly from the images of basis vectors: it must be tau^2 I, the
    bridge's own, in every regime (lambda = 1 for large singular values, < 1 for small ones)."""
    u, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen(15), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen(16), dtype=torch.float64))
    op = Matrix(u @ torch.diag(torch.tensor([2.0, 0.5, 0.1], dtype=torch.float64)) @ v[:, :3].T)
    sigma_y = 0.1
    step = sampling.Step(0.5, 0.2, 0.3, 0.9, (0.5, c_x0, tau))
    x = torch.randn(1, 4, generator=gen(17), dtype=torch.float64)
    # n -> injected noise: y = A x + sigma n, x0_hat = x
    n_basis = torch.eye(3, dtype=torch.float64)
    injected = torch.stack([c_x0 * (DDNM(op, op(x)[0] + sigma_y * n, sigma_y)(x, step, None)[0][0] - x[0]) for n in n_basis])
    e_basis = torch.eye(4, dtype=torch.float64)
    shrunk = tau * DDNM(op, op(x)[0], sigma_y)(x, step, e_basis)[1]
    cov = injected.T @ injected + shrunk.T @ shrunk
    torch.testing.assert_close(cov, tau**2 * torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    # sigma_y = 0 is DDNM's projection, bridge noise untouched
    y = op(torch.randn(1, 4, generator=gen(18), dtype=torch.float64))[0]
    x0, eps = DDNM(op, y, 0.0)(x, step, e_basis)
    torch.testing.assert_close(x0, op.project(x, y))
    assert torch.equal(eps, e_basis)


# ----------------------------------------------------------------------------- SMC

def naive_systematic(w: list[float], u: float) -> list[int]:
    """Particle j takes the first i with (u + j) / K < w_0 + ... + w_i."""
    k, out = len(w), []
    for j in range(k):
        target, total = (u + j) / k, 0.0
        for i, wi in enumerate(w):
            total += wi
            if target < total:
                break
        out.append(i)
    return out


def test_systematic_resampling_against_brute_force():
    """Over a fine grid of u, the indices equal a naive loop's; each index appears floor(K w_i)
    or ceil(K w_i) times; and averaged over u the count is K w_i (exactly, up to the grid)."""
    w = torch.softmax(torch.randn(3, 7, generator=gen(19), dtype=torch.float64) * 2, -1)
    grid = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    counts = torch.zeros(3, 7, dtype=torch.float64)
    for u in grid:
        idx = systematic_indices(w, u.expand(3, 1))
        for g in range(3):
            assert idx[g].tolist() == naive_systematic(w[g].tolist(), float(u))
        c = torch.nn.functional.one_hot(idx, 7).sum(1).double()
        assert ((c == torch.floor(7 * w)) | (c == torch.ceil(7 * w))).all()
        counts += c
    torch.testing.assert_close(counts / len(grid), 7 * w, atol=2e-3, rtol=0)
    assert torch.allclose(ess(torch.full((1, 4), 0.25, dtype=torch.float64)), torch.tensor([4.0], dtype=torch.float64))


MATRIX = [[1.0, 0.0]]  # observe the first coordinate of the 2-D gmm: a two-mode posterior


def exact_denoiser(mixture: GaussianMixture):
    """x0_hat ~ the exact p(x_0 | x_s): SMC over exact transitions."""
    return lambda x, step, g: mixture.posterior_sample(x, step.s_from, g)


def mean_denoiser(mixture: GaussianMixture):
    """x0_hat = E[x_0 | x_s]: the best DDPM, biased for large steps."""
    return lambda x, step, g: mixture.posterior_mean(x, step.s_from)


def test_smc_without_resampling_weights_each_path_by_its_exact_likelihood():
    """The incremental weights telescope: with resampling off, the final weights are the
    normalised exact likelihoods N(y; A x_0, sigma^2) of the final particles, whatever the
    tempering, and the evidence is their mean."""
    mixture, op, sigma = default_mixture(), Matrix(MATRIX), 0.2
    y = torch.tensor([[0.7], [-1.2]])
    r = smc_sample(exact_denoiser(mixture), "stmd", op, y, sigma, 16, (2,), 4, 1, gen(20), ess_threshold=0.0,
                   temper=lambda s: 0.3 + 0.5 * s)
    log_lik = op.log_likelihood(r.particles.reshape(-1, 2), y.repeat_interleave(16, 0), sigma).view(2, 16)
    torch.testing.assert_close(r.weights, torch.softmax(log_lik, 1))
    torch.testing.assert_close(r.log_evidence, torch.logsumexp(log_lik, 1) - math.log(16))
    assert not r.resampled.any()


@pytest.mark.parametrize("ess_threshold", [1.0, 0.5])
def test_smc_evidence_is_unbiased_with_exact_transitions(ess_threshold):
    """With the exact transitions the SMC's evidence estimate is unbiased for p(y), known in closed
    form (GaussianMixture.observe): wrong incremental weights or a biased resampler would move
    its mean. 3000 independent runs of K = 8 particles, N = 8; tolerance 5 standard errors."""
    mixture, op, sigma = default_mixture(), Matrix(MATRIX), 0.15
    y = torch.tensor([1.1])
    _, log_py = mixture.observe(MATRIX, y, sigma)
    r = smc_sample(exact_denoiser(mixture), "stmd", op, y.expand(3000, 1), sigma, 8, (2,), 8, 1, gen(21),
                   ess_threshold=ess_threshold)
    z = (r.log_evidence - log_py).exp()
    assert r.resampled.any()
    assert abs(z.mean() - 1) < 5 * z.std() / math.sqrt(len(z)), (z.mean(), z.std())


def test_smc_converges_to_the_exact_posterior_and_a_biased_prior_stays_biased():
    """One draw per run from 1500 runs: with exact transitions the energy distance to the exact
    posterior falls with K to the noise floor; with the posterior-mean (DDPM) transition it stays
    far off, however many particles."""
    mixture, op, sigma = default_mixture(), Matrix(MATRIX), 0.1
    y = torch.tensor([1.05])
    post, _ = mixture.observe(MATRIX, y, sigma)
    exact = post.sample(1500, gen(22))

    def distance(denoise, k, seed):
        r = smc_sample(denoise, "stmd", op, y.expand(1500, 1), sigma, k, (2,), 2, 1, gen(seed))
        return energy_distance(r.draw(gen(seed + 1)), exact)

    floor = abs(energy_distance(post.sample(1500, gen(23)), exact))
    exact_k1, exact_k64 = distance(exact_denoiser(mixture), 1, 24), distance(exact_denoiser(mixture), 64, 26)
    mean_k64 = distance(mean_denoiser(mixture), 64, 28)
    assert exact_k1 > 0.3  # K = 1 is the unguided prior
    assert exact_k64 < 0.02 + 3 * floor, (exact_k64, floor)
    assert mean_k64 > 10 * exact_k64, (mean_k64, exact_k64)


def test_smc_input_checks():
    op, y = Matrix(MATRIX), torch.zeros(1, 1)
    den = exact_denoiser(default_mixture())
    with pytest.raises(ValueError, match="sigma_y > 0"):
        smc_sample(den, "stmd", op, y, 0.0, 4, (2,), 2, 1, gen(0))
    with pytest.raises(ValueError, match="particles >= 1"):
        smc_sample(den, "stmd", op, y, 0.1, 0, (2,), 2, 1, gen(0))
    with pytest.raises(ValueError, match="vectors of size 2"):
        smc_sample(den, "stmd", op, y, 0.1, 4, (3,), 2, 1, gen(0))


# ----------------------------------------------------------------------------- the exact GMM posterior of y

PI = np.array([0.5, 0.3, 0.2])
MU = np.array([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.5]])
S = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.05, -0.02], [-0.02, 0.4]], [[0.1, 0.0], [0.0, 0.1]]])


@pytest.mark.parametrize("matrix,y,sigma", [([[1.0, 0.5]], [0.4], 0.3), ([[1.0, 0.0], [0.3, -1.0]], [0.8, 0.2], 0.5)])
def test_measurement_posterior_matches_importance_sampling(matrix, y, sigma):
    """Prior draws weighted by N(y; A x, sigma^2 I): the weighted mean and second moment agree with
    the closed-form posterior within 5 delta-method standard errors, and the mean weight with p(y)."""
    mixture = GaussianMixture(PI, MU, S)
    post, log_py = mixture.observe(matrix, y, sigma)
    rng = np.random.default_rng(0)
    n = 400_000
    k = rng.choice(3, size=n, p=PI)
    x0 = MU[k] + np.einsum("nij,nj->ni", np.linalg.cholesky(S)[k], rng.standard_normal((n, 2)))
    a, yv = np.asarray(matrix), np.asarray(y)
    m = len(yv)
    lik = np.exp(-((x0 @ a.T - yv) ** 2).sum(1) / (2 * sigma**2)) / (2 * math.pi * sigma**2) ** (m / 2)
    assert abs(lik.mean() - math.exp(log_py)) < 5 * lik.std() / math.sqrt(n)
    w, mu, cov = (t.numpy() for t in (post.weights, post.means, post.covs))
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu))
    for f, exact in ((x0, mean), (np.einsum("ni,nj->nij", x0, x0).reshape(n, 4), second.reshape(4))):
        est = lik @ f / lik.sum()
        se = np.sqrt((lik[:, None] ** 2 * (f - est) ** 2).sum(0)) / lik.sum()
        assert np.all(np.abs(est - exact) < 5 * se), (est, exact, se)


def test_measurement_posterior_input_checks():
    mixture = default_mixture()
    with pytest.raises(ValueError, match="sigma_y > 0"):
        mixture.observe(MATRIX, [0.0], 0.0)
    with pytest.raises(ValueError, match="shape"):
        mixture.observe([[1.0, 0.0, 0.0]], [0.0], 0.1)


# ----------------------------------------------------------------------------- Model.posterior_sample

@pytest.fixture(scope="module")
def image_model():
    return Model(tiny_net("stmd", (1, 8, 8)), "stmd", (1, 8, 8), "image", {})


def test_the_library_says_misuse_at_the_call(image_model):
    """What a notebook gets wrong, said where it happens, not as a silent broadcast or a failure frames deep."""
    import warnings

    import stmd_fast
    from stmd_fast import sampling, schedule
    from stmd_fast.objectives import ObjectiveConfig, compute_loss, draw_noise

    net = image_model.net
    noise = sampling.draw_sampler_noise("stmd", 5, (1, 8, 8), 2, 1, gen(0))  # x_1, z_0, eps_0, z_1
    for bad in (noise[2][:1], noise[2][..., :1]):  # broadcast: one bridge noise shared by samples or pixels
        with pytest.raises(ValueError, match=r"noise 'eps_0' is \((1, 1, 8, 8|5, 1, 8, 1)\) .* like x_1: \(5, 1, 8, 8\)"):
            sampling.sample_from_noise(net, "stmd", [noise[0], noise[1], bad, noise[3]], 2, 1)
    with pytest.raises(ValueError, match="the noise is torch.float64 and the network torch.float32"):
        sampling.sample_from_noise(net, "stmd", [x.double() for x in noise], 2, 1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sampling.sample(net, "stmd", 2, (1, 8, 8), 2, 1, None)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sampling.transition(net, "stmd", noise[0], 1.0, 0.5, 1, None)
    with pytest.raises(ValueError, match="num must be at least 1"):
        sampling.sample(net, "stmd", 0, (1, 8, 8), 2, 1, gen(0))
    # times: checked for an empty batch too; a one-element tensor is a number; per-sample times are not
    with pytest.raises(ValueError, match="0 <= s_to < s_from <= 1"):
        image_model.transition(torch.zeros(0, 1, 8, 8), 0.1, 0.5, generator=gen(0))
    with pytest.raises(TypeError, match="s_from must be a number"):
        image_model.transition(noise[0], torch.full((5,), 0.5), 0.1, generator=gen(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.tensor(tensor) warned; requires_grad input warned on float()
        x = image_model.transition(noise[0].requires_grad_(), torch.tensor(0.5), 0.1, generator=gen(1))
    assert torch.equal(x, image_model.transition(noise[0].detach(), 0.5, 0.1, generator=gen(1)))
    with pytest.raises(ValueError, match="unknown time grid|unknown grid"):
        image_model.sample(2, steps=2, grid="", generator=gen(0))  # not the run's grid, silently
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        Model(net, "foo", (1, 8, 8), "image", {})
    with pytest.raises(ValueError, match="makes images, not latents"):
        image_model.load_vae()
    assert {"Model", "load_checkpoint"} <= set(dir(stmd_fast))  # tab completion of the lazy names
    with pytest.raises(ValueError, match="whole number of diffusion steps"):
        schedule.time_grid(2.5)  # [1, 0.6, 0.2, -0.2]: a grid ending below 0
    assert torch.equal(torch.stack(schedule.alpha_sigma(0.5)), torch.stack(schedule.alpha_sigma(torch.tensor(0.5))))
    cfg = ObjectiveConfig()
    x0 = torch.randn(16, 1, 8, 8)
    with pytest.raises(ValueError, match=r"noise.s is \(16,\), for a batch x0 of \(8, 1, 8, 8\) it must be \(8,\)"):
        compute_loss("stmd", net, x0[:8], draw_noise(x0, cfg, gen(0)), cfg)


def test_posterior_sample_api(image_model):
    op = AvgPool(2)
    y = op(torch.randn(1, 1, 8, 8, generator=gen(30)))[0]
    x = image_model.posterior_sample(y, op, steps=2, flow_steps=1, num=3, generator=gen(31))
    assert x.shape == (3, 1, 8, 8) and (op(x) - y).abs().max() < 1e-5
    again = image_model.posterior_sample(y, op, steps=2, flow_steps=1, num=3, generator=gen(31))
    assert torch.equal(again, x)  # seeded
    noisy = image_model.posterior_sample(y, op, sigma_y=0.1, steps=2, num=2, generator=gen(32))
    assert noisy.shape == (2, 1, 8, 8)
    smc = image_model.posterior_sample(y, op, sigma_y=0.1, particles=4, steps=2, num=3, generator=gen(33))
    assert smc.shape == (3, 1, 8, 8) and torch.isfinite(smc).all()
    with pytest.raises(ValueError, match="y has shape"):
        image_model.posterior_sample(torch.zeros(1, 8, 8), op, generator=gen(0))
    with pytest.raises(ValueError, match="sigma_y > 0"):
        image_model.posterior_sample(y, op, particles=4, generator=gen(0))
    with pytest.raises(ValueError, match="RGB"):
        image_model.posterior_sample(y, Grayscale(), generator=gen(0))


@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
def test_a_chain_that_would_ignore_the_observation_is_refused(image_model, sigma_y):
    """Without particles only the steps ending above s = 0 pass the observation on: at N = 1 (the default for
    STMD) or for Mean Flow, DDNM and inpainting gave the unconditional draw of the seed with y pasted in where it
    measures it (DDNM+ not even that), reported as posterior samples. Refused, naming N >= 2 and SMC; without
    steps given, N is 8."""
    op = AvgPool(2)
    y = op(torch.randn(1, 1, 8, 8, generator=gen(40)))[0]
    mask = torch.ones(1, 8, 8)
    mask[:, 4:] = 0
    with pytest.raises(ValueError, match=r"N = 1 is the last step.*N >= 2 \(steps=N.*particles=K"):
        image_model.posterior_sample(y, op, sigma_y=sigma_y, steps=1, generator=gen(0))
    with pytest.raises(ValueError, match="the observation shapes only the steps that end above s = 0"):
        image_model.inpaint(torch.zeros(1, 8, 8), mask, 1, steps=1, generator=gen(0))
    meanflow = Model(tiny_net("meanflow", (1, 8, 8)), "meanflow", (1, 8, 8), "image", {})
    with pytest.raises(ValueError, match="Mean Flow has no diffusion steps"):
        meanflow.posterior_sample(y, op, sigma_y=sigma_y, flow_steps=4, generator=gen(0))
    with pytest.raises(ValueError, match="Mean Flow has no diffusion steps"):
        meanflow.inpaint(torch.zeros(1, 8, 8), mask, 1, flow_steps=2, generator=gen(0))
    # the default N is 8: what steps=8 draws from the same seed
    torch.testing.assert_close(image_model.posterior_sample(y, op, sigma_y, num=2, generator=gen(41)),
                               image_model.posterior_sample(y, op, sigma_y, steps=8, num=2, generator=gen(41)))
    # with N = 2 the first step passes y on: two measurements give two draws from one seed, apart also
    # where y does not measure them (the observed part is all DDNM would set at N = 1)
    a = image_model.posterior_sample(-y.abs() - 1, op, sigma_y, steps=2, num=2, generator=gen(41))
    b = image_model.posterior_sample(y.abs() + 1, op, sigma_y, steps=2, num=2, generator=gen(41))
    null_space = lambda x: x - op.pinv(op(x))  # noqa: E731
    assert (null_space(a) - null_space(b)).abs().max() > 1e-3


def test_mask_ignores_whatever_the_missing_entries_hold(image_model):
    """y's unobserved entries are not measured: NaN there changes nothing (0 * NaN would be NaN)."""
    mask = torch.ones(1, 8, 8)
    mask[:, 4:] = 0
    truth = torch.randn(1, 8, 8, generator=gen(42))
    holes = torch.where(mask.bool(), truth, torch.nan)
    clean = image_model.inpaint(truth * mask, mask, 2, steps=2, generator=gen(43))
    assert torch.equal(image_model.inpaint(holes, mask, 2, steps=2, generator=gen(43)), clean)
    for sigma_y, particles in ((0.0, None), (0.1, None), (0.1, 4)):
        x = image_model.posterior_sample(holes, Mask(mask), sigma_y, particles, steps=2, num=2, generator=gen(44))
        assert torch.isfinite(x).all(), (sigma_y, particles)
    torch.testing.assert_close(Mask(mask).log_likelihood(truth[None], holes[None], 0.1),
                               Mask(mask).log_likelihood(truth[None], (truth * mask)[None], 0.1))
    with pytest.raises(ValueError, match="observes nothing"):
        image_model.inpaint(truth, torch.zeros(1, 8, 8), 1, generator=gen(0))


def test_smc_refuses_a_y_without_its_batch_axis():
    """An unbatched y broadcast against the K particles and weighed them by the wrong residuals."""
    op = AvgPool(2)
    den = lambda x, step, g: torch.zeros_like(x)  # noqa: E731
    y = torch.zeros(1, 1, 2, 2)
    assert smc_sample(den, "stmd", op, y, 0.1, 4, (1, 4, 4), 2, 1, gen(0)).particles.shape == (1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match=r"y has shape \(1, 2, 2\).*y\[None\]"):
        smc_sample(den, "stmd", op, y[0], 0.1, 4, (1, 4, 4), 2, 1, gen(0))


def test_matrix_needs_at_most_as_many_rows_as_dimensions():
    with pytest.raises(ValueError, match="more rows than the data has dimensions"):
        Matrix(torch.randn(3, 2, generator=gen(0)))
    with pytest.raises(ValueError, match="m, D >= 1"):
        Matrix(torch.zeros(0, 2))


def test_measure_refuses_a_negative_or_nan_noise_level():
    for bad in (-0.5, float("nan"), float("inf"), 1e200):
        with pytest.raises(ValueError, match=r"a number in \[0, 1000\]"):
            AvgPool(2).measure(torch.zeros(1, 1, 4, 4), bad)


def test_model_inputs_take_the_models_dtype_and_refuse_integers(image_model):
    """float64 / half inputs are cast to the network's dtype (they were a conv dtype error);
    8-bit pixels are refused (the model works in [-1, 1])."""
    x = torch.randn(2, 1, 8, 8, generator=gen(45))
    ref = image_model.transition(x, 0.5, 0.1, generator=gen(46))
    torch.testing.assert_close(image_model.transition(x.double(), 0.5, 0.1, generator=gen(46)), ref)
    mask = torch.ones(1, 8, 8)
    mask[:, :, 4:] = 0
    done = image_model.inpaint(x[0].double(), mask, 1, steps=2, generator=gen(47))
    assert done.dtype == torch.float32
    with pytest.raises(ValueError, match=r"torch.uint8.*x.float\(\) / 127.5 - 1"):
        image_model.inpaint(x[0].to(torch.uint8), mask, 1, steps=2, generator=gen(0))
    # the gmm package's own recipe makes a float64 y
    mlp = build_net(NetConfig(kind="mlp", width=16, depth=1, time_freqs=8), (2,), True, 3).eval()
    gmm = Model(mlp, "stmd", (2,), "vector", {})
    y = Matrix(MATRIX).measure(default_mixture().sample(1, gen(48), torch.float64), 0.1, gen(49))[0]
    assert gmm.posterior_sample(y, Matrix(MATRIX), 0.1, steps=2, num=2, generator=gen(50)).dtype == torch.float32


def test_default_steps_are_the_methods_own():
    """DDPM's one-step x0_hat is a posterior mean: its default is 100 steps, as on the command line."""
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *args):
            calls.append(1)
            return self.net(*args)

    ddpm = Model(Counting(tiny_net("ddpm", (1, 8, 8))), "ddpm", (1, 8, 8), "image", {})
    ddpm.sample(1, generator=gen(0))
    assert len(calls) == METHODS["ddpm"].default_steps == 100


def test_measurement_posterior_drops_components_with_no_mass():
    """A y far from a component makes its weight underflow to 0: the posterior keeps the others
    (the constructor refused a zero weight) and says so for a sigma_y too small for float64."""
    two = GaussianMixture([1.0, 1.0], [[-1.0], [1.0]], [[[1e-4]], [[1e-4]]])
    post, _ = two.observe([[1.0]], [1.0], 0.01)
    assert len(post.weights) == 1 and abs(float(post.means[0, 0]) - 1.0) < 1e-3
    post, _ = default_mixture().observe([[1.0, 0.0]], [50.0], 0.1)
    assert torch.isclose(post.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite sigma_y > 0"):
        default_mixture().observe(MATRIX, [0.0], float("inf"))
    with pytest.raises(ValueError, match="use a larger sigma_y"):
        default_mixture().observe(torch.eye(2), [1.5, 0.0], 1e-9)


@pytest.mark.parametrize("steps", [2.5, 2.0, "2", torch.tensor(2)])
def test_steps_that_are_not_whole_numbers_are_refused(image_model, steps):
    # steps=2.5 ran: its uniform grid ended at s = -0.2 (bridge noise left in), the quadratic one never reached
    # s = 0, and inpainting no longer kept the observed pixels
    mask = torch.ones(1, 8, 8)
    mask[:, 4:] = 0
    with pytest.raises(TypeError, match=r"steps must be a whole number"):
        image_model.sample(2, steps=steps, generator=gen(0))
    with pytest.raises(TypeError, match=r"steps must be a whole number"):
        image_model.inpaint(torch.zeros(1, 8, 8), mask, 2, steps=steps, generator=gen(0))
    with pytest.raises(TypeError, match=r"flow_steps must be a whole number"):
        image_model.sample(2, steps=1, flow_steps=steps, generator=gen(0))


def test_api_arguments_of_the_wrong_kind_are_named(image_model):
    x = torch.zeros(1, 8, 8)
    for call, match in [(lambda: image_model.sample(2.0), "num must be a whole number"),
                        (lambda: image_model.sample(4, batch_size=2.5), "batch_size must be a whole number"),
                        (lambda: image_model.sample(2, generator=0), "generator must be a torch.Generator"),
                        (lambda: image_model.posterior_sample(x, "sr4"), "operator must be one of stmd_fast.operators"),
                        (lambda: image_model.posterior_sample(x, Mask(torch.ones(1, 8, 8)), 0.1, particles=2.0),
                         "particles must be a whole number"),
                        (lambda: image_model.posterior_sample(x, Mask(torch.ones(1, 8, 8)), None), "sigma_y must be "
                                                                                                 "a number")]:
        with pytest.raises(TypeError, match=match):
            call()


def test_masks_as_arrays_and_a_mask_that_observes_nothing(image_model):
    mask = np.ones((1, 8, 8), np.float32)
    mask[:, 4:] = 0
    truth = torch.randn(1, 8, 8, generator=gen(51))
    done = image_model.inpaint(truth, mask, 2, steps=2, generator=gen(52))  # numpy mask: was an AttributeError
    assert torch.equal(done[:, :, :4], truth[None, :, :4].expand(2, 1, 4, 8))
    x = image_model.posterior_sample(truth, Mask(mask), 0.0, steps=2, num=2, generator=gen(53))
    assert torch.equal(x[:, :, :4], truth[None, :, :4].expand(2, 1, 4, 8))
    with pytest.raises(ValueError, match="observes nothing"):  # as inpaint refuses it
        Mask(np.zeros((1, 8, 8)))


def test_an_observation_in_0_255_is_said_and_other_weights_dtypes_refused(image_model):
    mask = torch.ones(1, 8, 8)
    mask[:, 4:] = 0
    pixels = torch.randint(0, 256, (1, 8, 8), generator=gen(54)).float()
    with pytest.warns(UserWarning, match=r"reaches 2\d\d.*x / 127.5 - 1"):
        image_model.inpaint(pixels, mask, 1, steps=2, generator=gen(0))
    net = tiny_net("stmd", (1, 8, 8)).double()  # the sampler's noise and times are float32: it crashed in a conv
    with pytest.raises(ValueError, match="model.net is torch.float64"):
        Model(net, "stmd", (1, 8, 8), "image", {}).sample(2, generator=gen(0))
    assert image_model.transition(torch.zeros(0, 1, 8, 8), 0.5, 0.1).shape == (0, 1, 8, 8)  # an empty batch


def test_a_measurement_with_nan_or_inf_where_it_is_measured_is_refused(image_model):
    """NaN in y gave all-NaN DDNM draws (half NaN for an inpainting observation), and SMC a traceback from its
    resampling; a mask's missing entries may still hold anything."""
    op = AvgPool(2)
    y = op(torch.randn(1, 1, 8, 8, generator=gen(50)))[0]
    for bad in (float("nan"), float("inf")):
        y_bad = y.clone()
        y_bad[0, 0, 0] = bad
        for sigma_y, particles in ((0.0, None), (0.1, None), (0.1, 4)):
            with pytest.raises(ValueError, match=r"y holds 1 NaN or inf value\(s\) where it is measured"):
                image_model.posterior_sample(y_bad, op, sigma_y, particles, steps=2, generator=gen(0))
    mask = torch.ones(1, 8, 8)
    mask[:, 4:] = 0
    observed = torch.randn(1, 8, 8, generator=gen(51))
    observed[0, 0, 0] = float("nan")  # an observed pixel
    with pytest.raises(ValueError, match="the observation holds 1 NaN"):
        image_model.inpaint(observed, mask, 1, steps=2, generator=gen(0))
    with pytest.raises(ValueError, match="y holds 1 NaN"):
        image_model.posterior_sample(observed, Mask(mask), 0.1, 4, steps=2, generator=gen(0))


def test_operator_arguments_that_would_fail_later_are_refused_at_once(image_model):
    with pytest.raises(TypeError, match="the pooling factor must be a whole number"):
        AvgPool(2.5)  # 10 % 2.5 == 0: it passed check() and failed inside avg_pool2d
    with pytest.raises(TypeError, match="whole number"):
        AvgPool("2")
    with pytest.raises(ValueError, match=r"sr2 pools blocks of \(C, H, W\) images; these samples are \(10,\)"):
        AvgPool(2).check((10,))
    from stmd_fast.operators import check_sigma_y

    for tiny in (1e-200, 1e-155):  # the variance underflowed ("got 0.0"); 1 / sigma_y^2 overflowed (SMC's weights
        with pytest.raises(ValueError, match="too small for the likelihood's float64 arithmetic"):  # NaN, a traceback)
            check_sigma_y(tiny)
    check_sigma_y(1e-150)
    op = AvgPool(2)  # the smallest sigma_y taken: SMC's weights stay finite, its draws too
    y = op(torch.randn(1, 1, 8, 8, generator=gen(52)))[0]
    x = image_model.posterior_sample(y, op, 1e-150, 4, steps=2, num=2, generator=gen(0))
    assert torch.isfinite(x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smc_draws_on_cuda():
    """The weights live on the particles' device; multinomial with the CPU generator _cpu makes needs them on the
    CPU (it failed with "Expected a 'cuda' device type for generator")."""
    from stmd_fast.smc import SMCResult

    weights = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64, device="cuda")
    particles = torch.arange(6.0, device="cuda").view(2, 3, 1)
    result = SMCResult(particles, weights, torch.zeros(2), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert result.draw(torch.Generator("cuda").manual_seed(0)).view(-1).tolist() == [1.0, 5.0]


def test_decode_checks_its_latents_before_loading_the_vae():
    """Model.decode passed anything to the VAE: latents of another size decoded without a word into images of
    another size; one latent without its batch axis, an empty batch or batch_size=0 failed deep in diffusers.
    Each is one line now, before the VAE loads (this model's VAE folder does not exist: it is never reached)."""
    latent = Model(tiny_net("stmd", (4, 4, 4)), "stmd", (4, 4, 4), "latent",
                   {"latent": {"vae": "/nonexistent/vae", "scaling_factor": 0.18, "shift_factor": 0.0}})
    z = torch.randn(2, 4, 4, 4)
    for bad in (torch.randn(2, 4, 8, 8), z[0], z[:0]):
        with pytest.raises(ValueError, match=r"this model's latents are \(N >= 1, 4, 4, 4\)"):
            latent.decode(bad)
    with pytest.raises(ValueError, match="need batch_size >= 1"):
        latent.decode(z, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be a whole number"):
        latent.decode(z, batch_size=1.5)
    with pytest.raises(ValueError, match="z is torch.int64"):
        latent.decode(z.long())
    image = Model(tiny_net("stmd", (1, 8, 8)), "stmd", (1, 8, 8), "image", {})
    with pytest.raises(ValueError, match="makes images, not latents"):
        image.decode(torch.zeros(1, 1, 8, 8))
