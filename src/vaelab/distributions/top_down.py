"""Top-down inference over several stochastic layers as one distribution over z = [z₁, …, z_L].

The Ladder VAE's posterior (Sønderby, Raiko, Maaløe, Sønderby & Winther 2016, eqs. 17–19) is
drawn in the generative model's order, z_L first:

    q(z | x) = q(z_L | x) ∏_{l<L} q(z_l | z_{l+1}, x),
    q(z_l | z_{l+1}, x) ∝ N(z_l; μ̂_l(x), σ̂_l²(x)) · p(z_l | z_{l+1}),

the product of the bottom-up evidence N(μ̂_l, σ̂_l²), read off a deterministic pass over x, and
the prior's own conditional p(z_l | z_{l+1}) = N(μ_p, σ_p²) (p(z_L) at the top), normalised: the
precision-weighted Gaussian

    σ_q² = 1 / (σ̂⁻² + σ_p⁻²),   μ_q = (μ̂ σ̂⁻² + μ_p σ_p⁻²) / (σ̂⁻² + σ_p⁻²)

(:func:`merge`). The prior's conditionals are the generative model's networks themselves: the
posterior calls them at its own draws, so the generative path is shared, not copied.

The prior is an ordinary :class:`vaelab.distributions.chain.GaussianChain` drawn from z_L down
(:class:`TopDownPriorChain`). Since the posterior's draw evaluates the prior's conditionals at the
layers it draws, it gives log q − log p of each layer at its draw in the same pass
(:meth:`TopDownChain.draw_with_log_ratio`): the bounds' Monte Carlo KL then costs no second pass
through the prior's networks.

Shapes: ``batch_shape [batch]`` (posterior) or ``[]`` (prior), ``event_shape [Σ_l d_l]`` with z₁
first; samples ``[*S, *B, Σ_l d_l]``; ``layer_log_prob`` ``[L, *S, *B]``, z₁'s row first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints

from vaelab.distributions.chain import GaussianChain, call_module
from vaelab.distributions.normal import DiagonalNormal, StandardNormal
from vaelab.distributions.stop_gradient import stop_gradient

__all__ = [
    "TopDownChain",
    "TopDownPriorChain",
    "conditional_gaussian",
    "gaussian_parameters",
    "log_variance",
    "merge",
    "merged",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def log_variance(p: Distribution) -> torch.Tensor:
    """log σ² of a diagonal Gaussian (``DiagonalNormal`` keeps it; else 2 log σ)."""
    if isinstance(p, DiagonalNormal):
        return p.log_var
    if isinstance(p, Independent) and isinstance(p.base_dist, Normal):
        return 2 * p.base_dist.scale.log()
    raise TypeError(f"top-down inference needs diagonal Gaussian layers, got {type(p).__name__}")


def merge(prior: Distribution, loc: torch.Tensor, log_var: torch.Tensor) -> DiagonalNormal:
    """The normalised product N(loc, e^log_var) · p of two diagonal Gaussians (LVAE eq. 17–19):

        σ_q⁻² = σ̂⁻² + σ_p⁻²,   μ_q = w μ̂ + (1 − w) μ_p,   w = σ̂⁻² / (σ̂⁻² + σ_p⁻²),

    in log-variances, with t = log σ_p² − log σ̂²: w = sigmoid(t) and log σ_q² = log σ_p² −
    softplus(t) (σ_q² = σ_p² / (1 + e^t)), which neither overflows nor divides by a vanishing
    precision."""
    prior_loc, prior_log_var = gaussian_parameters(prior)
    return DiagonalNormal(*merged(prior_loc, prior_log_var, loc, log_var))


def gaussian_parameters(p: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) of a diagonal Gaussian."""
    return p.base_dist.loc, log_variance(p)  # type: ignore[attr-defined]


def conditional_gaussian(
    module: nn.Module, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) of the diagonal Gaussian that the conditional ``module`` gives at ``value``:
    from its ``loc_and_log_var`` where it has one (``DiagonalGaussianPosterior``: the network's
    two outputs, no distribution object built and no σ computed for nothing), else read off the
    distribution ``module(value)`` returns. The first path calls the network without the
    conditional module's own ``__call__``: hooks on the network run, hooks on that wrapper not."""
    direct = getattr(module, "loc_and_log_var", None)
    if callable(direct):
        loc, log_var = direct(value)
        return loc, log_var
    return gaussian_parameters(call_module(module, value))


