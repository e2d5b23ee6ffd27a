"""The JSON API the page (and scripts) use: batches, their results, status."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.datastructures import FileStorage

from web_tier import events
from web_tier.auth import KEY_REQUIRED, require_api_key
from web_tier.batch_json import batch_json_slices
from web_tier.errors import error_response, with_retry_after
from web_tier.filenames import display_name
from web_tier.form import BATCH_FORM_FIELDS, JOBS_FIELDS, check_count, file_bytes, form_files, form_tokens
from web_tier.image_check import Upload, validate
from web_tier.refusals import STOPPING, Code, Refusal
from web_tier.results import is_service_id
from web_tier.results_csv import results_csv_slices
from web_tier.services import services
from web_tier.submit import UPLOAD_THREADS, SentBefore, new_id
from web_tier.upload_memory import UPLOAD_MEMORY_FULL

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")


# A request's files are validated and stored this many at a time, each chunk's bytes
# held in memory only while it is stored: a request of a thousand 10 MB files never
# holds them all at once. As many as the upload pool stores at once, which a chunk then
# keeps busy; named apart, as here it bounds memory, not threads.
FILES_PER_CHUNK = UPLOAD_THREADS


def _unauthorized() -> Response:
    return error_response(Refusal(401, KEY_REQUIRED, code=Code.UNAUTHORIZED))


# What a batch id looks like, said where one is not: "no such batch" alone would leave
# the sender of an id in capitals to guess why.
BATCH_ID_FORM = "a batch's id is 32 lowercase hexadecimal digits, a UUID4's without hyphens"


def _no_batch(batch_id: str, hint: str = "") -> Response:
    if not is_service_id(batch_id):
        hint = f" ({BATCH_ID_FORM})"
    return error_response(Refusal(404, f"no such batch: {batch_id[:64]}{hint}", code=Code.UNKNOWN_BATCH))


def _rejection(index: int, error: Refusal) -> dict[str, Any]:
    return {"index": index, "filename": error.filename, "error": error.reason, "code": error.code,
            "status": error.status}


@bp.post("/jobs")
@require_api_key(_unauthorized)
def create_job() -> Response:
    svc = services()
    in_url = [name for name in BATCH_FORM_FIELDS if name in request.args]
    if in_url:
        # Read from the form only: ignored in the URL, they would put the files in a
        # new batch, where the client would never look for them.
        raise Refusal(400, f"send {', '.join(in_url)} as form fields, not in the URL",
                      code=Code.BAD_REQUEST)
    if "Idempotency-Key" in request.headers:
        # POST /'s: ignored here, the files sent again would be stored and classified
        # twice, in two batches.
        raise Refusal(400, "Idempotency-Key is for POST /; to send files again safely here, "
                           "name the batch (batch_id=<32 hex digits>&create=1) and give each "
                           "file a token", code=Code.BAD_REQUEST)
    files = form_files(request, JOBS_FIELDS)
    check_count(files, svc.settings)  # first: a form that is not multipart is read no further
    repeated = [name for name in ("batch_id", "create") if len(request.form.getlist(name)) > 1]
    if repeated:
        # Only the first would count: files meant for the second batch would go to the first.
        raise Refusal(400, f"one {repeated[0]} per request: this one has "
                           f"{len(request.form.getlist(repeated[0]))}", code=Code.BAD_REQUEST)
    tokens = form_tokens(request, files)
    form_batch_id = request.form.get("batch_id", "").strip()
    if tokens and not form_batch_id:
        # A token protects a resend within its batch: a client whose first answer is
        # lost never learns the new batch's id, and its resend would make a second.
        raise Refusal(400, "tokens protect a resend only within a named batch: send "
                           "batch_id=<32 hex digits>&create=1 with them", code=Code.BAD_REQUEST)
    batch_id = form_batch_id or new_id()
    # Kept in the book from the look for it until its files are added: let go between
    # them (a full book), it would be made again without the tokens of the files stored
    # in it, and a file sent again under one stored twice (ResultBook.in_use).
    with svc.book.in_use(batch_id):
        adding = _named_batch_exists(form_batch_id) if form_batch_id else False
        if adding is None:
            # A client making a batch of its own id sends `create` too: say so.
            return _no_batch(form_batch_id, hint=" (send create=1 to make it)")
        return _store_files(batch_id, adding, files, tokens)


def _named_batch_exists(form_batch_id: str) -> bool | None:
    """Whether the batch the form names exists (in memory, or stored in S3 by an earlier
    process); None if it does not and the form does not say `create`.

    Adding files to an existing batch lets a page sending many chunks follow one batch
    (and one event stream) rather than dozens. With `create`, the batch of that id is
    made if it does not exist yet: a client sending again a first request whose answer
    it lost must not make a second."""
    if not is_service_id(form_batch_id):
        # No batch has such an id: a 404 would tell the client to send create=1, which
        # is then refused for the id's form.
        raise Refusal(400, BATCH_ID_FORM, code=Code.BAD_REQUEST)
    if services().rebuilder.find_batch(form_batch_id) is not None:
        return True
    if request.form.get("create", "").lower() not in ("1", "true"):
        return None
    return False


def _store_files(batch_id: str, adding: bool, files: list[FileStorage], tokens: list[str] | None) -> Response:
    """Store and queue `files` in `batch_id` (`adding`: to a batch that existed before),
    a chunk at a time; the answer: 202 with the items stored and the files refused, or
    the refusals alone if none was stored."""
    svc = services()
    limit = svc.settings.max_upload_bytes
    items: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for start in range(0, len(files), FILES_PER_CHUNK):
        chunk = files[start:start + FILES_PER_CHUNK]
        # A chunk's bytes are held in memory from reading to stored: taken from the
        # process's budget first, all at once (web_tier/upload_memory.py).
        with svc.upload_memory.taken(sum(file_bytes(storage, limit) for storage in chunk)) as room:
            if svc.book.closing.is_set():
                # Told to stop (before or while this waited): gunicorn kills this process a
                # few seconds from now. Store no more (one killed between its S3 put and
                # its message would stay queued for ever), and answer now with what was
                # stored, the rest refused.
                rejected.extend(_refusals(files[start:], start, STOPPING))
                break
            if not room:
                # The rest too, at once: each chunk waiting its own turn in vain would hold a
                # 1,000-file request half an hour, to refuse it all.
                rejected.extend(_refusals(files[start:], start, UPLOAD_MEMORY_FULL))
                break
            stored, refused = _stored_and_refused(batch_id, chunk, start, tokens)
        for storage in chunk:  # read, stored or refused: their memory is the next chunks' now
            storage.close()
        items.extend(stored)
        rejected.extend(refused)
    rejected.sort(key=lambda r: r["index"])

    if items:
        # Where its results will be, as a 202 may say (RFC 9110).
        accepted = jsonify({"batch_id": batch_id, "items": items, "rejected": rejected})
        accepted.status_code = 202
        accepted.headers["Location"] = f"/api/jobs/{batch_id}"
        return accepted
    # Nothing was stored under a new batch's id: there is no such batch to name.
    return _all_refused_answer(batch_id if adding else None, rejected)


def _refusals(files: list[FileStorage], first_index: int, why: str) -> list[dict[str, Any]]:
    """A refusal for each of `files` (numbered from `first_index`), none stored: `why`, to send it again."""
    return [_rejection(index, Refusal(503, why, display_name(storage), code=Code.BUSY))
            for index, storage in enumerate(files, first_index)]


def _stored_and_refused(batch_id: str, files: list[FileStorage], first_index: int, tokens: list[str] | None
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Store and queue `files` (numbered from `first_index`) in `batch_id`: the items
    stored, and the refusals of the files that were not."""
    svc = services()
    items: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    accepted: list[tuple[int, Upload]] = []
    for index, storage in enumerate(files, first_index):
        try:
            accepted.append((index, validate(storage, svc.settings)))
        except Refusal as exc:
            rejected.append(_rejection(index, exc))
    outcomes = svc.submitter.submit(
        batch_id, [u for _, u in accepted], [tokens[i] for i, _ in accepted] if tokens else None,
    ) if accepted else []
    for (index, _), outcome in zip(accepted, outcomes, strict=True):
        if isinstance(outcome, Refusal):
            rejected.append(_rejection(index, outcome))
        elif isinstance(outcome, SentBefore):  # stored by an earlier request: not again
            items.append({"index": index, "id": outcome.item.id, "filename": outcome.item.filename,
                          "again": True})
        else:
            # `again` always: a client reading item["again"] must not fail on a new file.
            items.append({"index": index, "id": outcome.id, "filename": outcome.filename, "again": False})
    return items, rejected


