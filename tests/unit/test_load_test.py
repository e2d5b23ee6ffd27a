"""load_test.py against a small fake web tier served from this process.

The fake answers from the uploaded file's content, so each test knows exactly
which requests must be answered, wrong or failed: `label:<x>` answers x,
`fail` answers 500, `mismatch` answers with another image's name, `hang`
never answers in time, `hold` (--api jobs) stays queued until released, `drop`
closes the connection unanswered, and `barrier` only answers once as many
requests are in flight as the barrier has parties (proof of real concurrency,
no sleeping).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

import load_test
from load_test import Config, LoadTestError, percentile, read_expected, run_load
from tests.conftest import page_script_source
from tests.unit.conftest import wait_until

STATUS = {"instances": {"pending": 1, "running": 2, "stopping": 4}, "queue": {"visible": 0}}


class FakeTier:
    """What the fake web tier knows, shared by its handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.untrained = False
        self.api_key = ""
        self.queued_polls = 0  # GETs of a job that still answer "queued"
        # How the next GETs of a job fail, one each, as a restarting web tier's do:
        # "drop" (the connection closes unanswered), "503", "404".
        self.failing_polls: list[str] = []
        self.jobs: dict[str, dict] = {}
        self.form_ports: set[int] = set()
        self.post_ports: list[int] = []  # each POST's client port: its connection
        self.paths: Counter[str] = Counter()
        self.authorizations: list[str | None] = []  # each POST's Authorization header
        self.barrier: threading.Barrier | None = None
        self.release = threading.Event()
        self.events_busy = False  # GET .../events answers 503, as the web tier past its stream cap
        self.status_gate: threading.Event | None = None  # set: GET /api/status waits for it
        self.status_held = 0  # GETs of /api/status that came to status_gate
        self.web_tier_names = False  # read file names as Werkzeug and the web tier do
        self.not_stored = 0  # the next POSTs answered as a stopping web tier does: 503, Retry-After
        self.retry_after = "0"  # those 503s' Retry-After
        self.tokens: dict[tuple[str, str], str] = {}  # (batch id, token) -> item id, as the web tier keeps
        self.dropped: set[bytes] = set()  # "drop-once" contents whose first answer was cut off
        self.lost = False  # every batch forgotten, as after the stack (and its embedded AWS) restarted
        self.cut_off_after = 0.0  # how long a "drop-once" upload's first coming waits before its cut-off
        self.idempotency_keys: dict[str, int] = {}  # POST /'s keys, and how often each came
        self.killed = False  # every request's connection closed unanswered, as a killed process's
        self.status: object = STATUS  # what GET /api/status answers
        self.drips_given_up = 0  # answers sent a byte at a time whose client hung up


