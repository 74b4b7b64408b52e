"""Using a trained model: what ``vaelab evaluate``, ``sample``, ``reconstruct`` and ``encode`` do.

Each reads a model folder (a ``vaelab train`` run or anything ``VAE.save`` wrote) and prepares data
exactly as the model's training data was prepared (its recorded scaling and binarisation), reading
``CHUNK`` rows at a time so a memory-mapped file is never loaded whole. Outputs are written
atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.data import SOURCES, Split, binarize_batch, load_data
from vaelab.estimator import EVAL_SEED, VAE
from vaelab.files import atomic_write_bytes
from vaelab.loglik import standard_error
from vaelab.runconfig import RunError
from vaelab.runs import RUN_CONFIG_FILE
from vaelab.serialization import CONFIG_FILE, ModelFileError, load, read_model_document

CHUNK = 4096  # rows per evaluation / encoding step


def open_model(folder: str | os.PathLike[str]) -> tuple[VAE, dict[str, Any]]:
    """The fitted ``VAE`` in ``folder`` and its ``vaelab.json``; an unfinished run is named as such."""
    path = Path(folder)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / RUN_CONFIG_FILE).exists():
        raise ModelFileError(
            f"{path} holds a training run that has not finished (no {CONFIG_FILE} yet); finish it "
            f"with `vaelab train --out {path} --resume`"
        )
    estimator = load(path)
    _, document = read_model_document(path)
    return estimator, document


@dataclass
class ModelData:
    """Examples prepared as the model's training data was, read ``CHUNK`` rows at a time; every
    chunk is checked against the likelihood's support."""

    split: Split
    source: str
    which: str  # "test split" or "all examples"
    likelihood: Any
    fixed_binarize_seed: int | None = None  # dynamic binarisation: one Bernoulli draw per value

    def __len__(self) -> int:
        return len(self.split)

    @property
    def description(self) -> str:
        return f"{self.source} ({self.which}, {len(self):,} examples)"

    def chunks(self, limit: int | None = None) -> Iterator[np.ndarray]:
        n = len(self.split) if limit is None else min(limit, len(self.split))
        generator = None
        if self.fixed_binarize_seed is not None:
            generator = torch.Generator().manual_seed(self.fixed_binarize_seed)
        for start in range(0, n, CHUNK):
            x = self.split[start : min(start + CHUNK, n)]
            try:
                self.likelihood.check_support(torch.from_numpy(x))
            except ValueError as error:
                raise RunError(f"{self.description}: {error}") from None
            if generator is not None:
                x = binarize_batch(torch.from_numpy(x), generator).numpy()
            yield x