def merged(
    prior_loc: torch.Tensor, prior_log_var: torch.Tensor, loc: torch.Tensor, log_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_q, log σ_q²) of :func:`merge`, as tensors."""
    mean, q_log_var, _ = _merged_with_spread(prior_loc, prior_log_var, loc, log_var)
    return mean, q_log_var


# softplus(t) is computed as log(1 + e^t) up to t = 40 and as t above, where the two differ by
# e^−40: below float64's resolution, unlike torch's default switch at 20.
_SOFTPLUS_LINEAR_ABOVE = 40.0


def _merged_with_spread(
    prior_loc: torch.Tensor | None,
    prior_log_var: torch.Tensor | None,
    loc: torch.Tensor,
    log_var: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ_q, log σ_q²) of :func:`merge` and softplus(t) = log σ_p² − log σ_q², the log-ratio of
    the prior's variance to the posterior's, which the KL row reads. ``prior_loc`` and
    ``prior_log_var`` None: the prior is N(0, I) (μ_p = 0, log σ_p² = 0)."""
    t = -log_var if prior_log_var is None else prior_log_var - log_var
    spread = F.softplus(t, threshold=_SOFTPLUS_LINEAR_ABOVE)
    weight = torch.sigmoid(t)
    if prior_loc is None or prior_log_var is None:
        return weight * loc, -spread, spread
    return prior_loc + weight * (loc - prior_loc), prior_log_var - spread, spread


