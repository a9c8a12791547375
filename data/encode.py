"""Encode an image folder into WebDataset shards of VAE latent distributions (for latent training).

    python -m stmd_fast.data.encode --images DIR --vae stabilityai/sd-vae-ft-ema --resolution 256 --out SHARDS

Each image is resized (shorter side to R, bicubic) and center-cropped to R x R, mapped to [-1, 1]
and encoded with diffusers' AutoencoderKL. The distribution is stored, not one sample of it, so the
trainer draws a fresh latent every time it sees the image. Per sample, the shard holds:

    KEY.mean.npy, KEY.std.npy   float16 (C, R/f, R/f): the latent distribution (f: the VAE's downsampling)
    KEY.sha256.txt              SHA-256 of the two .npy files' bytes (mean's, then std's): the loader
                                checks it and skips a sample whose bytes changed (a damaged disk)
    KEY.src.txt                 the image's path relative to DIR (its bytes as the file system holds them)

KEY is the image's index in the sorted file list (9 digits); with --flip, KEY_flip holds the encoding
of the mirrored image, a sample of its own.

Images go to shards in a fixed pseudo-random order (the sorted list shuffled with seed 0): a folder
sorted by class would otherwise give shards, and so the loader's shuffle buffers, of one class each.
Shard k always holds images [k*n, (k+1)*n) of that order (n = --shard-size) and their flips. A shard
is written under a temporary name and renamed when complete, and manifest.json records it, so a rerun
after a crash skips the finished shards and redoes the rest (and any shard one of whose images changed
since: size or modification time, e.g. an unreadable file repaired). The manifest (count, latent shape, VAE,
scaling factor, resolution, shards, skipped images) is what LatentShards reads.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shlex
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..cli import Parser, one_line_errors
from ..files import RunLocked, WriteFailed, fsync_path, local_path, run_lock, temp_sibling, write_atomic, write_fix
from .datasets import DataError
from .images import UNREADABLE, enlarged_note, list_images, printable, resize_center_crop
from .vae import latent_shape, load_vae, vae_fingerprint  # noqa: F401 (load_vae: importable from here too)

FORMAT = "stmd_fast.latents/2"  # /2: a SHA-256 per sample
SETTINGS = ("format", "vae", "resolution", "flip", "shard_size", "source")  # a rerun must match these to reuse shards


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m stmd_fast.data.encode", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True,
                   help="folder of images (JPEG, PNG, WebP, AVIF, BMP, TIFF, GIF, TGA, PPM, QOI, JPEG 2000), searched "
                        "recursively; hidden files and folders left out")
    p.add_argument("--vae", required=True,
                   help="AutoencoderKL: a local folder saved with save_pretrained, or a hub id (e.g. stabilityai/sd-vae-ft-ema)")
    p.add_argument("--resolution", type=int, default=256, help="square image size before encoding [default: 256]")
    p.add_argument("--out", required=True, help="shard folder: shard-%%06d.tar and manifest.json")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call [default: 32]")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N [default: auto]")
    p.add_argument("--flip", action="store_true", help="also encode each image mirrored, as a separate sample")
    p.add_argument("--shard-size", type=int, default=1000, help="source images per shard [default: 1000]")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N images (sorted order)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding and resizing images (PIL releases the GIL) [default: the CPU count, at most 8]")
    return p


def shard_groups(sources: list[str], shard_size: int) -> list[list[str]]:
    """The source images of each shard: the sorted list in a fixed shuffled order, cut every shard_size."""
    order = list(sources)
    random.Random(0).shuffle(order)  # fixed seed: a rerun puts every image in the same shard
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image -> (3, R, R) float32 in [-1, 1]: resize_center_crop (shorter side to R, bicubic, center crop)."""
    return resize_center_crop(image, resolution).float() / 127.5 - 1


