"""Run folders under stress: two processes on one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from vaelab import cli
from vaelab.checkpoint import CHECKPOINT_FILE, load_checkpoint
from vaelab.runs import LOCK_FILE

TINY = ["--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--batch-size", "64", "-q"]


def vaelab_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def command(*args: object) -> list[str]:
    return [sys.executable, "-W", "error", "-m", "vaelab", *map(str, args)]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("VAELAB_DATA", None)
    return env


# ---------------------------------------------------------------------- one process per folder


def test_of_two_processes_started_on_one_folder_one_trains_and_the_other_names_it(tmp_path, capsys):
    x = np.random.default_rng(0).random((400, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    # Long enough never to finish: the winner is stopped with Ctrl-C once the checks are done.
    options = ["--epochs", "1000", "--batch-size", "8", "--hidden", "8", "--latent-dim", "2"]
    options += ["--checkpoint-every", "10", "--quiet"]
    racers = {  # the seed tells whose config.json the folder holds
        seed: subprocess.Popen(
            command("train", tmp_path / "x.npy", "--out", out, "--seed", seed, *options),
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
