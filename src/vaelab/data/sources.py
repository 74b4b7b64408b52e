"""Where training data comes from: a data set name or a path becomes train / valid / test splits.

``load_data(source)`` is the one entry point; ``source`` is a data set name (``SOURCES``) or a path.

Named data sets (``DATA`` is the ``data_dir`` argument, else the ``VAELAB_DATA`` variable):

- ``digits``: scikit-learn's 1,797 digits, pixels 0..16, shape ``(1, 8, 8)``, labels 0-9.
- ``mnist``: ``DATA/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, shape ``(1, 28, 28)``,
  labels 0-9, read as an IDX folder (below).
- ``binarized-mnist``: ``DATA/binarized_mnist/binarized_mnist_{train,valid,test}.npz``
  (key ``images``), the fixed binarisation of Larochelle & Murray (2011), shape ``(1, 28, 28)``,
  no labels.
- ``frey-face``: ``DATA/frey_face/frey_rawface.mat``, 1,965 faces as uint8 bytes from offset 184,
  shape ``(1, 28, 20)``.

Paths (a name wins over a file of the same name in the working directory):

- ``x.npy``: read a batch of rows at a time (``vaelab.data.npyrows.NpyRows``), never whole, with
  ``pread`` rather than a memory map, so a file larger than memory keeps memory flat.
- a folder of ``.npy`` shards: one array per file, all of one dtype and example shape, read in
  file-name order as one data set (zero-pad numbers: ``part-002.npy`` before ``part-010.npy``),
  read like one file and split by a seeded permutation like any path.
- ``x.npz`` or ``x.npz:key``: one array; ``:key`` picks it when the file holds several. An integer
  or string ``labels`` / ``y`` / ``targets`` array with one entry per example gives labels (strings
  become the index of the name in sorted order, the names kept as an image folder's are). Never
  unpickles.
- ``x.csv``: numbers separated by commas; a first row that is not all numbers is a header.
- a folder of PNG / JPEG / ... images of one size, sorted by file name; grey images keep one
  channel, colour ones become RGB. One subfolder per class gives labels (the index of the
  subfolder in sorted order).
- an IDX file (``*.idx``, ``*-ubyte``, ``*.gz``; gzip is recognised by its magic bytes); plain files
  are memory-mapped. A sibling ``*-labels-idx1-*`` of an ``*-images-idx3-*`` file gives labels.
- an IDX folder: a folder holding an MNIST-format data set (MNIST, Fashion-MNIST, KMNIST, EMNIST),
  ``[PREFIX-]{train,t10k,test}-{images-idx3,labels-idx1}-ubyte[.gz]`` (also LeCun's
  ``train-images.idx3-ubyte``), is read as the data set named after the folder, with its official
  test split and its labels from the ``labels-idx1`` files. A file there both plain and gzipped
  (torchvision's ``raw/`` folders) is read plain, memory-mapped. A folder holding several data
  sets (EMNIST's splits, told apart by PREFIX) is refused.

IDX files may be plain, gzipped, or in ``NAME.partNN`` pieces, joined in memory in numeric order.

Shapes: images are ``(channels, H, W)`` (a 3-D array ``[n, H, W]`` is read as one-channel images);
tabular data is ``(features,)``.

Splits depend on the arguments only:

- ``binarized-mnist``: its own 50,000 / 10,000 / 10,000 files; the fractions are ignored.
- ``mnist`` and IDX folders: the official test file; ``valid`` is the LAST
  ``round(n * valid_fraction)`` rows of the n-image train file, in file order (for MNIST, 6,000 of
  60,000 by default; ``valid_fraction=1/6`` gives the classic 50,000 / 10,000 cut). ``seed`` does
  not matter.
- everything else: a permutation from ``numpy.random.default_rng(seed)`` sends its last
  ``round(n * test_fraction)`` entries to ``test``, the ``round(n * valid_fraction)`` before them
  to ``valid`` and the rest to ``train``; a non-zero fraction gets at least one example. Within a
  split, examples keep file order. For ``digits`` that is 1,437 / 180 / 180.

Stored values and float rows: a ``Split`` keeps its examples as stored (``uint8`` images, a
read-only memory map of a ``.npy`` file, ...) with an affine transform, and converts on access:
``split[idx]`` is a new float32 array ``(float32(stored) - offset) / divisor``, thresholded if
asked. A memory-mapped or ``.npy`` file is thus read one batch at a time, and MNIST stays uint8 in memory.

Scaling (``scale=``), recorded exactly in ``DataSplits.record``:

- ``"auto"``: a named data set's documented scale (digits /16; MNIST and Frey Face /255, where
  Kingma's anglepy used /256 for Frey Face; binarized MNIST as is); else values already in
  ``[0, 1]`` stay; else uint8 data is divided by 255; else values stay (their range is recorded).
- ``"none"``: values as stored.
- ``"unit"``: min-max to ``[0, 1]`` with the TRAIN split's minimum and maximum, so ``valid`` and
  ``test`` may fall slightly outside ``[0, 1]``.

Binarisation (``binarize=``) works on scaled values, which must lie in ``[0, 1]`` (under
``"unit"``, those of ``train``; ``valid`` / ``test`` values beyond it count as 0 or 1):

- ``"none"``.
- ``"threshold"``: ``x > threshold`` becomes 1, else 0, the same every epoch.
- ``"dynamic"``: ``train`` stays as intensities and the trainer draws
  ``binarize_batch(x, generator)`` anew for every batch (Burda et al. 2015). ``valid`` and ``test``
  get ONE fixed Bernoulli draw, from ``numpy.random.default_rng([seed, 1])`` and
  ``default_rng([seed, 2])``, so evaluation is repeatable.

Ranges in the record, each ``[min, max]`` over all splits: ``raw_range`` of the stored values,
``scaled_range`` after scaling, and ``range`` of what the splits return, after binarisation (for
``"dynamic"``: the train intensities and the valid / test draws). ``range`` is what a model is
given, so support checks read it.
"""

