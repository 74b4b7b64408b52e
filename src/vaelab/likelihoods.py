"""Likelihoods p_θ(x|z): decoders that return a normalised distribution over the data.

A likelihood wraps a decoder body giving ``params_per_dim`` numbers for every data dimension and reads a
distribution off them. From ``z: [samples, batch, latent]`` it returns a distribution with
``batch_shape [samples, batch]`` and ``event_shape data_shape``, so ``log_prob(x)`` sums over data
dimensions: nats per example, normalising constants included (a Gaussian's −½ log 2πσ², a continuous
Bernoulli's log C(λ)); the likelihoods of 8-bit pixels are probabilities of the 256 levels.
``check_support(x)`` refuses data the distribution cannot have produced.

A conditional model's likelihood p(x|z, y) takes the condition y ``[batch, c]`` as one more input of
every method that reads z (``forward``, ``log_prob``, ``mean``, ``decoder_params``), handing it to
the decoder body, which reads ``[z, y]`` (``vaelab.networks``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Laplace,
    MixtureSameFamily,
    Normal,
    constraints,
)

from vaelab.networks import apply_network


@dataclass
class DataMoments:
    """Per-dimension mean and variance of training data, accumulated batch by batch in float64
    with the pairwise update of Chan, Golub & LeVeque (1979): merging a batch of n_b examples with
    mean m_b and sum of squared deviations M_b into (n, m, M) gives
    n' = n + n_b,  m' = m + (m_b − m) n_b / n',  M' = M + M_b + (m_b − m)² n n_b / n'.
    So a ``DataLoader`` sets the decoder's start from many batches, not from its first one.
    ``mean`` and ``std`` are ``[*data_shape]``; ``maximum`` is the largest value seen, from which a
    likelihood of 8-bit pixels reads whether they are stored as 0..255 or scaled to [0, 1]."""

    count: int = 0
    total_mean: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    maximum: float = -math.inf

    @classmethod
    def of(cls, x: torch.Tensor) -> DataMoments:
        """The moments of ``x: [batch, *data_shape]``."""
        moments = cls()
        moments.update(x)
        return moments

    def update(self, x: torch.Tensor) -> None:
        """Merge the examples ``x: [batch, *data_shape]``."""
        x = x.detach().double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        self.maximum = max(self.maximum, float(x.max()))
        mean_b = x.mean(0)
        squares_b = (x - mean_b).square().sum(0)
        if self.total_mean is None or self.squares is None:
            self.count, self.total_mean, self.squares = n_b, mean_b, squares_b
            return
        total = self.count + n_b
        delta = mean_b.to(self.total_mean.device) - self.total_mean
        self.total_mean = self.total_mean + delta * (n_b / total)
        self.squares = self.squares + squares_b.to(self.squares.device)
        self.squares = self.squares + delta.square() * (self.count * n_b / total)
        self.count = total

    @property
    def mean(self) -> torch.Tensor:
        if self.total_mean is None:
            raise ValueError("no examples seen: the data moments are undefined")
        return self.total_mean

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation with the n − 1 denominator (0 for a single example)."""
        if self.squares is None:
            raise ValueError("no examples seen: the data moments are undefined")
        return (self.squares / max(self.count - 1, 1)).sqrt()


