"""Request messages sent to SQS in batches, by group commit.

Every upload needs one message on the request queue. One SendMessage per
image costs a round trip, a billed request and ~2 ms of CPU (client and
server) each. Here, a caller that finds fewer than MAX_SENDS_IN_FLIGHT sends
under way sends at once, so a lone request waits for nothing; callers that
arrive while those are in flight wait for one to end, and then go out together
in one SendMessageBatch of up to ten. The batch size follows the load by
itself, with no timer to tune.

`send` returns only once SQS has accepted the message, and raises if it did
not, so the caller still decides what a failure costs (the upload's 503).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.aws import SQS_MAX_BATCH

# Two, not one: a send that stalls (a dead pooled connection waits out botocore's read
# timeout, 30 s a try) held up every upload of the process behind it (reviewer). More
# would split the batches further under load, each call costing its own CPU.
MAX_SENDS_IN_FLIGHT = 2


class SendError(Exception):
    """SQS did not accept a message."""


@dataclass
class _Message:
    body: str
    taken: bool = False  # into a send under way
    done: bool = False
    error: Exception | None = None


class BatchingSender:
    """Sends message bodies to one queue; safe to call from any number of threads."""

    def __init__(self, sqs: Callable[[], Any], queue_url: Callable[[], str]) -> None:
        # Asked for at each send, not kept: Aws.sqs makes a new client until one has
        # credentials, and one kept from a start without them failed every send.
        self.sqs = sqs
        self.queue_url = queue_url
        self._cond = threading.Condition()
        self._waiting: list[_Message] = []
        self._sends_in_flight = 0

    def send(self, body: str) -> None:
        """Put one message on the queue; raise SendError (or botocore's error) if it is not there."""
        message = _Message(body)
        with self._cond:
            self._waiting.append(message)
            while not message.done:
                if message.taken or self._sends_in_flight >= MAX_SENDS_IN_FLIGHT:
                    # (Taken: another caller sends it. Not this caller's to send others'
                    # after it, a send that could stall while its own is long done.)
                    self._cond.wait()
                    continue
                # Room for a send: this caller sends the oldest waiting messages, its
                # own among them or ahead of it, and loops until its own is out.
                batch, self._waiting = self._waiting[:SQS_MAX_BATCH], self._waiting[SQS_MAX_BATCH:]
                for taken in batch:
                    taken.taken = True
                self._sends_in_flight += 1
                self._cond.release()
                try:
                    self._send_batch(batch)
                finally:
                    self._cond.acquire()
                    self._sends_in_flight -= 1
                    self._cond.notify_all()
        if message.error is not None:
            raise message.error

    def _send_batch(self, batch: list[_Message]) -> None:
        """Send `batch`, marking every message done, with the error of each that failed."""
        try:
            reply = self.sqs().send_message_batch(
                QueueUrl=self.queue_url(),
                Entries=[{"Id": str(n), "MessageBody": m.body} for n, m in enumerate(batch)],
            )
            for failed in reply.get("Failed", []):
                reason = failed.get("Message") or failed.get("Code") or "refused"
                batch[int(failed["Id"])].error = SendError(f"SQS did not accept the message: {reason}")
        except Exception as exc:  # botocore's, or anything else: no waiter may be left waiting
            for message in batch:
                message.error = exc
        finally:
            for message in batch:
                message.done = True
