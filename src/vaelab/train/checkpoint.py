"""Training checkpoints: one safetensors file, written atomically, read without ever unpickling.

A checkpoint is a single file (``checkpoint.safetensors``) so that one ``os.replace`` swaps the whole
state at once: a process killed at any moment leaves either the previous checkpoint or the new one.

- **Tensors** (safetensors' raw buffers): model weights, the best weights so far, the optimiser's
  moments, and the global random number generators' states as ``uint8`` tensors
  (``torch.get_rng_state()``, numpy's MT19937 key). The trainer's own streams (data order,
  binarisation, noise) need no state: they are functions of the seed and the position.
- **Everything else** as JSON in the safetensors header's ``__metadata__`` under ``vaelab``: format
  and version, position in the data order, the streams' seed, optimiser hyper-parameters,
  history, early stopping.
- A **SHA-256 digest** of every tensor (name, dtype, shape, bytes) and of that JSON, stored beside it,
  so a truncated, bit-flipped or hand-edited file is refused instead of resuming a damaged run.

``torch.load`` is never used: safetensors holds raw numbers and a JSON header, nothing executable.
Where and how often the trainer writes one is its ``CheckpointPolicy``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vaelab.io.files import atomic_write_bytes

FORMAT = "vaelab-checkpoint"
# 2: the data order and the training noise are keyed by (seed, epoch, batch) (vaelab.train.streams),
# so a checkpoint holds the streams' seed instead of generator states and a permutation.
FORMAT_VERSION = 2
CHECKPOINT_FILE = "checkpoint.safetensors"
_METADATA_KEY = "vaelab"
_DIGEST_KEY = "vaelab.sha256"

Tensors = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _digest(tensors: Tensors, state_json: str) -> str:
    """SHA-256 over every tensor (name, dtype, shape, raw bytes, in name order) and the JSON state."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(state_json.encode())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], tensors: Tensors, state: dict[str, Any]) -> None:
    """Write ``tensors`` and the JSON-serialisable ``state`` to ``path``, replacing it atomically."""
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    state_json = json.dumps(document, sort_keys=True, allow_nan=True)
    metadata = {_METADATA_KEY: state_json, _DIGEST_KEY: _digest(cpu, state_json)}
    atomic_write_bytes(path, save_safetensors(cpu, metadata=metadata))


def _header_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer: an 8-byte little-endian header length, then
    that many bytes of JSON (the format's specification; read here without trusting the sizes)."""
    broken = CheckpointError(
        f"{path} is not a complete vaelab checkpoint (truncated or not a safetensors file); "
        "delete the run folder and train again without --resume"
    )
    if len(data) < 8:
        raise broken
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise broken
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise broken from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or _METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a vaelab checkpoint; point --out at the folder "
            "of a `vaelab train` run"
        )
    return metadata


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Tensors, dict[str, Any]]:
    """The checked tensors and JSON state of the checkpoint at ``path``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist; train without --resume to start a new run"
        ) from None
    return checkpoint_from_bytes(data, path)


def checkpoint_from_bytes(
    data: bytes, path: str | os.PathLike[str]
) -> tuple[Tensors, dict[str, Any]]:
    """The checked tensors and JSON state of a checkpoint file's bytes ``data`` (read from
    ``path``, which messages name): what a worker of a data-parallel run is sent by rank 0."""
    path = Path(path)
    metadata = _header_metadata(data, path)
    corrupt = CheckpointError(
        f"{path} is corrupt (its contents do not match its checksum); delete the run folder and "
        "train again without --resume"
    )
    try:
        tensors = load_safetensors(data)
        state = json.loads(metadata[_METADATA_KEY])
    except (SafetensorError, ValueError, RuntimeError):
        raise corrupt from None
    if _digest(tensors, metadata[_METADATA_KEY]) != metadata.get(_DIGEST_KEY):
        raise corrupt
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise corrupt
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('format_version')!r}; this vaelab "
            f"resumes version {FORMAT_VERSION}: resume with the vaelab that wrote it"
        )
    return tensors, state


# ------------------------------------------------------------------------------ random states


def capture_rng(device: torch.device) -> tuple[Tensors, dict[str, Any]]:
    """Every global generator's state: torch's CPU (and CUDA, when training there), numpy's and
    Python's. The trainer draws from none of them (``vaelab.train.streams``), but code it calls may."""
    tensors: Tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = cuda_state
    # numpy's legacy global generator is what third-party code may draw from: save it as it is.
    np_global = np.random.get_state(legacy=True)  # noqa: NPY002
    name, keys, pos, has_gauss, cached = np_global
    tensors["rng.numpy"] = torch.from_numpy(np.ascontiguousarray(keys).view(np.uint8).copy())
    version, py_state, gauss_next = random.getstate()
    state = {
        "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    return tensors, state


def restore_rng(tensors: Tensors, state: dict[str, Any], device: torch.device) -> None:
    """Set every global generator back to the state ``capture_rng`` recorded."""
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda":
        count = sum(1 for name in tensors if name.startswith("rng.cuda."))
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(count)])
    np_state = state["numpy"]
    keys = tensors["rng.numpy"].numpy().view(np.uint32)
    np.random.set_state(  # noqa: NPY002
        (np_state["name"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


@dataclass
class CheckpointPolicy:
    """Where and how often to checkpoint: at the end of every epoch, and mid-epoch every
    ``every_steps`` optimiser steps and/or ``every_seconds`` seconds (0 or None: not by that rule).
    ``extra`` is JSON stored with each checkpoint (a run keeps its configuration there)."""

    path: Path
    every_steps: int | None = None
    every_seconds: float | None = 60.0
    extra: dict[str, Any] = field(default_factory=dict)
