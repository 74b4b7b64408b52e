"""Shared test fixtures: small models whose exact answers are known."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

from vaelab import VAE
from vaelab.cli import app as cli
from vaelab.evaluation.loglik import standard_error  # noqa: F401  (shared: see below)
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

# ``standard_error`` (std / √n) is the library's, imported above so that tests share one
# definition with the error bars vaelab reports: ``from conftest import standard_error``.


# ------------------------------------------------------------------------------ command line
def vaelab_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``vaelab ARGS`` in this process, through ``cli.main`` as the console script calls it:
    (exit code, stdout, stderr). Arguments may be paths or numbers; they are passed as strings."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def vaelab_command(*args: object) -> list[str]:
    """The argv of ``python -m vaelab ARGS`` in a fresh interpreter, with warnings as errors as
    under pytest, for tests that need their own process (signals, workers, a terminal)."""
    return [sys.executable, "-W", "error", "-m", "vaelab", *map(str, args)]


def one_and_two_workers(
    capsys: pytest.CaptureFixture[str], folder: Path, *options: object
) -> tuple[Path, Path]:
    """``vaelab train digits OPTIONS`` in this process (``folder/one``) and on two workers
    (``--nproc 2``, ``folder/two``); both must succeed. Returns the two run folders."""
    code, _, err = vaelab_cli(capsys, "train", "digits", "--out", folder / "one", *options)
    assert code == 0, err
    done = subprocess.run(
        vaelab_command("train", "digits", "--out", folder / "two", "--nproc", "2", *options),
        env=subprocess_env(VAELAB_DIST_TIMEOUT="60"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return folder / "one", folder / "two"


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a ``vaelab`` subprocess, plus ``extra``: one thread, so that results
    compare bit for bit with in-process runs, and no ``VAELAB_DATA``, so that "digits" means the
    bundled digits whatever the developer's shell says."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("VAELAB_DATA", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------- fixed components
class Constant(nn.Module):
    """A 'network' (encoder or decoder) returning fixed ``features`` ``[..., F]`` whatever its
    input ``[*batch, D]``, as ``[*batch, F]``: a component's read-out can then be checked exactly."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features.expand(*x.shape[:-1], self.features.shape[-1])


# ---------------------------------------------------------------------- linear-Gaussian models


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


def linear_vae_with_a_poor_encoder(
    examples: int,
) -> tuple[LinearGaussianModel, torch.Tensor, VAEModel]:
    """pPCA with 12 dimensions and 3 correlated latents (seed 3), ``examples`` float64 examples
    from it ``[examples, 12]`` (seed 4), and a linear VAE with its exact decoder and a deliberately
    poor diagonal encoder: the mean-field-optimal means shrunk by 0.8 and shifted by 0.1, the
    variances e^0.5 ≈ 1.6 times too wide. Every bound of it is then strict, and the diagonal
    family has a real approximation gap (the latents are correlated)."""
    truth = random_linear_gaussian(12, 3, noise_var=0.3, seed=3)
    x, _ = truth.sample(examples, torch.Generator().manual_seed(4))
    q = truth.optimal_diagonal_q(torch.zeros(1, 12, dtype=torch.float64))
    weight = 0.8 * (truth.optimal_diagonal_q(torch.eye(12, dtype=torch.float64)).mean - q.mean).T
    model = linear_vae(truth, weight, q.mean[0] + 0.1, q.variance[0].log() + 0.5)
    return truth, x, model


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
