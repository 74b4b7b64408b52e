"""The ELBO and the IWAE bound against the closed forms of a linear-Gaussian model."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    exact_posterior_vae,
    linear_vae_with_a_poor_encoder,
    standard_error,
)
from vaelab.components.priors import MixtureOfGaussiansPrior, StandardNormalPrior
from vaelab.objectives.bounds import elbo, iwae_bound, kl_per_dimension, kl_term


@pytest.fixture(scope="module")
def setting():
    """A 12-dimensional linear-Gaussian model with 3 latents, data from it, and a linear VAE whose
    encoder is deliberately off (so the bounds are strict)."""
    torch.manual_seed(0)
    return linear_vae_with_a_poor_encoder(400)


def amortised_q(model, x):
    q = model.posterior(x)
    return q.base_dist.loc.detach(), q.base_dist.scale.detach() ** 2


def test_elbo_matches_closed_form_for_linear_gaussian(setting):
    truth, x, model = setting
    mean, var = amortised_q(model, x)
    exact = truth.elbo(x, mean, q_var=var)
    torch.manual_seed(1)
    with torch.no_grad():
        terms = elbo(x, model.posterior, model.prior, model.likelihood, samples=2000)
    # The KL is exact (closed form); only the reconstruction term is a Monte Carlo average.
    assert terms.elbo.shape == (400,)
    error = terms.elbo - exact
    assert abs(float(error.mean())) < 4 * standard_error(error) + 1e-9
    assert torch.allclose(terms.elbo, exact, atol=1.0)


def test_analytic_and_monte_carlo_kl_agree(setting):
    _, x, model = setting
    torch.manual_seed(2)
    with torch.no_grad():
        analytic = elbo(x, model.posterior, model.prior, model.likelihood, kl="analytic")
        mc = elbo(x, model.posterior, model.prior, model.likelihood, samples=500, kl="monte_carlo")
    difference = mc.kl - analytic.kl
    assert abs(float(difference.mean())) < 4 * standard_error(difference)
    assert torch.allclose(mc.kl, analytic.kl, atol=0.3)


def test_beta_weights_only_the_objective(setting):
    _, x, model = setting
    torch.manual_seed(5)
    terms = elbo(x, model.posterior, model.prior, model.likelihood, beta=4.0)
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.kl)
    assert torch.allclose(terms.objective, terms.reconstruction - 4.0 * terms.kl)


def test_iwae_with_one_sample_equals_the_monte_carlo_elbo_exactly(setting):
    _, x, model = setting
    torch.manual_seed(7)
    bound = iwae_bound(x, model.posterior, model.prior, model.likelihood, k=1).bound
    torch.manual_seed(7)
    terms = elbo(x, model.posterior, model.prior, model.likelihood, kl="monte_carlo")
    assert torch.equal(bound, terms.elbo)


def test_iwae_is_above_the_elbo_grows_with_k_and_stays_below_log_px(setting):
    truth, x, model = setting
    log_px = truth.log_marginal(x)
    mean, var = amortised_q(model, x)
    elbo_exact = truth.elbo(x, mean, q_var=var)
    torch.manual_seed(8)
    means = []
    with torch.no_grad():
        for k in (1, 10, 100, 1000):
            bound = iwae_bound(x, model.posterior, model.prior, model.likelihood, k=k).bound
            means.append(float(bound.mean()))
            if k == 1:
                error = bound - elbo_exact
                assert abs(float(error.mean())) < 4 * standard_error(error)
    assert means == sorted(means), means
    assert means[-1] <= float(log_px.mean()) + 0.01
    # With the posterior's shape mostly right, 1000 samples close most of the gap.
    total_gap = float((log_px - elbo_exact).mean())
    assert float(log_px.mean()) - means[-1] < 0.25 * total_gap


def test_the_optimal_diagonal_encoder_is_the_mean_field_optimum(setting):
    """Checked from first principles, not with the helper that built it: the exact posterior of
    z ~ N(0, I), x | z ~ N(W z + b, Ψ) is N(m, Λ⁻¹) with Λ = I + Wᵀ Ψ⁻¹ W and
    m = Λ⁻¹ Wᵀ Ψ⁻¹ (x − b) (Bishop 2006, eq. 2.116-2.117), and the diagonal Gaussian closest to it
    in KL(q ‖ p) has its mean and precisions Λⱼⱼ (Bishop 2006, eq. 10.12-10.13). Any move of the
    encoder's outputs away from that lowers the closed-form ELBO."""
    truth, x, _ = setting
    model = exact_posterior_vae(truth)
    mean, var = amortised_q(model, x)
    w, psi = truth.weight, truth.noise_var
    precision = torch.eye(3, dtype=torch.float64) + w.T @ (w / psi[:, None])
    exact_mean = torch.linalg.solve(precision, w.T @ ((x - truth.bias) / psi).T).T
    assert torch.allclose(mean, exact_mean, atol=1e-10)
    assert torch.allclose(var, 1.0 / precision.diagonal().expand_as(var), atol=1e-12)
    best = truth.elbo(x, mean, q_var=var)
    generator = torch.Generator().manual_seed(9)
    for _ in range(5):
        step = 0.05 * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        assert bool((truth.elbo(x, mean + step, q_var=var) < best).all())
        assert bool((truth.elbo(x, mean, q_var=var * (1.0 + step.abs())) < best).all())


