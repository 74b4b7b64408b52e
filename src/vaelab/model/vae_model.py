"""``VAEModel``: a posterior, a prior and a likelihood held together as one ``nn.Module``.

The model owns parameters and nothing else: the bounds themselves live in ``vaelab.objectives.bounds``.
A conditional model's components read a condition y as one more input, and ``given(y)`` is the
model given y (``vaelab.model.conditioning``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from vaelab.components.likelihoods import DataMoments, Likelihood
from vaelab.components.networks import InputScale
from vaelab.model.conditioning import GivenLikelihood, GivenPosterior, GivenPrior
from vaelab.objectives.bounds import ElboTerms, IwaeTerms, elbo, iwae_bound


class VAEModel(nn.Module):
    """p_θ(x, z) = p(z) p_θ(x|z) with the amortised posterior q_φ(z|x).

    With several stochastic layers z = [z₁, …, z_L] is their concatenation, and the posterior and
    prior are chains of conditionals over it (``vaelab.components.hierarchy``): nothing here changes.

    A conditional model (``condition_dim`` c > 0; Sohn, Lee & Yan 2015) is p(z|y) p(x|z, y) with
    q(z|x, y) for a condition y ``[batch, c]``, which its components read as one more input;
    ``given(y)`` is the same model with y bound, which every function of a model takes.
    """

    condition: torch.Tensor | None = None  # the bound y of a view made by given()

    def __init__(
        self,
        posterior: nn.Module,
        prior: nn.Module,
        likelihood: Likelihood,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        self.posterior = posterior
        self.prior = prior
        self.likelihood = likelihood
        self.condition_dim = condition_dim

    @property
    def latent_dim(self) -> int:
        """Size of a latent code: with several stochastic layers, of all of them together."""
        # A conditional prior knows its size without a condition to build a distribution from.
        size = getattr(self.prior, "latent_dim", None)
        return size if isinstance(size, int) else int(self.prior().event_shape[0])

    def given(self, condition: torch.Tensor) -> VAEModel:
        """The model given the condition y ``[batch, c]``, one row per example: a view of the
        same modules (the same parameters) whose ``posterior(x)`` is q(z|x, y), ``prior()``
        p(z|y) and ``likelihood`` p(x|z, y), so that anything written for a model (the
        objectives, ``elbo``, ``iwae``, the estimators of ``vaelab.evaluation.loglik``, ``vaelab.evaluation.ais``,
        ``vaelab.evaluation.gap``, ``vaelab.evaluation.diagnostics``) computes the conditional quantities for these
        examples."""
        if self.condition is not None:
            raise ValueError("this model is already given a condition; call given() once")
        if self.condition_dim == 0:
            raise ValueError(
                "this model reads no condition (it was built without one); a conditional model "
                "needs conditional=True"
            )
        if condition.dim() != 2 or condition.shape[1] != self.condition_dim:
            raise ValueError(
                f"the condition must be [batch, {self.condition_dim}] (one row per example), "
                f"got shape {tuple(condition.shape)}"
            )
        view = VAEModel(
            GivenPosterior(self.posterior, condition),
            GivenPrior(self.prior, condition),
            GivenLikelihood(self.likelihood, condition),
        )
        view.condition = condition
        return view

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        """The stochastic layers' sizes as they lie in a code, z₁ first (``vaelab.components.hierarchy``);
        ``(latent_dim,)`` for a model with one layer."""
        sizes: tuple[int, ...] | None = getattr(self.prior, "sizes", None)
        return (self.latent_dim,) if sizes is None else sizes

    @torch.no_grad()
    def initialise(self, data: torch.Tensor | DataMoments) -> None:
        """Start the model at its training data, ``[batch, *data_shape]`` or the moments of a
        stream of it: the decoder at the data's moments (``Likelihood.initialise``), and the
        encoder reading its inputs in the units the decoder writes them in (every
        ``InputScale`` of the posterior set to ``Likelihood.data_unit``: 8-bit pixels kept as
        0..255 are read as pixels / 255)."""
        self.likelihood.initialise(data)
        for module in self.posterior.modules():
            if isinstance(module, InputScale):
                module.set(self.likelihood.data_unit)

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x): ``batch_shape [batch]``, ``event_shape [latent]``."""
        return self.posterior(x)

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for ``z: [*lead, latent]``."""
        return self.likelihood(z)

    def elbo(
        self,
        x: torch.Tensor,
        samples: int = 1,
        beta: float = 1.0,
        kl: str = "auto",
        noise: torch.Tensor | None = None,
        gradient: str = "standard",
    ) -> ElboTerms:
        """``vaelab.objectives.bounds.elbo`` of this model's components."""
        return elbo(
            x,
            self.posterior,
            self.prior,
            self.likelihood,
            samples=samples,
            beta=beta,
            kl=kl,
            noise=noise,
            gradient=gradient,
        )

    def iwae(
        self,
        x: torch.Tensor,
        k: int,
        gradient: str = "standard",
        noise: torch.Tensor | None = None,
        kl_weight: float = 1.0,
    ) -> IwaeTerms:
        """``vaelab.objectives.bounds.iwae_bound`` of this model's components."""
        return iwae_bound(
            x,
            self.posterior,
            self.prior,
            self.likelihood,
            k=k,
            gradient=gradient,
            noise=noise,
            kl_weight=kl_weight,
        )

    def sample_latent(self, n: int) -> torch.Tensor:
        """``n`` draws from the prior, ``[n, latent]``; for a model given conditions, one draw per
        condition (``n`` of them)."""
        p = self.prior()
        if self.condition is not None and self.condition.shape[0] != n:
            raise ValueError(
                f"this model is given {self.condition.shape[0]} conditions, one per code; ask "
                f"for {self.condition.shape[0]} codes, not {n}"
            )
        return p.sample((n,)) if len(p.batch_shape) == 0 else p.sample()


def given_rows(model: VAEModel, condition: torch.Tensor | None, rows: slice) -> VAEModel:
    """``model`` given the conditions of examples ``rows`` (``condition`` ``[n, c]`` aligned with
    the examples), or ``model`` itself without a condition: what a function that cuts its
    examples into batches binds for each batch."""
    return model if condition is None else model.given(condition[rows])
