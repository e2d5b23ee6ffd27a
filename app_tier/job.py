"""One received request, as a worker carries it from its receive to its answer: what
was received, and what became of it so far (its pixels, or why it failed, or the
answer an earlier attempt stored)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from common.messages import ClassifyRequest, ClassifyResponse


# Compared by identity (`job in jobs`): each is one receive, and comparing fields would
# compare pixel arrays, which have no single truth value, once message ids were equal.
@dataclass(eq=False)
class Job:
    """One received request and what became of it so far."""

    message_id: str
    receipt: str
    request: ClassifyRequest
    # Receives of this request so far, this one included, by earlier copies too.
    receive_count: int = 1
    pixels: np.ndarray | None = None
    error: str | None = None
    # The name as uploaded, read from the input object: the request carries it cut.
    filename: str | None = None
    # Its copies together used up max_receive_count attempts (app_tier/fetch.py):
    # it is not read again, only answered.
    attempts_used_up: bool = False
    # For such a request, the answer an earlier attempt stored before it died unanswered
    # (app_tier/stored_answer.py): sent as it is, and not stored again.
    stored_answer: ClassifyResponse | None = None
    # Until when (time.time()) its message is hidden at the latest, for the journal.
    hidden_until: float = 0.0
    # When SQS says this copy of the request was first received (seconds since the
    # epoch); None if it did not say. Bounds the retries of a failure mark S3 denies.
    first_received: float | None = None

    @cached_property
    def request_body(self) -> str:
        """The request as this worker sends it again (a hand-back), and writes it in its
        journal (app_tier/held_journal.py): made once, as the journal is written often."""
        return self.request.to_json()

    @property
    def settled(self) -> bool:
        """Whether there is something to answer it with: pixels to classify, a reason
        it failed, or a stored answer. An unsettled job goes back to the queue."""
        return self.pixels is not None or self.error is not None or self.stored_answer is not None
