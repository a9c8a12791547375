"""Each Triton kernel against its PyTorch reference, eager and fused by Inductor (torch.compile).

    python bench/kernels.py            # on a GPU: all three implementations per kernel
    python bench/kernels.py --smoke    # tiny CPU version (CI): references only

Two times per row: `ms`, the wall time of a call (synchronised; what it costs as called, host work
included: eager torch.func.jvp runs Python decompositions), and on CUDA `kernel_ms`, the GPU time
of the kernels it launches (torch.profiler). Rates come from kernel_ms where there is one: the two
memory-bound kernels in GB/s of the bytes they must move at least (inputs read once, outputs
written once) and as a share of the device's measured copy bandwidth; attention in TFLOP/s of its
useful matmuls. The Inductor rows compile each case afresh for its fixed shapes. The kernels run
on CUDA only: on a CPU their rows are skipped.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (apply_smoke, at_least, environment, finish, kernel_ms, measured_copy_gbps, median,  # noqa: E402
                    parser, print_table, record, time_ms)

from stmd_fast.cli import one_line_errors  # noqa: E402
from stmd_fast.devices import resolve_device  # noqa: E402
from stmd_fast.engine import remove_interrupted_compiles  # noqa: E402
from stmd_fast.kernels import dispatch  # noqa: E402
from stmd_fast.kernels.attention import attention, attention_reference  # noqa: E402
from stmd_fast.kernels.meanflow_loss import meanflow_loss, meanflow_loss_reference  # noqa: E402
from stmd_fast.kernels.time_embedding import time_features, time_features_reference  # noqa: E402


def time_features_case(device, size):
    """Features and tangent of (t, t - r, s) for a batch: the JVP's time embedding."""
    batch, freqs = size
    times = torch.rand(batch, 3, device=device)
    tangent = torch.tensor([1.0, 1.0, 0.0], device=device).expand(batch, 3).contiguous()

    def make(fn):
        return lambda: torch.func.jvp(lambda x: fn(x, freqs, 10.0), (times,), (tangent,))

    moved = (2 * times.numel() + 2 * batch * 3 * freqs) * 4  # read times + tangent, write both outputs
    return {"reference": make(time_features_reference), "kernel": make(time_features)}, {"bytes": moved}


def meanflow_loss_case(device, size):
    """Target, adaptive loss and d loss / d u for a batch of images (forward + backward)."""
    batch, dims = size
    u = torch.randn(batch, dims, device=device, requires_grad=True)
    dudt, v = torch.randn(batch, dims, device=device), torch.randn(batch, dims, device=device)
    h = torch.rand(batch, device=device)

    def make(fn):
        def run():
            loss, _ = fn(u, dudt, v, h, 1e-3, 1.0)
            return torch.autograd.grad(loss, u)
        return run

    moved = 4 * u.numel() * 4  # read u, du/dt, v; write the gradient
    return {"reference": make(meanflow_loss_reference), "kernel": make(meanflow_loss)}, {"bytes": moved}


def attention_case(device, size, backward: bool, dtype=torch.bfloat16):
    """Attention forward with its tangent (the JVP pass), and with `backward` the backward of the primal."""
    batch, heads, length, dim = size
    dtype = dtype if device.type == "cuda" else torch.float32
    q, k, v, q_t, k_t, v_t = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype) for _ in range(6))
    for x in (q, k, v):
        x.requires_grad_()
    scale = dim**-0.5

    def make(fn):
        def run():
            o, o_t = torch.func.jvp(lambda a, b, c: fn(a, b, c, scale), (q, k, v), (q_t, k_t, v_t))
            return torch.autograd.grad(o, (q, k, v), o_t.detach()) if backward else o_t
        return run

    # useful matmuls per head: primal 2 (4 L^2 d), tangent 4 (8 L^2 d), backward 4 (8 L^2 d; a flash
    # backward also recomputes Q K^T, which is not counted: the rate is of the work, not of how it is done)
    flops = batch * heads * (20 if backward else 12) * length**2 * dim
    return {"reference": make(attention_reference), "kernel": make(attention)}, {"flops": flops}


# attention (batch, heads, L, head dim): the cifar10 U-Net's at 16x16 (batch 128, 256 channels in
# heads of 8), DiT-M/2's on 4x32x32 latents (batch 64), and DiT-M/2's at 1024 tokens (64x64 latents)
ATTENTION_SIZES = {"U-Net cifar10": (128, 32, 256, 8), "DiT-M/2 L256": (64, 16, 256, 64),
                   "DiT-M/2 L1024": (16, 16, 1024, 64)}
