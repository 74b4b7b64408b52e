"""Priors p(z) over the latent code.

Every prior is an ``nn.Module`` whose ``forward(condition=None)`` returns a distribution with
``event_shape [latent]``. A prior that does not depend on the condition y of a conditional model
(Sohn, Lee & Yan 2015) ignores it, p(z|y) = p(z), and has ``batch_shape []``; the conditional
prior p(z|y) reads y ``[batch, c]`` and has ``batch_shape [batch]``. The ELBO asks
``torch.distributions.kl_divergence`` for KL(q ‖ p) and falls back to a Monte Carlo estimate by
itself where no closed form exists (mixtures, VampPrior), so a new prior needs nothing but this
class.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from vaelab.distributions.normal import StandardNormal


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I), whatever the condition."""

    loc: torch.Tensor

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self._distribution: StandardNormal | None = None

    def forward(self, condition: torch.Tensor | None = None) -> Distribution:
        # Built once and reused: it has no parameters, and the training loop asks for it at every
        # step. ``.to()`` replaces the buffer, which makes a new one on the new device or dtype.
        if self._distribution is None or self._distribution.base_dist.loc is not self.loc:
            self._distribution = StandardNormal(self.loc)
        return self._distribution


class LearnableGaussianPrior(nn.Module):
    """p(z) = N(m, diag s²) with m and log s learned, starting at N(0, I)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, condition: torch.Tensor | None = None) -> Distribution:
        return Independent(Normal(self.loc, self.log_scale.exp()), 1)


class MixtureOfGaussiansPrior(nn.Module):
    """p(z) = Σₖ πₖ N(mₖ, diag sₖ²), all parameters learned.

    Means start spread as N(0, I) draws from a fixed seed, so the start does not depend on global
    random state, and components are distinguishable from the first step.
    """

    def __init__(self, latent_dim: int, n_components: int = 10) -> None:
        super().__init__()
        start = torch.Generator().manual_seed(0)
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.locs = nn.Parameter(torch.randn(n_components, latent_dim, generator=start))
        self.log_scales = nn.Parameter(torch.zeros(n_components, latent_dim))

    def forward(self, condition: torch.Tensor | None = None) -> Distribution:
        components = Independent(Normal(self.locs, self.log_scales.exp()), 1)
        return MixtureSameFamily(Categorical(logits=self.logits), components)


class ConditionalGaussianPrior(nn.Module):
    """p(z|y) = N(m(y), diag s(y)²) with [m(y), log s(y)] = W y + b, learned, starting at N(0, I)
    (W = 0, b = 0): the conditional prior of Sohn, Lee & Yan (2015, Sec. 4.1), there a network
    p_θ(z|x) of the input x the output y is predicted from; here of the condition y ``[batch, c]``,
    through one affine map. For one-hot labels that is one free diagonal Gaussian per class, the
    most general conditional diagonal Gaussian there is; for a vector y, mean and log-scale
    affine in y. ``forward(y)`` has ``batch_shape [batch]``; the KL against a Gaussian posterior
    is the closed form torch registers for ``Independent(Normal)`` pairs."""

    def __init__(self, latent_dim: int, condition_dim: int) -> None:
        super().__init__()
        if condition_dim < 1:
            raise ValueError(
                "a conditional prior p(z|y) needs a condition to read (condition_dim ≥ 1); "
                "use prior='normal' or 'learnable' for a model without one"
            )
        self.latent_dim = latent_dim
        self.condition_dim = condition_dim
        self.map = nn.Linear(condition_dim, 2 * latent_dim)
        with torch.no_grad():
            self.map.weight.zero_()
            self.map.bias.zero_()

    def forward(self, condition: torch.Tensor | None = None) -> Distribution:
        if condition is None:
            raise ValueError(
                "the conditional prior p(z|y) needs the condition y; bind it with VAEModel.given(y)"
            )
        loc, log_scale = self.map(condition.to(self.map.weight.dtype)).split(self.latent_dim, -1)
        # Not validated: built from learned parameters at every step, as the posterior is.
        normal = Normal(loc, log_scale.exp(), validate_args=False)
        return Independent(normal, 1, validate_args=False)


class VampPrior(nn.Module):
    """The variational mixture of posteriors prior (Tomczak & Welling 2018, eq. 9):
    p(z) = (1/K) Σₖ q_φ(z | uₖ), with K learned pseudo-inputs uₖ shaped like the data.

    The posterior module is held without registering it as a sub-module: it already belongs to the
    model, and a second registration would store its weights twice.
    """

    def __init__(
        self, posterior: nn.Module, data_shape: tuple[int, ...], n_pseudo_inputs: int = 500
    ) -> None:
        super().__init__()
        start = torch.Generator().manual_seed(0)
        # Pseudo-inputs start near the middle of [0, 1], where image data lives (the paper's choice).
        self.pseudo_inputs = nn.Parameter(
            0.5 + 0.01 * torch.randn(n_pseudo_inputs, *data_shape, generator=start)
        )
        self._posterior = (posterior,)

    def forward(self, condition: torch.Tensor | None = None) -> Distribution:
        components = self._posterior[0](self.pseudo_inputs)  # batch_shape [K], event [latent]
        k = self.pseudo_inputs.shape[0]
        weights = Categorical(
            logits=torch.full((k,), -math.log(k), device=self.pseudo_inputs.device)
        )
        return MixtureSameFamily(weights, components)
