"""Several stochastic layers: a posterior and a prior that are each one distribution over the
concatenated code z = [z₁, …, z_L].

The hierarchical model of Burda, Grosse & Salakhutdinov (2016, Sec. 2), after Rezende et al. (2014):

    p(x, z₁, …, z_L) = p(z_L) p(z_{L−1} | z_L) ⋯ p(z₁ | z₂) p(x | z₁),
    q(z₁, …, z_L | x) = q(z₁ | x) q(z₂ | z₁) ⋯ q(z_L | z_{L−1}),

each factor a Gaussian whose parameters a network reads off the layer it conditions on. Both sides
are chains of the same piece, a conditional distribution module (an encoder body and a Gaussian read
off its features: ``vaelab.posteriors.DiagonalGaussianPosterior`` over z_l instead of x), drawn
one after another: the posterior from z₁ up, the prior from z_L down. A chain is one
``torch.distributions.Distribution`` over ``[Σ_l d_l]`` with the layers stored z₁ first, so the
objectives, the trainer, IWAE, AIS and the gap see an ordinary latent code:

- ``log_prob`` sums the layers' log-densities, log q(z₁|x) + Σ_l log q(z_{l+1}|z_l) (for the
  prior, log p(z_L) + Σ_l log p(z_l|z_{l+1})), so every bound is log p(x, z₁, …, z_L) −
  log q(z₁, …, z_L | x);
- samples are ancestral, z_{l+1} = μ(z_l) + σ(z_l) ⊙ ε_{l+1}, reparameterised through every
  layer; :meth:`GaussianChain.from_noise` takes the ε of all layers at once (``[…, Σ_l d_l]``,
  laid out like z), so noise keyed per example (``vaelab.noise``) works as for one Gaussian;
- the KL term has no closed form and goes Monte Carlo by itself (``objectives.kl_term``);
- the mean of z₂, … has no closed form either: ``mean`` raises, and
  ``vaelab.noise.posterior_mean`` averages draws instead.

The likelihood reads z₁ alone (:class:`FirstLayerDecoder`).

Shapes: ``batch_shape [batch]`` for a posterior and ``[]`` for a prior, ``event_shape [Σ_l d_l]``;
samples ``[*samples, *batch, Σ_l d_l]``, log-densities ``[*samples, *batch]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from vaelab.noise import is_location_scale, location_scale_sample
from vaelab.posteriors import stop_gradient

__all__ = [
    "FirstLayerDecoder",
    "GaussianChain",
    "HierarchicalPosterior",
    "HierarchicalPrior",
    "LatentChain",
    "LocalLayersPosterior",
]


class LatentChain(Distribution):
    """A joint distribution over stochastic layers drawn one after another.

    ``first`` is the distribution of the first layer drawn (``batch_shape`` B); each of
    ``conditionals`` maps the layer drawn before it, ``[*S, *B, d]``, to the next layer's
    distribution (``batch_shape [*S, *B]``). ``sizes`` are the layers' sizes as stored in a code,
    z₁ first; ``reverse`` says that the draw order is z_L, …, z₁ (a prior) rather than z₁, …, z_L
    (a posterior). ``frozen`` evaluates the conditionals with their parameters detached: log q with
    a gradient only through z, for the stop-gradient estimators (:meth:`GaussianChain.detached`).
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.real_vector

    def __init__(
        self,
        first: Distribution,
        conditionals: Sequence[nn.Module],
        sizes: Sequence[int],
        *,
        reverse: bool = False,
        frozen: bool = False,
    ) -> None:
        self.sizes = tuple(int(d) for d in sizes)
        if len(self.sizes) != len(conditionals) + 1:
            raise ValueError(
                f"a chain of {len(self.sizes)} layers needs {len(self.sizes) - 1} conditionals, "
                f"got {len(conditionals)}"
            )
        self.first = first
        self.conditionals = tuple(conditionals)
        self.reverse = reverse
        self.frozen = frozen
        super().__init__(first.batch_shape, torch.Size([sum(self.sizes)]), validate_args=False)

    # ------------------------------------------------------------------------ layout
    def _blocks(self, value: torch.Tensor) -> list[torch.Tensor]:
        """``value [*, Σ_l d_l]`` cut into its layers, in draw order."""
        blocks = list(value.split(self.sizes, dim=-1))
        return blocks[::-1] if self.reverse else blocks

    def _join(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Layers in draw order → one code ``[*, Σ_l d_l]``, z₁ first."""
        return torch.cat(blocks[::-1] if self.reverse else blocks, dim=-1)

    def _conditional(self, index: int, previous: torch.Tensor) -> Distribution:
        """The distribution of the layer drawn after ``previous`` (``[*S, *B, d]``)."""
        module = self.conditionals[index]
        if not self.frozen:
            distribution: Distribution = module(previous)
            return distribution
        # The module is the live model's, so its weights cannot be detached in place: call it
        # with detached copies of them instead (the same numbers, no path back to the weights).
        detached = {
            name: tensor.detach()
            for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
        }
        frozen: Distribution = torch.func.functional_call(module, detached, (previous,))
        return frozen

    # ------------------------------------------------------------------------ density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of the layers' log-densities at ``value [*S, *B, Σ_l d_l]``: ``[*S, *B]``."""
        blocks = self._blocks(value)
        log_p = self.first.log_prob(blocks[0])
        for index, (previous, block) in enumerate(itertools.pairwise(blocks)):
            log_p = log_p + self._conditional(index, previous).log_prob(block)
        return log_p

    # ------------------------------------------------------------------------ sampling
    def sample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        """Ancestral draws ``[*sample_shape, *B, Σ_l d_l]``, without gradients."""
        with torch.no_grad():
            block = self.first.sample(torch.Size(sample_shape))
            blocks = [block]
            for index in range(len(self.conditionals)):
                block = self._conditional(index, block).sample()
                blocks.append(block)
        return self._join(blocks)

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        """Reparameterised ancestral draws (every layer must have ``rsample``)."""
        block = self.first.rsample(torch.Size(sample_shape))
        blocks = [block]
        for index in range(len(self.conditionals)):
            block = self._conditional(index, block).rsample()
            blocks.append(block)
        return self._join(blocks)

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__}: the mean of a layer drawn through a network has no closed "
            "form; average samples instead (vaelab.noise.posterior_mean does)"
        )

    @property
    def layer_slices(self) -> list[slice]:
        """Where each layer lies in a code, z₁ first."""
        ends = list(itertools.accumulate(self.sizes))
        return [slice(end - size, end) for size, end in zip(self.sizes, ends, strict=True)]


