"""python -m stmd_fast.train: train STMD (or the Mean Flow / DDPM baselines) on one device.

Reads top to bottom: parse flags -> resolve the config (preset, overrides, or the
checkpoint being resumed) -> check everything the user gave (before expensive work) ->
one training loop -> checkpoints, sample grids, metrics.jsonl in the run directory.
"""
from __future__ import annotations

import argparse
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

from .checkpoint import find_checkpoint, read_meta, save_checkpoint, write_json_atomic
from .config import LATENT_RESOLUTION, PRECISIONS, PRESETS, TrainConfig, net_for_shape, resolve_device
from .kernels import dispatch
from .kernels.dispatch import BACKENDS
from .models import build_net, count_params
from .objectives import METHODS, compute_loss, draw_noise
from .sampling import sample
from .schedule import TIME_GRIDS

# torch's forward-AD decompositions call the deprecated torch.jit.script on first use of
# torch.func.jvp: not ours to fix, and noise in every run's output.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

# Flags that may differ from the checkpoint's config when resuming; any other flag given
# with --resume must equal the checkpoint's value (a run is one experiment).
RESUME_OVERRIDABLE = {"steps", "device", "compile", "kernels", "data_workers", "ckpt_every", "keep_checkpoints", "sample_every", "log_every"}
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
               "samples/step_*.png, checkpoints/step_*/ (see README).",
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
    add("--batch-size", type=int, help=f"[default: preset's; digits {d.batch_size}]")
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
    add("--time-mean", type=float, help=f"logit-normal mean of (r, t) [default: {o.time_mean}]")
    add("--time-std", type=float, help=f"logit-normal std of (r, t) [default: {o.time_std}]")
    return p


OBJECTIVE_FLAGS = {"flow_matching_fraction", "adaptive_p", "adaptive_c", "time_mean", "time_std"}


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
    if not resume:
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
        if saved["objective"][key] != value:
            raise UserError(f"--resume: {cfg.out} was trained with --{key.replace('_', '-')} "
                            f"{saved['objective'][key]}, not {value}")
    saved.update({k: v for k, v in top.items() if k in RESUME_OVERRIDABLE}, out=cfg.out)  # the run may have moved
    return TrainConfig(**saved), True


# ----------------------------------------------------------------------------- setup

def load_training_data(cfg: TrainConfig):
    """The preset's (or --data's) training set: TensorData, or the gmm's GaussianMixture."""
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
                                num_workers=cfg.data_workers, seed=cfg.seed)
        if cfg.data is not None:
            return load_npy(cfg.data)
        if cfg.preset == "gmm":
            return default_mixture()
        return load_preset(cfg.preset, "train", cfg.data_dir, cfg.download)
    except DataError as err:
        raise UserError(str(err)) from None


