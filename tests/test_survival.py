"""Training that survives (issue 16): KL per stochastic layer and its free bits, skipped updates,
rollbacks on a non-finite loss (also across a kill and --resume), and what shows them: metrics,
the run log, the report and the collapse diagnostics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

import vaelab
from conftest import subprocess_env, vaelab_cli, vaelab_command
from vaelab.distributions.chain import GaussianChain
from vaelab.distributions.sampling import reparameterise
from vaelab.evaluation.diagnostics import collapse_diagnostics
from vaelab.model.registry import ModelConfig, build_model
from vaelab.objectives.layers import kl_per_layer
from vaelab.runs.evaluate import active_units_text
from vaelab.train import trainer as training
from vaelab.train.batches import IndexedBatches
from vaelab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from vaelab.train.config import TrainConfig
from vaelab.train.distributed import SINGLE
from vaelab.train.loss import StepObjective
from vaelab.train.progress import NonFiniteLossError
from vaelab.train.trainer import Trainer

CPU = torch.device("cpu")
HOOK = Path(__file__).parent / "survival_hook"


def digits(n: int = 300) -> np.ndarray:
    return (load_digits().data[:n] / 16.0 > 0.5).astype(np.float32)


def two_layers(seed: int = 0, sizes: tuple[int, ...] = (4, 2)) -> vaelab.model.vae_model.VAEModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(data_shape=(64,), latent_dim=sizes, hidden=(16,)))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ KL per layer
class Fixed(nn.Module):
    """A conditional that ignores the layer it reads: N(loc, scale) whatever z."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.loc, self.scale = loc, scale

    def forward(self, previous: torch.Tensor) -> Independent:
        shape = (*previous.shape[:-1], self.loc.shape[-1])
        return Independent(Normal(self.loc.expand(shape), self.scale.expand(shape)), 1)


def test_layer_log_probs_sum_to_the_log_prob_and_layer_kls_to_the_monte_carlo_kl():
    model = two_layers()
    x = torch.from_numpy(digits(10))
    with torch.no_grad():
        q, p = model.posterior(x), model.prior()
        z = q.sample((7,))  # [7, 10, 6]
        for chain in (q, p):
            layers = chain.layer_log_prob(z)
            assert layers.shape == (2, 7, 10)
            torch.testing.assert_close(layers.sum(0), chain.log_prob(z))
        # The prior's rows are z₁'s first: log p(z₁|z₂), then log p(z₂) = N(0, I) at z₂.
        top = Independent(Normal(torch.zeros(2), torch.ones(2)), 1).log_prob(z[..., 4:])
        torch.testing.assert_close(p.layer_log_prob(z)[1], top)
        shares = kl_per_layer(q, p, z)
        assert shares.shape == (10, 2)
        torch.testing.assert_close(shares.sum(1), (q.log_prob(z) - p.log_prob(z)).mean(0))


def test_a_layer_kl_is_the_closed_form_in_expectation_and_exact_for_one_layer():
    """Conditionals that ignore their input make the layers independent, so each layer's share is
    the closed-form KL of that layer's Gaussians; the Monte Carlo mean is within 4 standard errors."""
    q1 = Independent(Normal(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.7, 1.3]])), 1)
    q2 = Fixed(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 2.0, 1.0]))
    p2 = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    p1 = Fixed(torch.tensor([0.2, 0.1]), torch.tensor([1.5, 0.8]))
    q = GaussianChain(q1, [q2], (2, 3))
    p = GaussianChain(p2, [p1], (2, 3), reverse=True)
    torch.manual_seed(0)
    z = q.sample((200_000,))
    draws = (q.layer_log_prob(z) - p.layer_log_prob(z))[:, :, 0]  # [2, S]
    exact = torch.stack(
        [
            kl_divergence(q1, p1(z[:1, :, 2:]))[0],
            kl_divergence(q2(z[:1, :, :2]), p2)[0],
        ]
    ).squeeze(-1)
    error = draws.std(1) / math.sqrt(draws.shape[1])
    assert ((draws.mean(1) - exact).abs() < 4 * error).all(), (draws.mean(1), exact)
    # One layer: the single share is the registered closed form itself.
    p1_given = p1(z[:1, :, 2:])
    assert torch.equal(
        kl_per_layer(q1, p1_given, z[:1, :, :2]), kl_divergence(q1, p1_given).unsqueeze(-1)
    )


