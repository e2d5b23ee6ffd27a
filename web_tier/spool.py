"""Where the files of one upload request are held while it is served: in memory up to a
budget of the request's and one shared by every request's, then in one temporary file
for them all, its bytes taken from a budget shared by every request's file."""

from __future__ import annotations

import errno
import io
import os
import tempfile
import threading

# Werkzeug's own threshold: a larger file is held on disk.
IN_MEMORY_FILE_BYTES = 500 * 1024
# What the files of one request may hold in memory together. Under Werkzeug's per-file
# threshold alone, parsing 40 files of 400 KB peaked at 18 MB (tracemalloc), so a
# request of 1,000 such files held ~400 MB until it ended; now 9.8 MB. The page sends
# 8 MB at most per request, so its requests stay in memory.
IN_MEMORY_REQUEST_BYTES = 8 * 1024 * 1024
# What the files of all requests may hold in memory together while their forms are read;
# past it they go to disk. Each request's 8 MB alone let 30 requests waiting for
# UploadMemory's room hold 225 MiB beside its 256 MiB, and the 1,024 threads ~9 GiB: a
# t2.micro web instance has 1 GiB. The page sends up to 3 chunks of 8 MB at once.
IN_MEMORY_ALL_REQUESTS_BYTES = 64 * 1024 * 1024


class SharedBytes:
    """Bytes that the files of every request may hold together in one place: memory while
    their forms are read (IN_MEMORY_ALL_REQUESTS_BYTES), or the disk of their temporary
    files (WEB_SPOOL_BYTES). Each request is bounded, but alone nothing bounded them
    together."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Take `nbytes` more, if they fit."""
        with self._lock:
            if self.held + nbytes > self.budget:
                return False
            self.held += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class SpoolFull(OSError):
    """The temporary files of uploads hold all the disk they may: answered as a disk with no
    room is (web_tier/errors.py), 503, nothing stored."""


class RequestSpool:
    """The memory budget of one request's files, and the one temporary file those past it
    share. A temporary file each would take a descriptor each: 1,000 files of 16 KB past
    the budget would hold 1,000, and a few such requests, held open, leave the web tier
    none to accept connections with, /healthz included.

    Memory is taken from the request's budget and from `memory`, shared by all requests;
    disk from `disk`, shared too. Without the disk's, whoever may upload could fill the
    web host's disk, and with it the journal's (web_tier/journal.py). It is refused at
    once, not waited for: the request's body is arriving as it is written, and a client
    told 503 sends it again later."""

    def __init__(self, memory: SharedBytes, disk: SharedBytes,
                 memory_bytes: int = IN_MEMORY_REQUEST_BYTES) -> None:
        self.memory_left = memory_bytes
        self._memory, self._disk = memory, disk
        self._lock = threading.Lock()
        self._file: io.BufferedRandom | None = None
        self._end = 0  # where the next file's bytes go
        self._regions = 0  # open regions of the file: it is closed with the last

    def new_region(self) -> DiskRegion:
        """A region for one file's bytes, at the file's end. Werkzeug writes each file
        whole before it starts the next, so a region being written is the last one."""
        with self._lock:
            if self._file is None:
                self._file = tempfile.TemporaryFile("w+b")  # noqa: SIM115 - closed with its last region
                self._end = 0
            self._regions += 1
            return DiskRegion(self, self._file.fileno(), self._end)

    def take_memory(self, nbytes: int) -> bool:
        """Take `nbytes` of memory for a file, if both the request's budget and the shared
        one have them."""
        if nbytes > self.memory_left or not self._memory.take(nbytes):
            return False
        self.memory_left -= nbytes
        return True

    def give_memory(self, nbytes: int) -> None:
        self.memory_left += nbytes
        self._memory.give(nbytes)

    def grow(self, end: int) -> None:
        """Let the file reach `end`, its bytes taken from the disk budget (SpoolFull if
        refused), before they are written."""
        with self._lock:
            if end > self._end:
                if not self._disk.take(end - self._end):
                    raise SpoolFull(errno.ENOSPC, f"uploads hold {self._disk.held} bytes on disk of the "
                                                  f"{self._disk.budget} they may (WEB_SPOOL_BYTES)")
                self._end = end

    def region_closed(self) -> None:
        with self._lock:
            self._regions -= 1
            if self._regions == 0:
                self._release()

    def close(self) -> None:
        """The request has ended: its file is closed and its disk given back, whatever its
        regions. A form whose parsing failed (a file refused its disk) never handed
        Werkzeug the files it had begun, so nothing else would close them."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._disk.give(self._end)
            self._end = 0


class DiskRegion(io.RawIOBase):
    """One file's bytes in its request's temporary file, read and written by offset
    (pread, pwrite): several threads read a request's files at once, and the file has
    one position."""

    def __init__(self, spool: RequestSpool, fd: int, start: int) -> None:
        super().__init__()
        self._spool, self._fd, self._start = spool, fd, start
        self._size = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._spool.grow(self._start + self._size + len(view))
        written = 0
        while written < len(view):
            written += os.pwrite(self._fd, view[written:], self._start + self._size + written)
        self._size += written
        self._pos = self._size
        return written

    def readinto(self, buffer: bytearray | memoryview) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._start + self._pos)
        memoryview(buffer).cast("B")[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._spool.region_closed()


class CappedSpool:
    """Where Werkzeug writes one uploaded file as it parses the form.

    It keeps the file's first `limit` + 1 bytes and drops the rest: enough for
    read_limited to refuse the file as too large, while a file past the limit costs
    no more memory or disk than one at it (Werkzeug alone spools a 2 GB file to disk
    whole before its 413). It holds them in memory while the
    file is at most IN_MEMORY_FILE_BYTES and the memory budgets allow (RequestSpool),
    and otherwise in the request's temporary file. The rest of its methods are its
    current stream's.
    """

    def __init__(self, limit: int, spool: RequestSpool) -> None:
        self._stream: io.BytesIO | DiskRegion = io.BytesIO()
        self._spool = spool
        self._room = limit + 1
        self.in_memory = 0  # bytes held in memory, taken from the memory budgets

    def write(self, data: bytes) -> int:
        kept = data[:self._room]
        if not kept:
            return len(data)
        self._room -= len(kept)
        if isinstance(self._stream, io.BytesIO):
            held = self.in_memory + len(kept)
            if held <= IN_MEMORY_FILE_BYTES and self._spool.take_memory(len(kept)):
                self.in_memory = held
            else:
                self._to_disk()
        self._stream.write(kept)
        return len(data)

    def _to_disk(self) -> None:
        region = self._spool.new_region()
        region.write(self._stream.getvalue())
        self._stream.close()
        self._stream = region
        self._spool.give_memory(self.in_memory)
        self.in_memory = 0

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    # Looked up on the type, not through __getattr__ (FileStorage iterates its stream).
    def __iter__(self):
        return iter(self._stream)

    def __enter__(self) -> CappedSpool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()
        self._spool.give_memory(self.in_memory)
        self.in_memory = 0
