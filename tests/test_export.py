"""ONNX export (``vaelab export``, ``VAE.export_onnx``): onnxruntime gives what torch gives, to
1e-5, on held-out digits, at two batch sizes, for every exportable family; the rest are refused
in one line with nothing written.

The round trips need the ``vaelab[export]`` extra (in ``.[dev]``) and skip without it, as
``make test-min`` runs; the refusals need nothing and run everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from conftest import vaelab_cli
from vaelab import VAE
from vaelab.estimator import onnx_export
from vaelab.estimator.onnx_export import (
    DECODER_FILE,
    ENCODER_FILE,
    MANIFEST_FILE,
    decoder_outputs,
    encoder_outputs,
)
from vaelab.runs.model_data import load_examples, model_data, open_model

TOLERANCE = 1e-5
TINY = ["--epochs", "1", "--hidden", "16", "--latent-dim", "3", "--batch-size", "64"]


@pytest.fixture(scope="module")
def ort() -> Any:
    return pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits as images ``[n, 1, 8, 8]`` in [0, 1], and their labels."""
    x, labels = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), labels


def run(ort: Any, path: Path, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs), strict=True))


def assert_close(found: np.ndarray, expected: np.ndarray | torch.Tensor, what: str) -> None:
    expected = np.asarray(expected)
    assert found.shape == expected.shape, what
    np.testing.assert_allclose(found, expected, rtol=TOLERANCE, atol=TOLERANCE, err_msg=what)


def check_round_trip(
    ort: Any, vae: VAE, folder: Path, x: np.ndarray, y: np.ndarray | None = None
) -> None:
    """The exported graphs against torch on ``x`` (and conditions ``y``), all of it and its
    first row: ``loc`` is ``transform``, ``mean`` is ``inverse_transform``, every other output
    is the parameter torch computes."""
    for rows in (slice(None), slice(0, 1)):
        inputs = {"x": x[rows]}
        condition = None
        labels = None
        if y is not None:
            labels = y[rows]
            inputs["y"] = vae.conditions(labels)
            condition = torch.from_numpy(inputs["y"])
        encoded = run(ort, folder / ENCODER_FILE, **inputs)
        assert_close(encoded["loc"], vae.transform(x[rows], labels), "loc vs transform")
        for name, value in encoder_outputs(
            vae.model_, torch.from_numpy(x[rows]), condition
        ).items():
            assert_close(encoded[name], value, f"encoder {name}")
        z = encoded["loc"]
        decoded = run(
            ort, folder / DECODER_FILE, z=z, **({"y": inputs["y"]} if y is not None else {})
        )
        assert_close(decoded["mean"], vae.inverse_transform(z, labels), "mean vs inverse_transform")
        for name, value in decoder_outputs(vae.model_, torch.from_numpy(z), condition).items():
            assert_close(decoded[name], value, f"decoder {name}")


# ------------------------------------------------------------------- the command, on its data


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from vaelab.cli import app as cli

    folder = tmp_path_factory.mktemp("runs") / "digits"
    assert cli.main(["train", "digits", "--out", str(folder), "--quiet", *TINY]) == 0
    return folder


