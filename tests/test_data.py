"""Tests of vaelab.data: real data sets, file formats, splits, scaling, binarisation, errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.io import loadmat

from conftest import SHARED_DATA as DATA_DIR
from vaelab.cli import app as cli
from vaelab.data import scaling
from vaelab.data import sources as data
from vaelab.data.npyrows import NpyRows
from vaelab.data.sources import DataError, DataSplits, binarize_batch, describe, load_data
from vaelab.data.splits import permuted_split


def needs(folder: str) -> None:
    if not (DATA_DIR / folder).is_dir():
        pytest.skip(f"{DATA_DIR / folder} is absent")


def fails(match: str, *args: object, **kwargs: object) -> str:
    """Call load_data, expect a DataError whose one-sentence message matches ``match``."""
    with pytest.raises(DataError, match=match) as caught:
        load_data(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"
    return message


def everything(splits: DataSplits) -> tuple[np.ndarray, np.ndarray]:
    """All examples in file order with their row numbers, for the permuted-split sources."""
    rows = np.concatenate([s.index for s in (splits.train, splits.valid, splits.test)])
    values = np.concatenate([np.asarray(s) for s in (splits.train, splits.valid, splits.test)])
    order = np.argsort(rows)
    return rows[order], values[order]


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = (
        bytes([0, 0, code, array.ndim])
        + dims
        + array.astype(array.dtype.newbyteorder(">")).tobytes()
    )
    path.write_bytes(raw)
    return raw


# --------------------------------------------------------------------------------------------------
# scikit-learn digits


def test_digits_shape_range_labels_and_split_sizes() -> None:
    splits = load_data("digits")
    assert splits.shape == (1, 8, 8)
    assert splits.sizes == {"train": 1437, "valid": 180, "test": 180}
    assert sum(splits.sizes.values()) == 1797
    train = np.asarray(splits.train)
    assert train.dtype == np.float32 and train.shape == (1437, 1, 8, 8)
    assert train.min() == 0.0 and train.max() == 1.0
    assert splits.record["divisor"] == 16.0 and splits.record["range"] == [0.0, 1.0]
    assert splits.train.labels is not None and set(np.unique(splits.train.labels)) == set(range(10))
    rows, _ = everything(splits)
    np.testing.assert_array_equal(rows, np.arange(1797))  # a partition of all examples


def test_digits_split_is_deterministic_and_depends_on_the_seed() -> None:
    a, b, c = load_data("digits"), load_data("digits"), load_data("digits", seed=1)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, name).index, getattr(b, name).index)
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert not np.array_equal(a.test.index, c.test.index)
    assert a.sizes == c.sizes


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 500),
    valid=st.floats(0.0, 0.45),
    test=st.floats(0.0, 0.45),
    seed=st.integers(0, 2**32),
)
def test_permuted_split_is_a_sorted_partition(n: int, valid: float, test: float, seed: int) -> None:
    def share(fraction: float) -> int:
        return 0 if fraction == 0 else max(1, int(np.floor(n * fraction + 0.5)))

    if n - share(valid) - share(test) < 1:
        with pytest.raises(DataError, match="too few to split"):
            permuted_split(n, valid, test, seed)
        return
    train_rows, valid_rows, test_rows = permuted_split(n, valid, test, seed)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train_rows, valid_rows, test_rows])), np.arange(n)
    )
    for rows in (train_rows, valid_rows, test_rows):
        assert np.all(np.diff(rows) > 0)  # file order within a split
    assert (len(valid_rows), len(test_rows)) == (share(valid), share(test))


# --------------------------------------------------------------------------------------------------
# Real data sets from ../shared/data


@pytest.fixture(scope="module")
def mnist() -> DataSplits:
    needs("mnist")
    return load_data("mnist", data_dir=DATA_DIR)


def read_mnist_file(stem: str, header: int) -> np.ndarray:
    """An MNIST file read as ``shared/data/README.md`` shows, without vaelab: the ``.gz`` file or
    its joined ``.partNN`` pieces, gunzipped, the IDX header skipped."""
    path = DATA_DIR / "mnist" / f"{stem}.gz"
    pieces = sorted(path.parent.glob(f"{path.name}.part*"))
    packed = path.read_bytes() if path.is_file() else b"".join(p.read_bytes() for p in pieces)
    return np.frombuffer(gzip.decompress(packed), np.uint8, offset=header)


def test_mnist_counts_labels_and_pixels(mnist: DataSplits) -> None:
    assert mnist.shape == (1, 28, 28)
    assert mnist.sizes == {"train": 54000, "valid": 6000, "test": 10000}
    assert mnist.record["split"].startswith("official test set")
    assert "mnist: 54,000 train / 6,000 valid / 10,000 test" in describe(mnist)
    # Against the files read independently: valid is the last 6000 rows of the train file, in
    # file order, and test is the t10k file; MNIST stays uint8 in memory.
    x_train = read_mnist_file("train-images-idx3-ubyte", 16).reshape(60000, 1, 28, 28)
    x_test = read_mnist_file("t10k-images-idx3-ubyte", 16).reshape(10000, 1, 28, 28)
    y_train = read_mnist_file("train-labels-idx1-ubyte", 8)
    assert mnist.train.stored.dtype == np.uint8
    np.testing.assert_array_equal(mnist.train.stored, x_train[:54000])
    np.testing.assert_array_equal(mnist.valid.stored, x_train[54000:])
    np.testing.assert_array_equal(mnist.test.stored, x_test)
    assert mnist.train.labels is not None and mnist.valid.labels is not None
    np.testing.assert_array_equal(mnist.train.labels, y_train[:54000])
    np.testing.assert_array_equal(mnist.valid.labels, y_train[54000:])
    assert mnist.test.labels is not None
    np.testing.assert_array_equal(mnist.test.labels, read_mnist_file("t10k-labels-idx1-ubyte", 8))
    # Batches come out as float32 pixels / 255.
    np.testing.assert_array_equal(mnist.test[:500], x_test[:500] / np.float32(255))
    # The published statistics of these files, as shared/data/README.md gives them ("MNIST":
    # first labels 5 0 4 1 9, train label counts, mean pixel 33.3184 train / 33.7912 test).
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert np.bincount(y_train).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert x_train.mean(dtype=np.float64) == pytest.approx(33.3184, abs=5e-5)
    assert x_test.mean(dtype=np.float64) == pytest.approx(33.7912, abs=5e-5)


def test_binarized_mnist_is_its_stored_source() -> None:
    needs("binarized_mnist/source")
    splits = load_data("binarized-mnist", data_dir=DATA_DIR, binarize="dynamic")
    assert splits.sizes == {"train": 50000, "valid": 10000, "test": 10000}
    assert splits.shape == (1, 28, 28)
    assert splits.train.labels is None
    # The .npz files vaelab reads against the independent copy shared/data/README.md stores:
    # ARM-gradient's MATLAB files, read with scipy. Already binary, so the fixed draws of valid
    # and test change nothing (a Bernoulli(0 or 1) draw is its parameter).
    for name in ("train", "valid", "test"):
        source = loadmat(DATA_DIR / "binarized_mnist" / "source" / f"binarized_mnist_{name}.mat")
        expected = source["X"].reshape(-1, 1, 28, 28)
        split = getattr(splits, name)
        np.testing.assert_array_equal(split.stored, expected)
        np.testing.assert_array_equal(split[:2000], expected[:2000].astype(np.float32))
    assert set(np.unique(splits.train[:1000])) == {0.0, 1.0}
    assert any("already binary" in note for note in splits.record["notes"])


def test_frey_face_is_the_matlab_variable_ff() -> None:
    needs("frey_face")
    splits = load_data("frey-face", data_dir=DATA_DIR)
    assert splits.shape == (1, 28, 20)
    assert sum(splits.sizes.values()) == 1965
    # vaelab reads raw bytes at offset 184; scipy reads the MATLAB file's variable ff, [560, 1965],
    # one image per column, row-major 28 x 20 (shared/data/README.md, "Frey Face").
    faces = loadmat(DATA_DIR / "frey_face" / "frey_rawface.mat")["ff"].T.reshape(-1, 1, 28, 20)
    rows, values = everything(splits)
    np.testing.assert_array_equal(rows, np.arange(1965))
    np.testing.assert_array_equal(values, faces / np.float32(255))
    assert splits.record["raw_range"] == [float(faces.min()), float(faces.max())]
    # README: "uint8 (min 8, max 238, mean 154.4609)".
    assert splits.record["raw_range"] == [8.0, 238.0]
    assert faces.mean(dtype=np.float64) == pytest.approx(154.4609, abs=5e-5)


def test_named_sets_need_a_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    message = fails("no.*given", "mnist")
    assert "--data-dir" in message and "VAELAB_DATA" in message
    message = fails("MNIST folder .* does not exist", "mnist", data_dir=tmp_path)
    assert "--data-dir" in message and "VAELAB_DATA" in message
    (tmp_path / "mnist").mkdir()
    fails(
        r"MNIST folder .* holds no IDX images named like train-images-idx3",
        "mnist",
        data_dir=tmp_path,
    )
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    fails("binarized MNIST folder", "binarized-mnist")


# --------------------------------------------------------------------------------------------------
# .npy, .npz, .csv


def test_npy_is_memory_mapped_and_round_trips(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((50, 3), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    splits = load_data(str(tmp_path / "x.npy"))
    for split in (splits.train, splits.valid, splits.test):
        assert isinstance(split.stored, NpyRows)
    assert splits.shape == (3,) and splits.sizes == {"train": 40, "valid": 5, "test": 5}
    rows, values = everything(splits)
    np.testing.assert_array_equal(values, x)
    assert splits.record["scaling"] == "none: values already in [0, 1]"
    # Indexing converts just the requested rows.
    np.testing.assert_array_equal(splits.train[[0, 2]], x[splits.train.index[[0, 2]]])
    assert splits.train[0].shape == (3,)


def test_npy_images_get_a_channel_and_uint8_is_divided_by_255(tmp_path: Path) -> None:
    x = np.arange(10 * 4 * 5, dtype=np.uint8).reshape(10, 4, 5) + 50
    np.save(tmp_path / "img.npy", x)
    splits = load_data(tmp_path / "img.npy")
    assert splits.shape == (1, 4, 5)
    assert isinstance(splits.train.stored, NpyRows)
    _, values = everything(splits)
    np.testing.assert_allclose(values[:, 0], x / 255, rtol=1e-6)
    assert splits.record["divisor"] == 255.0 and splits.record["raw_range"] == [50.0, 249.0]


def test_npy_nan_and_inf_are_found_chunk_by_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scaling, "_CHUNK_BYTES", 64)  # 4 rows of 4 float32 per chunk
    x = np.zeros((30, 4), np.float32)
    x[12, 1] = x[12, 2] = x[20, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    fails(r"contains 3 NaN values \(first at row 12\); clean or impute", str(tmp_path / "nan.npy"))
    x[12:21] = 0.0
    x[25, 3] = np.inf
    np.save(tmp_path / "inf.npy", x)
    fails(r"contains 1 infinite value \(first at row 25\)", str(tmp_path / "inf.npy"))


def test_npz_single_array_key_syntax_and_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((20, 6))
    np.savez(tmp_path / "one.npz", x)
    assert load_data(str(tmp_path / "one.npz")).shape == (6,)
    np.savez(tmp_path / "two.npz", a=x, b=x[:, :2] * 9)
    splits = load_data(f"{tmp_path / 'two.npz'}:b")
    assert splits.shape == (2,) and splits.record["raw_range"][1] > 1.0
    fails(r"holds several arrays \(a, b\).*'.*two\.npz:KEY'", str(tmp_path / "two.npz"))
    fails(r"has no array 'c'; its arrays are a, b", f"{tmp_path / 'two.npz'}:c")
    labels = np.arange(20) % 3
    np.savez(tmp_path / "labelled.npz", images=x, labels=labels)
    splits = load_data(str(tmp_path / "labelled.npz"))
    assert splits.train.labels is not None
    np.testing.assert_array_equal(splits.train.labels, labels[splits.train.index])


def test_npz_and_npy_never_unpickle(tmp_path: Path) -> None:
    objects = np.array([{"a": 1}, None, 3], dtype=object)
    np.savez(tmp_path / "objects.npz", objects)
    fails(r"cannot read .*objects\.npz.*allow_pickle=False", str(tmp_path / "objects.npz"))
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    fails(r"cannot read .*objects\.npy", str(tmp_path / "objects.npy"))


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    rows = np.arange(30, dtype=np.float64).reshape(10, 3)
    body = "\n".join(",".join(f"{v:g}" for v in row) for row in rows) + "\n"
    (tmp_path / "plain.csv").write_text(body)
    (tmp_path / "header.csv").write_text("a,b,c\n" + body)
    plain, header = load_data(str(tmp_path / "plain.csv")), load_data(str(tmp_path / "header.csv"))
    for splits in (plain, header):
        assert splits.shape == (3,) and sum(splits.sizes.values()) == 10
        np.testing.assert_array_equal(everything(splits)[1], rows)
    assert header.record["notes"] == ["the first row was read as a header"]
    assert plain.record["notes"] == []


def test_csv_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,x7\n")
    fails(r"line 3, column 2 holds 'x7', which is not a number", str(bad))
    bad.write_text("1,2\n3\n")
    fails(r"line 2 has 1 values but the rows before have 2", str(bad))
    bad.write_text("1,2\n3,\n")
    fails(r"line 2, column 2 is empty", str(bad))
    bad.write_text("\n")
    fails(r"is empty", str(bad))
    bad.write_text("a,b\n")
    fails(r"header but no data rows", str(bad))
    bad.write_text("1,2\n3,nan\n4,5\n")
    fails(r"contains 1 NaN value \(first at row 1\)", str(bad))


# --------------------------------------------------------------------------------------------------
# Image folders


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_png_folder_grey_flat_and_with_class_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pictures = rng.integers(0, 256, (6, 5, 7), dtype=np.uint8)
    for i, pixels in enumerate(pictures):
        save_png(tmp_path / "flat" / f"img{i}.png", pixels)
    (tmp_path / "flat" / "README.txt").write_text("not an image")
    splits = load_data(str(tmp_path / "flat"), valid_fraction=0.2, test_fraction=0.2)
    assert splits.shape == (1, 5, 7) and splits.train.labels is None
    np.testing.assert_allclose(everything(splits)[1][:, 0], pictures / 255, rtol=1e-6)

    for i, pixels in enumerate(pictures):
        save_png(tmp_path / "classes" / ("cat" if i < 4 else "ant") / f"{i}.png", pixels)
    splits = load_data(str(tmp_path / "classes"), valid_fraction=0.2, test_fraction=0.2)
    assert splits.record["classes"] == ["ant", "cat"]
    labels = np.concatenate([s.labels for s in (splits.train, splits.valid, splits.test)])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 1, 1]


def test_rgb_images_keep_three_channels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (4, 3, 2, 3), dtype=np.uint8)
    for i, picture in enumerate(pixels):
        save_png(tmp_path / f"{i}.png", picture)
    splits = load_data(str(tmp_path), valid_fraction=0.25, test_fraction=0.25)
    assert splits.shape == (3, 3, 2)
    np.testing.assert_allclose(everything(splits)[1], pixels.transpose(0, 3, 1, 2) / 255, rtol=1e-6)


def test_image_folder_mistakes(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    fails(r"folder .*empty' contains no images", str(tmp_path / "empty"))
    save_png(tmp_path / "sizes" / "a.png", np.zeros((4, 4), np.uint8))
    save_png(tmp_path / "sizes" / "b.png", np.zeros((4, 5), np.uint8))
    fails(r"image 'b\.png' is 5×4 with 1 channel\(s\) but 'a\.png' is 4×4", str(tmp_path / "sizes"))
    save_png(tmp_path / "mixed" / "a.png", np.zeros((4, 4), np.uint8))
    save_png(tmp_path / "mixed" / "sub" / "b.png", np.zeros((4, 4), np.uint8))
    fails(r"both at its top level", str(tmp_path / "mixed"))
    save_png(tmp_path / "broken" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    fails(r"cannot read image .*b\.png", str(tmp_path / "broken"))


# --------------------------------------------------------------------------------------------------
# IDX files


def test_idx_plain_gzip_pieces_and_sibling_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(4).integers(0, 256, (12, 3, 4), dtype=np.uint8)
    labels = np.arange(12, dtype=np.uint8) % 4
    raw = write_idx(tmp_path / "toy-images-idx3-ubyte", images)
    write_idx(tmp_path / "toy-labels-idx1-ubyte", labels)
    plain = load_data(str(tmp_path / "toy-images-idx3-ubyte"))
    assert isinstance(plain.train.stored, np.memmap)
    assert plain.shape == (1, 3, 4) and plain.record["divisor"] == 255.0
    np.testing.assert_allclose(everything(plain)[1][:, 0], images / 255, rtol=1e-6)
    assert plain.train.labels is not None
    np.testing.assert_array_equal(plain.train.labels, labels[plain.train.index])

    packed = gzip.compress(raw)
    (tmp_path / "packed.gz").write_bytes(packed)
    np.testing.assert_array_equal(
        everything(load_data(str(tmp_path / "packed.gz")))[1], everything(plain)[1]
    )
    (tmp_path / "pieces.gz.part00").write_bytes(packed[:50])
    (tmp_path / "pieces.gz.part01").write_bytes(packed[50:])
    np.testing.assert_array_equal(
        everything(load_data(str(tmp_path / "pieces.gz")))[1], everything(plain)[1]
    )


def test_idx_big_endian_int16(tmp_path: Path) -> None:
    values = np.arange(-300, 300, 10, dtype=np.int16).reshape(10, 6)
    write_idx(tmp_path / "wide.idx", values, code=0x0B)
    splits = load_data(str(tmp_path / "wide.idx"))
    np.testing.assert_array_equal(everything(splits)[1], values)  # left as they are
    assert splits.record["scaling"].startswith("none: values left as they are")


def test_corrupt_idx_is_refused(tmp_path: Path) -> None:
    raw = write_idx(tmp_path / "ok-ubyte", np.zeros((5, 2, 2), np.uint8))
    (tmp_path / "short-ubyte").write_bytes(raw[:-3])
    fails(
        r"short-ubyte' is truncated: its header promises 5×2×2 values",
        str(tmp_path / "short-ubyte"),
    )
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-3]))
    fails(r"short\.gz' is truncated", str(tmp_path / "short.gz"))
    (tmp_path / "magic-ubyte").write_bytes(b"\x12\x34\x08\x03" + raw[4:])
    fails(r"not an IDX file \(magic number 0x12340803", str(tmp_path / "magic-ubyte"))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-10])
    fails(r"cut\.gz' is not a valid gzip file", str(tmp_path / "cut.gz"))


def write_idx_set(
    folder: Path, prefix: str = "", names: str = "gzip", n: tuple[int, int] = (20, 7), seed: int = 0
) -> dict[str, np.ndarray]:
    """An MNIST-format data set of uint8 images ``[n, 3, 4]`` and labels in ``folder``: its four
    files named ``PREFIX{train,t10k}-{images-idx3,labels-idx1}-ubyte`` and written as ``names``
    says (``"gzip"``: ``.gz``; ``"plain"``: LeCun's ``train-images.idx3-ubyte`` names,
    uncompressed; ``"pieces"``: ``.gz``, the train images in ``.part00`` / ``.part01`` pieces)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, size in zip(("train", "t10k"), n, strict=True):
        arrays[f"{split}-images"] = rng.integers(0, 256, (size, 3, 4), dtype=np.uint8)
        arrays[f"{split}-labels"] = rng.integers(0, 10, size, dtype=np.uint8)
    for stem, array in arrays.items():
        kind = "idx3" if "images" in stem else "idx1"
        if names == "plain":
            write_idx(folder / f"{prefix}{stem}.{kind}-ubyte", array)
            continue
        path = folder / f"{prefix}{stem}-{kind}-ubyte.gz"
        raw = gzip.compress(write_idx(path, array))
        path.write_bytes(raw)
        if names == "pieces" and stem == "train-images":
            path.unlink()
            Path(f"{path}.part00").write_bytes(raw[:40])
            Path(f"{path}.part01").write_bytes(raw[40:])
    return arrays


