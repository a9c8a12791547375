"""What a run shows and leaves behind besides checkpoints: the progress bar, metrics.jsonl and the
sample grids, all on rank 0; and the per-interval sums of loss and error, which every rank keeps on
its device and gathers once per log interval (the one CPU-GPU sync of the loop)."""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .files import write_atomic
from .methods import METHODS
from .sampling import sample


class IntervalSums:
    """Loss and error summed on the device, and the first step whose loss was not finite: no sync per step.

    The loss is averaged over each --log-every interval; a record at another step (a checkpoint, a sample
    grid, a stop) reports the interval so far and leaves it open, and a checkpoint keeps the open interval's
    sums (open_window), so a resumed run's records at the --log-every steps are the uninterrupted run's."""

    def __init__(self, device: torch.device, step: int, elapsed: float = 0.0, window: dict | None = None):
        """elapsed: the seconds the run had trained before this process (a resumed run's elapsed_s goes on);
        window: the open interval a resumed checkpoint kept (open_window), None for one starting at `step`."""
        self.device = device
        window = window or {"start": step, "loss": 0.0, "error": 0.0}
        rank, world = distributed.rank_and_world()
        self.loss, self.error = (torch.tensor(own_sum(window[key], rank, world), device=device)
                                 for key in ("loss", "error"))
        self.window_start = window["start"]
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.t_log = time.perf_counter()
        self.t_start = self.t_log - elapsed
        self.step_log = step  # the last record's step: rates are since then
        self.closed: dict | None = None  # the window after the last close, for open_window

    def add(self, loss: torch.Tensor, error: torch.Tensor, step: int) -> None:
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss), step, self.first_bad_step)
        self.loss += loss
        self.error += error

    def close(self, step: int, stop_requested: bool, world: int, batch_size: int, error_name: str, lr: float,
              skipped: dict[str, int] | None = None, save_requested: bool = False, interval_end: bool = True,
              folder_gone: bool = False):
        """One collective: every rank's sums, first bad step, stop and save (--ckpt-minutes) requests, whether its run
        folder is gone (rank 0's check) and counts of skipped damaged data (latent shards: summed over the ranks into
        the record). Returns (record, first bad step or None, whether any rank asked to stop, whether any asked to
        save, whether any found the folder gone); interval_end (a --log-every
        step) starts the next interval, otherwise (even at the last step: --steps may grow on --resume) the loss
        goes on averaging over this one."""
        skipped = skipped or {}
        flags = torch.tensor([float(stop_requested), float(save_requested), float(folder_gone),
                              *map(float, skipped.values())],
                             dtype=torch.float64, device=self.device)
        mine = torch.cat([torch.stack([self.loss.double(), self.error.double(), self.first_bad_step.double()]), flags])
        ranks = distributed.gather(mine).tolist()
        bad = [int(r[2]) for r in ranks if r[2] >= 0]
        loss, error = (sum(r[i] for r in ranks) / world for i in (0, 1))
        n, dt = step - self.step_log, time.perf_counter() - self.t_log
        steps = step - self.window_start
        record = {"step": step, "loss": loss / steps, error_name: error / steps, "lr": lr}
        if n:  # none at a record that is this process's first step: its time is start-up's (a first --compile)
            record.update(img_per_s=n * batch_size / dt, ms_per_step=1e3 * dt / n)
        record["elapsed_s"] = time.perf_counter() - self.t_start
        record.update({name: int(sum(r[6 + i] for r in ranks)) for i, name in enumerate(skipped)})
        # each rank's own sums (float32 values, exact in the float64 gather), so that a resume restores them bit for bit
        loss_sums, error_sums = ([r[i] for r in ranks] for i in (0, 1))
        if interval_end:
            self.loss.zero_()
            self.error.zero_()
            self.window_start, loss_sums, error_sums = step, [0.0] * len(ranks), [0.0] * len(ranks)
        self.closed = {"start": self.window_start, "loss": loss_sums, "error": error_sums}
        self.restart_clock(step)
        return (record, (min(bad) if bad else None), any(r[3] for r in ranks), any(r[4] for r in ranks),
                any(r[5] for r in ranks))

    def restart_clock(self, step: int) -> None:
        """The rates of the next record count from here: after a record's checkpoint, sample grid and FD, and after
        a process's first step (a first --compile), so that img/s, ms/step and the ETA are the training steps'."""
        self.t_log, self.step_log = time.perf_counter(), step

    def open_window(self) -> dict | None:
        """The open interval as of the last close (its first step and summed loss and error), for a checkpoint."""
        return self.closed


