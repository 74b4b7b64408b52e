"""Posterior-collapse diagnostics on linear models whose answers are known in closed form."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from conftest import linear_vae, standard_error
from vaelab.distributions.kl import kl_standard_normal
from vaelab.evaluation.diagnostics import (
    activity,
    collapse_diagnostics,
    mean_kl_per_dimension,
    mutual_information,
    pairwise_log_prob,
    rate_distortion,
)
from vaelab.evaluation.ppca import random_linear_gaussian
from vaelab.model.registry import ModelConfig, build_model

F64 = torch.float64
LATENT = 4
USED = 2  # the encoder reads x into the first two latent units only


@pytest.fixture(scope="module")
def truth():
    return random_linear_gaussian(10, LATENT, noise_var=0.5, seed=5)


@pytest.fixture(scope="module")
def x(truth):
    return truth.sample(400, torch.Generator().manual_seed(6))[0]


def encoder(scale: float = 1.0, used: int = USED):
    """q(z|x) = N(A x + c, diag e^{log_var}) with the rows of A beyond ``used`` zero, and for
    those units c = 0, log_var = 0: q(z_u|x) = N(0, 1) = p(z_u), a collapsed unit."""
    g = torch.Generator().manual_seed(7)
    weight = scale * torch.randn(LATENT, 10, generator=g, dtype=F64) / math.sqrt(10)
    weight[used:] = 0.0
    bias = torch.zeros(LATENT, dtype=F64)
    bias[:used] = 0.3
    log_var = torch.zeros(LATENT, dtype=F64)
    log_var[:used] = -2.0
    return weight, bias, log_var


@pytest.fixture(scope="module")
def model(truth):
    return linear_vae(truth, *encoder())


def test_activity_counts_the_units_the_encoder_reads(truth, model, x):
    weight, _, _ = encoder()
    a = activity(model, x)
    assert a.shape == (LATENT,)
    assert torch.allclose(a, (x @ weight.T).var(0))  # Var_x of the posterior mean A x + c
    assert bool((a[USED:] == 0).all()) and bool((a[:USED] > 1e-2).all())
    assert collapse_diagnostics(model, x, mi_examples=50).active_units == USED
    # A unit that moves a little is counted only above the threshold.
    faint_weight, bias, log_var = encoder()
    faint_weight[USED] = 1e-3 * weight[0]
    faint = linear_vae(truth, faint_weight, bias, log_var)
    assert collapse_diagnostics(faint, x, mi_examples=50).active_units == USED
    assert collapse_diagnostics(faint, x, threshold=0.0, mi_examples=50).active_units == USED + 1


def test_kl_per_dimension_is_zero_for_collapsed_units_and_sums_to_the_rate(model, x):
    per_dim = mean_kl_per_dimension(model, x, batch_size=150)
    assert per_dim.shape == (LATENT,)
    assert torch.allclose(per_dim[USED:], torch.zeros(LATENT - USED, dtype=F64), atol=1e-12)
    q = model.posterior(x)
    mu, log_var = q.base_dist.loc.detach(), 2 * q.base_dist.scale.detach().log()
    expected = torch.stack(
        [kl_standard_normal(mu[:, u : u + 1], log_var[:, u : u + 1]) for u in range(LATENT)], 1
    ).mean(0)
    assert torch.allclose(per_dim, expected)
    terms = rate_distortion(model, x, samples=4)
    assert terms.kl_exact
    assert float(per_dim.sum()) == pytest.approx(float(terms.rate.mean()), rel=1e-10)


def test_rate_and_distortion_make_the_exact_elbo(truth, model, x):
    terms = rate_distortion(model, x, samples=64, seed=0)
    q = model.posterior(x)
    exact = truth.elbo(x, q.base_dist.loc.detach(), q_var=q.base_dist.scale.detach() ** 2)
    error = -(terms.rate + terms.distortion) - exact
    assert abs(float(error.mean())) < 3 * standard_error(error)
    assert bool((terms.rate >= 0).all())


def test_mutual_information_is_zero_for_an_encoder_that_ignores_x(truth, x):
    collapsed = linear_vae(truth, *encoder(used=0))
    mi = mutual_information(collapsed, x[:100], seed=1)
    assert abs(mi.value) < 1e-10 and mi.examples == 100


def test_mutual_information_reaches_log_n_for_a_near_deterministic_encoder(truth, x):
    weight, bias, _ = encoder(scale=50.0, used=LATENT)
    sharp = linear_vae(truth, weight, bias, torch.full((LATENT,), -12.0, dtype=F64))
    mi = mutual_information(sharp, x[:100], seed=2)
    assert mi.upper_bound == pytest.approx(math.log(100))
    assert mi.upper_bound - 1e-3 < mi.value <= mi.upper_bound + 1e-12


def test_mutual_information_matches_the_gaussian_closed_form(truth, model, x):
    """x ~ N(b, C) and q(z|x) = N(A x + c, D) give I(x; z) = ½ log |A C Aᵀ + D| / |D|. The
    estimator is a lower bound on average (it is InfoNCE with critic log q(z|x)) and cannot
    exceed log N; with N = 400 it falls a little short."""
    weight, _, log_var = encoder()
    aggregate = weight @ truth.covariance() @ weight.T + torch.diag(log_var.exp())
    exact = 0.5 * float(torch.logdet(aggregate) - log_var.sum())
    mi = mutual_information(model, x, samples=20, seed=3)
    assert 0.0 <= mi.value <= math.log(400)
    assert exact - 0.3 < mi.value < exact + 3 * mi.standard_error


def test_pairwise_log_prob_matches_torch():
    g = torch.Generator().manual_seed(4)
    loc, scale = torch.randn(7, 3, generator=g, dtype=F64), torch.rand(7, 3, generator=g) + 0.1
    z = torch.randn(5, 3, generator=g, dtype=F64)
    q = Independent(Normal(loc, scale.double()), 1)
    assert torch.allclose(pairwise_log_prob(q, z), q.log_prob(z.unsqueeze(1)))
    tril = torch.tril(torch.rand(7, 3, 3, generator=g, dtype=F64)) + torch.eye(3, dtype=F64)
    full = MultivariateNormal(loc, scale_tril=tril)
    assert pairwise_log_prob(full, z).shape == (5, 7)


def test_full_covariance_posteriors(x):
    torch.manual_seed(0)
    config = ModelConfig(
        data_shape=(10,), latent_dim=3, hidden=(), likelihood="gaussian", posterior="full"
    )
    model = build_model(config).double()
    assert mean_kl_per_dimension(model, x) is None
    result = collapse_diagnostics(model, x, mi_examples=60, samples=2)
    assert result.kl_per_dimension is None and result.activity.shape == (3,)
    assert 0.0 <= result.mutual_information.value <= math.log(60)


def test_summary_is_json_and_consistent(model, x):
    result = collapse_diagnostics(model, x, mi_examples=80, seed=5)
    assert result.mutual_information.examples == 80
    assert result.elbo == pytest.approx(-(result.rate + result.distortion))
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["active_units"] == USED and summary["latent_dim"] == LATENT
    assert len(summary["kl_per_dimension"]) == LATENT
    with pytest.raises(ValueError, match="mi_examples"):
        collapse_diagnostics(model, x, mi_examples=1)
    with pytest.raises(ValueError, match="at least two"):
        activity(model, x[:1])


def test_an_iaf_posteriors_mutual_information_is_computed_only_when_asked():
    """Scoring every code under every IAF posterior takes N² sequential inverses: by default the
    estimate is left out and the summary says why; asked for, it is computed and bounded."""
    model = build_model(
        ModelConfig(data_shape=(10,), latent_dim=LATENT, hidden=(8,), posterior="iaf", flow_steps=2)
    )
    x = torch.rand(12, 10)
    with torch.no_grad():
        found = collapse_diagnostics(model, x, seed=0)
        assert found.mutual_information is None
        assert "sequential inverse" in found.to_dict()["mutual_information_note"]
        asked = collapse_diagnostics(model, x, mi_examples=12, seed=0).mutual_information
    assert asked is not None and -0.05 < asked.value <= math.log(12)