def _all_refused_answer(batch_id: str | None, rejected: list[dict[str, Any]]) -> Response:
    """The answer when no file was stored: the first refusal's error and status, with
    every refusal listed (and `batch_id` unless None)."""
    first = rejected[0]
    body: dict[str, Any] = {"items": [], "rejected": rejected, "error": first["error"], "code": first["code"],
                            "filename": first["filename"]}
    if batch_id is not None:
        body = {"batch_id": batch_id, **body}
    response = jsonify(body)
    response.status_code = first["status"]
    return with_retry_after(response, first["code"])


@bp.get("/jobs/<batch_id>")
def get_job(batch_id: str) -> Response | tuple[Response, int]:
    items = services().rebuilder.find_batch(batch_id)
    if items is None:
        return _no_batch(batch_id)
    # Compact, as jsonify writes it: the body is written after this returns.
    dumps = partial(current_app.json.dumps, separators=(",", ":"))
    body = batch_json_slices(batch_id, items, bool(services().book.untrained), dumps)
    return Response(body, mimetype="application/json"), 200


@bp.get("/jobs/<batch_id>/results.csv")
def job_results_csv(batch_id: str) -> Response | tuple[Response, int]:
    svc = services()
    items = svc.rebuilder.find_batch(batch_id)
    if items is None:
        return _no_batch(batch_id)
    response = Response(results_csv_slices(items, bool(svc.book.untrained)), mimetype="text/csv")
    # (The id is the batch's: found, so only the hex digits this service hands out.)
    response.headers["Content-Disposition"] = f'attachment; filename="results-{batch_id}.csv"'
    return response


