"""Clients that send their requests too slowly, or read their answers too slowly, do
not keep the web tier's threads.

gunicorn's threaded worker reads each request and writes each answer on a blocking
socket with no time limit, and its worker timeout does not cover those threads. A
client that sends half a request and goes quiet, trickles it a byte a minute (a
slow-loris), or asks and never reads (a full receive buffer, pipelined requests),
would hold a thread for as long as it kept its connection open: 100 such connections,
with no API key needed, leave /healthz unanswered. So:

- each connection's socket gets a receive timeout (SO_RCVTIMEO, set on the listening
  sockets, whose connections inherit it): a read that gets nothing for
  WEB_RECEIVE_TIMEOUT fails;
- each request's reads are limited in all (ReceiveLimits, LimitedReads): its request
  line and headers must be in within WEB_RECEIVE_TIMEOUT, and its body, once its first
  WEB_RECEIVE_TIMEOUT is over, must average WEB_MIN_RECEIVE_RATE bytes a second. Only
  the time the reads wait for the client counts: not the app's between its reads, nor
  a connection kept alive between requests, which waits in gthread's poller (for
  gunicorn's keepalive) and holds no thread. A connection's requests share the time
  for headers (else one byte sent within each keep-alive would hold a thread for good);
  each body has its own. gunicorn reads the headers before any of the app's code runs: the web tier's
  worker (gunicorn.conf.py, WebWorker) tells ReceiveLimits when a thread takes a
  connection to read its next request, and when that request's headers are read, and
  the parser's socket is wrapped so that each read waits (poll) no longer than the
  request has left. A request cut so is logged in one line; its connection is closed,
  with a 408 first if it was in its body. Why the floor is 2 KiB/s: common/config.py;
- each request's connection gets a send timeout (SO_SNDTIMEO): a send that makes no
  progress for WEB_SEND_TIMEOUT fails.

A read or send the socket's own timeout ends closes the connection (gunicorn logs
"Socket error processing request", in one line: OneLineForTimedOutClients); a body
that stops arriving while the form is read is answered 408 first
(web_tier/errors.py). A slow link that keeps to the floor, or an event stream whose
browser reads, is not cut.

What is still not stopped: the limits are per connection, so a client that opens a
new trickling connection as each is cut (1,024 a minute, at the default 60 s) still
holds every thread; a body sent at the floor holds its thread for as long as it lasts
at that rate (POST /'s 11 MB: an hour and a half; a large /api/jobs far longer), so
about 1,024 of them, 2 MiB/s in all, hold every thread too; and sends have a per-send
timeout only, so a client reading its answer a little at a time holds its thread
while the answer lasts. A buffering proxy in front stops these (README, Known
limits). (gunicorn's sendfile() is off, in gunicorn.conf.py: Python's sendfile waits
for the socket without limit.) Under TLS terminated by gunicorn none of this holds:
Python's SSL socket takes a timed-out read or send for "try again" and retries, and
a read waits for a whole TLS record, which polling the socket cannot bound (README).
"""

from __future__ import annotations

import errno
import logging
import math
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import request
from gunicorn.http.unreader import SocketUnreader

from web_tier.services import services

if TYPE_CHECKING:  # gunicorn's own class, for the signatures only
    from gunicorn.workers.gthread import TConn

log = logging.getLogger(__name__)


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
    they are. (A read or send the timeout ends fails with EAGAIN: BlockingIOError.) A
    connection a ReceiveBudget ends (ClientTooSlow) has had its line already, from
    LimitedReads: gunicorn's is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not str(record.msg).startswith("Socket error processing request"):
            return True
        if isinstance(exc, ClientTooSlow):
            return False
        if isinstance(exc, BlockingIOError):
            record.msg = ("Socket error processing request: no progress for WEB_RECEIVE_TIMEOUT or "
                          "WEB_SEND_TIMEOUT; connection closed")
            record.args = ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ClientTooSlow(TimeoutError):
    """A read refused: the request took longer to arrive than its ReceiveBudget allows.
    A TimeoutError, as a read the socket's own timeout ends: Werkzeug answers it as a
    body that stopped (408), and gunicorn's drain of an unread body gives up on it."""


