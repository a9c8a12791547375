"""Datasets as in-memory tensors: scikit-learn's 8x8 digits, MNIST, CIFAR-10, and the user's own .npy.

The three named datasets carry their class labels too (for the FD classifier); .npy data has none.

Every loader returns a TensorData. Images are kept as stored (uint8 pixels for MNIST, CIFAR-10 and
uint8 .npy images, a quarter of the memory of float32) and mapped to model space [-1, 1] only when a
batch is drawn. Anything wrong with the data raises DataError at load time, before any training starts.
"""
from __future__ import annotations

import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "test")
KINDS = {"image": 4, "vector": 2}  # kind -> rank of `values`, sample axis included
# Float data is used as given, but the VP diffusion mixes it with unit-variance noise: data of magnitude
# 1e4 and more cannot be learned (and 1e19 overflows the loss's squares in float32). Refused at load.
MAX_ABS = 1e4

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"  # the python version, the one torchvision (and stmd_fast) reads
CIFAR10_BINARY_ARCHIVE = "cifar-10-binary.tar.gz"  # the C version: cifar-10-batches-bin/data_batch_1.bin ...


class DataError(ValueError):
    """Bad or missing data: the message names the problem and the fix."""


@dataclass
class TensorData:
    """An in-memory dataset; batches are drawn with replacement from a torch.Generator."""

    name: str
    values: torch.Tensor
    """(N, *shape): uint8 pixels 0..255, or float32 already in model space."""
    kind: str
    """'image' (N, C, H, W) or 'vector' (N, D)."""
    labels: torch.Tensor | None = None
    """(N,) int64 class labels where the dataset has them (digits, MNIST, CIFAR-10), else None."""
    flip: bool = False
    """Images: batch() mirrors each drawn image left-right with probability 1/2 (augmentation)."""

    def __post_init__(self) -> None:
        # Checked once here so that batch() and the trainer can trust the layout.
        if self.kind not in KINDS:
            raise DataError(f"{self.name}: kind {self.kind!r} is unknown; use 'image' or 'vector'")
        if self.values.dim() != KINDS[self.kind]:
            raise DataError(
                f"{self.name}: {self.kind} data must have rank {KINDS[self.kind]}, got shape "
                f"{tuple(self.values.shape)}; use (N, C, H, W) for images or (N, D) for vectors"
            )
        if self.values.dtype not in (torch.uint8, torch.float32):
            raise DataError(
                f"{self.name}: values have dtype {self.values.dtype}; store uint8 pixels or float32"
            )
        if self.flip and self.kind != "image":
            raise DataError(f"{self.name}: horizontal flip is for images, not {self.kind} data; drop --flip")
        if self.labels is not None and (
            self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (len(self),)
        ):
            raise DataError(
                f"{self.name}: labels must be int64 of shape ({len(self)},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}; pass one class per sample as torch.as_tensor(y, dtype=torch.int64)"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.values.shape[1:])

    def __len__(self) -> int:
        return self.values.shape[0]

    def to(self, device: torch.device | str) -> TensorData:
        """The same data with `values` (and `labels`) on `device` (dtype kept, so uint8 images stay small)."""
        labels = None if self.labels is None else self.labels.to(device)
        return TensorData(self.name, self.values.to(device), self.kind, labels, self.flip)

    def batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """`size` samples drawn with replacement, float32 in model space, on the generator's device.

        The indices (and, with flip, which images are mirrored) come from `generator` alone, so a
        seeded generator reproduces the batch. Without flip the draws are the same as before flip existed.
        """
        indices = self._draw(size, generator)
        # No-op moves when the data already lives on the generator's device (the fast path).
        rows = self.values[indices.to(self.values.device)].to(generator.device)
        if self.flip:
            mirror = torch.rand(size, generator=generator, device=generator.device) < 0.5
            rows = torch.where(mirror[:, None, None, None], rows.flip(-1), rows)
        return _to_model_space(rows)

    def labelled_batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels): the batch that batch() would draw from the same generator state, with its labels."""
        if self.labels is None:
            raise DataError(f"{self.name}: has no labels; use a labelled dataset (digits, mnist, cifar10)")
        indices = self._draw(size, generator)
        rows = self.values[indices.to(self.values.device)].to(generator.device)
        return _to_model_space(rows), self.labels[indices.to(self.labels.device)].to(generator.device)

    def _draw(self, size: int, generator: torch.Generator) -> torch.Tensor:
        # One draw for batch() and labelled_batch(), so a seed means the same rows in both.
        return torch.randint(len(self), (size,), generator=generator, device=generator.device)

    def all(self) -> torch.Tensor:
        """Every sample as float32 in model space (the same mapping as batch())."""
        return _to_model_space(self.values)


def _to_model_space(x: torch.Tensor) -> torch.Tensor:
    # uint8 pixels 0..255 -> [-1, 1]; float data is already in model space.
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    return x.float()


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model-space images [-1, 1] -> [0, 1] (for saving or metrics), clamped since samples overshoot."""
    return ((x + 1) / 2).clamp(0, 1)


