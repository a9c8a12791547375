"""Property tests of the core method (math.md): schedule, bridge, networks' JVP, objectives, sampler.

Every test checks a value against an independent reference: a closed form, a finite
difference, a Monte Carlo estimate with a tolerance derived from its standard error,
or an oracle network whose exact answer is known. Tiny networks keep it fast on CPU.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stmd_fast import models, sampling, schedule
from stmd_fast.kernels.attention import attention_reference
from stmd_fast.models import NetConfig, build_net
from stmd_fast.objectives import METHODS, ObjectiveConfig, compute_loss, draw_noise
from stmd_fast.schedule import TIME_GRIDS, time_grid

B0, B1 = 0.1, 20.0  # math.md section 1

UNET = dict(kind="unet", channels=(8, 16), norm_groups=4, head_dim=4, time_freqs=16,
            attention_levels=(1,), mid_attention=True)
MLP = dict(kind="mlp", width=32, depth=2, time_freqs=16)
IMG, VEC = (1, 8, 8), (2,)


def ref_alpha_sigma(s) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_s, sigma_s from math.md in float64 (independent of the package's code)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    la = -0.25 * s**2 * (B1 - B0) - 0.5 * s * B0
    return la.exp(), (-torch.expm1(2 * la)).sqrt()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def net_for(method: str, kind: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    m = METHODS[method]
    cfg = NetConfig(**(UNET if kind == "unet" else MLP))
    return build_net(cfg, IMG if kind == "unet" else VEC, m.conditional, len(m.times)).to(dtype)


@contextlib.contextmanager
def float64_network():
    """Turn a dtype crash of a float64 network into a one-line failure (the default traceback
    prints functorch tensors and takes minutes to render)."""
    try:
        yield
    except RuntimeError as e:
        if "dtype" not in str(e):
            raise
        pytest.fail(f"a float64 network crashed with a dtype mismatch: {e}", pytrace=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------
# 1. Schedule
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1e-8, 1e-6])
def test_sigma_near_zero_is_positive_and_first_order_b0_s(s):
    alpha, sigma = schedule.alpha_sigma(torch.tensor([s], dtype=torch.float64), torch.float64)
    sigma2 = float(sigma[0] ** 2)
    assert sigma2 > 0
    # sigma^2 = b0 s + O(s^2 * (b1 - b0)): relative deviation ~ 100 s
    assert abs(sigma2 / (B0 * s) - 1) < 1e-4
    assert abs(float(alpha[0] ** 2 + sigma[0] ** 2) - 1) < 1e-14
    # the float32 output does not underflow either (the reason the schedule is float64 inside)
    _, sigma32 = schedule.alpha_sigma(torch.tensor([s], dtype=torch.float32))
    assert sigma32.dtype == torch.float32
    assert abs(float(sigma32[0].double() ** 2) / (B0 * s) - 1) < 1e-3


def test_schedule_identities_and_monotonicity():
    s = torch.linspace(0, 1, 10001, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(s, torch.float64)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(s), atol=1e-14, rtol=0)
    assert float(alpha[0]) == 1.0 and float(sigma[0]) == 0.0
    assert (alpha.diff() < 0).all() and (sigma.diff() > 0).all()
    assert abs(float(alpha[-1]) - math.exp(-0.25 * (B1 - B0) - 0.5 * B0)) < 1e-15
    # log alpha solves the forward SDE's mean ODE: d log alpha / ds = -beta(s) / 2
    h = 1e-6
    si = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    dla = (schedule.log_alpha(si + h) - schedule.log_alpha(si - h)) / (2 * h)
    assert torch.allclose(dla, -0.5 * (B0 + (B1 - B0) * si), atol=1e-8, rtol=0)


def test_time_grid():
    for kind, f in (("uniform", lambda k: k), ("quadratic", lambda k: k**2)):
        g = schedule.time_grid(5, kind)
        assert g.dtype == torch.float64 and g.shape == (6,)
        assert float(g[0]) == 1.0 and float(g[-1]) == 0.0 and (g.diff() < 0).all()
        assert torch.allclose(g, f(torch.arange(5, -1, -1, dtype=torch.float64) / 5))
    with pytest.raises(ValueError):
        schedule.time_grid(0)
    with pytest.raises(ValueError):
        schedule.time_grid(3, "cosine")


# --------------------------------------------------------------------------------------
# 2. Bridge vs the forward process
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_prev,s", [(0.3, 0.6), (0.05, 0.9), (0.5, 0.51)])
def test_bridge_coefficients_match_monte_carlo_regression(s_prev, s):
    """Simulate the forward chain x0 -> x_{s'} -> x_s and regress x_{s'} on x_s (per x0)."""
    n = 1_000_000
    g = gen(1)
    x0 = torch.tensor([-1.5, 0.0, 0.7, 2.0], dtype=torch.float64)[:, None]  # (4, 1), vectorised
    a_p, sg_p = ref_alpha_sigma(s_prev)
    a_s, sg_s = ref_alpha_sigma(s)
    a_step = a_s / a_p
    sg_step = (sg_s**2 - a_step**2 * sg_p**2).sqrt()
    x_prev = a_p * x0 + sg_p * torch.randn(4, n, generator=g, dtype=torch.float64)
    x_s = a_step * x_prev + sg_step * torch.randn(4, n, generator=g, dtype=torch.float64)

    xm, ym = x_s.mean(1, keepdim=True), x_prev.mean(1, keepdim=True)
    var_x = ((x_s - xm) ** 2).mean(1)
    slope = ((x_s - xm) * (x_prev - ym)).mean(1) / var_x
    intercept = ym[:, 0] - slope * xm[:, 0]
    resid = x_prev - (intercept[:, None] + slope[:, None] * x_s)
    rvar = (resid**2).sum(1) / (n - 2)

    c_xs, c_x0, tau = schedule.bridge_coefficients(torch.tensor(s), torch.tensor(s_prev), torch.float64)
    # standard errors of OLS (6 sigma: 12 checks per case, fixed seed)
    se_slope = (rvar / (n * var_x)).sqrt()
    se_int = (rvar * (1 / n + xm[:, 0] ** 2 / (n * var_x))).sqrt()
    se_var = rvar * math.sqrt(2 / n)
    assert torch.all((slope - c_xs).abs() < 6 * se_slope), (slope, c_xs)
    assert torch.all((intercept - c_x0 * x0[:, 0]).abs() < 6 * se_int), (intercept, c_x0 * x0[:, 0])
    assert torch.all((rvar - tau**2).abs() < 6 * se_var), (rvar, tau**2)


def test_bridge_coefficients_closed_form_and_edges():
    s, sp = torch.tensor([0.9, 0.4, 0.2]), torch.tensor([0.1, 0.39, 0.0])
    c_xs, c_x0, tau = schedule.bridge_coefficients(s, sp, torch.float64)
    a_s, sg_s = ref_alpha_sigma(s)
    a_p, sg_p = ref_alpha_sigma(sp)
    a_st = a_s / a_p
    sg2_st = sg_s**2 - a_st**2 * sg_p**2
    assert torch.allclose(c_xs, a_st * sg_p**2 / sg_s**2, rtol=1e-10, atol=1e-15)
    assert torch.allclose(c_x0, a_p * sg2_st / sg_s**2, rtol=1e-10, atol=1e-15)
    assert torch.allclose(tau**2, sg2_st * sg_p**2 / sg_s**2, rtol=1e-10, atol=1e-15)
    assert float(c_xs[2]) == 0.0 and float(c_x0[2]) == 1.0 and float(tau[2]) == 0.0
    with pytest.raises(ValueError):
        schedule.bridge_coefficients(torch.tensor(0.3), torch.tensor(0.5))
    # Python numbers, as log_alpha and bridge_sample take them (torch.any of a bool raised a TypeError)
    for got, want in zip(schedule.bridge_coefficients(float(s[0]), float(sp[0]), torch.float64), (c_xs[0], c_x0[0], tau[0])):
        assert float(got) == float(want)


def test_bridge_coefficients_keep_their_digits_for_short_steps():
    """s' close to s: log alpha_{s|s'} must not be a difference of two log alphas of about
    -2.5, which loses digits (6.7e-13 relative at s - s' = 1e-5). Reference: math.md's
    formulas in 50-digit arithmetic (mpmath, which torch installs through sympy)."""
    import mpmath

    mpmath.mp.dps = 50

    def exact(s, sp):
        la = lambda x: -mpmath.mpf(1) / 4 * x**2 * (B1 - B0) - x * B0 / 2  # noqa: E731
        a_s, a_p = mpmath.exp(la(s)), mpmath.exp(la(sp))
        sg2_s, sg2_p = 1 - a_s**2, 1 - a_p**2
        sg2_step = 1 - (a_s / a_p) ** 2
        return (a_s / a_p * sg2_p / sg2_s, a_p * sg2_step / sg2_s, mpmath.sqrt(sg2_step * sg2_p / sg2_s))

    for s, sp in [(0.7, 0.69999), (0.3, 0.2999999), (1.0, 0.999)]:
        got = schedule.bridge_coefficients(torch.tensor(s, dtype=torch.float64), torch.tensor(sp, dtype=torch.float64), torch.float64)
        for value, reference in zip(got, exact(mpmath.mpf(s), mpmath.mpf(sp))):
            assert abs(float(value) / float(reference) - 1) < 1e-14, (s, sp, float(value), float(reference))


def test_bridge_from_data_to_data_is_the_point_mass():
    """A row with s = s' = 0 (0 / 0 in the formula) gets c_xs = 0, c_x0 = 1, tau = 0, not NaN."""
    c_xs, c_x0, tau = schedule.bridge_coefficients(torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.2]))
    assert (float(c_xs[0]), float(c_x0[0]), float(tau[0])) == (0.0, 1.0, 0.0)
    assert torch.isfinite(torch.stack([c_xs, c_x0, tau])).all()
    x_s, x0 = torch.randn(2, 3, generator=gen(2)), torch.randn(2, 3, generator=gen(3))
    out = schedule.bridge_sample(x_s, x0, torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.2]), gen(4))
    assert torch.equal(out[0], x0[0])


