"""vaelab: variational inference and variational autoencoders you can trust.

The public surface is small: the estimator ``VAE``, ``load``, the closed-form Gaussian KLs, the
objectives and the components a model is composed of (a conditional model's too:
``VAEModel.given(y)``, ``vaelab.conditioning``). The evaluation modules are public too, as
attributes after ``import vaelab``: ``vaelab.loglik`` (IWAE-k), ``vaelab.ais`` (annealed importance
sampling, BDMC), ``vaelab.gap`` (inference gaps), ``vaelab.diagnostics`` (posterior collapse) and
``vaelab.ppca`` (linear-Gaussian models in closed form); ``vaelab.fastpath`` compiles training and
evaluation with ``torch.compile``.
"""

from vaelab import ais as ais
from vaelab import diagnostics as diagnostics
from vaelab import fastpath as fastpath
from vaelab import gap as gap
from vaelab import loglik as loglik
from vaelab import ppca as ppca
from vaelab.estimator import VAE
from vaelab.flows import IAFPosterior, PlanarFlowPosterior
from vaelab.kl import kl_gaussian, kl_gaussian_tril, kl_standard_normal
from vaelab.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
)
from vaelab.model import VAEModel
from vaelab.objectives import ElboTerms, IwaeTerms, elbo, iwae_bound, objective_terms
from vaelab.posteriors import DiagonalGaussianPosterior, FullCovariancePosterior, stop_gradient
from vaelab.priors import (
    ConditionalGaussianPrior,
    LearnableGaussianPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)
from vaelab.registry import ModelConfig, build_model
from vaelab.serialization import ModelFileError, load

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "BernoulliLikelihood",
    "ConditionalGaussianPrior",
    "ContinuousBernoulliLikelihood",
    "DiagonalGaussianPosterior",
    "DiscretizedLogisticLikelihood",
    "DiscretizedLogisticMixtureLikelihood",
    "ElboTerms",
    "FullCovariancePosterior",
    "GaussianLikelihood",
    "IAFPosterior",
    "IwaeTerms",
    "LaplaceLikelihood",
    "LearnableGaussianPrior",
    "MixtureOfGaussiansPrior",
    "ModelConfig",
    "ModelFileError",
    "PlanarFlowPosterior",
    "StandardNormalPrior",
    "VAEModel",
    "VampPrior",
    "build_model",
    "elbo",
    "iwae_bound",
    "kl_gaussian",
    "kl_gaussian_tril",
    "kl_standard_normal",
    "load",
    "objective_terms",
    "stop_gradient",
]
