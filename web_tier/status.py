"""A cheap snapshot of the whole system for /api/status.

Four AWS calls at most (three queue attribute reads and one instance listing),
and the answer is reused for a second, so many open pages polling every two
seconds cost the same as one. `read_at` is when AWS was read.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from common.aws import Aws, error_reason
from common.fleet import LIVE_STATES, WATCHED_STATES, app_tier_instances
from web_tier.results import ResultBook

log = logging.getLogger(__name__)

CACHE_S = 1.0
# A refresh waiting on AWS longer than this is said to be so, with the snapshot's age.
STALE_AFTER_S = 5.0
# How long a read whose snapshot is that old (after an idle spell) waits for the
# refresh another read has begun, rather than answer with old figures at once.
REFRESH_WAIT_S = 2.0


class StatusReader:
    def __init__(self, aws: Aws, book: ResultBook, cache_s: float = CACHE_S) -> None:
        self.aws = aws
        self.book = book
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._refresh_began: float | None = None  # monotonic, while a refresh waits on AWS
        # The totals are this process's: a restarted web tier counts from 0 again.
        self.counting_since = time.time()

    def read(self) -> dict[str, Any]:
        # One thread refreshes at a time. While it waits on AWS the others answer
        # from the last snapshot rather than queue up behind it, each holding a
        # thread (every open page asks every 2 s); only the very first read waits,
        # and, briefly, one whose snapshot is long out of date.
        cached = self._cached
        if cached is None:
            acquired = self._lock.acquire()
        elif time.monotonic() - cached[0] > STALE_AFTER_S:
            acquired = self._lock.acquire(timeout=REFRESH_WAIT_S)
        else:
            acquired = self._lock.acquire(blocking=False)
        if acquired:
            try:
                if self._cached is None or time.monotonic() - self._cached[0] >= self.cache_s:
                    self._refresh_began = time.monotonic()
                    figures = self._read_aws()
                    self._cached = (time.monotonic(), {**figures, "read_at": time.time()})
            finally:
                self._refresh_began = None
                self._lock.release()
        assert self._cached is not None
        read_mono, snapshot = self._cached[0], dict(self._cached[1])
        began = self._refresh_began
        if began is not None and time.monotonic() - began > STALE_AFTER_S:
            # Answered from the last snapshot while the refresh waits on AWS: an
            # explorer's page showed minutes-old figures as if they were current.
            waited, age = time.monotonic() - began, time.monotonic() - read_mono
            snapshot["errors"] = [*snapshot.get("errors", []), f"AWS has not answered for {waited:.0f} s: "
                                                               f"these figures are {age:.0f} s old"]
        snapshot["totals"] = self.book.totals()
        snapshot["totals_since"] = self.counting_since
        snapshot["untrained"] = self.book.untrained
        snapshot["api_key_required"] = bool(self.aws.settings.api_key)
        snapshot["time"] = time.time()
        return snapshot

    def _queue_attrs(self, url: str, names: list[str]) -> dict[str, int]:
        attrs = self.aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return {n: int(attrs.get(n, 0)) for n in names}

    def _read_aws(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queue": None, "responses_waiting": None, "dead_letter": None,
            "instances": {}, "instances_total": None, "workers_failed": None,
        }
        errors = []
        try:
            req = self._queue_attrs(self.aws.request_queue_url, [
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ])
            out["queue"] = {
                "visible": req["ApproximateNumberOfMessages"],
                "in_flight": req["ApproximateNumberOfMessagesNotVisible"],
                "delayed": req["ApproximateNumberOfMessagesDelayed"],
            }
            out["responses_waiting"] = self._queue_attrs(
                self.aws.response_queue_url, ["ApproximateNumberOfMessages"]
            )["ApproximateNumberOfMessages"]
            out["dead_letter"] = self._queue_attrs(
                self.aws.dead_letter_queue_url, ["ApproximateNumberOfMessages"]
            )["ApproximateNumberOfMessages"]
        except Exception as exc:
            log.warning("status: queues unreadable: %s", exc)
            errors.append(f"queues: {error_reason(exc)}")
        try:
            # Every state always reported, even at zero, so a page need not guess.
            counts = dict.fromkeys(WATCHED_STATES, 0)
            failed = 0
            for instance in app_tier_instances(self.aws):
                counts[instance.state] = counts.get(instance.state, 0) + 1
                # Up, but with a worker that gave up: the controller replaces it.
                failed += bool(instance.worker_failed and instance.state in LIVE_STATES)
            out["instances"] = counts
            out["instances_total"] = sum(counts.values())
            out["workers_failed"] = failed
        except Exception as exc:
            log.warning("status: instances unreadable: %s", exc)
            errors.append(f"instances: {error_reason(exc)}")
        if errors:
            out["errors"] = errors
        return out
