"""python -m stmd_fast.train: train STMD (or the Mean Flow / DDPM baselines) on one device,
or on K processes with torchrun --nproc_per_node=K -m stmd_fast.train (see stmd_fast/distributed.py).

Reads top to bottom: parse flags -> resolve the config (preset, overrides, or the
checkpoint being resumed) -> check everything the user gave (before expensive work) ->
one training loop -> checkpoints, sample grids, metrics.jsonl in the run directory.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import distributed
from .checkpoint import find_checkpoint, read_meta, save_checkpoint, write_json_atomic
from .config import LATENT_RESOLUTION, PRECISIONS, PRESETS, TrainConfig, net_for_shape, resolve_device
from .kernels import dispatch
from .kernels.dispatch import BACKENDS
from .models import build_net, count_params
from .objectives import METHODS, S_SAMPLERS, TIME_SAMPLERS, Noise, ObjectiveConfig, compute_loss, draw_noise
from .sampling import sample
from .schedule import TIME_GRIDS

# torch's forward-AD decompositions call the deprecated torch.jit.script on first use of
# torch.func.jvp: not ours to fix, and noise in every run's output.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

# Flags that may differ from the checkpoint's config when resuming; any other flag given
# with --resume must equal the checkpoint's value (a run is one experiment).
RESUME_OVERRIDABLE = {"steps", "device", "compile", "kernels", "parallel", "ckpt_every",
                      "keep_checkpoints", "sample_every", "log_every"}
# Appendix D's parameter counts, and why ours differ (printed at start-up).
PAPER_PARAMS = {
    "mnist": (1.1e6, "the paper's '1 layer per block' gives 0.71M in UNet2DModel; 2 layers per block reproduce its count"),
    "cifar10": (37.5e6, "UNet2DModel with the channels, layers and attention the paper lists gives this; the paper does "
                        "not list the rest (head size, time-embedding width, mid block) that makes up its 37.5M"),
}


class UserError(Exception):
    """Bad input: printed as one line, before any expensive work."""


class TrainingDiverged(Exception):
    """The loss became NaN or inf."""


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()  # digits preset defaults, shown in --help
    p = argparse.ArgumentParser(
        prog="python -m stmd_fast.train",
        description="Train STMD (a conditional Mean Flow that samples p(x_0 | x_s)), or the Mean Flow / DDPM "
                    "baselines with the same network. With no flags: the built-in 8x8 digits on this machine.",
        epilog="A flag left out takes the preset's value. Outputs in --out: config.json, metrics.jsonl, "
               "samples/step_*.png, checkpoints/step_*/ (see README). Several processes: torchrun "
               "--nproc_per_node=K -m stmd_fast.train ... (NCCL on CUDA, one GPU per process; gloo on CPU); "
               "--batch-size stays the global batch, rank 0 logs and writes checkpoints, and with torchrun "
               "--max-restarts=N a restarted job continues from its last checkpoint.",
        argument_default=argparse.SUPPRESS,  # so we know which flags were given explicitly
    )
    add = p.add_argument
    add("--preset", choices=list(PRESETS), help="data and network: digits (sklearn 8x8, no download), gmm (2-D "
        "Gaussian mixture, MLP), mnist, cifar10 (paper settings, files from --data-dir), celeba-latent (DiT-M/2 "
        "on SD-VAE latents, shards from --data) [default: digits]")
    add("--method", choices=list(METHODS), help="stmd | meanflow (unconditional) | ddpm (eps) [default: stmd]")
    add("--data", metavar="FILE.npy|SHARDS", help="your own array: (N, D) vectors -> MLP, (N, C, H, W) images -> "
        "U-Net; uint8 images are scaled to [-1, 1], floats used as given. With celeba-latent: the latent shards, "
        "e.g. 'SHARDS/shard-{000000..000099}.tar' (quote the braces)")
    add("--vae", help="latent presets: the VAE the shards were encoded with, a local folder or hub id (checked "
        "against the shards' manifest; sample grids decode through it) [default: celeba-latent: "
        "stabilityai/sd-vae-ft-ema]")
    add("--data-workers", type=int, help=f"latent presets: DataLoader workers reading the shards [default: {d.data_workers}]")
    add("--data-dir", help=f"where mnist/cifar10 files are, torchvision's layout [default: {d.data_dir}]")
    add("--download", action="store_true", help="let torchvision download mnist/cifar10 into --data-dir")
    add("--steps", type=int, help=f"total optimizer steps [default: preset's; digits {d.steps}]")
    add("--batch-size", type=int, help=f"the GLOBAL batch: under torchrun with K processes each trains on "
        f"batch-size / K (K must divide it) and the gradients are averaged, so the run matches one process's at "
        f"the same batch and --lr [default: preset's; digits {d.batch_size}]")
    add("--lr", type=float, help=f"AdamW learning rate [default: preset's; digits {d.lr}]")
    add("--warmup-steps", type=int, help=f"linear lr warm-up [default: {d.warmup_steps}]")
    add("--weight-decay", type=float, help=f"AdamW weight decay [default: {d.weight_decay}]")
    add("--ema-decay", type=float, help=f"EMA of weights for sampling [default: preset's; digits {d.ema_decay}]")
    add("--seed", type=int, help=f"seeds the network init, data order and all noise [default: {d.seed}]")
    add("--device", help="auto | cpu | cuda | cuda:N [default: auto = cuda if available]")
    add("--precision", choices=PRECISIONS, help="bf16 = autocast network math, fp32 weights/optimizer [default: fp32]")
    add("--compile", action="store_true", help="torch.compile the JVP + loss (cold compile takes 1-2 min on a CPU)")
    add("--kernels", choices=BACKENDS, help="auto = our Triton kernels on CUDA (fused time embedding, Mean Flow loss, "
        "JVP flash attention), PyTorch on CPU; reference = PyTorch everywhere; triton = kernels, CUDA only "
        "[default: auto]")
    add("--parallel", choices=distributed.PARALLEL_MODES, help="under torchrun: ddp = a full replica per process, "
        "gradients averaged by an all-reduce after each backward; fsdp = FSDP2 fully_shard (parameters, gradients "
        "and optimizer state sharded, for large DiTs). Checkpoints are unsharded either way, so a run resumes with "
        f"any number of processes or mode [default: {d.parallel}]")
    add("--out", help="run directory [default: runs/<preset or data name>-<method>]")
    add("--resume", action="store_true", help="continue the run in --out from its newest checkpoint; only "
        f"{', '.join(sorted(RESUME_OVERRIDABLE))} may change")
    add("--ckpt-every", type=int, help=f"checkpoint interval in steps (and at the end) [default: preset's; digits {d.ckpt_every}]")
    add("--keep-checkpoints", type=int, help=f"newest checkpoints kept [default: {d.keep_checkpoints}]")
    add("--sample-every", type=int, help=f"sample grid interval, 0 = only at the end [default: preset's; digits {d.sample_every}]")
    add("--log-every", type=int, help=f"metrics/progress interval [default: preset's; digits {d.log_every}]")
    add("--sample-steps", type=int, help=f"N of the sample grids (STMD) [default: {d.sample_steps}]")
    add("--sample-flow-steps", type=int, help=f"M of the sample grids (STMD, Mean Flow) [default: {d.sample_flow_steps}]")
    add("--sample-ddpm-steps", type=int, help=f"N of the sample grids (DDPM) [default: {d.sample_ddpm_steps}]")
    add("--sample-grid", choices=TIME_GRIDS, help="diffusion time grid of the sampler [default: uniform]")
    o = d.objective
    add("--flow-matching-fraction", type=float, help=f"fraction of the batch with r = t [default: {o.flow_matching_fraction}]")
    add("--adaptive-p", type=float, help=f"adaptive weight 1/(l + c)^p; 0 = plain L2 [default: {o.adaptive_p}]")
    add("--adaptive-c", type=float, help=f"[default: {o.adaptive_c}]")
    add("--time-sampler", choices=TIME_SAMPLERS, help="law of (r, t): pair = max/min of two LN(time-mean, "
        "time-std) draws (Mean Flow); separate = t ~ LN(time-mean, time-std), r ~ LN(r-mean, r-std), r = min(r, t); "
        f"mixture = separate with probability --mixture-weight, else pair [default: preset's; digits {o.time_sampler}]")
    add("--time-mean", type=float, help=f"logit-normal mean of t (pair: of both draws) [default: preset's; digits {o.time_mean}]")
    add("--time-std", type=float, help=f"logit-normal std of t (pair: of both draws) [default: preset's; digits {o.time_std}]")
    add("--r-mean", type=float, help=f"separate/mixture: logit-normal mean of r [default: preset's; digits {o.r_mean}]")
    add("--r-std", type=float, help=f"separate/mixture: logit-normal std of r [default: preset's; digits {o.r_std}]")
    add("--mixture-weight", type=float, help=f"mixture: share of rows from separate [default: {o.mixture_weight}]")
    add("--s-sampler", choices=S_SAMPLERS, help="law of the diffusion time s: uniform = U(0, 1]; grid = with "
        "probability --s-grid-fraction a point k/N of the N-step sampler's grid, N from --s-grid-steps "
        f"[default: preset's; digits {o.s_sampler}]")
    add("--s-grid-fraction", type=float, help=f"grid: share of s on the grids [default: {o.s_grid_fraction}]")
    add("--s-grid-steps", type=int, nargs="+", help=f"grid: the N whose grids are drawn [default: "
        f"{' '.join(map(str, o.s_grid_steps))}]")
    return p


OBJECTIVE_FLAGS = {f.name for f in dataclasses.fields(ObjectiveConfig)}


def resolve_config(given: dict) -> tuple[TrainConfig, bool]:
    """The run's config from the explicitly given flags: a preset with overrides, or, with
    --resume, the newest checkpoint's config. Returns (config, resume)."""
    resume = given.pop("resume", False)
    top = {k: v for k, v in given.items() if k not in OBJECTIVE_FLAGS}
    objective = {k: v for k, v in given.items() if k in OBJECTIVE_FLAGS}
    fresh = PRESETS[top.get("preset", "digits")]().to_dict()
    fresh.update(top)
    fresh["objective"].update(objective)
    if "data" in top and fresh["preset"] not in LATENT_RESOLUTION:
        fresh["net"] = None  # chosen from the data's shape once it is loaded
    if "out" not in top:
        fresh["out"] = None  # derived from preset/data and method
    try:
        cfg = TrainConfig(**fresh)
    except ValueError as err:
        raise UserError(str(err)) from None
    if not resume and not elastic_restart_of_this_run(cfg.out):
        return cfg, False
    ckpt = find_checkpoint(cfg.out)
    if ckpt is None:
        raise UserError(f"--resume: no checkpoint in {cfg.out}: give the run's --out, or drop --resume to start")
    try:
        saved = read_meta(ckpt)["config"]
    except ValueError as err:
        raise UserError(str(err)) from None
    for key, value in top.items():
        if key not in RESUME_OVERRIDABLE and key != "out" and saved.get(key) != value:
            raise UserError(f"--resume: {cfg.out} was trained with --{key.replace('_', '-')} {saved.get(key)}, "
                            f"not {value}: drop the flag, or use a new --out to start another run")
    for key, value in objective.items():
        if saved["objective"].get(key) != value:
            raise UserError(f"--resume: {cfg.out} was trained with --{key.replace('_', '-')} "
                            f"{saved['objective'].get(key)}, not {value}")
    saved.update({k: v for k, v in top.items() if k in RESUME_OVERRIDABLE}, out=cfg.out)  # the run may have moved
    if saved.get("parallel") == "fsdp" and "parallel" not in top and not distributed.from_env().launched:
        saved["parallel"] = "ddp"  # an FSDP run's (unsharded) checkpoint continues in one process
    return TrainConfig(**saved), True


