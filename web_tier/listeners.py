"""Threads that carry answers from SQS into the result book.

Two threads long-poll the response queue; one polls the dead-letter queue,
where requests land after MAX_RECEIVE_COUNT receives that each ended unanswered
(a worker crashed, stalled or was killed holding it, or S3 or SQS failed). A message is
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

from botocore.exceptions import ParamValidationError

from common.aws import Aws
from common.aws_errors import AWS_ERRORS
from common.backoff import next_wait
from common.config import MARK_DENIED_RETRY_S, SHORT_POLL_PAUSE_S
from common.failure_tags import (
    DEAD_LETTER_ERROR,
    MarkDenied,
    SentAgain,
    failed_by,
    failure_from_tags,
    give_up_denied_mark,
    sent_again_from_tags,
)
from common.messages import ClassifyRequest, ClassifyResponse, MessageError
from common.sqs import FIRST_RECEIVED_ATTRIBUTE, change_visibility, first_received_s
from web_tier.rebuild import with_stored_outcome
from web_tier.results import DONE, Item, ResultBook, batch_id_of
from web_tier.storage import clear_failed, input_tags, tag_failed

log = logging.getLogger(__name__)

RESPONSE_THREADS = 2
# Each poll's wait, shorter than the workers' RECEIVE_WAIT: a stopping process waits for
# its polls to end (gunicorn.conf.py, worker_exit), within gunicorn's 5 s of grace. A
# poll cut off by its process's exit is still open on SQS's side, which hands it the
# messages that arrive in the rest of its wait, hidden then for the queue's visibility
# timeout: after a restart, the answers of its first 20 s would come 30 s late.
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
        done = []
        for message in messages:
            try:
                request = ClassifyRequest.from_json(message["Body"])
            except MessageError as exc:
                log.warning("dropping malformed dead letter: %s", exc)
                done.append(message)
                continue
            try:
                self._dead_letter(request, first_received_s(message))
            except MarkDenied as exc:
                # Perhaps a role or policy still reaching every endpoint: left in the queue,
                # tried again after its visibility timeout (a warning each time, no traceback).
                log.warning("item %s: its input not marked failed yet; tried again when the dead letter "
                            "comes back, until %.0f min after its first receive: %s", request.id,
                            MARK_DENIED_RETRY_S / 60, exc)
                continue
            except ParamValidationError:  # botocore refused to send it: it would, every time
                self._drop_dead_letter(request)
            except AWS_ERRORS:
                # AWS failing: left in the queue, it comes back after its visibility timeout.
                log.exception("could not handle dead letter for %s", request.id)
                continue
            except Exception:
                # Anything else fails the same way each time it comes back, every 30 s for
                # the queue's 14 days. Failed here, and dropped.
                self._drop_dead_letter(request)
            done.append(message)
        self._delete(url, done)

    def _input_tags(self, request: ClassifyRequest) -> list[dict[str, str]] | None:
        """The tags of the dead letter's input object; None if they cannot be read (the
        object gone, S3 failing or refusing), and the dead letter is then handled as if
        its item was never sent again: it fails the item, and marks it failed."""
        try:
            return input_tags(self.aws, request.key)
        except AWS_ERRORS as exc:
            log.warning("item %s: could not read its input's tags, to tell a dead letter of a copy "
                        "sent before it was queued again: %s", request.id, exc)
            return None

    def _drop_dead_letter(self, request: ClassifyRequest) -> None:
        log.exception("cannot handle dead letter for %s; failed unmarked, and dropped", request.id)
        try:
            self.book.fail(request.id, DEAD_LETTER_ERROR, key=request.key, filename=request.filename,
                           sent_before=request.sent_at)
        except Exception:  # the other dead letters received with it are still to be deleted
            log.exception("could not fail item %s", request.id)

    def _dead_letter(self, request: ClassifyRequest, first_received: float | None) -> None:
        """Answer a dead letter; `first_received`: when SQS says its message was first
        received (seconds since the epoch), which bounds the retries of a mark S3 denies."""
        known = self.book.get(request.id)
        if known is not None and known.is_finished and not known.provisional:
            return  # answered, or failed by a worker (which marked the object itself)
        if (again := self._queued_again_since(request)) is not None:
            # A copy sent before the item was queued again (POST .../again): that one,
            # sent since, may yet be answered. Failed and tagged now, the item would show
            # failed while queued, and a batch rebuilt from S3 fail for good.
            self._put_back_sent_again(request, again)
            return
        # A worker stores the outcome (a result, or a failure and its reason) before it
        # replies: one that died in between, on the last attempt, left an outcome that
        # stands, and tells the user more than "failed on every attempt".
        # A worker that finds its copies used up the attempts reads the same (app_tier/worker.py).
        # Read here, once, for an item the book does not hold: its failure mark, and when
        # it was sent again (below).
        tag_set = self._input_tags(request) if known is None else None
        item = Item(request.id, batch_id_of(request.key), request.filename, request.key)
        stored = with_stored_outcome(self.aws, item, tag_set)
        if stored.is_finished:
            # A stored failure may be the mark this copy's earlier dead letter left, on an
            # item queued again since: no failure of it then. A result stands whatever copy
            # made it.
            if self.book.record_item(stored, None if stored.state == DONE else request.sent_at):
                log.info("item %s: its outcome was stored but never sent; taken from S3", request.id)
            return
        sent = _sent_again(known, tag_set)
        if known is None and request.sent_at < sent.at:
            # As above, for an item queued again by a process before this one: its input
            # object's mark says when. Failed and tagged, the item would show failed in a batch
            # rebuilt from S3 while the request sent since was under way.
            log.info("item %s: a dead letter of a copy sent before it was queued again (before a "
                     "restart); ignored", request.id)
            return
        # The waiting client first: the book is memory, and failing twice changes nothing.
        # The count and time for an item the book learns of here; one it holds has its own.
        if self.book.fail(request.id, DEAD_LETTER_ERROR, key=request.key, filename=request.filename,
                          sent=sent if known is None else None, sent_before=request.sent_at):
            log.info("item %s failed on every attempt", request.id)
        if self._queued_again_since(request) is not None:
            return
        # Then the lasting record, for a batch rebuilt from S3. If this raises, the
        # message stays and comes back. A mark S3 will never take (the object gone, a
        # tag refused) is given up: kept, the message came back every 30 s for 14 days.
        # So is one S3 has denied for MARK_DENIED_RETRY_S: a role without the right.
        try:
            why_not = tag_failed(self.aws, request.key, DEAD_LETTER_ERROR, sent)
        except MarkDenied as exc:
            if not give_up_denied_mark(request.id, exc, first_received, time.time()):  # SQS's clock
                raise
            return
        if why_not:
            log.warning("item %s: its input not marked failed: %s", request.id, why_not)
        elif (again := self._queued_again_since(request)) is not None:
            # Queued again while this marked it, the mark may have landed after the one
            # POST .../again wrote: put that one back, or a batch rebuilt after a restart
            # would show it failed, with the count of times sent again lost. If S3
            # fails that, the message stays, and comes back to the call above.
            clear_failed(self.aws, request.key, again.sent_again_record)

    def _put_back_sent_again(self, request: ClassifyRequest, again: Item) -> None:
        """Put the sent-again mark back on the input of `again`, an item queued again
        since `request` was sent, if a dead letter's failure mark of an older copy is
        there instead: one whose put-back failed once (below) left it. Read from S3, not
        remembered, so it is tried each time the dead letter comes back; S3's errors
        raise, and keep it coming."""
        tag_set = input_tags(self.aws, request.key)
        if (tag_set is None or failure_from_tags(tag_set) is None or failed_by(tag_set)
                or sent_again_from_tags(tag_set).count >= again.sent_again):
            return  # gone, not failed, a worker's failure (of the copy sent since), or current
        log.info("item %s: putting back the sent-again mark a dead letter's failure mark replaced",
                 request.id)
        clear_failed(self.aws, request.key, again.sent_again_record)

    def _queued_again_since(self, request: ClassifyRequest) -> Item | None:
        """The dead letter's item if the book has it queued again since the request was
        sent (then the dead letter is of an older copy, and leaves it as it is)."""
        known = self.book.get(request.id)
        if known is None or request.sent_at >= known.requeued_at:
            return None
        log.info("item %s: a dead letter of a copy sent before it was queued again; ignored", request.id)
        return known


def _sent_again(known: Item | None, tag_set: list[dict[str, str]] | None) -> SentAgain:
    """How often, and when last, the item of a dead letter was sent again: as the book
    holds it, else as its input object's tags say (none if they could not be read)."""
    if known is not None:
        return known.sent_again_record
    return sent_again_from_tags(tag_set or [])
