"""M2's batches as the paper draws them (Kingma, Rezende, Mohamed & Welling 2014, §3.1.2 and
Algorithm 1): every step sees a batch of unlabelled examples and a batch of labelled ones.

``LabelledBatches`` walks the unlabelled examples in a keyed permutation per epoch (as
``IndexedBatches`` walks all of them) and appends to each batch ``labelled_batch_size`` labelled
examples drawn by cycling through the small labelled set: the labelled draws of the whole run form
one sequence, cut into passes of the labelled set, each pass in an order keyed by the run's seed
and the pass's number (``vaelab.train.streams``), so step s of the run takes positions
s·B_l … s·B_l + B_l − 1 of that sequence. Every draw is a function of (seed, epoch, batch), so a
resumed run continues bit-exactly and any number of workers share each batch.

Each batch carries per-example ``weights`` (``Batch.weights``) that make the step's objective

    Σ_i w_i · objective_i = (N_u/N) · mean_batch U  +  (N_l/N) · mean_batch [L + (α/N_l) log q(y|x)]

with N_u unlabelled and N_l labelled examples of N: its expectation over the draws is J^α / N,
J^α = Σ_labelled L + Σ_unlabelled U + α · E_labelled[log q(y|x)] (the paper's eq. 9; α/N_l per
labelled example is ``TrainConfig.classification_weight``, ``vaelab.model.semi_supervised``).
So the step is an unbiased estimate of the paper's objective up to the constant factor 1/N, as
the ordinary batch mean is of the ELBO summed over the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from vaelab.train.batches import Batch, IndexedBatches, Share
from vaelab.train.checkpoint import Tensors

__all__ = ["LabelledBatches", "semi_supervised_batches"]

LABELLED_STREAM = "labelled"


class LabelledBatches(IndexedBatches):
    """Batches of ``batch_size`` unlabelled examples, each followed by ``labelled_batch_size``
    labelled ones (at most the number of labelled examples), see the module docstring.
    ``condition`` ``[examples, C]`` holds one-hot rows for labelled examples and rows of zeros
    for the others; an epoch is one pass over the unlabelled examples."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        seed: int,
        *,
        condition: Any,
        labelled_batch_size: int,
        binarize: bool = False,
    ) -> None:
        super().__init__(data, batch_size, seed, binarize=binarize, condition=condition)
        assert self.condition is not None
        known = self.condition.sum(1) > 0
        self.labelled = torch.nonzero(known).squeeze(1)
        self.unlabelled = torch.nonzero(~known).squeeze(1)
        if self.labelled.numel() == 0 or self.unlabelled.numel() == 0:
            raise ValueError("separate labelled batches need labelled and unlabelled examples")
        if labelled_batch_size < 1:
            raise ValueError(f"labelled_batch_size must be at least 1, got {labelled_batch_size}")
        self.labelled_batch_size = min(labelled_batch_size, int(self.labelled.numel()))

    def __len__(self) -> int:
        return -(-int(self.unlabelled.numel()) // self.batch_size)

    def labelled_draw(self, step: int) -> torch.Tensor:
        """The labelled examples (positions in the data) of global step ``step``, ``[B_l]``."""
        n, size = int(self.labelled.numel()), self.labelled_batch_size
        first = step * size
        passes = range(first // n, (first + size - 1) // n + 1)
        assert self.streams is not None
        orders = torch.cat(
            [
                torch.randperm(n, generator=self.streams.generator(LABELLED_STREAM, p))
                for p in passes
            ]
        )
        start = first - passes[0] * n
        return self.labelled[orders[start : start + size]]

    def batches(self, epoch: int, start: int = 0, share: Share | None = None) -> Iterator[Batch]:
        assert self.streams is not None
        unlabelled = int(self.unlabelled.numel())
        order = self.unlabelled[self.streams.permutation(unlabelled, epoch)]
        fraction = unlabelled / self.examples  # N_u / N
        for b in range(start, len(self)):
            lo = b * self.batch_size
            size_u = min(self.batch_size, unlabelled - lo)
            size = size_u + self.labelled_batch_size
            rows = slice(0, size) if share is None else share(size)
            index = torch.cat([order[lo : lo + size_u], self.labelled_draw(epoch * len(self) + b)])
            x = self._take(index[rows])
            if self.binarize:
                u = self.streams.uniform((size, *x.shape[1:]), epoch, b)
                x = (u[rows] < x).to(x.dtype)
            weights = torch.cat(
                [
                    torch.full((size_u,), fraction / size_u),
                    torch.full(
                        (self.labelled_batch_size,), (1 - fraction) / self.labelled_batch_size
                    ),
                ]
            )
            condition = self.condition[index[rows]]  # type: ignore[index]
            yield Batch(x, b, size, rows, condition, weights[rows])

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, state = super().state()
        return tensors, {
            **state,
            "labelled": int(self.labelled.numel()),
            "labelled_batch_size": self.labelled_batch_size,
        }


def semi_supervised_batches(
    data: Any,
    batch_size: int,
    seed: int,
    *,
    condition: Any,
    labelled_batch_size: int,
    binarize: bool = False,
) -> IndexedBatches:
    """The training batches of a run whose ``condition`` has missing labels (rows of zeros):
    ``LabelledBatches`` when ``labelled_batch_size`` > 0 and some labels are missing, else the
    ordinary ``IndexedBatches`` (labelled examples among the others, as before
    ``labelled_batch_size`` existed)."""
    rows = torch.as_tensor(condition)
    if labelled_batch_size > 0 and bool((rows.sum(1) == 0).any()):
        return LabelledBatches(
            data,
            batch_size,
            seed,
            condition=condition,
            labelled_batch_size=labelled_batch_size,
            binarize=binarize,
        )
    return IndexedBatches(data, batch_size, seed, binarize=binarize, condition=condition)
