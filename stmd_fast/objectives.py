"""Training objectives (math.md sections 4 and 6): STMD, Mean Flow, DDPM.

Each objective is split in two so the hot path compiles and stays reproducible:
  draw_noise(x0, cfg, generator) -> Noise      eager, every random number of the step;
  compute_loss(method, net, x0, noise, cfg)    a pure function of tensors (what --compile
                                                compiles; Inductor would otherwise replace
                                                torch.randn with its own generator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kernels.meanflow_loss import meanflow_loss
from .methods import METHODS, get_method  # noqa: F401 (METHODS: importable from here too)
from .schedule import alpha_sigma, per_sample


@dataclass
class ObjectiveConfig:
    """Time sampling and loss weighting (Mean Flow's defaults)."""

    time_mean: float = -0.4
    """Mean of the logit-normal draws of (r, t)."""
    time_std: float = 1.0
    """Std of the logit-normal draws of (r, t)."""
    flow_matching_fraction: float = 0.75
    """Fraction of the batch with r = t (there the loss is conditional flow matching)."""
    adaptive_p: float = 1.0
    """Adaptive weight w = 1 / (||delta||^2 + c)^p; p = 0 gives the plain squared error."""
    adaptive_c: float = 1e-3
    """The c of the adaptive weight."""

    def __post_init__(self):
        if not 0.0 <= self.flow_matching_fraction <= 1.0:
            raise ValueError(f"flow_matching_fraction must be in [0, 1], got {self.flow_matching_fraction}")
        if self.time_std <= 0 or self.adaptive_c <= 0 or self.adaptive_p < 0:
            raise ValueError("need time_std > 0, adaptive_c > 0 and adaptive_p >= 0")


class Noise(NamedTuple):
    """Every random draw of one training step (shapes: (B,) times, x0-shaped noises)."""

    s: torch.Tensor  # diffusion time, U(0, 1]
    xi: torch.Tensor  # forward-process noise: x_s = alpha_s x_0 + sigma_s xi
    r: torch.Tensor  # flow times r <= t
    t: torch.Tensor
    e: torch.Tensor  # flow prior sample: z_t = (1 - t) x_0 + t e


def draw_noise(x0: torch.Tensor, cfg: ObjectiveConfig, generator: torch.Generator) -> Noise:
    """Draw s ~ U(0, 1], xi, e ~ N(0, I) and logit-normal (r, t), r = t on a fraction of the batch."""
    b, dev = x0.shape[0], x0.device
    s = 1.0 - torch.rand(b, generator=generator, device=dev)  # (0, 1]
    logits = torch.randn(b, 2, generator=generator, device=dev) * cfg.time_std + cfg.time_mean
    pair = torch.sigmoid(logits)
    t, r = pair.max(dim=1).values, pair.min(dim=1).values
    r = torch.where(torch.rand(b, generator=generator, device=dev) < cfg.flow_matching_fraction, t, r)
    xi = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    e = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    return Noise(s, xi, r, t, e)


def meanflow_jvp(net, x0, noise: Noise, cond, s):
    """u(z_t, r, t | cond, s) and du/dt by one torch.func.jvp, with v = e - x_0 and h = t - r:
    what the STMD (cond = x_s, s given) and Mean Flow (cond = s = None) targets are made of."""
    t, r = noise.t, noise.r
    tb = per_sample(t, x0)
    z_t = (1 - tb) * x0 + tb * noise.e
    v = noise.e - x0
    h = t - r

    def u_fn(z, t_, h_):  # x_s and s are closed over: held fixed under the JVP
        times = torch.stack([t_, h_] if s is None else [t_, h_, s], dim=1)
        return net(z, cond, times)

    # Tangents (v, 0, 1) for (z, r, t) are (v, 1, 1) for (z, t, h = t - r).
    ones = torch.ones_like(t)
    u, dudt = torch.func.jvp(u_fn, (z_t, t, h), (v, ones, ones))
    return u, dudt, v, h


def _jvp_meanflow(net, x0, noise: Noise, cfg: ObjectiveConfig, cond, s):
    """Shared body of STMD (cond = x_s, s given) and Mean Flow (cond = s = None)."""
    u, dudt, v, h = meanflow_jvp(net, x0, noise, cond, s)
    # u_tgt = stopgrad(v - (t - r) du/dt); loss = mean(stopgrad(w) ||u - u_tgt||^2), w = 1 / (. + c)^p.
    # Returns the raw mean ||delta||^2 too (the adaptive loss reads ~1 by design).
    loss, sq = meanflow_loss(u, dudt, v, h, cfg.adaptive_c, cfg.adaptive_p)  # fused kernel on CUDA
    return loss, sq.mean()


def _diffuse(x0: torch.Tensor, noise: Noise) -> torch.Tensor:
    """x_s = alpha_s x_0 + sigma_s xi."""
    alpha, sigma = alpha_sigma(noise.s, x0.dtype)
    return per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * noise.xi


def _stmd_loss(net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig):
    return _jvp_meanflow(net, x0, noise, cfg, cond=_diffuse(x0, noise), s=noise.s)


def _meanflow_loss(net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig):
    return _jvp_meanflow(net, x0, noise, cfg, cond=None, s=None)


def _ddpm_loss(net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig):
    mse = F.mse_loss(net(_diffuse(x0, noise), None, noise.s[:, None]).float(), noise.xi.float())
    return mse, mse.detach()


LOSSES = {"stmd": _stmd_loss, "meanflow": _meanflow_loss, "ddpm": _ddpm_loss}  # Method.loss


def compute_loss(method: str, net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig):
    """Loss of one batch; returns (loss, raw_error) where raw_error is the mean ||delta||^2
    (STMD, Mean Flow) or the eps mean squared error (DDPM)."""
    return get_method(method).loss(net, x0, noise, cfg)


def flow_matching_loss(method: str, net, x0: torch.Tensor, noise: Noise, cfg: ObjectiveConfig | None = None):
    """The plain (conditional) flow-matching step of the same network: u(z_t, r = t) regressed
    on v = e - x_0, no JVP. What the Mean Flow objective reduces to at r = t; the benchmarks
    time it beside compute_loss to measure what the JVP costs."""
    if not get_method(method).flow:
        raise ValueError(f"flow matching is the r = t step of stmd or meanflow, not of {method!r}")
    t = noise.t
    tb = per_sample(t, x0)
    z_t = (1 - tb) * x0 + tb * noise.e
    zero = torch.zeros_like(t)
    if get_method(method).conditional:
        u = net(z_t, _diffuse(x0, noise), torch.stack([t, zero, noise.s], dim=1))
    else:
        u = net(z_t, None, torch.stack([t, zero], dim=1))
    mse = F.mse_loss(u.float(), (noise.e - x0).float())
    return mse, mse.detach()
