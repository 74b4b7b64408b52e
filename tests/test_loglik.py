"""Importance-weighted log-likelihood estimates against the exact log p(x) of linear-Gaussian models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from conftest import linear_vae_with_a_poor_encoder, standard_error
from vaelab.distributions.sampling import location_scale_sample
from vaelab.evaluation.loglik import (
    LogLikelihoodEstimate,
    bits_per_dim,
    log_likelihood,
    log_likelihood_with_proposal,
    summarise_log_weights,
)
from vaelab.model.registry import ModelConfig, build_model
from vaelab.objectives.bounds import elbo, log_importance_weights

F64 = torch.float64


@pytest.fixture(scope="module")
def setting():
    """A 12-dimensional pPCA model with 3 latents, 300 examples from it, and a linear VAE with its
    decoder and a deliberately poor encoder (shrunk means, too-wide variances)."""
    return linear_vae_with_a_poor_encoder(300)


def exact_elbo(truth, model, x):
    q = model.posterior(x)
    return truth.elbo(x, q.base_dist.loc.detach(), q_var=q.base_dist.scale.detach() ** 2)


def test_iwae_agrees_with_the_exact_log_likelihood(setting):
    truth, x, model = setting
    exact = truth.log_marginal(x)
    # k = 5000: IWAE's downward bias (≈ 0.02 nats at k = 1000 here) is then below the error bar.
    estimate = log_likelihood(model, x, k=5000, seed=0)
    assert isinstance(estimate, LogLikelihoodEstimate)
    assert estimate.log_px.shape == (300,) and estimate.log_px.dtype == F64
    error = estimate.log_px - exact
    # Same examples on both sides: the error bar is that of the per-example differences.
    assert abs(float(error.mean())) < 3 * standard_error(error)
    assert torch.allclose(estimate.log_px, exact, atol=1.0)
    # The delta-method error bars are of the right size (heavy tails make them optimistic).
    rms = float(estimate.mc_standard_error.square().mean().sqrt())
    assert 0.5 < rms / float(error.std()) < 2.0
    assert estimate.samples == 5000 and estimate.method == "iwae"
    assert float(estimate.effective_sample_size.min()) >= 1.0
    assert float(estimate.effective_sample_size.max()) <= 5000.0


def test_elbo_below_iwae_below_exact_and_iwae_grows_with_k(setting):
    truth, x, model = setting
    exact = float(truth.log_marginal(x).mean())
    elbo_value = float(exact_elbo(truth, model, x).mean())
    means, errors = [], []
    for k in (1, 10, 100, 1000):
        estimate = log_likelihood(model, x, k=k, seed=k)
        means.append(estimate.mean)
        errors.append(standard_error(estimate.log_px - truth.log_marginal(x)))
    assert means == sorted(means), means
    assert elbo_value < means[1] < exact + 3 * errors[-1]
    assert means[-1] <= exact + 3 * errors[-1]
    # k = 1 is the Monte Carlo ELBO: it agrees with the closed-form ELBO.
    assert abs(means[0] - elbo_value) < 3 * errors[0]


def test_chunked_equals_unchunked_for_the_same_noise(setting):
    _, x, model = setting
    k = 50
    noise = torch.randn(k, x.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        q, p = model.posterior(x), model.prior()
        log_w = log_importance_weights(x, q, p, model.likelihood, location_scale_sample(q, noise))
        reference = torch.logsumexp(log_w, 0) - math.log(k)
    results = [
        log_likelihood_with_proposal(x, q, p, model.likelihood, k, chunk_size=c, noise=noise)
        for c in (1, 7, k, 1000)
    ]
    for result in results:
        assert torch.allclose(result.log_px, reference, rtol=0, atol=1e-10)
        assert torch.allclose(result.effective_sample_size, results[0].effective_sample_size)
        assert torch.allclose(result.mc_standard_error, results[0].mc_standard_error)


def test_one_sample_is_the_monte_carlo_elbo_with_the_same_noise(setting):
    _, x, model = setting
    noise = torch.randn(1, x.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        q, p = model.posterior(x), model.prior()
        single = log_likelihood_with_proposal(x, q, p, model.likelihood, 1, noise=noise)
        terms = elbo(
            x, model.posterior, model.prior, model.likelihood, kl="monte_carlo", noise=noise
        )
    assert torch.allclose(single.log_px, terms.elbo.double(), rtol=0, atol=1e-12)
    assert torch.isnan(single.mc_standard_error).all()


def test_exact_posterior_proposal_gives_zero_variance_weights(setting):
    """With q = p(z|x) every weight equals p(x): the estimate is exact, ESS = k, error bar 0."""
    truth, x, model = setting
    posterior = truth.posterior(x)
    proposal = MultivariateNormal(posterior.mean, covariance_matrix=posterior.covariance)
    estimate = log_likelihood_with_proposal(
        x, proposal, model.prior(), model.likelihood, 64, chunk_size=10
    )
    assert torch.allclose(estimate.log_px, truth.log_marginal(x), rtol=0, atol=1e-9)
    assert torch.allclose(estimate.effective_sample_size, torch.full((300,), 64.0, dtype=F64))
    assert float(estimate.mc_standard_error.max()) < 1e-6


def test_summary_statistics_of_known_weights():
    # Weights (1, 1, 1, 1): ESS 4, no spread. Weights (1, 0, 0, 0) in the limit: ESS 1.
    log_w = torch.tensor([[0.0, 0.0], [0.0, -1e4], [0.0, -1e4], [0.0, -1e4]], dtype=F64)
    log_mean, ess, se = summarise_log_weights(
        torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0), 4
    )
    assert torch.allclose(log_mean, torch.tensor([0.0, -math.log(4)], dtype=F64))
    assert torch.allclose(ess, torch.tensor([4.0, 1.0], dtype=F64))
    # One weight of k carrying everything: relative variance (k − 1) → error √((1 − 1/k)·k/(k−1)) = 1.
    assert torch.allclose(se, torch.tensor([0.0, 1.0], dtype=F64))


def test_reproducible_with_a_seeded_generator(setting):
    _, x, model = setting
    first = log_likelihood(model, x[:50], k=20, seed=5)
    again = log_likelihood(model, x[:50], k=20, seed=5)
    other = log_likelihood(model, x[:50], k=20, seed=6)
    assert torch.equal(first.log_px, again.log_px)
    assert not torch.equal(first.log_px, other.log_px)


def test_standard_error_and_json_summary(setting):
    _, x, model = setting
    estimate = log_likelihood(model, x, k=10, batch_size=64)
    assert estimate.standard_error == pytest.approx(standard_error(estimate.log_px))
    summary = json.loads(json.dumps(estimate.to_dict()))
    assert summary["examples"] == 300 and summary["samples"] == 10
    assert summary["mean"] == pytest.approx(estimate.mean)


def test_bits_per_dimension():
    d = 784
    assert bits_per_dim(-d * math.log(2.0), d) == pytest.approx(1.0)
    # Data divided by 256 before modelling: the density on the 0..255 scale is 256^−D smaller.
    assert bits_per_dim(-d * math.log(2.0), d, scale=256.0) == pytest.approx(9.0)
    estimate = LogLikelihoodEstimate(
        torch.full((3,), -2.0 * math.log(2.0), dtype=F64),
        torch.zeros(3, dtype=F64),
        torch.ones(3, dtype=F64),
        1,
        "iwae",
        2,
    )
    assert estimate.bits_per_dim() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        bits_per_dim(-1.0, d, scale=0.0)


def test_neural_bernoulli_model_in_float32():
    """A non-linear float32 model: shapes, finiteness, and IWAE-k above the ELBO on average."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(data_shape=(1, 6, 6), latent_dim=4, hidden=(32,)))
    x = (torch.rand(40, 1, 6, 6) > 0.5).float()
    estimate = log_likelihood(model, x, k=200, batch_size=16, chunk_size=30)
    assert estimate.log_px.shape == (40,) and bool(torch.isfinite(estimate.log_px).all())
    assert estimate.data_dim == 36
    with torch.no_grad():
        bound = model.elbo(x, samples=200).elbo
    assert estimate.mean > float(bound.mean())


