"""Triton kernels against their references: values, tangents (torch.func.jvp), gradients, and
inside the compiled JVP train step. Without a GPU they run through TRITON_INTERPRET=1 (fp32,
set in conftest.py); with one, on CUDA in fp32 and bf16."""
import os

import pytest
import torch

from stmd_fast.kernels import dispatch
from stmd_fast.kernels.meanflow_loss import meanflow_loss, meanflow_loss_reference
from stmd_fast.kernels.time_embedding import time_features, time_features_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-5, 1e-5)] + ([(torch.bfloat16, 2e-2, 2e-2)] if DEVICE == "cuda" else [])


@pytest.fixture
def triton_backend():
    with dispatch.backend("triton"):
        yield


@pytest.fixture
def on_device():
    """Tensors made without a device argument land on DEVICE. On a GPU Triton's interpreter is off (conftest), so
    a CPU tensor under the triton backend is refused there: the test must hand the kernel what it would get."""
    with torch.device(DEVICE):
        yield


# --- fused time embedding ---------------------------------------------------------------

@pytest.mark.parametrize("batch,k,freqs", [(1, 1, 2), (5, 3, 64), (33, 2, 10), (7, 3, 130)])
def test_time_features_values_tangents_grads(triton_backend, batch, k, freqs):
    g = torch.Generator().manual_seed(batch * 100 + freqs)
    times = torch.rand(batch, k, generator=g).to(DEVICE)
    tangent = torch.randn(batch, k, generator=g).to(DEVICE)
    scale = 10.0
    ref64 = time_features_reference(times.double(), freqs, scale)
    out = time_features(times, freqs, scale)
    assert out.dtype == torch.float32 and out.shape == (batch, k * freqs)
    torch.testing.assert_close(out.double(), ref64, atol=2e-5, rtol=1e-5)

    out_j, tan = torch.func.jvp(lambda x: time_features(x, freqs, scale), (times,), (tangent,))
    _, tan_ref = torch.func.jvp(lambda x: time_features_reference(x, freqs, scale), (times.double(),), (tangent.double(),))
    torch.testing.assert_close(out_j, out)
    torch.testing.assert_close(tan.double(), tan_ref, atol=2e-4, rtol=1e-4)

    grad_out = torch.randn(batch, k * freqs, generator=g).to(DEVICE)
    x = times.clone().requires_grad_()
    (grad,) = torch.autograd.grad((time_features(x, freqs, scale) * grad_out).sum(), x)
    x64 = times.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad((time_features_reference(x64, freqs, scale) * grad_out.double()).sum(), x64)
    torch.testing.assert_close(grad.double(), grad_ref, atol=2e-4, rtol=1e-4)


def test_time_features_reference_tangent_matches_finite_differences():
    times = torch.rand(4, 3, dtype=torch.float64)
    direction = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).expand(4, 3)  # (t, t - r, s) under the JVP
    f = lambda x: time_features_reference(x, 16, 10.0)  # noqa: E731
    _, tangent = torch.func.jvp(f, (times,), (direction,))
    eps = 1e-6
    fd = (f(times + eps * direction) - f(times - eps * direction)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=1e-7, rtol=1e-6)
    assert tangent[:, 32:].abs().max() == 0  # s carries no tangent