def own_sum(saved: float | list[float], rank: int, world: int) -> float:
    """This rank's share of a checkpoint's open interval sum. A list holds each rank's own sum: over the same process
    count each rank takes its own, so the resumed records are bit for bit the uninterrupted run's. Over another count
    (or from an older checkpoint's single rank mean) every rank takes the mean, which the gather's mean gives back."""
    if not isinstance(saved, list):
        return saved
    return saved[rank] if len(saved) == world else sum(saved) / len(saved)


def terminal_columns(stream) -> int | None:
    """The width of the terminal `stream` writes to (0 for a pseudo-terminal no one sized), None if none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture), closed
        return None


def clock(seconds: float) -> str:
    """h:mm:ss."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunLog:
    """Progress bar, metrics.jsonl and sample grids of a run directory; silent off rank 0. A context
    manager: the bar and the metrics file are closed on the way out."""

    def __init__(self, out: Path, steps: int, step: int, is_main: bool, loggers=()):
        self.out, self.steps, self.is_main, self.loggers = out, steps, is_main, list(loggers)
        self.metrics = (out / "metrics.jsonl").open("a") if is_main else None
        # no bar on a terminal of no width (script, docker run -t without one): tqdm would draw nothing there
        self.bar = tqdm(total=steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=None if is_main and terminal_columns(sys.stderr) != 0 else True)
        # progress lines go to stdout whenever it is a file (nohup, > log), the bar on stderr's terminal or not
        self.lines = is_main and (self.bar.disable or not sys.stdout.isatty())

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.bar.close()
        # an error is a failed run; a stop signal (KeyboardInterrupt, after its checkpoint) is not
        failed = kind is not None and not issubclass(kind, KeyboardInterrupt)
        problems = []  # every logger and the metrics file are closed, whichever fails: the first failure is raised
        for logger in self.loggers:
            try:
                logger.close(failed)
            except Exception as err:  # noqa: BLE001 - raised below, after the others are closed
                problems.append(err)
        if self.metrics is not None:
            try:
                self.metrics.close()
            except OSError as err:  # a full disk fails the flush again
                err.filename = err.filename or self.metrics.name
                problems.append(err)
        if problems and kind is None:  # else the error under way stays the one said
            raise problems[0]

    def step(self) -> None:
        self.bar.update(1)

    def write(self, message: str, file=None) -> None:
        """A line above the bar (stdout; file=sys.stderr for warnings), flushed: a log file shows it at once."""
        if self.is_main:
            self.bar.write(message, file=file)
            (file or sys.stdout).flush()

    def sync(self) -> None:
        """metrics.jsonl onto the disk, before a checkpoint (fsynced) that counts on it: a resume keeps the records
        up to its checkpoint's step, so after a power cut the ones before it must be there too."""
        if self.is_main:
            try:
                os.fsync(self.metrics.fileno())
            except OSError as err:
                err.filename = err.filename or self.metrics.name
                raise

    def record(self, record: dict) -> None:
        """Append one interval's record to metrics.jsonl and show it."""
        if not self.is_main:
            return
        try:  # NaN (an FD of diverged weights) as null: a bare NaN is not JSON, and strict readers (jq) refuse it
            self.metrics.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                           for k, v in record.items()}) + "\n")
            self.metrics.flush()
        except OSError as err:  # a failed write names no file by itself: the message names metrics.jsonl
            err.filename = err.filename or self.metrics.name
            raise
        for logger in self.loggers:  # --loggers: the same record, the same step
            logger.log_scalars(record["step"], {k: v for k, v in record.items() if k != "step"})
        error_name = list(record)[2]
        status = f"loss {record['loss']:.4f} | {error_name} {record[error_name]:.4g} | "
        status += (f"{record['img_per_s']:.0f} img/s | {record['ms_per_step']:.1f} ms/step" if "ms_per_step" in record
                   else "first step of this process: rates from the next record")
        if record.get("skipped_shards") or record.get("skipped_samples"):  # damaged latent data, skipped
            status += f" | skipped {record['skipped_shards']} shards, {record['skipped_samples']} samples"
        status += "".join(f" | {key} {value:.4g}" for key, value in record.items() if key.startswith(("FD/", "FID/")))
        if self.lines:  # a log file: when, and how long to go, as the bar would show
            eta = clock((self.steps - record["step"]) * record["ms_per_step"] / 1e3) if "ms_per_step" in record else "?"
            # through the bar (| tee on a terminal: both there): it clears itself, the line, then redraws below
            self.write(f"step {record['step']}/{self.steps} | {status} | elapsed {clock(record['elapsed_s'])} | "
                       f"eta {eta} | {time.strftime('%H:%M:%S')}")
        if not self.bar.disable:
            self.bar.set_postfix_str(status)

    def samples(self, ema_net, cfg, data, device: torch.device, step: int, decode=None) -> None:
        """Rank 0 writes a sample grid of the EMA weights (ema_net is None elsewhere)."""
        if self.is_main:
            try:
                path, grid = write_sample_grid(ema_net, cfg, data, device, self.out / "samples" / f"step_{step:08d}",
                                               decode)
            except OSError as err:  # the run's checkpoint is written first; a grid is worth no stop
                self.write(f"warning: step {step}: could not write the sample grid ({err.filename or 'samples/'}: "
                           f"{err.strerror or err}); training goes on", file=sys.stderr)
                return
            self.write(f"step {step}: samples -> {path}")
            for logger in self.loggers if grid is not None else ():
                logger.log_image(step, "samples", grid)


