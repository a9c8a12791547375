"""A folder of your own images, as pixels: the data of pixel-space training, and the reading that
stmd_fast.data.encode shares before its VAE.

    data = load_image_folder("~/textures", resolution=64)   # TensorData (N, C, 64, 64) uint8

Each image is resized (shorter side to R, bicubic) and center-cropped to R x R. A folder whose images
are all grayscale (R = G = B in every pixel, whatever mode the file is stored in) gives one channel,
anything else three (RGB; alpha is dropped). Files that are not readable images are skipped, counted
and named, and files that are not images by their suffix are counted; a folder with no image at all is
a DataError.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from ..checkpoint import is_run_config
from ..devices import physical_memory
from ..files import LOCK_FILE
from .datasets import DataError, TensorData, preset_files_hint

# What Pillow reads without plugins (.jfif/.jpe: JPEG as Windows and browsers name it; .avif where Pillow was
# built with it, else the file is skipped and named); a TIFF or GIF of several frames gives its first.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".avif", ".bmp", ".dib", ".tif",
                  ".tiff", ".gif", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".qoi", ".jp2", ".j2k"}
# PIL's errors for files that are not (whole) images: truncated (OSError), unknown format
# (UnidentifiedImageError, an OSError), broken PNG chunks (SyntaxError, ValueError), decompression bombs.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


RUN_FOLDER = "a training run's folder"


def is_run_folder(folder: Path) -> bool:
    """A training run's folder: its config.json, or, while a run starts, its lock beside its metrics.jsonl (a .lock
    alone is any tool's)."""
    return is_run_config(folder / "config.json") or ((folder / LOCK_FILE).exists()
                                                     and (folder / "metrics.jsonl").exists())


def walk_files(root: Path, left_out: list[tuple[str, str]] | None = None):
    """Every file under `root` as a path relative to it, hidden files and folders (.name) left out, following
    symlinked folders (a data set assembled from links to its parts: Path.rglob skips them before Python
    3.13) but none twice, so a link to a folder above it cannot loop. Left out too, and appended to `left_out`
    as (folder, why): a folder that cannot be listed (os.walk would pass over it without a word) and a run
    folder of stmd_fast's (its sample grids are not training images, wherever a link puts it)."""
    seen = set()

    def unlistable(error: OSError) -> None:
        if left_out is not None:
            left_out.append((error.filename or "?", error.strerror or str(error)))

    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unlistable):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        if is_run_folder(Path(folder)):
            subfolders[:] = []
            if left_out is not None:
                left_out.append((folder, RUN_FOLDER))
            continue
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # sorted: which link counts is fixed
        for name in files:
            if not name.startswith("."):
                yield (Path(folder) / name).relative_to(root)


