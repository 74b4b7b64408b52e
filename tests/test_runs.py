"""Run folders under stress: two processes on one folder, a full disk, the every-minute checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import subprocess_env, vaelab_cli, vaelab_command
from vaelab.cli import app as cli
from vaelab.io import files
from vaelab.runs.folder import LOCK_FILE, RunLock
from vaelab.runs.options import RunConfig
from vaelab.train import trainer as training
from vaelab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint

TINY = ["--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--batch-size", "64", "-q"]


# ---------------------------------------------------------------------- one process per folder


@pytest.mark.slow
def test_of_two_processes_started_on_one_folder_one_trains_and_the_other_names_it(tmp_path, capsys):
    x = np.random.default_rng(0).random((400, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    # Long enough never to finish: the winner is stopped with Ctrl-C once the checks are done.
    options = ["--epochs", "1000", "--batch-size", "8", "--hidden", "8", "--latent-dim", "2"]
    options += ["--checkpoint-every", "10", "--quiet"]
    racers = {  # the seed tells whose config.json the folder holds
        seed: subprocess.Popen(
            vaelab_command("train", tmp_path / "x.npy", "--out", out, "--seed", seed, *options),
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    }
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in racers.values()):
            assert time.monotonic() < deadline, "neither process stopped"
            time.sleep(0.01)
        [loser_seed] = [seed for seed, p in racers.items() if p.poll() is not None]
        [winner_seed] = [seed for seed in racers if seed != loser_seed]
        loser, winner = racers[loser_seed], racers[winner_seed]
        in_use = f"vaelab: error: {out} is in use by process {winner.pid}; wait for it to "
        in_use += "finish or stop it\n"
        assert loser.communicate()[1] == in_use and loser.returncode == 2
        assert winner.poll() is None

        # Resuming the run while it trains is refused the same way (from this process: the
        # lock is the operating system's, between any two processes).
        while not (out / CHECKPOINT_FILE).exists():
            assert winner.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        assert vaelab_cli(capsys, "train", "--out", out, "--resume") == (2, "", in_use)
        assert (out / LOCK_FILE).read_text() == f"{winner.pid}\n"

        winner.send_signal(signal.SIGINT)
        _, err = winner.communicate(timeout=60)
        assert winner.returncode == 130 and err.startswith("vaelab: interrupted"), err
    finally:
        for process in racers.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    # The winner's run, whole: its configuration, a checkpoint that loads, the lock released.
    assert json.loads((out / "config.json").read_text())["seed"] == winner_seed
    _, state = load_checkpoint(out / CHECKPOINT_FILE)
    assert state["extra"]["run"]["seed"] == winner_seed and not state["position"]["finished"]
    assert (out / LOCK_FILE).read_bytes() == b""
    assert not list(out.glob(".*.tmp"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("resume", [True, False], ids=["--resume", "new run"])
def test_a_folder_in_use_is_refused_before_anything_is_read_or_changed(tmp_path, capsys, resume):
    out = tmp_path / "run"
    assert vaelab_cli(capsys, "train", "digits", "--out", out, *TINY)[0] == 0
    (out / "vaelab.json").unlink()  # as if still training, and in the middle of a checkpoint:
    (out / f".{CHECKPOINT_FILE}.x1y2.tmp").write_bytes(b"half a checkpoint")
    holder = RunLock(out)
    holder.acquire(create=True)
    try:
        before = _snapshot(out)
        args = ["--resume"] if resume else ["digits", *TINY]
        code, printed, err = vaelab_cli(capsys, "train", "--out", out, *args)
        assert (code, printed) == (2, "")
        assert err == (
            f"vaelab: error: {out} is in use by process {os.getpid()}; wait for it to finish or "
            "stop it\n"
        )
        assert _snapshot(out) == before  # the holder's temporary file too
    finally:
        holder.release()


def test_a_model_command_on_a_run_still_training_says_it_is_in_progress(tmp_path, capsys):
    """`vaelab evaluate` on a run without its model: while a process holds the run, it is in
    progress (wait, or stop it), not a run to --resume (which would be refused as in use); once
    nobody holds it, --resume; without a checkpoint, train again."""
    out = tmp_path / "run"
    assert vaelab_cli(capsys, "train", "digits", "--out", out, *TINY)[0] == 0
    (out / "vaelab.json").unlink()  # as a run still training has none yet
    holder = RunLock(out)
    holder.acquire(create=True)
    try:
        code, _, err = vaelab_cli(capsys, "evaluate", out)
        assert code == 2 and err.count("\n") == 1, err
        assert f"is a training run in progress, held by process {os.getpid()}" in err
        assert "wait for it to finish or stop it" in err and "--resume" not in err
        code, _, err = vaelab_cli(capsys, "sample", out, "--out", tmp_path / "s.png")
        assert code == 2 and "in progress" in err and "--resume" not in err
    finally:
        holder.release()
    code, _, err = vaelab_cli(capsys, "evaluate", out)
    assert code == 2 and f"finish it with `vaelab train --out {out} --resume`" in err, err
    (out / CHECKPOINT_FILE).unlink()
    code, _, err = vaelab_cli(capsys, "evaluate", out)
    assert code == 2 and "--resume" not in err and "before its first checkpoint" in err, err


def test_the_lock_is_released_when_a_run_ends_and_a_lock_file_alone_is_an_empty_folder(
    tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("12345\n")  # left by a process that was killed
    assert vaelab_cli(capsys, "train", "digits", "--out", out, *TINY)[0] == 0
    assert (out / LOCK_FILE).read_bytes() == b""
    # A finished run is refused for a new run and taken back by --resume, in this same process.
    code, _, err = vaelab_cli(capsys, "train", "digits", "--out", out, *TINY)
    assert code == 2 and "already holds a training run" in err
    code, out_text, _ = vaelab_cli(capsys, "train", "--out", out, "--resume", "-q")
    assert code == 0 and "training had finished" in out_text


# ------------------------------------------------------------------------------------ full disk

EVERY_5 = [*TINY, "--checkpoint-every", "5"]  # 23 steps per epoch on digits


def fill_the_disk(monkeypatch, name: str, nth: int, code: int = errno.ENOSPC) -> dict[str, bytes]:
    """The disk fills during the ``nth`` write of the file called ``name``, after half of its bytes.
    Returns, under ``"last"``, the bytes of the last checkpoint written before that."""
    write = files._write_durably
    count = 0
    written: dict[str, bytes] = {}

    def filling(path: Path, f, data: bytes) -> None:
        nonlocal count
        if path.name == name:
            count += 1
            if count == nth:
                f.write(data[: len(data) // 2])
                raise OSError(code, os.strerror(code))
        write(path, f, data)
        if path.name == CHECKPOINT_FILE:
            written["last"] = data

    monkeypatch.setattr(files, "_write_durably", filling)
    return written


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert cli.main(["train", "digits", "--out", str(folder), *EVERY_5]) == 0
    return folder


DISK_FULL = {  # file that cannot be written → what the checkpoint left behind holds
    "checkpoint": ("checkpoint.safetensors", 3, errno.ENOSPC, "epoch 1, step 10 of 23"),
    "metrics": ("metrics.jsonl", 2, errno.EDQUOT, "epoch 2, step 22 of 23"),
    "model": ("model.safetensors", 1, errno.ENOSPC, "the end of training, epoch 2"),
    "config": ("config.json", 1, errno.ENOSPC, None),
    "tensorboard": ("tensorboard", 2, errno.ENOSPC, "epoch 2, step 22 of 23"),
}


@pytest.mark.parametrize("case", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_a_full_disk_names_the_file_keeps_the_last_checkpoint_and_says_how_to_resume(
    case, uninterrupted, tmp_path, capsys, monkeypatch
):
    name, nth, code, holds = case
    out = tmp_path / "run"
    written = fill_the_disk(monkeypatch, name, nth, code)
    if name == "tensorboard":  # its writer thread reports the error at the next flush
        from torch.utils.tensorboard import SummaryWriter

        flush, flushes = SummaryWriter.flush, []

        def failing_flush(writer: SummaryWriter) -> None:
            flushes.append(1)
            if len(flushes) == nth:
                raise OSError(code, os.strerror(code))
            flush(writer)

        monkeypatch.setattr(SummaryWriter, "flush", failing_flush)
    exit_code, _, err = vaelab_cli(capsys, "train", "digits", "--out", out, *EVERY_5)
    assert exit_code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"vaelab: error: cannot write {out / name}: {os.strerror(code)}")
    assert not list(out.rglob("*.tmp"))  # the half-written temporary file is gone
    assert (out / LOCK_FILE).read_bytes() == b""
    monkeypatch.undo()  # space is freed

    if holds is None:
        assert not (out / CHECKPOINT_FILE).exists()
        assert f"no checkpoint had been written: free some space, delete {out}" in err
        assert vaelab_cli(capsys, "train", "digits", "--out", out, *EVERY_5)[0] == 0
    else:
        # The checkpoint before the failure is there, byte for byte, and it loads.
        assert (out / CHECKPOINT_FILE).read_bytes() == written["last"]
        _, state = load_checkpoint(out / CHECKPOINT_FILE)
        step = state["position"]["step"]
        assert f"the last checkpoint, {out / CHECKPOINT_FILE}, is intact" in err
        assert f"it holds {holds} (optimiser step {step})" in err
        assert f"continue with `vaelab train --out {out} --resume`" in err
        assert vaelab_cli(capsys, "train", "--out", out, "--resume", "-q")[0] == 0
        summary = json.loads((out / "vaelab.json").read_text())["training"]
        assert summary["resumed_from_step"] == step and summary["steps_this_process"] == 46 - step
    model = (out / "model.safetensors").read_bytes()
    assert model == (uninterrupted / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------ every-minute checkpoint


class SecondPerReading:
    """Stands in for the ``time`` module in ``vaelab.train.trainer``: each reading is a second later."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_vaelab_train_checkpoints_mid_epoch_every_minute_by_default(tmp_path, monkeypatch, capsys):
    assert RunConfig().checkpoint_seconds == 60.0 and RunConfig().checkpoint_every == 0
    clock = SecondPerReading()
    monkeypatch.setattr(training, "time", clock)
    written: list[tuple[float, int]] = []
    save = training.save_checkpoint

    def recording_save(path, tensors, state):
        written.append((clock.now, state["position"]["batch"]))
        save(path, tensors, state)

    monkeypatch.setattr(training, "save_checkpoint", recording_save)
    one_long_epoch = ["--epochs", "1", "--batch-size", "8", "--hidden", "8", "-q"]
    assert vaelab_cli(capsys, "train", "digits", "--out", tmp_path / "a", *one_long_epoch)[0] == 0
    # 180 steps, the clock read about once a step: a checkpoint a minute, then the epoch's end.
    mid_epoch = [(t, batch) for t, batch in written if batch > 0]
    assert len(mid_epoch) >= 2 and written[-1][1] == 0
    times = [t for t, _ in written]
    assert all(60 <= b - a < 70 for a, b in zip(times[:-2], times[1:-1], strict=True))

    written.clear()
    args = ("train", "digits", "--out", tmp_path / "b", *one_long_epoch, "--checkpoint-seconds", 0)
    assert vaelab_cli(capsys, *args)[0] == 0
    assert [batch for _, batch in written] == [0]  # only the epoch's end


def test_run_settings_take_numpy_integers_as_integers_and_refuse_floats():
    """A library caller's ``vaelab.runs.folder.train(settings)`` may hold numpy integers (from a
    grid of ``np.arange``): they are the same integers; floats are still refused."""
    from vaelab.runs.options import RunError, resolve

    config = resolve(
        {"latent_dim": np.int64(3), "hidden": np.array([16, 8]), "epochs": np.int32(2)}
    )
    assert (config.latent_dim, config.hidden, config.epochs) == (3, (16, 8), 2)
    assert type(config.latent_dim) is int and type(config.epochs) is int
    assert resolve({"latent_dim": np.arange(4, 2, -1)}).latent_dim == (4, 3)
    with pytest.raises(RunError, match="latent_dim must be a positive integer"):
        resolve({"latent_dim": np.float64(3)})
    with pytest.raises(RunError, match="epochs must be an integer"):
        resolve({"epochs": np.float32(2)})
