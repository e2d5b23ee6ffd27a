"""Server-Sent Events for one batch: each item once, as it finishes.

The stream subscribes before it looks at the batch, so an item finishing in
between is seen twice at worst (and sent once), never missed.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator

from web_tier.results import Item, ResultBook

KEEPALIVE_S = 15.0
RETRY_MS = 3000
# A stream holds one of the web tier's threads: after this long it ends without
# `end`, and the browser's EventSource reconnects (and is sent the finished
# items again), so an abandoned or endless stream gives its thread back.
MAX_STREAM_S = 600.0


def _event(item: Item, book: ResultBook) -> str:
    body = item.to_json(bool(book.untrained))
    return f"id: {item.id}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def stream(book: ResultBook, batch_id: str, items: Callable[[], list[Item] | None],
           keepalive_s: float | None = None, max_s: float | None = None) -> Iterator[str]:
    """Events for `batch_id`; `items()` gives the batch's current items."""
    keepalive_s = KEEPALIVE_S if keepalive_s is None else keepalive_s
    deadline = time.monotonic() + (MAX_STREAM_S if max_s is None else max_s)
    inbox = book.subscribe(batch_id)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        sent: set[str] = set()
        while True:
            # Re-read every round: more uploads may join the batch meanwhile.
            current = items() or []
            for item in current:
                if item.is_finished and item.id not in sent:
                    sent.add(item.id)
                    yield _event(item, book)
            if all(i.id in sent for i in current):
                yield "event: end\ndata: {}\n\n"
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                item = inbox.get(timeout=min(keepalive_s, left))
            except queue.Empty:
                yield ": keep-alive\n\n"
                continue
            if item is None:
                return  # this process is stopping; without `end`, the browser reconnects
            if item.id not in sent and item.is_finished:
                sent.add(item.id)
                yield _event(item, book)
    finally:
        book.unsubscribe(batch_id, inbox)
