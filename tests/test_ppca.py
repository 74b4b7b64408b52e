"""Checks of the closed forms in vaelab.evaluation.ppca against independent computations.

Independent means: torch.distributions densities and KLs, Gaussian conditioning of the joint
covariance of (z, x), Monte Carlo, numerical optimisation, and autograd stationarity.
"""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vaelab.evaluation.ppca import (
    DiagonalGaussian,
    GaussianPosterior,
    InferenceGaps,
    LinearGaussianModel,
    fit_ppca,
    ppca_max_log_likelihood,
    random_linear_gaussian,
)

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)


def factor_analysis(d: int = 7, k: int = 3, seed: int = 0) -> LinearGaussianModel:
    """A model with heteroscedastic noise, so no formula can silently assume Psi = sigma^2 I."""
    noise_var = torch.linspace(0.05, 0.8, d, dtype=F64)
    return random_linear_gaussian(d, k, noise_var=noise_var, seed=seed)


def data(model: LinearGaussianModel, n: int, seed: int = 1) -> torch.Tensor:
    return model.sample(n, generator=torch.Generator().manual_seed(seed))[0]


def random_q(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Gaussian q parameters: mean [n, k], diagonal var [n, k], full cov [n, k, k]."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, k, generator=g, dtype=F64)
    var = 0.05 + torch.rand(n, k, generator=g, dtype=F64)
    factor = torch.randn(n, k, k, generator=g, dtype=F64) / math.sqrt(k)
    cov = factor @ factor.mT + 0.1 * torch.eye(k, dtype=F64)
    return mean, var, cov


def exact_posterior_mvn(model: LinearGaussianModel, x: torch.Tensor) -> MultivariateNormal:
    post = model.posterior(x)
    return MultivariateNormal(post.mean, covariance_matrix=post.covariance)


# ---------------------------------------------------------------------------- log p(x)


@pytest.mark.parametrize("noise_var", [0.3, torch.linspace(0.01, 2.0, 9, dtype=F64)])
def test_log_marginal_matches_multivariate_normal(noise_var):
    model = random_linear_gaussian(9, 4, noise_var=noise_var, seed=3)
    x = data(model, 50)
    reference = MultivariateNormal(model.bias, covariance_matrix=model.covariance()).log_prob(x)
    torch.testing.assert_close(model.log_marginal(x), reference, rtol=1e-10, atol=0.0)


@SETTINGS
@given(
    d=st.integers(2, 12),
    k_fraction=st.floats(0.0, 1.0),
    log10_noise=st.floats(-2.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_log_marginal_matches_multivariate_normal_property(d, k_fraction, log10_noise, seed):
    k = 1 + int(k_fraction * (d - 1))  # 1 <= k <= d: Woodbury must also hold for k = d
    noise = 10.0**log10_noise * (0.5 + torch.rand(d, generator=torch.Generator().manual_seed(seed)))
    model = random_linear_gaussian(d, k, noise_var=noise.to(F64), seed=seed)
    x = data(model, 8, seed=seed + 1)
    reference = MultivariateNormal(model.bias, covariance_matrix=model.covariance()).log_prob(x)
    torch.testing.assert_close(model.log_marginal(x), reference, rtol=1e-10, atol=0.0)


def test_log_marginal_stays_accurate_with_tiny_noise():
    # sum-of-squares quadratic form: no cancellation even when C is nearly singular
    model = random_linear_gaussian(6, 2, noise_var=1e-8, seed=0)
    x = data(model, 5)
    c = model.covariance()
    r = x - model.bias
    quad = (r * torch.linalg.solve(c, r.T).T).sum(-1)
    reference = -0.5 * (6 * math.log(2 * math.pi) + torch.linalg.slogdet(c)[1] + quad)
    torch.testing.assert_close(model.log_marginal(x), reference, rtol=1e-7, atol=0.0)


def test_inputs_may_be_numpy_and_have_leading_batch_dimensions():
    model = factor_analysis()
    x = data(model, 12)
    out = model.log_marginal(x.numpy().reshape(3, 4, -1))
    assert isinstance(out, torch.Tensor) and out.dtype == F64 and out.shape == (3, 4)
    torch.testing.assert_close(out.reshape(-1), model.log_marginal(x), rtol=0, atol=0)
    post = model.posterior(x.reshape(3, 4, -1))
    assert post.mean.shape == (3, 4, 3) and post.covariance.shape == (3, 3)
    numpy_model = LinearGaussianModel(
        model.weight.numpy(), model.bias.numpy(), model.noise_var.numpy()
    )
    assert isinstance(numpy_model.weight, torch.Tensor) and numpy_model.weight.dtype == F64


def test_sample_moments_match_the_model():
    model = factor_analysis(d=5, k=2)
    x, z = model.sample(40_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 5) and z.shape == (40_000, 2) and x.dtype == F64
    # tolerances are ~5 standard errors of the empirical moments at n = 40 000
    torch.testing.assert_close(x.mean(0), model.bias, rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(x.T), model.covariance(), rtol=0.05, atol=0.05)
    noise = x - model.bias - z @ model.weight.T
    torch.testing.assert_close(noise.var(0), model.noise_var, rtol=0.05, atol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(2, dtype=F64), rtol=0, atol=0.03)


def test_sample_is_reproducible_with_a_generator():
    model = factor_analysis()
    a = model.sample(3, generator=torch.Generator().manual_seed(5))
    b = model.sample(3, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- p(z | x)


def test_posterior_matches_conditioning_of_the_joint_gaussian():
    model = factor_analysis()
    x = data(model, 10)
    w, c = model.weight, model.covariance()
    # joint of (z, x): [[I, W^T], [W, C]]; condition z on x
    gain = torch.linalg.solve(c, w).T  # W^T C^{-1}, [k, d]
    mean = (x - model.bias) @ gain.T
    cov = torch.eye(3, dtype=F64) - gain @ w
    post = model.posterior(x)
    assert isinstance(post, GaussianPosterior)
    torch.testing.assert_close(post.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.covariance, cov, rtol=1e-10, atol=1e-12)


def test_bayes_rule_holds_at_any_z():
    # log p(x) = log p(x|z) + log p(z) - log p(z|x) for every z, not just the posterior mean
    model = factor_analysis()
    x = data(model, 6)
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    log_lik = Normal(z @ model.weight.T + model.bias, model.noise_var.sqrt()).log_prob(x).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_post = exact_posterior_mvn(model, x).log_prob(z)
    torch.testing.assert_close(
        model.log_marginal(x), log_lik + log_prior - log_post, rtol=1e-10, atol=0
    )


# ---------------------------------------------------------------------------- ELBO


def test_elbo_at_the_exact_posterior_is_the_log_marginal():
    model = factor_analysis()
    x = data(model, 10)
    post = model.posterior(x)
    log_px = model.log_marginal(x)
    torch.testing.assert_close(
        model.elbo(x, post.mean, q_cov=post.covariance), log_px, rtol=0, atol=1e-9
    )
    batched_cov = post.covariance.expand(10, 3, 3)
    torch.testing.assert_close(
        model.elbo(x, post.mean, q_cov=batched_cov), log_px, rtol=0, atol=1e-9
    )


@SETTINGS
@given(seed=st.integers(0, 10_000), full=st.booleans())
def test_elbo_is_log_marginal_minus_kl_to_the_posterior(seed, full):
    model = factor_analysis(d=6, k=3, seed=seed)
    x = data(model, 5, seed=seed)
    mean, var, cov = random_q(5, 3, seed)
    q_cov = cov if full else torch.diag_embed(var)
    q = MultivariateNormal(mean, covariance_matrix=q_cov)
    expected = model.log_marginal(x) - kl_divergence(q, exact_posterior_mvn(model, x))
    got = model.elbo(x, mean, q_cov=cov) if full else model.elbo(x, mean, q_var=var)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("full", [False, True])
def test_elbo_matches_monte_carlo(full):
    model = factor_analysis(d=5, k=3)
    x = data(model, 4)
    mean, var, cov = random_q(4, 3, seed=7)
    q = MultivariateNormal(mean, covariance_matrix=cov if full else torch.diag_embed(var))
    z = q.sample(torch.Size([20_000]))  # [samples, batch, latent]
    log_lik = Normal(z @ model.weight.T + model.bias, model.noise_var.sqrt()).log_prob(x).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    terms = log_lik + log_prior - q.log_prob(z)  # [samples, batch]
    estimate, std_err = terms.mean(0), terms.std(0) / math.sqrt(z.shape[0])
    exact = model.elbo(x, mean, q_cov=cov) if full else model.elbo(x, mean, q_var=var)
    assert torch.all((exact - estimate).abs() < 4 * std_err), (exact, estimate, std_err)


def test_elbo_broadcasts_a_shared_diagonal_variance():
    model = factor_analysis()
    x = data(model, 4)
    mean, var, _ = random_q(4, 3, seed=1)
    shared = var[0]
    torch.testing.assert_close(
        model.elbo(x, mean, q_var=shared), model.elbo(x, mean, q_var=shared.expand(4, 3))
    )


# ---------------------------------------------------------------------------- optimal mean field


def test_optimal_diagonal_q_matches_numerical_optimisation():
    model = factor_analysis(d=6, k=3)
    x = data(model, 1)

    def negative_elbo(params: np.ndarray) -> tuple[float, np.ndarray]:
        p = torch.tensor(params, dtype=F64, requires_grad=True)
        value = -model.elbo(x, p[:3][None], q_var=p[3:].exp()[None]).sum()
        value.backward()
        assert p.grad is not None
        return value.item(), p.grad.numpy()

    result = minimize(negative_elbo, np.zeros(6), jac=True, method="L-BFGS-B", tol=1e-14)
    best = model.optimal_diagonal_q(x)
    assert isinstance(best, DiagonalGaussian)
    np.testing.assert_allclose(result.x[:3], best.mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.exp(result.x[3:]), best.variance[0].numpy(), rtol=1e-5)
    assert -result.fun <= model.elbo(x, best.mean, q_var=best.variance).item() + 1e-10


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    mean_step=st.floats(-0.5, 0.5),
    log_var_step=st.floats(-1.0, 1.0),
    coordinate=st.integers(0, 2),
)
def test_perturbing_the_optimal_diagonal_q_lowers_the_elbo(
    seed, mean_step, log_var_step, coordinate
):
    model = factor_analysis(d=6, k=3, seed=seed)
    x = data(model, 3, seed=seed)
    best = model.optimal_diagonal_q(x)
    best_elbo = model.elbo(x, best.mean, q_var=best.variance)
    mean = best.mean.clone()
    mean[:, coordinate] += mean_step
    var = best.variance.clone()
    var[:, coordinate] *= math.exp(log_var_step)
    assert torch.all(model.elbo(x, mean, q_var=var) <= best_elbo + 1e-12)


def test_optimal_diagonal_variance_is_the_inverse_precision_diagonal():
    model = factor_analysis()
    x = data(model, 2)
    precision = torch.linalg.inv(model.posterior(x).covariance)
    best = model.optimal_diagonal_q(x)
    torch.testing.assert_close(best.variance, (1 / precision.diagonal()).expand(2, 3))
    torch.testing.assert_close(best.mean, model.posterior(x).mean)


# ---------------------------------------------------------------------------- inference gaps


def test_approximation_gap_is_the_kl_from_the_optimal_diagonal_q_to_the_posterior():
    model = factor_analysis()
    x = data(model, 5)
    mean, var, _ = random_q(5, 3, seed=4)
    gaps = model.inference_gaps(x, mean, q_var=var)
    assert isinstance(gaps, InferenceGaps)
    best = model.optimal_diagonal_q(x)
    q_star = MultivariateNormal(best.mean, covariance_matrix=torch.diag_embed(best.variance))
    kl = kl_divergence(q_star, exact_posterior_mvn(model, x))
    torch.testing.assert_close(gaps.approximation_gap, kl, rtol=1e-10, atol=1e-12)
    assert torch.all(gaps.approximation_gap > 1e-3)  # correlated posterior: mean field loses
    elbo_star = model.elbo(x, best.mean, q_var=best.variance)
    torch.testing.assert_close(gaps.elbo_optimal, elbo_star, rtol=0, atol=1e-10)


@SETTINGS
@given(seed=st.integers(0, 10_000), family=st.sampled_from(["diagonal", "full"]))
def test_gaps_add_up_and_the_amortisation_gap_is_nonnegative(seed, family):
    model = factor_analysis(d=5, k=2, seed=seed)
    x = data(model, 6, seed=seed)
    mean, var, cov = random_q(6, 2, seed)
    if family == "full":
        gaps = model.inference_gaps(x, mean, q_cov=cov, family="full")
    else:
        gaps = model.inference_gaps(x, mean, q_var=var)
    total = gaps.log_px - gaps.elbo_amortised
    torch.testing.assert_close(gaps.approximation_gap + gaps.amortisation_gap, total)
    assert torch.all(gaps.approximation_gap >= 0)
    assert torch.all(gaps.amortisation_gap >= -1e-10)


def test_full_family_has_no_approximation_gap_and_the_optimum_has_no_amortisation_gap():
    model = factor_analysis()
    x = data(model, 4)
    post = model.posterior(x)
    full = model.inference_gaps(x, post.mean, q_cov=post.covariance, family="full")
    assert torch.all(full.approximation_gap == 0)
    torch.testing.assert_close(full.amortisation_gap, torch.zeros(4, dtype=F64), rtol=0, atol=1e-9)
    best = model.optimal_diagonal_q(x)
    diagonal = model.inference_gaps(x, best.mean, q_var=best.variance)
    torch.testing.assert_close(
        diagonal.amortisation_gap, torch.zeros(4, dtype=F64), rtol=0, atol=1e-9
    )


def test_ppca_mle_has_no_mean_field_approximation_gap():
    # Lucas et al. (2019): at the pPCA MLE the columns of W are orthogonal, so the posterior
    # is factorised and a mean-field VAE can be exact.
    truth = random_linear_gaussian(8, 3, noise_var=0.2, seed=0)
    fitted = fit_ppca(data(truth, 500), 3)
    assert truth.approximation_gap().item() > 1e-3
    assert abs(fitted.approximation_gap().item()) < 1e-12


# ---------------------------------------------------------------------------- fit_ppca


def test_max_log_likelihood_agrees_with_the_fitted_model_and_the_gaussian_formula():
    truth = random_linear_gaussian(8, 3, noise_var=0.2, seed=0)
    x = data(truth, 300)
    fitted = fit_ppca(x, 3)
    closed_form = ppca_max_log_likelihood(x, 3)
    assert math.isclose(closed_form, fitted.log_marginal(x).mean().item(), rel_tol=1e-12)
    centred = x - x.mean(0)
    sample_cov = centred.T @ centred / x.shape[0]
    c = fitted.covariance()
    formula = -0.5 * (
        8 * math.log(2 * math.pi)
        + torch.linalg.slogdet(c)[1]
        + torch.trace(torch.linalg.solve(c, sample_cov))
    )
    assert math.isclose(closed_form, formula.item(), rel_tol=1e-12)


def test_mle_beats_the_generating_model_and_is_rotation_invariant():
    truth = random_linear_gaussian(8, 3, noise_var=0.3, seed=4)  # isotropic: inside the family
    x = data(truth, 200)
    fitted = fit_ppca(x, 3)
    best = ppca_max_log_likelihood(x, 3)
    assert best >= truth.log_marginal(x).mean().item()
    rotation = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    )[0]
    rotated = LinearGaussianModel(fitted.weight @ rotation, fitted.bias, fitted.noise_var)
    assert math.isclose(rotated.log_marginal(x).mean().item(), best, rel_tol=1e-12)


@functools.cache
def fitted_ppca_problem() -> tuple[torch.Tensor, LinearGaussianModel, float]:
    """Data from an isotropic model, its pPCA fit and the maximum average log-likelihood."""
    x = data(random_linear_gaussian(6, 2, noise_var=0.3, seed=0), 100)
    return x, fit_ppca(x, 2), ppca_max_log_likelihood(x, 2)


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 0.5))
def test_mle_beats_perturbed_parameters(seed, scale):
    x, fitted, best = fitted_ppca_problem()
    g = torch.Generator().manual_seed(seed)
    weight = fitted.weight + scale * torch.randn(6, 2, generator=g, dtype=F64)
    bias = fitted.bias + scale * torch.randn(6, generator=g, dtype=F64)
    noise_var = fitted.noise_var * math.exp(scale * torch.randn((), generator=g).item())
    perturbed = LinearGaussianModel(weight, bias, noise_var)
    assert perturbed.log_marginal(x).mean().item() <= best + 1e-12


