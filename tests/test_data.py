"""Tests of stmd_fast.data.datasets against references: sklearn's raw digits and files written here.

MNIST and CIFAR-10 cannot be downloaded in tests, so synthetic files in the official formats are
written to tmp_path and read back through torchvision.
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch

from stmd_fast.data.datasets import (
    DataError,
    TensorData,
    load_cifar10,
    load_digits,
    load_mnist,
    load_npy,
    to_unit_range,
)


def _distinct_rows(n: int, width: int, seed: int) -> np.ndarray:
    """(n, width) uint8 rows that are pairwise different (the first 2 bytes encode the row index)."""
    rows = np.random.default_rng(seed).integers(0, 256, size=(n, width), dtype=np.uint8)
    rows[:, 0] = np.arange(n) % 256
    rows[:, 1] = np.arange(n) // 256
    return rows


# --- digits ------------------------------------------------------------------------------------


def test_digits_split_sizes_values_and_range():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits().images  # (1797, 8, 8), levels 0..16
    train, test = load_digits("train"), load_digits("test")

    assert (len(train), len(test)) == (1500, 297)
    assert train.shape == test.shape == (1, 8, 8)
    assert train.kind == "image" and train.values.dtype == torch.float32

    # Disjoint and complete: train is raw[:1500], test is raw[1500:], each value raw / 16 * 2 - 1.
    expected = torch.from_numpy(raw / 16 * 2 - 1).float().unsqueeze(1)
    assert torch.equal(train.values, expected[:1500])
    assert torch.equal(test.values, expected[1500:])
    assert torch.equal(train.all(), expected[:1500])

    assert train.values.min().item() == -1.0 and train.values.max().item() == 1.0


def test_digits_labels_are_sklearns_targets_for_the_split():
    from sklearn.datasets import load_digits as sklearn_digits

    target = torch.from_numpy(sklearn_digits().target)
    train, test = load_digits("train"), load_digits("test")
    for data, expected in ((train, target[:1500]), (test, target[1500:])):
        assert data.labels.dtype == torch.int64 and data.labels.shape == (len(data),)
        assert torch.equal(data.labels, expected.long())
    assert set(train.labels.tolist()) == set(range(10))


def test_digits_rejects_unknown_split():
    with pytest.raises(DataError, match="valid"):
        load_digits("valid")


# --- MNIST -------------------------------------------------------------------------------------


def _write_idx(path, array: np.ndarray) -> None:
    # idx format: big-endian magic (0x08 = uint8, then the number of dims), big-endian dims, raw bytes.
    magic = 0x0800 + array.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape))
        f.write(array.tobytes())


def _write_mnist(root, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {
        "train": _distinct_rows(n_train, 28 * 28, seed=1).reshape(n_train, 28, 28),
        "t10k": _distinct_rows(n_test, 28 * 28, seed=2).reshape(n_test, 28, 28),
    }
    for prefix, x in images.items():
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(x), dtype=np.uint8) % 10)
    return images


def test_mnist_round_trips_idx_files(tmp_path):
    written = _write_mnist(tmp_path, n_train=7, n_test=5)

    train = load_mnist(str(tmp_path), "train")
    test = load_mnist(str(tmp_path), "test")

    assert train.values.shape == (7, 1, 28, 28) and test.values.shape == (5, 1, 28, 28)
    assert train.values.dtype == torch.uint8 and train.kind == "image" and train.shape == (1, 28, 28)
    assert torch.equal(train.values[:, 0], torch.from_numpy(written["train"]))
    assert torch.equal(test.values[:, 0], torch.from_numpy(written["t10k"]))
    # _write_mnist writes labels i % 10.
    assert train.labels.dtype == torch.int64 and test.labels.dtype == torch.int64
    assert torch.equal(train.labels, torch.arange(7) % 10)
    assert torch.equal(test.labels, torch.arange(5) % 10)


def test_mnist_batch_maps_drawn_rows_to_model_space(tmp_path):
    _write_mnist(tmp_path, n_train=7, n_test=5)
    data = load_mnist(str(tmp_path), "train")

    x = data.batch(16, torch.Generator().manual_seed(3))
    # The same seeded draw, done by hand, gives the indices.
    idx = torch.randint(len(data), (16,), generator=torch.Generator().manual_seed(3))
    expected = data.values[idx].float() / 127.5 - 1

    assert x.dtype == torch.float32 and x.shape == (16, 1, 28, 28)
    assert torch.equal(x, expected)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("damage, words", [
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:-100]),
     ["train-images-idx3-ubyte has", "bytes where its header promises", "(7 images): cut short"]),
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(b""), ["train-images-idx3-ubyte (0 bytes) is not an "
                                                                      "MNIST idx file of images"]),
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(gzip.compress((raw / "train-images-idx3-ubyte")
                                                                            .read_bytes())),
     ["train-images-idx3-ubyte is gzip-compressed", "gunzip"]),
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-labels-idx1-ubyte").read_bytes()),
     ["train-images-idx3-ubyte holds labels, not images"]),
    (lambda raw: _write_idx(raw / "train-labels-idx1-ubyte", np.zeros(4, np.uint8)),
     ["holds 7 images and", "train-labels-idx1-ubyte 4 labels", "same copy"]),
], ids=["truncated", "empty", "gzip-under-plain-name", "labels-for-images", "counts-differ"])
def test_a_damaged_mnist_file_is_named_with_what_is_wrong(tmp_path, damage, words):
    """torchvision raises a bare ValueError or assert for most of these (once tracebacks): each is one
    DataError naming the file and the fix, before torchvision reads anything."""
    _write_mnist(tmp_path, n_train=7, n_test=5)
    damage(tmp_path / "MNIST" / "raw")
    with pytest.raises(DataError) as caught:
        load_mnist(str(tmp_path), "train")
    assert all(word in str(caught.value) for word in words), str(caught.value)


@pytest.mark.parametrize("arrange, data_dir, words", [
    (lambda root: None, "MNIST", ["they are in", "pass --data-dir ROOT"]),          # one level too deep
    (lambda root: None, "MNIST/raw", ["they are in", "pass --data-dir ROOT"]),      # two
    (lambda root: [p.rename(root / p.name) for p in (root / "MNIST" / "raw").iterdir()], ".",
     ["they are in ROOT: move the four files into"]),                             # loose in the folder
    (lambda root: [p.rename(p.with_name(p.name + ".gz")) for p in (root / "MNIST" / "raw").iterdir()], ".",
     ["train-images-idx3-ubyte.gz is compressed: gunzip the four .gz files"]),  # as the original site serves them
    (lambda root: [p.rename(p.with_name(p.name.replace("-idx", ".idx"))) for p in (root / "MNIST" / "raw").iterdir()],
     ".", ["train-images.idx3-ubyte is train-images-idx3-ubyte under another name"]),  # a mirror's names
], ids=["mnist-folder", "raw-folder", "loose", "gz", "dotted"])
def test_mnist_files_one_step_off_are_found_and_the_fix_named(tmp_path, arrange, data_dir, words):
    _write_mnist(tmp_path, n_train=7, n_test=5)
    arrange(tmp_path)
    with pytest.raises(DataError) as caught:
        load_mnist(str(tmp_path / data_dir), "train")
    message = str(caught.value).replace(str(tmp_path) + "/", "ROOT/").replace(str(tmp_path), "ROOT")
    assert all(word in message for word in words), message


def test_mnist_missing_files_name_the_path_and_download(tmp_path):
    with pytest.raises(DataError) as caught:
        load_mnist(str(tmp_path / "nowhere"))
    message = str(caught.value)
    assert os.path.join(str(tmp_path / "nowhere"), "MNIST", "raw") in message
    assert "train-images-idx3-ubyte" in message and "--download" in message


# --- CIFAR-10 ----------------------------------------------------------------------------------


def _write_cifar10(root, per_batch: int) -> dict[str, np.ndarray]:
    """The official layout: pickled dicts whose b'data' is (n, 3072) uint8, R plane then G then B.

    The official files are Python 2 pickles that torchvision reads with encoding='latin1', which
    turns their keys into str; a Python 3 pickle with str keys reads back identically.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    flat = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        flat[name] = _distinct_rows(per_batch, 3072, seed=10 + i)
        entry = {"data": flat[name], "labels": list(range(per_batch)), "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return flat


@pytest.fixture
def no_md5(monkeypatch):
    # torchvision checks the md5 of each official file, which synthetic files cannot match; keep its
    # existence check. Patched at module level because _load_meta calls check_integrity directly.
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_round_trips_with_channels_first(tmp_path, no_md5):
    flat = _write_cifar10(tmp_path, per_batch=3)
    # One recognisable image: R plane all 10, G plane all 20, B plane all 30.
    flat_first = flat["data_batch_1"].copy()
    flat_first[0] = np.repeat(np.array([10, 20, 30], dtype=np.uint8), 1024)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": flat_first, "labels": [9, 4, 7]}, f)
    flat["data_batch_1"] = flat_first

    train = load_cifar10(str(tmp_path), "train")
    test = load_cifar10(str(tmp_path), "test")

    assert train.values.shape == (15, 3, 32, 32) and test.values.shape == (3, 3, 32, 32)
    assert train.values.dtype == torch.uint8 and train.shape == (3, 32, 32) and train.kind == "image"
    expected_train = np.concatenate([flat[f"data_batch_{i}"] for i in range(1, 6)]).reshape(15, 3, 32, 32)
    assert torch.equal(train.values, torch.from_numpy(expected_train))
    assert torch.equal(test.values, torch.from_numpy(flat["test_batch"].reshape(3, 3, 32, 32)))
    for channel, level in enumerate((10, 20, 30)):
        assert (train.values[0, channel] == level).all()
    # Labels in file order: batch 1 was rewritten with [9, 4, 7], the others hold range(3).
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [9, 4, 7] + [0, 1, 2] * 4
    assert test.labels.tolist() == [0, 1, 2]


def test_cifar10_missing_files_name_the_folder_and_download(tmp_path, no_md5):
    with pytest.raises(DataError) as caught:
        load_cifar10(str(tmp_path), "test")
    message = str(caught.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "--download" in message


def test_cifar10_wrong_checksums_name_the_damaged_files(tmp_path):
    _write_cifar10(tmp_path, per_batch=2)  # real md5 check on: synthetic files do not match
    with pytest.raises(DataError, match="data_batch_1, data_batch_2, .*batches.meta do not match the official MD5"):
        load_cifar10(str(tmp_path))


def test_preset_files_given_as_data_name_the_flags_that_read_them(tmp_path):
    """--data is for your own images, shards or .npy: MNIST or CIFAR-10 files there get the preset's flags."""
    from stmd_fast.data.images import list_images

    _write_mnist(tmp_path / "m", n_train=3, n_test=2)
    _write_cifar10(tmp_path / "c", per_batch=2)
    m, c = tmp_path / "m", tmp_path / "c"
    for given, data_dir in [(m / "MNIST" / "raw" / "train-images-idx3-ubyte", m), (m / "MNIST" / "raw", m),
                            (m / "MNIST", m), (m, m)]:  # a file, its folders, and the data root --data-dir takes
        with pytest.raises(DataError, match=re.escape(f"--preset mnist --data-dir {data_dir}")):
            (load_npy if given.is_file() else list_images)(str(given))
    for given in (c / "cifar-10-batches-py", c):
        with pytest.raises(DataError, match=re.escape(f"--preset cifar10 --data-dir {c}")):
            list_images(given)
    loose = tmp_path / "loose"  # the original site's four .gz files, loose in a download folder
    loose.mkdir()
    (loose / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="--preset mnist --data-dir DIR"):
        list_images(loose)


def test_cifar10_binary_version_is_named_as_the_wrong_release(tmp_path):
    binary = tmp_path / "cifar-10-batches-bin"
    binary.mkdir()
    (binary / "data_batch_1.bin").write_bytes(b"")
    for given, into in [(tmp_path, tmp_path), (binary, tmp_path)]:
        with pytest.raises(DataError, match=re.escape(f"{binary} is CIFAR-10's binary version; stmd_fast reads the "
                                                      f"python version, cifar-10-python.tar.gz: unpack that into "
                                                      f"{into} and pass --data-dir {into}")):
            load_cifar10(str(given))


def test_mnist_in_torchvisions_older_processed_layout_is_read(tmp_path):
    """torchvision still reads MNIST/processed/{training,test}.pt (what it wrote before 0.9); so do we."""
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    x = torch.from_numpy(_distinct_rows(4, 28 * 28, seed=3).reshape(4, 28, 28))
    torch.save((x, torch.arange(4)), processed / "training.pt")
    torch.save((x[:2], torch.arange(2)), processed / "test.pt")
    train = load_mnist(str(tmp_path), "train")
    assert torch.equal(train.values[:, 0], x) and train.labels.tolist() == [0, 1, 2, 3]
    (processed / "training.pt").write_bytes(b"garbage")  # damaged: one line naming these files, not raw/'s
    with pytest.raises(DataError, match=re.escape(f"{processed} could not be read") + ".*replace the training.pt and"):
        load_mnist(str(tmp_path), "train")


def test_cifar10_one_step_off_is_found_and_the_fix_named(tmp_path, no_md5):
    _write_cifar10(tmp_path, per_batch=2)
    batches = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DataError, match=re.escape(f"they are in {batches} itself: pass --data-dir {tmp_path}")):
        load_cifar10(str(batches))  # the extracted folder itself
    (batches / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing: data_batch_3\)"):
        load_cifar10(str(tmp_path))
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "cifar-10-python.tar.gz").write_bytes(b"")  # downloaded, not extracted
    with pytest.raises(DataError, match=re.escape(f"is the archive: tar -xzf {packed / 'cifar-10-python.tar.gz'} "
                                                  f"-C {packed}")):
        load_cifar10(str(packed))


