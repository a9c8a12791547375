"""python -m stmd_fast.sample CKPT: draw samples (or inpaint) with a trained checkpoint.

Images go to a PNG grid (or .npy with --out *.npy, values in [-1, 1]); vectors to .npy.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import resolve_device
from .sampling import check_steps, nfe
from .schedule import TIME_GRIDS

DEFAULT_STEPS = {"stmd": 1, "meanflow": 1, "ddpm": 100}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stmd_fast.sample", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("checkpoint", metavar="CKPT", help="a run directory (its newest checkpoint) or a checkpoints/step_* directory")
    add("--steps", type=int, help="N diffusion steps [default: 1 for stmd/meanflow, 100 for ddpm]")
    add("--flow-steps", type=int, default=1, help="M flow steps per diffusion step (stmd, meanflow) [default: 1]")
    add("--num", type=int, default=64, help="number of samples (completions with --inpaint) [default: 64]")
    add("--batch-size", type=int, default=256, help="samples per network batch [default: 256]")
    add("--seed", type=int, default=0, help="[default: 0]")
    add("--grid", choices=TIME_GRIDS, default="uniform", help="diffusion time grid [default: uniform]")
    add("--weights", choices=("ema", "model"), default="ema", help="[default: ema]")
    add("--zoom", type=int, default=1, help="enlarge PNG pixels K times (nearest) to view small images [default: 1]")
    add("--device", default="auto", help="auto | cpu | cuda [default: auto]")
    add("--out", help="output file, .png (image grid) or .npy [default: samples.png, or samples.npy for vectors]")
    add("--inpaint", metavar="IMAGE", help="observed image (.png, or .npy in model space [-1, 1]) to complete")
    add("--mask", metavar="MASK", help="with --inpaint: .png or .npy, nonzero/white = observed pixel")
    return p


def read_array(path: str, shape: tuple[int, ...], what: str, as_mask: bool = False) -> torch.Tensor:
    """An image (C, H, W) from .png/.jpg (mapped to [-1, 1], or {0, 1} for a mask) or .npy (as given)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{what} {path} does not exist")
    c, h, w = shape
    if file.suffix == ".npy":
        x = torch.from_numpy(np.load(file, allow_pickle=False)).float()
        x = x.reshape(x.shape[-3:] if x.ndim > 3 and math.prod(x.shape[:-3]) == 1 else x.shape)  # (1, C, H, W)
        x = x[None] if x.ndim == 2 else x
        if as_mask:
            x = (x != 0).float()
    else:
        from PIL import Image  # torchvision's decode_image is deprecated since 0.29

        with Image.open(file) as image:
            pixels = np.asarray(image.convert("L" if (c == 1 or as_mask) else "RGB"))
        x = torch.from_numpy(pixels.copy()).float().reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)
        x = (x > 127).float() if as_mask else x / 127.5 - 1
    if x.ndim != 3 or tuple(x.shape[-2:]) != (h, w) or x.shape[0] not in (1, c):
        raise ValueError(f"{what} {path} has shape {tuple(x.shape)}, the model makes {shape} images: "
                         f"resize it to {h}x{w} first")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} {path} contains NaN or inf")
    return x.expand(c, h, w).clone()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint, device=resolve_device(args.device), weights=args.weights)
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[model.method]
        check_steps(model.method, steps, args.flow_steps)
        if args.num < 1 or args.batch_size < 1 or args.zoom < 1:
            raise ValueError("--num, --batch-size and --zoom must be at least 1")
        if (args.inpaint is None) != (args.mask is None):
            raise ValueError("--inpaint and --mask go together: give both")
        vectors = model.data_kind == "vector"
        if args.inpaint and model.data_kind != "image":
            raise ValueError(f"--inpaint needs a pixel-space image model; this checkpoint makes {model.data_kind}s "
                             f"(a pixel mask does not carry over to latents)")
        out = Path(args.out or ("samples.npy" if vectors else "samples.png"))
        if vectors and out.suffix != ".npy":
            raise ValueError(f"this checkpoint makes vectors: use --out with .npy, not {out.name}")
        if out.suffix not in (".png", ".npy"):
            raise ValueError(f"--out must end in .png or .npy, got {out.name}")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot write --out {out}: {err.strerror or err}: choose a writable path") from None
        observed = mask = None
        if args.inpaint:
            observed = read_array(args.inpaint, model.data_shape, "--inpaint image")
            mask = read_array(args.mask, model.data_shape, "--mask", as_mask=True)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    generator = torch.Generator(model.device).manual_seed(args.seed)
    if observed is None:
        x = model.sample(args.num, steps, args.flow_steps, generator, args.grid, batch_size=args.batch_size)
    else:
        x = model.inpaint(observed, mask, args.num, steps, args.flow_steps, generator, args.grid, args.batch_size)
    if model.data_kind == "latent" and out.suffix == ".png":
        x = model.decode(x, args.batch_size)  # .npy keeps the latents themselves
    x = x.float().cpu()
    if out.suffix == ".npy":
        np.save(out, x.numpy())
    else:
        from torchvision.utils import save_image

        from .data.datasets import to_unit_range

        if observed is not None:  # first tile: the observation, unobserved pixels grey
            x = torch.cat([(observed * mask)[None], x])
        x = torch.nn.functional.interpolate(x, scale_factor=args.zoom, mode="nearest") if args.zoom > 1 else x
        save_image(to_unit_range(x), out, nrow=int(np.ceil(np.sqrt(len(x)))), padding=1)
    print(f"{len(x)} {'completions' if observed is not None else 'samples'} ({model.method}, N={steps}, "
          f"M={args.flow_steps}, NFE {nfe(model.method, steps, args.flow_steps)}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