@dataclass
class ReceiveBudget:
    """How long one connection's requests may keep its reads waiting. Their headers:
    `deadline_s` in all, over every request the connection carries (kept alive, each
    request's headers given the whole deadline anew, a client sending a byte within
    each keep-alive and the rest of its headers 59 s later held a thread for good).
    A body: the first `deadline_s`, and then as long as it keeps to `min_rate` bytes a
    second (0: no floor), each byte earning 1/min_rate s of waiting, but never more
    than `deadline_s` in hand: earned without a cap, the first 2 GB of a body sent
    fast bought twelve days of a byte every 50 s, its spooled files held all that time
    (three such connections filled the spool). Only the time spent waiting for the
    client counts, not the app's own between reads: an upload the app reads late has
    its bytes waiting in the socket, which no clock should hold against it. A browser's
    kept-alive connection, whose headers come whole, waits microseconds for each
    request's."""

    deadline_s: float
    min_rate: int
    in_body: bool = False
    headers_waited_s: float = 0.0  # over all of the connection's requests
    waited_s: float = 0.0  # in this request's body
    received: int = 0
    body_left_s: float = 0.0  # the waiting this body has in hand
    cut: bool = False

    def headers_begin(self) -> None:
        """A new request: the next bytes are its headers, in what is left of the
        connection's time for headers."""
        self.in_body, self.waited_s, self.received, self.cut = False, 0.0, 0, False

    def body_begins(self) -> None:
        """The request's headers are read: the next bytes are its body."""
        self.in_body, self.waited_s, self.received, self.cut = True, 0.0, 0, False
        self.body_left_s = self.deadline_s

    def spent(self, seconds: float, received: int) -> None:
        """A read waited `seconds` for the client, and got `received` bytes."""
        if self.in_body:
            self.waited_s += seconds
            self.received += received
            if self.min_rate > 0:
                self.body_left_s = min(self.deadline_s, self.body_left_s - seconds + received / self.min_rate)
        else:
            self.headers_waited_s += seconds

    def left_s(self) -> float:
        """Seconds the next reads may still wait in all; at or below 0: none."""
        if not self.in_body:
            return self.deadline_s - self.headers_waited_s
        if self.min_rate <= 0:
            return math.inf
        return self.body_left_s

    def why(self) -> str:
        """What this request failed to keep to, for the log."""
        if not self.in_body:
            return (f"its headers were not all in within WEB_RECEIVE_TIMEOUT ({self.deadline_s:g} s), "
                    "which a connection's requests share")
        return (f"its body came slower than WEB_MIN_RECEIVE_RATE ({self.min_rate} bytes/s) after the "
                f"first WEB_RECEIVE_TIMEOUT ({self.deadline_s:g} s), or stopped for that long: "
                f"{self.received} bytes in {self.waited_s:.1f} s")


def _readable_within(sock: socket.socket, seconds: float) -> bool:
    """Whether `sock` has something to read (bytes, an end, an error) within `seconds`.
    poll, not select: a connection's descriptor may be past select's 1,024."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(math.ceil(max(0.0, seconds) * 1000)))


class LimitedReads:
    """A connection's socket as gunicorn's request parser reads it: a read waits no longer
    than the request's budget leaves, and fails with ClientTooSlow once it is spent,
    logging one line for the connection then. All else is the socket's own."""

    def __init__(self, sock: socket.socket, budget: ReceiveBudget, peer: object,
                 silence_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._sock, self._budget, self._peer = sock, budget, peer
        self._silence_s, self._clock = silence_s, clock

    def recv(self, size: int, flags: int = 0) -> bytes:
        left = self._budget.left_s()
        began = self._clock()
        got = b""
        try:
            if left <= 0 or (self._budget_first(left) and not _readable_within(self._sock, left)):
                raise self._too_slow()
            got = self._sock.recv(size, flags)
            return got
        finally:
            self._budget.spent(self._clock() - began, len(got))

    def _budget_first(self, left: float) -> bool:
        """Whether the budget would end this read before the socket's own limit on one
        read does (SO_RCVTIMEO, or a timeout the app set for a short read). A body's
        first WEB_RECEIVE_TIMEOUT is left to the socket: a silence then is said for what
        it is ("stopped arriving", not "too slow")."""
        timeout = self._sock.gettimeout()
        own = self._silence_s if timeout is None else timeout
        return left < own or (not self._budget.in_body and left <= own)

    def _too_slow(self) -> ClientTooSlow:
        budget = self._budget
        if not budget.cut:
            budget.cut = True
            log.warning("request from %s cut, connection closed: %s", _address(self._peer), budget.why())
        return ClientTooSlow(errno.ETIMEDOUT, budget.why())

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "a Unix socket"


# Where a connection's budget is kept, on gunicorn's TConn.
_BUDGET = "imgclass_receive_budget"


class ReceiveLimits:
    """Each request's reads, limited by a ReceiveBudget (see the module's docstring).
    Told by the web tier's gunicorn worker (gunicorn.conf.py, WebWorker) when a thread
    takes a connection to read a request, and when that request's headers are read."""

    def __init__(self, receive_timeout_s: float, min_rate: int) -> None:
        self.receive_timeout_s, self.min_rate = receive_timeout_s, min_rate

    def headers_begin(self, conn: TConn) -> None:
        """A thread takes `conn` to read a request (its first, or the next one kept alive)."""
        budget = getattr(conn, _BUDGET, None)
        if budget is None:
            budget = ReceiveBudget(self.receive_timeout_s, self.min_rate)
            setattr(conn, _BUDGET, budget)
            self._limit_reads(conn, budget)
        budget.headers_begin()

    def body_begins(self, conn: TConn) -> None:
        """The request's headers on `conn` are read, and its body (if any) is next."""
        budget = getattr(conn, _BUDGET, None)
        if budget is not None:
            budget.body_begins()

    def _limit_reads(self, conn: TConn, budget: ReceiveBudget) -> None:
        # Under TLS terminated by gunicorn, a read waits for a whole TLS record, which
        # polling the socket cannot bound: the limits are not applied (README).
        if conn.cfg.is_ssl:
            return
        if conn.parser is not None:
            self._wrap(conn, budget)
            return

        # The parser is made in the thread, by conn.init(), just before it reads the
        # headers: its reads are wrapped as soon as it is there.
        def init_then_limit() -> None:
            type(conn).init(conn)
            if conn.parser is not None:
                del conn.init  # back to the class's own: gthread calls it before each request
                self._wrap(conn, budget)

        conn.init = init_then_limit

    def _wrap(self, conn: TConn, budget: ReceiveBudget) -> None:
        unreader = getattr(conn.parser, "unreader", None)  # none under HTTP/2: its own reads
        if isinstance(unreader, SocketUnreader) and not isinstance(unreader.sock, LimitedReads):
            unreader.sock = LimitedReads(unreader.sock, budget, conn.client, self.receive_timeout_s)
