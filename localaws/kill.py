"""Stopping a child's process group (SIGTERM, then SIGKILL at a deadline), a bounded
wait for it to be gone, and children that end with the process that started them.

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
import time
from collections.abc import Callable
from pathlib import Path

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
    ask = _sigterm_when_parent_ends()
    if ask is None:
        return None
    parent = os.getpid()

    def in_child() -> None:
        # Runs between fork and exec: nothing here may take a lock another thread held.
        ask()
        if os.getppid() != parent:  # the parent died before the request was made
            os._exit(1)

    return in_child


def end_with_parent() -> None:
    """This process gets SIGTERM when its parent ends (where the kernel can say so,
    Linux): `make run`'s make killed (an IDE's stop button, kill -9) left the stack
    serving on its own, its ports held and no terminal's Ctrl-C to reach it."""
    ask = _sigterm_when_parent_ends()
    if ask is not None:
        ask()


def _sigterm_when_parent_ends() -> Callable[[], None] | None:
    """What asks the kernel for SIGTERM when the calling process's parent (thread) ends,
    or None where it has no such request (macOS)."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:
        return None
    sigterm = int(signal.SIGTERM)
    return lambda: prctl(_PR_SET_PDEATHSIG, sigterm)


def kill_group(pgid: int) -> None:
    signal_group(pgid, signal.SIGKILL)


def end_group(pgid: int, deadline: float) -> None:
    """Wait until the group `pgid` has no process left, or `deadline`; then kill what is."""
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_group(pgid)


def group_alive(pgid: int) -> bool:
    """Whether any process is left running in the group `pgid`: one that has exited, a
    zombie its parent or init has yet to reap, is not waited for."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # none, or its id reused by another user's
        return False
    return not _only_zombies_in(pgid)


def _only_zombies_in(pgid: int) -> bool:
    """Whether every process of the group `pgid` has exited, waiting to be reaped. An init
    that reaps orphans only every second or two (a container's, as here) held each stop
    and web restart that long on processes already gone (a helper measured 1.0-2.2 s).
    Read from Linux's /proc; elsewhere, False (the group counts as alive until reaped)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended while looked at
            continue
        # After the name, which may hold spaces and parentheses: state, parent, group.
        state, _parent, group = text[text.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            return False
    return True


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # none left (its id may be reused)
        pass


def ask_to_stop(pgid: int, signum: int = signal.SIGTERM) -> None:
    """`signum` (SIGTERM, or the watchdog's SIGABRT) to the group, then SIGCONT, as
    systemd follows its stop signals: a stopped process (SIGSTOP, a debugger) acts on
    them only once continued. Raises ProcessLookupError if the group is gone."""
    os.killpg(pgid, signum)
    os.killpg(pgid, signal.SIGCONT)


def terminate(process: subprocess.Popen, deadline: float, name: str = "process") -> None:
    """SIGTERM `process`'s group, and SIGKILL it at `deadline` if it has not exited,
    saying so: a stop that had to kill is not a clean one."""
    if process.poll() is not None:
        return
    began = time.monotonic()
    try:
        ask_to_stop(process.pid)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) had not stopped %.1f s after SIGTERM: killed", name, process.pid,
                    time.monotonic() - began)
        kill_and_wait(process)
