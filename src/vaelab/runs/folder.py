"""A training run in a folder: what ``vaelab train`` does.

``train`` turns a configuration (``vaelab.runs.options.RunConfig``) into a run folder that is itself a
saved model (``vaelab.load(folder)`` opens it):

- ``config.json``: the resolved configuration, written before training starts;
- ``checkpoint.safetensors``: the latest checkpoint (``vaelab.train.checkpoint``), replaced atomically at
  every epoch end and every ``checkpoint_every`` steps / ``checkpoint_seconds`` seconds;
- ``metrics.jsonl``: one JSON object per finished epoch; ``tensorboard/``: the same as event files;
- ``model.safetensors`` and ``vaelab.json``: the final model (the best by validation ELBO), written by
  ``vaelab.estimator.serialization.save_model`` when training ends, with the data record, the configuration
  and a summary of the run in ``vaelab.json`` (and a conditional model's classes);
- ``.vaelab.lock``: an OS lock (``flock``) held by the one process training in the folder, with that
  process's PID inside while it holds it (``RunLock``).

Every option and the data are checked before the folder is created, so a mistake leaves nothing
behind; a second process that finds the folder locked changes nothing and names the holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from vaelab.data.npyrows import NpyRows
from vaelab.data.sources import LABELS_NOT_USED, DataSplits, Split, load_data
from vaelab.estimator.facade import VAE, resolve_device
from vaelab.estimator.serialization import CONFIG_FILE, WEIGHTS_FILE
from vaelab.io.files import DISK_FULL, DiskFullError, atomic_write_bytes, atomic_write_json
from vaelab.model.conditioning import one_hot
from vaelab.model.registry import ModelConfig
from vaelab.model.semi_supervised import classification_weight
from vaelab.model.vae_model import VAEModel
from vaelab.runs.labelled import choose_labelled, drop_labels
from vaelab.runs.options import RunConfig, RunError, config_from_json, resolve
from vaelab.train.batches import IndexedBatches
from vaelab.train.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointPolicy,
    Tensors,
    checkpoint_from_bytes,
    load_checkpoint,
)
from vaelab.train.distributed import SINGLE, World, attempt
from vaelab.train.labelled_batches import semi_supervised_batches
from vaelab.train.progress import EpochMetrics
from vaelab.train.start import INIT_EXAMPLES, start_model, start_training
from vaelab.train.trainer import Trainer, TrainingObserver

RUN_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".vaelab.lock"
VALID_BATCH = 1000
LOG_INTERVAL = 1.0  # seconds between epoch lines


@dataclass
class TrainResult:
    """What ``train`` did: the fitted estimator, the epochs run and where things are."""

    estimator: VAE
    history: list[EpochMetrics]
    folder: Path
    best_epoch: int | None
    stopped_early: bool


def _train_data(split: Split) -> Any:
    """A memory-mapped or ``.npy`` split stays on disk and is read per batch; anything else
    becomes one float32 tensor, indexed per batch without per-example calls."""
    if isinstance(split.stored, (np.memmap, NpyRows)):
        return split
    return torch.from_numpy(np.asarray(split))


def class_labels(splits: DataSplits) -> np.ndarray:
    """The classes of a data set with labels, sorted: those of every split, so that an example
    of the test split has its column too. Data without labels is refused in a sentence."""
    labelled = [s.labels for s in (splits.train, splits.valid, splits.test) if len(s)]
    if any(labels is None for labels in labelled):
        # An array that looked like labels but could not be used says why in a note.
        why = [n for n in splits.record.get("notes", []) if LABELS_NOT_USED in n]
        raise RunError(
            f"--conditional trains on the examples' class labels, and {splits.name} has none"
            f"{f' ({why[0]})' if why else ''}; give data with labels (digits, MNIST or an IDX "
            "folder with its labels files, an image folder with a subfolder per class, an .npz "
            "file with an integer or string labels or y array)"
        )
    return np.unique(np.concatenate([np.asarray(labels) for labels in labelled]))


def _conditions(split: Split, classes: np.ndarray | None) -> np.ndarray | None:
    """A split's one-hot conditions for a conditional run, ``[n, classes]``; None otherwise."""
    return None if classes is None else one_hot(split.labels, classes)


def check_support(model: Any, splits: DataSplits) -> None:
    """The likelihood's support check on the data's recorded range (min and max of every split)."""
    low, high = splits.record["range"]
    model.likelihood.check_support(torch.tensor([low, high], dtype=torch.float32))