class TopDownChain(Distribution):
    """q(z₁, …, z_L | x) drawn top-down (module docstring).

    ``top`` is the prior p(z_L) (``batch_shape []``); ``conditionals`` the prior's networks in
    draw order, the first z_L → p(z_{L−1}|z_L); ``evidence`` the bottom-up (μ̂_l, log σ̂_l²) of
    each layer, z₁ first, each ``[*B, d_l]``; ``sizes`` d₁, …, d_L. ``frozen`` evaluates
    everything q reads, the evidence and the shared networks, with gradients stopped
    (:meth:`detached`). ``source`` is the module that gave ``top`` and ``conditionals`` (the
    model's prior): a prior distribution with the same ``source`` is this chain's own, whose
    log-densities :meth:`draw_with_log_ratio` computes on the way.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        top: Distribution,
        conditionals: Sequence[nn.Module],
        evidence: Sequence[tuple[torch.Tensor, torch.Tensor]],
        sizes: Sequence[int],
        *,
        frozen: bool = False,
        source: nn.Module | None = None,
    ) -> None:
        self.sizes = tuple(int(d) for d in sizes)
        if not len(self.sizes) == len(evidence) == len(conditionals) + 1:
            raise ValueError(
                f"a top-down chain of {len(self.sizes)} layers needs evidence for each and "
                f"{len(self.sizes) - 1} conditionals, got {len(evidence)} and {len(conditionals)}"
            )
        self.top = top
        self.conditionals = tuple(conditionals)
        self.evidence = tuple(evidence)
        self.frozen = frozen
        self.source = source
        batch = evidence[0][0].shape[:-1]
        super().__init__(batch, torch.Size([sum(self.sizes)]), validate_args=False)

    # ------------------------------------------------------------------------ one pass
    def _pass(
        self, value: torch.Tensor | None, eps: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[Distribution], list[DiagonalNormal]]:
        """Walk from z_L down: at each layer the prior's p_l (at the layer above), the posterior
        q_l = merge(p_l, evidence_l), and the layer's value, read from ``value`` or drawn as
        μ_q + σ_q ε from ``eps``. Lists in draw order (z_L first)."""
        source = value if value is not None else eps
        assert source is not None
        given = list(source.split(self.sizes, dim=-1))[::-1]
        evidence = self.evidence[::-1]
        blocks: list[torch.Tensor] = []
        priors: list[Distribution] = []
        posteriors: list[DiagonalNormal] = []
        for index, (loc, log_var) in enumerate(evidence):
            if index == 0:
                p = stop_gradient(self.top) if self.frozen else self.top
            else:
                p = call_module(self.conditionals[index - 1], blocks[-1], frozen=self.frozen)
            if self.frozen:
                loc, log_var = loc.detach(), log_var.detach()
            q = merge(p, loc, log_var)
            if value is None:
                block = q.base_dist.loc + q.base_dist.scale * given[index]
            else:
                block = given[index]
            blocks.append(block)
            priors.append(p)
            posteriors.append(q)
        return blocks, priors, posteriors

    @staticmethod
    def _join(blocks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(blocks[::-1], dim=-1)

    # ------------------------------------------------------------------------ densities
    def layer_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(z_l | z_{l+1}, x) of each layer at ``value [*S, *B, Σ_l d_l]``: ``[L, *S, *B]``,
        z₁'s row first (its sum is :meth:`log_prob`)."""
        blocks, _, posteriors = self._pass(value, None)
        rows = [q.log_prob(block) for q, block in zip(posteriors, blocks, strict=True)]
        return torch.stack(rows[::-1])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(z|x) = Σ_l log q(z_l | z_{l+1}, x): ``[*S, *B]``."""
        return self.layer_log_prob(value).sum(0)

    def layer_kl(self, value: torch.Tensor) -> torch.Tensor:
        """KL(q(z_l | z_{l+1}, x) ‖ p(z_l | z_{l+1})) of each layer with z_{l+1} read from
        ``value``, in closed form for two diagonal Gaussians: ``[L, *S, *B]``, z₁ first. Its
        expectation under q, summed over layers, is KL(q(z|x) ‖ p(z)) (the chain rule of the KL;
        Vahdat & Kautz 2020, eq. 2)."""
        _, priors, posteriors = self._pass(value, None)
        rows = [
            torch.distributions.kl_divergence(q, p) for q, p in zip(posteriors, priors, strict=True)
        ]
        shape = value.shape[:-1]
        return torch.stack([row.expand(shape) for row in rows[::-1]])

    # ------------------------------------------------------------------------ sampling
    def from_noise(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and log q(z|x) from standard normal ``eps [*S, *B, Σ_l d_l]`` (each layer's ε where
        the layer lies in z), drawn top-down and differentiable in every parameter.

        It works on tensors, not distribution objects: at each layer (μ_p, log σ_p²) of the
        prior's conditional (:func:`conditional_gaussian`), (μ_q, log σ_q²) = :func:`merged`,
        z_l = μ_q + σ_q ε_l. At that z, since (z_l − μ_q) / σ_q = ε, the log-density needs no
        division:

            log q(z|x) = −½ Σ (ε² + log σ_q² + log 2π),

        equal to ``torch.distributions``' value up to float rounding (the same function of every
        parameter, so the same gradient too)."""
        if self.frozen:
            drawn, _, posteriors = self._pass(None, eps)
            log_q = sum(q.log_prob(b) for q, b in zip(posteriors, drawn, strict=True))
            assert isinstance(log_q, torch.Tensor)
            return self._join(drawn), log_q
        blocks, q_log_vars, _ = self._walk(eps, prior_rows=False)
        # Summed layer by layer: the top layer's log σ_q² has no sample dimensions.
        total = q_log_vars[0].sum(-1)
        for q_log_var in q_log_vars[1:]:
            total = total + q_log_var.sum(-1)
        log_q = -0.5 * (eps.square().sum(-1) + total) - sum(self.sizes) * _HALF_LOG_2PI
        return self._join(blocks), log_q

    def draw_with_log_ratio(
        self, prior: Distribution, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """z as :meth:`from_noise` draws it from ``eps [*S, *B, Σ_l d_l]`` and, per layer, the
        log-ratio log q(z_l | z_{l+1}, x) − log p(z_l | z_{l+1}) there, ``[*S, *B, L]``, z₁'s
        column first: the Monte Carlo KL of each layer from this draw, whose sum over layers is
        log q(z|x) − log p(z). None when ``prior`` is not this chain's own (another ``source``)
        or the chain is frozen (:meth:`detached`: its estimators hook z, which the rows reach
        layer by layer, not through the joined z).

        The draw evaluates the prior's conditional at each layer anyway, so p's densities cost no
        second pass through its networks. With ε_l = (z_l − μ_q) / σ_q and the ½ log 2π terms
        cancelled, each row is

            ½ Σ [(z_l − μ_p)² e^{−log σ_p²} + log σ_p² − ε_l² − log σ_q²],

        equal to ``layer_log_prob`` of q minus that of p (``torch.distributions``' Normal, rows
        ``[L, *S, *B]``) up to float rounding, with the same gradient in every parameter."""
        if self.frozen or self.source is None or getattr(prior, "source", None) is not self.source:
            return None
        blocks, _, rows = self._walk(eps, prior_rows=True)
        # ε² per layer, summed apart: ε is a constant, so this takes no part in the backward pass.
        squares = torch.stack([e.sum(-1) for e in eps.square().split(self.sizes, -1)], -1)
        return self._join(blocks), 0.5 * (torch.stack(rows[::-1], dim=-1) - squares)

    def _walk(
        self, eps: torch.Tensor, *, prior_rows: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The draw from z_L down (:meth:`from_noise`): each layer's z_l and log σ_q², and with
        ``prior_rows`` Σ [(z_l − μ_p)² / σ_p² + log σ_p² − log σ_q²], its log-ratio row
        (:meth:`draw_with_log_ratio`) before ε² and the ½; lists in draw order."""
        noise = eps.split(self.sizes, dim=-1)[::-1]
        blocks: list[torch.Tensor] = []
        q_log_vars: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        prior_loc: torch.Tensor | None = None
        prior_log_var: torch.Tensor | None = None
        for index, (loc, log_var) in enumerate(self.evidence[::-1]):
            if index:
                prior_loc, prior_log_var = conditional_gaussian(
                    self.conditionals[index - 1], blocks[-1]
                )
            elif not isinstance(self.top, StandardNormal):  # N(0, I) is None, None
                prior_loc, prior_log_var = gaussian_parameters(self.top)
            mean, q_log_var, spread = _merged_with_spread(prior_loc, prior_log_var, loc, log_var)
            block = mean + torch.exp(0.5 * q_log_var) * noise[index]
            if prior_rows:
                # (z − μ_p)² / σ_p² and log σ_p² − log σ_q² = spread.
                if prior_loc is None or prior_log_var is None:
                    deviation = block.square()
                else:
                    deviation = (block - prior_loc).square() * torch.exp(-prior_log_var)
                rows.append((deviation + spread).sum(-1))
            blocks.append(block)
            q_log_vars.append(q_log_var)
        return blocks, q_log_vars, rows

    def rsample_and_log_prob(
        self, sample_shape: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised z ``[*sample_shape, *B, Σ_l d_l]`` and log q(z|x) from one pass."""
        like = self.evidence[0][0]
        shape = self._extended_shape(torch.Size(sample_shape))
        return self.from_noise(torch.randn(shape, dtype=like.dtype, device=like.device))

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def detached(self) -> TopDownChain:
        """The same q with everything it reads detached (the bottom-up evidence of x, p(z_L) and
        the shared generative networks as q calls them): ``log_prob`` keeps its values and has a
        gradient through z only. The prior keeps its own gradients: it is another object."""
        return TopDownChain(
            self.top, self.conditionals, self.evidence, self.sizes, frozen=True, source=self.source
        )

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError(
            "TopDownChain: the mean of a layer drawn through a network has no closed form; "
            "average samples instead (vaelab.objectives.noise.posterior_mean does)"
        )


class TopDownPriorChain(GaussianChain):
    """p(z_L) ∏ p(z_l | z_{l+1}), a :class:`GaussianChain` drawn from z_L down; ``source`` is the
    module that gave ``top`` and ``conditionals``, by which a :class:`TopDownChain` drawn through
    the same networks knows it as its own prior (:meth:`TopDownChain.draw_with_log_ratio`)."""

    def __init__(
        self,
        top: Distribution,
        conditionals: Sequence[nn.Module],
        sizes: Sequence[int],
        source: nn.Module | None = None,
    ) -> None:
        super().__init__(top, conditionals, sizes, reverse=True)
        self.source = source
