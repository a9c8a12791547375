"""Tests of the command-line tools (python -m stmd_fast.train / stmd_fast.sample) and the public API.

The CLIs are called in-process (main(argv) returns the exit code) on tiny runs: the gmm MLP for
vectors and the digits U-Net on a (32, 1, 8, 8) uint8 .npy for images, a few steps each, on CPU.
Every user error must be one line "error: ..." on stderr that names the problem, exit code 2,
and come before any expensive work (no checkpoints written).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def read_png(path) -> torch.Tensor:
    """(C, H, W) uint8 tensor of a PNG (Pillow: torchvision's image I/O is deprecated)."""
    with Image.open(path) as im:
        a = np.asarray(im)
    return torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)


def write_png(pixels: np.ndarray, path) -> None:
    """Write a (1, H, W) uint8 array as a grayscale PNG."""
    Image.fromarray(np.asarray(pixels)[0]).save(path)

import stmd_fast
import stmd_fast.train as train_module
from stmd_fast.sample import main as sample_main
from stmd_fast.train import main as train_main
from conftest import assert_one_line_error

GMM = ["--preset", "gmm", "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


def train(*args) -> int:
    return train_main([str(a) for a in args])


def sample(*args) -> int:
    return sample_main([str(a) for a in args] + ["--device", "cpu"])


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_nothing_trained(run: Path) -> None:
    assert not (run / "checkpoints").exists()
    assert not (run / "config.json").exists()
    assert not (run / "metrics.jsonl").exists()


def grid_size(n: int, tile: int = 8, padding: int = 1, nrow: int | None = None) -> tuple[int, int]:
    """(height, width) of torchvision's make_grid of n tiles (nrow = ceil(sqrt(n)) as sample.py)."""
    nrow = nrow or math.ceil(math.sqrt(n))
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    return rows * (tile + padding) + padding, cols * (tile + padding) + padding


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Default output paths (runs/..., samples.png) must never land in the repository."""
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- shared tiny runs

@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gmm") / "run"
    assert train(*GMM, "--steps", 3, "--ckpt-every", 3, "--out", run) == 0
    return run


@pytest.fixture(scope="module")
def gmm_meanflow_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gmm_mf") / "run"
    assert train(*GMM, "--method", "meanflow", "--steps", 1, "--out", run) == 0
    return run


@pytest.fixture(scope="module")
def image_npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, image_npy) -> Path:
    run = tmp_path_factory.mktemp("img") / "run"
    assert train("--data", image_npy, "--steps", 2, "--batch-size", 8, "--device", "cpu", "--out", run) == 0
    return run


# ----------------------------------------------------------------------------- 1. argparse choices

@pytest.mark.parametrize("flag, value, choices", [
    ("--preset", "imagenet", ("digits", "gmm", "mnist", "cifar10")),
    ("--method", "flowmatch", ("stmd", "meanflow", "ddpm")),
    ("--time-sampler", "cifar", ("pair", "separate", "mixture")),
    ("--s-sampler", "beta", ("uniform", "grid")),
])
def test_unknown_choice_exits_2_listing_the_choices(capsys, tmp_path, flag, value, choices):
    assert train(flag, value, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and value in err
    assert len(err.strip().splitlines()) == 1 and "--help" in err  # one line, not the whole usage first
    for choice in choices:
        assert choice in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, said", [("-1e-3", "got -0.001"), ("-.5E+2", "got -50.0")])
def test_a_negative_number_in_scientific_notation_is_a_value_not_a_flag(capsys, tmp_path, value, said):
    """argparse took --lr -1e-3 for a flag ("expected one argument") while --lr -0.001 got the range check."""
    assert train("--lr", value, "--out", tmp_path / "run") == 2  # the old code raised SystemExit from argparse
    err = capsys.readouterr().err
    assert "--lr" in err and said in err and "expected one argument" not in err
    assert not (tmp_path / "run").exists()


def test_sampler_flags_reach_the_run_config(tmp_path):
    """Every time-sampler flag lands in the run's objective (what draw_noise reads), the rest keep the preset's."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 1, "--out", run, "--time-sampler", "mixture", "--mixture-weight", 0.25,
                 "--r-mean", -3, "--r-std", 1.2, "--s-sampler", "grid", "--s-grid-fraction", 0.4,
                 "--s-grid-steps", 1, 2, "--flow-grid-fraction", 0.3, "--flow-grid-steps", 2, 8) == 0
    objective = json.loads((run / "config.json").read_text())["config"]["objective"]
    assert objective["time_sampler"] == "mixture" and objective["mixture_weight"] == 0.25
    assert objective["r_mean"] == -3 and objective["r_std"] == 1.2
    assert objective["s_sampler"] == "grid" and objective["s_grid_fraction"] == 0.4
    assert list(objective["s_grid_steps"]) == [1, 2]
    assert objective["flow_grid_fraction"] == 0.3 and list(objective["flow_grid_steps"]) == [2, 8]
    from stmd_fast.config import PRESETS
    assert objective["time_mean"] == PRESETS["gmm"]().objective.time_mean


@pytest.mark.parametrize("method, unused, used", [
    ("meanflow", ["--s-sampler", "grid", "--sample-steps", 2, "--vae", "x", "--resolution", 32],
     ["--time-sampler", "pair", "--sample-flow-steps", 2]),
    ("ddpm", ["--time-sampler", "pair", "--adaptive-p", 0.5, "--sample-flow-steps", 2, "--flow-grid-fraction", 0.5],
     ["--s-sampler", "grid"]),
    ("stmd", ["--sample-ddpm-steps", 5, "--fd-num", 100, "--inception-weights", "w.pth"],
     ["--s-sampler", "grid", "--time-sampler", "pair", "--sample-steps", 2]),
    # flags the chosen laws of the times, or the data, leave unread
    ("stmd", ["--r-mean", -3, "--mixture-weight", 0.2, "--flow-grid-steps", 8, "--s-grid-fraction", 0.3,
              "--data-workers", 3, "--strict-data", "--data-dir", "x", "--download"],
     ["--time-sampler", "pair", "--s-sampler", "uniform", "--time-mean", -1]),
    ("meanflow", ["--r-std", 1.0, "--mixture-weight", 0.2], ["--time-sampler", "pair", "--flow-grid-fraction", 0.1,
                                                             "--flow-grid-steps", 2]),
    # values that leave another flag unread: a weight or a fraction at 0 or 1, p = 0
    ("stmd", ["--s-grid-steps", 3, "--adaptive-c", 0.5, "--r-mean", -2],
     ["--s-sampler", "grid", "--s-grid-fraction", 0, "--adaptive-p", 0, "--time-sampler", "mixture",
      "--mixture-weight", 0]),
    ("meanflow", ["--time-mean", 2, "--time-sampler", "separate"], ["--flow-grid-fraction", 1]),
])
def test_flags_a_run_does_not_read_are_named_not_silently_ignored(capsys, tmp_path, method, unused, used):
    """Each given flag that the method or the data has no use for gets a note saying why; the others none."""
    assert train(*GMM, "--method", method, "--steps", 1, "--out", tmp_path / "run", *unused, *used) == 0
    err = capsys.readouterr().err
    noted = set(re.findall(r"note: (--[\w-]+) has no effect on this run", err))
    assert noted == {str(a) for a in unused if str(a).startswith("--")}


def test_a_time_law_a_method_does_not_read_is_said_to_still_move_its_random_stream(capsys, tmp_path):
    """DDPM has no flow time, but its (r, t) are still drawn: "--time-sampler has no effect" was said of runs whose
    losses differed (mixture draws more numbers than pair, so the noise drawn after them moved)."""
    losses = {}
    for sampler in ("pair", "mixture"):
        out = tmp_path / sampler
        assert train(*GMM, "--method", "ddpm", "--time-sampler", sampler, "--steps", 1, "--log-every", 1,
                     "--out", out) == 0
        assert "--time-sampler has no effect on this run: DDPM has no flow time (beyond the random stream" in \
            capsys.readouterr().err
        losses[sampler] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["pair"] != losses["mixture"]  # what the note now says
    assert train(*GMM, "--method", "ddpm", "--adaptive-p", 0.5, "--steps", 1, "--out", tmp_path / "p") == 0
    assert "--adaptive-p has no effect on this run: DDPM has no flow time\n" in capsys.readouterr().err  # not drawn


def test_a_missing_data_folder_is_the_one_line_not_a_note_that_resolution_needs_one(capsys, tmp_path):
    """--resolution 32 --data MISSING said first that --resolution "sizes an image folder (--data DIR)" and has no
    effect: the user had given --data DIR, misspelt."""
    assert train("--resolution", 32, "--data", tmp_path / "imgs", "--out", tmp_path / "run") == 2
    assert_one_line_error(capsys, f"--data {tmp_path / 'imgs'}: no such file or folder")


@pytest.mark.parametrize("method, noted", [("stmd", True), ("meanflow", True), ("ddpm", False)])
def test_a_flow_matching_fraction_of_1_says_it_trains_no_jump(capsys, tmp_path, method, noted):
    """Every row at r = t trains plain flow matching: no map step r < t, which the few-step sampler takes."""
    assert train(*GMM, "--method", method, "--steps", 1, "--out", tmp_path / "run", "--flow-matching-fraction", 1) == 0
    err = capsys.readouterr().err
    assert ("every row has r = t, so this trains plain flow matching" in err) == noted, err


def test_our_warnings_are_one_line_in_a_command_and_others_keep_pythons_format():
    """A damaged sample skipped mid-run printed as `.../parallel.py:44: UserWarning: ...` and the source line,
    which reads like a crash; inside a command, our warnings are `warning: ...` lines like the notes."""
    import warnings

    import stmd_fast.checkpoint as ours
    import stmd_fast.data.latents as ours_too
    from stmd_fast.cli import warnings_as_lines

    python_format = warnings.formatwarning
    with warnings_as_lines():
        for filename in (ours.__file__, ours_too.__file__):
            assert warnings.formatwarning("passed over", UserWarning, filename, 10) == "warning: passed over\n"
        assert "UserWarning: theirs" in warnings.formatwarning("theirs", UserWarning, "/site-packages/lib.py", 3)
        assert "FutureWarning: x" in warnings.formatwarning("x", FutureWarning, ours.__file__, 3)
    assert warnings.formatwarning is python_format


