"""The arrays behind the report's latent explorer, decoded ahead of time so the page needs no model.

``latent_explorer`` encodes a few hundred examples and returns a `LatentExplorer`:

- a **map**: a plane of latent space, z = origin + a · d₁ + b · d₂ (the latent itself when it has
  two dimensions, else the plane of the first two principal components of the posterior means
  through their mean), with the examples' coordinates on it;
- the **decoder means on a grid** of that plane, ``steps × steps`` points, fine enough that the
  picture under the pointer seems to move continuously (a grid per class of a conditional model);
- the **nearest examples** of each grid point, by Euclidean distance in the whole latent space
  between the grid point's z and the examples' posterior means;
- **traversals**: from each of a few examples' posterior means, the most active units (largest
  Var_x E_q[z_u], the activity of Burda et al. 2016) moved one at a time by ``offsets`` standard
  deviations of E_q[z_u] over the examples, decoded.

``vaelab.report.explorer_html`` draws it as a canvas and sliders driven by a small inline script.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vaelab.report.figures import to_images

if TYPE_CHECKING:
    from vaelab.estimator.facade import VAE

STEPS = 20  # grid points per side of the map: 400 decodings, a step of 5 % of the map
CLASS_STEPS = 16  # a conditional model decodes a grid per class: coarser, to stay small
NEIGHBOURS = 6
UNITS = 5
STARTS = 8
OFFSETS = tuple(np.linspace(-3.0, 3.0, 13).tolist())  # standard deviations; 0 is the example
MARGIN = 0.1  # of the examples' range, added on each side of the map


@dataclass(frozen=True)
class LatentExplorer:
    """What the explorer shows, every picture decoded already. Images are in [0, 1], ``[C, H, W]``.

    Attributes:
        axes: the map's axis names, e.g. ``("z1", "z2")`` or ``("PC1 of z", "PC2 of z")``.
        origin: ``[latent]``, the z at map coordinates (0, 0).
        directions: ``[2, latent]``, the z of map point (a, b) is ``origin + a·d₁ + b·d₂``.
        extent: ``(left, right, bottom, top)``, the map's range of a and b.
        steps: grid points per side; point (row, col) is the centre of that cell, row 0 at the top.
        grid: ``[classes, steps, steps, C, H, W]``, decoder means at the grid points (one class,
            the first axis of length 1, for a model without classes).
        classes: the classes' names, in the order of ``grid``; ``None`` without classes.
        points: ``[n, 2]``, the examples' posterior means on the map.
        labels: ``[n]`` the examples' class positions (into ``classes`` for a conditional model,
            else in sorted order of the labels) for colours, or ``None``.
        label_names: the names of the label positions, for the legend.
        thumbnails: ``[n, C, H, W]``, the examples.
        neighbours: ``[steps, steps, k]`` indices into the examples, nearest first.
        units: ``[u]`` the traversed units, most active first; ``activity`` their Var_x E_q[z_u].
        offsets: ``[v]`` the traversal's steps, in standard deviations of E_q[z_u].
        starts: ``[e]`` indices into the examples: where each traversal starts.
        traversals: ``[e, u, v, C, H, W]``, decoder means of the start's posterior mean with unit
            ``units[j]`` moved by ``offsets[i]`` standard deviations (given the start's class, for
            a conditional model).
        examples_described: which examples these are, in words.
    """

    axes: tuple[str, str]
    origin: np.ndarray
    directions: np.ndarray
    extent: tuple[float, float, float, float]
    steps: int
    grid: np.ndarray
    classes: list[str] | None
    points: np.ndarray
    labels: np.ndarray | None
    label_names: list[str]
    thumbnails: np.ndarray
    neighbours: np.ndarray
    units: np.ndarray
    activity: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray
    traversals: np.ndarray
    examples_described: str = ""

    def grid_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """The map coordinates of the grid's columns (left to right) and rows (top to bottom)."""
        return grid_axes(self.extent, self.steps)

    def grid_latents(self) -> np.ndarray:
        """``[steps, steps, latent]``: the z decoded at each grid point."""
        a, b = self.grid_coordinates()
        return latent_at(self.origin, self.directions, a[None, :], b[:, None])


