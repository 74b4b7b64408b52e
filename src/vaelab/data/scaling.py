"""Scaling and binarisation of the stored values: the NaN / range scan, the choice of the affine
transform ``(x - offset) / divisor`` under ``scale=``, the range a model is given, the fixed draws of
the evaluation splits and ``binarize_batch``, the fresh draw of every training batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vaelab.data.errors import DataError
from vaelab.data.loaded import Loaded
from vaelab.data.splits import Split

BINARIZATIONS = ("none", "threshold", "dynamic")
SCALINGS = ("auto", "none", "unit")


# Scans of memory-mapped files (NaN check, min / max, fixed binary draws) read this much at a time,
# so a file larger than memory is never held whole.
_CHUNK_BYTES = 16 * 2**20
_F32_MAX = float(np.finfo(np.float32).max)


def binarize_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation: a fresh ``Bernoulli(x)`` draw of every value, same shape and dtype.

    Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders", Sec. 5: MNIST pixels
    are treated as probabilities and each training image is re-binarised every time it is used,
    which acts as a regulariser. ``x`` must lie in ``[0, 1]`` (``load_data`` checks the train
    split). Pass a seeded ``torch.Generator`` for reproducible training; evaluation sets are
    binarised once by ``load_data`` instead.
    """
    return torch.bernoulli(x, generator=generator)


def _chunk_rows(x: np.ndarray) -> int:
    return max(1, _CHUNK_BYTES // max(1, x.itemsize * math.prod(x.shape[1:])))


def scan(x: np.ndarray, index: np.ndarray | None, origin: str) -> tuple[float, float]:
    """Minimum and maximum of ``x[index]``, read chunk by chunk; ``DataError`` on NaN / inf."""
    n = x.shape[0] if index is None else index.shape[0]
    step = _chunk_rows(x)
    low, high = math.inf, -math.inf
    nans = infs = 0
    first_bad = -1
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk = np.asarray(x[rows] if index is None else x[index[rows]])
        if chunk.dtype.kind == "f":
            bad = ~np.isfinite(chunk)
            if bad.any():
                nans += int(np.isnan(chunk).sum())
                infs += int(bad.sum()) - int(np.isnan(chunk).sum())
                if first_bad < 0:
                    first_bad = start + int(np.flatnonzero(bad.reshape(len(chunk), -1).any(1))[0])
                continue
        if nans == infs == 0:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if nans or infs:
        counts = [f"{nans} NaN" if nans else "", f"{infs} infinite" if infs else ""]
        what = " and ".join(c for c in counts if c)
        raise DataError(
            f"{origin} contains {what} value{'s' if nans + infs > 1 else ''} "
            f"(first at row {first_bad}); clean or impute them before training"
        )
    if max(abs(low), abs(high)) > _F32_MAX:
        raise DataError(
            f"{origin} holds values as large as {max(abs(low), abs(high)):.3g}, beyond float32; "
            f"rescale the data before training"
        )
    return low, high


def transform(values: np.ndarray, offset: float, divisor: float) -> np.ndarray:
    # The exact float32 arithmetic of Split.__getitem__, so recorded ranges match what batches hold.
    return (values.astype(np.float32) - np.float32(offset)) / np.float32(divisor)


def choose_scaling(
    scale: str,
    loaded: Loaded,
    dtype: np.dtype,
    low: float,
    high: float,
    train_range: tuple[float, float] | None,
) -> tuple[float, float, str]:
    """``(offset, divisor, description)`` of the transform ``(x - offset) / divisor``;
    ``train_range`` (the train split's stored minimum and maximum) is needed for ``"unit"``."""
    if scale == "none":
        return 0.0, 1.0, "none: values as stored"
    if scale == "unit":
        assert train_range is not None
        train_low, train_high = train_range
        # Computed in float32 like the transform itself, so the train maximum maps to exactly 1.
        offset = float(np.float32(train_low))
        divisor = float(np.float32(train_high) - np.float32(train_low))
        if divisor == 0.0:
            raise DataError(
                f"scale='unit' needs train values that vary, but all equal {train_low:g}; "
                f"use scale='none' or check the data"
            )
        return (
            offset,
            divisor,
            f"min-max to [0, 1] with the train minimum {offset:g} and range {divisor:g}",
        )
    if loaded.scale is not None:
        divisor, why = loaded.scale
        return 0.0, divisor, why
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0, "none: values already in [0, 1]"
    if dtype == np.uint8:
        return 0.0, 255.0, "divide by 255 (uint8 data)"
    return 0.0, 1.0, f"none: values left as they are (range [{low:g}, {high:g}])"


def seen_range(
    scaled: np.ndarray,
    binarize: str,
    threshold: float,
    train: np.ndarray | None,
    draws: Sequence[Split],
) -> list[float]:
    """Minimum and maximum of what ``split[...]`` returns over all splits: the values a model is
    given, which binarisation keeps in [0, 1] even where ``scale="unit"`` overshoots it off train.

    ``scaled``: float32 ``[2]``, the scaled minimum and maximum over all splits, which is the answer
    without binarisation. A threshold is monotone, so it maps them to the thresholded minimum and
    maximum. Under dynamic binarisation the train split holds intensities (``train``: float32
    ``[2]``, its own scaled minimum and maximum; ``binarize_batch`` draws from them) and ``draws``,
    the valid and test splits, their fixed 0 / 1 draws.
    """
    if binarize == "threshold":
        return [float(v) for v in (scaled > np.float32(threshold))]
    if binarize == "none":
        return [float(scaled[0]), float(scaled[1])]
    assert train is not None  # load_data scans the train split under "dynamic"
    lows, highs = [float(train[0])], [float(train[1])]
    for split in draws:
        if len(split):
            lows.append(float(split.stored.min()))
            highs.append(float(split.stored.max()))
    return [min(lows), max(highs)]


def fixed_draw(split: Split, seed: int, stream: int) -> Split:
    """One Bernoulli draw of a split's scaled values, stored as uint8 0 / 1, chunk by chunk."""
    rng = np.random.default_rng([seed, stream])
    bits = np.empty(split.shape, dtype=np.uint8)
    step = _chunk_rows(np.empty((1, *split.shape[1:]), np.float32))
    for start in range(0, len(split), step):
        p = np.clip(split[start : start + step], 0.0, 1.0)  # "unit" may overshoot [0, 1] off train
        bits[start : start + step] = rng.random(p.shape, dtype=np.float32) < p
    return Split(bits, None, split.labels)