from __future__ import annotations

import csv
import glob
import gzip
import math
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.data.npyrows import NpyRows

__all__ = [
    "BINARIZATIONS",
    "DATA_ENV",
    "SCALINGS",
    "SOURCES",
    "DataError",
    "DataSplits",
    "Split",
    "binarize_batch",
    "describe",
    "load_data",
]

DATA_ENV = "VAELAB_DATA"
BINARIZATIONS = ("none", "threshold", "dynamic")
SCALINGS = ("auto", "none", "unit")

# Scans of memory-mapped files (NaN check, min / max, fixed binary draws) read this much at a time,
# so a file larger than memory is never held whole.
_CHUNK_BYTES = 16 * 2**20
_F32_MAX = float(np.finfo(np.float32).max)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_NPZ_DATA_KEYS = ("x", "X", "images", "data")
_NPZ_LABEL_KEYS = ("labels", "y", "targets")
# The note on an array that looks like labels but is not (``class_labels`` repeats it).
LABELS_NOT_USED = "was not used as labels"
# IDX type codes (LeCun's format description); every multi-byte value is big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A mistake in the data or the data options; the message is one sentence saying what to do."""


# --------------------------------------------------------------------------------------------------
# Public containers


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


def binarize_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation: a fresh ``Bernoulli(x)`` draw of every value, same shape and dtype.

    Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders", Sec. 5: MNIST pixels
    are treated as probabilities and each training image is re-binarised every time it is used,
    which acts as a regulariser. ``x`` must lie in ``[0, 1]`` (``load_data`` checks the train
    split). Pass a seeded ``torch.Generator`` for reproducible training; evaluation sets are
    binarised once by ``load_data`` instead.
    """
    return torch.bernoulli(x, generator=generator)


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


# --------------------------------------------------------------------------------------------------
# What a loader returns, before splitting and scaling


@dataclass(frozen=True)
class _Part:
    x: np.ndarray  # [n, *stored_shape], any numeric dtype, maybe a memmap or NpyRows
    labels: np.ndarray | None  # [n] or None
    origin: str  # for messages: "'x.npy'", "the MNIST train file"


@dataclass(frozen=True)
class _Loaded:
    name: str
    format: str
    train: _Part  # all examples when test is None
    valid: _Part | None = None  # None: cut from train
    test: _Part | None = None  # None: train, valid and test all come from a permutation
    scale: tuple[float, str] | None = None  # a named data set's divisor under scale="auto"
    binary: bool = False  # values are known to be 0 / 1 already
    classes: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()


_NAMED: dict[str, Callable[[str | os.PathLike[str] | None], _Loaded]] = {}


def _named(name: str) -> Callable[[Callable[..., _Loaded]], Callable[..., _Loaded]]:
    def register(loader: Callable[..., _Loaded]) -> Callable[..., _Loaded]:
        _NAMED[name] = loader
        return loader

    return register


# --------------------------------------------------------------------------------------------------
# The entry point


def load_data(
    source: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    binarize: str = "none",
    threshold: float = 0.5,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    scale: str = "auto",
) -> DataSplits:
    """Load a named data set or a file / folder and split, scale and binarise it deterministically.

    ``source``: one of ``SOURCES`` or a path (``.npy``, ``.npz`` or ``file.npz:key``, ``.csv``, an
    image folder, an IDX file or an IDX folder). ``data_dir``: folder holding ``mnist/``,
    ``binarized_mnist/``, ``frey_face/`` (default: ``$VAELAB_DATA``). ``binarize``: ``"none"``,
    ``"threshold"`` (fixed ``x > threshold``) or ``"dynamic"`` (see ``binarize_batch``).
    ``valid_fraction`` / ``test_fraction``: shares of a data set without its own split (MNIST and
    an IDX folder use ``valid_fraction`` of their train file; binarized MNIST ignores both).
    ``seed``: the split permutation and the fixed valid / test draws under ``"dynamic"``.
    ``scale``: ``"auto"``, ``"none"`` or ``"unit"``.
    The module docstring gives the exact split and scaling rules. Raises ``DataError`` for any
    problem with the options or the data.
    """
    _check_options(binarize, threshold, valid_fraction, test_fraction, seed, scale)
    if isinstance(source, str) and source in _NAMED:
        loaded = _NAMED[source](data_dir)
    else:
        loaded = _load_path(source)
    parts = [p for p in (loaded.train, loaded.valid, loaded.test) if p is not None]
    parts = [_as_examples(p) for p in parts]
    shape = tuple(int(s) for s in parts[0].x.shape[1:])
    low, high = math.inf, -math.inf
    for part in parts:
        part_low, part_high = _scan(part.x, None, part.origin)
        low, high = min(low, part_low), max(high, part_high)

    train, valid, test, split_rule = _split(loaded, parts, valid_fraction, test_fraction, seed)
    train_range = None
    if scale == "unit" or binarize == "dynamic":
        train_range = _scan(train[0], train[1], "the train split")
    offset, divisor, scaling = _scaling(scale, loaded, parts[0].x.dtype, low, high, train_range)
    scaled = _transform(np.array([low, high]), offset, divisor)
    scaled_low, scaled_high = float(scaled[0]), float(scaled[1])

    notes = list(loaded.notes)
    if binarize != "none":
        if scale != "unit" and (scaled_low < 0.0 or scaled_high > 1.0):
            raise DataError(
                f"binarize={binarize!r} needs values in [0, 1], but after scaling ({scaling}) they "
                f"span [{scaled_low:.4g}, {scaled_high:.4g}]; use scale='unit' (--scale unit)"
            )
        if loaded.binary:
            notes.append(f"the data is already binary; binarize={binarize!r} leaves it unchanged")
    cut = threshold if binarize == "threshold" else None
    splits = [
        Split(x, index, labels, offset, divisor, cut) for x, index, labels in (train, valid, test)
    ]
    eval_draws = None
    if binarize == "dynamic":
        splits[1] = _fixed_draw(splits[1], seed, 1)
        splits[2] = _fixed_draw(splits[2], seed, 2)
        eval_draws = (
            "valid and test binarised once: valid from numpy.random.default_rng([seed, 1]), "
            "test from default_rng([seed, 2])"
        )
    train_scaled = None
    if train_range is not None:
        train_scaled = _transform(np.array(train_range), offset, divisor)
    seen = _seen_range(scaled, binarize, threshold, train_scaled, splits[1:])

    record: dict[str, Any] = {
        "arguments": {
            "source": os.fspath(source),
            "binarize": binarize,
            "threshold": float(threshold),
            "valid_fraction": float(valid_fraction),
            "test_fraction": float(test_fraction),
            "seed": int(seed),
            "scale": scale,
        },
        "name": loaded.name,
        "format": loaded.format,
        "shape": list(shape),
        "sizes": {"train": len(splits[0]), "valid": len(splits[1]), "test": len(splits[2])},
        "split": split_rule,
        "scale": scale,
        "scaling": scaling,
        "offset": offset,
        "divisor": divisor,
        "raw_range": [float(low), float(high)],
        "scaled_range": [scaled_low, scaled_high],
        "range": seen,
        "binarize": binarize,
        "threshold": float(threshold) if binarize == "threshold" else None,
        "eval_binarization": eval_draws,
        "classes": list(loaded.classes) if loaded.classes is not None else None,
        "notes": notes,
    }
    return DataSplits(splits[0], splits[1], splits[2], shape, loaded.name, binarize, record)


def _check_options(
    binarize: str,
    threshold: float,
    valid_fraction: float,
    test_fraction: float,
    seed: int,
    scale: str,
) -> None:
    if binarize not in BINARIZATIONS:
        raise DataError(
            f"unknown binarisation {binarize!r}; use one of: {', '.join(BINARIZATIONS)}"
        )
    if scale not in SCALINGS:
        raise DataError(f"unknown scaling {scale!r}; use one of: {', '.join(SCALINGS)}")
    if binarize == "threshold" and not 0.0 <= threshold < 1.0:
        raise DataError(f"threshold must be in [0, 1) for values in [0, 1]; got {threshold!r}")
    for what, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:  # also false for NaN
            raise DataError(f"{what} must be in [0, 1); got {fraction!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise DataError(
            f"valid_fraction + test_fraction must stay below 1 to leave training data; got "
            f"{valid_fraction!r} + {test_fraction!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be a non-negative integer; got {seed!r}")


def _as_examples(part: _Part) -> _Part:
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
    return _Part(x, labels, part.origin)


def _chunk_rows(x: np.ndarray) -> int:
    return max(1, _CHUNK_BYTES // max(1, x.itemsize * math.prod(x.shape[1:])))


def _scan(x: np.ndarray, index: np.ndarray | None, origin: str) -> tuple[float, float]:
    """Minimum and maximum of ``x[index]``, read chunk by chunk; ``DataError`` on NaN / inf."""
    n = x.shape[0] if index is None else index.shape[0]
    step = _chunk_rows(x)
    low, high = math.inf, -math.inf
    nans = infs = 0
    first_bad = -1
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk = np.asarray(x[rows] if index is None else x[index[rows]])
        if chunk.dtype.kind == "f":
            bad = ~np.isfinite(chunk)
            if bad.any():
                nans += int(np.isnan(chunk).sum())
                infs += int(bad.sum()) - int(np.isnan(chunk).sum())
                if first_bad < 0:
                    first_bad = start + int(np.flatnonzero(bad.reshape(len(chunk), -1).any(1))[0])
                continue
        if nans == infs == 0:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if nans or infs:
        counts = [f"{nans} NaN" if nans else "", f"{infs} infinite" if infs else ""]
        what = " and ".join(c for c in counts if c)
        raise DataError(
            f"{origin} contains {what} value{'s' if nans + infs > 1 else ''} "
            f"(first at row {first_bad}); clean or impute them before training"
        )
    if max(abs(low), abs(high)) > _F32_MAX:
        raise DataError(
            f"{origin} holds values as large as {max(abs(low), abs(high)):.3g}, beyond float32; "
            f"rescale the data before training"
        )
    return low, high


_Rows = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]  # stored, index, labels


def _share(n: int, fraction: float) -> int:
    return 0 if fraction == 0.0 else max(1, math.floor(n * fraction + 0.5))


def _permuted_split(
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


def _split(
    loaded: _Loaded,
    parts: list[_Part],
    valid_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[_Rows, _Rows, _Rows, str]:
    if loaded.test is None:
        (whole,) = parts
        indices = _permuted_split(whole.x.shape[0], valid_fraction, test_fraction, seed)
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


def _transform(values: np.ndarray, offset: float, divisor: float) -> np.ndarray:
    # The exact float32 arithmetic of Split.__getitem__, so recorded ranges match what batches hold.
    return (values.astype(np.float32) - np.float32(offset)) / np.float32(divisor)


def _scaling(
    scale: str,
    loaded: _Loaded,
    dtype: np.dtype,
    low: float,
    high: float,
    train_range: tuple[float, float] | None,
) -> tuple[float, float, str]:
    """``(offset, divisor, description)`` of the transform ``(x - offset) / divisor``;
    ``train_range`` (the train split's stored minimum and maximum) is needed for ``"unit"``."""
    if scale == "none":
        return 0.0, 1.0, "none: values as stored"
    if scale == "unit":
        assert train_range is not None
        train_low, train_high = train_range
        # Computed in float32 like the transform itself, so the train maximum maps to exactly 1.
        offset = float(np.float32(train_low))
        divisor = float(np.float32(train_high) - np.float32(train_low))
        if divisor == 0.0:
            raise DataError(
                f"scale='unit' needs train values that vary, but all equal {train_low:g}; "
                f"use scale='none' or check the data"
            )
        return (
            offset,
            divisor,
            f"min-max to [0, 1] with the train minimum {offset:g} and range {divisor:g}",
        )
    if loaded.scale is not None:
        divisor, why = loaded.scale
        return 0.0, divisor, why
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0, "none: values already in [0, 1]"
    if dtype == np.uint8:
        return 0.0, 255.0, "divide by 255 (uint8 data)"
    return 0.0, 1.0, f"none: values left as they are (range [{low:g}, {high:g}])"


def _seen_range(
    scaled: np.ndarray,
    binarize: str,
    threshold: float,
    train: np.ndarray | None,
    draws: Sequence[Split],
) -> list[float]:
    """Minimum and maximum of what ``split[...]`` returns over all splits: the values a model is
    given, which binarisation keeps in [0, 1] even where ``scale="unit"`` overshoots it off train.

    ``scaled``: float32 ``[2]``, the scaled minimum and maximum over all splits, which is the answer
    without binarisation. A threshold is monotone, so it maps them to the thresholded minimum and
    maximum. Under dynamic binarisation the train split holds intensities (``train``: float32
    ``[2]``, its own scaled minimum and maximum; ``binarize_batch`` draws from them) and ``draws``,
    the valid and test splits, their fixed 0 / 1 draws.
    """
    if binarize == "threshold":
        return [float(v) for v in (scaled > np.float32(threshold))]
    if binarize == "none":
        return [float(scaled[0]), float(scaled[1])]
    assert train is not None  # load_data scans the train split under "dynamic"
    lows, highs = [float(train[0])], [float(train[1])]
    for split in draws:
        if len(split):
            lows.append(float(split.stored.min()))
            highs.append(float(split.stored.max()))
    return [min(lows), max(highs)]


def _fixed_draw(split: Split, seed: int, stream: int) -> Split:
    """One Bernoulli draw of a split's scaled values, stored as uint8 0 / 1, chunk by chunk."""
    rng = np.random.default_rng([seed, stream])
    bits = np.empty(split.shape, dtype=np.uint8)
    step = _chunk_rows(np.empty((1, *split.shape[1:]), np.float32))
    for start in range(0, len(split), step):
        p = np.clip(split[start : start + step], 0.0, 1.0)  # "unit" may overshoot [0, 1] off train
        bits[start : start + step] = rng.random(p.shape, dtype=np.float32) < p
    return Split(bits, None, split.labels)


# --------------------------------------------------------------------------------------------------
# Named data sets


def _data_folder(data_dir: str | os.PathLike[str] | None, sub: str, title: str) -> Path:
    root = os.fspath(data_dir) if data_dir is not None else os.environ.get(DATA_ENV, "")
    if not root:
        raise DataError(
            f"the {title} data set is read from a data folder but none was given; pass --data-dir "
            f"(data_dir=) or set {DATA_ENV} to the folder that contains {sub}/"
        )
    folder = Path(root).expanduser() / sub
    if not folder.is_dir():
        raise DataError(
            f"{title} folder '{folder}' does not exist; pass --data-dir (data_dir=) or set "
            f"{DATA_ENV} to the folder that contains {sub}/"
        )
    return folder


@_named("digits")
def _load_digits(data_dir: str | os.PathLike[str] | None) -> _Loaded:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    x = bunch.data.astype(np.uint8).reshape(-1, 1, 8, 8)  # integers 0..16
    return _Loaded(
        name="digits",
        format="scikit-learn",
        train=_Part(x, bunch.target, "the digits data"),
        scale=(16.0, "divide by 16 (digits pixels are 0..16)"),
    )


@_named("mnist")
def _load_mnist(data_dir: str | os.PathLike[str] | None) -> _Loaded:
    folder = _data_folder(data_dir, "mnist", "MNIST")
    loaded = _load_idx_folder(folder, "MNIST")
    for part in (loaded.train, loaded.test):
        assert part is not None  # an IDX folder always has its test part
        if part.x.dtype != np.uint8 or part.x.shape[1:] != (28, 28):
            raise DataError(
                f"{part.origin} holds {part.x.dtype} {part.x.shape}, not uint8 MNIST images of "
                f"shape [n, 28, 28]; download it again"
            )
    return replace(loaded, name="mnist", scale=(255.0, "divide by 255 (MNIST pixels are 0..255)"))


@_named("binarized-mnist")
def _load_binarized_mnist(data_dir: str | os.PathLike[str] | None) -> _Loaded:
    folder = _data_folder(data_dir, "binarized_mnist", "binarized MNIST")
    parts = []
    for split in ("train", "valid", "test"):
        path = folder / f"binarized_mnist_{split}.npz"
        if not path.is_file():
            raise DataError(
                f"'{path}' does not exist; restore the binarized MNIST files in {folder}"
            )
        x, *_ = _read_npz(path, "images")
        if x.ndim != 2 or x.shape[1] != 784:
            raise DataError(f"'{path}' holds shape {x.shape}, not [n, 784]; restore the file")
        parts.append(_Part(x.reshape(-1, 1, 28, 28), None, f"'{path}'"))
    return _Loaded(
        name="binarized-mnist",
        format="npz",
        train=parts[0],
        valid=parts[1],
        test=parts[2],
        scale=(1.0, "none: already binary"),
        binary=True,
    )


_FREY_BYTES = 184 + 1965 * 28 * 20  # MATLAB v5 header + one uint8 matrix [560, 1965]


@_named("frey-face")
def _load_frey_face(data_dir: str | os.PathLike[str] | None) -> _Loaded:
    path = _data_folder(data_dir, "frey_face", "Frey Face") / "frey_rawface.mat"
    if not path.is_file():
        raise DataError(f"'{path}' does not exist; restore frey_rawface.mat in {path.parent}")
    if path.stat().st_size != _FREY_BYTES:
        raise DataError(
            f"'{path}' has {path.stat().st_size:,} bytes, not the {_FREY_BYTES:,} of "
            f"frey_rawface.mat; restore the original file"
        )
    # The matrix is stored column-major [560, 1965], i.e. 1965 images of 28 x 20 row-major pixels.
    x = np.fromfile(path, dtype=np.uint8, offset=184).reshape(1965, 1, 28, 20)
    return _Loaded(
        name="frey-face",
        format="mat",
        train=_Part(x, None, f"'{path}'"),
        scale=(255.0, "divide by 255 (Frey Face pixels are 0..255)"),
    )


SOURCES = tuple(_NAMED)


# --------------------------------------------------------------------------------------------------
# Files and folders


def _missing(path: str) -> DataError:
    return DataError(
        f"data file '{path}' does not exist; pass a path to a .npy/.npz/.csv file, an image "
        f"folder, an IDX file, or one of: {', '.join(SOURCES)}"
    )


def _pieces(path: Path) -> list[Path]:
    """``NAME.part00``, ``NAME.part01``, ... in numeric order (pieces made by ``split -d``)."""
    found = []
    for piece in path.parent.glob(glob.escape(path.name) + ".part*"):
        match = re.fullmatch(r"\.part(\d+)", piece.name[len(path.name) :])
        if match:
            found.append((int(match.group(1)), piece))
    return [piece for _, piece in sorted(found)]


def _load_path(source: str | os.PathLike[str]) -> _Loaded:
    text = os.fspath(source)
    key = None
    match = re.fullmatch(r"(.+\.npz):([^:/\\]+)", text, flags=re.IGNORECASE)
    if match and not Path(text).exists():
        text, key = match.group(1), match.group(2)
    path = Path(text).expanduser()
    if path.is_dir():
        if _idx_sets(path):
            return _load_idx_folder(path)
        if any(p.suffix.lower() == ".npy" for p in path.iterdir()):
            return _load_npy_shards(path)
        return _load_image_folder(path)
    name = path.name.lower()
    idx = re.search(r"(ubyte|\.idx\d?)(\.gz)?$|\.gz$", name) is not None
    if not path.is_file() and not (idx and _pieces(path)):  # only IDX files come in pieces
        raise _missing(text)
    if name.endswith(".npy"):
        return _load_npy(path)
    if name.endswith(".npz"):
        x, labels, classes, notes = _read_npz(path, key)
        part = _Part(x, labels, f"'{path}'")
        return _Loaded(path.stem, "npz", part, classes=classes, notes=notes)
    if name.endswith(".csv"):
        return _load_csv(path)
    if idx:
        return _load_idx(path)
    raise DataError(
        f"cannot tell the format of '{path}'; use a .npy, .npz or .csv file, an IDX file "
        f"(.idx, -ubyte, .gz) or a folder of images"
    )


def _load_npy(path: Path) -> _Loaded:
    try:
        x = NpyRows([path])
    except ValueError as error:
        raise DataError(str(error)) from None
    return _Loaded(path.stem, "npy", _Part(x, None, f"'{path}'"))  # type: ignore[arg-type]


def _load_npy_shards(folder: Path) -> _Loaded:
    """A folder of ``.npy`` files, one array each, read in name order as one data set."""
    shards = sorted(
        p for p in folder.iterdir() if p.suffix.lower() == ".npy" and not p.name.startswith(".")
    )
    others = [p.name for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES]
    if others:
        raise DataError(
            f"'{folder}' holds both .npy shards and images (e.g. '{others[0]}'); keep one kind "
            "of data in a folder"
        )
    try:
        x = NpyRows(shards)
    except ValueError as error:
        raise DataError(str(error)) from None
    origin = f"the {len(shards)} .npy shards of '{folder}'"
    return _Loaded(folder.resolve().name, "npy-shards", _Part(x, None, origin))  # type: ignore[arg-type]


def _read_npz(
    path: Path, key: str | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None, tuple[str, ...]]:
    """The data array of a .npz file; its labels if it has an integer or string
    ``labels``/``y`` array (strings as indices into their sorted names, which come third); notes."""
    notes: tuple[str, ...] = ()
    classes = None
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            key = _npz_key(path, keys, key)
            x = archive[key]
            labels = None
            label_key = next((k for k in _NPZ_LABEL_KEYS if k in keys and k != key), None)
            if label_key is not None:
                candidate = archive[label_key]
                one_each = candidate.shape == (x.shape[0],)
                if one_each and candidate.dtype.kind in "iu":
                    labels = candidate
                elif one_each and candidate.dtype.kind in "US":
                    names, labels = np.unique(candidate, return_inverse=True)
                    classes = tuple(
                        n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
                        for n in names.tolist()
                    )
                else:
                    notes = (
                        f"array {label_key!r} {LABELS_NOT_USED}: it is {candidate.dtype} "
                        f"{candidate.shape}, not integers or strings with one per example",
                    )
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(
            f"cannot read '{path}' as a .npz archive of numeric arrays "
            f"({str(error).rstrip('.')}); save numeric arrays with numpy.savez"
        ) from error
    return x, labels, classes, notes


def _npz_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise DataError(
                f"'{path}' has no array {key!r}; its arrays are {', '.join(keys) or 'none'}, so "
                f"pass '{path}:KEY' with one of them"
            )
        return key
    if not keys:
        raise DataError(f"'{path}' holds no arrays; save the data with numpy.savez")
    data_keys = [k for k in keys if k not in _NPZ_LABEL_KEYS]
    if len(data_keys) == 1:
        return data_keys[0]
    preferred = [k for k in _NPZ_DATA_KEYS if k in keys]
    if len(preferred) == 1:
        return preferred[0]
    raise DataError(
        f"'{path}' holds several arrays ({', '.join(keys)}) and none is obviously the data; "
        f"pass '{path}:KEY' to choose one"
    )


def _load_csv(path: Path) -> _Loaded:
    with path.open(newline="", encoding="utf-8") as handle:
        lines = [row for row in (handle.readline(), handle.readline()) if row.strip()]
    if not lines:
        raise DataError(f"'{path}' is empty; put one example per line, values separated by commas")
    header = not all(_is_number(cell) for cell in lines[0].split(","))
    if header and len(lines) < 2:
        raise DataError(f"'{path}' has a header but no data rows; add one example per line")
    try:
        x = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, encoding="utf-8")
    except ValueError as error:
        raise DataError(
            _csv_problem(path, int(header)) or f"cannot read '{path}': {error}"
        ) from error
    notes = ("the first row was read as a header",) if header else ()
    return _Loaded(path.stem, "csv", _Part(x, None, f"'{path}'"), notes=notes)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv_problem(path: Path, skip: int) -> str | None:
    """The first non-numeric cell or ragged row of a CSV file in words (lines count from 1)."""
    width = None
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if line <= skip or not any(cell.strip() for cell in row):
                continue
            if width is not None and len(row) != width:
                return (
                    f"'{path}' line {line} has {len(row)} values but the rows before have {width}; "
                    f"give every row the same number of comma-separated values"
                )
            width = len(row)
            for column, cell in enumerate(row, start=1):
                if not cell.strip():
                    return (
                        f"'{path}' line {line}, column {column} is empty; fill in or remove "
                        f"missing values"
                    )
                if not _is_number(cell):
                    return (
                        f"'{path}' line {line}, column {column} holds {cell.strip()!r}, which is "
                        f"not a number; CSV data must be numbers separated by commas"
                    )
    return None


