"""Posteriors, priors, likelihoods and networks, each checked on its own terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

import vaelab
from conftest import Constant, standard_error
from vaelab.components.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
)
from vaelab.components.networks import MLP, ConvDecoder, ConvEncoder, activation_module
from vaelab.components.posteriors import DiagonalGaussianPosterior, FullCovariancePosterior
from vaelab.components.priors import (
    LearnableGaussianPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)
from vaelab.model.registry import LIKELIHOODS, ModelConfig, build_model

DIGITS = load_digits().data


# ------------------------------------------------------------------------------------ likelihoods
def likelihood_with(cls, params: torch.Tensor, **kwargs):
    """A likelihood over ``params.shape[-1] // k`` dimensions whose decoder returns ``params``."""
    per_dim = 2 if kwargs.get("scale") == "decoder" else 1
    return cls(Constant(params), (params.shape[-1] // per_dim,), **kwargs)


def test_gaussian_log_prob_includes_the_normalising_constant():
    torch.manual_seed(0)
    loc = torch.randn(6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    z = torch.zeros(3, 1, dtype=torch.float64)
    for scale, sigma in (("fixed", 0.7), ("shared", 1.3)):
        lik = likelihood_with(GaussianLikelihood, loc, scale=scale, sigma=sigma).double()
        expected = scipy.stats.norm(loc.numpy(), sigma).logpdf(x.numpy()).sum(-1)
        # σ is stored as a float32 log before .double(): agreement to float32 precision.
        assert torch.allclose(lik(z).log_prob(x), torch.from_numpy(expected), rtol=1e-7)


def test_gaussian_with_decoder_scale_reads_softplus_of_the_second_half():
    raw = torch.tensor([0.5, -1.0, 2.0, -3.0], dtype=torch.float64)
    lik = likelihood_with(GaussianLikelihood, raw, scale="decoder").double()
    p = lik(torch.zeros(1, 1, dtype=torch.float64))
    sigma = nn.functional.softplus(torch.tensor([2.0, -3.0], dtype=torch.float64)) + 1e-3
    assert torch.allclose(p.base_dist.scale[0], sigma)
    assert torch.allclose(p.mean[0], raw[:2])


def test_per_dimension_gaussian_has_one_learned_sigma_per_dimension():
    lik = likelihood_with(GaussianLikelihood, torch.zeros(5), scale="per-dimension")
    assert lik.log_sigma.shape == (5,) and lik.log_sigma.requires_grad
    assert (
        GaussianLikelihood(Constant(torch.zeros(5)), (5,), scale="fixed").log_sigma.requires_grad
        is False
    )


def test_bernoulli_matches_the_closed_form():
    logits = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    lik = likelihood_with(BernoulliLikelihood, logits).double()
    p = torch.sigmoid(logits)
    expected = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert torch.allclose(lik(torch.zeros(1, 1, dtype=torch.float64)).log_prob(x), expected)


def test_continuous_bernoulli_integrates_to_one_on_the_unit_interval():
    logits = torch.tensor([-4.0, -0.3, 0.0, 0.01, 2.5], dtype=torch.float64)
    lik = likelihood_with(ContinuousBernoulliLikelihood, logits).double()
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    p = lik(torch.zeros(1, 1, dtype=torch.float64)).base_dist  # per-dimension distribution
    density = p.log_prob(grid[:, None].expand(-1, 5)).exp()
    integral = torch.trapezoid(density, grid, dim=0)
    assert torch.allclose(integral, torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_continuous_bernoulli_mean_is_the_integral_of_x_p_x_in_float32_too():
    """E[x] = ∫ x p(x) dx on [0, 1], by the trapezoid rule in float64, against the mean in
    float32 at logits near 0 (where torch's form through λ cancels: 4·10⁻⁴ off at −0.012),
    about the series' cut (±½) and far out; and the float64 closed form agrees with torch's."""
    logits = torch.tensor([-15.0, -3.0, -0.5, -0.4999, -0.012, 0.0, 1e-4, 0.3, 0.5, 7.0, 15.0])
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    lik = likelihood_with(ContinuousBernoulliLikelihood, logits.double()).double()
    p = lik(torch.zeros(1, 1, dtype=torch.float64)).base_dist
    density = p.log_prob(grid[:, None].expand(-1, len(logits))).exp()
    expected = torch.trapezoid(density * grid[:, None], grid, dim=0)
    found = likelihood_with(ContinuousBernoulliLikelihood, logits).mean(torch.zeros(1, 1))[0]
    assert torch.allclose(found.double(), expected, atol=1e-6, rtol=0)
    far = logits.double().abs() > 1
    torch_mean = torch.distributions.ContinuousBernoulli(logits=logits.double()).mean
    assert torch.allclose(p.mean[0, far], torch_mean[far], atol=1e-12)


def test_laplace_matches_scipy():
    loc = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    lik = likelihood_with(LaplaceLikelihood, loc).double()
    with torch.no_grad():
        lik.log_scale.fill_(math.log(0.4))
    x = torch.tensor([[0.0, 1.0, 2.5]], dtype=torch.float64)
    expected = scipy.stats.laplace(loc.numpy(), 0.4).logpdf(x.numpy()).sum(-1)
    assert torch.allclose(
        lik(torch.zeros(1, 1, dtype=torch.float64)).log_prob(x), torch.from_numpy(expected)
    )


@pytest.mark.parametrize("data_shape", [(6,), (1, 3, 2)])
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_log_prob_of_x_given_z_is_the_distributions_log_prob(name, data_shape):
    """``likelihood.log_prob(x, z)``, the bounds' entry point, computes exactly what the
    distribution ``likelihood(z)`` gives, for one and for several samples of z."""
    torch.manual_seed(0)
    config = ModelConfig(data_shape=data_shape, latent_dim=3, hidden=(8,), likelihood=name)
    likelihood = build_model(config).likelihood
    x = torch.rand(5, *data_shape).round()
    # 8-bit pixels / 255: data in [0, 1] that every likelihood accepts.
    likelihood.initialise(torch.randint(0, 256, (20, *data_shape)) / 255)
    for z in (torch.randn(5, 3), torch.randn(4, 5, 3)):
        expected = likelihood(z).log_prob(x)
        assert expected.shape == z.shape[:-1]
        assert torch.equal(likelihood.log_prob(x, z), expected), name


@pytest.mark.parametrize("cls", [BernoulliLikelihood, ContinuousBernoulliLikelihood])
def test_unit_interval_likelihoods_refuse_data_outside_it(cls):
    lik = likelihood_with(cls, torch.zeros(3))
    lik.check_support(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\].*range over \[-0\.5, 2\]"):
        lik.check_support(torch.tensor([[-0.5, 0.5, 2.0]]))


def test_likelihood_batch_and_event_shapes():
    config = ModelConfig(
        data_shape=(1, 8, 8), latent_dim=3, hidden=(16,), likelihood="gaussian-decoder"
    )
    model = build_model(config)
    p = model.likelihood(torch.randn(7, 5, 3))
    assert p.batch_shape == (7, 5) and p.event_shape == (1, 8, 8)
    assert p.log_prob(torch.rand(5, 1, 8, 8)).shape == (7, 5)


def test_initialise_starts_the_decoder_at_the_data_mean():
    torch.manual_seed(0)
    x = torch.randint(64, 192, (500, 6)) / 255  # in [0.25, 0.75], on the 8-bit grid
    for name in LIKELIHOODS:
        model = build_model(ModelConfig(data_shape=(6,), latent_dim=2, hidden=(), likelihood=name))
        model.likelihood.initialise(x)
        with torch.no_grad():
            model.likelihood.decoder.layers[0].weight.zero_()
            model.likelihood.decoder.layers[0].bias.zero_()
        mean = model.likelihood.mean(torch.zeros(1, 2))[0]
        # The continuous Bernoulli's mean is not sigmoid(logits); a discretised logistic's end
        # levels take its tails, which moves the mean off the location by about 3·10⁻⁵ here.
        tolerance = {"continuous-bernoulli": 0.05}.get(
            name, 1e-4 if "discretized" in name else 1e-5
        )
        assert torch.allclose(mean[:6], x.mean(0), atol=tolerance), name


# ------------------------------------------------------------------------------------- posteriors
def test_diagonal_posterior_reads_mean_and_log_variance():
    features = torch.tensor([[1.0, -2.0, math.log(4.0), math.log(0.25)]])
    q = DiagonalGaussianPosterior(Constant(features), 2)(torch.zeros(1, 3))
    assert torch.allclose(q.mean, torch.tensor([[1.0, -2.0]]))
    assert torch.allclose(q.variance, torch.tensor([[4.0, 0.25]]))
    assert q.batch_shape == (1,) and q.event_shape == (2,)


def test_full_covariance_posterior_builds_a_valid_cholesky_factor():
    torch.manual_seed(1)
    n = 4
    features = torch.randn(3, FullCovariancePosterior.n_params(n), dtype=torch.float64)
    q = FullCovariancePosterior(Constant(features), n).double()(torch.zeros(3, 1))
    assert isinstance(q, MultivariateNormal)
    tril = q.scale_tril
    assert torch.equal(tril, tril.tril()) and bool((tril.diagonal(dim1=-2, dim2=-1) > 0).all())
    assert torch.allclose(tril.diagonal(dim1=-2, dim2=-1), features[:, n : 2 * n].exp())
    # Reparameterised samples have the stated covariance.
    z = q.rsample((200_000,))
    empirical = torch.einsum("sbi,sbj->bij", z - q.mean, z - q.mean) / z.shape[0]
    assert torch.allclose(
        empirical, q.covariance_matrix, atol=0.05 * float(q.covariance_matrix.abs().max())
    )


def test_posterior_samples_carry_gradients():
    """Reparameterised draws z = μ + σ ⊙ ε pass the right gradient to the encoder's outputs, not
    merely some gradient: over S draws, ∂(Σ z)/∂μⱼ = S and ∂(Σ z)/∂ log σ²ⱼ = Σₛ ½ σⱼ εₛⱼ, with
    ε = (z − μ) / σ read back from the draws (zero gradients would pass a ``grad is not None``)."""
    torch.manual_seed(0)
    latent, draws = 3, 5
    features = torch.randn(4, 2 * latent, dtype=torch.float64, requires_grad=True)
    q = DiagonalGaussianPosterior(Constant(features), latent)(torch.zeros(4, 1))
    z = q.rsample((draws,))  # [draws, 4, latent]
    (gradient,) = torch.autograd.grad(z.sum(), features)
    mu, log_var = features.detach().split(latent, dim=-1)
    sigma = torch.exp(0.5 * log_var)
    eps = (z.detach() - mu) / sigma
    expected = torch.cat([torch.full_like(mu, draws), (0.5 * sigma * eps).sum(0)], dim=-1)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    assert float(gradient[:, latent:].abs().min()) > 0  # the test has power against σ detached


def test_full_covariance_samples_carry_gradients_to_every_factor_entry():
    """z = μ + L ε with L = diag(exp dⱼ) + its strictly lower triangle l: over S draws,
    ∂(Σ z)/∂μⱼ = S, ∂(Σ z)/∂dⱼ = Σₛ exp(dⱼ) εₛⱼ (dⱼ scales Lⱼⱼ only) and ∂(Σ z)/∂lᵢⱼ = Σₛ εₛⱼ,
    with ε = L⁻¹(z − μ) read back from the draws."""
    torch.manual_seed(1)
    n, draws = 3, 4
    features = torch.randn(2, FullCovariancePosterior.n_params(n), dtype=torch.float64)
    features.requires_grad_(True)
    q = FullCovariancePosterior(Constant(features), n).double()(torch.zeros(2, 1))
    z = q.rsample((draws,))  # [draws, 2, n]
    (gradient,) = torch.autograd.grad(z.sum(), features)
    h = features.detach()
    mu, log_diag = h[:, :n], h[:, n : 2 * n]
    eps = torch.linalg.solve_triangular(
        q.scale_tril.detach(), (z.detach() - mu).unsqueeze(-1), upper=False
    ).squeeze(-1)  # [draws, 2, n]
    rows, cols = torch.tril_indices(n, n, offset=-1)
    expected = torch.cat(
        [torch.full_like(mu, draws), (log_diag.exp() * eps).sum(0), eps.sum(0)[:, cols]], dim=-1
    )
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------- priors
def test_standard_and_learnable_priors_start_at_n01():
    reference = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    z = torch.randn(10, 3)
    for prior in (StandardNormalPrior(3), LearnableGaussianPrior(3)):
        assert torch.allclose(prior().log_prob(z), reference.log_prob(z))
    assert len(list(StandardNormalPrior(3).parameters())) == 0


def test_mixture_prior_density_is_the_weighted_sum_of_components():
    prior = MixtureOfGaussiansPrior(2, n_components=3).double()
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    z = torch.randn(7, 2, dtype=torch.float64)
    weights = torch.softmax(prior.logits, 0)
    parts = [
        Independent(Normal(prior.locs[j], prior.log_scales[j].exp()), 1).log_prob(z).exp()
        for j in range(3)
    ]
    expected = sum(w * p for w, p in zip(weights, parts, strict=True)).log()
    assert torch.allclose(prior().log_prob(z), expected)


def test_vamp_prior_is_the_mean_of_posteriors_at_the_pseudo_inputs():
    model = build_model(ModelConfig(data_shape=(5,), latent_dim=2, hidden=(8,), prior="vamp"))
    prior = model.prior
    assert isinstance(prior, VampPrior)
    z = torch.randn(6, 2)
    components = model.posterior(prior.pseudo_inputs)
    expected = torch.logsumexp(components.log_prob(z[:, None, :]), dim=1) - math.log(500)
    assert torch.allclose(prior().log_prob(z), expected, atol=1e-5)
    # The encoder is stored once: no duplicated weights in the state dict.
    keys = list(model.state_dict())
    assert sum(k.endswith("encoder.layers.0.weight") for k in keys) == 1
    assert "prior.pseudo_inputs" in keys


@pytest.mark.parametrize("posterior", ["diagonal", "full"])
def test_kl_against_learnable_prior_is_exact(posterior):
    """KL(q(z|x) ‖ p(z)) against a learned prior p = N(m, diag s²), both read off a model fitted
    the way users fit one, equals the closed form written out here in float64 (Rasmussen &
    Williams 2006, A.5) with Σ₂ = diag s²,
    ½ [log(|Σ₂|/|Σ₁|) − n + tr(Σ₂⁻¹Σ₁) + (m − μ)ᵀ Σ₂⁻¹ (m − μ)],
    and the Monte Carlo estimate E_q[log q(z) − log p(z)] within 4 standard errors. The
    diagonal posterior's KL is torch's Independent(Normal) pair; the full-covariance one's is
    vaelab's (MultivariateNormal, Independent) registration (vaelab.distributions.kl)."""
    x = (DIGITS[:300] / 16.0).astype(np.float32)
    estimator = vaelab.VAE(
        prior="learnable", posterior=posterior, latent_dim=3, hidden=(16,), epochs=1, seed=0
    ).fit(x)
    with torch.no_grad():
        p = estimator.model_.prior()
        q = estimator.model_.posterior(torch.from_numpy(x[:6]))
        found = kl_divergence(q, p).double()  # [6]
    m, s2 = p.mean.detach().double(), p.variance.detach().double()  # [latent]
    # The prior has moved off N(0, I) in training: every term of the closed form is at work.
    assert float(m.abs().min()) > 1e-3 and float((s2 - 1).abs().min()) > 1e-3
    mu = q.mean.double()  # [6, latent]
    if isinstance(q, MultivariateNormal):
        cov = q.covariance_matrix.double()
    else:
        cov = torch.diag_embed(q.variance.double())  # [6, latent, latent]
    n = mu.shape[-1]
    closed_form = 0.5 * (
        s2.log().sum()
        - torch.linalg.slogdet(cov).logabsdet
        - n
        + (cov.diagonal(dim1=-2, dim2=-1) / s2).sum(-1)
        + ((m - mu).square() / s2).sum(-1)
    )
    torch.testing.assert_close(found, closed_form, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    with torch.no_grad():
        z = q.sample((20_000,))  # [draws, 6, latent]
        log_ratio = (q.log_prob(z) - p.log_prob(z)).double()  # [draws, 6]
    for i in range(6):
        draws = log_ratio[:, i]
        assert abs(float(draws.mean() - found[i])) < 4 * standard_error(draws), i


# --------------------------------------------------------------------------------------- networks
def test_mlp_with_no_hidden_layers_is_one_affine_map():
    net = MLP((6,), (), 4)
    assert [type(m) for m in net.layers] == [nn.Linear]
    assert MLP((6,), (8, 8), 4, "tanh").layers[1].__class__ is nn.Tanh


def test_mlp_flattens_trailing_dimensions_and_keeps_leading_ones():
    net = MLP((1, 4, 4), (8,), 3)
    assert net(torch.rand(5, 1, 4, 4)).shape == (5, 3)
    net = MLP((3,), (8,), 2)
    z = torch.rand(7, 5, 3)
    out = net(z)
    assert out.shape == (7, 5, 2)
    # Each leading position gets the same map as alone: folding them is only a layout.
    for i in range(7):
        assert torch.allclose(out[i], net(z[i]), rtol=1e-6, atol=1e-7)
    assert net(z[0, 0]).shape == (2,)


def test_standard_normal_prior_is_built_once_and_follows_the_module_to_a_dtype():
    prior = StandardNormalPrior(3)
    assert prior() is prior()
    prior.double()
    p = prior()
    assert p.base_dist.loc.dtype == torch.float64 and p.base_dist.scale.dtype == torch.float64
    assert p is prior()


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 7, 5)])
def test_conv_encoder_and_decoder_shapes(shape):
    encoder = ConvEncoder(shape, (32,), 6)
    assert encoder(torch.rand(4, *shape)).shape == (4, 6)
    decoder = ConvDecoder(3, (32,), shape, out_channels_per_pixel=2)
    assert decoder(torch.randn(5, 4, 3)).shape == (5, 4, 2 * math.prod(shape))


def test_conv_model_trains_on_images():
    """Forty Adam steps on eight binary images raise the ELBO (the same noise before and after,
    so the rise is the model's, not the draw's)."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(data_shape=(1, 8, 8), latent_dim=2, hidden=(16,), network="conv")
    )
    x = (torch.rand(8, 1, 8, 8) < 0.3).float()
    noise = torch.randn(4, 8, 2)

    def elbo() -> torch.Tensor:
        return model.elbo(x, samples=4, noise=noise).elbo.mean()

    before = float(elbo().detach())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimiser.zero_grad()
        (-elbo()).backward()
        optimiser.step()
    assert float(elbo().detach()) > before + 5.0


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'sigmoidish'; choose one of: elu"):
        activation_module("sigmoidish")
    for field, bad in (
        ("likelihood", "poisson"),
        ("prior", "flow"),
        ("posterior", "realnvp"),
        ("network", "rnn"),
    ):
        with pytest.raises(ValueError, match=f"unknown {field} '{bad}'; choose one of"):
            build_model(ModelConfig(data_shape=(4,), **{field: bad}))
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        build_model(ModelConfig(data_shape=(4,), latent_dim=0))
    with pytest.raises(ValueError, match="hidden must be a tuple of positive integers"):
        build_model(ModelConfig(data_shape=(4,), hidden=(8, -1)))


@pytest.mark.parametrize("likelihood", ["gaussian-per-dimension", "gaussian", "laplace"])
def test_a_constant_dimension_cannot_make_the_elbo_unbounded(likelihood):
    """A pixel that never varies: σ stays above the floor (10⁻³, as for ``gaussian-decoder``),
    so the log-density, and the ELBO, stay bounded; and it starts at a tenth of the typical
    deviation, so the first epochs are not thousands of nats below (once: σ started at 10⁻³
    and fell, the ELBO −102,396 at epoch 1)."""
    from vaelab.components.likelihoods.real_valued import SCALE_FLOOR

    rng = np.random.default_rng(0)
    x = rng.random((500, 10)).astype(np.float32)
    x[:, 3] = 0.5
    model = vaelab.VAE(
        likelihood=likelihood, latent_dim=2, hidden=(16,), epochs=10, lr=0.02, seed=0, device="cpu"
    ).fit(x)
    with torch.no_grad():
        scale = model.model_.likelihood(torch.zeros(1, 2)).base_dist.scale
    assert float(scale.min()) >= SCALE_FLOOR
    # Bounded above: each dimension's density is at most its peak, 1 / (√(2π) σ_min) (Gaussian)
    # or 1 / (2 b) (Laplace), both below 1 / σ_min.
    peak = 10 * -math.log(SCALE_FLOOR)
    assert all(epoch.reconstruction < peak for epoch in model.history_)
    assert model.history_[0].elbo > -1000.0
