"""Train / valid / test: the ``Split`` that converts stored rows to float32 on access, the
``DataSplits`` that ``load_data`` returns, and the rules that cut a data set into its three splits
(its own files, an official test file, or a seeded permutation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vaelab.data.errors import DataError
from vaelab.data.loaded import Loaded, Part
from vaelab.data.npyrows import NpyRows


@dataclass(frozen=True, eq=False, repr=False)
class Split:
    """The examples of one split; indexing returns float32 rows computed on access.

    ``split[key]`` (``key`` an int, a slice or a 1-D integer array) returns a new float32 array
    ``[len(key), *shape]`` (``[*shape]`` for an int):
    ``(float32(stored[rows]) - offset) / divisor``, then ``> threshold`` as 0/1 when
    ``threshold`` is set. ``np.asarray(split)`` converts the whole split (for a memory map, that
    reads the file). ``len``, ``shape``, ``ndim`` and ``dtype`` (float32) describe the converted
    array, so a trainer can batch a split like an array: ``torch.from_numpy(split[idx])``.

    ``stored`` is the data as stored (any numeric dtype; for a ``.npy`` source a read-only
    ``vaelab.data.npyrows.NpyRows``); ``index`` (int64 or ``None`` for all rows in order) selects this split's rows of
    ``stored``; ``labels`` is int64 ``[len(split)]`` aligned with the rows, or ``None``.
    """

    stored: np.ndarray
    index: np.ndarray | None
    labels: np.ndarray | None
    offset: float = 0.0
    divisor: float = 1.0
    threshold: float | None = None

    def __len__(self) -> int:
        return int(self.stored.shape[0] if self.index is None else self.index.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.stored.shape[1:])

    @property
    def ndim(self) -> int:
        return self.stored.ndim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __getitem__(self, key: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        rows = self.stored[key] if self.index is None else self.stored[self.index[key]]
        # np.array (not asarray) always copies: callers never get a view into the file.
        x = np.array(rows, dtype=np.float32)
        if self.offset != 0.0:
            x -= np.float32(self.offset)
        if self.divisor != 1.0:
            x /= np.float32(self.divisor)
        if self.threshold is not None:
            x = (x > np.float32(self.threshold)).astype(np.float32)
        return x

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a Split converts its rows on access and cannot return a view")
        x = self[:]
        return x if dtype is None else x.astype(dtype, copy=False)

    def __repr__(self) -> str:
        kind = "memmap" if isinstance(self.stored, (np.memmap, NpyRows)) else "array"
        return (
            f"Split(n={len(self)}, shape={self.shape[1:]}, stored={self.stored.dtype} {kind}, "
            f"labels={self.labels is not None})"
        )


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Train, validation and test examples of one data set, with a record of how they were made.

    ``train`` / ``valid`` / ``test`` are ``Split`` objects (float32 rows on access, ``.labels``);
    ``shape`` is the per-example shape, ``(C, H, W)`` for images and ``(features,)`` for tables;
    ``binarize`` is ``"none"``, ``"threshold"`` or ``"dynamic"``; under ``"dynamic"`` a trainer
    calls ``binarize_batch`` on every training batch. ``record`` is a JSON-serialisable dict of
    what was loaded and done (source, split rule, sizes, scaling with its offset / divisor,
    binarisation, and the ranges ``raw_range`` / ``scaled_range`` / ``range`` before scaling, after
    scaling and as the splits return them); ``load_data(**record["arguments"], data_dir=...)``
    loads the same splits again.
    """

    train: Split
    valid: Split
    test: Split
    shape: tuple[int, ...]
    name: str
    binarize: str
    record: dict[str, Any]

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def describe(splits: DataSplits) -> str:
    """One line for people: sizes, example shape, scaling and binarisation, each with the range of
    the values it leaves."""
    r = splits.record
    shape = "×".join(str(s) for s in splits.shape)
    low, high = r["scaled_range"]
    text = (
        f"{splits.name}: {len(splits.train):,} train / {len(splits.valid):,} valid / "
        f"{len(splits.test):,} test examples of shape {shape}; scaling: {r['scaling']} "
        f"(values in [{low:.4g}, {high:.4g}]); binarisation: {splits.binarize}"
    )
    if splits.binarize == "threshold":
        text += f" at {r['threshold']:g}"
    elif splits.binarize == "dynamic":
        text += f" (valid/test drawn once with seed {r['arguments']['seed']})"
    if splits.binarize != "none":
        low, high = r["range"]
        text += f" (values in [{low:.4g}, {high:.4g}])"
    if splits.train.labels is not None:
        text += f"; labels: {len(np.unique(splits.train.labels))} classes"
    return text


Rows = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]  # stored, index, labels


def _share(n: int, fraction: float) -> int:
    return 0 if fraction == 0.0 else max(1, math.floor(n * fraction + 0.5))


def permuted_split(
    n: int, valid_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted int64 row indices of train, valid and test; see the module docstring."""
    n_test, n_valid = _share(n, test_fraction), _share(n, valid_fraction)
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise DataError(
            f"{n} examples are too few to split with valid_fraction={valid_fraction} and "
            f"test_fraction={test_fraction}; lower the fractions or add data"
        )
    order = np.random.default_rng(seed).permutation(n)
    return (
        np.sort(order[:n_train]),
        np.sort(order[n_train : n_train + n_valid]),
        np.sort(order[n_train + n_valid :]),
    )


def split_parts(
    loaded: Loaded,
    parts: list[Part],
    valid_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[Rows, Rows, Rows, str]:
    if loaded.test is None:
        (whole,) = parts
        indices = permuted_split(whole.x.shape[0], valid_fraction, test_fraction, seed)
        rows = [(whole.x, i, None if whole.labels is None else whole.labels[i]) for i in indices]
        rule = (
            f"permutation of all {whole.x.shape[0]} examples from "
            f"numpy.random.default_rng({seed}): test = its last round(n * {test_fraction}), "
            f"valid = round(n * {valid_fraction}) before those, train = the rest; file order "
            f"within each split"
        )
        return rows[0], rows[1], rows[2], rule
    if loaded.valid is None:
        train, test = parts
        n = train.x.shape[0]
        cut = n - _share(n, valid_fraction)
        if cut < 1:
            raise DataError(f"valid_fraction={valid_fraction} leaves no training examples")
        labels = train.labels
        rule = (
            f"official test set; valid = the last {n - cut} of the {n} rows of the train file, "
            f"in file order (valid_fraction={valid_fraction})"
        )
        return (
            (train.x[:cut], None, None if labels is None else labels[:cut]),
            (train.x[cut:], None, None if labels is None else labels[cut:]),
            (test.x, None, test.labels),
            rule,
        )
    train, valid, test = parts
    return (
        (train.x, None, train.labels),
        (valid.x, None, valid.labels),
        (test.x, None, test.labels),
        "the data set's own train / valid / test files (fractions not used)",
    )
