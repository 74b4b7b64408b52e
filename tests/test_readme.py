"""The Python examples of the README and of the guide it points to (docs/guide.md) run as they
are written, on the bundled digits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", ROOT / "docs" / "guide.md")


def python_blocks() -> list[str]:
    """The ```python blocks of the README, then of the guide, in reading order."""
    return [
        block
        for page in PAGES
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    ]


def test_the_readme_and_the_guide_have_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2 and all("vaelab" in block for block in blocks)


@pytest.mark.slow
def test_the_readme_examples_run_as_written(tmp_path, monkeypatch):
    """The blocks run in order in one namespace, as a reader runs them, with the names they leave
    to the reader (X, X_test, y, y_test, Z) bound to the digits: pixels in [0, 1], a few held-out
    rows, and codes of the README's latent size."""
    monkeypatch.chdir(tmp_path)  # model.save("my-model") writes here
    x, labels = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    names = {
        "X": x[:-10],
        "y": labels[:-10],
        "X_test": x[-10:],
        "y_test": labels[-10:],
        "Z": np.zeros((3, 8), dtype=np.float32),
    }
    for index, block in enumerate(python_blocks(), 1):
        exec(compile(block, f"README / guide block {index}", "exec"), names)
    assert (tmp_path / "my-model" / "vaelab.json").is_file()  # the first block's save
    assert names["model"].conditional  # the last block's model is the conditional one
