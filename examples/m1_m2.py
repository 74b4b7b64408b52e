"""M1+M2 (Kingma, Rezende, Mohamed & Welling 2014, §3.2): semi-supervised learning on the codes of
a VAE. M1 is a VAE fitted on every example, labelled or not; M2 is fitted on M1's posterior means
with most labels missing, a Gaussian likelihood over the codes; q(y|z₁) then classifies.

Here on the digits with 50 labels of 1,400, beside M2 on the pixels, with a small budget (seconds).

python examples/m1_m2.py
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

import vaelab

digits = load_digits()
X, y = (digits.data / 16.0).astype(np.float32), digits.target  # [1797, 64] in [0, 1]
train, test = slice(0, 1400), slice(1400, None)

# 5 labels of each digit kept; the other 1,350 training examples get -1 (NaN works too).
rng = np.random.default_rng(0)
kept = np.concatenate(
    [rng.choice(np.flatnonzero(y[train] == c), 5, replace=False) for c in range(10)]
)
y_partial = np.full(1400, -1)
y_partial[kept] = y[train][kept]

# M2 on the pixels: the conditional VAE with a classifier q(y|x).
m2 = vaelab.VAE(conditional=True, latent_dim=8, hidden=(128,), epochs=30, seed=0, device="cpu")
m2.fit(X[train], y_partial)
m2_accuracy = float((m2.predict(X[test]) == y[test]).mean())

# M1: a VAE on all training pixels, no labels; its posterior means are the new data.
m1 = vaelab.VAE(latent_dim=16, hidden=(128,), epochs=30, seed=0, device="cpu").fit(X[train])
codes, test_codes = m1.transform(X[train]), m1.transform(X[test])  # [n, 16]

# M2 on the codes: real-valued data, so a Gaussian likelihood.
m1_m2 = vaelab.VAE(
    conditional=True, likelihood="gaussian", latent_dim=4, hidden=(64,), epochs=30, seed=0,
    device="cpu",
)  # fmt: skip
m1_m2.fit(codes, y_partial)
m1_m2_accuracy = float((m1_m2.predict(test_codes) == y[test]).mean())

print(f"50 labels of 1400 digits; accuracy on {y[test].size} held-out digits:")
print(f"  M2 on pixels     {m2_accuracy:.3f}")
print(f"  M1+M2 on codes   {m1_m2_accuracy:.3f}")
print(f"  chance           {1 / 10:.3f}")
assert m2_accuracy > 0.5 and m1_m2_accuracy > 0.5
