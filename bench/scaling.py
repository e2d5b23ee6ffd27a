"""(e) How fast the fleet follows the work: first request -> first launch, last response -> zero.

A thread polls EC2 (the stack's embedded moto) every ~50 ms and records how
many app-tier instances are pending or running. The controller's own log
lines (in the stack's output) are read as a cross-check of when it decided.

It polls that fast only around the two moments measured: from the start
until the first launch is seen, and from `fast()` (called once the load is
over) until zero. In between it polls once a second. moto serialises every
instance in a DescribeInstances answer (1-8 ms of its CPU each here), so 20
calls a second with 15 instances would take a whole core from the very server
the benchmark measures: at first it did, and halved the end-to-end throughput.

It asks EC2 exactly what the controller and the runner ask (every watched
state) and counts the live instances itself: the embedded AWS then answers
all three from one cached answer per change to the fleet. Asking only for
pending and running instances was a question of its own, answered afresh
after every launch: about half the uncached DescribeInstances of a run, at
30-115 ms of moto's CPU each (`make bench`, part f, "DescribeInstances"
against "DescribeInstances (cached)").
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace

from botocore.config import Config

from common.aws import new_session
from common.aws_errors import AWS_ERRORS
from common.config import Settings
from common.fleet import LIVE_STATES, app_tier_instances

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*controller .*action=(launch|terminate)")


@dataclass
class FleetPoller:
    """Counts live (pending + running) app-tier instances every `interval_s`."""

    settings: Settings
    interval_s: float = 0.05
    slow_interval_s: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (wall clock, live)
    errors: int = 0
    # Guards the mode, the samples and stopping. fast() and stop() wake the
    # poller's wait, and each sample wakes wait_for_zero(): with plain sleeps, a
    # fast() during a 1 s slow wait left the fleet unpolled for the rest of it,
    # and "last response -> zero" measured up to ~1 s of that wait.
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _thread: threading.Thread | None = None
    _fast: bool = True
    _until_launch: bool = False  # fast only until an instance shows up

    def __post_init__(self) -> None:
        # Harmless fixed credentials: this only ever talks to the stack's own moto. A
        # session of common.aws's, as the stack's own clients: its CPU counts in the budget.
        ec2 = new_session().client("ec2", endpoint_url=self.settings.endpoint_url,
                                   region_name=self.settings.region,
                                   aws_access_key_id="bench", aws_secret_access_key="bench",
                                   config=Config(retries={"max_attempts": 1}, read_timeout=5))
        self.aws = SimpleNamespace(ec2=ec2, settings=self.settings)  # all app_tier_instances needs

    def count(self) -> int:
        return sum(1 for i in app_tier_instances(self.aws) if i.state in LIVE_STATES)

    def _loop(self) -> None:
        while True:
            started = time.time()
            try:
                live: int | None = self.count()
            except AWS_ERRORS:
                live = None
            with self._cond:
                if live is None:
                    self.errors += 1
                else:
                    # Stamped at the middle of the call: EC2 answered somewhere inside it.
                    self.samples.append(((started + time.time()) / 2, live))
                    if live > 0 and self._until_launch:
                        self._fast = False  # the first launch is seen: slow down until fast()
                    self._cond.notify_all()
                # The interval is read again whenever fast() wakes us, so that the
                # next poll follows it at once instead of after the slow interval.
                while not self._stopping:
                    interval = self.interval_s if self._fast else self.slow_interval_s
                    remaining = started + interval - time.time()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return

    def fast(self, until_launch: bool = False) -> None:
        """Poll every `interval_s` again, from now on; with `until_launch`, only until an instance is seen."""
        with self._cond:
            self._until_launch = until_launch
            self._fast = True
            self._cond.notify_all()

    def start(self) -> FleetPoller:
        self._thread = threading.Thread(target=self._loop, name="fleet-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=5)

    def wait_for_zero(self, after: float, timeout_s: float) -> float | None:
        """Block until a sample taken after `after` shows no instance; its time, or None."""
        self.fast()
        with self._cond:
            return self._cond.wait_for(lambda: first_at(self.samples, after, lambda n: n == 0), timeout_s)


def first_at(samples: list[tuple[float, int]], after: float, test: Callable[[int], bool]) -> float | None:
    """Time of the first sample at or after `after` whose count passes `test`."""
    for at, live in list(samples):
        if at >= after and test(live):
            return at
    return None


def controller_actions(lines: list[str]) -> list[tuple[float, str]]:
    """(wall clock, 'launch' | 'terminate') for each action the controller logged."""
    found = []
    for line in lines:
        match = _LOG_TIME.match(line)
        if match:
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((stamp, match[2]))
    return found


def scaling_times(samples: list[tuple[float, int]], first_request: float, last_response: float,
                  zero_at: float | None, actions: list[tuple[float, str]]) -> dict[str, float | None]:
    """The figures of (e), in seconds (None when it never happened, or when the fleet was
    not at zero at the first request: "first_launch_not_measured" then says so)."""
    found = [live for at, live in samples if at < first_request]
    at_start = found[-1] if found else None  # None: no sample before the run, not known
    # A fleet already up is "launched" at the first sample after the first request: a
    # near-zero time, which would read as a fast launch with nothing in the JSON to say so.
    not_measured = f"the fleet had {at_start} instance(s) at the first request" if at_start else None
    launched = None if not_measured else first_at(samples, first_request, lambda n: n > 0)
    decided_launch = None if not_measured else next(
        (t for t, a in actions if a == "launch" and t >= first_request - 0.01), None)
    # The terminate that emptied the fleet: the last one logged before EC2 showed zero
    # (earlier ones may be partial scale-ins as the backlog fell).
    until = (zero_at if zero_at is not None else float("inf")) + 0.5
    decided_zero = max((t for t, a in actions if a == "terminate" and last_response - 0.01 <= t <= until),
                       default=None)
    return {
        "first_request_to_first_launch_s": None if launched is None else launched - first_request,
        "last_response_to_zero_s": None if zero_at is None else zero_at - last_response,
        "controller_launch_logged_after_s": None if decided_launch is None
        else decided_launch - first_request,
        "controller_terminate_logged_after_s": None if decided_zero is None
        else decided_zero - last_response,
        "peak_instances": max((n for t, n in samples if t >= first_request), default=0),
        "fleet_at_start": at_start,
        "first_launch_not_measured": not_measured,
    }
