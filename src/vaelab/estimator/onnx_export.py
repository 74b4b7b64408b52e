"""A fitted model's encoder and decoder as ONNX graphs, for use outside Python (a web page, a C++
service, a phone) through any ONNX runtime.

``export_onnx(model, folder)`` writes three files:

- ``encoder.onnx``: input ``x [batch, *data_shape]`` (float32, the data as the model reads them),
  outputs ``loc``, the posterior mean E_q[z|x] that ``VAE.transform`` returns, then the
  posterior's other parameters (``log_var`` of the diagonal Gaussian, ``scale_tril`` of the
  full-covariance one);
- ``decoder.onnx``: input ``z [batch, latent]``, outputs ``mean``, the decoder mean E[x|z] that
  ``VAE.inverse_transform`` returns, then the likelihood's parameters (``logits`` of the
  Bernoulli, ``loc`` and ``scale`` of the Gaussian, …);
- ``vaelab-onnx.json``: every input and output with its shape (``"batch"`` for the free batch
  dimension) and what it means, the model's configuration and, for a conditional model trained on
  class labels, the classes in the order of the one-hot columns.

A conditional model's graphs take one more input, ``y [batch, c]``, the condition (one-hot rows
of ``classes`` for labels). The names ``encoder.onnx``, ``decoder.onnx``, ``x``, ``z``, ``y``,
``loc`` and ``mean`` are fixed: scripts outside vaelab rely on them.

Which outputs a distribution gives is one table per side (``POSTERIOR_OUTPUTS``,
``LIKELIHOOD_OUTPUTS``, keyed by the distribution's type), extended by registering. A posterior
without a closed-form mean is refused in one line naming it and why (``REFUSED_POSTERIORS``):
a flow's E_q[z|x] is a Monte Carlo average of draws keyed by each example, and so are the codes
of z₂, … of several stochastic layers; no graph of x alone gives what ``transform`` returns.

Every refusal comes before anything is written; both graphs are built in memory, then each file
is replaced atomically, the JSON last, so a folder whose JSON is present holds graphs of the
model it describes.

The graphs come from torch's ``torch.export``-based exporter (``torch.onnx.export(...,
dynamo=True)``, which needs ``onnx`` and ``onnxscript``), with the batch dimension dynamic. Those
packages are the optional extra ``vaelab[export]`` and are imported only here, when exporting.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Laplace,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from vaelab.components.flows import IAFPosterior, PlanarFlowPosterior
from vaelab.components.hierarchy import HierarchicalPosterior
from vaelab.components.top_down import TopDownPosterior
from vaelab.distributions.discrete import BernoulliCode, OneHotCategoricalGroups
from vaelab.distributions.discretized_logistic import DiscretizedLogistic
from vaelab.distributions.normal import DiagonalNormal
from vaelab.io.files import atomic_write_bytes
from vaelab.model.registry import ModelConfig
from vaelab.model.vae_model import VAEModel

__all__ = [
    "DECODER_FILE",
    "ENCODER_FILE",
    "LIKELIHOOD_OUTPUTS",
    "MANIFEST_FILE",
    "POSTERIOR_OUTPUTS",
    "REFUSED_POSTERIORS",
    "ExportDependencyError",
    "OnnxExport",
    "OnnxGraph",
    "OnnxTensor",
    "decoder_outputs",
    "encoder_outputs",
    "export_onnx",
]

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "vaelab-onnx.json"
MANIFEST_FORMAT = "vaelab-onnx"
MANIFEST_VERSION = 1
OPSET = 18  # the exporter's own default in torch 2.13; onnxruntime ≥ 1.16 runs it
BATCH = "batch"  # the name of the free batch dimension, in the graphs and the JSON
# What the exporter needs beside torch, and the module each package installs.
EXPORT_PACKAGES = {"onnx": "onnx", "onnxscript": "onnxscript"}
EXTRA = "pip install vaelab[export]"


class ExportDependencyError(ImportError):
    """The optional packages of ONNX export are missing; the message says how to install them."""


@dataclass(frozen=True)
class OnnxTensor:
    """One input or output of a graph: its name, its shape (``"batch"`` for the free batch
    dimension) and what it is, in words."""

    name: str
    shape: tuple[int | str, ...]
    meaning: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": "float32",
            "meaning": self.meaning,
        }


@dataclass(frozen=True)
class OnnxGraph:
    """One exported graph: its file (in the export's folder), inputs and outputs in order."""

    file: str
    inputs: tuple[OnnxTensor, ...]
    outputs: tuple[OnnxTensor, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote: the folder, the two graphs and the JSON that describes them."""

    folder: Path
    encoder: OnnxGraph
    decoder: OnnxGraph
    manifest: Path


# An output of a graph: its name, its value on the example inputs, and its meaning.
Output = tuple[str, torch.Tensor, str]

LOC_MEANING = "the posterior mean E_q[z|x], what VAE.transform returns"
MEAN_MEANING = "the decoder mean E[x|z], what VAE.inverse_transform returns"
X_MEANING = "examples as the model was fitted on them (a run records its scaling in vaelab.json)"


def _diagonal_gaussian(q: Distribution) -> list[Output]:
    assert isinstance(q, DiagonalNormal)
    return [
        ("loc", q.mean, LOC_MEANING),
        ("log_var", q.log_var, "log σ² of q(z|x) = N(loc, diag σ²), per latent unit"),
    ]


def _full_gaussian(q: Distribution) -> list[Output]:
    assert isinstance(q, MultivariateNormal)
    return [
        ("loc", q.loc, LOC_MEANING),
        (
            "scale_tril",
            q.scale_tril,
            "the Cholesky factor L of q(z|x) = N(loc, L Lᵀ): lower triangular, positive diagonal",
        ),
    ]


def _bernoulli_code(q: Distribution) -> list[Output]:
    assert isinstance(q, BernoulliCode)
    return [
        ("loc", q.mean, f"{LOC_MEANING}: each binary unit's probability σ(l)"),
        ("logits", q.logits, "logits l of q(z|x) = Πⱼ Bernoulli(σ(lⱼ)), per latent unit"),
    ]


def _categorical_groups(q: Distribution) -> list[Output]:
    assert isinstance(q, OneHotCategoricalGroups)
    return [
        ("loc", q.mean, f"{LOC_MEANING}: each group's class probabilities, groups laid flat"),
        ("log_probs", q.logits.flatten(-2), "log softmax of each group's logits, laid flat"),
    ]


# The posterior's distribution type → its outputs, ``loc`` (E_q[z|x]) first.
POSTERIOR_OUTPUTS: dict[type[Distribution], Callable[[Distribution], list[Output]]] = {
    DiagonalNormal: _diagonal_gaussian,
    MultivariateNormal: _full_gaussian,
    BernoulliCode: _bernoulli_code,
    OneHotCategoricalGroups: _categorical_groups,
}

_NO_CLOSED_MEAN = (
    "has no closed-form mean E_q[z|x]: VAE.transform averages draws keyed by each example, "
    "which no graph of x reproduces; export a model with posterior='diagonal' or 'full'"
)
# Posterior modules that cannot be exported, and why (in one line).
REFUSED_POSTERIORS: dict[type[nn.Module], str] = {
    PlanarFlowPosterior: f"a planar flow posterior {_NO_CLOSED_MEAN}",
    IAFPosterior: f"an inverse autoregressive flow posterior {_NO_CLOSED_MEAN}",
    HierarchicalPosterior: (
        "a posterior over several stochastic layers has no closed-form mean of z₂, …: "
        "VAE.transform averages draws keyed by each example, which no graph of x reproduces; "
        "export a model with one latent size"
    ),
    TopDownPosterior: (
        "a top-down posterior (inference='top-down') has no closed-form mean: each layer is "
        "drawn through the prior's networks at the layer above, and VAE.transform averages "
        "draws keyed by each example; export a bottom-up model with one latent size"
    ),
}


def _bernoulli(p: Distribution) -> list[Output]:
    assert isinstance(p, Bernoulli)
    return [("logits", p.logits, "logits l of each dimension's Bernoulli: P(x = 1|z) = σ(l)")]


def _continuous_bernoulli(p: Distribution) -> list[Output]:
    assert isinstance(p, ContinuousBernoulli)
    return [
        (
            "logits",
            p.logits,
            "logits l of each dimension's continuous Bernoulli on [0, 1], "
            "p(x|z) = C(λ) λ^x (1 − λ)^(1−x) with λ = σ(l)",
        )
    ]


def _normal(p: Distribution) -> list[Output]:
    assert isinstance(p, Normal)
    return [
        ("loc", p.loc, "μ of each dimension's Gaussian N(μ, σ²)"),
        ("scale", p.scale, "σ of each dimension's Gaussian N(μ, σ²)"),
    ]


def _laplace(p: Distribution) -> list[Output]:
    assert isinstance(p, Laplace)
    return [
        ("loc", p.loc, "location μ of each dimension's Laplace, exp(−|x − μ| / b) / 2b"),
        ("scale", p.scale, "scale b of each dimension's Laplace"),
    ]


def _discretized_logistic(p: Distribution) -> list[Output]:
    assert isinstance(p, DiscretizedLogistic)
    levels = f"the {p.levels} levels kΔ, Δ = {p.bin_width:.10g}"
    return [
        ("loc", p.loc, f"location μ of each pixel's logistic, rounded to {levels}"),
        ("log_scale", p.log_scale, "log s of each pixel's logistic (s its scale)"),
    ]


def _mixture(p: Distribution) -> list[Output]:
    assert isinstance(p, MixtureSameFamily)
    mixing = p.mixture_distribution
    weights = (
        "logits",
        mixing.logits,
        "log mixture weights of each dimension's components (log-softmax normalised), "
        "the components last",
    )
    return [weights, *_likelihood_outputs(p.component_distribution, "each component's ")]


# The likelihood's per-dimension distribution type → its parameters as outputs.
LIKELIHOOD_OUTPUTS: dict[type[Distribution], Callable[[Distribution], list[Output]]] = {
    Bernoulli: _bernoulli,
    ContinuousBernoulli: _continuous_bernoulli,
    Normal: _normal,
    Laplace: _laplace,
    DiscretizedLogistic: _discretized_logistic,
    MixtureSameFamily: _mixture,
}


def _registered(
    table: dict[type[Distribution], Callable[[Distribution], list[Output]]], found: Distribution
) -> Callable[[Distribution], list[Output]] | None:
    """The entry of ``found``'s type, or of the nearest base class that has one."""
    return next((table[cls] for cls in type(found).__mro__ if cls in table), None)


def _likelihood_outputs(p: Distribution, prefix: str = "") -> list[Output]:
    read = _registered(LIKELIHOOD_OUTPUTS, p)
    if read is None:
        raise ValueError(
            f"the likelihood's distribution {type(p).__name__} has no ONNX outputs registered "
            "(vaelab.estimator.onnx_export.LIKELIHOOD_OUTPUTS)"
        )
    return [
        (name, value, prefix + meaning if prefix else meaning) for name, value, meaning in read(p)
    ]


class _Encoder(nn.Module):
    """x (and y) → the posterior's outputs, ``loc`` first."""

    def __init__(self, model: VAEModel) -> None:
        super().__init__()
        self.posterior = model.posterior

    def outputs(self, x: torch.Tensor, y: torch.Tensor | None = None) -> list[Output]:
        q = self.posterior(x) if y is None else self.posterior(x, y)
        read = _registered(POSTERIOR_OUTPUTS, q)
        if read is None:
            raise ValueError(
                f"the posterior {type(self.posterior).__name__} gives {type(q).__name__}, which "
                "has no ONNX outputs registered (vaelab.estimator.onnx_export.POSTERIOR_OUTPUTS)"
            )
        return read(q)

    def forward(
        self, data: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        return tuple(value for _, value, _ in self.outputs(data, condition))


class _Decoder(nn.Module):
    """z (and y) → ``mean`` and the likelihood's parameters, from one pass of the decoder."""

    def __init__(self, model: VAEModel) -> None:
        super().__init__()
        self.likelihood = model.likelihood

    def outputs(self, z: torch.Tensor, y: torch.Tensor | None = None) -> list[Output]:
        # Likelihood.forward is Independent(distribution(decoder_params)), whose mean is the
        # per-dimension distribution's: what Likelihood.mean, and so inverse_transform, returns.
        p = self.likelihood.distribution(self.likelihood.decoder_params(z, y))
        return [("mean", p.mean, MEAN_MEANING), *_likelihood_outputs(p)]

    def forward(
        self, data: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        return tuple(value for _, value, _ in self.outputs(data, condition))


@torch.no_grad()
def encoder_outputs(
    model: VAEModel, x: torch.Tensor, condition: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What ``encoder.onnx`` computes, computed by torch: output name → ``[batch, …]``."""
    return {name: value for name, value, _ in _Encoder(model).outputs(x, condition)}


@torch.no_grad()
def decoder_outputs(
    model: VAEModel, z: torch.Tensor, condition: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What ``decoder.onnx`` computes, computed by torch: output name → ``[batch, …]``."""
    return {name: value for name, value, _ in _Decoder(model).outputs(z, condition)}


def require_export_packages() -> None:
    """Refuse in one line when the optional packages of ONNX export are missing."""
    missing = [
        pkg for pkg, module in EXPORT_PACKAGES.items() if not importlib.util.find_spec(module)
    ]
    if missing:
        raise ExportDependencyError(
            f"ONNX export needs the package(s) {', '.join(missing)}, not installed here: {EXTRA}"
        )


def refusal(model: VAEModel) -> str | None:
    """Why ``model`` cannot be exported, in one line, or ``None`` when it can."""
    return REFUSED_POSTERIORS.get(type(model.posterior))


def export_onnx(
    model: VAEModel,
    folder: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    classes: np.ndarray | None = None,
) -> OnnxExport:
    """Write ``model``'s encoder and decoder to ``folder`` as ONNX graphs with their JSON (see
    the module docstring); ``config`` and ``classes`` (a conditional model's labels, column j of
    the one-hot for ``classes[j]``) are recorded in the JSON. The folder is created if needed
    and may hold other files; the three files are replaced whole.

    Raises ``ValueError`` in one line for a model with a component that cannot be exported, or
    a ``folder`` that is a file, and ``ExportDependencyError`` without the packages of
    ``vaelab[export]``; nothing is written then."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; ONNX export writes a folder, give a folder path")
    reason = refusal(model)
    if reason is not None:
        raise ValueError(f"cannot export this model to ONNX: {reason}")
    require_export_packages()

    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    data_shape = tuple(model.likelihood.data_shape)
    condition_dim = int(model.condition_dim)
    example_batch = 3  # not 0 or 1, which torch.export would read as constants
    x = torch.zeros(example_batch, *data_shape)
    z = torch.zeros(example_batch, model.latent_dim)
    y = torch.zeros(example_batch, condition_dim)
    if condition_dim:
        y[:, 0] = 1.0
    y_input = (
        (OnnxTensor("y", (BATCH, condition_dim), _condition_meaning(classes)),)
        if condition_dim
        else ()
    )
    conditioned = (y,) if condition_dim else ()

    encoder, encoder_bytes = _export(
        _Encoder(model),
        (x, *conditioned),
        (OnnxTensor("x", (BATCH, *data_shape), X_MEANING), *y_input),
        ENCODER_FILE,
    )
    decoder, decoder_bytes = _export(
        _Decoder(model),
        (z, *conditioned),
        (OnnxTensor("z", (BATCH, model.latent_dim), "latent codes"), *y_input),
        DECODER_FILE,
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "opset": OPSET,
        "model": None if config is None else config.to_json(),
        "classes": None if classes is None else np.asarray(classes).tolist(),
        "encoder": encoder.to_json(),
        "decoder": decoder.to_json(),
    }
    out.mkdir(parents=True, exist_ok=True)
    # An earlier export's JSON goes first: while the graphs are replaced, no JSON describes them.
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    atomic_write_bytes(out / ENCODER_FILE, encoder_bytes)
    atomic_write_bytes(out / DECODER_FILE, decoder_bytes)
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    manifest_path = atomic_write_bytes(out / MANIFEST_FILE, text.encode())
    return OnnxExport(out, encoder, decoder, manifest_path)


def _condition_meaning(classes: np.ndarray | None) -> str:
    if classes is None:
        return "the condition of each example (the vectors the model was trained with)"
    return "the condition of each example: one-hot rows over the classes, column j for classes[j]"


def _export(
    graph: _Encoder | _Decoder,
    inputs: tuple[torch.Tensor, ...],
    described: tuple[OnnxTensor, ...],
    file: str,
) -> tuple[OnnxGraph, bytes]:
    """``graph`` exported with a dynamic batch dimension: its description and its bytes."""
    with _quiet_export(), torch.no_grad():
        found = graph.outputs(*inputs)
        outputs = tuple(
            OnnxTensor(name, (BATCH, *value.shape[1:]), meaning) for name, value, meaning in found
        )
        batch = torch.export.Dim(BATCH, min=1)
        try:
            program = torch.onnx.export(
                graph,
                inputs,
                input_names=[t.name for t in described],
                output_names=[t.name for t in outputs],
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as error:  # torch.export's errors have no common base class
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"cannot export this model's {file} to ONNX: torch.onnx.export failed ({first})"
            ) from error
    assert program is not None
    return OnnxGraph(file, described, outputs), program.model_proto.SerializeToString()


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporter without its chatter, and torch.distributions without argument validation.

    Validation checks each parameter against its constraint with a Python ``if`` on the
    values, which ``torch.export`` cannot trace; the model's own components build their
    distributions unvalidated already, apart from the full-covariance posterior's
    ``MultivariateNormal``. The exporter's warnings are about its own internals, not the model."""
    validate = Distribution._validate_args
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    Distribution.set_default_validate_args(False)
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed", which it needs not
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        Distribution.set_default_validate_args(validate)
        exporter_log.setLevel(level)
