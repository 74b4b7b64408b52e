"""Drawing z from a distribution with given standard normal noise ε, differentiably in its
parameters: the reparameterisation z = μ + L ε of a location-scale family (Kingma & Welling 2014),
or a flow's own ``from_noise``. The noise itself, keyed per example, is ``vaelab.objectives.noise``.

Shapes: ε and z ``[samples, batch, latent]``; log q(z) ``[samples, batch]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal


def a_parameter(q: Distribution) -> torch.Tensor:
    """A tensor of ``q``'s dtype and device, to make noise like."""
    for name in ("loc", "mean_parameter", "logits"):
        value = getattr(q, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        return q.base_dist.loc
    # A chain of stochastic layers (vaelab.components.hierarchy) is made like its first layer.
    first = getattr(q, "first", None)
    if isinstance(first, Distribution):
        return first.base_dist.loc if isinstance(first, Independent) else a_parameter(first)
    # A top-down chain (vaelab.distributions.top_down) is made like its bottom-up evidence.
    evidence = getattr(q, "evidence", None)
    if isinstance(evidence, tuple) and evidence:
        loc: torch.Tensor = evidence[0][0]
        return loc
    raise TypeError(f"cannot tell the dtype and device of a {type(q).__name__}")


def has_noise_form(q: Distribution) -> bool:
    """Whether ``q``'s samples are a differentiable function of standard normal noise that
    :func:`reparameterise` can apply to given ε: a Gaussian (location-scale) or a distribution
    with a ``from_noise`` method (a flow)."""
    return is_location_scale(q) or callable(getattr(q, "from_noise", None))


def reparameterise(
    q: Distribution, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z from standard normal ε ``[samples, batch, latent]``, differentiable in q's parameters,
    and log q(z) ``[samples, batch]`` where the same pass gives it: a flow's density comes free
    with its sample (``from_noise``) and would cost an inverse afterwards; a Gaussian's is left to
    whoever needs it (None), which the exact KL never does."""
    from_noise = getattr(q, "from_noise", None)
    if callable(from_noise):
        z, log_q = from_noise(noise)
        return z, log_q
    return location_scale_sample(q, noise), None


def has_log_ratio_form(q: Distribution) -> bool:
    """Whether ``q`` can give log q − log p of each stochastic layer with its draw from ε
    (``draw_with_log_ratio``: a top-down chain, which draws through its prior's networks)."""
    return callable(getattr(q, "draw_with_log_ratio", None))


def reparameterise_against(
    q: Distribution, p: Distribution, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """z from standard normal ε as :func:`reparameterise` draws it, log q(z) where that pass gives
    it, and for each stochastic layer log q_l(z_l | ·) − log p_l(z_l | ·) at z, ``[samples, batch,
    L]``, z₁'s first, where q evaluates p's densities on its way (:func:`has_log_ratio_form`, and
    p is q's own prior); else None. The rows sum to log q(z) − log p(z), the integrand of the
    Monte Carlo KL."""
    if has_log_ratio_form(q):
        drawn: tuple[torch.Tensor, torch.Tensor] | None = q.draw_with_log_ratio(p, noise)  # type: ignore[attr-defined]
        if drawn is not None:
            return drawn[0], None, drawn[1]
    z, log_q = reparameterise(q, noise)
    return z, log_q, None


def rsample_with_log_prob(
    q: Distribution, sample_shape: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q.rsample(sample_shape)`` and, where the same pass gives it (a flow's
    ``rsample_and_log_prob``), log q of the sample; else None."""
    both = getattr(q, "rsample_and_log_prob", None)
    if callable(both):
        z, log_q = both(torch.Size(sample_shape))
        return z, log_q
    return q.rsample(torch.Size(sample_shape)), None


def is_location_scale(q: Distribution) -> bool:
    """Whether ``q`` is a Gaussian that ``location_scale_sample`` can draw from with given ε."""
    return isinstance(q, MultivariateNormal) or (
        isinstance(q, Independent) and isinstance(q.base_dist, Normal)
    )


def location_scale_sample(q: Distribution, noise: torch.Tensor) -> torch.Tensor:
    """z = μ + L ε for a Gaussian q with ``batch_shape [batch]`` (or ``[]``) and ε
    ``[samples, batch, latent]`` → ``[samples, batch, latent]``, differentiable in q's
    parameters."""
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        return q.base_dist.loc + q.base_dist.scale * noise
    if isinstance(q, MultivariateNormal):
        return q.loc + (q.scale_tril @ noise.unsqueeze(-1)).squeeze(-1)
    raise NotImplementedError(f"no location-scale form for {type(q).__name__}")
