"""Gradient estimators (standard, STL, DReG) for the ELBO and the IWAE bound, on float64
linear-Gaussian models whose exact posterior and exact ELBO are known.

Per-draw gradients come from one backward pass: a "free" posterior holds one row of parameters per
draw (all rows equal, each with its own ε), so the gradient of the summed objective with respect to
row n is draw n's encoder gradient. An amortised encoder's gradient is a fixed linear map of these
(∂(μ, log σ²)/∂φ does not depend on ε), so what holds for them holds for the encoder's weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.distributions import Gamma, Independent, MultivariateNormal, Normal

from conftest import exact_posterior_vae, linear_vae
from vaelab.components.posteriors import DiagonalGaussianPosterior
from vaelab.components.priors import LearnableGaussianPrior
from vaelab.distributions.normal import DiagonalNormal
from vaelab.distributions.stop_gradient import register_stop_gradient, stop_gradient
from vaelab.evaluation.ppca import LinearGaussianModel, random_linear_gaussian
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import (
    GRADIENTS,
    KL_METHODS,
    OBJECTIVES,
    REPARAMETERISED_GRADIENTS,
    check_objective,
    elbo,
    iwae_bound,
    objective_terms,
)

DRAWS = 4000
F64 = torch.float64


class FreeDiagonal(nn.Module):
    """q = N(loc, diag exp(log_var)) with free per-row parameters ``[draws, latent]``; x is unused."""

    def __init__(self, loc: torch.Tensor, log_var: torch.Tensor) -> None:
        super().__init__()
        self.loc = nn.Parameter(loc.clone())
        self.log_var = nn.Parameter(log_var.clone())

    def forward(self, x: torch.Tensor) -> DiagonalNormal:
        return DiagonalNormal(self.loc, self.log_var)

    def gradients(self) -> torch.Tensor:
        """Each row's gradient, ``[draws, 2 · latent]``."""
        assert self.loc.grad is not None and self.log_var.grad is not None
        return torch.cat([self.loc.grad, self.log_var.grad], dim=1)


class FreeFull(nn.Module):
    """q = N(loc, L Lᵀ) with free per-row parameters loc ``[draws, latent]`` and
    L ``[draws, latent, latent]`` (its lower triangle); x is unused."""

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__()
        self.loc = nn.Parameter(loc.clone())
        self.scale_tril = nn.Parameter(scale_tril.clone())

    def forward(self, x: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril.tril())

    def gradients(self) -> torch.Tensor:
        """Each row's gradient, ``[draws, latent + latent · (latent + 1) / 2]``."""
        assert self.loc.grad is not None and self.scale_tril.grad is not None
        rows, cols = torch.tril_indices(self.loc.shape[1], self.loc.shape[1])
        return torch.cat([self.loc.grad, self.scale_tril.grad[:, rows, cols]], dim=1)


Free = FreeDiagonal | FreeFull
Objective = Callable[[nn.Module], torch.Tensor]  # posterior → per-example objective [draws]


@pytest.fixture(scope="module")
def setting() -> tuple[LinearGaussianModel, torch.Tensor, VAEModel]:
    """A 5-dimensional linear-Gaussian model with 2 latents, one data point from it, and a VAE
    with the model's own decoder and a learnable Gaussian prior moved off N(0, I), so that the
    prior has gradients of its own to compare."""
    truth = random_linear_gaussian(5, 2, noise_var=0.5, seed=1)
    x, _ = truth.sample(1, torch.Generator().manual_seed(2))
    model = standard_normal_vae(truth)
    model.prior = LearnableGaussianPrior(2).double()
    with torch.no_grad():
        model.prior.loc.copy_(torch.tensor([0.2, -0.1]))
        model.prior.log_scale.copy_(torch.tensor([0.1, -0.2]))
    return truth, x, model


def standard_normal_vae(truth: LinearGaussianModel) -> VAEModel:
    """A VAE with ``truth``'s decoder and prior N(0, I); its encoder (q(z|x) = N(0, I)) is there
    for the tests that use the amortised posterior and ignored by those that bring their own."""
    zeros = torch.zeros(truth.latent_dim, dtype=F64)
    return linear_vae(truth, torch.zeros(truth.latent_dim, truth.data_dim, dtype=F64), zeros, zeros)


