"""python -m stmd_fast.evaluate: FD/FID against NFE, the exact-kernel metric, inpainting, inverse problems, the
posterior (gmm), the per-s conditional FD.

  train-classifier --preset digits|mnist     the FD feature network (2 conv + 2 FC, 128-d features; digits ships one)
  sweep CKPT [CKPT ...] --out DIR            FD (or FID) over each method's (N, M) settings
  kernel RUN [RUN ...] --out DIR             gmm: distance of learned transitions to the exact kernel
  inpaint CKPT --mask center|pixels|half --out DIR   FD, PSNR and diversity of completions of held-out images
  posterior RUN [RUN ...] --out DIR          gmm: distance of SMC / DDNM+ posterior samples to the exact p(x_0 | y)
  conditional CKPT --out DIR                 FD of x0_hat ~ p(x_0 | x_s) at each s: which steps of a chain set its error
  inverse CKPT --operator sr4|sr2|gray|inpaint --out DIR   PSNR, FD, diversity and consistency ||A x - y|| of
                                             posterior samples

Everything is seeded: the same --seed (and --batch-size, on the same device) gives the same numbers.
Every result records how it was made (the command, versions, device, time). A sweep keeps each
setting as it is measured: run the same command again after an interruption and it measures the rest.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, Model, NonFiniteState, ema_decays_of, load_checkpoint, newest_intact
from .cli import Parser, interrupt_on_stop_signals, printable_output, several_processes, warnings_as_lines
from .cli import provenance as cli_provenance
from .devices import OutOfMemory, fits_in_memory, resolve_device
from .files import RunLocked, fsync_path, remove_stale_temps, run_lock, temp_sibling, write_atomic, write_fix
from .methods import METHODS
from .operators import CONDITIONED_STEPS
from .run_log import clock
from .sample import MAX_ZOOM
from .sampling import check_steps, nfe
from .schedule import TIME_GRIDS, alpha_sigma, time_grid
from .startup import exit_code

FD_PRESETS = ("digits", "mnist")  # FD on our classifier's features; other image data: Inception FID
DEFAULT_STMD = "1x1,2x1,4x1,8x1,1x2,2x2,4x2"
DEFAULT_MEANFLOW = "1,2,4,8"
DEFAULT_DDPM = "1,2,4,8,16,50,100"
INCEPTION_FEATURES = 2048  # the pool features FID is computed on


class EvalError(Exception):
    """Bad input to an evaluation: printed as one line, before any sampling."""


# ----------------------------------------------------------------------------- data and metric

def load_split(preset: str, split: str, data_dir: str | None, download: bool = False, meta: dict | None = None):
    """The `split` ('train' or 'test') of a preset's dataset, as TensorData, from `data_dir` (--data-dir), or
    else from where the checkpoints' run read its files (`meta`'s data_dir, saved absolute)."""
    from .data.datasets import DataError, load_preset

    data_dir = data_dir or (meta or {}).get("config", {}).get("data_dir") or "datasets"
    try:
        return load_preset(preset, split, data_dir, download)
    except DataError as err:
        raise EvalError(f"the {preset} {split} split: {err}") from None


def dataset_of(meta: dict) -> str:
    """What a checkpoint was trained on: a preset name, or the .npy path of --data."""
    return meta["config"]["data"] or meta["config"]["preset"]


# Each image command's question on the gmm preset, asked there of the exact distributions: the samples'
# distribution (sweep) and p(x_0 | x_s) (conditional) by the exact kernel, an inverse problem by the exact posterior
GMM_COUNTERPARTS = {"sweep": "kernel", "conditional": "kernel", "inpaint": "posterior", "inverse": "posterior"}


def find_checkpoints(paths: list[str]) -> list[tuple[Path, dict]]:
    """Each path's checkpoint (a run's newest intact one) and its metadata, each checkpoint given once."""
    found = []
    for p in paths:
        try:
            ckpt, meta, passed_over = newest_intact(p)  # verified: a damaged one is named here, before any work
        except FileNotFoundError as err:  # says "does not exist", or "no checkpoint in"
            raise EvalError(str(err)) from None
        if passed_over:
            print(f"note: using {ckpt}, the newest intact checkpoint; passed over: {'; '.join(passed_over)}",
                  file=sys.stderr)
        found.append((ckpt, meta))
    for i, (ckpt, _) in enumerate(found):
        for j in range(i):
            if found[j][0].resolve() == ckpt.resolve():  # RUN and RUN/checkpoints/step_X can name the same one
                raise EvalError(f"a checkpoint is given twice ({paths[j]} and {paths[i]} are both {ckpt}): "
                                "give each once")
    return found


def checkpoint_metas(paths: list[str], command: str, ema: float | None = None) -> list[tuple[Path, dict]]:
    """Each checkpoint's metadata; all must be image models of one dataset, each given once and keeping the
    EMA of --ema (checked before any work: not at a checkpoint's turn, after sampling the ones before it).
    A vector model is pointed to the gmm counterpart of `command`."""
    found = find_checkpoints(paths)
    for ckpt, meta in found:
        if ema is not None and ema not in ema_decays_of(meta):
            raise EvalError(f"--ema {ema}: {ckpt} keeps the EMA decays {', '.join(map(str, ema_decays_of(meta)))}; "
                            "pick one of them")
    kinds = {(dataset_of(m), tuple(m["data_shape"]), m["data_kind"]) for _, m in found}
    if len(kinds) > 1:
        listing = "; ".join(f"{c}: {dataset_of(m)} {tuple(m['data_shape'])}" for c, m in found)
        raise EvalError(f"the checkpoints were trained on different data ({listing}): sweep one dataset at a time")
    if found[0][1]["data_kind"] == "vector":
        raise EvalError(f"these checkpoints make vectors: {command} is for images (for the gmm preset use "
                        f"'python -m stmd_fast.evaluate {GMM_COUNTERPARTS[command]}')")
    return found


def ema_used(meta: dict, ema: float | None) -> float:
    """The decay of the EMA weights a checkpoint is sampled with: --ema, or the run's --ema-decay."""
    return meta["config"]["ema_decay"] if ema is None else ema


def image_shape(meta: dict) -> tuple[int, ...]:
    """The shape of the images a checkpoint makes (a latent model's after VAE decoding)."""
    if meta["data_kind"] == "latent":
        return (3, meta["latent"]["resolution"], meta["latent"]["resolution"])
    return tuple(meta["data_shape"])


def reference_split(args) -> str:
    """A preset's split to score against: --reference-split, test when not given (its default is None so that
    check_reference can tell a given one on a --data run, where it would be ignored)."""
    return args.reference_split or "test"


FILE_PRESETS = ("mnist", "cifar10")
"""The presets whose images are files under --data-dir (digits ships with scikit-learn, gmm is a formula)."""


def check_data_dir(preset: str | None, args) -> None:
    """Refuse --data-dir where no files are read from it: a preset without files, or a run on --data (preset None)."""
    if args.data_dir is not None and preset not in FILE_PRESETS:
        what = f"the {preset} preset reads no files" if preset else "these checkpoints were trained on --data"
        raise EvalError(f"--data-dir is where the {' and '.join(FILE_PRESETS)} files are; {what}: drop --data-dir")


def check_reference(meta: dict, args) -> None:
    """--reference is the held-out set of a --data run, --reference-split a preset's (default test): refuse
    either where it would be ignored, and a missing or single-image --reference, before any work."""
    check_data_dir(meta["config"]["preset"] if meta["config"]["data"] is None else None, args)
    if meta["config"]["data"] is not None and args.reference_split is not None:
        raise EvalError("--reference-split picks a preset's split; these checkpoints were trained on --data and are "
                        "scored against --reference: drop --reference-split")
    if meta["config"]["data"] is None:
        if args.reference:
            raise EvalError(f"--reference is for checkpoints trained on --data; these were trained on the "
                            f"{meta['config']['preset']} preset, scored against its {reference_split(args)} split "
                            f"(--reference-split train|test): drop --reference")
        return
    if not args.reference:
        raise EvalError("these checkpoints were trained on --data (a .npy, an image folder or latent shards): give "
                        "--reference FILE.npy or DIR (held-out real images; decoded size for latents)")
    from .data.images import IMAGE_SUFFIXES

    path = Path(args.reference)
    if not path.exists():
        raise EvalError(f"--reference {path}: no such file or folder; give a .npy of held-out real images or a "
                        "folder of them")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        raise EvalError(f"--reference {path}: one image; pass the folder that holds the held-out images: "
                        f"--reference {path.parent}")


def uses_fd(meta: dict, args) -> bool:
    """FD on the classifier's features (digits, mnist, or --metric fd), else Inception FID."""
    return args.metric == "fd" or (args.metric == "auto" and dataset_of(meta) in FD_PRESETS)


def check_scoring(meta: dict, args) -> None:
    """The scoring flags, before any work: the reference (check_reference), and neither metric's own flag where
    the other metric is used and it would be ignored."""
    check_reference(meta, args)
    if uses_fd(meta, args) and args.inception_weights:
        raise EvalError(f"--inception-weights is for FID; {dataset_of(meta)} is scored by FD on the classifier's "
                        "features: drop --inception-weights (or pass --metric fid)")
    if not uses_fd(meta, args) and args.classifier:
        raise EvalError(f"--classifier is the feature network of FD; {dataset_of(meta)} is scored by Inception FID "
                        "here: drop --classifier")
    # not there: said now, not after the reference images and the metric's imports (half a minute)
    if args.inception_weights and not Path(args.inception_weights).expanduser().is_file():
        raise EvalError(f"--inception-weights {args.inception_weights}: no such file; give the path of the "
                        f"downloaded Inception weights")
    if args.classifier and not Path(args.classifier).expanduser().is_dir():
        raise EvalError(f"--classifier {args.classifier}: no such folder; give the folder python -m "
                        f"stmd_fast.evaluate train-classifier wrote")


def reference_name(meta: dict, args) -> str:
    """What the FD's reference set is, for the results: a preset's split, or the --reference path."""
    if meta["config"]["data"] is None:
        return f"{meta['config']['preset']} {reference_split(args)} split"
    return str(args.reference)


def reference_images(meta: dict, args) -> tuple[torch.Tensor, str]:
    """The real images to compare with, in model space, and a name for the stats cache."""
    check_reference(meta, args)
    if meta["config"]["data"] is not None:
        from .data.datasets import DataError, load_npy
        from .data.images import load_image_folder

        try:
            ref = (load_image_folder(args.reference, image_shape(meta)[-1], size_from="the checkpoints' image size")
                   if Path(args.reference).is_dir()
                   else load_npy(args.reference))
        except DataError as err:
            raise EvalError(f"--reference: {err}") from None
        name = f"npy-{Path(args.reference).stem}"
    else:
        preset = meta["config"]["preset"]
        ref = load_split(preset, reference_split(args), args.data_dir, meta=meta)
        name = f"{preset}-{reference_split(args)}"
    if tuple(ref.shape) != image_shape(meta):
        raise EvalError(f"reference images have shape {tuple(ref.shape)}, the checkpoints make {image_shape(meta)}")
    return ref.all(), name


def build_metric(meta: dict, args, device):
    """FD on the classifier's features for digits/mnist (or --metric fd), Inception FID otherwise."""
    from .metrics import FrechetDistance

    dataset = dataset_of(meta)
    if not uses_fd(meta, args):
        try:
            return FrechetDistance(None, inception_weights=args.inception_weights, device=device,
                                   batch_size=args.batch_size)
        except (RuntimeError, FileNotFoundError) as err:  # offline without weights, or a missing weights file
            raise EvalError(str(err).splitlines()[0]) from None
    if dataset not in FD_PRESETS:  # our FD classifier learns the digits' labels: no labels, no classifier
        raise EvalError(f"--metric fd reads the features of a digit classifier, trained for {' and '.join(FD_PRESETS)} "
                        f"only (evaluate train-classifier --preset NAME); for {dataset} use --metric fid (Inception "
                        f"FID; offline, with --inception-weights FILE)")
    from .classifier import REFERENCE_CLASSIFIERS, default_classifier, load_classifier, train_hint

    path = args.classifier or default_classifier(dataset)
    data_dir = (getattr(args, "data_dir", None) or meta["config"].get("data_dir")) if dataset in FILE_PRESETS else None
    try:
        classifier, cmeta = load_classifier(path, device=device, hint=train_hint(dataset, data_dir, out=path))
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from None
    if cmeta.get("dataset") != dataset or tuple(cmeta["data_shape"]) != tuple(meta["data_shape"]):
        fix = train_hint(dataset, data_dir)  # into runs/classifier-DATASET, read without --classifier
        if args.classifier is not None:
            fix = f"drop --classifier to read {default_classifier(dataset)}" + (
                "" if dataset in REFERENCE_CLASSIFIERS else f" ({fix}, if it is missing)")
        raise EvalError(f"the classifier in {path} was trained on {cmeta.get('dataset')} {tuple(cmeta['data_shape'])}, "
                        f"the checkpoints on {dataset} {tuple(meta['data_shape'])}: {fix}")
    return FrechetDistance(classifier, device=device, batch_size=args.batch_size)


def prepare_metric(meta: dict, args, device):
    """The metric with its reference statistics set (computed once, then read from the cache),
    and the reference images themselves."""
    images, name = reference_images(meta, args)
    metric = build_metric(meta, args, device)
    cache = writable_dir(args.cache_dir, "--cache-dir") / f"{name}-{metric.name}.safetensors"
    metric.set_reference(images, cache=cache)
    return metric, images


def warn_small_fd(metric, samples: int, source: str, reference: int) -> None:
    """FD/FID fits a Gaussian to the features: with fewer images than feature dimensions its covariance is
    singular and the value says more about the sample size than the samples. Warned, not refused (tests and
    smoke runs use a few)."""
    dims = metric.classifier.num_features if metric.classifier is not None else INCEPTION_FEATURES
    if samples < dims:
        print(f"warning: {metric.name} of {samples} samples ({source}) is not meaningful: fewer than its {dims} "
              f"feature dimensions make their covariance singular; use {dims} or more (thousands for stable values)",
              file=sys.stderr)
    if reference < dims:
        print(f"warning: {metric.name} against {reference} reference images is not meaningful: fewer than its {dims} "
              "feature dimensions make their covariance singular; give a larger reference set", file=sys.stderr)


def held_out(images: torch.Tensor, args, reference: str) -> torch.Tensor:
    """The first --images reference images, saying so when there are fewer (all of them are used)."""
    if args.images > len(images):
        print(f"note: --images {args.images}: the {reference} holds {len(images)} images; using all {len(images)}",
              file=sys.stderr)
    return images[: args.images]


def grid_png(tiles: list[torch.Tensor], rows: int, zoom: int) -> bytes:
    """The PNG of a grid of `rows` rows of images in [-1, 1], each pixel enlarged zoom times (nearest)."""
    from torchvision.utils import save_image

    from .data.datasets import viewable

    tiles = torch.nn.functional.interpolate(torch.stack(tiles), scale_factor=zoom, mode="nearest")
    buffer = io.BytesIO()
    save_image(viewable(tiles), buffer, format="png", nrow=len(tiles) // rows, padding=1)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- sweep

# Each method's settings flag in a sweep: (its argparse name, the flag, its default, what its values set)
SETTINGS_FLAGS = {"stmd": ("stmd", "--stmd", DEFAULT_STMD, "N and M"),
                  "meanflow": ("meanflow_steps", "--meanflow-steps", DEFAULT_MEANFLOW, "M"),
                  "ddpm": ("ddpm_steps", "--ddpm-steps", DEFAULT_DDPM, "N")}


def parse_settings(args, methods=tuple(SETTINGS_FLAGS)) -> dict[str, list[tuple[int, int]]]:
    """(N, M) settings per method from the --stmd / --meanflow-steps / --ddpm-steps lists (default None, so that
    one given for a method none of the checkpoints has, where it would be ignored, is refused)."""
    text = {}
    for method, (name, flag, default, _) in SETTINGS_FLAGS.items():
        given = getattr(args, name)
        if given is not None and method not in methods:
            raise EvalError(f"{flag} sets {METHODS[method].label} settings and no checkpoint here is a "
                            f"{METHODS[method].label} run: drop {flag}")
        text[method] = default if given is None else given
    try:
        stmd = [tuple(int(v) for v in item.split("x")) for item in text["stmd"].split(",")]
        if any(len(nm) != 2 for nm in stmd):  # "2" or "2x2x2": not N x M
            raise ValueError
        meanflow = [(1, int(m)) for m in text["meanflow"].split(",")]
        ddpm = [(int(n), 1) for n in text["ddpm"].split(",")]
    except ValueError:
        raise EvalError("settings must look like --stmd 1x1,2x1,1x2 (NxM), --meanflow-steps 1,2,4 and --ddpm-steps "
                        "1,2,50 (integers)") from None
    settings = {"stmd": stmd, "meanflow": meanflow, "ddpm": ddpm}
    for method, items in settings.items():
        if len(set(items)) != len(items):  # each would be sampled and tabled twice
            raise EvalError(f"{SETTINGS_FLAGS[method][1]} {text[method]} names a setting twice: give distinct ones")
        for n, m in items:
            if n < 1 or m < 1:  # named here by the sweep's own flag (check_steps speaks of --steps / --flow-steps)
                _, flag, _, what = SETTINGS_FLAGS[method]
                raise EvalError(f"{flag} {text[method]}: {what} must be at least 1")
            try:
                check_steps(method, n, m)
            except ValueError as err:
                raise EvalError(f"{method} setting N={n}, M={m}: {err}") from None
    return settings


def line_label(method: str, flow_steps: int, name: str, several: bool) -> str:
    label = f"{method} M={flow_steps}" if METHODS[method].conditional else method
    return f"{label} ({name})" if several else label


def checkpoint_names(found: list[tuple[Path, dict]]) -> list[str]:
    """A distinct name per checkpoint for the table and the plot's lines: its run's, with @step where two share
    a run name (two steps of one run), its path where even that is shared."""
    runs = []
    for ckpt, _ in found:
        ckpt = ckpt.resolve()
        runs.append(ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name)
    names = [f"{run}@{meta.get('step')}" if runs.count(run) > 1 else run for run, (_, meta) in zip(runs, found)]
    return [str(ckpt) if names.count(name) > 1 else name for name, (ckpt, _) in zip(names, found)]


def sweep(args) -> int:
    from .metrics import NonFiniteImages

    found = checkpoint_metas(args.checkpoints, "sweep", args.ema)
    check_scoring(found[0][1], args)
    methods = [m["config"]["method"] for _, m in found]
    settings = parse_settings(args, methods)
    if args.grid is not None and not any(METHODS[m].diffusion for m in methods):
        raise EvalError("--grid is the diffusion time grid of STMD and DDPM; Mean Flow samples at s = 1 only: "
                        "drop --grid")
    check_vae(found, args.vae)
    plot = plots_available(f"{'fd' if uses_fd(found[0][1], args) else 'fid'}_vs_nfe.png")
    out = writable_dir(args.out)
    device = resolve_device(args.device)
    metric, images = prepare_metric(found[0][1], args, device)
    from .metrics import SCORING_VERSION

    scored = {"metric": metric.name, "scoring": SCORING_VERSION, "features": metric.extractor_id, "num": args.num,
              "reference": reference_name(found[0][1], args), "reference_images": len(images),
              "reference_sha256": metric.reference_sha256}  # the same file with other images: measured again
    warn_small_fd(metric, args.num, "--num", len(images))
    floor = real_data_floor(found[0][1], metric, args)
    plan = []  # (checkpoint, meta, label, N, M, what identifies the result: a row measured before is reused)
    for (ckpt, meta), name in zip(found, checkpoint_names(found)):
        method = meta["config"]["method"]
        several = methods.count(method) > 1
        for n, m in settings[method]:
            key = {"checkpoint_sha256": checkpoint_digest(ckpt, meta), "method": method, "N": n, "M": m,
                   "num": args.num, "seed": args.seed, "grid": args.grid or meta["config"].get("sample_grid", "uniform"),
                   "ema": ema_used(meta, args.ema), "batch_size": args.batch_size, "device": device.type}
            plan.append((ckpt, meta, line_label(method, m, name, several), n, m, key))
    before = measured_before(out, scored)
    keep_earlier = True  # copied aside at the first write: a sweep stopped before it changed nothing
    reused = sum(setting_id(key) in before for *_, key in plan)
    if reused:
        print(f"reusing {reused} of {len(plan)} settings already measured in {out / 'results.json'} (same "
              f"checkpoint, seed, --num, --batch-size, EMA, device type and reference); delete it to measure them "
              f"again")
    rows, model, loaded, seconds, calls = [], None, None, [], 0  # calls: network evaluations (NFE) timed
    record = {"provenance": provenance(args, device), "dataset": dataset_of(found[0][1]), **scored,
              "real_train_images": floor}
    try:
        for i, (ckpt, meta, label, n, m, key) in enumerate(tqdm(plan, desc="sweep", disable=None), 1):
            row = before.get(setting_id(key))
            measured = row is None
            if measured:
                if loaded != ckpt:
                    model, loaded = load_for_sweep(ckpt, device, args.ema, args.vae), ckpt
                t0 = time.perf_counter()
                generator = torch.Generator(model.device).manual_seed(args.seed)  # same seed, same samples
                x = model.sample(args.num, n, m, generator, key["grid"], batch_size=args.batch_size).float()
                if model.data_kind == "latent":
                    x = model.decode(x, args.batch_size)  # FID is on the decoded images
                sample_s = time.perf_counter() - t0
                try:
                    value = metric.score(x)
                except NonFiniteImages as err:  # this setting diverged: recorded as NaN, the others still measured
                    tqdm.write(f"note: {label} N={n} M={m}: {metric.name} not measured: {err}")
                    value = math.nan
                row = {"checkpoint": str(ckpt.absolute()), "step": meta.get("step"), **key,
                       "nfe": nfe(key["method"], n, m),
                       "metric": metric.name, "value": value, "sample_s": sample_s}
                seconds.append(time.perf_counter() - t0)
                calls += row["nfe"]
            # labels depend on which checkpoints this sweep compares; the path is where the checkpoint is now
            rows.append({**row, "checkpoint": str(ckpt.absolute()), "label": label})
            # a setting's time goes with its NFE (DDPM's N = 100 takes 100 times its N = 1)
            left = sum(nfe(k["method"], k["N"], k["M"]) for *_, k in plan[i:] if setting_id(k) not in before)
            timing = (f"{seconds[-1]:.0f} s, about {clock(sum(seconds) / calls * left)} left" if measured else
                      "measured before")
            tqdm.write(f"[{i}/{len(plan)}] {label}: N={n} M={m} NFE {row['nfe']}: {metric.name} {row['value']:.3f} "
                       f"({timing})")
            if keep_earlier:
                keep_replaced_results(out, before, {setting_id(key) for *_, key in plan})
                keep_earlier = False
            write_results(out, rows, metric, record, len(plan), plot)
    except KeyboardInterrupt as err:
        if rows:
            print(f"interrupted after {len(rows)} of {len(plan)} settings: they are kept in {out / 'results.json'}; "
                  "the same command again measures the rest", file=sys.stderr)
            err.said = True  # main's plain "interrupted" would say it again
        raise
    return 0


def checkpoint_digest(ckpt: Path, meta: dict) -> str:
    """A checkpoint's identity: the SHA-256 of the sizes and SHA-256s of its files, which its config.json records
    (a run that went on training, or another run at the same path, has another); for a checkpoint written
    before checksums, of the files' bytes themselves."""
    record = meta.get("files")
    if record is None:
        record = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                  for path in sorted(Path(ckpt).iterdir()) if path.is_file() and path.name != "config.json"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


SETTING_KEYS = ("checkpoint_sha256", "method", "N", "M", "num", "seed", "grid", "ema", "batch_size", "device")
"""What a sweep's result is a function of (with the metric and the reference, shared by its rows)."""


def setting_id(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def measured_before(out: Path, scored: dict) -> dict[str, dict]:
    """{setting: row} of an earlier sweep into `out` scored on what this one is (metric, features, --num,
    reference), which the same command run again after an interruption does not measure twice."""
    try:
        before = json.loads((out / "results.json").read_text())
    except (FileNotFoundError, ValueError):  # written atomically: unreadable only if not ours
        return {}
    if not isinstance(before, dict) or any(before.get(k) != v for k, v in scored.items()):
        return {}
    return {setting_id({k: row[k] for k in SETTING_KEYS}): row for row in before.get("rows", [])
            if isinstance(row, dict) and all(k in row for k in SETTING_KEYS)}


def keep_replaced_results(out: Path, before: dict[str, dict], planned: set[str]) -> None:
    """A sweep rewrites results.json with its own settings: an earlier sweep's rows it would not carry over (other
    checkpoints or settings; any, when scored on another --num or reference) are first copied aside, and said."""
    path = out / "results.json"
    try:
        earlier = json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError):  # none, or not a sweep's
        return
    dropped = len(earlier) - sum(setting_id in planned for setting_id in before)
    if dropped > 0:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        kept = out / f"results.replaced-{stamp}.json"
        write_atomic(kept, path.read_bytes())  # copied: results.json keeps the rows carried over until rewritten
        moved = []
        for name in ("results.md", "fd_vs_nfe.png", "fid_vs_nfe.png"):  # moved: none stays beside the new rows
            if (out / name).is_file():
                moved.append(name.replace(".", f".replaced-{stamp}.", 1))
                os.replace(out / name, out / moved[-1])
        print(f"note: {path} holds {dropped} result(s) of an earlier sweep that this one does not measure (another "
              f"checkpoint, N x M, --seed, --grid, --ema, --batch-size or device; all, with another --num, metric or "
              f"reference): it is copied to {kept.name} before being rewritten"
              + (f" ({', '.join(moved)}: its table and plot, moved)" if moved else "")
              + "; use another --out to keep sweeps apart", file=sys.stderr)


def check_vae(found: list[tuple[Path, dict]], vae: str | None) -> None:
    """--vae only for latent checkpoints; their VAE folder (--vae, or the one each run recorded) there before the
    reference statistics and any sampling, not found missing at the first checkpoint's turn."""
    from .data.datasets import DataError
    from .data.vae import check_vae_path

    if found[0][1]["data_kind"] != "latent":
        if vae is not None:
            raise EvalError("--vae is the VAE of checkpoints trained on latents; these make images: drop --vae")
        return
    try:
        for _, meta in found:
            check_vae_path(vae or meta["latent"]["vae"], "if it moved, pass its new place with --vae DIR")
    except DataError as err:
        raise EvalError(str(err)) from None


def load_for_sweep(ckpt: Path, device, ema: float | None, vae: str | None = None) -> Model:
    """The checkpoint at its turn; one gone since the sweep checked it (a run still training rotates its
    checkpoints away) is an EvalError that says the settings measured so far are kept."""
    try:
        model = load_checkpoint(ckpt, device=device, ema=ema)
    except NonFiniteState as err:  # intact bytes of a diverged run: nothing to do with a rotation
        raise EvalError(f"{err}; sweep without {ckpt}: the settings measured so far are kept") from None
    except (CheckpointError, FileNotFoundError) as err:
        raise EvalError(f"{err}. It was whole when the sweep began: is its run still training and deleting old "
                        f"checkpoints (--keep-checkpoints)? Copy the checkpoint aside and sweep the copy; the "
                        f"settings measured so far are kept") from None
    if model.data_kind == "latent":
        model.load_vae(vae)  # before sampling: an unreachable VAE fails now
    return model


def real_data_floor(meta: dict, metric, args) -> float | None:
    """The metric of real training images against the reference: what a perfect sampler
    would score with this many reference images (FD has a sample-size floor)."""
    if meta["config"]["data"] is not None or reference_split(args) != "test":
        return None
    train = load_split(meta["config"]["preset"], "train", args.data_dir, meta=meta)
    train.values = train.values[: args.num]  # before the float conversion: CIFAR-10 is 600 MB as float
    return metric.score(train.all())


def features_line(metric) -> str:
    """Which network's features a table's FD / FID is on: its values compare only with a table on the same."""
    network, digest = metric.extractor_id.split(":")
    return (f"\n{metric.name} on the features of the {network} {digest[:12]} (sha256 of its weights, in full in the "
            f".json): values compare only between tables on the same features")


def provenance(args, device: torch.device | None = None) -> dict:
    return cli_provenance("evaluate", args.argv, device)


def made_by(record: dict) -> str:
    """The line of a .md that says how its numbers were made."""
    made = record["provenance"]
    where = f", {made['device']}" if "device" in made else ""
    return f"\nMade by `{made['command']}` (stmd_fast {made['stmd_fast']}, torch {made['torch']}{where}, {made['utc']})"


def checkpoints_line(checkpoints: dict[str, tuple[str, int | None]]) -> str:
    """The line of a .md that names each run's checkpoint and its step: label -> (path, step)."""
    return "\nCheckpoints: " + "; ".join(f"{name}: {path} (step {step})" for name, (path, step) in checkpoints.items())


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_md(path: Path, lines: list[str]) -> None:
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))  # paths need not be UTF-8


