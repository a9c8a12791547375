"""Tests of stmd_fast.metrics and stmd_fast.classifier against independent references.

The Frechet distances are checked against float64 numpy/scipy computations on the same features,
the classifier against the digits test split, and the Inception path against a weights file made
here from a randomly initialised torch-fidelity network (no network access anywhere).
"""
from __future__ import annotations

import math
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch

from stmd_fast.classifier import FeatureClassifier, load_classifier, save_classifier, train_classifier
from stmd_fast.data.datasets import load_digits, to_unit_range
from stmd_fast.metrics import FrechetDistance, diversity, psnr


def _classifier(seed: int) -> FeatureClassifier:
    """A randomly initialised (untrained) classifier for 8x8 digits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureClassifier((1, 8, 8)).eval()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(test images, first 400 train images) in model space."""
    return load_digits("test").all(), load_digits("train").all()[:400]


@torch.no_grad()
def _features(classifier: FeatureClassifier, images: torch.Tensor) -> np.ndarray:
    return classifier.features(images).double().numpy()


def _frechet_scipy(f1: np.ndarray, f2: np.ndarray) -> float:
    # The textbook formula, in float64: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)).
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


# --- Frechet distance on classifier features -----------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero(digits):
    test, _ = digits
    classifier = _classifier(0)
    fd = FrechetDistance(classifier, batch_size=64)
    fd.set_reference(test)
    scale = np.trace(np.cov(_features(classifier, test), rowvar=False))  # total feature variance
    assert fd.name == "FD"
    assert abs(fd.score(test)) < 1e-3 * scale


@pytest.mark.parametrize("fake", ["train digits", "uniform noise"])
def test_fd_equals_scipy_on_the_classifiers_features(digits, fake):
    test, train = digits
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    generated = train if fake == "train digits" else noise
    classifier = _classifier(0)
    fd = FrechetDistance(classifier, batch_size=64)  # several batches per set
    fd.set_reference(test)

    expected = _frechet_scipy(_features(classifier, test), _features(classifier, generated))
    assert expected > 0
    assert fd.score(generated) == pytest.approx(expected, rel=1e-3)


def test_fd_clamps_generated_images_to_model_space(digits):
    test, train = digits
    fd = FrechetDistance(_classifier(0))
    fd.set_reference(test)
    assert fd.score(train * 3) == pytest.approx(fd.score((train * 3).clamp(-1, 1)), rel=1e-6)


class _CountCalls:
    """Counts forward passes of the classifier's first layer (one per feature batch)."""

    def __init__(self, classifier: FeatureClassifier):
        self.calls = 0
        classifier.conv1.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_reference_cache_is_reused_and_invalidated(digits, tmp_path):
    test, train = digits
    cache = tmp_path / "cache" / "digits-FD.safetensors"
    classifier = _classifier(0)
    counter = _CountCalls(classifier)

    first = FrechetDistance(classifier, batch_size=100)
    first.set_reference(test, cache=cache)
    assert cache.is_file() and counter.calls == 3  # 297 images in batches of 100
    expected = first.score(train)

    counter.calls = 0
    second = FrechetDistance(classifier, batch_size=100)
    second.set_reference(test, cache=cache)
    assert counter.calls == 0  # read from the cache, the classifier never ran
    assert second.score(train) == expected

    # Another classifier: the stale statistics are recomputed, not used, and the cache rewritten.
    other = _classifier(1)
    other_counter = _CountCalls(other)
    third = FrechetDistance(other, batch_size=100)
    third.set_reference(test, cache=cache)
    assert other_counter.calls == 3
    uncached = FrechetDistance(other)
    uncached.set_reference(test)
    assert third.score(train) == pytest.approx(uncached.score(train), rel=1e-6)

    # Other reference images of the same count: recomputed too.
    other_counter.calls = 0
    fourth = FrechetDistance(other, batch_size=100)
    fourth.set_reference(-test, cache=cache)
    assert other_counter.calls == 3

    # A corrupt file is recomputed and overwritten.
    cache.write_bytes(b"not safetensors")
    other_counter.calls = 0
    fifth = FrechetDistance(other, batch_size=100)
    fifth.set_reference(test, cache=cache)
    assert other_counter.calls == 3 and fifth.score(train) == pytest.approx(uncached.score(train), rel=1e-6)


