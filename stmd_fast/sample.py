"""python -m stmd_fast.sample CKPT: draw samples (or inpaint) with a trained checkpoint.

Images go to a PNG grid (or .npy with --out *.npy, values in [-1, 1]); vectors to .npy.

python -m stmd_fast.sample --exported sampler.pt2 runs a sampler written by python -m
stmd_fast.export instead (N, M and the grid are baked into it), or its AOTInductor package
(sampler.aoti.pt2, told apart by its contents). The noise is drawn on the CPU from --seed
exactly as the eager sampler draws it, --batch-size samples at a time, so the samples equal
those of the checkpoint on the CPU with the same --seed and --batch-size (up to float rounding);
the program runs on them its static batch at a time (the last batch padded). This path does
not load the training code (models, checkpoint, train). A latent model's program returns
latents: they go to .npy as they are, or to a .png decoded through --vae.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .cli import one_line_errors
from .methods import METHODS
from .sampling import check_steps, nfe
from .schedule import TIME_GRIDS



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stmd_fast.sample", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("checkpoint", metavar="CKPT", nargs="?",
        help="a run directory (its newest checkpoint) or a checkpoints/step_* directory (or give --exported)")
    add("--exported", metavar="PT2", help="run a sampler written by python -m stmd_fast.export (a .pt2 program, or "
        "its .aoti.pt2 AOTInductor package) instead of a checkpoint; it fixes N, M and the grid")
    add("--steps", type=int, help="N diffusion steps [default: 1 for stmd/meanflow, 100 for ddpm]")
    add("--flow-steps", type=int, help="M flow steps per diffusion step (stmd, meanflow) [default: 1]")
    add("--num", type=int, default=64, help="number of samples (completions with --inpaint) [default: 64]")
    add("--batch-size", type=int, default=256, help="samples per network batch; with --exported, samples per noise "
        "draw (the program runs its own static batch) [default: 256]")
    add("--seed", type=int, default=0, help="[default: 0]")
    add("--grid", choices=TIME_GRIDS, help="diffusion time grid [default: uniform]")
    add("--weights", choices=("ema", "model"), help="[default: ema]")
    add("--ema", type=float, metavar="DECAY", help="which EMA, by its decay: a run keeps --ema-decay and each of "
        "--ema-decays [default: --ema-decay's]")
    add("--vae", help="with --exported of a latent model and a .png --out: the VAE (folder or hub id) that decodes "
        "the latents [default: none; the program's metadata names the one it was trained with]")
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


def prepare_out(out: Path) -> None:
    if out.suffix not in (".png", ".npy"):
        raise ValueError(f"--out must end in .png or .npy, got {out.name}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write --out {out}: {err.strerror or err}: choose a writable path") from None


def write_samples(x: torch.Tensor, out: Path, zoom: int = 1, observed=None, mask=None) -> None:
    """.npy as it is, or a PNG grid of images in [-1, 1] (first tile: the observation with --inpaint)."""
    x = x.float().cpu()
    if out.suffix == ".npy":
        np.save(out, x.numpy())
        return
    from torchvision.utils import save_image

    from .data.datasets import to_unit_range

    if observed is not None:  # first tile: the observation, unobserved pixels grey
        x = torch.cat([(observed * mask)[None], x])
    x = torch.nn.functional.interpolate(x, scale_factor=zoom, mode="nearest") if zoom > 1 else x
    save_image(to_unit_range(x), out, nrow=int(np.ceil(np.sqrt(len(x)))), padding=1)


def main_exported(args) -> int:
    """sample --exported: no checkpoint, no training code (models, checkpoint, train are not imported)."""
    from .export import open_exported, sample_exported

    if args.checkpoint is not None:
        raise ValueError("give a checkpoint or --exported, not both")
    baked = [flag for flag, value in (("--steps", args.steps), ("--flow-steps", args.flow_steps),
                                      ("--grid", args.grid), ("--weights", args.weights), ("--ema", args.ema),
                                      ("--inpaint", args.inpaint), ("--mask", args.mask)) if value is not None]
    if baked:
        raise ValueError(f"{', '.join(baked)} cannot be used with --exported: N, M, the grid and the EMA weights "
                         f"are baked into the program (re-export to change them; inpainting needs the checkpoint)")
    if args.num < 1 or args.batch_size < 1 or args.zoom < 1:
        raise ValueError("--num, --batch-size and --zoom must be at least 1")
    run, meta = open_exported(args.exported)
    kind, device = meta["data_kind"], torch.device(meta["device"])
    try:
        wanted = device if args.device == "auto" else torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device: use auto, cpu or cuda") from None
    if wanted.type != device.type:
        raise ValueError(f"{args.exported} was exported for {device}, not {args.device}: re-export with "
                         f"--device {args.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{args.exported} was exported for {device}, and CUDA is not available here: "
                         f"re-export with --device cpu")
    decoded = kind == "latent" and args.vae is not None
    out = Path(args.out or ("samples.png" if kind == "image" or decoded else "samples.npy"))
    if kind != "latent" and args.vae is not None:
        raise ValueError(f"--vae decodes latents; this program makes {kind}s")
    if kind == "vector" and out.suffix != ".npy":
        raise ValueError(f"this program makes vectors: use --out with .npy, not {out.name}")
    if kind == "latent" and out.suffix == ".png" and args.vae is None:
        raise ValueError(f"this program returns latents (no VAE inside): write them with --out *.npy, or decode "
                         f"them with --vae (its metadata names {meta.get('latent', {}).get('vae')})")
    if decoded and out.suffix != ".png":
        raise ValueError("--vae decodes the latents into a .png grid; a .npy --out keeps the latents: drop --vae")
    prepare_out(out)
    decode = None
    if decoded:
        from .data.vae import latent_decoder

        latent = meta["latent"]
        decode = latent_decoder(args.vae, device, latent["scaling_factor"], latent["shift_factor"])

    x = sample_exported(run, meta, args.num, torch.Generator().manual_seed(args.seed), args.batch_size)
    if decode is not None:
        x = decode(x.to(device), args.batch_size)
    write_samples(x, out, args.zoom)
    print(f"{len(x)} samples (exported {meta['method']}, N={meta['steps']}, M={meta['flow_steps']}, NFE {meta['nfe']}, "
          f"batch {meta['batch']}{', decoded' if decode is not None else ''}) -> {out}")
    return 0


@one_line_errors(ValueError, FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.exported is not None:
        return main_exported(args)
    from .checkpoint import load_checkpoint  # imported here: --exported runs without the training code
    from .devices import resolve_device

    args.flow_steps = 1 if args.flow_steps is None else args.flow_steps
    args.grid, args.weights = args.grid or "uniform", args.weights or "ema"
    if args.checkpoint is None:
        raise ValueError("give a checkpoint (CKPT) or --exported PT2")
    if args.vae is not None:
        raise ValueError("--vae goes with --exported; a checkpoint decodes with the VAE it was trained with")
    model = load_checkpoint(args.checkpoint, device=resolve_device(args.device), weights=args.weights,
                            ema=args.ema)
    steps = args.steps if args.steps is not None else METHODS[model.method].default_steps
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
    prepare_out(out)
    if model.data_kind == "latent" and out.suffix == ".png":
        model.load_vae()  # before sampling: an unreachable VAE fails now, not after the work
    observed = mask = None
    if args.inpaint:
        observed = read_array(args.inpaint, model.data_shape, "--inpaint image")
        mask = read_array(args.mask, model.data_shape, "--mask", as_mask=True)

    generator = torch.Generator(model.device).manual_seed(args.seed)
    if observed is None:
        x = model.sample(args.num, steps, args.flow_steps, generator, args.grid, batch_size=args.batch_size)
    else:
        x = model.inpaint(observed, mask, args.num, steps, args.flow_steps, generator, args.grid, args.batch_size)
    if model.data_kind == "latent" and out.suffix == ".png":
        x = model.decode(x, args.batch_size)  # .npy keeps the latents themselves
    write_samples(x, out, args.zoom, observed, mask)
    print(f"{len(x)} {'completions' if observed is not None else 'samples'} ({model.method}, N={steps}, "
          f"M={args.flow_steps}, NFE {nfe(model.method, steps, args.flow_steps)}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
