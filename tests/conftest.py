"""Shared test fixtures: small models whose exact answers are known."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.model import VAEModel
from vaelab.ppca import LinearGaussianModel
from vaelab.registry import ModelConfig, build_model

# Tests use tiny tensors: one thread avoids thread hand-off costs and contention on 2 shared cores.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def linear_vae(
    truth: LinearGaussianModel,
    encoder_weight: torch.Tensor,
    encoder_bias: torch.Tensor,
    log_var: torch.Tensor,
) -> VAEModel:
    """A float64 linear VAE whose decoder is exactly ``truth`` (per-dimension Gaussian noise) and
    whose encoder gives q(z|x) = N(A x + c, diag exp(log_var)) with A = ``encoder_weight``
    ``[latent, data]`` and c = ``encoder_bias`` ``[latent]``."""
    d, k = truth.data_dim, truth.latent_dim
    config = ModelConfig(
        data_shape=(d,), latent_dim=k, hidden=(), likelihood="gaussian-per-dimension"
    )
    model = build_model(config).double()
    encoder = model.posterior.encoder.layers[0]
    decoder = model.likelihood.decoder.layers[0]
    with torch.no_grad():
        encoder.weight.copy_(torch.cat([encoder_weight, torch.zeros(k, d, dtype=torch.float64)]))
        encoder.bias.copy_(torch.cat([encoder_bias, log_var]))
        decoder.weight.copy_(truth.weight)
        decoder.bias.copy_(truth.bias)
        model.likelihood.log_sigma.copy_(0.5 * truth.noise_var.log())
    return model


def exact_posterior_vae(truth: LinearGaussianModel) -> VAEModel:
    """A linear VAE with the mean-field-optimal diagonal posterior of ``truth``: exact posterior
    means, variances 1 / (posterior precision)ⱼⱼ."""
    d = truth.data_dim
    eye = torch.eye(d, dtype=torch.float64)
    # The posterior mean is linear in x: read A and c off the images of 0 and of the unit vectors.
    at_zero = truth.optimal_diagonal_q(torch.zeros(1, d, dtype=torch.float64))
    at_units = truth.optimal_diagonal_q(eye)
    weight = (at_units.mean - at_zero.mean).T
    return linear_vae(truth, weight, at_zero.mean[0], at_zero.variance[0].log())
