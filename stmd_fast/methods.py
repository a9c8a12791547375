"""The three methods (math.md): STMD and its baselines Mean Flow and DDPM, as objects that carry what
differs between them, so the rest of the package asks the method instead of comparing its name.

Light on purpose (no networks, no kernels): the sampler and `sample --exported` import it.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

MAX_STEPS = 100_000
"""The most diffusion steps N or flow steps M a sampler takes."""


@dataclass(frozen=True)
class Method:
    """What differs between STMD and its two baselines, in one place: the rest of the package asks
    the method, never its name. The sampler (sampling.py) reads `flow`, `diffusion` and
    `conditional` to make x0_hat and name its noise; the trainer reads the rest."""

    name: str
    label: str  # as the messages name it
    conditional: bool  # the network sees x_s (concatenated on channels) and s
    times: tuple[str, ...]  # the time inputs fed to the network, in order
    flow: bool  # x0_hat by M steps of a flow map from fresh noise (else the eps-prediction mean, one call)
    diffusion: bool  # takes N diffusion steps down the time grid (Mean Flow samples at s = 1 only)
    error_name: str  # what the raw error is, as metrics.jsonl names it
    default_steps: int  # N of `python -m stmd_fast.sample` without --steps

    @property
    def loss(self):
        """(net, x0, noise, cfg) -> (loss, raw error): objectives.py's loss of this method."""
        from .objectives import LOSSES  # the losses pull in the kernels; the sampler (and exported runs) do not

        return LOSSES[self.name]

    def build_net(self, net_cfg, data_shape: tuple[int, ...], dropout: float = 0.0):
        """The network this method trains and samples, for data of data_shape (per sample)."""
        from .models import build_net  # the same: only training and checkpoint loading need the networks

        return build_net(net_cfg, data_shape, self.conditional, len(self.times), dropout)

    def check_steps(self, steps: int, flow_steps: int) -> None:
        """Refuse (N, M) settings this method cannot take, before any network call."""
        for name, value in (("steps", steps), ("flow_steps", flow_steps)):  # 2.5 would end the chain off s = 0
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} must be a whole number (N or M), got {value!r}")
        if steps < 1 or flow_steps < 1:
            raise ValueError(f"need N (--steps) >= 1 and M (--flow-steps) >= 1, got N={steps}, M={flow_steps}")
        if max(steps, flow_steps) > MAX_STEPS:  # a grid that fine gains nothing, and would take days or all memory
            raise ValueError(f"N={steps}, M={flow_steps}: at most {MAX_STEPS} steps each (DDPM's finest usual grid is "
                             f"1000)")
        if not self.flow and flow_steps != 1:
            raise ValueError(f"{self.label} makes x0_hat in one network call: use M (--flow-steps) = 1, NFE = N")
        if not self.diffusion and steps != 1:
            raise ValueError(f"{self.label} has no diffusion steps: use N (--steps) = 1 and set M (--flow-steps), "
                             f"NFE = M")

    def nfe(self, steps: int, flow_steps: int) -> int:
        """Network evaluations per sample: STMD N*M, DDPM N, Mean Flow M."""
        return (steps if self.diffusion else 1) * (flow_steps if self.flow else 1)

    def grid_steps(self, cfg) -> tuple[int, int]:
        """(N, M) of the trainer's sample grids from its config (TrainConfig's sample_* fields)."""
        if not self.flow:
            return cfg.sample_ddpm_steps, 1
        return (cfg.sample_steps if self.diffusion else 1), cfg.sample_flow_steps


METHODS = {
    "stmd": Method("stmd", "STMD", True, ("t", "t - r", "s"), flow=True, diffusion=True,
                   error_name="delta_sq", default_steps=1),
    "meanflow": Method("meanflow", "Mean Flow", False, ("t", "t - r"), flow=True, diffusion=False,
                       error_name="delta_sq", default_steps=1),
    "ddpm": Method("ddpm", "DDPM", False, ("s",), flow=False, diffusion=True,
                   error_name="eps_mse", default_steps=100),
}


def get_method(name: str) -> Method:
    """METHODS[name], or a ValueError naming the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]
