"""A request must arrive in time however slowly it trickles (web_tier/slow_clients.py):
its headers within WEB_RECEIVE_TIMEOUT in all, its body at WEB_MIN_RECEIVE_RATE on
average once that long has passed."""

from __future__ import annotations

import errno
import itertools
import logging
import math
import socket
import sys
from collections.abc import Iterator

import pytest
from gunicorn.config import Config
from gunicorn.workers.gthread import TConn

from web_tier.slow_clients import (
    ClientTooSlow,
    LimitedReads,
    OneLineForTimedOutClients,
    ReceiveBudget,
    ReceiveLimits,
)

pytestmark = pytest.mark.timeout(60)


def test_headers_have_the_deadline_in_all_however_many_bytes_come():
    budget = ReceiveBudget(deadline_s=60, min_rate=2048)
    budget.headers_begin()
    assert budget.left_s() == 60
    budget.spent(59, 1)
    budget.spent(0.5, 100_000)  # bytes earn a request's headers no more time
    assert budget.left_s() == pytest.approx(0.5)
    budget.spent(0.5, 1)
    assert budget.left_s() <= 0
    assert "headers were not all in within WEB_RECEIVE_TIMEOUT (60 s)" in budget.why()


def test_a_body_has_the_deadline_as_grace_then_must_keep_to_the_rate():
    budget = ReceiveBudget(deadline_s=60, min_rate=2048)
    budget.body_begins()
    budget.spent(59, 0)  # silent for most of the grace: still in time
    assert budget.left_s() == pytest.approx(1)
    budget.spent(1, 2048 * 10)  # 10 s of the rate's worth: 10 s more
    assert budget.left_s() == pytest.approx(10)
    budget.spent(10.5, 0)
    assert budget.left_s() < 0
    assert "body came slower than WEB_MIN_RECEIVE_RATE (2048 bytes/s)" in budget.why()
    assert "20480 bytes in 70.5 s" in budget.why()


def test_a_body_sent_fast_then_trickled_is_cut_once_it_has_stopped_for_the_deadline():
    """Earlier bytes earn no more than the deadline in hand: 2 GB sent fast used to buy
    twelve days of a byte every 50 s, the request's spooled files held all that time."""
    budget = ReceiveBudget(deadline_s=60, min_rate=2048)
    budget.body_begins()
    budget.spent(10, 2 * 1024**3)
    assert budget.left_s() == 60
    budget.spent(50, 1)
    assert 0 < budget.left_s() < 11
    budget.spent(50, 1)
    assert budget.left_s() <= 0
    assert "or stopped for that long: 2147483650 bytes in 110.0 s" in budget.why()


