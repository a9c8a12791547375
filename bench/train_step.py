"""Train-step throughput, variants side by side in one run.

    python bench/train_step.py --preset cifar10 --method stmd     # on a GPU: all variants
    python bench/train_step.py --preset mnist --variants "eager fp32,compiled fp32"   # the CPU target
    python bench/train_step.py --smoke                              # tiny CPU version (CI)

Each variant times the trainer's own step (stmd_fast.engine.make_train_step: noise draw, loss
with its JVP, backward, AdamW, EMA) for the objective and for the plain flow-matching step of
the same network (no JVP), so "what the JVP costs" is a ratio measured in the same run.
Reports median ms/step, img/s, TFLOP/s and MFU (FLOPs of forward + tangent + backward counted
by torch.utils.flop_counter, against the bf16 matmul peak measured here), peak memory, and on
a GPU the median power and utilisation (nvidia-ml-py).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GpuTelemetry, environment, finish, measured_matmul_tflops, median, peak_memory_mb,  # noqa: E402
                    print_table, record, reset_peak_memory, time_ms)

from stmd_fast.config import PRESET_DATA_SHAPES, PRESETS  # noqa: E402
from stmd_fast.devices import resolve_device  # noqa: E402
from stmd_fast.kernels import dispatch  # noqa: E402
from stmd_fast.models import count_params  # noqa: E402
from stmd_fast.objectives import METHODS, compute_loss, draw_noise, flow_matching_loss  # noqa: E402
from stmd_fast.engine import make_train_step  # noqa: E402

# name -> (torch.compile, precision, kernel backend)
VARIANTS = {
    "eager fp32": (False, "fp32", "reference"),
    "compiled fp32": (True, "fp32", "reference"),
    "compiled bf16": (True, "bf16", "reference"),
    "compiled bf16 + triton": (True, "bf16", "triton"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESET_DATA_SHAPES), help="network and data shape")
    p.add_argument("--method", default="stmd", choices=sorted(METHODS))
    p.add_argument("--batch", type=int, default=None, help="batch size [default: the preset's]")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (triton needs CUDA) [default: all]")
    p.add_argument("--no-flow-matching", action="store_true", help="skip the flow-matching rows")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (the first one compiles)")
    p.add_argument("--iters", type=int, default=30, help="timed steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: gmm MLP, batch 16, 2+3 steps, not saved")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/<device>-<date>.json")
    return p


def count_step_flops(loss_fn, x0, noise) -> int:
    """FLOPs of one loss + backward (the tangent's matmuls included: forward AD runs aten ops too),
    counted on the PyTorch references: FlopCounterMode cannot see inside the Triton custom ops."""
    with dispatch.backend("reference"), FlopCounterMode(display=False) as counter:
        loss, _ = loss_fn(x0, noise)
        loss.backward()
    return counter.get_total_flops()


def run_variant(name, objective, cfg, data_shape, batch, device, args, peak_tflops, flops):
    compile_, precision, kernels = VARIANTS[name]
    torch.manual_seed(0)
    method = METHODS[cfg.method]
    net = method.build_net(cfg.net, data_shape).to(device)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    loss = compute_loss if objective == cfg.method else flow_matching_loss
    generator = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, *data_shape, device=device, generator=generator)
    key = (objective, cfg.method)
    if key not in flops:
        # counted eagerly in fp32 on 2 samples and scaled: matmul and convolution FLOPs are linear
        # in the batch, and the full batch of a large network would not fit in memory uncompiled
        few = min(2, batch)
        flops[key] = count_step_flops(partial(loss, cfg.method, net, cfg=cfg.objective), x0[:few],
                                      draw_noise(x0[:few], cfg.objective, generator)) * batch // few
        net.zero_grad(set_to_none=True)
    with dispatch.backend(kernels):
        if compile_:
            torch._dynamo.reset()  # each variant compiles afresh
        step = make_train_step(partial(loss, cfg.method, net, cfg=cfg.objective), net, optimizer, scheduler, ema,
                               compile_, precision, device)
        reset_peak_memory(device)
        with GpuTelemetry(device) as telemetry:
            times = time_ms(lambda: step(x0, draw_noise(x0, cfg.objective, generator)), device,
                            args.warmup, args.iters)
    ms = median(times)
    tflops = flops[key] / (ms * 1e-3) / 1e12
    return {"variant": name, "objective": objective if objective == cfg.method else "flow matching",
            "ms_per_step": ms, "img_per_s": batch / (ms * 1e-3), "tflops": tflops,
            "mfu_pct": 100 * tflops / peak_tflops, "peak_mem_mb": peak_memory_mb(device),
            "gflop_per_step": flops[key] / 1e9, **telemetry.summary()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.warmup, args.iters, args.device = "gmm", 16, 2, 3, "cpu"
        args.variants, args.no_save = "eager fp32,compiled fp32", True
    device = resolve_device(args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    if device.type != "cuda" and any(VARIANTS[v][2] == "triton" for v in names):
        print("note: skipping the triton variant: the kernels run on CUDA (on a CPU only in the tests' interpreter)")
        names = [v for v in names if VARIANTS[v][2] != "triton"]
    cfg = PRESETS[args.preset]()
    cfg.method = args.method
    data_shape = PRESET_DATA_SHAPES[args.preset]
    batch = args.batch or cfg.batch_size
    objectives = [args.method] + ([] if args.no_flow_matching or not METHODS[args.method].flow else ["flow matching"])

    env = environment(device)
    peak = measured_matmul_tflops(device, torch.bfloat16, quick=args.smoke)
    method = METHODS[args.method]
    n_params = count_params(method.build_net(cfg.net, data_shape))
    print(f"{env['device']} | torch {env['torch']} | {args.preset} {args.method} {n_params / 1e6:.2f}M params, "
          f"batch {batch} | measured bf16 matmul peak {peak:.1f} TFLOP/s")
    flops: dict = {}
    rows = []
    for name in names:
        for objective in objectives:
            rows.append(run_variant(name, objective, cfg, data_shape, batch, device, args, peak, flops))
            record(f"train_step/{args.preset}/{args.method}", rows[-1])
            print(f"  {name:>24} | {rows[-1]['objective']:>13} | {rows[-1]['ms_per_step']:.2f} ms/step", flush=True)
    for row in rows:  # speed-ups against the eager fp32 reference of the same objective
        base = next((r for r in rows if r["variant"] == "eager fp32" and r["objective"] == row["objective"]), None)
        row["speedup_vs_eager"] = base["ms_per_step"] / row["ms_per_step"] if base else None
        fm = next((r for r in rows if r["variant"] == row["variant"] and r["objective"] == "flow matching"), None)
        row["step_vs_flow_matching"] = (row["ms_per_step"] / fm["ms_per_step"]
                                        if fm and row["objective"] != "flow matching" else None)
    print()
    print_table(rows, ["variant", "objective", "ms_per_step", "img_per_s", "tflops", "mfu_pct", "peak_mem_mb",
                       "speedup_vs_eager", "step_vs_flow_matching", "power_w", "gpu_util_pct"])
    result = {"environment": env, "preset": args.preset, "method": args.method, "batch": batch,
              "params": n_params, "bf16_peak_tflops": peak, "warmup": args.warmup, "iters": args.iters,
              "rows": rows}
    finish(f"train_step/{args.preset}/{args.method}", result, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
