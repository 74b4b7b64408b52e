"""Network bodies: the deterministic maps inside encoders and decoders.

A network here knows nothing of distributions. An encoder body maps ``x: [batch, *data_shape]`` to
``[batch, out_features]``; a decoder body maps ``z: [*sample_batch, latent]`` (any number of leading
dimensions, e.g. ``[samples, batch, latent]``) to ``[*sample_batch, out_features]``. Posteriors and
likelihoods read their distribution parameters off those features.

A network built with ``condition_dim = c > 0`` also reads a condition ``y: [batch, c]`` (a one-hot
label or any vector; Sohn, Lee & Yan 2015): ``forward(input, condition)``. Its MLP reads the
flattened input and y side by side, ``[input, y]``, y broadcast over the input's leading sample
dimensions (``[samples, batch, latent]`` codes share their example's y); a convolutional body
gives y to its MLP part, after the convolutions of an encoder and before those of a decoder.

An encoder body reads the data through an :class:`InputScale`, x / u, with u the value its model's
likelihood reads as 1 (``Likelihood.data_unit``): 255 for 8-bit pixels kept as the integers
0..255, so that the encoder reads them in the units the decoder writes them in, else 1.
"""

from __future__ import annotations

import functools
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


def apply_network(
    network: nn.Module, x: torch.Tensor, condition: torch.Tensor | None
) -> torch.Tensor:
    """``network(x)``, or ``network(x, condition)`` when a condition is given: a body that reads
    no condition (one a user built, a stochastic layer's) is called as it always was."""
    return network(x) if condition is None else network(x, condition)


def flat_condition(
    condition: torch.Tensor | None, lead: tuple[int, ...], size: int
) -> torch.Tensor | None:
    """A condition ``[*B, size]`` for inputs with leading dimensions ``lead`` (ending in B, e.g.
    ``[samples, batch]`` for ``[batch]`` conditions), broadcast and folded to
    ``[prod(lead), size]``; ``None`` for a network that reads none (``size == 0``). A missing or
    unexpected condition is refused: it would silently change what the network computes."""
    if size == 0:
        if condition is not None:
            raise ValueError(
                "this network reads no condition, but one was given; build the model with "
                "a condition size (conditional=True) to condition it"
            )
        return None
    if condition is None:
        raise ValueError(
            f"this network reads a condition of size {size} besides its input, and none was "
            "given; pass the condition (VAEModel.given(y))"
        )
    if condition.shape[-1] != size:
        raise ValueError(
            f"this network reads conditions of size {size}, got shape {tuple(condition.shape)}"
        )
    batch = tuple(condition.shape[:-1])
    if batch != tuple(lead[len(lead) - len(batch) :]):
        raise ValueError(
            f"the condition holds {batch} rows for inputs {tuple(lead)}: a model given conditions "
            "takes exactly their examples (a function that cuts examples into batches takes "
            "condition= instead)"
        )
    return condition.expand(*lead, size).reshape(-1, size)


