"""Flow posteriors checked against the change-of-variables formula, autograd Jacobians, their own
inverses, numerical integration and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, Normal, kl_divergence

from conftest import Constant
from vaelab.components.flows import (
    FlowDistribution,
    IAFDistribution,
    IAFPosterior,
    LocalFlowPosterior,
    PlanarFlowDistribution,
    PlanarFlowPosterior,
    planar_constraint,
    planar_log_det,
)
from vaelab.components.made import MADE, MadeWeights
from vaelab.components.networks import MLP
from vaelab.components.priors import StandardNormalPrior
from vaelab.objectives.bounds import kl_term

FLOWS = ["planar", "iaf"]


# ---------------------------------------------------------------------------------- builders
def planar_flow(
    batch: int = 3,
    steps: int = 3,
    latent: int = 3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    scale: float = 1.0,
) -> PlanarFlowDistribution:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    return PlanarFlowDistribution(
        0.5 * randn(batch, latent),
        0.3 * randn(batch, latent) - 0.5,
        scale * randn(batch, steps, latent),
        scale * randn(batch, steps, latent),
        randn(batch, steps),
    )


def random_mades(
    steps: int, latent: int, context: int, dtype: torch.dtype, seed: int, std: float = 0.4
) -> list[MADE]:
    """MADEs with every weight random (the posterior's zero initial output layer would make
    the flow a plain rescaling, which checks nothing)."""
    g = torch.Generator().manual_seed(seed)
    mades = [MADE(latent, context, (8, 8)).to(dtype) for _ in range(steps)]
    with torch.no_grad():
        for made in mades:
            for p in made.parameters():
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=dtype))
    return mades


def iaf_flow(
    batch: int = 3,
    steps: int = 3,
    latent: int = 3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    context: int = 2,
) -> IAFDistribution:
    g = torch.Generator().manual_seed(seed + 1)
    mades = random_mades(steps, latent, context, dtype, seed)
    return IAFDistribution(
        0.5 * torch.randn(batch, latent, generator=g, dtype=dtype),
        0.3 * torch.randn(batch, latent, generator=g, dtype=dtype) - 0.5,
        torch.randn(batch, context, generator=g, dtype=dtype),
        [made.weights() for made in mades],
    )


def flow(kind: str, **kwargs) -> FlowDistribution:
    return planar_flow(**kwargs) if kind == "planar" else iaf_flow(**kwargs)


def noise(q: FlowDistribution, *sample_shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (*sample_shape, *q.batch_shape, *q.event_shape)
    return torch.randn(shape, generator=g, dtype=q.loc.dtype)


def base_log_density(q: FlowDistribution, z0: torch.Tensor) -> torch.Tensor:
    """log N(z₀; μ, diag σ²) from torch.distributions, independent of the flow's own formula."""
    return Normal(q.loc, torch.exp(0.5 * q.log_var)).log_prob(z0).sum(-1)


# ------------------------------------------------------------------ (1) change of variables
def reference_planar_forward(q: PlanarFlowDistribution, z0: torch.Tensor) -> torch.Tensor:
    """The paper's layers written out again: û = u + [m(wᵀu) − wᵀu] w / ‖w‖² with
    m(a) = −1 + log(1 + exp(a + log(e − 1))), then z ← z + û tanh(wᵀz + b)."""
    z = z0
    for k in range(q.flow_steps):
        u, w, b = q.u[:, k], q.w[:, k], q.b[:, k]
        wu = (w * u).sum(-1)
        m = -1 + torch.log(1 + torch.exp(wu + math.log(math.e - 1)))
        u_hat = u + ((m - wu) / (w * w).sum(-1))[:, None] * w
        z = z + u_hat * torch.tanh((w * z).sum(-1) + b)[:, None]
    return z