# ---------------------------------------------------------------------------- layer free bits
def test_layer_free_bits_clamp_each_layers_batch_mean_kl_and_stop_its_gradient():
    fitted = vaelab.VAE(
        latent_dim=(4, 2), hidden=(16,), epochs=1, batch_size=50, seed=0, device="cpu"
    ).fit(digits())
    model = fitted.model_
    x = torch.from_numpy(digits(40))
    noise = torch.randn(1, 40, 6, generator=torch.Generator().manual_seed(3))

    def pieces():
        q, p = model.posterior(x), model.prior()
        z = reparameterise(q, noise)[0]
        layer_kl = (q.layer_log_prob(z) - p.layer_log_prob(z)).mean(1).mean(1)  # [2]
        reconstruction = model.elbo(x, noise=noise).reconstruction.mean()
        return reconstruction, layer_kl

    with torch.no_grad():
        _, kls = pieces()
    low, high = sorted(kls.tolist())
    assert high > low + 0.1
    floor = (low + high) / 2  # one layer below λ, one above
    beta = 0.7
    config = TrainConfig(layer_free_bits=floor, beta=beta)
    objective = StepObjective(model, config, SINGLE)
    loss, _ = objective(x, noise, beta, 40)
    reconstruction, kls = pieces()
    by_hand = -(reconstruction - beta * kls.clamp(min=floor).sum())
    torch.testing.assert_close(loss, by_hand)

    # The gradient: that of the reconstruction and of the layer above λ alone.
    above = int(kls.argmax())
    model.zero_grad()
    loss.backward()
    clamped = {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}
    model.zero_grad()
    reconstruction, kls = pieces()
    (-(reconstruction - beta * kls[above])).backward()
    for name, t in model.named_parameters():
        if t.grad is not None:
            torch.testing.assert_close(clamped[name], t.grad, msg=name)


def test_layer_free_bits_are_refused_where_they_have_no_meaning():
    with pytest.raises(ValueError, match="layer_free_bits=0.5 shapes the ELBO's terms"):
        TrainConfig(layer_free_bits=0.5, objective="iwae", k=2).validate()
    with pytest.raises(ValueError, match="set one of them to 0"):
        TrainConfig(layer_free_bits=0.5, free_bits=0.1).validate()
    with pytest.raises(ValueError, match="skip_grad_norm must be positive"):
        TrainConfig(skip_grad_norm=0.0).validate()
    with pytest.raises(ValueError, match="max_rollbacks must be an integer"):
        TrainConfig(max_rollbacks=1.5).validate()


# -------------------------------------------------------------------------- skipped updates
def fit(config: TrainConfig, model=None) -> Trainer:
    trainer = Trainer(model or two_layers(), config, CPU, seed=5)
    trainer.fit(IndexedBatches(torch.from_numpy(digits()), config.batch_size, 5))
    return trainer


def test_a_tiny_gradient_norm_threshold_skips_every_update_and_a_huge_one_none():
    model = two_layers()
    before = weights(model)
    skipped = fit(TrainConfig(epochs=2, batch_size=50, skip_grad_norm=1e-9), model)
    assert [m.skipped_updates for m in skipped.history] == [6, 6]
    assert skipped.step == 12
    for name, value in weights(model).items():
        assert torch.equal(value, before[name]), name

    plain = fit(TrainConfig(epochs=2, batch_size=50))
    kept = fit(TrainConfig(epochs=2, batch_size=50, skip_grad_norm=1e9))
    assert [m.skipped_updates for m in kept.history] == [0, 0]
    for name, value in weights(plain.model).items():  # the check changes no number
        assert torch.equal(value, weights(kept.model)[name]), name


