"""Gradient estimators for discrete latent codes (``vaelab.distributions.discrete``), whose draws
cannot be reparameterised. ``vaelab.objectives.bounds.elbo`` and ``iwae_bound`` hand a discrete
posterior here; what comes back is the same named terms, whose values are always the DISCRETE
model's bound (the ELBO with its closed-form KL, or the IWAE bound of discrete draws) and whose
``objective`` carries the gradient ``gradient=`` chooses:

- ``"reinforce"`` (what ``"standard"`` means for a discrete code, unless it is small enough to
  enumerate: ``bounds.ENUMERATE_BY_DEFAULT``): the score function
  E_q[f ∇ log q(z|x)] with NVIL's input-dependent baseline b_ψ(x) and variance normalisation
  (Mnih & Gregor 2014): the signal f is log p(x|z) for the ELBO (whose KL term is differentiated
  in closed form) or the IWAE bound L̂ (Mnih & Rezende 2016, their "NVIL" IWAE baseline);
  (f − b_ψ(x) − m) / max(1, s) multiplies ∇ log q, with m and s² running moments of f − b_ψ(x);
  b_ψ is trained to minimise (f − b_ψ(x))². Unbiased up to the positive factor 1 / max(1, s).
- ``"vimco"`` (the IWAE bound, k ≥ 2; Mnih & Rezende 2016): the learning signal of draw i is
  L̂ − L̂₋ᵢ, where L̂₋ᵢ replaces log wᵢ by the mean of the other k − 1 log weights (their
  geometric mean): a per-draw baseline that needs nothing learned.
- ``"relaxed"``: the Concrete / Gumbel-softmax relaxation at temperature λ (Maddison, Mnih & Teh
  2017; Jang, Gu & Poole 2017): the decoder reads the relaxed code z̃, reparameterised, or with
  ``straight_through`` the discrete code in the forward pass and z̃'s gradient in the backward one.
  A biased surrogate whose bias shrinks with λ; its own value is never reported.
- ``"enumerate"`` (the ELBO): the exact expectation Σ_z q(z|x) log p(x|z) over every state, and
  its exact gradient by autograd; refused above ``MAX_ENUMERATED_STATES``.

The discrete draws come from the keyed standard normal noise of the trainer and the evaluators
through u = Φ(ε) (``uniform_from_normal``), so discrete runs resume bit for bit like the others.
What the estimators keep between steps (the baseline network, the running moments, the
temperature) lives in the posterior's ``estimator`` (``vaelab.components.discrete``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, kl_divergence

from vaelab.components.discrete import EstimatorState
from vaelab.components.likelihoods import BernoulliLikelihood, Likelihood
from vaelab.distributions.discrete import (
    BernoulliCode,
    OneHotCategoricalGroups,
    uniform_from_normal,
)

DISCRETE_GRADIENTS = ("reinforce", "vimco", "relaxed", "enumerate")
MAX_ENUMERATED_STATES = 2**16  # the "enumerate" gradient: states summed at every step
MOMENT_DECAY = 0.9  # running moments of NVIL's centred signal
STATE_CHUNK = 4096  # states decoded at once when summing over them

DiscreteCode = BernoulliCode | OneHotCategoricalGroups
ElboParts = tuple[Tensor, Tensor, Tensor, Tensor]
IwaeParts = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def is_discrete(q: Distribution) -> bool:
    """Whether ``q`` is a discrete code these estimators serve."""
    return isinstance(q, (BernoulliCode, OneHotCategoricalGroups))


def check_discrete_objective(objective: str, gradient: str, k: int | None = None) -> None:
    """Refuse a discrete estimator with a bound it does not estimate (``ValueError``)."""
    if gradient == "vimco" and objective != "iwae":
        raise ValueError(
            "gradient='vimco' is an estimator for the IWAE bound (leave-one-out over k draws); "
            "use objective='iwae' with k ≥ 2, or gradient='reinforce' with the ELBO"
        )
    if gradient == "vimco" and k is not None and k < 2:
        raise ValueError(
            f"gradient='vimco' needs k ≥ 2 draws to leave one out, got k={k}; use k ≥ 2"
        )
    if gradient == "enumerate" and objective != "elbo":
        raise ValueError(
            "gradient='enumerate' sums the ELBO over every state; use objective='elbo' (or "
            "'vimco' / 'reinforce' for the IWAE bound)"
        )


def check_latent_gradient(latent: str, states: int, gradient: str) -> None:
    """Refuse an estimator that cannot serve a code of family ``latent`` with ``states`` states
    (``ValueError``, one line)."""
    if latent == "gaussian":
        if gradient in DISCRETE_GRADIENTS:
            raise ValueError(
                f"gradient={gradient!r} is an estimator for discrete latents; with "
                "latent='gaussian' use 'standard', 'stl' or 'dreg'"
            )
        return
    if gradient in ("stl", "dreg"):
        raise ValueError(
            f"gradient={gradient!r} needs reparameterised draws, which latent={latent!r} has "
            "not; use 'reinforce', 'vimco' (objective='iwae'), 'relaxed' or 'enumerate'"
        )
    if gradient == "enumerate" and states > MAX_ENUMERATED_STATES:
        raise ValueError(
            f"gradient='enumerate' would sum over {states} states at every step, more than "
            f"{MAX_ENUMERATED_STATES}; use 'reinforce', 'vimco' or 'relaxed', or fewer latents"
        )


def set_relaxation(posterior: nn.Module, temperature: float, straight_through: bool) -> None:
    """Set the relaxation's temperature λ and straight-through flag of a discrete posterior (the
    trainer's, at every step); a Gaussian posterior has none and is left alone."""
    state = estimator_state(posterior)
    if state is not None:
        state.temperature = temperature
        state.straight_through = straight_through


