"""The start of every training run, written once for ``VAE.fit`` and ``vaelab train``: one seed
for the random streams, the model built from its configuration, checked against its data and
started at it, and the trainer that will train it.

The order is part of the contract, since it decides every number a run produces: with torch's
global generators seeded by the run's seed, the streams' seed (data order, binarisation,
reparameterisation noise; ``vaelab.train.streams``) is drawn first, then the networks are
initialised. So a model trained by ``fit`` and one trained by ``vaelab train`` with the same seed
and data start from the same weights and see the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from vaelab.components.likelihoods import DataMoments
from vaelab.model.registry import ModelConfig, build_model
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.noise import seeded
from vaelab.train.config import TrainConfig
from vaelab.train.trainer import Trainer

INIT_EXAMPLES = 10_000  # how many examples set the model's starting point (VAEModel.initialise)

B = TypeVar("B")  # the batches a run trains on


@dataclass
class TrainingStart(Generic[B]):
    """A run ready to train: its model, the configuration it was built from, its batches and its
    trainer (which holds the streams' seed)."""

    model: VAEModel
    config: ModelConfig
    batches: B
    trainer: Trainer


def start_model(
    config: ModelConfig,
    device: torch.device,
    data: torch.Tensor | DataMoments,
    check: Callable[[VAEModel], None] | None = None,
) -> VAEModel:
    """The model of ``config`` on ``device``, checked by ``check`` (its likelihood's support on
    the training data, which raises a ``ValueError`` that says what to do), then started at its
    training data: the first ``INIT_EXAMPLES`` examples ``[n, *data_shape]`` or the moments of a
    stream (``VAEModel.initialise``)."""
    model = build_model(config).to(device)
    if check is not None:
        check(model)
    model.initialise(data.to(device) if isinstance(data, torch.Tensor) else data)
    return model


@contextlib.contextmanager
def start_training(
    seed: int | None,
    device: torch.device,
    build: Callable[[int], tuple[VAEModel, ModelConfig, B]],
    train_config: TrainConfig,
    **trainer_options: Any,
) -> Iterator[TrainingStart[B]]:
    """Within the block, torch's global generators are seeded with ``seed`` (``None``: a fresh
    one) and restored after it (``vaelab.objectives.noise.seeded``), so what runs inside (``fit``
    trains there) draws the same numbers every time. ``build(streams_seed)`` makes the model
    (with ``start_model``), its configuration and its batches; the trainer gets
    ``trainer_options`` (checkpoint, world, observer, compile …)."""
    with seeded(seed, device):
        streams_seed = int(torch.randint(0, 2**62, ()).item())
        model, config, batches = build(streams_seed)
        trainer = Trainer(model, train_config, device, seed=streams_seed, **trainer_options)
        yield TrainingStart(model, config, batches, trainer)
