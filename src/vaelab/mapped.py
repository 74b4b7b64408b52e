"""Rows of ``.npy`` files larger than memory, read through memory maps without filling memory.

``MappedRows`` reads one ``.npy`` file, or several (the shards of a folder, one array per file,
the same dtype and example shape, in name order), as one array ``[n, *shape]``: indexing it with
an integer, a slice or an integer array returns a new in-memory array of those rows, in the
order asked, gathered from whichever shards hold them.

Two things keep a process's memory flat however large the data:

- **Lazy maps.** Making a ``MappedRows`` reads each file's header only; a file is mapped when a
  row of it is first read, by the process that reads it. A training worker, started by fork or
  spawn, maps the files itself; a pickled ``MappedRows`` leaves its maps behind.
- **Pages handed back.** A page of a mapped file that a read touches stays in the reading
  process's resident set until the kernel needs the memory, and the kernel maps more than the
  rows asked for (read-ahead and fault-around: about 0.35 MB per random 784-byte row here). So
  after every read the maps are advised ``MADV_DONTNEED``: the pages leave this process's
  resident set and stay in the page cache, shared with every other process, for the next
  read. It costs a few microseconds per read (measured with nothing mapped: 5-45 µs).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MappedRows"]

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class MappedRows:
    """The rows of the ``.npy`` files ``paths`` (all of one dtype and example shape, in the
    given order) as one read-only array ``[n, *shape]``; see the module docstring.

    Raises ``ValueError`` naming the file for a file that is not a readable ``.npy`` array
    (:func:`read_header`), and for shards that disagree."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        if not paths:
            raise ValueError("MappedRows needs at least one .npy file")
        self.paths = [Path(p) for p in paths]
        headers = [read_header(p) for p in self.paths]
        first_shape, first_dtype, _, _ = headers[0]
        for path, (shape, dtype, _, _) in zip(self.paths, headers, strict=True):
            if len(shape) < 1 or shape[1:] != first_shape[1:] or dtype != first_dtype:
                raise ValueError(
                    f"'{path}' holds {dtype} {list(shape)} but '{self.paths[0]}' holds "
                    f"{first_dtype} {list(first_shape)}; every shard must hold examples of the "
                    "same dtype and shape, one per row"
                )
        self._headers = headers
        self.dtype = np.dtype(first_dtype)
        self.row_shape = tuple(first_shape[1:])
        counts = [shape[0] for shape, _, _, _ in headers]
        self._starts = np.cumsum([0, *counts])  # row where each shard begins; the last: n
        self._maps: list[np.memmap | None] = [None] * len(self.paths)

    # -------------------------------------------------------------------- the array interface
    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self._starts[-1]), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape: int) -> MappedRows:
        """The same rows with another example shape of the same size (``[n, H, W]`` read as
        ``[n, 1, H, W]``); only the row count may not change."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if shape[0] != len(self) or math.prod(shape[1:]) != math.prod(self.row_shape):
            raise ValueError(f"cannot reshape rows {self.shape} to {shape}")
        other = MappedRows.__new__(MappedRows)
        other.__dict__.update(self.__dict__)
        other.row_shape = tuple(shape[1:])
        other._maps = self._maps  # the same files, so the same maps
        return other

    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            row = int(key) + (n if key < 0 else 0)
            if not 0 <= row < n:
                raise IndexError(f"row {key} is out of range for {n} rows")
            return self._read(np.array([row]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._read_range(start, max(start, stop))
            return self._read(np.arange(start, stop, step))
        index = np.asarray(key)
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise IndexError("MappedRows takes an integer, a slice or a 1-D integer array")
        index = np.where(index < 0, index + n, index).astype(np.int64, copy=False)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row indices out of range for {n} rows")
        return self._read(index)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("MappedRows reads its rows on access and cannot return a view")
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def min(self) -> Any:
        return self[:].min()

    def max(self) -> Any:
        return self[:].max()

    def __repr__(self) -> str:
        files = f"{len(self.paths)} files" if len(self.paths) > 1 else f"'{self.paths[0]}'"
        return f"MappedRows({files}, {self.dtype} {list(self.shape)})"

    # -------------------------------------------------------------------------- reading
    def _map(self, shard: int) -> np.memmap:
        found = self._maps[shard]
        if found is None:
            shape, dtype, offset, fortran = self._headers[shard]
            found = np.memmap(
                self.paths[shard],
                dtype=dtype,
                mode="r",
                offset=offset,
                shape=shape,
                order="F" if fortran else "C",
            )
            self._maps[shard] = found
        return found

    def _rows(self, raw: np.ndarray) -> np.ndarray:
        return raw.reshape(raw.shape[0], *self.row_shape)

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, slice by slice of the shards that hold them."""
        out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        touched = []
        for shard in range(len(self.paths)):
            lo, hi = max(start, self._starts[shard]), min(stop, self._starts[shard + 1])
            if lo < hi:
                first = self._starts[shard]
                out[lo - start : hi - start] = self._rows(self._map(shard)[lo - first : hi - first])
                touched.append(shard)
        self._release(touched)
        return out

    def _read(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (in that order)."""
        out = np.empty((index.shape[0], *self.row_shape), dtype=self.dtype)
        if len(self.paths) == 1:
            if index.size:
                out[:] = self._rows(self._map(0)[index])
                self._release([0])
            return out
        shards = np.searchsorted(self._starts, index, side="right") - 1
        touched = []
        for shard in np.unique(shards).tolist():
            where = shards == shard
            out[where] = self._rows(self._map(shard)[index[where] - self._starts[shard]])
            touched.append(shard)
        self._release(touched)
        return out

    def _release(self, shards: list[int]) -> None:
        """Hand the pages of the maps just read back to the page cache (MADV_DONTNEED)."""
        if _DONTNEED is None:
            return
        for shard in shards:
            found = self._maps[shard]
            handle = getattr(found, "_mmap", None)
            if handle is not None:
                handle.madvise(_DONTNEED)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self.paths)  # each process maps the files itself
        return state


def read_header(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    """Shape, dtype, data offset and Fortran order of the ``.npy`` file ``path``, from its header
    alone. Raises ``ValueError`` naming the file when it is not a ``.npy`` array of numbers
    (object arrays, which only pickle could read, included)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"cannot read '{path}' as a .npy array ({str(error).rstrip('.')}); save a numeric "
            "array with numpy.save"
        ) from error
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise ValueError(
            f"cannot read '{path}' as a .npy array: it holds Python objects, which only pickle "
            "could read; save a numeric array with numpy.save"
        )
    expected = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise ValueError(
            f"'{path}' is truncated: its header promises {list(shape)} {dtype} values "
            f"({expected:,} bytes) but it holds {size:,} bytes; save it again"
        )
    return tuple(int(s) for s in shape), dtype, offset, bool(fortran)
