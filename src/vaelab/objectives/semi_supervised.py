"""The bound of the semi-supervised model M2 (Kingma, Rezende, Mohamed & Welling 2014,
"Semi-supervised learning with deep generative models", arXiv:1406.5298, §3.1.2).

The generative model is p(y) p(z) p(x|y, z) with p(y) uniform over C classes; inference is
q(z|x, y) (the conditional encoder) and a classifier q(y|x). Writing

    L(x, y) = E_{q(z|x,y)}[log p(x|y, z)] − KL(q(z|x, y) ‖ p(z)) + log p(y)     (eq. 6, negated)

for the conditional ELBO plus log p(y), an example with its label gives

    log p(x, y) ≥ L(x, y),

and an example without one sums the label out under q(y|x):

    log p(x) ≥ U(x) = Σ_y q(y|x) L(x, y) + H(q(y|x))                           (eq. 7, negated)

which is a lower bound on log p(x) (Jensen over y, then the ELBO for each y), so a reported U(x)
is an honest bound, never a surrogate. Training maximises

    J^α = Σ_labelled L + Σ_unlabelled U + α · Σ_labelled log q(y|x)          (eq. 9)

so that the classifier also learns from the labels, with the paper's α = 0.1 · N; the weight is
given per labelled example (``classification_weight``; the paper writes the last term as an
expectation over the labelled data, read here as its sum: ``vaelab.model.semi_supervised.
classification_weight``). The trainer weighs each example so that a step's objective is an
unbiased estimate of J^α / N (``vaelab.train.labelled_batches``).

The functions take the conditional ELBO as a function of (rows, conditions) so that they know no
model: the caller binds y to its components (``vaelab.model.semi_supervised``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from vaelab.objectives.bounds import ElboTerms

__all__ = ["SemiSupervisedTerms", "semi_supervised_bound"]

# The conditional ELBO of examples ``index`` [m] (positions in the batch) given conditions [m, C].
ConditionalElbo = Callable[[torch.Tensor, torch.Tensor], ElboTerms]


class SemiSupervisedTerms(NamedTuple):
    """Per-example terms ``[batch]`` in nats: ``bound`` is L(x, y) for a labelled example (a bound
    on log p(x, y)) and U(x) for an unlabelled one (a bound on log p(x)); ``reconstruction`` and
    ``kl`` are its expected log p(x|y, z) and KL (under q(y|x) when y is missing); ``entropy``
    H(q(y|x)) (0 for labelled examples); ``log_q_y`` log q(y|x) of the given label (0 for
    unlabelled examples); ``objective`` what training maximises: the bound (with β on the KL)
    plus ``classification_weight`` · log q(y|x) on labelled examples."""

    reconstruction: torch.Tensor
    kl: torch.Tensor
    bound: torch.Tensor
    entropy: torch.Tensor
    log_q_y: torch.Tensor
    objective: torch.Tensor


def semi_supervised_bound(
    labels: torch.Tensor,
    logits: torch.Tensor,
    conditional_elbo: ConditionalElbo,
    *,
    classification_weight: float = 0.0,
) -> SemiSupervisedTerms:
    """M2's per-example bound (see the module docstring) for a batch whose ``labels`` ``[batch,
    C]`` are one-hot rows where the label is given and rows of zeros where it is missing;
    ``logits`` ``[batch, C]`` are the classifier's q(y|x). ``conditional_elbo(index, y)`` is the
    conditional ELBO (log p(y) not included) of batch examples ``index`` given one-hot ``y``.

    A labelled example needs one conditional ELBO, an unlabelled one C (one per class, in one
    call of the rows stacked class by class)."""
    batch, classes = labels.shape
    log_prior = -math.log(classes)  # p(y) uniform
    labelled = labels.sum(1) > 0  # [batch]
    log_q = torch.log_softmax(logits, dim=1)  # [batch, C]
    known = torch.nonzero(labelled).squeeze(1)
    missing = torch.nonzero(~labelled).squeeze(1)
    eye = torch.eye(classes, dtype=labels.dtype, device=labels.device)
    # Rows: each labelled example once with its label, then each unlabelled one with every class.
    index = torch.cat([known, missing.repeat(classes)])
    condition = torch.cat([labels[known], eye.repeat_interleave(missing.shape[0], dim=0)])
    terms = conditional_elbo(index, condition)
    n = known.shape[0]

    def spread(values: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """The labelled examples' ``values`` [n] and the unlabelled ones' ``given`` [m] in
        batch order, [batch]."""
        out = values.new_zeros(batch)
        return out.index_put((known,), values).index_put((missing,), given)

    def summed_out(values: torch.Tensor) -> torch.Tensor:
        """Σ_y q(y|x) values(x, y) for the unlabelled rows: [C·m] → [m]."""
        per_class = values[n:].reshape(classes, -1).T  # [m, C]
        return (log_q[missing].exp() * per_class).sum(1)

    q_missing = log_q[missing].exp()
    entropy = -(q_missing * log_q[missing]).sum(1)  # H(q(y|x)), [m]
    log_q_y = (log_q[known] * labels[known]).sum(1)  # log q(y|x) of the given labels, [n]
    zeros = torch.zeros_like(entropy)
    bound = spread(terms.elbo[:n] + log_prior, summed_out(terms.elbo) + log_prior + entropy)
    objective = spread(
        terms.objective[:n] + log_prior + classification_weight * log_q_y,
        summed_out(terms.objective) + log_prior + entropy,
    )
    return SemiSupervisedTerms(
        reconstruction=spread(terms.reconstruction[:n], summed_out(terms.reconstruction)),
        kl=spread(terms.kl[:n], summed_out(terms.kl)),
        bound=bound,
        entropy=spread(torch.zeros_like(log_q_y), entropy),
        log_q_y=spread(log_q_y, zeros),
        objective=objective,
    )
