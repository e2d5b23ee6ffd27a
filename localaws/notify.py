"""systemd's side of the service notifications, for the local runner and stack.

On an instance, systemd gives the worker NOTIFY_SOCKET and WATCHDOG_USEC
(ami/imgclass-worker.service: Type=notify, WatchdogSec=60), hears READY=1 and
then WATCHDOG=1 pings, and kills a worker whose pings stop with SIGABRT (the
worker's faulthandler writes its threads' stacks to its log) before restarting
it. The runner does the same for its worker processes, so that a worker that
hangs holding Python's lock is replaced locally too, and the worker's side of
the protocol (common/systemd.py) runs in every local stack. `make run` watches
its controller the same way (localaws/stack.py). When a silent process is aborted,
then killed, is decided by localaws/supervision.py.

One datagram socket per process, so the runner knows who sent a message
without SO_PASSCRED (Linux only). They live in a temporary folder, in /tmp
when TMPDIR's path is long: a socket's path is limited to 104 bytes on macOS
and 108 on Linux.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from common.file_lock import LockHeld, hold, lock_file

# Room for the file name ("<n>.sock") under the shortest limit.
MAX_FOLDER_CHARS = 80


class NotifySocket:
    """Where one worker process sends READY=1 and WATCHDOG=1, and what it last sent."""

    def __init__(self, path: Path, watchdog_s: float) -> None:
        self.path = path
        self.watchdog_s = watchdog_s
        self.last_heard: float | None = None  # None until READY=1: systemd counts from there
        self.status = ""  # the last STATUS= sent
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(str(path))
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)

    def env(self) -> dict[str, str]:
        """What systemd puts in the environment of a unit with WatchdogSec= and Type=notify."""
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(round(self.watchdog_s * 1e6))}

    def read(self, now: float) -> None:
        """Take in every message sent since the last read; `now` counts as when they came
        (read often, and with a fresh `now`, so that the error stays small)."""
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            states = data.decode("utf-8", errors="replace").split("\n")
            if "READY=1" in states or ("WATCHDOG=1" in states and self.last_heard is not None):
                self.last_heard = now
            for state in states:
                if state.startswith("STATUS="):
                    self.status = state.removeprefix("STATUS=")

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


FOLDER_PREFIX = "imgclass-notify-"
# In each folder, locked by its maker for its life (common/file_lock.py): the kernel lets
# go of the lock when the maker dies, however it dies.
OWNER_LOCK = ".owner.lock"
# A folder younger than this is left alone: its maker may not have locked it yet.
FRESH_S = 60.0


def remove_abandoned_folders(parent: Path) -> None:
    """Remove the socket folders in `parent` whose maker is gone: a stack killed outright
    (kill -9) cannot remove its own, and left two at each kill. By the lock, not by a
    pid: one from another PID namespace (a container sharing /tmp) would look dead."""
    for lock in parent.glob(f"{FOLDER_PREFIX}*/{OWNER_LOCK}"):
        try:
            if time.time() - lock.stat().st_mtime < FRESH_S:
                continue
            fd = lock_file(lock, os.O_RDONLY)
        except LockHeld:
            continue  # its maker lives
        except OSError:  # another user's, or gone meanwhile
            continue
        if fd is not None:
            shutil.rmtree(lock.parent, ignore_errors=True)
            os.close(fd)


class NotifySockets:
    """The sockets of all the runner's processes, in one temporary folder made at first use."""

    def __init__(self, watchdog_s: float) -> None:
        self.watchdog_s = watchdog_s
        self._folder: Path | None = None
        self._lock_fd: int | None = None
        self._made = 0

    def new(self, watchdog_s: float | None = None) -> NotifySocket:
        """A socket for one more process, whose watchdog allows `watchdog_s` (default: all's)."""
        if self._folder is None:
            folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)
            if len(folder) > MAX_FOLDER_CHARS:
                Path(folder).rmdir()
                folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir="/tmp")
            self._folder = Path(folder)
            self._lock_fd = hold(self._folder / OWNER_LOCK)
            remove_abandoned_folders(self._folder.parent)
        self._made += 1
        return NotifySocket(self._folder / f"{self._made}.sock", watchdog_s or self.watchdog_s)

    def remove_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
