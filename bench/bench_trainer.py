"""Seconds per epoch: vaelab's ``Trainer`` against a minimal hand-written PyTorch loop, side by side.

Issue 3 asks that in-memory data be batched by indexing tensors and that the trainer's epoch time be
within 10% of a minimal hand-written loop for the same model and batch size. This script measures
that, in one process, on the same core, alternating the two sides:

- **A, vaelab**: the training path of ``VAE.fit`` and ``vaelab train``: ``build_model(ModelConfig)``,
  ``likelihood.initialise`` on the training data, ``IndexedBatches`` over one in-memory float32
  tensor and ``Trainer(...).fit``. No observer (so no progress bar), no checkpoint, no validation
  data (``vaelab train`` also evaluates a validation split after each epoch; that is not timed
  here): what is left is the trainer itself (learning-rate schedule, β, the non-finite check, the
  epoch's metric sums, the end-of-epoch parameter check).
- **B, by hand**: ``nn.Sequential`` encoder and decoder with the same layer sizes, starting from the
  same weights (the decoder's data-mean offset folded into its last bias, which is the same
  function), ``Adam`` with the same learning rate, ``torch.randperm`` and tensor indexing for the
  batches, z = μ + σ ε, the closed-form KL against N(0, I) and
  ``binary_cross_entropy_with_logits(reduction="sum")``; ``backward``, ``step``. Nothing else: no
  validation, no metrics, no checks, a constant learning rate.
- **C, vaelab with its run log** (``--no-run-log`` to skip): A plus what ``vaelab train`` adds to
  every epoch: the ``RunLog`` observer (quiet, so no bar, but ``metrics.jsonl`` and TensorBoard
  scalars written each epoch) and a checkpoint at every epoch end (60 s mid-epoch, the default),
  in a temporary folder. Reported as its own line and as the overhead C / A.
- **D, vaelab compiled** (``--no-compile`` to skip): A with ``Trainer(compile=True)``, the step's
  loss through ``torch.compile`` (``vaelab.train.fastpath``), its own copy of the weights. Its warm-up
  unit includes the compilation, reported apart; TorchInductor's cache starts empty in a
  temporary folder (``--warm-compile-cache`` keeps the user's), so that is what a first run pays.
- **F, the floor** (``--no-floor`` to skip): the model's matrix products of one training step
  and nothing else, ``[batch, in] × [in, out]`` for every ``Linear`` of encoder and decoder
  (with the bias, as ``addmm``), then the backward products: each weight's gradient and each
  layer's input gradient, except the first layer's (the data need none). No elementwise work,
  no autograd, no Python between layers. Any trainer of this model in float32 does at least
  these products, so F / B is the least fraction of the loop's time any trainer can take on this
  CPU. Timed apart, per epoch: the forward products, the backward products, and the fused Adam
  update of the same parameters (the least any Adam trainer adds).

Before any timing, A and B must give the same loss on a shared batch and shared ε (float32
precision): same network, same objective, so a time difference is the implementation's alone.

Each configuration warms up one unit of each side, then runs ``--rounds`` rounds of A, B, C, D, F; a
unit is one epoch on MNIST and ``--digits-epochs`` epochs on the digits (15 batches an epoch are too
few to time alone). Every unit starts a new ``Trainer`` (A, C) or a new ``Adam`` (B) outside the
timer, on weights that carry on from the unit before. Medians of wall-clock seconds per epoch are
compared; CPU seconds (``time.process_time``) are recorded too, since on a shared machine wall time
also counts waiting for a core, and so is the spread of the per-round ratios A / B.

When A / B is above ``--threshold`` (1.10), the step is taken apart: each phase of ``Trainer.fit``'s
step (batch, schedule, forward and loss, non-finite check, backward, optimiser step, bookkeeping)
is timed against the same phase of B, and so is each line of the forward pass, with a third
column for A with ``torch.distributions`` argument validation switched off; the two losses'
autograd nodes and ATen calls are counted; and a cProfile of A's real ``fit`` lists the functions
that cost most.

One torch thread by default (``--threads``): the machine has two cores and others use them; one
thread per side keeps runs comparable. The load average and the processes that used CPU during the
run are recorded with the results in ``bench/results/trainer-<time>.json``.

Usage (from the repository root, in vaelab's venv)::

    .venv/bin/python bench/bench_trainer.py                     # digits, MNIST, 784-400-20, Burda
    .venv/bin/python bench/bench_trainer.py --configs digits --rounds 9
    .venv/bin/python bench/bench_trainer.py --breakdown always --no-run-log
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

import peers  # bench/peers.py, beside this script
import vaelab
from vaelab.data.sources import DataError, load_data
from vaelab.distributions.sampling import reparameterise
from vaelab.model.registry import ModelConfig, build_model
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import ElboTerms, kl_term
from vaelab.runs.folder import RunLog
from vaelab.runs.options import RunConfig
from vaelab.train.batches import Batch, IndexedBatches
from vaelab.train.checkpoint import CHECKPOINT_FILE, CheckpointPolicy
from vaelab.train.config import TrainConfig, learning_rate
from vaelab.train.start import INIT_EXAMPLES
from vaelab.train.streams import TrainingStreams
from vaelab.train.trainer import Trainer

VAELAB_FILES = tuple(f"{p.name}:" for p in Path(vaelab.__file__).parent.rglob("*.py"))
DEVICE = torch.device("cpu")
CPU_ACTIVITY = torch.profiler.ProfilerActivity.CPU
# Two float32 sums over ~800 terms in different orders agree to ~1e-5 relative; a different
# network, offset or objective is off by far more.
SANITY_TOLERANCE = 1e-4
SIDES = {
    "A": "vaelab Trainer",
    "B": "hand-written loop",
    "C": "vaelab + run log",
    "D": "vaelab Trainer, compiled",
    "F": "matrix products alone",
}
FLOOR_PARTS = ("forward", "backward", "adam")  # F's parts, timed apart
# Plain torch.nn activations for the hand-written side: it must not borrow vaelab's modules.
HAND_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class Setting:
    """One benchmarked configuration: a data set and an architecture (Bernoulli likelihood,
    diagonal Gaussian posterior, N(0, I) prior, MLP: the vaelab defaults)."""

    name: str
    data: str
    latent_dim: int
    hidden: tuple[int, ...]
    activation: str

    def describe(self) -> str:
        hidden = ",".join(map(str, self.hidden))
        return f"{self.data}: latent {self.latent_dim}, hidden {hidden} {self.activation}"


SETTINGS = {
    "digits": Setting("digits", "digits", 8, (256,), "relu"),
    "mnist": Setting("mnist", "mnist", 8, (256,), "relu"),
    # The model of issue 11's comparison with pythae and Pyro: 784-400-20, ReLU.
    "mnist-400": Setting("mnist-400", "mnist", 20, (400,), "relu"),
    # Burda et al. (2016), one stochastic layer: 784-200-200-50, tanh.
    "mnist-burda": Setting("mnist-burda", "mnist", 50, (200, 200), "tanh"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(SETTINGS),
        default=list(SETTINGS),
        help="configurations to run (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side (default 5)")
    parser.add_argument(
        "--digits-epochs", type=int, default=20, help="epochs per timed unit on digits (default 20)"
    )
    parser.add_argument(
        "--mnist-epochs", type=int, default=1, help="epochs per timed unit on MNIST (default 1)"
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)"
    )
    parser.add_argument(
        "--no-run-log", action="store_true", help="skip side C (RunLog observer + checkpoints)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip side D (the trainer with compile=True)"
    )
    parser.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="D compiles with TorchInductor's usual cache (default: an empty one, as a first run)",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip side F (products alone)")
    parser.add_argument(
        "--breakdown",
        choices=("auto", "always", "never"),
        default="auto",
        help="per-step breakdown and profile: when A/B > --threshold (auto), always or never",
    )
    parser.add_argument(
        "--hand-adam",
        choices=("default", "fused"),
        default="default",
        help="B's Adam: torch's default (what a minimal loop writes) or fused, as vaelab's trainer",
    )
    parser.add_argument("--threshold", type=float, default=1.10)
    parser.add_argument(
        "--breakdown-steps", type=int, default=150, help="steps per side in the breakdown"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="default: $VAELAB_DATA or ../shared/data")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.digits_epochs < 1 or args.mnist_epochs < 1:
        parser.error("--rounds, --digits-epochs and --mnist-epochs must be at least 1")
    return args


# ------------------------------------------------------------------------------------ the sides


def vaelab_model(
    x: torch.Tensor, latent_dim: int, hidden: tuple[int, ...], activation: str, seed: int
) -> VAEModel:
    """The Bernoulli model as ``VAE.fit`` builds it: ``build_model``, then its start at the
    data ``x`` (``VAEModel.initialise``). ``bench_iwae`` builds its model here too."""
    torch.manual_seed(seed)
    config = ModelConfig(
        data_shape=tuple(int(s) for s in x.shape[1:]),
        latent_dim=latent_dim,
        hidden=hidden,
        likelihood="bernoulli",
        activation=activation,
    )
    model = build_model(config).to(DEVICE)
    model.initialise(x[:INIT_EXAMPLES])
    return model


def sequential(sizes: list[int], activation: str) -> nn.Sequential:
    """``Linear`` layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(HAND_ACTIVATIONS[activation]())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def hand_networks(setting: Setting, model: VAEModel) -> tuple[nn.Sequential, nn.Sequential]:
    """Encoder ``[batch, D] → [batch, 2 · latent]`` and decoder ``[batch, latent] → [batch, D]`` of
    the same sizes as ``model``, with its weights. vaelab adds a fixed offset (the data-mean logits)
    to the decoder output; here it goes into the last bias, which computes the same function."""
    data_dim = math.prod(model.likelihood.data_shape)
    latent, hidden = setting.latent_dim, list(setting.hidden)
    encoder = sequential([data_dim, *hidden, 2 * latent], setting.activation)
    decoder = sequential([latent, *reversed(hidden), data_dim], setting.activation)
    with torch.no_grad():
        encoder.load_state_dict(model.posterior.encoder.layers.state_dict())
        decoder.load_state_dict(model.likelihood.decoder.layers.state_dict())
        decoder[-1].bias += model.likelihood.offset.reshape(-1)
    return encoder, decoder


