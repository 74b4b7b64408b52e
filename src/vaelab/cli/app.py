"""The ``vaelab`` command: what each command line parsed by ``vaelab.cli.parser`` runs, and its
messages, over the library, which does the work (``vaelab.runs.folder`` trains,
``vaelab.runs.evaluate``, ``inference_gaps`` and ``outputs`` evaluate, sample, reconstruct and
encode; the CLI only renders their typed results and translates a parameter's name to its flag).

    vaelab train DATA --out DIR [options]       train; DIR becomes a saved model
    vaelab evaluate DIR [--data DATA] [--json]  test-set ELBO, reconstruction and KL
    vaelab sample DIR -n N --out FILE           .png grid or .npy array
    vaelab reconstruct DIR --data DATA --out FILE.png
    vaelab encode DIR --data DATA --out Z.npy
    vaelab export DIR --format onnx --out FOLDER   encoder.onnx, decoder.onnx (vaelab[export])

A user mistake prints one line ``vaelab: error: ...`` and exits with code 2 (``--debug`` shows the
traceback instead), as do a run folder in use by another process and a full disk; Ctrl-C during
training saves a checkpoint and exits with 130; a diverged run exits with 1.

``train``, ``evaluate`` and ``gap`` take ``--nproc N``: the command runs on N workers started by
torch's launcher (``vaelab.train.launch``), and a failing worker stops them all with one line. Started
by ``torchrun`` instead, the same commands find their workers in the environment
(``vaelab.train.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from vaelab.cli.parser import PROG, UsageError, build_parser
from vaelab.data.sources import DATA_ENV
from vaelab.io.files import DiskFullError
from vaelab.report.content import ReportBudget
from vaelab.runs import folder as runs
from vaelab.runs import options as runconfig
from vaelab.runs.evaluate import active_units_text, evaluate
from vaelab.runs.inference_gaps import gap
from vaelab.runs.model_data import (
    ModelData,
    OpenedModel,
    model_data,
    open_model,
    output_path,
    save_arrays,
)
from vaelab.runs.options import ParameterError, check_at_least
from vaelab.runs.outputs import encode, export, reconstruct, sample
from vaelab.train import distributed
from vaelab.train.checkpoint import CheckpointError
from vaelab.train.distributed import World, attempt
from vaelab.train.progress import NonFiniteLossError, TrainingInterrupted

__all__ = ["COMMANDS", "build_parser", "main", "run"]


# ------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace, world: World) -> int:
    settings: dict[str, Any] = {}
    if args.config is not None:
        settings.update(runconfig.read_config_file(args.config))
    flags = {n: getattr(args, n) for n in runconfig.OPTIONS if n != "data" and hasattr(args, n)}
    if args.data is not None:
        flags["data"] = args.data
    if "data_dir" not in flags and "data_dir" not in settings and os.environ.get(DATA_ENV):
        flags["data_dir"] = os.environ[DATA_ENV]
    settings.update(flags)
    try:
        result = runs.train(settings, args.out, resume=args.resume, quiet=args.quiet, world=world)
    except TrainingInterrupted as stop:
        launched = os.environ.get("VAELAB_WORKER_MESSAGES") and world.size > 1
        again = f" --nproc {world.size}" if launched else ""
        raise TrainingInterrupted(
            f"{stop}; checkpoint saved in {args.out}: continue with "
            f"`vaelab train --out {args.out} --resume{again}`"
        ) from None
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"{error}; {_last_checkpoint(args.out)}") from None
    except DiskFullError as error:
        error.advice = _after_a_full_disk(args.out)
        raise
    if not world.main:
        return 0
    best = ""
    if result.best_epoch is not None:
        best = f" (the weights of epoch {result.best_epoch}, best by validation ELBO)"
    print(f"saved the model to {result.folder}{best}; next: vaelab evaluate {result.folder}")
    return 0


def _last_checkpoint(out: str) -> str:
    from vaelab.train.checkpoint import CHECKPOINT_FILE

    path = os.path.join(out, CHECKPOINT_FILE)
    if os.path.exists(path):
        return f"the last good checkpoint, {path}, is kept"
    return "no checkpoint had been written"


def _after_a_full_disk(out: str) -> str:
    try:
        checkpoint = runs.describe_checkpoint(out)
    except CheckpointError as error:
        return str(error)
    if checkpoint is None:
        return f"no checkpoint had been written: free some space, delete {out} and train again"
    return f"{checkpoint}; free some space and continue with `vaelab train --out {out} --resume`"


def _open(args: argparse.Namespace, *, compile: bool = False) -> OpenedModel:
    """The model folder of a command, opened once."""
    return open_model(args.model, args.device, compile=compile)


def _examples(args: argparse.Namespace, opened: OpenedModel, count: int | None) -> ModelData:
    """The examples a command reads: its --data / --split of the model's data, a random subset
    of ``count`` of them (all when None)."""
    return model_data(opened, args.data, _data_dir(args), args.split).subset(count)


def _open_examples(
    args: argparse.Namespace, world: World, count: int | None, *, compile: bool = False
) -> tuple[OpenedModel, ModelData]:
    """Every worker opens the model and its examples; a mistake found by one is reported once by
    all (``World.settle``)."""
    opened, failure = attempt(lambda: _open(args, compile=compile))
    world.settle(failure)
    assert opened is not None
    examples, failure = attempt(lambda: _examples(args, opened, count))
    world.settle(failure)
    assert examples is not None
    return opened, examples


def cmd_evaluate(args: argparse.Namespace, world: World) -> int:
    check_at_least(examples=(args.examples, 1))
    out = None if args.per_example is None else output_path(args.per_example, (".npz",))
    opened, examples = _open_examples(args, world, args.examples, compile=args.compile)
    result = evaluate(
        opened,
        examples,
        samples=args.samples,
        k=args.k,
        ais_steps=args.ais,
        ais_chains=args.ais_chains,
        diagnostics=not args.no_diagnostics,
        progress=_progress(args),
        world=world,
        exact=args.exact,
    )
    if result is None:  # a worker other than rank 0, which reports
        return 0
    if out is not None:
        save_arrays(out, **result.per_example)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    elbo = result.elbo
    rows = [
        ("model", result.model),
        ("data", result.examples_described),
        ("ELBO", f"{elbo.elbo:.4f} ± {elbo.standard_error:.4f} nats/example"),
        ("reconstruction", f"{elbo.reconstruction:.4f} nats/example"),
        ("KL", f"{elbo.kl:.4f} nats/example"),
        ("examples", f"{elbo.examples:,}"),
    ]
    iwae = result.iwae
    if iwae is not None:
        rows.append((iwae.bound, f"{iwae.mean:.4f} ± {iwae.standard_error:.4f} nats/example"))
        if iwae.bits_per_dim is not None:
            rows.append(("bits/dim", f"{iwae.bits_per_dim:.4f} ({iwae.bound})"))
        else:
            rows.append(("bits/dim", f"— {iwae.bits_per_dim_note}"))
    semi = result.semi_supervised
    if semi is not None:
        rows.append(
            (semi.bound, f"{semi.unlabelled_bound:.4f} ± {semi.standard_error:.4f} nats/example")
        )
        if semi.classification_error is not None:
            rows.append(
                (
                    "q(y|x) error",
                    f"{semi.classification_error:.4f} (argmax of q(y|x) against the labels)",
                )
            )
    found_ais = result.ais
    if found_ais is not None:
        rows.append(
            (
                found_ais.bound,
                f"{found_ais.mean:.4f} ± {found_ais.standard_error:.4f} nats/example "
                f"({found_ais.examples:,} examples, {found_ais.chains} chains, effective "
                f"sample size {found_ais.mean_effective_sample_size:.1f}, HMC acceptance "
                f"{found_ais.acceptance_rate:.2f})",
            )
        )
    exact = result.exact
    if exact is not None:
        rows.append(
            (
                "log p(x) exact",
                f"{exact.mean:.4f} ± {exact.standard_error:.4f} nats/example ({exact.states:,} "
                f"states summed, {exact.examples:,} examples, {exact.seconds:.2f} s)",
            )
        )
    found = result.diagnostics
    if found is not None:
        mi = found.mutual_information
        rows += [
            ("active units", active_units_text(found)),
            (
                "I(x; z)",
                f"— {found.mutual_information_note}"
                if mi is None
                else f"{mi.value:.4f} ± {mi.standard_error:.4f} nats",
            ),
            ("rate", f"{found.rate:.4f} nats/example"),
            ("distortion", f"{found.distortion:.4f} nats/example"),
        ]
        if found.kl_per_dimension is not None:
            kl = ", ".join(f"{v:.2f}" for v in found.kl_per_dimension.tolist())
            rows.append(("KL per dim", kl))
    for name, value in rows:
        print(f"{name:<16}{value}")
    return 0


def cmd_gap(args: argparse.Namespace, world: World) -> int:
    opened, examples = _open_examples(args, world, args.n)
    result = gap(
        opened,
        examples,
        k=args.k,
        steps=args.steps,
        use_ais=args.ais,
        progress=_progress(args),
        world=world,
    )
    if result is None:  # a worker other than rank 0, which reports
        return 0
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(
        f"{result.examples_described}; log p(x) by {result.log_px_method}; nats per example "
        "(mean ± standard error)"
    )
    print(f"{'':<20}" + "".join(f"{family:>22}" for family in result.families))
    summaries = [found.summary() for found in result.families.values()]
    for name in GAP_ROWS:
        cells = "".join(
            f"{summary[name][0]:>13.4f} ± {summary[name][1]:<6.4f}" for summary in summaries
        )
        print(f"{name:<20}{cells}")
    return 0


GAP_ROWS = (
    "log_px",
    "elbo_optimal",
    "elbo_amortised",
    "approximation_gap",
    "amortisation_gap",
    "total_gap",
)


def cmd_report(args: argparse.Namespace, world: World) -> int:
    from vaelab.report.content import write_model_report

    budget = ReportBudget(
        k=args.k,
        gap_examples=args.gap_examples,
        gap_steps=args.gap_steps,
        gap_k=args.gap_k,
    )
    budget.validate()
    path = write_model_report(
        args.model,
        args.out,
        data=args.data,
        data_dir=_data_dir(args),
        budget=budget,
        split=args.split,
        device=args.device,
        progress=_progress(args),
    )
    print(f"wrote {path}; open it in a browser")
    return 0


def cmd_sample(args: argparse.Namespace, world: World) -> int:
    check_at_least(n=(args.n, 1))
    output_path(args.out, (".png", ".npy"))
    path = sample(_open(args), args.n, args.out, seed=args.seed, label=args.label)
    of = "" if args.label is None else f" of class {args.label}"
    print(f"wrote {args.n} samples{of} to {path}")
    return 0


def cmd_reconstruct(args: argparse.Namespace, world: World) -> int:
    check_at_least(n=(args.n, 1))
    return _write_from_examples(args, reconstruct, "reconstructions", (".png", ".npy"), args.n)


def cmd_encode(args: argparse.Namespace, world: World) -> int:
    return _write_from_examples(args, encode, "latent codes", (".npy",), None)


def _write_from_examples(
    args: argparse.Namespace,
    write: Callable[[OpenedModel, ModelData, str], Path],
    what: str,
    suffixes: tuple[str, ...],
    count: int | None,
) -> int:
    """``reconstruct`` and ``encode``: check the output, open the model and its examples, write
    what ``write`` makes of them, and say so."""
    output_path(args.out, suffixes)
    opened = _open(args)
    examples = _examples(args, opened, count)
    path = write(opened, examples, args.out)
    print(f"wrote {what} of {examples.description} to {path}")
    return 0


def cmd_export(args: argparse.Namespace, world: World) -> int:
    exported = export(_open(args), args.out, args.format)
    for graph in (exported.encoder, exported.decoder):
        inputs = ", ".join(f"{t.name} {_shape(t.shape)}" for t in graph.inputs)
        outputs = ", ".join(f"{t.name} {_shape(t.shape)}" for t in graph.outputs)
        print(f"wrote {exported.folder / graph.file}: {inputs} -> {outputs}")
    print(f"wrote {exported.manifest} (the inputs' and outputs' shapes and meanings)")
    return 0


def _shape(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


COMMANDS: dict[str, Callable[[argparse.Namespace, World], int]] = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "gap": cmd_gap,
    "report": cmd_report,
    "sample": cmd_sample,
    "reconstruct": cmd_reconstruct,
    "encode": cmd_encode,
    "export": cmd_export,
}


# A library parameter whose flag is not --<parameter> (per command where they differ).
_FLAGS = {
    ("evaluate", "ais_steps"): "--ais",
    ("gap", "examples"): "--n",
    ("sample", "n"): "-n",
    ("reconstruct", "n"): "-n",
    ("reconstruct", "examples"): "-n",
}


def _flag(args: argparse.Namespace, parameter: str) -> str:
    """The command line's flag for a library parameter named in a ``ParameterError``."""
    command = str(getattr(args, "command", ""))
    return _FLAGS.get((command, parameter), "--" + parameter.replace("_", "-"))


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on stderr when it is a terminal and --quiet was not given."""
    return not args.quiet and sys.stderr.isatty()


def _data_dir(args: argparse.Namespace) -> str | None:
    return args.data_dir if args.data_dir is not None else os.environ.get(DATA_ENV) or None


# ---------------------------------------------------------------------------------------- main


LINE_LIMIT = 600  # characters of an error line: torch's messages can quote whole tensors


def _one_line(error: BaseException) -> str:
    """The error's message on one line, cut at ``LINE_LIMIT`` characters (``--debug`` shows the
    whole traceback)."""
    line = " ".join(str(error).split()) or type(error).__name__
    if len(line) <= LINE_LIMIT:
        return line
    return f"{line[:LINE_LIMIT].rstrip()} … ({len(line):,} characters; --debug shows them all)"


def _set_threads(threads: int | None, worker: bool) -> None:
    """Torch's CPU threads: ``--threads``, else one per worker of a data-parallel run (N workers
    with a thread per core each would oversubscribe the cores N times), else torch's default."""
    if threads is None:
        if worker:
            torch.set_num_threads(1)
        return
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def _without_nproc(arguments: list[str]) -> list[str]:
    """The command line as the workers run it: without ``--nproc N`` (or ``--nproc=N``)."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


def _launch(args: argparse.Namespace, arguments: list[str]) -> int:
    """Run the command on ``args.nproc`` workers (``vaelab.train.launch``) and print its one line."""
    from vaelab.train import launch

    advice = None
    if args.command == "train":

        def advice() -> str:
            return _after_a_stop(args.out, args.nproc)

    code, line = launch.launch(_without_nproc(arguments), args.nproc, advice)
    if line is not None:
        print(line, file=sys.stderr)
    return code


def _after_a_stop(out: str, nproc: int) -> str:
    try:
        checkpoint = runs.describe_checkpoint(out)
    except CheckpointError as error:
        return str(error)
    if checkpoint is None:
        return "no checkpoint had been written"
    return f"{checkpoint}; continue with `vaelab train --out {out} --resume --nproc {nproc}`"


def _check_world(args: argparse.Namespace, world_size: int | None) -> None:
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    if world_size is None or world_size == 1:
        return
    if nproc is not None:
        raise UsageError(
            "--nproc starts its own workers; under torchrun (or another launcher) leave it out"
        )
    if args.command not in DISTRIBUTED_COMMANDS:
        raise UsageError(
            f"`vaelab {args.command}` runs in one process; start it without torchrun "
            f"(these commands run on several: {', '.join(DISTRIBUTED_COMMANDS)})"
        )


DISTRIBUTED_COMMANDS = ("train", "evaluate", "gap")


def run() -> NoReturn:
    """The ``vaelab`` program: :func:`main`, then exit with its code.

    A worker of several whose command failed ends at once with ``os._exit``, once its output is
    flushed: its message is already handed on, its files are complete (every write is atomic),
    and what is left is its process group, whose teardown at exit while a peer is mid-collective
    can abort the process with a line of C++ ("terminate called ...") on the shared stderr."""
    code = main()
    if code and distributed.environment_world_size() not in (None, 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vaelab`` command; returns the exit code (0 ok, 1 diverged, 2 mistake, 130 Ctrl-C).

    As one worker of several (started by ``--nproc`` or ``torchrun``), an error is handed to
    the launcher (``vaelab.train.launch.worker_message``) or printed by the worker that caused it; a
    worker stopped by another's failure stays quiet."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments
    world_size = distributed.environment_world_size()
    worker = world_size is not None and world_size > 1
    rank = int(os.environ.get("RANK", "0")) if worker else 0
    if worker:
        from vaelab.train.launch import stop_with_launcher

        stop_with_launcher()  # before anything else: a launcher killed now takes this with it
    try:
        args = build_parser().parse_args(arguments)
        _check_world(args, world_size)
        if getattr(args, "nproc", None) is not None and args.nproc > 1:
            return _launch(args, arguments)
        _set_threads(args.threads, worker)
        with _one_line_warnings(), distributed.session() as world:
            return COMMANDS[args.command](args, world)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except UsageError as error:
        return _fail(2, f"{PROG}: error: {_one_line(error)}")
    except ParameterError as error:
        if debug:
            raise
        line = " ".join(f"{_flag(args, error.parameter)} {error.problem}".split())
        return _fail(2, f"{PROG}: error: {_worker(rank, world_size)}{line}")
    except distributed.PeerFailure:
        return _fail(2, "", primary=False)  # the worker that failed says why
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        if debug:
            raise
        line = f"{PROG}: {_one_line(stop) if str(stop) else 'interrupted'}"
        return _fail(130, line, primary=rank == 0)
    except NonFiniteLossError as error:
        if debug:
            raise
        return _fail(1, f"{PROG}: error: {_worker(rank, world_size)}{_one_line(error)}")
    except (ValueError, OSError) as error:
        if debug:
            raise
        return _fail(2, f"{PROG}: error: {_worker(rank, world_size)}{_one_line(error)}")
    except Exception as error:
        if debug or not worker:
            raise
        # A collective that lost its peer (gloo: "Connection closed by peer"), or the launcher's
        # SIGTERM after another worker failed: a consequence, not the cause.
        line = f"{PROG}: error: worker {rank} of {world_size} stopped: {_one_line(error)}"
        return _fail(2, line[:500], primary=False, show=True)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """vaelab's own warnings (a compilation that fell back to eager) as one line
    ``vaelab: warning: ...`` on stderr, without Python's file name and source line."""
    from vaelab.train.fastpath import CompileWarning

    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, CompileWarning):
            print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _worker(rank: int, world_size: int | None) -> str:
    """ "worker R of N: " before a message from a worker other than rank 0."""
    return f"worker {rank} of {world_size}: " if rank else ""


def _fail(code: int, line: str, *, primary: bool = True, show: bool | None = None) -> int:
    """Hand ``line`` to the launcher of this worker, else print it (a secondary one only when
    ``show``); return ``code``."""
    from vaelab.train.launch import worker_message

    if distributed.environment_world_size() not in (None, 1) and worker_message(
        code, line, primary
    ):
        return code
    if line and (primary or show):
        print(line, file=sys.stderr)
    return code
