"""Discrete latent codes: D binary units, or D groups of K classes, as one distribution over
``[latent]``, with their closed-form KLs, every state of the code, and continuous relaxations.

- :class:`BernoulliCode` ``(logits [*B, D])``: z ∈ {0, 1}^D, q(z) = Πⱼ σ(lⱼ)^zⱼ (1 − σ(lⱼ))^(1−zⱼ);
  ``event_shape [D]``.
- :class:`OneHotCategoricalGroups` ``(logits [*B, D, K])``: D independent classes, each one-hot
  over K, stored flat as ``[D·K]`` (group d in columns d·K … d·K + K − 1) so that a code is an
  ordinary ``[batch, latent]`` row with latent = D·K; ``event_shape [D·K]``.

Both enumerate their support (``enumerate_support``: 2^D or K^D states, ``[states, *B, latent]``),
which is what exact evaluation and the ``"enumerate"`` gradient sum over, and give their
continuous relaxations (``relaxed(temperature)``): the binary Concrete (Maddison, Mnih & Teh 2017)
and the Gumbel-softmax / Concrete (Jang, Gu & Poole 2017), reparameterised, whose samples approach
the discrete ones as the temperature falls.

Importing this module registers the closed-form KL of each family against itself (priors of the
same family: uniform or learned), written with log-sigmoids and log-softmaxes so that nothing is
computed as log of a rounded probability.

Shapes: ``batch_shape [batch]`` for a posterior and ``[]`` for a prior; samples
``[*samples, *batch, latent]``, log-probabilities ``[*samples, *batch]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Distribution,
    Independent,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
    constraints,
)
from torch.distributions.kl import register_kl

__all__ = [
    "BernoulliCode",
    "FlatGroups",
    "OneHotCategoricalGroups",
    "bernoulli_states",
    "categorical_states",
    "uniform_from_normal",
]


def bernoulli_states(d: int) -> Tensor:
    """Every z ∈ {0, 1}^d, ``[2^d, d]``: row s holds the binary digits of s, unit j = bit j."""
    index = torch.arange(2**d).unsqueeze(-1)
    return ((index >> torch.arange(d)) & 1).to(torch.get_default_dtype())


def categorical_states(d: int, k: int) -> Tensor:
    """Every code of d groups of k classes, one-hot and flat, ``[k^d, d·k]``: row s gives group j
    the class of s's j-th base-k digit."""
    index = torch.arange(k**d).unsqueeze(-1)
    classes = (index // k ** torch.arange(d)) % k  # [k^d, d]
    return F.one_hot(classes, k).flatten(-2).to(torch.get_default_dtype())


def _expand_states(states: Tensor, batch_shape: torch.Size, expand: bool) -> Tensor:
    """``states [S, latent]`` laid out as torch's ``enumerate_support``: ``[S, *batch, latent]``
    (or ``[S, 1, …, 1, latent]`` without ``expand``)."""
    view = states.reshape(states.shape[0], *(1,) * len(batch_shape), states.shape[-1])
    return view.expand(states.shape[0], *batch_shape, states.shape[-1]) if expand else view


def uniform_from_normal(noise: Tensor) -> Tensor:
    """u = Φ(ε), uniform on (0, 1) for standard normal ε, kept a float step inside the interval
    so that log u and log(1 − u) are finite: the keyed normal noise every training step and
    evaluation draws (``vaelab.objectives.noise``) serves a discrete code unchanged."""
    tiny = torch.finfo(noise.dtype).eps
    return torch.special.ndtr(noise).clamp(tiny, 1 - tiny)


class BernoulliCode(Independent):
    """D independent binary units with logits l ``[*B, D]``: log q(z) = Σⱼ [zⱼ log σ(lⱼ) +
    (1 − zⱼ) log σ(−lⱼ)]; ``event_shape [D]``, support {0, 1}^D (2^D states)."""

    has_enumerate_support = True

    def __init__(self, logits: Tensor) -> None:
        if logits.dim() < 1:
            raise ValueError(
                f"BernoulliCode needs logits [*batch, D], got shape {tuple(logits.shape)}"
            )
        super().__init__(Bernoulli(logits=logits, validate_args=False), 1, validate_args=False)

    @property
    def logits(self) -> Tensor:
        return self.base_dist.logits

    @property
    def state_count(self) -> int:
        return 2 ** self.event_shape[0]

    def enumerate_support(self, expand: bool = True) -> Tensor:
        states = bernoulli_states(self.event_shape[0]).to(self.logits)
        return _expand_states(states, self.batch_shape, expand)

    def state_log_probs(self, states: Tensor) -> Tensor:
        """log q(s) ``[S, *B]`` of every state ``[S, D]`` under every posterior of the batch:
        Σⱼ sⱼ lⱼ + log σ(−lⱼ) (as log σ(l) = l + log σ(−l)), one matrix product, never the
        ``[S, *B, D]`` table that ``log_prob`` of broadcast states would build."""
        flat = self.logits.reshape(-1, self.event_shape[0])  # [b, D]
        table = torch.addmm(F.logsigmoid(-flat).sum(-1), states.to(flat), flat.T)  # [S, b]
        return table.reshape(states.shape[0], *self.batch_shape)

    def logistic_noise(self, u: Tensor) -> Tensor:
        """l + log u − log(1 − u) for uniform u ``[*S, *B, D]``: positive exactly where the
        discrete draw is 1, and the relaxed draw's numerator."""
        return self.logits + u.log() - (-u).log1p()

    def from_uniform(self, u: Tensor) -> Tensor:
        """The discrete draw z = 1[u > 1 − σ(l)] for uniform u ``[*S, *B, D]``."""
        return (self.logistic_noise(u) > 0).to(self.logits.dtype)

    def relaxed_from_uniform(self, u: Tensor, temperature: float | Tensor) -> Tensor:
        """The binary Concrete draw σ((l + log u − log(1 − u)) / λ) from the same u as
        ``from_uniform``: its rounding is the discrete draw."""
        return torch.sigmoid(self.logistic_noise(u) / temperature)

    def from_noise(self, noise: Tensor) -> tuple[Tensor, Tensor]:
        """The discrete draw from standard normal ε (u = Φ(ε)) and its log q(z)."""
        z = self.from_uniform(uniform_from_normal(noise))
        return z, self.log_prob(z)

    def relaxed(self, temperature: float | Tensor) -> Distribution:
        """The binary Concrete with the same logits at ``temperature`` λ: z̃ = σ((l + log u −
        log(1 − u)) / λ), u ~ U(0, 1); reparameterised, values in (0, 1)^D."""
        return Independent(
            RelaxedBernoulli(torch.as_tensor(temperature).to(self.logits), logits=self.logits), 1
        )


class FlatGroups(Distribution):
    """A distribution over D groups of K (``base``, ``event_shape [D, K]``) presented with the
    groups laid flat, ``event_shape [D·K]``: samples are flattened, values unflattened before
    ``base`` scores them."""

    arg_constraints: dict[str, constraints.Constraint] = {}

    def __init__(self, base: Distribution) -> None:
        if len(base.event_shape) != 2:
            raise ValueError(
                f"FlatGroups needs a base with event_shape [D, K], got {base.event_shape}"
            )
        self.base = base
        self.groups, self.categories = (int(n) for n in base.event_shape)
        self.has_rsample = base.has_rsample
        super().__init__(
            base.batch_shape, torch.Size([self.groups * self.categories]), validate_args=False
        )

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, 1)

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        return self.base.sample(torch.Size(sample_shape)).flatten(-2)

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        return self.base.rsample(torch.Size(sample_shape)).flatten(-2)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base.log_prob(value.unflatten(-1, (self.groups, self.categories)))