@pytest.mark.slow  # onnxruntime: the export extra, which make test-slow installs
def test_vaelab_export_gives_what_torch_gives_on_the_test_split(ort, trained, tmp_path, capsys):
    out = tmp_path / "onnx"
    code, stdout, stderr = vaelab_cli(capsys, "export", trained, "--format", "onnx", "--out", out)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [DECODER_FILE, ENCODER_FILE, MANIFEST_FILE]
    )
    assert "encoder.onnx: x [batch, 1, 8, 8] -> loc [batch, 3], log_var [batch, 3]" in stdout
    opened = open_model(trained, "cpu")
    x = load_examples(model_data(opened, split="test")).numpy()
    assert len(x) > 100
    check_round_trip(ort, opened.estimator, out, x)

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    encoder, decoder = manifest["encoder"], manifest["decoder"]
    assert [t["name"] for t in encoder["inputs"]] == ["x"]
    assert [t["name"] for t in encoder["outputs"]] == ["loc", "log_var"]
    assert [t["name"] for t in decoder["inputs"]] == ["z"]
    assert [t["name"] for t in decoder["outputs"]] == ["mean", "logits"]
    assert encoder["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert decoder["outputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert "transform" in encoder["outputs"][0]["meaning"]
    assert "inverse_transform" in decoder["outputs"][0]["meaning"]
    assert manifest["model"]["likelihood"] == "bernoulli" and manifest["classes"] is None


def test_a_folder_path_that_is_a_file_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.write_text("mine")
    code, stdout, stderr = vaelab_cli(capsys, "export", trained, "--out", out)
    assert code == 2 and stderr.count("\n") == 1
    assert "--out" in stderr and "is a file" in stderr
    assert out.read_text() == "mine"


def test_without_the_export_extra_one_line_says_what_to_install(
    trained, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(onnx_export.EXPORT_PACKAGES, "onnxscript", "vaelab_no_such_module")
    out = tmp_path / "onnx"
    code, stdout, stderr = vaelab_cli(capsys, "export", trained, "--out", out)
    assert code == 2 and stderr.count("\n") == 1
    assert "pip install vaelab[export]" in stderr and "onnxscript" in stderr
    assert not out.exists()


# ------------------------------------------------------------------------------ the refusals

REFUSED = {
    "planar": ({"posterior": "planar", "flow_steps": 2}, "planar flow posterior"),
    "iaf": ({"posterior": "iaf", "flow_steps": 2}, "inverse autoregressive flow posterior"),
    "layers": ({"latent_dim": (3, 2)}, "several stochastic layers"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_posterior_without_a_closed_form_mean_is_refused_in_one_line(
    name, digits, tmp_path, capsys
):
    settings, words = REFUSED[name]
    x, _ = digits
    vae = VAE(hidden=(8,), epochs=1, seed=0, device="cpu", **{"latent_dim": 3, **settings})
    vae.fit(x[:100])
    out = tmp_path / "onnx"
    with pytest.raises(ValueError, match=words) as refused:
        vae.export_onnx(out)
    assert "\n" not in str(refused.value)
    assert not out.exists()

    vae.save(tmp_path / "model")
    code, stdout, stderr = vaelab_cli(capsys, "export", tmp_path / "model", "--out", out)
    assert code == 2 and stderr.count("\n") == 1 and words in stderr
    assert not out.exists()


class _IndependentNormalPosterior(torch.nn.Module):
    """A posterior of the user's, with no ONNX outputs registered for its distribution."""

    def forward(self, x: torch.Tensor) -> torch.distributions.Distribution:
        loc = x.flatten(1)[:, :3]
        return torch.distributions.Independent(torch.distributions.Normal(loc, 1.0), 1)


@pytest.mark.slow  # onnxruntime: the export extra, which make test-slow installs
def test_a_posterior_without_registered_outputs_is_named_and_nothing_written(ort, digits, tmp_path):
    x, _ = digits
    vae = VAE(latent_dim=3, hidden=(8,), epochs=1, seed=0, device="cpu").fit(x[:100])
    vae.model_.posterior = _IndependentNormalPosterior()
    out = tmp_path / "onnx"
    with pytest.raises(ValueError, match="gives Independent, which has no ONNX outputs") as found:
        vae.export_onnx(out)
    assert "POSTERIOR_OUTPUTS" in str(found.value) and "\n" not in str(found.value)
    assert not out.exists()


# ------------------------------------------------------------------------- every family, slow

FAMILIES = {
    "full": {"posterior": "full"},
    "conv": {"network": "conv"},
    "conv-full-gaussian-decoder": {
        "network": "conv",
        "posterior": "full",
        "likelihood": "gaussian-decoder",
    },
    "continuous-bernoulli": {"likelihood": "continuous-bernoulli"},
    "gaussian": {"likelihood": "gaussian"},
    "gaussian-fixed": {"likelihood": "gaussian-fixed"},
    "gaussian-per-dimension": {"likelihood": "gaussian-per-dimension"},
    "gaussian-decoder": {"likelihood": "gaussian-decoder"},
    "laplace": {"likelihood": "laplace"},
    "discretized-logistic": {"likelihood": "discretized-logistic"},
    "discretized-logistic-mixture": {"likelihood": "discretized-logistic-mixture"},
    "vamp-prior": {"prior": "vamp"},
}
PIXELS = {"discretized-logistic", "discretized-logistic-mixture"}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_exportable_family_round_trips(ort, family, digits, tmp_path):
    x, _ = digits
    if family in PIXELS:
        x = np.round(x * 255.0) / 255.0  # 8-bit pixels, /255
    vae = VAE(latent_dim=3, hidden=(16,), epochs=1, seed=0, device="cpu", **FAMILIES[family])
    vae.fit(x[:300])
    found = vae.export_onnx(tmp_path / "onnx")
    assert found.encoder.outputs[0].name == "loc" and found.decoder.outputs[0].name == "mean"
    check_round_trip(ort, vae, tmp_path / "onnx", x[1500:])


@pytest.mark.slow
def test_an_export_into_the_same_folder_replaces_its_files(ort, trained, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for _ in range(2):
        assert vaelab_cli(capsys, "export", trained, "--out", out)[0] == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([DECODER_FILE, ENCODER_FILE, MANIFEST_FILE, "notes.txt"])
    opened = open_model(trained, "cpu")
    x = load_examples(model_data(opened, split="test"), 5).numpy()
    check_round_trip(ort, opened.estimator, out, x)


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["classes", "vectors"])
def test_a_conditional_model_takes_its_condition_as_input_y(ort, labels, digits, tmp_path):
    x, y = digits
    if labels == "vectors":
        y = np.eye(10, dtype=np.float32)[y][:, :4]  # real conditions [n, 4]
    vae = VAE(latent_dim=3, hidden=(16,), epochs=1, seed=0, device="cpu", conditional=True)
    vae.fit(x[:300], y[:300])
    found = vae.export_onnx(tmp_path / "onnx")
    assert [t.name for t in found.encoder.inputs] == ["x", "y"]
    assert [t.name for t in found.decoder.inputs] == ["z", "y"]
    check_round_trip(ort, vae, tmp_path / "onnx", x[1500:], y[1500:])
    manifest = json.loads((tmp_path / "onnx" / MANIFEST_FILE).read_text())
    expected = list(range(10)) if labels == "classes" else None
    assert manifest["classes"] == expected
