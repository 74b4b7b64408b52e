"""The assembled model: ``VAEModel`` (a posterior, a prior and a likelihood in one module, whose
``elbo`` and ``iwae`` call the objectives), the condition y as one more input of every component
(``conditioning``), and configuration strings resolved once into components (``registry``).

Sits above ``vaelab.objectives`` because the model's own ``elbo`` and ``iwae`` call them; may
import the objectives, the components and the distributions.
"""

from vaelab.model.vae_model import VAEModel

__all__ = ["VAEModel"]
