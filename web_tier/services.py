"""The long-lived objects one app owns, reachable from any request."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
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
# Threads reading S3 to rebuild batches: their own, so that a large batch rebuilt
# (some 3 S3 calls an item) holds up no upload, which the upload pool runs.
REBUILD_THREADS = 8


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
    rebuild_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(REBUILD_THREADS, thread_name_prefix="web-rebuild"))
    # Batches being rebuilt from S3, each by the first request to ask: the others wait
    # for it. A page polling a 1,500-item batch across a restart had started a whole
    # rebuild every 2 s, and 2-file uploads behind them took a minute (explorer).
    _rebuilding: dict[str, Future] = field(default_factory=dict)
    _rebuilding_lock: threading.Lock = field(default_factory=threading.Lock)

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
        with self._rebuilding_lock:
            under_way = self._rebuilding.get(batch_id)
            if under_way is None:
                # Looked at again: a rebuild may have ended since the look above.
                items = self.book.batch(batch_id)
                if items is not None:
                    return items
                mine = self._rebuilding[batch_id] = Future()
        if under_way is not None:
            # Raises what the rebuild raised; else the batch as the book now has it.
            return self.book.batch(batch_id) if under_way.result() else None
        try:
            rebuilt = rebuild_batch(self.aws, batch_id, self.rebuild_pool)
            if rebuilt is not None:
                self.book.merge(batch_id, rebuilt)
            mine.set_result(rebuilt is not None)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._rebuilding_lock:
                del self._rebuilding[batch_id]
        return self.book.batch(batch_id) if rebuilt is not None else None

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background work: the listeners, both pools, and the journal (tests;
        process exit needs nothing)."""
        self.stopped.set()
        if self.listeners is not None:
            self.listeners.stop(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rebuild_pool.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()


def services() -> Services:
    return current_app.extensions[EXTENSION]