def _parse_files(headers, body: bytes) -> list[tuple[str, str, bytes]]:
    """(field, filename, content) of each file in a multipart/form-data body."""
    raw = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
    message = BytesParser(policy=HTTP).parsebytes(raw)
    return [
        (part.get_param("name", header="content-disposition"), part.get_filename(),
         part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


def _parse_files_like_the_web_tier(headers, body: bytes) -> list[tuple[str, str, bytes]]:
    """As _parse_files, but parsed by Werkzeug and named as the web tier names an upload."""
    from werkzeug.formparser import FormDataParser
    from werkzeug.http import parse_options_header

    from web_tier.filenames import display_name

    mimetype, options = parse_options_header(headers["Content-Type"])
    _, _, files = FormDataParser().parse(io.BytesIO(body), mimetype, len(body), options)
    return [(name, display_name(storage), storage.read()) for name, storage in files.items(multi=True)]


def _answer(tier: FakeTier, content: bytes) -> tuple[int, str | None]:
    """(HTTP status, label) the fake gives a file with this content."""
    if content == b"fail":
        return 500, None
    if content == b"hang":
        tier.release.wait(10)
        return 200, "late"
    if content == b"barrier":
        try:
            tier.barrier.wait()
        except threading.BrokenBarrierError:
            return 500, None
        return 200, "together"
    if content.startswith(b"label:"):
        return 200, content[6:].decode()
    if content.startswith(b"status:"):
        return int(content[7:]), None
    return 200, "cat"


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open, so connection reuse can be observed.
    protocol_version = "HTTP/1.1"
    tier: FakeTier  # set per server in the fixture

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(
        self, status: int, body: str | dict, content_type: str = "text/plain; charset=utf-8", headers=None
    ) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if isinstance(body, dict) else content_type)
        self.send_header("Content-Length", str(len(data)))
        headers = dict(headers or {})
        if self.tier.untrained:  # as the web tier: on every answer, its refusals too
            headers.setdefault("X-Model-Untrained", "true")
        for name, value in headers.items():
            self.send_header(name, value)
        # A client past its timeout has gone: a held answer then finds nobody to take it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.end_headers()
            self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.tier.api_key and self.headers.get("X-API-Key") != self.tier.api_key:
            # As the web tier: POST / answers in text, the JSON API in JSON.
            self._send(401, "a valid API key is required" if self.path == "/" else
                       {"error": "a valid API key is required"})
            return False
        return True

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.tier.lock:
            self.tier.paths[f"POST {self.path}"] += 1
            self.tier.post_ports.append(self.client_address[1])
            self.tier.authorizations.append(self.headers.get("Authorization"))
        if not self._authorised():
            return
        with self.tier.lock:
            stopping, self.tier.not_stored = self.tier.not_stored > 0, max(0, self.tier.not_stored - 1)
        if stopping:
            self._send(503, "not stored: the web tier is stopping; send it again",
                       headers={"Retry-After": self.tier.retry_after})
            return
        parse = _parse_files_like_the_web_tier if self.tier.web_tier_names else _parse_files
        files = parse(self.headers, body)
        if not files:  # as the web tier (load_test.api_key_refused sends such a form)
            self._send(400, {"error": "no file in the request"})
            return
        if self.path == "/":
            self._post_form(files)
        elif self.path == "/api/jobs":
            self._post_jobs(files)
        else:
            self._send(404, "not found")

    def _post_form(self, files) -> None:
        with self.tier.lock:
            self.tier.form_ports.add(self.client_address[1])
        (field_name, filename, content), = files
        assert field_name == "inputFile"
        if content == b"drop":  # as a web tier killed mid-request: the connection closes unanswered
            self._hang_up()
            return
        if content == b"drip":  # a broken server or proxy: a byte at a time, never all of it
            self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x")
            return
        key = self.headers.get("Idempotency-Key")
        if key:
            with self.tier.lock:
                self.tier.idempotency_keys[key] = self.tier.idempotency_keys.get(key, 0) + 1
        if self._cut_off_once(content):
            return
        if content == b"drop-once":
            content = b"label:cat"
        if content.startswith(b"queued:"):  # as a web tier stopping while the image waits
            batch_id, item_id = uuid.uuid4().hex, uuid.uuid4().hex
            with self.tier.lock:
                self.tier.jobs[batch_id] = {"id": item_id, "filename": filename, "ok": True,
                                            "label": content[7:].decode(), "gets": 0}
            self._send(503, f"{filename}: the web tier is stopping; the image is still queued, see "
                            f"/api/jobs/{batch_id} (no need to send it again)",
                       headers={"X-Batch-Id": batch_id, "X-Item-Id": item_id})
            return
        status, label = _answer(self.tier, content)
        if status != 200:
            self._send(status, "boom")
            return
        name = {b"mismatch": "someone_else", b"with-extension": filename}.get(content, Path(filename).stem)
        headers = {"X-Model-Untrained": "true"} if self.tier.untrained else {}
        if content == b"html-page":  # another server's page: one line, with a colon
            self._send(200, f"<p>{name}: {label}</p>", content_type="text/html; charset=utf-8")
            return
        if content == b"no-charset":  # UTF-8, as the contract says, but not said so
            self._send(200, f"{name}:{label}\n", content_type="text/plain")
            return
        if content == b"not-an-answer":  # another server's page, which happens to hold a colon
            self._send(200, f'<?xml version="1.0"?>\n<Result xmlns="http://x/">{name}</Result>\n')
            return
        self._send(200, f"{name}:{label}\n", headers=headers)

    def _post_jobs(self, parts) -> None:
        form = {name: content.decode() for name, filename, content in parts if filename is None}
        (field_name, filename, content), = [part for part in parts if part[1] is not None]
        assert field_name == "files"
        if content == b"renamed":  # an item named otherwise than its file was sent
            filename = "someone_else.jpg"
        if content == b"refuse":  # as the web tier refuses a file it cannot read: all of a 4xx
            rejection = {"index": 0, "filename": filename, "error": "damaged or unreadable image",
                         "status": 415}
            self._send(415, {"items": [], "rejected": [rejection], "error": rejection["error"],
                             "filename": filename})
            return
        batch_id, item_id = form.get("batch_id") or uuid.uuid4().hex, uuid.uuid4().hex
        status, label = _answer(self.tier, content)
        with self.tier.lock:
            known = self.tier.tokens.get((batch_id, form.get("tokens", "")))
            if known is None:
                self.tier.jobs[batch_id] = {
                    "id": item_id, "filename": filename, "ok": status == 200, "label": label, "gets": 0,
                    "held": content == b"hold", "endless": content == b"endless",
                }
                if "tokens" in form:
                    self.tier.tokens[(batch_id, form["tokens"])] = item_id
        if self._cut_off_once(content):
            return
        item = {"id": known or item_id, "filename": filename, **({"again": True} if known else {})}
        self._send(202, {"batch_id": batch_id, "items": [item]})

    def _cut_off_once(self, content: bytes) -> bool:
        """Whether this is a "drop-once" upload's first coming: stored, then the web tier
        killed before it answered (its connection closed unanswered)."""
        with self.tier.lock:
            first = content == b"drop-once" and content not in self.tier.dropped
            self.tier.dropped.add(content)
        if first:
            # As a POST / waiting for its classification under a backlog; set, `release`
            # lets it go at once (the fixture's teardown).
            self.tier.release.wait(self.tier.cut_off_after)
            self._hang_up()
        return first

    def _drip(self, head: bytes, byte: bytes) -> None:
        """Send `head`, then `byte` every 0.05 s until the fixture's teardown (30 s at most)."""
        self.close_connection = True
        self.wfile.write(head)
        self.wfile.flush()
        deadline = time.monotonic() + 30
        while not self.tier.release.wait(0.05) and time.monotonic() < deadline:
            try:
                self.wfile.write(byte)
                self.wfile.flush()
            except OSError:  # the client gave up
                with self.tier.lock:
                    self.tier.drips_given_up += 1
                return

    def _hang_up(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _item(self, batch_id: str) -> dict | None:
        with self.tier.lock:
            job = None if self.tier.lost else self.tier.jobs.get(batch_id)
            if job is None:
                return None
            job["gets"] += 1
            finished = job["gets"] > self.tier.queued_polls
            finished = finished and not (job.get("held") and not self.tier.release.is_set())
        return self._item_json(job, finished)

    def _item_json(self, job: dict, finished: bool) -> dict:
        state = ("done" if job["ok"] else "failed") if finished else "queued"
        return {
            "id": job["id"], "filename": job["filename"], "state": state,
            "label": job["label"] if state == "done" else None,
            "score": 0.5, "top5": [], "error": "worker failed" if state == "failed" else None,
            "untrained": self.tier.untrained,
        }

    def do_GET(self) -> None:
        if self.tier.killed:  # a kept connection the dead process no longer serves
            self._hang_up()
            return
        with self.tier.lock:
            self.tier.paths["GET " + re.sub(r"[0-9a-f]{32}", "<id>", self.path)] += 1
        if self.path == "/api/status":  # open to all, as the web tier's, and says whether uploads need a key
            if self.tier.status_gate is not None:
                with self.tier.lock:
                    self.tier.status_held += 1
                self.tier.status_gate.wait(5)
            status = self.tier.status
            self._send(200, {**status, "api_key_required": bool(self.tier.api_key)}
                       if isinstance(status, dict) else status)
            return
        if not self._authorised():
            return
        parts = self.path.strip("/").split("/")
        if parts[:2] == ["api", "jobs"] and len(parts) == 4 and parts[3] == "events":
            self._events(parts[2])
        elif parts[:2] == ["api", "jobs"] and len(parts) == 3:
            with self.tier.lock:
                failure = self.tier.failing_polls.pop(0) if self.tier.failing_polls else None
            if failure == "drop":
                self._hang_up()
                return
            if failure is not None:
                self._send(int(failure), {"error": "failing as asked"})
                return
            item = self._item(parts[2])
            if item is None:
                self._send(404, {"error": f"no such batch: {parts[2]}", "filename": None})
            else:
                self._send(200, {"batch_id": parts[2], "items": [item]})
        else:
            self._send(404, "not found")

    def _events(self, batch_id: str) -> None:
        if self.tier.events_busy:
            busy = {"error": "too many event streams open; poll GET /api/jobs/<id> instead", "filename": None}
            self._send(503, busy, headers={"Retry-After": "10"})
            return
        job = None if self.tier.lost else self.tier.jobs.get(batch_id)
        if job is None:
            self._send(404, {"error": f"no such batch: {batch_id}", "filename": None})
            return
        if job.get("endless"):  # an event line that never ends
            self._drip(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: ", b"x" * 4096)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        if job.get("held"):  # the stream is open; its event comes once released
            self.wfile.flush()
            self.tier.release.wait(10)
        event = self._item_json(job, finished=True)
        payload = json.dumps(event).encode()
        self.wfile.write(b": keep-alive comment\n\nevent: item\ndata: " + payload + b"\n\n")
        self.close_connection = True


@pytest.fixture
def tier():
    state = FakeTier()
    handler = type("BoundHandler", (Handler,), {"tier": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _no_api_key_from_env(monkeypatch):
    monkeypatch.delenv("API_KEY", raising=False)


def make_images(folder: Path, contents: dict[str, bytes]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    return folder


MIXED = {
    "cat.jpg": b"label:cat",
    "dog.JPEG": b"label:dog",
    "fish.jpg": b"label:fish",  # expected bird: wrong
    "boom.jpg": b"fail",  # 500: failed
    "cow.jpg": b"label:cow",  # not in the CSV: unchecked
    "shark.png": b"label:great_white_shark",  # CSV says "great white shark": correct
    "other.jpg": b"mismatch",  # answer names another image: wrong
}
MIXED_CSV = "Image,Results\ncat,cat\ndog,dog\nfish,bird\nboom,cat\nshark,great white shark\nother,cat\n"


@pytest.fixture
def mixed(tmp_path) -> tuple[Path, Path]:
    images = make_images(tmp_path / "images", MIXED)
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text(MIXED_CSV)
    return images, csv_path


def by_file(report) -> dict[str, load_test.Outcome]:
    return {o.file: o for o in report.outcomes}


class InBackground:
    """`fn()` in a daemon thread whose failure fails the test: `check()` raises it, and
    `finish()` waits for it to end first. Left to die with its thread, a helper's failed
    wait would surface later, as a misleading "still running" or an unrelated assert (or
    never, where a `finally` covered for it)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # handed to the test
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def finish(self, timeout: float = 30.0) -> None:
        """Wait for the helper to end, then raise what it raised: one still waiting on a
        condition that will fail would otherwise pass a check() made before it does."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"a helper thread still runs after {timeout} s"
        self.check()


def finish_within(seconds: float, fn, *args, watching: InBackground | None = None, **kwargs):
    """`fn(*args, **kwargs)`, failing the test if it has not returned after `seconds`
    (it is run in a daemon thread, left to end with the fake tier), or as soon as the
    helper it is `watching` fails: that failure says why, where "still running" would not."""
    box: queue.SimpleQueue = queue.SimpleQueue()

    def run() -> None:
        try:
            box.put((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the test
            box.put((False, exc))

    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + seconds
    while True:
        if watching is not None:
            watching.check()
        try:
            ok, value = box.get(timeout=min(0.1, max(deadline - time.monotonic(), 0)))
            break
        except queue.Empty:
            if time.monotonic() >= deadline:
                pytest.fail(f"still running after {seconds} s")
    if not ok:
        raise value
    return value


# --- the core against the fake --------------------------------------------------------


def test_form_counts_answered_failed_wrong_and_unchecked(tier, mixed):
    images, csv_path = mixed
    report = run_load(Config(images=images, url=tier.url, concurrency=3, expected=csv_path))

    assert (report.sent, report.answered, report.failed) == (7, 6, 1)
    assert (report.wrong, report.correct, report.unchecked) == (2, 3, 1)
    assert not report.ok and not report.untrained
    outcomes = by_file(report)
    assert outcomes["boom.jpg"].verdict == "failed" and outcomes["boom.jpg"].status == 500
    assert outcomes["fish.jpg"].verdict == "wrong" and outcomes["fish.jpg"].label == "fish"
    assert outcomes["other.jpg"].verdict == "wrong" and "someone_else" in outcomes["other.jpg"].note
    assert outcomes["shark.png"].verdict == "correct"
    assert outcomes["cow.jpg"].verdict == "unchecked"
    assert len(report.latencies) == 6
    assert tier.paths["POST /"] == 7


def test_all_good_run_passes_and_exits_zero(tier, tmp_path, capsys):
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x", "b.jpg": b"label:y"})
    code = load_test.main(["--url", tier.url, "--images", str(images)])
    out = capsys.readouterr().out
    assert code == 0
    assert "RESULT: PASS" in out and "WARNING" not in out


def test_only_the_given_url_is_talked_to_whatever_the_environment_says(tier, tmp_path, monkeypatch):
    """A proxy from the environment would be measured instead of the tier, and ~/.netrc
    credentials would be sent to it: neither is used."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login someone password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    report = run_load(Config(images=images, url=tier.url))

    assert report.ok and report.answered == 1
    assert tier.authorizations == [None]


def test_num_requests_cycles_through_images(tier, tmp_path):
    images = make_images(tmp_path / "images", {"a.jpg": b"label:a", "b.jpg": b"label:b", "c.jpg": b"label:c"})
    report = run_load(Config(images=images, url=tier.url, num_requests=7, concurrency=2))

    assert report.sent == report.answered == 7 and report.ok
    assert Counter(o.file for o in report.outcomes) == {"a.jpg": 3, "b.jpg": 2, "c.jpg": 2}
    assert sorted(o.index for o in report.outcomes) == list(range(7))


def test_requests_really_run_concurrently_and_reuse_connections(tier, tmp_path):
    # Each request is held until four are in flight at once: with less
    # concurrency the barrier breaks after 30 s and the fake answers 500.
    tier.barrier = threading.Barrier(4, timeout=30)
    images = make_images(tmp_path / "images", {f"{i}.jpg": b"barrier" for i in range(4)})
    report = run_load(Config(images=images, url=tier.url, num_requests=12, concurrency=4))

    assert report.failed == 0 and report.answered == 12
    # One keep-alive Session per worker thread: at most four connections for twelve uploads.
    assert len(tier.form_ports) <= 4


def test_a_request_past_its_timeout_counts_as_failed(tier, tmp_path):
    images = make_images(tmp_path / "images", {"slow.jpg": b"hang", "fast.jpg": b"label:ok"})
    report = run_load(Config(images=images, url=tier.url, concurrency=2, timeout=2))

    outcomes = by_file(report)
    assert outcomes["slow.jpg"].verdict == "failed" and "timeout" in outcomes["slow.jpg"].error
    assert outcomes["fast.jpg"].answered
    assert (report.answered, report.failed) == (1, 1)


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_an_upload_given_up_on_while_it_waits_says_the_image_may_be_stored(tier, tmp_path, api):
    """A web tier paused past --timeout may store and answer every upload: not said
    only to have timed out."""
    images = make_images(tmp_path / "images", {"slow.jpg": b"hang"})  # the upload's answer waits
    (outcome,) = run_load(Config(images=images, url=tier.url, api=api, timeout=2)).outcomes
    assert outcome.verdict == "failed" and outcome.reached
    assert outcome.error == "timeout after 2 s (the image may be stored)"


@pytest.mark.parametrize("wait", [None, "sse"])
def test_a_job_accepted_then_waited_for_past_the_timeout_says_the_image_is_stored(tier, tmp_path, wait):
    """--jobs must not say only "timeout" for an image the web tier has accepted (202)
    and will still classify."""
    images = make_images(tmp_path / "images", {"held.jpg": b"hold"})  # accepted, never finished
    (outcome,) = run_load(Config(images=images, url=tier.url, api="jobs", wait=wait, timeout=2)).outcomes
    tier.release.set()
    assert outcome.verdict == "failed" and outcome.status == 202
    assert outcome.error == ("timeout after 2 s (the image is stored, and queued: its result will be at "
                             "/api/jobs)")


def test_a_run_given_a_time_to_stop_at_ends_then_and_says_why_for_each_request_left(tier, tmp_path):
    """`make bench` must end within 10 minutes: at -c 100, a stack answering nothing held
    one run for three of its requests' 120 s timeouts."""
    images = make_images(tmp_path / "images", {f"{i}.jpg": b"hang" for i in range(3)})
    why = "the bench's deadline passed during (b)"
    config = Config(images=images, url=tier.url, concurrency=2, timeout=60, quiet=True)

    report = finish_within(15, run_load, config, stop_at=time.monotonic() + 0.5, stop_reason=why)

    assert report.cut_short == why and not report.interrupted and not report.ok
    assert report.answered == 0 and len(report.outcomes) == 3
    # The first two were taken by the two senders (unless the time was up first); the third never was.
    verdicts = [o.verdict for o in sorted(report.outcomes, key=lambda o: o.index)]
    assert set(verdicts[:2]) <= {"abandoned", "not started"} and verdicts[2] == "not started"
    assert all(why in o.error for o in report.outcomes)
    assert report.to_dict()["cut_short"] == why
    assert load_test.result_line(report).endswith(f"stopped: {why})")


def test_a_request_whose_deadline_passed_before_it_was_sent_is_not_sent(tier, tmp_path):
    """With --timeout 0.001 requests never sent must not count as sent."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    # Past before the upload goes out: the file is read after the request's clock starts.
    (outcome,) = run_load(Config(images=images, url=tier.url, timeout=1e-9)).outcomes
    assert outcome.error == "timeout after 1e-09 s" and not outcome.reached
    assert outcome.verdict == "not sent" and tier.paths["POST /"] == 0


def test_what_a_run_leaves_out_is_said(tier, tmp_path, capsys):
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    (images / "notes.txt").write_text("not an image")
    (images / "more").mkdir()
    (images / "more" / "dog.jpg").write_bytes(b"label:dog")
    (images / "._cat.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS's metadata of cat.jpg
    (images / "a\x1b[2J.txt").write_text("a name that would clear the screen")
    expected = tmp_path / "expected.csv"
    expected.write_text("Image,Results\ncat,cat\ndog,dog\nbird,bird\nfox,fox\neel,eel\n")
    assert load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(expected),
                           "--quiet"]) == 0
    err = capsys.readouterr().err
    # Which ones, a few of them (in name order, escaped): "4 entries" alone left the user guessing.
    assert f"4 entries of {images} left out (._cat.jpg, a\\x1b[2J.txt, more, ...): not image files" in err
    assert tier.paths["POST /"] == 1  # cat.jpg alone
    # Which rows, a few of them, as for the entries left out.
    assert f"4 rows of {expected} name no image in {images} (bird, dog, eel, ...)\n" in err


def test_a_csv_row_for_a_name_that_is_not_utf8_is_not_said_to_name_no_image(tier, tmp_path, capsys):
    """Its name is sent, and judged, with U+FFFD: compared as it is on disk, the row
    would be said to name no image, though it was checked and right."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    with open(os.path.join(os.fsencode(images), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(b"label:coffee")
    expected = tmp_path / "expected.csv"
    expected.write_text("Image,Results\ncat,cat\ncaf\ufffd,coffee\n", encoding="utf-8")
    assert load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(expected),
                           "--quiet"]) == 0
    assert "name no image" not in capsys.readouterr().err


def test_the_command_reads_the_folder_and_the_csv_once_so_its_plan_is_what_it_counts(
        tier, tmp_path, monkeypatch, capsys):
    """main listed the folder and read --expected for its progress bar (and listed the
    folder again for what it leaves out), then run_load read both again: an image added
    in between was sent, beyond the progress total, and counted as left out."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x", "b.jpg": b"label:y"})
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("Image,Results\na,x\nb,y\n")
    calls = Counter()
    real_iterdir, real_read = Path.iterdir, load_test.read_expected

    def list_then_add_one(folder):
        listed = list(real_iterdir(folder))
        if folder == images:
            calls["listed"] += 1
            (folder / "c.jpg").write_bytes(b"label:z")  # the folder changes after the listing
        return iter(listed)

    def read_then_change(path):
        calls["read_expected"] += 1
        read = real_read(path)
        path.write_text("Image,Results\na,wrong\nb,wrong\n")
        return read

    monkeypatch.setattr(Path, "iterdir", list_then_add_one)
    monkeypatch.setattr(load_test, "read_expected", read_then_change)
    out = tmp_path / "run.json"
    code = load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path),
                           "--json", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert "left out" not in captured.err
    assert calls == {"listed": 1, "read_expected": 1}
    requests_sent = json.loads(out.read_text())["requests"]
    assert sorted(r["file"] for r in requests_sent) == ["a.jpg", "b.jpg"]
    assert {r["verdict"] for r in requests_sent} == {"correct"}


def test_the_json_report_written_a_row_at_a_time_is_the_whole_report(tier, tmp_path):
    """Written as made, row by row: made whole first, two million requests' rows took
    ~7 GB to write."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:cat", "b.jpg": b"fail", 'q"uote.jpg': b"x"})
    report = run_load(Config(images=images, url=tier.url, concurrency=1))
    path = tmp_path / "run.json"
    load_test.write_json(report, path)
    written = path.read_text(encoding="utf-8")
    assert json.loads(written) == json.loads(json.dumps(report.to_dict()))
    assert [r["file"] for r in json.loads(written)["requests"]] == ["a.jpg", "b.jpg", 'q"uote.jpg']
    rows = [line for line in written.splitlines() if line.startswith('    {"index": ')]
    assert len(rows) == 3  # a line each
    report.outcomes.clear()  # none recorded: still a whole document
    load_test.write_json(report, path)
    assert json.loads(path.read_text())["requests"] == []


def test_a_connection_closed_before_the_answer_is_not_called_a_failure_to_connect(tier, tmp_path):
    images = make_images(tmp_path / "images", {"dropped.jpg": b"drop", "fine.jpg": b"label:ok"})
    outcomes = by_file(run_load(Config(images=images, url=tier.url)))
    error = outcomes["dropped.jpg"].error
    assert error.startswith(f"the connection to {tier.url} closed before the answer"), error
    assert error.endswith("(the image may be stored; --idempotency-keys sends such uploads again)")
    assert outcomes["fine.jpg"].answered


def test_https_to_a_plain_http_port_is_a_usage_error_before_anything_is_sent(tier, tmp_path, capsys):
    """A handshake that fails once fails for every request: said before the run (exit 2),
    not as each request failing (with --jobs, each tried again for 30 s)."""
    images = make_images(tmp_path / "images", {"fine.jpg": b"label:ok"})
    url = tier.url.replace("http://", "https://")
    assert load_test.main(["--url", url, "--images", str(images), "--jobs", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"cannot connect to {url}: the TLS handshake failed (https:// to a plain HTTP port" in err, err
    assert not tier.paths  # the handshakes failed: nothing reached the fake


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_a_failed_handshake_is_not_sent_again(tier, tmp_path, monkeypatch, api):
    """Not a connection closed before the answer, 'the image may be stored': nothing
    was sent. And not tried again: it will not get better (with --jobs or
    --idempotency-keys, 2 requests took 28.6 s, "tried 17 times")."""
    monkeypatch.setattr(load_test, "check_server", lambda config: None)  # a server that took TLS at first
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", 3.0)
    images = make_images(tmp_path / "images", {"fine.jpg": b"label:ok"})
    url = tier.url.replace("http://", "https://")
    config = Config(images=images, url=url, timeout=5, api=api, idempotency_keys=api == "form")
    (outcome,) = run_load(config).outcomes
    assert outcome.verdict == "not sent"  # nothing reached the web tier
    assert outcome.error == (f"cannot connect to {url}: the TLS handshake failed (https:// to a plain HTTP "
                             "port, or a certificate not trusted)"), outcome.error
    assert not outcome.reached and outcome.resent == 0


def test_connections_cut_off_for_a_whole_window_fail_later_requests_at_once(tier, tmp_path, monkeypatch):
    """A server that cuts every connection, with keys: each request waited a window of
    its own (-n 4 -c 2 took 59.8 s; -n 1000 -c 10 would take 50 minutes), as refusals
    once did."""
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", 1.5)
    tier.killed = True  # its /api/status cut off too: nothing says the server is up
    images = make_images(tmp_path / "images", {f"{i}.jpg": b"drop" for i in range(6)})
    config = Config(images=images, url=tier.url, concurrency=1, idempotency_keys=True)
    report = finish_within(60, run_load, config)
    outcomes = sorted(report.outcomes, key=lambda o: o.index)
    assert {o.verdict for o in outcomes} == {"failed"}
    assert all(o.error.startswith(f"the connection to {tier.url} closed before the answer") for o in outcomes)
    # Sent again (after 0.25, 0.5, 1 s...) within one window from the first cut-off:
    # each request in a window of its own was sent again twice, 12 in all.
    resent = [o.resent for o in outcomes]
    assert resent[0] == 2 and resent[-1] == 0 and sum(resent) <= 5, resent


def test_nothing_listening_at_the_url_is_said_before_anything_is_sent(tmp_path):
    """Else each request would be sent again for RESEND_WINDOW_S, as to a web tier restarting."""
    images = make_images(tmp_path / "images", {"fine.jpg": b"label:ok"})
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))  # bound, never listening: nothing accepts there
    url = f"http://127.0.0.1:{unused.getsockname()[1]}"
    try:
        with pytest.raises(LoadTestError, match=f"cannot connect to {url}: .*is the web tier running"):
            run_load(Config(images=images, url=url, num_requests=1))
    finally:
        unused.close()


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_an_upload_refused_while_the_web_tier_restarts_is_sent_again(tmp_path, monkeypatch, api):
    """The web tier restarted 2.5 s into a run of 80: the 70 requests not yet sent must
    not burn through in 0.2 s, each failing on a refused connection, which stores nothing."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = port_holder.getsockname()[1]
    monkeypatch.setattr(load_test, "check_reachable", lambda url: None)  # it was up when the run began
    state = FakeTier()
    server_box = []
    # Back once both requests were refused: after a fixed pause, a slow start of the run
    # found the server up, and nothing was sent again.
    refused_on = set()  # the threads, one per request in flight, that were refused
    real_refused = load_test.refused
    monkeypatch.setattr(load_test, "refused", lambda exc: real_refused(exc)
                        and not refused_on.add(threading.get_ident()))

    def come_back() -> None:
        wait_until(lambda: len(refused_on) >= 2, 30)
        port_holder.close()
        server = ThreadingHTTPServer(("127.0.0.1", port), type("H", (Handler,), {"tier": state}))
        server_box.append(server)
        server.serve_forever(poll_interval=0.05)

    helper = InBackground(come_back)
    try:
        report = run_load(Config(images=images, url=f"http://127.0.0.1:{port}", api=api, num_requests=2))
    finally:
        wait_until(lambda: server_box or helper.check())
        server_box[0].shutdown()
        server_box[0].server_close()
    assert (report.answered, report.failed) == (2, 0), [o.error for o in report.outcomes]
    assert all(o.resent >= 1 for o in report.outcomes)
    assert "sent again" in load_test.format_report(report)
    assert report.to_dict()["resent"] == report.resent >= 2


def test_once_refused_for_a_whole_window_later_requests_fail_at_once(tmp_path, monkeypatch):
    """A web tier gone for good: if each request waited a window of its own, a run of
    1,000 at -c 10 would take 50 minutes to say so."""
    images = make_images(tmp_path / "images", {f"{i}.jpg": b"label:cat" for i in range(6)})
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    monkeypatch.setattr(load_test, "check_reachable", lambda url: None)
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", 1.5)
    url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    try:
        report = finish_within(20, run_load, Config(images=images, url=url, concurrency=1))
    finally:
        dead.close()
    # None reached the web tier: not counted "sent", then "failed" too.
    assert (report.sent, report.failed, report.not_sent) == (0, 0, 6)
    assert load_test.result_line(report) == "RESULT: FAIL (0 failed, 0 wrong, 6 not sent)"
    assert {o.verdict for o in report.outcomes} == {"not sent"}
    # Sent again (after 0.25, 0.5, 1 s...) within one window from the first refusal:
    # each request in a window of its own was sent again twice, 12 in all.
    resent = [o.resent for o in sorted(report.outcomes, key=lambda o: o.index)]
    assert resent[0] == 2 and resent[-1] == 0 and sum(resent) <= 5, resent


def test_a_file_name_that_is_not_utf8_fails_nothing_and_is_reported(tier, tmp_path, capsys):
    """Sent as it was, it ended the whole run with a UnicodeEncodeError, no report written."""
    images = make_images(tmp_path / "images", {"good.jpg": b"label:cat"})
    try:
        with open(os.path.join(os.fsencode(images), b"caf\xe9.jpg"), "wb") as f:
            f.write(b"label:dog")
    except OSError as exc:  # macOS's APFS takes only UTF-8 names
        pytest.skip(f"this file system refuses a name that is not UTF-8: {exc}")
    report_path = tmp_path / "report.json"
    code = load_test.main(["--url", tier.url, "--images", str(images), "--json", str(report_path), "-q"])
    assert code == 0, capsys.readouterr()
    assert sorted(o["file"] for o in json.loads(report_path.read_text())["requests"]) == ["caf\ufffd.jpg",
                                                                                        "good.jpg"]


@pytest.mark.parametrize(("on_disk", "row"), [
    # café.png copied from a Mac (NFD) must be checked against a CSV row café (NFC), and back.
    ("cafe\u0301.png", "caf\u00e9,shield"), ("caf\u00e9.png", "cafe\u0301,shield"),
    # A CSV's cells are read stripped, and the web tier trims names: ' trail .jpg' was
    # named by no row, and left unchecked.
    (" trail .jpg", '" trail ",shield'), (" trail .jpg", "trail,shield"),
    (" trail .jpg", "trail .jpg,shield"),
], ids=["nfd-file-nfc-csv", "nfc-file-nfd-csv", "spaces-quoted", "spaces-stripped", "spaces-inside"])
def test_a_name_matches_its_row_as_people_write_it(tier, tmp_path, capsys, on_disk, row):
    images = make_images(tmp_path / "images", {on_disk: b"label:shield", "cat.jpg": b"label:cat"})
    expected = tmp_path / "expected.csv"
    expected.write_text(f"Image,Results\n{row}\ncat,cat\n", encoding="utf-8")
    report = run_load(Config(images=images, url=tier.url, expected=expected))
    assert (report.correct, report.unchecked) == (2, 0), [(o.file, o.verdict) for o in report.outcomes]
    assert load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(expected),
                           "-q"]) == 0
    assert "name no image" not in capsys.readouterr().err


def test_an_expected_csv_naming_only_some_images_says_so_in_its_pass(tier, tmp_path, capsys):
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x", "b.jpg": b"label:y"})
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("Image,Results\na,x\n")
    code = load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path), "-q"])
    assert code == 0
    assert "RESULT: PASS (2 answered, none failed or wrong; 1 not in the expected CSV, so unchecked)" \
        in capsys.readouterr().out


def test_every_kind_of_image_the_web_tier_takes_is_sent():
    from web_tier.image_check import FORMATS

    suffix = {"JPEG": ".jpg", "MPO": ".mpo", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp",
              "TIFF": ".tif", "AVIF": ".avif"}
    assert {suffix[kind] for kind in FORMATS} <= load_test.IMAGE_SUFFIXES  # a KeyError: a new kind
    assert {".jpe", ".jfif", ".jpeg", ".tiff"} <= load_test.IMAGE_SUFFIXES


def test_the_page_takes_from_a_folder_every_kind_the_load_test_sends():
    """.mpo (3D cameras' JPEGs) belongs in both: browsers give it no type."""
    pattern = re.search(r"const IMAGE_EXTENSION = /(.+)/i;", page_script_source())[1]
    left_out = [s for s in load_test.IMAGE_SUFFIXES if not re.search(pattern, f"photo{s.upper()}", re.I)]
    assert not left_out


def test_a_batch_whose_answer_was_cut_off_is_sent_again_and_stored_once(tier, tmp_path):
    """A web tier killed after storing the upload, before answering: with --api jobs the
    upload was counted failed, though stored and classified. It names its batch and
    token, so sending it again is safe."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"drop-once"})
    report = run_load(Config(images=images, url=tier.url, api="jobs", num_requests=1))
    assert (report.answered, report.failed) == (1, 0), [o.error for o in report.outcomes]
    assert report.outcomes[0].resent == 1 and tier.paths["POST /api/jobs"] == 2
    assert len(tier.jobs) == 1  # stored once
    assert "cut-off connections" in load_test.format_report(report)


def test_with_idempotency_keys_a_post_whose_answer_was_cut_off_is_sent_again_under_its_key(tier, tmp_path):
    images = make_images(tmp_path / "images", {"cat.jpg": b"drop-once"})
    plain = run_load(Config(images=images, url=tier.url, num_requests=1))
    assert (plain.answered, plain.failed) == (0, 1)  # without a key: it may be stored, not sent again
    assert tier.idempotency_keys == {}
    tier.dropped.clear()
    keyed = run_load(Config(images=images, url=tier.url, num_requests=1, idempotency_keys=True))
    assert (keyed.answered, keyed.failed) == (1, 0), [o.error for o in keyed.outcomes]
    [(key, sent)] = tier.idempotency_keys.items()
    assert sent == 2 and keyed.outcomes[0].resent == 1 and len(key) == 36
    assert "cut-off connections" in load_test.format_report(keyed)  # not only "refused" ones
    assert load_test.parse_args(["--images", str(images), "--idempotency-keys"]).idempotency_keys


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_an_upload_cut_off_after_longer_than_the_window_is_still_sent_again(tier, tmp_path, monkeypatch, api):
    """From the first send, the window would fail a POST / whose classification took
    over 30 s under a backlog, its connection then cut (a gunicorn worker killed),
    "resent 0". It runs from the first failed attempt."""
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", 0.3)
    monkeypatch.setattr(load_test, "FIRST_RESEND_DELAY_S", 0.01)
    tier.cut_off_after = 0.6  # twice the window
    images = make_images(tmp_path / "images", {"cat.jpg": b"drop-once"})
    config = Config(images=images, url=tier.url, api=api, num_requests=1, idempotency_keys=api == "form",
                    timeout=10)
    report = finish_within(8, run_load, config)
    assert (report.answered, report.failed) == (1, 0), [o.error for o in report.outcomes]
    assert report.outcomes[0].resent == 1 and report.outcomes[0].latency_s >= 0.6


def test_an_upload_a_stopping_web_tier_did_not_store_is_sent_again_and_a_queued_one_is_not(tier, tmp_path):
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    tier.not_stored = 2  # 503 with Retry-After: nothing stored, send again
    report = run_load(Config(images=images, url=tier.url, num_requests=1))
    assert report.outcomes[0].answered and report.outcomes[0].resent == 2
    assert tier.paths["POST /"] == 3

    queued = make_images(tmp_path / "queued", {"q.jpg": b"status:503"})  # 503 without Retry-After
    report = run_load(Config(images=queued, url=tier.url, num_requests=1))
    assert report.outcomes[0].verdict == "failed" and report.outcomes[0].resent == 0
    assert tier.paths["POST /"] == 4


def test_a_retry_after_of_0_is_not_a_flood_and_its_last_503_is_the_reason_given(tier, tmp_path):
    """A server answering every upload 503 with Retry-After: 0 drew 2412 POSTs in 3 s, and
    the request then failed as "timeout after 3 s (the image may be stored)", where every
    answer had said nothing was."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    tier.not_stored = 10**6
    (outcome,) = run_load(Config(images=images, url=tier.url, timeout=3)).outcomes
    assert outcome.verdict == "failed" and outcome.status == 503
    assert outcome.error.startswith("HTTP 503: not stored"), outcome.error
    assert "may be stored" not in outcome.error
    # Backing off from 0.25 s, doubling: 4 or 5 POSTs in 3 s.
    assert 2 <= tier.paths["POST /"] <= 8 and outcome.resent == tier.paths["POST /"] - 1, tier.paths


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_a_request_waiting_to_be_sent_again_is_not_sent_once_sending_stops(tier, tmp_path, api):
    """The first Ctrl-C cut a resend's back-off short, and the upload was POSTed once
    more before the stop was looked at."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    tier.not_stored, tier.retry_after = 10**6, "10"  # within the 30 s window
    waiting = threading.Event()

    class NotingWaits(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waiting.set()
            return super().wait(timeout)

    stop = NotingWaits()

    def ctrl_c_once_waiting() -> None:
        assert waiting.wait(30), "the request never waited to be sent again"
        stop.set()

    helper = InBackground(ctrl_c_once_waiting)
    client = load_test.Client(Config(images=images, url=tier.url, api=api, timeout=120), stop)
    try:
        outcome = finish_within(60, client.send, 0, images / "cat.jpg", time.monotonic(), watching=helper)
    finally:
        client.close()
    helper.finish()
    assert tier.paths[f"POST {'/' if api == 'form' else '/api/jobs'}"] == 1, tier.paths
    assert outcome.error.startswith("HTTP 503: not stored") and outcome.resent == 0, outcome


def test_after_a_stopping_web_tiers_answer_the_next_request_goes_on_a_new_connection(tier, tmp_path):
    """A stopping web tier closes each connection after its answer: reused, the connection
    could be closed under the next request, which would then fail unanswered."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    tier.not_stored = 2
    report = run_load(Config(images=images, url=tier.url, num_requests=1))
    assert report.outcomes[0].answered and report.outcomes[0].resent == 2
    assert len(tier.post_ports) == 3 and len(set(tier.post_ports)) == 3, tier.post_ports


def test_an_image_a_503_says_is_queued_is_answered_from_where_it_says(tier, tmp_path):
    """A web tier stopped with 20 POST / waiting: each gets a 503 saying its image is
    still queued and where its result will be, and none may count failed, as all 20
    are classified."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"queued:cat"})
    tier.queued_polls = 1
    report = run_load(Config(images=images, url=tier.url, num_requests=1))
    (outcome,) = report.outcomes
    assert outcome.answered and outcome.label == "cat" and outcome.via.startswith("/api/jobs/")
    assert outcome.resent == 0 and tier.paths["POST /"] == 1  # followed, not sent again
    assert re.search(r"answered later +1  \(a 503 or 504", load_test.format_report(report))
    assert report.to_dict()["requests"][0]["via"] == outcome.via
    assert report.to_dict()["answered_later"] == 1  # the table's row is in the JSON too
    # A script reading only the RESULT line sees it too (23 of 30 POST / may time out so).
    assert load_test.result_line(report) == (
        "RESULT: PASS (1 answered, none failed or wrong; 1 of them read from /api/jobs after a 503 or 504 "
        "said the image was queued)")


def test_the_result_line_says_what_was_read_later_when_the_csv_names_only_some_images(tier, tmp_path):
    """The line's branch for a partial CSV had left the answers read from /api/jobs out."""
    images = make_images(tmp_path / "images", {"cat.jpg": b"queued:cat", "dog.jpg": b"label:dog"})
    expected = tmp_path / "expected.csv"
    expected.write_text("Image,Results\ncat,cat\n")
    tier.queued_polls = 1
    report = run_load(Config(images=images, url=tier.url, expected=expected))
    assert report.answered_later == 1 and report.unchecked == 1 and report.correct == 1
    assert load_test.result_line(report) == (
        "RESULT: PASS (2 answered, none failed or wrong; 1 of them read from /api/jobs after a 503 or 504 "
        "said the image was queued; 1 not in the expected CSV, so unchecked)")


def test_a_page_that_holds_a_colon_is_not_an_answer(tier, tmp_path):
    """Pointed at the embedded AWS, the script must not count its XML, which holds
    "http:", as answered (and wrong) at 79 images/s."""
    images = make_images(tmp_path / "images", {"x.jpg": b"not-an-answer"})
    report = run_load(Config(images=images, url=tier.url, num_requests=1))
    (outcome,) = report.outcomes
    assert outcome.verdict == "failed" and outcome.error.startswith("not a classification answer"), outcome
    assert report.course_average_latency is None  # nothing answered: no latency to speak of
    # No figure, so no "the 1 failed included" beside it.
    assert re.search(r"\n  average latency \(course\) +-  \(duration / requests\)\n",
                     load_test.format_report(report))


def test_an_html_answer_is_not_a_classification_and_a_plain_one_is_read_as_utf8(tier, tmp_path):
    """A one-line page holding a colon was taken as '<name>:<label>' (wrong, not failed),
    and text/plain without a charset was read as ISO-8859-1, as requests does: '猫:tabby'
    became mojibake, an answer for another file (wrong)."""
    images = make_images(tmp_path / "images", {"猫.jpg": b"no-charset", "page.jpg": b"html-page"})
    outcomes = by_file(run_load(Config(images=images, url=tier.url)))
    cat, page = outcomes["猫.jpg"], outcomes["page.jpg"]
    assert (cat.verdict, cat.answer_name, cat.label) == ("unchecked", "猫", "cat"), cat
    assert page.verdict == "failed" and page.status == 200, page
    assert page.error == "not a classification answer: an HTML page (text/html; charset=utf-8)", page.error


def test_jobs_api_by_polling_with_api_key_and_untrained_model(tier, mixed):
    images, csv_path = mixed
    tier.api_key, tier.untrained, tier.queued_polls = "s3cret", True, 2
    config = Config(images=images, url=tier.url, api="jobs", wait="poll", api_key="s3cret", expected=csv_path)
    report = run_load(config)

    assert (report.sent, report.answered, report.failed) == (7, 7 - 1, 1)
    # The jobs API names the right file, so 'other' is judged on its label (cat: correct).
    assert (report.wrong, report.correct, report.unchecked) == (1, 4, 1)
    assert report.untrained
    assert by_file(report)["boom.jpg"].error.startswith("item failed")
    # Every job was polled until it left "queued": three GETs each.
    assert tier.paths["GET /api/jobs/<id>"] == 3 * 7
    text = load_test.format_report(report)
    assert load_test.UNTRAINED_WARNING in text
    assert "RESULT: FAIL (1 failed, 1 wrong)" in text


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_a_wrong_api_key_is_a_usage_error_before_anything_is_sent(tier, tmp_path, capsys, api):
    """If only whether a key is needed were asked, all N uploads would be sent, and each
    refused with 401."""
    tier.api_key = "s3cret"
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    code = load_test.main(["--url", tier.url, "--images", str(images), "--num-requests", "2", "--api", api,
                           "--api-key", "guess", "-q"])
    out, err = capsys.readouterr()
    assert code == 2 and "RESULT" not in out
    assert err.startswith(f"load_test.py: the API key was refused by {tier.url} "), err
    assert tier.paths["POST /"] == 0 and tier.paths["POST /api/jobs"] == 1  # the empty form that asked

    # A key no HTTP header can carry: said so, not a traceback.
    with pytest.raises(SystemExit) as usage:
        load_test.main(["--url", tier.url, "--images", str(images), "--api-key", "key\u00a0\u201cx\u201d"])
    assert usage.value.code == 2
    assert "holds a character an HTTP header cannot carry" in capsys.readouterr().err

    # One with spaces around it, as the web tier strips its own.
    assert load_test.parse_args(["--images", str(images), "--api-key", " s3cret\r"]).api_key == "s3cret"

    # The right key: the run goes on, its empty form's 400 taken for yes.
    assert load_test.main(["--url", tier.url, "--images", str(images), "--api-key", "s3cret", "-q"]) == 0
    assert tier.paths["POST /"] == 1


def test_the_web_tier_refuses_a_wrong_key_before_it_reads_the_form(make_web_app):
    """The key check sends an empty form: the real web tier must answer it 401 for a wrong
    key (not 400 for the missing files), and anything else for the right one."""
    from werkzeug.serving import make_server

    app = make_web_app(start_background=False, api_key="s3cret-key")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert load_test.api_key_refused(url, "guess")
        assert not load_test.api_key_refused(url, "s3cret-key")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_no_api_key_for_a_web_tier_that_requires_one_is_a_usage_error_before_anything_is_sent(
    tier, tmp_path, capsys, api
):
    """Every upload got a 401, and a quiet run printed only "RESULT: FAIL (2 failed, 0 wrong)"."""
    tier.api_key = "s3cret"
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    code = load_test.main(["--url", tier.url, "--images", str(images), "--num-requests", "2", "--api", api,
                           "-q"])
    out, err = capsys.readouterr()
    assert code == 2 and "RESULT" not in out
    assert err == (f"load_test.py: {tier.url} requires an API key (its /api/status says so): "
                   "give it with --api-key KEY or as $API_KEY\n")
    assert not [p for p in tier.paths if not p.startswith("GET /api/status")]  # no image sent


def test_a_web_tier_slow_to_give_its_first_status_is_still_asked_whether_it_needs_a_key(tier):
    """A fresh web tier's first /api/status waits up to FIRST_READ_WAIT_S (10 s) on AWS;
    the check gave up after 2 s and took the silence for "no key needed"."""
    from web_tier.status import FIRST_READ_WAIT_S

    tier.api_key = "s3cret"
    tier.status_gate = threading.Event()
    threading.Timer(3.0, tier.status_gate.set).start()  # answers after 3 s
    assert load_test.api_key_required(load_test.web_tier_status(tier.url))
    assert load_test.STATUS_CHECK_TIMEOUT_S > FIRST_READ_WAIT_S


def test_the_api_key_from_the_environment_is_enough(tier, tmp_path, capsys, monkeypatch):
    tier.api_key = "s3cret"
    monkeypatch.setenv("API_KEY", "s3cret")
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "-q"]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out


def test_a_quiet_run_says_each_distinct_reason_it_failed_with_its_count(tier, tmp_path, capsys):
    """With -q a run refused with 401s printed only "RESULT: FAIL (2 failed, 0 wrong)"."""
    tier.api_key = "s3cret"
    tier.status = "no status here"  # a web tier that does not say it needs a key: its uploads say so
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x", "b.jpg": b"label:y"})
    code = load_test.main(["--url", tier.url, "--images", str(images), "--num-requests", "2",
                           "--api-key", "guess", "-q"])
    assert code == 1
    assert capsys.readouterr().out == ("2 failed: HTTP 401: a valid API key is required\n"
                                       "RESULT: FAIL (2 failed, 0 wrong)\n")

    tier.api_key = ""
    images = make_images(tmp_path / "mixed", {"a.jpg": b"status:500", "b.jpg": b"status:500",
                                              "c.jpg": b"fail", "d.jpg": b"status:502", "e.jpg": b"label:e"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "-q"]) == 1
    assert capsys.readouterr().out == ("3 failed: HTTP 500: boom\n"
                                       "1 failed: HTTP 502: boom\n"
                                       "RESULT: FAIL (4 failed, 0 wrong)\n")


def test_a_quiet_run_lists_only_the_commonest_reasons(monkeypatch, capsys):
    outcomes = [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0) for i in range(12)]
    for o in outcomes:
        o.error, o.verdict = f"reason {o.index % 7}", "failed"
    report = load_test.Report(url="u", api="form", concurrency=1, planned=12, started_at=0.0,
                              duration_s=1.0, outcomes=outcomes)
    assert load_test.failure_lines(report, limit=3) == [
        "2 failed: reason 0", "2 failed: reason 1", "2 failed: reason 2",
        "... and 6 failed for 4 other reasons (see --json for each request)",
    ]


def test_requests_never_sent_are_not_counted_failed_too(tmp_path):
    """A server that dies after 10 answers, 40 requests at -c 4: 'sent 16 of 40,
    answered 12, failed 28' and 'FAIL (28 failed, 0 wrong, 24 not sent)'."""
    outcomes = [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0, reached=True, label="cat",
                                  answer_name=f"{i}") for i in range(12)]
    cut = "the connection closed before the answer came"
    outcomes += [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0, reached=True, error=cut)
                 for i in range(12, 16)]
    refused = "cannot connect to http://x: [Errno 111] Connection refused"
    outcomes += [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0, error=refused, resent=3)
                 for i in range(16, 38)]  # two more never started: interrupted
    for outcome in outcomes:
        load_test.judge(outcome, {})
    report = load_test.Report(url="http://x", api="form", concurrency=4, planned=40, started_at=0.0,
                              duration_s=1.0, outcomes=outcomes, interrupted_by="SIGINT")
    # Its plot says so too: an interrupted run's must not look like a whole one's.
    assert load_test.plot_title(report) == ("16 requests, concurrency 4, 12.00 images/s\n"
                                            "[interrupted: 24 not sent, 0 abandoned]")

    counts = (report.sent, report.answered, report.failed, report.not_sent, report.unreached)
    assert counts == (16, 12, 4, 24, 22)
    assert load_test.result_line(report) == "RESULT: FAIL (4 failed, 0 wrong, 24 not sent, interrupted)"
    table = load_test.format_report(report)
    assert re.search(r"\n  sent +16 of 40\n", table) and re.search(r"\n  failed +4  ", table)
    # Tried again, never sent: "sent again 22 requests, 66 times" would count tries of
    # requests that never reached the web tier.
    assert re.search(r"\n  not sent +24  \(22 never connected: refused or unreachable, tried again 66 times "
                     r"in all; 2 not started", table)
    assert "sent again" not in table and report.resent == 0
    assert f"  16.jpg: not sent: {refused}" in table
    assert load_test.failure_lines(report) == [f"4 failed: {cut}", f"22 not sent: {refused}"]
    data = report.to_dict()
    assert (data["planned"], data["sent"], data["not_sent"], data["answered"], data["failed"]) == (
        40, 16, 24, 12, 4)
    verdicts = Counter(r["verdict"] for r in data["requests"])
    assert verdicts == {"unchecked": 12, "failed": 4, "not sent": 22}
    assert data["sent"] + data["not_sent"] == data["planned"] and data["failed"] == verdicts["failed"]
    # The course's average is over the requests the web tier saw: the 22 never sent
    # would make a dead web tier look fast.
    assert report.course_average_latency == pytest.approx(1.0 / 16)

    # A web tier that came back is one restarting.
    outcomes[0].resent = 1
    assert re.search(r"\n  sent again +1 requests, 1 times in all  \(refused connections, 503 'not stored': "
                     r"a web tier restarting\)\n", load_test.format_report(report))


