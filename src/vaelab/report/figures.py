"""What a trained model looks like: the arrays behind the report's pictures.

Each function takes a fitted ``vaelab.VAE`` and returns plain numpy arrays (images in [0, 1] as
``[n, C, H, W]``, points as ``[n, 2]``), so the same figures serve the HTML report, the command line
and a notebook. Of a conditional model (trained on class labels) they take the examples' labels
``y``, and ``class_samples`` draws a row of samples per class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.stats import norm

from vaelab.io.images import as_images

if TYPE_CHECKING:
    from vaelab.estimator.facade import VAE


def to_images(estimator: VAE, x: np.ndarray) -> np.ndarray | None:
    """``x: [n, *data_shape]`` as images ``[n, C, H, W]`` in [0, 1], or ``None`` when the data are
    not image-like (e.g. 10 tabular features). Values are read in the model's data unit
    (``Likelihood.data_unit``: 255 for 8-bit pixels kept as 0..255, else 1), then clipped."""
    unit = estimator.model_.likelihood.data_unit
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1) / np.float32(unit)
    images = as_images(flat, estimator.data_shape_)
    return None if images is None else np.clip(images, 0.0, 1.0)


def samples(estimator: VAE, n: int = 64, seed: int = 0) -> np.ndarray | None:
    """``n`` decoder means E[x|z] at z ~ p(z), as images."""
    return to_images(estimator, estimator.sample(n, seed=seed))


def class_samples(
    estimator: VAE, per_class: int = 8, seed: int = 0, names: list[str] | None = None
) -> tuple[np.ndarray, list[str]] | None:
    """A conditional model's samples, a row per class: decoder means at z ~ p(z|y) given each
    class y in turn, ``[classes, per_class, C, H, W]`` with the classes' names (``names``, in the
    order of ``classes_``, else the labels as written); ``None`` for non-image data."""
    rows = [estimator.sample(per_class, y=label, seed=seed) for label in estimator.classes_]
    images = to_images(estimator, np.concatenate(rows))
    if images is None:
        return None
    shaped = images.reshape(len(rows), per_class, *images.shape[1:])
    return shaped, names or [str(label) for label in estimator.classes_]


def reconstructions(
    estimator: VAE, x: np.ndarray, y: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(originals, reconstructions through the posterior mean), both as images; ``y`` the
    examples' labels for a conditional model."""
    originals = to_images(estimator, x)
    if originals is None:
        return None
    rebuilt = to_images(estimator, estimator.reconstruct(x, y))
    assert rebuilt is not None
    return originals, rebuilt


def latent_scatter(
    estimator: VAE, x: np.ndarray, y: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[str, str]]:
    """Posterior means projected to two dimensions: the latent itself when it has two (or one,
    padded with zeros), else its first two principal components. Returns (points, axis names).
    ``y``: the examples' labels for a conditional model."""
    z = estimator.transform(x, y).astype(np.float64)
    if z.shape[1] == 1:
        return np.column_stack([z[:, 0], np.zeros(len(z))]), ("z1", "")
    if z.shape[1] == 2:
        return z, ("z1", "z2")
    centred = z - z.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T, ("PC1 of z", "PC2 of z")


def latent_manifold(estimator: VAE, steps: int = 15) -> np.ndarray | None:
    """For a 2-D latent, decoder means on a grid of z, ``[steps, steps, C, H, W]``: the grid is
    evenly spaced in probability, z = Φ⁻¹(u) for u in (0, 1), as in Kingma & Welling (2014),
    figure 4. ``None`` for other latent sizes, non-image data and conditional models (whose
    decoder needs a class as well as z: a manifold per class)."""
    if estimator.latent_dim != 2 or estimator.model_.condition_dim:
        return None
    u = np.linspace(0.5 / steps, 1 - 0.5 / steps, steps)
    values = norm.ppf(u)
    grid = np.array([[row, col] for row in values[::-1] for col in values], dtype=np.float32)
    images = to_images(estimator, estimator.inverse_transform(grid))
    return None if images is None else images.reshape(steps, steps, *images.shape[1:])


def interpolations(
    estimator: VAE,
    x: np.ndarray,
    pairs: int = 6,
    steps: int = 10,
    y: np.ndarray | None = None,
) -> np.ndarray | None:
    """Straight lines in latent space between the posterior means of consecutive examples
    (x[0]→x[1], x[2]→x[3], …), decoded: ``[pairs, steps, C, H, W]``. A conditional model
    (``y``, the examples' labels) encodes each example given its own label and decodes the whole
    line given the first one's: z moves, the class stays."""
    if len(x) < 2:
        return None
    pairs = min(pairs, len(x) // 2)
    labels = None if y is None else np.asarray(y)[: 2 * pairs]
    z = torch.from_numpy(estimator.transform(x[: 2 * pairs], labels).astype(np.float32))
    start, end = z[0::2], z[1::2]  # [pairs, latent]
    t = torch.linspace(0, 1, steps)[None, :, None]  # [1, steps, 1]
    path = (1 - t) * start[:, None, :] + t * end[:, None, :]  # [pairs, steps, latent]
    along = None if labels is None else np.repeat(labels[0::2], steps)  # [pairs · steps]
    decoded = estimator.inverse_transform(path.reshape(-1, path.shape[-1]).numpy(), along)
    images = to_images(estimator, decoded)
    return None if images is None else images.reshape(pairs, steps, *images.shape[1:])
