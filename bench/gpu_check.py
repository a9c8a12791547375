"""One go on a GPU, of at most ~9 minutes: the environment, the CUDA tests, then the benchmarks
in order of value, each stage with its own time budget.

    bench/gpu_check.sh OUT_DIR              # on the GPU (python3; the image's torch and triton)
    bench/gpu_check.sh OUT_DIR --dry-run    # the same stages on the CPU with tiny shapes (CI)

Everything goes to OUT_DIR as it happens: gpu_check.log (every stage's output, streamed),
results.jsonl (one JSON line per measured row, written by the benchmarks as they measure it,
plus one per stage with its status, seconds and budget), warm.log (the background compiles) and
train_check.metrics.jsonl (the trainer's log of its stage, copied as it grows). A stage that fails or runs out of
its budget is logged and killed, and the next one runs. The final table lists the stages. Stopped
(Ctrl-C, SIGTERM, SIGHUP), it kills the running stage and the background compiles before it exits.
Nothing is written to bench/results/ (the GPU machine does not send it back).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
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
    after: tuple[str, ...] = ()  # background compiles (WARMERS) it waits for, then finds its graphs cached


class Warmer(NamedTuple):
    """A compile started in the background when the run starts (a benchmark's --compile-only), so
    that the stage that needs its graphs finds them in Inductor's on-disk cache instead of compiling
    them inside its own budget; the compiles run side by side on the machine's CPU cores."""
    name: str
    gpu: list[str]
    dry: list[str] | None  # None: not rehearsed in --dry-run


STEADY = ["--warmup", "3", "--iters", "10", "--no-save"]
# train steps: 60 timed steps, so that even the cifar10 flow-matching step's (about 2 s on the H200) outlast
# NVML's one-second window by a second and report power and utilisation (bench/common.py, NVML_WINDOW_S)
STEADY_STEPS = ["--warmup", "3", "--iters", "60", "--no-save"]
BENCH = [PY, str(ROOT / "bench" / "gpu_check.py")]
# the official PyTorch Mean Flow code's per-GPU CIFAR-10 batch, so its ~610 img/s per H200 sits beside ours
CIFAR_BATCH = "128"
TRAIN_CHECK_STEPS = 60
# Budgets from the H200 run of 2026-11-30 (README, Performance): the eager rows and the CUDA tests
# are measured there; compiling the cifar10 STMD step outran its 193 s stage (and takes 387 s on 2 CPU
# cores). So the compiles start at once in the background (WARMERS), side by side, while the CUDA
# tests, the kernels and the eager trainer check use the GPU; the timed stages wait for theirs.
CIFAR_STEP = [PY, "bench/train_step.py", "--preset", "cifar10", "--method", "stmd", "--batch", CIFAR_BATCH,
              "--variants", "compiled bf16 + triton"]
DIT_STEP = [PY, "bench/train_step.py", "--preset", "celeba-latent", "--method", "stmd", "--no-flow-matching",
            "--variants", "compiled bf16 + triton"]
CIFAR_SAMPLE = [PY, "bench/sample.py", "--preset", "cifar10", "--method", "stmd", "--variants",
                "compiled bf16 + triton"]
WARMERS = [
    Warmer("cifar10 STMD step", [*CIFAR_STEP, "--no-flow-matching", "--compile-only", "--no-save"],
           [PY, "bench/train_step.py", "--preset", "gmm", "--batch", "16", "--variants", "compiled fp32",
            "--no-flow-matching", "--compile-only", "--device", "cpu", "--no-save"]),
    Warmer("cifar10 flow-matching step", [*CIFAR_STEP, "--flow-matching-only", "--compile-only", "--no-save"], None),
    Warmer("cifar10 sampler", [*CIFAR_SAMPLE, "--compile-only", "--no-save"], None),
    Warmer("DiT-M/2 STMD step", [*DIT_STEP, "--compile-only", "--no-save"], None),
]
WARMER_COMPILE_THREADS = "3"  # Inductor's compile workers per warmer: 4 warmers leave cores to the stages
STAGES = [
    # every kernel against its reference in fp32 and bf16 (values, tangents, gradients), the
    # compiled JVP step with the kernels against eager (101 tests, 76 s on the H200 with no warmers)
    # -v -rfE: each test's result is in the log as it ends, so a stage cut short keeps them
    Stage("cuda tests", 110, [PY, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider",
                             "tests/test_kernels.py", "tests/test_kernel_attention.py"],
          [PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "-k",
           "time_features_values or meanflow_loss_matches"]),
    Stage("kernels", 45, [PY, "bench/kernels.py", *STEADY], [PY, "bench/kernels.py", "--smoke"]),
    # the trainer itself (python -m stmd_fast.train) on a cifar10-sized U-Net, bf16, the kernels, eager:
    # finite and falling loss on image data, a checkpoint that loads
    Stage("train cifar10 bf16", 45, [*BENCH, "--train-check"], [*BENCH, "--train-check", "--dry-run"]),
    # --sequential: each variant is timed right after its warm-up and its row kept at once, so a
    # stage cut short by its budget keeps what it measured. The eager fp32 rows were measured.
    Stage("train step cifar10", 225, [*CIFAR_STEP, "--sequential", *STEADY_STEPS],
          [PY, "bench/train_step.py", "--smoke", "--sequential"],
          after=("cifar10 STMD step", "cifar10 flow-matching step")),
    Stage("sampling cifar10", 40, [*CIFAR_SAMPLE, "--sequential", "--warmup", "2", "--iters", "5", "--no-save"],
          [PY, "bench/sample.py", "--smoke", "--sequential"], after=("cifar10 sampler",)),
    Stage("train step DiT-M/2", 65, [*DIT_STEP, "--sequential", *STEADY_STEPS],
          [PY, "bench/train_step.py", "--preset", "celeba-latent", "--dit", "DiT-S/2", "--method", "stmd",
           "--no-flow-matching", "--variants", "eager fp32", "--batch", "4", "--warmup", "1", "--iters", "1",
           "--device", "cpu", "--no-save", "--sequential"], after=("DiT-M/2 STMD step",)),
]
# Of a stage's time, kept for its own run when its warmers are not done: a warm Inductor cache still leaves
# Dynamo and AOTAutograd to redo (AOTAutograd's cache is bypassed for the JVP: "_jvp_increment_nesting"),
# 55 s for the cifar10 step on 2 CPU cores
AFTER_RESERVE_S = 75
# Of the ~15 minutes a GPU is lent: start-up, copies and a margin take the rest. A stage that ends
# early hands its unused seconds to the next, so the whole run still ends within GPU_BUDGET_S.
GPU_BUDGET_S = sum(stage.budget_s for stage in STAGES)
DRY_RUN_TIMEOUT_S = 600  # per stage on 2 CPU cores (the GPU budgets do not apply there)


NEEDED_MODULES = ("stmd_fast.kernels.attention", "diffusers", "timm", "webdataset", "pynvml")
"""What the stages import: the project installed (pip install -e .) and the wheels the GPU image lacks."""


def missing_modules() -> list[str]:
    """NEEDED_MODULES that do not import here, each with its error."""
    import importlib

    missing = []
    for name in NEEDED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or a wheel built for another torch
            missing.append(f"{name} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    return missing


def environment() -> dict:
    """GPU, driver, torch, triton, commit (with the files changed since), date: what every result needs."""
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
    from common import code_version

    info.update(code_version())
    try:
        import pynvml
        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no NVIDIA driver (CPU dry run)
        info["driver"] = None
    return info


def digits_as_cifar(path: Path) -> None:
    """Image data of cifar10's shape with no download: sklearn's 1797 8x8 digits, scaled to 32x32 and
    tinted a random colour each, saved as (N, 3, 32, 32) uint8."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits().images / 16.0                                  # (N, 8, 8) in [0, 1]
    big = np.kron(digits, np.ones((4, 4)))                                # (N, 32, 32)
    tint = np.random.default_rng(0).uniform(0.3, 1.0, (len(big), 3, 1, 1))
    np.save(path, np.round(255 * tint * big[:, None]).astype(np.uint8))


def train_check(dry_run: bool) -> int:
    """python -m stmd_fast.train on a cifar10-sized U-Net (--unet L at 32 pixels: the preset's channels,
    wider heads) in bf16 with the Triton kernels, eagerly (compiling it takes minutes), for
    TRAIN_CHECK_STEPS steps: its logged loss must stay finite and fall, and its checkpoint must load.
    Recorded as one row; the exit status says whether it passed."""
    import shutil
    import tempfile

    steps = 8 if dry_run else TRAIN_CHECK_STEPS
    results = os.environ.get("STMD_BENCH_JSONL")
    # the trainer's metrics.jsonl, copied beside results.jsonl each second: a stage cut off by its budget (SIGKILL,
    # no row) still leaves its steps. One file: the GPU machine sends back 8 files at most (and not a checkpoint)
    kept = Path(results).parent / "train_check.metrics.jsonl" if results else None
    with tempfile.TemporaryDirectory() as tmp:
        data, run_dir = Path(tmp) / "digits32.npy", Path(tmp) / "run"
        digits_as_cifar(data)
        command = [PY, "-m", "stmd_fast.train", "--preset", "cifar10", "--data", str(data), "--steps", str(steps),
                   "--warmup-steps", "0", "--log-every", "1", "--sample-every", "0", "--ckpt-every", str(steps),
                   "--out", str(run_dir)]
        command += (["--unet", "S", "--batch-size", "8", "--device", "cpu"] if dry_run else
                    ["--unet", "L", "--batch-size", CIFAR_BATCH, "--precision", "bf16", "--kernels", "triton"])
        print(" ".join(command), flush=True)
        trainer = subprocess.Popen(command, cwd=ROOT)
        while True:
            try:
                rc = trainer.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                rc = None
            if kept is not None and (run_dir / "metrics.jsonl").exists():
                shutil.copyfile(run_dir / "metrics.jsonl", kept)
            if rc is not None:
                break
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        losses = [x["loss"] for x in logged if "loss" in x]
        few = max(1, len(losses) // 4)
        row = {"command": " ".join(command[1:]), "exit": rc, "steps": len(losses),
               "loss_first": sum(losses[:few]) / few if losses else None,
               "loss_last": sum(losses[-few:]) / few if losses else None,
               "loss_finite": all(math.isfinite(x) for x in losses),
               "img_per_s_last": logged[-1].get("img_per_s") if logged else None}
        row["passed"] = rc == 0 and len(losses) == steps and row["loss_finite"] and row["loss_last"] < row["loss_first"]
        if rc == 0:
            import torch

            from stmd_fast.checkpoint import load_checkpoint
            model = load_checkpoint(str(run_dir / "checkpoints" / f"step_{steps:08d}"), "cpu")
            row["checkpoint_finite"] = all(torch.isfinite(p).all().item() for p in model.net.parameters())
            row["passed"] = row["passed"] and row["checkpoint_finite"]
    print(json.dumps(row), flush=True)
    if results:
        with open(results, "a") as f:
            f.write(json.dumps({"benchmark": "train_check/cifar10", "row": row}) + "\n")
    return 0 if row["passed"] else 1


def start_warmers(warmers: list[Warmer], out: Path, dry_run: bool) -> dict:
    """Start each warmer in its own process group, output appended to OUT_DIR/warm.log."""
    log = open(out / "warm.log", "a")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_COMPILE_THREADS=WARMER_COMPILE_THREADS)
    running = {}
    for warmer in warmers:
        command = warmer.dry if dry_run else warmer.gpu
        if command is None:
            continue
        log.write(f"===== warmer {warmer.name}: {' '.join(command)}\n")
        log.flush()
        # niced: the stages measure while the warmers compile, and must keep the CPU they need (nice(1), not a
        # preexec_fn: Python code between fork and exec is unsafe in a process with threads, as CUDA's)
        running[warmer.name] = (subprocess.Popen(["nice", "-n", "10", *command], cwd=ROOT, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True),
                                time.monotonic())
    log.close()  # the warmers hold their own copies of it
    return running


def end_warmers(running: dict, out: Path, kill: bool) -> None:
    """Record each warmer that has ended (with kill: end the rest first) in results.jsonl, once."""
    for name, (proc, began) in list(running.items()):
        if kill and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "killed at the end of the run"
        elif proc.poll() is None:
            continue
        else:
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({"warmer": name, "status": status, "seconds": round(time.monotonic() - began, 1)})
                    + "\n")
        del running[name]


def wait_for_warmers(stage: Stage, running: dict, timeout_s: float) -> tuple[float, list[str]]:
    """Wait for the stage's warmers to end, leaving the stage AFTER_RESERVE_S (at least half its time)
    to run; the seconds waited and the warmers waited for (those still running: none in a dry run that
    has no small version of one, or once it ended)."""
    start, most = time.monotonic(), max(timeout_s - AFTER_RESERVE_S, timeout_s / 2)
    waited = [name for name in stage.after if name in running]
    for name in waited:
        try:
            running[name][0].wait(timeout=max(0.0, most - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            break  # the stage compiles what is missing itself, in the time it has left
    return time.monotonic() - start, waited


def run_stage(stage: Stage, command: list[str], timeout_s: float, out: Path, log, waited: float = 0.0,
              beside: list[str] = ()) -> dict:
    """Run one stage in its own process group, stream its output to the log, kill it at timeout_s
    (or when the run is stopped: Ctrl-C, or SIGTERM / SIGHUP through stop_on_signal, when its row is written
    to results.jsonl here before the stop goes on). Its row: status, seconds (with the `waited` for its
    warmers before it), budget, the wait and the warmers running `beside` it."""
    log.write(f"\n===== {stage.name} (budget {stage.budget_s} s on the GPU): {' '.join(command)}\n")
    log.flush()
    env = dict(os.environ, STMD_BENCH_JSONL=str(out / "results.jsonl"), PYTHONUNBUFFERED="1")
    start, timeout_s = time.monotonic(), max(timeout_s, 1.0)  # what earlier stages overran is gone: 1 s at least
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    stopped = None
    try:
        rc = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        status = f"out of time ({timeout_s:.0f} s)"
    except (KeyboardInterrupt, SystemExit) as err:  # the run stopped: this stage's end is recorded, then passed on
        stopped, code = err, getattr(err, "code", None)
        status = "stopped: " + ("Ctrl-C" if isinstance(err, KeyboardInterrupt) else
                                signal.Signals(code - 128).name if isinstance(code, int) and code > 128 else f"exit {code}")
    finally:
        if proc.poll() is None:  # out of time, or the run stopped: the whole group, compile workers included
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - start
    log.write(f"===== {stage.name}: {status}, {seconds:.1f} s\n")
    log.flush()
    result = {"stage": stage.name, "status": status, "seconds": round(seconds + waited, 1), "budget_s": stage.budget_s,
              "waited_s": round(waited, 1), "warmers_running": list(beside)}
    if stopped is not None:
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        raise stopped
    return result


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # `timeout`, a job scheduler, a closed terminal


def stop_on_signal(signum, frame):
    """SIGTERM / SIGHUP end the run as an exception would, so that run_stages' cleanup kills the warmers
    and the running stage: each has a session of its own, which no signal to this process reaches."""
    raise SystemExit(128 + signum)  # the shell's exit status for a signal (143 for SIGTERM)


def run_stages(stages: list[Stage], out: Path, dry_run: bool, warmers: list[Warmer] = (),
               started: float | None = None) -> list[dict]:
    """Run the stages in order, each within its budget plus what those before it left unused, counted from
    `started` (time.monotonic(); default now): the checks before the stages spend the same GPU time."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    budget_so_far, start = 0, time.monotonic() if started is None else started
    previous = {sig: signal.signal(sig, stop_on_signal) for sig in STOP_SIGNALS}
    running = {}
    try:
        running = start_warmers(list(warmers), out, dry_run)
        with open(out / "gpu_check.log", "a") as log:
            for stage in stages:
                command = stage.dry if dry_run else stage.gpu
                budget_so_far += stage.budget_s
                # the stage's own budget plus what the stages before it left unused
                timeout_s = DRY_RUN_TIMEOUT_S if dry_run else budget_so_far - (time.monotonic() - start)
                waited, waited_for = wait_for_warmers(stage, running, timeout_s)
                end_warmers(running, out, kill=False)
                if waited_for:
                    log.write(f"\n===== {stage.name}: waited {waited:.1f} s for {', '.join(waited_for)}\n")
                # a warmer's first step runs on the GPU too (Inductor autotunes there): a stage's timings
                # taken beside one are flagged by its name, not silently mixed with the clean ones
                beside = sorted(running)  # still running now (end_warmers just dropped the ended ones)
                result = run_stage(stage, command, timeout_s - waited, out, log, waited, beside)
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(f"{stage.name:>20} | {result['status']:<22} | {result['seconds']:7.1f} s | "
                      f"budget {stage.budget_s} s", flush=True)
                results.append(result)
    finally:
        for sig in STOP_SIGNALS:  # a second signal must not cut the cleanup short (it takes milliseconds)
            signal.signal(sig, signal.SIG_IGN)
        end_warmers(running, out, kill=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results


def out_dir_problem(out: Path) -> str | None:
    """Why `out` cannot be made (or used) as a writable folder, or None; nothing is created here."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def main(argv=None) -> int:
    # plain argparse (this script checks that stmd_fast imports, so it cannot rely on it); allow_abbrev=False:
    # no prefix of a flag stands for it (`--train` reached the hidden --train-check)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("out", nargs="?", help="output folder (created; appended to)")
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny shapes")
    p.add_argument("--train-check", action="store_true", help=argparse.SUPPRESS)  # the trainer's stage
    args = p.parse_args(argv)
    if args.train_check:
        return train_check(args.dry_run)
    if not args.out:
        p.error("give the output folder: bench/gpu_check.sh OUT_DIR [--dry-run]")
    out = Path(args.out).resolve()
    unusable = out_dir_problem(out)
    if unusable:  # one line, before the import check spends the budget
        p.error(f"output folder {out}: {unusable}: give a folder that can be created and written")
    began = time.monotonic()  # the budget counts the import check too (88 s on 2 CPU cores, cold)
    missing = missing_modules()
    if missing:  # every stage would fail on its import: say so before any GPU time goes
        sys.exit(f"error: not importable: {'; '.join(missing)}. Install the project (pip install -e .) and the "
                 f"wheels the GPU image lacks into .site (../shared/device/README.md)")
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device: run on the GPU, or add --dry-run for the CPU rehearsal")
    # the environment first, in this process (torch is imported already): no stage budget can cut it short
    out.mkdir(parents=True, exist_ok=True)
    try:
        info = environment()
    except Exception as err:  # noqa: BLE001 (the stages still run: their rows hold their own environment)
        info = {"error": f"{type(err).__name__}: {err}"}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"benchmark": "environment", "row": info}) + "\n")
    print(f"environment: {json.dumps(info)}", flush=True)
    total = sum(s.budget_s for s in STAGES)
    print(f"gpu_check{' --dry-run (CPU, tiny shapes)' if args.dry_run else ''}: {len(STAGES)} stages, "
          f"{total} s of GPU budget in all; output in {out}", flush=True)
    results = run_stages(STAGES, out, args.dry_run, WARMERS, started=began)
    failed = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} stages ok in {time.monotonic() - began:.0f} s; "
          f"measured rows in {out / 'results.jsonl'}, log in {out / 'gpu_check.log'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
