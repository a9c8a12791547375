"""python -m stmd_fast.crashtest: kill a training run at random moments, resume it, and check that
nothing was lost (README, "What survives what"). Run it on the machine and file system you train on.

1. an uninterrupted reference run (the gmm preset on the CPU, a few hundred steps);
2. the same run started, SIGKILLed at a random moment (start-up, mid-step, mid-checkpoint or
   mid-rotation alike), and started again (--resume once it has a checkpoint), --kills times;
   after every kill each visible checkpoint must verify (sizes, SHA-256);
3. first, a second process started into a live run's --out (a long run of its own) must be refused
   in one line;
4. the run finished: metrics.jsonl must hold each step once, in order, and the final weights
   and EMA must equal the reference's bit for bit (resume is exact on the CPU).

Prints one line per kill and a final JSON line; exit code 0 if everything held, 1 otherwise, also
when no start was killed (then nothing of 2. was tested). Start-up takes most of a short run's
time: a start without a checkpoint is killed only after its first one, while it trains on.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from .checkpoint import list_checkpoints, newest_intact, verify_checkpoint
from .cli import Parser, one_line_errors


def train_command(out: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "stmd_fast.train", "--preset", "gmm", "--steps", str(steps), "--batch-size", "64",
            "--ckpt-every", "7", "--keep-checkpoints", "2", "--log-every", "1", "--sample-every", "0",
            "--device", "cpu", "--out", str(out), *(["--resume"] if resume else [])]


STARTED: list[subprocess.Popen] = []  # the training processes, killed if the crashtest itself is stopped


def start(out: Path, steps: int) -> subprocess.Popen:
    STARTED.append(subprocess.Popen(train_command(out, steps, resume=bool(list_checkpoints(out))),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return STARTED[-1]


def first_checkpoint_after(process: subprocess.Popen, out: Path, step: int | None = None,
                           deadline_s: float = 600) -> float | None:
    """Seconds until `out` holds a checkpoint (that of `step`, if given), polled while `process` runs; None if
    it ended before, or none came within deadline_s (a hung run: the caller's kill or check says so)."""
    def there() -> bool:
        return (out / "checkpoints" / f"step_{step:08d}").is_dir() if step else bool(list_checkpoints(out))

    began = time.perf_counter()
    while not there():
        if process.poll() is not None or time.perf_counter() - began > deadline_s:
            return time.perf_counter() - began if there() else None  # written just before it ended
        time.sleep(0.02)
    return time.perf_counter() - began


def check_visible_checkpoints(out: Path) -> str | None:
    """None if every checkpoint folder the loaders see verifies, else the first problem."""
    for ckpt in list_checkpoints(out):
        try:
            verify_checkpoint(ckpt)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            return str(err)
    return None


def second_run_refused(out: Path) -> str | None:
    """Start a long run into `out`, then (once it holds the lock and has a checkpoint) a second one with
    --resume into the same --out: None if the second was refused with a one-line error naming the lock,
    else what happened."""
    first = subprocess.Popen(train_command(out, 10 ** 9, resume=False), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        lock = out / ".lock"
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text() + " " and list_checkpoints(out)):
            if first.poll() is not None or time.time() > deadline:
                return f"the first run ended (exit {first.returncode}) before it held the lock and a checkpoint"
            time.sleep(0.05)
        second = subprocess.run(train_command(out, 10 ** 9, resume=True), capture_output=True, text=True,
                                timeout=600)
        lines = second.stderr.strip().splitlines()
        if second.returncode != 2 or len(lines) != 1 or "in use by another training run" not in lines[0]:
            return f"the second run gave exit {second.returncode}: {second.stderr.strip()[-300:]}"
        return None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


CRASHTEST_MARK = ".stmd-crashtest"
"""Left in --out: a later crashtest may replace the runs there."""


@one_line_errors()  # Ctrl-C / SIGTERM: "interrupted", exit 130 / 143, after the cleanup below
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m stmd_fast.crashtest", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs before the run may finish [default: 12]")
    p.add_argument("--steps", type=int, default=300, help="steps of the test run, at least 20; under about 100 a start may finish before its kill, and "
                        "a crashtest that killed nothing fails as untested [default: 300]")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill times [default: 0]")
    p.add_argument("--out", "--dir", dest="dir",  # --out as in every other command; --dir kept
                   help="where the runs go (kept): a new or empty folder, or one an earlier crashtest made, whose "
                        "runs are replaced; default: a temporary folder, removed at the end")
    args = p.parse_args(argv)
    if args.kills < 1 or args.steps < 20:
        p.error("need --kills >= 1 and --steps >= 20")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="stmd-crashtest-"))
    # its runs are removed before each test: never in a folder of the user's own
    if root.exists() and not root.is_dir():
        p.error(f"--out {root} is a file: give a new or empty folder")
    if root.is_dir() and any(root.iterdir()) and not (root / CRASHTEST_MARK).exists():
        p.error(f"--out {root} holds files a crashtest did not make: give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / CRASHTEST_MARK).touch()
    rng = random.Random(args.seed)
    problems: list[str] = []
    try:
        reference, crashed = root / "reference", root / "crashed"
        for folder in (reference, crashed, root / "live"):
            shutil.rmtree(folder, ignore_errors=True)
        began = time.perf_counter()
        done = start(reference, args.steps)
        first_ckpt = first_checkpoint_after(done, reference)
        training = first_checkpoint_after(done, reference, args.steps)  # from the first checkpoint to the last
        _, stderr = done.communicate()
        wall = time.perf_counter() - began
        if done.returncode != 0 or first_ckpt is None or training is None:
            print(f"the reference run failed: {stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        # start-up takes most of a short run's time: a start without a checkpoint yet is killed only after its
        # first one, while it trains on, so that the kills hit a run with something to lose
        after_ckpt = 0.7 * training
        window = first_ckpt + after_ckpt  # a resumed start: anywhere from start-up to most of the training
        print(f"reference: {args.steps} steps in {wall:.1f} s (start-up included), its first checkpoint after "
              f"{first_ckpt:.1f} s; killing the test run up to {args.kills} times at random moments in "
              f"[0, {window:.1f}] s after each start (the first start: in [0, {after_ckpt:.2f}] s after its first "
              f"checkpoint)")

        refused = second_run_refused(root / "live")  # first: a loop that ends early still runs it
        print(f"second run into the live --out: {'refused in one line' if refused is None else refused}")
        if refused:
            problems.append(f"second run: {refused}")
        kills = 0
        for attempt in range(args.kills):
            fresh = not list_checkpoints(crashed)
            process = start(crashed, args.steps)
            at = rng.uniform(0, after_ckpt if fresh else window)  # short of a whole run: most starts are killed
            try:
                waited = first_checkpoint_after(process, crashed) if fresh else 0.0
                if waited is None and process.poll() is None:  # no checkpoint within the deadline: hung
                    process.kill()
                    process.wait()
                    problems.append(f"start {attempt + 1} wrote no checkpoint within 10 minutes (hung), killed")
                    break
                process.wait(timeout=at)
                finished = True
                at += waited or 0.0
            except subprocess.TimeoutExpired:
                at += waited
                process.send_signal(signal.SIGKILL)
                process.wait()
                finished = False
            if finished and process.returncode != 0:
                problems.append(f"start {attempt + 1} failed (exit {process.returncode}): "
                                f"{process.stderr.read().strip()[-300:]}")
                break
            broken = check_visible_checkpoints(crashed)
            try:
                newest = newest_intact(crashed)[0].name
            except (FileNotFoundError, ValueError):
                newest = "none yet"
            kills += not finished
            print(f"start {attempt + 1:3d}: {'finished' if finished else f'SIGKILL after {at:5.2f} s'}; newest "
                  f"intact checkpoint {newest}" + (f"; BROKEN: {broken}" if broken else ""))
            if broken:
                problems.append(f"after start {attempt + 1}: {broken}")
            if finished:
                break
        final = subprocess.run(train_command(crashed, args.steps, resume=bool(list_checkpoints(crashed))),
                               capture_output=True, text=True)
        if final.returncode != 0:
            problems.append(f"the final resume failed: {final.stderr.strip()[-300:]}")
        else:
            steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
            if steps != list(range(1, args.steps + 1)):
                problems.append(f"metrics.jsonl does not hold each step once in order ({len(steps)} lines)")
            for name in ("model.safetensors", "ema.safetensors"):
                a = load_file(newest_intact(reference)[0] / name)
                b = load_file(newest_intact(crashed)[0] / name)
                if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
                    problems.append(f"the final {name} differs from the uninterrupted run's")
        if not kills:  # the first start finished before its kill: nothing was tested
            problems.append("no start was killed (the run finished before its kill time): nothing was tested; give "
                            "more --steps")
        verdict = {"kills": kills, "steps": args.steps, "ok": not problems, "problems": problems}
        print(("survived" if not problems else "FAILED") + f": {kills} kills; "
              + ("every checkpoint intact, metrics once per step, final weights equal the uninterrupted run's"
                 if not problems else "; ".join(problems)))
        print(json.dumps(verdict))
        return 0 if not problems else 1
    finally:
        for process in STARTED:  # a Ctrl-C or SIGTERM to the crashtest: no run goes on without it
            if process.poll() is None:
                process.kill()
                process.wait()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
