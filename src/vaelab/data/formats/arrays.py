"""Files that hold one numeric array: ``.npy`` (read a batch of rows at a time through
``NpyRows``), ``.npz`` (one array of the archive, never unpickled, with its integer labels) and
``.csv`` (numbers separated by commas, with or without a header row)."""

from __future__ import annotations

import csv
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vaelab.data.errors import DataError
from vaelab.data.loaded import Loaded, Part
from vaelab.data.npyrows import NpyRows

# the names a .npz archive's data array and its labels go by, tried in this order
_NPZ_DATA_KEYS = ("x", "X", "images", "data")
_NPZ_LABEL_KEYS = ("labels", "y", "targets")
# The note on an array that looks like labels but is not (``class_labels`` repeats it).
LABELS_NOT_USED = "was not used as labels"


def load_npy(path: Path) -> Loaded:
    try:
        x = NpyRows([path])
    except ValueError as error:
        raise DataError(str(error)) from None
    return Loaded(path.stem, "npy", Part(x, None, f"'{path}'"))  # type: ignore[arg-type]


def read_npz(
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


def load_csv(path: Path) -> Loaded:
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
    return Loaded(path.stem, "csv", Part(x, None, f"'{path}'"), notes=notes)


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