def test_bridge_at_zero_returns_x0_exactly():
    x_s, x0 = torch.randn(5, 3, generator=gen(2)), torch.randn(5, 3, generator=gen(3))
    out = schedule.bridge_sample(x_s, x0, 0.7, 0.0, gen(4))
    assert torch.equal(out, x0)
    out = schedule.bridge_sample(x_s, x0, torch.full((5,), 0.7), torch.zeros(5), gen(4))
    assert torch.equal(out, x0)


def test_bridge_sample_moments():
    n = 1_000_000
    s, sp = 0.8, 0.35
    xs_val, x0_val = 0.9, -1.2
    x_s = torch.full((n,), xs_val, dtype=torch.float64)
    x0 = torch.full((n,), x0_val, dtype=torch.float64)
    out = schedule.bridge_sample(x_s, x0, s, sp, gen(5))
    c_xs, c_x0, tau = (float(c) for c in schedule.bridge_coefficients(torch.tensor(s), torch.tensor(sp), torch.float64))
    mean, var = float(out.mean()), float(out.var())
    assert abs(mean - (c_xs * xs_val + c_x0 * x0_val)) < 6 * tau / math.sqrt(n)
    assert abs(var - tau**2) < 6 * tau**2 * math.sqrt(2 / n)


def test_bridge_sample_per_sample_times():
    """(B,) times give each row its own coefficients."""
    n = 200_000
    s = torch.tensor([0.9, 0.5]).repeat_interleave(n)
    sp = torch.tensor([0.2, 0.45]).repeat_interleave(n)
    x_s = torch.ones(2 * n, 1, dtype=torch.float64)
    x0 = -torch.ones(2 * n, 1, dtype=torch.float64)
    out = schedule.bridge_sample(x_s, x0, s, sp, gen(6)).reshape(2, n)
    c_xs, c_x0, tau = schedule.bridge_coefficients(torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.45]), torch.float64)
    assert torch.all((out.mean(1) - (c_xs - c_x0)).abs() < 6 * tau / math.sqrt(n))
    assert torch.all((out.var(1) - tau**2).abs() < 6 * tau**2 * math.sqrt(2 / n))


