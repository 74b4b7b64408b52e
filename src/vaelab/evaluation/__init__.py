"""How good is a model, and how far is its bound from log p(x): importance-weighted log-likelihood
(``loglik``), annealed importance sampling and BDMC (``ais``), inference gaps (``gap``), posterior
collapse (``diagnostics``), and the exact linear-Gaussian oracles (``ppca``, ``linear``).

Functions take a model and tensors and return dataclasses; they know no folders, flags or printing.
May import the model, the objectives, the components and the distributions.
"""
