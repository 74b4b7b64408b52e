"""How good is a saved model on its data: the ELBO, IWAE-k and AIS estimates of log p(x) and the
posterior-collapse diagnostics, as typed results (``Evaluation``) that ``vaelab evaluate`` and
``vaelab report`` only render.

``evaluate`` takes an opened model and its prepared examples (``vaelab.runs.model_data``); on
several workers (``World``) IWAE and AIS split their batches among them (``estimate_batches``),
which gives every example the very numbers one process gives it. Every number is in nats per
example and names its bound.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from vaelab.estimator.facade import EVAL_SEED
from vaelab.evaluation.ais import ais
from vaelab.evaluation.diagnostics import CollapseDiagnostics, collapse_diagnostics
from vaelab.evaluation.exact import MAX_EXACT_STATES, exact_log_likelihood, state_count
from vaelab.evaluation.loglik import log_likelihood, standard_error
from vaelab.model.semi_supervised import SemiSupervisedModel
from vaelab.runs.model_data import (
    CHUNK,
    Examined,
    ModelData,
    OpenedModel,
    conditions_of,
    labels_of,
    load_examples,
)
from vaelab.runs.options import RunError, check_at_least
from vaelab.train.distributed import SINGLE, World

DIAGNOSTIC_EXAMPLES = 10_000  # collapse diagnostics need the examples in memory at once
ESTIMATE_BATCH = 100  # examples per call of an estimator (log_likelihood's and ais's batch)


@dataclass(frozen=True)
class ElboEstimate:
    """The ELBO averaged over ``examples``: E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)) with ``samples``
    Monte Carlo draws per example for the reconstruction (the KL exact where a closed form
    exists), with the standard error of the mean over examples."""

    elbo: float
    standard_error: float
    reconstruction: float
    kl: float
    samples: int
    examples: int
    bound: str = "ELBO"


@dataclass(frozen=True)
class IwaeEstimate:
    """IWAE-k, log p̂(x) = log (1/k) Σᵢ p(x, zᵢ)/q(zᵢ|x) averaged over ``examples`` (Burda et al.
    2016): a stochastic lower bound on log p(x) that tightens with k. ``bits_per_dim`` is
    −mean / (D log 2) where the likelihood is a probability of the values (a code length); else
    None and ``bits_per_dim_note`` says why."""

    k: int
    examples: int
    mean: float
    standard_error: float
    bits_per_dim: float | None
    bits_per_dim_note: str | None = None

    @property
    def bound(self) -> str:
        return f"IWAE-{self.k}"


@dataclass(frozen=True)
class AisEstimate:
    """AIS with ``steps`` intermediate distributions and ``chains`` chains per example (Neal
    2001; HMC transitions on the sigmoid schedule of Wu et al. 2017): a stochastic lower bound on
    log p(x) that tightens with the steps, averaged over ``examples``."""

    steps: int
    chains: int
    examples: int
    mean: float
    standard_error: float
    mean_effective_sample_size: float
    acceptance_rate: float

    @property
    def bound(self) -> str:
        return f"AIS-{self.steps}"


@dataclass(frozen=True)
class SemiSupervisedEstimate:
    """A semi-supervised model's (M2) numbers on ``examples``: U(x), the bound on log p(x) with
    the label summed out under q(y|x) (Kingma et al. 2014, eq. 7), averaged, with its standard
    error; and the classification error of q(y|x)'s most probable class (None for examples
    without labels)."""

    unlabelled_bound: float
    standard_error: float
    classification_error: float | None
    examples: int
    bound: str = "U(x)"


@dataclass(frozen=True)
class ExactEstimate:
    """log p(x) = log Σ_z p(x|z) p(z) summed over all ``states`` of a discrete code
    (``vaelab.evaluation.exact``): no bound, no estimate; averaged over ``examples``."""

    states: int
    examples: int
    mean: float
    standard_error: float
    seconds: float

    @property
    def bound(self) -> str:
        return "exact"


@dataclass(frozen=True)
class Evaluation(Examined):
    """What ``evaluate`` found about one model on one set of examples. ``per_example`` holds
    each example's float64 numbers (``elbo``, and ``iwae`` / ``ais`` when computed) in the order
    of the examples evaluated."""

    elbo: ElboEstimate
    iwae: IwaeEstimate | None = None
    ais: AisEstimate | None = None
    diagnostics: CollapseDiagnostics | None = None
    diagnostics_examples: int = 0
    per_example: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    semi_supervised: SemiSupervisedEstimate | None = None
    exact: ExactEstimate | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON of ``vaelab evaluate --json`` (field names kept from vaelab 0.1)."""
        found: dict[str, Any] = {
            "data": self.data,
            "split": self.split,
            "examples_described": self.examples_described,
            "count": self.elbo.examples,
            "elbo": self.elbo.elbo,
            "elbo_standard_error": self.elbo.standard_error,
            "reconstruction": self.elbo.reconstruction,
            "kl": self.elbo.kl,
            "samples": self.elbo.samples,
            "bound": self.elbo.bound,
            "unit": "nats per example",
            "model": self.model,
        }
        if self.iwae is not None:
            found["iwae"] = _bound_json(self.iwae)
        if self.ais is not None:
            found["ais"] = _bound_json(self.ais)
        if self.semi_supervised is not None:
            found["semi_supervised"] = dataclasses.asdict(self.semi_supervised)
        if self.exact is not None:
            found["exact"] = _bound_json(self.exact)
        if self.diagnostics is not None:
            found["diagnostics"] = {
                "examples": self.diagnostics_examples,
                **self.diagnostics.to_dict(),
            }
        return found


