"""Data larger than memory: one epoch of ``vaelab train FILE.npy --nproc N`` on files of random
uint8 rows, small and large, with each worker's peak resident memory.

For each size in ``--rows`` the script writes ``FILE.npy`` (random bytes, ``[rows, 784]`` uint8,
a chunk at a time), then runs::

    vaelab train FILE.npy --out TMP --epochs 1 --batch-size 1000 --valid-fraction 0.01 \\
        --test-fraction 0.01 --seed 0 --quiet --nproc N

(the default model: latent 8, hidden 256, Bernoulli; pixels ÷ 255), and deletes the file unless
``--keep``. While it runs, every process below it is looked at every 0.2 s: its peak resident
set so far (``VmHWM`` in ``/proc/PID/status``), which the kernel keeps, so the last look before a
worker exits has its peak. The workers are the processes running ``-m vaelab`` under the
launcher. Recorded: each worker's peak, the epoch's time on the trainer's clock (from
``metrics.jsonl``) and the process's wall time, the load average, the free memory and the page
cache before each run (a file that fits in the page cache is read from memory after it is
written), and the other processes that used CPU.

Sizes run in the order given, then the first again (``100000 10000000`` runs 100,000,
10,000,000, 100,000 rows), so a change of the machine's load shows as a change between the two
small runs. Disk space is checked first: a file needs rows · 784 bytes.

Usage (from the repository root, in vaelab's venv)::

    .venv/bin/python bench/bench_outofcore.py                                  # 1e5, 1e7, 1e5 rows
    .venv/bin/python bench/bench_outofcore.py --rows 100000 2000000 --scratch /data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import peers  # bench/peers.py, beside this script

ROW = 784  # bytes per example: a 28 × 28 uint8 image, flattened
CHUNK_ROWS = 250_000  # rows written at a time (196 MB)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 10_000_000])
    parser.add_argument("--nproc", type=int, default=2, help="workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument(
        "--scratch", type=Path, default=Path(tempfile.gettempdir()), help="where files go"
    )
    parser.add_argument("--keep", action="store_true", help="keep the .npy files")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/...)")
    args = parser.parse_args(argv)
    if any(r < 10 * args.batch_size for r in args.rows) or args.nproc < 1:
        parser.error("every --rows must be at least 10 batches; --nproc at least 1")
    return args


def write_rows(path: Path, rows: int, seed: int = 0) -> float:
    """``rows`` random uint8 rows of ``ROW`` bytes as one .npy file; seconds taken."""
    started = time.perf_counter()
    generator = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, ROW))
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(rows, lo + CHUNK_ROWS)
        array[lo:hi] = generator.integers(0, 256, size=(hi - lo, ROW), dtype=np.uint8)
    array.flush()
    del array
    return time.perf_counter() - started


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes: total, available, page cache."""
    found = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name in ("MemTotal", "MemAvailable", "Cached"):
            found[name] = int(value.split()[0]) * 1024
    return found


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every process below ``root``: pid → (peak resident bytes so far, command line)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    below, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - below
        below |= frontier
    found = {}
    for pid in below:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        peak = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
        if peak is not None:
            found[pid] = (int(peak.split()[1]) * 1024, command.strip())
    return found


def train_once(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-outofcore-") as folder:
        out = Path(folder) / "run"
        command = [
            sys.executable,
            "-m",
            "vaelab",
            "train",
            str(path),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            str(args.batch_size),
            "--valid-fraction",
            "0.01",
            "--test-fraction",
            "0.01",
            "--seed",
            "0",
            "--quiet",
            "--nproc",
            str(args.nproc),
        ]
        before = {"load1": os.getloadavg()[0], **meminfo()}
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        peaks: dict[int, tuple[int, str]] = {}
        while process.poll() is None:
            peaks.update(descendants(process.pid))
            time.sleep(0.2)
        wall = time.perf_counter() - started
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()[-2000:]}")
        (epoch,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    workers = sorted(peak for peak, command in peaks.values() if "-m vaelab" in command)
    return {
        "command": command[1:],
        "epoch_seconds": epoch["seconds"],
        "examples_per_second": epoch["examples_per_second"],
        "process_wall_seconds": wall,
        "worker_peak_resident_bytes": workers,
        "processes_seen": len(peaks),
        "before": before,
        "load1_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    needed = max(args.rows) * ROW
    free = shutil.disk_usage(args.scratch).free
    if free < 1.1 * needed:
        raise SystemExit(
            f"{args.scratch} has {free / 1e9:.1f} GB free; the largest file needs "
            f"{needed / 1e9:.1f} GB: pass --scratch elsewhere or fewer --rows"
        )
    load_start, watch = os.getloadavg(), peers.ProcessWatch()
    started = time.perf_counter()
    runs = []
    for rows in [*args.rows, args.rows[0]]:
        path = args.scratch / f"bench-outofcore-{rows}.npy"
        try:
            written = write_rows(path, rows)
            print(f"{rows:,} rows: wrote {path.stat().st_size / 1e9:.2f} GB in {written:.0f} s")
            found = train_once(path, args)
        finally:
            if not args.keep:
                path.unlink(missing_ok=True)
        found |= {"rows": rows, "file_bytes": rows * ROW + 128, "write_seconds": written}
        runs.append(found)
        peaks = ", ".join(f"{b / 1e9:.3f}" for b in found["worker_peak_resident_bytes"])
        print(
            f"  epoch {found['epoch_seconds']:.1f} s ({found['examples_per_second']:,.0f} ex/s), "
            f"process {found['process_wall_seconds']:.0f} s, peak resident set per worker "
            f"{peaks} GB; load {found['before']['load1']:.2f} → {found['load1_after']:.2f}",
            flush=True,
        )
    watch.snapshot()
    report = {
        "benchmark": "outofcore",
        "nproc": args.nproc,
        "batch_size": args.batch_size,
        "runs": runs,
        "total_seconds": time.perf_counter() - started,
        **peers.run_context(load_start, watch, argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), **meminfo()},
    }
    for p in report["other_processes"]:
        print(f"  also running: {p['percent_of_a_core']}% of a core: {p['command'][:100]}")
    peers.save_result(report, "outofcore", args.out)
    return report


if __name__ == "__main__":
    main()
