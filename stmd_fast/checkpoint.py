"""Checkpoints and the public model API.

A checkpoint is a directory RUN/checkpoints/step_XXXXXXXX/ holding
  model.safetensors   the trained weights        ema.safetensors   the EMA weights
  train_state.pt      optimizer, scheduler, RNG   config.json       resolved config + metadata
  ema-D.safetensors   each further EMA (--ema-decays D)
config.json records the size and SHA-256 of every other file (checked_files), checked on load, so a
truncated, overwritten or bit-flipped file is found and named; weights are also checked finite
on load, and a checkpoint of non-finite weights is never written.

What no kill can leave half-done (the order of operations, each step fsynced):
  save:     write .tmp-step_X/, fsync its files and itself -> rename to step_X -> fsync checkpoints/
  rotation: rename an old step_Y to .del-step_Y -> fsync checkpoints/ -> delete it
  same step saved again: step_X -> .replaced-step_X, then the new one -> step_X, then delete
Loaders read step_* folders (and a .replaced-step_X whose step_X is missing: a kill between the two
renames), never a half-written or half-deleted one; the next save (or recover_leftovers) deletes the
.tmp-* and .del-* folders and puts back a .replaced-step_X whose replacement never arrived. Rotation
keeps the newest intact checkpoint even when newer ones are damaged. tests/test_survival.py kills a
save at each of its file-system operations in turn and checks all of this.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import TrainConfig
from .devices import resolve_device, same_device
from .files import fsync_path, write_atomic, write_bytes_durably
from .methods import METHODS, get_method
from .sampling import check_count, check_steps, check_times, inpainting_projection, sample, transition

if TYPE_CHECKING:
    from .operators import LinearOperator

FORMAT_VERSION = 2  # 2: U-Net time embedding as scale-shift after the norm (issue 17)
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILE = "train_state.pt"
CHECKED_FILES = (*WEIGHT_FILES, STATE_FILE)  # sizes and SHA-256 in config.json


class CheckpointError(ValueError):
    """A checkpoint that is damaged, incomplete or unreadable; the message names the file."""


class ReadFailed(CheckpointError):
    """A checkpoint file that could not be read for a cause outside its bytes (an I/O or permission error,
    memory): not damage, so newest_intact passes nothing over and nothing is set aside."""


def read_failed(path: Path, err: BaseException) -> ReadFailed:
    reason = (err.strerror if isinstance(err, OSError) and err.strerror else None) or type(err).__name__
    return ReadFailed(f"cannot read {path} ({reason}): the file may well be intact, so nothing was set aside as "
                      f"damaged; fix the cause (the file system, its permissions, free memory) and run again")


class NonFiniteState(CheckpointError):
    """Weights or optimizer state holding NaN or inf: handed to save_checkpoint (nothing was written), or
    read from a checkpoint whose bytes are intact (its run had diverged)."""


def write_json_atomic(path: Path, obj) -> None:
    """Replace `path` by `obj` as JSON: a reader (or a kill) sees the old file or the new one, never half."""
    write_atomic(path, json.dumps(obj, indent=2).encode())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _nonfinite(tensors: dict, where: str) -> str | None:
    """Names the first floating tensor of `tensors` (nested dicts/lists) holding NaN or inf, else None."""
    for key, value in tensors.items() if isinstance(tensors, dict) else enumerate(tensors):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not torch.isfinite(value).all():
                return f"{where}[{key!r}]"
        elif isinstance(value, (dict, list, tuple)):
            found = _nonfinite(value, f"{where}[{key!r}]")
            if found:
                return found
    return None


def _state(module: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(run_dir: Path, step: int, net: torch.nn.Module | dict, ema_net: torch.nn.Module | dict,
                    train_state: dict, meta: dict, keep: int, extra_weights: dict | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the `keep` newest (never the newest intact).

    net, ema_net: the modules, or their full state dicts (what FSDP gathers onto rank 0); extra_weights:
    {file name: module or state dict} written (and checksummed) beside them (the further EMAs). Under torchrun
    only rank 0 calls this. NonFiniteState (nothing written) if a weight or optimizer tensor holds NaN or
    inf; OSError (e.g. a full disk) leaves no partial checkpoint behind."""
    files = {name: _state(module) for name, module in [*zip(WEIGHT_FILES, (net, ema_net)), *(extra_weights or {}).items()]}
    bad = next(filter(None, (_nonfinite(state, name) for name, state in files.items())), None) \
        or _nonfinite(train_state, STATE_FILE)
    if bad:
        raise NonFiniteState(f"not saving step {step}: {bad} holds NaN or inf")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    new_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if new_root:
        fsync_path(root.parent)
    recover_leftovers(run_dir)
    tmp.mkdir()
    try:
        record = {}
        for name in (*files, STATE_FILE):
            if name == STATE_FILE:
                buffer = io.BytesIO()
                torch.save(train_state, buffer)
                data = buffer.getvalue()
            else:
                data = save_safetensors(files.pop(name))
            write_bytes_durably(tmp / name, data)
            record[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            del data
        write_bytes_durably(tmp / "config.json", json.dumps(
            {**meta, "format": FORMAT_VERSION, "step": step, "files": record}, indent=2).encode())
        fsync_path(tmp)  # the folder's entries
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replaced = root / f".replaced-{final.name}"
    if final.exists():  # the same step saved again: the old one stays whole until the new one is in place
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_path(root)  # the rename is on disk before anything older is deleted
    if replaced.exists():
        shutil.rmtree(replaced)
    _rotate(root, keep, final)
    return final


def _rotate(root: Path, keep: int, final: Path) -> None:
    """Delete all but the `keep` newest step_* folders, sparing `final` (just written) and, if a newer
    folder than it exists, the newest of those that verifies: rotation never deletes the newest intact one."""
    folders = sorted(root.glob("step_*"))
    spared = {final, *folders[-keep:]}
    newer_intact = next((c for c in reversed(folders) if c.name > final.name and _maybe_intact(c)), None)
    if newer_intact is not None:
        spared.add(newer_intact)
    doomed = [old for old in folders if old not in spared]
    for old in doomed:
        os.replace(old, root / f".del-{old.name}")  # out of the loaders' sight before it is half deleted
    if doomed:
        fsync_path(root)
        for old in doomed:
            shutil.rmtree(root / f".del-{old.name}")


def _maybe_intact(ckpt: Path) -> bool:
    """is_intact, with one that cannot be read now counted as intact: rotation spares what it cannot judge."""
    try:
        return is_intact(ckpt)
    except ReadFailed:
        return True


def recover_leftovers(run_dir: str | Path) -> None:
    """Tidy what a kill during save or rotation left in RUN/checkpoints: delete .tmp-* and .del-*
    folders; put a .replaced-step_X back if its replacement step_X never arrived."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for leftover in root.glob(".replaced-step_*"):
        original = root / leftover.name.removeprefix(".replaced-")
        if original.exists():
            shutil.rmtree(leftover)
        else:
            os.replace(leftover, original)
            fsync_path(root)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, newest first (damaged ones included, half-written or half-deleted
    ones never): the step_* folders, and a .replaced-step_X whose replacement a kill stopped short of."""
    root = Path(run_dir) / "checkpoints"
    found = {p.name: p for p in root.glob("step_*") if p.is_dir()}
    for orphan in root.glob(".replaced-step_*"):  # whole: it is deleted only once step_X is in place
        found.setdefault(orphan.name.removeprefix(".replaced-"), orphan)
    return [found[name] for name in sorted(found, reverse=True)]


def is_checkpoint_dir(path: Path) -> bool:
    """A step_* folder, or any folder holding a checkpoint's files (not a run directory)."""
    return path.name.startswith("step_") or any((path / name).is_file() for name in CHECKED_FILES)


def run_holding(path: str | Path) -> Path | None:
    """The run directory in whose checkpoints/ folder `path` lies (a checkpoint, or checkpoints/ itself), if any."""
    for folder in (path := Path(path).resolve(), *path.parents):
        if folder.name == "checkpoints" and list_checkpoints(folder.parent):
            return folder.parent
    return None


def is_run_config(path: Path) -> bool:
    """Whether a config.json is a run's (train writes one into --out): a fresh run may replace only that."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("config"), dict) and "data_shape" in meta


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory itself, or the newest step_* folder of a run directory, unverified
    (newest_intact finds the newest one that verifies)."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    found = list_checkpoints(path)
    return found[0] if found else None


def read_meta(ckpt: Path) -> dict:
    """config.json of a checkpoint; CheckpointError naming the file if it is missing, not JSON or of
    another format."""
    path = Path(ckpt) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {ckpt} is not a whole checkpoint") from None
    except (OSError, MemoryError) as err:
        raise read_failed(path, err) from None
    except ValueError as err:  # not UTF-8, not JSON
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}): "
                              f"the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} does not hold a checkpoint's metadata: the checkpoint is damaged")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint format {meta.get('format')}, this stmd_fast reads "
                              f"format {FORMAT_VERSION}: use the stmd_fast version that wrote it")
    return meta


def verify_checkpoint(ckpt: str | Path, finite: bool = False) -> dict:
    """The checkpoint's metadata once every file is present with the size and SHA-256 config.json
    records (and, with finite, both weight files load and hold no NaN or inf); CheckpointError naming
    the first file that does not."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    record = meta.get("files", {})  # absent in checkpoints written before checksums: presence only
    for name in checked_files(meta):
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        expected = record.get(name)
        if expected is None:
            continue
        try:
            size = path.stat().st_size
            digest = file_sha256(path) if size == expected["bytes"] else None
        except FileNotFoundError:  # deleted since is_file: a rotation by a run still writing here
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
        except OSError as err:
            raise read_failed(path, err) from None
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, {expected['bytes']} were written: the file is "
                                  f"truncated or overwritten")
        if digest != expected["sha256"]:
            raise CheckpointError(f"{path} fails its SHA-256 check: its bytes changed after it was written "
                                  f"(a damaged disk or an edit)")
    if finite:
        for name in checked_files(meta):
            if name != STATE_FILE:
                load_weights(ckpt, name)
    return meta