@pytest.mark.parametrize("names", ["gzip", "plain", "pieces"])
def test_a_folder_of_idx_files_is_a_data_set_with_its_official_test_split(
    tmp_path: Path, names: str
) -> None:
    arrays = write_idx_set(tmp_path / "toy", names=names)
    splits = load_data(str(tmp_path / "toy"))
    # valid = the last round(20 * 0.1) = 2 rows of the train file; test = the t10k file, whole.
    assert splits.sizes == {"train": 18, "valid": 2, "test": 7}
    assert splits.shape == (1, 3, 4) and splits.name == "toy"
    images, labels = arrays["train-images"], arrays["train-labels"]
    np.testing.assert_array_equal(np.asarray(splits.train)[:, 0], images[:18] / np.float32(255))
    np.testing.assert_array_equal(np.asarray(splits.valid)[:, 0], images[18:] / np.float32(255))
    np.testing.assert_array_equal(
        np.asarray(splits.test)[:, 0], arrays["t10k-images"] / np.float32(255)
    )
    for split, expected in (
        (splits.train, labels[:18]),
        (splits.valid, labels[18:]),
        (splits.test, arrays["t10k-labels"]),
    ):
        assert split.labels is not None
        np.testing.assert_array_equal(split.labels, expected)
    record = splits.record
    assert record["format"] == "idx" and record["scaling"] == "divide by 255 (uint8 data)"
    assert record["split"] == (
        "official test set; valid = the last 2 of the 20 rows of the train file, in file order "
        "(valid_fraction=0.1)"
    )
    (note,) = record["notes"]
    assert "test t10k-images" in note and "with labels t10k-labels" in note
    assert ("(from .partNN pieces)" in note) == (names == "pieces")
    assert isinstance(splits.train.stored, np.memmap) == (names == "plain")
    again = load_data(str(tmp_path / "toy"), valid_fraction=0.25, seed=5)
    assert again.sizes == {"train": 15, "valid": 5, "test": 7}  # seed plays no part


