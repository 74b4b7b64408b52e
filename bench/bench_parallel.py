"""Training throughput on this machine's cores: ``vaelab train --nproc N`` (N workers of one thread
each) against one process with N threads and one process with one thread, side by side.

Each side is the real command, run as a subprocess on the same data and settings::

    vaelab train mnist --binarize dynamic --epochs E --seed 0 --quiet --out TMP  SIDE

with SIDE one of ``--nproc N`` (data-parallel, ``DistributedDataParallel`` over gloo, each
worker a share of every batch), ``--threads N`` and ``--threads 1``. The sides run interleaved,
``--rounds`` times (A B C A B C …), after one warm-up run of each (page cache, compiled Python).

Measured per run: the trainer's own clock (the sum of the epochs' ``seconds`` in
``metrics.jsonl``: the batch loop only, without start-up, validation or saving), from which
examples per second; the process's wall time (start-up, the workers' launch and rendezvous,
validation and saving included); and the CPU seconds of the process and its children. Medians
over rounds, and each side's throughput relative to one thread in the same round.

The machine is shared: the load average before each run and the other processes that used CPU
during the benchmark are recorded with the results in ``bench/results/parallel-<time>.json``.

Usage (from the repository root, in vaelab's venv)::

    .venv/bin/python bench/bench_parallel.py                          # MNIST, batch 100, 2 cores
    .venv/bin/python bench/bench_parallel.py --batch-size 1000 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peers  # bench/peers.py, beside this script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist", help="DATA of vaelab train (default: mnist)")
    parser.add_argument("--data-dir", type=Path, help="default: $VAELAB_DATA or ../shared/data")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N (cores)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--batch-size", type=int, default=100, help="the global batch")
    parser.add_argument(
        "--model",
        nargs=argparse.REMAINDER,
        default=[],
        help="further `vaelab train` options (default: the default model, 784-256-8 Bernoulli)",
    )
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.workers < 2 or args.epochs < 1 or args.rounds < 1:
        parser.error("--workers must be at least 2, --epochs and --rounds at least 1")
    return args


def sides(workers: int) -> dict[str, list[str]]:
    return {
        f"--nproc {workers}": ["--nproc", str(workers)],
        f"--threads {workers}": ["--threads", str(workers)],
        "--threads 1": ["--threads", "1"],
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_once(args: argparse.Namespace, data_dir: Path, side: list[str]) -> dict[str, Any]:
    """One `vaelab train` run in a fresh folder: its clocks and throughput."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as folder:
        out = Path(folder) / "run"
        command = [
            sys.executable,
            "-m",
            "vaelab",
            "train",
            args.data,
            "--data-dir",
            str(data_dir),
            "--binarize",
            "dynamic",
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            "0",
            "--quiet",
            "--out",
            str(out),
            *args.model,
            *side,
        ]
        load = os.getloadavg()[0]
        cpu, wall = children_cpu(), time.perf_counter()
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - wall, children_cpu() - cpu
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(e["seconds"] for e in epochs)
    examples = sum(e["examples_per_second"] * e["seconds"] for e in epochs)
    return {
        "trainer_seconds_per_epoch": seconds / len(epochs),
        "examples_per_second": examples / seconds,
        "process_wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "load1_before": load,
        "final_train_elbo": epochs[-1]["elbo"],
        "final_valid_elbo": epochs[-1]["valid_elbo"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data_dir = peers.data_dir(args.data_dir)
    chosen = sides(args.workers)
    load_start, watch = os.getloadavg(), peers.ProcessWatch()
    started = time.perf_counter()
    print(
        f"{args.data}, batch {args.batch_size}, {args.epochs} epoch(s) a run, {args.rounds} "
        f"rounds; load average {load_start[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    for name, side in chosen.items():  # warm-up: page cache, bytecode, the launcher's imports
        train_once(args, data_dir, side)
        print(f"  warmed up {name}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for round_ in range(args.rounds):
        for name, side in chosen.items():
            runs[name].append(train_once(args, data_dir, side))
        line = "  ".join(f"{n}: {r[-1]['examples_per_second']:,.0f} ex/s" for n, r in runs.items())
        print(f"  round {round_ + 1}: {line}", flush=True)
    watch.snapshot()

    baseline = runs["--threads 1"]
    summary = {}
    for name, found in runs.items():
        speed_ups = [
            r["examples_per_second"] / b["examples_per_second"]
            for r, b in zip(found, baseline, strict=True)
        ]
        summary[name] = {
            "runs": found,
            "median_examples_per_second": statistics.median(
                r["examples_per_second"] for r in found
            ),
            "median_trainer_seconds_per_epoch": statistics.median(
                r["trainer_seconds_per_epoch"] for r in found
            ),
            "median_process_wall_seconds": statistics.median(
                r["process_wall_seconds"] for r in found
            ),
            "median_process_cpu_seconds": statistics.median(
                r["process_cpu_seconds"] for r in found
            ),
            "speed_up_over_one_thread_paired_median": statistics.median(speed_ups),
            "speed_up_range": [min(speed_ups), max(speed_ups)],
        }
    report = {
        "benchmark": "parallel",
        "data": args.data,
        "batch_size": args.batch_size,
        "epochs_per_run": args.epochs,
        "rounds": args.rounds,
        "workers": args.workers,
        "model_options": args.model,
        "sides": summary,
        "total_seconds": time.perf_counter() - started,
        **peers.run_context(load_start, watch, argv),
    }
    print_table(report)
    peers.save_result(report, "parallel", args.out)
    return report


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{'side':<12}{'examples/s':>12}{'s/epoch':>10}{'× 1 thread':>12}{'range':>14}"
        f"{'process s':>11}{'CPU s':>8}"
    )
    for name, s in report["sides"].items():
        low, high = s["speed_up_range"]
        print(
            f"{name:<12}{s['median_examples_per_second']:>12,.0f}"
            f"{s['median_trainer_seconds_per_epoch']:>10.3f}"
            f"{s['speed_up_over_one_thread_paired_median']:>12.3f}"
            f"{f'{low:.2f}-{high:.2f}':>14}"
            f"{s['median_process_wall_seconds']:>11.1f}{s['median_process_cpu_seconds']:>8.1f}"
        )
    start, end = report["load_average_start"], report["load_average_end"]
    print(
        f"load average (1 min) {start[0]:.2f} → {end[0]:.2f} on {os.cpu_count()} cores; "
        f"{report['total_seconds']:.0f} s in all"
    )
    for p in report["other_processes"]:
        print(f"  also running: {p['percent_of_a_core']}% of a core: {p['command'][:100]}")


if __name__ == "__main__":
    main()