def test_a_killed_writers_temporary_cache_file_is_removed_by_the_next_writer(digits, tmp_path):
    """A kill during the cache's write left .tmp-PID-NAME (32 MB for Inception) in --cache-dir for good. The
    folder may be shared by other machines, whose PIDs mean nothing here: only an hour-old one goes."""
    import os

    test, _ = digits
    cache = tmp_path / "digits-FD.safetensors"
    old, recent = (tmp_path / f".tmp-99999999-{name}" for name in ("a.safetensors", "b.safetensors"))
    for leftover in old, recent:
        leftover.write_bytes(b"half a cache")
    os.utime(old, (0, 0))
    FrechetDistance(_classifier(0)).set_reference(test, cache=cache)
    assert cache.is_file() and not old.exists() and recent.exists()


def test_reference_cache_is_written_atomically_and_readable(digits, tmp_path, monkeypatch):
    # Another evaluation writing the same cache at the same moment owns the old fixed temporary name
    # .tmp-NAME: ours must not overwrite or rename it away; the cache is fsynced and gets the permissions
    # of every other output (0644 under umask 022), not safetensors' private 0600.
    import os

    test, _ = digits
    cache = tmp_path / "digits-FD.safetensors"
    theirs = tmp_path / f".tmp-{cache.name}"
    theirs.write_bytes(b"another evaluation's half-written cache")
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))  # which file or folder was made durable
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old_umask = os.umask(0o022)
    try:
        FrechetDistance(_classifier(0)).set_reference(test, cache=cache)
    finally:
        os.umask(old_umask)
    assert theirs.read_bytes() == b"another evaluation's half-written cache"
    assert cache.stat().st_mode & 0o777 == 0o644
    assert str(tmp_path) in synced  # the rename made durable (the temporary file is fsynced before it)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.name, theirs.name])  # no temporary left
    classifier = _classifier(0)
    counter = _CountCalls(classifier)
    FrechetDistance(classifier).set_reference(test, cache=cache)
    assert counter.calls == 0  # the cache written this way is read back


def test_fd_rejects_misuse_with_the_fix(digits):
    test, _ = digits
    fd = FrechetDistance(_classifier(0))
    with pytest.raises(ValueError, match="set_reference"):
        fd.score(test)
    with pytest.raises(ValueError, match="N >= 2"):
        fd.set_reference(test[:1])
    with pytest.raises(ValueError, match="trained on"):
        fd.set_reference(torch.zeros(4, 1, 28, 28))


def test_nan_images_are_refused_by_name_and_inf_clamped(digits):
    """One NaN in the samples made torchmetrics' eigvals crash inside MKL: a segmentation fault, no message."""
    from stmd_fast.metrics import NonFiniteImages

    test, train = digits
    fd = FrechetDistance(_classifier(0))
    with pytest.raises(NonFiniteImages, match="1 of the 4 reference images hold NaN, which FD cannot score: check"):
        fd.set_reference(torch.stack([test[0], test[1], test[2], test[3].clone().fill_(math.nan)]))
    fd.set_reference(test)
    bad = train[:50].clone()
    bad[3, 0, 2, 2] = bad[7, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteImages, match="2 of the 50 generated images hold NaN, .*the model diverged"):
        fd.score(bad)
    bad[3, 0, 2, 2] = bad[7, 0, 0, 0] = math.inf  # a saved image clamps it: scored as +1
    assert fd.score(bad) == pytest.approx(fd.score(bad.clamp(-1, 1)), rel=1e-6)


# --- the classifier ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    # 1000 steps of 128: 97.3% at seed 0 (97-98% over seeds 0-3), about 5 s on 2 idle cores.
    return train_classifier(load_digits("train"), load_digits("test"), steps=1000, batch_size=128, seed=0,
                            progress=False)


@pytest.mark.slow
def test_classifier_reaches_95_percent_on_digits(trained):
    model, accuracy = trained
    assert not model.training
    assert accuracy >= 0.95


@pytest.mark.slow
def test_classifier_save_load_round_trip(trained, digits, tmp_path):
    model, accuracy = trained
    test, _ = digits
    save_classifier(model, tmp_path / "clf", {"dataset": "digits", "test_accuracy": accuracy})
    loaded, meta = load_classifier(tmp_path / "clf")

    assert meta["dataset"] == "digits" and meta["test_accuracy"] == accuracy
    assert meta["data_shape"] == [1, 8, 8] and meta["num_features"] == 128 and meta["num_classes"] == 10
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.features(test), model.features(test))
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classifier.json", "classifier.safetensors"]


