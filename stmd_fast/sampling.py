"""Algorithm 2 (math.md section 5): N diffusion steps x M flow steps, and its baselines.

One loop serves all three methods; only the way x0_hat is made differs:
  stmd      x0_hat ~ p(x_0 | x_s) by M steps of the conditional flow map from fresh noise;
  ddpm      x0_hat = E[x_0 | x_s] = (x_s - sigma_s eps) / alpha_s, one call;
  meanflow  x0_hat by M steps of the unconditional flow map (ignores x_s: exact at s = 1).
Then the exact bridge q(x_{s'} | x_s, x0_hat) draws the next state. Every step draws
fresh noise from `generator`. Inpainting (section 7) is a projection of x0_hat.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import alpha_sigma, bridge_sample, time_grid

Projection = Callable[[torch.Tensor], torch.Tensor]


def _randn(shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)


def flow_map(net, z: torch.Tensor, cond: torch.Tensor | None, s: float | None, flow_steps: int) -> torch.Tensor:
    """M Mean Flow steps from t = 1 to t = 0: z <- z - (t_j - t_{j+1}) u(z, r=t_{j+1}, t=t_j | cond, s)."""
    b = z.shape[0]
    for j in range(flow_steps):
        t, t_next = 1 - j / flow_steps, 1 - (j + 1) / flow_steps
        times = [t, t - t_next] if s is None else [t, t - t_next, s]
        times = torch.tensor(times, device=z.device, dtype=torch.float32).expand(b, -1)
        z = z - (t - t_next) * net(z, cond, times).to(z.dtype)
    return z


def denoise(net, method: str, x: torch.Tensor, s: float, flow_steps: int, generator: torch.Generator) -> torch.Tensor:
    """x0_hat for a batch x at diffusion time s: a posterior sample (stmd, meanflow) or mean (ddpm)."""
    if method == "stmd":
        return flow_map(net, _randn(x.shape, generator, x.dtype), x, s, flow_steps)
    if method == "meanflow":
        return flow_map(net, _randn(x.shape, generator, x.dtype), None, None, flow_steps)
    if method == "ddpm":
        alpha, sigma = alpha_sigma(torch.tensor(s, dtype=torch.float64), x.dtype)
        eps = net(x, None, torch.full((x.shape[0], 1), s, device=x.device)).to(x.dtype)
        return (x - sigma.item() * eps) / alpha.item()
    raise ValueError(f"unknown method {method!r}")


def check_steps(method: str, steps: int, flow_steps: int) -> None:
    """Refuse (N, M) settings a method cannot take, before any network call."""
    if steps < 1 or flow_steps < 1:
        raise ValueError(f"need steps >= 1 and flow_steps >= 1, got N={steps}, M={flow_steps}")
    if method == "ddpm" and flow_steps != 1:
        raise ValueError("DDPM makes x0_hat in one network call: use flow_steps=1 (NFE = steps)")
    if method == "meanflow" and steps != 1:
        raise ValueError("Mean Flow has no diffusion steps: use steps=1 and set flow_steps (NFE = flow_steps)")


def nfe(method: str, steps: int, flow_steps: int) -> int:
    """Network evaluations per sample: STMD N*M, DDPM N, Mean Flow M."""
    return {"stmd": steps * flow_steps, "ddpm": steps, "meanflow": flow_steps}[method]


@torch.no_grad()
def transition(net, method: str, x: torch.Tensor, s_from: float, s_to: float, flow_steps: int,
               generator: torch.Generator, project: Projection | None = None) -> torch.Tensor:
    """Draw x_{s_to} ~ p(x_{s_to} | x_{s_from} = x) for a batch: x0_hat, then the exact bridge.

    For DDPM this is the posterior-mean bridge step (exact only for small steps)."""
    if not 0.0 <= s_to < s_from <= 1.0:
        raise ValueError(f"a transition needs 0 <= s_to < s_from <= 1, got s_from={s_from}, s_to={s_to}")
    x0_hat = denoise(net, method, x, s_from, flow_steps, generator)
    if project is not None:
        x0_hat = project(x0_hat)
    return bridge_sample(x, x0_hat, s_from, s_to, generator)


@torch.no_grad()
def sample(net, method: str, num: int, data_shape: tuple[int, ...], steps: int, flow_steps: int,
           generator: torch.Generator, grid: str = "uniform", project: Projection | None = None) -> torch.Tensor:
    """Algorithm 2: x ~ N(0, I) at s = 1, then N transitions down the grid to s = 0.

    Returns `num` samples on the generator's device. NFE per sample: see nfe()."""
    check_steps(method, steps, flow_steps)
    x = _randn((num, *data_shape), generator)
    if method == "meanflow":
        x0 = flow_map(net, x, None, None, flow_steps)
        return project(x0) if project is not None else x0
    s_grid = time_grid(steps, grid).tolist()
    for s_from, s_to in zip(s_grid[:-1], s_grid[1:]):
        x = transition(net, method, x, s_from, s_to, flow_steps, generator, project)
    return x


def inpainting_projection(observed: torch.Tensor, mask: torch.Tensor) -> Projection:
    """DDNM projection for a mask A = m: x0 <- m * y + (1 - m) * x0 (m = 1 observed)."""
    try:
        fits = torch.broadcast_shapes(mask.shape, observed.shape) == observed.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit the observation {tuple(observed.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("the mask must be 0 (missing) or 1 (observed): observed pixels are kept exactly")
    m = mask.to(observed.dtype)
    known = m * observed

    def project(x0: torch.Tensor) -> torch.Tensor:
        return known + (1 - m) * x0

    return project