def test_mle_is_a_stationary_point_of_the_likelihood():
    x = data(random_linear_gaussian(7, 2, noise_var=0.3, seed=1), 150)
    fitted = fit_ppca(x, 2)
    weight = fitted.weight.clone().requires_grad_()
    bias = fitted.bias.clone().requires_grad_()
    log_noise = fitted.noise_var[0].log().clone().requires_grad_()
    model = LinearGaussianModel(weight, bias, log_noise.exp())
    model.log_marginal(x).mean().backward()
    for grad in (weight.grad, bias.grad, log_noise.grad):
        assert grad is not None
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-10)


def test_fit_recovers_the_generating_model_from_many_samples():
    truth = random_linear_gaussian(6, 2, noise_var=0.25, seed=2)
    fitted = fit_ppca(data(truth, 50_000), 2)
    assert fitted.noise_var.shape == (6,)
    torch.testing.assert_close(fitted.noise_var, truth.noise_var, rtol=0.05, atol=0)
    torch.testing.assert_close(fitted.covariance(), truth.covariance(), rtol=0, atol=0.1)
    torch.testing.assert_close(fitted.bias, truth.bias, rtol=0, atol=0.05)


def test_fit_is_deterministic_and_accepts_numpy():
    x = data(factor_analysis(), 40).numpy()
    a, b = fit_ppca(x, 2), fit_ppca(x.copy(), 2)
    assert torch.equal(a.weight, b.weight)
    largest = a.weight.abs().argmax(0)
    assert torch.all(a.weight[largest, torch.arange(2)] > 0)


