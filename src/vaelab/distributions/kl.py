"""Closed-form KL divergences between Gaussians: exact, numerically stable, batched.

Every divergence here is computed in one "whitened" form. With Cholesky factors
``Σ₁ = L₁L₁ᵀ``, ``Σ₂ = L₂L₂ᵀ``, the lower-triangular ``M = L₂⁻¹L₁`` and ``δ = L₂⁻¹(μ₂ − μ₁)``::

    KL(N(μ₁, Σ₁) ‖ N(μ₂, Σ₂))
        = ½ [log(|Σ₂|/|Σ₁|) − n + tr(Σ₂⁻¹Σ₁) + (μ₂ − μ₁)ᵀ Σ₂⁻¹ (μ₂ − μ₁)]
        = ½ [Σᵢ (expm1(sᵢ) − sᵢ) + Σᵢ>ⱼ Mᵢⱼ² + ‖δ‖²],   sᵢ = log Mᵢᵢ² = 2 log(L₁ᵢᵢ / L₂ᵢᵢ),

because ``tr(Σ₂⁻¹Σ₁) = ‖M‖_F²`` and ``log(|Σ₂|/|Σ₁|) = −Σᵢ log Mᵢᵢ²``. Every term of the second line
is non-negative, so nothing cancels: the textbook line subtracts ``n`` from a log-determinant ratio
and a trace of size O(n), which leaves only O(n·ε) absolute accuracy when the KL itself is tiny.
``expm1(s) − s`` equals ``eˢ − 1 − s`` with absolute error O(ε·|s|) rather than O(ε), which keeps
small divergences (q close to p, e.g. collapsed latent units) accurate.

Importing this module registers, with :func:`torch.distributions.kl.kl_divergence`, the Gaussian
pairs torch lacks (PyTorch issue 32406): ``Independent(Normal)`` against ``MultivariateNormal``
and against ``LowRankMultivariateNormal``, both directions. Pairs torch already registers are left
alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    constraints,
)
from torch.distributions.kl import _KL_REGISTRY, register_kl

from vaelab.distributions.normal import DiagonalNormal, StandardNormal

__all__ = ["kl_gaussian", "kl_gaussian_tril", "kl_standard_normal"]


def kl_standard_normal(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, diag exp(log_var)) ‖ N(0, I)), summed over the latent dimension.

    ``KL = ½ Σⱼ (μⱼ² + σⱼ² − log σⱼ² − 1)`` (Kingma & Welling 2014, "Auto-Encoding Variational
    Bayes", Appendix B), evaluated as ``½ Σⱼ (μⱼ² + expm1(log σⱼ²) − log σⱼ²)``: the second form is
    accurate near ``log_var = 0``, where ``σ² − log σ² − 1`` loses its digits to cancellation.

    Args:
        mu: means, ``[..., latent]``.
        log_var: log-variances ``log σ²``, same shape as ``mu``.

    Returns:
        KL in nats, ``[...]``.
    """
    if mu.shape != log_var.shape or mu.dim() == 0:
        raise ValueError(
            "mu and log_var must have the same shape [..., latent]; "
            f"got mu {tuple(mu.shape)} and log_var {tuple(log_var.shape)}"
        )
    return 0.5 * (mu.square() + _expm1_minus_x(log_var)).sum(-1)


