"""Turning accepted uploads into stored objects and queued requests."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field

from common.aws import Aws
from common.messages import ClassifyRequest
from common.names import object_key
from web_tier.journal import Journal
from web_tier.results import Item, ResultBook
from web_tier.sender import BatchingSender
from web_tier.storage import object_exists, put_input
from web_tier.uploads import Upload, UploadError

log = logging.getLogger(__name__)

# Uploads of one request go to S3 this many at a time.
UPLOAD_THREADS = 16


def new_id() -> str:
    return uuid.uuid4().hex


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


@dataclass
class Submitter:
    """Stores uploads in the input bucket and sends one request each."""

    aws: Aws
    book: ResultBook
    pool: Executor
    requests: BatchingSender
    # None: no journal (tests that do not kill the web tier), and nothing recovered.
    journal: Journal | None = None
    ids: OrderedIds = field(default_factory=OrderedIds)

    def submit(self, batch_id: str, uploads: list[Upload]) -> list[Item | UploadError]:
        """Submit every upload of one request, concurrently; results in upload order.

        Items are in the book before their request is sent, so even the fastest
        answer finds its waiter.
        """
        items = []
        for upload in uploads:
            item_id = self.ids.next()
            key = object_key(batch_id, item_id, upload.filename)
            items.append(Item(item_id, batch_id, upload.filename, key))
        self.book.add(batch_id, items)
        if len(uploads) == 1:
            return [self._submit_one(items[0], uploads[0])]
        futures = [self.pool.submit(self._submit_one, i, u) for i, u in zip(items, uploads, strict=True)]
        return [f.result() for f in futures]

    def _submit_one(self, item: Item, upload: Upload) -> Item | UploadError:
        stored = False
        try:
            request = ClassifyRequest(
                id=item.id, bucket=self.aws.settings.input_bucket, key=item.key, filename=upload.filename
            ).to_json()
            self._begin(item.id, request)
            put_input(
                self.aws, item.key, upload.data, upload.content_type,
                filename=upload.filename, batch_id=item.batch_id or "", item_id=item.id,
            )
            stored = True
            self.requests.send(request)
        except Exception:
            # An AWS outage must cost this file, not the service.
            log.exception("could not submit item %s", item.id)
            self.book.discard(item.id)
            if stored:
                self._unstore(item.key)
            return UploadError(503, "could not be stored or queued; try again", upload.filename)
        finally:
            self._end(item.id)
        return item

    def requeue_orphans(self) -> int:
        """Queue the requests that a killed web tier stored and never sent; the number queued.

        Each one whose image is in the input bucket and whose result is not yet
        in the output bucket is sent; the rest were never stored, or were sent
        before the kill. A request that cannot be sent now stays in the journal
        for the next start.
        """
        if self.journal is None:
            return 0
        queued = 0
        for item_id, body in self.journal.adopt_orphans().items():
            try:
                request = ClassifyRequest.from_json(body)
                stored = object_exists(self.aws, request.bucket, request.key)
                if stored and not object_exists(self.aws, self.aws.settings.output_bucket, request.key):
                    self.requests.send(body)
                    queued += 1
                    log.info("queued %s: stored by a web tier that was killed before it sent it", request.key)
            except Exception:
                log.exception("could not queue item %s, left by a killed web tier; trying at the next start",
                              item_id)
                continue
            self.journal.end(item_id)
        return queued

    def _begin(self, item_id: str, request: str) -> None:
        if self.journal is not None:
            self.journal.begin(item_id, request)

    def _end(self, item_id: str) -> None:
        if self.journal is not None:
            self.journal.end(item_id)

    def _unstore(self, key: str) -> None:
        """Delete the object of an upload that was refused: left in the bucket, a batch
        rebuilt from S3 would show it queued for ever."""
        try:
            self.aws.s3.delete_object(Bucket=self.aws.settings.input_bucket, Key=key)
        except Exception:
            log.exception("could not delete %s, stored for an upload that was refused", key)