def _bound_json(estimate: IwaeEstimate | AisEstimate | ExactEstimate) -> dict[str, Any]:
    """An estimate's fields and the bound it is, for JSON; a note only where there is one."""
    found = {**dataclasses.asdict(estimate), "bound": estimate.bound}
    if found.get("bits_per_dim_note", "") is None:
        del found["bits_per_dim_note"]
    return found


def evaluate(
    opened: OpenedModel,
    examples: ModelData,
    *,
    samples: int = 16,
    k: int | None = None,
    ais_steps: int | None = None,
    ais_chains: int = 16,
    iwae_examples: int | None = None,
    diagnostics: bool = True,
    progress: bool = False,
    world: World = SINGLE,
    exact: bool = False,
) -> Evaluation | None:
    """The mean ELBO, reconstruction and KL of ``opened``'s model on ``examples``, with the
    standard error of the ELBO; with ``k``, the IWAE-k estimate (and bits per dimension where
    the model is a probability over the data's values); with ``ais_steps``, the AIS estimate with
    ``ais_chains`` chains per example; with ``diagnostics``, the posterior-collapse diagnostics
    on a random subset of at most ``DIAGNOSTIC_EXAMPLES`` examples.

    ``iwae_examples`` takes a random subset (seeded, the same every time) for IWAE and AIS only,
    whose cost grows with k and the number of steps. A tqdm bar shows each long step when
    ``progress``. Every worker of ``world`` calls it; rank 0 returns the result, the others
    None. With ``exact`` (a discrete code), log p(x) summed over every state, on rank 0."""
    check_at_least(
        samples=(samples, 1),
        k=(k, 1),
        ais_steps=(ais_steps, 1),
        ais_chains=(ais_chains, 1),
        iwae_examples=(iwae_examples, 1),
    )
    if len(examples) == 0:
        raise RunError(f"{examples.description} holds no examples to evaluate")
    _check_latent(opened, ais_steps, exact)
    estimated = examples.subset(iwae_examples)
    per_example: dict[str, np.ndarray] = {}
    iwae = annealed = None
    # The shared work first, so that workers other than rank 0 never wait for rank 0 alone.
    if k is not None:
        found_iwae = _iwae(opened, estimated, k, progress, world)
        if found_iwae is not None:
            iwae, per_example["iwae"] = found_iwae
    if ais_steps is not None:
        found_ais = _ais(opened, estimated, ais_steps, ais_chains, progress, world)
        if found_ais is not None:
            annealed, per_example["ais"] = found_ais
    if not world.main:
        return None
    elbo, per_example["elbo"] = _elbo(opened, examples, samples, progress)
    collapse, diagnostic_examples = None, 0
    if diagnostics:
        collapse, diagnostic_examples = diagnose(opened, examples, progress)
    found_exact = None
    if exact:
        found_exact, per_example["exact"] = _exact(opened, estimated)
    return Evaluation(
        **Examined.fields_of(opened, examples),
        elbo=elbo,
        iwae=iwae,
        ais=annealed,
        diagnostics=collapse,
        diagnostics_examples=diagnostic_examples,
        per_example=per_example,
        semi_supervised=_semi_supervised(opened, examples, samples, per_example),
        exact=found_exact,
    )


