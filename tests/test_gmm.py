"""stmd_fast.gmm against independent references: importance sampling from the prior, the
single-Gaussian conjugate formula (numpy), scipy densities, the marginals of the forward
process, and closed-form distances between shifted Gaussians."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from stmd_fast.gmm import (GaussianMixture, _mean_distance, default_kernel_pairs, default_mixture, energy_distance,
                           kernel_grid, sliced_w2, transition_distances)
from stmd_fast.schedule import alpha_sigma


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def alpha_sigma64(s: float) -> tuple[float, float]:
    a, sig = alpha_sigma(torch.tensor(s, dtype=torch.float64), torch.float64)
    return float(a), float(sig)


# An asymmetric law: unequal weights, correlated anisotropic components, overlapping modes.
PI = np.array([0.5, 0.3, 0.2])
MU = np.array([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.5]])
S = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.05, -0.02], [-0.02, 0.4]], [[0.1, 0.0], [0.0, 0.1]]])


@pytest.fixture
def skewed():
    return GaussianMixture(PI, MU, S)


def mixture_moments(pi, mu, cov):
    """Mean and covariance of sum_k pi_k N(mu_k, cov_k)."""
    mean = pi @ mu
    second = np.einsum("k,kij->ij", pi, cov + np.einsum("ki,kj->kij", mu, mu))
    return mean, second - np.outer(mean, mean)


def forward(x0: torch.Tensor, s: float, generator) -> torch.Tensor:
    """x_s = alpha_s x_0 + sigma_s eps."""
    a, sig = alpha_sigma64(s)
    return (a * x0.double() + sig * torch.randn(x0.shape, generator=generator, dtype=torch.float64)).to(x0.dtype)


def assert_moments(x: torch.Tensor, mean, cov, z: float = 5.0):
    """Sample mean and covariance of x agree with (mean, cov) within z standard errors.
    The covariance SE per entry is estimated from the sample of products (x_i - mu_i)(x_j - mu_j)."""
    x = x.double().numpy()
    n = x.shape[0]
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < z * se_mean), (x.mean(0), mean, se_mean)
    c = x - mean
    prods = np.einsum("ni,nj->nij", c, c)
    se_cov = prods.std(0) / np.sqrt(n)
    assert np.all(np.abs(np.cov(x.T) - cov) < z * se_cov + 1e-12), (np.cov(x.T), cov, se_cov)


# ---------------------------------------------------------------------------------------------
# The posterior
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_posterior_matches_importance_sampling(skewed, s):
    """Self-normalised importance sampling with the prior as proposal: draw x0_i ~ p(x_0),
    weight by p(x_s | x0_i) = N(x_s; alpha x0_i, sigma^2 I). Its delta-method standard error
    sqrt(sum w_i^2 (f_i - f_hat)^2) / sum w_i is ~ posterior std / sqrt(ESS); we allow 5 of them."""
    rng = np.random.default_rng(0)
    n = 200_000
    k = rng.choice(len(PI), size=n, p=PI)
    x0 = MU[k] + np.einsum("nij,nj->ni", np.linalg.cholesky(S)[k], rng.standard_normal((n, 2)))
    a, sig = alpha_sigma64(s)
    x_s = np.array([[0.0, 0.0], [-0.6, 0.2], [0.9, -0.4], [0.1, 1.1]])
    w, m, c = skewed.posterior(torch.from_numpy(x_s), s)
    w, m, c = w.numpy(), m.numpy(), c.numpy()
    assert np.allclose(w.sum(1), 1)
    mean = np.einsum("bk,bkd->bd", w, m)
    second = np.einsum("bk,bkij->bij", w, c[None] + np.einsum("bki,bkj->bkij", m, m))
    for b in range(len(x_s)):
        logw = -((x_s[b] - a * x0) ** 2).sum(1) / (2 * sig**2)
        iw = np.exp(logw - logw.max())
        ess = iw.sum() ** 2 / (iw**2).sum()
        assert ess > 2_000, f"too few effective samples ({ess:.0f}) for a meaningful check"

        def check(f, exact, what):
            est = iw @ f / iw.sum()
            se = np.sqrt((iw[:, None] ** 2 * (f - est) ** 2).sum(0)) / iw.sum()
            assert np.all(np.abs(est - exact) < 5 * se + 1e-12), (what, s, x_s[b], est, exact, se, ess)

        check(np.eye(len(PI))[k], w[b], "component weights")
        check(x0, mean[b], "posterior mean")
        check(np.einsum("ni,nj->nij", x0, x0).reshape(n, 4), second[b].reshape(4), "second moment")
        # posterior_mean is the same sum_k w_k m_k
        pm = skewed.posterior_mean(torch.from_numpy(x_s[b : b + 1]), s).numpy()[0]
        assert np.allclose(pm, mean[b], atol=1e-12)


@pytest.mark.parametrize("s", [0.01, 0.3, 0.7, 1.0])
def test_single_gaussian_is_the_conjugate_formula(s):
    """K = 1: p(x_0 | x_s) = N(m, C) with C = (S^{-1} + a^2/sigma^2 I)^{-1},
    m = C (S^{-1} mu + a x_s / sigma^2), computed here in numpy from the information form."""
    rng = np.random.default_rng(1)
    d = 3
    a_ = rng.standard_normal((d, d))
    cov = a_ @ a_.T + 0.1 * np.eye(d)
    mu = rng.standard_normal(d)
    x_s = rng.standard_normal((5, d))
    a, sig = alpha_sigma64(s)
    prec = np.linalg.inv(cov)
    c_ref = np.linalg.inv(prec + a**2 / sig**2 * np.eye(d))
    m_ref = (c_ref @ (prec @ mu[:, None] + a * x_s.T / sig**2)).T

    w, m, c = GaussianMixture([2.0], mu[None], cov[None]).posterior(torch.from_numpy(x_s), s)
    assert np.allclose(w.numpy(), 1.0)
    assert np.allclose(c.numpy()[0], c_ref, rtol=1e-9, atol=1e-12)
    assert np.allclose(m.numpy()[:, 0], m_ref, rtol=1e-9, atol=1e-10)


def test_posterior_weights_match_scipy_densities(skewed):
    """w_k ~ pi_k N(x_s; a mu_k, a^2 S_k + sigma^2 I), normalised, with scipy's densities.
    At s = 0.05 the components are nearly separated: weights close to 0 and 1 must survive."""
    x_s = np.array([[0.0, 0.0], [-0.9, 0.5], [1.1, -0.3], [3.0, 3.0]])
    for s in (0.05, 0.5):
        a, sig = alpha_sigma64(s)
        dens = np.stack(
            [p * multivariate_normal(a * m, a**2 * c + sig**2 * np.eye(2)).pdf(x_s) for p, m, c in zip(PI, MU, S)], 1
        )
        w, _, _ = skewed.posterior(torch.from_numpy(x_s), s)
        assert np.allclose(w.numpy(), dens / dens.sum(1, keepdims=True), rtol=1e-9, atol=1e-300)


def test_posterior_far_from_all_components_is_finite():
    """Log-space weights: a point 50 noise-stds away from every component must not give NaN."""
    gm = default_mixture()
    w, m, c = gm.posterior(torch.tensor([[40.0, -40.0]], dtype=torch.float64), 0.02)
    assert torch.isfinite(w).all() and torch.isfinite(m).all()
    assert torch.allclose(w.sum(1), torch.ones(1, dtype=torch.float64))


def test_posterior_samples_have_the_data_law(skewed):
    """x0 ~ data, x_s ~ forward, x0' ~ p(x_0 | x_s): x0' ~ data again (the posterior's defining
    property). Compared with the analytic moments, and by energy distance against a fresh data
    sample, next to a clearly wrong law with the same mean and covariance (a Gaussian)."""
    n, s = 20_000, 0.5
    x0 = skewed.sample(n, gen(0))
    x0_post = skewed.posterior_sample(forward(x0, s, gen(1)), s, gen(2))
    assert x0_post.shape == (n, 2) and x0_post.dtype == torch.float32
    mean, cov = mixture_moments(PI, MU, S)
    assert_moments(x0_post, mean, cov)

    m = 4_000
    reference = skewed.sample(m, gen(3))
    gaussian = torch.from_numpy(np.random.default_rng(4).multivariate_normal(mean, cov, size=m))
    ed_post = energy_distance(x0_post[:m], reference)
    ed_wrong = energy_distance(gaussian, reference)
    # Null fluctuations of this U-statistic at n = m = 4000 are ~ 1e-3.
    assert abs(ed_post) < 0.01, ed_post
    assert ed_wrong > 0.03 and ed_wrong > 5 * abs(ed_post), (ed_post, ed_wrong)


@pytest.mark.parametrize("s_from,s_to", [(0.7, 0.2), (1.0, 0.5), (0.3, 0.0)])
def test_exact_transition_preserves_marginals(skewed, s_from, s_to):
    """x_{s_from} ~ forward, x_{s_to} ~ exact_transition: x_{s_to} has the forward marginal
    sum_k pi_k N(a mu_k, a^2 S_k + sigma^2 I) at s_to."""
    n = 20_000
    x_from = forward(skewed.sample(n, gen(10)), s_from, gen(11))
    x_to = skewed.exact_transition(x_from, s_from, s_to, gen(12))
    a, sig = alpha_sigma64(s_to)
    mean, cov = mixture_moments(PI, a * MU, a**2 * S + sig**2 * np.eye(2))
    assert_moments(x_to, mean, cov)

    m = 4_000
    reference = forward(skewed.sample(m, gen(13)), s_to, gen(14))
    ed = energy_distance(x_to[:m], reference)
    assert abs(ed) < 0.01, ed
    # The DDPM-style mean step loses the posterior's spread, visibly in the covariance. (Only a
    # few percent from s = 1, where alpha_s^2 ~ 4e-5 leaves p(x_0 | x_s) almost the prior, and
    # alpha^2 = 0.08 at s_to = 0.5 shrinks what x_0 adds to x_{s_to}.)
    x_mean = skewed.mean_transition(x_from, s_from, s_to, gen(15))
    ratio = np.trace(np.cov(x_mean.double().numpy().T)) / np.trace(cov)
    print(f"\nmean_transition {s_from}->{s_to}: total variance / true = {ratio:.3f}")
    assert ratio < (0.97 if s_from == 1.0 else 0.9)


def test_transition_to_zero_is_a_posterior_sample(skewed):
    """At s_to = 0 the bridge is a point mass: exact_transition returns the posterior sample itself."""
    x_s = forward(skewed.sample(100, gen(20)), 0.4, gen(21))
    assert torch.equal(skewed.exact_transition(x_s, 0.4, 0.0, gen(5)), skewed.posterior_sample(x_s, 0.4, gen(5)))
    assert torch.equal(skewed.mean_transition(x_s, 0.4, 0.0, gen(5)), skewed.posterior_mean(x_s, 0.4))


def test_mean_transition_misses_a_multimodal_posterior():
    """The premise of the headline test: for a fixed x_s at s = 0.5 the default mixture's
    posterior spreads over all 8 modes; one Gaussian DDPM step to s = 0.1 (even with the exact
    posterior mean) is far from the exact kernel, while two exact draws agree to noise level."""
    gm = default_mixture()
    n, s_from, s_to = 4_000, 0.5, 0.1
    x_s = torch.tensor([[0.2, -0.1]]).expand(n, 2).contiguous()
    w, _, _ = gm.posterior(x_s[:1], s_from)
    assert w.max() < 0.5, "the posterior should be multimodal for this test to mean anything"

    exact_a = gm.exact_transition(x_s, s_from, s_to, gen(30))
    exact_b = gm.exact_transition(x_s, s_from, s_to, gen(31))
    mean = gm.mean_transition(x_s, s_from, s_to, gen(32))
    ed_exact = energy_distance(exact_a, exact_b)
    ed_mean = energy_distance(exact_a, mean)
    print(f"\nenergy distance at s {s_from}->{s_to}, x_s = (0.2, -0.1), n = {n}: "
          f"exact vs exact {ed_exact:.2e}, exact vs mean {ed_mean:.3f}")
    assert abs(ed_exact) < 0.01, ed_exact
    assert ed_mean > 0.1 and ed_mean > 20 * abs(ed_exact), (ed_exact, ed_mean)
    # "lower than true spread": the mean step is a single Gaussian of the bridge's width.
    assert torch.trace(torch.cov(mean.T)) < 0.3 * torch.trace(torch.cov(exact_a.T))


# ---------------------------------------------------------------------------------------------
# The distances
# ---------------------------------------------------------------------------------------------


def test_energy_distance_is_the_u_statistic():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3

    def mean_dist(a, b, within):
        d = np.linalg.norm(a[:, None] - b[None], axis=-1)
        return d.sum() / (len(a) * (len(a) - 1)) if within else d.mean()

    ref = 2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)
    assert energy_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, rel=1e-12)
    assert energy_distance(x, y) == pytest.approx(ref, rel=1e-12)  # numpy arrays work too
    # The row-chunked sum is the same as the one-shot sum.
    xt = torch.from_numpy(x)
    assert _mean_distance(xt, xt, True, chunk_elems=4) == pytest.approx(mean_dist(x, x, True), rel=1e-12)


def test_energy_distance_of_shifted_gaussians():
    """~0 for equal laws; for N(0, 1) vs N(delta, 1) in 1-D the closed form
    2 E|N(delta, 2)| - 2 E|N(0, 2)|, with E|N(mu, t^2)| = t sqrt(2/pi) exp(-mu^2/2t^2) + mu (1 - 2 Phi(-mu/t))."""
    g = gen(40)
    n = 2_000  # null fluctuations ~ 1e-3
    gm = default_mixture()
    same = energy_distance(gm.sample(n, g), gm.sample(n, g))
    shifted = energy_distance(gm.sample(n, g), gm.sample(n, g) + torch.tensor([0.5, 0.0]))
    assert abs(same) < 0.005 and shifted > 0.05, (same, shifted)

    def abs_mean(mu, t):
        return t * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * t**2)) + mu * (1 - 2 * norm.cdf(-mu / t))

    # Quantile grids x_i = Phi^{-1}((i + 1/2) / n) stand in for the laws with no sampling noise;
    # what is left is the U-statistic's O(1/n) offset on fixed points (~ -2.3 / n).
    grid = torch.from_numpy(norm.ppf((np.arange(2_000) + 0.5) / 2_000)[:, None])
    for delta in (0.5, 2.0):
        exact = 2 * abs_mean(delta, math.sqrt(2)) - 2 * abs_mean(0.0, math.sqrt(2))
        assert energy_distance(grid, grid + delta) == pytest.approx(exact, abs=0.005)


def test_sliced_w2_of_shifted_gaussians():
    """A shift delta along one axis projects to delta cos(theta) on direction theta, so
    sliced W2 = delta sqrt(mean cos^2) -> delta / sqrt(2) in 2-D."""
    delta = 2.0
    n = 10_000
    x = torch.randn(n, 2, generator=gen(50), dtype=torch.float64)
    shift = torch.tensor([delta, 0.0], dtype=torch.float64)
    # Exactly shifted copy: only the finite set of directions adds error (std of cos^2 is
    # sqrt(1/8), so ~0.6% on the root at 1024 directions).
    assert sliced_w2(x[:1000], x[:1000] + shift, projections=1024, generator=gen(51)) == pytest.approx(
        delta / math.sqrt(2), rel=0.03
    )
    # Independent samples: the directions' error (~2% at 256) plus a little sampling noise.
    y = torch.randn(n, 2, generator=gen(52), dtype=torch.float64) + shift
    assert sliced_w2(x, y, generator=gen(53)) == pytest.approx(delta / math.sqrt(2), rel=0.08)
    assert sliced_w2(x, torch.randn(n, 2, generator=gen(54), dtype=torch.float64), generator=gen(55)) < 0.05
    # Same generator seed, same directions.
    assert sliced_w2(x[:500], y[:500], generator=gen(56)) == sliced_w2(x[:500], y[:500], generator=gen(56))
    with pytest.raises(ValueError, match="equal-size"):
        sliced_w2(x, y[:100])


# ---------------------------------------------------------------------------------------------
# The exact-kernel grid, with oracle "models" whose transition is known
# ---------------------------------------------------------------------------------------------

ROW_KEYS = {"s_from", "s_to", "flow_steps", "energy_model", "energy_mean_bridge", "energy_floor",
            "sw2_model", "sw2_mean_bridge", "sw2_floor"}


class Oracle:
    """Stands in for stmd_fast.Model: transition() is a GaussianMixture kernel (plus a shift),
    whatever M; every call is recorded."""

    device = torch.device("cpu")
    method = "stmd"

    def __init__(self, kernel, shift: float = 0.0):
        self.kernel, self.shift, self.calls = kernel, shift, []

    def transition(self, x, s_from, s_to, flow_steps=1, generator=None):
        assert generator is not None and generator.device == self.device  # seeded, never the global RNG
        self.calls.append((s_from, s_to, flow_steps))
        return self.kernel(x, s_from, s_to, generator) + self.shift


@pytest.fixture
def one_thread():
    """These tensors are tiny: on a busy 2-core machine, 2 intra-op threads waiting on each other
    made the grid ~25x slower (48 s instead of 2 s) than one thread. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_default_kernel_pairs():
    pairs = default_kernel_pairs()
    assert len(pairs) == 13 and len(set(pairs)) == 13
    assert all(0.0 <= b < a <= 1.0 for a, b in pairs)
    assert {a for a, _ in pairs} == {0.2, 0.5, 0.8, 1.0} and {b for _, b in pairs} == {0.0, 0.1, 0.3, 0.6}
    assert (0.5, 0.1) in pairs and (1.0, 0.0) in pairs and (0.2, 0.3) not in pairs


