"""Rows of ``.npy`` files larger than memory, read on demand without filling memory.

``NpyRows`` reads one ``.npy`` file, or several (the shards of a folder, one array per file, the
same dtype and example shape, in name order), as one array ``[n, *shape]``: indexing it with an
integer, a slice or an integer array returns a new in-memory array of those rows, in the order
asked, gathered from whichever files hold them.

Rows are read with ``pread`` into the returned array, not through memory maps. A memory map
keeps every page a read touches in the reading process's resident set until the kernel needs the
memory, and maps far more than the rows asked for: on this machine's kernel (6.18, large
page-cache folios) one random 784-byte row of a 1.6 GB file mapped about 0.75 MB, so one batch
of 1,000 random rows lifted a process's peak resident set by 0.75 GB, and 300 batches to the size
of the file. Handing the pages back after every read (``MADV_DONTNEED``) bounds that only per
read and costs 6-8 ms per batch of 1,000 rows; ``pread`` of the same rows takes 1.3 ms and maps
nothing. The pages read stay in the page cache, shared by every process, as they would for a map.

A file is opened when a row of it is first read, by the process that reads it: a training
worker, started by fork or spawn, opens the files itself (a pickled ``NpyRows`` leaves its
descriptors behind; a forked one opens its own), and making a ``NpyRows`` reads each file's
header only. A Fortran-ordered array, whose rows are not contiguous, is read through a memory
map instead, its pages handed back after every read.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NpyRows", "read_header"]

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class NpyRows:
    """The rows of the ``.npy`` files ``paths`` (all of one dtype and example shape, in the
    given order) as one read-only array ``[n, *shape]``; see the module docstring.

    Raises ``ValueError`` naming the file for a file that is not a readable ``.npy`` array
    (:func:`read_header`), and for shards that disagree."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        if not paths:
            raise ValueError("NpyRows needs at least one .npy file")
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
        self._starts = np.cumsum([0, *counts])  # row where each file begins; the last: n
        self._files: list[int | np.memmap | None] = [None] * len(self.paths)
        self._pid = os.getpid()

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

    @property
    def _row_bytes(self) -> int:
        return self.itemsize * math.prod(self.row_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape: Any) -> NpyRows:
        """The same rows with another example shape of the same size (``[n, H, W]`` read as
        ``[n, 1, H, W]``); the row count may not change."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if shape[0] != len(self) or math.prod(shape[1:]) != math.prod(self.row_shape):
            raise ValueError(f"cannot reshape rows {self.shape} to {shape}")
        other = NpyRows.__new__(NpyRows)
        other.__dict__.update(self.__dict__)
        other.row_shape = tuple(shape[1:])
        other._files = [None] * len(self.paths)  # its own descriptors, closed with it
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
            raise IndexError("NpyRows takes an integer, a slice or a 1-D integer array")
        index = np.where(index < 0, index + n, index).astype(np.int64, copy=False)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row indices out of range for {n} rows")
        return self._read(index)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("NpyRows reads its rows on access and cannot return a view")
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def min(self) -> Any:
        return self[:].min()

    def max(self) -> Any:
        return self[:].max()

    def __repr__(self) -> str:
        files = f"{len(self.paths)} files" if len(self.paths) > 1 else f"'{self.paths[0]}'"
        return f"NpyRows({files}, {self.dtype} {list(self.shape)})"

    # -------------------------------------------------------------------------- reading
    def _file(self, shard: int) -> int | np.memmap:
        """The open file of ``shard`` in this process: a descriptor, or for a Fortran-ordered
        array a memory map."""
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to use
            self._files, self._pid = [None] * len(self.paths), os.getpid()
        found = self._files[shard]
        if found is None:
            shape, dtype, offset, fortran = self._headers[shard]
            if fortran:
                found = np.memmap(
                    self.paths[shard], dtype=dtype, mode="r", offset=offset, shape=shape, order="F"
                )
            else:
                found = os.open(self.paths[shard], os.O_RDONLY)
            self._files[shard] = found
        return found

    def _pread(self, shard: int, out: np.ndarray, first: int, count: int) -> None:
        """Rows ``first : first + count`` of ``shard`` into the C-contiguous ``out``."""
        found = self._file(shard)
        if isinstance(found, np.memmap):
            out[...] = found[first : first + count].reshape(out.shape)
            handle = getattr(found, "_mmap", None)
            if handle is not None and _DONTNEED is not None:
                handle.madvise(_DONTNEED)
            return
        assert out.flags.c_contiguous  # reshape(-1) is then a view, which the read fills
        view = out.reshape(-1).view(np.uint8).data
        offset = self._headers[shard][2] + first * self._row_bytes
        done = 0
        while done < len(view):  # a read may return fewer bytes than asked (2 GiB at most)
            got = os.preadv(found, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"'{self.paths[shard]}' ended early: it was truncated while read")
            done += got

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, one read per file that holds some of them."""
        out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        for shard in range(len(self.paths)):
            lo, hi = max(start, self._starts[shard]), min(stop, self._starts[shard + 1])
            if lo < hi:
                first = int(lo - self._starts[shard])
                self._pread(shard, out[lo - start : hi - start], first, int(hi - lo))
        return out

    def _read(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index``, in that order: one ``pread`` per row, in a tight loop (this runs for
        every row of every batch)."""
        out = np.empty((index.shape[0], *self.row_shape), dtype=self.dtype)
        shards = np.searchsorted(self._starts, index, side="right") - 1
        firsts = index - self._starts[shards]
        size = self._row_bytes
        flat = out.reshape(-1).view(np.uint8).data
        for shard in np.unique(shards).tolist():
            where = np.flatnonzero(shards == shard)
            found = self._file(shard)
            if isinstance(found, np.memmap):
                for j in where.tolist():
                    self._pread(shard, out[j : j + 1], int(firsts[j]), 1)
                continue
            offsets = self._headers[shard][2] + firsts[where] * size
            for j, offset in zip(where.tolist(), offsets.tolist(), strict=True):
                if os.preadv(found, [flat[j * size : (j + 1) * size]], offset) != size:
                    raise OSError(f"'{self.paths[shard]}' ended early: it was truncated while read")
        return out

    def close(self) -> None:
        """Close the files this process opened (reading again opens them again)."""
        files, self._files = self._files, [None] * len(self.paths)
        if self._pid == os.getpid():
            for found in files:
                if isinstance(found, int):
                    os.close(found)

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # half-made, or closing at exit
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = [None] * len(self.paths)  # each process opens the files itself
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


def read_header(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    """Shape, dtype, data offset and Fortran order of the ``.npy`` file ``path``, from its header
    alone. Raises ``ValueError`` naming the file when it is not a ``.npy`` array of numbers
    (object arrays, which only pickle could read, included) or is shorter than its header says."""
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
            f"cannot read '{path}' as a .npy array: its header promises {list(shape)} {dtype} "
            f"values ({expected:,} bytes) but it holds {size:,} bytes; save it again"
        )
    return tuple(int(s) for s in shape), dtype, offset, bool(fortran)
