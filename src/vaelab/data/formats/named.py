"""The named data sets (``SOURCES``): digits, MNIST, binarized MNIST and Frey Face, each read from
scikit-learn or from its folder under the data folder (``data_dir``, else ``$VAELAB_DATA``), with
its documented scale."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from vaelab.data.errors import DataError
from vaelab.data.formats.arrays import read_npz
from vaelab.data.formats.idx import load_idx_folder
from vaelab.data.loaded import Loaded, Part

DATA_ENV = "VAELAB_DATA"

# name → the reader of that data set, filled by @_named
NAMED: dict[str, Callable[[str | os.PathLike[str] | None], Loaded]] = {}


def _named(name: str) -> Callable[[Callable[..., Loaded]], Callable[..., Loaded]]:
    def register(loader: Callable[..., Loaded]) -> Callable[..., Loaded]:
        NAMED[name] = loader
        return loader

    return register


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
def _load_digits(data_dir: str | os.PathLike[str] | None) -> Loaded:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    x = bunch.data.astype(np.uint8).reshape(-1, 1, 8, 8)  # integers 0..16
    return Loaded(
        name="digits",
        format="scikit-learn",
        train=Part(x, bunch.target, "the digits data"),
        scale=(16.0, "divide by 16 (digits pixels are 0..16)"),
    )


@_named("mnist")
def _load_mnist(data_dir: str | os.PathLike[str] | None) -> Loaded:
    folder = _data_folder(data_dir, "mnist", "MNIST")
    loaded = load_idx_folder(folder, "MNIST")
    for part in (loaded.train, loaded.test):
        assert part is not None  # an IDX folder always has its test part
        if part.x.dtype != np.uint8 or part.x.shape[1:] != (28, 28):
            raise DataError(
                f"{part.origin} holds {part.x.dtype} {part.x.shape}, not uint8 MNIST images of "
                f"shape [n, 28, 28]; download it again"
            )
    return replace(loaded, name="mnist", scale=(255.0, "divide by 255 (MNIST pixels are 0..255)"))


@_named("binarized-mnist")
def _load_binarized_mnist(data_dir: str | os.PathLike[str] | None) -> Loaded:
    folder = _data_folder(data_dir, "binarized_mnist", "binarized MNIST")
    parts = []
    for split in ("train", "valid", "test"):
        path = folder / f"binarized_mnist_{split}.npz"
        if not path.is_file():
            raise DataError(
                f"'{path}' does not exist; restore the binarized MNIST files in {folder}"
            )
        x, *_ = read_npz(path, "images")
        if x.ndim != 2 or x.shape[1] != 784:
            raise DataError(f"'{path}' holds shape {x.shape}, not [n, 784]; restore the file")
        parts.append(Part(x.reshape(-1, 1, 28, 28), None, f"'{path}'"))
    return Loaded(
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
def _load_frey_face(data_dir: str | os.PathLike[str] | None) -> Loaded:
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
    return Loaded(
        name="frey-face",
        format="mat",
        train=Part(x, None, f"'{path}'"),
        scale=(255.0, "divide by 255 (Frey Face pixels are 0..255)"),
    )


SOURCES = tuple(NAMED)
