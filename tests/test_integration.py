"""The integration matrix: every command on models made by `vaelab train` with every posterior,
prior, likelihood and network, on tiny data.

Defects live where one module reads what another wrote, so each model here is trained by the
command line and then read back by every other command. Every option value appears at least once,
crossed with the others in a covering design rather than the full product (which would take
minutes): each model is trained for one epoch on 240 digits with labels (as 8-bit images for the
likelihoods of 8-bit pixels, whose levels digits / 16 are not), then evaluated, gapped, reported,
sampled, reconstructed and encoded, and each result is checked for sense. Conditional models
(``--conditional``) train on those labels and read every example given its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

import vaelab
from conftest import vaelab_cli
from vaelab.cli import app as cli
from vaelab.components.networks import NETWORKS
from vaelab.model.registry import LATENTS, LIKELIHOODS, POSTERIORS, PRIORS
from vaelab.objectives.bounds import GRADIENTS, OBJECTIVES

# (likelihood, posterior, prior, network, objective, gradient, latent-dim): each value of each
# option at least once, and two stochastic layers (3,2) with every posterior and prior they take.
MATRIX = [
    ("bernoulli", "diagonal", "normal", "mlp", "elbo", "standard", "2"),
    ("continuous-bernoulli", "full", "learnable", "conv", "iwae", "dreg", "2"),
    ("gaussian", "diagonal", "mixture", "conv", "elbo", "stl", "2"),
    ("gaussian-fixed", "full", "vamp", "mlp", "iwae", "standard", "2"),
    ("gaussian-per-dimension", "diagonal", "vamp", "conv", "elbo", "standard", "2"),
    ("gaussian-decoder", "full", "normal", "conv", "elbo", "stl", "2"),
    ("laplace", "diagonal", "learnable", "mlp", "iwae", "stl", "2"),
    ("bernoulli", "full", "mixture", "mlp", "elbo", "standard", "2"),
    ("bernoulli", "planar", "normal", "mlp", "iwae", "dreg", "2"),
    ("gaussian", "iaf", "vamp", "conv", "elbo", "stl", "2"),
    ("laplace", "iaf", "mixture", "mlp", "iwae", "standard", "2"),
    ("continuous-bernoulli", "planar", "learnable", "conv", "elbo", "standard", "2"),
    ("discretized-logistic", "diagonal", "mixture", "conv", "elbo", "standard", "2"),
    ("discretized-logistic-mixture", "full", "normal", "mlp", "iwae", "standard", "2"),
    ("bernoulli", "diagonal", "normal", "mlp", "iwae", "dreg", "3,2"),
    ("gaussian", "full", "mixture", "conv", "elbo", "stl", "3,2"),
    ("laplace", "diagonal", "learnable", "mlp", "elbo", "standard", "3,2"),
]
# Conditional models, --conditional on the digits' labels: the conditional prior p(z|y) with an
# MLP, and p(z) with a convolutional IAF trained on the IWAE bound.
CONDITIONAL = [
    ("bernoulli", "diagonal", "conditional", "mlp", "elbo", "standard", "2"),
    ("gaussian", "iaf", "normal", "conv", "iwae", "dreg", "2"),
]
MATRIX += CONDITIONAL
# Top-down inference (--inference top-down) at 2, 3 and 5 layers, MLP and convolutional, with
# the posterior and priors it takes; their sizes set them apart from the bottom-up rows.
TOP_DOWN = [
    ("bernoulli", "diagonal", "normal", "mlp", "elbo", "standard", "4,3"),
    ("gaussian", "diagonal", "learnable", "conv", "iwae", "dreg", "4,3"),
    ("bernoulli", "diagonal", "learnable", "mlp", "iwae", "dreg", "4,3,2"),
    ("laplace", "diagonal", "normal", "conv", "elbo", "stl", "4,3,2"),
    ("bernoulli", "diagonal", "normal", "mlp", "elbo", "stl", "4,3,2,2,1"),
    ("continuous-bernoulli", "diagonal", "normal", "conv", "elbo", "standard", "4,3,2,2,1"),
]
MATRIX += TOP_DOWN
# Likelihoods of the 256 levels of 8-bit pixels: trained on the digits as uint8 images.
EIGHT_BIT = {"discretized-logistic", "discretized-logistic-mixture"}
IDS = [
    "-".join(row[:-1])
    + ("" if row[-1] == "2" else "-layers-" + row[-1].replace(",", "-"))
    + ("-given-y" if row in CONDITIONAL else "")
    + ("-top-down" if row in TOP_DOWN else "")
    for row in MATRIX
]


# Discrete codes (vaelab.components.discrete), each estimator on a Bernoulli and a categorical
# code: (latent, likelihood, prior, network, objective, gradient, latent-dim). The Gaussian rows
# above cover the reparameterised gradients, these the discrete ones.
DISCRETE = [
    ("bernoulli", "bernoulli", "normal", "mlp", "elbo", "standard", "4"),
    ("bernoulli", "bernoulli", "learnable", "conv", "iwae", "vimco", "4"),
    ("bernoulli", "gaussian", "normal", "mlp", "elbo", "relaxed", "4"),
    ("bernoulli", "bernoulli", "normal", "mlp", "elbo", "enumerate", "4"),
    ("categorical", "bernoulli", "learnable", "mlp", "elbo", "reinforce", "3"),
    ("categorical", "bernoulli", "normal", "mlp", "iwae", "vimco", "3"),
    ("categorical", "continuous-bernoulli", "normal", "conv", "iwae", "relaxed", "3"),
    ("categorical", "bernoulli", "normal", "mlp", "elbo", "enumerate", "3"),
]
DISCRETE_IDS = ["-".join(row[:-1]) for row in DISCRETE]
CATEGORIES = "3"  # classes per group of the categorical rows


def test_the_matrix_covers_every_option():
    columns = (LIKELIHOODS, POSTERIORS, PRIORS, NETWORKS, OBJECTIVES)
    for column, options in enumerate(columns):
        assert {row[column] for row in MATRIX} == set(options)
    gradients = {row[5] for row in MATRIX} | {row[5] for row in DISCRETE}
    assert gradients == set(GRADIENTS)
    assert {row[0] for row in DISCRETE} == set(LATENTS) - {"gaussian"}


def latent_sizes(row: tuple[str, ...]) -> list[int]:
    """The stochastic layers' sizes of a row's --latent-dim."""
    return [int(size) for size in row[-1].split(",")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """240 digits as 8×8 images scaled to [0, 1], with their labels, in one .npz file."""
    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    images = (digits.data[:240] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    np.savez(path, images=images, labels=digits.target[:240])
    return path


@pytest.fixture(scope="module")
def data_8_bit(tmp_path_factory) -> Path:
    """The same 240 digits as uint8 images, 0..16 spread over 0..255 and rounded, which the
    default scaling (--scale auto) divides by 255."""
    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits8.npz"
    images = np.round(digits.data[:240] * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    np.savez(path, images=images, labels=digits.target[:240])
    return path


# The row whose training and estimates take longest (14 s: a convolutional IAF with a VampPrior)
# runs with the slow checks; every option stays in the fast rows too.
SLOW_ROWS = {("gaussian", "iaf", "vamp", "conv", "elbo", "stl", "2")}
ROWS = [pytest.param(row, marks=pytest.mark.slow) if row in SLOW_ROWS else row for row in MATRIX]


def test_the_fast_rows_still_cover_every_option():
    fast = [row for row in MATRIX if row not in SLOW_ROWS]
    columns = (LIKELIHOODS, POSTERIORS, PRIORS, NETWORKS, OBJECTIVES)
    for column, options in enumerate(columns):
        assert {row[column] for row in fast} == set(options)
    assert {row[5] for row in fast} | {row[5] for row in DISCRETE} == set(GRADIENTS)


@pytest.fixture(scope="module", params=ROWS, ids=IDS)
def model(request, data, data_8_bit, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    likelihood, posterior, prior, network, objective, gradient, latent = request.param
    folder = tmp_path_factory.mktemp("runs") / "model"
    source = data_8_bit if likelihood in EIGHT_BIT else data
    argv = [
        "train", str(source), "--out", str(folder), "--quiet", "--epochs", "1",
        "--likelihood", likelihood, "--posterior", posterior, "--prior", prior,
        "--network", network, "--hidden", "16", "--latent-dim", latent, "--batch-size", "40",
        "--objective", objective, "--gradient", gradient, "--flow-steps", "2",
    ]  # fmt: skip
    if objective == "iwae":
        argv += ["--k", "3"]
    if request.param in CONDITIONAL:
        argv += ["--conditional"]
    if request.param in TOP_DOWN:
        argv += ["--inference", "top-down"]
    assert cli.main(argv) == 0
    return folder, request.param


def test_train_writes_a_model_that_loads_as_configured(model, capsys):
    folder, (likelihood, posterior, prior, network, objective, gradient, latent) = model
    loaded = vaelab.load(folder)
    options = ("likelihood", "posterior", "prior", "network", "objective", "gradient")
    assert tuple(getattr(loaded, name) for name in options) == model[1][:-1]
    assert loaded.conditional == (model[1] in CONDITIONAL)
    assert loaded.inference == ("top-down" if model[1] in TOP_DOWN else "bottom-up")
    if loaded.conditional:  # one-hot over the labels of the data
        assert list(loaded.classes_) == list(range(10)) and loaded.model_.condition_dim == 10
    sizes = latent_sizes(model[1])
    assert loaded.model_.latent_sizes == tuple(sizes)
    assert loaded.latent_dim == (sizes[0] if len(sizes) == 1 else tuple(sizes))
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and math.isfinite(history[0]["elbo"])
    if objective == "iwae":  # the bound trained on, above the ELBO of the same draws
        assert history[0]["iwae"] >= history[0]["elbo"]


def test_evaluate(model, capsys):
    folder, (likelihood, *_) = model
    sizes = latent_sizes(model[1])
    code, out, err = vaelab_cli(capsys, "evaluate", folder, "--k", "20", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["split"] == "test split" and result["count"] == 24
    assert math.isfinite(result["elbo"]) and result["elbo_standard_error"] > 0
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"])
    # IWAE-20 ≥ ELBO in expectation; a Monte Carlo KL may dip slightly below 0 near q = p.
    assert result["iwae"]["mean"] > result["elbo"] - 1.0 and result["kl"] > -1.0
    diagnostics = result["diagnostics"]
    assert 0 <= diagnostics["active_units"] <= sum(sizes) == diagnostics["latent_dim"]
    # Counted per stochastic layer, as Burda et al. (2016) report them.
    assert diagnostics["latent_sizes"] == sizes
    per_layer = diagnostics["active_units_per_layer"]
    assert len(per_layer) == len(sizes) and sum(per_layer) == diagnostics["active_units"]
    beyond = diagnostics["active_units_beyond_layer_above"]
    if len(sizes) == 1:
        assert beyond is None
    else:  # every layer but the top one also counts what the layer above does not explain
        assert len(beyond) == len(sizes) and beyond[-1] == per_layer[-1]
        assert all(0 <= n <= d for n, d in zip(beyond, sizes, strict=True))
    # Î(x; z) lies in [0, log N] up to Monte Carlo noise (vaelab.evaluation.diagnostics); an IAF's is left
    # out by default (N² sequential inverses), and says so.
    information = diagnostics["mutual_information"]
    if information is None:
        assert "sequential inverse" in diagnostics["mutual_information_note"]
    else:
        assert -0.05 <= information["mean"] <= math.log(24) + 0.05
    if likelihood in EIGHT_BIT:  # probabilities of the pixel levels: bits per dimension
        iwae = result["iwae"]
        assert iwae["bits_per_dim"] == pytest.approx(-iwae["mean"] / (64 * math.log(2)))


def test_gap(model, capsys):
    folder, (_, posterior, *_) = model
    code, out, err = vaelab_cli(
        capsys, "gap", folder, "--n", "6", "--k", "50", "--steps", "10", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    expected = {"diagonal": ["diagonal", "full"], "full": ["full"]}.get(posterior, [posterior])
    if model[1] in TOP_DOWN:  # each example's bottom-up evidence, the prior's networks kept
        expected = ["top-down"]
    assert list(result["families"]) == expected
    for found in result["families"].values():
        assert all(math.isfinite(found[name]["mean"]) for name in ("log_px", "elbo_optimal"))
        # q* starts at the amortised q and climbs: its ELBO is not worse (Monte Carlo slack).
        assert found["elbo_optimal"]["mean"] > found["elbo_amortised"]["mean"] - 0.5


def test_report(model, capsys, tmp_path):
    folder, _ = model
    out = tmp_path / "report.html"
    budget = ["--k", "10", "--iwae-examples", "12", "--gap-examples", "3", "--gap-steps", "3"]
    code, _, err = vaelab_cli(capsys, "report", folder, *budget, "--gap-k", "10", "-o", out)
    assert code == 0, err
    html = out.read_text()
    for section in ("Metrics", "Samples", "Reconstructions", "Latent space", "IWAE-10"):
        assert section in html, section
    assert "nan" not in html.split("<table")[1].split("</table>")[0].lower()  # the metrics
    if len(latent_sizes(model[1])) > 1:  # active units of each stochastic layer
        assert "active units (z1)" in html and "active units (z2)" in html
        assert "active units (z1) beyond z2" in html
    if model[1] in CONDITIONAL:  # a row of samples per class
        assert [html.count(f'alt="samples of {c}"') for c in range(10)] == [1] * 10
        assert 'id="latent-class"' in html  # and the explorer's class selector
    assert 'id="latent-map"' in html and 'id="latent-decoded"' in html  # every family explored


def test_sample_reconstruct_encode(model, capsys, tmp_path):
    folder, _ = model
    label = ["--label", "3"] if model[1] in CONDITIONAL else []
    assert (
        vaelab_cli(capsys, "sample", folder, "-n", "5", *label, "--out", tmp_path / "s.npy")[0] == 0
    )
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (5, 1, 8, 8) and np.isfinite(samples).all()
    assert (
        vaelab_cli(capsys, "sample", folder, "-n", "4", *label, "--out", tmp_path / "s.png")[0] == 0
    )
    code, out, err = vaelab_cli(
        capsys, "reconstruct", folder, "-n", "4", "--out", tmp_path / "r.npy"
    )
    assert code == 0, err
    pairs = np.load(tmp_path / "r.npy")
    assert pairs.shape == (2, 4, 1, 8, 8) and np.isfinite(pairs).all()
    code, out, err = vaelab_cli(capsys, "encode", folder, "--out", tmp_path / "z.npy")
    assert code == 0 and "test split, 24 examples" in out, err
    codes = np.load(tmp_path / "z.npy")
    assert codes.shape == (24, sum(latent_sizes(model[1]))) and np.isfinite(codes).all()


# --------------------------------------------------------------------------- discrete codes


@pytest.fixture(scope="module", params=DISCRETE, ids=DISCRETE_IDS)
def discrete_model(request, data, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    latent, likelihood, prior, network, objective, gradient, size = request.param
    folder = tmp_path_factory.mktemp("runs") / "model"
    argv = [
        "train", str(data), "--out", str(folder), "--quiet", "--epochs", "1",
        "--latent", latent, "--categories", CATEGORIES, "--likelihood", likelihood,
        "--prior", prior, "--network", network, "--hidden", "16", "--latent-dim", size,
        "--batch-size", "40", "--objective", objective, "--gradient", gradient,
    ]  # fmt: skip
    if objective == "iwae":
        argv += ["--k", "3"]
    if gradient == "relaxed":
        argv += ["--temperature", "1.0", "--temperature-final", "0.5", "--straight-through"]
    assert cli.main(argv) == 0
    return folder, request.param


def code_size(row: tuple[str, ...]) -> int:
    return int(row[-1]) * (int(CATEGORIES) if row[0] == "categorical" else 1)


def test_a_discrete_model_trains_loads_and_evaluates_exactly(discrete_model, capsys):
    folder, row = discrete_model
    loaded = vaelab.load(folder)
    assert (loaded.latent, loaded.gradient) == (row[0], row[5])
    assert loaded.model_.latent_dim == code_size(row)
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(history[0]["elbo"])  # the discrete model's, also for a relaxed run
    code, out, err = vaelab_cli(capsys, "evaluate", folder, "--k", "20", "--exact", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"])
    exact = result["exact"]
    assert exact["states"] == (2 ** int(row[-1]) if row[0] == "bernoulli" else 3 ** int(row[-1]))
    # ELBO ≤ IWAE-20 ≤ log p(x) up to Monte Carlo noise; the KL is exact (closed form) and ≥ 0.
    assert result["elbo"] - 0.5 < result["iwae"]["mean"] < exact["mean"] + 0.5
    assert result["kl"] >= 0 and result["diagnostics"]["latent_dim"] == code_size(row)


def test_a_discrete_model_reports_samples_reconstructs_and_encodes(
    discrete_model, capsys, tmp_path
):
    folder, row = discrete_model
    out = tmp_path / "report.html"
    budget = ["--k", "10", "--iwae-examples", "12", "--gap-examples", "3", "--gap-steps", "3"]
    code, _, err = vaelab_cli(capsys, "report", folder, *budget, "--gap-k", "10", "-o", out)
    assert code == 0, err
    assert "IWAE-10" in out.read_text()
    assert vaelab_cli(capsys, "sample", folder, "-n", "5", "--out", tmp_path / "s.npy")[0] == 0
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()
    code, _, err = vaelab_cli(capsys, "reconstruct", folder, "-n", "4", "--out", tmp_path / "r.npy")
    assert code == 0, err
    code, _, err = vaelab_cli(capsys, "encode", folder, "--out", tmp_path / "z.npy")
    assert code == 0, err
    codes = np.load(tmp_path / "z.npy")  # posterior probabilities, the code's mean
    assert codes.shape == (24, code_size(row)) and ((codes >= 0) & (codes <= 1)).all()
    if row[0] == "categorical":  # each group's probabilities sum to one
        np.testing.assert_allclose(codes.reshape(24, -1, 3).sum(-1), 1.0, rtol=1e-5)


def test_a_discrete_model_refuses_ais_and_the_gaps_in_one_line(discrete_model, capsys):
    folder, _ = discrete_model
    for argv, fragment in (
        (["evaluate", folder, "--ais", "5"], "needs a continuous code"),
        (["gap", folder, "--n", "3", "--k", "10", "--steps", "3"], "exact gap is log p(x) − ELBO"),
    ):
        code, _, err = vaelab_cli(capsys, *argv)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