def model_data(
    estimator: VAE,
    document: dict[str, Any],
    data: str | None = None,
    data_dir: str | None = None,
) -> ModelData:
    """The examples to evaluate / reconstruct / encode.

    - no ``data``: the test split of the data the model was trained on;
    - a data set name: its test split, loaded with the training run's options;
    - a path: all its examples in file order, transformed exactly as the training data was:
      ``(x − offset) / divisor`` with the recorded offset and divisor, then the recorded
      binarisation (a dynamic one becomes one fixed draw seeded with the recorded seed). A model
      saved by ``VAE.save`` records nothing, so its data is used as it is.

    Data of another shape is refused; values outside the likelihood's support are refused as they
    are read.
    """
    found = document.get("data")
    record: dict[str, Any] = found if isinstance(found, dict) else {}
    run = document.get("run") or {}
    arguments = dict(record.get("arguments", {}))
    if data is None:
        if not arguments:
            raise RunError("this model records no training data; pass --data DATA")
        data = str(arguments["source"])
    data_dir = data_dir if data_dir is not None else run.get("data_dir")
    options = {k: v for k, v in arguments.items() if k != "source"}
    seed = None
    if data in SOURCES:
        split = load_data(data, data_dir=data_dir, **options).test
        which = "test split"
    else:
        raw = load_data(data, scale="none", valid_fraction=0.0, test_fraction=0.0).train
        binarize = record.get("binarize", "none")
        split = Split(
            raw.stored,
            raw.index,
            raw.labels,
            offset=float(record.get("offset", 0.0)),
            divisor=float(record.get("divisor", 1.0)),
            threshold=record.get("threshold") if binarize == "threshold" else None,
        )
        if binarize == "dynamic":
            seed = int(options.get("seed", 0))
        which = "all examples"
    shape = tuple(document["model"]["data_shape"])
    if tuple(split.shape[1:]) != shape:
        raise RunError(
            f"{data} has examples of shape {tuple(split.shape[1:])}, but the model was trained on "
            f"shape {shape}; pass data like the training data"
        )
    return ModelData(split, data, which, estimator.model_.likelihood, seed)


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
) -> dict[str, Any]:
    """Mean ELBO, reconstruction and KL (nats per example) of the model in ``folder`` on its test
    data (see ``model_data``), with the standard error of the ELBO; with ``k``, the IWAE-k
    log-likelihood estimate (and bits per dimension for images); with ``ais_steps``, the AIS
    estimate with that many intermediate distributions and ``ais_chains`` chains per example;
    with ``diagnostics``, the posterior-collapse diagnostics on the first ``DIAGNOSTIC_EXAMPLES``
    examples. ``examples_limit`` evaluates only the first examples."""
    if samples < 1:
        raise RunError(f"--samples must be at least 1, got {samples}")
    if k is not None and k < 1:
        raise RunError(f"--k must be at least 1 importance sample, got {k}")
    if ais_steps is not None and ais_steps < 1:
        raise RunError(f"--ais must be at least 1 intermediate distribution, got {ais_steps}")
    if ais_chains < 1:
        raise RunError(f"--ais-chains must be at least 1, got {ais_chains}")
    if examples_limit is not None and examples_limit < 1:
        raise RunError(f"--examples must be at least 1, got {examples_limit}")
    estimator, document = open_model(folder)
    examples = model_data(estimator, document, data, data_dir)
    if len(examples) == 0:
        raise RunError(f"{examples.description} holds no examples to evaluate")
    n = len(examples) if examples_limit is None else min(examples_limit, len(examples))
    result = _elbo_summary(estimator, examples, samples, n)
    result["model"] = str(folder)
    if k is not None:
        result["iwae"] = iwae_summary(estimator, examples, k, n, document, progress)
    if ais_steps is not None:
        result["ais"] = ais_summary(estimator, examples, ais_steps, ais_chains, n, progress)
    if diagnostics:
        result["diagnostics"] = diagnostics_summary(estimator, examples, n)
    return result


DIAGNOSTIC_EXAMPLES = 10_000  # collapse diagnostics need the examples in memory at once


def load_examples(examples: ModelData, n: int) -> torch.Tensor:
    """The first ``n`` prepared examples as one float32 tensor ``[n, *data_shape]``."""
    return torch.from_numpy(np.concatenate(list(examples.chunks(limit=n))))


def _per_chunk(examples: ModelData, n: int, estimate: Callable[[torch.Tensor], Any]) -> list[Any]:
    """``estimate(x)`` on each chunk of the first ``n`` examples (the estimators key every
    example's draws by its own values and ``EVAL_SEED``, so chunking changes nothing)."""
    return [estimate(torch.from_numpy(x)) for x in examples.chunks(limit=n)]


def _mean_and_error(log_px: torch.Tensor) -> dict[str, Any]:
    """Examples, mean and standard error of the mean of per-example estimates ``[n]``."""
    return {
        "examples": int(log_px.numel()),
        "mean": float(log_px.mean()),
        "standard_error": standard_error(log_px),
    }


