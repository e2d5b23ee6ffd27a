"""Error answers: JSON for the API, plain text for the program-facing POST / (JSON to
a client that asks for it), a page for the page's own form without JavaScript
(POST /?answer=page). Every JSON error carries a `code` (web_tier/refusals.py)."""

from __future__ import annotations

import errno
import logging
import re
import tempfile

from flask import Flask, Response, jsonify, render_template, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from common.aws_errors import AWS_ERRORS, error_reason
from common.image_limits import too_large
from web_tier.filenames import clean_name
from web_tier.form import CLASSIFY_FIELDS, JOBS_FIELDS, MAX_TEXT_FIELD_BYTES, send_as_files
from web_tier.multipart import FormTextTooLarge
from web_tier.refusals import SEND_AGAIN, Code, Refusal, code_of_status
from web_tier.services import services
from web_tier.slow_clients import ClientTooSlow
from web_tier.unread_body import BODY_STOPPED, reads_bounded_by

log = logging.getLogger(__name__)


def at_post_root() -> bool:
    """POST /, the endpoint for programs, or `/` with any method but a browser's GET (a
    PUT / too, not the page's HTML 405): answered as POST / answers, not as a page."""
    return request.path == "/" and request.method not in ("GET", "HEAD")


# What POST / answers in, its contract's text first: a client that accepts both as much
# (curl's and requests' "*/*", or no Accept at all) gets text.
_POST_ROOT_TYPES = ("text/plain", "text/html", "application/json")


def wants_json() -> bool:
    """A POST / whose client asks for JSON (Accept: application/json), and prefers no
    text to it: a program would otherwise read its 200 as text and each error as prose."""
    return at_post_root() and request.accept_mimetypes.best_match(_POST_ROOT_TYPES) == "application/json"


def wants_text() -> bool:
    """POST / speaks plain text to programs, unless they ask for JSON; the API speaks JSON."""
    return at_post_root() and not wants_json()


def is_api_path(path: str) -> bool:
    """`/api` and everything under it: answered in JSON, its unknown paths too."""
    return path == "/api" or path.startswith("/api/")


# Where the plain form's answer is (web_tier/classify.py, `answer`).
ANSWERS_PATH = "/answers/"


def wants_page() -> bool:
    """The upload page's form for browsers without JavaScript, whose users read the
    answer as a page (with the untrained model said), not a line of text: its
    POST /?answer=page (whatever it accepts), and the answer page that leads to."""
    return (at_post_root() and request.args.get("answer") == "page") or request.path.startswith(ANSWERS_PATH)


def answer_page(status: int, message: str, filename: str | None = None, label: str | None = None,
                untrained: bool | None = None, *, score: float | None = None, waiting_s: int | None = None,
                reloading: bool = False, link: tuple[str, str] | None = None) -> Response:
    """The plain form's answer: the label and its score, or why there is none (`message`).
    `waiting_s`: the image is still queued, and the page offers to look again, or to
    reload itself that often; `reloading`: the user chose that. Never unasked: each
    reload takes a keyboard's focus and a screen reader back to the top.
    `link`: (address, text) of where to go instead, shown under the message."""
    if untrained is None:
        untrained = bool(services().book.untrained)
    # The tab's title says the state too, or after a reload it reads the same, answered or not.
    state = label if label is not None else "queued" if waiting_s else "no label"
    if label is not None and untrained:
        # The tab, history and bookmarks show the title alone: the label there is said
        # untrained too, as everywhere else one is shown.
        state += " (untrained)"
    title = f"{state} · {filename}" if filename else _up_to_its_colon(message)
    html = render_template("answer.html", filename=filename, label=label, score=score, message=message,
                           untrained=untrained, waiting_s=waiting_s, reloading=reloading and bool(waiting_s),
                           title=title, link=link)
    return Response(html, status=status, mimetype="text/html")


