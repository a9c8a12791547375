"""Fused Mean Flow target and adaptive loss (math.md section 4).

    u_tgt = stopgrad(v - h du/dt),  h = t - r
    l_i   = ||u_i - u_tgt,i||^2 (summed over the sample's dimensions)
    loss  = mean_i stopgrad(w_i) l_i,  w_i = 1 / (l_i + c)^p

reference:  meanflow_loss_reference   plain PyTorch (eager: about 10 elementwise passes)
kernel:     forward: one pass reads u, v, du/dt and h once, writes delta = u - u_tgt (fp32, saved
            for the backward) and per-chunk partial sums of delta^2 (summed in a fixed order:
            deterministic, no atomics). backward: one pass turns delta into the incoming
            gradient times d loss / d u = 2 w_i delta / B, in u's dtype. 24 bytes per fp32
            value in all; computing the gradient in the forward (as this kernel did) moved 32,
            as the backward's multiply by the incoming gradient read and wrote it once more
            (bench/kernels.py on an H200, README).
API:        meanflow_loss(u, dudt, v, h, c, p) -> (loss, per-sample ||delta||^2, detached)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import HAS_TRITON, refuse_unsupported_transforms, use_triton
from .launch import warn_fallback


def meanflow_loss_reference(u: Tensor, dudt: Tensor, v: Tensor, h: Tensor, c: float, p: float) -> tuple[Tensor, Tensor]:
    """Loss and per-sample ||delta||^2 (detached); math in fp32 for 16- and 32-bit inputs, in
    float64 for float64 ones."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    shape = (-1,) + (1,) * (v.ndim - 1)
    u_tgt = (v.to(dtype) - h.to(dtype).reshape(shape) * dudt.to(dtype)).detach()
    sq = (u.to(dtype) - u_tgt).pow(2).flatten(1).sum(1)
    weight = (sq.detach() + c).pow(-p)
    return (weight * sq).mean(), sq.detach()


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _delta_kernel(u_ptr, dudt_ptr, v_ptr, h_ptr, delta_ptr, partial_ptr, D, N_CHUNKS, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        base = b.to(tl.int64) * D
        u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dudt = tl.load(dudt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + b).to(tl.float32)
        delta = u - (v - h * dudt)
        tl.store(delta_ptr + base + offs, delta, mask=mask)
        tl.store(partial_ptr + b * N_CHUNKS + chunk, tl.sum(delta * delta, axis=0))

    @triton.jit
    def _grad_kernel(delta_ptr, sq_ptr, grad_loss_ptr, grad_ptr, D, coef, c, p, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        base = b.to(tl.int64) * D
        weight = tl.where(p == 0.0, 1.0, tl.exp(-p * tl.log(tl.load(sq_ptr + b) + c)))  # (l + c)^-p; 0^0 = 1
        scale = coef * weight * tl.load(grad_loss_ptr)  # the incoming gradient read on the GPU: no host sync
        delta = tl.load(delta_ptr + base + offs, mask=mask, other=0.0)
        tl.store(grad_ptr + base + offs, (scale * delta).to(grad_ptr.dtype.element_ty), mask=mask)


def block_size(values_per_sample: int) -> int:
    """Values per program: one power of two up to 4096 (32 per thread at the default 4 warps)."""
    return min(4096, triton.next_power_of_2(values_per_sample))


@torch.library.custom_op("stmd_fast::meanflow_loss", mutates_args=())
def _meanflow_loss_op(u: Tensor, dudt: Tensor, v: Tensor, h: Tensor, c: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-sample ||delta||^2, delta in fp32): delta is what the backward turns into the gradient."""
    b = u.shape[0]
    delta = torch.empty(u.shape, device=u.device, dtype=torch.float32)
    if b == 0:  # as the reference: the mean of no samples is NaN
        return u.new_full((), float("nan"), dtype=torch.float32), u.new_empty(0, dtype=torch.float32), delta
    d = u[0].numel()
    u, dudt, v, h = u.contiguous(), dudt.contiguous(), v.contiguous(), h.contiguous()
    block = block_size(d)
    n_chunks = triton.cdiv(d, block)
    partial = torch.empty(b, n_chunks, device=u.device, dtype=torch.float32)
    _delta_kernel[(b, n_chunks)](u, dudt, v, h, delta, partial, d, n_chunks, BLOCK=block)
    sq = partial.sum(1)
    loss = ((sq + c).pow(-p) * sq).mean()
    return loss, sq, delta


@_meanflow_loss_op.register_fake
def _(u, dudt, v, h, c, p):  # delta is contiguous whatever u's strides (the op makes u contiguous)
    return (u.new_empty((), dtype=torch.float32), u.new_empty(u.shape[0], dtype=torch.float32),
            torch.empty(u.shape, device=u.device, dtype=torch.float32))


@torch.library.custom_op("stmd_fast::meanflow_loss_grad", mutates_args=())
def _meanflow_loss_grad_op(delta: Tensor, sq: Tensor, grad_loss: Tensor, c: float, p: float,
                           dtype: torch.dtype) -> Tensor:
    """grad_loss (the incoming gradient of the loss, 0-d) times d loss / d u, in u's dtype."""
    grad = torch.empty(delta.shape, device=delta.device, dtype=dtype)
    b = delta.shape[0]
    if grad.numel() == 0:
        return grad
    d = delta[0].numel()
    block = block_size(d)
    delta, grad_loss = delta.contiguous(), grad_loss.to(torch.float32).reshape(1)  # the kernel reads delta as (B, D)
    _grad_kernel[(b, triton.cdiv(d, block))](delta, sq, grad_loss, grad, d, 2.0 / b, c, p, BLOCK=block)
    return grad


@_meanflow_loss_grad_op.register_fake
def _(delta, sq, grad_loss, c, p, dtype):
    return torch.empty(delta.shape, device=delta.device, dtype=dtype)


def _setup_context(ctx, inputs, output):
    u, _, _, _, ctx.c, ctx.p = inputs
    ctx.dtype = u.dtype
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])  # ||delta||^2 and delta are outputs, not terms


