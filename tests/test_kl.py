"""Closed-form Gaussian KL: against torch.distributions, exact references, and Monte Carlo."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal, localcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    Laplace,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from torch.distributions.kl import _KL_REGISTRY, kl_divergence

from vaelab.distributions.kl import kl_gaussian, kl_gaussian_tril, kl_standard_normal
from vaelab.distributions.normal import DiagonalNormal, StandardNormal

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
FEW_EXAMPLES = settings(max_examples=40, deadline=None)

# ----------------------------------------------------------------------------------------------
# Builders.


def _spd(
    gen: torch.Generator,
    batch: tuple[int, ...],
    n: int,
    log10_cond: float,
    dtype: torch.dtype = F64,
    basis: Tensor | None = None,
) -> Tensor:
    """Q diag(λ) Qᵀ with λ spanning exactly 10**log10_cond (n ≥ 2), geometric mean near 1."""
    if basis is None:
        basis = torch.linalg.qr(torch.randn(*batch, n, n, generator=gen, dtype=F64)).Q
    u = torch.rand(*batch, n, generator=gen, dtype=F64)
    if n >= 2:
        u[..., 0], u[..., 1] = 0.0, 1.0
    eigenvalues = 10.0 ** (log10_cond * (u - 0.5))
    cov = (basis * eigenvalues.unsqueeze(-2)) @ basis.mT
    return ((cov + cov.mT) / 2).to(dtype)  # exactly symmetric


@st.composite
def _batch_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two batch shapes that broadcast: a common shape, each side dropping or squeezing dims."""
    full = draw(st.lists(st.integers(1, 3), max_size=2))

    def side() -> tuple[int, ...]:
        shape = full[draw(st.integers(0, len(full))) :]
        return tuple(1 if draw(st.booleans()) else d for d in shape)

    return side(), side()


_SEEDS = st.integers(0, 2**32 - 1)
_MEAN_SCALES = st.sampled_from([0.0, 1e-2, 1.0, 1e2])


def _assert_rel_close(actual: Tensor, expected: Tensor, rtol: float, atol: Tensor | float = 0.0):
    assert actual.shape == expected.shape
    error = (actual - expected).abs()
    bound = rtol * expected.abs() + atol
    assert bool((error <= bound).all()), f"error {error} exceeds {bound}"


# ----------------------------------------------------------------------------------------------
# Against torch.distributions where it has the same quantity (float64).


@FEW_EXAMPLES
@given(
    shapes=_batch_shapes(),
    n=st.integers(1, 6),
    log10_cond1=st.floats(0.0, 6.0),
    log10_cond2=st.floats(0.0, 6.0),
    shared_basis=st.booleans(),
    mean_scale=_MEAN_SCALES,
    seed=_SEEDS,
)
def test_kl_gaussian_matches_torch_multivariate_normal(
    shapes, n, log10_cond1, log10_cond2, shared_basis, mean_scale, seed
):
    gen = torch.Generator().manual_seed(seed)
    batch1, batch2 = shapes
    basis = None
    if shared_basis:  # commuting covariances: the trace is not dominated by the conditioning
        basis = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64)).Q
    cov1 = _spd(gen, batch1, n, log10_cond1, basis=basis)
    cov2 = _spd(gen, batch2, n, log10_cond2, basis=basis)
    mu1 = mean_scale * torch.randn(*batch1, n, generator=gen, dtype=F64)
    mu2 = mean_scale * torch.randn(*batch2, n, generator=gen, dtype=F64)

    expected = kl_divergence(MultivariateNormal(mu1, cov1), MultivariateNormal(mu2, cov2))
    # torch sums ½ log(|Σ₂|/|Σ₁|), −n/2, ½ tr(Σ₂⁻¹Σ₁) and ½ Mahalanobis, which cancel when q ≈ p
    # (hypothesis finds Σ₁ = Σ₂ = I); its rounding error is a few ε times those terms' size.
    diff = (mu2 - mu1).unsqueeze(-1)
    magnitude = (
        n
        + torch.linalg.slogdet(cov1).logabsdet.abs()
        + torch.linalg.slogdet(cov2).logabsdet.abs()
        + torch.linalg.solve(cov2, cov1).diagonal(dim1=-2, dim2=-1).sum(-1)
        + (diff.mT @ torch.linalg.solve(cov2, diff)).squeeze((-2, -1))
    )
    atol = 64 * EPS64 * magnitude
    _assert_rel_close(kl_gaussian(mu1, cov1, mu2, cov2), expected, rtol=1e-10, atol=atol)
    tril1, tril2 = torch.linalg.cholesky(cov1), torch.linalg.cholesky(cov2)
    _assert_rel_close(kl_gaussian_tril(mu1, tril1, mu2, tril2), expected, rtol=1e-10, atol=atol)