def elastic_restart_of_this_run(out: str) -> bool:
    """torchrun --max-restarts restarted this job's workers with the same command, and the run directory
    holds a checkpoint that this job (same TORCHELASTIC_RUN_ID) wrote: continue from it instead of refusing.
    A first attempt, a checkpoint of another job, or no checkpoint: False (a fresh start, as without torchrun)."""
    ctx = distributed.from_env()
    ckpt = find_checkpoint(out) if ctx.restart_count > 0 else None
    if ckpt is None:
        return False
    try:
        return read_meta(ckpt).get("torchelastic_run_id") == ctx.run_id
    except (ValueError, OSError):
        return False


# ----------------------------------------------------------------------------- setup

def load_training_data(cfg: TrainConfig, ctx: distributed.Dist = distributed.Dist()):
    """The preset's (or --data's) training set: TensorData, or the gmm's GaussianMixture; latent shards
    are split over the torchrun ranks (each reads every K-th shard)."""
    from .data.datasets import DataError, load_npy, load_preset
    from .gmm import default_mixture

    if cfg.preset in LATENT_RESOLUTION and (cfg.data is None or cfg.vae is None):
        raise UserError(f"the {cfg.preset} preset trains on VAE latents: encode the images once with "
                        f"python -m stmd_fast.data.encode --images DIR --vae VAE --resolution "
                        f"{LATENT_RESOLUTION[cfg.preset]} --out SHARDS, then pass "
                        f"--data 'SHARDS/shard-{{000000..N}}.tar' --vae VAE")
    try:
        if cfg.preset in LATENT_RESOLUTION:
            from .data.latents import LatentShards
            return LatentShards(cfg.data, expect_vae=cfg.vae, expect_resolution=LATENT_RESOLUTION[cfg.preset],
                                num_workers=cfg.data_workers, seed=cfg.seed, rank=ctx.rank,
                                world_size=ctx.world_size)
        if cfg.data is not None:
            return load_npy(cfg.data)
        if cfg.preset == "gmm":
            return default_mixture()
        return load_preset(cfg.preset, "train", cfg.data_dir, cfg.download)
    except DataError as err:
        raise UserError(str(err)) from None


