"""Small image utilities on numpy arrays: grids, PNG encoding, atomic files, flat-vector reshaping.

Images follow torch's layout, channels first: a batch is ``[n, C, H, W]`` (``C`` is 1 or 3) or
``[n, H, W]`` for grey-scale, with float values in ``[0, 1]``. Encoded pictures are ``uint8`` arrays
``[H, W]`` (grey) or ``[H, W, 3]`` (RGB), the layout PIL reads. No torchvision needed.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vaelab.io.files import atomic_write_bytes

__all__ = ["as_images", "image_grid", "png_bytes", "png_data_uri", "save_png"]

# A flat feature vector is shown as a square picture only from 8 x 8 up (scikit-learn's digits):
# 4, 9 or 16 features are far more often a small tabular or toy data set than an image.
MIN_SQUARE_SIDE = 8


def image_grid(
    images: np.ndarray, ncol: int | None = None, pad: int = 1, pad_value: float = 0.5
) -> np.ndarray:
    """Tile a batch of images into one picture, row by row.

    Args:
        images: ``[n, C, H, W]`` with ``C`` in {1, 3}, or ``[n, H, W]``; floats in ``[0, 1]``
            (values outside are clipped, so a Gaussian decoder's mean can be shown as is).
        ncol: images per row; default ``ceil(sqrt(n))``. Cells after the last image keep the
            padding colour, so grids with the same ``ncol`` have the same width.
        pad: pixels of padding between cells and around the border.
        pad_value: grey level of the padding, in ``[0, 1]``.

    Returns:
        ``uint8`` array ``[rows * (H + pad) + pad, ncol * (W + pad) + pad]`` for one channel,
        with a trailing axis of 3 for RGB.
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have shape [n, C, H, W] with C = 1 or 3, or [n, H, W]; got {arr.shape}"
        )
    n, channels, height, width = arr.shape
    if n == 0 or height == 0 or width == 0:
        raise ValueError(f"images must hold at least one non-empty image; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"images must be real numbers in [0, 1]; got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("images contain NaN or infinite values; pass values in [0, 1]")
    if ncol is None:
        ncol = math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"ncol must be at least 1; got {ncol}")
    if pad < 0:
        raise ValueError(f"pad must be non-negative; got {pad}")
    if not 0.0 <= pad_value <= 1.0:
        raise ValueError(f"pad_value must be in [0, 1]; got {pad_value}")

    nrow = math.ceil(n / ncol)
    grid = np.full(
        (channels, nrow * (height + pad) + pad, ncol * (width + pad) + pad),
        pad_value,
        dtype=np.float64,
    )
    for i in range(n):
        row, col = divmod(i, ncol)
        top = pad + row * (height + pad)
        left = pad + col * (width + pad)
        grid[:, top : top + height, left : left + width] = arr[i]
    pixels = np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels[0] if channels == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))


def as_images(x: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """Reshape examples to ``[n, C, H, W]`` images if they look like images, else return None.

    Args:
        x: ``[n, features]`` (or already ``[n, *shape]``), with ``features == prod(shape)``.
        shape: the per-example data shape. ``(C, H, W)`` with ``C`` in {1, 3} and ``(H, W)`` are
            images; ``(features,)`` is one when ``features`` is a square of a side of at least
            ``MIN_SQUARE_SIDE`` (64 -> 8 x 8, 784 -> 28 x 28). Anything else is not image data.

    Returns:
        ``[n, C, H, W]`` view of ``x``, or None when ``shape`` does not describe images.
    """
    dims = tuple(int(d) for d in shape)
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes; got {tuple(shape)}")
    arr = np.asarray(x)
    if arr.ndim < 2:
        raise ValueError(f"x must have shape [n, features]; got {arr.shape}")
    features = math.prod(dims)
    if math.prod(arr.shape[1:]) != features:
        raise ValueError(
            f"x has {math.prod(arr.shape[1:])} features per example (shape {arr.shape}) "
            f"but shape {dims} has {features}"
        )
    image_shape: tuple[int, ...]
    if len(dims) == 3 and dims[0] in (1, 3):
        image_shape = dims
    elif len(dims) == 2:
        image_shape = (1, *dims)
    elif len(dims) == 1 and (side := _square_side(features)) is not None:
        image_shape = (1, side, side)
    else:
        return None
    return arr.reshape(arr.shape[0], *image_shape)


def _square_side(features: int) -> int | None:
    side = math.isqrt(features)
    return side if side * side == features and side >= MIN_SQUARE_SIDE else None


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a ``uint8`` picture ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB) as PNG bytes."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8 (see image_grid); got dtype {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or 0 in arr.shape:
        raise ValueError(f"pixels must have shape [H, W] or [H, W, 3]; got {arr.shape}")
    buffer = io.BytesIO()
    # fromarray reads uint8 [H, W] as mode "L" and [H, W, 3] as "RGB".
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(pixels: np.ndarray) -> str:
    """``"data:image/png;base64,..."`` for a ``uint8`` picture ``[H, W]`` or ``[H, W, 3]``."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")


def save_png(pixels: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a ``uint8`` picture ``[H, W]`` or ``[H, W, 3]`` to ``path`` as PNG, atomically."""
    return atomic_write_bytes(path, png_bytes(pixels))
