"""What ``vaelab report`` says about a trained model: numbers, curves and pictures gathered from a
model folder into a ``vaelab.report.html.ReportContent``, which ``vaelab.report.html`` renders as one HTML file.

Every number comes from the library's own estimators (``vaelab.runs.evaluate`` for the ELBO,
IWAE-k and collapse diagnostics, ``vaelab.runs.inference_gaps`` for the inference gaps), so the report and
the command line never disagree.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaelab.report import figures
from vaelab.report.explorer import LatentExplorer, latent_explorer
from vaelab.report.html import LatentScatter, Metric, ReportContent, write_report
from vaelab.runs.evaluate import Evaluation, evaluate
from vaelab.runs.inference_gaps import GapEvaluation, gap
from vaelab.runs.model_data import (
    ModelData,
    OpenedModel,
    load_examples,
    model_data,
    open_model,
    output_path,
)
from vaelab.runs.options import ParameterError, check_at_least
from vaelab.runs.outputs import class_names

REPORT_FILE = "report.html"
SCATTER_POINTS = 2000


def _history(folder: Path) -> list[dict[str, Any]]:
    """The epochs of ``metrics.jsonl`` (a ``vaelab train`` run), else none."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _survival(history: list[dict[str, Any]]) -> list[Metric]:
    """The training's skipped updates and rollbacks (``TrainConfig.skip_grad_norm``,
    ``max_rollbacks``), summed over its epochs; none for a run without a history."""
    if not history:
        return []
    skipped = sum(m.get("skipped_updates", 0) for m in history)
    rollbacks = sum(m.get("rollbacks", 0) for m in history)
    return [
        Metric("skipped updates", skipped, "training updates skipped for their gradient norm"),
        Metric("rollbacks", rollbacks, "non-finite losses survived by a return to an epoch end"),
    ]