def _is_file_or_broken_link(path: Path) -> bool:
    """A file, or a symlink to nothing (its target moved or unmounted, or a loop): listed so that reading it
    fails and it is skipped, counted and named like any unreadable image, not left out without a word.
    Folders and special files (a FIFO would block the reader) are not images."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def printable(path: str) -> str:
    """A path for messages: bytes of a file name that is not UTF-8 (held as surrogate escapes by os.walk)
    shown as \\xNN, so that printing it cannot raise UnicodeEncodeError."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def once_each(root: Path, paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """`paths` (sorted) with every later path to an already listed file (same device and inode: a symlink or a hard
    link) left out, and the pairs (kept, left out). A broken link is kept: reading it fails and names it."""
    kept, duplicates, first = [], [], {}
    for path in paths:
        try:
            info = os.stat(root / path)
        except OSError:
            kept.append(path)
            continue
        key = (info.st_dev, info.st_ino)
        if info.st_ino == 0:  # a file system without inode numbers (some FUSE or network mounts): no way to tell
            kept.append(path)
        elif key in first:
            duplicates.append((first[key], path))
        else:
            first[key] = path
            kept.append(path)
    return kept, duplicates


def list_images(folder: str | Path, limit: int | None = None) -> list[str]:
    """Relative paths (posix) of the image files under `folder`, sorted so that runs are reproducible.
    Hidden files and folders (.name: editor backups, .ipynb_checkpoints, .Trash) are not images of the set."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"--images {folder}: not a folder; pass the folder that holds your images")
    passed_over: list[tuple[str, str]] = []
    files = [p for p in walk_files(root, passed_over) if _is_file_or_broken_link(root / p)]
    if passed_over and os.path.abspath(passed_over[0][0]) == os.path.abspath(root):
        name, why = printable(str(folder)), passed_over[0][1]
        raise DataError(f"--images {name}: {why}, whose sample grids are not training images; pass the folder "
                        f"that holds your images" if why == RUN_FOLDER else
                        f"--images {name}: cannot list it ({why}); make it readable (ls {name} works when it is)")
    if passed_over:  # said, never a part of the set gone without a word
        where, why = passed_over[0]
        print(f"note: left out {len(passed_over)} folder(s) under {printable(str(folder))}, e.g. {printable(where)} "
              f"({why})", file=sys.stderr)
    paths, duplicates = once_each(root, sorted(p.as_posix() for p in files if p.suffix.lower() in IMAGE_SUFFIXES))
    if duplicates:  # links (or hard links) assembling a set can name one file twice: it would weigh double
        first, again = duplicates[0]
        print(f"note: {len(duplicates)} image path(s) under {printable(str(folder))} name a file listed already "
              f"(a link or hard link: {printable(again)} is {printable(first)}); each file is read once",
              file=sys.stderr)
    others = Counter(p.suffix.lower() or "(no suffix)" for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
    left_out = ""
    if others:  # captions and metadata beside the images are expected; say so, in case one was an image
        kinds = ", ".join(f"{suffix} x{n}" for suffix, n in others.most_common(5))
        left_out = (f"{sum(others.values())} file(s) under {printable(str(folder))} that are not images by their "
                    f"suffix ({kinds}{', ...' if len(others) > 5 else ''})")
    if not paths:
        raise DataError(f"no images under {folder}{f' (only {left_out})' if left_out else ''}; pass the folder that "
                        f"holds them (searched recursively, hidden files and folders left out, for "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}, any case){preset_files_hint(root)}")
    if left_out:
        print(f"note: left out {left_out}", file=sys.stderr)
    return paths[:limit] if limit is not None else paths


def upright_8bit(image: Image.Image) -> Image.Image:
    """The image as every reader here takes it: upright by its EXIF Orientation (a camera stores a portrait
    photo as landscape pixels plus that tag), in 8 bits (to_8bit)."""
    return to_8bit(ImageOps.exif_transpose(image))


def to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit grayscale ('I;16*', 'I') and float ('F') images as 8-bit 'L': Pillow's convert() clips
    them to 0..255, which turns a 16-bit scan all but white. Integer modes are read as 16-bit (0..65535),
    floats as 0..1. Pixels outside that range (or NaN) raise ValueError naming the range, not clipped or
    rescaled by a guess: no one rule for such files is right (0..255 floats, HDR, signed data), so the
    file is skipped and named and its owner converts it."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" else 65535.0
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= top):
        kind = "float" if image.mode == "F" else "integer"
        finite = values[np.isfinite(values)]  # (nanmin of all NaN warns, before the line that names the file)
        span = (f"in [{finite.min():.4g}, {finite.max():.4g}]{' with NaN or inf' if finite.size < values.size else ''}"
                if finite.size else "all NaN or inf")
        raise ValueError(f"{kind} pixels {span}, outside the "
                         f"0..{top:g} read as black..white: save it as 8- or 16-bit, or as float in 0..1")
    return Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8))  # 2-D uint8: mode L


