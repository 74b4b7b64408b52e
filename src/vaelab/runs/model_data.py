"""A saved model and the examples it is used on, as its training data was prepared: opening a model
folder once (``open_model``), reading its data (``model_data``) ``CHUNK`` rows at a time so a
memory-mapped file is never loaded whole, and checking an output path before any work.

A conditional model reads every example given its own class label (``ModelData.labels``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.data.sources import SOURCES, Split, load_data
from vaelab.estimator.facade import EVAL_SEED, VAE, from_saved
from vaelab.estimator.serialization import CONFIG_FILE, ModelFileError, read_model
from vaelab.io.files import atomic_write_bytes
from vaelab.objectives.noise import ExampleNoise
from vaelab.runs.folder import RUN_CONFIG_FILE, RunLock
from vaelab.runs.options import ParameterError, RunError
from vaelab.train.checkpoint import CHECKPOINT_FILE
from vaelab.train.fastpath import compile_evaluation

CHUNK = 4096  # rows per evaluation / encoding step


@dataclass
class OpenedModel:
    """A model folder opened once: the fitted estimator and its ``vaelab.json`` (the run's data
    record and options among it)."""

    folder: Path
    estimator: VAE
    document: dict[str, Any]


def open_model(
    folder: str | os.PathLike[str], device: str | None = None, *, compile: bool = False
) -> OpenedModel:
    """The fitted ``VAE`` in ``folder`` (on ``device``; default: see ``vaelab.load``) with its
    ``vaelab.json``, read once; an unfinished run is named as such. ``compile`` decides whether
    its estimates run the likelihood's log p(x|z) compiled (``vaelab.train.fastpath``), whatever
    the model was trained with: each command decides for itself."""
    path = Path(folder)
    if path.is_dir() and not (path / CONFIG_FILE).exists():
        _refuse_unfinished_run(path)
    saved = read_model(path)
    estimator = from_saved(saved, device)
    estimator.compile = compile
    if compile:
        compile_evaluation(estimator.model_)
    return OpenedModel(path, estimator, saved.document)


def _refuse_unfinished_run(path: Path) -> None:
    """A run folder without its model yet, in words: still training while a process holds it
    (``RunLock``, whose --resume would be refused as in use), else stopped, to be resumed from its
    checkpoint or, without one, trained again. A folder that is no run is left to ``load``."""
    holder = RunLock(path).holder()
    if holder is not None:
        raise ModelFileError(
            f"{path} is a training run in progress, held by {holder}, and has no model "
            f"({CONFIG_FILE}) yet; wait for it to finish or stop it"
        )
    if not (path / RUN_CONFIG_FILE).exists():
        return
    if not (path / CHECKPOINT_FILE).exists():
        raise ModelFileError(
            f"{path} holds a training run that stopped before its first checkpoint, so it has no "
            f"model; delete the folder and train again"
        )
    raise ModelFileError(
        f"{path} holds a training run that has not finished (no {CONFIG_FILE} yet); finish it "
        f"with `vaelab train --out {path} --resume`"
    )


SPLITS = ("test", "valid", "train", "all")
_SPLIT_NAMES = {
    "test": "test split",
    "valid": "validation split",
    "train": "train split",
    "all": "all examples",
}


@dataclass
class ModelData:
    """Examples prepared as the model's training data was, read ``CHUNK`` rows at a time; every
    chunk is checked against the likelihood's support. ``binarize_seed``, when set, binarises
    every example with one Bernoulli draw keyed by its own values (``vaelab.objectives.noise``), the same
    whichever examples are read with it."""

    split: Split
    source: str
    which: str  # "test split", "all examples", ...; see SPLITS
    likelihood: Any
    binarize_seed: int | None = None
    subset_of: int | None = None  # the size of the set a random subset was drawn from

    def __len__(self) -> int:
        return len(self.split)

    @property
    def description(self) -> str:
        if self.subset_of is not None:
            return (
                f"{self.source} ({self.which}, a random {len(self):,} of its "
                f"{self.subset_of:,} examples)"
            )
        return f"{self.source} ({self.which}, {len(self):,} examples)"

    def chunks(self, limit: int | None = None) -> Iterator[np.ndarray]:
        n = len(self.split) if limit is None else min(limit, len(self.split))
        for start in range(0, n, CHUNK):
            yield self.read(start, min(start + CHUNK, n))

    def labels(self, start: int, stop: int) -> np.ndarray | None:
        """The class labels of examples ``start:stop``, or None for data without labels."""
        found = self.split.labels
        return None if found is None else np.asarray(found[start:stop])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Examples ``start:stop``, prepared and checked: float32 ``[stop − start, *shape]``."""
        x = self.split[start:stop]
        if self.binarize_seed is not None:
            # Probabilities, as in training: min-max scaling may overshoot [0, 1] off train.
            x = np.clip(x, 0.0, 1.0)
        try:
            self.likelihood.check_support(torch.from_numpy(x))
        except ValueError as error:
            raise RunError(f"{self.description}: {error}") from None
        if self.binarize_seed is not None:
            x = _keyed_bernoulli(x, self.binarize_seed)
        return x

    def subset(self, n: int | None) -> ModelData:
        """A random subset of ``n`` examples (all when ``n`` is None or not smaller), drawn with
        the evaluation seed and kept in file order: the same subset every time, and not the
        first ``n`` examples, which can be one class only (binarized MNIST's test file is sorted
        by digit)."""
        total = len(self)
        if n is None or n >= total:
            return self
        chosen = np.sort(np.random.default_rng(EVAL_SEED).choice(total, n, replace=False))
        index = chosen if self.split.index is None else self.split.index[chosen]
        labels = None if self.split.labels is None else self.split.labels[chosen]
        split = dataclasses.replace(self.split, index=index, labels=labels)
        return dataclasses.replace(self, split=split, subset_of=self.subset_of or total)