# --- fused Mean Flow target + adaptive loss ----------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3), (6, 1, 4, 4), (5, 3, 37, 29), (3, 5000)])
@pytest.mark.parametrize("p", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_meanflow_loss_matches_reference(triton_backend, shape, p, dtype, atol, rtol):
    g = torch.Generator().manual_seed(sum(shape))
    u, dudt, v = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    v = v.float()  # v = e - x0 is fp32 in training; u and du/dt carry the network's dtype
    h = torch.rand(shape[0], generator=g).to(DEVICE)
    c = 1e-3
    u_k = u.clone().requires_grad_()
    loss, sq = meanflow_loss(u_k, dudt, v, h, c, p)
    loss.backward()
    u_r = u.clone().requires_grad_()
    loss_ref, sq_ref = meanflow_loss_reference(u_r, dudt, v, h, c, p)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(sq, sq_ref, atol=atol, rtol=rtol)
    assert not sq.requires_grad
    assert u_k.grad.dtype == dtype
    torch.testing.assert_close(u_k.grad.float(), u_r.grad.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("h_shape,v_shape,dudt_shape", [((), (5,), (3, 5)), ((1,), (1, 5), (3, 5)),
                                                        ((3, 1), (3, 5), (5,))])
def test_meanflow_loss_broadcasts_as_the_reference(triton_backend, h_shape, v_shape, dudt_shape):
    # the kernel read h, v and du/dt as full-size: a 0-d h read past its one value, a (1, 5) v gave NaN
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 5, generator=g).to(DEVICE)
    dudt, v = torch.randn(dudt_shape, generator=g).to(DEVICE), torch.randn(v_shape, generator=g).to(DEVICE)
    h = torch.rand(h_shape, generator=g).to(DEVICE)
    u_k, u_r = u.clone().requires_grad_(), u.clone().requires_grad_()
    loss, sq = meanflow_loss(u_k, dudt, v, h, 1e-3, 1.0)
    loss_ref, sq_ref = meanflow_loss_reference(u_r, dudt, v, h, 1e-3, 1.0)
    torch.autograd.backward([loss, loss_ref])
    torch.testing.assert_close(sq, sq_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u_k.grad, u_r.grad, atol=1e-5, rtol=1e-5)


def test_meanflow_loss_unweighted_at_zero_error_has_zero_gradient(triton_backend):
    # p = 0, c = 0, delta = 0: the weight (0 + 0)^-0 is 1 (torch's pow), not exp(-0 * log 0) = NaN
    u = torch.ones(2, 3, device=DEVICE, requires_grad=True)
    loss, _ = meanflow_loss(u, torch.zeros(2, 3, device=DEVICE), torch.ones(2, 3, device=DEVICE),
                            torch.ones(2, device=DEVICE), 0.0, 0.0)
    loss.backward()
    assert loss.item() == 0 and torch.equal(u.grad, torch.zeros_like(u))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_meanflow_loss_gradient_is_scaled_by_the_incoming_one(triton_backend, dtype, atol, rtol):
    # the backward kernel reads the loss's incoming gradient on the GPU: a loss scaled (by a weight, a
    # GradScaler) must scale d loss / d u as the reference's does
    g = torch.Generator().manual_seed(3)
    u, dudt, v = (torch.randn(4, 3, 6, 6, generator=g).to(DEVICE, dtype) for _ in range(3))
    h = torch.rand(4, generator=g).to(DEVICE)
    scale = torch.tensor(-2.5, device=DEVICE)
    grads = []
    for fn in (meanflow_loss, meanflow_loss_reference):
        x = u.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(x, dudt, v, h, 1e-3, 1.0)[0], x, grad_outputs=scale)[0])
    torch.testing.assert_close(grads[0].float(), grads[1].float(), atol=atol, rtol=rtol)


def test_meanflow_loss_forward_alone_writes_no_gradient(triton_backend, on_device, monkeypatch):
    """The forward wrote d loss / d u (a pass over the batch) even where no backward came (evaluation, no_grad);
    the gradient is now the backward's one pass."""
    import stmd_fast.kernels.meanflow_loss as mfl

    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(mfl, "_grad_kernel", Counted(mfl._grad_kernel))
    u, dudt, v, h = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8), torch.randn(3, 8), torch.rand(3)
    with torch.no_grad():
        meanflow_loss(u, dudt, v, h, 1e-3, 1.0)
    loss, _ = meanflow_loss(u, dudt, v, h, 1e-3, 1.0)
    assert launches == []
    loss.backward()
    assert len(launches) == 1