def checked_files(meta: dict) -> list[str]:
    """The files a checkpoint must hold, checked against config.json: model, every EMA, train_state."""
    config = meta.get("config", {})
    extra = [ema_file(d, config["ema_decay"]) for d in config.get("ema_decays", [])] if "ema_decay" in config else []
    return [*WEIGHT_FILES, *extra, STATE_FILE]


def is_intact(ckpt: Path) -> bool:
    """Whether the checkpoint verifies (verify_checkpoint), as a bool; ReadFailed (it could not be read, which
    says nothing of its bytes) is raised."""
    try:
        verify_checkpoint(ckpt)
        return True
    except ReadFailed:
        raise
    except CheckpointError:
        return False


NO_INTACT_FIX = "this run has nothing to load: give another run or checkpoint"


def newest_intact(path: str | Path, finite: bool = False, fix: str = NO_INTACT_FIX) -> tuple[Path, dict, list[str]]:
    """(checkpoint, its metadata, why each newer one was passed over) for a run directory: the newest
    checkpoint that verifies (verify_checkpoint(ckpt, finite)), also when given as RUN/checkpoints; for
    a checkpoint directory: itself, verified. FileNotFoundError if there is no checkpoint, CheckpointError
    if none is intact (ending in `fix`: what the caller's user can do)."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path, verify_checkpoint(path, finite), []  # named by the user: no fallback
    if path.name == "checkpoints" and not list_checkpoints(path) and list_checkpoints(path.parent):
        path = path.parent  # RUN/checkpoints given for RUN: the folder that holds the step_* folders
    candidates = list_checkpoints(path)
    if not candidates and not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory (its --out, with checkpoints/) or a "
                                f"checkpoints/step_* directory")
    if not candidates:
        exported = (" (it is an exported sampler: python -m stmd_fast.sample --exported " + str(path) + " runs it)"
                    if path.suffix == ".pt2" and path.is_file() else
                    f" ({path / 'checkpoints'} is a file, not the folder of checkpoints)"
                    if (path / "checkpoints").is_file() else "")
        raise FileNotFoundError(f"no checkpoint in {path}{exported}: pass a run directory (with checkpoints/) "
                                f"or a checkpoints/step_* directory")
    damaged = []
    for ckpt in candidates:
        try:
            return ckpt, verify_checkpoint(ckpt, finite), damaged
        except ReadFailed:  # maybe intact: passing it over would resume from an older one and set it aside
            raise
        except CheckpointError as err:
            damaged.append(str(err))
    raise CheckpointError(f"none of the {len(candidates)} checkpoints in {path / 'checkpoints'} is intact "
                          f"(newest: {damaged[0]}): {fix}")


def load_weights(ckpt: Path, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One weights file of a checkpoint, on `device`; CheckpointError naming the file if it does not
    parse or holds NaN or inf."""
    path = Path(ckpt) / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (OSError, MemoryError) as err:
        raise read_failed(path, err) from None
    try:
        state = load_safetensors(raw)
    except MemoryError as err:
        raise read_failed(path, err) from None
    except Exception as err:  # safetensors' SafetensorError: the bytes do not parse
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is unreadable ({reason}): the checkpoint is damaged") from None
    bad = _nonfinite(state, name)
    if bad:
        raise NonFiniteState(f"{path}: {bad.removeprefix(name)} holds NaN or inf: these weights cannot be used; "
                              f"take an earlier checkpoint")
    return {k: v.to(device) for k, v in state.items()}


