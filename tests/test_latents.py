"""The latent pipeline: stmd_fast.data.encode (images -> shards) and stmd_fast.data.latents.LatentShards.

A tiny randomly initialised AutoencoderKL (downsampling 2) stands in for the SD VAE, and the images
are synthetic files of assorted sizes, modes and formats, one of them corrupt. The references are
computed here: the VAE run directly on the module's own preprocessing, and the shards read back raw.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmd_fast.data import encode as enc
from stmd_fast.data.datasets import DataError
from stmd_fast.data.latents import LatentShards

ROOT = Path(__file__).resolve().parents[1]
R = 16  # resolution: latents (4, 8, 8)
SHARD_SIZE = 2
# (relative path, size, PIL mode): portrait, landscape, square, odd sizes, upscaled, nested, upper-case suffix
IMAGES = [("a.png", (40, 30), "RGB"), ("b.jpg", (24, 48), "RGB"), ("c.png", (33, 33), "L"),
          ("d.png", (50, 20), "RGBA"), ("e.jpeg", (12, 9), "RGB"), ("sub/f.JPG", (64, 40), "RGB"),
          ("sub/g.PNG", (17, 31), "P"), ("sub/deeper/h.png", (16, 16), "RGB"), ("i.jpg", (30, 45), "RGB")]
CORRUPT = "broken.png"  # third of the 10 sources in sorted order


def _write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    # a gradient plus noise: structure for the resize to act on, different in every image
    base = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        image.putalpha(128)
    elif mode in ("L", "P"):
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae")
    _tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for seed, (name, size, mode) in enumerate(IMAGES):
        _write_image(root / name, size, mode, seed)
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, image_dir, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("shards")
    enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
              "--batch-size", "1", "--device", "cpu", "--flip", "--shard-size", str(SHARD_SIZE), "--workers", "2"])
    return out


def _pattern(folder: Path, n: int = 5) -> str:
    return str(folder / f"shard-{{000000..{n - 1:06d}}}.tar")


def _read_samples(folder: Path) -> dict[str, dict]:
    """Every sample of every shard, read with tarfile and numpy only: key -> {"mean", "std", "src", "shard"}."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, entry = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                value = data.decode() if entry.endswith(".txt") else np.load(io.BytesIO(data))
                samples.setdefault(key, {"shard": shard.name})[entry.split(".")[0]] = value
    return samples


def _direct(vae, image_dir: Path, src: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE run on one image, preprocessed by the encoder's own function: fp16 (mean, std)."""
    x, error, _ = enc.load_image(image_dir / src, R)
    assert error is None
    x = x[None].flip(-1) if flip else x[None]
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return dist.mean[0].half(), dist.std[0].half()


# --- encode -------------------------------------------------------------------------------------


def test_manifest_describes_the_shards(shards, vae, vae_dir):
    manifest = json.loads((shards / "manifest.json").read_text())
    n = len(IMAGES)
    assert manifest["complete"] is True
    assert manifest["images"] == n and manifest["count"] == 2 * n  # each image and its flip
    assert manifest["latent_shape"] == [4, R // 2, R // 2]
    assert manifest["vae"] == str(vae_dir) and manifest["resolution"] == R
    assert manifest["scaling_factor"] == vae.config.scaling_factor and manifest["shift_factor"] == 0.0
    assert manifest["flip"] is True and manifest["shard_size"] == SHARD_SIZE
    assert manifest["shards"] == [f"shard-{k:06d}.tar" for k in range(5)]  # 10 sources, 2 per shard
    assert [s["path"] for s in manifest["skipped"]] == [CORRUPT] and manifest["skipped"][0]["error"]
    assert sorted(p.name for p in shards.iterdir()) == sorted(manifest["shards"] + ["manifest.json"])


def test_shards_hold_the_vae_encoding_of_each_image_and_its_flip(shards, vae, image_dir):
    samples = _read_samples(shards)
    sources = sorted(name for name, _, _ in IMAGES)
    assert sorted(k for k in samples if not k.endswith("_flip")) == [
        f"{sorted(sources + [CORRUPT]).index(s):09d}" for s in sources]  # the index in the sorted list
    assert len(samples) == 2 * len(IMAGES)
    for key, sample in samples.items():
        assert sample["mean"].dtype == np.float16 and sample["mean"].shape == (4, R // 2, R // 2)
        mean, std = _direct(vae, image_dir, sample["src"], flip=key.endswith("_flip"))
        # bit for bit: the fixture encoded one image per call, as the reference does
        assert torch.equal(torch.from_numpy(sample["mean"]), mean) and torch.equal(torch.from_numpy(sample["std"]), std)
    flipped = samples[f"{1:09d}_flip"]["mean"]
    assert not np.array_equal(flipped, samples[f"{1:09d}"]["mean"])  # the flip is really another image


def test_batched_encoding_keeps_each_latent_with_its_image(shards, tmp_path, image_dir, vae_dir):
    out = tmp_path / "batched"
    enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
              "--batch-size", "4", "--shard-size", "7", "--device", "cpu"])
    one_by_one = {s["src"]: s for k, s in _read_samples(shards).items() if not k.endswith("_flip")}
    batched = _read_samples(out)
    assert sorted(s["src"] for s in batched.values()) == sorted(one_by_one)
    for sample in batched.values():
        # CPU kernels may round differently per batch size: allow one fp16 step
        for entry in ("mean", "std"):
            torch.testing.assert_close(torch.from_numpy(sample[entry]),
                                       torch.from_numpy(one_by_one[sample["src"]][entry]), rtol=1e-3, atol=1e-4)


def test_a_rerun_reencodes_the_shard_of_an_image_repaired_since(tmp_path, image_dir, vae_dir, monkeypatch):
    """The unreadable-image message says to fix the file and rerun: the rerun once reused the finished shard
    (same file names) and reported the old failure again. A shard is reused only if its images' sizes and
    modification times are unchanged."""
    images, out = tmp_path / "images", tmp_path / "shards"
    shutil.copytree(image_dir, images)
    args = ["--images", str(images), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
            "--batch-size", "1", "--device", "cpu", "--shard-size", "2", "--limit", "4"]
    assert [s["path"] for s in enc.main(args)["skipped"]] == [CORRUPT]
    shutil.copy(images / "a.png", images / CORRUPT)  # repaired
    real_encode, calls = enc.encode, []
    monkeypatch.setattr(enc, "encode", lambda vae, x: calls.append(len(x)) or real_encode(vae, x))
    manifest = enc.main(args)
    assert manifest["skipped"] == [] and manifest["images"] == 4
    assert calls == [1, 1]  # the two images of the repaired file's shard, none of the other shard
    srcs = {s["src"] for s in _read_samples(out).values()}
    assert CORRUPT in srcs


def test_images_in_symlinked_folders_are_found_once(tmp_path, image_dir):
    """A data set assembled from links to its parts: Path.rglob (Python < 3.13) skipped linked folders, and a
    link to a folder above must not loop."""
    root = tmp_path / "set"
    (root / "real").mkdir(parents=True)
    shutil.copy(image_dir / "a.png", root / "real" / "x.png")
    os.symlink(image_dir, root / "linked")
    os.symlink(root, root / "real" / "loop")  # back to the top: walked once, not forever
    found = enc.list_images(root)
    assert "real/x.png" in found and "linked/a.png" in found and f"linked/{CORRUPT}" in found
    assert not any(p.startswith("real/loop/") for p in found)


def test_file_names_that_are_not_utf8_and_broken_links_are_encoded_or_named(tmp_path, image_dir, vae_dir, capsys):
    """A latin-1 file name (an old camera, a zip, a Windows share) stopped encode with a UnicodeEncodeError
    traceback from the tar writer; a link into an unmounted drive was left out without a word."""
    root = tmp_path / "set"
    root.mkdir()
    shutil.copy(image_dir / "a.png", root / "ok.png")
    latin1 = os.fsdecode(bytes(root) + b"/caf\xe9.png")
    shutil.copy(image_dir / "b.jpg", latin1)
    os.symlink(tmp_path / "unmounted" / "photo.jpg", root / "gone.jpg")
    Path(os.fsdecode(bytes(root) + b"/bad\xff.png")).write_bytes(b"junk")
    out = tmp_path / "shards"
    enc.main(["--images", str(root), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
              "--device", "cpu", "--workers", "1"])
    printed = capsys.readouterr().out
    assert "skipped 2 unreadable image(s)" in printed and "\n  bad\\xff.png: " in printed
    assert "\n  gone.jpg: FileNotFoundError" in printed
    sources = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            sources += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".src.txt")]
    assert sorted(sources) == [b"caf\xe9.png", b"ok.png"]  # the names' bytes as the file system holds them
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(s["path"] for s in manifest["skipped"]) == ["bad\\xff.png", "gone.jpg"]


