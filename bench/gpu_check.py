"""One go on a GPU, of at most ~9 minutes: the environment, the CUDA tests, then the benchmarks
in order of value, each stage with its own time budget.

    bench/gpu_check.sh OUT_DIR              # on the GPU (python3; the image's torch and triton)
    bench/gpu_check.sh OUT_DIR --dry-run    # the same stages on the CPU with tiny shapes (CI)

Everything goes to OUT_DIR as it happens: gpu_check.log (every stage's output, streamed),
results.jsonl (one JSON line per measured row, written by the benchmarks as they measure it,
plus one per stage with its status, seconds and budget). A stage that fails or runs out of
its budget is logged and killed, and the next one runs. The final table lists the stages.
Nothing is written to bench/results/ (the GPU machine does not send it back).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


class Stage(NamedTuple):
    name: str
    budget_s: int          # on the GPU; the stages' budgets add up to GPU_BUDGET_S
    gpu: list[str]         # command on the GPU
    dry: list[str]         # the same on the CPU with tiny shapes (--dry-run)


STEADY = ["--warmup", "3", "--iters", "10", "--no-save"]
STAGES = [
    Stage("environment", 15, [PY, str(ROOT / "bench" / "gpu_check.py"), "--environment"],
          [PY, str(ROOT / "bench" / "gpu_check.py"), "--environment"]),
    # every kernel against its reference in fp32 and bf16 (values, tangents, gradients), the
    # compiled JVP step with the kernels against eager
    Stage("cuda tests", 150, [PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              "tests/test_kernels.py", "tests/test_kernel_attention.py"],
          [PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "-k",
           "time_features_values or meanflow_loss_matches"]),
    Stage("train step cifar10", 150,
          [PY, "bench/train_step.py", "--preset", "cifar10", "--method", "stmd",
           "--variants", "compiled bf16 + triton,compiled bf16,eager fp32", *STEADY],
          [PY, "bench/train_step.py", "--smoke"]),
    Stage("kernels", 60, [PY, "bench/kernels.py", *STEADY], [PY, "bench/kernels.py", "--smoke"]),
    Stage("train step DiT-M/2", 90,
          [PY, "bench/train_step.py", "--preset", "celeba-latent", "--method", "stmd",
           "--variants", "compiled bf16 + triton", *STEADY],
          [PY, "bench/train_step.py", "--smoke", "--no-flow-matching"]),
    Stage("sampling cifar10", 60,
          [PY, "bench/sample.py", "--preset", "cifar10", "--method", "stmd", "--warmup", "2", "--iters", "5",
           "--no-save"],
          [PY, "bench/sample.py", "--smoke"]),
]
GPU_BUDGET_S = 540  # of the ~15 minutes a GPU is lent: start-up, copies and a margin take the rest
DRY_RUN_TIMEOUT_S = 600  # per stage on 2 CPU cores (the GPU budgets do not apply there)


def environment() -> dict:
    """GPU, driver, torch, triton, commit, date: what every result needs beside it."""
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "capability": list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None,
            "cpus": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    try:
        import pynvml
        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no NVIDIA driver (CPU dry run)
        info["driver"] = None
    return info


def run_stage(stage: Stage, command: list[str], timeout_s: float, out: Path, log) -> dict:
    """Run one stage in its own process group, stream its output to the log, kill it at timeout_s."""
    log.write(f"\n===== {stage.name} (budget {stage.budget_s} s on the GPU): {' '.join(command)}\n")
    log.flush()
    env = dict(os.environ, STMD_BENCH_JSONL=str(out / "results.jsonl"), PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: compile workers included
        proc.wait()
        status = f"out of time ({timeout_s:.0f} s)"
    seconds = time.monotonic() - start
    log.write(f"===== {stage.name}: {status}, {seconds:.1f} s\n")
    log.flush()
    return {"stage": stage.name, "status": status, "seconds": round(seconds, 1), "budget_s": stage.budget_s}


def run_stages(stages: list[Stage], out: Path, dry_run: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(out / "gpu_check.log", "a") as log:
        for stage in stages:
            command = stage.dry if dry_run else stage.gpu
            result = run_stage(stage, command, DRY_RUN_TIMEOUT_S if dry_run else stage.budget_s, out, log)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{stage.name:>20} | {result['status']:<22} | {result['seconds']:7.1f} s | budget {stage.budget_s} s",
                  flush=True)
            results.append(result)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output folder (created; appended to)")
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny shapes")
    p.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)  # the first stage itself
    args = p.parse_args(argv)
    if args.environment:
        info = environment()
        print(json.dumps(info))
        path = os.environ.get("STMD_BENCH_JSONL")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"benchmark": "environment", "row": info}) + "\n")
        return 0
    if not args.out:
        p.error("give the output folder: bench/gpu_check.sh OUT_DIR [--dry-run]")
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device: run on the GPU, or add --dry-run for the CPU rehearsal")
    out = Path(args.out).resolve()
    total = sum(s.budget_s for s in STAGES)
    print(f"gpu_check{' --dry-run (CPU, tiny shapes)' if args.dry_run else ''}: {len(STAGES)} stages, "
          f"{total} s of GPU budget in all; output in {out}", flush=True)
    start = time.monotonic()
    results = run_stages(STAGES, out, args.dry_run)
    failed = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} stages ok in {time.monotonic() - start:.0f} s; "
          f"measured rows in {out / 'results.jsonl'}, log in {out / 'gpu_check.log'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
