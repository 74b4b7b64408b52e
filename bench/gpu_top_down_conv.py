"""The prepared GPU check of issue 16 (item 5): vaelab's convolutional top-down model trained on
MNIST for a wall-clock budget, then evaluated; it reports nats and images per second.

Everything goes through the public doors, in child processes of this script's Python:

1. ``vaelab train mnist --binarize dynamic --network conv --inference top-down --latent-dim
   32,16,8,4 --hidden 256 --batch-size 256 --device cuda``: first a one-epoch probe, whose
   measured epoch sets the number of epochs of the real run so that probe and run together fit
   ``--budget-minutes`` (the run's wall clock ≈ O + E · s · 1.15, with s the probe's epoch
   seconds and O its wall clock beyond them: start-up, data, validation, saving; the 15% is the
   per-epoch validation and checkpoint). ``--epochs E`` skips the probe.
2. ``vaelab evaluate RUN --k K --examples N --json``: the test ELBO and IWAE-k on a seeded random
   N test images, the KL and the active units of every layer.

Reported (a table on stdout, ``gpu_top_down_conv.json`` in ``--out``): the device, the training
seconds (the sum of the epoch times in the run's ``metrics.jsonl``; validation excluded) and the
run's wall clock, images per second of training (examples per epoch × epochs / training
seconds), test ELBO and IWAE-k in nats per image with standard errors, KL per layer (nats) and
active units per layer (A_u > 0.01). ``--out`` also gets the run's ``metrics.jsonl``, the
evaluation's JSON and the training log; the run folders (weights, checkpoints) go under
``--runs``, so that a device machine's ``$OUT`` brings back only the small files.

Options this script does not know are passed on to both ``vaelab train`` runs (e.g.
``--layer-free-bits 0.5`` or ``--compile``).

Usage (from the repository root; the script puts this checkout's ``src`` first on the path)::

    python3 bench/gpu_top_down_conv.py --data-dir DIR        # a CUDA machine, about 9 minutes
    nice -n 10 python bench/gpu_top_down_conv.py --device cpu --epochs 1 --k 10 \\
        --examples 200 --threads 1 --out /tmp/smoke        # the CPU smoke run, about 2 minutes

It stops in one line with exit status 2 when torch or vaelab cannot be imported, when CUDA is
absent (unless ``--device cpu``) and when MNIST is not in the data folder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

REPO_DIR = Path(__file__).resolve().parents[1]
SOURCE_DIR = REPO_DIR / "src"
DEFAULT_OUT = REPO_DIR / "bench" / "results" / "gpu-top-down-conv"
RESULT_FILE = "gpu_top_down_conv.json"
PER_EPOCH_MARGIN = 0.15  # validation and the epoch-end checkpoint beside an epoch's training time
NAME = "gpu_top_down_conv"
INSTALL = "pip install torch==2.13.0, then pip install -e . in the repository"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=8.0,
        help="wall clock for training, the probe included (default 8; evaluation comes after)",
    )
    parser.add_argument("--epochs", type=int, help="train this many epochs, without a probe")
    parser.add_argument("--examples", type=int, default=2000, help="test images (default 2000)")
    parser.add_argument("--k", type=int, default=1000, help="IWAE samples (default 1000)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--latent-dim", default="32,16,8,4", help="layer sizes, z1 first")
    parser.add_argument("--hidden", default="256", help="hidden sizes of the MLP parts")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder holding mnist/ (default: $VAELAB_DATA, else ../shared/data beside the "
        "repository, else shared/data inside it)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results (default: $OUT when set, else {DEFAULT_OUT.relative_to(REPO_DIR)})",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        help=f"run folders, one subfolder per call (default: {DEFAULT_OUT.relative_to(REPO_DIR)}/runs)",
    )
    return parser.parse_known_args(argv)


def refuse(message: str) -> NoReturn:
    """One line on stderr and exit status 2: something to fix before anything can run."""
    print(f"{NAME}: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------- what must be there


def require_imports() -> Any:
    """torch, then this checkout's vaelab with what its training imports (numpy, safetensors,
    TensorBoard, ...), else one line naming the first that is missing."""
    if str(SOURCE_DIR) not in sys.path:
        sys.path.insert(0, str(SOURCE_DIR))
    for module in ("torch", "vaelab.runs.folder", "tensorboard"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            refuse(f"cannot import {error.name} ({error}); install with: {INSTALL}")
    return importlib.import_module("torch")


def check_device(torch: Any, device: str) -> dict[str, Any]:
    """The device's description; CUDA asked for and absent is refused."""
    if device == "cuda":
        if not torch.cuda.is_available():
            refuse(
                f"CUDA is not available (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'}); run this on a GPU machine, or pass "
                "--device cpu for a smoke run"
            )
        return {
            "device": "cuda",
            "name": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    if device != "cpu":
        refuse(f"--device must be cuda or cpu, got {device!r}")
    return {
        "device": "cpu",
        "name": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
    }


def data_folder(given: Path | None) -> Path:
    """``given``, else ``$VAELAB_DATA``, else the first of ../shared/data and shared/data holding
    mnist/ (the first when neither does, for the message)."""
    if given is not None:
        return given
    if os.environ.get("VAELAB_DATA"):
        return Path(os.environ["VAELAB_DATA"])
    candidates = [REPO_DIR.parent / "shared" / "data", REPO_DIR / "shared" / "data"]
    return next((c for c in candidates if (c / "mnist").is_dir()), candidates[0])


def check_data(data_dir: Path) -> None:
    """MNIST readable under ``data_dir``, by vaelab's own loader, else one line."""
    from vaelab.data.sources import DataError, load_data

    try:
        load_data("mnist", data_dir=data_dir)
    except DataError as error:
        refuse(f"no MNIST under {data_dir}: {error}")


# ------------------------------------------------------------------------------ the children


def child_env(threads: int | None) -> dict[str, str]:
    """This environment with this checkout's ``src`` first on the path (and one thread count)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_DIR), env.get("PYTHONPATH")]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def vaelab(args: list[str], env: dict[str, str], log: Any) -> tuple[str, float]:
    """``python -m vaelab ARGS``: its stdout, each line echoed and written to ``log`` as it
    comes (stderr too), and its wall-clock seconds. A failure ends this script (exit 1)."""
    command = [sys.executable, "-m", "vaelab", *args]
    log.write(f"$ {' '.join(command)}\n")
    started = time.perf_counter()
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            log.write(line)
            log.flush()
            if not line.startswith("{"):  # the evaluation's JSON goes to the file only
                print(f"  {line}", end="", flush=True)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        print(f"{NAME}: vaelab {args[0]} failed (exit {process.returncode})", file=sys.stderr)
        raise SystemExit(1)
    return "".join(lines), seconds


def train_options(args: argparse.Namespace, data_dir: Path, extra: list[str]) -> list[str]:
    options = ["mnist", "--data-dir", str(data_dir), "--binarize", "dynamic"]
    options += ["--network", "conv", "--inference", "top-down", "--latent-dim", args.latent_dim]
    options += ["--hidden", args.hidden, "--batch-size", str(args.batch_size)]
    options += ["--seed", str(args.seed), "--device", args.device, "--quiet"]
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    return options + extra


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def epochs_for_budget(budget: float, spent: float, probe_wall: float, epoch: float) -> int:
    """Epochs E whose run fits what is left of the budget: O + E · s · (1 + margin) ≤ budget −
    spent, with s = ``epoch`` (the probe's epoch seconds) and O = ``probe_wall`` − s; at least 1."""
    fixed = probe_wall - epoch
    return max(1, math.floor((budget - spent - fixed) / (epoch * (1 + PER_EPOCH_MARGIN))))


def training_summary(metrics: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Training seconds (the sum of epoch times), images per second and the last epoch's ELBOs."""
    seconds = sum(m["seconds"] for m in metrics)
    per_epoch = round(metrics[0]["examples_per_second"] * metrics[0]["seconds"])
    return {
        "epochs": len(metrics),
        "examples_per_epoch": per_epoch,
        "training_seconds": seconds,
        "wall_seconds": wall,
        "images_per_second": per_epoch * len(metrics) / seconds,
        "last_train_elbo": metrics[-1]["elbo"],
        "last_valid_elbo": metrics[-1]["valid_elbo"],
        "best_valid_elbo": max(m["valid_elbo"] for m in metrics if m["valid_elbo"] is not None),
        "train_kl_per_layer_last_epoch": metrics[-1]["kl_per_layer"],
    }


def evaluation_summary(found: dict[str, Any]) -> dict[str, Any]:
    diagnostics = found["diagnostics"]
    return {
        "examples": found["count"],
        "elbo": found["elbo"],
        "elbo_standard_error": found["elbo_standard_error"],
        "k": found["iwae"]["k"],
        "iwae": found["iwae"]["mean"],
        "iwae_standard_error": found["iwae"]["standard_error"],
        "latent_sizes": diagnostics["latent_sizes"],
        "kl_per_layer": diagnostics["kl_per_layer"],
        "active_units_per_layer": diagnostics["active_units_per_layer"],
        "collapsed_layers": diagnostics["collapsed_layers"],
    }


# ---------------------------------------------------------------------------------- the report


def table(report: dict[str, Any]) -> str:
    device, train = report["device"], report["training"]
    rows = [
        ("device", f"{device['name']} ({device['device']}, torch {device['torch']})"),
        ("model", f"conv top-down, latent {report['latent_dim']}, hidden {report['hidden']}"),
        ("epochs", f"{train['epochs']} of batch {report['batch_size']}"),
        ("training", f"{train['training_seconds']:.1f} s (wall {train['wall_seconds']:.1f} s)"),
        ("images / s", f"{train['images_per_second']:,.0f}"),
    ]
    test = report.get("test")
    if test is not None:
        n, k = test["examples"], test["k"]
        rows += [
            (f"test ELBO ({n})", f"{test['elbo']:.2f} ± {test['elbo_standard_error']:.2f} nats"),
            (f"test IWAE-{k}", f"{test['iwae']:.2f} ± {test['iwae_standard_error']:.2f} nats"),
            ("KL per layer", ", ".join(f"{kl:.2f}" for kl in test["kl_per_layer"])),
            (
                "active units",
                ", ".join(
                    f"{a}/{d}"
                    for a, d in zip(
                        test["active_units_per_layer"], test["latent_sizes"], strict=True
                    )
                ),
            ),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def save(report: dict[str, Any], out: Path) -> None:
    """The report so far, replaced whole: a run cut short keeps its training figures."""
    path = out / RESULT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, extra = parse_args(argv)
    torch = require_imports()
    device = check_device(torch, args.device)
    data_dir = data_folder(args.data_dir)
    check_data(data_dir)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    runs = (args.runs or DEFAULT_OUT / "runs") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    env, options = child_env(args.threads), train_options(args, data_dir, extra)
    budget = args.budget_minutes * 60
    report: dict[str, Any] = {
        "benchmark": NAME,
        "device": device,
        "latent_dim": args.latent_dim,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "budget_minutes": args.budget_minutes,
        "threads": args.threads,
        "extra_train_options": extra,
        "argv": sys.argv[1:] if argv is None else argv,
        "python": platform.python_version(),
    }
    print(f"{NAME}: {device['name']} ({device['device']}); run folders in {runs}", flush=True)
    started = time.perf_counter()
    with (out / "train.log").open("w") as log:
        epochs = args.epochs
        if epochs is None:
            probe = runs / "probe"
            print("probe: one epoch", flush=True)
            _, probe_wall = vaelab(
                ["train", *options, "--epochs", "1", "--out", str(probe)], env, log
            )
            epoch = read_metrics(probe)[0]["seconds"]
            spent = time.perf_counter() - started
            epochs = epochs_for_budget(budget, spent, probe_wall, epoch)
            report["probe"] = {"epoch_seconds": epoch, "wall_seconds": probe_wall}
            left = budget - spent
            fit = f"{epochs} epochs fit the {left:.0f} s left" if left > 0 else "budget spent"
            print(
                f"probe: {epoch:.1f} s of training in {probe_wall:.1f} s of wall clock; {fit}",
                flush=True,
            )
        run = runs / "run"
        print(f"training: {epochs} epoch{'s' if epochs > 1 else ''}", flush=True)
        _, wall = vaelab(["train", *options, "--epochs", str(epochs), "--out", str(run)], env, log)
        metrics = read_metrics(run)
        (out / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
        report["training"] = training_summary(metrics, wall)
        report["budget_used_seconds"] = time.perf_counter() - started
        report["run"] = str(run)
        save(report, out)
        print(f"evaluation: IWAE-{args.k} on {args.examples} test images", flush=True)
        evaluate = ["evaluate", str(run), "--k", str(args.k), "--examples", str(args.examples)]
        evaluate += ["--json", "--quiet", "--device", args.device, "--data-dir", str(data_dir)]
        if args.threads is not None:
            evaluate += ["--threads", str(args.threads)]
        stdout, evaluation_wall = vaelab(evaluate, env, log)
    found = json.loads(re.findall(r"^\{.*\}$", stdout, flags=re.MULTILINE)[-1])
    (out / "evaluate.json").write_text(json.dumps(found, indent=2) + "\n")
    report["test"] = evaluation_summary(found)
    report["evaluation_seconds"] = evaluation_wall
    report["total_seconds"] = time.perf_counter() - started
    save(report, out)
    print(table(report))
    print(f"wrote {out / RESULT_FILE} ({report['total_seconds']:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
