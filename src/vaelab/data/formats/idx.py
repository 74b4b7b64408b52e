"""IDX files (LeCun's MNIST format) and folders of an MNIST-format data set (MNIST, Fashion-MNIST,
KMNIST, EMNIST): plain files memory-mapped, gzipped ones and ``NAME.partNN`` pieces decoded in
memory, labels from the matching ``labels-idx1`` file."""

from __future__ import annotations

import glob
import gzip
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

from vaelab.data.errors import DataError
from vaelab.data.loaded import Loaded, Part

# IDX type codes (LeCun's format description); every multi-byte value is big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


def part_files(path: Path) -> list[Path]:
    """``NAME.part00``, ``NAME.part01``, ... in numeric order (pieces made by ``split -d``)."""
    found = []
    for piece in path.parent.glob(glob.escape(path.name) + ".part*"):
        match = re.fullmatch(r"\.part(\d+)", piece.name[len(path.name) :])
        if match:
            found.append((int(match.group(1)), piece))
    return [piece for _, piece in sorted(found)]


def idx_sets(folder: Path) -> dict[str, _IdxSet]:
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


def load_idx_folder(folder: Path, title: str = "") -> Loaded:
    """An MNIST-format data set in ``folder``: its train file and its official test file, each
    with the labels of the matching ``labels-idx1`` file when there is one."""
    what = f"{title} folder" if title else "folder"
    sets = idx_sets(folder)
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
        parts.append(Part(x, labels, f"'{images}'"))
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
    return Loaded(
        name=Path(os.path.abspath(folder)).name,  # abspath: '.' gets a name, links stay as named
        format="idx",
        train=train,
        test=test,
        notes=(f"IDX files read: {'; '.join(read)}",),
    )


def _idx_name(path: Path) -> str:
    """A file's name for messages, saying when it is read from ``.partNN`` pieces."""
    return path.name if path.is_file() else f"{path.name} (from .partNN pieces)"


def load_idx_file(path: Path) -> Loaded:
    x = _read_idx(path)
    labels = None
    sibling = path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
    if sibling != path and (sibling.is_file() or part_files(sibling)):
        candidate = _read_idx(sibling)
        if candidate.dtype.kind in "iu" and candidate.shape == (x.shape[0],):
            labels = candidate
    return Loaded(path.name.split(".")[0], "idx", Part(x, labels, f"'{path}'"))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array: memory-mapped for a plain file, decoded in memory if gzip or in pieces."""
    pieces = [] if path.is_file() else part_files(path)
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
