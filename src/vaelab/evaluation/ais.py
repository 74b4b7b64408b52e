"""Annealed importance sampling of log p(x) with Hamiltonian Monte Carlo, and its reverse (BDMC).

AIS (Neal 2001) walks from the prior to the posterior through the geometric path

    f_t(z) = p(z) p(x|z)^{β_t},   0 = β_0 < β_1 < … < β_T = 1,

so that Z_0 = 1 and Z_T = ∫ p(z) p(x|z) dz = p(x). A chain starts at z_0 ~ p(z) and alternates a
weight update and a transition T_t that leaves f_t / Z_t invariant:

    log w = Σ_{t=1..T} log f_t(z_{t−1}) − log f_{t−1}(z_{t−1}) = Σ_t (β_t − β_{t−1}) log p(x | z_{t−1}),
    z_t ~ T_t(· | z_{t−1}).

E[w] = p(x), so log of the mean over chains is a stochastic lower bound of log p(x) (Jensen).
Decoder-based models are evaluated this way by Wu, Burda, Salakhutdinov & Grosse (2017): the
transitions are Hamiltonian Monte Carlo (Neal 2011), leapfrog steps with unit mass on the
potential U_t(z) = −log p(z) − β_t log p(x|z), gradients by autograd, and a step size adapted
towards an acceptance rate of 0.65.

Reverse AIS runs the same path backwards, from an exact posterior sample z_T ~ p(z|x) to the
prior; its weight is an unbiased estimate of Z_0 / Z_T = 1 / p(x), so −log of its mean is a
stochastic *upper* bound. Exact posterior samples exist for data simulated from the model:
draw z ~ p(z), then x ~ p(x|z). On such data the true log p(x) is sandwiched between forward and
reverse AIS: bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015).

A conditional model is annealed from p(z|y) to p(z|x, y) for each example's own condition y
(``condition=``), which estimates log p(x|y).

Step sizes come from *pilot chains*. AIS is unbiased for any sequence of transitions fixed in
advance, but not when a chain's step size follows its own acceptances: the transitions then depend
on the chain's history. That bias is not academic: adapting each chain on its own (200 steps,
rate 0.1), forward AIS on a 12-dimensional pPCA model came out 0.13 to 0.16 nats *above* the exact
log p(x), 5 standard errors: a "lower bound" above the truth. Here a few extra pilot chains per example run alongside, share its
transitions, and alone drive the adaptation; their weights are discarded. The estimating chains'
step sizes then depend only on the pilots' independent randomness, and the estimate keeps its
guarantee. The step sizes used, per transition and example, are returned, and reverse AIS reuses
them backwards, so both directions apply the same transitions T_t, as BDMC prescribes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.distributions import Distribution
from tqdm.auto import tqdm

from vaelab.components.discrete import DISCRETE_PRIORS
from vaelab.components.likelihoods import Likelihood
from vaelab.evaluation.loglik import (
    LogLikelihoodEstimate,
    model_device_dtype,
    prepare_condition,
    prepare_data,
    summarise_log_weights,
)
from vaelab.model.vae_model import VAEModel, given_rows
from vaelab.objectives.noise import ExampleNoise, seeded

__all__ = [
    "SCHEDULES",
    "AisEstimate",
    "BdmcResult",
    "HmcSettings",
    "ais",
    "annealing_schedule",
    "bdmc",
    "reverse_ais",
    "simulate",
]


def _linear(steps: int, delta: float) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


def _sigmoid(steps: int, delta: float) -> torch.Tensor:
    # Grosse et al. (2015), Wu et al. (2017): β̃_t = σ(δ (2t/T − 1)), rescaled to run from 0 to 1.
    # It spends more steps near both ends than the linear path, where log f_t changes fastest.
    raw = torch.sigmoid(delta * torch.linspace(-1.0, 1.0, steps + 1, dtype=torch.float64))
    return (raw - raw[0]) / (raw[-1] - raw[0])


SCHEDULES: dict[str, Callable[[int, float], torch.Tensor]] = {
    "linear": _linear,
    "sigmoid": _sigmoid,
}


def annealing_schedule(steps: int, kind: str = "sigmoid", *, delta: float = 4.0) -> torch.Tensor:
    """Inverse temperatures β_0 = 0 < … < β_T = 1, float64 ``[steps + 1]``.

    ``kind`` is ``"linear"`` (β_t = t / T) or ``"sigmoid"`` (β̃_t = σ(δ (2t/T − 1)), then
    (β̃_t − β̃_0) / (β̃_T − β̃_0); Grosse et al. 2015), ``delta`` its steepness.
    """
    if steps < 1:
        raise ValueError(
            f"steps must be a positive number of intermediate distributions, got {steps}"
        )
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")
    if delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")
    return SCHEDULES[kind](steps, delta)


def _check_betas(betas: torch.Tensor) -> torch.Tensor:
    betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
    if betas.numel() < 2 or float(betas[0]) != 0.0 or float(betas[-1]) != 1.0:
        raise ValueError("a schedule must run from β = 0 to β = 1 with at least two entries")
    if bool((betas.diff() < 0).any()):
        raise ValueError("a schedule's inverse temperatures must not decrease")
    return betas


@dataclass(frozen=True)
class HmcSettings:
    """Hamiltonian Monte Carlo transitions (Neal 2011): ``leapfrog_steps`` steps of size ε per
    transition, unit mass, one ε per example shared by all its chains.

    ε starts at ``step_size``. With ``adapt_step_size``, ``pilot_chains`` extra chains per example
    drive the adaptation (see the module docstring); the rule, applied to the pilots' mean
    acceptance probability min(1, e^{−ΔH}), multiplies ε by 1 + rate when it is above
    ``target_acceptance`` and by 1 − rate otherwise:

    - first, ``warmup`` transitions at the starting distribution with rate ``warmup_adaptation``:
      they leave it invariant, add nothing to the weights, and find its scale in a few steps;
    - then, during annealing, rate ``adaptation`` applied to an exponential average of the
      acceptance (weight ``acceptance_decay`` on the past), tracking the posterior as it narrows.

    Without adaptation ε stays at ``step_size``. ε is kept within [``min_step_size``,
    ``max_step_size``].
    """

    leapfrog_steps: int = 10
    step_size: float = 0.05
    adapt_step_size: bool = True
    pilot_chains: int = 4
    target_acceptance: float = 0.65
    adaptation: float = 0.05
    acceptance_decay: float = 0.9
    warmup: int = 20
    warmup_adaptation: float = 0.25
    min_step_size: float = 1e-6
    max_step_size: float = 10.0

    def validate(self) -> None:
        checks = [
            (self.leapfrog_steps >= 1, f"leapfrog_steps must be ≥ 1, got {self.leapfrog_steps}"),
            (self.step_size > 0, f"step_size must be positive, got {self.step_size}"),
            (self.pilot_chains >= 1, f"pilot_chains must be ≥ 1, got {self.pilot_chains}"),
            (
                0 < self.target_acceptance < 1,
                f"target_acceptance must lie in (0, 1), got {self.target_acceptance}",
            ),
            (0 <= self.adaptation < 1, f"adaptation must lie in [0, 1), got {self.adaptation}"),
            (
                0 <= self.warmup_adaptation < 1,
                f"warmup_adaptation must lie in [0, 1), got {self.warmup_adaptation}",
            ),
            (self.warmup >= 0, f"warmup must be a number of transitions ≥ 0, got {self.warmup}"),
            (
                0 <= self.acceptance_decay < 1,
                f"acceptance_decay must lie in [0, 1), got {self.acceptance_decay}",
            ),
            (
                0 < self.min_step_size <= self.max_step_size,
                "need 0 < min_step_size ≤ max_step_size",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def pilots(self) -> int:
        """Pilot chains actually run: none without adaptation."""
        return self.pilot_chains if self.adapt_step_size else 0


@dataclass(frozen=True)
class AisEstimate(LogLikelihoodEstimate):
    """A :class:`~vaelab.evaluation.loglik.LogLikelihoodEstimate` from (reverse) AIS, with the sampler's
    health: the mean HMC acceptance probability of the estimating chains over all transitions,
    and the step size of every transition for every example, ``step_sizes [steps − 1, n]``
    (row t − 1 is the transition at β_t, in forward order), which :func:`reverse_ais` reuses."""

    acceptance_rate: float
    step_sizes: torch.Tensor
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "steps": self.steps, "acceptance_rate": self.acceptance_rate}


class _State(NamedTuple):
    """A batch of chains ``[chains, batch, …]`` with log p(z), log p(x|z) and their gradients."""

    z: torch.Tensor
    log_prior: torch.Tensor
    log_lik: torch.Tensor
    grad_prior: torch.Tensor
    grad_lik: torch.Tensor


@contextmanager
def _without_argument_checks() -> Iterator[None]:
    """torch.distributions' argument validation off for the block, as it was after it.

    The checks guard a user's inputs; the codes the sampler evaluates are its own. A leapfrog
    trajectory that diverges lands on NaN or infinite codes, or on codes so large that the
    decoder's parameters are NaN; validation would raise there (``Expected value argument … to
    be within the support``), before the Metropolis test could reject the step as it must.
    Instances built without ``validate_args`` read the class default when they check, so this
    covers the prior already built as well as the likelihood built inside ``log_prob``.
    """
    validating = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(validating)


class _Target:
    """log p(z) and log p(x|z) for fixed x, evaluated with their gradients in z.

    A code that is not finite has log p(z) = log p(x|z) = −∞ (its density is 0 on the real
    line), whatever the distributions make of it, so a proposal reaching one is rejected by
    :func:`_hmc`; energies that come out NaN (NaN decoder parameters) are rejected there too.
    """

    def __init__(self, x: torch.Tensor, prior: Distribution, likelihood: Likelihood) -> None:
        self.x, self.prior, self.likelihood = x, prior, likelihood

    def __call__(self, z: torch.Tensor) -> _State:
        # Two leaves holding the same z give the two gradients separately from one backward
        # pass: the state is reused at the next, different, temperature.
        with torch.enable_grad(), _without_argument_checks():
            z_prior = z.detach().requires_grad_(True)
            z_lik = z.detach().requires_grad_(True)
            log_prior = self.prior.log_prob(z_prior)  # [chains, batch]
            log_lik = self.likelihood.log_prob(self.x, z_lik)  # [chains, batch]
            grad_prior, grad_lik = torch.autograd.grad(
                log_prior.sum() + log_lik.sum(), (z_prior, z_lik)
            )
        finite = torch.isfinite(z).flatten(2).all(-1)  # [chains, batch]
        log_prior = torch.where(finite, log_prior.detach(), -math.inf)
        log_lik = torch.where(finite, log_lik.detach(), -math.inf)
        return _State(z.detach(), log_prior, log_lik, grad_prior, grad_lik)


def _where(mask: torch.Tensor, new: _State, old: _State) -> _State:
    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - mask.dim())), a, b)

    return _State(*(pick(a, b) for a, b in zip(new, old, strict=True)))


def _hmc(
    state: _State,
    beta: float,
    step_size: torch.Tensor,
    target: _Target,
    leapfrog_steps: int,
    noise: ExampleNoise,
) -> tuple[_State, torch.Tensor]:
    """One HMC transition leaving p(z) p(x|z)^β invariant, step size ``[batch]`` per example;
    returns the new state and each chain's acceptance probability min(1, e^{−ΔH}),
    ``[chains, batch]``."""
    eps = step_size.unsqueeze(-1)  # [batch, 1], broadcast over chains and latent units

    def grad(s: _State) -> torch.Tensor:
        return s.grad_prior + beta * s.grad_lik

    momentum0 = noise.normal(state.z.shape[0], state.z.shape[2:], like=state.z)
    momentum = momentum0 + 0.5 * eps * grad(state)
    proposal = state
    for step in range(leapfrog_steps):
        proposal = target(proposal.z + eps * momentum)
        last = step == leapfrog_steps - 1
        momentum = momentum + (0.5 if last else 1.0) * eps * grad(proposal)
    log_f0 = state.log_prior + beta * state.log_lik
    log_f1 = proposal.log_prior + beta * proposal.log_lik
    # log acceptance ratio −ΔH = [log f₁ − |p₁|²/2] − [log f₀ − |p₀|²/2]; a diverged
    # trajectory (inf or NaN) is rejected rather than allowed to poison the chain.
    log_ratio = (log_f1 - 0.5 * momentum.square().sum(-1)) - (
        log_f0 - 0.5 * momentum0.square().sum(-1)
    )
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf, posinf=-math.inf)
    accept = noise.uniform(log_ratio.shape[0], like=log_ratio).log() < log_ratio
    return _where(accept, proposal, state), log_ratio.clamp(max=0.0).exp()


def _adapt(
    step_size: torch.Tensor, acceptance: torch.Tensor, rate: float, settings: HmcSettings
) -> torch.Tensor:
    """ε · (1 + rate) where ``acceptance`` is above the target, ε · (1 − rate) elsewhere."""
    factor = torch.where(acceptance > settings.target_acceptance, 1.0 + rate, 1.0 - rate)
    return (step_size * factor).clamp(settings.min_step_size, settings.max_step_size)


def _anneal(
    state: _State,
    betas: list[float],
    chains: int,
    target: _Target,
    settings: HmcSettings,
    step_sizes: torch.Tensor | None,
    noise: ExampleNoise,
    bar: Any,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Run the chains along ``betas`` (increasing for AIS, decreasing for reverse AIS).

    ``state`` holds the ``chains`` estimating chains first, then the pilots. ``step_sizes``, if
    given, fixes ε for transition t (row t − 1, ``[batch]``) and turns adaptation off.

    Returns, for the estimating chains, log w ``[chains, batch]`` = Σ_t (β_t − β_{t−1})
    log p(x|z_{t−1}), which estimates log Z_last − log Z_first; their mean acceptance
    probability; and the step sizes used, ``[len(betas) − 2, batch]`` in the order of ``betas``.
    """
    batch = state.z.shape[1]
    log_w = torch.zeros((chains, batch), dtype=torch.float64, device=state.z.device)
    adapt = step_sizes is None and settings.adapt_step_size
    step_size = state.log_lik.new_full((batch,), settings.step_size)
    running = state.log_lik.new_full((batch,), settings.target_acceptance)
    used = []
    acceptance = 0.0
    leapfrog = settings.leapfrog_steps
    for _ in range(settings.warmup if adapt else 0):
        state, accept_prob = _hmc(state, betas[0], step_size, target, leapfrog, noise)
        pilot_rate = accept_prob[chains:].mean(0)
        step_size = _adapt(step_size, pilot_rate, settings.warmup_adaptation, settings)
    for t in range(1, len(betas)):
        log_w = log_w + (betas[t] - betas[t - 1]) * state.log_lik[:chains].double()
        bar.update(1)
        if t == len(betas) - 1:
            break  # the last weight update needs no transition after it
        if step_sizes is not None:
            step_size = step_sizes[t - 1]
        used.append(step_size)
        state, accept_prob = _hmc(state, betas[t], step_size, target, leapfrog, noise)
        acceptance += float(accept_prob[:chains].mean())
        if adapt:
            decay = settings.acceptance_decay
            running = decay * running + (1.0 - decay) * accept_prob[chains:].mean(0)
            step_size = _adapt(step_size, running, settings.adaptation, settings)
    transitions = len(betas) - 2
    used_tensor = torch.stack(used) if used else state.log_lik.new_zeros((0, batch))
    return log_w, acceptance / max(transitions, 1), used_tensor


