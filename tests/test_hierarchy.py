"""Several stochastic layers (``vaelab.components.hierarchy``): the two-layer linear-Gaussian oracle for the
bounds and AIS, the chain's densities against torch.distributions, ancestral moments, active units
per layer, training, save/load/resume, and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.distributions import MultivariateNormal, Normal

import vaelab
from conftest import CrashAfter, standard_error
from vaelab.components.hierarchy import LocalLayersPosterior
from vaelab.distributions.chain import GaussianChain, LatentChain
from vaelab.distributions.stop_gradient import stop_gradient
from vaelab.evaluation.ais import HmcSettings, ais
from vaelab.evaluation.diagnostics import (
    activity,
    activity_beyond_layer_above,
    collapse_diagnostics,
)
from vaelab.evaluation.gap import families_containing, fit_local_posteriors
from vaelab.evaluation.loglik import log_likelihood
from vaelab.model.registry import ModelConfig, build_model
from vaelab.objectives.bounds import log_importance_weights
from vaelab.objectives.noise import ExampleNoise, posterior_mean
from vaelab.runs.options import RunError, resolve

F64 = torch.float64


# ------------------------------------------------------------------------- the linear oracle
class TwoLayerLinear:
    """z₂ ~ N(0, I), z₁ | z₂ ~ N(A z₂ + a, diag s²), x | z₁ ~ N(W z₁ + b, diag σ²), float64, and
    its exact posterior p(z₁|x) p(z₂|z₁) (z₂ ⊥ x given z₁), all from Gaussian conditioning."""

    def __init__(self, data: int = 6, d1: int = 3, d2: int = 2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d1, self.d2, self.data = d1, d2, data
        self.A = torch.randn(d1, d2, generator=g, dtype=F64)
        self.a = 0.5 * torch.randn(d1, generator=g, dtype=F64)
        self.s2 = 0.3 + torch.rand(d1, generator=g, dtype=F64)
        self.W = torch.randn(data, d1, generator=g, dtype=F64)
        self.b = torch.randn(data, generator=g, dtype=F64)
        self.sigma2 = 0.2 + 0.5 * torch.rand(data, generator=g, dtype=F64)
        # The marginal of x: N(W a + b, W (A Aᵀ + diag s²) Wᵀ + diag σ²).
        self.cov_z1 = self.A @ self.A.T + torch.diag(self.s2)
        self.marginal = MultivariateNormal(
            self.W @ self.a + self.b, self.W @ self.cov_z1 @ self.W.T + torch.diag(self.sigma2)
        )
        # p(z₁|x) = N(M x + c, P⁻¹), P = Σ₁⁻¹ + Wᵀ Ψ⁻¹ W.
        precision = torch.linalg.inv(self.cov_z1) + self.W.T @ torch.diag(1 / self.sigma2) @ self.W
        self.cov_post1 = torch.linalg.inv(precision)
        self.M = self.cov_post1 @ self.W.T @ torch.diag(1 / self.sigma2)
        self.c = self.cov_post1 @ torch.linalg.solve(self.cov_z1, self.a) - self.M @ self.b
        # p(z₂|z₁) = N(N (z₁ − a), (I + Aᵀ S⁻¹ A)⁻¹).
        self.cov_post2 = torch.linalg.inv(
            torch.eye(d2, dtype=F64) + self.A.T @ torch.diag(1 / self.s2) @ self.A
        )
        self.N = self.cov_post2 @ self.A.T @ torch.diag(1 / self.s2)
        self.e = -self.N @ self.a

    def sample_x(self, n: int, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.marginal.sample((n,))

    def model(self, posterior: str = "diagonal", widen: float = 1.2) -> vaelab.VAEModel:
        """The model built by the library (``hidden=()``: every map linear) with these weights,
        and q = the exact posterior (``posterior="full"``), or (``"diagonal"``) the exact means
        with isotropic variances ``widen`` times the largest posterior variance of each layer,
        wider than the posterior in every direction, so the importance weights are bounded."""
        config = ModelConfig(
            data_shape=(self.data,),
            latent_dim=(self.d1, self.d2),
            hidden=(),
            likelihood="gaussian-per-dimension",
            posterior=posterior,
        )
        model = build_model(config).double()
        with torch.no_grad():
            decoder = model.likelihood.decoder.body.layers[0]
            decoder.weight.copy_(self.W)
            decoder.bias.copy_(self.b)
            model.likelihood.log_sigma.copy_(0.5 * self.sigma2.log())
            _set_gaussian(model.prior.conditionals[0].encoder.layers[0], self.A, self.a, self.s2)
            first = model.posterior.first.encoder.layers[0]
            upper = model.posterior.conditionals[0].encoder.layers[0]
            if posterior == "full":
                _set_full(first, self.M, self.c, self.cov_post1)
                _set_full(upper, self.N, self.e, self.cov_post2)
            else:
                var1 = widen * torch.linalg.eigvalsh(self.cov_post1).max()
                var2 = widen * torch.linalg.eigvalsh(self.cov_post2).max()
                _set_gaussian(first, self.M, self.c, var1.expand(self.d1))
                _set_gaussian(upper, self.N, self.e, var2.expand(self.d2))
        return model


def _set_gaussian(layer: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor, var) -> None:
    """A linear layer whose features are [μ = weight · input + bias, log σ² = log var]."""
    out = weight.shape[0]
    layer.weight.copy_(torch.cat([weight, torch.zeros(out, weight.shape[1], dtype=F64)]))
    layer.bias.copy_(torch.cat([bias, torch.as_tensor(var, dtype=F64).log()]))


def _set_full(layer: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor, cov) -> None:
    """Features [μ, log diag L, strictly lower L] of ``FullCovariancePosterior`` for N(weight ·
    input + bias, cov), L the Cholesky factor of cov."""
    n, fan_in = weight.shape
    tril = torch.linalg.cholesky(cov)
    rows, cols = torch.tril_indices(n, n, offset=-1)
    constant = torch.cat([tril.diagonal().log(), tril[rows, cols]])
    layer.weight.copy_(torch.cat([weight, torch.zeros(constant.numel(), fan_in, dtype=F64)]))
    layer.bias.copy_(torch.cat([bias, constant]))


@pytest.fixture(scope="module")
def oracle() -> tuple[TwoLayerLinear, torch.Tensor, torch.Tensor]:
    truth = TwoLayerLinear()
    x = truth.sample_x(60, seed=1)
    return truth, x, truth.marginal.log_prob(x)


def test_with_the_exact_posterior_every_importance_weight_is_the_exact_likelihood(oracle):
    """q(z₁|x) q(z₂|z₁) = p(z₁, z₂ | x) makes w = p(x, z₁, z₂) / q(z₁, z₂ | x) = p(x) for every
    draw: log p(x|z₁) + log p(z₁|z₂) + log p(z₂) − log q all in one number, exact."""
    truth, x, exact = oracle
    model = truth.model("full")
    with torch.no_grad():
        q, p = model.posterior(x), model.prior()
        z = ExampleNoise(x, 0).sample(q, 7)  # [7, n, 5]
        log_w = log_importance_weights(x, q, p, model.likelihood, z)
    assert log_w.shape == (7, 60)
    torch.testing.assert_close(log_w, exact.expand(7, -1), rtol=0, atol=1e-9)


def test_iwae_and_ais_agree_with_the_exact_likelihood_and_the_elbo_lies_below(oracle):
    truth, x, exact = oracle
    model = truth.model("diagonal")
    iwae = log_likelihood(model, x, k=2000, seed=0)
    error = iwae.log_px - exact
    iwae_se = math.sqrt(float(iwae.mc_standard_error.square().mean()) / error.numel())
    assert abs(float(error.mean())) < 3 * iwae_se, (float(error.mean()), iwae_se)
    assert float(iwae.effective_sample_size.min()) > 50  # the proposal is a reasonable one

    found = ais(model, x, chains=16, steps=200, hmc=HmcSettings(leapfrog_steps=5), seed=0)
    error = found.log_px - exact
    assert abs(float(error.mean())) < 3 * standard_error(error), (
        float(error.mean()),
        standard_error(error),
    )
    assert 0.5 < found.acceptance_rate < 0.8

    with torch.no_grad():
        noise = ExampleNoise(x, 0).normal(500, (5,), like=x)
        elbo = model.elbo(x, noise=noise).elbo  # [n], a Monte Carlo KL over both layers
    gap = exact - elbo  # KL(q ‖ p(z|x)) per example: positive, not noise
    assert float(gap.mean()) > 10 * standard_error(gap) > 0


# ------------------------------------------------------------- densities and ancestral sampling
@pytest.fixture(scope="module", params=[((4, 3), "diagonal"), ((4, 3, 2), "full")], ids=str)
def nonlinear(request):
    sizes, posterior = request.param
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = ModelConfig(
            data_shape=(6,),
            latent_dim=sizes,
            hidden=(7,),
            likelihood="gaussian",
            posterior=posterior,
            prior="learnable",
        )
        model = build_model(config).double()
        x = torch.randn(5, 6, dtype=F64)
    return model, x, sizes, posterior


def _gaussian(features: torch.Tensor, size: int, family: str):
    """The layer's Gaussian read off its network features with torch.distributions alone."""
    mu = features[..., :size]
    if family == "diagonal":
        return Normal(mu, features[..., size : 2 * size].mul(0.5).exp()), True
    tril = torch.diag_embed(features[..., size : 2 * size].exp())
    rows, cols = torch.tril_indices(size, size, offset=-1)
    tril[..., rows, cols] = features[..., 2 * size :]
    return MultivariateNormal(mu, scale_tril=tril), False


