"""MADE: a masked multilayer perceptron whose outputs are autoregressive in its inputs.

Germain, Gregor, Murray & Larochelle (2015), "MADE: Masked autoencoder for distribution estimation",
Sec. 4: give input j the degree j + 1 (1 … D), each hidden unit k a degree m(k), and keep a weight
only where the degrees allow it,

    input j → hidden k:   m(k) ≥ j + 1,      hidden k → hidden k′:  m(k′) ≥ m(k),
    hidden k → output i:  i + 1 > m(k),

so that every path into output i passes only through inputs j < i: output i is a function of
z_0 … z_{i−1} (and of the context) alone, and ∂(output i)/∂z_j = 0 for j ≥ i.

A context vector ``h`` (the encoder's extra output in Kingma et al. 2016's inverse autoregressive
flow) enters the first hidden layer through an unmasked weight. For it to reach every output,
hidden degrees here run over 0 … D − 1 rather than MADE's 1 … D − 1: units of degree 0 see no z
and only the context, and they are the only units output 0 may see (with degrees from 1, output 0
would be a constant bias, the same for every example). Degrees cycle (MADE's deterministic choice),
so every degree is present in a layer of at least D units.

The network is kept in two forms: the ``nn.Module`` that owns the learnable weights, and
:class:`MadeWeights`, the masked tensors themselves, which :func:`made_apply` evaluates. A
distribution holds the second form, so that it can stop their gradients (``detach``) without
touching the module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MADE", "MadeWeights", "context_term", "made_apply"]


class MadeWeights(NamedTuple):
    """The masked weights of one MADE, ready to evaluate.

    ``layers``: ``(weight, bias)`` per layer from input to output, each weight already multiplied
    by its mask: ``[hidden₀, D]``, ``[hidden₁, hidden₀]``, …, ``[outputs · D, hidden_last]``.
    ``context``: the unmasked ``[hidden₀, context]`` weight of the context input.
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    context: torch.Tensor

    def detach(self) -> MadeWeights:
        """The same weights with their gradients stopped."""
        return MadeWeights(
            tuple((w.detach(), b.detach()) for w, b in self.layers), self.context.detach()
        )


def made_apply(
    weights: MadeWeights, z: torch.Tensor, context_term: torch.Tensor | None = None
) -> torch.Tensor:
    """Evaluate a MADE: ``z: [*lead, D] → [*lead, outputs · D]``.

    ``context_term`` is the context's contribution to the first hidden layer,
    ``h @ contextᵀ`` ``[*batch, hidden₀]``, broadcast against ``[*lead, hidden₀]``; a
    distribution computes it once per set of samples (see :func:`context_term`).
    """
    (first_weight, first_bias), *rest = weights.layers
    x = F.linear(z, first_weight, first_bias)
    if context_term is not None:
        x = x + context_term
    for weight, bias in rest:
        # ELU: smooth, so the flow's density is smooth in z; unbounded above, so the network can
        # move m and s by large amounts where the posterior needs it.
        x = F.linear(F.elu(x), weight, bias)
    return x


def context_term(weights: MadeWeights, h: torch.Tensor) -> torch.Tensor:
    """The context's contribution to the first hidden layer: ``h: [*batch, C] → [*batch, hidden₀]``."""
    return F.linear(h, weights.context)


def _degrees(features: int, hidden: tuple[int, ...]) -> list[torch.Tensor]:
    """Degrees of the inputs (1 … D) and of each hidden layer's units (cycling through 0 … D − 1)."""
    return [torch.arange(1, features + 1)] + [torch.arange(size) % features for size in hidden]


class MADE(nn.Module):
    """A masked MLP ``(z: [*lead, D], h: [*batch, C]) → [*lead, outputs · D]``, autoregressive in z.

    The outputs are laid out as ``outputs`` blocks of D (e.g. ``[m, s]`` for an IAF step): block
    entry i depends on ``z[..., :i]`` and on ``h`` only. ``hidden`` must be non-empty (a MADE
    without hidden units could only be a strictly lower-triangular linear map).
    """

    def __init__(
        self, features: int, context: int, hidden: tuple[int, ...], outputs: int = 2
    ) -> None:
        super().__init__()
        if features < 1 or context < 1 or outputs < 1 or not hidden or min(hidden) < 1:
            raise ValueError(
                "a MADE needs features ≥ 1, context ≥ 1, outputs ≥ 1 and at least one hidden "
                f"layer of positive size; got features={features}, context={context}, "
                f"outputs={outputs}, hidden={hidden}"
            )
        self.features = features
        self.outputs = outputs
        degrees = _degrees(features, hidden)
        sizes = [features, *hidden]
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out)
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.output = nn.Linear(hidden[-1], outputs * features)
        self.context = nn.Linear(context, hidden[0], bias=False)
        masks = [
            (after[:, None] >= before[None, :])
            for before, after in zip(degrees[:-1], degrees[1:], strict=True)
        ]
        # Output i (of every block) sees hidden units of degree < i + 1: strictly earlier inputs.
        output_degrees = torch.arange(1, features + 1).repeat(outputs)
        masks.append(output_degrees[:, None] > degrees[-1][None, :])
        for i, mask in enumerate(masks):
            self.register_buffer(f"_mask{i}", mask.float(), persistent=False)

    def masks(self) -> list[torch.Tensor]:
        """The 0/1 masks of each layer, input to output, shaped like the weights."""
        return [getattr(self, f"_mask{i}") for i in range(len(self.layers) + 1)]

    def weights(self) -> MadeWeights:
        """The current masked weights (differentiable in the module's parameters)."""
        linears = [*self.layers, self.output]
        layers = tuple(
            (linear.weight * mask, linear.bias)
            for linear, mask in zip(linears, self.masks(), strict=True)
        )
        return MadeWeights(layers, self.context.weight)

    def forward(self, z: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.weights()
        return made_apply(weights, z, None if h is None else context_term(weights, h))
