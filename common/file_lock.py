"""Locks held on files for a process's life: the web tier's journals and the controller's lock.

flock's lock belongs to the open file, and the kernel drops it when its process
dies, however it dies: a file whose lock can be taken has no live holder. A file
is deleted while still locked by whoever ends with it, so a process that opened
it just before, and locks it just after, holds a file nobody can find again;
`lock_file` checks for that.
"""

from __future__ import annotations

import fcntl
import os
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
