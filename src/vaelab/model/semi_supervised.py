"""``SemiSupervisedModel``: the conditional VAE with a classifier q(y|x), the model M2 of Kingma,
Rezende, Mohamed & Welling (2014, "Semi-supervised learning with deep generative models").

It is a conditional ``VAEModel`` (y one-hot over C classes is its condition, p(z) its prior,
q(z|x, y) and p(x|y, z) its networks) plus one component, the classifier; given y it is the
conditional VAE, so every function of a model works on ``given(y)`` as before. Without y, y is a
latent variable with p(y) uniform: ``unlabelled_bound`` is the bound U(x) on log p(x) and
``semi_supervised`` the training terms of a batch with some labels missing
(``vaelab.objectives.semi_supervised``).
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab.components.classifier import Classifier
from vaelab.components.likelihoods import DataMoments, Likelihood
from vaelab.components.networks import InputScale
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import ElboTerms
from vaelab.objectives.semi_supervised import SemiSupervisedTerms, semi_supervised_bound

__all__ = ["PAPER_ALPHA", "SemiSupervisedModel", "classification_weight", "missing_rows"]

PAPER_ALPHA = 0.1  # α = 0.1 · N (Kingma et al. 2014, §4.1), N the number of training examples


def classification_weight(
    alpha: float | None, examples: int, labelled: int, *, mean: bool = False
) -> float:
    """The weight of log q(y|x) per labelled example in J^α = Σ_l L + Σ_u U + α Σ_l log q(y|x)
    over N ``examples``: α itself. ``alpha`` None is the paper's α = 0.1 · N.

    The paper writes the term α · E_l[log q(y|x)] (eq. 9) with α = 0.1 · N; vaelab reads the
    expectation over the labelled data as its sum, α per labelled example. ``mean`` gives the
    other reading, α / N_labelled per example (α over the labelled examples' mean), which vaelab's
    first M2 used (``labelled_batch_size=0``) and which measured far too weak a classification
    signal (docs/guide.md, "Semi-supervised learning (M2)")."""
    chosen = float(PAPER_ALPHA * examples if alpha is None else alpha)
    return chosen / max(labelled, 1) if mean else chosen


def missing_rows(condition: torch.Tensor) -> torch.Tensor:
    """Which rows of one-hot conditions ``[n, C]`` have no label (a row of zeros), bool ``[n]``."""
    return condition.sum(1) == 0


class SemiSupervisedModel(VAEModel):
    """M2: a conditional ``VAEModel`` over C classes with a classifier q(y|x)
    (``vaelab.components.classifier.Classifier``), whose weights are saved with the rest."""

    def __init__(
        self,
        posterior: nn.Module,
        prior: nn.Module,
        likelihood: Likelihood,
        condition_dim: int,
        classifier: Classifier,
    ) -> None:
        super().__init__(posterior, prior, likelihood, condition_dim)
        self.classifier = classifier

    @torch.no_grad()
    def initialise(self, data: torch.Tensor | DataMoments) -> None:
        """As ``VAEModel.initialise``; the classifier reads x in the encoder's units."""
        super().initialise(data)
        for module in self.classifier.modules():
            if isinstance(module, InputScale):
                module.set(self.likelihood.data_unit)

    def semi_supervised(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        *,
        samples: int = 1,
        beta: float = 1.0,
        noise: torch.Tensor | None = None,
        gradient: str = "standard",
        classification_weight: float = 0.0,
    ) -> SemiSupervisedTerms:
        """The terms of ``vaelab.objectives.semi_supervised.semi_supervised_bound`` for ``x``
        ``[batch, *data_shape]`` with ``labels`` ``[batch, C]`` (one-hot rows, rows of zeros
        where the label is missing). ``noise`` ε ``[samples, batch, latent]`` is shared by the
        C terms of an unlabelled example (common random numbers, one draw per example)."""

        def conditional_elbo(index: torch.Tensor, condition: torch.Tensor) -> ElboTerms:
            return self.given(condition).elbo(
                x[index],
                samples=samples,
                beta=beta,
                noise=None if noise is None else noise[:, index],
                gradient=gradient,
            )

        return semi_supervised_bound(
            labels,
            self.classifier.logits(x),
            conditional_elbo,
            classification_weight=classification_weight,
        )

    def unlabelled_bound(
        self, x: torch.Tensor, *, samples: int = 1, noise: torch.Tensor | None = None
    ) -> SemiSupervisedTerms:
        """U(x) = Σ_y q(y|x) L(x, y) + H(q(y|x)) ≤ log p(x) for every example of ``x``."""
        labels = x.new_zeros(x.shape[0], self.condition_dim)
        return self.semi_supervised(x, labels, samples=samples, noise=noise)