def reference_iaf_forward(q: IAFDistribution, mades: list[MADE], z0: torch.Tensor) -> torch.Tensor:
    """Kingma et al.'s update with the MADE modules called directly; odd steps see the variables
    reversed."""
    z = z0
    for k, made in enumerate(mades):
        x = z.flip(-1) if k % 2 else z
        out = made(x, q.context)
        m, s = out[..., : z.shape[-1]], out[..., z.shape[-1] :]
        sigma = torch.sigmoid(s)
        x = sigma * x + (1 - sigma) * m
        z = x.flip(-1) if k % 2 else x
    return z


@pytest.mark.parametrize("kind", FLOWS)
def test_log_prob_is_the_base_density_minus_the_log_determinant_of_the_whole_map(kind):
    """log q(z_K) = log N(z₀) − log |det ∂z_K/∂z₀| with the Jacobian of the entire K-step map
    from autograd: through the cached sample and through the inverse."""
    q = flow(kind, batch=3, steps=3, latent=3)
    eps = noise(q)
    z0 = q.loc + torch.exp(0.5 * q.log_var) * eps
    z, log_q = q.from_noise(eps)
    jacobian = torch.autograd.functional.jacobian(lambda v: q.forward_and_log_det(v)[0], z0)
    for i in range(3):
        sign, log_abs_det = torch.linalg.slogdet(jacobian[i, :, i, :])
        assert sign > 0  # orientation-preserving, as every layer is
        expected = base_log_density(q, z0)[i] - log_abs_det
        assert torch.allclose(log_q[i], expected, rtol=0, atol=1e-10)
        assert torch.allclose(q.log_prob(z.clone())[i], expected, rtol=0, atol=1e-9)


def test_planar_forward_matches_the_formulas_written_out():
    q = planar_flow(batch=4, steps=5, latent=3)
    z0 = noise(q)
    assert torch.allclose(q.forward_and_log_det(z0)[0], reference_planar_forward(q, z0))


def test_iaf_forward_matches_the_update_of_the_paper():
    mades = random_mades(3, 4, 2, torch.float64, seed=5)
    g = torch.Generator().manual_seed(0)
    loc, log_var = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    context = torch.randn(2, 2, generator=g, dtype=torch.float64)
    q = IAFDistribution(loc, log_var, context, [made.weights() for made in mades])
    z0 = noise(q, 5)
    assert torch.allclose(q.forward_and_log_det(z0)[0], reference_iaf_forward(q, mades, z0))


def test_made_outputs_depend_only_on_earlier_inputs_and_on_all_of_the_context():
    made = random_mades(1, 5, 3, torch.float64, seed=2)[0]
    z = torch.randn(5, dtype=torch.float64)
    h = torch.randn(3, dtype=torch.float64)
    dz, dh = torch.autograd.functional.jacobian(made, (z, h))  # [10, 5], [10, 3]
    for block in (dz[:5], dz[5:]):
        assert torch.equal(block.triu(), torch.zeros_like(block))  # output i ∤ z_j, j ≥ i
        assert bool((block.tril(-1).abs().sum(1)[1:] > 0).all())  # … but sees z_{<i}
    assert bool((dh.abs().sum(1) > 0).all())


def test_made_with_one_variable_depends_on_the_context_only():
    made = random_mades(1, 1, 2, torch.float64, seed=3)[0]
    dz, dh = torch.autograd.functional.jacobian(
        made, (torch.randn(1, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    )
    assert torch.equal(dz, torch.zeros_like(dz)) and bool((dh.abs().sum(1) > 0).all())


# ------------------------------------------------------------ (2) planar invertibility, any input
magnitudes = st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e6])
coordinates = st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3)


@st.composite
def raw_planar_parameters(draw):
    """(u, w, b) as a network might emit them, including huge, tiny and zero vectors and u
    pointing against w (wᵀu ≪ −1, where the unconstrained layer folds over)."""
    w = torch.tensor(draw(coordinates), dtype=torch.float64) * draw(magnitudes)
    u = torch.tensor(draw(coordinates), dtype=torch.float64) * draw(magnitudes)
    if draw(st.booleans()):
        u = u - draw(magnitudes) * w
    b = draw(st.floats(-1.0, 1.0)) * draw(magnitudes)
    return u, w, torch.tensor(b, dtype=torch.float64)


