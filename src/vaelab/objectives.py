"""Objectives: the evidence lower bound and the importance-weighted bound, as pure functions.

Both take data ``x: [batch, *data_shape]`` and the three components (posterior q(z|x), prior p(z),
likelihood p(x|z)) and return named per-example terms in nats: every log-density is summed over data
and latent dimensions, nothing is averaged over the batch (the trainer alone does that, and negates
once).

    log p(x) = ELBO + KL(q(z|x) ‖ p(z|x)) ≥ ELBO = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z))

The KL term is exact where ``torch.distributions.kl_divergence`` has a closed form registered (vaelab
registers the Gaussian pairs torch lacks in ``vaelab.kl``) and a Monte Carlo estimate from the same
samples otherwise: Kingma & Welling's (2014) estimators B and A. That choice is made in ``kl_term``
and nowhere else.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaelab import kl as _registers_gaussian_kl  # noqa: F401  (import registers the closed forms)
from vaelab.likelihoods import Likelihood
from vaelab.noise import location_scale_sample

KL_METHODS = ("auto", "analytic", "monte_carlo")


class ElboTerms(NamedTuple):
    """Per-example terms of the ELBO, each ``[batch]``, in nats.

    ``objective`` is what training maximises: reconstruction − β · KL (Higgins et al. 2017); with
    β = 1 it equals ``elbo``, which is always the bound itself.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    elbo: torch.Tensor
    objective: torch.Tensor


class IwaeTerms(NamedTuple):
    """The importance-weighted bound ``[batch]`` and its log weights ``[k, batch]``."""

    bound: torch.Tensor
    log_weights: torch.Tensor


def kl_term(
    q: Distribution, p: Distribution, z: torch.Tensor, method: str = "auto"
) -> tuple[torch.Tensor, bool]:
    """KL(q ‖ p) per example, ``[batch]``, and whether it is exact.

    ``z: [samples, batch, latent]`` are draws from q, used only for the Monte Carlo estimate
    (1/L) Σₗ [log q(zₗ) − log p(zₗ)]. ``method="auto"`` takes the closed form when one is registered.
    """
    if method not in KL_METHODS:
        raise ValueError(f"unknown KL method {method!r}; choose one of {KL_METHODS}")
    if method != "monte_carlo":
        try:
            return kl_divergence(q, p), True
        except NotImplementedError:
            if method == "analytic":
                raise ValueError(
                    f"no closed-form KL between {type(q).__name__} and {type(p).__name__}; "
                    "use kl='auto' or kl='monte_carlo'"
                ) from None
    return (q.log_prob(z) - p.log_prob(z)).mean(0), False


def kl_per_dimension(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """KL per latent dimension ``[batch, latent]`` when both q and p factorise over dimensions
    (diagonal Gaussians), else ``None``: the quantity behind free bits and collapse diagnostics."""
    if isinstance(q, Independent) and isinstance(p, Independent):
        qb, pb = q.base_dist, p.base_dist
        if isinstance(qb, Normal) and isinstance(pb, Normal):
            return kl_divergence(qb, pb).expand(qb.batch_shape)
    return None


def elbo(
    x: torch.Tensor,
    posterior: nn.Module,
    prior: nn.Module,
    likelihood: Likelihood,
    *,
    samples: int = 1,
    beta: float = 1.0,
    kl: str = "auto",
    noise: torch.Tensor | None = None,
) -> ElboTerms:
    """The evidence lower bound with ``samples`` (L) reparameterised draws per example.

    ELBO(x) = (1/L) Σₗ log p(x | zₗ) − KL(q(z|x) ‖ p(z)),  zₗ = μ + σ ⊙ εₗ,  εₗ ~ N(0, I).

    ``noise``, if given, is the standard normal ε ``[samples, batch, latent]`` to use instead of fresh
    draws (see ``vaelab.noise.ExampleNoise`` for noise that is a function of each example).
    """
    q = posterior(x)
    if noise is None and samples == 1:
        # The default, and the training loop's: one draw [batch, latent], so nothing to average
        # and no sample dimension to fold in and out of the decoder at every step.
        z = q.rsample()
        reconstruction = likelihood.log_prob(x, z)  # [batch]
        z = z.unsqueeze(0)  # [1, batch, latent], for a Monte Carlo KL
    else:
        z = q.rsample((samples,)) if noise is None else location_scale_sample(q, noise)
        reconstruction = likelihood.log_prob(x, z).mean(0)  # [batch]
    kl_value, _ = kl_term(q, prior(), z, kl)
    bound = reconstruction - kl_value
    return ElboTerms(
        reconstruction=reconstruction,
        kl=kl_value,
        elbo=bound,
        objective=bound if beta == 1.0 else reconstruction - beta * kl_value,
    )


def log_importance_weights(
    x: torch.Tensor, q: Distribution, p: Distribution, likelihood: Likelihood, z: torch.Tensor
) -> torch.Tensor:
    """log w = log p(x|z) − [log q(z|x) − log p(z)] for ``z: [k, batch, latent]`` → ``[k, batch]``.

    Written in the same order as the Monte Carlo ELBO so that with one sample the two agree to the
    last bit.
    """
    return likelihood.log_prob(x, z) - (q.log_prob(z) - p.log_prob(z))


def iwae_bound(
    x: torch.Tensor,
    posterior: nn.Module,
    prior: nn.Module,
    likelihood: Likelihood,
    *,
    k: int = 1,
) -> IwaeTerms:
    """The importance-weighted bound of Burda et al. (2016), eq. (8):

    L_k(x) = E[log (1/k) Σᵢ p(x, zᵢ) / q(zᵢ|x)],  zᵢ ~ q(z|x),

    with L_1 = ELBO ≤ L_k ≤ L_{k+1} ≤ log p(x). Computed with ``logsumexp`` so that weights far
    below the largest do not underflow.
    """
    if k < 1:
        raise ValueError(f"k must be a positive number of importance samples, got {k}")
    q = posterior(x)
    z = q.rsample((k,))  # [k, batch, latent]
    log_w = log_importance_weights(x, q, prior(), likelihood, z)
    return IwaeTerms(bound=torch.logsumexp(log_w, dim=0) - math.log(k), log_weights=log_w)
