"""Posterior-collapse diagnostics: which latent units carry information about x, and how much.

- **Activity** of unit u (Burda, Grosse & Salakhutdinov 2016, Sec. 5.2): A_u = Cov_x(E_q[z_u | x]),
  the variance over examples of the posterior mean; the unit is *active* when A_u > 10⁻². A unit
  whose posterior mean does not move with x tells the decoder nothing. With several stochastic
  layers the units of each layer are counted apart, as Burda et al. report them (for z₂, … the
  mean is under q(z₂|x) = E_{q(z₁|x)}[q(z₂|z₁)], a Monte Carlo average).
- **Activity beyond the layer above**, for every layer but the top one:
  R_u = Var_x(E_q[z_{l,u} − m_{l,u}(z_{l+1}) | x]), m_l(z_{l+1}) the mean of the prior's
  p(z_l | z_{l+1}). Under a learned p(z_l | z_{l+1}) a unit of z_l whose posterior has collapsed
  onto its prior still has a mean that moves with x, through the active units of z_{l+1}, so A_u
  counts it; R_u counts only what z_l says about x that the layer above does not. For the top
  layer, whose prior does not depend on x, R_u = A_u.
- **KL per dimension**, averaged over examples: E_x[KL(q(z_u|x) ‖ p(z_u))], exact when q and p
  factorise over dimensions (diagonal Gaussians); it sums to the rate. A collapsed unit has ≈ 0.
- **KL per stochastic layer**, averaged over examples: layer l's share of the rate,
  E_x E_q[log q_l − log p_l] (``vaelab.objectives.layers.kl_per_layer``; the whole KL for one layer).
  A layer is flagged as **collapsed** onto its prior when it has no active unit or its KL is
  below ``COLLAPSED_KL`` nats: it then carries (almost) nothing about x.
- **Rate and distortion** (Alemi et al. 2018, "Fixing a broken ELBO"): R = E_x[KL(q(z|x) ‖ p(z))]
  and D = −E_x E_q[log p(x|z)], so that ELBO = −(D + R).
- **Mutual information** I(x; z) under the aggregate posterior q(z) = E_x[q(z|x)] (Hoffman &
  Johnson 2016; the estimator of He et al. 2019):

      I = E_x[KL(q(z|x) ‖ p(z))] − KL(q(z) ‖ p(z)) = E_x E_{q(z|x)}[log q(z|x) − log q(z)],

  p(z) cancelling. Over N encoded examples, q(z) is the mixture (1/N) Σ_m q(z|x_m), so

      Î = (1/N) Σ_n E_{z ~ q(z|x_n)}[log q(z|x_n) − logmeanexp_m log q(z|x_m)],

  estimated with S draws per example. Each term is at most log N (the mixture contains
  q(z|x_n)/N), and each expectation is a KL divergence, so Î lies in [0, log N] up to Monte
  Carlo noise: it is the mutual information between z and the *index* of a uniformly chosen
  example, which cannot exceed log N. I(x; z) is therefore under-estimated when it approaches
  log N: use N well above e^I.

A conditional model is given each example's condition y (``condition=``, ``[n, c]`` aligned with
x): the posteriors are q(z|x, y), the KL is against p(z|y), and the mutual information is that
between z and the pair (x, y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.distributions import Distribution, Independent, Normal
from tqdm.auto import tqdm

from vaelab.distributions.sampling import has_noise_form, reparameterise
from vaelab.evaluation.loglik import prepare_condition, prepare_data, standard_error
from vaelab.model.vae_model import VAEModel, given_rows
from vaelab.objectives.bounds import elbo, kl_per_dimension, kl_term
from vaelab.objectives.layers import kl_per_layer
from vaelab.objectives.noise import MEAN_SAMPLES, ExampleNoise, fresh_seed, posterior_mean

__all__ = [
    "ACTIVITY_THRESHOLD",
    "COLLAPSED_KL",
    "CollapseDiagnostics",
    "MutualInformation",
    "RateDistortion",
    "activity",
    "activity_beyond_layer_above",
    "collapse_diagnostics",
    "mean_kl_per_dimension",
    "mutual_information",
    "rate_distortion",
]

ACTIVITY_THRESHOLD = 1e-2  # Burda et al. (2016)
COLLAPSED_KL = 1e-2  # nats: a layer whose mean KL is below this has collapsed onto its prior
MI_EXAMPLES = 1000  # examples of the aggregate posterior in I(x; z) by default

# Latent codes scored against all N posteriors at once in the mutual information: [chunk, N, latent]
_MI_ELEMENTS = 2**22


def _check_variance_over(x: torch.Tensor) -> None:
    if x.shape[0] < 2:
        raise ValueError("activity is a variance over examples and needs at least two")


@torch.no_grad()
def activity(
    model: VAEModel,
    x: Any,
    *,
    batch_size: int = 1000,
    seed: int | None = None,
    condition: Any = None,
) -> torch.Tensor:
    """A_u = Var_x(E_q[z_u | x]) for every latent unit, float64 ``[latent]`` (Burda et al. 2016).

    The variance over the examples of ``x`` uses the n − 1 denominator."""
    x = prepare_data(model, x)
    condition = prepare_condition(model, condition, x.shape[0])
    _check_variance_over(x)
    means = []
    for i in range(0, x.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        q = given_rows(model, condition, rows).posterior(x[rows])
        means.append(posterior_mean(q, x[rows], seed).double())
    return torch.cat(means).var(0).cpu()


@torch.no_grad()
def activity_beyond_layer_above(
    model: VAEModel,
    x: Any,
    *,
    batch_size: int = 100,
    seed: int | None = None,
) -> torch.Tensor:
    """R_u = Var_x(E_q[z_{l,u} − m_{l,u}(z_{l+1}) | x]) for every unit of a model with several
    stochastic layers (see the module docstring), float64 ``[latent]``, z₁ first; the top
    layer's entries are its activity A_u. The expectation is the mean over ``MEAN_SAMPLES``
    draws of z ~ q(z|x) from each example's own stream (``seed``), the variance over examples
    uses the n − 1 denominator."""
    if len(model.latent_sizes) < 2:
        raise ValueError("activity beyond the layer above needs a model with several layers")
    x = prepare_data(model, x)
    _check_variance_over(x)
    return _layer_means(model, x, batch_size, seed)[1].var(0).cpu()


def _layer_means(
    model: VAEModel, x: torch.Tensor, batch_size: int, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """E_q[z | x] and E_q[z_l − m_l(z_{l+1}) | x] (the top layer: E_q[z_L | x]) of a model with
    several layers, float64 ``[n, latent]`` each, from the same ``MEAN_SAMPLES`` draws per
    example: the first is what :func:`posterior_mean` gives, so its variance is the activity."""
    sizes = model.latent_sizes
    # The prior's conditionals in draw order: z_L → p(z_{L−1}|z_L), …, z₂ → p(z₁|z₂).
    below = list(reversed(model.prior().conditionals))  # below[j]: z_{j+2} → p(z_{j+1}|z_{j+2})
    means, innovations = [], []
    for i in range(0, x.shape[0], batch_size):
        rows = x[i : i + batch_size]
        z = ExampleNoise(rows, seed).sample(model.posterior(rows), MEAN_SAMPLES)
        means.append(z.mean(0).double())
        layers = z.split(list(sizes), dim=-1)  # each [samples, rows, d_l]
        parts = [layers[j] - below[j](layers[j + 1]).mean for j in range(len(sizes) - 1)]
        parts.append(layers[-1])
        innovations.append(torch.cat(parts, dim=-1).double().mean(0))
    return torch.cat(means), torch.cat(innovations)


@torch.no_grad()
def mean_kl_per_dimension(
    model: VAEModel, x: Any, *, batch_size: int = 1000, condition: Any = None
) -> torch.Tensor | None:
    """E_x[KL(q(z_u|x) ‖ p(z_u))] per latent unit, float64 ``[latent]``, exact; ``None`` when the
    posterior or the prior does not factorise over dimensions (full covariance, mixtures), where
    per-dimension KLs do not add up to the KL."""
    x = prepare_data(model, x)
    condition = prepare_condition(model, condition, x.shape[0])
    total = None
    for i in range(0, x.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        given = given_rows(model, condition, rows)
        per_dim = kl_per_dimension(given.posterior(x[rows]), given.prior())
        if per_dim is None:
            return None
        part = per_dim.double().sum(0)
        total = part if total is None else total + part
    assert total is not None
    return (total / x.shape[0]).cpu()


class RateDistortion(NamedTuple):
    """Per-example rate KL(q(z|x) ‖ p(z)) and distortion −E_q[log p(x|z)], float64 ``[n]``,
    nats; ``kl_exact`` says whether the rate is a closed form or a Monte Carlo estimate;
    ``kl_per_layer`` each stochastic layer's share of the rate, float64 ``[n, L]``, z₁'s first
    (``vaelab.objectives.layers.kl_per_layer``: the rate itself for one layer)."""

    rate: torch.Tensor
    distortion: torch.Tensor
    kl_exact: bool
    kl_per_layer: torch.Tensor | None = None


@torch.no_grad()
def rate_distortion(
    model: VAEModel,
    x: Any,
    *,
    samples: int = 16,
    batch_size: int = 1000,
    seed: int | None = None,
    condition: Any = None,
) -> RateDistortion:
    """Rate and distortion of each example (Alemi et al. 2018): the ELBO's two terms, with
    ``samples`` draws for the distortion (from each example's own stream, keyed by ``seed``)
    and the exact KL where one is registered."""
    if samples < 1:
        raise ValueError(f"samples must be a positive number, got {samples}")
    x = prepare_data(model, x)
    condition = prepare_condition(model, condition, x.shape[0])
    rates, distortions, shares = [], [], []
    for i in range(0, x.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        batch, given = x[rows], given_rows(model, condition, rows)
        q = given.posterior(batch)
        noise = None
        if has_noise_form(q):
            noise = ExampleNoise(batch, seed).normal(samples, q.event_shape, like=batch)
        terms = elbo(
            batch, given.posterior, given.prior, given.likelihood, samples=samples, noise=noise
        )
        rates.append(terms.kl.double().cpu())
        distortions.append(-terms.reconstruction.double().cpu())
        if len(model.latent_sizes) == 1:
            shares.append(rates[-1].unsqueeze(-1))
        else:  # the layers' shares from the same draws as the rate's Monte Carlo estimate
            z = q.sample((samples,)) if noise is None else reparameterise(q, noise)[0]
            shares.append(kl_per_layer(q, given.prior(), z).double().cpu())
    # Whether the ELBO used a closed form: ask the one place that decides (it ignores z then).
    _, exact = kl_term(q, given.prior(), q.sample((1,)))
    return RateDistortion(torch.cat(rates), torch.cat(distortions), exact, torch.cat(shares))


class MutualInformation(NamedTuple):
    """Î(x; z) in nats over ``examples`` examples, its standard error (over examples, treating
    their terms as independent) and the ceiling log N the estimator cannot exceed."""

    value: float
    standard_error: float
    examples: int
    upper_bound: float


def pairwise_log_prob(q: Distribution, z: torch.Tensor) -> torch.Tensor:
    """log q(z_i | x_m) of every code ``z: [codes, latent]`` under every posterior of the batch
    (``batch_shape [N]``): float64 ``[codes, N]``.

    For a diagonal Gaussian the quadratic form is expanded, Σ_u (z_u − μ_u)²/σ_u² =
    z²·(1/σ²) − 2 z·(μ/σ²) + μ²·(1/σ²), so the N² pairs cost two matrix products rather than a
    ``[codes, N, latent]`` tensor; in float64 the cancellation between the terms is far below the
    spread of the log-densities that the log-sum-exp compares.
    """
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        # Centring on the mean location keeps the expanded terms as small as the spread allows.
        centre = q.base_dist.loc.double().mean(0)
        loc = q.base_dist.loc.double() - centre  # [N, latent]
        precision = q.base_dist.scale.double().square().reciprocal()
        z = z.double() - centre
        quadratic = (
            z.square() @ precision.T
            - 2.0 * z @ (loc * precision).T
            + (loc.square() * precision).sum(-1)
        )
        log_norm = -0.5 * precision.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        return -0.5 * quadratic - log_norm
    return q.log_prob(z.unsqueeze(1)).double()  # [codes, 1, latent] against batch [N]


@torch.no_grad()
def mutual_information(
    model: VAEModel,
    x: Any,
    *,
    samples: int = 10,
    seed: int | None = None,
    progress: bool = False,
    condition: Any = None,
) -> MutualInformation:
    """I(x; z) under the aggregate posterior of the N examples ``x`` (see the module docstring):
    mean over n and ``samples`` draws z ~ q(z|x_n) of log q(z|x_n) − log (1/N) Σ_m q(z|x_m).

    All N posteriors are built at once and every draw is scored against all of them in chunks,
    so the cost is O(samples · N² · latent): pass a subset of a large data set. A tqdm bar over
    the chunks of codes is shown when ``progress``.
    """
    if samples < 1:
        raise ValueError(f"samples must be a positive number, got {samples}")
    x = prepare_data(model, x)
    n = x.shape[0]
    condition = prepare_condition(model, condition, n)
    q = given_rows(model, condition, slice(None)).posterior(x)  # batch_shape [N]
    z = ExampleNoise(x, seed).sample(q, samples)  # [S, N, latent]
    flat = z.reshape(-1, *q.event_shape)  # [S·N, latent]; code i belongs to example i mod N
    latent = max(1, math.prod(q.event_shape))
    chunk = max(1, _MI_ELEMENTS // (n * latent))
    terms = []
    starts = range(0, flat.shape[0], chunk)
    for i in tqdm(starts, desc="I(x; z)", unit="chunk", disable=not progress):
        pairs = pairwise_log_prob(q, flat[i : i + chunk])  # [chunk, N]
        rows = torch.arange(pairs.shape[0], device=pairs.device)
        # log q(z | x_own) read off the same matrix as the mixture, so that each term is
        # ≤ log N to the last bit: the mixture's log-sum-exp contains it.
        own = pairs[rows, (rows + i) % n]
        terms.append(own - (torch.logsumexp(pairs, dim=1) - math.log(n)))
    per_example = torch.cat(terms).reshape(samples, n).mean(0).cpu()  # [N]
    return MutualInformation(
        value=float(per_example.mean()),
        standard_error=standard_error(per_example),
        examples=n,
        upper_bound=math.log(n),
    )


@dataclass(frozen=True)
class CollapseDiagnostics:
    """The collapse diagnostics of a model on a data set; see the module docstring.

    ``activity`` and ``kl_per_dimension`` are float64 ``[latent]`` (the latter ``None`` when it is
    not defined); rate and distortion are means over examples with their standard errors;
    ``mutual_information`` is ``None`` when it was not computed, ``mutual_information_note``
    saying why. ``latent_sizes`` are the stochastic layers' sizes as they lie in a code, z₁
    first (empty: one layer of all the units); ``activity_beyond`` is R_u of every unit
    ``[latent]`` for a model with several layers, else ``None``. ``kl_per_layer`` is each
    layer's mean KL, float64 ``[L]`` (``RateDistortion.kl_per_layer``).
    """

    activity: torch.Tensor
    threshold: float
    kl_per_dimension: torch.Tensor | None
    rate: float
    rate_standard_error: float
    distortion: float
    distortion_standard_error: float
    mutual_information: MutualInformation | None
    mutual_information_note: str | None = None
    latent_sizes: tuple[int, ...] = ()
    activity_beyond: torch.Tensor | None = None
    kl_per_layer: torch.Tensor | None = None

    @property
    def active_units(self) -> int:
        """Units with A_u above the threshold."""
        return int((self.activity > self.threshold).sum())

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """The stochastic layers' sizes, z₁ first; one entry for a model with one layer."""
        return self.latent_sizes or (int(self.activity.numel()),)

    @property
    def active_units_per_layer(self) -> list[int]:
        """Active units of each stochastic layer, z₁ first (Burda et al. 2016 count them so)."""
        layers = self.activity.split(list(self.layer_sizes))
        return [int((a > self.threshold).sum()) for a in layers]

    @property
    def active_units_beyond_layer_above(self) -> list[int] | None:
        """Units of each layer, z₁ first, with R_u above the threshold (the top layer's count is
        its active units); None for a model with one layer."""
        if self.activity_beyond is None:
            return None
        layers = self.activity_beyond.split(list(self.layer_sizes))
        return [int((r > self.threshold).sum()) for r in layers]

    @property
    def collapsed_layers(self) -> list[bool]:
        """For each stochastic layer, z₁ first: whether it collapsed onto its prior (no active
        unit, or a mean KL below ``COLLAPSED_KL`` nats)."""
        kls = [math.inf] * len(self.layer_sizes)
        if self.kl_per_layer is not None:
            kls = self.kl_per_layer.tolist()
        return [
            count == 0 or kl < COLLAPSED_KL
            for count, kl in zip(self.active_units_per_layer, kls, strict=True)
        ]

    @property
    def elbo(self) -> float:
        """−(distortion + rate): the mean ELBO, nats."""
        return -(self.distortion + self.rate)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (tensors as lists)."""
        mi = self.mutual_information
        return {
            "active_units": self.active_units,
            "latent_dim": int(self.activity.numel()),
            "active_units_per_layer": self.active_units_per_layer,
            "latent_sizes": list(self.layer_sizes),
            "active_units_beyond_layer_above": self.active_units_beyond_layer_above,
            "kl_per_layer": None if self.kl_per_layer is None else self.kl_per_layer.tolist(),
            "collapsed_layers": self.collapsed_layers,
            "activity_threshold": self.threshold,
            "activity": self.activity.tolist(),
            "kl_per_dimension": (
                None if self.kl_per_dimension is None else self.kl_per_dimension.tolist()
            ),
            "rate": {"mean": self.rate, "standard_error": self.rate_standard_error},
            "distortion": {
                "mean": self.distortion,
                "standard_error": self.distortion_standard_error,
            },
            "mutual_information": None
            if mi is None
            else {
                "mean": mi.value,
                "standard_error": mi.standard_error,
                "examples": mi.examples,
                "upper_bound": mi.upper_bound,
            },
            "mutual_information_note": self.mutual_information_note,
        }


def collapse_diagnostics(
    model: VAEModel,
    x: Any,
    *,
    threshold: float = ACTIVITY_THRESHOLD,
    samples: int = 16,
    mi_examples: int | None = None,
    mi_samples: int = 10,
    seed: int | None = None,
    progress: bool = False,
    condition: Any = None,
) -> CollapseDiagnostics:
    """All diagnostics on ``x``: activity (active units above ``threshold``), mean KL per
    dimension, rate and distortion (``samples`` draws per example) and the mutual information on
    a random subset of ``mi_examples`` examples (``mi_samples`` draws each); ``seed`` keys every
    example's draws and picks the subset (``None``: fresh randomness).

    The mutual information scores every code under every posterior of the subset. For a
    posterior whose density at a point it did not draw costs a sequential inverse (an IAF: D
    passes of its MADE per step) that is N² inverses, minutes where a Gaussian takes
    milliseconds; it is then left out (``None``, with ``mutual_information_note`` saying why)
    unless ``mi_examples`` is set explicitly to a number of examples."""
    x = prepare_data(model, x)
    condition = prepare_condition(model, condition, x.shape[0])
    if mi_examples is not None and mi_examples < 2:
        raise ValueError(f"mi_examples must be at least 2, got {mi_examples}")
    terms = rate_distortion(model, x, samples=samples, seed=seed, condition=condition)
    n = x.shape[0]
    information, note = None, None
    with torch.no_grad():
        q = given_rows(model, condition, slice(0, 1)).posterior(x[:1])
    if mi_examples is None and not getattr(q, "cheap_log_prob_anywhere", True):
        note = (
            f"not computed: a {type(q).__name__}'s density at another example's code needs a "
            "sequential inverse, and the estimator needs it for every pair of examples; pass "
            "mi_examples=N to pay for it"
        )
    else:
        size = mi_examples or MI_EXAMPLES
        subset, subset_condition = x, condition
        if n > size:
            chooser = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
            chosen = torch.randperm(n, generator=chooser)[:size].to(x.device)
            subset = x[chosen]
            subset_condition = None if condition is None else condition[chosen]
        information = mutual_information(
            model,
            subset,
            samples=mi_samples,
            seed=seed,
            progress=progress,
            condition=subset_condition,
        )
    if len(model.latent_sizes) > 1:  # both activities from one set of draws
        _check_variance_over(x)
        means, innovations = _layer_means(model, x, 100, seed)
        unit_activity, activity_beyond = means.var(0).cpu(), innovations.var(0).cpu()
    else:
        unit_activity = activity(model, x, seed=seed, condition=condition)
        activity_beyond = None
    return CollapseDiagnostics(
        activity=unit_activity,
        threshold=threshold,
        kl_per_dimension=mean_kl_per_dimension(model, x, condition=condition),
        rate=float(terms.rate.mean()),
        rate_standard_error=standard_error(terms.rate),
        distortion=float(terms.distortion.mean()),
        distortion_standard_error=standard_error(terms.distortion),
        mutual_information=information,
        mutual_information_note=note,
        latent_sizes=model.latent_sizes,
        activity_beyond=activity_beyond,
        kl_per_layer=None if terms.kl_per_layer is None else terms.kl_per_layer.mean(0),
    )
