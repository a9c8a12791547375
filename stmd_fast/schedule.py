"""The VP diffusion (math.md sections 1-2): schedule, marginals, the exact bridge, time grids.

Diffusion time s in [0, 1]: s = 0 is data, s = 1 is noise. Everything is computed in
float64 from log alpha with expm1, because sigma_s^2 = 1 - alpha_s^2 underflows in float32
near s = 0, and cast to the caller's dtype at the end.
"""
from __future__ import annotations

import numbers

import torch

BETA_MIN, BETA_MAX = 0.1, 20.0  # linear beta(s) of Song et al. 2021


def log_alpha(s: torch.Tensor) -> torch.Tensor:
    """log alpha_s = -1/4 s^2 (b1 - b0) - 1/2 s b0, in float64 (s: a tensor, or a Python number)."""
    s = torch.as_tensor(s).double()
    return -0.25 * s**2 * (BETA_MAX - BETA_MIN) - 0.5 * s * BETA_MIN


def alpha_sigma(s: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_s, sigma_s) of the marginal x_s | x_0 ~ N(alpha_s x_0, sigma_s^2 I)."""
    la = log_alpha(s)
    return la.exp().to(dtype), (-torch.expm1(2 * la)).sqrt().to(dtype)


def bridge_coefficients(s: torch.Tensor, s_prev: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Coefficients of q(x_{s'} | x_s, x_0) = N(c_xs x_s + c_x0 x_0, tau^2 I) for s' = s_prev < s.

    Uses sigma_{s|s'}^2 = sigma_s^2 - alpha_{s|s'}^2 sigma_{s'}^2 = 1 - alpha_{s|s'}^2, which
    expm1 evaluates without cancellation. At s' = 0: c_xs = 0, c_x0 = 1, tau = 0. s, s_prev: tensors or Python
    numbers, as everywhere here.
    """
    s, s_prev = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(s_prev, dtype=torch.float64)
    la, la_prev = log_alpha(s), log_alpha(s_prev)
    if torch.any(s_prev > s):  # note: a sync point on GPU; the sampler passes CPU times
        raise ValueError("the bridge needs s_prev <= s: it steps towards the data")
    sigma2 = -torch.expm1(2 * la)
    sigma2_prev = -torch.expm1(2 * la_prev)
    # log alpha_{s|s'} in closed form: la - la_prev would cancel digits when s' is close to s
    la_step = -0.25 * (BETA_MAX - BETA_MIN) * (s - s_prev) * (s + s_prev) - 0.5 * BETA_MIN * (s - s_prev)
    sigma2_step = -torch.expm1(2 * la_step)  # sigma_{s|s'}^2
    # s = s' = 0 is 0 / 0: the bridge is then the point mass at x_0 (c_xs = 0, c_x0 = 1, tau = 0)
    at_data = sigma2 == 0
    sigma2 = torch.where(at_data, 1.0, sigma2)
    c_xs = torch.where(at_data, 0.0, la_step.exp() * sigma2_prev / sigma2)
    c_x0 = torch.where(at_data, 1.0, la_prev.exp() * sigma2_step / sigma2)
    tau = (sigma2_step * sigma2_prev / sigma2).sqrt()
    return c_xs.to(dtype), c_x0.to(dtype), tau.to(dtype)


def per_sample(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) or scalar coefficient over the trailing dimensions of x."""
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim else c


def bridge_sample(x_s: torch.Tensor, x0: torch.Tensor, s, s_prev, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw x_{s'} ~ q(x_{s'} | x_s, x_0) for s' = s_prev <= s (scalars or (B,) tensors).

    At s_prev = 0 the bridge is a point mass at x_0, and x_0 is returned exactly (so an
    inpainting projection applied to x_0 survives bit for bit).
    """
    s, s_prev = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(s_prev, dtype=torch.float64)
    if s_prev.ndim == 0 and float(s_prev) == 0.0:
        return x0
    coefficients = bridge_coefficients(s, s_prev, x_s.dtype)
    c_xs, c_x0, tau = (per_sample(c.to(x_s.device), x_s) for c in coefficients)
    noise = torch.randn(x_s.shape, generator=generator, device=x_s.device, dtype=x_s.dtype)
    return c_xs * x_s + c_x0 * x0 + tau * noise


def time_grid(steps: int, kind: str = "uniform", device=None) -> torch.Tensor:
    """Diffusion grid 1 = s_N > ... > s_0 = 0 as a float64 tensor of length steps + 1, s_N first.

    'uniform': s_k = k / N. 'quadratic': s_k = (k / N)^2, denser near the data.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:  # 2.5: a grid below 0
        raise ValueError(f"need a whole number of diffusion steps >= 1, got steps={steps!r}")
    return grid_points(torch.arange(steps, -1, -1, dtype=torch.float64, device=device) / steps, kind)


def grid_points(fraction: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """The diffusion time of grid point k / N (fraction) of a `kind` grid: one definition for the
    sampler's grids and the training s sampler that aims at them."""
    if kind == "uniform":
        return fraction
    if kind == "quadratic":
        return fraction**2
    raise ValueError(f"unknown time grid {kind!r}: use 'uniform' or 'quadratic'")


TIME_GRIDS = ("uniform", "quadratic")
