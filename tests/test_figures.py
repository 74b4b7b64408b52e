"""The arrays behind the report's pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

import vaelab
from vaelab.report import figures

X = (load_digits().data[:300] / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def model2() -> vaelab.VAE:
    return vaelab.VAE(latent_dim=2, hidden=(32,), epochs=2, seed=0).fit(X)


@pytest.fixture(scope="module")
def model5() -> vaelab.VAE:
    return vaelab.VAE(latent_dim=5, hidden=(32,), epochs=2, seed=0).fit(X)


def decoded_samples(estimator: vaelab.VAE, n: int, seed: int) -> np.ndarray:
    """E[x|z] at n draws z ~ p(z) under torch's generator seeded with ``seed``, ``[n, D]``."""
    model = estimator.model_
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        z = model.prior().sample((n,))  # [n, latent]
        return model.likelihood.mean(z).reshape(n, -1).numpy()


def decoded_posterior_means(estimator: vaelab.VAE, x: np.ndarray) -> np.ndarray:
    """E[x | z = E_q[z|x]] for a Gaussian posterior, ``[n, D]``."""
    model = estimator.model_
    with torch.no_grad():
        z = model.posterior(torch.from_numpy(x)).mean  # [n, latent]
        return model.likelihood.mean(z).reshape(len(x), -1).numpy()


def test_samples_and_reconstructions_are_images_in_the_unit_interval(model2):
    """Samples are the decoder means at prior draws under the given seed, reconstructions the
    decoder means at the posterior means, as images [n, C, H, W]; a Bernoulli model's means are
    probabilities, in [0, 1] as they are."""
    grid = figures.samples(model2, 16, seed=3)
    assert grid.shape == (16, 1, 8, 8)
    np.testing.assert_allclose(grid.reshape(16, -1), decoded_samples(model2, 16, 3), atol=1e-6)
    assert grid.min() >= 0 and grid.max() <= 1 and grid.std() > 0.05
    originals, rebuilt = figures.reconstructions(model2, X[:5])
    assert originals.shape == rebuilt.shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(originals.reshape(5, -1), X[:5])
    np.testing.assert_allclose(
        rebuilt.reshape(5, -1), decoded_posterior_means(model2, X[:5]), atol=1e-6
    )


@pytest.mark.parametrize("top", [255, 1], ids=["0..255", "divided-by-255"])
def test_images_of_an_8_bit_model_are_in_the_unit_interval(top):
    """A discretised-logistic model of 8-bit pixels kept as the integers 0..255 (``--scale none``)
    or divided by 255 draws its pictures on [0, 1] alike: pixel values / 255 in the first case,
    not clipped to 1 (which leaves the brighter half of every picture white)."""
    pixels = np.round(load_digits().data[:300] * 255 / 16).astype(np.float32)
    x = pixels / 255 * top
    model = vaelab.VAE(
        likelihood="discretized-logistic", latent_dim=2, hidden=(16,), epochs=1, seed=0
    ).fit(x)
    grid = figures.samples(model, 8, seed=1)
    assert grid.shape == (8, 1, 8, 8) and grid.min() >= 0 and grid.max() <= 1
    np.testing.assert_allclose(grid.reshape(8, -1), decoded_samples(model, 8, 1) / top, atol=1e-6)
    originals, rebuilt = figures.reconstructions(model, x[:3])
    np.testing.assert_allclose(originals.reshape(3, -1), pixels[:3] / 255, atol=1e-6)
    expected = decoded_posterior_means(model, x[:3]) / top
    np.testing.assert_allclose(rebuilt.reshape(3, -1), expected, atol=1e-6)


def test_scatter_uses_the_latent_or_its_principal_components(model2, model5):
    points, names = figures.latent_scatter(model2, X)
    assert names == ("z1", "z2") and np.allclose(points, model2.transform(X))
    points, names = figures.latent_scatter(model5, X)
    reference = PCA(2).fit_transform(model5.transform(X).astype(np.float64))
    assert names[0].startswith("PC1")
    # Principal components are defined up to sign.
    for j in range(2):
        assert np.allclose(np.abs(points[:, j]), np.abs(reference[:, j]), atol=1e-5)


def test_manifold_decodes_an_evenly_spaced_probability_grid(model2, model5):
    manifold = figures.latent_manifold(model2, steps=5)
    assert manifold.shape == (5, 5, 1, 8, 8)
    # Row 0 is the top of the figure: the largest z2; the middle cell is z = (0, 0).
    middle = model2.inverse_transform(np.zeros((1, 2), dtype=np.float32)).reshape(1, 8, 8)
    assert np.allclose(manifold[2, 2], np.clip(middle, 0, 1))
    assert figures.latent_manifold(model5) is None


def test_interpolations_start_and_end_at_the_examples_codes(model5):
    paths = figures.interpolations(model5, X[:6], pairs=3, steps=4)
    assert paths.shape == (3, 4, 1, 8, 8)
    assert np.allclose(paths[:, 0].reshape(3, -1), model5.reconstruct(X[0:6:2]), atol=1e-6)
    assert np.allclose(paths[:, -1].reshape(3, -1), model5.reconstruct(X[1:6:2]), atol=1e-6)


def test_tabular_data_has_no_pictures():
    tabular = np.random.default_rng(0).random((50, 5)).astype(np.float32)
    model = vaelab.VAE(latent_dim=2, hidden=(8,), epochs=1, seed=0).fit(tabular)
    assert figures.samples(model, 4) is None
    assert figures.reconstructions(model, tabular[:3]) is None
    assert figures.latent_manifold(model) is None
