"""What the web tier does with a request that landed in the dead-letter queue, after
MAX_RECEIVE_COUNT receives that each ended unanswered (a worker crashed, stalled or was
killed holding it, or S3 or SQS failed): its item failed, in the book and on its input
object, unless an outcome was stored after all or the item was queued again since.
The listeners (web_tier/listeners.py) receive the dead letters and delete what
`handle` says is done."""

from __future__ import annotations

import logging
import time

from botocore.exceptions import ParamValidationError

from common.aws import Aws
from common.aws_errors import AWS_ERRORS, is_outage
from common.config import MARK_DENIED_RETRY_S
from common.failure_tags import (
    DEAD_LETTER_ERROR,
    MarkDenied,
    SentAgain,
    failed_by,
    failure_from_tags,
    give_up_denied_mark,
    sent_again_from_tags,
)
from common.messages import ClassifyRequest, MessageError
from common.sqs import first_received_s
from web_tier.rebuild import with_stored_outcome
from web_tier.results import DONE, Item, ResultBook, batch_id_of
from web_tier.storage import clear_failed, input_tags, tag_failed

log = logging.getLogger(__name__)


class DeadLetters:
    """Answers the dead letters of one web tier process's book."""

    def __init__(self, aws: Aws, book: ResultBook) -> None:
        self.aws = aws
        self.book = book

    def handle(self, messages: list[dict]) -> list[dict]:
        """Answer each dead letter received; the messages done with, to be deleted. Those
        left out come back after their visibility timeout, to be tried again."""
        done = []
        for message in messages:
            try:
                request = ClassifyRequest.from_json(message["Body"])
            except MessageError as exc:
                log.warning("dropping malformed dead letter: %s", exc)
                done.append(message)
                continue
            try:
                self.answer(request, first_received_s(message))
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
        return done

    def _input_tags(self, request: ClassifyRequest) -> list[dict[str, str]] | None:
        """The tags of the dead letter's input object; None if they cannot be read (the
        object gone, S3 refusing), and the dead letter is then handled as if its item
        was never sent again: it fails the item, and marks it failed. S3 failing raises:
        the dead letter comes back once it may answer, rather than fail an item queued
        again and overwrite the mark that says so."""
        try:
            return input_tags(self.aws, request.key)
        except AWS_ERRORS as exc:
            if is_outage(exc):
                raise
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

    def answer(self, request: ClassifyRequest, first_received: float | None) -> None:
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
        # A worker that finds its copies used up the attempts reads the same (app_tier/fetch.py).
        # The input's tags read here, once: its failure mark, and when it was sent again
        # (below). Tags S3 refuses to show count as none: read again for the outcome, the
        # refusal raised, and the dead letter came back for the queue's 14 days.
        tag_set = self._input_tags(request)
        item = Item(request.id, batch_id_of(request.key), request.filename, request.key)
        stored = with_stored_outcome(self.aws, item, [] if tag_set is None else tag_set)
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