@FEW_EXAMPLES
@given(
    shapes=_batch_shapes(),
    n=st.integers(1, 6),
    log10_var_spread=st.floats(0.0, 6.0),
    mean_scale=_MEAN_SCALES,
    seed=_SEEDS,
)
def test_kl_gaussian_diagonal_matches_torch_normal(shapes, n, log10_var_spread, mean_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    batch1, batch2 = shapes
    var1, var2 = (
        10.0 ** (log10_var_spread * (torch.rand(*b, n, generator=gen, dtype=F64) - 0.5))
        for b in (batch1, batch2)
    )
    mu1 = mean_scale * torch.randn(*batch1, n, generator=gen, dtype=F64)
    mu2 = mean_scale * torch.randn(*batch2, n, generator=gen, dtype=F64)

    p = Independent(Normal(mu1, var1.sqrt()), 1)
    q = Independent(Normal(mu2, var2.sqrt()), 1)
    expected = kl_divergence(p, q)
    actual = kl_gaussian(mu1, torch.diag_embed(var1), mu2, torch.diag_embed(var2))
    # torch evaluates ½Σ(r − 1 − log r + Δ²/σ₂²), r = σ₁²/σ₂², whose terms cancel when r ≈ 1; its
    # own rounding error is then a few ε times the size of those terms, not of the result.
    ratio = var1 / var2
    magnitude = (ratio + 1 + ratio.log().abs() + (mu2 - mu1).square() / var2).sum(-1)
    _assert_rel_close(actual, expected, rtol=1e-10, atol=64 * EPS64 * magnitude)


@FEW_EXAMPLES
@given(
    batch=st.lists(st.integers(1, 4), max_size=2),
    latent=st.integers(1, 8),
    log_var_scale=st.sampled_from([1e-6, 1e-2, 1.0, 5.0]),
    mean_scale=_MEAN_SCALES,
    seed=_SEEDS,
)
def test_kl_standard_normal_matches_torch(batch, latent, log_var_scale, mean_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    mu = mean_scale * torch.randn(*batch, latent, generator=gen, dtype=F64)
    log_var = log_var_scale * torch.randn(*batch, latent, generator=gen, dtype=F64)

    q = Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    expected = kl_divergence(q, p)
    # Same cancellation in torch's reference as above, with r = σ².
    magnitude = (log_var.exp() + 1 + log_var.abs() + mu.square()).sum(-1)
    _assert_rel_close(
        kl_standard_normal(mu, log_var), expected, rtol=1e-10, atol=64 * EPS64 * magnitude
    )


# ----------------------------------------------------------------------------------------------
# Exact references where the KL is tiny (q close to p), which a cancelling formula gets wrong.


@pytest.mark.parametrize("log_var", [1e-3, -1e-5, 1e-6, -1e-9, 1e-12])
def test_kl_standard_normal_is_accurate_near_zero_log_var(log_var):
    with localcontext() as ctx:
        ctx.prec = 50
        s = Decimal(log_var)
        exact = float((s.exp() - 1 - s) / 2)
    actual = kl_standard_normal(torch.zeros(1, dtype=F64), torch.tensor([log_var], dtype=F64))
    # expm1(s) − s is within O(ε·|s|) of eˢ − 1 − s; the naive exp(s) − 1 − s is only within
    # O(ε), which here is between 1e-3 and 1e9 times the whole result, so it fails this bound.
    assert abs(actual.item() - exact) <= 2 * EPS64 * abs(log_var)


@pytest.mark.parametrize("t", [1e-4, 1e-7, -1e-7])
def test_kl_gaussian_tril_is_accurate_for_scaled_covariance(t):
    # KL(N(0, c²Σ) ‖ N(0, Σ)) = (n/2)(c² − 1 − log c²), whatever Σ.
    n = 5
    gen = torch.Generator().manual_seed(0)
    tril2 = torch.linalg.cholesky(_spd(gen, (), n, 3.0))
    c = math.sqrt(1 + t)
    zero = torch.zeros(n, dtype=F64)
    actual = kl_gaussian_tril(zero, c * tril2, zero, tril2).item()
    with localcontext() as ctx:
        ctx.prec = 50
        c2 = Decimal(c) ** 2
        exact = float(n * (c2 - 1 - c2.ln()) / 2)
    assert actual == pytest.approx(exact, rel=1e-6)


def test_kl_gaussian_is_accurate_for_a_tiny_mean_shift():
    # With equal covariances the KL is exactly ½ hᵀΣ⁻¹h, here about 1e-16: every other term of
    # the whitened form vanishes instead of cancelling at the level of ε.
    n = 4
    gen = torch.Generator().manual_seed(1)
    cov = _spd(gen, (), n, 2.0)
    h = 1e-8 * torch.randn(n, generator=gen, dtype=F64)
    exact = 0.5 * (h @ torch.linalg.solve(cov, h))
    actual = kl_gaussian(torch.zeros(n, dtype=F64), cov, h, cov)
    assert actual.item() == pytest.approx(exact.item(), rel=1e-8)


def test_kl_gaussian_is_never_negative_at_equality():
    gen = torch.Generator().manual_seed(2)
    cov = _spd(gen, (16,), 6, 6.0)
    mu = torch.randn(16, 6, generator=gen, dtype=F64)
    kl = kl_gaussian(mu, cov, mu, cov)
    assert bool((kl >= 0).all())
    assert kl.max().item() < 1e-20


# ----------------------------------------------------------------------------------------------
# Equivalences.


def test_diagonal_kl_gaussian_equals_kl_standard_normal():
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(7, 5, generator=gen, dtype=F64)
    log_var = 2 * torch.randn(7, 5, generator=gen, dtype=F64)
    dense = kl_gaussian(
        mu, torch.diag_embed(log_var.exp()), torch.zeros(5, dtype=F64), torch.eye(5, dtype=F64)
    )
    _assert_rel_close(dense, kl_standard_normal(mu, log_var), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# The registered pairs: Independent(Normal) <-> MultivariateNormal / LowRankMultivariateNormal.


def _diag_normal(gen: torch.Generator, batch: tuple[int, ...], n: int, dtype=F64) -> Independent:
    loc = torch.randn(*batch, n, generator=gen, dtype=F64)
    scale = torch.exp(0.5 * torch.randn(*batch, n, generator=gen, dtype=F64))
    return Independent(Normal(loc.to(dtype), scale.to(dtype)), 1)


def _mvn(gen: torch.Generator, batch: tuple[int, ...], n: int, dtype=F64) -> MultivariateNormal:
    loc = torch.randn(*batch, n, generator=gen, dtype=F64)
    return MultivariateNormal(loc.to(dtype), _spd(gen, batch, n, 1.0, dtype=dtype))


def _lowrank(
    gen: torch.Generator, batch: tuple[int, ...], n: int, dtype=F64
) -> LowRankMultivariateNormal:
    loc = torch.randn(*batch, n, generator=gen, dtype=F64)
    factor = torch.randn(*batch, n, 2, generator=gen, dtype=F64)
    diag = 0.2 + torch.rand(*batch, n, generator=gen, dtype=F64)
    return LowRankMultivariateNormal(loc.to(dtype), factor.to(dtype), diag.to(dtype))


def _dense(d: Distribution) -> tuple[Tensor, Tensor]:
    """(mean, covariance) of any of the Gaussians above."""
    if isinstance(d, Independent):
        return d.mean, torch.diag_embed(d.variance)
    assert isinstance(d, MultivariateNormal | LowRankMultivariateNormal)
    return d.loc, d.covariance_matrix


Builder = Callable[..., Distribution]
REGISTERED_PAIRS: list[tuple[Builder, Builder]] = [
    (_diag_normal, _mvn),
    (_mvn, _diag_normal),
    (_diag_normal, _lowrank),
    (_lowrank, _diag_normal),
]
PAIR_IDS = ["indep-mvn", "mvn-indep", "indep-lowrank", "lowrank-indep"]


def test_registration_adds_the_missing_pairs_and_leaves_torch_pairs_alone():
    ours = {pair for pair, fn in _KL_REGISTRY.items() if fn.__module__ == "vaelab.distributions.kl"}
    assert ours == {
        (Independent, StandardNormal),
        (DiagonalNormal, StandardNormal),
        (Independent, MultivariateNormal),
        (MultivariateNormal, Independent),
        (Independent, LowRankMultivariateNormal),
        (LowRankMultivariateNormal, Independent),
    }
    for pair in [(MultivariateNormal, MultivariateNormal), (Independent, Independent)]:
        assert _KL_REGISTRY[pair].__module__ == "torch.distributions.kl"


@FEW_EXAMPLES
@given(
    shapes=_batch_shapes(), n=st.integers(1, 5), pair=st.sampled_from(REGISTERED_PAIRS), seed=_SEEDS
)
def test_registered_pairs_match_dense_formula(shapes, n, pair, seed):
    gen = torch.Generator().manual_seed(seed)
    p, q = pair[0](gen, shapes[0], n), pair[1](gen, shapes[1], n)
    actual = kl_divergence(p, q)
    expected = kl_gaussian(*_dense(p), *_dense(q))
    assert actual.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    _assert_rel_close(actual, expected, rtol=1e-10)


@pytest.mark.parametrize("pair", REGISTERED_PAIRS, ids=PAIR_IDS)
def test_registered_pairs_match_monte_carlo(pair):
    samples = 200_000
    gen = torch.Generator().manual_seed(4)
    p, q = pair[0](gen, (2,), 3), pair[1](gen, (2,), 3)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        z = p.sample((samples,))  # [samples, batch, n]
    log_ratio = p.log_prob(z) - q.log_prob(z)  # [samples, batch]
    estimate = log_ratio.mean(0)
    standard_error = log_ratio.std(0) / math.sqrt(samples)
    exact = kl_divergence(p, q)
    assert bool(((estimate - exact).abs() < 4 * standard_error).all()), (estimate, exact)


@pytest.mark.parametrize("pair", REGISTERED_PAIRS, ids=PAIR_IDS)
def test_registered_pairs_work_in_float32(pair):
    gen = torch.Generator().manual_seed(6)
    p, q = pair[0](gen, (3,), 4, torch.float32), pair[1](gen, (3,), 4, torch.float32)
    actual = kl_divergence(p, q)
    assert actual.dtype == torch.float32
    mean_p, cov_p = _dense(p)
    mean_q, cov_q = _dense(q)
    expected = kl_gaussian(mean_p.double(), cov_p.double(), mean_q.double(), cov_q.double())
    _assert_rel_close(actual.double(), expected, rtol=1e-4)


def test_unsupported_independent_raises_not_implemented():
    mvn = MultivariateNormal(torch.zeros(3), torch.eye(3))
    laplace = Independent(Laplace(torch.zeros(3), torch.ones(3)), 1)
    normal_2d = Independent(Normal(torch.zeros(1, 3), torch.ones(1, 3)), 2)
    for p in (laplace, normal_2d):
        with pytest.raises(NotImplementedError, match=r"Independent\(Normal\(loc, scale\), 1\)"):
            kl_divergence(p, mvn)
        with pytest.raises(NotImplementedError, match=r"Independent\(Normal\(loc, scale\), 1\)"):
            kl_divergence(mvn, p)


def test_registered_pairs_reject_different_event_shapes():
    indep = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    mvn = MultivariateNormal(torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"equal event shapes; got \(3,\) and \(4,\)"):
        kl_divergence(indep, mvn)


# ----------------------------------------------------------------------------------------------
# Gradients at q = p: finite, and zero, since every point with q = p is the global minimum 0.


def _well_conditioned(n: int, dtype: torch.dtype) -> Tensor:
    return _spd(torch.Generator().manual_seed(7), (), n, 1.0, dtype=dtype)


def _leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def _case_standard_normal(dtype):
    leaves = [_leaf(torch.zeros(2, 3, dtype=dtype)), _leaf(torch.zeros(2, 3, dtype=dtype))]
    return leaves, lambda: kl_standard_normal(*leaves)


def _case_gaussian(dtype):
    mu, cov = torch.linspace(-1, 1, 3, dtype=dtype), _well_conditioned(3, dtype)
    leaves = [_leaf(mu), _leaf(cov), _leaf(mu), _leaf(cov)]
    return leaves, lambda: kl_gaussian(*leaves)


def _case_gaussian_tril(dtype):
    mu, tril = (
        torch.linspace(-1, 1, 3, dtype=dtype),
        torch.linalg.cholesky(_well_conditioned(3, dtype)),
    )
    leaves = [_leaf(mu), _leaf(tril), _leaf(mu), _leaf(tril)]
    return leaves, lambda: kl_gaussian_tril(*leaves)


def _case_indep_mvn(dtype, reverse=False):
    loc, scale = torch.linspace(-1, 1, 3, dtype=dtype), torch.tensor([0.5, 1.0, 2.0], dtype=dtype)
    leaves = [_leaf(loc), _leaf(scale), _leaf(loc), _leaf(scale)]

    def kl():
        p = Independent(Normal(leaves[0], leaves[1]), 1)
        q = MultivariateNormal(leaves[2], scale_tril=torch.diag_embed(leaves[3]))
        return kl_divergence(q, p) if reverse else kl_divergence(p, q)

    return leaves, kl


def _case_indep_lowrank(dtype, reverse=False):
    # Orthogonal rows of the factor W keep D + WWᵀ diagonal, so q = p with a non-zero W.
    loc = torch.linspace(-1, 1, 3, dtype=dtype)
    factor = torch.tensor([[0.5, 0.0], [0.0, 1.5], [0.0, 0.0]], dtype=dtype)
    diag = torch.tensor([0.3, 1.0, 2.0], dtype=dtype)
    scale = (diag + factor.square().sum(-1)).sqrt()
    leaves = [_leaf(loc), _leaf(scale), _leaf(loc), _leaf(factor), _leaf(diag)]

    def kl():
        p = Independent(Normal(leaves[0], leaves[1]), 1)
        q = LowRankMultivariateNormal(leaves[2], leaves[3], leaves[4])
        return kl_divergence(q, p) if reverse else kl_divergence(p, q)

    return leaves, kl


GRADIENT_CASES = {
    "kl_standard_normal": _case_standard_normal,
    "kl_gaussian": _case_gaussian,
    "kl_gaussian_tril": _case_gaussian_tril,
    "indep-mvn": _case_indep_mvn,
    "mvn-indep": lambda dtype: _case_indep_mvn(dtype, reverse=True),
    "indep-lowrank": _case_indep_lowrank,
    "lowrank-indep": lambda dtype: _case_indep_lowrank(dtype, reverse=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", GRADIENT_CASES.values(), ids=GRADIENT_CASES.keys())
def test_gradients_at_q_equals_p_are_finite_and_zero(case, dtype):
    leaves, kl = case(dtype)
    value = kl()
    assert value.dtype == dtype
    assert value.abs().max().item() < 100 * torch.finfo(dtype).eps
    value.sum().backward()
    tolerance = 1e3 * torch.finfo(dtype).eps
    for leaf in leaves:
        assert leaf.grad is not None
        assert bool(torch.isfinite(leaf.grad).all())
        assert leaf.grad.abs().max().item() < tolerance, leaf.grad


# ----------------------------------------------------------------------------------------------
# float32.


def test_kl_gaussian_works_in_float32():
    gen = torch.Generator().manual_seed(8)
    cov1, cov2 = _spd(gen, (4,), 5, 2.0), _spd(gen, (4,), 5, 2.0)
    mu1, mu2 = torch.randn(2, 4, 5, generator=gen, dtype=F64)
    expected = kl_gaussian(mu1, cov1, mu2, cov2)
    actual = kl_gaussian(mu1.float(), cov1.float(), mu2.float(), cov2.float())
    assert actual.dtype == torch.float32
    _assert_rel_close(actual.double(), expected, rtol=1e-4)


def test_kl_standard_normal_works_in_float32():
    gen = torch.Generator().manual_seed(9)
    mu, log_var = torch.randn(2, 6, 8, generator=gen, dtype=F64)
    actual = kl_standard_normal(mu.float(), log_var.float())
    assert actual.dtype == torch.float32
    _assert_rel_close(actual.double(), kl_standard_normal(mu, log_var), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Errors at the boundary, in words a user can act on.


def test_kl_standard_normal_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape .*got mu \(2, 3\) and log_var \(2, 4\)"):
        kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("mu1", "cov1", "mu2", "cov2", "message"),
    [
        ((3,), (3, 3), (4,), (4, 4), r"same dimension n; got n = 3 and n = 4"),
        ((3,), (4, 4), (3,), (3, 3), r"mu1 has 3 dimensions but cov1 is 4 x 4"),
        ((3,), (3, 4), (3,), (3, 3), r"cov1 a square \[\.\.\., n, n\]"),
        ((2, 3), (2, 3, 3), (5, 3), (3, 3), r"batch dimensions do not broadcast"),
    ],
)
def test_kl_gaussian_rejects_mismatched_shapes(mu1, cov1, mu2, cov2, message):
    def eye(shape):
        return torch.eye(shape[-2], shape[-1]).expand(shape)

    with pytest.raises(ValueError, match=message):
        kl_gaussian(torch.zeros(mu1), eye(cov1), torch.zeros(mu2), eye(cov2))


def test_kl_gaussian_rejects_indefinite_covariance():
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=r"cov2 is not symmetric positive definite.*order 2"):
        kl_gaussian(torch.zeros(2), torch.eye(2), torch.zeros(2), indefinite)


def test_kl_gaussian_rejects_asymmetric_covariance():
    asymmetric = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"cov1 is not symmetric positive definite: .*symmetric"):
        kl_gaussian(torch.zeros(2), asymmetric, torch.zeros(2), torch.eye(2))


@pytest.mark.parametrize(
    "tril", [torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.5, -1.0]])]
)
def test_kl_gaussian_tril_rejects_non_cholesky_factor(tril):
    with pytest.raises(ValueError, match=r"scale_tril2 must be a Cholesky factor"):
        kl_gaussian_tril(torch.zeros(2), torch.eye(2), torch.zeros(2), tril)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_kl_against_the_standard_normal_prior_matches_torch(batch, latent, seed):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, latent, generator=g, dtype=torch.float64) * 3
    scale = torch.exp(torch.randn(batch, latent, generator=g, dtype=torch.float64))
    q = Independent(Normal(loc, scale), 1)
    prior = StandardNormal(torch.zeros(latent, dtype=torch.float64))
    zeros, ones = torch.zeros(latent, dtype=torch.float64), torch.ones(latent, dtype=torch.float64)
    # torch's own Independent-Independent path, the same distribution under its plain type.
    reference = kl_divergence(q, Independent(Normal(zeros, ones), 1))
    assert torch.allclose(kl_divergence(q, prior), reference, rtol=1e-10, atol=1e-12)
    assert torch.allclose(prior.log_prob(loc), Normal(zeros, ones).log_prob(loc).sum(-1))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.floats(0.0, 4.0), st.integers(0, 2**31 - 1))
