"""Several stochastic layers as one distribution over their concatenated code z = [z₁, …, z_L].

A chain draws its layers one after another, each from a conditional distribution of the layer
drawn before it; ``log_prob`` sums the layers' log-densities, so every bound sees an ordinary
latent code. The modules that make chains (the hierarchical posterior and prior) are
``vaelab.components.hierarchy``.

Shapes: ``batch_shape [batch]`` for a posterior and ``[]`` for a prior, ``event_shape [Σ_l d_l]``;
samples ``[*samples, *batch, Σ_l d_l]``, log-densities ``[*samples, *batch]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from vaelab.distributions.sampling import location_scale_sample
from vaelab.distributions.stop_gradient import stop_gradient

__all__ = ["GaussianChain", "LatentChain", "call_module"]


def call_module(module: nn.Module, value: torch.Tensor, *, frozen: bool = False) -> Distribution:
    """``module(value)``, or (``frozen``) the same numbers with no path back to its weights. The
    module is the live model's, so its weights cannot be detached in place: it is called with
    detached copies of them (``torch.func.functional_call``)."""
    if not frozen:
        distribution: Distribution = module(value)
        return distribution
    detached = {
        name: tensor.detach()
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
    }
    called: Distribution = torch.func.functional_call(module, detached, (value,))
    return called


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
        return call_module(self.conditionals[index], previous, frozen=self.frozen)

    # ------------------------------------------------------------------------ density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of the layers' log-densities at ``value [*S, *B, Σ_l d_l]``: ``[*S, *B]``."""
        blocks = self._blocks(value)
        log_p = self.first.log_prob(blocks[0])
        for index, (previous, block) in enumerate(itertools.pairwise(blocks)):
            log_p = log_p + self._conditional(index, previous).log_prob(block)
        return log_p

    def layer_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Each layer's log-density at ``value [*S, *B, Σ_l d_l]``, z₁'s first: ``[L, *S, *B]``.

        For a posterior the rows are log q(z₁|x), log q(z₂|z₁), …, log q(z_L|z_{L−1}); for a prior
        log p(z₁|z₂), …, log p(z_{L−1}|z_L), log p(z_L). They sum to ``log_prob``: the per-layer
        KL estimates of ``vaelab.objectives.layers`` are their differences."""
        blocks = self._blocks(value)
        terms = [self.first.log_prob(blocks[0])]
        for index, (previous, block) in enumerate(itertools.pairwise(blocks)):
            terms.append(self._conditional(index, previous).log_prob(block))
        if self.reverse:  # drawn z_L first: put z₁'s row first
            terms = terms[::-1]
        return torch.stack(torch.broadcast_tensors(*terms))

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
            "form; average samples instead (vaelab.objectives.noise.posterior_mean does)"
        )


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