def test_the_kl_per_layer_of_an_epoch_adds_up_to_its_kl(monkeypatch):
    """Measured on every batch, the layers' KLs sum to the epoch's (Monte Carlo) KL; by
    default on one batch in LAYER_KL_EVERY, the first of them."""
    monkeypatch.setattr(training, "LAYER_KL_EVERY", 1)
    every = fit(TrainConfig(epochs=1, batch_size=50)).history[0]
    assert len(every.kl_per_layer) == 2
    assert math.isclose(sum(every.kl_per_layer), every.kl, rel_tol=1e-6)
    monkeypatch.setattr(training, "LAYER_KL_EVERY", 8)
    first = fit(TrainConfig(epochs=1, batch_size=50)).history[0]
    assert first.elbo == every.elbo and first.kl_per_layer != every.kl_per_layer


def test_a_top_down_models_kl_per_layer_is_measured_on_every_batch():
    """The top-down bound gives each layer's KL with its draw, so the trainer reads it from every
    batch, not one in LAYER_KL_EVERY: the layers' KLs sum to the epoch's KL."""
    options = dict(latent_dim=(4, 3, 2), hidden=(16,), inference="top-down", epochs=1)
    vae = vaelab.VAE(**options, batch_size=50, seed=0, device="cpu").fit(digits())
    metrics = vae.history_[0]
    assert len(metrics.kl_per_layer) == 3
    assert math.isclose(sum(metrics.kl_per_layer), metrics.kl, rel_tol=1e-6)


# -------------------------------------------------------------------------------- rollbacks
def plant_nan(monkeypatch, at_step: int, times: int = 1) -> list[int]:
    """The loss of optimiser step ``at_step`` becomes NaN while fewer than ``times`` rollbacks
    have happened; returns the list of steps at which it was planted."""
    planted: list[int] = []
    loss_of_step = training.Trainer._loss_of_step

    def patched(self):
        loss_of = loss_of_step(self)

        def step(*args, **kwargs):
            loss, terms = loss_of(*args, **kwargs)
            if self.step + 1 == at_step and self.rollbacks < times:
                planted.append(self.step + 1)
                loss = loss * math.nan
            return loss, terms

        return step

    monkeypatch.setattr(training.Trainer, "_loss_of_step", patched)
    return planted


def test_a_non_finite_loss_rolls_back_to_the_last_epoch_end_and_the_run_finishes(monkeypatch):
    options = dict(latent_dim=(4, 2), hidden=(16,), epochs=3, batch_size=50, seed=0, device="cpu")
    clean = vaelab.VAE(**options).fit(digits())
    planted = plant_nan(monkeypatch, at_step=9)  # epoch 2 (6 steps an epoch), batch 3
    survived = vaelab.VAE(**options).fit(digits())
    assert planted == [9]
    history = survived.history_
    assert [m.rollbacks for m in history] == [0, 1, 0]
    assert [m.step for m in history] == [6, 12, 18]
    assert all(math.isfinite(m.elbo) for m in history)
    # Epoch 1 is the clean run's; after it the learning rate runs at half the schedule's.
    assert history[0].elbo == clean.history_[0].elbo
    for m, c in zip(history[1:], clean.history_[1:], strict=True):
        assert math.isclose(m.lr, 0.5 * c.lr, rel_tol=1e-12)


