"""Killing a child's process group, a bounded wait for it to be gone, and children
that end with the process that started them.

A process SIGKILLed is not always gone at once: one a debugger holds (gdb,
strace), or one in an I/O the kernel cannot interrupt, stays until that ends.
Waited for without a bound, it would hang the stack's stop; waited for with one
that raises (subprocess.TimeoutExpired), it would end the stop before the embedded
AWS was stopped, and the runner's rounds one after another.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Callable

log = logging.getLogger(__name__)

REAP_WAIT_S = 5.0


def kill_and_wait(process: subprocess.Popen, wait_s: float = REAP_WAIT_S) -> bool:
    """SIGKILL `process`'s group; whether it has exited within `wait_s` (if not, it is
    said, and left behind rather than waited for)."""
    if process.poll() is not None:
        return True  # reaped: its process group id may belong to another process now
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=wait_s)
        return True
    except subprocess.TimeoutExpired:
        log.error("pid %d outlived SIGKILL by %.0f s (a debugger attached to it, or I/O that cannot "
                  "be interrupted): left behind", process.pid, wait_s)
        return False


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def ends_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for Popen: the child gets SIGTERM when the thread that started it
    ends, or None where the kernel has no such request (macOS).

    Without it, a stack ended by SIGKILL (or the OOM killer) would leave the embedded AWS,
    the web tier, the controller and the workers running, each in a session of its
    own: the next `make run` would find its ports in use. SIGTERM, not
    SIGKILL: each stops as it does on Ctrl-C (a worker finishes its batch).

    The kernel sends it when the *thread* that started the child ends, not the
    process: start children from a thread that outlives them (the main thread, or
    one that waits as InstanceRunner.run does).
    """
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:
        return None
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def in_child() -> None:
        # Runs between fork and exec: nothing here may take a lock another thread held.
        prctl(_PR_SET_PDEATHSIG, sigterm)
        if os.getppid() != parent:  # the parent died before the request was made
            os._exit(1)

    return in_child
