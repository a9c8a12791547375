"""The DiT network (stmd_fast/dit.py): shapes, adaLN-zero at init, exact JVPs, compiled == eager,
the size registry and the fixed position embedding. A tiny DiT (depth 2, hidden 32, 4 heads,
patch 2) on (4, 8, 8) latents keeps everything CPU-sized."""
import math
import os

import torch

if not torch.cuda.is_available():  # conftest.py does this too; kept for a run without it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stmd_fast.dit import DIT_MODELS, DIT_SIZES, DiT, dit_param_count, sincos_pos_embed_2d  # noqa: E402
from stmd_fast.kernels import dispatch  # noqa: E402

SHAPE = (4, 8, 8)
TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, time_freqs=16)


def tiny(conditional=True, num_times=3, data_shape=SHAPE, **kw):
    torch.manual_seed(0)
    return DiT(data_shape, conditional, num_times, **{**TINY, **kw})


def inputs(conditional=True, num_times=3, b=2, data_shape=SHAPE, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, *data_shape, generator=g, dtype=dtype)
    cond = torch.randn(b, *data_shape, generator=g, dtype=dtype) if conditional else None
    return z, cond, torch.rand(b, num_times, generator=g, dtype=dtype)


def perturb_(net, std=0.3, seed=2):
    """Give the zero-initialised adaLN modulations and output layer random weights, so a test of
    the network is not a test of a function that is identically zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std / math.sqrt(p.shape[-1]))
    return net


@pytest.mark.parametrize("num_times", [1, 2, 3])
@pytest.mark.parametrize("conditional", [True, False])
def test_output_shape(conditional, num_times):
    net = perturb_(tiny(conditional, num_times, data_shape=(3, 8, 12)))
    z, cond, times = inputs(conditional, num_times, data_shape=(3, 8, 12))
    out = net(z, cond, times)
    assert out.shape == z.shape and out.dtype == z.dtype and torch.isfinite(out).all()
    assert out.abs().max() > 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="patch_size=4 must divide"):
        tiny(data_shape=(4, 8, 10), patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=5)
    with pytest.raises(ValueError, match="conditional=True"):
        tiny()(*inputs(conditional=False))
    z, cond, times = inputs()
    with pytest.raises(ValueError, match=r"times shaped \(B, 3\)"):
        tiny()(z, cond, times[:, :2])


def test_adaln_zero_at_init():
    """Output exactly 0 (zero output layer), every block the identity (zero gates), and the only
    parameters with a gradient at the first step are the output linear's."""
    net = tiny()
    z, cond, times = inputs()
    out = net(z, cond, times)
    assert torch.equal(out, torch.zeros_like(z))
    x = torch.randn(2, 16, 32)
    c = net.embed_times(times)
    assert c.abs().max() > 0  # the time embedding itself is live (normal(0.02) MLPs)
    for block in net.blocks:
        assert torch.equal(block(x, c), x)
    (out * torch.randn_like(out)).sum().backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert with_grad == {"final_layer.linear.weight", "final_layer.linear.bias"}


def test_jvp_matches_finite_differences():
    """torch.func.jvp with the objective's tangents (v, 1, 1) on (z, t, h), x_s and s held fixed,
    against central differences in float64."""
    net = perturb_(tiny()).double()
    z, cond, times = inputs(dtype=torch.float64)
    v = torch.randn_like(z)
    t, h, s = times.unbind(1)

    def u_fn(z_, t_, h_):
        return net(z_, cond, torch.stack([t_, h_, s], dim=1))

    ones = torch.ones_like(t)
    u, dudt = torch.func.jvp(u_fn, (z, t, h), (v, ones, ones))
    eps = 1e-6
    fd = (u_fn(z + eps * v, t + eps, h + eps) - u_fn(z - eps * v, t - eps, h - eps)) / (2 * eps)
    assert torch.allclose(u, u_fn(z, t, h), rtol=0, atol=1e-12)
    assert dudt.abs().max() > 1e-3
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)


