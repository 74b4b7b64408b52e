"""Reading a linear VAE as the linear-Gaussian model it defines."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal

from conftest import linear_vae
from vaelab.evaluation.linear import linear_gaussian_from_vae
from vaelab.evaluation.ppca import random_linear_gaussian
from vaelab.model.registry import ModelConfig, build_model

F64 = torch.float64


def test_round_trip_recovers_the_decoder():
    truth = random_linear_gaussian(9, 2, noise_var=torch.linspace(0.1, 0.9, 9, dtype=F64), seed=1)
    model = linear_vae(
        truth, torch.zeros(2, 9, dtype=F64), torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    )
    recovered = linear_gaussian_from_vae(model)
    assert torch.allclose(recovered.weight, truth.weight)
    assert torch.allclose(recovered.bias, truth.bias)
    assert torch.allclose(recovered.noise_var, truth.noise_var)


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-fixed", "gaussian-per-dimension"])
def test_marginal_matches_the_model_written_out_directly(likelihood):
    """With a learnable prior N(m, diag s²) and images [1, 2, 3], the absorbed model's log p(x)
    equals log N(x; W m + b, W diag(s²) Wᵀ + diag σ²) on the flattened data."""
    torch.manual_seed(0)
    config = ModelConfig(
        data_shape=(1, 2, 3), latent_dim=2, hidden=(), likelihood=likelihood, prior="learnable"
    )
    model = build_model(config).double()
    with torch.no_grad():
        model.prior.loc.copy_(torch.tensor([0.5, -1.0]))
        model.prior.log_scale.copy_(torch.tensor([0.3, -0.2]))
        if likelihood != "gaussian-fixed":
            model.likelihood.log_sigma.copy_(
                -0.5 + 0.1 * torch.randn_like(model.likelihood.log_sigma)
            )
    layer = model.likelihood.decoder.layers[0]
    w, b = layer.weight.detach(), layer.bias.detach()
    m, s = model.prior.loc.detach(), model.prior.log_scale.detach().exp()
    noise = (2 * model.likelihood.log_sigma.detach()).exp().reshape(-1).expand(6)
    direct = MultivariateNormal(w @ m + b, w @ torch.diag(s**2) @ w.T + torch.diag(noise))
    x = torch.randn(20, 6, dtype=F64)
    lg = linear_gaussian_from_vae(model)
    assert torch.allclose(lg.log_marginal(x), direct.log_prob(x), atol=1e-10)


def test_models_that_are_not_linear_gaussian_are_refused():
    base = {"data_shape": (5,), "latent_dim": 2, "hidden": ()}
    with pytest.raises(ValueError, match="likelihood must be Gaussian"):
        linear_gaussian_from_vae(build_model(ModelConfig(**base, likelihood="bernoulli")))
    with pytest.raises(ValueError, match="predicted by the decoder"):
        linear_gaussian_from_vae(build_model(ModelConfig(**base, likelihood="gaussian-decoder")))
    with pytest.raises(ValueError, match="single affine layer"):
        linear_gaussian_from_vae(
            build_model(ModelConfig(**{**base, "hidden": (4,)}, likelihood="gaussian"))
        )
    with pytest.raises(ValueError, match="diagonal Gaussian"):
        linear_gaussian_from_vae(
            build_model(ModelConfig(**base, likelihood="gaussian", prior="mixture"))
        )


def test_a_fitted_model_is_read_with_its_decoder_offset(fitted_linear):
    """``VAE.fit`` puts the data mean into the decoder (the likelihood's offset); the exact model
    must include it. Independent check: the decoder mean is affine in z, so log p(x) is
    N(x; μ(0) + J m, J diag(s²) Jᵀ + diag σ²) with J its autograd Jacobian and σ the model's own
    scale as the likelihood reports it (once, the offset was dropped: "exact" −53 against an
    IWAE lower bound of −22 on data of mean 5)."""
    estimator, x = fitted_linear
    model = estimator.model_.double()
    try:
        likelihood, prior = model.likelihood, model.prior()
        z0 = torch.zeros(2, dtype=F64)
        jacobian = torch.autograd.functional.jacobian(likelihood.mean, z0)  # [data, latent]
        loc = likelihood.mean(z0) + jacobian @ prior.mean
        sigma = likelihood(z0).base_dist.scale  # [data]
        cov = jacobian @ torch.diag(prior.variance) @ jacobian.T + torch.diag(sigma**2)
        direct = MultivariateNormal(loc.detach(), cov.detach()).log_prob(x.double())
        exact = linear_gaussian_from_vae(model).log_marginal(x.double())
        assert float(x.mean()) > 4.0  # the setting the defect needs
        assert torch.allclose(exact, direct, rtol=0, atol=1e-9)
    finally:
        estimator.model_.float()
