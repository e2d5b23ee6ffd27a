"""The embedded AWS ends after the last process that uses it, when the stack cannot say.

A stack killed outright (SIGKILL, the OOM killer) cannot stop its children in
order: each ends itself (kill.ends_with_parent). Were the embedded AWS to end with the
rest, within a second, while a worker hands its requests back and the web tier
answers its waiting clients, their last calls would fail against a closed port,
with botocore's tracebacks on the terminal and a worker's "handed back 10
messages, but could not delete their old copies".

So the stack makes a pipe. The embedded AWS gets its read end; the stack and
every process it starts that uses AWS hold its write end. The kernel closes a
process's descriptors however it ends, so the read end sees end-of-file once the
last of them is gone: then the server stops. A holder that never ends (one
stopped with SIGSTOP, say) does not keep it for ever: it stops OUTLIVE_S after the
stack died. A stack that stops normally stops the server itself, last.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

# Past the longest stop of a tier: a worker's batch and hand-back (SHUTDOWN_GRACE, at
# most 25 s, with many workers sharing the cores), the web tier's answers to its
# waiting clients (gunicorn's graceful timeout).
OUTLIVE_S = 60.0


class Lifeline:
    """The pipe: `holder_fd` for each process that keeps the server, `server_fd` for it."""

    def __init__(self) -> None:
        # Not inherited by default (PEP 446): each holder gets it through pass_fds.
        self.server_fd, self.holder_fd = os.pipe()

    def close_server_end(self) -> None:
        """Once the server has its copy: the stack reads nothing from it."""
        if self.server_fd >= 0:
            os.close(self.server_fd)
            self.server_fd = -1

    def close(self) -> None:
        self.close_server_end()
        if self.holder_fd >= 0:
            os.close(self.holder_fd)
            self.holder_fd = -1


def stop_when_unheld(fd: int, outlive_s: float = OUTLIVE_S, poll_s: float = 1.0) -> threading.Thread:
    """In the server: SIGTERM itself (a graceful stop) once no process holds the
    write end of `fd`'s pipe, or `outlive_s` after its parent (the stack) died."""
    parent = os.getppid()

    def watch() -> None:
        orphaned_at: float | None = None
        while True:
            ready, _, _ = select.select([fd], [], [], poll_s)
            if ready and not os.read(fd, 1):
                break  # end-of-file: every holder is gone
            if orphaned_at is None and os.getppid() != parent:
                orphaned_at = time.monotonic()
            if orphaned_at is not None and time.monotonic() - orphaned_at >= outlive_s:
                break
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="lifeline", daemon=True)
    thread.start()
    return thread