def test_a_quiet_run_names_the_file_of_each_wrong_answer(tier, mixed, capsys):
    """-q names the wrong images, not only "2 wrong"."""
    images, csv_path = mixed
    code = load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path), "-q"])
    assert code == 1
    lines = capsys.readouterr().out.splitlines()
    assert "fish.jpg: wrong: answered 'fish:fish', expected 'bird'" in lines
    assert "other.jpg: wrong: answered 'someone_else:cat', answer is for 'someone_else'" in lines

    outcomes = [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0, answer_name=str(i), label="dog",
                                  verdict="wrong", note="expected 'cat'") for i in range(4)]
    report = load_test.Report(url="u", api="form", concurrency=1, planned=4, started_at=0.0,
                              duration_s=1.0, outcomes=outcomes)
    assert load_test.failure_lines(report, limit=2) == [
        "0.jpg: wrong: answered '0:dog', expected 'cat'", "1.jpg: wrong: answered '1:dog', expected 'cat'",
        "... and 2 more wrong (see --json for each request)",
    ]


def test_jobs_api_following_server_sent_events(tier, mixed):
    images, csv_path = mixed
    tier.queued_polls = 10**6  # polling alone would never see an item finish
    config = Config(images=images, url=tier.url, api="jobs", wait="sse", expected=csv_path, timeout=10)
    report = run_load(config)

    assert (report.answered, report.failed, report.wrong) == (6, 1, 1)
    assert tier.paths["GET /api/jobs/<id>/events"] == 7


