"""The outcome S3 records for a request: the result a worker wrote to the output
bucket, or the failure tagged on the input object (common/failure_tags.py).

A worker stores an outcome before it replies, so one that died in between left an
outcome that stands. Whoever answers a request no reply came for reads it here, in
the same order: the web tier for a dead letter and for a batch rebuilt from S3
(web_tier/rebuild.py), a worker for a request whose copies used up their attempts
(app_tier/fetch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from common.aws import Aws
from common.aws_errors import is_not_found
from common.failure_tags import failed_by, failure_from_tags
from common.output_object import label_of, read_result_metadata


@dataclass(frozen=True)
class StoredOutcome:
    """A result (`result`: label, score, top5, worker, untrained, as
    read_result_metadata gives them), or a failure (`error`, and the worker that
    marked it: "" for a dead letter)."""

    result: dict[str, Any] | None = None
    error: str | None = None
    worker: str = ""


def stored_outcome(aws: Aws, bucket: str, key: str, untrained: bool,
                   tag_set: list[dict[str, str]] | None = None,
                   result_stored: bool = True, failure_looked_for: bool = True) -> StoredOutcome | None:
    """What S3 records for the request for `key` (its upload in `bucket`): the result
    if there is one (it wins over a failure marked too: a dead letter's mark, then a
    late answer), else the failure; None when neither is stored, the input object gone
    too (expired, deleted: nothing was marked on it). S3's other errors raise.

    A result that does not say which model made it (not one of this service's
    workers') is taken to come from the model `untrained` says: with
    MODEL_WEIGHTS=random it is flagged untrained, never passed off as trained. Needs
    s3:ListBucket on the output bucket, or a missing result answers 403, not 404.
    `tag_set`: the input object's tags, if the caller has read them already (none for
    an object gone), not to read them twice. `result_stored`: False when the caller
    knows no result is stored (a listing of the output bucket), not to look for one.
    `failure_looked_for`: False when only a result matters to the caller (None then
    if none is stored), not to read the input object's tags.
    """
    output_bucket = aws.settings.output_bucket
    try:
        stored = aws.s3.head_object(Bucket=output_bucket, Key=key) if result_stored else None
    except ClientError as exc:
        if not is_not_found(exc):
            raise
        stored = None
    if stored is not None:
        result = read_result_metadata(stored.get("Metadata", {}), untrained)
        if result is None:
            # No usable metadata: the body `<name>,<label>` still holds the label.
            body = aws.s3.get_object(Bucket=output_bucket, Key=key)["Body"].read()
            result = {"label": label_of(body.decode("utf-8", errors="replace")), "score": None,
                      "top5": [], "worker": "", "untrained": untrained}
        return StoredOutcome(result=result, worker=result["worker"])
    if not failure_looked_for:
        return None
    if tag_set is None:
        try:
            tag_set = aws.s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
    error = failure_from_tags(tag_set)
    return None if error is None else StoredOutcome(error=error, worker=failed_by(tag_set))
