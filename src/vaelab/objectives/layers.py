"""The KL term cut by stochastic layer: what per-layer free bits clamp, what training reports per
epoch and what the diagnostics call a collapsed layer.

For a model with layers z₁, …, z_L (``vaelab.components.hierarchy``, or any posterior and prior
with ``layer_log_prob``, top-down ones included) the ELBO's KL is a sum over layers,

    KL(q(z|x) ‖ p(z)) = E_q[log q(z|x) − log p(z)] = Σ_l E_q[log q_l(z_l | ·) − log p_l(z_l | ·)],

where q_l and p_l are layer l's conditionals in each side's own order (the l-th row of
``LatentChain.layer_log_prob``). The l-th summand is layer l's share; its Monte Carlo estimate
from draws z ~ q is (1/S) Σ_s [log q_l − log p_l](z_s). Only the sum is a KL divergence between
two distributions; a share can be negative for a single draw but is a conditional KL, ≥ 0, in
expectation for a bottom-up chain (Kingma et al. 2016 clamp such "groups" in their free bits).
A model with one layer has one share, the whole KL (its closed form where one is registered).
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from vaelab.objectives.bounds import kl_term

__all__ = ["has_layers", "kl_per_layer"]


def has_layers(q: Distribution, p: Distribution) -> bool:
    """Whether q and p both give each layer's log-density (``layer_log_prob``)."""
    return callable(getattr(q, "layer_log_prob", None)) and callable(
        getattr(p, "layer_log_prob", None)
    )


def kl_per_layer(
    q: Distribution, p: Distribution, z: torch.Tensor, method: str = "auto"
) -> torch.Tensor:
    """Each stochastic layer's share of KL(q ‖ p) per example, ``[batch, L]``, z₁'s first.

    ``z: [samples, batch, Σ_l d_l]`` are draws from q. With several layers (both q and p have
    ``layer_log_prob``) the shares are the Monte Carlo means over the draws of
    log q_l(z_l|·) − log p_l(z_l|·), which sum to the Monte Carlo KL from the same draws; with one
    layer the single column is ``kl_term(q, p, z, method)``, exact where a closed form exists.
    (A top-down model's bounds give the same shares from their own draw: ``ElboTerms.layer_kl``.)
    """
    if has_layers(q, p):
        layers = q.layer_log_prob(z) - p.layer_log_prob(z)  # type: ignore[attr-defined]
        return layers.mean(1).transpose(0, 1)  # [L, S, B] → [B, L]
    kl, _ = kl_term(q, p, z, method)
    return kl.unsqueeze(-1)
