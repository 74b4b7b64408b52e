"""Run code under peer libraries (pythae, Pyro) in their own virtual environment.

The peers never enter vaelab's environment: pythae pins old versions of things, and a benchmark must
not change what the library under test runs on. They live in a separate venv, by default
``<repo>/.peers-venv`` (override with ``$VAELAB_PEERS_VENV``), created on first use so that
``make bench`` works on a fresh machine.

Both sides of this module are used:

- the benchmark (vaelab's venv) calls :func:`ensure_venv` and :func:`run`;
- the peer script (peers venv) calls :func:`read_job` and :func:`write_result`.

It also holds what every benchmark script records the same way: where the data are
(:func:`data_dir`), which other processes shared the CPU (:class:`ProcessWatch`), the versions
(:func:`versions`) and the result file (:func:`save_result`).

Arrays travel as one uncompressed ``.npz`` (numpy's own format, read with ``allow_pickle=False``),
everything else as JSON, through a temporary folder; nothing is pickled in either direction. This
file imports only the standard library and numpy, which both environments have.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
ENV_VAR = "VAELAB_PEERS_VENV"
DEFAULT_VENV = REPO_DIR / ".peers-venv"

# Same torch as the Makefile gives vaelab's .venv, so both sides run the same kernels. It goes in
# first and alone: pythae's bare `torch>=1.10.1` would otherwise pull a multi-GB CUDA build.
TORCH_REQUIREMENT = "torch==2.13.0"
PEER_REQUIREMENTS = ("pythae==0.1.2", "pyro-ppl")
STAMP_FILE = ".vaelab-peers.json"
FREEZE_FILE = "freeze.txt"

INPUTS = "inputs.npz"
ARGS = "args.json"
RESULT = "result.json"
OUTPUTS = "outputs.npz"


def venv_path() -> Path:
    """The peers venv: ``$VAELAB_PEERS_VENV`` if set, else ``<repo>/.peers-venv``."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured).expanduser().resolve() if configured else DEFAULT_VENV


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _wanted() -> dict[str, Any]:
    return {"torch": TORCH_REQUIREMENT, "peers": list(PEER_REQUIREMENTS)}


def _is_ready(venv: Path) -> bool:
    stamp = venv / STAMP_FILE
    if not (venv_python(venv).is_file() and stamp.is_file()):
        return False
    try:
        return json.loads(stamp.read_text()) == _wanted()
    except ValueError:
        return False


def ensure_venv(venv: Path | None = None, *, verbose: bool = True) -> Path:
    """Create and fill the peers venv unless it is already complete; returns its Python.

    A stamp file records the requirements it was built from; a venv built from other
    requirements (or interrupted half-way) is filled again. ``pip freeze`` goes to
    ``<venv>/freeze.txt`` so a result can name the exact versions it ran against.
    """
    venv = venv or venv_path()
    python = venv_python(venv)
    if _is_ready(venv):
        return python

    def step(*command: str) -> None:
        if verbose:
            print("peers venv:", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=None if verbose else subprocess.DEVNULL)

    if not python.is_file():
        step(sys.executable, "-m", "venv", str(venv))
    quiet = () if verbose else ("--quiet",)
    step(str(python), "-m", "pip", "install", *quiet, TORCH_REQUIREMENT)
    step(str(python), "-m", "pip", "install", *quiet, *PEER_REQUIREMENTS)
    check = "import pythae, pyro; from pythae.models import VAE, VAEConfig"
    step(str(python), "-c", check)
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True
    ).stdout
    (venv / FREEZE_FILE).write_text(freeze)
    (venv / STAMP_FILE).write_text(json.dumps(_wanted()))
    return python


def installed_versions(venv: Path | None = None) -> dict[str, str]:
    """``name → version`` from the venv's ``freeze.txt`` (empty if there is none)."""
    freeze = (venv or venv_path()) / FREEZE_FILE
    if not freeze.is_file():
        return {}
    pairs = (line.split("==", 1) for line in freeze.read_text().splitlines() if "==" in line)
    return {name.lower(): version for name, version in pairs}


@dataclass
class PeerResult:
    """What a peer job returned: its ``result.json``, its output arrays, and the wall time of the
    whole subprocess (interpreter start and imports included, unlike the job's own timings)."""

    result: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    wall_seconds: float = 0.0


