"""The output object: its text, `<image file name>,<label>`, one CSV record, and
its metadata, the whole result (written by workers, read by the web tier).

The name is the one the image was uploaded with. Quoted only when it needs to be
(a comma, a quote or a line break in it), so the usual `test_00.JPEG,cat` reads
the same to a person, to `split(",")` and to any CSV reader.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from typing import Any

from common.messages import ClassifyResponse, finite_number, wire_score

# The user-metadata key holding the result as JSON, so that a web tier rebuilding a
# batch from S3 shows the score and top 5 too (S3 allows 2 KB of metadata).
RESULT_KEY = "result"


def pair_text(filename: str, label: str) -> str:
    out = io.StringIO()
    # The record's own terminator is dropped after: given as "", the writer would
    # no longer quote a line break inside a name.
    csv.writer(out, lineterminator="\r\n").writerow([filename, label])
    return out.getvalue().removesuffix("\r\n")


def label_of(text: str) -> str:
    """The label in an output object's text (its last field)."""
    fields = next(csv.reader(io.StringIO(text)), [])
    return fields[-1].strip() if fields else ""


def result_metadata(response: ClassifyResponse) -> dict[str, str]:
    """The output object's user metadata for a successful response."""
    result = {"label": response.label, "score": wire_score(response.score),
              "top5": [[p.label, wire_score(p.score)] for p in response.top5],
              "worker": response.worker, "untrained": response.untrained}
    return {RESULT_KEY: json.dumps(result, separators=(",", ":"))}


def read_result_metadata(metadata: Mapping[str, str], untrained: bool) -> dict[str, Any] | None:
    """The result in an output object's metadata (label, score, top5, worker, untrained),
    or None when there is none to read. `untrained` is taken when the result does not
    say which model wrote it."""
    raw = metadata.get(RESULT_KEY)
    if not raw:
        return None
    try:
        result = json.loads(raw)
        label = result.get("label")
        if not isinstance(label, str) or not label:
            return None  # no result without its label: the object's text has one
        return {
            "label": label,
            # Rounded as the response was: objects written before their writer rounded too.
            "score": None if result.get("score") is None else wire_score(finite_number(result["score"])),
            "top5": [{"label": str(label), "score": wire_score(finite_number(score))}
                     for label, score in result.get("top5", [])],
            "worker": str(result.get("worker", "")),
            "untrained": bool(result.get("untrained", untrained)),
        }
    except (ValueError, TypeError, AttributeError, ArithmeticError):
        return None
