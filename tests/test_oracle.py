"""The linear-Gaussian oracle: the whole chain (sampling, KL, likelihood constants, optimisation)
checked against a closed form.

A VAE with linear encoder and decoder and a learned isotropic Gaussian likelihood is probabilistic
PCA; its ELBO optimum equals the pPCA maximum log-likelihood (Tipping & Bishop 1999), because the
optimal pPCA posterior is diagonal in the right rotation (Lucas et al. 2019). Trained with default
optimiser settings, it must come within 0.05 nats per example of that maximum.
"""

from __future__ import annotations

import math

import pytest
import torch

import vaelab
from vaelab.evaluation.ppca import ppca_max_log_likelihood, random_linear_gaussian

TOLERANCE = 0.05  # nats per example


@pytest.mark.slow
def test_linear_vae_reaches_the_ppca_maximum_likelihood():
    truth = random_linear_gaussian(10, 2, noise_var=0.5, seed=0)
    x, _ = truth.sample(5000, torch.Generator().manual_seed(1))
    best = ppca_max_log_likelihood(x, 2)

    model = vaelab.VAE(hidden=(), likelihood="gaussian", latent_dim=2, epochs=300, seed=0)
    model.fit(x.float().numpy())
    elbo = model.elbo(x.float().numpy(), samples=64)
    standard_error = float(elbo.std()) / math.sqrt(len(elbo) * 64)

    assert best - TOLERANCE < float(elbo.mean()) < best + 4 * standard_error, (elbo.mean(), best)


@pytest.mark.slow
def test_iwae_training_and_an_iaf_posterior_reach_the_ppca_maximum_likelihood():
    """Both families contain the optimum (Lucas et al. 2019: the pPCA posterior is diagonal in
    the right rotation; an IAF with z-independent steps is a diagonal Gaussian): a linear model
    trained on the IWAE-5 bound reaches the pPCA maximum in its exact log p(x), and a linear VAE
    with an IAF posterior reaches it in its ELBO, each within 0.05 nats per example."""
    from vaelab.evaluation.linear import linear_gaussian_from_vae

    truth = random_linear_gaussian(10, 2, noise_var=0.5, seed=0)
    x, _ = truth.sample(2000, torch.Generator().manual_seed(1))
    best = ppca_max_log_likelihood(x, 2)
    options = dict(hidden=(), likelihood="gaussian", latent_dim=2, epochs=150, lr=3e-3, seed=0)

    iwae = vaelab.VAE(objective="iwae", k=5, **options).fit(x.float().numpy())
    exact = float(linear_gaussian_from_vae(iwae.model_).log_marginal(x).mean())
    assert best - TOLERANCE < exact <= best + 1e-6, (exact, best)  # the maximum is a maximum

    iaf = vaelab.VAE(posterior="iaf", flow_steps=2, **options).fit(x.float().numpy())
    elbo = iaf.elbo(x.float().numpy(), samples=64)
    standard_error = float(elbo.std()) / math.sqrt(len(elbo) * 64)
    assert best - TOLERANCE < float(elbo.mean()) < best + 4 * standard_error, (elbo.mean(), best)