def test_kernel_grid_of_the_exact_kernel_is_at_the_noise_floor(one_thread):
    """An oracle that samples the exact kernel is as close to it as an independent exact draw:
    energy_model sits within a few noise-floor spreads of 0 at every pair (s_to = 0 included,
    where both are posterior samples), and sliced W2 at the floor's finite-sample level."""
    gm = default_mixture()
    oracle = Oracle(gm.exact_transition)
    pairs = default_kernel_pairs()
    rows = kernel_grid(oracle, gm, pairs, [1, 2], points=3, num=400, seed=0, progress=True)
    assert [(r["s_from"], r["s_to"], r["flow_steps"]) for r in rows] == [(a, b, m) for a, b in pairs for m in (1, 2)]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert all(isinstance(r[k], float) and math.isfinite(r[k]) for r in rows for k in ROW_KEYS - {"flow_steps"})
    assert oracle.calls == [(a, b, m) for a, b in pairs for _ in range(3) for m in (1, 2)]

    floor = np.array([r["energy_floor"] for r in rows])
    spread = np.sqrt(np.mean(floor**2))  # ~ 3e-3 at 400 draws
    model = np.array([r["energy_model"] for r in rows])
    print(f"\nexact oracle: max |energy_model| {np.abs(model).max():.1e}, floor spread {spread:.1e}")
    assert 0 < spread < 0.01
    assert np.all(np.abs(model) < 4 * spread), model
    sw2_floor = np.mean([r["sw2_floor"] for r in rows])  # sliced W2 is biased up at finite n (~0.1 here)
    assert all(r["sw2_model"] < 2 * sw2_floor for r in rows)
    # The oracle ignores M, and every M gets the same seed: M = 1 and M = 2 rows agree exactly.
    for r1, r2 in zip(rows[::2], rows[1::2]):
        assert {k: v for k, v in r1.items() if k != "flow_steps"} == {k: v for k, v in r2.items() if k != "flow_steps"}
    # The DDPM column: far off where the posterior is multimodal, as math.md section 8 says.
    by_pair = {(r["s_from"], r["s_to"]): r for r in rows}
    assert by_pair[(0.5, 0.1)]["energy_mean_bridge"] > 50 * spread


