"""Training curves where researchers already look: TensorBoard and Weights & Biases.

    python -m stmd_fast.train --loggers tensorboard        # RUN/tensorboard/, then: tensorboard --logdir RUN
    python -m stmd_fast.train --loggers wandb              # RUN/wandb/, offline unless W&B is set up to go online

Both are optional extras (pip install -e ".[tensorboard]" or ".[wandb]"), imported only when
asked for; a missing one is a one-line error naming the extra, raised before any training. Each
logger receives what metrics.jsonl receives (the same record, the same steps) and the sample
grids as images. Only rank 0 opens a logger (the trainer's job).

W&B runs offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set, and says which it is
and where the run is kept: an offline run uploads later with `wandb sync RUN/wandb/offline-run-*`.
metrics.jsonl (cut back to the checkpoint on a resume) is what both show: every start writes new
TensorBoard event files and opens a new W&B run, which get metrics.jsonl's records and grids up to
the checkpoint resumed from, then go on. So a logger first named on a resume (--loggers may change
there) still shows the whole run, and what a stopped process logged after its checkpoint is gone,
as from metrics.jsonl (W&B's steps only increase: an earlier run could not drop them). The earlier
W&B run's offline copy is deleted (RUN/wandb/run-id names the current one); an online one stays on
the server, and is named. A run that ends with an error is marked failed in W&B (exit code 1).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import shlex
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from .cli import clipped

LOGGERS = ("tensorboard", "wandb")
# the package each logger imports, and the extra of pyproject.toml that installs it
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


class LoggerUnavailable(ValueError):
    """An unknown logger, or its package is not installed or does not import: the message names the fix."""


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A grid in [0, 1] as the 8-bit pixels its PNG holds: torchvision's save_image's own rounding (halves up)."""
    return image.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def check_loggers(names: tuple[str, ...] | list[str]) -> None:
    """LoggerUnavailable unless every name is a logger whose package is installed and imports (before any work:
    a broken install failed only when the logger opened, after start-up, with a traceback)."""
    for name in names:
        if name not in LOGGERS:
            raise LoggerUnavailable(f"--loggers {name}: unknown logger; choose from {', '.join(LOGGERS)}")
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise LoggerUnavailable(f"--loggers {name} needs the {_PACKAGE[name]} package: "
                                    f"pip install -e \".[{name}]\" (or pip install {_PACKAGE[name]})")
        try:
            importlib.import_module(_PACKAGE[name])
        except Exception as err:  # any error of a broken install: a missing dependency, a version clash
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LoggerUnavailable(f"--loggers {name}: the {_PACKAGE[name]} package is installed but fails to import "
                                    f"({type(err).__name__}: {reason}): reinstall it (pip install --force-reinstall "
                                    f"{_PACKAGE[name]}), or drop --loggers {name}") from None


class TensorBoardLogger:
    """Scalars and images into RUN/tensorboard/ through torch's SummaryWriter."""

    def __init__(self, run_dir: Path, config: dict, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        # The earlier events are removed, not purged (purge_step): they may stop short of the checkpoint (a
        # start with --loggers none in between) or go past it; metrics.jsonl replayed below is the whole run
        for old in self.log_dir.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = SummaryWriter(str(self.log_dir))
        self._restore_excepthook = _quiet_tensorboard_writer_threads()
        self.writer.add_text("config", _as_markdown(config), 0)
        replay(self, Path(run_dir), start_step)
        print(f"TensorBoard: {self.log_dir} (tensorboard --logdir {shlex.quote(str(run_dir))})", flush=True)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        with self._naming_the_folder():
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # once per log interval: the curves are live

    def log_image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """image: (C, H, W) in [0, 1], stored as the PNG grid's 8-bit pixels (rounded: given floats, add_image
        truncates, one level darker than the PNG)."""
        with self._naming_the_folder():
            self.writer.add_image(tag, to_uint8(image), step)
            self.writer.flush()

    def close(self, failed: bool = False) -> None:
        try:
            with self._naming_the_folder():
                self.writer.close()
        finally:
            self._restore_excepthook()

    @contextmanager
    def _naming_the_folder(self):
        """A failed write comes back from the writer thread without its file: it is named here."""
        try:
            yield
        except OSError as err:
            if err.filename is not None or err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, str(self.log_dir)) from err


