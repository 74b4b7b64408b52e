"""Probabilistic PCA and linear-Gaussian latent variable models in closed form.

The model (factor analysis; isotropic noise ``psi = sigma^2 * 1`` is probabilistic PCA)::

    z ~ N(0, I_k),   x | z ~ N(W z + b, Psi),   Psi = diag(psi),
    x ~ N(b, C),     C = W W^T + Psi.

Every quantity here is exact, which makes the module the oracle that VAE training, the IWAE
bound, AIS and the inference-gap estimates are tested against: a VAE with a linear Gaussian
decoder is exactly this model (Lucas et al., 2019).

Conventions: computations run in torch float64. Inputs may be numpy arrays or tensors; outputs
are always float64 torch tensors on the model's device (a Python ``float`` where a single
number is documented). Data are ``x: [*batch, data]`` and latents ``z: [*batch, latent]`` with
any number of leading batch dimensions; log-densities are nats per example, shape ``[*batch]``.
Gradients flow through the model's methods, so the oracle can also be optimised. The module
deliberately uses nothing from the rest of vaelab (not even ``vaelab.distributions.kl``), so that it stays an
independent check of it.

References:
    M. E. Tipping and C. M. Bishop (1999). Probabilistic principal component analysis.
        J. R. Stat. Soc. B 61(3), 611-622.
    J. Lucas, G. Tucker, R. Grosse and M. Norouzi (2019). Don't blame the ELBO! A linear VAE
        perspective on posterior collapse. NeurIPS.
    C. M. Bishop (2006). Pattern Recognition and Machine Learning, Sec. 12.2. Springer.
    C. Cremer, X. Li and D. Duvenaud (2018). Inference suboptimality in variational
        autoencoders. ICML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy.typing as npt
import torch

__all__ = [
    "DiagonalGaussian",
    "GaussianPosterior",
    "InferenceGaps",
    "LinearGaussianModel",
    "fit_ppca",
    "ppca_max_log_likelihood",
    "random_linear_gaussian",
]

_LOG_2PI = math.log(2.0 * math.pi)

ArrayLike: TypeAlias = torch.Tensor | npt.ArrayLike
"""Anything convertible to a float64 tensor: a tensor, numpy array, nested sequence or number."""


class GaussianPosterior(NamedTuple):
    """Exact posterior p(z | x) = N(mean, covariance); the covariance does not depend on x."""

    mean: torch.Tensor  # [*batch, latent]
    covariance: torch.Tensor  # [latent, latent]


class DiagonalGaussian(NamedTuple):
    """A fully factorised Gaussian q(z) = prod_j N(z_j; mean_j, variance_j)."""

    mean: torch.Tensor  # [*batch, latent]
    variance: torch.Tensor  # [*batch, latent]


class InferenceGaps(NamedTuple):
    """Per-example decomposition of Cremer et al. (2018), all shaped ``[*batch]``.

    ``log_px - elbo_amortised = approximation_gap + amortisation_gap``, where
    ``approximation_gap = log_px - elbo_optimal = KL(q* || p(z|x))`` and
    ``amortisation_gap = elbo_optimal - elbo_amortised``.
    """

    log_px: torch.Tensor
    elbo_optimal: torch.Tensor
    elbo_amortised: torch.Tensor
    approximation_gap: torch.Tensor
    amortisation_gap: torch.Tensor


class _Whitened(NamedTuple):
    """Quantities shared by every closed form, all in the noise-whitened frame."""

    inv_sqrt_psi: torch.Tensor  # [data]       Psi^{-1/2}
    scaled_weight: torch.Tensor  # [data, latent] A = Psi^{-1/2} W
    precision: torch.Tensor  # [latent, latent] M = I + W^T Psi^{-1} W = Sigma^{-1}
    precision_chol: torch.Tensor  # [latent, latent] lower Cholesky factor of M


def _as_float64(value: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Convert a numpy array, tensor or nested sequence to a float64 tensor (keeps autograd)."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a numeric array or tensor, got {type(value)!r}") from error
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


@dataclass(frozen=True, eq=False, init=False)
class LinearGaussianModel:
    """z ~ N(0, I_k), x | z ~ N(W z + b, diag(noise_var)); marginally x ~ N(b, W W^T + Psi).

    Args:
        weight: W, ``[data, latent]``.
        bias: b, ``[data]``.
        noise_var: the diagonal psi of Psi, ``[data]``; a scalar gives isotropic pPCA noise.

    Array-likes (numpy, sequences) are accepted and stored as float64 tensors on ``weight``'s
    device; tensors that require grad stay in the autograd graph. The instance is immutable.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    noise_var: torch.Tensor

    def __init__(self, weight: ArrayLike, bias: ArrayLike, noise_var: ArrayLike) -> None:
        # A hand-written __init__ so the accepted types (array-likes) can differ from the
        # stored ones (float64 tensors); the dataclass still provides repr and fields().
        weight = _as_float64(weight, "weight")
        if weight.ndim != 2:
            raise ValueError(f"weight must have shape [data, latent], got {tuple(weight.shape)}")
        d = weight.shape[0]
        bias = _as_float64(bias, "bias", weight.device)
        if bias.shape != (d,):
            raise ValueError(f"bias must have shape [data] = ({d},), got {tuple(bias.shape)}")
        noise_var = _as_float64(noise_var, "noise_var", weight.device)
        if noise_var.ndim == 0:
            noise_var = noise_var.expand(d).clone()
        if noise_var.shape != (d,):
            raise ValueError(
                f"noise_var must be a scalar or have shape [data] = ({d},), "
                f"got {tuple(noise_var.shape)}"
            )
        if not bool((noise_var > 0).all()):
            raise ValueError("noise_var must be strictly positive in every dimension")
        # frozen dataclass: the only writes happen here
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "noise_var", noise_var)

    @property
    def data_dim(self) -> int:
        """d, the number of observed dimensions."""
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        """k, the number of latent dimensions."""
        return self.weight.shape[1]

    def covariance(self) -> torch.Tensor:
        """Marginal covariance C = W W^T + Psi, ``[data, data]``."""
        return self.weight @ self.weight.T + torch.diag(self.noise_var)

    # ------------------------------------------------------------------ helpers

    def _whitened(self) -> _Whitened:
        inv_sqrt_psi = self.noise_var.rsqrt()
        scaled_weight = self.weight * inv_sqrt_psi[:, None]
        eye = torch.eye(self.latent_dim, dtype=torch.float64, device=self.weight.device)
        precision = eye + scaled_weight.T @ scaled_weight
        # M >= I (eigenvalues at least 1), so the Cholesky factorisation cannot fail.
        return _Whitened(inv_sqrt_psi, scaled_weight, precision, torch.linalg.cholesky(precision))

    def _check_data(self, x: ArrayLike) -> torch.Tensor:
        x = _as_float64(x, "x", self.weight.device)
        if x.ndim == 0 or x.shape[-1] != self.data_dim:
            raise ValueError(
                f"x must have shape [*batch, data] with data = {self.data_dim}, "
                f"got {tuple(x.shape)}"
            )
        return x

    def _posterior_mean(self, whitened_residual: torch.Tensor, w: _Whitened) -> torch.Tensor:
        """mu = M^{-1} A^T u for u = Psi^{-1/2}(x - b): ``[*batch, data] -> [*batch, latent]``."""
        rhs = whitened_residual @ w.scaled_weight  # [*batch, latent]
        flat = rhs.reshape(-1, self.latent_dim).T  # [latent, N]
        return torch.cholesky_solve(flat, w.precision_chol).T.reshape(rhs.shape)

    # ------------------------------------------------------------------ public API

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` joint samples; returns ``(x [n, data], z [n, latent])``."""
        options: dict[str, Any] = {"dtype": torch.float64, "device": self.weight.device}
        z = torch.randn(n, self.latent_dim, generator=generator, **options)
        noise = torch.randn(n, self.data_dim, generator=generator, **options)
        x = self.bias + z @ self.weight.T + noise * self.noise_var.sqrt()
        return x, z

    def log_marginal(self, x: ArrayLike) -> torch.Tensor:
        """Exact log p(x) = log N(x; b, W W^T + Psi): ``[*batch, data] -> [*batch]``.

        Computed in O(d k^2 + k^3) without forming C. With u = Psi^{-1/2}(x - b),
        A = Psi^{-1/2} W, M = I + A^T A and the posterior mean mu = M^{-1} A^T u,

            log|C|       = sum_i log psi_i + log|M|                (matrix determinant lemma)
            r^T C^{-1} r = ||u - A mu||^2 + ||mu||^2               (Woodbury identity)
            log p(x)     = -1/2 [d log 2 pi + log|C| + r^T C^{-1} r].

        This is Bayes' rule evaluated at z = mu:
        log p(x) = log p(x | mu) + log p(mu) - log p(mu | x). The quadratic form is a sum of
        two squares rather than the textbook difference ``u^T u - u^T A M^{-1} A^T u``, so it
        suffers no cancellation when the noise is small; log|M| comes from its Cholesky factor.
        Tipping & Bishop (1999); Bishop (2006), eq. (12.44).
        """
        x = self._check_data(x)
        w = self._whitened()
        u = (x - self.bias) * w.inv_sqrt_psi
        mu = self._posterior_mean(u, w)
        quadratic = (u - mu @ w.scaled_weight.T).square().sum(-1) + mu.square().sum(-1)
        log_det = self.noise_var.log().sum() + 2.0 * w.precision_chol.diagonal().log().sum()
        return -0.5 * (self.data_dim * _LOG_2PI + log_det + quadratic)

    def posterior(self, x: ArrayLike) -> GaussianPosterior:
        """Exact p(z | x) = N(Sigma W^T Psi^{-1} (x - b), Sigma), Sigma = (I + W^T Psi^{-1} W)^{-1}.

        Returns ``GaussianPosterior(mean [*batch, latent], covariance [latent, latent])``.
        Tipping & Bishop (1999) and Bishop (2006), Sec. 12.2, with sigma^2 I replaced by Psi.
        """
        x = self._check_data(x)
        w = self._whitened()
        mean = self._posterior_mean((x - self.bias) * w.inv_sqrt_psi, w)
        covariance = torch.cholesky_inverse(w.precision_chol)
        return GaussianPosterior(mean, covariance)

    def elbo(
        self,
        x: ArrayLike,
        q_mean: ArrayLike,
        *,
        q_var: ArrayLike | None = None,
        q_cov: ArrayLike | None = None,
    ) -> torch.Tensor:
        """Exact ELBO of a Gaussian q(z) = N(m, S): ``E_q[log p(x|z)] - KL(q || N(0, I))``.

        Pass exactly one of ``q_var`` (diagonal variances, ``[*batch, latent]`` or ``[latent]``)
        or ``q_cov`` (full covariance, ``[*batch, latent, latent]`` or ``[latent, latent]``);
        ``q_mean`` is ``[*batch, latent]``. Returns ``[*batch]``. Both expectations are Gaussian
        integrals, as in the linear VAE analysis of Lucas et al. (2019):

            E_q[log N(x; W z + b, Psi)] = log N(x; W m + b, Psi) - 1/2 tr(Psi^{-1} W S W^T)
            KL(N(m, S) || N(0, I))      = 1/2 [tr S + m^T m - k - log|S|].
        """
        x = self._check_data(x)
        device = self.weight.device
        k = self.latent_dim
        mean = _as_float64(q_mean, "q_mean", device)
        if mean.ndim == 0 or mean.shape[-1] != k:
            raise ValueError(
                f"q_mean must have shape [*batch, latent] with latent = {k}, "
                f"got {tuple(mean.shape)}"
            )
        w = self._whitened()
        gram = w.scaled_weight.T @ w.scaled_weight  # W^T Psi^{-1} W, [latent, latent]
        if q_var is not None and q_cov is None:
            var = _as_float64(q_var, "q_var", device)
            if var.ndim == 0 or var.shape[-1] != k:
                raise ValueError(
                    f"q_var must have shape [*batch, latent] with latent = {k}, "
                    f"got {tuple(var.shape)}"
                )
            if not bool((var > 0).all()):
                raise ValueError("q_var must be strictly positive")
            trace_term = (var * gram.diagonal()).sum(-1)
            trace_s = var.sum(-1)
            log_det_s = var.log().sum(-1)
        elif q_cov is not None and q_var is None:
            cov = _as_float64(q_cov, "q_cov", device)
            if cov.ndim < 2 or cov.shape[-2:] != (k, k):
                raise ValueError(
                    f"q_cov must have shape [*batch, latent, latent] with latent = {k}, "
                    f"got {tuple(cov.shape)}"
                )
            chol, info = torch.linalg.cholesky_ex(cov)
            if bool((info != 0).any()) or not torch.allclose(cov, cov.mT):
                raise ValueError("q_cov must be symmetric positive definite")
            trace_term = (cov * gram).sum((-2, -1))
            trace_s = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
            log_det_s = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        else:
            raise ValueError("pass exactly one of q_var (diagonal) or q_cov (full covariance)")
        residual = (x - self.bias - mean @ self.weight.T) * w.inv_sqrt_psi
        expected_log_lik = -0.5 * (
            self.data_dim * _LOG_2PI
            + self.noise_var.log().sum()
            + residual.square().sum(-1)
            + trace_term
        )
        kl = 0.5 * (trace_s + mean.square().sum(-1) - k - log_det_s)
        return expected_log_lik - kl

    def optimal_diagonal_q(self, x: ArrayLike) -> DiagonalGaussian:
        """Best fully factorised Gaussian q* = argmin_q KL(q || p(z|x)).

        Returns ``DiagonalGaussian(mean [*batch, latent], variance [*batch, latent])`` with
        ``mean`` the exact posterior mean and ``variance_j = 1 / M_jj``, M = Sigma^{-1} =
        I + W^T Psi^{-1} W the posterior precision. Derivation: for q = N(m, diag(s)),

            KL(q || N(mu, Sigma)) = 1/2 [sum_j M_jj s_j + (m - mu)^T M (m - mu) - k
                                         - sum_j log s_j - log|M|],

        minimised at m = mu (M is positive definite) and, from dKL/ds_j = (M_jj - 1/s_j)/2 = 0,
        at s_j = 1 / M_jj: reverse-KL mean field matches the diagonal of the *precision*, so it
        under-estimates the marginal variances Sigma_jj >= 1 / M_jj.
        """
        x = self._check_data(x)
        w = self._whitened()
        mean = self._posterior_mean((x - self.bias) * w.inv_sqrt_psi, w)
        variance = w.precision.diagonal().reciprocal().expand(mean.shape).clone()
        return DiagonalGaussian(mean, variance)

    def approximation_gap(self, family: Literal["diagonal", "full"] = "diagonal") -> torch.Tensor:
        """log p(x) - max_{q in family} ELBO(q) = KL(q* || p(z|x)), a 0-d tensor, equal for all x.

        For the full-covariance family it is 0 (q* is the posterior). For the diagonal family,
        substituting q* into the KL of :meth:`optimal_diagonal_q` gives

            KL(q* || p(z|x)) = 1/2 [sum_j log M_jj - log|M|]  >= 0    (Hadamard's inequality),

        zero exactly when the posterior precision M = I + W^T Psi^{-1} W is diagonal, i.e. when
        the columns of Psi^{-1/2} W are orthogonal (Lucas et al., 2019). With the
        Cholesky factor M = L L^T, M_jj = L_jj^2 + sum_{i<j} L_ji^2 and log|M| = sum_j log L_jj^2,
        so it is evaluated as

            1/2 sum_j log1p(sum_{i<j} L_ji^2 / L_jj^2),

        a sum of non-negative terms without the cancellation of the first form when the gap
        is small next to log|M|.
        """
        if family not in ("diagonal", "full"):
            raise ValueError(f"family must be 'diagonal' or 'full', got {family!r}")
        if family == "full":
            return self.weight.new_zeros(())
        chol = self._whitened().precision_chol
        off_diagonal = chol.tril(-1).square().sum(-1)  # sum_{i<j} L_ji^2, [latent]
        return 0.5 * torch.log1p(off_diagonal / chol.diagonal().square()).sum()

    def inference_gaps(
        self,
        x: ArrayLike,
        q_mean: ArrayLike,
        *,
        q_var: ArrayLike | None = None,
        q_cov: ArrayLike | None = None,
        family: Literal["diagonal", "full"] = "diagonal",
    ) -> InferenceGaps:
        """Split ``log p(x) - ELBO(q_amortised)`` into approximation and amortisation gaps.

        Cremer et al. (2018): with q* the best member of ``family`` for each x,

            approximation gap = log p(x) - ELBO(q*)         = KL(q* || p(z|x))
            amortisation gap  = ELBO(q*) - ELBO(q_amortised) >= 0.

        The amortised q is given as in :meth:`elbo`; it must belong to ``family`` (``q_var``
        for ``"diagonal"``, either for ``"full"``) or the amortisation gap loses its meaning.
        The approximation gap is the closed form of :meth:`approximation_gap`, so it is exactly
        0 for ``"full"`` and never negative. Every field is ``[*batch]``.
        """
        if family not in ("diagonal", "full"):
            raise ValueError(f"family must be 'diagonal' or 'full', got {family!r}")
        if family == "diagonal" and q_cov is not None:
            raise ValueError(
                "family='diagonal' needs the amortised q as q_var; a full-covariance q is not "
                "in the diagonal family (use family='full')"
            )
        log_px = self.log_marginal(x)
        elbo_amortised = self.elbo(x, q_mean, q_var=q_var, q_cov=q_cov)
        approximation_gap = self.approximation_gap(family).expand(log_px.shape).clone()
        elbo_optimal = log_px - approximation_gap
        return InferenceGaps(
            log_px=log_px,
            elbo_optimal=elbo_optimal,
            elbo_amortised=elbo_amortised,
            approximation_gap=approximation_gap,
            amortisation_gap=elbo_optimal - elbo_amortised,
        )


def _ppca_spectrum(
    x: ArrayLike, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate data; return the sample mean [data], the eigenvalues [data] (decreasing) and
    eigenvectors [data, data] of the sample covariance, and the MLE noise variance []."""
    x = _as_float64(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [batch, data], got {tuple(x.shape)}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"pPCA needs at least 2 examples, got {n}")
    if not 1 <= k < d:
        raise ValueError(f"k must satisfy 1 <= k < data = {d}, got k = {k}")
    mean = x.mean(0)
    centred = x - mean
    sample_cov = centred.T @ centred / n  # maximum likelihood: divide by n, not n - 1
    eigenvalues, eigenvectors = torch.linalg.eigh(sample_cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    noise_var = eigenvalues[k:].mean()
    if not bool(noise_var > 1e-12 * eigenvalues[0].clamp_min(torch.finfo(torch.float64).tiny)):
        raise ValueError(
            f"the data span at most {k} dimensions (the discarded eigenvalues are zero), so the "
            "pPCA maximum-likelihood noise variance is 0 and the likelihood is unbounded; "
            "use a smaller k or more examples"
        )
    return mean, eigenvalues, eigenvectors, noise_var


def fit_ppca(x: ArrayLike, k: int) -> LinearGaussianModel:
    """Maximum-likelihood probabilistic PCA (Tipping & Bishop, 1999; Bishop, 2006, Sec. 12.2.1).

    With S the sample covariance of ``x: [batch, data]`` (divided by n) and eigenpairs
    ``S = U Lambda U^T`` in decreasing order,

        b = mean(x),   sigma^2 = 1/(d - k) sum_{j > k} lambda_j,
        W = U_k (Lambda_k - sigma^2 I)^{1/2} R,   with R = I.

    The eigenvector signs are fixed so that each column's largest-magnitude entry is positive,
    which makes the result deterministic. Returns an isotropic ``LinearGaussianModel``.
    """
    mean, eigenvalues, eigenvectors, noise_var = _ppca_spectrum(x, k)
    d = eigenvalues.shape[0]
    directions = eigenvectors[:, :k]  # [data, k]
    largest = directions.abs().argmax(0)
    signs = directions[largest, torch.arange(k, device=largest.device)].sign()
    # lambda_j >= sigma^2 for j <= k by construction; clamp only guards rounding.
    scales = (eigenvalues[:k] - noise_var).clamp_min(0.0).sqrt()
    return LinearGaussianModel(directions * (signs * scales), mean, noise_var.expand(d).clone())


def ppca_max_log_likelihood(x: ArrayLike, k: int) -> float:
    """Average log-likelihood per example at the pPCA maximum (Tipping & Bishop, 1999).

    At the MLE, C shares S's eigenvectors with eigenvalues lambda_1..lambda_k, sigma^2, ...,
    so tr(C^{-1} S) = d and

        (1/n) log L = -1/2 [d log 2 pi + sum_{j <= k} log lambda_j + (d - k) log sigma^2 + d].

    Equals ``fit_ppca(x, k).log_marginal(x).mean()``, computed from the spectrum alone.
    """
    _, eigenvalues, _, noise_var = _ppca_spectrum(x, k)
    d = eigenvalues.shape[0]
    log_det = eigenvalues[:k].log().sum() + (d - k) * noise_var.log()
    return float(-0.5 * (d * _LOG_2PI + log_det + d))


def random_linear_gaussian(
    data_dim: int,
    latent_dim: int,
    noise_var: ArrayLike = 0.1,
    seed: int = 0,
) -> LinearGaussianModel:
    """A reproducible random model for tests: W_ij ~ N(0, 1), b_i ~ N(0, 1).

    ``noise_var`` is a scalar (isotropic pPCA) or a ``[data]`` array (factor analysis).
    """
    if data_dim < 1 or latent_dim < 1:
        raise ValueError(
            f"data_dim and latent_dim must be positive, got {data_dim} and {latent_dim}"
        )
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(data_dim, latent_dim, generator=generator, dtype=torch.float64)
    bias = torch.randn(data_dim, generator=generator, dtype=torch.float64)
    return LinearGaussianModel(weight, bias, _as_float64(noise_var, "noise_var"))
