"""Whether the worker is stuck rather than slow, and whether its heartbeat still beats.

The worker marks what must end (a model call, one image's decoding) and each
iteration of its main and fetch loops; its heartbeat asks `stuck()` every round,
and systemd's watchdog is pinged only while those rounds end in time. What to do
about a stuck worker is the worker's own business: it gives its messages back and
exits to be restarted (`Worker._give_up_stuck`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app_tier.job import Job
from common import systemd

# Besides a model call or decodes, which STALL_TIMEOUT bounds, an iteration of the
# main or fetch loop waits for a few AWS calls one after another (the main loop for
# the previous batch's writes, reply and delete), each up to ~4 minutes at botocore's
# worst (six attempts of 5 s to connect and 30 s to read, with backoff): an
# iteration longer than the stall timeout plus this is a deadlock, not slowness.
LOOP_SLACK_S = 1800.0
# A heartbeat round extends the visibility of every message held: up to three
# batches of 10 (one being finished, one classified, one fetched ahead), so three SQS
# calls one after another, each up to ~4 minutes at botocore's worst. A round that
# has not ended this long after it was due is blocked (on a lock a deadlocked thread
# holds), and the watchdog pings stop. (At 300 s, systemd would restart a worker
# waiting out an SQS slowdown as hung.)
HEARTBEAT_SLACK_S = 900.0
# The worker's two loops, each in a thread of its own: the main loop classifies and
# answers, the fetch loop receives, downloads and decodes.
MAIN_LOOP, FETCH_LOOP = "main", "fetch"


@dataclass
class Call:
    """A call that must end for the worker to go on: a model call, or one image's decoding."""

    kind: str
    started: float  # time.monotonic()
    jobs: list[Job]
    loop: str  # whose thread it holds: MAIN_LOOP or FETCH_LOOP


class StallWatch:
    def __init__(self, stall_timeout_s: float, heartbeat_period_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        # How often the heartbeat runs a round: asks stuck(), then extends what is held.
        self.heartbeat_period_s = heartbeat_period_s
        # How often to ping systemd's watchdog; None when not run by one.
        self.watchdog_s = systemd.watchdog_interval_s()
        # The model call and the decodes under way, by thread: the heartbeat's
        # evidence that the worker is stuck rather than slow.
        self._calls: dict[int, Call] = {}
        self._calls_lock = threading.Lock()
        # When the main and fetch loops last began an iteration, while they run.
        self._loop_ticks: dict[str, float] = {}
        self._last_beat = time.monotonic()  # when the heartbeat last ended a round

    # --- what the worker's threads tell it ------------------------------------------
    @contextmanager
    def must_end(self, kind: str, jobs: list[Job], loop: str) -> Iterator[None]:
        """Mark a call the heartbeat watches, made in `loop`'s thread: if it has not ended
        within the stall timeout, the worker is stuck (a wedged runtime, or an image
        that hangs the decoder: Pillow has had such bugs), not slow."""
        thread = threading.get_ident()
        with self._calls_lock:
            self._calls[thread] = Call(kind, time.monotonic(), jobs, loop)
        try:
            yield
        finally:
            with self._calls_lock:
                del self._calls[thread]

    def tick(self, loop: str) -> None:
        """An iteration of `loop` (MAIN_LOOP, FETCH_LOOP) begins."""
        self._loop_ticks[loop] = time.monotonic()

    def loop_ended(self, loop: str) -> None:
        """`loop` has ended: its last iteration is no longer watched."""
        self._loop_ticks.pop(loop, None)

    def beat(self) -> None:
        """The heartbeat has started, or ended a round."""
        self._last_beat = time.monotonic()

    # --- what it makes of it ----------------------------------------------------------
    def calls_under_way(self) -> list[Call]:
        with self._calls_lock:
            return list(self._calls.values())

    def stuck(self, now: float) -> Call | None:
        """The oldest call under way for longer than the stall timeout, if there is one;
        else a loop iteration that has outlasted every bound on what it waits for (a
        deadlock: no image to blame, so a Call without jobs)."""
        limit = self.stall_timeout_s
        late = [c for c in self.calls_under_way() if now - c.started >= limit]
        if not late:
            ticks = dict(self._loop_ticks)
            late = [Call(f"{loop} loop iteration", began, [], loop) for loop, began in ticks.items()
                    if now - began >= limit + LOOP_SLACK_S]
        return min(late, key=lambda c: c.started, default=None)

    def beats(self, heartbeat: threading.Thread, now: float) -> bool:
        """Whether the heartbeat lives and its last round ended in time."""
        late_s = now - self._last_beat - self.heartbeat_period_s
        return heartbeat.is_alive() and late_s < HEARTBEAT_SLACK_S

    def ping_watchdog(self, heartbeat: threading.Thread, until: threading.Event) -> None:
        """Tell systemd the worker is alive for as long as its heartbeat beats. The pings
        stop when this thread cannot run (a hang that holds Python's lock stops every
        thread, the heartbeat too), when the heartbeat has died, or when its round is
        blocked (a deadlock on one of the worker's locks, which would also block its
        give-up): systemd then restarts the worker."""
        assert self.watchdog_s
        while not until.wait(self.watchdog_s) and self.beats(heartbeat, time.monotonic()):
            # Waited for (up to a second), not dropped: one ping every half WatchdogSec,
            # one dropped would leave the next to race the kill.
            systemd.notify("WATCHDOG=1")
