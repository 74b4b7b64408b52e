"""The two Gaussians every VAE meets, under their own types so that the KL between them dispatches
to its closed form (``vaelab.distributions.kl``): the diagonal Gaussian q(z|x) = N(μ, diag σ²) an
encoder returns, and the standard normal prior N(0, I).

Shapes: ``loc, log_var: [batch, latent]`` → ``batch_shape [batch]``, ``event_shape [latent]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributions import Independent, Normal


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


class StandardNormal(Independent):
    """N(0, I) over ``[latent]``: ``Independent(Normal(0, 1), 1)`` under its own type, so that
    ``kl_divergence(q, p)`` for a diagonal Gaussian q dispatches to the closed form
    ½ Σⱼ (μⱼ² + σⱼ² − log σⱼ² − 1) registered in ``vaelab.distributions.kl``. ``zeros`` (``[latent]``) sets the
    size, dtype and device."""

    def __init__(self, zeros: torch.Tensor) -> None:
        base = Normal(zeros, torch.ones_like(zeros), validate_args=False)
        super().__init__(base, 1, validate_args=False)
