"""Network bodies: the deterministic maps inside encoders and decoders.

A network here knows nothing of distributions. An encoder body maps ``x: [batch, *data_shape]`` to
``[batch, out_features]``; a decoder body maps ``z: [*sample_batch, latent]`` (any number of leading
dimensions, e.g. ``[samples, batch, latent]``) to ``[*sample_batch, out_features]``. Posteriors and
likelihoods read their distribution parameters off those features.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


def activation_module(name: str) -> nn.Module:
    """The activation called ``name``; a ``ValueError`` lists the known ones."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; choose one of: {known}") from None


class MLP(nn.Module):
    """A multilayer perceptron ``in_features → hidden[0] → … → out_features``.

    ``hidden=()`` gives one affine map, which makes a VAE with Gaussian likelihood the linear model of
    probabilistic PCA. The input's trailing ``len(in_shape)`` dimensions are flattened, so images
    ``[batch, C, H, W]`` and vectors ``[batch, features]`` both work; leading dimensions pass through.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        out_features: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.in_features = math.prod(self.in_shape)
        sizes = [self.in_features, *hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), activation_module(activation)]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*lead, *in_shape] → [*lead, out_features]``.

        The leading dimensions are folded into one for the layers: matrix products of 2-D inputs,
        instead of a fold and an unfold around every layer as ``Linear`` does for more dimensions.
        """
        lead = x.shape[: x.dim() - len(self.in_shape)]
        flat = x if x.dim() == 2 and len(lead) == 1 else x.reshape(-1, self.in_features)
        out = self.layers(flat)  # [prod(lead), out_features]
        return out if len(lead) == 1 else out.reshape(*lead, -1)


def _conv_size(size: int) -> int:
    """Spatial size after one 4×4 convolution with stride 2 and padding 1: ⌊size / 2⌋."""
    return size // 2


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions then an MLP head: ``[batch, C, H, W] → [batch, out_features]``."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        out_features: int,
        activation: str = "relu",
        channels: tuple[int, int] = (32, 64),
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(
                f"a convolutional encoder needs images [C, H, W], got shape {in_shape}"
            )
        c, h, w = in_shape
        self.in_shape = tuple(in_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1),
            activation_module(activation),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1),
            activation_module(activation),
        )
        self.feature_shape = (channels[1], _conv_size(_conv_size(h)), _conv_size(_conv_size(w)))
        self.head = MLP(self.feature_shape, hidden, out_features, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - 3]
        h = self.features(x.reshape(-1, *self.in_shape))
        return self.head(h).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """An MLP then two stride-2 transposed convolutions: ``[*lead, latent] → [*lead, C·H·W·k]``.

    ``out_channels_per_pixel`` (k) is the number of distribution parameters per data dimension; the
    output is laid out as ``[*lead, k, C, H, W]`` flattened, the layout likelihoods expect.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden: tuple[int, ...],
        out_shape: tuple[int, ...],
        out_channels_per_pixel: int = 1,
        activation: str = "relu",
        channels: tuple[int, int] = (64, 32),
    ) -> None:
        super().__init__()
        if len(out_shape) != 3:
            raise ValueError(
                f"a convolutional decoder needs images [C, H, W], got shape {out_shape}"
            )
        c, h, w = out_shape
        self.out_shape = tuple(out_shape)
        self.k = out_channels_per_pixel
        # Each 4×4 stride-2 transposed convolution doubles the size; start at ⌈size / 4⌉ and crop.
        self.seed_shape = (channels[0], -(-h // 4), -(-w // 4))
        self.head = MLP((latent_dim,), hidden, math.prod(self.seed_shape), activation)
        self.activation = activation_module(activation)
        self.body = nn.Sequential(
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1),
            activation_module(activation),
            nn.ConvTranspose2d(channels[1], c * self.k, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        seed = self.activation(self.head(z.reshape(-1, z.shape[-1]))).reshape(-1, *self.seed_shape)
        c, h, w = self.out_shape
        # Sizes not divisible by 4 overshoot; crop to the data's size.
        out = self.body(seed)[..., :h, :w]
        out = out.reshape(-1, self.k, c, h, w)
        return out.reshape(*lead, -1)


def _mlp_decoder(
    latent_dim: int,
    hidden: tuple[int, ...],
    data_shape: tuple[int, ...],
    params_per_dim: int,
    activation: str,
) -> nn.Module:
    return MLP((latent_dim,), hidden, params_per_dim * math.prod(data_shape), activation)


# name → (encoder body, decoder body). Decoders mirror the encoder: hidden sizes reversed.
NETWORKS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "mlp": (MLP, _mlp_decoder),
    "conv": (ConvEncoder, ConvDecoder),
}


def _network_pair(kind: str) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; choose one of: {', '.join(NETWORKS)}")
    return NETWORKS[kind]


def encoder_network(
    kind: str, data_shape: tuple[int, ...], hidden: tuple[int, ...], out: int, activation: str
) -> nn.Module:
    """The encoder body called ``kind``: ``[batch, *data_shape] → [batch, out]``."""
    return _network_pair(kind)[0](data_shape, hidden, out, activation)


def decoder_network(
    kind: str,
    latent_dim: int,
    hidden: tuple[int, ...],
    data_shape: tuple[int, ...],
    params_per_dim: int,
    activation: str,
) -> nn.Module:
    """The decoder body called ``kind``, giving ``params_per_dim`` numbers per data dimension."""
    decoder = _network_pair(kind)[1]
    return decoder(latent_dim, tuple(reversed(hidden)), data_shape, params_per_dim, activation)
