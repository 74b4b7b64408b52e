"""Where training data comes from: ``load_data`` turns a data set name or a path into train / valid /
test splits (``sources``), through one reader per format (``formats``: named sets, .npy / .npz /
.csv, .npy shards, image folders, IDX), the split rules (``splits``), scaling and binarisation
(``scaling``), and rows of .npy files larger than memory (``npyrows``). Independent of every model
room: imports nothing of vaelab but ``vaelab.io``."""

from vaelab.data.errors import DataError
from vaelab.data.formats.named import DATA_ENV, SOURCES
from vaelab.data.scaling import BINARIZATIONS, SCALINGS, binarize_batch
from vaelab.data.sources import load_data
from vaelab.data.splits import DataSplits, Split, describe

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
