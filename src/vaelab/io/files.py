"""Writing files so that a crash never leaves half of one: write a sibling temporary file, flush it
to disk, then rename it over the target (``os.replace`` is atomic on POSIX file systems).

A write that fails because the disk (or the user's quota on it) is full raises ``DiskFullError``,
which names the file; the file itself is left as it was and no temporary file remains.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A file could not be written because its disk, or the user's quota there, is full.

    ``errno`` is ENOSPC or EDQUOT and ``filename`` the file, which was left as it was. ``advice``,
    set by a caller that knows more (the command line knows how to resume), ends the message.
    """

    advice = ""

    def __str__(self) -> str:
        text = f"cannot write {self.filename}: {self.strerror}"
        return f"{text}; {self.advice}" if self.advice else text


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before threads start.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` with ``data`` all at once: readers see the old file or the new, never a mix.

    The file gets the usual permissions (0o666 less the umask), not the owner-only ones of
    ``tempfile.mkstemp``. Raises ``DiskFullError`` when the disk or quota is full.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
                _write_durably(path, f, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the original error matters more than the clean-up
                os.unlink(tmp)
            raise
    except OSError as error:
        if error.errno in DISK_FULL:
            # The OS names no file (it was writing a temporary one): say which file it was.
            raise DiskFullError(error.errno, error.strerror, str(path)) from error
        raise
    return path


def _write_durably(path: Path, f: BinaryIO, data: bytes) -> None:
    """Write ``data`` through ``f``, the temporary file that will replace ``path``, and flush it to
    the disk. Every file's bytes pass here, so a test can fill the disk for one chosen file."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