def viewable(x: torch.Tensor) -> torch.Tensor:
    """Model-space images (..., C, H, W) -> [0, 1] with channels a PNG holds: 1 to 4 as they are (gray, gray +
    alpha, RGB, RGBA), the first 3 (as RGB) of more, which no image format shows (a 5-channel .npy once
    trained to its first sample grid and crashed there)."""
    return to_unit_range(x[..., :3, :, :] if x.shape[-3] > 4 else x)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r} is unknown; use 'train' or 'test'")


def load_digits(split: str = "train") -> TensorData:
    """scikit-learn's bundled 8x8 digits (no download): (N, 1, 8, 8) float32 in [-1, 1].

    The split is fixed so runs are comparable: 'train' is the first 1500 images, 'test' the last 297.
    """
    _check_split(split)
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: sklearn is slow to import

    digits = sklearn_digits()
    rows = slice(0, 1500) if split == "train" else slice(1500, None)
    images = digits.images[rows]  # (N, 8, 8) float64, integer levels 0..16
    values = torch.from_numpy(images / 16 * 2 - 1).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target[rows]).long()
    return TensorData("digits", values, "image", labels)


def _missing(root: str, what: str, folder: str, files: str, hint: str = "") -> DataError:
    # torchvision says only "Dataset not found" (and names its own download=True): say where the files go.
    where = os.path.join(os.path.expanduser(root), folder)
    return DataError(f"{what} files missing: put {files} in {where}{hint}, pass --data-dir DIR where they are, or "
                     f"--download where the network allows")


IDX = {"images": (0x0803, 3), "labels": (0x0801, 1)}  # an MNIST idx file's magic (uint8 data, its dims), dims


def _idx_length(path: Path, kind: str) -> int:
    """How many images or labels an MNIST idx file holds, once its header and size are checked: DataError
    naming the file and what is wrong (torchvision fails on these with a bare ValueError or assert)."""
    magic, ndim = IDX[kind]
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    size = path.stat().st_size
    if head[:2] == b"\x1f\x8b":
        raise DataError(f"{path} is gzip-compressed under the uncompressed name: gunzip {path.name}.gz (the original "
                        f"download) into {path.parent}, or this file: zcat {path} > {path.name}.raw && mv {path.name}.raw "
                        f"{path}")
    found = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    if found != magic:
        other = next((k for k, (m, _) in IDX.items() if m == found), None)
        raise DataError(f"{path} holds {other}, not {kind}: the files are swapped or misnamed; give each its name"
                        if other else f"{path} ({size} bytes) is not an MNIST idx file of {kind}: damaged or another "
                        f"file; replace it with an intact copy")
    dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)] if len(head) == 4 + 4 * ndim else []
    expected = 4 + 4 * ndim + int(np.prod(dims)) if dims else None
    if size != expected:
        promise = f"promises {expected} ({dims[0]} {kind})" if dims else "is cut short"
        raise DataError(f"{path} has {size} bytes where its header {promise}: cut short or padded; replace it with "
                        f"an intact copy")
    return dims[0]


