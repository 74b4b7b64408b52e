"""The hyper-parameters of training (``TrainConfig``), their checks, and the learning-rate schedule
they describe (``learning_rate``: linear warm-up, then constant or cosine decay)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from vaelab.objectives.bounds import check_iwae_warmup, check_objective
from vaelab.objectives.discrete import check_discrete_objective

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Training hyper-parameters.

    The learning rate rises linearly over the first ``warmup_fraction`` of all steps, then stays at
    ``lr`` (``lr_schedule="constant"``) or decays along a cosine to ``final_lr_fraction · lr``
    (``"cosine"``, the default; Loshchilov & Hutter 2017): the decay removes the gradient-noise floor
    that a constant rate leaves, which the linear-Gaussian oracle test measures.

    ``kl_warmup_epochs``: β rises linearly from 0 over this many epochs (Bowman et al. 2016;
    with ``objective="iwae"`` it tempers the importance weights' log p(z) − log q(z|x),
    ``gradient="standard"`` only, ``vaelab.objectives.bounds.iwae_bound``); ``None``, the
    default, chooses by the model (``vaelab.train.warmup``): for a top-down model 500 steps on
    the ELBO, 5,000 on the IWAE bound with the standard gradient (at most a quarter of the run),
    at least one epoch; else 0.
    ``free_bits``: each latent dimension's batch-mean KL counts as at least this many nats
    (Kingma et al. 2016). ``grad_clip``: maximum gradient norm. ``patience``: stop after this many
    epochs without a better validation ELBO (needs validation data).

    Training that survives (``docs/guide.md``, "Training that survives"):
    ``layer_free_bits``: each stochastic layer's batch-mean KL counts as at least this many nats
    (free bits per group, Kingma et al. 2016; with one layer the whole code is the group; see
    ``vaelab.objectives.layers``). β and its warm-up weigh every layer's KL alike.
    ``skip_grad_norm``: an update whose total gradient norm (before ``grad_clip``) exceeds this,
    or is NaN or infinite, is skipped: no optimiser step, though the learning-rate schedule and
    the position still advance. ``max_rollbacks``: a non-finite loss (or weights or a validation
    ELBO that overflow at an epoch's end) restores the state of the
    last epoch end (or of the start of ``fit``), multiplies the learning rate by
    ``rollback_lr_factor`` from then on and goes on, at most this many times; 0 raises
    ``NonFiniteLossError`` at once, as before.
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
    kl_warmup_epochs: float | None = None
    free_bits: float = 0.0
    grad_clip: float | None = None
    patience: int | None = None
    weight_decay: float = 0.0
    layer_free_bits: float = 0.0
    skip_grad_norm: float | None = None
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    # M2's α / N_labelled: the weight of log q(y|x) per labelled example
    # (vaelab.model.semi_supervised.classification_weight); 0 for every other model.
    classification_weight: float = 0.0
    # M2: labelled examples per step, drawn apart from the unlabelled batch of batch_size
    # (vaelab.train.labelled_batches); 0: among the ordinary shuffled batches (as before).
    labelled_batch_size: int = 0
    temperature: float = 1.0  # gradient="relaxed": the relaxation's temperature at the start
    temperature_final: float | None = None  # … annealed exponentially to this (None: constant)
    straight_through: bool = False  # gradient="relaxed": discrete forward, relaxed backward

    @classmethod
    def from_options(cls, options: Any, **renamed: str) -> TrainConfig:
        """The training hyper-parameters among ``options``' attributes: each field of this class
        that ``options`` has under the field's name, or under the name ``renamed`` gives it
        (``warmup_fraction="warmup"``); the others keep their defaults. The one map from what a
        user sets (a ``vaelab.VAE``, a run's ``vaelab.runs.options.RunConfig``) to training."""
        values = {}
        for field in fields(cls):
            name = renamed.get(field.name, field.name)
            if hasattr(options, name):
                values[field.name] = getattr(options, name)
        return cls(**values)

    def temperature_at(self, step: int, total_steps: int) -> float:
        """The relaxation's temperature at optimiser step ``step`` of ``total_steps``:
        λ₀ (λ_T / λ₀)^(step / total), exponential annealing as in Jang, Gu & Poole (2017)."""
        if self.temperature_final is None or total_steps <= 0:
            return self.temperature
        ratio = self.temperature_final / self.temperature
        return self.temperature * ratio ** min(1.0, step / total_steps)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "samples", "k", "patience", "max_rollbacks"):
            value = getattr(self, name)
            # NumPy integers count (GridSearchCV hands them); floats and booleans do not.
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral)
            ):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.beta >= 0, f"beta must be non-negative, got {self.beta}"),
            (self.samples >= 1, f"samples must be at least 1, got {self.samples}"),
            (
                self.classification_weight >= 0,
                f"classification_weight must be non-negative, got {self.classification_weight}",
            ),
            (self.free_bits >= 0, f"free_bits must be non-negative, got {self.free_bits}"),
            (
                self.kl_warmup_epochs is None or self.kl_warmup_epochs >= 0,
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
                self.layer_free_bits >= 0,
                f"layer_free_bits must be non-negative, got {self.layer_free_bits}",
            ),
            (
                self.skip_grad_norm is None or self.skip_grad_norm > 0,
                f"skip_grad_norm must be positive (or None: no skipping), got "
                f"{self.skip_grad_norm}",
            ),
            (
                self.max_rollbacks >= 0,
                f"max_rollbacks must be 0 (off) or more, got {self.max_rollbacks}",
            ),
            (
                0 < self.rollback_lr_factor <= 1,
                f"rollback_lr_factor must be in (0, 1], got {self.rollback_lr_factor}",
            ),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}",
            ),
        ]
        if isinstance(self.labelled_batch_size, bool) or not isinstance(
            self.labelled_batch_size, numbers.Integral
        ):
            raise ValueError(
                f"labelled_batch_size must be an integer, got {self.labelled_batch_size!r}"
            )
        checks.append(
            (
                self.labelled_batch_size >= 0,
                f"labelled_batch_size must be 0 (labelled examples in the ordinary batches) or "
                f"more, got {self.labelled_batch_size}",
            )
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._validate_objective()

    def _validate_objective(self) -> None:
        """The objective, its gradient estimator and the options that only some objectives have
        (``vaelab.objectives.bounds.check_objective`` refuses the combinations without a meaning)."""
        check_objective(self.objective, self.gradient, beta=self.beta)
        check_discrete_objective(self.objective, self.gradient, self.k)
        self._validate_relaxation()
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
                ("free_bits", self.free_bits, 0.0),
                ("layer_free_bits", self.layer_free_bits, 0.0),
            ):
                if value != off:
                    raise ValueError(
                        f"{name}={value} shapes the ELBO's terms, which the IWAE bound does not "
                        f"have; leave it at {off} with objective='iwae' (k sets its samples)"
                    )
        check_iwae_warmup(
            self.gradient, self.objective == "iwae" and (self.kl_warmup_epochs or 0.0) > 0
        )
        if self.gradient != "standard" and self.free_bits > 0:
            raise ValueError(
                f"free bits replace the KL term with a clamped closed form, which has no "
                f"gradient={self.gradient!r} form; use gradient='standard' with free_bits"
            )
        if self.gradient != "standard" and self.layer_free_bits > 0:
            raise ValueError(
                f"layer free bits replace the KL term with a clamped Monte Carlo form, which has "
                f"no gradient={self.gradient!r} form; use gradient='standard' with layer_free_bits"
            )
        if self.free_bits > 0 and self.layer_free_bits > 0:
            raise ValueError(
                "free_bits (per latent dimension) and layer_free_bits (per stochastic layer) "
                "clamp the same KL; set one of them to 0"
            )

    def _validate_relaxation(self) -> None:
        """The temperature and straight-through options, which only ``gradient="relaxed"`` has."""
        final = self.temperature_final
        if not self.temperature > 0 or (final is not None and not final > 0):
            raise ValueError(
                f"temperature must be positive (and temperature_final positive or None), got "
                f"{self.temperature} and {final}"
            )
        if self.gradient != "relaxed" and (
            self.temperature != 1.0 or final is not None or self.straight_through
        ):
            raise ValueError(
                "temperature, temperature_final and straight_through set the relaxation of "
                f"gradient='relaxed'; with gradient={self.gradient!r} leave them at their defaults"
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