class InputScale(nn.Module):
    """x / u for the data an encoder reads, u > 0 (the buffer ``unit``, saved with the model;
    1 until the model is initialised on its training data, ``VAEModel.initialise``).

    At u = 1 the input passes as it is, untouched. Model files from before this buffer existed
    load with u = 1, as they were trained."""

    unit: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unit", torch.tensor(1.0))
        self._unit = 1.0  # the buffer as a number, so no step reads a tensor back
        self.register_load_state_dict_pre_hook(_unit_of_older_files)
        self.register_load_state_dict_post_hook(_read_unit)

    @torch.no_grad()
    def set(self, unit: float) -> None:
        if not unit > 0:
            raise ValueError(f"an input's unit must be positive, got {unit}")
        self.unit.fill_(unit)
        self._unit = float(unit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._unit == 1.0 else x / self._unit


def _unit_of_older_files(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    state.setdefault(prefix + "unit", torch.tensor(1.0))


def _read_unit(module: InputScale, incompatible_keys: object) -> None:
    module._unit = float(module.unit)


class MLP(nn.Module):
    """A multilayer perceptron ``in_features → hidden[0] → … → out_features``.

    ``hidden=()`` gives one affine map, which makes a VAE with Gaussian likelihood the linear model of
    probabilistic PCA. The input's trailing ``len(in_shape)`` dimensions are flattened, so images
    ``[batch, C, H, W]`` and vectors ``[batch, features]`` both work; leading dimensions pass through.
    With ``condition_dim = c`` the first layer reads ``[flattened input, y]``, ``in_features + c``
    numbers (see the module docstring). An MLP that ``reads_data`` (an encoder's) scales its input
    by an :class:`InputScale` first; y is read as it is.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        out_features: int,
        activation: str = "relu",
        condition_dim: int = 0,
        reads_data: bool = False,
    ) -> None:
        super().__init__()
        self.input_scale = InputScale() if reads_data else None
        self.in_shape = tuple(in_shape)
        self.in_features = math.prod(self.in_shape)
        self.condition_dim = condition_dim
        sizes = [self.in_features + condition_dim, *hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), activation_module(activation)]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``[*lead, *in_shape] → [*lead, out_features]``, reading ``condition`` ``[*B,
        condition_dim]`` (B a suffix of lead) beside x when the network has a condition size.

        The leading dimensions are folded into one for the layers: matrix products of 2-D inputs,
        instead of a fold and an unfold around every layer as ``Linear`` does for more dimensions.
        """
        plain = self.input_scale is None and condition is None and self.condition_dim == 0
        if plain and x.dim() == 2 and len(self.in_shape) == 1:  # [batch, features]: the layers
            out: torch.Tensor = self.layers(x)
            return out
        if self.input_scale is not None:
            x = self.input_scale(x)
        lead = x.shape[: x.dim() - len(self.in_shape)]
        flat = x if x.dim() == 2 and len(lead) == 1 else x.reshape(-1, self.in_features)
        y = flat_condition(condition, tuple(lead), self.condition_dim)
        if y is not None:
            flat = torch.cat([flat, y.to(flat.dtype)], dim=-1)
        out = self.layers(flat)  # [prod(lead), out_features]
        return out if len(lead) == 1 else out.reshape(*lead, -1)


def _conv_size(size: int) -> int:
    """Spatial size after one 4×4 convolution with stride 2 and padding 1: ⌊size / 2⌋."""
    return size // 2


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions then an MLP head: ``[batch, C, H, W] → [batch, out_features]``;
    with ``condition_dim`` the head reads the condition beside the convolutions' features."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        out_features: int,
        activation: str = "relu",
        channels: tuple[int, int] = (32, 64),
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        self.input_scale = InputScale()
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
        self.head = MLP(self.feature_shape, hidden, out_features, activation, condition_dim)
        self.condition_dim = condition_dim

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[: x.dim() - 3]
        h = self.features(self.input_scale(x).reshape(-1, *self.in_shape))
        y = flat_condition(condition, tuple(lead), self.condition_dim)
        return self.head(h, y).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """An MLP then two stride-2 transposed convolutions: ``[*lead, latent] → [*lead, C·H·W·k]``.

    ``out_channels_per_pixel`` (k) is the number of distribution parameters per data dimension; the
    output is laid out as ``[*lead, k, C, H, W]`` flattened, the layout likelihoods expect. With
    ``condition_dim`` the MLP reads ``[z, y]``.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden: tuple[int, ...],
        out_shape: tuple[int, ...],
        out_channels_per_pixel: int = 1,
        activation: str = "relu",
        channels: tuple[int, int] = (64, 32),
        condition_dim: int = 0,
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
        self.head = MLP(
            (latent_dim,), hidden, math.prod(self.seed_shape), activation, condition_dim
        )
        self.condition_dim = condition_dim
        self.activation = activation_module(activation)
        self.body = nn.Sequential(
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1),
            activation_module(activation),
            nn.ConvTranspose2d(channels[1], c * self.k, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        lead = z.shape[:-1]
        y = flat_condition(condition, tuple(lead), self.condition_dim)
        seed = self.activation(self.head(z.reshape(-1, z.shape[-1]), y))
        seed = seed.reshape(-1, *self.seed_shape)
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
    condition_dim: int = 0,
) -> nn.Module:
    return MLP(
        (latent_dim,), hidden, params_per_dim * math.prod(data_shape), activation, condition_dim
    )


def _conv_encoder(
    data_shape: tuple[int, ...],
    hidden: tuple[int, ...],
    out: int,
    activation: str,
    condition_dim: int = 0,
) -> nn.Module:
    return ConvEncoder(data_shape, hidden, out, activation, condition_dim=condition_dim)


def _conv_decoder(
    latent_dim: int,
    hidden: tuple[int, ...],
    data_shape: tuple[int, ...],
    params_per_dim: int,
    activation: str,
    condition_dim: int = 0,
) -> nn.Module:
    return ConvDecoder(
        latent_dim, hidden, data_shape, params_per_dim, activation, condition_dim=condition_dim
    )


# name → (encoder body, decoder body), each called as (shapes, hidden, sizes, activation,
# condition_dim). Decoders mirror the encoder: hidden sizes reversed.
NETWORKS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "mlp": (functools.partial(MLP, reads_data=True), _mlp_decoder),
    "conv": (_conv_encoder, _conv_decoder),
}


def _network_pair(kind: str) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; choose one of: {', '.join(NETWORKS)}")
    return NETWORKS[kind]


def encoder_network(
    kind: str,
    data_shape: tuple[int, ...],
    hidden: tuple[int, ...],
    out: int,
    activation: str,
    condition_dim: int = 0,
) -> nn.Module:
    """The encoder body called ``kind``: ``[batch, *data_shape] → [batch, out]``, reading a
    condition ``[batch, condition_dim]`` too when ``condition_dim > 0``."""
    return _network_pair(kind)[0](data_shape, hidden, out, activation, condition_dim)


def decoder_network(
    kind: str,
    latent_dim: int,
    hidden: tuple[int, ...],
    data_shape: tuple[int, ...],
    params_per_dim: int,
    activation: str,
    condition_dim: int = 0,
) -> nn.Module:
    """The decoder body called ``kind``, giving ``params_per_dim`` numbers per data dimension,
    reading a condition ``[batch, condition_dim]`` beside z when ``condition_dim > 0``."""
    decoder = _network_pair(kind)[1]
    return decoder(
        latent_dim, tuple(reversed(hidden)), data_shape, params_per_dim, activation, condition_dim
    )