def _load_image_folder(folder: Path) -> _Loaded:
    from PIL import Image  # imported here: only image folders need it

    def images_in(directory: Path) -> list[Path]:
        return sorted(
            p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )

    top = images_in(folder)
    classes = {
        d.name: found
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".") and (found := images_in(d))
    }
    if top and classes:
        raise DataError(
            f"'{folder}' holds images both at its top level (e.g. '{top[0].name}') and in "
            f"subfolders; put every image in one subfolder per class, or none in subfolders"
        )
    if classes:
        files = [p for found in classes.values() for p in found]
        labels = np.array([i for i, found in enumerate(classes.values()) for _ in found], np.int64)
    elif top:
        files, labels = top, None
    else:
        raise DataError(
            f"folder '{folder}' contains no images ({', '.join(_IMAGE_SUFFIXES)}); add images, "
            f"or one subfolder of images per class"
        )

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    raise DataError(
                        f"image '{path}' has {image.mode} pixels; vaelab reads 8-bit images, so "
                        f"convert it to 8-bit grayscale or RGB"
                    )
                # Grey stays one channel, colour becomes RGB; alpha is dropped.
                if image.mode in ("L", "RGB"):
                    pixels = np.asarray(image, dtype=np.uint8)
                else:
                    grey = image.mode in ("1", "LA", "La")
                    pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.uint8)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as error:
            raise DataError(
                f"cannot read image '{path}' ({error}); re-save it as PNG or remove it"
            ) from error
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    first = read(files[0])
    x = np.empty((len(files), *first.shape), dtype=np.uint8)
    x[0] = first
    for i, path in enumerate(files[1:], start=1):
        pixels = read(path)
        if pixels.shape != first.shape:
            c, h, w = pixels.shape
            c0, h0, w0 = first.shape
            raise DataError(
                f"image '{path.relative_to(folder)}' is {w}×{h} with {c} channel(s) but "
                f"'{files[0].relative_to(folder)}' is {w0}×{h0} with {c0}; give all images one "
                f"size and colour mode"
            )
        x[i] = pixels
    return _Loaded(
        name=folder.name,
        format="images",
        train=_Part(x, labels, f"'{folder}'"),
        classes=tuple(classes) if classes else None,
    )