def prepare_run_dir(out: Path, resume: bool, probe: bool = True) -> None:
    """Create --out and check it is writable (probe: rank 0 only under torchrun, so ranks never race on
    the probe file); refuse a fresh run into a directory that holds checkpoints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if probe:
            probe_file = out / ".write-test"
            probe_file.write_text("ok")
            probe_file.unlink()
    except OSError as err:
        raise UserError(f"cannot write to --out {out}: {err.strerror or err}: choose a writable directory") from None
    if not resume and find_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose a new --out")


# ----------------------------------------------------------------------------- loop

def write_samples(ema_net, cfg: TrainConfig, data, device, path: Path, decode=None) -> Path:
    """A grid (images; latents decoded by `decode`) or .npy (vectors) of 64 samples from the
    EMA weights, always from the same noise so grids are comparable across steps."""
    from torchvision.utils import save_image

    from .data.datasets import to_unit_range

    steps = {"ddpm": cfg.sample_ddpm_steps, "meanflow": 1}.get(cfg.method, cfg.sample_steps)
    flow_steps = 1 if cfg.method == "ddpm" else cfg.sample_flow_steps
    generator = torch.Generator(device).manual_seed(cfg.seed + 1_000_003)
    x = sample(ema_net, cfg.method, 64, data.shape, steps, flow_steps, generator, cfg.sample_grid).float().cpu()
    path.parent.mkdir(exist_ok=True)
    if data.kind == "latent":
        x = decode(x.to(device)).cpu()
    if data.kind in ("image", "latent"):
        path = path.with_suffix(".png")
        save_image(to_unit_range(x), path, nrow=8, padding=1)
    else:
        path = path.with_suffix(".npy")
        np.save(path, x.numpy())
    return path


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or continue) training; returns the final checkpoint directory.

    Under torchrun (K processes; stmd_fast/distributed.py), cfg.batch_size is the GLOBAL batch. Every
    rank draws the same global batch and noise from the same seeded generator, exactly as one process
    does, keeps its slice [rank * b, (rank + 1) * b), b = batch_size / K, of x0 and of every noise
    tensor, and the gradients are averaged over the ranks: K processes take one process's steps (to
    float rounding; the draws are cheap next to the step) and the learning rate is per global batch.
    Latent shards are split by rank instead: each rank reads its own shards and draws b latents and
    their noise from its own generator, which is the same distribution but not bit-equal to one process.
    Rank 0 alone prints, logs (loss and error averaged over ranks), draws sample grids and writes
    checkpoints; the others wait for it at a barrier after each checkpoint.
    """
    ctx = distributed.from_env()
    # --- check everything the user gave before expensive work
    try:
        device = distributed.process_device(ctx, resolve_device(cfg.device))
        distributed.check_parallel(ctx, cfg.parallel, cfg.batch_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.kernels == "triton" and device.type != "cuda" and not dispatch.interpret_mode():
        raise UserError(f"--kernels triton runs on CUDA, not on {device}: use --kernels auto (PyTorch references "
                        f"on a CPU) or --device cuda")
    out = Path(cfg.out)
    prepare_run_dir(out, resume, probe=ctx.is_main)
    data = load_training_data(cfg, ctx)
    decode = None
    if data.kind == "latent" and ctx.is_main:  # load the VAE now (rank 0 draws the grids): a bad --vae fails here
        from .data.datasets import DataError
        from .data.encode import load_vae
        from .data.latents import decode_latents
        try:
            vae = load_vae(cfg.vae, device)
        except DataError as err:
            raise UserError(str(err)) from None
        decode = partial(decode_latents, vae, scaling_factor=data.scaling_factor, shift_factor=data.shift_factor)
    if cfg.net is None:
        cfg.net = net_for_shape(data.shape)
    method = METHODS[cfg.method]
    torch.manual_seed(cfg.seed)  # network init
    try:
        net = build_net(cfg.net, data.shape, method.conditional, len(method.times)).to(device)
    except ValueError as err:
        raise UserError(f"the network does not fit the data: {err}") from None
    data = data.to(device)
    meta = {"config": cfg.to_dict(), "data_shape": list(data.shape), "data_kind": data.kind}
    if data.kind == "latent":  # what Model.decode needs
        meta["latent"] = {"vae": cfg.vae, "scaling_factor": data.scaling_factor, "shift_factor": data.shift_factor,
                          "resolution": data.manifest["resolution"]}
    if ctx.launched:  # lets a torchrun restart of this job tell its own checkpoints from another run's
        meta["torchelastic_run_id"] = ctx.run_id

    world, rank = ctx.world_size, ctx.rank
    fsdp = ctx.launched and cfg.parallel == "fsdp"
    per_rank_data = world > 1 and hasattr(data, "state_dict")  # latent shards: each rank its own stream
    local_batch = cfg.batch_size // world
    if ctx.is_main:
        n_params = count_params(net)
        note = ""
        if cfg.data is None and cfg.preset in PAPER_PARAMS:
            paper, why = PAPER_PARAMS[cfg.preset]
            note = f" (paper: {paper / 1e6:.1f}M; {why})"
        procs = (f"; {world} processes ({cfg.parallel}), {local_batch} of the batch {cfg.batch_size} each"
                 if ctx.launched else "")
        print(f"{cfg.method} on {cfg.data or cfg.preset} {tuple(data.shape)}: {cfg.net.kind}, "
              f"{n_params / 1e6:.3f}M parameters{note}; device {device}, {cfg.precision}"
              f"{', compiled' if cfg.compile else ''}{procs}; run dir {out}")

    distributed.setup(ctx, device)  # torchrun: the process group; every user error above came before it
    clean_exit = False
    try:
        step = 0
        if resume:
            ckpt = find_checkpoint(out)
            net.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)))
            state = torch.load(ckpt / "train_state.pt", map_location=device, weights_only=True)
        distributed.broadcast_module(net)  # replicas start equal (the same seed gives that already; this makes sure)
        # fsdp: the EMA averages the (DTensor) parameters and copies the buffers (constants in our nets):
        # one foreach lerp over DTensor parameters and plain buffers together is refused
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=not fsdp)
        if resume:
            ema.module.load_state_dict(load_file(ckpt / "ema.safetensors", device=str(device)))
        sampler = None  # fsdp: a plain copy of the EMA net on rank 0 for the sample grids
        if fsdp:
            sampler = copy.deepcopy(ema.module) if ctx.is_main else None
            distributed.shard(net, ema.module, device=device)  # both alike, so the EMA update is shard-local
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
        # data order and every noise draw; the same on all ranks unless each rank streams its own shards
        generator = torch.Generator(device).manual_seed(distributed.rank_seed(cfg.seed, rank) if per_rank_data
                                                        else cfg.seed)
        if resume:
            if fsdp:
                distributed.load_full_optimizer_state(net, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            ema.n_averaged.copy_(state["ema_n_averaged"])
            step = state["step"]
            restore_stream(state, generator, data, device, cfg, ctx, per_rank_data)
            if ctx.is_main:
                keep_metrics_until(out / "metrics.jsonl", step)
                again = f" (torchrun restart {ctx.restart_count})" if ctx.restart_count else ""
                print(f"resumed from {ckpt} at step {step}{again}")
        elif ctx.restart_count and ctx.is_main:  # restarted before this job's first checkpoint: log from scratch
            keep_metrics_until(out / "metrics.jsonl", 0)
        if ctx.is_main:
            write_json_atomic(out / "config.json", meta)
        if step >= cfg.steps:
            if ctx.is_main:
                print(f"nothing to do: the run is at step {step} of --steps {cfg.steps}")
            clean_exit = True
            return find_checkpoint(out)

        previous_kernels = dispatch.get_backend()
        sync = partial(distributed.all_reduce_grads, list(net.parameters()), world) if world > 1 and not fsdp else None
        train_step = make_train_step(partial(compute_loss, cfg.method, net, cfg=cfg.objective), net, optimizer,
                                     scheduler, ema, cfg.compile, cfg.precision, device, sync_grads=sync)

        def draw_batch() -> tuple[torch.Tensor, Noise]:
            if per_rank_data:  # this rank's own stream and generator
                x0 = data.batch(local_batch, generator)
                return x0, draw_noise(x0, cfg.objective, generator)
            x0 = data.batch(cfg.batch_size, generator)  # the global batch, as one process draws it
            noise = draw_noise(x0, cfg.objective, generator)
            if world == 1:
                return x0, noise
            mine = slice(rank * local_batch, (rank + 1) * local_batch)
            return x0[mine], Noise(*(t[mine] for t in noise))

        def checkpoint() -> Path:
            # collectives first, on every rank: full state dicts (fsdp), the replica check (ddp), stream states
            if fsdp:
                weights = distributed.full_model_state(net), distributed.full_model_state(ema.module)
                optimizer_state = distributed.full_optimizer_state(net, optimizer)
            else:
                weights, optimizer_state = (net, ema.module), optimizer.state_dict()
                if world > 1 and not distributed.replicas_agree(net, ema.module):
                    problem = (f"the {world} processes hold different weights or EMA at step {step}: the gradient "
                               f"sync failed")
                    if not distributed.skip_grad_sync_for_tests():
                        raise RuntimeError(problem)
                    if ctx.is_main:
                        print(f"warning: {problem} (STMD_FAST_SKIP_GRAD_SYNC=1, a test-only switch)", flush=True)
            streams = distributed.gather_objects({"generator": generator.get_state(), "data": data.state_dict()}) \
                if per_rank_data else None
            final = out / "checkpoints" / f"step_{step:08d}"
            if ctx.is_main:
                train_state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                               "generator": generator.get_state(), "generator_device": device.type,
                               "ema_n_averaged": ema.n_averaged, "world_size": world}
                if hasattr(data, "state_dict"):  # a stream's position (latent shards)
                    train_state["data"] = data.state_dict()
                if streams is not None:  # every rank's generator and position
                    train_state["ranks"] = streams
                final = save_checkpoint(out, step, *weights, train_state, meta, cfg.keep_checkpoints)
            distributed.barrier()  # nobody runs ahead while rank 0 writes
            return final

        # Ctrl-C / SIGTERM finish the current step, save, and exit; a second Ctrl-C kills at once. Under
        # torchrun the ranks agree on stopping at the next log interval (a rank whose peer died fails there).
        stop_signal = []

        def request_stop(signum, frame):
            stop_signal.append(signum)
            signal.signal(signum, signal.SIG_DFL)

        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # no per-step sync
        loss_sum = torch.zeros((), device=device)
        error_sum = torch.zeros((), device=device)
        last_good = find_checkpoint(out)
        metrics = (out / "metrics.jsonl").open("a") if ctx.is_main else None
        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, disable=None if ctx.is_main else True)
        t_start = t_log = time.perf_counter()
        step_log = step
        try:
            dispatch.set_backend(cfg.kernels)  # restored in the finally below
            while step < cfg.steps:
                distributed.fail_for_tests(ctx, step + 1)
                x0, noise = draw_batch()
                loss, error = train_step(x0, noise)
                step += 1
                bar.update(1)
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
                loss_sum += loss
                error_sum += error
                if cfg.compile and step == 1:
                    assert_compiled(verbose=ctx.is_main)

                sample_due = bool(cfg.sample_every) and step % cfg.sample_every == 0
                if not (step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or sample_due or step == cfg.steps
                        or (stop_signal and not ctx.distributed)):
                    continue
                # One collective per interval: every rank's loss and error sums, first bad step, stop request.
                # note: a CPU-GPU sync point, once per interval
                mine = torch.stack([loss_sum.double(), error_sum.double(), first_bad_step.double(),
                                    torch.tensor(float(bool(stop_signal)), dtype=torch.float64, device=device)])
                ranks = distributed.gather(mine).tolist()
                bad = [int(r[2]) for r in ranks if r[2] >= 0]
                if bad:
                    where = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written"
                    raise TrainingDiverged(f"the loss became non-finite at step {min(bad)}; stopped, {where}. "
                                           f"Try a lower --lr, --precision fp32 or another --seed")
                stop = any(r[3] for r in ranks)
                at_end = step == cfg.steps or stop
                n = step - step_log
                dt = time.perf_counter() - t_log
                record = {"step": step, "loss": sum(r[0] for r in ranks) / world / n,
                          "delta_sq" if method.name != "ddpm" else "eps_mse": sum(r[1] for r in ranks) / world / n,
                          "lr": scheduler.get_last_lr()[0], "img_per_s": n * cfg.batch_size / dt,
                          "ms_per_step": 1e3 * dt / n, "elapsed_s": time.perf_counter() - t_start}
                if ctx.is_main:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    status = (f"loss {record['loss']:.4f} | {list(record)[2]} {record[list(record)[2]]:.4g} | "
                              f"{record['img_per_s']:.0f} img/s | {record['ms_per_step']:.1f} ms/step")
                    if bar.disable:
                        print(f"step {step}/{cfg.steps} | {status}", flush=True)
                    else:
                        bar.set_postfix_str(status)
                loss_sum.zero_()
                error_sum.zero_()
                t_log, step_log = time.perf_counter(), step

                if sample_due or at_end:
                    if fsdp:  # gather the sharded EMA into rank 0's plain copy
                        full = distributed.full_model_state(ema.module)
                        if ctx.is_main:
                            sampler.load_state_dict(full)
                    if ctx.is_main:
                        grid = write_samples(sampler if fsdp else ema.module, cfg, data, device,
                                             out / "samples" / f"step_{step:08d}", decode)
                        bar.write(f"step {step}: samples -> {grid}")
                if step % cfg.ckpt_every == 0 or at_end:
                    last_good = checkpoint()
                if stop:
                    if ctx.is_main:
                        again = "torchrun --nproc_per_node=K -m stmd_fast.train" if ctx.launched else \
                            "python -m stmd_fast.train"
                        bar.write(f"stopped by signal {stop_signal[0] if stop_signal else 'on another rank'} at "
                                  f"step {step}; checkpoint {last_good}; continue with: {again} --out {out} --resume")
                    clean_exit = True
                    raise KeyboardInterrupt
        except TrainingDiverged:
            clean_exit = True  # every rank saw it in the same gather
            raise
        finally:
            dispatch.set_backend(previous_kernels)
            bar.close()
            if metrics is not None:
                metrics.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        wall = time.perf_counter() - t_start
        if ctx.is_main:
            print(f"done: {cfg.steps} steps in {wall:.0f} s; checkpoint {last_good}")
        clean_exit = True
        return last_good
    finally:
        # a rank that fails alone (a lost peer, a bug) skips this: tearing down NCCL then can hang
        if clean_exit:
            distributed.teardown()