def test_meanflow_loss_reference_closed_form():
    # One sample, p = 1: loss = l / (l + c) and d loss / d u = 2 c delta / (l + c)^2 ... but the
    # weight is stop-gradient, so the gradient is 2 delta / (l + c).
    u = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    dudt = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    h = torch.tensor([0.5], dtype=torch.float64)
    delta = u.detach() - (v - 0.5 * dudt)  # [1.25, 0.5]
    l = delta.pow(2).sum()
    loss, sq = meanflow_loss_reference(u, dudt, v, h, c=1e-3, p=1.0)
    loss.backward()
    # float64 inputs are computed in float64 (a float32 pass would be off by about 1e-8)
    torch.testing.assert_close(sq, l.reshape(1), rtol=1e-14, atol=0)
    torch.testing.assert_close(loss, l / (l + 1e-3), rtol=1e-14, atol=0)
    torch.testing.assert_close(u.grad, 2 * delta / (l + 1e-3), rtol=1e-14, atol=0)


# --- dispatch ----------------------------------------------------------------------------

def test_auto_backend_uses_reference_on_cpu(monkeypatch):
    import stmd_fast.kernels.meanflow_loss as mfl
    import stmd_fast.kernels.time_embedding as te

    def boom(*args, **kwargs):
        raise AssertionError("the kernel ran on a CPU tensor under backend 'auto'")

    monkeypatch.setattr(te, "_time_features_op", boom)
    monkeypatch.setattr(mfl, "_meanflow_loss_op", boom)
    x = torch.rand(3, 2)
    assert dispatch.get_backend() == "auto"
    te.time_features(x, 8, 10.0)
    mfl.meanflow_loss(x, x, x, x[:, 0], 1e-3, 1.0)
    with dispatch.backend("reference"):
        te.time_features(x, 8, 10.0)


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with dispatch.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(torch.zeros(1))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.set_backend("cuda")
    # set only after the import: Triton took its mode then (it said "0 active drivers")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "INTERPRETED_AT_IMPORT", False)
    with dispatch.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 set before importing"):
        dispatch.use_triton(torch.zeros(1))


# --- inside the compiled JVP step ----------------------------------------------------------

def _stmd_loss_and_grads(net, x0, noise, compiled: bool):
    from stmd_fast.objectives import ObjectiveConfig, compute_loss

    def loss_fn(x0, noise):
        return compute_loss("stmd", net, x0, noise, ObjectiveConfig())

    fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
    net.zero_grad(set_to_none=True)
    loss, error = fn(x0, noise)
    loss.backward()
    return loss.detach(), error, [p.grad.clone() for p in net.parameters()]


