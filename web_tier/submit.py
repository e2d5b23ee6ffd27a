"""Turning accepted uploads into stored objects and queued requests."""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
import unicodedata
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field

from common.aws import Aws
from common.aws_errors import error_reason, is_outage
from common.failure_tags import DEAD_LETTER_ERROR, NEVER_SENT_AGAIN, SentAgain, sent_again_from_tags
from common.messages import ClassifyRequest, MessageAttributes, MessageError, prior_receives_attribute
from common.names import object_key
from web_tier.image_check import Upload
from web_tier.journal import Journal
from web_tier.refusals import Code, Refusal
from web_tier.results import DONE, QUEUED, Item, ResultBook
from web_tier.sender import BatchingSender, SendError
from web_tier.storage import clear_failed, head, input_tags, put_input, tag_failed

log = logging.getLogger(__name__)

# Uploads of one request go to S3 this many at a time.
UPLOAD_THREADS = 16
# The answer to a file sent again while the first request with its token still stores it.
STILL_STORING = "an earlier request with the same token is storing this file; send it again"


def new_id() -> str:
    return uuid.uuid4().hex


def _same_name(name: str) -> str:
    return unicodedata.normalize("NFC", name)


class OrderedIds:
    """Item ids in the order they are made: 32 hex digits like every id here, the
    first 14 the microsecond of making (each later than the one before, as UUIDv7
    does), the rest random. S3 lists a batch's keys (`<batch>/<item>/<name>`) in
    key order, so a batch rebuilt from S3 comes back in upload order, across the
    chunks of one request and the requests that add to one batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_us = 0

    def next(self) -> str:
        with self._lock:
            self._last_us = max(time.time_ns() // 1000, self._last_us + 1)
            stamp = self._last_us
        return f"{stamp:014x}{uuid.uuid4().hex[14:]}"


@dataclass(frozen=True)
class SentBefore:
    """An upload sent again under a token its batch holds: `item` holds it, stored and queued."""

    item: Item


@dataclass
class Submitter:
    """Stores uploads in the input bucket and sends one request each."""

    aws: Aws
    book: ResultBook
    pool: Executor
    requests: BatchingSender
    # None: no journal (WEB_JOURNAL_DIR unwritable; Settings() in tests), and nothing requeued.
    journal: Journal | None = None
    ids: OrderedIds = field(default_factory=OrderedIds)
    # Stored with no request sent, to be queued by requeue_unsent: {item id: request body}.
    _unsent: dict[str, str] = field(default_factory=dict, init=False)
    _unsent_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # Items in the book whose image is not yet stored and queued (it may yet fail).
    _storing: set[str] = field(default_factory=set, init=False)
    _storing_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def submit(self, batch_id: str, uploads: list[Upload], tokens: list[str] | None = None
               ) -> list[Item | SentBefore | Refusal]:
        """Submit every upload of one request, concurrently; results in upload order.

        Items are in the book before their request is sent, so even the fastest
        answer finds its waiter. An upload whose token (`tokens`, one per upload)
        the batch already holds is not stored again: its result is SentBefore the
        item that holds it, once that is stored and queued. The caller has looked for
        the batch (in memory, else in S3) under ResultBook.in_use.
        """
        items = []
        for n, upload in enumerate(uploads):
            item_id = self.ids.next()
            key = object_key(batch_id, item_id, upload.filename)
            items.append(Item(item_id, batch_id, upload.filename, key, token=tokens[n] if tokens else "",
                              digest=hashlib.sha256(upload.data).hexdigest()))
        # Marked before they join the book, so that a request sending the same tokens
        # never takes one of them for stored while it may still fail.
        with self._storing_lock:
            self._storing.update(i.id for i in items)
        kept = self.book.add(batch_id, items)
        new = [n for n, holder in enumerate(kept) if holder is items[n]]
        outcomes: dict[int, Item | SentBefore | Refusal] = {
            n: self._sent_again(items[n], holder, uploads[n]) for n, holder in enumerate(kept) if n not in new
        }
        if len(new) == 1:
            outcomes[new[0]] = self._submit_one(items[new[0]], uploads[new[0]])
        else:
            futures = {n: self.pool.submit(self._submit_one, items[n], uploads[n]) for n in new}
            for n, future in futures.items():
                outcomes[n] = future.result()
        return [outcomes[n] for n in range(len(items))]

    def _sent_again(self, item: Item, holder: Item, upload: Upload) -> SentBefore | Refusal:
        """What an upload whose token the batch holds (in `holder`) is answered."""
        with self._storing_lock:
            self._storing.discard(item.id)  # never joined the book: nothing to store
            # Still being stored, or its storing failed since (it then left the book
            # before leaving _storing): either way not stored now, so not "sent before".
            stored = holder.id not in self._storing and self.book.get(holder.id) is not None
        # Compared as NFC: a file's name read from macOS's disk comes decomposed, from
        # another client composed, and a resend of it was refused a file of its own.
        if _same_name(holder.filename) != _same_name(upload.filename):  # another file, under a used token
            return Refusal(409, f"token {item.token!r} already names another file in this batch "
                                f"({holder.filename}): give each file its own token", upload.filename,
                           code=Code.TOKEN_CONFLICT)
        if holder.digest and holder.digest != item.digest:
            # Same name, other bytes (a file edited and sent again, or another's upload
            # planted under a guessable token): else it would have the first file's answer.
            return Refusal(409, f"token {item.token!r} already names another file of this name, "
                                "with other contents, in this batch: give each file its own token",
                           upload.filename, code=Code.TOKEN_CONFLICT)
        if not stored:
            return Refusal(503, STILL_STORING, upload.filename, code=Code.BUSY)
        return SentBefore(holder)

    def _submit_one(self, item: Item, upload: Upload) -> Item | Refusal:
        try:
            return self._store_and_queue(item, upload)
        finally:
            with self._storing_lock:
                self._storing.discard(item.id)

    def _store_and_queue(self, item: Item, upload: Upload) -> Item | Refusal:
        stored = False
        request = ClassifyRequest(
            id=item.id, bucket=self.aws.settings.input_bucket, key=item.key, filename=upload.filename
        ).to_json()
        self._begin(item.id, request)
        try:
            put_input(
                self.aws, item.key, upload.data, upload.content_type,
                filename=upload.filename, batch_id=item.batch_id or "", item_id=item.id, token=item.token,
                digest=item.digest,
            )
            stored = True
            self.requests.send(request)
        except SendError as exc:
            if not exc.maybe_taken:
                return self._refuse(item, upload, request, stored=True)
            # SQS may hold it: refused, its image deleted, it would be answered "image missing"
            # or classified after its 503 and again when sent again. So kept,
            # and accepted: requeue_unsent sends it unless its result is stored by then
            # (classified once a copy, the first result stored kept), as a journal's
            # requeue does.
            log.warning("item %s: its request may or may not be queued (%s): queued again later",
                        item.id, exc)
            self._retry_later(item.id, request)
            return item
        except Exception:
            return self._refuse(item, upload, request, stored)
        self._end(item.id)
        return item

    def _refuse(self, item: Item, upload: Upload, request: str, stored: bool) -> Item | Refusal:
        """What an upload whose put, or request, failed is answered: refused, its image
        deleted; or, if that delete fails, accepted, to be queued later."""
        # An AWS outage must cost this file, not the service.
        _log_failure("could not submit item %s", item.id)
        # Deleted even when the put raised: S3 may have stored it all the same (an
        # ambiguous 500, a timeout after the write), and a resend under its token
        # would then adopt it from S3, an item no request was ever sent for.
        unstored = self._unstore(item.key)
        if stored and not unstored:
            # Stored, with no message, and there to stay: queued later (requeue_unsent,
            # once SQS answers), as one whose web tier died between the two steps is.
            # So accepted: refused with "try again" (and Retry-After, which a refusal
            # that stored nothing says), it would be sent again and classified twice.
            self._retry_later(item.id, request)
            return item
        self.book.discard(item.id)
        if stored:
            self._end(item.id)
        else:
            # Refused: most likely never stored. Should it be there after all (the delete
            # failed too, or a put still under way landed after it), requeue_unsent,
            # which sends only what S3 has, queues it: classified, at worst as well as
            # its resend, never left queued for ever.
            self._retry_later(item.id, request)
        return Refusal(503, "could not be stored or queued; try again", upload.filename,
                       code=Code.AWS_UNAVAILABLE)

    def send_again(self, item_id: str) -> Item | Refusal:
        """Queue again, under its own id and key, an item a dead letter failed: the item
        queued, or why not.

        The item is queued in the book first, which only one of two requests at once
        does (the other is refused: one message, not two); its failure mark comes off
        the input object, so that a batch rebuilt from S3 shows it queued; then its new
        request is sent, marked seen before (PriorReceives), journaled as an upload's
        is, so that a web tier killed after the mark came off still has it sent
        (requeue_unsent, which marks it as its input's tags say). Its answer reaches it
        as any answer does; so does a late answer of the first copy, the first to come
        winning. A copy of the old request dead-lettered later is ignored (listeners.py).
        """
        before = self.book.get(item_id)  # as a send undone puts it back (_undo_again)
        again = self.book.queue_again(item_id, time.time())
        previous = before.sent_again_record if before is not None else NEVER_SENT_AGAIN
        if again is None:
            now = self.book.get(item_id)
            if now is None:  # forgotten since its batch was found: evicted
                return Refusal(404, f"no such item: {item_id[:64]}", code=Code.UNKNOWN_ITEM)
            return Refusal(409, _why_not_again(now), code=Code.NOT_SENT_AGAIN)
        # Sent at the moment it was queued again: any copy sent before is older.
        request = ClassifyRequest(id=again.id, bucket=self.aws.settings.input_bucket, key=again.key,
                                  filename=again.filename, sent_at=again.requeued_at).to_json()
        self._begin(again.id, request)
        try:
            stored = clear_failed(self.aws, again.key, again.sent_again_record)
        except Exception:
            log.exception("could not take the failure mark off %s to send it again", again.key)
            self._undo_again(again, previous)
            # S3 may have taken it off all the same (an error after the write): a batch
            # rebuilt after a restart would show it queued, with nothing sent.
            self._mark_failed_again(again, previous)
            return Refusal(503, "not sent again: the input bucket could not be reached; try again",
                           again.filename, code=Code.AWS_UNAVAILABLE)
        if not stored:
            self._undo_again(again, previous)
            return Refusal(409, "not sent again: its image is no longer in the input bucket; upload it again",
                           again.filename, code=Code.NOT_SENT_AGAIN)
        try:
            self.requests.send(request, self._seen_before())
        except Exception:
            # Its mark is off, the item queued: sent by requeue_unsent once SQS takes it,
            # as an upload stored with no request is (at worst twice: the first answer wins).
            log.exception("could not send item %s again; trying again later", again.id)
            self._retry_later(again.id, request)
            return again
        self._end(again.id)
        log.info("item %s sent again (%d)", again.id, again.sent_again)
        return again

    def _seen_before(self) -> MessageAttributes:
        """The mark of a request sent again: seen before, so that a worker tries it alone
        at once. Its image may be what crashed the workers its dead-lettered copy met, and
        in a batch it would cost its batch-mates an attempt. One receive, not the
        max_receive_count that copy used: with those, the worker would take its attempts
        for used up and fail it unread. That costs it one attempt; with MAX_RECEIVE_COUNT 1
        there is none to spare, and it goes unmarked."""
        return prior_receives_attribute(min(1, self.aws.settings.max_receive_count - 1))

    def _undo_again(self, again: Item, previous: SentAgain) -> None:
        """Back to the failure it had, sent again as often as before (`previous`), as
        nothing was sent (unless an answer came meanwhile, which then stands)."""
        self._end(again.id)
        self.book.fail(again.id, DEAD_LETTER_ERROR, key=again.key, filename=again.filename, sent=previous)

    def _mark_failed_again(self, again: Item, previous: SentAgain) -> None:
        try:
            tag_failed(self.aws, again.key, DEAD_LETTER_ERROR, previous)
        except Exception as exc:
            log.warning("item %s: its failure mark may be off with no request sent (%s): a batch rebuilt "
                        "after a restart shows it queued until it is sent again", again.id, error_reason(exc))

    def requeue_unsent(self) -> int:
        """Queue the images stored with no request sent; the number queued.

        They are those that web tiers killed between the two steps left in their
        journals (adopted here), those whose request failed and whose image could
        not be deleted, and those whose put raised (S3 may hold the image all the
        same). Each one whose image is in the input bucket, and
        whose result is not yet in the output bucket, is sent: at worst a second
        time, if its process was killed just after sending it. One that cannot be
        sent now is tried again at the next call.
        """
        if self.journal is not None:
            for item_id, body in self.journal.adopt_orphans().items():
                self._retry_later(item_id, body)
        with self._unsent_lock:
            unsent = dict(self._unsent)
        queued = 0
        for item_id, body in unsent.items():
            try:
                queued += self._requeue(body)
            except MessageError as exc:  # nothing to send: a journal line that is not a request
                log.error("dropped %s from the journal: %s", item_id, exc)
            except Exception as exc:
                log.warning("could not queue item %s, stored with no request; trying again: %s",
                            item_id, error_reason(exc))
                continue
            with self._unsent_lock:
                self._unsent.pop(item_id, None)
            self._end(item_id)
        return queued

    def _requeue(self, body: str) -> bool:
        request = ClassifyRequest.from_json(body)
        stored = head(self.aws, request.bucket, request.key)
        if stored is None:
            return False  # never stored: its upload was answered with an error, or not at all
        if head(self.aws, self.aws.settings.output_bucket, request.key) is not None:
            return False  # sent before the kill, and answered
        again = self._dead_letter_sent_again(request, stored)
        self.requests.send(body, self._seen_before() if again else None)
        log.info("queued %s, stored with no request sent", request.key)
        return True

    def _dead_letter_sent_again(self, request: ClassifyRequest, stored: dict) -> bool:
        """Whether `request` is a dead letter's sent again (send_again), as its input's
        tags say: the journal keeps a request's body alone, in lines that web tiers of
        other versions read too. An upload puts no tags, so most need no second call."""
        if not stored.get("TagCount"):
            return False
        return sent_again_from_tags(input_tags(self.aws, request.key) or []).count > 0

    def _retry_later(self, item_id: str, body: str) -> None:
        with self._unsent_lock:
            self._unsent[item_id] = body

    def _begin(self, item_id: str, request: str) -> None:
        if self.journal is not None:
            self.journal.begin(item_id, request)

    def _end(self, item_id: str) -> None:
        if self.journal is not None:
            self.journal.end(item_id)

    def _unstore(self, key: str) -> bool:
        """Delete the object of an upload that was refused, if S3 has it; whether it is gone.
        One try, with the health checks' short timeouts: the answer waits for it, after
        the put's or the send's own tries, and a delete that fails is provided for (the
        upload queued later, by requeue_unsent)."""
        try:
            self.aws.probes["s3"].delete_object(Bucket=self.aws.settings.input_bucket, Key=key)
        except Exception:
            _log_failure("could not delete %s, stored for an upload that was refused", key)
            return False
        return True


def _log_failure(message: str, *args: object) -> None:
    """Log the exception being handled: in one line if it is AWS failing (or SQS not
    taking a message), which an outage does to every file of a request alike (with a
    traceback each, ~190 lines a file: 190,000 for a request of 1,000); with its
    traceback otherwise, a fault to find."""
    exc = sys.exc_info()[1]
    if exc is not None and (isinstance(exc, SendError) or is_outage(exc)):
        log.error(message + ": %s: %s", *args, type(exc).__name__, exc)
    else:
        log.exception(message, *args)


def _why_not_again(item: Item) -> str:
    """Why `item` is not sent again: it is no dead letter's failure (Submitter.send_again)."""
    if item.state == QUEUED:
        return "not sent again: it is queued (sent again already, or not yet answered)"
    if item.state == DONE:
        return "not sent again: it is classified"
    return ("not sent again: a worker failed it on the image itself, which the same bytes would fail "
            "again; only a failure no worker answered (a dead letter) is sent again")
