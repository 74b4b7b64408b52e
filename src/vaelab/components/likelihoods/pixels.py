"""Likelihoods of 8-bit pixels, probabilities of the 256 levels: the discretised logistic and its
mixture (Kingma et al. 2016; Salimans et al. 2017)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Categorical,
    Distribution,
    MixtureSameFamily,
)

from vaelab.components.likelihoods.base import DataMoments, Likelihood
from vaelab.components.networks import apply_network
from vaelab.distributions.discretized_logistic import (
    FRACTION_PIXELS,
    INTEGER_PIXELS,
    LOGISTIC_MIXTURE_COMPONENTS,
    LOGISTIC_SCALE_FLOOR,
    PIXEL_LEVELS,
    DiscretizedLogistic,
    PixelGrid,
)


def _floored_log_scale(raw: torch.Tensor) -> torch.Tensor:
    """log s = log s₀ + softplus(ℓ − log s₀) for the decoder's log-scale ℓ and the floor s₀: ℓ
    itself well above the floor, s₀ far below it. A smooth maximum rather than a clamp, whose
    zero gradient below the floor would leave a pixel's scale there for good."""
    floor = math.log(LOGISTIC_SCALE_FLOOR)
    return floor + F.softplus(raw - floor)


def _raw_log_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_floored_log_scale``, for log s above the floor."""
    floor = math.log(LOGISTIC_SCALE_FLOOR)
    return floor + torch.log(torch.expm1(log_scale - floor))


def _read_grid_max(module: PixelLikelihood, incompatible_keys: object) -> None:
    """After ``load_state_dict``: the loaded grid as a number, so no step reads a tensor back."""
    value = float(module.grid_max)
    module._grid_max = value if value > 0 else None


class PixelLikelihood(Likelihood):
    """Shared plumbing of the likelihoods of 8-bit pixels, probabilities of the 256 levels.

    The grid: the pixels are the integers 0..255 (``--scale none``) or those divided by 255 (the
    default ``--scale auto`` of uint8 data), and which one is a property of the training data,
    not of each batch (a dark batch of integers can hold only 0s and 1s). So ``initialise`` reads
    it off the training data, once: the top level is 255 when the data exceed 1, else 1; it is
    kept in the buffer ``grid_max`` and saved with the model. Training data holding only 0s and 1s
    are read as pixels / 255 (they lie on both grids); later data off the grid kept are refused.
    Before ``initialise``, ``check_support`` accepts data on either grid.

    Units: the decoder's locations and log-scales are read in units of the pixel range (top level
    1) on either grid, and the encoder reads the pixels in those units too (``data_unit``, the top
    level), so one model gives the same probabilities to 0..255 and to /255 pixels, and bits per
    dimension do not depend on the scaling. Locations start at the data mean and
    log-scales at a logistic with the data's spread (s = std √3 / π, a logistic's standard
    deviation being s π / √3), a tenth of the typical spread at least, as the Gaussian's σ does.
    """

    support = "8-bit pixels: the integers 0..255, or those divided by 255"
    grid_max: torch.Tensor
    log_scale_offset: torch.Tensor

    def __init__(self, decoder: nn.Module, data_shape: tuple[int, ...]) -> None:
        super().__init__(decoder, data_shape)
        self.register_buffer("grid_max", torch.tensor(0.0))  # 0: not read off the data yet
        self.register_buffer("log_scale_offset", torch.zeros(self.data_shape))
        self._grid_max: float | None = None
        self.register_load_state_dict_post_hook(_read_grid_max)

    @property
    def data_unit(self) -> float:
        """The top level, 255 or 1 (1 before the grid is read)."""
        return self._grid_max or 1.0

    @property
    def grid(self) -> PixelGrid:
        """The levels this likelihood gives probabilities to."""
        if self._grid_max is None:
            raise ValueError(
                f"the {self.name} likelihood has not read its pixel grid (0..255 or /255) off "
                "training data yet; call initialise(x) with training data first (VAE.fit and "
                "vaelab train do)"
            )
        return PixelGrid(self._grid_max / (PIXEL_LEVELS - 1))

    @torch.no_grad()
    def initialise(self, data: torch.Tensor | DataMoments) -> None:
        """Read the grid and start the decoder at the data. Data on neither grid are refused
        here, as the grid is read off them (``vaelab train`` checks only the data's range)."""
        if not isinstance(data, DataMoments):
            self._check_pixels(data, None)
        super().initialise(data)

    def start_at(self, moments: DataMoments) -> None:
        grid_max = float(PIXEL_LEVELS - 1) if moments.maximum > 1.0 else 1.0
        self.grid_max.fill_(grid_max)
        self._grid_max = grid_max
        mean = moments.mean.to(self.offset.device, self.offset.dtype) / grid_max
        std = moments.std.to(self.offset.device, self.offset.dtype) / grid_max
        self.offset.copy_(mean)
        typical = std.square().mean().sqrt()
        scale = std.clamp(min=0.1 * float(typical)) * (math.sqrt(3.0) / math.pi)
        log_scale = scale.clamp(min=2 * LOGISTIC_SCALE_FLOOR).log()
        self.log_scale_offset.copy_(_raw_log_scale(log_scale))

    def logistics(self, loc: torch.Tensor, log_scale: torch.Tensor) -> DiscretizedLogistic:
        """Discretised logistics on the grid from decoder outputs in units of the pixel range."""
        grid = self.grid
        top = grid.bin_width * (PIXEL_LEVELS - 1)
        return DiscretizedLogistic(
            top * loc,
            math.log(top) + _floored_log_scale(log_scale),
            grid.bin_width,
            validate_args=False,
        )

    def check_support(self, x: torch.Tensor) -> None:
        self._check_pixels(x, self._grid_max)

    def _check_pixels(self, x: torch.Tensor, grid_max: float | None) -> None:
        """Refuse ``x`` off the grid with top level ``grid_max``, or off both grids if ``None``."""
        if grid_max == 1.0:
            found = FRACTION_PIXELS.first_outside(x)
            if found is not None:
                raise ValueError(
                    f"the {self.name} likelihood was trained on 8-bit pixels divided by 255 (the "
                    f"levels 0, 1/255, …, 1), but the data hold {found:g}, which is none of "
                    "them; scale the data as the training data were (uint8 images: the default "
                    "--scale auto)"
                )
        elif grid_max is not None:
            found = INTEGER_PIXELS.first_outside(x)
            if found is not None:
                raise ValueError(
                    f"the {self.name} likelihood was trained on 8-bit pixels as the integers "
                    f"0..255, but the data hold {found:g}; pass the pixels unscaled, as in "
                    "training (--scale none)"
                )
        elif INTEGER_PIXELS.first_outside(x) is not None:
            found = FRACTION_PIXELS.first_outside(x)
            if found is not None:
                example = found if float(x.max()) <= 1.0 else INTEGER_PIXELS.first_outside(x)
                raise ValueError(
                    f"the {self.name} likelihood needs 8-bit pixels, the integers 0..255 "
                    f"(--scale none) or those divided by 255 (--scale auto on uint8 data), but "
                    f"the data hold {example:g}; store the images as uint8, or choose a "
                    "likelihood for continuous values such as likelihood='gaussian'"
                )

    def why_not_a_probability(self, x: torch.Tensor) -> str | None:
        """``None`` for pixels on the grid: P(x|z) is a probability mass function over the 256
        levels of every pixel, so −log₂ P(x|z) / D is a code length in bits per dimension, the
        number Kingma et al. (2016) and Salimans et al. (2017) report, as it is, on either grid:
        no log 256 or log 255 term to add, as there would be to turn a density of pixels scaled
        to [0, 1] into a probability of their levels."""
        if self._grid_max is not None and self.grid.first_outside(x) is None:
            return None
        return (
            f"the {self.name} likelihood is a probability of the 256 levels of its pixel grid, "
            "and these values are not all on it"
        )


class DiscretizedLogisticLikelihood(PixelLikelihood):
    """p(x|z) = Πᵢ P(xᵢ; μᵢ(z), sᵢ(z)), one discretised logistic (``DiscretizedLogistic``) per
    pixel (Kingma et al. 2016): the decoder gives a location and a log-scale per pixel
    (``params_per_dim = 2``), the log-scale floored smoothly at ``LOGISTIC_SCALE_FLOOR``."""

    params_per_dim = 2

    def decoder_params(
        self, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(location, log-scale), each ``[*lead, *data_shape]`` in units of the pixel range."""
        loc, log_scale = super().decoder_params(z, condition)
        return loc, log_scale + self.log_scale_offset

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        loc, log_scale = params
        return self.logistics(loc, log_scale)


class DiscretizedLogisticMixtureLikelihood(PixelLikelihood):
    """p(x|z) = Πᵢ Σⱼ πᵢⱼ(z) P(xᵢ; μᵢⱼ(z), sᵢⱼ(z)), a mixture of ``components`` discretised
    logistics per pixel (Salimans et al. 2017; K = ``LOGISTIC_MIXTURE_COMPONENTS`` = 5 by
    default): the decoder gives K mixture logits, K locations and K log-scales per pixel
    (``params_per_dim = 3K``), in that order. Pixels are independent given z: no coupling of the
    channels of a colour pixel, as PixelCNN++ has (each channel's location there depends linearly
    on the channels before it), since a VAE decoder gives all channels at once."""

    def __init__(
        self,
        decoder: nn.Module,
        data_shape: tuple[int, ...],
        components: int = LOGISTIC_MIXTURE_COMPONENTS,
    ) -> None:
        if not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive integer, got {components!r}")
        super().__init__(decoder, data_shape)
        self.components = components
        self.params_per_dim = 3 * components

    def decoder_params(
        self, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(logits, locations, log-scales), each ``[*lead, *data_shape, components]``, the
        components last as ``MixtureSameFamily`` wants them; every location starts at the data
        mean (the decoder's random start sets them apart)."""
        lead = z.shape[:-1]
        h = apply_network(self.decoder, z, condition)
        h = h.reshape(*lead, 3, self.components, *self.data_shape)
        h = h.movedim(len(lead) + 1, -1)  # [*lead, 3, *data_shape, components]
        logits, loc, log_scale = h.unbind(dim=len(lead))
        return logits, loc + self.offset[..., None], log_scale + self.log_scale_offset[..., None]

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        logits, loc, log_scale = params
        return MixtureSameFamily(
            Categorical(logits=logits, validate_args=False),
            self.logistics(loc, log_scale),
            validate_args=False,
        )