def test_event_streams_refused_with_503_fall_back_to_polling(tier, mixed):
    """Past its cap on open event streams the web tier answers 503, "poll GET
    /api/jobs/<id> instead": the items are fine and must not count as failed."""
    images, csv_path = mixed
    tier.events_busy, tier.queued_polls = True, 1
    config = Config(images=images, url=tier.url, api="jobs", wait="sse", expected=csv_path, timeout=10)
    report = run_load(config)

    assert (report.answered, report.failed, report.wrong) == (6, 1, 1)
    assert by_file(report)["boom.jpg"].error.startswith("item failed")
    assert tier.paths["GET /api/jobs/<id>/events"] == 7
    # Then each item was polled until it left "queued": two GETs each.
    assert tier.paths["GET /api/jobs/<id>"] == 2 * 7
    assert report.polled == 6
    assert re.search(r"\n  awaited by polling +6 of 6 answered  \(their latencies may be up to 1 s late: "
                     r"their event streams were refused or cut off\)\n", load_test.format_report(report))


def test_the_jobs_api_awaits_each_result_on_its_event_stream_by_default(tier, mixed, tmp_path, capsys):
    """Polling backs off to a poll a second, so a polled latency is up to 1 s late (p50
    2.63 s polled against 2.20 s by events, measured): the default follows the events."""
    images, csv_path = mixed
    tier.queued_polls = 10**6  # polling alone would never see an item finish
    json_path = tmp_path / "run.json"
    load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path), "--jobs",
                    "--timeout", "10", "--json", str(json_path)])
    assert tier.paths["GET /api/jobs/<id>/events"] == 7
    data = json.loads(json_path.read_text())
    assert (data["wait"], data["answered"], data["polled"]) == ("sse", 6, 0)
    assert {r["awaited"] for r in data["requests"]} == {"events"}
    assert "awaited by polling" not in capsys.readouterr().out


def test_results_awaited_by_polling_are_counted_and_said_to_be_late(tier, mixed, tmp_path, capsys):
    images, csv_path = mixed
    json_path = tmp_path / "run.json"
    load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path), "--jobs",
                    "--wait", "poll", "--json", str(json_path)])
    out = capsys.readouterr().out
    assert re.search(r"\n  awaited by polling +6 of 6 answered  \(their latencies may be up to 1 s late: "
                     r"--wait poll; the default, --wait sse, follows each result's events\)\n", out)
    data = json.loads(json_path.read_text())
    assert (data["wait"], data["polled"]) == ("poll", 6)
    assert {r["awaited"] for r in data["requests"]} == {"poll"}


ABANDONED_TWO = "RESULT: FAIL (0 failed, 0 wrong, 2 abandoned in flight, interrupted)"


@pytest.mark.parametrize(("second", "by"), [(KeyboardInterrupt, "SIGINT"), (load_test.Terminated, "SIGTERM")])
def test_a_second_ctrl_c_stops_waiting_for_the_requests_in_flight(tier, tmp_path, capsys, second, by):
    # 0 and 1 never answer while the test runs; 2 and 3 answer together once both
    # are in flight, so after 0 and 1 were sent (the plan goes in name order).
    # Each answer is taken as a Ctrl-C: the first stops sending, the second (or a
    # SIGTERM, which then made the run quit) quits.
    tier.barrier = threading.Barrier(2, timeout=30)
    images = make_images(
        tmp_path / "images", {"0.jpg": b"hang", "1.jpg": b"hang", "2.jpg": b"barrier", "3.jpg": b"barrier"}
    )

    interrupts = iter([KeyboardInterrupt, second])

    def ctrl_c(outcome: load_test.Outcome) -> None:
        raise next(interrupts)

    config = Config(images=images, url=tier.url, concurrency=4, timeout=30)
    report = finish_within(15, run_load, config, on_result=ctrl_c)

    assert report.interrupted and not report.ok
    verdicts = {o.file: o.verdict for o in report.outcomes}
    assert verdicts == {"0.jpg": "abandoned", "1.jpg": "abandoned",
                        "2.jpg": "unchecked", "3.jpg": "unchecked"}
    assert report.answered == 2 and report.abandoned == 2 and report.sent == 4  # the abandoned were sent too
    assert report.interrupted_by == by and report.to_dict()["interrupted_by"] == by
    assert load_test.result_line(report) == ABANDONED_TWO
    # Said so whatever made the run quit: "at the second Ctrl-C" is wrong after a SIGTERM.
    assert re.search(r"\n  abandoned +2  \(in flight when the run quit\)\n", load_test.format_report(report))
    err = capsys.readouterr().err
    assert "(Ctrl-C again to quit)" in err and "2 requests in flight left unanswered" in err


@pytest.mark.parametrize("found", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_a_second_ctrl_c_quits_the_command_at_once(tier, tmp_path, found):
    """Nothing may keep the process alive for the abandoned requests (a
    ThreadPoolExecutor's threads are joined at exit): checked on a real process.
    Started with SIGINT ignored, as a script's background job is (`load_test.py ... &`),
    `kill -INT` must still stop it."""
    images = make_images(tmp_path / "images", {"0.jpg": b"hang", "1.jpg": b"hang"})
    command = [sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
               "-c", "2", "--timeout", "60", "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, found))
    try:
        errors: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=lambda: [errors.put(line) for line in proc.stderr], daemon=True).start()
        wait_until(lambda: tier.paths["POST /"] == 2, timeout=10)
        proc.send_signal(signal.SIGINT)
        while "Ctrl-C again to quit" not in errors.get(timeout=30):
            pass
        proc.send_signal(signal.SIGINT)
        # "At once" is shown by the code and the output (the abandoned left unanswered), not
        # the time: the deadline only bounds a failure, on a loaded machine too.
        assert proc.wait(timeout=30) == 130  # as a shell says of a command Ctrl-C ended (it said 1)
        assert proc.stdout.read().strip() == ABANDONED_TWO
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_an_interrupt_while_it_reads_its_inputs_is_heard(tier, tmp_path):
    """Handlers set only once the folder and the CSV are read would let a `kill -INT` in
    those seconds, on a busy machine, started in the background (SIGINT ignored), do
    nothing, and the run go on to its end. Here the CSV is a FIFO that nobody writes:
    the command waits reading it."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    expected = tmp_path / "expected.csv"
    os.mkfifo(expected)
    command = [sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
               "--expected", str(expected), "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    writer = None
    try:
        def reading() -> bool:  # the FIFO opened by the command: a writer may open it too
            nonlocal writer
            try:
                writer = os.open(expected, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return False
            return True

        wait_until(reading, timeout=30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert "interrupted before any request was sent" in proc.stderr.read()
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("talk", ["--verbose", "--quiet", None])
def test_a_closed_stdout_stops_the_printing_not_the_run(tier, tmp_path, talk):
    """`load_test.py -v --json out.json | head -3` must not end in a BrokenPipeError
    traceback, sending stopped, exit 1 and no JSON."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"hang", "2.jpg": b"label:c"})
    report = tmp_path / "out.json"
    command = [sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
               "-c", "1", "--json", str(report), *([talk] if talk else [])]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if talk == "--verbose":
            # Read what 0.jpg printed, then leave, as `head` does, while 1.jpg is held.
            assert proc.stdout.readline() == "0.jpg uploaded!\n"
            wait_until(lambda: tier.paths["POST /"] == 2, timeout=10)
        proc.stdout.close()
        tier.release.set()  # 1.jpg answers: its lines, and the table, go to no reader
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    data = json.loads(report.read_text())
    assert (data["sent"], data["answered"], data["ok"]) == (3, 3, True)
    assert tier.paths["POST /"] == 3


@pytest.mark.parametrize("talk", ["--verbose", None])
def test_a_closed_stderr_stops_the_messages_not_the_run(tier, tmp_path, talk):
    """`load_test.py ... --json r.json 2>&1 | head -2`: the progress bar's write to the
    closed stderr must not raise a BrokenPipeError on the main thread, stopping sending,
    exit 1 and no JSON. Here stderr is closed before anything is written to it: the entry
    left out is said there first, then the progress lines."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"label:b", "2.jpg": b"label:c",
                                               "notes.txt": b"not an image"})
    report = tmp_path / "out.json"
    command = [sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
               "-c", "1", "--json", str(report), *([talk] if talk else [])]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stderr.close()
        out = proc.stdout.read()
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == 0, out
    assert "RESULT: PASS (3 answered, none failed or wrong)" in out
    data = json.loads(report.read_text())
    assert (data["sent"], data["answered"], data["ok"]) == (3, 3, True)


def test_a_full_disk_under_stderr_stops_the_messages_not_the_report(tier, tmp_path):
    """`2> /dev/full`: each message and progress line fails to be written."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"label:b",
                                               "notes.txt": b"not an image"})
    report = tmp_path / "out.json"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
                               "--json", str(report)], stdout=subprocess.PIPE, stderr=full, text=True,
                              timeout=60)
    assert done.returncode == 0, done.stdout
    assert json.loads(report.read_text())["answered"] == 2


def test_one_cause_is_one_reason_whatever_batch_each_request_named():
    """Each --jobs error names its batch: a quiet run must not list one cause as "51
    other reasons"."""
    outcomes = [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0, reached=True,
                                  error=f"GET /api/jobs/{i:032x}: cannot connect; every connection refused")
                for i in range(8)]
    for outcome in outcomes:
        load_test.judge(outcome, {})
    report = load_test.Report(url="http://x", api="jobs", concurrency=8, planned=8, started_at=0.0,
                              duration_s=1.0, outcomes=outcomes)
    assert load_test.failure_lines(report) == [
        "8 failed: GET /api/jobs/<batch>: cannot connect; every connection refused"]


def test_a_full_disk_under_stdout_stops_the_printing_not_the_report(tier, tmp_path):
    """`> /dev/full` must not end the run in an OSError traceback, and no JSON."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"label:b"})
    report = tmp_path / "out.json"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
                               "--json", str(report), "-v"], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(report.read_text())["answered"] == 2


@pytest.mark.parametrize(("interrupt", "code"), [(KeyboardInterrupt, 130), (load_test.Terminated, 143)])
def test_an_interrupt_before_the_first_request_is_one_line(tier, tmp_path, monkeypatch, capsys, interrupt,
                                                           code):
    """Ctrl-C or SIGTERM during the checks before sending (up to 22 s against a web tier
    that does not answer) gives no raw traceback; it exits as a shell says of a command
    that signal ended."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a"})

    def interrupted(_url, *_args, **_kwargs):
        raise interrupt

    monkeypatch.setattr(load_test, "check_reachable", interrupted)
    assert load_test.main(["--url", tier.url, "--images", str(images)]) == code
    assert "interrupted before any request was sent" in capsys.readouterr().err


def test_sigterm_reports_what_was_done_at_once(tier, tmp_path):
    """`timeout 4 load_test.py ... --json t.json` unhandled would exit 124 with no output
    and no JSON. It waits for no request in flight: a process manager's SIGKILL may
    follow within seconds."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"hang", "2.jpg": b"label:c"})
    report = tmp_path / "t.json"
    command = [sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
               "-c", "1", "--json", str(report), "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        errors: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=lambda: [errors.put(line) for line in proc.stderr], daemon=True).start()
        wait_until(lambda: tier.paths["POST /"] == 2, timeout=10)  # 1.jpg is held in flight
        proc.send_signal(signal.SIGTERM)
        while "quitting: 1 requests in flight left unanswered" not in errors.get(timeout=30):
            pass
        assert proc.wait(timeout=10) == 143  # as a shell says of a command SIGTERM ended (it said 1)
        assert proc.stdout.read().strip() == (
            "RESULT: FAIL (0 failed, 0 wrong, 1 abandoned in flight, 1 not sent, interrupted)")
        tier.release.set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    data = json.loads(report.read_text())
    assert (data["planned"], data["sent"], data["answered"], data["abandoned"], data["interrupted"]) == (
        3, 2, 1, 1, True)
    assert data["interrupted_by"] == "SIGTERM"
    # Each planned request once, the abandoned and the never started included.
    assert [(r["index"], r["file"], r["verdict"]) for r in data["requests"]] == [
        (0, "0.jpg", "unchecked"), (1, "1.jpg", "abandoned"), (2, "2.jpg", "not started")]


def test_a_signal_while_the_quitting_runs_report_is_made_loses_none_of_it(tier, tmp_path, monkeypatch,
                                                                          capsys):
    """A third Ctrl-C, or a SIGTERM just after the second, while the outcomes of the
    requests left were made (seconds, for a plan of millions) lost the whole report:
    "its report may be missing", no table, no JSON."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"hang", "2.jpg": b"label:c"})
    report = tmp_path / "t.json"
    main = threading.get_ident()
    real_unfinished = load_test.unfinished_outcomes

    def terminated_meanwhile(*args, **kwargs):
        signal.pthread_kill(main, signal.SIGTERM)  # this thread's: heard at once
        return real_unfinished(*args, **kwargs)

    monkeypatch.setattr(load_test, "unfinished_outcomes", terminated_meanwhile)

    def sigterm_once_held() -> None:
        wait_until(lambda: tier.paths["POST /"] == 2, timeout=20)  # 1.jpg is held in flight
        signal.pthread_kill(main, signal.SIGTERM)

    helper = InBackground(sigterm_once_held)
    code = load_test.main(["--url", tier.url, "--images", str(images), "-c", "1", "--json", str(report),
                           "-q"])
    helper.finish()
    out, err = capsys.readouterr()
    assert code == 143, err
    assert "may be missing" not in err and "Traceback" not in err, err
    assert out.strip().endswith(
        "RESULT: FAIL (0 failed, 0 wrong, 1 abandoned in flight, 1 not sent, interrupted)"), out
    data = json.loads(report.read_text())
    assert (data["planned"], data["sent"], data["abandoned"], data["interrupted_by"]) == (3, 2, 1, "SIGTERM")


def test_an_interrupt_after_the_last_answer_still_reports_and_writes(tier, tmp_path, monkeypatch, capsys):
    """A SIGTERM just after the last answer, while the run takes its last /api/status
    sample (here one that takes seconds), must not come out of the run as one before any
    request: "interrupted before any request was sent", no JSON, no plot. It cuts that
    sample short, not the report."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"label:b"})
    report, plot = tmp_path / "t.json", tmp_path / "t.png"
    gate, main = threading.Event(), threading.main_thread()
    real_sample = load_test.StatusPoller.sample
    sampling = threading.Lock()
    last_sample = {"over": False}
    helpers: list[InBackground] = []

    def terminate_once_held() -> None:
        wait_until(lambda: tier.status_held, timeout=10)
        with sampling:  # never once main() is over: its handler gone, SIGTERM would end pytest
            if not last_sample["over"]:
                signal.pthread_kill(main.ident, signal.SIGTERM)  # to the thread waiting for the answer

    def last_sample_held(poller) -> None:
        # Only stop() samples in the main thread, once every request is over. Its read
        # is held 5 s (the run gives up at 2), and the SIGTERM comes while it waits.
        if threading.current_thread() is not main:
            real_sample(poller)
            return
        tier.status_gate = gate
        helpers.append(InBackground(terminate_once_held))
        try:
            real_sample(poller)
        finally:
            with sampling:
                last_sample["over"] = True

    monkeypatch.setattr(load_test.StatusPoller, "sample", last_sample_held)
    try:
        code = load_test.main(["--url", tier.url, "--images", str(images), "-c", "1", "--json", str(report),
                               "--plot", str(plot), "-q"])
    finally:
        gate.set()
    out, err = capsys.readouterr()
    assert tier.status_held == 1
    helpers[0].finish()
    assert code == 143, err
    assert "before any request" not in err and "Traceback" not in err, err
    assert ("SIGTERM once every request was over: the report is whole (its last /api/status sample skipped)"
            in err)
    assert "RESULT: PASS" in out  # every request was answered: the run itself was whole
    data = json.loads(report.read_text())
    assert (data["sent"], data["answered"], data["interrupted"], data["ok"]) == (2, 2, False, True)
    assert plot.read_bytes().startswith(b"\x89PNG")  # the interrupt came before it was begun


def test_an_interrupt_while_the_report_is_written_finishes_it(tier, tmp_path, monkeypatch, capsys):
    """A SIGTERM while the summary or the JSON is written is noted, not raised: the JSON
    is whole, and the command exits as SIGTERM says. Raised, it would lose the report,
    and the command say "interrupted before any request was sent"."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"label:b"})
    report = tmp_path / "t.json"
    real_write_json = load_test.write_json

    def terminated_meanwhile(*args) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        real_write_json(*args)

    monkeypatch.setattr(load_test, "write_json", terminated_meanwhile)
    assert load_test.main(["--url", tier.url, "--images", str(images), "--json", str(report), "-q"]) == 143
    out, err = capsys.readouterr()
    assert out.strip() == "RESULT: PASS (2 answered, none failed or wrong)"
    assert "before any request" not in err
    assert "SIGTERM once every request was over: the report is whole\n" in err
    data = json.loads(report.read_text())
    assert (data["answered"], data["interrupted"], data["ok"]) == (2, False, True)


def test_an_interrupt_while_the_plot_is_drawn_cuts_only_the_plot_short(tier, tmp_path, monkeypatch, capsys):
    """The plot takes seconds (matplotlib): a Ctrl-C then skips it, leaving no half-written
    file at its path, once the summary and the JSON are out."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a"})
    report, plot = tmp_path / "t.json", tmp_path / "t.png"

    def interrupted_midway(_report, path) -> None:
        path.write_bytes(b"\x89PNG half")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # heard before this ends

    monkeypatch.setattr(load_test, "write_plot", interrupted_midway)
    assert load_test.main(["--url", tier.url, "--images", str(images), "--json", str(report),
                           "--plot", str(plot), "-q"]) == 130
    err = capsys.readouterr().err
    assert "before any request" not in err
    assert f"the plot was not written to {plot}: interrupted (SIGINT)" in err
    assert json.loads(report.read_text())["answered"] == 1
    assert not plot.exists()


def test_an_interrupt_once_sending_began_is_not_said_to_come_before_it(tier, tmp_path, monkeypatch, capsys):
    """Whatever an interrupt escaping the run cut short, it did not come "before any request
    was sent" once requests were."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a"})

    def interrupted(_client) -> None:
        raise load_test.Terminated

    monkeypatch.setattr(load_test.Client, "close", interrupted)
    assert load_test.main(["--url", tier.url, "--images", str(images), "-q"]) == 143
    err = capsys.readouterr().err
    assert "before any request" not in err
    assert "interrupted as the run ended: its report may be missing or incomplete" in err