def _curves(history: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Training curves from the epochs of ``metrics.jsonl``, else none."""
    if not history:
        return {}
    epochs = [float(m["epoch"]) for m in history]
    elbo: dict[str, tuple[list[float], list[float]]] = {
        "train": (epochs, [m["elbo"] for m in history])
    }
    if any(m.get("iwae") is not None for m in history):
        iwae = [m.get("iwae") for m in history]
        elbo["train (IWAE bound)"] = (epochs, [float("nan") if v is None else v for v in iwae])
    if any(m.get("valid_elbo") is not None for m in history):
        valid = [m.get("valid_elbo") for m in history]
        elbo["validation"] = (epochs, [float("nan") if v is None else v for v in valid])
    return {
        "ELBO per epoch (nats/example)": elbo,
        "KL per epoch (nats/example)": {
            "KL": (epochs, [m["kl"] for m in history]),
        },
        **_layer_curves(epochs, history),
        "learning rate": {"lr": (epochs, [m["lr"] for m in history])},
    }


def _layer_curves(
    epochs: list[float], history: list[dict[str, Any]]
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """A chart of each stochastic layer's KL per epoch, for a model with several layers."""
    layers = max((len(m.get("kl_per_layer") or []) for m in history), default=0)
    if layers < 2:
        return {}
    series = {}
    for layer in range(layers):
        values = [
            m["kl_per_layer"][layer] if len(m.get("kl_per_layer") or []) > layer else math.nan
            for m in history
        ]
        series[f"z{layer + 1}"] = (epochs, values)
    return {"KL per layer per epoch (nats/example)": series}


def _metrics(evaluation: Evaluation, gaps: GapEvaluation | None) -> list[Metric]:
    elbo = evaluation.elbo
    n = elbo.examples
    rows = [
        Metric(
            "ELBO",
            elbo.elbo,
            f"± {elbo.standard_error:.3f}; lower bound on log p(x), nats/example, "
            f"{n:,} examples ({evaluation.split})",
        ),
        Metric("reconstruction", elbo.reconstruction, "E_q[log p(x|z)], nats/example"),
        Metric("KL", elbo.kl, "KL(q(z|x) ‖ p(z)), nats/example (the rate)"),
    ]
    iwae = evaluation.iwae
    if iwae is not None:
        note = (
            f"± {iwae.standard_error:.3f}; importance-weighted bound, nats/example, on a "
            f"random {iwae.examples:,} of the {n:,} examples"
        )
        rows.append(Metric(iwae.bound, iwae.mean, note))
        if iwae.bits_per_dim is not None:
            rows.append(Metric("bits per dimension", iwae.bits_per_dim, f"from {iwae.bound}"))
        else:
            rows.append(Metric("bits per dimension", None, iwae.bits_per_dim_note or ""))
    found = evaluation.diagnostics
    if found is not None:
        threshold = f"{found.threshold:g}"
        rows.append(
            Metric(
                "active units",
                found.active_units,
                f"of {int(found.activity.numel())} (Cov_x E_q[z_u] > {threshold})",
            )
        )
        sizes = list(found.layer_sizes)
        if len(sizes) > 1:  # several stochastic layers: each one's count (Burda et al. 2016)
            for layer, (count, size) in enumerate(
                zip(found.active_units_per_layer, sizes, strict=True), 1
            ):
                rows.append(Metric(f"active units (z{layer})", count, f"of {size}"))
            kls = [] if found.kl_per_layer is None else found.kl_per_layer.tolist()
            for layer, (kl, collapsed) in enumerate(
                zip(kls, found.collapsed_layers, strict=False), 1
            ):
                note = "collapsed onto its prior" if collapsed else "nats/example"
                rows.append(Metric(f"KL (z{layer})", kl, note))
            beyond = found.active_units_beyond_layer_above or []
            for layer, count in enumerate(beyond[:-1], 1):
                rows.append(
                    Metric(
                        f"active units (z{layer}) beyond z{layer + 1}",
                        count,
                        f"Var_x E_q[z{layer} − mean of p(z{layer}|z{layer + 1})] > {threshold}",
                    )
                )
        mi = found.mutual_information
        if mi is None:
            rows.append(Metric("I(x; z)", None, found.mutual_information_note or ""))
        else:
            rows.append(
                Metric(
                    "I(x; z)",
                    mi.value,
                    f"± {mi.standard_error:.3f} nats, aggregate posterior over "
                    f"{mi.examples:,} examples (at most log N = {mi.upper_bound:.2f})",
                )
            )
    for family, found_gap in ({} if gaps is None else gaps.families).items():
        summary = found_gap.summary()
        for name in ("approximation_gap", "amortisation_gap"):
            mean, error = summary[name]
            rows.append(
                Metric(
                    f"{name.replace('_', ' ')} ({family})",
                    mean,
                    f"± {error:.3f} nats, {int(found_gap.log_px.numel())} examples",
                )
            )
    return rows


@dataclass(frozen=True)
class ReportBudget:
    """How much estimation the report does. The defaults finish in about a minute on 10,000
    MNIST test images on two CPU cores: the ELBO and the diagnostics on every example, IWAE-k on
    a random subset (its standard error says how far that mean may be from all examples'), the
    inference gaps on a smaller one; the latent explorer decodes its grids and traversals around
    ``explorer_examples`` training examples (their thumbnails travel in the page). ``k=0``,
    ``gap_examples=0`` or ``explorer_examples=0`` leaves that part out; ``iwae_examples=None``
    runs IWAE on every example."""

    k: int = 1000
    iwae_examples: int | None = 1000
    gap_examples: int = 100
    gap_steps: int = 300
    gap_k: int = 1000
    explorer_examples: int = 300

    def validate(self) -> None:
        """Refuse a budget that cannot be spent, naming the field."""
        for name in ("k", "gap_examples", "explorer_examples"):
            if getattr(self, name) < 0:
                raise ParameterError(name, "must not be negative (0 leaves it out)")
        check_at_least(gap_steps=(self.gap_steps, 1), gap_k=(self.gap_k, 1))
        if self.iwae_examples is not None and self.iwae_examples < 1:
            raise ParameterError("iwae_examples", "must be at least 1 (or 'all')")
        if self.gap_examples == 1:
            raise ParameterError("gap_examples", "must be 0 (no gaps) or at least 2")


def build_report(
    folder: str | os.PathLike[str],
    data: str | None = None,
    data_dir: str | None = None,
    budget: ReportBudget | None = None,
    split: str | None = None,
    device: str | None = None,
    progress: bool = False,
) -> ReportContent:
    """The report of the model in ``folder`` on its test data (or ``data`` / ``split``):
    metrics (ELBO, IWAE-k, inference gaps, active units), training curves, samples,
    reconstructions, the latent space and its explorer, interpolations and the KL per
    dimension, within ``budget``."""
    budget = budget or ReportBudget()
    budget.validate()
    folder = Path(folder)
    opened = open_model(folder, device)  # once: every part of the report reads this one
    estimator, document = opened.estimator, opened.document
    examples = model_data(opened, data, data_dir, split)
    evaluation = evaluate(
        opened,
        examples,
        k=budget.k if budget.k > 0 else None,
        iwae_examples=budget.iwae_examples,
        progress=progress,
    )
    assert evaluation is not None  # one process: the result is here
    gaps = None
    # The gaps fit continuous families (a discrete code's exact gap is evaluate --exact's).
    if budget.gap_examples > 0 and estimator.model_config_.latent == "gaussian":
        gaps = gap(
            opened,
            examples.subset(budget.gap_examples),
            k=budget.gap_k,
            steps=budget.gap_steps,
            progress=progress,
        )
    shown = examples.subset(SCATTER_POINTS)
    x = load_examples(shown).numpy()
    labels = shown.split.labels
    labels = None if labels is None else np.asarray(labels)
    conditional = bool(estimator.model_.condition_dim)
    # A conditional model reads each example given its label: the same labels go with x.
    y = labels if conditional else None
    points, axes = figures.latent_scatter(estimator, x, y)
    names = class_names(estimator, document) if conditional else None
    legend = labels
    if names is not None and labels is not None:  # the classes' names, not their positions
        legend = np.asarray(names)[np.searchsorted(estimator.classes_, labels)]
    run = document.get("run") or document.get("estimator", {})
    config = {key: value for key, value in run.items() if not isinstance(value, dict)}
    samples: Any = None
    sample_rows = None
    if conditional:
        config["classes"] = names
        found = figures.class_samples(estimator, per_class=8, names=names)
        if found is not None:
            samples, sample_rows = found
    else:
        samples = figures.samples(estimator, 64)
    notes = [
        f"Data: {evaluation.examples_described}. Numbers are nats per example; higher is "
        "better. The ELBO uses the exact KL where a closed form exists and "
        f"{evaluation.elbo.samples} Monte Carlo samples for the reconstruction term.",
    ]
    if conditional:
        notes.append(
            "A conditional VAE (Sohn, Lee & Yan 2015): every number is of log p(x|y), each "
            "example given its own class label y; the samples are a row per class, z ~ p(z|y) "
            "decoded given y; interpolations decode given the first example's class."
        )
    iwae = evaluation.iwae
    if iwae is not None:
        notes.append(
            f"{iwae.bound} (Burda et al. 2016) on a random {iwae.examples:,} of the "
            f"{evaluation.elbo.examples:,} examples (vaelab report --iwae-examples all for every "
            "example)."
        )
        if iwae.bits_per_dim is None:
            notes.append(f"Bits per dimension: {iwae.bits_per_dim_note}.")
    if gaps:
        families = " and ".join(gaps.families)
        notes.append(
            f"Inference gaps (Cremer, Li & Duvenaud 2018) for the {families} famil"
            f"{'ies' if len(gaps.families) > 1 else 'y'} (those containing the amortised "
            f"posterior) on a random {gaps.examples} examples, log p̂(x) by "
            f"{gaps.log_px_method} with k = {budget.gap_k}, q* optimised per example for "
            f"{budget.gap_steps} steps: approximation gap = log p̂(x) − ELBO(q*), amortisation "
            "gap = ELBO(q*) − ELBO(amortised q)."
        )
    history = _history(folder)
    return ReportContent(
        title=f"vaelab report: {folder.name}",
        subtitle=(
            f"{document['model']['likelihood']} likelihood, {document['model']['posterior']} "
            f"posterior, {document['model']['prior']} prior, {_latent_words(document)}"
        ),
        config=config,
        metrics=_metrics(evaluation, gaps) + _survival(history),
        curves=_curves(history),
        samples=samples,
        sample_rows=sample_rows,
        reconstructions=figures.reconstructions(estimator, x[:20], None if y is None else y[:20]),
        latent_scatter=LatentScatter(points, legend, axes),
        explorer=_explorer(opened, examples, data, data_dir, budget.explorer_examples, names),
        manifold=figures.latent_manifold(estimator),
        interpolations=figures.interpolations(estimator, x[:12], y=None if y is None else y[:12]),
        kl_per_dimension=(
            None
            if evaluation.diagnostics is None or evaluation.diagnostics.kl_per_dimension is None
            else evaluation.diagnostics.kl_per_dimension.tolist()
        ),
        notes=notes,
    )


def _explorer(
    opened: OpenedModel,
    examples: ModelData,
    data: str | None,
    data_dir: str | None,
    count: int,
    names: list[str] | None,
) -> LatentExplorer | None:
    """The latent explorer around ``count`` training examples (the model's own training split
    when the report is of its own data, else the report's examples): their neighbours are what
    the model learnt from."""
    if count == 0:
        return None
    around = model_data(opened, None, data_dir, "train") if data is None else examples
    chosen = around.subset(count)
    x = load_examples(chosen).numpy()
    labels = chosen.split.labels
    return latent_explorer(
        opened.estimator,
        x,
        None if labels is None else np.asarray(labels),
        class_names=names,
        examples_described=chosen.description,
    )


def _latent_words(document: dict[str, Any]) -> str:
    """ "latent dimension 8", or for several stochastic layers "stochastic layers z1 (100),
    z2 (50)"."""
    latent = document["model"]["latent_dim"]
    if not isinstance(latent, list) or len(latent) < 2:
        return f"latent dimension {latent}"
    return "stochastic layers " + ", ".join(f"z{i} ({d})" for i, d in enumerate(latent, 1))


def write_model_report(
    folder: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, **options: Any
) -> Path:
    """Write the report of the model in ``folder`` to ``out`` (default ``folder/report.html``).

    A given ``out`` is checked first, as ``vaelab sample`` and ``encode`` check theirs: building
    the report evaluates the model and draws every figure, minutes of work that an output that
    cannot be written would throw away at the end.
    """
    if out is not None:
        output_path(out)
    target = Path(out) if out is not None else Path(folder) / REPORT_FILE
    return write_report(target, build_report(folder, **options))
