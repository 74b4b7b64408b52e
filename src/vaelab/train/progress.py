"""What training reports and how it ends early: the means of each epoch (``EpochMetrics``), which
the trainer's observers hear of (``vaelab.train.trainer.TrainingObserver``), and the two ways it
stops before its last epoch (``NonFiniteLossError``, ``TrainingInterrupted``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class NonFiniteLossError(RuntimeError):
    """The loss (or a parameter) became NaN or infinite; the message names the epoch and step."""


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C); the state was checkpointed when a checkpoint was set."""


@dataclass
class EpochMetrics:
    """Means over one epoch, in nats per example; ``step`` counts optimiser steps so far.

    ``elbo``, ``reconstruction`` and ``kl`` are the ELBO's terms on the training batches (under
    ``objective="iwae"``, Monte Carlo estimates from the bound's own k draws); ``iwae`` is the
    IWAE-k bound training maximised, when it did. ``valid_elbo`` is always the ELBO, a yardstick
    common to every objective, and what selects the best weights.

    ``skipped_updates``: updates of this epoch skipped for their gradient norm
    (``TrainConfig.skip_grad_norm``); ``rollbacks``: non-finite losses that sent this epoch back
    to the last good state (``max_rollbacks``); ``kl_per_layer``: the mean KL of each stochastic
    layer, z₁'s first (one entry for a one-layer model: ``kl``), ``vaelab.objectives.layers``;
    ``valid_error``: for a semi-supervised model (M2), the fraction of validation examples its
    classifier q(y|x) labels wrongly (``vaelab.train.validation.classification_error``)."""

    epoch: int
    elbo: float
    reconstruction: float
    kl: float
    lr: float
    seconds: float
    examples_per_second: float
    valid_elbo: float | None = None
    step: int = 0
    kl_weight: float = 1.0
    iwae: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    skipped_updates: int = 0
    rollbacks: int = 0
    kl_per_layer: list[float] = field(default_factory=list)
    valid_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict. ``dataclasses.asdict`` deep-copies every value, which
        over a whole history at every epoch end cost more than the digits' epochs themselves."""
        return {**vars(self), "extra": dict(self.extra), "kl_per_layer": list(self.kl_per_layer)}