def test_the_command_hears_sigint_while_it_runs_and_gives_back_the_handlers_it_found(
        tier, tmp_path, monkeypatch):
    def mine(signum, frame) -> None:
        pass

    heard = []
    real_run_load = load_test.run_load

    def noting_the_handlers(*args, **kwargs):
        heard.append(signal.getsignal(signal.SIGINT))
        return real_run_load(*args, **kwargs)

    monkeypatch.setattr(load_test, "run_load", noting_the_handlers)
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    before = signal.signal(signal.SIGTERM, mine), signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert load_test.main(["--url", tier.url, "--images", str(images), "-q"]) == 0
        # Ignored, as a background job's: heard while the run goes on, ignored again after.
        assert heard == [signal.default_int_handler]
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_a_ctrl_c_the_kernel_hands_to_another_thread_still_stops_the_wait():
    """SIGINT goes to any thread of the process; one handed to a sending thread must
    still reach the main thread waiting for outcomes, not when a request ends."""
    in_send, release, sent = threading.Event(), threading.Event(), threading.Event()

    class Slow:
        def send(self, index, path, t0):
            in_send.set()
            release.wait(20)
            sent.set()
            return load_test.Outcome(index=index, file=path.name, started_s=0.0)

    senders = load_test.Senders(Slow(), [Path("a.jpg")], 1, threading.Event())
    senders.start(time.monotonic())

    main = threading.get_ident()

    def waiting_for_results() -> bool:
        frame = sys._current_frames()[main]
        while frame is not None and frame.f_code.co_name != "results_from":
            frame = frame.f_back
        return frame is not None

    # The run's own wait for outcomes (LoadRun._record_all, its timeout its own), on a
    # run reduced to what that loop reads.
    run = SimpleNamespace(senders=senders, outcomes=[], _record=lambda outcome, notify: None,
                          _out_of_time=lambda: False)

    def interrupt_from_another_thread():
        in_send.wait(10)
        wait_until(waiting_for_results)  # once the main thread waits for outcomes
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds it
    try:
        with pytest.raises(KeyboardInterrupt):
            helper = InBackground(interrupt_from_another_thread)
            load_test.LoadRun._record_all(run)  # ends when the request does, at the latest
        assert not sent.is_set(), "heard only once the request ended"
        helper.finish()
    finally:
        signal.signal(signal.SIGINT, ignored)
        release.set()


def test_a_senders_bug_is_raised_while_waiting_and_left_out_when_quitting():
    """A sender thread's exception must not stay among the outcomes: every later read
    would raise it, and after a second Ctrl-C the report be lost with it."""

    class Buggy:
        def send(self, index, path, t0):
            if index == 1:
                raise RuntimeError("a bug in send")
            return load_test.Outcome(index=index, file=path.name, started_s=0.0)

    senders = load_test.Senders(Buggy(), [Path(f"{n}.jpg") for n in range(3)], 2, threading.Event())
    senders.start(time.monotonic())
    # All three in, the bug's too: the two outcomes alone could come first on a loaded
    # machine, the thread that raised not yet scheduled to say so.
    wait_until(lambda: len(senders.results_from(0, raising=False)) == 2 and senders.in_flight() == 0)
    with pytest.raises(RuntimeError, match="a bug in send"):
        senders.results_from(0, timeout_s=0.2)
    assert [o.index for o in senders.results_from(0, raising=False)] == [0, 2]


def test_a_ctrl_c_between_an_outcome_in_and_its_recording_loses_nothing(tier, tmp_path, monkeypatch):
    """An outcome taken from its queue and not yet counted when the Ctrl-C comes must not
    be lost: the wait for the requests in flight would never end (3 runs in 6 hung), or
    the request count abandoned though answered. Here the Ctrl-C comes as the first
    outcome is judged, before it is recorded."""
    images = make_images(tmp_path / "images", {f"{n}.jpg": b"label:x" for n in range(3)})
    real_judge, judged = load_test.judge, []

    def judge_interrupted_once(outcome: load_test.Outcome, expected: dict) -> None:
        judged.append(outcome.file)
        if len(judged) == 1:
            raise KeyboardInterrupt
        real_judge(outcome, expected)

    monkeypatch.setattr(load_test, "judge", judge_interrupted_once)
    report = finish_within(10, run_load, Config(images=images, url=tier.url, concurrency=1))
    assert report.interrupted and report.abandoned == 0
    verdicts = {o.file: o.verdict for o in report.outcomes}
    assert len(report.outcomes) == 3 and verdicts["0.jpg"] == "unchecked"  # answered, and recorded once
    # Those after it: answered if in flight when the Ctrl-C came, else never started.
    assert {verdicts["1.jpg"], verdicts["2.jpg"]} <= {"unchecked", "not started"}


def test_the_run_is_timed_from_its_first_request_not_from_a_slow_status_check(tier, tmp_path, monkeypatch):
    # Once the run's check of /api/status is in, /api/status answers only once the first
    # result is: a sample (which gives up after 2 s) taken before the first request would
    # hold it back. When each read of /api/status ended, and the run's clock started (t0):
    checked, sampled, clock = [], [], []
    real_check, real_sample = load_test.web_tier_status, load_test.StatusPoller.sample
    real_start = load_test.StatusPoller.start

    def check(url: str) -> dict | None:
        status = real_check(url)
        checked.append(time.monotonic())
        tier.status_gate = threading.Event()
        return status

    def sample(poller) -> None:
        real_sample(poller)
        sampled.append(time.monotonic())

    def start(poller, t0: float) -> None:
        clock.append(t0)
        real_start(poller, t0)

    monkeypatch.setattr(load_test, "web_tier_status", check)
    monkeypatch.setattr(load_test.StatusPoller, "sample", sample)
    monkeypatch.setattr(load_test.StatusPoller, "start", start)
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    report = run_load(Config(images=images, url=tier.url), on_result=lambda outcome: tier.status_gate.set())

    assert report.ok
    (t0,), first_sent = clock, clock[0] + report.outcomes[0].started_s
    # The clock starts after the check, and no sample came between it and the first request.
    assert checked[0] <= t0 <= first_sent < min(sampled), (checked, t0, first_sent, sampled)
    assert report.peak_instances == 3  # the instances were still sampled


def test_progress_keeps_running_counts_rather_than_counting_all_results_again(tier, mixed, monkeypatch):
    # Counts how often any outcome's verdict is read while the run goes on.
    reads = Counter()

    class CountedOutcome(load_test.Outcome):
        def __getattribute__(self, name: str):
            if name == "verdict":
                reads[name] += 1
            return super().__getattribute__(name)

    monkeypatch.setattr(load_test, "Outcome", CountedOutcome)
    updates: list[tuple[int, int, int]] = []

    class Recorder(load_test.Progress):
        def update(self, done: int, failed: int, wrong: int, not_sent: int = 0) -> None:
            updates.append((done, failed, wrong))

    images, csv_path = mixed
    n = 20 * len(MIXED)
    config = Config(images=images, url=tier.url, num_requests=n, concurrency=8, expected=csv_path)
    # Disabled, as with -q: the counts were worked out all the same.
    report = run_load(config, progress=Recorder(n, stream=io.StringIO(), enabled=False))

    assert (report.failed, report.wrong) == (20, 40)
    assert [u[0] for u in updates] == list(range(1, n + 1))
    assert updates[-1] == (n, 20, 40)
    assert all(a[1] <= b[1] and a[2] <= b[2] for a, b in zip(updates, updates[1:], strict=False))
    # A few reads per result, not one per earlier result too (that was ~n*n).
    assert reads["verdict"] < 5 * n


NAMES_THE_WEB_TIER_RESPELLS = {
    "back\\slash.jpg": "backslash",  # Werkzeug: a backslash escapes the next character
    "tab\there.jpg": "tab here",  # the web tier: control characters become spaces
    "new\nline.jpg": "new%0Aline",  # requests sends LF as %0A, which stays
    'quo"te.jpg': 'quo"te',
    "caf\u00e9.jpg": "caf\u00e9",
}


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_names_the_web_tier_respells_are_still_the_right_answer(tier, tmp_path, api):
    tier.web_tier_names = True
    contents = {name: f"label:{n}".encode() for n, name in enumerate(NAMES_THE_WEB_TIER_RESPELLS)}
    images = make_images(tmp_path / "images", {**contents, "other.jpg": b"mismatch"})
    report = run_load(Config(images=images, url=tier.url, api=api, timeout=10))

    outcomes = by_file(report)
    assert report.failed == 0
    for name, answered in NAMES_THE_WEB_TIER_RESPELLS.items():
        assert outcomes[name].answer_name == answered  # the fake really respelled it
        assert outcomes[name].verdict == "unchecked", (name, outcomes[name].note)
    # An answer naming another file is still wrong (the jobs fake never sends one).
    assert outcomes["other.jpg"].verdict == ("wrong" if api == "form" else "unchecked")


def test_a_refused_upload_says_why_not_the_raw_json(tier, tmp_path):
    images = make_images(tmp_path / "images", {"bad.jpg": b"refuse"})
    report = run_load(Config(images=images, url=tier.url, api="jobs", timeout=10))
    assert by_file(report)["bad.jpg"].error == "HTTP 415: bad.jpg: damaged or unreadable image"


def test_jobs_failures_name_their_file_as_post_ones_do(tier, tmp_path):
    """POST / words its errors '<file>: <reason>'; --jobs says the file too."""
    images = make_images(tmp_path / "images", {"boom.jpg": b"fail"})
    (outcome,) = run_load(Config(images=images, url=tier.url, api="jobs", timeout=10)).outcomes
    assert outcome.error == "item failed: boom.jpg: worker failed"


def test_a_web_tier_restarting_while_a_job_is_polled_fails_nothing(tier, tmp_path):
    """The item was accepted (202) and is kept in S3: a refused or cut-off GET, or a
    503, while the web tier restarts is no answer yet, not a failed request."""
    images = make_images(tmp_path / "images", {"kept.jpg": b"label:7"})
    tier.failing_polls = ["drop", "503", "502"]
    report = run_load(Config(images=images, url=tier.url, api="jobs", wait="poll", timeout=20))
    assert report.failed == 0 and by_file(report)["kept.jpg"].label == "7"
    assert tier.failing_polls == []
    tier.failing_polls = ["drop", "503"]  # the stream's first look at the item, then a poll
    report = run_load(Config(images=images, url=tier.url, api="jobs", wait="sse", timeout=20))
    assert report.failed == 0 and tier.failing_polls == []
    for status in ("404", "500"):  # no such batch, a bug: those are answers
        tier.failing_polls = [status]
        report = run_load(Config(images=images, url=tier.url, api="jobs", wait="poll", timeout=20))
        assert report.failed == 1 and f"HTTP {status}" in by_file(report)["kept.jpg"].error


@pytest.mark.parametrize("wait", ["poll", "sse"])
def test_a_batch_the_server_no_longer_knows_says_the_servers_reason(tier, tmp_path, wait):
    """After the whole stack restarted (the embedded AWS lost everything) the failure
    said only "HTTP 404": it now says what the server said, as other HTTP failures do."""
    images = make_images(tmp_path / "images", {"kept.jpg": b"label:7"})
    tier.lost = True
    report = run_load(Config(images=images, url=tier.url, api="jobs", wait=wait, timeout=10))
    [batch_id] = tier.jobs
    path = f"/api/jobs/{batch_id}" + ("/events" if wait == "sse" else "")
    assert by_file(report)["kept.jpg"].error == f"GET {path}: HTTP 404: no such batch: {batch_id}"
    assert by_file(report)["kept.jpg"].status == 404


# --- command line, JSON, plot ---------------------------------------------------------


def test_alias_options_parse_the_same(tmp_path):
    canonical = load_test.parse_args(
        ["--images", str(tmp_path), "--num-requests", "5", "--concurrency", "3"]
    )
    course = load_test.parse_args(["--image_folder", str(tmp_path), "--num_request", "5", "-c", "3"])
    assert canonical == course
    # -n beside -c: without it a newcomer is tripped up.
    assert load_test.parse_args(["--images", str(tmp_path), "-n", "5", "-c", "3"]) == canonical
    assert canonical.num_requests == 5 and canonical.images == tmp_path and canonical.concurrency == 3
    assert canonical.url == "http://127.0.0.1:8000" and canonical.api == "form"
    assert load_test.parse_args(["--images", ".", "--jobs"]).api == "jobs"
    assert load_test.parse_args(["--images", ".", "--api", "jobs", "--api-key", "k"]).api_key == "k"
    # Polling backs off to 1 s between polls, each latency up to that late: events by default.
    assert load_test.parse_args(["--images", ".", "--jobs"]).wait == "sse"
    assert load_test.parse_args(["--images", ".", "--jobs", "--wait", "poll"]).wait == "poll"


@pytest.mark.parametrize("argv", [["--num-requests", "0"], ["--url", "ftp://x"], ["--api", "soap"], [],
                                  ["--wait", "sse"],  # POST / has nothing to wait for: was ignored
                                  ["--num-requests=--"], ["--url=--"],  # else a TypeError later
                                  # Past what a socket's timeout holds: every request failed sent.
                                  ["--timeout", "inf"], ["--timeout", "1e10"], ["--timeout", "nan"],
                                  ["--timeout", "0"]])
def test_bad_options_are_refused(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        load_test.parse_args(["--images", str(tmp_path), *argv] if argv else argv)
    assert exc.value.code == 2


def test_json_and_plot_to_one_file_are_refused(tmp_path, capsys, monkeypatch):
    """The plot must not be written over the JSON report."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        # One path written two ways: the same file all the same.
        load_test.parse_args(["--images", str(tmp_path), "--json", "run.png",
                              "--plot", str(tmp_path / "run.png")])
    assert exc.value.code == 2
    assert "--json and --plot name the same file (run.png)" in capsys.readouterr().err


@pytest.mark.parametrize("api", [["--jobs"], ["--api", "jobs"]])
def test_idempotency_keys_with_the_jobs_api_are_refused_saying_why(tmp_path, capsys, api):
    """Accepted, they changed nothing: a batch names itself and its token instead."""
    with pytest.raises(SystemExit) as exc:
        load_test.parse_args(["--images", str(tmp_path), *api, "--idempotency-keys"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--idempotency-keys applies to POST / (--api jobs names each upload's batch" in err


def test_json_report_holds_the_right_numbers(tier, mixed, tmp_path, capsys):
    images, csv_path = mixed
    out = tmp_path / "report.json"
    code = load_test.main(
        ["--url", tier.url, "--images", str(images), "--expected", str(csv_path),
         "--num_request", "14", "--json", str(out), "--quiet"]
    )
    assert code == 1
    assert capsys.readouterr().out.strip() == (
        "2 failed: HTTP 500: boom\n"
        "fish.jpg: wrong: answered 'fish:fish', expected 'bird'\n"
        "other.jpg: wrong: answered 'someone_else:cat', answer is for 'someone_else'\n"
        "fish.jpg: wrong: answered 'fish:fish', expected 'bird'\n"
        "other.jpg: wrong: answered 'someone_else:cat', answer is for 'someone_else'\n"
        "RESULT: FAIL (2 failed, 4 wrong)")

    data = json.loads(out.read_text())
    assert (data["sent"], data["answered"], data["failed"], data["wrong"]) == (14, 12, 2, 4)
    assert (data["correct"], data["unchecked"], data["ok"]) == (6, 2, False)
    assert len(data["requests"]) == 14
    assert Counter(r["verdict"] for r in data["requests"]) == {
        "correct": 6, "wrong": 4, "failed": 2, "unchecked": 2
    }
    answered = sorted(r["latency_s"] for r in data["requests"] if r["error"] is None)
    assert data["latency_s"]["max"] == answered[-1]
    assert data["latency_s"]["p50"] == pytest.approx(percentile(answered, 50))
    assert data["course_average_latency_s"] == pytest.approx(data["duration_s"] / 14)
    # /api/status is read at the start and the end at least; pending + running = 3.
    assert len(data["instances"]) >= 2
    assert {s["pending_running"] for s in data["instances"]} == {3}
    assert data["peak_instances"] == data["instances_at_start"] == 3


def test_plot_writes_a_png(tier, mixed, tmp_path):
    images, csv_path = mixed
    png = tmp_path / "run.png"
    load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path),
                    "--plot", str(png), "--quiet"])
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_a_plot_path_without_a_suffix_is_written_where_asked(tier, mixed, tmp_path):
    images, _ = mixed
    load_test.main(["--url", tier.url, "--images", str(images), "--plot", str(tmp_path / "run"), "--quiet"])
    assert (tmp_path / "run").read_bytes().startswith(b"\x89PNG") and not (tmp_path / "run.png").exists()


def test_the_plots_legend_keeps_off_the_points(tier, mixed, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    save = Figure.savefig

    def keep_and_save(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_and_save)
    images, csv_path = mixed
    load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path),
                    "--plot", str(tmp_path / "run.png"), "--quiet"])
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(drawn[0])
    canvas.draw()  # lays the figure out as it was saved
    renderer = canvas.get_renderer()
    latency = drawn[0].axes[0]
    legend = latency.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(latency.get_window_extent(renderer))


@pytest.mark.parametrize(
    "option, name, problem",
    [
        ("--json", "missing/run.json", "folder"),
        ("--plot", "missing/run.png", "folder"),
        ("--json", ".", "is a folder"),
        ("--plot", "run.pnx", "cannot write .pnx files"),
    ],
)
def test_a_report_path_that_cannot_be_written_is_refused_before_anything_is_sent(
    tier, tmp_path, capsys, option, name, problem
):
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    path = tmp_path / name
    with pytest.raises(SystemExit) as exc:
        load_test.main(["--url", tier.url, "--images", str(images), option, str(path), "--quiet"])

    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{option} {path}: " in err and problem in err
    assert not tier.paths  # nothing sent, not even a status check


def test_an_existing_writable_report_file_needs_no_writable_folder(tmp_path, monkeypatch):
    """`--json /dev/stdout` as a user who cannot write /dev was refused: "folder /dev is
    not writable". A file that exists is written in place; only a new one needs its folder."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    folder = tmp_path / "locked"
    folder.mkdir()
    existing = folder / "run.json"
    existing.write_text("")
    real_access = os.access
    # As a user who may not write the folder (the tests may run as root, who may).
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs:
                        Path(path) != folder and real_access(path, mode, **kwargs))
    config = load_test.parse_args(["--images", str(images), "--json", str(existing)])
    assert config.json_path == existing
    with pytest.raises(SystemExit) as exc:
        load_test.parse_args(["--images", str(images), "--json", str(folder / "new.json")])
    assert exc.value.code == 2