def test_preprocess_crops_the_center_square_in_model_range():
    # 80x40, white but for black 10-pixel sides: 4x down to 20x10, whose center 10x10 is the middle 40
    # columns; the white reaches 10 pixels beyond them, past the reach of the bicubic filter (8 at 4x)
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 10:70] = 255
    for image in (Image.fromarray(pixels), Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)):
        x = enc.preprocess(image, 10)
        assert x.shape == (3, 10, 10) and x.dtype == torch.float32
        assert torch.equal(x, torch.ones_like(x))


def test_rerun_skips_finished_shards_and_redoes_a_crashed_one(tmp_path, image_dir, vae_dir, monkeypatch):
    out = tmp_path / "shards"
    args = ["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
            "--batch-size", "1", "--device", "cpu", "--shard-size", "2", "--limit", "4"]
    groups = enc.shard_groups(enc.list_images(image_dir, 4), 2)  # a.png, b.jpg, broken.png, c.png in 2 shards
    readable = [[p for p in group if p != CORRUPT] for group in groups]  # one encode call per image
    real_encode, calls = enc.encode, []

    def crash_in_shard_1(vae, images):
        calls.append(len(images))
        if len(calls) == len(readable[0]) + 1:  # the first image of shard 1
            raise KeyboardInterrupt
        return real_encode(vae, images)

    monkeypatch.setattr(enc, "encode", crash_in_shard_1)
    with pytest.raises(KeyboardInterrupt):
        enc.main(args)
    assert (out / "shard-000000.tar").exists() and not (out / "shard-000001.tar.tmp").exists()  # removed on the way out
    assert not (out / "shard-000001.tar").exists()  # never a half shard under the final name
    with pytest.raises(DataError, match="did not finish"):
        LatentShards(str(out / "shard-000000.tar"))
    mtime = (out / "shard-000000.tar").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(enc, "encode", lambda vae, images: calls.append(len(images)) or real_encode(vae, images))
    manifest = enc.main(args)
    assert calls == [1] * len(readable[1])  # only shard 1's images
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtime
    assert not (out / "shard-000001.tar.tmp").exists()
    assert manifest["complete"] and manifest["images"] == 3 and manifest["count"] == 3
    assert [s["path"] for s in manifest["skipped"]] == [CORRUPT]  # remembered from the first run

    calls.clear()
    enc.main(args)
    assert calls == []  # everything finished: nothing encoded
    with pytest.raises(DataError, match="other settings.*resolution 16 -> 8"):
        enc.main([*args[:5], "8", *args[6:]])


def test_sigterm_during_an_encoding_leaves_no_temporary_shard(tmp_path, image_dir, vae_dir, monkeypatch, capsys):
    """SIGTERM (a job scheduler's stop) killed the encoder at once, leaving shard-NNNNNN.tar.tmp behind; it is
    now stopped as Ctrl-C is: the half shard removed, "interrupted", exit 143."""
    import signal

    out = tmp_path / "shards"
    args = ["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
            "--batch-size", "1", "--device", "cpu", "--shard-size", "2", "--limit", "4"]
    real_encode, calls = enc.encode, []

    def sigterm_in_shard_1(vae, images):
        calls.append(len(images))
        if len(calls) == 3:  # shard 0 holds a.png and b.jpg (broken.png is shard 1's): the first of shard 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real_encode(vae, images)

    monkeypatch.setattr(enc, "encode", sigterm_in_shard_1)
    unhandled = []  # what the encoder does not handle falls through to this (the default would end pytest)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: unhandled.append(signum))
    try:
        code = enc.cli(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM and not unhandled
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert (out / "shard-000000.tar").exists() and not list(out.glob("*.tmp"))


def test_a_latent_beyond_float16_stops_the_encoding_naming_the_image(tmp_path, image_dir, vae_dir, monkeypatch):
    real_encode = enc.encode

    def overflow(vae, images):
        mean, std = real_encode(vae, images)
        mean[-1, 0, 0, 0] = np.inf
        return mean, std

    monkeypatch.setattr(enc, "encode", overflow)
    with pytest.raises(DataError, match=r"^(a\.png|b\.jpg): the VAE returned non-finite latents"):
        enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--limit", "2",
                  "--out", str(tmp_path / "o"), "--device", "cpu"])


# --- LatentShards -------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_cover_each_sample_once_per_epoch(shards, world_size, workers):
    every = sorted(_read_samples(shards))
    for epoch in (0, 1):
        keys = [k for rank in range(world_size)
                for k in LatentShards(_pattern(shards), rank=rank, world_size=world_size, num_workers=workers,
                                      shuffle_buffer=4).epoch_keys(epoch)]
        assert sorted(keys) == every  # disjoint and complete


def test_epochs_are_reshuffled_and_ranks_agree_on_the_shard_order(shards):
    data = LatentShards(_pattern(shards), num_workers=0, shuffle_buffer=8)
    assert data.epoch_keys(0) != data.epoch_keys(1)
    assert data.epoch_keys(0) == LatentShards(_pattern(shards), num_workers=0, shuffle_buffer=8).epoch_keys(0)
    assert data.epoch_keys(0) != LatentShards(_pattern(shards), num_workers=0, shuffle_buffer=8,
                                              seed=1).epoch_keys(0)


