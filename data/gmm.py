"""The gmm preset's data: a Gaussian mixture in D dims, with its exact diffusion posterior and exact
transition (math.md section 8), since both are properties of the data law. stmd_fast/gmm.py measures a
learned transition against them.

Linear algebra runs in float64 (sigma_s^2 / alpha_s^2 spans four decades over s in (0, 1]);
samples come out float32 by default, posterior quantities in the dtype of x_s.
"""
from __future__ import annotations

import math

import torch

from ..schedule import alpha_sigma, bridge_sample


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
        if not 0 < sigma_y < float("inf"):
            raise ValueError(f"the posterior of a noisy measurement needs a finite sigma_y > 0, got {sigma_y}")
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
        weights = torch.softmax(log_joint, 0)
        keep = weights > 0  # a component whose weight underflows (y far from it) holds no posterior mass
        try:
            posterior = GaussianMixture(weights[keep], means[keep], covs[keep])
        except ValueError as err:  # sigma_y so small that C_k is singular in float64 along A's rows
            raise ValueError(f"sigma_y = {sigma_y} leaves the posterior (nearly on the plane A x = y) without a "
                             f"float64 covariance ({err}): use a larger sigma_y") from None
        return posterior, float(torch.logsumexp(log_joint, 0))

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