class GaussianChain(LatentChain):
    """A :class:`LatentChain` whose every layer is a Gaussian (a location-scale distribution), so
    that a code is a differentiable function of standard normal noise: the form the posterior
    needs (``from_noise``, ``rsample_and_log_prob``, ``detached``, as a flow posterior has)."""

    has_rsample = True

    def from_noise(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and log q(z) from standard normal ``eps [*S, *B, Σ_l d_l]`` (each layer's noise where
        that layer lies in z): z_first = μ + L ε_first, then z_next = μ(z) + L(z) ε_next layer by
        layer, the log-density summed on the way; differentiable in every parameter."""
        noise = self._blocks(eps)
        block = location_scale_sample(self.first, noise[0])
        log_q = self.first.log_prob(block)
        blocks = [block]
        for index, eps_next in enumerate(noise[1:]):
            conditional = self._conditional(index, block)
            block = location_scale_sample(conditional, eps_next)
            log_q = log_q + conditional.log_prob(block)
            blocks.append(block)
        return self._join(blocks), log_q

    def rsample_and_log_prob(
        self, sample_shape: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised z ``[*sample_shape, *B, Σ_l d_l]`` and its exact log-density
        ``[*sample_shape, *B]`` from one ancestral pass."""
        shape = self._extended_shape(torch.Size(sample_shape))
        like = _parameter_of(self.first)
        return self.from_noise(torch.randn(shape, dtype=like.dtype, device=like.device))

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def detached(self) -> GaussianChain:
        """The same chain with every parameter detached, the conditionals' network weights
        included: ``log_prob`` keeps its values and has a gradient through z only."""
        return GaussianChain(
            stop_gradient(self.first),
            self.conditionals,
            self.sizes,
            reverse=self.reverse,
            frozen=True,
        )


def _parameter_of(q: Distribution) -> torch.Tensor:
    """A tensor of a Gaussian's dtype and device: its location."""
    loc = getattr(getattr(q, "base_dist", q), "loc", None)
    if not isinstance(loc, torch.Tensor):
        raise TypeError(f"a Gaussian chain's layers must be Gaussian, got {type(q).__name__}")
    return loc


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
        # A model with several stochastic layers is never conditional (vaelab.registry).
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
    ``distribution()`` and ``batch_shape [n]``, e.g. ``vaelab.gap.LocalGaussianPosterior``), the
    amortised conditionals q(z_{l+1}|z_l) of ``chain`` kept as they are.

    The conditionals are shared across examples like an IAF's MADE weights are
    (``vaelab.flows.LocalFlowPosterior``), so the family contains the amortised posterior and the
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
