"""The VAE of latent training, in one place: load it (a bad --vae is one DataError line), tell the
latent shape it makes, and decode model-space latents to images. The encoder side of the pipeline
is data/encode.py; the trainer's sample grids, Model.decode and `sample --exported --vae` decode here.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .datasets import DataError


def looks_local(name: str) -> bool:
    """Whether a --vae that does not exist here was meant as a folder, not a hub id (org/name): an absolute
    or ./~ path, or one inside an existing folder. Saves the hub's retries on a mistyped path."""
    path = Path(name).expanduser()
    return name.startswith(("/", ".", "~")) or (path.parent != Path(".") and path.parent.is_dir())


def check_vae_path(name_or_path: str, moved: str = "check the path") -> None:
    """DataError if a --vae meant as a local folder is not there (cheap: before any expensive work)."""
    if not Path(name_or_path).expanduser().exists() and looks_local(name_or_path):
        raise DataError(f"VAE {name_or_path}: no such folder; {moved}")


def load_vae(name_or_path: str, device: torch.device, moved: str = "check the path"):
    """diffusers' AutoencoderKL in eval mode on `device`, or DataError saying what to pass instead
    (`moved`: what to do when a local folder is not there, e.g. the flag that names its new place)."""
    from diffusers import AutoencoderKL  # imported here: diffusers is slow to import

    check_vae_path(name_or_path, moved)
    try:
        # low_cpu_mem_usage=False: the path that needs no `accelerate` (and prints no notice asking for it);
        # diffusers' own list of missing weights silenced: the line below says it
        with _diffusers_errors_only():
            vae, loading = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False,
                                                         output_loading_info=True)
    except Exception as error:  # OSError, huggingface_hub's validation and connection errors, bad configs
        raise DataError(f"--vae {name_or_path}: {load_failure(error)}") from None
    if loading["missing_keys"]:  # diffusers would initialise them at random: no VAE's latents
        missing, unexpected = loading["missing_keys"], loading["unexpected_keys"]
        found = f"; it holds {len(unexpected)} others, e.g. {unexpected[0]}" if unexpected else ""
        raise DataError(f"--vae {name_or_path}: its weights do not fit an AutoencoderKL ({len(missing)} of the "
                        f"AutoencoderKL's weights are not in it, e.g. {missing[0]}{found}); pass the folder of a VAE "
                        f"saved with save_pretrained (for a whole pipeline, its vae/ subfolder)")
    normalised = [k for k in ("latents_mean", "latents_std") if getattr(vae.config, k, None) is not None]
    if normalised:  # per-channel latent statistics (Playground v2.5's VAE): latents here are shaped by
        # scaling_factor and shift_factor alone, so such a VAE's would train several times off scale, silently
        raise DataError(f"--vae {name_or_path}: its config sets {' and '.join(normalised)} (a per-channel "
                        f"normalisation of its latents), which stmd_fast does not apply: use a VAE whose latents are "
                        f"shaped by scaling_factor and shift_factor alone (SD, SDXL, SD3 and FLUX VAEs are)")
    return vae.eval().requires_grad_(False).to(device)


def load_failure(error: BaseException) -> str:
    """Why from_pretrained failed, and the fix. An unreachable hub surfaces as diffusers' "does not appear to have
    a file named config.json": the cause is in the exception's chain (huggingface_hub's LocalEntryNotFoundError,
    over the connection error)."""
    chain = []
    while error is not None and len(chain) < 16:
        chain.append(error)
        error = error.__cause__ or error.__context__
    first_line = lambda e: str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # noqa: E731
    if any(type(e).__name__ == "OfflineModeIsEnabled" for e in chain):
        return ("HF_HUB_OFFLINE is set and the VAE is not in the local Hugging Face cache: unset it to download the "
                "VAE, or pass a folder saved with save_pretrained")
    if any(type(e).__name__ == "LocalEntryNotFoundError" for e in chain):
        cause = re.sub(r"Cannot reach \S+: ", "", first_line(chain[-1]))  # the URL: a line too long for one line
        return (f"the Hugging Face hub could not be reached from this machine ({cause}), and the VAE "
                f"is not in the local cache: download it where the hub is reachable (save_pretrained) and pass "
                f"its folder")
    return (f"could not load an AutoencoderKL ({first_line(chain[0])}); pass a local folder saved with save_pretrained "
            f"(config.json + weights; for a whole pipeline, its vae/ subfolder) or a hub id reachable from this "
            f"machine")