def grid_axes(
    extent: tuple[float, float, float, float], steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres: the columns' first coordinate left to right, the rows' second top to bottom."""
    left, right, bottom, top = extent
    centres = (np.arange(steps) + 0.5) / steps
    return left + centres * (right - left), top - centres * (top - bottom)


def latent_at(
    origin: np.ndarray, directions: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """z = origin + a·d₁ + b·d₂ for broadcastable ``a`` and ``b``: ``[*shape, latent]``."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return origin + a[..., None] * directions[0] + b[..., None] * directions[1]


def latent_plane(
    z: np.ndarray, read: int | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    """(origin, directions ``[2, latent]``, axis names) of the map for posterior means
    ``z [n, latent]``: the latent itself for two dimensions (one: its axis and a second that
    changes nothing), else the first two principal components through the mean. ``read``: how
    many leading units the decoder reads (z₁ of several stochastic layers); the plane lies in them."""
    latent = z.shape[1]
    read = latent if read is None else read
    origin = np.zeros(latent)
    directions = np.zeros((2, latent))
    if latent <= 2:
        directions[:latent, :latent] = np.eye(latent)
        return origin, directions, ("z1", "z2" if latent == 2 else "(nothing)")
    origin = z.mean(0)
    if read == 1:
        directions[0, 0] = 1.0
        return origin, directions, ("z1", "(nothing)")
    _, _, components = np.linalg.svd(z[:, :read] - origin[:read], full_matrices=False)
    directions[:, :read] = components[:2]
    return origin, directions, ("PC1 of z", "PC2 of z")


def _extent(points: np.ndarray) -> tuple[float, float, float, float]:
    """The examples' range (1st to 99th percentile, so one stray code does not shrink the rest)
    with a margin; an axis without spread gets ±1."""
    bounds = []
    for axis in points.T:
        low, high = np.percentile(axis, [1, 99]) if len(axis) else (0.0, 0.0)
        pad = MARGIN * (high - low)
        if high - low < 1e-6:
            low, high, pad = low - 1.0, high + 1.0, 0.0
        bounds.extend([float(low - pad), float(high + pad)])
    left, right, bottom, top = bounds
    return left, right, bottom, top


def nearest(queries: np.ndarray, z: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows of ``z [n, latent]`` nearest each query ``[..., latent]``
    (Euclidean), nearest first, ties by index: ``[..., k]``."""
    flat = queries.reshape(-1, queries.shape[-1])
    distances = ((flat[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    order = np.argsort(distances, axis=1, kind="stable")[:, : min(k, len(z))]
    return order.reshape(*queries.shape[:-1], order.shape[-1])


def latent_explorer(
    estimator: VAE,
    x: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    class_names: list[str] | None = None,
    steps: int | None = None,
    neighbours: int = NEIGHBOURS,
    units: int = UNITS,
    starts: int = STARTS,
    offsets: tuple[float, ...] = OFFSETS,
    examples_described: str = "",
) -> LatentExplorer | None:
    """The explorer of ``estimator`` around the examples ``x [n, *data_shape]`` (a few hundred:
    their thumbnails travel in the page). ``labels``: the examples' class labels, which a
    conditional model reads them with (``class_names`` names its ``classes_``) and which colour
    the map. ``steps`` defaults to ``STEPS``, or ``CLASS_STEPS`` for a conditional model.
    ``None`` for data that are not images and for a model conditioned on anything but classes."""
    thumbnails = to_images(estimator, x)
    if thumbnails is None or len(x) == 0:
        return None
    conditional = bool(estimator.model_.condition_dim)
    classes = getattr(estimator, "classes_", None) if conditional else None
    if conditional and (classes is None or labels is None):
        return None
    y = labels if conditional else None
    z = estimator.transform(x, y).astype(np.float64)  # [n, latent]
    read = estimator.model_.latent_sizes[0]
    origin, directions, axes = latent_plane(z, read)
    points = (z - origin) @ directions.T  # [n, 2]; the directions are orthonormal
    extent = _extent(points)
    steps = steps or (CLASS_STEPS if conditional else STEPS)
    explorer_labels, label_names = _label_positions(labels, classes, class_names)

    a, b = grid_axes(extent, steps)
    grid_z = latent_at(origin, directions, a[None, :], b[:, None])  # [steps, steps, latent]
    flat = grid_z.reshape(-1, grid_z.shape[-1]).astype(np.float32)
    decoded = [
        to_images(
            estimator, estimator.inverse_transform(flat, None if c is None else [c] * len(flat))
        )
        for c in ([None] if classes is None else list(classes))
    ]
    grid = np.stack([d for d in decoded if d is not None])
    grid = grid.reshape(len(grid), steps, steps, *grid.shape[2:])

    spread = z.std(0)
    activity = spread[:read] ** 2
    chosen = np.argsort(-activity, kind="stable")[: min(units, read)]
    start_index = np.arange(min(starts, len(x)))
    steps_sd = np.asarray(offsets, dtype=np.float64)
    moved = np.repeat(z[start_index][:, None, None, :], len(chosen), 1).repeat(len(steps_sd), 2)
    for j, unit in enumerate(chosen):  # [e, u, v, latent]: unit j moved, the rest kept
        moved[:, j, :, unit] += steps_sd[None, :] * spread[unit]
    along = (
        None if y is None else np.repeat(np.asarray(y)[start_index], len(chosen) * len(steps_sd))
    )
    traversed = to_images(
        estimator,
        estimator.inverse_transform(moved.reshape(-1, moved.shape[-1]).astype(np.float32), along),
    )
    assert traversed is not None
    traversals = traversed.reshape(
        len(start_index), len(chosen), len(steps_sd), *traversed.shape[1:]
    )

    return LatentExplorer(
        axes=axes,
        origin=origin,
        directions=directions,
        extent=extent,
        steps=steps,
        grid=grid,
        classes=(class_names or [str(c) for c in classes])
        if conditional and classes is not None
        else None,
        points=points,
        labels=explorer_labels,
        label_names=label_names,
        thumbnails=thumbnails,
        neighbours=nearest(grid_z, z, neighbours),
        units=chosen,
        activity=activity[chosen],
        offsets=steps_sd,
        starts=start_index,
        traversals=traversals,
        examples_described=examples_described,
    )


def _label_positions(
    labels: np.ndarray | None, classes: np.ndarray | None, names: list[str] | None
) -> tuple[np.ndarray | None, list[str]]:
    """The labels as positions (into ``classes`` when there are classes, else into the sorted
    distinct labels) and the positions' names."""
    if labels is None:
        return None, []
    labels = np.asarray(labels)
    if labels.ndim != 1:
        return None, []
    known = np.asarray(classes) if classes is not None else np.unique(labels)
    positions = np.searchsorted(known, labels)
    if names is None or len(names) != len(known):
        names = [str(c.item() if isinstance(c, np.generic) else c) for c in known]
    return positions, list(names)
