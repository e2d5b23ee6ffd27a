"""A cheap snapshot of the whole system for /api/status.

Four AWS calls at most (three queue attribute reads and one instance listing),
and the answer is reused for a second, so many open pages polling every two
seconds cost the same as one. `read_at` is when AWS was read.

AWS is read on a thread of its own, one refresh at a time, and a request waits
for it a moment at most: a request that did the reading itself would wait as long
as AWS does not answer (40 s seen, botocore's retries allow minutes), holding its
thread all the while.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from common.aws import Aws
from common.aws_errors import error_reason
from common.fleet import LIVE_STATES, WATCHED_STATES, app_tier_instances
from web_tier.form import upload_limits
from web_tier.results import ResultBook

log = logging.getLogger(__name__)

CACHE_S = 1.0
# A refresh waiting on AWS longer than this is said to be so, with the snapshot's age.
STALE_AFTER_S = 5.0
# How long a read waits for the refresh it needs (or, with a snapshot that old, after
# an idle spell, one another read began), before it answers from the last snapshot.
REFRESH_WAIT_S = 2.0
# How long the very first read, which has no snapshot to fall back on, waits.
FIRST_READ_WAIT_S = 10.0


class StatusReader:
    def __init__(self, aws: Aws, book: ResultBook, cache_s: float = CACHE_S) -> None:
        self.aws = aws
        self.book = book
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._refreshed = threading.Condition(self._lock)  # notified as each refresh ends
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._refresh_began: float | None = None  # monotonic, while a refresh waits on AWS
        # The totals are this process's: a restarted web tier counts from 0 again.
        self.counting_since = time.time()

    def read(self) -> dict[str, Any]:
        cached, began = self._snapshot_after_waiting()
        read_mono, snapshot = cached if cached is not None else (None, {**_nothing_read(), "read_at": None})
        snapshot = dict(snapshot)
        said = staleness(read_mono, began, time.monotonic())
        if said:
            snapshot["errors"] = [*snapshot.get("errors", []), said]
        snapshot["totals"] = self.book.totals()
        snapshot["totals_since"] = self.counting_since
        snapshot["untrained"] = self.book.untrained
        snapshot["api_key_required"] = bool(self.aws.settings.api_key)
        snapshot["limits"] = upload_limits(self.aws.settings)
        snapshot["time"] = time.time()
        return snapshot

    def _snapshot_after_waiting(self) -> tuple[tuple[float, dict[str, Any]] | None, float | None]:
        """The last snapshot, and when the refresh still under way began (or None).

        While a refresh waits on AWS, reads answer from the last snapshot rather
        than queue up behind it, each holding a thread (every open page asks every
        2 s). A read waits a moment for the refresh it began, or, when its snapshot
        is long out of date, for the one under way; the very first, a little longer.
        """
        with self._refreshed:
            now = time.monotonic()
            due = self._cached is None or now - self._cached[0] >= self.cache_s
            began_now = False
            if due and self._refresh_began is None:
                self._refresh_began, began_now = now, True
                try:
                    threading.Thread(target=self._refresh, name="status-refresh", daemon=True).start()
                except BaseException:
                    # No thread now (a process or memory limit): the next read tries again.
                    # Left set, no refresh would ever run again.
                    self._refresh_began = None
                    raise
            if self._cached is None and self._refresh_began is not None:
                # What is left of FIRST_READ_WAIT_S since the refresh began: every read
                # of an AWS that never answers the first would wait all of it.
                self._refreshed.wait_for(lambda: self._refresh_began is None,
                                         max(0.0, self._refresh_began + FIRST_READ_WAIT_S - now))
            elif self._refresh_began is not None and (began_now or now - self._cached[0] > STALE_AFTER_S):
                self._refreshed.wait_for(lambda: self._refresh_began is None, REFRESH_WAIT_S)
            return self._cached, self._refresh_began

    def _refresh(self) -> None:
        """Read AWS (on a thread of its own) and keep the snapshot; wake the readers."""
        try:
            figures = self._read_aws()
            snapshot = (time.monotonic(), {**figures, "read_at": time.time()})
        except Exception:  # _read_aws says what it cannot read; anything else, here
            log.exception("status: refresh failed")
            snapshot = None
        with self._refreshed:
            if snapshot is not None:
                self._cached = snapshot
            self._refresh_began = None
            self._refreshed.notify_all()

    def _read_aws(self) -> dict[str, Any]:
        out = _nothing_read()
        errors = []
        try:
            out["queue"] = asdict(self.aws.queue_depth(self.aws.request_queue_url))
            out["responses_waiting"] = self.aws.queue_depth(self.aws.response_queue_url).visible
            out["dead_letter"] = self.aws.queue_depth(self.aws.dead_letter_queue_url).visible
        except Exception as exc:
            log.warning("status: queues unreadable: %s", exc)
            errors.append(f"queues: {error_reason(exc)}")
        try:
            # Every state always reported, even at zero, so a page need not guess.
            counts = dict.fromkeys(WATCHED_STATES, 0)
            failed = serving = 0
            for instance in app_tier_instances(self.aws):
                counts[instance.state] = counts.get(instance.state, 0) + 1
                # Up, but with a worker that gave up: the controller replaces it.
                failed += bool(instance.worker_failed and instance.state in LIVE_STATES)
                # Running is not serving: its worker may still be starting (its model loading,
                # a boot's minute on AWS), or, locally, wait for a process (LOCAL_MAX_WORKERS).
                serving += bool(instance.state == "running" and instance.ready and not instance.worker_failed)
            out["instances"] = counts
            out["instances_total"] = sum(counts.values())
            out["workers_failed"] = failed
            out["workers_serving"] = serving
        except Exception as exc:
            log.warning("status: instances unreadable: %s", exc)
            errors.append(f"instances: {error_reason(exc)}")
        if errors:
            out["errors"] = errors
        return out


def staleness(read_mono: float | None, began: float | None, now: float) -> str:
    """What a snapshot read at `read_mono` must say of its age, while a refresh that
    began at `began` waits on AWS ("" when nothing; times are monotonic).

    Said so that a page does not show minutes-old figures as if they were current;
    also when AWS was asked only a moment ago but the snapshot is old (a reader after
    an idle spell). How long AWS was asked is said apart, not blamed for the whole age.
    """
    old = read_mono is None or now - read_mono > STALE_AFTER_S
    if began is None or not (now - began > STALE_AFTER_S or old):
        return ""
    waited = now - began
    age = ("there are no figures yet" if read_mono is None
           else f"these figures are {now - read_mono:.0f} s old")
    return f"AWS has not answered for {waited:.{0 if waited >= 10 else 1}f} s: {age}"


def _nothing_read() -> dict[str, Any]:
    """The snapshot's figures before AWS has given any."""
    return {"queue": None, "responses_waiting": None, "dead_letter": None, "instances": {},
            "instances_total": None, "workers_failed": None, "workers_serving": None}