def restore_stream(state: dict, generator: torch.Generator, data, device: torch.device, cfg: TrainConfig,
                   ctx: distributed.Dist, per_rank_data: bool) -> None:
    """Put the generator and the data position back where the checkpoint left them: exactly when the
    stream is shared by all ranks (in-memory data, any number of processes) or each rank has its own
    saved state (latent shards, same number of processes); otherwise reseeded from (seed, step, rank)
    and the latent epoch replayed from its start, which continues correctly but not bit-identically."""
    step, rank = state["step"], ctx.rank
    if per_rank_data:
        ranks = state.get("ranks")
        mine = ranks[rank] if ranks is not None and len(ranks) == ctx.world_size else None
    else:
        mine = {"generator": state["generator"], "data": state.get("data")} if "ranks" not in state else None
    if mine is not None and state["generator_device"] == device.type:
        generator.set_state(mine["generator"].cpu())
    else:
        generator.manual_seed(distributed.rank_seed(cfg.seed + step, rank) if per_rank_data else cfg.seed + step)
        if ctx.is_main:
            why = (f"the run moved from {state['generator_device']} to {device.type}" if mine is not None else
                   f"the run's {state.get('world_size', 1)} data streams (one per process) became "
                   f"{ctx.world_size if per_rank_data else 1}; the shards' epoch restarts")
            print(f"note: {why}: noise reseeded from (seed, step), so it continues correctly but not "
                  f"bit-identically")
    if hasattr(data, "load_state_dict"):
        if mine is not None and mine.get("data") is not None:
            data.load_state_dict(mine["data"])
        elif state.get("data") is not None:  # another split of the shards: replay the saved epoch from its start
            data.load_state_dict({**state["data"], "consumed": 0})


