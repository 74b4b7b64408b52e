"""Posteriors q_φ(z|x): encoders that return a distribution over the latent code.

Each posterior wraps an encoder body producing ``[batch, n_params]`` features and reads a Gaussian
off them; ``forward(x, condition)`` hands a condition y to the body, which makes it q(z|x, y). Samples are reparameterised, z = μ + L ε with ε ~ N(0, I) (Kingma & Welling 2014), so
gradients flow through ``rsample``. Returned distributions have ``batch_shape [batch]`` and
``event_shape [latent]``.

``stop_gradient(q)`` is the same q with its parameters cut from the autograd graph: the log q(z) that
the STL and DReG gradient estimators need (``vaelab.objectives``). It is one entry point extended
by registering a function per distribution type (``register_stop_gradient``), as
``torch.distributions.kl_divergence`` is extended by ``register_kl``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from vaelab.networks import apply_network


class DiagonalNormal(Independent):
    """N(μ, diag σ²) over ``[latent]``: ``Independent(Normal(μ, σ), 1)`` that also keeps log σ²,
    the encoder's own output, so that the KL against N(0, I) starts from it instead of from
    log σ (one fewer rounding, two fewer operations per step). ``loc, log_var: [batch, latent]``."""

    def __init__(self, loc: torch.Tensor, log_var: torch.Tensor) -> None:
        # Not validated: built from network outputs at every step, where the trainer's finite
        # check on the loss catches the same overflow for less.
        scale = torch.exp(0.5 * log_var)
        super().__init__(Normal(loc, scale, validate_args=False), 1, validate_args=False)
        self.log_var = log_var

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> DiagonalNormal:
        shape = torch.Size(batch_shape) + self.event_shape
        return DiagonalNormal(self.base_dist.loc.expand(shape), self.log_var.expand(shape))


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
        features = apply_network(self.encoder, x, condition)
        mu, log_var = features.split(self.latent_dim, dim=-1)  # [batch, latent] each
        return DiagonalNormal(mu, log_var)


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


# ---------------------------------------------------------------------------- stop-gradient

D = TypeVar("D", bound=Distribution)
_STOP_GRADIENT: dict[type, Callable[[Any], Distribution]] = {}


def register_stop_gradient(
    cls: type[D],
) -> Callable[[Callable[[D], Distribution]], Callable[[D], Distribution]]:
    """Decorator: ``fn(q)`` returns a ``cls`` distribution equal to q with detached parameters.

    The result must give the same ``log_prob`` to the last bit (the estimators promise values
    identical to the standard gradient's), so build it from the same tensors, detached.
    """

    def register(fn: Callable[[D], Distribution]) -> Callable[[D], Distribution]:
        _STOP_GRADIENT[cls] = fn
        return fn

    return register


def stop_gradient(q: Distribution) -> Distribution:
    """q with its parameters detached: ``log_prob(z)`` has q's values, and a gradient only through
    z, never through q's parameters.

    This removes the score term ∂ log q_φ(z) / ∂φ from a reparameterised gradient, the idea behind
    sticking the landing (Roeder, Wu & Duvenaud 2017) and doubly reparameterised gradients
    (Tucker, Lawson, Gu & Maddison 2018). The most specific class of ``type(q)``'s method
    resolution order decides: a function registered for it, or a ``detached()`` method it defines
    itself (how a flow posterior provides its own).

    Raises:
        TypeError: when neither exists for q's type.
    """
    for cls in type(q).__mro__:
        if cls in _STOP_GRADIENT:
            return _STOP_GRADIENT[cls](q)
        if "detached" in vars(cls):
            detached: Distribution = q.detached()  # type: ignore[attr-defined]
            return detached
    raise TypeError(
        f"cannot stop the gradient of {type(q).__name__}'s parameters: give the class a "
        "detached() method returning a copy with detached parameters, or register one with "
        "vaelab.posteriors.register_stop_gradient"
    )


@register_stop_gradient(Normal)
def _stop_normal(q: Normal) -> Normal:
    return Normal(q.loc.detach(), q.scale.detach(), validate_args=False)


@register_stop_gradient(Independent)
def _stop_independent(q: Independent) -> Independent:
    return Independent(stop_gradient(q.base_dist), q.reinterpreted_batch_ndims, validate_args=False)


@register_stop_gradient(DiagonalNormal)
def _stop_diagonal_normal(q: DiagonalNormal) -> DiagonalNormal:
    # Rebuilt from log σ², as the encoder built it: σ = exp(½ log σ²) is recomputed bit for bit,
    # and the type (with its closed-form KL registration) is kept.
    return DiagonalNormal(q.base_dist.loc.detach(), q.log_var.detach())


@register_stop_gradient(MultivariateNormal)
def _stop_multivariate_normal(q: MultivariateNormal) -> MultivariateNormal:
    # From the Cholesky factor, whatever q was built from: log_prob reads only that factor.
    return MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach(), validate_args=False)
