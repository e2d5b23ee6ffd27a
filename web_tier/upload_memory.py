"""How many bytes of uploads the web tier's one process holds in memory at once.

An upload's files are read whole, checked, and held until their S3 puts end: a chunk
of an /api/jobs request (16 files, up to MAX_UPLOAD_BYTES each), or the one file of a
POST /. Each request is bounded, but alone nothing bounds them together: 16 files of
9.7 MB hold 156 MB while they are stored, and 20 such requests at once would hold
over 3 GB, the out-of-memory kill the journal recovers from. So each
takes its bytes from one budget first, all of a chunk's at once (never some, then
waiting for more while holding them, which two requests could do to each other),
and waits its turn while others hold it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# A t2.micro web instance has 1 GiB; the process itself takes ~150 MB.
UPLOAD_MEMORY_BYTES = 256 * 1024 * 1024
# How long a request waits for room before it is refused (503, sent again later): as
# long as a chunk's S3 puts take at botocore's worst, with S3 slow.
UPLOAD_MEMORY_WAIT_S = 30.0
UPLOAD_MEMORY_FULL = ("not stored: the web tier holds as many uploads in memory as it may, and none "
                      "ended in time; send this file again")


class UploadMemory:
    """The bytes the process's uploads may hold at once, handed out first come, first
    served: a chunk of large files, waiting for most of the budget, is not passed for
    ever by smaller uploads that each fit."""

    def __init__(self, budget: int = UPLOAD_MEMORY_BYTES, wait_s: float = UPLOAD_MEMORY_WAIT_S) -> None:
        self.budget, self.wait_s = budget, wait_s
        self.held = 0
        self.closed = False
        self._queue: deque[object] = deque()  # one ticket per request waiting, in arrival order
        self._room = threading.Condition()

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._queue)

    def close(self) -> None:
        """The process is stopping: no request is given room any more, and those waiting
        stop at once (to be told so), not when gunicorn's grace ends and kills them."""
        with self._room:
            self.closed = True
            self._room.notify_all()

    @contextmanager
    def taken(self, nbytes: int) -> Iterator[bool]:
        """Take `nbytes` (no more than the whole budget: a request as large always gets
        it, alone) for the block, waiting up to `wait_s` for room, behind those that came
        first; the block is told whether it has them (not once closed), and, if not,
        must not read its files."""
        nbytes = min(nbytes, self.budget)
        got = self._take(nbytes)
        try:
            yield got
        finally:
            if got:
                with self._room:
                    self.held -= nbytes
                    self._room.notify_all()

    def _take(self, nbytes: int) -> bool:
        deadline = time.monotonic() + self.wait_s
        ticket = object()
        with self._room:
            self._queue.append(ticket)
            try:
                while not self.closed and (self._queue[0] is not ticket or self.held + nbytes > self.budget):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("uploads hold %d bytes of %d in memory, %d more requests wait: "
                                    "refused one of %d bytes after %.0f s", self.held, self.budget,
                                    len(self._queue) - 1, nbytes, self.wait_s)
                        return False
                    self._room.wait(left)
                if self.closed:
                    return False
                self.held += nbytes
                return True
            finally:
                self._queue.remove(ticket)
                self._room.notify_all()  # the next in line may fit now