def estimator_state(posterior: nn.Module) -> EstimatorState | None:
    """What a discrete posterior keeps for its estimators (None for any other module)."""
    state = getattr(posterior, "estimator", None)
    return state if isinstance(state, EstimatorState) else None


def _with_gradient(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value``'s numbers, ``surrogate``'s gradient (as in ``bounds``)."""
    return value.detach() + (surrogate - surrogate.detach())


def _uniform(q: DiscreteCode, noise: Tensor | None, samples: int) -> Tensor:
    """Uniform u ``[samples, batch, latent]`` from the given standard normal ε, or fresh."""
    if noise is None:
        logits = q.logits
        shape = (samples, *q.batch_shape, *q.event_shape)
        return torch.rand(shape, dtype=logits.dtype, device=logits.device).clamp_min(
            torch.finfo(logits.dtype).eps
        )
    return uniform_from_normal(noise)


def _kl(q: DiscreteCode, p: Distribution, z: Tensor, method: str) -> Tensor:
    """KL(q ‖ p) ``[batch]``: the registered closed form, or Monte Carlo from ``z`` if asked."""
    if method == "monte_carlo":
        return (q.log_prob(z) - p.log_prob(z)).mean(0)
    return kl_divergence(q, p)


def _uses_every_parameter(state: EstimatorState | None) -> Tensor | float:
    """0 with a gradient path to the estimator's parameters, so that data-parallel workers see
    every parameter take part in a step whose estimator has no use for the baseline."""
    if state is None:
        return 0.0
    return sum((0.0 * p.sum() for p in state.parameters()), torch.zeros(()))


def _advantage(
    signal: Tensor, x: Tensor, state: EstimatorState | None, baseline: bool
) -> tuple[Tensor, Tensor | float]:
    """NVIL's centred, normalised learning signal for ``signal`` ``[S, batch]`` (detached) and
    the baseline's loss ``[batch]``, ½ (signal − b_ψ(x))² averaged over the S draws."""
    if state is None or not baseline:
        return signal, _uses_every_parameter(state)
    b = state.baseline(x).squeeze(-1)  # [batch]
    centred = signal - b.detach()
    update_signal_moments(state)  # a step whose caller did not settle its moments
    advantage = (centred - state.signal_mean) / _signal_scale(state)
    if torch.is_grad_enabled() and state.training:
        # The moments move after they are used, by the whole batch's centred signal: the
        # trainer settles them after the step, summed over the workers.
        state.pending = torch.stack(
            [centred.sum(), centred.pow(2).sum(), centred.new_tensor(centred.numel())]
        ).detach()
    return advantage, 0.5 * (signal - b).pow(2).mean(0)


def _signal_scale(state: EstimatorState) -> Tensor:
    """NVIL's variance normalisation: the running standard deviation of the centred signal,
    at least 1, which the advantage is divided by."""
    return state.signal_var.sqrt().clamp_min(1.0)


def update_signal_moments(
    posterior: nn.Module | EstimatorState | None,
    total: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Move NVIL's running moments by the centred signal of the last training step (its sum,
    sum of squares and count, summed over the workers by ``total`` when given), once; the
    trainer calls it after each step so that one and N workers keep the same moments."""
    state = posterior if isinstance(posterior, EstimatorState) else None
    if posterior is not None and state is None:
        state = estimator_state(posterior)
    if state is None or state.pending is None:
        return
    sums = state.pending.double().cpu()
    state.pending = None
    if total is not None:
        sums = total(sums)
    count = float(sums[2])
    mean = float(sums[0]) / count
    var = max(float(sums[1]) / count - mean**2, 0.0)
    with torch.no_grad():
        state.signal_mean.mul_(MOMENT_DECAY).add_((1 - MOMENT_DECAY) * mean)
        state.signal_var.mul_(MOMENT_DECAY).add_((1 - MOMENT_DECAY) * var)


def state_log_likelihoods(
    likelihood: Likelihood, x: Tensor, states: Tensor, offset: Tensor | None = None
) -> Tensor:
    """log p(x|z) ``[S, batch]`` for every state ``[S, latent]`` and example ``x [batch, …]``,
    plus ``offset [S]`` per state when given (log p(z), added in the same pass).

    The decoder reads each state once. For the Bernoulli likelihood with logits L ``[S, n]`` the
    whole table is x·log σ(L)ᵀ + (1 − x)·log σ(−L)ᵀ, and since log σ(l) = l + log σ(−l) that
    is one matrix product, x·Lᵀ + Σᵢ log σ(−Lᵢ) (half the work of two; the two terms may be
    large and opposite, so float32 keeps about 1e-3 nats on 784 pixels); other likelihoods score
    every pair, ``STATE_CHUNK`` states at a time."""
    parts = []
    for start in range(0, states.shape[0], STATE_CHUNK):
        chunk = states[start : start + STATE_CHUNK]
        extra = None if offset is None else offset[start : start + STATE_CHUNK].unsqueeze(-1)
        if isinstance(likelihood, BernoulliLikelihood):
            (logits,) = likelihood.decoder_params(chunk)
            logits = logits.flatten(1)  # [s, n]
            constant = F.logsigmoid(-logits).sum(-1, keepdim=True)  # [s, 1]
            constant = constant if extra is None else constant + extra
            # One pass over the [s, batch] table: constant + L·xᵀ.
            part = torch.addmm(constant, logits, x.flatten(1).to(logits).T)
        else:
            expanded = chunk.unsqueeze(1).expand(-1, x.shape[0], -1)
            part = likelihood.log_prob(x, expanded)
            part = part if extra is None else part + extra
        parts.append(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def state_weights(log_q: Tensor) -> Tensor:
    """q = exp(log q), with every q below √tiny (tiny: the dtype's smallest normal number; float32
    e^−43.7) set to exactly 0.

    A sharp posterior puts many of its 2^D states far below that: left in, their q and their
    products in the weighted sum and its backward were subnormal floats, which made an
    enumerated step several times slower on a CPU (16 units after two epochs on MNIST: 7 % of
    the table under e^−87, a step of batch 1,000 in 14 s instead of 4). Above √tiny, a weight
    times any number above √tiny stays normal. What is dropped is below 2^D · √tiny · |log
    p(x|z)| (float32, 2^16 states: 10⁻¹⁴ relative), far under float rounding."""
    cut = 0.5 * math.log(torch.finfo(log_q.dtype).tiny)
    return log_q.masked_fill(log_q < cut, -math.inf).exp()


def enumerated_elbo(
    x: Tensor, q: DiscreteCode, p: Distribution, likelihood: Likelihood
) -> tuple[Tensor, Tensor]:
    """The exact E_q[log p(x|z)] = Σ_z q(z|x) log p(x|z) and KL(q ‖ p), each ``[batch]``,
    differentiable in every parameter."""
    if q.state_count > MAX_ENUMERATED_STATES:
        raise ValueError(
            f"gradient='enumerate' would sum over {q.state_count} states, more than "
            f"{MAX_ENUMERATED_STATES}; use 'reinforce', 'vimco' or 'relaxed'"
        )
    states = q.enumerate_support(expand=False).flatten(0, -2)  # [S, latent]
    log_q = q.state_log_probs(states)  # [S, batch], one matrix product
    reconstruction = (state_weights(log_q) * state_log_likelihoods(likelihood, x, states)).sum(0)
    return reconstruction, kl_divergence(q, p)


def discrete_elbo(
    x: Tensor,
    q: DiscreteCode,
    posterior: nn.Module,
    p: Distribution,
    likelihood: Likelihood,
    *,
    samples: int = 1,
    beta: float = 1.0,
    kl: str = "auto",
    noise: Tensor | None = None,
    gradient: str = "reinforce",
    baseline: bool = True,
) -> ElboParts:
    """(reconstruction, kl, elbo, objective), each ``[batch]``, of a discrete code: the ELBO
    with ``samples`` discrete draws and its closed-form KL (or every state, ``"enumerate"``),
    whose ``objective`` has the value reconstruction − β KL and the gradient of ``gradient``.
    ``baseline=False`` is plain REINFORCE (no baseline, no normalisation), for comparisons."""
    state = estimator_state(posterior)
    if gradient == "enumerate":
        reconstruction, kl_value = enumerated_elbo(x, q, p, likelihood)
        objective = reconstruction - beta * kl_value + _uses_every_parameter(state)
        bound = reconstruction - kl_value
        return reconstruction.detach(), kl_value.detach(), bound.detach(), objective
    u = _uniform(q, noise, samples)
    z = q.from_uniform(u)  # [L, batch, latent], no gradient
    kl_value = _kl(q, p, z, kl)
    if gradient == "relaxed":
        with torch.no_grad():
            reconstruction = likelihood.log_prob(x, z).mean(0)
        relaxed = _relaxed_code(q, u, z, state)
        surrogate = likelihood.log_prob(x, relaxed).mean(0) - beta * kl_value
        surrogate = surrogate + _uses_every_parameter(state)
    else:  # reinforce
        log_px = likelihood.log_prob(x, z)  # [L, batch]
        reconstruction = log_px.mean(0)
        advantage, baseline_loss = _advantage(log_px.detach(), x, state, baseline)
        score = (advantage * q.log_prob(z)).mean(0)
        # NVIL divides its whole learning signal, log p(x, z) − log q(z|x), by one scale; the KL
        # part, differentiated here in closed form, takes the same factor, so that the encoder's
        # gradient stays the ELBO's up to one positive factor (an unscaled KL would outweigh
        # the normalised score and pull q onto the prior).
        scale = _signal_scale(state) if state is not None and baseline else 1.0
        kl_gradient = _with_gradient(kl_value, kl_value / scale)
        surrogate = reconstruction + score - beta * kl_gradient - baseline_loss
    bound = reconstruction - kl_value
    weighted = reconstruction - beta * kl_value
    return (
        reconstruction.detach(),
        kl_value.detach(),
        bound.detach(),
        _with_gradient(weighted, surrogate),
    )


def _relaxed_code(q: DiscreteCode, u: Tensor, z: Tensor, state: EstimatorState | None) -> Tensor:
    """The relaxed draw from ``u`` at the state's temperature, or with straight-through the
    discrete draw ``z`` in value and the relaxed one's gradient."""
    temperature = 1.0 if state is None else state.temperature
    relaxed = q.relaxed_from_uniform(u, temperature)
    if state is not None and state.straight_through:
        return z + (relaxed - relaxed.detach())
    return relaxed


def leave_one_out_bounds(log_w: Tensor) -> Tensor:
    """VIMCO's L̂₋ᵢ ``[k, batch]`` for log weights ``[k, batch]``: the IWAE bound with log wᵢ
    replaced by the mean of the other k − 1 log weights (Mnih & Rezende 2016, eq. 8)."""
    k = log_w.shape[0]
    others = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # [k, batch]
    table = log_w.unsqueeze(0).expand(k, *log_w.shape).clone()  # [i, j, batch]
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device)
    table[eye] = others
    return torch.logsumexp(table, dim=1) - math.log(k)


