"""The validation ELBO the trainer selects weights and stops early by: noise from a stream of its
own, so the number depends on the weights alone, whatever the number of workers."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vaelab.model.vae_model import VAEModel
from vaelab.train.batches import Batch
from vaelab.train.distributed import SINGLE, World
from vaelab.train.loss import noise_shape
from vaelab.train.streams import TrainingStreams

# Validation noise comes from this seed, so the validation ELBO depends on the weights alone.
VALID_SEED = 20131220


@torch.no_grad()
def mean_elbo(
    model: VAEModel,
    batches: Iterator[Batch],
    device: torch.device,
    world: World = SINGLE,
    seed: int = VALID_SEED,
) -> float:
    """The ELBO (analytic KL where available, one sample) averaged over every example of every
    worker's batches; each batch's noise is drawn whole from ``seed``'s "valid" stream and each
    worker takes its own columns, so the result does not depend on the number of workers."""
    streams = TrainingStreams(seed)
    event, dtype = noise_shape(model)
    totals = torch.zeros(2, dtype=torch.float64)  # Σ ELBO, examples
    for batch in batches:
        if batch.x.shape[0] == 0:  # a last batch smaller than the number of workers
            continue
        x = batch.x.to(device)
        shape = (1, batch.size, *event)
        eps = streams.normal(shape, 0, batch.number, stream="valid", device=device, dtype=dtype)
        given = model if batch.condition is None else model.given(batch.condition.to(device))
        totals[0] += float(given.elbo(x, noise=eps[:, batch.rows]).elbo.sum())
        totals[1] += x.shape[0]
    world.sum(totals)
    return float(totals[0] / max(float(totals[1]), 1.0))


@torch.no_grad()
def classification_error(
    model: VAEModel, batches: Iterator[Batch], world: World = SINGLE
) -> float | None:
    """The fraction of labelled examples of every worker's batches whose most probable class
    under the classifier q(y|x) of a semi-supervised model (M2) is not their label; ``None``
    for a model without a classifier or batches without labels. Rows of zeros among the one-hot
    conditions (no label) are left out."""
    classifier = getattr(model, "classifier", None)
    if classifier is None:
        return None
    totals = torch.zeros(2, dtype=torch.float64)  # errors, labelled examples
    device = next(model.parameters()).device
    for batch in batches:
        if batch.condition is None or batch.x.shape[0] == 0:
            continue
        condition = batch.condition.to(device)
        labelled = condition.sum(1) > 0
        if not bool(labelled.any()):
            continue
        predicted = classifier.logits(batch.x.to(device)[labelled]).argmax(1)
        totals[0] += float((predicted != condition[labelled].argmax(1)).sum())
        totals[1] += float(labelled.sum())
    world.sum(totals)
    return None if totals[1] == 0 else float(totals[0] / totals[1])
