"""Threads that carry answers from SQS into the result book.

Two threads long-poll the response queue; one polls the dead-letter queue,
where requests land after MAX_RECEIVE_COUNT receives that each ended unanswered
(web_tier/dead_letters.py answers them). A message is
deleted only after it is recorded, so a crash in between means a redelivery:
ignored as a duplicate by a book that has it, or kept, after a restart, for the
GET that rebuilds its batch from S3.

They stop once the book closes (SIGTERM), and hand back to the queue what they
receive then: in a reload, the old process's last polls must not take the new one's
answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from common.aws import Aws
from common.backoff import next_wait
from common.config import SHORT_POLL_PAUSE_S
from common.messages import ClassifyResponse, MessageError
from common.sqs import FIRST_RECEIVED_ATTRIBUTE, change_visibility
from web_tier.dead_letters import DeadLetters
from web_tier.results import ResultBook

log = logging.getLogger(__name__)

RESPONSE_THREADS = 2
# Each poll's wait, shorter than the workers' RECEIVE_WAIT: a stopping process waits for
# its polls to end (gunicorn.conf.py, worker_exit), within gunicorn's 5 s of grace. A
# poll cut off by its process's exit is still open on SQS's side, which hands it the
# messages that arrive in the rest of its wait, hidden then for the queue's visibility
# timeout (RESPONSE_VISIBILITY_TIMEOUT_S): after a restart, the answers of its first
# 20 s would come that much late.
MAX_WAIT_S = 4
# Between failed polls. At most 5 s, so that once SQS is back the answers waiting
# there reach their clients within seconds (at 30 s, after an outage of half a
# minute, every waiting request waited up to 30 s more); each failed poll has
# already been retried by botocore (standard mode: six attempts, with backoff).
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 5.0


class Listeners:
    """The listener threads of one process; `start()` once, `stop()` at the end."""

    def __init__(self, aws: Aws, book: ResultBook, *, wait_s: int = MAX_WAIT_S,
                 response_threads: int = RESPONSE_THREADS) -> None:
        self.aws = aws
        self.book = book
        self.dead_letters = DeadLetters(aws, book)
        self.wait_s = min(wait_s, MAX_WAIT_S)  # RECEIVE_WAIT (0-20), capped: see MAX_WAIT_S
        self.response_threads = response_threads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        loops: list[tuple[str, Callable[[], None]]] = [
            (f"responses-{n}", self.poll_responses) for n in range(self.response_threads)
        ]
        loops.append(("dead-letters", self.poll_dead_letters))
        for name, poll in loops:
            # Daemon: a long poll in flight must not hold up process exit.
            thread = threading.Thread(target=self._run, args=(poll,), name=f"web-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Ask every thread to stop; wait up to `timeout` in all for them to end (each
        ends its poll in flight first)."""
        self._stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self, poll: Callable[[], None]) -> None:
        backoff = 0.0
        failures = 0  # in a row
        # The book closing (SIGTERM) ends them too: nobody here waits for answers any
        # more, and during a reload the answers in the shared queues are the new process's.
        while not (self._stop.is_set() or self.book.closing.is_set()):
            try:
                poll()
                if failures:
                    log.info("listener polling again after %d failed polls", failures)
                failures, backoff = 0, 0.0
            except Exception as exc:
                failures += 1
                backoff = next_wait(backoff, MIN_BACKOFF_S, MAX_BACKOFF_S)
                # The traceback once: at every retry, with botocore's chained errors, it
                # would be 2,246 log lines in 35 s of an unreachable AWS.
                if failures == 1:
                    log.exception("listener failed; retrying in %.0f s", backoff)
                else:
                    log.warning("listener failed again (%d in a row): %s: %s; retrying in %.0f s",
                                failures, type(exc).__name__, exc, backoff)
                # Waiting on the event, not sleeping, so stop() ends the wait at once.
                if self._stop.wait(backoff):
                    break

    def _receive(self, queue_url: str, attributes: tuple[str, ...] = ()) -> list[dict]:
        answer = self.aws.sqs_receive.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=self.wait_s,
            **({"MessageSystemAttributeNames": list(attributes)} if attributes else {}),
        )
        messages = answer.get("Messages", [])
        if not messages and not self.wait_s:
            self._stop.wait(SHORT_POLL_PAUSE_S)
        if messages and (self.book.closing.is_set() or self._stop.is_set()):
            # Received by a poll in flight when the book closed, or the listeners were
            # told to stop (any stop of the process: gunicorn's worker_exit waits for these
            # polls): recorded here and deleted, they would be lost to the process that serves
            # on (its items queued for ever). Handed back at once; if that fails, they come
            # back after the queue's visibility timeout all the same.
            self._hand_back(queue_url, messages)
            return []
        return messages

    def _hand_back(self, queue_url: str, messages: list[dict]) -> None:
        failures = change_visibility(self.aws.sqs, queue_url, [(m["ReceiptHandle"], 0) for m in messages])
        if failures:
            reasons = "; ".join(sorted({f.reason for f in failures}))
            log.warning("could not hand back %d of %d messages received while stopping (%s): they "
                        "come back after the queue's visibility timeout", len(failures), len(messages),
                        reasons)
        if len(failures) < len(messages):
            # Not "for the process that serves on": under make run none does.
            log.info("handed back %d messages received while stopping, for whichever process reads the "
                     "queue next", len(messages) - len(failures))

    def _delete(self, queue_url: str, messages: list[dict]) -> None:
        if not messages:
            return
        entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(messages)]
        failed = self.aws.sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed", [])
        for entry in failed:
            # The message comes back later and is then ignored as a duplicate.
            log.warning("could not delete message: %s", entry.get("Message") or entry.get("Code"))

    def poll_responses(self) -> None:
        url = self.aws.response_queue_url
        messages = self._receive(url)
        for message in messages:
            try:
                response = ClassifyResponse.from_json(message["Body"])
            except MessageError as exc:
                # Deleted anyway: a malformed message would otherwise return forever.
                log.warning("dropping malformed response: %s", exc)
                continue
            if self.book.record(response) is None:
                log.debug("duplicate response for %s ignored", response.id)
        self._delete(url, messages)

    def poll_dead_letters(self) -> None:
        url = self.aws.dead_letter_queue_url
        messages = self._receive(url, (FIRST_RECEIVED_ATTRIBUTE,))
        self._delete(url, self.dead_letters.handle(messages))
