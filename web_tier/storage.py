"""What the web tier reads and writes in S3.

The original file name travels in the input object's metadata (common/names.py).
A failed item is marked with object tags on its input object
(`status=failed`, `error=<reason>`, and `reason`, the reason escaped so it reads
back whole: common/failure_tags.py), which workers write too. Reading an item's
outcome back is common/stored_outcome.py's, which workers do too.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from common.aws import Aws, is_not_found
from common.failure_tags import failure_tagging
from common.names import ORIGINAL_FILENAME_META, encode_filename, original_filename

CLIENT_TOKEN_META = "client-token"


def put_input(aws: Aws, key: str, data: bytes, content_type: str, *, filename: str,
              batch_id: str, item_id: str, token: str = "") -> None:
    metadata = {ORIGINAL_FILENAME_META: encode_filename(filename), "batch-id": batch_id, "item-id": item_id}
    if token:
        metadata[CLIENT_TOKEN_META] = token
    aws.s3.put_object(
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


def tag_failed(aws: Aws, key: str, reason: str) -> None:
    """Mark the input object failed so a rebuilt batch shows the error."""
    aws.s3.put_object_tagging(Bucket=aws.settings.input_bucket, Key=key, Tagging=failure_tagging(reason))


def read_name_and_token(aws: Aws, key: str) -> tuple[str | None, str] | None:
    """An input object's original file name (None if it has none) and client token ("" if
    none); None if there is no such object."""
    stored = head(aws, aws.settings.input_bucket, key)
    if stored is None:
        return None
    metadata = stored.get("Metadata", {})
    return original_filename(metadata), metadata.get(CLIENT_TOKEN_META, "")
