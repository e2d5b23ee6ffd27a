"""The embedded AWS as a process: kept connections, long polls side by side, a quick stop."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from localaws.harness import free_port
from localaws.server import start_moto
from tests.integration.conftest import aws_client, wait_for

LONG_POLLS = 40  # more than a full local fleet and the web tier's listeners hold at once


@pytest.fixture
def moto(tmp_path) -> Iterator[tuple[int, psutil.Process]]:
    port = free_port()
    process = start_moto("127.0.0.1", port, tmp_path / "moto.log")
    try:
        yield port, psutil.Process(process.pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def client(service: str, port: int):
    return aws_client(service, f"http://127.0.0.1:{port}")


def test_connections_are_kept_between_requests(moto):
    port, _ = moto
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.connect()
    first_socket = conn.sock
    for _ in range(3):
        conn.request("GET", "/moto-api/data.json")
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 200
        assert (reply.getheader("Connection") or "").lower() != "close"
        assert conn.sock is first_socket, "the server closed the connection after a response"
    conn.close()


def test_long_polls_do_not_hold_up_other_calls(moto):
    port, _ = moto
    sqs = client("sqs", port)
    queue = sqs.create_queue(QueueName="long-polls")["QueueUrl"]
    idle = sqs.create_queue(QueueName="nothing-here")["QueueUrl"]
    answered = []

    def long_poll() -> None:
        own = client("sqs", port)
        own.receive_message(QueueUrl=idle, WaitTimeSeconds=5)
        answered.append(time.monotonic())

    threads = [threading.Thread(target=long_poll) for _ in range(LONG_POLLS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # let them all reach the server and wait there
    started = time.monotonic()
    sqs.send_message(QueueUrl=queue, MessageBody="hello")
    got = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)["Messages"]
    took = time.monotonic() - started
    assert [m["Body"] for m in got] == ["hello"]
    assert took < 2.0, f"a send and a receive took {took:.1f} s behind {LONG_POLLS} long polls"
    assert not answered, "a 5 s long poll on an empty queue came back early"
    for thread in threads:
        thread.join(15)
    assert len(answered) == LONG_POLLS


def test_sigterm_stops_every_server_process_quickly(moto):
    port, server = moto
    sqs = client("sqs", port)
    idle = sqs.create_queue(QueueName="stop-while-polling")["QueueUrl"]
    family = [server, *server.children(recursive=True)]
    assert family, "no server process"
    poller = threading.Thread(target=lambda: _quietly(sqs.receive_message, QueueUrl=idle, WaitTimeSeconds=20),
                              daemon=True)
    poller.start()
    time.sleep(0.3)
    sent = time.monotonic()
    os.killpg(server.pid, signal.SIGTERM)
    wait_for(lambda: not any(_alive(p) for p in family), timeout_s=5, what="the embedded AWS to stop")
    assert time.monotonic() - sent < 5


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _quietly(call, **kwargs) -> None:
    try:
        call(**kwargs)
    except Exception:  # the server going away mid-poll is what this test does
        pass