def _semi_supervised(
    opened: OpenedModel, examples: ModelData, samples: int, per_example: dict[str, np.ndarray]
) -> SemiSupervisedEstimate | None:
    """U(x) and the classification error of a semi-supervised model (M2), read ``CHUNK`` rows
    at a time (each example's U(x) added to ``per_example`` as ``unlabelled_bound``); None for
    any other model."""
    estimator = opened.estimator
    if not isinstance(estimator.model_, SemiSupervisedModel):
        return None
    bounds, wrong, labelled = [], 0, 0
    for start, x in enumerate(examples.chunks()):
        rows = slice(start * CHUNK, start * CHUNK + len(x))
        bounds.append(estimator.unlabelled_bound(x, samples=samples))
        labels = examples.labels(rows.start, rows.stop)
        if labels is not None:
            wrong += int((estimator.predict(x) != labels).sum())
            labelled += len(labels)
    found = np.concatenate(bounds)
    per_example["unlabelled_bound"] = found
    return SemiSupervisedEstimate(
        unlabelled_bound=float(found.mean()),
        standard_error=standard_error(torch.from_numpy(found)),
        classification_error=wrong / labelled if labelled else None,
        examples=int(found.size),
    )


def _check_latent(opened: OpenedModel, ais_steps: int | None, exact: bool) -> None:
    """AIS moves z by HMC, which needs a continuous code; exact needs a discrete one."""
    latent = opened.estimator.model_config_.latent
    if ais_steps is not None and latent != "gaussian":
        raise RunError(
            f"AIS moves z by Hamiltonian Monte Carlo, which needs a continuous code, and this "
            f"model's is {latent}; use --exact (log p(x) by enumeration) or --k"
        )
    if exact and latent == "gaussian":
        raise RunError(
            "--exact sums log p(x) over the states of a discrete code, and this model's is "
            "gaussian; use --k (IWAE) or --ais"
        )
    if exact and state_count(opened.estimator.model_) > MAX_EXACT_STATES:
        raise RunError(
            f"--exact would sum over {state_count(opened.estimator.model_)} states, more than "
            f"{MAX_EXACT_STATES}; use --k (IWAE)"
        )


def _exact(opened: OpenedModel, examples: ModelData) -> tuple[ExactEstimate, np.ndarray]:
    """log p(x) of every example by enumeration, float64 ``[n]``, and its summary."""
    model = opened.estimator.model_
    started = time.perf_counter()
    with torch.no_grad():
        x = torch.from_numpy(examples.read(0, len(examples)))
        log_px = exact_log_likelihood(model, x).double().cpu()
    found = ExactEstimate(
        states=state_count(model),
        examples=int(log_px.numel()),
        mean=float(log_px.mean()),
        standard_error=standard_error(log_px),
        seconds=time.perf_counter() - started,
    )
    return found, log_px.numpy()


