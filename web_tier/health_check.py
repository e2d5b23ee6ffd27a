"""Can this process reach its queues and buckets? What GET /healthz answers.

Each check costs four AWS calls (on AWS, each one billed). A load balancer asks
every few seconds, but anyone who can reach the web tier can ask as often as they
like: so one check runs at a time, and its answer, good or bad, is reused for a
second. Callers arriving while a check runs wait for its answer instead of starting
their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from common.aws import Aws
from common.aws_errors import error_reason

log = logging.getLogger(__name__)

CACHE_S = 1.0
# How long a caller waits for a check under way (a load balancer waits ~5 s).
WAIT_S = 10.0


class HealthCheck:
    """The last check's answer (None when all was reached, else what was not), reused
    for `cache_s` after it ended."""

    def __init__(self, check: Callable[[], str | None], cache_s: float = CACHE_S,
                 clock: Callable[[], float] = time.monotonic, wait_s: float = WAIT_S) -> None:
        self._check = check
        self.cache_s = cache_s
        self._clock = clock
        self.wait_s = wait_s
        # Held while a check runs, so that callers meanwhile wait for its answer.
        self._lock = threading.Lock()
        self._answer: tuple[float, str | None] | None = None  # (when it ended, the answer)

    def answer(self) -> str | None:
        # Each of a check's calls has a short timeout and one attempt, but not all of its
        # time is bounded (a DNS lookup): a check stuck past that is said to be, rather
        # than hold every caller for as long as it lasts.
        if not self._lock.acquire(timeout=self.wait_s):
            return f"AWS unanswered: a check has been running for over {self.wait_s:g} s"
        try:
            if self._answer is not None and self._clock() - self._answer[0] < self.cache_s:
                return self._answer[1]
            unreachable = self._check()
            self._answer = (self._clock(), unreachable)
            return unreachable
        finally:
            self._lock.release()


def unreachable_part(aws: Aws) -> str | None:
    """Asks each queue and bucket once; says which did not answer, and why."""
    # Short timeouts, no retries: an AWS that does not answer is a 503 within seconds.
    # The queues' URLs too, where this process has not looked them up yet.
    sqs, s3 = aws.probes["sqs"], aws.probes["s3"]
    checks = [
        ("request queue", lambda: sqs.get_queue_attributes(
            QueueUrl=aws.queue_url(aws.settings.request_queue, probe=True), AttributeNames=["QueueArn"])),
        ("response queue", lambda: sqs.get_queue_attributes(
            QueueUrl=aws.queue_url(aws.settings.response_queue, probe=True), AttributeNames=["QueueArn"])),
        ("input bucket", lambda: s3.head_bucket(Bucket=aws.settings.input_bucket)),
        ("output bucket", lambda: s3.head_bucket(Bucket=aws.settings.output_bucket)),
    ]
    for name, check in checks:
        try:
            check()
        except Exception as exc:
            log.warning("health check: %s unreachable: %s", name, exc)
            return f"{name} unreachable: {error_reason(exc)}"
    return None
