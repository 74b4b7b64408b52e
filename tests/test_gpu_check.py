"""The prepared GPU check, ``bench/gpu_top_down_conv.py``: its refusals (a package, CUDA
or MNIST absent) in one line with exit status 2, the number of epochs it picks for a budget, and (slow) a
whole CPU run of it for one epoch: its JSON's figures against the run's own
``metrics.jsonl`` and MNIST's split sizes, finite, with ELBO ≤ IWAE."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import SHARED_DATA, subprocess_env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_top_down_conv.py"
MNIST_TRAIN = 60_000 - 6_000  # MNIST's training file less the default 10% held out for validation


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_top_down_conv", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refusal(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """The script's stderr for ARGS, which must end it with exit status 2 in one line."""
    with pytest.raises(SystemExit) as stopped:
        load_script().main([str(a) for a in args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu_top_down_conv: "), err
    return err


def test_a_missing_package_is_named_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    err = refusal(capsys, "--device", "cpu")
    assert "cannot import tensorboard" in err and "pip install torch==2.13.0" in err
    assert "pip install -e ." in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the script would train")
def test_cuda_absent_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = refusal(capsys, "--device", "cuda")
    assert "CUDA is not available" in err and "--device cpu" in err


def test_mnist_absent_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = refusal(capsys, "--device", "cpu", "--data-dir", tmp_path, "--out", tmp_path / "out")
    assert f"no MNIST under {tmp_path}" in err and "--data-dir" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("budget", "spent", "probe_wall", "epoch"),
    [(480.0, 30.0, 30.0, 10.0), (480.0, 25.0, 40.0, 2.0), (600.0, 0.0, 5.0, 0.37)],
)
def test_epochs_fill_the_budget_without_passing_it(
    budget: float, spent: float, probe_wall: float, epoch: float
) -> None:
    """E epochs: start-up O = probe wall − epoch, then E · epoch · 1.15 fit what is left; E + 1
    would not."""
    epochs = load_script().epochs_for_budget(budget, spent, probe_wall, epoch)
    left = budget - spent - (probe_wall - epoch)
    assert epochs * epoch * 1.15 <= left < (epochs + 1) * epoch * 1.15


def test_at_least_one_epoch_when_the_probe_spent_the_budget() -> None:
    assert load_script().epochs_for_budget(10.0, 12.0, 12.0, 8.0) == 1


@pytest.mark.slow
def test_cpu_run_with_the_smallest_budget(tmp_path: Path) -> None:
    """One epoch (``--epochs``, no probe: the budget's arithmetic is tested above) and IWAE-10
    on 100 test images, with a small model: a minute or two on one thread."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"{SHARED_DATA / 'mnist'} is absent")
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--epochs", "1"]
    command += ["--latent-dim", "8,4", "--hidden", "32", "--k", "10", "--examples", "100"]
    command += ["--threads", "1", "--data-dir", str(SHARED_DATA), "--out", str(out)]
    command += ["--runs", str(tmp_path / "runs")]
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test IWAE-10" in done.stdout

    report = json.loads((out / "gpu_top_down_conv.json").read_text())
    assert {"device", "training", "test", "evaluation_seconds", "total_seconds"} <= set(report)
    assert "probe" not in report  # --epochs given
    assert report["device"]["device"] == "cpu"
    training, test = report["training"], report["test"]
    assert training["epochs"] == 1 and training["examples_per_epoch"] == MNIST_TRAIN
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(m["seconds"] for m in metrics)
    assert training["training_seconds"] == pytest.approx(seconds)
    assert training["images_per_second"] == pytest.approx(MNIST_TRAIN * len(metrics) / seconds)
    assert training["wall_seconds"] > training["training_seconds"]

    assert test["examples"] == 100 and test["k"] == 10 and test["latent_sizes"] == [8, 4]
    numbers = [test["elbo"], test["iwae"], test["elbo_standard_error"], *test["kl_per_layer"]]
    numbers += [training["images_per_second"]]
    assert all(math.isfinite(x) for x in numbers)
    assert test["elbo"] <= test["iwae"] < 0
    assert all(kl >= 0 for kl in test["kl_per_layer"])
    assert all(
        0 <= a <= d
        for a, d in zip(test["active_units_per_layer"], test["latent_sizes"], strict=True)
    )
    evaluated = json.loads((out / "evaluate.json").read_text())
    assert evaluated["iwae"]["mean"] == test["iwae"]