def _quiet_tensorboard_writer_threads():
    """TensorBoard's writer thread prints the traceback of a write that failed (a full disk), then the
    same error is raised again in the main thread at the next write or flush, where the trainer makes it
    one line naming the file and the fix: the thread's copy is dropped, others' are printed as before.
    Returns what puts the process's hook back (the logger's close): a host's own writers later keep theirs."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return lambda: None

    def hook(args):
        if not type(args.thread).__module__.startswith("tensorboard."):
            previous(args)

    def restore():
        if threading.excepthook is hook:  # else someone set their own since: theirs stays
            threading.excepthook = previous

    hook.quiets_tensorboard = True
    threading.excepthook = hook
    return restore


class WandbLogger:
    """Scalars and images into a W&B run kept in RUN/wandb/ (offline unless set up to go online)."""

    def __init__(self, run_dir: Path, config: dict, start_step: int = 0, project: str = "stmd_fast"):
        import wandb

        root = Path(run_dir) / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run-id"
        kept = id_file.read_text().strip() if id_file.exists() else ""
        # Every start is a new W&B run. A resume replays metrics.jsonl's records up to its checkpoint into it
        # (below): W&B's steps only increase, so the earlier run would keep what the stopped process logged
        # after the checkpoint beside the new values. The earlier run's offline copy is deleted (else wandb
        # sync RUN/wandb/offline-run-* would upload it too); an online one stays on the server, and is named.
        run_id = secrets.token_hex(4)
        for dead in root.glob(f"offline-run-*-{kept}") if kept else ():
            shutil.rmtree(dead, ignore_errors=True)
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)  # no console capture (the
        # progress bar stays ours), no system-metrics sampler
        if mode == "online":  # without a network W&B waits out its timeout before failing: not a hang, say so
            timeout = os.environ.get("WANDB_INIT_TIMEOUT") or f"{settings.init_timeout:.0f}"  # as wandb.init takes it
            print(f"W&B: connecting to start an online run (W&B waits up to {timeout} s for its server, "
                  f"WANDB_INIT_TIMEOUT; WANDB_MODE=offline keeps the run here to upload later)", flush=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=Path(run_dir).name,
                                  id=run_id, resume="allow", dir=str(run_dir), config=config, mode=mode,  # RUN/wandb/
                                  settings=settings)
        except Exception as err:  # no key (UsageError), no network (CommError after its timeout), a bad project
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LoggerUnavailable(f"--loggers wandb: W&B could not start a{'n' if mode[0] in 'aeiou' else ''} {mode} "
                                    f"run ({type(err).__name__}: {clipped(reason, 200)}): log in (wandb login) or check "
                                    f"the network, or keep the run here and upload it later: WANDB_MODE=offline"
                                    ) from None
        self._wandb = wandb
        self.mode = mode
        replay(self, Path(run_dir), start_step)
        if start_step and kept and mode != "offline":
            print(f"W&B: run {run_id} holds this run's records up to step {start_step} and goes on; the earlier W&B "
                  f"run {kept} also holds those its stopped process logged after step {start_step}", flush=True)
        if mode == "offline":
            kept_in = Path(self.run.dir).parent
            print(f"W&B: offline (set WANDB_MODE=online or WANDB_API_KEY to go online); the run is kept in "
                  f"{kept_in}: upload it later with wandb sync {shlex.quote(str(kept_in))}", flush=True)
        else:
            print(f"W&B: {mode} run {self.run.id} (project {self.run.project})", flush=True)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """image: (C, H, W) in [0, 1]; gray + alpha (a 2-channel run's grid) goes as RGBA: W&B refuses 2 channels."""
        if image.shape[0] == 2:
            image = torch.cat([image[:1].expand(3, -1, -1), image[1:]])
        pixels = to_uint8(image).permute(1, 2, 0).squeeze(-1).cpu().numpy()
        self.run.log({tag: self._wandb.Image(pixels)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a nonzero exit as a failed run
        # finish() can return before W&B's service process has written the run file; teardown waits for it
        self._wandb.teardown()


def replay(logger, run_dir: Path, start_step: int) -> None:
    """metrics.jsonl's records up to start_step (the checkpoint resumed from; none at 0), with the sample grids
    of their steps, into a logger as they were logged (a NaN, written to metrics.jsonl as null, as NaN)."""
    import numpy as np
    from PIL import Image

    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if start_step and path.exists() else ():
        record = json.loads(line)
        if record["step"] > start_step:
            break
        logger.log_scalars(record["step"], {k: math.nan if v is None else v for k, v in record.items() if k != "step"})
        grid = run_dir / "samples" / f"step_{record['step']:08d}.png"
        if grid.exists():
            with Image.open(grid) as image:  # as written: gray, gray + alpha, RGB or RGBA
                pixels = np.array(image if image.mode in ("L", "LA", "RGB", "RGBA") else image.convert("RGB"))
            pixels = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1).float() / 255
            logger.log_image(record["step"], "samples", pixels)


def open_loggers(names, run_dir: Path, config: dict, start_step: int = 0) -> list:
    """The loggers named (checked first), opened in run_dir; start_step > 0 when a run resumes."""
    check_loggers(names)
    kinds = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
    return [kinds[name](run_dir, config, start_step) for name in names]


def _as_markdown(config: dict, indent: str = "") -> str:
    # TensorBoard's text tab renders markdown: one line per setting, nested configs indented
    lines = []
    for key, value in config.items():
        if isinstance(value, dict):
            lines += [f"{indent}- {key}:", _as_markdown(value, indent + "    ")]
        else:
            lines.append(f"{indent}- {key}: `{value}`")
    return "\n".join(lines)
