"""Likelihoods of data in [0, 1]: the Bernoulli of binary pixels and the continuous Bernoulli
(Loaiza-Ganem & Cunningham 2019) of grey values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import (
    Bernoulli,
    Distribution,
)

from vaelab.components.likelihoods.base import Likelihood
from vaelab.distributions.continuous_bernoulli import AccurateContinuousBernoulli


def _check_unit_interval(x: torch.Tensor, name: str) -> None:
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"the {name} likelihood needs data in [0, 1], but values range over [{low:g}, {high:g}]; "
            "rescale the data (e.g. divide 8-bit pixels by 255) or choose likelihood='gaussian'"
        )


class BernoulliLikelihood(Likelihood):
    """p(x|z) = Πᵢ λᵢ^xᵢ (1 − λᵢ)^(1−xᵢ) with λ = sigmoid(decoder logits).

    A normalised likelihood for binary data. Grey values in [0, 1] are accepted, as in Kingma &
    Welling (2014), but then log p is a cross-entropy, not a log-density: binarise the data for
    numbers comparable with the literature.
    """

    support = "[0, 1]"

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        # validate_args=False lets grey values through; check_support guards the range.
        return Bernoulli(logits=params[0], validate_args=False)

    def log_prob(
        self, x: torch.Tensor, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x|z) = Σᵢ [xᵢ log σ(lᵢ) + (1 − xᵢ) log σ(−lᵢ)] for logits l: the arithmetic of
        ``Bernoulli(logits=l).log_prob(x)``, without the distribution objects' per-call cost."""
        (logits,) = self.decoder_params(z, condition)  # [*lead, batch, *data_shape]
        target = x if x.shape == logits.shape else x.expand_as(logits)
        cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if len(self.data_shape) > 1:
            cross_entropy = cross_entropy.flatten(start_dim=logits.dim() - len(self.data_shape))
        return -cross_entropy.sum(-1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, "bernoulli")

    def why_not_a_probability(self, x: torch.Tensor) -> str | None:
        """A probability of binary values; of grey values log p is a cross-entropy."""
        if bool(((x == 0) | (x == 1)).all()):
            return None
        return (
            "the bernoulli likelihood on grey values is a cross-entropy, not a probability "
            "(binarise the data, --binarize)"
        )

    def location_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.logit(mean.clamp(1e-3, 1 - 1e-3))


class ContinuousBernoulliLikelihood(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): p(x|λ) = C(λ) λ^x (1 − λ)^(1−x)
    on [0, 1], with the normalising constant C(λ) that makes it a proper density for grey values.
    Its mean is accurate for every logit (``AccurateContinuousBernoulli``)."""

    support = "[0, 1]"

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        return AccurateContinuousBernoulli(logits=params[0], validate_args=False)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, "continuous-bernoulli")

    def location_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        # The continuous Bernoulli's mean is not sigmoid(logits), but close enough for a start.
        return torch.logit(mean.clamp(1e-3, 1 - 1e-3))
