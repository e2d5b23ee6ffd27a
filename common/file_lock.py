"""Locks held on files for a process's life: the web tier's journals, the controller's
lock and each worker's journal lock.

flock's lock belongs to the open file, and the kernel drops it when its process
dies, however it dies: a file whose lock can be taken has no live holder. A file
is deleted while still locked by whoever ends with it, so a process that opened
it just before, and locks it just after, holds a file nobody can find again;
`lock_file` checks for that.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


class LockHeld(Exception):
    """Another open file, in this process or another, holds the lock."""


def lock_file(path: Path, flags: int) -> int | None:
    """`path` opened with `flags` (os.O_*) and locked, exclusive and without waiting;
    its file descriptor, to close to let go.

    Raises LockHeld if the lock is held. None if `path` names no file, or no longer
    the one opened (deleted or replaced meanwhile): a lock on it would guard nothing.
    """
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(str(path)) from None
    except FileNotFoundError:
        pass
    os.close(fd)
    return None


def hold(path: Path) -> int:
    """`path` locked for this process's life, with its pid written in it (holder() reads
    it back); its file descriptor. Its folder is made if need be (for this user only).

    Raises LockHeld if another holds it.
    """
    fd = None
    while fd is None:  # None: a holder ending deleted the file meanwhile; try the new one
        # In the loop: a folder deleted meanwhile (a temporary-file cleaner, `make clean`)
        # would make every try fail alike, for ever, at full speed.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = lock_file(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class HeldLock:
    """A lock file held (hold()) for this process's life, until released."""

    path: Path
    fd: int

    def release(self) -> None:
        """Delete the lock file and let go (a clean exit: no file left behind). Deleted
        while still locked, so that whoever locks next finds the file gone, and makes a
        new one (lock_file)."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def holder(path: Path) -> str:
    """The pid the lock's holder wrote in it ("unknown" if it cannot be read)."""
    try:
        return path.read_text(encoding="ascii", errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"