def test_a_plot_without_matplotlib_is_refused_before_anything_is_sent(tier, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None: import fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    with pytest.raises(SystemExit) as exc:
        load_test.main(["--url", tier.url, "--images", str(images), "--plot", str(tmp_path / "run.png")])

    assert exc.value.code == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not tier.paths


def test_a_report_that_cannot_be_written_after_the_run_is_a_clear_error(tier, tmp_path, capsys, monkeypatch):
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    folder = tmp_path / "reports"
    folder.mkdir()
    real_run_load = load_test.run_load

    def run_then_remove_the_folder(*args, **kwargs):
        report = real_run_load(*args, **kwargs)
        folder.rmdir()  # as if removed while the run went on
        return report

    monkeypatch.setattr(load_test, "run_load", run_then_remove_the_folder)
    code = load_test.main(["--url", tier.url, "--images", str(images), "--json", str(folder / "run.json")])

    out, err = capsys.readouterr()
    assert code == 1
    assert "latency p50" in out and "RESULT: PASS" in out  # the summary was printed all the same
    assert f"cannot write the JSON report to {folder / 'run.json'}: No such file or directory" in err


def test_verbose_prints_the_course_lines(tier, tmp_path, capsys):
    images = make_images(tmp_path / "images", {"test_00.JPEG": b"label:tabby"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "test_00.JPEG uploaded!\nClassification result: test_00:tabby\n" in out
    assert "latency p99" in out


def test_verbose_prints_a_failure_in_no_line_of_the_courses(tier, tmp_path, capsys):
    """"Classification result: ERROR HTTP 500: ..." was counted as a result by whatever
    counts the course's lines."""
    images = make_images(tmp_path / "images", {"ok.jpg": b"label:cat", "broken.jpg": b"fail"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "--verbose", "-c", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("Classification result:") == 1 and out.count(" uploaded!") == 1
    assert "ok.jpg uploaded!\nClassification result: ok:cat\n" in out
    assert "broken.jpg failed: HTTP 500: boom\n" in out, out


def test_an_answer_naming_the_file_with_its_extension_says_so(tier, tmp_path, capsys):
    """Another course server's answer, "a.jpg:cat" for a.jpg, was said to be "for 'a.jpg'":
    a contradiction, where the contract's name has no extension."""
    images = make_images(tmp_path / "images", {"a.jpg": b"with-extension"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "-q"]) == 1
    assert ("a.jpg: wrong: answered 'a.jpg:cat', answer names the file with its extension ('a.jpg'), "
            "where POST / answers '<name without extension>:<label>'") in capsys.readouterr().out


def test_a_server_that_drips_its_answer_is_given_up_on_at_the_timeout(tier, tmp_path):
    """requests' read timeout bounds each read: a byte a second would hold a request past
    --timeout for ever."""
    images = make_images(tmp_path / "images", {"slow.jpg": b"drip"})
    report = finish_within(20, run_load, Config(images=images, url=tier.url, timeout=1.0))  # the drip: 30 s
    (outcome,) = report.outcomes
    assert outcome.error == "timeout after 1 s (the image may be stored)", outcome
    wait_until(lambda: tier.drips_given_up == 1, timeout=10)


def test_an_event_line_that_never_ends_is_given_up_on_at_the_timeout(tier, tmp_path):
    """Not a core kept busy re-splitting a growing line, past --timeout."""
    images = make_images(tmp_path / "images", {"endless.jpg": b"endless"})
    tier.queued_polls = 100  # only the stream could say it finished
    report = finish_within(20, run_load, Config(images=images, url=tier.url, api="jobs", wait="sse",
                                                timeout=1.0))  # the line grows for 30 s
    (outcome,) = report.outcomes
    assert outcome.error.startswith("timeout after 1 s"), outcome
    wait_until(lambda: tier.drips_given_up == 1, timeout=10)


def test_what_the_server_says_is_printed_with_its_control_characters_escaped(tier, tmp_path, capsys):
    """A broken or hostile server's ESC sequences must not reach the terminal raw: a
    window retitled, the screen cleared."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:\x1b]0;PWNED\x07\x1b[2Jcat"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "Classification result: a:\\x1b]0;PWNED\\x07\\x1b[2Jcat" in out


def test_summary_shows_the_untrained_warning(tier, tmp_path, capsys):
    tier.untrained = True
    images = make_images(tmp_path / "images", {"a.jpg": b"label:fox_squirrel"})
    assert load_test.main(["--url", tier.url, "--images", str(images)]) == 0
    assert load_test.UNTRAINED_WARNING in capsys.readouterr().out


def test_verbose_says_the_model_is_untrained_before_the_first_of_its_labels(tier, tmp_path, capsys):
    """The course's lines carry a mark, as output cut short (`| head`) never reaches
    the summary's warning."""
    tier.untrained = True
    images = make_images(tmp_path / "images", {"a.jpg": b"label:fox", "b.jpg": b"label:fox"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "--verbose", "-c", "1"]) == 0
    out = capsys.readouterr().out
    first_label = out.index("Classification result:")
    assert out.index(load_test.UNTRAINED_WARNING) < first_label
    assert out.count(load_test.UNTRAINED_WARNING) == 2  # once before the lines, once in the summary


@pytest.mark.parametrize("status", ["no status here", {"ListAllMyBucketsResult": {}}])
def test_a_url_that_is_not_the_web_tiers_is_warned_about(tier, tmp_path, capsys, status):
    """The page's address with a path (`/api/status`), or the embedded AWS's, would have
    every request fail, or upload the images to S3, without a word on why. It runs all
    the same: another server of the course's POST / may be driven on purpose."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    assert load_test.main(["--url", tier.url, "--images", str(images), "-q"]) == 0
    assert "warning" not in capsys.readouterr().err
    tier.status = status
    assert load_test.main(["--url", tier.url, "--images", str(images), "-q"]) == 0
    assert "does not answer as this service's web tier does: is --url the web tier's address?" in \
        capsys.readouterr().err


def test_a_folder_without_images_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images here")
    assert load_test.main(["--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no images" in err and "subfolders" not in err
    # A folder of folders: it says it looks in none, and names them.
    for name in ("cats", "dogs", ".hidden"):
        (tmp_path / name).mkdir()
    assert load_test.main(["--images", str(tmp_path)]) == 2
    assert "(subfolders are not looked in: cats, dogs)" in capsys.readouterr().err


# --- pure helpers ---------------------------------------------------------------------


def test_percentile_interpolates_between_ranks():
    data = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]  # 1..10, unsorted on purpose
    assert percentile(data, 0) == 1
    assert percentile(data, 50) == pytest.approx(5.5)
    assert percentile(data, 90) == pytest.approx(9.1)
    assert percentile(data, 99) == pytest.approx(9.91)
    assert percentile(data, 100) == 10
    assert percentile([4.0], 99) == 4.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)


@pytest.mark.parametrize(
    "text",
    [
        "Image,Results\ntest_00,cardigan\ntest_01,Persian_cat\n",
        "\ufeffimage , result\ntest_00.JPEG,cardigan\n\ntest_01.jpg,Persian_cat\n",
        "filename,label\ntest_00,cardigan\ntest_01,Persian_cat\n",
    ],
    ids=["course", "lowercase-bom-extensions", "filename-label"],
)
def test_read_expected_accepts_each_column_spelling(tmp_path, text):
    path = tmp_path / "expected.csv"
    path.write_text(text, encoding="utf-8")
    assert read_expected(path) == {"test_00": "cardigan", "test_01": "Persian_cat"}


def test_read_expected_reads_a_csv_written_with_a_space_after_each_comma(tmp_path):
    """`img0, "shield"` kept its quotes (the label '"shield"', counted wrong), and
    `"img1", "ant, formicid"` was refused as 3 cells."""
    path = tmp_path / "expected.csv"
    path.write_text('Image, Results\nimg0, "shield"\n"img1", "ant, formicid"\nimg2,  plain \n')
    assert read_expected(path) == {"img0": "shield", "img1": "ant, formicid", "img2": "plain"}


def test_read_expected_refuses_a_file_without_the_columns(tmp_path):
    path = tmp_path / "expected.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(LoadTestError, match="Image,Results"):
        read_expected(path)


def test_read_expected_refuses_a_file_that_is_not_utf8_with_a_clear_error(tmp_path):
    path = tmp_path / "expected.csv"
    path.write_bytes("Image,Results\ncaf\u00e9,cardigan\n".encode("latin-1"))
    with pytest.raises(LoadTestError, match="UTF-8 CSV"):
        read_expected(path)


@pytest.mark.parametrize("rows, why", [
    ("test_00,cardigan\ntest_01\n", "line 3: no label"),
    ("test_00,cardigan\ntest_01,\n", "line 3: no label"),
    ("test_00,cardigan\n,Persian_cat\n", "line 3: no image"),
    ("test_00,cardigan\ntest_00.JPEG,Persian_cat\n", "line 3: test_00 is expected as 'cardigan' above"),
    # A name with an unquoted comma: its tail was taken for the label, its label left out.
    ("test_00,cardigan\nmy, cat.jpg,tabby\n", r"line 3: 3 cells where the header has 2 \(\['my', 'cat.jpg', "
                                              r"'tabby'\]\): a name with a comma is written in quotes"),
])
def test_read_expected_refuses_a_row_it_could_only_skip(tmp_path, rows, why):
    """A short row, an empty label and a twice-named image must not be taken silently:
    the image "unchecked" (the run a PASS that did not check it), or judged against ''."""
    path = tmp_path / "expected.csv"
    path.write_text("Image,Results\n" + rows)
    with pytest.raises(LoadTestError, match=why):
        read_expected(path)


def test_a_csv_row_with_more_cells_than_its_header_is_bad_usage(tier, tmp_path, capsys):
    """Refused before anything is sent, as any other bad --expected; a row's empty cells
    past the header (a spreadsheet's trailing commas) are no more cells."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("Image,Results\na.jpg,x,,\nmy, cat.jpg,tabby\n")
    command = ["--url", tier.url, "--images", str(images), "--expected", str(csv_path), "-q"]
    assert load_test.main(command) == 2
    assert f"{csv_path}, line 3: 3 cells where the header has 2" in capsys.readouterr().err
    assert not tier.paths["POST /"]
    csv_path.write_text("Image,Results\na.jpg,x,,\n")
    assert read_expected(csv_path) == {"a": "x"}


def test_read_expected_takes_an_image_named_twice_with_one_label(tmp_path):
    path = tmp_path / "expected.csv"
    path.write_text("Image,Results\ntest_00,great_white_shark\n\ntest_00.jpg,Great white shark\n")
    assert read_expected(path) == {"test_00": "Great white shark"}


def test_the_header_says_when_fewer_requests_than_the_concurrency_were_planned(tier, tmp_path):
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat"})
    report = run_load(Config(images=images, url=tier.url, num_requests=3, concurrency=50))
    assert "concurrency 50 (at most 3 in flight: 3 requests)" in load_test.format_report(report)
    report = run_load(Config(images=images, url=tier.url, num_requests=1, concurrency=50))
    assert "concurrency 50 (at most 1 in flight: 1 request)\n" in load_test.format_report(report)
    report = run_load(Config(images=images, url=tier.url, num_requests=3, concurrency=3))
    assert load_test.format_report(report).splitlines()[0].endswith("concurrency 3")


def test_labels_and_names_compare_the_way_people_write_them():
    assert load_test.same_label("great_white_shark", "Great White  Shark")
    assert not load_test.same_label("crane", "crate")
    assert load_test.same_name("my photo", "my photo.jpg")
    assert not load_test.same_name("test_01", "test_00")
    assert load_test.image_key("dir/test_00.JPEG") == "test_00"
    assert load_test.image_key("v1.2") == "v1.2"
    # A CSV's cells are read stripped: a name with spaces at an end of its stem is still named.
    assert load_test.image_key(" trail .jpg") == load_test.image_key(" trail ") == "trail"
    assert load_test.image_key("dir/ .jpg") == load_test.image_key(" .jpg") == ".jpg"


def test_same_name_accepts_the_web_tiers_spellings_and_no_other_name():
    assert load_test.same_name("backslash", "back\\slash.jpg")
    assert load_test.same_name("back\\slash", "back\\slash.jpg")  # a tier that keeps the name as sent
    assert load_test.same_name("tab here", "tab\there.jpg")
    for other in ("slash", "back", "backslash2", "test_00", ""):
        assert not load_test.same_name(other, "back\\slash.jpg"), other
    for other in ("tab", "here", "tabhere", "tab  here", "tab\there.jpg"):
        assert not load_test.same_name(other, "tab\there.jpg"), other


def test_post_answers_are_not_taken_under_the_cleaned_stored_name():
    """POST / answers with the name as the web tier read it. The cleaned name it stores
    was accepted too, and every all-non-ASCII name cleans to "image": an answer swapped
    between 猫.jpg and 犬.jpg (a batch rebuilt from S3 names both "image") counted right."""
    assert not load_test.same_name("image", "\u732b.jpg")
    assert not load_test.same_name("tab_here", "tab\there.jpg")
    assert not load_test.same_name("cafe", "caf\u00e9.jpg")
    assert load_test.same_name("\u732b", "\u732b.jpg")


def test_an_item_fetched_by_its_id_is_not_judged_by_its_name(tier, tmp_path):
    """Whatever the item's name (the cleaned one of a batch rebuilt from S3, one cut
    for a queue message, or another), it is this request's: its id says so."""
    images = make_images(tmp_path / "images", {"\u732b.jpg": b"renamed"})
    (outcome,) = run_load(Config(images=images, url=tier.url, api="jobs", timeout=10)).outcomes
    assert outcome.answer_name == "someone_else" and outcome.verdict == "unchecked", outcome.note


@pytest.mark.parametrize(
    "name",
    ["back\\slash.jpg", "a\\\\b.jpg", "tab\there.jpg", 'quo"te.jpg', "pct%22.jpg", "new\nline.jpg",
     "cr\rx.jpg", "\x7fdel.jpg", " spaced .jpg", "caf\u00e9.jpg", "uni\x85x.jpg", "\t.jpg", "v1.2.png",
     "x" * 200 + ".jpg", "\u00e9" * 120 + ".jpg", "q\"" * 90 + ".jpg", "../../etc/passwd",
     "photos.v2/cat", "photos.v2/cat.jpg", "..", "photo\u202egpj.exe.png", "\u200fa\u2066b.png",
     "y" * 1100 + ".jpg", "\u00e9" * 1100 + ".jpg", "\u732b" * 300 + ".png", "\U0001f600" * 500 + ".jpg",
     "%" * 700 + ".gif", "line\u2028para\u2029.jpg", "\ufeffcat.jpg", "cat\u200b.jpg",
     "soft\u00adhyphen.jpg"],
)
def test_the_copied_name_rules_match_the_web_tier(name):
    """load_test.py copies how the web tier respells names; this catches the copies drifting."""
    from common.names import stem

    sent = requests.Request("POST", "http://x/", files={"inputFile": (name, b"x", "image/jpeg")}).prepare()
    ((_, shown, _),) = _parse_files_like_the_web_tier(sent.headers, sent.body)
    assert load_test.received_name(name) == shown
    assert load_test.name_stem(shown) == stem(shown)


def test_the_copied_dropped_characters_are_the_web_tiers():
    """The web tier drops characters that show nothing (a BOM, a zero-width space, a soft
    hyphen) besides the bidirectional controls; load_test.py's copy must too, or it
    judges "\ufeffcat.jpg" answered as "cat" wrong."""
    from web_tier.filenames import DROPPED_CHARACTERS

    assert set(load_test._DROPPED_CHARACTERS) == set(DROPPED_CHARACTERS)
    assert load_test.same_name("cat", "\ufeffcat.jpg")
    assert load_test.same_name("softhyphen", "soft\u00adhyphen.jpg")


def test_the_page_reads_a_chosen_name_as_the_load_test_does():
    """The page shows a file's name from the start as the server will read it
    (web_tier/static/js/rows.js sentName): its copy of the browser's escapes in the
    multipart body must be load_test.py's, and its reading back the same (a backslash
    escapes the next character, %22 is a quote), or a row's name changes once stored."""
    source = page_script_source()
    found = re.search(r"const ON_THE_WIRE = \{ (.*?) \};", source)
    assert found, "the page's scripts have no ON_THE_WIRE"
    on_the_page = json.loads("{" + found[1].replace("'\"'", '"\\""') + "}")
    assert {ord(plain): escaped for plain, escaped in on_the_page.items()} == load_test._MULTIPART_ESCAPES
    reading = r'''.replace(/\\(.)/gsu, "$1").replace(/%22/g, '"')''' in source
    assert reading, "the page no longer reads a name back as load_test.py received_name does"


def test_expected_results_that_name_none_of_the_images_are_refused_before_anything_is_sent(
    tier, tmp_path, capsys
):
    """Else every answer is "unchecked" and the run a PASS that checked nothing."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x", "b.jpg": b"label:y"})
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("Image,Results\nfoo,ant\nbar,ant\n")
    code = load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path),
                           "--quiet"])
    assert code == 2
    assert f"{csv_path} names none of the 2 images in {images} (it names bar, foo)" in capsys.readouterr().err
    assert not [p for p in tier.paths if p != "/api/status"]  # no image sent


def test_expected_results_that_name_none_of_the_images_sent_are_refused_before_anything_is_sent(
    tier, tmp_path, capsys
):
    """The CSV was checked against every image in the folder: with --num-requests 2 of
    a, b, c and a CSV naming only c, the run sent a and b, checked neither, and PASSED."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x", "b.jpg": b"label:y", "c.jpg": b"label:z"})
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("Image,Results\nc,goldfish\n")
    code = load_test.main(["--url", tier.url, "--images", str(images), "--num-requests", "2",
                           "--expected", str(csv_path), "--quiet"])
    assert code == 2
    assert (f"{csv_path} names none of the 2 images --num-requests 2 sends of the 3 in {images} "
            "(it names c)") in capsys.readouterr().err
    assert not tier.paths["POST /"]


def test_a_run_that_checked_no_answer_against_its_expected_csv_is_no_pass(tier, tmp_path):
    """result_line mentioned unchecked answers only beside a checked one: a run with an
    --expected CSV that checked none said a plain PASS."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("Image,Results\na,x\n")
    assert run_load(Config(images=images, url=tier.url, expected=csv_path)).checked_against_csv
    assert not run_load(Config(images=images, url=tier.url)).checked_against_csv
    answered = [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0, answer_name=str(i), label="cat",
                                 reached=True)
                for i in range(2)]
    for outcome in answered:
        load_test.judge(outcome, {"other": "cat"})
    report = load_test.Report(url="http://x", api="form", concurrency=1, planned=2, started_at=0.0,
                              duration_s=1.0, outcomes=answered, checked_against_csv=True)
    assert not report.ok and not report.to_dict()["ok"]
    assert load_test.result_line(report) == ("RESULT: FAIL (0 failed, 0 wrong, none checked: the expected "
                                             "CSV names no image answered)")
    report.checked_against_csv = False  # no CSV given: nothing was to be checked
    assert report.ok and load_test.result_line(report) == "RESULT: PASS (2 answered, none failed or wrong)"


def kept_clients(monkeypatch) -> list[load_test.Client]:
    """The Clients run_load makes from now on, kept for the test to watch."""
    clients: list[load_test.Client] = []

    class Kept(load_test.Client):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clients.append(self)

    monkeypatch.setattr(load_test, "Client", Kept)
    return clients


@pytest.mark.parametrize("wait", ["poll", "sse"])
def test_the_first_ctrl_c_in_jobs_mode_waits_for_the_requests_in_flight(tier, tmp_path, monkeypatch, wait):
    """The first Ctrl-C ended every poll and event stream at once, failing the requests
    in flight "interrupted", where POST / waits for them as the docstring says."""
    clients = kept_clients(monkeypatch)
    images = make_images(tmp_path / "images", {"a_fast.jpg": b"label:x", "b_held.jpg": b"hold"})

    def release_once_stopped() -> None:
        try:
            wait_until(lambda: clients and clients[0].stop.is_set(), 30)
            if wait == "poll":  # and the held item still polled after it
                polls = tier.paths["GET /api/jobs/<id>"]
                wait_until(lambda: tier.paths["GET /api/jobs/<id>"] >= polls + 2, 30)
        finally:
            tier.release.set()

    helper = InBackground(release_once_stopped)

    def ctrl_c(outcome: load_test.Outcome) -> None:
        raise KeyboardInterrupt

    config = Config(images=images, url=tier.url, api="jobs", wait=wait, concurrency=2, timeout=20)
    report = finish_within(75, run_load, config, on_result=ctrl_c, watching=helper)
    helper.finish()
    assert report.interrupted and report.abandoned == 0
    assert (report.answered, report.failed) == (2, 0), [(o.file, o.error) for o in report.outcomes]


def test_a_second_ctrl_c_in_jobs_mode_abandons_the_requests_still_polled(tier, tmp_path):
    # Deadlines that only bound a failure (a loaded machine may start four senders slowly).
    tier.barrier = threading.Barrier(2, timeout=20)
    images = make_images(
        tmp_path / "images", {"0.jpg": b"hold", "1.jpg": b"hold", "2.jpg": b"barrier", "3.jpg": b"barrier"}
    )
    before = set(threading.enumerate())

    def ctrl_c(outcome: load_test.Outcome) -> None:
        raise KeyboardInterrupt

    config = Config(images=images, url=tier.url, api="jobs", wait="poll", concurrency=4, timeout=30)
    report = finish_within(25, run_load, config, on_result=ctrl_c)
    assert sorted(o.file for o in report.outcomes if o.answered) == ["2.jpg", "3.jpg"]
    assert report.abandoned == 2
    assert load_test.result_line(report) == ABANDONED_TWO
    # The abandoned stop polling (they polled on until their timeout, flooding the tier).
    senders = [t for t in set(threading.enumerate()) - before if t.name.startswith("load-")]
    wait_until(lambda: not any(t.is_alive() for t in senders), 30)


def test_a_second_brief_outage_long_after_a_first_is_waited_out_too(tmp_path, monkeypatch):
    """The refused window was reset only by an answer to a POST, which under a backlog
    takes minutes: after one outage, a second more than a window later failed its
    uploads at once, none sent again. Any answer (a status sample here) now resets it."""
    window = 1.0
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", window)
    monkeypatch.setattr(load_test, "check_reachable", lambda url: None)
    refusals: list[float] = []
    real_post = requests.Session.post

    def noting_refusals(self, *args, **kwargs):
        try:
            return real_post(self, *args, **kwargs)
        except requests.ConnectionError as exc:
            if load_test.refused(exc):
                refusals.append(time.monotonic())
            raise

    monkeypatch.setattr(requests.Session, "post", noting_refusals)
    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = port_holder.getsockname()[1]
    state = FakeTier()
    state.cut_off_after = 10  # a.jpg's POST / waits (a backlog) until `release`, then is cut off
    servers: list[ThreadingHTTPServer] = []

    def serve() -> None:
        server = ThreadingHTTPServer(("127.0.0.1", port), type("H", (Handler,), {"tier": state}))
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def two_outages() -> None:
        wait_until(lambda: refusals, 30)  # the first outage: a.jpg refused
        port_holder.close()
        serve()
        wait_until(lambda: state.paths["POST /"] and state.paths["GET /api/status"]
                   and time.monotonic() > refusals[0] + window + 0.2, 30)
        servers[0].shutdown()
        servers[0].server_close()  # the second outage
        seen = len(refusals)
        state.release.set()  # a.jpg is cut off; b.jpg goes next, and is refused
        wait_until(lambda: len(refusals) > seen, 30)
        serve()

    helper = InBackground(two_outages)
    images = make_images(tmp_path / "images", {"a.jpg": b"drop-once", "b.jpg": b"label:b"})
    config = Config(images=images, url=f"http://127.0.0.1:{port}", concurrency=1, timeout=20,
                    status_interval=0.05)
    try:
        report = finish_within(100, run_load, config, watching=helper)
    finally:
        state.release.set()
        port_holder.close()
        for server in servers:
            server.shutdown()
            server.server_close()
    helper.finish()
    outcomes = by_file(report)
    assert outcomes["a.jpg"].resent >= 1 and not outcomes["a.jpg"].answered  # cut off, without a key
    assert outcomes["b.jpg"].answered and outcomes["b.jpg"].resent >= 1, outcomes["b.jpg"].error


def test_polls_refused_for_a_whole_window_fail_as_uploads_do(tmp_path, monkeypatch):
    """A web tier dead after accepting the uploads kept each request in flight polling
    for its whole --timeout (330 s), where an upload refused as long fails."""
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", 1.0)
    state = FakeTier()
    state.queued_polls = 10**6  # never finished while the tier lives
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"tier": state}))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def die_once_polled() -> None:
        wait_until(lambda: state.paths["GET /api/jobs/<id>"] >= 2, 30)
        state.killed = True
        server.shutdown()
        server.server_close()  # nothing listens there any more: polls are refused

    helper = InBackground(die_once_polled)
    images = make_images(tmp_path / "images", {"a.jpg": b"label:a", "b.jpg": b"label:b"})
    try:
        config = Config(images=images, url=url, api="jobs", wait="poll", timeout=30)
        report = finish_within(60, run_load, config, watching=helper)
    finally:
        server.shutdown()
        server.server_close()
    helper.finish()
    assert report.failed == 2
    for outcome in report.outcomes:
        assert re.fullmatch(rf"GET /api/jobs/[0-9a-f]+: cannot connect to {url}: \[Errno \d+\] Connection "
                            r"refused; every connection refused for 1 s", outcome.error), outcome.error


def test_a_poll_unanswered_until_the_timeout_says_why_in_a_line(tier, tmp_path):
    tier.failing_polls = ["drop"] * 1000  # each poll's connection closed unanswered
    images = make_images(tmp_path / "images", {"a.jpg": b"label:a"})
    # The upload and a first poll within the timeout, whatever the load: 1.5 s failed once
    # in a run beside a CPU hog (the upload or that poll took it all, said otherwise).
    report = run_load(Config(images=images, url=tier.url, api="jobs", timeout=5.0))
    assert report.outcomes[0].error == (f"no answer in time; the last poll: the connection to {tier.url} "
                                        "closed before the answer came: closed without a response")


def test_an_instance_count_is_placed_when_the_web_tier_read_it_not_when_it_was_asked(tier):
    """/api/status answers from a snapshot up to a second old (older when AWS is slow):
    the plot's fleet line lagged the fleet by that much. Its `read_at` says when."""
    poller = load_test.StatusPoller(load_test.Config(images=Path("."), url=tier.url))
    poller.t0 = time.monotonic() - 100.0  # a run 100 s old

    def sampled() -> tuple[float, float]:
        """The run's time as the sample was asked for and as it was in: a loaded
        machine's round trip may take seconds, which no fixed bound should guess."""
        before = time.monotonic() - poller.t0
        poller.sample()
        return before, time.monotonic() - poller.t0

    tier.status = {**STATUS, "read_at": time.time() - 3.0}
    read_between = sampled()
    tier.status = {**STATUS, "read_at": time.time() + 3600}  # another host's clock, an hour out
    skewed_between = sampled()
    tier.status = STATUS  # none said
    unsaid_between = sampled()
    (read, _), (skewed, _), (unsaid, _) = poller.samples
    # Read 3 s before it was set, so before it was asked for; within a clock's tick of that.
    assert read_between[0] - 3.5 < read <= read_between[0] - 3.0 + 0.01
    assert skewed_between[0] <= skewed <= skewed_between[1]  # a clock an hour out is not believed
    assert unsaid_between[0] <= unsaid <= unsaid_between[1]


def test_a_status_that_could_not_read_the_instances_is_no_sample(tier, tmp_path):
    """The web tier's /api/status answers "instances": {} (with "errors") while it
    cannot read EC2 or before its first read: that was counted 0 instances, plotted
    and reported as the peak while workers ran."""
    assert load_test.instance_count({"instances": {}, "instances_total": None,
                                     "errors": ["instances: AccessDenied"]}) is None
    assert load_test.instance_count({"instances": {"pending": 0, "running": 0, "stopped": 3}}) == 0
    tier.status = {"instances": {}, "instances_total": None, "errors": ["instances: AccessDenied"]}
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    report = run_load(Config(images=images, url=tier.url))
    assert tier.paths["GET /api/status"] >= 2 and report.instance_samples == []
    assert report.peak_instances is None and "peak app-tier instances" not in load_test.format_report(report)


def test_a_malformed_status_does_not_end_the_run_without_its_report(tier, tmp_path):
    """A TypeError ended the poller's thread, and the last sample's the run, in a traceback."""
    tier.status = {"instances": {"pending": [1], "running": 2}}
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    report = run_load(Config(images=images, url=tier.url))
    assert report.ok and report.instance_samples == [] and tier.paths["GET /api/status"] >= 2


def test_a_status_whose_count_is_no_number_is_a_failed_sample_not_the_runs_end(tier, tmp_path):
    """{"pending": 1e999}: int(inf) raised an OverflowError, which ended the poller's
    thread, and then, from the last sample (taken on the main thread), the run, in a
    traceback with no report."""
    tier.status = {"queue": {"visible": 0}, "instances": {"pending": float("inf"), "running": 1}}
    images = make_images(tmp_path / "images", {"a.jpg": b"label:x"})
    report = run_load(Config(images=images, url=tier.url))
    assert report.ok and report.instance_samples == [] and tier.paths["GET /api/status"] >= 2
    poller = load_test.StatusPoller(Config(images=images, url=tier.url))
    poller.sample()
    assert poller.samples == [] and poller.failure.startswith("OverflowError: "), poller.failure


def test_a_status_answer_past_the_size_cap_is_a_failed_sample(tier, tmp_path, monkeypatch):
    """Its body was read whole, however large."""
    monkeypatch.setattr(load_test, "MAX_ANSWER_BYTES", 200)
    tier.status = {**STATUS, "padding": "x" * 1000}
    poller = load_test.StatusPoller(Config(images=tmp_path, url=tier.url))
    poller.sample()
    assert poller.samples == [] and "more than 200 bytes" in poller.failure, poller.failure
    tier.status = STATUS
    poller.sample()  # a good answer after it is a sample again
    assert [n for _, n in poller.samples] == [3] and poller.failure is None


@pytest.mark.parametrize("api", ["form", "jobs"])
def test_a_connection_not_made_in_time_is_sent_again_and_said_so(tmp_path, monkeypatch, api):
    """A ConnectTimeout (both a ConnectionError and a Timeout) sent nothing, yet was
    reported "timeout after 330 s" and, with POST /, never sent again."""
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", 0.6)

    def no_connection(self, *args, **kwargs):
        raise requests.ConnectTimeout("HTTPConnectionPool(host='10.255.255.1', port=8000): Max retries "
                                      "exceeded (Caused by ConnectTimeoutError(..., 'connect timeout=10.0'))")

    monkeypatch.setattr(requests.Session, "post", no_connection)
    images = make_images(tmp_path / "images", {"b.jpg": b"label:b"})
    url = "http://10.255.255.1:8000"
    client = load_test.Client(Config(images=images, url=url, api=api, timeout=330), threading.Event())
    outcome = finish_within(30, client.send, 0, images / "b.jpg", time.monotonic())
    assert outcome.resent >= 1
    assert outcome.error == (f"cannot connect to {url}: no connection within 10 s "
                             f"(tried {outcome.resent + 1} times, for up to 0.6 s)")


@pytest.mark.parametrize("url", ["http://127.0.0.1:80a", "http://127.0.0.1:99999", "http://"])
def test_a_url_whose_port_or_host_is_not_one_is_a_usage_error(tmp_path, capsys, url):
    """Accepted, it ended the run in a ValueError traceback as it checked the address."""
    with pytest.raises(SystemExit) as exc:
        load_test.parse_args(["--images", str(tmp_path), "--url", url])
    assert exc.value.code == 2 and f"--url {url!r}" in capsys.readouterr().err


def test_a_folder_that_cannot_be_listed_is_a_usage_error(tmp_path, capsys, monkeypatch):
    def no_permission(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    # As a folder without read permission (which root, running the tests, would ignore).
    monkeypatch.setattr(Path, "iterdir", no_permission)
    assert load_test.main(["--images", str(tmp_path)]) == 2
    assert f"load_test.py: cannot list {tmp_path}: Permission denied" in capsys.readouterr().err


def test_an_old_urllib3_is_said_at_once_not_in_every_request(tier, tmp_path, monkeypatch):
    """urllib3 1.26 has no read1: every request would fail with an AttributeError."""
    from urllib3.response import BaseHTTPResponse, HTTPResponse

    monkeypatch.delattr(HTTPResponse, "read1")  # as urllib3 1.26's, on io.IOBase alone
    monkeypatch.delattr(BaseHTTPResponse, "read1")
    images = make_images(tmp_path / "images", {"a.jpg": b"label:cat"})
    with pytest.raises(load_test.LoadTestError, match=r"urllib3 2.2 or later"):
        run_load(Config(images=images, url=tier.url))


def test_a_name_that_does_not_resolve_sent_nothing(tmp_path, monkeypatch):
    """A DNS failure must not count as sent."""
    images = make_images(tmp_path / "images", {"a.jpg": b"label:cat"})
    monkeypatch.setattr(load_test, "check_reachable", lambda url: None)
    monkeypatch.setattr(load_test, "RESEND_WINDOW_S", 0.5)
    # The name fails as glibc fails a name it cannot find, whatever resolver this machine
    # has (one may answer for any name, or time out): no DNS lookup is made.
    looked_up = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host != "no-such-host.invalid":
            return real_getaddrinfo(host, *args, **kwargs)
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    report = finish_within(30, run_load, Config(images=images, url="http://no-such-host.invalid:8000"))
    assert looked_up, "the name was never looked up: the test did not see a DNS failure"
    (outcome,) = report.outcomes
    assert outcome.verdict == "not sent" and outcome.error.startswith("cannot connect to")
    assert "Name or service not known" in outcome.error
    assert not outcome.reached and report.sent == 0


def test_no_untrained_warning_for_a_run_that_got_no_label(tier, tmp_path, capsys):
    # The service says it is untrained on its refusals too; with no label to warn of,
    # the warning would only hide the real failure.
    tier.untrained = True
    images = make_images(tmp_path / "images", {"a.jpg": b"fail"})
    assert load_test.main(["--url", tier.url, "--images", str(images)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and load_test.UNTRAINED_WARNING not in out


def test_wrong_answers_alone_fail_the_run(tier, tmp_path, capsys):
    # The run other tests check FAIL with a wrong answer also has a failed request,
    # which fails it anyway.
    images = make_images(tmp_path / "images", {"cat.jpg": b"label:cat", "dog.jpg": b"label:cat"})
    csv_path = tmp_path / "expected.csv"
    csv_path.write_text("Image,Results\ncat,cat\ndog,dog\n")
    assert load_test.main(["--url", tier.url, "--images", str(images), "--expected", str(csv_path)]) == 1
    assert "RESULT: FAIL (0 failed, 1 wrong)" in capsys.readouterr().out


def test_latency_mean_is_over_every_latency():
    assert load_test.latency_summary([1.0, 2.0, 3.0, 4.0])["mean"] == pytest.approx(2.5)
    assert load_test.latency_summary([])["mean"] is None


def test_the_course_average_leaves_out_requests_abandoned_in_flight():
    """They did not end within the run's duration: counted, they made it look faster."""
    outcomes = [load_test.Outcome(index=i, file=f"{i}.jpg", started_s=0.0, reached=True, label="cat",
                                  answer_name=f"{i}") for i in range(6)]
    for outcome in outcomes:
        load_test.judge(outcome, {})
    outcomes += load_test.unfinished_outcomes([Path(f"{i}.jpg") for i in range(8)], [0.0] * 8, 0.0,
                                              set(range(6)))
    report = load_test.Report(url="http://x", api="form", concurrency=8, planned=8, started_at=0.0,
                              duration_s=3.0, outcomes=outcomes, interrupted_by="SIGINT")
    assert report.abandoned == 2
    assert report.sent == 8
    assert report.course_average_latency == pytest.approx(3.0 / 6)


def test_a_job_is_polled_once_more_just_before_its_deadline(monkeypatch):
    """Skipping the poll whenever the backed-off delay goes past the deadline would count
    failed a result that came in the request's last moments ("timeout after 0.3 s")."""
    now = [100.0]  # a clock that moves only as the client waits: no test timing

    class Waiting:  # the abandon event, never set
        def wait(self, seconds: float) -> bool:
            now[0] += seconds
            return False

    monkeypatch.setattr(load_test, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    client = load_test.Client(Config(images=Path("."), api="jobs", timeout=2.0), threading.Event(), Waiting())
    deadline = now[0] + 2.0
    polls = []

    def fetch(session, batch_id, item_id, deadline):
        polls.append(now[0])
        return {"state": "done" if now[0] >= deadline - 0.1 else "queued"}

    monkeypatch.setattr(client, "_fetch_item", fetch)
    assert client._wait_poll(None, "b", "i", deadline)["state"] == "done"
    assert polls[-1] == pytest.approx(deadline - load_test.POLL_MARGIN_S)

    # Never finished: given up on only once no poll fits before the deadline.
    polls.clear()
    deadline = now[0] + 2.0
    monkeypatch.setattr(client, "_fetch_item", lambda *args: polls.append(now[0]) or {"state": "queued"})
    with pytest.raises(requests.Timeout):
        client._wait_poll(None, "b", "i", deadline)
    assert polls[-1] == pytest.approx(deadline - load_test.POLL_MARGIN_S)


def test_the_peak_of_instances_is_shown_beside_the_count_at_the_start():
    """A 1-request run right after a bigger one must not say "peak app-tier instances 7":
    the previous run's fleet, not this one's doing."""
    report = load_test.Report(url="u", api="form", concurrency=1, planned=1, started_at=0.0, duration_s=1.0,
                              outcomes=[], instance_samples=[(0.0, 7), (0.5, 5), (1.0, 4)])
    # Fewer on the way: said, as a fleet scaled in to 0 and out again mid-run peaks where it
    # began.
    assert re.search(r"\n  peak app-tier instances +7 \(7 at start, 4 at the lowest\)\n",
                     load_test.format_report(report))
    said = report.to_dict()
    assert (said["peak_instances"], said["instances_at_start"], said["lowest_instances"]) == (7, 7, 4)
    report.instance_samples = [(0.0, 1), (0.5, 3)]
    assert re.search(r"\n  peak app-tier instances +3 \(1 at start\)\n", load_test.format_report(report))
    # A fresh web tier has no figures for its first seconds: the first reading is not "at start".
    report.instance_samples = [(4.2, 2), (4.7, 3)]
    assert re.search(r"\n  peak app-tier instances +3 \(2 at the first reading, 4 s in\)\n",
                     load_test.format_report(report))


def test_a_run_that_quit_holds_every_planned_request_once(tier, tmp_path):
    """Not "sent 61, abandoned 26" with 35 requests in the JSON: those in flight when the
    run quit, and those never started, are in it too."""
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"hang", "2.jpg": b"label:c"})

    def sigterm(outcome: load_test.Outcome) -> None:
        wait_until(lambda: tier.paths["POST /"] == 2, 30)  # 1.jpg in flight; 2.jpg waits for the thread
        raise load_test.Terminated

    report = finish_within(60, run_load, Config(images=images, url=tier.url, concurrency=1, timeout=30),
                           on_result=sigterm)
    rows = report.to_dict()["requests"]
    assert [(r["index"], r["file"], r["verdict"]) for r in rows] == [
        (0, "0.jpg", "unchecked"), (1, "1.jpg", "abandoned"), (2, "2.jpg", "not started")]
    assert rows[1]["started_s"] >= rows[0]["started_s"] and rows[2]["started_s"] is None
    assert rows[1]["error"] == "in flight when the run quit (the image may be stored)"
    assert rows[1]["reached"] is None and rows[0]["reached"] is True  # not known, for one in flight
    assert rows[2]["error"] == "not started: the run was interrupted first"
    # Neither ended: a latency of 0.0 read as an instant answer.
    assert rows[1]["latency_s"] is None and rows[2]["latency_s"] is None and rows[0]["latency_s"] > 0
    # The counts mean what they meant.
    assert (report.sent, report.not_sent, report.abandoned, report.answered, report.failed) == (2, 1, 1, 1, 0)
    assert report.to_dict()["interrupted_by"] == "SIGTERM"
    assert load_test.result_line(report) == (
        "RESULT: FAIL (0 failed, 0 wrong, 1 abandoned in flight, 1 not sent, interrupted)")


def test_a_request_quit_while_only_ever_refused_is_not_counted_sent(tmp_path, monkeypatch):
    """Requests retrying refused connections when SIGTERM came were counted abandoned,
    and so sent (sent 24 where 20 reached the server), where `sent` counts the requests
    that reached the web tier."""
    images = make_images(tmp_path / "images", {f"{i}.jpg": b"label:cat" for i in range(3)})
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    monkeypatch.setattr(load_test, "check_reachable", lambda url: None)
    refused_on: set[int] = set()  # the threads, one per request in flight, that were refused
    real_refused = load_test.refused
    monkeypatch.setattr(load_test, "refused", lambda exc: real_refused(exc)
                        and not refused_on.add(threading.get_ident()))
    main = threading.get_ident()

    def waiting_to_try_again(thread: int) -> bool:
        frame, names = sys._current_frames().get(thread), []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return bool(names) and names[0] == "wait" and "_post" in names

    def sigterm_once_both_refused() -> None:
        # Between two attempts: in one, a request may be uploading, for all the run knows.
        wait_until(lambda: len(refused_on) >= 2 and all(map(waiting_to_try_again, list(refused_on))), 20)
        signal.pthread_kill(main, signal.SIGTERM)

    url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    try:
        with load_test.interrupts_heard():  # SIGTERM quits the run at once, as the command's
            helper = InBackground(sigterm_once_both_refused)
            report = run_load(Config(images=images, url=url, concurrency=2))
        helper.finish()
    finally:
        dead.close()
    assert report.interrupted_by == "SIGTERM"
    verdicts = [o.verdict for o in sorted(report.outcomes, key=lambda o: o.index)]
    assert verdicts == ["not sent", "not sent", "not started"], [o.error for o in report.outcomes]
    assert (report.sent, report.abandoned, report.not_sent, report.unreached) == (0, 0, 3, 2)
    for outcome in report.outcomes[:2]:
        assert outcome.reached is False and "never connected" in outcome.error, outcome
    assert load_test.result_line(report) == "RESULT: FAIL (0 failed, 0 wrong, 3 not sent, interrupted)"


def test_a_run_stopped_by_one_ctrl_c_holds_the_requests_it_never_started(tier, tmp_path, monkeypatch):
    clients = kept_clients(monkeypatch)
    images = make_images(tmp_path / "images", {"0.jpg": b"label:a", "1.jpg": b"hang", "2.jpg": b"label:c"})

    def release_once_stopped() -> None:
        try:
            wait_until(lambda: clients[0].stop.is_set(), 30)
        finally:
            tier.release.set()  # 1.jpg, in flight, answers: waited for

    def ctrl_c(outcome: load_test.Outcome) -> None:
        if outcome.file == "0.jpg":
            wait_until(lambda: tier.paths["POST /"] == 2, 30)  # 1.jpg in flight; 2.jpg waits for the thread
            helpers.append(InBackground(release_once_stopped))
            raise KeyboardInterrupt

    helpers: list[InBackground] = []
    report = finish_within(75, run_load, Config(images=images, url=tier.url, concurrency=1, timeout=30),
                           on_result=ctrl_c)
    helpers[0].finish()
    rows = report.to_dict()["requests"]
    assert [(r["index"], r["file"], r["verdict"]) for r in rows] == [
        (0, "0.jpg", "unchecked"), (1, "1.jpg", "unchecked"), (2, "2.jpg", "not started")]
    assert (report.sent, report.not_sent, report.abandoned, report.answered) == (2, 1, 0, 2)


def test_the_help_says_what_each_exit_code_means(capsys):
    with pytest.raises(SystemExit):
        load_test.parse_args(["--help"])
    out = capsys.readouterr().out
    for line in ("\nexit codes:\n", "\n  0    PASS", "\n  1    a request failed", "\n  2    bad usage",
                 "key refused", "its TLS handshake failed",
                 "\n  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM"):
        assert line in out, line
    # What the figures measure: a closed loop, and a duration with the fleet's scaling out in it.
    assert "\nThe load is a closed loop: each of --concurrency senders sends its next request once\n" in out
    assert "includes the fleet scaling out from the app-tier instances running\nat the start" in out


def test_the_latency_rows_say_they_are_of_the_answered_alone():
    """131 of 150 timed out, and the table said "latency max 0.888 s" as if of the run."""
    def outcome(index: int, answered: bool) -> load_test.Outcome:
        made = load_test.Outcome(index=index, file=f"{index}.jpg", started_s=0.0, reached=True,
                                 latency_s=0.5 if answered else 30.0, label="cat", answer_name=str(index),
                                 error=None if answered else "timeout after 30 s")
        load_test.judge(made, {})
        return made

    some_failed = load_test.Report(url="http://x", api="form", concurrency=5, planned=5, started_at=0.0,
                                   duration_s=30.0, outcomes=[outcome(i, i < 2) for i in range(5)])
    text = load_test.format_report(some_failed)
    for row in ("p50", "p90", "p99", "max", "mean"):
        assert re.search(rf"\n  latency {row} \(2 answered\) +0\.500 s\n", text), row
    # The course's figure keeps its formula, duration / requests, and says the failed are in it.
    assert re.search(r"\n  average latency \(course\) +6\.000 s  \(duration / requests, the 3 failed "
                     r"included\)\n", text)

    all_answered = load_test.Report(url="http://x", api="form", concurrency=5, planned=5, started_at=0.0,
                                    duration_s=1.0, outcomes=[outcome(i, True) for i in range(5)])
    text = load_test.format_report(all_answered)
    assert re.search(r"\n  latency p50 +0\.500 s\n", text)
    assert re.search(r"\n  average latency \(course\) +0\.200 s  \(duration / requests\)\n", text)


def test_a_file_deleted_mid_run_is_said_to_be_unreadable_not_uploaded(tier, tmp_path, capsys, monkeypatch):
    """It was counted with those that never connected ("refused or unreachable"), and
    --verbose printed "<file> uploaded!" for it."""
    images = make_images(tmp_path / "images", {"gone.jpg": b"label:cat", "kept.jpg": b"label:dog"})
    check_reachable = load_test.check_reachable

    def delete_then_check(url: str) -> None:
        (images / "gone.jpg").unlink()  # after the folder was read, before anything is sent
        check_reachable(url)

    monkeypatch.setattr(load_test, "check_reachable", delete_then_check)
    json_path = tmp_path / "run.json"
    code = load_test.main(["--url", tier.url, "--images", str(images), "--verbose", "--json", str(json_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "gone.jpg uploaded!" not in out and "kept.jpg uploaded!" in out
    assert "gone.jpg not sent: could not read the file: No such file or directory" in out
    assert re.search(r"\n  not sent +1  \(1 whose file could not be read\)\n", out)
    assert "never connected" not in out
    (gone,) = [r for r in json.loads(json_path.read_text())["requests"] if r["file"] == "gone.jpg"]
    assert gone["verdict"] == "not sent" and gone["error"].startswith("could not read the file")


def test_the_progress_rate_is_counted_from_the_first_request_not_from_the_checks(tier, tmp_path, monkeypatch):
    """The bar was made before the checks (the key check waits up to 12 s for a fresh web
    tier), and its rate counted that wait as time spent sending."""
    events: list[str] = []
    status_check = load_test.web_tier_status

    def checked(url: str) -> dict | None:
        events.append("checked")
        return status_check(url)

    class Recorded(load_test.Progress):
        def start(self, t0: float) -> None:
            events.append("started")
            super().start(t0)

    monkeypatch.setattr(load_test, "web_tier_status", checked)
    images = make_images(tmp_path / "images", {"a.jpg": b"label:a"})
    run_load(Config(images=images, url=tier.url), progress=Recorded(1, stream=io.StringIO()))
    assert events == ["checked", "started"]

    stream = io.StringIO()
    progress = load_test.Progress(10, stream=stream)
    progress.start(time.monotonic() - 100)  # as if made long before, its requests began 100 s ago
    progress.update(10, 0, 0)
    assert stream.getvalue().endswith("  0.1 answered/s\n")
    progress = load_test.Progress(10, stream=stream)
    progress.start(time.monotonic() - 100)
    progress.update(10, 5, 1, not_sent=3)  # the wrong answers are answers; failures are not
    assert stream.getvalue().endswith("  failed 5  wrong 1  not sent 3  0.0 answered/s\n")


def test_the_progress_bar_on_a_terminal_clears_what_a_longer_line_left():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = load_test.Progress(2, stream=stream)
    progress.update(1, 0, 0, not_sent=1)
    progress.update(2, 0, 0)  # shorter: no "not sent"
    redrawn = stream.getvalue().split("\r")[1:]
    assert len(redrawn) == 2 and all(line.endswith("/s\033[K") for line in redrawn), redrawn


@pytest.mark.parametrize("answered", [0, 110])
def test_every_word_of_a_plot_is_on_the_figure(answered):
    """An interrupted untrained run's title must fit the figure, not lose its start
    ("0 requests" for "110 requests"); with no point drawn, the instances' label must not
    be half off the figure's left edge."""
    plan = [Path(f"{n}.jpg") for n in range(5000)]
    outcomes = [load_test.Outcome(index=n, file=f"{n}.jpg", started_s=n * 0.1, latency_s=1.0, reached=True,
                                  label="cat", answer_name=str(n), untrained=True) for n in range(answered)]
    for outcome in outcomes:
        load_test.judge(outcome, {})
    outcomes += load_test.unfinished_outcomes(plan[answered:], [0.0] * 100, 0.0, set())
    report = load_test.Report(url="http://x", api="form", concurrency=100, planned=len(plan), started_at=0.0,
                              duration_s=14.0, outcomes=outcomes, interrupted_by="SIGINT",
                              instance_samples=[(0.0, 0), (1.0, 3), (2.0, 15), (14.0, 15)])
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = load_test.plot_figure(report)
    canvas = FigureCanvasAgg(fig)  # as savefig draws it
    canvas.draw()
    renderer = canvas.get_renderer()
    edge = fig.bbox
    texts = [axes.title for axes in fig.axes] + [axes.yaxis.label for axes in fig.axes]
    texts += [label for axes in fig.axes for label in axes.get_yticklabels()]
    words = [t for t in texts if t.get_text()]
    assert any("requests, concurrency 100" in t.get_text() for t in words)
    for text in words:
        box = text.get_window_extent(renderer)
        assert edge.x0 <= box.x0 and box.x1 <= edge.x1, (text.get_text(), box, edge)


def test_the_instance_line_is_drawn_to_the_runs_end():
    """Its last sample may be a second older than the last answer: the line stopped short."""
    outcomes = [load_test.Outcome(index=0, file="a.jpg", started_s=0.0, latency_s=1.8, reached=True,
                                  label="cat", answer_name="a")]
    report = load_test.Report(url="http://x", api="form", concurrency=1, planned=1, started_at=0.0,
                              duration_s=1.8, outcomes=outcomes, instance_samples=[(0.0, 0), (1.0, 2)])
    line = load_test.plot_figure(report).axes[1].lines[0]
    assert list(line.get_xdata()) == [0.0, 1.0, 1.8] and list(line.get_ydata()) == [0, 2, 2]


def test_a_plan_of_many_requests_is_not_held_in_memory(tmp_path):
    """A list of -n 20,000,000 took 2.2 GB before the first request."""
    images = [tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"]
    tracemalloc.start()
    try:
        plan = load_test.plan_requests(Config(images=tmp_path, num_requests=10**7), images, {})
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert allocated < 100_000  # a list of 10 million would take 80 MB
    assert len(plan) == 10**7
    assert [plan[0], plan[1], plan[2], plan[3], plan[10**7 - 1]] == [*images, images[0], images[0]]
    four = load_test.plan_requests(Config(images=tmp_path, num_requests=4), images, {})
    assert list(four) == [*images, images[0]]
    with pytest.raises(IndexError):
        plan[10**7]


OPEN_FILES_PROBE = """
import resource, sys
import load_test
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(load_test.open_files_warning(500))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("hard", [4096, 512])
def test_a_concurrency_past_the_open_files_limit_raises_it_or_says_so(hard):
    """At ulimit -n 1,024, -c 500 failed requests with "Too many open files", each tried
    again for 30 s as if the server could not be reached."""
    run = subprocess.run([sys.executable, "-c", OPEN_FILES_PROBE, "256", str(hard)], capture_output=True,
                         text=True, timeout=60, cwd=Path(load_test.__file__).parent, check=True)
    warning, soft = run.stdout.splitlines()
    if hard >= 2 * 500 + load_test.OPEN_FILES_SPARE:
        assert (warning, int(soft)) == ("None", 2 * 500 + load_test.OPEN_FILES_SPARE)
    else:
        assert warning.startswith("--concurrency 500 needs about 1064 open files and this process may "
                                  "open 512")
        assert int(soft) == 512


def test_a_plot_with_no_point_to_draw_has_no_legend_and_no_warning(tmp_path):
    """A run interrupted before any request ended plots none; matplotlib printed "No
    artists with labels found to put in legend" for the legend asked of it."""
    plan = [Path("a.jpg"), Path("b.jpg")]
    outcomes = load_test.unfinished_outcomes(plan, [0.0], 0.0, set())  # one abandoned, one never started
    report = load_test.Report(url="http://x", api="form", concurrency=2, planned=2, started_at=0.0,
                              duration_s=1.0, outcomes=outcomes, interrupted_by="SIGTERM")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_test.write_plot(report, tmp_path / "run.png")
    assert not [str(w.message) for w in caught]
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("talk", ["--verbose", "--quiet"])
def test_a_stdout_that_cannot_spell_a_file_name_gets_it_escaped_not_a_crash(tier, tmp_path, talk):
    """PYTHONIOENCODING=cp1252 (or a Latin-1 locale): '猫.jpg uploaded!' (-v), or its
    wrong answer's line, raised a UnicodeEncodeError mid-run: no report, no JSON."""
    images = make_images(tmp_path / "images", {"猫.jpg": b"label:tabby", "dog.jpg": b"label:dog"})
    expected = tmp_path / "expected.csv"
    expected.write_text("Image,Results\n猫,lion\ndog,dog\n", encoding="utf-8")
    report = tmp_path / "out.json"
    done = subprocess.run([sys.executable, load_test.__file__, "--url", tier.url, "--images", str(images),
                           "--expected", str(expected), "--json", str(report), talk],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "cp1252"}, timeout=60)
    out, err = done.stdout.decode("cp1252"), done.stderr.decode("cp1252")
    assert done.returncode == 1 and "Traceback" not in err, err  # 1: the wrong answer
    assert "RESULT: FAIL (0 failed, 1 wrong)" in out
    assert "\\u732b.jpg: wrong: answered '\\u732b:tabby'" in out, out
    if talk == "--verbose":
        assert "\\u732b.jpg uploaded!" in out
    data = json.loads(report.read_text(encoding="utf-8"))
    assert (data["answered"], data["wrong"]) == (2, 1) and data["requests"][1]["file"] == "猫.jpg"
