"""The trainer: minibatches, the optimiser and its schedule, validation, early stopping, checkpoints,
and data-parallel training over several workers.

The trainer maximises the mean over a minibatch of the per-example objective returned by
``vaelab.objectives.bounds.elbo`` (it negates once, here). In-memory data is batched by indexing one tensor
with a permutation, never by per-example ``Dataset`` calls; a memory-mapped array is indexed the
same way, one batch at a time.

Randomness comes from ``vaelab.train.streams``: the data order of each epoch, the dynamic binarisation
and the reparameterisation noise ε of each batch are pure functions of (seed, epoch, batch). The
noise of a whole batch is drawn at once, ``[samples, batch, latent]``, and handed to the model
(``VAEModel.elbo(..., noise=ε)``), so one draw per step replaces torch's global generator.

Data-parallel training (``world`` of several workers, ``vaelab.train.distributed``): every worker holds
the same model, wrapped in ``DistributedDataParallel``, and takes its contiguous share of every
global batch (``World.share``), with the matching columns of the batch's ε and binarisation
draws. Its loss is ``−(N / B) Σ`` of its examples' objectives for N workers and a batch of B, so
that DDP's average over workers is the gradient of the mean over the whole batch, also when B
does not split evenly. The epoch's sums (ELBO, reconstruction, KL, bound, count) and the
validation ELBO are summed over the workers, so every number reported is the global one. The
same run on 1 or N workers therefore differs only by the order of floating-point sums. Stop
requests and time-based checkpoints ride on the gradients' all-reduce (a two-element parameter
whose gradient is each worker's flags), so every worker stops or checkpoints after the same step
at no extra collective per step; rank 0 writes each checkpoint, then all wait at a barrier.

Resuming is exact: a checkpoint holds the weights, the optimiser, the position (epoch, batch) and
the streams' seed, from which the data order and the noise to come follow, so a run killed
mid-epoch and resumed ends with the same weights, bit for bit, as one never interrupted (on the
CPU, with the same thread count and the same number of workers; on another number of workers it
continues to float-rounding tolerance). Validation draws its noise from a stream of its own, so
the validation ELBO depends on the weights alone and evaluating never moves the training streams.

Training that survives (``TrainConfig.skip_grad_norm``, ``max_rollbacks``): an update whose
gradient norm is too large or not finite is skipped (every worker sees the same all-reduced
norm, so all skip together); a NaN or infinite loss (on any worker: the ``NONFINITE`` flag)
restores an in-memory snapshot of the state at the last epoch end, or at the start of ``fit``
(weights, optimiser, generators, position, history: ``state`` and ``restore``), scales the
learning rate by ``rollback_lr_factor`` from then on and replays from there. The rollbacks so far
and the factor are part of the checkpoint, and the noise and data order are functions of the
position, so a run killed after a rollback resumes bit-identically.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import ElboTerms, IwaeTerms
from vaelab.objectives.discrete import set_relaxation
from vaelab.train.batches import (
    Batch,
    BatchSource,
    IndexedBatches,
    LoaderBatches,
)
from vaelab.train.checkpoint import (
    CheckpointPolicy,
    Tensors,
    capture_rng,
    restore_rng,
    save_checkpoint,
)
from vaelab.train.config import LR_SCHEDULES, TrainConfig, learning_rate
from vaelab.train.distributed import SINGLE, World
from vaelab.train.fastpath import Compiled
from vaelab.train.loss import (
    CHECKPOINT,
    FLAGS,
    LAYER_KL_EVERY,
    NONFINITE,
    STOP,
    StepObjective,
    data_parallel,
    noise_shape,
)
from vaelab.train.progress import EpochMetrics, NonFiniteLossError, TrainingInterrupted
from vaelab.train.streams import TrainingStreams
from vaelab.train.validation import VALID_SEED, classification_error, mean_elbo
from vaelab.train.warmup import kl_warmup_epochs

# The names the flat layout's ``vaelab.training`` held (``vaelab._legacy`` makes that name this
# module), kept here so code written against it keeps importing them.
__all__ = [
    "LR_SCHEDULES",
    "VALID_SEED",
    "Batch",
    "BatchSource",
    "CheckpointPolicy",
    "EpochMetrics",
    "IndexedBatches",
    "LoaderBatches",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "TrainingObserver",
    "learning_rate",
    "mean_elbo",
]


class TrainingObserver:
    """What watches a ``Trainer`` (progress bars, run logs, the lines of ``VAE(verbose=True)``):
    its hooks, each optional, hear of every epoch's start and end and of every step."""

    def epoch_start(self, trainer: Trainer, epoch: int, start: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) begins at batch ``start`` of ``steps``."""

    def step(self, trainer: Trainer, batch_size: int) -> None:
        """One optimiser step on ``batch_size`` examples is done."""

    def epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        """An epoch (and its validation) is done; ``trainer.history`` includes ``metrics``."""

    def rolled_back(self, trainer: Trainer, reason: str) -> None:
        """A non-finite loss (``reason``) sent the run back to its last good state, now at
        epoch ``trainer.epoch`` (0-based), batch ``trainer.batch``; ``trainer.rollbacks`` counts."""


class Trainer:
    """Fits a ``VAEModel`` by stochastic gradient ascent on the ELBO (Adam), on one process or as
    one worker of ``world`` (``vaelab.train.distributed``; every worker builds the same ``Trainer``).

    ``seed`` keys the reparameterisation noise (``vaelab.train.streams``); None draws it from torch's
    global generator when ``fit`` starts (a restored run takes its checkpoint's). ``observer``
    hears of every epoch's start and end and of every step (``TrainingObserver``). ``compile``
    runs the loss of each step, forward and backward, through ``torch.compile``
    (``vaelab.train.fastpath``; eager, after one warning, where it cannot compile).
    """

    def __init__(
        self,
        model: VAEModel,
        config: TrainConfig,
        device: torch.device,
        *,
        observer: TrainingObserver | None = None,
        checkpoint: CheckpointPolicy | None = None,
        seed: int | None = None,
        world: World = SINGLE,
        compile: bool = False,
    ) -> None:
        config.validate()
        self.model = model
        self.config = config
        self.device = device
        self.observer = observer or TrainingObserver()
        self.checkpoint = checkpoint
        self.seed = seed
        self.world = world
        self._objective = StepObjective(model, config, world).to(device)
        # Wrapped in DistributedDataParallel when fit starts: wrapping talks to the other
        # workers, and until then a worker may still fail alone (World.settle).
        self._step_module: nn.Module = self._objective
        self.compile = compile
        self._compiled: Compiled[..., tuple[torch.Tensor, ElboTerms | IwaeTerms]] | None = None
        # The fused kernel updates every parameter in one pass: the same Adam, about 4x faster
        # per step than torch's default per-tensor loop on the CPU.
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
        self.step = 0  # optimiser steps so far
        self.steps_taken = 0  # optimiser steps this object took (a restored run's are not counted)
        self.epoch = 0  # epochs completed
        self.batch = 0  # batches done in the current epoch
        self.finished = False
        self.history: list[EpochMetrics] = []
        self.best_valid: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.waited = 0
        # ELBO, reconstruction, KL and the training bound, summed over this worker's examples of
        # this epoch (on rank 0 also the other workers' up to the last checkpoint).
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.count = 0
        self.epoch_seconds = 0.0
        self.checkpoint_position: tuple[int, int] | None = None  # (epoch, batch) last written
        self._last_checkpoint_time = time.perf_counter()
        self._stop_requested = False
        # Training that survives: this epoch's skipped updates, KL per layer summed like `sums`
        # (and, last, the examples it was measured on: one batch in LAYER_KL_EVERY),
        # the rollbacks of the run and of this epoch, the learning-rate factor they left, and the
        # state a rollback returns to (tensors and JSON, as `state` gives them).
        self.skipped = 0
        self.layer_sums = torch.zeros(len(model.latent_sizes) + 1, dtype=torch.float64)
        self.rollbacks = 0
        self.epoch_rollbacks = 0
        self.lr_factor = 1.0
        self._snapshot: tuple[Tensors, dict[str, Any]] | None = None

    # ---------------------------------------------------------------------------- objective
    def _kl_weight(self, epoch: int, fraction: float, steps: int = 1) -> float:
        """β, ramped linearly from 0 over the first ``kl_warmup_epochs`` (Bowman et al. 2016;
        ``None``: ``vaelab.train.warmup`` chooses, given ``steps`` per epoch)."""
        warmup = kl_warmup_epochs(self.config, self.model, steps)
        if warmup <= 0:
            return self.config.beta
        return self.config.beta * min(1.0, (epoch + fraction) / warmup)

    def _loss(
        self,
        x: torch.Tensor,
        kl_weight: float,
        noise: torch.Tensor | None = None,
        size: int | None = None,
        condition: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ElboTerms | IwaeTerms]:
        """The loss on ``x`` (given ``condition`` for a conditional model) alone, not
        synchronised among workers, and its terms; ``noise`` None draws ε from torch's global
        generator, ``size`` defaults to ``len(x)``."""
        size = x.shape[0] if size is None else size
        return self._objective(x, noise, kl_weight, size, None, condition)

    def _noise(self, epoch: int, batch: Batch) -> torch.Tensor:
        """ε of this worker's examples of ``batch``: ``[samples, rows, *event]``, the columns
        ``batch.rows`` of the whole batch's draw."""
        samples = self.config.k if self.config.objective == "iwae" else self.config.samples
        assert self.seed is not None
        eps = self._streams.normal(
            (samples, batch.size, *self._event),
            epoch,
            batch.number,
            device=self.device,
            dtype=self._dtype,
        )
        return eps if batch.rows == slice(0, batch.size) else eps[:, batch.rows]

    @torch.no_grad()
    def _record(self, terms: ElboTerms | IwaeTerms, examples: int) -> None:
        """Add one step's per-example terms to the epoch's sums: ELBO, reconstruction, KL and
        the training bound (the ELBO itself, or IWAE-k)."""
        bound = terms.bound if isinstance(terms, IwaeTerms) else terms.elbo
        # One reduction for the four sums: [4, batch] → [4], accumulated in float64.
        self.sums += torch.stack([terms.elbo, terms.reconstruction, terms.kl, bound]).sum(1).cpu()
        layer_kl = self._objective.layer_kl
        if layer_kl is not None:
            self.layer_sums[:-1] += layer_kl.sum(0).cpu()
            self.layer_sums[-1] += layer_kl.shape[0]
        self.count += examples

    def check(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> None:
        """Compute the training loss once on ``x`` (a few examples, with their conditions for a
        conditional model) without a step, so that a setting that cannot work (e.g. free bits
        with a mixture prior) fails before training starts. The random streams are left as they
        were, and the workers are not involved."""
        devices = [self.device] if self.device.type == "cuda" else []
        objective = StepObjective(self.model, self.config, SINGLE)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            x = x.to(self.device)
            given = None if condition is None else condition.to(self.device)
            objective(x, None, self.config.beta, x.shape[0], None, given)

    def running_means(self) -> tuple[float, float, float]:
        """This epoch's mean ELBO, reconstruction and KL so far (nats per example; on several
        workers, rank 0's examples since the last checkpoint and everyone's before it)."""
        elbo, reconstruction, kl, _ = (self.sums / max(self.count, 1)).tolist()
        return elbo, reconstruction, kl

    def request_stop(self) -> None:
        """Ask ``fit`` to checkpoint and raise ``TrainingInterrupted`` after the current step
        (safe from a signal handler: it only sets a flag). On several workers, all stop after
        the same step once any of them is asked."""
        self._stop_requested = True

    def _reduce_progress(self) -> None:
        """Sum the epoch's sums and count over the workers into rank 0's, the others' becoming
        0: the state a checkpoint holds, the same whether or not the run is resumed from it."""
        if self.world.size == 1:
            return
        totals = self.world.sum(
            torch.cat([self.sums, torch.tensor([float(self.count)]), self.layer_sums])
        )
        if self.world.main:
            self.sums, self.count = totals[:4].clone(), int(totals[4])
            self.layer_sums = totals[5:].clone()
        else:
            self.sums, self.count = torch.zeros_like(self.sums), 0
            self.layer_sums = torch.zeros_like(self.layer_sums)

    # ------------------------------------------------------------------------------ state
    def state(self, train: BatchSource) -> tuple[Tensors, dict[str, Any]]:
        """Everything needed to continue exactly: tensors and a JSON-serialisable dict. On
        several workers, call it after ``_reduce_progress`` (``save_checkpoint`` does)."""
        tensors: Tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, value in values.items():
                tensors[f"optimizer.{index}.{key}"] = value
        rng_tensors, rng_state = capture_rng(self.device)
        tensors.update(rng_tensors)
        data_state: dict[str, Any] = {}
        if isinstance(train, IndexedBatches):
            data_tensors, data_state = train.state()
            tensors.update(data_tensors)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]]
        state = {
            "position": {
                "epoch": self.epoch,
                "batch": self.batch,
                "step": self.step,
                "steps_per_epoch": len(train),
                "finished": self.finished,
            },
            "train_config": self.config.to_json(),
            "optimizer": {"class": type(self.optimizer).__name__, "param_groups": groups},
            "epoch_progress": {
                "sums": self.sums.tolist(),
                "count": self.count,
                "seconds": self.epoch_seconds,
                "layer_kl": self.layer_sums.tolist(),
                "skipped": self.skipped,
                "rollbacks": self.epoch_rollbacks,
            },
            "survival": {"rollbacks": self.rollbacks, "lr_factor": self.lr_factor},
            "early_stopping": {"best_valid": self.best_valid, "waited": self.waited},
            "history": [m.to_dict() for m in self.history],
            "rng": rng_state,
            "streams": {"seed": self.seed},
            "data": data_state,
            "workers": self.world.size,  # for the record: any number of workers may resume
        }
        return tensors, state

    def restore(self, tensors: Tensors, state: dict[str, Any], train: BatchSource) -> None:
        """Continue from a ``state()`` (e.g. read back by ``vaelab.train.checkpoint.load_checkpoint``),
        on any number of workers.

        Raises ``ValueError`` when the checkpoint belongs to a different configuration or data."""
        # Options added since a checkpoint was written take their defaults, which reproduce what
        # that version computed.
        saved = {**TrainConfig().to_json(), **state["train_config"]}
        if saved != self.config.to_json():
            changed = sorted(k for k, v in self.config.to_json().items() if saved.get(k) != v)
            raise ValueError(
                f"the checkpoint was written with other training settings ({', '.join(changed)}); "
                "resume with the settings of the original run"
            )
        position = state["position"]
        if position["steps_per_epoch"] != len(train):
            raise ValueError(
                f"the checkpoint has {position['steps_per_epoch']} batches per epoch, the data now "
                f"gives {len(train)}; resume with the same data and batch size"
            )

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(group("model."), strict=True)
        best = group("best.")
        self.best_state = best or None
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in group("optimizer.").items():
            index, name = key.split(".", 1)
            optimizer_state.setdefault(int(index), {})[name] = value
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
        if isinstance(train, IndexedBatches):
            train.load_state(tensors, state["data"])
        elif position["batch"]:
            raise ValueError("this data source cannot resume mid-epoch")
        restore_rng(tensors, state["rng"], self.device)
        self.seed = state["streams"]["seed"]
        self.epoch, self.batch = position["epoch"], position["batch"]
        self.step, self.finished = position["step"], position["finished"]
        progress = state["epoch_progress"]
        # The sums are the whole run's: rank 0 carries them on, the others start from 0.
        main = self.world.main
        self.sums = torch.tensor(progress["sums"] if main else [0.0] * 4, dtype=torch.float64)
        self.count = progress["count"] if main else 0
        self.epoch_seconds = progress["seconds"]
        layers = len(self.layer_sums)
        layer_kl = progress.get("layer_kl", [0.0] * layers) if main else [0.0] * layers
        self.layer_sums = torch.tensor(layer_kl, dtype=torch.float64)
        self.skipped = progress.get("skipped", 0)
        self.epoch_rollbacks = progress.get("rollbacks", 0)
        survival = state.get("survival", {})
        self.rollbacks = survival.get("rollbacks", 0)
        self.lr_factor = survival.get("lr_factor", 1.0)
        self.best_valid = state["early_stopping"]["best_valid"]
        self.waited = state["early_stopping"]["waited"]
        self.history = [EpochMetrics(**m) for m in state["history"]]
        self.checkpoint_position = (self.epoch, self.batch)

    def save_checkpoint(self, train: BatchSource) -> None:
        """Write the checkpoint atomically, after making sure every parameter is finite, so a
        diverged state never replaces the last good one. On several workers every worker calls
        it: the epoch's sums are gathered, rank 0 writes, and all wait until it has."""
        assert self.checkpoint is not None
        self._check_parameters()
        self._reduce_progress()
        if self.world.main:
            tensors, state = self.state(train)
            state["extra"] = self.checkpoint.extra
            save_checkpoint(self.checkpoint.path, tensors, state)
        self.world.barrier()
        self.checkpoint_position = (self.epoch, self.batch)
        self._last_checkpoint_time = time.perf_counter()

    def _finite(self, x: torch.Tensor) -> bool:
        """Whether the batch and every parameter are finite."""
        tensors = [x, *self.model.parameters()]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def _diverged(self, value: object, epoch: int, i: int, steps: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"the loss became {value} at epoch {epoch + 1}, step {i + 1} of {steps} (optimiser "
            f"step {self.step + 1}); lower the learning rate, clip gradients, or check the data "
            "for extreme values"
        )

    def _check_parameters(self) -> None:
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteLossError(
                    f"parameter {name} became NaN or infinite at epoch {self.epoch + 1}, step "
                    f"{self.batch} (optimiser step {self.step}); lower the learning rate or clip "
                    "gradients"
                )

    def _checkpoint_due(self, step: int) -> bool:
        """Whether a checkpoint is due after optimiser step ``step``: by the step rule, or by the
        clock (on several workers, rank 0's clock decides for all)."""
        policy = self.checkpoint
        if policy is None:
            return False
        if policy.every_steps and step % policy.every_steps == 0:
            return True
        if not self.world.main:
            return False
        elapsed = time.perf_counter() - self._last_checkpoint_time
        return bool(policy.every_seconds) and elapsed >= (policy.every_seconds or 0.0)

    def _interrupt(self, train: BatchSource) -> None:
        if self.checkpoint is not None:
            self.save_checkpoint(train)
        raise TrainingInterrupted(
            f"interrupted at epoch {self.epoch + 1}, step {self.batch} of {len(train)}"
        )

    # -------------------------------------------------------------------------------- fit
    def fit(self, train: BatchSource, valid: BatchSource | None = None) -> list[EpochMetrics]:
        """Train until ``config.epochs`` epochs are done (or early stopping); with ``valid``, keep
        the weights with the best validation ELBO. Continues from ``restore`` when called after it.
        On several workers each reads its share of every batch of ``train`` and ``valid``."""
        self._prepare_streams()
        share = self.world.share if self.world.size > 1 else None
        if share is not None and self._step_module is self._objective:
            self._step_module = data_parallel(self._objective, self.device)
        loss_of = self._loss_of_step()
        steps = len(train)
        total_steps = self.config.epochs * steps
        self._last_checkpoint_time = time.perf_counter()
        first_step = self.step
        self._take_snapshot(train)
        while not self.finished and self.epoch < self.config.epochs:
            epoch, start = self.epoch, self.batch
            if start == 0:
                self.sums.zero_()
                self.layer_sums.zero_()
                self.count, self.epoch_seconds, self.skipped = 0, 0.0, 0
            rolled_back = False
            self.model.train()
            self.observer.epoch_start(self, epoch, start, steps)
            started = time.perf_counter()
            lr, kl_weight = self.config.lr, self.config.beta
            for batch in train.batches(epoch, start, share):
                i = batch.number
                x = batch.x.to(self.device)
                condition = None if batch.condition is None else batch.condition.to(self.device)
                lr = learning_rate(self.config, self.step, total_steps) * self.lr_factor
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                kl_weight = self._kl_weight(epoch, i / steps, steps)
                if self._objective.estimator is not None:  # a discrete code's relaxation
                    set_relaxation(
                        self.model.posterior,
                        self.config.temperature_at(self.step, total_steps),
                        self.config.straight_through,
                    )
                flags = self._local_flags(self.step + 1) if share is not None else None
                self._objective.report_layers = i % LAYER_KL_EVERY == 0
                try:
                    weights = None if batch.weights is None else batch.weights.to(self.device)
                    loss, terms = loss_of(
                        x, self._noise(epoch, batch), kl_weight, batch.size, flags, condition,
                        weights,
                    )  # fmt: skip
                except ValueError as error:
                    # After a first good step, settings and shapes are known to work: a refusal
                    # now is torch.distributions seeing parameters that overflowed (NaN, ±inf, a
                    # scale of 0) before any loss exists.
                    if self._finite(x) and self.step == first_step:
                        raise
                    reason = str(error).split(", but found")[0][:200]
                    diverged = self._diverged(f"NaN or infinite ({reason})", epoch, i, steps)
                    # On several workers the others wait in the all-reduce: no agreement.
                    if share is not None or not self._may_roll_back():
                        raise diverged from error
                    self._roll_back(train, str(diverged))
                    rolled_back = True
                    break
                value = loss.item()  # one read of the loss: cheaper than an isfinite kernel
                if not math.isfinite(value) and (share is None or not self.config.max_rollbacks):
                    if not self._may_roll_back():
                        raise self._diverged(value, epoch, i, steps)
                    self._roll_back(train, str(self._diverged(value, epoch, i, steps)))
                    rolled_back = True
                    break
                self.optimizer.zero_grad(set_to_none=True)
                if self._objective.flags is not None:
                    self._objective.flags.grad = None
                loss.backward()
                if share is not None and self._agreed_nonfinite():
                    # Some worker's loss was not finite: every worker rolls back together.
                    reason = f"NaN or infinite on a worker ({value} here)"
                    if not self._may_roll_back():
                        raise self._diverged(reason, epoch, i, steps)
                    self._roll_back(train, str(self._diverged(reason, epoch, i, steps)))
                    rolled_back = True
                    break
                if self._update_allowed():
                    self.optimizer.step()
                else:
                    self.skipped += 1
                self.step += 1
                self.steps_taken += 1
                self.batch = i + 1
                self._record(terms, x.shape[0])
                self.observer.step(self, batch.size)
                stop, due = self._agreed_flags()
                if stop:
                    self.epoch_seconds += time.perf_counter() - started
                    self._interrupt(train)
                if self.batch < steps and due:
                    self.epoch_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint(train)
            if rolled_back:
                continue
            self.epoch_seconds += time.perf_counter() - started
            try:
                self._end_epoch(train, valid, lr, kl_weight)
            except NonFiniteLossError as error:
                # Weights that overflowed on the epoch's last step, or a validation ELBO that
                # did: the same on every worker (all-reduced gradients, summed validation).
                if not self._may_roll_back():
                    raise
                self._roll_back(train, str(error))
                continue
            if not self.finished:
                self._take_snapshot(train)
            # On several workers a request that came after the epoch's last step is agreed on
            # with the next step's flags: deciding it here, alone, would leave the others behind.
            if self._stop_requested and not self.finished and share is None:
                self._interrupt(train)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return self.history

    # ------------------------------------------------------------------- surviving divergence
    def _update_allowed(self) -> bool:
        """Clip the gradients (``grad_clip``) and say whether the update goes ahead: not when
        their total norm, before clipping, exceeds ``skip_grad_norm`` or is NaN or infinite."""
        clip, threshold = self.config.grad_clip, self.config.skip_grad_norm
        if not clip and threshold is None:
            return True
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        else:  # the norm alone (torch ≥ 2.6), without clip_grad_norm_'s multiply by 1
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            total_norm = getattr(torch.nn.utils, "get_total_norm", None)
            norm = (
                total_norm(grads)
                if total_norm is not None
                else torch.nn.utils.clip_grad_norm_(self.model.parameters(), math.inf)
            )
        # `not (norm <= threshold)` is also true for a NaN norm.
        return threshold is None or bool(norm <= threshold)

    def _may_roll_back(self) -> bool:
        return self._snapshot is not None and self.rollbacks < self.config.max_rollbacks

    def _take_snapshot(self, train: BatchSource) -> None:
        """Keep the state to roll back to (copies: training goes on changing the live tensors)."""
        if not self.config.max_rollbacks:
            return
        tensors, state = self.state(train)
        self._snapshot = (
            {name: tensor.detach().clone() for name, tensor in tensors.items()},
            copy.deepcopy(state),
        )

    def _roll_back(self, train: BatchSource, reason: str) -> None:
        """Return to the snapshot, with the learning rate scaled by ``rollback_lr_factor`` once
        more; the counts survive the return, and a checkpoint records them at once."""
        assert self._snapshot is not None
        rollbacks, epoch_rollbacks = self.rollbacks + 1, self.epoch_rollbacks + 1
        factor = self.lr_factor * self.config.rollback_lr_factor
        tensors, state = self._snapshot
        # Cloned again: the optimiser adopts the tensors it is given and updates them in place.
        self.restore({k: v.clone() for k, v in tensors.items()}, copy.deepcopy(state), train)
        self.rollbacks, self.epoch_rollbacks, self.lr_factor = rollbacks, epoch_rollbacks, factor
        self.observer.rolled_back(self, reason)
        if self.checkpoint is not None:
            self.save_checkpoint(train)

    def _agreed_nonfinite(self) -> bool:
        """Whether any worker's loss of the step just taken was NaN or infinite."""
        parameter = self._objective.flags
        assert parameter is not None and parameter.grad is not None
        return bool(parameter.grad[NONFINITE] > 0)

    def _loss_of_step(self) -> Callable[..., tuple[torch.Tensor, ElboTerms | IwaeTerms]]:
        """The module that gives a step's loss, or with ``compile`` its compiled form: one per
        trainer, so that ``fit`` called again (after ``restore``) reuses the compilation."""
        if not self.compile:
            return self._step_module
        if self._compiled is None or self._compiled.function is not self._step_module:
            self._compiled = Compiled(self._step_module, "the training step")
        return self._compiled

    def _prepare_streams(self) -> None:
        """The noise streams from ``seed`` (drawn now when None) and the shape and dtype of ε."""
        if self.seed is None:
            self.seed = int(torch.randint(0, 2**62, ()).item())
        self._streams = TrainingStreams(self.seed)
        self._event, self._dtype = noise_shape(self.model)

    def _local_flags(self, step: int) -> torch.Tensor:
        """This worker's flags for the step that ends at optimiser step ``step``: a stop
        requested here, a checkpoint due by rank 0's clock or by the step rule."""
        flags = torch.zeros(FLAGS, device=self.device)
        flags[STOP] = float(self._stop_requested)
        flags[CHECKPOINT] = float(self._checkpoint_due(step))
        return flags

    def _agreed_flags(self) -> tuple[bool, bool]:
        """Stop, checkpoint: on one process this process's; on several, whether any worker raised
        the flag for the step just taken (the flags' gradient, averaged by DDP, is above 0)."""
        parameter = self._objective.flags
        if parameter is None:
            return self._stop_requested, self._checkpoint_due(self.step)
        assert parameter.grad is not None
        stop, due = (parameter.grad[[STOP, CHECKPOINT]] > 0).tolist()
        return bool(stop), bool(due)

    def _end_epoch(
        self, train: BatchSource, valid: BatchSource | None, lr: float, kl_weight: float
    ) -> None:
        self._check_parameters()  # before validation, which would fail on them less clearly
        self._reduce_progress()
        means = (self.sums / max(self.count, 1)).tolist()
        metrics = EpochMetrics(
            epoch=self.epoch + 1,
            elbo=means[0],
            reconstruction=means[1],
            kl=means[2],
            lr=lr,
            seconds=self.epoch_seconds,
            examples_per_second=self.count / max(self.epoch_seconds, 1e-9),
            step=self.step,
            kl_weight=kl_weight,
            iwae=means[3] if self.config.objective == "iwae" else None,
            skipped_updates=self.skipped,
            rollbacks=self.epoch_rollbacks,
            kl_per_layer=(self.layer_sums[:-1] / max(float(self.layer_sums[-1]), 1.0)).tolist(),
        )
        if valid is not None:
            self.model.eval()
            share = self.world.share if self.world.size > 1 else None
            try:
                metrics.valid_elbo = mean_elbo(
                    self.model, valid.batches(self.epoch, 0, share), self.device, self.world
                )
                metrics.valid_error = classification_error(
                    self.model, valid.batches(self.epoch, 0, share), self.world
                )
            except ValueError as error:  # overflowed parameters, as in fit
                reason = str(error).split(", but found")[0][:200]
                raise NonFiniteLossError(
                    f"the validation ELBO became NaN or infinite ({reason}) after epoch "
                    f"{self.epoch + 1}; lower the learning rate or clip gradients"
                ) from error
            improved = self.best_valid is None or metrics.valid_elbo > self.best_valid
            if improved and not math.isnan(metrics.valid_elbo):
                self.best_valid, self.waited = metrics.valid_elbo, 0
                self.best_state = {
                    k: v.detach().clone() for k, v in self.model.state_dict().items()
                }
            else:
                self.waited += 1
        self.history.append(metrics)
        self.epoch, self.batch = self.epoch + 1, 0
        self.epoch_rollbacks = 0
        patience = self.config.patience
        stopped_early = patience is not None and valid is not None and self.waited >= patience
        self.finished = stopped_early or self.epoch >= self.config.epochs
        self.observer.epoch_end(self, metrics)
        if self.checkpoint is not None:
            self.save_checkpoint(train)
