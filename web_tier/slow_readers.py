"""Clients that stop reading their answers do not keep the web tier's threads.

gunicorn's threaded worker writes each answer with a blocking send and no time
limit, and its worker timeout does not cover those threads. A client that asks and
never reads (a full receive buffer, pipelined requests) would hold a thread for as
long as it kept its connection open: 100 such connections, with no API key
needed, leave /healthz unanswered. So each request's socket gets a send timeout
(SO_SNDTIMEO): a send that makes no progress for WEB_SEND_TIMEOUT fails, and
gunicorn closes the connection (logging "Socket error processing request").
An event stream whose browser reads is not cut: the timeout is per send.
(gunicorn's sendfile() is off, in gunicorn.conf.py: Python's sendfile waits for the
socket without limit.) Under TLS terminated by gunicorn this does nothing: Python's
SSL socket takes the timed-out send for "try again" and retries (README).
"""

from __future__ import annotations

import socket
import struct

from flask import request

from web_tier.services import services


def limit_send_time() -> None:
    """Before each request: give its connection's socket the send timeout. Outside
    gunicorn (Flask's test client) there is no socket, and nothing to do."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return
    seconds = services().settings.send_timeout_s
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))
    except OSError:
        pass  # a connection closed meanwhile: its next send says so anyway
