"""Saving and loading: bit-identical round trips, and files that are refused without running code."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import vaelab
from vaelab.estimator.serialization import CONFIG_FILE, WEIGHTS_FILE, ModelFileError
from vaelab.io.files import sha256_bytes

X = (load_digits().data[:300] / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def fitted() -> vaelab.VAE:
    return vaelab.VAE(latent_dim=3, hidden=(32,), epochs=2, seed=0).fit(X)


@pytest.fixture()
def saved(fitted, tmp_path) -> Path:
    folder = tmp_path / "model"
    fitted.save(folder)
    return folder


@pytest.mark.parametrize(
    ("posterior", "prior", "likelihood"),
    [
        ("diagonal", "normal", "bernoulli"),
        ("full", "vamp", "gaussian-decoder"),
        ("diagonal", "mixture", "continuous-bernoulli"),
        ("full", "learnable", "laplace"),
        ("diagonal", "normal", "gaussian-per-dimension"),
        ("planar", "learnable", "bernoulli"),
        pytest.param("iaf", "vamp", "gaussian", marks=pytest.mark.slow),  # 10 s
    ],
)
def test_round_trip_is_bit_identical(posterior, prior, likelihood, tmp_path):
    model = vaelab.VAE(
        latent_dim=3,
        hidden=(16,),
        epochs=1,
        seed=1,
        posterior=posterior,
        prior=prior,
        likelihood=likelihood,
    ).fit(X)
    model.save(tmp_path / "m")
    loaded = vaelab.load(tmp_path / "m")
    assert loaded.get_params() == model.get_params()
    for key, value in model.model_.state_dict().items():
        assert torch.equal(value, loaded.model_.state_dict()[key]), key
    assert np.array_equal(model.transform(X), loaded.transform(X))
    assert np.array_equal(model.elbo(X), loaded.elbo(X))
    assert np.array_equal(model.reconstruct(X), loaded.reconstruct(X))
    assert np.array_equal(model.sample(5, seed=3), loaded.sample(5, seed=3))


def test_saved_files_are_safetensors_and_json(saved):
    document = json.loads((saved / CONFIG_FILE).read_text())
    assert document["format"] == "vaelab-model"
    assert document["format_version"] == 1
    assert document["model"]["latent_dim"] == 3
    weights = (saved / WEIGHTS_FILE).read_bytes()
    assert document["weights"]["sha256"] == sha256_bytes(weights)
    header_size = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_size])
    assert header["__metadata__"]["format"] == "vaelab-model"
    assert sorted(os.listdir(saved)) == sorted([CONFIG_FILE, WEIGHTS_FILE])


class WritesMarker:
    """Unpickling this runs ``Path.touch`` on the marker: proof that code was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(saved, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(WritesMarker(marker))
    (saved / WEIGHTS_FILE).write_bytes(payload)
    with pytest.raises(ModelFileError, match="checksum"):
        vaelab.load(saved)
    # Even with the checksum forged to match, the bytes are parsed as safetensors, never unpickled.
    document = json.loads((saved / CONFIG_FILE).read_text())
    document["weights"]["sha256"] = sha256_bytes(payload)
    (saved / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        vaelab.load(saved)
    assert not marker.exists()
    # The payload is live: unpickling it really would have written the marker.
    pickle.loads(payload)
    assert marker.exists()


def test_a_torch_save_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"weights": WritesMarker(marker)}, path)
    with pytest.raises(ModelFileError, match="not a vaelab model"):
        vaelab.load(path)
    assert not marker.exists()


def test_truncated_weights_are_refused(saved):
    weights = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ModelFileError, match="truncated, corrupt or were replaced"):
        vaelab.load(saved)


def test_tampered_weights_are_refused(saved):
    weights = bytearray((saved / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0xFF
    (saved / WEIGHTS_FILE).write_bytes(bytes(weights))
    with pytest.raises(ModelFileError, match="checksum"):
        vaelab.load(saved)


def test_weights_of_another_architecture_are_refused(saved, tmp_path):
    other = vaelab.VAE(latent_dim=5, hidden=(8,), epochs=1, seed=0).fit(X)
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS_FILE, saved / WEIGHTS_FILE)
    document = json.loads((saved / CONFIG_FILE).read_text())
    document["weights"]["sha256"] = sha256_bytes((saved / WEIGHTS_FILE).read_bytes())
    (saved / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ModelFileError, match="do not fit the described model"):
        vaelab.load(saved)


def test_a_file_from_before_the_encoders_input_unit_loads_with_unit_one(saved, fitted):
    """Files written before encoders read their input through ``InputScale`` lack its buffer:
    they load (strictly otherwise) with the unit 1 they were trained with, giving the same
    numbers."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(saved / WEIGHTS_FILE)
    assert float(weights.pop("posterior.encoder.input_scale.unit")) == 1.0
    save_file(weights, saved / WEIGHTS_FILE)
    document = json.loads((saved / CONFIG_FILE).read_text())
    document["weights"]["sha256"] = sha256_bytes((saved / WEIGHTS_FILE).read_bytes())
    (saved / CONFIG_FILE).write_text(json.dumps(document))
    loaded = vaelab.load(saved)
    assert float(loaded.model_.state_dict()["posterior.encoder.input_scale.unit"]) == 1.0
    assert np.array_equal(loaded.elbo(X), fitted.elbo(X))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: json.dumps({**d, "format": "pythae"}), "not a vaelab model description"),
        (lambda d: json.dumps({**d, "format_version": 99}), "format version 99"),
        (lambda d: json.dumps({**d, "model": {**d["model"], "prior": "???"}}), "unknown prior"),
        (lambda d: json.dumps([1, 2]), "not a vaelab model description"),
    ],
)
def test_corrupt_or_foreign_descriptions_are_refused(saved, edit, message):
    document = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(edit(document))
    with pytest.raises(ModelFileError, match=message):
        vaelab.load(saved)


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        vaelab.load(tmp_path / "missing")
    with pytest.raises(ModelFileError, match="not a vaelab model"):
        vaelab.load(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelFileError, match="not a vaelab model"):
        vaelab.load(tmp_path / "x.safetensors")


def test_load_accepts_the_json_file_itself(saved, fitted):
    loaded = vaelab.load(saved / CONFIG_FILE)
    assert np.array_equal(loaded.transform(X), fitted.transform(X))


def test_saving_over_a_file_is_refused(fitted, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(ModelFileError, match="is a file"):
        fitted.save(target)
    assert target.read_text() == "keep me"