def off_posterior(truth: LinearGaussianModel, x: torch.Tensor, kind: str) -> Free:
    """Every row: q away from the exact posterior, its mean shifted and its spread too wide, so
    that the importance weights vary and the estimators differ."""
    exact = truth.posterior(x)
    loc = (exact.mean[0] + 0.5).expand(DRAWS, 2)
    if kind == "diagonal":
        return FreeDiagonal(loc, (exact.covariance.diagonal().log() + 1.0).expand(DRAWS, 2))
    scale_tril = torch.linalg.cholesky(exact.covariance) * math.e**0.5
    return FreeFull(loc, scale_tril.expand(DRAWS, 2, 2))


def per_draw_gradients(
    q: Free, model: VAEModel, objective: Objective, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Encoder gradients ``[draws, coordinates]`` and the summed gradients of the decoder's and the
    prior's parameters, for noise drawn from ``seed``."""
    q.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    objective(q).sum().backward()
    others = [*model.likelihood.parameters(), *model.prior.parameters()]
    return q.gradients(), [p.grad.clone() for p in others if p.grad is not None]


def paired_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-coordinate t statistic of the mean of a − b over draws (dimension 0)."""
    difference = a - b
    return difference.mean(0) / (difference.std(0) / math.sqrt(difference.shape[0]))


def repeated(x: torch.Tensor) -> torch.Tensor:
    return x.expand(DRAWS, x.shape[1])


# ------------------------------------------------------------------------- k = 1 and values


def test_iwae_with_one_sample_equals_the_elbo_for_every_gradient(setting):
    _, x, model = setting
    x = x.expand(50, 5)
    args = (x, model.posterior, model.prior, model.likelihood)
    torch.manual_seed(3)
    reference = elbo(*args, kl="monte_carlo").elbo
    for gradient in REPARAMETERISED_GRADIENTS:  # the discrete ones: tests/test_discrete.py
        torch.manual_seed(3)
        terms = iwae_bound(*args, k=1, gradient=gradient)
        assert torch.equal(terms.bound, reference), gradient
        assert torch.equal(terms.objective, reference), gradient


def gradient_of(model: VAEModel, objective: Callable[[], torch.Tensor], seed: int) -> torch.Tensor:
    """The gradient of the summed objective with respect to every parameter, as one vector."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    objective().sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_standard_iwae_with_one_sample_has_the_monte_carlo_elbo_gradient(setting):
    truth, x, model = setting
    x, _ = truth.sample(30, torch.Generator().manual_seed(4))
    args = (x, model.posterior, model.prior, model.likelihood)
    iwae = gradient_of(model, lambda: iwae_bound(*args, k=1).objective, 5)
    monte_carlo = gradient_of(model, lambda: elbo(*args, kl="monte_carlo").objective, 5)
    assert iwae.abs().min() > 0  # every parameter, encoder included, has a gradient to compare
    torch.testing.assert_close(iwae, monte_carlo, rtol=1e-12, atol=1e-12)


def test_dreg_and_stl_with_one_sample_have_the_stl_elbo_gradient(setting):
    truth, x, model = setting
    x, _ = truth.sample(30, torch.Generator().manual_seed(4))
    args = (x, model.posterior, model.prior, model.likelihood)
    stl_elbo = gradient_of(model, lambda: elbo(*args, gradient="stl").objective, 6)
    # The reported KL's form (closed form above, Monte Carlo here) does not change STL's gradient.
    monte_carlo = gradient_of(
        model, lambda: elbo(*args, kl="monte_carlo", gradient="stl").objective, 6
    )
    torch.testing.assert_close(monte_carlo, stl_elbo, rtol=1e-12, atol=1e-12)
    for gradient in ("stl", "dreg"):
        one = gradient_of(model, lambda g=gradient: iwae_bound(*args, gradient=g).objective, 6)
        torch.testing.assert_close(one, stl_elbo, rtol=1e-12, atol=1e-12)
    standard = gradient_of(model, lambda: elbo(*args, kl="monte_carlo").objective, 6)
    assert not torch.allclose(standard, stl_elbo)  # the score term is really gone


@pytest.mark.parametrize("beta", [1.0, 3.0])
@pytest.mark.parametrize("kl", ["auto", "monte_carlo"])
def test_stl_changes_no_elbo_value(setting, kl, beta):
    truth, x, model = setting
    x, _ = truth.sample(30, torch.Generator().manual_seed(4))
    args = (x, model.posterior, model.prior, model.likelihood)
    torch.manual_seed(7)
    standard = elbo(*args, samples=3, kl=kl, beta=beta)
    torch.manual_seed(7)
    stl = elbo(*args, samples=3, kl=kl, beta=beta, gradient="stl")
    for name, value in stl._asdict().items():
        if value is None:  # the KL per layer, which a one-layer draw does not give
            assert getattr(standard, name) is None, name
            continue
        assert torch.equal(value, getattr(standard, name)), name
        # Only the objective carries the STL gradient; the reported terms are values.
        assert value.requires_grad == (name == "objective"), name


def test_stl_and_dreg_change_no_iwae_value(setting):
    truth, x, model = setting
    x, _ = truth.sample(30, torch.Generator().manual_seed(4))
    args = (x, model.posterior, model.prior, model.likelihood)
    torch.manual_seed(8)
    standard = iwae_bound(*args, k=5)
    for gradient in ("stl", "dreg"):
        torch.manual_seed(8)
        terms = iwae_bound(*args, k=5, gradient=gradient)
        for name, value in terms._asdict().items():
            if value is None:  # the KL per layer, which a one-layer draw does not give
                assert getattr(standard, name) is None, (gradient, name)
                continue
            assert torch.equal(value, getattr(standard, name)), (gradient, name)
            assert value.requires_grad == (name == "objective"), (gradient, name)
        # Evaluation under no_grad (as the trainer's pre-flight check runs it) needs no hook.
        torch.manual_seed(8)
        with torch.no_grad():
            assert torch.equal(iwae_bound(*args, k=5, gradient=gradient).bound, standard.bound)


# ------------------------------------------------------------------------------ unbiasedness


@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_dreg_is_unbiased_and_keeps_the_decoder_and_prior_gradients(setting, kind):
    truth, x, model = setting
    q = off_posterior(truth, x, kind)
    x = repeated(x)

    def iwae(gradient: str) -> Objective:
        return lambda q: (
            iwae_bound(x, q, model.prior, model.likelihood, k=8, gradient=gradient).objective
        )

    standard, standard_model = per_draw_gradients(q, model, iwae("standard"), seed=9)
    dreg, dreg_model = per_draw_gradients(q, model, iwae("dreg"), seed=9)
    t = paired_t(dreg, standard)
    assert t.abs().max() < 4, t
    assert len(standard_model) == 5  # decoder weight and bias, noise scale, prior loc and scale
    for a, b in zip(dreg_model, standard_model, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The point of DReG: the same mean with less noise.
    assert bool((dreg.var(0) < standard.var(0)).all())
    # The test has the power to see a bias: STL's, for k > 1 (Tucker et al. 2018), is plain.
    stl, _ = per_draw_gradients(q, model, iwae("stl"), seed=9)
    assert paired_t(stl, standard).abs().max() > 10


@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_stl_is_unbiased_for_the_elbo(setting, kind):
    truth, x, model = setting
    q = off_posterior(truth, x, kind)
    x = repeated(x)

    def bound(gradient: str) -> Objective:
        return lambda q: elbo(x, q, model.prior, model.likelihood, gradient=gradient).objective

    standard, _ = per_draw_gradients(q, model, bound("standard"), seed=10)
    stl, _ = per_draw_gradients(q, model, bound("stl"), seed=10)
    t = paired_t(stl, standard)
    assert t.abs().max() < 4, t


def test_stl_elbo_gradient_averages_to_the_exact_gradient(setting):
    """Against the closed-form ELBO of the linear-Gaussian model, differentiated by autograd (the
    prior is N(0, I) here, as in that closed form)."""
    truth, x, model = setting
    q = off_posterior(truth, x, "diagonal")
    assert isinstance(q, FreeDiagonal)
    loc, log_var = q.loc[:1].detach().requires_grad_(), q.log_var[:1].detach().requires_grad_()
    exact_elbo = truth.elbo(x, loc, q_var=log_var.exp())
    exact = torch.cat(torch.autograd.grad(exact_elbo.sum(), [loc, log_var]), dim=1)[0]
    model = standard_normal_vae(truth)
    x = repeated(x)
    stl, _ = per_draw_gradients(
        q,
        model,
        lambda q: elbo(x, q, model.prior, model.likelihood, gradient="stl").objective,
        seed=11,
    )
    z = (stl.mean(0) - exact) / (stl.std(0) / math.sqrt(DRAWS))
    assert z.abs().max() < 4, z


# ------------------------------------------------------------- q equal to the exact posterior


def test_stl_and_dreg_have_zero_variance_at_the_exact_full_covariance_posterior(setting):
    """log p(x, z) − log q(z) = log p(x) for every z when q = p(z|x): the path derivative is 0
    draw by draw, while the standard gradient's score term only averages to 0."""
    truth, x, _ = setting
    exact = truth.posterior(x)
    q = FreeFull(
        exact.mean.expand(200, 2), torch.linalg.cholesky(exact.covariance).expand(200, 2, 2)
    )
    model = standard_normal_vae(truth)
    x = x.expand(200, 5)
    args = (model.prior, model.likelihood)
    for name, objective in [
        ("elbo stl", lambda q: elbo(x, q, *args, gradient="stl").objective),
        ("iwae-4 stl", lambda q: iwae_bound(x, q, *args, k=4, gradient="stl").objective),
        ("iwae-4 dreg", lambda q: iwae_bound(x, q, *args, k=4, gradient="dreg").objective),
    ]:
        gradients, _ = per_draw_gradients(q, model, objective, seed=12)
        assert gradients.abs().max() < 1e-12, name
    for name, objective in [
        ("elbo", lambda q: elbo(x, q, *args).objective),
        ("iwae-4", lambda q: iwae_bound(x, q, *args, k=4).objective),
    ]:
        gradients, _ = per_draw_gradients(q, model, objective, seed=12)
        assert gradients.std(0).min() > 0.05, name


def test_stl_encoder_gradient_has_zero_variance_at_an_exact_diagonal_posterior():
    """Orthogonal decoder columns and isotropic noise make the exact posterior diagonal, so the
    amortised linear encoder of ``exact_posterior_vae`` is exact; its weights' STL gradient is 0
    for every draw, the standard one is not."""
    columns, _ = torch.linalg.qr(
        torch.randn(6, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    )
    truth = LinearGaussianModel(
        columns * torch.tensor([2.0, 0.7], dtype=F64), torch.linspace(-1, 1, 6), 0.3
    )
    model = exact_posterior_vae(truth)
    x, _ = truth.sample(8, torch.Generator().manual_seed(14))
    encoder = list(model.posterior.parameters())

    def encoder_gradients(gradient: str) -> torch.Tensor:
        draws = []
        for seed in range(20):
            torch.manual_seed(seed)
            terms = elbo(x, model.posterior, model.prior, model.likelihood, gradient=gradient)
            grads = torch.autograd.grad(terms.objective.sum(), encoder)
            draws.append(torch.cat([g.flatten() for g in grads]))
        return torch.stack(draws)  # [draws, encoder parameters]

    assert encoder_gradients("stl").abs().max() < 1e-12
    assert encoder_gradients("standard").std(0).max() > 0.1


# ---------------------------------------------------------------------------- stop_gradient


def check_stopped(q, parameters: list[torch.Tensor]) -> None:
    z = q.rsample((3,))
    stopped = stop_gradient(q)
    assert type(stopped) is type(q)
    assert torch.equal(stopped.log_prob(z), q.log_prob(z))
    assert not stopped.log_prob(z.detach()).requires_grad  # no path through the parameters
    # The path through z is intact: ∂ log q̄(z)/∂z · ∂z/∂params, as with q when z is held apart.
    z_only = z.detach().requires_grad_()
    (dz,) = torch.autograd.grad(q.log_prob(z_only).sum(), z_only)
    expected = torch.autograd.grad((z * dz).sum(), parameters, retain_graph=True)
    got = torch.autograd.grad(stopped.log_prob(z).sum(), parameters)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_stop_gradient_for_vaelab_posteriors_and_torch_gaussians():
    generator = torch.Generator().manual_seed(15)
    loc = torch.randn(4, 3, generator=generator, dtype=F64, requires_grad=True)
    log_var = torch.randn(4, 3, generator=generator, dtype=F64, requires_grad=True)
    check_stopped(DiagonalNormal(loc, log_var), [loc, log_var])
    scale = log_var.exp()
    check_stopped(Independent(Normal(loc, scale), 1), [loc, log_var])
    raw = torch.randn(4, 3, 3, generator=generator, dtype=F64)
    tril = (raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())).requires_grad_()
    check_stopped(MultivariateNormal(loc, scale_tril=tril), [loc, tril])
    posterior = DiagonalGaussianPosterior(nn.Linear(5, 6).double(), 3)
    q = posterior(torch.randn(4, 5, dtype=F64))
    assert isinstance(stop_gradient(q), DiagonalNormal)


class OwnDetached(Normal):
    """A distribution that says how to detach itself (as flow posteriors will)."""

    calls = 0

    def detached(self) -> OwnDetached:
        OwnDetached.calls += 1
        return OwnDetached(self.loc.detach(), self.scale.detach())


class Registered(Normal):
    pass


@register_stop_gradient(Registered)
def _stop_registered(q: Registered) -> Registered:
    return Registered(q.loc.detach(), q.scale.detach())


def test_stop_gradient_prefers_the_most_specific_way_and_refuses_unknown_types():
    loc = torch.zeros(2, requires_grad=True)
    # Its own method is more specific than the registration for its base class, Normal.
    own = stop_gradient(OwnDetached(loc, torch.ones(2)))
    assert type(own) is OwnDetached and OwnDetached.calls == 1 and not own.loc.requires_grad
    registered = stop_gradient(Registered(loc, torch.ones(2)))
    assert type(registered) is Registered and not registered.loc.requires_grad
    with pytest.raises(TypeError, match="cannot stop the gradient of Gamma's parameters"):
        stop_gradient(Gamma(torch.ones(2), torch.ones(2)))


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"objective": "vae"}, "unknown objective 'vae'"),
        ({"gradient": "score"}, "unknown gradient estimator 'score'"),
        ({"gradient": "reinforce"}, "'reinforce' is an estimator for discrete latents"),
        ({"objective": "iwae", "gradient": "score"}, "unknown gradient estimator 'score'"),
        ({"gradient": "dreg"}, "with the ELBO .* it equals 'stl'"),
        ({"gradient": "stl", "kl": "analytic"}, "use kl='auto'"),
        ({"objective": "iwae", "samples": 5, "beta": 0.5}, "beta=0.5 weighs the ELBO's KL"),
        ({"objective": "iwae", "kl": "monte_carlo"}, "the IWAE bound has none"),
        ({"objective": "iwae", "samples": 0}, "positive number of importance samples"),
    ],
)
def test_combinations_without_meaning_are_refused(setting, options, message):
    _, x, model = setting
    with pytest.raises(ValueError, match=message):
        objective_terms(x, model.posterior, model.prior, model.likelihood, **options)


