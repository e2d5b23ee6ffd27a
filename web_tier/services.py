"""The long-lived objects one app owns, reachable from any request."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flask import current_app

from common.aws import Aws
from common.config import Settings
from web_tier.jobs import Submitter
from web_tier.journal import Journal
from web_tier.listeners import Listeners
from web_tier.rebuild import rebuild_batch
from web_tier.results import Item, ResultBook, is_batch_id
from web_tier.sender import BatchingSender
from web_tier.status import StatusReader

EXTENSION = "imgclass"
MAX_EVENT_STREAMS = 64


@dataclass
class Services:
    settings: Settings
    aws: Aws
    book: ResultBook
    pool: ThreadPoolExecutor
    listeners: Listeners | None = None
    journal: Journal | None = None
    # Set by stop(): background loops end.
    stopped: threading.Event = field(default_factory=threading.Event)
    # Open SSE streams at most (each holds one of gunicorn's threads).
    event_streams: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(MAX_EVENT_STREAMS))
    submitter: Submitter = field(init=False)
    status: StatusReader = field(init=False)

    def __post_init__(self) -> None:
        requests = BatchingSender(self.aws.sqs, lambda: self.aws.request_queue_url)
        self.submitter = Submitter(self.aws, self.book, self.pool, requests, self.journal)
        self.status = StatusReader(self.aws, self.book)

    def find_batch(self, batch_id: str) -> list[Item] | None:
        """A batch's items from memory, else rebuilt from S3 and kept; None if unknown."""
        if not is_batch_id(batch_id):
            return None
        items = self.book.batch(batch_id)
        if items is not None:
            return items
        rebuilt = rebuild_batch(self.aws, batch_id, self.pool)
        if rebuilt is None:
            return None
        self.book.merge(batch_id, rebuilt)
        return self.book.batch(batch_id)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the listeners and the upload pool (tests; process exit needs nothing)."""
        self.stopped.set()
        if self.listeners is not None:
            self.listeners.stop(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()


def services() -> Services:
    return current_app.extensions[EXTENSION]
