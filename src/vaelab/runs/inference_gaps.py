"""``vaelab gap``: the inference gaps of Cremer, Li & Duvenaud (2018) of a saved model, as a typed
result (``GapEvaluation``) that the command line and the report render."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vaelab.estimator.facade import EVAL_SEED, VAE
from vaelab.evaluation.ais import ais
from vaelab.evaluation.gap import InferenceGap, families_containing, inference_gap
from vaelab.evaluation.loglik import LogLikelihoodEstimate
from vaelab.model.vae_model import given_rows
from vaelab.runs.model_data import Examined, ModelData, OpenedModel, conditions_of
from vaelab.runs.options import ParameterError, check_at_least
from vaelab.train.distributed import SINGLE, World

GAP_GROUP = 250  # examples per inference-gap computation (their q* are optimised together)


@dataclass(frozen=True)
class GapEvaluation(Examined):
    """The inference gaps of one model on ``examples`` examples, one ``InferenceGap`` per
    variational family that contains the amortised posterior, simplest first; they share one
    log p̂(x), estimated by ``log_px_method``."""

    examples: int
    log_px_method: str
    families: dict[str, InferenceGap]

    def to_json(self) -> dict[str, Any]:
        """The JSON of ``vaelab gap --json`` (field names kept from vaelab 0.1)."""
        return {
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "examples_described": self.examples_described,
            "examples": self.examples,
            "log_px_method": self.log_px_method,
            "unit": "nats per example",
            "families": {family: gap.to_dict() for family, gap in self.families.items()},
        }


def gap(
    opened: OpenedModel,
    examples: ModelData,
    *,
    k: int = 5000,
    steps: int = 2000,
    use_ais: bool = False,
    progress: bool = False,
    world: World = SINGLE,
) -> GapEvaluation | None:
    """The inference gap of Cremer, Li & Duvenaud (2018) on a random subset of ``n`` examples
    (seeded, the same every time): for each variational family that contains the amortised
    posterior (``vaelab.evaluation.gap.families_containing``: the diagonal and the full-covariance Gaussian
    for a diagonal encoder, only the full one for a full-covariance encoder), log p̂(x), ELBO(q*)
    of a per-example optimised q*, ELBO of the amortised q, and the approximation and
    amortisation gaps, each a mean over examples with its standard error. The families share one
    log p̂(x): IWAE-k with the optimised q* of the richest family as proposal, or AIS
    (``use_ais``).

    ``examples`` are those of the estimate (``ModelData.subset`` picks a random, seeded subset).
    The examples are taken ``GAP_GROUP`` at a time (each example's q* and estimates depend on it
    alone, its noise being keyed by its values); on several workers (``world``) each takes a
    contiguous share of the groups, which gives every example the numbers one process gives it,
    and rank 0 returns the result (the others None)."""
    check_at_least(k=(k, 1), steps=(steps, 1))
    if len(examples) < 2:
        raise ParameterError("examples", f"must be at least 2: {examples.description} holds fewer")
    estimator = opened.estimator
    model = estimator.model_
    with torch.no_grad():
        # On the model's device: the encoder runs here outside the estimators that move data.
        first = torch.from_numpy(examples.read(0, 2)).to(estimator.device_)
        condition = conditions_of(estimator, examples, slice(0, 2))
        if condition is not None:
            condition = condition.to(estimator.device_)
        given = given_rows(model, condition, slice(None))
        families = families_containing(given.posterior(first))
    count = len(examples)
    groups = [slice(lo, min(lo + GAP_GROUP, count)) for lo in range(0, count, GAP_GROUP)]
    mine = groups[world.share(len(groups))]
    shown = progress and world.main  # one worker's bars stand for all
    found = [
        _group_gaps(
            estimator,
            examples.read(g.start, g.stop),
            conditions_of(estimator, examples, g),
            families,
            k,
            steps,
            use_ais,
            shown,
        )
        for g in mine
    ]
    gathered = world.gather(found)
    if gathered is None:
        return None
    parts = [part for rank_parts in gathered for part in rank_parts]
    estimates = {family: _joined_gap(family, [p[family] for p in parts]) for family in families}
    log_px_method = estimates[families[-1]].log_px_method
    return GapEvaluation(
        **Examined.fields_of(opened, examples),
        examples=count,
        log_px_method=log_px_method,
        families={family: estimates[family] for family in families},
    )


_GAP_FIELDS = (
    "log_px",
    "elbo_optimal",
    "elbo_amortised",
    "log_px_mc_standard_error",
    "elbo_optimal_mc_standard_error",
    "elbo_amortised_mc_standard_error",
)


def _group_gaps(
    estimator: VAE,
    x: np.ndarray,
    condition: torch.Tensor | None,
    families: tuple[str, ...],
    k: int,
    steps: int,
    use_ais: bool,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """The inference gaps of one group of examples ``x`` (given their ``condition`` for a
    conditional model) for each family, as plain arrays."""
    model, examples = estimator.model_, torch.from_numpy(x)
    log_px: LogLikelihoodEstimate | None = None
    if use_ais:
        log_px = ais(model, examples, seed=EVAL_SEED, progress=progress, condition=condition)
    found: dict[str, dict[str, Any]] = {}
    for family in reversed(families):  # the richest first: its q* is the proposal for log p(x)
        estimate = inference_gap(
            model, examples, family, log_px=log_px, k=k, steps=steps, seed=EVAL_SEED,
            progress=progress, condition=condition,
        )  # fmt: skip
        log_px = estimate.log_px_estimate
        found[family] = {name: getattr(estimate, name).numpy() for name in _GAP_FIELDS}
        found[family]["effective_sample_size"] = log_px.effective_sample_size.numpy()
        found[family]["method"], found[family]["samples"] = log_px.method, log_px.samples
        found[family]["data_dim"] = log_px.data_dim
    return found


def _joined_gap(family: str, groups: list[dict[str, Any]]) -> InferenceGap:
    """One ``InferenceGap`` of the examples of ``groups``, in order."""
    joined = {
        name: torch.from_numpy(np.concatenate([g[name] for g in groups]))
        for name in (*_GAP_FIELDS, "effective_sample_size")
    }
    first = groups[0]
    log_px = LogLikelihoodEstimate(
        joined["log_px"],
        joined["log_px_mc_standard_error"],
        joined["effective_sample_size"],
        first["samples"],
        first["method"],
        first["data_dim"],
    )
    return InferenceGap(
        family=family,
        **{name: joined[name] for name in _GAP_FIELDS},
        log_px_method=first["method"],
        log_px_estimate=log_px,
    )
