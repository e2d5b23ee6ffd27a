"""systemd's notification protocol, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from common.systemd import notify, ping_watchdog, watchdog_interval_s


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def test_notify_sends_one_datagram_to_the_socket_systemd_names(listener):
    path, sock = listener
    assert notify("READY=1", {"NOTIFY_SOCKET": path})
    assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": path})
    assert [sock.recv(256), sock.recv(256)] == [b"READY=1", b"WATCHDOG=1"]


def test_notify_reaches_an_abstract_socket():
    name = f"imgclass-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(256) == b"READY=1"


@pytest.mark.parametrize("address", ["", "relative/path"])
def test_not_run_by_systemd_notify_does_nothing(address, caplog):
    assert notify("READY=1", {"NOTIFY_SOCKET": address} if address else {}) is False
    assert caplog.text == ""


def test_a_notification_that_cannot_be_sent_is_logged_not_raised(caplog):
    assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}) is False
    assert "could not tell systemd WATCHDOG=1" in caplog.text


def test_the_watchdog_is_pinged_at_half_its_timeout_and_only_when_asked():
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    # Meant for another process (systemd sets WATCHDOG_PID for the main one).
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    for usec in ("", "0", "-5", "soon"):
        assert watchdog_interval_s({"WATCHDOG_USEC": usec}) is None
    assert watchdog_interval_s({}) is None


def test_a_reader_that_lags_costs_a_notification_not_a_blocked_sender(listener, monkeypatch, caplog):
    """A datagram socket's queue is short (net.unix.max_dgram_qlen): once it is full, a
    plain send would block the worker's main loop for as long as the reader lags."""
    import threading

    import common.systemd

    monkeypatch.setattr(common.systemd, "SEND_TIMEOUT_S", 0.05)
    path, _never_read = listener
    results: list[bool] = []

    def keep_notifying() -> None:
        for _ in range(1000):
            results.append(notify("WATCHDOG=1", {"NOTIFY_SOCKET": path}))
            if not results[-1]:
                return

    sender = threading.Thread(target=keep_notifying, daemon=True)
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive(), "notify blocked on a full queue"
    assert results[0] and results[-1] is False
    assert "could not tell systemd WATCHDOG=1" in caplog.text


def test_a_ping_is_dropped_not_waited_for_when_the_reader_lags(listener, caplog):
    """make run reads its children's pings only while it supervises: while it starts or
    stops, a controller pinging at each AWS request waited 1 s a ping once the socket's
    queue was full (rounds 3 s apart, a stop 7 s), warning each time. READY=1 still waits."""
    import logging

    path, sock = listener
    sent = 0
    while ping_watchdog({"NOTIFY_SOCKET": path}):  # until the queue is full (Linux: 10)
        sent += 1
        assert sent < 10_000, "the socket's queue never filled"
    with caplog.at_level(logging.INFO, logger="common.systemd"):
        assert ping_watchdog({"NOTIFY_SOCKET": path}) is False
    assert caplog.text == ""  # not "timed out": nothing waited
    sock.recv(256)  # room for one
    assert ping_watchdog({"NOTIFY_SOCKET": path})
