"""What training that survives costs per step: the gradient-norm check (``skip_grad_norm``), the
rollback snapshot taken at every epoch end (``max_rollbacks``), and, for a model with several
stochastic layers, the KL per layer each step reports (one more encoder pass, without gradient)
or clamps (``layer_free_bits``, with gradient).

Each configuration trains the same model on scikit-learn's digits (1,437 rows, batches of 100)
for ``--epochs`` epochs, one thread, best of ``--repeats``; times are per optimiser step and
printed as ratios to the baseline (``max_rollbacks=0``, no skipping) measured in the same run.
The "no per-layer KL" row patches the report of the KL per layer out, to show its share.

Usage (from the repository root)::

    .venv/bin/python bench/bench_survival.py            # about a minute on one core
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any
from unittest import mock

import torch
from sklearn.datasets import load_digits

from vaelab.model.registry import ModelConfig, build_model
from vaelab.train.batches import IndexedBatches
from vaelab.train.config import TrainConfig
from vaelab.train.loss import StepObjective
from vaelab.train.trainer import Trainer

CPU = torch.device("cpu")


def seconds_per_step(latent: int | tuple[int, ...], epochs: int, **options: Any) -> float:
    x = torch.from_numpy((load_digits().data[:1437] / 16.0).astype("float32"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(data_shape=(64,), latent_dim=latent, hidden=(128,)))
    trainer = Trainer(model, TrainConfig(epochs=epochs, batch_size=100, **options), CPU, seed=0)
    started = time.perf_counter()
    trainer.fit(IndexedBatches(x, 100, 0, binarize=True))
    return (time.perf_counter() - started) / trainer.step


def _without_layer_kl(self: StepObjective, model: Any, x: Any, terms: Any, noise: Any) -> Any:
    return terms.kl.unsqueeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for latent in (8, (16, 8)):
        rows: dict[str, dict[str, Any]] = {
            "baseline (max_rollbacks=0)": dict(max_rollbacks=0),
            "snapshots (max_rollbacks=3)": dict(max_rollbacks=3),
            "gradient-norm check (skip_grad_norm=1e9)": dict(max_rollbacks=0, skip_grad_norm=1e9),
            "both": dict(max_rollbacks=3, skip_grad_norm=1e9),
        }
        if isinstance(latent, tuple):
            rows["layer_free_bits=0.1"] = dict(max_rollbacks=0, layer_free_bits=0.1)
            rows["no per-layer KL (patched out)"] = dict(max_rollbacks=0, patched=True)
        best = dict.fromkeys(rows, math.inf)
        for _ in range(args.repeats):  # interleaved, so that a busy machine slows all alike
            for name, options in rows.items():
                options = dict(options)
                if options.pop("patched", False):
                    with mock.patch.object(StepObjective, "_kl_per_layer", _without_layer_kl):
                        took = seconds_per_step(latent, args.epochs, **options)
                else:
                    took = seconds_per_step(latent, args.epochs, **options)
                best[name] = min(best[name], took)
        base = best["baseline (max_rollbacks=0)"]
        print(f"latent {latent}: baseline {base * 1e3:.3f} ms/step (best of {args.repeats})")
        for name, took in best.items():
            print(f"  {name:45s} x{took / base:.3f}")


if __name__ == "__main__":
    main()
