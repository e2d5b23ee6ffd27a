"""The in-memory book of batches and items, and who is waiting on them.

One book per process. Listener threads write results into it; request threads
read it, wait on single items (POST /) or subscribe to whole batches (SSE).
An item's first outcome stands, except that a result replaces a failure and a
worker's failure replaces a dead letter's (`_replaces`); a response SQS delivers
twice is recorded once.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from common.failure_tags import DEAD_LETTER_ERROR, NEVER_SENT_AGAIN, SentAgain
from common.messages import ClassifyResponse
from web_tier.refusals import Code

QUEUED, DONE, FAILED = "queued", "done", "failed"
FINISHED = (DONE, FAILED)
# The ids of forgotten items kept to tell a second copy of their answer (~2 MB): SQS
# redelivers an answer whose delete failed after the response queue's visibility
# timeout, which at this service's speeds is well within this many answers.
MAX_FORGOTTEN_IDS = 10_000

_HEX32 = re.compile(r"[0-9a-f]{32}")

log = logging.getLogger(__name__)


def is_service_id(value: str) -> bool:
    """True for an id of the form this service hands out, a batch's or an item's alike
    (32 lowercase hex digits: uuid4().hex for a batch, submit.OrderedIds for an item)."""
    return bool(_HEX32.fullmatch(value))


def batch_id_of(key: str) -> str | None:
    """The batch id at the start of an object key `<batch>/<item>/<name>`."""
    head = key.split("/", 1)[0]
    return head if is_service_id(head) else None


@dataclass(slots=True)
class Item:
    """One uploaded file of a batch, and what became of it.

    Readers take no lock: once an item is finished, its outcome (state, label, score,
    top5, error, untrained, worker) never changes. A later outcome puts a new Item in
    its place (ResultBook._replace). What S3 knows better of it (its name, token, digest,
    and when it was sent again) a rebuild may still fill in (ResultBook.merge).
    """

    id: str
    batch_id: str | None
    filename: str
    key: str = ""
    state: str = QUEUED
    label: str | None = None
    score: float | None = None
    top5: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    untrained: bool = False
    worker: str = ""
    # The client's name for the file within its batch (POST /api/jobs `tokens`): a file
    # sent again under it is not stored again.
    token: str = ""
    # The SHA-256 of the file's bytes (hex): a file sent again under its token must be
    # the same file, not another of the same name. "" if not known (stored without it).
    digest: str = field(default="", repr=False)
    # Its latest event's number, in this book's order (ResultBook._number): when it
    # finished, or was queued again (ResultBook.queue_again). Event streams resume after
    # the last one a client saw. 0 while queued as uploaded.
    event_seq: int = field(default=0, compare=False)
    # The numbers of its events before the latest: a client resuming from one of them
    # resumes from this batch's own stream (events.stream).
    earlier_seqs: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # How many times it was queued again after a dead letter (POST .../again), and
    # when the latest was (time.time()): a copy of its request sent before then that
    # comes back dead says nothing of the new one (listeners.py). Written to the input
    # object's tags too (storage.py clear_failed), which a batch rebuilt from S3 reads.
    sent_again: int = 0
    requeued_at: float = field(default=0.0, repr=False, compare=False)
    # Counted in the book's totals (answered or failed). An outcome a batch rebuilt from
    # S3 brings (merge) is not: the totals count what this process saw finish.
    counted: bool = field(default=False, compare=False)
    # Made only for an item someone waits on (POST /), set when it finishes: an Event
    # for each of the book's many items cost ~1 KB apiece.
    waiter: Waiter | None = field(default=None, repr=False, compare=False)

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED

    @property
    def provisional(self) -> bool:
        """Failed by a dead letter: no worker answered one copy of its request in the
        attempts allowed. Another copy (a journal's requeue, a hand-back SQS would not
        delete) may yet be answered, and its outcome then replaces this one."""
        return self.state == FAILED and self.error == DEAD_LETTER_ERROR

    def shows_untrained(self, model_untrained: bool, state: str | None = None) -> bool:
        """Whether to flag this item as untrained: a label's own model, which may differ
        from the latest during a rollout; for an item without one (queued, failed, a dead
        letter), what its worker said or the model is known to be. `state`: the item's
        state as its caller read it (default: now)."""
        done = (self.state if state is None else state) == DONE
        return self.untrained if done else self.untrained or model_untrained

    def to_json(self, model_untrained: bool = False) -> dict[str, Any]:
        """The item as the API shows it (`untrained` as shows_untrained says)."""
        return {
            "id": self.id,
            "filename": self.filename,
            "state": self.state,
            "label": self.label,
            "score": self.score,
            "top5": list(self.top5),
            "error": self.error,
            "untrained": self.shows_untrained(model_untrained),
            "worker": self.worker,
            # The client's token: a page that reloaded before hearing a file stored knows
            # it by this, not by its name, which the server may have cleaned.
            "token": self.token,
            "sent_again": self.sent_again,
            "code": self.failure_code,
        }

    @property
    def sent_again_record(self) -> SentAgain:
        """How often it was sent again, and when last: what its input object's tags keep."""
        return SentAgain(self.sent_again, self.requeued_at)

    @property
    def failure_code(self) -> Code | None:
        """A failed item's code, for programs, as POST / answers it: a dead letter, which
        POST .../again queues again in place, or the worker's failure on the image."""
        if self.state != FAILED:
            return None
        return Code.DEAD_LETTER if self.provisional else Code.CLASSIFICATION_FAILED

    def _apply(self, other: Item) -> None:
        """Take `other`'s outcome (used when a result arrives by another route)."""
        self.label, self.score = other.label, other.score
        self.top5, self.error = list(other.top5), other.error
        self.untrained, self.worker = other.untrained, other.worker
        # Last: readers (to_json, SSE) take no lock, and a finished state is their
        # sign that every other field is final.
        self.state = other.state