def test_bad_arguments_are_refused(setting):
    _, x, model = setting
    with pytest.raises(ValueError, match="positive number of importance samples"):
        log_likelihood(model, x, k=0)
    with pytest.raises(ValueError, match="batch_size"):
        log_likelihood(model, x, k=5, batch_size=0)
    with pytest.raises(ValueError, match=r"data_shape \(12,\)"):
        log_likelihood(model, x[:, :5], k=5)
    with pytest.raises(ValueError, match="NaN"):
        log_likelihood(model, torch.full((2, 12), math.nan, dtype=F64), k=5)
    q, p = model.posterior(x), model.prior()
    with pytest.raises(ValueError, match="noise must be"):
        log_likelihood_with_proposal(x, q, p, model.likelihood, 5, noise=torch.zeros(5, 3))
    bernoulli = build_model(ModelConfig(data_shape=(12,), latent_dim=3, hidden=()))
    with pytest.raises(ValueError, match="needs data in"):
        log_likelihood(bernoulli, torch.full((2, 12), 3.0), k=5)


def test_an_examples_estimate_depends_on_nothing_but_the_example(setting):
    """Per-example seeding: the same number for an example whatever else is passed with it, in
    whatever order, batch size or chunk size (once, a shared generator made ``x[:5]`` and
    ``x[1:6]`` disagree on the four examples they share)."""
    _, x, model = setting
    first = log_likelihood(model, x[:5], k=300, seed=7).log_px
    shifted = log_likelihood(model, x[1:6], k=300, seed=7).log_px
    assert torch.equal(first[1:], shifted[:4])
    whole = log_likelihood(model, x[:40], k=300, seed=7).log_px
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shuffled = log_likelihood(model, x[order], k=300, seed=7, batch_size=7, chunk_size=13)
    # The same draws; only the order of float64 sums differs (other batch and chunk sizes).
    assert torch.allclose(shuffled.log_px, whole[order], rtol=0, atol=1e-10)
    # Distinct examples get distinct draws: their errors are independent, not shared.
    other_seed = log_likelihood(model, x[:40], k=300, seed=8).log_px
    assert not torch.equal(whole, other_seed)