CASES = {  # name -> (builder, full size, smoke size)
    "time_features (jvp)": (time_features_case, (65536, 256), (64, 32)),
    # 2 GB moved: at 256 x 4 x 32 x 32 (16 MB) the H200 run timed launches and autograd, not bandwidth
    "meanflow_loss (fwd+bwd)": (meanflow_loss_case, (8192, 4 * 64 * 64), (8, 256)),
    **{f"attention jvp, {shape}": (partial(attention_case, backward=False), size, (2, 2, 16, 16))
       for shape, size in ATTENTION_SIZES.items()},
    **{f"attention jvp+bwd, {shape}": (partial(attention_case, backward=True), size, (2, 2, 16, 16))
       for shape, size in ATTENTION_SIZES.items()},
}


@one_line_errors(ValueError)  # e.g. --device cuda on a machine without one: one line, exit code 2
def main(argv=None) -> int:
    p = parser("kernels.py", __doc__)
    p.add_argument("--device", default="auto", help="auto: cuda when there is one, else cpu")
    p.add_argument("--warmup", type=at_least(1), default=5, help="untimed calls per kernel and implementation (at "
                   "least 1: the first call compiles and autotunes)")
    p.add_argument("--iters", type=at_least(1), default=30, help="timed calls per kernel and implementation")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run, references only, 1 + 3 calls, not saved "
                   "(it sets --device, --warmup and --iters itself)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/<device>-<date>.json")
    args = p.parse_args(argv)
    apply_smoke(p, argv, args, {"device": "cpu", "warmup": 1, "iters": 3, "no_save": True})
    device = resolve_device(args.device)
    env = environment(device)
    copy_gbps = measured_copy_gbps(device, quick=args.smoke)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | measured copy {copy_gbps:.0f} GB/s")
    if device.type != "cuda":
        print("note: no CUDA device: the Triton rows are skipped (the tests run the kernels in the interpreter)")
    if args.smoke:  # the names keep the full run's shapes; the size column gives the one timed
        print("smoke: every case at a tiny size (the size column), not the shape its name gives")
    rows = []
    remove_interrupted_compiles()  # a compile stopped earlier would fail every later one
    for name, (builder, full_size, smoke_size) in CASES.items():
        size = smoke_size if args.smoke else full_size
        fns, work = builder(device, size)
        # every case's functions share their code: without a reset and dynamic=False, Dynamo would compile the
        # second case's shapes as symbolic (automatic dynamic shapes), a slower graph than a user's fixed one
        torch._dynamo.reset()
        # the kernel first: gpu_check gives this benchmark a budget that can end it mid-case, and the kernel's
        # rows are what it is for (the Inductor rows compile first, which takes longest)
        impls = {"triton kernel": ("triton", fns["kernel"])} if device.type == "cuda" else {}
        impls.update({"eager reference": ("reference", fns["reference"]),
                      "inductor (compiled reference)": ("reference", torch.compile(fns["reference"], dynamic=False))})
        for impl, (backend, fn) in impls.items():
            with dispatch.backend(backend):
                ms = median(time_ms(fn, device, args.warmup, args.iters))
                on_gpu = kernel_ms(fn, device, args.iters)
            row = {"kernel": name, "impl": impl, "size": list(size), "ms": ms,
                   "kernel_ms": on_gpu}
            rate_ms = on_gpu or ms
            if "bytes" in work:
                row["gb_per_s"] = work["bytes"] / (rate_ms * 1e-3) / 1e9
                row["pct_of_copy"] = 100 * row["gb_per_s"] / copy_gbps
            else:
                row["tflops"] = work["flops"] / (rate_ms * 1e-3) / 1e12
            rows.append(row)
            record("kernels", row)
            on_gpu_text = "" if on_gpu is None else f", kernels {on_gpu:.3f} ms"
            print(f"  {name:>32} | {impl:>29} | {'x'.join(map(str, size))} | {ms:.3f} ms{on_gpu_text}", flush=True)
    for row in rows:  # the kernel against Inductor's fusion of the reference, measured in the same run
        inductor = next(r for r in rows if r["kernel"] == row["kernel"] and r["impl"].startswith("inductor"))
        row["speedup_vs_inductor"] = inductor["ms"] / row["ms"]
        both = row["kernel_ms"] and inductor["kernel_ms"]
        row["kernel_speedup_vs_inductor"] = inductor["kernel_ms"] / row["kernel_ms"] if both else None
    print()
    print_table(rows, ["kernel", "impl", "size", "ms", "kernel_ms", "gb_per_s", "pct_of_copy", "tflops", "speedup_vs_inductor",
                       "kernel_speedup_vs_inductor"])
    finish("kernels", {"environment": env, "copy_gbps": copy_gbps, "rows": rows}, save=not args.no_save)
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