def item_from_response(response: ClassifyResponse) -> Item:
    """The finished item a worker's response describes."""
    return Item(
        id=response.id,
        batch_id=batch_id_of(response.key),
        filename=response.filename,
        key=response.key,
        state=DONE if response.ok else FAILED,
        label=response.label,
        score=response.score,
        top5=[{"label": p.label, "score": p.score} for p in response.top5],
        error=response.error,
        worker=response.worker,
        untrained=response.untrained,
    )


@dataclass
class _Batch:
    id: str
    item_ids: list[str] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)  # client token -> item id
    # False while the batch holds only items learnt from stray responses (e.g.
    # after a restart): a GET must then rebuild it from S3 to see all of it.
    complete: bool = False
    # Its items still queued, as far as the book has counted: eviction's quick answer
    # to "may it be forgotten?" (a batch it counts as finished is still looked at whole).
    unfinished: int = 0


class ResultBook:
    """Thread-safe record of every batch and item this process knows about.

    Beyond `max_items` the oldest fully finished batches are forgotten (they can
    always be rebuilt from S3). A finished item holds ~1.8 KB (measured with
    tracemalloc), so the default cap is ~180 MB; with the longest names (1,024
    characters, not ASCII) and tokens, ~5.8 KB: ~580 MB. The process's
    RSS grows by ~2.6 KB an item (allocator overhead; 100,000 one-image batches of
    short names, each waited on as POST / does, measured on 2026-12-03), so count
    nearer 250 MB at the cap for short names. A batch with an
    item still queued is never forgotten (someone may be waiting on it, or still
    adding to it), so under a backlog the book holds the cap plus the backlog.
    """

    def __init__(self, max_items: int = 100_000, untrained: bool | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Item] = {}
        self._batches: OrderedDict[str, _Batch] = OrderedDict()
        # The batches that may be finished whole, the least recently touched first: the
        # only ones eviction looks at. A batch joins when an item of it finishes (or one
        # still queued is discarded); one found unfinished leaves until the next does.
        # Walking every batch, with more items queued than the cap, would take each upload
        # and each result ~130 ms under the lock at 100,000.
        self._maybe_finished: OrderedDict[str, None] = OrderedDict()
        self._subscribers: dict[str, set[queue.SimpleQueue]] = {}
        # Batches a request is finding and adding to (in_use): never let go meanwhile.
        self._in_use: Counter[str] = Counter()
        self._max_items = max_items
        # The items eviction forgot last, oldest first: an answer for one is a copy of the
        # one that finished it (SQS delivers at least once), not one to keep.
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._max_forgotten = min(max_items, MAX_FORGOTTEN_IDS)
        self.uploaded = 0
        self.answered = 0
        self.failed = 0
        # Whether the workers' model is untrained: None while unknown, then what the
        # latest response said.
        self.untrained: bool | None = untrained
        # Set when this process is stopping: nobody waits for answers any more.
        self.closing = threading.Event()
        # Items are numbered as they finish or are queued again (Item.event_seq); the
        # epoch tells this book's numbers from another process's.
        self.epoch = uuid.uuid4().hex[:8]
        self._event_count = 0

    def close(self) -> None:
        """Stop every wait at once: waiting requests answer that their image is still
        queued, and event streams end (browsers reconnect, to a process that serves).
        Called when the process is told to stop, which would otherwise cut them off
        without an answer once its grace period is over."""
        with self._lock:
            self.closing.set()
            for item in self._items.values():
                _wake(item)
            for inboxes in self._subscribers.values():
                for inbox in inboxes:
                    inbox.put(None)

    # --- writing ---------------------------------------------------------------
    def add(self, batch_id: str, items: list[Item]) -> list[Item]:
        """Register new uploads (in order) under `batch_id`, creating the batch if needed
        (the caller has looked for it, under in_use).

        Returns, for each, the item the batch holds: itself, or the one it already
        holds under the same token, which this one then does not join."""
        kept = []
        with self._lock:
            if batch_id not in self._batches:
                self._batch(batch_id).complete = True
            batch = self._batches[batch_id]
            for item in items:
                holder = self._items.get(batch.tokens.get(item.token, "")) if item.token else None
                if holder is not None:
                    kept.append(holder)
                    continue
                if item.id not in self._items:
                    self._items[item.id] = item
                    batch.item_ids.append(item.id)
                    batch.unfinished += not item.is_finished
                    self.uploaded += 1
                    if item.token:
                        batch.tokens[item.token] = item.id
                kept.append(item)
            self._evict(keep=batch_id)
        return kept

    def discard(self, item_id: str) -> None:
        """Forget an upload that never reached the queue."""
        with self._lock:
            item = self._items.pop(item_id, None)
            if item is None:
                return
            self.uploaded -= 1
            batch = self._batches.get(item.batch_id or "")
            if batch is not None and item_id in batch.item_ids:
                batch.item_ids.remove(item_id)
                batch.unfinished = max(0, batch.unfinished - (not item.is_finished))
            if batch is not None and item.token and batch.tokens.get(item.token) == item_id:
                del batch.tokens[item.token]
            if batch is not None and not batch.item_ids and not batch.tokens:
                del self._batches[batch.id]  # nothing of it was stored: as if never sent
                self._maybe_finished.pop(batch.id, None)  # nor is it to be forgotten later
            elif batch is not None:
                self._may_be_finished(batch.id)

    def record(self, response: ClassifyResponse) -> Item | None:
        """Record a worker's answer; the item if this finished it or replaced its outcome,
        else None."""
        return self._finish(item_from_response(response), response.untrained)

    def record_item(self, item: Item, sent_before: float | None = None) -> Item | None:
        """Record an outcome found another way (in S3); the item if this was its first
        result. `sent_before`: as for fail. It says nothing of the workers' model now
        (stored by a worker of any model since), which the live answers tell: the item
        alone is flagged by its own."""
        return self._finish(item, None, sent_before=sent_before)

    def fail(self, item_id: str, error: str, *, key: str = "", filename: str = "",
             sent: SentAgain | None = None, sent_before: float | None = None) -> Item | None:
        """Mark an item failed unless it already has an outcome; the item if it changed.
        `sent`: how often it was sent again, and when last, if the caller knows better
        than the book: for an item the book learns of here (a dead letter's, after a
        restart: its input object's tags say), or a send again undone (nothing sent).
        `sent_before`: when the request that failed was sent, for a dead letter: an item
        queued again since then is left queued, its new request under way (decided
        under the book's lock: a dead letter's reader looks, reads S3, then fails it,
        and a POST .../again in between would have its item failed while its request is out)."""
        sent_again = sent or NEVER_SENT_AGAIN
        item = Item(id=item_id, batch_id=batch_id_of(key), filename=filename, key=key,
                    sent_again=sent_again.count, requeued_at=sent_again.at)
        item.state, item.error = FAILED, error
        return self._finish(item, None, sent, sent_before)

    def queue_again(self, item_id: str, at: float) -> Item | None:
        """Put an item a dead letter failed back to queued, for its request to be sent
        again (`at`: now, time.time()); the item queued, or None if it is no such
        failure (any more): unknown, queued, answered, or failed by a worker.

        A compare-and-set under the lock: of two requests at once, one gets the item
        and sends its request, the other None. A new item in its place, as _replace
        makes (see Item). Numbered and published, so that event streams send it queued."""
        with self._lock:
            item = self._items.get(item_id)
            if item is None or not item.provisional or not item.key:
                return None
            self.failed -= item.counted
            again = replace(item, state=QUEUED, error=None, worker="", waiter=None, counted=False,
                            sent_again=item.sent_again + 1, requeued_at=at)
            self._number(again)
            self._items[item_id] = again
            batch = self._batches.get(again.batch_id or "")
            if batch is not None and item_id in batch.item_ids:
                batch.unfinished += 1
            self._publish([again])
            return again

    def merge(self, batch_id: str, rebuilt: list[Item]) -> list[Item]:
        """Adopt a batch rebuilt from S3; results already in memory win. The batch's
        items as merged: read from the book again, a finished batch may be forgotten
        already under a backlog past the cap."""
        finished: list[Item] = []
        with self._lock:
            batch = self._batch(batch_id)
            batch.complete = True
            for item in rebuilt:
                known = self._items.get(item.id)
                if item.token:
                    batch.tokens.setdefault(item.token, item.id)
                if known is None:
                    if item.is_finished:
                        self._number(item)
                        finished.append(item)  # for event streams: every number is published
                    self._items[item.id] = item
                    batch.item_ids.append(item.id)
                    batch.unfinished += not item.is_finished
                else:
                    # S3 holds the whole name; an answer learnt before this rebuild
                    # carries at most a message's share of it, its start (common/
                    # messages.py). (A name S3 lacks is rebuilt from the key, cleaned:
                    # then the answer's is the better.)
                    if item.filename.startswith(known.filename):
                        known.filename = item.filename
                    # What only S3 knows: an item learnt from an answer has neither,
                    # and a file sent again would be checked against nothing.
                    known.token = known.token or item.token
                    known.digest = known.digest or item.digest
                    # Sent again before a restart, as S3 records: an item learnt since from
                    # an answer or a dead letter does not know. Else memory is the newer.
                    known.sent_again = max(known.sent_again, item.sent_again)
                    known.requeued_at = max(known.requeued_at, item.requeued_at)
                    if not known.is_finished and item.is_finished:
                        known = self._to_finish(known)
                        self._number(known)
                        self._one_fewer_unfinished(known)
                        known._apply(item)
                        _wake(known)
                        finished.append(known)
                    elif _replaces(item, known):
                        replaced = self._replace(known, item)
                        if known.counted:  # the totals follow what they counted
                            self._add_to_totals(replaced)
                        finished.append(replaced)
            # S3's key order is upload order; items learnt earlier from answers that
            # came before the rebuild take their places in it.
            in_s3 = [item.id for item in rebuilt]
            listed = set(in_s3)
            batch.item_ids = in_s3 + [i for i in batch.item_ids if i not in listed]
            merged = [self._items[i] for i in batch.item_ids if i in self._items]
            self._may_be_finished(batch_id)
            self._evict(keep=batch_id)
            self._publish(finished)
        return merged

    def _finish(self, incoming: Item, untrained: bool | None, sent: SentAgain | None = None,
                sent_before: float | None = None) -> Item | None:
        """Finish the item `incoming` names with its outcome, unless it has one (a late
        answer replaces a failure: _replaces); the item if this finished it. `sent`:
        its count and time of sending again, for one still queued (ResultBook.fail);
        `sent_before`: see ResultBook.fail."""
        with self._lock:
            item = self._items.get(incoming.id)
            if item is not None and sent_before is not None and sent_before < item.requeued_at:
                return None
            if item is None and incoming.batch_id is None:
                # No item of this service's: its key names no batch (anyone who may send
                # to the request queue can make one). Kept, no eviction would ever forget
                # it, and it would crowd out real batches and swell the totals.
                log.warning("ignored an outcome for item %s: its key %r names no batch",
                            incoming.id, incoming.key)
                return None
            if item is None and incoming.id in self._forgotten:
                # Counted again, it would have the totals answer more than was uploaded, and
                # bring back an incomplete batch, to be listed in S3 at its next read.
                # S3 holds what a later read of the batch needs.
                log.info("ignored a second outcome for item %s, forgotten with its batch", incoming.id)
                return None
            if item is None:
                # Unknown id (e.g. answered after a restart): keep it so a later
                # GET shows it; its batch stays incomplete until rebuilt from S3.
                item = incoming
                self._number(item)
                self._items[item.id] = item
                self._batch(incoming.batch_id).item_ids.append(item.id)
            elif item.is_finished:
                if not _replaces(incoming, item):
                    return None
                item = self._replace(item, incoming)
            else:
                item = self._to_finish(item)
                if sent is not None:
                    item.sent_again, item.requeued_at = sent
                self._number(item)
                self._one_fewer_unfinished(item)
                item._apply(incoming)
                if not item.key:
                    item.key = incoming.key
            self._add_to_totals(item)
            if untrained is not None:
                self.untrained = untrained
            _wake(item)
            self._publish([item])
            self._may_be_finished(item.batch_id or "")
            self._evict()
            return item

    def _to_finish(self, item: Item) -> Item:
        """The queued item to finish in `item`'s place (the lock held): itself, or a new one
        if event streams were sent it queued (queued again after a dead letter). Finished in
        place, a stream that had read it queued would send its outcome under the read's
        number, out of order, or skip it."""
        if not item.event_seq:
            return item
        fresh = replace(item)
        self._items[fresh.id] = fresh
        return fresh

    def _replace(self, item: Item, outcome: Item) -> Item:
        """A new item in `item`'s place (the lock held), with `outcome`'s outcome, and
        `item`'s failure out of the totals (readers take no lock: see Item). The new one
        is counted by the caller."""
        self.failed -= item.counted
        new = replace(item, waiter=None, counted=False)
        self._number(new)
        new._apply(outcome)
        self._items[new.id] = new
        return new

    def _add_to_totals(self, item: Item) -> None:
        """Add a finished item to the totals (the lock held)."""
        if item.state == DONE:
            self.answered += 1
        else:
            self.failed += 1
        item.counted = True

    def _number(self, item: Item) -> None:
        """Number an item about to finish, or to be queued again (the lock held): numbers
        follow the order items change in, and the order they are published to event
        streams. Before its state changes, as event streams read items without the
        lock: one that sees it finished sees its number too."""
        self._event_count += 1
        if item.event_seq:
            item.earlier_seqs = (*item.earlier_seqs, item.event_seq)
        item.event_seq = self._event_count

    # --- reading ---------------------------------------------------------------
    def get(self, item_id: str) -> Item | None:
        with self._lock:
            return self._items.get(item_id)

    def batch(self, batch_id: str) -> list[Item] | None:
        """Items of a batch in upload order, or None when the batch is not fully known here."""
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None or not batch.complete:
                return None
            self._batches.move_to_end(batch_id)
            if batch_id in self._maybe_finished:
                self._maybe_finished.move_to_end(batch_id)  # read: the last to forget
            return [self._items[i] for i in batch.item_ids if i in self._items]

    def unfinished(self, batch_id: str) -> int:
        """How many of the batch's items the book counts still queued (0 for a batch it
        does not hold): a cheap hint that it may be finished, for a look at it whole."""
        with self._lock:
            batch = self._batches.get(batch_id)
            return batch.unfinished if batch is not None else 0

    def changed_in_order(self, batch_id: str, seen: Mapping[str, int]) -> list[Item]:
        """The batch's items that finished or were queued again (numbered) and are not
        `seen` (item id: the event_seq it was seen with), in the order they changed.
        One seen with an older number is not: a provisional failure replaced by a late
        answer, or queued again. Read under the lock, as items
        join batches, are numbered and finish under it: one that finished before any
        of these is among them (read one by one without it, an item could finish
        between two reads, after a later one had been seen finished; one could join the
        batch finished in between too)."""
        with self._lock:
            batch = self._batches.get(batch_id)
            ids = batch.item_ids if batch is not None else []
            kept = (self._items[i] for i in ids if i in self._items)
            return sorted((i for i in kept if i.event_seq > seen.get(i.id, 0)), key=lambda i: i.event_seq)

    def wait(self, item_id: str, timeout: float) -> Item | None:
        """Block until the item has a result; the item, or None on timeout or unknown id."""
        with self._lock:
            item = self._items.get(item_id)
            if item is None or item.is_finished:
                return item
            if self.closing.is_set():
                return None
            if item.waiter is None:
                item.waiter = Waiter()
            waiter = item.waiter
        if not waiter.wait(timeout):
            return None
        # The item it was woken with, not the book's: finished in a new item if it had
        # been queued again (_to_finish), and its batch may be forgotten meanwhile.
        woken = waiter.item
        return woken if woken is not None and woken.is_finished else None

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {"uploaded": self.uploaded, "answered": self.answered, "failed": self.failed}

    @contextmanager
    def in_use(self, batch_id: str) -> Iterator[None]:
        """Keep `batch_id` while a request finds it and adds files to it, even at the
        cap. Let go in between (finished whole, a full book), the files would be added to
        a batch made again without the tokens stored in it: a file sent again under one
        would be stored twice, and a GET show only the later files."""
        with self._lock:
            self._in_use[batch_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[batch_id] -= 1
                if not self._in_use[batch_id]:
                    del self._in_use[batch_id]

    # --- subscribers (SSE) -----------------------------------------------------
    def subscribe(self, batch_id: str) -> queue.SimpleQueue[Item | None]:
        """A queue that receives every item of `batch_id` as it finishes, and None
        when the book is closed."""
        inbox: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        with self._lock:
            self._subscribers.setdefault(batch_id, set()).add(inbox)
            if self.closing.is_set():
                inbox.put(None)
        return inbox

    def unsubscribe(self, batch_id: str, inbox: queue.SimpleQueue) -> None:
        with self._lock:
            inboxes = self._subscribers.get(batch_id)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self._subscribers[batch_id]

    # --- internals (call with the lock held) -----------------------------------
    def _batch(self, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            batch = self._batches[batch_id] = _Batch(batch_id)
        return batch

    def _publish(self, items: list[Item]) -> None:
        for item in items:
            for inbox in self._subscribers.get(item.batch_id or "", ()):
                inbox.put(item)

    def _one_fewer_unfinished(self, item: Item) -> None:
        """A queued item of the book's is about to finish: one fewer queued in its batch."""
        batch = self._batches.get(item.batch_id or "")
        if batch is not None and item.id in self._items:
            batch.unfinished = max(0, batch.unfinished - 1)

    def _may_be_finished(self, batch_id: str) -> None:
        """Let eviction look at this batch (it may be finished whole now), as the most
        recently touched."""
        if batch_id in self._batches:
            self._maybe_finished[batch_id] = None
            self._maybe_finished.move_to_end(batch_id)

    def _evict(self, keep: str = "") -> None:
        """Forget the oldest finished batches beyond the cap, but `keep`: the batch just
        added to or rebuilt, which its caller goes on to read (and whose tokens it needs)."""
        excess = len(self._items) - self._max_items
        # Oldest first, and only as far as needed: at the cap each new batch evicts
        # about one old one, so this must not walk (or copy) the whole book each time.
        for _ in range(len(self._maybe_finished)):
            if excess <= 0:
                return
            batch_id = next(iter(self._maybe_finished))
            batch = self._batches.get(batch_id)
            if batch is None or batch.unfinished > 0:
                # Gone, or someone may still be waiting on it: back once an item of it finishes.
                del self._maybe_finished[batch_id]
                continue
            if batch_id == keep or batch_id in self._subscribers or batch_id in self._in_use:
                self._maybe_finished.move_to_end(batch_id)  # in use: kept, looked at last
                continue
            items = [self._items[i] for i in batch.item_ids if i in self._items]
            del self._maybe_finished[batch_id]
            if any(not i.is_finished for i in items):
                continue  # the count is a hint: never forget an item someone may wait on
            for item_id in self._batches.pop(batch_id).item_ids:
                self._items.pop(item_id, None)
                self._forgotten[item_id] = None
                self._forgotten.move_to_end(item_id)  # forgotten again (rebuilt since): the newest
            while len(self._forgotten) > self._max_forgotten:
                self._forgotten.popitem(last=False)
            excess -= len(items)


def _replaces(outcome: Item, known: Item) -> bool:
    """Whether `outcome` replaces the outcome the finished item `known` has: a result
    replaces any failure, as it does in S3 (common/stored_outcome.py), and a worker's
    failure a dead letter's. Two copies of a request, the first to answer failing on a
    fault that passed, the second classifying it, would leave the page showing it failed
    and a batch rebuilt from S3 done."""
    if outcome.state == DONE:
        return known.state == FAILED
    return known.provisional and outcome.is_finished and not outcome.provisional


class Waiter(threading.Event):
    """What a wait on an item blocks on; it holds the item it was woken with."""

    item: Item | None = None


def _wake(item: Item) -> None:
    """Wakes whoever waits on the item (under the book's lock), handing them `item`. The
    Waiter goes with it: kept, each answered POST / would hold ~1.2 KB until evicted, a
    third of the book at its cap; a waiter holds its own reference."""
    if item.waiter is not None:
        item.waiter.item = item
        item.waiter.set()
        item.waiter = None