def discrete_iwae(
    x: Tensor,
    q: DiscreteCode,
    posterior: nn.Module,
    p: Distribution,
    likelihood: Likelihood,
    *,
    k: int = 1,
    noise: Tensor | None = None,
    gradient: str = "reinforce",
    baseline: bool = True,
) -> IwaeParts:
    """(bound, log_weights, objective, reconstruction, kl) of the IWAE bound with k discrete
    draws, its gradient by ``"reinforce"`` (NVIL's baseline on L̂), ``"vimco"`` or
    ``"relaxed"``; the values are the discrete draws'."""
    state = estimator_state(posterior)
    u = _uniform(q, noise, k)
    z = q.from_uniform(u)  # [k, batch, latent]
    if gradient == "relaxed":
        with torch.no_grad():
            log_px = likelihood.log_prob(x, z)
            log_ratio = q.log_prob(z) - p.log_prob(z)
        relaxed = _relaxed_code(q, u, z, state)
        relaxed_w = likelihood.log_prob(x, relaxed) + p.log_prob(relaxed) - q.log_prob(relaxed)
        surrogate = torch.logsumexp(relaxed_w, 0) - math.log(k) + _uses_every_parameter(state)
        log_w = log_px - log_ratio
        bound = torch.logsumexp(log_w, 0) - math.log(k)
    else:
        log_q = q.log_prob(z)
        log_px = likelihood.log_prob(x, z)
        log_ratio = log_q - p.log_prob(z)
        log_w = log_px - log_ratio  # [k, batch]
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        if gradient == "vimco":
            signal = bound.detach() - leave_one_out_bounds(log_w.detach())  # [k, batch]
            surrogate = bound + (signal * log_q).sum(0) + _uses_every_parameter(state)
        else:  # reinforce
            advantage, baseline_loss = _advantage(bound.detach().unsqueeze(0), x, state, baseline)
            surrogate = bound + advantage[0] * log_q.sum(0) - baseline_loss
    return (
        bound.detach(),
        log_w.detach(),
        _with_gradient(bound, surrogate),
        log_px.mean(0).detach(),
        log_ratio.mean(0).detach(),
    )