# --- .npy --------------------------------------------------------------------------------------


def test_npy_vectors_become_float32_vectors(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3))  # float64 on disk
    np.save(tmp_path / "points.npy", x)
    data = load_npy(str(tmp_path / "points.npy"))
    assert data.labels is None  # a bare array carries no classes
    assert data.kind == "vector" and data.shape == (3,) and len(data) == 20 and data.name == "points"
    assert data.values.dtype == torch.float32
    assert torch.equal(data.values, torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(data.all(), data.values)  # float data is used as given


def test_npy_uint8_images_stay_pixels(tmp_path):
    x = _distinct_rows(6, 2 * 4 * 4, seed=4).reshape(6, 2, 4, 4)
    np.save(tmp_path / "pix.npy", x)
    data = load_npy(str(tmp_path / "pix.npy"))
    assert data.kind == "image" and data.shape == (2, 4, 4) and data.values.dtype == torch.uint8
    assert torch.equal(data.values, torch.from_numpy(x))
    assert torch.equal(data.all(), torch.from_numpy(x).float() / 127.5 - 1)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_npy_integer_images_are_pixels_in_any_integer_dtype(tmp_path, dtype):
    """int64 pixels 0..255 (what np.array(list_of_ints) gives) are scaled like uint8, not used unscaled."""
    x = _distinct_rows(6, 2 * 4 * 4, seed=5).reshape(6, 2, 4, 4)
    np.save(tmp_path / "pix.npy", x.astype(dtype))
    data = load_npy(str(tmp_path / "pix.npy"))
    assert data.values.dtype == torch.uint8 and torch.equal(data.values, torch.from_numpy(x))
    assert torch.equal(data.all(), torch.from_numpy(x).float() / 127.5 - 1)


def test_npy_integer_images_outside_0_255_are_refused(tmp_path):
    np.save(tmp_path / "deep.npy", np.array([0, 4095]).reshape(2, 1, 1, 1))
    with pytest.raises(DataError, match=r"integer images with values in \[0, 4095\].*save uint8 pixels"):
        load_npy(str(tmp_path / "deep.npy"))


@pytest.mark.parametrize("high", [1, 16])
def test_npy_integer_levels_are_refused_not_read_as_near_black_pixels(tmp_path, capsys, high):
    """A 0/1 mask or sklearn's 0..16 digits saved as integers were read as pixels 0..255 without a word and
    trained on as images near black ([-1, -0.87] at most). int64 levels are refused with a fix that makes
    pixels of them; uint8 ones (maybe very dark photos) get a note."""
    levels = np.arange(2 * 4 * 4).reshape(2, 1, 4, 4) % (high + 1)
    np.save(tmp_path / "levels.npy", levels)
    with pytest.raises(DataError, match=rf"values in \[0, {high}\] look like levels, not pixels 0..255") as err:
        load_npy(str(tmp_path / "levels.npy"))
    fix = re.search(r"save (np\.rint\(.*?\.astype\(np\.uint8\))", str(err.value)).group(1)
    for dtype in (np.int64, np.uint8, np.int8):  # the fix as given, on the array as saved: levels to 0..255
        pixels = eval(fix, {"np": np, "x": levels.astype(dtype)})
        assert pixels.dtype == np.uint8 and pixels.max() == 255 and np.array_equal(pixels > 0, levels > 0)
    np.save(tmp_path / "dark.npy", levels.astype(np.uint8))
    assert load_npy(str(tmp_path / "dark.npy")).values.max() == high
    assert "look like levels" in capsys.readouterr().err
    np.save(tmp_path / "pixels.npy", np.arange(2 * 4 * 4).reshape(2, 1, 4, 4) + 32)
    assert load_npy(str(tmp_path / "pixels.npy")).values.max() == 63 and capsys.readouterr().err == ""


@pytest.mark.parametrize("largest", [1e30, -2e4])
def test_npy_data_far_beyond_unit_scale_is_refused(tmp_path, largest):
    """1e30 would train until the NaN stop; the message says to standardize."""
    np.save(tmp_path / "big.npy", np.array([[largest, 0.0], [1.0, 2.0]], dtype=np.float32))
    with pytest.raises(DataError, match=re.escape(f"values up to {abs(largest):.3g} in magnitude")):
        load_npy(str(tmp_path / "big.npy"))
    np.save(tmp_path / "fine.npy", np.array([[9e3, 0.0]], dtype=np.float32))  # below MAX_ABS: used as given
    assert load_npy(str(tmp_path / "fine.npy")).values[0, 0] == 9e3


def test_npy_float_images_holding_pixels_0_255_are_refused(tmp_path):
    """Float images in 0..255 would be used as given, 127x the noise's scale: refused, naming both fixes;
    the same images scaled to [0, 1] or [-1, 1] load."""
    x = _distinct_rows(6, 2 * 4 * 4, seed=6).reshape(6, 2, 4, 4).astype(np.float32)
    np.save(tmp_path / "pix.npy", x)
    with pytest.raises(DataError, match=r"look like pixels 0..255 stored as floats.*x / 127.5 - 1.*uint8"):
        load_npy(str(tmp_path / "pix.npy"))
    for scaled in (x / 255, x / 127.5 - 1):
        np.save(tmp_path / "scaled.npy", scaled)
        assert torch.equal(load_npy(str(tmp_path / "scaled.npy")).values, torch.from_numpy(scaled))


def test_npy_float_images_in_0_1_get_a_note_and_are_used_as_given(tmp_path, capsys):
    x = np.random.default_rng(0).random((6, 3, 4, 4), dtype=np.float32)  # torchvision ToTensor's range
    np.save(tmp_path / "unit.npy", x)
    assert torch.equal(load_npy(str(tmp_path / "unit.npy")).values, torch.from_numpy(x))
    assert "float images in [0, 1]" in capsys.readouterr().err
    np.save(tmp_path / "centred.npy", x * 2 - 1)
    load_npy(str(tmp_path / "centred.npy"))
    assert "[0, 1]" not in capsys.readouterr().out


@pytest.mark.parametrize("std, noted", [(1.0, False), (0.3, False), (500.0, True), (0.001, True)])
def test_npy_data_far_from_unit_scale_gets_a_note(tmp_path, capsys, std, noted):
    x = np.random.default_rng(0).standard_normal((200, 2)).astype(np.float32) * std
    np.save(tmp_path / "points.npy", x)
    assert torch.equal(load_npy(str(tmp_path / "points.npy")).values, torch.from_numpy(x))  # used as given
    err = capsys.readouterr().err
    assert ("note:" in err and "standardize" in err) == noted, err


def test_npy_integer_vectors_are_not_treated_as_pixels(tmp_path):
    np.save(tmp_path / "counts.npy", np.array([[0, 255], [3, 4]], dtype=np.uint8))
    data = load_npy(str(tmp_path / "counts.npy"))
    assert data.values.dtype == torch.float32
    assert torch.equal(data.all(), torch.tensor([[0.0, 255.0], [3.0, 4.0]]))


def test_npy_rank3_rejected_with_shape_and_fix(tmp_path):
    np.save(tmp_path / "gray.npy", np.zeros((5, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError) as caught:
        load_npy(str(tmp_path / "gray.npy"))
    assert "(5, 28, 28)" in str(caught.value) and "x[:, None]" in str(caught.value)


@pytest.mark.parametrize("n_nan, n_inf", [(2, 0), (0, 1), (2, 1)])
def test_npy_nan_and_inf_rejected_with_counts(tmp_path, n_nan, n_inf):
    x = np.zeros((4, 2), dtype=np.float32)
    x.flat[:n_nan] = np.nan
    x.flat[n_nan : n_nan + n_inf] = -np.inf
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(DataError, match=f"{n_nan} NaN and {n_inf} inf"):
        load_npy(str(tmp_path / "bad.npy"))


def test_npy_float64_overflowing_float32_rejected(tmp_path):
    np.save(tmp_path / "huge.npy", np.array([[1e300, 0.0]]))
    with pytest.raises(DataError, match="inf"):
        load_npy(str(tmp_path / "huge.npy"))


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.zeros((0, 3), dtype=np.float32), "no data"),
        (np.zeros((2, 3), dtype=bool), "dtype bool"),
        (np.zeros((2, 3), dtype=np.complex64), "dtype complex64"),
        (np.array([["a", "b"]]), "dtype <U1"),
    ],
)
def test_npy_bad_arrays_rejected(tmp_path, array, problem):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(DataError, match=problem):
        load_npy(str(tmp_path / "x.npy"))


