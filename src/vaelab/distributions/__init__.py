"""The ``torch.distributions`` vaelab adds, and the closed-form KL divergences registered for them.

- ``normal``: the diagonal Gaussian of a posterior and the standard normal of a prior;
- ``kl``: closed-form Gaussian KLs and their ``register_kl`` pairs (where the KL is);
- ``stop_gradient``: a distribution with the same values and no gradient to its parameters;
- ``sampling``: drawing from location-scale families and flows with given noise;
- ``chain``: several stochastic layers as one distribution over their concatenated code;
- ``discretized_logistic``: the discretised logistic over 8-bit pixels;
- ``continuous_bernoulli``: the continuous Bernoulli with a mean accurate near λ = ½.

May import torch and nothing else of vaelab: these are the mathematics the components are built on.
"""
