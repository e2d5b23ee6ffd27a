"""Killing a child's process group, and a bounded wait for it to be gone.

A process SIGKILLed is not always gone at once: one a debugger holds (gdb,
strace), or one in an I/O the kernel cannot interrupt, stays until that ends.
Waited for without a bound, it would hang the stack's stop; waited for with one
that raises (subprocess.TimeoutExpired), it ended the stop before the embedded
AWS was stopped, and the runner's rounds one after another (explorer).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

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
