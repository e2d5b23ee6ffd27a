"""Gunicorn settings for the web tier.

Run from the project root:
    .venv/bin/gunicorn -c web_tier/gunicorn.conf.py "web_tier:create_app()"
Access logs are off; turn them on with GUNICORN_CMD_ARGS="--access-logfile -".
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the hooks' signatures only
    from gunicorn.arbiter import Arbiter
    from gunicorn.http.message import Request
    from gunicorn.workers.base import Worker
    from gunicorn.workers.gthread import TConn

    from web_tier.slow_clients import ReceiveLimits

# Gunicorn reads this file before the app's directory is on sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import resource  # noqa: E402

from gunicorn.workers.gthread import ThreadWorker  # noqa: E402

from common.config import Settings  # noqa: E402

# Each connection is a file descriptor, and so are spooled uploads, boto3's pooled
# sockets and the listeners' long polls: gthread's accept() dies on EMFILE, and
# with it the process, its result book and every POST / waiting in it.
WANTED_OPEN_FILES = 4096
FILES_KEPT_FOR_OTHER_USES = 512
# The exit status for a setting that is wrong (as the controller's, argparse's usage error).
BAD_SETTING_EXIT = 2


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise this process's soft limit on open files towards `wanted` (as far as the
    hard limit allows: often 1,024 soft by default); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)  # >= soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def connection_limits(open_files: int) -> tuple[int, int]:
    """Connections admitted at once, and threads serving them, within `open_files`: a
    connection takes a descriptor, and a thread serving an upload one more, for the
    request's temporary file (web_tier/spool.py). Counted one each, 512 threads under a
    hard limit of 1,024 would run out, and accept() kill the process."""
    room = max(128, open_files - FILES_KEPT_FOR_OTHER_USES)
    threads = min(1024, room // 2)
    return min(2000, room - threads), threads


class WebWorker(ThreadWorker):
    """gunicorn's gthread worker, whose requests must arrive in time however slowly they
    trickle: it tells ReceiveLimits (web_tier/slow_clients.py) when a request's headers
    start to be read, and when its body does. Defined here, not in web_tier, which gunicorn's
    master process would then import whole, and keep across reloads."""

    receive_limits: ReceiveLimits | None = None  # set by post_worker_init

    def handle(self, conn: TConn) -> object:
        # A thread takes the connection to read a request (a new connection's first, or
        # the next on one kept alive): the request's headers are given their time now.
        self._tell_limits("headers_begin", conn)
        keep = super().handle(conn)
        if keep is False:
            close_in_this_thread(conn)
        return keep

    def handle_request(self, req: Request, conn: TConn) -> bool:
        # The request's headers are read: its body's time starts.
        self._tell_limits("body_begins", conn)
        return super().handle_request(req, conn)

    def _tell_limits(self, step: str, conn: TConn) -> None:
        if self.receive_limits is None:
            return
        try:
            getattr(self.receive_limits, step)(conn)
        except Exception:  # outside gthread's own handling: the connection would end unsaid
            self.log.exception("could not limit the receive time of %s's request (%s)", conn.client, step)


def close_in_this_thread(conn: TConn) -> None:
    """Close an ended connection in the thread that served it. gunicorn closes it on its
    one main thread, gracefully: it lingers up to 2 s for the client to close too, and a
    client that neither sends nor closes (one cut for sending too slowly, or gone quiet)
    held up every other connection's accept and keep-alive that long, each one: 20 cut at
    once kept a new connection waiting 39 s. The main thread's close is then a no-op."""
    try:
        conn.close(graceful=True)
    except OSError:
        pass  # closed by the client meanwhile: nothing to linger for
    conn.close = lambda graceful=False: None


try:
    _settings = Settings.from_env()
except ValueError as exc:  # names the variable
    # One line, and a status the web unit does not restart on (RestartPreventExitStatus):
    # a wrong setting would only fail again, with a traceback a second, for ever.
    print(f"web tier: {exc}", file=sys.stderr)
    raise SystemExit(BAD_SETTING_EXIT) from None

bind = _settings.web_address

# One process: the response listeners and the in-memory result book live in
# it, and a POST / must wait in the same process that receives its answer.
# More processes would split the book. So would more web-tier instances, which
# would also share one response queue: a known limit (see the README).
workers = 1
# gthread, limiting how long each request may take to arrive (WebWorker).
worker_class = WebWorker
# Threads, not processes: POST / holds its thread while the image is classified, and
# a waiting thread costs no CPU (gthread starts them as needed). With 256, 320 waiting
# POST / left /healthz waiting up to 9.4 s for a thread (2.1 s with 1024). Both numbers
# fit the open files the process may have (connection_limits): EMFILE on accept() kills
# the worker process. Requests beyond the threads queue (up to worker_connections)
# rather than being refused.
worker_connections, threads = connection_limits(raise_open_files_limit())
# The app starts listener threads, which do not survive a fork: build it in the worker.
preload_app = False

# gthread heartbeats from the main thread, so a request may wait longer than this.
timeout = 60
# Static files are written with send() like every other answer, not sendfile(): Python
# waits without limit for a socket sendfile() cannot write to, past the send timeout
# that frees a thread from a client that reads nothing (web_tier/slow_clients.py).
# They are two small files.
sendfile = False
graceful_timeout = 5
keepalive = 5

