"""Likelihoods p_θ(x|z): decoders that return a normalised distribution over the data, one module
per family (``bernoulli``: data in [0, 1]; ``real_valued``: Gaussian and Laplace; ``pixels``: the
discretised logistics of 8-bit pixels) over the shared ``base``."""

from vaelab.components.likelihoods.base import DataMoments, Likelihood
from vaelab.components.likelihoods.bernoulli import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
)
from vaelab.components.likelihoods.pixels import (
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
    PixelLikelihood,
)
from vaelab.components.likelihoods.real_valued import (
    GAUSSIAN_SCALES,
    GaussianLikelihood,
    LaplaceLikelihood,
)

__all__ = [
    "GAUSSIAN_SCALES",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "DataMoments",
    "DiscretizedLogisticLikelihood",
    "DiscretizedLogisticMixtureLikelihood",
    "GaussianLikelihood",
    "LaplaceLikelihood",
    "Likelihood",
    "PixelLikelihood",
]
