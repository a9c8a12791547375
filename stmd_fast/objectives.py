"""Training objectives (math.md sections 4 and 6): STMD, Mean Flow, DDPM.

Each objective is split in two so the hot path compiles and stays reproducible:
  draw_noise(x0, cfg, generator) -> Noise      eager, every random number of the step;
  compute_loss(method, net, x0, noise, cfg)    a pure function of tensors (what --compile
                                                compiles; Inductor would otherwise replace
                                                torch.randn with its own generator).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kernels.meanflow_loss import meanflow_loss
from .methods import METHODS, get_method  # noqa: F401 (METHODS: importable from here too)
from .schedule import TIME_GRIDS, alpha_sigma, grid_points, per_sample


# torch's forward-AD decompositions call the deprecated torch.jit.script on first use of torch.func.jvp: not ours
# to fix, and noise in every run's output (and in a script computing the loss itself).
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

MAX_JVP_BLOCK = 1024  # the largest block of rows jvp_block may need


TIME_SAMPLERS = ("pair", "separate", "mixture")
"""Laws of the flow times (r, t), r <= t, before r = t is set on flow_matching_fraction of the batch:
  pair      t, r = max and min of two LN(time_mean, time_std) draws (Mean Flow's sampler; its ImageNet
            setting is LN(-0.4, 1.0), its paper's CIFAR-10 setting LN(-2.0, 2.0)).
  separate  t ~ LN(time_mean, time_std), r ~ LN(r_mean, r_std), r = min(r, t): independent laws, so r can
            sit near 0 while t spreads over [0, 1] (py-meanflow's cifar10_v1: t LN(-0.6, 1.6), r LN(-4, 1.6)).
  mixture   each row from `separate` with probability mixture_weight, else from `pair`: the one-step pairs
            (r near 0, t near 1) of separate and the short steps of pair in one batch.
LN(m, s) is the logit-normal law: sigmoid of N(m, s^2).
Whatever the law, with probability flow_grid_fraction a row's (r, t) is instead a step (1 - (j + 1) / M, 1 - j / M)
of the M-step flow grid (M drawn from flow_grid_steps, j from 0..M-1): the very pairs the sampler evaluates
(sampling.flow_map), the one-step pair (0, 1) among them, which no logit-normal law draws (t > 0.95 has
probability 8e-4 under pair with LN(-0.4, 1): the larger of two draws)."""
S_SAMPLERS = ("uniform", "grid")
"""Laws of the diffusion time s (STMD):
  uniform   s ~ U(0, 1].
  grid      with probability s_grid_fraction, s is point k of the N-step sampler grid s_grid (uniform: k / N,
            quadratic: (k / N)^2) with N drawn from s_grid_steps and k from 1..N: the times that sampler
            conditions on (every chain starts at s = 1); else U(0, 1]."""


@dataclass
class ObjectiveConfig:
    """Time sampling and loss weighting. Defaults: Mean Flow's ImageNet recipe; presets set their own
    (config.py says where each comes from)."""

    time_sampler: str = field(default="pair", metadata={"choices": TIME_SAMPLERS})
    """Law of (r, t): pair | separate | mixture (README, "Time samplers")."""
    time_mean: float = -0.4
    """Logit-normal mean of t (pair: of both draws)."""
    time_std: float = 1.0
    """Logit-normal std of t (pair: of both draws)."""
    r_mean: float = -4.0
    """separate / mixture: logit-normal mean of r (before r = min(r, t))."""
    r_std: float = 1.6
    """separate / mixture: logit-normal std of r."""
    mixture_weight: float = 0.5
    """mixture: probability that a row is drawn from `separate` rather than `pair`."""
    flow_grid_fraction: float = 0.0
    """Probability that a row's (r, t) is a step of an M-step flow grid instead of the time_sampler's draw."""
    flow_grid_steps: tuple[int, ...] = (1, 2, 4)
    """flow grid: the flow step counts M whose steps are drawn from, M uniform over these."""
    flow_matching_fraction: float = 0.75
    """Fraction of the batch set to r = t (there the loss is conditional flow matching). Exact per
    block of rows, not a coin per row, so the batch per process must be whole blocks (2/3: blocks of 3). The
    other rows keep the law's (r, t), which itself gives r = t now and then (separate, mixture: r = min(r, t))."""
    s_sampler: str = field(default="uniform", metadata={"choices": S_SAMPLERS})
    """Law of the diffusion time s (STMD): uniform | grid (README, "Time samplers")."""
    s_grid_fraction: float = 0.5
    """grid: probability that s is a point of a sampling grid rather than U(0, 1]."""
    s_grid_steps: tuple[int, ...] = (1, 2, 4, 8)
    """grid: the step counts N whose grid points (k = 1..N) are drawn from, N uniform over these."""
    s_grid: str = field(default="uniform", metadata={"choices": TIME_GRIDS})
    """grid: the sampler grid aimed at, uniform | quadratic (schedule.TIME_GRIDS); a run sets it to its
    --sample-grid."""
    adaptive_p: float = 1.0
    """Adaptive weight w = 1 / (||delta||^2 + c)^p; p = 0 gives the plain squared error."""
    adaptive_c: float = 1e-3
    """The c of the adaptive weight."""

    def __post_init__(self):
        finite = math.isfinite
        in_range = {  # written as "in range" (NaN fails every comparison, so NaN is refused too)
            "time_mean": (finite(self.time_mean), "a finite number"),
            "time_std": (finite(self.time_std) and self.time_std > 0, "a finite number > 0"),
            "flow_matching_fraction": (0 <= self.flow_matching_fraction <= 1, "in [0, 1]"),
            "mixture_weight": (0 <= self.mixture_weight <= 1, "in [0, 1]"),
            "flow_grid_fraction": (0 <= self.flow_grid_fraction <= 1, "in [0, 1]"),
            "s_grid_fraction": (0 <= self.s_grid_fraction <= 1, "in [0, 1]"),
            "adaptive_p": (finite(self.adaptive_p) and self.adaptive_p >= 0, "a finite number >= 0"),
            "adaptive_c": (finite(self.adaptive_c) and self.adaptive_c > 0, "a finite number > 0"),
            "r_mean": (finite(self.r_mean), "a finite number"),
            "r_std": (finite(self.r_std) and self.r_std > 0, "a finite number > 0"),
        }
        for name, (ok, what) in in_range.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)}")
        self.s_grid_steps = tuple(int(n) for n in self.s_grid_steps)
        self.flow_grid_steps = tuple(int(n) for n in self.flow_grid_steps)
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time sampler {self.time_sampler!r}: choose one of {', '.join(TIME_SAMPLERS)}")
        if self.s_sampler not in S_SAMPLERS:
            raise ValueError(f"unknown s sampler {self.s_sampler!r}: choose one of {', '.join(S_SAMPLERS)}")
        if self.s_grid not in TIME_GRIDS:
            raise ValueError(f"unknown s grid {self.s_grid!r}: choose one of {', '.join(TIME_GRIDS)}")
        if not self.s_grid_steps or min(self.s_grid_steps) < 1:
            raise ValueError(f"--s-grid-steps must be step counts of at least 1, got {self.s_grid_steps}")
        if not self.flow_grid_steps or min(self.flow_grid_steps) < 1:
            raise ValueError(f"--flow-grid-steps must be step counts of at least 1, got {self.flow_grid_steps}")
        self.jvp_block  # noqa: B018 (validates the fraction)

    @property
    def jvp_block(self) -> tuple[int, int]:
        """(k, P): in every block of P consecutive rows of a batch the first k rows are drawn with
        r < t and go through the JVP, the other P - k get r = t and a plain forward; k / P = 1 -
        flow_matching_fraction in lowest terms (0.75 -> (1, 4)). A count fixed per block keeps the
        compiled graph's shapes static, and a block that does not depend on the batch keeps every
        slice of a batch (torchrun's ranks) laid out as the whole. A simple fraction typed to 4 decimals
        (0.6667) is taken as itself (2/3)."""
        # plain int/float arithmetic, not fractions.Fraction: Dynamo (torch 2.11) cannot trace
        # float(Fraction) when a config is built inside a compiled function
        share = 1 - self.flow_matching_fraction
        # exact fractions first; then a simple one (block <= 64) typed to 4 decimals, as 0.6667 for 2/3:
        # fractions with denominators up to 64 lie more than 2.4e-4 apart, so at most one is that close
        for blocks, tolerance in ((range(1, MAX_JVP_BLOCK + 1), 1e-9), (range(1, 65), 5e-5)):
            for block in blocks:  # the smallest block gives lowest terms
                k = round(share * block)
                if abs(k / block - share) <= tolerance:
                    return k, block
        raise ValueError(f"--flow-matching-fraction {self.flow_matching_fraction} is no fraction with a "
                         f"denominator up to {MAX_JVP_BLOCK}: the JVP runs on a fixed count of rows per block; "
                         f"use e.g. {round(self.flow_matching_fraction * 64) / 64:.10g}")

    def nearest_fraction_for(self, batch: int) -> float | None:
        """The fraction j / d nearest flow_matching_fraction (j = round(fraction * d)) that a batch of
        `batch` rows lays out: d divides the batch and is a block jvp_block takes (<= MAX_JVP_BLOCK); None if
        every such fraction is 1 (no JVP row at all: no Mean Flow objective)."""
        fraction = self.flow_matching_fraction
        options = [round(fraction * d) / d for d in range(1, min(batch, MAX_JVP_BLOCK) + 1)
                   if batch % d == 0 and round(fraction * d) < d]
        return min(options, key=lambda near: abs(near - fraction), default=None)

    def check_batch(self, batch: int) -> None:
        """The batch (per process) must be whole blocks of jvp_block; one line saying how, if not."""
        k, block = self.jvp_block
        if batch % block:
            near = self.nearest_fraction_for(batch)
            other = "" if near is None else f", or use a fraction whose denominator divides {batch}, e.g. {near:.10g}"
            raise ValueError(f"--flow-matching-fraction {self.flow_matching_fraction} runs the JVP on {k} of "
                             f"every {block} rows, so the batch per process ({batch}) must be a multiple of "
                             f"{block}: change the batch{other}")


