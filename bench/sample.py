"""Sampling latency and img/s per NFE, eager vs compiled network, side by side in one run.

    python bench/sample.py --preset cifar10 --method stmd            # on a GPU
    python bench/sample.py --smoke                                    # tiny CPU version (CI)

Times a whole stmd_fast.sampling.sample call (Algorithm 2: noise, N x M network calls, exact
bridge) for a batch, with freshly initialised weights (speed does not depend on training),
or with --ckpt a trained checkpoint's EMA network. Compiled variants compile the network.
Every (variant, N, M) is warmed up first (peak memory is taken there), then all are timed
interleaved, one call of each per round, the order rotated, so a shared machine's load hits
them alike; --sequential times each right after its warm-up and records its row at once (a run
cut short keeps what it measured). The Triton variant runs on CUDA only (skipped on a CPU).
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (apply_smoke, at_least, environment, finish, given_flags, median, parse_variants, parser,  # noqa: E402
                    peak_memory_mib, print_table, record, reset_peak_memory, synchronize, time_ms, time_ms_interleaved)

from stmd_fast.cli import one_line_errors  # noqa: E402
from stmd_fast.config import PRESET_DATA_SHAPES, PRESETS  # noqa: E402
from stmd_fast.devices import resolve_device  # noqa: E402
from stmd_fast.engine import remove_interrupted_compiles  # noqa: E402
from stmd_fast.kernels import dispatch  # noqa: E402
from stmd_fast.objectives import METHODS  # noqa: E402
from stmd_fast.sampling import nfe, sample  # noqa: E402

# name -> (torch.compile, precision, kernel backend)
VARIANTS = {
    "eager fp32": (False, "fp32", "reference"),
    "compiled fp32": (True, "fp32", "reference"),
    "compiled bf16 + triton": (True, "bf16", "triton"),
}
# (N diffusion steps, M flow steps) per method, by increasing NFE
STEPS = {"stmd": [(1, 1), (1, 2), (2, 2), (4, 1), (4, 2)], "meanflow": [(1, 1), (1, 2), (1, 4)],
         "ddpm": [(1, 1), (10, 1), (50, 1)]}
SMOKE = {"preset": "gmm", "batch": 32, "warmup": 1, "iters": 3, "device": "cpu",
         "variants": "eager fp32,compiled fp32", "no_save": True}


def build_parser():
    p = parser("sample.py", __doc__)
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESET_DATA_SHAPES), help="network and data shape")
    p.add_argument("--method", default="stmd", choices=sorted(METHODS), help="the sampler timed")
    p.add_argument("--ckpt", default=None, help="time a trained checkpoint's EMA network instead")
    p.add_argument("--batch", type=at_least(1), default=256, help="samples per call")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=at_least(1), default=3, help="untimed calls per setting, at least 1 (the first "
                   "compiles)")
    p.add_argument("--iters", type=at_least(1), default=10, help="timed calls per setting")
    p.add_argument("--device", default="auto", help="auto: cuda when there is one, else cpu")
    p.add_argument("--sequential", action="store_true", help="time each setting right after its warm-up and record "
                   "its row at once (a run cut short keeps the rows measured before the cut), instead of "
                   "interleaving all settings call by call")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: gmm MLP, batch 32, 1 + 3 calls, eager and "
                   "compiled fp32, not saved (it sets those flags itself)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/<device>-<date>.json")
    p.add_argument("--compile-only", action="store_true", help="one sampler call per compiled variant (compiling "
                   "the network into Inductor's on-disk cache) and stop, timing nothing (bench/gpu_check.py)")
    return p


def load_net(args, device):
    if args.ckpt:
        from stmd_fast.checkpoint import load_checkpoint
        model = load_checkpoint(args.ckpt, device)
        return model.net, model.method, tuple(model.data_shape)
    cfg = PRESETS[args.preset]()
    method = METHODS[args.method]
    torch.manual_seed(0)
    net = method.build_net(cfg.net, PRESET_DATA_SHAPES[args.preset])
    return net.to(device).eval(), args.method, PRESET_DATA_SHAPES[args.preset]


def add_latency(row: dict, times: list[float], args, method: str) -> None:
    """The row's median latency and img/s, recorded (results.jsonl under gpu_check) and printed."""
    ms = median(times)
    row.update(latency_ms=ms, img_per_s=args.batch / (ms * 1e-3))
    record(f"sample/{args.preset}/{method}", row)
    print(f"  {row['variant']:>22} | N {row['N']} x M {row['M']}, NFE {row['nfe']:>3} | {ms:.2f} ms", flush=True)