def test_triton_kernels_match_reference():
    """The Triton kernels (attention, time features) inside the DiT: primal, tangent and parameter
    gradients against the PyTorch references; on CPU through Triton's interpreter, fp32."""
    net = perturb_(tiny())
    z, cond, times = inputs()
    tangents = (torch.randn_like(z), torch.ones_like(times))
    weights = torch.randn_like(z)

    def run():
        net.zero_grad(set_to_none=True)
        u, du = torch.func.jvp(lambda z_, t_: net(z_, cond, t_), (z, times), tangents)
        (u * weights).sum().backward()  # gradients flow through the primal (the tangent is stop-grad)
        return u.detach(), du, [p.grad for p in net.parameters()]

    with dispatch.backend("reference"):
        u_ref, du_ref, grads_ref = run()
    with dispatch.backend("triton"):
        u, du, grads = run()
    torch.testing.assert_close(u, u_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(du, du_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_jvp_keeps_dtypes():
    """Under bf16 autocast the primal and the tangent come back in one dtype (nn.GroupNorm did
    not: bf16 primal, fp32 tangent) and stay close to fp32."""
    net = perturb_(tiny())
    z, cond, times = inputs()
    tangents = (torch.randn_like(z), torch.ones_like(times))

    def run():
        return torch.func.jvp(lambda z_, t_: net(z_, cond, t_), (z, times), tangents)

    u32, du32 = run()
    with torch.autocast("cpu", torch.bfloat16):
        u, du = run()
    assert u.dtype == du.dtype == torch.bfloat16
    torch.testing.assert_close(u.float(), u32, rtol=0, atol=0.05 * u32.abs().max().item())
    torch.testing.assert_close(du.float(), du32, rtol=0, atol=0.05 * du32.abs().max().item())


def meanflow_step(net, z, cond, times, v):
    """Mean-Flow-like loss: u and du/dt from one jvp, target stop-gradient."""
    t, h, s = times.unbind(1)

    def u_fn(z_, t_, h_):
        return net(z_, cond, torch.stack([t_, h_, s], dim=1))

    ones = torch.ones_like(t)
    u, dudt = torch.func.jvp(u_fn, (z, t, h), (v, ones, ones))
    target = (v - h[:, None, None, None] * dudt).detach()
    return (u - target).square().mean(), dudt.detach()


@pytest.mark.slow
def test_compiled_matches_eager_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from stmd_fast.models import use_tangent_layers

    # the network as build_net makes it: with plain nn.Conv2d, the zero weight tangent that
    # forward AD materialises reaches Inductor's convolution lowering as an expanded scalar, and
    # torch 2.11 fails there ("LoweringException: NotImplementedError: ExpandView")
    net = use_tangent_layers(perturb_(tiny()))
    z, cond, times = inputs(b=4)
    v = torch.randn_like(z)

    loss, dudt = meanflow_step(net, z, cond, times, v)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("inductor")
    loss_c, dudt_c = torch.compile(meanflow_step, backend=backend)(net, z, cond, times, v)
    loss_c.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert backend.frame_count == 1  # compiled, as one graph
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dudt_c, dudt, rtol=1e-4, atol=1e-5)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_registry():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "M": (16, 1024, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert DIT_SIZES == sizes
    assert set(DIT_MODELS) == {f"DiT-{s}/{p}" for s in sizes for p in (2, 4, 8)}
    for name, make in DIT_MODELS.items():  # meta device: built without memory, XL included
        with torch.device("meta"):
            net = make((4, 32, 32), True, 3)
        depth, hidden, heads = sizes[name[4:-2]]
        assert (len(net.blocks), net.pos_embed.shape[-1], net.blocks[0].num_heads) == (depth, hidden, heads)
        assert net.patch_size == int(name[-1])
    # the DiT paper's counts (its time + label embedding differ from our three time MLPs)
    for name, paper in {"DiT-S/2": 33.0e6, "DiT-B/2": 130.5e6, "DiT-L/2": 458.0e6, "DiT-XL/2": 675.0e6}.items():
        assert abs(dit_param_count(name) / paper - 1) < 0.05, name
    assert abs(dit_param_count("DiT-M/2") / 308e6 - 1) < 0.05  # Mean Flow paper's MF-M/2
    real = DIT_MODELS["DiT-S/4"]((4, 16, 16), False, 2)  # a real build agrees with the meta count
    assert sum(p.numel() for p in real.parameters()) == dit_param_count("DiT-S/4", (4, 16, 16), False, 2)
    assert real(*inputs(False, 2, data_shape=(4, 16, 16))).shape == (2, 4, 16, 16)


def test_position_embedding_is_a_fixed_buffer():
    net = tiny(data_shape=(4, 8, 16))  # a 4 x 8 patch grid: rows and columns tell apart
    assert "pos_embed" in dict(net.named_buffers())
    assert all(p is not net.pos_embed for p in net.parameters()) and not net.pos_embed.requires_grad
    assert "pos_embed" not in net.state_dict()  # recomputed, never loaded
    pe = net.pos_embed[0]
    assert pe.shape == (4 * 8, 32)
    omega = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
    for i, j in [(0, 0), (1, 3), (3, 7)]:  # patch in row i, column j
        want = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
        torch.testing.assert_close(pe[i * 8 + j].double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(sincos_pos_embed_2d(32, 4, 8), pe)
    assert net.double().pos_embed.dtype == torch.float64  # follows the model's dtype