def _run(
    model: VAEModel,
    x: torch.Tensor,
    condition: torch.Tensor | None,
    start: Callable[[slice, int, ExampleNoise, Distribution], torch.Tensor],
    *,
    reverse: bool,
    chains: int,
    betas: torch.Tensor,
    settings: HmcSettings,
    step_sizes: torch.Tensor | None,
    batch_size: int,
    seed: int | None,
    progress: bool,
) -> AisEstimate:
    """Shared driver of forward and reverse AIS over batches of examples (given their rows of
    ``condition`` for a conditional model). ``start(index, pilots, noise, prior)`` gives the
    initial codes ``[chains + pilots, batch, latent]`` of those examples, ``prior`` being
    theirs; ``step_sizes`` is in forward order. Every draw of an example (start, momenta,
    acceptance tests) comes from its own stream (``vaelab.objectives.noise.ExampleNoise`` keyed by
    ``seed``), and its step sizes adapt on its own pilots, so its estimate does not depend on
    the other examples or on ``batch_size``."""
    pilots = 0 if step_sizes is not None else settings.pilots
    path = (betas.flip(0) if reverse else betas).tolist()
    log_px, ess, se, used_steps = [], [], [], []
    accept_total, batches = 0.0, 0
    n = x.shape[0]
    total = -(-n // batch_size) * (len(path) - 1)
    name = "reverse AIS" if reverse else "AIS"
    with tqdm(total=total, desc=name, unit="step", disable=not progress) as bar:
        for first in range(0, n, batch_size):
            index = slice(first, min(first + batch_size, n))
            given = given_rows(model, condition, index)
            with torch.no_grad():
                prior = given.prior()
            target = _Target(x[index], prior, given.likelihood)
            noise = ExampleNoise(x[index], seed)
            state = target(start(index, pilots, noise, prior))
            fixed = None
            if step_sizes is not None:
                fixed = step_sizes[:, index].to(device=x.device, dtype=x.dtype)
                fixed = fixed.flip(0) if reverse else fixed
            log_w, acceptance, used = _anneal(
                state, path, chains, target, settings, fixed, noise, bar
            )
            # Forward: the weights estimate p(x). Reverse: they estimate 1 / p(x), and the
            # bound is −log of their mean; the delta-method error of a log is the same.
            log_mean, b_ess, b_se = summarise_log_weights(
                torch.logsumexp(log_w, 0), torch.logsumexp(2.0 * log_w, 0), chains
            )
            log_px.append((-log_mean if reverse else log_mean).cpu())
            ess.append(b_ess.cpu())
            se.append(b_se.cpu())
            used_steps.append((used.flip(0) if reverse else used).double().cpu())
            accept_total += acceptance
            batches += 1
    return AisEstimate(
        log_px=torch.cat(log_px),
        mc_standard_error=torch.cat(se),
        effective_sample_size=torch.cat(ess),
        samples=chains,
        method="reverse-ais" if reverse else "ais",
        data_dim=math.prod(x.shape[1:]),
        acceptance_rate=accept_total / batches,
        step_sizes=torch.cat(used_steps, dim=1),
        steps=len(path) - 1,
    )


def _checked_inputs(
    model: VAEModel,
    x: Any,
    chains: int,
    batch_size: int,
    steps: int,
    schedule: str | torch.Tensor,
    hmc: HmcSettings | None,
    condition: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, HmcSettings]:
    """What both directions of AIS check and resolve first: the data ``[n, *data_shape]``, its
    conditions, the schedule β and the HMC settings."""
    if chains < 1:
        raise ValueError(f"chains must be a positive number, got {chains}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of examples, got {batch_size}")
    settings = hmc if hmc is not None else HmcSettings()
    settings.validate()
    if isinstance(schedule, str):
        betas = annealing_schedule(steps, schedule)
    else:
        betas = _check_betas(schedule)
    x = prepare_data(model, x)
    return x, prepare_condition(model, condition, x.shape[0]), betas, settings


def ais(
    model: VAEModel,
    x: Any,
    *,
    chains: int = 16,
    steps: int = 500,
    schedule: str | torch.Tensor = "sigmoid",
    hmc: HmcSettings | None = None,
    batch_size: int = 100,
    seed: int | None = None,
    progress: bool = False,
    condition: Any = None,
) -> AisEstimate:
    """AIS estimate of each example's log p(x) under a ``VAEModel``, in nats (log p(x|y) of a
    conditional model, given ``condition`` y ``[n, c]`` aligned with x): a stochastic lower
    bound, log of the mean over ``chains`` independent chains of their weights. With a ``seed``,
    each example's chains draw from streams keyed by its values (``vaelab.objectives.noise``): reproducible,
    and independent of the other examples passed with it.

    ``steps`` intermediate distributions on the ``schedule`` (``"sigmoid"``, ``"linear"`` or an
    explicit non-decreasing tensor of β from 0 to 1), HMC transitions configured by ``hmc``.
    Chains and examples are batched together: one decoder call evaluates
    ``(chains + pilot_chains) · batch_size`` codes. Cost per batch: ``(steps + warmup) ·
    leapfrog_steps`` decoder forward and backward passes.
    """
    if isinstance(model.prior, DISCRETE_PRIORS):
        raise ValueError(
            "AIS moves z by Hamiltonian Monte Carlo, which needs a continuous code, and this "
            "model's is discrete; use exact_log_likelihood (vaelab.evaluation.exact) instead"
        )
    x, condition, betas, settings = _checked_inputs(
        model, x, chains, batch_size, steps, schedule, hmc, condition
    )

    def start(index: slice, pilots: int, noise: ExampleNoise, prior: Distribution) -> torch.Tensor:
        return noise.sample(prior, chains + pilots)  # [chains + pilots, batch, latent]

    return _run(
        model,
        x,
        condition,
        start,
        reverse=False,
        chains=chains,
        betas=betas,
        settings=settings,
        step_sizes=None,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )


def reverse_ais(
    model: VAEModel,
    x: Any,
    z: torch.Tensor,
    *,
    chains: int = 16,
    steps: int = 500,
    schedule: str | torch.Tensor = "sigmoid",
    hmc: HmcSettings | None = None,
    step_sizes: torch.Tensor | None = None,
    batch_size: int = 100,
    seed: int | None = None,
    progress: bool = False,
    condition: Any = None,
) -> AisEstimate:
    """Reverse AIS: a stochastic *upper* bound on each example's log p(x), in nats (log p(x|y)
    given ``condition`` for a conditional model).

    ``z`` must be exact posterior samples, ``[batch, latent]`` (every chain of an example starts
    there) or ``[chains, batch, latent]``: the latent codes that generated ``x`` when ``x`` was
    simulated from the model (:func:`simulate`), or draws from a closed-form posterior. Starting
    anywhere else voids the bound. The path is that of :func:`ais`, walked from β = 1 to β = 0;
    the mean over chains of the weights estimates 1 / p(x) without bias, and the result is
    −log of that mean.

    ``step_sizes``: the ``AisEstimate.step_sizes`` of a forward run on the same ``x`` with the
    same ``steps`` and ``schedule`` (what :func:`bdmc` passes). Both directions then use the same
    transitions, fixed independently of the reverse chains. Without it, pilot chains started
    from ``z`` adapt the step sizes; those then depend on the starting codes, a small departure
    from the conditions of the bound.
    """
    x, condition, betas, settings = _checked_inputs(
        model, x, chains, batch_size, steps, schedule, hmc, condition
    )
    z = torch.as_tensor(z).to(device=x.device, dtype=x.dtype)
    latent = (model.latent_dim,)
    if tuple(z.shape) == (x.shape[0], *latent):
        z = z.expand(chains, *z.shape)
    if tuple(z.shape) != (chains, x.shape[0], *latent):
        raise ValueError(
            f"z must be exact posterior samples [batch, latent] = {(x.shape[0], *latent)} or "
            f"[chains, batch, latent] = {(chains, x.shape[0], *latent)}, got {tuple(z.shape)}"
        )
    if step_sizes is not None:
        expected = (betas.numel() - 2, x.shape[0])
        if tuple(step_sizes.shape) != expected:
            raise ValueError(
                f"step_sizes must be [steps − 1, n] = {expected} (the step_sizes of a forward "
                f"ais run with the same steps and schedule), got {tuple(step_sizes.shape)}"
            )

    def start(index: slice, pilots: int, noise: ExampleNoise, prior: Distribution) -> torch.Tensor:
        codes = z[:, index]
        cycle = torch.arange(pilots, device=codes.device) % chains
        return torch.cat([codes, codes[cycle]])

    return _run(
        model,
        x,
        condition,
        start,
        reverse=True,
        chains=chains,
        betas=betas,
        settings=settings,
        step_sizes=step_sizes,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )


@torch.no_grad()
def simulate(model: VAEModel, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` draws from the model's joint: z ~ p(z), x ~ p(x|z). Returns ``(x [n, *data_shape],
    z [n, latent])``; each z is an exact sample of p(z | x) for its x. ``seed`` makes the draws
    reproducible (``None``: fresh ones); the caller's random state is left as it was. A
    conditional model given n conditions (``model.given(y)``) draws example i given y_i."""
    if n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n}")
    with seeded(seed, model_device_dtype(model)[0]):
        z = model.sample_latent(n)
        x = model.likelihood(z).sample()
    return x, z


class BdmcResult(NamedTuple):
    """Bidirectional Monte Carlo on simulated data: ``lower`` (AIS) ≤ log p(x) ≤ ``upper``
    (reverse AIS) in expectation, per example; ``x`` and ``z`` are the simulated pairs."""

    lower: AisEstimate
    upper: AisEstimate
    x: torch.Tensor
    z: torch.Tensor

    @property
    def gap(self) -> float:
        """Mean upper − lower bound, nats: how far AIS with these settings can be from the truth
        on data like this. Grosse et al. (2015) read it as the error of the sampler."""
        return self.upper.mean - self.lower.mean


def bdmc(
    model: VAEModel,
    n: int = 100,
    *,
    seed: int | None = None,
    condition: Any = None,
    **settings: Any,
) -> BdmcResult:
    """Sandwich log p(x) on ``n`` examples simulated from the model: forward AIS from the prior
    and reverse AIS from the generating latent codes, with the same ``settings`` (the keyword
    arguments of :func:`ais`) and the forward run's step sizes, so that both directions apply
    the same transitions. A conditional model simulates example i given row i of ``condition``
    ``[n, c]``, and both directions anneal given it."""
    condition = prepare_condition(model, condition, n)
    x, z = simulate(model if condition is None else model.given(condition), n, seed)
    lower = ais(model, x, seed=seed, condition=condition, **settings)
    upper = reverse_ais(
        model, x, z, step_sizes=lower.step_sizes, seed=seed, condition=condition, **settings
    )
    return BdmcResult(lower, upper, x, z)
