"""Monte Carlo noise that is a function of the example it is used for.

An estimate such as ``VAE.score_samples`` should give an example the same number whichever other
examples are passed with it and in whatever order. Drawing ε from one generator for the whole batch
breaks that; sharing one ε across all examples keeps it but correlates every example's error, so a
data-set average no longer improves with more data. Seeding each example's draws from a hash of its
own values gives both: independent errors across distinct examples, and a value per example that
depends on nothing else.
"""

from __future__ import annotations

import hashlib

import torch


def example_noise(x: torch.Tensor, samples: int, latent_dim: int, salt: int = 0) -> torch.Tensor:
    """Standard normal ε ``[samples, batch, latent]`` whose column b depends only on ``x[b]``
    (its bytes) and ``salt``."""
    rows = x.detach().cpu().contiguous().reshape(x.shape[0], -1).numpy()
    columns = []
    for row in rows:
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=salt.to_bytes(8, "little"))
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        columns.append(torch.randn(samples, latent_dim, generator=generator))
    return torch.stack(columns, dim=1).to(device=x.device)
