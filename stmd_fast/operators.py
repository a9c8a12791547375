"""Linear measurement operators y = A x_0 (+ sigma_y n) with their pseudo-inverses, and the
DDNM / DDNM+ correction of x0_hat inside the sampler loop (math.md section 7).

Every operator acts on a batch (B, *data_shape) and knows the singular values s_i of A, so
that functions of them can be applied along its row space (range_scale): that is all DDNM+
needs. Four kinds:

  Mask(m)          inpainting: A = diag(m), m in {0, 1}; A^+ = A (an orthogonal projection, s = 1).
  AvgPool(f)       super-resolution by f x f average pooling; A A^T = I / f^2, so A^+ y is the
                   nearest-neighbour upsampling of y and s = 1 / f.
  Grayscale()      colorization: A x = channel mean of an RGB image (DDNM's choice); A A^T = I / 3,
                   A^+ y copies y to the three channels, s = 1 / sqrt(3).
  Matrix(A)        a generic (m, D) matrix of full row rank for vector data; A^+ and the SVD in float64.

Noise model: y = A x_0 + sigma_y n, n ~ N(0, I) in measurement space (for a mask only the
observed entries are measured: y's unobserved entries are ignored).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .sampling import BridgeHook, Step


MAX_SIGMA_Y = 1e3
"""The largest measurement noise taken: data live in about [-1, 1], so a y with more noise measures nothing,
and its squares overflow the likelihood's arithmetic long before float64 does."""

MIN_SIGMA_Y = 1e-150
"""The smallest nonzero measurement noise taken: 1 / sigma_y^2 = 1e300 leaves float64 room for a residual's squares
(below about 1e-154 it is inf, and every SMC weight NaN)."""


def check_sigma_y(sigma_y: float, flag: str = "sigma_y") -> None:
    """ValueError unless sigma_y is 0 or in [MIN_SIGMA_Y, MAX_SIGMA_Y] (NaN fails the comparison too)."""
    if not isinstance(sigma_y, numbers.Real) or isinstance(sigma_y, bool):
        raise TypeError(f"{flag} must be a number, got {sigma_y!r}")
    if not 0 <= sigma_y <= MAX_SIGMA_Y:
        raise ValueError(f"{flag} must be a number in [0, {MAX_SIGMA_Y:g}] (the data are about [-1, 1]), got {sigma_y}")
    if 0 < sigma_y < MIN_SIGMA_Y:  # the likelihood's 1 / sigma_y^2 overflows float64 (SMC's weights turn NaN)
        raise ValueError(f"{flag} {sigma_y} is too small for the likelihood's float64 arithmetic: give 0 for a "
                         f"noiseless measurement, or at least {MIN_SIGMA_Y:g}")


