"""Saving and loading models without ever executing code from the file.

A saved model is a folder:

- ``model.safetensors``: the weights (safetensors holds raw tensors and a JSON header, nothing
  executable);
- ``vaelab.json``: format name and version, the architecture (a conditional model's condition size
  among it), the estimator's hyper-parameters, the classes of a conditional model trained on class
  labels (``classes``, in the order of the one-hot columns), and the SHA-256 of the weights file.

The JSON is written last, so a folder whose JSON is present has complete weights; the checksum then
refuses weights that were truncated, swapped or tampered with. Nothing is unpickled, ever.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vaelab.io.files import atomic_write_bytes, atomic_write_json, sha256_bytes
from vaelab.model.registry import ModelConfig, build_model
from vaelab.model.vae_model import VAEModel

FORMAT = "vaelab-model"
FORMAT_VERSION = 1
CONFIG_FILE = "vaelab.json"
WEIGHTS_FILE = "model.safetensors"


class ModelFileError(ValueError):
    """A path that is not a readable vaelab model; the message says what is wrong and what to do."""


def save_model(
    path: str | os.PathLike[str],
    model: VAEModel,
    config: ModelConfig,
    params: dict[str, Any],
    classes: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (built from ``config``) with the estimator's hyper-parameters ``params``
    to folder ``path``, creating it if needed; returns the folder. ``classes`` are a conditional
    model's labels, column j of the one-hot for ``classes[j]``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ModelFileError(
            f"{folder} is a file; a vaelab model is saved as a folder, give a folder path"
        )
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save_safetensors(state, metadata={"format": FORMAT})
    atomic_write_bytes(folder / WEIGHTS_FILE, weights)
    params = {name: _plain(value) for name, value in params.items()}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_json(),
        "estimator": params,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_bytes(weights)},
        **(extra or {}),
    }
    if classes is not None:
        document["classes"] = np.asarray(classes).tolist()
    atomic_write_json(folder / CONFIG_FILE, document)
    return folder


def _plain(value: Any) -> Any:
    """A hyper-parameter as JSON writes it: numpy scalars and arrays (``np.int64(3)`` from a
    grid search) as Python numbers and lists, tuples as lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_model_document(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The model folder and its parsed, checked ``vaelab.json``."""
    folder = Path(path)
    if folder.is_file() and folder.name == CONFIG_FILE:
        folder = folder.parent
    if not folder.exists():
        raise ModelFileError(f"{folder} does not exist; give the folder a model was saved to")
    config_path = folder / CONFIG_FILE
    if not folder.is_dir() or not config_path.is_file():
        raise ModelFileError(
            f"{folder} is not a vaelab model (no {CONFIG_FILE} inside); give a folder written by "
            "VAE.save or `vaelab train --out`"
        )
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(
            f"{config_path} is not valid JSON ({error}); the file is corrupt"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelFileError(
            f"{config_path} is not a vaelab model description (format is not {FORMAT!r})"
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{folder} uses model format version {version!r}; this vaelab reads version "
            f"{FORMAT_VERSION}: upgrade vaelab or re-save the model"
        )
    return folder, document


def load_weights(folder: Path, document: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checked tensors of a model folder."""
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelFileError(f"{weights_path} is missing; the model folder is incomplete")
    data = weights_path.read_bytes()
    expected = document.get("weights", {}).get("sha256")
    if sha256_bytes(data) != expected:
        raise ModelFileError(
            f"{weights_path} does not match the checksum in {CONFIG_FILE}: the weights are truncated, "
            "corrupt or were replaced; re-save or retrain the model"
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise ModelFileError(f"{weights_path} is not a safetensors file ({error})") from None


@dataclass
class SavedModel:
    """What a model folder holds, checked: the model (on the CPU, in eval mode), the
    configuration it was built from, the estimator's hyper-parameters, a conditional model's
    classes, and the whole ``vaelab.json`` document (``document``) with the run's records."""

    folder: Path
    model: VAEModel
    config: ModelConfig
    params: dict[str, Any]
    classes: np.ndarray | None
    document: dict[str, Any]


def read_model(path: str | os.PathLike[str]) -> SavedModel:
    """The checked contents of a model folder written by ``save_model``."""
    folder, document = read_model_document(path)
    try:
        config = ModelConfig.from_json(document["model"])
        params = dict(document["estimator"])
        params["hidden"] = tuple(params["hidden"])
        if isinstance(params.get("latent_dim"), list):  # several stochastic layers
            params["latent_dim"] = tuple(params["latent_dim"])
        model = build_model(config)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(
            f"{folder / CONFIG_FILE} describes no model this vaelab can build ({error})"
        ) from None
    state = load_weights(folder, document)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ModelFileError(
            f"the weights in {folder} do not fit the described model: {first}"
        ) from None
    classes = document.get("classes")
    if classes is not None and (
        not isinstance(classes, list) or len(classes) != config.condition_dim
    ):
        raise ModelFileError(
            f"{folder / CONFIG_FILE} lists {len(classes) if isinstance(classes, list) else 'no'}"
            f" classes for conditions of size {config.condition_dim}; the file is corrupt"
        )
    return SavedModel(
        folder,
        model.eval(),
        config,
        params,
        None if classes is None else np.asarray(classes),
        document,
    )
