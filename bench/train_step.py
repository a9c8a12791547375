"""Train-step throughput, variants side by side in one run.

    python bench/train_step.py --preset cifar10 --method stmd     # on a GPU: all variants
    python bench/train_step.py --preset mnist --variants "compiled fp32,public recipe"   # the CPU targets
    python bench/train_step.py --smoke                              # tiny CPU version (CI)

Each stmd_fast variant times the trainer's own step (stmd_fast.engine.make_train_step: noise
draw, loss with its JVP on the r < t rows, backward, fused AdamW, EMA) for the objective and
for the plain flow-matching step of the same network (no JVP), so "what the JVP costs" is a
ratio measured in the same run. The "public recipe" variants time the official PyTorch Mean
Flow code's engine (Gsunshine/py-meanflow) on the same network, noise and loss:
torch.compile around loss + backward (a graph break at backward), the JVP over the whole
batch, the default (unfused) optimizer, and an EMA updated every 16 steps by a per-parameter
float64 loop with decay^16 (timed apart and added as 1/16 of its cost per step, so the medians
of both engines count their EMA); its JVP and loss run in fp32 (autocast off), so it has one
variant, and a bf16 row's speed-up over it includes what bf16 gains (each row names its precision).
fp32 on CUDA runs its matmuls in TF32 unless --no-tf32, as the trainer (--tf32) and the official code do.
By default the variants are interleaved step by step (round robin, after every variant's
warm-up), so the load of a shared machine hits them alike; --sequential runs each variant's
steps back to back (what per-variant GPU power and utilisation need).
Reports median ms/step, img/s, TFLOP/s and MFU (FLOPs of forward + tangent + backward counted
by torch.utils.flop_counter, against the matmul peak measured here for the row's compute: bf16,
TF32 or fp32; none with --smoke, whose tiny CPU run cannot measure a peak, nor for a rate above
the measured peak; on a GPU whose data sheet is known, also against its dense peak, the usual
MFU), peak memory, the objective / flow-matching ratio, the speed-up over the public recipe, on a
GPU (with --sequential) the median power and utilisation (nvidia-ml-py; none for timed steps under
a second, NVML's averaging window), and each variant's mean
loss and mean squared error over its first and last few steps on the fixed batch (finite: the step
ran; the batch is random noise, not data, so they need not fall; the error, where the adaptive loss
is about 1 by design, p = 1).
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GpuTelemetry, apply_smoke, at_least, environment, finish, matmul_compute, parse_variants,  # noqa: E402
                    measured_matmul_tflops, median, parser, peak_memory_mib, print_table, record, reset_peak_memory,
                    spec_tflops, synchronize, time_ms, time_ms_interleaved)

from stmd_fast.cli import one_line_errors  # noqa: E402
from stmd_fast.config import PRESET_DATA_SHAPES, PRESETS  # noqa: E402
from stmd_fast.devices import resolve_device, use_tf32  # noqa: E402
from stmd_fast.engine import make_optimizer, make_train_step, remove_interrupted_compiles  # noqa: E402
from stmd_fast.kernels import dispatch  # noqa: E402
from stmd_fast.models import count_params, dit_config  # noqa: E402
from stmd_fast.objectives import METHODS, compute_loss, draw_noise, flow_matching_loss  # noqa: E402


@dataclass(frozen=True)
class Variant:
    compile: bool
    precision: str
    kernels: str  # the kernel backend (stmd_fast.kernels.dispatch)
    public: bool = False  # the public Mean Flow recipe's engine instead of ours


VARIANTS = {
    "eager fp32": Variant(False, "fp32", "reference"),
    "compiled fp32": Variant(True, "fp32", "reference"),
    "compiled bf16": Variant(True, "bf16", "reference"),
    "compiled bf16 + triton": Variant(True, "bf16", "triton"),
    "public recipe": Variant(True, "fp32", "reference", public=True),  # its JVP runs in fp32 even under bf16
}
PUBLIC_EMA_PERIOD = 16  # the public recipe updates its EMA every 16 steps, with decay^16
SMOKE = {"preset": "gmm", "batch": 16, "warmup": 2, "iters": 3, "device": "cpu",
         "variants": "eager fp32,compiled fp32,public recipe", "no_save": True}


def build_parser():
    p = parser("train_step.py", __doc__)
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESET_DATA_SHAPES), help="network and data shape")
    p.add_argument("--method", default="stmd", choices=sorted(METHODS), help="the objective timed (beside "
                   "plain flow matching)")
    p.add_argument("--batch", type=at_least(1), default=None, help="batch size [default: the preset's]")
    p.add_argument("--dit", default=None, metavar="NAME", help="a DiT of the registry (DiT-B/2, DiT-M/2, ...) "
                   "instead of the preset's network [default: the preset's]")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (triton needs CUDA) [default: all]")
    p.add_argument("--no-flow-matching", action="store_true", help="skip the flow-matching rows")
    p.add_argument("--flow-matching-only", action="store_true", help="only the flow-matching rows")
    p.add_argument("--compile-only", action="store_true", help="run each variant's first step (compiling it into "
                   "Inductor's on-disk cache) and stop, timing nothing: bench/gpu_check.py starts these in the "
                   "background so that its stages find their graphs compiled")
    p.add_argument("--sequential", action="store_true", help="time each variant right after its warm-up, steps "
                   "back to back (GPU power and utilisation per variant), and record its row at once (a run cut "
                   "short keeps the rows measured before the cut), instead of interleaving the variants step by step")
    p.add_argument("--warmup", type=at_least(1), default=10, help="untimed steps, at least 1 (the first one "
                   "compiles; its time is reported as first_step_s)")
    p.add_argument("--iters", type=at_least(1), default=30, help="timed steps")
    p.add_argument("--device", default="auto", help="auto: cuda when there is one, else cpu")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="on CUDA, fp32 matmuls "
                   "and convolutions in TF32, as the trainer's --tf32 and the official code [on by default]")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: gmm MLP, batch 16, 2+3 steps, eager, "
                   "compiled and public recipe, not saved (it sets those flags itself)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/<device>-<date>.json")
    p.add_argument("--compile-report", action="store_true", help="print where the compile time went (Dynamo, "
                   "AOTAutograd, Inductor's phases; torch._dynamo.utils.compile_times) at the end")
    return p


def count_step_flops(loss_fn, x0, noise) -> int:
    """FLOPs of one loss + backward (the tangent's matmuls included: forward AD runs aten ops too),
    counted on the PyTorch references: FlopCounterMode cannot see inside the Triton custom ops."""
    with dispatch.backend("reference"), FlopCounterMode(display=False) as counter:
        loss, _ = loss_fn(x0, noise)
        loss.backward()
    return counter.get_total_flops()


def public_recipe_step(loss_fn, net, optimizer, scheduler, ema_net, ema_decay: float):
    """The official PyTorch Mean Flow code's step, rebuilt on our network and loss: torch.compile
    around loss + backward (Dynamo breaks the graph at backward and compiles both sides), then the
    optimizer and the lr schedule; and its EMA (float64, per parameter), which it runs every
    PUBLIC_EMA_PERIOD steps, as a function apart: a median over steps would drop it, so main times
    it and adds 1/PUBLIC_EMA_PERIOD of it to each step."""
    def loss_and_backward(x0, noise):
        loss, error = loss_fn(x0, noise)
        loss.backward()
        return loss.detach(), error

    compiled = torch.compile(loss_and_backward)
    decay = ema_decay ** PUBLIC_EMA_PERIOD

    def step(x0, noise):
        optimizer.zero_grad(set_to_none=True)
        loss, error = compiled(x0, noise)
        optimizer.step()
        scheduler.step()
        return loss, error

    @torch.no_grad()
    def ema_update():
        for p, q in zip(net.parameters(), ema_net.parameters()):
            q.copy_((q.double() + (1 - decay) * (p.double() - q.double())).float())

    return step, ema_update


def build_runner(name, objective, cfg, data_shape, batch, device):
    """A zero-argument callable running one training step of the variant (noise drawn inside)."""
    variant = VARIANTS[name]
    torch.manual_seed(0)
    method = METHODS[cfg.method]
    net = method.build_net(cfg.net, data_shape).to(device)
    scheduler_fn = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)  # noqa: E731
    generator = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, *data_shape, device=device, generator=generator)
    if variant.public:
        loss_fn = partial(compute_loss, cfg.method, net, cfg=cfg.objective, full_batch_jvp=True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        ema_net = method.build_net(cfg.net, data_shape).to(device)
        ema_net.load_state_dict(net.state_dict())
        step, ema_update = public_recipe_step(loss_fn, net, optimizer, scheduler_fn(optimizer), ema_net,
                                              cfg.ema_decay)
    else:
        loss = compute_loss if objective == cfg.method else flow_matching_loss
        loss_fn = partial(loss, cfg.method, net, cfg=cfg.objective)
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        optimizer = make_optimizer(net, cfg.lr, cfg.weight_decay)
        step = make_train_step(loss_fn, net, optimizer, scheduler_fn(optimizer), ema, cfg.ema_decay,
                               variant.compile, variant.precision, device)
        ema_update = None  # in the step

    losses = []  # every step's (loss, error), kept on the device (no sync inside the timed steps)

    def run():
        with dispatch.backend(variant.kernels):
            loss, error = step(x0, draw_noise(x0, cfg.objective, generator))
        losses.append(torch.stack([loss.detach().float(), error.detach().float()]))
        return loss, error

    return run, loss_fn, net, x0, losses, ema_update


def loss_summary(losses: list[torch.Tensor]) -> dict:
    """Finite? The mean loss and mean squared error (the adaptive loss is about 1 by design
    at p = 1) of the first and the last few steps on the fixed batch x0."""
    values = torch.stack(losses).cpu()
    few = max(1, min(3, len(values) // 3))
    first, last = values[:few].mean(0).tolist(), values[-few:].mean(0).tolist()
    return {"loss_first": first[0], "loss_last": last[0], "error_first": first[1], "error_last": last[1],
            "loss_finite": bool(torch.isfinite(values).all()), "loss_steps": len(values)}


def add_rates(row: dict, times: list[float], batch: int, peak: float | None, spec: float | None = None,
              extra_ms: float = 0.0) -> None:
    """ms/step (the median plus `extra_ms`: work the variant does every few steps, per step), img/s,
    TFLOP/s and MFU against `peak` (the measured matmul peak of the row's compute, TFLOP/s; None: not
    measured, no MFU) and against `spec` (the data sheet's; None: unknown). A step faster than the
    measured peak means the peak was under-measured: its MFU is not reported, with a warning."""
    ms = median(times) + extra_ms
    tflops = row["gflop_per_step"] * 1e9 / (ms * 1e-3) / 1e12
    mfu = None if peak is None else 100 * tflops / peak
    if mfu is not None and mfu > 100:
        print(f"warning: {row['variant']} | {row['objective']} ran at {tflops:.3g} TFLOP/s, above the measured "
              f"{row['compute']} matmul peak of {peak:.3g} TFLOP/s: the peak was under-measured, so no MFU is "
              f"reported", flush=True)
        mfu = None
    row.update(ms_per_step=ms, img_per_s=batch / (ms * 1e-3), tflops=tflops, mfu_pct=mfu,
               mfu_spec_pct=None if spec is None else 100 * tflops / spec)


def mfu_text(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{mfu:.1f}%"


@one_line_errors(ValueError)  # e.g. an unknown --dit, --device cuda without one: one line, exit code 2
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    apply_smoke(p, argv, args, SMOKE)
    device = resolve_device(args.device)
    use_tf32(args.tf32)  # as the trainer sets it (its --tf32 is on by default): the same fp32 on CUDA
    names = parse_variants(p, args.variants, VARIANTS)
    if args.no_flow_matching and args.flow_matching_only:
        p.error("--no-flow-matching and --flow-matching-only exclude each other: keep one")
    dropped = []  # why a variant given is not timed, for the error if none is left
    if device.type != "cuda" and any(VARIANTS[v].kernels == "triton" for v in names):
        print("note: skipping the triton variant: the kernels run on CUDA (on a CPU only in the tests' interpreter)")
        names = [v for v in names if VARIANTS[v].kernels != "triton"]
        dropped.append("the triton variant needs CUDA")
    cfg = PRESETS[args.preset]()
    cfg.method = args.method
    data_shape = PRESET_DATA_SHAPES[args.preset]
    if args.dit:
        if args.smoke:  # its preset is the gmm MLP's, set by --smoke: not a preset the user gave
            p.error("--smoke times the gmm MLP, which --dit would replace: drop --dit, or drop --smoke")
        if len(data_shape) != 3:
            images = [name for name, shape in PRESET_DATA_SHAPES.items() if len(shape) == 3]
            p.error(f"--dit takes images or latents, and --preset {args.preset} has vectors: use one of "
                    f"{', '.join(images)}")
        cfg.net = dit_config(args.dit)
    batch = cfg.batch_size if args.batch is None else args.batch
    k, block = cfg.objective.jvp_block
    if METHODS[args.method].flow and batch % block:  # the JVP runs on k rows of every block: whole blocks
        near = [n for n in (batch // block * block, (batch // block + 1) * block) if n >= 1]
        p.error(f"--batch {batch}: the {args.preset} preset's objective runs the JVP on {k} of every {block} rows, "
                f"so the batch must be a multiple of {block}, e.g. {' or '.join(map(str, near))}")
    if not METHODS[args.method].flow and any(VARIANTS[v].public for v in names):
        names = [v for v in names if not VARIANTS[v].public]  # the public recipe is a Mean Flow engine
        dropped.append(f"the public recipe is a Mean Flow engine, and --method {args.method} has no JVP")
    fm = [] if args.no_flow_matching or not METHODS[args.method].flow else ["flow matching"]
    runs = [(name, objective) for name in names for objective in [args.method] + ([] if VARIANTS[name].public else fm)]
    if args.flow_matching_only:
        runs = [run for run in runs if run[1] == "flow matching"]
        dropped.append("--flow-matching-only keeps the flow-matching rows, and "
                       + ("the public recipe has none" if METHODS[args.method].flow else
                          f"--method {args.method} has none (its own step has no JVP to compare with)"))
    if not runs:  # before the peak is measured: nothing of a GPU's time goes to a run that times nothing
        p.error(f"nothing to time with --variants {args.variants!r} and --method {args.method}: "
                f"{'; '.join(dropped)}. Give other --variants (or drop --flow-matching-only)")

    method = METHODS[args.method]
    n_params = count_params(method.build_net(cfg.net, data_shape))  # a network that cannot be built says so here
    if device.type == "cpu" and n_params > 5e6 and not args.compile_only:
        print(f"note: timing the {n_params / 1e6:.0f}M-parameter {args.preset} network at batch {batch} on a CPU: "
              f"each step takes seconds to minutes and the whole run can take hours; --smoke, or --preset digits, "
              f"runs in minutes", file=sys.stderr, flush=True)
    env = environment(device)
    gpu = env["device"] if device.type == "cuda" else None  # its data-sheet peak, where known
    # --smoke: a matmul small enough for CI undershoots the peak (MFUs of 500%): no peak, no MFU;
    # --compile-only times nothing
    computes = sorted({matmul_compute(device, VARIANTS[name].precision) for name, _ in runs})
    peaks = {} if args.smoke or args.compile_only else {
        compute: measured_matmul_tflops(device, torch.bfloat16 if compute == "bf16" else torch.float32)
        for compute in computes}
    peak_text = ", ".join(f"measured {c} matmul peak {t:.3g} TFLOP/s" for c, t in peaks.items()) or "no MFU"
    print(f"{env['device']} | torch {env['torch']} | {args.preset} {args.method} {n_params / 1e6:.2f}M params, "
          f"batch {batch} | {peak_text} | "
          + ("compile only: one step per variant" if args.compile_only else
             f"{'sequential' if args.sequential else 'interleaved'}, {args.warmup} + {args.iters} steps"))
    torch._dynamo.reset()
    remove_interrupted_compiles()  # a compile stopped earlier would fail every later one
    torch._dynamo.config.recompile_limit = 64  # every variant's compiled loss stays live for the interleaving
    flops, runners, rows, losses, ema_ms = {}, {}, {}, {}, {}
    for key in runs:  # build, count FLOPs, warm up (compiles): one variant after another
        name, objective = key
        base_mib = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        reset_peak_memory(device)
        run, loss_fn, net, x0, losses[key], ema_update = build_runner(name, objective, cfg, data_shape, batch, device)
        if args.compile_only:
            began = time.perf_counter()
            run()
            synchronize(device)
            cached = ", its graphs now in Inductor's cache" if VARIANTS[name].compile else " (eager: nothing compiled)"
            print(f"  {name} | {objective}: first step {time.perf_counter() - began:.1f} s{cached}", flush=True)
            continue
        flop_key = (objective, VARIANTS[name].public)
        if flop_key not in flops:
            # counted eagerly in fp32 on one block of rows (cfg.objective.jvp_block, 4 by default) and
            # scaled: matmul and convolution FLOPs are linear in the batch, and the full batch of a
            # large network would not fit in memory uncompiled
            # (its noise from a generator of its own: every variant's steps then see the same draws)
            few = min(cfg.objective.jvp_block[1], batch)
            counting = torch.Generator(device).manual_seed(1)
            flops[flop_key] = count_step_flops(loss_fn, x0[:few], draw_noise(x0[:few], cfg.objective, counting)) \
                * batch // few
            net.zero_grad(set_to_none=True)
        print(f"  warming up {name} | {objective}{' (the first step compiles)' if VARIANTS[name].compile else ''}",
              flush=True)
        began = time.perf_counter()
        run()
        synchronize(device)
        first_step_s = time.perf_counter() - began  # compile included: what a user waits for once per run
        for _ in range(args.warmup - 1):
            run()
        synchronize(device)
        compute = matmul_compute(device, VARIANTS[name].precision)
        rows[key] = {"variant": name, "objective": objective, "precision": VARIANTS[name].precision,
                     "compute": compute, "peak_mem_mib": peak_memory_mib(device, since_mib=base_mib),
                     "gflop_per_step": flops[flop_key] / 1e9, "first_step_s": first_step_s}
        runners[key] = run
        if ema_update is not None:  # the public recipe's EMA, every PUBLIC_EMA_PERIOD steps: its share per step
            rows[key]["ema_ms_per_update"] = median(time_ms(ema_update, device, 1, 5))
        ema_ms[key] = rows[key].get("ema_ms_per_update", 0.0) / PUBLIC_EMA_PERIOD
        print(f"  warmed up {name} | {objective}: first step {first_step_s:.1f} s", flush=True)
        if args.sequential:
            with GpuTelemetry(device) as telemetry:
                add_rates(rows[key], time_ms(run, device, 0, args.iters), batch, peaks.get(compute),
                          spec_tflops(gpu, compute), ema_ms[key])
            rows[key].update(telemetry.summary(), **loss_summary(losses[key]))
            record(f"train_step/{args.preset}/{args.method}/measured", rows[key])
            print(f"  {name} | {objective}: {rows[key]['ms_per_step']:.2f} ms/step, "
                  f"{rows[key]['img_per_s']:.0f} img/s, MFU {mfu_text(rows[key]['mfu_pct'])}", flush=True)
    if args.compile_only:
        return 0
    if not args.sequential:
        for key, times in time_ms_interleaved(runners, device, args.iters).items():
            add_rates(rows[key], times, batch, peaks.get(rows[key]["compute"]),
                      spec_tflops(gpu, rows[key]["compute"]), ema_ms[key])
            rows[key].update(loss_summary(losses[key]))
    rows = list(rows.values())
    for row in rows:
        same = lambda name: next((r for r in rows if r["variant"] == name and r["objective"] == row["objective"]),  # noqa: E731
                                 None)
        base = same("eager fp32")
        row["speedup_vs_eager"] = base["ms_per_step"] / row["ms_per_step"] if base else None
        fm_row = next((r for r in rows if r["variant"] == row["variant"] and r["objective"] == "flow matching"), None)
        row["step_vs_flow_matching"] = (row["ms_per_step"] / fm_row["ms_per_step"]
                                        if fm_row and row["objective"] != "flow matching" else None)
        public = same("public recipe")
        row["speedup_vs_public"] = (public["ms_per_step"] / row["ms_per_step"]
                                    if public and not VARIANTS[row["variant"]].public else None)
        record(f"train_step/{args.preset}/{args.method}", row)
    print()
    print_table(rows, ["variant", "objective", "compute", "ms_per_step", "img_per_s", "tflops", "mfu_pct",
                       "mfu_spec_pct", "peak_mem_mib", "gflop_per_step", "speedup_vs_eager", "step_vs_flow_matching",
                       "speedup_vs_public", "power_w", "gpu_util_pct", "loss_first", "loss_last", "error_first",
                       "error_last", "loss_finite", "first_step_s"])
    result = {"environment": env, "preset": args.preset, "net": args.dit, "method": args.method, "batch": batch,
              "params": n_params, "tf32": args.tf32 and device.type == "cuda",  # a CPU has no TF32
              "peak_tflops": peaks, "warmup": args.warmup, "iters": args.iters, "interleaved": not args.sequential,
              "rows": rows}
    if args.compile_report:
        from torch._dynamo.utils import compile_times
        print(compile_times(repr="str", aggregate=True))
    finish(f"train_step/{args.preset}/{args.method}", result, save=not args.no_save)
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