def test_weights_that_overflow_on_an_epochs_last_step_roll_back_too():
    class Overflow(training.TrainingObserver):
        def step(self, trainer, batch_size):
            if trainer.step == 12 and trainer.rollbacks == 0:  # the last step of epoch 2
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(math.inf)

    trainer = Trainer(two_layers(), TrainConfig(epochs=3, batch_size=50), CPU, seed=5)
    trainer.observer = Overflow()
    history = trainer.fit(IndexedBatches(torch.from_numpy(digits()), 50, 5))
    assert [m.rollbacks for m in history] == [0, 1, 0] and trainer.lr_factor == 0.5
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_rollbacks_are_bounded_and_zero_keeps_the_old_error(monkeypatch):
    options = dict(latent_dim=4, hidden=(16,), epochs=2, batch_size=50, seed=0, device="cpu")
    plant_nan(monkeypatch, at_step=3, times=99)
    message = r"the loss became nan at epoch 1, step 3 of 6 \(optimiser step 3\)"
    with pytest.raises(NonFiniteLossError, match=message):
        vaelab.VAE(max_rollbacks=0, **options).fit(digits())
    with pytest.raises(NonFiniteLossError, match=message):
        vaelab.VAE(max_rollbacks=2, **options).fit(digits())


def test_vaelab_train_logs_and_records_a_rollback_and_the_report_shows_it(
    tmp_path, capsys, monkeypatch
):
    plant_nan(monkeypatch, at_step=20)
    out = tmp_path / "run"
    code, stdout, err = vaelab_cli(
        capsys, "train", "digits", "--out", out, "--latent-dim", "4,2", "--hidden", "16",
        "--epochs", "2", "--skip-grad-norm", "1e9", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert (
        "rollback 1 of 3: the loss became nan at epoch 2, step 5 of 15 (optimiser step 20)"
        in stdout
    )
    assert "back to epoch 2, step 0, learning rate x0.5" in stdout
    assert "[rollbacks: 1]" in stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["rollbacks"], m["skipped_updates"]) for m in metrics] == [(0, 0), (1, 0)]
    assert all(len(m["kl_per_layer"]) == 2 for m in metrics)
    assert json.loads((out / "config.json").read_text())["max_rollbacks"] == 3

    code, stdout, err = vaelab_cli(capsys, "evaluate", out, "--json")
    assert code == 0, err
    diagnostics = json.loads(stdout)["diagnostics"]
    assert len(diagnostics["kl_per_layer"]) == len(diagnostics["collapsed_layers"]) == 2
    assert diagnostics["collapsed_layers"] == [
        count == 0 or kl < 0.01
        for count, kl in zip(
            diagnostics["active_units_per_layer"], diagnostics["kl_per_layer"], strict=True
        )
    ]

    code, _, err = vaelab_cli(capsys, "report", out, "--k", "0", "--gap-examples", "0", "-q")
    assert code == 0, err
    page = (out / "report.html").read_text()
    assert "KL per layer per epoch (nats/example)" in page
    assert "skipped updates" in page and "rollbacks" in page and "KL (z2)" in page

    from vaelab.report.content import _curves, _history, _survival

    history = _history(out)
    chart = _curves(history)["KL per layer per epoch (nats/example)"]
    assert list(chart) == ["z1", "z2"]
    assert chart["z2"][1] == [m["kl_per_layer"][1] for m in metrics]
    assert [(m.name, m.value) for m in _survival(history)] == [
        ("skipped updates", 0),
        ("rollbacks", 1),
    ]


