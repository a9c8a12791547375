"""Training configuration: one typed dataclass, presets as functions that fill it.

The preset names the data and the network; every field can be overridden from the CLI
(see train.py). Validation happens in __post_init__, before any expensive work.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

from .devices import resolve_device, same_device  # noqa: F401 (importable from here too)
from .distributed import PARALLEL_MODES
from .files import local_path, local_pattern
from .kernels.dispatch import BACKENDS
from .loggers import LOGGERS
from .methods import MAX_STEPS, METHODS
from .models import UNET_WIDTHS, NetConfig, dit_config, dit_names, unet_config
from .objectives import ObjectiveConfig
from .schedule import TIME_GRIDS

PRECISIONS = ("fp32", "bf16")


def option(default, *, choices: tuple[str, ...] | None = None, metavar: str | tuple[str, ...] | None = None,
           resumable: bool = False, flag: str | None = None):
    """A TrainConfig field with what its command-line flag needs besides the docstring under it:
    the choices, a metavar, whether --resume may change it (resumable), and the flag where it is not
    --field-name (flag_of)."""
    return field(default=default, metadata={"choices": choices, "metavar": metavar, "resumable": resumable,
                                            "flag": flag})


def flag_of(name: str, cls=None) -> str:
    """The command-line flag of a config field: --field-name, or the one its option() names."""
    fields = {f.name: f for f in dataclasses.fields(cls or TrainConfig)}
    return (fields[name].metadata.get("flag") if name in fields else None) or "--" + name.replace("_", "-")


PRESET_NAMES = ("digits", "gmm", "mnist", "cifar10", "celeba-latent", "images", "latent")  # PRESETS below, in this order


@dataclass
class TrainConfig:
    """Every training option, once: `python -m stmd_fast.train` makes a flag of each field (its
    docstring is the help; cli.add_dataclass_flags), and presets fill them (PRESETS). In Python, start from a
    preset, as the command line does: dataclasses.replace(PRESETS["gmm"](), steps=500, out="runs/x"), then
    train.train(cfg); TrainConfig(preset="gmm") alone only names the preset and keeps the class defaults."""

    preset: str = option("digits", choices=PRESET_NAMES)
    """Data and network: digits (sklearn 8x8, no download), gmm (2-D Gaussian mixture, MLP), mnist, cifar10
    (paper settings, files from --data-dir), celeba-latent (DiT-M/2 on SD-VAE latents, shards from --data),
    images (your folder of images, a U-Net sized by --unet), latent (any encoded shards, a DiT chosen by
    --dit). With --data and no --preset: images for a folder of images, latent for latent shards, digits'
    settings for a .npy array."""
    method: str = option("stmd", choices=tuple(METHODS))
    """stmd (conditional Mean Flow) | meanflow (unconditional) | ddpm (eps-prediction)."""
    data: str | None = option(None, metavar="FILE.npy|DIR|SHARDS", resumable=True)
    """Your own data, replacing the preset's: a folder of images (preset images, at --resolution);
    latent shards of stmd_fast.data.encode (presets latent, celeba-latent), their folder or a pattern such as
    'SHARDS/shard-{000000..000099}.tar' or 'SHARDS/shard-*.tar' (quoted), or several joined by '::'; or a .npy
    array: (N, D) vectors -> MLP, (N, C, H, W) images -> U-Net, uint8 images scaled to [-1, 1], floats used as
    given."""
    vae: str | None = option(None, resumable=True)
    """Latent presets: the VAE the shards were encoded with, a local folder or hub id (checked against the
    shards' manifest; sample grids decode through it); celeba-latent's: stabilityai/sd-vae-ft-ema; latent's:
    the manifest's. If its folder moved, give the new place (also with --resume)."""
    resolution: int = 64
    """Image folder (--data DIR): the square size, in pixels, that every image is resized and center-cropped to."""
    flip: bool = False
    """Images: mirror each training image left-right with probability 1/2 (latents: encode with --flip instead)."""
    unet: str | None = option(None, choices=tuple(UNET_WIDTHS))
    """Image data: a U-Net of this size laid out for the resolution (models.unet_config; L at 32 pixels has the
    cifar10 network's channels and layers, 38.4M parameters, with attention heads of 64 channels where cifar10's
    have 8). Default: B for an image folder, the preset's own network otherwise."""
    dit: str | None = option(None, metavar="NAME")
    """Latent data: a DiT of the registry, DiT-{S,B,M,L,XL}/{2,4,8}, whose patch divides the latent size.
    Default for preset latent, by latent size: DiT-S/2 up to 8x8, DiT-B/2 up to 16x16, DiT-M/2 above."""
    data_workers: int | None = None
    """Latent presets: DataLoader worker processes reading the shards; unset: 2, or none (the training
    process reads) when an epoch is under 2048 samples per process, since workers restart every epoch."""
    strict_data: bool = option(False, resumable=True)
    """Latent presets: stop at the first damaged shard or sample (its checksum, shape or values wrong)
    instead of skipping it; skipped ones are counted in the log and metrics.jsonl either way."""
    data_dir: str = option("datasets", metavar="DIR", resumable=True)
    """Where mnist / cifar10 files live (torchvision's layout: DIR/MNIST/raw, DIR/cifar-10-batches-py). Saved
    absolute; if the files moved, give the new place (also with --resume)."""
    download: bool = False
    """Let torchvision download mnist / cifar10 into --data-dir."""
    steps: int = option(4000, resumable=True)
    """Optimizer steps in total (a resumed run continues to this number)."""
    batch_size: int = 64
    """The GLOBAL batch: under torchrun with K processes each trains on batch-size / K (K must divide it) and
    the gradients are averaged, so the run matches one process's at the same batch and --lr."""
    lr: float = 1e-3
    """AdamW learning rate, constant after warm-up."""
    adam_betas: tuple[float, float] = option((0.9, 0.999), metavar=("B1", "B2"))
    """AdamW's (beta1, beta2). Mean Flow's DiT recipe (celeba-latent, latent) uses beta2 = 0.95."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up: step k (from 1) uses lr * min(1, k / warmup_steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    dropout: float = 0.0
    """Dropout while training, in the U-Net's residual blocks and the DiT's MLPs (sampling runs without it).
    Adds randomness inside the compiled step, so compiled and eager losses no longer agree sample for sample."""
    ema_decay: float = 0.999
    """EMA of the weights, used for samples and checkpoints' sampling weights."""
    ema_decays: tuple[float, ...] = option((), metavar="DECAY")
    """Further EMA decays kept beside --ema-decay, e.g. 0.9999 0.99995: each is saved in checkpoints
    (ema-DECAY.safetensors) and measured by --fd-every; sample and evaluate pick one with --ema DECAY."""
    seed: int = 0
    """Seeds the network init, data order and all noise."""
    device: str = option("auto", resumable=True)
    """auto (cuda if available, else cpu) | cpu | cuda | cuda:N."""
    precision: str = option("fp32", choices=PRECISIONS)
    """fp32, or bf16: autocast network math (fp32 master weights and optimizer state)."""
    tf32: bool = option(True, resumable=True)
    """CUDA with fp32: matmuls and convolutions take TF32 inputs (10-bit mantissa, fp32 accumulation) on tensor
    cores, as the official PyTorch Mean Flow code sets; --no-tf32 for full fp32. No effect on a CPU or under bf16.
    A device setting, like --device: --resume may change it."""
    compile: bool = option(False, resumable=True)
    """torch.compile the loss (JVP, target, loss); backward and optimizer stay eager. The first step waits for a
    cold compile: about 3 min for the digits network and 6.5 for cifar10's on 2 CPU cores (README); a later run of
    the same network and batch reads Inductor's on-disk cache (digits: 44 s)."""
    kernels: str = option("auto", choices=BACKENDS, resumable=True)
    """auto = our Triton kernels on CUDA (fused time embedding, Mean Flow loss, JVP flash attention), PyTorch on
    CPU; reference = PyTorch everywhere; triton = kernels, CUDA only."""
    parallel: str = option("ddp", choices=PARALLEL_MODES, resumable=True)
    """Under torchrun: ddp = a full replica per process, gradients averaged by an explicit all-reduce after each
    backward; fsdp = FSDP2 fully_shard (parameters, gradients and optimizer state sharded, for large DiTs).
    Checkpoints are unsharded either way, so a run resumes with any number of processes or mode. Ignored
    without torchrun (ddp), refused there for fsdp. See stmd_fast/distributed.py."""
    out: str | None = None
    """Run directory; default runs/<preset or data name>-<method>."""
    ckpt_every: int = option(1000, resumable=True)
    """Checkpoint interval in steps (and at the end)."""
    ckpt_minutes: float = option(30.0, resumable=True)
    """Also checkpoint when this many minutes have passed since the last checkpoint (checked every step), so a
    crash loses at most about this much work (and a step) however slow a step is; 0 = by steps only."""
    keep_checkpoints: int = option(2, resumable=True)
    """How many most recent checkpoints to keep."""
    sample_every: int = option(1000, resumable=True)
    """Write a sample grid (EMA weights) every this many steps and at the end; 0 = only at the end."""
    log_every: int = option(50, resumable=True)
    """Append to metrics.jsonl and refresh the progress bar every this many steps."""
    sample_steps: int = option(1, resumable=True)
    """N of the sample grids (STMD diffusion steps; DDPM uses --sample-ddpm-steps)."""
    sample_flow_steps: int = option(1, resumable=True)
    """M of the sample grids (flow steps per diffusion step; STMD, Mean Flow)."""
    sample_ddpm_steps: int = option(100, resumable=True)
    """N of DDPM's sample grids."""
    sample_grid: str = option("uniform", choices=TIME_GRIDS)
    """Diffusion time grid this run samples on: uniform (s_k = k / N) | quadratic ((k / N)^2, denser near the data).
    Its sample grids and FD checks use it, --s-sampler grid trains on its points, and evaluate, sample and export
    default to it for the run's checkpoints."""
    fd_every: int = option(0, resumable=True)
    """Measure each EMA's FD (digits, mnist: on the FD classifier's features) or Inception FID (other images,
    latents decoded) every this many steps and at the end, with the sample grids' N and M; 0 = never."""
    fd_num: int = option(1000, resumable=True)
    """Samples per FD measurement, against as many training images (latents: decoded training latents)."""
    fd_classifier: str | None = option(None, metavar="DIR", resumable=True)
    """digits / mnist: the FD classifier's directory (python -m stmd_fast.evaluate train-classifier); default: for
    digits the classifier stmd_fast ships (so FDs compare across machines), for mnist runs/classifier-mnist."""
    inception_weights: str | None = option(None, metavar="FILE", resumable=True)
    """Inception FID offline: the weights file (the error without it names the file to fetch)."""
    # --loggers, not --log: torchrun's parser reads --log after the script too, as an ambiguous abbreviation of
    # its own --log-dir and --logs-specs, and stops the job (the field keeps its name: checkpoints record it)
    log: tuple[str, ...] = option((), choices=LOGGERS, resumable=True, flag="--loggers")
    """Also send metrics.jsonl's records and the sample grids to tensorboard and/or wandb (pip install -e
    ".[tensorboard]" or ".[wandb]"; W&B runs offline unless WANDB_MODE=online or WANDB_API_KEY is set)."""
    net: NetConfig = field(default_factory=NetConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def _check_types(self) -> None:
        """TypeError for a field of the wrong kind, as the Python API can give it (the command line parses each
        flag): steps=2.5 trained past its last step without ever checkpointing; a string where a list goes
        (log="tensorboard") was read letter by letter."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and kind.endswith("| None"):
                continue
            if kind.startswith("int") and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"{f.name} must be a whole number, got {value!r}")
            if kind.startswith("tuple") and not isinstance(value, (tuple, list)):
                raise TypeError(f"{f.name} must be a tuple (or list), got {value!r}: e.g. {f.name}=({value!r},)")

    def check_new_run(self) -> None:
        """ValueError for settings that only waste a run, checked on a new run's flags (train.resolve_config), not
        in __post_init__: a checkpoint saved before a check existed still loads. The grid's cost; a weight decay
        that erases the weights; an adaptive-weight power far beyond the recipes' 0 to 2 (1e308 trained into a NaN
        loss that blamed --lr; at the default c the weight leaves float32 from p = 13)."""
        self.check_grid_cost()
        if self.lr * self.weight_decay >= 1:  # AdamW scales the weights by 1 - lr x weight_decay every step
            raise ValueError(f"--weight-decay {self.weight_decay:g} at --lr {self.lr:g}: AdamW scales the weights by "
                             f"1 - lr x weight_decay = {1 - self.lr * self.weight_decay:.3g} every step, which erases "
                             f"them; lr x weight_decay must stay below 1 (usually about 1e-5)")
        if self.objective.adaptive_p > 4:
            raise ValueError(f"--adaptive-p {self.objective.adaptive_p:g}: the recipes use 0 to 2, and the weight "
                             f"1 / (||delta||^2 + c)^p far beyond them leaves float32; give a p in [0, 4]")
        c, p = self.objective.adaptive_c, self.objective.adaptive_p
        if p * math.log10(c) > 6:  # c^-p < 1e-6 (in logs: a tiny c must not overflow). 1e300 made the float32
            # weight 0: a loss of 0 and weights that never moved
            raise ValueError(f"--adaptive-c {c:g}: the weight 1 / (||delta||^2 + c)^p is at most c^-p = "
                             f"1e{-p * math.log10(c):.0f} at --adaptive-p {p:g}, so the gradients fall under AdamW's "
                             f"eps (1e-8) or to 0 and the network stops learning; the recipes use c = 1e-3 to 1e-2")

    def check_grid_cost(self) -> None:
        """ValueError if a sample grid's N x M network calls per sample exceed MAX_STEPS: each bounded, their
        product ran for days after training. Also a resumed run's check: a resume may change N and M."""
        grid_steps = METHODS[self.method].grid_steps(self)
        if METHODS[self.method].nfe(*grid_steps) > MAX_STEPS:
            raise ValueError(f"--sample-steps {grid_steps[0]} x --sample-flow-steps {grid_steps[1]}: "
                             f"{METHODS[self.method].nfe(*grid_steps)} network evaluations per sample of every grid; "
                             f"at most {MAX_STEPS}")

    def __post_init__(self):
        if isinstance(self.net, dict):
            self.net = NetConfig(**self.net)
        if isinstance(self.objective, dict):
            self.objective = ObjectiveConfig(**self.objective)
        self._check_types()
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.kernels not in BACKENDS:
            raise ValueError(f"unknown kernels {self.kernels!r}: choose one of {', '.join(BACKENDS)}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {self.parallel!r}: choose one of {', '.join(PARALLEL_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: choose fp32 or bf16")
        if self.sample_grid not in TIME_GRIDS:
            raise ValueError(f"unknown sample grid {self.sample_grid!r}: choose one of {', '.join(TIME_GRIDS)}")
        self.objective.s_grid = self.sample_grid  # one grid per run: the s sampler aims where the run samples
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "keep_checkpoints",
                     "sample_steps", "sample_flow_steps", "sample_ddpm_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("sample_steps", "sample_flow_steps", "sample_ddpm_steps"):  # the sampler's own bound, now
            if getattr(self, name) > MAX_STEPS:  # not at the first grid, after training, on every resume
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: at most {MAX_STEPS} steps")
        for name in ("warmup_steps", "sample_every", "data_workers", "seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.seed >= 2**63:
            raise ValueError(f"--seed {self.seed}: a seed is an integer in [0, 2^63)")
        # NaN fails every comparison: each check says "in range" and is negated, so NaN and inf are refused
        if not (math.isfinite(self.ckpt_minutes) and self.ckpt_minutes >= 0):
            raise ValueError(f"--ckpt-minutes must be a finite number >= 0 (0: by steps only), got {self.ckpt_minutes}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"--lr must be a finite number in (0, 1], got {self.lr}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        self.adam_betas, self.ema_decays, self.log = tuple(self.adam_betas), tuple(self.ema_decays), tuple(self.log)
        if "none" in self.log:  # --loggers none: no logger (the flag's way to say an empty list)
            if len(self.log) > 1:
                raise ValueError(f"--loggers {' '.join(self.log)}: 'none' means no logger; give it alone")
            self.log = ()
        if len(set(self.log)) != len(self.log):  # each copy would open its own logger: every curve twice
            raise ValueError(f"--loggers {' '.join(self.log)} names a logger twice: give each once")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"--adam-betas takes two numbers in [0, 1), got {' '.join(map(str, self.adam_betas))}")
        decays = (self.ema_decay,) + self.ema_decays
        if not all(0 <= d < 1 for d in decays) or len(set(decays)) != len(decays):
            raise ValueError(f"EMA decays must be distinct and in [0, 1), got --ema-decay {self.ema_decay} "
                             f"--ema-decays {' '.join(map(str, self.ema_decays))}")
        for flag, value, ok, what in (("--resolution", self.resolution, self.resolution >= 1, "at least 1"),
                                      ("--fd-every", self.fd_every, self.fd_every >= 0, "at least 0 (0: off)"),
                                      ("--fd-num", self.fd_num, self.fd_num >= 2, "at least 2 (FD needs 2 samples)"),
                                      ("--dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)")):
            if not ok:  # NaN fails the comparison too
                raise ValueError(f"{flag} must be {what}, got {value}")
        if self.dropout and self.net is not None and self.net.kind == "mlp":
            raise ValueError(f"--dropout {self.dropout}: the MLP network ({self.preset}) has no dropout; it is for the "
                             f"U-Net and the DiT: drop --dropout")
        if self.unet is not None and self.unet not in UNET_WIDTHS:
            raise ValueError(f"--unet {self.unet}: unknown size; choose one of {', '.join(UNET_WIDTHS)}")
        if self.dit is not None and self.dit not in dit_names():
            raise ValueError(f"--dit {self.dit} is not in the registry; choose one of {', '.join(dit_names())}")
        # saved absolute, so that the run resumes, samples and decodes from any working directory
        self.data = local_pattern(self.data)
        self.vae, self.inception_weights, self.fd_classifier = map(local_path, (self.vae, self.inception_weights,
                                                                               self.fd_classifier))
        if self.data_dir == "":
            raise ValueError("--data-dir is empty: give the folder of the mnist / cifar10 files")
        self.data_dir = str(Path(self.data_dir).expanduser().resolve())  # where its files are looked for: made now
        if self.out == "":
            raise ValueError("--out is empty: give a folder (or leave --out out for runs/<data>-<method>)")
        if self.out is not None:
            self.out = os.path.expanduser(self.out)  # a folder named ~ is never what was meant
        if self.out is None:
            own_data = self.data is not None and self.preset not in LATENT_RESOLUTION
            # resolved: --data . or ../ has no name of its own
            self.out = f"runs/{Path(self.data).resolve().stem if own_data else self.preset}-{self.method}"
        if self.data is not None and Path(self.data).is_dir() and Path(self.out).resolve().is_relative_to(
                Path(self.data).resolve()):
            raise ValueError(f"--out {self.out} lies inside --data {self.data}: its sample grids would be read as "
                             f"training images by the next run; choose an --out outside the data folder")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Time samplers with their sources (the paper gives none of its own; math.md section 4):
MEANFLOW_IMAGENET = ObjectiveConfig(time_sampler="pair", time_mean=-0.4, time_std=1.0, flow_matching_fraction=0.75,
                                    adaptive_p=1.0)
"""Mean Flow's ImageNet 256 latent-DiT recipe (its paper's default): LN(-0.4, 1) pairs, 75% r = t, p = 1."""
MEANFLOW_CIFAR10 = ObjectiveConfig(time_sampler="separate", time_mean=-0.6, time_std=1.6, r_mean=-4.0, r_std=1.6,
                                   flow_matching_fraction=0.25, adaptive_p=0.75)
"""Mean Flow's improved CIFAR-10 U-Net recipe (official PyTorch code, configs/cifar10_v1): t LN(-0.6, 1.6) and
r LN(-4, 1.6) drawn separately, r = min(r, t), 25% r = t, p = 0.75."""
MIXTURE_GRID = ObjectiveConfig(time_sampler="mixture", mixture_weight=0.5, time_mean=-0.4, time_std=1.0, r_mean=-4.0,
                               r_std=1.6, flow_matching_fraction=0.5, adaptive_p=0.25, s_sampler="grid")
"""Ours, setting Q of the README's time-sampler experiment (digits and gmm, bench/time_samplers.sh): half the rows are
Mean Flow's ImageNet LN(-0.4, 1) pairs (the short steps), half draw r from the CIFAR-10 recipe's LN(-4, 1.6) (r near 0:
the one-step pairs) below t ~ LN(-0.4, 1); 50% r = t, and half of the s draws on the run's sampler grids. Its presets
sample on the quadratic grid (sample_grid), which those s draws then aim at. p = 0.25 (F had 0.75, P 0.5): a row's
gradient norm grows as l^(1/2 - p), so the rows with large error pull hardest; with p = 0.75 it was the rows a model
already fits (STMD's s near 0, errors 100 times smaller than at s = 1) that pulled about 3 times harder. p = 0 (R)
helps Mean Flow (1.4-2.4 FD in the three-seed means) but costs STMD's one-step chains about 2 FD, and on gmm it is
3-7 times farther from the exact kernel at s = 0.5: STMD's defaults keep 0.25."""


def _digits() -> TrainConfig:
    # Sized to finish in a few minutes on 2 CPU cores with recognizable digits.
    # Times, grid and p: the README's time-sampler experiment (setting Q; one-step STMD FD 43-52 against 76-100 with Mean
    # Flow's ImageNet sampler, and better at every NFE it measured).
    return TrainConfig(preset="digits", steps=4000, batch_size=64, lr=1e-3, ema_decay=0.999, sample_grid="quadratic",
                       net=NetConfig(channels=(16, 32), norm_groups=8, head_dim=8, time_freqs=32),
                       objective=dataclasses.replace(MIXTURE_GRID))


def _gmm() -> TrainConfig:
    return TrainConfig(preset="gmm", steps=4000, batch_size=256, lr=1e-3, ema_decay=0.999,
                       ckpt_every=1000, sample_every=0, sample_grid="quadratic",
                       net=NetConfig(kind="mlp", width=256, depth=4, time_freqs=32),
                       objective=dataclasses.replace(MIXTURE_GRID))  # the exact kernel under each setting: README


def _mnist() -> TrainConfig:
    # Paper appendix D: channels (32, 64, 32), attention at the second level, lr 5e-4,
    # 150K iterations, batch 64, EMA 0.9995. The paper says 1 layer per block and 1.1M
    # parameters; UNet2DModel gives 0.79M with 1 layer and 1.18M with 2 (0.71M / 1.07M without the scale-shift
    # time embedding), so we take 2.
    return TrainConfig(preset="mnist", steps=150_000, batch_size=64, lr=5e-4, ema_decay=0.9995,
                       ckpt_every=5000, sample_every=5000, log_every=100, sample_grid="quadratic",
                       net=NetConfig(channels=(32, 64, 32), layers_per_block=2, attention_levels=(1,)),
                       objective=dataclasses.replace(MIXTURE_GRID))  # as digits, its nearest measured data


def _cifar10() -> TrainConfig:
    # Paper appendix D: channels (128, 256, 256, 256), 2 layers per block, attention at
    # 16x16 (level 1), lr 1e-4, 450K iterations, batch 64, EMA 0.9995. Times: Mean Flow's CIFAR-10 recipe.
    return TrainConfig(preset="cifar10", steps=450_000, batch_size=64, lr=1e-4, ema_decay=0.9995,
                       ckpt_every=10_000, sample_every=10_000, log_every=100,
                       net=NetConfig(channels=(128, 256, 256, 256), layers_per_block=2, attention_levels=(1,),
                                     time_freqs=128),
                       objective=dataclasses.replace(MEANFLOW_CIFAR10))


def _celeba_latent() -> TrainConfig:
    # Paper section 5: a latent DiT-M/2 (Mean Flow's) on CelebA through the SD VAE (sd-vae-ft-ema);
    # 256x256 images -> 4x32x32 latents. Its appendix lost the iterations, batch size and step size:
    # we take Mean Flow's DiT recipe (lr 1e-4, batch 256, EMA 0.9999, Adam beta2 0.95: the official
    # code's configs/default.py) and 200K steps.
    # Times: Mean Flow's latent-DiT (ImageNet 256) recipe, the nearest setting with evidence.
    return TrainConfig(preset="celeba-latent", steps=200_000, batch_size=256, lr=1e-4, adam_betas=(0.9, 0.95),
                       ema_decay=0.9999, vae="stabilityai/sd-vae-ft-ema", ckpt_every=5000, sample_every=5000,
                       log_every=100, net=dit_config("DiT-M/2"), objective=dataclasses.replace(MEANFLOW_IMAGENET))


def _latent() -> TrainConfig:
    # Any encoded folder: latent shape, VAE and resolution come from the shards' manifest, the DiT from
    # --dit (default by latent size, chosen in train). celeba-latent's recipe otherwise, plus a short
    # warm-up (a fresh DiT at lr 1e-4 with beta2 0.95 takes its first steps more gently) and a second,
    # slower EMA.
    return dataclasses.replace(_celeba_latent(), preset="latent", vae=None, warmup_steps=1000,
                               ema_decays=(0.99995,), net=None)


def _images() -> TrainConfig:
    # A folder of your own images at --resolution, a U-Net sized for it (--unet, default B). The cifar10
    # preset's lr, batch and EMA (paper appendix D) with a warm-up and, as the official PyTorch Mean Flow
    # code keeps, a second, slower EMA. Times: Mean Flow's CIFAR-10 recipe, as cifar10.
    return TrainConfig(preset="images", steps=100_000, batch_size=64, lr=1e-4, warmup_steps=1000,
                       ema_decay=0.9995, ema_decays=(0.9999,), ckpt_every=5000, sample_every=5000,
                       log_every=100, net=None, objective=dataclasses.replace(MEANFLOW_CIFAR10))


PRESETS = {"digits": _digits, "gmm": _gmm, "mnist": _mnist, "cifar10": _cifar10, "celeba-latent": _celeba_latent,
           "images": _images, "latent": _latent}
assert tuple(PRESETS) == PRESET_NAMES
RESUME_OVERRIDABLE = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}
"""Flags that may differ from the checkpoint's config when resuming; any other flag given with --resume must
equal the checkpoint's value (a run is one experiment)."""
LATENT_RESOLUTION = {"celeba-latent": 256, "latent": None}
"""Image resolution each latent preset's shards must be encoded at (checked against their manifest;
None: any, read from the manifest)."""
PRESET_DATA_SHAPES = {"digits": (1, 8, 8), "gmm": (2,), "mnist": (1, 28, 28), "cifar10": (3, 32, 32),
                      "celeba-latent": (4, 32, 32)}
"""Per-sample shape of each preset's data (the benchmarks build synthetic batches of it)."""


def net_for_shape(shape: tuple[int, ...]) -> NetConfig:
    """Network for the user's own .npy array (--data), or a preset's run on images of another size: the
    gmm MLP for vectors, the digits U-Net for images up to 16 pixels, the mnist U-Net up to 32 (its
    attention, one halving down, then sees at most 16 x 16 positions), and above that the U-Net an image
    folder gets (--unet B, laid out for the resolution): the mnist U-Net's attention would see 32 x 32
    positions at 64 pixels, and the JVP's attention memory grows with their square (24 GB at batch 64)."""
    if len(shape) == 1:
        return _gmm().net
    side = max(shape[1:])
    if side <= 16:
        return _digits().net
    return _mnist().net if side <= 32 else unet_config("B", shape)


def preset_for_data(data: str | None) -> str:
    """The preset that --data implies when no --preset is given: latent for shards (a .tar pattern, a
    folder with manifest.json or shards, or several joined by '::'), images for any other folder, digits (its
    settings, the network chosen from the array's shape) for a .npy file or no --data."""
    if data is None:
        return "digits"
    path = Path(data).expanduser()
    joined = "::" in data and not path.exists()  # only latent shards (folders, patterns) are joined by '::'
    if joined or data.endswith(".tar") or _holds_our_manifest(path) or any(path.glob("shard-*.tar")):
        return "latent"  # a shard folder without its manifest: the latent loader says what is missing
    return "images" if path.is_dir() else "digits"


def _holds_our_manifest(folder: Path) -> bool:
    """Whether folder/manifest.json is one that stmd_fast.data.encode wrote (of any version: the latent loader
    names one to re-encode). Another program's manifest.json in a folder of images leaves it a folder of images."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("stmd_fast.latents")


def choose_net(cfg: TrainConfig, data_shape: tuple[int, ...], data_kind: str) -> NetConfig:
    """The network for the loaded data: --dit for latents (default by latent size on preset latent),
    --unet for images (default B on an image folder), else the preset's, or for a .npy the one its shape
    picks. ValueError (one line, listing the valid choices) for a --dit that does not fit. A default DiT or
    U-Net size is recorded in cfg.dit / cfg.unet, so config.json names it and a resume may restate it."""
    if (cfg.dit is not None and data_kind != "latent") or (cfg.unet is not None and data_kind != "image"):
        raise ValueError(f"--dit is for latent data and --unet for images; this run's data are {data_kind}s")
    if data_kind == "latent" and (cfg.dit is not None or cfg.net is None):
        from .dit import choose_dit  # imported here: timm (and the wandb it pulls in) takes seconds

        cfg.dit = choose_dit(cfg.dit, data_shape)
        return dit_config(cfg.dit)
    if data_kind == "image" and (cfg.unet is not None or cfg.net is None and cfg.preset == "images"):
        cfg.unet = cfg.unet or "B"
        return unet_config(cfg.unet, data_shape)
    net = cfg.net if cfg.net is not None else net_for_shape(data_shape)
    if cfg.dropout and net.kind == "mlp":  # vectors from a .npy: known only now
        raise ValueError(f"--dropout {cfg.dropout}: vectors get the MLP network, which has no dropout; it is for the "
                         f"U-Net and the DiT: drop --dropout")
    return net
