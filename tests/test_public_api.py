"""The public surface: ``vaelab.__all__`` lists exactly what the package exports."""

from __future__ import annotations

import types

import pytest

import vaelab


def test_all_is_complete_and_exists():
    exported = {
        name
        for name, value in vars(vaelab).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == set(vaelab.__all__)
    assert len(vaelab.__all__) == len(set(vaelab.__all__))


def test_every_public_object_is_documented():
    for name in vaelab.__all__:
        assert getattr(vaelab, name).__doc__, f"vaelab.{name} has no docstring"


@pytest.mark.slow  # fits a model: a few seconds
def test_the_vae_docstring_examples_run():
    """The Examples section of ``VAE`` (rendered in the docs' API reference) runs as written:
    two epochs on the digits, a couple of seconds."""
    import doctest

    finder = doctest.DocTestFinder(recurse=False)
    (test,) = finder.find(vaelab.VAE, "VAE", globs={})
    assert test.examples, "VAE's docstring has no examples"
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)


def test_the_modules_named_in_the_readme_import_and_are_attributes():
    """``import vaelab`` alone makes ``vaelab.loglik`` and its siblings usable, and ``from
    vaelab.loglik import …`` works, as the README promises, though the modules now live in their
    rooms (``vaelab.evaluation.loglik``); run in a fresh interpreter, where no other import has
    loaded them already."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text() + (root / "src/vaelab/__init__.py").read_text()
    named = set(re.findall(r"`vaelab\.([a-z][a-z_]*)`", text)) - set(vaelab.__all__) - {"json"}
    assert {"loglik", "ais", "gap", "diagnostics", "ppca", "fastpath", "conditioning"} <= named
    probe = "import vaelab, sys; " + "; ".join(
        f"assert isinstance(vaelab.{name}, type(sys)), {name!r}; import vaelab.{name}"
        for name in sorted(named)
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_module_of_the_flat_layout_is_its_new_room():
    """Code written before the rooms keeps importing the old names, and gets the one module, not
    a copy (a copy would keep its own registries: a KL registered twice, a second noise stream)."""
    import importlib

    from vaelab import _legacy

    for old, new in _legacy.MOVED.items():
        assert importlib.import_module(f"vaelab.{old}") is importlib.import_module(new), old
    from vaelab.loglik import log_likelihood
    from vaelab.training import Trainer

    assert log_likelihood is vaelab.evaluation.loglik.log_likelihood
    assert Trainer is vaelab.train.trainer.Trainer


def test_the_trainers_names_still_import_from_vaelab_training():
    """The trainer's room is split by idea (config, batches, loss, progress, ...); what users
    imported from the flat ``vaelab.training`` still imports from it, as the same objects."""
    from vaelab import training
    from vaelab.train import batches, checkpoint, config, progress

    for module, names in (
        (training, ["Trainer", "TrainingObserver"]),
        (config, ["TrainConfig", "LR_SCHEDULES", "learning_rate"]),
        (batches, ["Batch", "BatchSource", "IndexedBatches", "LoaderBatches"]),
        (checkpoint, ["CheckpointPolicy"]),
        (progress, ["EpochMetrics", "NonFiniteLossError", "TrainingInterrupted"]),
    ):
        for name in names:
            assert getattr(training, name) is getattr(module, name), name
            assert name in training.__all__, name