def test_kernel_grid_sees_wrong_kernels(one_thread):
    """A shifted exact kernel is far (> 10x the noise level) at every pair; the posterior-mean
    bridge is far at (0.5, 0.1), and there it reproduces the grid's own mean-bridge column
    (exactly at s_to = 0, where the mean step has no randomness)."""
    gm = default_mixture()
    pairs = [(0.5, 0.1), (1.0, 0.0), (0.2, 0.1), (0.8, 0.6)]
    shifted = kernel_grid(Oracle(gm.exact_transition, shift=0.5), gm, pairs, [1], points=3, num=400, progress=False)
    mean = kernel_grid(Oracle(gm.mean_transition), gm, pairs, [1], points=3, num=400, progress=False)
    noise = max(abs(r["energy_floor"]) for r in shifted + mean)
    assert 0 < noise < 0.02
    for r in shifted:
        assert r["energy_model"] > 10 * noise, r
        assert r["sw2_model"] > 2 * r["sw2_floor"], r
    r = mean[0]
    assert (r["s_from"], r["s_to"]) == (0.5, 0.1)
    assert r["energy_model"] > 10 * noise and r["sw2_model"] > 2 * r["sw2_floor"], r
    assert r["energy_model"] == pytest.approx(r["energy_mean_bridge"], rel=0.15)
    assert mean[1]["energy_model"] == mean[1]["energy_mean_bridge"] and mean[1]["sw2_model"] == mean[1]["sw2_mean_bridge"]
    # The grid's columns other than the model's do not depend on the model.
    for a, b in zip(shifted, mean):
        assert {k: a[k] for k in ROW_KEYS - {"energy_model", "sw2_model"}} == \
               {k: b[k] for k in ROW_KEYS - {"energy_model", "sw2_model"}}