def test_the_shipped_digits_classifier_is_the_default_and_classifies_held_out_digits():
    from argparse import Namespace

    from stmd_fast.classifier import REFERENCE_CLASSIFIERS, accuracy, default_classifier
    from stmd_fast.evaluate import build_metric

    assert default_classifier("digits") == REFERENCE_CLASSIFIERS["digits"]
    assert str(default_classifier("mnist")) == "runs/classifier-mnist"  # MNIST's is trained on the user's files
    model, meta = load_classifier(default_classifier("digits"))
    test = load_digits("test")
    # Its recorded accuracy, recomputed here (another CPU may flip an argmax on a near tie: one image of slack).
    assert meta["dataset"] == "digits" and meta["test_accuracy"] >= 0.97
    assert abs(accuracy(model, test) - meta["test_accuracy"]) <= 1 / len(test)
    # evaluate and --fd-every read it when no --classifier is given: the same features, bit for bit.
    options = Namespace(metric="auto", classifier=None, inception_weights=None, batch_size=64)
    metric = build_metric({"config": {"data": None, "preset": "digits"}, "data_shape": [1, 8, 8]}, options, "cpu")
    assert metric.extractor_id == FrechetDistance(model).extractor_id


def test_load_classifier_missing_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier --preset digits"):
        load_classifier(tmp_path / "nothing")


