"""A local record of uploads stored but not yet queued, so that a killed web tier leaves none behind.

Each upload is stored in the input bucket, then its request is sent to the
request queue (in that order, so that a worker always finds the image a message
names). A web tier killed between the two (SIGKILL, the OOM killer) would leave
an image that no message names: queued for ever. So each request is written
here before its image is stored, and marked ended once it is queued (or
refused with its image not stored). A web tier takes over the requests a dead
process began and never ended, at its start and every minute after, and queues
the ones whose image is stored and not yet answered (`Submitter.requeue_unsent`;
at worst a second time, for a process killed just after sending one).

Each process appends to a file of its own and holds an exclusive lock on it
for its whole life: the kernel drops the lock when the process dies, however it
dies, so a file whose lock can be taken belongs to a dead process. A line
reaches the kernel when it is written (no buffering in this process), which
is all a killed process needs; a lost machine loses the file with the process.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from common.file_lock import LockHeld, lock_file

log = logging.getLogger(__name__)

SUFFIX = ".journal"
# A file holds every request begun since it was made; past this many lines it
# is replaced by one that holds only those not yet ended.
MAX_LINES = 20_000
_BEGIN, _END = "+", "-"
# How old a file left unnamed by a killed process must be before it is deleted.
UNNAMED_AGE_S = 60.0


def _line(mark: str, item_id: str, body: str = "") -> bytes:
    return f"{mark} {item_id} {body}\n".encode() if body else f"{mark} {item_id}\n".encode()


def read_pending(data: bytes) -> dict[str, str]:
    """The requests begun and not ended in a journal's bytes: {item id: request body}.

    A line cut short by a kill mid-write is skipped: its request was never stored.
    """
    pending: dict[str, str] = {}
    for raw in data.split(b"\n"):
        parts = raw.decode("utf-8", errors="replace").split(" ", 2)
        if len(parts) == 3 and parts[0] == _BEGIN and parts[2].endswith("}"):
            pending[parts[1]] = parts[2]
        elif len(parts) == 2 and parts[0] == _END:
            pending.pop(parts[1], None)
    return pending


class Journal:
    """This process's journal file in `directory`; safe to call from any number of threads.

    A journal that cannot write (a full disk) says so in the log and goes on: the
    upload matters more than its insurance. At risk meanwhile are only the
    uploads whose line was not written and that are between their S3 put and
    their SQS send when the process is killed.
    """

    def __init__(self, directory: Path, max_lines: int = MAX_LINES) -> None:
        self.directory = directory
        self.max_lines = max_lines
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {}
        self._path, self._fd = self._new_file()
        self._lines = 0
        self._failing = False
        self._torn = False  # the last write ended mid-line

    @property
    def path(self) -> Path:
        return self._path

    def begin(self, item_id: str, body: str) -> None:
        """Record a request about to be stored and sent."""
        with self._lock:
            self._pending[item_id] = body
            self._write(_line(_BEGIN, item_id, body))

    def end(self, item_id: str) -> None:
        """Record that a request is queued, or that its image is not stored."""
        with self._lock:
            if self._pending.pop(item_id, None) is None:
                return
            self._write(_line(_END, item_id))
            # Also not before the file holds twice what a new one would: with more pending
            # than max_lines (an S3 outage's uploads), every end rewrote them all, under the
            # lock every upload takes (20,000 pending: 168 ms an end).
            if self._lines >= max(self.max_lines, 2 * len(self._pending)):
                self._compact()

    def pending(self) -> dict[str, str]:
        with self._lock:
            return dict(self._pending)

    def adopt_orphans(self) -> dict[str, str]:
        """Take over the requests of dead processes' journals: begun again in this
        one, their files deleted. Returns them ({item id: request body}).

        A file that cannot be read, or copied here whole (a full disk), is left
        for a later call: deleted, what this journal lacks of it would be lost
        with this process."""
        self._remove_unnamed()
        adopted: dict[str, str] = {}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path == self._path:
                continue
            try:
                adopted.update(self._adopt(path))
            except OSError as exc:  # e.g. a file another user's web tier left
                log.error("cannot take over the journal %s (%s); trying again later", path, exc)
        return adopted

    def _remove_unnamed(self) -> None:
        """Delete the files a process killed while making a new journal left unnamed
        (_new_file): empty, or a compaction's copy the old file still has whole. Only
        once a minute old: a process that has just made one locks it a moment later."""
        for path in self.directory.glob(".*.new"):
            try:
                if time.time() - path.stat().st_mtime < UNNAMED_AGE_S:
                    continue
                fd = _lock_if_dead(path)
            except OSError:
                continue
            if fd is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:  # left to a later round; the requeue goes on
                    log.error("cannot delete the unnamed journal %s: %s", path, exc)
                finally:
                    os.close(fd)

    def _adopt(self, path: Path) -> dict[str, str]:
        fd = _lock_if_dead(path)
        if fd is None:
            return {}
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                orphans = read_pending(f.read())
            with self._lock:
                copied = all(self._write(_line(_BEGIN, i, body)) for i, body in orphans.items())
                if not copied:
                    return {}
                self._pending.update(orphans)
            # Only once they are in this journal (killed in between, they are in
            # both: sent twice at worst), and while still locked, so that no
            # other starting process reads it too.
            path.unlink(missing_ok=True)
            return orphans
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the file and let go of its lock, keeping the file: what is pending in
        it is another process's to adopt. Closed, a journal writes nothing more (tests
        close it to play a process's death)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _write(self, lines: bytes, count: int = 1) -> bool:
        """Append `lines` (`count` of them); whether they were written whole."""
        if self._fd < 0:
            return False
        # After a line cut short (a full disk), a line break first: appended to it, the
        # next line would be lost with it (read_pending skips a line it cannot read).
        data = memoryview(b"\n" + lines if self._torn else lines)
        try:
            while data:  # os.write may write only part of it, as on a disk filling up
                written = os.write(self._fd, data)
                if not written:
                    raise OSError(errno.ENOSPC, "the journal took nothing")
                self._torn = data[written - 1:written] != b"\n"
                data = data[written:]
        except OSError as exc:
            self._torn = True  # perhaps: an empty line costs nothing
            if not self._failing:
                log.error("cannot write the journal %s (%s): uploads stored until it can are lost if "
                          "this process is killed before they are queued", self._path, exc)
            self._failing = True
            return False
        if self._failing:
            log.warning("writing the journal %s again", self._path)
            self._failing = False
        self._lines += count
        return True

    def _new_file(self) -> tuple[Path, int]:
        """A new journal file, locked before it has a name that adopt_orphans looks at:
        unlocked under that name for a moment, a starting process would take it for
        a dead one's and delete it."""
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        making = self.directory / f".{name}.new"
        fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            path = self.directory / f"{name}{SUFFIX}"
            os.rename(making, path)  # the lock belongs to the file, whatever its name
        except OSError:
            os.close(fd)
            making.unlink(missing_ok=True)
            raise
        return path, fd

    def _compact(self) -> None:
        """Move to a new file holding only what is pending; on failure, keep the old one."""
        self._lines = 0  # failing, try again only after as many lines again
        if self._fd < 0:
            return
        try:
            path, fd = self._new_file()
        except OSError as exc:
            log.error("cannot start a new journal in %s (%s): %s grows on", self.directory, exc, self._path)
            return
        old_path, old_fd, old_torn = self._path, self._fd, self._torn
        self._path, self._fd, self._torn = path, fd, False
        written = self._write(b"".join(_line(_BEGIN, i, body) for i, body in self._pending.items()),
                              len(self._pending))
        if not written:  # the new file lacks some: the old one, which has them all, stays
            self._path, self._fd, self._torn = old_path, old_fd, old_torn
            os.close(fd)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # another process would adopt it: sent twice at worst
                log.error("cannot delete the unfinished journal %s: %s", path, exc)
            return
        # Killed before this, both files are read at the next start: sent twice at worst.
        try:
            old_path.unlink(missing_ok=True)
        except OSError as exc:  # read at the next start too: sent twice at worst, as above
            log.error("cannot delete the compacted journal %s: %s", old_path, exc)
        finally:
            os.close(old_fd)


def _lock_if_dead(path: Path) -> int | None:
    """`path` opened and locked if the process that wrote it is dead, else None
    (alive, or another process took the file first)."""
    try:
        return lock_file(path, os.O_RDONLY)
    except LockHeld:
        return None
