"""Likelihoods of real-valued data: Gaussian (with a fixed, shared, per-dimension or decoded
scale) and Laplace."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import (
    Distribution,
    Laplace,
    Normal,
)

from vaelab.components.likelihoods.base import DataMoments, Likelihood

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