def made_from(result: dict) -> tuple[str, list[str]]:
    """The command line and every checkpoint (its path names the step) a result was made from."""
    checkpoints = []

    def absolute(item):  # results of versions that kept the path as given: the same checkpoint as this one's
        return os.path.abspath(item) if isinstance(item, str) else {k: absolute(v) for k, v in item.items()}

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("checkpoint", "checkpoints"):
                    checkpoints.append(json.dumps(absolute(item), sort_keys=True))
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(result)
    return result["provenance"]["command"], sorted(checkpoints)


def keep_earlier_result(out: Path, stem: str, result: dict, files: list[str]) -> None:
    """The files of an earlier result in `out` (stem.json and `files`, names in out) that `result`'s would
    overwrite, made by another command line (another sampler, sigma_y, N, ...) or from other checkpoints (its
    run trained on), moved to NAME.replaced-TIME.SUFFIX first, and said, as a sweep keeps results.json: none
    stays beside the new result (a heat map of a run the new one leaves out did), and a kill while the new files
    are written leaves no mix of the two. The same command on the same checkpoints again (a rerun) replaces its
    own result."""
    try:
        if made_from(json.loads((out / f"{stem}.json").read_text())) == made_from(result):
            return
    except (OSError, ValueError, KeyError, TypeError):  # none, or not ours
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = []
    for name in [f"{stem}.json", *files]:
        path = out / name
        if path.is_file():
            kept.append(path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}"))
            os.replace(path, kept[-1])
    fsync_path(out)
    print(f"note: {out / stem}.json holds the result of another command or checkpoint: it is moved, with "
          f"{len(kept) - 1} file(s) of its own, to {kept[0].name} before being rewritten; use another --out to keep "
          f"results apart", file=sys.stderr)


