"""Data-parallel training and evaluation: the same run on any number of workers, kill and resume,
one line when a worker fails, and the streams and shares underneath."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import subprocess_env, vaelab_cli, vaelab_command
from vaelab.data.npyrows import NpyRows
from vaelab.data.sources import DataError, load_data
from vaelab.runs import folder
from vaelab.train.batches import IndexedBatches
from vaelab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from vaelab.train.config import TrainConfig
from vaelab.train.distributed import World
from vaelab.train.streams import TrainingStreams, stream_key
from vaelab.train.trainer import Trainer

# 1,437 training digits in batches of 8: 180 steps an epoch, the last batch of 5 split 2 + 3.
RUN = [
    "--epochs", "2", "--batch-size", "8", "--hidden", "16", "--latent-dim", "3",
    "--binarize", "dynamic", "--kl-warmup", "1", "--grad-clip", "5", "--checkpoint-every", "20",
    "--seed", "3", "--quiet",
]  # fmt: skip
STEPS = 2 * 180


def environment(**extra: str) -> dict[str, str]:
    # A stuck collective gives up in a minute, not 30.
    return subprocess_env(VAELAB_DIST_TIMEOUT="60", **extra)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_close_runs(a: Path, b: Path, tolerance: float) -> None:
    """Per-epoch ELBO, validation ELBO and final weights agree to ``tolerance``, relative."""
    for one, other in zip(metrics(a), metrics(b), strict=True):
        for key in ("elbo", "reconstruction", "kl", "valid_elbo"):
            assert one[key] == pytest.approx(other[key], rel=tolerance, abs=tolerance), key
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        scale = np.abs(weights_a[key]).max()
        assert np.abs(weights_a[key] - weights_b[key]).max() <= tolerance * scale, key


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Path:
    """A run on two workers started by ``--nproc 2``: the reference of the tests below."""
    folder = tmp_path_factory.mktemp("ddp") / "two"
    done = subprocess.run(
        vaelab_command("train", "digits", "--out", folder, "--nproc", 2, *RUN),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("training on 2 workers\n") and done.stderr == ""
    return folder


def test_two_workers_train_the_model_one_process_trains(two_workers, tmp_path, capsys):
    """The same data order, binarisation and noise per example, and the loss scaled so that the
    average of the workers' gradients is the gradient of the batch mean: only the order of float
    sums differs (measured: ELBO to 2e-8, weights to 6e-7 of their largest value)."""
    one = tmp_path / "one"
    code, _, err = vaelab_cli(capsys, "train", "digits", "--out", one, "--nproc", 1, *RUN)
    assert code == 0, err
    assert_close_runs(one, two_workers, tolerance=1e-4)
    summary = json.loads((two_workers / "vaelab.json").read_text())["training"]
    assert summary["workers"] == 2 and summary["steps"] == STEPS


@pytest.mark.slow  # 10 s each
@pytest.mark.parametrize("gradient", ["reinforce", "vimco"])
def test_a_discrete_code_trains_alike_on_one_and_two_workers(gradient, tmp_path, capsys):
    """A Bernoulli code with NVIL's REINFORCE (its running moments are moved by the whole
    batch's signal, summed over the workers) or VIMCO: one process and two workers agree to
    float rounding, the moments included."""
    run = ["digits", "--epochs", "1", "--batch-size", "40", "--hidden", "16", "--quiet"]
    run += ["--latent", "bernoulli", "--latent-dim", "10", "--objective", "iwae", "--k", "3"]
    run += ["--gradient", gradient, "--binarize", "dynamic", "--seed", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = vaelab_cli(capsys, "train", "--out", one, *run)
    assert code == 0, err
    done = subprocess.run(
        vaelab_command("train", "--out", two, "--nproc", 2, *run),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert_close_runs(one, two, tolerance=1e-4)
    moments = load_file(two / "model.safetensors")["posterior.estimator.signal_mean"]
    assert (float(moments) != 0) == (gradient == "reinforce")


def _workers(parent: int) -> list[int]:
    """The child processes of ``parent``: the workers its launcher started."""
    found = []
    for task in os.listdir(f"/proc/{parent}/task"):
        found += [
            int(pid) for pid in Path(f"/proc/{parent}/task/{task}/children").read_text().split()
        ]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers in /proc")
def test_a_worker_killed_mid_epoch_resumes_to_the_bytes_of_an_uninterrupted_run(
    two_workers, tmp_path, capsys
):
    """SIGKILL of worker 1 right after the first checkpoint: one line naming it and the
    checkpoint, exit 2 within seconds, no half-written file; --resume on two workers ends with
    the reference's weights byte for byte, and on one worker within float tolerance."""
    out = tmp_path / "killed"
    run = subprocess.Popen(
        vaelab_command("train", "digits", "--out", out, "--nproc", 2, *RUN),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT_FILE).exists():
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        rank0 = int((out / ".vaelab.lock").read_text())
        [rank1] = [pid for pid in _workers(run.pid) if pid != rank0]
        killed = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        _, err = run.communicate(timeout=60)
        stopped = time.monotonic() - killed
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"vaelab: error: worker 1 (pid {rank1}) was killed by SIGKILL")
    assert f"continue with `vaelab train --out {out} --resume --nproc 2`" in err
    assert stopped < 10, f"the run took {stopped:.1f} s to stop"
    _, state = load_checkpoint(out / CHECKPOINT_FILE)
    position = state["position"]
    assert 0 < position["step"] < STEPS and position["batch"] > 0  # mid-epoch
    assert f"it holds epoch {position['epoch'] + 1}, step {position['batch']} of 180" in err
    assert not list(out.glob(".*.tmp")) and not (out / "model.safetensors").exists()

    one = Path(shutil.copytree(out, tmp_path / "on-one-worker"))
    resumed = subprocess.run(
        vaelab_command("train", "--out", out, "--resume", "--nproc", 2, "-q"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"resuming {out} from epoch 1, step {position['batch']}")
    reference = two_workers / "model.safetensors"
    assert (out / "model.safetensors").read_bytes() == reference.read_bytes()
    final, expected = load_file(out / CHECKPOINT_FILE), load_file(two_workers / CHECKPOINT_FILE)
    for key in (k for k in expected if k.startswith(("model.", "optimizer."))):
        assert np.array_equal(final[key], expected[key]), key
    assert metrics(out) == [
        {**m, "seconds": n["seconds"], "examples_per_second": n["examples_per_second"]}
        for m, n in zip(metrics(two_workers), metrics(out), strict=True)
    ]
    summary = json.loads((out / "vaelab.json").read_text())["training"]
    assert summary["resumed_from_step"] == position["step"]
    assert summary["steps_this_process"] == STEPS - position["step"]

    # Another number of workers continues the same streams: the same run up to float sums.
    code, _, err = vaelab_cli(capsys, "train", "--out", one, "--resume", "-q")
    assert code == 0, err
    assert_close_runs(one, two_workers, tolerance=1e-4)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: any of its threads not a zombie. (A process whose
    main thread has exited shows as a zombie while its other threads are still ending, and
    holds its files, and locks, until the last of them has.)"""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
    return False


@contextlib.contextmanager
def _stop_at_once(trainer: Trainer) -> Iterator[None]:
    trainer.request_stop()
    yield


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux parent-death signal")
def test_workers_die_with_a_killed_launcher_and_leave_the_run_free_to_resume(
    tmp_path, capsys, monkeypatch
):
    """SIGKILL of the process the user started (`vaelab train --nproc 2`) stops its workers
    within seconds, rather than leaving them training with the run's lock; --resume then starts."""
    out = tmp_path / "orphaned"
    run = subprocess.Popen(
        vaelab_command("train", "digits", "--out", out, "--nproc", 2, *RUN, "--epochs", 1000),
        env=subprocess_env(TMPDIR=str(tmp_path)),  # where the killed launcher leaves its folder
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (out / CHECKPOINT_FILE).exists():
            assert run.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        workers = _workers(run.pid)
        assert len(workers) == 2
        run.kill()
        run.wait()
        killed = time.monotonic()
        # SIGTERM, as after Ctrl-C: they stop after the step, rank 0 saving a checkpoint.
        while any(_alive(pid) for pid in workers) and time.monotonic() < killed + 10:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers), "the workers outlived their launcher"
    finally:
        if run.poll() is None:
            workers = _workers(run.pid)
            run.kill()
            run.wait()
        for pid in workers:  # none trains on after a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # The resumed run takes the lock and starts, then stops after a step as Ctrl-C would stop it.
    monkeypatch.setattr(folder, "_stop_on_signals", _stop_at_once)
    code, printed, err = vaelab_cli(capsys, "train", "--out", out, "--resume", "-q")
    assert printed.startswith(f"resuming {out} from "), err
    assert code == 130 and "in use" not in err, err


INJECTED = """
import os, time
from pathlib import Path
if os.environ.get("RANK") == "1":
    from vaelab.data import DataError
    from vaelab.train.batches import IndexedBatches
    batches = IndexedBatches.batches
    def failing(self, epoch, start=0, share=None):
        for batch in batches(self, epoch, start, share):
            if share is not None and (epoch, batch.number) == (0, 30):
                Path(os.environ["FAILED_AT"]).write_text(repr(time.time()))
                raise DataError("row 1234 of this worker's file cannot be read")
            yield batch
    IndexedBatches.batches = failing
"""


@pytest.mark.slow
def test_a_failing_worker_stops_the_run_in_one_line_within_seconds(tmp_path):
    """Worker 1 meets bad data at step 31 (injected where it reads its share): its message,
    prefixed with its rank, is the one line printed; exit 2; the other worker, waiting in the
    gradients' all-reduce, stops at once rather than at gloo's timeout."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECTED)
    failed_at = tmp_path / "failed-at"
    path = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    done = subprocess.run(
        vaelab_command("train", "digits", "--out", out, "--nproc", 2, *RUN),
        env=environment(PYTHONPATH=path, FAILED_AT=str(failed_at)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    stopped = time.time() - float(failed_at.read_text())
    assert done.returncode == 2
    assert done.stderr == (
        "vaelab: error: worker 1 of 2: row 1234 of this worker's file cannot be read\n"
    )
    assert stopped < 10, f"the run took {stopped:.1f} s to stop"
    _, state = load_checkpoint(out / CHECKPOINT_FILE)
    assert state["position"]["step"] == 20  # the checkpoint before the failure is intact
    assert not list(out.glob(".*.tmp"))


def test_the_worker_a_signal_killed_first_is_named_not_the_one_the_launcher_stopped():
    """Worker 1 aborts (SIGABRT) and the launcher then stops worker 0 with SIGTERM: the line
    names worker 1, the cause, whatever the ranks' order; a lone SIGTERM is still named."""
    from types import SimpleNamespace

    from vaelab.train.launch import _first_failure

    failures = {
        0: SimpleNamespace(exitcode=-signal.SIGTERM, pid=100),
        1: SimpleNamespace(exitcode=-signal.SIGABRT, pid=101),
    }
    code, line = _first_failure([], failures, lambda: "resume with --resume")
    assert code == 2
    assert line == (
        "vaelab: error: worker 1 (pid 101) was killed by SIGABRT, which stopped the others; "
        "resume with --resume"
    )
    code, line = _first_failure([], {3: SimpleNamespace(exitcode=-signal.SIGTERM, pid=7)}, None)
    assert line == "vaelab: error: worker 3 (pid 7) was killed by SIGTERM, which stopped the others"


@pytest.mark.slow
def test_distributed_evaluation_gives_every_example_the_bytes_of_one_process(
    two_workers, tmp_path, capsys
):
    """IWAE-k and AIS split in batches of 100 among two workers (3 and 2 batches of 450
    examples): every example's numbers, and so every summary, are byte for byte those of one
    process."""
    options = ["--split", "train", "--examples", 450, "--k", 20, "--ais", 10, "--ais-chains", 2]
    options += ["--json", "-q"]
    code, single, err = vaelab_cli(
        capsys, "evaluate", two_workers, *options, "--per-example", tmp_path / "one.npz"
    )
    assert code == 0, err
    done = subprocess.run(
        vaelab_command(
            "evaluate", two_workers, *options, "--per-example", tmp_path / "two.npz", "--nproc", 2
        ),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(single)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(one.files) == ["ais", "elbo", "iwae"]
    for name in one.files:
        assert one[name].shape == (450,) and one[name].dtype == np.float64
        assert one[name].tobytes() == two[name].tobytes(), name
    assert np.all(one["ais"] > one["elbo"] - 5)  # numbers, not zeros: AIS near the ELBO or above


# ------------------------------------------------------------------ streams, shares, batches


def test_stream_keys_depend_on_every_part_and_on_nothing_else():
    keys = {stream_key(s, name, *parts) for s in (0, 1) for name in ("noise", "order")
            for parts in ((0, 0), (0, 1), (1, 0))}  # fmt: skip
    assert len(keys) == 12 and all(0 <= k < 2**63 for k in keys)
    assert stream_key(5, "noise", 2, 7) == stream_key(5, "noise", 2, 7)
    streams = TrainingStreams(5)
    first = streams.normal((2, 4, 3), epoch=1, batch=2)
    streams.normal((9,), epoch=0, batch=0)  # another draw in between changes nothing
    assert torch.equal(streams.normal((2, 4, 3), epoch=1, batch=2), first)


@pytest.mark.parametrize("n", [1, 5, 8, 13])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_shares_of_a_batch_are_contiguous_and_cover_it_once(n, size):
    shares = [World(rank, size).share(n) for rank in range(size)]
    assert shares[0].start == 0 and shares[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:], strict=False))
    lengths = [s.stop - s.start for s in shares]
    assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("size", [2, 3])
