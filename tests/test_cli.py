"""The ``vaelab`` command: round trips, configuration, every user mistake, kill / Ctrl-C and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vaelab
from conftest import subprocess_env, vaelab_cli, vaelab_command
from vaelab.cli import app as cli
from vaelab.runs import folder as runs
from vaelab.runs import options as runconfig
from vaelab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint

TINY = ["--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--batch-size", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run on digits (2 epochs), shared by the read-only tests."""
    folder = tmp_path_factory.mktemp("runs") / "digits"
    assert cli.main(["train", "digits", "--out", str(folder), "--quiet", *TINY]) == 0
    return folder


# ---------------------------------------------------------------------------------- round trip


def test_train_writes_a_loadable_model_metrics_and_event_files(trained):
    names = set(os.listdir(trained))
    expected = {"config.json", "checkpoint.safetensors", "metrics.jsonl", "tensorboard"}
    assert names == expected | {"model.safetensors", "vaelab.json", ".vaelab.lock"}
    assert (trained / ".vaelab.lock").read_bytes() == b""  # released: nobody's PID in it
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["valid_elbo"] is not None and m["elbo"] < 0 for m in metrics)
    assert any(
        name.startswith("events.out.tfevents") for name in os.listdir(trained / "tensorboard")
    )
    model = vaelab.load(trained)
    assert model.latent_dim == 2 and model.hidden == (16,) and model.data_shape_ == (1, 8, 8)
    document = json.loads((trained / "vaelab.json").read_text())
    assert document["data"]["name"] == "digits" and document["data"]["divisor"] == 16.0
    assert document["run"]["epochs"] == 2 and document["training"]["epochs_run"] == 2


