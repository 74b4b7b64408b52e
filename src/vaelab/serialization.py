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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vaelab.files import atomic_write_bytes, atomic_write_json, sha256_bytes
from vaelab.registry import ModelConfig, build_model

if TYPE_CHECKING:
    from vaelab.estimator import VAE

FORMAT = "vaelab-model"
FORMAT_VERSION = 1
CONFIG_FILE = "vaelab.json"
WEIGHTS_FILE = "model.safetensors"


class ModelFileError(ValueError):
    """A path that is not a readable vaelab model; the message says what is wrong and what to do."""


def save_model(
    estimator: VAE, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``estimator`` (fitted) to folder ``path``, creating it if needed; returns the folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ModelFileError(
            f"{folder} is a file; a vaelab model is saved as a folder, give a folder path"
        )
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in estimator.model_.state_dict().items()}
    weights = save_safetensors(state, metadata={"format": FORMAT})
    atomic_write_bytes(folder / WEIGHTS_FILE, weights)
    params = estimator.get_params()
    params["hidden"] = list(params["hidden"])
    if isinstance(params["latent_dim"], tuple):
        params["latent_dim"] = list(params["latent_dim"])
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": estimator.model_config_.to_json(),
        "estimator": params,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_bytes(weights)},
        **(extra or {}),
    }
    classes = getattr(estimator, "classes_", None)
    if classes is not None:  # a conditional model's labels, column j of the one-hot for classes[j]
        document["classes"] = np.asarray(classes).tolist()
    atomic_write_json(folder / CONFIG_FILE, document)
    return folder


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


def load(path: str | os.PathLike[str], device: str | None = None) -> VAE:
    """A fitted ``vaelab.VAE`` read from folder ``path`` (as written by ``VAE.save``), on
    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ...).

    By default the model goes where it was trained when that device exists here, else on the CPU:
    a model trained on a GPU opens on a machine without one. The estimator's ``device`` parameter
    then names the device it is on, so a refit or a save stays possible here.
    """
    from vaelab.estimator import VAE, resolve_device

    folder, document = read_model_document(path)
    try:
        config = ModelConfig.from_json(document["model"])
        params = dict(document["estimator"])
        params["hidden"] = tuple(params["hidden"])
        if isinstance(params.get("latent_dim"), list):  # several stochastic layers
            params["latent_dim"] = tuple(params["latent_dim"])
        estimator = VAE(**params)
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
    try:
        chosen = resolve_device(estimator.device if device is None else device)
    except ValueError:
        if device is not None:
            raise
        chosen = torch.device("cpu")  # trained on a device this machine lacks
        estimator.device = "cpu"
    if device is not None:
        estimator.device = device
    estimator.model_ = model.to(chosen).eval()
    estimator.model_config_ = config
    estimator.data_shape_ = config.data_shape
    # As validate_data counts features in fit: X.shape[1] (the channels of images [n, C, H, W]).
    estimator.n_features_in_ = int(config.data_shape[0])
    estimator.history_ = []
    estimator.device_ = chosen
    classes = document.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or len(classes) != config.condition_dim:
            raise ModelFileError(
                f"{folder / CONFIG_FILE} lists {len(classes) if isinstance(classes, list) else 'no'}"
                f" classes for conditions of size {config.condition_dim}; the file is corrupt"
            )
        estimator.classes_ = np.asarray(classes)
    return estimator