def test_each_worker_reads_its_share_of_the_batch_one_process_reads(size):
    """Rows, dynamic binarisation and position: the workers' shares, put side by side, are the
    batch of one process, bit for bit."""
    x = torch.rand(37, 5, generator=torch.Generator().manual_seed(0))
    source = IndexedBatches(x, 8, seed=4, binarize=True)
    for epoch in (0, 1):
        whole = list(source.batches(epoch))
        parts = [list(source.batches(epoch, 0, World(r, size).share)) for r in range(size)]
        for b, batch in enumerate(whole):
            pieces = [p[b] for p in parts]
            assert [p.rows for p in pieces] == [
                World(r, size).share(batch.size) for r in range(size)
            ]
            assert torch.equal(torch.cat([p.x for p in pieces]), batch.x)
    assert not torch.equal(list(source.batches(0))[0].x, list(source.batches(1))[0].x)


def test_the_noise_of_a_share_is_its_columns_of_the_batch_noise():
    config = TrainConfig(objective="iwae", k=3)
    trainer = Trainer(_model(), config, torch.device("cpu"), seed=9)
    trainer._streams, trainer._event, trainer._dtype = TrainingStreams(9), (2,), torch.float32
    source = IndexedBatches(torch.rand(11, 4), 11, seed=1)
    [whole] = source.batches(0)
    eps = trainer._noise(0, whole)
    assert eps.shape == (3, 11, 2)
    for rank in range(3):
        [part] = source.batches(0, 0, World(rank, 3).share)
        assert torch.equal(trainer._noise(0, part), eps[:, part.rows])


