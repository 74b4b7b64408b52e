"""The bounds a VAE is trained and scored on, as pure functions of (x, posterior, prior,
likelihood): the ELBO and the IWAE bound with their gradient estimators (``bounds``), and the Monte
Carlo noise keyed per example that makes an estimate repeatable (``noise``).

May import ``vaelab.components`` and ``vaelab.distributions``.
"""

from vaelab.objectives.bounds import (
    GRADIENTS,
    KL_METHODS,
    OBJECTIVES,
    ElboTerms,
    IwaeTerms,
    check_objective,
    elbo,
    iwae_bound,
    kl_per_dimension,
    kl_term,
    log_importance_weights,
    objective_terms,
)
from vaelab.objectives.layers import kl_per_layer

__all__ = [
    "GRADIENTS",
    "KL_METHODS",
    "OBJECTIVES",
    "ElboTerms",
    "IwaeTerms",
    "check_objective",
    "elbo",
    "iwae_bound",
    "kl_per_dimension",
    "kl_per_layer",
    "kl_term",
    "log_importance_weights",
    "objective_terms",
]