def test_kernel_grid_is_seeded_and_matches_transition_distances(one_thread):
    """Same seed, same rows; another seed, other rows; a pair's numbers do not depend on the
    rest of the grid, and are transition_distances' for that pair."""
    gm = default_mixture()
    oracle = Oracle(gm.exact_transition)
    pairs = [(0.5, 0.1), (0.3, 0.0)]
    kwargs = dict(points=2, num=200, progress=False)
    rows = kernel_grid(oracle, gm, pairs, [1], seed=3, **kwargs)
    assert rows == kernel_grid(oracle, gm, pairs, [1], seed=3, **kwargs)
    assert rows != kernel_grid(oracle, gm, pairs, [1], seed=4, **kwargs)
    alone = kernel_grid(oracle, gm, [pairs[1]], [2], seed=3, **kwargs)[0]
    assert {k: v for k, v in alone.items() if k != "flow_steps"} == {k: v for k, v in rows[1].items() if k != "flow_steps"}
    d = transition_distances(oracle, gm, 0.5, 0.1, flow_steps=1, points=2, num=200, seed=3)
    assert d == {"learned": rows[0]["energy_model"], "mean_bridge": rows[0]["energy_mean_bridge"],
                 "exact_floor": rows[0]["energy_floor"]}


def test_kernel_grid_drives_a_real_model(one_thread):
    """Through stmd_fast.Model.transition (an untrained gmm-preset MLP): one row per pair and M,
    finite numbers, and the model's columns differ between M while the others do not."""
    from stmd_fast.checkpoint import Model
    from stmd_fast.config import _gmm
    from stmd_fast.models import build_net
    from stmd_fast.objectives import METHODS

    torch.manual_seed(0)
    net = build_net(_gmm().net, (2,), METHODS["stmd"].conditional, len(METHODS["stmd"].times)).eval()
    model = Model(net, "stmd", (2,), "vector", {})
    rows = kernel_grid(model, default_mixture(), [(0.5, 0.0), (1.0, 0.3)], [1, 2], points=2, num=200, progress=False)
    assert [(r["s_from"], r["s_to"], r["flow_steps"]) for r in rows] == [(0.5, 0.0, 1), (0.5, 0.0, 2), (1.0, 0.3, 1), (1.0, 0.3, 2)]
    assert all(math.isfinite(r[k]) for r in rows for k in ROW_KEYS)
    assert rows[0]["energy_model"] != rows[1]["energy_model"] and rows[0]["energy_floor"] == rows[1]["energy_floor"]


