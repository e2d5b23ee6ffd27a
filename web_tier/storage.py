"""What the web tier reads and writes in S3.

The original file name travels in the input object's metadata (common/names.py).
A failed item is marked with object tags on its input object
(`status=failed`, `error=<reason>`, and `reason`, the reason escaped so it reads
back whole: common/failure_tags.py), which workers write too.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from common.aws import Aws, is_not_found
from common.failure_tags import failed_by, failure_from_tags, failure_tagging
from common.names import ORIGINAL_FILENAME_META, encode_filename, original_filename
from common.output_object import label_of, read_result_metadata

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


def read_output(aws: Aws, key: str) -> dict[str, Any] | None:
    """The result a worker stored for `key`, or None when there is none yet.

    Returns the item fields (label, score, top5, worker, untrained). An output
    that does not say which model wrote it (not one of this service's workers)
    is taken to come from the model this deployment is configured with: with
    MODEL_WEIGHTS=random it is flagged untrained, never passed off as trained.
    """
    configured_untrained = aws.settings.untrained
    stored = head(aws, aws.settings.output_bucket, key)
    if stored is None:
        return None
    result = read_result_metadata(stored.get("Metadata", {}), configured_untrained)
    if result is not None:
        return result
    # No usable metadata: the body `<name>,<label>` still holds the label.
    body = aws.s3.get_object(Bucket=aws.settings.output_bucket, Key=key)["Body"].read()
    label = label_of(body.decode("utf-8", errors="replace"))
    return {"label": label, "score": None, "top5": [], "worker": "", "untrained": configured_untrained}


def read_failure(aws: Aws, key: str) -> tuple[str, str] | None:
    """The error tagged on a failed input object and the worker that tagged it ("" if
    none did), or None if it is not marked failed."""
    tag_set = aws.s3.get_object_tagging(Bucket=aws.settings.input_bucket, Key=key)["TagSet"]
    error = failure_from_tags(tag_set)
    return None if error is None else (error, failed_by(tag_set))


def read_name_and_token(aws: Aws, key: str) -> tuple[str | None, str]:
    """An input object's original file name (None if it has none) and client token ("" if none)."""
    stored = aws.s3.head_object(Bucket=aws.settings.input_bucket, Key=key)  # raises if there is none
    metadata = stored.get("Metadata", {})
    return original_filename(metadata), metadata.get(CLIENT_TOKEN_META, "")