def test_a_command_prints_paths_that_are_not_utf8_under_a_strict_utf8_stdout(tmp_path):
    """A folder named in latin-1 (os.walk and argv hold its bytes as surrogates) stopped a command at its first
    print with UnicodeEncodeError: stdout is strict under a UTF-8 locale. Printed as \\xNN escapes now."""
    import subprocess
    import sys

    code = ("import sys\nfrom stmd_fast.cli import one_line_errors\n"
            "@one_line_errors(ValueError)\ndef main(argv):\n    print('run dir', sys.argv[1])\n    return 0\n"
            "sys.exit(main(None))")
    result = subprocess.run([sys.executable, "-c", code, b"/tmp/caf\xe9"], capture_output=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"}, timeout=60)
    assert result.returncode == 0 and result.stdout == b"run dir /tmp/caf\\udce9\n", result


def test_one_grid_per_run_trains_the_s_sampler_and_is_the_samplers_default(tmp_path, capsys):
    """--sample-grid is the run's grid: the s sampler aims at its points (objective s_grid, no flag of its own),
    and sampling the run's checkpoint without a grid uses it, from the API and from the sample CLI."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 1, "--out", run, "--s-sampler", "grid", "--sample-grid", "quadratic") == 0
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["sample_grid"] == config["objective"]["s_grid"] == "quadratic"
    model = stmd_fast.load_checkpoint(run)
    assert model.grid == "quadratic"
    draw = {grid: model.sample(5, 2, 1, torch.Generator().manual_seed(3), grid)
            for grid in (None, "quadratic", "uniform")}
    assert torch.equal(draw[None], draw["quadratic"]) and not torch.allclose(draw[None], draw["uniform"])
    for grid in (None, "quadratic"):
        out = tmp_path / f"{grid}.npy"
        flag = ["--grid", grid] if grid else []
        assert sample(run, "--steps", 2, "--num", 5, "--seed", 3, "--out", out, *flag) == 0
    assert np.array_equal(np.load(tmp_path / "None.npy"), np.load(tmp_path / "quadratic.npy"))
    # the s sampler's grid is the run's: no second flag to disagree with it
    assert train(*GMM, "--steps", 1, "--out", tmp_path / "other", "--s-grid", "uniform") == 2
    assert "--s-grid" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2-4. data and --out

def test_mnist_missing_names_the_expected_path_and_download(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    rc = train("--preset", "mnist", "--data-dir", empty, "--device", "cpu", "--out", run)
    assert rc == 2
    assert_one_line_error(capsys, "MNIST", str(empty / "MNIST" / "raw"), "--download")
    assert_nothing_trained(run)


def test_npy_rank3_error_names_the_shape(capsys, tmp_path):
    path = tmp_path / "rank3.npy"
    np.save(path, np.zeros((4, 8, 8), np.uint8))
    run = tmp_path / "run"
    assert train("--data", path, "--steps", 1, "--device", "cpu", "--out", run) == 2
    assert_one_line_error(capsys, "(4, 8, 8)", "x[:, None]")
    assert_nothing_trained(run)


def test_npy_with_nan_is_refused(capsys, tmp_path):
    x = np.zeros((16, 2), np.float32)
    x[3, 1] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, x)
    run = tmp_path / "run"
    assert train("--data", path, "--steps", 1, "--device", "cpu", "--out", run) == 2
    assert_one_line_error(capsys, "NaN")
    assert_nothing_trained(run)


def test_missing_npy_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    assert train("--data", tmp_path / "nope.npy", "--steps", 1, "--device", "cpu", "--out", run) == 2
    assert_one_line_error(capsys, "nope.npy", "no such file")
    assert_nothing_trained(run)


def test_triton_kernels_on_a_cpu_are_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter would run them
    run = tmp_path / "run"
    assert train(*GMM, "--kernels", "triton", "--steps", 1, "--out", run) == 2
    assert_one_line_error(capsys, "--kernels triton", "--kernels auto")
    assert_nothing_trained(run)


@pytest.mark.parametrize("below", [True, False], ids=["path-under-a-file", "path-is-a-file"])
def test_unwritable_out_is_refused(capsys, tmp_path, below):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    out = blocker / "run" if below else blocker
    assert train(*GMM, "--steps", 1, "--out", out) == 2
    words = ("cannot write", "a folder in its path is a file") if below else ("is a file, not a folder",)
    message = assert_one_line_error(capsys, *words, str(out))
    assert "permissions" not in message  # the fix of a permission error was the one given
    assert blocker.read_text() == "not a directory"


# ----------------------------------------------------------------------------- 5. --resume

@pytest.fixture
def gmm_copy(gmm_run, tmp_path) -> Path:
    run = tmp_path / "copy"
    shutil.copytree(gmm_run, run)
    return run


def test_a_full_disk_at_start_up_says_free_space_not_permissions(capsys, gmm_copy, monkeypatch):
    """ENOSPC when --out was probed was blamed on permissions ("make it writable ..., a read-only mount")."""
    import errno

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", no_space)
    assert train(*GMM, "--out", gmm_copy, "--resume") == 2
    line = assert_one_line_error(capsys, "No space left on device: free space, then --resume again")
    assert "permissions" not in line


def test_out_with_checkpoints_needs_resume(capsys, gmm_copy):
    before = (gmm_copy / "metrics.jsonl").read_text()
    assert train(*GMM, "--steps", 5, "--out", gmm_copy) == 2
    assert_one_line_error(capsys, "already holds checkpoints", "--resume")
    assert checkpoint_steps(gmm_copy) == [3]
    assert (gmm_copy / "metrics.jsonl").read_text() == before


def test_resume_on_an_empty_dir_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train("--out", empty, "--resume", "--device", "cpu") == 2
    assert_one_line_error(capsys, "--resume", "no checkpoint", str(empty))
    assert_nothing_trained(empty)


def test_resume_into_a_live_run_before_its_first_checkpoint_names_the_live_run(capsys, tmp_path):
    """A run that has not yet written a checkpoint is still a live run: --resume says so, not 'no checkpoint'
    (whose advice, to drop --resume, would only meet the lock)."""
    from stmd_fast.files import run_lock

    live = tmp_path / "live"
    live.mkdir()
    with run_lock(live):  # another open file description: this process counts as the other run
        assert train("--out", live, "--resume", "--device", "cpu") == 2
        assert_one_line_error(capsys, "in use by another training run", "another --out")
    assert train("--out", live, "--resume", "--device", "cpu") == 2  # the run ended: now there is nothing
    assert_one_line_error(capsys, "--resume", "no checkpoint")


def test_resume_with_another_method_is_refused(capsys, gmm_copy):
    assert train("--out", gmm_copy, "--resume", "--method", "ddpm", "--steps", 5) == 2
    assert_one_line_error(capsys, "--method", "stmd", "ddpm")
    assert checkpoint_steps(gmm_copy) == [3]


def test_resume_with_more_steps_continues_to_the_new_count(capsys, gmm_copy):
    assert metrics_steps(gmm_copy) == [1, 2, 3]
    assert train("--out", gmm_copy, "--resume", "--steps", 5, "--device", "cpu") == 0
    out, err = capsys.readouterr()
    assert "resumed from" in out and "step_00000003" in out
    assert metrics_steps(gmm_copy) == [1, 2, 3, 4, 5]
    assert checkpoint_steps(gmm_copy)[-1] == 5
    saved = json.loads((gmm_copy / "checkpoints" / "step_00000005" / "config.json").read_text())
    assert saved["step"] == 5 and saved["config"]["steps"] == 5 and saved["config"]["method"] == "stmd"


# ----------------------------------------------------------------------------- 6. NaN loss

def test_nan_loss_stops_with_the_last_good_checkpoint_intact(capsys, tmp_path, monkeypatch):
    real = train_module.compute_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, error = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= 5 else loss), error

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    run = tmp_path / "run"
    rc = train(*GMM, "--steps", 8, "--ckpt-every", 2, "--log-every", 100, "--out", run)
    assert rc == 1
    line = assert_one_line_error(capsys, "step 5", "intact")
    assert "step_00000004" in line
    assert 5 <= len(calls) < 8  # stopped at the next check, not at the end
    steps = checkpoint_steps(run)
    assert steps[-1] == 4 and all(s < 5 for s in steps)
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    for weights in ("model", "ema"):
        model = stmd_fast.load_checkpoint(run, weights=weights)
        for name, p in model.net.state_dict().items():
            assert torch.isfinite(p).all(), f"{weights}: {name} is not finite"


# ----------------------------------------------------------------------------- 7. sample CLI

def test_sample_vectors_to_npy(capsys, gmm_run, tmp_path):
    out = tmp_path / "x.npy"
    assert sample(gmm_run, "--out", out, "--num", 10) == 0
    x = np.load(out)
    assert x.shape == (10, 2) and x.dtype == np.float32
    assert np.isfinite(x).all()


def test_sample_vectors_to_png_is_refused(capsys, gmm_run, tmp_path):
    out = tmp_path / "x.png"
    assert sample(gmm_run, "--out", out, "--num", 10) == 2
    assert_one_line_error(capsys, "vectors", ".npy")
    assert not out.exists()


def test_a_run_with_no_intact_checkpoint_says_what_to_do(capsys, gmm_copy, tmp_path):
    """evaluate, sample and export named the damaged checkpoint but no way on (train --resume named one)."""
    from stmd_fast.evaluate import main as evaluate_main
    from stmd_fast.export import main as export_main

    for entry in (gmm_copy / "checkpoints" / "step_00000003").iterdir():
        entry.unlink()  # a checkpoint begun and never written: a half-made run
    assert sample(gmm_copy, "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, "none of the 1 checkpoints", "give another run or checkpoint")
    assert export_main([str(gmm_copy), "--out", str(tmp_path / "x.pt2"), "--device", "cpu"]) == 2
    assert_one_line_error(capsys, "none of the 1 checkpoints", "give another run or checkpoint")
    assert evaluate_main(["sweep", str(gmm_copy), "--num", "2", "--out", str(tmp_path / "eval")]) == 2
    assert_one_line_error(capsys, "none of the 1 checkpoints", "give another run or checkpoint")


def test_sample_missing_checkpoint_is_refused(capsys, tmp_path):
    # a path that is not there is said to be missing (a typo), not to hold no checkpoint
    assert sample(tmp_path / "nothing", "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, f"{tmp_path / 'nothing'} does not exist")
    (tmp_path / "empty").mkdir()
    assert sample(tmp_path / "empty", "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, "no checkpoint")


def test_sample_takes_run_checkpoints_as_the_run(gmm_run, tmp_path):
    """RUN/checkpoints (the folder that holds step_*) means RUN: the same newest checkpoint, the same draws."""
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert sample(gmm_run, "--out", a, "--num", 5) == 0
    assert sample(gmm_run / "checkpoints", "--out", b, "--num", 5) == 0
    assert np.array_equal(np.load(a), np.load(b))


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(capsys, gmm_run, tmp_path, monkeypatch):
    """KeyboardInterrupt in sample (and every command under one_line_errors) ends in 'interrupted', exit 130,
    with no traceback and no output file."""
    import stmd_fast.sample as sample_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_module, "write_samples", interrupted)
    out = tmp_path / "x.npy"
    assert sample(gmm_run, "--out", out, "--num", 2) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert not out.exists()


def test_training_grid_is_8x8_tiles_with_1px_padding(image_run):
    grid = read_png(image_run / "samples" / "step_00000002.png")
    assert tuple(grid.shape[-2:]) == grid_size(64, nrow=8) == (73, 73)


@pytest.mark.parametrize("extra", [[], ["--steps", 2, "--flow-steps", 2]], ids=["default", "N2-M2"])
def test_sample_image_grid(capsys, image_run, tmp_path, extra):
    out = tmp_path / "grid.png"
    assert sample(image_run, "--num", 6, "--out", out, *extra) == 0
    grid = read_png(out)
    assert tuple(grid.shape[-2:]) == grid_size(6) == (19, 28)


def test_sample_meanflow_refuses_diffusion_steps(capsys, gmm_meanflow_run, tmp_path):
    out = tmp_path / "x.npy"
    assert sample(gmm_meanflow_run, "--steps", 2, "--out", out) == 2
    assert_one_line_error(capsys, "steps", "Mean Flow")
    assert not out.exists()


@pytest.fixture
def inpaint_files(tmp_path) -> tuple[Path, Path, np.ndarray]:
    pixels = np.random.default_rng(1).integers(0, 256, (1, 8, 8), dtype=np.uint8)
    image, mask = tmp_path / "img.png", tmp_path / "mask.png"
    write_png(pixels, image)
    m = np.zeros((1, 8, 8), np.uint8)
    m[..., :4] = 255  # left half observed
    write_png(m, mask)
    return image, mask, pixels


def test_inpaint_keeps_observed_pixels_exactly(capsys, image_run, inpaint_files, tmp_path):
    image, mask, pixels = inpaint_files
    out = tmp_path / "c.npy"
    assert sample(image_run, "--inpaint", image, "--mask", mask, "--num", 4, "--steps", 2, "--out", out) == 0
    c = np.load(out)
    assert c.shape == (4, 1, 8, 8)
    expected = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)
    for k in range(4):
        np.testing.assert_array_equal(c[k, :, :, :4], expected[:, :, :4])
    unobserved = c[:, :, :, 4:]
    assert (unobserved != unobserved[:1]).any(axis=0).all(), "completions agree on an unobserved pixel"


def test_inpaint_png_output_prepends_the_observation_tile(capsys, image_run, inpaint_files, tmp_path):
    image, mask, _ = inpaint_files
    out = tmp_path / "c.png"
    assert sample(image_run, "--inpaint", image, "--mask", mask, "--num", 3, "--out", out) == 0
    assert tuple(read_png(out).shape[-2:]) == grid_size(4)  # observation + 3 completions


def test_inpaint_wrong_size_image_says_resize(capsys, image_run, inpaint_files, tmp_path):
    _, mask, _ = inpaint_files
    small = tmp_path / "small.png"
    write_png(np.zeros((1, 7, 7), dtype=np.uint8), small)
    assert sample(image_run, "--inpaint", small, "--mask", mask, "--out", tmp_path / "c.npy") == 2
    assert_one_line_error(capsys, "resize", "8x8")
    assert not (tmp_path / "c.npy").exists()


def test_inpaint_without_mask_is_refused(capsys, image_run, inpaint_files, tmp_path):
    image, _, _ = inpaint_files
    assert sample(image_run, "--inpaint", image, "--out", tmp_path / "c.npy") == 2
    assert_one_line_error(capsys, "--mask")


# ----------------------------------------------------------------------------- 8. Python API

def test_api_sample_is_seeded_and_shaped(image_run):
    model = stmd_fast.load_checkpoint(image_run)
    assert model.method == "stmd" and model.data_shape == (1, 8, 8) and model.data_kind == "image"

    def draw():
        return model.sample(5, steps=2, flow_steps=2, generator=torch.Generator().manual_seed(0))

    a, b = draw(), draw()
    assert a.shape == (5, 1, 8, 8)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    # without a generator, torch's global seed decides, as for any torch sampler
    unseeded = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        unseeded.append(model.sample(5, steps=2, flow_steps=2))
    assert torch.equal(unseeded[0], unseeded[1]) and not torch.equal(unseeded[0], unseeded[2])


def test_api_transition_keeps_shape_and_checks_it(image_run):
    model = stmd_fast.load_checkpoint(image_run)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    y = model.transition(x, 0.5, 0.1, flow_steps=1, generator=g)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="shape"):
        model.transition(torch.randn(3, 1, 7, 7), 0.5, 0.1, flow_steps=1, generator=g)


def test_api_load_from_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        stmd_fast.load_checkpoint(tmp_path)


def test_api_edited_method_is_refused(image_run, tmp_path):
    src = sorted((image_run / "checkpoints").glob("step_*"))[-1]
    ckpt = tmp_path / src.name
    shutil.copytree(src, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["config"]["method"] == "stmd"
    meta["config"]["method"] = "ddpm"
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit"):
        stmd_fast.load_checkpoint(ckpt)


# ----------------------------------------------------------------------------- 9. --help

NO_DEFAULT = {"--resume", "--download", "--compile", "--strict-data", "--data", "--help"}


def test_help_states_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert train("--help") == 0
    text = capsys.readouterr().out

    # One entry per option: a line starting "  -" plus its more-indented continuation lines.
    entries: dict[str, str] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            current = [line]
            for flag in re.findall(r"--[a-z][\w-]*", invocation):
                entries[flag] = current  # type: ignore[assignment]
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    entries = {flag: " ".join(" ".join(lines).split()) for flag, lines in entries.items()}

    parser_flags = {s for a in train_module.build_parser()._actions for s in a.option_strings
                    if s.startswith("--") and a.help != argparse.SUPPRESS}  # not the old --log's pointer
    assert set(entries) == parser_flags  # the parsing saw every option
    missing = sorted(f for f in parser_flags - NO_DEFAULT if "[default" not in entries[f])
    assert not missing, f"--help gives no default for {missing}"
    for flag in NO_DEFAULT - {"--help"}:
        assert flag in entries
    # a default that differs between presets is the preset's, also for the time samplers (cifar10: separate)
    for flag in ("--time-sampler", "--adaptive-p", "--flow-matching-fraction", "--lr"):
        assert "[default: preset's; digits" in entries[flag], entries[flag]
    assert "[default: 0.001]" in entries["--adaptive-c"]  # the same in every preset: stated plainly


# ----------------------------------------------------------------------------- bugs found while writing these tests
# Each test below fails with the current package; the docstring names the line and the fix.

def test_sample_steps_zero_is_refused_not_replaced_by_the_default(capsys, gmm_run, tmp_path):
    """stmd_fast/sample.py:68 `args.steps or DEFAULT_STEPS[...]` turns --steps 0 into the default
    (N=1) silently. Fix: `args.steps if args.steps is not None else DEFAULT_STEPS[model.method]`,
    so check_steps refuses it like --steps -1."""
    out = tmp_path / "x.npy"
    assert sample(gmm_run, "--steps", 0, "--num", 2, "--out", out) == 2
    assert_one_line_error(capsys, "steps")
    assert not out.exists()


def test_inpaint_npy_with_a_batch_axis_is_a_one_line_error(capsys, image_run, inpaint_files, tmp_path):
    """A (1, C, H, W) .npy (what `sample --out x.npy --num 1` writes) passes read_array's shape check
    (stmd_fast/sample.py:57 looks at the last two axes and axis 0 only) and then crashes with a
    RuntimeError traceback in x.expand (line 60). Fix: after the x[None] for 2-D arrays, refuse
    x.ndim != 3 with the same 'resize'/shape ValueError (or squeeze a leading axis of size 1)."""
    _, mask, _ = inpaint_files
    obs = tmp_path / "obs.npy"
    np.save(obs, np.zeros((1, 1, 8, 8), np.float32))
    out = tmp_path / "c.npy"
    rc = sample(image_run, "--inpaint", obs, "--mask", mask, "--num", 2, "--out", out)
    if rc == 0:  # accepted as the single image it is: then it must have been used correctly
        np.testing.assert_array_equal(np.load(out)[:, :, :, :4], 0)
    else:
        assert rc == 2
        assert_one_line_error(capsys, "(1, 1, 8, 8)")


def test_npy_mask_nonzero_means_observed(capsys, image_run, tmp_path):
    """--help says the mask is 'nonzero/white = observed', but an .npy mask is used as given
    (stmd_fast/sample.py:45-48; only PNG masks are binarized, line 54), so a 0/255 uint8 mask gives
    m = 255 and the projection returns 255*y - 254*x0 instead of y. Fix: in read_array, binarize
    .npy masks too: `if as_mask: x = (x != 0).float()`."""
    observed = np.random.default_rng(2).uniform(-1, 1, (1, 8, 8)).astype(np.float32)
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[..., :4] = 255
    obs_path, mask_path, out = tmp_path / "obs.npy", tmp_path / "mask.npy", tmp_path / "c.npy"
    np.save(obs_path, observed)
    np.save(mask_path, mask)
    assert sample(image_run, "--inpaint", obs_path, "--mask", mask_path, "--num", 2, "--out", out) == 0
    c = np.load(out)
    for k in range(2):
        np.testing.assert_array_equal(c[k, :, :, :4], observed[:, :, :4])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_npy_mask_is_refused_not_read_as_observed(capsys, image_run, inpaint_files, tmp_path, bad):
    """NaN != 0 and inf != 0: a mask of NaNs became "every pixel observed" before the finite check saw it."""
    image, _, _ = inpaint_files
    mask = np.ones((1, 8, 8), np.float32)
    mask[..., 4:] = bad
    mask_path, out = tmp_path / "mask.npy", tmp_path / "c.npy"
    np.save(mask_path, mask)
    assert sample(image_run, "--inpaint", image, "--mask", mask_path, "--num", 2, "--out", out) == 2
    assert_one_line_error(capsys, "--mask", "NaN or inf")
    assert not out.exists()


def test_sample_unwritable_out_is_a_one_line_error(capsys, gmm_run, tmp_path):
    """stmd_fast/sample.py:100 creates --out's folder only after sampling and outside the try, so an
    --out under a file crashes with a FileExistsError/NotADirectoryError traceback (after all the
    sampling work). Fix: inside the try, before sampling, `out.parent.mkdir(parents=True,
    exist_ok=True)` and turn OSError into 'error: cannot write --out ...' (exit 2), as train does."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert sample(gmm_run, "--num", 2, "--out", blocker / "x.npy") == 2
    assert_one_line_error(capsys, "--out")


# ----------------------------------------------------------------------------- 9. inverse problems

def test_inverse_sr_noiseless_reproduces_the_measurement(capsys, image_run, inpaint_files, tmp_path):
    image, _, pixels = inpaint_files
    out = tmp_path / "sr.npy"
    assert sample(image_run, "--inverse", "sr2", "--observed", image, "--num", 3, "--steps", 2, "--out", out) == 0
    x = torch.from_numpy(np.load(out))
    truth = torch.from_numpy(pixels.astype(np.float32) / np.float32(127.5) - np.float32(1))
    y = torch.nn.functional.avg_pool2d(truth, 2)
    assert x.shape == (3, 1, 8, 8)
    assert (torch.nn.functional.avg_pool2d(x, 2) - y).abs().max() < 1e-5
    assert "DDNM" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--num", "0"], ["--num must be at least 1"]),
    (["--out", "x.jpg"], ["--out must end in .png or .npy"]),
    (["--zoom", "2", "--out", "x.npy"], ["drop --zoom"]),
    (["--observed", "y.png"], ["--observed goes with --inverse OPERATOR"]),
    (["--inverse", "sr2"], ["--observed IMAGE"]),
])
def test_sample_checks_its_flags_and_out_before_the_checkpoint_loads(capsys, image_run, tmp_path, monkeypatch, args,
                                                                       words):
    """They were checked after the whole checkpoint had loaded (seconds for a DiT-XL, onto the GPU first)."""
    import stmd_fast.checkpoint

    def never(*a, **k):
        raise AssertionError("the checkpoint loaded")

    monkeypatch.setattr(stmd_fast.checkpoint, "load_checkpoint", never)
    monkeypatch.chdir(tmp_path)
    assert sample(image_run, *args) == 2
    assert_one_line_error(capsys, *words)