def _mnist_hint(root: Path, raw: Path, name: str) -> str:
    """Where a missing MNIST file is instead: one level off (--data-dir pointing at MNIST/ or raw/, or the files
    loose), still compressed (.gz, as the original site serves them), or under another mirror's dotted name."""
    dotted = name.replace("-idx", ".idx")  # train-images.idx3-ubyte (some mirrors)
    for folder in dict.fromkeys((root, root / "raw", root / "MNIST", raw, root.parent, root.parent.parent)):
        if folder != raw and (folder / name).is_file():
            if folder.name == "raw" and folder.parent.name == "MNIST":
                return f" (they are in {folder}: pass --data-dir {folder.parent.parent})"
            return f" (they are in {folder}: move the four files into {raw})"
        if (folder / f"{name}.gz").is_file():
            return f" ({folder / name}.gz is compressed: gunzip the four .gz files{'' if folder == raw else ' into ' + str(raw)})"
        if (folder / dotted).is_file():
            return f" ({folder / dotted} is {name} under another name: rename the four files, '.idx' to '-idx')"
    return ""


def _check_mnist(root: str, split: str) -> None:
    """MNIST's files where torchvision reads them, their split's pair intact and of the same length: DataError
    naming the file and the fix, before torchvision's own messages (a bare "Dataset not found", a ValueError)."""
    base = Path(root).expanduser()
    raw = base / "MNIST" / "raw"
    processed = base / "MNIST" / "processed"
    if (processed / "training.pt").is_file() and (processed / "test.pt").is_file():
        return  # torchvision's older layout, which it still reads (load_mnist names it if it does not load)
    absent = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if absent:  # torchvision wants all four, whichever split is read
        raise _missing(root, "MNIST", os.path.join("MNIST", "raw"), "the four uncompressed idx files ("
                       + ", ".join(MNIST_FILES) + ")", _mnist_hint(base, raw, absent[0]))
    prefix = "train" if split == "train" else "t10k"
    paths = {kind: raw / f"{prefix}-{kind}-idx{IDX[kind][1]}-ubyte" for kind in IDX}
    n = {kind: _idx_length(path, kind) for kind, path in paths.items()}
    if n["images"] != n["labels"]:
        raise DataError(f"{paths['images']} holds {n['images']} images and {paths['labels']} {n['labels']} labels: "
                        f"take both files from the same copy of MNIST")


def _check_cifar10(root: str) -> None:
    """CIFAR-10's seven files where torchvision reads them and matching the official MD5s: DataError naming the
    missing or damaged ones, or the folder one level off, or the archive still packed."""
    from torchvision.datasets import cifar  # cifar.check_integrity: the tests patch it for synthetic files

    base = Path(root).expanduser()
    folder = base / cifar.CIFAR10.base_folder
    official = [*cifar.CIFAR10.train_list, *cifar.CIFAR10.test_list, [cifar.CIFAR10.meta["filename"],
                                                                      cifar.CIFAR10.meta["md5"]]]
    absent = [name for name, _ in official if not (folder / name).is_file()]
    if absent:
        hint = ""
        binary = next((p for p in (base / "cifar-10-batches-bin", base, base / CIFAR10_BINARY_ARCHIVE)
                       if (p / "data_batch_1.bin").is_file() or p.name == CIFAR10_BINARY_ARCHIVE and p.is_file()), None)
        if binary is not None:
            into = base.parent if binary == base else base  # base is the binary version's own folder
            hint = (f" ({binary} is CIFAR-10's binary version; stmd_fast reads the python version, "
                    f"{CIFAR10_ARCHIVE}: unpack that into {into} and pass --data-dir {into})")
        elif (base / "data_batch_1").is_file():
            hint = f" (they are in {base} itself: pass --data-dir {base.parent})"
        elif (base / cifar.CIFAR10.filename).is_file():
            hint = f" ({base / cifar.CIFAR10.filename} is the archive: tar -xzf {base / cifar.CIFAR10.filename} -C {base})"
        raise _missing(root, "CIFAR-10", cifar.CIFAR10.base_folder, f"the official python batches (missing: "
                       f"{', '.join(absent)})", hint)
    damaged = [name for name, md5 in official if not cifar.check_integrity(str(folder / name), md5)]
    if damaged:
        raise DataError(f"CIFAR-10 in {folder}: {', '.join(damaged)} {'does' if len(damaged) == 1 else 'do'} not match "
                        f"the official MD5 (damaged, or another release): replace {'it' if len(damaged) == 1 else 'them'} "
                        f"from {CIFAR10_ARCHIVE}, or pass --download where the network allows")


