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
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vaelab.data.sources import DataError
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import ElboTerms, IwaeTerms, check_objective, kl_per_dimension
from vaelab.train.checkpoint import Tensors, capture_rng, restore_rng, save_checkpoint
from vaelab.train.distributed import SINGLE, World
from vaelab.train.fastpath import Compiled
from vaelab.train.streams import TrainingStreams

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
        (``vaelab.objectives.bounds.check_objective`` refuses the combinations without a meaning)."""
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


class Batch(NamedTuple):
    """One worker's share of a minibatch: ``x`` ``[rows, *data_shape]`` holds positions ``rows``
    of batch ``number`` of the epoch (from 0), a batch of ``size`` examples in all (one process
    holds ``rows = slice(0, size)``); ``condition`` ``[rows, c]``, the same examples' conditions
    for a conditional model (``vaelab.model.conditioning``), else None."""

    x: torch.Tensor
    number: int
    size: int
    rows: slice
    condition: torch.Tensor | None = None


Share = Callable[[int], slice]  # a batch's size → this worker's positions in it (World.share)


class BatchSource(Protocol):
    """Where minibatches come from: ``len`` batches per epoch, and the batches of one epoch from
    batch ``start`` on (``start > 0`` only when resuming mid-epoch); with ``share``, only this
    worker's positions of each batch."""

    def __len__(self) -> int: ...

    def batches(
        self, epoch: int, start: int = 0, share: Share | None = None
    ) -> Iterator[Batch]: ...


class IndexedBatches:
    """Minibatches of anything indexed by an integer array: a tensor, a numpy array, a memory map,
    a ``vaelab.data.sources.Split``. Each epoch's order is a permutation drawn from ``seed`` and the
    epoch alone (``vaelab.train.streams``; file order without ``shuffle``), and ``data`` is indexed
    with one slice of it per batch, so a memory map is read one batch at a time, and a worker
    reads only its own share of each batch.

    ``binarize`` re-draws every batch as Bernoulli(x) (dynamic binarisation, Burda et al. 2016):
    a uniform draw ``u`` ``[batch, *data_shape]`` per global batch, keyed by (seed, epoch,
    batch), and x' = 1[u < x], each worker using the rows of ``u`` of its own examples.

    ``condition``, for a conditional model, is an array ``[examples, c]`` aligned with ``data``
    (one-hot labels or condition vectors); each batch carries the rows of its own examples.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        seed: int | None = None,
        *,
        shuffle: bool = True,
        binarize: bool = False,
        condition: Any = None,
    ) -> None:
        if (shuffle or binarize) and seed is None:
            raise ValueError("shuffled or binarised batches need a seed for their streams")
        examples = int(data.shape[0])
        if condition is not None and len(condition) != examples:
            raise ValueError(
                f"the condition has {len(condition)} rows for {examples} examples; give one row "
                "per example"
            )
        self.data = data
        self.condition = None if condition is None else torch.as_tensor(condition).float()
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.binarize = binarize
        self.streams = None if seed is None else TrainingStreams(seed)

    @property
    def examples(self) -> int:
        return int(self.data.shape[0])

    def __len__(self) -> int:
        return -(-self.examples // self.batch_size)

    def _take(self, index: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            if isinstance(index, torch.Tensor):
                # The same rows as data[index], copied whole: 47 µs for 100 MNIST rows, where
                # advanced indexing's general kernel takes 103 µs.
                return torch.index_select(self.data, 0, index)
            return self.data[index]
        rows = self.data[index.numpy() if isinstance(index, torch.Tensor) else index]
        return torch.as_tensor(np.asarray(rows), dtype=torch.float32)

    def order(self, epoch: int) -> torch.Tensor | None:
        """The examples of epoch ``epoch`` in order, int64 ``[examples]`` (None: file order)."""
        if not self.shuffle:
            return None
        assert self.streams is not None
        return self.streams.permutation(self.examples, epoch)

    def batches(self, epoch: int, start: int = 0, share: Share | None = None) -> Iterator[Batch]:
        order = self.order(epoch)
        for b in range(start, len(self)):
            lo = b * self.batch_size
            size = min(self.batch_size, self.examples - lo)
            rows = slice(0, size) if share is None else share(size)
            first, last = lo + rows.start, lo + rows.stop
            index = order[first:last] if order is not None else slice(first, last)
            x = self._take(index)
            if self.binarize:
                assert self.streams is not None
                u = self.streams.uniform((size, *x.shape[1:]), epoch, b)
                x = (u[rows] < x).to(x.dtype)
            condition = None if self.condition is None else self.condition[index]
            yield Batch(x, b, size, rows, condition)

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        """What must match when resuming: the data's size, the batch size and the streams."""
        return {}, {
            "examples": self.examples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "binarize": self.binarize,
        }

    def load_state(self, tensors: Tensors, state: dict[str, Any]) -> None:
        if (state.get("examples"), state.get("batch_size")) != (self.examples, self.batch_size):
            raise ValueError(
                f"the checkpoint was made on {state.get('examples')} training examples in batches of "
                f"{state.get('batch_size')}, not {self.examples} in batches of {self.batch_size}; "
                "resume with the same data and batch size"
            )
        _, mine = self.state()
        if state != mine:
            changed = sorted(k for k in mine if state.get(k) != mine[k])
            raise ValueError(
                f"the checkpoint's data streams differ from this run's ({', '.join(changed)}); "
                "resume with the seed and binarisation of the original run"
            )


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

    def batches(self, epoch: int, start: int = 0, share: Share | None = None) -> Iterator[Batch]:
        if start:
            raise ValueError("a DataLoader cannot resume mid-epoch; use IndexedBatches")
        if share is not None:
            raise ValueError(
                "a DataLoader's batches cannot be shared among workers; train on an array or "
                "file (IndexedBatches) to train on several workers"
            )
        for i, item in enumerate(self.loader):
            x = item[0] if isinstance(item, (tuple, list)) else item
            x = self.prepare(x, f"batch {i + 1} of the DataLoader (epoch {epoch + 1})")
            yield Batch(x, i, x.shape[0], slice(0, x.shape[0]))

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
def mean_elbo(
    model: VAEModel,
    batches: Iterator[Batch],
    device: torch.device,
    world: World = SINGLE,
    seed: int = VALID_SEED,
) -> float:
    """The ELBO (analytic KL where available, one sample) averaged over every example of every
    worker's batches; each batch's noise is drawn whole from ``seed``'s "valid" stream and each
    worker takes its own columns, so the result does not depend on the number of workers."""
    streams = TrainingStreams(seed)
    event, dtype = _noise_shape(model)
    totals = torch.zeros(2, dtype=torch.float64)  # Σ ELBO, examples
    for batch in batches:
        if batch.x.shape[0] == 0:  # a last batch smaller than the number of workers
            continue
        x = batch.x.to(device)
        shape = (1, batch.size, *event)
        eps = streams.normal(shape, 0, batch.number, stream="valid", device=device, dtype=dtype)
        given = model if batch.condition is None else model.given(batch.condition.to(device))
        totals[0] += float(given.elbo(x, noise=eps[:, batch.rows]).elbo.sum())
        totals[1] += x.shape[0]
    world.sum(totals)
    return float(totals[0] / max(float(totals[1]), 1.0))