def test_kernel_grid_validates_before_any_work():
    gm = default_mixture()

    class Refuses(Oracle):
        def transition(self, *args, **kwargs):
            raise AssertionError("validation should refuse before the model runs")

    model = Refuses(None)
    for pair, message in [((0.3, 0.5), r"\(0\.3, 0\.5\)"), ((0.5, 0.5), r"\(0\.5, 0\.5\)"),
                          ((1.2, 0.1), r"\(1\.2, 0\.1\)"), ((0.5, -0.1), r"\(0\.5, -0\.1\)"),
                          ((0.5, float("nan")), r"\(0\.5, nan\)"), ((0.5,), r"\(0\.5,\)"), (("a", 0.1), "'a'")]:
        with pytest.raises(ValueError, match=message):
            kernel_grid(model, gm, [(0.5, 0.1), pair], [1], progress=False)
    with pytest.raises(ValueError, match="twice"):
        kernel_grid(model, gm, [(0.5, 0.1), (0.5, 0.1)], [1], progress=False)
    with pytest.raises(ValueError, match="at least one"):
        kernel_grid(model, gm, [], [1], progress=False)
    for steps in ([], [1.5], ["2"]):
        with pytest.raises(ValueError, match="non-empty list of integers"):
            kernel_grid(model, gm, [(0.5, 0.1)], steps, progress=False)
    with pytest.raises(ValueError, match=r"M \(--flow-steps\) >= 1"):
        kernel_grid(model, gm, [(0.5, 0.1)], [1, 0], progress=False)
    with pytest.raises(ValueError, match="repeats"):
        kernel_grid(model, gm, [(0.5, 0.1)], [2, 2], progress=False)
    model.method = "ddpm"
    with pytest.raises(ValueError, match="DDPM"):
        kernel_grid(model, gm, [(0.5, 0.1)], [1, 2], progress=False)
    with pytest.raises(ValueError, match="num >= 2"):
        kernel_grid(model, gm, [(0.5, 0.1)], [1], num=1, progress=False)
    with pytest.raises(ValueError, match=r"\(0\.1, 0\.5\)"):
        transition_distances(model, gm, 0.1, 0.5)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