def estimate_batches(n: int) -> list[slice]:
    """The batches of ``ESTIMATE_BATCH`` examples an estimate of ``n`` examples runs on, on one
    process or many. Each example's noise is keyed by its values (``vaelab.objectives.noise``),
    so its number does not depend on the batch in exact arithmetic; computing the very same
    batches on every number of workers makes it the same to the last bit too (a matrix product
    of a few rows may take another kernel than one of many, which rounds differently)."""
    return [slice(lo, min(lo + ESTIMATE_BATCH, n)) for lo in range(0, n, ESTIMATE_BATCH)]


T = TypeVar("T")


def _per_batch(
    examples: ModelData,
    estimate: Callable[[torch.Tensor, slice], T],
    world: World,
    progress: bool,
    desc: str,
) -> list[T] | None:
    """``estimate(x, rows)`` on each of ``estimate_batches`` (``rows`` the examples' positions),
    each worker taking a contiguous share of them; the results in order on rank 0, None
    elsewhere."""
    batches = estimate_batches(len(examples))
    mine = batches[world.share(len(batches))]
    shown = tqdm(mine, desc=desc, unit="batch", disable=not (progress and world.main))
    results = [estimate(torch.from_numpy(examples.read(b.start, b.stop)), b) for b in shown]
    gathered = world.gather(results)
    return None if gathered is None else [r for part in gathered for r in part]


def _iwae(
    opened: OpenedModel, examples: ModelData, k: int, progress: bool, world: World
) -> tuple[IwaeEstimate, np.ndarray] | None:
    """The IWAE-k estimate and each example's, float64 ``[n]``, on rank 0. Bits per dimension
    only where they are a code length: the likelihood is a probability of the values evaluated
    (``Likelihood.why_not_a_probability``), as for a Bernoulli on binary pixels; a density on
    [0, 1] pixels, or a Bernoulli cross-entropy on grey values, would give a number in "bits"
    that is no code length and no paper's bits/dim."""
    estimator = opened.estimator
    model = estimator.model_

    def estimate(x: torch.Tensor, rows: slice) -> tuple[np.ndarray, str | None]:
        condition = conditions_of(estimator, examples, rows)
        log_px = log_likelihood(
            model, x, k, batch_size=x.shape[0], seed=EVAL_SEED, condition=condition
        ).log_px
        return log_px.numpy(), model.likelihood.why_not_a_probability(x)

    parts = _per_batch(examples, estimate, world, progress, f"IWAE-{k}")
    if parts is None:
        return None
    log_px = np.concatenate([values for values, _ in parts])
    why_not = next((why for _, why in parts if why), None)
    mean = float(log_px.mean())
    bits = None
    if why_not is None:
        bits = -mean / (math.prod(estimator.data_shape_) * math.log(2.0))
    found = IwaeEstimate(
        k=k,
        examples=int(log_px.size),
        mean=mean,
        standard_error=standard_error(torch.from_numpy(log_px)),
        bits_per_dim=bits,
        bits_per_dim_note=None if why_not is None else f"not defined: {why_not}",
    )
    return found, log_px


def _ais(
    opened: OpenedModel,
    examples: ModelData,
    steps: int,
    chains: int,
    progress: bool,
    world: World,
) -> tuple[AisEstimate, np.ndarray] | None:
    """The AIS estimate and each example's, float64 ``[n]``, on rank 0."""
    estimator = opened.estimator

    def estimate(x: torch.Tensor, rows: slice) -> tuple[np.ndarray, np.ndarray, float]:
        found = ais(
            estimator.model_,
            x,
            chains=chains,
            steps=steps,
            seed=EVAL_SEED,
            batch_size=x.shape[0],
            condition=conditions_of(estimator, examples, rows),
        )
        return found.log_px.numpy(), found.effective_sample_size.numpy(), found.acceptance_rate

    parts = _per_batch(examples, estimate, world, progress, f"AIS-{steps}")
    if parts is None:
        return None
    log_px = np.concatenate([p[0] for p in parts])
    counts = [p[0].size for p in parts]
    found = AisEstimate(
        steps=steps,
        chains=chains,
        examples=int(log_px.size),
        mean=float(log_px.mean()),
        standard_error=standard_error(torch.from_numpy(log_px)),
        mean_effective_sample_size=float(np.concatenate([p[1] for p in parts]).mean()),
        # Each batch's rate is a mean over its examples: weight batches by their size.
        acceptance_rate=sum(c * p[2] for c, p in zip(counts, parts, strict=True)) / sum(counts),
    )
    return found, log_px