def _model():
    from vaelab.model.registry import ModelConfig, build_model

    return build_model(ModelConfig(data_shape=(4,), latent_dim=2, hidden=(8,)))


# ------------------------------------------------------------------------ out-of-core data


def test_a_folder_of_npy_shards_is_the_data_set_of_their_rows(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (103, 2, 3), dtype=np.uint8)
    np.save(tmp_path / "whole.npy", x)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, (lo, hi) in enumerate([(0, 40), (40, 40), (40, 97), (97, 103)]):  # one shard empty
        np.save(folder / f"part-{i:03d}.npy", x[lo:hi])
    whole, shards = load_data(str(tmp_path / "whole.npy")), load_data(str(folder))
    assert shards.record["format"] == "npy-shards" and shards.shape == (1, 2, 3)
    for name in ("train", "valid", "test"):
        a, b = getattr(whole, name), getattr(shards, name)
        assert np.array_equal(a.index, b.index) and np.array_equal(a[:], b[:])
    rows = NpyRows(sorted(folder.glob("*.npy")))
    order = np.random.default_rng(1).permutation(103)
    assert np.array_equal(rows[order], x[order]) and np.array_equal(rows[-1], x[-1])
    assert np.array_equal(rows[5:99:7], x[5:99:7])


def test_shards_that_disagree_are_refused_naming_both(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(DataError, match=r"'.*b\.npy' holds float32 \[4, 2\] but '.*a\.npy'"):
        load_data(str(tmp_path))


def _resident_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status")
def test_reading_a_large_file_leaves_the_resident_set_flat(tmp_path):
    """63 MB read in random batches of 1,000 rows: the resident set grows by less than 4 MB,
    where reading the same rows through np.load(mmap_mode="r") leaves much of the file mapped."""
    rows, width = 80_000, 784
    path = tmp_path / "x.npy"
    np.lib.format.open_memmap(path, "w+", np.uint8, (rows, width))[:] = 7
    order = np.random.default_rng(0).permutation(rows)
    read, before = NpyRows([path]), _resident_kb()
    total = 0
    for lo in range(0, rows, 1000):
        total += int(read[order[lo : lo + 1000]].sum(dtype=np.int64))
    grown = _resident_kb() - before
    mapped, before = np.load(path, mmap_mode="r"), _resident_kb()
    for lo in range(0, rows, 1000):
        mapped[order[lo : lo + 1000]].sum()
    assert total == 7 * rows * width
    assert grown < 4 * 1024, f"{grown} kB stayed resident"
    assert _resident_kb() - before > 16 * 1024  # what reading without a map avoids


def test_rows_of_a_fortran_ordered_file_and_of_a_forked_reader(tmp_path):
    x = np.asfortranarray(np.arange(60, dtype=np.float64).reshape(12, 5))
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "c.npy", np.ascontiguousarray(x))
    for name in ("f.npy", "c.npy"):
        rows = NpyRows([tmp_path / name])
        assert np.array_equal(rows[[3, 0, 11]], x[[3, 0, 11]]) and np.array_equal(rows[2:9], x[2:9])
    rows = NpyRows([tmp_path / "c.npy"])
    rows[0]  # opened here: a forked child must not share this process's descriptor state
    child = os.fork()
    if child == 0:
        os._exit(0 if np.array_equal(rows[[5, 1]], x[[5, 1]]) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.slow
def test_a_failed_worker_ends_at_once_and_a_lone_process_exits_normally(tmp_path):
    """`python -m vaelab` as a worker of two whose command fails prints its one line and ends
    with os._exit (no interpreter shutdown, where a live gloo group can abort with a C++ line);
    the same failure in a lone process exits through the interpreter's normal shutdown."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import atexit, sys\natexit.register(lambda: print('shut down', file=sys.stderr))\n"
    )
    line = "vaelab: error: `vaelab report` runs in one process; start it without torchrun"
    for world in ({"WORLD_SIZE": "2", "RANK": "1"}, {}):
        done = subprocess.run(
            vaelab_command("report", tmp_path / "no-run"),
            env=environment(PYTHONPATH=str(inject), **world),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        worker = bool(world)
        assert done.stderr.startswith(line) == worker, done.stderr
        assert done.stderr.endswith("shut down\n") == (not worker), done.stderr
