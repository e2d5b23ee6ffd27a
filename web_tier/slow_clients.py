"""Clients that stop sending their requests, or reading their answers, do not keep
the web tier's threads.

gunicorn's threaded worker reads each request and writes each answer on a blocking
socket with no time limit, and its worker timeout does not cover those threads. A
client that sends half a request and goes quiet, or asks and never
reads (a full receive buffer, pipelined requests), would hold a thread for as long
as it kept its connection open: 100 such connections, with no API key needed,
leave /healthz unanswered. So each connection's socket gets a receive timeout
(SO_RCVTIMEO, set on the listening sockets, whose connections inherit it): a read
that gets nothing for WEB_RECEIVE_TIMEOUT fails; and each request's a send timeout
(SO_SNDTIMEO): a send that makes no progress for WEB_SEND_TIMEOUT fails. Either way
gunicorn closes the connection (logging "Socket error processing request", in one
line: OneLineForTimedOutClients); a body that stops arriving while the form is read
is answered 408 first (web_tier/errors.py). The timeouts are per read and per send:
a slow link that makes progress, or an event stream whose browser reads, is not cut;
nor is a client that trickles a byte a minute (a slow-loris), which a buffering proxy
in front must stop (README, Known limits). (gunicorn's sendfile() is off, in
gunicorn.conf.py: Python's sendfile waits for the socket without limit.) Under TLS
terminated by gunicorn these do nothing: Python's SSL socket takes a timed-out read
or send for "try again" and retries (README).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable

from flask import request

from web_tier.services import services


def limit_send_time() -> None:
    """Before each request: give its connection's socket the send timeout. Outside
    gunicorn (Flask's test client) there is no socket, and nothing to do."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(services().settings.send_timeout_s))
    except OSError:
        pass  # a connection closed meanwhile: its next send says so anyway


def limit_receive_time(listeners: Iterable[socket.socket], seconds: float) -> None:
    """Give every connection the listening sockets accept the receive timeout: set on
    them, Linux copies it to each connection (headers included, which no hook of
    gunicorn's sees before they are read whole)."""
    for listener in listeners:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class OneLineForTimedOutClients(logging.Filter):
    """gunicorn logs each connection a timeout ends as "Socket error processing request."
    with its traceback, ~25 lines at ERROR: anyone can open connections and go quiet,
    and fill the log so. Such a record becomes one line, at WARNING; others pass as
    they are. (A read or send the timeout ends fails with EAGAIN: BlockingIOError.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BlockingIOError) and str(record.msg).startswith("Socket error processing request"):
            record.msg = ("Socket error processing request: no progress for WEB_RECEIVE_TIMEOUT or "
                          "WEB_SEND_TIMEOUT; connection closed")
            record.args = ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