def diagnose(
    opened: OpenedModel, examples: ModelData, progress: bool = False
) -> tuple[CollapseDiagnostics, int]:
    """Active units, KL per dimension, I(x; z), rate and distortion
    (``vaelab.evaluation.diagnostics``) on a random subset of at most ``DIAGNOSTIC_EXAMPLES``
    examples, and how many examples that was."""
    estimator = opened.estimator
    subset = examples.subset(DIAGNOSTIC_EXAMPLES)
    x = load_examples(subset)
    condition = conditions_of(estimator, subset, slice(0, len(subset)))
    with torch.no_grad():
        found = collapse_diagnostics(
            estimator.model_, x, seed=EVAL_SEED, progress=progress, condition=condition
        )
    return found, int(x.shape[0])


def _elbo(
    opened: OpenedModel, examples: ModelData, samples: int, progress: bool = False
) -> tuple[ElboEstimate, np.ndarray]:
    """The ELBO estimate and each example's ELBO, float64 ``[n]``, read ``CHUNK`` rows at a time
    (sums of the ELBO and its square, so the standard error needs no second pass)."""
    estimator = opened.estimator
    sums = np.zeros(4)  # ELBO, ELBO², reconstruction, KL
    per_example = []
    chunks = tqdm(
        examples.chunks(),
        total=-(-len(examples) // CHUNK),
        desc="ELBO",
        unit="chunk",
        disable=not progress,
    )
    for start, x in enumerate(chunks):
        rows = slice(start * CHUNK, start * CHUNK + len(x))
        terms = estimator.elbo_terms(x, labels_of(estimator, examples, rows), samples=samples)
        per_example.append(np.asarray(terms.elbo, dtype=np.float64))
        sums += [
            float(terms.elbo.sum()),
            float(terms.elbo.square().sum()),
            float(terms.reconstruction.sum()),
            float(terms.kl.sum()),
        ]
    n = len(examples)
    elbo = sums[0] / n
    variance = max(sums[1] / n - elbo**2, 0.0) * n / max(n - 1, 1)
    found = ElboEstimate(
        elbo=elbo,
        standard_error=math.sqrt(variance / n),
        reconstruction=sums[2] / n,
        kl=sums[3] / n,
        samples=samples,
        examples=n,
    )
    return found, np.concatenate(per_example)


def active_units_text(found: CollapseDiagnostics) -> str:
    """The active units in words: "3 of 5", and with several stochastic layers each layer's
    count, with the units active beyond the layer above for all but the top one:
    "3 of 5 (z1: 2 of 3, 1 beyond z2; z2: 1 of 2)"."""
    text = f"{found.active_units} of {int(found.activity.numel())}"
    sizes = list(found.layer_sizes)
    if len(sizes) > 1:
        beyond: list[int | None] = list(found.active_units_beyond_layer_above or [])
        beyond += [None] * (len(sizes) - len(beyond))
        layers = []
        for i, (n, d, b) in enumerate(
            zip(found.active_units_per_layer, sizes, beyond, strict=True), 1
        ):
            more = f", {b} beyond z{i + 1}" if b is not None and i < len(sizes) else ""
            collapsed = ", collapsed" if found.collapsed_layers[i - 1] else ""
            layers.append(f"z{i}: {n} of {d}{more}{collapsed}")
        text += f" ({'; '.join(layers)})"
    return text