def write_results(out: Path, rows: list[dict], metric, record: dict, settings: int, plot: bool = True) -> None:
    """results.json and results.md of the rows so far of `settings` (rewritten after each, atomically), and once
    all are in, with plot, the plot; record: how and on what the values were computed (provenance, num,
    reference, the floor), written with them."""
    complete = len(rows) == settings
    write_json(out / "results.json", {**record, "complete": complete, "rows": rows})
    lines = [f"| method | N | M | NFE | {metric.name} |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["label"], r["nfe"], r["N"])):
        lines.append(f"| {r['label']} | {r['N']} | {r['M']} | {r['nfe']} | {r['value']:.3f} |")
    if not complete:
        lines.append(f"\n**Incomplete**: {len(rows)} of {settings} settings (still running, or interrupted: the same "
                     f"command again measures the rest)")
    grids = sorted({r["grid"] for r in rows if r["method"] != "meanflow"})
    if grids:
        lines.append(f"\nDiffusion time grid of STMD and DDPM: {', '.join(grids)}")
    decays = ", ".join(map(str, sorted({r["ema"] for r in rows})))
    lines.append(f"\n{metric.name} of {record['num']} samples per setting (EMA weights, decay {decays}; seed "
                 f"{rows[0]['seed']}, batch size {rows[0]['batch_size']}) against the {record['reference']} "
                 f"({record['reference_images']} images)")
    checkpoints = sorted({(r["checkpoint"], r["step"]) for r in rows})
    lines.append("\nCheckpoints: " + "; ".join(f"{path} (step {step})" for path, step in checkpoints))
    if record["real_train_images"] is not None:
        lines.append(f"\nReal training images against the same reference (the floor): {metric.name} "
                     f"{record['real_train_images']:.3f}")
    lines.append(features_line(metric))
    lines.append(made_by(record))
    write_md(out / "results.md", lines)
    if not complete:
        return
    written = ["results.json", "results.md"]
    if plot:
        from .plots import plot_metric_vs_nfe

        written.append(f"{metric.name.lower()}_vs_nfe.png")
        plot_metric_vs_nfe(rows, out / written[-1], metric=metric.name)
    print(f"wrote {out}/{', '.join(written)}")


# ----------------------------------------------------------------------------- kernel (gmm)

GMM_DEVICE = torch.device("cpu")  # where kernel and posterior load the gmm runs: 2-D points, no GPU work to speak of


def gmm_models(paths: list[str], exact: str) -> dict[str, tuple[Path, Model]]:
    """label -> (checkpoint, model) of the gmm-preset runs `paths` (loaded on the CPU), each checkpoint given
    once, labelled as sweep labels its checkpoints (checkpoint_names); exact: what the command compares them
    with, named when a run is not a gmm one."""
    from .gmm import check_gmm_model

    found = find_checkpoints(paths)
    models = {}
    for (ckpt, _), name in zip(found, checkpoint_names(found)):
        model = load_checkpoint(ckpt, GMM_DEVICE)
        check_gmm_model(model, ckpt, exact)
        models[name] = ckpt, model
    return models


def check_flow_steps_used(args, methods: list[str]) -> None:
    """--flow-steps sets M of the flow methods: refused when no run has one (DDPM: M = 1), where it is ignored."""
    if args.flow_steps is not None and not any(METHODS[m].flow for m in methods):
        raise EvalError(f"--flow-steps {args.flow_steps}: DDPM makes x0_hat in one network call (M = 1) and no run "
                        "here is STMD or Mean Flow: drop --flow-steps")


def kernel(args) -> int:
    from .gmm import default_kernel_pairs, default_mixture, kernel_grid

    models = gmm_models(args.runs, "transition kernel")
    for ckpt, model in models.values():  # the kernel is p(x_s_to | x_s_from): a transition between diffusion times
        if not METHODS[model.method].diffusion:
            raise EvalError(f"{ckpt} is a {METHODS[model.method].label} run: it samples from noise at s = 1 only and "
                            f"has no transition from x_s to compare with the exact kernel (give STMD or DDPM runs)")
    check_flow_steps_used(args, [model.method for _, model in models.values()])
    flow_steps = parse_ints("1,2" if args.flow_steps is None else args.flow_steps, "--flow-steps")
    plot = plots_available("the heat maps kernel_*.png")
    out = writable_dir(args.out)
    report, heat_maps = {}, []  # by run; (run, rows, M) of each heat map
    for name, (ckpt, model) in models.items():
        fs = flow_steps if METHODS[model.method].flow else [1]
        rows = kernel_grid(model, default_mixture(), default_kernel_pairs(), fs, args.points, args.num, args.seed)
        report[name] = {"checkpoint": str(ckpt.absolute()), "step": model.meta.get("step"), "method": model.method,
                        "rows": rows}
        heat_maps += [(name, rows, m) for m in fs]
    record = {"provenance": provenance(args, GMM_DEVICE), "seed": args.seed, "points": args.points, "num": args.num,
              "flow_steps": flow_steps}
    keep_earlier_result(out, "kernel", {**record, "runs": report},
                        ["kernel.md", *sorted(path.name for path in out.glob("kernel_*_M*.png")
                                              if ".replaced-" not in path.name)])
    lines = ["| run | method | s_from | s_to | M | energy (model) | energy (exact-mean bridge) | energy floor "
             "| SW2 (model) | SW2 (exact-mean bridge) | SW2 floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report.items():
        for r in entry["rows"]:
            lines.append(f"| {name} | {entry['method']} | {r['s_from']} | {r['s_to']} | {r['flow_steps']} | "
                         f"{r['energy_model']:.4f} | {r['energy_mean_bridge']:.4f} | {r['energy_floor']:.1e} | "
                         f"{r['sw2_model']:.4f} | {r['sw2_mean_bridge']:.4f} | {r['sw2_floor']:.4f} |")
    lines.append(f"\n{args.points} conditioning states per (s_from, s_to), {args.num} draws each, seed {args.seed}")
    lines.append(checkpoints_line({name: (entry["checkpoint"], entry["step"]) for name, entry in report.items()}))
    lines.append(made_by(record))
    write_md(out / "kernel.md", lines)
    # drawn once every run is measured, after their table; the .json, last, says the result is whole (a kill
    # before it leaves none: the same command again rewrites the rest)
    for name, rows, m in heat_maps if plot else ():
        from .plots import plot_kernel_heatmap

        safe = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).strip("_")  # a label can be a path: not in a file name
        plot_kernel_heatmap(rows, out / f"kernel_{safe}_M{m}.png", flow_steps=m)
    write_json(out / "kernel.json", {**record, "runs": report})
    print(f"wrote {out}/kernel.json, kernel.md{' and heat maps' if plot else ''}")
    return 0


# ----------------------------------------------------------------------------- conditional (per diffusion time)

def parse_times(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"--s takes comma-separated diffusion times in (0, 1], e.g. 0.25,1; got {text}") from None
    if not all(0 < v <= 1 for v in values) or len(set(values)) != len(values):
        raise EvalError(f"--s takes distinct diffusion times in (0, 1], got {text}")
    return values


def conditional(args) -> int:
    """FD of the draws x0_hat of p(x_0 | x_s) at each s, x_s diffused from real training images (STMD: M flow
    steps; DDPM: its posterior mean). A chain's step at s makes such a draw from its own x_s, so a step whose
    draws score far above the floor limits every chain through it."""
    (ckpt, meta), = checkpoint_metas([args.checkpoint], "conditional", args.ema)
    method = METHODS[meta["config"]["method"]]
    if not method.diffusion:
        raise EvalError(f"{ckpt} is a {method.label} run: it has no diffusion time s to condition on (give an STMD or "
                        "DDPM run)")
    if meta["data_kind"] != "image" or meta["config"]["data"] is not None:
        raise EvalError("conditional diffuses the training split of an image preset (digits, mnist, cifar10); this "
                        f"run was trained on {dataset_of(meta)} ({meta['data_kind']}s)")
    check_scoring(meta, args)
    check_flow_steps_used(args, [method.name])
    flow_steps = [1]
    if method.flow:
        flow_steps = parse_ints("1,2,4" if args.flow_steps is None else args.flow_steps, "--flow-steps")
    grid = meta["config"].get("sample_grid", "uniform")
    times = parse_times(args.s) if args.s else [s for s in time_grid(4, grid).tolist() if s > 0]
    model = load_checkpoint(ckpt, device=resolve_device(args.device), ema=args.ema)
    out = writable_dir(args.out)
    metric, images = prepare_metric(meta, args, model.device)
    warn_small_fd(metric, args.num, "--num", len(images))
    train = load_split(meta["config"]["preset"], "train", args.data_dir, meta=meta)
    generator = torch.Generator(model.device).manual_seed(args.seed)
    x0 = train.batch(args.num, generator)  # drawn with replacement: repeats when num > len(train)
    floor = metric.score(x0)  # the same images undisturbed: what a perfect posterior sampler scores
    rows = []
    for s in tqdm(times, desc="diffusion times", disable=None):
        alpha, sigma = (float(v) for v in alpha_sigma(torch.tensor(s, dtype=torch.float64), torch.float64))
        x_s = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, device=model.device)
        for m in flow_steps:
            x0_hat = torch.cat([model.transition(chunk, s, 0.0, m, generator)
                                for chunk in x_s.split(args.batch_size)])
            rows.append({"s": s, "alpha": alpha, "M": m, "metric": metric.name, "value": metric.score(x0_hat)})
            tqdm.write(f"s {s:g} (alpha {alpha:.3f}) M={m}: {metric.name} {rows[-1]['value']:.3f}")
    summary = {"provenance": provenance(args, model.device), "checkpoint": str(ckpt.absolute()),
               "step": meta.get("step"),
               "method": method.name, "dataset": dataset_of(meta), "metric": metric.name,
               "features": metric.extractor_id, "num": args.num, "seed": args.seed, "batch_size": args.batch_size,
               "ema": ema_used(meta, args.ema), "reference": reference_name(meta, args), "reference_images": len(images),
               "source_images": floor,
               "rows": rows}
    keep_earlier_result(out, "conditional", summary, ["conditional.md"])
    lines = [f"| s | alpha_s | M | {metric.name} |", "|---|---|---|---|"]
    lines += [f"| {r['s']:g} | {r['alpha']:.3f} | {r['M']} | {r['value']:.3f} |" for r in rows]
    lines.append(f"\nThe source training images themselves against the same reference (the floor): {metric.name} "
                 f"{floor:.3f}")
    lines.append(f"\n{args.num} draws per (s, M) from {ckpt} (step {meta.get('step')}), seed {args.seed}, batch size "
                 f"{args.batch_size}")
    lines.append(features_line(metric))
    lines.append(made_by(summary))
    write_md(out / "conditional.md", lines)
    write_json(out / "conditional.json", summary)  # last: a .json says its result is whole
    print(f"wrote {out}/conditional.json, conditional.md")
    return 0


