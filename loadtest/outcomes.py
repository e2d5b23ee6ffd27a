"""What happened to each request (Outcome), its verdict against the expected labels
(judge), and the run's figures drawn from them (Report, percentile)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.names import image_key, same_label, same_name


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100), interpolating linearly between ranks.

    Same definition as numpy's default: for [1, 2, 3, 4] the 50th is 2.5.
    None for no values.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Outcome:
    """What happened to one request."""

    index: int
    file: str
    started_s: float  # since the run began
    latency_s: float = 0.0
    status: int | None = None
    answer_name: str | None = None
    label: str | None = None
    error: str | None = None  # set: the request failed (HTTP error, timeout, bad answer)
    untrained: bool = False
    # "correct", "wrong", "unchecked", "failed" (it reached the web tier) or "not sent" (it never did)
    verdict: str = "unchecked"
    expected: str | None = None
    note: str | None = None  # why a verdict is "wrong"
    resent: int = 0  # times sent again (see client.RESEND_WINDOW_S)
    via: str | None = None  # where its answer was read, when not from its own response
    by_id: bool = False  # its answer is the item fetched by its id: its name is not checked
    # It reached the web tier: answered, or cut off once connected (never, if every
    # attempt was refused, timed out connecting or failed its TLS handshake).
    reached: bool = False

    @property
    def answered(self) -> bool:
        return self.error is None

    @property
    def body(self) -> str:
        return f"{self.answer_name}:{self.label}" if self.answered else f"ERROR {self.error}"


def judge(outcome: Outcome, expected: dict[str, str]) -> None:
    """Set the outcome's verdict against the expected labels."""
    if not outcome.answered:
        # One that never reached the web tier is counted not sent, not also failed: a
        # server gone for good made "failed" count requests no server ever saw (reviewer).
        outcome.verdict = "failed" if outcome.reached else "not sent"
        return
    outcome.expected = expected.get(image_key(outcome.file))
    if (outcome.answer_name is not None and not outcome.by_id
            and not same_name(outcome.answer_name, outcome.file)):
        # An answer naming another image was handed to the wrong request.
        outcome.verdict = "wrong"
        outcome.note = f"answer is for {outcome.answer_name!r}"
    elif outcome.expected is None:
        outcome.verdict = "unchecked"
    elif same_label(outcome.label or "", outcome.expected):
        outcome.verdict = "correct"
    else:
        outcome.verdict = "wrong"
        outcome.note = f"expected {outcome.expected!r}"


@dataclass
class Report:
    url: str
    api: str
    concurrency: int
    planned: int
    started_at: float  # wall clock, seconds since the epoch
    duration_s: float
    outcomes: list[Outcome]
    # (seconds since the run began, app-tier instances pending or running)
    instance_samples: list[tuple[float, int]] = field(default_factory=list)
    interrupted: bool = False
    abandoned: int = 0  # requests in flight at the second Ctrl-C, left unanswered
    idempotency_keys: bool = False  # uploads cut off mid-request were sent again too
    # Answers were to be checked against an --expected CSV: a run that checked none is no PASS.
    checked_against_csv: bool = False

    def _count(self, verdict: str) -> int:
        return sum(1 for o in self.outcomes if o.verdict == verdict)

    @property
    def sent(self) -> int:
        """Requests sent: those that reached the web tier (answered or not), and those
        abandoned in flight. One that never connected sent nothing (reviewer)."""
        return sum(1 for o in self.outcomes if o.reached) + self.abandoned

    @property
    def not_sent(self) -> int:
        """Requests that never reached the web tier: never connected (see `unreached`),
        or never started (the run interrupted first)."""
        return self.planned - self.sent

    @property
    def unreached(self) -> int:
        """Requests tried that never connected (refused, unreachable, failed TLS)."""
        return self._count("not sent")

    @property
    def answered(self) -> int:
        return sum(1 for o in self.outcomes if o.answered)

    @property
    def failed(self) -> int:
        """Requests that reached the web tier and got no usable answer (never more than `sent`)."""
        return self._count("failed")

    @property
    def wrong(self) -> int:
        return self._count("wrong")

    @property
    def correct(self) -> int:
        return self._count("correct")

    @property
    def unchecked(self) -> int:
        return self._count("unchecked")

    @property
    def untrained(self) -> bool:
        return any(o.untrained for o in self.outcomes)

    @property
    def resent(self) -> int:
        return sum(o.resent for o in self.outcomes)

    @property
    def answered_later(self) -> int:
        """Answered from /api/jobs, after a 503 or 504 said the image was queued."""
        return sum(1 for o in self.outcomes if o.via and o.answered)

    @property
    def latencies(self) -> list[float]:
        # Failures are left out: a timeout's "latency" is only how long we waited.
        return [o.latency_s for o in self.outcomes if o.answered]

    def latency_stats(self) -> dict[str, float | None]:
        values = self.latencies
        return {
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "max": max(values) if values else None,
            "mean": sum(values) / len(values) if values else None,
        }

    @property
    def throughput(self) -> float:
        """Answered images per second of wall-clock time."""
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def course_average_latency(self) -> float | None:
        """The course's figure: total duration divided by the number of requests that
        ended (None when nothing was answered: it would measure only how fast they
        failed; abandoned ones did not end within the duration)."""
        return self.duration_s / len(self.outcomes) if self.answered else None

    @property
    def peak_instances(self) -> int | None:
        return max((n for _, n in self.instance_samples), default=None)

    @property
    def checked_nothing(self) -> bool:
        """An --expected CSV was given, and not one answer was checked against it."""
        return self.checked_against_csv and self.correct + self.wrong == 0

    @property
    def ok(self) -> bool:
        return (
            not self.interrupted
            and self.sent == self.planned
            and self.failed == 0
            and self.wrong == 0
            and not self.checked_nothing
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "api": self.api,
            "idempotency_keys": self.idempotency_keys,
            "concurrency": self.concurrency,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "planned": self.planned,
            "sent": self.sent,
            "not_sent": self.not_sent,
            "answered": self.answered,
            "failed": self.failed,
            "wrong": self.wrong,
            "correct": self.correct,
            "unchecked": self.unchecked,
            "throughput_images_per_s": self.throughput,
            "latency_s": self.latency_stats(),
            "course_average_latency_s": self.course_average_latency,
            "untrained": self.untrained,
            "peak_instances": self.peak_instances,
            "interrupted": self.interrupted,
            "abandoned": self.abandoned,
            "resent": self.resent,
            "ok": self.ok,
            "instances": [{"t_s": t, "pending_running": n} for t, n in self.instance_samples],
            "requests": [
                {
                    "index": o.index,
                    "file": o.file,
                    "started_s": o.started_s,
                    "latency_s": o.latency_s,
                    "status": o.status,
                    "answer": o.answer_name,
                    "label": o.label,
                    "expected": o.expected,
                    "verdict": o.verdict,
                    "error": o.error,
                    "note": o.note,
                    "untrained": o.untrained,
                    "resent": o.resent,
                    "via": o.via,
                    "reached": o.reached,
                }
                for o in sorted(self.outcomes, key=lambda o: o.index)
            ],
        }
