"""Algorithm 2 (math.md section 5): N diffusion steps x M flow steps, and its baselines.

One loop serves all three methods; only the way x0_hat is made differs (methods.Method's
`flow`, `diffusion` and `conditional`):
  stmd      x0_hat ~ p(x_0 | x_s) by M steps of the conditional flow map from fresh noise;
  ddpm      x0_hat = E[x_0 | x_s] = (x_s - sigma_s eps) / alpha_s, one call;
  meanflow  x0_hat by M steps of the unconditional flow map (ignores x_s: exact at s = 1).
Then the exact bridge q(x_{s'} | x_s, x0_hat) draws the next state. Inverse problems (section 7)
hook in between: a Projection maps x0_hat (inpainting), a BridgeHook also sees the step and may
reshape the bridge noise (DDNM+, operators.DDNM). The SMC posterior sampler (smc.py) runs the
same pieces (_x0_hat, bridge) with weights and resampling between them.

Randomness is data: every draw of the sampler is one standard normal tensor shaped like the
batch, in a fixed order (noise_names): the start x_1, then per diffusion step the flow map's
start z_k (stmd) and the bridge's noise eps_k (all steps but the last, which lands on s = 0
exactly). sample() draws them lazily from `generator` and runs the loop (run_plan); an
exported sampler (export.py) runs the same loop on the same tensors given as an input, so
a seed gives the same samples both ways. The schedule's constants are computed once, in
float64, before the loop (sampler_plan): the loop itself is tensor arithmetic on the noise.
"""
from __future__ import annotations

import numbers

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .methods import get_method
from .schedule import alpha_sigma, bridge_coefficients, time_grid

Projection = Callable[[torch.Tensor], torch.Tensor]


def _randn(shape, generator: torch.Generator, dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device or generator.device, dtype=dtype)


@dataclass(frozen=True)
class Step:
    """One transition s_from -> s_to with its schedule constants as Python floats (values of the
    sampling dtype, so they multiply exactly like the 0-dim tensors they were computed as)."""

    s_from: float
    s_to: float
    alpha: float
    """alpha_{s_from} (DDPM's x0_hat)."""
    sigma: float
    """sigma_{s_from} (DDPM's x0_hat)."""
    bridge: tuple[float, float, float] | None
    """(c_xs, c_x0, tau) of q(x_{s_to} | x_{s_from}, x0_hat); None at s_to = 0, where the bridge
    is a point mass at x0_hat (returned exactly, so an inpainting projection survives)."""


def make_step(s_from: float, s_to: float, dtype: torch.dtype = torch.float32) -> Step:
    s, s_prev = torch.tensor(s_from, dtype=torch.float64), torch.tensor(s_to, dtype=torch.float64)
    alpha, sigma = alpha_sigma(s, dtype)
    bridge = None if s_to == 0.0 else tuple(c.item() for c in bridge_coefficients(s, s_prev, dtype))
    return Step(s_from, s_to, alpha.item(), sigma.item(), bridge)


@dataclass(frozen=True)
class Plan:
    """Everything Algorithm 2 needs besides the network and the noise, fixed for (method, N, M, grid)."""

    method: str
    steps: int
    flow_steps: int
    grid: str
    dtype: torch.dtype
    transitions: tuple[Step, ...]
    noise_names: tuple[str, ...]
    """The noise tensors the loop consumes, in order; each is shaped like the batch."""


def sampler_plan(method: str, steps: int, flow_steps: int, grid: str = "uniform",
                 dtype: torch.dtype = torch.float32) -> Plan:
    """Check (method, N, M, grid) and compute the schedule's constants (float64 inside)."""
    m = get_method(method)
    m.check_steps(steps, flow_steps)
    s_grid = time_grid(steps, grid).tolist()
    transitions = () if not m.diffusion else tuple(
        make_step(s_from, s_to, dtype) for s_from, s_to in zip(s_grid[:-1], s_grid[1:]))
    names = ["x_1"]
    for k, step in enumerate(transitions):
        names += [f"z_{k}"] if m.flow else []
        names += [f"eps_{k}"] if step.bridge is not None else []
    return Plan(method, steps, flow_steps, grid, dtype, transitions, tuple(names))