def test_the_measurement_noise_of_an_image_is_not_the_samplers_own_noise(image_run, inpaint_files, tmp_path,
                                                                         monkeypatch):
    """y's --sigma-y noise and the chains' noise came from two generators of the same seed: one stream, twice."""
    import stmd_fast.sample as sample_module

    seeds = {}
    real_read = sample_module.read_observation

    def read_observation(path, operator, shape, sigma_y, generator, measured):
        seeds["y"] = generator.initial_seed()
        return real_read(path, operator, shape, sigma_y, generator, measured)

    monkeypatch.setattr(sample_module, "read_observation", read_observation)
    image, _, _ = inpaint_files
    assert sample(image_run, "--inverse", "sr2", "--observed", image, "--sigma-y", 0.1, "--num", 2, "--steps", 2,
                  "--seed", 5, "--out", tmp_path / "x.npy") == 0
    assert seeds == {"y": 6}  # the chains' generator is seeded with --seed (draw); evaluate inverse measures with + 1


def test_inverse_smc_takes_the_measurement_at_its_own_size(capsys, image_run, tmp_path):
    y = tmp_path / "y.npy"
    np.save(y, np.zeros((1, 2, 2), np.float32))
    out = tmp_path / "s.png"
    assert sample(image_run, "--inverse", "sr4", "--observed", y, "--sigma-y", 0.1, "--particles", 3, "--num", 2,
                  "--steps", 2, "--out", out) == 0
    assert tuple(read_png(out).shape[-2:]) == grid_size(3)  # A^+ y + 2 samples
    said = capsys.readouterr().out
    assert "SMC K=3" in said and "NFE 2 per chain, 3 chains each" in said  # each sample costs K chains