def _noise_shape(model: VAEModel) -> tuple[tuple[int, ...], torch.dtype]:
    """The event shape of the latent code (a draw of ε is ``[samples, batch, *event]``) and the
    dtype of the model's parameters."""
    with torch.no_grad():
        event = (model.latent_dim,)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return event, dtype


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


class _Objective(nn.Module):
    """The loss of one worker's share of a batch: a module, so that ``DistributedDataParallel``
    sees the forward pass it synchronises the gradients of.

    For a batch of ``size`` examples over N workers the loss is −(N / size) Σ of this worker's
    per-example objectives; DDP averages gradients over the workers, which gives the gradient of
    the mean over the whole batch. With free bits the clamp acts on each dimension's mean KL over
    the whole batch (summed over the workers), as on one process. ``flags``, when given, is added
    as ``(flag_parameter · flags).sum()``, which is 0 and makes the parameter's gradient the
    workers' mean of ``flags``.
    """

    def __init__(self, model: VAEModel, config: TrainConfig, world: World) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.world = world
        # Not in the optimiser: it only carries flags through the gradients' all-reduce.
        self.flags = nn.Parameter(torch.zeros(FLAGS)) if world.size > 1 else None

    def forward(
        self,
        x: torch.Tensor,
        noise: torch.Tensor | None,
        kl_weight: float,
        size: int,
        flags: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ElboTerms | IwaeTerms]:
        config, scale = self.config, self.world.size / size
        # A conditional model's batch comes with its examples' conditions, bound for this step.
        model = self.model if condition is None else self.model.given(condition)
        terms: ElboTerms | IwaeTerms
        if config.objective == "iwae":
            terms = model.iwae(x, k=config.k, gradient=config.gradient, noise=noise)
            loss = -terms.objective.sum() * scale
        else:
            terms = model.elbo(
                x, samples=config.samples, beta=kl_weight, gradient=config.gradient, noise=noise
            )
            if config.free_bits > 0:
                loss = self._free_bits_loss(model, x, terms, kl_weight, size)
            else:
                loss = -terms.objective.sum() * scale
        if flags is not None and self.flags is not None:
            loss = loss + (self.flags * flags).sum()
        return loss, terms

    def _free_bits_loss(
        self, model: VAEModel, x: torch.Tensor, terms: ElboTerms, kl_weight: float, size: int
    ) -> torch.Tensor:
        """Free bits (Kingma et al. 2016): each latent dimension's batch-mean KL counts at least
        λ. On N workers the batch mean is the global one: its value comes from the workers' sum,
        its gradient from this worker's examples (scaled by N / size, as the reconstruction)."""
        q, p = model.posterior(x), model.prior()
        per_dim = kl_per_dimension(q, p)
        if per_dim is None:
            raise ValueError("free bits need a diagonal posterior and a factorised Gaussian prior")
        scale = self.world.size / size
        mean = per_dim.sum(0) * scale  # [latent]
        if self.world.size > 1:
            total = self.world.sum(per_dim.sum(0).detach().double().cpu())
            mean = mean + ((total / size).to(mean) - mean).detach()
        kl = mean.clamp(min=self.config.free_bits).sum()
        return -(terms.reconstruction.sum() * scale - kl_weight * kl)


