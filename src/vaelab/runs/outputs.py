"""What a saved model makes from data: samples (``vaelab sample``), reconstructions (``vaelab
reconstruct``) and latent codes (``vaelab encode``), written atomically as PNG grids or .npy
arrays; and the model itself as ONNX graphs for use outside Python (``vaelab export``). A
conditional model draws the class ``label`` and reads each example given its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vaelab.estimator.onnx_export import ExportDependencyError, OnnxExport, export_onnx
from vaelab.io.images import as_images, image_grid, save_png
from vaelab.runs.model_data import (
    CHUNK,
    ModelData,
    OpenedModel,
    labels_of,
    load_examples,
    output_path,
    save_npy,
)
from vaelab.runs.options import ParameterError, RunError


def _pictures(x: np.ndarray, document: dict[str, Any], what: str) -> np.ndarray:
    """Examples as ``[n, C, H, W]`` in [0, 1] for a PNG: values outside [0, 1] (data not scaled to
    it) are mapped from the data's recorded range."""
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
    save_png(image_grid(images, ncol=ncol), path)


def sample(
    opened: OpenedModel,
    n: int,
    out: str | os.PathLike[str],
    seed: int = 0,
    label: str | None = None,
) -> Path:
    """``n`` samples (decoder means at z ~ p(z)) as a PNG grid or an ``[n, *shape]`` .npy array;
    of a conditional model, of the class ``label`` (z ~ p(z|y), decoded given y)."""
    if n < 1:
        raise ParameterError("n", f"must be at least 1, got {n}")
    target = output_path(out, (".png", ".npy"))
    estimator, document = opened.estimator, opened.document
    y = None
    if label is not None or estimator.model_.condition_dim:
        y = class_of(estimator, document, label)
    x = estimator.sample(n, y=y, seed=seed).astype(np.float32)
    if target.suffix.lower() == ".npy":
        save_npy(target, x)
    else:
        _write_png(target, _pictures(x, document, "samples"))
    return target


def class_of(estimator: Any, document: dict[str, Any], label: str | None) -> Any:
    """The class of a conditional model that ``label`` names: one of its labels as written
    (``3``), or for an image folder the name of a class folder (``cat``, or ``10`` for the folder
    named 10, whatever its position); refused in a sentence otherwise, or for a model that is not
    conditional."""
    classes = getattr(estimator, "classes_", None)
    if not estimator.model_.condition_dim:
        raise ParameterError(
            "label",
            "picks a class of a conditional model, and this model is not conditional (train "
            "with conditional = true)",
        )
    if classes is None:
        raise ParameterError(
            "label",
            "cannot give the condition vectors this conditional model was trained on; use the "
            "library (vaelab.load(DIR).sample(n, y=...))",
        )
    names = class_names(estimator, document)
    shown = ", ".join(names)
    if label is None:
        raise ParameterError(
            "label", f"must name the class to draw, since this model is conditional ({shown})"
        )
    # Names only: an image folder's classes are its folders' positions, and reading a label as
    # a position too would make --label 1 the second folder whenever folders are named by number.
    if label.strip() in names:
        return classes[names.index(label.strip())]
    raise ParameterError("label", f"{label} is not one of this model's classes ({shown})")


def class_names(estimator: Any, document: dict[str, Any]) -> list[str]:
    """The names of a conditional model's classes, in the order of ``classes_``: an image
    folder's class folders (its labels are the folders' positions in sorted order), else the
    labels as written."""
    classes = [c.item() if isinstance(c, np.generic) else c for c in estimator.classes_]
    folders = (document.get("data") or {}).get("classes") or []
    if folders and all(isinstance(c, int) and 0 <= c < len(folders) for c in classes):
        return [str(folders[c]) for c in classes]
    return [str(c) for c in classes]


def reconstruct(opened: OpenedModel, examples: ModelData, out: str | os.PathLike[str]) -> Path:
    """``examples`` and their reconstructions: a PNG with originals and reconstructions in
    alternating rows, or an .npy array ``[2, n, *shape]``."""
    target = output_path(out, (".png", ".npy"))
    estimator, document = opened.estimator, opened.document
    if len(examples) == 0:
        raise RunError(f"{examples.description} holds no examples to reconstruct")
    x = load_examples(examples)
    y = labels_of(estimator, examples, slice(0, len(examples)))
    r = estimator.reconstruct(x.numpy(), y).astype(np.float32)
    if target.suffix.lower() == ".npy":
        save_npy(target, np.stack([x.numpy(), r]))
        return target
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
    return target


def encode(opened: OpenedModel, examples: ModelData, out: str | os.PathLike[str]) -> Path:
    """Posterior means E_q[z|x] of ``examples``, ``[n, latent]`` float32 in .npy, in file
    order."""
    target = output_path(out, (".npy",))
    estimator = opened.estimator
    parts = [
        estimator.transform(x, labels_of(estimator, examples, slice(i * CHUNK, i * CHUNK + len(x))))
        for i, x in enumerate(examples.chunks())
    ]
    z = np.concatenate(parts) if parts else np.zeros((0, estimator.model_.latent_dim), np.float32)
    save_npy(target, z.astype(np.float32))
    return target


EXPORT_FORMATS = ("onnx",)


def export(opened: OpenedModel, out: str | os.PathLike[str], format: str = "onnx") -> OnnxExport:
    """The model as ONNX graphs in folder ``out`` (``VAE.export_onnx``), a conditional model's
    classes recorded by name (an image folder's class folders). Refused in one line, before
    anything is written: an unknown ``format``, an ``out`` that is a file, a component that
    cannot be exported, or the packages of ``vaelab[export]`` missing."""
    if format not in EXPORT_FORMATS:
        raise ParameterError(
            "format", f"must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}"
        )
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ParameterError("out", f"{target} is a file; give a folder for the ONNX files")
    estimator = opened.estimator
    classes = None
    if getattr(estimator, "classes_", None) is not None:
        classes = np.asarray(class_names(estimator, opened.document))
    try:
        return export_onnx(
            estimator.model_, target, config=estimator.model_config_, classes=classes
        )
    except ExportDependencyError as error:
        raise RunError(str(error)) from None
