"""The bench's deadline: `make bench` must end within 10 minutes here (~3.5 normally).

A broken stack's timeouts, each phase waiting out its own, can add up to over an
hour, and one phase started just before the deadline, its 300 requests at 120 s each,
to ~6 minutes more. So at the deadline no part or phase starts, and one under way is
stopped: what is left after it (the stack's stop, at most 15 s, and the report) ends
well within the tenth minute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BENCH_DEADLINE_S = 9 * 60.0


class DeadlinePassed(RuntimeError):
    """A measurement stopped because the bench's deadline passed while it ran."""


@dataclass
class Deadline:
    """When the bench starts no more phases, and stops those under way."""

    seconds: float = BENCH_DEADLINE_S
    started: float = field(default_factory=time.monotonic)

    @property
    def at(self) -> float:
        """The deadline as a time.monotonic() instant."""
        return self.started + self.seconds

    def passed(self) -> str | None:
        """Why a phase is not started now; None while there is time."""
        if time.monotonic() < self.at:
            return None
        return f"the bench's deadline passed ({self.seconds / 60:g} min from its start)"

    def during(self, what: str) -> str:
        """Why `what`, under way at the deadline, was stopped."""
        return f"the bench's deadline passed during {what} ({self.seconds / 60:g} min from its start)"

    def within(self, seconds: float) -> float:
        """`seconds`, or what is left before the deadline when that is less (never below 0)."""
        return max(0.0, min(seconds, self.at - time.monotonic()))


def within(deadline: Deadline | None, seconds: float) -> float:
    """A wait of `seconds`, cut to the time left before `deadline` (None: no deadline)."""
    return deadline.within(seconds) if deadline else seconds