def _backward(ctx, grad_loss, grad_sq, grad_delta):
    # Only u gets a gradient: the target (v, du/dt, h) is stop-gradient, and so are the
    # per-sample ||delta||^2 and the weights.
    if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph, its own would be lost
        raise RuntimeError("meanflow_loss's Triton kernel has no second derivative (create_graph=True): run the "
                           "PyTorch reference, --kernels reference or stmd_fast.kernels.dispatch.backend('reference')")
    sq, delta = ctx.saved_tensors
    return _meanflow_loss_grad_op(delta, sq, grad_loss, ctx.c, ctx.p, ctx.dtype), None, None, None, None, None


_meanflow_loss_op.register_autograd(_backward, setup_context=_setup_context)


def meanflow_loss(u: Tensor, dudt: Tensor, v: Tensor, h: Tensor, c: float, p: float) -> tuple[Tensor, Tensor]:
    """Adaptive Mean Flow loss and per-sample ||delta||^2: the fused kernel on CUDA (backend
    "auto"), the reference elsewhere. The gradient flows to u only."""
    if not use_triton(u):
        return meanflow_loss_reference(u, dudt, v, h, c, p)
    if u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # the kernel computes in fp32: a float64 loss would silently lose its precision
        warn_fallback("meanflow_loss", f"dtype {u.dtype} (the kernel takes 16- and 32-bit floats)")
        return meanflow_loss_reference(u, dudt, v, h, c, p)
    refuse_unsupported_transforms("meanflow_loss")
    # the kernel reads v and du/dt as u's shape and h as one value per sample: broadcast ones made whole first
    dudt, v = dudt.detach().expand_as(u), v.detach().expand_as(u)
    h = h.detach().reshape(-1).expand(u.shape[0])
    loss, sq, _ = _meanflow_loss_op(u, dudt, v, h, float(c), float(p))
    return loss, sq.detach()
