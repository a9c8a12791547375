"""python -m stmd_fast.sample CKPT: draw samples (or inpaint) with a trained checkpoint.

Images go to a PNG grid (or .npy with --out *.npy: float32 in model space, about [-1, 1], not clamped);
vectors to .npy.

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

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import io
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .cli import Parser, one_line_errors
from .data.datasets import what_file_instead_of_npy
from .devices import OutOfMemory, fits_in_memory, resolve_device
from .export import check_out_path
from .files import WriteFailed, check_writable, write_atomic, write_fix
from .methods import METHODS
from .operators import CONDITIONED_STEPS, OPERATOR_NAMES, check_conditions, check_sigma_y, make_operator
from .sampling import check_steps, nfe
from .schedule import TIME_GRIDS



def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m stmd_fast.sample", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("checkpoint", metavar="CKPT", nargs="?",
        help="a run directory (its newest checkpoint) or a checkpoints/step_* directory (or give --exported)")
    add("--exported", metavar="PT2", help="run a sampler written by python -m stmd_fast.export (a .pt2 program, or "
        "its .aoti.pt2 AOTInductor package) instead of a checkpoint; it fixes N, M and the grid")
    add("--steps", type=int, help=f"N diffusion steps [default: 1 for stmd/meanflow, 100 for ddpm; "
                                  f"{CONDITIONED_STEPS} for stmd with --inpaint or --inverse without --particles]")
    add("--flow-steps", type=int, help="M flow steps per diffusion step (stmd, meanflow) [default: 1]")
    add("--num", type=int, default=64, help="number of samples (completions with --inpaint) [default: 64]")
    add("--batch-size", type=int, default=256, help="samples per network batch; with --exported, samples per noise "
        "draw (the program runs its own static batch). The noise is drawn batch by batch, so the samples of one "
        "--seed depend on it too [default: 256]")
    add("--seed", type=int, default=0, help="seeds the noise (and SMC's resampling): the same seed, the same "
        "samples at the same --batch-size [default: 0]")
    add("--grid", choices=TIME_GRIDS, help="diffusion time grid [default: the run's --sample-grid]")
    add("--weights", choices=("ema", "model"), help="the EMA weights (what samples use) or the raw trained ones "
        "[default: ema]")
    add("--ema", type=float, metavar="DECAY", help="which EMA, by its decay: a run keeps --ema-decay and each of "
        "--ema-decays [default: --ema-decay's]")
    add("--vae", help="a latent model's VAE (folder or hub id) for a .png --out: with --exported, the one that "
        "decodes (the program's metadata names the one it was trained with); with a checkpoint, the new place of "
        "the one it was trained with, if that moved [default: a checkpoint's own; none with --exported]")
    add("--zoom", type=int, help="enlarge a .png grid's pixels K times (nearest) to view small images [default: 1]")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N [default: auto]")
    add("--out", help="output file, .png (image grid) or .npy [default: samples.png, or samples.npy for vectors]")
    add("--inpaint", metavar="IMAGE", help="observed image (.png, or .npy in model space [-1, 1]) to complete")
    add("--mask", metavar="MASK", help="with --inpaint or --inverse inpaint: .png (white, or 1 in a 0/1 mask) or .npy "
        "(nonzero) = observed pixel")
    add("--inverse", choices=OPERATOR_NAMES, help="sample the posterior of a linear measurement y = A x + sigma_y n: "
        "sr4/sr2 (average pooling), gray (channel mean), inpaint (with --mask); give y with --observed")
    add("--observed", metavar="IMAGE", help="with --inverse: the measurement y at its own size (e.g. 2x2 for sr4 "
        "of 8x8, one channel for gray), used as given, or an image of the model's size, which is measured through "
        "A (plus sigma_y noise, seeded); inpaint's y has the image's size: see --measured")
    add("--measured", action="store_true", default=None, help="with --inverse: --observed is the measurement y itself "
        "(its noise included), used as given, also where it has the image's size (inpaint)")
    add("--sigma-y", type=float, help="with --inverse: measurement noise std in model units ([-1, 1] images); 0 = "
        "exact y (DDNM), > 0 DDNM+ or SMC [default: 0]")
    add("--particles", type=int, help="with --inverse: SMC posterior sampling with K particles per sample (needs "
        "--sigma-y > 0; each sample is one weighted draw from its own run of K) [default: DDNM(+)]")
    return p


def read_array(path: str, shape: tuple[int, ...], what: str, as_mask: bool = False) -> torch.Tensor:
    """An image (C, H, W) from .png/.jpg (mapped to [-1, 1], or {0, 1} for a mask) or .npy (as given)."""
    from PIL import Image  # torchvision's decode_image is deprecated since 0.29

    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{what} {path} is a directory: give an image file (.png/.jpg, or an .npy of shape {shape})")
    if not file.is_file():
        raise ValueError(f"{what} {path} does not exist")
    c, h, w = shape
    try:
        instead = what_file_instead_of_npy(file) if file.suffix == ".npy" else None  # numpy would say "pickled"
    except OSError:  # unreadable: said below
        instead = None
    if instead:
        what_it_is, fix = instead
        raise ValueError(f"{what} {path} is {what_it_is}: {fix or f'give a .png/.jpg, or an .npy of shape {shape}'}")
    try:
        if file.suffix == ".npy":
            x = torch.from_numpy(np.load(file, allow_pickle=False)).float()
            x = x.reshape(x.shape[-3:] if x.ndim > 3 and math.prod(x.shape[:-3]) == 1 else x.shape)  # (1, C, H, W)
            x = x[None] if x.ndim == 2 else x
            if as_mask and torch.isfinite(x).all():  # else refused below (NaN != 0 read as "observed")
                x = (x != 0).float()
        else:
            from .data.images import upright_8bit

            with Image.open(file) as image:
                pixels = np.asarray(upright_8bit(image).convert("L" if (c == 1 or as_mask) else "RGB"))
            x = torch.from_numpy(pixels.copy()).float().reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)
            # a mask drawn 0/255 (anti-aliased edges: > 127 is white) or saved as 0/1 (nonzero, as an .npy)
            x = (x > (127 if x.max() > 1 else 0)).float() if as_mask else x / 127.5 - 1
    # PIL: not an image / truncated (OSError, UnidentifiedImageError), broken chunks (SyntaxError), bombs;
    # numpy: not an .npy, pickled objects, a non-numeric dtype (ValueError, TypeError, EOFError)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"{what} {path} is not a readable image: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''} (give a .png/.jpg, or an .npy of "
                         f"shape {shape})") from None
    if x.ndim != 3 or tuple(x.shape[-2:]) != (h, w) or x.shape[0] not in (1, c):
        raise ValueError(f"{what} {path} has shape {tuple(x.shape)}, the model makes {shape} images: "
                         f"resize it to {h}x{w} first")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} {path} contains NaN or inf")
    if as_mask and not x.any():
        raise ValueError(f"{what} {path} marks no pixel as observed: white (a .png) or nonzero (an .npy) marks "
                         f"the pixels you know, black the ones to fill in")
    return x.expand(c, h, w).clone()


def one_channel(path: str) -> bool:
    """Whether an .npy or image file holds one channel, from its header (False if unreadable: read_array says
    why)."""
    from PIL import Image

    grayscale_modes = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}  # from the header alone

    try:
        if Path(path).suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return array.ndim == 2 or (array.ndim >= 3 and array.shape[-3] == 1)
        with Image.open(path) as image:
            return image.mode in grayscale_modes
    except (OSError, ValueError, SyntaxError):
        return False


def read_observation(path: str, operator, data_shape: tuple[int, ...], sigma_y: float,
                     generator: torch.Generator, measured: bool = False) -> torch.Tensor:
    """y for --inverse: the measurement itself at its own size (e.g. 2x2 for sr4 of 8x8 digits, one channel
    for gray), used as given, or an image of the model's size, measured through A (plus sigma_y noise).
    measured: the file is y, also where y has the image's size (inpaint). Where only the channels differ (gray),
    a one-channel file is y (read as an RGB image it got its noise twice) and a color one an image."""
    y_shape, data_shape = tuple(operator(torch.zeros(1, *data_shape)).shape[1:]), tuple(data_shape)
    if measured and y_shape[0] == 1 < data_shape[0] and not one_channel(path):  # gray's y, given in color
        x = read_array(path, (data_shape[0], *y_shape[1:]), "--observed measurement")
        if not (x == x[:1]).all():  # PIL's "L" would weigh the channels by luma, not average them as A does
            raise ValueError(f"--observed {path} (--measured) is a color image; the {operator.name} measurement is "
                             f"one channel (the channels' mean): give it as a one-channel file, or drop --measured "
                             f"to measure this image")
        return x[:1].clone()
    if measured:
        tries = [(y_shape, "measurement")]
    elif y_shape == data_shape:
        tries = [(data_shape, "image")]
    elif y_shape[1:] == data_shape[1:]:
        tries = [(y_shape, "measurement") if one_channel(path) else (data_shape, "image")]
    else:  # the size tells them apart
        tries = [(y_shape, "measurement"), (data_shape, "image")]
    for shape, what in tries:
        try:
            x = read_array(path, shape, f"--observed {what}")
        except ValueError as err:
            if "has shape" not in str(err):
                raise
            continue
        return operator.measure(x[None].double(), sigma_y, generator)[0].float() if what == "image" else x
    if measured:
        raise ValueError(f"--observed {path} (--measured) must be the {operator.name} measurement of shape {y_shape}")
    raise ValueError(f"--observed {path} must be an image of the model's shape {tuple(data_shape)} or the "
                     f"{operator.name} measurement {y_shape}")


def prepare_out(out: Path) -> None:
    """Checked before sampling: the suffix, and that the file can be written."""
    if out.suffix not in (".png", ".npy"):
        raise ValueError(f"--out must end in .png or .npy, got {out.name}")
    check_out_path(out, "--out")
    check_writable(out, "--out")


MAX_ZOOM = 64


def check_counts(args) -> None:
    """--num, --batch-size and --zoom are counts: ValueError naming the first one below 1, or a --zoom
    beyond MAX_ZOOM (its grid would fill the memory)."""
    for flag in ("num", "batch_size", "zoom"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.zoom is not None and args.zoom > MAX_ZOOM:
        raise ValueError(f"--zoom {args.zoom}: at most {MAX_ZOOM} (8x8 digits become {8 * MAX_ZOOM} pixels); the grid "
                         f"grows with its square")


def check_output_memory(num: int, shape, out: Path, zoom: int = 1, latent: dict | None = None) -> None:
    """ValueError before sampling when --num samples, kept whole for --out as float32 (decoded to images of the
    latent's resolution with a VAE, enlarged zoom times in a .png grid), would take more than half of this
    machine's memory: such a --num otherwise ran for as long as memory lasted."""
    from .devices import physical_memory

    if latent is not None and latent.get("resolution") and out.suffix == ".png":  # decoded: RGB at that resolution
        shape = (3, latent["resolution"], latent["resolution"])
    scale = zoom ** 2 if out.suffix == ".png" else 1
    total, need = physical_memory(), num * math.prod(shape) * 4 * scale
    if total is not None and need > total / 2:
        raise ValueError(f"--num {num}: {num} samples of shape {tuple(shape)} are {need / 1e9:.3g} GB as float32, kept "
                         f"whole for --out: more than half of this machine's {total / 1e9:.3g} GB; lower --num (and "
                         f"draw several files, each with its own --seed)")


def check_zoom(args, out: Path) -> None:
    """--zoom enlarges a .png grid: refused for a .npy, which keeps the samples as drawn; default 1."""
    if args.zoom is not None and out.suffix != ".png":
        raise ValueError(f"--zoom enlarges the pixels of a .png grid; {out.name} keeps the samples as drawn: drop --zoom")
    args.zoom = args.zoom or 1


def in_batches(num: int, size: int, draw, unit: str = "sample") -> torch.Tensor:
    """draw(n) for n = size, size, ..., the rest (num in all), concatenated: what the samplers' own
    batching does with one generator, so the samples are the same, but with a progress bar on stderr,
    as a large --num takes minutes (shown on a terminal only: tqdm's disable=None)."""
    from tqdm import tqdm

    parts = []
    with tqdm(total=num, unit=unit, desc="sampling", disable=None) as bar:
        for start in range(0, num, size):
            parts.append(draw(min(size, num - start)))
            bar.update(len(parts[-1]))
    return torch.cat(parts)


def write_samples(x: torch.Tensor, out: Path, zoom: int = 1, observed=None, mask=None) -> None:
    """.npy as it is, or a PNG grid of images in [-1, 1] (first tile: the observation with --inpaint);
    rendered in memory and written atomically (a full disk leaves no partial file: WriteFailed)."""
    x = x.float().cpu()
    buffer = io.BytesIO()
    if out.suffix == ".npy":
        np.save(buffer, x.numpy())
    else:
        from torchvision.utils import save_image

        from .data.datasets import viewable

        if observed is not None:  # first tile: the observation, unobserved pixels grey
            x = torch.cat([(observed * mask)[None], x])
        x = torch.nn.functional.interpolate(x, scale_factor=zoom, mode="nearest") if zoom > 1 else x
        save_image(viewable(x), buffer, format="png", nrow=int(np.ceil(np.sqrt(len(x)))), padding=1)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # check_writable made and removed it: made once there is output
        write_atomic(out, buffer.getvalue())
    except OSError as err:
        raise WriteFailed(f"could not write --out {out}: {err.strerror or err}: nothing was written; "
                          f"{write_fix(err, 'choose another --out')}") from None


def main_exported(args) -> int:
    """sample --exported: no checkpoint, no training code (models, checkpoint, train are not imported)."""
    from .export import open_exported, sample_exported

    if args.checkpoint is not None:
        raise ValueError("give a checkpoint or --exported, not both")
    baked = [flag for flag, value in (("--steps", args.steps), ("--flow-steps", args.flow_steps),
                                      ("--grid", args.grid), ("--weights", args.weights), ("--ema", args.ema),
                                      ("--inpaint", args.inpaint), ("--mask", args.mask), ("--inverse", args.inverse),
                                      ("--observed", args.observed), ("--sigma-y", args.sigma_y),
                                      ("--particles", args.particles), ("--measured", args.measured))
             if value is not None]
    if baked:
        raise ValueError(f"{', '.join(baked)} cannot be used with --exported: N, M, the grid and the EMA weights "
                         f"are baked into the program (re-export to change them; inpainting and inverse problems "
                         f"need the checkpoint)")
    check_counts(args)
    run, meta = open_exported(args.exported)
    kind, device = meta["data_kind"], torch.device(meta["device"])
    try:
        wanted = device if args.device == "auto" else torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if wanted.type != "cuda":  # cpu:1 (torch takes it) and other kinds refused, as for a checkpoint
        resolve_device(args.device)
    if wanted.type == "cuda" != device.type and not torch.cuda.is_available():  # re-exporting for it cannot help
        raise ValueError(f"--device {args.device}: CUDA is not available here; {args.exported} was exported for "
                         f"{device}: drop --device")
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
    check_zoom(args, out)
    check_output_memory(args.num, meta["output"]["shape"][1:], out, args.zoom, meta.get("latent") if decoded else None)
    prepare_out(out)
    decode = None
    if decoded:
        from .data.vae import expected_latents, latent_decoder

        latent = meta["latent"]
        decode = latent_decoder(args.vae, device, latent["scaling_factor"], latent["shift_factor"],
                                fits=expected_latents(meta["output"]["shape"][1:], latent))

    generator = torch.Generator().manual_seed(args.seed)
    with fits_in_memory(device, f"lower --batch-size {args.batch_size}, or --num {args.num}"):
        x = in_batches(args.num, args.batch_size, lambda n: sample_exported(run, meta, n, generator, n))
        if decode is not None:
            x = decode(x.to(device), args.batch_size)
        write_samples(x, out, args.zoom)
    print(f"{len(x)} samples (exported {meta['method']}, N={meta['steps']}, M={meta['flow_steps']}, NFE {meta['nfe']}, "
          f"batch {meta['batch']}{', decoded' if decode is not None else ''}) -> {out}")
    return 0


def check_inverse_flags(args) -> None:
    """--inpaint/--mask and --inverse with its flags: which go together, checked before the checkpoint loads;
    --sigma-y's default (0) with --inverse."""
    if args.inverse is None:
        extra = [f for f, v in (("--observed", args.observed), ("--sigma-y", args.sigma_y),
                                ("--particles", args.particles), ("--measured", args.measured)) if v is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} {'go' if len(extra) > 1 else 'goes'} with --inverse OPERATOR")
        if (args.inpaint is None) != (args.mask is None):
            raise ValueError("--inpaint and --mask go together: give both")
    else:
        args.sigma_y = args.sigma_y or 0.0
        if args.inpaint is not None:
            raise ValueError("--inpaint is noiseless inpainting; with --inverse give the image with --observed")
        if args.observed is None:
            raise ValueError(f"--inverse {args.inverse} needs the measurement: --observed IMAGE")
        if (args.inverse == "inpaint") != (args.mask is not None):
            raise ValueError("--mask goes with --inverse inpaint (and inpaint needs it)")
        check_sigma_y(args.sigma_y, "--sigma-y")
        if args.particles is not None and args.particles < 1:
            raise ValueError(f"--particles must be at least 1 (K particles per sample), got {args.particles}")
        if args.particles is not None and args.sigma_y == 0:
            raise ValueError("--particles K (SMC) weights by the likelihood of a noisy y: give --sigma-y > 0")


@one_line_errors(ValueError, FileNotFoundError, failures=(WriteFailed, OutOfMemory))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.exported is not None:
        return main_exported(args)
    from .checkpoint import load_checkpoint  # imported here: --exported runs without the training code

    args.flow_steps = 1 if args.flow_steps is None else args.flow_steps
    args.weights = args.weights or "ema"
    if args.checkpoint is None:
        raise ValueError("give a checkpoint (CKPT) or --exported PT2")
    check_counts(args)  # the flags, and a given --out, before the checkpoint loads (seconds for a large network)
    check_inverse_flags(args)
    if args.out is not None:
        check_zoom(args, Path(args.out))
        prepare_out(Path(args.out))
    with warnings.catch_warnings(record=True) as notes:  # a fallback to an older intact checkpoint
        warnings.simplefilter("always")
        model = load_checkpoint(args.checkpoint, device=resolve_device(args.device), weights=args.weights,
                                ema=args.ema)
    for note in notes:
        print(f"note: {note.message}", file=sys.stderr)
    conditioned = bool(args.inpaint or args.inverse) and args.particles is None  # an observation, no particles
    steps = model.default_steps(args.steps, conditioned)
    check_steps(model.method, steps, args.flow_steps)
    if args.grid is not None and not METHODS[model.method].diffusion:
        raise ValueError("--grid: Mean Flow samples from s = 1 straight to the data, on no diffusion grid: drop --grid")
    if conditioned:
        check_conditions(model.method, steps, "y" if args.inverse else "the --inpaint image",
                         smc="--inverse OP --particles K --sigma-y S")
    vectors = model.data_kind == "vector"
    if (args.inpaint or args.inverse) and model.data_kind != "image":
        raise ValueError(f"{'--inpaint' if args.inpaint else '--inverse'} needs a pixel-space image model; this "
                         f"checkpoint makes {model.data_kind}s"
                         f"{' (a pixel operator does not carry over to latents)' if model.data_kind == 'latent' else ''}")
    out = Path(args.out or ("samples.npy" if vectors else "samples.png"))
    if vectors and out.suffix != ".npy":
        raise ValueError(f"this checkpoint makes vectors: use --out with .npy, not {out.name}")
    if args.vae is not None and (model.data_kind != "latent" or out.suffix != ".png"):
        raise ValueError(f"--vae decodes latents into a .png grid; this checkpoint makes {model.data_kind}s"
                         if model.data_kind != "latent" else "--vae decodes the latents into a .png grid; a .npy "
                         "--out keeps the latents: drop --vae")
    if args.out is None:  # the default, by the kind of data
        check_zoom(args, out)
        prepare_out(out)
    check_output_memory(args.num, model.data_shape, out, args.zoom,
                        model.meta["latent"] if model.data_kind == "latent" else None)
    if model.data_kind == "latent" and out.suffix == ".png":
        model.load_vae(args.vae)  # before sampling: an unreachable VAE fails now, not after the work
    observed = mask = operator = y = None
    if args.inpaint or args.mask:
        mask = read_array(args.mask, model.data_shape, "--mask", as_mask=True)
    if args.inpaint:
        observed = read_array(args.inpaint, model.data_shape, "--inpaint image")
    if args.inverse:
        operator = make_operator(args.inverse, mask)
        operator.check(model.data_shape)
        y = read_observation(args.observed, operator, model.data_shape, args.sigma_y,  # y's noise: its own stream
                             torch.Generator().manual_seed(args.seed + 1), bool(args.measured))  # (as evaluate's)
        # first tile of a PNG: what A^+ makes of y (an inpainting mask's missing pixels 0 there: grey)
        observed, mask = operator.pinv(y[None])[0], (mask if mask is not None else torch.ones(model.data_shape))

    with fits_in_memory(model.device, f"lower --batch-size {args.batch_size}, or --num {args.num}"):
        x = draw(model, args, steps, observed, mask, operator, y)
        if model.data_kind == "latent" and out.suffix == ".png":
            x = model.decode(x, args.batch_size)  # .npy keeps the latents themselves
        write_samples(x, out, args.zoom, observed, mask)
    how = "" if operator is None else (f", {args.inverse} sigma_y={args.sigma_y}, " + (
        f"SMC K={args.particles}" if args.particles else ("DDNM+" if args.sigma_y > 0 else "DDNM")))
    what = "posterior samples" if operator is not None else "completions" if observed is not None else "samples"
    cost = nfe(model.method, steps, args.flow_steps)
    cost = f"{cost} per chain, {args.particles} chains each" if operator is not None and args.particles else cost
    print(f"{len(x)} {what} ({model.method}, N={steps}, M={args.flow_steps}, NFE {cost}{how}) -> {out}")
    return 0


def draw(model, args, steps: int, observed, mask, operator, y) -> torch.Tensor:
    """--num samples in batches of --batch-size: plain, inpainted, or posterior samples for --inverse."""
    generator = torch.Generator(model.device).manual_seed(args.seed)
    if operator is not None and args.particles:  # SMC: --batch-size counts chains, K of them per draw
        x = in_batches(args.num, max(1, args.batch_size // args.particles), lambda n: model.posterior_sample(
            y, operator, args.sigma_y, args.particles, steps, args.flow_steps, n, generator, args.grid,
            n * args.particles))
    elif operator is not None:
        x = in_batches(args.num, args.batch_size, lambda n: model.posterior_sample(
            y, operator, args.sigma_y, None, steps, args.flow_steps, n, generator, args.grid, n))
    elif observed is None:
        x = in_batches(args.num, args.batch_size, lambda n: model.sample(
            n, steps, args.flow_steps, generator, args.grid, batch_size=n))
    else:
        x = in_batches(args.num, args.batch_size, lambda n: model.inpaint(
            observed, mask, n, steps, args.flow_steps, generator, args.grid, n), unit="completion")
    return x


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
