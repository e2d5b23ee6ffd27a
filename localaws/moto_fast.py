"""moto's server without the costs that grow with traffic and queue depth.

`python -m localaws.moto_fast -H host -p port` is `python -m moto.server`
after the patches below. Each keeps moto's behaviour exactly (see
tests/unit/test_moto_fast.py); each removes a cost found by profiling the
server under the service's own calls (`make bench`, part h, and yappi):

1. `unix_time()` built two datetimes per call and subtracted them (~10 us);
   SQS calls it twice per queued message whenever it counts messages.
   Without an argument it is simply `time.time()`.
2. ReceiveMessage checked each returned message's retention period by
   computing *all* the queue's attributes (three O(depth) counts). The
   retention period is a plain attribute of the queue: read it directly.
3. Counting visible, in-flight and delayed messages (GetQueueAttributes, and
   SendMessage, which builds all attributes to read one FIFO setting) read
   the clock once per message through two properties: read it once per count.
4. Every request looked up its service by listing moto's package directory
   (~175 `isdir` calls per request, ~28 % of the server's CPU): list it once.
5. `camelcase_to_underscores`, a pure function of a handful of strings, ran
   character by character thousands of times a second: memoise it.
6. DescribeInstances cost ~50 ms of server CPU with 15 instances (moto's
   generic serializer walks the whole Instance shape), and the runner, the
   controller and the benchmark each ask every second: measured by the action
   statistics below, it was 73 % of the server's CPU during `make bench`.
   Its responses are kept until the next EC2 call that is not a Describe
   (every change to instances comes through one) or the next moto-api call
   (a reset): the same answers, computed once per change.

Measured on this machine (2 cores) with 300 x (S3 PutObject + SQS
SendMessage): see the commit that introduced each patch, and `make bench`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

# When set, the server writes its CPU time per API action to this JSON file
# every STATS_EVERY_S seconds (`make bench` reads it).
STATS_ENV = "IMGCLASS_MOTO_STATS"
STATS_EVERY_S = 1.0


def apply() -> None:
    from moto import backends
    from moto.core import responses, utils
    from moto.sqs import models

    original_unix_time = utils.unix_time

    def unix_time(dt: datetime | None = None) -> float:
        return time.time() if dt is None else original_unix_time(dt)

    def unix_time_millis(dt: datetime | None = None) -> float:
        return unix_time(dt) * 1000.0

    # sqs.models imported both names into its own namespace: patch them there.
    models.unix_time = unix_time
    models.unix_time_millis = unix_time_millis

    def is_message_valid_based_on_retention_period(self, queue_name: str, message) -> bool:
        queue = self.get_queue(queue_name)
        return queue.message_retention_period + message.sent_timestamp / 1000 > unix_time()

    models.SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period

    # Message.visible is `now > visible_at`, Message.delayed is `now < delayed_until`.
    def count_delayed(self) -> int:
        now = unix_time_millis()
        return sum(1 for m in self._messages if now < m.delayed_until)

    def count_not_visible(self) -> int:
        now = unix_time_millis()
        return sum(1 for m in self._messages if not now > m.visible_at)

    def visible_messages(self) -> list:
        now = unix_time_millis()
        return [m for m in self._messages if now > m.visible_at and not now < m.delayed_until]

    models.Queue.approximate_number_of_messages_delayed = property(count_delayed)
    models.Queue.approximate_number_of_messages_not_visible = property(count_not_visible)
    models.Queue.messages = property(visible_messages)

    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules

    fast_camel = functools.lru_cache(maxsize=4096)(utils.camelcase_to_underscores)
    for module in (utils, responses, models):
        module.camelcase_to_underscores = fast_camel


def aws_action(environ: dict[str, Any]) -> str:
    """The AWS action a request asks for, e.g. "SendMessage", "RunInstances", "S3 PUT object"."""
    target = environ.get("HTTP_X_AMZ_TARGET")  # SQS's JSON protocol
    if target:
        return target.rsplit(".", 1)[-1]
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/moto-api"):
        return "moto-api"
    if is_query_protocol(environ):
        # EC2's query protocol: Action=... in the form body; put the body back.
        for pair in request_body(environ).split(b"&"):
            if pair.startswith(b"Action="):
                return pair[7:].decode("ascii", "replace")
    kind = "object" if path.strip("/").count("/") else "bucket"
    return f"S3 {environ.get('REQUEST_METHOD')} {kind}"


def is_query_protocol(environ: dict[str, Any]) -> bool:
    """EC2's protocol (SQS's is JSON, with a target header; S3's is REST)."""
    return (environ.get("REQUEST_METHOD") == "POST" and environ.get("PATH_INFO", "/") == "/"
            and not environ.get("HTTP_X_AMZ_TARGET"))