class Noise(NamedTuple):
    """Every random draw of one training step (shapes: (B,) times, x0-shaped noises)."""

    s: torch.Tensor  # diffusion time in (0, 1]
    xi: torch.Tensor  # forward-process noise: x_s = alpha_s x_0 + sigma_s xi
    r: torch.Tensor  # flow times r <= t; r = t exactly outside the JVP rows (ObjectiveConfig.jvp_block)
    t: torch.Tensor
    e: torch.Tensor  # flow prior sample: z_t = (1 - t) x_0 + t e


def _logit_normal(b: int, mean: float, std: float, generator: torch.Generator, device) -> torch.Tensor:
    return torch.sigmoid(torch.randn(b, generator=generator, device=device) * std + mean)


def _pair(b: int, cfg: ObjectiveConfig, generator: torch.Generator, device):
    pair = torch.sigmoid(torch.randn(b, 2, generator=generator, device=device) * cfg.time_std + cfg.time_mean)
    return pair.max(dim=1).values, pair.min(dim=1).values


def _law_flow_times(b: int, cfg: ObjectiveConfig, generator: torch.Generator, device):
    if cfg.time_sampler == "pair":
        return _pair(b, cfg, generator, device)
    t_sep = _logit_normal(b, cfg.time_mean, cfg.time_std, generator, device)
    r_sep = torch.minimum(_logit_normal(b, cfg.r_mean, cfg.r_std, generator, device), t_sep)
    if cfg.time_sampler == "separate":
        return t_sep, r_sep
    t_pair, r_pair = _pair(b, cfg, generator, device)
    use_sep = torch.rand(b, generator=generator, device=device) < cfg.mixture_weight
    return torch.where(use_sep, t_sep, t_pair), torch.where(use_sep, r_sep, r_pair)