def check_batch_memory(batch_size: int, resolution: int) -> None:
    """DataError before the VAE loads if two batches of images (one encoded, the next read meanwhile: float32)
    would take more than half of this machine's memory; the kernel's out-of-memory killer ended the process
    without a word, or PIL raised MemoryError from inside its resize."""
    from stmd_fast.devices import physical_memory

    total, need = physical_memory(), 2 * batch_size * 3 * resolution ** 2 * 4
    if total is not None and need > total / 2:
        raise DataError(f"--resolution {resolution} with --batch-size {batch_size}: two batches of images take "
                        f"{need / 1e9:.3g} GB in memory, more than half of this machine's {total / 1e9:.3g} GB (the "
                        f"VAE's activations come on top): lower --batch-size or --resolution")


def load_image(path: Path, resolution: int) -> tuple[torch.Tensor | None, str | None, bool]:
    """(preprocessed image, None, whether it was enlarged: its shorter side under the resolution), or
    (None, why, False) for a file that cannot be read as an image."""
    try:
        with Image.open(path) as image:
            return preprocess(image, resolution), None, min(image.size) < resolution
    except UNREADABLE as error:
        return None, f"{type(error).__name__}: {error}", False


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, R, R) in [-1, 1] -> the latent distribution's mean and std, each (B, C, h, w) float16."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.half().cpu().numpy(), dist.std.half().cpu().numpy()


