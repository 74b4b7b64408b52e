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

Where each step lives: the readers of each format in ``vaelab.data.formats`` (``named``, ``arrays``,
``shards``, ``image_folder``, ``idx``), the splits and their rules in ``vaelab.data.splits``, scaling
and binarisation in ``vaelab.data.scaling``; this module chooses the reader and puts them together.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vaelab.data.errors import DataError
from vaelab.data.formats.arrays import LABELS_NOT_USED, load_csv, load_npy, read_npz
from vaelab.data.formats.idx import idx_sets, load_idx_file, load_idx_folder, part_files
from vaelab.data.formats.image_folder import load_image_folder
from vaelab.data.formats.named import DATA_ENV, NAMED, SOURCES
from vaelab.data.formats.shards import load_npy_shards
from vaelab.data.loaded import Loaded, Part, as_examples
from vaelab.data.scaling import (
    BINARIZATIONS,
    SCALINGS,
    binarize_batch,
    choose_scaling,
    fixed_draw,
    scan,
    seen_range,
    transform,
)
from vaelab.data.splits import DataSplits, Split, describe, split_parts

__all__ = [
    "BINARIZATIONS",
    "DATA_ENV",
    "SCALINGS",
    "SOURCES",
    "DataError",
    "LABELS_NOT_USED",
    "DataSplits",
    "Split",
    "binarize_batch",
    "describe",
    "load_data",
]


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
    if isinstance(source, str) and source in NAMED:
        loaded = NAMED[source](data_dir)
    else:
        loaded = _load_path(source)
    parts = [p for p in (loaded.train, loaded.valid, loaded.test) if p is not None]
    parts = [as_examples(p) for p in parts]
    shape = tuple(int(s) for s in parts[0].x.shape[1:])
    low, high = math.inf, -math.inf
    for part in parts:
        part_low, part_high = scan(part.x, None, part.origin)
        low, high = min(low, part_low), max(high, part_high)

    train, valid, test, split_rule = split_parts(loaded, parts, valid_fraction, test_fraction, seed)
    train_range = None
    if scale == "unit" or binarize == "dynamic":
        train_range = scan(train[0], train[1], "the train split")
    offset, divisor, scaling = choose_scaling(
        scale, loaded, parts[0].x.dtype, low, high, train_range
    )
    scaled = transform(np.array([low, high]), offset, divisor)
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
        splits[1] = fixed_draw(splits[1], seed, 1)
        splits[2] = fixed_draw(splits[2], seed, 2)
        eval_draws = (
            "valid and test binarised once: valid from numpy.random.default_rng([seed, 1]), "
            "test from default_rng([seed, 2])"
        )
    train_scaled = None
    if train_range is not None:
        train_scaled = transform(np.array(train_range), offset, divisor)
    seen = seen_range(scaled, binarize, threshold, train_scaled, splits[1:])

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


def _missing(path: str) -> DataError:
    return DataError(
        f"data file '{path}' does not exist; pass a path to a .npy/.npz/.csv file, an image "
        f"folder, an IDX file, or one of: {', '.join(SOURCES)}"
    )


def _load_path(source: str | os.PathLike[str]) -> Loaded:
    text = os.fspath(source)
    key = None
    match = re.fullmatch(r"(.+\.npz):([^:/\\]+)", text, flags=re.IGNORECASE)
    if match and not Path(text).exists():
        text, key = match.group(1), match.group(2)
    path = Path(text).expanduser()
    if path.is_dir():
        if idx_sets(path):
            return load_idx_folder(path)
        if any(p.suffix.lower() == ".npy" for p in path.iterdir()):
            return load_npy_shards(path)
        return load_image_folder(path)
    name = path.name.lower()
    idx = re.search(r"(ubyte|\.idx\d?)(\.gz)?$|\.gz$", name) is not None
    if not path.is_file() and not (idx and part_files(path)):  # only IDX files come in pieces
        raise _missing(text)
    if name.endswith(".npy"):
        return load_npy(path)
    if name.endswith(".npz"):
        x, labels, classes, notes = read_npz(path, key)
        part = Part(x, labels, f"'{path}'")
        return Loaded(path.stem, "npz", part, classes=classes, notes=notes)
    if name.endswith(".csv"):
        return load_csv(path)
    if idx:
        return load_idx_file(path)
    raise DataError(
        f"cannot tell the format of '{path}'; use a .npy, .npz or .csv file, an IDX file "
        f"(.idx, -ubyte, .gz) or a folder of images"
    )
