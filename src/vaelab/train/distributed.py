"""The workers of a data-parallel run, as each worker sees them: its rank, how many there are, and
the few collective operations that training and evaluation need.

A worker is a process started by torch's launcher (``torchrun`` or ``vaelab … --nproc N``, see
``vaelab.train.launch``), which tells it ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and where to meet the
others. :func:`session` joins them: the ``gloo`` backend for CPU tensors and, where CUDA and NCCL
are there, ``nccl`` for CUDA tensors (one GPU per worker, ``cuda:LOCAL_RANK``). A single process,
or a launcher's world of one, is :data:`SINGLE`, whose collectives do nothing.

Only the run layer sees a ``World`` (the trainer, the run folder, the evaluation commands):
models, objectives, noise and data order never do.

Failures. A worker that fails writes its message and exits; a worker waiting for it in a
collective sees its connection close (gloo raises at once) and exits too, and the launcher stops
the rest. Collectives that wait for a worker that is alive but stuck give up after
``VAELAB_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT`), not gloo's 30 minutes.
:func:`settle` turns a mistake found while setting up (the same on every worker, or on one) into
one message from one worker and a quiet exit of the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = [
    "DEFAULT_TIMEOUT",
    "SINGLE",
    "TIMEOUT_ENV",
    "PeerFailure",
    "World",
    "environment_world_size",
    "session",
]

TIMEOUT_ENV = "VAELAB_DIST_TIMEOUT"
# Long enough for the slowest thing one worker does while the others wait (rank 0 writing a
# checkpoint or the model, the evaluation's summaries); a dead worker is noticed at once anyway.
DEFAULT_TIMEOUT = 300.0


class PeerFailure(Exception):
    """Another worker failed while setting up and reports why; this one stops without a message
    of its own, so the run says it once."""


@dataclass(frozen=True)
class World:
    """This worker's place among ``size`` workers (``rank`` 0 … size − 1; ``local_rank`` on its
    machine). ``World()`` is one process alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the worker that writes files and prints."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This worker's positions in a global batch of ``n``: the ``rank``-th of ``size``
        contiguous blocks, sizes differing by at most one (the first blocks may be one shorter)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    # ----------------------------------------------------------------------- collectives
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the workers, in place (every worker gets the same numbers)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object), on every worker."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every worker's ``value``, in rank order, on rank 0; None elsewhere."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        found: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(value, found, dst=0)
        return found

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def settle(self, error: BaseException | None) -> None:
        """After a phase every worker goes through (setting up), stop all of them if any failed:
        the lowest-ranked worker that failed raises its ``error``, every other one raises
        :class:`PeerFailure`. Returns when none failed."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        failed: list[int | None] = [None] * self.size
        dist.all_gather_object(failed, None if error is None else self.rank)
        ranks = [r for r in failed if r is not None]
        if not ranks:
            return
        first = min(ranks)
        if error is not None and self.rank == first:
            raise error
        raise PeerFailure(f"worker {first} failed while setting up")


SINGLE = World()


def environment_world_size() -> int | None:
    """``WORLD_SIZE`` as torch's launcher sets it for its workers; None outside a launcher."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def _loopback_interface() -> str:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in names if name.startswith("lo")), "lo")


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(
            f"{TIMEOUT_ENV}={text!r} is not a number of seconds; set it to e.g. 300"
        ) from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text}")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def session() -> Iterator[World]:
    """Join the workers torch's launcher started (or be :data:`SINGLE` outside one, or in a world
    of one) and leave the group at the end, together; on an error, leave it as it is.

    The backend is gloo for CPU tensors, and NCCL for CUDA tensors where torch has both; each
    worker then uses ``cuda:LOCAL_RANK``. When every worker runs on this machine and
    ``GLOO_SOCKET_IFNAME`` is not set, gloo is pinned to the loopback interface: a host name that
    resolves to an address no interface carries would otherwise stop gloo from connecting.
    """
    size = environment_world_size()
    if size is None or size == 1:
        yield SINGLE
        return
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    if local_size == size and not os.environ.get("GLOO_SOCKET_IFNAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        if local_rank < torch.cuda.device_count():  # else the run refuses CUDA, naming the count
            torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=_timeout())
    yield World(rank=rank, size=size, local_rank=local_rank)
    # Leave together: a worker that tears its group down while another still talks to it
    # (rank 0 saving the model, DDP's last reduction in flight) can make gloo's threads in the
    # other abort the process at exit ("terminate called without an active exception"). A
    # worker that failed does not tear its group down at all: it ends at once (``vaelab.cli.app.run``)
    # and the system closes its connections, which the others see as their peer gone.
    dist.barrier()
    dist.destroy_process_group()


T = TypeVar("T")


def attempt(action: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """``action()`` and None, or None and the exception it raised: what every worker hands to
    ``World.settle``, so a mistake found by one is reported once by all."""
    try:
        return action(), None
    except Exception as error:
        return None, error
