"""The web tier: upload page, JSON API and the synchronous POST / endpoint.

Run it with `gunicorn -c web_tier/gunicorn.conf.py "web_tier:create_app()"`.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flask import Flask, Response, request

from common.aws import Aws
from common.config import Settings
from web_tier import api, auth, classify, errors, health, pages, slow_clients, unread_body
from web_tier.errors import ANSWERS_PATH, is_api_path
from web_tier.form import MAX_TEXT_FIELD_BYTES, form_text_budget, jobs_body_limit
from web_tier.journal import Journal
from web_tier.listeners import Listeners
from web_tier.results import ResultBook
from web_tier.services import EXTENSION, Services, services
from web_tier.submit import UPLOAD_THREADS
from web_tier.upload_request import UploadRequest

log = logging.getLogger(__name__)

# Connections per boto3 client: request threads, listeners and the upload pool share them.
AWS_POOL = 128
# How often the web tier looks for uploads stored with no request (web_tier/journal.py).
REQUEUE_EVERY_S = 60.0


def create_app(settings: Settings | None = None, *, aws: Aws | None = None,
               start_background: bool = True) -> Flask:
    """Build the app; with `start_background` it also starts the threads that work
    beside requests: the SQS listeners, and the requeue of uploads stored with no
    request sent (web_tier/journal.py)."""
    settings = settings or Settings.from_env()
    aws = aws or Aws(settings, max_pool=AWS_POOL, requests_wait=True)

    app = Flask(__name__)
    # A path with a doubled slash is not found, in JSON under /api, rather than redirected
    # with Werkzeug's HTML to one that may not exist either (/api/jobs//results.csv).
    app.url_map.merge_slashes = False
    app.config.update(
        # The largest request /api/jobs takes; POST / lowers it for its one file.
        MAX_CONTENT_LENGTH=jobs_body_limit(settings),
        # Werkzeug refuses more parts than this: each file is one part, and its token
        # (POST /api/jobs `tokens`) another; room besides for the other fields.
        MAX_FORM_PARTS=2 * settings.max_files_per_request + 100,
        MAX_FORM_MEMORY_SIZE=MAX_TEXT_FIELD_BYTES,
        MAX_FORM_TEXT_BYTES=form_text_budget(settings),  # all text fields together
        MAX_FILE_BYTES=settings.max_upload_bytes,  # spooled per file (spool.CappedSpool)
    )
    app.request_class = UploadRequest
    app.json.sort_keys = False  # type: ignore[attr-defined]

    # Until a worker's answer says which model it runs, the configured weights are
    # the best guess: with `random`, the page and /api/status say "untrained" from
    # the start rather than only after the first result.
    book = ResultBook(untrained=True if settings.untrained else None)
    svc = Services(
        settings=settings,
        aws=aws,
        book=book,
        pool=ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="web-upload"),
        journal=_open_journal(settings.web_journal_dir),
    )
    if start_background:
        svc.listeners = Listeners(aws, book, wait_s=settings.receive_wait_s)
        svc.listeners.start()
        log.info("listening for results on %s", settings.response_queue)
        # In the background: S3 and SQS may be slow to answer, and the page must not wait.
        threading.Thread(target=_requeue_unsent, args=(svc,), name="requeue-unsent", daemon=True).start()
    app.extensions[EXTENSION] = svc

    errors.register(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(classify.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.before_request(slow_clients.limit_send_time)
    app.before_request(auth.refuse_cross_site_writes)
    app.after_request(_security_headers)
    app.after_request(_scripts_as_javascript)
    app.after_request(_untrained_header)
    app.after_request(unread_body.drop_after_answer)
    return app


def _open_journal(directory: str) -> Journal | None:
    if not directory:
        return None
    try:
        return Journal(Path(directory))
    except OSError as exc:
        log.error("no journal in %s (%s): an upload stored when this process is killed, and not yet "
                  "queued, will stay queued for ever; set WEB_JOURNAL_DIR to a directory it can write",
                  directory, exc)
        return None


def _requeue_unsent(svc: Services) -> None:
    """Queue what killed web tiers stored and never sent, at start and then every
    REQUEUE_EVERY_S: one that dies while this process runs (the old worker of a
    gunicorn reload), or an AWS that does not answer at start, is caught up with."""
    while True:
        try:
            queued = svc.submitter.requeue_unsent()
        except Exception:
            log.exception("could not requeue uploads stored with no request")
        else:
            if queued:
                log.warning("queued %d uploads stored with no request sent (a web tier killed, "
                            "or a request refused whose image could not be deleted)", queued)
        if svc.stopped.wait(REQUEUE_EVERY_S):
            return


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # Every /api answer, its 404s and 405s too (README). Answers change from one second
    # to the next. And a browser holds a second GET of a URL behind one still in flight,
    # for up to 20 s, to share a cached answer: a page polling /api/status while AWS is
    # slow would show old figures that long. POST /'s answers and the answer pages too:
    # a file's name and label (or a 202 "still queued" page that a cache would serve
    # after the label came), private to who sent it, and of the moment.
    answers = (request.path + "/").startswith(ANSWERS_PATH)  # /answers too (classify.answer)
    if is_api_path(request.path) or request.method == "POST" or answers:
        response.headers.setdefault("Cache-Control", "no-store")
    # The page loads only its own script and style: injected markup cannot run.
    response.headers.setdefault(
        "Content-Security-Policy",
        # Framed by another site, the page (and its API key box) could be clicked under cover.
        # (base-uri and form-action: default-src does not cover them.)
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'",
    )
    # Nothing to other sites. same-origin, not no-referrer: under no-referrer Chromium
    # sends "Origin: null" with a form's POST to its own site, which a web tier reached
    # over plain HTTP by name or LAN address (no Sec-Fetch-Site) must take for
    # cross-site, refusing the no-JavaScript form 403 there.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def _scripts_as_javascript(response: Response) -> Response:
    """The page's scripts are ES modules, which browsers refuse to run unless served with
    a JavaScript type (nosniff aside). Flask takes a file's type from the system's table
    (mimetypes), which some systems get wrong for .js (text/plain on Windows, from its
    registry): said here, the page does not depend on the machine it runs on."""
    if request.path.startswith("/static/") and request.path.endswith(".js") and response.status_code == 200:
        response.mimetype = "text/javascript"
    return response


def _untrained_header(response: Response) -> Response:
    """While the workers' model is untrained, every answer says so (README), refusals
    and timeouts too, not only those that carry a label (which set it themselves)."""
    if "X-Model-Untrained" not in response.headers and services().book.untrained:
        response.headers["X-Model-Untrained"] = "true"
    return response