def test_the_joint_log_density_is_the_sum_of_the_layers(nonlinear):
    model, x, sizes, family = nonlinear
    q, p = model.posterior(x), model.prior()
    assert isinstance(q, GaussianChain) and isinstance(p, GaussianChain)
    assert q.batch_shape == (5,) and p.batch_shape == () and q.event_shape == (sum(sizes),)
    z, log_q = q.rsample_and_log_prob((3,))  # [3, 5, Σd]
    layers = z.split(sizes, dim=-1)

    def log_density(distribution, value, diagonal):
        return distribution.log_prob(value).sum(-1) if diagonal else distribution.log_prob(value)

    # q(z₁|x) q(z₂|z₁) ⋯ from the networks' raw outputs.
    distribution, diagonal = _gaussian(model.posterior.first.encoder(x), sizes[0], family)
    expected = log_density(distribution, layers[0], diagonal)
    for index, conditional in enumerate(model.posterior.conditionals):
        features = conditional.encoder(layers[index])
        distribution, diagonal = _gaussian(features, sizes[index + 1], family)
        expected = expected + log_density(distribution, layers[index + 1], diagonal)
    torch.testing.assert_close(q.log_prob(z), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_q, expected, rtol=1e-12, atol=1e-12)

    # p(z_L) p(z_{L−1}|z_L) ⋯ p(z₁|z₂): the learnable top and diagonal conditionals.
    top = Normal(model.prior.top.loc, model.prior.top.log_scale.exp())
    expected = top.log_prob(layers[-1]).sum(-1)
    for index, conditional in enumerate(model.prior.conditionals):
        lower = len(sizes) - 2 - index
        distribution, _ = _gaussian(
            conditional.encoder(layers[lower + 1]), sizes[lower], "diagonal"
        )
        expected = expected + distribution.log_prob(layers[lower]).sum(-1)
    torch.testing.assert_close(p.log_prob(z), expected, rtol=1e-12, atol=1e-12)

    # The likelihood reads z₁ alone.
    moved = torch.cat([layers[0], torch.randn_like(z[..., sizes[0] :])], dim=-1)
    torch.testing.assert_close(model.likelihood.log_prob(x, moved), model.likelihood.log_prob(x, z))


