"""A Gaussian-mixture data law with its exact diffusion posterior (math.md section 8).

For p(x_0) = sum_k pi_k N(mu_k, S_k), the posterior p(x_0 | x_s) under the VP diffusion
x_s | x_0 ~ N(alpha_s x_0, sigma_s^2 I) is again a Gaussian mixture in closed form, so the
true transition p(x_{s'} | x_s) can be sampled exactly and compared with a learned one.
Also here: the two sample-based distances used for that comparison.

Linear algebra runs in float64 (sigma_s^2 / alpha_s^2 spans four decades over s in (0, 1]);
samples come out float32 by default, posterior quantities in the dtype of x_s.
"""
from __future__ import annotations

import math
import sys

import torch

from .sampling import check_steps
from .schedule import alpha_sigma, bridge_sample


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _as_time(s, name: str, low_open: bool = True) -> float:
    """A diffusion time as a Python float, checked against (0, 1] (or [0, 1])."""
    s = float(s)
    if not (0.0 < s <= 1.0 if low_open else 0.0 <= s <= 1.0):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {s}")
    return s


class GaussianMixture:
    """Data law sum_k pi_k N(mu_k, S_k) in D dims, with its exact diffusion posterior (math.md section 8)."""

    kind = "vector"  # one flat vector per sample: the 'mlp' network kind

    def __init__(self, weights, means, covs):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if weights.ndim != 1 or weights.numel() == 0:
            raise ValueError(f"weights must have shape (K,) with K >= 1, got {tuple(weights.shape)}")
        k = weights.numel()
        if means.ndim != 2 or means.shape[0] != k or means.shape[1] == 0:
            raise ValueError(f"means must have shape (K, D) = ({k}, D), got {tuple(means.shape)}")
        d = means.shape[1]
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape (K, D, D) = ({k}, {d}, {d}), got {tuple(covs.shape)}")
        if not torch.isfinite(weights).all() or (weights <= 0).any():
            raise ValueError(f"weights must be finite and > 0, got {weights.tolist()}")
        if not torch.isfinite(means).all() or not torch.isfinite(covs).all():
            raise ValueError("means and covs must be finite")
        if not torch.allclose(covs, covs.transpose(-1, -2), rtol=1e-10, atol=1e-12):
            raise ValueError("covs must be symmetric")
        chol, info = torch.linalg.cholesky_ex(covs)
        if (info != 0).any():
            bad = torch.nonzero(info).flatten().tolist()
            raise ValueError(f"covs must be positive definite; components {bad} are not")
        self.weights = weights / weights.sum()
        self.means, self.covs, self._chol = means, covs, chol

    @property
    def shape(self) -> tuple[int]:
        """Shape of one sample, without the batch: (D,)."""
        return (self.means.shape[1],)

    def to(self, device) -> "GaussianMixture":
        """Move the parameters (in place; returns self). Only a hint: every method also moves
        them to where its inputs live, since the tensors are K x D x D and the move is free."""
        for name in ("weights", "means", "covs", "_chol"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _params(self, device):
        return tuple(t.to(device) for t in (self.weights, self.means, self.covs, self._chol))

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n draws x_0 ~ sum_k pi_k N(mu_k, S_k): (n, D) on generator.device."""
        device = _device_of(generator)
        pi, mu, _, chol = self._params(device)
        k = torch.multinomial(pi, n, replacement=True, generator=generator)
        z = torch.randn(n, self.shape[0], generator=generator, device=device, dtype=torch.float64)
        return (mu[k] + (chol[k] @ z.unsqueeze(-1)).squeeze(-1)).to(dtype)

    def batch(self, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The trainer's data interface: float32 (size, D) on generator.device."""
        return self.sample(size, generator)

    def posterior(self, x_s: torch.Tensor, s: float):
        """Exact p(x_0 | x_s) = sum_k w_k N(m_k, C_k) at diffusion time s in (0, 1].

            w_k ~ pi_k N(x_s; alpha_s mu_k, alpha_s^2 S_k + sigma_s^2 I)
            C_k = (S_k^{-1} + alpha_s^2 / sigma_s^2 I)^{-1}
            m_k = C_k (S_k^{-1} mu_k + alpha_s x_s / sigma_s^2)

        x_s: (B, D). Returns w (B, K), m (B, K, D), C (K, D, D) in x_s's dtype, on its device.
        """
        s = _as_time(s, "s")
        if x_s.ndim != 2 or x_s.shape[1] != self.shape[0]:
            raise ValueError(f"x_s must have shape (B, {self.shape[0]}), got {tuple(x_s.shape)}")
        pi, mu, cov, _ = self._params(x_s.device)
        a, sig = alpha_sigma(torch.tensor(s, dtype=torch.float64), torch.float64)
        a, sig2 = a.to(x_s.device), sig.to(x_s.device) ** 2
        x = x_s.double()
        d = self.shape[0]
        eye = torch.eye(d, dtype=torch.float64, device=x.device)

        # M_k = alpha^2 S_k + sigma^2 I, the covariance of x_s given component k.
        marg = a**2 * cov + sig2 * eye
        marg_chol = torch.linalg.cholesky(marg)
        r = x.unsqueeze(1) - a * mu  # (B, K, D): x_s - alpha mu_k
        r_kdb = r.permute(1, 2, 0)  # (K, D, B), batched over components
        y = torch.linalg.solve_triangular(marg_chol, r_kdb, upper=False)
        logdet = 2 * torch.log(torch.diagonal(marg_chol, dim1=-2, dim2=-1)).sum(-1)
        log_lik = -0.5 * ((y**2).sum(1).T + logdet + d * math.log(2 * math.pi))  # (B, K)
        # Normalise in log space: far from a component its likelihood underflows in float64.
        w = torch.softmax(torch.log(pi) + log_lik, dim=1)

        # The same C_k and m_k in the Kalman form, which never inverts S_k (it may be nearly
        # singular) and stays well conditioned as sigma_s -> 0. S_k and M_k commute, so
        #   C_k = sigma^2 S_k M_k^{-1},   m_k = mu_k + alpha S_k M_k^{-1} (x_s - alpha mu_k).
        gain = torch.cholesky_solve(cov, marg_chol)  # M_k^{-1} S_k = S_k M_k^{-1}
        c = sig2 * gain
        c = 0.5 * (c + c.transpose(-1, -2))  # symmetric to rounding, for the Cholesky in sampling
        m = mu + a * (gain.transpose(-1, -2) @ r_kdb).permute(2, 0, 1)
        return w.to(x_s.dtype), m.to(x_s.dtype), c.to(x_s.dtype)

    def _posterior64(self, x_s, s):
        """posterior() in float64, whatever x_s's dtype."""
        return self.posterior(x_s.double(), s)

    def posterior_mean(self, x_s: torch.Tensor, s: float) -> torch.Tensor:
        """E[x_0 | x_s] = sum_k w_k m_k: (B, D) in x_s's dtype."""
        w, m, _ = self._posterior64(x_s, s)
        return (w.unsqueeze(-1) * m).sum(1).to(x_s.dtype)

    def posterior_sample(self, x_s: torch.Tensor, s: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw x_0 ~ p(x_0 | x_s) per row: pick k ~ w(x_s), then N(m_k, C_k).
        The generator must live on x_s's device."""
        w, m, c = self._posterior64(x_s, s)
        b = x_s.shape[0]
        k = torch.multinomial(w, 1, generator=generator).squeeze(1)
        z = torch.randn(b, self.shape[0], generator=generator, device=x_s.device, dtype=torch.float64)
        rows = torch.arange(b, device=x_s.device)
        x0 = m[rows, k] + (torch.linalg.cholesky(c)[k] @ z.unsqueeze(-1)).squeeze(-1)
        return x0.to(x_s.dtype)

    def exact_transition(self, x_s: torch.Tensor, s_from: float, s_to: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{s_to} ~ p(x_{s_to} | x_{s_from}) = int q(x_{s_to} | x_{s_from}, x_0) p(x_0 | x_{s_from}) dx_0,
        sampled exactly: x_0 ~ posterior, then the bridge. Needs 0 <= s_to <= s_from."""
        s_from, s_to = _check_step(s_from, s_to)
        x0 = self.posterior_sample(x_s, s_from, generator)
        return _bridge64(x_s, x0, s_from, s_to, generator)

    def observe(self, matrix, y, sigma_y: float) -> tuple["GaussianMixture", float]:
        """The exact posterior of a linear measurement y = A x_0 + sigma_y n (n ~ N(0, I)):

            p(x_0 | y) = sum_k w_k N(m_k, C_k),   w_k ~ pi_k N(y; A mu_k, A S_k A^T + sigma_y^2 I)
            G_k = S_k A^T (A S_k A^T + sigma_y^2 I)^{-1}
            m_k = mu_k + G_k (y - A mu_k),        C_k = S_k - G_k A S_k

        and the log evidence log p(y). matrix: (m, D); y: (m,); sigma_y > 0 (with sigma_y = 0 the
        posterior lives on the affine set A x = y and has no density in D dimensions)."""
        a = torch.as_tensor(matrix, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).flatten()
        if a.ndim != 2 or a.shape[1] != self.shape[0] or y.shape != (a.shape[0],):
            raise ValueError(f"need A of shape (m, {self.shape[0]}) and y of shape (m,), got {tuple(a.shape)} and "
                             f"{tuple(y.shape)}")
        if not sigma_y > 0:
            raise ValueError(f"the posterior of a noisy measurement needs sigma_y > 0, got {sigma_y}")
        pi, mu, cov, _ = self._params(torch.device("cpu"))
        cross = cov @ a.T  # S_k A^T: (K, D, m)
        marg = a @ cross + sigma_y**2 * torch.eye(a.shape[0], dtype=torch.float64)  # A S_k A^T + sigma^2 I
        marg_chol = torch.linalg.cholesky(marg)
        r = (y - mu @ a.T).unsqueeze(-1)  # (K, m, 1)
        white = torch.linalg.solve_triangular(marg_chol, r, upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(marg_chol, dim1=-2, dim2=-1)).sum(-1)
        log_lik = -0.5 * ((white**2).sum(-1) + logdet + a.shape[0] * math.log(2 * math.pi))
        log_joint = torch.log(pi) + log_lik
        gain = torch.cholesky_solve(cross.transpose(-1, -2), marg_chol).transpose(-1, -2)  # (K, D, m)
        means = mu + (gain @ r).squeeze(-1)
        covs = cov - gain @ cross.transpose(-1, -2)
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        return GaussianMixture(torch.softmax(log_joint, 0), means, covs), float(torch.logsumexp(log_joint, 0))

    def mean_transition(self, x_s: torch.Tensor, s_from: float, s_to: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """The best possible DDPM step: the bridge from x0_hat = E[x_0 | x_s], a Gaussian.
        It has the right mean but misses the posterior's spread (all of it, at s_to = 0)."""
        s_from, s_to = _check_step(s_from, s_to)
        x0 = self.posterior_mean(x_s, s_from)
        return _bridge64(x_s, x0, s_from, s_to, generator)


def _check_step(s_from, s_to) -> tuple[float, float]:
    s_from, s_to = _as_time(s_from, "s_from"), _as_time(s_to, "s_to", low_open=False)
    if s_to > s_from:
        raise ValueError(f"a transition steps towards the data: need s_to <= s_from, got {s_to} > {s_from}")
    return s_from, s_to


def _bridge64(x_s, x0, s_from, s_to, generator):
    """schedule.bridge_sample in float64 (its coefficients take x_s's dtype), cast back."""
    s_from, s_to = torch.tensor(s_from, dtype=torch.float64), torch.tensor(s_to, dtype=torch.float64)
    return bridge_sample(x_s.double(), x0.double(), s_from, s_to, generator).to(x_s.dtype)


def default_mixture() -> GaussianMixture:
    """The built-in 'gmm' preset: 8 equal-weight isotropic components, std 0.15, means on a
    circle of radius 1.5 in D = 2."""
    k, radius, std = 8, 1.5, 0.15
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    covs = std**2 * torch.eye(2, dtype=torch.float64).expand(k, 2, 2)
    return GaussianMixture(torch.ones(k), means, covs)


def _flat64(x) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    return x.reshape(x.shape[0], -1) if x.ndim != 1 else x.reshape(-1, 1)


def _mean_distance(x: torch.Tensor, y: torch.Tensor, within: bool, chunk_elems: int = 1 << 24) -> float:
    """Mean Euclidean |x_i - y_j| over all pairs, or over i != j when x is y (within=True).
    Row-chunked so that n x m never has to fit in memory at once."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    rows = max(1, chunk_elems // max(1, y.shape[0]))
    for start in range(0, x.shape[0], rows):
        # The direct (non-matmul) path: exact zeros on the diagonal, no cancellation.
        d = torch.cdist(x[start:start + rows], y, compute_mode="donot_use_mm_for_euclid_dist")
        total += d.sum()
    n, m = x.shape[0], y.shape[0]
    pairs = n * (n - 1) if within else n * m  # the diagonal is exactly 0, so drop it from the count
    return float(total) / pairs


def energy_distance(x, y) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean), in float64.

    The U-statistic: the within-set terms average over i != j only, which makes it unbiased,
    so it fluctuates around 0 (and can be slightly negative) when the two laws are equal.
    x: (n, ...), y: (m, ...); trailing dimensions are flattened; n, m >= 2.
    """
    x, y = _flat64(x), _flat64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("energy distance (U-statistic) needs at least 2 samples in each set")
    y = y.to(x.device)
    return 2 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)


def sliced_w2(x, y, projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 between two equal-size sample sets, in float64:
    sqrt(mean over random unit directions theta of W2^2(theta.x, theta.y)), where each 1-D W2^2
    is the mean squared difference of the sorted projections. Directions are drawn with
    `generator` (on its device) and moved to x's device."""
    x, y = _flat64(x), _flat64(y)
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2 needs equal-size sets of equal dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    theta = torch.randn(projections, x.shape[1], generator=generator, device=_device_of(generator), dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)
    # (P, n): sorting along the contiguous last dim is several times faster than along dim 0.
    px = torch.sort(theta @ x.T, dim=1).values
    py = torch.sort(theta @ y.to(x.device).T, dim=1).values
    return float(((px - py) ** 2).mean().sqrt())


def default_kernel_pairs() -> list[tuple[float, float]]:
    """The default (s_from, s_to) grid of kernel_grid: s_from in (0.2, 0.5, 0.8, 1.0),
    s_to in (0.0, 0.1, 0.3, 0.6), keeping s_to < s_from (13 pairs)."""
    return [(s_from, s_to) for s_from in (0.2, 0.5, 0.8, 1.0) for s_to in (0.0, 0.1, 0.3, 0.6) if s_to < s_from]


def _check_pairs(pairs) -> list[tuple[float, float]]:
    """(s_from, s_to) pairs as floats with 0 <= s_to < s_from <= 1, no repeats; ValueError naming a bad one."""
    checked = []
    for pair in pairs:
        try:
            s_from, s_to = (float(s) for s in pair)
        except (TypeError, ValueError):
            raise ValueError(f"a pair must be two numbers (s_from, s_to), got {pair!r}") from None
        if not 0.0 <= s_to < s_from <= 1.0:  # also refuses NaN
            raise ValueError(f"bad pair (s_from, s_to) = {pair!r}: need 0 <= s_to < s_from <= 1")
        if (s_from, s_to) in checked:
            raise ValueError(f"pair (s_from, s_to) = {pair!r} is given twice")
        checked.append((s_from, s_to))
    if not checked:
        raise ValueError("need at least one (s_from, s_to) pair")
    return checked


def _check_flow_steps(model, flow_steps) -> list[int]:
    """M values as a list of distinct ints >= 1 that the model's method takes (a bare int is one M)."""
    if isinstance(flow_steps, int):
        flow_steps = [flow_steps]
    try:
        steps = [int(m) for m in flow_steps]
    except (TypeError, ValueError):
        steps = None
    if not steps or any(isinstance(f, bool) or m != f for m, f in zip(steps, flow_steps)):
        raise ValueError(f"flow_steps must be a non-empty list of integers, got {flow_steps!r}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"flow_steps has repeats: {flow_steps!r}")
    for m in steps:
        check_steps(model.method, 1, m)  # M >= 1, and DDPM takes only M = 1: refuse before any work
    return steps


def _kernel_distances(model, mixture: GaussianMixture, s_from: float, s_to: float, flow_steps: list[int],
                      points: int, num: int, seed: int, on_state=None, sliced: bool = True) -> list[dict]:
    """kernel_grid's rows for one (s_from, s_to) pair, one per M in flow_steps (checked by the caller).

    Random streams, all seeded from `seed` alone, so a pair's numbers do not depend on which
    other pairs or M share the grid: one CPU generator draws the `points` states x_{s_from} (the
    same states for every pair with this s_from), then per state the exact reference draw, the
    model's seed, the mean-bridge draw and the independent exact draw (the floor). The model
    gets a fresh generator on its device from that seed for every M (common random numbers
    across M). Sliced W2 uses the same directions (from `seed`) for every comparison;
    sliced=False skips it (the sw2_* entries are then NaN).
    """
    g = torch.Generator().manual_seed(seed)
    alpha, sigma = (float(c) for c in alpha_sigma(torch.tensor(s_from)))
    states = alpha * mixture.sample(points, g) + sigma * torch.randn(points, *mixture.shape, generator=g)

    def distances(x, y) -> tuple[float, float]:
        sw = sliced_w2(x, y, generator=torch.Generator().manual_seed(seed)) if sliced else math.nan
        return energy_distance(x, y), sw

    base = {"energy_mean_bridge": 0.0, "energy_floor": 0.0, "sw2_mean_bridge": 0.0, "sw2_floor": 0.0}
    learned = {m: [0.0, 0.0] for m in flow_steps}
    for x in states:
        xs = x.expand(num, -1).contiguous()
        exact = mixture.exact_transition(xs, s_from, s_to, g)
        model_seed = int(torch.randint(2**31, (1,), generator=g))
        mean = mixture.mean_transition(xs, s_from, s_to, g)
        floor = mixture.exact_transition(xs, s_from, s_to, g)
        for m in flow_steps:
            out = model.transition(xs.to(model.device), s_from, s_to, flow_steps=m,
                                   generator=torch.Generator(model.device).manual_seed(model_seed))
            ed, sw = distances(out.detach().cpu(), exact)
            learned[m][0] += ed
            learned[m][1] += sw
        for name, y in (("mean_bridge", mean), ("floor", floor)):
            ed, sw = distances(y, exact)
            base[f"energy_{name}"] += ed
            base[f"sw2_{name}"] += sw
        if on_state is not None:
            on_state()
    base = {k: v / points for k, v in base.items()}
    return [{"s_from": s_from, "s_to": s_to, "flow_steps": m,
             "energy_model": learned[m][0] / points, "energy_mean_bridge": base["energy_mean_bridge"],
             "energy_floor": base["energy_floor"], "sw2_model": learned[m][1] / points,
             "sw2_mean_bridge": base["sw2_mean_bridge"], "sw2_floor": base["sw2_floor"]}
            for m in flow_steps]


def _check_sizes(points: int, num: int) -> None:
    if points < 1 or num < 2:
        raise ValueError(f"need points >= 1 and num >= 2 (energy distance is a U-statistic), got {points}, {num}")


def kernel_grid(model, mixture: GaussianMixture, pairs: list[tuple[float, float]], flow_steps: list[int],
                points: int = 8, num: int = 2000, seed: int = 0, progress: bool = True) -> list[dict]:
    """For each (s_from, s_to) with 0 <= s_to < s_from <= 1 and each M in flow_steps: energy distance
    and sliced W2 between the model's transition and the exact kernel p(x_{s_to} | x_{s_from}),
    averaged over `points` conditioning states drawn from the forward marginal at s_from (`num`
    draws each); plus the same for the exact-posterior-mean bridge (the best DDPM step; independent
    of M) and the exact-vs-exact noise floor. s_to = 0 compares posterior samples x0_hat.

    Returns one row per (pair, M), pairs outer, in the order given:
    {"s_from", "s_to", "flow_steps", "energy_model", "energy_mean_bridge", "energy_floor",
     "sw2_model", "sw2_mean_bridge", "sw2_floor"}.
    Deterministic in `seed`; a pair's numbers are the same whatever else is in the grid (and
    match transition_distances for that pair, M and seed). progress: a tqdm bar over
    pairs x states (shown on a terminal only, like the trainer's).
    """
    from tqdm import tqdm

    pairs = _check_pairs(pairs)
    flow_steps = _check_flow_steps(model, flow_steps)
    _check_sizes(points, num)
    rows = []
    with tqdm(total=len(pairs) * points, unit="state", desc="kernel grid", dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for s_from, s_to in pairs:
            bar.set_postfix_str(f"s {s_from:g} -> {s_to:g}")
            rows += _kernel_distances(model, mixture, s_from, s_to, flow_steps, points, num, seed,
                                      on_state=lambda: bar.update(1))
    return rows


def transition_distances(model, mixture: GaussianMixture, s_from: float = 0.5, s_to: float = 0.1,
                         flow_steps: int = 1, points: int = 8, num: int = 2000, seed: int = 0) -> dict:
    """Energy distances to the exact kernel p(x_{s_to} | x_{s_from}), averaged over `points`
    conditioning states x_{s_from} drawn from the forward marginal, `num` draws each:
      learned       the model's transition (stmd_fast.Model.transition) vs exact;
      mean_bridge   the best possible DDPM step (bridge with the exact posterior mean) vs exact;
      exact_floor   exact vs an independent exact draw (the sampling-noise floor).
    One cell of kernel_grid (same seed, same numbers).
    """
    (s_from, s_to), = _check_pairs([(s_from, s_to)])
    _check_sizes(points, num)
    row, = _kernel_distances(model, mixture, s_from, s_to, _check_flow_steps(model, [flow_steps]), points, num, seed,
                              sliced=False)
    return {"learned": row["energy_model"], "mean_bridge": row["energy_mean_bridge"], "exact_floor": row["energy_floor"]}


def posterior_grid(models: dict, mixture: GaussianMixture, matrix, sigma_y: float, steps: list[int],
                   particles: list[int], observations: int = 4, runs: int = 1000, flow_steps: int = 1, seed: int = 0,
                   progress: bool = True) -> list[dict]:
    """Energy distance between posterior samplers and the exact p(x_0 | y) (GaussianMixture.observe)
    for y = A x_0 + sigma_y n, averaged over `observations` y's (x_0 drawn from the mixture, seeded).

    models: label -> stmd_fast.Model (DDPM runs with M = 1, the others with flow_steps). For each model, N in `steps` and K in `particles`: SMC
    (stmd_fast.smc) with K particles, `runs` independent runs per y, one weighted draw per run;
    and DDNM+ (operators.DDNM in the sampler loop, `runs` chains). Each distance compares `runs`
    draws with `runs` exact draws; the floor row compares two exact sets, and the 'exact kernel' rows run
    SMC over the true transitions (what a perfect STMD would give at that K). Returns rows
    {"model", "method", "sampler" ('smc', 'ddnm+' or 'exact'), "N", "K", "energy"}.
    """
    from tqdm import tqdm

    from .operators import DDNM, Matrix
    from .sampling import sample
    from .smc import network_denoiser, smc_sample

    op = Matrix(matrix)
    g = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(observations, g, torch.float64)
    ys = op.measure(x0, sigma_y, g).float()
    exact = [mixture.observe(matrix, y, sigma_y)[0] for y in ys]
    truth = [post.sample(runs, torch.Generator().manual_seed(seed + 1 + i)) for i, post in enumerate(exact)]
    floor = sum(energy_distance(post.sample(runs, torch.Generator().manual_seed(seed + 10_001 + i)), t)
                for i, (post, t) in enumerate(zip(exact, truth))) / observations
    rows = [{"model": "exact", "method": "exact", "sampler": "exact", "N": None, "K": None, "energy": floor}]
    total = (len(models) + 1) * len(steps) * (len(particles) + 1) * observations
    with tqdm(total=total, unit="cell", desc="posterior grid", disable=None if progress else True) as bar:
        # SMC over the exact transitions (x0_hat ~ the true p(x_0 | x_s)): what a perfect STMD would give at each K
        for n in steps:
            for k in particles:
                energy = 0.0
                for i, y in enumerate(ys):
                    gen = torch.Generator().manual_seed(seed + 100 * i + k)
                    r = smc_sample(lambda x, step, g: mixture.posterior_sample(x, step.s_from, g), "stmd", op,
                                   y.expand(runs, -1), sigma_y, k, mixture.shape, n, 1, gen)
                    energy += energy_distance(r.draw(gen), truth[i]) / observations
                    bar.update(1)
                rows.append({"model": "exact kernel", "method": "exact", "sampler": "smc", "N": n, "K": k,
                             "energy": energy})
            bar.update(observations)
        for label, model in models.items():
            m = 1 if model.method == "ddpm" else flow_steps  # DDPM makes x0_hat in one call
            denoise = network_denoiser(model.net, model.method, m)
            for n in steps:
                check_steps(model.method, n, m)
                cells = {k: 0.0 for k in particles}
                ddnm = 0.0
                for i, y in enumerate(ys):
                    y = y.to(model.device)
                    for k in particles:
                        gen = torch.Generator(model.device).manual_seed(seed + 100 * i + k)
                        r = smc_sample(denoise, model.method, op, y.expand(runs, -1), sigma_y, k, mixture.shape, n,
                                       m, gen)
                        cells[k] += energy_distance(r.draw(gen).cpu(), truth[i]) / observations
                        bar.update(1)
                    gen = torch.Generator(model.device).manual_seed(seed + 100 * i)
                    x = sample(model.net, model.method, runs, mixture.shape, n, m, gen,
                               project=DDNM(op, y, sigma_y))
                    ddnm += energy_distance(x.cpu(), truth[i]) / observations
                    bar.update(1)
                rows += [{"model": label, "method": model.method, "sampler": "smc", "N": n, "K": k, "energy": e}
                         for k, e in cells.items()]
                rows.append({"model": label, "method": model.method, "sampler": "ddnm+", "N": n, "K": None,
                             "energy": ddnm})
    return rows


def check_gmm_model(model, run) -> None:
    """The exact kernel is known only for the built-in mixture: refuse any other model."""
    if model.meta["config"]["preset"] != "gmm" or model.meta["config"]["data"] is not None:
        raise ValueError(f"{run} was not trained on the built-in gmm preset: the exact kernel is known only for it")


def main(argv: list[str] | None = None) -> int:
    """python -m stmd_fast.gmm RUN: how close a gmm-preset model's one-step transition is to the exact one."""
    import argparse

    from .checkpoint import load_checkpoint

    p = argparse.ArgumentParser(prog="python -m stmd_fast.gmm", description=main.__doc__)
    p.add_argument("run", help="run or checkpoint directory of a model trained with --preset gmm")
    p.add_argument("--s-from", type=float, default=0.5, help="[default: 0.5]")
    p.add_argument("--s-to", type=float, default=0.1, help="[default: 0.1]")
    p.add_argument("--flow-steps", type=int, default=1, help="M of the learned transition [default: 1]")
    p.add_argument("--points", type=int, default=8, help="conditioning states x_s [default: 8]")
    p.add_argument("--num", type=int, default=2000, help="draws per state [default: 2000]")
    p.add_argument("--seed", type=int, default=0, help="[default: 0]")
    args = p.parse_args(argv)
    try:
        model = load_checkpoint(args.run)
        check_gmm_model(model, args.run)
        d = transition_distances(model, default_mixture(), args.s_from, args.s_to, args.flow_steps,
                                 args.points, args.num, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"energy distance to the exact transition s={args.s_from} -> {args.s_to} "
          f"({args.points} states x {args.num} draws):")
    print(f"  {model.method} (M={args.flow_steps}): {d['learned']:.4f}")
    print(f"  exact-posterior-mean bridge (best DDPM step): {d['mean_bridge']:.4f}")
    print(f"  exact vs exact (noise floor): {d['exact_floor']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
