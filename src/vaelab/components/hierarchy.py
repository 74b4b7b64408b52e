"""Several stochastic layers: a posterior and a prior that are each one distribution over the
concatenated code z = [z₁, …, z_L].

The hierarchical model of Burda, Grosse & Salakhutdinov (2016, Sec. 2), after Rezende et al. (2014):

    p(x, z₁, …, z_L) = p(z_L) p(z_{L−1} | z_L) ⋯ p(z₁ | z₂) p(x | z₁),
    q(z₁, …, z_L | x) = q(z₁ | x) q(z₂ | z₁) ⋯ q(z_L | z_{L−1}),

each factor a Gaussian whose parameters a network reads off the layer it conditions on. Both sides
are chains of the same piece, a conditional distribution module (an encoder body and a Gaussian read
off its features: ``vaelab.components.posteriors.DiagonalGaussianPosterior`` over z_l instead of x), drawn
one after another: the posterior from z₁ up, the prior from z_L down. A chain is one
``torch.distributions.Distribution`` over ``[Σ_l d_l]`` with the layers stored z₁ first, so the
objectives, the trainer, IWAE, AIS and the gap see an ordinary latent code:

- ``log_prob`` sums the layers' log-densities, log q(z₁|x) + Σ_l log q(z_{l+1}|z_l) (for the
  prior, log p(z_L) + Σ_l log p(z_l|z_{l+1})), so every bound is log p(x, z₁, …, z_L) −
  log q(z₁, …, z_L | x);
- samples are ancestral, z_{l+1} = μ(z_l) + σ(z_l) ⊙ ε_{l+1}, reparameterised through every
  layer; :meth:`GaussianChain.from_noise` takes the ε of all layers at once (``[…, Σ_l d_l]``,
  laid out like z), so noise keyed per example (``vaelab.objectives.noise``) works as for one Gaussian;
- the KL term has no closed form and goes Monte Carlo by itself (``objectives.kl_term``);
- the mean of z₂, … has no closed form either: ``mean`` raises, and
  ``vaelab.objectives.noise.posterior_mean`` averages draws instead.

The likelihood reads z₁ alone (:class:`FirstLayerDecoder`).

Shapes: ``batch_shape [batch]`` for a posterior and ``[]`` for a prior, ``event_shape [Σ_l d_l]``;
samples ``[*samples, *batch, Σ_l d_l]``, log-densities ``[*samples, *batch]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from vaelab.distributions.chain import GaussianChain, LatentChain
from vaelab.distributions.sampling import is_location_scale

__all__ = [
    "FirstLayerDecoder",
    "HierarchicalPosterior",
    "HierarchicalPrior",
    "LocalLayersPosterior",
]


class HierarchicalPosterior(nn.Module):
    """q(z₁, …, z_L | x) = q(z₁|x) q(z₂|z₁) ⋯ q(z_L|z_{L−1}).

    ``first`` is an encoder module x → q(z₁|x); ``conditionals[l]`` a module z_{l+1} → q(z_{l+2} |
    z_{l+1}) (the same kind of module, its body reading a layer instead of x). ``sizes`` are
    d₁, …, d_L. ``forward(x)`` returns a :class:`GaussianChain` with ``batch_shape [batch]``.
    """

    def __init__(
        self, first: nn.Module, conditionals: Sequence[nn.Module], sizes: Sequence[int]
    ) -> None:
        super().__init__()
        self.first = first
        self.conditionals = nn.ModuleList(conditionals)
        self.sizes = tuple(sizes)

    def forward(self, x: torch.Tensor) -> GaussianChain:
        return GaussianChain(self.first(x), tuple(self.conditionals), self.sizes)


class HierarchicalPrior(nn.Module):
    """p(z₁, …, z_L) = p(z_L) p(z_{L−1}|z_L) ⋯ p(z₁|z₂).

    ``top`` is a prior module for p(z_L) (``forward() -> Distribution``); ``conditionals`` are in
    draw order, the first z_L → p(z_{L−1}|z_L), the last z₂ → p(z₁|z₂). ``sizes`` are d₁, …, d_L.
    ``forward()`` returns a :class:`GaussianChain` when p(z_L) is Gaussian, else (a mixture) a
    :class:`LatentChain`, which samples ancestrally without a noise form; ``batch_shape []``.
    """

    def __init__(
        self, top: nn.Module, conditionals: Sequence[nn.Module], sizes: Sequence[int]
    ) -> None:
        super().__init__()
        self.top = top
        self.conditionals = nn.ModuleList(conditionals)
        self.sizes = tuple(sizes)

    def forward(self, condition: torch.Tensor | None = None) -> LatentChain:
        # A model with several stochastic layers is never conditional (vaelab.model.registry).
        top = self.top()
        chain = GaussianChain if is_location_scale(top) else LatentChain
        return chain(top, tuple(self.conditionals), self.sizes, reverse=True)


class FirstLayerDecoder(nn.Module):
    """A decoder body that reads z₁ alone, p(x | z₁, …, z_L) = p(x | z₁): ``[*lead, Σ_l d_l] →``
    the body's output for ``[*lead, d₁]``."""

    def __init__(self, body: nn.Module, size: int) -> None:
        super().__init__()
        self.body = body
        self.size = size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z[..., : self.size])


class LocalLayersPosterior(nn.Module):
    """Non-amortised posteriors for a hierarchical model: q*_n(z₁) q(z₂|z₁) ⋯ q(z_L|z_{L−1}), the
    first layer's per-example parameters held by ``first`` (a local posterior module with
    ``distribution()`` and ``batch_shape [n]``, e.g. ``vaelab.evaluation.gap.LocalGaussianPosterior``), the
    amortised conditionals q(z_{l+1}|z_l) of ``chain`` kept as they are.

    The conditionals are shared across examples like an IAF's MADE weights are
    (``vaelab.components.flows.LocalFlowPosterior``), so the family contains the amortised posterior and the
    amortisation gap ELBO(q*) − ELBO(q) measures what the encoder of z₁ loses by sharing one
    network. The conditionals' modules are held without registering them: they belong to the
    model, whose parameters a fit of q* leaves alone.
    """

    def __init__(self, first: nn.Module, chain: GaussianChain) -> None:
        super().__init__()
        self.first = first
        self._chain = (chain,)

    @property
    def n_examples(self) -> int:
        return int(self._chain[0].batch_shape[0])

    def distribution(self) -> GaussianChain:
        chain = self._chain[0]
        first = cast(Any, self.first).distribution()  # a local posterior module's
        return GaussianChain(first, chain.conditionals, chain.sizes)

    def forward(self, x: torch.Tensor) -> GaussianChain:
        if x.shape[0] != self.n_examples:
            raise ValueError(
                f"these local posteriors belong to {self.n_examples} examples, got {x.shape[0]}"
            )
        return self.distribution()