def test_from_noise_and_the_stopped_gradient(nonlinear):
    """``from_noise`` is the same map as sampling; the detached chain keeps log q's values and its
    gradient in z, and has none in any parameter (the conditionals' networks included)."""
    model, x, sizes, _ = nonlinear
    q = model.posterior(x)
    eps = torch.randn(4, 5, sum(sizes), dtype=F64)
    z, log_q = q.from_noise(eps)
    torch.testing.assert_close(q.log_prob(z), log_q, rtol=1e-12, atol=1e-12)
    point = z.detach().requires_grad_(True)
    stopped = stop_gradient(q)
    assert isinstance(stopped, GaussianChain)
    value = stopped.log_prob(point)
    torch.testing.assert_close(value, q.log_prob(point), rtol=0, atol=0)
    params = [p for p in model.posterior.parameters()]
    grads = torch.autograd.grad(value.sum(), [point, *params], allow_unused=True)
    (expected,) = torch.autograd.grad(q.log_prob(point).sum(), point)
    torch.testing.assert_close(grads[0], expected)
    assert all(g is None for g in grads[1:])


def test_ancestral_samples_have_the_linear_models_moments():
    truth = TwoLayerLinear(seed=3)
    model = truth.model("diagonal", widen=1.0)
    n = 200_000
    x = truth.sample_x(1, seed=4)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(5)
        prior_draws = model.prior().sample((n,))  # [n, 5]
        posterior_draws = model.posterior(x).rsample((n,))[:, 0]  # [n, 5]
    # Prior: E[z] = [a, 0], Cov = [[A Aᵀ + diag s², A], [Aᵀ, I]].
    prior_mean = torch.cat([truth.a, torch.zeros(2, dtype=F64)])
    prior_cov = torch.cat(
        [
            torch.cat([truth.cov_z1, truth.A], 1),
            torch.cat([truth.A.T, torch.eye(2, dtype=F64)], 1),
        ]
    )
    # Posterior: z₁ ~ N(m, V₁), z₂ | z₁ ~ N(N z₁ + e, V₂).
    q = model.posterior(x)
    m = q.first.mean[0].detach()
    v1 = torch.diag(q.first.variance[0].detach())
    v2 = torch.diag(torch.linalg.eigvalsh(truth.cov_post2).max().expand(2))
    post_mean = torch.cat([m, truth.N @ m + truth.e])
    post_cov = torch.cat(
        [
            torch.cat([v1, v1 @ truth.N.T], 1),
            torch.cat([truth.N @ v1, truth.N @ v1 @ truth.N.T + v2], 1),
        ]
    )
    for draws, mean, cov in (
        (prior_draws, prior_mean, prior_cov),
        (posterior_draws, post_mean, post_cov),
    ):
        variance = cov.diagonal()
        assert ((draws.mean(0) - mean).abs() < 5 * (variance / n).sqrt()).all()
        # The standard error of a sample covariance entry is √((σᵢᵢ σⱼⱼ + σᵢⱼ²) / n).
        error = (torch.outer(variance, variance) + cov.square()).div(n).sqrt()
        assert ((torch.cov(draws.T) - cov).abs() < 5 * error).all()
    # posterior_mean averages ancestral draws: near the exact mean.
    with torch.no_grad():
        found = posterior_mean(model.posterior(x), x, seed=0)[0]
    assert ((found - post_mean).abs() < 5 * (post_cov.diagonal() / 1000).sqrt()).all()


