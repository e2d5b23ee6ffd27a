"""Recovering a batch from S3 when this process does not hold it.

S3 is the durable record: the input bucket lists a batch's items (with their
original names in metadata), the output bucket holds results under the same
keys, and tags on an input object mark a failure. A restarted web tier can
therefore answer for batches uploaded before it started.
"""

from __future__ import annotations

from concurrent.futures import Executor

from common.aws import Aws
from web_tier.results import DONE, FAILED, Item
from web_tier.storage import read_failure, read_name_and_token, read_output


def list_keys(aws: Aws, batch_id: str) -> list[str]:
    paginator = aws.s3.get_paginator("list_objects_v2")
    objects = []
    for page in paginator.paginate(Bucket=aws.settings.input_bucket, Prefix=f"{batch_id}/"):
        objects.extend(page.get("Contents", []))
    # S3 lists keys in order, and item ids are made in upload order (jobs.OrderedIds).
    return [o["Key"] for o in objects]


def rebuild_item(aws: Aws, batch_id: str, key: str) -> Item | None:
    parts = key.split("/")
    if len(parts) != 3:
        return None
    _, item_id, safe_name = parts
    filename, token = read_name_and_token(aws, key)
    return with_stored_outcome(aws, Item(item_id, batch_id, filename or safe_name, key, token=token))


def with_stored_outcome(aws: Aws, item: Item) -> Item:
    """`item` with the outcome S3 records for its key: done with the result in the
    output bucket, failed with the reason tagged on the input object, or as it was."""
    result = read_output(aws, item.key)
    if result is not None:
        item.state = DONE
        item.label, item.score, item.top5 = result["label"], result["score"], result["top5"]
        item.worker, item.untrained = result["worker"], result["untrained"]
        return item
    failure = read_failure(aws, item.key)
    if failure is not None:
        item.state, (item.error, item.worker) = FAILED, failure
    return item


def rebuild_batch(aws: Aws, batch_id: str, pool: Executor) -> list[Item] | None:
    """The batch as S3 records it, or None if S3 has no such batch."""
    keys = list_keys(aws, batch_id)
    if not keys:
        return None
    return [i for i in pool.map(lambda k: rebuild_item(aws, batch_id, k), keys) if i is not None]
