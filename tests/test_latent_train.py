"""The celeba-latent path end to end on tiny stand-ins: images -> VAE shards -> DiT training
-> checkpoint -> samples decoded to images; and the preset's checks on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmd_fast import config, load_checkpoint
from stmd_fast.config import TrainConfig
from stmd_fast.data import encode as enc
from stmd_fast.models import NetConfig
from stmd_fast.sample import main as sample_main
from stmd_fast.train import main as train_main
from stmd_fast.train import train
from conftest import assert_one_line_error

R = 16  # image resolution of the stand-in shards: latents (4, 8, 8) with the tiny VAE
TINY_DIT = NetConfig(kind="dit", width=32, depth=1, heads=2, patch_size=4, time_freqs=16)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=R)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vae_dir) -> str:
    images = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("shards")
    enc.main(["--images", str(images), "--vae", str(vae_dir), "--resolution", str(R), "--out", str(out),
              "--device", "cpu", "--shard-size", "3"])
    return str(out / "shard-{000000..000003}.tar")


@pytest.fixture
def at_test_resolution(monkeypatch):
    """The preset expects 256-pixel shards; the stand-ins are 16 pixels."""
    monkeypatch.setitem(config.LATENT_RESOLUTION, "celeba-latent", R)


def tiny_config(shards, vae_dir, out, **overrides) -> TrainConfig:
    settings = dict(preset="celeba-latent", data=shards, vae=str(vae_dir), net=TINY_DIT, batch_size=4, steps=4,
                    lr=1e-3, ckpt_every=2, log_every=1, sample_every=0, data_workers=0, device="cpu", out=str(out))
    settings.update(overrides)
    return TrainConfig(**settings)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dit_trains_from_shards_and_samples_decode_to_images(shards, vae_dir, tmp_path, at_test_resolution):
    run = tmp_path / "run"
    ckpt = train(tiny_config(shards, vae_dir, run))
    assert len(losses(run)) == 4 and all(np.isfinite(losses(run)))
    grid = Image.open(run / "samples" / "step_00000004.png")
    assert grid.size == (8 * (R + 1) + 1,) * 2  # 64 decoded R x R images, 8 x 8 with 1-pixel padding

    model = load_checkpoint(ckpt)
    assert model.data_kind == "latent" and model.data_shape == (4, R // 2, R // 2)
    z = model.sample(3, steps=2, generator=torch.Generator().manual_seed(0))
    images = model.decode(z)
    assert images.shape == (3, 3, R, R) and images.abs().max() <= 1
    out = tmp_path / "samples.png"
    assert sample_main([str(run), "--num", "4", "--seed", "0", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * (R + 1) + 1,) * 2


@pytest.mark.slow
def test_evaluate_sweep_scores_decoded_images_with_fid(shards, vae_dir, tmp_path, at_test_resolution,
                                                      random_inception, capsys):
    """evaluate sweep decodes a latent checkpoint's samples through its VAE and computes FID
    against real images of the decoded size; a VAE moved since training is named before any work, and its
    new place taken with --vae (the message said so, and sweep had no --vae)."""
    from stmd_fast.evaluate import main as evaluate_main

    run = tmp_path / "run"
    train(tiny_config(shards, vae_dir, run, steps=2))
    reference = tmp_path / "real.npy"
    np.save(reference, np.random.default_rng(1).integers(0, 256, (8, 3, R, R), dtype=np.uint8))
    out = tmp_path / "eval"
    assert evaluate_main(["sweep", str(run), "--stmd", "1x1", "--num", "8", "--batch-size", "8",
                          "--metric", "fid", "--inception-weights", random_inception, "--reference", str(reference),
                          "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["metric"] == "FID" and np.isfinite(row["value"]) and row["value"] > 0
    moved_vae = vae_dir.with_name(vae_dir.name + "-moved")
    again = ["sweep", str(run), "--stmd", "1x1", "--num", "8", "--batch-size", "8", "--metric", "fid",
             "--inception-weights", random_inception, "--reference", str(reference), "--cache-dir",
             str(tmp_path / "cache2"), "--device", "cpu", "--out", str(tmp_path / "eval-moved")]
    capsys.readouterr()
    vae_dir.rename(moved_vae)  # the module's VAE, put back below
    try:
        assert evaluate_main(again) == 2
        assert_one_line_error(capsys, f"VAE {vae_dir}: no such folder; if it moved, pass its new place with --vae DIR")
        assert not (tmp_path / "cache2").exists()  # said before the reference statistics
        assert evaluate_main(again + ["--vae", str(moved_vae)]) == 0
    finally:
        moved_vae.rename(vae_dir)
    (moved,) = json.loads((tmp_path / "eval-moved" / "results.json").read_text())["rows"]
    assert moved["value"] == row["value"]
    # latents of the wrong shape would not even reach the metric: the reference must be images
    bad = tmp_path / "latents.npy"
    np.save(bad, np.zeros((8, 4, R // 2, R // 2), dtype=np.float32))
    assert evaluate_main(["sweep", str(run), "--stmd", "1x1", "--num", "8", "--metric", "fid",
                          "--inception-weights", random_inception, "--reference", str(bad),
                          "--device", "cpu", "--out", str(tmp_path / "eval2")]) == 2


@pytest.mark.slow
def test_resume_continues_the_stream_exactly(shards, vae_dir, tmp_path, at_test_resolution):
    train(tiny_config(shards, vae_dir, tmp_path / "full"))
    train(tiny_config(shards, vae_dir, tmp_path / "part", steps=2))
    train(tiny_config(shards, vae_dir, tmp_path / "part"), resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # the data position came back with the checkpoint


def test_preset_needs_shards_and_a_vae(capsys, tmp_path):
    assert train_main(["--preset", "celeba-latent", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "stmd_fast.data.encode" in err and "--data" in err and "--vae" in err


def test_shards_at_another_resolution_are_refused_before_training(capsys, shards, vae_dir, tmp_path):
    run = tmp_path / "run"
    code = train_main(["--preset", "celeba-latent", "--data", shards, "--vae", str(vae_dir), "--out", str(run),
                       "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "256" in err and str(R) in err
    assert not (run / "checkpoints").exists()


def test_shards_from_another_vae_are_refused(capsys, shards, tmp_path, at_test_resolution):
    code = train_main(["--preset", "celeba-latent", "--data", shards, "--vae", str(tmp_path / "other-vae"),
                       "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert code == 2
    assert "other-vae" in capsys.readouterr().err


def test_a_vae_that_does_not_load_is_refused_before_training(capsys, shards, vae_dir, tmp_path, monkeypatch,
                                                             at_test_resolution):
    # the manifest names vae_dir; the folder is there at check time but its weights are gone
    broken = tmp_path / "vae"
    broken.mkdir()
    (broken / "config.json").write_text((vae_dir / "config.json").read_text())
    manifest_dir = Path(shards).parent
    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    monkeypatch.setitem(manifest, "vae", str(broken))
    from stmd_fast.data import latents

    monkeypatch.setattr(latents, "read_manifest", lambda folder: manifest)
    run = tmp_path / "run"
    code = train_main(["--preset", "celeba-latent", "--data", shards, "--vae", str(broken), "--out", str(run),
                       "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not load an AutoencoderKL" in err
    assert not (run / "checkpoints").exists()


def _damage_one_sample(shards: str, tmp_path: Path) -> str:
    """A copy of the shards with 16 bytes flipped inside one sample's mean.npy (shard 1): only the
    per-sample checksum can tell."""
    import shutil
    import tarfile

    folder = tmp_path / "damaged"
    shutil.copytree(Path(shards).parent, folder)
    shard = folder / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mean.npy"))
    data = bytearray(shard.read_bytes())
    middle = member.offset_data + member.size // 2
    data[middle:middle + 16] = bytes(b ^ 0xA5 for b in data[middle:middle + 16])
    shard.write_bytes(bytes(data))
    return str(folder / Path(shards).name)


def test_a_damaged_sample_is_skipped_and_counted_in_metrics_or_stops_strict_runs(shards, vae_dir, tmp_path,
                                                                                 at_test_resolution):
    """12 samples, 4 steps of 4: the first epoch (and the damaged sample in it) is read by step 3. The
    run trains on the 11 intact ones and metrics.jsonl counts the skipped sample from then on; with
    --strict-data it stops with a DataError naming the shard and the sample."""
    from stmd_fast.data.datasets import DataError

    damaged = _damage_one_sample(shards, tmp_path)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipping damaged sample"):
        train(tiny_config(damaged, vae_dir, run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in records][-1] == 1 and all(r["skipped_shards"] == 0 for r in records)
    assert all(np.isfinite(r["loss"]) for r in records)
    with pytest.raises(DataError, match=r"shard-000001.tar: sample \d+ is damaged .*--strict-data"):
        train(tiny_config(damaged, vae_dir, tmp_path / "strict", strict_data=True))
    from stmd_fast.train import build_parser

    assert build_parser().parse_args(["--strict-data"]).strict_data is True


def run_with_its_own_vae(vae_dir: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(a copy of the VAE, a one-step --preset latent run on shards it encoded, that run's flags)."""
    import shutil

    vae = tmp_path / "vae"
    shutil.copytree(vae_dir, vae)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((R, R, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    enc.main(["--images", str(images), "--vae", str(vae), "--resolution", str(R), "--out", str(tmp_path / "shards"),
              "--device", "cpu"])
    run = tmp_path / "run"
    flags = ["--preset", "latent", "--data", str(tmp_path / "shards"), "--batch-size", "4", "--sample-every", "0",
             "--device", "cpu", "--out", str(run), "--dit", "DiT-S/4"]
    assert train_main([*flags, "--steps", "1"]) == 0
    return vae, run, flags


@pytest.mark.slow
def test_a_moved_vae_is_named_by_its_new_place_and_must_fit(capsys, vae_dir, tmp_path, at_test_resolution):
    """Shards and a run whose VAE folder moved: training, resuming and sampling take --vae NEW_PLACE
    (checked to make the model's latents); without it, the error says so."""
    from diffusers import AutoencoderKL

    vae, run, flags = run_with_its_own_vae(vae_dir, tmp_path)
    moved = tmp_path / "moved-vae"
    vae.rename(moved)
    capsys.readouterr()

    assert train_main([*flags, "--steps", "2", "--resume"]) == 2
    assert "no such folder; if it moved, pass its new place: --resume --vae DIR" in capsys.readouterr().err
    assert sample_main([str(run), "--num", "2", "--out", str(tmp_path / "a.png"), "--device", "cpu"]) == 2
    assert "if it moved, pass its new place with --vae DIR" in capsys.readouterr().err

    assert train_main([*flags, "--steps", "2", "--resume", "--vae", str(moved)]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["vae"] == str(moved)
    assert sample_main([str(run), "--num", "2", "--out", str(tmp_path / "a.png"), "--device", "cpu",
                        "--vae", str(moved)]) == 0
    assert Image.open(tmp_path / "a.png").size == (2 * (R + 1) + 1, R + 2)  # 2 decoded images in one row

    wide = tmp_path / "vae-8-channels"  # another kind of VAE: its latents have 8 channels
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=8, norm_num_groups=4).save_pretrained(wide)
    capsys.readouterr()
    assert sample_main([str(run), "--num", "2", "--out", str(tmp_path / "b.png"), "--device", "cpu",
                        "--vae", str(wide)]) == 2
    assert "makes 8x8x8 latents from 16-pixel images, and this model's are 4x8x8" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


@pytest.mark.slow
def test_another_vae_of_the_same_kind_is_refused_by_train_sample_and_the_exported_sampler(capsys, vae_dir, tmp_path):
    """The manifest records the encoding VAE's SHA-256, but training and sampling compared the path and the latent
    shape only: a VAE of the same kind (replaced in place, or passed by --vae) decoded the latents without a word."""
    import shutil

    from diffusers import AutoencoderKL

    from stmd_fast.export import main as export_main

    vae, run, flags = run_with_its_own_vae(vae_dir, tmp_path)
    program = tmp_path / "sampler.pt2"
    assert export_main([str(run), "--device", "cpu", "--steps", "1", "--out", str(program)]) == 0
    other = tmp_path / "other-vae"  # the same architecture, other weights
    torch.manual_seed(5)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=R).save_pretrained(other)
    capsys.readouterr()
    for i, argv in enumerate(([str(run)], ["--exported", str(program)])):
        out = tmp_path / f"x{i}.png"
        assert sample_main([*argv, "--num", "2", "--vae", str(other), "--out", str(out)]) == 2
        assert_one_line_error(capsys, f"VAE {other} is not the VAE these latents were encoded with")
        assert not out.exists()
        assert sample_main([*argv, "--num", "2", "--vae", str(vae), "--out", str(out)]) == 0
    shutil.rmtree(vae)
    shutil.copytree(other, vae)  # replaced in place: the path the manifest names
    capsys.readouterr()
    assert train_main([*flags, "--steps", "2", "--resume"]) == 2
    assert_one_line_error(capsys, f"VAE {vae} is not the VAE these latents were encoded with")


def test_a_network_that_does_not_fit_latents_is_refused_before_the_vae_loads(capsys, shards, vae_dir, tmp_path,
                                                                             monkeypatch, at_test_resolution):
    from stmd_fast.data import vae

    def loads_the_vae(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the network was checked")

    monkeypatch.setattr(vae, "latent_decoder", loads_the_vae)
    assert train_main(["--preset", "celeba-latent", "--data", shards, "--vae", str(vae_dir), "--unet", "S",
                       "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "--unet for images" in capsys.readouterr().err
