"""A request body the answer did not need is read and dropped once the answer is sent.

An answer given before the body was read (a 413 for its size, a 401 for a wrong
key, a 404 or 405) says the connection stays open, but gunicorn drains only 64 KB
of an unread body itself and otherwise closes the connection: the client's next
request on it then fails (after a 413, 18 times in 30; after a 401 to a
300 KB upload, 5 times in 5). So the rest is read here, up to a bound in size and
time; a larger or slower body is left to gunicorn, which closes the connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Response, request

MAX_BYTES = 64 * 1024**2
# Set in the environ of a request whose body stopped arriving (web_tier/errors.py): there
# is nothing to wait for, and gunicorn closes the connection after the answer.
BODY_STOPPED = "imgclass.body_stopped"
TIMEOUT_S = 5.0
READ_TIMEOUT_S = 1.0  # one read from a client that stalls


def drop_after_answer(response: Response) -> Response:
    """An after_request hook: the body's remainder is dropped when the answer is closed."""
    environ = request.environ
    if environ.get(BODY_STOPPED):
        return response
    length = request.content_length
    chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
    if (length and length <= MAX_BYTES) or (chunked and length is None):
        response.call_on_close(lambda: _drop(environ))
    return response


def _drop(environ: dict) -> None:
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    deadline, dropped = time.monotonic() + TIMEOUT_S, 0
    try:
        with reads_bounded_by(environ, READ_TIMEOUT_S):
            # gunicorn's input ends with the body: an empty read once it is all read.
            while dropped < MAX_BYTES and time.monotonic() < deadline:
                chunk = stream.read(256 * 1024)
                if not chunk:
                    return
                dropped += len(chunk)
    except Exception:  # a client gone, too slow, or a body badly framed: gunicorn closes
        return


@contextmanager
def reads_bounded_by(environ: dict, timeout_s: float) -> Iterator[None]:
    """Under gunicorn the socket blocks for ever: bound each read from a slow client."""
    sock = environ.get("gunicorn.socket")
    timeout = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(timeout_s)
    try:
        yield
    finally:
        if sock is not None:
            sock.settimeout(timeout)