def test_an_idx_folder_with_both_plain_and_gzipped_files_reads_the_plain_ones(
    tmp_path: Path,
) -> None:
    arrays = write_idx_set(tmp_path / "raw")
    for stem, array in arrays.items():  # torchvision's raw/ folders keep both
        write_idx(
            tmp_path / "raw" / f"{stem}-{'idx3' if 'images' in stem else 'idx1'}-ubyte", array
        )
    splits = load_data(str(tmp_path / "raw"))
    assert isinstance(splits.train.stored, np.memmap) and isinstance(splits.test.stored, np.memmap)
    np.testing.assert_array_equal(splits.test.stored[:, 0], arrays["t10k-images"])


def test_emnist_style_prefixes_and_an_ambiguous_idx_folder(tmp_path: Path) -> None:
    folder = tmp_path / "emnist"
    arrays = write_idx_set(folder, prefix="emnist-balanced-", n=(10, 4))
    for stem in ("train", "t10k"):  # EMNIST says "test", not "t10k"
        for kind in ("images-idx3", "labels-idx1"):
            old = folder / f"emnist-balanced-{stem}-{kind}-ubyte.gz"
            old.rename(folder / old.name.replace("t10k", "test"))
    (folder / "emnist-balanced-mapping.txt").write_text("0 48\n")
    splits = load_data(str(folder))
    assert splits.sizes == {"train": 9, "valid": 1, "test": 4}
    np.testing.assert_array_equal(splits.test.stored[:, 0], arrays["t10k-images"])
    assert splits.test.labels is not None
    np.testing.assert_array_equal(splits.test.labels, arrays["t10k-labels"])

    write_idx_set(folder, prefix="emnist-letters-", n=(10, 4))
    message = fails(r"holds 2 IDX data sets \(", str(folder))
    assert "emnist-balanced-train-images-idx3-ubyte.gz, emnist-letters-train-images" in message
    assert message.endswith("into a folder of their own and pass that folder")


