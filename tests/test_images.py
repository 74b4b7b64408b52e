"""Image grids, PNG encoding and atomic writes: exact pixels on tiny known inputs."""

import base64
import os
import stat

import numpy as np
import pytest
from PIL import Image

from vaelab.io.files import atomic_write_bytes
from vaelab.io.images import as_images, image_grid, png_bytes, png_data_uri, save_png


def test_grid_of_two_grey_images_is_exact():
    images = np.array([[[0.0, 1.0], [0.5, 0.25]], [[1.0, 1.0], [1.0, 1.0]]])[:, None]  # [2,1,2,2]
    grid = image_grid(images, ncol=2, pad=1, pad_value=0.0)
    # 0.5 * 255 = 127.5 rounds to 128; 0.25 * 255 = 63.75 rounds to 64.
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 255, 0, 255, 255, 0],
            [0, 128, 64, 0, 255, 255, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    assert grid.dtype == np.uint8
    np.testing.assert_array_equal(grid, expected)
    # [n, H, W] is the same as [n, 1, H, W].
    np.testing.assert_array_equal(image_grid(images[:, 0], ncol=2, pad_value=0.0), expected)


def test_grid_without_padding_is_the_block_matrix():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 3, 5)) / 255.0  # exact in uint8 after rounding
    grid = image_grid(images, ncol=2, pad=0)
    blocks = (images * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(grid, np.block([[blocks[0], blocks[1]], [blocks[2], blocks[3]]]))


def test_grid_default_columns_and_empty_cells():
    images = np.zeros((5, 1, 3, 4))
    grid = image_grid(images, pad=1, pad_value=1.0)  # ncol = ceil(sqrt(5)) = 3, two rows
    assert grid.shape == (2 * (3 + 1) + 1, 3 * (4 + 1) + 1)
    # The sixth cell is empty: it keeps the padding colour.
    assert (grid[5:8, 11:15] == 255).all()
    assert (grid[1:4, 1:5] == 0).all()


def test_grid_rgb_puts_channels_last():
    images = np.zeros((2, 3, 2, 2))
    images[0, 0] = 1.0  # red
    images[1, 2] = 1.0  # blue
    grid = image_grid(images, ncol=2, pad=1, pad_value=0.0)
    assert grid.shape == (4, 7, 3)
    np.testing.assert_array_equal(grid[1, 1], [255, 0, 0])
    np.testing.assert_array_equal(grid[2, 5], [0, 0, 255])
    np.testing.assert_array_equal(grid[0, 0], [0, 0, 0])


def test_grid_clips_values_outside_unit_interval():
    grid = image_grid(np.array([[[-0.5, 1.5]]]), pad=0)
    np.testing.assert_array_equal(grid, [[0, 255]])


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        (np.zeros((2, 2, 4, 4)), {}, r"C = 1 or 3"),
        (np.zeros((4, 4)), {}, r"\[n, C, H, W\]"),
        (np.zeros((0, 1, 4, 4)), {}, r"at least one"),
        (np.full((1, 1, 2, 2), np.nan), {}, r"NaN"),
        (np.zeros((2, 1, 2, 2)), {"ncol": 0}, r"ncol"),
        (np.zeros((2, 1, 2, 2)), {"pad": -1}, r"pad"),
        (np.zeros((2, 1, 2, 2)), {"pad_value": 2.0}, r"pad_value"),
        (np.array([[["a"]]]), {}, r"dtype"),
    ],
)
def test_grid_rejects_bad_input(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        image_grid(images, **kwargs)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3)])
def test_png_round_trip(tmp_path, shape):
    pixels = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    path = save_png(pixels, tmp_path / "picture.png")
    assert path == tmp_path / "picture.png"
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_data_uri_holds_the_same_png(tmp_path):
    pixels = image_grid(np.random.default_rng(2).uniform(size=(3, 1, 4, 4)))
    path = save_png(pixels, tmp_path / "grid.png")
    uri = png_data_uri(pixels)
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    assert base64.b64decode(uri[len(prefix) :], validate=True) == path.read_bytes()
    assert path.read_bytes() == png_bytes(pixels)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((2, 2)), r"uint8"),
        (np.zeros((2, 2, 4), dtype=np.uint8), r"\[H, W\] or \[H, W, 3\]"),
        (np.zeros((2,), dtype=np.uint8), r"\[H, W\] or \[H, W, 3\]"),
        (np.zeros((0, 2), dtype=np.uint8), r"\[H, W\] or \[H, W, 3\]"),
    ],
)
def test_png_rejects_bad_pixels(pixels, message):
    with pytest.raises(ValueError, match=message):
        png_bytes(pixels)


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "grid.png"
    save_png(np.zeros((2, 2), dtype=np.uint8), target)
    save_png(np.full((3, 3), 255, dtype=np.uint8), target)
    assert os.listdir(tmp_path) == ["grid.png"]
    with Image.open(target) as image:
        assert image.size == (3, 3)
    # Same permissions as any new file (not mkstemp's owner-only 0o600).
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    target.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["report.html"]


@pytest.mark.parametrize(
    ("shape", "image_shape"),
    [
        ((1, 28, 28), (1, 28, 28)),
        ((3, 8, 8), (3, 8, 8)),
        ((28, 28), (1, 28, 28)),
        ((784,), (1, 28, 28)),
        ((64,), (1, 8, 8)),
    ],
)
def test_as_images_reshapes_image_like_data(shape, image_shape):
    features = int(np.prod(shape))
    x = np.arange(2 * features, dtype=np.float64).reshape(2, features)
    images = as_images(x, shape)
    assert images is not None
    assert images.shape == (2, *image_shape)
    np.testing.assert_array_equal(images[1].reshape(-1), x[1])  # row-major, nothing shuffled


def test_as_images_accepts_unflattened_examples():
    x = np.zeros((3, 1, 8, 8))
    assert as_images(x, (1, 8, 8)).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("shape", [(10,), (16,), (49,), (2, 28, 28), (4, 3, 2, 1)])
def test_as_images_returns_none_for_non_images(shape):
    assert as_images(np.zeros((2, int(np.prod(shape)))), shape) is None


@pytest.mark.parametrize(
    ("x", "shape", "message"),
    [
        (np.zeros((2, 10)), (64,), r"10 features per example .* has 64"),
        (np.zeros(64), (64,), r"\[n, features\]"),
        (np.zeros((2, 0)), (0,), r"positive"),
        (np.zeros((2, 4)), (), r"non-empty"),
    ],
)
def test_as_images_rejects_bad_shapes(x, shape, message):
    with pytest.raises(ValueError, match=message):
        as_images(x, shape)
