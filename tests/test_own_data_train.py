"""Training on your own data end to end on tiny stand-ins: latent shards encoded at 64 and 128 pixels
with two DiT sizes, a pixel image folder at 32 pixels, the loggers and FD during training in a real
run, several EMAs, and the README's walkthrough commands run as written."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stmd_fast import dit, load_checkpoint
from stmd_fast.checkpoint import find_checkpoint, read_meta
from stmd_fast.data import encode as enc
from stmd_fast.data import example
from stmd_fast.models import unet_config
from stmd_fast.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY_DIT_SIZES = {"S": (1, 32, 2), "B": (2, 48, 4)}  # (depth, width, heads): the registry's names, CPU sizes
QUICK = ["--steps", "3", "--batch-size", "4", "--log-every", "1", "--ckpt-every", "3", "--sample-every", "0",
         "--data-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """12 synthetic images and a random tiny VAE (downsampling 8), as the README's example makes them."""
    return example.main(["--out", str(tmp_path_factory.mktemp("demo")), "--num", "12"])


@pytest.fixture
def tiny_dits(monkeypatch):
    for size, dims in TINY_DIT_SIZES.items():
        monkeypatch.setitem(dit.DIT_SIZES, size, dims)


def encoded(demo: Path, resolution: int) -> Path:
    out = demo / f"shards-{resolution}"
    if not (out / "manifest.json").exists():
        enc.main(["--images", str(demo / "images"), "--vae", str(demo / "vae"), "--resolution", str(resolution),
                  "--out", str(out), "--device", "cpu", "--shard-size", "4", "--workers", "1"])
    return out


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("resolution, dit_flag, expect", [(64, [], "DiT-S/2"), (128, ["--dit", "DiT-B/4"], "DiT-B/4")])
def test_latents_encoded_at_any_size_train_with_the_dit_chosen(demo, tiny_dits, tmp_path, resolution, dit_flag,
                                                               expect):
    """No preset, no --vae: the shards' manifest gives the latent shape, the VAE and the resolution; the
    DiT is --dit's or the default for the latent size (8x8 -> DiT-S/2)."""
    shards, run = encoded(demo, resolution), tmp_path / "run"
    assert train_main(["--data", str(shards), *dit_flag, "--out", str(run), *QUICK]) == 0
    meta = read_meta(find_checkpoint(run))
    side = resolution // 8
    assert meta["config"]["preset"] == "latent" and meta["data_shape"] == [4, side, side]
    assert meta["latent"]["vae"] == str(demo / "vae") and meta["latent"]["resolution"] == resolution
    depth, width, heads = TINY_DIT_SIZES[expect[4]]
    net = meta["config"]["net"]
    assert (net["kind"], net["depth"], net["width"], net["heads"], net["patch_size"]) == \
        ("dit", depth, width, heads, int(expect[-1]))
    assert len(losses(run)) == 3 and all(np.isfinite(losses(run)))
    grid = Image.open(run / "samples" / "step_00000003.png")  # decoded through the manifest's VAE
    assert grid.size == (8 * (resolution + 1) + 1,) * 2
    model = load_checkpoint(run)
    images = model.decode(model.sample(2, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (2, 3, resolution, resolution)


def test_a_dit_that_does_not_fit_is_one_line_listing_the_choices(demo, tiny_dits, tmp_path, capsys):
    shards = encoded(demo, 48)  # 6x6 latents: patch 2 only
    fits = [n for n in dit.DIT_MODELS if n.endswith("/2")]
    for name, why, choices in [("DiT-Q/2", "not in the registry", list(dit.DIT_MODELS)),  # refused before any data
                               ("DiT-S/4", "does not divide the latents 6x6", fits)]:
        run = tmp_path / name.replace("/", "-")
        assert train_main(["--data", str(shards), "--dit", name, "--out", str(run), *QUICK]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1
        assert err.endswith("choose one of " + ", ".join(choices))
        assert not (run / "checkpoints").exists()


def test_the_paper_preset_on_other_shards_points_to_the_latent_preset(demo, tmp_path, capsys):
    shards = encoded(demo, 64)
    assert train_main(["--preset", "celeba-latent", "--data", str(shards), "--vae", str(demo / "vae"),
                       "--out", str(tmp_path / "run"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "256" in err and "64" in err and "--preset latent" in err


@pytest.mark.slow
def test_pixel_image_folder_at_32_pixels(demo, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--data", str(demo / "images"), "--resolution", "32", "--unet", "S", "--flip",
                       "--dropout", "0.1", "--out", str(run), *QUICK]) == 0
    meta = read_meta(find_checkpoint(run))
    assert meta["config"]["preset"] == "images" and meta["data_shape"] == [3, 32, 32] and meta["data_kind"] == "image"
    assert tuple(meta["config"]["net"]["channels"]) == unet_config("S", (3, 32, 32)).channels
    assert len(losses(run)) == 3 and all(np.isfinite(losses(run)))
    assert Image.open(run / "samples" / "step_00000003.png").size == (8 * 33 + 1,) * 2
    x = load_checkpoint(run).sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 32, 32)


@pytest.mark.slow
def test_every_ema_is_kept_and_each_is_its_own_average(tmp_path, capsys):
    """EMAs of decays 0.5 (main), 0.9 and 0: each checkpoint file equals the EMA computed here from the
    per-step weights (the first update copies the weights, then ema = d ema + (1 - d) w)."""
    from stmd_fast.sample import main as sample_main

    run = tmp_path / "run"
    assert train_main(["--ema-decay", "0.5", "--ema-decays", "0.9", "0", "--ckpt-every", "1", "--keep-checkpoints",
                       "5", "--out", str(run), *QUICK[:6], *QUICK[8:]]) == 0
    steps = sorted((run / "checkpoints").glob("step_*"))
    weights = [load_file(step / "model.safetensors") for step in steps]
    for decay, file in [(0.5, "ema.safetensors"), (0.9, "ema-0.9.safetensors"), (0.0, "ema-0.0.safetensors")]:
        expected = dict(weights[0])
        for w in weights[1:]:
            expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in w}
        saved = load_file(steps[-1] / file)
        for key in expected:
            torch.testing.assert_close(saved[key], expected[key], rtol=1e-6, atol=1e-7)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert sample_main([str(run), "--num", "4", "--out", str(a)]) == 0
    assert sample_main([str(run), "--num", "4", "--ema", "0.9", "--out", str(b)]) == 0
    assert not np.array_equal(np.load(a), np.load(b))
    assert sample_main([str(run), "--num", "4", "--ema", "0.7", "--out", str(b)]) == 2
    assert "0.5, 0.9, 0.0" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_dropout_and_several_emas_equals_the_uninterrupted_run(tmp_path):
    """Dropout's masks come from torch's global generator, which the checkpoint keeps: losses, weights and
    every EMA after resuming equal an uninterrupted run's, bit for bit on CPU."""
    common = ["--dropout", "0.2", "--flip", "--ema-decays", "0.9", "--adam-betas", "0.8", "0.95", "--batch-size", "8",
              "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0", "--device", "cpu"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_main(common + ["--steps", "4", "--out", str(full)]) == 0
    assert train_main(common + ["--steps", "2", "--out", str(part)]) == 0
    torch.manual_seed(123)  # whatever the global generator holds now, the checkpoint's state is restored
    assert train_main(common + ["--steps", "4", "--out", str(part), "--resume"]) == 0
    assert losses(part) == losses(full)
    for weights in ("model.safetensors", "ema.safetensors", "ema-0.9.safetensors"):
        a, b = (load_file(run / "checkpoints" / "step_00000004" / weights) for run in (full, part))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_meta(find_checkpoint(full))["config"]["adam_betas"] == [0.8, 0.95]


@pytest.mark.slow
def test_loggers_and_fd_during_training_in_a_real_run(tmp_path, monkeypatch):
    """--loggers tensorboard wandb --fd-every 2 on digits: both loggers hold exactly metrics.jsonl's records (the
    FD of each EMA included) and the sample grids; the logged FD equals one recomputed from the checkpoint.
    FD here is on a random-weight digits classifier (evaluate's FD path): Inception FID's 2048-d matrix
    square root takes minutes on 2 CPU cores, and TrainingFD takes either metric from evaluate alike."""
    from test_loggers import tensorboard_scalars, wandb_history

    from stmd_fast.classifier import FeatureClassifier, save_classifier
    from stmd_fast.data.datasets import load_digits
    from stmd_fast.fd_monitor import SEED_OFFSET
    from stmd_fast.metrics import FrechetDistance
    from stmd_fast.sampling import sample

    torch.manual_seed(0)
    classifier = FeatureClassifier((1, 8, 8)).eval()
    save_classifier(classifier, tmp_path / "classifier", {"dataset": "digits", "test_accuracy": 0.0})
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    assert train_main(["--steps", "4", "--batch-size", "8", "--log-every", "1", "--sample-every", "2",
                       "--ckpt-every", "4", "--ema-decays", "0.9", "--fd-every", "2", "--fd-num", "64",
                       "--fd-classifier", str(tmp_path / "classifier"), "--loggers", "tensorboard", "wandb",
                       "--device", "cpu", "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    fd_keys = ["FD/ema0.999", "FD/ema0.9"]
    assert all(k in records[1] and k in records[3] for k in fd_keys) and not any(k in records[0] for k in fd_keys)

    scalars, images = tensorboard_scalars(run / "tensorboard")
    for key in ("loss", "delta_sq", "lr", "img_per_s", *fd_keys):
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records if key in r]
    assert images == {"samples": [2, 4]}
    rows = wandb_history(run)
    assert [row["_step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    for key in ("loss", *fd_keys):
        assert [row[key] for row in rows if key in row] == [r[key] for r in records if key in r]
    assert [row["_step"] for row in rows if "samples/_type" in row] == [2, 4]

    # FD of the 0.9 EMA at step 4, recomputed from the checkpoint: the same samples, the same reference
    model = load_checkpoint(run, ema=0.9)
    x = sample(model.net, "stmd", 64, (1, 8, 8), 1, 1, torch.Generator().manual_seed(SEED_OFFSET), "uniform")
    real = load_digits("train").all()
    picked = torch.randperm(len(real), generator=torch.Generator().manual_seed(SEED_OFFSET))[:64]
    metric = FrechetDistance(classifier)
    metric.set_reference(real[picked])
    assert metric.score(x) == pytest.approx(records[3]["FD/ema0.9"], rel=1e-5)


def readme_walkthrough() -> list[list[str]]:
    """The commands of the README's own-images walkthrough (the bash block after its heading)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#", 1)[0]) for line in lines if line.strip().startswith("python -m")]


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, tiny_dits):
    """Every command of the walkthrough, in order, in a scratch folder; training runs 2 steps here."""
    import importlib

    commands = readme_walkthrough()
    modules = [c[2] for c in commands]
    assert modules[0] == "stmd_fast.data.example" and "stmd_fast.data.encode" in modules
    assert modules.count("stmd_fast.train") == 2 and modules.count("stmd_fast.sample") == 2
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = command[3:]
        if command[2] == "stmd_fast.train":
            argv += ["--steps", "2", "--batch-size", "4", "--device", "cpu", "--data-workers", "0"]
        result = importlib.import_module(command[2]).main(argv)
        assert result in (None, 0) or isinstance(result, (dict, Path)), (command, result)
    outputs = [Path(c[c.index("--out") + 1]) for c in commands if c[2] == "stmd_fast.sample"]
    assert all(p.suffix == ".png" and Image.open(p).size[0] > 0 for p in outputs)


def test_an_mnist_run_resumes_from_any_folder_and_from_files_that_moved(tmp_path, monkeypatch, capsys):
    """--data-dir was saved as typed (relative) and could not change on --resume: a run resumed from another
    folder, or after its files moved, was stuck. Now saved absolute, and changeable like --data."""
    import shutil

    from test_data import _write_mnist

    _write_mnist(tmp_path / "files", n_train=16, n_test=4)
    monkeypatch.chdir(tmp_path)
    common = ["--preset", "mnist", "--batch-size", "8", "--sample-every", "0", "--log-every", "1", "--device", "cpu"]
    assert train_main([*common, "--data-dir", "files", "--steps", "1", "--out", "runs/m"]) == 0
    assert read_meta(find_checkpoint(tmp_path / "runs" / "m"))["config"]["data_dir"] == str(tmp_path / "files")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train_main(["--out", "../runs/m", "--resume", "--steps", "2"]) == 0  # from another folder
    shutil.move(tmp_path / "files", tmp_path / "moved")
    assert train_main(["--out", "../runs/m", "--resume", "--steps", "3", "--data-dir", "../moved"]) == 0
    assert f"continues on those in {tmp_path / 'moved'}" in capsys.readouterr().err
    assert read_meta(find_checkpoint(tmp_path / "runs" / "m"))["step"] == 3


def test_the_papers_parameter_count_is_compared_only_with_the_papers_network(tmp_path, capsys):
    """--unet S on mnist is not the paper's layout: its start-up line compared it with the paper all the same."""
    from test_data import _write_mnist

    _write_mnist(tmp_path / "files", n_train=16, n_test=4)
    common = ["--preset", "mnist", "--data-dir", str(tmp_path / "files"), "--batch-size", "8", "--steps", "1",
              "--sample-every", "0", "--device", "cpu"]
    assert train_main([*common, "--out", str(tmp_path / "paper")]) == 0
    assert "1.177M parameters (paper: 1.1M;" in capsys.readouterr().out
    assert train_main([*common, "--unet", "S", "--out", str(tmp_path / "own")]) == 0
    out = capsys.readouterr().out
    assert "1.751M parameters; device" in out and "(paper:" not in out


def test_images_of_more_channels_than_a_png_holds_train_and_show_their_first_three(tmp_path, capsys):
    """A 5-channel .npy trained to its first sample grid and crashed there (PIL has no 5-channel mode): grids
    show channels 1-3. (Fewer samples than the batch: trained, with a note.)"""
    x = np.random.default_rng(0).integers(0, 256, (4, 5, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "five.npy", x)
    run = tmp_path / "run"
    assert train_main(["--data", str(tmp_path / "five.npy"), "--steps", "2", "--batch-size", "8", "--sample-every",
                       "2", "--device", "cpu", "--out", str(run)]) == 0
    with Image.open(run / "samples" / "step_00000002.png") as grid:
        assert grid.mode == "RGB" and grid.size == (8 * 9 + 1, 8 * 9 + 1)
    assert "holds 4 samples, fewer than --batch-size 8" in capsys.readouterr().err