@bp.get("/jobs/<batch_id>/events")
def job_events(batch_id: str) -> Response | tuple[Response, int]:
    svc = services()
    if svc.rebuilder.find_batch(batch_id) is None:
        return _no_batch(batch_id)
    # Each stream holds a thread until its batch is done: past the cap, the page
    # falls back to polling GET /api/jobs/<id>, which holds none.
    if not svc.event_streams.acquire(blocking=False):
        busy = error_response(Refusal(503, "too many event streams open; poll GET /api/jobs/<id> instead",
                                      code=Code.BUSY))
        busy.headers["Retry-After"] = "10"
        return busy
    book = svc.book
    # `?after=<event id>`: a page opening a new stream once one has ended (`end`, more
    # files joining its batch) says what it has seen, as EventSource sends Last-Event-ID
    # only when it reconnects by itself: else each new stream would replay the whole
    # batch. Last-Event-ID, when sent, is the later of the two.
    last_event_id = request.headers.get("Last-Event-ID") or request.args.get("after")
    response = Response(
        # Through the rebuilder: a batch evicted from the book meanwhile would read as no
        # items, and the stream end at once, as if the batch were empty.
        events.stream(book, batch_id, lambda: svc.rebuilder.find_batch(batch_id),
                      last_event_id=last_event_id),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    # On close, which the server calls once whatever happened: a `finally` in the body
    # would not run for a body never started (HEAD), and each HEAD kept a slot for good.
    response.call_on_close(svc.event_streams.release)
    return response


@bp.post("/jobs/<batch_id>/items/<item_id>/again")
@require_api_key(_unauthorized)
def send_item_again(batch_id: str, item_id: str) -> Response | tuple[Response, int]:
    """Queue again, in place, an item a dead letter failed (Submitter.send_again): the
    same item, id and key, not a second item of its batch. Any other item is refused
    409, with the item as it is, and nothing changes."""
    svc = services()
    items = svc.rebuilder.find_batch(batch_id)
    if items is None:
        return _no_batch(batch_id)
    item = next((i for i in items if i.id == item_id), None)
    if item is None:
        return error_response(Refusal(404, f"no such item in batch {batch_id}: {item_id[:64]}",
                                      code=Code.UNKNOWN_ITEM))
    if svc.book.closing.is_set():
        # As an upload: a process about to be killed must not take the item off its failure.
        raise Refusal(503, "not sent again: the web tier is stopping; send it again", item.filename,
                      code=Code.BUSY)
    outcome = svc.submitter.send_again(item_id)
    model_untrained = bool(svc.book.untrained)
    if isinstance(outcome, Refusal) and outcome.code == Code.UNKNOWN_ITEM:
        return error_response(outcome)  # forgotten since (evicted): no item to show
    if isinstance(outcome, Refusal):
        # With the item as it is now, for a client to show (queued by another request, say),
        # and its name, as every refusal of a file says it.
        now = svc.book.get(item_id) or item
        outcome.filename = outcome.filename or now.filename
        return error_response(outcome, item=now.to_json(model_untrained))
    accepted = jsonify({"batch_id": batch_id, "item": outcome.to_json(model_untrained)})
    accepted.status_code = 202
    accepted.headers["Location"] = f"/api/jobs/{batch_id}"
    return accepted


@bp.get("/status")
def status() -> Response:
    return jsonify(services().status.read())
