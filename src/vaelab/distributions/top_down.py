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
(:class:`TopDownPriorChain`); it reuses the per-layer log-densities that the posterior's sampling pass
computed on the way, when asked at the same z (see :class:`PriorReuse`).

Shapes: ``batch_shape [batch]`` (posterior) or ``[]`` (prior), ``event_shape [Σ_l d_l]`` with z₁
first; samples ``[*S, *B, Σ_l d_l]``; ``layer_log_prob`` ``[L, *S, *B]``, z₁'s row first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints

from vaelab.distributions.chain import GaussianChain, call_module
from vaelab.distributions.normal import DiagonalNormal
from vaelab.distributions.stop_gradient import stop_gradient

__all__ = [
    "PriorReuse",
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

    in log-variances: log σ_q² = −logaddexp(−log σ̂², −log σ_p²) and w = sigmoid(log σ_p² −
    log σ̂²), which neither overflows nor divides by a vanishing precision."""
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
    weight = torch.sigmoid(prior_log_var - log_var)
    mean = prior_loc + weight * (loc - prior_loc)
    return mean, -torch.logaddexp(-log_var, -prior_log_var)


class PriorReuse:
    """A slot shared by a top-down prior module and its posterior: the last posterior draw z and
    the prior's per-layer log-densities there, ``[L, *S, *B]``, which the posterior's pass
    computed on its way (it needs p(z_l | z_{l+1}) to merge), taken once by the prior's
    ``layer_log_prob`` at that same z instead of running the prior's networks again.

    Taken only while nothing they depend on has changed: z is the stored tensor (or a view of it
    of the same size) unchanged since (its version counter), and so are the prior's parameters
    (``watched``; an optimiser step bumps their versions). The stored log p(z) has the same value
    (up to float rounding: ``TopDownChain.from_noise`` computes it without
    ``torch.distributions``) and, through the prior's weights and through z's layers, the same
    gradient as a recomputed one, with one difference: it reaches each layer of z by that layer's own path rather than
    through the joined z, so a hook registered on z (the DReG estimator's, which multiplies
    the gradient arriving at z by the importance weight) would miss it. The estimators that hook
    z first stop q's gradient (``detached()``), which empties the slot, so they recompute; the
    slot is also left alone under ``torch.compile``."""

    def __init__(self, watched: Callable[[], Iterable[torch.Tensor]] = tuple) -> None:
        self.watched = watched
        self.clear()

    def clear(self) -> None:
        self.z: torch.Tensor | None = None
        self.layers: torch.Tensor | None = None
        self.tensors: tuple[torch.Tensor, ...] = ()  # z and the watched tensors, as put
        self.versions: tuple[int, ...] = ()

    def put(self, z: torch.Tensor, layers: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            return
        self.z, self.layers = z, layers
        # The watched tensors are listed once, here (a module's parameters() walks its tree).
        self.tensors = (z, *self.watched())
        self.versions = tuple(t._version for t in self.tensors)

    def take(self, value: torch.Tensor) -> torch.Tensor | None:
        """The stored rows when ``value`` is the stored z (module docstring), else None; the
        slot is emptied either way."""
        z, layers, tensors, versions = self.z, self.layers, self.tensors, self.versions
        self.clear()
        if z is None or layers is None or torch.compiler.is_compiling():
            return None
        same = (
            value.data_ptr() == z.data_ptr()
            and value.numel() == z.numel()
            and value.shape[-1] == z.shape[-1]
            and value.dtype == z.dtype
            and value.device == z.device
            and versions == tuple(t._version for t in tensors)
        )
        return layers.reshape(layers.shape[:1] + value.shape[:-1]) if same else None


class TopDownChain(Distribution):
    """q(z₁, …, z_L | x) drawn top-down (module docstring).

    ``top`` is the prior p(z_L) (``batch_shape []``); ``conditionals`` the prior's networks in
    draw order, the first z_L → p(z_{L−1}|z_L); ``evidence`` the bottom-up (μ̂_l, log σ̂_l²) of
    each layer, z₁ first, each ``[*B, d_l]``; ``sizes`` d₁, …, d_L. ``frozen`` evaluates
    everything q reads, the evidence and the shared networks, with gradients stopped
    (:meth:`detached`); ``reuse`` receives the prior's log-densities at each draw.
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
        reuse: PriorReuse | None = None,
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
        self.reuse = reuse
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
        the layer lies in z), drawn top-down and differentiable in every parameter; the prior's
        per-layer log-densities at z, computed on the way, go to ``reuse``.

        The training step's path, so it works on tensors, not distribution objects: at each layer
        (μ_p, log σ_p²) of the prior's conditional (:func:`conditional_gaussian`), (μ_q, log σ_q²)
        = :func:`merged`, z_l = μ_q + σ_q ε_l. At that z the log-densities need no division:

            log q(z|x) = −½ Σ (ε² + log σ_q² + log 2π),
            log p(z_l | z_{l+1}) = −½ Σ ((z_l − μ_p)² e^{−log σ_p²} + log σ_p² + log 2π),

        the first because (z_l − μ_q) / σ_q = ε. They equal ``torch.distributions``' values up to
        float rounding (the same functions of every parameter, so the same gradients too)."""
        z, log_q, _ = self._draw(eps, by_layer=False)
        return z, log_q

    def from_noise_by_layer(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z as :meth:`from_noise` draws it and log q(z_l | z_{l+1}, x) of each layer there,
        ``[L, *S, *B]``, z₁'s row first: :meth:`layer_log_prob` at z (equal up to float rounding,
        the same ε form as ``from_noise`` layer by layer), without a second pass through the
        prior's networks. What the trainer's KL per layer reads."""
        z, _, rows = self._draw(eps, by_layer=True)
        assert rows is not None
        return z, rows

    def _draw(
        self, eps: torch.Tensor, *, by_layer: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """z, log q(z|x) and (``by_layer``) its rows per layer, z₁'s first (:meth:`from_noise`)."""
        if self.frozen:
            drawn, _, posteriors = self._pass(None, eps)
            rows = [q.log_prob(b) for q, b in zip(posteriors, drawn, strict=True)]
            log_q = sum(rows)
            assert isinstance(log_q, torch.Tensor)
            stacked = self._rows(rows, eps.shape[:-1]) if by_layer else None
            return self._join(drawn), log_q, stacked
        noise = eps.split(self.sizes, dim=-1)[::-1]
        blocks: list[torch.Tensor] = []
        log_p_rows: list[torch.Tensor] = []
        log_q_rows: list[torch.Tensor] = []
        q_log_var_sum: torch.Tensor | None = None
        prior_loc, prior_log_var = gaussian_parameters(self.top)
        for index, (loc, log_var) in enumerate(self.evidence[::-1]):
            if index:
                prior_loc, prior_log_var = conditional_gaussian(
                    self.conditionals[index - 1], blocks[-1]
                )
            mean, q_log_var = merged(prior_loc, prior_log_var, loc, log_var)
            block = mean + torch.exp(0.5 * q_log_var) * noise[index]
            blocks.append(block)
            total = q_log_var.sum(-1)
            q_log_var_sum = total if q_log_var_sum is None else q_log_var_sum + total
            deviation = (block - prior_loc).square() * torch.exp(-prior_log_var)
            log_p_rows.append(-0.5 * (deviation + prior_log_var).sum(-1) - self._normaliser(index))
            if by_layer:
                squares = noise[index].square().sum(-1)
                log_q_rows.append(-0.5 * (squares + total) - self._normaliser(index))
        assert q_log_var_sum is not None
        log_q = -0.5 * (eps.square().sum(-1) + q_log_var_sum) - sum(self.sizes) * _HALF_LOG_2PI
        z = self._join(blocks)
        shape = eps.shape[:-1]
        if self.reuse is not None:
            self.reuse.put(z, self._rows(log_p_rows, shape))
        return z, log_q, self._rows(log_q_rows, shape) if by_layer else None

    @staticmethod
    def _rows(rows: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """Per-layer rows in draw order (z_L first), each ``[*S, *B]`` or broadcastable to it, as
        one ``[L, *S, *B]`` with z₁'s row first."""
        return torch.stack([row if row.shape == shape else row.expand(shape) for row in rows[::-1]])

    def _normaliser(self, index: int) -> float:
        """½ d log 2π of the ``index``-th layer drawn (z_L first)."""
        return self.sizes[::-1][index] * _HALF_LOG_2PI

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
        gradient through z only. The prior keeps its own gradients: it is another object.

        Empties ``reuse``: an estimator that stops q's gradient may hook z, which a reused
        log p(z) would bypass (:class:`PriorReuse`)."""
        if self.reuse is not None:
            self.reuse.clear()
        return TopDownChain(self.top, self.conditionals, self.evidence, self.sizes, frozen=True)

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError(
            "TopDownChain: the mean of a layer drawn through a network has no closed form; "
            "average samples instead (vaelab.objectives.noise.posterior_mean does)"
        )


class TopDownPriorChain(GaussianChain):
    """p(z_L) ∏ p(z_l | z_{l+1}), a :class:`GaussianChain` drawn from z_L down, that takes its
    per-layer log-densities from ``reuse`` when the posterior's pass left them for this z."""

    def __init__(
        self,
        top: Distribution,
        conditionals: Sequence[nn.Module],
        sizes: Sequence[int],
        reuse: PriorReuse,
    ) -> None:
        super().__init__(top, conditionals, sizes, reverse=True)
        self.reuse = reuse

    def layer_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        stored = self.reuse.take(value)
        return super().layer_log_prob(value) if stored is None else stored

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.layer_log_prob(value).sum(0)