def kl_gaussian(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """KL(N(mu1, cov1) ‖ N(mu2, cov2)) for full covariance matrices.

    ``KL = ½ [log(|Σ₂|/|Σ₁|) − n + tr(Σ₂⁻¹Σ₁) + (μ₂ − μ₁)ᵀ Σ₂⁻¹ (μ₂ − μ₁)]``
    (Rasmussen & Williams 2006, "Gaussian Processes for Machine Learning", Appendix A.5),
    computed through Cholesky factors and triangular solves only (see the module docstring);
    no inverse and no determinant is formed.

    Args:
        mu1: the first mean, ``[..., n]``.
        cov1: the first covariance, symmetric positive definite, ``[..., n, n]``.
        mu2: the second mean, ``[..., n]``.
        cov2: the second covariance, symmetric positive definite, ``[..., n, n]``. Batch
            dimensions of all four arguments broadcast against each other.

    Returns:
        KL in nats, ``[...]`` (the broadcast batch shape).

    Raises:
        ValueError: if the shapes do not fit together, or a covariance is not symmetric positive
            definite.
    """
    _check_gaussian_shapes(mu1, cov1, mu2, cov2, "cov")
    scale_tril1 = _cholesky(cov1, "cov1")
    scale_tril2 = _cholesky(cov2, "cov2")
    return _kl_tril(mu1, scale_tril1, mu2, scale_tril2)


def kl_gaussian_tril(mu1: Tensor, scale_tril1: Tensor, mu2: Tensor, scale_tril2: Tensor) -> Tensor:
    """KL(N(mu1, L₁L₁ᵀ) ‖ N(mu2, L₂L₂ᵀ)) from lower Cholesky factors.

    Same formula and source as ``kl_gaussian``, which calls this after factorising.

    Args:
        mu1: the first mean, ``[..., n]``.
        scale_tril1: the first lower-triangular factor with a positive diagonal, ``[..., n, n]``.
        mu2: the second mean, ``[..., n]``.
        scale_tril2: the second factor, likewise. Batch dimensions of all four arguments
            broadcast.

    Returns:
        KL in nats, ``[...]`` (the broadcast batch shape).

    Raises:
        ValueError: if the shapes do not fit together, or a factor is not lower triangular with a
            positive diagonal.
    """
    _check_gaussian_shapes(mu1, scale_tril1, mu2, scale_tril2, "scale_tril")
    for name, factor in (("scale_tril1", scale_tril1), ("scale_tril2", scale_tril2)):
        if not bool(constraints.lower_cholesky.check(factor).all()):
            raise ValueError(
                f"{name} must be a Cholesky factor: lower triangular with a strictly positive "
                "diagonal (use torch.linalg.cholesky(cov), or kl_gaussian with the covariance)"
            )
    return _kl_tril(mu1, scale_tril1, mu2, scale_tril2)


# ----------------------------------------------------------------------------------------------
# The whitened form shared by every function and registration in this module.


def _expm1_minus_x(s: Tensor) -> Tensor:
    """``eˢ − 1 − s ≥ 0``: absolute error O(ε·|s|) near ``s = 0`` instead of O(ε)."""
    return torch.expm1(s) - s


def _kl_whitened(log_diag_ratio_sq: Tensor, m: Tensor, delta: Tensor) -> Tensor:
    """``½ [Σᵢ (expm1(sᵢ) − sᵢ) + Σᵢ>ⱼ mᵢⱼ² + ‖δ‖²]``, see the module docstring.

    Args:
        log_diag_ratio_sq: ``sᵢ = 2 log(L₁ᵢᵢ / L₂ᵢᵢ)``, ``[..., n]``.
        m: ``L₂⁻¹L₁``, ``[..., n, n]``; only its strictly lower triangle is read.
        delta: ``L₂⁻¹(μ₂ − μ₁)``, ``[..., n]``.
    """
    diagonal = _expm1_minus_x(log_diag_ratio_sq).sum(-1)
    off_diagonal = torch.tril(m, diagonal=-1).square().sum((-2, -1))
    return 0.5 * (diagonal + off_diagonal + delta.square().sum(-1))


def _kl_tril(mu1: Tensor, scale_tril1: Tensor, mu2: Tensor, scale_tril2: Tensor) -> Tensor:
    """Unchecked core of :func:`kl_gaussian_tril`; shapes ``[..., n]`` and ``[..., n, n]``."""
    m = torch.linalg.solve_triangular(scale_tril2, scale_tril1, upper=False)
    delta = torch.linalg.solve_triangular(
        scale_tril2, (mu2 - mu1).unsqueeze(-1), upper=False
    ).squeeze(-1)
    diag1 = scale_tril1.diagonal(dim1=-2, dim2=-1)
    diag2 = scale_tril2.diagonal(dim1=-2, dim2=-1)
    # log of the ratio, not a difference of logs: error O(ε) whatever the scale of the factors.
    return _kl_whitened(2.0 * torch.log(diag1 / diag2), m, delta)


def _kl_tril_vs_diag(mu1: Tensor, scale_tril1: Tensor, mu2: Tensor, scale2: Tensor) -> Tensor:
    """KL(N(mu1, L₁L₁ᵀ) ‖ N(mu2, diag scale2²)): with a diagonal L₂ the solves are divisions."""
    m = scale_tril1 / scale2.unsqueeze(-1)
    delta = (mu2 - mu1) / scale2
    diag1 = scale_tril1.diagonal(dim1=-2, dim2=-1)
    return _kl_whitened(2.0 * torch.log(diag1 / scale2), m, delta)


# ----------------------------------------------------------------------------------------------
# Boundary checks.


def _check_gaussian_shapes(
    mu1: Tensor, mat1: Tensor, mu2: Tensor, mat2: Tensor, mat_name: str
) -> None:
    for i, mu, mat in ((1, mu1, mat1), (2, mu2, mat2)):
        if mu.dim() < 1 or mat.dim() < 2 or mat.shape[-1] != mat.shape[-2]:
            raise ValueError(
                f"mu{i} must be [..., n] and {mat_name}{i} a square [..., n, n]; "
                f"got mu{i} {tuple(mu.shape)} and {mat_name}{i} {tuple(mat.shape)}"
            )
        if mu.shape[-1] != mat.shape[-1]:
            raise ValueError(
                f"mu{i} has {mu.shape[-1]} dimensions but {mat_name}{i} is "
                f"{mat.shape[-2]} x {mat.shape[-1]}; they must describe the same n"
            )
    if mu1.shape[-1] != mu2.shape[-1]:
        raise ValueError(
            "both Gaussians must have the same dimension n; "
            f"got n = {mu1.shape[-1]} and n = {mu2.shape[-1]}"
        )
    try:
        torch.broadcast_shapes(mu1.shape[:-1], mat1.shape[:-2], mu2.shape[:-1], mat2.shape[:-2])
    except RuntimeError:
        raise ValueError(
            "batch dimensions do not broadcast: "
            f"mu1 {tuple(mu1.shape)}, {mat_name}1 {tuple(mat1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, {mat_name}2 {tuple(mat2.shape)}"
        ) from None


def _cholesky(cov: Tensor, name: str) -> Tensor:
    """Lower Cholesky factor of ``cov``, or a ValueError a user can act on."""
    # Cholesky reads only the lower triangle; refuse a matrix whose upper triangle says otherwise.
    # The tolerance, √ε relative to the largest entry, is far above the rounding left by
    # computing a covariance as A Aᵀ or Q diag(λ) Qᵀ, and far below a genuine asymmetry.
    asymmetry = (cov - cov.mT).abs().amax((-2, -1))
    size = cov.abs().amax((-2, -1))
    tolerance = torch.finfo(cov.dtype).eps ** 0.5
    if bool((asymmetry > tolerance * size).any()):
        raise ValueError(
            f"{name} is not symmetric positive definite: it is not symmetric "
            f"(largest |{name} - {name}ᵀ| entry is {float(asymmetry.max()):.3g}); "
            "symmetrise it, e.g. (C + C.mT) / 2"
        )
    factor, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        flat_info = info.reshape(-1)
        failed = int(torch.nonzero(flat_info)[0, 0])
        raise ValueError(
            f"{name} is not symmetric positive definite: its Cholesky factorisation failed "
            f"(leading minor of order {int(flat_info[failed])} is not positive, "
            f"at flat batch index {failed}); check for zero or negative variances, or add "
            "a small multiple of the identity"
        )
    return factor


# ----------------------------------------------------------------------------------------------
# Registrations with torch.distributions.kl_divergence.


def _diagonal_normal(d: Independent) -> tuple[Tensor, Tensor]:
    """``(loc, scale)`` of an ``Independent(Normal, 1)``; other cases have no closed form here."""
    base = d.base_dist
    if not isinstance(base, Normal) or d.reinterpreted_batch_ndims != 1:
        # NotImplementedError is kl_divergence's signal to fall back to a Monte Carlo estimate.
        raise NotImplementedError(
            "closed-form KL against a multivariate normal is only registered for "
            "Independent(Normal(loc, scale), 1); got Independent("
            f"{type(base).__name__}, {d.reinterpreted_batch_ndims})"
        )
    return base.loc, base.scale


def _check_event_shapes(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"KL between {type(p).__name__} and {type(q).__name__} needs equal event shapes; "
            f"got {tuple(p.event_shape)} and {tuple(q.event_shape)}"
        )


_FullGaussian = MultivariateNormal | LowRankMultivariateNormal


def _kl_independent_full(p: Independent, q: _FullGaussian) -> Tensor:
    loc, scale = _diagonal_normal(p)  # before the event check: unsupported means NotImplemented
    _check_event_shapes(p, q)
    # A diagonal L₁ costs one dense n x n right-hand side, the size of M = L₂⁻¹L₁ anyway.
    # LowRankMultivariateNormal.scale_tril is a dense n x n factor: fine for VAE latent sizes.
    return _kl_tril(loc, torch.diag_embed(scale), q.loc, q.scale_tril)


def _kl_full_independent(p: _FullGaussian, q: Independent) -> Tensor:
    loc, scale = _diagonal_normal(q)
    _check_event_shapes(p, q)
    return _kl_tril_vs_diag(p.loc, p.scale_tril, loc, scale)


def _kl_diagonal_standard_normal(p: Independent, q: StandardNormal) -> Tensor:
    loc, scale = _diagonal_normal(p)
    _check_event_shapes(p, q)
    return kl_standard_normal(loc, 2.0 * scale.log())


def _kl_posterior_standard_normal(p: DiagonalNormal, q: StandardNormal) -> Tensor:
    _check_event_shapes(p, q)
    return kl_standard_normal(p.base_dist.loc, p.log_var)


_REGISTRATIONS: tuple[tuple[type[Distribution], type[Distribution], Callable[..., Tensor]], ...] = (
    (Independent, StandardNormal, _kl_diagonal_standard_normal),
    (DiagonalNormal, StandardNormal, _kl_posterior_standard_normal),
    (Independent, MultivariateNormal, _kl_independent_full),
    (MultivariateNormal, Independent, _kl_full_independent),
    (Independent, LowRankMultivariateNormal, _kl_independent_full),
    (LowRankMultivariateNormal, Independent, _kl_full_independent),
)

for _p_type, _q_type, _kl_fn in _REGISTRATIONS:
    # A pair that torch (or anyone earlier) already registers keeps its implementation.
    if (_p_type, _q_type) not in _KL_REGISTRY:
        register_kl(_p_type, _q_type)(_kl_fn)