@contextmanager
def _diffusers_errors_only():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated: not ours to fix
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            yield
    finally:
        logging.set_verbosity(level)


def latent_shape(vae, resolution: int) -> list[int]:
    """[C, h, w] of one latent; each encoder block but the last halves the resolution."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise DataError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor "
                        f"{factor}; pick one that is (e.g. {resolution // factor * factor or factor})")
    return [vae.config.latent_channels, resolution // factor, resolution // factor]


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0,
                   batch_size: int = 64) -> torch.Tensor:
    """Model-space latents (what LatentShards.batch returns and the samplers make) -> images in
    [-1, 1] through the VAE's decoder, `batch_size` at a time; undoes batch()'s shift and scale."""
    parts = [vae.decode((part / scaling_factor + shift_factor).to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)
             for part in z.split(batch_size)]
    return torch.cat(parts).to(z.device)


def check_vae_fits(vae, name: str, shape, resolution: int, fingerprint: str | None = None) -> None:
    """DataError unless `vae` makes latents of `shape` [C, h, w] from images of `resolution` pixels and, where the
    latents' encoding recorded it (manifest and checkpoint: vae_sha256), is that very VAE: one named by another
    path (moved, copied to another machine) or replaced in place decodes them wrongly without a word."""
    made = latent_shape(vae, resolution)
    if made != list(shape):
        raise DataError(f"VAE {name} makes {'x'.join(map(str, made))} latents from {resolution}-pixel images, and "
                        f"this model's are {'x'.join(map(str, shape))}: pass the VAE its latents were encoded with")
    if fingerprint is not None and vae_fingerprint(vae) != fingerprint:
        raise DataError(f"VAE {name} is not the VAE these latents were encoded with (its weights or latent scaling "
                        f"differ from the SHA-256 recorded at encoding, {fingerprint[:12]}...): pass that VAE")


def expected_latents(shape, latent: dict) -> tuple[list[int], int, str | None] | None:
    """latent_decoder's `fits` from a model's latent shape and its "latent" metadata (None if it predates
    recording the resolution; no fingerprint if it predates recording the VAE's)."""
    return (list(shape), latent["resolution"], latent.get("vae_sha256")) if latent.get("resolution") else None


def latent_decoder(name_or_path: str, device: torch.device, scaling_factor: float, shift_factor: float = 0.0,
                   fits: tuple[list[int], int, str | None] | None = None,
                   moved: str = "check the path") -> Callable[..., torch.Tensor]:
    """Load the VAE now (a bad path fails before any sampling) and return decode(z, batch_size=64):
    model-space latents -> images in [-1, 1]. fits: (latent shape, resolution, the VAE's fingerprint or None),
    what check_vae_fits holds the VAE to."""
    vae = load_vae(name_or_path, device, moved)
    if fits is not None:
        check_vae_fits(vae, name_or_path, *fits)

    def decode(z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return decode_latents(vae, z, scaling_factor, shift_factor, batch_size)

    return decode


def vae_fingerprint(vae) -> str:
    """SHA-256 of a VAE's weights and of the config values that shape its latents (scaling and shift factors,
    latent channels, the blocks; not its path, nor settings a diffusers release may add): shards encoded by one
    VAE are reused only with that same VAE. About a second for the SD VAE's 84M parameters."""
    import hashlib
    import json

    shaping = {k: getattr(vae.config, k, None) for k in ("scaling_factor", "shift_factor", "latent_channels",
                                                          "block_out_channels")}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