@dataclass(frozen=True)
class Examined:
    """Which model a result is of and on which examples, as every typed result states it."""

    model: str  # the model folder
    data: str  # the data source
    split: str  # "test split", "all examples", ...
    examples_described: str  # the source, the split and how many examples, in words

    @staticmethod
    def fields_of(opened: OpenedModel, examples: ModelData) -> dict[str, str]:
        """The fields for ``opened``'s model on ``examples``, to build a result with."""
        return {
            "model": str(opened.folder),
            "data": examples.source,
            "split": examples.which,
            "examples_described": examples.description,
        }


def _keyed_bernoulli(x: np.ndarray, seed: int) -> np.ndarray:
    """One Bernoulli(x) draw of every value, each example's uniforms from its own stream."""
    values = torch.from_numpy(x)
    flat = values.reshape(values.shape[0], -1)
    uniforms = ExampleNoise(flat, seed).uniform(flat.shape[1], like=flat).T  # [batch, dims]
    return (uniforms < flat).to(values.dtype).reshape(values.shape).numpy()


def model_data(
    opened: OpenedModel,
    data: str | None = None,
    data_dir: str | None = None,
    split: str | None = None,
) -> ModelData:
    """The examples to evaluate / reconstruct / encode, and which split they are.

    ``data`` defaults to the data the model was trained on; ``split`` (``SPLITS``) to ``"test"``
    for it and for any named data set, and to ``"all"`` for another path.

    - The training data, or a named data set: loaded with the training run's options (its
      scaling, split fractions and seed, binarisation), so ``"test"`` is exactly the run's own
      test split, whatever the source (a named set, a file, a folder).
    - Another path: its examples transformed exactly as the training data was: ``(x − offset) /
      divisor`` with the recorded offset and divisor, then the recorded binarisation (a dynamic
      one becomes one fixed draw per example, keyed by its values); a split other than ``"all"``
      is cut with the training run's fractions and seed. A model saved by ``VAE.save`` records
      nothing, so its data is used as it is.

    Data of another shape is refused; values outside the likelihood's support are refused as they
    are read.
    """
    estimator, document = opened.estimator, opened.document
    if split is not None and split not in SPLITS:
        raise ParameterError("split", f"is {split!r}, none of: {', '.join(SPLITS)}")
    found = document.get("data")
    record: dict[str, Any] = found if isinstance(found, dict) else {}
    run = document.get("run") or {}
    arguments = dict(record.get("arguments", {}))
    trained_on = str(arguments["source"]) if arguments else None
    if data is None:
        if trained_on is None:
            raise ParameterError("data", "must be given: this model records no training data")
        data = trained_on
    data_dir = data_dir if data_dir is not None else run.get("data_dir")
    options = {k: v for k, v in arguments.items() if k != "source"}
    own = data in SOURCES or (trained_on is not None and _same_source(data, trained_on))
    split = split or ("test" if own else "all")
    binarize_seed = None
    if own and split != "all":
        chosen = getattr(load_data(data, data_dir=data_dir, **options), split)
    elif data in SOURCES:
        raise ParameterError(
            "split",
            f"must be train, valid or test for {data}, a named data set with its own splits",
        )
    else:
        whole = split == "all"
        raw = load_data(
            data,
            data_dir=data_dir,
            scale="none",
            valid_fraction=0.0 if whole else float(options.get("valid_fraction", 0.1)),
            test_fraction=0.0 if whole else float(options.get("test_fraction", 0.1)),
            seed=int(options.get("seed", 0)),
        )
        stored = raw.train if split == "all" else getattr(raw, split)
        binarize = record.get("binarize", "none")
        chosen = Split(
            stored.stored,
            stored.index,
            stored.labels,
            offset=float(record.get("offset", 0.0)),
            divisor=float(record.get("divisor", 1.0)),
            threshold=record.get("threshold") if binarize == "threshold" else None,
        )
        if binarize == "dynamic":
            binarize_seed = int(options.get("seed", 0))
    shape = tuple(document["model"]["data_shape"])
    if tuple(chosen.shape[1:]) != shape:
        raise RunError(
            f"{data} has examples of shape {tuple(chosen.shape[1:])}, but the model was trained "
            f"on shape {shape}; pass data like the training data"
        )
    if estimator.model_.condition_dim:
        _check_labelled(estimator, chosen, data)
    which = _SPLIT_NAMES[split]
    return ModelData(chosen, data, which, estimator.model_.likelihood, binarize_seed)


