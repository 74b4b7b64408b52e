"""The likelihood p_θ(x|z) every family shares: decoders that return a normalised distribution over the data.

A likelihood wraps a decoder body giving ``params_per_dim`` numbers for every data dimension and reads a
distribution off them. From ``z: [samples, batch, latent]`` it returns a distribution with
``batch_shape [samples, batch]`` and ``event_shape data_shape``, so ``log_prob(x)`` sums over data
dimensions: nats per example, normalising constants included (a Gaussian's −½ log 2πσ², a continuous
Bernoulli's log C(λ)); the likelihoods of 8-bit pixels are probabilities of the 256 levels.
``check_support(x)`` refuses data the distribution cannot have produced.

A conditional model's likelihood p(x|z, y) takes the condition y ``[batch, c]`` as one more input of
every method that reads z (``forward``, ``log_prob``, ``mean``, ``decoder_params``), handing it to
the decoder body, which reads ``[z, y]`` (``vaelab.components.networks``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import (
    Distribution,
    Independent,
)

from vaelab.components.networks import apply_network


@dataclass
class DataMoments:
    """Per-dimension mean and variance of training data, accumulated batch by batch in float64
    with the pairwise update of Chan, Golub & LeVeque (1979): merging a batch of n_b examples with
    mean m_b and sum of squared deviations M_b into (n, m, M) gives
    n' = n + n_b,  m' = m + (m_b − m) n_b / n',  M' = M + M_b + (m_b − m)² n n_b / n'.
    So a ``DataLoader`` sets the decoder's start from many batches, not from its first one.
    ``mean`` and ``std`` are ``[*data_shape]``; ``maximum`` is the largest value seen, from which a
    likelihood of 8-bit pixels reads whether they are stored as 0..255 or scaled to [0, 1]."""

    count: int = 0
    total_mean: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    maximum: float = -math.inf

    @classmethod
    def of(cls, x: torch.Tensor) -> DataMoments:
        """The moments of ``x: [batch, *data_shape]``."""
        moments = cls()
        moments.update(x)
        return moments

    def update(self, x: torch.Tensor) -> None:
        """Merge the examples ``x: [batch, *data_shape]``."""
        x = x.detach().double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        self.maximum = max(self.maximum, float(x.max()))
        mean_b = x.mean(0)
        squares_b = (x - mean_b).square().sum(0)
        if self.total_mean is None or self.squares is None:
            self.count, self.total_mean, self.squares = n_b, mean_b, squares_b
            return
        total = self.count + n_b
        delta = mean_b.to(self.total_mean.device) - self.total_mean
        self.total_mean = self.total_mean + delta * (n_b / total)
        self.squares = self.squares + squares_b.to(self.squares.device)
        self.squares = self.squares + delta.square() * (self.count * n_b / total)
        self.count = total

    @property
    def mean(self) -> torch.Tensor:
        if self.total_mean is None:
            raise ValueError("no examples seen: the data moments are undefined")
        return self.total_mean

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation with the n − 1 denominator (0 for a single example)."""
        if self.squares is None:
            raise ValueError("no examples seen: the data moments are undefined")
        return (self.squares / max(self.count - 1, 1)).sqrt()


class Likelihood(nn.Module):
    """Shared plumbing: reshape decoder features to ``[*lead, params_per_dim, *data_shape]``.

    The first parameter (a location or logits) is the decoder output plus ``offset``, a buffer that
    ``initialise`` sets from the training data: the decoder then starts at the data mean and learns
    deviations from it, which skips the long first phase of training where it would learn the
    mean itself (the same idea as initialising the output bias to the marginal logits).
    """

    params_per_dim = 1
    support = "the real line"
    offset: torch.Tensor

    def __init__(self, decoder: nn.Module, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.decoder = decoder
        self.data_shape = tuple(data_shape)
        self.register_buffer("offset", torch.zeros(self.data_shape))

    def decoder_params(
        self, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Decoder outputs split per parameter, each ``[*lead, *data_shape]``."""
        lead = z.shape[:-1]
        if self.params_per_dim == 1:
            # One view at most: unbind's backward would stack the gradient into a fresh copy.
            h = apply_network(self.decoder, z, condition)
            shape = (*lead, *self.data_shape)
            return ((h if h.shape == shape else h.reshape(shape)) + self.offset,)
        h = apply_network(self.decoder, z, condition)
        h = h.reshape(*lead, self.params_per_dim, *self.data_shape)
        first, *rest = h.unbind(dim=len(lead))
        return (first + self.offset, *rest)

    @property
    def data_unit(self) -> float:
        """The data value the networks read as 1 (the encoder's ``InputScale``): 1 here, the
        data as they are."""
        return 1.0

    @torch.no_grad()
    def initialise(self, data: torch.Tensor | DataMoments) -> None:
        """Start the decoder at the data: a sample of training data ``[batch, *data_shape]`` or
        the moments of a stream of it."""
        moments = data if isinstance(data, DataMoments) else DataMoments.of(data)
        self.start_at(moments)

    def start_at(self, moments: DataMoments) -> None:
        """Set the starting point from the data's moments; subclasses with learned scales add
        theirs."""
        mean = moments.mean.to(self.offset.device, self.offset.dtype)
        self.offset.copy_(self.location_of_mean(mean))

    def location_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The first distribution parameter whose distribution has (about) this mean."""
        return mean

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        """The per-dimension distribution built from the decoder parameters."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> Distribution:
        """p(x|z) (p(x|z, y) given a ``condition``) with ``batch_shape z.shape[:-1]`` and
        ``event_shape data_shape``."""
        # Not validated: check_support already vetted the data where it enters; validating here
        # would re-scan every batch at every step.
        params = self.decoder_params(z, condition)
        return Independent(self.distribution(params), len(self.data_shape), validate_args=False)

    def log_prob(
        self, x: torch.Tensor, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x|z) in nats, summed over data dimensions: ``x: [batch, *data_shape]`` and
        ``z: [*lead, batch, latent]`` → ``[*lead, batch]``. The one entry point of the bounds, so
        a likelihood may compute it without building a distribution object."""
        return self(z, condition).log_prob(x)

    def mean(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z], ``[*lead, *data_shape]``."""
        return self(z, condition).mean

    def check_support(self, x: torch.Tensor) -> None:
        """Refuse data outside the support. Real-valued likelihoods accept any finite value."""

    def why_not_a_probability(self, x: torch.Tensor) -> str | None:
        """``None`` when log p(x|z) is the log of a probability of these values (a mass function
        over the values ``x`` holds), so that −log₂ p(x) / D is a code length: bits per
        dimension. Otherwise why not, in words: a density's log p is not a log-probability."""
        return (
            f"the {self.name} likelihood is a density over continuous values, not a probability "
            "of the stored values (a discrete likelihood is: bernoulli on binary data)"
        )

    @property
    def name(self) -> str:
        """The likelihood's kind in words, for messages."""
        words = re.findall(r"[A-Z][a-z]*", type(self).__name__.removesuffix("Likelihood"))
        return "-".join(words).lower()
