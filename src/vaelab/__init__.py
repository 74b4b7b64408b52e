"""vaelab: variational inference and variational autoencoders you can trust.

The public surface is small: the estimator ``VAE``, ``load``, the closed-form Gaussian KLs, the
objectives and the components a model is composed of (a conditional model's too:
``VAEModel.given(y)``, ``vaelab.conditioning``). The evaluation modules are public too, as
attributes after ``import vaelab``: ``vaelab.loglik`` (IWAE-k), ``vaelab.ais`` (annealed importance
sampling, BDMC), ``vaelab.gap`` (inference gaps), ``vaelab.diagnostics`` (posterior collapse) and
``vaelab.ppca`` (linear-Gaussian models in closed form); ``vaelab.fastpath`` compiles training and
evaluation with ``torch.compile``.

The package is built in rooms, each importing only the rooms below it (``make lint`` checks it):
``io`` → ``distributions`` → ``components`` → ``objectives`` → ``model`` → ``evaluation`` and
``data`` → ``train`` → ``estimator`` → ``runs`` → ``report`` → ``cli``. The modules of the flat
layout before it (``vaelab.loglik``, ``vaelab.kl``, ``vaelab.training``, …) still import, as names
of their new rooms (``vaelab._legacy``).
"""

from vaelab import _legacy
from vaelab.components.flows import IAFPosterior, PlanarFlowPosterior
from vaelab.components.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
)
from vaelab.components.posteriors import DiagonalGaussianPosterior, FullCovariancePosterior
from vaelab.components.priors import (
    ConditionalGaussianPrior,
    LearnableGaussianPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)
from vaelab.distributions.kl import kl_gaussian, kl_gaussian_tril, kl_standard_normal
from vaelab.distributions.stop_gradient import stop_gradient
from vaelab.estimator.facade import VAE, load
from vaelab.estimator.serialization import ModelFileError
from vaelab.evaluation import ais as ais
from vaelab.evaluation import diagnostics as diagnostics
from vaelab.evaluation import gap as gap
from vaelab.evaluation import loglik as loglik
from vaelab.evaluation import ppca as ppca
from vaelab.model.registry import ModelConfig, build_model
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import ElboTerms, IwaeTerms, elbo, iwae_bound, objective_terms
from vaelab.train import fastpath as fastpath

_legacy.install()

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