# --------------------------------------------------------------------------------------
# 3. Networks: JVP tangents, GroupNorm, attention
# --------------------------------------------------------------------------------------


def _jvp_inputs(kind: str, dtype, b: int = 2):
    g = gen(7)
    shape = IMG if kind == "unet" else VEC
    z, cond, v = (torch.randn(b, *shape, generator=g, dtype=dtype) for _ in range(3))
    t = torch.tensor([0.7, 0.35], dtype=dtype)[:b]
    h = torch.tensor([0.3, 0.1], dtype=dtype)[:b]
    s = torch.tensor([0.6, 0.2], dtype=dtype)[:b]
    return z, cond, v, t, h, s


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_jvp_tangent_matches_central_differences_float64(kind):
    """torch.func.jvp along (v, 1, 1) vs central differences, everything in float64."""
    net = net_for("stmd", kind, dtype=torch.float64)
    z, cond, v, t, h, s = _jvp_inputs(kind, torch.float64)

    def f(z_, t_, h_):
        return net(z_, cond, torch.stack([t_, h_, s], dim=1))

    with torch.no_grad(), float64_network():
        u, dudt = torch.func.jvp(f, (z, t, h), (v, torch.ones_like(t), torch.ones_like(h)))
        eps = 1e-7  # truncation ~1e-9 relative, round-off ~1e-9: a wide margin under 1e-6
        fd = (f(z + eps * v, t + eps, h + eps) - f(z - eps * v, t - eps, h - eps)) / (2 * eps)
        assert torch.allclose(u, f(z, t, h), rtol=1e-12, atol=1e-12)  # the primal is the forward
    assert rel_err(dudt, fd) < 1e-6


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_jvp_tangent_matches_double_backward_float32(kind):
    """Forward-mode tangent vs the reverse-mode (double-vjp) jvp, in float32: an independent
    AD path through GroupNorm, the JVP attention processor and the time embedding."""
    net = net_for("stmd", kind)
    if kind == "unet":  # attention is really in the graph
        procs = [m.processor for m in net.modules() if hasattr(m, "set_processor")]
        assert len(procs) >= 2 and all(isinstance(p, models.JVPAttnProcessor) for p in procs)
    z, cond, v, t, h, s = _jvp_inputs(kind, torch.float32)

    def f(z_, t_, h_):
        return net(z_, cond, torch.stack([t_, h_, s], dim=1))

    tangents = (v, torch.ones_like(t), torch.ones_like(h))
    with torch.no_grad():
        _, dudt = torch.func.jvp(f, (z, t, h), tangents)
    _, ref = torch.autograd.functional.jvp(f, (z, t, h), tangents)
    assert rel_err(dudt, ref) < 1e-4
    # a float32 finite difference anchors the z-direction (float32 differences in time are
    # too noisy for the steep sinusoidal features: that is what the float64 test above is for)
    with torch.no_grad():
        _, dudz = torch.func.jvp(f, (z, t, h), (v, torch.zeros_like(t), torch.zeros_like(h)))
        eps = 1e-2
        fd = (f(z + eps * v, t, h) - f(z - eps * v, t, h)) / (2 * eps)
    assert rel_err(dudz, fd) < 2e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_groupnorm_matches_torch(dtype, tol):
    torch.manual_seed(0)
    ref = nn.GroupNorm(4, 16).to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = copy.deepcopy(ref)
    ours.__class__ = models.GroupNorm
    for shape in [(3, 16, 5, 7), (2, 16, 9)]:
        x = (torch.randn(*shape, dtype=dtype) * 3 + 1).requires_grad_()
        gy = torch.randn(*shape, dtype=dtype)
        y_ref, y = ref(x), ours(x)
        assert y.dtype == dtype
        assert torch.allclose(y, y_ref, atol=tol, rtol=tol), f"max error {float((y - y_ref).abs().max()):.3g}"
        g_ref = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), gy)
        g = torch.autograd.grad(y, (x, ours.weight, ours.bias), gy)
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_softmax_attention_matches_sdpa(dtype, tol):
    g = gen(8)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g, dtype=dtype) for _ in range(3))
    out = attention_reference(q, k, v, 4**-0.5)
    assert out.dtype == dtype
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, ref, atol=tol, rtol=tol), f"max error {float((out - ref).abs().max()):.3g}"
    out = attention_reference(q, k, v, 0.3)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=tol, rtol=tol)


