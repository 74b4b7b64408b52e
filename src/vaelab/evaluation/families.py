"""The variational families a per-example q* is optimised in (Cremer, Li & Duvenaud 2018), as
objects: each knows which amortised posteriors it contains, how to start a per-example posterior
at one, and which family's q* is the better proposal for log p(x).

- ``GaussianFamily("diagonal")`` and ``GaussianFamily("full")``: q_n = N(μ_n, diag σ_n²) or
  N(μ_n, L_n L_nᵀ) (``LocalGaussianPosterior``); the full family contains the diagonal one;
- ``FlowFamily("planar" | "iaf")``: the amortised flow's maps with per-example parameters
  (``vaelab.components.flows.LocalFlowPosterior``), containing that flow alone;
- ``LayersFamily(first)``: several stochastic layers, q_n(z₁) in ``first`` followed by the model's
  q(z₂|z₁), … (``vaelab.components.hierarchy.LocalLayersPosterior``);
- ``TopDownFamily()``: top-down inference with each example's bottom-up evidence free, merged
  with the model's prior networks (``vaelab.components.top_down.LocalTopDownPosterior``).

A new posterior family is a new class here, not a new branch in ``vaelab.evaluation.gap``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from vaelab.components.flows import FlowDistribution, LocalFlowPosterior
from vaelab.components.hierarchy import LocalLayersPosterior
from vaelab.components.top_down import LocalTopDownPosterior
from vaelab.distributions.chain import GaussianChain
from vaelab.distributions.top_down import TopDownChain
from vaelab.objectives.discrete import is_discrete

GAUSSIAN_FAMILIES = ("diagonal", "full")


class Family(ABC):
    """A family of per-example posteriors q_n(z), named as ``vaelab gap`` and its JSON name it."""

    name: str

    @abstractmethod
    def contains(self, q: Distribution) -> bool:
        """Whether the amortised posterior ``q`` is a member (its q_n can start at it)."""

    @abstractmethod
    def local_posterior(self, q: Distribution) -> LocalPosterior:
        """Per-example posteriors of this family started at ``q`` (``batch_shape [n]``)."""

    def proposal(self) -> Family:
        """The family whose q* proposes for the IWAE estimate of log p(x) next to this one's."""
        return self


class LocalGaussianPosterior(nn.Module):
    """A separate Gaussian q_n(z) for each of n examples: non-amortised variational parameters.

    ``family="diagonal"``: q_n = N(μ_n, diag σ_n²), parameters μ and log σ.
    ``family="full"``: q_n = N(μ_n, L_n L_nᵀ) with L_n lower triangular, parameters μ, log diag L
    and the strictly lower triangle of L (every value gives a valid covariance).

    It follows the posterior contract, ``forward(x) -> Distribution`` with ``batch_shape [n]``,
    so the objectives take it in place of an encoder; ``x`` must be the n examples it was made for
    (only their number is checked).
    """

    _rows: torch.Tensor
    _cols: torch.Tensor

    def __init__(
        self,
        loc: torch.Tensor,
        scale_tril: torch.Tensor,
        family: str = "diagonal",
    ) -> None:
        super().__init__()
        if family not in GAUSSIAN_FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {GAUSSIAN_FAMILIES}")
        n, latent = loc.shape
        if tuple(scale_tril.shape) != (n, latent, latent):
            raise ValueError(
                f"scale_tril must be [n, latent, latent] = {(n, latent, latent)}, "
                f"got {tuple(scale_tril.shape)}"
            )
        self.family = family
        diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
        if not bool((diagonal > 0).all()):
            raise ValueError("scale_tril must have a positive diagonal")
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_diag = nn.Parameter(diagonal.detach().log())
        rows, cols = torch.tril_indices(latent, latent, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        if family == "full":
            self.lower = nn.Parameter(scale_tril.detach()[:, rows, cols].clone())

    @classmethod
    def from_distribution(cls, q: Distribution, family: str) -> LocalGaussianPosterior:
        """Start from a Gaussian q with ``batch_shape [n]``, e.g. the amortised q(z|x). A
        full-covariance q cannot start a diagonal family: that would change the family."""
        if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
            scale_tril = torch.diag_embed(q.base_dist.scale)
        elif isinstance(q, MultivariateNormal):
            if family == "diagonal":
                raise ValueError(
                    "the amortised posterior has a full covariance, which the diagonal family "
                    "does not contain; use family='full'"
                )
            scale_tril = q.scale_tril
        else:
            raise ValueError(
                "optimised posteriors start from a Gaussian amortised posterior (diagonal or "
                f"full covariance), got {type(q).__name__}"
            )
        return cls(q.mean.detach(), scale_tril.detach(), family)

    @property
    def n_examples(self) -> int:
        return int(self.loc.shape[0])

    def scale_tril(self) -> torch.Tensor:
        """L ``[n, latent, latent]``."""
        tril = torch.diag_embed(self.log_diag.exp())
        if self.family == "full":
            tril[:, self._rows, self._cols] = self.lower
        return tril

    def distribution(self) -> Distribution:
        if self.family == "diagonal":
            return Independent(Normal(self.loc, self.log_diag.exp()), 1)
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril())

    def forward(self, x: torch.Tensor) -> Distribution:
        if x.shape[0] != self.n_examples:
            raise ValueError(
                f"these local posteriors belong to {self.n_examples} examples, got {x.shape[0]}"
            )
        return self.distribution()