FLAGS = 2  # stop requested, checkpoint due
_STOP, _CHECKPOINT = range(FLAGS)


def _data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel``. Its buffers (a decoder's offset, a pixel grid)
    never change, so they are not re-broadcast at every step."""
    from torch.nn.parallel import DistributedDataParallel

    options: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    options[
        "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    ] = False
    return DistributedDataParallel(module, **options)


class Trainer:
    """Fits a ``VAEModel`` by stochastic gradient ascent on the ELBO (Adam), on one process or as
    one worker of ``world`` (``vaelab.train.distributed``; every worker builds the same ``Trainer``).

    ``seed`` keys the reparameterisation noise (``vaelab.train.streams``); None draws it from torch's
    global generator when ``fit`` starts (a restored run takes its checkpoint's). ``compile``
    runs the loss of each step, forward and backward, through ``torch.compile``
    (``vaelab.train.fastpath``; eager, after one warning, where it cannot compile).
    """

    def __init__(
        self,
        model: VAEModel,
        config: TrainConfig,
        device: torch.device,
        on_epoch: Callable[[EpochMetrics], None] | None = None,
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
        self.on_epoch = on_epoch
        self.observer = observer or TrainingObserver()
        self.checkpoint = checkpoint
        self.seed = seed
        self.world = world
        self._objective = _Objective(model, config, world).to(device)
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

    # ---------------------------------------------------------------------------- objective
    def _kl_weight(self, epoch: int, fraction: float) -> float:
        """β, ramped linearly from 0 over the first ``kl_warmup_epochs`` (Bowman et al. 2016)."""
        if self.config.kl_warmup_epochs <= 0:
            return self.config.beta
        return self.config.beta * min(1.0, (epoch + fraction) / self.config.kl_warmup_epochs)

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
        self.count += examples

    def check(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> None:
        """Compute the training loss once on ``x`` (a few examples, with their conditions for a
        conditional model) without a step, so that a setting that cannot work (e.g. free bits
        with a mixture prior) fails before training starts. The random streams are left as they
        were, and the workers are not involved."""
        devices = [self.device] if self.device.type == "cuda" else []
        objective = _Objective(self.model, self.config, SINGLE)
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
        totals = self.world.sum(torch.cat([self.sums, torch.tensor([float(self.count)])]))
        if self.world.main:
            self.sums, self.count = totals[:4].clone(), int(totals[4])
        else:
            self.sums, self.count = torch.zeros_like(self.sums), 0

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
            },
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
            self._step_module = _data_parallel(self._objective, self.device)
        loss_of = self._loss_of_step()
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
            for batch in train.batches(epoch, start, share):
                i = batch.number
                x = batch.x.to(self.device)
                condition = None if batch.condition is None else batch.condition.to(self.device)
                lr = learning_rate(self.config, self.step, total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                kl_weight = self._kl_weight(epoch, i / steps)
                flags = self._local_flags(self.step + 1) if share is not None else None
                try:
                    loss, terms = loss_of(
                        x, self._noise(epoch, batch), kl_weight, batch.size, flags, condition
                    )
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
                if self._objective.flags is not None:
                    self._objective.flags.grad = None
                loss.backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
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
            self.epoch_seconds += time.perf_counter() - started
            self._end_epoch(train, valid, lr, kl_weight)
            # On several workers a request that came after the epoch's last step is agreed on
            # with the next step's flags: deciding it here, alone, would leave the others behind.
            if self._stop_requested and not self.finished and share is None:
                self._interrupt(train)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return self.history

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
        self._event, self._dtype = _noise_shape(self.model)

    def _local_flags(self, step: int) -> torch.Tensor:
        """This worker's flags for the step that ends at optimiser step ``step``: a stop
        requested here, a checkpoint due by rank 0's clock or by the step rule."""
        flags = torch.zeros(FLAGS, device=self.device)
        flags[_STOP] = float(self._stop_requested)
        flags[_CHECKPOINT] = float(self._checkpoint_due(step))
        return flags

    def _agreed_flags(self) -> tuple[bool, bool]:
        """Stop, checkpoint: on one process this process's; on several, whether any worker raised
        the flag for the step just taken (the flags' gradient, averaged by DDP, is above 0)."""
        parameter = self._objective.flags
        if parameter is None:
            return self._stop_requested, self._checkpoint_due(self.step)
        assert parameter.grad is not None
        stop, due = (parameter.grad > 0).tolist()
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
        )
        if valid is not None:
            self.model.eval()
            share = self.world.share if self.world.size > 1 else None
            try:
                metrics.valid_elbo = mean_elbo(
                    self.model, valid.batches(self.epoch, 0, share), self.device, self.world
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