def prepare_run_dir(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
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
    """Run (or continue) training; returns the final checkpoint directory."""
    # --- check everything the user gave before expensive work
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.kernels == "triton" and device.type != "cuda" and not dispatch.interpret_mode():
        raise UserError(f"--kernels triton runs on CUDA, not on {device}: use --kernels auto (PyTorch references "
                        f"on a CPU) or --device cuda")
    out = Path(cfg.out)
    prepare_run_dir(out, resume)
    data = load_training_data(cfg)
    decode = None
    if data.kind == "latent":  # load the VAE now: a bad --vae fails here, not at the first sample grid
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

    n_params = count_params(net)
    note = ""
    if cfg.data is None and cfg.preset in PAPER_PARAMS:
        paper, why = PAPER_PARAMS[cfg.preset]
        note = f" (paper: {paper / 1e6:.1f}M; {why})"
    print(f"{cfg.method} on {cfg.data or cfg.preset} {tuple(data.shape)}: {cfg.net.kind}, "
          f"{n_params / 1e6:.3f}M parameters{note}; device {device}, {cfg.precision}"
          f"{', compiled' if cfg.compile else ''}; run dir {out}")

    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator(device).manual_seed(cfg.seed)  # data order and every noise draw
    step = 0
    if resume:
        ckpt = find_checkpoint(out)
        net.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)))
        ema.module.load_state_dict(load_file(ckpt / "ema.safetensors", device=str(device)))
        state = torch.load(ckpt / "train_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.n_averaged.copy_(state["ema_n_averaged"])
        step = state["step"]
        if state["generator_device"] == device.type:
            generator.set_state(state["generator"].cpu())
        else:  # CPU and CUDA generators have different states: reseed, reproducibly but not bit-exactly
            generator.manual_seed(cfg.seed + step)
            print(f"note: the run moved from {state['generator_device']} to {device.type}: noise reseeded "
                  f"from (seed, step), so it continues correctly but not bit-identically")
        if "data" in state:
            data.load_state_dict(state["data"])
        keep_metrics_until(out / "metrics.jsonl", step)
        print(f"resumed from {ckpt} at step {step}")
    write_json_atomic(out / "config.json", meta)
    if step >= cfg.steps:
        print(f"nothing to do: the run is at step {step} of --steps {cfg.steps}")
        return find_checkpoint(out)

    previous_kernels = dispatch.get_backend()
    train_step = make_train_step(partial(compute_loss, cfg.method, net, cfg=cfg.objective), net, optimizer,
                                 scheduler, ema, cfg.compile, cfg.precision, device)

    def checkpoint() -> Path:
        train_state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "generator": generator.get_state(), "generator_device": device.type,
                       "ema_n_averaged": ema.n_averaged}
        if hasattr(data, "state_dict"):  # a stream's position (latent shards)
            train_state["data"] = data.state_dict()
        return save_checkpoint(out, step, net, ema.module, train_state, meta, cfg.keep_checkpoints)

    # Ctrl-C / SIGTERM finish the current step, save, and exit; a second Ctrl-C kills at once.
    stop_signal = []

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # no per-step sync
    loss_sum = torch.zeros((), device=device)
    error_sum = torch.zeros((), device=device)
    last_good = find_checkpoint(out)
    metrics = (out / "metrics.jsonl").open("a")
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, disable=None)
    t_start = t_log = time.perf_counter()
    step_log = step
    try:
        dispatch.set_backend(cfg.kernels)  # restored in the finally below
        while step < cfg.steps:
            x0 = data.batch(cfg.batch_size, generator)
            noise = draw_noise(x0, cfg.objective, generator)
            loss, error = train_step(x0, noise)
            step += 1
            bar.update(1)
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
            loss_sum += loss
            error_sum += error
            if cfg.compile and step == 1:
                assert_compiled()

            at_end = step == cfg.steps or bool(stop_signal)
            sample_now = (cfg.sample_every and step % cfg.sample_every == 0) or at_end
            ckpt_now = step % cfg.ckpt_every == 0 or at_end
            if step % cfg.log_every == 0 or sample_now or ckpt_now:
                bad = int(first_bad_step)  # note: a CPU-GPU sync point, once per interval
                if bad >= 0:
                    where = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written"
                    raise TrainingDiverged(f"the loss became non-finite at step {bad}; stopped, {where}. "
                                           f"Try a lower --lr, --precision fp32 or another --seed")
                n = step - step_log
                dt = time.perf_counter() - t_log
                record = {"step": step, "loss": loss_sum.item() / n,
                          "delta_sq" if method.name != "ddpm" else "eps_mse": error_sum.item() / n,
                          "lr": scheduler.get_last_lr()[0], "img_per_s": n * cfg.batch_size / dt,
                          "ms_per_step": 1e3 * dt / n, "elapsed_s": time.perf_counter() - t_start}
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

            if sample_now:
                grid = write_samples(ema.module, cfg, data, device, out / "samples" / f"step_{step:08d}", decode)
                bar.write(f"step {step}: samples -> {grid}")
            if ckpt_now:
                last_good = checkpoint()
            if stop_signal:
                bar.write(f"stopped by signal {stop_signal[0]} at step {step}; checkpoint {last_good}; "
                          f"continue with: python -m stmd_fast.train --out {out} --resume")
                raise KeyboardInterrupt
    finally:
        dispatch.set_backend(previous_kernels)
        bar.close()
        metrics.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    wall = time.perf_counter() - t_start
    print(f"done: {cfg.steps} steps in {wall:.0f} s; checkpoint {last_good}")
    return last_good


def make_train_step(loss_fn, net, optimizer, scheduler, ema, compile: bool, precision: str, device: torch.device):
    """One optimisation step: loss_fn(x0, noise) -> (loss, error), backward, AdamW, lr schedule, EMA.

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
        optimizer.step()
        scheduler.step()
        ema.update_parameters(net)
        return loss.detach(), error

    return train_step


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop the metrics logged after the checkpoint (they will be logged again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)


def assert_compiled() -> None:
    """torch.compile falls back to eager silently on some failures: check a graph exists."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    if graphs == 0:
        raise RuntimeError("--compile: torch.compile produced no graph for the loss; run without --compile "
                           "and report this with your torch version")
    print(f"compiled the loss: {graphs} graph(s), {breaks} graph break(s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, resume = resolve_config(vars(args))
        train(cfg, resume)
    except (UserError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
