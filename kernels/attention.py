"""Fused flash-style attention in Triton with forward-mode AD (torch.func.jvp) and reverse mode.

softmax(q k^T scale) v on (B, H, L, d) self-attention, for the U-Net/DiT attention of the Mean
Flow trainer, which needs the output and its tangent (torch.func.jvp) in one pass, and the
gradient of the output.

Why custom ops and not autograd.Function.jvp: torch.compile silently drops a custom jvp (wrong
tangents, no error; see kernels/dispatch.py). So `attention` unpacks the dual numbers itself,
calls ONE opaque custom op that returns primal and tangent, and makes the dual number again.

Gradients flow through the primal output only: the tangent output is marked non-differentiable
(Mean Flow's regression target, which contains the tangent, is stop-gradient), so a backward
through the tangent raises instead of silently returning a wrong gradient.

Layout: kernels on contiguous (B, H, L, d) tensors, one program per (query or key block, b*h)
on a 1-D grid; the head dim is padded to BLOCK_D = max(16, next_power_of_2(d)) with masked
loads because tl.dot needs dimensions >= 16; the sequence tails are masked (any L >= 1).
Blocks, warps and stages per GPU target: launch.py. Other dtypes (float64, float16), head dims
over 64 and GPUs before sm_80 run the reference, with a one-time warning.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import HAS_TRITON, interpret_mode, make_dual, refuse_unsupported_transforms, split_dual, use_triton
from .launch import (attention_config, attention_unsupported, device_capability, dot_precision, padded_head_dim,
                     warn_fallback)

if HAS_TRITON:
    import triton
    import triton.language as tl

    # exp(x) = exp2(x * log2(e)): exp2 is the fast hardware instruction (a constexpr: jit
    # functions may only read constexpr globals)
    LOG2E = tl.constexpr(1.4426950408889634)


def attention_reference(q, k, v, scale):
    """softmax(q k^T scale) v on (B, H, L, d); softmax in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(v.dtype), v)


