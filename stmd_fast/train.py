"""python -m stmd_fast.train: train STMD (or the Mean Flow / DDPM baselines) on one device,
or on K processes with torchrun --nproc_per_node=K -m stmd_fast.train (see stmd_fast/distributed.py).

Reads top to bottom: parse flags -> resolve the config (preset, overrides, or the
checkpoint being resumed) -> check everything the user gave (before expensive work) ->
one training loop -> checkpoints, sample grids, metrics.jsonl in the run directory.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys


def _stop_with_the_agent() -> None:
    """Under torchrun: a SIGTERM to this worker when its agent, the parent process, dies, even by SIGKILL
    (which forwards nothing), so that the worker stops as on torchrun's own SIGTERM, with a checkpoint a step
    later, instead of training on unsupervised and holding the run's lock. Set before the imports (seconds),
    while the agent is still the parent. Linux only (prctl). The kernel sends the death signal as each of the
    agent's threads ends (measured: 1 to 7 times), so it is SIGUSR2, turned into one SIGTERM here: a repeat
    is no second signal, which would quit at once, mid-save. A --no-python wrapper between them defeats it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    said = []

    def agent_died(signum, frame):
        if not said:
            said.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR2, agent_died)
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR2) == 0 and os.getppid() != parent:  # PR_SET_PDEATHSIG
        agent_died(signal.SIGUSR2, None)  # the agent died in between: the signal it can no longer send


if __name__ == "__main__":  # a Ctrl-C, SIGTERM or hang-up while torch and the rest import (seconds): one line
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing("interrupted during start-up, before the first step; nothing was written or changed")
    _stop_with_the_agent()

# ruff: noqa: E402 (the imports below come after that handler on purpose)
import argparse
import hashlib
import io
import json
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack, nullcontext, redirect_stderr
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch

from . import distributed, parallel
from .checkpoint import (CheckpointError, NonFiniteState, ReadFailed, find_checkpoint, is_intact, is_run_config,
                         list_checkpoints, newest_intact, recover_leftovers, run_holding, saved_config, set_aside,
                         write_json_atomic)
from .cli import (Interrupted, Parser, UserError, add_dataclass_flags, clipped, one_line_errors, provenance,
                  quiet_if_hung_up, stop_signals)
from .config import LATENT_RESOLUTION, PRESETS, RESUME_OVERRIDABLE, TrainConfig, choose_net, flag_of, preset_for_data
from .data.datasets import DataError
from .devices import out_of_memory, resolve_device, tf32_kept, use_tf32
from .distributed import GradientSyncFailed
from .engine import (broken_compiled_library, inductor_cache_dir, make_ema_update, make_optimizer,  # noqa: F401
                     make_train_step, remove_interrupted_compiles)  # (make_ema_update, make_optimizer re-exported)
from .evaluate import FD_PRESETS
from .files import (LOCK_FILE, RunLocked, WriteFailed, file_identity, local_pattern, remove_stale_temps, run_lock,
                    temp_sibling, write_fix)
from .kernels import dispatch
from .loggers import LoggerUnavailable, check_loggers, open_loggers
from .methods import METHODS
from .models import count_params
from .objectives import ObjectiveConfig, compute_loss
from .parallel import Sharded, Single
from .run_log import IntervalSums, RunLog, drop_samples_after, elapsed_so_far, keep_metrics_until
from .startup import finished_on_stop_signals, imports_done, run_and_exit, second_signal_handler
from .training_state import TrainingState

# Appendix D's parameter counts, and why ours differ (printed at start-up).
PAPER_PARAMS = {
    "mnist": (1.1e6, "the paper's '1 layer per block' gives 0.79M in UNet2DModel; 2 layers per block come closest"),
    "cifar10": (37.5e6, "UNet2DModel with the channels, layers and attention the paper lists; the paper does not list "
                        "the rest (head size, time-embedding width, mid block), and our scale-shift time embedding "
                        "doubles each block's time projection"),
}


class TrainingDiverged(Exception):
    """The loss, or the weights, became NaN or inf."""


class PeerLost(Exception):
    """Under torchrun another process is gone (killed, crashed) and a collective failed: this one stops too."""


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m stmd_fast.train",
        description="Train STMD (a conditional Mean Flow that samples p(x_0 | x_s)), or the Mean Flow / DDPM "
                    "baselines with the same network. With no flags: the built-in 8x8 digits on this machine.",
        epilog="A flag left out takes the preset's value. Outputs in --out: config.json, metrics.jsonl, "
               "samples/step_*.png (.npy for vectors), checkpoints/step_*/ (see README). Several processes: torchrun "
               "--nproc_per_node=K -m stmd_fast.train ... (NCCL on CUDA, one GPU per process; gloo on CPU); "
               "--batch-size stays the global batch, rank 0 logs and writes checkpoints, and with torchrun "
               "--max-restarts=N a restarted job continues from its last checkpoint.",
        argument_default=argparse.SUPPRESS,  # so we know which flags were given explicitly
    )
    presets = [make() for make in PRESETS.values()]
    digits = PRESETS["digits"]()  # the defaults --help shows

    def shown(value) -> str:  # as typed on the command line: "1 2 4", not "(1, 2, 4)"
        if isinstance(value, (tuple, list)):
            return " ".join(map(str, value)) if value else "none"
        return str(value)

    def default(name: str, of=lambda cfg: cfg) -> str | None:
        value = getattr(of(digits), name)
        if name != "preset" and any(getattr(of(cfg), name) != value for cfg in presets):
            return "preset's" if value is None else f"preset's; digits {shown(value)}"
        return "unset" if value is None else shown(value)

    add_dataclass_flags(p, TrainConfig, default)
    add_dataclass_flags(p, ObjectiveConfig, partial(default, of=lambda cfg: cfg.objective),
                        skip=("s_grid",))  # the run's --sample-grid
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint; "
                   f"only {', '.join(flag_of(name) for name in sorted(RESUME_OVERRIDABLE))} "
                   "may change")
    p.add_argument("--log", nargs="*", action=Renamed, help=argparse.SUPPRESS)  # an earlier version's name
    return p


