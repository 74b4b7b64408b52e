"""Seconds per epoch of a deep top-down model: vaelab's ``Trainer`` against a minimal hand-written
loop of the same architecture and the same estimator, side by side.

Issue 16 asks that the deep model's epoch time be at most that of a minimal hand-written loop
(ratio ≤ 1.0). The model: MNIST-sized binary data (784 pixels; MNIST from the data folder when it
is there, else random binary data of the same shape), five stochastic layers of 64, 32, 16, 8, 4
units drawn top-down (``inference="top-down"``), hidden sizes 512, 256, ReLU, Bernoulli
likelihood. In one process, on one torch thread, alternating the two sides (A B A B …):

- **A, vaelab**: the training path of ``VAE.fit``: ``build_model(ModelConfig)``, the start at the
  data (``VAEModel.initialise``), ``IndexedBatches`` over one in-memory float32 tensor and
  ``Trainer(...).fit`` (no observer, no checkpoint, no validation data): data order and ε from
  ``vaelab.train.streams``, the learning-rate schedule, β (computed at every step, held at 1 as
  B's: ``kl_warmup_epochs=0``, so that both sides train the same objective), the non-finite
  check, the epoch's metric sums (the KL per layer from one batch in eight), the end-of-epoch
  parameter check.
- **B, by hand**: the same networks as plain ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU``,
  starting from A's weights (the decoder's data-mean offset folded into its last bias):
  the bottom-up pass h₁ = f₁(x), h_{l+1} = f_{l+1}(h_l) with a linear head per layer giving
  (μ̂_l, log σ̂_l²); then from z_L down the prior's (μ_p, log σ_p²) (N(0, I) at the top, the prior's
  network of the layer above below it), the precision-weighted merge log σ_q² = −logaddexp(−log σ̂²,
  −log σ_p²), μ_q = μ_p + sigmoid(log σ_p² − log σ̂²)(μ̂ − μ_p), z_l = μ_q + σ_q ε_l; the same
  estimator as A, the one-sample ELBO with the Monte Carlo KL log q(z|x) − log p(z) (written out
  as sums of squares, with (z − μ_q) / σ_q = ε and the 2π terms cancelled), ``binary_cross_entropy_with_logits(reduction="sum")``;
  ``Adam`` (fused, as the trainer's), ``torch.randperm`` and tensor indexing for the batches,
  ``torch.randn`` for ε. Nothing else.

Before any timing, A's and B's losses on one batch with one ε must agree (float32 precision):
same networks, same estimator. A unit is ``--steps`` optimiser steps (the first ``--steps`` ×
batch-size examples, one epoch of them; both sides see the same examples); medians of the
per-unit wall-clock seconds are scaled to seconds per full epoch (50,000 examples, 500 steps);
CPU seconds (``time.process_time``) are recorded too, since on a shared machine wall time also
counts waiting for a core. Products of tiny floats that land below 2⁻¹²⁶ (subnormals) are slow
on x86; how many a step makes depends on the weights each side has reached, so
``--flush-denormal`` flushes them to zero on both sides, to compare the code alone.

``--compile`` compares the two compiled, like for like, in the same run as both eager. Four sides,
each with its own copy of the starting weights, one optimiser and, for A, one ``Trainer`` that
goes on from unit to unit (one epoch per unit, as a fit of many epochs does; the eager default
builds a new ``Trainer`` and ``Adam`` per unit instead), alternating A B A′ B′:

- **A, vaelab compiled**: ``Trainer(compile=True)``, vaelab's own option: its loss module (x and ε
  to the batch's loss and the per-example terms, the KL per layer on reporting steps) through
  ``torch.compile(dynamic=True)``, TorchInductor, the backward compiled with it by AOTAutograd;
  data order, ε, the learning rate, the optimiser step and the checks stay eager;
- **B, by hand compiled**: ``hand_loss`` (x and ε to the batch's loss) through the same
  ``torch.compile(dynamic=True, backend="inductor")``, the backward by AOTAutograd; ``randperm``,
  indexing, ``randn``, ``zero_grad`` and ``Adam`` stay eager;
- **A′, B′**: the same two eager.

Compiling happens in the warm-up unit of each side (its wall seconds are recorded apart), never in a
timed one; the graphs TorchDynamo made for each side and any recompilation during the timed units
are recorded too.

``--before DIR`` measures a second vaelab (another checkout's ``src``, e.g. the code before a
change) in the same run: this script then drives child processes, alternating the two sources
round by round (each child warms up, then runs A B A B), and reports both ratios side by side.

Usage (from the repository root)::

    PYTHONPATH=src .venv/bin/python bench/bench_top_down.py                 # ratio A / B
    PYTHONPATH=src .venv/bin/python bench/bench_top_down.py --before ../main/src --rounds 3
    PYTHONPATH=src .venv/bin/python bench/bench_top_down.py --compile --flush-denormal --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import peers  # bench/peers.py, beside this script
from vaelab.data.sources import DataError, load_data
from vaelab.model.registry import ModelConfig, build_model
from vaelab.model.vae_model import VAEModel
from vaelab.train.batches import IndexedBatches
from vaelab.train.config import TrainConfig
from vaelab.train.start import INIT_EXAMPLES
from vaelab.train.trainer import Trainer

SIZES = (64, 32, 16, 8, 4)
HIDDEN = (512, 256)
EPOCH_EXAMPLES = 50_000
SANITY_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (default 3)")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed unit (default 100)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="flush subnormal floats to zero on both sides (torch.set_flush_denormal)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="both sides compiled (torch.compile), beside both eager, in the same run",
    )
    parser.add_argument("--data-dir", type=Path, help="default: $VAELAB_DATA or ../shared/data")
    parser.add_argument("--before", type=Path, help="a second vaelab source folder to compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/...)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ the data


def training_data(data_dir: Path, seed: int) -> tuple[torch.Tensor, str]:
    """``[n, 784]`` float32 in {0, 1}: MNIST thresholded at ½, else random of the same shape."""
    try:
        splits = load_data("mnist", data_dir=data_dir, binarize="threshold")
        x = torch.from_numpy(np.asarray(splits.train, dtype=np.float32)).reshape(-1, 784)
        return x, "mnist (threshold 0.5)"
    except DataError:
        generator = torch.Generator().manual_seed(seed)
        return torch.bernoulli(torch.full((EPOCH_EXAMPLES, 784), 0.13), generator=generator), (
            "random binary"
        )


# ------------------------------------------------------------------------------------ the sides


def vaelab_model(x: torch.Tensor, seed: int) -> VAEModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        data_shape=(784,),
        latent_dim=SIZES,
        hidden=HIDDEN,
        likelihood="bernoulli",
        inference="top-down",
    )
    model = build_model(config)
    model.initialise(x[:INIT_EXAMPLES])
    return model


def copy_sequential(mlp: nn.Sequential, *, activation_after: bool = False) -> nn.Sequential:
    """A plain ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU`` with ``mlp``'s weights."""
    layers: list[nn.Module] = []
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    for i, linear in enumerate(linears):
        if i:
            layers.append(nn.ReLU())
        copied = nn.Linear(linear.in_features, linear.out_features)
        copied.load_state_dict(linear.state_dict())
        layers.append(copied)
    if activation_after:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Hand(nn.Module):
    """B's networks (module docstring): ``stages`` and ``heads`` of the bottom-up pass, the
    prior's ``conditionals`` in draw order (z_L → z_{L−1} first), the ``decoder`` of z₁."""

    def __init__(self, model: VAEModel) -> None:
        super().__init__()
        bottom_up = model.posterior.bottom_up
        self.stages = nn.ModuleList(
            copy_sequential(stage, activation_after=True) for stage in bottom_up.stages
        )
        self.heads = nn.ModuleList(copy_sequential(nn.Sequential(h)) for h in bottom_up.heads)
        self.conditionals = nn.ModuleList(
            copy_sequential(c.encoder.layers) for c in model.prior.conditionals
        )
        self.decoder = copy_sequential(model.likelihood.decoder.body.layers)
        with torch.no_grad():
            self.decoder[-1].bias += model.likelihood.offset.reshape(-1)


