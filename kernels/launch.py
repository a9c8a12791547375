"""Launch settings per GPU target, and when a kernel cannot run at all (then the reference runs).

The attention kernels keep a (BLOCK_M x BLOCK_D) query tile, key/value tiles, and with the
tangent twice the accumulators; Triton stages the tiles in shared memory, num_stages deep.
What fits depends on the target's shared memory per block (opt-in maximum):

    sm_80 (A100) 163 KB    sm_86 / sm_89 / sm_120 (RTX 30xx / 40xx / 50xx) 99 KB    sm_90 (H100/H200) 227 KB

The table below picks blocks, warps and stages per (kernel, operand precision, shared-memory
class) for padded head dims up to 64. Every entry is compiled ahead of time for sm_80, 86, 89, 90 and 120
by tests/test_kernel_compile.py (python -m stmd_fast.kernels.compile_matrix prints the table),
which asserts that it fits the target's shared memory and spills at most SPILL_BUDGET.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

KB = 1024
# Opt-in shared memory per block (CUDA programming guide, "Technical Specifications per Compute
# Capability"); the compile-matrix test checks every configuration against these.
SMEM_LIMITS = {(8, 0): 163 * KB, (8, 6): 99 * KB, (8, 9): 99 * KB, (9, 0): 227 * KB, (12, 0): 99 * KB}
TARGETS = tuple(SMEM_LIMITS)
MAX_HEAD_DIM = 64  # padded head dims 16..64 (every preset); wider heads run the reference

# Register spills allowed per thread, in bytes of spill stores (ptxas -v). Why these: a spill
# goes to local memory through L1, so a few dozen bytes in a loop body cost little next to the
# tile loads, while kilobytes mean the tile does not fit the register file and the kernel is
# slow. bf16, TF32 and the elementwise kernels: at most 64 bytes. tf32x3 (the fp32-accurate
# default for fp32 inputs) does three MMAs per product on split operands and holds both halves
# of every tile: up to 1 KB (it is the accuracy mode; TF32 and bf16 are the fast ones).
SPILL_BUDGET = 64
SPILL_BUDGET_TF32X3 = 1024


def spill_budget(precision: str) -> int:
    return SPILL_BUDGET_TF32X3 if precision == "tf32x3" else SPILL_BUDGET


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _smem_class(capability: tuple[int, int]) -> str:
    """"large" for 163 KB and more (sm_80, sm_90), "small" otherwise (99 KB or unknown)."""
    return "large" if SMEM_LIMITS.get(tuple(capability), 0) >= 163 * KB else "small"


# (kernel, precision, padded head dim <= 64) -> {shared-memory class: Config}.
# kernel: "fwd" (forward, also sampling), "fwd_tangent" (forward with the JVP tangent),
# "bwd_dkdv" and "bwd_dq" (the backward). precision: the operands' tl.dot precision. Heads wider
# than 64 (DiT-XL's 72) have no entry: with the tangent, no 4-warp tiling we compiled at 128
# kept spills under budget on every target, so they run the reference. Chosen from ptxas reports of the compile matrix: 4 warps
# (8 made ptxas spill kilobytes on sm_80), tiles whose fp32 accumulators fit the registers.
_ATTENTION = {
    ("fwd", "bf16", 64): {"small": Config(64, 64, 4, 3), "large": Config(64, 64, 4, 3)},
    ("fwd", "tf32", 64): {"small": Config(32, 32, 4, 2), "large": Config(32, 32, 4, 2)},
    ("fwd", "tf32x3", 64): {"small": Config(64, 32, 4, 2), "large": Config(64, 32, 4, 3)},
    ("fwd_tangent", "bf16", 64): {"small": Config(32, 32, 4, 2), "large": Config(32, 32, 4, 2)},
    ("fwd_tangent", "tf32", 64): {"small": Config(32, 32, 4, 2), "large": Config(32, 32, 4, 2)},
    ("fwd_tangent", "tf32x3", 64): {"small": Config(16, 32, 4, 2), "large": Config(16, 32, 4, 2)},
    ("bwd_dkdv", "bf16", 64): {"small": Config(32, 64, 4, 2), "large": Config(32, 64, 4, 2)},
    ("bwd_dkdv", "tf32", 64): {"small": Config(32, 64, 4, 2), "large": Config(32, 64, 4, 2)},
    ("bwd_dkdv", "tf32x3", 64): {"small": Config(32, 32, 4, 2), "large": Config(32, 32, 4, 2)},
    ("bwd_dq", "bf16", 64): {"small": Config(64, 64, 4, 2), "large": Config(64, 64, 4, 2)},
    ("bwd_dq", "tf32", 64): {"small": Config(64, 32, 4, 2), "large": Config(64, 32, 4, 2)},
    ("bwd_dq", "tf32x3", 64): {"small": Config(32, 32, 4, 2), "large": Config(64, 32, 4, 2)},
}
ATTENTION_KERNELS = ("fwd", "fwd_tangent", "bwd_dkdv", "bwd_dq")
PRECISIONS = ("bf16", "tf32", "tf32x3")


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: tl.dot needs dimensions >= 16 and powers of two; masked loads pad the rest."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies the operands of a `dtype` attention.

    16-bit inputs: "bf16" (their own tensor-core MMA, fp32 accumulation). fp32 inputs follow
    torch's fp32 matmul setting, as the reference's matmuls (cuBLAS) do: TF32 ("tf32", 10-bit
    mantissa) once the user allows it (torch.backends.cuda.matmul.fp32_precision = "tf32", as
    --tf32 does, or torch.set_float32_matmul_precision("high")); otherwise "tf32x3", three TF32
    MMAs on operands split into high and low halves, which keeps fp32 accuracy on tensor cores
    (plain fp32 FMAs, "ieee", spill kilobytes per thread and are several times slower).
    """
    if dtype != torch.float32:
        return "bf16"
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:  # torch < 2.9: only the legacy setting exists
        return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    # torch >= 2.9: once the per-backend setting is used, reading the legacy one raises
    if matmul == "none":  # not set for matmuls: the process-wide default decides
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if matmul in ("tf32", "bf16") else "tf32x3"