def _download_failed(what: str, root: str, error: OSError) -> DataError:
    return DataError(f"could not download {what} into {os.path.expanduser(root)} ({error}): copy the files "
                     f"there from a machine with network access, then run without --download")


def load_mnist(root: str, split: str = "train", download: bool = False) -> TensorData:
    """MNIST through torchvision: (N, 1, 28, 28) uint8, read from ROOT/MNIST/raw/."""
    _check_split(split)
    from torchvision.datasets import MNIST  # imported here: torchvision is slow to import

    if not download:
        _check_mnist(root, split)
    try:
        dataset = MNIST(root, train=split == "train", download=download)
    except OSError as error:  # urllib's URLError offline
        raise _download_failed("MNIST", root, error) from None
    except (RuntimeError, ValueError, AssertionError, pickle.UnpicklingError, EOFError) as error:  # not foreseen
        legacy = Path(root).expanduser() / "MNIST" / "processed"  # read instead of raw/ when both files are there
        where, files = (("processed", "training.pt and test.pt files")
                        if (legacy / "training.pt").is_file() and (legacy / "test.pt").is_file() else ("raw", "four idx files"))
        raise DataError(f"MNIST files in {os.path.join(os.path.expanduser(root), 'MNIST', where)} could not be "
                        f"read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): replace "
                        f"the {files} with intact copies, or pass --download where the network allows") from None
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return TensorData("mnist", dataset.data.unsqueeze(1).contiguous(), "image", labels)


def load_cifar10(root: str, split: str = "train", download: bool = False) -> TensorData:
    """CIFAR-10 through torchvision: (N, 3, 32, 32) uint8, read from ROOT/cifar-10-batches-py/."""
    _check_split(split)
    from torchvision.datasets import CIFAR10  # imported here: torchvision is slow to import

    if not download:
        _check_cifar10(root)
    try:
        dataset = CIFAR10(root, train=split == "train", download=download)
    except OSError as error:
        raise _download_failed("CIFAR-10", root, error) from None
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as error:  # not foreseen above
        raise DataError(f"CIFAR-10 files in {os.path.join(os.path.expanduser(root), 'cifar-10-batches-py')} could not "
                        f"be read ({type(error).__name__}: {error}): replace them with the official python batches, "
                        "or pass --download where the network allows") from None
    # torchvision keeps (N, H, W, C) numpy; the models want channels first.
    values = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)  # a list of ints in torchvision
    return TensorData("cifar10", values, "image", labels)


def load_preset(preset: str, split: str = "train", data_dir: str = "datasets", download: bool = False) -> TensorData:
    """The `split` of a preset's dataset: digits, mnist or cifar10 images, or the gmm preset's mixture
    (a GaussianMixture: the same batch() interface, and no splits)."""
    if preset == "gmm":
        from .gmm import default_mixture

        return default_mixture()
    if preset == "digits":
        return load_digits(split)
    if preset == "mnist":
        return load_mnist(data_dir, split, download)
    if preset == "cifar10":
        return load_cifar10(data_dir, split, download)
    raise DataError(f"no dataset for preset {preset!r}: the presets with data here are gmm, digits, mnist and cifar10")


