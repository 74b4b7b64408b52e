"""Using a trained model: what ``vaelab evaluate``, ``sample``, ``reconstruct`` and ``encode`` do.

Each reads a model folder (a ``vaelab train`` run or anything ``VAE.save`` wrote) and prepares data
exactly as the model's training data was prepared (its recorded scaling and binarisation), reading
``CHUNK`` rows at a time so a memory-mapped file is never loaded whole. Outputs are written
atomically. A conditional model reads every example given its own class label (``ModelData.labels``);
``sample`` draws the class ``label``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from vaelab.model.vae_model import given_rows
from vaelab.data.sources import SOURCES, Split, load_data
from vaelab.train.distributed import SINGLE, World
from vaelab.estimator.facade import EVAL_SEED, VAE
from vaelab.train.fastpath import compile_evaluation
from vaelab.io.files import atomic_write_bytes
from vaelab.evaluation.gap import InferenceGap
from vaelab.evaluation.loglik import LogLikelihoodEstimate, standard_error
from vaelab.objectives.noise import ExampleNoise
from vaelab.runs.options import RunError
from vaelab.runs.folder import RUN_CONFIG_FILE, RunLock
from vaelab.train.checkpoint import CHECKPOINT_FILE
from vaelab.estimator.facade import load
from vaelab.estimator.serialization import CONFIG_FILE, ModelFileError, read_model_document

CHUNK = 4096  # rows per evaluation / encoding step


def open_model(
    folder: str | os.PathLike[str], device: str | None = None, *, compile: bool = False
) -> tuple[VAE, dict[str, Any]]:
    """The fitted ``VAE`` in ``folder`` (on ``device``; default: see ``vaelab.load``) and its
    ``vaelab.json``; an unfinished run is named as such. ``compile`` decides whether its
    estimates run the likelihood's log p(x|z) compiled (``vaelab.train.fastpath``), whatever the
    model was trained with: each command decides for itself."""
    path = Path(folder)
    if path.is_dir() and not (path / CONFIG_FILE).exists():
        _refuse_unfinished_run(path)
    estimator = load(path, device=device)
    estimator.compile = compile
    if compile:
        compile_evaluation(estimator.model_)
    _, document = read_model_document(path)
    return estimator, document


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


def _keyed_bernoulli(x: np.ndarray, seed: int) -> np.ndarray:
    """One Bernoulli(x) draw of every value, each example's uniforms from its own stream."""
    values = torch.from_numpy(x)
    flat = values.reshape(values.shape[0], -1)
    uniforms = ExampleNoise(flat, seed).uniform(flat.shape[1], like=flat).T  # [batch, dims]
    return (uniforms < flat).to(values.dtype).reshape(values.shape).numpy()


