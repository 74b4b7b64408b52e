"""Model folders and command lines of the previous release keep working.

``tests/fixtures/models-0.1.0/`` holds two model folders written by vaelab 0.1.0 (commit 93a8a91,
before src/vaelab was split into subpackages), the outputs that code computed from them, its
``vaelab evaluate`` text and its commands' options; ``make_expected.py`` there says how each was
made. The current code must load the folders and give the same numbers, bit for bit (they are
equal today, so any difference is a change someone should explain, not rounding), print the same
evaluation, and accept the same options.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

import vaelab
from conftest import vaelab_cli
from vaelab.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "models-0.1.0"
EXPECTED = np.load(FIXTURES / "expected_outputs.npz")

# The examples make_expected.py used: the first 40 digits scaled to [0, 1], and their labels.
_X, _Y = load_digits(return_X_y=True)
X = (_X[:40] / 16.0).astype(np.float32)
Y = _Y[:40]


@pytest.fixture(scope="module")
def plain() -> vaelab.VAE:
    return vaelab.load(FIXTURES / "digits")


@pytest.fixture(scope="module")
def conditional() -> vaelab.VAE:
    return vaelab.load(FIXTURES / "digits-conditional")


def same(found: np.ndarray, name: str) -> None:
    """``found`` is the 0.1.0 output ``name``: same shape, dtype and every bit."""
    expected = EXPECTED[name]
    assert found.dtype == expected.dtype, name
    np.testing.assert_array_equal(found, expected, err_msg=name)


def test_the_previous_releases_folder_gives_the_same_outputs(plain):
    same(plain.transform(X), "plain_transform")
    same(plain.elbo(X, samples=8), "plain_elbo")
    same(plain.score_samples(X), "plain_score_samples")
    same(plain.sample(4, seed=0), "plain_sample")
    same(plain.reconstruct(X[:5]), "plain_reconstruct")
    same(plain.log_likelihood(X[:10], k=20), "plain_log_likelihood")


def test_the_previous_releases_conditional_folder_gives_the_same_outputs(conditional):
    assert list(conditional.classes_) == list(range(10))
    same(conditional.transform(X, Y), "conditional_transform")
    same(conditional.elbo(X, Y, samples=8), "conditional_elbo")
    same(conditional.reconstruct(X[:5], Y[:5]), "conditional_reconstruct")


def test_evaluate_prints_what_the_previous_release_printed(tmp_path, capsys, monkeypatch):
    # The model line shows the folder as given: a copy called digits, named from its parent, as
    # the original was (a copy, so that nothing evaluate might write lands in the fixtures).
    monkeypatch.delenv("VAELAB_DATA", raising=False)
    shutil.copytree(FIXTURES / "digits", tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    code, out, err = vaelab_cli(
        capsys, "evaluate", "digits", "--k", 20, "--examples", 30, "--quiet"
    )
    assert code == 0, err
    assert out == (FIXTURES / "evaluate_digits.txt").read_text()


def option_strings(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """``{"": the top level's option strings, command: its option strings, sorted,
    command + " (positional)": its positional arguments' dests}``, the form of
    ``cli_options.json``."""
    found = {"": sorted(s for action in parser._actions for s in action.option_strings)}
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        actions = command._actions
        found[name] = sorted(s for action in actions for s in action.option_strings)
        found[f"{name} (positional)"] = [a.dest for a in actions if not a.option_strings]
    return found


def test_every_command_takes_the_options_of_the_previous_release():
    """Commands and options may be added, never removed: every command of the previous release
    still exists, takes every option it took (a subset check) and the same positional
    arguments."""
    expected = json.loads((FIXTURES / "cli_options.json").read_text())
    found = option_strings(app.build_parser())
    assert set(expected) <= set(found)
    for key, options in expected.items():
        if key.endswith("(positional)"):
            assert found[key] == options, key
        else:
            assert set(options) <= set(found[key]), key