def test_a_measurement_file_is_used_as_given_and_an_image_is_measured(tmp_path):
    """gray's y (one channel) was read as an RGB image (a one-channel file fits one), measured and given
    --sigma-y noise a second time; inpaint's y has the image's size, so --measured says the file is y."""
    from stmd_fast.operators import Grayscale, Mask
    from stmd_fast.sample import read_observation

    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros((1, 8, 8), np.float32))
    rgb = tmp_path / "rgb.npy"
    np.save(rgb, np.full((3, 8, 8), 0.3, np.float32))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(read_observation(str(zeros), Grayscale(), (3, 8, 8), 0.5, gen()), torch.zeros(1, 8, 8))
    measured_rgb = read_observation(str(rgb), Grayscale(), (3, 8, 8), 0.0, gen())  # an image: measured
    assert measured_rgb.shape == (1, 8, 8) and torch.allclose(measured_rgb, torch.full((1, 8, 8), 0.3))
    red, gray = tmp_path / "red.png", tmp_path / "gray.png"
    Image.fromarray(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1))).save(red)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(gray)
    # a color PNG is an image, measured through A (the channel mean, -1/3), not its luma taken as y
    assert torch.allclose(read_observation(str(red), Grayscale(), (3, 8, 8), 0.0, gen()), torch.full((1, 8, 8), -1 / 3))
    assert torch.equal(read_observation(str(gray), Grayscale(), (3, 8, 8), 0.5, gen()), torch.ones(1, 8, 8))
    # --measured: the file is y; a color one was taken by its luma (PIL's "L": red read as 0.3 x 255), not refused
    with pytest.raises(ValueError, match=r"is a color image; the gray measurement is one channel .*drop --measured"):
        read_observation(str(red), Grayscale(), (3, 8, 8), 0.0, gen(), measured=True)
    gray_rgb = tmp_path / "gray_rgb.png"  # gray saved as RGB: its one channel, as it is
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(gray_rgb)
    assert torch.equal(read_observation(str(gray_rgb), Grayscale(), (3, 8, 8), 0.5, gen(), measured=True),
                       torch.ones(1, 8, 8))
    assert torch.equal(read_observation(str(zeros), Grayscale(), (3, 8, 8), 0.5, gen(), measured=True),
                       torch.zeros(1, 8, 8))
    mask = torch.ones(1, 8, 8)
    mask[:, :, 4:] = 0
    simulated = read_observation(str(zeros), Mask(mask), (1, 8, 8), 0.5, gen())  # a clean image: noise added
    assert simulated[mask.bool()].std() > 0.3 and (simulated[~mask.bool()] == 0).all()
    assert torch.equal(read_observation(str(zeros), Mask(mask), (1, 8, 8), 0.5, gen(), measured=True),
                       torch.zeros(1, 8, 8))