def test_npy_unloadable_files_rejected(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_npy(str(tmp_path / "missing.npy"))

    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(DataError, match="not an .npy file"):
        load_npy(str(tmp_path / "junk.npy"))

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"Python objects \(dtype object\), not numbers: .*astype") as err:
        load_npy(str(tmp_path / "objects.npy"))
    assert "allow_pickle" not in str(err.value)  # numpy's advice: load it unsafely

    np.savez(tmp_path / "archive.npz", x=np.zeros((2, 2)))
    with pytest.raises(DataError, match="npz"):
        load_npy(str(tmp_path / "archive.npz"))


@pytest.mark.parametrize("name, save, said", [
    # a zip as np.savez's: np.load opened it as an .npz, and the error said it was one
    ("x.pt", lambda p: torch.save(torch.zeros(4, 3, 8, 8), p), r"a torch\.save file, not an \.npy: .*x\.numpy\(\)"),
    ("x.pkl", lambda p: p.write_bytes(pickle.dumps(np.zeros((4, 2)))), r"a pickle .*np\.save\(path, x\)"),
    # numpy said these "contain pickled (object) data" and told how to load them unsafely
    ("data.csv", lambda p: p.write_text("1,2\n3,4\n"), r"not an \.npy file .*np\.save$"),
    # CIFAR-10's own batch (a pickle): the preset reads it as it is, no np.save
    ("data_batch_1", lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}, protocol=2)),
     r"a pickle \(pickle\.dump, an old torch\.save\), not an \.npy; CIFAR-10's are read by --preset cifar10 [^;]*$"),
    ("train-images-idx3-ubyte", lambda p: p.write_bytes(b"\x00\x00\x08\x03" + bytes(16)),
     r"not an \.npy file \(it lacks the header np\.save writes\); MNIST's files are read by --preset mnist"),
])
def test_a_file_that_is_no_npy_is_named_for_what_it_is(tmp_path, name, save, said):
    save(tmp_path / name)
    with pytest.raises(DataError, match=said) as err:
        load_npy(str(tmp_path / name))
    assert "pickled" not in str(err.value) and "unsafe" not in str(err.value)