@pytest.mark.slow
def test_kernels_inside_compiled_jvp_step_match_eager_reference():
    """The whole STMD loss (JVP through the time-embedding kernel, fused loss) compiled with
    fullgraph=True equals the eager reference: a dropped or wrong tangent would change the
    target, hence the loss and every gradient."""
    from stmd_fast.models import NetConfig, build_net
    from stmd_fast.objectives import ObjectiveConfig, draw_noise

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = build_net(NetConfig(kind="mlp", width=32, depth=2, time_freqs=16), (4,), True, 3).to(DEVICE)
    x0 = torch.randn(16, 4, device=DEVICE)
    noise = draw_noise(x0, ObjectiveConfig(flow_matching_fraction=0.0), torch.Generator(DEVICE).manual_seed(1))
    with dispatch.backend("reference"):
        loss_ref, error_ref, grads_ref = _stmd_loss_and_grads(net, x0, noise, compiled=False)
    with dispatch.backend("triton"):
        loss, error, grads = _stmd_loss_and_grads(net, x0, noise, compiled=True)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(error, error_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    # the check has teeth: without the du/dt term (h = 0) ||delta||^2 moves far beyond the tolerance
    with dispatch.backend("reference"):
        _, error_no_jvp, _ = _stmd_loss_and_grads(net, x0, noise._replace(r=noise.t), compiled=False)
    assert (error_no_jvp - error_ref).abs() > 1e-3  # 100x the tolerance above


def test_unet_with_all_kernels_matches_reference_under_jvp():
    """A U-Net whose attention, time embedding and loss run as Triton kernels gives the same
    STMD loss, ||delta||^2 and gradients as the PyTorch references (eager)."""
    from stmd_fast.models import NetConfig, build_net
    from stmd_fast.objectives import ObjectiveConfig, draw_noise

    torch.manual_seed(0)
    cfg = NetConfig(channels=(16, 16), norm_groups=4, head_dim=8, time_freqs=16)
    net = build_net(cfg, (1, 8, 8), True, 3).to(DEVICE)
    x0 = torch.randn(4, 1, 8, 8, device=DEVICE)
    noise = draw_noise(x0, ObjectiveConfig(flow_matching_fraction=0.0), torch.Generator(DEVICE).manual_seed(2))
    with dispatch.backend("reference"):
        loss_ref, error_ref, grads_ref = _stmd_loss_and_grads(net, x0, noise, compiled=False)
    with dispatch.backend("triton"):
        loss, error, grads = _stmd_loss_and_grads(net, x0, noise, compiled=False)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(error, error_ref, atol=1e-4, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_fp_fusion_stays_as_the_kernels_were_checked_with_unless_the_user_sets_it():
    """Triton 3.9 warned on every compile that FP fusion (one FMA for a*b + c) turns off by default in 3.10."""
    import subprocess
    import sys

    code = "import os, stmd_fast.kernels; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, "TRITON_DEFAULT_FP_FUSION": "0"},
                            capture_output=True, text=True, check=True)
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("1", "0")


# --- what the kernels cannot do is said, never a silently wrong number (fourteenth round of probes) --------

def test_custom_ops_fakes_match_the_real_outputs_strides(triton_backend, on_device):
    """The fakes of meanflow_loss and time_features_backward kept a non-contiguous input's strides while the
    ops return contiguous tensors, so torch.compile failed ("expected ... stride") on a permuted u or times."""
    from stmd_fast.kernels import meanflow_loss as loss_module
    from stmd_fast.kernels import time_embedding

    u = torch.randn(3, 5, 4).transpose(1, 2)
    dudt, v, h = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.rand(3)
    for op, args in ((loss_module._meanflow_loss_op, (u, dudt, v, h, 1e-3, 1.0)),
                     (loss_module._meanflow_loss_grad_op, (torch.randn(3, 4, 5), torch.rand(3), torch.tensor(1.0),
                                                           1e-3, 1.0, torch.bfloat16)),
                     (time_embedding._time_features_backward_op, (torch.rand(3, 4).t(), torch.randn(4, 24), 8, 10.0))):
        checks = torch.library.opcheck(op, args, test_utils=("test_faketensor",), raise_exception=False)
        assert checks["test_faketensor"] == "SUCCESS", checks

    torch._dynamo.reset()
    x = torch.randn(3, 5, 4, requires_grad=True)
    step = lambda x: meanflow_loss(x.transpose(1, 2) * 2.0, dudt, v, h, 1e-3, 1.0)[0]  # noqa: E731
    torch.compile(step, fullgraph=True)(x).backward()
    x_ref = x.detach().clone().requires_grad_()
    with dispatch.backend("reference"):
        step(x_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's fallback loop over the dual op
def test_a_jvp_of_a_jvp_through_a_kernel_is_refused_not_zero(triton_backend, on_device):
    """The kernels compute one tangent: under nested jvp the outer one came back as exactly zero."""
    from stmd_fast.kernels.attention import attention

    q, k, v, q_t, w = (torch.randn(1, 1, 6, 8) for _ in range(5))
    inner = lambda a: torch.func.jvp(lambda b: attention(b, k, v, 0.4), (a,), (q_t,))[1]  # noqa: E731
    with pytest.raises(NotImplementedError, match="jvp of a jvp.*--kernels reference"):
        torch.func.jvp(inner, (q,), (w,))
    t = torch.rand(3, 2)
    with pytest.raises(NotImplementedError, match="jvp of a jvp"):
        torch.func.jacfwd(lambda a: torch.func.jvp(lambda b: time_features(b, 8, 10.0), (a,), (torch.ones_like(a),))[1])(t)
    # one level, and vmap over it, still run the kernel: equal to the reference's tangent
    _, tangent = torch.func.jvp(lambda b: attention(b, k, v, 0.4), (q,), (q_t,))
    with dispatch.backend("reference"):
        _, expected = torch.func.jvp(lambda b: attention(b, k, v, 0.4), (q,), (q_t,))
        second = torch.func.jvp(inner, (q,), (w,))[1]
    torch.testing.assert_close(tangent, expected, atol=1e-5, rtol=1e-5)
    assert second.abs().max() > 1e-3  # what the kernel returned as zero
    # the tangent-lean layers share split_dual and take any nesting, on every backend (the check once sat there)
    from stmd_fast.models import TangentLinear

    layer, x = TangentLinear(4, 3), torch.randn(2, 4)
    nested = torch.func.jvp(lambda a: torch.func.jvp(layer, (a,), (torch.ones_like(a),))[1], (x,), (x,))
    plain = torch.func.jvp(lambda a: torch.func.jvp(torch.nn.Linear.forward.__get__(layer), (a,),
                                                    (torch.ones_like(a),))[1], (x,), (x,))
    torch.testing.assert_close(nested, plain)
    batched = torch.func.vmap(lambda x: torch.func.jvp(lambda b: time_features(b, 8, 10.0), (x,), (x,))[1])(t[:, None])
    torch.testing.assert_close(batched[:, 0], torch.func.jvp(lambda b: time_features_reference(b, 8, 10.0), (t,), (t,))[1],
                               atol=1e-4, rtol=1e-4)


def test_reverse_mode_torch_func_transforms_over_a_kernel_are_refused_naming_the_fix(triton_backend, on_device):
    """torch.func.grad / jacrev / hessian over a kernel raised torch's "must override the setup_context
    staticmethod", about an autograd.Function the caller never wrote; the references take them."""
    from stmd_fast.kernels.attention import attention

    q, k = torch.randn(1, 1, 5, 8, device=DEVICE), torch.randn(1, 1, 5, 8, device=DEVICE)
    u, t = torch.randn(3, 4, device=DEVICE), torch.rand(3, 2, device=DEVICE)
    h = torch.ones(3, device=DEVICE)
    calls = {"attention": (torch.func.jacrev, lambda y: attention(y, k, k, 0.5), q),
             "time_features": (torch.func.hessian, lambda y: time_features(y, 4, 1.0).sum(), t),
             "meanflow_loss": (torch.func.grad, lambda x: meanflow_loss(x, u, u, h, 1e-3, 1.0)[0], u)}
    for op, (transform, fn, x) in calls.items():
        with pytest.raises(NotImplementedError, match=f"{op}: the Triton kernel has no torch.func reverse-mode rule"
                                                      f".*--kernels reference"):
            transform(fn)(x)
        with dispatch.backend("reference"):
            assert torch.isfinite(transform(fn)(x)).all(), op
    assert torch.isfinite(torch.func.jacfwd(lambda y: attention(y, k, k, 0.5))(q)).all()  # forward mode: kept


def test_meanflow_loss_grad_op_reads_a_strided_delta_by_its_values(triton_backend, on_device):
    """The backward op indexed delta as (B, D) whatever its strides: a transposed one gave other values."""
    from stmd_fast.kernels import meanflow_loss as loss_module

    delta = torch.randn(3, 5, 4).transpose(1, 2)
    rest = (torch.rand(3), torch.tensor(2.0), 1e-3, 1.0, torch.float32)
    torch.testing.assert_close(loss_module._meanflow_loss_grad_op(delta, *rest),
                               loss_module._meanflow_loss_grad_op(delta.contiguous(), *rest))


def test_meanflow_loss_kernel_refuses_a_second_derivative(triton_backend, on_device):
    """create_graph=True got the saved first derivative as a constant: d^2 loss / du^2 silently lost."""
    u, dudt, v, h = torch.randn(2, 6, requires_grad=True), torch.randn(2, 6), torch.randn(2, 6), torch.rand(2)
    loss, _ = meanflow_loss(u, dudt, v, h, 1e-3, 0.0)
    with pytest.raises(RuntimeError, match="no second derivative.*--kernels reference"):
        torch.autograd.grad(loss, u, create_graph=True)
    (grad,) = torch.autograd.grad(meanflow_loss(u, dudt, v, h, 1e-3, 0.0)[0], u)  # the first derivative works
    with dispatch.backend("reference"):
        (expected,) = torch.autograd.grad(meanflow_loss(u, dudt, v, h, 1e-3, 0.0)[0], u)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_meanflow_loss_kernel_on_an_empty_batch_is_the_references_nan(triton_backend, on_device):
    loss, sq = meanflow_loss(torch.randn(0, 6), torch.randn(0, 6), torch.randn(0, 6), torch.rand(0), 1e-3, 1.0)
    with dispatch.backend("reference"):
        loss_ref, sq_ref = meanflow_loss_reference(*(torch.randn(0, 6),) * 3, torch.rand(0), 1e-3, 1.0)
    assert loss.isnan() and loss_ref.isnan() and sq.shape == sq_ref.shape == (0,)
    u = torch.randn(0, 6, requires_grad=True)  # and its backward gives the empty gradient
    meanflow_loss(u, torch.randn(0, 6), torch.randn(0, 6), torch.rand(0), 1e-3, 1.0)[0].backward()
    assert u.grad.shape == (0, 6)


@pytest.mark.parametrize("value,interprets", [("1", True), ("true", True), ("On", True), ("yes", True),
                                              ("0", False), ("", False), ("off", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, interprets):
    """TRITON_INTERPRET=true had Triton interpret while stmd_fast refused the CPU tensor (and compile_matrix,
    which must refuse the interpreter, went on and failed every entry)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert dispatch.interpret_mode() is interprets
    if interprets:
        from stmd_fast.kernels import compile_matrix

        with pytest.raises(SystemExit, match="TRITON_INTERPRET unset"):
            compile_matrix.run(select=lambda e: False)


def test_float64_times_with_the_triton_backend_say_the_reference_runs(triton_backend, on_device):
    from stmd_fast.kernels import launch

    launch._warned.clear()
    times = torch.rand(3, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="time_features runs the PyTorch reference for dtype torch.float64"):
        out = time_features(times, 8, 10.0)
    torch.testing.assert_close(out, time_features_reference(times, 8, 10.0))


def test_device_capability_is_a_constant_under_compile(monkeypatch):
    """Dynamo traced through device_capability's lru_cache and warned about it on every compiled run with the
    kernels (seen on the H200); it is now read once while tracing, a constant of the graph."""
    import warnings

    from stmd_fast.kernels import launch
    from stmd_fast.kernels.launch import device_capability

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: calls.append(index) or (9, 0))
    monkeypatch.setattr(launch, "_capabilities", {})
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # a warning given earlier is given again
    torch._dynamo.reset()
    step = torch.compile(lambda x: x + device_capability(0)[0], backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [step(torch.ones(3)) for _ in range(3)]
    assert [str(w.message) for w in caught if "lru_cache" in str(w.message)] == []
    assert all(torch.equal(o, torch.full((3,), 10.0)) for o in out)
    assert calls == [0] and device_capability(0) == (9, 0) and calls == [0]  # read once, then cached