@pytest.mark.parametrize("args, words", [
    (["--inverse", "sr2"], ["--observed"]),
    (["--inverse", "sr2", "--observed", "IMG", "--particles", "4"], ["--sigma-y > 0"]),
    (["--particles", "4"], ["--inverse"]),
    (["--inverse", "gray", "--observed", "IMG"], ["RGB"]),
    (["--inverse", "inpaint", "--observed", "IMG"], ["--mask"]),
    (["--inverse", "sr4", "--observed", "SMALL"], ["sr4 measurement (1, 2, 2)", "(1, 8, 8)"]),
])
def test_inverse_bad_input_is_one_line(capsys, image_run, inpaint_files, tmp_path, args, words):
    image, _, _ = inpaint_files
    small = tmp_path / "small.png"
    write_png(np.zeros((1, 5, 5), dtype=np.uint8), small)
    args = [str(image) if a == "IMG" else str(small) if a == "SMALL" else a for a in args]
    assert sample(image_run, *args, "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, *words)
    assert not (tmp_path / "x.npy").exists()


# ----------------------------------------------------------------------------- a new user's paths, images and masks

def _tiny_images(path: Path, channels: int = 1, count: int = 16, seed: int = 0) -> Path:
    np.save(path, np.random.default_rng(seed).integers(0, 256, (count, channels, 8, 8), dtype=np.uint8))
    return path


def test_a_run_saves_its_data_path_absolute_and_resumes_from_anywhere(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    data, run = _tiny_images(work / "tiny.npy"), tmp_path / "run"
    monkeypatch.chdir(work)
    assert train("--data", "tiny.npy", "--steps", 1, "--batch-size", 8, "--device", "cpu", "--out", run) == 0
    assert json.loads((run / "config.json").read_text())["config"]["data"] == str(data)
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved path still finds the data
    assert train("--out", run, "--resume", "--steps", 2, "--device", "cpu") == 0
    monkeypatch.chdir(work)  # and the relative spelling it was started with is the same data
    assert train("--data", "tiny.npy", "--out", run, "--resume", "--steps", 3, "--device", "cpu") == 0
    assert checkpoint_steps(run)[-1] == 3


def test_resume_on_data_of_another_shape_is_refused_and_a_new_count_is_said(tmp_path, capsys):
    data, run = _tiny_images(tmp_path / "d.npy"), tmp_path / "run"
    assert train("--data", data, "--steps", 1, "--batch-size", 8, "--device", "cpu", "--out", run) == 0
    _tiny_images(data, channels=3)
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 2, "--device", "cpu") == 2
    assert_one_line_error(capsys, "(1, 8, 8)", "(3, 8, 8)", "another --out")
    _tiny_images(data, count=24)
    assert train("--out", run, "--resume", "--steps", 2, "--device", "cpu") == 0
    assert "now holds 24 samples, where the run was trained on 16" in capsys.readouterr().err


def test_a_data_folder_gets_its_own_name_and_no_run_inside_it(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(2):
        write_png(np.full((1, 8, 8), 40 * i, np.uint8), folder / f"{i}.png")
    cfg, _ = train_module.resolve_config({"data": "pics/."})
    assert cfg.out == "runs/pics-stmd" and cfg.data == str(folder)
    monkeypatch.chdir(folder)  # --data . and the default --out: runs/ would land among the images
    assert train("--data", ".", "--steps", 1, "--device", "cpu") == 2
    assert_one_line_error(capsys, "lies inside --data", "outside")
    assert not (folder / "runs").exists()


def test_a_data_file_that_is_not_an_array_says_what_to_pass(tmp_path, capsys):
    png = tmp_path / "pics" / "0.png"
    png.parent.mkdir()
    write_png(np.zeros((1, 8, 8), np.uint8), png)
    assert train("--data", png, "--steps", 1, "--device", "cpu") == 2
    assert_one_line_error(capsys, "one file of your images", f"--data {png.parent}")
    channels_last = tmp_path / "hwc.npy"
    np.save(channels_last, np.zeros((4, 8, 8, 3), np.uint8))
    assert train("--data", channels_last, "--steps", 1, "--device", "cpu") == 2
    assert_one_line_error(capsys, "(N, H, W, C)", "x.transpose(0, 3, 1, 2)")


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_16_bit_and_float_grayscale_images_are_scaled_not_clipped(tmp_path, mode):
    from stmd_fast.data.images import load_image_folder

    levels = np.arange(64).reshape(8, 8) * 4  # 0..252, the 8-bit values expected back
    stored = (levels * 257).astype(np.uint16) if mode == "I;16" else (levels / 255).astype(np.float32)
    path = tmp_path / ("a.png" if mode == "I;16" else "a.tiff")
    Image.fromarray(stored).save(path)
    if mode == "F":  # the folder reader takes JPEG/PNG; a float image reaches it only through read_array
        from stmd_fast.sample import read_array

        x = read_array(str(path), (1, 8, 8), "--inpaint")
        assert torch.allclose((x[0] + 1) * 127.5, torch.from_numpy(levels).float(), atol=1e-4)
        return
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # a true 16-bit file, not one Pillow stored as 8 bits
    data = load_image_folder(tmp_path, 8)
    assert data.values.shape == (1, 1, 8, 8)
    assert torch.equal(data.values[0, 0], torch.from_numpy(levels).to(torch.uint8))


def test_masks_are_read_as_drawn_and_an_empty_one_is_refused(tmp_path):
    from stmd_fast.sample import read_array

    half = np.zeros((8, 8), np.uint8)
    half[:, :4] = 1
    soft = half * 255
    soft[0, 4] = 100  # an anti-aliased edge pixel of a 0/255 mask: still unobserved
    for name, pixels in (("zero-one.png", half), ("drawn.png", soft)):
        write_png(pixels[None], tmp_path / name)
        mask = read_array(str(tmp_path / name), (1, 8, 8), "--mask", as_mask=True)
        assert torch.equal(mask[0], torch.from_numpy(half).float()), name
    write_png(np.zeros((1, 8, 8), np.uint8), tmp_path / "none.png")
    np.save(tmp_path / "none.npy", np.zeros((8, 8)))
    for name in ("none.png", "none.npy"):
        with pytest.raises(ValueError, match="marks no pixel as observed"):
            read_array(str(tmp_path / name), (1, 8, 8), "--mask", as_mask=True)


def test_sample_reads_an_image_upright_as_training_does(tmp_path):
    """--inpaint/--mask/--observed ignored the EXIF Orientation that training applies: a phone photo was
    completed sideways, and a mask drawn on the upright view did not line up with it."""
    from stmd_fast.data.images import read_image
    from stmd_fast.sample import read_array

    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:4, :, 0] = 255  # red band in the stored top rows; Orientation 6: the upright view turns it
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.png", exif=exif)
    trained_on = read_image(tmp_path / "phone.png", 16)[0].float() / 127.5 - 1
    assert not torch.equal(trained_on, torch.from_numpy(stored).permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(read_array(str(tmp_path / "phone.png"), (3, 16, 16), "--inpaint"), trained_on)


def test_first_ctrl_c_says_at_once_what_happens_next(capsys):
    import os
    import signal

    with train_module.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
    err = capsys.readouterr().err
    assert "Ctrl-C: stopping after this step, with a checkpoint" in err and "a second Ctrl-C quits at once" in err


def test_example_data_wants_a_fresh_folder(tmp_path, capsys):
    from stmd_fast.data.example import main as example_main

    (tmp_path / "file").write_text("x")
    (tmp_path / "demo" / "images").mkdir(parents=True)
    (tmp_path / "demo" / "images" / "0000.png").write_bytes(b"")
    for out, words in ((tmp_path / "file", ("is a file",)), (tmp_path / "demo", ("already holds files",))):
        with pytest.raises(SystemExit) as exit_:  # main is the library call; the command is cli (it returns 2)
            example_main(["--out", str(out), "--num", "1"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    # a --num that the disk cannot take: it wrote images until the disk was full (or the user stopped it)
    with pytest.raises(SystemExit) as exit_:
        example_main(["--out", str(tmp_path / "big"), "--num", str(10**12)])
    assert exit_.value.code == 2 and "GB free: lower --num" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_evaluate_and_sample_bounds_in_one_line():
    from argparse import Namespace

    from stmd_fast.evaluate import EvalError, build_metric, parse_settings
    from stmd_fast.operators import DDNM, make_operator
    from stmd_fast.sample import MAX_ZOOM, check_counts

    for stmd in ("2", "2x2x2"):
        with pytest.raises(EvalError, match="NxM"):
            parse_settings(Namespace(stmd=stmd, meanflow_steps="1", ddpm_steps="1"))
    own = {"config": {"data": "/data/grayonly", "preset": "images"}, "data_shape": [1, 8, 8]}
    with pytest.raises(EvalError, match="for /data/grayonly use --metric fid"):
        build_metric(own, Namespace(metric="fd", classifier=None, inception_weights=None, batch_size=8), "cpu")
    check_counts(Namespace(num=1, batch_size=1, zoom=MAX_ZOOM))
    with pytest.raises(ValueError, match=f"--zoom {MAX_ZOOM + 1}: at most {MAX_ZOOM}"):
        check_counts(Namespace(num=1, batch_size=1, zoom=MAX_ZOOM + 1))
    with pytest.raises(ValueError, match=r"number in \[0, 1000\] .*got nan"):
        DDNM(make_operator("gray"), torch.zeros(1, 8, 8), sigma_y=float("nan"))
    # a setting named twice was sampled and tabled twice
    with pytest.raises(EvalError, match="--stmd 1x1,2x1,1x1 names a setting twice"):
        parse_settings(Namespace(stmd="1x1,2x1,1x1", meanflow_steps="1", ddpm_steps="1"))
    with pytest.raises(EvalError, match="--meanflow-steps 2,2 names a setting twice"):
        parse_settings(Namespace(stmd="1x1", meanflow_steps="2,2", ddpm_steps="1"))


def test_a_bad_inception_weights_file_is_named(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from stmd_fast.metrics import _inception_fid

    bad = tmp_path / "pt_inception.pth"
    bad.write_bytes(b"half a download")
    with pytest.raises(RuntimeError, match="is not the Inception weights file"):
        _inception_fid(FrechetInceptionDistance, str(bad))


def test_a_long_warmup_gets_a_note(capsys, tmp_path):
    assert train(*GMM, "--steps", 2, "--warmup-steps", 10, "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "note: --warmup-steps 10 outlasts --steps 2: the learning rate is still warming up" in err
    assert train(*GMM, "--steps", 2, "--warmup-steps", 1, "--out", tmp_path / "other") == 0
    assert "warm" not in capsys.readouterr().err
    assert train(*GMM, "--steps", 2, "--out", tmp_path / "third") == 0  # the preset's warm-up: a quick trial
    assert "warm" not in capsys.readouterr().err


def test_resume_messages_name_flags_as_typed():
    from stmd_fast.train import as_flag

    assert as_flag("tf32", False) == "--no-tf32" and as_flag("tf32", True) == "--tf32"
    assert as_flag("flip", False) == "--no-flip" and as_flag("flip", True) == "--flip"
    assert as_flag("ema_decays", [0.9, 0.99]) == "--ema-decays 0.9 0.99"
    assert as_flag("ema_decays", []) == "no --ema-decays"
    assert as_flag("unet", None).startswith("--unet unset") and as_flag("lr", 0.001) == "--lr 0.001"


def test_resume_takes_a_restated_default_network_and_a_new_tf32(capsys, tmp_path):
    """An image folder's default U-Net is recorded by name, so --unet B restates it on --resume; --tf32 is a
    device setting (no effect on a CPU) that --resume may change. Another size is still refused."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        write_png(np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8), images / f"{i}.png")
    run = tmp_path / "run"
    base = ["--data", images, "--resolution", 16, "--batch-size", 4, "--device", "cpu", "--out", run,
            "--sample-every", 0]
    assert train(*base, "--steps", 1) == 0
    assert json.loads((run / "config.json").read_text())["config"]["unet"] == "B"
    assert train(*base, "--steps", 2, "--resume", "--unet", "B", "--no-tf32") == 0
    capsys.readouterr()
    assert train(*base, "--steps", 3, "--resume", "--unet", "S") == 2
    assert_one_line_error(capsys, "was trained with --unet B, not --unet S")


def test_ctrl_c_after_the_last_step_says_the_run_finished_and_exits_0(capsys, tmp_path, monkeypatch):
    """A Ctrl-C while a finished run winds down (after its last checkpoint) is not a start-up interrupt."""
    from stmd_fast import distributed

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "teardown", interrupted)
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 2, "--out", run) == 0
    err = capsys.readouterr().err
    assert f"interrupted after the run finished: step 2 is saved in {run}" in err and "start-up" not in err
    assert "final sample grid" not in err  # it was drawn


def test_a_finished_runs_grid_drawn_by_resume_reaches_the_loggers_too(capsys, tmp_path):
    """The resume that only finishes the last step's grid (or FD) wrote them to samples/ and metrics.jsonl
    but opened no logger: TensorBoard and W&B never got them, whatever later resumes did."""
    import shutil

    from test_loggers import tensorboard_scalars

    run = tmp_path / "run"
    base = ["--batch-size", 8, "--steps", 2, "--log-every", 1, "--loggers", "tensorboard", "--device", "cpu",
            "--out", run]
    assert train(*base) == 0
    (run / "samples" / "step_00000002.png").unlink()  # as if killed before the grid, with its event files
    shutil.rmtree(run / "tensorboard")
    capsys.readouterr()
    assert train(*base, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out and (run / "samples" / "step_00000002.png").exists()
    scalars, images = tensorboard_scalars(run / "tensorboard")
    assert images == {"samples": [2]} and [step for step, _ in scalars["loss"]] == [1, 2]


def test_a_stop_after_the_last_checkpoint_names_what_it_left_unwritten(capsys, tmp_path):
    """A stop during the final FD said only "interrupted after the run finished" (exit 0), while the step's
    record, which waits for its FD, was missing from metrics.jsonl."""
    from types import SimpleNamespace

    run = tmp_path / "run"
    assert train(*GMM, "--steps", 2, "--out", run) == 0
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))  # the step 2 record
    capsys.readouterr()
    assert train_module.interrupted_outside_the_loop(SimpleNamespace(out=run, steps=2)) == 0
    assert (f"its step 2 record (with its FD) was not written: python -m stmd_fast.train --out {run} --resume "
            f"makes it") in capsys.readouterr().err
    for grid in (run / "samples").glob("step_00000002.*"):
        grid.unlink()
    assert train_module.interrupted_outside_the_loop(SimpleNamespace(out=run, steps=2)) == 0
    assert "its final sample grid and its step 2 record (with its FD) were not written" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_copied_in_from_another_run(capsys, tmp_path):
    """A DDPM checkpoint copied into an STMD run's checkpoints/ as step_00000070 was resumed "at step 10" and
    trained on as the run: config.json turned ddpm, metrics.jsonl mixed both, and the run's own checkpoints
    were rotated out. Now one line names it, and nothing changes."""
    import shutil

    run, other = tmp_path / "run", tmp_path / "other"
    assert train(*GMM, "--steps", 4, "--ckpt-every", 2, "--keep-checkpoints", 2, "--out", run) == 0
    assert train(*GMM, "--method", "ddpm", "--steps", 2, "--out", other) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "config.json").read_text()
    foreign = run / "checkpoints" / "step_00000070"
    shutil.copytree(other / "checkpoints" / "step_00000002", foreign)
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 80) == 2
    line = assert_one_line_error(capsys, f"--resume: {foreign} is not a checkpoint of the run in {run}")
    assert "it holds step 2" in line and "its method is ddpm, the run's stmd" in line and "move it out" in line
    shutil.rmtree(foreign)
    shutil.copytree(run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000006")  # renamed
    assert train("--out", run, "--resume", "--steps", 80) == 2
    assert "(it holds step 4)" in assert_one_line_error(capsys, "is not a checkpoint of the run")
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    assert (sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "config.json").read_text()) == before
    assert train("--out", run, "--resume", "--steps", 6) == 0  # its own checkpoints still resume
    # a kill between the two renames of a checkpoint saved again leaves .replaced-step_X, read as step_X
    (run / "checkpoints" / "step_00000006").rename(run / "checkpoints" / ".replaced-step_00000006")
    assert train("--out", run, "--resume", "--steps", 8) == 0


def test_resume_tells_runs_of_the_same_setup_apart_by_their_run_id(capsys, tmp_path):
    """A checkpoint of another run of the same method, preset and data, copied in under its own step's name,
    was resumed as the run's own. Every run now has an id in its config.json and checkpoints: a resume keeps
    it, a copy of the whole run folder (a branch) keeps it, another run's checkpoint is refused by it."""
    import shutil

    run, other, branch = tmp_path / "run", tmp_path / "other", tmp_path / "branch"
    assert train(*GMM, "--steps", 2, "--out", run) == 0
    assert train(*GMM, "--steps", 4, "--out", other) == 0
    run_id = json.loads((run / "config.json").read_text())["run_id"]
    assert run_id != json.loads((other / "config.json").read_text())["run_id"]
    assert json.loads((run / "checkpoints" / "step_00000002" / "config.json").read_text())["run_id"] == run_id
    shutil.copytree(run, branch)
    shutil.copytree(other / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000004")
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 6) == 2
    assert "another run wrote it" in assert_one_line_error(capsys, "is not a checkpoint of the run")
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    assert train("--out", run, "--resume", "--steps", 4) == 0
    assert train("--out", branch, "--resume", "--steps", 4) == 0
    for folder in (run, branch):
        assert {json.loads((c / "config.json").read_text())["run_id"]
                for c in [folder, *(folder / "checkpoints").glob("step_*")]} == {run_id}


def test_resume_may_change_the_sample_grids_n_and_m(capsys, tmp_path):
    """--sample-steps, --sample-flow-steps and --sample-ddpm-steps say how the grids (and --fd-every's samples)
    are drawn, not how the run trains: a --resume that changed them was refused as another experiment."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 2, "--out", run) == 0
    assert train("--out", run, "--resume", "--steps", 4, "--sample-steps", 3, "--sample-flow-steps", 2) == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["sample_steps"], saved["sample_flow_steps"]) == (3, 2)
    # still bounded, also where the run's saved M meets a new N: that resume hung on a grid of 10^6 calls
    assert train(*GMM, "--steps", 2, "--sample-flow-steps", 1000, "--out", tmp_path / "m") == 0
    assert train("--out", tmp_path / "m", "--resume", "--steps", 3, "--sample-steps", 1000) == 2
    assert_one_line_error(capsys, "--resume: --sample-steps 1000 x --sample-flow-steps 1000")


def test_a_leading_tilde_in_out_or_data_is_the_home_folder(capsys, tmp_path, monkeypatch):
    """--out=~/runs/x (the shell leaves ~ as typed after =) made a folder named ~ in the current folder, where
    rm -rf ~ cleans up the wrong thing; and --data=~/x.npy was read. Both are under the home folder now, also
    through the Python API."""
    import numpy as np

    from stmd_fast.config import TrainConfig

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    np.save(home / "x.npy", np.random.default_rng(0).integers(0, 256, (8, 1, 8, 8), dtype=np.uint8))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert train("--data=~/x.npy", "--steps", 1, "--batch-size", 4, "--out=~/runs/x") == 0
    assert (home / "runs" / "x" / "checkpoints").is_dir() and list(cwd.iterdir()) == []
    assert json.loads((home / "runs" / "x" / "config.json").read_text())["config"]["data"] == str(home / "x.npy")
    cfg = TrainConfig(data="~/x.npy", out="~/runs/y")
    assert (cfg.data, cfg.out) == (str(home / "x.npy"), str(home / "runs" / "y"))


def test_resume_into_a_file_and_weights_erased_by_decay_or_a_runaway_p_are_one_line(capsys, tmp_path):
    """--out FILE --resume said "cannot read FILE/config.json ... fix the file system"; --weight-decay 1e308 and
    --adaptive-p 1e308 trained into a non-finite loss that blamed --lr."""
    (tmp_path / "grid.npy").write_bytes(b"")
    assert train("--out", tmp_path / "grid.npy", "--resume") == 2
    assert_one_line_error(capsys, f"--out {tmp_path / 'grid.npy'} is a file, not a folder")
    assert train(*GMM, "--steps", 1, "--weight-decay", 1000, "--lr", 1e-3, "--out", tmp_path / "r") == 2
    assert_one_line_error(capsys, "--weight-decay 1000 at --lr 0.001", "lr x weight_decay must stay below 1")
    assert train(*GMM, "--steps", 1, "--adaptive-p", 1e308, "--out", tmp_path / "r") == 2
    assert_one_line_error(capsys, "--adaptive-p 1e+308: the recipes use 0 to 2", "give a p in [0, 4]")
    # a huge c: the float32 weight was 0, every logged loss 0.0 and the weights never moved, exit 0
    assert train(*GMM, "--steps", 1, "--adaptive-c", 1e300, "--out", tmp_path / "r") == 2
    assert_one_line_error(capsys, "--adaptive-c 1e+300: the weight", "stops learning", "c = 1e-3 to 1e-2")
    assert train(*GMM, "--steps", 1, "--adaptive-c", 1e300, "--adaptive-p", 0, "--out", tmp_path / "p0") == 0  # 1
    assert train(*GMM, "--steps", 1, "--adaptive-c", 1e-300, "--adaptive-p", 2, "--out", tmp_path / "tiny") == 0
    assert not (tmp_path / "r").exists()
    # a checkpoint saved before these checks still loads, and resumes
    from stmd_fast.checkpoint import saved_config, verify_checkpoint

    assert train(*GMM, "--steps", 1, "--adaptive-p", 6, "--out", tmp_path / "old") == 2
    assert train(*GMM, "--steps", 1, "--out", tmp_path / "old") == 0
    ckpt = tmp_path / "old" / "checkpoints" / "step_00000001"
    meta = verify_checkpoint(ckpt)
    meta["config"]["objective"]["adaptive_p"], meta["config"]["weight_decay"] = 6.0, 2000.0
    assert saved_config(ckpt, meta).objective.adaptive_p == 6.0


def test_the_python_api_refuses_a_field_of_the_wrong_kind():
    """TrainConfig(steps=2.5) trained past step 2.5 without a checkpoint and returned None; log="tensorboard" was
    read letter by letter ("--loggers t e n s o r b o a r d names a logger twice")."""
    from stmd_fast.config import TrainConfig

    for fields, said in [({"steps": 2.5}, "steps must be a whole number, got 2.5"),
                         ({"batch_size": True}, "batch_size must be a whole number"),
                         ({"data_workers": 1.5}, "data_workers must be a whole number"),
                         ({"log": "tensorboard"}, "log must be a tuple (or list), got 'tensorboard'")]:
        with pytest.raises(TypeError, match=re.escape(said)):
            TrainConfig(**fields)
    assert TrainConfig(data_workers=None, log=["tensorboard"], ema_decays=[0.9]).log == ("tensorboard",)


def test_resuming_a_finished_run_draws_its_missing_final_grid(capsys, tmp_path):
    """The last step's grid is drawn whatever --sample-every says; one a stop or kill left undone was not
    drawn again by --resume unless the last step was also a multiple of --sample-every."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 2, "--sample-every", 1000, "--out", run) == 0
    (grid,) = (run / "samples").glob("step_00000002.*")
    first = grid.read_bytes()
    grid.unlink()
    capsys.readouterr()
    assert train(*GMM, "--steps", 2, "--sample-every", 1000, "--out", run, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out and grid.read_bytes() == first  # the same fixed noise


# ----------------------------------------------------------------------------- flags: third round of probes

@pytest.mark.parametrize("argv, words", [
    (["--out", ""], ["--out is empty"]),                       # it meant the current folder
    (["--data", ""], ["--data is empty"]),
    (["--loggers", "tensorboard", ""], ["--loggers", "invalid choice: ''"]),
    (["--seed", str(2**64)], ["--seed 18446744073709551616", "[0, 2^63)"]),  # was a traceback after the data loaded
    (["--seed", "-1"], ["--seed -1", "[0, 2^63)"]),
    (["--sample-ev", "5"], ["unrecognized arguments: --sample-ev"]),  # no prefixes: --sample-every was taken
    (["--loggers", "tensorboard", "tensorboard"], ["names a logger twice"]),
])
def test_empty_values_out_of_range_seeds_prefixes_and_twice_named_loggers_are_refused(capsys, tmp_path, argv, words):
    try:
        code = train(*GMM, "--steps", 1, *argv)
    except SystemExit as stop:  # argparse's own refusals exit from the parser
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error:" in err[0] and all(w in err[0] for w in words), err
    assert not any(tmp_path.iterdir())  # nothing written in the current folder


def test_sample_refuses_flags_that_would_be_ignored(capsys, gmm_run, gmm_meanflow_run, image_run, tmp_path):
    from stmd_fast.export import main as export_main

    program = tmp_path / "p.pt2"
    assert export_main([str(image_run), "--steps", "1", "--batch", "2", "--device", "cpu", "--out", str(program)]) == 0
    capsys.readouterr()
    digit = tmp_path / "d.png"
    write_png(np.zeros((1, 8, 8), dtype=np.uint8), digit)
    # an exported program samples unconditionally: the posterior's flags were dropped without a word
    assert sample("--exported", program, "--inverse", "sr4", "--observed", digit, "--sigma-y", 0.1,
                  "--out", tmp_path / "x.png") == 2
    assert_one_line_error(capsys, "--inverse, --observed, --sigma-y cannot be used with --exported")
    assert sample(image_run, "--zoom", 4, "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, "--zoom enlarges the pixels of a .png grid", "drop --zoom")
    assert sample("--exported", program, "--zoom", 4, "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, "drop --zoom")
    assert sample(gmm_meanflow_run, "--grid", "uniform", "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, "--grid: Mean Flow samples from s = 1", "drop --grid")
    assert export_main([str(gmm_meanflow_run), "--grid", "uniform", "--out", str(tmp_path / "m.pt2")]) == 2
    assert_one_line_error(capsys, "--grid: Mean Flow")
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("sigma_y", ["1e200", "nan", "-0.5"])
def test_a_sigma_y_outside_the_datas_scale_is_one_line(capsys, image_run, inpaint_files, tmp_path, sigma_y):
    """1e200 gave all-NaN samples (DDNM+) or an OverflowError traceback (SMC)."""
    image, _, _ = inpaint_files
    for extra in ([], ["--particles", "2"]):
        assert sample(image_run, "--inverse", "sr4", "--observed", image, "--sigma-y", sigma_y, "--steps", 2, *extra,
                      "--out", tmp_path / "x.npy") == 2
        assert_one_line_error(capsys, "--sigma-y must be a number in [0, 1000]")


def test_a_chain_that_would_ignore_the_observation_is_refused_on_the_command_line(capsys, image_run, inpaint_files,
                                                                                 tmp_path):
    """--inpaint and --inverse (DDNM, DDNM+) at N = 1, STMD's default, printed "completions" and "posterior samples"
    that were the seed's unconditional draws with the observation pasted in. Refused when asked for; N = 8 when
    --steps is not given."""
    image, mask, _ = inpaint_files
    for flags in (["--inverse", "sr4", "--observed", image], ["--inverse", "sr4", "--observed", image, "--sigma-y", 0.1],
                  ["--inpaint", image, "--mask", mask]):
        assert sample(image_run, *flags, "--steps", 1, "--out", tmp_path / "x.npy") == 2
        assert_one_line_error(capsys, "N = 1 is the last step", "unconditional draws", "--particles K")
        assert sample(image_run, *flags, "--num", 2, "--out", tmp_path / "x.npy") == 0
        assert "(stmd, N=8, M=1, NFE 8" in capsys.readouterr().out


def test_notes_for_a_metric_flag_of_the_other_metric_and_a_preset_whose_network_the_data_replaces(
        capsys, tmp_path, image_npy):
    assert train("--preset", "digits", "--steps", 1, "--fd-every", 1, "--fd-num", 16, "--sample-every", 0,
                 "--inception-weights", tmp_path / "w.pth", "--device", "cpu", "--out", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "note: --inception-weights has no effect on this run: digits is scored by FD" in err
    assert train("--preset", "gmm", "--data", image_npy, "--steps", 1, "--batch-size", 8, "--device", "cpu",
                 "--out", tmp_path / "b") == 0
    err = capsys.readouterr().err
    assert "note: --preset gmm with --data: the preset's training settings are kept, its network is not" in err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["net"]["kind"] == "unet"


def test_train_help_shows_defaults_as_typed_and_no_internal_names(capsys):
    assert train("--help") == 0
    out = capsys.readouterr().out
    for internal in ("TIME_SAMPLERS", "S_SAMPLERS", "jvp_block", "default: ()", "default: (1,"):
        assert internal not in out, internal
    assert "[default: 1 2 4]" in out and "[default: none]" in out


def test_gmm_names_its_own_flags(capsys, gmm_run):
    from stmd_fast.gmm import main as gmm_main

    for flag in ("--flow-steps", "--points"):
        assert gmm_main([str(gmm_run), flag, "0"]) == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_a_write_failure_names_a_bytes_path_as_text(capsys, tmp_path, monkeypatch):
    """TensorBoard's writer reports its event file as bytes: the line read "could not write b'/...'"."""
    def fails(*args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "events.out").encode())

    monkeypatch.setattr(train_module, "train", fails)
    assert train(*GMM, "--steps", 1, "--out", tmp_path / "run") == 1
    assert_one_line_error(capsys, f"could not write {tmp_path / 'run' / 'events.out'}: Permission denied")


def test_crashtest_stopped_is_one_line_and_leaves_no_run_behind(capsys, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM to crashtest ended in a traceback and death by the signal (exit -2)."""
    import signal

    from stmd_fast import crashtest

    def interrupted(out, steps):
        real_start(out, steps)
        os.kill(os.getpid(), signal.SIGTERM)  # stops the crashtest while its reference run trains
        signal.pause()  # not reached: the handler raises

    real_start = crashtest.start
    monkeypatch.setattr(crashtest, "start", interrupted)
    assert crashtest.main(["--out", str(tmp_path / "crash"), "--kills", "1", "--steps", "20"]) == 143
    assert capsys.readouterr().err.strip() == "interrupted"
    assert crashtest.STARTED and all(process.poll() is not None for process in crashtest.STARTED)


def test_crashtest_says_a_start_that_hangs(capsys, tmp_path, monkeypatch):
    """A start with no checkpoint by the deadline, still running, was a TypeError traceback (None + seconds)."""
    from stmd_fast import crashtest

    def start(out, steps):  # the reference run ends at once; the test run hangs
        command = ["true"] if out.name == "reference" else [sys.executable, "-c", "import time; time.sleep(60)"]
        crashtest.STARTED.append(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
        return crashtest.STARTED[-1]

    monkeypatch.setattr(crashtest, "start", start)
    times = iter([1.0, 1.0])  # the reference run's first and last checkpoint
    monkeypatch.setattr(crashtest, "first_checkpoint_after", lambda *args: next(times, None))
    monkeypatch.setattr(crashtest, "second_run_refused", lambda out: None)
    monkeypatch.setattr(crashtest, "train_command", lambda *args, **kwargs: ["false"])  # the final resume
    assert crashtest.main(["--out", str(tmp_path / "crash"), "--kills", "1", "--steps", "20"]) == 1
    out = capsys.readouterr().out
    assert "start 1 wrote no checkpoint within 10 minutes (hung), killed" in out.splitlines()[-2]
    assert all(process.poll() is not None for process in crashtest.STARTED)


def test_crashtest_keeps_a_folder_it_did_not_make(capsys, tmp_path):
    from stmd_fast.crashtest import main as crashtest_main

    (tmp_path / "mine" / "live").mkdir(parents=True)
    (tmp_path / "mine" / "live" / "data.txt").write_text("keep me")
    assert crashtest_main(["--out", str(tmp_path / "mine"), "--kills", "1", "--steps", "20"]) == 2
    assert "holds files a crashtest did not make" in capsys.readouterr().err
    assert (tmp_path / "mine" / "live" / "data.txt").read_text() == "keep me"


def test_config_refuses_an_empty_out_and_path_from_python(tmp_path):
    from stmd_fast.config import TrainConfig

    with pytest.raises(ValueError, match="--out is empty"):
        TrainConfig(out="")
    with pytest.raises(ValueError, match="empty path would mean the current folder"):
        TrainConfig(data="", out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"\[0, 2\^63\)"):
        TrainConfig(seed=2**63, out=str(tmp_path / "r"))


def test_a_resumable_switch_and_the_loggers_can_be_turned_off_on_resume(tmp_path):
    """--help lists --compile, --strict-data and --loggers among what --resume may change, but they could only be
    turned on: there was no --no-compile, and --loggers took no value meaning none."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 1, "--strict-data", "--loggers", "tensorboard", "--out", run) == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["strict_data"] is True and saved["log"] == ["tensorboard"]
    assert train(*GMM, "--steps", 2, "--no-strict-data", "--loggers", "none", "--out", run, "--resume") == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["strict_data"] is False and saved["log"] == []
    assert train(*GMM, "--steps", 3, "--no-compile", "--out", run, "--resume") == 0


@pytest.mark.parametrize("flag", ["--sample-steps", "--sample-flow-steps", "--sample-ddpm-steps"])
def test_sampling_steps_beyond_the_samplers_bound_are_refused_before_training(capsys, tmp_path, flag):
    """They passed the config and failed with a traceback at the first sample grid, after the training (and
    on every resume, which refuses to change them)."""
    assert train(*GMM, "--steps", 1, flag, 200_000, "--out", tmp_path / "run") == 2
    assert_one_line_error(capsys, f"{flag} 200000: at most 100000 steps")
    assert not (tmp_path / "run").exists()


def test_a_sample_grid_whose_n_times_m_cannot_finish_is_refused_before_training(capsys, tmp_path):
    """N and M each in bounds, 10^10 network calls per sample together: the final grid ran on after training."""
    assert train(*GMM, "--steps", 1, "--sample-steps", 1000, "--sample-flow-steps", 1000, "--out", tmp_path / "r") == 2
    assert_one_line_error(capsys, "--sample-steps 1000 x --sample-flow-steps 1000: 1000000 network evaluations",
                          "at most 100000")
    assert not (tmp_path / "r").exists()
    # only the method's own grid counts: DDPM's N is --sample-ddpm-steps, Mean Flow's N is 1
    assert train(*GMM, "--method", "meanflow", "--steps", 1, "--sample-steps", 1000, "--sample-flow-steps", 100,
                 "--out", tmp_path / "m") == 0


def test_log_none_with_a_logger_is_refused(capsys, tmp_path):
    assert train(*GMM, "--steps", 1, "--loggers", "none", "tensorboard", "--out", tmp_path / "run") == 2
    assert_one_line_error(capsys, "'none' means no logger; give it alone")


def test_the_fd_measurement_comes_after_the_checkpoint(monkeypatch, tmp_path, capsys):
    """--fd-every measured before the step's checkpoint: a long measurement (a stop waits for it) or one that
    failed cost the training since the last checkpoint. Now the checkpoint is written first (holding the step's
    record), and the record, FD included, after the measurement; a resume after a failed or killed measurement
    measures the checkpoint's FD again (its EMA is in the checkpoint; it was lost for good) and logs the
    record once, as an uninterrupted run does; without --fd-every then, the record is logged without it."""
    import stmd_fast.train as train_module

    def failing(run, ema):
        raise RuntimeError("the measurement failed")

    measure_fd = train_module.measure_fd
    monkeypatch.setattr(train_module, "measure_fd", failing)
    run = tmp_path / "run"
    args = ["--preset", "digits", "--fd-every", 2, "--fd-num", 16, "--sample-every", 0, "--log-every", 1,
            "--device", "cpu", "--out", run]
    with pytest.raises(RuntimeError, match="the measurement failed"):
        train(*args, "--steps", 2)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    monkeypatch.setattr(train_module, "measure_fd", measure_fd)
    for_later = tmp_path / "copy"
    shutil.copytree(run, for_later)
    capsys.readouterr()
    assert train(*args, "--steps", 4, "--resume") == 0
    assert "step 2: its FD, which the stopped process did not log, is measured now" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    whole = tmp_path / "whole"
    assert train(*[a for a in args if a != run], whole, "--steps", 4) == 0
    uninterrupted = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "FD/ema0.999"):
        assert [r.get(key) for r in records] == [r.get(key) for r in uninterrupted], key
    assert train(*[a for a in args if a != run], for_later, "--steps", 4, "--resume", "--fd-every", 0) == 0
    records = [json.loads(line) for line in (for_later / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and not any(k.startswith("FD/") for k in records[1])


def test_a_resume_that_changes_how_fd_is_measured_says_the_series_changes_there(tmp_path, capsys):
    """--fd-num 16 -> 24 on --resume: the logged FD jumped at the resume, measured on other sample counts, unsaid."""
    run = tmp_path / "run"
    args = ["--preset", "digits", "--fd-every", 1, "--sample-every", 0, "--device", "cpu", "--out", run]
    assert train(*args, "--fd-num", 16, "--steps", 1) == 0
    capsys.readouterr()
    assert train(*args, "--fd-num", 16, "--steps", 2, "--resume") == 0
    assert "measured otherwise" not in capsys.readouterr().err  # restated, not changed
    assert train(*args, "--fd-num", 24, "--steps", 3, "--resume") == 0
    assert ("note: --resume with --fd-num 16 -> --fd-num 24: the FD logged from step 2 on is measured otherwise"
            in capsys.readouterr().err)
    # the grids' N (its samples are drawn as the grids'), not DDPM's N, which an STMD run does not read
    assert train(*args, "--fd-num", 24, "--steps", 4, "--resume", "--sample-steps", 2) == 0
    assert "note: --resume with --sample-steps 1 -> --sample-steps 2: the FD" in capsys.readouterr().err
    assert train(*args, "--fd-num", 24, "--sample-steps", 2, "--steps", 5, "--resume", "--sample-ddpm-steps", 50) == 0
    err = capsys.readouterr().err
    assert "measured otherwise" not in err and "--sample-ddpm-steps has no effect on this run" in err


def test_a_finished_run_killed_during_its_last_fd_gets_its_record_and_grid_on_resume(tmp_path, capsys):
    """Killed during the last step's FD (its checkpoint written, holding the record), the run has nothing left
    to train: the resume said "nothing to do" and the last record and grid were lost for good."""
    run = tmp_path / "run"
    args = ["--preset", "digits", "--steps", 2, "--fd-every", 2, "--fd-num", 16, "--sample-every", 2,
            "--log-every", 1, "--device", "cpu", "--out", run]
    assert train(*args) == 0
    records = (run / "metrics.jsonl").read_text().splitlines()
    grid = run / "samples" / "step_00000002.png"
    drawn = read_png(grid)
    (run / "metrics.jsonl").write_text(records[0] + "\n")  # as if killed while the FD was measured
    grid.unlink()
    capsys.readouterr()
    assert train("--out", run, "--resume") == 0
    assert "nothing to do: the run is at step 2" in capsys.readouterr().out
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in records]
    assert [r["step"] for r in again] == [1, 2] and again[0] == first[0]
    assert again[1]["FD/ema0.999"] == first[1]["FD/ema0.999"] and again[1]["loss"] == first[1]["loss"]
    assert torch.equal(read_png(grid), drawn)


def test_commands_printed_to_paste_quote_a_path_with_spaces(capsys, tmp_path):
    """A run in "my runs/ü run" was told to continue with `--out my runs/ü run --resume`, which the shell splits."""
    import shlex

    run = tmp_path / "my runs" / "ü run"
    assert train(*GMM, "--steps", 1, "--loggers", "tensorboard", "--out", run) == 0
    assert f"tensorboard --logdir {shlex.quote(str(run))}" in capsys.readouterr().out
    assert train(*GMM, "--steps", 2, "--out", run / "checkpoints", "--resume") == 2
    line = assert_one_line_error(capsys, "is inside the checkpoints of the run")
    assert shlex.split(line.rsplit("give the run's own folder, ", 1)[1]) == ["--out", str(run)]


@pytest.mark.parametrize("command", ["export", "sample", "evaluate"])
def test_every_command_hides_torchs_no_cuda_runtime_line(command):
    """With the CUDA build of torch on a CPU, Inductor (export --aoti, sample --exported X.aoti.pt2) logged
    "No CUDA runtime is found, using CUDA_HOME=...": only train hid it."""
    code = (f"import logging, stmd_fast.{command}; "
            "print(logging.getLogger('torch.utils.cpp_extension').getEffectiveLevel())")
    level = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(level.stdout.split()[-1]) >= logging.ERROR


def test_a_run_folder_made_unwritable_is_told_to_be_made_writable_on_resume(capsys, tmp_path, monkeypatch):
    """--resume into a folder that cannot be written was told to "choose a writable directory": that abandons
    the run, whose checkpoints are there."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 1, "--out", run) == 0
    write_text = Path.write_text

    read_only_folders = {run}

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".write-test") and self.parent in read_only_folders:
            raise PermissionError(1, "Operation not permitted", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    assert train("--out", run, "--resume", "--steps", 2) == 2
    line = assert_one_line_error(capsys, f"cannot write to --out {run}: Operation not permitted")
    assert f"make --out {run} writable (permissions), then --resume again" in line
    read_only_folders.add(tmp_path / "other")
    assert train(*GMM, "--steps", 1, "--out", tmp_path / "other") == 2
    assert "or choose another --out" in assert_one_line_error(capsys, "cannot write to --out")
    # the run's own folders too: a read-only checkpoints/ was found at the first save, an interval later
    read_only_folders.clear()
    for name in ("checkpoints", "samples"):
        read_only_folders.add(run / name)
        assert train("--out", run, "--resume", "--steps", 2) == 2
        line = assert_one_line_error(capsys, f"cannot write to {run / name}: Operation not permitted")
        assert f"make {run / name} writable (permissions), then --resume again" in line
        read_only_folders.clear()


def test_a_file_where_a_run_folder_goes_is_refused_at_start_up(capsys, tmp_path):
    """A file at RUN/samples: every grid failed with "File exists", a warning each, and the run ended 0 with no
    grid; a file at RUN/checkpoints failed only at the first save, an interval later."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 1, "--out", run) == 0
    for name in ("samples", "checkpoints"):
        shutil.move(run / name, tmp_path / name)
        (run / name).write_text("x")
        assert train("--out", run, "--resume", "--steps", 2) == 2
        line = assert_one_line_error(capsys, f"{run / name} is a file where the run writes its {name}/ folder")
        assert "move the file aside, then --resume again" in line
        (run / name).unlink()
        shutil.move(tmp_path / name, run / name)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "samples").write_text("x")
    assert train(*GMM, "--steps", 1, "--out", tmp_path / "fresh") == 2
    assert assert_one_line_error(capsys, "is a file where the run writes its samples/ folder").endswith("aside")


def test_fd_files_that_are_not_there_are_refused_before_the_data_loads(capsys, tmp_path, monkeypatch):
    """--fd-every with a --fd-classifier or --inception-weights that is not there was said once the data, the
    network and the metric's imports were in (after the VAE on a latent preset)."""
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the flags were checked")

    monkeypatch.setattr(train_module, "load_training_data", no_data)
    for preset, flag, said in (("digits", "--fd-classifier", "none: no such folder"),
                               ("cifar10", "--inception-weights", "none: no such file")):  # the FID preset
        assert train("--preset", preset, "--fd-every", 5, flag, tmp_path / "none", "--out", tmp_path / "run") == 2
        assert_one_line_error(capsys, said)
    assert not (tmp_path / "run").exists()


STOP_AT_TORCHS_IMPORT = """
import os, runpy, signal, sys
class StopAtTorch:  # a Ctrl-C just as torch starts to import: no waiting on the clock
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, StopAtTorch())
command, sys.argv = sys.argv[1], [sys.argv[1], "--help"]
if command.endswith(".py"):
    runpy.run_path(command, run_name="__main__")
else:
    runpy.run_module(command, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command", ["stmd_fast.train", "stmd_fast.sample", "stmd_fast.evaluate", "stmd_fast.export",
                                     "stmd_fast.gmm", "stmd_fast.crashtest", "stmd_fast.data.encode",
                                     "stmd_fast.data.example", "stmd_fast.kernels.compile_matrix",
                                     *(f"bench/{name}.py" for name in
                                     ("data", "kernels", "loss_per_s", "precision", "sample", "train_step"))])
def test_ctrl_c_while_a_command_imports_is_one_line(command):
    """Seconds of imports (torch) came before any handler: a Ctrl-C there printed a traceback from inside torch."""
    proc = subprocess.run([sys.executable, "-c", STOP_AT_TORCHS_IMPORT, command], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("interrupted") and len(proc.stderr.strip().splitlines()) == 1


def test_every_commands_help_describes_each_argument_and_its_default(monkeypatch):
    """--seed's help was "[default: 0]" alone, the positional CKPT of six evaluate commands had none, and the
    benchmarks' --batch, --device, --warmup ... showed no default."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    parsers = []

    class Parsed(Exception):
        pass

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    commands = [("stmd_fast.train", "main"), ("stmd_fast.sample", "main"), ("stmd_fast.export", "main"),
                ("stmd_fast.evaluate", "main"), ("stmd_fast.gmm", "main"), ("stmd_fast.crashtest", "main"),
                ("stmd_fast.data.encode", "cli"), ("stmd_fast.data.example", "cli"),
                ("stmd_fast.kernels.compile_matrix", "main"),
                *((name, "main") for name in ("data", "kernels", "loss_per_s", "precision", "sample", "train_step"))]
    for module, entry in commands:
        before = len(parsers)
        with pytest.raises(Parsed):
            command = getattr(importlib.import_module(module), entry)
            getattr(command, "__wrapped__", command)([])  # without one_line_errors: the exception passes
        assert len(parsers) == before + 1, module

    def with_subcommands(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from with_subcommands(sub)

    undescribed = []
    for parser in (sub for top in parsers for sub in with_subcommands(top)):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            text = parser._get_formatter()._get_help_string(action) or ""
            name = f"{parser.prog} {max(action.option_strings, key=len) if action.option_strings else action.dest}"
            if not text.strip() or text.strip().startswith("[default"):
                undescribed.append(f"{name}: no description")
            if action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS \
                    and "default" not in text.lower():  # by identity: 0 == False
                undescribed.append(f"{name}: its default {action.default!r} is not said")
    assert not undescribed, "\n".join(undescribed)


# ----------------------------------------------------------------------------- library use: the host keeps its own

def test_a_command_called_from_python_leaves_the_hosts_streams_and_handlers_as_they_were(gmm_run, tmp_path):
    """evaluate.main left sys.stdout and sys.stderr replaced by its wrappers, every main() left stdout's encoding
    errors at backslashreplace and the host's own SIGINT handler replaced by Python's default."""
    import io
    import signal

    from stmd_fast.evaluate import main as evaluate_main

    def host_handler(signum, frame):
        pass

    streams = sys.stdout, sys.stderr
    mode = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    previous = signal.signal(signal.SIGINT, host_handler)
    try:
        sys.stdout = mode
        for command in (lambda: sample(gmm_run, "--num", 4, "--out", tmp_path / "x.npy"),
                        lambda: evaluate_main(["kernel", str(gmm_run), "--points", "1", "--num", "8",
                                               "--out", str(tmp_path / "k")])):
            assert command() == 0
            assert sys.stdout is mode and mode.errors == "strict" and sys.stderr is streams[1]
            assert signal.getsignal(signal.SIGINT) is host_handler
    finally:
        sys.stdout = streams[0]
        signal.signal(signal.SIGINT, previous)


def test_training_from_a_worker_thread_and_the_hosts_random_stream(tmp_path):
    """train.train() in a thread failed at once ("signal only works in main thread"), and it reseeded the host's
    global torch RNG (the network's init)."""
    import dataclasses
    import threading

    from stmd_fast.config import PRESETS
    from stmd_fast.train import train as train_api

    cfg = dataclasses.replace(PRESETS["gmm"](), steps=2, batch_size=16, device="cpu", out=str(tmp_path / "run"),
                              sample_every=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    done = {}
    worker = threading.Thread(target=lambda: done.update(last=train_api(cfg)))
    worker.start()
    worker.join(timeout=300)
    assert done["last"].name == "step_00000002"
    assert torch.equal(torch.rand(3), expected)  # the host's stream goes on as if train() had not run


def test_load_checkpoint_takes_a_home_path_and_builds_float32_under_a_float64_default(gmm_run, monkeypatch):
    monkeypatch.setenv("HOME", str(gmm_run.parent))
    torch.set_default_dtype(torch.float64)
    try:
        model = stmd_fast.load_checkpoint(f"~/{gmm_run.name}")
        assert torch.get_default_dtype() == torch.float64  # the caller's, back
        assert next(model.net.parameters()).dtype == torch.float32
        assert model.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 2)
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_second_ctrl_c_in_a_python_host_is_an_exception_not_the_end_of_the_process(tmp_path):
    """A command's second Ctrl-C quits at once (SIG_DFL); called from a notebook, it killed the kernel."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    script = f"""
import os, signal, sys, threading, time
from stmd_fast.train import main
def interrupt_twice():
    while not (os.path.exists({str(metrics)!r}) and os.path.getsize({str(metrics)!r})):  # training has begun
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt_twice, daemon=True).start()
code = None
try:
    code = main({[*GMM, "--steps", "1000000", "--out", str(tmp_path / "run")]!r})
    time.sleep(2)  # a second signal after main returned reaches the host's own handler here
except KeyboardInterrupt:
    pass
print("host still alive:", code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert "host still alive: 130" in proc.stdout, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert "during start-up" not in proc.stderr  # the stop said as what it was (at once, or after its step)
    assert "Ctrl-C again: stopped at once" in proc.stderr or "stopped by SIGINT" in proc.stdout + proc.stderr


def test_every_command_is_a_command_once_imported(tmp_path):
    """A command's second stop signal quits at once only where its __main__ said it is one (startup.imports_done)."""
    script = """
import runpy, sys
from stmd_fast import startup
for command in sys.argv[1:]:
    startup.AS_COMMAND = False
    sys.argv = [command, "--help"]
    try:
        runpy.run_path(command, run_name="__main__") if command.endswith(".py") else \\
            runpy.run_module(command, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    print(command, startup.AS_COMMAND)
"""
    commands = ["stmd_fast.train", "stmd_fast.sample", "stmd_fast.evaluate", "stmd_fast.export", "stmd_fast.gmm",
                "stmd_fast.crashtest", "stmd_fast.data.encode", "stmd_fast.data.example",
                "stmd_fast.kernels.compile_matrix",
                *(f"bench/{name}.py" for name in ("data", "kernels", "loss_per_s", "precision", "sample", "train_step"))]
    proc = subprocess.run([sys.executable, "-c", script, *commands], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    said = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0] in commands)
    assert said == {command: "True" for command in commands}, proc.stderr[-2000:]