def iter_sampler_noise(plan: Plan, num: int, data_shape: tuple[int, ...], generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The plan's noise tensors, drawn one at a time (lazily: a long DDPM chain holds one at a time)."""
    for _ in plan.noise_names:
        yield _randn((num, *data_shape), generator, plan.dtype)


def draw_sampler_noise(method: str, num: int, data_shape: tuple[int, ...], steps: int, flow_steps: int,
                       generator: torch.Generator, dtype: torch.dtype = torch.float32,
                       grid: str = "uniform") -> list[torch.Tensor]:
    """All noise tensors sample() would draw from `generator`, in its order (see noise_names):
    sample_from_noise(net, ..., draw_sampler_noise(...)) == sample(net, ..., generator)."""
    plan = sampler_plan(method, steps, flow_steps, grid, dtype)
    return list(iter_sampler_noise(plan, num, data_shape, generator))


def flow_map(net, z: torch.Tensor, cond: torch.Tensor | None, s: float | None, flow_steps: int) -> torch.Tensor:
    """M Mean Flow steps from t = 1 to t = 0: z <- z - (t_j - t_{j+1}) u(z, r=t_{j+1}, t=t_j | cond, s)."""
    b = z.shape[0]
    for j in range(flow_steps):
        t, t_next = 1 - j / flow_steps, 1 - (j + 1) / flow_steps
        values = [t, t - t_next] if s is None else [t, t - t_next, s]
        # filled on the device: torch.tensor(values, device=cuda) would copy from the host and wait per call
        times = torch.stack([z.new_full((b,), v, dtype=torch.float32) for v in values], 1)
        z = z - (t - t_next) * net(z, cond, times).to(z.dtype)
    return z


def _x0_hat(net, method: str, x: torch.Tensor, step: Step, flow_steps: int, z: torch.Tensor | None) -> torch.Tensor:
    """x0_hat at diffusion time step.s_from: flow map from the noise z (stmd, meanflow) or the mean (ddpm)."""
    m = get_method(method)
    if m.flow:  # the conditional map sees x_s and s; the unconditional one ignores x_s (exact at s = 1)
        return flow_map(net, z, x, step.s_from, flow_steps) if m.conditional else flow_map(net, z, None, None, flow_steps)
    eps = net(x, None, torch.full((x.shape[0], 1), step.s_from, device=x.device)).to(x.dtype)
    return (x - step.sigma * eps) / step.alpha


class BridgeHook:
    """A correction of x0_hat that also sees the bridge step and may reshape the bridge's noise
    (DDNM+ does both). Called as hook(x0_hat, step, eps) -> (x0_hat, eps); step is None for Mean
    Flow's single x0 (no bridge), and step.bridge and eps are None on the last step (s' = 0)."""

    def __call__(self, x0_hat: torch.Tensor, step: "Step | None", eps: torch.Tensor | None):
        raise NotImplementedError


def _correct(project, x0_hat: torch.Tensor, step: Step | None, eps: torch.Tensor | None):
    """Apply a Projection (x0_hat only) or a BridgeHook (x0_hat and the bridge noise)."""
    if project is None:
        return x0_hat, eps
    if isinstance(project, BridgeHook):
        return project(x0_hat, step, eps)
    return project(x0_hat), eps


def bridge(x: torch.Tensor, x0_hat: torch.Tensor, step: Step, eps: torch.Tensor | None) -> torch.Tensor:
    """x_{s_to} = c_xs x + c_x0 x0_hat + tau eps ~ q(x_{s_to} | x_{s_from} = x, x0_hat); x0_hat itself at s_to = 0."""
    if step.bridge is None:
        return x0_hat
    c_xs, c_x0, tau = step.bridge
    return c_xs * x + c_x0 * x0_hat + tau * eps


def _transition(net, method: str, x: torch.Tensor, step: Step, flow_steps: int, z: torch.Tensor | None,
                eps: torch.Tensor | None, project: Projection | BridgeHook | None) -> torch.Tensor:
    x0_hat, eps = _correct(project, _x0_hat(net, method, x, step, flow_steps, z), step, eps)
    return bridge(x, x0_hat, step, eps)


def run_plan(net, plan: Plan, noise: Iterable[torch.Tensor], project: Projection | BridgeHook | None = None) -> torch.Tensor:
    """Algorithm 2 on given noise: the loop behind sample() and the exported samplers.

    noise: the plan's noise tensors in order (a list, a stacked tensor, or a lazy iterator)."""
    draws, first = iter(noise), []  # x_1's shape and dtype (not x_1: a long chain holds one noise tensor at a time)

    def draw(name: str) -> torch.Tensor:
        x = next(draws, None)
        if x is None:
            raise ValueError(f"ran out of noise at {name!r}: {plan.method} with N={plan.steps} takes "
                             f"{len(plan.noise_names)} tensors ({', '.join(plan.noise_names)})")
        if first and (x.shape, x.dtype) != first[0]:  # it would broadcast: one noise shared by samples or pixels
            raise ValueError(f"noise {name!r} is {tuple(x.shape)} {x.dtype}; each noise tensor is shaped like x_1: "
                             f"{tuple(first[0][0])} {first[0][1]}")
        first[:] = first or [(x.shape, x.dtype)]
        return x

    m = get_method(plan.method)
    x = draw("x_1")
    if not m.diffusion:  # Mean Flow: x0_hat straight from x_1
        x = _correct(project, flow_map(net, x, None, None, plan.flow_steps), None, None)[0]
    for k, step in enumerate(plan.transitions):
        z = draw(f"z_{k}") if m.flow else None
        eps = draw(f"eps_{k}") if step.bridge is not None else None
        x = _transition(net, plan.method, x, step, plan.flow_steps, z, eps, project)
    if next(draws, None) is not None:
        raise ValueError(f"too much noise: {plan.method} with N={plan.steps} takes {len(plan.noise_names)} "
                         f"tensors ({', '.join(plan.noise_names)})")
    return x


def denoise(net, method: str, x: torch.Tensor, s: float, flow_steps: int, generator: torch.Generator) -> torch.Tensor:
    """x0_hat for a batch x at diffusion time s: a posterior sample (stmd, meanflow) or mean (ddpm)."""
    step = make_step(s, 0.0, x.dtype)
    z = _randn(x.shape, generator, x.dtype) if get_method(method).flow else None
    return _x0_hat(net, method, x, step, flow_steps, z)


def check_steps(method: str, steps: int, flow_steps: int) -> None:
    """Refuse (N, M) settings a method cannot take, before any network call."""
    get_method(method).check_steps(steps, flow_steps)


def nfe(method: str, steps: int, flow_steps: int) -> int:
    """Network evaluations per sample: STMD N*M, DDPM N, Mean Flow M."""
    return get_method(method).nfe(steps, flow_steps)


@torch.no_grad()
def transition(net, method: str, x: torch.Tensor, s_from: float, s_to: float, flow_steps: int,
               generator: torch.Generator, project: Projection | BridgeHook | None = None) -> torch.Tensor:
    """Draw x_{s_to} ~ p(x_{s_to} | x_{s_from} = x) for a batch: x0_hat, then the exact bridge.

    For DDPM this is the posterior-mean bridge step (exact only for small steps)."""
    s_from, s_to = check_times(s_from, s_to)
    check_generator(generator)
    step = make_step(s_from, s_to, x.dtype)
    z = _randn(x.shape, generator, x.dtype) if get_method(method).flow else None
    eps = None if step.bridge is None else _randn(x.shape, generator, x.dtype, x.device)
    return _transition(net, method, x, step, flow_steps, z, eps, project)


def check_times(s_from, s_to) -> tuple[float, float]:
    """(s_from, s_to) as floats, or an error: one diffusion time each for the whole batch, 0 <= s_to < s_from <= 1."""
    times = []
    for name, value in (("s_from", s_from), ("s_to", s_to)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number (one diffusion time for the whole batch), got {value!r}")
        times.append(float(value))
    if not 0.0 <= times[1] < times[0] <= 1.0:
        raise ValueError(f"a transition needs 0 <= s_to < s_from <= 1, got s_from={s_from}, s_to={s_to}")
    return times[0], times[1]


def check_count(name: str, value, allow_none: bool = False) -> None:
    """TypeError unless value is a whole number (or None where allowed): a float count once ended a chain off s = 0."""
    if (value is None and allow_none) or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return
    raise TypeError(f"{name} must be a whole number, got {value!r}")


def check_generator(generator) -> None:
    """TypeError unless a torch.Generator: None failed deep in the first draw ("no attribute 'device'")."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (seeded: torch.Generator().manual_seed(0)), got "
                        f"{type(generator).__name__}")


@torch.no_grad()
def sample_from_noise(net, method: str, noise: Sequence[torch.Tensor] | torch.Tensor, steps: int, flow_steps: int,
                      grid: str = "uniform", project: Projection | BridgeHook | None = None) -> torch.Tensor:
    """Algorithm 2 on given noise (draw_sampler_noise's list, or those tensors stacked on a new
    first axis); samples shaped like one noise tensor, in the network's dtype."""
    weight = next(net.parameters(), None)
    if len(noise) and weight is not None and noise[0].dtype != weight.dtype:  # else conv fails 16 frames down
        raise ValueError(f"the noise is {noise[0].dtype} and the network {weight.dtype}: give the noise in the "
                         f"network's dtype (noise.to({weight.dtype}))")
    plan = sampler_plan(method, steps, flow_steps, grid, noise[0].dtype if len(noise) else torch.float32)
    return run_plan(net, plan, noise, project)


@torch.no_grad()
def sample(net, method: str, num: int, data_shape: tuple[int, ...], steps: int, flow_steps: int,
           generator: torch.Generator, grid: str = "uniform", project: Projection | BridgeHook | None = None) -> torch.Tensor:
    """Algorithm 2: x ~ N(0, I) at s = 1, then N transitions down the grid to s = 0.

    Returns `num` samples on the generator's device. NFE per sample: see nfe()."""
    check_generator(generator)
    check_count("num", num)
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    plan = sampler_plan(method, steps, flow_steps, grid)
    return run_plan(net, plan, iter_sampler_noise(plan, num, data_shape, generator), project)


def inpainting_projection(observed: torch.Tensor, mask: torch.Tensor) -> Projection:
    """DDNM projection for a mask A = m: x0 <- m * y + (1 - m) * x0 (m = 1 observed)."""
    from .operators import Mask  # operators imports this module

    operator = Mask(mask)
    operator.check(tuple(observed.shape))
    if not mask.any():
        raise ValueError("the mask observes nothing (all 0): that is unconditional sampling, model.sample")
    operator.check_finite(observed, "the observation")
    return lambda x0: operator.project(x0, observed)
