"""POST /: the synchronous endpoint for programs.

One image in, one line out (`<name without extension>:<label>`), after waiting
for the worker's answer; to a client that asks for JSON (Accept), the item as
GET /api/jobs/<batch_id> shows it, and its refusals as the API's. Each request
waits on its own item id, so any number of concurrent requests each get their
own image's answer.

A program whose connection was cut before the answer came cannot tell whether
its image was stored: with an `Idempotency-Key` header, sent again under the
same key, it is not stored (nor classified) twice, by this process or, after a
restart, the next. The key names a batch of its own (a hash of it), holding the
one image under the key as its token (as POST /api/jobs's `tokens`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import select
import socket
import time

from flask import Blueprint, Response, jsonify, redirect, request, url_for
from werkzeug.datastructures import FileStorage

from common.names import stem
from web_tier.auth import KEY_REQUIRED, require_api_key
from web_tier.errors import ANSWERS_PATH, answer_page, error_response, wants_json, wants_page
from web_tier.filenames import display_name
from web_tier.form import (
    BATCH_FORM_FIELDS,
    CLASSIFY_FIELDS,
    FORM_SLACK_BYTES,
    TOKEN_CHARACTER,
    file_bytes,
    form_files,
)
from web_tier.image_check import validate
from web_tier.refusals import STOPPING, Code, Refusal
from web_tier.results import DONE, Item, ResultBook
from web_tier.services import Services, services
from web_tier.submit import STILL_STORING, SentBefore, new_id
from web_tier.upload_memory import UPLOAD_MEMORY_FULL

bp = Blueprint("classify", __name__)
log = logging.getLogger(__name__)

# Unique enough to name a batch of its own: at least 16 characters (a UUID has 36).
IDEMPOTENCY_KEY = re.compile(TOKEN_CHARACTER + "{16,64}")
# How often a request waiting for its result looks whether its client is still there.
CLIENT_CHECK_S = 1.0
# nginx's word for a request whose client closed the connection before the answer.
CLIENT_CLOSED = 499
# The plain form's answer page waits this long for the label, then answers that the
# image is queued, and offers to reload itself this often.
ANSWER_PAGE_WAIT_S = 10.0
ANSWER_PAGE_REFRESH_S = 5


def _refusal(status: int, message: str, filename: str | None, code: Code) -> Response:
    """A refusal, as every refusal is answered (errors.error_response: text, JSON or the
    plain form's page)."""
    return error_response(Refusal(status, message, filename, code=code))


def _stored_refusal(status: int, message: str, filename: str, code: Code, item_id: str,
                    batch_id: str) -> Response:
    """An image stored and queued, with no label to give: where its result will be, in
    headers and, in JSON, in the body too, as the JSON 200 has them."""
    response = error_response(Refusal(status, message, filename, code=code,
                                      stored_as={"batch_id": batch_id, "id": item_id}))
    response.headers["X-Item-Id"] = item_id
    response.headers["X-Batch-Id"] = batch_id
    return response


def _label_answer(filename: str, item: Item, batch_id: str) -> Response:
    """`<name without extension>:<label>`; in JSON, the item as GET /api/jobs/<batch_id>
    shows it. (The page's own form never gets here: its answer is GET /answers/<batch_id>.)"""
    if wants_json():
        return jsonify({"batch_id": batch_id, **item.to_json(bool(services().book.untrained))})
    # Exactly "<name>:<label>", no trailing newline: programs compare the body as is.
    return Response(f"{stem(filename)}:{item.label}", mimetype="text/plain")


@bp.before_request
def _one_file_body_limit() -> None:
    # One file here: refuse a larger body before Werkzeug reads and spools it, not
    # after, as the app-wide limit (sized for /api/jobs's many files) would.
    request.max_content_length = services().settings.max_upload_bytes + FORM_SLACK_BYTES


@bp.post("/")
@require_api_key(lambda: _refusal(401, KEY_REQUIRED, None, Code.UNAUTHORIZED))
def classify() -> Response:
    # RESULT_TIMEOUT counts from here, not from the image being queued: storing it may
    # take minutes with S3 or SQS failing (retried), and proxies set to wait a little
    # over RESULT_TIMEOUT would cut such requests off, their answers lost.
    arrived = time.monotonic()
    svc = services()
    files = form_files(request, CLASSIFY_FIELDS)
    if not files:
        how = "" if request.mimetype == "multipart/form-data" else " as multipart/form-data"
        raise Refusal(400, f"no file: send the image{how} in form field 'inputFile' (or 'myfile'), "
                           "as curl -F inputFile=@cat.jpg does", code=Code.NO_FILE)
    batch_fields = [name for name in BATCH_FORM_FIELDS if name in request.form or name in request.args]
    if batch_fields:
        # Taken without a word, they would have the client look for its file in a batch
        # it named, where it never is: POST / gives each file a batch of its own.
        raise Refusal(400, f"{batch_fields[0]} is for POST /api/jobs: POST / puts its one file in a "
                           "batch of its own (to send it again safely, give it an Idempotency-Key header)",
                      code=Code.BAD_REQUEST)  # the request refused, not its file: the reason alone
    if len(files) > 1:
        names = ", ".join(display_name(f) or "(no name)" for f in files)
        raise Refusal(400, f"one file per request here, got {len(files)} ({names}); POST several "
                           "to /api/jobs", code=Code.TOO_MANY_FILES)
    # Its bytes, from reading to stored, are taken from the process's upload memory;
    # not through the wait for the answer: 100 waiting 9 MB uploads would hold 1 GB.
    with svc.upload_memory.taken(file_bytes(files[0], svc.settings.max_upload_bytes)) as room:
        if not room:
            why = STOPPING if svc.book.closing.is_set() else UPLOAD_MEMORY_FULL
            raise Refusal(503, why, display_name(files[0]), code=Code.BUSY)
        outcome, filename, batch_id = _store(svc, files[0])
    if isinstance(outcome, Refusal):
        raise _refusal_of(outcome, filename)
    if isinstance(outcome, SentBefore):  # stored by an earlier request under this key
        outcome = outcome.item
    if wants_page():
        # The answer is a page of its own: reloading it asks again, where reloading
        # this POST's answer would send the image again.
        return redirect(url_for("classify.answer", batch_id=batch_id), code=303)
    waited = time.monotonic() - arrived
    item, client_left = _wait_while_connected(svc.book, outcome, svc.settings.result_timeout_s - waited)
    if client_left:
        log.info("POST / for item %s: the client left before its result; it is still queued", outcome.id)
        return _stored_refusal(CLIENT_CLOSED, f"the client left; the image is still queued, "
                                              f"see /api/jobs/{batch_id}", filename, Code.STILL_QUEUED,
                               outcome.id, batch_id)
    if item is None:
        return _no_result_response(filename, outcome.id, batch_id)
    return _result_response(filename, item, batch_id)


# No id at all is an upload not found too, said in the page's words, not Werkzeug's;
# without the slash as well, where Werkzeug's redirect to the slash named the Host header's
# host (a shared cache in front could keep a redirect to whatever host a client said).
@bp.get(ANSWERS_PATH, defaults={"batch_id": ""}, strict_slashes=False)
@bp.get(ANSWERS_PATH + "<batch_id>")
def answer(batch_id: str) -> Response:
    """The plain form's answer for the image it stored in `batch_id`, as a page: its
    label, waited for a few seconds; or that it is queued still, reloading itself."""
    svc = services()
    items = svc.rebuilder.find_batch(batch_id)
    if not items:
        return answer_page(404, "no such upload here: classify the image again")
    if len(items) > 1:
        # A batch of POST /api/jobs: one of its images shown as its answer would hide the rest.
        shown_at = f"/#batches={batch_id}"
        return answer_page(404, f"this is a batch of {len(items)} images, not one upload: the page "
                                f"shows them all at {shown_at}", link=(shown_at, "Show them all"))
    # HEAD (a link checker, a chat's preview) is answered at once: it reads no label.
    wait_s = 0.0 if request.method == "HEAD" else min(ANSWER_PAGE_WAIT_S, svc.settings.result_timeout_s)
    item, _client_left = _wait_while_connected(svc.book, items[0], wait_s)
    # Reloading itself only if the user chose to (the page offers it).
    reloading = request.args.get("reload") == "1"
    if item is None:
        # Answered now: waited for up to RESULT_TIMEOUT, the browser would show the form's
        # address meanwhile, and a user who stopped or reloaded it lose the only way to
        # the answer.
        if svc.book.closing.is_set():
            why = "the server is restarting; the image is still queued"
            return answer_page(503, why, items[0].filename, waiting_s=ANSWER_PAGE_REFRESH_S * 3,
                               reloading=reloading)
        return answer_page(202, "not classified yet: the image is queued", items[0].filename,
                           waiting_s=ANSWER_PAGE_REFRESH_S, reloading=reloading)
    status, message, label, untrained = _outcome(item)
    if item.provisional:
        message += (f". To send it again without storing it twice: the page at /#batches={batch_id}, "
                    f"its Send again")
    return answer_page(status, message, item.filename, label, untrained, score=item.score)


def _outcome(item: Item) -> tuple[int, str, str | None, bool]:
    """A finished item's answer: its status, its error, its label, and whether to say
    the label is untrained (as GET /api/jobs/<id> says)."""
    untrained = item.shows_untrained(bool(services().book.untrained))
    if item.state != DONE:
        return 422, item.error or "failed", None, untrained
    return 200, "", item.label, untrained


def _refusal_of(outcome: Refusal, filename: str) -> Refusal:
    """The refusal POST / answers for an upload the submitter refused: its own, but said
    in terms of the Idempotency-Key for a clash or a copy still being stored."""
    if outcome.status == 409:
        return Refusal(409, "this Idempotency-Key came before with another file: give each upload "
                            "a key of its own", filename, code=Code.TOKEN_CONFLICT)
    if outcome.reason == STILL_STORING:
        return Refusal(503, "an earlier request with the same Idempotency-Key is storing this file; "
                            "send it again", filename, code=Code.BUSY)
    return outcome


def _no_result_response(filename: str, item_id: str, batch_id: str) -> Response:
    """The answer for an item with no result in time, or none before the web tier stops:
    the image stays queued and will be classified, so it says where its result will be."""
    svc = services()
    if svc.book.closing.is_set():
        # No Retry-After: the image is stored and queued, and sending it again
        # would classify it twice.
        endpoint = svc.settings.endpoint_url
        unless = (f", unless the AWS at {endpoint} stops too: make run's embedded AWS keeps "
                  "nothing across a stop" if endpoint else "")
        return _stored_refusal(503, f"the web tier is stopping; the image is still queued, see "
                                    f"/api/jobs/{batch_id} (no need to send it again{unless})", filename,
                               Code.STILL_QUEUED, item_id, batch_id)
    return _stored_refusal(504, f"no result within {svc.settings.result_timeout_s:g} s; it is still queued, "
                                f"see /api/jobs/{batch_id}", filename, Code.TIMEOUT, item_id, batch_id)


def _result_response(filename: str, item: Item, batch_id: str) -> Response:
    """The answer for a finished item: `<name>:<label>`, or its error."""
    status, message, label, untrained = _outcome(item)
    if item.provisional:
        # "Send it again" (the dead letter's words, in S3's tags too) read as "upload it
        # again": stored twice. Said how, as the README's table of codes does.
        message += (f". To send it again without storing it twice: "
                    f"POST /api/jobs/{batch_id}/items/{item.id}/again")
    if label is None:
        code = item.failure_code or Code.CLASSIFICATION_FAILED
        response = _stored_refusal(status, message, filename, code, item.id, batch_id)
    else:
        response = _label_answer(filename, item, batch_id)
        # Where the item's score, top 5 and worker are: GET /api/jobs/<X-Batch-Id>.
        response.headers["X-Item-Id"] = item.id
        response.headers["X-Batch-Id"] = batch_id
    response.headers["X-Model-Untrained"] = "true" if untrained else "false"
    return response


def _store(svc: Services, storage: FileStorage) -> tuple[Item | SentBefore | Refusal, str, str]:
    """Check the file, then store and queue it: the outcome, the file's name, and its batch's id."""
    upload = validate(storage, svc.settings)
    # Read: its spool (memory, or a descriptor of the request's temporary file) is not
    # kept while this request waits for the answer, up to RESULT_TIMEOUT.
    storage.close()
    if svc.book.closing.is_set():
        # Nobody would wait for its answer here: store nothing (as /api/jobs does then).
        raise Refusal(503, STOPPING, upload.filename, code=Code.BUSY)

    batch_id, tokens = _batch_for(request.headers.get("Idempotency-Key"))
    with svc.book.in_use(batch_id):  # as /api/jobs: the key's batch kept from its look-up on
        if tokens:
            # The key's own batch, rebuilt from S3 if an earlier process stored it: its
            # token is then found, and the image not stored again.
            svc.rebuilder.find_batch(batch_id)
        return svc.submitter.submit(batch_id, [upload], tokens)[0], upload.filename, batch_id


def _wait_while_connected(book: ResultBook, known: Item, timeout_s: float) -> tuple[Item | None, bool]:
    """The item `known` once it has a result (None after `timeout_s`), and whether the
    client left first. A client that gave up (its own timeout, a proxy's) reads no
    answer, and its request would hold one of the threads until RESULT_TIMEOUT: clients
    sending again on a 5 s timeout would take all 1,024, /healthz with them."""
    if known.is_finished:
        # Not looked up again: under a backlog past its cap the book may have forgotten
        # a finished batch since, and an answered image would be "queued" or a 504.
        return known, False
    item_id = known.id
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        item = book.wait(item_id, max(0.0, min(CLIENT_CHECK_S, left)))
        # (An id the book does not hold: wait would answer at once, each round.)
        if item is not None or left <= CLIENT_CHECK_S or book.closing.is_set() or book.get(item_id) is None:
            return item, False
        if _client_left():
            return None, True


# The peer's end, seen by poll even with bytes it sent after its request still unread
# (a stray byte, a pipelined request), where a peek returns those bytes and never the
# end: such a client held its thread until RESULT_TIMEOUT without a socket open. Linux;
# elsewhere 0, and the peek below tells an end that comes with nothing unread.
_PEER_CLOSED = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def _client_left() -> bool:
    """Whether this request's client has closed its connection (or reset it). Only
    under gunicorn, which says which socket."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        # Not select(): it refuses descriptors from 1,024 up, which a busy web tier's
        # sockets reach (gunicorn.conf.py allows 4,096), and every client would then look
        # connected.
        poller = select.poll()
        poller.register(sock, select.POLLIN | _PEER_CLOSED)
        events = poller.poll(0)
    except (OSError, ValueError, TypeError):  # no descriptor to ask about
        return False
    happened = events[0][1] if events else 0
    if happened & _PEER_CLOSED:
        return True
    if not happened & select.POLLIN:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, ValueError):  # nothing to read after all; an SSL socket
        return False
    except OSError:  # reset by the client
        return True


def _batch_for(key: str | None) -> tuple[str, list[str] | None]:
    """The batch and tokens for this upload: a new batch, or with an Idempotency-Key
    the key's own, the key its token."""
    if key is None:
        return new_id(), None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise Refusal(400, "an Idempotency-Key is 16 to 64 letters, digits or '._:-' (a UUID, say), "
                           f"not {key[:70]!r}", code=Code.BAD_REQUEST)
    return hashlib.sha256(f"POST / {key}".encode()).hexdigest()[:32], [key]