def _prepare_folder(folder: Path, resume: bool) -> None:
    """Refuse a folder that does not fit ``resume``; reads, never writes."""
    if resume:
        if not (folder / RUN_CONFIG_FILE).is_file():
            what = "does not exist" if not folder.exists() else f"has no {RUN_CONFIG_FILE}"
            raise RunError(
                f"cannot resume: {folder} {what}, so it is not a vaelab training run; drop --resume "
                "to start a new run"
            )
        if not (folder / CHECKPOINT_FILE).is_file():
            raise RunError(
                f"cannot resume: {folder} has no {CHECKPOINT_FILE} (the run stopped before its first "
                "checkpoint); delete the folder and train again without --resume"
            )
        return
    # A lock file alone is what a run that failed before writing anything leaves: still empty.
    if folder.exists() and (
        not folder.is_dir() or any(p.name != LOCK_FILE for p in folder.iterdir())
    ):
        if (folder / RUN_CONFIG_FILE).is_file():
            raise RunError(
                f"{folder} already holds a training run; pass --resume to continue it, or choose "
                "another --out"
            )
        raise RunError(f"{folder} already exists and is not empty; choose a new --out folder")


def _remove_leftovers(folder: Path) -> None:
    """A process killed while writing leaves the temporary file of an atomic write behind."""
    for name in (CHECKPOINT_FILE, METRICS_FILE, RUN_CONFIG_FILE, WEIGHTS_FILE, CONFIG_FILE):
        for leftover in folder.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


class RunLock:
    """An exclusive OS lock on a run folder: one process at a time checks, trains in or resumes it.

    The lock is ``flock`` on ``.vaelab.lock`` in the folder, which holds the PID of the process
    holding it, so another process can say whose it is; it is emptied on release. The OS drops the
    lock when its holder dies, even by SIGKILL, so a stale file never blocks a run. The file itself
    is never deleted: a process that opened it just before the deletion would lock a file nobody
    else can see, and two processes would hold "the" lock.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, create: bool) -> None:
        """Take the lock unless it is held already. Without ``create``, a folder without a lock
        file (or one this user cannot write) is left unlocked, to be locked once it is written.
        Raises ``RunError`` naming the holder when another process has it; nothing is changed."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            if create:
                raise
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # Only for the others' messages: a full disk may refuse even these few bytes.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def holder(self) -> str | None:
        """Who holds the lock now ("process 1234"), or None when nobody does; takes nothing.

        flock has no query, so this takes a shared lock for an instant: a run starting in that
        instant is refused as in use, as it would be a moment later by any reader of the folder.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file: no run ever held the folder
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        finally:
            os.close(fd)  # which drops a shared lock taken
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        finally:
            os.close(fd)  # which drops the lock


def _holder(fd: int) -> str:
    """The process holding the lock open on ``fd``, as its PID written in the file says."""
    # The holder writes its PID just after locking: give it a moment if we looked in between.
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"process {text}"
        time.sleep(0.01)
    return "another process"


def _fingerprint(path: Path) -> tuple[int, int, int]:
    # Checkpoints are replaced by os.replace, so a new one is a new inode with a new mtime.
    found = path.stat()
    return found.st_ino, found.st_size, found.st_mtime_ns


def describe_position(position: Mapping[str, Any]) -> str:
    """Where a checkpoint's ``position`` stands, in words: "epoch 2, step 5 of 23 (optimiser step
    28)", "the end of epoch 1 (...)" or "the end of training, epoch 2 (...)"."""
    epoch, batch = position["epoch"], position["batch"]
    if position["finished"]:
        where = f"the end of training, epoch {epoch}"
    elif batch == 0:
        where = f"the end of epoch {epoch}"
    else:
        where = f"epoch {epoch + 1}, step {batch} of {position['steps_per_epoch']}"
    return f"{where} (optimiser step {position['step']})"


