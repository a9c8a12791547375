"""VAE latents streamed from the WebDataset shards that stmd_fast.data.encode writes, for training.

    data = LatentShards("shards/shard-{000000..000099}.tar", expect_vae=vae_id, expect_resolution=256,
                        rank=rank, world_size=world_size).to("cuda")
    x0 = data.batch(256, generator)   # (256, C, h, w) float32: one draw from each latent distribution

The pipeline of one rank (r of W) and one DataLoader worker (w of K), per epoch:

    all shards, shuffled by (seed, epoch): the same order on every rank
    -> every W-th shard from r -> every K-th of those from w -> samples (webdataset's tar reader)
    -> shuffle buffer seeded by (seed, epoch, r, w) -> fp16 mean/std stacked in chunks of CHUNK
    -> DataLoader (takes the workers' chunks in a fixed round robin) -> batch() in the main process:
       `size` samples, noise from the caller's generator, (mean + std * noise - shift) * scaling_factor
       (shift_factor is 0 for the SD VAEs; SD3/FLUX-style VAEs record theirs in the manifest)

Every step is a function of (seed, epoch, rank, world_size, num_workers), so the stream is
deterministic with any number of workers, and a position is (epoch, samples consumed): resuming
replays the epoch from its start and drops the consumed samples (up to an epoch of reading, no more).
Epochs repeat forever. A rank whose epoch yields no sample at all raises DataError instead of waiting.
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import random
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..files import local_path
from .datasets import DataError
from .encode import FORMAT, sample_sha256
from .vae import check_vae_path
from .vae import decode_latents  # noqa: F401 (importable from here too)

SHORT_EPOCH = 2048  # samples per rank below which the main process reads the shards itself (no workers)
CHUNK = 64  # samples per worker -> main process transfer: one pickle per chunk, not per sample
# What a damaged shard raises while its tar stream is read: tarfile's errors, truncated streams.
# The rest of that shard is skipped; a sample whose own bytes are damaged is skipped alone.
CORRUPT = (tarfile.TarError, OSError, EOFError, ValueError)


class DamagedSample(ValueError):
    """One sample's entries are missing, unparsable, of the wrong shape, fail the checksum or are not finite."""


def _first_member_is_an_image(tar: Path) -> bool:
    from .images import IMAGE_SUFFIXES

    try:
        with tarfile.open(tar) as archive:
            member = next((m for m in archive if m.isfile()), None)
    except (tarfile.TarError, OSError):
        return False
    return member is not None and Path(member.name).suffix.lower() in IMAGE_SUFFIXES