def test_unet_matches_diffusers_reference():
    """Our forward (GroupNorm, JVPAttnProcessor, our block wiring) equals UNet2DModel.forward
    with diffusers' own nn.GroupNorm and AttnProcessor2_0 (SDPA), weights and time embedding shared."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    net = net_for("stmd", "unet")
    ref = copy.deepcopy(net)
    n_attn = 0
    for m in ref.modules():
        if type(m) is models.GroupNorm:
            m.__class__ = nn.GroupNorm
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
            n_attn += 1
    assert n_attn >= 3  # down level 1, up level 1, mid block
    z, cond, _, t, h, s = _jvp_inputs("unet", torch.float32)
    times = torch.stack([t, h, s], 1)
    emb = net.time_embed(times).detach()

    class Const(nn.Module):  # UNet2DModel's time_proj / time_embedding, replaced by our embedding
        def forward(self, x):
            return emb

    ref.unet.time_proj, ref.unet.time_embedding = Const(), Const()
    with torch.no_grad():
        ours = net(z, cond, times)
        assert torch.allclose(ours, ref(z, cond, times), atol=1e-5, rtol=1e-4)
        full = ref.unet(torch.cat([z, cond], 1), timestep=0).sample
        assert torch.allclose(ours, full, atol=1e-5, rtol=1e-4)


def test_float64_networks_run():
    """A float64 network (gradient checks, tight references) must accept float64 inputs."""
    for kind in ("unet", "mlp"):
        net = net_for("stmd", kind, dtype=torch.float64)
        z, cond, _, t, h, s = _jvp_inputs(kind, torch.float64)
        with float64_network():
            out = net(z, cond, torch.stack([t, h, s], 1))
        assert out.dtype == torch.float64


# --------------------------------------------------------------------------------------
# 4. Objectives
# --------------------------------------------------------------------------------------


def _cfm_reference(method, net, x0, noise, cfg):
    """Weighted conditional flow matching written out directly (valid where r = t)."""
    tb = noise.t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    z_t = (1 - tb) * x0 + tb * noise.e
    v = noise.e - x0
    zeros = torch.zeros_like(noise.t)
    if method == "stmd":
        a, sg = ref_alpha_sigma(noise.s)
        bc = lambda c: c.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        x_s = bc(a) * x0 + bc(sg) * noise.xi
        u = net(z_t, x_s, torch.stack([noise.t, zeros, noise.s], 1))
    else:
        u = net(z_t, None, torch.stack([noise.t, zeros], 1))
    l = (u - v).pow(2).flatten(1).sum(1)
    w = (l.detach() + cfg.adaptive_c).pow(-cfg.adaptive_p)
    return (w * l).mean(), l.mean()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-4), (torch.float64, 1e-5)])
@pytest.mark.parametrize("method,kind", [("stmd", "unet"), ("stmd", "mlp"), ("meanflow", "mlp")])
@pytest.mark.parametrize("p,c", [(1.0, 1e-3), (0.5, 1e-2), (0.0, 1e-3)])
def test_loss_with_r_equal_t_is_weighted_cfm(method, kind, p, c, dtype, rtol):
    net = net_for(method, kind, dtype=dtype)
    cfg = ObjectiveConfig(flow_matching_fraction=1.0, adaptive_p=p, adaptive_c=c)
    x0 = torch.randn(6, *(IMG if kind == "unet" else VEC), generator=gen(9), dtype=dtype)
    noise = draw_noise(x0, cfg, gen(10))
    assert torch.equal(noise.r, noise.t)
    params = [q for q in net.parameters()]
    with float64_network():
        loss, raw = compute_loss(method, net, x0, noise, cfg)
    grads = torch.autograd.grad(loss, params)
    ref, ref_raw = _cfm_reference(method, net, x0, noise, cfg)
    ref_grads = torch.autograd.grad(ref, params)
    assert torch.allclose(loss.double(), ref.double(), rtol=rtol, atol=0)
    assert torch.allclose(raw.double(), ref_raw.double(), rtol=rtol, atol=0)
    if p == 0:  # plain mean per-sample squared error
        assert torch.allclose(loss.double(), raw.double(), rtol=1e-6, atol=0)
    flat = torch.cat([g.flatten() for g in grads]).double()
    ref_flat = torch.cat([g.flatten() for g in ref_grads]).double()
    assert rel_err(flat, ref_flat) < 10 * rtol


def test_ddpm_loss_is_eps_mse():
    net = net_for("ddpm", "mlp")
    x0 = torch.randn(64, 2, generator=gen(11))
    noise = draw_noise(x0, ObjectiveConfig(), gen(12))
    loss, raw = compute_loss("ddpm", net, x0, noise, ObjectiveConfig())
    a, sg = (c.float()[:, None] for c in ref_alpha_sigma(noise.s))
    ref = (net(a * x0 + sg * noise.xi, None, noise.s[:, None]) - noise.xi).pow(2).mean()
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.equal(raw, loss.detach())
    with pytest.raises(ValueError):
        compute_loss("sde", net, x0, noise, ObjectiveConfig())


class ToyVelocity(nn.Module):
    """u = a z t^2 + b h z + cond s^2 (times = (t, h[, s])): du/dt along (v, 1, 1) is
    a (v t^2 + 2 z t) + b (z + h v); cond and s are held fixed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(-1.3, dtype=torch.float64))

    def forward(self, z, cond, times):
        t, h = times[:, 0:1].double(), times[:, 1:2].double()
        u = self.a * z * t**2 + self.b * h * z
        if cond is not None:
            u = u + cond * times[:, 2:3].double() ** 2
        return u


@pytest.mark.parametrize("method", ["stmd", "meanflow"])
@pytest.mark.parametrize("p,c", [(0.0, 1e-3), (1.0, 1e-2)])
def test_meanflow_loss_against_analytic_network(method, p, c):
    """Tangent convention (v, 1, 1) for (z, t, t - r), stop-gradient target and detached
    adaptive weight, checked against a hand-differentiated network with r != t."""
    net = ToyVelocity()
    cfg = ObjectiveConfig(flow_matching_fraction=0.0, adaptive_p=p, adaptive_c=c)
    x0 = torch.randn(16, 3, generator=gen(13), dtype=torch.float64)
    noise = draw_noise(x0, cfg, gen(14))
    assert (noise.r < noise.t).all()
    loss, raw = compute_loss(method, net, x0, noise, cfg)
    ga, gb = torch.autograd.grad(loss, (net.a, net.b))

    a, b = net.a.detach(), net.b.detach()
    t, h = noise.t.double()[:, None], (noise.t - noise.r).double()[:, None]
    z = (1 - t) * x0 + t * noise.e
    v = noise.e - x0
    u = a * z * t**2 + b * h * z
    if method == "stmd":
        al, sg = ref_alpha_sigma(noise.s)
        u = u + (al[:, None] * x0 + sg[:, None] * noise.xi) * noise.s.double()[:, None] ** 2
    dudt = a * (v * t**2 + 2 * z * t) + b * (z + h * v)
    delta = u - (v - h * dudt)
    l = delta.pow(2).sum(1)
    w = (l + c) ** (-p)
    assert torch.allclose(raw.double(), l.mean(), rtol=1e-5)
    assert torch.allclose(loss.double(), (w * l).mean(), rtol=1e-5)
    # d loss / d a = mean(w * 2 delta . du/da) with du/da = z t^2 (target and w are constants)
    assert torch.allclose(ga.double(), (w * (2 * delta * z * t**2).sum(1)).mean(), rtol=1e-5)
    assert torch.allclose(gb.double(), (w * (2 * delta * h * z).sum(1)).mean(), rtol=1e-5)