def test_batch_is_a_draw_from_each_latent_distribution(shards):
    samples = _read_samples(shards)
    data = LatentShards(_pattern(shards), num_workers=0, shuffle_buffer=8)
    assert data.kind == "latent" and data.shape == (4, R // 2, R // 2)
    n = len(samples)
    keys = data.epoch_keys(0) + data.epoch_keys(1)
    start = 0
    for size in (5, n):  # the second batch runs past the end of epoch 0
        x = data.batch(size, torch.Generator().manual_seed(size))
        assert x.shape == (size, 4, R // 2, R // 2) and x.dtype == torch.float32
        mean = torch.stack([torch.from_numpy(samples[k]["mean"]) for k in keys[start:start + size]]).float()
        std = torch.stack([torch.from_numpy(samples[k]["std"]) for k in keys[start:start + size]]).float()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(size))
        torch.testing.assert_close(x, (mean + std * noise) * data.scaling_factor, rtol=0, atol=0)  # no shift
        start += size
    assert data.state_dict() == {"epoch": 1, "consumed": 5, "seed": 0}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_continues_identically(shards, workers):
    def loader():
        return LatentShards(_pattern(shards), num_workers=workers, shuffle_buffer=4, seed=3)

    data, g = loader(), torch.Generator().manual_seed(0)
    for _ in range(3):
        data.batch(7, g)  # 21 samples: into epoch 1 (18 per epoch)
    state = data.state_dict()
    assert state == {"epoch": 1, "consumed": 3, "seed": 3}
    expected = [data.batch(7, torch.Generator().manual_seed(i)) for i in range(4)]  # on into epoch 2

    resumed = loader()
    resumed.load_state_dict(state)
    for i, x in enumerate(expected):
        torch.testing.assert_close(resumed.batch(7, torch.Generator().manual_seed(i)), x, rtol=0, atol=0)
    assert resumed.state_dict() == data.state_dict()


def _damage(shards: Path, tmp_path: Path, which: dict[int, str]) -> Path:
    """A copy of the shards with shard k cut in half ("truncated"), replaced by "garbage", "short": a
    well-formed tar of its first sample only (as if cut at a member boundary), or "long": its samples, then shard
    0's (another shard copied over it, past its end), or "swapped": shard 0 itself (copied over it, the same length)."""
    out = tmp_path / "damaged"
    shutil.copytree(shards, out)
    for k, how in which.items():
        path = out / f"shard-{k:06d}.tar"
        data = path.read_bytes()
        if how == "swapped":
            shutil.copy(out / "shard-000000.tar", path)
        elif how == "long":
            with tarfile.open(path, "w") as long:
                for source in (io.BytesIO(data), out / "shard-000000.tar"):
                    with tarfile.open(fileobj=source) if isinstance(source, io.BytesIO) else tarfile.open(source) as tar:
                        for member in tar.getmembers():
                            long.addfile(member, tar.extractfile(member))
        elif how == "short":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar, tarfile.open(path, "w") as short:
                for member in tar.getmembers()[:4]:  # mean.npy, sha256.txt, src.txt, std.npy of one sample
                    short.addfile(member, tar.extractfile(member))
        else:
            path.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shards_are_skipped_with_a_warning_and_counted(shards, tmp_path, workers):
    damaged = _damage(shards, tmp_path, {1: "truncated", 2: "short", 3: "garbage"})
    data = LatentShards(_pattern(damaged), num_workers=workers, shuffle_buffer=4)
    with pytest.warns(UserWarning) as record:
        for _ in range(4):  # more than two epochs of what is left
            data.batch(8, torch.Generator().manual_seed(0))
    messages = " ".join(str(w.message) for w in record)
    assert messages.count("skipping damaged shard") == 3  # once per shard, not per epoch
    assert "shard-000001.tar (ReadError" in messages
    by_shard = {}
    for key, sample in _read_samples(shards).items():
        by_shard.setdefault(sample["shard"], set()).add(key)
    short = f"shard-000002.tar (ends after 1 of {len(by_shard['shard-000002.tar'])} samples; rerun the same encode command"
    assert "shard-000003.tar (ReadError" in messages and short in messages
    assert data.skipped_shards == 3 and data.epoch >= 2
    keys = set(data.epoch_keys(0))
    assert len(keys) == len(data.epoch_keys(0))  # no sample twice
    intact = by_shard["shard-000000.tar"] | by_shard["shard-000004.tar"]
    truncated = by_shard["shard-000001.tar"]
    assert len(keys & by_shard["shard-000002.tar"]) == 1  # the short shard's one sample is used
    assert not keys & by_shard["shard-000003.tar"]
    assert intact <= keys and keys & truncated != truncated  # the part before the cut at most

    strict = LatentShards(_pattern(damaged), num_workers=workers, shuffle_buffer=4, strict=True)
    with pytest.raises(DataError, match=r"shard-00000[123]\.tar: damaged shard"):
        for _ in range(3):
            strict.batch(8, torch.Generator())


def test_a_shard_longer_than_its_manifest_says_is_read_to_its_count_and_named(shards, tmp_path):
    """Another shard copied over the last one: it was read whole (shard 0's samples twice an epoch) and the warning
    said it "ends after 7 of 4 samples"."""
    damaged = _damage(shards, tmp_path, {4: "long"})
    data = LatentShards(str(damaged), num_workers=0, shuffle_buffer=4)
    with pytest.warns(UserWarning, match=r"shard-000004.tar \(holds more samples than the \d+ its manifest lists: "
                                         r"not the shard encoded there"):
        data.batch(data.count, torch.Generator().manual_seed(0))
    assert data.skipped_shards == 1
    keys = data.epoch_keys(0)
    assert sorted(keys) == sorted(LatentShards(str(shards), num_workers=0).epoch_keys(0))  # each once, as encoded


def test_a_shard_of_the_same_length_copied_over_another_is_skipped_before_any_of_its_samples(shards, tmp_path):
    """Shard 0 copied over shard 1 (same sample count, every checksum intact): its samples were read, so shard 0's
    came twice an epoch and shard 1's never. The manifest's first-sample checksum tells them apart."""
    sizes = {i["name"]: i["samples"] for i in json.loads((shards / "manifest.json").read_text())["shard_info"]}
    assert sizes["shard-000000.tar"] == sizes["shard-000001.tar"]  # the case a count cannot catch
    damaged = _damage(shards, tmp_path, {1: "swapped"})
    data = LatentShards(str(damaged), num_workers=0, shuffle_buffer=4)
    with pytest.warns(UserWarning, match=r"shard-000001.tar \(its first sample is not the one its manifest lists, so none "
                                         r"of it is read: not the shard encoded there"):
        data.batch(data.count, torch.Generator().manual_seed(0))
    assert data.skipped_shards == 1
    keys = data.epoch_keys(0)
    shard_1 = {k for k, v in _read_samples(shards).items() if v["shard"] == "shard-000001.tar"}
    assert sorted(keys) == sorted(set(LatentShards(str(shards), num_workers=0).epoch_keys(0)) - shard_1)


def _flip_in_first_sample(path: Path, member_suffix: str) -> None:
    """Flips the last byte of the first sample's member ending in `member_suffix`, in place (the same length)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".")[0]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            if member.name == f"{first_key}.{member_suffix}":
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("part", ["mean.npy", "sha256.txt"])
def test_a_damaged_first_sample_still_tells_a_shard_copied_over_from_its_own(shards, tmp_path, part):
    """The first-sample check needs one intact part: a swapped shard whose first sample's data (or stored
    checksum) is damaged was read whole; the shard encoded there with the same damage loses that sample only."""
    damaged = _damage(shards, tmp_path, {1: "swapped"})
    _flip_in_first_sample(damaged / "shard-000001.tar", part)
    data = LatentShards(str(damaged), num_workers=0, shuffle_buffer=0)
    with pytest.warns(UserWarning, match=r"shard-000001.tar \(its first sample is not the one its manifest lists"):
        data.batch(data.count, torch.Generator().manual_seed(0))
    assert (data.skipped_shards, data.skipped_samples) == (1, 0)
    own = tmp_path / "own"
    shutil.copytree(shards, own)
    _flip_in_first_sample(own / "shard-000001.tar", part)
    data = LatentShards(str(own), num_workers=0, shuffle_buffer=0)
    with pytest.warns(UserWarning, match="damaged sample"):
        data.batch(data.count, torch.Generator().manual_seed(0))
    assert (data.skipped_shards, data.skipped_samples) == (0, 1)


def test_a_rerun_of_encode_writes_again_a_shard_copied_over_or_cut_short_also_under_an_older_manifest(
        shards, tmp_path, image_dir, vae_dir, capsys):
    """The loader's advice for a shard that is not the one encoded there is to rerun the same encode command; that
    rerun reused it (same images, file present), every time. Also under a manifest from before the per-shard
    checks, which the rerun adds, so that the loader checks them from then on."""
    out = _damage(shards, tmp_path, {1: "swapped", 2: "short"})  # shard 0 over 1; 2 cut after its first sample
    manifest = json.loads((out / "manifest.json").read_text())
    for info in manifest["shard_info"]:  # as an older stmd_fast wrote them
        del info["first_sha256"], info["bytes"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
              "--batch-size", "1", "--device", "cpu", "--flip", "--shard-size", str(SHARD_SIZE), "--workers", "2"])
    err = capsys.readouterr().err
    for k in range(5):
        assert (f"shard-00000{k}.tar is not the shard written here" in err) is (k in (1, 2)), err
        assert (out / f"shard-00000{k}.tar").read_bytes() == (shards / f"shard-00000{k}.tar").read_bytes() or \
            _tar_samples(out / f"shard-00000{k}.tar") == _tar_samples(shards / f"shard-00000{k}.tar")
    assert json.loads((out / "manifest.json").read_text())["shard_info"] == \
        json.loads((shards / "manifest.json").read_text())["shard_info"]  # the checks of a fresh encode, again
    data = LatentShards(str(out), num_workers=0, shuffle_buffer=0)
    assert sorted(data.epoch_keys(0)) == sorted(LatentShards(str(shards), num_workers=0).epoch_keys(0))


def _tar_samples(path: Path) -> dict[str, bytes]:
    """A shard's members by name (their bytes): equal for two writes of one shard whose tar headers differ in time."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_shard_named_twice_in_data_is_refused(shards, tmp_path):
    """'a::a', or a pattern and a shard it already matches: the shard's samples were read twice an epoch."""
    with pytest.raises(DataError, match=r"names the shard .*shard-000001.tar twice: its samples would be read twice"):
        LatentShards(f"{_pattern(shards)}::{shards / 'shard-000001.tar'}")
    (tmp_path / "link.tar").symlink_to(shards / "shard-000000.tar")
    with pytest.raises(DataError, match=r"names the shard .*shard-000000.tar twice \(also as .*link.tar\)"):
        LatentShards(f"{tmp_path / 'link.tar'}::{_pattern(shards)}")


