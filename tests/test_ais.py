"""Annealed importance sampling and its reverse against the exact log p(x) of linear-Gaussian
models, and the HMC transitions against exact (tempered) posteriors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import linear_vae, standard_error
from vaelab.evaluation.ais import (
    AisEstimate,
    HmcSettings,
    _hmc,
    _Target,
    ais,
    annealing_schedule,
    bdmc,
    reverse_ais,
    simulate,
)
from vaelab.evaluation.ppca import LinearGaussianModel, random_linear_gaussian
from vaelab.model.registry import ModelConfig, build_model
from vaelab.objectives.noise import ExampleNoise

F64 = torch.float64
HMC = HmcSettings(leapfrog_steps=5)


@pytest.fixture(scope="module")
def truth() -> LinearGaussianModel:
    return random_linear_gaussian(10, 2, noise_var=0.5, seed=3)


@pytest.fixture(scope="module")
def model(truth):
    """A linear VAE whose decoder is ``truth``; AIS never looks at the encoder."""
    return linear_vae(
        truth, torch.zeros(2, 10, dtype=F64), torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    )


@pytest.fixture(scope="module")
def sandwich(truth, model):
    """Bidirectional Monte Carlo on 100 examples simulated from the model, and their exact log p(x)."""
    result = bdmc(model, 100, chains=16, steps=200, hmc=HMC, seed=0)
    return result, truth.log_marginal(result.x)


def test_forward_and_reverse_ais_agree_with_the_exact_log_likelihood(sandwich):
    result, exact = sandwich
    for estimate in (result.lower, result.upper):
        assert isinstance(estimate, AisEstimate)
        assert estimate.log_px.shape == (100,)
        error = estimate.log_px - exact
        assert abs(float(error.mean())) < 3 * standard_error(error), estimate.method
        assert torch.allclose(estimate.log_px, exact, atol=1.5)
    assert result.lower.method == "ais" and result.upper.method == "reverse-ais"


def test_reverse_ais_above_exact_above_forward_ais_on_average(sandwich):
    result, exact = sandwich
    lower, upper, truth = result.lower.mean, result.upper.mean, float(exact.mean())
    assert lower <= upper
    assert lower <= truth + 3 * standard_error(result.lower.log_px - exact)
    assert upper >= truth - 3 * standard_error(result.upper.log_px - exact)


def test_adaptation_reaches_the_target_acceptance_and_both_directions_share_step_sizes(sandwich):
    result, _ = sandwich
    assert 0.5 < result.lower.acceptance_rate < 0.8
    assert 0.5 < result.upper.acceptance_rate < 0.8
    assert result.lower.step_sizes.shape == (199, 100)
    assert torch.equal(result.lower.step_sizes, result.upper.step_sizes)
    # The posterior is narrower than the prior: the step size shrinks along the path.
    assert float(result.lower.step_sizes[-1].mean()) < float(result.lower.step_sizes[0].mean())


def test_short_runs_give_strict_bounds(truth, model):
    """With ten steps AIS is far from converged, and the bias shows on the side the theory says:
    forward AIS below log p(x), reverse AIS above, each by many standard errors."""
    x, z = simulate(model, 60, seed=1)
    exact = truth.log_marginal(x)
    lower = ais(model, x, chains=4, steps=10, hmc=HMC, seed=1)
    upper = reverse_ais(
        model, x, z, chains=4, steps=10, hmc=HMC, step_sizes=lower.step_sizes, seed=1
    )
    below, above = lower.log_px - exact, upper.log_px - exact
    assert float(below.mean()) < -3 * standard_error(below)
    assert float(above.mean()) > 3 * standard_error(above)


@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_hmc_leaves_the_tempered_posterior_invariant(truth, model, beta):
    """p(z) p(x|z)^β is the posterior of the linear-Gaussian model with noise Ψ / β. Chains started
    from it stay there: the mean and covariance of 4000 chains after 15 transitions match it."""
    x = truth.sample(1, torch.Generator().manual_seed(2))[0]
    tempered = LinearGaussianModel(truth.weight, truth.bias, truth.noise_var / beta)
    exact = tempered.posterior(x)
    generator = torch.Generator().manual_seed(3)
    chol = torch.linalg.cholesky(exact.covariance)
    z = exact.mean + torch.randn(4000, 1, 2, generator=generator, dtype=F64) @ chol.T
    target = _Target(x, model.prior(), model.likelihood)
    state = target(z)
    noise = ExampleNoise(x, 3)
    accepted = 0.0
    for _ in range(15):
        state, accept = _hmc(state, beta, torch.full((1,), 0.4, dtype=F64), target, 5, noise)
        accepted += float(accept.mean()) / 15
    assert 0.2 < accepted < 1.0  # it moves
    samples = state.z[:, 0]
    mean_se = (exact.covariance.diagonal() / 4000).sqrt()
    assert bool(((samples.mean(0) - exact.mean[0]).abs() < 4 * mean_se).all())
    assert torch.allclose(
        samples.T.cov(), exact.covariance, atol=0.1 * float(exact.covariance.diagonal().max())
    )


def test_schedules():
    for kind in ("linear", "sigmoid"):
        betas = annealing_schedule(50, kind)
        assert betas.shape == (51,) and betas.dtype == F64
        assert float(betas[0]) == 0.0 and float(betas[-1]) == 1.0
        assert bool((betas.diff() > 0).all())
    linear = annealing_schedule(4, "linear")
    assert torch.allclose(linear, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64))
    sigmoid = annealing_schedule(10, "sigmoid")
    # Symmetric about the middle, and denser near both ends than the linear path.
    assert torch.allclose(sigmoid + sigmoid.flip(0), torch.ones(11, dtype=F64))
    assert float(sigmoid[1]) < 0.1
    with pytest.raises(ValueError, match="unknown schedule"):
        annealing_schedule(10, "cosine")
    with pytest.raises(ValueError, match="positive number"):
        annealing_schedule(0)


def test_explicit_schedules_and_fixed_step_sizes(model):
    x = simulate(model, 5, seed=4)[0]
    fixed = HmcSettings(leapfrog_steps=2, step_size=0.3, adapt_step_size=False)
    betas = torch.tensor([0.0, 0.1, 0.5, 1.0])
    estimate = ais(model, x, chains=3, schedule=betas, hmc=fixed)
    assert estimate.steps == 3
    assert torch.equal(estimate.step_sizes, torch.full((2, 5), 0.3, dtype=F64))
    with pytest.raises(ValueError, match="from β = 0 to β = 1"):
        ais(model, x, schedule=torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="must not decrease"):
        ais(model, x, schedule=torch.tensor([0.0, 0.6, 0.5, 1.0]))


def test_reproducible_with_a_seeded_generator(model):
    x = simulate(model, 8, seed=5)[0]
    settings = {"chains": 3, "steps": 5, "hmc": HmcSettings(leapfrog_steps=2)}
    first = ais(model, x, seed=6, **settings)
    again = ais(model, x, seed=6, **settings)
    assert torch.equal(first.log_px, again.log_px)
    assert torch.equal(first.step_sizes, again.step_sizes)


def test_bad_arguments_are_refused(model):
    x, z = simulate(model, 4, seed=7)
    with pytest.raises(ValueError, match="exact posterior samples"):
        reverse_ais(model, x, z[:, :1], chains=2, steps=5)
    with pytest.raises(ValueError, match="step_sizes must be"):
        reverse_ais(model, x, z, chains=2, steps=5, step_sizes=torch.ones(3, 4))
    with pytest.raises(ValueError, match="chains must be"):
        ais(model, x, chains=0)
    with pytest.raises(ValueError, match="leapfrog_steps"):
        ais(model, x, hmc=HmcSettings(leapfrog_steps=0))


def test_neural_float32_model_sandwich():
    """A small non-linear Bernoulli model in float32: BDMC runs batched, gives finite numbers
    per example, and the bounds are in order."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(data_shape=(16,), latent_dim=2, hidden=(16,), activation="tanh"))
    result = bdmc(
        net,
        20,
        chains=4,
        steps=100,
        batch_size=8,
        hmc=HmcSettings(leapfrog_steps=3),
        seed=8,
    )
    assert result.x.shape == (20, 16) and result.z.shape == (20, 2)
    for estimate in (result.lower, result.upper):
        assert estimate.log_px.shape == (20,) and bool(torch.isfinite(estimate.log_px).all())
    assert result.gap > -3 * standard_error(result.upper.log_px - result.lower.log_px)
    summary = json.loads(json.dumps(result.lower.to_dict()))
    assert summary["method"] == "ais" and summary["steps"] == 100


