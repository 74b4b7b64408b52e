"""Starting a command's workers with torch's own launcher, and saying in one line why they stopped.

``vaelab train DATA --out DIR --nproc N`` (and ``evaluate``, ``gap``) runs the same command, without
``--nproc``, in N worker processes on this machine through ``torch.distributed.launcher`` (the API
behind ``torchrun --standalone --nproc-per-node N -m vaelab …``): rendezvous on the loopback
interface at a free port, no restarts, workers watched every 0.1 s. Each worker finds its rank in
its environment (``vaelab.train.distributed.session``). Workers die with the launcher
(:func:`stop_with_launcher`): killing the process the user started stops them all.

When a worker fails, the launcher stops the others (SIGTERM) within a fraction of a second, and
this process prints one line: the message of the worker that failed first. Workers do not print
their own errors here; each writes its exit code, its one-line message, whether it is the cause
(``primary``: a mistake, a bad batch, a diverged loss, an interruption) or a consequence (a
collective that lost its peer, a worker told to stop) and the time, to a file in a folder this
process makes (:data:`MESSAGES_ENV`). A worker killed without a word (SIGKILL, the OOM killer) is
named with its signal. Ctrl-C reaches the launcher, which passes SIGINT to every worker: they stop
after the same step, rank 0 saves a checkpoint, and its message is the one shown.

Under ``torchrun`` there is no such folder: every worker prints its own message and the launcher
its report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LAUNCHER_ENV", "MESSAGES_ENV", "launch", "stop_with_launcher", "worker_message"]

MESSAGES_ENV = "VAELAB_WORKER_MESSAGES"
LAUNCHER_ENV = "VAELAB_LAUNCHER_PID"  # the process whose death stops the workers
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
MONITOR_SECONDS = 0.1  # how often the launcher looks at its workers


def worker_message(code: int, line: str, primary: bool) -> bool:
    """Record this worker's exit ``code`` and one-line message for the process that launched it;
    False when no launcher of vaelab's asked for it (under ``torchrun``: print it instead)."""
    folder = os.environ.get(MESSAGES_ENV)
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    record = {"rank": int(rank), "code": code, "line": line, "primary": primary}
    record["time_ns"] = time.time_ns()
    path = Path(folder) / f"rank{rank}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record), encoding="utf-8")
    os.replace(temporary, path)  # the launcher reads it whole or not at all
    return True


def stop_with_launcher() -> None:
    """Have this worker of :func:`launch` receive SIGTERM when the launcher dies, so that a
    launcher killed by SIGKILL (or the OOM killer) leaves no worker training on while it holds the
    run's lock; SIGTERM, like Ctrl-C, stops training after the step, rank 0 saving a checkpoint.

    Linux only (``prctl(PR_SET_PDEATHSIG)``, prctl(2)); elsewhere, or not started by
    :func:`launch`, nothing. The signal comes when the *thread* that started the worker ends: the
    launcher starts its workers from its main thread (torch's agent runs in it), whose end is the
    process's. A launcher that died before the request was made never sends it: a worker whose
    parent is no longer the launcher stops at once."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes  # here: only workers on Linux need it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # refused (a seccomp filter): the worker runs on as it did before
    if os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGTERM)


def _messages(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob("rank*.json")):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(path.read_text(encoding="utf-8")))
    return found


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, for the workers to inherit; restored after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The launcher's own log lines (which worker it stops, its failure report) silenced: the
    one line this module prints says what matters."""
    # torch's elastic modules make their loggers with levels of their own: silence each.
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed")]
    loggers = [logging.getLogger(name) for name in ["torch.distributed", *names]]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _signal_name(exitcode: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(-exitcode).name
    return f"signal {-exitcode}"


def launch(
    argv: Sequence[str], nproc: int, advice: Callable[[], str] | None = None
) -> tuple[int, str | None]:
    """Run ``python -m vaelab ARGV`` in ``nproc`` workers on this machine and wait for them.

    Returns the exit code and the line to print (None when every worker succeeded): the first
    failing worker's message, or, when none left one, which worker a signal killed, followed by
    ``advice()`` (e.g. where the last checkpoint is). The workers get ``OMP_NUM_THREADS=1``
    unless it is set, and gloo the loopback interface unless ``GLOO_SOCKET_IFNAME`` is set.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from vaelab.train.distributed import _loopback_interface

    folder = Path(tempfile.mkdtemp(prefix="vaelab-workers-"))
    try:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"vaelab-{uuid.uuid4().hex}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port on the loopback interface
            max_restarts=0,
            monitor_interval=MONITOR_SECONDS,
            logs_specs=DefaultLogsSpecs(log_dir=str(folder / "launcher")),
        )
        environment = {
            MESSAGES_ENV: str(folder),
            LAUNCHER_ENV: str(os.getpid()),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME") or _loopback_interface(),
        }
        failures: dict[int, Any] = {}
        with _environment(environment), _quiet_launcher():
            try:
                elastic_launch(config, sys.executable)("-m", "vaelab", *argv)
            except ChildFailedError as error:
                failures = {int(rank): failure for rank, failure in error.failures.items()}
            except SignalException:
                pass  # Ctrl-C or SIGTERM here: the workers were told and have stopped
        messages = _messages(folder)
        if not failures and not messages:
            return 0, None
        return _first_failure(messages, failures, advice)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _first_failure(
    messages: list[dict[str, Any]],
    failures: dict[int, Any],
    advice: Callable[[], str] | None,
) -> tuple[int, str]:
    """The exit code and line that say why the workers stopped (see :func:`launch`)."""
    primary = [m for m in messages if m["primary"]]
    if primary:
        first = min(primary, key=lambda m: m["time_ns"])
        return int(first["code"]), str(first["line"])
    # The launcher stops the others with SIGTERM once one has failed: a worker that died of
    # another signal (SIGKILL, SIGABRT, SIGSEGV) is the cause and is named first.
    killed = sorted(
        (rank for rank, f in failures.items() if f.exitcode < 0),
        key=lambda rank: (failures[rank].exitcode == -signal.SIGTERM, rank),
    )
    silent = [rank for rank in killed if rank not in {m["rank"] for m in messages}]
    if silent:
        rank = silent[0]
        failure = failures[rank]
        line = f"vaelab: error: worker {rank} (pid {failure.pid}) was killed by "
        line += f"{_signal_name(failure.exitcode)}, which stopped the others"
    elif messages:
        first = min(messages, key=lambda m: m["time_ns"])
        return int(first["code"]), str(first["line"])
    else:
        rank = min(failures)
        line = f"vaelab: error: worker {rank} exited with code {failures[rank].exitcode}"
    if advice is not None:
        line += f"; {advice()}"
    return 2, line
