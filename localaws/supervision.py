"""What systemd would decide for a supervised process, as pure functions of times.

Two parts of the local stack play systemd: the stack itself for its controller and
web tier (localaws/stack.py), and the instance runner for each worker process
(localaws/runner.py). Both restart a process that ended, waiting longer after each
failed start in a row (Restart=, with a backoff), and both watch a process that pings
a watchdog (WatchdogSec=): SIGABRT once it is hung, so that its stacks go to its log,
then SIGKILL if that does not end it. The decisions are made here, from times in
(time.monotonic()) to a verdict out, so that each has a table of unit tests
(tests/unit/test_supervision.py); the callers read their processes, keep their own
constants (each says why its own differ), and act on the verdict.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """How a supervisor spaces the starts of one process."""

    # A failed exit this soon after its start is a failed start: the next would most
    # likely fail the same way (a bad setting, a port in use, a broken import).
    quick_exit_s: float
    # The wait after one failed start, doubled for each next one in a row.
    first_delay_s: float
    max_delay_s: float = math.inf
    # The wait after an exit that was no failed start (one that ran, or was killed).
    after_run_s: float = 0.0
    # From one start to the next, whatever ended the first.
    min_interval_s: float = 0.0


def next_start(backoff: Backoff, started_at: float, ended_at: float, failed: bool,
               quick_exits: int) -> tuple[int, float]:
    """For a process started at `started_at` that ended at `ended_at`, after
    `quick_exits` failed starts in a row: how many there are in a row now, and when
    the next start is due. `failed`: it ended by itself in a way that counts against
    its next start (what does is the caller's rule: an error exit, a crash)."""
    failed_at_start = failed and ended_at - started_at < backoff.quick_exit_s
    quick_exits = quick_exits + 1 if failed_at_start else 0
    if failed_at_start:
        # The power capped: 2 ** 1024 (after ~17 hours of failed starts a minute apart)
        # does not fit in a float, and 2 ** 63 s is past any max_delay_s.
        delay = min(backoff.first_delay_s * 2 ** min(quick_exits - 1, 63), backoff.max_delay_s)
    else:
        delay = backoff.after_run_s
    return quick_exits, max(ended_at + delay, started_at + backoff.min_interval_s)


class Watchdog(enum.Enum):
    """What the watchdog does to a live process this round."""

    NONE = "none"
    ABORT = "abort"  # SIGABRT: it is hung (silent), or never said it was ready (late)
    KILL = "kill"  # SIGKILL: it outlived the abort's grace (stopped, or stuck writing its stacks)


def watchdog_action(now: float, *, started_at: float, last_heard: float | None, watchdog_s: float,
                    abort_sent_at: float | None, abort_grace_s: float,
                    start_timeout_s: float = math.inf) -> Watchdog:
    """systemd's watchdog for a live process: `last_heard` is its last READY=1 or ping
    (None until READY=1, as systemd counts from there), `abort_sent_at` when it was sent
    SIGABRT (None if not yet). SIGKILL is asked again at every round after the grace, for
    as long as it lives: a signal to a process a debugger holds may have to wait."""
    if abort_sent_at is not None:
        return Watchdog.KILL if now - abort_sent_at > abort_grace_s else Watchdog.NONE
    silent = last_heard is not None and now - last_heard > watchdog_s
    late = last_heard is None and now - started_at > start_timeout_s
    return Watchdog.ABORT if silent or late else Watchdog.NONE