# The files of an MNIST-format data set (MNIST, Fashion-MNIST, KMNIST, EMNIST):
# [PREFIX-]SPLIT-KIND-idxN-ubyte[.gz], SPLIT train, t10k or test, KIND images (idx3) or labels
# (idx1); LeCun's uncompressed names put a dot before idxN (train-images.idx3-ubyte). EMNIST names
# each of its data sets by a prefix (emnist-balanced-train-images-idx3-ubyte.gz).
_IDX_SET_FILE = re.compile(
    r"(?P<prefix>(?:.*[-_.])?)(?P<split>train|t10k|test)[-_]"
    r"(?P<kind>images[-_.]idx3|labels[-_.]idx1)[-_.]ubyte(?P<gz>\.gz)?",
    flags=re.IGNORECASE,
)
_IdxSet = dict[tuple[str, str], Path]  # ("train" | "test", "images" | "labels") -> file


def _idx_sets(folder: Path) -> dict[str, _IdxSet]:
    """The MNIST-format data sets in a folder, by file-name prefix; only those with images count.

    A file may be whole, gzipped or in ``.partNN`` pieces (``_read_idx`` reads each). Where one
    file is there twice (torchvision keeps both ``x-ubyte.gz`` and ``x-ubyte``), the plain whole
    one is read, because it can be memory-mapped.
    """
    found: dict[str, dict[tuple[str, str], list[tuple[bool, bool, str]]]] = {}
    for entry in sorted(folder.iterdir()):
        piece = re.fullmatch(r"(.+)\.part\d+", entry.name)
        name = piece.group(1) if piece else entry.name
        match = _IDX_SET_FILE.fullmatch(name)
        if match is None or not entry.is_file():
            continue
        split = "train" if match["split"].lower() == "train" else "test"
        kind = match["kind"][:6].lower()  # "images" or "labels"
        rank = (match["gz"] is not None, piece is not None, name)
        found.setdefault(match["prefix"], {}).setdefault((split, kind), []).append(rank)
    return {
        prefix: {key: folder / min(ranks)[2] for key, ranks in files.items()}
        for prefix, files in found.items()
        if ("train", "images") in files or ("test", "images") in files
    }


