"""Configuration strings → component objects, resolved once.

A configuration says ``likelihood="bernoulli"``; the table here says which class does the work. A new
component is one entry in a table, never a branch elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vaelab.flows import DEFAULT_FLOW_STEPS, IAFPosterior, PlanarFlowPosterior
from vaelab.likelihoods import (
    LOGISTIC_MIXTURE_COMPONENTS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
    Likelihood,
)
from vaelab.model import VAEModel
from vaelab.networks import ACTIVATIONS, NETWORKS, decoder_network, encoder_network
from vaelab.posteriors import DiagonalGaussianPosterior, FullCovariancePosterior
from vaelab.priors import (
    LearnableGaussianPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)


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

PRIORS: dict[str, Callable[[int, nn.Module, tuple[int, ...]], nn.Module]] = {
    "normal": lambda latent, posterior, shape: StandardNormalPrior(latent),
    "learnable": lambda latent, posterior, shape: LearnableGaussianPrior(latent),
    "mixture": lambda latent, posterior, shape: MixtureOfGaussiansPrior(latent),
    "vamp": lambda latent, posterior, shape: VampPrior(posterior, shape),
}


def _choose(kind: str, name: object, table: Any) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(table)}")
    return table[name]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture (saved as JSON beside its weights)."""

    data_shape: tuple[int, ...]
    latent_dim: int = 8
    hidden: tuple[int, ...] = (256,)
    likelihood: str = "bernoulli"
    prior: str = "normal"
    posterior: str = "diagonal"
    network: str = "mlp"
    activation: str = "relu"
    flow_steps: int = DEFAULT_FLOW_STEPS

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option that cannot work."""
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a tuple of positive integers, got {self.hidden!r}")
        _choose("likelihood", self.likelihood, LIKELIHOODS)
        _choose("prior", self.prior, PRIORS)
        _choose("posterior", self.posterior, POSTERIORS)
        if not isinstance(self.flow_steps, int) or self.flow_steps < 1:
            raise ValueError(f"flow_steps must be a positive integer, got {self.flow_steps!r}")
        _choose("network", self.network, NETWORKS)
        _choose("activation", self.activation, ACTIVATIONS)

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
        return cls(**values)


def build_model(config: ModelConfig) -> VAEModel:
    """A freshly initialised ``VAEModel`` for ``config``."""
    config.validate()
    posterior_spec = POSTERIORS[config.posterior]
    likelihood = LIKELIHOODS[config.likelihood]
    encoder = encoder_network(
        config.network,
        config.data_shape,
        config.hidden,
        posterior_spec.n_params(config.latent_dim, config.flow_steps),
        config.activation,
    )
    posterior = posterior_spec.build(encoder, config.latent_dim, config.flow_steps)
    decoder = decoder_network(
        config.network,
        config.latent_dim,
        config.hidden,
        config.data_shape,
        likelihood.params_per_dim,
        config.activation,
    )
    prior = PRIORS[config.prior](config.latent_dim, posterior, config.data_shape)
    return VAEModel(posterior, prior, likelihood.build(decoder, config.data_shape))