@pytest.mark.parametrize("method", ["stmd", "meanflow"])
def test_exact_average_velocity_has_zero_loss(method):
    """Point-mass data x0 = c: the flow is z_r = c + (r / t)(z_t - c), so the exact average
    velocity is u(z, r, t) = (z - c) / t for every r; the Mean Flow loss must vanish."""
    c = torch.tensor([0.8, -1.1, 0.3], dtype=torch.float64)

    class Exact(nn.Module):
        def forward(self, z, cond, times):
            return (z - c) / times[:, 0:1].double()

    cfg = ObjectiveConfig(flow_matching_fraction=0.5)
    x0 = c.expand(256, 3).clone()
    noise = draw_noise(x0, cfg, gen(15))
    loss, raw = compute_loss(method, Exact(), x0, noise, cfg)
    # (the loss is evaluated in float32 by design, hence not 1e-30)
    assert float(raw) < 1e-10 and float(loss) < 1e-7
    # a wrong field (the instantaneous velocity shifted by a function of t - r) is penalised
    class Wrong(nn.Module):
        def forward(self, z, cond, times):
            return (z - c) / times[:, 0:1].double() + times[:, 1:2].double()

    _, raw_wrong = compute_loss(method, Wrong(), x0, noise, cfg)
    h = (noise.t - noise.r).double()
    assert torch.allclose(raw_wrong.double(), (3 * (2 * h) ** 2).mean(), rtol=1e-5)


