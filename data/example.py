"""A tiny stand-in for your own data, to try the own-images walkthrough (README) on a CPU in minutes:

    python -m stmd_fast.data.example --out demo      # demo/images/*.png and demo/vae/ (a random tiny VAE)

The images are synthetic: a colored disc and a colored square on a two-color gradient, at random
places and sizes, saved at assorted sizes and aspect ratios (the loaders resize and crop them). The
VAE is diffusers' AutoencoderKL with random weights and SD's layout in miniature (4 latent channels,
downsampling 8), so encode, train and decode run as they would with stabilityai/sd-vae-ft-ema; its
latents mean nothing, so latent samples look like noise. Nothing is downloaded.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..cli import Parser, one_line_errors


MAX_SIDE = 112  # pixels: the images' sizes are drawn below it


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """One RGB image: a gradient background, a disc and a square, in random colors, places and sizes."""
    width, height = (int(v) for v in rng.integers(48, MAX_SIDE, size=2))
    top, bottom = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0, 1, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for shape in ("ellipse", "rectangle"):
        size = int(rng.integers(min(width, height) // 5, min(width, height) // 2))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        getattr(draw, shape)((x, y, x + size, y + size), fill=color)
    return image


def tiny_vae():
    """A random AutoencoderKL shaped like SD's VAE in miniature: 4 latent channels, downsampling 8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64).eval()


def main(argv: list[str] | None = None) -> Path:
    p = Parser(prog="python -m stmd_fast.data.example", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for images/ and vae/")
    p.add_argument("--num", type=int, default=64, help="number of images [default: 64]")
    p.add_argument("--seed", type=int, default=0, help="seeds the images and the VAE's weights [default: 0]")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num {args.num}: must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: is a file; give a folder (it gets images/ and vae/)")
    if (out / "images").is_dir() and any((out / "images").iterdir()):  # old images would join the new ones
        p.error(f"--out {out}: {out / 'images'} already holds files; choose a new --out, or remove that folder")
    there = next(folder for folder in (out, *Path(out.absolute()).parents) if folder.exists())
    free, most = shutil.disk_usage(there).free, args.num * MAX_SIDE ** 2 * 3  # a PNG is at most its pixels
    if most > free:
        p.error(f"--num {args.num}: the images may take up to {most / 1e9:.3g} GB, and {there} has {free / 1e9:.3g} "
                f"GB free: lower --num")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        p.error(f"--out {out}: cannot create it ({err.strerror or err})")
    torch.manual_seed(args.seed)
    tiny_vae().save_pretrained(out / "vae")  # first: images stopped part way are a usable folder already
    rng = np.random.default_rng(args.seed)
    for i in tqdm(range(args.num), desc="images", unit="image", disable=None):
        synthetic_image(rng).save(out / "images" / f"{i:04d}.png")
    print(f"wrote {args.num} images to {out / 'images'} and a random tiny VAE to {out / 'vae'}")
    return out


@one_line_errors()  # Ctrl-C, SIGTERM: "interrupted", exit 130 / 143, not a traceback from inside PIL
def cli(argv: list[str] | None = None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(cli)
