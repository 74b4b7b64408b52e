"""Exact evaluation of a model with a discrete code by summing over every state z:

    log p(x) = log Σ_z p(x|z) p(z),   p(z|x) = p(x|z) p(z) / p(x),
    ELBO(x) = Σ_z q(z|x) log p(x|z) − KL(q(z|x) ‖ p(z)),

so that the IWAE bound and the ELBO of a discrete model can be checked against the number they
bound, and the gap log p(x) − ELBO = KL(q(z|x) ‖ p(z|x)) read off exactly.

States are taken ``STATE_CHUNK`` at a time and the log-sum-exp carried over chunks, so memory
does not grow with the state count; the decoder reads each state once, whatever the number of
examples (for the Bernoulli likelihood, log p(x|z) of every example and state is two matrix
products: ``vaelab.objectives.discrete.state_log_likelihoods``). Refused beyond
``MAX_EXACT_STATES``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from vaelab.components.discrete import DISCRETE_PRIORS
from vaelab.components.likelihoods import BernoulliLikelihood
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.discrete import (
    STATE_CHUNK,
    enumerated_elbo,
    state_log_likelihoods,
)

MAX_EXACT_STATES = 2**20
MAX_POSTERIOR_STATES = 2**16  # a posterior table is [states, examples]
ROWS = 100  # examples scored at once by a likelihood without the matrix-product form

__all__ = [
    "MAX_EXACT_STATES",
    "exact_elbo",
    "exact_log_likelihood",
    "exact_posterior",
    "state_count",
]


def state_count(model: VAEModel) -> int:
    """How many states the model's code has; ``ValueError`` for a Gaussian code."""
    if not isinstance(model.prior, DISCRETE_PRIORS):
        raise ValueError(
            "exact evaluation sums over the states of a discrete code, and this model's is "
            "Gaussian; use the IWAE estimate (exact=False) or AIS"
        )
    return int(model.prior().state_count)


def _check(model: VAEModel, limit: int) -> int:
    count = state_count(model)
    if count > limit:
        raise ValueError(
            f"exact evaluation would sum over {count} states, more than {limit}; use the IWAE "
            "estimate (exact=False) or fewer latent units"
        )
    return count


def _log_joint_chunks(model: VAEModel, x: Tensor) -> Iterator[Tensor]:
    """log p(x, z) ``[s, n]`` for successive chunks of the states, every example at once."""
    p = model.prior()
    states = p.enumerate_support(expand=False)  # [S, latent]
    rows = x.shape[0] if isinstance(model.likelihood, BernoulliLikelihood) else ROWS
    for start in range(0, states.shape[0], STATE_CHUNK):
        chunk = states[start : start + STATE_CHUNK]
        log_prior = p.log_prob(chunk)  # [s]
        parts = [
            state_log_likelihoods(model.likelihood, x[r : r + rows], chunk, log_prior)
            for r in range(0, x.shape[0], rows)
        ]
        yield parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def exact_log_likelihood(model: VAEModel, x: Tensor) -> Tensor:
    """log p(x) = log Σ_z p(x|z) p(z) for each example of ``x [n, …]`` → ``[n]``, nats."""
    _check(model, MAX_EXACT_STATES)
    parameter = next(model.parameters())
    x = x.to(parameter.device, parameter.dtype)
    total = torch.full((x.shape[0],), -torch.inf, device=x.device, dtype=x.dtype)
    for log_joint in _log_joint_chunks(model, x):
        total = torch.logaddexp(total, torch.logsumexp(log_joint, dim=0).to(total))
    return total


def exact_posterior(model: VAEModel, x: Tensor) -> Tensor:
    """log p(z|x) ``[S, n]`` for every state (in ``enumerate_support``'s order) and example."""
    _check(model, MAX_POSTERIOR_STATES)
    log_joint = torch.cat(list(_log_joint_chunks(model, x)))
    return log_joint - torch.logsumexp(log_joint, dim=0)


def exact_elbo(model: VAEModel, x: Tensor) -> Tensor:
    """The encoder's ELBO Σ_z q(z|x) log p(x|z) − KL(q ‖ p) with nothing estimated, ``[n]``."""
    _check(model, MAX_POSTERIOR_STATES)
    parts = []
    for r in range(0, x.shape[0], ROWS):
        rows = x[r : r + ROWS]
        reconstruction, kl = enumerated_elbo(
            rows, model.posterior(rows), model.prior(), model.likelihood
        )
        parts.append(reconstruction - kl)
    return torch.cat(parts)
