"""The trainer: schedules, free bits, KL warm-up, divergence, checkpoints and exact resumption."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CrashAfter
from vaelab.model.registry import ModelConfig, build_model
from vaelab.objectives.bounds import kl_per_dimension
from vaelab.train import trainer as training
from vaelab.train.batches import IndexedBatches
from vaelab.train.checkpoint import (
    CheckpointError,
    CheckpointPolicy,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from vaelab.train.config import TrainConfig, learning_rate
from vaelab.train.progress import (
    EpochMetrics,
    NonFiniteLossError,
    TrainingInterrupted,
)
from vaelab.train.trainer import Trainer, TrainingObserver

CPU = torch.device("cpu")
SHAPE = (12,)


def data(n: int = 120, seed: int = 0) -> torch.Tensor:
    """Grey values in [0, 1] with structure: two prototypes plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(2, *SHAPE, generator=g)
    pick = torch.randint(0, 2, (n,), generator=g)
    return (prototypes[pick] + 0.1 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)


def model(seed: int = 0, **options: object):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ModelConfig(data_shape=SHAPE, latent_dim=3, hidden=(8,), **options))


def weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------- schedules


def test_learning_rate_warms_up_linearly_then_follows_the_cosine_to_the_floor():
    config = TrainConfig(lr=1.0, warmup_fraction=0.1, final_lr_fraction=0.01)
    total = 100
    assert [learning_rate(config, s, total) for s in range(3)] == [0.1, 0.2, 0.3]
    assert learning_rate(config, 9, total) == 1.0  # the last warm-up step reaches the peak
    assert learning_rate(config, 10, total) == pytest.approx(1.0)
    halfway = 10 + (total - 10) // 2
    assert learning_rate(config, halfway, total) == pytest.approx(0.01 + 0.99 * 0.5)
    assert learning_rate(config, total, total) == pytest.approx(0.01)
    rates = [learning_rate(config, s, total) for s in range(10, total)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_constant_schedule_keeps_the_rate_after_warm_up():
    config = TrainConfig(lr=0.5, lr_schedule="constant", warmup_fraction=0.2)
    assert learning_rate(config, 0, 10) == 0.25
    assert {learning_rate(config, s, 10) for s in range(2, 10)} == {0.5}
    no_warmup = TrainConfig(lr=0.5, lr_schedule="constant", warmup_fraction=0.0)
    assert learning_rate(no_warmup, 0, 10) == 0.5


def test_kl_weight_rises_linearly_over_the_warm_up_epochs_to_beta():
    trainer = Trainer(model(), TrainConfig(beta=2.0, kl_warmup_epochs=2), CPU)
    assert trainer._kl_weight(0, 0.0) == 0.0
    assert trainer._kl_weight(0, 0.5) == pytest.approx(0.5)
    assert trainer._kl_weight(1, 0.0) == pytest.approx(1.0)
    assert trainer._kl_weight(2, 0.0) == 2.0
    assert trainer._kl_weight(5, 0.3) == 2.0
    assert Trainer(model(), TrainConfig(beta=0.7), CPU)._kl_weight(0, 0.0) == 0.7


def test_free_bits_count_each_dimension_at_least_lambda():
    m, x = model(), data(16)
    trainer = Trainer(m, TrainConfig(free_bits=0.25), CPU)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        loss, terms = trainer._loss(x, kl_weight=0.5)
    per_dim = kl_per_dimension(m.posterior(x), m.prior()).mean(0)
    expected = -(terms.reconstruction.mean() - 0.5 * per_dim.clamp(min=0.25).sum())
    assert torch.allclose(loss, expected)
    # With a floor above every dimension's KL, the KL term is constant: no gradient to the encoder
    # through it, only through the reconstruction.
    huge = Trainer(m, TrainConfig(free_bits=1e3), CPU)
    loss, terms = huge._loss(x, kl_weight=1.0)
    assert torch.allclose(loss, -terms.reconstruction.mean() + 3 * 1e3)


def test_invalid_settings_are_refused_with_the_name_of_the_setting():
    for bad, word in [
        (TrainConfig(epochs=0), "epochs"),
        (TrainConfig(lr_schedule="step"), "lr_schedule"),
        (TrainConfig(warmup_fraction=1.0), "warmup_fraction"),
        (TrainConfig(grad_clip=0.0), "grad_clip"),
        (TrainConfig(patience=0), "patience"),
        (TrainConfig(kl_warmup_epochs=-1), "kl_warmup_epochs"),
    ]:
        with pytest.raises(ValueError, match=word):
            bad.validate()


# ---------------------------------------------------------------------------------- batches


def test_memory_mapped_and_in_memory_data_give_the_same_batches(tmp_path):
    x = data(50).numpy()
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = IndexedBatches(torch.from_numpy(x), 8, 1)
    b = IndexedBatches(mapped, 8, 1)
    assert len(a) == len(b) == 7
    for epoch in range(2):
        for u, v in zip(a.batches(epoch), b.batches(epoch), strict=True):
            assert torch.equal(u.x, v.x)


def test_dynamic_binarisation_draws_from_its_own_stream():
    x = data(30)
    source = IndexedBatches(x, 10, 0, binarize=True)
    with torch.random.fork_rng(devices=[]):
        before = torch.get_rng_state()
        first = [b.x for b in source.batches(0)]
        assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert all(set(b.unique().tolist()) <= {0.0, 1.0} for b in first)
    second = [b.x for b in source.batches(1)]
    assert not all(torch.equal(u, v) for u, v in zip(first, second, strict=True))
    assert all(torch.equal(u, b.x) for u, b in zip(first, source.batches(0), strict=True))


# -------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_keeps_tensors_state_and_random_streams(tmp_path):
    path = tmp_path / "c.safetensors"
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5),
        "s": torch.tensor(2.0),
        "u": torch.get_rng_state(),
    }
    state = {"position": {"epoch": 2, "batch": 7}, "floats": [0.1, -1e-300, 1 / 3]}
    save_checkpoint(path, tensors, state)
    loaded, loaded_state = load_checkpoint(path)
    assert loaded.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(loaded[key], tensors[key]) and loaded[key].dtype == tensors[key].dtype
    assert (
        loaded_state["position"] == state["position"] and loaded_state["floats"] == state["floats"]
    )

    with torch.random.fork_rng(devices=[]):
        np_before = np.random.get_state()  # noqa: NPY002
        py_before = random.getstate()
        saved = capture_rng(CPU)
        expected = (torch.rand(3), np.random.random(2), random.random())  # noqa: NPY002
        torch.rand(10)
        restore_rng(*saved, CPU)
        again = (torch.rand(3), np.random.random(2), random.random())  # noqa: NPY002
        np.random.set_state(np_before)  # noqa: NPY002
        random.setstate(py_before)
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "pickle", "foreign"])
def test_damaged_checkpoints_are_refused_and_nothing_is_unpickled(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.randn(100)}, {"position": {}})
    data_bytes = path.read_bytes()
    marker = tmp_path / "marker"
    if damage == "truncate":
        path.write_bytes(data_bytes[: len(data_bytes) - 10])
    elif damage == "flip":
        flipped = bytearray(data_bytes)
        flipped[-5] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "pickle":
        path.write_bytes(pickle.dumps(_WritesMarker(marker)))
    else:
        from safetensors.torch import save

        path.write_bytes(save({"w": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    assert not marker.exists()


class _WritesMarker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


# ------------------------------------------------------------------------------------ resuming

CONFIG = dict(
    epochs=3,
    batch_size=16,
    lr=3e-3,
    kl_warmup_epochs=1.5,
    free_bits=0.05,
    grad_clip=2.0,
    warmup_fraction=0.1,
    patience=5,
)


def sources(x: torch.Tensor, valid: torch.Tensor) -> tuple[IndexedBatches, IndexedBatches]:
    train = IndexedBatches(x, 16, 5, binarize=True)
    return train, IndexedBatches(valid, 50, shuffle=False)


def run(path: Path | None, observer: TrainingObserver | None = None, every: int | None = None):
    x, valid = data(120), data(40, seed=1)
    train, valid_source = sources(x, valid)
    policy = None if path is None else CheckpointPolicy(path, every_steps=every, every_seconds=None)
    trainer = Trainer(model(), TrainConfig(**CONFIG), CPU, observer=observer, checkpoint=policy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        trainer.fit(train, valid_source)
    return trainer


def test_a_run_killed_mid_epoch_and_resumed_ends_bit_identical(tmp_path):
    reference = run(None)
    path = tmp_path / "checkpoint.safetensors"
    with pytest.raises(SystemExit):
        run(path, CrashAfter(13), every=4)  # 8 steps per epoch: killed in epoch 2, step 5
    tensors, state = load_checkpoint(path)
    assert state["position"]["epoch"] == 1 and state["position"]["batch"] == 4
    assert state["streams"]["seed"] == reference.seed and "rng.torch" in tensors

    x, valid = data(120), data(40, seed=1)
    train, valid_source = sources(x, valid)
    resumed = Trainer(model(seed=99), TrainConfig(**CONFIG), CPU)  # other initial weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # whatever the caller's state: the checkpoint's is restored
        resumed.restore(tensors, state, train)
        history = resumed.fit(train, valid_source)
    assert_same_weights(weights(reference.model), weights(resumed.model))
    assert [m.elbo for m in history] == [m.elbo for m in reference.history]
    assert [m.valid_elbo for m in history] == [m.valid_elbo for m in reference.history]
    assert resumed.step == reference.step == reference.steps_taken == 24
    assert resumed.steps_taken == 24 - state["position"]["step"]  # continued, not started over


@pytest.mark.parametrize(
    ("options", "objective"),
    [
        ({"posterior": "iaf", "flow_steps": 2}, {"objective": "iwae", "k": 4, "gradient": "dreg"}),
        ({"posterior": "planar", "flow_steps": 3}, {"gradient": "stl"}),
    ],
    ids=["iaf-iwae-dreg", "planar-elbo-stl"],
)
def test_flows_and_other_objectives_resume_bit_identical(tmp_path, options, objective):
    """The same guarantee for a flow posterior (its MADE weights in the checkpoint) trained on
    the IWAE bound with DReG, or the ELBO with STL: killed mid-epoch, resumed, the same weights."""
    settings = {**CONFIG, "kl_warmup_epochs": 0.0, "free_bits": 0.0, **objective}

    def fit(path: Path | None, observer: TrainingObserver | None = None) -> Trainer:
        x, valid = data(120), data(40, seed=1)
        train, valid_source = sources(x, valid)
        policy = None if path is None else CheckpointPolicy(path, every_steps=3, every_seconds=None)
        trainer = Trainer(
            model(**options), TrainConfig(**settings), CPU, observer=observer, checkpoint=policy
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            trainer.fit(train, valid_source)
        return trainer

    reference = fit(None)
    path = tmp_path / "checkpoint.safetensors"
    with pytest.raises(SystemExit):
        fit(path, CrashAfter(11))
    tensors, state = load_checkpoint(path)
    x, valid = data(120), data(40, seed=1)
    train, valid_source = sources(x, valid)
    resumed = Trainer(model(seed=99, **options), TrainConfig(**settings), CPU)
    resumed.restore(tensors, state, train)
    history = resumed.fit(train, valid_source)
    assert_same_weights(weights(reference.model), weights(resumed.model))
    assert [m.elbo for m in history] == [m.elbo for m in reference.history]
    assert resumed.steps_taken == 24 - state["position"]["step"] > 0
    if objective.get("objective") == "iwae":  # the bound trained on, recorded per epoch
        assert all(m.iwae is not None and m.iwae >= m.elbo for m in history)


def test_checkpoints_do_not_change_the_result(tmp_path):
    plain = run(None)
    checkpointed = run(tmp_path / "c.safetensors", every=1)
    assert_same_weights(weights(plain.model), weights(checkpointed.model))


class FakeTime:
    """Stands in for the ``time`` module in ``vaelab.train.trainer``: its clock moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_by_default_a_checkpoint_is_written_every_minute_mid_epoch(tmp_path, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(training, "time", clock)
    written: list[int] = []
    save = training.save_checkpoint

    def recording_save(path, tensors, state):
        written.append(state["position"]["step"])
        save(path, tensors, state)

    monkeypatch.setattr(training, "save_checkpoint", recording_save)

    class TwentySecondSteps(TrainingObserver):
        def step(self, trainer: Trainer, batch_size: int) -> None:
            clock.now += 20.0

    policy = CheckpointPolicy(tmp_path / "c.safetensors")  # the defaults: no rule by steps
    assert policy.every_steps is None and policy.every_seconds == 60.0
    train, valid = sources(data(120), data(40, seed=1))
    trainer = Trainer(
        model(), TrainConfig(**CONFIG), CPU, observer=TwentySecondSteps(), checkpoint=policy
    )
    with torch.random.fork_rng(devices=[]):
        trainer.fit(train, valid)
    # 60 s after the last checkpoint is every third step of 20 s; each epoch's end (steps 8, 16
    # and 24) writes one too, and restarts the minute.
    assert written == [3, 6, 8, 11, 14, 16, 19, 22, 24]
    _, state = load_checkpoint(tmp_path / "c.safetensors")
    assert state["position"]["step"] == 24 and state["position"]["finished"]


def test_a_checkpoint_for_other_settings_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    run(path)
    train, _ = sources(data(120), data(40, seed=1))
    other = Trainer(model(), TrainConfig(**{**CONFIG, "lr": 1e-2}), CPU)
    with pytest.raises(ValueError, match="lr"):
        other.restore(*load_checkpoint(path), train)
    smaller = IndexedBatches(data(60), 16, 5)
    same = Trainer(model(), TrainConfig(**CONFIG), CPU)
    with pytest.raises(ValueError, match="batches per epoch"):
        same.restore(*load_checkpoint(path), smaller)


def test_stop_request_checkpoints_and_raises_after_the_current_step(tmp_path):
    class StopAt(TrainingObserver):
        def step(self, trainer: Trainer, batch_size: int) -> None:
            if trainer.step == 3:
                trainer.request_stop()

    path = tmp_path / "c.safetensors"
    with pytest.raises(TrainingInterrupted, match="epoch 1, step 3 of 8"):
        run(path, StopAt())
    _, state = load_checkpoint(path)
    assert state["position"] == {
        "epoch": 0,
        "batch": 3,
        "step": 3,
        "steps_per_epoch": 8,
        "finished": False,
    }


def test_a_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class PoisonedBatches(IndexedBatches):
        def batches(self, epoch, start=0, share=None):
            for batch in super().batches(epoch, start, share):
                poisoned = (epoch, batch.number) == (1, 2)
                yield batch._replace(x=batch.x * math.nan) if poisoned else batch

    path = tmp_path / "c.safetensors"
    source = PoisonedBatches(data(120), 16, 0)
    policy = CheckpointPolicy(path, every_steps=1, every_seconds=None)
    trainer = Trainer(model(likelihood="gaussian"), TrainConfig(epochs=3, batch_size=16), CPU)
    trainer.checkpoint = policy
    with pytest.raises(
        NonFiniteLossError, match=r"NaN or infinite.* at epoch 2, step 3 of 8 \(optimiser step 11\)"
    ):
        trainer.fit(source)
    _, state = load_checkpoint(path)
    assert state["position"]["epoch"] == 1 and state["position"]["batch"] == 2  # the step before
    assert state["position"]["step"] == 10


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    class Diverge(TrainingObserver):
        def step(self, trainer, batch_size):
            if trainer.step == 6:  # a checkpoint is due after this step
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(math.inf)

    path = tmp_path / "c.safetensors"
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        run(path, Diverge(), every=2)
    _, state = load_checkpoint(path)
    assert state["position"]["step"] == 4


def test_early_stopping_keeps_the_best_weights(monkeypatch):
    scores = iter([1.0, 3.0, 2.0, 2.5, 0.0, 5.0])
    monkeypatch.setattr(training, "mean_elbo", lambda *args: next(scores))
    snapshots = {}

    class Remember(TrainingObserver):
        def epoch_end(self, trainer, metrics):
            snapshots[metrics.epoch] = weights(trainer.model)

    x = data(64)
    trainer = Trainer(
        model(), TrainConfig(epochs=6, batch_size=16, patience=2), CPU, observer=Remember()
    )
    history = trainer.fit(
        IndexedBatches(x, 16, 0),
        IndexedBatches(x, 64, shuffle=False),
    )
    assert [m.epoch for m in history] == [1, 2, 3, 4]  # epochs 3 and 4 did not beat epoch 2
    assert trainer.finished and trainer.best_valid == 3.0
    assert_same_weights(weights(trainer.model), snapshots[2])


def test_epoch_metrics_to_dict_is_asdict_without_shared_state():
    metrics = EpochMetrics(
        epoch=3, elbo=-1.5, reconstruction=-1.0, kl=0.5, lr=1e-3, seconds=2.0,
        examples_per_second=10.0, valid_elbo=None, step=30, kl_weight=0.5, extra={"a": 1.0},
    )  # fmt: skip
    found = metrics.to_dict()
    assert found == dataclasses.asdict(metrics)
    found["extra"]["a"] = 2.0
    assert metrics.extra == {"a": 1.0}


def test_every_training_option_of_a_run_and_of_the_estimator_reaches_the_train_config():
    """The one map from options to ``TrainConfig`` (``TrainConfig.from_options``): a value set on
    the command line's ``RunConfig`` or on ``vaelab.VAE`` arrives, renamed where the names differ,
    and nothing else is taken."""
    from vaelab import VAE
    from vaelab.runs.options import RunConfig

    chosen = {
        "epochs": 7, "batch_size": 13, "lr": 0.0042, "lr_schedule": "constant", "warmup": 0.125,
        "beta": 0.75, "samples": 3, "objective": "iwae", "k": 4, "gradient": "dreg",
        "kl_warmup": 2.5, "free_bits": 0.25, "grad_clip": 9.0, "patience": 5,
        "layer_free_bits": 0.5, "skip_grad_norm": 1e4, "max_rollbacks": 6, "temperature": 0.9,
        "temperature_final": 0.3, "straight_through": True, "labelled_batch_size": 17,
    }  # fmt: skip
    renamed = {"warmup": "warmup_fraction", "kl_warmup": "kl_warmup_epochs"}
    run = RunConfig(**chosen).train_config()
    for option, value in chosen.items():
        assert getattr(run, renamed.get(option, option)) == value, option
    untouched = {"final_lr_fraction", "weight_decay", "rollback_lr_factor", "classification_weight"}
    for name in untouched:
        assert getattr(run, name) == getattr(TrainConfig(), name)

    shared = {k: v for k, v in chosen.items() if k in VAE().get_params()}
    estimator = VAE(**shared).train_config()
    for option, value in shared.items():
        assert getattr(estimator, option) == value, option
    assert estimator.lr_schedule == TrainConfig().lr_schedule  # the estimator has no such option
