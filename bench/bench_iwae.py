"""Seconds per epoch of IWAE training: vaelab's ``Trainer`` against pythae 0.1.2's ``IWAE``, side by side.

Issue 9 asks that training on the IWAE bound with k = 5 take at most 0.7× pythae's time per epoch,
on the same network and batch size. One network, two implementations:

- **A, vaelab**: ``build_model(ModelConfig)``, the decoder's start at the data
  (``likelihood.initialise``), ``IndexedBatches`` over one in-memory float32 tensor and
  ``Trainer(...).fit`` with ``TrainConfig(objective="iwae", k=k)``: the training path of
  ``vaelab train --objective iwae --k K``, without the run log (no progress bar, metrics file or
  checkpoint; ``bench_trainer.py`` measures those) and without a validation split.
- **B, pythae**: ``pythae.models.IWAE`` (``number_samples=k``, ``reconstruction_loss="bce"``) in the
  peers venv (``bench/peers.py``; pythae never enters vaelab's venv), rebuilt from A's starting
  weights with the encoder and decoder classes of ``pythae_loglik_peer.py``, trained by the
  minimal loop in ``pythae_iwae_peer.py``: a permutation per epoch and tensor slices,
  ``torch.optim.Adam`` as pythae's ``BaseTrainer`` makes it, ``IWAE.forward(...).loss``,
  ``backward``, ``step``. That is pythae's model at its fastest: its ``BaseTrainer`` adds a
  ``DataLoader`` that collates one example at a time, callbacks and logging, all left out, so the
  ratio here is the least favourable one for vaelab.
- **C, the floor**: the same network's matrix products and tanh units, forward and backward, on
  the same batches and k codes per example, with a one-product stand-in for the loss: no
  log-densities, no log-sum-exp, no optimiser. Every exact implementation of the step does at
  least this work, so C / B is the smallest ratio to pythae that any implementation could reach
  on this machine (as the decoder floor of ``bench_loglik.py``).

Before any timing the two must compute the same thing on one batch and shared noise ε
``[k, batch, latent]``: the IWAE-k bound per example (vaelab's ``iwae_bound``; pythae's loss is a
surrogate −Σᵢ w̃ᵢ log wᵢ whose gradient is the bound's, so the bound is rebuilt from the log weights
its ``loss_function`` sees) to float32 precision, and the gradient of every weight matrix, since
the gradient is what training computes. vaelab's ε is checked to be the noise its training path
draws under the same seed.

Then ``--rounds`` rounds of A, B, C (one warm-up unit each first), ``--epochs`` epochs per unit; each
pythae unit is one subprocess, timed inside the job (interpreter start and imports excluded) and
starting from the exported weights; vaelab carries its weights on. Medians of wall-clock seconds
per epoch and their ratio, the per-round ratios, CPU seconds, the load average and the other
processes that used the CPU are printed and written to ``bench/results/iwae-<time>.json``.

With ``--profile``, a cProfile and a torch.profiler operator table of each side's step over
``--profile-steps`` steps are added (what the time is spent on, when the target is missed).

Usage (from the repository root, in vaelab's venv)::

    .venv/bin/python bench/bench_iwae.py                 # MNIST, Burda et al.'s network, k = 5
    .venv/bin/python bench/bench_iwae.py --rounds 5 --k 50 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import peers  # bench/peers.py, beside this script
from bench_loglik import export
from bench_trainer import vaelab_model
from vaelab.data.sources import load_data
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import log_importance_weights
from vaelab.train.batches import IndexedBatches
from vaelab.train.config import TrainConfig
from vaelab.train.trainer import Trainer

PEER_SCRIPT = peers.BENCH_DIR / "pythae_iwae_peer.py"
DEVICE = torch.device("cpu")
# float32 sums over 784 pixels and 50 latents in two orders agree to ~1e-4 nats; a different
# network, noise or weighting is off by nats. Gradients: relative to the largest entry.
BOUND_TOLERANCE = 1e-3
GRADIENT_TOLERANCE = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5, help="importance samples (default 5)")
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden", default="200,200", help="hidden sizes (default 200,200)")
    parser.add_argument("--activation", default="tanh", choices=("tanh", "relu"))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed unit (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="A, B rounds (default 3)")
    parser.add_argument(
        "--examples", type=int, help="training examples per epoch (default: all 54,000)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per side (default 1; 0: torch's)"
    )
    parser.add_argument("--profile", action="store_true", help="profile both sides' steps too")
    parser.add_argument("--profile-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="default: $VAELAB_DATA or ../shared/data")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/...)")
    args = parser.parse_args(argv)
    args.hidden = tuple(int(h) for h in args.hidden.split(","))
    if args.k < 1 or args.epochs < 1 or args.rounds < 1:
        parser.error("--k, --epochs and --rounds must be at least 1")
    return args


def training_data(args: argparse.Namespace) -> torch.Tensor:
    """MNIST's training split as ``vaelab train`` holds it, ``[n, 1, 28, 28]`` float32, with one
    fixed Bernoulli draw (dynamic binarisation redraws it each batch at the same cost for both
    sides; one draw lets both see the same binary data)."""
    splits = load_data("mnist", data_dir=peers.data_dir(args.data_dir))
    x = torch.from_numpy(np.asarray(splits.train, dtype=np.float32))
    if args.examples:
        x = x[: args.examples]
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(args.seed))


# --------------------------------------------------------------------------------- sanity check


def sanity_check(
    model: VAEModel, x: torch.Tensor, spec: dict[str, Any], weights: dict[str, np.ndarray], k: int
) -> dict[str, Any]:
    """The IWAE-k bound per example and the gradient of every weight, both sides, shared ε."""
    n, latent = x.shape[0], model.posterior.latent_dim
    # vaelab's training path (Trainer._loss → VAEModel.iwae → iwae_bound) under seed 1 …
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    terms = model.iwae(x, k=k)
    (-terms.objective.mean()).backward()
    bound = terms.bound.detach()
    # … draws this ε: rebuild the bound from it and check that it is the same noise.
    torch.manual_seed(1)
    eps = torch.randn(k, n, latent)
    with torch.no_grad():
        q = model.posterior(x)
        z = q.base_dist.loc + q.base_dist.scale * eps  # [k, batch, latent]
        log_w = log_importance_weights(x, q, model.prior(), model.likelihood, z)  # [k, batch]
        rebuilt = torch.logsumexp(log_w, 0) - math.log(k)
    noise_diff = float((rebuilt - bound).abs().max())
    ours: dict[str, np.ndarray] = {}
    for prefix, mlp in (("enc", model.posterior.encoder), ("dec", model.likelihood.decoder)):
        for i, layer in enumerate(m for m in mlp.layers if isinstance(m, torch.nn.Linear)):
            ours[f"grad.{prefix}{i}.weight"] = layer.weight.grad.numpy().copy()
            ours[f"grad.{prefix}{i}.bias"] = layer.bias.grad.numpy().copy()
    model.zero_grad(set_to_none=True)

    arrays = {**weights, "x": x.reshape(n, -1).numpy(), "eps": eps.numpy()}
    peer = peers.run(PEER_SCRIPT, arrays=arrays, args={**spec, "job": "sanity", "k": k})
    theirs = np.array(peer.result["bound"])
    bound_diff = float(np.abs(theirs - bound.double().numpy()).max())
    log_w_diff = float(np.abs(peer.arrays["log_w"].T - log_w.numpy()).max())
    gradients = {}
    for name, grad in ours.items():
        scale = float(np.abs(grad).max()) or 1.0
        gradients[name] = float(np.abs(peer.arrays[name] - grad).max()) / scale
    worst = max(gradients.values())
    return {
        "examples": n,
        "k": k,
        "vaelab_bound_mean": float(bound.mean()),
        "pythae_bound_mean": float(theirs.mean()),
        "pythae_loss": peer.result["loss"],
        "max_abs_diff_bound": bound_diff,
        "max_abs_diff_log_weights": log_w_diff,
        "max_abs_diff_noise_rebuilt": noise_diff,
        "max_relative_diff_gradient": worst,
        "relative_diff_gradient": gradients,
        "passed": bool(
            max(bound_diff, noise_diff) < BOUND_TOLERANCE and worst < GRADIENT_TOLERANCE
        ),
    }


# ---------------------------------------------------------------------------------- the sides


class Sides:
    def __init__(self, args: argparse.Namespace, x: torch.Tensor) -> None:
        self.args, self.x = args, x
        self.model = vaelab_model(x, args.latent_dim, args.hidden, args.activation, args.seed)
        self.spec, self.weights = export(self.model)
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, objective="iwae", k=args.k
        )

    def vaelab(self) -> dict[str, float]:
        source = IndexedBatches(self.x, self.args.batch_size, self.generator)
        trainer = Trainer(self.model, TrainConfig(**self.config.__dict__), DEVICE)
        load = os.getloadavg()[0]
        cpu, wall = time.process_time(), time.perf_counter()
        trainer.fit(source)
        return {
            "seconds_per_epoch": (time.perf_counter() - wall) / self.args.epochs,
            "cpu_seconds_per_epoch": (time.process_time() - cpu) / self.args.epochs,
            "load1_before": load,
        }

    def floor(self) -> dict[str, float]:
        """The networks' work alone, forward and backward: the encoder on the batch, the decoder
        on k codes per example, tanh between; the loss is one product with x, so no
        log-density, log-sum-exp or optimiser step is counted. Any implementation of an exact
        IWAE-k step on this network does at least this."""
        encoder = self.model.posterior.encoder.layers
        decoder = self.model.likelihood.decoder.layers
        size, k, latent = self.args.batch_size, self.args.k, self.args.latent_dim
        flat = self.x.reshape(self.x.shape[0], -1)
        n = flat.shape[0]
        load = os.getloadavg()[0]
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(self.args.epochs):
            order = torch.randperm(n, generator=self.generator)
            for lo in range(0, n, size):
                x = flat[order[lo : lo + size]]  # [batch, D]
                mu, log_scale = encoder(x).chunk(2, dim=-1)  # [batch, latent] each
                eps = torch.randn(k, x.shape[0], latent)
                z = mu + log_scale.exp() * eps  # [k, batch, latent]
                logits = decoder(z.reshape(-1, latent))  # [k · batch, D]
                (logits.reshape(k, x.shape[0], -1) * x).sum().backward()
                self.model.zero_grad(set_to_none=True)
        return {
            "seconds_per_epoch": (time.perf_counter() - wall) / self.args.epochs,
            "cpu_seconds_per_epoch": (time.process_time() - cpu) / self.args.epochs,
            "load1_before": load,
        }

    def pythae(self) -> dict[str, Any]:
        job = {
            **self.spec,
            "job": "time",
            "k": self.args.k,
            "batch_size": self.args.batch_size,
            "epochs": self.args.epochs,
            "lr": self.args.lr,
            "seed": self.args.seed,
            "threads": self.args.threads,
        }
        load = os.getloadavg()[0]
        x = self.x.reshape(self.x.shape[0], -1).numpy()
        peer = peers.run(PEER_SCRIPT, arrays={**self.weights, "x": x}, args=job)
        return {**peer.result, "process_seconds": peer.wall_seconds, "load1_before": load}


# ------------------------------------------------------------------------------------- profile


def vaelab_steps(sides: Sides, steps: int) -> Iterator[None]:
    trainer = Trainer(sides.model, TrainConfig(**sides.config.__dict__), DEVICE)
    order = torch.randperm(sides.x.shape[0], generator=torch.Generator().manual_seed(0))
    size = sides.args.batch_size
    for i in range(steps):
        x = sides.x[order[i * size : (i + 1) * size]]
        loss, _ = trainer._loss(x, 1.0)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        yield


def profile_vaelab(sides: Sides, steps: int) -> dict[str, Any]:
    """torch.profiler's operator table for A's step (loss, backward, fused Adam)."""
    for _ in vaelab_steps(sides, 5):  # warm-up
        pass
    with contextlib.redirect_stderr(None), torch.profiler.profile() as profiler:
        start = time.perf_counter()
        for _ in vaelab_steps(sides, steps):
            pass
        seconds = time.perf_counter() - start
    return {"ms_per_step": 1e3 * seconds / steps, "operators": operator_table(profiler, steps)}


def operator_table(profiler: torch.profiler.profile, steps: int) -> list[dict[str, Any]]:
    rows = []
    for event in profiler.key_averages():
        if event.key.startswith("aten::"):
            rows.append(
                {
                    "op": event.key,
                    "self_ms_per_step": event.self_cpu_time_total / 1e3 / steps,
                    "calls_per_step": event.count / steps,
                }
            )
    rows.sort(key=lambda r: r["self_ms_per_step"], reverse=True)
    return rows[:25]


# ------------------------------------------------------------------------------------ reporting


def print_report(report: dict[str, Any]) -> None:
    a, b = report["sides"]["vaelab"], report["sides"]["pythae"]
    print(
        f"\nIWAE k={report['k']}, {report['network']}, batch {report['batch_size']}, "
        f"{report['examples']} examples ({report['steps_per_epoch']} steps) an epoch; "
        f"torch threads per side: {report['threads']}"
    )
    print(f"  vaelab runs, s/epoch: {' '.join(f'{s:.3f}' for s in a['runs'])}")
    print(f"  pythae runs, s/epoch: {' '.join(f'{s:.3f}' for s in b['runs'])}")
    print(
        f"  median s/epoch: vaelab {a['median']:.3f} (CPU {a['median_cpu']:.3f}), pythae "
        f"{b['median']:.3f} (CPU {b['median_cpu']:.3f}); vaelab / pythae = "
        f"{report['ratio']:.3f} (per-round ratios {report['ratio_paired_range'][0]:.3f}–"
        f"{report['ratio_paired_range'][1]:.3f}; target ≤ 0.7)"
    )
    f = report["sides"]["floor"]
    print(
        f"  floor (the networks' products and tanh, forward and backward, nothing else): "
        f"{f['median']:.3f} s/epoch = {report['ratio_floor_pythae']:.3f} of pythae's time, "
        f"the least any implementation of the same step could take"
    )
    start, end = report["load_average_start"], report["load_average_end"]
    print(f"  load average (1 min) {start[0]:.2f} → {end[0]:.2f} on {os.cpu_count()} cores")
    if not report["other_processes"]:
        print("  no other process used 5% of a core or more")
    for p in report["other_processes"]:
        print(f"  also running: {p['percent_of_a_core']}% of a core: {p['command'][:100]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start, watch = os.getloadavg(), peers.ProcessWatch()
    peers.ensure_venv()
    x = training_data(args)
    sides = Sides(args, x)
    sanity = sanity_check(sides.model, x[: args.batch_size], sides.spec, sides.weights, args.k)
    print(
        f"sanity ({sanity['examples']} images, shared ε, k={args.k}): max |Δ IWAE-{args.k}| "
        f"{sanity['max_abs_diff_bound']:.1e} nats (vaelab {sanity['vaelab_bound_mean']:.3f}, "
        f"pythae {sanity['pythae_bound_mean']:.3f}), max |Δ log w| "
        f"{sanity['max_abs_diff_log_weights']:.1e}, gradients max relative "
        f"{sanity['max_relative_diff_gradient']:.1e}; vaelab's ε is its training noise to "
        f"{sanity['max_abs_diff_noise_rebuilt']:.1e}",
        flush=True,
    )
    if not sanity["passed"]:
        raise SystemExit("the two sides compute different things: fix the rebuild before timing")

    sides.vaelab(), sides.pythae(), sides.floor()  # warm-up units
    runs: dict[str, list[dict[str, Any]]] = {"vaelab": [], "pythae": [], "floor": []}
    for round_ in range(args.rounds):
        runs["vaelab"].append(sides.vaelab())
        runs["pythae"].append(sides.pythae())
        runs["floor"].append(sides.floor())
        watch.snapshot()
        line = ", ".join(f"{side} {r[-1]['seconds_per_epoch']:.3f}" for side, r in runs.items())
        print(f"round {round_ + 1}, s/epoch: {line}", flush=True)

    def summary(side: str) -> dict[str, Any]:
        seconds = [r["seconds_per_epoch"] for r in runs[side]]
        return {
            "runs": seconds,
            "median": statistics.median(seconds),
            "median_cpu": statistics.median(r["cpu_seconds_per_epoch"] for r in runs[side]),
            "details": runs[side],
        }

    ours, theirs, floor = summary("vaelab"), summary("pythae"), summary("floor")
    pairs = [a / b for a, b in zip(ours["runs"], theirs["runs"], strict=True)]
    steps = -(-x.shape[0] // args.batch_size)
    report: dict[str, Any] = {
        "benchmark": "iwae",
        "k": args.k,
        "network": f"{x.shape[-1] * x.shape[-2]}-{'-'.join(map(str, args.hidden))}-"
        f"{args.latent_dim} {args.activation}, Bernoulli, diagonal Gaussian q",
        "batch_size": args.batch_size,
        "lr": args.lr,
        "examples": int(x.shape[0]),
        "steps_per_epoch": steps,
        "epochs_per_unit": args.epochs,
        "rounds": args.rounds,
        "sanity": sanity,
        "sides": {"vaelab": ours, "pythae": theirs, "floor": floor},
        "ratio": ours["median"] / theirs["median"],
        "ratio_floor_pythae": floor["median"] / theirs["median"],
        "ratio_cpu": ours["median_cpu"] / theirs["median_cpu"],
        "ratio_paired_median": statistics.median(pairs),
        "ratio_paired_range": [min(pairs), max(pairs)],
        "target": 0.7,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "versions": {
            **peers.versions(),
            "pythae": runs["pythae"][0]["versions"]["pythae"],
            "peers_torch": runs["pythae"][0]["versions"]["torch"],
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "argv": sys.argv[1:] if argv is None else argv,
    }
    if args.profile:
        report["profile"] = {"vaelab": profile_vaelab(sides, args.profile_steps)}
        print(f"  vaelab step: {report['profile']['vaelab']['ms_per_step']:.2f} ms")
        for row in report["profile"]["vaelab"]["operators"][:12]:
            print(
                f"    {row['self_ms_per_step']:7.3f} ms {row['calls_per_step']:5.1f}x {row['op']}"
            )
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_start"] = list(load_start)
    report["load_average_end"] = list(os.getloadavg())
    report["other_processes"] = watch.busy()
    print_report(report)
    peers.save_result(report, "iwae", args.out)
    return report


if __name__ == "__main__":
    main()
