"""The discretised logistic over 8-bit pixels: a logistic rounded to the nearest of 256 levels,
and the grid of levels itself (``PixelGrid``), as the integers 0..255 or as fractions k/255."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import (
    Distribution,
    constraints,
)

PIXEL_LEVELS = 256  # the values of an 8-bit pixel
# A value is on a pixel grid when it lies within this fraction of a bin of a level: float32 pixels
# divided by 255 miss their level by about 10⁻⁵ of a bin, and two levels are a whole bin apart.
GRID_TOLERANCE = 1e-3
# The floor on a logistic's scale in units of the pixel range (the top level at 1): PixelCNN++'s
# log s ≥ −7 on pixels scaled to [−1, 1] (Salimans et al. 2017, their published code), on [0, 1]:
# s ≥ e⁻⁷ / 2 ≈ 4.6·10⁻⁴, about an eighth of a level. Not to keep the likelihood bounded (a
# probability is at most 1, unlike a density) but for its gradient: as s → 0, log P turns into a
# step in the location, flat away from the level and ever steeper at the bin edges.
LOGISTIC_SCALE_FLOOR = math.exp(-7.0) / 2
# Components per pixel of "discretized-logistic-mixture": PixelCNN++ used 10 for RGB pixels with
# their channels coupled; 5 already fit the few modes of one grey value (paper ink, background,
# edges) at 15 decoder outputs per pixel.
LOGISTIC_MIXTURE_COMPONENTS = 5


class PixelGrid(constraints.Constraint):
    """The values kΔ, k = 0, …, ``levels`` − 1, within ``GRID_TOLERANCE`` of a bin: the integers
    0..255 for Δ = 1, the fractions k/255 for Δ = 1/255."""

    is_discrete = True
    event_dim = 0

    def __init__(self, bin_width: float, levels: int = PIXEL_LEVELS) -> None:
        super().__init__()
        self.bin_width = bin_width
        self.levels = levels

    def check(self, value: torch.Tensor) -> torch.Tensor:
        level = value / self.bin_width
        nearest = level.round()
        near = (level - nearest).abs() <= GRID_TOLERANCE
        return near & (nearest >= 0) & (nearest <= self.levels - 1)

    def first_outside(self, value: torch.Tensor) -> float | None:
        """A value of ``value`` off the grid, or ``None`` when all lie on it."""
        outside = ~self.check(value)
        return float(value[outside][0]) if bool(outside.any()) else None

    def __repr__(self) -> str:
        return f"PixelGrid(bin_width={self.bin_width:g}, levels={self.levels})"


# The two ways 8-bit pixels come: as stored (``--scale none``) and divided by 255 (``--scale auto``).
INTEGER_PIXELS = PixelGrid(1.0)
FRACTION_PIXELS = PixelGrid(1.0 / (PIXEL_LEVELS - 1))


def _log1mexp(log_d: torch.Tensor) -> torch.Tensor:
    """log(1 − e^{−d}) for d = exp(``log_d``) > 0, accurate for small and large d alike (Mächler
    2012, "Accurately computing log(1 − exp(−|a|))"): log(−expm1(−d)) up to d = log 2,
    log1p(−e^{−d}) beyond; and log d − d/2 (error d²/24) below d = e⁻²⁰, where d itself may
    underflow (a scale of e⁹⁰ levels in float32), so the result stays finite.

    Each branch is fed a harmless stand-in where it is not taken: a branch that is infinite
    there, even unused, would make the gradient 0 · ∞ = NaN."""
    tiny = log_d < -20.0
    d = torch.where(tiny, 0.0, log_d).exp()
    near = d <= math.log(2.0)
    exact = torch.where(
        near,
        torch.log(-torch.expm1(-torch.where(near, d, 0.5))),
        torch.log1p(-torch.exp(-torch.where(near, 1.0, d))),
    )
    series = log_d - 0.5 * torch.where(tiny, log_d, -20.0).exp()
    return torch.where(tiny, series, exact)


class DiscretizedLogistic(Distribution):
    """A logistic of location μ and scale s = exp(``log_scale``) rounded to the nearest of the
    levels x_k = kΔ, k = 0, …, L − 1 (Δ = ``bin_width``, L = ``levels``), the two end levels
    taking all the mass beyond them (Kingma et al. 2016, "Improved variational inference with
    inverse autoregressive flow"; Salimans et al. 2017, "PixelCNN++"). With σ the sigmoid,

        P(x_k) = σ((x_k + Δ/2 − μ)/s) − σ((x_k − Δ/2 − μ)/s)      for 0 < k < L − 1,
        P(x_0) = σ((x_0 + Δ/2 − μ)/s),     P(x_{L−1}) = 1 − σ((x_{L−1} − Δ/2 − μ)/s),

    a probability mass function over the L levels (the sum telescopes to 1).

    log P is computed exactly, without a difference of probabilities: with a = (x_k + Δ/2 − μ)/s
    and b = (x_k − Δ/2 − μ)/s = a − Δ/s,

        σ(a) − σ(b) = σ(a) σ(−b) (1 − e^{−Δ/s}),
        log P(x_k) = −softplus(−a) − softplus(b) + log(1 − e^{−Δ/s}),

    and log P(x_0) = −softplus(−a), log P(x_{L−1}) = −softplus(b). Each term is a log-sigmoid or
    Mächler's log1mexp, finite and accurate however far x lies from μ: 40 scales away log P is
    about −40 to float precision, where the plain difference σ(a) − σ(b) is 1 − 1 = 0 in float32.
    PixelCNN++ takes that difference and, where it falls below 10⁻⁵, switches to the midpoint
    approximation log pdf + log Δ; the factorised form needs no switch, and no approximation.

    ``batch_shape`` is the shape of ``loc`` and ``log_scale`` (broadcast), ``event_shape`` ``()``.
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    has_enumerate_support = True

    def __init__(
        self,
        loc: torch.Tensor,
        log_scale: torch.Tensor,
        bin_width: float,
        levels: int = PIXEL_LEVELS,
        validate_args: bool | None = None,
    ) -> None:
        self.loc, self.log_scale = torch.broadcast_tensors(loc, log_scale)
        self.bin_width = float(bin_width)
        self.levels = int(levels)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @property
    def support(self) -> PixelGrid:
        return PixelGrid(self.bin_width, self.levels)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # The nearest level: values a float rounding off their level are read as that level.
        level = (value / self.bin_width).round().clamp(0, self.levels - 1)
        inverse_scale = torch.exp(-self.log_scale)
        centred = level * self.bin_width - self.loc
        upper = (centred + 0.5 * self.bin_width) * inverse_scale  # a
        lower = (centred - 0.5 * self.bin_width) * inverse_scale  # b
        at_or_below = -F.softplus(-upper)  # log σ(a) = log P(X ≤ x_k)
        at_or_above = -F.softplus(lower)  # log σ(−b) = log P(X ≥ x_k)
        log_width = math.log(self.bin_width) - self.log_scale  # log Δ/s
        inside = at_or_below + at_or_above + _log1mexp(log_width)
        # Every branch is finite, so the gradient of the unused ones (zero) stays a number.
        return torch.where(
            level == 0,
            at_or_below,
            torch.where(level == self.levels - 1, at_or_above, inside),
        )

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """A logistic draw μ + s logit(u), u ~ U[0, 1), rounded to the nearest level and clipped
        to the end levels: exactly P, since the logistic falls in level k's bin with probability
        P(x_k) (u = 0 gives −∞, which the clip sends to the first level)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            continuous = self.loc + self.scale * torch.logit(u)
            level = (continuous / self.bin_width).round().clamp(0, self.levels - 1)
            return level * self.bin_width

    @property
    def mean(self) -> torch.Tensor:
        """E[X] = Δ Σ_{k=1}^{L−1} P(X ≥ x_k) = Δ Σ_{k=1}^{L−1} σ((μ − (k − ½)Δ)/s), one level
        at a time: L − 1 passes over ``batch_shape`` rather than a tensor L times its size."""
        inverse_scale = torch.exp(-self.log_scale)
        total = torch.zeros_like(self.loc)
        for k in range(1, self.levels):
            total = total + torch.sigmoid((self.loc - (k - 0.5) * self.bin_width) * inverse_scale)
        return self.bin_width * total

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """The L levels, ``[levels, *batch_shape]`` (``[levels, 1, …]`` unexpanded)."""
        values = torch.arange(self.levels, dtype=self.loc.dtype, device=self.loc.device)
        values = (values * self.bin_width).reshape((-1,) + (1,) * len(self.batch_shape))
        return values.expand((-1, *self.batch_shape)) if expand else values
