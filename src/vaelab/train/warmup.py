"""The KL warm-up a training run uses when ``TrainConfig.kl_warmup_epochs`` is ``None``.

A top-down model (``inference="top-down"``) trained on the ELBO at full KL weight from the first
step collapses onto its prior. At initialisation every layer's bottom-up evidence has
log σ̂² ≈ 0, so the precision-weighted posterior (``vaelab.distributions.top_down.merge``) has
σ_q² ≈ ½ σ_p² in every unit: about ½(log 2 − ½) ≈ 0.1 nats of KL per unit (12 nats for
64, 32, 16, 8, 4 units) that buy nothing, since the decoder cannot read z yet. The cheapest way
down the loss is to make the evidence's precision σ̂⁻² vanish, which gives q = p and KL = 0; and
there the evidence's weight w = σ̂⁻² / (σ̂⁻² + σ_p⁻²) → 0 multiplies every gradient that could
bring it back. Measured on MNIST (``docs/guide.md``, "Top-down inference"): one epoch of
64,32,16,8,4 with hidden 512,256 ends at ELBO −206 with KL 0.2, and starting the evidence at a
small or a large precision (the heads' log σ̂² bias at +4 or −2) collapses all the same.

The Ladder VAE's remedy (Sønderby et al. 2016, "warm-up"; NVAE, Vahdat & Kautz 2020, warms up
too) is to let β rise from 0: the decoder learns to read z while the KL costs little, after which
the KL's pull no longer pays. What it takes is a number of optimiser steps, not of epochs: on
MNIST (500 steps an epoch) one epoch of warm-up trains (valid ELBO −122.6 after it, −117.5 after
a second epoch at β = 1, KL 15 nats), while on the digits (``load_digits``, 36 steps an epoch of
50) 180 steps still collapse and 360 do not. So the default for a top-down model on the ELBO is
a warm-up of ``TOP_DOWN_KL_WARMUP_STEPS`` steps, and at least one epoch. Other models keep no
warm-up, as before; an explicit value, 0 included, is used as it is.

The IWAE bound collapses the same way without one, and needs a longer warm-up: two top-down
layers (100, 50 / 200, 200 tanh) on IWAE k = 5 used 4.4 nats of code after their first MNIST
epoch and 11.9 after 87, against 21.8 for the same layers bottom-up; 500 steps of warm-up left
them as collapsed (valid ELBO −128.9, 9.4 nats after 25 epochs), 10 epochs (5,400 steps) did not
(−101.4, 17.9 nats after 30; ``docs/results.md``, "Two layers on the IWAE bound"). So a top-down
model on the IWAE bound warms up over ``TOP_DOWN_IWAE_KL_WARMUP_STEPS`` steps, at least one
epoch and at most ``IWAE_WARMUP_SHARE`` of the run, so that a short run still ends on the bound
itself. The warm-up tempers the importance weights' log p(z) − log q(z|x) by β
(``vaelab.objectives.bounds.iwae_bound``, ``kl_weight``), which has the standard gradient only:
with ``gradient="dreg"`` or ``"stl"`` the default stays 0.
"""

from __future__ import annotations

from vaelab.components.top_down import TopDownPosterior
from vaelab.model.vae_model import VAEModel
from vaelab.train.config import TrainConfig

__all__ = [
    "IWAE_WARMUP_SHARE",
    "TOP_DOWN_IWAE_KL_WARMUP_STEPS",
    "TOP_DOWN_KL_WARMUP_STEPS",
    "kl_warmup_epochs",
]

TOP_DOWN_KL_WARMUP_STEPS = 500
TOP_DOWN_IWAE_KL_WARMUP_STEPS = 5000
IWAE_WARMUP_SHARE = 0.25


def kl_warmup_epochs(config: TrainConfig, model: VAEModel, steps_per_epoch: int) -> float:
    """``config.kl_warmup_epochs``, or when it is ``None`` the automatic choice (module
    docstring) for a top-down model, in epochs of ``steps_per_epoch`` steps: on the ELBO
    ``TOP_DOWN_KL_WARMUP_STEPS`` steps, at least 1 epoch; on the IWAE bound with the standard
    gradient ``TOP_DOWN_IWAE_KL_WARMUP_STEPS`` steps, at least 1 epoch and at most
    ``IWAE_WARMUP_SHARE`` of ``config.epochs``; else 0."""
    if config.kl_warmup_epochs is not None:
        return config.kl_warmup_epochs
    if not isinstance(model.posterior, TopDownPosterior):
        return 0.0
    steps = max(steps_per_epoch, 1)
    if config.objective == "iwae":
        if config.gradient != "standard":
            return 0.0  # the IWAE bound's warm-up has the standard gradient only
        longest = IWAE_WARMUP_SHARE * config.epochs
        return max(1.0, min(TOP_DOWN_IWAE_KL_WARMUP_STEPS / steps, longest))
    return max(1.0, TOP_DOWN_KL_WARMUP_STEPS / steps)
