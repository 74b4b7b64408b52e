"""The classifier q(y|x) of the semi-supervised model M2 (Kingma, Rezende, Mohamed & Welling 2014,
"Semi-supervised learning with deep generative models", §3.1.2): a network on x giving the logits
of a categorical distribution over the classes."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Categorical

from vaelab.components.networks import encoder_network

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """q(y|x) = Cat(y | softmax(f(x))): ``forward(x)`` is a ``Categorical`` with ``batch_shape
    [batch]`` over ``classes`` classes, ``logits(x)`` its logits ``[batch, classes]``. The body
    ``f`` is the encoder body of the same ``kind`` (``"mlp"`` or ``"conv"``) and ``hidden`` sizes
    as the model's encoder, with its own weights."""

    def __init__(
        self,
        kind: str,
        data_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        classes: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.classes = classes
        self.body = encoder_network(kind, data_shape, hidden, classes, activation)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """log q(y|x) up to a constant per example, ``[batch, classes]``."""
        logits: torch.Tensor = self.body(x)
        return logits

    def forward(self, x: torch.Tensor) -> Categorical:
        return Categorical(logits=self.logits(x))
