"""The FD feature network: a small image classifier (2 conv + 2 fully connected layers).

The paper measures MNIST sample quality by the Frechet distance between the 128-d penultimate
(pre-ReLU) features of such a classifier on generated and on test images (math.md section 9). The
same network serves the 8x8 digits, MNIST and CIFAR-10 shapes. A trained classifier is a directory
  classifier.safetensors   the weights
  classifier.json          meta (dataset, test accuracy, ...) + data_shape, num_features, num_classes
"""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .data.datasets import TensorData, _to_model_space

WEIGHTS = "classifier.safetensors"
META = "classifier.json"
LABEL_SMOOTHING = 0.1  # see train_classifier: worth about 2 points of digits test accuracy
# The digits FD classifier this package ships, as FID pins its Inception weights: train-classifier trains another one
# on another CPU (float rounding follows the kernels torch picks for it; one seed gave 97.64% test accuracy on one
# machine and 97.98% on another), and FDs on different features do not compare. Its classifier.json says where and
# with which command it was trained.
REFERENCE_CLASSIFIERS = {"digits": Path(__file__).parent / "reference" / "classifier-digits"}


def default_classifier(dataset: str) -> Path:
    """The FD classifier read without --classifier: the shipped one (digits), else runs/classifier-<dataset>."""
    return REFERENCE_CLASSIFIERS.get(dataset, Path(f"runs/classifier-{dataset}"))


def train_hint(dataset: str, data_dir: str | None = None, out: str | Path | None = None) -> str:
    """The train-classifier command that writes the classifier `dataset`'s FD reads from `out` (its files from
    data_dir, where the dataset has files)."""
    command = f"python -m stmd_fast.evaluate train-classifier --preset {dataset}"
    if data_dir is not None:
        command += f" --data-dir {shlex.quote(str(data_dir))}"
    if out is not None and Path(out) != Path(f"runs/classifier-{dataset}"):  # train-classifier's default --out
        command += f" --out {shlex.quote(str(out))}"
    return f"train one with: {command}"


class FeatureClassifier(nn.Module):
    """2 conv + 2 fully connected layers; the 128-d pre-ReLU output of the first FC layer is the FD feature."""

    num_features = 128  # torchmetrics' FrechetInceptionDistance reads this attribute

    def __init__(self, data_shape: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"data_shape {tuple(data_shape)} is not (C, H, W): the classifier is for images")
        self.data_shape = tuple(int(d) for d in data_shape)
        self.num_classes = int(num_classes)
        channels = self.data_shape[0]
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        # A fixed 4x4 grid whatever the input size (8x8 digits, 28x28 MNIST, 32x32 CIFAR-10), so
        # one architecture and one feature size serve every dataset.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(64 * 16, self.num_features)
        self.fc2 = nn.Linear(self.num_features, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) FD features of images x (B, C, H, W) in model space [-1, 1]."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc1(self.pool(x).flatten(1))  # pre-ReLU, as in the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.fc2(F.relu(self.features(x)))


