"""Sample-quality metrics: Frechet distance (FD on classifier features, or Inception FID), PSNR, diversity.

Every function takes images in model space [-1, 1], as the samplers return them. The Frechet
statistics are torchmetrics' FrechetInceptionDistance; the reference (real) statistics can be
cached in a .safetensors file, keyed by the feature extractor and the reference images, so an
evaluation sweep computes them once.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .classifier import FeatureClassifier
from .data.datasets import to_unit_range
from .files import remove_stale_temps, write_atomic

SCORING_VERSION = "2"
"""How images are scored; in the reference caches and evaluate's results, so a change is measured again (FD's
too, once: one version for both). 2: FID's pixels rounded to uint8 (torchmetrics' normalize=True truncates: 1..63
of 255 came out a level dark)."""
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class _ClassifierFeatures(nn.Module):
    """The classifier's features as torchmetrics' custom feature extractor.

    With a custom module torchmetrics passes the images through unchanged, so this receives
    model-space images; `num_features` spares torchmetrics a dummy forward pass to find the size.
    """

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


class NonFiniteImages(ValueError):
    """Images holding NaN given to FD / FID."""


class FrechetDistance:
    """FD (classifier features) or FID (Inception) between a reference set and generated images,
    both in model space [-1, 1]; torchmetrics' FrechetInceptionDistance does the statistics.

    fd = FrechetDistance(classifier)              # or FrechetDistance(None) for Inception FID
    fd.set_reference(test_images, cache="runs/cache/mnist-FD.safetensors")
    fd.score(samples)                             # a float; lower is better

    Images, generated and reference alike, are clamped to [-1, 1] first (samplers overshoot slightly;
    a saved image would be clamped too; data beyond [-1, 1], such as standardized floats, are scored as
    their saved images would look). The classifier is moved to `device` and put in eval mode.
    """

    def __init__(self, classifier: FeatureClassifier | None = None, inception_weights: str | None = None,
                 device: torch.device | str = "cpu", batch_size: int = 256):
        from torchmetrics.image.fid import FrechetInceptionDistance  # imported here: slow to import

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.classifier = classifier
        self._extractor_id: str | None = None  # computed when a cache needs it
        self.reference_sha256: str | None = None  # set_reference's images
        if classifier is not None:
            self.name = "FD"
            metric = FrechetInceptionDistance(feature=_ClassifierFeatures(classifier), reset_real_features=False,
                                              sync_on_compute=False)
        else:
            self.name = "FID"
            metric = _inception_fid(FrechetInceptionDistance, inception_weights)
        # sync_on_compute=False (above): one process measures with all the samples (rank 0 under torchrun, while
        # the others train on); torchmetrics' default gathers over the process group, which hung the job
        self._metric = metric.to(self.device)

    # ------------------------------------------------------------------ public API

    def set_reference(self, images: torch.Tensor, cache: str | Path | None = None) -> None:
        """Compute the reference statistics of `images` (N, C, H, W), or read them from `cache`.

        The cache is a .safetensors file holding torchmetrics' real_features_sum,
        real_features_cov_sum and real_features_num_samples, with the feature extractor's and the
        images' fingerprints in its metadata: a file made by another classifier, other Inception
        weights or other images is recomputed and overwritten, never used.
        """
        self._check(images, "reference")
        self.reference_sha256 = _sha256_tensor(images)  # what a result is scored against (evaluate's sweep keys)
        key = None
        if cache is not None:
            key = {"format": SCORING_VERSION, "metric": self.name, "feature_extractor": self.extractor_id,
                   "num_images": str(len(images)), "images_sha256": self.reference_sha256}
            if self._load_cache(Path(cache), key):
                return
        for name in REAL_STATES:  # reset() keeps real statistics (reset_real_features=False): zero them here
            getattr(self._metric, name).zero_()
        self._add(images, real=True)
        if cache is not None:
            try:
                self._save_cache(Path(cache), key)
            except OSError as err:  # a cache: the statistics are computed, only the next run recomputes them
                print(f"warning: could not write the reference statistics cache {err.filename or cache} "
                      f"({err.strerror or err}); going on without it", file=sys.stderr)

    def score(self, generated: torch.Tensor) -> float:
        """The Frechet distance between the reference set and `generated` (N >= 2, model space)."""
        if int(self._metric.real_features_num_samples) < 2:
            raise ValueError(f"no reference statistics: call set_reference(images) before score() ({self.name})")
        self._check(generated, "generated")
        self._metric.reset()  # the fake statistics only
        self._add(generated, real=False)
        return float(self._metric.compute())

    @property
    def extractor_id(self) -> str:
        """Fingerprint of the feature extractor: sha256 of its weights (classifier or Inception)."""
        if self._extractor_id is None:
            prefix = "classifier" if self.classifier is not None else "inception"
            self._extractor_id = f"{prefix}:{_sha256_module(self._metric.inception)}"
        return self._extractor_id

    # ------------------------------------------------------------------ internals

    def _check(self, images: torch.Tensor, what: str) -> None:
        if images.dim() != 4 or len(images) < 2:
            raise ValueError(f"{what} images have shape {tuple(images.shape)}: {self.name} needs (N, C, H, W) "
                             "with N >= 2 (a covariance needs at least two samples)")
        if self.classifier is not None and tuple(images.shape[1:]) != self.classifier.data_shape:
            raise ValueError(f"{what} images are {tuple(images.shape[1:])} but the classifier was trained on "
                             f"{self.classifier.data_shape}: use the classifier trained on this dataset")
        if self.classifier is None and images.shape[1] not in (1, 3):
            raise ValueError(f"{what} images have {images.shape[1]} channels: Inception FID needs 1 (gray) or 3 (RGB)")
        # inf is clamped to the image's range like any overshoot; NaN is no image, and NaN features crash
        # torchmetrics' eigvals inside MKL (a segmentation fault, not an exception)
        bad = int(images.flatten(1).isnan().any(1).sum())
        if bad:
            raise NonFiniteImages(f"{bad} of the {len(images)} {what} images hold NaN, which {self.name} cannot "
                                  + ("score: the model diverged at this setting, or its weights did"
                                     if what == "generated" else "score: check the reference data"))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32).clamp(-1, 1)
        if self.classifier is not None:
            return x  # the classifier reads model space
        x = (to_unit_range(x) * 255).round().to(torch.uint8)  # the saved image's pixels (normalize=False)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # Inception is RGB only

    @torch.no_grad()
    def _add(self, images: torch.Tensor, real: bool) -> None:
        for start in range(0, len(images), self.batch_size):
            self._metric.update(self._prepare(images[start:start + self.batch_size]), real=real)

    def _load_cache(self, path: Path, key: dict) -> bool:
        # Anything but a file that matches `key` exactly (missing, unreadable, stale) means recompute.
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.metadata() != key:
                    return False
                tensors = {name: f.get_tensor(name) for name in REAL_STATES}
        except (SafetensorError, OSError, KeyError, ValueError):
            return False
        for name, value in tensors.items():
            state = getattr(self._metric, name)
            if value.shape != state.shape:
                return False
        for name, value in tensors.items():
            getattr(self._metric, name).copy_(value)
        return True

    def _save_cache(self, path: Path, key: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, min_age_s=3600)  # a killed writer's (32 MB for Inception); no lock here
        tensors = {name: getattr(self._metric, name).detach().cpu().contiguous() for name in REAL_STATES}
        # A per-process temporary name: two evaluations sharing --cache-dir never write one file; a reader
        # sees the old cache or the new one, never half
        write_atomic(path, save(tensors, metadata=key))


def _inception_fid(fid_class, weights: str | None):
    """torchmetrics' Inception FID, from a local weights file or torch-fidelity's download."""
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"Inception weights {weights} not found: pass the path of the downloaded "
                                f"{_inception_filename()} file to --inception-weights")
    try:
        # torch-fidelity reads a local file with torch.load(weights_only=False): pass only files you trust.
        return fid_class(feature=2048, normalize=False, reset_real_features=False, sync_on_compute=False,
                         feature_extractor_weights_path=weights)
    except Exception as error:  # noqa: BLE001 (torch.load of a bad file raises anything: pickle, zip, key errors)
        if weights is not None:  # a truncated download, or another file
            raise RuntimeError(f"--inception-weights {weights} is not the Inception weights file "
                               f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                               f"download {_inception_filename()} again and pass that file") from None
        if not isinstance(error, OSError):  # OSError: urllib's URLError offline, or a failed write to the hub cache
            raise
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        hub_cache = Path(torch.hub.get_dir()) / "checkpoints"  # where torch-fidelity looks before downloading
        raise RuntimeError(
            f"the Inception weights for FID could not be downloaded ({error}): on a networked machine "
            f"download {URL_INCEPTION_V3} and pass that file with --inception-weights PATH "
            f"(or copy it into {hub_cache})"
        ) from None


def _inception_filename() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3.rsplit("/", 1)[-1]


def _sha256_tensor(x: torch.Tensor, digest=None) -> str:
    digest = digest or hashlib.sha256()
    x = x.detach().cpu().contiguous()
    digest.update(f"{x.dtype}{tuple(x.shape)}".encode())
    digest.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: any dtype, 0-d included
    return digest.hexdigest()


def _sha256_module(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        _sha256_tensor(value, digest)
    return digest.hexdigest()


def psnr(x: torch.Tensor, y: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB of images x, y (..., C, H, W) in model space: a tensor of shape (...).

    Both are mapped to [0, 1] (clamped, as a saved image would be) so the peak is 1; identical
    images give inf. where: a boolean mask broadcastable to x: the mean squared error over those
    pixels alone (inpainting's missing region), else over all.
    """
    if x.shape != y.shape or x.dim() < 3:
        raise ValueError(f"psnr needs two image tensors of one shape (..., C, H, W), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    error = (to_unit_range(x.float()) - to_unit_range(y.float())).square()
    if where is None:
        mse = error.mean(dim=(-3, -2, -1))
    else:
        where = where.expand_as(error).to(error.dtype)
        mse = (error * where).sum(dim=(-3, -2, -1)) / where.sum(dim=(-3, -2, -1))
    return 10 * torch.log10(1 / mse)


def diversity(completions: torch.Tensor) -> float:
    """Spread between K samples of the same thing: completions (K, B, ...) -> the mean over B and
    pixels of the standard deviation over K (population std, unbiased=False), in the input's units."""
    if completions.dim() < 2 or completions.shape[0] < 2:
        raise ValueError(f"diversity needs (K, B, ...) completions with K >= 2, got shape {tuple(completions.shape)}")
    return float(completions.float().std(dim=0, unbiased=False).mean())