def test_kl_of_the_diagonal_posterior_from_its_log_variance_matches_torch(
    batch, latent, log_var_scale, seed
):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, latent, generator=g, dtype=torch.float64) * 3
    log_var = torch.randn(batch, latent, generator=g, dtype=torch.float64) * log_var_scale
    q = DiagonalNormal(loc, log_var)
    # The same distribution under torch's plain types, and torch's own KL between them.
    plain = Independent(Normal(loc, torch.exp(0.5 * log_var)), 1)
    zeros, ones = torch.zeros(latent, dtype=torch.float64), torch.ones(latent, dtype=torch.float64)
    reference = kl_divergence(plain, Independent(Normal(zeros, ones), 1))
    prior = StandardNormal(zeros)
    assert torch.allclose(kl_divergence(q, prior), reference, rtol=1e-10, atol=1e-12)
    z = torch.randn(3, batch, latent, generator=g, dtype=torch.float64)
    assert torch.equal(q.log_prob(z), plain.log_prob(z))
    assert q.batch_shape == (batch,) and q.event_shape == (latent,)
    wide = q.expand((2, batch))
    assert isinstance(wide, DiagonalNormal) and wide.batch_shape == (2, batch)
    assert torch.equal(wide.log_prob(z[:2]), plain.expand((2, batch)).log_prob(z[:2]))