class OneHotCategoricalGroups(FlatGroups):
    """D independent categorical units of K classes with logits ``[*B, D, K]``, each one-hot and
    laid flat: log q(z) = Σ_d Σ_k z_dk log softmax(l_d)_k; ``event_shape [D·K]``, K^D states."""

    has_enumerate_support = True

    def __init__(self, logits: Tensor) -> None:
        if logits.dim() < 2:
            raise ValueError(
                f"OneHotCategoricalGroups needs logits [*batch, D, K], got shape {tuple(logits.shape)}"
            )
        self.logits = logits.log_softmax(-1)
        super().__init__(Independent(OneHotCategorical(logits=logits, validate_args=False), 1))

    @property
    def probs(self) -> Tensor:
        """Class probabilities ``[*B, D, K]``."""
        return self.logits.exp()

    @property
    def mean(self) -> Tensor:
        return self.probs.flatten(-2)

    @property
    def state_count(self) -> int:
        return int(self.categories**self.groups)

    def log_prob(self, value: Tensor) -> Tensor:
        # Σ z·log π rather than torch's argmax indexing: the same number for one-hot values, and
        # defined (with a gradient in z) for the relaxed codes a surrogate objective feeds in.
        return (value.unflatten(-1, (self.groups, self.categories)) * self.logits).sum((-2, -1))

    def entropy(self) -> Tensor:
        return -(self.probs * self.logits).sum((-2, -1))

    def enumerate_support(self, expand: bool = True) -> Tensor:
        states = categorical_states(self.groups, self.categories).to(self.logits)
        return _expand_states(states, self.batch_shape, expand)

    def state_log_probs(self, states: Tensor) -> Tensor:
        """log q(s) ``[S, *B]`` of every one-hot state ``[S, D·K]``: s·log π with the groups'
        log-probabilities laid flat, one matrix product (as ``BernoulliCode.state_log_probs``)."""
        flat = self.logits.reshape(-1, self.groups * self.categories)  # [b, D·K]
        return (states.to(flat) @ flat.T).reshape(states.shape[0], *self.batch_shape)

    def gumbel_scores(self, u: Tensor) -> Tensor:
        """log π + g with g = −log(−log u) Gumbel, for uniform u ``[*S, *B, D·K]`` (one per
        class) → ``[*S, *B, D, K]``."""
        gumbel = -(-u.log()).log()
        return self.logits + gumbel.unflatten(-1, (self.groups, self.categories))

    def from_uniform(self, u: Tensor) -> Tensor:
        """The discrete draw by the Gumbel-max trick, one-hot argmax(log π + g), laid flat."""
        scores = self.gumbel_scores(u)
        return F.one_hot(scores.argmax(-1), self.categories).to(scores.dtype).flatten(-2)

    def relaxed_from_uniform(self, u: Tensor, temperature: float | Tensor) -> Tensor:
        """The Gumbel-softmax draw softmax((log π + g) / λ) from the same u as ``from_uniform``:
        its argmax is the discrete draw."""
        return (self.gumbel_scores(u) / temperature).softmax(-1).flatten(-2)

    def from_noise(self, noise: Tensor) -> tuple[Tensor, Tensor]:
        """The discrete draw from standard normal ε ``[*S, *B, D·K]`` (u = Φ(ε)) and its log q."""
        z = self.from_uniform(uniform_from_normal(noise))
        return z, self.log_prob(z)

    def relaxed(self, temperature: float | Tensor) -> FlatGroups:
        """The Gumbel-softmax / Concrete with the same logits at ``temperature`` λ: z̃_d =
        softmax((l_d + g_d) / λ), g ~ Gumbel(0, 1); reparameterised, each group on the simplex."""
        relaxed = RelaxedOneHotCategorical(
            torch.as_tensor(temperature).to(self.logits), logits=self.logits
        )
        return FlatGroups(Independent(relaxed, 1))


