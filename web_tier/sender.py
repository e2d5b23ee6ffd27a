"""Request messages sent to SQS in batches, by group commit.

Every upload needs one message on the request queue. One SendMessage per
image costs a round trip, a billed request and ~2 ms of CPU (client and
server) each. Here, a caller that finds fewer than MAX_SENDS_IN_FLIGHT sends
under way sends at once, so a lone request waits for nothing; callers that
arrive while those are in flight wait for one to end, and then go out together
in one SendMessageBatch of up to ten. The batch size follows the load by
itself, with no timer to tune.

`send` returns only once SQS has accepted the message, and raises SendError if
it did not, or if no answer said (`maybe_taken`), so the caller still decides
what a failure costs (the upload's 503, or its being queued again later).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.aws_errors import UNTOLD_TRIES, error_reason
from common.messages import MessageAttributes
from common.sqs import SQS_MAX_BATCH

# Two, not one: a send that stalls (a dead pooled connection waits out botocore's read
# timeout, SEND_READ_TIMEOUT_S a try) would hold up every upload of the process behind
# it. More would split the batches further under load, each call costing its own CPU.
MAX_SENDS_IN_FLIGHT = 2


class SendError(Exception):
    """SQS did not accept a message, or (`maybe_taken`) no answer said whether it did:
    a try of its call had none, or SQS failed it (botocore raises only the last try's
    error, which may be a refusal after a try SQS took)."""

    def __init__(self, reason: str, maybe_taken: bool = False) -> None:
        super().__init__(reason)
        self.maybe_taken = maybe_taken


@dataclass
class _Message:
    body: str
    attributes: MessageAttributes
    # Its caller's own wake-up, on the sender's lock: notified when the message is done,
    # or when its caller may start a send (see _wake_next_sender).
    wake: threading.Condition
    taken: bool = False  # into a send under way
    # Its caller is sending others' messages (older ones, ten of them), its own still
    # waiting: woken now, it could not act on it (see _wake_next_sender).
    sending: bool = False
    done: bool = False
    error: BaseException | None = None


class BatchingSender:
    """Sends messages to one queue; safe to call from any number of threads."""

    def __init__(self, sqs: Callable[[], Any], queue_url: Callable[[], str],
                 condition: Callable[[Any], threading.Condition] = threading.Condition) -> None:
        """`condition` makes each caller's wake-up on the sender's lock: a test's, to
        watch the wake-ups through Condition's public wait and notify
        (tests/unit/test_web_sender.py); threading.Condition otherwise."""
        # Asked for at each send, not kept: Aws.sqs makes a new client until one has
        # credentials, and one kept from a start without them failed every send.
        self.sqs = sqs
        self.queue_url = queue_url
        self._condition = condition
        self._lock = threading.Lock()
        self._waiting: deque[_Message] = deque()  # untaken, oldest first
        self._sends_in_flight = 0

    def send(self, body: str, attributes: MessageAttributes | None = None) -> None:
        """Put one message, with its message attributes if any, on the queue; raise
        SendError if it is not there, or may not be."""
        # Wake-ups are each caller's own, not one condition for all: with 800 callers
        # waiting (a big upload), every send that ended woke all 800 to look and sleep
        # again, ~1 ms of CPU a message, half what batching saves (bench/sender.py).
        message = _Message(body, attributes or {}, self._condition(self._lock))
        with self._lock:
            self._waiting.append(message)
            try:
                while not message.done:
                    if message.taken or self._sends_in_flight >= MAX_SENDS_IN_FLIGHT:
                        # (Taken: another caller sends it. Not this caller's to send others'
                        # after it, a send that could stall while its own is long done.)
                        message.wake.wait()
                        continue
                    # Room for a send: this caller sends the oldest waiting messages, its
                    # own among them or ahead of it, and loops until its own is out.
                    batch = [self._waiting.popleft() for _ in range(min(SQS_MAX_BATCH, len(self._waiting)))]
                    for taken in batch:
                        taken.taken = True
                    self._sends_in_flight += 1
                    message.sending = True
                    self._wake_next_sender()  # a slot may still be free, for those left
                    self._lock.release()
                    try:
                        self._send_batch(batch)
                    finally:
                        self._lock.acquire()
                        self._sends_in_flight -= 1
                        message.sending = False
                        for sent in batch:
                            sent.done = True
                            sent.wake.notify()
                        self._wake_next_sender()
            finally:
                if not message.taken:
                    # This caller was interrupted (a KeyboardInterrupt in a main thread, a
                    # SystemExit; not so gunicorn's request threads, which get no signals)
                    # with its message still waiting: sent later, it would be queued while
                    # its caller heard it was not.
                    self._waiting.remove(message)
                    self._wake_next_sender()
        if message.error is not None:
            raise message.error

    def _wake_next_sender(self) -> None:
        """With a send slot free, wake the caller of the oldest untaken message that is
        not busy sending others' (at most MAX_SENDS_IN_FLIGHT are): it sends the next
        batch, the oldest messages. (Holding the lock.) Notified while in its own send,
        the oldest's caller would have let the slot sit idle, every upload after it
        waiting for that send, however long it stalls. Should a caller just
        arrived take the slot first, its batch holds the woken caller's message too,
        unless ten or more are ahead of it."""
        if self._sends_in_flight >= MAX_SENDS_IN_FLIGHT:
            return
        for waiting in self._waiting:
            if not waiting.sending:
                waiting.wake.notify()
                return

    def _send_batch(self, batch: list[_Message]) -> None:
        """Send `batch`, setting the error of each message that failed."""
        UNTOLD_TRIES.count = 0  # this thread's, counted from here (common/aws.py)
        try:
            reply = self.sqs().send_message_batch(
                QueueUrl=self.queue_url(),
                Entries=[_entry(n, m) for n, m in enumerate(batch)],
            )
            # Refused now, perhaps after a try that had no answer and that SQS took.
            maybe_taken = UNTOLD_TRIES.count > 0
            for failed in reply.get("Failed", []):
                reason = failed.get("Message") or failed.get("Code") or "refused"
                batch[int(failed["Id"])].error = SendError(f"SQS did not accept the message: {reason}",
                                                           maybe_taken)
        except Exception as exc:  # botocore's, or anything else: each caller hears it
            # A try that had no answer may have been taken, however the last one failed: a
            # caller that deleted its image and answered "not stored" would then have its
            # request answered "image missing", or answered after its 503, and sent twice.
            maybe_taken = UNTOLD_TRIES.count > 0
            for message in batch:
                message.error = SendError(f"the send failed ({error_reason(exc)})", maybe_taken)
                message.error.__cause__ = exc
        except BaseException as exc:
            # An interruption of this thread (KeyboardInterrupt, SystemExit): it is
            # not known whether SQS took the batch, so no caller may return as if it had.
            for message in batch:
                message.error = SendError(f"the send was interrupted: {exc!r}")
            raise


def _entry(n: int, message: _Message) -> dict[str, Any]:
    """`message` as entry `n` of a SendMessageBatch."""
    entry: dict[str, Any] = {"Id": str(n), "MessageBody": message.body}
    if message.attributes:
        entry["MessageAttributes"] = message.attributes
    return entry