def test_kl_falls_back_to_monte_carlo_where_no_closed_form_exists(setting):
    _, x, model = setting
    mixture = MixtureOfGaussiansPrior(3, n_components=4).double()
    q = model.posterior(x)
    torch.manual_seed(9)
    z = q.rsample((3000,))
    estimate, exact = kl_term(q, mixture(), z)
    assert not exact
    # Independent check: E_q[log q − log p] by a separate set of samples.
    z2 = q.sample((3000,))
    reference = (q.log_prob(z2) - mixture().log_prob(z2)).mean(0)
    assert torch.allclose(estimate, reference, atol=0.2)
    _, exact_normal = kl_term(q, StandardNormalPrior(3).double()(), z)
    assert exact_normal
    with pytest.raises(ValueError, match="no closed-form KL"):
        kl_term(q, mixture(), z, method="analytic")


def test_kl_per_dimension_sums_to_the_kl(setting):
    _, x, model = setting
    q, p = model.posterior(x), model.prior()
    per_dimension = kl_per_dimension(q, p)
    assert per_dimension.shape == (400, 3)
    assert torch.allclose(per_dimension.sum(-1), kl_term(q, p, q.rsample((1,)))[0])
    assert kl_per_dimension(q, MixtureOfGaussiansPrior(3).double()()) is None


def test_bad_arguments_are_refused(setting):
    _, x, model = setting
    with pytest.raises(ValueError, match="positive number of importance samples"):
        iwae_bound(x, model.posterior, model.prior, model.likelihood, k=0)
    with pytest.raises(ValueError, match="unknown KL method"):
        elbo(x, model.posterior, model.prior, model.likelihood, kl="exact")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_the_iwae_warmup_tempers_the_prior_ratio_and_reports_the_bound(setting, beta):
    """``kl_weight`` β: training's objective is log (1/k) Σ p(x|zᵢ) (p(zᵢ)/q(zᵢ|x))^β, with
    log q and log p here from ``torch.distributions`` at the same draws; the reported bound is
    the IWAE bound whatever β; with k = 1 the objective is the ELBO's β-weighted form."""
    _, x, model = setting
    k, batch = 6, x.shape[0]
    eps = torch.randn(k, batch, 3, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    args = (x, model.posterior, model.prior, model.likelihood)
    plain = iwae_bound(*args, k=k, noise=eps)
    warm = iwae_bound(*args, k=k, noise=eps, kl_weight=beta)
    torch.testing.assert_close(warm.bound, plain.bound, rtol=0, atol=0)
    loc, var = amortised_q(model, x)
    z = loc + var.sqrt() * eps  # [k, batch, 3]
    log_q = torch.distributions.Normal(loc, var.sqrt()).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_px_z = plain.log_weights - (log_p - log_q)
    expected = torch.logsumexp(log_px_z + beta * (log_p - log_q), 0) - torch.log(torch.tensor(k))
    torch.testing.assert_close(warm.objective, expected.to(x.dtype))
    if beta < 1:
        assert (warm.objective > warm.bound).float().mean() > 0.5  # lighter KL, higher surrogate
    one = iwae_bound(*args, k=1, noise=eps[:1], kl_weight=beta)
    same = elbo(*args, kl="monte_carlo", beta=beta, noise=eps[:1])
    torch.testing.assert_close(one.objective, same.objective)


def test_the_iwae_warmup_is_refused_where_it_has_no_form(setting):
    _, x, model = setting
    args = (x, model.posterior, model.prior, model.likelihood)
    with pytest.raises(ValueError, match="no gradient='dreg' form; use gradient='standard'"):
        iwae_bound(*args, k=2, gradient="dreg", kl_weight=0.5)
    with pytest.raises(ValueError, match=r"kl_weight must be in \[0, 1\], got 1.5"):
        iwae_bound(*args, k=2, kl_weight=1.5)