@torch.no_grad()
def accuracy(model: FeatureClassifier, data: TensorData, batch_size: int = 512) -> float:
    """Fraction of `data` classified correctly (model in eval mode, data on any device)."""
    if data.labels is None:
        raise ValueError(f"{data.name} has no labels: accuracy needs a labelled dataset (digits, mnist, cifar10)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        # Sliced before the float mapping so that a big uint8 test set is never converted whole.
        x = _to_model_space(data.values[start:start + batch_size]).to(device)
        y = data.labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data)


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, scale: float = 0.1,
                  shift: float = 0.1) -> torch.Tensor:
    """Each image of x (B, C, H, W) rotated by up to `degrees`, scaled by up to 1 +- `scale` and moved by up
    to `shift` of its size (bilinear, edges replicated: the digits' background is a flat border)."""
    b = x.shape[0]
    u = torch.rand(4, b, generator=generator, device=generator.device).to(x) * 2 - 1  # uniform in [-1, 1]
    angle, zoom = u[0] * math.radians(degrees), 1 + u[1] * scale
    cos, sin = zoom * angle.cos(), zoom * angle.sin()
    # affine_grid maps output to input coordinates in [-1, 1], so a shift of `shift` image sizes is 2 * shift.
    theta = torch.stack([torch.stack([cos, -sin, 2 * shift * u[2]], 1),
                         torch.stack([sin, cos, 2 * shift * u[3]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def train_classifier(train: TensorData, test: TensorData, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, device: torch.device | str = "cpu", progress: bool = True,
                     augment: bool = True) -> tuple[FeatureClassifier, float]:
    """Train the feature classifier on `train`; returns (model in eval mode, accuracy on `test` in [0, 1]).

    AdamW with a cosine learning-rate decay and label smoothing 0.1; batches are drawn with
    replacement from a generator seeded with `seed` (which also seeds the initial weights), so a run
    is reproducible. With `augment`, every training image gets a small random rotation, zoom and
    shift (random_affine). Why both: the digits test split (the last 297 images) comes from other
    writers than the train split; plain training stopped at 92-94% test accuracy there, augmentation
    alone at 94-96%, augmentation with label smoothing at 97-98% (4 seeds, 1000 steps of 128).
    """
    for data in (train, test):
        if data.labels is None:
            raise ValueError(f"{data.name} has no labels: train the classifier on digits, mnist or cifar10")
        if data.kind != "image":
            raise ValueError(f"{data.name} holds {data.kind}s, the classifier needs (N, C, H, W) images")
    if train.shape != test.shape:
        raise ValueError(f"train images are {train.shape} but test images {test.shape}: use two splits of one dataset")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    device = torch.device(device)
    # 10 classes for digits, MNIST and CIFAR-10; more only if the labels say so.
    num_classes = max(10, int(max(train.labels.max(), test.labels.max())) + 1)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's global RNG
        torch.manual_seed(seed)
        model = FeatureClassifier(train.shape, num_classes)
    model.to(device).train()

    data = train.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    bar = tqdm(range(steps), desc=f"classifier ({train.name})", unit="step", disable=None if progress else True)  # None: only on a terminal
    for _ in bar:
        x, y = data.labelled_batch(batch_size, generator)
        if augment:
            x = random_affine(x, generator)
        loss = F.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model, accuracy(model, test)


def save_classifier(model: FeatureClassifier, path: str | Path, meta: dict) -> None:
    """Write the classifier to directory `path` (created if needed): weights + json.

    Each file is written under a temporary name and renamed into place, so an interrupted save
    leaves the previous files intact rather than a half-written one.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    info = {**meta, "data_shape": list(model.data_shape), "num_features": model.num_features,
            "num_classes": model.num_classes}
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / f".tmp-{WEIGHTS}"
    save_file(weights, tmp)
    os.replace(tmp, folder / WEIGHTS)
    tmp = folder / f".tmp-{META}"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, folder / META)  # last: a json next to weights means the pair is complete


def load_classifier(path: str | Path, device: torch.device | str = "cpu", hint: str | None = None
                    ) -> tuple[FeatureClassifier, dict]:
    """(model in eval mode on `device`, the json meta) from a directory written by save_classifier. hint: how
    to train the one that belongs there (train_hint), said when it is missing or unusable."""
    folder = Path(path)
    hint = hint or train_hint("digits", out=folder)
    missing = [name for name in (WEIGHTS, META) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no FD classifier in {folder} ({', '.join(missing)} missing): {hint}")

    def damaged(err: Exception) -> ValueError:  # one line naming the folder, not a traceback from json,
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""  # safetensors or torch
        return ValueError(f"the FD classifier in {folder} is damaged ({type(err).__name__}: {reason}): {hint}")

    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as err:
        raise damaged(err) from None
    if meta.get("num_features") != FeatureClassifier.num_features:
        raise ValueError(f"{folder} holds a classifier with {meta.get('num_features')} features, this stmd_fast "
                         f"uses {FeatureClassifier.num_features}: {hint}")
    try:
        model = FeatureClassifier(tuple(meta["data_shape"]), meta["num_classes"])
        model.load_state_dict(load_file(folder / WEIGHTS))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
        raise damaged(err) from None
    return model.to(device).eval(), meta