class Renamed(argparse.Action):
    """A flag an earlier version had under another name: one line naming the new one and why."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now --loggers (torchrun's parser takes a --log after the script for an "
                     f"ambiguous abbreviation of its --log-dir and --logs-specs): --loggers "
                     f"{' '.join(values) or 'tensorboard'}")


OBJECTIVE_FLAGS = {f.name for f in fields(ObjectiveConfig)}


def resolve_config(given: dict) -> tuple[TrainConfig, bool]:
    """The run's config from the explicitly given flags: a preset with overrides, or, with
    --resume, the newest checkpoint's config. Returns (config, resume)."""
    resume = given.pop("resume", False)
    top = {k: v for k, v in given.items() if k not in OBJECTIVE_FLAGS}
    if top.get("data_dir") == "":
        raise UserError("--data-dir is empty: give the folder of the mnist / cifar10 files")
    if "data_dir" in top:  # saved absolute, as --data is: the run resumes and is evaluated from any folder
        top["data_dir"] = str(Path(top["data_dir"]).resolve())
    objective = {k: v for k, v in given.items() if k in OBJECTIVE_FLAGS}
    fresh = PRESETS[top.get("preset") or preset_for_data(top.get("data"))]().to_dict()
    fresh["data_dir"] = str(Path(fresh["data_dir"]).resolve())  # the default too
    fresh.update(top)
    fresh["objective"].update(objective)
    if "data" in top and fresh["preset"] not in LATENT_RESOLUTION:
        fresh["net"] = None  # chosen from the data's shape once it is loaded
    if "out" not in top:
        fresh["out"] = None  # derived from preset/data and method
    try:
        cfg = TrainConfig(**fresh)
        cfg.check_new_run()
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.out and (run_dir := run_holding(cfg.out)) is not None:  # training in there would rewrite a checkpoint
        raise UserError(f"--out {cfg.out} is inside the checkpoints of the run {run_dir}: give the run's own folder, "
                        f"--out {shlex.quote(str(run_dir))}")
    if not resume and not elastic_restart_of_this_run(cfg.out):
        return cfg, False
    refuse_a_file_as_out(Path(cfg.out))  # not "cannot read FILE/config.json"
    refuse_files_as_run_folders(Path(cfg.out), resume)  # (an elastic restart: torchrun's, not --resume)
    try:
        ckpt, meta, _ = newest_intact(cfg.out, finite=True, fix=nothing_to_resume(cfg.out))
    except FileNotFoundError:
        refuse_if_live(cfg.out)  # a live run before its first checkpoint: say so, not "no checkpoint"
        raise UserError(f"--resume: no checkpoint in {cfg.out}: give the run's --out, or drop --resume to start") \
            from None
    except ReadFailed as err:
        raise UserError(f"--resume: {err}") from None
    except CheckpointError as err:
        refuse_if_live(cfg.out)
        raise UserError(f"--resume: {err}") from None
    try:  # intact, but a field or value this code does not take (another stmd_fast version, an edit): said now
        saved_config(ckpt, meta)
    except CheckpointError as err:
        raise UserError(f"--resume: {err}") from None
    refuse_a_foreign_checkpoint(Path(cfg.out), ckpt, meta)
    saved = meta["config"]
    # a flag the resumed run does not read gets main's note, not a refusal (those it may change are applied)
    resumed = TrainConfig(**{**saved, **{k: v for k, v in top.items() if k in RESUME_OVERRIDABLE}})
    not_read = set(unread_flags(resumed))
    unread = not_read - RESUME_OVERRIDABLE
    top = {key: value for key, value in top.items() if key not in unread}
    objective = {key: value for key, value in objective.items() if key not in unread}
    for key, value in top.items():  # as typed, or as the run saves it (a path made absolute)
        if key not in RESUME_OVERRIDABLE and key != "out" and saved.get(key) not in (value, getattr(cfg, key)):
            raise UserError(f"--resume: {cfg.out} was trained with {as_flag(key, saved.get(key))}, not "
                            f"{as_flag(key, value)}: drop the flag, or use a new --out to start another run")
    for key, value in objective.items():
        was = saved["objective"].get(key, getattr(ObjectiveConfig(), key))  # older than the flag: its default
        if was != value:
            raise UserError(f"--resume: {cfg.out} was trained with {as_flag(key, was)}, not {as_flag(key, value)}: "
                            f"drop the flag, or use a new --out to start another run")
    measured_otherwise = [f"{as_flag(key, saved.get(key))} -> {as_flag(key, value)}" for key, value in top.items()
                          if key in FD_SERIES_FLAGS and key not in not_read  # (DDPM's N on STMD: main's note)
                          and saved.get(key) not in (value, getattr(cfg, key))]
    if measured_otherwise and (saved.get("fd_every") or top.get("fd_every")) and distributed.from_env().is_main:
        print(f"note: --resume with {', '.join(measured_otherwise)}: the FD logged from step {meta['step']} on is "
              f"measured otherwise than the FD before it, so a step in the curve there may be the measurement's",
              file=sys.stderr)
    saved.update({k: v for k, v in top.items() if k in RESUME_OVERRIDABLE}, out=cfg.out)  # the run may have moved
    if saved.get("parallel") == "fsdp" and "parallel" not in top and not distributed.from_env().launched:
        saved["parallel"] = "ddp"  # an FSDP run's (unsharded) checkpoint continues in one process
    try:
        resumed = TrainConfig(**saved)
        resumed.check_grid_cost()  # a new --sample-steps beside the run's own --sample-flow-steps, say
    except ValueError as err:
        raise UserError(f"--resume: {err}") from None
    return resumed, True


FD_SERIES_FLAGS = ("fd_num", "fd_classifier", "sample_steps", "sample_flow_steps", "sample_ddpm_steps")
"""What --fd-every's FD is measured with (its samples drawn as the grids' are, N x M): a resume may change them,
and the logged series then changes meaning."""


def as_flag(key: str, value) -> str:
    """A config value as the flags that set it: --tf32 / --no-tf32, --ema-decays 0.9 0.99, --unet unset."""
    flag = flag_of(key)
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"  # every switch has its --no- form (cli.add_dataclass_flags)
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(map(str, value))}" if value else f"no {flag}"
    return f"{flag} {value}" if value is not None else f"{flag} unset (the preset's default)"


FLOW_FLAGS = ("time_sampler", "time_mean", "time_std", "r_mean", "r_std", "mixture_weight", "flow_grid_fraction",
              "flow_grid_steps", "flow_matching_fraction", "adaptive_p", "adaptive_c", "sample_flow_steps")
"""What only a method with a flow (STMD, Mean Flow) reads."""
DIFFUSION_FLAGS = ("s_sampler", "s_grid_fraction", "s_grid_steps", "sample_steps", "sample_grid")
"""What only a method with diffusion time (STMD, DDPM) reads (DDPM's sample grids take --sample-ddpm-steps)."""


TIME_LAW_FLAGS = ("time_sampler", "time_mean", "time_std", "r_mean", "r_std", "mixture_weight", "flow_grid_fraction",
                  "flow_grid_steps", "s_sampler", "s_grid_fraction", "s_grid_steps")
"""The laws objectives.draw_noise draws the times from."""


def check_fd_files(cfg: TrainConfig) -> None:
    """UserError for an FD classifier or Inception weights the run reads that are not there: said at once, not
    once the data, the network and the metric's imports are in (seconds; on a latent preset, after the VAE)."""
    unread = unread_flags(cfg)
    classifier, weights = cfg.fd_classifier, cfg.inception_weights
    if "fd_classifier" not in unread and classifier is not None and not Path(classifier).expanduser().is_dir():
        raise UserError(f"--fd-classifier {classifier}: no such folder; give the folder "
                        f"python -m stmd_fast.evaluate train-classifier wrote")
    if "inception_weights" not in unread and weights is not None and not Path(weights).expanduser().is_file():
        raise UserError(f"--inception-weights {weights}: no such file; give the path of the downloaded Inception "
                        f"weights")


def unused_flags(cfg: TrainConfig, given) -> list[str]:
    """A note for each flag the user gave that this run does not read (the method, or the data, has no use
    for it), so that a typo of intent is not silently ignored."""
    why = unread_flags(cfg)
    notes = [f"note: {flag_of(name)} has no effect on this run: {why[name]}" for name in given if name in why]
    if "preset" in given and "data" in given and cfg.preset not in LATENT_RESOLUTION:
        notes.append(f"note: --preset {cfg.preset} with --data: the preset's training settings are kept, its network "
                     f"is not: one is chosen for the data's shape (--unet or --dit picks another)")
    if METHODS[cfg.method].flow and cfg.objective.jvp_block[0] == 0:
        notes.append(f"note: --flow-matching-fraction {cfg.objective.flow_matching_fraction:g}: every row has r = t, "
                     f"so this trains plain flow matching: no row teaches the jumps r < t that "
                     f"{METHODS[cfg.method].label}'s few-step sampler takes (an ablation; below 1 for the method)")
    return notes