def _up_to_its_colon(message: str) -> str:
    """A page's title without a file: what it says, up to its first colon outside
    parentheses ("no such upload here: ..."). One inside them ("(..., or Authorization:
    Bearer)") cut the 401's title mid-bracket. A stray ")" counts for nothing."""
    depth = 0
    for at, char in enumerate(message):
        depth = max(0, depth + {"(": 1, ")": -1}.get(char, 0))
        if char == ":" and depth == 0:
            return message[:at]
    return message


# Where files are sent to the API, whose answers all list the files stored and refused.
JOBS_PATH = "/api/jobs"


def error_json(error: Refusal) -> dict[str, object]:
    """An error's JSON; at POST /api/jobs with `items` and `rejected` as its 202 and its
    refusal of every file have them: a client reading body["rejected"] must not fail with
    a KeyError on a refusal of the whole request. Empty: no file was stored,
    and none was refused on its own."""
    if request.path == JOBS_PATH:
        return {"items": [], "rejected": [], **error.to_json()}
    return error.to_json()


def error_response(error: Refusal, **more: object) -> Response:
    """The answer to a refusal, as the client asked for it; `more`: fields its JSON
    carries besides (an API answer's own)."""
    if wants_page():
        response = answer_page(error.status, error.reason, error.filename)
    elif wants_text():
        # No trailing newline, as the 200's "<name>:<label>" (which the contract fixes)
        # and every other text answer of POST /: a client comparing or splitting the
        # body would have one more character to strip on some answers only.
        response = Response(error.to_text(), status=error.status, mimetype="text/plain")
    else:
        response = jsonify({**error_json(error), **more})
        response.status_code = error.status
    return with_retry_after(response, error.code)


def with_retry_after(response: Response, code: str) -> Response:
    """`response`, with Retry-After if its refusal (`code`) is worth sending again."""
    if code in SEND_AGAIN:
        # These refusals stored nothing: say that sending again is safe (the load
        # test, like other clients, sends again only a 503 with Retry-After). Not a
        # 503 of an image stored and queued (STILL_QUEUED): sent again, it would be
        # classified twice.
        response.headers["Retry-After"] = "5"
    return response


def _too_large(exc: RequestEntityTooLarge) -> Response:
    if isinstance(exc, FormTextTooLarge):
        return error_response(Refusal(
            413, f"the form's text fields and part headers (file names) hold more than {exc.budget} "
                 f"bytes in all: " + send_as_files(_file_fields()[0]), code=Code.REQUEST_TOO_LARGE))
    limit, length = request.max_content_length, request.content_length
    if limit is not None and length is not None and length <= limit:
        # Within the size limit: Werkzeug counted more form parts than MAX_FORM_PARTS, or
        # found a text field (most often an image sent as text) or a part's headers over
        # MAX_FORM_MEMORY_SIZE. It raises the same bare 413 for each.
        files = services().settings.max_files_per_request
        return error_response(Refusal(
            413, f"the form has too many parts (at most {files} files to /api/jobs, each with at most "
                 f"one token; one file to POST /), or a text field or a part's headers (its file name) "
                 f"over {MAX_TEXT_FIELD_BYTES} bytes: " + send_as_files(_file_fields()[0]),
            code=Code.REQUEST_TOO_LARGE))
    if at_post_root():
        # POST / takes one file, so its limit is the file's: say so, naming the file. The
        # body is not read, so it may be several files under the limit, each: said too,
        # rather than naming the first one too large.
        max_bytes = services().settings.max_upload_bytes
        return error_response(Refusal(
            413, f"{too_large(max_bytes)}, or the request holds more than the one file POST / takes "
                 f"(send several to /api/jobs)", _first_file_name(), code=Code.TOO_LARGE))
    return error_response(Refusal(
        413, "the request is larger than the server accepts" + (f" ({limit} bytes)" if limit else ""),
        code=Code.REQUEST_TOO_LARGE))


def _file_fields() -> tuple[str, ...]:
    """The form fields this request's path takes its files from."""
    return CLASSIFY_FIELDS if request.path == "/" else JOBS_FIELDS


_FILENAME = re.compile(rb'filename="([^"\r\n]*)"')
_PEEK_BYTES = 8192
# A client that declared a large body and then stalls gets its 413 after this, named or not.
_PEEK_TIMEOUT_S = 1.0