def test_folders_joined_by_double_colon_read_every_shard_of_each(shards, tmp_path):
    """'enc_a::enc_b' (two folders encode wrote, encoded alike): each folder's manifest names its shards. It was
    read as two shard files, 'missing', though both folders were there."""
    other = tmp_path / "enc[v2]"  # brackets: a folder's name, not a glob
    shutil.copytree(shards, other)
    from stmd_fast.config import preset_for_data

    assert preset_for_data(f"{shards}::{other}") == "latent"  # with no --preset too
    joined = LatentShards(f"{shards}::{other}", num_workers=0, shuffle_buffer=0)
    assert joined.urls == LatentShards(str(shards)).urls + LatentShards(str(other)).urls
    assert sorted(joined.epoch_keys(0)) == sorted(LatentShards(str(shards), num_workers=0).epoch_keys(0) * 2)
    with pytest.raises(DataError, match=r"names the shard .*shard-000000.tar twice"):
        LatentShards(f"{shards}::{shards / 'shard-000000.tar'}")
    braced = tmp_path / "enc{1,2}"  # a part is a folder's name before it is a pattern, in a list as alone
    other.rename(braced)
    assert LatentShards(f"{shards}::{braced}").urls == joined.urls[:5] + LatentShards(str(braced)).urls
    for empty in (f"{shards}::", f"{shards}::::{braced}"):  # '' was the current folder
        with pytest.raises(DataError, match="an empty part between '::'"):
            LatentShards(empty)
    with pytest.raises(DataError, match=f"--data {tmp_path / 'moved'}: no such folder"):  # not "a shard missing"
        LatentShards(f"{shards}::{tmp_path / 'moved'}")
    from stmd_fast.train import data_gone

    assert data_gone(f"{shards}::{tmp_path / 'moved'}") and not data_gone(f"{shards}::{braced}")


def test_all_shards_damaged_raises_instead_of_hanging(shards, tmp_path):
    damaged = _damage(shards, tmp_path, {k: "garbage" for k in range(5)})
    data = LatentShards(_pattern(damaged), num_workers=2)
    outcome = []

    def draw():
        try:
            data.batch(4, torch.Generator())
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    thread = threading.Thread(target=draw, daemon=True)
    with pytest.warns(UserWarning):
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive(), "batch() hung on shards without a readable sample"
    assert isinstance(outcome[0], DataError) and "no readable samples in the 5 shards" in str(outcome[0])


# --- bad input ----------------------------------------------------------------------------------


