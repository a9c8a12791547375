"""The fused attention kernel (kernels/attention.py) against its PyTorch reference.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before stmd_fast is imported), fp32 only; bf16 is added on CUDA.
Expected values come from the reference in float64, so the tolerances measure the kernel.
"""
import os

import torch

if not torch.cuda.is_available():  # conftest.py does this too; kept for a run without it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import stmd_fast.kernels.attention as attn_mod  # noqa: E402
from stmd_fast.kernels import dispatch, launch  # noqa: E402
from stmd_fast.kernels.attention import attention, attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, atol, rtol); errors are judged against the largest reference entry (see _close)
DTYPES = [(torch.float32, 2e-5, 2e-5)]
if torch.cuda.is_available():
    DTYPES.append((torch.bfloat16, 2e-2, 3e-2))
DTYPE_IDS = [str(d[0]).removeprefix("torch.") for d in DTYPES]
L_VALUES = [1, 7, 64]   # one key, a tail shorter than a block, several blocks (online rescaling)
D_VALUES = [8, 16, 40]  # padded to BLOCK_D = 16, exact, padded to 64


def _inputs(B, H, L, d, dtype, n=3, seed=0, mult=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, L, d, generator=g) * mult).to(DEVICE, dtype) for _ in range(n)]


def _close(actual, expected, atol, rtol):
    """max |actual - expected| <= atol + rtol * max |expected| (in float64)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _ref_jvp(primals, tangents, scale):
    primals = [x.double() for x in primals]
    tangents = [x.double() for x in tangents]
    return torch.func.jvp(lambda q, k, v: attention_reference(q, k, v, scale), tuple(primals), tuple(tangents))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", D_VALUES)
@pytest.mark.parametrize("L", L_VALUES)
def test_forward_matches_reference(L, d, dtype, atol, rtol):
    q, k, v = _inputs(2, 1, L, d, dtype)
    scale = d ** -0.5
    with dispatch.backend("triton"):
        o = attention(q, k, v, scale)
    assert o.dtype == dtype and o.shape == q.shape
    _close(o, attention_reference(q.double(), k.double(), v.double(), scale), atol, rtol)


def test_forward_peaked_softmax():
    """Large scores: the running max moves between key blocks and exp must not overflow."""
    q, k, v = _inputs(1, 2, 64, 16, torch.float32, mult=4.0)
    with dispatch.backend("triton"):
        o = attention(q, k, v, 1.0)
    assert torch.isfinite(o).all()
    _close(o, attention_reference(q.double(), k.double(), v.double(), 1.0), 2e-5, 2e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", D_VALUES)
@pytest.mark.parametrize("L", L_VALUES)
def test_tangent_matches_reference(L, d, dtype, atol, rtol):
    q, k, v, q_t, k_t, v_t = _inputs(1, 2, L, d, dtype, n=6, seed=1)
    scale = d ** -0.5
    with dispatch.backend("triton"):
        o, o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, scale), (q, k, v), (q_t, k_t, v_t))
    ref_o, ref_t = _ref_jvp((q, k, v), (q_t, k_t, v_t), scale)
    assert o.dtype == o_t.dtype == dtype
    _close(o, ref_o, atol, rtol)
    _close(o_t, ref_t, atol, rtol)


def test_tangent_of_some_inputs_only():
    """Inputs without a tangent (constants of the jvp) count as zero tangents."""
    q, k, v, q_t = _inputs(1, 2, 7, 16, torch.float32, n=4, seed=2)
    scale = 0.25
    with dispatch.backend("triton"):
        o, o_t = torch.func.jvp(lambda a: attention(a, k, v, scale), (q,), (q_t,))
    ref_o, ref_t = _ref_jvp((q, k, v), (q_t, torch.zeros_like(k), torch.zeros_like(v)), scale)
    _close(o, ref_o, 2e-5, 2e-5)
    _close(o_t, ref_t, 2e-5, 2e-5)


def test_reference_tangent_matches_finite_differences():
    """The reference's tangent (what the kernel is compared with) is itself right."""
    q, k, v, q_t, k_t, v_t = [x.double() for x in _inputs(1, 2, 7, 8, torch.float32, n=6, seed=3)]
    scale, eps = 0.4, 1e-6
    _, tangent = _ref_jvp((q, k, v), (q_t, k_t, v_t), scale)
    plus = attention_reference(q + eps * q_t, k + eps * k_t, v + eps * v_t, scale)
    minus = attention_reference(q - eps * q_t, k - eps * k_t, v - eps * v_t, scale)
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), atol=1e-7, rtol=1e-6)