def loaded_batches(pool: ThreadPoolExecutor, root: Path, paths: list[str], batch_size: int, resolution: int):
    """Yields (paths, [load_image's (image or None, error or None, enlarged), ...]) per batch, reading the next
    batch meanwhile."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]

    def submit(batch):
        return [pool.submit(load_image, root / p, resolution) for p in batch]

    pending = submit(batches[0]) if batches else []
    for i, batch in enumerate(batches):
        current, pending = pending, (submit(batches[i + 1]) if i + 1 < len(batches) else [])
        yield batch, [future.result() for future in current]


def encode_shard(path: Path, sources: list[str], index: dict[str, int], vae, pool, root: Path, args, bar) -> dict:
    """Encode `sources` into `path` (keys from `index`: position in the sorted list); returns the shard's
    manifest entry."""
    # One TarWriter per shard instead of a run-long ShardWriter: each shard is written under a
    # temporary name and renamed only once complete, so a crash never leaves a half shard under the
    # final name, and shard k always holds the same images, so a rerun can skip finished shards.
    tmp = path.with_name(path.name + ".tmp")  # a rerun overwrites what a killed run left
    try:
        entry = _write_shard(tmp, sources, index, vae, pool, root, args, bar)
    except BaseException:  # a bad latent, a broken VAE, Ctrl-C: no half shard stays behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    # bytes and first_sha256: a rerun tells the shard written here from one copied over it or cut short since
    return {"name": path.name, "sources_sha1": digest(sources, root), "bytes": path.stat().st_size, **entry}


def _write_shard(tmp: Path, sources: list[str], index: dict[str, int], vae, pool, root: Path, args, bar) -> dict:
    samples, skipped, enlarged, first = 0, [], 0, None
    # in Python file I/O, so a full disk is an OSError (main says it in one line)
    with open(tmp, "wb") as stream, wds.TarWriter(stream) as sink:
        for batch, loaded in loaded_batches(pool, root, sources, args.batch_size, args.resolution):
            good = [(index[p], p, image) for p, (image, *_) in zip(batch, loaded) if image is not None]
            skipped += [{"path": printable(p), "error": printable(error)} for p, (_, error, _) in zip(batch, loaded)
                        if error is not None]
            enlarged += sum(small for *_, small in loaded)
            if good:
                images = torch.stack([image for _, _, image in good])
                views = [("", images)] + ([("_flip", images.flip(-1))] if args.flip else [])
                for suffix, x in views:
                    mean, std = encode(vae, x)
                    # fp16 saturates beyond 65504: an overflowed latent would poison training silently
                    finite = np.isfinite(mean).all(axis=(1, 2, 3)) & np.isfinite(std).all(axis=(1, 2, 3))
                    if not finite.all():
                        raise DataError(f"{good[int(np.argmin(finite))][1]}: the VAE returned non-finite latents (or "
                                        "beyond float16's range); check the VAE on this image, or move the image out")
                    for (number, p, _), m, s in zip(good, mean, std):
                        m, s = npy_bytes(m), npy_bytes(s)
                        checksum = sample_sha256(m, s)
                        sink.write({"__key__": f"{number:09d}{suffix}", "mean.npy": m, "std.npy": s,
                                    "sha256.txt": checksum, "src.txt": os.fsencode(p)})  # bytes: a name need not be UTF-8
                        samples += 1
                        first = first or checksum
            bar.update(len(batch))
    fsync_path(tmp)
    # first_sha256: the reader tells this shard from another of the same length copied over it, before its samples
    return {"images": len(sources) - len(skipped), "samples": samples, "skipped": skipped, "enlarged": enlarged,
            "first_sha256": first}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def sample_sha256(mean_npy: bytes, std_npy: bytes) -> str:
    """The per-sample checksum: SHA-256 of the mean's .npy bytes followed by the std's."""
    return hashlib.sha256(mean_npy + std_npy).hexdigest()


def shard_outline(path: Path) -> tuple[int, str | None, str | None] | None:
    """(samples, first key, first checksum sha256.txt) of a shard as the loader reads it, from the tar's member
    headers (the data is seeked over, but the first checksum); None if the tar does not read whole."""
    keys, first_sha = [], None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, kind = member.name.partition(".")  # keys hold no dot: f"{number:09d}{suffix}"
                if not keys or keys[-1] != key:
                    keys.append(key)
                if len(keys) == 1 and kind == "sha256.txt":
                    first_sha = tar.extractfile(member).read().decode(errors="replace")
    except (OSError, tarfile.TarError, EOFError):
        return None
    return len(keys), keys[0] if keys else None, first_sha


def still_as_written(size: int, outline: tuple | None, entry: dict, first_key: str | None) -> bool:
    """Whether a shard of `size` bytes and shard_outline `outline` is the one its manifest entry describes, as far as
    a rerun can tell from the tar's headers: its size, its sample count, its first sample's key (first_key: that of
    the group's first readable image) and checksum (an older manifest's entry lacks the size and checksum: those
    are not checked)."""
    if outline is None or outline[0] != entry["samples"] or entry.get("bytes", size) != size:
        return False
    return entry["samples"] == 0 or (outline[1] == first_key and outline[2] == entry.get("first_sha256", outline[2]))


def digest(sources: list[str], root: Path) -> str:
    """Names a shard's source images, each by its path, size and modification time, so that a rerun reuses a
    shard only if it would hold the same images as they are now: one replaced or repaired since (an
    unreadable file the message said to fix) is read again."""
    def stamp(path: str) -> str:
        try:
            st = (root / path).stat()
        except OSError:  # gone since the listing: the shard is redone, and says so
            return f"{path}\tmissing"
        return f"{path}\t{st.st_size}\t{st.st_mtime_ns}"

    return hashlib.sha1("\n".join(map(stamp, sources)).encode("utf-8", "surrogateescape")).hexdigest()  # names need not be UTF-8


def previous_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({error}); delete it to re-encode every shard") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    # temp file + rename: a reader (or a crash) never sees half a manifest
    write_atomic(folder / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())


def check_out_folder(out: Path) -> None:
    """--out must be a folder this process can write into (made if missing); DataError before the VAE loads."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: pass a folder for the shards (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_sibling(out / ".write-test")  # a name remove_leftovers leaves alone
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"cannot write to --out {out}: {error.strerror or error}: choose a writable folder") from None


def check_previous(previous: dict | None, settings: dict, out: Path) -> dict:
    """Finished shards of an earlier run with the same settings, by name (empty if none). settings["vae_sha256"]
    (once the VAE is loaded): the shards' VAE must be the one at --vae now, not only one of the same name."""
    if previous is None:
        return {}
    fingerprint = settings.get("vae_sha256")
    # None in an older manifest: encoded before the fingerprint was kept
    if fingerprint is not None and previous.get("vae_sha256") not in (None, fingerprint):
        raise DataError(f"{out} holds shards encoded with another VAE than --vae {settings['vae']} is now (its "
                        f"weights or scaling differ: replaced or retrained since); pass a new --out, or delete {out} "
                        f"to re-encode")
    old = {key: previous.get(key) for key in SETTINGS}
    if old != {key: settings[key] for key in SETTINGS}:
        differ = ", ".join(f"{k} {old[k]!r} -> {settings[k]!r}" for k in SETTINGS if old[k] != settings[k])
        raise DataError(f"{out} holds shards encoded with other settings ({differ}); "
                        f"pass a new --out, or delete {out} to re-encode")
    return {info["name"]: info for info in previous.get("shard_info", [])}


