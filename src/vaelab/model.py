"""``VAEModel``: a posterior, a prior and a likelihood held together as one ``nn.Module``.

The model owns parameters and nothing else: the bounds themselves live in ``vaelab.objectives``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from vaelab.likelihoods import Likelihood
from vaelab.objectives import ElboTerms, IwaeTerms, elbo, iwae_bound


class VAEModel(nn.Module):
    """p_θ(x, z) = p(z) p_θ(x|z) with the amortised posterior q_φ(z|x).

    With several stochastic layers z = [z₁, …, z_L] is their concatenation, and the posterior and
    prior are chains of conditionals over it (``vaelab.hierarchy``): nothing here changes.
    """

    def __init__(self, posterior: nn.Module, prior: nn.Module, likelihood: Likelihood) -> None:
        super().__init__()
        self.posterior = posterior
        self.prior = prior
        self.likelihood = likelihood

    @property
    def latent_dim(self) -> int:
        """Size of a latent code: with several stochastic layers, of all of them together."""
        return int(self.prior().event_shape[0])

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        """The stochastic layers' sizes as they lie in a code, z₁ first (``vaelab.hierarchy``);
        ``(latent_dim,)`` for a model with one layer."""
        sizes: tuple[int, ...] | None = getattr(self.prior, "sizes", None)
        return (self.latent_dim,) if sizes is None else sizes

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
        """``vaelab.objectives.elbo`` of this model's components."""
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
    ) -> IwaeTerms:
        """``vaelab.objectives.iwae_bound`` of this model's components."""
        return iwae_bound(
            x, self.posterior, self.prior, self.likelihood, k=k, gradient=gradient, noise=noise
        )

    def sample_latent(self, n: int) -> torch.Tensor:
        """``n`` draws from the prior, ``[n, latent]``."""
        return self.prior().sample((n,))
