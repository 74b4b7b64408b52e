"""A folder of PNG / JPEG / ... images of one size, sorted by file name, as uint8 ``(C, H, W)``
examples; one subfolder per class gives labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vaelab.data.errors import DataError
from vaelab.data.loaded import Loaded, Part

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(folder: Path) -> Loaded:
    from PIL import Image  # imported here: only image folders need it

    def images_in(directory: Path) -> list[Path]:
        return sorted(
            p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )

    top = images_in(folder)
    classes = {
        d.name: found
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".") and (found := images_in(d))
    }
    if top and classes:
        raise DataError(
            f"'{folder}' holds images both at its top level (e.g. '{top[0].name}') and in "
            f"subfolders; put every image in one subfolder per class, or none in subfolders"
        )
    if classes:
        files = [p for found in classes.values() for p in found]
        labels = np.array([i for i, found in enumerate(classes.values()) for _ in found], np.int64)
    elif top:
        files, labels = top, None
    else:
        raise DataError(
            f"folder '{folder}' contains no images ({', '.join(IMAGE_SUFFIXES)}); add images, "
            f"or one subfolder of images per class"
        )

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    raise DataError(
                        f"image '{path}' has {image.mode} pixels; vaelab reads 8-bit images, so "
                        f"convert it to 8-bit grayscale or RGB"
                    )
                # Grey stays one channel, colour becomes RGB; alpha is dropped.
                if image.mode in ("L", "RGB"):
                    pixels = np.asarray(image, dtype=np.uint8)
                else:
                    grey = image.mode in ("1", "LA", "La")
                    pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.uint8)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as error:
            raise DataError(
                f"cannot read image '{path}' ({error}); re-save it as PNG or remove it"
            ) from error
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    first = read(files[0])
    x = np.empty((len(files), *first.shape), dtype=np.uint8)
    x[0] = first
    for i, path in enumerate(files[1:], start=1):
        pixels = read(path)
        if pixels.shape != first.shape:
            c, h, w = pixels.shape
            c0, h0, w0 = first.shape
            raise DataError(
                f"image '{path.relative_to(folder)}' is {w}×{h} with {c} channel(s) but "
                f"'{files[0].relative_to(folder)}' is {w0}×{h0} with {c0}; give all images one "
                f"size and colour mode"
            )
        x[i] = pixels
    return Loaded(
        name=folder.name,
        format="images",
        train=Part(x, labels, f"'{folder}'"),
        classes=tuple(classes) if classes else None,
    )
