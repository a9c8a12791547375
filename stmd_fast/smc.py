"""Sequential Monte Carlo posterior sampling for y = A x_0 + sigma_y n over Algorithm 2's loop.

Target: p(x_0 | y) proportional to p(x_0) N(y; A x_0, sigma_y^2 I), where p(x_0) is the law of the
model's own sampler. K particles per observation run the N x M loop; the learned transition
is the proposal. At step k (state x_{s_k}) a particle draws x0_hat_k (STMD: a sample of
p(x_0 | x_{s_k}); DDPM: the posterior mean; Mean Flow: its one x_0) and then the bridge
x_{s_{k-1}} ~ q(. | x_{s_k}, x0_hat_k). Between the two the particles are weighted by a
potential of x0_hat and resampled when the effective sample size falls.

Why the weights are right. Take x0_hat_k into the state, so that the model's path is
  p(x_1) prod_k p(x0_hat_k | x_{s_k}) q(x_{s_{k-1}} | x_{s_k}, x0_hat_k),   with x_0 = x0_hat_1.
Define the intermediate targets gamma_k = (path up to x0_hat_k) x G_k(x0_hat_k) with the tempered
likelihood G_k = N(y; A x0_hat_k, (sigma_y^2 + rho^2(s_k)) I), its variance inflated by
rho^2 = temper(s_k) (default sigma_s^2 / alpha_s^2: flat at s = 1, vanishing at the data), for k > 1,
and the exact G_1 = N(y; A x0_hat_1, sigma_y^2 I) on the last step. Since the proposal is the model's
own transition, it cancels in gamma_k / (gamma_{k+1} x proposal) and the incremental weight is
G_k(x0_hat_k) / G_{k+1}(x0_hat_{k+1}) (G_{N+1} = 1). The product telescopes to G_1(x0_hat_1) =
N(y; A x_0, sigma_y^2 I): the final target is the model's path law times the exact likelihood,
whose x_0-marginal is p_model(x_0 | y). Any positive G_k keeps this; the tempering only decides
where resampling spends its particles, and keeps the ratios G_k / G_{k+1} tame (an exponent
tempering L^lambda made them heavy-tailed: tiny intermediate likelihoods of a random x0_hat,
divided out later). With systematic resampling (unbiased) this is a standard SMC sampler
(Del Moral 2004), so weighted averages over the K particles converge to posterior expectations as K -> infinity (errors
O(1/sqrt K) for bounded test functions), at ANY step count N; and the running product of the
mean incremental weights is an unbiased estimate of the evidence p_model(y).

So the sampler is exact in the limit exactly when the model's transitions are: STMD's sampled
x0_hat draws the true p(x_0 | x_s) (up to training error), while DDPM's mean x0_hat makes its
chain's p_model(x_0) differ from the data law for large steps, and no number of particles
removes that bias. (For STMD, N(y; A x0_hat_k, .) is also an unbiased one-sample estimate of
the look-ahead potential E[N(y; A x_0, .) | x_{s_k}], the ideal one at rho = 0.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .methods import get_method
from .operators import LinearOperator, check_sigma_y
from .sampling import Step, _randn, _x0_hat, bridge, make_step, sampler_plan
from .schedule import alpha_sigma

Denoiser = Callable[[torch.Tensor, Step, torch.Generator], torch.Tensor]
"""x0_hat for a batch of states x at step.s_from: (x, step, generator) -> x0_hat."""


def noise_to_signal(s: float) -> float:
    """rho^2(s) = sigma_s^2 / alpha_s^2: the variance of x_0 given x_s under a flat prior. Added to
    sigma_y^2 in the intermediate likelihoods, it flattens them where x0_hat says little (at s = 1,
    rho^2 = 2.3e4: DDPM's x0_hat there divides by alpha_1 = 0.007) and vanishes towards the data."""
    alpha, sigma = alpha_sigma(torch.tensor(s, dtype=torch.float64), torch.float64)
    return float(sigma**2 / alpha**2)


@dataclass
class SMCResult:
    particles: torch.Tensor
    """(G, K, *data_shape): the final particles x_0 of each of G observations."""
    weights: torch.Tensor
    """(G, K): their normalised weights (float64); sum_i w_i f(x_i) estimates E[f(x_0) | y]."""
    log_evidence: torch.Tensor
    """(G,): log of the unbiased estimate of p_model(y) (the product of mean incremental weights)."""
    ess: torch.Tensor
    """(steps, G): effective sample size after each step's weighting, before any resampling."""
    resampled: torch.Tensor
    """(steps, G): whether each step resampled."""

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """One particle per observation picked by its weight: (G, *data_shape). Its law tends to
        p_model(x_0 | y) as K grows (one draw per run: the K particles of a run are dependent)."""
        pick = torch.multinomial(self.weights.cpu(), 1, generator=_cpu(generator)).squeeze(1).to(self.particles.device)
        return self.particles[torch.arange(len(pick), device=pick.device), pick]


def _cpu(generator: torch.Generator) -> torch.Generator | None:
    """multinomial on CPU weights needs a CPU generator; draw its seed from the given one."""
    if generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def ess(weights: torch.Tensor) -> torch.Tensor:
    """Effective sample size 1 / sum_i w_i^2 of normalised weights (G, K) -> (G,)."""
    return 1.0 / (weights**2).sum(-1)


def systematic_indices(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Systematic resampling with given offsets u in [0, 1), (G, 1): particle j takes the index i whose
    cumulative-weight interval [C_{i-1}, C_i) holds (u + j) / K. Each index i appears floor(K w_i) or
    ceil(K w_i) times, and K w_i times on average over u ~ U[0, 1). weights: (G, K) normalised."""
    k = weights.shape[1]
    positions = (u.double() + torch.arange(k, dtype=torch.float64, device=weights.device)) / k
    cumulative = weights.double().cumsum(-1)
    # rounding may leave the last cumulative weight just under 1: clamp to a valid index
    return torch.searchsorted(cumulative, positions, right=True).clamp_max(k - 1)


def systematic_resample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """systematic_indices with one u ~ U[0, 1) per row: (G, K) indices."""
    u = torch.rand(weights.shape[0], 1, generator=generator, dtype=torch.float64, device=weights.device)
    return systematic_indices(weights, u)


def network_denoiser(net, method: str, flow_steps: int) -> Denoiser:
    """The sampler's own x0_hat (sampling._x0_hat), drawing the flow noise z from the generator."""
    def denoise(x: torch.Tensor, step: Step, generator: torch.Generator) -> torch.Tensor:
        z = _randn(x.shape, generator, x.dtype) if get_method(method).flow else None
        return _x0_hat(net, method, x, step, flow_steps, z)

    return denoise


@torch.no_grad()
def smc_sample(denoise: Denoiser, method: str, operator: LinearOperator, y: torch.Tensor, sigma_y: float,
               particles: int, data_shape: tuple[int, ...], steps: int, flow_steps: int, generator: torch.Generator,
               grid: str = "uniform", ess_threshold: float = 0.5,
               temper: Callable[[float], float] = noise_to_signal) -> SMCResult:
    """SMC posterior sampling (see the module docstring) for G observations y: (G, *measurement_shape),
    K = `particles` per observation, over the (method, N, M, grid) loop of Algorithm 2.

    temper(s) -> rho^2 >= 0: the intermediate likelihood at step s is N(y; A x0_hat, (sigma_y^2 + rho^2) I)
    (the last step's is exact). Resamples (systematically) the steps where ESS < ess_threshold * K
    (0: never, 1: always); the final particles keep their weights (SMCResult.draw picks by them)."""
    check_sigma_y(sigma_y)
    if not sigma_y > 0:
        raise ValueError(f"SMC weights by the likelihood N(y; A x, sigma_y^2 I): need sigma_y > 0, got {sigma_y} "
                         f"(for noiseless y use the DDNM projection)")
    if particles < 1:
        raise ValueError(f"need particles >= 1, got {particles}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold is a fraction of K in [0, 1], got {ess_threshold}")
    operator.check(tuple(data_shape))
    measured = tuple(operator(torch.zeros(1, *data_shape, device=y.device)).shape[1:])
    if y.ndim == 0 or tuple(y.shape[1:]) != measured:
        # a y without its batch axis would broadcast against the particles and weigh them wrongly
        raise ValueError(f"y has shape {tuple(y.shape)}; SMC takes (G, *{measured}): G observations of what "
                         f"{operator.name} makes of {tuple(data_shape)} samples (one observation: y[None])")
    plan = sampler_plan(method, steps, flow_steps, grid)
    # Mean Flow has no diffusion steps: its x0_hat is made once, from s = 1 straight to the data.
    transitions = plan.transitions or (make_step(1.0, 0.0),)
    g, k = y.shape[0], particles
    device = generator.device
    y_rows = y.to(device).repeat_interleave(k, 0)
    x = _randn((g * k, *data_shape), generator)
    log_w = torch.full((g, k), -math.log(k), dtype=torch.float64, device=device)  # normalised log weights
    log_z = torch.zeros(g, dtype=torch.float64, device=device)
    log_g_prev = torch.zeros(g, k, dtype=torch.float64, device=device)
    ess_log, resampled_log = [], []
    for step in transitions:
        x0_hat = denoise(x, step, generator)
        rho2 = 0.0 if step.bridge is None else float(temper(step.s_from))
        log_g = operator.log_likelihood(x0_hat, y_rows, math.sqrt(sigma_y**2 + rho2)).view(g, k)
        log_w = log_w + log_g - log_g_prev
        norm = torch.logsumexp(log_w, 1)
        log_z, log_w = log_z + norm, log_w - norm[:, None]
        size = ess(log_w.exp())
        ess_log.append(size)
        again = size < ess_threshold * k if step.bridge is not None else torch.zeros_like(size, dtype=torch.bool)
        resampled_log.append(again)
        if again.any():
            idx = torch.arange(k, device=device).expand(g, k).clone()
            idx[again] = systematic_resample(log_w[again].exp(), generator)
            rows = (idx + k * torch.arange(g, device=device)[:, None]).flatten()
            x, x0_hat = x[rows], x0_hat[rows]
            log_g = log_g.gather(1, idx)
            log_w = torch.where(again[:, None], torch.full_like(log_w, -math.log(k)), log_w)
        eps = None if step.bridge is None else _randn(x.shape, generator)
        x = bridge(x, x0_hat, step, eps)
        log_g_prev = log_g
    return SMCResult(x.view(g, k, *data_shape), log_w.exp(), log_z, torch.stack(ess_log), torch.stack(resampled_log))
