"""A linear VAE read as the linear-Gaussian model it is, so its exact log p(x) is known.

A ``VAEModel`` with ``hidden=()`` (one affine decoder layer), a Gaussian likelihood with a σ that
does not depend on z, and a diagonal Gaussian prior is exactly the model of ``vaelab.evaluation.ppca``:

    z ~ N(m, diag s²),  x | z ~ N(W z + b + o, diag σ²)
    ⇔  u ~ N(0, I),  x | u ~ N(W diag(s) u + (b + o + W m), diag σ²),   z = m + s ⊙ u,

where o is the likelihood's ``offset`` (the data mean that ``fit`` and ``vaelab train`` start the
decoder at) and σ the likelihood's own ``sigma()`` (floored, as the model uses it),

so the prior is absorbed into the weights. ``log p(x)`` and every Gaussian ELBO are then available
in closed form (Lucas et al. 2019), which the estimators of ``vaelab.evaluation.loglik``, ``vaelab.evaluation.ais`` and
``vaelab.evaluation.gap`` are tested against. The latent coordinates differ from the model's by z = m + s ⊙ u
when the prior is not standard; quantities over data (log p(x), gaps) do not depend on that.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, Normal

from vaelab.components.likelihoods import GaussianLikelihood
from vaelab.components.networks import MLP
from vaelab.evaluation.ppca import LinearGaussianModel
from vaelab.model.vae_model import VAEModel

__all__ = ["linear_gaussian_from_vae"]


def linear_gaussian_from_vae(model: VAEModel) -> LinearGaussianModel:
    """The ``LinearGaussianModel`` (float64) that a linear VAE's decoder and prior define.

    Needs: an MLP decoder with no hidden layer, a ``GaussianLikelihood`` whose σ is fixed, shared
    or per dimension (not predicted by the decoder), and a diagonal Gaussian prior (standard or
    learnable). Data of any shape are flattened. The encoder plays no part: log p(x) does not
    depend on it. Raises ``ValueError`` naming the first requirement the model misses.
    """
    if len(model.latent_sizes) > 1:
        raise ValueError(
            f"the model has several stochastic layers {model.latent_sizes}; only a model with one "
            "is read as a LinearGaussianModel here"
        )
    if model.condition_dim or model.condition is not None:
        raise ValueError(
            "the model is conditional: it is one linear-Gaussian model per condition y, not one "
            "LinearGaussianModel; only a model without conditioning is read here"
        )
    likelihood = model.likelihood
    if not isinstance(likelihood, GaussianLikelihood):
        raise ValueError(
            "the model's likelihood must be Gaussian ('gaussian', 'gaussian-fixed' or "
            f"'gaussian-per-dimension') to be linear-Gaussian, got {type(likelihood).__name__}"
        )
    if likelihood.scale == "decoder":
        raise ValueError(
            "a Gaussian likelihood whose σ is predicted by the decoder ('gaussian-decoder') is not "
            "linear-Gaussian; use 'gaussian', 'gaussian-fixed' or 'gaussian-per-dimension'"
        )
    decoder = likelihood.decoder
    layers = list(decoder.layers) if isinstance(decoder, MLP) else []
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
        raise ValueError(
            "the decoder must be a single affine layer (an MLP built with hidden=()), "
            f"got {type(decoder).__name__} with {len(layers)} layers"
        )
    prior = model.prior()
    if not (isinstance(prior, Independent) and isinstance(prior.base_dist, Normal)):
        raise ValueError(
            f"the prior must be a diagonal Gaussian ('normal' or 'learnable'), "
            f"got {type(prior).__name__}"
        )
    data_dim = math.prod(likelihood.data_shape)
    with torch.no_grad():
        weight = layers[0].weight.detach().double()  # [data, latent]
        # The decoder's mean is layer(z) + offset: the offset is part of the bias.
        bias = layers[0].bias.detach().double() + likelihood.offset.detach().double().reshape(-1)
        loc = prior.base_dist.loc.detach().double()
        scale = prior.base_dist.scale.detach().double()
        noise_var = likelihood.sigma().detach().double().square().reshape(-1)
        noise_var = noise_var.expand(data_dim).clone()
    return LinearGaussianModel(weight * scale, bias + weight @ loc, noise_var)