def unread_flags(cfg: TrainConfig) -> dict[str, str]:
    """{flag's field: why this run does not read it}: the method, the data or the laws of the times have no use
    for it."""
    method = METHODS[cfg.method]
    image_folder = cfg.data is not None and Path(cfg.data).is_dir() and cfg.preset not in LATENT_RESOLUTION
    # the unread times are still drawn (every method draws one Noise), so a law that draws more or fewer numbers
    # moves the noise drawn after it: the run is another draw of the same law, not the same run
    drawn = " (beyond the random stream: its times are still drawn, so another law of them can change the noise drawn " \
        "after them)"
    why = {name: f"{method.label} has no flow time{drawn if name in TIME_LAW_FLAGS else ''}" for name in FLOW_FLAGS
           if not method.flow}
    why |= {name: f"{method.label} has no diffusion time{drawn if name in TIME_LAW_FLAGS else ''}"
            for name in DIFFUSION_FLAGS if not method.diffusion}
    if cfg.method == "ddpm":
        why["sample_steps"] = "DDPM's sample grids take --sample-ddpm-steps"
    else:
        why["sample_ddpm_steps"] = "only DDPM's sample grids read it"
    # a --data that is not there gets its own error next, and may well have been meant as a folder
    missing = cfg.preset not in LATENT_RESOLUTION and cfg.data is not None and data_gone(cfg.data)
    if not image_folder and not missing:
        why["resolution"] = "it sizes an image folder (--data DIR); this run's data have their own size"
    if cfg.preset not in LATENT_RESOLUTION:
        why["vae"] = "it is for the latent presets (--preset latent or celeba-latent)"
    if not cfg.fd_every:
        why |= {name: "it sets up --fd-every K, which this run does not use"
                for name in ("inception_weights", "fd_classifier", "fd_num")}
    elif cfg.data is None and cfg.preset in FD_PRESETS:
        why["inception_weights"] = f"{cfg.preset} is scored by FD on the classifier's features, not Inception FID"
    else:
        why["fd_classifier"] = "this data is scored by Inception FID; the FD classifier is for digits and mnist"
    if cfg.preset not in LATENT_RESOLUTION:
        why |= {name: "it is for latent shards (--preset latent or celeba-latent)"
                for name in ("data_workers", "strict_data")}
    if cfg.data is not None or cfg.preset not in ("mnist", "cifar10"):
        why |= {name: "the mnist and cifar10 presets alone read their files from it (and not with --data)"
                for name in ("data_dir", "download")}
    if cfg.precision == "bf16":
        why["tf32"] = "it is about fp32 matmuls; under --precision bf16 they run in bf16"
    elif cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        why["tf32"] = "TF32 is a CUDA matmul mode; this run is on the CPU"
    if cfg.parallel == "ddp" and not distributed.from_env().launched:  # fsdp without torchrun is an error
        why["parallel"] = "DDP splits the work of torchrun's processes; this run is one process"
    law = cfg.objective
    laws = {}  # what the chosen laws of the times leave unread (the method's reasons above come first)
    if law.time_sampler == "pair":
        laws |= {name: "--time-sampler pair draws r and t from one law (--time-mean, --time-std)"
                 for name in ("r_mean", "r_std")}
    if law.time_sampler == "mixture" and law.mixture_weight == 0:
        laws |= {name: "--mixture-weight is 0: every row is drawn from the pair law" for name in ("r_mean", "r_std")}
    if law.time_sampler != "mixture":
        laws["mixture_weight"] = f"--time-sampler mixture alone reads it; this run's is {law.time_sampler}"
    if not law.flow_grid_fraction:
        laws["flow_grid_steps"] = "--flow-grid-fraction is 0: no row is drawn on the flow grid"
    if law.flow_grid_fraction == 1:  # the law's draws are made first all the same: the sampler's count of them
        laws |= {name: "--flow-grid-fraction is 1: every row's (r, t) is drawn on the flow grid"
                 + (drawn if name == "time_sampler" else "")
                 for name in ("time_sampler", "time_mean", "time_std", "r_mean", "r_std", "mixture_weight")}
    if law.s_sampler == "uniform":
        laws |= {name: "--s-sampler uniform draws s from U(0, 1] alone" for name in ("s_grid_fraction", "s_grid_steps")}
    elif not law.s_grid_fraction:
        laws["s_grid_steps"] = "--s-grid-fraction is 0: no s is drawn on the grid"
    if not law.adaptive_p:
        laws["adaptive_c"] = "--adaptive-p is 0: the loss weight 1 / (||delta||^2 + c)^0 is 1 whatever c"
    return laws | why


def warmup_note(cfg: TrainConfig, given) -> str | None:
    """A note when a --warmup-steps given outlasts the run: the learning rate never reaches --lr. (A preset's
    warm-up under a short --steps, a quick trial's, is not worth a line.)"""
    if cfg.warmup_steps > cfg.steps and "warmup_steps" in given:
        return (f"note: --warmup-steps {cfg.warmup_steps} outlasts --steps {cfg.steps}: the learning rate is still "
                f"warming up when the run ends and never reaches --lr {cfg.lr:g}")
    return None


def run_id(out: Path, resume: bool) -> str:
    """The run's identity, written into its config.json and every checkpoint: a new random one on a fresh
    start; on a resume the run's own (config.json's, else its newest checkpoint's; a run of a version before
    run ids gets one from here on). A copy of the whole run folder keeps it: a branch of the same run."""
    if resume:
        for read in (lambda: json.loads((out / "config.json").read_text()), lambda: newest_intact(out)[1]):
            try:
                found = read().get("run_id")
            except (OSError, ValueError, AttributeError, CheckpointError):
                continue
            if isinstance(found, str) and found:
                return found
    return uuid.uuid4().hex


def refuse_a_foreign_checkpoint(out: Path, ckpt: Path, meta: dict) -> None:
    """UserError if the newest checkpoint is not one this run wrote (copied in from another run): its run id
    is not the run's config.json's, its step is not the one its folder is named for, or its method, preset or
    data shape is not config.json's. Resumed, it was trained on as this run, which then rotated the run's own
    checkpoints out. (A run or checkpoint of a version before run ids is checked on the rest.)"""
    problems = []
    # (a .replaced-step_X is read while its replacement is missing: a kill between the two renames)
    if ckpt.name.removeprefix(".replaced-") != f"step_{meta['step']:08d}":
        problems.append(f"it holds step {meta['step']}")
    try:
        run = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        run = None  # none (a run of an earlier version, or killed before writing it): nothing to compare with
    if isinstance(run, dict) and isinstance(run.get("config"), dict):
        saved = {"method": meta["config"].get("method"), "preset": meta["config"].get("preset"),
                 "data shape": meta.get("data_shape")}
        runs = {"method": run["config"].get("method"), "preset": run["config"].get("preset"),
                "data shape": run.get("data_shape")}
        problems += [f"its {key} is {saved[key]}, the run's {runs[key]}" for key in saved
                     if runs[key] is not None and saved[key] != runs[key]]
        if None not in (meta.get("run_id"), run.get("run_id")) and meta["run_id"] != run["run_id"]:
            problems.append(f"another run wrote it: run id {meta['run_id']}, this run's {run['run_id']}")
    if problems:
        raise UserError(f"--resume: {ckpt} is not a checkpoint of the run in {out} ({'; '.join(problems)}): move it "
                        f"out of {out / 'checkpoints'} (nothing was changed)")


def refuse_a_file_as_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give a folder for the run (it is made if missing)")


def elastic_restart_of_this_run(out: str) -> bool:
    """torchrun --max-restarts restarted this job's workers with the same command, and the run directory
    holds a checkpoint that this job (Dist.job_id) wrote: continue from it instead of refusing.
    A first attempt, a checkpoint of another job, or no checkpoint: False (a fresh start, as without torchrun)."""
    ctx = distributed.from_env()
    if ctx.restart_count == 0:
        return False
    if ctx.job_id is None:  # else "pass --resume", which no restart can, for every one of --max-restarts
        raise UserError("torchrun restarted this job, which spans several nodes without --rdzv-id: its checkpoints "
                        "cannot be told from another job's; launch it with torchrun --rdzv-id=JOB_ID (the same "
                        "on every node), or continue it by hand with --resume")
    try:
        return newest_intact(out)[1].get("torchelastic_run_id") == ctx.job_id
    except (FileNotFoundError, CheckpointError, OSError):
        return False


# ----------------------------------------------------------------------------- setup

def load_training_data(cfg: TrainConfig, ctx: distributed.Dist = distributed.Dist()):
    """The preset's (or --data's) training set: TensorData, or the gmm preset's GaussianMixture; latent shards
    are split over the torchrun ranks (each reads every K-th shard)."""
    from .data.datasets import load_npy, load_preset

    latent = cfg.preset in LATENT_RESOLUTION
    if latent and (cfg.data is None or cfg.vae is None and cfg.preset != "latent"):
        raise UserError(f"the {cfg.preset} preset trains on VAE latents: encode the images once with "
                        f"python -m stmd_fast.data.encode --images DIR --vae VAE --resolution "
                        f"{LATENT_RESOLUTION[cfg.preset] or 'R'} --out SHARDS, then pass --data SHARDS"
                        f"{' --vae VAE' if cfg.preset != 'latent' else ''}")
    if cfg.preset == "images" and cfg.data is None:
        raise UserError("the images preset trains on your own images: pass --data DIR (a folder of image files)")
    if cfg.flip and latent:
        raise UserError("--flip mirrors pixel images; latents are encoded images: mirror them when encoding "
                        "(python -m stmd_fast.data.encode --flip) and drop --flip here")
    # every rank reads the data, rank 0 says its notes (a file left out, floats in [0, 1]): not once per process
    quiet = nullcontext() if ctx.is_main else redirect_stderr(io.StringIO())
    try:
        with quiet:
            if latent:
                from .data.latents import LatentShards
                return LatentShards(cfg.data, expect_vae=cfg.vae, expect_resolution=LATENT_RESOLUTION[cfg.preset],
                                    num_workers=cfg.data_workers, seed=cfg.seed, rank=ctx.rank,
                                    world_size=ctx.world_size, strict=cfg.strict_data)
            if cfg.data is not None and Path(cfg.data).expanduser().is_dir():
                from .data.images import load_image_folder
                return with_flip(load_image_folder(cfg.data, cfg.resolution), cfg.flip)
            if cfg.data is not None:
                return with_flip(load_npy(cfg.data), cfg.flip)
            return with_flip(load_preset(cfg.preset, "train", cfg.data_dir, cfg.download), cfg.flip)
    except DataError as err:
        raise UserError(str(err)) from None


def with_flip(data, flip: bool):
    """The data with --flip's random mirroring on (TensorData images only)."""
    if not flip:
        return data
    if getattr(data, "kind", None) != "image":
        raise UserError(f"--flip mirrors images; this run's data are {getattr(data, 'kind', 'vectors')}s: drop --flip")
    return dataclasses.replace(data, flip=True)


