"""Conditioning: a condition y as one more input of every component.

The conditional VAE of Sohn, Lee & Yan (2015, "Learning structured output representation using deep
conditional generative models", eq. 4) is the VAE with y given everywhere:

    log p(x|y) ≥ E_{q(z|x, y)}[log p(x|z, y)] − KL(q(z|x, y) ‖ p(z|y)),

with an encoder q(z|x, y), a decoder p(x|z, y) and a prior p(z|y), which may ignore y (p(z), the
default) or read it (``vaelab.components.priors.ConditionalGaussianPrior``). y is a vector ``[batch, c]``:
a one-hot class label (``one_hot``) or any real condition.

So no new model class and no new objective: each component takes y as one more input
(``posterior(x, y)``, ``prior(y)``, ``likelihood(z, y)``, ``likelihood.log_prob(x, z, y)``), and
``VAEModel.given(y)`` is a view of the same modules with y bound to every component
(:class:`GivenPosterior`, :class:`GivenPrior`, :class:`GivenLikelihood`): its ``posterior(x)``,
``prior()`` and ``likelihood.log_prob(x, z)`` mean "given y", with the shapes of an unconditional
model except the prior's ``batch_shape [batch]``. The objectives, the trainer, IWAE, AIS, the
inference gap and the diagnostics take the view as they take any model. A function that cuts its
examples into batches itself takes a ``condition`` aligned with x and binds each batch's rows
(``vaelab.model.vae_model.given_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution

from vaelab.components.likelihoods import DataMoments, Likelihood

__all__ = [
    "GivenLikelihood",
    "GivenPosterior",
    "GivenPrior",
    "one_hot",
]


class GivenPosterior(nn.Module):
    """q(z|x, y) with y bound: ``forward(x)`` is ``posterior(x, y)``, ``batch_shape [batch]``."""

    def __init__(self, posterior: nn.Module, condition: torch.Tensor) -> None:
        super().__init__()
        self.posterior = posterior
        self.condition = condition

    def forward(self, x: torch.Tensor) -> Distribution:
        distribution: Distribution = self.posterior(x, self.condition)
        return distribution


class GivenPrior(nn.Module):
    """p(z|y) with y bound: ``forward()`` is ``prior(y)``; ``batch_shape [batch]`` for a prior that
    reads y, ``[]`` for one that ignores it."""

    def __init__(self, prior: nn.Module, condition: torch.Tensor) -> None:
        super().__init__()
        self.prior = prior
        self.condition = condition

    def forward(self) -> Distribution:
        distribution: Distribution = self.prior(self.condition)
        return distribution


class GivenLikelihood(Likelihood):
    """p(x|z, y) with y bound: every method that reads z (``forward``, ``log_prob``, ``mean``,
    ``decoder_params``) passes y to ``likelihood``; the rest (support checks, the data shape,
    names) is the likelihood's own. Holds no state of its own: ``Likelihood.__init__`` (a
    decoder and an offset) is not called."""

    def __init__(self, likelihood: Likelihood, condition: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.likelihood = likelihood
        self.condition = condition
        self.data_shape = likelihood.data_shape
        self.params_per_dim = likelihood.params_per_dim
        self.support = likelihood.support

    def _bound(self, condition: torch.Tensor | None) -> torch.Tensor:
        if condition is not None:
            raise ValueError("this likelihood is already given a condition; pass none")
        return self.condition

    def decoder_params(
        self, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        return self.likelihood.decoder_params(z, self._bound(condition))

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> Distribution:
        distribution: Distribution = self.likelihood(z, self._bound(condition))
        return distribution

    def log_prob(
        self, x: torch.Tensor, z: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.likelihood.log_prob(x, z, self._bound(condition))

    def mean(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.likelihood.mean(z, self._bound(condition))

    def distribution(self, params: tuple[torch.Tensor, ...]) -> Distribution:
        return self.likelihood.distribution(params)

    @property
    def data_unit(self) -> float:
        return self.likelihood.data_unit

    def initialise(self, data: torch.Tensor | DataMoments) -> None:
        self.likelihood.initialise(data)

    def start_at(self, moments: DataMoments) -> None:
        self.likelihood.start_at(moments)

    def location_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return self.likelihood.location_of_mean(mean)

    def check_support(self, x: torch.Tensor) -> None:
        self.likelihood.check_support(x)

    def why_not_a_probability(self, x: torch.Tensor) -> str | None:
        return self.likelihood.why_not_a_probability(x)

    @property
    def name(self) -> str:
        return self.likelihood.name


def one_hot(labels: Any, classes: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Class labels ``[n]`` as one-hot float32 conditions ``[n, len(classes)]``, column j for
    ``classes[j]``; a label that is none of ``classes`` is refused, naming it."""
    labels = np.asarray(labels)
    known = np.asarray(classes)
    order = np.argsort(known, kind="stable")
    position = np.searchsorted(known[order], labels)
    position = np.clip(position, 0, len(known) - 1)
    found = known[order][position] == labels
    if labels.size and not bool(np.all(found)):
        unknown = labels[~found].ravel()[:1].tolist()[0]  # a Python value, for its repr
        shown = ", ".join(str(c) for c in known[:20]) + (", …" if len(known) > 20 else "")
        raise ValueError(
            f"label {unknown!r} is not one of the model's classes ({shown}); give labels of "
            "the classes it was trained on"
        )
    codes = np.zeros((labels.shape[0], len(known)), dtype=np.float32)
    codes[np.arange(labels.shape[0]), order[position]] = 1.0
    return codes