def write_sample_grid(ema_net, cfg, data, device, path: Path, decode=None) -> tuple[Path, torch.Tensor | None]:
    """A grid (images; latents decoded by `decode`) or .npy (vectors) of 64 samples from the
    EMA weights, always from the same noise so grids are comparable across steps. Returns the file
    and, for images, the grid as saved ((C, H, W) in [0, 1], for the loggers)."""
    from torchvision.utils import make_grid, save_image

    from .data.datasets import viewable

    steps, flow_steps = METHODS[cfg.method].grid_steps(cfg)
    generator = torch.Generator(device).manual_seed(cfg.seed + 1_000_003)
    x = sample(ema_net, cfg.method, 64, data.shape, steps, flow_steps, generator, cfg.sample_grid).float().cpu()
    path.parent.mkdir(exist_ok=True)
    if data.kind == "latent":
        x = decode(x.to(device)).cpu()
    buffer = io.BytesIO()  # rendered in memory, written atomically (files.py)
    if data.kind in ("image", "latent"):
        grid = make_grid(viewable(x), nrow=8, padding=1)
        path = path.with_suffix(".png")
        save_image(grid, buffer, format="png")
    else:
        grid = None
        path = path.with_suffix(".npy")
        np.save(buffer, x.numpy())
    write_atomic(path, buffer.getvalue())
    return path, grid


def elapsed_so_far(path: Path) -> float:
    """The elapsed_s of metrics.jsonl's last record (after keep_metrics_until: at or before the checkpoint a run
    resumes from), 0 without one."""
    try:
        return float(json.loads(path.read_text().splitlines()[-1])["elapsed_s"])
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return 0.0


def keep_metrics_until(path: Path, step: int, pending: dict | None = None) -> None:
    """On resume, drop the metrics logged after the checkpoint (they will be logged again), and a last
    line cut short by a killed process; add the checkpoint's pending record (its step's, kept while its FD
    was measured after the save) if the process was killed before writing it."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    lines = [line for line in path.read_text().splitlines() if line and kept(line)] if path.exists() else []
    if pending is not None and pending["step"] == step and not any(json.loads(line)["step"] == step for line in lines):
        lines.append(json.dumps(pending))
    if path.exists() or lines:
        write_atomic(path, "".join(line + "\n" for line in lines).encode())


def drop_samples_after(folder: Path, step: int) -> None:
    """On resume (or a fresh start, step 0), remove the sample grids saved after the checkpoint: a killed or
    set-aside timeline's, which would otherwise sit among the new run's (they are drawn again); and what a
    process killed while writing one left (write_atomic's .tmp-*)."""
    for path in folder.glob(".tmp-*"):
        path.unlink(missing_ok=True)
    for path in folder.glob("step_*.*"):
        try:
            if int(path.stem.removeprefix("step_")) > step:
                path.unlink()
        except ValueError:  # not one of ours (step_final.png, say): left alone
            continue
