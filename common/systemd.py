"""systemd's service notifications: READY=1 once serving, WATCHDOG=1 while alive.

On an instance the worker runs as a `Type=notify` unit with `WatchdogSec=`
(ami/imgclass-worker.service): systemd counts it started only when it says
READY=1, after its model has loaded, and restarts it when its WATCHDOG=1
pings stop. They stop when no Python thread can run (a hang that holds the
interpreter lock, which the worker's own heartbeat cannot see, being a
thread itself) or when the heartbeat thread has died or is blocked. The local
runner plays systemd's part the same way (localaws/notify.py). The controller
pings at every round and, at most once a second, at its AWS requests
(ami/imgclass-controller.service), so a controller that hangs is restarted too;
`make run` watches its controller the same way. Without NOTIFY_SOCKET (a process
started by hand, most tests) every call here does nothing.

The protocol is one datagram per message on the AF_UNIX socket named in
NOTIFY_SOCKET (a leading "@" names an abstract socket), as sd_notify(3) sends
it; written here rather than taken from a library for these few lines.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import resource
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0


def report_stacks_on_abort() -> None:
    """Every thread's stack on stderr if the process is killed by SIGABRT (the
    watchdog's), SIGSEGV and the like: the only account there would be of a hang.
    Not a core file as well (LimitCORE=0 in the units says the same): a worker's
    is ~1 GB. Call at start, with a real stderr (not pytest's captured one)."""
    faulthandler.enable()
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def ping_watchdog(env: Mapping[str, str] = os.environ) -> bool:
    """Send WATCHDOG=1 without waiting, for a sender that pings often (the controller, at
    its AWS requests): a reader that lags (make run's, while it starts or stops) has the
    earlier pings queued, and this one is dropped rather than waited for. Waited for,
    each of the controller's took 1 s then, rounds took 3 s, and a stop took 7 s. One that
    pings only every half watchdog period must wait (notify): a ping dropped there would
    leave the next to race the kill."""
    return notify("WATCHDOG=1", env, wait=False)


def notify(state: str, env: Mapping[str, str] = os.environ, wait: bool = True) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not run by systemd or on failure.
    Waits up to SEND_TIMEOUT_S for a reader that lags, or not at all (`wait` False)."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # A datagram socket whose reader lags blocks the sender once its queue is
            # full: READY=1 is sent from the worker's main loop, which must not wait on it.
            sock.settimeout(SEND_TIMEOUT_S if wait else 0.0)
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except BlockingIOError:  # the reader's queue full, and not waited for
        log.debug("did not tell systemd %s: its reader lags", state)
        return False
    except OSError as exc:
        # Not a reason to stop serving; but systemd, missing READY=1 or the pings, will
        # restart this process, and the log should say why.
        log.warning("could not tell systemd %s: %s", state, exc)
        return False


def watchdog_interval_s(env: Mapping[str, str] = os.environ) -> float | None:
    """How often to send WATCHDOG=1: half of systemd's WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises; None when no watchdog is asked of this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
