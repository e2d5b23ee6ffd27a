"""Error answers: JSON for the API, plain text for the program-facing POST /."""

from __future__ import annotations

import logging

from botocore.exceptions import BotoCoreError, ClientError
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.aws import error_reason
from web_tier.services import services
from web_tier.uploads import UploadError

log = logging.getLogger(__name__)


def wants_text() -> bool:
    """POST / speaks plain text to programs; everything else that fails speaks JSON."""
    return request.path == "/" and request.method == "POST"


def error_response(error: UploadError) -> Response:
    if wants_text():
        response = Response(error.to_text() + "\n", status=error.status, mimetype="text/plain")
    else:
        response = jsonify(error.to_json())
        response.status_code = error.status
    return response


def _too_large(exc: RequestEntityTooLarge) -> Response:
    limit, length = request.max_content_length, request.content_length
    if limit is not None and length is not None and length <= limit:
        # Within the size limit: Werkzeug counted more form parts than MAX_FORM_PARTS,
        # or found a form field (not a file) over MAX_FORM_MEMORY_SIZE.
        files = services().settings.max_files_per_request
        return error_response(UploadError(
            413, f"the form has too many parts (at most {files} files to /api/jobs, one to POST /) "
                 "or a field too large"))
    return error_response(UploadError(
        413, "the request is larger than the server accepts" + (f" ({limit} bytes)" if limit else "")))


def _http_error(exc: HTTPException) -> Response:
    # Pages keep Flask's HTML errors; API callers and programs get their format.
    if request.path.startswith(("/api/", "/healthz")) or wants_text():
        return error_response(UploadError(exc.code or 500, exc.description or exc.name))
    return exc.get_response()


def _aws_unavailable(exc: Exception) -> Response:
    # S3 or SQS failing after botocore's own retries: the caller may try again.
    log.warning("AWS failed on %s %s: %s", request.method, request.path, exc)
    return error_response(UploadError(503, f"storage unavailable ({error_reason(exc)}); try again"))


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(UploadError(500, "internal error"))


def register(app: Flask) -> None:
    app.register_error_handler(UploadError, error_response)
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    app.register_error_handler(HTTPException, _http_error)
    for aws_error in (BotoCoreError, ClientError):
        app.register_error_handler(aws_error, _aws_unavailable)
    app.register_error_handler(Exception, _unexpected)
