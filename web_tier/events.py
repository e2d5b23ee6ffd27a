"""Server-Sent Events for one batch: each item once, as it finishes (and as it is
queued again after a dead letter, POST /api/jobs/<id>/items/<id>/again).

The stream subscribes before it looks at the batch, so an item finishing in
between is seen twice at worst (and sent once), never missed.

Each event's id is `<book epoch>.<event_seq>`, and items are sent in the
order they changed, so an id says "every change up to this one has been
sent". A browser reconnecting (every MAX_STREAM_S, or after a drop)
sends the last id it saw as Last-Event-ID, and is sent only what finished
after it; so is a client opening a new stream with `?after=<id>` (api.py: the
page, once a stream ended and more files joined the batch). An id from another
process (a restarted web tier numbers anew), or one this batch's stream did not
send (the numbers run across batches), or none, gets everything.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator

from web_tier.results import Item, ResultBook

# A comment this often while nothing finishes. A stream hears that its client has gone
# only when a write fails, and holds one of the few stream slots until then: at 15 s,
# a client reconnecting in a loop would keep every slot taken.
KEEPALIVE_S = 5.0
RETRY_MS = 3000
# A stream holds one of the web tier's threads: after this long it ends without
# `end`, and the browser's EventSource reconnects (and is sent the finished
# items again), so an abandoned or endless stream gives its thread back.
MAX_STREAM_S = 600.0


def _event(item: Item, book: ResultBook) -> str:
    body = item.to_json(bool(book.untrained))
    # An item queued again is a `queued` event: a client's plain `message` events stay
    # one per finished item (DESIGN.md), the page listens for both.
    kind = "" if item.is_finished else "event: queued\n"
    return f"{kind}id: {book.epoch}.{item.event_seq}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def seen_up_to(book: ResultBook, last_event_id: str | None) -> int:
    """The event_seq a client's Last-Event-ID says it has seen up to; 0 for none,
    or for an id of another process's (or not one of ours at all)."""
    epoch, _, seq = (last_event_id or "").strip().partition(".")
    # ASCII digits only, and not too many: int() refuses "²" and numbers past 4300 digits.
    ours = epoch == book.epoch and seq.isascii() and seq.isdigit() and len(seq) <= 18
    return int(seq) if ours else 0


def stream(book: ResultBook, batch_id: str, items: Callable[[], list[Item] | None],
           keepalive_s: float | None = None, max_s: float | None = None,
           last_event_id: str | None = None) -> Iterator[str]:
    """Events for `batch_id`, after what `last_event_id` says was seen; `items()` gives
    the batch's current items."""
    keepalive_s = KEEPALIVE_S if keepalive_s is None else keepalive_s
    deadline = time.monotonic() + (MAX_STREAM_S if max_s is None else max_s)
    seen = seen_up_to(book, last_event_id)
    inbox = book.subscribe(batch_id)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        first_look = items() or []
        # Only an id this batch's stream sent says what was seen: the numbers run across
        # every batch, so one from another batch (a client keeping one last id for all),
        # or never sent, had every item of this one skipped, unsent, the stream at once
        # `end`.
        if seen and all(seen != item.event_seq and seen not in item.earlier_seqs for item in first_look):
            seen = 0
        # Each item sent, with the number it was sent with: a provisional failure (a dead
        # letter) replaced by a late answer is sent again, or its row would stay "failed";
        # so is one queued again, and then its outcome.
        sent = {item.id: item.event_seq for item in first_look if 0 < item.event_seq <= seen}
        while True:
            # A look at the whole batch: first, once the book counts none of it queued,
            # and after each quiet interval. It sends what changed, in the order it did,
            # and whether that is all of it (more uploads may have joined meanwhile).
            for item in book.changed_in_order(batch_id, seen=sent):
                sent[item.id] = item.event_seq
                yield _event(item, book)
            # Read after the changes sent: an item queued again since is then seen queued
            # (read before, its failure, already sent, would end the stream).
            current = items() or []
            if all(i.is_finished and sent.get(i.id) == i.event_seq for i in current):
                yield "event: end\ndata: {}\n\n"
                return
            # In between, each item as the book publishes it, in the order it finished:
            # a look at the whole batch after each one would cost 64 streams of a 4,000-item
            # batch most of a core, and slow every other request.
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    item = inbox.get(timeout=min(keepalive_s, left))
                except queue.Empty:
                    yield ": keep-alive\n\n"
                    break
                if item is None:
                    return  # this process is stopping; without `end`, the browser reconnects
                if item.event_seq > sent.get(item.id, 0):
                    sent[item.id] = item.event_seq
                    yield _event(item, book)
                if not book.unfinished(batch_id):
                    break
    finally:
        book.unsubscribe(batch_id, inbox)
