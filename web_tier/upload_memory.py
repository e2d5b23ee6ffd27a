"""How many bytes of uploads the web tier's one process holds in memory at once.

An upload's files are read whole, checked, and held until their S3 puts end: a chunk
of an /api/jobs request (16 files, up to MAX_UPLOAD_BYTES each), or the one file of a
POST /. Each request was bounded, and nothing bounded them together: 16 files of
9.7 MB held 156 MB while they were stored, and 20 such requests at once would have
held over 3 GB (reviewer), the out-of-memory kill the journal recovers from. So each
takes its bytes from one budget first, all of a chunk's at once (never some, then
waiting for more while holding them, which two requests could do to each other),
and waits its turn while others hold it.
"""

from __future__ import annotations

import logging
import threading
import time
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
    """The bytes the process's uploads may hold at once."""

    def __init__(self, budget: int = UPLOAD_MEMORY_BYTES, wait_s: float = UPLOAD_MEMORY_WAIT_S) -> None:
        self.budget, self.wait_s = budget, wait_s
        self.held = 0
        self.waiting = 0  # requests waiting for room
        self._room = threading.Condition()

    @contextmanager
    def taken(self, nbytes: int) -> Iterator[bool]:
        """Take `nbytes` (no more than the whole budget: a request as large always gets
        it, alone) for the block, waiting up to `wait_s` for room; the block is told
        whether it has them, and, if not, must not read its files."""
        nbytes = min(nbytes, self.budget)
        deadline = time.monotonic() + self.wait_s
        with self._room:
            self.waiting += 1
            while self.held + nbytes > self.budget:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._room.wait(left)
            self.waiting -= 1
            got = self.held + nbytes <= self.budget
            if got:
                self.held += nbytes
            else:
                log.warning("uploads hold %d bytes of %d in memory, %d more requests wait: refused "
                            "one of %d bytes after %.0f s", self.held, self.budget, self.waiting,
                            nbytes, self.wait_s)
        try:
            yield got
        finally:
            if got:
                with self._room:
                    self.held -= nbytes
                    self._room.notify_all()