def test_a_mixture_top_prior_samples_ancestrally_without_a_noise_form():
    model = build_model(ModelConfig(data_shape=(6,), latent_dim=(3, 2), prior="mixture"))
    p = model.prior()
    assert type(p) is LatentChain and not hasattr(p, "from_noise")
    z = p.sample((4,))
    assert z.shape == (4, 5) and torch.isfinite(p.log_prob(z)).all()
    x = torch.rand(3, 6)
    assert torch.isfinite(log_likelihood(model, x, k=20, seed=0).log_px).all()


# --------------------------------------------------------------------- active units per layer
def test_active_units_are_counted_per_layer():
    """z₁'s units 0 and 1 follow x, unit 2 does not (a zero encoder row); z₂'s unit 0 follows
    z₁'s unit 0, unit 1 is constant: [2, 1] active, with activities equal to the variance of the
    exact posterior means (within the Monte Carlo noise of the 1000-draw means)."""
    d1, d2, data = 3, 2, 6
    model = build_model(
        ModelConfig(data_shape=(data,), latent_dim=(d1, d2), hidden=(), likelihood="gaussian")
    ).double()
    g = torch.Generator().manual_seed(0)
    encoder = torch.randn(d1, data, generator=g, dtype=F64)
    encoder[2] = 0.0
    upper = torch.zeros(d2, d1, dtype=F64)
    upper[0, 0] = 0.7
    with torch.no_grad():
        _set_gaussian(
            model.posterior.first.encoder.layers[0], encoder, torch.zeros(d1, dtype=F64),
            torch.full((d1,), math.exp(-4.0), dtype=F64),
        )  # fmt: skip
        _set_gaussian(
            model.posterior.conditionals[0].encoder.layers[0], upper, torch.ones(d2, dtype=F64),
            torch.full((d2,), math.exp(-4.0), dtype=F64),
        )  # fmt: skip
    x = torch.randn(400, data, generator=g, dtype=F64)
    means1 = x @ encoder.T
    exact = torch.cat([means1, means1 @ upper.T + 1.0], 1).var(0)
    found = activity(model, x, seed=0)
    # Monte Carlo means of 1000 draws of variance e⁻⁴ add about e⁻⁴ / 1000 to each activity.
    torch.testing.assert_close(found, exact, rtol=0.05, atol=1e-4)

    diagnostics = collapse_diagnostics(model, x, seed=0, mi_examples=100)
    assert diagnostics.active_units_per_layer == [2, 1]
    as_dict = diagnostics.to_dict()
    assert as_dict["active_units_per_layer"] == [2, 1] and as_dict["latent_sizes"] == [3, 2]
    assert as_dict["active_units"] == 3 and as_dict["latent_dim"] == 5
    assert as_dict["kl_per_dimension"] is None  # the layers' KLs do not split per unit
    from dataclasses import replace

    from vaelab.runs.evaluate import active_units_text

    assert active_units_text(replace(diagnostics, activity_beyond=None)) == (
        "3 of 5 (z1: 2 of 3; z2: 1 of 2)"
    )

    # The prior's p(z₁|z₂) = N(E z₂ + f, ·) with E[0, 0] = 1 / 0.7 explains z₁'s unit 0 by z₂'s
    # unit 0 exactly: z₁₀ − m₀(z₂) = z₁₀ − (0.7 z₁₀ + 1) / 0.7 − f₀ is constant in x, so only
    # unit 1 of z₁ is active beyond z₂. Exact: R = Var_x((I − E C) μ₁ − E d − f) for z₁, A for z₂.
    lower = torch.zeros(d1, d2, dtype=F64)
    lower[0, 0] = 1 / 0.7
    with torch.no_grad():
        _set_gaussian(
            model.prior.conditionals[0].encoder.layers[0], lower, torch.full((d1,), 0.3, dtype=F64),
            torch.ones(d1, dtype=F64),
        )  # fmt: skip
    beyond = activity_beyond_layer_above(model, x, seed=0)
    exact_beyond = torch.cat([(means1 - means1 @ (lower @ upper).T).var(0), exact[d1:]])
    torch.testing.assert_close(beyond, exact_beyond, rtol=0.05, atol=1e-3)
    diagnostics = collapse_diagnostics(model, x, seed=0, mi_examples=100)
    assert diagnostics.active_units_per_layer == [2, 1]  # A_u alone cannot tell
    assert diagnostics.active_units_beyond_layer_above == [1, 1]
    torch.testing.assert_close(diagnostics.activity_beyond[d1:], diagnostics.activity[d1:])
    assert active_units_text(diagnostics) == "3 of 5 (z1: 2 of 3, 1 beyond z2; z2: 1 of 2)"
    one_layer = build_model(
        ModelConfig(data_shape=(data,), latent_dim=2, hidden=(), likelihood="gaussian")
    )
    assert (
        collapse_diagnostics(one_layer, x.float(), seed=0).to_dict()[
            "active_units_beyond_layer_above"
        ]
        is None
    )
    with pytest.raises(ValueError, match="several layers"):
        activity_beyond_layer_above(one_layer, x.float())