def test_idx_folder_mistakes(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "no-test")
    for path in (tmp_path / "no-test").glob("t10k-*"):
        path.unlink()
    fails(
        r"holds IDX train images \(train-images-idx3-ubyte\.gz\) but no test images "
        r"\(t10k- or test-images-idx3-ubyte, with the same prefix\); add them, or pass the train "
        r"file itself",
        str(tmp_path / "no-test"),
    )
    write_idx_set(tmp_path / "no-train")
    (tmp_path / "no-train" / "train-images-idx3-ubyte.gz").unlink()
    fails(r"holds IDX test images .* but no train images", str(tmp_path / "no-train"))

    write_idx_set(tmp_path / "labels")
    write_idx(tmp_path / "labels" / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    fails(
        r"train-labels-idx1-ubyte\.gz' holds uint8 \(19,\), not one integer label for each of "
        r"the 20 images",
        str(tmp_path / "labels"),
    )
    write_idx_set(tmp_path / "shapes")
    write_idx(tmp_path / "shapes" / "t10k-images-idx3-ubyte.gz", np.zeros((7, 4, 4), np.uint8))
    fails(
        r"test images .* are uint8 \(4, 4\) but the train images .* are uint8 \(3, 4\)",
        str(tmp_path / "shapes"),
    )


def test_mnist_by_name_and_by_path_agree(mnist: DataSplits) -> None:
    by_path = load_data(str(DATA_DIR / "mnist"))
    assert by_path.name == mnist.name == "mnist"
    assert by_path.sizes == mnist.sizes and by_path.shape == mnist.shape
    for key in ("split", "format", "offset", "divisor", "raw_range", "range", "notes"):
        assert by_path.record[key] == mnist.record[key], key
    for name in ("train", "valid", "test"):
        ours, theirs = getattr(by_path, name), getattr(mnist, name)
        np.testing.assert_array_equal(ours.stored, theirs.stored)
        np.testing.assert_array_equal(ours.labels, theirs.labels)
    assert mnist.record["scaling"] == "divide by 255 (MNIST pixels are 0..255)"
    assert by_path.record["scaling"] == "divide by 255 (uint8 data)"


# --------------------------------------------------------------------------------------------------
# Scaling and binarisation


def test_unit_scaling_uses_train_minimum_and_maximum(tmp_path: Path) -> None:
    x = np.random.default_rng(5).normal(3.0, 2.0, (40, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    auto = load_data(str(tmp_path / "x.npy"))
    assert auto.record["divisor"] == 1.0 and auto.record["scaling"].startswith("none: values left")
    unit = load_data(str(tmp_path / "x.npy"), scale="unit")
    train = np.asarray(unit.train)
    assert train.min() == 0.0 and train.max() == 1.0
    raw_train = x[unit.train.index]
    assert unit.record["offset"] == pytest.approx(float(raw_train.min()))
    assert unit.record["divisor"] == pytest.approx(float(raw_train.max() - raw_train.min()))
    none = load_data(str(tmp_path / "x.npy"), scale="none")
    np.testing.assert_array_equal(np.asarray(none.test), x[none.test.index])
    np.save(tmp_path / "flat.npy", np.ones((10, 2)))
    fails(r"scale='unit' needs train values that vary", str(tmp_path / "flat.npy"), scale="unit")


def test_threshold_binarisation_is_exact() -> None:
    plain = load_data("digits")
    cut = load_data("digits", binarize="threshold", threshold=0.4)
    for name in ("train", "valid", "test"):
        expected = (np.asarray(getattr(plain, name)) > np.float32(0.4)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(getattr(cut, name)), expected)
    assert cut.record["threshold"] == 0.4
    assert "binarisation: threshold at 0.4" in describe(cut)


def test_dynamic_binarisation_fixes_evaluation_draws_and_keeps_train_intensities() -> None:
    plain = load_data("digits")
    a, b = load_data("digits", binarize="dynamic"), load_data("digits", binarize="dynamic")
    np.testing.assert_array_equal(np.asarray(a.train), np.asarray(plain.train))  # intensities
    for name in ("valid", "test"):
        drawn = np.asarray(getattr(a, name))
        assert set(np.unique(drawn)) <= {0.0, 1.0}
        np.testing.assert_array_equal(drawn, np.asarray(getattr(b, name)))
        # 1 only where the intensity is positive, 0 where it is 0.
        assert np.all(drawn <= (np.asarray(getattr(plain, name)) > 0))
    other = load_data("digits", binarize="dynamic", seed=0, valid_fraction=0.1)
    np.testing.assert_array_equal(np.asarray(other.test), np.asarray(a.test))
    assert "valid/test drawn once with seed 0" in describe(a)


def test_binarize_batch_draws_bernoulli() -> None:
    x = torch.linspace(0.0, 1.0, 11).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    first, second = binarize_batch(x, generator), binarize_batch(x, generator)
    assert first.shape == x.shape and first.dtype == x.dtype
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)
    assert torch.equal(binarize_batch(x, torch.Generator().manual_seed(0)), first)
    # Each column has mean p; 4000 draws give a standard error of at most 0.008.
    assert (first.mean(0) - x[0]).abs().max().item() < 0.04
    assert torch.all(first[:, 0] == 0) and torch.all(first[:, -1] == 1)


def test_binarisation_needs_values_in_unit_interval(tmp_path: Path) -> None:
    fails(
        r"binarize='dynamic' needs values in \[0, 1\].*span \[0, 16\]",
        "digits",
        binarize="dynamic",
        scale="none",
    )
    x = np.random.default_rng(6).normal(size=(20, 3))
    np.save(tmp_path / "x.npy", x)
    fails(r"use scale='unit'", str(tmp_path / "x.npy"), binarize="threshold")
    splits = load_data(str(tmp_path / "x.npy"), binarize="dynamic", scale="unit")
    assert set(np.unique(np.asarray(splits.test))) <= {0.0, 1.0}


@pytest.mark.parametrize("binarize", ["threshold", "dynamic"])
def test_unit_scaled_binary_data_is_accepted_when_evaluation_rows_overshoot_the_train_range(
    tmp_path: Path, binarize: str
) -> None:
    """``--scale unit`` maps the TRAIN range to [0, 1], so valid / test rows may fall outside it;
    after binarisation they are 0 / 1 all the same, and a Bernoulli model must accept them."""
    x = np.random.default_rng(7).random((60, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    first = load_data(str(tmp_path / "x.npy"))  # the split depends on n and the seed only
    x[first.valid.index] = 1.5
    x[first.test.index] = -0.5
    np.save(tmp_path / "x.npy", x)

    splits = load_data(str(tmp_path / "x.npy"), scale="unit", binarize=binarize)
    low, high = splits.record["scaled_range"]
    assert low < 0.0 and high > 1.0  # before binarisation: beyond [0, 1] off the train split
    seen = np.concatenate(
        [np.asarray(s).ravel() for s in (splits.train, splits.valid, splits.test)]
    )
    assert splits.record["range"] == [float(seen.min()), float(seen.max())]
    assert seen.min() >= 0.0 and seen.max() <= 1.0
    assert f"values in [{low:.4g}, {high:.4g}]); binarisation" in describe(splits)
    assert describe(splits).endswith("(values in [0, 1])")
    plain = load_data(str(tmp_path / "x.npy"), scale="unit")  # unbinarised: what scaling leaves
    assert plain.record["range"] == plain.record["scaled_range"] == [low, high]

    code = cli.main(
        ["train", str(tmp_path / "x.npy"), "--out", str(tmp_path / "run"), "--quiet"]
        + ["--scale", "unit", "--binarize", binarize, "--epochs", "1", "--hidden", "8"]
        + ["--latent-dim", "2", "--batch-size", "16"]
    )
    assert code == 0


# --------------------------------------------------------------------------------------------------
# Options, shapes and the record


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"binarize": "sometimes"},
            r"unknown binarisation 'sometimes'; use one of: none, threshold, dynamic",
        ),
        ({"scale": "log"}, r"unknown scaling 'log'; use one of: auto, none, unit"),
        ({"binarize": "threshold", "threshold": 1.5}, r"threshold must be in \[0, 1\)"),
        ({"valid_fraction": 1.5}, r"valid_fraction must be in \[0, 1\); got 1\.5"),
        ({"test_fraction": -0.1}, r"test_fraction must be in \[0, 1\)"),
        ({"valid_fraction": 0.5, "test_fraction": 0.5}, r"must stay below 1"),
        ({"seed": -1}, r"seed must be a non-negative integer"),
    ],
)
def test_option_mistakes(kwargs: dict[str, object], match: str) -> None:
    fails(match, "digits", **kwargs)