def test_draw_noise_statistics():
    n = 200_000
    x0 = torch.zeros(n, 2)
    cfg = ObjectiveConfig()  # 75% r = t
    nz = draw_noise(x0, cfg, gen(16))
    assert nz.xi.shape == nz.e.shape == x0.shape and nz.s.shape == nz.t.shape == nz.r.shape == (n,)
    assert (nz.r <= nz.t).all()
    assert (nz.s > 0).all() and (nz.s <= 1).all()
    assert abs(float(nz.s.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert float((nz.r == nz.t).double().mean()) == 0.75  # a fixed count (tests/test_engine.py)
    # logit-normal pair: logit t = max, logit r = min of two N(-0.4, 1): E = -0.4 +- 1/sqrt(pi)
    nz = draw_noise(x0, ObjectiveConfig(flow_matching_fraction=0.0), gen(17))
    assert (nz.r < nz.t).all()
    logit = lambda p: torch.log(p.double()) - torch.log1p(-p.double())
    assert abs(float(logit(nz.t).mean()) - (-0.4 + 1 / math.sqrt(math.pi))) < 0.01
    assert abs(float(logit(nz.r).mean()) - (-0.4 - 1 / math.sqrt(math.pi))) < 0.01
    assert abs(float(nz.e.std()) - 1) < 0.01 and abs(float(nz.xi.std()) - 1) < 0.01
    assert abs(float((nz.e * nz.xi).mean())) < 0.01  # independent
    with pytest.raises(ValueError):
        ObjectiveConfig(flow_matching_fraction=1.5)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.double()) - torch.log1p(-p.double())


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_separate_time_sampler_laws():
    """t ~ LN(m_t, s_t), r = min(r', t) with r' ~ LN(m_r, s_r) independent: logit t has the normal's
    moments, and r = t exactly where r' > t, with P = Phi((m_r - m_t) / sqrt(s_t^2 + s_r^2))."""
    n = 200_000
    cfg = ObjectiveConfig(time_sampler="separate", time_mean=-0.6, time_std=1.6, r_mean=-4.0, r_std=1.6,
                          flow_matching_fraction=0.0)
    nz = draw_noise(torch.zeros(n, 2), cfg, gen(18))
    assert (nz.r <= nz.t).all()
    lt = _logit(nz.t)
    assert abs(float(lt.mean()) + 0.6) < 6 * 1.6 / math.sqrt(n)
    assert abs(float(lt.std()) - 1.6) < 0.01
    p_eq = _phi((-4.0 + 0.6) / math.sqrt(1.6**2 + 1.6**2))
    assert abs(float((nz.r == nz.t).double().mean()) - p_eq) < 6 * math.sqrt(p_eq * (1 - p_eq) / n)
    # The figure for this law: r < 0.05 in 79% of the r < t rows (python: integral, here Monte Carlo).
    below = nz.r < nz.t
    assert abs(float((nz.r[below] < 0.05).double().mean()) - 0.79) < 0.01


def test_mixture_time_sampler_is_the_weighted_mixture():
    """mixture: logit t's mean is w m + (1 - w)(m + s / sqrt(pi)) (separate draws once, pair takes the max
    of two), and r = t only on separate's rows, with separate's probability."""
    n = 200_000
    w, m, sd = 0.3, -0.6, 1.6
    cfg = ObjectiveConfig(time_sampler="mixture", mixture_weight=w, time_mean=m, time_std=sd, r_mean=-4.0,
                          r_std=1.6, flow_matching_fraction=0.0)
    nz = draw_noise(torch.zeros(n, 2), cfg, gen(19))
    assert (nz.r <= nz.t).all()
    mean = w * m + (1 - w) * (m + sd / math.sqrt(math.pi))
    assert abs(float(_logit(nz.t).mean()) - mean) < 0.02
    p_eq = w * _phi((-4.0 - m) / math.sqrt(sd**2 + 1.6**2))
    assert abs(float((nz.r == nz.t).double().mean()) - p_eq) < 6 * math.sqrt(p_eq * (1 - p_eq) / n)
    # Mixture weight 0 is the pair sampler's law, 1 the separate one's.
    for weight, law in ((0.0, "pair"), (1.0, "separate")):
        mixed = draw_noise(torch.zeros(n, 2), ObjectiveConfig(time_sampler="mixture", mixture_weight=weight,
                                                              flow_matching_fraction=0.0), gen(20))
        alone = draw_noise(torch.zeros(n, 2), ObjectiveConfig(time_sampler=law, flow_matching_fraction=0.0), gen(21))
        assert abs(float(_logit(mixed.t).mean() - _logit(alone.t).mean())) < 0.02
        assert abs(float(_logit(mixed.r).mean() - _logit(alone.r).mean())) < 0.03


@pytest.mark.parametrize("kind", TIME_GRIDS)
def test_grid_s_sampler_puts_the_grids_mass_on_the_samplers_points(kind):
    """s is a point of the N-step sampler grid time_grid(N, kind) (N uniform over s_grid_steps, each of
    its N points s > 0 equally likely) with probability f, else U(0, 1]: P(s = q) = f * mean_N
    [q on N's grid] / N for each point q; the rest is uniform."""
    n = 200_000
    f, steps = 0.6, (1, 2, 4)
    cfg = ObjectiveConfig(s_sampler="grid", s_grid_fraction=f, s_grid_steps=steps, s_grid=kind)
    s = draw_noise(torch.zeros(n, 2), cfg, gen(22)).s
    assert (s > 0).all() and (s <= 1).all()
    grids = {N: set(time_grid(N, kind)[:-1].float().tolist()) for N in steps}
    points = sorted(set().union(*grids.values()))
    assert len(points) == 4 and (kind == "uniform") == (0.75 in points)  # the kind moves the points
    for q in points:
        p = f * sum(1 / N for N in steps if q in grids[N]) / len(steps)
        got = float((s == q).double().mean())
        assert abs(got - p) < 6 * math.sqrt(p * (1 - p) / n), (q, got, p)
    off = s[~torch.isin(s, torch.tensor(points))]
    assert abs(off.numel() / n - (1 - f)) < 0.01
    assert abs(float(off.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / off.numel())


def test_flow_grid_puts_its_mass_on_the_pairs_the_sampler_evaluates():
    """With probability f a row's (r, t) is step j of the M-step flow grid (M uniform over flow_grid_steps,
    j over 0..M-1): P((r, t) = pair) = f * mean_M [pair on M's grid] / M; those pairs are the (t, t - r) the
    sampler feeds the network (sampling.flow_map); the other rows keep the time sampler's law."""
    n, f, steps = 200_000, 0.4, (1, 2, 4)
    cfg = ObjectiveConfig(time_sampler="separate", flow_grid_fraction=f, flow_grid_steps=steps,
                          flow_matching_fraction=0.0)
    nz = draw_noise(torch.zeros(n, 2), cfg, gen(23))
    assert (nz.r <= nz.t).all()
    for m in steps:
        seen = []

        def record(z, cond, times):
            seen.append(times[0].tolist())
            return torch.zeros_like(z)

        sampling.flow_map(record, torch.zeros(1, 2), None, None, m)
        assert len(seen) == m
        for t, h in seen:  # each pair the sampler evaluates is drawn, with its probability
            hit = (nz.t == t) & ((nz.t - nz.r - h).abs() < 1e-6)
            p = f * sum(1 / k for k in steps if any(abs(t - (1 - j / k)) < 1e-9 and abs(h - 1 / k) < 1e-9
                                                    for j in range(k))) / len(steps)
            assert abs(float(hit.double().mean()) - p) < 6 * math.sqrt(p * (1 - p) / n), (m, t, h)
    off = nz.t != torch.floor(nz.t * 4) / 4  # no grid point: the separate law's rows
    assert abs(float(off.double().mean()) - (1 - f)) < 0.01
    assert abs(float(_logit(nz.t[off]).mean()) - cfg.time_mean) < 0.02
    # The flow grid changes nothing when it is off, whatever its steps.
    a = draw_noise(torch.zeros(64, 2), ObjectiveConfig(flow_grid_steps=(3,)), gen(24))
    b = draw_noise(torch.zeros(64, 2), ObjectiveConfig(), gen(24))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bad, words", [
    (dict(time_sampler="cifar"), ("cifar", "pair, separate, mixture")),
    (dict(s_sampler="beta"), ("beta", "uniform, grid")),
    (dict(mixture_weight=1.5), ("--mixture-weight", "in [0, 1]")),
    (dict(s_grid_fraction=-0.1), ("--s-grid-fraction", "in [0, 1]")),
    (dict(s_grid_steps=(0, 2)), ("--s-grid-steps",)),
    (dict(s_grid="cosine"), ("cosine", "uniform, quadratic")),
    (dict(flow_grid_fraction=2.0), ("--flow-grid-fraction", "in [0, 1]")),
    (dict(flow_grid_steps=()), ("--flow-grid-steps",)),
    (dict(r_std=0.0), ("--r-std", "> 0")),
    (dict(r_mean=float("nan")), ("--r-mean", "finite")),
])
def test_objective_config_rejects_bad_samplers(bad, words):
    with pytest.raises(ValueError) as err:
        ObjectiveConfig(**bad)
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------------------
# 6. Sampler
# --------------------------------------------------------------------------------------


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.last = net, 0, None

    def forward(self, z, cond, times):
        self.calls += 1
        out = self.net(z, cond, times)
        self.last = (z.clone(), cond, times.clone(), out.clone())
        return out