def make_train_step(loss_fn, net, optimizer, scheduler, ema, compile: bool, precision: str, device: torch.device,
                    sync_grads=None):
    """One optimisation step: loss_fn(x0, noise) -> (loss, error), backward, sync_grads(), AdamW, lr
    schedule, EMA. sync_grads (torchrun, --parallel ddp): averages the gradients over the ranks; the
    loss itself, JVP included, runs on the plain module (stmd_fast/distributed.py says why).

    What --compile compiles: the loss (JVP, target, adaptive loss) with its backward graph, which
    AOTAutograd derives and Inductor compiles too. loss.backward() itself, the optimizer and the
    EMA stay eager: compiling the whole step graph-breaks at Tensor.backward, and AdamW and the
    EMA are a few elementwise passes over the weights, small next to the network's passes.
    bf16: autocast runs the network's matmuls and convolutions, and the JVP's tangents with
    them, in bf16; weights, gradients, optimizer state, norms, softmax, time features and the
    loss stay fp32 (the choice and its measurement: README, "Precision").
    """
    if compile:
        loss_fn = torch.compile(loss_fn)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def train_step(x0, noise):
        with autocast:
            loss, error = loss_fn(x0, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync_grads is not None:
            sync_grads()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(net)
        return loss.detach(), error

    return train_step


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop the metrics logged after the checkpoint (they will be logged again), and a last
    line cut short by a killed process."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and kept(line)]
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)


def assert_compiled(verbose: bool = True) -> None:
    """torch.compile falls back to eager silently on some failures: check a graph exists."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    if graphs == 0:
        raise RuntimeError("--compile: torch.compile produced no graph for the loss; run without --compile "
                           "and report this with your torch version")
    if verbose:
        print(f"compiled the loss: {graphs} graph(s), {breaks} graph break(s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.datasets import DataError

    try:
        cfg, resume = resolve_config(vars(args))
        train(cfg, resume)
    except (UserError, TrainingDiverged, DataError) as err:  # DataError: e.g. latent shards unreadable mid-run
        ctx = distributed.from_env()
        if not ctx.is_main:
            # Every rank meets the same error and rank 0 says it: torchrun stops this process while it
            # waits. Only an error of this rank alone is still printed, after the wait.
            time.sleep(5)
        print(f"error: {err}" if ctx.is_main else f"error (rank {ctx.rank}): {err}", file=sys.stderr)
        return 2 if isinstance(err, (UserError, DataError)) else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