# ----------------------------------------------------------------------------- posterior (gmm)

POSTERIOR_MATRIX = [[1.0, 0.0]]  # observe the first coordinate: posteriors with two modes on the 8-circle


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"{flag} takes comma-separated integers, e.g. 1,2,4") from None
    if min(values) < 1 or len(set(values)) != len(values):
        raise EvalError(f"{flag} takes distinct integers >= 1, got {text}")
    return values


def posterior(args) -> int:
    from .gmm import default_mixture, posterior_grid

    steps, particles = parse_ints(args.steps, "--steps"), parse_ints(args.particles, "--particles")
    from .operators import MAX_SIGMA_Y, check_sigma_y

    if not 0 < args.sigma_y <= MAX_SIGMA_Y:
        raise EvalError(f"--sigma-y must be in (0, {MAX_SIGMA_Y:g}] (the exact posterior of a noiseless y has no "
                        f"density), got {args.sigma_y}")
    try:
        check_sigma_y(args.sigma_y, "--sigma-y")  # the smallest the likelihood's float64 takes
    except ValueError as err:
        raise EvalError(str(err)) from None
    if args.runs < 2 or args.observations < 1:
        raise EvalError("need --runs >= 2 (energy distance is a U-statistic) and --observations >= 1")
    found = gmm_models(args.runs_dirs, "posterior p(x_0 | y)")
    models = {name: model for name, (_, model) in found.items()}
    check_flow_steps_used(args, [model.method for model in models.values()])
    flow_steps = 1 if args.flow_steps is None else args.flow_steps
    for run, model in models.items():
        if not METHODS[model.method].diffusion and 1 not in steps:
            raise EvalError(f"{run} is a Mean Flow run: it has no diffusion steps and is measured at N = 1 only; "
                            f"add 1 to --steps")
        for n in steps if METHODS[model.method].diffusion else [1]:  # Mean Flow: N = 1 only, "-" in other rows
            check_steps(model.method, n, flow_steps if METHODS[model.method].flow else 1)
    grids = {model.grid for model in models.values() if METHODS[model.method].diffusion}  # Mean Flow: no grid
    if args.grid is None and len(grids) > 1:
        raise EvalError(f"these runs sample on different grids ({', '.join(sorted(grids))}): one table compares "
                        f"them on one, pass --grid")
    grid = args.grid or (grids.pop() if grids else "uniform")
    out = writable_dir(args.out)
    rows = posterior_grid(models, default_mixture(), POSTERIOR_MATRIX, args.sigma_y, steps, particles,
                          args.observations, args.runs, flow_steps, args.seed, grid=grid)
    result = {"provenance": provenance(args, GMM_DEVICE), "matrix": POSTERIOR_MATRIX, "sigma_y": args.sigma_y, "observations": args.observations,
              "runs": args.runs, "flow_steps": flow_steps, "grid": grid, "seed": args.seed,
              "checkpoints": {name: str(ckpt.absolute()) for name, (ckpt, _) in found.items()},
              "steps": {name: model.meta.get("step") for name, (_, model) in found.items()}, "rows": rows}
    keep_earlier_result(out, "posterior", result, ["posterior.md"])
    floor = next(r["energy"] for r in rows if r["sampler"] == "exact")
    lines = ["| run | method | N | " + " | ".join(f"SMC K = {k}" for k in particles) + " | DDNM+ |",
             "|---|---|---|" + "---|" * (len(particles) + 1)]
    for run, method in [("exact kernel", "exact")] + [(run, model.method) for run, model in models.items()]:
        for n in steps:
            cells = {r["K"]: r["energy"] for r in rows if r["model"] == run and r["N"] == n}
            lines.append(f"| {run} | {method} | {n} | " + " | ".join(f"{cells[k]:.4f}" if k in cells else "-"
                                                                    for k in particles)
                         + (f" | {cells[None]:.4f} |" if None in cells else " | - |"))
    lines.append(f"\nEnergy distance of the samples to the exact posterior's; exact vs exact (noise floor): "
                 f"{floor:.1e}")
    print("\n".join(lines))
    lines.append(f"\n{args.observations} measurements y, {args.runs} runs per y and cell, sigma_y {args.sigma_y}, "
                 f"the {grid} diffusion time grid, seed {args.seed}")
    lines.append(checkpoints_line({name: (result["checkpoints"][name], result["steps"][name]) for name in found}))
    lines.append(made_by(result))
    write_md(out / "posterior.md", lines)
    write_json(out / "posterior.json", result)  # last: a .json says its result is whole
    print(f"wrote {out}/posterior.json and posterior.md")
    return 0