# --------------------------------------------------------------------------- training and files
@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """600 digits binarised at half intensity: a Bernoulli likelihood's own kind of data."""
    return (load_digits().data[:600] > 8).astype(np.float32)


@pytest.mark.parametrize(
    "options",
    [{}, {"objective": "iwae", "k": 4, "gradient": "dreg"}, {"gradient": "stl"}],
    ids=["elbo", "iwae-dreg", "elbo-stl"],
)
def test_training_raises_the_bound(digits, options):
    model = vaelab.VAE(
        latent_dim=(6, 3),
        hidden=(32,),
        epochs=25,
        batch_size=32,
        lr=3e-3,
        seed=0,
        device="cpu",
        **options,
    ).fit(digits)
    elbos = [m.elbo for m in model.history_]
    assert all(math.isfinite(e) for e in elbos)
    assert elbos[-1] > elbos[0] + 1.0, elbos
    assert model.transform(digits[:5]).shape == (5, 9)


def test_save_load_and_the_gap(digits, tmp_path):
    model = vaelab.VAE(latent_dim=(4, 2), hidden=(16,), epochs=2, seed=0, device="cpu")
    model.fit(digits)
    model.save(tmp_path / "m")
    document = json.loads((tmp_path / "m" / "vaelab.json").read_text())
    assert document["model"]["latent_dim"] == [4, 2]
    assert document["estimator"]["latent_dim"] == [4, 2]
    loaded = vaelab.load(tmp_path / "m")
    assert loaded.latent_dim == (4, 2)
    np.testing.assert_array_equal(loaded.elbo(digits[:20]), model.elbo(digits[:20]))
    np.testing.assert_array_equal(loaded.transform(digits[:20]), model.transform(digits[:20]))
    assert loaded.sample(3).shape == (3, 64)

    # q*(z₁) per example with the model's q(z₂|z₁): contains the amortised q, so starts there.
    network = loaded.model_
    x = torch.from_numpy(digits[:8])
    with torch.no_grad():
        assert families_containing(network.posterior(x)) == ("diagonal", "full")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    local = fit_local_posteriors(network, x, "diagonal", steps=60, seed=0)
    assert isinstance(local, LocalLayersPosterior)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters())
    refined = loaded.refine(digits[:8], steps=60, samples=200)
    assert refined.codes.shape == (8, 6)
    assert float(np.mean(refined.elbo)) > float(np.mean(loaded.elbo(digits[:8], samples=200))) - 0.1


