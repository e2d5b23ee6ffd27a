"""Recovering a batch from S3 when this process does not hold it.

S3 is the durable record: the input bucket lists a batch's items (with their
original names in metadata), the output bucket holds results under the same
keys, and tags on an input object mark a failure. A restarted web tier can
therefore answer for batches uploaded before it started.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from common.aws import Aws
from common.failure_tags import sent_again_from_tags
from common.stored_outcome import stored_outcome
from web_tier.results import DONE, FAILED, Item, ResultBook, is_service_id
from web_tier.storage import input_tags, read_stored_upload

# Threads reading S3 to rebuild batches: their own, so that a large batch rebuilt
# (two S3 calls an answered item) holds up no upload, which the upload pool runs.
REBUILD_THREADS = 8


def list_keys(aws: Aws, batch_id: str) -> list[str]:
    """The keys of the batch's uploads, in upload order."""
    return _batch_keys(aws, aws.settings.input_bucket, batch_id)


def answered_keys(aws: Aws, batch_id: str) -> set[str]:
    """The keys of the batch's uploads a result is stored for."""
    return set(_batch_keys(aws, aws.settings.output_bucket, batch_id))


def _batch_keys(aws: Aws, bucket: str, batch_id: str) -> list[str]:
    paginator = aws.s3.get_paginator("list_objects_v2")
    objects = []
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{batch_id}/"):
        objects.extend(page.get("Contents", []))
    # S3 lists keys in order, and item ids are made in upload order (submit.OrderedIds).
    return [o["Key"] for o in objects]


def rebuild_item(aws: Aws, batch_id: str, key: str, answered: bool = True) -> Item | None:
    """The item S3 records under `key`, or None for none. `answered`: False when a
    listing of the output bucket, made after the input bucket's, has no result for it,
    so none is looked for: one written since then comes as its reply does."""
    parts = key.split("/")
    if len(parts) != 3:
        return None
    _, item_id, safe_name = parts
    stored = read_stored_upload(aws, key)
    if stored is None:
        # Deleted since it was listed (an upload refused meanwhile, its object removed):
        # left out, as a batch listed a moment later would leave it, not failing the rebuild.
        return None
    # Read for every item with tags, answered too: a sent-again mark stays when the
    # answer comes. None: deleted since its HEAD, and then as it was (no outcome, never
    # sent again).
    tag_set = (input_tags(aws, key) or []) if stored.tagged else []
    sent = sent_again_from_tags(tag_set)
    item = Item(item_id, batch_id, stored.filename or safe_name, key, token=stored.token,
                digest=stored.digest, sent_again=sent.count, requeued_at=sent.at)
    return with_stored_outcome(aws, item, tag_set, result_stored=answered)


def with_stored_outcome(aws: Aws, item: Item, tag_set: list[dict[str, str]] | None = None,
                        result_stored: bool = True) -> Item:
    """`item` with the outcome S3 records for its key (common/stored_outcome.py): done
    with the result in the output bucket, failed with the reason tagged on the input
    object, or as it was. `tag_set`: that object's tags, if read already;
    `result_stored`: False when a listing says no result is stored."""
    outcome = stored_outcome(aws, aws.settings.input_bucket, item.key, aws.settings.untrained, tag_set,
                             result_stored)
    if outcome is None:
        return item
    if outcome.result is not None:
        result = outcome.result
        item.state = DONE
        item.label, item.score, item.top5 = result["label"], result["score"], result["top5"]
        item.worker, item.untrained = result["worker"], result["untrained"]
    else:
        item.state, item.error, item.worker = FAILED, outcome.error, outcome.worker
    return item


def rebuild_batch(aws: Aws, batch_id: str, pool: Executor) -> list[Item] | None:
    """The batch as S3 records it, or None if S3 has no such batch."""
    keys = list_keys(aws, batch_id)
    # Listed second: a result stored between the two listings is read, not missed.
    answered = answered_keys(aws, batch_id) if keys else set()
    # Every object gone since the listing (rebuild_item) is no batch either, not an empty one.
    items = [i for i in pool.map(lambda k: rebuild_item(aws, batch_id, k, k in answered), keys)
             if i is not None]
    return items or None


class BatchRebuilder:
    """Finds a batch in the book, else rebuilds it from S3 into the book, once however
    many requests ask at the same time."""

    def __init__(self, aws: Aws, book: ResultBook) -> None:
        self.aws = aws
        self.book = book
        self.pool = ThreadPoolExecutor(REBUILD_THREADS, thread_name_prefix="web-rebuild")
        # Batches being rebuilt from S3, each by the first request to ask: the others wait
        # for it. Else a page polling a 1,500-item batch across a restart starts a whole
        # rebuild every 2 s, and 2-file uploads behind them take a minute.
        self._rebuilding: dict[str, Future] = {}
        self._rebuilding_lock = threading.Lock()

    def find_batch(self, batch_id: str) -> list[Item] | None:
        """A batch's items from memory, else rebuilt from S3 and kept; None if unknown.
        Looked up before files are added to a batch (under ResultBook.in_use), so that
        the tokens an earlier process stored in it are found, and a file sent again
        under one is not stored twice."""
        if not is_service_id(batch_id):
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
            return under_way.result()  # raises what the rebuild raised
        try:
            rebuilt = rebuild_batch(self.aws, batch_id, self.pool)
            merged = None if rebuilt is None else self.book.merge(batch_id, rebuilt)
            mine.set_result(merged)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._rebuilding_lock:
                del self._rebuilding[batch_id]
        return merged

    def stop(self) -> None:
        """Cancel the S3 reads not yet started (tests; process exit needs nothing)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