@pytest.mark.slow
def test_a_run_killed_after_a_rollback_resumes_bit_identical(tmp_path):
    """The NaN is planted by a hook in a subprocess (tests/survival_hook, on its PYTHONPATH):
    step 20 (epoch 2 of 15-step epochs) rolls back to step 15; the victim kills itself with
    SIGKILL at its first checkpoint from step 24 on; --resume ends with the weights of a run
    that was never stopped, bit for bit, and the rollback still in its metrics."""
    source = str(Path(vaelab.__file__).parents[1])
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(HOOK), source]), VAELAB_TEST_NAN_STEP="20")
    args = ["digits", "--latent-dim", "4,2", "--hidden", "16", "--epochs", "3",
            "--checkpoint-every", "4", "--layer-free-bits", "0.1", "--quiet"]  # fmt: skip
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = subprocess.run(
        vaelab_command("train", "--out", reference, *args), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    killed = subprocess.run(
        vaelab_command("train", "--out", victim, *args),
        env={**env, "VAELAB_TEST_KILL_STEP": "24"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "rollback 1 of 3" in killed.stdout
    _, state = load_checkpoint(victim / CHECKPOINT_FILE)
    assert state["survival"] == {"rollbacks": 1, "lr_factor": 0.5}
    assert state["position"]["step"] == 24
    started = time.monotonic()
    resumed = subprocess.run(
        vaelab_command("train", "--out", victim, "--resume", "--quiet"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert time.monotonic() - started < 120
    assert (victim / "model.safetensors").read_bytes() == (
        reference / "model.safetensors"
    ).read_bytes()
    rollbacks = [
        json.loads(line)["rollbacks"]
        for line in (victim / "metrics.jsonl").read_text().splitlines()
    ]
    assert rollbacks == [0, 1, 0]


@pytest.mark.slow
def test_two_workers_agree_on_a_rollback_one_of_them_alone_saw(tmp_path):
    """The NaN is planted on worker 1 only; its flag rides on the gradients' all-reduce, both
    roll back at the same step, and the run is the one-process run with the same plant up to
    the order of float sums."""
    source = str(Path(vaelab.__file__).parents[1])
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(HOOK), source]), VAELAB_TEST_NAN_STEP="20")
    args = ["digits", "--latent-dim", "4,2", "--hidden", "16", "--epochs", "2", "--quiet"]
    runs = {}
    for workers, rank in ((1, "0"), (2, "1")):
        out = tmp_path / f"workers-{workers}"
        done = subprocess.run(
            vaelab_command("train", "--out", out, "--nproc", workers, *args),
            env={**env, "VAELAB_TEST_NAN_RANK": rank},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "rollback 1 of 3" in done.stdout
        runs[workers] = [
            json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
    assert [m["rollbacks"] for m in runs[2]] == [m["rollbacks"] for m in runs[1]] == [0, 1]
    for one, two in zip(runs[1], runs[2], strict=True):
        assert one["elbo"] == pytest.approx(two["elbo"], rel=1e-4)
        assert one["kl_per_layer"] == pytest.approx(two["kl_per_layer"], rel=1e-3, abs=1e-4)


# --------------------------------------------------------------------------- seeing the layers
def test_a_collapsed_layer_is_flagged_with_its_kl_and_active_units():
    """A top layer whose q(z₂|z₁) is N(0, I) whatever z₁ (its networks zeroed: loc 0, log-scale
    0) is its prior p(z₂): no active unit, a KL of 0, flagged; z₁ of the trained model is not."""
    x = torch.from_numpy(digits(200))
    options = dict(latent_dim=(4, 2), hidden=(32,), epochs=5, batch_size=50, lr=3e-3)
    model = vaelab.VAE(seed=0, device="cpu", **options).fit(digits(600)).model_
    with torch.no_grad():
        top = model.posterior.conditionals[0]
        for module in top.modules():
            if isinstance(module, nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
    with torch.no_grad():
        q = model.posterior(x[:2])
        block = q.conditionals[0](torch.zeros(1, 4))
    assert torch.equal(block.base_dist.loc, torch.zeros(1, 2))
    found = collapse_diagnostics(model, x, seed=0, mi_examples=50)
    assert found.active_units_per_layer[1] == 0
    assert found.collapsed_layers == [False, True]
    assert found.kl_per_layer is not None
    assert found.kl_per_layer[0] > 0.05 and abs(float(found.kl_per_layer[1])) < 1e-6
    assert found.to_dict()["collapsed_layers"] == [False, True]
    text = active_units_text(found)
    assert text.endswith("z2: 0 of 2, collapsed)") and "z1: 0" not in text