def test_a_two_layer_run_killed_mid_epoch_resumes_bit_identical(tmp_path):
    from vaelab.train.batches import IndexedBatches
    from vaelab.train.checkpoint import CheckpointPolicy, load_checkpoint
    from vaelab.train.config import TrainConfig
    from vaelab.train.trainer import Trainer

    x = torch.from_numpy((load_digits().data[:96] / 16.0).astype(np.float32))
    config = TrainConfig(epochs=3, batch_size=16, lr=3e-3, objective="iwae", k=3, gradient="dreg")

    def model(seed: int) -> vaelab.VAEModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(ModelConfig(data_shape=(64,), latent_dim=(4, 2), hidden=(8,)))

    def batches() -> IndexedBatches:
        return IndexedBatches(x, 16, seed=5)

    def fit(trainer: Trainer) -> Trainer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            trainer.fit(batches())
        return trainer

    reference = fit(Trainer(model(0), config, torch.device("cpu")))
    path = tmp_path / "checkpoint.safetensors"
    policy = CheckpointPolicy(path, every_steps=3, every_seconds=None)
    with pytest.raises(SystemExit):
        fit(
            Trainer(
                model(0), config, torch.device("cpu"), observer=CrashAfter(7), checkpoint=policy
            )
        )
    tensors, state = load_checkpoint(path)
    resumed = Trainer(model(99), config, torch.device("cpu"))
    train = batches()
    resumed.restore(tensors, state, train)
    resumed.fit(train)
    final, expected = resumed.model.state_dict(), reference.model.state_dict()
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_one_size_is_the_single_layer_model():
    """An integer latent_dim (or a one-element tuple) builds today's model: the same modules and,
    from the same seed, the same weights."""
    built = []
    for latent in (3, (3,)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built.append(build_model(ModelConfig(data_shape=(6,), latent_dim=latent)))
    one, other = (m.state_dict() for m in built)
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
    assert built[0].latent_sizes == (3,) and "conditionals" not in str(built[0])


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"posterior": "iaf"}, "posterior='iaf' does not work with several stochastic layers"),
        ({"posterior": "planar"}, "posterior='planar' does not work with several"),
        ({"prior": "vamp"}, "prior='vamp' does not work with several stochastic layers"),
        ({"latent_dim": (3, 0)}, "latent_dim must be a positive integer, or a tuple"),
        ({"latent_dim": (3, 2.5)}, "latent_dim must be a positive integer, or a tuple"),
        ({"latent_dim": ()}, "latent_dim must be a positive integer, or a tuple"),
        ({"latent_dim": "3,2"}, "latent_dim must be a positive integer, or a tuple"),
    ],
)
def test_combinations_without_a_meaning_are_refused(options, message):
    config = ModelConfig(data_shape=(6,), **{"latent_dim": (3, 2), **options})
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config.validate()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        vaelab.VAE(**{"latent_dim": (3, 2), **options}, epochs=1).fit(
            np.random.default_rng(0).random((4, 6))
        )


def test_a_two_layer_model_is_not_read_as_a_one_layer_linear_gaussian_model():
    from vaelab.evaluation.linear import linear_gaussian_from_vae

    with pytest.raises(ValueError, match=r"several stochastic layers \(3, 2\)"):
        linear_gaussian_from_vae(TwoLayerLinear().model())


def test_run_options_parse_sizes_and_refuse_free_bits_with_several_layers():
    for given, expected in (("8", 8), ("100,50", (100, 50)), ([100, 50], (100, 50)), ([8], 8)):
        assert resolve({"data": "digits", "latent_dim": given}).latent_dim == expected
    for bad in ("3,0", "a,2", "", [3, -1], 2.5):
        with pytest.raises(RunError, match="latent_dim must be a positive integer"):
            resolve({"data": "digits", "latent_dim": bad})
    config = resolve({"data": "digits", "latent_dim": "3,2", "free_bits": 0.5})
    with pytest.raises(RunError, match="free bits clamp each latent unit's closed-form KL"):
        config.validate()
    assert config.to_json()["latent_dim"] == [3, 2]
