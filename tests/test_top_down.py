"""Top-down inference (``inference="top-down"``, ``vaelab.components.top_down``): the densities
against the explicit factor product, per-layer log-densities, the linear-Gaussian depth oracle
(exact weights with one-unit layers, IWAE within its standard error of the exact log p(x) at
depth 4, a trained linear model at the pPCA maximum), DReG and STL across layers, the shared
generative path, log p(z) from the posterior's own draw, fit / save / load at 2, 3 and 5 layers, and
every refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.distributions import MultivariateNormal, Normal

import vaelab
from conftest import CrashAfter, standard_error, vaelab_cli
from vaelab.distributions.chain import GaussianChain
from vaelab.distributions.normal import DiagonalNormal
from vaelab.distributions.stop_gradient import stop_gradient
from vaelab.distributions.top_down import TopDownChain, TopDownPriorChain, merge
from vaelab.evaluation.ais import HmcSettings, ais
from vaelab.evaluation.loglik import log_likelihood
from vaelab.evaluation.ppca import ppca_max_log_likelihood, random_linear_gaussian
from vaelab.model.registry import ModelConfig, build_model
from vaelab.objectives.bounds import elbo, iwae_bound, log_importance_weights
from vaelab.objectives.noise import ExampleNoise

F64 = torch.float64


def top_down(sizes, data=6, hidden=(7,), seed=0, **options) -> vaelab.VAEModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = ModelConfig(
            data_shape=(data,),
            latent_dim=tuple(sizes),
            hidden=hidden,
            likelihood="gaussian",
            inference="top-down",
            **options,
        )
        return build_model(config).double()


# ------------------------------------------------------------------ densities, layer by layer
@pytest.mark.parametrize("sizes", [(4,), (4, 3), (4, 3, 2), (5, 4, 3, 2, 2)], ids=str)
def test_the_posterior_is_the_product_of_merged_gaussians_drawn_top_down(sizes):
    """q(z|x) = ∏ N(z_l; μ_q, σ_q²) with σ_q⁻² = σ̂⁻² + σ_p⁻² and μ_q = (μ̂ σ̂⁻² + μ_p σ_p⁻²) σ_q²
    (Sønderby et al. 2016), computed here with torch.distributions from the raw network outputs;
    a draw from noise is μ_q + σ_q ε at every layer, z_L first."""
    model = top_down(sizes, prior="learnable")
    x = torch.randn(5, 6, dtype=F64)
    q, p = model.posterior(x), model.prior()
    assert isinstance(q, TopDownChain) and isinstance(p, TopDownPriorChain)
    assert q.batch_shape == (5,) and q.event_shape == (sum(sizes),) and p.batch_shape == ()
    eps = torch.randn(3, 5, sum(sizes), dtype=F64)
    z, log_q = q.from_noise(eps)
    layers, noise = z.split(sizes, dim=-1), eps.split(sizes, dim=-1)
    features = model.posterior.bottom_up(x)  # (μ̂_l, log σ̂_l²), z₁ first
    expected_q = torch.zeros(3, 5, dtype=F64)
    expected_p = torch.zeros(3, 5, dtype=F64)
    for l in reversed(range(len(sizes))):
        if l == len(sizes) - 1:
            mu_p = model.prior.top.loc.expand(3, 5, -1)
            var_p = model.prior.top.log_scale.exp().square().expand(3, 5, -1)
        else:
            out = model.prior.conditionals[len(sizes) - 2 - l].encoder(layers[l + 1])
            mu_p, var_p = out[..., : sizes[l]], out[..., sizes[l] :].exp()
        mu_e, var_e = features[l][0], features[l][1].exp()
        var_q = 1 / (1 / var_e + 1 / var_p)
        mu_q = (mu_e / var_e + mu_p / var_p) * var_q
        torch.testing.assert_close(layers[l], mu_q + var_q.sqrt() * noise[l])
        expected_q += Normal(mu_q, var_q.sqrt()).log_prob(layers[l]).sum(-1)
        expected_p += Normal(mu_p, var_p.sqrt()).log_prob(layers[l]).sum(-1)
    torch.testing.assert_close(log_q, expected_q, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(q.log_prob(z), expected_q, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(p.log_prob(z), expected_p, rtol=1e-12, atol=1e-10)
    # Per layer, z₁ first, summing to the joint; the analytic per-layer KL at these draws.
    for chain in (q, p):
        rows = chain.layer_log_prob(z)
        assert rows.shape == (len(sizes), 3, 5)
        torch.testing.assert_close(rows.sum(0), chain.log_prob(z), rtol=1e-12, atol=1e-10)
    kl = q.layer_kl(z)
    assert kl.shape == (len(sizes), 3, 5) and bool((kl >= 0).all())
    # E_q[log q − log p] per layer is the expected analytic KL (the chain rule of the KL).
    with torch.no_grad():
        many = q.sample((4000,))
        mc = q.layer_log_prob(many) - p.layer_log_prob(many)
        exact = q.layer_kl(many)
    error = (mc - exact).mean(1)  # [L, batch]
    se = (mc - exact).std(1) / math.sqrt(4000)
    assert bool((error.abs() < 5 * se + 1e-9).all()), (error, se)
    # The likelihood reads z₁ alone.
    moved = torch.cat([layers[0], torch.randn_like(z[..., sizes[0] :])], dim=-1)
    torch.testing.assert_close(model.likelihood.log_prob(x, moved), model.likelihood.log_prob(x, z))


def test_the_merge_is_finite_where_one_precision_dwarfs_the_other():
    """σ̂² = e^±80 against σ_p² = 1: q is p (evidence uninformative) or the evidence itself, with
    no overflow of a precision e^80 nor a 0/0."""
    prior = DiagonalNormal(torch.tensor([[2.0]], dtype=F64), torch.zeros(1, 1, dtype=F64))
    loc = torch.tensor([[-3.0]], dtype=F64)
    wide = merge(prior, loc, torch.full((1, 1), 80.0, dtype=F64))
    sharp = merge(prior, loc, torch.full((1, 1), -80.0, dtype=F64))
    torch.testing.assert_close(wide.mean, prior.mean)
    torch.testing.assert_close(wide.log_var, torch.zeros(1, 1, dtype=F64))
    torch.testing.assert_close(sharp.mean, loc)
    torch.testing.assert_close(sharp.log_var, torch.full((1, 1), -80.0, dtype=F64))


def test_layer_log_prob_of_the_bottom_up_chains_sums_to_log_prob():
    config = ModelConfig(data_shape=(6,), latent_dim=(4, 3, 2), hidden=(5,), prior="learnable")
    model = build_model(config).double()
    x = torch.rand(4, 6, dtype=F64)
    q, p = model.posterior(x), model.prior()
    assert isinstance(q, GaussianChain) and isinstance(p, GaussianChain)
    z = q.rsample((2,))
    for chain in (q, p):
        rows = chain.layer_log_prob(z)
        assert rows.shape == (3, 2, 4)
        torch.testing.assert_close(rows.sum(0), chain.log_prob(z), rtol=1e-12, atol=1e-12)
    # Row l of the prior is log p(z_l | z_{l+1}): z₁'s first, p(z_L)'s last.
    top = p.first.log_prob(z[..., 7:]).expand(2, 4)
    torch.testing.assert_close(p.layer_log_prob(z)[-1], top)


def test_the_generative_networks_are_shared_and_stored_once():
    model = top_down((4, 3, 2))
    names = dict(model.named_parameters())
    assert not any(name.startswith("posterior.") and "conditionals" in name for name in names)
    assert model.posterior.prior is model.prior
    # q moves when a prior conditional moves: it reads those very weights.
    x = torch.randn(2, 6, dtype=F64)
    eps = torch.randn(2, 9, dtype=F64)
    before = model.posterior(x).from_noise(eps)[0]
    with torch.no_grad():
        model.prior.conditionals[0].encoder.layers[0].bias.add_(1.0)
    after = model.posterior(x).from_noise(eps)[0]
    assert torch.equal(before[..., 7:], after[..., 7:]) and not torch.equal(before, after)


def test_detached_stops_the_evidence_and_the_shared_weights_but_not_the_prior():
    # Seeded: with 6 draws through ReLU units of width 3 and 4, about one draw of x and z in five
    # leaves a unit dead for all of them, and its weights then have a gradient of exactly 0.
    torch.manual_seed(1)
    model = top_down((4, 3, 2), prior="learnable")
    x = torch.randn(3, 6, dtype=F64)
    q = model.posterior(x)
    z = q.rsample((2,)).detach().requires_grad_(True)
    stopped = stop_gradient(q)
    value = stopped.log_prob(z)
    torch.testing.assert_close(value, q.log_prob(z), rtol=0, atol=0)
    params = list(model.parameters())
    grads = torch.autograd.grad(value.sum(), [z, *params], allow_unused=True)
    (expected,) = torch.autograd.grad(q.log_prob(z).sum(), z)
    torch.testing.assert_close(grads[0], expected)
    assert all(g is None for g in grads[1:])
    # The prior keeps its gradients in its weights, shared or not.
    prior_params = list(model.prior.parameters())
    found = torch.autograd.grad(model.prior().log_prob(z).sum(), prior_params)
    assert all(g is not None and bool(g.abs().sum() > 0) for g in found)


def test_the_draw_gives_each_layers_log_ratio_and_the_conditionals_own_parameters():
    """``draw_with_log_ratio`` draws the z of ``from_noise`` and each layer's log q(z_l | z_{l+1},
    x) − log p(z_l | z_{l+1}) there, equal to both sides' ``layer_log_prob`` at z
    (torch.distributions' Normal densities) and summing to log q(z) − log p(z); only against the
    chain's own prior (not another model's, not a bottom-up chain's), and not once detached. The
    conditionals' (μ, log σ²) read without a distribution are those of the distribution."""
    from vaelab.distributions.sampling import reparameterise_against
    from vaelab.distributions.top_down import conditional_gaussian, gaussian_parameters

    model = top_down((4, 3, 2), prior="learnable")
    other = top_down((4, 3, 2), prior="learnable", seed=1)
    x = torch.randn(5, 6, dtype=F64)
    eps = torch.randn(2, 5, 9, dtype=F64)
    q, p = model.posterior(x), model.prior()
    z, log_q = q.from_noise(eps)
    drawn, none, rows = reparameterise_against(q, p, eps)
    assert none is None and rows is not None
    assert torch.equal(drawn, z) and rows.shape == (2, 5, 3)
    expected = q.layer_log_prob(z) - p.layer_log_prob(z)  # [L, samples, batch]
    torch.testing.assert_close(rows, expected.movedim(0, -1), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(rows.sum(-1), log_q - p.log_prob(z), rtol=1e-12, atol=1e-10)
    # Not against another model's prior, nor once detached, nor for a bottom-up chain: then the
    # plain draw, z and log q from from_noise.
    flat = build_model(ModelConfig(data_shape=(6,), latent_dim=(4, 2))).double()
    for chain, prior, noise in (
        (q, other.prior(), eps),
        (q.detached(), p, eps),
        (flat.posterior(x), flat.prior(), eps[..., :6]),
    ):
        drawn, log_q, rows = reparameterise_against(chain, prior, noise)
        assert rows is None
        expected_z, expected_log_q = chain.from_noise(noise)
        assert torch.equal(drawn, expected_z) and torch.equal(log_q, expected_log_q)
    conditional = model.prior.conditionals[0]
    value = torch.randn(5, 2, dtype=F64)
    for got, expected in zip(
        conditional_gaussian(conditional, value),
        gaussian_parameters(conditional(value)),
        strict=True,
    ):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_the_bounds_take_log_p_from_the_posteriors_draw(objective):
    """The ELBO and the IWAE bound of a top-down model run the prior's networks once per draw
    (the posterior's pass) and give the same value, the same gradient in every parameter and the
    same KL per layer as the bound written out with ``log_prob`` of q and p, which runs them
    twice (torch.distributions' densities); DReG, whose q is stopped, recomputes log p(z)."""
    from vaelab.objectives.layers import kl_per_layer

    model = top_down((4, 3, 2), prior="learnable")
    x = torch.randn(3, 6, dtype=F64)
    k = 4
    eps = torch.randn(k, 3, 9, dtype=F64)
    calls = []
    # The network itself: the draw calls it without the conditional module's own __call__.
    network = model.prior.conditionals[0].encoder
    handle = network.register_forward_hook(lambda *a: calls.append(1))
    params = list(model.parameters())
    if objective == "elbo":
        terms = model.elbo(x, samples=k, noise=eps)
        value = terms.elbo.sum()
    else:
        terms = model.iwae(x, k=k, noise=eps)
        value = terms.bound.sum()
    assert len(calls) == 1
    grads = torch.autograd.grad(value, params)
    q, p = model.posterior(x), model.prior()
    z, _ = q.from_noise(eps)
    log_w = model.likelihood.log_prob(x, z) - (q.log_prob(z) - p.log_prob(z))
    written = log_w.mean(0) if objective == "elbo" else torch.logsumexp(log_w, 0) - math.log(k)
    torch.testing.assert_close(value, written.sum(), rtol=1e-12, atol=1e-10)
    for got, expected in zip(grads, torch.autograd.grad(written.sum(), params), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert terms.layer_kl is not None and terms.layer_kl.shape == (3, 3)
    torch.testing.assert_close(terms.layer_kl, kl_per_layer(q, p, z), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(terms.layer_kl.sum(-1), terms.kl, rtol=1e-12, atol=1e-10)
    if objective == "iwae":
        calls.clear()
        dreg = model.iwae(x, k=k, noise=eps, gradient="dreg")
        # The draw, the stopped q's log q(z) and the prior's log p(z): three passes.
        assert len(calls) == 3 and dreg.layer_kl is None
        torch.testing.assert_close(dreg.bound, terms.bound, rtol=1e-12, atol=1e-10)
    handle.remove()


def test_an_ancestral_prior_draw_has_the_linear_models_moments():
    truth = LinearChain((2, 1, 1), data=3, seed=1)
    model = truth.model()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        draws = model.prior().sample((100_000,))[..., :2]  # z₁
        q_draws = model.posterior(truth.sample_x(1, 3)).sample((100_000,))[:, 0]
    se = (truth.cov_z[0].diagonal() / 100_000).sqrt()
    assert bool(((draws.mean(0) - truth.mean_z[0]).abs() < 5 * se).all())
    error = (
        (
            torch.outer(truth.cov_z[0].diagonal(), truth.cov_z[0].diagonal())
            + truth.cov_z[0].square()
        )
        .div(100_000)
        .sqrt()
    )
    assert bool(((torch.cov(draws.T) - truth.cov_z[0]).abs() < 5 * error).all())
    assert torch.isfinite(q_draws).all()


# --------------------------------------------------------------------- the linear depth oracle
class LinearChain:
    """p(z_L) = N(0, I), p(z_l | z_{l+1}) = N(A_l z_{l+1} + b_l, diag s_l²), p(x | z₁) = N(W z₁ + c,
    diag σ²), float64. Its marginal p(x) is Gaussian (the moments pushed down the chain), and
    x given z_l is N(G_l z_l + g_l, Σ_l) with G₁ = W, g₁ = c, Σ₁ = diag σ², G_{l+1} = G_l A_l,
    g_{l+1} = G_l b_l + g_l, Σ_{l+1} = Σ_l + G_l diag(s_l²) G_lᵀ: as a function of z_l, a Gaussian
    factor with precision P_l = G_lᵀ Σ_l⁻¹ G_l about μ̃_l = P_l⁻¹ G_lᵀ Σ_l⁻¹ (x − g_l). Because
    x ⊥ z_{>l} | z_l, the exact posterior factorises top-down, p(z_l | z_{l+1}, x) ∝ p(z_l | z_{l+1})
    N(z_l; μ̃_l, P_l⁻¹): a top-down q with evidence (μ̃_l, P_l⁻¹) is exact when every P_l is
    diagonal (one-unit layers), and with a wider isotropic evidence (P_l ≥ λ_min I) it is wider
    than the posterior everywhere, a proposal with bounded weights."""

    def __init__(self, sizes, data: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.sizes, self.data = tuple(sizes), data
        L = len(sizes)
        self.A = [
            0.8 * torch.randn(sizes[l], sizes[l + 1], generator=g, dtype=F64) for l in range(L - 1)
        ]
        self.b = [0.5 * torch.randn(sizes[l], generator=g, dtype=F64) for l in range(L - 1)]
        self.s2 = [0.3 + torch.rand(sizes[l], generator=g, dtype=F64) for l in range(L - 1)]
        self.W = torch.randn(data, sizes[0], generator=g, dtype=F64)
        self.c = torch.randn(data, generator=g, dtype=F64)
        self.sigma2 = 0.2 + 0.5 * torch.rand(data, generator=g, dtype=F64)
        mean, cov = torch.zeros(sizes[-1], dtype=F64), torch.eye(sizes[-1], dtype=F64)
        self.mean_z, self.cov_z = [mean], [cov]
        for l in reversed(range(L - 1)):
            mean = self.A[l] @ mean + self.b[l]
            cov = self.A[l] @ cov @ self.A[l].T + torch.diag(self.s2[l])
            self.mean_z.insert(0, mean)
            self.cov_z.insert(0, cov)
        self.marginal = MultivariateNormal(
            self.W @ mean + self.c, self.W @ cov @ self.W.T + torch.diag(self.sigma2)
        )
        G, gl, S = self.W, self.c, torch.diag(self.sigma2)
        self.evidence = []  # (M_l, m_l, P_l): μ̃_l = M_l x + m_l
        for l in range(L):
            P = G.T @ torch.linalg.solve(S, G)
            M = torch.linalg.solve(P, G.T @ torch.linalg.inv(S))
            self.evidence.append((M, -M @ gl, P))
            if l < L - 1:
                G, gl, S = G @ self.A[l], G @ self.b[l] + gl, S + G @ torch.diag(self.s2[l]) @ G.T

    def sample_x(self, n: int, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.marginal.sample((n,))

    def model(self, widen: float = 1.0) -> vaelab.VAEModel:
        """The library's top-down model (``hidden=()``: every map linear) with these weights;
        evidence (μ̃_l, P_l⁻¹) for one-unit layers, else (μ̃_l, widen / λ_min(P_l) · I)."""
        config = ModelConfig(
            data_shape=(self.data,),
            latent_dim=self.sizes,
            hidden=(),
            likelihood="gaussian-per-dimension",
            inference="top-down",
        )
        model = build_model(config).double()
        L = len(self.sizes)
        with torch.no_grad():
            decoder = model.likelihood.decoder.body.layers[0]
            decoder.weight.copy_(self.W)
            decoder.bias.copy_(self.c)
            model.likelihood.log_sigma.copy_(0.5 * self.sigma2.log())
            for index, conditional in enumerate(model.prior.conditionals):
                l = L - 2 - index  # the layer it gives
                _set_gaussian(conditional.encoder.layers[0], self.A[l], self.b[l], self.s2[l])
            for l, head in enumerate(model.posterior.bottom_up.heads):
                M, m, P = self.evidence[l]
                if self.sizes[l] == 1:
                    var = 1 / P.reshape(1)
                else:
                    var = (widen / torch.linalg.eigvalsh(P).min()).expand(self.sizes[l])
                _set_gaussian(head, M, m, var)
        return model


def _set_gaussian(layer: torch.nn.Linear, weight, bias, var) -> None:
    """A linear layer whose features are [μ = weight · input + bias, log σ² = log var]."""
    out = weight.shape[0]
    layer.weight.copy_(torch.cat([weight, torch.zeros(out, weight.shape[1], dtype=F64)]))
    layer.bias.copy_(torch.cat([bias, torch.as_tensor(var, dtype=F64).log()]))


def test_with_one_unit_layers_top_down_q_is_the_exact_posterior_at_depth_five():
    """Five one-unit layers: every merged layer is p(z_l | z_{l+1}, x), so each importance
    weight p(x, z) / q(z | x) is p(x) itself, for every draw."""
    truth = LinearChain((1, 1, 1, 1, 1), data=3, seed=0)
    model = truth.model()
    x = truth.sample_x(40, seed=1)
    with torch.no_grad():
        q, p = model.posterior(x), model.prior()
        z = ExampleNoise(x, 0).sample(q, 6)
        log_w = log_importance_weights(x, q, p, model.likelihood, z)
    torch.testing.assert_close(log_w, truth.marginal.log_prob(x).expand(6, -1), rtol=0, atol=1e-9)


def test_depth_four_elbo_below_iwae_within_its_error_of_the_exact_likelihood():
    truth = LinearChain((3, 3, 2, 2), data=8, seed=2)
    model = truth.model(widen=1.2)
    x = truth.sample_x(60, seed=3)
    exact = truth.marginal.log_prob(x)
    iwae = log_likelihood(model, x, k=2000, seed=0)
    error = iwae.log_px - exact
    se = math.sqrt(float(iwae.mc_standard_error.square().mean()) / error.numel())
    assert abs(float(error.mean())) < 3 * se, (float(error.mean()), se)
    assert float(iwae.effective_sample_size.min()) > 20
    with torch.no_grad():
        noise = ExampleNoise(x, 0).normal(500, (10,), like=x)
        bound = model.elbo(x, noise=noise).elbo
        iwae_10 = model.iwae(x, 10, noise=noise[:10]).bound
    gap = exact - bound  # KL(q ‖ p(z|x)) > 0: the isotropic evidence is not exact
    assert 0 < float((exact - iwae_10).mean()) < float(gap.mean())  # ELBO ≤ IWAE-10 ≤ exact
    assert float(iwae.log_px.mean()) > float(bound.mean())


@pytest.mark.slow
def test_a_fitted_linear_top_down_model_reaches_the_ppca_maximum():
    """A linear model with layers (2, 2, 2, 2): x's marginal is N(c, σ² I + W S Wᵀ), S the
    covariance of z₁, W of rank ≤ d₁ = 2, so no setting beats pPCA with 2 components (Tipping &
    Bishop 1999), whatever lies above z₁. The top-down family reaches it: with the layers above
    z₁ switched off (A_l = 0) and W's columns orthogonal, the posterior of z₁ is a diagonal
    Gaussian, which the merge of a linear evidence with p(z₁) represents exactly, and the upper
    layers' posteriors equal their priors in the limit σ̂ → ∞ (Lucas et al. 2019 for one layer).
    So the ELBO's supremum is the pPCA maximum; a short fit gets within 0.1 nats of it."""
    truth = random_linear_gaussian(5, 2, noise_var=0.2, seed=0)
    x = truth.sample(600, torch.Generator().manual_seed(1))[0].float().numpy()
    best = ppca_max_log_likelihood(torch.as_tensor(x, dtype=F64), 2)
    vae = vaelab.VAE(
        latent_dim=(2, 2, 2, 2), hidden=(), likelihood="gaussian", inference="top-down",
        epochs=150, batch_size=100, lr=1e-2, seed=0, device="cpu",
    ).fit(x)  # fmt: skip
    elbo_value = float(vae.score_samples(x).mean())
    iwae = float(vae.log_likelihood(x, k=500).mean())
    assert elbo_value <= iwae + 0.02
    assert elbo_value > best - 0.1, (elbo_value, best)
    assert iwae < best + 0.05, (iwae, best)


# ------------------------------------------------------------------- DReG and STL, three layers
def _per_draw_gradients(model, x, objective, draws: int, seed: int) -> torch.Tensor:
    """Every parameter's gradient of ``objective(x)`` for ``draws`` independent noise draws:
    ``[draws, coordinates]``."""
    rows = []
    params = list(model.parameters())
    for draw in range(draws):
        torch.manual_seed(seed + draw)
        grads = torch.autograd.grad(objective(x).sum(), params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def _paired_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    difference = a - b
    keep = difference.std(0) > 0
    return difference.mean(0)[keep] / (difference.std(0)[keep] / math.sqrt(difference.shape[0]))


@pytest.fixture(scope="module")
def three_layers():
    model = top_down((2, 2, 1), data=4, hidden=(3,), seed=4, prior="learnable")
    x = torch.randn(1, 4, dtype=F64) * 2
    return model, x


def test_dreg_is_unbiased_across_three_top_down_layers(three_layers):
    model, x = three_layers

    def iwae(gradient):
        return lambda x: (
            iwae_bound(
                x, model.posterior, model.prior, model.likelihood, k=6, gradient=gradient
            ).objective
        )

    standard = _per_draw_gradients(model, x, iwae("standard"), 300, seed=0)
    dreg = _per_draw_gradients(model, x, iwae("dreg"), 300, seed=0)
    t = _paired_t(dreg, standard)
    assert t.abs().max() < 4, t
    # Less noise in the bottom-up pass's gradients (listed first), where the score term goes.
    n = sum(p.numel() for p in model.posterior.parameters())
    assert float(dreg[:, :n].var(0).sum()) < float(standard[:, :n].var(0).sum())


def test_stl_is_unbiased_for_the_elbo_across_three_top_down_layers(three_layers):
    model, x = three_layers

    def bound(gradient):
        return lambda x: (
            elbo(x, model.posterior, model.prior, model.likelihood, gradient=gradient).objective
        )

    standard = _per_draw_gradients(model, x, bound("standard"), 300, seed=1)
    stl = _per_draw_gradients(model, x, bound("stl"), 300, seed=1)
    t = _paired_t(stl, standard)
    assert t.abs().max() < 4, t


# ---------------------------------------------------------------- fit, save, load, commands
@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return (load_digits().data[:300] / 16.0).astype(np.float32)


@pytest.mark.parametrize(
    ("sizes", "network"),
    [((8, 4), "mlp"), ((8, 4, 2), "conv"), ((16, 8, 4, 4, 2), "mlp"), ((8, 4, 4, 2, 2), "conv")],
    ids=str,
)
def test_fit_save_and_load_give_the_same_outputs(sizes, network, digits, tmp_path):
    X = digits.reshape(-1, 1, 8, 8) if network == "conv" else digits
    vae = vaelab.VAE(
        latent_dim=sizes, hidden=(32,), network=network, inference="top-down",
        epochs=2, batch_size=50, seed=0, device="cpu",
    ).fit(X)  # fmt: skip
    assert len(vae.history_) == 2 and math.isfinite(vae.history_[-1].elbo)
    assert vae.model_.latent_sizes == sizes
    vae.save(tmp_path / "m")
    loaded = vaelab.load(tmp_path / "m")
    assert loaded.inference == "top-down" and loaded.model_config_.inference == "top-down"
    assert isinstance(loaded.model_.posterior(torch.as_tensor(X[:2])), TopDownChain)
    for method in ("score_samples", "transform"):
        np.testing.assert_array_equal(getattr(vae, method)(X[:20]), getattr(loaded, method)(X[:20]))
    np.testing.assert_array_equal(
        vae.log_likelihood(X[:5], k=20), loaded.log_likelihood(X[:5], k=20)
    )
    # Each example's KL per layer comes with its terms and sums to its KL.
    terms = loaded.elbo_terms(X[:7], samples=3)
    assert terms.layer_kl is not None and terms.layer_kl.shape == (7, len(sizes))
    torch.testing.assert_close(terms.layer_kl.sum(-1), terms.kl)


def test_vaelab_train_takes_the_flag_and_the_toml_key(tmp_path, capsys):
    data = tmp_path / "d.npy"
    np.save(data, (load_digits().data[:120] / 16.0).astype(np.float32))
    common = ["--epochs", "1", "--hidden", "16", "--quiet", "--batch-size", "40"]
    code, _, err = vaelab_cli(
        capsys, "train", data, "--out", tmp_path / "a", "--latent-dim", "4,3,2",
        "--inference", "top-down", *common,
    )  # fmt: skip
    assert code == 0, err
    (tmp_path / "run.toml").write_text('latent_dim = "4,3,2"\ninference = "top-down"\n')
    code, _, err = vaelab_cli(
        capsys, "train", data, "--out", tmp_path / "b", "--config", tmp_path / "run.toml", *common
    )
    assert code == 0, err
    for name in ("a", "b"):
        assert vaelab.load(tmp_path / name).model_config_.inference == "top-down"
    a, b = (vaelab.load(tmp_path / n).score_samples(np.load(data)[:10]) for n in ("a", "b"))
    np.testing.assert_array_equal(a, b)


def test_a_model_file_without_the_key_is_bottom_up():
    config = ModelConfig(data_shape=(6,), latent_dim=(3, 2))
    document = config.to_json()
    del document["inference"]
    assert ModelConfig.from_json(document).inference == "bottom-up"


# --------------------------------------------------------------------------------- refusals
TOP_DOWN_REFUSALS = [
    ({"posterior": "full"}, "posterior='full' does not work with inference='top-down'"),
    ({"posterior": "iaf"}, "posterior='iaf' does not work with inference='top-down'"),
    ({"posterior": "planar"}, "posterior='planar' does not work with inference='top-down'"),
    ({"prior": "mixture"}, "prior='mixture' does not work with inference='top-down'"),
    ({"prior": "vamp"}, "prior='vamp' does not work with inference='top-down'"),
    ({"inference": "sideways"}, "unknown inference 'sideways'; choose one of: bottom-up, top-down"),
]


@pytest.mark.parametrize(("options", "message"), TOP_DOWN_REFUSALS, ids=str)
def test_combinations_without_a_meaning_are_refused(options, message, tmp_path, capsys):
    settings = {"latent_dim": (3, 2), "inference": "top-down", **options}
    with pytest.raises(ValueError, match=message):
        ModelConfig(data_shape=(6,), **settings).validate()
    with pytest.raises(ValueError, match=message):
        vaelab.VAE(**settings, epochs=1).fit(np.random.default_rng(0).random((4, 6)))
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).random((20, 6)).astype(np.float32))
    flags = [f"--{name.replace('_', '-')}" for name in options]
    argv = [value for pair in zip(flags, options.values(), strict=True) for value in pair]
    code, _, err = vaelab_cli(
        capsys, "train", data, "--out", tmp_path / "m", "--latent-dim", "3,2",
        *([] if "inference" in options else ["--inference", "top-down"]), *argv,
    )  # fmt: skip
    assert code == 2 and message in err and not (tmp_path / "m").exists(), err


def test_a_conditional_top_down_model_is_refused(tmp_path, capsys):
    message = "inference='top-down' does not work with a conditional model"
    with pytest.raises(ValueError, match=message):
        ModelConfig(data_shape=(6,), latent_dim=4, inference="top-down", condition_dim=2).validate()
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.random((20, 6)).astype(np.float32), labels=rng.integers(0, 2, 20))
    code, _, err = vaelab_cli(
        capsys, "train", data, "--out", tmp_path / "m", "--inference", "top-down", "--conditional"
    )
    assert code == 2 and message in err, err


def test_onnx_export_of_a_top_down_model_is_refused(tmp_path, capsys, digits):
    vaelab.VAE(latent_dim=(4, 2), hidden=(8,), inference="top-down", epochs=1, seed=0).fit(
        digits[:100]
    ).save(tmp_path / "m")
    code, _, err = vaelab_cli(capsys, "export", tmp_path / "m", "--out", tmp_path / "onnx")
    assert code == 2 and "a top-down posterior (inference='top-down') has no closed-form" in err
    assert not (tmp_path / "onnx").exists()


def test_ais_agrees_with_the_exact_likelihood_at_depth_four():
    truth = LinearChain((3, 3, 2, 2), data=8, seed=2)
    model = truth.model(widen=1.2)
    x = truth.sample_x(30, seed=3)
    found = ais(model, x, chains=8, steps=100, hmc=HmcSettings(leapfrog_steps=5), seed=0)
    error = found.log_px - truth.marginal.log_prob(x)
    assert abs(float(error.mean())) < 3 * standard_error(error), float(error.mean())


def test_refine_climbs_from_the_amortised_top_down_posterior(digits):
    """q* of the top-down family (each example's evidence free, the prior's networks kept)
    starts at the amortised q and climbs: its ELBO is not below the amortised one."""
    vae = vaelab.VAE(
        latent_dim=(8, 4, 2), hidden=(16,), inference="top-down", epochs=1, seed=0, device="cpu"
    ).fit(digits)
    amortised = vae.elbo(digits[:8], samples=200)
    refined = vae.refine(digits[:8], steps=40, samples=200)
    assert refined.codes.shape == (8, 14)
    assert float(refined.elbo.mean()) > float(amortised.mean()) - 0.2


def test_a_top_down_run_killed_mid_epoch_resumes_bit_identical(tmp_path):
    from vaelab.train.batches import IndexedBatches
    from vaelab.train.checkpoint import CheckpointPolicy, load_checkpoint
    from vaelab.train.config import TrainConfig
    from vaelab.train.trainer import Trainer

    x = torch.from_numpy((load_digits().data[:96] / 16.0).astype(np.float32))
    config = TrainConfig(epochs=3, batch_size=16, lr=3e-3, objective="iwae", k=3, gradient="dreg")

    def model(seed: int) -> vaelab.VAEModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sizes = (4, 3, 2)
            return build_model(
                ModelConfig(data_shape=(64,), latent_dim=sizes, hidden=(8,), inference="top-down")
            )

    def fit(trainer: Trainer, batches: IndexedBatches) -> Trainer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            trainer.fit(batches)
        return trainer

    reference = fit(Trainer(model(0), config, torch.device("cpu")), IndexedBatches(x, 16, seed=5))
    path = tmp_path / "checkpoint.safetensors"
    policy = CheckpointPolicy(path, every_steps=3, every_seconds=None)
    crashing = Trainer(
        model(0), config, torch.device("cpu"), observer=CrashAfter(7), checkpoint=policy
    )
    with pytest.raises(SystemExit):
        fit(crashing, IndexedBatches(x, 16, seed=5))
    tensors, state = load_checkpoint(path)
    resumed = Trainer(model(99), config, torch.device("cpu"))
    train = IndexedBatches(x, 16, seed=5)
    resumed.restore(tensors, state, train)
    resumed.fit(train)
    final, expected = resumed.model.state_dict(), reference.model.state_dict()
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


@pytest.mark.slow
def test_two_workers_train_the_top_down_model_one_process_trains(tmp_path, capsys):
    """--nproc 2 against one process on a three-layer top-down model: only the order of float
    sums differs (the prior's reused log-densities included)."""
    import subprocess

    from conftest import vaelab_command
    from test_distributed import assert_close_runs, environment

    data = tmp_path / "d.npy"
    np.save(data, (load_digits().data[:400] / 16.0).astype(np.float32))
    run = [
        "--epochs", "2", "--batch-size", "8", "--hidden", "16", "--latent-dim", "4,3,2",
        "--inference", "top-down", "--objective", "iwae", "--k", "3", "--gradient", "dreg",
        "--seed", "3", "--quiet",
    ]  # fmt: skip
    code, _, err = vaelab_cli(capsys, "train", data, "--out", tmp_path / "one", *run)
    assert code == 0, err
    done = subprocess.run(
        vaelab_command("train", data, "--out", tmp_path / "two", "--nproc", 2, *run),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert_close_runs(tmp_path / "one", tmp_path / "two", tolerance=1e-4)


# ------------------------------------------------------------ the step's cost and the default
def test_the_training_step_reports_the_kl_per_layer_without_a_second_bottom_up_pass():
    """The KL per layer the trainer reports (``StepObjective.layer_kl``) comes from the step's
    own bottom-up evidence (one pass over the batch, not two), with the numbers of a fresh
    pass: it sums to the step's Monte Carlo KL."""
    from vaelab.train.config import TrainConfig
    from vaelab.train.distributed import SINGLE
    from vaelab.train.loss import StepObjective

    model = top_down((4, 3, 2))
    x = torch.randn(7, 6, dtype=F64)
    calls = []
    model.posterior.bottom_up.register_forward_hook(lambda *a: calls.append(1))
    objective = StepObjective(model, TrainConfig(), SINGLE)
    eps = torch.randn(1, 7, 9, dtype=F64)
    _, terms = objective(x, eps, 1.0, 7)
    assert len(calls) == 1
    torch.testing.assert_close(objective.layer_kl.sum(-1), terms.kl.detach())
    with torch.no_grad():  # a changed batch, or a graph wanted, runs its own pass
        model.posterior(x.clone())
        model.posterior(x)
    assert len(calls) == 3


def test_the_automatic_kl_warmup_is_for_top_down_models_with_the_standard_gradient():
    """``kl_warmup_epochs=None`` (the default), for a top-down model: 500 steps on the ELBO,
    5,000 on the IWAE bound with the standard gradient (at most a quarter of the run), at least
    one epoch; none for a bottom-up model or IWAE with DReG; a given value, 0 included, as it is. On the command line
    ``--kl-warmup 0`` is 0 and ``none`` automatic."""
    from vaelab.runs.options import convert
    from vaelab.train.config import TrainConfig
    from vaelab.train.warmup import kl_warmup_epochs

    deep, flat = top_down((4, 2)), build_model(ModelConfig(data_shape=(6,), latent_dim=(4, 2)))
    assert kl_warmup_epochs(TrainConfig(), deep, 36) == pytest.approx(500 / 36)
    assert kl_warmup_epochs(TrainConfig(), deep, 2000) == 1.0
    assert kl_warmup_epochs(TrainConfig(), flat, 36) == 0.0
    iwae = TrainConfig(objective="iwae", k=2)  # 5,000 steps, at most a quarter of 50 epochs
    assert kl_warmup_epochs(iwae, deep, 540) == pytest.approx(5000 / 540)
    assert kl_warmup_epochs(iwae, deep, 36) == 12.5
    assert kl_warmup_epochs(TrainConfig(objective="iwae", k=2, epochs=2), deep, 36) == 1.0
    assert kl_warmup_epochs(TrainConfig(objective="iwae", k=2, gradient="dreg"), deep, 36) == 0.0
    assert kl_warmup_epochs(TrainConfig(objective="iwae", k=2), flat, 36) == 0.0
    assert kl_warmup_epochs(TrainConfig(kl_warmup_epochs=0.0), deep, 36) == 0.0
    assert kl_warmup_epochs(TrainConfig(kl_warmup_epochs=2.5), flat, 36) == 2.5
    assert convert("kl_warmup", "0") == 0.0 and convert("kl_warmup", "none") is None


def test_a_top_down_fit_at_default_options_does_not_collapse_onto_the_prior():
    """Binarised digits, three layers: at full KL from the first step this model collapses
    (every layer's KL ≈ 0, ELBO ≈ −24.5, ``vaelab.train.warmup``); with the default warm-up
    the first layer carries information (≈ 3 nats) and the ELBO is better (≈ −21)."""
    x = (load_digits().data / 16.0 > 0.5).astype(np.float32)
    vae = vaelab.VAE(
        latent_dim=(16, 8, 4), hidden=(64,), inference="top-down", epochs=20, batch_size=50,
        seed=0, device="cpu",
    ).fit(x)  # fmt: skip
    last = vae.history_[-1]
    assert last.kl_per_layer[0] > 1.0, last.kl_per_layer
    assert last.elbo > -23.0, last.elbo


def test_vaelab_train_warms_up_a_top_down_iwae_run_and_refuses_one_with_dreg(tmp_path, capsys):
    """On the IWAE bound a top-down model gets the default warm-up too (β in metrics.jsonl below
    1 after the first epoch, the reported IWAE-k still a bound: above the ELBO from its draws);
    with DReG it gets none, and an explicit warm-up with DReG is refused in one line."""
    import json

    data = tmp_path / "d.npy"
    np.save(data, (load_digits().data[:200] > 7).astype(np.float32))
    common = ["--epochs", "1", "--hidden", "16", "--quiet", "--batch-size", "40",
              "--latent-dim", "4,2", "--inference", "top-down", "--objective", "iwae", "--k", "3"]  # fmt: skip
    for name, extra in (("standard", []), ("dreg", ["--gradient", "dreg"])):
        code, _, err = vaelab_cli(capsys, "train", data, "--out", tmp_path / name, *common, *extra)
        assert code == 0, err
    (warm,) = [
        json.loads(x) for x in (tmp_path / "standard/metrics.jsonl").read_text().splitlines()
    ]
    (cold,) = [json.loads(x) for x in (tmp_path / "dreg/metrics.jsonl").read_text().splitlines()]
    assert 0 < warm["kl_weight"] < 1 and cold["kl_weight"] == 1.0
    assert warm["iwae"] >= warm["elbo"]
    code, _, err = vaelab_cli(capsys, "train", data, "--out", tmp_path / "refused", *common,
                              "--gradient", "dreg", "--kl-warmup", "2")  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "a KL warm-up of the IWAE bound" in err and "gradient='standard'" in err
    assert not (tmp_path / "refused").exists()
