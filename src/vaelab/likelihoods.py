"""Likelihoods p_θ(x|z): decoders that return a normalised distribution over the data.

A likelihood wraps a decoder body giving ``params_per_dim`` numbers for every data dimension and reads a
distribution off them. From ``z: [samples, batch, latent]`` it returns a distribution with
``batch_shape [samples, batch]`` and ``event_shape data_shape``, so ``log_prob(x)`` sums over data
dimensions: nats per example, normalising constants included (a Gaussian's −½ log 2πσ², a continuous
Bernoulli's log C(λ)). ``check_support(x)`` refuses data the distribution cannot have produced.
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
    ContinuousBernoulli,
    Distribution,
    Independent,
    Laplace,
    Normal,
)


@dataclass
class DataMoments:
    """Per-dimension mean and variance of training data, accumulated batch by batch in float64
    with the pairwise update of Chan, Golub & LeVeque (1979): merging a batch of n_b examples with
    mean m_b and sum of squared deviations M_b into (n, m, M) gives
    n' = n + n_b,  m' = m + (m_b − m) n_b / n',  M' = M + M_b + (m_b − m)² n n_b / n'.
    So a ``DataLoader`` sets the decoder's start from many batches, not from its first one.
    ``mean`` and ``std`` are ``[*data_shape]``."""

    count: int = 0
    total_mean: torch.Tensor | None = None
    squares: torch.Tensor | None = None

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

    def decoder_params(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Decoder outputs split per parameter, each ``[*lead, *data_shape]``."""
        lead = z.shape[:-1]
        if self.params_per_dim == 1:
            # One view at most: unbind's backward would stack the gradient into a fresh copy.
            h = self.decoder(z)
            shape = (*lead, *self.data_shape)
            return ((h if h.shape == shape else h.reshape(shape)) + self.offset,)
        h = self.decoder(z).reshape(*lead, self.params_per_dim, *self.data_shape)
        first, *rest = h.unbind(dim=len(lead))
        return (first + self.offset, *rest)

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

    def forward(self, z: torch.Tensor) -> Distribution:
        """p(x|z) with ``batch_shape z.shape[:-1]`` and ``event_shape data_shape``."""
        # Not validated: check_support already vetted the data where it enters; validating here
        # would re-scan every batch at every step.
        return Independent(
            self.distribution(self.decoder_params(z)), len(self.data_shape), validate_args=False
        )

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) in nats, summed over data dimensions: ``x: [batch, *data_shape]`` and
        ``z: [*lead, batch, latent]`` → ``[*lead, batch]``. The one entry point of the bounds, so
        a likelihood may compute it without building a distribution object."""
        return self(z).log_prob(x)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z], ``[*lead, *data_shape]``."""
        return self(z).mean

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

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) = Σᵢ [xᵢ log σ(lᵢ) + (1 − xᵢ) log σ(−lᵢ)] for logits l: the arithmetic of
        ``Bernoulli(logits=l).log_prob(x)``, without the distribution objects' per-call cost."""
        (logits,) = self.decoder_params(z)  # [*lead, batch, *data_shape]
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