@settings(max_examples=300, deadline=None)
@given(params=raw_planar_parameters(), seed=st.integers(0, 2**16))
@example(  # Newton swung across the root where tanh bends, 200 times, before rtsafe's halving rule
    params=(
        torch.tensor([0.0, -8.4766, -8.4766], dtype=torch.float64),
        torch.tensor([-0.5, -0.8496, -0.5], dtype=torch.float64),
        torch.tensor(-0.9551, dtype=torch.float64),
    ),
    seed=263,
)
def test_planar_layers_are_invertible_for_any_network_output(params, seed):
    u, w, b = params
    u_hat, one_plus_m = planar_constraint(u, w)
    wu = float(w @ u)
    size = 1.0 + abs(wu) + float(u_hat.abs().max() * w.abs().max()) * 3
    # The constraint: ûᵀw = m(wᵀu) > −1 (to the rounding of a dot product of this size), and
    # the determinant's 1 + ûᵀw, taken from the formula, is positive.
    assert float(u_hat @ w) >= -1.0 - 1e-13 * size
    assert float(one_plus_m) > 0
    assert abs(float(u_hat @ w) - (float(one_plus_m) - 1.0)) <= 1e-13 * size

    q = PlanarFlowDistribution(
        torch.zeros(1, 3, dtype=torch.float64),
        torch.zeros(1, 3, dtype=torch.float64),
        u[None, None],
        w[None, None],
        b[None, None],
    )
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(64, 1, 3, generator=g, dtype=torch.float64) * 3.0
    # det = 1 + ûᵀψ(z) > 0 at random points, and it is the naive 1 + h′(a) ûᵀw where that is
    # not all cancellation.
    a = (z * w).sum(-1) + b
    log_det = planar_log_det(a, one_plus_m)
    assert bool(torch.isfinite(log_det).all())
    naive = 1.0 + (1.0 - torch.tanh(a) ** 2) * (u_hat @ w)
    assert torch.allclose(log_det.exp(), naive, rtol=0, atol=1e-12 * size)

    # Monotone along w: wᵀf(z + t ŵ) never decreases in t (g′ = 1 + h′ ûᵀw ≥ 0).
    norm = float(w.norm())
    if norm > 0:
        t = torch.linspace(-20.0, 20.0, 2001, dtype=torch.float64) / norm
        line = z[0, 0] + t[:, None] * (w / norm)
        along = q.forward_and_log_det(line[:, None, :])[0][:, 0, :] @ (w / norm)
        steps = along.diff()
        assert float(steps.min()) >= -1e-12 * (size + float(along.abs().max()))

    # The inverse lands where the forward map says: f(f⁻¹(y)) = y, to the rounding of y
    # (ε |y|) stretched by at most ‖∂f/∂z‖ ≤ 1 + ‖û‖ ‖w‖ ≤ size.
    y = q.forward_and_log_det(z)[0]
    back = q.inverse_and_log_det(y)[0]
    again = q.forward_and_log_det(back)[0]
    assert torch.allclose(again, y, rtol=0, atol=1e-12 * size * (1.0 + float(y.abs().max())))


@settings(max_examples=200, deadline=None)
@given(params=raw_planar_parameters())
def test_a_small_u_is_a_small_u_hat_whatever_w(params):
    """‖û − u‖ ≤ ‖u‖ (planar_constraint's shifted m): small encoder outputs for u start the layer
    near the identity."""
    u, w, _ = params
    u_hat, _ = planar_constraint(u, w)
    assert float((u_hat - u).norm()) <= float(u.norm()) * (1 + 1e-12) + 1e-300