def describe_checkpoint(folder: str | os.PathLike[str]) -> str | None:
    """The run's checkpoint, read back and checked, in words for a message after a failure; None
    when there is none. Raises ``CheckpointError`` when it cannot be used."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    _, state = load_checkpoint(path)
    return (
        f"the last checkpoint, {path}, is intact: it holds {describe_position(state['position'])}"
    )


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM ask the trainer to checkpoint and stop after the current step; a
    second Ctrl-C stops at once."""

    def handle(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        trainer.request_stop()

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(
    settings: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    quiet: bool = False,
    log: TextIO | None = None,
    world: World = SINGLE,
) -> TrainResult:
    """Train a model as ``settings`` (``RunConfig`` field names → values) say, in folder ``out``.

    With ``resume``, continue the run in ``out`` from its checkpoint with its saved configuration;
    ``settings`` may then only repeat it (or change where data lives, the device and the checkpoint
    cadence). Raises ``RunError`` / ``DataError`` / ``CheckpointError`` (all ``ValueError``) for a
    mistake, before anything is written, and ``RunError`` when another process holds the folder;
    ``TrainingInterrupted`` after Ctrl-C, with a checkpoint saved; ``NonFiniteLossError`` when
    training diverges, leaving the last good checkpoint; ``vaelab.io.files.DiskFullError`` when the
    disk fills, leaving the last checkpoint intact.

    On several workers (``world``, ``vaelab.train.distributed``) every worker calls it with the same
    arguments. Rank 0 alone touches the folder: it holds the lock, reads the configuration and
    checkpoint of a resumed run and sends them to the others (so the folder need only be
    visible to rank 0's machine; the data must be readable on every machine), writes every
    file, and prints. Each worker loads the data itself and reads only its share of each batch;
    a mistake found on any worker stops all of them with that worker's message
    (``World.settle``; the others raise ``vaelab.train.distributed.PeerFailure``).
    """
    lock = RunLock(Path(out))
    try:
        return _train_locked(settings, Path(out), lock, resume, quiet, log or sys.stdout, world)
    finally:
        lock.release()


def _check_folder(folder: Path, resume: bool, lock: RunLock) -> None:
    # A folder in use is refused before anything is looked at, and locked while it is checked.
    lock.acquire(create=False)
    try:
        _prepare_folder(folder, resume)
    except RunError:
        # A run that started here after the first look has its lock by now: name its process
        # rather than complain about the files it has begun to write.
        lock.acquire(create=False)
        raise


def _read_run(
    folder: Path, resume: bool, lock: RunLock
) -> tuple[str | None, bytes | None, tuple[int, int, int] | None]:
    """Check the folder (locking it when it exists) and, to resume, read its configuration's
    text and its checkpoint's bytes (rank 0's part, which it sends to the other workers), with
    the checkpoint's fingerprint as it was read."""
    _check_folder(folder, resume, lock)
    if not resume:
        return None, None, None
    config_text = (folder / RUN_CONFIG_FILE).read_bytes().decode("utf-8", errors="replace")
    seen = _fingerprint(folder / CHECKPOINT_FILE)
    return config_text, (folder / CHECKPOINT_FILE).read_bytes(), seen


def _train_locked(
    settings: Mapping[str, Any],
    folder: Path,
    lock: RunLock,
    resume: bool,
    quiet: bool,
    log: TextIO,
    world: World,
) -> TrainResult:
    found, failure = (None, None)
    if world.main:
        found, failure = attempt(lambda: _read_run(folder, resume, lock))
    world.settle(failure)
    seen = found[2] if found is not None else None  # rank 0's alone
    config_text, checkpoint_bytes = world.broadcast(None if found is None else found[:2])
    setup, failure = attempt(
        lambda: _set_up(settings, folder, config_text, checkpoint_bytes, world)
    )
    world.settle(failure)
    assert setup is not None
    config, trainer, checkpoint = setup.config, setup.trainer, setup.checkpoint

    # Everything is checked: from here on rank 0 writes the folder.
    def prepare_folder() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if not lock.held:
            lock.acquire(create=True)
            # Another process may have trained here while this one checked.
            _prepare_folder(folder, resume)
            if resume and _fingerprint(folder / CHECKPOINT_FILE) != seen:
                raise RunError(
                    f"another process trained in {folder} while this one was starting; run the "
                    "command again to resume from its checkpoint"
                )
        _remove_leftovers(folder)
        if not resume:
            atomic_write_json(folder / RUN_CONFIG_FILE, config.to_json())

    world.settle(attempt(prepare_folder)[1] if world.main else None)
    observer: TrainingObserver = TrainingObserver()
    run_log = None
    if world.main:
        run_log = RunLog(folder, config.epochs, quiet, log, resumed_epochs=trainer.epoch)
        observer = run_log
        if resume and trainer.finished:
            print(f"{folder}: training had finished; writing the model again", file=log)
        elif checkpoint is not None:
            where = describe_position(checkpoint[1]["position"])
            workers = f" on {world.size} workers" if world.size > 1 else ""
            print(f"resuming {folder} from {where}{workers}", file=log, flush=True)
        elif world.size > 1:
            print(f"training on {world.size} workers", file=log, flush=True)
    trainer.observer = observer
    try:
        with _stop_on_signals(trainer):
            history = trainer.fit(setup.batches, setup.valid)
    finally:
        if run_log is not None:
            run_log.close()

    estimator = config.estimator()
    estimator._set_fitted(trainer.model, setup.model_config, setup.device, history, setup.classes)
    best_epoch = None
    if trainer.best_valid is not None:
        best_epoch = next(m.epoch for m in history if m.valid_elbo == trainer.best_valid)
    stopped_early = len(history) < config.epochs
    summary = {
        "epochs_run": len(history),
        "steps": trainer.step,
        # What this process did: a resumed run continues, it does not redo the finished steps.
        "resumed_from_step": None if checkpoint is None else checkpoint[1]["position"]["step"],
        "steps_this_process": trainer.steps_taken,
        "workers": world.size,
        "stopped_early": stopped_early,
        "best_epoch": best_epoch,
        "best_valid_elbo": trainer.best_valid,
    }
    if world.main:
        estimator.save(
            folder,
            extra={
                "data": setup.splits.record,
                "run": config.to_json(),
                "training": summary,
                **_labelled_record(setup),
            },
        )
    return TrainResult(estimator, history, folder, best_epoch, stopped_early)


@dataclass
class _RunSetup:
    """Every worker's preparation of a run, before anything is written."""

    config: RunConfig
    splits: DataSplits
    model_config: ModelConfig
    device: torch.device
    trainer: Trainer
    batches: IndexedBatches
    valid: IndexedBatches | None
    checkpoint: tuple[Tensors, dict[str, Any]] | None
    classes: np.ndarray | None  # a conditional run's classes
    labelled: np.ndarray | None = None  # a semi-supervised run's labelled training examples


def _set_up(
    settings: Mapping[str, Any],
    folder: Path,
    config_text: str | None,
    checkpoint_bytes: bytes | None,
    world: World,
) -> _RunSetup:
    """Every worker's preparation, before anything is written: the configuration, the data, the
    model, the batches, the trainer, restored from the checkpoint when resuming. Raises a
    ``ValueError`` (a ``RunError``, ``DataError`` or ``CheckpointError``) for any mistake."""
    saved, checkpoint = None, None
    if config_text is not None:
        path = folder / RUN_CONFIG_FILE
        try:
            saved_json = json.loads(config_text)
        except json.JSONDecodeError as error:
            raise RunError(
                f"{path} is not valid JSON ({error}); the run folder is corrupt"
            ) from None
        saved = config_from_json(saved_json, path)
    if checkpoint_bytes is not None:
        checkpoint = checkpoint_from_bytes(checkpoint_bytes, folder / CHECKPOINT_FILE)
    config = resolve(settings, saved)
    config.validate()

    splits = load_data(
        config.data,  # type: ignore[arg-type]  # validate() refused None
        data_dir=config.data_dir,
        binarize=config.binarize,
        threshold=config.threshold,
        valid_fraction=config.valid_fraction,
        test_fraction=config.test_fraction,
        seed=config.split_seed,
        scale=config.scale,
    )
    if config.patience is not None and len(splits.valid) == 0:
        raise RunError("--patience needs validation data; set --valid-fraction above 0")
    device = _worker_device(resolve_device(config.device), world)
    _check_batches(len(splits.train), config.batch_size, world)
    train_data = _train_data(splits.train)
    classes = class_labels(splits) if config.conditional else None
    train_conditions = _conditions(splits.train, classes)
    model_config = config.model_config(splits.shape, 0 if classes is None else len(classes))
    train_config, labelled = config.train_config(), None
    if config.labelled is not None and train_conditions is not None and classes is not None:
        labelled = choose_labelled(
            np.asarray(splits.train.labels), classes, config.labelled, config.split_seed
        )
        train_conditions = drop_labels(train_conditions, labelled)
        weight = classification_weight(
            None, len(splits.train), config.labelled, mean=config.labelled_batch_size == 0
        )
        train_config = dataclasses.replace(train_config, classification_weight=weight)
    dynamic = splits.binarize == "dynamic"

    def check(model: VAEModel) -> None:
        try:
            check_support(model, splits)
        except ValueError as error:
            raise RunError(str(error)) from None

    def build(streams_seed: int) -> tuple[VAEModel, ModelConfig, IndexedBatches]:
        first = torch.as_tensor(np.asarray(train_data[:INIT_EXAMPLES]))
        model = start_model(model_config, device, first, check=check)
        if labelled is not None:  # M2 draws its labelled examples apart
            batches = semi_supervised_batches(
                train_data,
                config.batch_size,
                streams_seed,
                binarize=dynamic,
                condition=train_conditions,
                labelled_batch_size=config.labelled_batch_size,
            )
        else:
            batches = IndexedBatches(
                train_data,
                config.batch_size,
                streams_seed,
                binarize=dynamic,
                condition=train_conditions,
            )
        return model, model_config, batches

    valid = None
    if len(splits.valid):
        valid = IndexedBatches(
            _train_data(splits.valid),
            VALID_BATCH,
            shuffle=False,
            condition=_conditions(splits.valid, classes),
        )
    policy = CheckpointPolicy(
        path=folder / CHECKPOINT_FILE,
        every_steps=config.checkpoint_every or None,
        every_seconds=config.checkpoint_seconds or None,
        extra={"run": config.to_json()},
    )
    with start_training(
        config.seed,
        device,
        build,
        train_config,
        checkpoint=policy,
        world=world,
        compile=config.compile,
    ) as start:
        trainer, source = start.trainer, start.batches
    try:
        first_conditions = None
        if train_conditions is not None:
            first_conditions = torch.from_numpy(train_conditions[:2])
        trainer.check(torch.as_tensor(np.asarray(train_data[:2])), first_conditions)
    except ValueError as error:
        raise RunError(str(error)) from None
    if checkpoint is not None:
        try:
            trainer.restore(*checkpoint, source)
        except (KeyError, RuntimeError, ValueError) as error:
            raise RunError(
                f"the checkpoint in {folder} does not fit this run ({error}); "
                "delete the folder and train again without --resume"
            ) from None
    return _RunSetup(
        config, splits, model_config, device, trainer, source, valid, checkpoint, classes, labelled
    )


def _labelled_record(setup: _RunSetup) -> dict[str, Any]:
    """A semi-supervised run's entry of ``vaelab.json``: the positions in the training split of
    the examples that kept their labels, and their count per class."""
    if setup.labelled is None or setup.classes is None:
        return {}
    labels = np.asarray(setup.splits.train.labels)[setup.labelled]
    return {
        "labelled": {
            "examples": setup.labelled.tolist(),
            "per_class": {str(c): int((labels == c).sum()) for c in setup.classes},
        }
    }


def _worker_device(device: torch.device, world: World) -> torch.device:
    """The device of this worker: on several workers a CUDA device is ``cuda:LOCAL_RANK``, one
    GPU per worker on each machine."""
    if world.size == 1 or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise RunError(
            f"worker {world.rank} is worker {world.local_rank + 1} on its machine, which has "
            f"{count} GPU(s): start at most {count} workers per machine, or pass --device cpu"
        )
    return torch.device("cuda", world.local_rank)


def _check_batches(examples: int, batch_size: int, world: World) -> None:
    """Every worker needs at least one example of every batch, the last one of an epoch too."""
    smallest = min(batch_size, examples - (len(range(0, examples, batch_size)) - 1) * batch_size)
    if smallest < world.size:
        raise RunError(
            f"{examples} training examples in batches of {batch_size} leave {smallest} in the "
            f"last batch of each epoch, fewer than the {world.size} workers; choose a batch size "
            "that leaves at least one example for each worker, or fewer workers"
        )


def _survival(metrics: EpochMetrics) -> str:
    """The epoch line's note of skipped updates and rollbacks, when there were any."""
    notes = [f"skipped updates: {metrics.skipped_updates}"] if metrics.skipped_updates else []
    notes += [f"rollbacks: {metrics.rollbacks}"] if metrics.rollbacks else []
    return f"  [{', '.join(notes)}]" if notes else ""


class RunLog(TrainingObserver):
    """A progress bar per epoch (tqdm, on a terminal, unless ``quiet``), one line per epoch on
    ``log``, ``metrics.jsonl`` rewritten atomically from the history, and TensorBoard scalars."""

    def __init__(
        self, folder: Path, epochs: int, quiet: bool, log: TextIO, resumed_epochs: int = 0
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow to import; only training needs it

        self.folder, self.epochs, self.quiet, self.log = folder, epochs, quiet, log
        # purge_step hides events a killed run wrote after its checkpoint.
        self.writer = SummaryWriter(
            str(folder / TENSORBOARD_DIR), purge_step=resumed_epochs + 1 if resumed_epochs else None
        )
        self.bar: Any = None
        self._shown, self._logged = 0.0, -math.inf
        self._lines: list[str] = []  # metrics.jsonl, one line per epoch of trainer.history

    def epoch_start(self, trainer: Trainer, epoch: int, start: int, steps: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=steps,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            unit="batch",
            leave=False,
            disable=None,  # no bar when stderr is not a terminal: the epoch lines remain
            dynamic_ncols=True,
        )
        self._started, self._examples = time.perf_counter(), 0

    def step(self, trainer: Trainer, batch_size: int) -> None:
        if self.bar is None:
            return
        self._examples += batch_size
        self.bar.update(1)
        now = time.perf_counter()
        if now - self._shown > 0.5:
            self._shown = now
            elbo, reconstruction, kl = trainer.running_means()
            rate = self._examples / max(now - self._started, 1e-9)
            self.bar.set_postfix_str(
                f"ELBO {elbo:.2f}  KL {kl:.2f}  rec {reconstruction:.2f}  {rate:,.0f} ex/s",
                refresh=False,
            )

    def epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        now = time.perf_counter()
        # Short epochs would flood the terminal: a line a second at most, and always the last one
        # (metrics.jsonl has every epoch).
        if trainer.finished or now - self._logged >= LOG_INTERVAL:
            self._logged = now
            valid = "" if metrics.valid_elbo is None else f"  valid ELBO {metrics.valid_elbo:.3f}"
            if metrics.valid_error is not None:
                valid += f"  valid error {metrics.valid_error:.4f}"
            bound = "" if metrics.iwae is None else f"IWAE-{trainer.config.k} {metrics.iwae:.3f}  "
            print(
                f"epoch {metrics.epoch}/{self.epochs}: {bound}ELBO {metrics.elbo:.3f}  "
                f"KL {metrics.kl:.3f}  reconstruction {metrics.reconstruction:.3f}{valid}  "
                f"({metrics.examples_per_second:,.0f} ex/s){_survival(metrics)}",
                file=self.log,
                flush=True,
            )
        # History only grows: each epoch is serialised once, the file rewritten whole (atomically).
        for m in trainer.history[len(self._lines) :]:
            self._lines.append(json.dumps(m.to_dict()) + "\n")
        atomic_write_bytes(self.folder / METRICS_FILE, "".join(self._lines).encode())
        scalars = {
            "train/elbo": metrics.elbo,
            "train/reconstruction": metrics.reconstruction,
            "train/kl": metrics.kl,
            "train/lr": metrics.lr,
            "train/kl_weight": metrics.kl_weight,
            "train/examples_per_second": metrics.examples_per_second,
        }
        if metrics.valid_elbo is not None:
            scalars["valid/elbo"] = metrics.valid_elbo
        if metrics.iwae is not None:
            scalars["train/iwae"] = metrics.iwae
        if metrics.valid_error is not None:
            scalars["valid/error"] = metrics.valid_error
        scalars["train/skipped_updates"] = metrics.skipped_updates
        scalars["train/rollbacks"] = metrics.rollbacks
        if len(metrics.kl_per_layer) > 1:
            for layer, kl in enumerate(metrics.kl_per_layer, 1):
                scalars[f"train/kl_layer_{layer}"] = kl
        with self._tensorboard():
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, metrics.epoch)
            self.writer.flush()

    def rolled_back(self, trainer: Trainer, reason: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(
            f"rollback {trainer.rollbacks} of {trainer.config.max_rollbacks}: {reason.split(';')[0]}"
            f"; back to epoch {trainer.epoch + 1}, step {trainer.batch}, learning rate x"
            f"{trainer.lr_factor:g}",
            file=self.log,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        with self._tensorboard():
            self.writer.close()

    @contextlib.contextmanager
    def _tensorboard(self) -> Iterator[None]:
        """TensorBoard writes from a thread of its own and reports a full disk later, as a bare
        ``[Errno 28]``: name its folder, as ``atomic_write_bytes`` names its files."""
        try:
            yield
        except OSError as error:
            if error.errno in DISK_FULL and not isinstance(error, DiskFullError):
                folder = str(self.folder / TENSORBOARD_DIR)
                raise DiskFullError(error.errno, error.strerror, folder) from error
            raise
