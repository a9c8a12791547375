"""The VAE of latent training, in one place: load it (a bad --vae is one DataError line), tell the
latent shape it makes, and decode model-space latents to images. The encoder side of the pipeline
is data/encode.py; the trainer's sample grids, Model.decode and `sample --exported --vae` decode here.
"""
from __future__ import annotations

from typing import Callable

import torch

from .datasets import DataError


def load_vae(name_or_path: str, device: torch.device):
    """diffusers' AutoencoderKL in eval mode on `device`, or DataError saying what to pass instead."""
    from diffusers import AutoencoderKL  # imported here: diffusers is slow to import

    try:
        # low_cpu_mem_usage=False: the path that needs no `accelerate` (and prints no notice asking for it)
        vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    except Exception as error:  # OSError, huggingface_hub's validation and connection errors, bad configs
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"--vae {name_or_path}: could not load an AutoencoderKL ({reason}); pass a local folder saved with "
            "save_pretrained (config.json + weights; for a whole pipeline, its vae/ subfolder) or a hub id "
            "reachable from this machine"
        ) from None
    return vae.eval().requires_grad_(False).to(device)


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


def latent_decoder(name_or_path: str, device: torch.device, scaling_factor: float,
                   shift_factor: float = 0.0) -> Callable[..., torch.Tensor]:
    """Load the VAE now (a bad path fails before any sampling) and return decode(z, batch_size=64):
    model-space latents -> images in [-1, 1]."""
    vae = load_vae(name_or_path, device)

    def decode(z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return decode_latents(vae, z, scaling_factor, shift_factor, batch_size)

    return decode
