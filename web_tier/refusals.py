"""A refused request: its HTTP status, the reason, the file it concerns, and its code."""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """What a refusal is, for programs: the `code` of every JSON error (and of each
    file in POST /api/jobs's `rejected`), stable where the prose in `error` is not.
    A client tells "too large" from "busy, send again" by this, never by the prose.
    README ("Error codes") says each, and which are worth sending again."""

    # The request itself: fix it, sending it again as it is gets the same answer.
    BAD_REQUEST = "bad_request"  # a malformed body or form, a field misused or misplaced
    NO_FILE = "no_file"
    TOO_MANY_FILES = "too_many_files"
    REQUEST_TOO_LARGE = "request_too_large"  # the body, its form parts or a text field
    UNSUPPORTED_ENCODING = "unsupported_encoding"  # a Content-Encoding, a Transfer-Encoding
    LENGTH_REQUIRED = "length_required"
    REQUEST_TIMEOUT = "request_timeout"  # the body stopped arriving (WEB_RECEIVE_TIMEOUT)
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"  # a browser's request sent by another site
    NOT_FOUND = "not_found"  # no such path
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNKNOWN_BATCH = "unknown_batch"
    TOKEN_CONFLICT = "token_conflict"  # a token (or Idempotency-Key) names another file
    UNKNOWN_ITEM = "unknown_item"  # no such item in the batch named
    # An item sent again (POST .../again) that is not a dead letter's failure: queued,
    # classified, failed by a worker on the image, or its image gone.
    NOT_SENT_AGAIN = "not_sent_again"
    # One file: the others of a request are not concerned.
    TOO_LARGE = "too_large"  # its bytes, or its image's pixels
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_TYPE = "unsupported_type"  # an image, of a type this service does not read
    UNREADABLE_IMAGE = "unreadable_image"  # damaged, cut short, or built to be slow to read
    CLASSIFICATION_FAILED = "classification_failed"  # stored; the worker gave no label
    # Stored; no worker answered it in the attempts allowed (each one holding it crashed,
    # stalled or was stopped): POST .../items/<id>/again queues the same item again.
    DEAD_LETTER = "dead_letter"
    # The service: nothing was stored, send the same request again after Retry-After.
    BUSY = "busy"
    AWS_UNAVAILABLE = "aws_unavailable"
    # Stored and queued, with no label yet: follow GET /api/jobs/<X-Batch-Id>; sent
    # again, the image would be classified twice.
    TIMEOUT = "timeout"
    STILL_QUEUED = "still_queued"  # the web tier is stopping (or the client left)
    INTERNAL = "internal"


# The refusals that stored nothing and are worth sending again as they are (with
# Retry-After): every other is either the client's to fix or stored already.
SEND_AGAIN = frozenset({Code.BUSY, Code.AWS_UNAVAILABLE, Code.REQUEST_TIMEOUT})
# Why an upload is not stored while the web tier is stopping (Code.BUSY).
STOPPING = "not stored: the web tier is stopping; send this file again"

# The code of a refusal Werkzeug makes (a path with no route, a method it does not
# take): by its status, any other 4xx being the request's fault, a 5xx the server's.
_HTTP_CODES = {400: Code.BAD_REQUEST, 401: Code.UNAUTHORIZED, 403: Code.FORBIDDEN, 404: Code.NOT_FOUND,
               405: Code.METHOD_NOT_ALLOWED, 411: Code.LENGTH_REQUIRED, 413: Code.REQUEST_TOO_LARGE}


def code_of_status(status: int) -> Code:
    """The code of a refusal known only by its HTTP status (Werkzeug's own)."""
    return _HTTP_CODES.get(status, Code.BAD_REQUEST if status < 500 else Code.INTERNAL)


class Refusal(Exception):
    """A refused request or file: HTTP status, the reason, the file it concerns, and
    its code (required: every refusal says what it is)."""

    def __init__(self, status: int, reason: str, filename: str | None = None, *, code: Code,
                 stored_as: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.filename = filename
        self.code = code
        # An image stored and queued all the same (POST /'s timeout, say): its
        # `batch_id` and `id`, where its result will be.
        self.stored_as = stored_as or {}

    def to_json(self) -> dict[str, object]:
        return {"error": self.reason, "code": self.code, "filename": self.filename, **self.stored_as}

    def to_text(self) -> str:
        return about(self.filename, self.reason)


def about(filename: str | None, text: str) -> str:
    """`<file name>: <text>`, or the text alone for no file: how POST / says a refusal."""
    return f"{filename}: {text}" if filename else text
