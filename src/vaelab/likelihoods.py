"""Likelihoods p_θ(x|z): decoders that return a normalised distribution over the data.

A likelihood wraps a decoder body giving ``params_per_dim`` numbers for every data dimension and reads a
distribution off them. From ``z: [samples, batch, latent]`` it returns a distribution with
``batch_shape [samples, batch]`` and ``event_shape data_shape``, so ``log_prob(x)`` sums over data
dimensions: nats per example, normalising constants included (a Gaussian's −½ log 2πσ², a continuous
Bernoulli's log C(λ)). ``check_support(x)`` refuses data the distribution cannot have produced.
"""

from __future__ import annotations

import math

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
    def initialise(self, x: torch.Tensor) -> None:
        """Start the decoder at the data: ``x: [batch, *data_shape]``, a sample of training data."""
        self.offset.copy_(self.location_of_mean(x.mean(0)))

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
    def initialise(self, x: torch.Tensor) -> None:
        """Start at the data mean, and learned σ at the data's standard deviation. A dimension
        that barely varies starts at a tenth of the typical deviation instead of its own: the
        decoder does not yet predict it exactly, and a σ of 10⁻³ would turn that first error into
        thousands of nats that swamp every other gradient. σ then falls as the fit improves."""
        super().initialise(x)
        std = x.std(0)
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
    def initialise(self, x: torch.Tensor) -> None:
        """Start at the data mean, the scale at the mean absolute deviation from it."""
        super().initialise(x)
        self.log_scale.copy_((x - x.mean(0)).abs().mean().clamp(min=1e-3).log())

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        (loc,) = params
        return Laplace(loc, self.log_scale.exp().clamp(min=SCALE_FLOOR).expand_as(loc))