def test_path_and_shape_mistakes(tmp_path: Path) -> None:
    message = fails(r"data file 'x\.npy' does not exist", "x.npy")
    assert message == (
        "data file 'x.npy' does not exist; pass a path to a .npy/.npz/.csv file, an image folder, "
        "an IDX file, or one of: digits, mnist, binarized-mnist, frey-face"
    )
    (tmp_path / "notes.txt").write_text("1,2\n")
    fails(r"cannot tell the format of .*notes\.txt", str(tmp_path / "notes.txt"))
    np.save(tmp_path / "flat.npy", np.zeros(10))
    fails(r"has shape \(10,\) but vaelab needs one example per row", str(tmp_path / "flat.npy"))
    np.save(tmp_path / "one.npy", np.zeros((1, 4)))
    fails(r"holds 1 example\(s\); at least 2 are needed", str(tmp_path / "one.npy"))
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    fails(r"holds <U1 values; vaelab needs numbers", str(tmp_path / "text.npy"))
    np.save(tmp_path / "two.npy", np.zeros((2, 2)))
    fails(r"2 examples are too few to split", str(tmp_path / "two.npy"))


def test_a_zero_fraction_gives_an_empty_split() -> None:
    splits = load_data("digits", valid_fraction=0.0, binarize="dynamic")
    assert splits.sizes == {"train": 1617, "valid": 0, "test": 180}
    assert np.asarray(splits.valid).shape == (0, 1, 8, 8)