@pytest.mark.parametrize("method,steps,flow_steps", [
    ("stmd", 1, 1), ("stmd", 3, 2), ("stmd", 2, 4), ("ddpm", 1, 1), ("ddpm", 5, 1), ("meanflow", 1, 1), ("meanflow", 1, 3),
])
def test_sampler_nfe(method, steps, flow_steps):
    net = Counting(net_for(method, "mlp"))
    out = sampling.sample(net, method, 4, VEC, steps, flow_steps, gen(0))
    assert out.shape == (4, *VEC) and torch.isfinite(out).all()
    assert net.calls == sampling.nfe(method, steps, flow_steps)
    assert sampling.nfe(method, steps, flow_steps) == {"stmd": steps * flow_steps, "ddpm": steps, "meanflow": flow_steps}[method]


def test_check_steps_rejects_invalid():
    net = Counting(net_for("ddpm", "mlp"))
    for method, n, m in [("ddpm", 2, 2), ("meanflow", 2, 1), ("stmd", 0, 1), ("stmd", 1, 0)]:
        with pytest.raises(ValueError):
            sampling.check_steps(method, n, m)
        with pytest.raises(ValueError):
            sampling.sample(net, method, 2, VEC, n, m, gen(0))
    assert net.calls == 0  # refused before any network call