def model_data(
    estimator: VAE,
    document: dict[str, Any],
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
    if split is not None and split not in SPLITS:
        raise RunError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    found = document.get("data")
    record: dict[str, Any] = found if isinstance(found, dict) else {}
    run = document.get("run") or {}
    arguments = dict(record.get("arguments", {}))
    trained_on = str(arguments["source"]) if arguments else None
    if data is None:
        if trained_on is None:
            raise RunError("this model records no training data; pass --data DATA")
        data = trained_on
    data_dir = data_dir if data_dir is not None else run.get("data_dir")
    options = {k: v for k, v in arguments.items() if k != "source"}
    own = data in SOURCES or (trained_on is not None and _same_source(data, trained_on))
    split = split or ("test" if own else "all")
    binarize_seed = None
    if own and split != "all":
        chosen = getattr(load_data(data, data_dir=data_dir, **options), split)
    elif data in SOURCES:
        raise RunError(
            f"{data} is a named data set with its own splits; choose --split train, valid or test"
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


def _conditions(estimator: VAE, examples: ModelData, rows: slice) -> torch.Tensor | None:
    """The one-hot conditions of examples ``rows`` for a conditional model, else None."""
    if not estimator.model_.condition_dim:
        return None
    return torch.from_numpy(estimator.conditions(examples.labels(rows.start, rows.stop)))


def _labels(estimator: VAE, examples: ModelData, rows: slice) -> np.ndarray | None:
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


def evaluate(
    folder: str | os.PathLike[str],
    data: str | None = None,
    data_dir: str | None = None,
    samples: int = 16,
    k: int | None = None,
    examples_limit: int | None = None,
    diagnostics: bool = True,
    progress: bool = False,
    ais_steps: int | None = None,
    ais_chains: int = 16,
    split: str | None = None,
    iwae_examples: int | None = None,
    device: str | None = None,
    per_example: str | os.PathLike[str] | None = None,
    world: World = SINGLE,
    compile: bool = False,
) -> dict[str, Any] | None:
    """Mean ELBO, reconstruction and KL (nats per example) of the model in ``folder`` on its test
    data (see ``model_data``; ``split`` picks another), with the standard error of the ELBO;
    with ``k``, the IWAE-k log-likelihood estimate (and bits per dimension where a model is a
    probability over the data's values); with ``ais_steps``, the AIS estimate with that many
    intermediate distributions and ``ais_chains`` chains per example; with ``diagnostics``, the
    posterior-collapse diagnostics on up to ``DIAGNOSTIC_EXAMPLES`` examples.

    ``examples_limit`` evaluates a random subset of that many examples (seeded, the same every
    time); ``iwae_examples`` takes a random subset of those for IWAE and AIS only, whose cost
    grows with k and the number of steps. A tqdm bar shows each long step when ``progress``.
    ``per_example`` names an .npz file for each example's numbers (float64 ``elbo``, and
    ``iwae`` / ``ais`` when computed, in the order of the examples evaluated). ``compile`` runs
    the likelihood's log p(x|z) through ``torch.compile`` (``vaelab.train.fastpath``).

    On several workers (``world``) every worker calls it: IWAE and AIS split their batches among
    the workers (``estimate_batches``), which gives every example the very numbers one process
    gives it; rank 0 computes the rest and returns the result, the others return None."""
    for name, value, least in (
        ("--samples", samples, 1),
        ("--k", k, 1),
        ("--ais", ais_steps, 1),
        ("--ais-chains", ais_chains, 1),
        ("--examples", examples_limit, 1),
        ("--iwae-examples", iwae_examples, 1),
    ):
        if value is not None and value < least:
            raise RunError(f"{name} must be at least {least}, got {value}")
    out = None if per_example is None else _output(per_example, (".npz",))

    def open_examples() -> tuple[VAE, ModelData]:
        estimator, document = open_model(folder, device, compile=compile)
        examples = model_data(estimator, document, data, data_dir, split).subset(examples_limit)
        if len(examples) == 0:
            raise RunError(f"{examples.description} holds no examples to evaluate")
        return estimator, examples

    opened, failure = _attempt(open_examples)
    world.settle(failure)
    estimator, examples = opened
    estimated = examples.subset(iwae_examples)
    values: dict[str, np.ndarray] = {}
    found: dict[str, Any] = {}
    # The shared work first, so that workers other than rank 0 never wait for rank 0 alone.
    if k is not None:
        iwae = _iwae(estimator, estimated, k, progress, world)
        if iwae is not None:
            found["iwae"], values["iwae"] = iwae
    if ais_steps is not None:
        annealed = _ais(estimator, estimated, ais_steps, ais_chains, progress, world)
        if annealed is not None:
            found["ais"], values["ais"] = annealed
    if not world.main:
        return None
    result, values["elbo"] = _elbo_summary(estimator, examples, samples, progress)
    result["model"] = str(folder)
    result.update(found)
    if diagnostics:
        result["diagnostics"] = diagnostics_summary(estimator, examples, progress)
    if out is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **values)  # type: ignore[arg-type]  # numpy types its first kwarg
        atomic_write_bytes(out, buffer.getvalue())
    return result


def _attempt(action: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``action()`` and None, or None and the exception it raised (for ``World.settle``)."""
    try:
        return action(), None
    except Exception as error:
        return None, error


DIAGNOSTIC_EXAMPLES = 10_000  # collapse diagnostics need the examples in memory at once


def load_examples(examples: ModelData, n: int | None = None) -> torch.Tensor:
    """The first ``n`` (default: all) prepared examples as one float32 tensor
    ``[n, *data_shape]``."""
    return torch.from_numpy(np.concatenate(list(examples.chunks(limit=n))))


ESTIMATE_BATCH = 100  # examples per call of an estimator (log_likelihood's and ais's batch)


def estimate_batches(n: int) -> list[slice]:
    """The batches of ``ESTIMATE_BATCH`` examples an estimate of ``n`` examples runs on, on one
    process or many. Each example's noise is keyed by its values (``vaelab.objectives.noise``), so its
    number does not depend on the batch in exact arithmetic; computing the very same batches on
    every number of workers makes it the same to the last bit too (a matrix product of a few
    rows may take another kernel than one of many, which rounds differently)."""
    return [slice(lo, min(lo + ESTIMATE_BATCH, n)) for lo in range(0, n, ESTIMATE_BATCH)]


T = TypeVar("T")


def _per_batch(
    examples: ModelData,
    estimate: Callable[[torch.Tensor, slice], T],
    world: World,
    progress: bool,
    desc: str,
) -> list[T] | None:
    """``estimate(x, rows)`` on each of ``estimate_batches`` (``rows`` the examples' positions),
    each worker taking a contiguous share of them; the results in order on rank 0, None
    elsewhere."""
    batches = estimate_batches(len(examples))
    mine = batches[world.share(len(batches))]
    shown = tqdm(mine, desc=desc, unit="batch", disable=not (progress and world.main))
    results = [estimate(torch.from_numpy(examples.read(b.start, b.stop)), b) for b in shown]
    gathered = world.gather(results)
    return None if gathered is None else [r for part in gathered for r in part]


def _mean_and_error(log_px: torch.Tensor) -> dict[str, Any]:
    """Examples, mean and standard error of the mean of per-example estimates ``[n]``."""
    return {
        "examples": int(log_px.numel()),
        "mean": float(log_px.mean()),
        "standard_error": standard_error(log_px),
    }


def iwae_summary(
    estimator: VAE, examples: ModelData, k: int, progress: bool = False
) -> dict[str, Any]:
    """IWAE-k estimate of log p(x) over the examples (a stochastic lower bound that tightens with
    k; Burda et al. 2016), with bits per dimension where they are a code length: the likelihood
    is a probability of the values evaluated (``Likelihood.why_not_a_probability``), as for a
    Bernoulli on binary pixels. A density on [0, 1] pixels, or a Bernoulli cross-entropy on grey
    values, would give a number in "bits" that is no code length and no paper's bits/dim; the
    summary then says why it is absent."""
    found = _iwae(estimator, examples, k, progress, SINGLE)
    assert found is not None
    return found[0]


def _iwae(
    estimator: VAE, examples: ModelData, k: int, progress: bool, world: World
) -> tuple[dict[str, Any], np.ndarray] | None:
    """``iwae_summary`` and the per-example estimates, float64 ``[n]``, on rank 0."""
    from vaelab.evaluation.loglik import log_likelihood

    model = estimator.model_

    def estimate(x: torch.Tensor, rows: slice) -> tuple[np.ndarray, str | None]:
        condition = _conditions(estimator, examples, rows)
        log_px = log_likelihood(
            model, x, k, batch_size=x.shape[0], seed=EVAL_SEED, condition=condition
        ).log_px
        return log_px.numpy(), model.likelihood.why_not_a_probability(x)

    parts = _per_batch(examples, estimate, world, progress, f"IWAE-{k}")
    if parts is None:
        return None
    log_px = np.concatenate([values for values, _ in parts])
    why_not = next((why for _, why in parts if why), None)
    summary: dict[str, Any] = {
        "k": k,
        **_mean_and_error(torch.from_numpy(log_px)),
        "bound": f"IWAE-{k}",
    }
    if why_not is None:
        dims = math.prod(estimator.data_shape_)
        summary["bits_per_dim"] = -summary["mean"] / (dims * math.log(2.0))
    else:
        summary["bits_per_dim"] = None
        summary["bits_per_dim_note"] = f"not defined: {why_not}"
    return summary, log_px


def ais_summary(
    estimator: VAE, examples: ModelData, steps: int, chains: int, progress: bool = False
) -> dict[str, Any]:
    """AIS estimate of log p(x) over the examples (Neal 2001; HMC transitions on the sigmoid
    schedule, as Wu et al. 2017): a stochastic lower bound that tightens with ``steps``."""
    found = _ais(estimator, examples, steps, chains, progress, SINGLE)
    assert found is not None
    return found[0]


def _ais(
    estimator: VAE,
    examples: ModelData,
    steps: int,
    chains: int,
    progress: bool,
    world: World,
) -> tuple[dict[str, Any], np.ndarray] | None:
    """``ais_summary`` and the per-example estimates, float64 ``[n]``, on rank 0."""
    from vaelab.evaluation.ais import ais

    def estimate(x: torch.Tensor, rows: slice) -> tuple[np.ndarray, np.ndarray, float]:
        found = ais(
            estimator.model_,
            x,
            chains=chains,
            steps=steps,
            seed=EVAL_SEED,
            batch_size=x.shape[0],
            condition=_conditions(estimator, examples, rows),
        )
        return found.log_px.numpy(), found.effective_sample_size.numpy(), found.acceptance_rate

    parts = _per_batch(examples, estimate, world, progress, f"AIS-{steps}")
    if parts is None:
        return None
    log_px = np.concatenate([p[0] for p in parts])
    counts = [p[0].size for p in parts]
    summary = {
        "steps": steps,
        "chains": chains,
        **_mean_and_error(torch.from_numpy(log_px)),
        "mean_effective_sample_size": float(np.concatenate([p[1] for p in parts]).mean()),
        # Each batch's rate is a mean over its examples: weight batches by their size.
        "acceptance_rate": sum(c * p[2] for c, p in zip(counts, parts, strict=True)) / sum(counts),
        "bound": f"AIS-{steps}",
    }
    return summary, log_px


def diagnostics_summary(
    estimator: VAE, examples: ModelData, progress: bool = False
) -> dict[str, Any]:
    """Active units, KL per dimension, I(x; z), rate and distortion (``vaelab.evaluation.diagnostics``) on
    a random subset of at most ``DIAGNOSTIC_EXAMPLES`` examples."""
    from vaelab.evaluation.diagnostics import collapse_diagnostics

    subset = examples.subset(DIAGNOSTIC_EXAMPLES)
    x = load_examples(subset)
    condition = _conditions(estimator, subset, slice(0, len(subset)))
    with torch.no_grad():
        found = collapse_diagnostics(
            estimator.model_, x, seed=EVAL_SEED, progress=progress, condition=condition
        )
    return {"examples": int(x.shape[0]), **found.to_dict()}


def active_units_text(diagnostics: dict[str, Any]) -> str:
    """The active units of a ``diagnostics_summary`` in words: "3 of 5", and with several
    stochastic layers each layer's count, with the units active beyond the layer above for all
    but the top one: "3 of 5 (z1: 2 of 3, 1 beyond z2; z2: 1 of 2)"."""
    text = f"{diagnostics['active_units']} of {diagnostics['latent_dim']}"
    sizes = diagnostics.get("latent_sizes") or []
    if len(sizes) > 1:
        counts = diagnostics["active_units_per_layer"]
        beyond = diagnostics.get("active_units_beyond_layer_above") or [None] * len(sizes)
        layers = []
        for i, (n, d, b) in enumerate(zip(counts, sizes, beyond, strict=True), 1):
            more = f", {b} beyond z{i + 1}" if b is not None and i < len(sizes) else ""
            layers.append(f"z{i}: {n} of {d}{more}")
        text += f" ({'; '.join(layers)})"
    return text


def _elbo_summary(
    estimator: VAE, examples: ModelData, samples: int, progress: bool = False
) -> tuple[dict[str, Any], np.ndarray]:
    """The ELBO summary and each example's ELBO, float64 ``[n]``."""
    sums = np.zeros(4)  # ELBO, ELBO², reconstruction, KL
    per_example = []
    chunks = tqdm(
        examples.chunks(),
        total=-(-len(examples) // CHUNK),
        desc="ELBO",
        unit="chunk",
        disable=not progress,
    )
    for start, x in enumerate(chunks):
        rows = slice(start * CHUNK, start * CHUNK + len(x))
        terms = estimator.elbo_terms(x, _labels(estimator, examples, rows), samples=samples)
        per_example.append(np.asarray(terms.elbo, dtype=np.float64))
        sums += [
            float(terms.elbo.sum()),
            float(terms.elbo.square().sum()),
            float(terms.reconstruction.sum()),
            float(terms.kl.sum()),
        ]
    n = len(examples)
    elbo = sums[0] / n
    variance = max(sums[1] / n - elbo**2, 0.0) * n / max(n - 1, 1)
    return {
        "data": examples.source,
        "split": examples.which,
        "examples_described": examples.description,
        "count": n,
        "elbo": elbo,
        "elbo_standard_error": math.sqrt(variance / n),
        "reconstruction": sums[2] / n,
        "kl": sums[3] / n,
        "samples": samples,
        "bound": "ELBO",
        "unit": "nats per example",
    }, np.concatenate(per_example)


def _output(path: str | os.PathLike[str], suffixes: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise RunError(f"--out {out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise RunError(
            f"--out {out} is a folder; give a file name ending in {' or '.join(suffixes)}"
        )
    if not out.parent.is_dir():
        raise RunError(f"the folder of --out {out} does not exist; create {out.parent} first")
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _pictures(x: np.ndarray, document: dict[str, Any], what: str) -> np.ndarray:
    """Examples as ``[n, C, H, W]`` in [0, 1] for a PNG: values outside [0, 1] (data not scaled to
    it) are mapped from the data's recorded range."""
    from vaelab.io.images import as_images

    images = as_images(x, tuple(document["model"]["data_shape"]))
    if images is None:
        raise RunError(
            f"the model's examples of shape {tuple(document['model']['data_shape'])} are not "
            f"images; write the {what} to a .npy file instead"
        )
    record = document.get("data") or {}
    low, high = record.get("range", (0.0, 1.0))
    if (low < 0.0 or high > 1.0) and high > low:
        images = (images - low) / (high - low)
    return images


def _write_png(path: Path, images: np.ndarray, ncol: int | None = None) -> None:
    from vaelab.io.images import image_grid, save_png

    save_png(image_grid(images, ncol=ncol), path)


def sample(
    folder: str | os.PathLike[str],
    n: int,
    out: str | os.PathLike[str],
    seed: int = 0,
    device: str | None = None,
    label: str | None = None,
) -> Path:
    """``n`` samples (decoder means at z ~ p(z)) as a PNG grid or an ``[n, *shape]`` .npy array;
    of a conditional model, of the class ``label`` (z ~ p(z|y), decoded given y)."""
    if n < 1:
        raise RunError(f"-n must be at least 1, got {n}")
    target = _output(out, (".png", ".npy"))
    estimator, document = open_model(folder, device)
    y = None
    if label is not None or estimator.model_.condition_dim:
        y = class_of(estimator, document, label)
    x = estimator.sample(n, y=y, seed=seed).astype(np.float32)
    if target.suffix.lower() == ".npy":
        _save_npy(target, x)
    else:
        _write_png(target, _pictures(x, document, "samples"))
    return target


def class_of(estimator: VAE, document: dict[str, Any], label: str | None) -> Any:
    """The class of a conditional model that ``label`` names: one of its labels as written
    (``3``), or for an image folder the name of a class folder (``cat``, or ``10`` for the folder
    named 10, whatever its position); refused in a sentence otherwise, or for a model that is not
    conditional."""
    classes = getattr(estimator, "classes_", None)
    if not estimator.model_.condition_dim:
        raise RunError(
            "--label picks a class of a conditional model, and this model is not conditional "
            "(train with --conditional)"
        )
    if classes is None:
        raise RunError(
            "this conditional model was trained on condition vectors, which --label cannot "
            "give; use the library (vaelab.load(DIR).sample(n, y=...))"
        )
    names = class_names(estimator, document)
    shown = ", ".join(names)
    if label is None:
        raise RunError(
            f"this model is conditional: choose the class to draw with --label ({shown})"
        )
    # Names only: an image folder's classes are its folders' positions, and reading a label as
    # a position too would make --label 1 the second folder whenever folders are named by number.
    if label.strip() in names:
        return classes[names.index(label.strip())]
    raise RunError(f"--label {label} is not one of this model's classes ({shown})")


def class_names(estimator: VAE, document: dict[str, Any]) -> list[str]:
    """The names of a conditional model's classes, in the order of ``classes_``: an image
    folder's class folders (its labels are the folders' positions in sorted order), else the
    labels as written."""
    classes = [c.item() if isinstance(c, np.generic) else c for c in estimator.classes_]
    folders = (document.get("data") or {}).get("classes") or []
    if folders and all(isinstance(c, int) and 0 <= c < len(folders) for c in classes):
        return [str(folders[c]) for c in classes]
    return [str(c) for c in classes]


def reconstruct(
    folder: str | os.PathLike[str],
    data: str | None,
    out: str | os.PathLike[str],
    n: int = 10,
    data_dir: str | None = None,
    split: str | None = None,
    device: str | None = None,
) -> tuple[Path, ModelData]:
    """``n`` examples of ``data`` (a random subset in file order, the same every time) and their
    reconstructions: a PNG with originals and reconstructions in alternating rows, or an .npy
    array ``[2, n, *shape]``. Returns the file and the examples used."""
    if n < 1:
        raise RunError(f"-n must be at least 1, got {n}")
    target = _output(out, (".png", ".npy"))
    estimator, document = open_model(folder, device)
    examples = model_data(estimator, document, data, data_dir, split).subset(n)
    if len(examples) == 0:
        raise RunError(f"{examples.description} holds no examples to reconstruct")
    x = load_examples(examples)
    y = _labels(estimator, examples, slice(0, len(examples)))
    r = estimator.reconstruct(x.numpy(), y).astype(np.float32)
    if target.suffix.lower() == ".npy":
        _save_npy(target, np.stack([x.numpy(), r]))
        return target, examples
    originals, recons = (
        _pictures(x.numpy(), document, "reconstructions"),
        _pictures(r, document, ""),
    )
    ncol = min(len(x), 10)
    rows = []
    for start in range(0, len(x), ncol):
        for part in (originals, recons):
            row = part[start : start + ncol]
            pad = np.full((ncol - len(row), *row.shape[1:]), 1.0, dtype=row.dtype)
            rows.append(np.concatenate([row, pad]))
    _write_png(target, np.concatenate(rows), ncol=ncol)
    return target, examples


def encode(
    folder: str | os.PathLike[str],
    data: str | None,
    out: str | os.PathLike[str],
    data_dir: str | None = None,
    split: str | None = None,
    device: str | None = None,
) -> tuple[Path, ModelData]:
    """Posterior means E_q[z|x] of every example of ``data``, ``[n, latent]`` float32 in .npy, in
    file order. Returns the file and the examples encoded."""
    target = _output(out, (".npy",))
    estimator, document = open_model(folder, device)
    examples = model_data(estimator, document, data, data_dir, split)
    parts = [
        estimator.transform(x, _labels(estimator, examples, slice(i * CHUNK, i * CHUNK + len(x))))
        for i, x in enumerate(examples.chunks())
    ]
    z = np.concatenate(parts) if parts else np.zeros((0, estimator.model_.latent_dim), np.float32)
    _save_npy(target, z.astype(np.float32))
    return target, examples


GAP_GROUP = 250  # examples per inference-gap computation (their q* are optimised together)


def gap(
    folder: str | os.PathLike[str],
    data: str | None = None,
    data_dir: str | None = None,
    n: int = 500,
    k: int = 5000,
    steps: int = 2000,
    use_ais: bool = False,
    progress: bool = False,
    split: str | None = None,
    device: str | None = None,
    world: World = SINGLE,
) -> dict[str, Any] | None:
    """The inference gap of Cremer, Li & Duvenaud (2018) on a random subset of ``n`` examples
    (seeded, the same every time): for each variational family that contains the amortised
    posterior (``vaelab.evaluation.gap.families_containing``: the diagonal and the full-covariance Gaussian
    for a diagonal encoder, only the full one for a full-covariance encoder), log p̂(x), ELBO(q*)
    of a per-example optimised q*, ELBO of the amortised q, and the approximation and
    amortisation gaps, each a mean over examples with its standard error. The families share one
    log p̂(x): IWAE-k with the optimised q* of the richest family as proposal, or AIS
    (``use_ais``).

    The examples are taken ``GAP_GROUP`` at a time (each example's q* and estimates depend on it
    alone, its noise being keyed by its values); on several workers (``world``) each takes a
    contiguous share of the groups, which gives every example the numbers one process gives it,
    and rank 0 returns the result (the others None)."""
    from vaelab.evaluation.gap import families_containing

    if n < 2:
        raise RunError(f"--n must be at least 2 examples, got {n}")
    if k < 1 or steps < 1:
        raise RunError(f"--k and --steps must be positive, got {k} and {steps}")

    def open_examples() -> tuple[VAE, ModelData]:
        estimator, document = open_model(folder, device)
        examples = model_data(estimator, document, data, data_dir, split).subset(n)
        if len(examples) < 2:
            raise RunError(f"{examples.description} holds fewer than 2 examples")
        return estimator, examples

    opened, failure = _attempt(open_examples)
    world.settle(failure)
    estimator, examples = opened
    model = estimator.model_
    with torch.no_grad():
        # On the model's device: the encoder runs here outside the estimators that move data.
        first = torch.from_numpy(examples.read(0, 2)).to(estimator.device_)
        condition = _conditions(estimator, examples, slice(0, 2))
        if condition is not None:
            condition = condition.to(estimator.device_)
        given = given_rows(model, condition, slice(None))
        families = families_containing(given.posterior(first))
    count = len(examples)
    groups = [slice(lo, min(lo + GAP_GROUP, count)) for lo in range(0, count, GAP_GROUP)]
    mine = groups[world.share(len(groups))]
    shown = progress and world.main  # one worker's bars stand for all
    found = [
        _group_gaps(
            estimator,
            examples.read(g.start, g.stop),
            _conditions(estimator, examples, g),
            families,
            k,
            steps,
            use_ais,
            shown,
        )
        for g in mine
    ]
    gathered = world.gather(found)
    if gathered is None:
        return None
    parts = [part for rank_parts in gathered for part in rank_parts]
    estimates = {family: _joined_gap(family, [p[family] for p in parts]) for family in families}
    log_px_method = estimates[families[-1]].log_px_method
    return {
        "model": str(folder),
        "data": examples.source,
        "split": examples.which,
        "examples_described": examples.description,
        "examples": count,
        "log_px_method": log_px_method,
        "unit": "nats per example",
        "families": {family: estimates[family].to_dict() for family in families},
    }


_GAP_FIELDS = (
    "log_px",
    "elbo_optimal",
    "elbo_amortised",
    "log_px_mc_standard_error",
    "elbo_optimal_mc_standard_error",
    "elbo_amortised_mc_standard_error",
)


def _group_gaps(
    estimator: VAE,
    x: np.ndarray,
    condition: torch.Tensor | None,
    families: tuple[str, ...],
    k: int,
    steps: int,
    use_ais: bool,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """The inference gaps of one group of examples ``x`` (given their ``condition`` for a
    conditional model) for each family, as plain arrays."""
    from vaelab.evaluation.gap import inference_gap

    model, examples = estimator.model_, torch.from_numpy(x)
    log_px: LogLikelihoodEstimate | None = None
    if use_ais:
        from vaelab.evaluation.ais import ais

        log_px = ais(model, examples, seed=EVAL_SEED, progress=progress, condition=condition)
    found: dict[str, dict[str, Any]] = {}
    for family in reversed(families):  # the richest first: its q* is the proposal for log p(x)
        estimate = inference_gap(
            model, examples, family, log_px=log_px, k=k, steps=steps, seed=EVAL_SEED,
            progress=progress, condition=condition,
        )  # fmt: skip
        log_px = estimate.log_px_estimate
        found[family] = {name: getattr(estimate, name).numpy() for name in _GAP_FIELDS}
        found[family]["effective_sample_size"] = log_px.effective_sample_size.numpy()
        found[family]["method"], found[family]["samples"] = log_px.method, log_px.samples
        found[family]["data_dim"] = log_px.data_dim
    return found


def _joined_gap(family: str, groups: list[dict[str, Any]]) -> InferenceGap:
    """One ``InferenceGap`` of the examples of ``groups``, in order."""
    joined = {
        name: torch.from_numpy(np.concatenate([g[name] for g in groups]))
        for name in (*_GAP_FIELDS, "effective_sample_size")
    }
    first = groups[0]
    log_px = LogLikelihoodEstimate(
        joined["log_px"],
        joined["log_px_mc_standard_error"],
        joined["effective_sample_size"],
        first["samples"],
        first["method"],
        first["data_dim"],
    )
    return InferenceGap(
        family=family,
        **{name: joined[name] for name in _GAP_FIELDS},
        log_px_method=first["method"],
        log_px_estimate=log_px,
    )