# A per-example posterior: forward(x) and distribution(), both with batch_shape [n].
LocalPosterior = (
    LocalGaussianPosterior | LocalFlowPosterior | LocalLayersPosterior | LocalTopDownPosterior
)


class GaussianFamily(Family):
    """Per-example Gaussians, diagonal or with a full covariance (``LocalGaussianPosterior``)."""

    def __init__(self, name: str) -> None:
        if name not in GAUSSIAN_FAMILIES:
            raise ValueError(f"unknown family {name!r}; choose one of {GAUSSIAN_FAMILIES}")
        self.name = name

    def contains(self, q: Distribution) -> bool:
        diagonal = isinstance(q, Independent) and isinstance(q.base_dist, Normal)
        return diagonal or (self.name == "full" and isinstance(q, MultivariateNormal))

    def local_posterior(self, q: Distribution) -> LocalPosterior:
        return LocalGaussianPosterior.from_distribution(q, self.name)

    def proposal(self) -> Family:
        # A diagonal q* is too narrow a proposal (heavy-tailed importance weights); a full
        # covariance keeps the weights' variance finite.
        return self if self.name == "full" else GaussianFamily("full")


class FlowFamily(Family):
    """The amortised flow's maps with per-example parameters: only that flow is a member."""

    def __init__(self, name: str) -> None:
        self.name = name

    def contains(self, q: Distribution) -> bool:
        return isinstance(q, FlowDistribution) and q.family == self.name

    def local_posterior(self, q: Distribution) -> LocalPosterior:
        assert isinstance(q, FlowDistribution)
        return LocalFlowPosterior(q)


class LayersFamily(Family):
    """Several stochastic layers: the first layer's q_n(z₁) in ``first``, the model's
    conditionals q(z₂|z₁), … kept as they are."""

    def __init__(self, first: Family) -> None:
        self.first = first
        self.name = first.name

    def contains(self, q: Distribution) -> bool:
        return isinstance(q, GaussianChain) and self.first.contains(q.first)

    def local_posterior(self, q: Distribution) -> LocalPosterior:
        assert isinstance(q, GaussianChain)
        first = self.first.local_posterior(q.first)
        assert isinstance(first, LocalGaussianPosterior)
        return LocalLayersPosterior(first, q)

    def proposal(self) -> Family:
        proposal = self.first.proposal()
        return self if proposal is self.first else LayersFamily(proposal)


class TopDownFamily(Family):
    """Top-down posteriors whose per-layer evidence (μ̂_l, log σ̂_l²) is each example's own,
    merged with the model's prior networks: contains the amortised top-down posterior alone."""

    name = "top-down"

    def contains(self, q: Distribution) -> bool:
        return isinstance(q, TopDownChain)

    def local_posterior(self, q: Distribution) -> LocalPosterior:
        assert isinstance(q, TopDownChain)
        return LocalTopDownPosterior(q)


def families_of(q: Distribution) -> tuple[Family, ...]:
    """The families that contain the amortised posterior ``q``, simplest first. A diagonal
    Gaussian lies in both Gaussian families, a full-covariance one in the full family alone, a
    flow in its own; several stochastic layers go by their first layer."""
    if isinstance(q, GaussianChain):
        return tuple(LayersFamily(first) for first in families_of(q.first))
    if isinstance(q, FlowDistribution):
        return (FlowFamily(q.family),)
    if isinstance(q, TopDownChain):
        return (TopDownFamily(),)
    found = tuple(family for family in map(GaussianFamily, GAUSSIAN_FAMILIES) if family.contains(q))
    if not found and is_discrete(q):
        raise ValueError(
            "the inference gaps fit each example's own q* in a continuous family, and this "
            "model's code is discrete; its exact gap is log p(x) − ELBO (evaluate --exact)"
        )
    if not found:
        raise ValueError(f"cannot tell the family of a {type(q).__name__} posterior")
    return found


def family_named(q: Distribution, name: str | None) -> Family:
    """The family called ``name`` (default: the simplest containing ``q``), refused in a
    sentence when it does not contain ``q``."""
    found = families_of(q)
    if name is None:
        return found[0]
    for family in found:
        if family.name == name:
            return family
    names = " or ".join(f"family={family.name!r}" for family in found)
    if name in GAUSSIAN_FAMILIES or isinstance(q, FlowDistribution):
        raise ValueError(
            f"the {name} family does not contain the amortised posterior (a "
            f"{found[0].name} one); use {names}"
        )
    raise ValueError(f"unknown family {name!r}; {names} contains this posterior")