def test_check_objective_accepts_exactly_the_meaningful_combinations():
    accepted = set()
    for objective in OBJECTIVES:
        for gradient in GRADIENTS:
            for kl in KL_METHODS:
                for beta in (1.0, 0.5):
                    try:
                        check_objective(objective, gradient, beta=beta, kl=kl)
                    except ValueError:
                        continue
                    accepted.add((objective, gradient, kl, beta))
    elbo_kls = {("standard", kl) for kl in KL_METHODS} | {("stl", "auto"), ("stl", "monte_carlo")}
    expected = {("elbo", g, kl, beta) for g, kl in elbo_kls for beta in (1.0, 0.5)}
    expected |= {("iwae", g, "auto", 1.0) for g in GRADIENTS if g != "enumerate"}
    # The discrete codes' estimators (vaelab.objectives.discrete): any KL method and β with
    # the ELBO, except VIMCO, which estimates the IWAE bound's gradient.
    expected |= {
        ("elbo", g, kl, beta)
        for g in ("reinforce", "relaxed", "enumerate")
        for kl in KL_METHODS
        for beta in (1.0, 0.5)
    }
    assert accepted == expected


def test_objective_terms_dispatches_to_the_bounds(setting):
    _, x, model = setting
    args = (x.expand(10, 5), model.posterior, model.prior, model.likelihood)
    torch.manual_seed(16)
    chosen = objective_terms(*args, objective="iwae", samples=6, gradient="dreg")
    torch.manual_seed(16)
    assert torch.equal(chosen.objective, iwae_bound(*args, k=6).bound)
    torch.manual_seed(17)
    chosen = objective_terms(*args, samples=2, beta=2.0, gradient="stl")
    torch.manual_seed(17)
    assert torch.equal(chosen.objective, elbo(*args, samples=2, beta=2.0).objective)