@one_line_errors(ValueError, FileNotFoundError)  # e.g. a missing --ckpt: one line, exit code 2
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    apply_smoke(p, argv, args, SMOKE)
    device = resolve_device(args.device)
    names = parse_variants(p, args.variants, VARIANTS)
    ignored = [f"--{name}" for name in given_flags(p, argv, ("preset", "method"))] if args.ckpt else []
    if ignored:  # the checkpoint is the network and its method: a flag naming others was timed as if it were not
        p.error(f"--ckpt times the checkpoint's own network and method: drop {' and '.join(ignored)}")
    if device.type != "cuda" and any(VARIANTS[v][2] == "triton" for v in names):
        print("note: skipping the triton variant: the kernels run on CUDA (on a CPU only in the tests' interpreter)")
        names = [v for v in names if VARIANTS[v][2] != "triton"]
        if not names:
            p.error("nothing to time: the triton variant needs CUDA; give another --variants")
    net, method, data_shape = load_net(args, device)
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | {method} on {data_shape}, batch {args.batch}")
    torch._dynamo.reset()
    remove_interrupted_compiles()  # a compile stopped earlier would fail every later one
    torch._dynamo.config.recompile_limit = 64  # every variant's compiled network stays live for the interleaving
    rows, runners = [], []
    for name in names:
        compile_, precision, kernels = VARIANTS[name]
        model = torch.compile(net) if compile_ else net
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        if args.compile_only:
            if compile_:  # every (N, M) calls the network on the same shapes: one call compiles it
                began = time.perf_counter()
                with dispatch.backend(kernels), autocast:
                    sample(model, method, args.batch, data_shape, 1, 1, torch.Generator(device).manual_seed(0))
                synchronize(device)
                print(f"  {name}: first call {time.perf_counter() - began:.1f} s, its graph now in Inductor's cache",
                      flush=True)
            else:
                print(f"  {name}: eager, nothing to compile", flush=True)
            continue
        for steps, flow_steps in STEPS[method]:
            def run(model=model, kernels=kernels, autocast=autocast, steps=steps, flow_steps=flow_steps,
                    generator=torch.Generator(device).manual_seed(0)):
                with dispatch.backend(kernels), autocast:
                    sample(model, method, args.batch, data_shape, steps, flow_steps, generator)

            # what sampling adds, as train_step's: not the weights and what earlier variants still hold
            base_mib = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
            reset_peak_memory(device)
            for _ in range(args.warmup):
                run()
            synchronize(device)
            rows.append({"variant": name, "N": steps, "M": flow_steps, "nfe": nfe(method, steps, flow_steps),
                         "peak_mem_mib": peak_memory_mib(device, since_mib=base_mib)})
            runners.append(run)
            if args.sequential:
                add_latency(rows[-1], time_ms(run, device, 0, args.iters), args, method)
    if args.compile_only:
        return 0
    if not args.sequential:
        times = time_ms_interleaved(dict(enumerate(runners)), device, args.iters)
        for row, row_times in zip(rows, times.values()):
            add_latency(row, row_times, args, method)
    for row in rows:
        base = next((r for r in rows if r["variant"] == "eager fp32" and r["nfe"] == row["nfe"]
                     and r["N"] == row["N"]), None)
        row["speedup_vs_eager"] = base["latency_ms"] / row["latency_ms"] if base else None
    print()
    print_table(rows, ["variant", "N", "M", "nfe", "latency_ms", "img_per_s", "speedup_vs_eager", "peak_mem_mib"])
    result = {"environment": env, "method": method, "data_shape": list(data_shape), "batch": args.batch,
              "checkpoint": args.ckpt, "preset": None if args.ckpt else args.preset, "rows": rows}
    finish(f"sample/{args.preset if not args.ckpt else 'ckpt'}/{method}", result, save=not args.no_save)
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
