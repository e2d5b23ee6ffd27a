"""The supervision decisions the local stack and the instance runner share: times in,
verdict out (localaws/supervision.py)."""

from __future__ import annotations

import math

import pytest

from localaws.supervision import Backoff, Watchdog, next_start, watchdog_action

# As the runner's: a minute at most, starts at most once a second.
CAPPED = Backoff(quick_exit_s=20.0, first_delay_s=1.0, max_delay_s=60.0, min_interval_s=1.0)
# As the stack's: a second after any exit, doubling from two after a failed start.
STEADY = Backoff(quick_exit_s=10.0, first_delay_s=2.0, after_run_s=1.0)


@pytest.mark.parametrize(("backoff", "started_at", "ended_at", "failed", "quick_exits", "expected"), [
    # A failed start: one more in a row, and a wait that doubles with each.
    (CAPPED, 100.0, 105.0, True, 0, (1, 106.0)),
    (CAPPED, 100.0, 105.0, True, 1, (2, 107.0)),
    (CAPPED, 100.0, 105.0, True, 2, (3, 109.0)),
    (CAPPED, 100.0, 105.0, True, 6, (7, 165.0)),  # 64 s, capped at a minute
    (CAPPED, 100.0, 105.0, True, 5000, (5001, 165.0)),  # no OverflowError after hours of them
    # Not failed, or failed after running long enough: the row ends, no wait ...
    (CAPPED, 100.0, 150.0, False, 4, (0, 150.0)),
    (CAPPED, 100.0, 120.0, True, 4, (0, 120.0)),  # exactly quick_exit_s: it ran
    (CAPPED, 100.0, 119.5, True, 4, (5, 135.5)),  # just under: a failed start
    # ... but never two starts within min_interval_s, whatever ended the first.
    (CAPPED, 100.0, 100.2, False, 0, (0, 101.0)),
    # With a wait after any exit, and no cap.
    (STEADY, 100.0, 200.0, False, 2, (0, 201.0)),
    (STEADY, 100.0, 200.0, True, 2, (0, 201.0)),  # ran 100 s: not a failed start
    (STEADY, 100.0, 101.0, False, 2, (0, 102.0)),  # killed at once: no backing off
    (STEADY, 100.0, 101.0, True, 0, (1, 103.0)),
    (STEADY, 100.0, 101.0, True, 1, (2, 105.0)),
    (STEADY, 100.0, 101.0, True, 5000, (5001, 101.0 + 2.0 * 2 ** 63)),  # uncapped: no OverflowError
])
def test_next_start(backoff, started_at, ended_at, failed, quick_exits, expected):
    assert next_start(backoff, started_at, ended_at, failed, quick_exits) == expected


NONE, ABORT, KILL = Watchdog.NONE, Watchdog.ABORT, Watchdog.KILL


@pytest.mark.parametrize(("now", "last_heard", "abort_sent_at", "start_timeout_s", "expected"), [
    # Started at 100, pings allowed 10 s apart, 5 s of grace after SIGABRT.
    (105.0, None, None, math.inf, NONE),  # not ready yet, no start timeout
    (10_000.0, None, None, math.inf, NONE),  # never ready, never timed out without one
    (130.0, None, None, 30.0, NONE),  # exactly the start timeout: not yet late
    (130.1, None, None, 30.0, ABORT),  # late: never said it was ready
    (150.0, 140.0, None, 30.0, NONE),  # ready (the start timeout no longer counts), pinging
    (150.0, 140.0, None, math.inf, NONE),  # exactly the watchdog's 10 s: not yet silent
    (150.1, 140.0, None, math.inf, ABORT),  # silent: hung
    (150.1, 140.0, 148.0, math.inf, NONE),  # aborted, still in its grace: not aborted again
    (153.0, 140.0, 148.0, math.inf, NONE),  # exactly the grace
    (153.1, 140.0, 148.0, math.inf, KILL),  # outlived the abort
    (999.0, 140.0, 148.0, math.inf, KILL),  # and at every round after, while it lives
    (999.0, None, 148.0, 30.0, KILL),  # aborted for being late, the same
])
def test_watchdog_action(now, last_heard, abort_sent_at, start_timeout_s, expected):
    assert watchdog_action(now, started_at=100.0, last_heard=last_heard, watchdog_s=10.0,
                           abort_sent_at=abort_sent_at, abort_grace_s=5.0,
                           start_timeout_s=start_timeout_s) is expected
