"""Objectives: the evidence lower bound and the importance-weighted bound, as pure functions.

Both take data ``x: [batch, *data_shape]`` and the three components (posterior q(z|x), prior p(z),
likelihood p(x|z)) and return named per-example terms in nats: every log-density is summed over data
and latent dimensions, nothing is averaged over the batch (the trainer alone does that, and negates
once).

    log p(x) = ELBO + KL(q(z|x) ‖ p(z|x)) ≥ ELBO = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z))

The KL term is exact where ``torch.distributions.kl_divergence`` has a closed form registered (vaelab
registers the Gaussian pairs torch lacks in ``vaelab.distributions.kl``) and a Monte Carlo estimate from the same
samples otherwise: Kingma & Welling's (2014) estimators B and A. That choice is made in ``kl_term``
and nowhere else.

Training maximises ``objective``, a per-example surrogate whose value is the (β-weighted) bound and
whose gradient is the one ``gradient=`` chooses; the bound itself is always what is reported:

- ``"standard"``: the reparameterised gradient of the bound (Kingma & Welling 2014; Burda et al.
  2016). ``objective`` is the bound's own tensor.
- ``"stl"``, sticking the landing (Roeder, Wu & Duvenaud 2017): log q(z) is evaluated with q's
  parameters stopped (``vaelab.distributions.stop_gradient``) while z stays reparameterised, which
  drops the score term ∂ log q_φ(z)/∂φ, zero in expectation. For the ELBO the gradient is
  unbiased and vanishes draw by draw where q is the exact posterior. For the IWAE bound with
  k > 1 it is biased (Tucker et al. 2018): the weights w̃ᵢ depend on zᵢ, so the dropped
  term Σᵢ w̃ᵢ ∂ log q_φ(zᵢ)/∂φ no longer averages to zero.
- ``"dreg"``, doubly reparameterised gradients for the IWAE bound (Tucker, Lawson, Gu & Maddison
  2018): encoder gradient Σᵢ w̃ᵢ² ∂ log wᵢ/∂zᵢ · ∂zᵢ/∂φ with q's parameters stopped,
  decoder gradient Σᵢ w̃ᵢ ∇_θ log wᵢ as in the standard one; unbiased for any k.

- ``"reinforce"``, ``"vimco"``, ``"relaxed"``, ``"enumerate"``: the estimators of a discrete code
  (``vaelab.objectives.discrete``), to which both bounds hand a discrete posterior; for such a
  code ``"standard"`` means enumeration up to ``ENUMERATE_BY_DEFAULT`` states (the ELBO), else
  REINFORCE with NVIL's baseline. Refused with a Gaussian code, as STL and DReG with a discrete one.

With a gradient other than ``"standard"`` every returned term but ``objective`` is detached: the
values are the same to the last bit, and only ``objective`` carries the chosen gradient.

Refused by ``check_objective``, each with a ``ValueError`` saying what to use instead (a
configuration can call it up front; ``objective_terms``, ``elbo`` and ``iwae_bound`` check what
their own arguments can get wrong):

- unknown names for ``objective``, ``gradient`` or ``kl``;
- ``gradient="dreg"`` with the ELBO: with one importance sample w̃ = 1 and DReG is STL;
- ``gradient="stl"`` with ``kl="analytic"``: STL's gradient comes from the Monte Carlo form
  log p(x|z) + log p(z) − log q(z), and the closed-form KL's gradient keeps the score term STL
  removes (``kl="auto"`` still reports the closed form);
- ``beta ≠ 1`` with the IWAE bound: β weighs the ELBO's KL term, which the IWAE bound does not
  have (a KL warm-up of the IWAE bound is ``iwae_bound``'s ``kl_weight``, for training only);
- ``kl`` other than ``"auto"`` with the IWAE bound, for the same reason.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaelab.components.likelihoods import Likelihood
from vaelab.distributions import kl as _registers_gaussian_kl  # noqa: F401  (import registers the closed forms)
from vaelab.distributions.sampling import (
    a_parameter,
    has_log_ratio_form,
    reparameterise,
    reparameterise_against,
    rsample_with_log_prob,
)
from vaelab.distributions.stop_gradient import stop_gradient
from vaelab.objectives.discrete import (
    DISCRETE_GRADIENTS,
    check_discrete_objective,
    discrete_elbo,
    discrete_iwae,
    is_discrete,
)

KL_METHODS = ("auto", "analytic", "monte_carlo")
OBJECTIVES = ("elbo", "iwae")
REPARAMETERISED_GRADIENTS = ("standard", "stl", "dreg")
GRADIENTS = (*REPARAMETERISED_GRADIENTS, *DISCRETE_GRADIENTS)
ENUMERATE_BY_DEFAULT = (
    2**8
)  # a discrete code's "standard" ELBO gradient sums up to this many states


class ElboTerms(NamedTuple):
    """Per-example terms of the ELBO, each ``[batch]``, in nats.

    ``objective`` is what training maximises: its value is reconstruction − β · KL (Higgins et al.
    2017), equal to ``elbo`` with β = 1, and its gradient is the chosen estimator's. ``elbo`` is
    always the bound itself.

    ``layer_kl`` ``[batch, L]``, where the draw gave it (a top-down posterior drawn through its
    prior's networks, ``_draw``), is each stochastic layer's share of the Monte Carlo ``kl``
    from the same draws, z₁'s first (``vaelab.objectives.layers``); else None.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    elbo: torch.Tensor
    objective: torch.Tensor
    layer_kl: torch.Tensor | None = None


class IwaeTerms(NamedTuple):
    """The importance-weighted bound ``[batch]``, its log weights ``[k, batch]``, ``objective``
    ``[batch]`` (what training maximises: the bound's value with the chosen estimator's gradient)
    and the two parts of the k draws' mean log weight, ``reconstruction`` = mean log p(x|zᵢ) and
    ``kl`` = mean [log q(zᵢ|x) − log p(zᵢ)] (Monte Carlo, ``[batch]``), whose difference
    ``elbo`` is the ELBO estimated from the same draws. ``layer_kl`` ``[batch, L]``: each
    stochastic layer's share of ``kl``, where the draw gave it (as ``ElboTerms.layer_kl``)."""

    bound: torch.Tensor
    log_weights: torch.Tensor
    objective: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    layer_kl: torch.Tensor | None = None

    @property
    def elbo(self) -> torch.Tensor:
        """(1/k) Σᵢ log wᵢ, ``[batch]``: the Monte Carlo ELBO from the bound's own draws."""
        return self.reconstruction - self.kl


def _check_gradient(gradient: str) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient estimator {gradient!r}; choose one of {GRADIENTS}")


def check_objective(objective: str, gradient: str, *, beta: float = 1.0, kl: str = "auto") -> None:
    """Raise a ``ValueError`` for a combination without a meaning (the module docstring lists them
    and why), so that a configuration can be refused before any data is seen; ``objective_terms``
    and ``elbo`` make the same checks when called."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    _check_gradient(gradient)
    if kl not in KL_METHODS:
        raise ValueError(f"unknown KL method {kl!r}; choose one of {KL_METHODS}")
    check_discrete_objective(objective, gradient)
    if objective == "elbo":
        if gradient == "dreg":
            raise ValueError(
                "gradient='dreg' is an estimator for the IWAE bound; with the ELBO (one "
                "importance sample) it equals 'stl', so use gradient='stl'"
            )
        if gradient == "stl" and kl == "analytic":
            raise ValueError(
                "gradient='stl' differentiates the Monte Carlo KL, log q(z) − log p(z) with q's "
                "parameters stopped, not the closed form; use kl='auto' (the closed form is "
                "still reported) or kl='monte_carlo'"
            )
        return
    if beta != 1.0:
        raise ValueError(
            f"beta={beta} weighs the ELBO's KL term, which the IWAE bound does not have; use "
            "beta=1 with objective='iwae', or objective='elbo' for a β-VAE"
        )
    if kl != "auto":
        raise ValueError(
            f"kl={kl!r} chooses how the ELBO's KL term is computed, and the IWAE bound has "
            "none; leave kl='auto' with objective='iwae'"
        )


def check_iwae_warmup(gradient: str, warming: bool) -> None:
    """Refuse a KL warm-up of the IWAE bound (``warming``: ``iwae_bound``'s β < 1, or a
    training configuration's warm-up) with a gradient other than the standard one: tempering
    log p(z) − log q(z|x) in the weights has no STL or DReG form."""
    if warming and gradient != "standard":
        raise ValueError(
            "a KL warm-up of the IWAE bound tempers log p(z) − log q(z|x) in its weights, which "
            f"has no gradient={gradient!r} form; use gradient='standard' with a warm-up, or no "
            "warm-up"
        )


def _discrete(gradient: str, q: Distribution, objective: str) -> str:
    """A discrete code's estimator. ``"standard"`` means the exact ELBO gradient by enumeration
    for a code of at most ``ENUMERATE_BY_DEFAULT`` states, else NVIL's REINFORCE."""
    if gradient != "standard":
        return gradient
    small = objective == "elbo" and getattr(q, "state_count", math.inf) <= ENUMERATE_BY_DEFAULT
    return "enumerate" if small else "reinforce"


def _check_discrete_code(q: Distribution, gradient: str) -> None:
    """A discrete estimator needs a discrete code, and a discrete code one of them."""
    if not is_discrete(q):
        raise ValueError(
            f"gradient={gradient!r} is an estimator for discrete latents; with a "
            f"{type(q).__name__} posterior use 'standard', 'stl' or 'dreg'"
        )
    if gradient in ("stl", "dreg"):
        raise ValueError(
            f"gradient={gradient!r} needs reparameterised draws, which a discrete latent has "
            "not; use 'reinforce', 'vimco' (objective='iwae'), 'relaxed' or 'enumerate'"
        )


def _value_with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value``'s numbers with ``surrogate``'s gradient. The bracket in
    value.detach() + (surrogate − surrogate.detach()) is exactly 0 for finite numbers, so the
    result equals ``value`` to the last bit, while a backward pass sees only ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def _draw(
    q: Distribution,
    p: Distribution,
    noise: torch.Tensor | None,
    sample_shape: tuple[int, ...],
    *,
    layers: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """z ``[*sample_shape, batch, latent]`` from q (from ``noise`` ε when given, else fresh),
    log q(z) where the same pass gives it (a flow), and with ``layers`` the per-layer
    log q_l − log p_l at z ``[*sample_shape, batch, L]`` where q computes p's densities on its
    way (a top-down chain drawn through p's own networks:
    ``vaelab.distributions.sampling.reparameterise_against``); else None."""
    if noise is None and layers and has_log_ratio_form(q):
        like = a_parameter(q)  # the same draw of ε as the chain's own rsample
        shape = q._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(shape, dtype=like.dtype, device=like.device)
    if noise is None:
        z, log_q = rsample_with_log_prob(q, sample_shape)
        return z, log_q, None
    if layers:
        return reparameterise_against(q, p, noise)
    z, log_q = reparameterise(q, noise)
    return z, log_q, None


def kl_term(
    q: Distribution,
    p: Distribution,
    z: torch.Tensor,
    method: str = "auto",
    log_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """KL(q ‖ p) per example, ``[batch]``, and whether it is exact.

    ``z: [samples, batch, latent]`` are draws from q, used only for the Monte Carlo estimate
    (1/L) Σₗ [log q(zₗ) − log p(zₗ)]; ``log_q`` ``[samples, batch]``, when given, is log q(z)
    from the pass that drew z (a flow's, which would otherwise cost an inverse).
    ``method="auto"`` takes the closed form when one is registered.
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
    return ((q.log_prob(z) if log_q is None else log_q) - p.log_prob(z)).mean(0), False


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
    gradient: str = "standard",
) -> ElboTerms:
    """The evidence lower bound with ``samples`` (L) reparameterised draws per example.

    ELBO(x) = (1/L) Σₗ log p(x | zₗ) − KL(q(z|x) ‖ p(z)),  zₗ = μ + σ ⊙ εₗ,  εₗ ~ N(0, I).

    ``noise``, if given, is the standard normal ε ``[samples, batch, latent]`` to use instead of fresh
    draws (see ``vaelab.objectives.noise.ExampleNoise`` for noise that is a function of each example).

    ``gradient="stl"`` (Roeder et al. 2017) takes the gradient of the Monte Carlo form from the
    same draws, (1/L) Σₗ [log p(x|zₗ) − β (log q̄(zₗ) − log p(zₗ))] with q̄ = q with stopped
    parameters, whatever ``kl`` reports; ``"dreg"`` and ``kl="analytic"`` with ``"stl"`` are
    refused (see the module docstring).
    """
    check_objective("elbo", gradient, kl=kl)
    q = posterior(x)
    if is_discrete(q) or gradient in DISCRETE_GRADIENTS:
        _check_discrete_code(q, gradient)
        return ElboTerms(
            *discrete_elbo(
                x,
                q,
                posterior,
                prior(),
                likelihood,
                samples=samples,
                beta=beta,
                kl=kl,
                noise=noise,
                gradient=_discrete(gradient, q, "elbo"),
            )
        )
    p = prior()
    # A top-down q gives each layer's log q − log p with its draw: the Monte Carlo KL (it has no
    # closed form) without a second pass through the prior's networks. STL's path needs the
    # joined z (stopped q), "analytic" the refusal of kl_term.
    layers = gradient == "standard" and kl != "analytic"
    layer_kl = None
    if samples == 1 and (noise is None or noise.shape[0] == 1):
        # The default, and the training loop's: one draw [batch, latent], so nothing to average
        # and no sample dimension to fold in and out of the decoder at every step.
        z, log_q, rows = _draw(q, p, None if noise is None else noise[0], (), layers=layers)
        reconstruction = likelihood.log_prob(x, z)  # [batch]
        z = z.unsqueeze(0)  # [1, batch, latent], for a Monte Carlo KL
        log_q = None if log_q is None else log_q.unsqueeze(0)
        if rows is not None:  # [batch, L]
            kl_value, layer_kl = rows.sum(-1), rows
    else:
        z, log_q, rows = _draw(q, p, noise, (samples,), layers=layers)
        reconstruction = likelihood.log_prob(x, z).mean(0)  # [batch]
        if rows is not None:  # [samples, batch, L]
            kl_value, layer_kl = rows.sum(-1).mean(0), rows.mean(0)
    if layer_kl is None:
        kl_value, _ = kl_term(q, p, z, kl, log_q)
    bound = reconstruction - kl_value
    weighted = bound if beta == 1.0 else reconstruction - beta * kl_value
    if gradient == "standard":
        return ElboTerms(reconstruction, kl_value, bound, weighted, layer_kl)
    # STL: the path derivative alone. The score term E_q[∂ log q_φ(z)/∂φ] = 0 is dropped for any
    # β, so the β-weighted objective's gradient stays unbiased.
    kl_path = (stop_gradient(q).log_prob(z) - p.log_prob(z)).mean(0)  # [batch]
    surrogate = reconstruction - beta * kl_path
    return ElboTerms(
        reconstruction=reconstruction.detach(),
        kl=kl_value.detach(),
        elbo=bound.detach(),
        objective=_value_with_gradient_of(weighted, surrogate),
    )


def log_importance_weights(
    x: torch.Tensor,
    q: Distribution,
    p: Distribution,
    likelihood: Likelihood,
    z: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """log w = log p(x|z) − [log q(z|x) − log p(z)] for ``z: [k, batch, latent]`` → ``[k, batch]``;
    ``log_q``, when given, is log q(z|x) from the pass that drew z.

    Written in the same order as the Monte Carlo ELBO so that with one sample the two agree to the
    last bit.
    """
    reconstruction, kl = _log_weight_parts(x, q, p, likelihood, z, log_q)
    return reconstruction - kl


def _log_weight_parts(
    x: torch.Tensor,
    q: Distribution,
    p: Distribution,
    likelihood: Likelihood,
    z: torch.Tensor,
    log_q: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z) and log q(z|x) − log p(z), each ``[k, batch]``: log w is the first minus the
    second."""
    log_q = q.log_prob(z) if log_q is None else log_q
    return likelihood.log_prob(x, z), log_q - p.log_prob(z)


def iwae_bound(
    x: torch.Tensor,
    posterior: nn.Module,
    prior: nn.Module,
    likelihood: Likelihood,
    *,
    k: int = 1,
    gradient: str = "standard",
    noise: torch.Tensor | None = None,
    kl_weight: float = 1.0,
) -> IwaeTerms:
    """The importance-weighted bound of Burda et al. (2016), eq. (8):

    L_k(x) = E[log (1/k) Σᵢ p(x, zᵢ) / q(zᵢ|x)],  zᵢ ~ q(z|x),

    with L_1 = ELBO ≤ L_k ≤ L_{k+1} ≤ log p(x). Computed with ``logsumexp`` so that weights far
    below the largest do not underflow. The same function serves evaluation and training.

    Its reparameterised gradient is Σᵢ w̃ᵢ ∇ log wᵢ with the normalised weights
    w̃ᵢ = wᵢ / Σⱼ wⱼ (Burda et al. 2016). ``gradient`` picks how q's part of it flows:

    - ``"standard"``: through z and through q's parameters in log q(zᵢ).
    - ``"stl"``: through z only, Σᵢ w̃ᵢ ∂ log wᵢ/∂zᵢ · ∂zᵢ/∂φ: lower variance, biased for k > 1.
    - ``"dreg"``: Σᵢ w̃ᵢ² ∂ log wᵢ/∂zᵢ · ∂zᵢ/∂φ, unbiased (Tucker et al. 2018); the
      decoder's and prior's gradients are the standard ones.

    DReG in one backward pass: the surrogate Σᵢ w̃ᵢ log w̄ᵢ, with w̃ = softmax(log w̄) held
    constant and log w̄ evaluated with q's parameters stopped, has the gradient Σᵢ w̃ᵢ ∇_θ log wᵢ
    for every parameter θ that is not reached through z, and sends w̃ᵢ ∂ log w̄ᵢ/∂zᵢ into zᵢ; a
    hook on z multiplies that by w̃ᵢ once more on its way to φ. With k = 1, w̃ = 1 and DReG is
    STL.

    ``noise``, if given, is the standard normal ε ``[k, batch, latent]`` to use instead of fresh
    draws (the trainer's, keyed by batch position; ``vaelab.train.streams``).

    ``kl_weight`` β < 1 is a KL warm-up of the bound (``gradient="standard"``, a Gaussian code):
    training's ``objective`` is then the tempered

        log (1/k) Σᵢ p(x|zᵢ) · (p(zᵢ) / q(zᵢ|x))^β,

    which is the ELBO's β-weighted form for k = 1 and is not a bound on log p(x) for β < 1, while
    ``bound`` stays the IWAE bound (β = 1), the number reported. Its gradient is the tempered
    weights' standard one, Σᵢ w̃ᵢ^β ∇ log wᵢ^β.
    """
    if k < 1:
        raise ValueError(f"k must be a positive number of importance samples, got {k}")
    if not 0.0 <= kl_weight <= 1.0:
        raise ValueError(f"kl_weight must be in [0, 1], got {kl_weight}")
    check_iwae_warmup(gradient, kl_weight != 1.0)
    _check_gradient(gradient)
    check_discrete_objective("iwae", gradient, k)
    q = posterior(x)
    if is_discrete(q) or gradient in DISCRETE_GRADIENTS:
        _check_discrete_code(q, gradient)
        if kl_weight != 1.0:
            raise ValueError(
                f"a KL warm-up of the IWAE bound (kl_weight={kl_weight}) is for a Gaussian code; "
                "train a discrete code's IWAE bound without one"
            )
        return IwaeTerms(
            *discrete_iwae(
                x,
                q,
                posterior,
                prior(),
                likelihood,
                k=k,
                noise=noise,
                gradient=_discrete(gradient, q, "iwae"),
            )
        )
    p = prior()
    # z [k, batch, latent]; log q [k, batch] or None; per-layer log q − log p [k, batch, L] or None
    z, log_q, rows = _draw(q, p, noise, (k,), layers=gradient == "standard")
    if gradient == "standard":
        if rows is None:
            reconstruction, kl = _log_weight_parts(x, q, p, likelihood, z, log_q)
        else:
            reconstruction, kl = likelihood.log_prob(x, z), rows.sum(-1)
        log_w = reconstruction - kl  # [k, batch]
        bound = torch.logsumexp(log_w, dim=0) - math.log(k)
        objective = bound
        if kl_weight != 1.0:  # the warm-up's tempered weights
            objective = torch.logsumexp(reconstruction - kl_weight * kl, dim=0) - math.log(k)
        layer_kl = None if rows is None else rows.mean(0)
        return IwaeTerms(bound, log_w, objective, reconstruction.mean(0), kl.mean(0), layer_kl)
    # The same numbers as the standard log weights; only the gradient through q differs.
    reconstruction, kl = _log_weight_parts(x, stop_gradient(q), p, likelihood, z, None)
    log_w = reconstruction - kl  # [k, batch]
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    if gradient == "stl":
        objective = bound
    else:
        weights = torch.softmax(log_w.detach(), dim=0)  # w̃ [k, batch], constants
        if z.requires_grad:  # not under torch.no_grad(), where there is nothing to hook
            z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
        objective = _value_with_gradient_of(bound, (weights * log_w).sum(0))
    # Detached: under DReG the hook on z would bend any other gradient that goes through z.
    return IwaeTerms(
        bound.detach(),
        log_w.detach(),
        objective,
        reconstruction.mean(0).detach(),
        kl.mean(0).detach(),
    )


def objective_terms(
    x: torch.Tensor,
    posterior: nn.Module,
    prior: nn.Module,
    likelihood: Likelihood,
    *,
    objective: str = "elbo",
    gradient: str = "standard",
    samples: int = 1,
    beta: float = 1.0,
    kl: str = "auto",
) -> ElboTerms | IwaeTerms:
    """The training objective by name: ``objective="elbo"`` (``elbo`` with L = ``samples`` draws,
    ``beta`` and ``kl``) or ``"iwae"`` (``iwae_bound`` with k = ``samples``), with the gradient
    estimator ``gradient`` (``"standard"``, ``"stl"`` or ``"dreg"``).

    Both results have ``objective`` ``[batch]``, the per-example value to maximise; the bound
    itself is ``ElboTerms.elbo`` or ``IwaeTerms.bound``. Combinations without a meaning are
    refused with a ``ValueError`` (listed in the module docstring).
    """
    check_objective(objective, gradient, beta=beta, kl=kl)
    if objective == "elbo":
        return elbo(
            x, posterior, prior, likelihood, samples=samples, beta=beta, kl=kl, gradient=gradient
        )
    return iwae_bound(x, posterior, prior, likelihood, k=samples, gradient=gradient)