def _check_labelled(estimator: VAE, split: Split, data: str) -> None:
    """A conditional model reads each example given its class label: refuse data without labels,
    or with labels none of the model's classes, before any work."""
    classes = getattr(estimator, "classes_", None)
    if classes is None:
        raise RunError(
            "this conditional model was trained on condition vectors, which the command line "
            "cannot read from data; use the library (vaelab.load(DIR).elbo(X, y), ...)"
        )
    if split.labels is None:
        raise RunError(
            f"this model is conditional and reads each example's class label, but {data} has "
            "none; give data with labels (as the training data had)"
        )
    found = np.unique(np.asarray(split.labels))
    unknown = found[~np.isin(found, classes)]
    if unknown.size:
        shown = ", ".join(str(c) for c in classes)
        raise RunError(
            f"{data} has examples of class {unknown.tolist()[0]!r}, which this conditional model was not "
            f"trained on (its classes: {shown}); give data of those classes"
        )


def conditions_of(estimator: VAE, examples: ModelData, rows: slice) -> torch.Tensor | None:
    """The one-hot conditions of examples ``rows`` for a conditional model, else None."""
    if not estimator.model_.condition_dim:
        return None
    return torch.from_numpy(estimator.conditions(examples.labels(rows.start, rows.stop)))


def labels_of(estimator: VAE, examples: ModelData, rows: slice) -> np.ndarray | None:
    """The class labels of examples ``rows`` for a conditional model (its ``y``), else None."""
    return examples.labels(rows.start, rows.stop) if estimator.model_.condition_dim else None


def _same_source(data: str, trained_on: str) -> bool:
    """Whether ``data`` names the file or folder the model was trained on (paths compared
    resolved; a run records its data as an absolute path)."""
    if data == trained_on:
        return True
    try:
        return Path(data).expanduser().resolve() == Path(trained_on).expanduser().resolve()
    except OSError:
        return False


def load_examples(examples: ModelData, n: int | None = None) -> torch.Tensor:
    """The first ``n`` (default: all) prepared examples as one float32 tensor
    ``[n, *data_shape]``."""
    return torch.from_numpy(np.concatenate(list(examples.chunks(limit=n))))


def output_path(
    path: str | os.PathLike[str], suffixes: tuple[str, ...] = (), name: str = "out"
) -> Path:
    """``path`` checked before any work: a file name (with one of ``suffixes``, when given) in a
    folder that exists (``name`` is the parameter that gave it, for the message)."""
    out = Path(path)
    wanted = f"a file name ending in {' or '.join(suffixes)}" if suffixes else "a file name"
    if suffixes and out.suffix.lower() not in suffixes:
        raise ParameterError(name, f"{out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise ParameterError(name, f"{out} is a folder; give {wanted}")
    if not out.parent.is_dir():
        raise ParameterError(
            name, f"{out} is in a folder that does not exist; create {out.parent} first"
        )
    return out


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write named arrays to an .npz file atomically (never half-written)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy types its first kwarg
    atomic_write_bytes(path, buffer.getvalue())


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write one array to an .npy file atomically, without pickle."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
