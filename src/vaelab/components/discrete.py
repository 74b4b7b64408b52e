"""Discrete latent codes as components: posteriors q(z|x) whose encoder gives logits, and
factorised priors p(z) over the same codes (``vaelab.distributions.discrete``).

- ``BernoulliPosterior``: D binary units, q(z|x) = Πⱼ Bernoulli(σ(lⱼ(x))), ``event_shape [D]``.
- ``CategoricalPosterior``: D groups of K classes, q(z|x) = Π_d Cat(softmax(l_d(x))), each group
  one-hot and the groups laid flat, ``event_shape [D·K]``.
- ``BernoulliPrior`` / ``CategoricalPrior``: uniform (Bernoulli(½), 1/K per class) or, with
  ``learnable=True``, one learned logit per unit (per class), factorised; ``batch_shape []``.

Their samples cannot be reparameterised, so a discrete posterior also holds what the score-function
estimators learn beside the model (``EstimatorState``): NVIL's input-dependent baseline b_ψ(x)
and the running mean and variance of the centred learning signal (Mnih & Gregor 2014), and the
relaxation's temperature. Held by the posterior, they are saved, checkpointed and optimised with
the model's other parameters, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from vaelab.components.networks import MLP
from vaelab.distributions.discrete import BernoulliCode, OneHotCategoricalGroups

BASELINE_HIDDEN = 100  # NVIL's baseline network: one hidden layer of 100 units (Mnih & Gregor 2014)


class EstimatorState(nn.Module):
    """What gradient estimators for a discrete code keep between steps.

    ``baseline``: b_ψ(x) ``[batch, *data_shape] → [batch]``, an MLP with one hidden layer trained
    to minimise (signal − b_ψ(x))². ``signal_mean`` and ``signal_var``: exponential running
    moments of the centred signal, by which it is normalised (NVIL's variance normalisation).
    ``temperature`` and ``straight_through``: the relaxation's, set by the trainer at every step
    (``vaelab.objectives.discrete.set_relaxation``); a function of the step, not saved state.
    """

    signal_mean: torch.Tensor
    signal_var: torch.Tensor

    def __init__(self, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.baseline = MLP(data_shape, (BASELINE_HIDDEN,), 1, "tanh", reads_data=True)
        self.register_buffer("signal_mean", torch.zeros(()))
        self.register_buffer("signal_var", torch.ones(()))
        self.temperature = 1.0
        self.straight_through = False
        # The last training step's (Σ c, Σ c², count) of the centred signal, until settled
        # (``vaelab.objectives.discrete.update_signal_moments``).
        self.pending: torch.Tensor | None = None


class BernoulliPosterior(nn.Module):
    """q(z|x) = Πⱼ Bernoulli(σ(lⱼ(x))) with the encoder's D outputs as logits."""

    def __init__(self, encoder: nn.Module, latent_dim: int, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent_dim = latent_dim
        self.estimator = EstimatorState(data_shape)

    @staticmethod
    def n_params(latent_dim: int) -> int:
        return latent_dim

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Distribution:
        return BernoulliCode(self.encoder(x))


class CategoricalPosterior(nn.Module):
    """q(z|x) = Π_d Cat(softmax(l_d(x))) with the encoder's D·K outputs as D groups of K logits."""

    def __init__(
        self, encoder: nn.Module, groups: int, categories: int, data_shape: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.groups, self.categories = groups, categories
        self.estimator = EstimatorState(data_shape)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Distribution:
        logits = self.encoder(x).unflatten(-1, (self.groups, self.categories))
        return OneHotCategoricalGroups(logits)


def _zero_logits(module: nn.Module, shape: tuple[int, ...], learnable: bool) -> None:
    """``module.logits``: zeros (the uniform distribution), a parameter if ``learnable``, else a
    buffer (saved with the model, never trained)."""
    if learnable:
        module.logits = nn.Parameter(torch.zeros(shape))
    else:
        module.register_buffer("logits", torch.zeros(shape))


class BernoulliPrior(nn.Module):
    """p(z) = Πⱼ Bernoulli(σ(mⱼ)): m = 0 (uniform, each unit ½) fixed, or learned from 0."""

    logits: torch.Tensor

    def __init__(self, latent_dim: int, learnable: bool = False) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        _zero_logits(self, (latent_dim,), learnable)

    def forward(self, condition: torch.Tensor | None = None) -> Distribution:
        return BernoulliCode(self.logits)


class CategoricalPrior(nn.Module):
    """p(z) = Π_d Cat(softmax(m_d)): m = 0 (1/K per class) fixed, or learned from 0."""

    logits: torch.Tensor

    def __init__(self, groups: int, categories: int, learnable: bool = False) -> None:
        super().__init__()
        self.latent_dim = groups * categories
        _zero_logits(self, (groups, categories), learnable)

    def forward(self, condition: torch.Tensor | None = None) -> Distribution:
        return OneHotCategoricalGroups(self.logits)


DISCRETE_PRIORS = (BernoulliPrior, CategoricalPrior)  # the prior modules of a discrete code