def preset_files_hint(path: Path) -> str:
    """For --data given MNIST or CIFAR-10 files, their folder or the data root above it (what --data-dir
    takes), or latent shards to an image preset: the flags that read them, with the folder to pass where it can be
    told. A file is known by its own
    name only: a file of one's own beside MNIST's is not one of them."""
    folder = path if path.is_dir() else path.parent
    names = {p.name for p in folder.iterdir()} if path.is_dir() else {path.name}
    mnist_names = set(MNIST_FILES) | {f"{name}.gz" for name in MNIST_FILES}
    cifar_names = {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"}
    cifar_names |= {f"{name}.bin" for name in cifar_names - {"batches.meta"}} | {"batches.meta.txt"}
    if path.is_dir() and "manifest.json" in names and any(name.endswith(".tar") for name in names):
        return "; they are latent shards (manifest.json beside them): train them with --preset latent"
    if path.is_dir() and "MNIST" in names:  # the data root itself
        return f"; MNIST is read by --preset mnist --data-dir {folder}"
    if path.name == "MNIST":
        return f"; MNIST is read by --preset mnist --data-dir {path.parent}"
    if names & mnist_names:
        root = f"{folder.parent.parent}" if folder.name == "raw" and folder.parent.name == "MNIST" else "DIR"
        return f"; MNIST's files are read by --preset mnist --data-dir {root} ({root}/MNIST/raw holds them)"
    if path.is_dir() and names & {"cifar-10-batches-py", "cifar-10-batches-bin"}:
        return f"; CIFAR-10 is read by --preset cifar10 --data-dir {folder}"
    if names & cifar_names or path.name in (
            "cifar-10-batches-py", "cifar-10-batches-bin", CIFAR10_ARCHIVE, CIFAR10_BINARY_ARCHIVE):
        root = f"{folder.parent}" if folder.name in ("cifar-10-batches-py", "cifar-10-batches-bin") else "DIR"
        return f"; CIFAR-10's are read by --preset cifar10 --data-dir {root} ({root}/cifar-10-batches-py holds them)"
    return ""


def what_file_instead_of_npy(file: Path) -> tuple[str, str | None] | None:
    """(what a file given as an .npy is instead, the fix where one is known), from its first bytes; None for an
    .npy. numpy would say that a CSV or an MNIST file "contains pickled (object) data" and suggest loading it
    unsafely, and np.load opens any zip (torch.save writes one) as an .npz."""
    with open(file, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "a damaged zip archive, not an .npy", None
        if any(name.endswith("/data.pkl") for name in names):
            return "a torch.save file, not an .npy", "save the tensor with np.save(path, x.numpy())"
        from .images import IMAGE_SUFFIXES

        if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in names):  # CelebA's img_align_celeba.zip
            return "a zip archive of images, not an .npy", f"unzip it and pass the folder: --data {file.with_suffix('')}"
        if names and all(name.endswith(".npy") for name in names):
            return "an .npz archive, not an .npy", "save the single array with np.save(path, x)"
        return "a zip archive, not an .npy", "unzip it and pass the folder of images, or save an array with np.save"
    if head.startswith(b"\x80"):
        return "a pickle (pickle.dump, an old torch.save), not an .npy", "save the array with np.save(path, x)"
    return "not an .npy file (it lacks the header np.save writes)", None


LEVELS_NOT_PIXELS = 32
"""Integer images whose largest value is below this hold levels (a mask's 0/1, 0..16), not pixels 0..255: refused,
or as uint8 (maybe very dark photos) a note."""


def load_npy(path: str) -> TensorData:
    """The user's own array saved with np.save: (N, D) -> 'vector', (N, C, H, W) -> 'image'.

    Integer images are pixels 0..255 (mapped to [-1, 1] when drawn; other integer values are refused);
    everything else becomes float32 and is used as given, so scale it to roughly unit range yourself
    (magnitudes beyond MAX_ABS are refused).
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--data {path}: no such file or folder; give a folder of images, or an array saved with "
                        f"np.save(path, x)")
    from .images import IMAGE_SUFFIXES

    if file.suffix.lower() in IMAGE_SUFFIXES or file.suffix.lower() == ".json":
        what = "latent shards" if file.suffix.lower() == ".json" else "images"
        raise DataError(f"--data {path}: one file of your {what}; pass the folder that holds them: --data "
                        f"{file.parent}")
    takes = "--data takes a folder of images, latent shards or an array saved with np.save"
    try:
        instead = what_file_instead_of_npy(file)
        array = None if instead else np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # an .npy cut short, of Python objects, ...
        objects = "Object arrays cannot be loaded" in str(error)  # numpy's words go on to allow_pickle=True: unsafe
        instead = ("an .npy of Python objects (dtype object), not numbers", "save a numeric array, e.g. "
                   "x.astype(np.float32)") if objects else (f"not a loadable .npy ({str(error).splitlines()[0]})", None)
    if instead:
        what, fix = instead
        hint = preset_files_hint(file)  # a dataset's own file: the preset reads it, no conversion needed
        raise DataError(f"--data {path}: {what}{hint or f': {fix or takes}'}")
    # bool is not an np.number; complex is, but a model cannot use it.
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{path}: dtype {array.dtype} is not real numbers; convert with x.astype(np.float32)")

    if array.ndim == 2:
        kind = "vector"
    elif array.ndim == 4 and array.shape[-1] <= 4 and (4 < min(array.shape[1:3])
                                                       or array.shape[1] == array.shape[2] != array.shape[3]):
        # as (N, C, H, W): over 4 channels of images at most 4 pixels wide, or tiny images that are not square;
        # as (N, H, W, C): square gray, gray + alpha, RGB or RGBA images
        raise DataError(f"{path}: shape {array.shape} looks like (N, H, W, C) images, channels last as numpy and "
                        "PIL write them; the model takes (N, C, H, W): save x.transpose(0, 3, 1, 2)")
    elif array.ndim == 4:
        kind = "image"
    else:
        raise DataError(
            f"{path}: shape {array.shape} is not (N, D) vectors or (N, C, H, W) images; "
            "for (N, H, W) grayscale add a channel axis: x[:, None]"
        )
    if array.size == 0:
        raise DataError(f"{path}: shape {array.shape} holds no data; save at least one non-empty sample")

    if kind == "image" and np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise DataError(f"{path}: integer images with values in [{low}, {high}]; integer images are read as "
                            "pixels 0..255: save uint8 pixels, or float32 already scaled to [-1, 1]")
        if 0 < high < LEVELS_NOT_PIXELS:  # 0/1 masks, sklearn's digits (0..16): near-black pixels, trained on unsaid
            levels = (f"{path}: integer images with values in [{low}, {high}] look like levels, not pixels 0..255 (as "
                      f"which integer images are read, all of them near black): save np.rint(x * (255 / {high}))"
                      f".astype(np.uint8), or float32 scaled to [-1, 1]")
            if array.dtype != np.uint8:  # int64 from a list or sklearn, a mask's 0/1: levels, refused
                raise DataError(levels)
            print(f"note: {levels}; uint8 is taken as pixels, of very dark images", file=sys.stderr)  # may be photos
        values = torch.from_numpy(array.astype(np.uint8))  # pixels in any integer dtype: scaled when drawn
    else:
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, as a DataError
            values = torch.from_numpy(array.astype(np.float32))
        # Checked after the cast so that float64 values beyond float32's range are caught as inf.
        n_nan = int(values.isnan().sum())
        n_inf = int(values.isinf().sum())
        if n_nan or n_inf:
            raise DataError(
                f"{path}: {n_nan} NaN and {n_inf} inf values (after conversion to float32); "
                "drop or replace them, e.g. x = np.nan_to_num(x), and save again"
            )
        largest = float(values.abs().max())
        if largest > MAX_ABS:
            raise DataError(f"{path}: values up to {largest:.3g} in magnitude; the diffusion assumes data of about "
                            f"unit scale (its noise has std 1) and refuses beyond {MAX_ABS:g}: standardize, e.g. "
                            "x = (x - x.mean(0)) / x.std(0), and save again")
        if kind == "image" and float(values.min()) >= 0 and 2 < largest <= 255:
            raise DataError(f"{path}: float images with values in [0, {largest:.4g}] look like pixels 0..255 stored "
                            "as floats; float images are used as given, so save them scaled to [-1, 1] "
                            "(x / 127.5 - 1), or as uint8 pixels, which are scaled when drawn")
        if kind == "image" and float(values.min()) >= 0 and float(values.max()) <= 1:
            print(f"note: {path} holds float images in [0, 1] (as torchvision's ToTensor makes them); they are used "
                  "as given, while samples are saved as images in [-1, 1] (0 is mid-gray): save x * 2 - 1 for the "
                  "usual scale", file=sys.stderr)
        spread = float(values.std()) if values.numel() > 1 else 1.0
        if not 0.05 <= spread <= 20:  # learnable, but the noise (std 1) then drowns it or barely touches it
            print(f"note: {path} has std {spread:.3g}; the diffusion's noise has std 1, so data of about unit "
                  "scale learn best: standardize, e.g. x = (x - x.mean(0)) / x.std(0)", file=sys.stderr)
    return TensorData(file.stem, values, kind)