class Likelihood(nn.Module):
    """Shared plumbing: reshape decoder features to ``[*lead, params_per_dim, *data_shape]``.

    The first parameter (a location or logits) is the decoder output plus ``offset``, a buffer that
    ``initialise`` sets from the training data: the decoder then starts at the data mean and learns
    deviations from it, which skips the long first phase of training where it would learn the
    mean itself (the same idea as initialising the output bias to the marginal logits).
    """

    params_per_dim = 1
    support = "the real line"
    offset: torch.Tensor

    def __init__(self, decoder: nn.Module, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.decoder = decoder
        self.data_shape = tuple(data_shape)
        self.register_buffer("offset", torch.zeros(self.data_shape))

    def decoder_params(
        self, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Decoder outputs split per parameter, each ``[*lead, *data_shape]``."""
        lead = z.shape[:-1]
        if self.params_per_dim == 1:
            # One view at most: unbind's backward would stack the gradient into a fresh copy.
            h = apply_network(self.decoder, z, condition)
            shape = (*lead, *self.data_shape)
            return ((h if h.shape == shape else h.reshape(shape)) + self.offset,)
        h = apply_network(self.decoder, z, condition)
        h = h.reshape(*lead, self.params_per_dim, *self.data_shape)
        first, *rest = h.unbind(dim=len(lead))
        return (first + self.offset, *rest)

    @property
    def data_unit(self) -> float:
        """The data value the networks read as 1 (the encoder's ``InputScale``): 1 here, the
        data as they are."""
        return 1.0

    @torch.no_grad()
    def initialise(self, data: torch.Tensor | DataMoments) -> None:
        """Start the decoder at the data: a sample of training data ``[batch, *data_shape]`` or
        the moments of a stream of it."""
        moments = data if isinstance(data, DataMoments) else DataMoments.of(data)
        self.start_at(moments)

    def start_at(self, moments: DataMoments) -> None:
        """Set the starting point from the data's moments; subclasses with learned scales add
        theirs."""
        mean = moments.mean.to(self.offset.device, self.offset.dtype)
        self.offset.copy_(self.location_of_mean(mean))

    def location_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The first distribution parameter whose distribution has (about) this mean."""
        return mean

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        """The per-dimension distribution built from the decoder parameters."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> Distribution:
        """p(x|z) (p(x|z, y) given a ``condition``) with ``batch_shape z.shape[:-1]`` and
        ``event_shape data_shape``."""
        # Not validated: check_support already vetted the data where it enters; validating here
        # would re-scan every batch at every step.
        params = self.decoder_params(z, condition)
        return Independent(self.distribution(params), len(self.data_shape), validate_args=False)

    def log_prob(
        self, x: torch.Tensor, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x|z) in nats, summed over data dimensions: ``x: [batch, *data_shape]`` and
        ``z: [*lead, batch, latent]`` → ``[*lead, batch]``. The one entry point of the bounds, so
        a likelihood may compute it without building a distribution object."""
        return self(z, condition).log_prob(x)

    def mean(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z], ``[*lead, *data_shape]``."""
        return self(z, condition).mean

    def check_support(self, x: torch.Tensor) -> None:
        """Refuse data outside the support. Real-valued likelihoods accept any finite value."""

    def why_not_a_probability(self, x: torch.Tensor) -> str | None:
        """``None`` when log p(x|z) is the log of a probability of these values (a mass function
        over the values ``x`` holds), so that −log₂ p(x) / D is a code length: bits per
        dimension. Otherwise why not, in words: a density's log p is not a log-probability."""
        return (
            f"the {self.name} likelihood is a density over continuous values, not a probability "
            "of the stored values (a discrete likelihood is: bernoulli on binary data)"
        )

    @property
    def name(self) -> str:
        """The likelihood's kind in words, for messages."""
        words = re.findall(r"[A-Z][a-z]*", type(self).__name__.removesuffix("Likelihood"))
        return "-".join(words).lower()


def _check_unit_interval(x: torch.Tensor, name: str) -> None:
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"the {name} likelihood needs data in [0, 1], but values range over [{low:g}, {high:g}]; "
            "rescale the data (e.g. divide 8-bit pixels by 255) or choose likelihood='gaussian'"
        )


class BernoulliLikelihood(Likelihood):
    """p(x|z) = Πᵢ λᵢ^xᵢ (1 − λᵢ)^(1−xᵢ) with λ = sigmoid(decoder logits).

    A normalised likelihood for binary data. Grey values in [0, 1] are accepted, as in Kingma &
    Welling (2014), but then log p is a cross-entropy, not a log-density: binarise the data for
    numbers comparable with the literature.
    """

    support = "[0, 1]"

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        # validate_args=False lets grey values through; check_support guards the range.
        return Bernoulli(logits=params[0], validate_args=False)

    def log_prob(
        self, x: torch.Tensor, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x|z) = Σᵢ [xᵢ log σ(lᵢ) + (1 − xᵢ) log σ(−lᵢ)] for logits l: the arithmetic of
        ``Bernoulli(logits=l).log_prob(x)``, without the distribution objects' per-call cost."""
        (logits,) = self.decoder_params(z, condition)  # [*lead, batch, *data_shape]
        cross_entropy = F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        )
        return -cross_entropy.flatten(start_dim=logits.dim() - len(self.data_shape)).sum(-1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, "bernoulli")

    def why_not_a_probability(self, x: torch.Tensor) -> str | None:
        """A probability of binary values; of grey values log p is a cross-entropy."""
        if bool(((x == 0) | (x == 1)).all()):
            return None
        return (
            "the bernoulli likelihood on grey values is a cross-entropy, not a probability "
            "(binarise the data, --binarize)"
        )

    def location_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.logit(mean.clamp(1e-3, 1 - 1e-3))


class ContinuousBernoulliLikelihood(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): p(x|λ) = C(λ) λ^x (1 − λ)^(1−x)
    on [0, 1], with the normalising constant C(λ) that makes it a proper density for grey values."""

    support = "[0, 1]"

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        return ContinuousBernoulli(logits=params[0], validate_args=False)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, "continuous-bernoulli")

    def location_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        # The continuous Bernoulli's mean is not sigmoid(logits), but close enough for a start.
        return torch.logit(mean.clamp(1e-3, 1 - 1e-3))


GAUSSIAN_SCALES = ("fixed", "shared", "per-dimension", "decoder")
# No learned scale falls below this: a dimension that never varies (an always-black pixel) would
# otherwise drive σ → 0 and the density, and so the ELBO, to infinity.
SCALE_FLOOR = 1e-3


class GaussianLikelihood(Likelihood):
    """p(x|z) = N(x; μ(z), diag σ²), log p = −½ Σᵢ [(xᵢ − μᵢ)²/σᵢ² + log 2πσᵢ²].

    ``scale`` says where σ comes from:
    - ``"fixed"``: σ = ``sigma`` for every dimension, not learned;
    - ``"shared"``: one learned σ for all dimensions (isotropic; the pPCA noise model);
    - ``"per-dimension"``: one learned σᵢ per data dimension;
    - ``"decoder"``: σᵢ(z) predicted by the decoder alongside μ(z), through softplus.

    Every σ is at least ``SCALE_FLOOR`` (10⁻³): a pixel that never varies cannot drive the density,
    and with it the ELBO, to infinity.
    """

    def __init__(
        self,
        decoder: nn.Module,
        data_shape: tuple[int, ...],
        scale: str = "shared",
        sigma: float = 1.0,
    ) -> None:
        if scale not in GAUSSIAN_SCALES:
            raise ValueError(f"unknown Gaussian scale {scale!r}; choose one of {GAUSSIAN_SCALES}")
        super().__init__(decoder, data_shape)
        self.params_per_dim = 2 if scale == "decoder" else 1
        self.scale = scale
        log_sigma = torch.full(data_shape if scale == "per-dimension" else (), math.log(sigma))
        if scale in ("shared", "per-dimension"):
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @torch.no_grad()
    def start_at(self, moments: DataMoments) -> None:
        """Start at the data mean, and learned σ at the data's standard deviation. A dimension
        that barely varies starts at a tenth of the typical deviation instead of its own: the
        decoder does not yet predict it exactly, and a σ of 10⁻³ would turn that first error into
        thousands of nats that swamp every other gradient. σ then falls as the fit improves."""
        super().start_at(moments)
        std = moments.std.to(self.log_sigma.device, self.log_sigma.dtype)
        typical = std.square().mean().sqrt().clamp(min=SCALE_FLOOR)
        if self.scale == "shared":
            self.log_sigma.copy_(typical.log())
        elif self.scale == "per-dimension":
            self.log_sigma.copy_(std.clamp(min=0.1 * typical).log())

    def sigma(self) -> torch.Tensor:
        """σ of a fixed, shared or per-dimension scale (``[]`` or ``data_shape``), at least
        ``SCALE_FLOOR``; below the floor the gradient stops, so σ rests there."""
        return self.log_sigma.exp().clamp(min=SCALE_FLOOR)

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        if self.scale == "decoder":
            loc, raw_scale = params
            sigma = nn.functional.softplus(raw_scale) + SCALE_FLOOR
        else:
            (loc,) = params
            sigma = self.sigma().expand_as(loc)
        return Normal(loc, sigma)


class LaplaceLikelihood(Likelihood):
    """p(x|z) = Πᵢ (1 / 2b) exp(−|xᵢ − μᵢ(z)| / b) with one learned scale b ≥ ``SCALE_FLOOR``: an
    L1 reconstruction error with its normalising constant."""

    def __init__(self, decoder: nn.Module, data_shape: tuple[int, ...]) -> None:
        super().__init__(decoder, data_shape)
        self.log_scale = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def start_at(self, moments: DataMoments) -> None:
        """Start at the data mean, the scale where a Laplace has the data's variance: 2b² = the
        mean variance over dimensions."""
        super().start_at(moments)
        variance = moments.std.square().mean().to(self.log_scale.device, self.log_scale.dtype)
        self.log_scale.copy_((0.5 * variance).sqrt().clamp(min=SCALE_FLOOR).log())

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        (loc,) = params
        return Laplace(loc, self.log_scale.exp().clamp(min=SCALE_FLOOR).expand_as(loc))


# ------------------------------------------------------------------------------------ 8-bit pixels
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


def _floored_log_scale(raw: torch.Tensor) -> torch.Tensor:
    """log s = log s₀ + softplus(ℓ − log s₀) for the decoder's log-scale ℓ and the floor s₀: ℓ
    itself well above the floor, s₀ far below it. A smooth maximum rather than a clamp, whose
    zero gradient below the floor would leave a pixel's scale there for good."""
    floor = math.log(LOGISTIC_SCALE_FLOOR)
    return floor + F.softplus(raw - floor)


def _raw_log_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_floored_log_scale``, for log s above the floor."""
    floor = math.log(LOGISTIC_SCALE_FLOOR)
    return floor + torch.log(torch.expm1(log_scale - floor))


def _read_grid_max(module: PixelLikelihood, incompatible_keys: object) -> None:
    """After ``load_state_dict``: the loaded grid as a number, so no step reads a tensor back."""
    value = float(module.grid_max)
    module._grid_max = value if value > 0 else None


class PixelLikelihood(Likelihood):
    """Shared plumbing of the likelihoods of 8-bit pixels, probabilities of the 256 levels.

    The grid: the pixels are the integers 0..255 (``--scale none``) or those divided by 255 (the
    default ``--scale auto`` of uint8 data), and which one is a property of the training data,
    not of each batch (a dark batch of integers can hold only 0s and 1s). So ``initialise`` reads
    it off the training data, once: the top level is 255 when the data exceed 1, else 1; it is
    kept in the buffer ``grid_max`` and saved with the model. Training data holding only 0s and 1s
    are read as pixels / 255 (they lie on both grids); later data off the grid kept are refused.
    Before ``initialise``, ``check_support`` accepts data on either grid.

    Units: the decoder's locations and log-scales are read in units of the pixel range (top level
    1) on either grid, and the encoder reads the pixels in those units too (``data_unit``, the top
    level), so one model gives the same probabilities to 0..255 and to /255 pixels, and bits per
    dimension do not depend on the scaling. Locations start at the data mean and
    log-scales at a logistic with the data's spread (s = std √3 / π, a logistic's standard
    deviation being s π / √3), a tenth of the typical spread at least, as the Gaussian's σ does.
    """

    support = "8-bit pixels: the integers 0..255, or those divided by 255"
    grid_max: torch.Tensor
    log_scale_offset: torch.Tensor

    def __init__(self, decoder: nn.Module, data_shape: tuple[int, ...]) -> None:
        super().__init__(decoder, data_shape)
        self.register_buffer("grid_max", torch.tensor(0.0))  # 0: not read off the data yet
        self.register_buffer("log_scale_offset", torch.zeros(self.data_shape))
        self._grid_max: float | None = None
        self.register_load_state_dict_post_hook(_read_grid_max)

    @property
    def data_unit(self) -> float:
        """The top level, 255 or 1 (1 before the grid is read)."""
        return self._grid_max or 1.0

    @property
    def grid(self) -> PixelGrid:
        """The levels this likelihood gives probabilities to."""
        if self._grid_max is None:
            raise ValueError(
                f"the {self.name} likelihood has not read its pixel grid (0..255 or /255) off "
                "training data yet; call initialise(x) with training data first (VAE.fit and "
                "vaelab train do)"
            )
        return PixelGrid(self._grid_max / (PIXEL_LEVELS - 1))

    @torch.no_grad()
    def initialise(self, data: torch.Tensor | DataMoments) -> None:
        """Read the grid and start the decoder at the data. Data on neither grid are refused
        here, as the grid is read off them (``vaelab train`` checks only the data's range)."""
        if not isinstance(data, DataMoments):
            self._check_pixels(data, None)
        super().initialise(data)

    def start_at(self, moments: DataMoments) -> None:
        grid_max = float(PIXEL_LEVELS - 1) if moments.maximum > 1.0 else 1.0
        self.grid_max.fill_(grid_max)
        self._grid_max = grid_max
        mean = moments.mean.to(self.offset.device, self.offset.dtype) / grid_max
        std = moments.std.to(self.offset.device, self.offset.dtype) / grid_max
        self.offset.copy_(mean)
        typical = std.square().mean().sqrt()
        scale = std.clamp(min=0.1 * float(typical)) * (math.sqrt(3.0) / math.pi)
        log_scale = scale.clamp(min=2 * LOGISTIC_SCALE_FLOOR).log()
        self.log_scale_offset.copy_(_raw_log_scale(log_scale))

    def logistics(self, loc: torch.Tensor, log_scale: torch.Tensor) -> DiscretizedLogistic:
        """Discretised logistics on the grid from decoder outputs in units of the pixel range."""
        grid = self.grid
        top = grid.bin_width * (PIXEL_LEVELS - 1)
        return DiscretizedLogistic(
            top * loc,
            math.log(top) + _floored_log_scale(log_scale),
            grid.bin_width,
            validate_args=False,
        )

    def check_support(self, x: torch.Tensor) -> None:
        self._check_pixels(x, self._grid_max)

    def _check_pixels(self, x: torch.Tensor, grid_max: float | None) -> None:
        """Refuse ``x`` off the grid with top level ``grid_max``, or off both grids if ``None``."""
        if grid_max == 1.0:
            found = FRACTION_PIXELS.first_outside(x)
            if found is not None:
                raise ValueError(
                    f"the {self.name} likelihood was trained on 8-bit pixels divided by 255 (the "
                    f"levels 0, 1/255, …, 1), but the data hold {found:g}, which is none of "
                    "them; scale the data as the training data were (uint8 images: the default "
                    "--scale auto)"
                )
        elif grid_max is not None:
            found = INTEGER_PIXELS.first_outside(x)
            if found is not None:
                raise ValueError(
                    f"the {self.name} likelihood was trained on 8-bit pixels as the integers "
                    f"0..255, but the data hold {found:g}; pass the pixels unscaled, as in "
                    "training (--scale none)"
                )
        elif INTEGER_PIXELS.first_outside(x) is not None:
            found = FRACTION_PIXELS.first_outside(x)
            if found is not None:
                example = found if float(x.max()) <= 1.0 else INTEGER_PIXELS.first_outside(x)
                raise ValueError(
                    f"the {self.name} likelihood needs 8-bit pixels, the integers 0..255 "
                    f"(--scale none) or those divided by 255 (--scale auto on uint8 data), but "
                    f"the data hold {example:g}; store the images as uint8, or choose a "
                    "likelihood for continuous values such as likelihood='gaussian'"
                )

    def why_not_a_probability(self, x: torch.Tensor) -> str | None:
        """``None`` for pixels on the grid: P(x|z) is a probability mass function over the 256
        levels of every pixel, so −log₂ P(x|z) / D is a code length in bits per dimension, the
        number Kingma et al. (2016) and Salimans et al. (2017) report, as it is, on either grid:
        no log 256 or log 255 term to add, as there would be to turn a density of pixels scaled
        to [0, 1] into a probability of their levels."""
        if self._grid_max is not None and self.grid.first_outside(x) is None:
            return None
        return (
            f"the {self.name} likelihood is a probability of the 256 levels of its pixel grid, "
            "and these values are not all on it"
        )


class DiscretizedLogisticLikelihood(PixelLikelihood):
    """p(x|z) = Πᵢ P(xᵢ; μᵢ(z), sᵢ(z)), one discretised logistic (``DiscretizedLogistic``) per
    pixel (Kingma et al. 2016): the decoder gives a location and a log-scale per pixel
    (``params_per_dim = 2``), the log-scale floored smoothly at ``LOGISTIC_SCALE_FLOOR``."""

    params_per_dim = 2

    def decoder_params(
        self, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(location, log-scale), each ``[*lead, *data_shape]`` in units of the pixel range."""
        loc, log_scale = super().decoder_params(z, condition)
        return loc, log_scale + self.log_scale_offset

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        loc, log_scale = params
        return self.logistics(loc, log_scale)


class DiscretizedLogisticMixtureLikelihood(PixelLikelihood):
    """p(x|z) = Πᵢ Σⱼ πᵢⱼ(z) P(xᵢ; μᵢⱼ(z), sᵢⱼ(z)), a mixture of ``components`` discretised
    logistics per pixel (Salimans et al. 2017; K = ``LOGISTIC_MIXTURE_COMPONENTS`` = 5 by
    default): the decoder gives K mixture logits, K locations and K log-scales per pixel
    (``params_per_dim = 3K``), in that order. Pixels are independent given z: no coupling of the
    channels of a colour pixel, as PixelCNN++ has (each channel's location there depends linearly
    on the channels before it), since a VAE decoder gives all channels at once."""

    def __init__(
        self,
        decoder: nn.Module,
        data_shape: tuple[int, ...],
        components: int = LOGISTIC_MIXTURE_COMPONENTS,
    ) -> None:
        if not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive integer, got {components!r}")
        super().__init__(decoder, data_shape)
        self.components = components
        self.params_per_dim = 3 * components

    def decoder_params(
        self, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(logits, locations, log-scales), each ``[*lead, *data_shape, components]``, the
        components last as ``MixtureSameFamily`` wants them; every location starts at the data
        mean (the decoder's random start sets them apart)."""
        lead = z.shape[:-1]
        h = apply_network(self.decoder, z, condition)
        h = h.reshape(*lead, 3, self.components, *self.data_shape)
        h = h.movedim(len(lead) + 1, -1)  # [*lead, 3, *data_shape, components]
        logits, loc, log_scale = h.unbind(dim=len(lead))
        return logits, loc + self.offset[..., None], log_scale + self.log_scale_offset[..., None]

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        logits, loc, log_scale = params
        return MixtureSameFamily(
            Categorical(logits=logits, validate_args=False),
            self.logistics(loc, log_scale),
            validate_args=False,
        )