def test_record_is_json_and_reloads_the_same_splits() -> None:
    splits = load_data("digits", binarize="dynamic", seed=3, valid_fraction=0.2)
    record = json.loads(json.dumps(splits.record))
    again = load_data(**record["arguments"])
    np.testing.assert_array_equal(np.asarray(again.test), np.asarray(splits.test))
    np.testing.assert_array_equal(again.train.index, splits.train.index)
    assert record["sizes"] == splits.sizes and record["shape"] == [1, 8, 8]


def test_split_behaves_like_a_read_only_float_array() -> None:
    split = load_data("digits").test
    assert split.dtype == np.float32 and split.ndim == 4 and split.shape == (180, 1, 8, 8)
    whole = np.asarray(split)
    np.testing.assert_array_equal(split[np.array([3, 1])], whole[[3, 1]])
    np.testing.assert_array_equal(split[5:9], whole[5:9])
    batch = split[:4]
    batch[:] = -1.0  # a copy: the stored data is untouched
    assert np.asarray(split).min() == 0.0
    # numpy 2 passes asarray's copy=False on to __array__; numpy 1 has no way to ask for a view.
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        with pytest.raises(ValueError, match="cannot return a view"):
            np.asarray(split, copy=False)
    assert "Split(n=180" in repr(split)
