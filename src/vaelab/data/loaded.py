"""What a reader of one format hands to ``load_data``: the stored examples of each part of a data
set (``Part``) and what is known about them (``Loaded``), before any splitting or scaling; and the
check that a part holds numeric examples one per row (``as_examples``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vaelab.data.errors import DataError


@dataclass(frozen=True)
class Part:
    """The stored examples of one part of a data set (all of it, or its own train / valid / test
    file), as a reader found them."""

    x: np.ndarray  # [n, *stored_shape], any numeric dtype, maybe a memmap or NpyRows
    labels: np.ndarray | None  # [n] or None
    origin: str  # for messages: "'x.npy'", "the MNIST train file"


@dataclass(frozen=True)
class Loaded:
    """What a reader found: the parts, with the name, format and facts that splitting, scaling and
    the record need."""

    name: str
    format: str
    train: Part  # all examples when test is None
    valid: Part | None = None  # None: cut from train
    test: Part | None = None  # None: train, valid and test all come from a permutation
    scale: tuple[float, str] | None = None  # a named data set's divisor under scale="auto"
    binary: bool = False  # values are known to be 0 / 1 already
    classes: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()


def as_examples(part: Part) -> Part:
    """Check dtype and shape of one part; ``[n, H, W]`` becomes ``[n, 1, H, W]`` (a view)."""
    x = part.x
    if x.dtype.kind not in "biuf":
        raise DataError(
            f"{part.origin} holds {x.dtype} values; vaelab needs numbers (booleans, integers or "
            f"floats), so convert the data to a numeric array"
        )
    if x.ndim < 2:
        raise DataError(
            f"{part.origin} has shape {x.shape} but vaelab needs one example per row, shape "
            f"[n, ...]; reshape a single column of values to [n, 1]"
        )
    if x.shape[0] < 2:
        raise DataError(f"{part.origin} holds {x.shape[0]} example(s); at least 2 are needed")
    if math.prod(x.shape[1:]) == 0:
        raise DataError(f"{part.origin} has shape {x.shape}, so its examples hold no values")
    if part.labels is not None and part.labels.shape != (x.shape[0],):
        raise DataError(
            f"{part.origin} has {x.shape[0]} examples but {part.labels.shape[0]} labels; "
            f"give one label per example"
        )
    if x.ndim == 3:
        x = x.reshape(x.shape[0], 1, *x.shape[1:])
    labels = None if part.labels is None else part.labels.astype(np.int64)
    return Part(x, labels, part.origin)