def test_simulation_is_reproducible_and_leaves_global_random_state_alone():
    torch.manual_seed(0)
    net = build_model(ModelConfig(data_shape=(6,), latent_dim=2, hidden=(8,)))
    state = torch.random.get_rng_state()
    first = simulate(net, 5, seed=9)
    again = simulate(net, 5, seed=9)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert set(first[0].unique().tolist()) <= {0.0, 1.0}  # Bernoulli draws, not means


def test_an_examples_estimate_depends_on_nothing_but_the_example(model):
    """Each example's chains draw from its own streams and adapt on its own pilots: AIS of
    ``x[:5]`` and of ``x[1:6]`` agree on the four shared examples, for any batch size."""
    x = simulate(model, 6, seed=10)[0]
    settings = {"chains": 3, "steps": 8, "hmc": HmcSettings(leapfrog_steps=2), "seed": 11}
    first = ais(model, x[:5], **settings)
    shifted = ais(model, x[1:6], batch_size=2, **settings)
    assert torch.equal(first.log_px[1:], shifted.log_px[:4])
    assert torch.equal(first.step_sizes[:, 1:], shifted.step_sizes[:, :4])


@pytest.mark.parametrize(
    ("prior", "likelihood"),
    [
        ("mixture", "bernoulli"),
        ("learnable", "bernoulli"),
        ("normal", "gaussian"),
        ("normal", "laplace"),
    ],
)
def test_a_diverged_hmc_step_is_rejected_not_a_crash(prior, likelihood):
    """A step of 1e30 throws the leapfrog trajectory to huge, then inf and NaN codes, where the
    decoder's parameters are NaN too. Such a proposal is rejected: every chain stays where it
    was and its acceptance probability is 0 (once torch.distributions' argument checks raised)."""
    torch.manual_seed(0)
    config = ModelConfig(
        data_shape=(6,), latent_dim=2, hidden=(8,), prior=prior, likelihood=likelihood
    )
    net = build_model(config)
    x = torch.rand(3, 6).round()
    with torch.no_grad():
        target = _Target(x, net.prior(), net.likelihood)
    state = target(torch.randn(4, 3, 2))
    new, accept = _hmc(state, 1.0, torch.full((3,), 1e30), target, 3, ExampleNoise(x, 0))
    for before, after in zip(state, new, strict=True):
        assert torch.equal(before, after)
    assert torch.equal(accept, torch.zeros(4, 3))
