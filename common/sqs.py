"""SQS's batch calls and message attributes, as the tiers use them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, TypeVar

from botocore.client import BaseClient
from botocore.exceptions import ClientError

from common.aws_errors import AWS_ERRORS, error_code

# Entries in one SendMessageBatch, DeleteMessageBatch or ChangeMessageVisibilityBatch.
SQS_MAX_BATCH = 10

T = TypeVar("T")


def sqs_batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items` in runs of at most SQS_MAX_BATCH, in order, for SQS's batch calls."""
    for start in range(0, len(items), SQS_MAX_BATCH):
        yield items[start:start + SQS_MAX_BATCH]


class VisibilityFailure(NamedTuple):
    """A message whose visibility was not changed, and why: SQS's word for it, or the
    error of the call that carried it."""

    receipt_handle: str
    reason: str
    code: str = ""  # SQS's error code, where it gave one ("ReceiptHandleIsInvalid")


def change_visibility(sqs: BaseClient, queue_url: str,
                      changes: Sequence[tuple[str, int]]) -> list[VisibilityFailure]:
    """Hide each message (by receipt handle) for its seconds from now (0: visible now),
    in ChangeMessageVisibilityBatch calls of SQS_MAX_BATCH; the messages not changed.
    A call that fails (AWS or the network, after botocore's retries) fails its own
    entries only: the next call is still made."""
    failures: list[VisibilityFailure] = []
    for chunk in sqs_batches(changes):
        entries = [{"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": seconds}
                   for i, (receipt, seconds) in enumerate(chunk)]
        try:
            reply = sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
        except AWS_ERRORS as exc:
            code = error_code(exc) if isinstance(exc, ClientError) else ""
            failures.extend(VisibilityFailure(receipt, str(exc), code) for receipt, _ in chunk)
            continue
        for failed in reply.get("Failed", []):
            reason = failed.get("Message") or failed.get("Code") or str(failed)
            failures.append(VisibilityFailure(chunk[int(failed["Id"])][0], reason, failed.get("Code", "")))
    return failures


# The SQS attribute that says when a message was first received (milliseconds since the
# epoch). moto keeps it as it moves a message to the dead-letter queue: it then dates
# from the request's first attempt. Were SQS to start it again there, a dead letter's
# retries (common/failure_tags.py) would last longer: the whole bound in that queue.
FIRST_RECEIVED_ATTRIBUTE = "ApproximateFirstReceiveTimestamp"


def first_received_s(message: dict) -> float | None:
    """When SQS says a received message was first received, in seconds since the epoch;
    None if the receive did not ask for it (FIRST_RECEIVED_ATTRIBUTE) or it is not a number."""
    value = message.get("Attributes", {}).get(FIRST_RECEIVED_ATTRIBUTE)
    try:
        return int(value) / 1000
    except (TypeError, ValueError):
        return None