def iwae_summary(
    estimator: VAE,
    examples: ModelData,
    k: int,
    n: int,
    document: dict[str, Any],
    progress: bool = False,
) -> dict[str, Any]:
    """IWAE-k estimate of log p(x) over the first ``n`` examples (a stochastic lower bound that
    tightens with k; Burda et al. 2016), with bits per dimension for image data."""
    from vaelab.loglik import log_likelihood

    parts = _per_chunk(
        examples,
        n,
        lambda x: log_likelihood(estimator.model_, x, k, seed=EVAL_SEED, progress=progress),
    )
    log_px = torch.cat([p.log_px for p in parts])
    summary: dict[str, Any] = {"k": k, **_mean_and_error(log_px), "bound": f"IWAE-{k}"}
    shape = tuple(document["model"]["data_shape"])
    if len(shape) == 3:  # images: bits per dimension on the modelled (scaled) values
        dims = math.prod(shape)
        summary["bits_per_dim"] = -summary["mean"] / (dims * math.log(2))
    return summary


def ais_summary(
    estimator: VAE, examples: ModelData, steps: int, chains: int, n: int, progress: bool = False
) -> dict[str, Any]:
    """AIS estimate of log p(x) over the first ``n`` examples (Neal 2001; HMC transitions on the
    sigmoid schedule, as Wu et al. 2017): a stochastic lower bound that tightens with ``steps``."""
    from vaelab.ais import ais

    parts = _per_chunk(
        examples,
        n,
        lambda x: ais(
            estimator.model_, x, chains=chains, steps=steps, seed=EVAL_SEED, progress=progress
        ),
    )
    counts = [p.log_px.numel() for p in parts]
    return {
        "steps": steps,
        "chains": chains,
        **_mean_and_error(torch.cat([p.log_px for p in parts])),
        "mean_effective_sample_size": float(
            torch.cat([p.effective_sample_size for p in parts]).mean()
        ),
        # Each chunk's rate is a mean over its examples: weight chunks by their size.
        "acceptance_rate": sum(c * p.acceptance_rate for c, p in zip(counts, parts, strict=True))
        / sum(counts),
        "bound": f"AIS-{steps}",
    }


def diagnostics_summary(estimator: VAE, examples: ModelData, n: int) -> dict[str, Any]:
    """Active units, KL per dimension, I(x; z), rate and distortion (``vaelab.diagnostics``)."""
    from vaelab.diagnostics import collapse_diagnostics

    x = load_examples(examples, min(n, DIAGNOSTIC_EXAMPLES))
    with torch.no_grad():
        found = collapse_diagnostics(estimator.model_, x, seed=EVAL_SEED)
    return {"examples": int(x.shape[0]), **found.to_dict()}


def _elbo_summary(estimator: VAE, examples: ModelData, samples: int, n: int) -> dict[str, Any]:
    sums = np.zeros(4)  # ELBO, ELBO², reconstruction, KL
    for x in examples.chunks(limit=n):
        terms = estimator.elbo_terms(x, samples=samples)
        sums += [
            float(terms.elbo.sum()),
            float(terms.elbo.square().sum()),
            float(terms.reconstruction.sum()),
            float(terms.kl.sum()),
        ]
    elbo = sums[0] / n
    variance = max(sums[1] / n - elbo**2, 0.0) * n / max(n - 1, 1)
    return {
        "data": examples.source,
        "split": examples.which,
        "count": n,
        "elbo": elbo,
        "elbo_standard_error": math.sqrt(variance / n),
        "reconstruction": sums[2] / n,
        "kl": sums[3] / n,
        "samples": samples,
        "bound": "ELBO",
        "unit": "nats per example",
    }


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
    from vaelab.images import as_images

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
    from vaelab.images import image_grid, save_png

    save_png(image_grid(images, ncol=ncol), path)


def sample(
    folder: str | os.PathLike[str], n: int, out: str | os.PathLike[str], seed: int = 0
) -> Path:
    """``n`` samples (decoder means at z ~ p(z)) as a PNG grid or an ``[n, *shape]`` .npy array."""
    if n < 1:
        raise RunError(f"-n must be at least 1, got {n}")
    target = _output(out, (".png", ".npy"))
    estimator, document = open_model(folder)
    x = estimator.sample(n, seed=seed).astype(np.float32)
    if target.suffix.lower() == ".npy":
        _save_npy(target, x)
    else:
        _write_png(target, _pictures(x, document, "samples"))
    return target


