"""Configuration strings → component objects, resolved once.

A configuration says ``likelihood="bernoulli"``; the table here says which class does the work. A new
component is one entry in a table, never a branch elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from vaelab.components.classifier import Classifier
from vaelab.components.discrete import (
    BernoulliPosterior,
    BernoulliPrior,
    CategoricalPosterior,
    CategoricalPrior,
)
from vaelab.components.flows import DEFAULT_FLOW_STEPS, IAFPosterior, PlanarFlowPosterior
from vaelab.components.hierarchy import FirstLayerDecoder, HierarchicalPosterior, HierarchicalPrior
from vaelab.components.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
    Likelihood,
)
from vaelab.components.networks import ACTIVATIONS, MLP, NETWORKS, decoder_network, encoder_network
from vaelab.components.posteriors import DiagonalGaussianPosterior, FullCovariancePosterior
from vaelab.components.priors import (
    ConditionalGaussianPrior,
    LearnableGaussianPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)
from vaelab.components.top_down import BottomUpMLP, TopDownPosterior, TopDownPrior
from vaelab.components.top_down_conv import BottomUpConv
from vaelab.distributions.discretized_logistic import LOGISTIC_MIXTURE_COMPONENTS
from vaelab.model.semi_supervised import SemiSupervisedModel
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.discrete import check_latent_gradient


@dataclass(frozen=True)
class LikelihoodSpec:
    """How to build a likelihood: parameters per data dimension and a constructor."""

    params_per_dim: int
    build: Callable[[nn.Module, tuple[int, ...]], Likelihood]
    summary: str


LIKELIHOODS: dict[str, LikelihoodSpec] = {
    "bernoulli": LikelihoodSpec(
        1, BernoulliLikelihood, "Bernoulli with decoder logits; data in [0, 1]"
    ),
    "continuous-bernoulli": LikelihoodSpec(
        1, ContinuousBernoulliLikelihood, "continuous Bernoulli (normalised on [0, 1])"
    ),
    "gaussian": LikelihoodSpec(
        1, lambda d, s: GaussianLikelihood(d, s, "shared"), "Gaussian, one learned σ (isotropic)"
    ),
    "gaussian-fixed": LikelihoodSpec(
        1, lambda d, s: GaussianLikelihood(d, s, "fixed"), "Gaussian with σ = 1 fixed"
    ),
    "gaussian-per-dimension": LikelihoodSpec(
        1,
        lambda d, s: GaussianLikelihood(d, s, "per-dimension"),
        "Gaussian, a learned σ per data dimension",
    ),
    "gaussian-decoder": LikelihoodSpec(
        2,
        lambda d, s: GaussianLikelihood(d, s, "decoder"),
        "Gaussian, σ(z) predicted by the decoder",
    ),
    "laplace": LikelihoodSpec(1, LaplaceLikelihood, "Laplace, one learned scale"),
    "discretized-logistic": LikelihoodSpec(
        2,
        DiscretizedLogisticLikelihood,
        "discretised logistic per pixel; 8-bit pixels, 0..255 or /255",
    ),
    "discretized-logistic-mixture": LikelihoodSpec(
        3 * LOGISTIC_MIXTURE_COMPONENTS,
        DiscretizedLogisticMixtureLikelihood,
        f"mixture of {LOGISTIC_MIXTURE_COMPONENTS} discretised logistics per pixel; 8-bit pixels",
    ),
}


@dataclass(frozen=True)
class PosteriorSpec:
    """How to build a posterior: the encoder features it reads for (latent, flow_steps), and a
    constructor taking (encoder, latent, flow_steps)."""

    n_params: Callable[[int, int], int]
    build: Callable[[nn.Module, int, int], nn.Module]
    summary: str


POSTERIORS: dict[str, PosteriorSpec] = {
    "diagonal": PosteriorSpec(
        lambda latent, steps: DiagonalGaussianPosterior.n_params(latent),
        lambda encoder, latent, steps: DiagonalGaussianPosterior(encoder, latent),
        "diagonal Gaussian",
    ),
    "full": PosteriorSpec(
        lambda latent, steps: FullCovariancePosterior.n_params(latent),
        lambda encoder, latent, steps: FullCovariancePosterior(encoder, latent),
        "full-covariance Gaussian (Cholesky factor)",
    ),
    "planar": PosteriorSpec(
        PlanarFlowPosterior.n_params,
        PlanarFlowPosterior,
        "diagonal Gaussian through flow_steps planar layers (Rezende & Mohamed 2015)",
    ),
    "iaf": PosteriorSpec(
        IAFPosterior.n_params,
        IAFPosterior,
        "diagonal Gaussian through flow_steps inverse autoregressive steps (Kingma et al. 2016)",
    ),
}

# name → prior built from (latent size, posterior, data shape, condition size).
PRIORS: dict[str, Callable[[int, nn.Module, tuple[int, ...], int], nn.Module]] = {
    "normal": lambda latent, posterior, shape, condition: StandardNormalPrior(latent),
    "learnable": lambda latent, posterior, shape, condition: LearnableGaussianPrior(latent),
    "mixture": lambda latent, posterior, shape, condition: MixtureOfGaussiansPrior(latent),
    "vamp": lambda latent, posterior, shape, condition: VampPrior(posterior, shape),
    "conditional": lambda latent, posterior, shape, condition: ConditionalGaussianPrior(
        latent, condition
    ),
}


# Components that cannot be one of several stochastic layers, and why.
NOT_LAYERED: dict[tuple[str, str], str] = {
    ("posterior", "planar"): (
        "each layer's q is a Gaussian conditional read off the layer below; use "
        "posterior='diagonal' or 'full', or one latent size for a flow"
    ),
    ("posterior", "iaf"): (
        "each layer's q is a Gaussian conditional read off the layer below; use "
        "posterior='diagonal' or 'full', or one latent size for a flow"
    ),
    ("prior", "vamp"): (
        "the VampPrior mixes the encoder's posteriors q(z|u), which here are distributions over "
        "every layer rather than a prior for the top one; use prior='normal', 'learnable' or "
        "'mixture'"
    ),
}


# Why a conditional model cannot have the VampPrior or several stochastic layers.
NOT_CONDITIONAL = {
    "vamp": (
        "the VampPrior mixes the encoder's posteriors at learned pseudo-inputs, and a "
        "conditional encoder would need a condition for each of them; use prior='normal', "
        "'learnable', 'mixture' or 'conditional'"
    ),
    "layers": "conditioning is implemented for one stochastic layer; use one latent size",
}


# How the posterior over several stochastic layers is drawn: z₁ from x up (the chain of
# vaelab.components.hierarchy) or z_L down through the prior's networks (vaelab.components.top_down).
INFERENCES = ("bottom-up", "top-down")
# Bottom-up passes of top-down inference by network.
BOTTOM_UP = {"mlp": BottomUpMLP, "conv": BottomUpConv}
# Components that top-down inference cannot have, and why.
NOT_TOP_DOWN: dict[tuple[str, str], str] = {
    **{
        ("posterior", name): (
            "each layer's posterior is the precision-weighted product of two diagonal Gaussians, "
            "the bottom-up evidence and the prior's conditional (Sønderby et al. 2016); use "
            "posterior='diagonal'"
        )
        for name in ("full", "planar", "iaf")
    },
    **{
        ("prior", name): (
            "the top layer's posterior is p(z_L) merged with a Gaussian, which needs a Gaussian "
            "p(z_L); use prior='normal' or 'learnable'"
        )
        for name in ("mixture", "vamp", "conditional")
    },
}

LATENTS = ("gaussian", "bernoulli", "categorical")
DEFAULT_CATEGORIES = 10

# Options a discrete latent cannot have, and what to use instead: (option, value) → why.
NOT_DISCRETE: dict[tuple[str, str], str] = {
    (
        "posterior",
        "full",
    ): "a discrete posterior is its encoder's logits; leave posterior='diagonal'",
    ("posterior", "planar"): "flows transform continuous codes; leave posterior='diagonal'",
    ("posterior", "iaf"): "flows transform continuous codes; leave posterior='diagonal'",
    (
        "prior",
        "mixture",
    ): "a discrete prior is factorised; use prior='normal' (uniform) or 'learnable'",
    (
        "prior",
        "vamp",
    ): "a discrete prior is factorised; use prior='normal' (uniform) or 'learnable'",
    (
        "prior",
        "conditional",
    ): "discrete latents read no condition; use prior='normal' or 'learnable'",
}


def _choose(kind: str, name: object, table: Any) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(table)}")
    return table[name]


def plain_integers(value: Any) -> Any:
    """``value`` with numpy integers as Python ints: ``np.int64(3)`` → 3, an integer array
    ``[d]`` or a list or tuple holding numpy integers → a tuple of ints (the sizes that
    ``GridSearchCV`` hands over from ``np.arange``, which JSON cannot write). Anything else
    (floats, booleans, strings) is returned as it is, for validation to refuse in its words."""
    if isinstance(value, np.integer):  # np.bool_ is not one
        return int(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.ndim <= 1:
        return int(value) if value.ndim == 0 else tuple(int(v) for v in value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, np.integer) for v in value):
        return tuple(plain_integers(v) for v in value)
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture (saved as JSON beside its weights).

    Numpy integers given for sizes are kept as Python ints (``plain_integers``), so that the
    configuration is written to JSON as given."""

    data_shape: tuple[int, ...]
    latent_dim: int | tuple[int, ...] = 8
    hidden: tuple[int, ...] = (256,)
    likelihood: str = "bernoulli"
    prior: str = "normal"
    posterior: str = "diagonal"
    network: str = "mlp"
    activation: str = "relu"
    flow_steps: int = DEFAULT_FLOW_STEPS
    condition_dim: int = 0  # size of the condition y of a conditional model (0: none)
    # M2 (vaelab.model.semi_supervised): a classifier q(y|x) over the condition_dim classes.
    semi_supervised: bool = False
    inference: str = "bottom-up"  # or "top-down" (vaelab.components.top_down)
    latent: str = "gaussian"  # the code's family: "gaussian", "bernoulli" or "categorical"
    categories: int = DEFAULT_CATEGORIES  # K classes per group of a categorical code

    def __post_init__(self) -> None:
        for name in ("latent_dim", "hidden", "flow_steps", "condition_dim", "categories"):
            object.__setattr__(self, name, plain_integers(getattr(self, name)))

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        """The stochastic layers' sizes, z₁ (the one the likelihood reads) first: ``(d,)`` for
        an integer ``latent_dim``."""
        return self.latent_dim if isinstance(self.latent_dim, tuple) else (self.latent_dim,)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option that cannot work."""
        sizes = self.latent_sizes
        if not sizes or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in sizes):
            raise ValueError(
                "latent_dim must be a positive integer, or a tuple of them for several "
                f"stochastic layers (z₁ first, e.g. (100, 50)), got {self.latent_dim!r}"
            )
        if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a tuple of positive integers, got {self.hidden!r}")
        _choose("likelihood", self.likelihood, LIKELIHOODS)
        _choose("prior", self.prior, PRIORS)
        _choose("posterior", self.posterior, POSTERIORS)
        steps = self.flow_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"flow_steps must be a positive integer, got {self.flow_steps!r}")
        _choose("network", self.network, NETWORKS)
        _choose("activation", self.activation, ACTIVATIONS)
        self._validate_condition()
        self._validate_inference()
        self._validate_latent()
        if len(sizes) > 1 and self.inference == "bottom-up":
            for kind, name in (("posterior", self.posterior), ("prior", self.prior)):
                why = NOT_LAYERED.get((kind, name))
                if why is not None:
                    raise ValueError(
                        f"{kind}={name!r} does not work with several stochastic layers "
                        f"(latent_dim={self.latent_dim!r}): {why}"
                    )

    def _validate_inference(self) -> None:
        """The inference order, and what top-down inference cannot have."""
        if self.inference not in INFERENCES:
            raise ValueError(
                f"unknown inference {self.inference!r}; choose one of: {', '.join(INFERENCES)}"
            )
        if self.inference == "bottom-up":
            return
        for kind, name in (("posterior", self.posterior), ("prior", self.prior)):
            why = NOT_TOP_DOWN.get((kind, name))
            if why is not None:
                raise ValueError(f"{kind}={name!r} does not work with inference='top-down': {why}")
        if self.condition_dim > 0:
            raise ValueError(
                "inference='top-down' does not work with a conditional model: conditioning is "
                "implemented for bottom-up inference with one stochastic layer"
            )

    @property
    def code_size(self) -> int:
        """Numbers in one code z: latent_dim, or D·K for D categorical groups of K classes."""
        d = self.latent_sizes[0]
        return d * self.categories if self.latent == "categorical" else d

    def check_gradient(self, gradient: str) -> None:
        """Refuse a gradient estimator this code cannot use (``ValueError``, one line): the
        discrete estimators with a Gaussian code, STL and DReG with a discrete one, and
        ``"enumerate"`` over too many states."""
        sizes, k = self.latent_sizes, self.categories
        states = 0  # sizes that validate() refuses count none here
        discrete = self.latent != "gaussian"
        if discrete and len(sizes) == 1 and isinstance(sizes[0], int) and isinstance(k, int):
            states = k ** sizes[0] if self.latent == "categorical" else 2 ** sizes[0]
        check_latent_gradient(self.latent, states, gradient)

    def _validate_latent(self) -> None:
        """The code's family, and the options that only a Gaussian code has."""
        if self.latent not in LATENTS:
            raise ValueError(f"unknown latent {self.latent!r}; choose one of: {', '.join(LATENTS)}")
        k = self.categories
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise ValueError(f"categories must be an integer of at least 2, got {k!r}")
        if self.latent == "gaussian":
            return
        for kind, name in (("posterior", self.posterior), ("prior", self.prior)):
            why = NOT_DISCRETE.get((kind, name))
            if why is not None:
                raise ValueError(
                    f"{kind}={name!r} does not work with latent={self.latent!r}: {why}"
                )
        if self.inference != "bottom-up":
            raise ValueError(
                f"inference={self.inference!r} draws Gaussian layers from the top down; "
                f"latent={self.latent!r} has one discrete layer, so leave inference='bottom-up'"
            )
        if len(self.latent_sizes) > 1:
            raise ValueError(
                f"latent={self.latent!r} has one stochastic layer; give latent_dim one integer, "
                f"not {self.latent_dim!r}"
            )
        if self.condition_dim:
            raise ValueError(
                f"latent={self.latent!r} is implemented without conditioning; use "
                "latent='gaussian' for a conditional model"
            )

    def _validate_condition(self) -> None:
        """The condition size, and the components a conditional model cannot have."""
        c = self.condition_dim
        if not isinstance(c, int) or isinstance(c, bool) or c < 0:
            raise ValueError(f"condition_dim must be a non-negative integer, got {c!r}")
        if self.semi_supervised and c < 2:
            raise ValueError(
                "a semi-supervised model classifies into the classes of its labels, so it needs "
                f"a conditional model of two classes or more (condition_dim={c})"
            )
        if c == 0:
            if self.prior == "conditional":
                raise ValueError(
                    "prior='conditional' is p(z|y), which needs a condition y; train a "
                    "conditional model (conditional=True, --conditional) or choose another prior"
                )
            return
        if self.prior == "vamp":
            raise ValueError(
                f"prior='vamp' does not work with a conditional model: {NOT_CONDITIONAL['vamp']}"
            )
        if len(self.latent_sizes) > 1:
            raise ValueError(
                f"latent_dim={self.latent_dim!r} does not work with a conditional model: "
                f"{NOT_CONDITIONAL['layers']}"
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown model configuration keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("data_shape", "hidden"):
            if key in values:
                values[key] = tuple(values[key])
        if isinstance(values.get("latent_dim"), list):  # several stochastic layers
            values["latent_dim"] = tuple(values["latent_dim"])
        return cls(**values)


def build_model(config: ModelConfig) -> VAEModel:
    """A freshly initialised ``VAEModel`` for ``config``.

    With several latent sizes (d₁, …, d_L) the x ↔ z₁ networks are those of one layer of size d₁
    (``network`` and ``hidden``), p(z_L) is the chosen prior, and each pair of neighbouring layers
    is joined by MLPs with as many hidden layers as ``hidden`` has, each as wide as the lower
    layer z_l: q(z_{l+1}|z_l) of the chosen posterior family and a diagonal Gaussian
    p(z_l|z_{l+1}). With ``hidden=(200, 200)`` and (100, 50) that is the two-stochastic-layer
    model of Burda et al. (2016): x → 200 → 200 → z₁ (100) → 100 → 100 → z₂ (50) and its mirror;
    ``hidden=()`` keeps every map linear.

    With ``inference="top-down"`` (any number of layers, one included) the generative path is
    the same (p(z_L), those conditionals, the decoder of z₁) and the posterior is a bottom-up pass
    over x (``BOTTOM_UP[network]``) merged with it layer by layer, z_L first
    (``vaelab.components.top_down``).
    """
    config.validate()
    if config.latent != "gaussian":
        return _build_discrete(config)
    sizes = config.latent_sizes
    posterior_spec = POSTERIORS[config.posterior]
    likelihood = LIKELIHOODS[config.likelihood]
    # A conditional model's networks read y beside x (encoder) and beside z (decoder).
    condition = config.condition_dim
    encoder = encoder_network(
        config.network,
        config.data_shape,
        config.hidden,
        posterior_spec.n_params(sizes[0], config.flow_steps),
        config.activation,
        condition,
    )
    posterior = posterior_spec.build(encoder, sizes[0], config.flow_steps)
    decoder = decoder_network(
        config.network,
        sizes[0],
        config.hidden,
        config.data_shape,
        likelihood.params_per_dim,
        config.activation,
        condition,
    )
    prior = PRIORS[config.prior](sizes[-1], posterior, config.data_shape, condition)
    if config.inference == "top-down":
        posterior, prior, decoder = _top_down(config, prior, decoder)
    elif len(sizes) > 1:
        posterior, prior, decoder = _stochastic_layers(config, posterior, prior, decoder)
    built = likelihood.build(decoder, config.data_shape)
    if config.semi_supervised:
        classifier = Classifier(
            config.network, config.data_shape, config.hidden, condition, config.activation
        )
        return SemiSupervisedModel(posterior, prior, built, condition, classifier)
    return VAEModel(posterior, prior, built, condition)


def _build_discrete(config: ModelConfig) -> VAEModel:
    """A model with a discrete code (``vaelab.components.discrete``): the encoder gives the
    posterior's logits, the decoder reads the code (D binary units or D·K one-hot numbers);
    prior ``"normal"`` (the default) is the uniform one, ``"learnable"`` a learned factorised
    one."""
    d, k, shape = config.latent_sizes[0], config.categories, config.data_shape
    likelihood = LIKELIHOODS[config.likelihood]
    encoder = encoder_network(
        config.network, shape, config.hidden, config.code_size, config.activation
    )
    learnable = config.prior == "learnable"
    posterior: nn.Module
    prior: nn.Module
    if config.latent == "bernoulli":
        posterior, prior = BernoulliPosterior(encoder, d, shape), BernoulliPrior(d, learnable)
    else:
        posterior = CategoricalPosterior(encoder, d, k, shape)
        prior = CategoricalPrior(d, k, learnable)
    decoder = decoder_network(
        config.network,
        config.code_size,
        config.hidden,
        shape,
        likelihood.params_per_dim,
        config.activation,
    )
    return VAEModel(posterior, prior, likelihood.build(decoder, shape))


def _stochastic_layers(
    config: ModelConfig, posterior: nn.Module, prior: nn.Module, decoder: nn.Module
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The single-layer pieces for z₁ (``posterior``, ``decoder``) and z_L (``prior``) joined by
    the conditionals between the layers (see ``build_model``)."""
    sizes, spec, depth = config.latent_sizes, POSTERIORS[config.posterior], len(config.hidden)

    def body(d_in: int, width: int, d_out: int) -> MLP:
        return MLP((d_in,), (width,) * depth, d_out, config.activation)

    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))  # (d_l, d_{l+1}), z₁ side first
    upward = [
        spec.build(
            body(lower, lower, spec.n_params(upper, config.flow_steps)), upper, config.flow_steps
        )
        for lower, upper in pairs
    ]
    downward = _downward(config)  # drawn after the upward ones: the same weights from a seed
    return (
        HierarchicalPosterior(posterior, upward, sizes),
        HierarchicalPrior(prior, downward, sizes),
        FirstLayerDecoder(decoder, sizes[0]),
    )


def _downward(config: ModelConfig) -> list[nn.Module]:
    """The prior's conditionals in the order they are drawn, p(z_{L−1}|z_L) first: diagonal
    Gaussians read by MLPs as deep as ``hidden``, each as wide as the layer it gives."""
    sizes, depth = config.latent_sizes, len(config.hidden)
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    return [
        DiagonalGaussianPosterior(
            MLP(
                (upper,),
                (lower,) * depth,
                DiagonalGaussianPosterior.n_params(lower),
                config.activation,
            ),
            lower,
        )
        for lower, upper in reversed(pairs)
    ]


def _top_down(
    config: ModelConfig, prior: nn.Module, decoder: nn.Module
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Top-down inference at any depth (``vaelab.components.top_down``): the generative path of
    the bottom-up chain (p(z_L) = ``prior``, the conditionals of ``_downward``, the decoder of z₁),
    and a posterior that merges a bottom-up pass over x (``BOTTOM_UP[network]``) with it."""
    sizes = config.latent_sizes
    top_down_prior = TopDownPrior(prior, _downward(config), sizes)
    bottom_up = BOTTOM_UP[config.network](
        config.data_shape, config.hidden, sizes, config.activation
    )
    return (
        TopDownPosterior(bottom_up, top_down_prior),
        top_down_prior,
        FirstLayerDecoder(decoder, sizes[0]),
    )