# ---------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LinearGaussianModel(torch.ones(3), torch.zeros(3), 1.0), "weight"),
        (lambda: LinearGaussianModel(torch.ones(3, 2), torch.zeros(2), 1.0), "bias"),
        (lambda: LinearGaussianModel(torch.ones(3, 2), torch.zeros(3), torch.ones(2)), "noise_var"),
        (lambda: LinearGaussianModel(torch.ones(3, 2), torch.zeros(3), 0.0), "strictly positive"),
        (lambda: LinearGaussianModel(torch.ones(3, 2), torch.zeros(3), math.nan), "NaN"),
    ],
)
def test_model_construction_errors_name_the_parameter(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_method_input_errors_are_actionable():
    model = factor_analysis(d=4, k=2)
    x = data(model, 3)
    mean, var, cov = random_q(3, 2, seed=0)
    with pytest.raises(ValueError, match="data = 4"):
        model.log_marginal(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="exactly one"):
        model.elbo(x, mean)
    with pytest.raises(ValueError, match="exactly one"):
        model.elbo(x, mean, q_var=var, q_cov=cov)
    with pytest.raises(ValueError, match="latent = 2"):
        model.elbo(x, torch.zeros(3, 3), q_var=var)
    with pytest.raises(ValueError, match="strictly positive"):
        model.elbo(x, mean, q_var=-var)
    with pytest.raises(ValueError, match="positive definite"):
        model.elbo(x, mean, q_cov=-cov)
    with pytest.raises(ValueError, match="family='full'"):
        model.inference_gaps(x, mean, q_cov=cov)
    with pytest.raises(ValueError, match="family must be"):
        model.inference_gaps(x, mean, q_var=var, family="mean-field")  # type: ignore[arg-type]


def test_fit_input_errors_are_actionable():
    x = data(factor_analysis(d=4, k=2), 10)
    for k in (0, 4):
        with pytest.raises(ValueError, match="1 <= k < data = 4"):
            fit_ppca(x, k)
    with pytest.raises(ValueError, match="at least 2 examples"):
        fit_ppca(x[:1], 2)
    with pytest.raises(ValueError, match=r"\[batch, data\]"):
        fit_ppca(x[0], 2)
    with pytest.raises(ValueError, match="smaller k or more examples"):
        fit_ppca(x[:3], 2)  # 3 points span a 2-dimensional affine subspace