def reconstruct(
    folder: str | os.PathLike[str],
    data: str | None,
    out: str | os.PathLike[str],
    n: int = 10,
    data_dir: str | None = None,
) -> Path:
    """The first ``n`` examples of ``data`` and their reconstructions: a PNG with originals and
    reconstructions in alternating rows, or an .npy array ``[2, n, *shape]``."""
    if n < 1:
        raise RunError(f"-n must be at least 1, got {n}")
    target = _output(out, (".png", ".npy"))
    estimator, document = open_model(folder)
    examples = model_data(estimator, document, data, data_dir)
    x = np.concatenate(list(examples.chunks(limit=n))) if len(examples) else None
    if x is None or len(x) == 0:
        raise RunError(f"{examples.description} holds no examples to reconstruct")
    r = estimator.reconstruct(x).astype(np.float32)
    if target.suffix.lower() == ".npy":
        _save_npy(target, np.stack([x, r]))
        return target
    originals, recons = _pictures(x, document, "reconstructions"), _pictures(r, document, "")
    ncol = min(len(x), 10)
    rows = []
    for start in range(0, len(x), ncol):
        for part in (originals, recons):
            row = part[start : start + ncol]
            pad = np.full((ncol - len(row), *row.shape[1:]), 1.0, dtype=row.dtype)
            rows.append(np.concatenate([row, pad]))
    _write_png(target, np.concatenate(rows), ncol=ncol)
    return target


def encode(
    folder: str | os.PathLike[str],
    data: str | None,
    out: str | os.PathLike[str],
    data_dir: str | None = None,
) -> Path:
    """Posterior means E_q[z|x] of every example of ``data``, ``[n, latent]`` float32 in .npy."""
    target = _output(out, (".npy",))
    estimator, document = open_model(folder)
    examples = model_data(estimator, document, data, data_dir)
    parts = [estimator.transform(x) for x in examples.chunks()]
    z = np.concatenate(parts) if parts else np.zeros((0, estimator.latent_dim), np.float32)
    _save_npy(target, z.astype(np.float32))
    return target


def gap(
    folder: str | os.PathLike[str],
    data: str | None = None,
    data_dir: str | None = None,
    n: int = 500,
    k: int = 5000,
    steps: int = 2000,
    use_ais: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """The inference gap of Cremer, Li & Duvenaud (2018) on the first ``n`` examples: for the
    diagonal and the full-covariance Gaussian families, log p̂(x), ELBO(q*) of a per-example
    optimised q*, ELBO of the amortised q, and the approximation and amortisation gaps, each a
    mean over examples with its standard error. Both families share one log p̂(x): IWAE-k with the
    optimised full-covariance q* as proposal, or AIS (``use_ais``)."""
    from vaelab.gap import inference_gap

    if n < 2:
        raise RunError(f"--n must be at least 2 examples, got {n}")
    if k < 1 or steps < 1:
        raise RunError(f"--k and --steps must be positive, got {k} and {steps}")
    estimator, document = open_model(folder)
    examples = model_data(estimator, document, data, data_dir)
    if len(examples) < 2:
        raise RunError(f"{examples.description} holds fewer than 2 examples")
    x = load_examples(examples, min(n, len(examples)))
    model = estimator.model_
    log_px = None
    if use_ais:
        from vaelab.ais import ais

        log_px = ais(model, x, seed=EVAL_SEED, progress=progress)
    full = inference_gap(
        model, x, "full", log_px=log_px, k=k, steps=steps, seed=EVAL_SEED, progress=progress
    )
    diagonal = inference_gap(
        model,
        x,
        "diagonal",
        log_px=full.log_px_estimate,
        k=k,
        steps=steps,
        seed=EVAL_SEED,
        progress=progress,
    )
    return {
        "model": str(folder),
        "data": examples.source,
        "split": examples.which,
        "examples": int(x.shape[0]),
        "log_px_method": full.log_px_method,
        "unit": "nats per example",
        "families": {"diagonal": diagonal.to_dict(), "full": full.to_dict()},
    }