def test_latent_shards_given_to_an_image_preset_are_named_as_such(tmp_path):
    """--preset digits --data SHARDS said only "no images ... (.tar x4, .json x1)"."""
    from stmd_fast.data.images import list_images

    for i in range(2):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match=r"no images under .*; they are latent shards \(manifest\.json beside them\): "
                                        r"train them with --preset latent$"):
        list_images(tmp_path)


def test_a_file_of_ones_own_beside_a_datasets_files_is_not_taken_for_one_of_them(tmp_path):
    """A CSV in MNIST/raw or cifar-10-batches-py was told "MNIST's files are read by --preset mnist"."""
    for folder, theirs in [("MNIST/raw", "train-images-idx3-ubyte"), ("cifar-10-batches-py", "data_batch_1")]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / theirs).write_bytes(b"\x00" * 20)
        (tmp_path / folder / "mine.csv").write_text("1,2\n3,4\n")
        with pytest.raises(DataError, match=r"not an \.npy file .*np\.save$") as err:
            load_npy(str(tmp_path / folder / "mine.csv"))
        assert "--preset" not in str(err.value)
        with pytest.raises(DataError, match="read by --preset"):  # their own file still names its preset
            load_npy(str(tmp_path / folder / theirs))


@pytest.mark.parametrize("shape", [(4, 16, 16, 2), (4, 6, 6, 3), (4, 8, 8, 1), (4, 32, 32, 4), (4, 4, 4, 3),
                                   (4, 2, 2, 1)])