def attention_config(kernel: str, head_dim: int, precision: str, capability: tuple[int, int]) -> Config:
    """Blocks, warps and stages of one attention kernel on a target (what the host wrappers launch)."""
    block_d = padded_head_dim(head_dim)
    assert block_d <= MAX_HEAD_DIM, f"head dim {head_dim}: wider than the kernel's {MAX_HEAD_DIM}"
    return _ATTENTION[(kernel, precision, MAX_HEAD_DIM)][_smem_class(capability)]


_capabilities: dict[int, tuple[int, int]] = {}


@torch.compiler.assume_constant_result
def device_capability(index: int) -> tuple[int, int]:
    """The GPU's compute capability, read once per device (every attention launch asks); under torch.compile a
    constant of the graph, not traced into (Dynamo warned on every compiled run when it traced the lru_cache
    this had)."""
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def attention_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the attention kernel cannot run on q, k, v (then the reference does), or None."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:  # the kernel indexes all three as q
        return (f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (the kernel takes self-attention: "
                f"three (B, H, L, D) tensors of one shape)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (the kernel takes three of one dtype)"
    if q.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {q.dtype} (the kernel takes float32 and bfloat16)"
    if not q.is_cuda and q.dtype != torch.float32:  # TRITON_INTERPRET on the CPU
        return f"dtype {q.dtype} in Triton's interpreter (its bfloat16 dot products are wrong; float32 only)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (the kernel takes up to {MAX_HEAD_DIM})"
    if q.is_cuda and device_capability(q.device.index or 0) < (8, 0):
        return f"compute capability {device_capability(q.device.index or 0)} (bf16/TF32 tensor cores need sm_80+)"
    return None


_warned: set[str] = set()


def warn_fallback(op: str, reason: str) -> None:
    """Say once per (op, reason) that the PyTorch reference runs instead of a kernel."""
    message = f"stmd_fast.kernels: {op} runs the PyTorch reference for {reason}"
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# Inside torch.compile the warning is replayed after the graph runs instead of breaking it
# (fullgraph=True would otherwise fail on warnings.warn).
torch._dynamo.config.reorderable_logging_functions.add(warn_fallback)
