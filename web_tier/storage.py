"""What the web tier reads and writes in S3.

The original file name travels in the input object's metadata (common/names.py).
A failed item is marked with object tags on its input object
(`status=failed`, `error=<reason>`, and `reason`, the reason escaped so it reads
back whole: common/failure_tags.py), which workers write too, and which the web
tier takes off a dead letter it sends again, for `status=sent-again` with how many
times it was and when last (`sent-again`, `requeued-at`). Reading an item's
outcome back is common/stored_outcome.py's, which workers do too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from botocore.exceptions import ClientError

from common.aws import Aws
from common.aws_errors import is_not_found
from common.failure_tags import NEVER_SENT_AGAIN, SentAgain, mark_failed, sent_again_tagging
from common.names import ORIGINAL_FILENAME_META, encode_filename, original_filename

CLIENT_TOKEN_META = "client-token"
DIGEST_META = "sha256"


def put_input(aws: Aws, key: str, data: bytes, content_type: str, *, filename: str,
              batch_id: str, item_id: str, token: str = "", digest: str = "") -> None:
    metadata = {ORIGINAL_FILENAME_META: encode_filename(filename), "batch-id": batch_id, "item-id": item_id}
    if token:
        metadata[CLIENT_TOKEN_META] = token
    if digest:
        metadata[DIGEST_META] = digest
    aws.s3_upload.put_object(
        Bucket=aws.settings.input_bucket, Key=key, Body=data, ContentType=content_type, Metadata=metadata,
    )


def head(aws: Aws, bucket: str, key: str) -> dict[str, Any] | None:
    """S3's HEAD answer for the object (its metadata among it), or None if there is none."""
    try:
        return aws.s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise


def tag_failed(aws: Aws, key: str, reason: str, sent: SentAgain = NEVER_SENT_AGAIN) -> str | None:
    """Mark the input object failed so a rebuilt batch shows the error (and how often it
    was `sent` again before); None once marked, else why it never will be
    (common.failure_tags.mark_failed, which raises what a retry may mend, and MarkDenied
    for AccessDenied)."""
    return mark_failed(aws.s3, aws.settings.input_bucket, key, reason, sent=sent)


def clear_failed(aws: Aws, key: str, sent: SentAgain) -> bool:
    """Take the failure mark off the input object (its request is sent again), so that
    a batch rebuilt from S3 shows it queued, `sent` again as often and when; False if
    there is no such object.

    By writing tags that mark no failure: the web role may already put tags
    (tag_failed), and needs no right to delete them."""
    try:
        aws.s3.put_object_tagging(Bucket=aws.settings.input_bucket, Key=key, Tagging=sent_again_tagging(sent))
    except ClientError as exc:
        if is_not_found(exc):
            return False
        raise
    return True


def input_tags(aws: Aws, key: str) -> list[dict[str, str]] | None:
    """The input object's tag set; None if there is no such object."""
    try:
        return aws.s3.get_object_tagging(Bucket=aws.settings.input_bucket, Key=key)["TagSet"]
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise


class StoredUpload(NamedTuple):
    """What an input object's metadata says of the upload it holds."""

    filename: str | None  # the original file name; None if it has none
    token: str  # the client's token; "" if none
    digest: str  # the SHA-256 of its bytes; "" if stored without it
    tagged: bool  # False when its HEAD counted no tags (an upload puts none)


def read_stored_upload(aws: Aws, key: str) -> StoredUpload | None:
    """What the input object under `key` says of its upload; None if there is no such object."""
    stored = head(aws, aws.settings.input_bucket, key)
    if stored is None:
        return None
    metadata = stored.get("Metadata", {})
    # S3's HEAD counts an object's tags (x-amz-tagging-count) when it has some and the
    # caller may read them, as the web role may: a rebuild reads tags only where there are.
    tagged = bool(stored.get("TagCount"))
    return StoredUpload(original_filename(metadata), metadata.get(CLIENT_TOKEN_META, ""),
                        metadata.get(DIGEST_META, ""), tagged)
