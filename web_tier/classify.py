"""POST /: the synchronous endpoint for programs.

One image in, one line out (`<name without extension>:<label>`), after waiting
for the worker's answer. Each request waits on its own item id, so any number
of concurrent requests each get their own image's answer.

A program whose connection was cut before the answer came cannot tell whether
its image was stored: with an `Idempotency-Key` header, sent again under the
same key, it is not stored (nor classified) twice, by this process or, after a
restart, the next. The key names a batch of its own (a hash of it), holding the
one image under the key as its token (as POST /api/jobs's `tokens`).
"""

from __future__ import annotations

import hashlib
import re

from flask import Blueprint, Response, request

from common.names import stem
from web_tier.auth import require_api_key
from web_tier.jobs import SentBefore, new_id
from web_tier.results import DONE
from web_tier.services import services
from web_tier.uploads import FORM_SLACK_BYTES, TOKEN_CHARACTER, UploadError, form_files, validate

bp = Blueprint("classify", __name__)

FIELDS = ("inputFile", "myfile")
# Unique enough to name a batch of its own: at least 16 characters (a UUID has 36).
IDEMPOTENCY_KEY = re.compile(TOKEN_CHARACTER + "{16,64}")


def _text(body: str, status: int) -> Response:
    # Exactly "<name>:<label>", no trailing newline: programs compare the body as is.
    return Response(body, status=status, mimetype="text/plain")


@bp.before_request
def _one_file_body_limit() -> None:
    # One file here: refuse a larger body before Werkzeug reads and spools it, not
    # after, as the app-wide limit (sized for /api/jobs's many files) would.
    request.max_content_length = services().settings.max_upload_bytes + FORM_SLACK_BYTES


@bp.post("/")
@require_api_key(lambda: _text("a valid API key is required (X-API-Key header)", 401))
def classify() -> Response:
    svc = services()
    files = form_files(request, FIELDS)
    if not files:
        how = "" if request.mimetype == "multipart/form-data" else " as multipart/form-data"
        raise UploadError(400, f"no file: send the image{how} in form field 'inputFile' (or 'myfile'), "
                               "as curl -F inputFile=@cat.jpg does")
    if len(files) > 1:
        raise UploadError(400, "one file per request here; POST several to /api/jobs")
    upload = validate(files[0], svc.settings)
    if svc.book.closing.is_set():
        # Nobody would wait for its answer here: store nothing (as /api/jobs does then).
        response = _text(f"{upload.filename}: not stored: the web tier is stopping; send it again", 503)
        response.headers["Retry-After"] = "5"
        return response

    batch_id, tokens = _batch_for(request.headers.get("Idempotency-Key"))
    outcome = svc.submitter.submit(batch_id, [upload], tokens)[0]
    if isinstance(outcome, UploadError) and outcome.status == 409:
        raise UploadError(409, "this Idempotency-Key came before with another file: give each upload "
                               "a key of its own", upload.filename)
    if isinstance(outcome, UploadError):
        raise outcome
    if isinstance(outcome, SentBefore):  # stored by an earlier request under this key
        outcome = outcome.item
    item = svc.book.wait(outcome.id, svc.settings.result_timeout_s)
    if item is None:
        # The image stays queued and will be classified: say where its result will be.
        if svc.book.closing.is_set():
            # No Retry-After: the image is stored and queued, and sending it again
            # would classify it twice.
            response = _text(f"{upload.filename}: the web tier is stopping; the image is still "
                             f"queued, see /api/jobs/{batch_id} (no need to send it again)", 503)
        else:
            response = _text(f"{upload.filename}: no result within {svc.settings.result_timeout_s:g} s; "
                             f"it is still queued, see /api/jobs/{batch_id}", 504)
        response.headers["X-Item-Id"] = outcome.id
        response.headers["X-Batch-Id"] = batch_id
        return response
    if item.state != DONE:
        response = _text(f"{upload.filename}: {item.error}", 422)
    else:
        response = _text(f"{stem(upload.filename)}:{item.label}", 200)
    # Where the item's score, top 5 and worker are: GET /api/jobs/<X-Batch-Id>.
    response.headers["X-Item-Id"] = item.id
    response.headers["X-Batch-Id"] = batch_id
    untrained = item.shows_untrained(bool(svc.book.untrained))  # as GET /api/jobs/<id> says
    response.headers["X-Model-Untrained"] = "true" if untrained else "false"
    return response


def _batch_for(key: str | None) -> tuple[str, list[str] | None]:
    """The batch and tokens for this upload: a new batch, or with an Idempotency-Key
    the key's own (rebuilt from S3 if an earlier process stored it)."""
    if key is None:
        return new_id(), None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise UploadError(400, "an Idempotency-Key is 16 to 64 letters, digits or '._:-' (a UUID, say), "
                               f"not {key[:70]!r}")
    batch_id = hashlib.sha256(f"POST / {key}".encode()).hexdigest()[:32]
    services().find_batch(batch_id)  # known here, or rebuilt from S3, or nothing yet
    return batch_id, [key]