def test_a_folder_without_images_fails_before_the_vae_loads(tmp_path, vae_dir, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    monkeypatch.setattr(enc, "load_vae", lambda *a: pytest.fail("the VAE was loaded"))
    with pytest.raises(DataError, match="no images under"):
        enc.main(["--images", str(tmp_path / "empty"), "--vae", str(vae_dir), "--out", str(tmp_path / "o"),
                  "--device", "cpu"])


def test_a_resolution_of_odd_latents_is_refused_before_encoding(tmp_path, image_dir, vae_dir):
    """--resolution 72 with the SD VAE: 9x9 latents, encoded for hours, then refused by the trainer (no DiT patch
    divides them). The tiny VAE downsamples 2x: 18 pixels give 9x9."""
    with pytest.raises(DataError, match=r"--resolution 18 gives 9x9 latents .* pick a multiple of 4 \(e.g. 16\)"):
        enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", "18", "--out",
                  str(tmp_path / "o"), "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_a_resolution_that_cannot_fit_in_memory_is_refused_before_the_vae_loads(tmp_path, image_dir, monkeypatch):
    """--resolution 100000: a MemoryError traceback from inside PIL's resize, or the process killed by the
    kernel, after the VAE had loaded. The VAE here is not even there: the check comes first."""
    import stmd_fast.devices as devices

    monkeypatch.setattr(devices, "physical_memory", lambda: 16 * 2**30)
    argv = ["--images", str(image_dir), "--vae", str(tmp_path / "no-vae"), "--out", str(tmp_path / "o")]
    with pytest.raises(DataError, match=r"--resolution 8192 with --batch-size 32: two batches of images take 51.5 GB"
                                        r" in memory, more than half of this machine's 17.2 GB .* lower --batch-size"):
        enc.main([*argv, "--resolution", "8192"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match="no-vae: no such folder"):  # a batch that fits goes on, to the VAE here
        enc.main([*argv, "--resolution", "8192", "--batch-size", "4"])


def _unet_folder(path: Path) -> Path:
    """A pipeline's unet/ folder: a diffusers model folder, and no VAE (diffusers loaded it as one, its
    weights initialised at random, and the encoding failed later with a traceback)."""
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                layers_per_block=1).save_pretrained(path)
    return path


@pytest.mark.parametrize("vae", ["missing-folder", "images-folder", "unet-folder"])
def test_a_vae_that_does_not_load_is_a_data_error(tmp_path, image_dir, vae):
    path = {"missing-folder": lambda: tmp_path / "nothing here", "images-folder": lambda: image_dir,  # no config.json
            "unet-folder": lambda: _unet_folder(tmp_path / "unet")}[vae]()
    # a missing folder is said without asking the hub (whose retries take a minute offline)
    expected = {"missing-folder": "no such folder; check the path",
                "images-folder": "could not load an AutoencoderKL.*save_pretrained",
                "unet-folder": r"weights do not fit an AutoencoderKL \(\d+ of the AutoencoderKL's weights are not in "
                               r"it"}[vae]
    with pytest.raises(DataError, match=expected):
        enc.main(["--images", str(image_dir), "--vae", str(path), "--out", str(tmp_path / "o" / "new" / "shards"),
                  "--device", "cpu"])
    assert not (tmp_path / "o").exists()  # the --out it made is removed again, with the folders made for it


def test_a_vae_with_per_channel_latent_statistics_is_refused_before_encoding(tmp_path, image_dir, vae_dir):
    """latents_mean / latents_std (Playground v2.5's VAE) were ignored: its latents trained several times off
    scale, without a word, and its fingerprint was the same as without them."""
    import json

    path = tmp_path / "normalised-vae"
    shutil.copytree(vae_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "latents_mean": [1, -2, 0.5, 3],
                                                  "latents_std": [8, 6, 6.5, 5]}))
    with pytest.raises(DataError, match="sets latents_mean and latents_std .* which stmd_fast does not apply"):
        enc.main(["--images", str(image_dir), "--vae", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_a_hub_id_that_does_not_load_is_one_line_without_a_library_warning(tmp_path, image_dir):
    """diffusers passes huggingface_hub a deprecated argument: its UserWarning came before our one line."""
    result = subprocess.run([sys.executable, "-m", "stmd_fast.data.encode", "--images", str(image_dir), "--vae",
                             "someorg/no-such-vae", "--out", str(tmp_path / "o"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    # the cause, not diffusers' "does not appear to have a file named config.json" (its chain holds the cause)
    assert lines[0] == ("error: --vae someorg/no-such-vae: HF_HUB_OFFLINE is set and the VAE is not in the local "
                        "Hugging Face cache: unset it to download the VAE, or pass a folder saved with save_pretrained")


def test_an_unreachable_hub_is_said_from_the_errors_chain():
    """diffusers says "does not appear to have a file named config.json"; the cause is further down its chain."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from stmd_fast.data.vae import load_failure

    def chained(*errors):
        for outer, inner in zip(errors, errors[1:]):
            outer.__cause__ = inner
        return errors[0]

    error = chained(OSError("someorg/vae does not appear to have a file named config.json."),
                    LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
                    ConnectionError("Cannot reach https://huggingface.co/someorg/vae/resolve/main/config.json: "
                                    "[Errno -2] Name or service not known"))
    said = load_failure(error)
    assert said.startswith("the Hugging Face hub could not be reached from this machine ([Errno -2] Name or service "
                           "not known), and the VAE is not in the local cache")
    assert "config.json" not in said and "https://" not in said
    assert load_failure(OSError("bad folder")).startswith("could not load an AutoencoderKL (bad folder)")


def test_shards_of_another_vae_or_resolution_are_refused(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    LatentShards(_pattern(shards), expect_vae=manifest["vae"], expect_resolution=R)  # the matching preset
    with pytest.raises(DataError, match=f"encoded with VAE .* at resolution {R}, not with the VAE "
                                        f"stabilityai/sd-vae-ft-ema \\(--vae, or the preset's\\): train with --preset "
                                        f"latent .* or pass --vae {re.escape(manifest['vae'])}"):
        LatentShards(_pattern(shards), expect_vae="stabilityai/sd-vae-ft-ema")
    with pytest.raises(DataError, match=f"at resolution {R}, and this preset trains at 256: re-encode .*"
                                        f"--resolution 256"):
        LatentShards(_pattern(shards), expect_resolution=256)
    # a --vae folder that is not there: said so, not taken for another VAE (whose advice was to re-encode with it)
    with pytest.raises(DataError, match=r"VAE \./gone: no such folder; check the path \(the shards were encoded "
                                        f"with {re.escape(manifest['vae'])}"):
        LatentShards(_pattern(shards), expect_vae="./gone")


def test_a_glob_names_the_shards_like_a_brace_pattern(shards):
    assert LatentShards(str(shards / "shard-*.tar"), num_workers=0).urls == \
        LatentShards(_pattern(shards), num_workers=0).urls
    with pytest.raises(DataError, match="the pattern matches no file"):
        LatentShards(str(shards / "shard-9*.tar"))


@pytest.mark.parametrize("name", ["enc[v1]", "odd{a,b}", "star*"])
def test_a_shard_folder_whose_name_looks_like_a_pattern_is_read_as_a_folder(shards, tmp_path, name):
    """encode wrote into enc[v1] and said "train with --data enc[v1]", which then failed: the folder's name went
    through the brace and glob expansion meant for patterns ("the pattern matches no file")."""
    folder = tmp_path / name
    shutil.copytree(shards, folder)
    data = LatentShards(str(folder), num_workers=0)
    assert data.urls == [str(folder / Path(u).name) for u in LatentShards(str(shards), num_workers=0).urls]
    assert len(set(data.epoch_keys(0))) == data.count


def test_a_shard_the_manifest_does_not_list_is_refused(shards, tmp_path):
    """A shard left by an earlier, larger encoding: its samples would be read beside their new copies."""
    stale = tmp_path / "stale"
    shutil.copytree(shards, stale)
    shutil.copy(stale / "shard-000000.tar", stale / "shard-000005.tar")
    with pytest.raises(DataError, match="shard-000005.tar: not a shard of the encoding its folder's manifest"):
        LatentShards(str(stale / "shard-{000000..000005}.tar"))
    assert len(LatentShards(str(stale)).urls) == 5  # the folder: its manifest's shards alone


@pytest.mark.parametrize("key", ["shift_factor", "shard_info"])
def test_a_manifest_missing_a_key_is_a_data_error(shards, tmp_path, key):
    edited = tmp_path / "edited"
    shutil.copytree(shards, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    del manifest[key]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"manifest.json: lacks {key} .*rerun the stmd_fast.data.encode command"):
        LatentShards(str(edited))


@pytest.mark.parametrize("key, value", [("scaling_factor", "abc"), ("shard_info", None), ("latent_shape", [4, 8]),
                                        ("shard_info", [{"name": "shard-000000.tar", "samples": -1}]),
                                        ("resolution", 0), ("shift_factor", float("nan"))])
def test_a_manifest_holding_a_wrong_value_is_a_data_error(shards, tmp_path, key, value):
    """Hand-edited values once failed deep inside (float('abc'), iterating None): one line naming the key."""
    edited = tmp_path / "edited"
    shutil.copytree(shards, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest[key] = value
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"manifest.json: holds no valid {key} .*rerun the stmd_fast.data.encode"):
        LatentShards(str(edited))


def test_every_sample_of_the_wrong_shape_names_the_reason(shards, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(shards, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["latent_shape"] = [4, 16, 16]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"no readable samples .*shapes \(4, 8, 8\)"):
        LatentShards(str(edited), num_workers=0).batch(4, torch.Generator().manual_seed(0))


def test_a_short_epoch_is_read_without_workers_unless_asked(shards):
    """Workers restart every epoch; for the few samples of a short one the main process reads faster.
    An explicit count is kept (and the stream is the one num_workers=0 gives)."""
    auto, inline = LatentShards(str(shards)), LatentShards(str(shards), num_workers=0)
    assert auto.count == json.loads((shards / "manifest.json").read_text())["count"] < 2048
    assert auto.num_workers == 0 and auto.epoch_keys(0) == inline.epoch_keys(0)
    assert LatentShards(str(shards), num_workers=2).num_workers == 2


def test_encode_into_a_log_file_writes_a_line_per_shard(tmp_path, image_dir, vae_dir):
    proc = subprocess.run([sys.executable, "-m", "stmd_fast.data.encode", "--images", str(image_dir), "--vae",
                           str(vae_dir), "--resolution", str(R), "--out", str(tmp_path / "o"), "--device", "cpu",
                           "--shard-size", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("encode:")] == [
        f"encode: shard-00000{k}.tar written ({k + 1} of 3 shards)" for k in range(3)]


def test_missing_shards_or_manifest_are_data_errors(shards, tmp_path):
    with pytest.raises(DataError, match="5 of 10 shard files are missing, the first: .*shard-000005.tar"):
        LatentShards(_pattern(shards, 10))
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(shards / "shard-000000.tar", lone)
    with pytest.raises(DataError, match="no manifest.json"):
        LatentShards(str(lone / "shard-000000.tar"))
    shutil.copy(Path(__file__), lone / "x.png")  # any file named as an image: a folder of images
    with pytest.raises(DataError, match="holds images, not latent shards: encode them first"):
        LatentShards(str(lone))
    with pytest.raises(DataError, match=r"5 shards cannot be split over 8 processes .*re-encode with --shard-size \d+"):
        LatentShards(_pattern(shards), rank=0, world_size=8)


def test_shards_that_split_unevenly_over_the_processes_get_a_note(shards, capsys):
    """Each rank counts its own epochs: with unequal shares they drift apart and some samples are drawn more
    often than others for a while. Said once (rank 0), with the shard size that evens it out."""
    LatentShards(_pattern(shards), rank=0, world_size=2)  # 5 shards over 2 processes
    assert re.search(r"note: 5 shards of \d+-\d+ samples give each of the 2 processes \d+-\d+ samples an epoch.*"
                     r"--shard-size 1 evens it out", capsys.readouterr().err)  # not "1 (or less)": 0 is no size
    LatentShards(_pattern(shards), rank=1, world_size=2)
    LatentShards(_pattern(shards), rank=0, world_size=1)
    assert capsys.readouterr().out == ""  # once per job; one process has nothing to split


@pytest.mark.parametrize("sizes, world_size, note", [
    ([1000] * 202 + [599], 8, False),  # CelebA's 202,599 images in shards of 1000: a partial last shard is no matter
    ([3] * 21 + [1], 2, False),
    ([4, 4, 2, 4, 4], 2, True),        # 3 shards to one process, 2 to the other
    ([100] * 8 + [10] * 8, 8, True),   # even counts, uneven sizes
])
def test_the_uneven_split_note_is_for_shares_more_than_a_tenth_apart(sizes, world_size, note):
    """The note once fired for any partial last shard (nearly every real data set) and suggested a shard size
    the shards already had; a shard size it suggests brings the shares within 10%."""
    from stmd_fast.data.latents import epoch_shares

    fewest, most = epoch_shares(sizes, world_size)
    assert (fewest < 0.9 * most) == note
    if note:
        images = sum(sizes)
        suggested = max(1, images // (20 * world_size))
        even = [suggested] * (images // suggested) + ([images % suggested] if images % suggested else [])
        fewest, most = epoch_shares(even, world_size)
        assert fewest >= 0.9 * most


def test_a_shard_of_unreadable_images_only_is_left_out(tmp_path, image_dir, vae_dir):
    """A shard whose images were all unreadable holds no sample: a process dealt it had an epoch of nothing
    and stopped the run ("no readable samples ... re-encode them"), which re-encoding cannot fix."""
    out = tmp_path / "shards"
    enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
              "--batch-size", "4", "--device", "cpu", "--shard-size", "1"])
    infos = json.loads((out / "manifest.json").read_text())["shard_info"]
    assert len(infos) == 10 and sum(info["samples"] == 0 for info in infos) == 1  # broken.png's
    for rank in range(9):
        loader = LatentShards(str(out), rank=rank, world_size=9, num_workers=0)
        for _ in range(3):  # several epochs of one shard each
            assert loader.batch(1, torch.Generator().manual_seed(rank)).shape == (1, 4, R // 2, R // 2)


def test_a_brace_pattern_under_the_home_folder_is_expanded(shards, monkeypatch):
    monkeypatch.setenv("HOME", str(shards.parent))
    assert LatentShards(f"~/{shards.name}/shard-{{000000..000004}}.tar").count == LatentShards(str(shards)).count


# --- benchmark ----------------------------------------------------------------------------------


def test_data_benchmark_smoke(shards):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), _pattern(shards), "--smoke",
                           "--no-save"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "data"
    assert result["results"] and all(row["samples_per_s"] > 0 for row in result["results"])


def test_data_benchmark_measures_each_worker_count_the_shards_allow_once(shards):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), _pattern(shards, 1), "--workers",
                           "0,1,2,4", "--seconds", "0.2", "--warmup", "0", "--no-save"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 shard(s) feed at most 1 worker(s): measuring 0,1 workers instead of 0,1,2,4" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row["workers"] for row in result["results"]] == [0, 1]
    # the samples of the shard given, not the manifest's whole set (which it reported)
    from stmd_fast.data.latents import LatentShards

    one_shard = LatentShards(_pattern(shards, 1), num_workers=0).count
    assert result["samples"] == one_shard < json.loads((shards / "manifest.json").read_text())["count"]


def test_data_benchmark_says_a_repeated_worker_count_is_measured_once(shards):
    """A count given twice was blamed on the shard limit ("1 shard(s) feed at most ...")."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), _pattern(shards), "--workers",
                           "0,0", "--seconds", "0.2", "--warmup", "0", "--no-save"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: a count given twice is measured once: measuring 0 workers instead of 0,0" in proc.stdout


# --- integrity: damaged bytes, full disk, bad --out --------------------------------------------


def _overwrite(shard: Path, offset: int, n: int = 16) -> None:
    data = bytearray(shard.read_bytes())
    data[offset:offset + n] = bytes((b ^ 0xA5) for b in data[offset:offset + n])
    shard.write_bytes(bytes(data))


def test_bytes_overwritten_inside_a_sample_skip_that_sample_alone(shards, tmp_path):
    """16 bytes flipped in the middle of one sample's mean.npy: the tar still reads, the values parse
    and are finite, and only the per-sample SHA-256 tells. That sample is skipped and counted; every
    other sample is read unchanged; strict mode stops naming the shard and the sample."""
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    shard = damaged / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mean.npy"))
    _overwrite(shard, member.offset_data + member.size // 2)
    key = member.name.split(".")[0]
    data = LatentShards(_pattern(damaged), num_workers=0, shuffle_buffer=0)
    keys = data.epoch_keys(0)
    assert key not in keys and len(keys) == len(_read_samples(shards)) - 1
    with pytest.warns(UserWarning, match=f"skipping damaged sample {key} of .*shard-000001.tar .fails its SHA-256"):
        data.batch(2 * len(keys), torch.Generator())  # through epoch 0 and into epoch 1
    assert data.skipped_samples == 1 and data.skipped_shards == 0  # counted once over the two epochs
    strict = LatentShards(_pattern(damaged), num_workers=0, shuffle_buffer=0, strict=True)
    with pytest.raises(DataError, match=f"shard-000001.tar: sample {key} is damaged .*--strict-data"):
        for _ in range(3):
            strict.batch(8, torch.Generator())


def test_bytes_overwritten_anywhere_never_yield_a_changed_sample(shards, tmp_path):
    """Wherever 16 bytes are overwritten in a shard (tar headers, .npy headers, data, checksums), every
    sample the reader yields equals the original bit for bit; the damage shows as skipped samples or a
    skipped shard, never as wrong latents."""
    from stmd_fast.data.latents import read_shards

    original = _read_samples(shards)
    shard = shards / "shard-000002.tar"
    size = shard.stat().st_size
    expected = {str(tmp_path / "s.tar"): sum(1 for s in original.values() if s["shard"] == shard.name)}
    shape = tuple(json.loads((shards / "manifest.json").read_text())["latent_shape"])
    for offset in range(0, size - 16, 97):
        copy = tmp_path / "s.tar"
        shutil.copy(shard, copy)
        _overwrite(copy, offset)
        records = list(read_shards([str(copy)], shape, expected))
        for record in records:
            if "key" in record:
                np.testing.assert_array_equal(record["mean"], original[record["key"]]["mean"])
                np.testing.assert_array_equal(record["std"], original[record["key"]]["std"])
        if all("key" in r for r in records):  # nothing flagged: the bytes hit tar padding or a file name's
            assert len(records) == expected[str(copy)], f"offset {offset}: a sample vanished unflagged"


def test_encode_refuses_an_out_that_is_a_file_before_the_vae_loads(tmp_path, image_dir, vae_dir, monkeypatch):
    monkeypatch.setattr(enc, "load_vae", lambda *a: pytest.fail("the VAE was loaded"))
    blocker = tmp_path / "shards"
    blocker.write_text("a file")
    with pytest.raises(DataError, match=f"--out {blocker} is a file: pass a folder"):
        enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--out", str(blocker), "--device", "cpu"])
    with pytest.raises(DataError, match="cannot write to --out"):
        enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--out", str(blocker / "below"),
                  "--device", "cpu"])
    assert blocker.read_text() == "a file"


def test_encode_into_a_read_only_folder_is_refused_before_the_vae_loads(image_dir, vae_dir, monkeypatch,
                                                                        readonly_dir):
    monkeypatch.setattr(enc, "load_vae", lambda *a: pytest.fail("the VAE was loaded"))
    with pytest.raises(DataError, match="cannot write to --out .*choose a writable folder"):
        enc.main(["--images", str(image_dir), "--vae", str(vae_dir), "--out", str(readonly_dir / "shards"),
                  "--device", "cpu"])


def test_encode_bad_input_exits_2_with_one_line_like_every_command(tmp_path, vae_dir, capsys):
    assert enc.cli(["--images", str(tmp_path / "missing"), "--vae", str(vae_dir), "--out", str(tmp_path / "o"),
                    "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "missing") in err and len(err.strip().splitlines()) == 1


def test_encode_on_a_full_disk_is_one_line_keeps_finished_shards_and_resumes(tmp_path, image_dir, vae_dir,
                                                                             monkeypatch, capsys):
    """The disk fills while shard 1 is written: a DataError (one line, the __main__ prints it) naming the
    shard, no partial shard or temporary file left, shard 0 kept; the rerun encodes only the rest."""
    out = tmp_path / "shards"
    args = ["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
            "--batch-size", "1", "--device", "cpu", "--shard-size", "2", "--limit", "4"]
    real_open = open
    opened = []

    class FullDisk(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[:10])
            raise OSError(28, "No space left on device")

    def full_second_shard(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith("shard-000001.tar.tmp"):
            opened.append(path)
            return FullDisk(path, "w")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(enc, "open", full_second_shard, raising=False)
    with pytest.raises(DataError) as info:
        enc.main(args)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and opened
    assert "shard-000001.tar: No space left on device" in message and "the 1 shards written before are kept" in message
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    # the command line: one line on stderr, exit 1 (a failure, as a full disk is for every command)
    capsys.readouterr()
    assert enc.cli(args) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("error: could not write")  # the notes: notes.txt left out
    monkeypatch.undo()
    manifest = enc.main(args)
    assert manifest["complete"] and manifest["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert "encode: 1 of 2 shards reused" in capsys.readouterr().out  # the rerun says what it kept


def test_model_load_vae_loads_the_folder_it_is_given(monkeypatch):
    """Model.load_vae(vae) after a decoder is loaded: the VAE's new place is loaded, not the old one kept;
    without an argument (or the same folder) the loaded one is reused."""
    import stmd_fast.data.vae as vae_module
    from stmd_fast.checkpoint import Model

    loads = []

    def fake_decoder(folder, *args, **kwargs):
        loads.append(folder)
        return lambda z, batch: folder

    monkeypatch.setattr(vae_module, "latent_decoder", fake_decoder)
    latent = {"vae": "/old", "scaling_factor": 1.0, "shift_factor": 0.0, "resolution": 32}
    model = Model(torch.nn.Linear(2, 2), "stmd", (4, 4, 4), "latent", {"latent": latent})
    assert model.load_vae()(None, 1) == "/old"
    assert model.load_vae("/new")(None, 1) == "/new"
    assert model.load_vae()(None, 1) == "/new" and model.load_vae("/new")(None, 1) == "/new"
    assert loads == ["/old", "/new"]


def test_a_rerun_after_the_vae_was_replaced_in_its_folder_is_refused(tmp_path, image_dir):
    """Shards are reused by their settings, the VAE named by its path: a VAE retrained or replaced in the same
    folder once reused every old shard and wrote the new VAE's scaling factor into the manifest (latents 2.7x
    off their scale). The manifest keeps the VAE's weights' SHA-256, and a rerun with another VAE is refused."""
    vae_dir, out = tmp_path / "vae", tmp_path / "shards"
    _tiny_vae().save_pretrained(vae_dir)
    args = ["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
            "--batch-size", "4", "--device", "cpu", "--shard-size", "4", "--limit", "4"]
    first = enc.main(args)
    assert enc.main(args)["vae_sha256"] == first["vae_sha256"]  # the same VAE: reused
    replaced = _tiny_vae()
    replaced.register_to_config(scaling_factor=0.5)  # a VAE of another scale, in the same folder
    replaced.save_pretrained(vae_dir)
    with pytest.raises(DataError, match=f"{re.escape(str(out))} holds shards encoded with another VAE"):
        enc.main(args)
    assert json.loads((out / "manifest.json").read_text())["scaling_factor"] == first["scaling_factor"]


def test_encode_says_how_many_images_it_enlarged(tmp_path, image_dir, vae_dir, capsys):
    """As the pixel loader does: a tiny image upscaled to --resolution adds only blur (e.jpeg is 12x9, R = 16),
    counted for shards reused from an earlier run too."""
    args = ["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(tmp_path / "o"),
            "--batch-size", "4", "--device", "cpu", "--shard-size", "4"]
    for _ in range(2):  # encoded, then every shard reused
        enc.main(args)
        assert "note: 1 of the 9 images are smaller than --resolution 16 (shorter side)" in capsys.readouterr().err


def test_a_resume_on_shards_of_another_count_says_so(shards, tmp_path, capsys):
    """config.json recorded no sample count for latent shards (data_count null), so a resume on a
    re-encoded, larger set went on without the note image folders and arrays get."""
    from stmd_fast.train import main as train

    run = tmp_path / "run"
    flags = ["--data", str(shards), "--dit", "DiT-S/2", "--batch-size", "4", "--sample-every", "0", "--device", "cpu",
             "--out", str(run)]
    assert train([*flags, "--steps", "1"]) == 0
    config = json.loads((run / "config.json").read_text())
    total = sum(info["samples"] for info in json.loads((shards / "manifest.json").read_text())["shard_info"])
    assert config["data_count"] == total
    config["data_count"] = total - 3  # as if the run had trained on an encoding of three images fewer
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert train([*flags, "--steps", "2", "--resume"]) == 0
    assert f"now holds {total} samples, where the run was trained on {total - 3}" in capsys.readouterr().err


def test_paths_given_with_a_leading_tilde_are_under_the_home_folder(tmp_path, image_dir, vae_dir, monkeypatch):
    """The shell leaves ~ as typed after = (--images=~/photos) or in quotes: encode found the images under the home
    folder (list_images expanded it) but read each one from the literal path, failed them all, and made a folder
    named ~ holding an empty shard. Every command's flags now take ~ as the home folder."""
    import shutil

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    shutil.copytree(image_dir, home / "photos")
    shutil.copytree(vae_dir, home / "vae")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    enc.main(["--images=~/photos", "--vae=~/vae", "--resolution", str(R), "--out=~/shards", "--device", "cpu",
              "--shard-size", "4"])
    assert json.loads((home / "shards" / "manifest.json").read_text())["count"] == len(IMAGES)
    assert list(cwd.iterdir()) == []


def test_a_second_encode_into_a_busy_out_is_refused_and_leftovers_of_a_killed_one_are_removed(tmp_path, image_dir,
                                                                                              vae_dir, monkeypatch):
    """Two encodes into one --out renamed each other's shard-N.tar.tmp away and left shards of two resolutions under
    one manifest; a killed encode's temporary files stayed for good."""
    from stmd_fast.files import run_lock

    out = tmp_path / "shards"
    args = ["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
            "--device", "cpu"]
    out.mkdir()
    with run_lock(out, enc.ENCODE_LOCK, "another encode command"):  # as a live encode holds it
        monkeypatch.setattr(enc, "load_vae", lambda *a: pytest.fail("the VAE was loaded"))
        with pytest.raises(DataError, match=f"{out} is in use by another encode command"):
            enc.main(args)
    monkeypatch.undo()
    (out / "shard-000007.tar.tmp").write_bytes(b"half a shard")
    (out / ".tmp-999999-manifest.json").write_text("{")
    enc.main(args)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".tmp-*")) and not (out / enc.ENCODE_LOCK).exists()
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_encode_on_a_file_system_without_locks_is_one_line(tmp_path, image_dir, vae_dir, monkeypatch, capsys):
    import contextlib
    import errno

    @contextlib.contextmanager
    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")
        yield

    monkeypatch.setattr(enc, "run_lock", no_locks)
    assert enc.cli(["--images", str(image_dir), "--vae", str(vae_dir), "--resolution", str(R), "--out",
                    str(tmp_path / "shards"), "--device", "cpu"]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and "cannot lock" in err[0] and "No locks available" in err[0] and "file locks" in err[0]
    assert not (tmp_path / "shards").exists()  # made for this command, removed again


def test_reading_shards_leaves_the_global_generator_alone(shards):
    """The loader drew its base seed from torch's global generator, which dropout's masks come from (and a
    checkpoint keeps): a resumed run starts an iterator mid-epoch, so every later mask differed from the
    uninterrupted run's (latent runs with --dropout did not resume bit-identically)."""
    data = LatentShards(str(shards), num_workers=0, shuffle_buffer=4)
    before = torch.get_rng_state()
    for _ in range(3):  # across an epoch's start
        data.batch(data.count, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