def _first_file_name() -> str | None:
    """The name of the first file in a body refused unread for its declared length,
    read from the headers of its first part, at its start; None if it cannot be.

    Only with a Content-Length: a chunked body was refused part-way through, where
    the bytes are the file's own (which may well contain `filename="..."`)."""
    stream = request.environ.get("wsgi.input")
    if request.content_length is None or stream is None:
        return None
    try:
        with reads_bounded_by(request.environ, _PEEK_TIMEOUT_S):
            head = stream.read(_PEEK_BYTES)
    except Exception:  # a client gone or too slow: no name then
        return None
    found = _FILENAME.search(head)
    return clean_name(found.group(1).decode("utf-8", "replace")) if found else None


def _http_error(exc: HTTPException) -> Response:
    # Pages keep Flask's HTML errors; API callers and programs get their format.
    if is_api_path(request.path) or request.path.startswith("/healthz") or at_post_root() or wants_page():
        status = exc.code or 500
        response = error_response(Refusal(status, exc.description or exc.name,
                                          code=code_of_status(status)))
        # Werkzeug's own headers: a 405's Allow names the methods that are.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response
    return exc.get_response()


def _aws_unavailable(exc: Exception) -> Response:
    # S3 or SQS failing after botocore's own retries: the caller may try again.
    log.warning("AWS failed on %s %s: %s", request.method, request.path, exc)
    return error_response(Refusal(503, f"storage unavailable ({error_reason(exc)}); try again",
                                  code=Code.AWS_UNAVAILABLE))


def _malformed_body(exc: ParseException) -> Response:
    # A chunked body whose framing is broken (gunicorn reads it as the form is parsed):
    # the client's mistake. Nothing after it on the connection can be read, so gunicorn
    # closes it after this answer (whose "Connection: keep-alive" is gunicorn's own: it
    # drops a Connection header set here).
    return error_response(Refusal(400, f"the request body is malformed ({exc})", code=Code.BAD_REQUEST))


def _body_stopped(exc: ClientDisconnected) -> Response:
    # Werkzeug's word for a body read that failed (web_tier/slow_clients.py's receive
    # timeout) or ended short: its generic 400 would not say which, nor that nothing
    # was stored. A client that has really gone reads nothing of it, harmlessly.
    request.environ[BODY_STOPPED] = True  # no rest of the body to drain (unread_body.py)
    if isinstance(exc.__context__, ClientTooSlow):  # the read Werkzeug's stream saw fail
        settings = services().settings
        return error_response(Refusal(
            408, f"the request's body came too slowly (under {settings.min_receive_rate} bytes a second "
                 f"after its first {settings.receive_timeout_s:g} s); nothing was stored: send it again "
                 "over a faster link", code=Code.REQUEST_TIMEOUT))
    return error_response(Refusal(408, "the request's body stopped arriving before its end; nothing "
                                       "was stored: send it again", code=Code.REQUEST_TIMEOUT))


def _unexpected(exc: Exception) -> Response:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # The upload's temporary file (web_tier/spool.py) found no room on the disk, or in
        # WEB_SPOOL_BYTES, as the form was read: nothing is stored yet, and the same
        # request may be sent again once there is room (a bare 500 would say neither).
        log.error("no room to spool %s %s: %s (TMPDIR=%s)", request.method, request.path, exc,
                  tempfile.gettempdir())
        return error_response(Refusal(503, "the server has no room to hold this upload now; nothing "
                                           "was stored: send it again later, or in smaller requests",
                                      code=Code.BUSY))
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(Refusal(500, "internal error", code=Code.INTERNAL))


def register(app: Flask) -> None:
    app.register_error_handler(Refusal, error_response)
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    app.register_error_handler(ClientDisconnected, _body_stopped)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(ParseException, _malformed_body)
    for aws_error in AWS_ERRORS:
        app.register_error_handler(aws_error, _aws_unavailable)
    app.register_error_handler(Exception, _unexpected)