@register_kl(BernoulliCode, BernoulliCode)
def _kl_bernoulli_code(q: BernoulliCode, p: BernoulliCode) -> Tensor:
    """KL(q ‖ p) = Σⱼ [qⱼ log(qⱼ/pⱼ) + (1 − qⱼ) log((1 − qⱼ)/(1 − pⱼ))], with log σ(l) =
    −softplus(−l) and log(1 − σ(l)) = −softplus(l):
    Σⱼ [qⱼ (softplus(−l_pⱼ) − softplus(−l_qⱼ)) + (1 − qⱼ)(softplus(l_pⱼ) − softplus(l_qⱼ))]."""
    lq, lp = q.logits, p.logits
    probs = torch.sigmoid(lq)
    per_unit = probs * (F.softplus(-lp) - F.softplus(-lq)) + (1 - probs) * (
        F.softplus(lp) - F.softplus(lq)
    )
    return per_unit.sum(-1)


@register_kl(OneHotCategoricalGroups, OneHotCategoricalGroups)
def _kl_categorical_groups(q: OneHotCategoricalGroups, p: OneHotCategoricalGroups) -> Tensor:
    """KL(q ‖ p) = Σ_d Σ_k q_dk (log q_dk − log p_dk), from the log-softmaxes of the logits."""
    return (q.probs * (q.logits - p.logits)).sum((-2, -1))