def test_default_mixture_is_the_gmm_preset():
    gm = default_mixture()
    assert gm.kind == "vector" and gm.shape == (2,)
    assert torch.allclose(gm.weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    assert torch.allclose(gm.means.norm(dim=1), torch.full((8,), 1.5, dtype=torch.float64))
    assert torch.allclose(gm.covs, 0.15**2 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2))
    x = gm.batch(50_000, gen(60))
    assert x.shape == (50_000, 2) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert_moments(x, np.zeros(2), (0.15**2 + 1.5**2 / 2) * np.eye(2))
    assert torch.equal(gm.batch(10, gen(61)), gm.sample(10, gen(61)))


def test_weights_are_normalised_and_inputs_validated():
    assert torch.allclose(GaussianMixture([2.0, 6.0], MU[:2], S[:2]).weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture([[1.0]], MU[:1], S[:1])
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture(PI, MU[:2], S)
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture(PI, MU, S[:, :1, :1])
    with pytest.raises(ValueError, match="> 0"):
        GaussianMixture([0.5, 0.0, 0.5], MU, S)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(PI[:1], MU[:1], [[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match=r"positive definite; components \[1\]"):
        GaussianMixture(PI[:2], MU[:2], np.array([np.eye(2), [[1.0, 2.0], [2.0, 1.0]]]))
    gm = default_mixture()
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        gm.posterior(x, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        gm.posterior(x, 1.5)
    with pytest.raises(ValueError, match="shape"):
        gm.posterior(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match="s_to <= s_from"):
        gm.exact_transition(x, 0.3, 0.5, gen(0))


def test_dtypes_follow_x_s():
    gm = default_mixture()
    x = gm.sample(8, gen(70))
    for dt in (torch.float32, torch.float64):
        xs = x.to(dt)
        w, m, c = gm.posterior(xs, 0.5)
        assert w.dtype == m.dtype == c.dtype == dt
        assert w.shape == (8, 8) and m.shape == (8, 8, 2) and c.shape == (8, 2, 2)
        for out in (gm.posterior_mean(xs, 0.5), gm.posterior_sample(xs, 0.5, gen(0)),
                    gm.exact_transition(xs, 0.5, 0.2, gen(0)), gm.mean_transition(xs, 0.5, 0.2, gen(0))):
            assert out.dtype == dt and out.shape == (8, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_gives_cuda_tensors():
    gm = default_mixture()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = gm.batch(16, g)
    assert x.device.type == "cuda" and x.dtype == torch.float32
    assert torch.allclose(gm.posterior_mean(x, 0.5).cpu(), gm.posterior_mean(x.cpu(), 0.5), atol=1e-6)
    assert gm.exact_transition(x, 0.5, 0.1, g).device.type == "cuda"
    gm.to("cuda")
    assert gm.means.device.type == "cuda" and gm.batch(4, gen(0)).device.type == "cpu"