def test_planar_log_det_matches_autograd_for_one_layer_across_its_range():
    g = torch.Generator().manual_seed(4)
    for wu_target in (-50.0, -1.0, -0.2, 0.0, 0.5, 30.0):
        w = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
        u = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
        u = u - ((w * u).sum() - wu_target) * w / (w * w).sum()  # wᵀu = wu_target
        q = PlanarFlowDistribution(
            torch.zeros(1, 3, dtype=torch.float64),
            torch.zeros(1, 3, dtype=torch.float64),
            u,
            w,
            torch.tensor([[0.3]], dtype=torch.float64),
        )

        def layer(v: torch.Tensor, q: PlanarFlowDistribution = q) -> torch.Tensor:
            return q.forward_and_log_det(v[None])[0][0]

        for z in torch.randn(20, 3, generator=g, dtype=torch.float64):
            jacobian = torch.autograd.functional.jacobian(layer, z)
            sign, expected = torch.linalg.slogdet(jacobian)
            assert sign > 0
            assert torch.allclose(q.forward_and_log_det(z[None])[1][0], expected, atol=1e-10)


# ---------------------------------------------------------------------- (3) the inverse
@pytest.mark.parametrize("kind", FLOWS)
def test_the_inverse_returns_the_base_sample_and_the_same_log_density(kind):
    q = flow(kind, batch=4, steps=4, latent=3, seed=7)
    eps = noise(q, 6)
    z0 = q.loc + torch.exp(0.5 * q.log_var) * eps
    z, log_q = q.from_noise(eps)
    fresh = z.detach().clone()
    back, log_det = q.inverse_and_log_det(fresh)
    assert torch.allclose(back, z0, rtol=0, atol=1e-10)
    assert torch.allclose(log_det, q.forward_and_log_det(z0)[1], rtol=0, atol=1e-10)
    assert torch.allclose(q.log_prob(fresh), log_q, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", FLOWS)
def test_the_inverse_of_any_point_is_a_preimage(kind):
    q = flow(kind, batch=2, steps=3, latent=3, seed=8)
    with torch.no_grad():  # points around the mass, but nothing the flow produced
        y = q.sample((50,)) + 0.5 * noise(q, 50, seed=9)
    z0, _ = q.inverse_and_log_det(y)
    assert torch.allclose(q.forward_and_log_det(z0)[0], y, rtol=0, atol=1e-10)


def test_an_iaf_preimage_beyond_the_float_range_has_density_zero_not_nan():
    """Far from the mass, where the gates shrink hard, preimages of these random MADEs overflow
    (ELU makes s linear in z); the density there is 0 to float precision."""
    q = iaf_flow(batch=2, steps=3, latent=3, seed=8)
    y = 4.0 * noise(q, 50, seed=9)
    z0, _ = q.inverse_and_log_det(y)
    overflowed = ~torch.isfinite(z0).all(-1)
    assert bool(overflowed.any()) and bool((~overflowed).any())
    log_q = q.log_prob(y)
    assert not bool(log_q.isnan().any())
    assert bool((log_q[overflowed] == -math.inf).all())


@pytest.mark.parametrize("kind", FLOWS)
def test_log_prob_uses_the_cache_only_for_the_very_tensor_sampled(kind):
    q = flow(kind)
    z, log_q = q.rsample_and_log_prob((2,))
    assert q.log_prob(z) is log_q
    q.rsample()  # a newer sample replaces it
    assert q.log_prob(z) is not log_q
    assert torch.allclose(q.log_prob(z), log_q, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- (4) reparameterisation
def test_planar_samples_and_log_densities_are_differentiable_in_every_parameter():
    q = planar_flow(batch=2, steps=2, latent=2)
    params = [t.detach().clone().requires_grad_(True) for t in q.local_parameters().values()]
    eps = noise(q, 3)
    value = 2.0 * noise(q, 3, seed=2)

    def sample(*p):
        return PlanarFlowDistribution(*p).from_noise(eps)

    def density_of_fresh_value(*p_and_value):
        *p, v = p_and_value
        return PlanarFlowDistribution(*p).log_prob(v)

    assert torch.autograd.gradcheck(sample, params)
    # Through the inverse's root: the implicit-function gradient.
    assert torch.autograd.gradcheck(density_of_fresh_value, [*params, value.requires_grad_(True)])


def test_iaf_samples_and_log_densities_are_differentiable_in_every_parameter():
    mades = random_mades(2, 2, 2, torch.float64, seed=1)
    q = iaf_flow(batch=2, steps=2, latent=2)
    leaves = [t.detach().clone().requires_grad_(True) for t in q.local_parameters().values()]
    flat = [p.detach().clone().requires_grad_(True) for made in mades for p in made.parameters()]
    eps = noise(q, 3)
    value = 2.0 * noise(q, 3, seed=2)

    def build(tensors: list[torch.Tensor]) -> IAFDistribution:
        loc, log_var, context, *weights = tensors
        steps = []
        for i, made in enumerate(mades):
            own = dict(
                zip(
                    [n for n, _ in made.named_parameters()], weights[i * 7 : i * 7 + 7], strict=True
                )
            )
            masks = made.masks()
            layers = (
                (own["layers.0.weight"] * masks[0], own["layers.0.bias"]),
                (own["layers.1.weight"] * masks[1], own["layers.1.bias"]),
                (own["output.weight"] * masks[2], own["output.bias"]),
            )
            steps.append(MadeWeights(layers, own["context.weight"]))
        return IAFDistribution(loc, log_var, context, steps)

    assert len(flat) == 14
    assert torch.autograd.gradcheck(lambda *t: build(list(t)).from_noise(eps), [*leaves, *flat])
    assert torch.autograd.gradcheck(
        lambda *t: build(list(t[:-1])).log_prob(t[-1]),
        [*leaves, *flat, value.requires_grad_(True)],
    )


@pytest.mark.parametrize("cls", [PlanarFlowPosterior, IAFPosterior])
def test_posterior_samples_carry_gradients_to_every_parameter(cls):
    torch.manual_seed(0)
    encoder = MLP((5,), (8,), cls.n_params(3, 2))
    posterior = cls(encoder, 3, flow_steps=2)
    if cls is IAFPosterior:  # leave the zero initial output layer, so every weight is reached
        with torch.no_grad():
            for made in posterior.made:
                made.output.weight.normal_(0, 0.1)
    z, log_q = posterior(torch.rand(4, 5)).rsample_and_log_prob((3,))
    (z.sum() + log_q.sum()).backward()
    for name, p in posterior.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# ---------------------------------------------------------------- (5) a normalised density
@pytest.mark.parametrize("kind", FLOWS)
def test_the_density_integrates_to_one_and_has_the_samples_moments(kind):
    """On a 2-D latent, ∫ q = 1 and ∫ z q(z) dz, ∫ z² q(z) dz on a grid (trapezoid) agree with
    the means over rsample draws within four standard errors: log_prob is the density of the
    samples, not just some normalised function."""
    q = flow(kind, batch=1, steps=3, latent=2, seed=11)
    with torch.no_grad():
        grid = torch.linspace(-9.0, 9.0, 361, dtype=torch.float64)
        zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1)  # [361, 361, 2]
        density = q.log_prob(zz.reshape(-1, 1, 2)).exp().reshape(361, 361)

        def integrate(f: torch.Tensor) -> float:
            return float(torch.trapezoid(torch.trapezoid(f, grid, dim=1), grid, dim=0))

        assert integrate(density) == pytest.approx(1.0, abs=1e-4)  # trapezoid error O(h²)
        z = q.sample((200_000,))[:, 0, :]  # [samples, 2]
        assert float(z.abs().max()) < 8.0  # the grid holds the mass
        for j in range(2):
            for power in (1, 2):
                exact = integrate(zz[..., j] ** power * density)
                draws = z[:, j] ** power
                se = float(draws.std() / math.sqrt(draws.numel()))
                assert abs(float(draws.mean()) - exact) < 4 * se, (j, power)


# ------------------------------------------------------------------------------ (6) shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", FLOWS)
def test_shapes_follow_samples_batch_latent(kind, dtype):
    q = flow(kind, batch=5, steps=2, latent=3, dtype=dtype)
    assert q.batch_shape == (5,) and q.event_shape == (3,) and q.has_rsample
    for sample_shape in [(), (7,), (2, 4)]:
        z, log_q = q.rsample_and_log_prob(sample_shape)
        assert z.shape == (*sample_shape, 5, 3) and z.dtype == dtype
        assert log_q.shape == (*sample_shape, 5) and log_q.dtype == dtype
        assert q.rsample(sample_shape).shape == (*sample_shape, 5, 3)
        assert q.log_prob(z.clone()).shape == (*sample_shape, 5)
    # float32 runs the same maps: cached and inverted log-densities agree to its precision.
    z, log_q = q.rsample_and_log_prob((100,))
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(q.log_prob(z.clone()), log_q, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", FLOWS)
def test_expand_broadcasts_the_batch(kind):
    q = flow(kind, batch=3)
    wide = q.expand((2, 3))
    assert wide.batch_shape == (2, 3) and type(wide) is type(q)
    value = noise(q, 4, seed=3)  # [4, 3, latent]
    expected = q.log_prob(value)
    assert torch.allclose(wide.log_prob(value[:, None].expand(4, 2, 3, 3)), expected[:, None])
    assert wide.rsample((4,)).shape == (4, 2, 3, 3)


def test_planar_refuses_parameters_of_the_wrong_shape():
    q = planar_flow(batch=2, steps=3, latent=4)
    with pytest.raises(ValueError, match=r"u must have shape \(2, 3, 4\)"):
        PlanarFlowDistribution(q.loc, q.log_var, q.u[:, :2], q.w, q.b)


# ----------------------------------------------------------------- the rest of the contract
@pytest.mark.parametrize("kind", FLOWS)
def test_the_mean_is_not_closed_form(kind):
    with pytest.raises(NotImplementedError, match="no closed-form mean"):
        _ = flow(kind).mean


@pytest.mark.parametrize("kind", FLOWS)
def test_kl_against_the_prior_falls_back_to_monte_carlo(kind):
    q = flow(kind)
    p = StandardNormalPrior(3).double()()
    with pytest.raises(NotImplementedError):
        kl_divergence(q, p)
    z, log_q = q.rsample_and_log_prob((5,))
    value, exact = kl_term(q, p, z)
    assert not exact
    assert torch.allclose(value, (log_q - p.log_prob(z)).mean(0))


@pytest.mark.parametrize("kind", FLOWS)
def test_detached_stops_the_parameters_gradient_but_not_the_samples(kind):
    """log q̄(z) with q̄ = q.detached() and z = rsample: its gradient is the path derivative,
    the total derivative of log q(z(φ); φ) minus the score ∂/∂φ log q(z; φ) at fixed z."""
    base = flow(kind, batch=2, steps=2, latent=3)
    leaves = {
        n: t.detach().clone().requires_grad_(True) for n, t in base.local_parameters().items()
    }
    q = base.with_local_parameters(**leaves)
    eps = noise(q, 4)
    z, log_q = q.from_noise(eps)
    stopped = q.detached()
    assert all(not t.requires_grad for t in stopped.local_parameters().values())
    total = torch.autograd.grad(log_q.sum(), list(leaves.values()), retain_graph=True)
    path = torch.autograd.grad(stopped.log_prob(z).sum(), list(leaves.values()), retain_graph=True)
    score = torch.autograd.grad(q.log_prob(z.detach()).sum(), list(leaves.values()))
    for p, t, s in zip(path, total, score, strict=True):
        assert torch.allclose(p, t - s, rtol=0, atol=1e-9)
    assert torch.allclose(stopped.log_prob(z.detach()), log_q.detach(), atol=1e-9)


def test_detached_iaf_stops_the_shared_weights_too():
    q = iaf_flow()
    weights = [w for step in q.detached().steps for layer in step.layers for w in layer]
    assert weights and all(not w.requires_grad for w in weights)


# ------------------------------------------------------------------------ the posteriors
def test_planar_posterior_reads_its_features_in_the_documented_layout():
    d, k = 2, 3
    features = torch.arange(PlanarFlowPosterior.n_params(d, k), dtype=torch.float64)[None]
    assert features.shape[-1] == 2 * d + k * (2 * d + 1)
    q = PlanarFlowPosterior(Constant(features), d, flow_steps=k)(torch.zeros(2, 1))
    assert torch.equal(q.loc[0], features[0, :2]) and torch.equal(q.log_var[0], features[0, 2:4])
    assert torch.equal(q.u[0], features[0, 4:10].reshape(3, 2))
    assert torch.equal(q.w[0], features[0, 10:16].reshape(3, 2))
    assert torch.equal(q.b[0], features[0, 16:19]) and q.batch_shape == (2,)


def test_planar_posterior_starts_near_the_identity():
    torch.manual_seed(0)
    posterior = PlanarFlowPosterior(MLP((6,), (16,), PlanarFlowPosterior.n_params(4, 5)), 4, 5)
    q = posterior(torch.rand(32, 6))
    eps = torch.randn(100, 32, 4)
    with torch.no_grad():
        z0 = q.loc + torch.exp(0.5 * q.log_var) * eps
        z, _ = q.forward_and_log_det(z0)
    assert float((z - z0).abs().max()) < 0.05


def test_iaf_posterior_starts_as_a_rescaled_diagonal_gaussian():
    torch.manual_seed(0)
    k, d = 3, 4
    posterior = IAFPosterior(MLP((6,), (16,), IAFPosterior.n_params(d)), d, flow_steps=k).double()
    q = posterior(torch.rand(5, 6, dtype=torch.float64))
    shrink = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)) ** k
    reference = Independent(Normal(shrink * q.loc, shrink * torch.exp(0.5 * q.log_var)), 1)
    z = q.rsample((10,))
    assert torch.allclose(q.log_prob(z), reference.log_prob(z))
    assert torch.allclose(q.log_prob(z.clone()), reference.log_prob(z))


