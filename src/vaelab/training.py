"""The trainer: minibatches, the optimiser and its schedule, validation, early stopping, checkpoints.

The trainer maximises the mean over a minibatch of the per-example objective returned by
``vaelab.objectives.elbo`` (it negates once, here). In-memory data is batched by indexing one tensor
with a permutation drawn from the trainer's own generator, never by per-example ``Dataset`` calls; a
memory-mapped array is indexed the same way, one batch at a time.

Resuming is exact: every source of randomness is a generator whose state a checkpoint holds (torch's
global generator for the reparameterisation noise, the data order's generator, the dynamic
binarisation's generator), together with the epoch's permutation and the position in it, so a run
killed mid-epoch and resumed ends with the same weights, bit for bit, as one never interrupted (on
the CPU, with the same thread count). Validation draws its noise inside ``fork_rng`` from a fixed
seed, so evaluating never moves the training stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from vaelab.checkpoint import Tensors, capture_rng, restore_rng, save_checkpoint
from vaelab.data import DataError, binarize_batch
from vaelab.model import VAEModel
from vaelab.noise import seeded
from vaelab.objectives import ElboTerms, IwaeTerms, check_objective, kl_per_dimension

LR_SCHEDULES = ("constant", "cosine")
# Validation noise comes from this seed, so the validation ELBO depends on the weights alone.
VALID_SEED = 20131220


@dataclass
class TrainConfig:
    """Training hyper-parameters.

    The learning rate rises linearly over the first ``warmup_fraction`` of all steps, then stays at
    ``lr`` (``lr_schedule="constant"``) or decays along a cosine to ``final_lr_fraction · lr``
    (``"cosine"``, the default; Loshchilov & Hutter 2017): the decay removes the gradient-noise floor
    that a constant rate leaves, which the linear-Gaussian oracle test measures.

    ``kl_warmup_epochs``: β rises linearly from 0 over this many epochs (Bowman et al. 2016).
    ``free_bits``: each latent dimension's batch-mean KL counts as at least this many nats
    (Kingma et al. 2016). ``grad_clip``: maximum gradient norm. ``patience``: stop after this many
    epochs without a better validation ELBO (needs validation data).
    """

    epochs: int = 50
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.02
    final_lr_fraction: float = 0.01
    beta: float = 1.0
    samples: int = 1
    objective: str = "elbo"
    k: int = 1
    gradient: str = "standard"
    kl_warmup_epochs: float = 0.0
    free_bits: float = 0.0
    grad_clip: float | None = None
    patience: int | None = None
    weight_decay: float = 0.0

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.beta >= 0, f"beta must be non-negative, got {self.beta}"),
            (self.samples >= 1, f"samples must be at least 1, got {self.samples}"),
            (self.free_bits >= 0, f"free_bits must be non-negative, got {self.free_bits}"),
            (
                self.kl_warmup_epochs >= 0,
                f"kl_warmup_epochs must be non-negative, got {self.kl_warmup_epochs}",
            ),
            (
                0 <= self.warmup_fraction < 1,
                f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}",
            ),
            (
                0 <= self.final_lr_fraction <= 1,
                f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}",
            ),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip must be positive (or None for no clipping), got {self.grad_clip}",
            ),
            (
                self.patience is None or self.patience >= 1,
                f"patience must be at least 1 epoch (or None), got {self.patience}",
            ),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._validate_objective()

    def _validate_objective(self) -> None:
        """The objective, its gradient estimator and the options that only some objectives have
        (``vaelab.objectives.check_objective`` refuses the combinations without a meaning)."""
        check_objective(self.objective, self.gradient, beta=self.beta)
        if self.k < 1:
            raise ValueError(f"k must be at least 1 importance sample, got {self.k}")
        if self.objective == "elbo" and self.k != 1:
            raise ValueError(
                f"k={self.k} is the IWAE bound's number of importance samples; with "
                "objective='elbo' use samples=L for L Monte Carlo draws, or objective='iwae'"
            )
        if self.objective == "iwae":
            for name, value, off in (
                ("samples", self.samples, 1),
                ("kl_warmup_epochs", self.kl_warmup_epochs, 0.0),
                ("free_bits", self.free_bits, 0.0),
            ):
                if value != off:
                    raise ValueError(
                        f"{name}={value} shapes the ELBO's terms, which the IWAE bound does not "
                        f"have; leave it at {off} with objective='iwae' (k sets its samples)"
                    )
        if self.gradient != "standard" and self.free_bits > 0:
            raise ValueError(
                f"free bits replace the KL term with a clamped closed form, which has no "
                f"gradient={self.gradient!r} form; use gradient='standard' with free_bits"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimiser step ``step`` (0-based) of ``total_steps``."""
    warmup = max(1, int(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = config.final_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class NonFiniteLossError(RuntimeError):
    """The loss (or a parameter) became NaN or infinite; the message names the epoch and step."""


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C); the state was checkpointed when a checkpoint was set."""


@dataclass
class EpochMetrics:
    """Means over one epoch, in nats per example; ``step`` counts optimiser steps so far.

    ``elbo``, ``reconstruction`` and ``kl`` are the ELBO's terms on the training batches (under
    ``objective="iwae"``, Monte Carlo estimates from the bound's own k draws); ``iwae`` is the
    IWAE-k bound training maximised, when it did. ``valid_elbo`` is always the ELBO, a yardstick
    common to every objective, and what selects the best weights."""

    epoch: int
    elbo: float
    reconstruction: float
    kl: float
    lr: float
    seconds: float
    examples_per_second: float
    valid_elbo: float | None = None
    step: int = 0
    kl_weight: float = 1.0
    iwae: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict. ``dataclasses.asdict`` deep-copies every value, which
        over a whole history at every epoch end cost more than the digits' epochs themselves."""
        return {**vars(self), "extra": dict(self.extra)}


# ------------------------------------------------------------------------------------ batches


class BatchSource(Protocol):
    """Where minibatches come from: ``len`` batches per epoch, and the batches of one epoch from
    batch ``start`` on (``start > 0`` only when resuming mid-epoch)."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]: ...


class IndexedBatches:
    """Minibatches of anything indexed by an integer array: a tensor, a numpy array, a memory map,
    a ``vaelab.data.Split``. Each epoch draws a permutation from ``generator`` (when ``shuffle``) and
    indexes ``data`` with one slice of it per batch, so a memory map is read one batch at a time.

    ``binarize_generator``, when given, re-draws every batch as Bernoulli(x) (dynamic binarisation,
    ``vaelab.data.binarize_batch``). ``state`` / ``load_state`` save and restore the generators and
    the epoch's permutation, which is what makes resuming mid-epoch exact.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        shuffle: bool = True,
        binarize_generator: torch.Generator | None = None,
    ) -> None:
        if shuffle and generator is None:
            raise ValueError("shuffled batches need a torch.Generator for the data order")
        self.data = data
        self.batch_size = batch_size
        self.generator = generator
        self.shuffle = shuffle
        self.binarize_generator = binarize_generator
        self.order: torch.Tensor | None = None

    @property
    def examples(self) -> int:
        return int(self.data.shape[0])

    def __len__(self) -> int:
        return -(-self.examples // self.batch_size)

    def _take(self, index: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return self.data[index]
        rows = self.data[index.numpy() if isinstance(index, torch.Tensor) else index]
        return torch.as_tensor(np.asarray(rows), dtype=torch.float32)

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        if self.shuffle:
            if start == 0:
                self.order = torch.randperm(self.examples, generator=self.generator)
            elif self.order is None:
                raise ValueError("resuming mid-epoch needs the epoch's saved permutation")
        for b in range(start, len(self)):
            lo, hi = b * self.batch_size, (b + 1) * self.batch_size
            x = self._take(self.order[lo:hi] if self.order is not None else slice(lo, hi))
            if self.binarize_generator is not None:
                x = binarize_batch(x, self.binarize_generator)
            yield x

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        tensors: Tensors = {}
        if self.generator is not None:
            tensors["data.generator"] = self.generator.get_state()
        if self.binarize_generator is not None:
            tensors["data.binarize_generator"] = self.binarize_generator.get_state()
        if self.order is not None:
            tensors["data.order"] = self.order
        return tensors, {"examples": self.examples, "batch_size": self.batch_size}

    def load_state(self, tensors: Tensors, state: dict[str, Any]) -> None:
        if state != {"examples": self.examples, "batch_size": self.batch_size}:
            raise ValueError(
                f"the checkpoint was made on {state.get('examples')} training examples in batches of "
                f"{state.get('batch_size')}, not {self.examples} in batches of {self.batch_size}; "
                "resume with the same data and batch size"
            )
        if self.generator is not None:
            self.generator.set_state(tensors["data.generator"])
        if self.binarize_generator is not None:
            if "data.binarize_generator" not in tensors:
                raise ValueError("the checkpoint was made without dynamic binarisation")
            self.binarize_generator.set_state(tensors["data.binarize_generator"])
        self.order = tensors.get("data.order")


class LoaderBatches:
    """Minibatches from a ``DataLoader``; of an ``(x, y, …)`` item only x is used. Its order lives
    in the loader's sampler, so a run on a loader resumes only at epoch boundaries.

    Every batch is prepared as it streams, by the rules arrays follow in ``VAE.fit``: converted to
    float32 with its values kept (float64, integer and boolean tensors alike), and refused, naming
    the batch, when its examples change shape, hold NaN or infinite values, or fail ``check``
    (the likelihood's support check, set once the model exists).
    """

    def __init__(self, loader: DataLoader, check: Callable[[torch.Tensor], None] | None = None):
        self.loader = loader
        self.check = check
        self.data_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        if start:
            raise ValueError("a DataLoader cannot resume mid-epoch; use IndexedBatches")
        for i, item in enumerate(self.loader):
            x = item[0] if isinstance(item, (tuple, list)) else item
            yield self.prepare(x, f"batch {i + 1} of the DataLoader (epoch {epoch + 1})")

    def prepare(self, x: Any, where: str) -> torch.Tensor:
        """``x`` as float32 ``[batch, *data_shape]``, checked; ``where`` names it in errors."""
        x = torch.as_tensor(x)
        if x.is_complex() or x.dtype not in _REAL_DTYPES:
            raise DataError(f"{where} holds {x.dtype} values; vaelab needs real numbers")
        if x.dim() < 2 or x.shape[0] == 0:
            raise DataError(
                f"{where} has shape {tuple(x.shape)}; a batch must be [batch, *data_shape] with "
                "at least one example of at least one value"
            )
        x = x.to(torch.float32)
        shape = tuple(x.shape[1:])
        if self.data_shape is None:
            self.data_shape = shape
        elif shape != self.data_shape:
            raise DataError(
                f"{where} has examples of shape {shape}, but the first batch had {self.data_shape}; "
                "every example must have the same shape"
            )
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{where} contains NaN or infinite values; clean or impute them")
        if self.check is not None:
            try:
                self.check(x)
            except ValueError as error:
                raise DataError(f"{where}: {error}") from None
        return x


_REAL_DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool,
)  # fmt: skip


@torch.no_grad()
def mean_elbo(model: VAEModel, batches: Iterator[torch.Tensor], device: torch.device) -> float:
    """The ELBO (analytic KL where available, one sample) averaged over every example."""
    total, count = 0.0, 0
    for x in batches:
        x = x.to(device)
        total += float(model.elbo(x).elbo.sum())
        count += x.shape[0]
    return total / max(count, 1)


# ------------------------------------------------------------------------------------ trainer


class TrainingObserver:
    """Hooks for progress bars and logs; every method is optional."""

    def epoch_start(self, trainer: Trainer, epoch: int, start: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) begins at batch ``start`` of ``steps``."""

    def step(self, trainer: Trainer, batch_size: int) -> None:
        """One optimiser step on ``batch_size`` examples is done."""

    def epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        """An epoch (and its validation) is done; ``trainer.history`` includes ``metrics``."""


@dataclass
class CheckpointPolicy:
    """Where and how often to checkpoint: at the end of every epoch, and mid-epoch every
    ``every_steps`` optimiser steps and/or ``every_seconds`` seconds (0 or None: not by that rule).
    ``extra`` is JSON stored with each checkpoint (a run keeps its configuration there)."""

    path: Path
    every_steps: int | None = None
    every_seconds: float | None = 60.0
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Fits a ``VAEModel`` by stochastic gradient ascent on the ELBO (Adam)."""

    def __init__(
        self,
        model: VAEModel,
        config: TrainConfig,
        device: torch.device,
        on_epoch: Callable[[EpochMetrics], None] | None = None,
        *,
        observer: TrainingObserver | None = None,
        checkpoint: CheckpointPolicy | None = None,
    ) -> None:
        config.validate()
        self.model = model
        self.config = config
        self.device = device
        self.on_epoch = on_epoch
        self.observer = observer or TrainingObserver()
        self.checkpoint = checkpoint
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
        # ELBO, reconstruction, KL and the training bound, summed over this epoch's examples.
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.count = 0
        self.epoch_seconds = 0.0
        self.checkpoint_position: tuple[int, int] | None = None  # (epoch, batch) last written
        self._last_checkpoint_time = time.perf_counter()
        self._stop_requested = False

    # ---------------------------------------------------------------------------- objective
    def _kl_weight(self, epoch: int, fraction: float) -> float:
        """β, ramped linearly from 0 over the first ``kl_warmup_epochs`` (Bowman et al. 2016)."""
        if self.config.kl_warmup_epochs <= 0:
            return self.config.beta
        return self.config.beta * min(1.0, (epoch + fraction) / self.config.kl_warmup_epochs)

    def _loss(
        self, x: torch.Tensor, kl_weight: float
    ) -> tuple[torch.Tensor, ElboTerms | IwaeTerms]:
        config = self.config
        if config.objective == "iwae":
            found = self.model.iwae(x, k=config.k, gradient=config.gradient)
            return -found.objective.mean(), found
        terms = self.model.elbo(x, samples=config.samples, beta=kl_weight, gradient=config.gradient)
        if config.free_bits > 0:
            # Free bits (Kingma et al. 2016): each latent dimension's batch-mean KL counts at least λ.
            q, p = self.model.posterior(x), self.model.prior()
            per_dim = kl_per_dimension(q, p)
            if per_dim is None:
                raise ValueError(
                    "free bits need a diagonal posterior and a factorised Gaussian prior"
                )
            kl = per_dim.mean(0).clamp(min=self.config.free_bits).sum()
            return -(terms.reconstruction.mean() - kl_weight * kl), terms
        return -terms.objective.mean(), terms

    @torch.no_grad()
    def _record(self, terms: ElboTerms | IwaeTerms, examples: int) -> None:
        """Add one step's per-example terms to the epoch's sums: ELBO, reconstruction, KL and
        the training bound (the ELBO itself, or IWAE-k)."""
        bound = terms.bound if isinstance(terms, IwaeTerms) else terms.elbo
        # One reduction for the four sums: [4, batch] → [4], accumulated in float64.
        self.sums += torch.stack([terms.elbo, terms.reconstruction, terms.kl, bound]).sum(1)
        self.count += examples

    def check(self, x: torch.Tensor) -> None:
        """Compute the training loss once on ``x`` (a few examples) without a step, so that a
        setting that cannot work (e.g. free bits with a mixture prior) fails before training
        starts. The random streams are left as they were."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self._loss(x.to(self.device), self.config.beta)

    def running_means(self) -> tuple[float, float, float]:
        """This epoch's mean ELBO, reconstruction and KL so far (nats per example)."""
        elbo, reconstruction, kl, _ = (self.sums / max(self.count, 1)).tolist()
        return elbo, reconstruction, kl

    def request_stop(self) -> None:
        """Ask ``fit`` to checkpoint and raise ``TrainingInterrupted`` after the current step
        (safe from a signal handler: it only sets a flag)."""
        self._stop_requested = True

    # ------------------------------------------------------------------------------ state
    def state(self, train: BatchSource) -> tuple[Tensors, dict[str, Any]]:
        """Everything needed to continue exactly: tensors and a JSON-serialisable dict."""
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
            },
            "early_stopping": {"best_valid": self.best_valid, "waited": self.waited},
            "history": [m.to_dict() for m in self.history],
            "rng": rng_state,
            "data": data_state,
        }
        return tensors, state

    def restore(self, tensors: Tensors, state: dict[str, Any], train: BatchSource) -> None:
        """Continue from a ``state()`` (e.g. read back by ``vaelab.checkpoint.load_checkpoint``).

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
        self.epoch, self.batch = position["epoch"], position["batch"]
        self.step, self.finished = position["step"], position["finished"]
        progress = state["epoch_progress"]
        sums = list(progress["sums"])
        if len(sums) == 3:  # written before the training bound had its own sum: it was the ELBO
            sums.append(sums[0])
        self.sums = torch.tensor(sums, dtype=torch.float64)
        self.count, self.epoch_seconds = progress["count"], progress["seconds"]
        self.best_valid = state["early_stopping"]["best_valid"]
        self.waited = state["early_stopping"]["waited"]
        self.history = [EpochMetrics(**m) for m in state["history"]]
        self.checkpoint_position = (self.epoch, self.batch)

    def save_checkpoint(self, train: BatchSource) -> None:
        """Write the checkpoint atomically, after making sure every parameter is finite, so a
        diverged state never replaces the last good one."""
        assert self.checkpoint is not None
        self._check_parameters()
        tensors, state = self.state(train)
        state["extra"] = self.checkpoint.extra
        save_checkpoint(self.checkpoint.path, tensors, state)
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

    def _checkpoint_due(self) -> bool:
        policy = self.checkpoint
        if policy is None:
            return False
        if policy.every_steps and self.step % policy.every_steps == 0:
            return True
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
        the weights with the best validation ELBO. Continues from ``restore`` when called after it."""
        steps = len(train)
        total_steps = self.config.epochs * steps
        self._last_checkpoint_time = time.perf_counter()
        first_step = self.step
        while not self.finished and self.epoch < self.config.epochs:
            epoch, start = self.epoch, self.batch
            if start == 0:
                self.sums.zero_()
                self.count, self.epoch_seconds = 0, 0.0
            self.model.train()
            self.observer.epoch_start(self, epoch, start, steps)
            started = time.perf_counter()
            lr, kl_weight = self.config.lr, self.config.beta
            for i, x in enumerate(train.batches(epoch, start), start=start):
                x = x.to(self.device)
                lr = learning_rate(self.config, self.step, total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                kl_weight = self._kl_weight(epoch, i / steps)
                try:
                    loss, terms = self._loss(x, kl_weight)
                except ValueError as error:
                    # After a first good step, settings and shapes are known to work: a refusal
                    # now is torch.distributions seeing parameters that overflowed (NaN, ±inf, a
                    # scale of 0) before any loss exists.
                    if self._finite(x) and self.step == first_step:
                        raise
                    reason = str(error).split(", but found")[0][:200]
                    raise self._diverged(f"NaN or infinite ({reason})", epoch, i, steps) from error
                value = loss.item()  # one read of the loss: cheaper than an isfinite kernel
                if not math.isfinite(value):
                    raise self._diverged(value, epoch, i, steps)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                self.step += 1
                self.steps_taken += 1
                self.batch = i + 1
                self._record(terms, x.shape[0])
                self.observer.step(self, x.shape[0])
                if self._stop_requested:
                    self.epoch_seconds += time.perf_counter() - started
                    self._interrupt(train)
                if self.batch < steps and self._checkpoint_due():
                    self.epoch_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint(train)
            self.epoch_seconds += time.perf_counter() - started
            self._end_epoch(train, valid, lr, kl_weight)
            if self._stop_requested and not self.finished:
                self._interrupt(train)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return self.history

    def _end_epoch(
        self, train: BatchSource, valid: BatchSource | None, lr: float, kl_weight: float
    ) -> None:
        self._check_parameters()  # before validation, which would fail on them less clearly
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
        )
        if valid is not None:
            self.model.eval()
            with seeded(VALID_SEED, self.device):
                try:
                    metrics.valid_elbo = mean_elbo(
                        self.model, valid.batches(self.epoch), self.device
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
        patience = self.config.patience
        stopped_early = patience is not None and valid is not None and self.waited >= patience
        self.finished = stopped_early or self.epoch >= self.config.epochs
        self.observer.epoch_end(self, metrics)
        if self.on_epoch is not None:
            self.on_epoch(metrics)
        if self.checkpoint is not None:
            self.save_checkpoint(train)