def hand_adam(args: argparse.Namespace, parameters: list[nn.Parameter]) -> torch.optim.Adam:
    """B's optimiser: ``Adam`` as a minimal loop writes it, or, with ``--hand-adam fused``, the
    fused kernel vaelab's trainer uses, so that the two sides differ in nothing but the loop."""
    return torch.optim.Adam(parameters, lr=args.lr, fused=args.hand_adam == "fused" or None)


def hand_loss(
    encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, eps: torch.Tensor | None = None
) -> torch.Tensor:
    """The negative ELBO averaged over the batch, ``x: [batch, D]``, one sample of z."""
    mu, log_var = encoder(x).chunk(2, dim=-1)  # [batch, latent] each
    std = torch.exp(0.5 * log_var)
    z = mu + std * (torch.randn_like(std) if eps is None else eps)
    reconstruction = F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), summed over dimensions and examples.
    kl = 0.5 * (mu.square() + std.square() - 1 - log_var).sum()
    return (reconstruction + kl) / x.shape[0]


def hand_epochs(
    encoder: nn.Module,
    decoder: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
) -> None:
    """The minimal loop: ``x: [n, D]`` in memory, a permutation per epoch, one slice per batch."""
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for lo in range(0, n, batch_size):
            loss = hand_loss(encoder, decoder, x[order[lo : lo + batch_size]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def sanity_check(
    model: VAEModel, encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, latent: int
) -> dict[str, Any]:
    """A's and B's loss on the same batch and the same ε."""
    eps = torch.randn(x.shape[0], latent, generator=torch.Generator().manual_seed(1))
    ours = float(-model.elbo(x, noise=eps[None]).objective.mean())
    hand = float(hand_loss(encoder, decoder, x.reshape(x.shape[0], -1), eps))
    relative = abs(ours - hand) / abs(hand)
    return {"vaelab_loss": ours, "hand_loss": hand, "relative_diff": relative}


# ---------------------------------------------------------------------------------------- timing


def timed(run: Callable[[], object]) -> dict[str, float]:
    load = os.getloadavg()[0]
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return {
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "load1_before": load,
    }


class Floor:
    """Side F: the matrix products of one training step of ``model`` (an MLP VAE) for a batch of
    ``batch_size``, and the fused Adam update of its parameters, each alone.

    Operands are fixed random tensors of the layers' shapes (the products' cost does not depend
    on the values); the weights are the model's. ``Linear`` computes x Wᵀ + b; its backward
    computes the weight's gradient gᵀ x and the input's gradient g W."""

    def __init__(self, model: VAEModel, batch_size: int, lr: float) -> None:
        layers = [
            m
            for part in (model.posterior.encoder, model.likelihood.decoder)
            for m in part.modules()
            if isinstance(m, nn.Linear)
        ]
        generator = torch.Generator().manual_seed(0)

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator)

        self.layers = [
            (
                layer.weight.detach().clone(),  # [out, in]
                layer.bias.detach().clone(),  # [out]
                normal(batch_size, layer.in_features),  # the layer's input x
                normal(batch_size, layer.out_features),  # the gradient g at its output
            )
            for layer in layers
        ]
        parameters = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for p in parameters:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        self.adam = torch.optim.Adam(parameters, lr=lr, fused=True)  # as vaelab's trainer
        self.flops = sum(  # per step: 2 per multiply-add
            2 * batch_size * w.shape[0] * w.shape[1] * (3 if i else 2)
            for i, (w, _, _, _) in enumerate(self.layers)
        )

    def forward(self) -> None:
        for w, b, x, _ in self.layers:
            torch.addmm(b, x, w.t())  # [batch, out]

    def backward(self) -> None:
        for i, (w, _, x, g) in enumerate(self.layers):
            torch.mm(g.t(), x)  # the weight's gradient, [out, in]
            if i:  # the first layer's input is the data, which needs no gradient
                torch.mm(g, w)  # the input's gradient, [batch, in]

    def update(self) -> None:
        self.adam.step()

    def epochs(self, steps: int, epochs: int) -> dict[str, float]:
        """Seconds (wall and CPU) of each part for ``epochs`` epochs of ``steps`` steps; "wall"
        and "cpu" are the products' (forward and backward)."""
        found: dict[str, float] = {"load1_before": os.getloadavg()[0]}
        for part, run in zip(FLOOR_PARTS, (self.forward, self.backward, self.update), strict=True):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(steps * epochs):
                run()
            found[f"{part}_wall"] = time.perf_counter() - wall
            found[f"{part}_cpu"] = time.process_time() - cpu
        found["wall"] = found["forward_wall"] + found["backward_wall"]
        found["cpu"] = found["forward_cpu"] + found["backward_cpu"]
        return found


class Bench:
    """The sides of one configuration, each keeping its own weights across units."""

    def __init__(self, setting: Setting, x: torch.Tensor, args: argparse.Namespace) -> None:
        self.setting, self.x, self.args = setting, x, args
        self.flat = x.reshape(x.shape[0], -1)  # B's view of the same memory
        self.model = vaelab_model(
            x, setting.latent_dim, setting.hidden, setting.activation, args.seed
        )
        self.encoder, self.decoder = hand_networks(setting, self.model)
        self.sanity = sanity_check(
            self.model, self.encoder, self.decoder, x[: args.batch_size], setting.latent_dim
        )
        self.run_model = copy.deepcopy(self.model)
        self.compiled_model = copy.deepcopy(self.model)
        self.floor = Floor(self.model, args.batch_size, args.lr)
        self.steps = -(-x.shape[0] // args.batch_size)
        self.generators = {side: torch.Generator().manual_seed(args.seed + 1) for side in SIDES}
        self.epochs = args.digits_epochs if setting.data == "digits" else args.mnist_epochs
        self.train_config = TrainConfig(epochs=self.epochs, batch_size=args.batch_size, lr=args.lr)

    def unit(self, side: str) -> dict[str, float]:
        """``self.epochs`` epochs of one side; set-up outside the timer, seconds per epoch."""
        if side == "F":
            result = self.floor.epochs(self.steps, self.epochs)
        elif side == "B":
            optimizer = hand_adam(
                self.args, [*self.encoder.parameters(), *self.decoder.parameters()]
            )
            result = timed(
                lambda: hand_epochs(
                    self.encoder,
                    self.decoder,
                    optimizer,
                    self.flat,
                    self.args.batch_size,
                    self.epochs,
                    self.generators["B"],
                )
            )
        else:
            # The data order and noise come from vaelab.train.streams, keyed by (seed, epoch, batch).
            source = IndexedBatches(self.x, self.args.batch_size, self.args.seed + 1)
            if side in ("A", "D"):
                trainer = Trainer(
                    self.model if side == "A" else self.compiled_model,
                    copy.copy(self.train_config),
                    DEVICE,
                    seed=self.args.seed + 2,
                    compile=side == "D",
                )
                result = timed(lambda: trainer.fit(source))
            else:
                with tempfile.TemporaryDirectory(prefix="bench-trainer-") as folder:
                    trainer = Trainer(
                        self.run_model,
                        copy.copy(self.train_config),
                        DEVICE,
                        seed=self.args.seed + 2,
                        checkpoint=CheckpointPolicy(
                            path=Path(folder) / CHECKPOINT_FILE,
                            every_seconds=RunConfig().checkpoint_seconds or None,
                            extra={"run": {"benchmark": "trainer"}},
                        ),
                    )
                    run_log = RunLog(Path(folder), self.epochs, quiet=True, log=io.StringIO())
                    trainer.observer = run_log
                    try:
                        result = timed(lambda: trainer.fit(source))
                    finally:
                        run_log.close()
            # The trainer's own clock: the batch loop only, without the epoch-end work.
            result["trainer_seconds"] = sum(m.seconds for m in trainer.history)
        for key in list(result):
            if key != "load1_before":
                result[key] /= self.epochs
        return result


def run_setting(setting: Setting, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(setting, x, args)
    steps = -(-x.shape[0] // args.batch_size)
    print(
        f"\n{setting.describe()}; {x.shape[0]} examples, {steps} batches of {args.batch_size} an "
        f"epoch, {bench.epochs} epoch(s) per unit; sanity: |Δ loss| / loss = "
        f"{bench.sanity['relative_diff']:.1e}",
        flush=True,
    )
    if bench.sanity["relative_diff"] > SANITY_TOLERANCE:
        raise SystemExit("A and B compute different losses: fix the hand-written side first")
    sides = [
        side
        for side, skipped in (
            ("A", False),
            ("B", False),
            ("C", args.no_run_log),
            ("D", args.no_compile),
            ("F", args.no_floor),
        )
        if not skipped
    ]
    warm_up: dict[str, float] = {}
    for side in sides:  # warm-up: allocator, kernels, Adam state, TensorBoard writer, compiling
        warm_up[side] = bench.unit(side)["wall"]
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        for side in sides:
            runs[side].append(bench.unit(side))
        line = "  ".join(f"{side} {runs[side][-1]['wall']:.4f}" for side in sides)
        print(f"  round {round_ + 1}: s/epoch {line}", flush=True)

    def summary(side: str) -> dict[str, Any]:
        walls = [r["wall"] for r in runs[side]]
        found = {
            "name": SIDES[side],
            "runs": runs[side],
            "median_seconds_per_epoch": statistics.median(walls),
            "min_seconds_per_epoch": min(walls),
            "median_cpu_seconds_per_epoch": statistics.median(r["cpu"] for r in runs[side]),
            "median_ms_per_step": 1e3 * statistics.median(walls) / steps,
            "warm_up_seconds_per_epoch": warm_up[side],
        }
        if side in ("A", "C", "D"):
            found["median_trainer_seconds_per_epoch"] = statistics.median(
                r["trainer_seconds"] for r in runs[side]
            )
        if side == "F":
            for part in FLOOR_PARTS:
                for clock in ("wall", "cpu"):
                    found[f"median_{part}_{clock}_seconds_per_epoch"] = statistics.median(
                        r[f"{part}_{clock}"] for r in runs[side]
                    )
            found["gflops_per_second"] = (
                bench.floor.flops * steps / found["median_seconds_per_epoch"] / 1e9
            )
        if side == "D":
            # The first unit compiles (and runs a first eager step); the others reuse it.
            found["compile_seconds"] = warm_up[side] * bench.epochs - statistics.median(
                r["wall"] * bench.epochs for r in runs["D"]
            )
        return found

    result: dict[str, Any] = {
        "setting": setting.__dict__ | {"hidden": list(setting.hidden)},
        "examples": int(x.shape[0]),
        "steps_per_epoch": steps,
        "epochs_per_unit": bench.epochs,
        "sanity": bench.sanity,
        "sides": {side: summary(side) for side in sides},
    }
    a, b = result["sides"]["A"], result["sides"]["B"]

    def ratios(side: str, clock: str = "") -> tuple[float, float]:
        """``side`` over B: the ratio of medians, and the median of the per-round ratios (robust
        to slow drifts in the machine's load); ``clock`` "cpu" for CPU seconds."""
        key = f"median_{clock}_seconds_per_epoch" if clock else "median_seconds_per_epoch"
        pairs = [
            r[clock or "wall"] / rb[clock or "wall"]
            for r, rb in zip(runs[side], runs["B"], strict=True)
        ]
        return result["sides"][side][key] / b[key], statistics.median(pairs)

    result["ratio_a_b"] = a["median_seconds_per_epoch"] / b["median_seconds_per_epoch"]
    result["ratio_a_b_cpu"] = a["median_cpu_seconds_per_epoch"] / b["median_cpu_seconds_per_epoch"]
    pairs = [ra["wall"] / rb["wall"] for ra, rb in zip(runs["A"], runs["B"], strict=True)]
    result["ratio_a_b_paired_median"] = statistics.median(pairs)
    result["ratio_a_b_paired_range"] = [min(pairs), max(pairs)]
    if "C" in runs:
        c = result["sides"]["C"]
        result["ratio_c_a"] = c["median_seconds_per_epoch"] / a["median_seconds_per_epoch"]
    if "D" in runs:
        result["ratio_d_b"], result["ratio_d_b_paired_median"] = ratios("D")
        result["ratio_d_b_cpu"] = ratios("D", "cpu")[0]
        pairs = [rd["wall"] / ra["wall"] for rd, ra in zip(runs["D"], runs["A"], strict=True)]
        result["ratio_d_a_paired_median"] = statistics.median(pairs)
        result["ratio_d_a_paired_range"] = [min(pairs), max(pairs)]
    if "F" in runs:
        f = result["sides"]["F"]
        result["ratio_f_b"], result["ratio_f_b_paired_median"] = ratios("F")
        result["ratio_f_b_cpu"] = ratios("F", "cpu")[0]
        wall = b["median_seconds_per_epoch"]
        result["ratio_forward_products_b"] = f["median_forward_wall_seconds_per_epoch"] / wall
        result["ratio_products_and_adam_b"] = (
            f["median_seconds_per_epoch"] + f["median_adam_wall_seconds_per_epoch"]
        ) / wall
    wanted = args.breakdown == "always" or (
        args.breakdown == "auto" and result["ratio_a_b"] > args.threshold
    )
    if wanted:
        result["breakdown"] = breakdown(bench, args.breakdown_steps)
        result["profile"] = profile_trainer(bench, args.breakdown_steps)
    return result


# ------------------------------------------------------------------------------------ breakdown

PHASES = ("batch", "schedule", "forward", "finite check", "backward", "optimizer", "bookkeeping")


FORWARD = ("encoder, q(z|x)", "sample z", "decode, log p(x|z)", "KL", "combine")


class Clock:
    """Seconds spent in named phases, accumulated over steps."""

    def __init__(self, phases: tuple[str, ...] = PHASES) -> None:
        self.seconds = dict.fromkeys(phases, 0.0)
        self.last = time.perf_counter()

    def restart(self) -> None:
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


def vaelab_steps(bench: Bench, batches: Iterator[torch.Tensor], steps: int) -> dict[str, float]:
    """``steps`` optimiser steps with the body of ``Trainer.fit``'s loop (training.py, the
    ``for i, x in enumerate(train.batches(...))`` block), cut into phases. It calls the trainer's
    own ``_loss``, schedule and optimiser; only the order of the calls is written out here."""
    trainer = Trainer(copy.deepcopy(bench.model), copy.copy(bench.train_config), DEVICE)
    trainer._prepare_streams()
    per_epoch = -(-bench.x.shape[0] // bench.args.batch_size)
    total = per_epoch * bench.epochs  # as fit's total_steps; it only sets the learning rate
    clock = Clock()
    for i in range(steps):
        x = next(batches).to(DEVICE)
        clock.lap("batch")
        lr = learning_rate(trainer.config, trainer.step, total)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        kl_weight = trainer._kl_weight(0, (i % per_epoch) / per_epoch)
        clock.lap("schedule")
        noise = trainer._noise(0, Batch(x, i, x.shape[0], slice(0, x.shape[0])))
        loss, terms = trainer._loss(x, kl_weight, noise)
        clock.lap("forward")
        if not math.isfinite(loss.item()):
            raise SystemExit("the loss diverged during the breakdown")
        clock.lap("finite check")
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.lap("backward")
        trainer.optimizer.step()
        clock.lap("optimizer")
        trainer.step += 1
        trainer._record(terms, x.shape[0])
        trainer.observer.step(trainer, x.shape[0])
        trainer._agreed_flags()
        clock.lap("bookkeeping")
    return clock.seconds


def hand_steps(bench: Bench, batches: Iterator[torch.Tensor], steps: int) -> dict[str, float]:
    encoder, decoder = copy.deepcopy(bench.encoder), copy.deepcopy(bench.decoder)
    optimizer = hand_adam(bench.args, [*encoder.parameters(), *decoder.parameters()])
    clock = Clock()
    for _ in range(steps):
        x = next(batches)
        clock.lap("batch")
        loss = hand_loss(encoder, decoder, x)
        clock.lap("forward")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.lap("backward")
        optimizer.step()
        clock.lap("optimizer")
    return clock.seconds


def vaelab_forward(bench: Bench, batches: Iterator[torch.Tensor], steps: int) -> dict[str, float]:
    """A's forward pass cut into the lines of ``vaelab.objectives.bounds.elbo`` (one sample, β = 1, the
    KL chosen by ``kl_term``), with autograd recording as in training."""
    model = bench.model
    streams = TrainingStreams(bench.args.seed)
    clock = Clock(FORWARD)
    for i in range(steps):
        x = next(batches)
        clock.restart()
        q = model.posterior(x)
        clock.lap("encoder, q(z|x)")
        # As the trainer: the batch's ε from its stream (vaelab.train.streams), then z = μ + σ ε.
        eps = streams.normal((1, x.shape[0], bench.setting.latent_dim), 0, i)
        z = reparameterise(q, eps[0])[0]
        clock.lap("sample z")
        reconstruction = model.likelihood.log_prob(x, z)
        clock.lap("decode, log p(x|z)")
        kl, _ = kl_term(q, model.prior(), z.unsqueeze(0))
        clock.lap("KL")
        terms = ElboTerms(reconstruction, kl, reconstruction - kl, reconstruction - 1.0 * kl)
        _ = -terms.objective.mean()
        clock.lap("combine")
    return clock.seconds


def hand_forward(bench: Bench, batches: Iterator[torch.Tensor], steps: int) -> dict[str, float]:
    """B's forward pass (``hand_loss``) cut into the same pieces."""
    encoder, decoder = bench.encoder, bench.decoder
    clock = Clock(FORWARD)
    for _ in range(steps):
        x = next(batches)
        clock.restart()
        mu, log_var = encoder(x).chunk(2, dim=-1)
        std = torch.exp(0.5 * log_var)
        clock.lap("encoder, q(z|x)")
        z = mu + std * torch.randn_like(std)
        clock.lap("sample z")
        reconstruction = F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
        clock.lap("decode, log p(x|z)")
        kl = 0.5 * (mu.square() + std.square() - 1 - log_var).sum()
        clock.lap("KL")
        _ = (reconstruction + kl) / x.shape[0]
        clock.lap("combine")
    return clock.seconds


def endless(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled batches by indexing, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(x.shape[0], generator=generator)
        for lo in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield x[order[lo : lo + batch_size]]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null: torch.profiler's C++ side logs its start and stop
    there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def graph_size(bench: Bench) -> dict[str, dict[str, int]]:
    """How much work each side's loss is made of, on one batch: autograd nodes that backward
    visits (parameters' gradient accumulators not counted) and ATen calls in the forward pass."""
    x = bench.x[: bench.args.batch_size]
    trainer = Trainer(bench.model, copy.copy(bench.train_config), DEVICE)
    trainer._prepare_streams()
    noise = trainer._noise(0, Batch(x, 0, x.shape[0], slice(0, x.shape[0])))
    losses = {
        "A": lambda: trainer._loss(x, bench.train_config.beta, noise)[0],
        "B": lambda: hand_loss(bench.encoder, bench.decoder, x.reshape(x.shape[0], -1)),
    }
    found: dict[str, dict[str, int]] = {"autograd_nodes": {}, "aten_calls_forward": {}}
    for side, loss in losses.items():
        seen, stack = set(), [loss().grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen or type(node).__name__ == "AccumulateGrad":
                continue
            seen.add(node)
            stack.extend(parent for parent, _ in node.next_functions)
        found["autograd_nodes"][side] = len(seen)
        with quiet_stderr(), torch.profiler.profile(activities=[CPU_ACTIVITY]) as profiler:
            loss()
        events = profiler.key_averages()
        found["aten_calls_forward"][side] = sum(
            e.count for e in events if e.key.startswith("aten::")
        )
    nodes, calls = found["autograd_nodes"], found["aten_calls_forward"]
    print(
        f"  one loss: {nodes['A']} autograd nodes in A, {nodes['B']} in B; "
        f"{calls['A']} ATen calls in A's forward, {calls['B']} in B's"
    )
    return found


def interleaved_ms(
    kinds: dict[str, Callable[[], dict[str, float]]],
    pieces: tuple[str, ...],
    steps: int,
    total: str,
) -> dict[str, dict[str, float]]:
    """Run each kind (``steps`` steps, seconds per piece) 5 times, interleaved; milliseconds per
    step for every piece, and their sum under ``total``."""
    seconds = {kind: dict.fromkeys(pieces, 0.0) for kind in kinds}
    for _ in range(5):
        for kind, run in kinds.items():
            for piece, s in run().items():
                seconds[kind][piece] += s
    ms = {
        kind: {piece: 1e3 * s / (5 * steps) for piece, s in found.items()}
        for kind, found in seconds.items()
    }
    for found in ms.values():
        found[total] = sum(found[p] for p in pieces)
    return ms


def breakdown(bench: Bench, steps: int) -> dict[str, Any]:
    """Milliseconds per step in each phase: A, B and A without distribution argument checks,
    interleaved in blocks of ``steps // 5`` steps, summed."""
    block = max(1, steps // 5)
    size, seed = bench.args.batch_size, bench.args.seed

    def kinds(
        vaelab_side: Callable[[Bench, Iterator[torch.Tensor], int], dict[str, float]],
        hand_side: Callable[[Bench, Iterator[torch.Tensor], int], dict[str, float]],
    ) -> dict[str, Callable[[], dict[str, float]]]:
        return {
            "A": lambda: vaelab_side(bench, endless(bench.x, size, seed), block),
            "B": lambda: hand_side(bench, endless(bench.flat, size, seed), block),
            "A, validate_args=False": lambda: unvalidated(
                lambda: vaelab_side(bench, endless(bench.x, size, seed), block)
            ),
        }

    ms = interleaved_ms(kinds(vaelab_steps, hand_steps), PHASES, block, "step")
    print("  per-step breakdown, ms (A's phases follow Trainer.fit's loop body):")
    print_phases(ms, (*PHASES, "step"))
    forward_ms = interleaved_ms(kinds(vaelab_forward, hand_forward), FORWARD, block, "forward")
    print("  forward pass, ms per step (A's pieces follow vaelab.objectives.bounds.elbo):")
    print_phases(forward_ms, (*FORWARD, "forward"))
    return {
        "ms_per_step": ms,
        "forward_ms_per_step": forward_ms,
        "steps_per_kind": 5 * block,
        "graph": graph_size(bench),
    }


def unvalidated(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``run`` with torch.distributions' argument validation off (it is on by default)."""
    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        return run()
    finally:
        Distribution.set_default_validate_args(before)


def print_phases(ms: dict[str, dict[str, float]], rows: tuple[str, ...]) -> None:
    kinds = list(ms)
    width = max(16, *(len(row) + 1 for row in rows))
    print("  " + "".ljust(width) + "".join(k.rjust(24) for k in kinds) + "A - B".rjust(9))
    for row in rows:
        cells = "".join(f"{ms[k][row]:24.3f}" for k in kinds)
        print(f"  {row:{width}}{cells}{ms['A'][row] - ms['B'][row]:9.3f}")


def profile_trainer(bench: Bench, steps: int) -> dict[str, Any]:
    """cProfile of A's real ``Trainer.fit`` over about ``steps`` steps: a prefix of the data when
    it has more batches, several epochs when it has fewer."""
    size = bench.args.batch_size
    source = IndexedBatches(bench.x[: steps * size], size, bench.args.seed)
    epochs = max(1, round(steps / len(source)))
    config = TrainConfig(epochs=epochs, batch_size=size, lr=bench.args.lr)
    trainer = Trainer(copy.deepcopy(bench.model), config, DEVICE)
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.fit(source)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = function
        if line:
            where = f"{Path(filename).name}:{line}({function})"
        if "site-packages/torch/" in filename:
            where = "torch/" + filename.split("site-packages/torch/")[1] + f":{line}({function})"
        rows.append({"function": where, "calls": calls, "tottime": tottime, "cumtime": cumtime})
    steps_run = trainer.step

    def show(title: str, chosen: list[dict[str, Any]]) -> None:
        print(f"  cProfile of Trainer.fit ({steps_run} steps), {title}, µs per step:")
        for row in chosen:
            print(
                f"    {1e6 * row['tottime'] / steps_run:8.1f} own "
                f"{1e6 * row['cumtime'] / steps_run:8.1f} cumulative "
                f"{row['calls'] / steps_run:5.1f} calls/step  {row['function'][:80]}"
            )

    by_own = sorted(rows, key=lambda r: r["tottime"], reverse=True)
    # Python-level code between the kernels: vaelab's and torch.distributions'.
    ours = sorted(
        (r for r in rows if r["function"].startswith(("torch/distributions", *VAELAB_FILES))),
        key=lambda r: r["cumtime"],
        reverse=True,
    )
    show("top by own time", by_own[:12])
    show("vaelab and torch.distributions by cumulative time", ours[:16])
    return {"steps": steps_run, "top_by_tottime": by_own[:40], "vaelab_and_distributions": ours}


# ------------------------------------------------------------------------------------- machine


# ------------------------------------------------------------------------------------ reporting


def print_table(report: dict[str, Any]) -> None:
    header = (
        "config",
        "steps",
        "A vaelab",
        "B hand",
        "A/B",
        "A/B cpu",
        "pairs: median",
        "min-max",
        "C +log",
        "C/A",
    )
    rows = [header]
    for name, r in report["results"].items():
        if "skipped" in r:
            rows.append((name, "skipped", *[""] * (len(header) - 2)))
            continue
        sides = r["sides"]
        c = sides.get("C")
        rows.append(
            (
                name,
                str(r["steps_per_epoch"]),
                f"{sides['A']['median_seconds_per_epoch']:.4f}",
                f"{sides['B']['median_seconds_per_epoch']:.4f}",
                f"{r['ratio_a_b']:.3f}",
                f"{r['ratio_a_b_cpu']:.3f}",
                f"{r['ratio_a_b_paired_median']:.3f}",
                "{:.3f}-{:.3f}".format(*r["ratio_a_b_paired_range"]),
                f"{c['median_seconds_per_epoch']:.4f}" if c else "-",
                f"{r['ratio_c_a']:.3f}" if c else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("\nmedian seconds per epoch (wall clock), ratios of medians:")
    for row in rows:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print_fast_path_table(report)
    start, end = report["load_average_start"], report["load_average_end"]
    print(
        f"load average (1 min) {start[0]:.2f} → {end[0]:.2f} on {os.cpu_count()} cores; "
        f"torch threads {report['threads']}; {report['total_seconds']:.0f} s in all"
    )
    if not report["other_processes"]:
        print("  no other process used 5% of a core or more")
    for p in report["other_processes"]:
        print(
            f"  also running: {p['percent_of_a_core']}% of a core, pid {p['pid']}: {p['command'][:100]}"
        )


def print_fast_path_table(report: dict[str, Any]) -> None:
    """D (compiled) and F (the products alone) against B, the loop."""
    header = (
        "config",
        "D compiled",
        "D/B",
        "D/A pairs",
        "compile s",
        "F products",
        "F/B",
        "forward/B",
        "(F+Adam)/B",
        "GFLOP/s",
    )
    rows = [header]
    for name, r in report["results"].items():
        sides = r.get("sides", {})
        d, f = sides.get("D"), sides.get("F")
        if d is None and f is None:
            continue
        rows.append(
            (
                name,
                f"{d['median_seconds_per_epoch']:.4f}" if d else "-",
                f"{r['ratio_d_b']:.3f}" if d else "-",
                f"{r['ratio_d_a_paired_median']:.3f}" if d else "-",
                f"{d['compile_seconds']:.1f}" if d else "-",
                f"{f['median_seconds_per_epoch']:.4f}" if f else "-",
                f"{r['ratio_f_b']:.3f}" if f else "-",
                f"{r['ratio_forward_products_b']:.3f}" if f else "-",
                f"{r['ratio_products_and_adam_b']:.3f}" if f else "-",
                f"{f['gflops_per_second']:.0f}" if f else "-",
            )
        )
    if len(rows) == 1:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("\nthe fast path (D) and the floor (F: the step's matrix products alone), s per epoch:")
    for row in rows:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def mnist_missing(data_dir: Path) -> str | None:
    if (data_dir / "mnist").is_dir():
        return None
    return (
        f"skipping MNIST: no mnist/ folder in {data_dir}; pass --data-dir or set VAELAB_DATA to "
        "the folder that holds mnist/"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = peers.data_dir(args.data_dir)
    inductor_cache = None
    if not args.no_compile and not args.warm_compile_cache:
        # Read when TorchInductor first compiles: an empty cache makes D's warm-up a first run's.
        inductor_cache = tempfile.TemporaryDirectory(prefix="bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache.name
    started = time.perf_counter()
    load_start, watch = os.getloadavg(), peers.ProcessWatch()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average "
        f"{load_start[0]:.2f} on {os.cpu_count()} cores; A = {SIDES['A']}, B = {SIDES['B']}, "
        f"C = {SIDES['C']}, D = {SIDES['D']}, F = {SIDES['F']} (no progress bar on any side); "
        f"B's Adam: {args.hand_adam}"
    )
    results: dict[str, Any] = {}
    cache: dict[str, torch.Tensor] = {}
    for name in args.configs:
        setting = SETTINGS[name]
        if setting.data == "mnist" and (reason := mnist_missing(data_dir)):
            print(reason)
            results[name] = {"skipped": reason}
            continue
        if setting.data not in cache:
            try:
                splits = load_data(setting.data, data_dir=data_dir)
            except DataError as error:
                print(f"skipping {name}: {error}")
                results[name] = {"skipped": str(error)}
                continue
            # As `vaelab train` holds an in-memory split: one float32 tensor.
            cache[setting.data] = torch.from_numpy(np.asarray(splits.train, dtype=np.float32))
        results[name] = run_setting(setting, cache[setting.data], args)
        watch.snapshot()
    total = time.perf_counter() - started
    report: dict[str, Any] = {
        "benchmark": "trainer",
        "results": results,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rounds": args.rounds,
        "hand_adam": args.hand_adam,
        "compile_cache": "warm" if inductor_cache is None else "empty at the start",
        "seed": args.seed,
        "total_seconds": total,
        **peers.run_context(load_start, watch, argv),
    }
    print_table(report)
    peers.save_result(report, "trainer", args.out)
    if inductor_cache is not None:
        inductor_cache.cleanup()
    return report


if __name__ == "__main__":
    main()
