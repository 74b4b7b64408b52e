"""A folder of ``.npy`` shards, one array per file, read in file-name order as one data set."""

from __future__ import annotations

from pathlib import Path

from vaelab.data.errors import DataError
from vaelab.data.formats.image_folder import IMAGE_SUFFIXES
from vaelab.data.loaded import Loaded, Part
from vaelab.data.npyrows import NpyRows


def load_npy_shards(folder: Path) -> Loaded:
    """A folder of ``.npy`` files, one array each, read in name order as one data set."""
    shards = sorted(
        p for p in folder.iterdir() if p.suffix.lower() == ".npy" and not p.name.startswith(".")
    )
    others = [p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
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
    return Loaded(folder.resolve().name, "npy-shards", Part(x, None, origin))  # type: ignore[arg-type]