if HAS_TRITON:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """a @ b accumulated in fp32: 16-bit operands ("bf16") on their own MMA, fp32 operands
        as TF32 ("tf32") or three TF32 MMAs of split operands ("tf32x3", fp32 accuracy)."""
        if PRECISION == "bf16":
            out = tl.dot(a, b)
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _block_and_head(L, BLOCK: tl.constexpr):
        """(first row of this program's block, b * H + h) from a 1-D grid of cdiv(L, BLOCK) * B * H
        programs: grid dimension 0 allows 2**31 - 1 programs (dimension 1 only 65535, which a
        large batch of heads would exceed); consecutive programs share a head's keys (L2 reuse)."""
        n_blocks = tl.cdiv(L, BLOCK)
        pid = tl.program_id(0)
        return (pid % n_blocks) * BLOCK, (pid // n_blocks).to(tl.int64)

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, QT, KT, VT, O, OT, LSE, L, D, scale,
                         WITH_TANGENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
        """One block of query rows against all key blocks, online softmax (one pass).

        Tangent (WITH_TANGENT): dS = (q_t k^T + q k_t^T) scale, mu_i = sum_j P_ij dS_ij,
        O_t = P (dS - mu) v + P v_t, accumulated with the same running-max rescaling as O.
        """
        start_m, bh = _block_and_head(L, BLOCK_M)
        base = bh * L * D  # int64: B*H*L*d may exceed 2**31
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < L
        mask_d = offs_d < D
        q_ptrs = base + offs_m[:, None] * D + offs_d[None, :]
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
        qk_scale = scale * LOG2E  # scores in log2 units, so p = exp2(s - m)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of p
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)        # sum p v
        if WITH_TANGENT:
            q_t = tl.load(QT + q_ptrs, mask=q_mask, other=0.0)
            acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum p (dS v + v_t)
            acc_mu = tl.zeros([BLOCK_M], dtype=tl.float32)          # sum p dS

        for start_n in range(0, L, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < L
            kv_ptrs = base + cols[:, None] * D + offs_d[None, :]
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))  # padded keys get probability 0
            m_new = tl.maximum(m_i, tl.max(s, 1))           # finite: every block has a valid key
            alpha = tl.exp2(m_i - m_new)                    # rescales the old sums (0 at first)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
            if WITH_TANGENT:
                k_t = tl.load(KT + kv_ptrs, mask=kv_mask, other=0.0)
                v_t = tl.load(VT + kv_ptrs, mask=kv_mask, other=0.0)
                # dS in natural units (not log2): it multiplies probabilities, never enters exp2
                ds = (_dot(q_t, tl.trans(k), PRECISION) + _dot(q, tl.trans(k_t), PRECISION)) * scale
                pds = p * ds  # padded keys: p = 0 (and ds = 0 from the zero loads)
                acc_mu = acc_mu * alpha + tl.sum(pds, 1)
                acc_t = (acc_t * alpha[:, None] + _dot(pds.to(v.dtype), v, PRECISION)
                         + _dot(p.to(v_t.dtype), v_t, PRECISION))
            m_i = m_new

        o = acc / l_i[:, None]
        tl.store(O + q_ptrs, o.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + bh * L + offs_m, (m_i + tl.log2(l_i)) / LOG2E, mask=mask_m)
        if WITH_TANGENT:
            mu = acc_mu / l_i
            o_t = acc_t / l_i[:, None] - mu[:, None] * o
            tl.store(OT + q_ptrs, o_t.to(OT.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, L, D, scale,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr):
        """One block of keys against all query blocks: dV = P^T dO, dK = dS^T Q scale.

        Each program owns its dK, dV rows, so no atomics are needed.
        """
        start_n, bh = _block_and_head(L, BLOCK_N)
        base = bh * L * D
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < L
        mask_d = offs_d < D
        kv_ptrs = base + offs_n[:, None] * D + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, L, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < L
            q_ptrs = base + rows[:, None] * D + offs_d[None, :]
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
            do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * L + rows, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + bh * L + rows, mask=mask_m, other=0.0)
            # P recomputed from the saved log-sum-exp instead of stored (O(L) memory, not O(L^2))
            s = _dot(q, tl.trans(k), PRECISION) * (scale * LOG2E)
            p = tl.exp2(s - lse[:, None] * LOG2E)
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)  # padded rows/keys contribute 0
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
            dp = _dot(do, tl.trans(v), PRECISION)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
        tl.store(DK + kv_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, L, D, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr):
        """One block of queries against all key blocks: dQ = dS K scale, dS = P (dP - Delta)."""
        start_m, bh = _block_and_head(L, BLOCK_M)
        base = bh * L * D
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < L
        mask_d = offs_d < D
        q_ptrs = base + offs_m[:, None] * D + offs_d[None, :]
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * L + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, L, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < L
            kv_ptrs = base + cols[:, None] * D + offs_d[None, :]
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION) * (scale * LOG2E)
            p = tl.exp2(s - lse[:, None] * LOG2E)
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION)
        tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launch(kernel: str, q: Tensor) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, launch options) of one attention kernel for q's device and
    dtype: the per-target table in launch.py on a GPU; small blocks under the interpreter (its
    cost grows with the block area, not the parallelism)."""
    block_d = padded_head_dim(q.shape[-1])
    precision = dot_precision(q.dtype)
    if interpret_mode() and not q.is_cuda:
        return 16, 16, block_d, {"PRECISION": precision, "num_warps": 1}
    cfg = attention_config(kernel, q.shape[-1], precision, device_capability(q.device.index or 0))
    return cfg.block_m, cfg.block_n, block_d, {"PRECISION": precision, "num_warps": cfg.num_warps,
                                               "num_stages": cfg.num_stages}


def _forward(q, k, v, q_t, k_t, v_t, scale):
    """Host wrapper: contiguous inputs, allocate outputs, launch one program per query block."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # inputs come from transpose/unflatten
    B, H, L, D = q.shape
    with_tangent = q_t is not None
    o = torch.empty_like(q)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    if with_tangent:
        # tl.dot needs equal operand dtypes: tangents take their primal's dtype
        q_t, k_t, v_t = (t.contiguous().to(p.dtype) for t, p in ((q_t, q), (k_t, k), (v_t, v)))
        o_t = torch.empty_like(q)
    else:
        q_t = k_t = v_t = o_t = q  # never read: WITH_TANGENT=False compiles the tangent code out
    block_m, block_n, block_d, options = _launch("fwd_tangent" if with_tangent else "fwd", q)
    _attn_fwd_kernel[(triton.cdiv(L, block_m) * B * H,)](
        q, k, v, q_t, k_t, v_t, o, o_t, lse, L, D, scale,
        WITH_TANGENT=with_tangent, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **options)
    return o, (o_t if with_tangent else None), lse


