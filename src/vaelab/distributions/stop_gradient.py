"""``stop_gradient(q)``: the same q with its parameters cut from the autograd graph, the log q(z)
that the STL and DReG gradient estimators need (``vaelab.objectives.bounds``).

One entry point extended by registering a function per distribution type
(``register_stop_gradient``), as ``torch.distributions.kl_divergence`` is extended by
``register_kl``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from vaelab.distributions.normal import DiagonalNormal

D = TypeVar("D", bound=Distribution)
_STOP_GRADIENT: dict[type, Callable[[Any], Distribution]] = {}


def register_stop_gradient(
    cls: type[D],
) -> Callable[[Callable[[D], Distribution]], Callable[[D], Distribution]]:
    """Decorator: ``fn(q)`` returns a ``cls`` distribution equal to q with detached parameters.

    The result must give the same ``log_prob`` to the last bit (the estimators promise values
    identical to the standard gradient's), so build it from the same tensors, detached.
    """

    def register(fn: Callable[[D], Distribution]) -> Callable[[D], Distribution]:
        _STOP_GRADIENT[cls] = fn
        return fn

    return register


def stop_gradient(q: Distribution) -> Distribution:
    """q with its parameters detached: ``log_prob(z)`` has q's values, and a gradient only through
    z, never through q's parameters.

    This removes the score term ∂ log q_φ(z) / ∂φ from a reparameterised gradient, the idea behind
    sticking the landing (Roeder, Wu & Duvenaud 2017) and doubly reparameterised gradients
    (Tucker, Lawson, Gu & Maddison 2018). The most specific class of ``type(q)``'s method
    resolution order decides: a function registered for it, or a ``detached()`` method it defines
    itself (how a flow posterior provides its own).

    Raises:
        TypeError: when neither exists for q's type.
    """
    for cls in type(q).__mro__:
        if cls in _STOP_GRADIENT:
            return _STOP_GRADIENT[cls](q)
        if "detached" in vars(cls):
            detached: Distribution = q.detached()  # type: ignore[attr-defined]
            return detached
    raise TypeError(
        f"cannot stop the gradient of {type(q).__name__}'s parameters: give the class a "
        "detached() method returning a copy with detached parameters, or register one with "
        "vaelab.distributions.stop_gradient.register_stop_gradient"
    )


@register_stop_gradient(Normal)
def _stop_normal(q: Normal) -> Normal:
    return Normal(q.loc.detach(), q.scale.detach(), validate_args=False)


@register_stop_gradient(Independent)
def _stop_independent(q: Independent) -> Independent:
    return Independent(stop_gradient(q.base_dist), q.reinterpreted_batch_ndims, validate_args=False)


@register_stop_gradient(DiagonalNormal)
def _stop_diagonal_normal(q: DiagonalNormal) -> DiagonalNormal:
    # Rebuilt from log σ², as the encoder built it: σ = exp(½ log σ²) is recomputed bit for bit,
    # and the type (with its closed-form KL registration) is kept.
    return DiagonalNormal(q.base_dist.loc.detach(), q.log_var.detach())


@register_stop_gradient(MultivariateNormal)
def _stop_multivariate_normal(q: MultivariateNormal) -> MultivariateNormal:
    # From the Cholesky factor, whatever q was built from: log_prob reads only that factor.
    return MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach(), validate_args=False)
