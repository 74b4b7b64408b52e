"""Top-down inference (``inference="top-down"``): the Ladder VAE's posterior over any number of
stochastic layers (Sønderby et al. 2016), in the form NVAE (Vahdat & Kautz 2020) and VDVAE (Child
2021) grow to depth.

Two passes. A deterministic bottom-up pass over x gives features for each layer, d₁(x), …,
d_L(x), and from each the evidence (μ̂_l, log σ̂_l²) (:class:`BottomUpMLP`, or the convolutional
``vaelab.components.top_down_conv.BottomUpConv``). Then the generative path runs from z_L down:
p(z_L), p(z_{L−1} | z_L), …, p(z₁ | z₂), the prior's own networks, and each layer's posterior is the
precision-weighted merge of the prior's conditional at the layer above and the evidence
(``vaelab.distributions.top_down.merge``). The likelihood reads z₁.

The prior is :class:`TopDownPrior` (the hierarchical prior of ``vaelab.components.hierarchy``,
whose distributions the posterior's draws know as their own); the posterior :class:`TopDownPosterior` holds the bottom-up
pass and *calls* the prior's networks without owning them, so the generative weights exist once,
under ``prior.`` in a state dict, and q and p share them.

Shapes: x ``[batch, *data_shape]``; evidence ``[batch, d_l]`` per layer, z₁ first; the
distributions those of ``vaelab.distributions.top_down``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vaelab.components.hierarchy import HierarchicalPrior
from vaelab.components.networks import MLP, InputScale, activation_module
from vaelab.distributions.top_down import TopDownChain, TopDownPriorChain

__all__ = [
    "BottomUpMLP",
    "LocalTopDownPosterior",
    "TopDownPosterior",
    "TopDownPrior",
    "split_evidence",
]

Evidence = list[tuple[torch.Tensor, torch.Tensor]]


def split_evidence(outputs: Sequence[torch.Tensor], sizes: Sequence[int]) -> Evidence:
    """Each head's ``[batch, 2 d_l]`` cut into (μ̂_l, log σ̂_l²)."""
    evidence: Evidence = []
    for out, d in zip(outputs, sizes, strict=True):
        if out.shape[-1] != 2 * d:
            raise ValueError(f"a head gave {out.shape[-1]} features for a layer of {d} units")
        loc, log_var = out.chunk(2, dim=-1)  # chunk: a step cheaper than split's wrapper
        evidence.append((loc, log_var))
    return evidence


class BottomUpMLP(nn.Module):
    """The deterministic bottom-up pass for flat data: h₁ = MLP(x) of width F = ``hidden[-1]``,
    h_{l+1} = act(MLP(h_l)) (as deep as ``hidden``), and the evidence of layer l a linear head on
    h_l, ``[batch, 2 d_l]`` → (μ̂_l, log σ̂_l²).

    With ``hidden=()`` every h_l is x itself and each head one affine map of x: a linear
    posterior, the linear-Gaussian oracle's family (``tests/test_top_down.py``).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        sizes: Sequence[int],
        activation: str,
    ) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.input_scale = InputScale()
        self.data_shape = tuple(data_shape)
        width = hidden[-1] if hidden else int(torch.Size(data_shape).numel())
        self.stages = nn.ModuleList()
        if hidden:
            self.stages.append(
                nn.Sequential(
                    MLP(self.data_shape, hidden[:-1], width, activation),
                    activation_module(activation),
                )
            )
            for _ in self.sizes[1:]:
                self.stages.append(
                    nn.Sequential(
                        MLP((width,), (width,) * (len(hidden) - 1), width, activation),
                        activation_module(activation),
                    )
                )
        self.heads = nn.ModuleList(nn.Linear(width, 2 * d) for d in self.sizes)

    def forward(self, x: torch.Tensor) -> Evidence:
        h = self.input_scale(x).flatten(-len(self.data_shape))
        outputs = []
        for index, head in enumerate(self.heads):
            if len(self.stages) > 0:
                h = self.stages[index](h)
            outputs.append(head(h))
        return split_evidence(outputs, self.sizes)


class TopDownPrior(HierarchicalPrior):
    """p(z_L) ∏_{l<L} p(z_l | z_{l+1}) (``vaelab.components.hierarchy.HierarchicalPrior``) whose
    distributions name this module as their source, as the posterior's chains drawn through its
    networks do: a bound then takes log p(z) from the posterior's draw
    (``vaelab.distributions.top_down.TopDownChain.draw_with_log_ratio``). ``top`` must give a
    diagonal Gaussian."""

    def forward(self, condition: torch.Tensor | None = None) -> TopDownPriorChain:
        return TopDownPriorChain(self.top(), tuple(self.conditionals), self.sizes, source=self)


class TopDownPosterior(nn.Module):
    """q(z | x) = q(z_L | x) ∏ q(z_l | z_{l+1}, x), drawn top-down through ``prior``'s networks.

    ``bottom_up`` maps x to each layer's evidence (μ̂_l, log σ̂_l²), z₁ first. ``prior`` is held
    without registering it: it is the model's prior, whose weights the state dict and the
    optimiser see once, under ``prior.``; the posterior calls them (shared, not copied).
    ``forward(x)`` returns a :class:`vaelab.distributions.top_down.TopDownChain`, ``batch_shape
    [batch]``.
    """

    def __init__(self, bottom_up: nn.Module, prior: TopDownPrior) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        self._prior = (prior,)

    @property
    def prior(self) -> TopDownPrior:
        return self._prior[0]

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.prior.sizes

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> TopDownChain:
        # A top-down model is never conditional (vaelab.model.registry refuses it).
        prior = self.prior
        return TopDownChain(
            prior.top(),
            tuple(prior.conditionals),
            self.bottom_up(x),
            prior.sizes,
            source=prior,
        )


class LocalTopDownPosterior(nn.Module):
    """Non-amortised top-down posteriors for the inference gap: each example's evidence (μ̂_l,
    log σ̂_l²) of every layer a free parameter, started at the amortised q's, merged with the
    model's prior networks as they are (held, not registered: a fit of q* leaves the model
    alone). The family contains the amortised posterior, so ELBO(q*) − ELBO(q) is the
    amortisation gap of the bottom-up pass."""

    def __init__(self, q: TopDownChain) -> None:
        super().__init__()
        self.locs = nn.ParameterList(nn.Parameter(loc.detach().clone()) for loc, _ in q.evidence)
        self.log_vars = nn.ParameterList(
            nn.Parameter(log_var.detach().clone()) for _, log_var in q.evidence
        )
        self._chain = (q,)

    @property
    def n_examples(self) -> int:
        return int(self.locs[0].shape[0])

    def distribution(self) -> TopDownChain:
        q = self._chain[0]
        evidence = list(zip(self.locs, self.log_vars, strict=True))
        return TopDownChain(q.top, q.conditionals, evidence, q.sizes, source=q.source)

    def forward(self, x: torch.Tensor) -> TopDownChain:
        if x.shape[0] != self.n_examples:
            raise ValueError(
                f"these local posteriors belong to {self.n_examples} examples, got {x.shape[0]}"
            )
        return self.distribution()
