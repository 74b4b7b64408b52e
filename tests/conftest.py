"""Shared test fixtures: small models whose exact answers are known."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from vaelab import VAE
from vaelab.evaluation.ppca import LinearGaussianModel, random_linear_gaussian
from vaelab.model.registry import ModelConfig, build_model
from vaelab.model.vae_model import VAEModel
from vaelab.train.trainer import Trainer, TrainingObserver

# Tests use tiny tensors: one thread avoids thread hand-off costs and contention on 2 shared cores.
torch.set_num_threads(1)

# Property tests draw new examples on every local run, to find what no one thought of; under CI
# (CI set, as .ci/run sets it) they draw the same ones every time, so that a rare example found
# by chance turns into a pinned @example and a fix, not into a red build that nobody changed.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def linear_vae(
    truth: LinearGaussianModel,
    encoder_weight: torch.Tensor,
    encoder_bias: torch.Tensor,
    log_var: torch.Tensor,
) -> VAEModel:
    """A float64 linear VAE whose decoder is exactly ``truth`` (per-dimension Gaussian noise) and
    whose encoder gives q(z|x) = N(A x + c, diag exp(log_var)) with A = ``encoder_weight``
    ``[latent, data]`` and c = ``encoder_bias`` ``[latent]``."""
    d, k = truth.data_dim, truth.latent_dim
    config = ModelConfig(
        data_shape=(d,), latent_dim=k, hidden=(), likelihood="gaussian-per-dimension"
    )
    model = build_model(config).double()
    encoder = model.posterior.encoder.layers[0]
    decoder = model.likelihood.decoder.layers[0]
    with torch.no_grad():
        encoder.weight.copy_(torch.cat([encoder_weight, torch.zeros(k, d, dtype=torch.float64)]))
        encoder.bias.copy_(torch.cat([encoder_bias, log_var]))
        decoder.weight.copy_(truth.weight)
        decoder.bias.copy_(truth.bias)
        model.likelihood.log_sigma.copy_(0.5 * truth.noise_var.log())
    return model


def exact_posterior_vae(truth: LinearGaussianModel) -> VAEModel:
    """A linear VAE with the mean-field-optimal diagonal posterior of ``truth``: exact posterior
    means, variances 1 / (posterior precision)ⱼⱼ."""
    d = truth.data_dim
    eye = torch.eye(d, dtype=torch.float64)
    # The posterior mean is linear in x: read A and c off the images of 0 and of the unit vectors.
    at_zero = truth.optimal_diagonal_q(torch.zeros(1, d, dtype=torch.float64))
    at_units = truth.optimal_diagonal_q(eye)
    weight = (at_units.mean - at_zero.mean).T
    return linear_vae(truth, weight, at_zero.mean[0], at_zero.variance[0].log())


@pytest.fixture(scope="session")
def fitted_linear() -> tuple[VAE, torch.Tensor]:
    """A linear-Gaussian VAE made the way users make one, ``VAE.fit`` (float32, the decoder offset
    set to the data mean), on pPCA data whose mean is far from 0 (about 5), and 200 further
    examples from the same data, float32 ``[200, 6]``. Exact answers for it come from
    ``vaelab.evaluation.linear.linear_gaussian_from_vae``, itself checked against the model's outputs."""
    truth = random_linear_gaussian(6, 2, noise_var=0.3, seed=11)
    shifted = LinearGaussianModel(truth.weight, truth.bias + 5.0, truth.noise_var)
    x, _ = shifted.sample(1400, torch.Generator().manual_seed(12))
    x = x.float()
    estimator = VAE(
        hidden=(), likelihood="gaussian", latent_dim=2, epochs=15, seed=0, device="cpu"
    ).fit(x[:1200].numpy())
    return estimator, x[1200:]


class CrashAfter(TrainingObserver):
    """Simulates a process killed right after optimiser step ``n``: raises ``SystemExit``, which
    the trainer does not catch, so the last checkpoint is what a killed run leaves."""

    def __init__(self, n: int) -> None:
        self.n = n

    def step(self, trainer: Trainer, batch_size: int) -> None:
        if trainer.step == self.n:
            raise SystemExit("killed")
