"""Checkpoints and the public model API.

A checkpoint is a directory RUN/checkpoints/step_XXXXXXXX/ holding
  model.safetensors   the trained weights        ema.safetensors   the EMA weights
  train_state.pt      optimizer, scheduler, RNG   config.json       resolved config + metadata
It is written under a temporary name and renamed into place (atomic on POSIX), so a crash
or kill mid-write never leaves a broken checkpoint: at worst a .tmp-* folder that the next
save removes. find_checkpoint never looks at .tmp-* folders.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .devices import same_device
from .methods import METHODS
from .sampling import check_steps, inpainting_projection, sample, transition

FORMAT_VERSION = 1
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2))
    _fsync(tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, net: torch.nn.Module | dict, ema_net: torch.nn.Module | dict,
                    train_state: dict, meta: dict, keep: int, extra_weights: dict | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the `keep` newest.

    net, ema_net: the modules, or their full state dicts (what FSDP gathers onto rank 0); extra_weights:
    {file name: module or state dict} written beside them (the further EMAs). Under torchrun only rank 0
    calls this; a process killed mid-write leaves at most a .tmp-* folder."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    for leftover in root.glob(".tmp-*"):  # from a crash during an earlier save
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in [*zip(WEIGHT_FILES, (net, ema_net)), *(extra_weights or {}).items()]:
        state = module if isinstance(module, dict) else module.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / name)
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "config.json").write_text(json.dumps({**meta, "format": FORMAT_VERSION, "step": step}, indent=2))
    for f in tmp.iterdir():
        _fsync(f)
    replaced = None
    if final.exists():  # the same step saved again (e.g. an interrupt right after a save): move it aside first
        replaced = root / f".tmp-old-{final.name}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync(root)  # the rename is on disk before anything older is deleted
    if replaced is not None:
        shutil.rmtree(replaced)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / WEIGHT_FILES[0]).is_file():
        return path
    found = sorted((path / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def read_meta(ckpt: Path) -> dict:
    meta = json.loads((ckpt / "config.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{ckpt} has checkpoint format {meta.get('format')}, this stmd_fast reads "
                         f"format {FORMAT_VERSION}: use the stmd_fast version that wrote it")
    return meta


def build_net_from_meta(meta: dict) -> torch.nn.Module:
    cfg = TrainConfig(**meta["config"])
    return METHODS[cfg.method].build_net(cfg.net, tuple(meta["data_shape"]))


class Model:
    """A trained network with its method: sample, transition and inpaint.

    model = stmd_fast.load_checkpoint("runs/digits-stmd")
    x = model.sample(16, steps=2, flow_steps=1, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, net: torch.nn.Module, method: str, data_shape: tuple[int, ...], data_kind: str, meta: dict):
        self.net, self.method, self.data_shape, self.data_kind, self.meta = net, method, data_shape, data_kind, meta
        self._decode = None

    def decode(self, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """A latent model's samples -> images in [-1, 1] through the VAE it was trained with
        (loaded on first use from the path or hub id in its config)."""
        if self.data_kind != "latent":
            raise ValueError(f"this checkpoint makes {self.data_kind}s, not latents: there is nothing to decode")
        return self.load_vae()(z.to(self.device), batch_size)

    def load_vae(self):
        """The latent model's VAE decoder, loaded once (call it early: a bad path fails before sampling)."""
        from .data.vae import latent_decoder

        if self._decode is None:
            latent = self.meta["latent"]
            self._decode = latent_decoder(latent["vae"], self.device, latent["scaling_factor"], latent["shift_factor"])
        return self._decode

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is None:
            generator = torch.Generator(self.device)
            generator.seed()
        if not same_device(generator.device, self.device):
            raise ValueError(f"the generator is on {generator.device} but the model on {self.device}: "
                             f"make it with torch.Generator({str(self.device)!r})")
        return generator

    def sample(self, num: int, steps: int = 1, flow_steps: int = 1, generator: torch.Generator | None = None,
               grid: str = "uniform", batch_size: int | None = None) -> torch.Tensor:
        """`num` samples by Algorithm 2 with N = steps, M = flow_steps (images in [-1, 1]), drawn
        `batch_size` at a time (all at once by default) from one generator."""
        generator = self._generator(generator)
        return self._batched(num, batch_size, lambda n: sample(
            self.net, self.method, n, self.data_shape, steps, flow_steps, generator, grid))

    @staticmethod
    def _batched(num: int, batch_size: int | None, draw) -> torch.Tensor:
        if num < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"need num >= 1 and batch_size >= 1, got {num} and {batch_size}")
        size = batch_size or num
        return torch.cat([draw(min(size, num - start)) for start in range(0, num, size)])

    def transition(self, x: torch.Tensor, s_from: float, s_to: float, flow_steps: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_{s_to} ~ p(x_{s_to} | x_{s_from} = x) for a batch x (DDPM: the posterior-mean bridge step)."""
        check_steps(self.method, 1, flow_steps)
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x has per-sample shape {tuple(x.shape[1:])}, the model takes {self.data_shape}")
        return transition(self.net, self.method, x.to(self.device), s_from, s_to, flow_steps, self._generator(generator))

    def inpaint(self, observed: torch.Tensor, mask: torch.Tensor, num: int, steps: int = 1, flow_steps: int = 1,
                generator: torch.Generator | None = None, grid: str = "uniform",
                batch_size: int | None = None) -> torch.Tensor:
        """`num` completions of one observation (mask 1 = observed); observed entries are kept exactly."""
        if tuple(observed.shape) != self.data_shape:
            raise ValueError(f"the observation has shape {tuple(observed.shape)}, the model makes {self.data_shape}")
        project = inpainting_projection(observed.to(self.device), mask.to(self.device))
        generator = self._generator(generator)
        return self._batched(num, batch_size, lambda n: sample(
            self.net, self.method, n, self.data_shape, steps, flow_steps, generator, grid, project=project))


def ema_file(decay: float | None, ema_decay: float) -> str:
    """The file of a checkpoint that holds the EMA of `decay`: the run's ema_decay (or None) in
    ema.safetensors, each of its further ema_decays in ema-DECAY.safetensors."""
    return "ema.safetensors" if decay is None or decay == ema_decay else f"ema-{decay}.safetensors"


def ema_decays_of(meta: dict) -> list[float]:
    """Every EMA decay a checkpoint holds, its main one (ema.safetensors) first."""
    return [meta["config"]["ema_decay"], *meta["config"].get("ema_decays", [])]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema",
                    ema: float | None = None) -> Model:
    """Load a checkpoint directory (or a run directory's newest checkpoint) for sampling.

    weights: 'ema' (default, what samples use) or 'model' (the raw trained weights).
    ema: with weights 'ema', which EMA by its decay (a run keeps --ema-decay and each of --ema-decays);
    default: --ema-decay's."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {path}: pass a run directory (with checkpoints/) "
                                f"or a checkpoints/step_* directory")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    meta = read_meta(ckpt)
    if ema is not None and (weights != "ema" or ema not in ema_decays_of(meta)):
        kept = ", ".join(map(str, ema_decays_of(meta)))
        raise ValueError(f"--ema {ema}: " + (f"{ckpt} keeps the EMA decays {kept}; pick one of them"
                                             if weights == "ema" else "is for the EMA weights, not --weights model"))
    file = ema_file(ema, meta["config"]["ema_decay"]) if weights == "ema" else "model.safetensors"
    net = build_net_from_meta(meta)
    try:
        net.load_state_dict(load_file(ckpt / file))
    except RuntimeError as err:
        raise ValueError(f"the weights in {ckpt} do not fit the {meta['config']['method']} network its "
                         f"config.json describes (was the folder edited?): {str(err).splitlines()[0]}") from None
    net.eval().requires_grad_(False).to(device)
    return Model(net, meta["config"]["method"], tuple(meta["data_shape"]), meta["data_kind"], meta)