# Gunicorn >= 25.1 opens a control socket at one path per user, which every
# stack on the machine (tests, make run, the embedded AWS) would fight over.
# Older versions ignore the name.
control_socket_disable = True

accesslog = None
errorlog = "-"
loglevel = "info"


def wrongly_served(workers: int, worker_class: type, preload: bool) -> str | None:
    """Why gunicorn's options, as given, would break the web tier; None if they would not.
    GUNICORN_CMD_ARGS and the command line override this file (the README suggests the
    first for gunicorn's own options), and these three are not options to change: with
    `-w 4`, an answer taken by one process's listener would be lost to a POST / waiting
    in another, which answers 504."""
    if workers != 1:
        return (f"gunicorn must run 1 worker process, not {workers}: the result book and its POST / "
                "waits live in one process (GUNICORN_CMD_ARGS or the command line set -w/--workers)")
    if not issubclass(worker_class, ThreadWorker):
        return (f"gunicorn's worker class must be gthread, not {worker_class.__name__}: each POST / "
                "and event stream holds a thread while it waits (-k/--worker-class)")
    if not issubclass(worker_class, WebWorker):
        return (f"gunicorn's worker class must be gunicorn.conf.py's WebWorker, not {worker_class.__name__}: "
                "it ends requests that arrive too slowly, which would otherwise hold its threads "
                "(-k/--worker-class)")
    if preload:
        return ("gunicorn must not preload the app (--preload): its listener threads would be "
                "started before the fork, and not run in the worker")
    return None


def on_starting(server: Arbiter) -> None:
    """Refuse wrong options in one line, with the status a wrong setting has, before any
    socket or process is started."""
    cfg = server.cfg
    wrong = wrongly_served(cfg.workers, cfg.worker_class, cfg.preload_app)
    if wrong:
        print(f"web tier: {wrong}", file=sys.stderr)
        raise SystemExit(BAD_SETTING_EXIT)


def nworkers_changed(server: Arbiter, new_value: int, old_value: int | None) -> None:
    """SIGTTIN, gunicorn's signal for one more worker process, must not split the web
    tier as -w would (wrongly_served): a second process's listener took a third of the
    answers, and the POST / waiting for each in the first answered 504 after
    RESULT_TIMEOUT. The count goes back to 1, and the log says why."""
    if old_value is not None and new_value > 1:  # not the count set at start: on_starting refuses it
        server.log.error("web tier: SIGTTIN ignored: gunicorn must run 1 worker process, not %d: the "
                         "result book and its POST / waits live in one process", new_value)
        server._num_workers = 1  # not through the property, which would call this again


def post_fork(server: Arbiter, worker: Worker) -> None:
    """Send the app's own loggers to stderr, before the worker builds the app."""
    from common.logs import configure as configure_logging

    configure_logging("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")


def worker_exit(server: Arbiter, worker: Worker) -> None:
    """In the worker process, once it has stopped serving, whatever stopped it: let the
    listeners end their polls, handing back what those receive, before the process ends
    (see the listeners' MAX_WAIT_S). Each poll ends within MAX_WAIT_S of the signal, so
    this is within the graceful_timeout after which gunicorn kills, unless requests took
    most of it."""
    from web_tier.listeners import MAX_WAIT_S
    from web_tier.services import EXTENSION

    app = getattr(worker, "wsgi", None)  # not there if the app failed to load
    svc = app.extensions.get(EXTENSION) if app is not None and hasattr(app, "extensions") else None
    if svc is not None and svc.listeners is not None:
        svc.listeners.stop(timeout=MAX_WAIT_S + 0.5)


def post_worker_init(worker: Worker) -> None:
    """The app is built: keep its start-up heap out of later garbage collections,
    and answer the waiting requests when told to stop."""
    import signal

    from common.heap import freeze_startup_heap
    from common.signals import on_signals
    from web_tier.services import EXTENSION
    from web_tier.slow_clients import OneLineForTimedOutClients, ReceiveLimits, limit_receive_time

    svc = worker.wsgi.extensions[EXTENSION]
    from web_tier.auth import open_to_anyone

    warning = open_to_anyone(svc.settings.web_host_bare, svc.settings.api_key)
    if warning:
        worker.log.warning("web tier: %s", warning)
    svc.aws.open("s3", "s3_upload", "sqs", "sqs_receive", "sqs_send")
    svc.aws.probes  # noqa: B018  (made now, not at the first health check)
    limit_receive_time(worker.sockets, svc.settings.receive_timeout_s)
    worker.receive_limits = ReceiveLimits(svc.settings.receive_timeout_s, svc.settings.min_receive_rate)
    worker.log.error_log.addFilter(OneLineForTimedOutClients())

    # On SIGTERM gunicorn stops accepting and gives requests `graceful_timeout` to
    # end; a POST / waiting for its answer, or for room to hold its upload, or an event
    # stream, would be cut off then with no answer at all. Closing the services answers
    # them at once (503 saying where the result will be, or to send the file again;
    # streams end and browsers reconnect), and stops the listeners, leaving the queues'
    # answers to the process that serves on (a reload's new one). Gunicorn's own
    # handler still runs. (Off the handler, as closing takes the book's lock.)
    on_signals(lambda _signum: svc.close(), (signal.SIGTERM,), then_previous=True)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn had it
    freeze_startup_heap()