RUN_FOLDERS = ("checkpoints", "samples", "tensorboard", "wandb")  # what a run writes in below its --out


def refuse_files_as_run_folders(out: Path, resume: bool) -> None:
    """UserError for a file where the run writes one of its folders: each grid failed on it ("File exists"), a
    warning each, and the run went on to exit 0 with none; a --resume said "no checkpoint"."""
    for name in RUN_FOLDERS:
        if (out / name).exists() and not (out / name).is_dir():
            raise UserError(f"{out / name} is a file where the run writes its {name}/ folder: move the file "
                            f"aside{', then --resume again' if resume else ''}")


def prepare_run_dir(out: Path, resume: bool, held: ExitStack, main: bool = True) -> tuple[int, int] | None:
    """Create --out and check it is writable; take its lock into `held` (one live run per directory);
    refuse a fresh run into a directory that holds checkpoints. main: rank 0 alone makes, probes and
    locks it under torchrun (its ranks are one run; the others use it only after the rendezvous, which
    waits for rank 0). A run that ends before writing anything into a folder it created (bad data, say)
    removes that folder again, and the parents it created. Returns the identity of the lock file held (rank 0;
    None elsewhere): run_folder_gone compares it as the run goes."""
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    refuse_a_file_as_out(out)
    if main:
        refuse_files_as_run_folders(out, resume)
        # the run's own folders too, where they exist: a read-only checkpoints/ was found a whole interval later
        for folder in (out, *(sub for name in RUN_FOLDERS if (sub := out / name).is_dir())):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe_file = temp_sibling(folder / ".write-test")  # named per process: two starts never share it
                probe_file.write_text("ok")
                probe_file.unlink()
            except OSError as err:
                where = f"--out {out}" if folder == out else str(folder)
                # the fix names the folder that failed (a run's checkpoints/ made read-only, say), not --out alone
                fix = write_fix(err, "make it writable (permissions, a read-only mount)").replace("--out", where) + (
                    ", then --resume again" if resume else ", or choose another --out")
                raise UserError(f"cannot write to {where}: {err.strerror or err}: {fix}") from None
        try:
            lock = held.enter_context(run_lock(out))
        except RunLocked as err:
            raise UserError(str(err)) from None
        if created:
            held.callback(remove_if_unused, created)  # runs before the lock is let go
    if not resume and (out / "config.json").exists() and not is_run_config(out / "config.json"):
        raise UserError(f"--out {out} holds a config.json that is not a stmd_fast run's (a run writes its own there): "
                        f"choose a new --out")
    if not resume and find_checkpoint(out) is not None:
        if not any(is_intact(ckpt) for ckpt in list_checkpoints(out)):
            raise UserError(f"{out} holds only damaged checkpoints: move {out / 'checkpoints'} aside to start this "
                            f"run over, or choose a new --out")
        raise UserError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose a new --out")
    return file_identity(lock) if main else None


def nothing_to_resume(out) -> str:
    """What --resume's user can do when none of the run's checkpoints is intact."""
    return (f"nothing to resume from; move {Path(out) / 'checkpoints'} aside to start this run over, or choose a "
            f"new --out")


def run_folder_gone(run: Run) -> bool:
    """Whether the run folder is no longer the one this process locked (rank 0; False elsewhere): deleted (the next
    write would make it again, without its config.json or the metrics so far, and with no lock: a new run there
    wrote beside this one, which then rotated its checkpoints away), moved, or replaced. A file system that cannot
    say now (an I/O error, a stale NFS handle of a folder still there) is asked again at the next record."""
    if run.lock is None:
        return False
    try:
        return file_identity(run.out / LOCK_FILE) != run.lock
    except OSError:
        return False


def remove_if_unused(created: list[Path]) -> None:
    """The folders prepare_run_dir created (deepest first), removed if the run left nothing of use: its lock,
    and the config.json and empty metrics.jsonl of a run stopped before its first step (during a first
    --compile, say)."""
    out = created[0]
    try:
        left = {entry.name: entry for entry in out.iterdir()}
        if LOCK_FILE not in left or not set(left) <= {LOCK_FILE, "config.json", "metrics.jsonl"} \
                or ("metrics.jsonl" in left and left["metrics.jsonl"].stat().st_size > 0):
            return
        for name in sorted(left, key=lambda name: name == LOCK_FILE):  # the lock last
            left[name].unlink()
    except OSError:  # gone or unreadable: nothing of ours to tidy, and the run's own error says what went wrong
        return
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else lives there now
            return


def refuse_if_live(out) -> None:
    """UserError naming the live process if another training run holds out's lock (probed, then let go)."""
    if (Path(out) / LOCK_FILE).exists():
        try:
            with run_lock(out):
                pass
        except RunLocked as err:
            raise UserError(str(err)) from None


@dataclass
class Run:
    """Everything train() settles before the process group and the training state: all checked."""

    out: Path
    device: torch.device
    data: object
    net: torch.nn.Module
    meta: dict  # config.json and every checkpoint's meta.json
    strategy: Single
    decode: object = None  # latent data: the VAE decoder for sample grids (rank 0)
    fd: object = None  # --fd-every: the TrainingFD that measures the EMAs (rank 0)
    lock: tuple | None = None  # the identity of the run folder's lock file this process holds (rank 0)
    argv: list = field(default_factory=list)  # the command line's arguments, for config.json's "starts"