def test_channels_last_images_of_any_channel_count_are_refused(tmp_path, shape):
    """(N, 16, 16, 2), gray + alpha channels last, trained as 16-channel 16 x 2 images, without a word; 4 x 4 RGB
    images as 4-channel 4 x 3 ones."""
    np.save(tmp_path / "hwc.npy", np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=r"\(N, H, W, C\).*x\.transpose\(0, 3, 1, 2\)"):
        load_npy(str(tmp_path / "hwc.npy"))
    np.save(tmp_path / "chw.npy", np.zeros((4, shape[-1], *shape[1:3]), np.uint8))  # the same, channels first
    assert load_npy(str(tmp_path / "chw.npy")).shape == (shape[-1], *shape[1:3])


# --- TensorData.batch and helpers --------------------------------------------------------------


@pytest.fixture
def rows() -> TensorData:
    # 1000 distinct vectors, so different index draws give different batches.
    return TensorData("rows", torch.arange(2000, dtype=torch.float32).reshape(1000, 2), "vector")


def test_batch_is_reproducible_and_comes_from_the_generator(rows):
    a = rows.batch(64, torch.Generator().manual_seed(0))
    b = rows.batch(64, torch.Generator().manual_seed(0))
    c = rows.batch(64, torch.Generator().manual_seed(1))
    assert a.shape == (64, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    idx = torch.randint(1000, (64,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, rows.values[idx])


def test_batch_advances_the_generator(rows):
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(rows.batch(64, g), rows.batch(64, g))


def test_to_keeps_dtype_and_content():
    data = TensorData("px", torch.tensor([[[[0, 255]]]], dtype=torch.uint8), "image")
    moved = data.to("cpu")
    assert moved.values.dtype == torch.uint8 and torch.equal(moved.values, data.values)
    assert moved.name == "px" and moved.kind == "image"
    assert torch.equal(moved.all(), torch.tensor([[[[-1.0, 1.0]]]]))


def test_to_moves_labels_and_keeps_none():
    data = TensorData("px", torch.zeros(3, 1, 2, 2), "image", torch.tensor([2, 0, 1]))
    moved = data.to("cpu")
    assert torch.equal(moved.labels, torch.tensor([2, 0, 1]))
    assert TensorData("v", torch.zeros(3, 2), "vector").to("cpu").labels is None


def test_labelled_batch_matches_batch_and_pairs_rows_with_labels():
    values = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    data = TensorData("rows", values, "vector", torch.arange(20) % 10)
    x, y = data.labelled_batch(32, torch.Generator().manual_seed(5))
    assert torch.equal(x, data.batch(32, torch.Generator().manual_seed(5)))
    assert y.dtype == torch.int64 and torch.equal(y, (x[:, 0] / 2).long() % 10)  # row i holds 2i, label i % 10


def test_labelled_batch_without_labels_names_the_fix():
    with pytest.raises(DataError, match="no labels"):
        TensorData("v", torch.zeros(3, 2), "vector").labelled_batch(2, torch.Generator())


def test_to_unit_range_maps_and_clamps():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5])
    assert torch.equal(to_unit_range(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize(
    "values, kind, problem",
    [
        (torch.zeros(3, 2), "image", "rank 4"),
        (torch.zeros(3, 1, 2, 2), "vector", "rank 2"),
        (torch.zeros(3, 2), "audio", "kind 'audio'"),
        (torch.zeros(3, 2, dtype=torch.float64), "vector", "float64"),
    ],
)
def test_tensor_data_rejects_inconsistent_layouts(values, kind, problem):
    with pytest.raises(DataError, match=problem):
        TensorData("t", values, kind)


@pytest.mark.parametrize(
    "labels, problem",
    [(torch.zeros(2, dtype=torch.int64), r"shape \(3,\)"), (torch.zeros(3, dtype=torch.int32), "int32")],
)
def test_tensor_data_rejects_bad_labels(labels, problem):
    with pytest.raises(DataError, match=problem):
        TensorData("t", torch.zeros(3, 2), "vector", labels)
