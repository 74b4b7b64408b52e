"""Posteriors q_φ(z|x): encoders that return a distribution over the latent code.

Each posterior wraps an encoder body producing ``[batch, n_params]`` features and reads a Gaussian
off them; ``forward(x, condition)`` hands a condition y to the body, which makes it q(z|x, y). Samples are reparameterised, z = μ + L ε with ε ~ N(0, I) (Kingma & Welling 2014), so
gradients flow through ``rsample``. Returned distributions have ``batch_shape [batch]`` and
``event_shape [latent]``.

The distributions themselves live in ``vaelab.distributions`` (``DiagonalNormal``; ``stop_gradient``
for the STL and DReG estimators).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, MultivariateNormal

from vaelab.components.networks import apply_network
from vaelab.distributions.normal import DiagonalNormal


class DiagonalGaussianPosterior(nn.Module):
    """q(z|x) = N(μ(x), diag σ²(x)), parameterised by μ and log σ² (the features' two halves)."""

    def __init__(self, encoder: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent_dim = latent_dim

    @staticmethod
    def n_params(latent_dim: int) -> int:
        """Features the encoder must produce: μ and log σ², ``2 · latent``."""
        return 2 * latent_dim

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Distribution:
        """q(z|x), or q(z|x, y) for a ``condition`` y ``[batch, c]`` the encoder reads."""
        return DiagonalNormal(*self.loc_and_log_var(x, condition))

    def loc_and_log_var(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x), ``[batch, latent]`` each, without the distribution object: a
        caller that reads the two tensors alone (the top-down sampling pass, at every layer and
        step) skips building ``Normal`` and its σ = exp(½ log σ²)."""
        features = apply_network(self.encoder, x, condition)
        if features.shape[-1] != 2 * self.latent_dim:
            raise ValueError(
                f"the encoder gave {features.shape[-1]} features; a diagonal Gaussian of "
                f"{self.latent_dim} units needs {2 * self.latent_dim} (μ and log σ²)"
            )
        mu, log_var = features.chunk(2, dim=-1)  # chunk: a step cheaper than split's wrapper
        return mu, log_var


class FullCovariancePosterior(nn.Module):
    """q(z|x) = N(μ(x), L(x) L(x)ᵀ) with a Cholesky factor L: lower triangular, positive diagonal.

    The features hold μ (latent), log diag L (latent) and the strictly lower triangle of L
    (latent · (latent − 1) / 2), so every output of the encoder is a valid covariance.
    """

    _rows: torch.Tensor
    _cols: torch.Tensor

    def __init__(self, encoder: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent_dim = latent_dim
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    @staticmethod
    def n_params(latent_dim: int) -> int:
        """Features the encoder must produce: ``latent · (latent + 3) / 2``."""
        return latent_dim * (latent_dim + 3) // 2

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Distribution:
        """q(z|x), or q(z|x, y) for a ``condition`` y ``[batch, c]`` the encoder reads."""
        n = self.latent_dim
        h = apply_network(self.encoder, x, condition)
        mu, log_diag, lower = h[..., :n], h[..., n : 2 * n], h[..., 2 * n :]
        scale_tril = torch.diag_embed(torch.exp(log_diag))  # [batch, latent, latent]
        scale_tril[..., self._rows, self._cols] = lower
        return MultivariateNormal(mu, scale_tril=scale_tril)