def _load_idx_folder(folder: Path, title: str = "") -> _Loaded:
    """An MNIST-format data set in ``folder``: its train file and its official test file, each
    with the labels of the matching ``labels-idx1`` file when there is one."""
    what = f"{title} folder" if title else "folder"
    sets = _idx_sets(folder)
    if not sets:
        raise DataError(
            f"{what} '{folder}' holds no IDX images named like train-images-idx3-ubyte.gz and "
            f"t10k-images-idx3-ubyte.gz; put them there (plain, gzipped or in .partNN pieces)"
        )
    if len(sets) > 1:
        names = sorted(
            _idx_name(files.get(("train", "images")) or files[("test", "images")])
            for files in sets.values()
        )
        raise DataError(
            f"{what} '{folder}' holds {len(sets)} IDX data sets ({', '.join(names)}); move the "
            f"files of the one to train on into a folder of their own and pass that folder"
        )
    (files,) = sets.values()
    for split, other in (("train", "test"), ("test", "train")):
        if (split, "images") not in files:
            wanted = {"train": "train-", "test": "t10k- or test-"}[split] + "images-idx3-ubyte"
            raise DataError(
                f"{what} '{folder}' holds IDX {other} images "
                f"({_idx_name(files[(other, 'images')])}) but no {split} images ({wanted}, with "
                f"the same prefix); add them, or pass the {other} file itself to split it at random"
            )
    parts = []
    for split in ("train", "test"):
        images = files[(split, "images")]
        x = _read_idx(images)
        labels = None
        if (split, "labels") in files:
            labels = _read_idx(files[(split, "labels")])
            if labels.dtype.kind not in "iu" or labels.shape != x.shape[:1]:
                raise DataError(
                    f"'{files[(split, 'labels')]}' holds {labels.dtype} {labels.shape}, not one "
                    f"integer label for each of the {x.shape[0]:,} images of '{images}'; restore "
                    f"the matching labels file or remove it"
                )
        parts.append(_Part(x, labels, f"'{images}'"))
    train, test = parts
    if test.x.shape[1:] != train.x.shape[1:] or test.x.dtype != train.x.dtype:
        raise DataError(
            f"the test images {test.origin} are {test.x.dtype} {test.x.shape[1:]} but the train "
            f"images {train.origin} are {train.x.dtype} {train.x.shape[1:]}; the two files must "
            f"come from one data set"
        )
    read = []
    for split in ("train", "test"):
        text = f"{split} {_idx_name(files[(split, 'images')])}"
        if (split, "labels") in files:
            text += f" with labels {_idx_name(files[(split, 'labels')])}"
        read.append(text)
    return _Loaded(
        name=Path(os.path.abspath(folder)).name,  # abspath: '.' gets a name, links stay as named
        format="idx",
        train=train,
        test=test,
        notes=(f"IDX files read: {'; '.join(read)}",),
    )