# ---- custom ops: opaque to torch.compile, so the kernels (and the tangent) survive compilation ----

@torch.library.custom_op("stmd_fast::attention_bwd", mutates_args=())
def attention_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, grad_o: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of softmax(q k^T scale) v from the saved output and log-sum-exp."""
    q, k, v, grad_o = q.contiguous(), k.contiguous(), v.contiguous(), grad_o.contiguous()
    B, H, L, D = q.shape
    delta = (grad_o.float() * o.float()).sum(-1)  # Delta_i = rowsum(dO * O) = sum_j P_ij dP_ij
    grad_o = grad_o.to(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_m, block_n, block_d, options = _launch("bwd_dkdv", q)
    _attn_bwd_dkdv_kernel[(triton.cdiv(L, block_n) * B * H,)](
        q, k, v, grad_o, lse, delta, dk, dv, L, D, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **options)
    block_m, block_n, block_d, options = _launch("bwd_dq", q)
    _attn_bwd_dq_kernel[(triton.cdiv(L, block_m) * B * H,)](
        q, k, v, grad_o, lse, delta, dq, L, D, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **options)
    return dq, dk, dv


@attention_bwd.register_fake
def _(q, k, v, o, lse, grad_o, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


@torch.library.custom_op("stmd_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(o, lse): the output and the fp32 row log-sum-exp (B, H, L) that the backward needs."""
    o, _, lse = _forward(q, k, v, None, None, None, scale)
    return o, lse


@attention_fwd.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("stmd_fast::attention_dual", mutates_args=())
def attention_dual(q: Tensor, k: Tensor, v: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(o, o_t, lse): output, its tangent along (q_t, k_t, v_t), and the row log-sum-exp."""
    return _forward(q, k, v, q_t, k_t, v_t, scale)


@attention_dual.register_fake
def _(q, k, v, q_t, k_t, v_t, scale):
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    return o, torch.empty_like(o), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, lse = output[0], output[-1]
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = inputs[-1]
    # lse (and the tangent of attention_dual) carry no gradient (Mean Flow's target, which holds the
    # tangent, is stop-gradient): a backward through them alone is an error, beside other terms they add 0
    ctx.mark_non_differentiable(*output[1:])


def _backward_fwd(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    return *attention_bwd(q, k, v, o, lse, grad_o, ctx.scale), None


def _backward_dual(ctx, grad_o, grad_o_t, grad_lse):
    # gradient flows through the primal output only: the tangent is non-differentiable
    # (Mean Flow's target, which holds the tangent, is stop-gradient)
    q, k, v, o, lse = ctx.saved_tensors
    return *attention_bwd(q, k, v, o, lse, grad_o, ctx.scale), None, None, None, None


attention_fwd.register_autograd(_backward_fwd, setup_context=_setup)
attention_dual.register_autograd(_backward_dual, setup_context=_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Dispatch: Triton kernel when dispatch.use_triton(q), else attention_reference.

    Inside torch.func.jvp the dual numbers are unpacked and one custom op computes output and
    tangent together; a missing tangent (an input that is constant for the jvp) counts as zero.
    """
    if not use_triton(q):
        return attention_reference(q, k, v, scale)
    unsupported = attention_unsupported(q, k, v)
    if unsupported is not None:
        warn_fallback("attention", unsupported)
        return attention_reference(q, k, v, scale)
    q_p, q_t = split_dual(q)
    k_p, k_t = split_dual(k)
    v_p, v_t = split_dual(v)
    refuse_unsupported_transforms("attention")
    if q_t is None and k_t is None and v_t is None:
        return attention_fwd(q_p, k_p, v_p, float(scale))[0]
    q_t = torch.zeros_like(q_p) if q_t is None else q_t
    k_t = torch.zeros_like(k_p) if k_t is None else k_t
    v_t = torch.zeros_like(v_p) if v_t is None else v_t
    o, o_t, _ = attention_dual(q_p, k_p, v_p, q_t, k_t, v_t, float(scale))
    return make_dual(o, o_t)
