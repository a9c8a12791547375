"""python -m stmd_fast.evaluate on tiny checkpoints: consistent outputs, seeded numbers,
inpainting metrics, and one-line errors for bad input before any sampling."""
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stmd_fast.checkpoint import Model, list_checkpoints
from stmd_fast.classifier import FeatureClassifier, load_classifier, save_classifier
from stmd_fast.evaluate import load_split
from stmd_fast.evaluate import main as evaluate
from stmd_fast.metrics import FrechetDistance
from stmd_fast.train import main as train

TINY = ["--steps", "2", "--batch-size", "8", "--sample-every", "0", "--sample-ddpm-steps", "2", "--log-every", "1"]
SETTINGS = ["--stmd", "1x1,2x1,1x2", "--meanflow-steps", "1,2", "--ddpm-steps", "1,3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny digits checkpoints of all three methods and a random-weight digits classifier. The STMD run also
    keeps an EMA of decay 0.5 (beside the default 0.999) and a checkpoint at each of its two steps."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("stmd", "meanflow", "ddpm"):
        extra = ["--ema-decays", "0.5", "--ckpt-every", "1"] if method == "stmd" else []
        assert train(TINY + ["--method", method, "--out", str(root / method), *extra]) == 0
    torch.manual_seed(0)
    save_classifier(FeatureClassifier((1, 8, 8)).eval(), root / "classifier", {"dataset": "digits", "test_accuracy": 0.0})
    return root


@pytest.fixture(scope="module")
def gmm(tmp_path_factory):
    """Tiny gmm-preset runs of STMD (a checkpoint at each of its two steps) and DDPM."""
    root = tmp_path_factory.mktemp("gmm")
    for method in ("stmd", "ddpm"):
        extra = ["--ckpt-every", "1"] if method == "stmd" else []
        assert train(["--preset", "gmm", "--method", method, "--steps", "2", "--batch-size", "8", "--sample-every", "0",
                      "--out", str(root / method), *extra]) == 0
    return root


def scoring(runs):
    """The flags every scoring command of these tests takes: the random classifier and a shared cache."""
    return ["--classifier", str(runs / "classifier"), "--cache-dir", str(runs / "cache")]


def sweep_args(runs, out, *extra):
    return ["sweep", *(str(runs / m) for m in ("stmd", "meanflow", "ddpm")), "--num", "40", "--batch-size", "16",
            "--classifier", str(runs / "classifier"), "--cache-dir", str(runs / "cache"), "--out", str(out),
            *SETTINGS, *extra]


def test_sweep_writes_consistent_json_table_and_plot(runs, tmp_path):
    assert evaluate(sweep_args(runs, tmp_path / "a")) == 0
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    rows = result["rows"]
    assert result["metric"] == "FD" and result["dataset"] == "digits"
    expected = {("stmd", 1, 1), ("stmd", 2, 1), ("stmd", 1, 2), ("meanflow", 1, 1), ("meanflow", 1, 2),
                ("ddpm", 1, 1), ("ddpm", 3, 1)}
    assert {(r["method"], r["N"], r["M"]) for r in rows} == expected
    assert all(r["nfe"] == {"stmd": r["N"] * r["M"], "meanflow": r["M"], "ddpm": r["N"]}[r["method"]] for r in rows)
    assert all(np.isfinite(r["value"]) and r["value"] >= 0 and r["num"] == 40 for r in rows)
    # the markdown table holds the same numbers, one line per row
    markdown = (tmp_path / "a" / "results.md").read_text()
    table = [line for line in markdown.splitlines()[2:] if line.startswith("|")]
    assert len(table) == len(rows)
    floor = result["real_train_images"]  # real training digits against the test reference
    assert np.isfinite(floor) and f"{floor:.3f}" in markdown
    table_values = sorted(float(line.split("|")[-2]) for line in table)
    assert table_values == sorted(round(r["value"], 3) for r in rows)
    assert (tmp_path / "a" / "fd_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # same seed, same numbers (the reference statistics now come from the cache)
    assert evaluate(sweep_args(runs, tmp_path / "b")) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [r["value"] for r in again] == [r["value"] for r in rows]
    assert evaluate(sweep_args(runs, tmp_path / "c", "--seed", "1")) == 0
    other = json.loads((tmp_path / "c" / "results.json").read_text())["rows"]
    assert [r["value"] for r in other] != [r["value"] for r in rows]


def test_an_interrupted_sweep_keeps_its_settings_and_the_same_command_measures_the_rest(runs, tmp_path, monkeypatch,
                                                                                       capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert evaluate(sweep_args(runs, full)) == 0
    drawn, interrupt_at = [], [4]
    real_sample = Model.sample

    def sample(self, *args, **kwargs):
        drawn.append(args[:2])  # (num, N)
        if len(drawn) in interrupt_at:
            interrupt_at.clear()
            raise KeyboardInterrupt  # Ctrl-C while the fourth setting samples
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(Model, "sample", sample)
    assert evaluate(sweep_args(runs, cut)) == 130
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1].startswith("interrupted after 3 of 7 settings") and "interrupted" not in said[:-1]  # once
    kept = json.loads((cut / "results.json").read_text())
    assert kept["complete"] is False and len(kept["rows"]) == 3
    assert "**Incomplete**" in (cut / "results.md").read_text() and not (cut / "fd_vs_nfe.png").exists()
    drawn.clear()
    assert evaluate(sweep_args(runs, cut)) == 0  # the same command: only the four settings left are sampled
    printed = capsys.readouterr().out
    assert len(drawn) == 4 and "reusing 3 of 7 settings" in printed
    assert re.search(r"^\[1/7\] stmd M=1: N=1 M=1 NFE 1: FD [\d.]+ \(measured before\)$", printed, re.M)
    assert re.search(r"^\[7/7\] ddpm: N=3 M=1 NFE 3: FD [\d.]+ \(\d+ s, about 0:00:00 left\)$", printed, re.M)
    done, reference = (json.loads((d / "results.json").read_text()) for d in (cut, full))
    assert done["complete"] is True and (cut / "fd_vs_nfe.png").exists()
    assert [(r["label"], r["N"], r["M"], r["value"]) for r in done["rows"]] == \
        [(r["label"], r["N"], r["M"], r["value"]) for r in reference["rows"]]
    # another seed or --batch-size is another measurement: nothing is reused
    drawn.clear()
    assert evaluate(sweep_args(runs, cut, "--batch-size", "8")) == 0
    assert len(drawn) == 7 and "reusing" not in capsys.readouterr().out
    made = json.loads((cut / "results.json").read_text())["provenance"]
    assert made["command"].endswith("--batch-size 8") and made["device"] == "cpu"
    assert all(r["batch_size"] == 8 and r["step"] == 2 for r in json.loads((cut / "results.json").read_text())["rows"])


def test_results_name_the_features_their_fd_is_on(runs, tmp_path):
    # FD on other features is on another scale (one seed trains different classifiers on different CPUs), so every
    # result records the sha256 of the feature network it used, and its table names it
    torch.manual_seed(1)
    save_classifier(FeatureClassifier((1, 8, 8)).eval(), tmp_path / "other", {"dataset": "digits", "test_accuracy": 0.0})
    fingerprints = []
    for classifier in (runs / "classifier", tmp_path / "other"):
        out = tmp_path / classifier.name
        assert evaluate(["sweep", str(runs / "meanflow"), "--num", "16", "--batch-size", "16", "--meanflow-steps", "1",
                         "--classifier", str(classifier), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
        features = FrechetDistance(load_classifier(classifier)[0]).extractor_id
        assert json.loads((out / "results.json").read_text())["features"] == features
        assert f"classifier {features.split(':')[1][:12]}" in (out / "results.md").read_text()
        fingerprints.append(features)
    assert fingerprints[0] != fingerprints[1]


def test_train_classifier_replaces_a_classifier_but_keeps_out_of_other_folders(tmp_path, capsys):
    """--out a training run's folder: the classifier's files were written among the run's, without a word."""
    assert evaluate(["train-classifier", "--preset", "digits", "--steps", "1", "--out", str(tmp_path / "clf")]) == 0
    assert evaluate(["train-classifier", "--preset", "digits", "--steps", "2", "--out", str(tmp_path / "clf")]) == 0
    assert load_classifier(tmp_path / "clf")[1]["steps"] == 2  # a classifier's own folder: replaced
    capsys.readouterr()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    assert evaluate(["train-classifier", "--preset", "digits", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "holds other files (checkpoints, config.json)", "new or empty folder")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.json"]


def test_train_classifier_records_where_it_was_trained(tmp_path, capsys):
    assert evaluate(["train-classifier", "--preset", "digits", "--steps", "2", "--out", str(tmp_path / "clf")]) == 0
    _, meta = load_classifier(tmp_path / "clf")
    assert meta["steps"] == 2 and meta["dataset"] == "digits"
    assert meta["trained_on"] == {"torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
                                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    captured = capsys.readouterr()
    assert f"torch {torch.__version__}" in captured.out
    # digits FDs read the shipped classifier unless told otherwise: the note says how to use this one instead
    assert f"--classifier {tmp_path / 'clf'}" in captured.err


def test_inpainting_evaluation(runs, tmp_path):
    args = ["inpaint", str(runs / "stmd"), "--mask", "half", "--images", "5", "--completions", "3", "--steps", "2",
            "--classifier", str(runs / "classifier"), "--cache-dir", str(runs / "cache"), "--out", str(tmp_path)]
    assert evaluate(args) == 0
    result = json.loads((tmp_path / "inpaint_half.json").read_text())
    assert result["images"] == 5 and result["completions"] == 3 and result["mask"] == "half"
    assert result["ema"] == 0.999  # the run's --ema-decay: no --ema given
    assert result["reference"] == "digits test split"  # what the FD was computed against
    assert result["reference_images"] == len(load_split("digits", "test", "datasets"))
    assert np.isfinite(result["fd"]) and np.isfinite(result["psnr_db"])
    assert result["diversity"] > 0  # STMD completions differ in the missing half
    # psnr_db is over all pixels, the observed half copied exactly: its error is half the missing region's
    assert result["psnr_db"] - result["psnr_missing_db"] == pytest.approx(10 * np.log10(2), abs=1e-4)
    from PIL import Image

    with Image.open(tmp_path / "inpaint_half.png") as grid:  # 5 rows of observation + 3 completions + truth
        assert grid.size == (5 * 9 + 1, 5 * 9 + 1)
    # --batch-size reaches the sampler (it was ignored: every image's completions in one batch) and is recorded
    assert result["batch_size"] == 256
    assert evaluate([*args[:-1], str(tmp_path / "b2"), "--batch-size", "2"]) == 0
    split = json.loads((tmp_path / "b2" / "inpaint_half.json").read_text())
    assert split["batch_size"] == 2 and split["psnr_db"] != result["psnr_db"]  # the draws follow the batches


def conditional_args(run, out, *extra):
    return ["conditional", str(run), "--num", "64", "--batch-size", "16", "--classifier", str(run.parent / "classifier"),
            "--cache-dir", str(run.parent / "cache"), "--out", str(out), *extra]


def test_conditional_scores_posterior_draws_against_the_source_images(runs, tmp_path):
    # STMD: one row per (s, M), s on the run's 4-step grid by default (digits samples on the quadratic one)
    assert evaluate(conditional_args(runs / "stmd", tmp_path / "stmd", "--flow-steps", "1,2")) == 0
    result = json.loads((tmp_path / "stmd" / "conditional.json").read_text())
    grid = [(k / 4) ** 2 for k in (4, 3, 2, 1)]
    assert [(r["s"], r["M"]) for r in result["rows"]] == [(s, m) for s in grid for m in (1, 2)]
    assert all(np.isfinite(r["value"]) for r in result["rows"]) and result["num"] == 64
    assert result["features"] == FrechetDistance(load_classifier(runs / "classifier")[0]).extractor_id
    assert f"{result['source_images']:.3f}" in (tmp_path / "stmd" / "conditional.md").read_text()
    # DDPM's draw is its posterior mean (x_s - sigma eps) / alpha: at s -> 0 it is the source image itself, so its
    # FD is the floor's; at s = 1 (alpha 0.007) it is the network's guess, far from the data
    assert evaluate(conditional_args(runs / "ddpm", tmp_path / "ddpm", "--s", "1,0.0001")) == 0
    result = json.loads((tmp_path / "ddpm" / "conditional.json").read_text())
    noise, clean = (r["value"] for r in result["rows"])
    assert [r["M"] for r in result["rows"]] == [1, 1]  # DDPM has no flow steps
    assert abs(clean - result["source_images"]) < 0.01 * result["source_images"] < noise - clean


def test_conditional_refuses_runs_without_diffusion_time_and_bad_times(runs, tmp_path, capsys):
    assert evaluate(conditional_args(runs / "meanflow", tmp_path / "o")) == 2
    one_line_error(capsys, "Mean Flow", "STMD or DDPM")
    for bad in ("0,1", "1,1", "a"):
        assert evaluate(conditional_args(runs / "stmd", tmp_path / "o", "--s", bad)) == 2
        one_line_error(capsys, "--s", "(0, 1]")
    assert not (tmp_path / "o").exists()  # refused before any work


def one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def first_column(table) -> set[str]:
    """The labels in the first column of a results .md table."""
    return {line.split("|")[1].strip() for line in table.read_text().splitlines()[2:] if line.startswith("|")}


def test_mismatched_checkpoints_are_refused(runs, tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, (16, 1, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "big.npy", x)
    assert train(TINY + ["--data", str(tmp_path / "big.npy"), "--out", str(tmp_path / "big")]) == 0
    capsys.readouterr()
    assert evaluate(["sweep", str(runs / "stmd"), str(tmp_path / "big"), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "different data", "(1, 8, 8)", "(1, 16, 16)")
    assert not (tmp_path / "o").exists()  # refused before any work


def test_classifier_for_other_data_is_refused(runs, tmp_path, capsys):
    save_classifier(FeatureClassifier((1, 28, 28)), tmp_path / "mnist-clf", {"dataset": "mnist", "test_accuracy": 0.0})
    args = ["sweep", str(runs / "stmd"), "--classifier", str(tmp_path / "mnist-clf"), "--out", str(tmp_path / "o")]
    assert evaluate(args) == 2
    # digits' classifier ships with stmd_fast: the fix is to read it, not to train one
    err = one_line_error(capsys, "mnist", "digits", "drop --classifier to read")
    assert "train-classifier" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_missing_reference_data_is_refused(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "mine.npy", x)
    assert train(TINY + ["--data", str(tmp_path / "mine.npy"), "--out", str(tmp_path / "mine")]) == 0
    capsys.readouterr()
    base = ["sweep", str(tmp_path / "mine"), "--metric", "fd", "--out", str(tmp_path / "o")]
    assert evaluate(base) == 2
    one_line_error(capsys, "--reference")
    assert evaluate(base + ["--reference", str(tmp_path / "missing.npy")]) == 2
    err = one_line_error(capsys, "--reference", "missing.npy")
    assert "--data" not in err  # the flag given is --reference
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "digit.png")
    assert evaluate(base + ["--reference", str(tmp_path / "digit.png")]) == 2
    err = one_line_error(capsys, "one image")
    assert err.endswith(f"--reference {tmp_path}") and "--data" not in err  # the fix, with the right flag
    assert evaluate(base + ["--reference", str(tmp_path / "mine.npy"), "--reference-split", "train"]) == 2
    one_line_error(capsys, "--reference-split picks a preset's split", "drop --reference-split")


def test_missing_classifier_and_bad_settings_are_refused(runs, tmp_path, capsys):
    assert evaluate(["sweep", str(runs / "stmd"), "--classifier", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "train-classifier")
    assert evaluate(["sweep", str(runs / "meanflow"), "--meanflow-steps", "a", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "--stmd")
    assert evaluate(["sweep", str(runs / "stmd"), "--stmd", "0x1", "--out", str(tmp_path)]) == 2
    err = one_line_error(capsys, "--stmd 0x1", "at least 1")
    assert "--flow-steps" not in err  # sweep has no such flag: the message names the one it has
    for command in ("sweep", "conditional"):  # FD needs two samples: refused before any sampling
        assert evaluate([command, str(runs / "stmd"), "--num", "1", "--out", str(tmp_path / command)]) == 2
        one_line_error(capsys, "--num", "at least 2")
        assert not (tmp_path / command).exists()


def test_scoring_files_that_are_not_there_are_refused_before_the_reference(runs, tmp_path, capsys, monkeypatch):
    """--inception-weights /nonexistent was said half a minute in, after the reference images and the metric's
    imports; a --classifier that is not there, after the reference too."""
    import stmd_fast.evaluate as evaluate_module

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference was read before the flags were checked")

    monkeypatch.setattr(evaluate_module, "reference_images", no_reference)
    for flags, said in ((["--metric", "fid", "--inception-weights", str(tmp_path / "w.pth")], "w.pth: no such file"),
                        (["--classifier", str(tmp_path / "none")], "none: no such folder")):
        assert evaluate(["sweep", str(runs / "stmd"), "--num", "2", *flags, "--out", str(tmp_path / "o")]) == 2
        one_line_error(capsys, said)
    assert not (tmp_path / "o").exists()


def test_sweep_checks_every_checkpoint_before_sampling(runs, tmp_path, capsys, monkeypatch):
    # an --ema the second checkpoint does not keep, or one checkpoint given twice (a run and its newest
    # step_*), is refused before the first checkpoint's settings are sampled, not after them with nothing written
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the checkpoints were checked")

    monkeypatch.setattr(Model, "sample", no_sampling)
    flags = ["--num", "16", "--stmd", "1x1", "--meanflow-steps", "1", *scoring(runs), "--out", str(tmp_path / "o")]
    assert evaluate(["sweep", str(runs / "stmd"), str(runs / "meanflow"), "--ema", "0.5", *flags]) == 2
    one_line_error(capsys, "--ema 0.5", str(list_checkpoints(runs / "meanflow")[0]), "keeps the EMA decays 0.999;")
    newest = list_checkpoints(runs / "stmd")[0]
    assert evaluate(["sweep", str(runs / "stmd"), str(newest), *flags]) == 2
    one_line_error(capsys, "given twice", str(newest))
    assert not (tmp_path / "o").exists()


def test_sweep_tells_two_checkpoints_of_one_run_apart(runs, tmp_path):
    # both are checkpoints of the run "stmd": rows and plot lines (one per label) are named by step
    step2, step1 = list_checkpoints(runs / "stmd")
    assert evaluate(["sweep", str(step1), str(step2), "--stmd", "1x1,2x1", "--num", "16", *scoring(runs),
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    lines = {r["label"]: r["checkpoint"] for r in rows}
    assert lines == {"stmd M=1 (stmd@1)": str(step1), "stmd M=1 (stmd@2)": str(step2)}
    table = [line for line in (tmp_path / "results.md").read_text().splitlines()[2:] if line.startswith("|")]
    assert sorted(line.split("|")[1].strip() for line in table) == sorted(r["label"] for r in rows)


def test_sweep_records_what_its_fd_was_computed_on(runs, tmp_path, capsys):
    reference = len(load_split("digits", "test", "datasets"))
    args = ["sweep", str(runs / "meanflow"), "--meanflow-steps", "1", *scoring(runs)]
    assert evaluate(args + ["--num", "16", "--out", str(tmp_path / "a")]) == 0
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (result["num"], result["reference"], result["reference_images"]) == (16, "digits test split", reference)
    assert [r["ema"] for r in result["rows"]] == [0.999]  # the run's --ema-decay: no --ema given
    assert (f"FD of 16 samples per setting (EMA weights, decay 0.999; seed 0, batch size 256) against the digits "
            f"test split ({reference} images)") in (tmp_path / "a" / "results.md").read_text()
    # 16 samples of 128-d features have a singular covariance: warned (not refused, tests use few), and only then
    assert "warning: FD of 16 samples (--num) is not meaningful: fewer than its 128" in capsys.readouterr().err
    assert evaluate(args + ["--num", "128", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_reference_is_refused_where_it_would_be_ignored(runs, tmp_path, capsys):
    # --reference is the held-out set of a --data run; a preset's runs are scored against its --reference-split
    few = ["--images", "2", "--completions", "2", "--steps", "2"]  # cheap, were --reference ignored
    commands = [["sweep", "--num", "2", "--stmd", "1x1"], ["inpaint", *few], ["inverse", "--operator", "sr4", *few]]
    for command, *flags in commands:
        assert evaluate([command, str(runs / "stmd"), *flags, "--reference", str(tmp_path), *scoring(runs),
                         "--out", str(tmp_path / "o")]) == 2
        one_line_error(capsys, "--reference is for checkpoints trained on --data", "digits", "--reference-split")
    assert not (tmp_path / "o").exists()


def test_data_dir_is_refused_where_no_files_are_read(runs, tmp_path, capsys):
    """digits ships with scikit-learn: a --data-dir there was accepted and ignored."""
    few = ["--images", "2", "--completions", "2", "--steps", "2"]
    for command, *flags in (["sweep", "--num", "2", "--stmd", "1x1"], ["inpaint", *few]):
        assert evaluate([command, str(runs / "stmd"), *flags, "--data-dir", str(tmp_path), *scoring(runs),
                         "--out", str(tmp_path / "o")]) == 2
        one_line_error(capsys, "--data-dir is where the mnist and cifar10 files are", "digits preset reads no files")
    assert evaluate(["train-classifier", "--preset", "digits", "--data-dir", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "drop --data-dir")
    assert not (tmp_path / "o").exists()


def test_inpaint_says_when_it_has_fewer_images_than_asked(runs, tmp_path, capsys):
    reference = len(load_split("digits", "test", "datasets"))
    assert evaluate(["inpaint", str(runs / "stmd"), "--images", "1000", "--completions", "2", "--steps", "2",
                     *scoring(runs), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "inpaint_center.json").read_text())["images"] == reference
    assert (f"note: --images 1000: the digits test split holds {reference} images; using all {reference}"
            in capsys.readouterr().err)


def test_inverse_draws_a_mask_per_image_used_not_per_image_asked_for(runs, tmp_path, capsys, monkeypatch):
    """--images 3000000 drew three million masks (3.5 GB, minutes) before it was cut to the 297 test digits."""
    import stmd_fast.evaluate as evaluate_module

    drawn = []
    real = evaluate_module.make_mask
    monkeypatch.setattr(evaluate_module, "make_mask", lambda *a: drawn.append(1) or real(*a))
    reference = len(load_split("digits", "test", "datasets"))
    assert evaluate(["inverse", str(runs / "stmd"), "--operator", "inpaint", "--mask", "pixels", "--images", "3000000",
                     "--completions", "2", "--steps", "2", *scoring(runs), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "inverse_inpaint_pixels.json").read_text())["images"] == reference
    assert len(drawn) <= reference + 1  # + the one that checks the operator before any work
    assert f"using all {reference}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inpaint", "inverse"])
def test_a_grid_too_large_is_refused_first_and_a_result_never_goes_without_its_grid(runs, tmp_path, capsys,
                                                                                    monkeypatch, command):
    """--zoom 5000 sampled everything, then failed allocating 51 GB for the grid, with the .json written and no
    .png (an earlier .png beside a new .json); the grid was also the one file not written atomically."""
    import stmd_fast.evaluate as evaluate_module

    args = [command, str(runs / "stmd"), *(["--operator", "sr4"] if command == "inverse" else []), "--images", "2",
            "--completions", "2", "--steps", "2", *scoring(runs)]
    assert evaluate(args + ["--zoom", "5000", "--out", str(tmp_path / "big")]) == 2
    one_line_error(capsys, "--zoom 5000: at most 64")
    assert not (tmp_path / "big").exists()

    def fails(*a):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 51200000000 bytes")

    monkeypatch.setattr(evaluate_module, "grid_png", fails)
    assert evaluate(args + ["--out", str(tmp_path / "o")]) == 1
    assert "error: out of memory on this device" in capsys.readouterr().err  # after the small-FD warning
    assert not list((tmp_path / "o").glob("*.json"))
    monkeypatch.undo()
    assert evaluate(args + ["--zoom", "2", "--out", str(tmp_path / "o")]) == 0
    from PIL import Image

    (png,) = (tmp_path / "o").glob("*.png")
    assert Image.open(png).height == 2 * (2 * 8 + 1) + 1  # two rows of 16-pixel tiles, padding 1
    assert png.with_suffix(".json").exists()


def test_running_out_of_memory_is_one_line_naming_the_flags_to_lower(runs, tmp_path, capsys, monkeypatch):
    """--particles 100000000 ended in the CPU allocator's traceback; sample said it in one line."""
    import stmd_fast.evaluate as evaluate_module

    def allocates(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 25600000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(evaluate_module, "inverse", allocates)
    assert evaluate(["inverse", str(runs / "stmd"), "--operator", "sr4", "--sigma-y", "0.1", "--particles",
                     "100000000", "--out", str(tmp_path)]) == 1
    line = one_line_error(capsys, "out of memory on", "can't allocate memory", "lower --batch-size")
    assert "--particles 100000000" in line and "--images" in line and "--completions" in line
    monkeypatch.setattr(evaluate_module, "posterior", allocates)
    assert evaluate(["posterior", str(runs / "stmd"), "--particles", "1,4", "--out", str(tmp_path)]) == 1
    assert "--particles 1,4" in one_line_error(capsys, "out of memory")


def test_a_setting_that_diverges_is_recorded_as_nan_and_the_sweep_goes_on(runs, tmp_path, capsys, monkeypatch):
    """Its NaN samples stopped the sweep with an error after their sampling, and every rerun stopped there again:
    the settings after it were never measured."""
    real = Model.sample

    def diverges_at_n_2(self, num, steps=None, *args, **kwargs):
        x = real(self, num, steps, *args, **kwargs)
        return x * float("nan") if steps == 2 else x

    monkeypatch.setattr(Model, "sample", diverges_at_n_2)
    args = ["sweep", str(runs / "stmd"), "--stmd", "2x1,1x1", "--num", "20", *scoring(runs), "--out", str(tmp_path)]
    assert evaluate(args) == 0
    rows = {row["N"]: row["value"] for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert np.isnan(rows[2]) and np.isfinite(rows[1])
    assert "N=2 M=1: FD not measured: 20 of the 20 generated images hold NaN" in capsys.readouterr().out
    assert evaluate(args) == 0  # the same command again: both reused, the NaN included
    assert capsys.readouterr().out.count("(measured before)") == 2
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_kernel_refuses_non_gmm_runs(runs, tmp_path, capsys):
    assert evaluate(["kernel", str(runs / "stmd"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "gmm")


def test_kernel_refuses_mean_flow_runs_which_have_no_transition(gmm, tmp_path, capsys):
    """A Mean Flow run samples from s = 1 only: its 'kernel' rows were numbers for a transition it never makes."""
    assert train(["--preset", "gmm", "--method", "meanflow", "--steps", "1", "--batch-size", "8", "--sample-every",
                  "0", "--out", str(tmp_path / "meanflow")]) == 0
    capsys.readouterr()
    assert evaluate(["kernel", str(gmm / "stmd"), str(tmp_path / "meanflow"), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "Mean Flow run", "STMD or DDPM")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command,counterpart", [("sweep", "kernel"), ("conditional", "kernel"),
                                                ("inpaint", "posterior"), ("inverse", "posterior")])
def test_image_commands_point_gmm_runs_to_their_gmm_counterpart(gmm, tmp_path, capsys, command, counterpart):
    # an inverse problem on gmm is posterior's (the exact p(x_0 | y)); samples and p(x_0 | x_s) are kernel's
    extra = ["--operator", "sr2"] if command == "inverse" else []
    assert evaluate([command, str(gmm / "stmd"), *extra, "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys, f"{command} is for images", f"python -m stmd_fast.evaluate {counterpart}'")
    other = ({"kernel", "posterior"} - {counterpart}).pop()
    assert f"evaluate {other}" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, exact", [("kernel", "transition kernel"), ("posterior", "posterior p(x_0 | y)")])
def test_kernel_and_posterior_on_an_image_run_name_what_they_compare_with(runs, tmp_path, capsys, command, exact):
    """posterior on a digits run said "the exact kernel is known only for it", and neither named a fix."""
    assert evaluate([command, str(runs / "stmd"), "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys, f"the exact {exact} is known only for it", "python -m stmd_fast.train --preset gmm")
    assert ("kernel" in err) == (command == "kernel")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["sweep", "inpaint", "conditional", "inverse", "kernel", "posterior",
                                     "train-classifier"])
def test_each_subcommands_help_says_its_own_defaults(command, capsys):
    """kernel's --flow-steps help offered Mean Flow, which kernel refuses; sweep's, inpaint's and conditional's
    --data-dir help gave train-classifier's default."""
    assert evaluate([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("train-classifier" in text) == (command == "train-classifier")
    if command == "kernel":
        assert "M values for STMD [default: 1,2]" in text and "Mean Flow" not in text


def test_an_evaluate_into_a_folder_removes_what_a_killed_one_left_half_written(gmm, tmp_path):
    """A kill while results.json (or any output) was replaced left .tmp-PID-results.json in --out for good."""
    out = tmp_path / "o"
    out.mkdir()
    dead, live = out / ".tmp-99999999-kernel.json", out / ".tmp-1-results.json"  # PID 1 lives: not ours to take
    for leftover in dead, live:
        leftover.write_text("{")
    assert evaluate(["kernel", str(gmm / "ddpm"), "--points", "1", "--num", "8", "--out", str(out)]) == 0
    assert not dead.exists() and live.exists() and (out / "kernel.json").is_file()


def test_kernel_writes_table_json_and_heat_maps(gmm, tmp_path):
    out = tmp_path / "eval"
    args = ["kernel", str(gmm / "stmd"), str(gmm / "ddpm"), "--points", "2", "--num", "50",
            "--flow-steps", "1,2", "--out", str(out)]
    assert evaluate(args) == 0
    written = json.loads((out / "kernel.json").read_text())
    # what the values were computed on, and how, beside them
    assert {k: written[k] for k in ("seed", "points", "num", "flow_steps")} == \
        {"seed": 0, "points": 2, "num": 50, "flow_steps": [1, 2]}
    assert written["provenance"]["command"] == "python -m stmd_fast.evaluate " + " ".join(args)
    assert written["provenance"]["torch"] == torch.__version__
    # the device and each result's checkpoint step, as every other evaluate result records them (README)
    assert written["provenance"]["device"] == "cpu" and "torch " + torch.__version__ + ", cpu, " in \
        (out / "kernel.md").read_text()
    assert {entry["step"] for entry in written["runs"].values()} == {2}
    # the .md names them too (only the .json did), with absolute paths (relative ones named another folder's)
    for name, entry in written["runs"].items():
        assert Path(entry["checkpoint"]).is_absolute()
        assert f"{name}: {entry['checkpoint']} (step 2)" in (out / "kernel.md").read_text()
    report = written["runs"]
    assert sorted(entry["method"] for entry in report.values()) == ["ddpm", "stmd"]
    rows = {entry["method"]: entry["rows"] for entry in report.values()}
    assert len(rows["stmd"]) == 13 * 2 and len(rows["ddpm"]) == 13  # 13 (s_from, s_to) pairs x M
    # the exact-mean bridge column does not depend on the model: same in both reports
    assert [r["energy_mean_bridge"] for r in rows["ddpm"]] == [r["energy_mean_bridge"] for r in rows["stmd"][::2]]
    table = [line for line in (out / "kernel.md").read_text().splitlines()[2:] if line.startswith("|")]
    assert len(table) == 13 * 3
    # each metric with its floor, SW2 too (without it the SW2 column could not be read)
    assert (out / "kernel.md").read_text().splitlines()[0].endswith("| SW2 (model) | SW2 (exact-mean bridge) | SW2 floor |")
    assert table[0].endswith(f"| {rows['stmd'][0]['sw2_floor']:.4f} |") or table[0].endswith(
        f"| {rows['ddpm'][0]['sw2_floor']:.4f} |")
    assert "2 conditioning states per (s_from, s_to), 50 draws each, seed 0" in (out / "kernel.md").read_text()
    assert set(report) == first_column(out / "kernel.md") == {"stmd", "ddpm"}  # by run folder, as sweep does
    assert len(list(out.glob("kernel_*_M*.png"))) == 3  # stmd M=1, M=2; ddpm M=1


@pytest.mark.parametrize("operator,extra", [("sr4", []), ("inpaint", ["--mask", "center"]),
                                            ("sr2", ["--sigma-y", "0.2", "--particles", "3"])])
def test_inverse_evaluation(runs, tmp_path, operator, extra):
    args = ["inverse", str(runs / "stmd"), "--operator", operator, "--images", "4", "--completions", "3", "--steps",
            "2", "--classifier", str(runs / "classifier"), "--cache-dir", str(runs / "cache"), "--out", str(tmp_path),
            *extra]
    assert evaluate(args) == 0
    name = f"inverse_{operator}{'_center' if operator == 'inpaint' else ''}"
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["images"] == 4 and np.isfinite(result["fd"]) and np.isfinite(result["psnr_db"])
    assert result["diversity"] > 0
    if "--sigma-y" not in extra:  # noiseless DDNM: the samples reproduce y
        assert result["consistency_rms"] < 1e-5
    else:
        assert result["sampler"] == "smc K=3"
    assert evaluate(args) == 0  # seeded: the same numbers, made again (the provenance's time differs)
    again = json.loads((tmp_path / f"{name}.json").read_text())
    assert again.pop("provenance")["utc"] >= result.pop("provenance")["utc"] and again == result


def test_a_result_of_another_command_in_the_same_out_is_kept_not_overwritten(runs, gmm, tmp_path, capsys):
    """inverse, inpaint, conditional, posterior and kernel name their files by what they measure but not by
    every setting (sampler, sigma_y, N, K, checkpoint): a second command into the same --out overwrote the first's
    result without a word (README's DDNM / DDNM+ / SMC table is made so). It is copied aside and said, as a
    sweep does; the same command again replaces its own result."""
    base = ["inverse", str(runs / "stmd"), "--operator", "sr4", "--images", "2", "--completions", "2", "--steps", "2",
            *scoring(runs), "--out", str(tmp_path)]
    assert evaluate(base) == 0
    assert evaluate(base) == 0 and not list(tmp_path.glob("*.replaced-*"))  # a rerun: its own result, replaced
    ddnm = (tmp_path / "inverse_sr4.json").read_bytes()
    capsys.readouterr()
    assert evaluate(base + ["--sigma-y", "0.2", "--particles", "2"]) == 0
    assert "is moved, with 1 file(s) of its own, to inverse_sr4.replaced-" in capsys.readouterr().err
    kept = {path.suffix: path for path in tmp_path.glob("inverse_sr4.replaced-*")}
    assert set(kept) == {".json", ".png"} and kept[".json"].read_bytes() != b""
    assert json.loads(kept[".json"].read_text())["sampler"] == "ddnm"
    assert json.loads(kept[".json"].read_text())["provenance"] == json.loads(ddnm)["provenance"]
    assert json.loads((tmp_path / "inverse_sr4.json").read_text())["sampler"] == "smc K=2"
    post = ["posterior", str(gmm / "stmd"), "--particles", "1", "--observations", "1", "--runs", "5",
            "--out", str(tmp_path / "post")]
    assert evaluate(post + ["--steps", "1"]) == 0 and evaluate(post + ["--steps", "2"]) == 0
    kept = sorted(path.name.split(".")[-1] for path in (tmp_path / "post").glob("posterior.replaced-*"))
    assert kept == ["json", "md"]
    # the same command once its run has trained on (a newer checkpoint): another result, kept too, heat maps and all
    run = tmp_path / "gmm-stmd"
    shutil.copytree(gmm / "stmd", run)
    kernel = ["kernel", str(run), "--points", "2", "--num", "20", "--flow-steps", "1", "--out", str(tmp_path / "k")]
    assert evaluate(kernel) == 0 and evaluate(kernel) == 0
    assert not list((tmp_path / "k").glob("*.replaced-*"))
    # a result of a version that kept the path as given (relative): the same checkpoint, not moved aside
    earlier = json.loads((tmp_path / "k" / "kernel.json").read_text())
    for entry in earlier["runs"].values():
        entry["checkpoint"] = os.path.relpath(entry["checkpoint"])
    (tmp_path / "k" / "kernel.json").write_text(json.dumps(earlier))
    assert evaluate(kernel) == 0 and not list((tmp_path / "k").glob("*.replaced-*"))
    assert train(["--out", str(run), "--resume", "--steps", "3"]) == 0
    assert evaluate(kernel) == 0
    kept = sorted(path.name.split(".replaced-")[0] for path in (tmp_path / "k").glob("*.replaced-*"))
    assert kept == ["kernel", "kernel", "kernel_gmm-stmd_M1"]  # .json, .md and the heat map
    # another command (a run fewer): the earlier result's heat maps are moved aside, none left beside the new one
    other = tmp_path / "other-stmd"
    shutil.copytree(gmm / "stmd", other)
    assert evaluate(["kernel", str(run), str(other), *kernel[2:]]) == 0 and evaluate(kernel) == 0
    current = sorted(path.name for path in (tmp_path / "k").glob("kernel_*.png") if ".replaced-" not in path.name)
    assert current == ["kernel_gmm-stmd_M1.png"]


def test_inverse_samples_with_the_chosen_ema(runs, tmp_path, capsys):
    # the STMD run keeps EMAs of decay 0.999 (its --ema-decay, the default) and 0.5: after two training steps
    # they are different weights, so their posterior samples differ; the JSON records which one was used
    base = ["inverse", str(runs / "stmd"), "--operator", "sr4", "--images", "3", "--completions", "2", "--steps", "2",
            *scoring(runs)]
    results = {}
    for ema in (None, "0.999", "0.5"):
        assert evaluate(base + ["--out", str(tmp_path / str(ema))] + (["--ema", ema] if ema else [])) == 0
        results[ema] = json.loads((tmp_path / str(ema) / "inverse_sr4.json").read_text())
        assert results[ema].pop("provenance")["command"].endswith(f"--ema {ema}" if ema else str(tmp_path / "None"))
    assert results[None] == results["0.999"] and results[None]["ema"] == 0.999
    assert results["0.5"]["ema"] == 0.5 and results["0.5"]["psnr_db"] != results[None]["psnr_db"]
    assert results[None]["reference"] == "digits test split"
    capsys.readouterr()
    # a decay the checkpoint does not keep: refused before any work
    assert evaluate(base + ["--ema", "0.3", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "--ema 0.3", "keeps the EMA decays 0.999, 0.5")
    assert not (tmp_path / "o").exists()


def test_inverse_refuses_bad_settings(runs, tmp_path, capsys):
    base = ["inverse", str(runs / "stmd"), "--classifier", str(runs / "classifier"), "--out", str(tmp_path)]
    assert evaluate(base + ["--operator", "gray"]) == 2
    one_line_error(capsys, "RGB")
    assert evaluate(base + ["--operator", "sr2", "--particles", "4"]) == 2
    one_line_error(capsys, "--sigma-y")


def test_posterior_grid_command(gmm, tmp_path, capsys):
    args = ["posterior", str(gmm / "stmd"), str(gmm / "ddpm"), "--steps", "1,2", "--particles", "1,3",
            "--observations", "2", "--runs", "20", "--out", str(tmp_path / "post")]
    assert evaluate(args) == 0
    result = json.loads((tmp_path / "post" / "posterior.json").read_text())
    assert result["provenance"]["device"] == "cpu" and set(result["steps"].values()) == {2}
    cells = [(r["model"].split("/")[-1], r["sampler"], r["N"], r["K"]) for r in result["rows"]]
    assert len(cells) == 1 + 2 * 2 + 2 * (2 * 2 + 1) and ("stmd", "ddnm+", 2, None) in cells and ("ddpm", "smc", 1, 3) in cells
    # at N = 1 DDNM+'s one step ends at s = 0, where it corrects nothing: a draw from the prior, not the posterior,
    # was printed as its number; now no row, and "-" in the table
    assert ("stmd", "ddnm+", 1, None) not in cells and ("ddpm", "ddnm+", 1, None) not in cells
    assert ("exact kernel", "smc", 2, 3) in cells
    assert all(np.isfinite(r["energy"]) for r in result["rows"])
    md = (tmp_path / "post" / "posterior.md").read_text()
    assert "SMC K = 3" in md and "DDNM+" in md and "the quadratic diffusion time grid" in md
    assert "Energy distance of the samples to the exact posterior's" in md  # what the numbers are
    for name, path in result["checkpoints"].items():
        assert Path(path).is_absolute() and f"{name}: {path} (step 2)" in md
    n1 = [line for line in md.splitlines() if line.startswith(("| stmd | stmd | 1 |", "| ddpm | ddpm | 1 |"))]
    assert len(n1) == 2 and all(line.endswith("| - |") for line in n1), md
    assert first_column(tmp_path / "post" / "posterior.md") == {"exact kernel", "stmd", "ddpm"}  # as kernel.md
    # the runs' own grid (the gmm preset's --sample-grid), as every other sampler of theirs: it ran on the
    # uniform one, where their STMD is not trained to step, and did not say so
    assert result["grid"] == "quadratic"
    assert evaluate(args[:-1] + [str(tmp_path / "uniform"), "--grid", "uniform"]) == 0
    uniform = json.loads((tmp_path / "uniform" / "posterior.json").read_text())
    assert uniform["grid"] == "uniform"
    energy = lambda rows: {(r["model"], r["sampler"], r["N"], r["K"]): r["energy"] for r in rows}  # noqa: E731
    assert energy(uniform["rows"])[("stmd", "ddnm+", 2, None)] != energy(result["rows"])[
        ("stmd", "ddnm+", 2, None)]
    assert evaluate(args) == 0  # seeded: the same numbers (made again: the provenance's time differs)
    again = json.loads((tmp_path / "post" / "posterior.json").read_text())
    assert again.pop("provenance")["command"] == result.pop("provenance")["command"] and again == result
    capsys.readouterr()
    assert evaluate(args[:-2] + ["--sigma-y", "0", "--out", str(tmp_path / "p2")]) == 2
    one_line_error(capsys, "--sigma-y")


def test_posterior_measures_a_mean_flow_run_at_n_1_beside_the_others_steps(gmm, tmp_path, capsys):
    """Mean Flow has no diffusion steps: the default --steps 1,2,4,8 refused it for N = 2 and measured nothing."""
    assert train(["--preset", "gmm", "--method", "meanflow", "--steps", "1", "--batch-size", "8", "--sample-every",
                  "0", "--out", str(tmp_path / "meanflow")]) == 0
    args = ["posterior", str(gmm / "stmd"), str(tmp_path / "meanflow"), "--particles", "1,2", "--observations", "1",
            "--runs", "5"]
    assert evaluate(args + ["--steps", "1,2", "--out", str(tmp_path / "post")]) == 0
    rows = json.loads((tmp_path / "post" / "posterior.json").read_text())["rows"]
    assert sorted((r["N"], r["K"]) for r in rows if r["method"] == "meanflow") == [(1, 1), (1, 2)]
    assert {(r["N"], r["K"]) for r in rows if r["method"] == "stmd" and r["sampler"] == "smc"} == {
        (1, 1), (1, 2), (2, 1), (2, 2)}
    md = (tmp_path / "post" / "posterior.md").read_text()
    assert "| meanflow | meanflow | 2 | - | - | - |" in md
    capsys.readouterr()
    assert evaluate(args + ["--steps", "2", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "Mean Flow run", "N = 1 only", "add 1 to --steps")
    assert not (tmp_path / "o").exists()


def test_posterior_refuses_a_sigma_y_too_small_for_the_likelihood_before_any_work(gmm, tmp_path, capsys):
    """1e-155 passed, and SMC failed after the exact floor was computed, naming sigma_y, not --sigma-y."""
    assert evaluate(["posterior", str(gmm / "stmd"), "--sigma-y", "1e-155", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "--sigma-y 1e-155 is too small", "at least 1e-150")
    assert not (tmp_path / "o").exists()


def test_flags_are_refused_where_they_would_be_ignored(runs, gmm, tmp_path, capsys):
    # a flag the chosen run or options do not use would change nothing: refused in one line, before any work
    few = ["--images", "2", "--completions", "2", "--steps", "2", *scoring(runs)]
    cases = [
        (["inverse", str(runs / "stmd"), "--operator", "sr2", "--mask", "half", *few], "--mask", "--operator inpaint"),
        (["sweep", str(runs / "meanflow"), "--num", "2", "--stmd", "1x1", *scoring(runs)], "--stmd", "STMD"),
        (["sweep", str(runs / "stmd"), "--num", "2", "--stmd", "1x1", "--ddpm-steps", "1", *scoring(runs)],
         "--ddpm-steps", "DDPM"),
        (["sweep", str(runs / "meanflow"), "--num", "2", "--grid", "uniform", *scoring(runs)], "--grid", "Mean Flow"),
        (["conditional", str(runs / "ddpm"), "--num", "2", "--flow-steps", "1,2", *scoring(runs)], "--flow-steps",
         "DDPM"),
        (["kernel", str(gmm / "ddpm"), "--flow-steps", "2"], "--flow-steps", "DDPM"),
        (["posterior", str(gmm / "ddpm"), "--flow-steps", "2"], "--flow-steps", "DDPM"),
        (["sweep", str(runs / "stmd"), "--num", "2", "--inception-weights", "w.pth", *scoring(runs)],
         "--inception-weights", "FD"),
        (["sweep", str(runs / "stmd"), "--num", "2", "--metric", "fid", *scoring(runs)], "--classifier", "FID"),
    ]
    for args, flag, why in cases:
        assert evaluate([*args, "--out", str(tmp_path / "o")]) == 2, args
        one_line_error(capsys, flag, why, f"drop {flag}")
    assert not (tmp_path / "o").exists()


def test_an_interrupted_kernel_leaves_no_heat_maps_without_their_table(gmm, tmp_path, monkeypatch, capsys):
    """Heat maps were drawn run by run: a Ctrl-C during the second run left the first's PNGs and no
    kernel.json or kernel.md saying how they were made."""
    from stmd_fast import gmm as gmm_module

    measured = gmm_module.kernel_grid
    calls = []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measured(*args, **kwargs)

    monkeypatch.setattr(gmm_module, "kernel_grid", second_interrupted)
    out = tmp_path / "eval"
    evaluate(["kernel", str(gmm / "stmd"), str(gmm / "ddpm"), "--points", "2", "--num", "20", "--out", str(out)])
    assert len(calls) == 2 and "interrupted" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_a_result_json_is_written_last_so_an_interrupted_write_leaves_none(runs, gmm, tmp_path, monkeypatch, capsys):
    """The .json of a result was written before its picture (inverse, inpaint) or heat maps (kernel): a Ctrl-C
    between them left a .json whose picture was missing, or heat maps that a later command did not move aside."""
    from stmd_fast import evaluate as evaluate_module
    from stmd_fast import plots

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_kernel_heatmap", interrupted)
    kernel = ["kernel", str(gmm / "stmd"), "--points", "2", "--num", "20", "--flow-steps", "1", "--out",
              str(tmp_path / "k")]
    assert evaluate(kernel) == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "k").iterdir()) == ["kernel.md"]
    write_atomic = evaluate_module.write_atomic
    monkeypatch.setattr(evaluate_module, "write_atomic",
                        lambda path, data: interrupted() if path.suffix == ".png" else write_atomic(path, data))
    inverse = ["inverse", str(runs / "stmd"), "--operator", "sr4", "--images", "2", "--completions", "2", "--steps",
               "2", *scoring(runs), "--out", str(tmp_path / "inv")]
    assert evaluate(inverse) == 130 and not (tmp_path / "inv").exists()  # nothing of it: the folder it made, gone
    monkeypatch.undo()
    assert evaluate(kernel) == 0 and evaluate(inverse) == 0
    assert not list(tmp_path.glob("*/*.replaced-*"))  # no whole earlier result there: nothing to move aside
    assert {path.name for path in (tmp_path / "k").iterdir()} == {"kernel.md", "kernel.json", "kernel_stmd_M1.png"}


def test_sweep_and_kernel_write_their_results_without_matplotlib(runs, gmm, tmp_path, capsys, monkeypatch):
    # matplotlib is the optional plot extra: without it the numbers are written all the same, and a note names
    # the plots skipped and how to get them
    import torchmetrics.image  # noqa: F401 (first: it sees matplotlib installed here and imports it, which would fail)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # unimportable, as when the extra is not installed
    assert evaluate(["sweep", str(runs / "meanflow"), "--meanflow-steps", "1", "--num", "16", *scoring(runs),
                     "--out", str(tmp_path / "sweep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["results.json", "results.md"]
    (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert np.isfinite(row["value"]) and f"{row['value']:.3f}" in (tmp_path / "sweep" / "results.md").read_text()
    assert 'note: matplotlib is not installed: skipping fd_vs_nfe.png; pip install -e ".[plot]"' in capsys.readouterr().err
    assert evaluate(["kernel", str(gmm / "stmd"), "--points", "2", "--num", "20", "--flow-steps", "1",
                     "--out", str(tmp_path / "kernel")]) == 0
    assert sorted(p.name for p in (tmp_path / "kernel").iterdir()) == ["kernel.json", "kernel.md"]
    assert len(json.loads((tmp_path / "kernel" / "kernel.json").read_text())["runs"]["stmd"]["rows"]) == 13
    assert ('note: matplotlib is not installed: skipping the heat maps kernel_*.png; pip install -e ".[plot]"'
            in capsys.readouterr().err)


def test_gmm_commands_name_a_checkpoint_given_twice(gmm, tmp_path, capsys):
    # the same path twice, or a run and its newest checkpoint: the message names both, as sweep's does
    newest = list_checkpoints(gmm / "stmd")[0]
    for command in ("kernel", "posterior"):
        for twice in ([gmm / "stmd", gmm / "stmd"], [gmm / "stmd", newest]):
            assert evaluate([command, *map(str, twice), "--out", str(tmp_path / "o")]) == 2
            one_line_error(capsys, "given twice", f"({twice[0]} and {twice[1]} are both {newest})")
    assert not (tmp_path / "o").exists()


def test_kernel_and_posterior_label_two_checkpoints_of_one_run_by_step(gmm, tmp_path):
    # as sweep does (name@step), in every table; one checkpoint of a run is its folder's name (the tests above)
    step2, step1 = list_checkpoints(gmm / "stmd")
    given = [str(step1), str(gmm / "stmd")]  # the run stands for its newest checkpoint, step 2
    assert evaluate(["kernel", *given, "--points", "2", "--num", "20", "--flow-steps", "1",
                     "--out", str(tmp_path / "k")]) == 0
    assert evaluate(["posterior", *given, "--steps", "1", "--particles", "1", "--observations", "1", "--runs", "4",
                     "--out", str(tmp_path / "p")]) == 0
    assert first_column(tmp_path / "k" / "kernel.md") == {"stmd@1", "stmd@2"}
    assert first_column(tmp_path / "p" / "posterior.md") == {"stmd@1", "stmd@2", "exact kernel"}
    report = json.loads((tmp_path / "k" / "kernel.json").read_text())["runs"]
    assert {name: entry["checkpoint"] for name, entry in report.items()} == {"stmd@1": str(step1),
                                                                              "stmd@2": str(step2)}
    assert json.loads((tmp_path / "p" / "posterior.json").read_text())["checkpoints"] == {
        name: entry["checkpoint"] for name, entry in report.items()}
    assert sorted(p.name for p in (tmp_path / "k").glob("*.png")) == ["kernel_stmd@1_M1.png", "kernel_stmd@2_M1.png"]


def one_setting(run, out, runs, *extra, cache=None):
    return ["sweep", str(run), "--num", "16", "--batch-size", "16", "--meanflow-steps", "1", "--classifier",
            str(runs / "classifier"), "--cache-dir", str(cache or runs / "cache"), "--out", str(out), *extra]


def test_a_sweep_measures_again_against_other_reference_images_of_the_same_name(runs, tmp_path, capsys, monkeypatch):
    # the rows were keyed by the reference's name and count only: a --reference file (or --data-dir split)
    # replaced by other images of the same count reused numbers measured against the old ones
    import stmd_fast.evaluate as evaluate_module

    args = one_setting(runs / "meanflow", tmp_path / "out", runs)
    assert evaluate(args) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    real = evaluate_module.reference_images

    def other_images(meta, a):
        images, name = real(meta, a)
        return images.flip(-1), name  # the same name and count, other contents

    monkeypatch.setattr(evaluate_module, "reference_images", other_images)
    capsys.readouterr()
    assert evaluate(args) == 0
    assert "reusing" not in capsys.readouterr().out
    second = json.loads((tmp_path / "out" / "results.json").read_text())
    assert second["reference_sha256"] != first["reference_sha256"]
    assert second["rows"][0]["value"] != first["rows"][0]["value"]


def test_checkpoints_without_recorded_checksums_are_told_apart_by_their_files(runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    copies = []
    for name, scale in (("old_a", 1.0), ("old_b", 0.5)):  # written before checksums: no "files" in config.json
        ckpt = tmp_path / name
        shutil.copytree(list_checkpoints(runs / "meanflow")[0], ckpt)
        meta = json.loads((ckpt / "config.json").read_text())
        meta.pop("files")
        (ckpt / "config.json").write_text(json.dumps(meta))
        save_file({k: v * scale for k, v in load_file(ckpt / "ema.safetensors").items()}, ckpt / "ema.safetensors")
        copies.append(ckpt)
    out = tmp_path / "out"
    values = []
    for ckpt in copies:
        assert evaluate(one_setting(ckpt, out, runs)) == 0
        assert "reusing" not in capsys.readouterr().out
        values.append(json.loads((out / "results.json").read_text())["rows"][0]["value"])
    assert values[0] != values[1]


def test_a_sweep_copies_aside_the_results_it_does_not_carry_over(runs, tmp_path, capsys, monkeypatch):
    import stmd_fast.evaluate as evaluate_module

    out = tmp_path / "out"
    assert evaluate(one_setting(runs / "meanflow", out, runs, "--meanflow-steps", "1,2")) == 0
    earlier = (out / "results.json").read_text()
    with monkeypatch.context() as patch:  # stopped before its first setting: results.json unchanged, no copy
        patch.setattr(evaluate_module, "load_for_sweep", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        assert evaluate(one_setting(runs / "meanflow", out, runs, "--meanflow-steps", "4")) == 130
    assert (out / "results.json").read_text() == earlier and not list(out.glob("results.replaced-*"))
    capsys.readouterr()
    assert evaluate(one_setting(runs / "meanflow", out, runs, "--meanflow-steps", "2")) == 0  # a narrower list
    captured = capsys.readouterr()
    assert "reusing 1 of 1" in captured.out
    assert "holds 1 result(s) of an earlier sweep that this one does not measure (another checkpoint, N x M, --seed" in captured.err
    [kept] = out.glob("results.replaced-*.json")
    assert kept.read_text() == earlier
    # its table moved aside too (and its plot, where matplotlib drew one): none beside the new rows
    assert [p.name for p in out.glob("results.replaced-*.md")] == [kept.name.replace(".json", ".md")]
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 1
    assert evaluate(one_setting(runs / "meanflow", out, runs, "--meanflow-steps", "2")) == 0  # again: all kept
    assert "earlier sweep" not in capsys.readouterr().err and len(list(out.glob("results.replaced-*.json"))) == 1


def test_a_cache_dir_that_cannot_be_written_is_one_line(runs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert evaluate(one_setting(runs / "meanflow", tmp_path / "out", runs, cache=tmp_path / "a_file")) == 2
    one_line_error(capsys, "--cache-dir", "a_file is a file, not a folder")


def test_an_out_folder_in_use_by_another_evaluation_is_refused(runs, tmp_path, capsys):
    """Two sweeps into one --out each rewrote results.json with their own rows: one sweep's results were lost
    without a word. The folder is held by one evaluate command at a time (flock: released however it ends)."""
    from stmd_fast.evaluate import EVALUATE_LOCK
    from stmd_fast.files import run_lock

    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out, EVALUATE_LOCK, "another evaluate command"):
        assert evaluate(one_setting(runs / "meanflow", out, runs)) == 2
        one_line_error(capsys, f"{out} is in use by another evaluate command (pid", "choose another --out")
    assert evaluate(one_setting(runs / "meanflow", out, runs)) == 0


def test_evaluate_out_that_is_a_file_or_is_left_empty(runs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert evaluate(one_setting(runs / "meanflow", tmp_path / "a_file", runs)) == 2
    one_line_error(capsys, "--out", "a_file is a file, not a folder")
    assert evaluate(one_setting(runs / "meanflow", tmp_path / "new", runs, "--ddpm-steps", "2")) == 2
    assert not (tmp_path / "new").exists()  # refused before any work: the folder made for it is gone again


def test_a_write_that_fails_is_one_line_and_an_unwritable_cache_a_warning(runs, tmp_path, capsys, monkeypatch):
    """A full disk gave evaluate a traceback; the reference statistics' cache is a cache: a warning, not a stop."""
    import errno

    import stmd_fast.evaluate as evaluate_module
    import stmd_fast.metrics as metrics_module

    def full(path, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(metrics_module, "write_atomic", full)
    assert evaluate(one_setting(runs / "meanflow", tmp_path / "a", runs, cache=tmp_path / "cache")) == 0
    assert "warning: could not write the reference statistics cache" in capsys.readouterr().err
    monkeypatch.setattr(evaluate_module, "write_atomic", full)
    assert evaluate(one_setting(runs / "meanflow", tmp_path / "b", runs)) == 1
    err = capsys.readouterr().err  # beside the small --num's warning
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "results" in line and "No space left on device: free space" in line and "Traceback" not in err, err


def test_a_checkpoint_of_a_diverged_run_is_not_blamed_on_a_rotation(tmp_path, monkeypatch):
    """NaN weights at a checkpoint's turn said "is its run still training and deleting old checkpoints?":
    true of a checkpoint gone or changed since the sweep began, not of intact bytes of a diverged run."""
    import stmd_fast.evaluate as ev
    from stmd_fast.checkpoint import CheckpointError, NonFiniteState

    def diverged(*args, **kwargs):
        raise NonFiniteState("ckpt/ema.safetensors: w holds NaN or inf: these weights cannot be used")

    monkeypatch.setattr(ev, "load_checkpoint", diverged)
    with pytest.raises(ev.EvalError) as caught:
        ev.load_for_sweep(tmp_path, "cpu", None)
    assert "holds NaN or inf" in str(caught.value) and "still training" not in str(caught.value)
    assert "measured so far are kept" in str(caught.value)

    def rotated(*args, **kwargs):
        raise CheckpointError("ckpt/model.safetensors is missing: the checkpoint is incomplete")

    monkeypatch.setattr(ev, "load_checkpoint", rotated)
    with pytest.raises(ev.EvalError, match="is missing.*still training and deleting old checkpoints"):
        ev.load_for_sweep(tmp_path, "cpu", None)


def test_the_write_probe_of_out_leaves_another_commands_probe_alone(tmp_path):
    """Two evaluate commands starting into one --out shared the probe name: one removed the other's probe, whose
    unlink then failed as "cannot write to --out: No such file or directory" instead of the lock's one line."""
    from stmd_fast.evaluate import writable_dir

    (tmp_path / ".write-test").write_text("another command's probe")
    assert writable_dir(str(tmp_path)) == tmp_path
    assert (tmp_path / ".write-test").read_text() == "another command's probe"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".write-test"]  # its own probe is gone


def test_mean_flow_inpaint_and_inverse_take_their_own_step_default(runs, tmp_path, capsys):
    """--steps defaulted to 8 for every method: inpaint on a Mean Flow run said "use N (--steps) = 1", and
    following that hit "Mean Flow cannot take the observation"; inverse with SMC, which Mean Flow can do,
    needed --steps 1 by hand. The default is now the method's (Mean Flow: 1), and what cannot work is said first."""
    few = ["--images", "2", "--completions", "2", *scoring(runs)]
    assert evaluate(["inpaint", str(runs / "meanflow"), *few, "--out", str(tmp_path / "a")]) == 2
    message = one_line_error(capsys, "Mean Flow has no diffusion steps")
    assert "--steps) = 1" not in message and "SMC" in message
    assert evaluate(["inverse", str(runs / "meanflow"), "--operator", "sr4", "--sigma-y", "0.1", "--particles", "2",
                     "--flow-steps", "2", *few, "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "inverse_sr4.json").read_text())["N"] == 1
    # a diffusion chain's default is unchanged: 8 steps, so that the observation shapes them
    assert evaluate(["inverse", str(runs / "stmd"), "--operator", "sr4", *few, "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "inverse_sr4.json").read_text())["N"] == 8