def _idx_name(path: Path) -> str:
    """A file's name for messages, saying when it is read from ``.partNN`` pieces."""
    return path.name if path.is_file() else f"{path.name} (from .partNN pieces)"


def _load_idx(path: Path) -> _Loaded:
    x = _read_idx(path)
    labels = None
    sibling = path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
    if sibling != path and (sibling.is_file() or _pieces(sibling)):
        candidate = _read_idx(sibling)
        if candidate.dtype.kind in "iu" and candidate.shape == (x.shape[0],):
            labels = candidate
    return _Loaded(path.name.split(".")[0], "idx", _Part(x, labels, f"'{path}'"))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array: memory-mapped for a plain file, decoded in memory if gzip or in pieces."""
    pieces = [] if path.is_file() else _pieces(path)
    if not path.is_file() and not pieces:
        raise DataError(
            f"'{path}' does not exist (nor do {path.name}.part00, ...); restore the file or pass "
            f"another data folder"
        )
    if path.is_file():
        with path.open("rb") as handle:
            head = handle.read(4)
            if head[:2] != b"\x1f\x8b":
                head += handle.read(4 * head[3]) if len(head) == 4 else b""
                dtype, dims, offset = _idx_header(path, head, path.stat().st_size)
                if math.prod(dims) == 0:  # mmap refuses empty ranges
                    return np.empty(dims, dtype)
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=dims)
        data = path.read_bytes()
    else:
        data = b"".join(p.read_bytes() for p in pieces)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(
                f"'{path}' is not a valid gzip file ({error}); download it again"
            ) from error
    dtype, dims, offset = _idx_header(path, data, len(data))
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def _idx_header(path: Path, head: bytes, size: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse magic ``00 00 TT DD`` (type code, number of dims) and the big-endian uint32 dims."""
    code = head[2] if len(head) >= 4 else -1
    if len(head) < 4 or head[:2] != b"\x00\x00" or code not in _IDX_TYPES or head[3] == 0:
        magic = int.from_bytes(head[:4].ljust(4, b"\x00"), "big")
        raise DataError(
            f"'{path}' is not an IDX file (magic number 0x{magic:08X} is not 00 00, a known type "
            f"code and a dimension count); check the path or download the file again"
        )
    offset = 4 + 4 * head[3]
    if len(head) < offset:
        raise DataError(f"'{path}' is truncated inside its IDX header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=head[3], offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = offset + math.prod(dims) * dtype.itemsize
    if size != expected:
        problem = "is truncated" if size < expected else "has extra bytes"
        raise DataError(
            f"'{path}' {problem}: its header promises {'×'.join(map(str, dims))} values "
            f"({expected:,} bytes) but it holds {size:,} bytes; download it again"
        )
    return dtype, dims, offset
