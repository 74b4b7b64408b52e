"""Where training data comes from: named sets, file formats, splits, binarisation (``sources``) and
rows of .npy files larger than memory (``npyrows``). Independent of every model room: imports
nothing of vaelab but ``vaelab.io``."""

from vaelab.data.sources import (
    BINARIZATIONS,
    DATA_ENV,
    SCALINGS,
    SOURCES,
    DataError,
    DataSplits,
    Split,
    binarize_batch,
    describe,
    load_data,
)

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