def hand_loss(hand: Hand, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """−ELBO averaged over the batch, one draw, the Monte Carlo KL log q(z|x) − log p(z);
    ``x``: ``[batch, 784]``, ``eps``: ``[batch, sum(SIZES)]``, the top layer's ε last."""
    evidence = []
    h = x
    for stage, head in zip(hand.stages, hand.heads, strict=True):
        h = stage(h)
        evidence.append(head(h).chunk(2, dim=-1))
    noise = eps.split(SIZES, dim=-1)
    kl = x.new_zeros(x.shape[0])
    z = x  # replaced at the top
    for layer in reversed(range(len(SIZES))):
        mu_hat, log_var_hat = evidence[layer]
        if layer == len(SIZES) - 1:
            mu_p, log_var_p = torch.zeros_like(mu_hat), torch.zeros_like(log_var_hat)
        else:
            mu_p, log_var_p = hand.conditionals[len(SIZES) - 2 - layer](z).chunk(2, dim=-1)
        log_var_q = -torch.logaddexp(-log_var_hat, -log_var_p)
        mu_q = mu_p + torch.sigmoid(log_var_p - log_var_hat) * (mu_hat - mu_p)
        z = mu_q + torch.exp(0.5 * log_var_q) * noise[layer]
        # log q − log p with (z − μ_q) / σ_q = ε, the ½ log 2π terms cancelled.
        log_p = (z - mu_p).square() * torch.exp(-log_var_p) + log_var_p
        kl = kl + 0.5 * (log_p - noise[layer].square() - log_var_q).sum(-1)
    reconstruction = F.binary_cross_entropy_with_logits(hand.decoder(z), x, reduction="sum")
    return (reconstruction + kl.sum()) / x.shape[0]


def hand_epoch(
    hand: Hand,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    batch: int,
    loss_of: Callable[[Hand, torch.Tensor, torch.Tensor], torch.Tensor] = hand_loss,
) -> None:
    """One epoch of B over ``x``; ``loss_of`` is ``hand_loss`` or its compiled form."""
    order = torch.randperm(x.shape[0])
    for lo in range(0, x.shape[0], batch):
        rows = x[order[lo : lo + batch]]
        loss = loss_of(hand, rows, torch.randn(rows.shape[0], sum(SIZES)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def sanity_check(model: VAEModel, hand: Hand, x: torch.Tensor) -> dict[str, float]:
    eps = torch.randn(x.shape[0], sum(SIZES), generator=torch.Generator().manual_seed(1))
    ours = float(-model.elbo(x, noise=eps[None]).objective.mean())
    theirs = float(hand_loss(hand, x, eps))
    return {"vaelab_loss": ours, "hand_loss": theirs, "relative_diff": abs(ours - theirs) / theirs}


# ---------------------------------------------------------------------------------------- timing


def persistent_sides(
    model: VAEModel,
    x: torch.Tensor,
    config: TrainConfig,
    source: IndexedBatches,
    args: argparse.Namespace,
) -> dict[str, Callable[[], None]]:
    """``--compile``'s four sides (module docstring), each an epoch per call on its own copy of
    ``model``'s starting weights: A and B compiled, A′ and B′ (``A_eager``, ``B_eager``) eager."""
    sides: dict[str, Callable[[], None]] = {}
    for name, compiled in (("A", True), ("B", True), ("A_eager", False), ("B_eager", False)):
        if name.startswith("A"):
            trainer = Trainer(
                copy.deepcopy(model),
                copy.copy(config),
                torch.device("cpu"),
                seed=args.seed + 2,
                compile=compiled,
            )
            sides[name] = functools.partial(next_epoch, trainer, source)
        else:
            hand = Hand(model)
            optimizer = torch.optim.Adam(hand.parameters(), lr=args.lr, fused=True)
            # The settings of vaelab's fast path (vaelab.train.fastpath.Compiled's defaults).
            loss_of = (
                torch.compile(hand_loss, dynamic=True, backend="inductor")
                if compiled
                else hand_loss
            )
            sides[name] = functools.partial(
                hand_epoch, hand, optimizer, x, args.batch_size, loss_of
            )
    return sides


def next_epoch(trainer: Trainer, source: IndexedBatches) -> None:
    """One more epoch of ``trainer``, which keeps its compilation, optimiser and position."""
    trainer.config.epochs, trainer.finished = trainer.epoch + 1, False
    trainer.fit(source)


def dynamo_counts() -> dict[str, int]:
    """TorchDynamo's counts so far in this process: graphs compiled, graph breaks."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def paired(seconds: dict[str, list[float]], p: str, q: str) -> float:
    """The median over rounds of side ``p``'s seconds over side ``q``'s in the same round."""
    return statistics.median(a / b for a, b in zip(seconds[p], seconds[q], strict=True))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then ``rounds`` rounds of A and B (and with ``--compile`` A′ and B′); seconds per
    full epoch, medians and ratios."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    x_all, data = training_data(peers.data_dir(args.data_dir), args.seed)
    x = x_all[: args.steps * args.batch_size].contiguous()
    model = vaelab_model(x_all, args.seed)
    hand = Hand(model)
    sanity = sanity_check(model, hand, x[: args.batch_size])
    if sanity["relative_diff"] > SANITY_TOLERANCE:
        raise SystemExit(f"A and B disagree on the same batch and ε: {sanity}")
    # β = 1 from the first step, as B has it: the automatic warm-up of a top-down model would
    # restart at every unit (a new Trainer of one epoch), keeping A at β ≤ 0.2 while B trains at
    # β = 1, and the two sides' weights would drift apart in how many subnormal floats their
    # products make, which moved either side's time by up to 40 % (docs/results.md).
    config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, kl_warmup_epochs=0)
    source = IndexedBatches(x, args.batch_size, args.seed + 1)
    scale = EPOCH_EXAMPLES / x.shape[0]

    def fresh_a() -> None:
        Trainer(model, copy.copy(config), torch.device("cpu"), seed=args.seed + 2).fit(source)

    def fresh_b() -> None:
        optimizer = torch.optim.Adam(hand.parameters(), lr=args.lr, fused=True)
        hand_epoch(hand, optimizer, x, args.batch_size)

    sides = (
        persistent_sides(model, x, config, source, args)
        if args.compile
        else {"A": fresh_a, "B": fresh_b}
    )

    def unit(side: str) -> tuple[float, float]:
        cpu, started = time.process_time(), time.perf_counter()
        sides[side]()
        return (time.perf_counter() - started) * scale, (time.process_time() - cpu) * scale

    warmup, graphs = {}, {}
    for side in sides:  # compiling, where there is any, happens here
        before = dynamo_counts()
        warmup[side] = unit(side)[0] / scale
        graphs[side] = {k: v - before[k] for k, v in dynamo_counts().items()}
    warmed = dynamo_counts()
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            wall, used = unit(side)
            seconds[side].append(wall)
            cpu[side].append(used)
    a, b = statistics.median(seconds["A"]), statistics.median(seconds["B"])
    found: dict[str, Any] = {
        "data": data,
        "sanity": sanity,
        "seconds_per_epoch": seconds,
        "cpu_seconds_per_epoch": cpu,
        "median_a": a,
        "median_b": b,
        "ratio_a_b": a / b,
        "ratio_a_b_cpu": statistics.median(cpu["A"]) / statistics.median(cpu["B"]),
        "ratio_a_b_paired_median": paired(seconds, "A", "B"),
    }
    if args.compile:
        medians = {side: statistics.median(seconds[side]) for side in sides}
        pairs = [("A", "B_eager"), ("A_eager", "B_eager"), ("A", "A_eager"), ("B", "B_eager")]
        found["compile"] = {
            "medians": medians,
            "cpu_medians": {side: statistics.median(cpu[side]) for side in sides},
            "paired_medians": {f"{p}/{q}": paired(seconds, p, q) for p, q in pairs},
            "warmup_unit_seconds": warmup,
            "dynamo_per_side": graphs,
            "dynamo_during_timing": {k: v - warmed[k] for k, v in dynamo_counts().items()},
        }
    return found


def child(args: argparse.Namespace, src: Path) -> dict[str, Any]:
    """One round of ``measure`` in a new process importing vaelab from ``src``."""
    env = {**os.environ, "PYTHONPATH": f"{src.resolve()}{os.pathsep}{Path(__file__).parent}"}
    command = [sys.executable, __file__, "--child", "--rounds", "1", "--steps", str(args.steps)]
    command += ["--threads", str(args.threads), "--seed", str(args.seed)]
    command += ["--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    if args.flush_denormal:
        command.append("--flush-denormal")
    if args.compile:
        command.append("--compile")
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def compare(args: argparse.Namespace) -> dict[str, Any]:
    here = Path(__file__).resolve().parents[1] / "src"
    sources = {"before": args.before, "after": here}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    for i in range(args.rounds):
        for name, src in sources.items():
            found = child(args, src)
            rounds[name].append(found)
            print(
                f"round {i + 1} {name}: A/B = {found['ratio_a_b']:.3f} "
                f"(CPU time {found['ratio_a_b_cpu']:.3f})",
                flush=True,
            )
    summary = {}
    for name, found in rounds.items():
        a = statistics.median(r["median_a"] for r in found)
        b = statistics.median(r["median_b"] for r in found)
        summary[name] = {
            "source": str(sources[name]),
            "median_a": a,
            "median_b": b,
            "ratio_a_b": a / b,
            "ratio_a_b_paired_median": statistics.median(r["ratio_a_b"] for r in found),
            "ratio_a_b_cpu": statistics.median(
                [x for r in found for x in r["cpu_seconds_per_epoch"]["A"]]
            )
            / statistics.median([x for r in found for x in r["cpu_seconds_per_epoch"]["B"]]),
            "rounds": found,
        }
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return {}
    load_start, watch = os.getloadavg(), peers.ProcessWatch()
    results = compare(args) if args.before is not None else {"after": measure(args)}
    watch.snapshot()
    for name, r in results.items():
        print(
            f"{name}: A (vaelab) {r['median_a']:.2f} s/epoch, B (by hand) {r['median_b']:.2f} "
            f"s/epoch, A/B = {r['ratio_a_b']:.3f} (paired median {r['ratio_a_b_paired_median']:.3f}"
            f", CPU time {r['ratio_a_b_cpu']:.3f})"
        )
        for pair, ratio in r.get("compile", {}).get("paired_medians", {}).items():
            print(f"  {pair} = {ratio:.3f} (paired median)")
    report = {
        "benchmark": "top_down",
        "model": {"latent": SIZES, "hidden": HIDDEN, "inference": "top-down"},
        "results": results,
        "threads": args.threads,
        "flush_denormal": args.flush_denormal,
        "compile": args.compile,
        "kl_warmup_epochs": 0,
        "steps_per_unit": args.steps,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        **peers.run_context(load_start, watch, argv),
    }
    peers.save_result(report, "top_down", args.out)
    return report


if __name__ == "__main__":
    main()
