"""The pieces a VAE is made of, each an ``nn.Module`` returning a distribution.

Networks (``networks``, ``made``), posteriors q(z|x) (``posteriors``, ``flows``), priors p(z)
(``priors``), likelihoods p(x|z) (``likelihoods``, one module per family) and several stochastic
layers (``hierarchy``). May import ``vaelab.distributions`` only.
"""
