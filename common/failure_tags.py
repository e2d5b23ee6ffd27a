"""How an input object is marked failed, so that a batch rebuilt from S3 shows why.

The worker marks an image the model could not take; the web tier marks one whose
request went to the dead-letter queue, and reads the marks back when it rebuilds a
batch. Both write through here, so both write what S3 accepts.
"""

from __future__ import annotations

import re

# S3 tag values: up to 256 Unicode letters, numbers, spaces and `_ . : / = + - @`.
# One character outside that set makes the whole tagging call fail.
MAX_ERROR_CHARS = 250
_OUTSIDE_TAG_SET = re.compile(r"[^\w.:/=+\-@]+")  # spaces too: runs become one space


def failure_tagging(reason: str) -> dict[str, list[dict[str, str]]]:
    """The `Tagging` argument of put_object_tagging that marks an input failed."""
    error = _OUTSIDE_TAG_SET.sub(" ", reason).strip()[:MAX_ERROR_CHARS]
    return {"TagSet": [{"Key": "status", "Value": "failed"}, {"Key": "error", "Value": error}]}


def failure_from_tags(tag_set: list[dict[str, str]]) -> str | None:
    """The error a failure mark holds, or None if these tags do not mark a failure."""
    found = {tag["Key"]: tag["Value"] for tag in tag_set}
    if found.get("status") != "failed":
        return None
    return found.get("error") or "failed"
