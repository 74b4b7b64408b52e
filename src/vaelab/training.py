"""The trainer: minibatches, the optimiser and its schedule, validation and early stopping.

The trainer maximises the mean over a minibatch of the per-example objective returned by
``vaelab.objectives.elbo`` (it negates once, here). In-memory data is batched by indexing one tensor
with a permutation drawn from the trainer's own generator, never by per-example ``Dataset`` calls.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from vaelab.model import VAEModel
from vaelab.objectives import kl_per_dimension

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Training hyper-parameters.

    The default schedule is Adam with a linear warm-up over the first 2% of steps and a cosine decay
    to 1% of ``lr`` (Loshchilov & Hutter 2017): the decay removes the gradient-noise floor that a
    constant rate leaves, which the linear-Gaussian oracle test measures.
    """

    epochs: int = 50
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.02
    final_lr_fraction: float = 0.01
    beta: float = 1.0
    samples: int = 1
    kl_warmup_epochs: int = 0
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
                self.lr_schedule in LR_SCHEDULES,
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimiser step ``step`` (0-based) of ``total_steps``."""
    if config.lr_schedule == "constant":
        return config.lr
    warmup = max(1, int(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = config.final_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class EpochMetrics:
    """Means over one epoch, in nats per example."""

    epoch: int
    elbo: float
    reconstruction: float
    kl: float
    lr: float
    seconds: float
    examples_per_second: float
    valid_elbo: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


Batches = Callable[[int], Iterator[torch.Tensor]]


def tensor_batches(
    x: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Callable[[int], Iterator[torch.Tensor]]:
    """Minibatches of an in-memory tensor ``[n, *data_shape]`` by a fresh permutation per epoch."""

    def epoch(_: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            yield x[order[start : start + batch_size]]

    return epoch


def loader_batches(loader: DataLoader) -> Callable[[int], Iterator[torch.Tensor]]:
    """Minibatches from a ``DataLoader``; of an ``(x, y, …)`` item only x is used."""

    def epoch(_: int) -> Iterator[torch.Tensor]:
        for item in loader:
            yield item[0] if isinstance(item, (tuple, list)) else item

    return epoch


@torch.no_grad()
def mean_elbo(model: VAEModel, batches: Iterator[torch.Tensor], device: torch.device) -> float:
    """The ELBO (analytic KL where available, one sample) averaged over every example."""
    total, count = 0.0, 0
    for x in batches:
        x = x.to(device)
        total += float(model.elbo(x).elbo.sum())
        count += x.shape[0]
    return total / max(count, 1)


class Trainer:
    """Fits a ``VAEModel`` by stochastic gradient ascent on the ELBO."""

    def __init__(
        self,
        model: VAEModel,
        config: TrainConfig,
        device: torch.device,
        on_epoch: Callable[[EpochMetrics], None] | None = None,
    ) -> None:
        config.validate()
        self.model = model
        self.config = config
        self.device = device
        self.on_epoch = on_epoch
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.step = 0
        self.history: list[EpochMetrics] = []

    def _kl_weight(self, epoch: int, fraction: float) -> float:
        """β, ramped linearly from 0 over the first ``kl_warmup_epochs`` (Bowman et al. 2016)."""
        if self.config.kl_warmup_epochs <= 0:
            return self.config.beta
        return self.config.beta * min(1.0, (epoch + fraction) / self.config.kl_warmup_epochs)

    def _loss(self, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, Any]:
        terms = self.model.elbo(x, samples=self.config.samples, beta=kl_weight)
        if self.config.free_bits > 0:
            # Free bits (Kingma et al. 2016): each latent dimension's batch-mean KL counts at least λ.
            q, p = self.model.posterior(x), self.model.prior()
            per_dim = kl_per_dimension(q, p)
            if per_dim is None:
                raise ValueError("free bits need a diagonal posterior and a factorised Gaussian prior")
            kl = per_dim.mean(0).clamp(min=self.config.free_bits).sum()
            return -(terms.reconstruction.mean() - kl_weight * kl), terms
        return -terms.objective.mean(), terms

    def fit(
        self,
        train: Batches,
        steps_per_epoch: int,
        valid: Batches | None = None,
    ) -> list[EpochMetrics]:
        """Train for ``config.epochs`` epochs; keeps the best-validation weights when ``valid`` is given."""
        total_steps = self.config.epochs * steps_per_epoch
        best_state, best_valid, waited = None, -math.inf, 0
        for epoch in range(self.config.epochs):
            self.model.train()
            sums = torch.zeros(3, dtype=torch.float64)
            count, started = 0, time.perf_counter()
            for i, x in enumerate(train(epoch)):
                x = x.to(self.device)
                lr = learning_rate(self.config, self.step, total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, terms = self._loss(x, self._kl_weight(epoch, i / steps_per_epoch))
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss became {float(loss)} at epoch {epoch + 1}, step {i + 1}; "
                        "lower the learning rate, clip gradients, or check the data for extreme values"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                self.step += 1
                with torch.no_grad():
                    sums += torch.stack(
                        [terms.elbo.sum(), terms.reconstruction.sum(), terms.kl.sum()]
                    ).double()
                count += x.shape[0]
            seconds = time.perf_counter() - started
            means = (sums / max(count, 1)).tolist()
            metrics = EpochMetrics(
                epoch=epoch + 1,
                elbo=means[0],
                reconstruction=means[1],
                kl=means[2],
                lr=lr,
                seconds=seconds,
                examples_per_second=count / max(seconds, 1e-9),
            )
            if valid is not None:
                self.model.eval()
                metrics.valid_elbo = mean_elbo(self.model, valid(epoch), self.device)
                if metrics.valid_elbo > best_valid:
                    best_valid, waited = metrics.valid_elbo, 0
                    best_state = copy.deepcopy(self.model.state_dict())
                else:
                    waited += 1
            self.history.append(metrics)
            if self.on_epoch is not None:
                self.on_epoch(metrics)
            if self.config.patience is not None and waited > self.config.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        return self.history
