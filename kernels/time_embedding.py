"""Fused sinusoidal time features of (t, t - r, s): values, backward and forward-mode tangent.

reference:  time_features_reference(times, freqs, scale)    plain PyTorch, any float dtype
kernel:     one Triton launch for the whole batch and all time inputs; the JVP variant writes
            the features and their tangent in the same launch (under the Mean Flow JVP, t and
            t - r carry tangent 1 and s tangent 0, so the tangent is not zero and costs a pass
            of its own in eager PyTorch)
API:        time_features(times, freqs, scale): the kernel for CUDA fp32 times, else the reference

Layout: (B, k) times -> (B, k * freqs) features, per time input [cos(a_f) | sin(a_f)] with
a_f = scale * time * omega_f and omega_f = 10000^(-f / half), f = 0 .. half - 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import HAS_TRITON, make_dual, refuse_unsupported_transforms, split_dual, use_triton
from .launch import warn_fallback

LOG_BASE = math.log(10000.0)


def time_features_reference(times: Tensor, freqs: int, scale: float) -> Tensor:
    """(B, k) times in [0, 1] -> (B, k * freqs) features [cos | sin] of scale * time per input.
    Times are used in fp32 (fp64 for fp64 times) so bf16 autocast cannot quantize them."""
    half = freqs // 2
    dtype = torch.promote_types(times.dtype, torch.float32)
    omega = torch.exp(-LOG_BASE * torch.arange(half, device=times.device, dtype=dtype) / half)
    angles = scale * times.to(dtype)[:, :, None] * omega  # (B, k, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).flatten(1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _time_features_fwd_kernel(times_ptr, tangent_ptr, out_ptr, out_t_ptr, n_rows, scale, HALF,
                                  LOG_BASE: tl.constexpr, HAS_TANGENT: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        # One row = one (sample, time input) pair; a program writes BLOCK_R rows of 2 * HALF features.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = tl.arange(0, BLOCK_F)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (f < HALF)[None, :]
        time = tl.load(times_ptr + rows, mask=row_ok, other=0.0)
        omega = scale * tl.exp(-LOG_BASE * f.to(tl.float32) / HALF)  # d angle / d time
        angle = time[:, None] * omega[None, :]
        cos, sin = tl.cos(angle), tl.sin(angle)
        offs = rows[:, None] * (2 * HALF) + f[None, :]
        tl.store(out_ptr + offs, cos, mask=mask)
        tl.store(out_ptr + offs + HALF, sin, mask=mask)
        if HAS_TANGENT:
            angle_t = tl.load(tangent_ptr + rows, mask=row_ok, other=0.0)[:, None] * omega[None, :]
            tl.store(out_t_ptr + offs, -sin * angle_t, mask=mask)
            tl.store(out_t_ptr + offs + HALF, cos * angle_t, mask=mask)

    @triton.jit
    def _time_features_bwd_kernel(times_ptr, grad_ptr, grad_times_ptr, n_rows, scale, HALF,
                                  LOG_BASE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        # d loss / d time = sum_f omega_f (cos(a_f) g_sin,f - sin(a_f) g_cos,f), one row per pair.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = tl.arange(0, BLOCK_F)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (f < HALF)[None, :]
        time = tl.load(times_ptr + rows, mask=row_ok, other=0.0)
        omega = scale * tl.exp(-LOG_BASE * f.to(tl.float32) / HALF)
        angle = time[:, None] * omega[None, :]
        offs = rows[:, None] * (2 * HALF) + f[None, :]
        g_cos = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_sin = tl.load(grad_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        dtime = tl.sum(omega[None, :] * (tl.cos(angle) * g_sin - tl.sin(angle) * g_cos), axis=1)
        tl.store(grad_times_ptr + rows, dtime, mask=row_ok)


def launch_settings(n_rows: int, freqs: int):
    """(grid, BLOCK_R, BLOCK_F): a row of freqs / 2 angles per program row, 2K angles per program."""
    block_f = triton.next_power_of_2(max(freqs // 2, 1))
    block_r = max(1, min(64, 2048 // block_f))  # 2K angles per program: 16 per thread at 4 warps (4K spill)
    return (triton.cdiv(n_rows, block_r),), block_r, block_f


def _forward(times: Tensor, tangent: Tensor | None, freqs: int, scale: float) -> tuple[Tensor, Tensor | None]:
    times = times.contiguous()
    b, k = times.shape
    out = times.new_empty(b, k * freqs)
    out_t = torch.empty_like(out) if tangent is not None else out  # out_t unused without a tangent
    grid, block_r, block_f = launch_settings(b * k, freqs)
    _time_features_fwd_kernel[grid](times, tangent.contiguous() if tangent is not None else times, out, out_t,
                                    b * k, scale, freqs // 2, LOG_BASE=LOG_BASE, HAS_TANGENT=tangent is not None,
                                    BLOCK_R=block_r, BLOCK_F=block_f)
    return out, (out_t if tangent is not None else None)


@torch.library.custom_op("stmd_fast::time_features", mutates_args=())
def _time_features_op(times: Tensor, freqs: int, scale: float) -> Tensor:
    return _forward(times, None, freqs, scale)[0]


@torch.library.custom_op("stmd_fast::time_features_dual", mutates_args=())
def _time_features_dual_op(times: Tensor, tangent: Tensor, freqs: int, scale: float) -> tuple[Tensor, Tensor]:
    return _forward(times, tangent, freqs, scale)


@torch.library.custom_op("stmd_fast::time_features_backward", mutates_args=())
def _time_features_backward_op(times: Tensor, grad: Tensor, freqs: int, scale: float) -> Tensor:
    times = times.contiguous()
    grad_times = torch.empty_like(times)
    grid, block_r, block_f = launch_settings(times.numel(), freqs)
    _time_features_bwd_kernel[grid](times, grad.contiguous(), grad_times, times.numel(), scale, freqs // 2,
                                    LOG_BASE=LOG_BASE, BLOCK_R=block_r, BLOCK_F=block_f)
    return grad_times


@_time_features_op.register_fake
def _(times, freqs, scale):
    return times.new_empty(times.shape[0], times.shape[1] * freqs)


@_time_features_dual_op.register_fake
def _(times, tangent, freqs, scale):
    out = times.new_empty(times.shape[0], times.shape[1] * freqs)
    return out, torch.empty_like(out)


@_time_features_backward_op.register_fake
def _(times, grad, freqs, scale):  # contiguous, as the op makes the times
    return torch.empty_like(times, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.freqs, ctx.scale = inputs[-2], inputs[-1]
    if isinstance(output, tuple):
        # The tangent carries no gradient (in Mean Flow it feeds the stop-gradient target): a backward
        # through it alone is an error, beside other terms it adds 0.
        ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, *grad_tangent):
    (times,) = ctx.saved_tensors
    grad_times = _time_features_backward_op(times, grad, ctx.freqs, ctx.scale)
    return (grad_times, None, None) if not grad_tangent else (grad_times, None, None, None)


_time_features_op.register_autograd(_backward, setup_context=_setup_context)
_time_features_dual_op.register_autograd(_backward, setup_context=_setup_context)


def time_features(times: Tensor, freqs: int, scale: float) -> Tensor:
    """Sinusoidal features of (B, k) times: the Triton kernel for fp32 CUDA times (backend
    "auto"), the reference otherwise. Works under torch.func.jvp and torch.compile."""
    if freqs % 2:
        raise ValueError("freqs must be even (cos and sin halves)")
    if times.dtype != torch.float32:
        if use_triton(times):
            warn_fallback("time_features", f"dtype {times.dtype} (the kernel takes float32 times)")
        return time_features_reference(times, freqs, scale)
    if not use_triton(times):
        return time_features_reference(times, freqs, scale)
    refuse_unsupported_transforms("time_features")
    primal, tangent = split_dual(times)
    if tangent is None:
        return _time_features_op(primal, freqs, scale)
    out, out_t = _time_features_dual_op(primal, tangent, freqs, scale)
    return make_dual(out, out_t)