@pytest.mark.parametrize("method,steps,flow_steps", [("stmd", 2, 2), ("ddpm", 3, 1), ("meanflow", 1, 2)])
def test_sampler_seed_determinism(method, steps, flow_steps):
    net = net_for(method, "unet")
    a = sampling.sample(net, method, 3, IMG, steps, flow_steps, gen(21))
    b = sampling.sample(net, method, 3, IMG, steps, flow_steps, gen(21))
    c = sampling.sample(net, method, 3, IMG, steps, flow_steps, gen(22))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_stmd_draws_fresh_flow_noise_in_a_step_without_bridge_noise():
    """The last step (s_to = 0) adds no bridge noise: from one x_s, STMD's x_0 still varies with the generator
    (its flow prior draws z afresh: a sample of p(x_0 | x_s)), where DDPM's is its posterior mean, one point."""
    x = torch.randn(4, *VEC, generator=gen(30))
    for method, stochastic in (("stmd", True), ("ddpm", False)):
        net = net_for(method, "mlp")
        a, b = (sampling.transition(net, method, x, 0.5, 0.0, 1, gen(seed)) for seed in (31, 32))
        if stochastic:
            assert (a - b).abs().min() > 0
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("method,steps,flow_steps", [("stmd", 3, 1), ("stmd", 2, 2), ("ddpm", 4, 1)])
def test_final_output_is_last_x0_hat(method, steps, flow_steps):
    net = Counting(net_for(method, "mlp"))
    out = sampling.sample(net, method, 5, VEC, steps, flow_steps, gen(40))
    z, cond, times, u = net.last
    if method == "stmd":
        t, h, s = (float(x) for x in times[0])
        assert t == pytest.approx(1 / flow_steps) and h == pytest.approx(1 / flow_steps)
        assert s == pytest.approx(1 / steps)
        x0_hat = z - h * u
    else:
        s = float(times[0, 0])
        assert abs(s - 1 / steps) < 1e-7
        a, sg = (float(c) for c in ref_alpha_sigma(1 / steps))
        x0_hat = (z - sg * u) / a
    assert torch.allclose(out, x0_hat, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# 7. Inpainting
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,steps,flow_steps", [("stmd", 3, 2), ("ddpm", 4, 1), ("meanflow", 1, 2)])
def test_inpainting_keeps_observed_pixels_exactly(method, steps, flow_steps):
    net = net_for(method, "unet")
    y = torch.randn(1, *IMG, generator=gen(50))
    mask = torch.zeros(IMG)
    mask[:, :, :4] = 1  # left half observed
    project = sampling.inpainting_projection(y, mask)
    outs = [sampling.sample(net, method, 3, IMG, steps, flow_steps, gen(seed), project=project) for seed in (51, 52)]
    m = mask.bool().expand(3, *IMG)
    for out in outs:
        assert torch.equal(out[m], y.expand(3, *IMG)[m])
    assert (outs[0][~m] - outs[1][~m]).abs().max() > 1e-3
    assert (outs[0][~m] - y.expand(3, *IMG)[~m]).abs().max() > 1e-3


def test_inpainting_projection_formula():
    y, x = torch.randn(2, 4, generator=gen(53)), torch.randn(2, 4, generator=gen(54))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = sampling.inpainting_projection(y, mask)(x)
    assert torch.equal(out[:, mask.bool()], y[:, mask.bool()])
    assert torch.equal(out[:, ~mask.bool()], x[:, ~mask.bool()])
    with pytest.raises(ValueError):
        sampling.inpainting_projection(y, torch.ones(3))


# --------------------------------------------------------------------------------------
# 8. transition(): shapes, validation, oracle networks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["stmd", "ddpm", "meanflow"])
def test_transition_shape_and_validation(method):
    net = net_for(method, "unet")
    x = torch.randn(3, *IMG, generator=gen(60))
    assert sampling.transition(net, method, x, 0.8, 0.3, 1, gen(61)).shape == x.shape
    for s_from, s_to in [(0.5, 0.5), (0.3, 0.6), (1.2, 0.5), (0.5, -0.1)]:
        with pytest.raises(ValueError):
            sampling.transition(net, method, x, s_from, s_to, 1, gen(61))


def _point_mass_oracles(x0_val: torch.Tensor):
    """Exact networks for data = a point mass at x0_val."""

    class Eps(nn.Module):  # DDPM: eps = (x_s - alpha x0) / sigma
        def forward(self, z, cond, times):
            a, sg = ref_alpha_sigma(times[:, 0].double())
            return ((z.double() - a[:, None] * x0_val) / sg[:, None]).to(z.dtype)

    class AvgVel(nn.Module):  # STMD: u(z, r, t) = (z - x0) / t
        def forward(self, z, cond, times):
            return ((z.double() - x0_val) / times[:, 0:1].double()).to(z.dtype)

    return Eps(), AvgVel()


@pytest.mark.parametrize("method,flow_steps", [("ddpm", 1), ("stmd", 1), ("stmd", 3)])
def test_transition_with_point_mass_oracle_is_the_exact_bridge(method, flow_steps):
    n, d = 100_000, 2
    x0_val = torch.tensor([1.3, -0.4], dtype=torch.float64)
    eps_net, u_net = _point_mass_oracles(x0_val)
    net = eps_net if method == "ddpm" else u_net
    s_from, s_to = 0.7, 0.25
    x_val = torch.tensor([0.2, 0.9], dtype=torch.float64)
    x = x_val.expand(n, d).clone()
    # x0_hat equals x0
    x0_hat = sampling.denoise(net, method, x[:8], s_from, flow_steps, gen(70))
    assert torch.allclose(x0_hat, x0_val.expand(8, d), atol=1e-6, rtol=0)
    out = sampling.transition(net, method, x, s_from, s_to, flow_steps, gen(71))
    c_xs, c_x0, tau = (float(c) for c in schedule.bridge_coefficients(torch.tensor(s_from), torch.tensor(s_to), torch.float64))
    mean = c_xs * x_val + c_x0 * x0_val
    assert torch.all((out.mean(0) - mean).abs() < 6 * tau / math.sqrt(n))
    assert torch.all((out.var(0) - tau**2).abs() < 6 * tau**2 * math.sqrt(2 / n))


def test_stmd_transition_with_gaussian_oracle_is_exact_for_a_large_step():
    """Data x0 ~ N(0, a^2): p(x0 | x_s) = N(m, c^2), and the Mean Flow between N(m, c^2) and
    N(0, 1) is affine, so the exact average velocity is known. STMD then reproduces the
    exact reverse kernel p(x_{s'} | x_s) (from the joint Gaussian of (x_{s'}, x_s), no bridge
    formula involved); DDPM with the exact posterior mean has too small a variance."""
    a_data = 0.5

    def posterior(s):
        al, sg = ref_alpha_sigma(s)
        c2 = 1 / (1 / a_data**2 + al**2 / sg**2)
        return al, sg, c2

    class AvgVel(nn.Module):
        def forward(self, z, cond, times):
            t, h, s = (times[:, i:i + 1].double() for i in range(3))
            al, sg, c2 = posterior(s)
            m = c2 * al * cond.double() / sg**2
            r = t - h
            mu_t, sd_t = (1 - t) * m, ((1 - t) ** 2 * c2 + t**2).sqrt()
            mu_r, sd_r = (1 - r) * m, ((1 - r) ** 2 * c2 + r**2).sqrt()
            z_r = mu_r + sd_r / sd_t * (z.double() - mu_t)
            return ((z.double() - z_r) / h).to(z.dtype)

    class Eps(nn.Module):  # exact E[xi | x_s]
        def forward(self, z, cond, times):
            al, sg, c2 = posterior(times[:, 0:1].double())
            m = c2 * al * z.double() / sg**2
            return ((z.double() - al * m) / sg).to(z.dtype)

    n = 200_000
    s_from, s_to, x_val = 0.9, 0.2, 0.6
    al_s, sg_s = ref_alpha_sigma(s_from)
    al_p, sg_p = ref_alpha_sigma(s_to)
    var_s = float(al_s**2 * a_data**2 + sg_s**2)
    var_p = float(al_p**2 * a_data**2 + sg_p**2)
    cov = float(al_s / al_p) * var_p
    mean_exact, var_exact = cov / var_s * x_val, var_p - cov**2 / var_s
    x = torch.full((n, 1), x_val, dtype=torch.float64)

    for flow_steps in (1, 2):
        out = sampling.transition(AvgVel(), "stmd", x, s_from, s_to, flow_steps, gen(80 + flow_steps))
        assert abs(float(out.mean()) - mean_exact) < 6 * math.sqrt(var_exact / n)
        assert abs(float(out.var()) - var_exact) < 6 * var_exact * math.sqrt(2 / n)

    out = sampling.transition(Eps(), "ddpm", x, s_from, s_to, 1, gen(83))
    _, _, tau = schedule.bridge_coefficients(torch.tensor(s_from), torch.tensor(s_to), torch.float64)
    assert abs(float(out.mean()) - mean_exact) < 6 * math.sqrt(var_exact / n)  # the mean is right
    assert abs(float(out.var()) - float(tau) ** 2) < 6 * float(tau) ** 2 * math.sqrt(2 / n)
    assert float(out.var()) < 0.9 * var_exact  # ... the variance is not


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_tangent_layers_equal_plain_layers_with_fewer_flops(layer):
    """TangentLinear / TangentConv2d: the same primal, tangent and gradients as nn.Linear /
    nn.Conv2d under torch.func.jvp, without the weight's zero-tangent product."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    plain = nn.Linear(12, 16) if layer == "linear" else nn.Conv2d(3, 5, 3, padding=1)
    lean = copy.deepcopy(plain)
    models.use_tangent_layers(lean)
    assert type(lean) is (models.TangentLinear if layer == "linear" else models.TangentConv2d)
    x = torch.randn(4, 12) if layer == "linear" else torch.randn(2, 3, 6, 6)
    v = torch.randn_like(x)
    results = []
    for net in (plain, lean):
        with FlopCounterMode(display=False) as counter:
            y, y_t = torch.func.jvp(net, (x,), (v,))
        grads = torch.autograd.grad((y * y_t.detach()).sum(), list(net.parameters()))
        results.append((y, y_t, grads, counter.get_total_flops()))
    (y0, t0, g0, f0), (y1, t1, g1, f1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(t1, t0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    assert f1 * 3 == f0 * 2  # 2 products (primal, tangent) instead of 3
    torch.testing.assert_close(lean(x), plain(x))  # outside a JVP: the plain layer