class EncodeWriteFailed(DataError, WriteFailed):
    """A shard or the manifest could not be written: a failure (exit 1), not a mistake in the input."""


ENCODE_LOCK = ".encode.lock"


def remove_leftovers(out: Path) -> None:
    """The temporary files of a shard or manifest being written: of a write that failed, or of a killed encode."""
    for leftover in [*out.glob("shard-*.tar.tmp"), *out.glob(".tmp-*manifest.json")]:
        leftover.unlink(missing_ok=True)


def write_failed(out: Path, name: str, error: OSError, finished: int) -> EncodeWriteFailed:
    """A write that failed (a full disk): its temporary file is gone, the finished shards are kept."""
    remove_leftovers(out)
    return EncodeWriteFailed(f"could not write {out / name}: {error.strerror or error}; no partial file is left, "
                             f"the {finished} shards written before are kept: {write_fix(error)}, then rerun the "
                             f"same command to continue")


def main(argv: list[str] | None = None) -> dict:
    from stmd_fast.devices import resolve_device

    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("resolution", "batch_size", "shard_size", "workers", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    check_batch_memory(args.batch_size, args.resolution)
    root, out = Path(args.images), Path(args.out)
    sources = list_images(root, args.limit)  # before the VAE: no point loading it for an empty folder
    settings = {"format": FORMAT, "vae": local_path(args.vae), "resolution": args.resolution, "flip": args.flip,
                "shard_size": args.shard_size, "source": str(root.resolve())}
    made = [folder for folder in [out, *Path(os.path.abspath(out)).parents] if not folder.exists()]  # deepest first
    check_out_folder(out)

    def remove_made() -> None:
        for folder in made:  # made just now and still empty: a bad --vae or --resolution leaves nothing behind
            try:
                folder.rmdir()
            except OSError:  # shards in it, or another command's output
                break

    with contextlib.ExitStack() as stack:
        try:  # two encodes at once renamed each other's shards away
            held = stack.enter_context(run_lock(out, ENCODE_LOCK, "another encode command"))
        except RunLocked as error:
            raise DataError(str(error)) from None
        except OSError as error:  # a file system without flock (some network mounts)
            if out in made:  # its lock file is this command's own
                (out / ENCODE_LOCK).unlink(missing_ok=True)
                remove_made()
            raise EncodeWriteFailed(f"cannot lock {out / ENCODE_LOCK}: {error.strerror or error}: put --out on a "
                                    f"file system that takes file locks (a local disk)") from None
        try:
            remove_leftovers(out)  # of a killed encode: no other writes here while this one holds the lock
            return encode_shards(args, out, root, sources, settings, device)
        except DataError:
            held.unlink(missing_ok=True)
            remove_made()
            raise
        finally:  # still holding the lock, as evaluate does (a process locking the old file then takes the new)
            held.unlink(missing_ok=True)


def encode_shards(args, out: Path, root: Path, sources: list[str], settings: dict, device) -> dict:
    """main's work, under --out's lock: the shards not finished by an earlier run with the same settings, then the
    manifest."""
    previous = previous_manifest(out)
    check_previous(previous, settings, out)  # the settings at hand, before the VAE loads
    vae = load_vae(args.vae, device)
    shape = latent_shape(vae, args.resolution)
    if shape[1] % 2:  # said before hours of encoding, not by the trainer after them
        factor = args.resolution // shape[1]
        raise DataError(f"--resolution {args.resolution} gives {shape[1]}x{shape[2]} latents (the VAE downsamples "
                        f"{factor}x), an odd size that no DiT patch (2, 4, 8) divides: the trainer cannot take them; "
                        f"pick a multiple of {2 * factor} (e.g. {(args.resolution // (2 * factor) or 1) * 2 * factor})")
    settings["vae_sha256"] = vae_fingerprint(vae)
    finished = check_previous(previous, settings, out)

    groups = shard_groups(sources, args.shard_size)
    index = {p: i for i, p in enumerate(sources)}
    names = [f"shard-{k:06d}.tar" for k in range(len(groups))]
    info: list[dict] = []

    def manifest(complete: bool) -> dict:
        skipped = [s for shard in info for s in shard["skipped"]]
        return {**settings, "complete": complete, "count": sum(s["samples"] for s in info),
                "images": sum(s["images"] for s in info), "latent_shape": shape, "dtype": "float16",
                "scaling_factor": float(vae.config.scaling_factor),
                # SD3/FLUX-style VAEs shift before scaling: model latents = (z - shift_factor) * scaling_factor
                "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
                "pattern": f"shard-{{000000..{len(groups) - 1:06d}}}.tar", "shards": [s["name"] for s in info],
                "skipped": skipped, "shard_info": info}

    reused = 0
    bar = tqdm(total=len(sources), desc="encode", unit="img", disable=None)  # None: bar only on a terminal
    lines = bar.disable  # a log file (nohup, a batch job) gets a line per shard instead
    with ThreadPoolExecutor(args.workers) as pool:
        for name, group in zip(names, groups):
            done = finished.get(name)
            if done is not None and done["sources_sha1"] == digest(group, root):
                unread = {s["path"] for s in done["skipped"]}
                first_key = next((f"{index[p]:09d}" for p in group if printable(p) not in unread), None)
                size = (out / name).stat().st_size if (out / name).exists() else None
                outline = shard_outline(out / name) if size is not None else None
                if still_as_written(size, outline, done, first_key):  # finished earlier, with the same images
                    # an older manifest's entry gains what this version checks (the loader then checks it too)
                    info.append({**done, "bytes": size, "first_sha256": outline[2]})
                    reused += 1
                    bar.update(len(group))
                    continue
                if (out / name).exists():
                    print(f"encode: {name} is not the shard written here (copied over or cut short since): "
                          f"encoding it again", file=sys.stderr, flush=True)
            try:
                info.append(encode_shard(out / name, group, index, vae, pool, root, args, bar))
                write_manifest(out, manifest(complete=False))  # progress: what a rerun may skip
            except OSError as error:
                raise write_failed(out, name, error, len(info)) from None
            if lines:
                print(f"encode: {name} written ({len(info)} of {len(names)} shards)", flush=True)
    bar.close()
    if reused:
        print(f"encode: {reused} of {len(names)} shards reused, finished by an earlier run with the same settings "
              f"and images", flush=True)

    result = manifest(complete=True)
    if result["images"] == 0:
        raise DataError(f"none of the {len(sources)} images under {root} could be read (first: "
                        f"{result['skipped'][0]['path']}: {result['skipped'][0]['error']}); check the files")
    try:
        write_manifest(out, result)
    except OSError as error:
        raise write_failed(out, "manifest.json", error, len(info)) from None
    stale = sorted(p.name for p in out.glob("shard-*.tar") if p.name not in set(names))
    if stale:
        print(f"note: {len(stale)} shard files in {out} are not part of this encoding (e.g. {stale[0]}, "
              "from an earlier run over more images); delete them, or keep them out of the shard pattern",
              file=sys.stderr)
    enlarged = sum(s.get("enlarged", 0) for s in info)  # absent in shards encoded before it was counted
    if enlarged:
        print(enlarged_note(enlarged, result["images"], args.resolution), file=sys.stderr)
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable image(s):")
        for s in result["skipped"]:
            print(f"  {s['path']}: {s['error']}")
    print(f"wrote {result['count']} samples from {result['images']} images in {len(names)} shards, latents "
          f"{'x'.join(map(str, shape))} float16: train with --data {shlex.quote(str(out))}")
    return result


@one_line_errors(DataError, failures=(WriteFailed,))
def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input exits 2 with one line, as every stmd_fast command; a failed write 1."""
    main(argv)
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(cli)