def _peer_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    # Only this folder on the path: snippets can `import peers`; nothing from vaelab's venv leaks in.
    env["PYTHONPATH"] = str(BENCH_DIR)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(
    script: str | os.PathLike[str] | None = None,
    *,
    code: str | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    args: dict[str, Any] | None = None,
    venv: Path | None = None,
    timeout: float | None = None,
) -> PeerResult:
    """Run ``script`` (a file) or ``code`` (source text) with the peers venv's Python.

    The job gets one argument, a temporary folder holding ``inputs.npz`` (``arrays``) and
    ``args.json`` (``args``); it reads them with :func:`read_job` and answers with
    :func:`write_result`. The folder is deleted afterwards. A failing job raises
    ``RuntimeError`` carrying the end of its stderr.
    """
    if (script is None) == (code is None):
        raise ValueError("give exactly one of script= (a file) or code= (source text)")
    python = ensure_venv(venv)
    with tempfile.TemporaryDirectory(prefix="vaelab-peers-") as folder_name:
        folder = Path(folder_name)
        np.savez(folder / INPUTS, **(arrays or {}))
        (folder / ARGS).write_text(json.dumps(args or {}))
        if code is not None:
            script = folder / "snippet.py"
            script.write_text(code)
        assert script is not None
        start = time.perf_counter()
        completed = subprocess.run(
            [str(python), str(script), str(folder)],
            env=_peer_environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - start
        if completed.returncode != 0:
            tail = "\n".join(completed.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"peer job {script} failed ({completed.returncode}):\n{tail}")
        result_path = folder / RESULT
        if not result_path.is_file():
            raise RuntimeError(f"peer job {script} exited 0 but wrote no {RESULT}")
        result = json.loads(result_path.read_text())
        outputs: dict[str, np.ndarray] = {}
        if (folder / OUTPUTS).is_file():
            with np.load(folder / OUTPUTS, allow_pickle=False) as stored:
                outputs = {name: stored[name] for name in stored.files}
        return PeerResult(result, outputs, wall)


# ------------------------------------------------------------------------- the peer's side


def job_folder(argv: list[str] | None = None) -> Path:
    """The job folder :func:`run` passed as the script's only argument."""
    argv = sys.argv if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(f"usage: {Path(argv[0]).name} JOB_FOLDER (run it through bench/peers.py)")
    return Path(argv[1])


def read_job(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The job's ``args`` and ``arrays``."""
    args = json.loads((folder / ARGS).read_text())
    with np.load(folder / INPUTS, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    return args, arrays


def write_result(
    folder: Path, result: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
) -> None:
    """Answer a job: ``result`` as JSON (timings, estimates, versions), ``arrays`` as ``.npz``."""
    if arrays:
        np.savez(folder / OUTPUTS, **arrays)
    (folder / RESULT).write_text(json.dumps(result))


def save_result(report: dict[str, Any], kind: str, out: Path | None = None) -> Path:
    """Write a benchmark's report as JSON to ``out`` or ``bench/results/<kind>-<time>.json``."""
    target = out or BENCH_DIR / "results" / time.strftime(f"{kind}-%Y%m%d-%H%M%S.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {target}")
    return target


def data_dir(given: Path | None) -> Path:
    """The data folder: ``given``, else ``$VAELAB_DATA``, else ``../shared/data`` beside the repo."""
    return Path(given or os.environ.get("VAELAB_DATA") or REPO_DIR.parent / "shared" / "data")


def versions() -> dict[str, str]:
    """Versions of what the measured side runs on (read from package metadata, no imports)."""
    found = {"python": platform.python_version()}
    for package in ("vaelab", "torch", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_context(
    load_start: tuple[float, float, float], watch: ProcessWatch, argv: list[str] | None
) -> dict[str, Any]:
    """What a benchmark's numbers were measured beside, for its result file: the load averages
    at the start and now, the other processes that used the CPU (``watch``), the versions, the
    machine and the arguments (``argv``, None for the command line's)."""
    return {
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "other_processes": watch.busy(),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "argv": sys.argv[1:] if argv is None else argv,
    }


def process_cpu() -> dict[int, tuple[float, str]]:
    """CPU seconds used so far by every process, from ``ps``: pid → (seconds, command)."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid=,cputimes=,args="], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    found = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            found[int(parts[0])] = (float(parts[1]), parts[2][:120])
    return found


class ProcessWatch:
    """Which other processes use the CPU during the run, from ``ps`` snapshots taken at the start,
    after each configuration and at the end: a process's share is the CPU time it gained between
    the first and the last snapshot it appears in (from zero if it started after the first), over
    the run's wall time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[float, str]] = {}
        self.snapshot()

    def snapshot(self) -> None:
        initial = not self.last
        for pid, (cpu, command) in process_cpu().items():
            self.first.setdefault(pid, cpu if initial else 0.0)
            self.last[pid] = (cpu, command)

    def busy(self, threshold: float = 0.05) -> list[dict[str, Any]]:
        """Other processes that used at least ``threshold`` of a core, busiest first."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        busy = []
        for pid, (cpu, command) in self.last.items():
            share = (cpu - self.first[pid]) / seconds
            if pid != os.getpid() and share >= threshold:
                busy.append(
                    {"pid": pid, "percent_of_a_core": round(100 * share), "command": command}
                )
        return sorted(busy, key=lambda p: p["percent_of_a_core"], reverse=True)