def load_train_state(ckpt: Path, device: str | torch.device) -> dict:
    """train_state.pt of a checkpoint (optimizer, scheduler, RNG, step); CheckpointError naming it if unreadable."""
    path = Path(ckpt) / STATE_FILE
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (OSError, MemoryError, torch.OutOfMemoryError) as err:
        raise read_failed(path, err) from None
    except Exception as err:  # pickle errors, a truncated zip
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is unreadable ({reason}): the checkpoint is damaged") from None


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to damaged-step_X beside it: out of the loaders' and the rotation's
    sight, kept for the user to inspect or delete."""
    target = ckpt.with_name(f"damaged-{ckpt.name}")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"damaged-{ckpt.name}-{n}")
    os.replace(ckpt, target)
    fsync_path(ckpt.parent)
    return target


def saved_config(ckpt: Path, meta: dict) -> TrainConfig:
    """The TrainConfig a checkpoint's config.json records; CheckpointError if this code cannot take it
    (a field of another stmd_fast version, a value edited by hand)."""
    try:
        return TrainConfig(**meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(ckpt) / 'config.json'} does not describe a run this stmd_fast knows ({err}): "
                              f"was it written by another stmd_fast version, or edited?") from None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Within: torch's default dtype is `dtype`; the caller's comes back after."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_net_from_meta(ckpt: Path, meta: dict) -> torch.nn.Module:
    cfg = saved_config(ckpt, meta)
    return METHODS[cfg.method].build_net(cfg.net, tuple(meta["data_shape"]))


class Model:
    """A trained network with its method: sample, transition and inpaint.

    model = stmd_fast.load_checkpoint("runs/digits-stmd")
    x = model.sample(16, steps=2, flow_steps=1, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, net: torch.nn.Module, method: str, data_shape: tuple[int, ...], data_kind: str, meta: dict):
        get_method(method)  # an unknown one said now, not as a KeyError at the first sample
        self.net, self.method, self.data_shape, self.data_kind, self.meta = net, method, data_shape, data_kind, meta
        self.checkpoint: Path | None = None  # load_checkpoint's: the checkpoint folder the weights came from
        self.weights: str | None = None  # load_checkpoint's: "ema" or "model" (None: a network given by hand)
        self.ema_decay: float | None = None  # load_checkpoint's: the decay of the EMA loaded (weights "ema")
        self._decode, self._vae = None, None  # the loaded decoder and the VAE folder it came from

    def decode(self, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """A latent model's samples, (N, *data_shape) floats, -> images (about [-1, 1]) through the VAE it was
        trained with (loaded on first use from the path or hub id in its config), batch_size latents at a time.
        Latents of another size decoded without a word into images of another size; now refused."""
        if self.data_kind != "latent":
            raise ValueError(f"this checkpoint makes {self.data_kind}s, not latents: it has no VAE, nothing to decode")
        z = self._input(z, "z")
        if tuple(z.shape[1:]) != self.data_shape or len(z) == 0:
            raise ValueError(f"z has shape {tuple(z.shape)}; this model's latents are (N >= 1, "
                             f"{', '.join(map(str, self.data_shape))}), as sample() returns them")
        self._count("batch_size", batch_size)
        if batch_size < 1:
            raise ValueError(f"need batch_size >= 1, got {batch_size}")
        return self.load_vae()(z, batch_size)

    def load_vae(self, vae: str | None = None):
        """The latent model's VAE decoder, loaded on the first call and kept (call it early: a bad path fails
        before sampling): the VAE it was trained with, or `vae` (its new place, when it moved: a folder other
        than the loaded one is loaded), which must make this model's latent shape."""
        from .data.vae import expected_latents, latent_decoder

        if self.data_kind != "latent":
            raise ValueError(f"this checkpoint makes {self.data_kind}s, not latents: it has no VAE, nothing to decode")
        latent = self.meta["latent"]
        if self._decode is None or (vae is not None and vae != self._vae):  # another folder given: load it
            self._decode = latent_decoder(vae or latent["vae"], self.device, latent["scaling_factor"],
                                          latent["shift_factor"], fits=expected_latents(self.data_shape, latent),
                                          moved="if it moved, pass its new place with --vae DIR")
            self._vae = vae or latent["vae"]
        return self._decode

    @property
    def grid(self) -> str:
        """The diffusion time grid the run samples on (its --sample-grid; STMD's --s-sampler grid trains on its
        points): the default of every sampling call here; pass grid= to use another."""
        return self.meta.get("config", {}).get("sample_grid", "uniform")  # a Model built by hand: uniform

    def _grid(self, grid: str | None) -> str:
        """The grid asked for, or the run's when None ("" is an unknown grid, not the default)."""
        return self.grid if grid is None else grid

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (load_checkpoint's device): inputs are moved there."""
        return next(self.net.parameters()).device

    def _input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x on the model's device in its dtype; integer pixels are refused (the model works in [-1, 1]), and
        an image observation in 0..255 is said."""
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise ValueError(f"{name} is {x.dtype}: the model takes floats in [-1, 1] (for 8-bit pixels, "
                             f"x.float() / 127.5 - 1)")
        finite = x[torch.isfinite(x)]  # NaN: a missing pixel of an observation; NaN and inf are the operator's to say
        peak = float(finite.detach().abs().max()) if finite.numel() else 0.0  # detached: no requires_grad warning
        if self.data_kind == "image" and name != "x" and peak > 20:
            warnings.warn(f"{name} reaches {peak:g}: the model's images are in [-1, 1] (for 0..255 pixels, "
                          f"x / 127.5 - 1)", stacklevel=3)
        return x.to(self.device, self._dtype())

    def _dtype(self) -> torch.dtype:
        """The weights' dtype: float32, which the sampler's noise and times are (or a one-line error)."""
        dtype = next(self.net.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"model.net is {dtype}: the sampler draws float32 noise and times, so it runs float32 "
                             f"weights, as load_checkpoint returns them")
        return dtype

    _count = staticmethod(check_count)

    def default_steps(self, steps: int | None, conditioned: bool = False) -> int:
        """N: the method's own default (1 for STMD and Mean Flow, 100 for DDPM) when not given; for a chain an
        observation conditions without particles, at least CONDITIONED_STEPS (N = 1 would ignore it)."""
        from .operators import CONDITIONED_STEPS

        if steps is not None:
            return steps
        default = METHODS[self.method].default_steps
        return max(default, CONDITIONED_STEPS) if conditioned and METHODS[self.method].diffusion else default

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (or None), got {generator!r}: "
                            f"torch.Generator({str(self.device)!r}).manual_seed(SEED)")
        if generator is None:  # seeded from torch's global generator: torch.manual_seed(S) repeats the draw
            generator = torch.Generator(self.device).manual_seed(int(torch.randint(2 ** 63 - 1, ())))
        if not same_device(generator.device, self.device):
            raise ValueError(f"the generator is on {generator.device} but the model on {self.device}: "
                             f"make it with torch.Generator({str(self.device)!r})")
        return generator

    def sample(self, num: int, steps: int | None = None, flow_steps: int = 1, generator: torch.Generator | None = None,
               grid: str | None = None, batch_size: int | None = None) -> torch.Tensor:
        """`num` samples by Algorithm 2 with N = steps, M = flow_steps (in model space: images about [-1, 1],
        not clamped; a latent model's latents, which decode() makes images), drawn `batch_size` at a time (all at once by default) from one generator.
        steps: default 1 for STMD and Mean Flow, 100 for DDPM (its one-step x0_hat is a posterior mean).
        The noise is drawn batch by batch, so one generator seed gives other samples at another
        batch_size. Sampling runs under torch.no_grad (here and in every method below)."""
        steps, generator = self.default_steps(steps), self._generator(generator)
        return self._batched(num, batch_size, lambda n: sample(
            self.net, self.method, n, self.data_shape, steps, flow_steps, generator, self._grid(grid)))

    def _batched(self, num: int, batch_size: int | None, draw) -> torch.Tensor:
        self._count("num", num)
        self._count("batch_size", batch_size, allow_none=True)
        self._dtype()
        if num < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"need num >= 1 and batch_size >= 1, got {num} and {batch_size}")
        size = batch_size or num
        return torch.cat([draw(min(size, num - start)) for start in range(0, num, size)])

    def transition(self, x: torch.Tensor, s_from: float, s_to: float, flow_steps: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_{s_to} ~ p(x_{s_to} | x_{s_from} = x) for a batch x (DDPM: the posterior-mean bridge step)."""
        check_steps(self.method, 1, flow_steps)
        x = self._input(x, "x")
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x has per-sample shape {tuple(x.shape[1:])}, the model takes {self.data_shape}")
        if len(x) == 0:  # the times checked all the same
            check_times(s_from, s_to)
            return x.clone()
        return transition(self.net, self.method, x, s_from, s_to, flow_steps, self._generator(generator))

    def inpaint(self, observed: torch.Tensor, mask: torch.Tensor, num: int, steps: int | None = None,
                flow_steps: int = 1, generator: torch.Generator | None = None, grid: str | None = None,
                batch_size: int | None = None) -> torch.Tensor:
        """`num` completions of one observation (mask 1 = observed); observed entries are kept exactly
        (the missing ones are ignored: they may hold anything, NaN included). steps: N >= 2 with STMD or DDPM
        (operators.check_conditions: N = 1, or Mean Flow, would ignore the observation); default 8 (DDPM 100)."""
        from .operators import check_conditions

        observed, steps = self._input(observed, "the observation"), self.default_steps(steps, conditioned=True)
        check_steps(self.method, steps, flow_steps)
        check_conditions(self.method, steps, "the observation", "steps=N",
                         "posterior_sample(y, Mask(mask), sigma_y, particles=K)")
        if tuple(observed.shape) != self.data_shape:
            raise ValueError(f"the observation has shape {tuple(observed.shape)}, the model makes {self.data_shape}")
        project = inpainting_projection(observed, torch.as_tensor(mask).to(self.device))
        generator = self._generator(generator)
        grid = self._grid(grid)
        return self._batched(num, batch_size, lambda n: sample(
            self.net, self.method, n, self.data_shape, steps, flow_steps, generator, grid, project=project))

    def posterior_sample(self, y: torch.Tensor, operator: "LinearOperator", sigma_y: float = 0.0,
                         particles: int | None = None, steps: int | None = None, flow_steps: int = 1, num: int = 1,
                         generator: torch.Generator | None = None, grid: str | None = None,
                         batch_size: int | None = None) -> torch.Tensor:
        """`num` draws of x_0 given one measurement y = A x_0 + sigma_y n (y without a batch axis;
        operator: stmd_fast.operators), as (num, *data_shape).

        particles=None: DDNM (sigma_y = 0: A x = y exactly) or DDNM+ (sigma_y > 0) inside the sampler
        loop, one chain per draw. particles=K: SMC (stmd_fast/smc.py), each draw one particle picked
        by weight from its own run of K (num * K chains); its law tends to the model's exact
        posterior p(x_0) N(y; A x_0, sigma_y^2 I) / p(y) as K grows. batch_size: chains per batch (with
        SMC, at least one run of K).
        steps: with particles as for sample; without, N >= 2 with STMD or DDPM (operators.check_conditions: N = 1,
        or Mean Flow, would ignore y), default 8 (DDPM 100)."""
        from .operators import DDNM, LinearOperator, check_conditions, check_sigma_y
        from .smc import network_denoiser, smc_sample

        steps = self.default_steps(steps, conditioned=particles is None)
        check_steps(self.method, steps, flow_steps)
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator must be one of stmd_fast.operators' (e.g. AvgPool(4), Mask(m)), "
                            f"got {operator!r}")
        self._count("particles", particles, allow_none=True)
        operator.check(self.data_shape)
        y = self._input(y, "y")
        expected = tuple(operator(torch.zeros(1, *self.data_shape, device=self.device)).shape[1:])
        if tuple(y.shape) != expected:
            raise ValueError(f"y has shape {tuple(y.shape)}; {operator.name} measures {self.data_shape} samples "
                             f"as {expected}")
        operator.check_finite(y)
        check_sigma_y(sigma_y)
        if particles is None:
            check_conditions(self.method, steps, "y", "steps=N", "particles=K, sigma_y > 0")
        generator, grid = self._generator(generator), self._grid(grid)
        if particles is None:
            hook = DDNM(operator, y, sigma_y)
            return self._batched(num, batch_size, lambda n: sample(
                self.net, self.method, n, self.data_shape, steps, flow_steps, generator, grid, project=hook))
        if particles < 1:
            raise ValueError(f"need particles >= 1, got {particles} (or particles=None for DDNM)")
        denoise = network_denoiser(self.net, self.method, flow_steps)
        runs = None if batch_size is None else max(1, batch_size // particles)
        return self._batched(num, runs, lambda n: smc_sample(
            denoise, self.method, operator, y.expand(n, *y.shape), sigma_y, particles, self.data_shape, steps,
            flow_steps, generator, grid).draw(generator))


def ema_file(decay: float | None, ema_decay: float) -> str:
    """The file of a checkpoint that holds the EMA of `decay`: the run's ema_decay (or None) in
    ema.safetensors, each of its further ema_decays in ema-DECAY.safetensors."""
    return "ema.safetensors" if decay is None or decay == ema_decay else f"ema-{decay}.safetensors"


def ema_decays_of(meta: dict) -> list[float]:
    """Every EMA decay a checkpoint holds, its main one (ema.safetensors) first."""
    return [meta["config"]["ema_decay"], *meta["config"].get("ema_decays", [])]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema",
                    ema: float | None = None) -> Model:
    """Load a checkpoint directory, or a run directory's newest intact checkpoint (with a warning naming
    the damaged newer ones it passed over), for sampling. Every file is verified against the checksums
    in its config.json and the weights must be finite: CheckpointError naming the file otherwise.

    weights: 'ema' (default, what samples use) or 'model' (the raw trained weights).
    ema: with weights 'ema', which EMA by its decay (a run keeps --ema-decay and each of --ema-decays);
    default: --ema-decay's."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if isinstance(ema, (str, bytes, bool)):  # "0.999" is not 0.999: the error would list it among the decays kept
        raise TypeError(f"ema must be a number (an EMA decay, e.g. 0.999), got {ema!r}")
    path = Path(os.path.expanduser(path))  # "~/runs/x", as a notebook writes it (an unknown ~user stays)
    device = resolve_device(device, what="device")  # before reading: a machine without CUDA says so at once
    for attempt in range(3):  # a run still training may rotate its newest checkpoint away while it is read
        ckpt, meta, damaged = newest_intact(path)
        try:
            return _load_model(ckpt, meta, damaged, device, weights, ema)
        except CheckpointError:
            if ckpt.exists() or attempt == 2:
                raise
            if is_checkpoint_dir(Path(path)):
                raise CheckpointError(f"{ckpt} was deleted while it was read: is its run still training (its "
                                      f"--keep-checkpoints rotates old ones out)? Give the run's folder for its newest "
                                      f"checkpoint, or copy this one aside") from None


def _load_model(ckpt: Path, meta: dict, damaged: list[str], device: torch.device, weights: str,
                ema: float | None) -> Model:
    if damaged:
        warnings.warn(f"using {ckpt}, the newest intact checkpoint; passed over: {'; '.join(damaged)}", stacklevel=3)
    if ema is not None and (weights != "ema" or ema not in ema_decays_of(meta)):
        kept = ", ".join(map(str, ema_decays_of(meta)))
        raise ValueError(f"--ema {ema}: " + (f"{ckpt} keeps the EMA decays {kept}; pick one of them"
                                             if weights == "ema" else "is for the EMA weights, not --weights model"))
    file = ema_file(ema, meta["config"]["ema_decay"]) if weights == "ema" else "model.safetensors"
    try:
        # the initial weights are overwritten: leave the caller's RNG alone; float32 as trained, whatever the
        # caller's default dtype (a float64 default built a network that Model.sample then refused)
        with torch.random.fork_rng(devices=[]), default_dtype(torch.float32):
            net = build_net_from_meta(ckpt, meta)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt / 'config.json'} does not describe a network this stmd_fast builds "
                              f"({type(err).__name__}: {err}): was it edited?") from None
    try:
        net.load_state_dict(load_weights(ckpt, file))
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {ckpt} do not fit the {meta['config']['method']} network its "
                              f"config.json describes (was the folder edited?): {str(err).splitlines()[0]}") from None
    net.eval().requires_grad_(False).to(device)
    model = Model(net, meta["config"]["method"], tuple(meta["data_shape"]), meta["data_kind"], meta)
    model.checkpoint, model.weights = ckpt, weights
    model.ema_decay = (meta["config"]["ema_decay"] if ema is None else ema) if weights == "ema" else None
    return model