@functools.lru_cache(maxsize=16)
def device_constant(values: tuple, device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor, copied to the device once: torch.tensor(..., device=cuda) in every step is a
    host-to-device copy that waits for the GPU, so the CPU could no longer queue the next step ahead."""
    return torch.tensor(values, device=device, dtype=dtype)


def sample_flow_times(b: int, cfg: ObjectiveConfig, generator: torch.Generator, device=None):
    """(t, r), r <= t, for b rows from cfg.time_sampler, or on cfg.flow_grid_fraction of them a step of a
    flow grid (r = t is applied afterwards, by draw_noise)."""
    t, r = _law_flow_times(b, cfg, generator, device)
    if not cfg.flow_grid_fraction:  # no draws: the runs before the flow grid keep their random streams
        return t, r
    steps = device_constant(cfg.flow_grid_steps, device, t.dtype)
    m = steps[torch.randint(len(steps), (b,), generator=generator, device=device)]
    j = torch.floor(torch.rand(b, generator=generator, device=device) * m)  # 0..M-1
    on_grid = torch.rand(b, generator=generator, device=device) < cfg.flow_grid_fraction
    return torch.where(on_grid, 1 - j / m, t), torch.where(on_grid, 1 - (j + 1) / m, r)


def sample_diffusion_times(b: int, cfg: ObjectiveConfig, generator: torch.Generator, device=None) -> torch.Tensor:
    """s in (0, 1] for b rows from cfg.s_sampler."""
    s = 1.0 - torch.rand(b, generator=generator, device=device)  # U(0, 1]
    if cfg.s_sampler == "uniform":
        return s
    steps = device_constant(cfg.s_grid_steps, device, s.dtype)
    n = steps[torch.randint(len(steps), (b,), generator=generator, device=device)]
    k = torch.floor(torch.rand(b, generator=generator, device=device) * n) + 1  # 1..N
    on_grid = torch.rand(b, generator=generator, device=device) < cfg.s_grid_fraction
    return torch.where(on_grid, grid_points(k / n, cfg.s_grid), s)


def draw_noise(x0: torch.Tensor, cfg: ObjectiveConfig, generator: torch.Generator) -> Noise:
    """Draw s (cfg.s_sampler), (r, t) (cfg.time_sampler) for every row, then set r = t outside
    the JVP rows: the first k rows of every block of P (cfg.jvp_block) keep their r < t. Which rows
    is fixed, how many is exact: the rows of a batch are exchangeable draws of the data, so each row
    still has r < t with probability k / P and the law's (r, t) when it does. xi, e ~ N(0, I)."""
    b, dev = x0.shape[0], x0.device
    s = sample_diffusion_times(b, cfg, generator, dev)
    t, r = sample_flow_times(b, cfg, generator, dev)
    r = torch.where(jvp_rows(b, cfg, dev), r, t)
    xi = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    e = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    return Noise(s, xi, r, t, e)


def jvp_rows(batch: int, cfg: ObjectiveConfig, device=None) -> torch.Tensor:
    """(batch,) bool: the rows drawn with r < t, the first k of every block of P (cfg.jvp_block)."""
    k, block = cfg.jvp_block
    return torch.arange(batch, device=device) % block < k


def _times(t, h, s) -> torch.Tensor:
    """The network's time input: (t, t - r) or, given s, (t, t - r, s)."""
    return torch.stack([t, h] if s is None else [t, h, s], dim=1)


def meanflow_jvp(net, x0, noise: Noise, cond, s):
    """u(z_t, r, t | cond, s) and du/dt by one torch.func.jvp, with v = e - x_0 and h = t - r:
    what the STMD (cond = x_s, s given) and Mean Flow (cond = s = None) targets are made of."""
    t, r = noise.t, noise.r
    tb = per_sample(t, x0)
    z_t = (1 - tb) * x0 + tb * noise.e
    v = noise.e - x0
    h = t - r

    def u_fn(z, t_, h_):  # x_s and s are closed over: held fixed under the JVP
        return net(z, cond, _times(t_, h_, s))

    # Tangents (v, 0, 1) for (z, r, t) are (v, 1, 1) for (z, t, h = t - r).
    ones = torch.ones_like(t)
    u, dudt = torch.func.jvp(u_fn, (z_t, t, h), (v, ones, ones))
    return u, dudt, v, h


def split_meanflow(net, x0, noise: Noise, cond, s, cfg: ObjectiveConfig):
    """meanflow_jvp's (u, du/dt, v, h) for the whole batch with the JVP on the JVP rows only
    (cfg.jvp_block) and a plain forward on the rows with r = t, where the target
    v - (t - r) du/dt = v needs no du/dt (returned as 0 there). Per-row networks make this the
    full-batch JVP's u on every row and its du/dt wherever t - r != 0: the same loss and gradients."""
    k, block = cfg.jvp_block
    b = x0.shape[0]
    cfg.check_batch(b)
    if k == block:  # every row needs du/dt
        return meanflow_jvp(net, x0, noise, cond, s)
    n = b // block

    def rows(x, first: bool):  # the JVP rows (first) or the others, as a batch; shapes are static
        if x is None:
            return None
        x = x.unflatten(0, (n, block))
        return (x[:, :k] if first else x[:, k:]).flatten(0, 1)

    def interleave(a, rest):  # inverse of rows(): back to the batch's order
        return torch.cat([a.unflatten(0, (n, k)), rest.unflatten(0, (n, block - k))], dim=1).flatten(0, 1)

    v, h = noise.e - x0, noise.t - noise.r
    # The JVP before the plain forward: torch 2.14's Dynamo failed to trace torch.func.jvp after a
    # plain call of the same network (no dual level at make_dual) and silently ran the loss eagerly.
    if k > 0:
        u_j, dudt_j, _, _ = meanflow_jvp(net, rows(x0, True), Noise(*(rows(x, True) for x in noise)),
                                         rows(cond, True), rows(s, True))
    x_f, t_f = rows(x0, False), rows(noise.t, False)
    tb = per_sample(t_f, x_f)
    u_f = net((1 - tb) * x_f + tb * rows(noise.e, False), rows(cond, False), _times(t_f, rows(h, False), rows(s, False)))
    if k == 0:  # flow matching on every row
        return u_f, torch.zeros_like(u_f), v, h
    return interleave(u_j, u_f), interleave(dudt_j, dudt_j.new_zeros(u_f.shape)), v, h


def _jvp_meanflow(net, x0, noise: Noise, cfg: ObjectiveConfig, cond, s, full_batch_jvp: bool):
    """Shared body of STMD (cond = x_s, s given) and Mean Flow (cond = s = None)."""
    if full_batch_jvp:
        u, dudt, v, h = meanflow_jvp(net, x0, noise, cond, s)
    else:
        u, dudt, v, h = split_meanflow(net, x0, noise, cond, s, cfg)
    # u_tgt = stopgrad(v - (t - r) du/dt); loss = mean(stopgrad(w) ||u - u_tgt||^2), w = 1 / (. + c)^p.
    # Returns the raw mean ||delta||^2 too: the adaptive loss moves slowly by design (~1 at p = 1).
    loss, sq = meanflow_loss(u, dudt, v, h, cfg.adaptive_c, cfg.adaptive_p)  # fused kernel on CUDA
    return loss, sq.mean()


def _diffuse(x0: torch.Tensor, noise: Noise) -> torch.Tensor:
    """x_s = alpha_s x_0 + sigma_s xi."""
    alpha, sigma = alpha_sigma(noise.s, x0.dtype)
    return per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * noise.xi


def _stmd_loss(net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig, full_batch_jvp: bool = False):
    return _jvp_meanflow(net, x0, noise, cfg, _diffuse(x0, noise), noise.s, full_batch_jvp)


def _meanflow_loss(net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig, full_batch_jvp: bool = False):
    return _jvp_meanflow(net, x0, noise, cfg, None, None, full_batch_jvp)


def _ddpm_loss(net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig, full_batch_jvp: bool = False):
    eps = net(_diffuse(x0, noise), None, noise.s[:, None])
    dtype = torch.promote_types(eps.dtype, torch.float32)  # bf16 outputs: the error in fp32
    mse = F.mse_loss(eps.to(dtype), noise.xi.to(dtype))
    return mse, mse.detach()


LOSSES = {"stmd": _stmd_loss, "meanflow": _meanflow_loss, "ddpm": _ddpm_loss}  # Method.loss


def compute_loss(method: str, net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig,
                 full_batch_jvp: bool = False):
    """Loss of one batch; returns (loss, raw_error) where raw_error is the mean ||delta||^2
    (STMD, Mean Flow) or the eps mean squared error (DDPM). The JVP runs on the rows with r < t
    only (split_meanflow); full_batch_jvp runs it on every row instead, as the official Mean Flow
    code does: the same loss and gradients, more work (the reference the tests and benchmarks use)."""
    check_noise(x0, noise)
    return get_method(method).loss(net, x0, noise, cfg, full_batch_jvp)


def check_noise(x0: torch.Tensor, noise: Noise) -> None:
    """ValueError unless the noise was drawn for this batch (draw_noise(x0, ...)): noise of another batch size
    failed in a broadcast deep in the loss. Shapes only: free under torch.compile (no device sync)."""
    for name, value in zip(noise._fields, noise):
        want = x0.shape if value.dim() > 1 else x0.shape[:1]
        if value.shape != want:
            raise ValueError(f"noise.{name} is {tuple(value.shape)}, for a batch x0 of {tuple(x0.shape)} it must be "
                             f"{tuple(want)}: draw the noise for this batch, draw_noise(x0, cfg, generator)")


def flow_matching_loss(method: str, net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig | None = None):
    """The plain (conditional) flow-matching step of the same network: u(z_t, r = t) regressed
    on v = e - x_0, no JVP. What the Mean Flow objective reduces to at r = t; the benchmarks
    time it beside compute_loss to measure what the JVP costs. cfg is not read: it is taken so that this
    stands in for compute_loss in a partial(loss, method, net, cfg=...)."""
    if not get_method(method).flow:
        raise ValueError(f"flow matching is the r = t step of stmd or meanflow, not of {method!r}")
    check_noise(x0, noise)
    t = noise.t
    tb = per_sample(t, x0)
    z_t = (1 - tb) * x0 + tb * noise.e
    cond, s = (_diffuse(x0, noise), noise.s) if get_method(method).conditional else (None, None)
    u = net(z_t, cond, _times(t, torch.zeros_like(t), s))
    mse = F.mse_loss(u.float(), (noise.e - x0).float())
    return mse, mse.detach()
