"""VAE, IWAE, DReG and IAF on MNIST with one budget: the table in docs/results.md.

    python examples/mnist_objectives.py --runs runs/objectives --data-dir ../shared/data

Trains Burda et al.'s one-stochastic-layer model (784-200-200-50, tanh, dynamic binarisation)
once per row with the same number of epochs, batch size and learning-rate schedule, then
estimates each model's test log-likelihood with IWAE-5000 on all 10,000 test images, all through
the ``vaelab`` command line (``vaelab train``, ``vaelab evaluate --k 5000 --json``), ``--jobs``
commands at a time with one torch thread each. A row whose folder already holds a finished model
is not trained again, and one with an evaluation file is not evaluated again, so an interrupted
run picks up where it stopped (``vaelab train --resume`` is left to the user). The table goes to
the terminal and ``RUNS/table.json``.

Every row is evaluated on the same 10,000 test images, so two rows are best compared image by
image: ``--paired N`` estimates IWAE-5000 again on a seeded random N of them with the Python API
(the same per-image numbers as ``vaelab evaluate``, whose draws are keyed by each image and the
evaluation seed) and gives each row's mean difference to the VAE row with the standard error of
the per-image differences, far smaller than the standard errors of the two means.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.estimator.facade import EVAL_SEED
from vaelab.evaluation.loglik import log_likelihood
from vaelab.runs.model_data import load_examples, model_data, open_model

ARCHITECTURE = ["--latent-dim", "50", "--hidden", "200,200", "--activation", "tanh"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "vae": ("VAE (ELBO)", []),
    "iwae5": ("IWAE, k = 5", ["--objective", "iwae", "--k", "5"]),
    "iwae50": ("IWAE, k = 50", ["--objective", "iwae", "--k", "50"]),
    "dreg5": ("IWAE, k = 5, DReG", ["--objective", "iwae", "--k", "5", "--gradient", "dreg"]),
    "iaf4": ("VAE, IAF posterior (4 steps)", ["--posterior", "iaf", "--flow-steps", "4"]),
}


def vaelab(*arguments: str, out: Path | None = None) -> float:
    """Run ``python -m vaelab ARGUMENTS``, its standard output into ``out`` (written whole or not
    at all, so that a half-written file never passes for a finished one); its wall-clock
    seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "vaelab", *arguments]
    if out is None:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    else:
        printed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        partial = out.with_suffix(".partial")
        partial.write_text(printed)
        partial.replace(out)
    return time.perf_counter() - started


def row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.runs / name
    evaluation = args.runs / f"{name}.eval.json"
    found: dict[str, Any] = {"row": ROWS[name][0], "folder": str(folder)}
    if not (folder / "vaelab.json").is_file():
        found["train_seconds"] = vaelab(
            "train", "mnist", "--data-dir", str(args.data_dir), "--binarize", "dynamic",
            *ARCHITECTURE, *ROWS[name][1], "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--threads", "1", "--quiet", "--out", str(folder),
        )  # fmt: skip
    if not evaluation.is_file():
        found["evaluate_seconds"] = vaelab(
            "evaluate", str(folder), "--k", "5000", "--threads", "1", "--json", "--quiet",
            out=evaluation,
        )  # fmt: skip
    found["evaluation"] = json.loads(evaluation.read_text())
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    found["epoch_seconds"] = sum(epoch["seconds"] for epoch in history)
    return found


def paired(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Per-image IWAE-5000 of every row on the same random ``args.paired`` test images; each
    row's mean difference to the first row, with the standard error of the differences."""
    torch.set_num_threads(1)
    per_image = {}
    for name in names:
        opened = open_model(args.runs / name)
        examples = model_data(opened, data_dir=str(args.data_dir))
        x = load_examples(examples.subset(args.paired))
        estimate = log_likelihood(opened.estimator.model_, x, 5000, seed=EVAL_SEED)
        per_image[name] = estimate.log_px.double().numpy()
    base = per_image[names[0]]
    found = {}
    for name in names:
        difference = per_image[name] - base
        found[name] = {
            "examples": int(difference.size),
            "mean_log_px": float(per_image[name].mean()),
            "difference_to_first": float(difference.mean()),
            "standard_error": float(difference.std(ddof=1) / np.sqrt(difference.size)),
        }
        print(
            f"{ROWS[name][0]}: {found[name]['mean_log_px']:.2f} on {difference.size} images, "
            f"{found[name]['difference_to_first']:+.3f} ± {found[name]['standard_error']:.3f} "
            f"against {ROWS[names[0]][0]}"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder for the run folders")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding mnist/")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="commands at a time (default 2)")
    parser.add_argument(
        "--paired", type=int, metavar="N", help="also compare the rows on the same N test images"
    )
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    # The slowest row first, so that the others fill the remaining slots around it.
    order = sorted(args.rows, key=lambda name: name != "iwae50")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(order, pool.map(lambda name: row(name, args), order), strict=True))
    print("| row | IWAE-5000 (10,000 test images) | ELBO | training, s |")
    print("| --- | --- | --- | --- |")
    for name in args.rows:
        r = results[name]
        evaluation = r["evaluation"]
        iwae = evaluation["iwae"]
        print(
            f"| {r['row']} | {iwae['mean']:.2f} ± {iwae['standard_error']:.2f} | "
            f"{evaluation['elbo']:.2f} | {r['epoch_seconds']:.0f} |"
        )
    if args.paired:
        results["paired"] = paired(args, args.rows)
    (args.runs / "table.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
