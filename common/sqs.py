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


# SQS's codes that say a receipt no longer holds its message. Both spellings: botocore
# gives a failed call the query-protocol code SQS names in its answer's x-amzn-query-error
# (AWS.SimpleQueueService.MessageNotInflight), where it names one, else the modelled name.
STALE_RECEIPT_CODES = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight",
                                 "AWS.SimpleQueueService.MessageNotInflight"})
# Real SQS's reasons, after "Value <receipt> for parameter ReceiptHandle is invalid. Reason: ",
# for a receipt gone stale, in lower case.
STALE_RECEIPT_REASONS = ("message does not exist or is not available for visibility timeout change",
                         "the receipt handle has expired")


def is_stale_receipt(code: str, message: str) -> bool:
    """Whether SQS refused a change of visibility because the receipt no longer holds its
    message: the message was deleted (answered), or received since by another receive,
    which got a receipt of its own.

    Real SQS says so with InvalidParameterValue, "Value <receipt> for parameter
    ReceiptHandle is invalid. Reason: Message does not exist or is not available for
    visibility timeout change." (mapbox/ecs-watchbot#135, vmihailenco/taskq#29,
    olist/olist-loafer#29), or "... Reason: The receipt handle has expired."
    (aws/aws-sdk-java#1628); ReceiptHandleIsInvalid for what is no receipt at all, and
    MessageNotInflight, documented for ChangeMessageVisibility, for a message not in
    flight. moto gives ReceiptHandleIsInvalid for a deleted message only, and takes
    any receipt a message ever had. Any other InvalidParameterValue (a VisibilityTimeout
    past SQS's 12 hours, say) is not this: the message may still be this receipt's."""
    if code in STALE_RECEIPT_CODES:
        return True
    if code != "InvalidParameterValue":
        return False
    said = " ".join(message.lower().split())
    return "for parameter receipthandle is invalid" in said and any(r in said for r in STALE_RECEIPT_REASONS)


# SQS's codes for a queue it does not know, in both spellings (see STALE_RECEIPT_CODES).
NO_SUCH_QUEUE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
                                 "NonExistentQueue"})
# CreateQueue's refusal of a name whose queue was deleted less than 60 s ago.
QUEUE_DELETED_RECENTLY_CODES = frozenset({"AWS.SimpleQueueService.QueueDeletedRecently",
                                          "QueueDeletedRecently"})


def is_queue_not_there(code: str, message: str) -> bool:
    """Whether SQS refused a call because it does not know a queue the call uses: the
    queue itself, or the dead-letter queue a redrive policy names.

    What a queue created a moment ago gets: AWS's CreateQueue reference says to wait at
    least a second after creating a queue before using it. For a dead-letter target
    real SQS says InvalidParameterValue, "Value {...} for parameter RedrivePolicy is
    invalid. Reason: Dead letter target does not exist." (InvalidAttributeValue is its
    modelled name); moto says AWS.SimpleQueueService.NonExistentQueue, "Could not find
    DLQ for <arn>". Another InvalidParameterValue (a maxReceiveCount out of range, say)
    is not this: no wait mends it."""
    if code in NO_SUCH_QUEUE_CODES:
        return True
    if code not in ("InvalidParameterValue", "InvalidAttributeValue"):
        return False
    said = " ".join(message.lower().split())
    return "for parameter redrivepolicy is invalid" in said and "dead letter target does not exist" in said


class VisibilityFailure(NamedTuple):
    """A message whose visibility was not changed, and why: SQS's word for it, or the
    error of the call that carried it."""

    receipt_handle: str
    reason: str
    code: str = ""  # SQS's error code, where it gave one ("ReceiptHandleIsInvalid")

    @property
    def stale(self) -> bool:
        """Whether the receipt no longer holds its message (is_stale_receipt); `reason`
        carries SQS's message where it gave one."""
        return is_stale_receipt(self.code, self.reason)


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