def resize_center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image -> (3, R, R) uint8 RGB: shorter side resized to R (bicubic), then the center crop.

    Pillow's resize filters over the whole footprint when downscaling, so one bicubic resize is
    already antialiased (no need for the repeated box halving of older pipelines).
    """
    image = upright_8bit(image).convert("RGB")  # grayscale, palette, RGBA (alpha dropped)
    scale = resolution / min(image.size)
    size = [max(resolution, round(side * scale)) for side in image.size]
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    # The crop of the whole image resized to `size`, computed for the crop alone (the same sample points;
    # Pillow's fixed-point filter weights differ with the box, so pixels anywhere can differ from a resize
    # then crop by a level or two of 255, a few on dithered images): a 2 x 40000 strip would otherwise be
    # resized to 64 x 1280000 for one 64 x 64 crop. Training, encode and --reference all use this one.
    sx, sy = image.size[0] / size[0], image.size[1] / size[1]
    box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
    image = image.resize((resolution, resolution), Image.BICUBIC, box=box)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def read_image(path: Path, resolution: int) -> tuple[torch.Tensor | None, str | None, bool, bool]:
    """(the (3, R, R) uint8 image, None, whether it is grayscale, whether it was enlarged: its shorter side
    under R), or (None, why, False, False) for a file that cannot be read as an image. Grayscale is read
    from the pixels (R = G = B), not the file's mode: a GIF or palette PNG of grays, a 16-bit gray+alpha
    PNG (which Pillow opens as RGBA) are grayscale."""
    try:
        with Image.open(path) as image:
            pixels = resize_center_crop(image, resolution)
            gray = bool((pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all())
            return pixels, None, gray, min(image.size) < resolution
    except Image.DecompressionBombError as error:
        return None, (f"{type(error).__name__}: {error} (Pillow's guard against decompression bombs): downscale "
                      "the file, e.g. to 8192 pixels on its longer side"), False, False
    except UNREADABLE as error:
        return None, f"{type(error).__name__}: {error}", False, False


def check_fits_in_memory(count: int, resolution: int, workers: int) -> None:
    """DataError before any image is read if `count` RGB images at `resolution` (kept as uint8), plus each
    reader's image being resized, would take more than half of this machine's memory: past that the kernel
    kills the process without a word (and, on a shared machine, maybe others')."""
    total = physical_memory()
    if total is None:  # nothing to check against
        return
    need = (count + 2 * workers) * 3 * resolution ** 2
    if need > total / 2:
        raise DataError(f"{count} images at {resolution}x{resolution} pixels take {need / 1e9:.3g} GB in memory, more "
                        f"than half of this machine's {total / 1e9:.3g} GB: lower --resolution, or encode them to "
                        "latents with python -m stmd_fast.data.encode")


def enlarged_note(enlarged: int, total: int, resolution: int, size_from: str = "--resolution") -> str:
    """The note for images smaller than the size they are read at; size_from: what set that size (a flag the
    user can lower, or e.g. "the checkpoints' image size", which they cannot)."""
    fix = "; a lower --resolution keeps their own detail" if size_from.startswith("--") else ""
    return (f"note: {enlarged} of the {total} images are smaller than {size_from} {resolution} (shorter side) and "
            f"were enlarged to it{fix}")


def load_image_folder(folder: str | Path, resolution: int, workers: int | None = None,
                      size_from: str = "--resolution") -> TensorData:
    """Every image under `folder` (recursively) as (N, C, R, R) uint8 pixels; C = 1 if all are grayscale."""
    if resolution < 1:
        raise DataError(f"--resolution {resolution}: must be at least 1")
    root = Path(folder).expanduser()
    paths = list_images(root)
    workers = workers or min(8, os.cpu_count() or 1)
    check_fits_in_memory(len(paths), resolution, workers)
    if not sys.stderr.isatty():  # no progress bar in a log: say what the wait is for
        print(f"reading {len(paths)} images under {printable(str(folder))} at {resolution}x{resolution}",
              file=sys.stderr, flush=True)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL
        loaded = list(tqdm(pool.map(lambda p: read_image(root / p, resolution), paths), total=len(paths),
                           desc=f"read {root.name or root}", unit="img", disable=None, leave=False))
    images = [image for image, *_ in loaded if image is not None]
    skipped = [(printable(p), printable(why)) for p, (_, why, *_) in zip(paths, loaded) if why is not None]
    if not images:
        raise DataError(f"none of the {len(paths)} images under {folder} could be read (first: {skipped[0][0]}: "
                        f"{skipped[0][1]}); check the files")
    if skipped:
        shown = "".join(f"\n  {path}: {why}" for path, why in skipped[:20])
        more = f"\n  and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        print(f"note: skipped {len(skipped)} unreadable image(s) under {folder}:{shown}{more}", file=sys.stderr)
    enlarged = sum(small for *_, small in loaded)
    if enlarged:  # upscaled pixels add no detail: the network learns the blur
        print(enlarged_note(enlarged, len(images), resolution, size_from), file=sys.stderr)
    values = torch.stack(images)
    grays = [gray for image, _, gray, _ in loaded if image is not None]
    if all(grays):
        values = values[:, :1].contiguous()  # R = G = B: keep one channel
    elif sum(grays) > len(grays) / 2:  # a mostly gray set made RGB by its colour images: name one, a stray?
        first = next(printable(p) for p, (image, _, gray, _) in zip(paths, loaded) if image is not None and not gray)
        print(f"note: {len(grays) - sum(grays)} of the {len(grays)} images are in colour (first: {first}), so all "
              "are read as RGB; the others are grayscale", file=sys.stderr)
    return TensorData(root.name or str(root), values, "image")
