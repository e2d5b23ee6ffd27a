"""The web tier: upload page, JSON API and the synchronous POST / endpoint.

Run it with `gunicorn -c web_tier/gunicorn.conf.py "web_tier:create_app()"`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from flask import Flask, Response

from common.aws import Aws
from common.config import Settings
from web_tier import api, classify, errors, health, pages
from web_tier.jobs import UPLOAD_THREADS
from web_tier.listeners import Listeners
from web_tier.results import ResultBook
from web_tier.services import EXTENSION, Services
from web_tier.uploads import FORM_SLACK_BYTES

log = logging.getLogger(__name__)

# Cap on one request body, whatever the per-file limits multiply to.
MAX_REQUEST_BYTES = 2 * 1024**3
# Connections per boto3 client: request threads, listeners and the upload pool share them.
AWS_POOL = 128


def create_app(settings: Settings | None = None, *, aws: Aws | None = None,
               start_listeners: bool = True) -> Flask:
    """Build the app; with `start_listeners` it also starts the SQS listener threads."""
    settings = settings or Settings.from_env()
    aws = aws or Aws(settings, max_pool=AWS_POOL)

    app = Flask(__name__)
    # The largest request /api/jobs takes; POST / lowers it for its one file.
    body_limit = settings.max_upload_bytes * max(1, settings.max_files_per_request)
    app.config.update(
        MAX_CONTENT_LENGTH=min(body_limit + FORM_SLACK_BYTES, MAX_REQUEST_BYTES),
        # Werkzeug refuses more parts than this; each file is one part.
        MAX_FORM_PARTS=settings.max_files_per_request + 100,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]

    # Until a worker's answer says which model it runs, the configured weights are
    # the best guess: with `random`, the page and /api/status say "untrained" from
    # the start rather than only after the first result.
    book = ResultBook(untrained=True if settings.model_weights == "random" else None)
    svc = Services(
        settings=settings,
        aws=aws,
        book=book,
        pool=ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="web-upload"),
    )
    if start_listeners:
        svc.listeners = Listeners(aws, book, wait_s=settings.receive_wait_s)
        svc.listeners.start()
        log.info("listening for results on %s", settings.response_queue)
    app.extensions[EXTENSION] = svc

    errors.register(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(classify.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.after_request(_security_headers)
    return app


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # The page loads only its own script and style: injected markup cannot run.
    response.headers.setdefault(
        "Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:; object-src 'none'"
    )
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response
