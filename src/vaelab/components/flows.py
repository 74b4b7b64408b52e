"""Flow posteriors: q(z|x) as a diagonal Gaussian pushed through K invertible maps.

    z₀ = μ + σ ⊙ ε,  ε ~ N(0, I);     z_k = f_k(z_{k−1}),  k = 1 … K;     z = z_K,

    log q(z_K) = log N(z₀; μ, diag σ²) − Σₖ log |det ∂f_k/∂z_{k−1}|

(Rezende & Mohamed 2015, "Variational inference with normalizing flows", eq. (7)). Sampling runs the
maps forwards and adds up their log-determinants on the way, so a sample and its exact log-density
come from one pass with no inverse (:meth:`FlowDistribution.rsample_and_log_prob`, distrax's
``forward_and_log_det`` idea). ``log_prob`` of the tensor the distribution itself produced last is
that cached number (keyed on the tensor's identity, as torch's transforms cache); of any other value
it runs the maps backwards.

Two families, both amortised (the encoder emits every per-example parameter):

- **planar** (:class:`PlanarFlowDistribution`): f(z) = z + û tanh(wᵀz + b), with (u, w, b) per
  example and layer, û constrained so that ûᵀw > −1 and every encoder output gives an invertible
  map (Rezende & Mohamed 2015, eqs. (10)–(12) and Appendix A.1);
- **IAF** (:class:`IAFDistribution`): z ← m + σ ⊙ (z − m), σ = sigmoid(s), with (m, s) from a MADE
  of z and of a per-example context h (Kingma et al. 2016, "Improved variational inference with
  inverse autoregressive flow", Sec. 4 and Algorithm 1); the MADE weights are shared.

Shapes: parameters carry ``batch_shape [*batch]`` (``[batch]`` for a posterior); samples are
``[*samples, *batch, latent]`` and log-densities ``[*samples, *batch]``.

Each family is also constructible from explicit per-example tensors (:meth:`local_parameters`,
:meth:`with_local_parameters`), which :class:`LocalFlowPosterior` holds as ``nn.Parameter`` for
non-amortised inference (Cremer et al. 2018's q*).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Self, cast

import torch
from torch import nn
from torch.distributions import Distribution, constraints
from torch.nn import functional as F

from vaelab.components.made import MADE, MadeWeights, context_term, made_apply
from vaelab.components.networks import apply_network

__all__ = [
    "DEFAULT_FLOW_STEPS",
    "FlowDistribution",
    "IAFDistribution",
    "IAFPosterior",
    "LocalFlowPosterior",
    "PlanarFlowDistribution",
    "PlanarFlowPosterior",
    "planar_constraint",
    "planar_log_det",
]

DEFAULT_FLOW_STEPS = 4

_LOG_2PI = math.log(2.0 * math.pi)

# m(a) = −1 + softplus(a + log(e − 1)): the appendix's m with its argument shifted so that m(0) = 0.
# See planar_constraint for why.
_M_SHIFT = math.log(math.e - 1.0)

# Initial scale of the encoder's u outputs: û is at most 2‖u‖ (planar_constraint), so a small u
# starts every planar layer near the identity and training starts like the diagonal VAE.
_INITIAL_U_SCALE = 1e-2

# IAF gates start at σ = sigmoid(2) ≈ 0.88: "s_t … sufficiently positive, such as close to +1 or +2"
# (Kingma et al. 2016, Sec. 4), so that each step changes z only a little at first.
_INITIAL_GATE_BIAS = 2.0

_ROOT_ITERATIONS = 200


class FlowDistribution(Distribution, ABC):
    """A base Gaussian N(μ, diag σ²) over ``[latent]`` pushed through K invertible maps.

    ``family`` names the kind of map (``"planar"``, ``"iaf"``): the variational family, in the
    inference gap's words.

    ``loc, log_var: [*batch, latent]``; ``batch_shape [*batch]``, ``event_shape [latent]``.
    Subclasses give the maps (:meth:`forward_and_log_det`, :meth:`inverse_and_log_det`) and the
    per-example parameters (:meth:`local_parameters`, :meth:`with_local_parameters`,
    :meth:`detached`). Every real value of every parameter is a valid flow (the constraints are
    built into the maps), so there is nothing to validate.
    """

    family = "flow"

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, log_var: torch.Tensor) -> None:
        if loc.dim() < 1 or log_var.shape != loc.shape:
            raise ValueError(
                "loc and log_var must have the same shape [*batch, latent]; "
                f"got loc {tuple(loc.shape)} and log_var {tuple(log_var.shape)}"
            )
        self.loc = loc
        self.log_var = log_var
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    # ------------------------------------------------------------------------- the maps
    @abstractmethod
    def forward_and_log_det(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_K = f_K ∘ … ∘ f_1(z₀) and Σₖ log |det ∂f_k/∂z_{k−1}|:
        ``[*samples, *batch, latent] → ([*samples, *batch, latent], [*samples, *batch])``."""

    @abstractmethod
    def inverse_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z₀ with ``forward_and_log_det(z₀)[0] = z``, and the same forward log-determinant
        Σₖ log |det ∂f_k/∂z_{k−1}| at z₀ (the one ``log_prob`` subtracts)."""

    # -------------------------------------------------------------- per-example parameters
    @abstractmethod
    def local_parameters(self) -> dict[str, torch.Tensor]:
        """The per-example tensors (each ``[*batch, …]``) that a non-amortised fit optimises;
        the rest (shared weights) stays as it is."""

    @abstractmethod
    def with_local_parameters(self, **tensors: torch.Tensor) -> Self:
        """The same flow with the per-example tensors named in :meth:`local_parameters` replaced."""

    @abstractmethod
    def detached(self) -> Self:
        """The same distribution with every parameter tensor (shared weights included) detached:
        q with its gradient stopped, for the "sticking the landing" and DReG estimators. Its
        ``log_prob`` of a sample from this distribution runs the inverse (see
        :meth:`log_prob`), differentiable in the sample."""

    # ------------------------------------------------------------------- sampling, density
    def _log_base(self, eps: torch.Tensor) -> torch.Tensor:
        """log N(z₀; μ, diag σ²) from the standardised ε = (z₀ − μ) / σ, summed over latents:
        −½ Σⱼ (εⱼ² + log σⱼ² + log 2π), ``[*samples, *batch]``."""
        return -0.5 * (eps.square() + self.log_var + _LOG_2PI).sum(-1)

    def from_noise(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and log q(z) for given standard normal noise ``eps: [*samples, *batch, latent]``,
        differentiable in every parameter: common random numbers or antithetic pairs, as
        ``vaelab.distributions.sampling.reparameterise`` gives for Gaussians."""
        z0 = self.loc + torch.exp(0.5 * self.log_var) * eps
        z, log_det = self.forward_and_log_det(z0)
        log_q = self._log_base(eps) - log_det
        self._last = (z, log_q)
        return z, log_q

    def rsample_and_log_prob(
        self, sample_shape: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised z ``[*sample_shape, *batch, latent]`` and its exact log q(z)
        ``[*sample_shape, *batch]``, from one forward pass: no inverse."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.from_noise(eps)

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        """Reparameterised z ``[*sample_shape, *batch, latent]``; its log-density is kept, so a
        following ``log_prob`` of this very tensor costs nothing."""
        return self.rsample_and_log_prob(sample_shape)[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log q(value), ``[*samples, *batch]`` for ``value: [*samples, *batch, latent]``.

        The tensor returned by the latest ``rsample`` / ``rsample_and_log_prob`` / ``from_noise``
        gets its log-density from that pass. Any other tensor (a copy or view included: only
        identity is trusted, because a tensor's values may change in place) goes through
        :meth:`inverse_and_log_det`.
        """
        last = self._last
        if last is not None and value is last[0]:
            return last[1]
        z0, log_det = self.inverse_and_log_det(value)
        eps = (z0 - self.loc) * torch.exp(-0.5 * self.log_var)
        log_q = self._log_base(eps) - log_det
        # A preimage beyond the float range (an IAF gate that underflows on the way back) lies
        # where the base density underflowed long before: q(value) is 0 to float precision,
        # where ∞ − ∞ would say NaN.
        return torch.where(torch.isfinite(z0).all(-1), log_q, -math.inf)

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form mean; average samples from rsample instead"
        )

    @property
    @abstractmethod
    def flow_steps(self) -> int:
        """K, the number of maps."""

    def _check_batch(self, name: str, tensor: torch.Tensor, trailing: tuple[int, ...]) -> None:
        expected = (*self.batch_shape, *trailing)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} ([*batch, …] like loc), "
                f"got {tuple(tensor.shape)}"
            )


# ------------------------------------------------------------------------------------- planar
def planar_constraint(u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """û and 1 + ûᵀw for raw ``u, w: [*, latent]``: ``([*, latent], [*])``, with ûᵀw > −1.

    Rezende & Mohamed (2015), Appendix A.1: f(z) = z + û h(wᵀz + b) is invertible when ûᵀw ≥ −1
    (h = tanh), which

        û = u + [m(wᵀu) − wᵀu] w / ‖w‖²,   so that ûᵀw = m(wᵀu),

    enforces for any u, w given m: ℝ → (−1, ∞). The appendix takes m(a) = −1 + softplus(a); here
    m(a) = −1 + softplus(a + log(e − 1)), the same function moved so that m(0) = 0. Both are
    increasing bijections onto (−1, ∞), so the set of maps is the same; the shift adds two things.
    (i) |m(a) − a| ≤ |a| (m(a) − a is 0 at 0 and decreasing), hence ‖û − u‖ ≤ |wᵀu| / ‖w‖ ≤ ‖u‖:
    a small u is a small û, whatever w, so a layer starts near the identity. With the appendix's
    m, u = 0 gives û = (log 2 − 1) w / ‖w‖², a step that grows without bound as w → 0. (ii) w = 0
    is then a plain translation by u h(b) (û = u, ûᵀw = 0) instead of a division by zero.

    The second output, 1 + ûᵀw = softplus(wᵀu + log(e − 1)), is computed from the formula rather
    than from û (which would cancel to ±ε‖w‖‖u‖ when wᵀu ≪ −1) and kept at least the smallest
    positive float, so that the determinant of :func:`planar_log_det` is positive in floating
    point too.
    """
    wu = (w * u).sum(-1)  # [*]
    one_plus_m = F.softplus(wu + _M_SHIFT).clamp_min(torch.finfo(wu.dtype).tiny)
    w_sq = (w * w).sum(-1)
    nonzero = w_sq > 0
    coefficient = torch.where(nonzero, (one_plus_m - 1.0 - wu) / torch.where(nonzero, w_sq, 1.0), 0)
    u_hat = u + coefficient.unsqueeze(-1) * w
    return u_hat, torch.where(nonzero, one_plus_m, torch.ones_like(one_plus_m))


def planar_log_det(a: torch.Tensor, one_plus_m: torch.Tensor) -> torch.Tensor:
    """log |det ∂f/∂z| = log(1 + ûᵀψ(z)) of a planar layer at pre-activation a = wᵀz + b.

    Rezende & Mohamed (2015), eqs. (11)–(12): ψ(z) = h′(a) w, det = 1 + h′(a) ûᵀw with
    h′ = 1 − tanh² = sech². Written as

        1 + sech²(a) m = tanh²(a) + sech²(a) (1 + m) = [(1 − e)² + 4 e (1 + m)] / (1 + e)²,
        e = exp(−2|a|),

    a sum of non-negative terms: the textbook 1 + sech²(a) m cancels to nothing where m → −1 and
    a → 0. ``1 − e`` is ``−expm1(−2|a|)``, exact for small |a|. Shapes broadcast: ``a: [*s, *b]``,
    ``one_plus_m: [*b]``.
    """
    e = torch.exp(-2.0 * a.abs())
    return torch.log(
        torch.expm1(-2.0 * a.abs()).square() + 4.0 * e * one_plus_m
    ) - 2.0 * torch.log1p(e)


@torch.library.custom_op("vaelab::planar_root_value", mutates_args=())
def _planar_root_value(
    c: torch.Tensor, b: torch.Tensor, m: torch.Tensor, one_plus_m: torch.Tensor
) -> torch.Tensor:
    """The root α of :func:`_planar_root`, without gradients: Newton steps kept inside a shrinking
    bracket, bisection where a step would leave it or would not halve the step before (Press et
    al., "Numerical Recipes", ``rtsafe``), until α is known to float precision.

    One operation to ``torch.compile`` (``--compile``), a custom op whose output is shaped like
    its broadcast inputs: the loop stops as soon as every root has converged, a test on data that
    TorchDynamo cannot trace. Traced, it split the graph at every iteration, which took tens of
    seconds and printed a 27-line graph-break warning; kept out with ``torch.compiler.disable``,
    it still split the graph around each call. As an opaque operation the graph stays whole, and
    the differentiable Newton step after it is compiled with the rest.
    """
    lo, hi = c - m.abs(), c + m.abs()
    alpha = c.clone()
    previous = hi - lo  # the size of the step before
    eps = torch.finfo(c.dtype).eps
    for _ in range(_ROOT_ITERATIONS):
        residual = alpha + m * torch.tanh(alpha + b) - c
        lo = torch.where(residual < 0, alpha, lo)
        hi = torch.where(residual > 0, alpha, hi)
        step = residual / planar_log_det(alpha + b, one_plus_m).exp()
        newton = alpha - step
        # Newton where it lands inside the bracket and at least halves the step before;
        # else bisection. Without the second condition Newton can swing from one side of the
        # root to the other where tanh bends, shrinking the bracket by a little each time.
        fast = (newton > lo) & (newton < hi) & (2.0 * step.abs() <= previous)
        following = torch.where(fast, newton, 0.5 * (lo + hi))
        previous = (following - alpha).abs()
        # Converged when a step moves α by at most one unit in its last place, or the bracket
        # is down to neighbouring floats. Relative to |α|, not 1 + |α|: û may be ~10⁶ times
        # larger than α, and z = y − û tanh(α + b) needs α's every digit.
        size = torch.maximum(following.abs(), alpha.abs())
        done = ((following - alpha).abs() <= eps * size) | (
            hi - lo <= eps * torch.maximum(lo.abs(), hi.abs())
        )
        alpha = following
        if bool(done.all()):
            break
    return alpha


@_planar_root_value.register_fake
def _planar_root_shape(
    c: torch.Tensor, b: torch.Tensor, m: torch.Tensor, one_plus_m: torch.Tensor
) -> torch.Tensor:
    """What tracing sees of :func:`_planar_root_value`: a tensor of the broadcast shape."""
    shape = torch.broadcast_shapes(c.shape, b.shape, m.shape, one_plus_m.shape)
    return c.new_empty(shape)


def _planar_root(
    c: torch.Tensor, b: torch.Tensor, m: torch.Tensor, one_plus_m: torch.Tensor
) -> torch.Tensor:
    """The α with g(α) = α + m tanh(α + b) = c, for a planar inverse along w (α = wᵀz).

    g′(α) = 1 + m sech²(α + b) > 0 for m > −1, so g is strictly increasing, and |tanh| < 1 puts
    the single root in [c − |m|, c + |m|] (Rezende & Mohamed 2015, Appendix A.1). The root is
    found to float precision without gradients (:func:`_planar_root_value`). Then the gradient of
    one Newton step from the root: the implicit-function derivative −(∂g/∂θ) / g′, exact at the
    root, attached to the root's value.
    """
    alpha = _planar_root_value(c.detach(), b.detach(), m.detach(), one_plus_m.detach())
    residual = alpha + m * torch.tanh(alpha + b) - c
    # Only the gradient of this step is wanted: its value, a rounding-level residual over a slope
    # that may be tiny where the layer is nearly singular, is dropped, so the root stays the
    # bracketed one.
    step = residual / planar_log_det(alpha + b, one_plus_m).exp()
    return alpha - (step - step.detach())


class PlanarFlowDistribution(FlowDistribution):
    """K planar layers f_k(z) = z + û_k tanh(w_kᵀz + b_k) on N(μ, diag σ²), every parameter per
    example (Rezende & Mohamed 2015, Sec. 4.1).

    Raw, unconstrained parameters: ``loc, log_var: [*batch, latent]``, ``u, w: [*batch, K,
    latent]``, ``b: [*batch, K]``; û_k comes from :func:`planar_constraint`, so every value is an
    invertible flow. The inverse solves one scalar equation per layer (:func:`_planar_root`);
    it is exact to float precision except where a layer is nearly singular (1 + ûᵀψ ≈ 0), where
    any inverse loses digits in proportion to 1 / (1 + ûᵀψ).
    """

    family = "planar"

    def __init__(
        self,
        loc: torch.Tensor,
        log_var: torch.Tensor,
        u: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor,
    ) -> None:
        super().__init__(loc, log_var)
        steps = b.shape[-1] if b.dim() > 0 else 0
        latent = self.event_shape[0]
        self._check_batch("u", u, (steps, latent))
        self._check_batch("w", w, (steps, latent))
        self._check_batch("b", b, (steps,))
        self.u, self.w, self.b = u, w, b
        self.u_hat, self.one_plus_m = planar_constraint(u, w)  # [*batch, K, latent], [*batch, K]

    @property
    def flow_steps(self) -> int:
        return int(self.b.shape[-1])

    def _layer(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """û_k, w_k ``[*batch, latent]`` and b_k, 1 + m_k ``[*batch]``."""
        return self.u_hat[..., k, :], self.w[..., k, :], self.b[..., k], self.one_plus_m[..., k]

    def forward_and_log_det(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = z0, z0.new_zeros(z0.shape[:-1])
        for k in range(self.flow_steps):
            u_hat, w, b, one_plus_m = self._layer(k)
            a = (z * w).sum(-1) + b  # [*samples, *batch]
            log_det = log_det + planar_log_det(a, one_plus_m)
            z = z + u_hat * torch.tanh(a).unsqueeze(-1)
        return z, log_det

    def inverse_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = z.new_zeros(z.shape[:-1])
        for k in reversed(range(self.flow_steps)):
            u_hat, w, b, one_plus_m = self._layer(k)
            # wᵀ f(z) = wᵀz + m tanh(wᵀz + b): the layer moves z along û only, so wᵀz (one
            # number) fixes the preimage: z = y − û tanh(wᵀz + b).
            alpha = _planar_root((z * w).sum(-1), b, one_plus_m - 1.0, one_plus_m)
            a = alpha + b
            log_det = log_det + planar_log_det(a, one_plus_m)
            z = z - u_hat * torch.tanh(a).unsqueeze(-1)
        return z, log_det

    def local_parameters(self) -> dict[str, torch.Tensor]:
        return {"loc": self.loc, "log_var": self.log_var, "u": self.u, "w": self.w, "b": self.b}

    def with_local_parameters(self, **tensors: torch.Tensor) -> Self:
        return type(self)(**{**self.local_parameters(), **tensors})

    def detached(self) -> Self:
        return self.with_local_parameters(
            **{name: t.detach() for name, t in self.local_parameters().items()}
        )

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> Self:
        shape = torch.Size(batch_shape)
        latent, steps = self.event_shape[0], self.flow_steps
        return type(self)(
            self.loc.expand(*shape, latent),
            self.log_var.expand(*shape, latent),
            self.u.expand(*shape, steps, latent),
            self.w.expand(*shape, steps, latent),
            self.b.expand(*shape, steps),
        )


# ---------------------------------------------------------------------------------------- IAF
class IAFDistribution(FlowDistribution):
    """K inverse autoregressive flow steps on N(μ, diag σ²) (Kingma et al. 2016, Algorithm 1):

        [m, s] = MADE_k(z, h),   σ = sigmoid(s),   z ← σ ⊙ z + (1 − σ) ⊙ m,
        log |det ∂z_k/∂z_{k−1}| = Σᵢ log σᵢ,

    the Jacobian being triangular because mᵢ, sᵢ depend on z_{<i} only. Written m + σ ⊙ (z − m),
    the same convex combination. Odd steps run in the reversed variable order (a permutation,
    log-determinant 0, before and after the step), so that consecutive steps condition in
    opposite directions and z_K's coordinates stay aligned with the base's (μⱼ, σⱼ).

    ``loc, log_var: [*batch, latent]`` and the context ``h: [*batch, C]`` are per example;
    ``steps`` holds each step's shared :class:`~vaelab.components.made.MadeWeights`. The inverse is exact:
    per step, D passes of the MADE, the i-th of which solves coordinate i (in the step's order).
    Where σ is tiny the preimage is far out, and beyond the float range ``log_prob`` says −∞.
    """

    family = "iaf"
    # log_prob of a value it did not draw runs D sequential passes of the MADE per step.
    cheap_log_prob_anywhere = False

    def __init__(
        self,
        loc: torch.Tensor,
        log_var: torch.Tensor,
        context: torch.Tensor,
        steps: Sequence[MadeWeights],
    ) -> None:
        super().__init__(loc, log_var)
        if context.dim() < 1:
            raise ValueError(f"context must have shape [*batch, C], got {tuple(context.shape)}")
        self._check_batch("context", context, (context.shape[-1],))
        self.context = context
        self.steps = tuple(steps)
        # The context's share of each MADE's first layer, computed once for all samples.
        self._context_terms = [context_term(weights, context) for weights in self.steps]

    @property
    def flow_steps(self) -> int:
        return len(self.steps)

    def _shift_and_gate(self, k: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m and s ``[*samples, *batch, latent]`` of step k at z, in z's own variable order."""
        reverse = k % 2 == 1
        x = z.flip(-1) if reverse else z
        m, s = made_apply(self.steps[k], x, self._context_terms[k]).chunk(2, dim=-1)
        return (m.flip(-1), s.flip(-1)) if reverse else (m, s)

    def forward_and_log_det(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = z0, z0.new_zeros(z0.shape[:-1])
        for k in range(self.flow_steps):
            m, s = self._shift_and_gate(k, z)
            z = m + torch.sigmoid(s) * (z - m)
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return z, log_det

    def inverse_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.event_shape[0]
        log_det = z.new_zeros(z.shape[:-1])
        for k in reversed(range(self.flow_steps)):
            # Each coordinate's rank in step k's autoregressive order.
            rank = torch.arange(latent, device=z.device)
            rank = rank.flip(0) if k % 2 == 1 else rank
            previous = torch.zeros_like(z)
            for p in range(latent):
                # z_prev = m + (z − m) / σ, with m, s from the coordinates solved so far: pass p
                # solves the coordinate of rank p, exact because everything it depends on is.
                # The unsolved coordinates stay 0 rather than a guess: a guess far out can
                # overflow, and a masked weight 0 · ∞ would turn the solved ones into NaN.
                m, s = self._shift_and_gate(k, previous)
                solved = m + (z - m) * torch.exp(-F.logsigmoid(s))
                previous = torch.where(rank == p, solved, previous)
            # s of the last pass saw every coordinate it depends on solved: σ at the preimage.
            log_det = log_det + F.logsigmoid(s).sum(-1)
            z = previous
        return z, log_det

    def local_parameters(self) -> dict[str, torch.Tensor]:
        return {"loc": self.loc, "log_var": self.log_var, "context": self.context}

    def with_local_parameters(self, **tensors: torch.Tensor) -> Self:
        return type(self)(**{**self.local_parameters(), **tensors}, steps=self.steps)

    def detached(self) -> Self:
        return type(self)(
            self.loc.detach(),
            self.log_var.detach(),
            self.context.detach(),
            [weights.detach() for weights in self.steps],
        )

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> Self:
        shape = torch.Size(batch_shape)
        latent = self.event_shape[0]
        return type(self)(
            self.loc.expand(*shape, latent),
            self.log_var.expand(*shape, latent),
            self.context.expand(*shape, self.context.shape[-1]),
            self.steps,
        )


# ----------------------------------------------------------------------------------- modules
def _check_steps(flow_steps: int) -> None:
    if not isinstance(flow_steps, int) or flow_steps < 1:
        raise ValueError(f"flow_steps must be a positive integer, got {flow_steps!r}")


def _scale_output_rows(encoder: nn.Module, rows: slice, n_features: int, factor: float) -> None:
    """Multiply the rows ``rows`` of the encoder's output layer (its last ``nn.Linear``, if that
    produces the ``n_features`` features) by ``factor``: an initialisation, so the learning rate
    of those outputs is unchanged. An encoder ending otherwise is left as it is."""
    linears = [module for module in encoder.modules() if isinstance(module, nn.Linear)]
    if not linears or linears[-1].out_features != n_features:
        return
    with torch.no_grad():
        linears[-1].weight[rows] *= factor
        linears[-1].bias[rows] *= factor


class PlanarFlowPosterior(nn.Module):
    """q(z|x): N(μ(x), diag σ²(x)) through ``flow_steps`` planar layers with per-example
    (u, w, b) (Rezende & Mohamed 2015, Sec. 4.1: all flow parameters are encoder outputs).

    The encoder's features ``[batch, n_params]`` are laid out as
    ``[μ (D), log σ² (D), u (K·D), w (K·D), b (K)]``, u and w row-major ``[K, D]``. At
    construction the encoder's u outputs are scaled by 10⁻², so every layer starts close to the
    identity (see :func:`planar_constraint`) and q close to the diagonal Gaussian.
    """

    def __init__(
        self, encoder: nn.Module, latent_dim: int, flow_steps: int = DEFAULT_FLOW_STEPS
    ) -> None:
        super().__init__()
        _check_steps(flow_steps)
        self.encoder = encoder
        self.latent_dim = latent_dim
        self.flow_steps = flow_steps
        d, k = latent_dim, flow_steps
        _scale_output_rows(
            encoder, slice(2 * d, 2 * d + k * d), self.n_params(d, k), _INITIAL_U_SCALE
        )

    @staticmethod
    def n_params(latent_dim: int, flow_steps: int = DEFAULT_FLOW_STEPS) -> int:
        """Features the encoder must produce: ``2·D + K·(2·D + 1)``."""
        return 2 * latent_dim + flow_steps * (2 * latent_dim + 1)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> PlanarFlowDistribution:
        """q(z|x), or q(z|x, y) for a ``condition`` y ``[batch, c]`` the encoder reads."""
        d, k = self.latent_dim, self.flow_steps
        features = apply_network(self.encoder, x, condition)  # [batch, n_params]
        mu, log_var, u, w, b = features.split([d, d, k * d, k * d, k], dim=-1)
        lead = features.shape[:-1]
        return PlanarFlowDistribution(
            mu, log_var, u.reshape(*lead, k, d), w.reshape(*lead, k, d), b
        )


class IAFPosterior(nn.Module):
    """q(z|x): N(μ(x), diag σ²(x)) through ``flow_steps`` IAF steps fed the encoder's context
    h(x) (Kingma et al. 2016, Sec. 4: "the encoder outputs μ, σ and an extra output h").

    The encoder's features ``[batch, n_params]`` are ``[μ (D), log σ² (D), h (C)]``; C defaults
    to D. Each step has its own MADE (shared across examples, the module's parameters) with
    hidden sizes ``hidden`` (default one layer of 4·D units, which holds every degree). The MADE
    output layers start at zero weights with biases m = 0, s = +2, so q starts as the diagonal
    Gaussian N(g μ, g² σ²) with g = sigmoid(2)^K, each step only shrinking z a little.
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        flow_steps: int = DEFAULT_FLOW_STEPS,
        context_dim: int | None = None,
        hidden: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        _check_steps(flow_steps)
        self.encoder = encoder
        self.latent_dim = latent_dim
        self.context_dim = latent_dim if context_dim is None else context_dim
        hidden = (4 * latent_dim,) if hidden is None else tuple(hidden)
        mades = [MADE(latent_dim, self.context_dim, hidden) for _ in range(flow_steps)]
        with torch.no_grad():
            for made in mades:
                made.output.weight.zero_()
                made.output.bias[:latent_dim].zero_()
                made.output.bias[latent_dim:].fill_(_INITIAL_GATE_BIAS)
        self.made = nn.ModuleList(mades)

    @property
    def flow_steps(self) -> int:
        return len(self.made)

    @staticmethod
    def n_params(
        latent_dim: int, flow_steps: int = DEFAULT_FLOW_STEPS, context_dim: int | None = None
    ) -> int:
        """Features the encoder must produce: ``2·D + C`` (C = D by default; K does not count)."""
        return 2 * latent_dim + (latent_dim if context_dim is None else context_dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> IAFDistribution:
        """q(z|x), or q(z|x, y) for a ``condition`` y ``[batch, c]`` the encoder reads (the
        context h then carries y into every step)."""
        d = self.latent_dim
        features = apply_network(self.encoder, x, condition)
        mu, log_var, h = features.split([d, d, self.context_dim], dim=-1)
        return IAFDistribution(mu, log_var, h, [cast(MADE, made).weights() for made in self.made])


class LocalFlowPosterior(nn.Module):
    """Non-amortised flow posteriors: the per-example tensors of a flow distribution with
    ``batch_shape [n]`` held as ``nn.Parameter``, started at their amortised values.

    The family is the amortised posterior's with the shared weights frozen: planar, every
    parameter (μ, log σ², u, w, b) per example; IAF, μ, log σ² and the context h per example with
    the MADE weights fixed at the encoder's. So q* ranges over exactly the distributions the
    amortised posterior can output for some encoder output, and ELBO(q*) − ELBO(q_amortised) is
    what sharing one encoder network costs (Cremer et al. 2018's amortisation gap).

    It follows the posterior contract, ``forward(x) -> Distribution`` with ``batch_shape [n]``;
    ``x`` must be the n examples it was made for (only their number is checked).
    """

    def __init__(self, q: FlowDistribution) -> None:
        super().__init__()
        if len(q.batch_shape) != 1:
            raise ValueError(
                f"local posteriors start from a batch of examples, batch_shape [n]; got "
                f"{tuple(q.batch_shape)}"
            )
        self._template = q.detached()
        self.tensors = nn.ParameterDict(
            {name: nn.Parameter(t.detach().clone()) for name, t in q.local_parameters().items()}
        )

    @property
    def loc(self) -> torch.Tensor:
        """μ ``[n, latent]``, the base Gaussian's means (as ``LocalGaussianPosterior.loc``)."""
        return self.tensors["loc"]

    @property
    def n_examples(self) -> int:
        return int(self._template.batch_shape[0])

    def distribution(self) -> FlowDistribution:
        return self._template.with_local_parameters(**dict(self.tensors.items()))

    def forward(self, x: torch.Tensor) -> FlowDistribution:
        if x.shape[0] != self.n_examples:
            raise ValueError(
                f"these local posteriors belong to {self.n_examples} examples, got {x.shape[0]}"
            )
        return self.distribution()