class LinearOperator:
    """A in y = A x for a batch x of shape (B, *data_shape); subclasses define the four maps below."""

    name = "linear"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A x: (B, *data_shape) -> (B, *measurement_shape)."""
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A^+ y: (B, *measurement_shape) -> (B, *data_shape)."""
        raise NotImplementedError

    def singular_values(self) -> torch.Tensor:
        """The distinct nonzero singular values of A (1-D), in the order range_scale takes factors."""
        raise NotImplementedError

    def range_scale(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """V diag(factors) V^T x: scale x's component along each right-singular direction of A by the factor
        of its singular value (the null-space component is dropped). factors: like singular_values()."""
        raise NotImplementedError

    def measurement_dim(self, data_shape: tuple[int, ...]) -> int:
        """Entries of y that are measured (rows of A): the dimension of the likelihood's Gaussian."""
        raise NotImplementedError

    def check(self, data_shape: tuple[int, ...]) -> None:
        """Raise a one-line ValueError if A cannot act on samples of this shape."""

    # Shared by every operator --------------------------------------------------------------------

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A x - y over the measured entries."""
        return self(x) - y

    def project(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DDNM's projection A^+ y + (I - A^+ A) x0 = x0 - A^+ (A x0 - y): A of the result is y."""
        return x0 - self.pinv(self.residual(x0, y))

    def measure(self, x0: torch.Tensor, sigma_y: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = A x0 + sigma_y n."""
        check_sigma_y(sigma_y)
        y = self(x0)
        if sigma_y > 0:
            y = y + sigma_y * self._measured(torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype))
        return y

    def _measured(self, y: torch.Tensor) -> torch.Tensor:
        """y restricted to the measured entries (all of them but for a mask)."""
        return y

    def check_finite(self, y: torch.Tensor, name: str = "y") -> None:
        """ValueError if a measured entry of y is NaN or inf: every chain would come out NaN (or SMC fail in
        its resampling). A mask's missing entries may hold anything."""
        bad = ~torch.isfinite(y) & self._is_measured(y)
        if bad.any():
            raise ValueError(f"{name} holds {int(bad.sum())} NaN or inf value(s) where it is measured: a "
                             f"measurement must be finite there")

    def _is_measured(self, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y, dtype=torch.bool)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
        """log N(y; A x, sigma_y^2 I) per batch row (B,), in float64, with its normalising constant."""
        if not sigma_y > 0:
            raise ValueError(f"the likelihood needs sigma_y > 0, got {sigma_y}")
        r = self.residual(x.double(), y.double()).flatten(1)
        dim = self.measurement_dim(tuple(x.shape[1:]))
        return -0.5 * (r**2).sum(1) / sigma_y**2 - 0.5 * dim * math.log(2 * math.pi * sigma_y**2)


class _ScaledIsometry(LinearOperator):
    """An operator with one nonzero singular value s (A A^T = s^2 I on its measurements):
    range_scale is the factor times the row-space projection A^+ A."""

    scale: float

    def singular_values(self) -> torch.Tensor:
        return torch.tensor([self.scale], dtype=torch.float64)

    def range_scale(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return float(factors[0]) * self.pinv(self(x))


class Mask(_ScaledIsometry):
    """Inpainting: A = diag(m) with m = 1 observed, 0 missing; m broadcasts over the batch (and channels)."""

    name, scale = "inpaint", 1.0

    def __init__(self, mask: torch.Tensor):
        mask = torch.as_tensor(mask)  # a numpy array or list too
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("the mask must be 0 (missing) or 1 (observed): observed pixels are kept exactly")
        if not mask.any():
            raise ValueError("the mask observes nothing (all 0): that is unconditional sampling, model.sample")
        self.mask = mask

    def check(self, data_shape):
        try:
            fits = torch.broadcast_shapes(self.mask.shape, data_shape) == tuple(data_shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask shape {tuple(self.mask.shape)} does not fit the samples {tuple(data_shape)}")

    def _m(self, x):
        return self.mask.to(x.device, x.dtype)

    def __call__(self, x):
        return self._m(x) * x

    pinv = __call__  # diag(m) is its own pseudo-inverse
    _measured = __call__

    def _is_measured(self, y):
        return self._m(y).bool().expand_as(y)

    # where, not a product: y's missing entries may hold anything (NaN too), and 0 * NaN is NaN
    def residual(self, x, y):
        return torch.where(self._m(x).bool(), x - y, 0.0)

    def project(self, x0, y):
        return torch.where(self._m(x0).bool(), y, x0)  # bit-exact on the observed entries

    def measurement_dim(self, data_shape):
        return int(self.mask.expand(data_shape).sum())


class AvgPool(_ScaledIsometry):
    """Super-resolution: A = f x f average pooling of (C, H, W) images; A^+ = nearest upsampling."""

    def __init__(self, factor: int):
        if not isinstance(factor, numbers.Integral) or isinstance(factor, bool):
            raise TypeError(f"the pooling factor must be a whole number (pixels per block side), got {factor!r}")
        if factor < 2:
            raise ValueError(f"the pooling factor must be at least 2, got {factor}")
        self.factor, self.scale, self.name = factor, 1.0 / factor, f"sr{factor}"

    def check(self, data_shape):
        if len(data_shape) != 3:
            raise ValueError(f"{self.name} pools blocks of (C, H, W) images; these samples are {tuple(data_shape)}")
        if data_shape[1] % self.factor or data_shape[2] % self.factor:
            raise ValueError(f"{self.name} pools {self.factor}x{self.factor} blocks of (C, H, W) images: "
                             f"{tuple(data_shape)} does not divide (use a factor that divides H and W)")

    def __call__(self, x):
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y):
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def measurement_dim(self, data_shape):
        return math.prod(data_shape) // self.factor**2


class Grayscale(_ScaledIsometry):
    """Colorization: A x = the mean of the three channels of an RGB image; A^+ copies y to each channel."""

    name, scale = "gray", 1 / math.sqrt(3)

    def check(self, data_shape):
        if len(data_shape) != 3 or data_shape[0] != 3:
            raise ValueError(f"gray measures RGB images (3, H, W); these samples are {tuple(data_shape)}")

    def __call__(self, x):
        return x.mean(-3, keepdim=True)

    def pinv(self, y):
        return y.expand(*y.shape[:-3], 3, *y.shape[-2:])

    def measurement_dim(self, data_shape):
        return math.prod(data_shape[1:])


class Matrix(LinearOperator):
    """A generic (m, D) matrix of full row rank acting on vectors (B, D)."""

    name = "matrix"

    def __init__(self, matrix):
        a = torch.as_tensor(matrix, dtype=torch.float64)
        if a.ndim != 2 or a.numel() == 0 or not torch.isfinite(a).all():
            raise ValueError(f"the matrix must be finite with shape (m, D), m, D >= 1, got {tuple(a.shape)}")
        if a.shape[0] > a.shape[1]:
            raise ValueError(f"the {a.shape[0]}x{a.shape[1]} matrix has more rows than the data has dimensions, "
                             f"so not full row rank (A x = y has no solution for most y): measure at most "
                             f"{a.shape[1]} combinations")
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        if s.min() <= s.max() * a.shape[1] * torch.finfo(torch.float64).eps:
            raise ValueError(f"the {a.shape[0]}x{a.shape[1]} matrix does not have full row rank: drop dependent rows")
        self.matrix, self._s, self._v = a, s, vh.T
        self._pinv = self._v @ torch.diag(1 / s) @ u.T

    def check(self, data_shape):
        if tuple(data_shape) != (self.matrix.shape[1],):
            raise ValueError(f"the matrix takes vectors of size {self.matrix.shape[1]}, the samples are {tuple(data_shape)}")

    def __call__(self, x):
        return x @ self.matrix.to(x.device, x.dtype).T

    def pinv(self, y):
        return y @ self._pinv.to(y.device, y.dtype).T

    def singular_values(self):
        return self._s

    def range_scale(self, x, factors):
        v = self._v.to(x.device, x.dtype)
        return ((x @ v) * factors.to(x.device, x.dtype)) @ v.T

    def measurement_dim(self, data_shape):
        return self.matrix.shape[0]


OPERATOR_NAMES = ("inpaint", "sr2", "sr4", "gray")


CONDITIONED_STEPS = 8
"""N of STMD's inpainting and DDNM(+) when none is given (sample, Model.inpaint and posterior_sample; evaluate
inpaint and inverse default to it too): an observation needs steps that end above s = 0 (check_conditions), and
the README's inpainting table is measured at N = 8."""


def conditions(method: str, steps: int) -> bool:
    """Whether an observation shapes the chain of a sampler without particles (inpainting, DDNM, DDNM+): only a
    step that ends above s = 0 passes it on, its corrected x0_hat bridged to the next step. With N = 1, or Mean
    Flow (no diffusion steps), the one x0_hat is an unconditional draw that inpainting and DDNM overwrite only
    where the observation measures it (DDNM+, whose correction is scaled by the bridge noise, not even there):
    the rest ignores it."""
    from .methods import get_method

    return steps >= 2 and get_method(method).diffusion


def check_conditions(method: str, steps: int, what: str = "y", steps_flag: str = "--steps",
                     smc: str = "--particles K --sigma-y S") -> None:
    """ValueError unless the observation shapes the chain (conditions), naming what to use instead in the
    caller's terms (its flag for N, its way to SMC)."""
    from .methods import get_method

    if conditions(method, steps):
        return
    why = "Mean Flow has no diffusion steps" if not get_method(method).diffusion else "N = 1 is the last step"
    raise ValueError(f"without particles {what} shapes only the steps that end above s = 0, and {why}: the samples "
                     f"would be unconditional draws with {what} pasted in where it measures them: use N >= 2 "
                     f"({steps_flag}, e.g. {CONDITIONED_STEPS}) with STMD or DDPM, or SMC ({smc})")


def make_operator(name: str, mask: torch.Tensor | None = None) -> LinearOperator:
    """The CLI's operators by name (inpaint takes the mask)."""
    if name == "inpaint":
        if mask is None:
            raise ValueError("inpaint needs a mask (1 = observed)")
        return Mask(mask)
    if name in ("sr2", "sr4"):
        return AvgPool(int(name[2:]))
    if name == "gray":
        return Grayscale()
    raise ValueError(f"unknown operator {name!r}: use one of {', '.join(OPERATOR_NAMES)}")


class DDNM(BridgeHook):
    """DDNM (sigma_y = 0) and DDNM+ (sigma_y > 0) inside Algorithm 2 (Wang et al. 2022, section 3.3).

    For A = U S V^T and the bridge x' = c_x0 x0_hat + c_xs x + tau eps:
        x0_hat <- x0_hat - V diag(lambda) V^T A^+ (A x0_hat - y)
        lambda_i = 1                            if c_x0 sigma_y / s_i <= tau
                 = tau s_i / (c_x0 sigma_y)     otherwise
    and the bridge noise keeps variance tau^2 in the null space but only
    tau^2 - (c_x0 lambda_i sigma_y / s_i)^2 along v_i, since the correction already injects
    c_x0 lambda_i sigma_y / s_i of the measurement noise there: the total stays tau^2.
    With sigma_y = 0 this is DDNM's projection A^+ y + (I - A^+ A) x0_hat at every step, the
    last included, so the output satisfies A x = y. With sigma_y > 0 the last step (tau = 0)
    takes no correction (lambda = 0): DDNM+ returns the denoiser's x0_hat there.
    """

    def __init__(self, operator: LinearOperator, y: torch.Tensor, sigma_y: float = 0.0):
        check_sigma_y(sigma_y)
        self.operator, self.y, self.sigma_y = operator, y, float(sigma_y)

    def __call__(self, x0_hat: torch.Tensor, step: Step | None = None, eps: torch.Tensor | None = None):
        op, y = self.operator, self.y
        if self.sigma_y == 0:
            return op.project(x0_hat, y), eps
        c_x0, tau = (1.0, 0.0) if step is None or step.bridge is None else (step.bridge[1], step.bridge[2])
        s = op.singular_values()
        noise = c_x0 * self.sigma_y / s  # per singular direction: the std the correction injects at lambda = 1
        lam = torch.where(noise <= tau, torch.ones_like(s), tau / noise)
        x0_hat = x0_hat - op.range_scale(op.pinv(op.residual(x0_hat, y)), lam)
        if eps is not None:
            keep = (1 - (lam * noise / tau) ** 2).clamp_min(0).sqrt()
            eps = eps + op.range_scale(eps, keep - 1)
        return x0_hat, eps