def _ref_grads(q, k, v, w, scale):
    q, k, v = [x.detach().double().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad((attention_reference(q, k, v, scale) * w.double()).sum(), (q, k, v))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", D_VALUES)
@pytest.mark.parametrize("L", L_VALUES)
def test_gradients_match_reference(L, d, dtype, atol, rtol):
    q, k, v, w = _inputs(2, 1, L, d, dtype, n=4, seed=4)
    scale = d ** -0.5
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    with dispatch.backend("triton"):
        grads = torch.autograd.grad((attention(q, k, v, scale) * w).sum(), (q, k, v))
    for g, ref in zip(grads, _ref_grads(q, k, v, w, scale)):
        assert g.dtype == dtype
        _close(g, ref, atol, rtol)


@pytest.mark.parametrize("L", [7, 64])
def test_gradients_through_jvp_primal(L):
    """The training pattern: the jvp's primal output carries the gradient, the tangent is a target."""
    q, k, v, q_t, k_t, v_t, w = _inputs(1, 2, L, 16, torch.float32, n=7, seed=5)
    scale = 0.25
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    with dispatch.backend("triton"):
        o, o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, scale), (q, k, v), (q_t, k_t, v_t))
        grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    for g, ref in zip(grads, _ref_grads(q, k, v, w, scale)):
        _close(g, ref, 2e-5, 2e-5)
    # the tangent is non-differentiable: a backward through it fails loudly, not silently wrong
    assert not o_t.requires_grad
    with pytest.raises(RuntimeError):
        torch.autograd.grad(o_t.sum(), (q, k, v))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_widest_head(dtype, atol, rtol):
    """d = 64, the widest head the kernel takes (kernels/launch.py): output, tangent, gradients."""
    q, k, v, q_t, k_t, v_t, w = _inputs(1, 1, 40, 64, dtype, n=7, seed=8)
    scale = 64 ** -0.5
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    with dispatch.backend("triton"):
        o, o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, scale), (q, k, v), (q_t, k_t, v_t))
        grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    ref_o, ref_t = _ref_jvp((q.detach(), k.detach(), v.detach()), (q_t, k_t, v_t), scale)
    _close(o, ref_o, atol, rtol)
    _close(o_t, ref_t, atol, rtol)
    for g, ref in zip(grads, _ref_grads(q, k, v, w, scale)):
        _close(g, ref, atol, rtol)


def test_wider_head_runs_the_reference_with_a_warning():
    q, k, v, q_t, k_t, v_t, w = _inputs(1, 1, 9, 72, torch.float32, n=7, seed=9)  # DiT-XL's head dim
    with dispatch.backend("triton"), pytest.warns(RuntimeWarning, match="head dim 72"):
        launch._warned.clear()
        o, o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, 0.1), (q, k, v), (q_t, k_t, v_t))
    ref_o, ref_t = _ref_jvp((q, k, v), (q_t, k_t, v_t), 0.1)
    _close(o, ref_o, 1e-5, 1e-5)
    _close(o_t, ref_t, 1e-5, 1e-5)


@pytest.mark.parametrize("case", ["k and v longer", "q longer", "narrower v", "broadcast batch", "3-d",
                                  "bfloat16 in the interpreter"])
def test_inputs_the_kernel_cannot_take_run_the_reference_with_a_warning(case):
    # the kernel indexes k and v as q: other shapes read out of bounds (values off by 1e10), and Triton's
    # interpreter computes bfloat16 dot products wrongly; the reference takes them all
    if case == "bfloat16 in the interpreter" and DEVICE == "cuda":
        pytest.skip("the interpreter runs on the CPU")
    shapes = {"k and v longer": [(1, 1, 5, 8), (1, 1, 9, 8), (1, 1, 9, 8)],
              "q longer": [(1, 1, 7, 8), (1, 1, 5, 8), (1, 1, 5, 8)],
              "narrower v": [(1, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 4)],
              "broadcast batch": [(2, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8)],
              "3-d": [(2, 5, 8)] * 3,
              "bfloat16 in the interpreter": [(1, 1, 5, 8)] * 3}[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE) for shape in shapes)
    if case.startswith("bfloat16"):
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    launch._warned.clear()
    with dispatch.backend("triton"), pytest.warns(RuntimeWarning, match="runs the PyTorch reference"):
        o = attention(q, k, v, 0.35)
    torch.testing.assert_close(o, attention_reference(q, k, v, 0.35))