# ----------------------------------------------------------------------------- inpainting

def make_mask(kind: str, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """1 = observed. center: a centred box of half the side is missing; pixels: each pixel
    observed with probability 1/2 (shared by the channels); half: the bottom half is missing."""
    c, h, w = shape
    mask = torch.ones(1, h, w)
    if kind == "center":
        mask[:, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    elif kind == "pixels":
        mask = (torch.rand(1, h, w, generator=generator) < 0.5).float()
    elif kind == "half":
        mask[:, h // 2:, :] = 0
    else:
        raise EvalError(f"unknown mask {kind!r}: use center, pixels or half")
    return mask.expand(c, h, w).clone()


def conditioned_steps(method: str, steps: int | None) -> int:
    """N of inpaint and inverse: as given, else CONDITIONED_STEPS for a diffusion chain (N = 1 would leave the
    observation out of every step that ends above s = 0) and 1 for Mean Flow, which has no diffusion steps."""
    if steps is not None:
        return steps
    return CONDITIONED_STEPS if METHODS[method].diffusion else 1


def inpaint(args) -> int:
    from .metrics import diversity, psnr
    from .operators import check_conditions

    (ckpt, meta), = checkpoint_metas([args.checkpoint], "inpaint", args.ema)
    check_scoring(meta, args)
    if meta["data_kind"] != "image":
        raise EvalError("inpaint evaluates pixel-space image models; this checkpoint makes latents "
                        "(a pixel mask does not carry over to latents)")
    args.steps = conditioned_steps(meta["config"]["method"], args.steps)
    try:  # a method that cannot take the observation is said before how many steps it would need
        if args.steps >= 1:
            check_conditions(meta["config"]["method"], args.steps, "the observation",
                             smc="evaluate inverse --operator inpaint --particles K --sigma-y S")
        check_steps(meta["config"]["method"], args.steps, args.flow_steps)
    except ValueError as err:
        raise EvalError(str(err)) from None
    if args.completions < 2:
        raise EvalError("--completions must be at least 2: diversity is the spread between completions")
    out = writable_dir(args.out)
    device = resolve_device(args.device)
    metric, reference = prepare_metric(meta, args, device)
    images = held_out(reference, args, reference_name(meta, args))
    warn_small_fd(metric, len(images) * args.completions, "--images x --completions", len(reference))
    model = load_checkpoint(ckpt, device=device, ema=args.ema)
    generator = torch.Generator(model.device).manual_seed(args.seed)
    mask_gen = torch.Generator().manual_seed(args.seed)
    masks, completions = [], []
    for truth in tqdm(images, desc=f"inpaint ({args.mask})", disable=None):
        mask = make_mask(args.mask, model.data_shape, mask_gen)
        x = model.inpaint(truth.to(device) * mask.to(device), mask, args.completions, args.steps, args.flow_steps,
                          generator, batch_size=args.batch_size)
        masks.append(mask)
        completions.append(x.float().cpu())
    completions = torch.stack(completions, 1)  # (K, B, C, H, W)
    masks = torch.stack(masks)  # (B, C, H, W)
    missing = (masks == 0).expand_as(completions)
    result = {
        "provenance": provenance(args, model.device), "checkpoint": str(ckpt.absolute()), "step": meta.get("step"),
        "method": model.method, "mask": args.mask, "N": args.steps, "M": args.flow_steps,
        "images": len(images), "completions": args.completions, "seed": args.seed, "ema": ema_used(meta, args.ema),
        "batch_size": args.batch_size, "metric": metric.name, "features": metric.extractor_id,
        "reference": reference_name(meta, args), "reference_images": len(reference),
        "fd": metric.score(completions.flatten(0, 1)),
        "psnr_db": psnr(completions, images.expand_as(completions)).mean().item(),  # all pixels: observed ones exact
        "psnr_missing_db": psnr(completions, images.expand_as(completions), where=missing).mean().item(),
        "diversity": diversity(completions[missing].reshape(args.completions, -1)),
    }
    shown = min(8, len(images))  # rows: observation (missing pixels black), completions, truth
    tiles = []
    for i in range(shown):
        observed = images[i] * masks[i] - (1 - masks[i])
        tiles += [observed, *completions[: min(6, args.completions), i], images[i]]
    png = grid_png(tiles, shown, args.zoom)
    keep_earlier_result(out, f"inpaint_{args.mask}", result, [f"inpaint_{args.mask}.png"])
    write_atomic(out / f"inpaint_{args.mask}.png", png)
    write_json(out / f"inpaint_{args.mask}.json", result)  # last: the .json never goes without its .png
    print(f"{model.method} inpainting ({args.mask}, N={args.steps}, M={args.flow_steps}): {metric.name} "
          f"{result['fd']:.3f}, PSNR {result['psnr_db']:.2f} dB ({result['psnr_missing_db']:.2f} dB on the missing "
          f"pixels), diversity {result['diversity']:.4f} -> {out}")
    return 0


# ----------------------------------------------------------------------------- inverse problems (images)

def inverse(args) -> int:
    from .metrics import diversity, psnr
    from .operators import check_conditions, check_sigma_y, make_operator

    (ckpt, meta), = checkpoint_metas([args.checkpoint], "inverse", args.ema)
    check_scoring(meta, args)
    if meta["data_kind"] != "image":
        raise EvalError("inverse evaluates pixel-space image models; this checkpoint makes latents")
    if args.mask is not None and args.operator != "inpaint":
        raise EvalError(f"--mask picks the missing pixels of --operator inpaint; --operator {args.operator} has "
                        "no mask: drop --mask")
    mask = (args.mask or "center") if args.operator == "inpaint" else None
    shape = tuple(meta["data_shape"])
    args.steps = conditioned_steps(meta["config"]["method"], args.steps)
    try:
        if args.particles is None and args.steps >= 1:  # a method that cannot take the observation: said first
            check_conditions(meta["config"]["method"], args.steps)
        check_steps(meta["config"]["method"], args.steps, args.flow_steps)
        make_operator(args.operator, make_mask(mask, shape, torch.Generator()) if mask else None).check(shape)
    except ValueError as err:
        raise EvalError(str(err)) from None
    if args.completions < 2:
        raise EvalError("--completions must be at least 2: diversity is the spread between completions")
    if args.particles is not None and not args.sigma_y > 0:
        raise EvalError("--particles (SMC) weights by the likelihood of a noisy y: give --sigma-y > 0")
    try:
        check_sigma_y(args.sigma_y, "--sigma-y")
    except ValueError as err:
        raise EvalError(str(err)) from None
    out = writable_dir(args.out)
    device = resolve_device(args.device)
    metric, reference = prepare_metric(meta, args, device)
    images = held_out(reference, args, reference_name(meta, args))
    warn_small_fd(metric, len(images) * args.completions, "--images x --completions", len(reference))
    mask_gen = torch.Generator().manual_seed(args.seed)  # one mask per image used, not per --images asked for
    operators = [make_operator(args.operator, make_mask(mask, shape, mask_gen) if mask else None) for _ in images]
    model = load_checkpoint(ckpt, device=device, ema=args.ema)
    generator = torch.Generator(model.device).manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    samples, residuals, observed = [], [], []
    for truth, op in tqdm(list(zip(images, operators)), desc=f"inverse ({args.operator})", disable=None):
        y = op.measure(truth[None].double(), args.sigma_y, noise_gen)[0].float()
        x = model.posterior_sample(y.to(device), op, args.sigma_y, args.particles, args.steps, args.flow_steps,
                                   args.completions, generator, batch_size=args.batch_size).float().cpu()
        samples.append(x)
        residuals.append(op.residual(x, y).flatten(1).norm(dim=1) / op.measurement_dim(shape) ** 0.5)
        observed.append(op.pinv(y[None])[0] if args.operator != "inpaint" else y * op.mask - (1 - op.mask))
    samples = torch.stack(samples, 1)  # (K, B, C, H, W)
    sampler = "ddnm" if args.sigma_y == 0 else ("ddnm+" if args.particles is None else f"smc K={args.particles}")
    result = {
        "provenance": provenance(args, model.device), "checkpoint": str(ckpt.absolute()), "step": meta.get("step"),
        "method": model.method, "operator": args.operator,
        "mask": mask, "sigma_y": args.sigma_y, "sampler": sampler,
        "N": args.steps, "M": args.flow_steps, "images": len(images), "completions": args.completions,
        "seed": args.seed, "batch_size": args.batch_size, "ema": ema_used(meta, args.ema), "metric": metric.name,
        "features": metric.extractor_id, "reference": reference_name(meta, args), "reference_images": len(reference),
        "fd": metric.score(samples.flatten(0, 1)),
        "psnr_db": psnr(samples, images.expand_as(samples)).mean().item(),
        "diversity": diversity(samples),
        "consistency_rms": torch.stack(residuals).mean().item(),
    }
    name = f"inverse_{args.operator}{'_' + mask if mask else ''}"
    shown = min(8, len(images))  # rows: what A^+ makes of y, completions, truth
    tiles = []
    for i in range(shown):
        tiles += [observed[i], *samples[: min(6, args.completions), i], images[i]]
    png = grid_png(tiles, shown, args.zoom)
    keep_earlier_result(out, name, result, [f"{name}.png"])
    write_atomic(out / f"{name}.png", png)
    write_json(out / f"{name}.json", result)  # last: the .json never goes without its .png
    print(f"{model.method} {args.operator} ({sampler}, sigma_y={args.sigma_y}, N={args.steps}, M={args.flow_steps}): "
          f"{metric.name} {result['fd']:.3f}, PSNR {result['psnr_db']:.2f} dB, diversity {result['diversity']:.4f}, "
          f"RMS ||A x - y|| {result['consistency_rms']:.2e} -> {out}")
    return 0


# ----------------------------------------------------------------------------- classifier

def train_classifier_cmd(args) -> int:
    from .classifier import META, REFERENCE_CLASSIFIERS, WEIGHTS, save_classifier, train_classifier

    if args.preset not in FD_PRESETS:
        raise EvalError(f"the FD classifier is for {', '.join(FD_PRESETS)}; cifar10 uses Inception FID")
    check_data_dir(args.preset, args)
    out = Path(args.out or f"runs/classifier-{args.preset}")
    ours = (WEIGHTS, META, EVALUATE_LOCK, ".write-test")  # (the probe of a writable_dir that was killed)
    others = sorted(entry.name for entry in out.iterdir() if entry.name not in ours
                    and not entry.name.startswith(".tmp-")) if out.is_dir() else []
    if others:  # a training run's folder, say: its --classifier files would sit among the run's
        raise EvalError(f"--out {out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                        f"give a new or empty folder, or a classifier's own folder to replace it")
    train, test = (load_split(args.preset, split, args.data_dir, args.download) for split in ("train", "test"))
    out = writable_dir(out)
    device = resolve_device(args.device)
    model, accuracy = train_classifier(train, test, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                       device=device)
    # Where it was trained: float rounding follows torch's version and the kernels it picks for the device, so two
    # machines train different classifiers from one seed and their FD scales differ (the results' "features"
    # fingerprint tells them apart; digits FDs default to the shipped classifier for that reason).
    trained_on = {"torch": torch.__version__, "device": str(device),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    save_classifier(model, out, {"dataset": args.preset, "test_accuracy": accuracy, "steps": args.steps,
                                 "trained_on": trained_on})
    print(f"classifier for {args.preset}: test accuracy {100 * accuracy:.2f}% -> {out} (torch {torch.__version__}, "
          f"{device}{', ' + trained_on['cpu_capability'] if device.type == 'cpu' else ''})")
    if args.preset in REFERENCE_CLASSIFIERS:
        print(f"note: evaluate and --fd-every read the classifier stmd_fast ships for {args.preset} "
              f"({REFERENCE_CLASSIFIERS[args.preset]}); pass --classifier {out} to use this one", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- CLI

def plots_available(plots: str) -> bool:
    """Whether matplotlib (the optional `plot` extra) is there to draw `plots`; without it the results are
    written all the same, and a note says so before any sampling."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print(f"note: matplotlib is not installed: skipping {plots}; pip install -e \".[plot]\" (or pip install "
          "matplotlib) for them", file=sys.stderr)
    return False


def writable_dir(path: str, flag: str = "--out") -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EvalError(f"{flag} {out} is a file, not a folder: give a folder (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_sibling(out / ".write-test")  # per process: another command's probe is not removed under it
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise EvalError(f"cannot write to {flag} {out}: {err.strerror or err}: choose a writable directory") from None
    return out


EVALUATE_LOCK = ".evaluate.lock"


@contextmanager
def holding_out(path: str | None):
    """--out, made if missing and held by this command alone: two sweeps into one folder each rewrote
    results.json with their own rows, and one's were lost. On the way out, still holding it, the lock file goes
    (run_lock: a process that opened it meanwhile locks a new one), and so does a folder made here that the
    command left empty (it failed early). A killed command's temporary files go when the next one takes it."""
    if path is None:  # train-classifier's default folder
        yield
        return
    made = not Path(path).exists()
    out = writable_dir(path)
    with run_lock(out, EVALUATE_LOCK, "another evaluate command") as lock:
        remove_stale_temps(out)  # of results.json and the like, from a kill while write_atomic replaced it
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            if made and not any(out.iterdir()):
                out.rmdir()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m stmd_fast.evaluate", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, metric: bool = True):
        if metric:
            sp.add_argument("--out", required=True, help="output directory")
        else:
            sp.add_argument("--out", help="output directory [default: runs/classifier-<preset>]")
        sp.add_argument("--seed", type=int, default=0, help="seeds every random draw (noise, images, masks) [default: 0]")
        sp.add_argument("--batch-size", type=int, default=256,
                        help="images per network batch; the random draws follow the batches, so the same --seed "
                             "gives the same numbers at the same --batch-size (recorded with them) [default: 256]")
        sp.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N [default: auto]")
        default = "where the checkpoints' run read them" if metric else "datasets"
        sp.add_argument("--data-dir", help=f"where the mnist/cifar10 files are (other data has none) [default: {default}]")
        if metric:
            sp.add_argument("--metric", choices=("auto", "fd", "fid"), default="auto",
                            help="fd: the Frechet distance on a digit classifier's features (digits and mnist only, the "
                                 "classifier learns their labels); fid: Inception FID, also on digits or mnist (to "
                                 "compare with published FIDs); auto: fd on digits and mnist, fid on other data "
                                 "[default: auto]")
            sp.add_argument("--classifier", help="FD classifier directory [default: digits: the one stmd_fast "
                                                 "ships, so FDs compare across machines; mnist: runs/classifier-mnist]")
            sp.add_argument("--inception-weights", help="local Inception weights file for FID when offline")
            sp.add_argument("--reference-split", choices=("train", "test"),
                            help="a preset's real images to compare with [default: test]")
            sp.add_argument("--reference", metavar="FILE.npy|DIR",
                            help="real images for checkpoints trained on --data (.npy, an image folder or latent "
                                 "shards): a .npy of images, or a folder of images (read at the checkpoint's size); "
                                 "a preset's checkpoints use --reference-split instead")
            sp.add_argument("--ema", type=float, metavar="DECAY",
                            help="which EMA, by its decay: a run keeps --ema-decay and each of --ema-decays "
                                 "[default: --ema-decay's]")
            sp.add_argument("--cache-dir", default="runs/reference-stats",
                            help="cache of reference statistics [default: runs/reference-stats]")

    s = sub.add_parser("sweep", help="FD/FID against NFE for one or more checkpoints")
    s.add_argument("checkpoints", nargs="+", metavar="CKPT", help="runs (their newest intact checkpoint) or "
                   "checkpoints/step_* folders, of one dataset")
    s.add_argument("--num", type=int, default=10000, help="samples per setting [default: 10000]")
    # Flags that only some runs or options use (sweep's settings, --flow-steps, inverse's --mask) default to None,
    # their defaults applied where they are used: one given where it would be ignored is refused
    s.add_argument("--stmd", help=f"STMD NxM settings [default: {DEFAULT_STMD}]")
    s.add_argument("--meanflow-steps", help=f"Mean Flow M [default: {DEFAULT_MEANFLOW}]")
    s.add_argument("--ddpm-steps", help=f"DDPM N [default: {DEFAULT_DDPM}]")
    s.add_argument("--grid", choices=TIME_GRIDS,
                   help="diffusion time grid of STMD and DDPM [default: each run's --sample-grid]")
    s.add_argument("--vae", metavar="DIR", help="checkpoints trained on latents: their VAE's new place, if it moved "
                                                "since training [default: the one each run recorded]")
    common(s)

    k = sub.add_parser("kernel", help="gmm: energy distance / sliced W2 to the exact transition kernel")
    k.add_argument("runs", nargs="+", metavar="RUN", help="runs or checkpoints trained with --preset gmm")
    k.add_argument("--flow-steps", help="M values for STMD [default: 1,2]")
    k.add_argument("--points", type=int, default=8, help="conditioning states per (s_from, s_to) [default: 8]")
    k.add_argument("--num", type=int, default=2000, help="draws per state [default: 2000]")
    k.add_argument("--out", required=True, help="output directory")
    k.add_argument("--seed", type=int, default=0, help="seeds the states and the draws [default: 0]")

    i = sub.add_parser("inpaint", help="FD, PSNR and diversity of completions of held-out images")
    i.add_argument("checkpoint", metavar="CKPT", help="an image run (its newest intact checkpoint) or a checkpoint")
    i.add_argument("--mask", choices=("center", "pixels", "half"), default="center",
                   help="what is hidden: the center square, random pixels, or the bottom half [default: center]")
    i.add_argument("--images", type=int, default=64, help="held-out images [default: 64]")
    i.add_argument("--completions", type=int, default=8, help="completions per image [default: 8]")
    i.add_argument("--steps", type=int, help=f"N diffusion steps [default: {CONDITIONED_STEPS}; Mean Flow: 1]")
    i.add_argument("--flow-steps", type=int, default=1, help="M flow steps [default: 1]")
    i.add_argument("--zoom", type=int, default=1, help=f"enlarge the grid's pixels K times, at most {MAX_ZOOM} [default: 1]")
    common(i)

    v = sub.add_parser("inverse", help="PSNR, FD, diversity and consistency of posterior samples for an operator")
    v.add_argument("checkpoint", metavar="CKPT", help="an image run (its newest intact checkpoint) or a checkpoint")
    v.add_argument("--operator", choices=("sr4", "sr2", "gray", "inpaint"), required=True,
                   help="the measurement: 4x or 2x average-pool downsampling, grayscale, or a mask")
    v.add_argument("--mask", choices=("center", "pixels", "half"),
                   help="with --operator inpaint [default: center]")
    v.add_argument("--sigma-y", type=float, default=0.0, help="measurement noise; 0: DDNM [default: 0]")
    v.add_argument("--particles", type=int, help="SMC with K particles per completion [default: none, DDNM(+)]")
    v.add_argument("--images", type=int, default=64, help="held-out images [default: 64]")
    v.add_argument("--completions", type=int, default=8, help="samples per image [default: 8]")
    v.add_argument("--steps", type=int, help=f"N diffusion steps [default: {CONDITIONED_STEPS}; Mean Flow: 1]")
    v.add_argument("--flow-steps", type=int, default=1, help="M flow steps [default: 1]")
    v.add_argument("--zoom", type=int, default=1, help=f"enlarge the grid's pixels K times, at most {MAX_ZOOM} [default: 1]")
    common(v)

    q = sub.add_parser("posterior", help="gmm: energy distance of SMC and DDNM+ posterior samples to the exact posterior")
    q.add_argument("runs_dirs", nargs="+", metavar="RUN", help="runs or checkpoints trained with --preset gmm")
    q.add_argument("--steps", default="1,2,4,8", help="N values [default: 1,2,4,8]")
    q.add_argument("--particles", default="1,4,16,64", help="SMC particle counts K [default: 1,4,16,64]")
    q.add_argument("--flow-steps", type=int, help="M for STMD / Mean Flow [default: 1]")
    q.add_argument("--sigma-y", type=float, default=0.1, help="measurement noise [default: 0.1]")
    q.add_argument("--grid", choices=TIME_GRIDS, help="diffusion time grid of every chain [default: the runs' "
                                                      "--sample-grid]")
    q.add_argument("--observations", type=int, default=4, help="measurements y, each of a fresh x_0 [default: 4]")
    q.add_argument("--runs", type=int, default=1000, help="independent runs (draws) per y and cell [default: 1000]")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--seed", type=int, default=0, help="seeds the measurements and the draws [default: 0]")

    d = sub.add_parser("conditional", help="FD of draws of p(x_0 | x_s) at each diffusion time s, x_s from real "
                                           "training images: where a chain's error comes from")
    d.add_argument("checkpoint", metavar="CKPT", help="a run (its newest intact checkpoint) or a checkpoint")
    d.add_argument("--s", metavar="S,S,...", help="diffusion times, comma-separated [default: the points of the run's 4-step grid, "
                               "1,0.5625,0.25,0.0625 on the quadratic one]")
    d.add_argument("--flow-steps", help="M values for STMD [default: 1,2,4]")
    d.add_argument("--num", type=int, default=10000, help="draws per (s, M) [default: 10000]")
    common(d)

    c = sub.add_parser("train-classifier", help="train the FD feature classifier and report its test accuracy")
    c.add_argument("--preset", choices=FD_PRESETS, required=True, help="the dataset whose labels it learns")
    c.add_argument("--steps", type=int, default=2000, help="training steps (AdamW, --batch-size images each) "
                   "[default: 2000]")
    c.add_argument("--download", action="store_true", help="let torchvision download mnist")
    common(c, metric=False)
    return p


MEMORY_FLAGS = ("batch_size", "particles", "num", "images", "completions", "runs")
"""The flags that size an evaluation's tensors: an out-of-memory error names those its command has, with their values."""


def main(argv: list[str] | None = None) -> int:
    with printable_output():  # a Python caller gets its own stdout and stderr back
        try:
            return run_evaluation(argv)
        except SystemExit as done:  # argparse's usage error (said already) or --help: returned as any exit
            return exit_code(done)


def run_evaluation(argv: list[str] | None) -> int:
    if several_processes():
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded with the results (provenance)
    commands = {"sweep": sweep, "kernel": kernel, "inpaint": inpaint, "posterior": posterior, "inverse": inverse,
                "conditional": conditional, "train-classifier": train_classifier_cmd}
    try:
        for name in ("num", "batch_size", "images", "points", "steps", "zoom", "particles"):
            value = getattr(args, name, 1)  # posterior's --steps is a list, --particles may be absent
            if isinstance(value, int) and value < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be at least 1")
        if getattr(args, "zoom", 1) > MAX_ZOOM:  # the grid grows with its square, after all the sampling
            raise EvalError(f"--zoom {args.zoom}: at most {MAX_ZOOM}")
        if args.command in ("sweep", "conditional") and args.num < 2:  # FD and FID need a covariance
            raise EvalError(f"--num must be at least 2 to score a distribution by FD/FID, got {args.num}")
        device_name = "this device" if getattr(args, "device", "auto") in (None, "auto") else args.device
        sizes = [f"--{name.replace('_', '-')} {','.join(map(str, value)) if isinstance(value, list) else value}"
                 for name in MEMORY_FLAGS if (value := getattr(args, name, None)) is not None]
        with interrupt_on_stop_signals(), warnings_as_lines(), holding_out(getattr(args, "out", None)), \
                fits_in_memory(device_name, f"lower {' or '.join(sizes)}"):
            return commands[args.command](args)  # SIGTERM, SIGHUP as Ctrl-C
    except (EvalError, ValueError, FileNotFoundError, RunLocked) as err:  # bad input, found before sampling
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutOfMemory as err:  # every file is written whole or not at all
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a write that failed (a full disk): every file is written whole or not at all
        print(f"error: {err.filename or args.out}: {err.strerror or err}: {write_fix(err)}, then run the same "
              f"command again (a sweep reuses the settings it measured)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # every file is written whole or not at all; a sweep keeps its settings so far
        if not getattr(err, "said", False):
            print("interrupted", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