def test_iaf_posterior_reads_mean_log_variance_and_context():
    d, c = 3, 5
    features = torch.randn(1, IAFPosterior.n_params(d, context_dim=c))
    posterior = IAFPosterior(Constant(features), d, flow_steps=2, context_dim=c)
    q = posterior(torch.zeros(2, 1))
    assert torch.equal(q.context[1], features[0, 6:]) and q.context.shape == (2, c)
    assert (
        q.flow_steps == 2 and len(list(posterior.parameters())) == 2 * 5
    )  # 2 MADEs of 1 hidden layer


@pytest.mark.parametrize("cls", [PlanarFlowPosterior, IAFPosterior])
def test_flow_steps_must_be_a_positive_integer(cls):
    with pytest.raises(ValueError, match="flow_steps must be a positive integer, got 0"):
        cls(Constant(torch.zeros(1, 20)), 2, flow_steps=0)


# ------------------------------------------------------------------ non-amortised families
@pytest.mark.parametrize("kind", FLOWS)
def test_local_posteriors_start_at_the_amortised_distribution_and_train_only_their_own(kind):
    q = flow(kind, batch=4)
    local = LocalFlowPosterior(q)
    names = {"planar": {"loc", "log_var", "u", "w", "b"}, "iaf": {"loc", "log_var", "context"}}
    assert {n for n, _ in local.named_parameters()} == {f"tensors.{n}" for n in names[kind]}
    assert local.loc is local.tensors["loc"]
    value = noise(q, 3)
    start = local(torch.zeros(4, 1))
    assert torch.allclose(start.log_prob(value), q.log_prob(value))
    z, log_q = start.rsample_and_log_prob((2,))
    (z.sum() + log_q.sum()).backward()
    assert all(p.grad is not None for p in local.parameters())
    if kind == "iaf":
        weights = [w for step in start.steps for layer in step.layers for w in layer]
        assert all(not w.requires_grad for w in weights)
    with pytest.raises(ValueError, match="belong to 4 examples, got 3"):
        local(torch.zeros(3, 1))
