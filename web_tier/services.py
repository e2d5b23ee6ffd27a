"""The long-lived objects one app owns, reachable from any request."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flask import current_app

from common.aws import Aws
from common.config import Settings
from web_tier.health_check import HealthCheck, unreachable_part
from web_tier.journal import Journal
from web_tier.listeners import Listeners
from web_tier.rebuild import BatchRebuilder
from web_tier.results import ResultBook
from web_tier.sender import BatchingSender
from web_tier.spool import IN_MEMORY_ALL_REQUESTS_BYTES, SharedBytes
from web_tier.status import StatusReader
from web_tier.submit import Submitter
from web_tier.upload_memory import UploadMemory

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
    # The uploads' bytes held in memory at once, across requests (web_tier/upload_memory.py).
    upload_memory: UploadMemory = field(default_factory=UploadMemory)
    # The bytes their forms hold in memory as they are read, and their temporary files on
    # disk, at once, across requests (web_tier/spool.py).
    spool_memory: SharedBytes = field(default_factory=lambda: SharedBytes(IN_MEMORY_ALL_REQUESTS_BYTES))
    spool_disk: SharedBytes = field(init=False)
    submitter: Submitter = field(init=False)
    status: StatusReader = field(init=False)
    # What /healthz answers, reused for a second (web_tier/health_check.py).
    health: HealthCheck = field(init=False)
    # Batches by id, from the book or rebuilt from S3 (find_batch).
    rebuilder: BatchRebuilder = field(init=False)

    def __post_init__(self) -> None:
        requests = BatchingSender(lambda: self.aws.sqs_send, lambda: self.aws.request_queue_url)
        self.submitter = Submitter(self.aws, self.book, self.pool, requests, self.journal)
        self.status = StatusReader(self.aws, self.book)
        self.health = HealthCheck(lambda: unreachable_part(self.aws))
        self.rebuilder = BatchRebuilder(self.aws, self.book)
        self.spool_disk = SharedBytes(self.settings.web_spool_bytes)

    def close(self) -> None:
        """The process is told to stop: every request waiting (for its answer, or for
        room to hold its upload) is answered at once (ResultBook.close, UploadMemory.close)."""
        self.book.close()
        self.upload_memory.close()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background work: the listeners, both pools, and the journal (tests;
        process exit needs nothing)."""
        self.stopped.set()
        if self.listeners is not None:
            self.listeners.stop(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rebuilder.stop()
        if self.journal is not None:
            self.journal.close()


def services() -> Services:
    return current_app.extensions[EXTENSION]
