"""WSGI middleware between gunicorn and moto's application, in the embedded AWS's server.

localaws/moto_server.py puts it in front of moto's application (which
localaws/moto_patches.py has changed); tests/unit/test_moto_middleware.py tests it.

- Ec2ReadCache: DescribeInstances cost ~50 ms of server CPU with 15 instances
  (moto's generic serializer walks the whole Instance shape), and the runner,
  the controller and the benchmark each ask every second: measured by the
  action statistics below, it was 73 % of the server's CPU during `make bench`.
  Its responses are kept until the next EC2 call that is not a Describe (every
  change to instances comes through one) or the next moto-api call (a reset):
  the same answers, computed once per change.
- ServiceLocks, for correctness, in two ways. Each service's requests run one
  at a time: moto's backends are not thread-safe, and gunicorn serves them from
  many threads. SQS's DeleteMessage rebuilds a queue's message list and assigns
  it back, so a message sent meanwhile is lost (193 of 2,300 in a run of
  concurrent batch sends, receives and deletes), and two deletes at once can
  bring a deleted message back to be classified twice. An SQS long poll lets go
  while it waits, as its queue's condition variable shares the SQS lock
  (moto_patches). Measured with 1,200 calls from 4 clients, three rounds each
  way: 3.07-3.25 ms of server CPU a call against 3.02-3.20 without the locks, no
  difference beyond the noise (the GIL already ran them one at a time). And when
  a client dies mid-upload, moto stores the part of the body that arrived, an
  image cut short that nobody sent. Like S3, a request whose body is shorter than
  its Content-Length is refused here (IncompleteBody, S3's code, whatever the
  service) and changes nothing.
- ActionStats, for `make bench`: the server's CPU time per API action.
- BrowserGuard, for safety: the embedded AWS takes any credentials, and moto
  answers any origin's CORS preflight, so while `make run` ran any web page open
  in the developer's browser could read the uploads, answer in the workers'
  place, or reset everything (found by a security review). What a browser sends
  is refused.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from common.hosts import header_host, is_address
from localaws.server import WILDCARD_HOSTS

# When set, the server writes its CPU time per API action to this JSON file
# every STATS_EVERY_S seconds (`make bench` reads it).
STATS_ENV = "IMGCLASS_MOTO_STATS"
STATS_EVERY_S = 1.0
# Set in the WSGI environ when Ec2ReadCache answered, so the statistics can tell.
CACHE_HIT = "imgclass.cache_hit"
# In a SigV4 Authorization header: access key (so account), date, region and service.
_CREDENTIAL_SCOPE = re.compile(r"Credential=([^,\s]+)")


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


# One lock per service that the stack uses: requests of one service run one at a
# time, those of different services side by side. SQS's is re-entrant, as a queue's
# condition variable takes it again inside a request (see moto_patches).
SERVICE_LOCKS: dict[str, Any] = {"sqs": threading.RLock(), "s3": threading.Lock(), "ec2": threading.Lock()}


def aws_service(environ: dict[str, Any]) -> str:
    """The service a signed request is for, from its SigV4 credential scope
    (<key>/<date>/<region>/<service>/aws4_request); "" when unsigned (moto-api)."""
    scope = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
    parts = scope.group(1).split("/") if scope else []
    return parts[3] if len(parts) == 5 else ""


def incomplete_body(start_response: Callable) -> Iterable[bytes]:
    """S3's answer to a body shorter than its Content-Length: a client that died
    mid-upload. moto would store what arrived, an object that was never sent."""
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>IncompleteBody</Code><Message>'
            b"You did not provide the number of bytes specified by the Content-Length HTTP header."
            b"</Message></Error>")
    start_response("400 Bad Request",
                   [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class ServiceLocks:
    """WSGI middleware: each service's requests one at a time (see the module's notes).

    The body is read before the lock is taken, so a slow upload holds up nobody,
    and the whole response is built under it."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        lock = SERVICE_LOCKS.get(aws_service(environ))
        if lock is None:
            return self.app(environ, start_response)
        # A chunked body (no Content-Length) is left for moto to read.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length and len(request_body(environ)) < length:
            return incomplete_body(start_response)
        with lock:
            return [read_all(self.app(environ, start_response))]


class Ec2ReadCache:
    """WSGI middleware: DescribeInstances answered from the last identical one until EC2 changes."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.generation = 0
        self.answers: dict[tuple[str, bytes], tuple[str, list, bytes]] = {}
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
        # The same question from another region or account is another question; those
        # are named only in the signature's credential scope, not in the body.
        scope = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        key = (scope.group(1) if scope else "", request_body(environ))
        with self.lock:
            generation, hit = self.generation, self.answers.get(key)
        if hit is not None:
            environ[CACHE_HIT] = True
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
        self._closed = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="moto-stats", daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Stops the writing thread (the server's runs as long as its process)."""
        self._closed.set()
        self._writer.join()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        started = time.thread_time()
        action = aws_action(environ)
        body = read_all(self.app(environ, start_response))
        spent = time.thread_time() - started
        if environ.get(CACHE_HIT):
            action += " (cached)"
        with self.lock:
            entry = self.totals.setdefault(action, [0, 0.0])
            entry[0] += 1
            entry[1] += spent
        return [body]

    def _write_loop(self) -> None:
        while not self._closed.wait(STATS_EVERY_S):
            with self.lock:
                snapshot = {action: {"requests": int(n), "cpu_s": round(cpu, 4)}
                            for action, (n, cpu) in self.totals.items()}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot, indent=1, sort_keys=True))
            tmp.replace(self.path)


class BrowserGuard:
    """Refuses, 403, what a web browser sends: a request with an Origin or a Sec-Fetch-*
    header (browsers add them to cross-origin requests, to a CORS preflight, and to
    every request to a loopback address; boto3 sends none), and one naming a host other
    than this server's. The last is what stops DNS rebinding: a page of a name that now
    points here is same-origin to itself, and its GETs carry neither header. Bound to
    every address ("0.0.0.0"), the server has no one name: any address is taken, and of
    names only `localhost` and this machine's own (rebinding needs a name of its own)."""

    BROWSER_HEADERS = ("HTTP_ORIGIN", "HTTP_SEC_FETCH_SITE", "HTTP_SEC_FETCH_MODE", "HTTP_SEC_FETCH_DEST")
    LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")

    def __init__(self, app: Callable, bind_host: str) -> None:
        self.app = app
        self.any_address = bind_host.strip("[]") in WILDCARD_HOSTS
        if self.any_address:
            self.hosts = {*self.LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()}
        else:
            self.hosts = {bind_host.strip("[]").lower(), *self.LOOPBACK_NAMES}

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        why = self._refusal(environ)
        if why is None:
            return self.app(environ, start_response)
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"the embedded AWS refuses this request: {why}\n".encode()]

    def _refusal(self, environ: dict[str, Any]) -> str | None:
        sent = [name[5:].replace("_", "-").title() for name in self.BROWSER_HEADERS if name in environ]
        if sent:
            return f"it comes from a web browser (it sends {sent[0]}); only programs may call it"
        host = header_host(environ.get("HTTP_HOST", ""))
        # S3 names a bucket in the host too (bucket.localhost), where the client asks it to.
        if host in self.hosts or any(host.endswith("." + name) for name in self.hosts):
            return None
        if self.any_address and is_address(host):
            return None
        return f"it names the host {host[:64]!r}, not this server's"