def test_a_phone_on_a_poor_link_sends_a_10_mb_photo_whole():
    """GPRS sends 3-5 KB/s at best: at a steady 2.5 KB/s, with a first minute of
    nothing at all (a connection being set up), 10 MB takes over an hour, and is
    never cut."""
    budget = ReceiveBudget(deadline_s=60, min_rate=2048)
    budget.body_begins()
    budget.spent(60, 0)
    for _ in range(10 * 1024 * 1024 // 2560):
        budget.spent(1, 2560)
        assert budget.left_s() > 0
    assert budget.waited_s > 3600


def test_a_body_with_no_floor_is_never_out_of_time():
    budget = ReceiveBudget(deadline_s=60, min_rate=0)
    budget.body_begins()
    budget.spent(10_000, 1)
    assert budget.left_s() == math.inf


def test_a_connections_requests_share_the_headers_time_each_body_has_its_own():
    """Kept alive, a connection whose every request's headers had the whole deadline
    could hold a thread for good: a byte within each keep-alive, the rest 59 s later.
    Its requests' headers share the deadline; each body has its grace and rate anew."""
    budget = ReceiveBudget(deadline_s=60, min_rate=2048)
    budget.headers_begin()
    budget.spent(50, 500)
    budget.body_begins()
    assert budget.left_s() == 60
    budget.spent(100, 1)
    budget.cut = True
    budget.headers_begin()
    assert (budget.left_s(), budget.cut) == (10, False)
    budget.spent(10, 300)
    assert budget.left_s() <= 0
    budget.body_begins()
    assert budget.left_s() == 60


class Ticks:
    """A clock whose every reading is `step` seconds after the last: each read a
    LimitedReads makes seems to have waited that long, whatever the socket had."""

    def __init__(self, step: float) -> None:
        self._times: Iterator[float] = itertools.count(0.0, step)

    def __call__(self) -> float:
        return next(self._times)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_trickle_of_headers_is_cut_however_it_trickles(pair, caplog):
    """Every read gets a byte, none waits long; the headers' time still runs out. One
    line is logged for the connection, however many reads fail after it."""
    ours, theirs = pair
    theirs.sendall(b"x" * 100)
    budget = ReceiveBudget(deadline_s=5, min_rate=2048)
    reads = LimitedReads(ours, budget, ("203.0.113.9", 4242), silence_s=5, clock=Ticks(1))
    with caplog.at_level(logging.WARNING, logger="web_tier.slow_clients"):
        got = [reads.recv(1) for _ in range(5)]
        with pytest.raises(ClientTooSlow) as cut:
            reads.recv(1)
        with pytest.raises(ClientTooSlow):
            reads.recv(1)
    assert got == [b"x"] * 5
    assert isinstance(cut.value, TimeoutError) and cut.value.errno == errno.ETIMEDOUT
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["request from 203.0.113.9:4242 cut, connection closed: its headers were not all in "
                     "within WEB_RECEIVE_TIMEOUT (5 s), which a connection's requests share"]


def test_a_body_that_keeps_to_the_rate_is_read_whole_and_one_below_it_is_cut(pair):
    ours, theirs = pair
    theirs.sendall(b"x" * 200_000)
    budget = ReceiveBudget(deadline_s=5, min_rate=2048)
    budget.body_begins()
    reads = LimitedReads(ours, budget, ("203.0.113.9", 4242), silence_s=5, clock=Ticks(1))
    for _ in range(60):  # a minute at 2 KB/s
        assert len(reads.recv(2048)) == 2048
    # Then a byte a second: the lead it has (the grace's 5 s) is spent within 6 reads, the
    # 6th begun with a few ms left.
    trickled = 0
    with pytest.raises(ClientTooSlow):
        while trickled < 100:
            reads.recv(1)
            trickled += 1
    assert trickled == 6


def test_a_quiet_client_is_cut_once_the_headers_time_is_spent(pair):
    """With nothing to read the read waits no longer than the deadline leaves."""
    ours, theirs = pair
    theirs.sendall(b"GET / HTTP/1.1\r\n")
    budget = ReceiveBudget(deadline_s=0.2, min_rate=2048)
    reads = LimitedReads(ours, budget, ("203.0.113.9", 4242), silence_s=60)
    assert reads.recv(100) == b"GET / HTTP/1.1\r\n"
    with pytest.raises(ClientTooSlow):
        reads.recv(100)


def test_a_silent_body_is_left_to_the_sockets_own_timeout(pair):
    """In a body's first WEB_RECEIVE_TIMEOUT, a silence is ended by the socket's own
    timeout, which the app answers "stopped arriving", not by the budget ("too slow")."""
    ours, _theirs = pair
    ours.settimeout(0.2)  # standing for SO_RCVTIMEO, which a socketpair cannot show alike
    budget = ReceiveBudget(deadline_s=0.2, min_rate=2048)
    budget.body_begins()
    reads = LimitedReads(ours, budget, ("203.0.113.9", 4242), silence_s=0.2)
    with pytest.raises(TimeoutError) as ended:
        reads.recv(100)
    assert not isinstance(ended.value, ClientTooSlow)


def test_the_parser_of_a_new_connection_reads_through_the_limits(pair):
    """gthread makes a connection's parser in the thread, just before the headers are
    read: its reads are limited from the first, and wrapped once however often gthread
    calls init()."""
    ours, theirs = pair
    conn = TConn(Config(), ours, ("203.0.113.9", 4242), ("127.0.0.1", 8000))
    limits = ReceiveLimits(0.2, 2048)
    limits.headers_begin(conn)
    theirs.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")  # and no end of the headers
    conn.init()
    conn.init()
    reads = conn.parser.unreader.sock
    assert isinstance(reads, LimitedReads) and not isinstance(reads._sock, LimitedReads)
    with pytest.raises(ClientTooSlow):
        next(conn.parser)


def test_gunicorns_line_for_a_connection_cut_so_is_dropped_having_had_its_own():
    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except type(exc):
            info = sys.exc_info()
        return logging.LogRecord("gunicorn.error", logging.ERROR, __file__, 1,
                                 "Socket error processing request.", (), info)

    one_line = OneLineForTimedOutClients()
    assert one_line.filter(record(ClientTooSlow(errno.ETIMEDOUT, "too slow"))) is False
    quiet = record(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"))
    assert one_line.filter(quiet) is True
    assert quiet.levelno == logging.WARNING and quiet.exc_info is None


def test_a_connection_that_ended_is_closed_in_its_own_thread_not_gunicorns_main_one(pair, monkeypatch):
    """gunicorn closes an ended connection on its one main thread, lingering up to 2 s for
    the client to close too: a client cut for being slow that neither sends nor closes
    held up every other connection that long, each one. The web tier's worker closes it
    in the thread that served it, and the main thread's close does nothing more."""
    import runpy
    import threading
    from pathlib import Path

    from gunicorn import util
    from gunicorn.workers.gthread import ThreadWorker

    conf = runpy.run_path(str(Path(__file__).parents[2] / "web_tier" / "gunicorn.conf.py"))
    worker = object.__new__(conf["WebWorker"])
    worker.receive_limits = None
    ours, _theirs = pair  # the client's end neither sends nor closes
    conn = TConn(Config(), ours, ("203.0.113.9", 4242), ("127.0.0.1", 8000))
    monkeypatch.setattr(ThreadWorker, "handle", lambda self, conn: False)  # the request ended
    lingered = []
    graceful = util.close_graceful

    def close_graceful(sock, timeout=2.0, max_drain=65536):
        lingered.append(threading.get_ident())
        graceful(sock, timeout=0.1, max_drain=max_drain)

    monkeypatch.setattr(util, "close_graceful", close_graceful)
    assert worker.handle(conn) is False
    assert lingered == [threading.get_ident()] and ours.fileno() == -1
    conn.close(graceful=True)  # gunicorn's main thread, in finish_request
    assert lingered == [threading.get_ident()]


def test_a_fault_in_the_receive_limits_is_logged_and_the_request_still_served(pair, monkeypatch):
    """The hooks run outside gthread's own handling of a request: a fault there would
    end the connection without a word."""
    import runpy
    from pathlib import Path
    from unittest import mock

    from gunicorn.workers.gthread import ThreadWorker

    conf = runpy.run_path(str(Path(__file__).parents[2] / "web_tier" / "gunicorn.conf.py"))
    worker = object.__new__(conf["WebWorker"])
    worker.log = mock.Mock()
    worker.receive_limits = mock.Mock(**{"headers_begin.side_effect": RuntimeError("a bug")})
    ours, _theirs = pair
    conn = TConn(Config(), ours, ("203.0.113.9", 4242), ("127.0.0.1", 8000))
    served = []
    monkeypatch.setattr(ThreadWorker, "handle", lambda self, conn: served.append(conn) or True)
    assert worker.handle(conn) is True and served == [conn]
    (message, *_), _ = worker.log.exception.call_args
    assert message.startswith("could not limit the receive time")