def prepare_run(cfg: TrainConfig, resume: bool, ctx: distributed.Dist, held: ExitStack) -> Run:
    """Check everything the user gave, before expensive work; lock the run directory (into `held`), load
    the data and build the network."""
    try:
        distributed.check_launch(ctx)
        device = distributed.process_device(ctx, resolve_device(cfg.device))
        jvp_rows = METHODS[cfg.method].flow  # the JVP rows are a fixed count per block of the batch
        distributed.check_parallel(ctx, cfg.parallel, cfg.batch_size, cfg.objective.jvp_block[1] if jvp_rows else 1,
                                   resume)
        if jvp_rows:
            cfg.objective.check_batch(cfg.batch_size // ctx.world_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.kernels == "triton" and device.type != "cuda" and not dispatch.interpret_mode():
        raise UserError(f"--kernels triton runs on CUDA, not on {device}: use --kernels auto (PyTorch references "
                        f"on a CPU) or --device cuda")
    try:
        check_loggers(cfg.log)
    except LoggerUnavailable as err:
        saved = " (this run's --loggers, from its config.json; --resume --loggers none goes on without it)" if resume else ""
        raise UserError(f"{err}{saved}") from None
    if device.type == "cuda":  # --tf32 is about fp32 math: under bf16 autocast the matmuls are bf16 anyway
        use_tf32(cfg.tf32 and cfg.precision == "fp32")
    out = Path(cfg.out)
    lock = prepare_run_dir(out, resume, held, main=ctx.is_main)
    try:
        data = load_training_data(cfg, ctx)
    except UserError:
        if resume and cfg.data is not None and data_gone(cfg.data):
            raise UserError(f"--resume: {out} was trained on --data {cfg.data}, which is gone: if it moved, "
                            f"resume with --data NEW_PLACE (samples of the same shape)") from None
        raise
    digest = data_sha256(data)  # on the CPU, before the data moves to the device
    if resume:
        check_same_data(out, cfg, data, ctx.is_main, digest)
    try:  # before the VAE loads: a --unet for latents or a DiT patch that does not divide them is said at once
        cfg.net = choose_net(cfg, data.shape, data.kind)
    except ValueError as err:
        raise UserError(str(err)) from None
    if data.kind == "latent" and cfg.vae is None:
        cfg.vae = data.manifest["vae"]  # preset latent: the VAE the shards were encoded with
    decode = None
    if data.kind == "latent" and ctx.is_main:  # load the VAE now (rank 0 draws the grids): a bad --vae fails here
        from .data.vae import latent_decoder
        try:
            decode = latent_decoder(cfg.vae, device, data.scaling_factor, data.shift_factor,
                                    fits=(list(data.shape), data.manifest["resolution"],
                                          data.manifest.get("vae_sha256")),
                                    moved=f"if it moved, pass its new place: {'--resume ' if resume else ''}--vae DIR")
        except DataError as err:
            raise UserError(str(err)) from None
    torch.manual_seed(cfg.seed)  # network init
    try:
        net = METHODS[cfg.method].build_net(cfg.net, data.shape, cfg.dropout).to(device)
    except ValueError as err:
        raise UserError(f"the network does not fit the data: {err}") from None
    data = data.to(device)
    meta = {"config": cfg.to_dict(), "data_shape": list(data.shape), "data_count": sample_count(data),
            "data_kind": data.kind, "data_sha256": digest}
    if data.kind == "latent":  # what Model.decode needs
        meta["latent"] = {"vae": cfg.vae, "scaling_factor": data.scaling_factor, "shift_factor": data.shift_factor,
                          "resolution": data.manifest["resolution"], "vae_sha256": data.manifest.get("vae_sha256")}
    # what tells this run's checkpoints from any other's (on a fresh torchrun start each rank draws its own:
    # only rank 0's is written, into config.json and the checkpoints, and read back on a resume)
    meta["run_id"] = run_id(out, resume)
    if ctx.launched:  # lets a torchrun restart of this job tell its own checkpoints from another run's
        meta["torchelastic_run_id"] = ctx.job_id
    fd = None
    if cfg.fd_every and ctx.is_main:  # the metric and its reference statistics now: a missing classifier fails here
        from .fd_monitor import TrainingFD
        try:
            fd = TrainingFD(cfg, meta, data, device, *METHODS[cfg.method].grid_steps(cfg), decode)
        except ValueError as err:
            raise UserError(str(err)) from None
    run = Run(out, device, data, net, meta, parallel.choose(ctx, cfg.parallel, cfg.batch_size, data), decode, fd,
              lock=lock)
    if ctx.is_main:
        print_summary(cfg, run)
    return run


def data_gone(data: str) -> bool:
    """Whether what --data names is not there (of several joined by '::', any one): neither the path as written
    (a folder may be named "photos [2023]") nor, read as a shard pattern, any shard it names."""
    if Path(data).expanduser().exists():
        return False
    from .data.latents import expand_pattern  # webdataset: imported only when needed

    for part in data.split("::"):
        try:
            if not (Path(part).expanduser().exists() or any(Path(shard).exists() for shard in expand_pattern(part))):
                return True
        except (DataError, ValueError):  # a glob that matches nothing; braces that do not expand; a folder gone
            return True
    return False


def check_same_data(out: Path, cfg: TrainConfig, data, main: bool, digest: str | None = None) -> None:
    """A resumed run's data must have the shape per sample it was trained on (its network takes nothing
    else); a changed place (--data), count or content (digest: data_sha256) is allowed, and said. All come
    from the run's config.json."""
    try:
        trained = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return  # no config.json yet: the checkpoint's own checks remain
    source = cfg.data or cfg.preset
    if trained.get("data_shape", list(data.shape)) != list(data.shape):
        raise UserError(f"--resume: {out} was trained on samples of shape {tuple(trained['data_shape'])}, and "
                        f"{source} now gives {tuple(data.shape)}: its network takes nothing else; resume on the data "
                        f"it was trained on, or start a new run with another --out")
    was = trained.get("config", {}).get("data", cfg.data)
    was = local_pattern(was) if was else was  # one saved relative (a pattern, by an older version) is not a move
    if was != cfg.data and main:  # --data given again, elsewhere: the run moved its data (or chose new data)
        print(f"note: the run was trained on {was or 'the ' + cfg.preset + ' preset'}; it continues on {source}",
              file=sys.stderr)
    was_dir = str(Path(trained.get("config", {}).get("data_dir", cfg.data_dir)).expanduser().resolve())
    if cfg.data is None and "data_dir" not in unread_flags(cfg) and was_dir != cfg.data_dir and main:
        print(f"note: the run read its {cfg.preset} files from {was_dir}; it continues on those in {cfg.data_dir}",
              file=sys.stderr)
    count = sample_count(data)
    if trained.get("data_count") not in (None, count) and count is not None and main:
        print(f"note: {source} now holds {count} samples, where the run was trained on {trained['data_count']}: "
              f"it continues on the new set", file=sys.stderr)
    elif trained.get("data_sha256") not in (None, digest) and digest is not None and main:  # rewritten in place
        print(f"note: {source} holds other samples than the run was trained on (the same count, another SHA-256): "
              f"it continues on the new set, no longer as an uninterrupted run would", file=sys.stderr)


def data_sha256(data) -> str | None:
    """SHA-256 of an in-memory dataset's samples (a second or so per GB), so that a resume can tell data
    rewritten in place; None for a latent stream (its shards are checked against their manifest)."""
    if not hasattr(data, "values"):
        return None
    flat = data.values.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256()
    for start in range(0, flat.size, 1 << 26):  # 64 MB at a time: no copy of the whole set
        digest.update(flat[start:start + (1 << 26)])
    return digest.hexdigest()


def sample_count(data) -> int | None:
    """How many samples the data hold: an in-memory dataset's length, a latent stream's count (from its
    manifest, all ranks' shards together); None for a distribution drawn from (gmm)."""
    return len(data) if hasattr(data, "__len__") else getattr(data, "count", None)


def print_summary(cfg: TrainConfig, run: Run) -> None:
    note = ""
    if cfg.data is None and cfg.unet is None and cfg.preset in PAPER_PARAMS:  # --unet: not the paper's layout
        paper, why = PAPER_PARAMS[cfg.preset]
        note = f" (paper: {paper / 1e6:.1f}M; {why})"
    s = run.strategy
    procs = (f"; {s.world} processes ({cfg.parallel}), {s.local_batch} of the batch {cfg.batch_size} each"
             if s.ctx.launched else "")
    print(f"{cfg.method} on {cfg.data or cfg.preset} {tuple(run.data.shape)}: {cfg.net.kind}, "
          f"{count_params(run.net) / 1e6:.3f}M parameters{note}; device {run.device}, {cfg.precision}"
          f"{', compiled' if cfg.compile else ''}{procs}; run dir {run.out}", flush=True)
    count = len(run.data) if hasattr(run.data, "__len__") else None  # in memory: batches draw with replacement
    if count is not None and count < cfg.batch_size:  # legal, but say it
        print(f"note: {cfg.data or cfg.preset} holds {count} samples, fewer than --batch-size {cfg.batch_size}: each "
              f"batch repeats them (drawn with replacement); a network this size will memorize them", file=sys.stderr)


def start_state(cfg: TrainConfig, run: Run, resume: bool) -> TrainingState:
    """The training state, fresh or from the newest intact checkpoint (newer damaged ones are set aside
    as damaged-step_*, and said); config.json written and metrics.jsonl cut back to the checkpoint's
    step (to nothing on a fresh start: what a run killed before its first checkpoint logged), and the
    sample grids of later steps removed."""
    ctx = run.strategy.ctx
    ckpt, passed_over = None, []
    if resume and ctx.is_main:  # under the run's lock
        recover_leftovers(run.out)  # what a kill during a save or rotation left
        try:
            ckpt, _, passed_over = newest_intact(run.out, finite=True, fix=nothing_to_resume(run.out))
        except CheckpointError as err:  # damaged since resolve_config looked
            raise UserError(f"--resume: {err}") from None
        damaged = [c for c in list_checkpoints(run.out) if c.name > ckpt.name]
        passed_over = [f"{reason}; set aside as {set_aside(c).name}" for c, reason in zip(damaged, passed_over)]
    if resume and ctx.distributed:  # the other ranks read the checkpoint rank 0 settled on
        distributed.barrier()
        ckpt = ckpt or newest_intact(run.out)[0]
    try:
        state = TrainingState.build(cfg, run.net, run.data, run.device, run.strategy, ckpt)
    except CheckpointError as err:  # intact, but of another layout: a one-line error, not a traceback
        raise UserError(f"--resume: {err}") from None
    if ctx.is_main:
        remove_stale_temps(run.out)  # of config.json or metrics.jsonl, from a kill while write_atomic replaced it
        # the pending record of a process killed during its FD: added without it, or measured again (loop)
        keep_metrics_until(run.out / "metrics.jsonl", state.step, state.pending_record if run.fd is None else None)
        drop_samples_after(run.out / "samples", state.step)
        if ckpt is not None:
            again = f" (torchrun restart {ctx.restart_count})" if ctx.restart_count else ""
            print(f"resumed from {ckpt} at step {state.step}{again}", flush=True)
            for note in passed_over:
                print(f"note: the newest intact checkpoint was taken; passed over {note}", file=sys.stderr)
        if state.step < cfg.steps:  # a resume with nothing to do leaves config.json saying how the run was trained
            write_json_atomic(run.out / "config.json", {**run.meta, "starts": starts_so_far(run, resume, state.step)})
    return state


def starts_so_far(run: Run, resume: bool, step: int) -> list[dict]:
    """config.json's "starts": how each start of the run was made (the command, the step it began at, the
    processes, the device, the versions, when), this one appended to a resumed run's earlier ones; the
    config beside it is the one of the latest start."""
    earlier = []
    if resume:
        try:
            earlier = json.loads((run.out / "config.json").read_text()).get("starts", [])
        except (OSError, ValueError, AttributeError):  # none yet, or unreadable: the record starts here
            pass
    ctx = run.strategy.ctx  # the command is each process's: torchrun's own flags are not seen from here
    return [*earlier, {**provenance("train", run.argv, run.device), "step": step, "processes": ctx.world_size,
                       "torchrun": ctx.run_id is not None}]


# ----------------------------------------------------------------------------- loop

def train(cfg: TrainConfig, resume: bool = False, argv: list[str] | None = None) -> Path:
    """Run (or continue) training; returns the final checkpoint directory. argv: the command line's arguments
    (config.json records them).

    Under torchrun (K processes; stmd_fast/distributed.py), cfg.batch_size is the GLOBAL batch. Every
    rank draws the same global batch and noise from the same seeded generator, exactly as one process
    does, keeps its slice [rank * b, (rank + 1) * b), b = batch_size / K, of x0 and of every noise
    tensor, and the gradients are averaged over the ranks: K processes take one process's steps (to
    float rounding; the draws are cheap next to the step) and the learning rate is per global batch.
    Latent shards are split by rank instead: each rank reads its own shards and draws b latents and
    their noise from its own generator, which is the same distribution but not bit-equal to one process.
    Rank 0 alone prints, logs (loss and error averaged over ranks), draws sample grids and writes
    checkpoints; the others wait for it at a barrier after each checkpoint (and for its FD and sample grid, which
    come after that barrier, in the next step's gradient all-reduce).
    """
    ctx = distributed.from_env()
    # a Python caller's random streams come back as they were (the network's init and dropout draw from torch's
    # global one; the batches and noise from the run's own generator): CUDA's current device's too, where the caller
    # had started CUDA (a fork over every device would make a context on each)
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    # --tf32 sets a process-wide switch: a caller's comes back too
    with torch.random.fork_rng(devices=cuda), tf32_kept(), ExitStack() as held:  # held: the run directory's lock
        run = prepare_run(cfg, resume, ctx, held)
        run.argv = list(argv or [])
        return train_run(cfg, run, resume)


def train_run(cfg: TrainConfig, run: Run, resume: bool) -> Path:
    """train() once the run is prepared (and its directory locked): the process group, the state, the loop."""
    ctx = run.strategy.ctx
    try:  # torchrun: the process group; every user error above came before it
        distributed.setup(ctx, run.device)
    except distributed.RendezvousFailed as err:
        raise UserError(str(err)) from None
    clean_exit = False
    try:
        state = start_state(cfg, run, resume)
        if state.step >= cfg.steps:
            undone = undone_at_checkpoint(cfg, run, state)  # a last FD or grid a kill left undone
            if any(undone):  # the loggers get them too, as metrics.jsonl and samples/ do
                loggers = open_run_loggers(cfg, run, state.step)
                with RunLog(run.out, cfg.steps, state.step, ctx.is_main, loggers) as log:
                    finish_checkpoints_step(cfg, run, state, log, undone)
            if ctx.is_main:
                print(f"nothing to do: the run is at step {state.step} of --steps {cfg.steps}")
            clean_exit = True
            return find_checkpoint(run.out)
        if cfg.compile:
            remove_interrupted_compiles(say=ctx.is_main)
        train_step = make_train_step(partial(compute_loss, cfg.method, run.net, cfg=cfg.objective), run.net,
                                     state.optimizer, state.scheduler, state.ema, cfg.ema_decay, cfg.compile,
                                     cfg.precision, run.device, sync_grads=run.strategy.sync_grads(run.net),
                                     cuda_graphs=False if isinstance(run.strategy, Sharded) else None)
        train_step = with_checks(train_step, cfg, run, state)
        t_start, first_step = time.perf_counter(), state.step
        loggers = open_run_loggers(cfg, run, state.step)
        # under torchrun the SIGTERM may come from torchrun itself because another process died: then no step
        # finishes, and the checkpoint is the last one written (said when the collective fails)
        when = ("after the next step, with a checkpoint if every process gets there (they agree on it)"
                if ctx.distributed else "after this step, with a checkpoint")
        with StopRequest(quit_before_first_step=not ctx.distributed, when=when) as stop, dispatch.backend(cfg.kernels), \
                RunLog(run.out, cfg.steps, state.step, ctx.is_main, loggers) as log:
            try:
                last = loop(cfg, run, state, train_step, log, stop)
            except RuntimeError as err:
                if not (ctx.distributed and distributed.lost_peer(err)):
                    raise
                ckpt = find_checkpoint(run.out)
                raise PeerLost(f"another process of this torchrun job is gone ({clipped(str(err).strip().splitlines()[0], 120)}) "
                               f"after step {state.step}; this one stops too. "
                               + (f"The last checkpoint, {ckpt}, is intact: continue with torchrun "
                                  f"--nproc_per_node=K -m stmd_fast.train --out {shlex.quote(str(run.out))} --resume "
                                  f"(torchrun --max-restarts N does so by itself)" if ckpt else
                                  "No checkpoint was written")) \
                    from None
        if ctx.is_main:
            print(f"done: step {cfg.steps}, {cfg.steps - first_step} of them in this process, in "
                  f"{time.perf_counter() - t_start:.0f} s; checkpoint {last}")
        finished_on_stop_signals()
        clean_exit = True
        return last
    except (TrainingDiverged, GradientSyncFailed, Stopped):
        clean_exit = True  # every rank saw it in the same gather
        raise
    finally:
        # a rank that fails alone (a lost peer, a bug) skips this: tearing down NCCL then can hang
        if clean_exit:
            distributed.teardown()


def loop(cfg: TrainConfig, run: Run, state: TrainingState, train_step, log: RunLog, stop: StopRequest) -> Path:
    """The training loop: draw, step, and at each interval log, sample and checkpoint. Returns the last checkpoint."""
    strategy = run.strategy
    # the checkpoint's open interval, unless --log-every changed on --resume so that it began before this one's
    # interval: the next record then averages from the checkpoint's step (not the old interval's steps)
    window = state.log_window
    if window is not None and window["start"] < state.step - state.step % cfg.log_every:
        window = None
    sums = IntervalSums(run.device, state.step, elapsed_so_far(run.out / "metrics.jsonl"), window)
    last_good, last_save = find_checkpoint(run.out), time.monotonic()
    vote = distributed.StopVote()  # under torchrun, a stop or timed save agreed by the ranks a step later
    save_voted = stale_save_vote = False  # this rank asked for a timed save; a vote sent before the last save
    first_step = state.step
    finish_checkpoints_step(cfg, run, state, log, undone_at_checkpoint(cfg, run, state))
    while state.step < cfg.steps:
        try:
            x0, noise = strategy.draw(state.data, state.generator, cfg.objective)
            lr = state.optimizer.param_groups[0]["lr"]  # this step's rate: the scheduler moves it on inside the step
            loss, error = train_step(x0, noise)
        except RuntimeError as err:  # torch.OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError
            if not out_of_memory(err):
                raise
            raise UserError(f"--batch-size {cfg.batch_size} does not fit in the memory of {run.device} "
                            f"({str(err).strip().splitlines()[0][:160]}): lower --batch-size; "
                            + (f"the last good checkpoint {last_good} is intact" if last_good else
                               "no checkpoint was written")) from None
        state.step += 1
        stop.step_done()
        log.step()
        sums.add(loss, error, state.step)
        step = state.step
        sample_due = bool(cfg.sample_every) and step % cfg.sample_every == 0
        fd_due = bool(cfg.fd_every) and (step % cfg.fd_every == 0 or step == cfg.steps)
        # --ckpt-minutes: checked every step (a step may be slow), each rank by its own clock, agreed in the vote
        time_due = bool(cfg.ckpt_minutes) and not save_voted and time.monotonic() - last_save >= 60 * cfg.ckpt_minutes
        stop_agreed, save_agreed = vote.agreed(stop.requested, time_due)  # every rank, every step: a collective
        save_voted |= time_due
        if stale_save_vote:  # sent before the last save, which answered it
            save_agreed = stale_save_vote = False
        if step == first_step + 1:  # this process's first step (a first --compile): not in the rates
            sums.restart_clock(step)
        if not (step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or sample_due or fd_due or step == cfg.steps
                or stop_agreed or save_agreed):
            continue
        record, bad_step, stopping, save_due, folder_gone = sums.close(
            step, stop.requested, strategy.world, cfg.batch_size, METHODS[cfg.method].error_name, lr,
            skipped_counts(state.data), save_agreed, interval_end=step % cfg.log_every == 0,
            folder_gone=run_folder_gone(run))  # rank 0 holds the lock; every rank stops on it, before any write
        if folder_gone:
            raise UserError(f"the run folder {run.out} was deleted, moved or replaced while this run trained (its "
                            f"{LOCK_FILE} is not the one this run holds): stopped at step {step}, nothing more "
                            f"written there. If you moved it, continue from its new place: --out NEW_PLACE --resume")
        if bad_step is not None:
            where = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written"
            raise TrainingDiverged(f"the loss became non-finite at step {bad_step}; stopped, {where}. "
                                   f"Try {diverged_fixes(cfg)}")
        if fd_due:  # measured after the checkpoint, which keeps the record meanwhile
            state.pending_record = dict(record)
        else:
            log.record(record)
        at_end = step == cfg.steps or stopping
        if step % cfg.ckpt_every == 0 or at_end or save_due:
            state.log_window = sums.open_window()
            log.sync()
            try:
                last_good = state.save(run.out, run.meta, cfg.keep_checkpoints, strategy)
                last_save, save_voted, stale_save_vote = time.monotonic(), False, vote.lagged
                if not at_end:  # the last one is named by the run's final line
                    log.write(f"step {step}: checkpoint -> {last_good}")
                elif step == cfg.steps and not stopping and not strategy.ctx.distributed:  # a stop says its own
                    stop.nothing_left_to_save()  # line; under torchrun the ranks stop together, by the vote
            except NonFiniteState as err:  # the loss was finite, the weights (or optimizer state) not
                where = (f"the last good checkpoint {last_good} is intact (its weights are finite)" if last_good
                         else "no checkpoint was written")
                raise TrainingDiverged(f"{err}; stopped, {where}. Try {diverged_fixes(cfg)}") from None
            except OSError as err:  # a full disk: save_checkpoint left no partial checkpoint
                raise write_failed(err, f"the step {step} checkpoint in {run.out}", run.out) from None
        if fd_due:  # after the checkpoint too: a long measurement, a stop or an error in it costs no training
            record.update(measure_fd(run, state.ema))
            log.record(record)
            state.pending_record = None
        if sample_due or at_end:  # after the checkpoint: a grid that cannot be drawn or written costs no work
            log.samples(strategy.for_sampling(state.ema.module), cfg, state.data, run.device, step, run.decode)
        sums.restart_clock(step)  # the checkpoint, grid and FD are not training: the next rates leave them out
        if stopping and step < cfg.steps:  # a stop in the last step: the run is done, and says so (exit 0)
            vote.close()
            by = signal.Signals(stop.signal).name if stop.signal else "a signal to another rank"
            log.write(f"stopped by {by} at step {step}; checkpoint {last_good}; "
                      f"continue with: {resume_command(strategy.ctx, run.out)}")
            raise Stopped(stop.signal)
    vote.close()
    return last_good



def open_run_loggers(cfg: TrainConfig, run: Run, step: int) -> list:
    """The --loggers of rank 0 (none elsewhere), given the records up to `step`; UserError if one cannot start."""
    try:
        return open_loggers(cfg.log, run.out, run.meta["config"], step) if run.strategy.ctx.is_main else []
    except LoggerUnavailable as err:  # W&B online without a key or a network
        raise UserError(str(err)) from None


def undone_at_checkpoint(cfg: TrainConfig, run: Run, state: TrainingState) -> tuple[bool, bool]:
    """(grid, FD): what the process that wrote the checkpoint resumed from was killed before making. Decided
    on rank 0, which holds the files, and shared with every rank (collective)."""
    step, pending, undone = state.step, state.pending_record, (False, False)
    if run.strategy.ctx.is_main and step:
        path = run.out / "metrics.jsonl"
        logged = {json.loads(line)["step"] for line in path.read_text().splitlines()} if path.exists() else set()
        # the run's last grid is drawn whatever --sample-every says (the loop's at_end)
        grid = (step == cfg.steps or bool(cfg.sample_every) and step % cfg.sample_every == 0) and \
            not any((run.out / "samples").glob(f"step_{step:08d}.*"))
        undone = (grid, run.fd is not None and pending is not None and pending["step"] == step and step not in logged)
    return tuple(distributed.gather_objects(undone)[0])


def finish_checkpoints_step(cfg: TrainConfig, run: Run, state: TrainingState, log: RunLog,
                            undone: tuple[bool, bool]) -> None:
    """The FD and sample grid of the checkpoint resumed from, if its process was killed before making them
    (undone_at_checkpoint): both come after the save (so that they cost no training), and the checkpoint holds
    the EMA weights they are made of. The grid is drawn from the same fixed noise, so it is the one the killed
    process would have written. Collective (the FD and an FSDP grid are)."""
    step, pending = state.step, state.pending_record
    grid, fd = undone
    if fd:
        if run.fd is not None:  # rank 0
            log.write(f"step {step}: its {run.fd.name}, which the stopped process did not log, is measured now")
        values = measure_fd(run, state.ema)  # every rank: collective
        if run.fd is not None:
            log.record({**pending, **values})
    state.pending_record = None
    if grid:
        log.samples(run.strategy.for_sampling(state.ema.module), cfg, state.data, run.device, step, run.decode)


def write_failed(err: OSError, what: str, out: str | Path) -> WriteFailed:
    """The one line for an output that could not be written: the file, the cause, what is left, the fix for
    that cause, and how to go on (--resume only where a checkpoint exists to resume from)."""
    try:
        last = find_checkpoint(out)
    except OSError:
        last = None
    left = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
    again = "resume with --resume" if last else "run the same command again"
    fix = write_fix(err)
    return WriteFailed(f"could not write {what}: {err.strerror or err}; stopped, {left}: {fix}, then {again}")


def diverged_fixes(cfg: TrainConfig) -> str:
    """What to try after a non-finite loss or state, leaving out what the run already does."""
    fixes = [f"a lower --lr (this run's: {cfg.lr:g})"]
    if cfg.precision != "fp32":
        fixes.append("--precision fp32")
    return ", ".join(fixes) + " or another --seed"


def measure_fd(run: Run, ema) -> dict[str, float]:
    """{"FD/emaD" or "FID/emaD": value} for every EMA, measured on rank 0 ({} elsewhere). Collective."""
    values = {}
    for decay, module in ema.modules().items():
        net = run.strategy.for_sampling(module)
        if net is not None:
            values[f"{run.fd.name}/ema{decay}"] = run.fd.measure(net)
    return values


def compile_counts() -> tuple[int, Counter]:
    """Dynamo's graphs and graph breaks (by reason) so far in this process: assert_compiled counts one step's."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], Counter(counters["graph_break"])


def assert_compiled(before: tuple[int, Counter], verbose: bool = True, seconds: float | None = None) -> None:
    """torch.compile falls back to eager silently on some failures: check the step made a graph, and warn when
    graph breaks leave parts of it eager (the JVP's, say). `before`: compile_counts() before the step, since
    the counters are the process's (an earlier compile in a notebook or a test counts there too)."""
    total, breaks = compile_counts()
    graphs = total - before[0]
    breaks -= before[1]  # a Counter's difference keeps the reasons this step added
    if total == 0:
        raise RuntimeError("--compile: torch.compile produced no graph for the loss; run without --compile "
                           "and report this with your torch version")
    if verbose:
        took = f" in {seconds:.0f} s (the first step)" if seconds is not None else ""
        # none new: Dynamo reused the graph an earlier training in this process compiled (a notebook's second run)
        made = f"{graphs} graph(s)" if graphs else "the graph compiled earlier in this process"
        print(f"compiled the loss{took}: {made}, {breaks.total()} graph break(s)")
        if breaks:
            reason, count = breaks.most_common(1)[0]
            print(f"warning: --compile: {breaks.total()} graph break(s) leave parts of the step eager and slower "
                  f"(most often, {count}x: {reason.splitlines()[0]}); TORCH_LOGS=graph_breaks shows where, and "
                  f"please report it with your torch version", file=sys.stderr, flush=True)


class Stopped(KeyboardInterrupt):
    """A signal stopped the run after a checkpoint. The exit code is the shell's for that signal, 128 + its
    number (130 for Ctrl-C, 143 for SIGTERM), so a job scheduler sees the job was stopped, not that it failed;
    a rank stopped because another rank got the signal exits 130."""

    def __init__(self, signum: int | None = None):
        super().__init__(signum)
        self.exit_code = 128 + (signum or signal.SIGINT)


class StopRequest:
    """Ctrl-C / SIGTERM / SIGHUP finish the current step, save, and exit; the same signal again kills at once.
    Before this process has finished a step (start-up, the first --compile, minutes for a large network) there
    is nothing new to save, so the first signal quits at once (quit_before_first_step; not under torchrun,
    where the ranks agree on stopping a step later: distributed.StopVote).
    A context manager: the previous handlers come back on the way out."""

    def __init__(self, quit_before_first_step: bool = False, when: str = "after this step, with a checkpoint"):
        self.signal, self.started, self.when = None, not quit_before_first_step, when

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def step_done(self) -> None:
        self.started = True

    def nothing_left_to_save(self) -> None:
        """The run's last checkpoint is written: what follows (its sample grid, FD) is not training, so a stop
        signal now quits at once, not "after this step" (a large grid can take long)."""
        self.started = False

    def _request(self, signum, frame):
        quiet_if_hung_up(signum)
        if not self.started:
            raise Interrupted(signum)
        if self.signal is None and distributed.from_env().is_main:  # said at once (a step may take a while), once
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            sys.stderr.write(f"{chr(10) if sys.stderr.isatty() else ''}{name}: stopping {self.when}; "
                             f"a second {name} quits at once, without one\n")  # a newline ends the bar
        self.signal = self.signal or signum
        signal.signal(signum, second_signal_handler())  # a command quits at once, a Python host gets an exception

    def __enter__(self) -> StopRequest:
        # a host's worker thread (train() called there) takes no handler: Python allows them in the main thread only
        on_main_thread = threading.current_thread() is threading.main_thread()
        self.previous = {sig: signal.signal(sig, self._request) for sig in stop_signals()} if on_main_thread else {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def with_checks(train_step, cfg: TrainConfig, run: Run, state: TrainingState):
    """train_step, plus what runs around its first calls only: --compile made a graph (call 1); under
    torchrun with replicas, the ranks' weights agree after the first two steps of this process (a
    missing gradient all-reduce stops the run there, not at the first checkpoint); and the test hook
    of tests/test_distributed.py (STMD_FAST_FAIL_AT_STEP). Unwrapped when none applies, so the hot
    loop holds no such branch."""
    ctx = run.strategy.ctx
    fail_at = distributed.fail_at_step_for_tests(ctx)
    sync_check = isinstance(run.strategy, parallel.Replicas)
    if not cfg.compile and fail_at is None and not sync_check:
        return train_step
    start, calls = state.step, [state.step]

    def checked(x0, noise):
        calls[0] += 1
        if calls[0] == fail_at:
            os._exit(1)  # no cleanup, as a crashed process
        first_compiled = cfg.compile and calls[0] == start + 1  # a resumed run compiles too
        if first_compiled and ctx.is_main:
            # measured on one H200 host (README, Performance): over 3 minutes for the cifar10 U-Net's step
            jvp = " with its JVP" if METHODS[cfg.method].flow else ""  # DDPM's loss has none
            print(f"compiling the loss{jvp} and backward: the first step waits for it, minutes for a "
                  f"large network; a later run of the same network and batch reuses {inductor_cache_dir()}",
                  flush=True)
        before, began = compile_counts() if first_compiled else None, time.perf_counter()
        try:
            out = train_step(x0, noise)
        except Exception as err:
            library = broken_compiled_library(err) if first_compiled else None
            if library is None:
                raise
            Path(library).unlink(missing_ok=True)
            raise UserError(f"--compile: Inductor's cache held a broken compiled library, {library} (a compile "
                            f"was stopped while writing it); it is removed now: run the same command again "
                            f"(or point TORCHINDUCTOR_CACHE_DIR at a fresh folder)") from None
        if first_compiled:
            assert_compiled(before, verbose=ctx.is_main, seconds=time.perf_counter() - began)
        if sync_check and calls[0] - start <= 2 and not distributed.replicas_agree(state.net):
            # every rank gathered the same fingerprints, so every rank raises here
            raise GradientSyncFailed(f"the {ctx.world_size} processes hold different weights after step "
                                     f"{calls[0]}: the gradients were not all-reduced; stopped before any "
                                     f"checkpoint of diverged replicas was written")
        return out

    return checked


def skipped_counts(data) -> dict[str, int] | None:
    """Damaged shards and samples the latent stream skipped so far (None for in-memory data)."""
    if not hasattr(data, "skipped_shards"):
        return None
    return {"skipped_shards": data.skipped_shards, "skipped_samples": data.skipped_samples}


def resume_command(ctx: distributed.Dist, out) -> str:
    """The command that continues the run in `out`: under torchrun, with torchrun."""
    again = "torchrun --nproc_per_node=K -m stmd_fast.train" if ctx.launched else "python -m stmd_fast.train"
    return f"{again} --out {shlex.quote(str(out))} --resume"


def interrupted_outside_the_loop(cfg: TrainConfig | None, signum: int = signal.SIGINT, at_once: bool = False) -> int:
    """A stop signal outside the training loop (whose own saves, then stops): during start-up or the first
    step, or after the last step, while the process winds down; or (at_once, in a Python host) the same signal a
    second time, which cut the loop's stop short. Says which, by the run's newest checkpoint; 0 if the run is
    done, else the shell's code for the signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
    try:
        meta = newest_intact(cfg.out)[1] if cfg is not None and cfg.out else None
    except (FileNotFoundError, CheckpointError, OSError):
        meta = None
    ctx = distributed.from_env()
    if at_once and (meta is None or meta["step"] < cfg.steps):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if ctx.is_main:
            print(f"{name} again: stopped at once, without a checkpoint of the step under way; " + (
                f"the last checkpoint, step {meta['step']}, is intact: continue with "
                f"{resume_command(ctx, Path(cfg.out))}" if meta else "no checkpoint was written"), file=sys.stderr)
        return 128 + signum
    if meta is not None and meta["step"] >= cfg.steps:
        if not ctx.is_main:  # rank 0 says it, once
            return 0
        step, out = meta["step"], Path(cfg.out)
        missing = [] if any((out / "samples").glob(f"step_{step:08d}.*")) else ["its final sample grid"]
        try:  # the last record waits for its FD (--fd-every), which a stop during the measurement leaves out
            logged = any(json.loads(line)["step"] == step for line in (out / "metrics.jsonl").read_text().splitlines())
        except (OSError, ValueError, KeyError, TypeError):
            logged = True  # not ours to judge: said by the next run
        missing += [] if logged else [f"its step {step} record (with its FD)"]
        print(f"interrupted after the run finished: step {step} is saved in {cfg.out}"
              + (f"; {' and '.join(missing)} {'was' if len(missing) == 1 else 'were'} not written: "
                 f"{resume_command(ctx, out)} makes {'it' if len(missing) == 1 else 'them'}" if missing else ""),
              file=sys.stderr)
        return 0
    # torchrun SIGTERMs the other workers when one fails (its line says why): not the user's interrupt
    by = "stopped by torchrun (another process failed, or the job was stopped)" \
        if signum == signal.SIGTERM and ctx.run_id is not None else "interrupted"
    print(f"{by} during start-up, before the first step of this process; "
          + ("the checkpoints are as they were" if meta else "no checkpoint was written"), file=sys.stderr)
    return 128 + signum


@one_line_errors(UserError, DataError, CheckpointError,
                 failures=(TrainingDiverged, GradientSyncFailed, PeerLost, WriteFailed),  # DataError: e.g. shards unreadable mid-run
                 alone=(PeerLost,), torchrun=True)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = None
    try:  # a stop signal is a KeyboardInterrupt here (one_line_errors): start-up cleans up after it
        cfg, resume = resolve_config(dict(vars(args)))
        if distributed.from_env().is_main:
            for note in [*unused_flags(cfg, vars(args)), warmup_note(cfg, vars(args))]:
                if note is not None:
                    print(note, file=sys.stderr)
        if not resume and distributed.from_env().is_main:  # rank 0 alone reads them; a resume's are its own
            check_fd_files(cfg)
        train(cfg, resume, sys.argv[1:] if argv is None else argv)
    except Stopped as stopped:  # after a checkpoint; the resume command was printed
        return stopped.exit_code
    except KeyboardInterrupt as err:
        return interrupted_outside_the_loop(cfg, getattr(err, "signum", signal.SIGINT), getattr(err, "at_once", False))
    except OSError as err:  # an output of the run (metrics, config, a lock) could not be written
        if cfg is None or err.errno is None:
            raise
        raise write_failed(err, os.fsdecode(err.filename) if err.filename else f"to --out {cfg.out}", cfg.out) from None
    return 0


if __name__ == "__main__":
    # the imports are done: the import-time line would be false now, also after main (whose error handling,
    # one_line_errors, brings back the handlers it found: a rank's error waits, and torchrun sends SIGTERM)
    imports_done()
    run_and_exit(main)