@pytest.mark.slow
def test_compiled_jvp_and_backward():
    """torch.compile(fullgraph=True) keeps the tangent (a custom autograd jvp would be dropped)."""
    torch._dynamo.reset()
    q, k, v, q_t, k_t, v_t, w = _inputs(1, 2, 7, 16, torch.float32, n=7, seed=6)
    scale = 0.25

    def step(q, k, v):
        o, o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, scale), (q, k, v), (q_t, k_t, v_t))
        loss = ((o - 0.5 * o_t.detach()) * w).square().sum()  # Mean Flow-like: target is stop-gradient
        return loss, o, o_t

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        loss, o, o_t = fn(*leaves)
        return (o, o_t, *torch.autograd.grad(loss, leaves))

    with dispatch.backend("reference"):
        expected = run(step)
    with dispatch.backend("triton"):
        actual = run(torch.compile(step, fullgraph=True))
    for name, a, e in zip(("output", "tangent", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _forbid_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")
    monkeypatch.setattr(attn_mod, "attention_fwd", boom)
    monkeypatch.setattr(attn_mod, "attention_dual", boom)


@pytest.mark.parametrize("name,device", [("auto", "cpu"), ("reference", DEVICE)])
def test_dispatch_uses_reference(monkeypatch, name, device):
    """backend "auto" runs the reference on CPU tensors; "reference" never calls a kernel."""
    _forbid_kernels(monkeypatch)
    q, k, v, q_t = [x.to(device) for x in _inputs(1, 1, 7, 8, torch.float32, n=4)]
    with dispatch.backend(name):
        o = attention(q, k, v, 0.3)
        _, o_t = torch.func.jvp(lambda a: attention(a, k, v, 0.3), (q,), (q_t,))
    torch.testing.assert_close(o, attention_reference(q, k, v, 0.3))
    assert torch.isfinite(o_t).all()


def test_dispatch_triton_calls_kernel(monkeypatch):
    """Positive control for the test above: backend "triton" does reach the (patched) kernel."""
    _forbid_kernels(monkeypatch)
    q, k, v = _inputs(1, 1, 7, 8, torch.float32)
    with dispatch.backend("triton"), pytest.raises(AssertionError, match="kernel ran"):
        attention(q, k, v, 0.3)


def test_non_contiguous_inputs():
    """(B, L, H, d) transposed to (B, H, L, d), as the model's attention produces them."""
    B, H, L, d = 2, 2, 7, 16
    g = torch.Generator().manual_seed(7)
    q, k, v, q_t, k_t, v_t = [torch.randn(B, L, H, d, generator=g).to(DEVICE).transpose(1, 2) for _ in range(6)]
    assert not q.is_contiguous()
    scale = d ** -0.5
    with dispatch.backend("triton"):
        o, o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, scale), (q, k, v), (q_t, k_t, v_t))
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        grads = torch.autograd.grad(attention(*leaves, scale).square().sum(), leaves)
        contiguous = [x.contiguous().requires_grad_() for x in (q, k, v)]
        expected_grads = torch.autograd.grad(attention(*contiguous, scale).square().sum(), contiguous)
        expected_o, expected_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, scale),
                                                tuple(x.contiguous() for x in (q, k, v)),
                                                tuple(x.contiguous() for x in (q_t, k_t, v_t)))
    torch.testing.assert_close(o, expected_o, atol=0, rtol=0)
    torch.testing.assert_close(o_t, expected_t, atol=0, rtol=0)
    for g_, e in zip(grads, expected_grads):
        torch.testing.assert_close(g_, e, atol=0, rtol=0)
    ref_o, ref_t = _ref_jvp((q, k, v), (q_t, k_t, v_t), scale)
    _close(o, ref_o, 2e-5, 2e-5)
    _close(o_t, ref_t, 2e-5, 2e-5)
