"""vaelab as a library: fit a VAE on the digits, score it, look inside it, save and reload it.

python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import numpy as np
from sklearn.datasets import load_digits

import vaelab

X = load_digits().data / 16.0  # [1797, 64] grey values in [0, 1]
rng = np.random.default_rng(0)
X = (rng.random(X.shape) < X).astype(np.float32)  # binarised once: Bernoulli data
train, test = X[:1500], X[1500:]

model = vaelab.VAE(latent_dim=4, hidden=(128,), epochs=50, seed=0).fit(train)

elbo = model.elbo(test)  # per-example ELBO, nats (a lower bound on log p(x))
log_px = model.log_likelihood(test, k=1000)  # per-example IWAE-1000 estimate of log p(x)
print(f"test ELBO      {elbo.mean():8.3f} nats/example")
print(f"test IWAE-1000 {log_px.mean():8.3f} nats/example (≥ the ELBO: a tighter bound)")

z = model.transform(test)  # posterior means, [n, 4]
print("latent codes", z.shape, "reconstructions", model.reconstruct(test[:5]).shape)

with tempfile.TemporaryDirectory() as folder:
    model.save(folder)  # safetensors weights + JSON: loading never runs code
    again = vaelab.load(folder)
    assert np.array_equal(again.transform(test), z)
    print("saved and reloaded: identical outputs")
