"""The ``vaelab`` command line's grammar: one argparse parser per command, from shared option
groups, and the ``Parser`` whose errors are one line. ``vaelab.cli.app`` runs what it parses.

``train`` has one option per ``vaelab.runs.options.RunConfig`` field (:func:`add_train_options`), so
``--help``, the TOML keys and ``config.json`` agree; the commands that read a saved model share
``DIR`` and ``--device``, and those that read data share ``--data``, ``--split`` and ``--data-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import torch

from vaelab import __version__
from vaelab.data.sources import DATA_ENV, SOURCES
from vaelab.report.content import ReportBudget
from vaelab.runs import options as runconfig
from vaelab.runs.model_data import SPLITS
from vaelab.runs.outputs import EXPORT_FORMATS

__all__ = ["PROG", "Parser", "UsageError", "add_train_options", "build_parser"]

PROG = "vaelab"
# Where each group of RunConfig's options begins, for --help.
GROUPS = {
    "data_dir": "data",
    "latent_dim": "model",
    "epochs": "training",
    "checkpoint_every": "checkpoints",
    "layer_free_bits": "training that survives",
}


METAVARS = {"int": "N", "float": "X", "str": "NAME", "hidden": "SIZES", "latent": "N[,N]"}
METAVARS["float~"] = "X"


class UsageError(Exception):
    """A command line argparse refused."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (raised, so ``main`` prints them) instead of usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _run_option(name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return runconfig.convert(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name.replace("_", "-")  # argparse names the type in some messages
    return parse


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``RunConfig`` field, so --help, the TOML keys and config.json agree."""
    group: Any = parser
    for f in dataclasses.fields(runconfig.RunConfig):
        if f.name == "data":
            continue
        if f.name in GROUPS:
            group = parser.add_argument_group(f"{GROUPS[f.name]} options")
        meta = f.metadata
        default = _default_text(f.default)
        if f.name == "data_dir":
            default = f"${DATA_ENV}"
        help_text = f"{meta['help']} (default: {default})"
        if meta["kind"] == "bool":  # a switch: --compile / --no-compile
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{meta['help']} (default: off)",
            )
            continue
        metavar = METAVARS[meta["kind"].rstrip("?")] if f.name != "data_dir" else "DIR"
        if meta["choices"]:
            metavar = "{" + ",".join(meta["choices"]) + "}"
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_run_option(f.name),
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=help_text,
        )


def build_parser() -> Parser:
    """The ``vaelab`` parser: ``--version`` and one sub-parser per command (``args.command``)."""
    parser = Parser(
        prog=PROG,
        description="Variational autoencoders from the command line.",
        formatter_class=_formatter,
        epilog=f"Run `{PROG} COMMAND --help` for the options of each command.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {__version__} (torch {torch.__version__})",
        help="print the versions of vaelab and torch",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    shared = _SharedOptions(
        common=_common_options(),
        reading=_reading_options(),
        with_data=_data_options(),
        long_work=_long_work_options(),
    )
    for add in (
        _train_parser,
        _evaluate_parser,
        _gap_parser,
        _report_parser,
        _sample_parser,
        _reconstruct_parser,
        _encode_parser,
        _export_parser,
    ):
        add(commands, shared)
    return parser


# ------------------------------------------------------------------------ shared option groups


@dataclass(frozen=True)
class _SharedOptions:
    """Option groups that several commands take (argparse ``parents``)."""

    common: Parser  # --debug, --threads: every command
    reading: Parser  # DIR, --device: every command that reads a saved model
    with_data: Parser  # --data, --split, --data-dir: ... and data
    long_work: Parser  # --quiet: ... and may take a while

    @property
    def evaluating(self) -> list[Parser]:
        """The groups of a command that evaluates a saved model on data."""
        return [self.common, self.reading, self.with_data]


def _common_options() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core); on a machine others "
        "share, 1 keeps small models from waiting on busy cores",
    )
    return common


def _parallel_options(what: str) -> Parser:
    """``--nproc N``: run ``what`` on N worker processes (train, evaluate, gap)."""
    found = Parser(add_help=False)
    found.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help=f"{what} on N worker processes on this machine, started by torch's launcher "
        "(torch.distributed.run), one thread each unless --threads says otherwise; for "
        "several machines use torchrun (see the README)",
    )
    return found


def _reading_options() -> Parser:
    reading = Parser(add_help=False)  # every command that reads a saved model
    reading.add_argument(
        "model", metavar="DIR", help="a model folder (vaelab train --out / VAE.save)"
    )
    reading.add_argument(
        "--device",
        metavar="NAME",
        help="auto, cpu or cuda (default: where the model was trained when that device exists "
        "here, else the CPU)",
    )
    return reading


def _data_options() -> Parser:
    with_data = Parser(add_help=False)  # ... and data
    with_data.add_argument(
        "--data",
        metavar="DATA",
        help="a data set name or path (default: the data the model was trained on)",
    )
    with_data.add_argument(
        "--split",
        choices=SPLITS,
        help="which examples: the model's own test split by default (for its training data and "
        "for named data sets), all examples of another file",
    )
    _data_dir_option(with_data)
    return with_data


def _long_work_options() -> Parser:
    long_work = Parser(add_help=False)  # ... and may take a while
    long_work.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars (shown on a terminal)"
    )
    return long_work


# ------------------------------------------------------------------------------------ commands

Commands: TypeAlias = "argparse._SubParsersAction[Parser]"  # what add_subparsers returns


def _train_parser(commands: Commands, shared: _SharedOptions) -> None:
    train = commands.add_parser(
        "train",
        parents=[shared.common, _parallel_options("train data-parallel (DistributedDataParallel)")],
        formatter_class=_formatter,
        help="train a model; the output folder is itself a saved model",
        description=(
            "Train a VAE on DATA and save it in DIR (open it with vaelab.load(DIR)).\n\n"
            f"DATA is a data set name ({', '.join(SOURCES)}) or a path to\n"
            "a .npy / .npz / .csv file, a folder of images or an IDX file.\n\n"
            "Options come from the defaults, then --config FILE.toml (keys as the long option\n"
            "names, e.g. latent-dim = 16, hidden = [400, 400]), then the command line. DIR gets\n"
            "config.json (the resolved options), checkpoint.safetensors, metrics.jsonl,\n"
            "tensorboard/ and, when training ends, the model (model.safetensors, vaelab.json).\n"
            "Ctrl-C saves a checkpoint; --resume continues from it exactly.\n\n"
            "--nproc N trains on N workers, each taking its share of every batch of\n"
            "--batch-size examples (the global batch); the run is the same as on one process\n"
            "up to the order of floating-point sums, and resumes on any number of workers."
        ),
    )
    train.add_argument("data", metavar="DATA", nargs="?", help="data set name or path")
    train.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="run folder (new, or resumed)"
    )
    train.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in DIR from its last checkpoint, with its saved configuration",
    )
    train.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar: one log line per epoch"
    )
    add_train_options(train)


def _evaluate_parser(commands: Commands, shared: _SharedOptions) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        parents=[
            *shared.evaluating,
            shared.long_work,
            _parallel_options(
                "split the examples among workers (the numbers are those of one process): run IWAE and AIS"
            ),
        ],
        help="test-set ELBO, KL and reconstruction of a saved model",
        description=(
            "Mean ELBO (a lower bound on log p(x)), reconstruction term and KL, in nats per example, "
            "on the model's own test split (another with --split or --data). Data is scaled and "
            "binarised as it was for training."
        ),
    )
    evaluate.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    evaluate.add_argument(
        "--samples",
        type=int,
        default=16,
        metavar="L",
        help="Monte Carlo samples per example for the reconstruction term (default: 16)",
    )
    evaluate.add_argument(
        "--k",
        type=int,
        metavar="K",
        help="also estimate log p(x) by importance sampling with K samples per example (IWAE-K, "
        "e.g. 5000), with its standard error, and bits per dimension where they are defined",
    )
    evaluate.add_argument(
        "--ais",
        type=int,
        metavar="S",
        help="also estimate log p(x) by annealed importance sampling with S intermediate "
        "distributions and HMC transitions (Neal 2001; Wu et al. 2017): tighter than IWAE at "
        "large S (e.g. 3000) and far slower, so pair it with --examples",
    )
    evaluate.add_argument(
        "--ais-chains",
        type=int,
        default=16,
        metavar="C",
        help="independent AIS chains per example (default: 16)",
    )
    evaluate.add_argument(
        "--exact",
        action="store_true",
        help="also compute log p(x) exactly by summing over every state of a discrete code "
        "(--latent bernoulli or categorical; up to 2^20 states)",
    )
    evaluate.add_argument(
        "--examples",
        type=int,
        metavar="N",
        help="evaluate a random subset of N examples (seeded: the same every time)",
    )
    evaluate.add_argument(
        "--per-example",
        metavar="FILE.npz",
        help="also write each example's numbers (float64 arrays elbo, and iwae / ais when "
        "asked, in the order of the examples evaluated) to an .npz file",
    )
    evaluate.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="leave out the collapse diagnostics (active units, KL per dimension, I(x; z), rate, "
        "distortion)",
    )
    evaluate.add_argument(
        "--compile",
        action="store_true",
        help="run the decoder's log p(x|z) through torch.compile (faster IWAE / AIS / ELBO after "
        "a compilation of seconds to a minute; the same numbers to float rounding)",
    )


def _gap_parser(commands: Commands, shared: _SharedOptions) -> None:
    gap = commands.add_parser(
        "gap",
        parents=[
            *shared.evaluating,
            shared.long_work,
            _parallel_options(
                "split the examples among workers (the numbers are those of one process): run the gaps"
            ),
        ],
        help="approximation and amortisation gaps of a saved model",
        description=(
            "The inference gap (Cremer, Li & Duvenaud 2018) on a random subset of N examples: "
            "log p(x) − ELBO(amortised q) split into the approximation gap log p(x) − ELBO(q*), "
            "where q* is the best member of a family for each example (optimised with the decoder "
            "frozen), and the amortisation gap ELBO(q*) − ELBO(amortised q); for each family that "
            "contains the amortised q (diagonal and full covariance for a diagonal encoder, full "
            "only for a full one), in nats per example with standard errors."
        ),
    )
    gap.add_argument("--n", type=int, default=500, metavar="N", help="examples (default: 500)")
    gap.add_argument(
        "--k",
        type=int,
        default=5000,
        metavar="K",
        help="importance samples for log p(x) (default: 5000)",
    )
    gap.add_argument(
        "--steps",
        type=int,
        default=2000,
        metavar="S",
        help="optimisation steps of the per-example q* (default: 2000)",
    )
    gap.add_argument(
        "--ais",
        action="store_true",
        help="estimate log p(x) by annealed importance sampling instead of IWAE-K",
    )
    gap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _report_parser(commands: Commands, shared: _SharedOptions) -> None:
    budget = ReportBudget()
    report = commands.add_parser(
        "report",
        parents=[*shared.evaluating, shared.long_work],
        help="one self-contained HTML page about a saved model",
        description=(
            "Write DIR/report.html: training curves, a metrics table (ELBO, IWAE-K, inference "
            "gaps, active units, I(x; z)), samples, reconstructions, the latent space coloured by "
            "label, the 2-D latent manifold, interpolations and the KL per dimension. The default "
            "budget takes about a minute on 10,000 MNIST images: IWAE on a random subset, the "
            "gaps on a smaller one; the options below buy more."
        ),
    )
    report.add_argument(
        "--out", "-o", metavar="FILE.html", help="output file (default: DIR/report.html)"
    )
    report.add_argument(
        "--k",
        type=int,
        default=budget.k,
        metavar="K",
        help=f"importance samples of the IWAE-K estimate; 0 leaves it out (default: {budget.k})",
    )
    report.add_argument(
        "--iwae-examples",
        type=_count_or_all,
        default=budget.iwae_examples,
        metavar="N",
        help=f"random examples for IWAE-K, or 'all' (default: {budget.iwae_examples})",
    )
    report.add_argument(
        "--gap-examples",
        type=int,
        default=budget.gap_examples,
        metavar="N",
        help=f"random examples for the inference gaps; 0 leaves them out (default: "
        f"{budget.gap_examples})",
    )
    report.add_argument(
        "--gap-steps",
        type=int,
        default=budget.gap_steps,
        metavar="S",
        help=f"optimisation steps of each example's q* (default: {budget.gap_steps})",
    )
    report.add_argument(
        "--gap-k",
        type=int,
        default=budget.gap_k,
        metavar="K",
        help=f"importance samples of the gaps' log p(x) (default: {budget.gap_k})",
    )


def _sample_parser(commands: Commands, shared: _SharedOptions) -> None:
    sample = commands.add_parser(
        "sample",
        parents=[shared.common, shared.reading],
        help="draw samples from a saved model",
        description=(
            "Decoder means at z ~ p(z): a PNG grid (image data) or an [n, ...] .npy array. A "
            "conditional model draws z ~ p(z|y) and decodes given y, the class --label."
        ),
    )
    sample.add_argument(
        "-n", type=int, default=64, metavar="N", help="how many samples (default: 64)"
    )
    sample.add_argument("--out", "-o", required=True, metavar="FILE", help="output .png or .npy")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    sample.add_argument(
        "--label",
        metavar="CLASS",
        help="the class to draw, for a conditional model (a label of its data, or a class "
        "folder's name)",
    )


def _reconstruct_parser(commands: Commands, shared: _SharedOptions) -> None:
    reconstruct = commands.add_parser(
        "reconstruct",
        parents=shared.evaluating,
        help="reconstruct examples through a saved model",
        description=(
            "N random examples of DATA (rows of originals) over their reconstructions E[x|z] at "
            "the posterior mean, as a PNG; or a [2, N, ...] .npy array (originals, reconstructions)."
        ),
    )
    reconstruct.add_argument(
        "--out", "-o", required=True, metavar="FILE.png", help="output .png or .npy"
    )
    reconstruct.add_argument(
        "-n", type=int, default=10, metavar="N", help="how many examples (default: 10)"
    )


def _encode_parser(commands: Commands, shared: _SharedOptions) -> None:
    encode = commands.add_parser(
        "encode",
        parents=shared.evaluating,
        help="posterior means of every example, as .npy",
        description="Posterior means E_q[z|x] of every example of DATA, [n, latent] float32, in file order.",
    )
    encode.add_argument("--out", "-o", required=True, metavar="Z.npy", help="output .npy file")


def _export_parser(commands: Commands, shared: _SharedOptions) -> None:
    export = commands.add_parser(
        "export",
        parents=[shared.common, shared.reading],
        help="the model's encoder and decoder as ONNX graphs",
        description=(
            "encoder.onnx (input x; outputs loc, the posterior mean, and the posterior's "
            "parameters) and decoder.onnx (input z; outputs mean, the decoder mean, and the "
            "likelihood's parameters) in FOLDER, with vaelab-onnx.json describing them; a "
            "conditional model's graphs also take y, the one-hot condition. Needs `pip install "
            "vaelab[export]`. Flow posteriors and several stochastic layers are refused."
        ),
    )
    export.add_argument(
        "--format", choices=EXPORT_FORMATS, default="onnx", help="the format (default: onnx)"
    )
    export.add_argument(
        "--out", "-o", required=True, metavar="FOLDER", help="output folder (created if needed)"
    )


def _count_or_all(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of examples or 'all', got {text!r}"
        ) from None


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"folder of named data sets (default: ${DATA_ENV}, else the one used for training)",
    )