def read_manifest(folder: Path) -> dict:
    """The manifest.json that encode writes beside the shards; DataError if missing or unfinished."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        from .images import IMAGE_SUFFIXES

        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):  # images, not their latents
            raise DataError(f"{folder} holds images, not latent shards: encode them first (python -m "
                            f"stmd_fast.data.encode --images {folder} --vae VAE --out SHARDS, then --data SHARDS), "
                            f"or train on the pixels (--data {folder} without a latent --preset)") from None
        archive = next((tar for tar in sorted(folder.glob("*.tar")) if _first_member_is_an_image(tar)), None)
        if archive is not None:
            raise DataError(f"{archive} is a tar archive of images, not latent shards: extract it (tar xf "
                            f"{archive}) and pass the folder of images") from None
        raise DataError(f"{folder}: no manifest.json beside the shards; write the shards with "
                        "python -m stmd_fast.data.encode (it writes the manifest)") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({error}); rerun stmd_fast.data.encode with the same --out") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, this loader reads {FORMAT!r}; "
                        "re-encode with this version's stmd_fast.data.encode")
    if not manifest.get("complete"):
        raise DataError(f"{folder}: the encoding did not finish ({len(manifest.get('shards', []))} shards so far); "
                        "rerun the same stmd_fast.data.encode command to finish it")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    wrong = [key for key, fits in MANIFEST_KEYS.items() if key in manifest and not fits(manifest[key])]
    if missing or wrong:
        what = "; ".join(part for part in (missing and f"lacks {', '.join(missing)}",
                                           wrong and f"holds no valid {', '.join(wrong)}") if part)
        raise DataError(f"{path}: {what} (edited by hand?); rerun the stmd_fast.data.encode command that wrote it, "
                        "with the same --out")
    return manifest


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


MANIFEST_KEYS = {  # what the loader reads, each with what a valid value is (a hand-edited one failed deep inside)
    "vae": lambda x: isinstance(x, str) and x != "",
    "resolution": lambda x: _count(x) and x > 0,
    "latent_shape": lambda x: isinstance(x, list) and len(x) == 3 and all(_count(n) and n > 0 for n in x),
    "scaling_factor": lambda x: _number(x) and x != 0,
    "shift_factor": _number,
    "pattern": lambda x: isinstance(x, str) and x != "",
    "shard_info": lambda x: isinstance(x, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                        and _count(i.get("samples")) for i in x),
}


def vae_moved(manifest: dict) -> bool:
    """Whether the manifest names a local VAE folder (saved absolute) that is no longer there."""
    return Path(manifest["vae"]).is_absolute() and not Path(manifest["vae"]).exists()


def expand_pattern(urls: str) -> list[str]:
    """Shard paths from a brace pattern ('shard-{000000..000009}.tar'), a glob ('shard-*.tar', sorted), a
    folder encode wrote (its manifest's shards) or several of these joined by '::' (webdataset's syntax);
    DataError for an empty part, a glob that matches nothing or a folder that is not there."""
    # a folder is taken as named before it is read as a pattern: enc[v1], enc{1,2} or a::b is a folder's name
    parts = [urls] if Path(urls).expanduser().is_dir() else urls.split("::")
    if "" in parts:
        raise DataError(f"--data {urls}: an empty part between '::' (it would name the current folder); join "
                        f"each folder or pattern once: A::B")
    paths = []
    for part in parts:
        for name in [part] if Path(part).expanduser().is_dir() else expand_urls(part):
            name = os.path.expanduser(name)
            matched = sorted(glob.glob(name)) if glob.has_magic(name) and not Path(name).exists() else [name]
            if not matched:
                raise DataError(f"--data {name}: the pattern matches no file; check it against the shards that "
                                "stmd_fast.data.encode wrote, or pass their folder")
            for path in matched:
                if Path(path).is_dir():
                    paths += [str(Path(path) / info["name"]) for info in read_manifest(Path(path))["shard_info"]]
                elif not Path(path).exists() and not path.endswith(".tar"):
                    raise DataError(f"--data {path}: no such folder; pass the folder stmd_fast.data.encode wrote, "
                                    f"or a pattern of its shards")
                else:
                    paths.append(path)  # a shard that is missing is said with the others missing
    return paths


def check_expected(manifest: dict, folder: Path, vae: str | None, resolution: int | None) -> None:
    """DataError unless the shards were encoded with the VAE and resolution the preset expects."""
    encoded = f"{folder}: shards were encoded with VAE {manifest['vae']} at resolution {manifest['resolution']}"
    # A VAE folder that moved (or a copy on another machine) is named by its new place; the trainer then
    # checks that it makes the manifest's latents (data.vae.check_vae_fits).
    if vae is not None and local_path(vae) != local_path(manifest["vae"]):
        # a --vae that is not there is said so, not taken for another VAE (nor re-encoded with)
        check_vae_path(vae, f"check the path (the shards were encoded with {manifest['vae']})")
        if not vae_moved(manifest):
            raise DataError(f"{encoded}, not with the VAE {vae} (--vae, or the preset's): train with --preset latent "
                            f"and no --vae (the manifest's VAE is used) or pass --vae {manifest['vae']}; or re-encode "
                            f"with python -m stmd_fast.data.encode --vae {vae} --out NEW_FOLDER")
    if resolution is not None and resolution != manifest["resolution"]:
        raise DataError(f"{encoded}, and this preset trains at {resolution}: re-encode with python -m "
                        f"stmd_fast.data.encode --resolution {resolution} --out NEW_FOLDER, or train with --preset "
                        f"latent, which takes any resolution")


def epoch_shares(sizes: list[int], world_size: int) -> tuple[int, int]:
    """The fewest and the most samples one of `world_size` processes can be dealt in an epoch from shards of
    `sizes` samples (rank_shards deals whole shards, shuffled per epoch)."""
    ordered = sorted(sizes)
    return sum(ordered[:len(ordered) // world_size]), sum(ordered[-math.ceil(len(ordered) / world_size):])


def rank_shards(urls: list[str], seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """This rank's shards for `epoch`: a shuffle that is the same on every rank, then every W-th from r.

    Rank and world size are explicit (webdataset's split_by_node asks torch.distributed or $RANK).
    """
    order = list(urls)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)  # str seeds hash the same in every process
    return order[rank::world_size]


def worker_split(shards: list[str]) -> tuple[list[str], int]:
    """(this DataLoader worker's shards, its id): every K-th shard from worker w; all of them outside workers.

    Reads get_worker_info() itself (webdataset's split_by_worker prefers $WORKER when set), so the
    split and the shuffle seed below always agree on the worker id.
    """
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return shards[worker::workers], worker


def decode_sample(sample: dict, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) fp16 of one sample from its tar entries, or DamagedSample saying what is wrong."""
    missing = [k for k in ("mean.npy", "std.npy", "sha256.txt") if k not in sample]
    if missing:
        raise DamagedSample(f"no {', '.join(missing)}")
    if sample_sha256(sample["mean.npy"], sample["std.npy"]) != bytes(sample["sha256.txt"]).decode(errors="replace"):
        raise DamagedSample("fails its SHA-256 check")
    try:
        mean, std = (np.load(io.BytesIO(sample[k]), allow_pickle=False) for k in ("mean.npy", "std.npy"))
    except (ValueError, OSError, EOFError) as error:
        raise DamagedSample(f"unparsable .npy ({error})") from None
    if mean.shape != shape or std.shape != shape:
        raise DamagedSample(f"shapes {mean.shape}, {std.shape}, the manifest says {shape}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DamagedSample("holds NaN or inf")
    return mean, std


def _another_sample(sample: dict, first: str) -> bool:
    """Whether a shard's first sample is another than the one whose SHA-256 (`first`) the manifest lists: neither
    its stored checksum nor its data's matches it. Either can be the damaged part of the right sample, so a
    damaged first sample still tells a shard copied over this one; one with neither part left tells nothing."""
    stored = bytes(sample["sha256.txt"]).decode(errors="replace") if "sha256.txt" in sample else None
    data = sample_sha256(sample["mean.npy"], sample["std.npy"]) if {"mean.npy", "std.npy"} <= sample.keys() else None
    return (stored, data) != (None, None) and first not in (stored, data)


def read_shards(shards: list[str], shape: tuple[int, ...], expected: dict[str, int],
                firsts: dict[str, str] | None = None):
    """Yields {"key", "mean", "std"} (fp16 numpy) per intact sample, {"damaged": key, "url", "error"} per
    damaged sample (skipped), and {"skipped": url, "error"} for a shard whose tar stream breaks (the
    samples read before the break were yielded already).

    `expected` (path -> samples, from the manifest) catches a tar cut at a member boundary, which
    tarfile reads as a clean end. `firsts` (path -> its first sample's SHA-256, in manifests written since it was
    kept) catches another shard of the same length in its place, before any of its samples is yielded.
    """
    firsts = firsts or {}
    for url in shards:
        count, listed, first = 0, expected.get(str(Path(url))), firsts.get(str(Path(url)))
        swapped = False
        try:
            # opened here, not by webdataset's url_opener, which leaves closing the file to the GC
            with open(url, "rb") as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    count += 1
                    if listed is not None and count > listed:  # not the shard encoded there: read no more of it
                        break
                    if count == 1 and first is not None and _another_sample(sample, first):  # read none of it
                        swapped = True
                        break
                    try:
                        mean, std = decode_sample(sample, shape)
                    except DamagedSample as error:
                        yield {"damaged": sample["__key__"], "url": url, "error": str(error)}
                        continue
                    yield {"key": sample["__key__"], "mean": mean, "std": std}
        except CORRUPT as error:
            reason = error.args[0] if error.args else ""  # webdataset appends the stream to args
            yield {"skipped": url, "error": f"{type(error).__name__}: {reason}"}
            continue
        if swapped or listed is not None and count > listed:
            why = "its first sample is not the one its manifest lists, so none of it is read" if swapped else \
                f"holds more samples than the {listed} its manifest lists"
            yield {"skipped": url, "error": f"{why}: not the shard encoded there (copied over?); rerun the same "
                                            f"encode command, which writes it again"}
        elif listed is not None and count < listed:
            yield {"skipped": url, "error": f"ends after {count} of {listed} samples; rerun the same encode command, "
                                            f"which writes it again"}


def chunked(records, size: int):
    """Stacks records into {"keys", "mean", "std"} chunks of `size` (fp16 tensors); skip markers pass through."""
    keys, means, stds = [], [], []
    for record in records:
        if "key" not in record:
            yield record
            continue
        keys.append(record["key"]), means.append(record["mean"]), stds.append(record["std"])
        if len(keys) == size:
            yield {"keys": keys, "mean": torch.from_numpy(np.stack(means)), "std": torch.from_numpy(np.stack(stds))}
            keys, means, stds = [], [], []
    if keys:
        yield {"keys": keys, "mean": torch.from_numpy(np.stack(means)), "std": torch.from_numpy(np.stack(stds))}


class EpochStream(IterableDataset):
    """One rank's samples for one epoch, as chunks (and skip markers), from whichever worker runs it."""

    def __init__(self, urls, shape, expected, epoch, *, seed, rank, world_size, shuffle_buffer, firsts=None):
        self.urls, self.shape, self.expected, self.firsts, self.epoch = urls, shape, expected, firsts, epoch
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer

    def __iter__(self):
        shards, worker = worker_split(rank_shards(self.urls, self.seed, self.epoch, self.rank, self.world_size))
        records = read_shards(shards, self.shape, self.expected, self.firsts)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{worker}")
            records = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(records)
        return chunked(records, CHUNK)


class LatentShards:
    """An endless, resumable stream of latents for one DDP rank; batch() is the trainer's interface.

    num_workers: DataLoader worker processes (at most one per shard of the rank); None: 2, or none when
    the rank's epoch is under SHORT_EPOCH samples.

    A damaged sample (its checksum, shape or values wrong) is skipped and counted in skipped_samples; a
    shard whose tar stream breaks is skipped from there on and counted in skipped_shards; each with a
    warning the first time (strict=True: DataError instead).
    """

    kind = "latent"

    def __init__(self, urls: str, *, expect_vae: str | None = None, expect_resolution: int | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int | None = None, shuffle_buffer: int = 1000,
                 seed: int = 0, strict: bool = False, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        folder = Path(urls).expanduser()
        if folder.is_file() and folder.suffix.lower() != ".tar":  # an .npy (or an image) under --preset latent
            raise DataError(f"{urls} is a file, not latent shards: pass the folder stmd_fast.data.encode wrote (or a "
                            f"pattern of its .tar shards); an array or images train without a latent --preset")
        self.urls = expand_pattern(urls)
        seen: dict[str, str] = {}
        for url in self.urls:  # two parts of a '::' list (or a link) naming one shard: read twice an epoch
            if (real := os.path.realpath(url)) in seen:
                also = "" if url == seen[real] else f" (also as {seen[real]})"
                raise DataError(f"--data {urls} names the shard {url} twice{also}: its samples would be read "
                                f"twice an epoch; list each shard once")
            seen[real] = url
        missing = [u for u in self.urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(self.urls)} shard files are missing, the first: {missing[0]}; "
                            "check the pattern against the shards that stmd_fast.data.encode wrote")
        manifests = {folder: read_manifest(folder) for folder in dict.fromkeys(Path(u).parent for u in self.urls)}
        first, self.manifest = next(iter(manifests.items()))  # the first shard's folder
        check_expected(self.manifest, first, expect_vae, expect_resolution)
        for folder, manifest in manifests.items():  # shards from several folders mix only if encoded alike
            differ = [k for k in ("vae", "resolution", "latent_shape", "scaling_factor", "shift_factor")
                      if manifest[k] != self.manifest[k]]
            if differ:
                raise DataError(f"{folder}: encoded with another {', '.join(differ)} than {first}; "
                                "pass shards of one encoding, or re-encode one folder like the other")
        self._expected = {str(folder / info["name"]): info["samples"]
                          for folder, manifest in manifests.items() for info in manifest["shard_info"]}
        self._firsts = {str(folder / info["name"]): info["first_sha256"]  # absent in manifests written before it
                        for folder, manifest in manifests.items() for info in manifest["shard_info"]
                        if info.get("first_sha256")}
        unlisted = [u for u in self.urls if str(Path(u)) not in self._expected]
        if unlisted:  # e.g. left by an earlier encoding over more images: its samples would be read twice
            raise DataError(f"{unlisted[0]}: not a shard of the encoding its folder's manifest.json describes "
                            f"({len(unlisted)} such); leave it out of the pattern, or pass the folder (its manifest "
                            "names the shards)")
        # a shard of no samples (all its images unreadable) would leave a process an epoch of nothing
        self.urls = [u for u in self.urls if self._expected[str(Path(u))] > 0]
        if not self.urls:
            raise DataError(f"--data {urls}: its shards hold no samples (every image was unreadable when encoded); "
                            f"re-encode readable images with stmd_fast.data.encode")
        self.count = sum(self._expected[str(Path(u))] for u in self.urls)  # samples, in all ranks' shards together
        images = self.manifest.get("images", self.count)
        def shard_size_at_most(size: int) -> str:
            return f"--shard-size {size} (or less)" if size > 1 else "--shard-size 1"

        smaller = shard_size_at_most(max(1, images // (4 * world_size)))
        if len(self.urls) < world_size:
            raise DataError(f"{len(self.urls)} shard{'s' if len(self.urls) != 1 else ''} cannot be split over "
                            f"{world_size} processes (each needs shards of its own): re-encode with {smaller}, so "
                            f"that each process and data worker has several")
        sizes = sorted(self._expected[str(Path(u))] for u in self.urls)
        fewest, most = epoch_shares(sizes, world_size)
        if world_size > 1 and rank == 0 and fewest < 0.9 * most:
            # each rank counts its own epochs: shares more than 10% apart drift apart noticeably; with 20 shards
            # per process or more, one shard more or less is within 5%
            print(f"note: {len(sizes)} shards of {sizes[0]}-{sizes[-1]} samples give each of the {world_size} "
                  f"processes {fewest}-{most} samples an epoch, so they end their epochs at different steps and "
                  f"over a stretch of training some samples are drawn more often than others; re-encoding with "
                  f"{shard_size_at_most(max(1, images // (20 * world_size)))} evens it out", flush=True,
                  file=sys.stderr)
        self.shape = tuple(self.manifest["latent_shape"])
        self.scaling_factor = float(self.manifest["scaling_factor"])
        self.shift_factor = float(self.manifest["shift_factor"])
        self.rank, self.world_size, self.seed, self.strict = rank, world_size, seed, strict
        self.shuffle_buffer = shuffle_buffer
        if num_workers is None:  # workers start anew each epoch (the epoch seeds their order): for a short
            # epoch that costs more than the main process reading it
            per_rank = self.count / world_size
            num_workers = 0 if per_rank < SHORT_EPOCH else 2
        self.num_workers = min(num_workers, len(self.urls[rank::world_size]))  # a worker needs a shard
        self.device = torch.device(device)
        self.corrupt_shards: dict[str, str] = {}  # url -> error, over all epochs
        self.damaged_samples: dict[str, str] = {}  # "url:key" -> error, over all epochs
        self._warned: set[str] = set()  # shards whose damaged samples were reported
        self.epoch, self.consumed = 0, 0
        self._stream = None  # the current epoch's DataLoader iterator
        self._pending = None  # (mean, std) of a chunk on self.device, not consumed yet
        self._replay = 0  # samples to drop after a resume
        self._epoch_samples = 0  # read in the current epoch: none at its end means nothing is readable

    @property
    def skipped_shards(self) -> int:
        """Damaged shards skipped so far (each counted once, however many epochs met it)."""
        return len(self.corrupt_shards)

    @property
    def skipped_samples(self) -> int:
        """Damaged samples skipped so far (each counted once, however many epochs met it)."""
        return len(self.damaged_samples)

    def to(self, device) -> LatentShards:
        """Sets the device batch() returns on (and pins the workers' chunks in memory for CUDA)."""
        self.device = torch.device(device)
        if self._pending is not None:
            self._pending = tuple(t.to(self.device) for t in self._pending)
        return self

    def batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """(size, C, h, w) float32 on the device: (mean + std * noise - shift_factor) * scaling_factor for
        the next `size` samples of the stream; the noise comes from `generator` alone, so a seeded generator
        repeats it."""
        means, stds, taken = [], [], 0
        while taken < size:
            if self._pending is None:
                self._pending = self._next_chunk()
            mean, std = self._pending
            n = min(size - taken, len(mean))
            means.append(mean[:n]), stds.append(std[:n])
            self._pending = (mean[n:], std[n:]) if n < len(mean) else None
            self.consumed += n
            taken += n
        mean, std = torch.cat(means).float(), torch.cat(stds).float()
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(self.device)
        return (mean + std * noise - self.shift_factor) * self.scaling_factor

    def state_dict(self) -> dict:
        """The position: epoch and samples this rank consumed in it (and the seed the order came from)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batch() replays that epoch and skips the consumed samples.

        The same stream needs the same shards, rank, world_size and num_workers as when it was saved.
        """
        self.epoch, self.consumed, self.seed = int(state["epoch"]), int(state["consumed"]), int(state["seed"])
        self._stream, self._pending, self._replay = None, None, self.consumed

    def epoch_keys(self, epoch: int) -> list[str]:
        """The sample keys of `epoch` in this rank's stream order (for tests and inspection)."""
        chunks = self._loader(epoch)
        return [key for chunk in chunks if "keys" in chunk for key in chunk["keys"]]

    def _loader(self, epoch: int) -> DataLoader:
        dataset = EpochStream(self.urls, self.shape, self._expected, epoch, seed=self.seed, rank=self.rank,
                              world_size=self.world_size, shuffle_buffer=self.shuffle_buffer, firsts=self._firsts)
        # batch_size=None: the workers' chunks pass through as they are; one loader per epoch, since
        # the epoch is part of every worker's shard order and seed
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _next_chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._stream is None:
                # DataLoader draws its base seed from the global generator, dropout's too (a checkpoint keeps
                # it): a resumed run starts its iterator mid-epoch, so that draw would shift every later mask
                with torch.random.fork_rng(devices=[]):
                    self._stream, self._epoch_samples = iter(self._loader(self.epoch)), 0
            chunk = next(self._stream, None)
            if chunk is None:  # end of the epoch
                self._stream = None
                if self._epoch_samples == 0:
                    first = next(iter({**self.corrupt_shards, **self.damaged_samples}.items()), None)
                    raise DataError(
                        f"no readable samples in the {len(self.urls[self.rank::self.world_size])} shards of rank "
                        f"{self.rank}" + (f" (e.g. {first[0]}: {first[1]})" if first else "")
                        + "; check the shards, or re-encode them with stmd_fast.data.encode")
                self.epoch, self.consumed, self._replay = self.epoch + 1, 0, 0
                continue
            if "skipped" in chunk:
                self._skip_shard(chunk["skipped"], chunk["error"])
                continue
            if "damaged" in chunk:
                self._skip_sample(chunk["url"], chunk["damaged"], chunk["error"])
                continue
            self._epoch_samples += len(chunk["keys"])
            mean, std = chunk["mean"], chunk["std"]
            if self._replay:  # resuming: these were consumed before the state was saved
                drop = min(self._replay, len(mean))
                mean, std, self._replay = mean[drop:], std[drop:], self._replay - drop
                if not len(mean):
                    continue
            # non_blocking: the copy from pinned memory overlaps with the caller's GPU work
            return mean.to(self.device, non_blocking=True), std.to(self.device, non_blocking=True)

    def _skip_shard(self, url: str, error: str) -> None:
        if self.strict:
            raise DataError(f"{url}: damaged shard ({error}); delete it and rerun stmd_fast.data.encode with the "
                            "same arguments to rewrite it, or drop --strict-data to skip it")
        if url not in self.corrupt_shards:
            warnings.warn(f"skipping damaged shard {url} ({error}); the samples before the damage are used",
                          stacklevel=4)
        self.corrupt_shards[url] = error

    def _skip_sample(self, url: str, key: str, error: str) -> None:
        if self.strict:
            raise DataError(f"{url}: sample {key} is damaged ({error}); delete the shard and rerun "
                            "stmd_fast.data.encode with the same arguments to rewrite it, or drop --strict-data")
        if url not in self._warned:  # once per shard: a badly damaged one would flood the log
            self._warned.add(url)
            warnings.warn(f"skipping damaged sample {key} of {url} ({error}); later ones are counted, not "
                          "reported", stacklevel=4)
        self.damaged_samples[f"{url}:{key}"] = error

