"""The convolutional bottom-up pass of top-down inference (``network="conv"``), after VDVAE's
encoder (Child 2021): a 3×3 stem, then one group of residual bottleneck blocks per stochastic
layer, the feature map halved (average pooling) between groups until it is 1×1, so z₁ reads the
finest resolution and z_L the coarsest.

Each layer's latent stays a flat vector of size d_l: its evidence (μ̂_l, log σ̂_l²) is an MLP head
(``hidden``) on its group's flattened feature map. The generative path between layers (the MLP
conditionals p(z_l | z_{l+1}) shared with the posterior) and the decoder of z₁ (the convolutional
decoder of ``vaelab.components.networks``) are the same as for one layer, so only the bottom-up
pass is convolutional here.

Shapes: x ``[batch, C, H, W]``; a group's map ``[batch, channels, H_l, W_l]``; evidence
``[batch, d_l]`` per layer, z₁ first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vaelab.components.networks import MLP, InputScale, activation_module
from vaelab.components.top_down import Evidence, split_evidence

__all__ = ["CONV_CHANNELS", "BottomUpConv", "ResidualBlock"]

CONV_CHANNELS = 32  # feature maps of every group


class ResidualBlock(nn.Module):
    """h + f(h), f a bottleneck 1×1 → 3×3 → 1×1 with the non-linearity before each convolution
    (VDVAE's block, Child 2021, Fig. 3); the last convolution starts at zero, so every block starts
    as the identity and a deep tower trains from its first step."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        middle = max(channels // 4, 4)
        last = nn.Conv2d(middle, channels, 1)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()  # type: ignore[union-attr]
        self.branch = nn.Sequential(
            activation_module(activation),
            nn.Conv2d(channels, middle, 1),
            activation_module(activation),
            nn.Conv2d(middle, middle, 3, padding=1),
            activation_module(activation),
            last,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


class BottomUpConv(nn.Module):
    """x → each layer's evidence through residual groups at halving resolutions (module
    docstring)."""

    def __init__(
        self,
        data_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        sizes: Sequence[int],
        activation: str,
        channels: int = CONV_CHANNELS,
    ) -> None:
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(
                f"a convolutional encoder needs images [C, H, W], got shape {data_shape}"
            )
        c, h, w = data_shape
        self.data_shape = tuple(data_shape)
        self.sizes = tuple(sizes)
        self.input_scale = InputScale()
        self.stem = nn.Conv2d(c, channels, 3, padding=1)
        self.groups = nn.ModuleList()
        self.heads = nn.ModuleList()
        for index, d in enumerate(self.sizes):
            if index > 0:  # halve, down to 1×1
                h, w = max(math.ceil(h / 2), 1), max(math.ceil(w / 2), 1)
            self.groups.append(
                nn.Sequential(
                    nn.AdaptiveAvgPool2d((h, w)) if index > 0 else nn.Identity(),
                    ResidualBlock(channels, activation),
                )
            )
            self.heads.append(MLP((channels, h, w), hidden, 2 * d, activation))

    def forward(self, x: torch.Tensor) -> Evidence:
        h = self.stem(self.input_scale(x))
        outputs = []
        for group, head in zip(self.groups, self.heads, strict=True):
            h = group(h)
            outputs.append(head(h))
        return split_evidence(outputs, self.sizes)