def read_all(result: Iterable[bytes]) -> bytes:
    """A WSGI response's body, closing it as WSGI requires."""
    try:
        return b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def request_body(environ: dict[str, Any]) -> bytes:
    """Read the body once and leave it in place for the application."""
    cached = environ.get("imgclass.body")
    if cached is None:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        cached = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(cached)
        environ["imgclass.body"] = cached
    return cached


class Ec2ReadCache:
    """WSGI middleware: DescribeInstances answered from the last identical one until EC2 changes."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.generation = 0
        self.answers: dict[bytes, tuple[str, list, bytes]] = {}
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        action = aws_action(environ)
        if action != "DescribeInstances":
            if action == "moto-api" or (is_query_protocol(environ) and not action.startswith("Describe")):
                # A change to EC2 (or a reset): forget every answer once it is done, so that
                # a Describe that ran while it was half done cannot be kept.
                self._forget()
                try:
                    return [read_all(self.app(environ, start_response))]
                finally:
                    self._forget()
            return self.app(environ, start_response)
        key = request_body(environ)
        with self.lock:
            generation, hit = self.generation, self.answers.get(key)
        if hit is not None:
            status, headers, body = hit
            start_response(status, headers)
            return [body]
        captured: list = []

        def capture(status: str, headers: list, exc_info: Any = None) -> Callable:
            captured[:] = [status, headers]
            return start_response(status, headers, exc_info)

        body = read_all(self.app(environ, capture))
        if captured and captured[0].startswith("200"):
            with self.lock:
                if self.generation == generation:
                    self.answers[key] = (captured[0], captured[1], body)
        return [body]

    def _forget(self) -> None:
        with self.lock:
            self.generation += 1
            self.answers.clear()


class ActionStats:
    """WSGI middleware: requests and server CPU seconds per AWS action, written to a file.

    CPU is the handling thread's own CPU time (`time.thread_time`), so time
    spent waiting for the GIL or for a long-poll is not counted.
    """

    def __init__(self, app: Callable, path: Path) -> None:
        self.app = app
        self.path = path
        self.totals: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._write_loop, name="moto-stats", daemon=True).start()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        started = time.thread_time()
        action = aws_action(environ)
        body = read_all(self.app(environ, start_response))
        spent = time.thread_time() - started
        with self.lock:
            entry = self.totals.setdefault(action, [0, 0.0])
            entry[0] += 1
            entry[1] += spent
        return [body]

    def _write_loop(self) -> None:
        while True:
            time.sleep(STATS_EVERY_S)
            with self.lock:
                snapshot = {action: {"requests": int(n), "cpu_s": round(cpu, 4)}
                            for action, (n, cpu) in self.totals.items()}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot, indent=1, sort_keys=True))
            tmp.replace(self.path)


def main(argv: list[str] | None = None) -> None:
    apply()
    from moto import server

    run_simple = server.run_simple
    stats_path = os.environ.get(STATS_ENV)

    def run_simple_wrapped(host: str, port: int, app: Callable, **kwargs: Any) -> None:
        app = Ec2ReadCache(app)
        if stats_path:
            app = ActionStats(app, Path(stats_path))
        run_simple(host, port, app, **kwargs)

    server.run_simple = run_simple_wrapped
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