def test_evaluate_sample_reconstruct_encode(trained, tmp_path, capsys):
    code, out, _ = vaelab_cli(capsys, "evaluate", trained, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["count"] == 180 and result["unit"] == "nats per example"
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"])
    assert result["elbo"] < 0 <= result["kl"]

    code, out, _ = vaelab_cli(capsys, "evaluate", trained)
    assert code == 0 and "ELBO" in out and "KL" in out and "180" in out

    assert vaelab_cli(capsys, "sample", trained, "-n", "9", "--out", tmp_path / "s.png")[0] == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert vaelab_cli(capsys, "sample", trained, "-n", "5", "--out", tmp_path / "s.npy")[0] == 0
    assert np.load(tmp_path / "s.npy").shape == (5, 1, 8, 8)

    args = ("reconstruct", trained, "--data", "digits", "-n", "4", "--out", tmp_path / "r.png")
    assert vaelab_cli(capsys, *args)[0] == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

    # A file is scaled as the training data was: digits pixels 0..16 are divided by 16.
    pixels = (np.arange(5 * 64).reshape(5, 1, 8, 8) % 17).astype(np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    args = ("encode", trained, "--data", tmp_path / "x.npy", "--out", tmp_path / "z.npy")
    assert vaelab_cli(capsys, *args)[0] == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (5, 2) and z.dtype == np.float32
    assert np.array_equal(z, vaelab.load(trained).transform(pixels / np.float32(16)))


def test_threads_sets_torchs_thread_count(trained, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = ("sample", trained, "-n", "4", "--out", tmp_path / "s.npy", "--threads", "1")
        assert vaelab_cli(capsys, *args)[0] == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_version_names_vaelab_and_torch(capsys):
    code, out, _ = vaelab_cli(capsys, "--version")
    assert code == 0
    assert out.strip() == f"vaelab {vaelab.__version__} (torch {torch.__version__})"


def test_help_documents_every_option(capsys):
    code, out, _ = vaelab_cli(capsys, "train", "--help")
    assert code == 0
    for name in runconfig.OPTIONS:
        if name != "data":
            assert f"--{name.replace('_', '-')}" in out, name
    for flag in ("--out", "--config", "--resume", "--quiet", "--debug", "--threads", "DATA"):
        assert flag in out
    code, out, _ = vaelab_cli(capsys, "--help")
    assert code == 0
    assert all(c in out for c in ("train", "evaluate", "sample", "reconstruct", "encode"))
    expected = {
        "evaluate": ("--data", "--json", "--data-dir", "--samples", "--k", "--ais", "--ais-chains"),
        "sample": ("-n", "--out", "--seed"),
        "reconstruct": ("--data", "--out", "-n"),
        "encode": ("--data", "--out"),
    }
    for sub, flags in expected.items():
        code, out, _ = vaelab_cli(capsys, sub, "--help")
        assert code == 0 and all(flag in out for flag in flags), sub


# ------------------------------------------------------------------------------ configuration


def test_config_file_and_flags_merge_and_flags_win(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        'data = "digits"\nepochs = 1\nlatent-dim = 3\nhidden = [16]\nlr = 0.002\n'
        'lr_schedule = "constant"\n'
    )
    out = tmp_path / "run"
    code, _, err = vaelab_cli(
        capsys, "train", "--config", config, "--latent-dim", "4", "--out", out, "-q"
    )
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["latent_dim"] == 4  # the flag beats the file
    assert saved["epochs"] == 1 and saved["hidden"] == [16] and saved["lr"] == 0.002
    assert saved["lr_schedule"] == "constant"
    assert saved["batch_size"] == 100 and saved["likelihood"] == "bernoulli"  # defaults
    assert vaelab.load(out).latent_dim == 4


def test_hidden_none_gives_linear_maps(tmp_path, capsys):
    out = tmp_path / "linear"
    args = ("train", "digits", "--out", out, "--epochs", "1", "--hidden", "none", "-q")
    assert vaelab_cli(capsys, *args)[0] == 0
    assert vaelab.load(out).hidden == ()
    assert json.loads((out / "config.json").read_text())["hidden"] == []


def test_the_command_line_and_the_estimator_train_the_same_model(tmp_path, capsys):
    """One implementation: without validation data, `vaelab train` and `VAE.fit` agree bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.random((150, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    options = dict(latent_dim=2, hidden=(8,), epochs=2, batch_size=32, seed=4)
    settings = {**options, "data": str(tmp_path / "x.npy"), "valid_fraction": 0.0}
    settings["test_fraction"] = 0.0
    result = runs.train(settings, tmp_path / "run", quiet=True)
    capsys.readouterr()
    estimator = vaelab.VAE(**options, device="cpu").fit(x)
    a, b = result.estimator.model_.state_dict(), estimator.model_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------- bad inputs

Case = Callable[[Path, Path], tuple[list[object], Path]]


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _copy(run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(run, tmp / "copy"))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _toml(tmp: Path, text: str) -> Path:
    (tmp / "c.toml").write_text(text)
    return tmp / "c.toml"


def _with_a_file(folder: Path) -> Path:
    (folder / "notes.txt").write_text("mine")
    return folder


def _unfinished(run: Path, tmp: Path) -> Path:
    copy = _copy(run, tmp)
    (copy / "vaelab.json").unlink()
    return copy


BAD: dict[str, Case] = {
    "missing data file": lambda t, r: (["train", t / "nope.npy", "--out", t / "run"], t / "run"),
    "wrong shape": lambda t, r: (
        ["train", _npy(t / "x.npy", np.ones(10)), "--out", t / "run"],
        t / "run",
    ),
    "NaN values": lambda t, r: (
        ["train", _npy(t / "x.npy", np.array([[0.5, np.nan]] * 4)), "--out", t / "run"],
        t / "run",
    ),
    "infinite values": lambda t, r: (
        ["train", _npy(t / "x.npy", np.array([[0.5, np.inf]] * 4)), "--out", t / "run"],
        t / "run",
    ),
    "outside the likelihood's support": lambda t, r: (
        ["train", _npy(t / "x.npy", np.linspace(-2, 2, 40).reshape(10, 4)), "--out", t / "run"],
        t / "run",
    ),
    "unknown option": lambda t, r: (["train", "digits", "--out", t / "run", "--bogus"], t / "run"),
    "unknown choice": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--likelihood", "poisson"],
        t / "run",
    ),
    "unknown command": lambda t, r: (["fit", "digits"], t / "run"),
    "missing --out": lambda t, r: (["train", "digits"], t / "run"),
    "bad hidden sizes": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--hidden", "4x"],
        t / "run",
    ),
    "not a number": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--lr", "fast"],
        t / "run",
    ),
    "zero epochs": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--epochs", "0"],
        t / "run",
    ),
    "conv network on tables": lambda t, r: (
        [
            "train",
            _npy(t / "x.npy", np.full((20, 5), 0.5)),
            "--out",
            t / "run",
            "--network",
            "conv",
        ],
        t / "run",
    ),
    "free bits with a mixture prior": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--prior", "mixture", "--free-bits", "0.1"],
        t / "run",
    ),
    "no data": lambda t, r: (["train", "--out", t / "run"], t / "run"),
    "missing data folder": lambda t, r: (
        ["train", "mnist", "--out", t / "run", "--data-dir", t / "nowhere"],
        t / "run",
    ),
    "missing config file": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--config", t / "nope.toml"],
        t / "run",
    ),
    "invalid TOML": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--config", _toml(t, "epochs = \n")],
        t / "run",
    ),
    "unknown TOML key": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--config", _toml(t, "epoch = 3\n")],
        t / "run",
    ),
    "wrong TOML type": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--config", _toml(t, 'epochs = "many"\n')],
        t / "run",
    ),
    "--out holds other files": lambda t, r: (["train", "digits", "--out", _with_a_file(t)], t),
    "--out is a finished run without --resume": lambda t, r: (
        ["train", "digits", "--out", _copy(r, t)],
        t / "copy",
    ),
    "resume without a run": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--resume"],
        t / "run",
    ),
    "resume with other settings": lambda t, r: (
        ["train", "digits", "--out", _copy(r, t), "--resume", "--lr", "0.5"],
        t / "copy",
    ),
    "truncated checkpoint": lambda t, r: (
        ["train", "--out", (c := _copy(r, t)), "--resume"],
        (_truncate(c / CHECKPOINT_FILE), c)[1],
    ),
    "corrupt checkpoint": lambda t, r: (
        ["train", "--out", (c := _copy(r, t)), "--resume"],
        (_flip_last_byte(c / CHECKPOINT_FILE), c)[1],
    ),
    "not a vaelab model": lambda t, r: (["evaluate", t], t),
    "missing model folder": lambda t, r: (["evaluate", t / "nope"], t),
    "unfinished run": lambda t, r: (["evaluate", (c := _unfinished(r, t))], c),
    "corrupt model weights": lambda t, r: (
        ["evaluate", (c := _copy(r, t))],
        (_flip_last_byte(c / "model.safetensors"), c)[1],
    ),
    "truncated model file": lambda t, r: (
        ["evaluate", (c := _copy(r, t))],
        (_truncate(c / "vaelab.json"), c)[1],
    ),
    "data of another shape": lambda t, r: (
        ["evaluate", r, "--data", _npy(t / "x.npy", np.full((20, 5), 0.5))],
        t,
    ),
    "evaluation data outside the support": lambda t, r: (
        [
            "encode",
            r,
            "--data",
            _npy(t / "x.npy", np.full((3, 1, 8, 8), 100.0)),
            "--out",
            t / "z.npy",
        ],
        t,
    ),
    "sample to an unknown format": lambda t, r: (["sample", r, "--out", t / "s.txt"], t),
    "sample zero examples": lambda t, r: (["sample", r, "-n", "0", "--out", t / "s.png"], t),
    "output folder missing": lambda t, r: (["sample", r, "--out", t / "no" / "s.png"], t),
    "encode to a png": lambda t, r: (["encode", r, "--data", "digits", "--out", t / "z.png"], t),
    "zero threads": lambda t, r: (["sample", r, "--out", t / "s.png", "--threads", "0"], t),
    "DReG with the ELBO": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--gradient", "dreg"],
        t / "run",
    ),
    "beta with the IWAE objective": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--objective", "iwae", "--k", "5", "--beta", "2"],
        t / "run",
    ),
    "k with the ELBO objective": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--k", "5"],
        t / "run",
    ),
    "free bits with STL": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--gradient", "stl", "--free-bits", "0.1"],
        t / "run",
    ),
    "zero flow steps": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--posterior", "iaf", "--flow-steps", "0"],
        t / "run",
    ),
    "unknown gradient": lambda t, r: (
        ["train", "digits", "--out", t / "run", "--gradient", "reinforce"],
        t / "run",
    ),
}


def _snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_every_mistake_is_one_line_exit_2_and_leaves_nothing(
    case, trained, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("VAELAB_DATA", raising=False)
    args, watched = case(tmp_path, trained)
    before = _snapshot(watched)
    code, out, err = vaelab_cli(capsys, *args)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab: error: "), err
    assert "Traceback" not in err and out == ""
    assert _snapshot(watched) == before  # nothing created, nothing changed


DEVICE_COMMANDS: dict[str, Callable[[Path, Path], list[object]]] = {
    "train": lambda t, r: ["train", "digits", "--out", t / "run", "--epochs", "1"],
    "evaluate": lambda t, r: ["evaluate", r],
    "gap": lambda t, r: ["gap", r],
    "report": lambda t, r: ["report", r, "--out", t / "r.html"],
    "sample": lambda t, r: ["sample", r, "--out", t / "s.png"],
    "reconstruct": lambda t, r: ["reconstruct", r, "--out", t / "r.png"],
    "encode": lambda t, r: ["encode", r, "--out", t / "z.npy"],
}


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
@pytest.mark.parametrize("command", DEVICE_COMMANDS.values(), ids=DEVICE_COMMANDS.keys())
def test_a_device_torch_cannot_use_here_is_one_line_exit_2(
    command, device, trained, tmp_path, capsys
):
    """mps and xpu do not exist on this CPU machine and meta holds no data: each was a
    traceback and exit 1 once, from the first tensor moved there."""
    if device != "meta" and getattr(torch, device).is_available():
        pytest.skip(f"this machine has a {device} device")
    before = _snapshot(trained)
    code, out, err = vaelab_cli(capsys, *command(tmp_path, trained), "--device", device)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab: error: "), err
    assert f"device {device!r}" in err and out == ""
    assert list(tmp_path.iterdir()) == [] and _snapshot(trained) == before


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--lr", "1e25", "--likelihood", "gaussian", "--checkpoint-every", "1", "-q")
    code, _, err = vaelab_cli(capsys, "train", "digits", "--out", out, *TINY, *args)
    assert code == 1 and err.count("\n") == 1
    assert "NaN or infinite" in err and "at epoch 1, step 2 of 23 (optimiser step 2)" in err
    assert "last good checkpoint" in err and "Traceback" not in err
    _, state = load_checkpoint(out / CHECKPOINT_FILE)
    assert state["position"]["step"] == 1 and not (out / "vaelab.json").exists()


def test_a_command_is_given_its_world_apart_from_its_arguments(monkeypatch):
    """Runtime state is passed, not stored in the parsed arguments (once ``args.world``)."""
    seen: dict[str, object] = {}

    def sample(args: object, world: object) -> int:
        seen.update(args=args, world=world)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "sample", sample)
    assert cli.main(["sample", "somewhere", "--out", "s.png"]) == 0
    assert seen["world"].size == 1 and not hasattr(seen["args"], "world")
    assert set(cli.COMMANDS) == set(cli.build_parser()._subparsers._group_actions[0].choices)


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(["train", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "r"), "--debug"])


def test_the_installed_command_reports_a_mistake_in_one_line(tmp_path):
    run = subprocess.run(
        vaelab_command("train", tmp_path / "nope.npy", "--out", tmp_path / "run"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("vaelab: error: ")
    assert "nope.npy" in run.stderr and not (tmp_path / "run").exists()


def test_an_error_message_quoting_a_whole_tensor_is_cut_to_a_short_line(capsys, monkeypatch):
    """torch's argument checks quote whole tensors (AIS once printed 11 kB on its "one line"):
    the line keeps its start, says how long the message was and where the rest is."""
    from vaelab.runs import options

    message = "Expected value argument " + "0.1234, " * 2000 + "to be in the support"

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError(message)

    monkeypatch.setattr(options, "read_config_file", fail)
    code, out, err = vaelab_cli(capsys, "train", "digits", "--out", "x", "--config", "c.toml")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vaelab: error: Expected value argument 0.1234")
    assert len(err) < 750 and f"({len(message):,} characters; --debug shows them all)" in err


# ------------------------------------------------------------------------ kill, Ctrl-C, resume

KILL_ARGS = [
    "--epochs", "2", "--batch-size", "8", "--hidden", "16", "--latent-dim", "3",
    "--binarize", "dynamic", "--kl-warmup", "1", "--grad-clip", "5", "--checkpoint-every", "20",
    "--quiet",
]  # fmt: skip


@pytest.fixture
def binary_data(tmp_path) -> Path:
    x = (np.random.default_rng(0).random((2000, 16)) < 0.4).astype(np.float32)
    return _npy(tmp_path / "x.npy", 0.25 + 0.5 * x)  # grey values: dynamic binarisation draws


@pytest.mark.slow
def test_a_run_killed_or_interrupted_mid_epoch_resumes_to_bit_identical_weights(
    tmp_path, binary_data, capsys
):
    """SIGKILL, and Ctrl-C (exit 130, a checkpoint saved), then --resume: the weights of a run
    never stopped, bit for bit, and the resumed run takes only the steps its checkpoint had not."""
    env = subprocess_env()
    reference = tmp_path / "reference"
    uninterrupted = subprocess.Popen(
        vaelab_command("train", binary_data, "--out", reference, *KILL_ARGS),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stops = {"killed": signal.SIGKILL, "interrupted": signal.SIGINT}
    victims = {
        name: subprocess.Popen(
            vaelab_command("train", binary_data, "--out", tmp_path / name, *KILL_ARGS),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in stops
    }
    waiting, deadline = dict(victims), time.monotonic() + 120
    while waiting:  # each is stopped as soon as its first checkpoint (step 20 of 400) is there
        for name, victim in list(waiting.items()):
            if (tmp_path / name / CHECKPOINT_FILE).exists():
                victim.send_signal(stops[name])
                del waiting[name]
            else:
                assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    victims["killed"].communicate(timeout=60)
    assert victims["killed"].returncode == -signal.SIGKILL
    _, err = victims["interrupted"].communicate(timeout=60)
    assert victims["interrupted"].returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("vaelab: interrupted at epoch") and "--resume" in err

    checkpointed = {}
    for name in stops:
        _, state = load_checkpoint(tmp_path / name / CHECKPOINT_FILE)
        position = state["position"]
        assert position["steps_per_epoch"] == 200  # 1600 training examples in batches of 8
        assert position["step"] == position["epoch"] * 200 + position["batch"]
        assert 0 < position["step"] < 400 and not position["finished"]
        assert not (tmp_path / name / "vaelab.json").exists()
        checkpointed[name] = position["step"]
    _, state = load_checkpoint(tmp_path / "interrupted" / CHECKPOINT_FILE)
    assert f"step {state['position']['batch']} of 200" in err  # Ctrl-C saved where it stopped

    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    final_a = load_file(reference / CHECKPOINT_FILE)
    for name in stops:
        # Resumed in this process, whose random streams other tests have moved: the checkpoint's
        # are restored, so the weights still match the other process's bit for bit.
        code, out, err = vaelab_cli(capsys, "train", "--out", tmp_path / name, "--resume", "-q")
        assert code == 0, err
        assert "resuming" in out
        folder = tmp_path / name
        assert (folder / "model.safetensors").read_bytes() == (
            reference / "model.safetensors"
        ).read_bytes()
        final_b = load_file(folder / CHECKPOINT_FILE)
        for key in (k for k in final_a if k.startswith(("model.", "optimizer."))):
            assert torch.equal(final_a[key], final_b[key]), (name, key)
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [1, 2]
        assert not list(folder.glob(".*.tmp"))
        # Continued, not started over: a fresh start with the same seed would end the same.
        training = json.loads((folder / "vaelab.json").read_text())["training"]
        assert training["steps"] == 400 and training["resumed_from_step"] == checkpointed[name]
        assert training["steps_this_process"] == 400 - checkpointed[name]
    reference_training = json.loads((reference / "vaelab.json").read_text())["training"]
    assert reference_training["resumed_from_step"] is None
    assert reference_training["steps_this_process"] == 400


def test_the_demo_runs_end_to_end(tmp_path, capsys):
    """`make demo`, shortened to two epochs."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo", path)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.main(["--out", str(tmp_path / "demo"), "--epochs", "2"])
    out = capsys.readouterr().out
    for name in ("samples.png", "reconstructions.png", "report.html"):
        assert (tmp_path / "demo" / name).is_file() and name in out
    assert "<svg" in (tmp_path / "demo" / "report.html").read_text()
    demo.main(["--out", str(tmp_path / "demo"), "--epochs", "1"])  # a second run replaces the first
    assert vaelab.load(tmp_path / "demo" / "model").epochs == 1