@pytest.mark.parametrize("damage", ["truncated weights", "a tensor missing", "no data_shape", "not json"])
def test_a_damaged_classifier_is_one_error_naming_its_folder(tmp_path, damage):
    """Each was a traceback (SafetensorError, load_state_dict's RuntimeError, KeyError) or json's bare message,
    in evaluate and in train --fd-every alike."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from stmd_fast.classifier import META, WEIGHTS, default_classifier

    folder = tmp_path / "cls"
    shutil.copytree(default_classifier("digits"), folder)
    if damage == "truncated weights":
        (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:1000])
    elif damage == "a tensor missing":
        weights = load_file(folder / WEIGHTS)
        save_file({k: v for k, v in weights.items() if k != "conv1.bias"}, folder / WEIGHTS)
    elif damage == "no data_shape":
        meta = json.loads((folder / META).read_text())
        del meta["data_shape"]
        (folder / META).write_text(json.dumps(meta))
    else:
        (folder / META).write_text("{not json")
    with pytest.raises(ValueError, match=f"the FD classifier in {folder} is damaged .*train-classifier") as err:
        load_classifier(folder)
    assert "\n" not in str(err.value)


def test_a_missing_classifier_names_the_command_that_makes_it_where_it_is_read(tmp_path, monkeypatch):
    """An mnist run's --fd-every (and evaluate) without runs/classifier-mnist told the user to train a digits
    classifier, which lands in runs/classifier-digits and fixes nothing."""
    from argparse import Namespace

    from stmd_fast.evaluate import EvalError, build_metric

    monkeypatch.chdir(tmp_path)
    meta = {"config": {"data": None, "preset": "mnist", "data_dir": "/data/my mnist"}, "data_shape": [1, 28, 28]}
    options = Namespace(metric="auto", classifier=None, inception_weights=None, batch_size=64)
    with pytest.raises(EvalError) as err:
        build_metric(meta, options, "cpu")
    assert str(err.value).endswith("train one with: python -m stmd_fast.evaluate train-classifier --preset mnist "
                                   "--data-dir '/data/my mnist'")
    options.classifier = str(tmp_path / "mine")  # --classifier names where it is read: the command writes it there
    with pytest.raises(EvalError) as err:
        build_metric(meta, options, "cpu")
    assert str(err.value).endswith(f"--preset mnist --data-dir '/data/my mnist' --out {tmp_path / 'mine'}")
    # another dataset's classifier given: the fix is to read mnist's, not to train one into the folder given
    save_classifier(FeatureClassifier((1, 8, 8)), tmp_path / "mine", {"dataset": "digits"})
    with pytest.raises(EvalError) as err:
        build_metric(meta, options, "cpu")
    assert str(err.value).endswith("drop --classifier to read runs/classifier-mnist (train one with: python -m "
                                   "stmd_fast.evaluate train-classifier --preset mnist --data-dir '/data/my mnist', "
                                   "if it is missing)")
    # the shipped digits classifier is read from the package: one trained anew must be written there to be read
    from stmd_fast.classifier import default_classifier, train_hint
    assert train_hint("digits", out=default_classifier("digits")).endswith(f"--out {default_classifier('digits')}")


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_classifier_shapes(shape):
    model = FeatureClassifier(shape)
    x = torch.rand(2, *shape) * 2 - 1
    assert model.features(x).shape == (2, 128) and model(x).shape == (2, 10)


# --- psnr, diversity -----------------------------------------------------------------------------


def test_psnr_identical_is_inf_and_known_mse_matches_closed_form():
    x = torch.rand(3, 2, 1, 4, 4) * 2 - 1
    assert torch.isinf(psnr(x, x)).all() and psnr(x, x).shape == (3, 2)

    y = torch.zeros(2, 1, 4, 4)  # 0.5 in [0, 1]
    offsets = torch.tensor([0.1, 0.25])  # in [0, 1] units: MSE = offset^2 everywhere
    shifted = y + 2 * offsets.view(2, 1, 1, 1)  # model space is twice as wide
    expected = 10 * torch.log10(1 / offsets**2)
    assert torch.allclose(psnr(shifted, y), expected, rtol=1e-5)
    assert psnr(shifted, y)[0].item() == pytest.approx(20.0, rel=1e-5)
    # over a region: the MSE of those pixels alone (an error of 0.1 on 4 pixels, none elsewhere)
    where = torch.zeros(1, 4, 4, dtype=torch.bool)
    where[0, 0] = True
    off = y.clone()
    off[:, 0, 0] += 0.2
    assert torch.allclose(psnr(off, y, where=where), torch.full((2,), 20.0), rtol=1e-5)
    assert torch.allclose(psnr(off, y), torch.full((2,), 20.0 + 10 * math.log10(4)), rtol=1e-5)


def test_diversity_of_constant_and_two_point_completions():
    same = torch.rand(1, 3, 1, 4, 4).expand(5, -1, -1, -1, -1)
    assert diversity(same) == 0.0
    base = torch.rand(3, 1, 4, 4)
    a = 0.3
    assert diversity(torch.stack([base + a, base - a])) == pytest.approx(a, rel=1e-5)
    with pytest.raises(ValueError, match="K >= 2"):
        diversity(torch.zeros(1, 3, 4))


# --- Inception FID -------------------------------------------------------------------------------


def test_inception_offline_says_how_to_fix(monkeypatch):
    # What torch-fidelity's download raises without network (urllib, as seen on an offline machine);
    # simulated so that a networked test machine does not download 91 MB.
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--inception-weights") as caught:
        FrechetDistance(None)
    assert tfi.URL_INCEPTION_V3 in str(caught.value)
    assert "\n" not in str(caught.value)


def test_inception_weights_path_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        FrechetDistance(None, inception_weights=str(tmp_path / "nope.pth"))


def test_inception_fid_from_a_local_weights_file(random_inception):
    from torchmetrics.image.fid import NoTrainInceptionV3

    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    fake = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    fid = FrechetDistance(None, inception_weights=random_inception)
    fid.set_reference(real)
    assert fid.name == "FID"
    score = fid.score(fake)

    # Reference: the same network, fed what torchmetrics feeds it (uint8 RGB), in float64. With 4
    # images per set, a 2048x2048 scipy sqrtm is slow and ill-conditioned (rank 3), so use: with A, B
    # the centred features, S1 S2 = A^T A B^T B / (n-1)^2 has the nonzero eigenvalues of M M^T with
    # M = A B^T / (n-1) (4x4), so tr sqrtm(S1 S2) is the sum of M's singular values.
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=random_inception)
    with torch.no_grad():
        a, b = (net((to_unit_range(x).expand(-1, 3, -1, -1) * 255).round().byte()).double() for x in (real, fake))
    n = len(a)
    a_c, b_c = a - a.mean(0), b - b.mean(0)
    trace_sqrt = torch.linalg.matrix_norm(a_c @ b_c.T / (n - 1), ord="nuc")
    trace_s1, trace_s2 = (a_c**2).sum() / (n - 1), (b_c**2).sum() / (n - 1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + trace_s1 + trace_s2 - 2 * trace_sqrt
    assert expected > 0
    assert score == pytest.approx(expected.item(), rel=1e-3)
    itself = fid.score(real)
    assert math.isfinite(itself) and abs(itself) < 1e-3 * expected.item()
    # images that save to the same 8-bit pixels score as the same images: FID rounds to uint8, as a PNG does
    # (torchmetrics' normalize=True truncated, so pixel 1..63 of 255 read one level dark, and this scored 0.05)
    pixels = torch.randint(0, 64, (8, 3, 8, 8), generator=g, dtype=torch.uint8)
    dark = pixels.float() / 127.5 - 1
    fid.set_reference(dark)
    assert abs(fid.score(dark + 1e-5)) < 1e-6 * expected.item()


# --- --fd-every (fd_monitor.TrainingFD) and the U-Net's fit to images of one's own ---------------


def test_training_fd_above_the_training_set_uses_all_of_it_and_says_so(capsys):
    import dataclasses

    from stmd_fast.config import PRESETS
    from stmd_fast.fd_monitor import TrainingFD
    from stmd_fast.methods import METHODS

    from stmd_fast.data.datasets import TensorData

    cfg = dataclasses.replace(PRESETS["digits"](), fd_num=300)
    train = TensorData("digits", load_digits("train").all()[:200], "image")  # a small set: a fast measurement
    meta = {"config": cfg.to_dict(), "data_shape": [1, 8, 8], "data_kind": "image"}
    fd = TrainingFD(cfg, meta, train, torch.device("cpu"), 1, 1)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    # said at construction, i.e. before training: the reference is all 200 images, not 300
    assert len(notes) == 1 and "--fd-num 300" in notes[0] and "all 200" in notes[0]
    assert fd.reference_count == len(train) == int(fd.metric._metric.real_features_num_samples)
    torch.manual_seed(0)
    net = METHODS["stmd"].build_net(cfg.net, (1, 8, 8))
    assert math.isfinite(fd.measure(net))  # the run still measures
    capsys.readouterr()
    with torch.no_grad():  # EMA weights that diverged: NaN samples are a NaN FD and a note, not a crash
        next(net.parameters()).fill_(math.nan)
    assert math.isnan(fd.measure(net))
    assert "note: FD not measured: 300 of the 300 generated images hold NaN" in capsys.readouterr().err


def test_training_fd_on_vectors_names_what_measures_them():
    from types import SimpleNamespace

    from stmd_fast.config import PRESETS
    from stmd_fast.data.datasets import TensorData
    from stmd_fast.fd_monitor import TrainingFD
    from stmd_fast.gmm import check_gmm_model

    vectors = TensorData("vec10", torch.randn(16, 10), "vector")
    gmm = PRESETS["gmm"]()
    with pytest.raises(ValueError, match="the gmm preset makes vectors.*evaluate kernel RUN"):
        TrainingFD(gmm, {}, vectors, torch.device("cpu"), 1, 1)
    own = PRESETS["digits"]()  # what --data vec10.npy without --preset runs under
    own.data = "vec10.npy"
    with pytest.raises(ValueError) as err:
        TrainingFD(own, {}, vectors, torch.device("cpu"), 1, 1)
    message = str(err.value)
    assert "--data vec10.npy holds vectors" in message and "\n" not in message
    # not evaluate kernel: it knows the exact kernel of the built-in mixture alone, and refuses this run
    assert "gmm" not in message and "kernel" not in message
    with pytest.raises(ValueError, match="not trained on the built-in gmm preset"):
        check_gmm_model(SimpleNamespace(meta={"config": own.to_dict()}), "RUN")


def test_training_fd_that_would_not_fit_in_memory_is_refused_before_the_reference(monkeypatch):
    """--fd-num keeps the reference and the samples whole: --fd-num 1e9 sampled for minutes after the first step,
    growing until the kernel's out-of-memory killer would end the run. Refused at construction (before training)."""
    import dataclasses

    import stmd_fast.fd_monitor as fd_monitor
    from stmd_fast.config import PRESETS
    from stmd_fast.data.datasets import TensorData

    cfg = dataclasses.replace(PRESETS["digits"](), fd_num=1_000_000)
    meta = {"config": cfg.to_dict(), "data_shape": [1, 8, 8], "data_kind": "image"}
    monkeypatch.setattr(fd_monitor, "physical_memory", lambda: 2 * 10**9)  # 2 x 1e6 x 64 x 4 bytes = 0.512 GB
    fd_monitor.TrainingFD(cfg, meta, TensorData("digits", load_digits("train").all()[:64], "image"),
                          torch.device("cpu"), 1, 1)  # a quarter of the memory: fits
    monkeypatch.setattr(fd_monitor, "physical_memory", lambda: 10**9)
    monkeypatch.setattr(fd_monitor.TrainingFD, "_reference", lambda *a: pytest.fail("the reference was drawn"))
    with pytest.raises(ValueError, match=r"--fd-num 1000000: .* 0\.512 GB, more than half of this machine's 1 GB"):
        fd_monitor.TrainingFD(cfg, meta, TensorData("digits", load_digits("train").all()[:64], "image"),
                              torch.device("cpu"), 1, 1)


def test_one_process_measures_without_a_collective(digits, monkeypatch):
    """Under torchrun, rank 0 measures --fd-every alone while the other ranks train on: torchmetrics' default
    (sync_on_compute) gathered the statistics over the process group there, and the job hung in gloo."""
    import torch.distributed as dist

    test, train = digits
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: pytest.fail("a collective inside the measurement"))
        monkeypatch.setattr(dist, "all_gather", lambda *a, **k: pytest.fail("a collective inside the measurement"))
        fd = FrechetDistance(_classifier(0), batch_size=64)
        fd.set_reference(test)
        assert fd.score(train[:200]) > 0
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
