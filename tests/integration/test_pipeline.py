"""The whole pipeline on the embedded AWS: every answer is the right image's answer."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from common.fleet import WORKER_READY_TAG
from tests.conftest import PAGE_SCRIPTS, make_image
from tests.integration.conftest import (
    STACK_TIMEOUT,
    answers,
    assert_item_matches,
    assert_matches,
    clients,
    live_instances,
    queue_counts,
    references,
    wait_for,
)

pytestmark = STACK_TIMEOUT


@pytest.fixture(scope="module")
def images():
    """30 distinct images: 20 for POST /, 10 for /api/jobs."""
    return {f"img_{i:02d}.{'png' if i % 3 == 0 else 'jpg'}":
            make_image(1000 + i, fmt="PNG" if i % 3 == 0 else "JPEG") for i in range(30)}


@pytest.fixture(scope="module")
def expected(images, reference_model):
    return references(reference_model, images)


def test_end_to_end(stack, images, expected):
    s3, sqs, ec2 = clients(stack)
    peak = {"instances": 0}
    done = threading.Event()

    def watch_fleet():
        while not done.wait(0.25):
            peak["instances"] = max(peak["instances"], len(live_instances(ec2)))

    watcher = threading.Thread(target=watch_fleet, daemon=True)
    watcher.start()

    names = sorted(images)
    sync_names, batch_names = names[:20], names[20:]

    def post_one(name):
        reply = requests.post(f"{stack.web_url}/", files={"inputFile": (name, images[name])}, timeout=300)
        return name, reply

    with ThreadPoolExecutor(max_workers=20) as pool:
        sync_future = pool.map(post_one, sync_names)
        batch = requests.post(
            f"{stack.web_url}/api/jobs",
            files=[("files", (n, images[n])) for n in batch_names], timeout=60)
        sync_replies = list(sync_future)

    # POST /: each answer is its own image's label, as "<name without extension>:<label>".
    for name, reply in sync_replies:
        assert reply.status_code == 200, (name, reply.status_code, reply.text)
        assert reply.headers["Content-Type"].startswith("text/plain")
        assert reply.text == f"{name.rsplit('.', 1)[0]}:{expected[name].label}"
        assert reply.headers.get("X-Model-Untrained") == "true"

    # /api/jobs: label, score and top-5 per item.
    assert batch.status_code == 202, batch.text
    batch_id = batch.json()["batch_id"]

    def finished():
        got = requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=10).json()
        return got if all(i["state"] != "queued" for i in got["items"]) else None

    result = wait_for(finished, 300, "the batch to finish", interval=0.5)
    assert sorted(i["filename"] for i in result["items"]) == batch_names
    for item in result["items"]:
        assert item["state"] == "done", item
        assert item["untrained"] is True
        assert_item_matches(item, expected[item["filename"]], item["filename"])

    # The output bucket holds exactly one pair per image, with the same scores.
    out_bucket = f"{stack.prefix}-out-bucket"
    # (The stack is shared with other tests: count only this test's images. Every page:
    # one list is 1,000 keys at most, and the other tests leave hundreds.)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=out_bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])
            if o["Key"].rsplit("/", 1)[-1] in images]
    assert len(keys) == 30
    answered_by = set()
    for key in keys:
        obj = s3.get_object(Bucket=out_bucket, Key=key)
        name = key.rsplit("/", 1)[-1]
        body = obj["Body"].read().decode()
        assert body == f"{name},{expected[name].label}"
        meta = json.loads(obj["Metadata"]["result"])
        answered_by.add(meta["worker"])
        assert_matches(expected[name], meta["label"], meta["score"],
                       [p[0] for p in meta["top5"]], [p[1] for p in meta["top5"]], name)

    # Each worker that answered told EC2 it serves: without that, the controller would
    # take its instance for one that never did once READY_DEADLINE had passed.
    def untagged() -> list[str]:
        reply = ec2.describe_instances(InstanceIds=sorted(answered_by))
        return [i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]
                if WORKER_READY_TAG not in {t["Key"] for t in i.get("Tags", [])}]

    wait_for(lambda: not untagged(), 30, "every worker that answered to have tagged its instance ready")

    # The fleet grew for the work and went back to zero after it.
    wait_for(lambda: len(live_instances(ec2)) == 0, 30, "instances to return to 0")
    done.set()
    watcher.join()
    assert peak["instances"] > 0
    assert wait_for(lambda: queue_counts(sqs, stack.prefix) == {"req-queue": 0, "resp-queue": 0, "req-dlq": 0}
                    or None, 30, "every queue to be empty")


def test_bad_uploads_get_clear_errors_and_service_goes_on(stack, images, expected):
    script = "<script>alert(1)</script>.png"
    bad = {  # name: (bytes, status, the reason after "<name>: ")
        "notes.txt": (b"this is not an image", 415,
                      "not an image (the content is not JPEG, PNG, GIF, BMP, WEBP, TIFF or AVIF)"),
        "empty.jpg": (b"", 400, "file is empty"),
        "../../etc/passwd.jpg": (b"GIF89a nope", 422, "damaged or unreadable image: not a valid GIF file"),
        script: (b"\x89PNG\r\n\x1a\n broken", 422, "damaged or unreadable image: not a valid PNG file"),
    }
    for name, (data, status, reason) in bad.items():
        reply = requests.post(f"{stack.web_url}/", files={"inputFile": (name, data)}, timeout=30)
        assert reply.status_code == status, (name, reply.status_code, reply.text)
        # Plain text, for programs, the name as sent: never read as HTML (nosniff).
        assert reply.headers["Content-Type"] == "text/plain; charset=utf-8", name
        assert reply.headers["X-Content-Type-Options"] == "nosniff", name
        assert reply.text == f"{name}: {reason}"
    # The plain form's answer is a page: the name in it escaped, not a script.
    reply = requests.post(f"{stack.web_url}/?answer=page", files={"inputFile": (script, bad[script][0])},
                          timeout=30)
    assert reply.status_code == 422, reply.text
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<script>" not in reply.text
    assert '<h2 class="name">&lt;script&gt;alert(1)&lt;/script&gt;.png</h2>' in reply.text
    assert bad[script][2] in reply.text
    good = sorted(images)[0]
    reply = requests.post(f"{stack.web_url}/", files={"myfile": (good, images[good])}, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.text.endswith(f":{expected[good].label}")


def _read_one_response(conn: socket.socket) -> str:
    """One whole HTTP response: headers and body may arrive in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data.decode("latin-1")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_body_too_large_for_post_is_refused_at_once_named_and_not_waited_for(stack):
    """Under gunicorn: the 413 names the file, and a client that declares a large body
    and then stalls still gets its answer (the name is looked for in a bounded read)."""
    settings = stack.settings()
    too_large = b"\0" * (settings.max_upload_bytes + 2 * 1024 * 1024)
    reply = requests.post(f"{stack.web_url}/", files={"inputFile": ("big one.jpg", too_large)}, timeout=60)
    assert reply.status_code == 413
    limit = settings.max_upload_bytes
    assert reply.text.startswith(f"big one.jpg: file is larger than the limit of 10 MB ({limit} bytes), ")

    host, port = stack.web_url.removeprefix("http://").split(":")
    head = (b'--b\r\nContent-Disposition: form-data; name="inputFile"; filename="slow.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    # The socket's timeout is a hang guard: a server waiting for the rest of the body
    # would wait for ever, as none is sent.
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 50000000\r\n\r\n" + head)
        answer = _read_one_response(conn)  # and nothing more is sent
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "file is larger than the limit" in answer


@pytest.mark.parametrize("path, extra_bytes, status", [
    ("/", 2 * 1024 * 1024, 413),  # over the size limit
    ("/upload", -(300 * 1024), 404),  # a 300 KB upload to no route
    ("/api/status", -(300 * 1024), 405),  # or to one that takes no POST
])
def test_a_connection_carries_the_next_request_after_a_body_left_unread(stack, path, extra_bytes, status):
    """gunicorn drains only 64 KB of an unread body, and otherwise closes the connection
    after an answer that does not say so: a session would lose the request after a 413
    18 times in 30, and after a 401, 404 or 405 to a 300 KB upload every time. The web
    tier drops what it did not read, once it has answered."""
    settings = stack.settings()
    size = settings.max_upload_bytes + extra_bytes if extra_bytes > 0 else -extra_bytes
    part = (b'--b\r\nContent-Disposition: form-data; name="inputFile"; filename="big.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + b"\0" * size + b"\r\n--b--\r\n")
    host, port = stack.web_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        for _ in range(2):
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode()
                         + b"Content-Type: multipart/form-data; boundary=b\r\n"
                         + f"Content-Length: {len(part)}\r\n\r\n".encode() + part)
            assert _read_one_response(conn).startswith(f"HTTP/1.1 {status}")
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_one_response(conn).startswith("HTTP/1.1 200")


def test_a_body_badly_chunked_is_refused_as_malformed_and_its_connection_closed(stack):
    """gunicorn raises reading a chunk size that is not hex: that was a 500 "internal
    error", with a traceback in the log."""
    host, port = stack.web_url.removeprefix("http://").split(":")
    for path in ("/", "/api/jobs"):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode()
                         + b"Content-Type: multipart/form-data; boundary=b\r\n"
                         + b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\n--b\r\n")
            answer = _read_one_response(conn)
            assert answer.startswith("HTTP/1.1 400"), answer
            assert "the request body is malformed (Invalid chunk size" in answer
            try:
                closed = conn.recv(1) == b""  # what would follow on it cannot be read
            except ConnectionResetError:
                closed = True
            assert closed


@contextlib.contextmanager
def second_web_tier(stack, tmp_path, prefix: str, **env_overrides: str):
    """A web tier of its own under gunicorn, on the stack's AWS with queues and buckets
    named by `prefix` (which no worker reads); yields its URL and process, whose group
    is killed on the way out. Its log is tmp_path / "web.log"."""
    from localaws.harness import ROOT
    from tests.conftest import loopback_listener

    # Bound here and handed to gunicorn (`--bind fd://N`), as the stack does: a port found
    # free and let go could be taken by another server before gunicorn bound it.
    with loopback_listener() as listener:
        port = listener.getsockname()[1]
        env = {**os.environ, "AWS_ENDPOINT_URL": stack.aws_url, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "APP_PREFIX": prefix, "WEB_PORT": str(port), "WEB_JOURNAL_DIR": str(tmp_path / "journal"),
               **env_overrides}
        subprocess.run([sys.executable, "-m", "common.provision"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        with open(tmp_path / "web.log", "wb") as log:
            conf = str(ROOT / "web_tier" / "gunicorn.conf.py")
            web = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", conf,
                                    "--bind", f"fd://{listener.fileno()}", "web_tier:create_app()"],
                                   env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, pass_fds=(listener.fileno(),))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if web.poll() is not None:  # not 60 s of waiting on a web tier that has gone
            raise AssertionError(f"the second web tier exited ({web.returncode})")
        return answers(f"{url}/healthz")

    try:
        try:
            wait_for(up, 60, "the second web tier")
        except AssertionError as exc:
            log_tail = (tmp_path / "web.log").read_text(errors="replace")[-4000:]
            raise AssertionError(f"{exc}; its log ({tmp_path / 'web.log'}) ends:\n{log_tail}") from None
        yield url, web
    finally:
        if web.poll() is None:
            os.killpg(web.pid, signal.SIGKILL)
        web.wait(timeout=30)


def listeners_polling(sqs, responses: str, log_path) -> None:
    """Returns once a listener of the web tier logging to `log_path` has taken a probe
    from the response queue `responses` (and so polls it; it polls again at once): a
    healthy /healthz alone does not say its polls are open."""
    def probe_deleted() -> bool:
        attributes = sqs.get_queue_attributes(QueueUrl=responses, AttributeNames=["All"])["Attributes"]
        names = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
        return all(attributes[name] == "0" for name in names)

    sqs.send_message(QueueUrl=responses, MessageBody="a probe, not an answer")
    wait_for(lambda: "dropping malformed response" in log_path.read_text(), 30,
             "a listener to take the probe")
    wait_for(probe_deleted, 30, "the listener to delete the probe", interval=0.02)


def test_a_web_tier_told_to_stop_answers_its_waiting_requests_at_once(stack, tmp_path):
    """gunicorn gives requests `graceful_timeout` (5 s) after SIGTERM, then cuts them
    off: a POST / still waiting then got no answer at all. It now gets a 503 at
    once, saying where the result of its still-queued image will be."""
    # gunicorn's cut-off moved to 30 s, as long as the test waits: a request cut off gets
    # no body, which the assertions below would see (at 5 s, a loaded machine's answer
    # could come after it).
    with second_web_tier(stack, tmp_path, "unserved", RESULT_TIMEOUT="60",
                         GUNICORN_CMD_ARGS="--graceful-timeout 30") as (url, web):
        replies: list[requests.Response] = []
        waiting = threading.Thread(target=lambda: replies.append(requests.post(
            f"{url}/", files={"inputFile": ("waits.jpg", make_image(60))}, timeout=30)))
        waiting.start()
        _, sqs, _ = clients(stack)
        wait_for(lambda: queue_counts(sqs, "unserved")["req-queue"] == 1, 30, "the image to be queued")
        os.killpg(web.pid, signal.SIGTERM)  # as `make run` stops it: the whole group
        waiting.join(timeout=30)
    assert replies, (tmp_path / "web.log").read_text()
    reply = replies[0]
    # Cut off at gunicorn's 30 s, it would have had no body: this one is the app's own.
    assert reply.status_code == 503, reply.text
    assert reply.text.startswith("waits.jpg: the web tier is stopping; the image is still queued")
    assert "Retry-After" not in reply.headers  # stored and queued: sent again, classified twice
    assert f"/api/jobs/{reply.headers['X-Batch-Id']}" in reply.text and reply.headers["X-Item-Id"]


def test_a_stopped_web_tier_leaves_no_poll_to_take_the_next_answers(stack, tmp_path):
    """A long poll cut off by its process's exit is still open on SQS's side, which hands
    it what arrives in the rest of its wait, hidden then for the visibility timeout: after
    a restart, the answers of the next 20 s would come 30 s late. The web tier ends its
    polls before it exits."""
    with second_web_tier(stack, tmp_path, "leftpolls") as (_url, web):
        _, sqs, _ = clients(stack)
        responses = sqs.get_queue_url(QueueName="leftpolls-resp-queue")["QueueUrl"]
        listeners_polling(sqs, responses, tmp_path / "web.log")
        os.killpg(web.pid, signal.SIGTERM)  # its listeners' polls open
        web.wait(timeout=30)
    sqs.send_message(QueueUrl=responses, MessageBody="sent once the web tier has gone")
    got = sqs.receive_message(QueueUrl=responses, WaitTimeSeconds=10).get("Messages", [])
    assert [m["Body"] for m in got] == ["sent once the web tier has gone"], (tmp_path / "web.log").read_text()


def test_an_answer_a_killed_web_tiers_poll_took_comes_back_within_the_response_queues_timeout(
        stack, tmp_path):
    """A web process ended outright cannot end its polls: SQS hands what arrives in the
    rest of their wait to them, hidden then for the response queue's visibility timeout.
    At SQS's default of 30 s, such an answer reached the process that serves on half a
    minute late; now within RESPONSE_VISIBILITY_TIMEOUT_S (10 s)."""
    with second_web_tier(stack, tmp_path, "killedpolls") as (_url, web):
        _, sqs, _ = clients(stack)
        responses = sqs.get_queue_url(QueueName="killedpolls-resp-queue")["QueueUrl"]
        listeners_polling(sqs, responses, tmp_path / "web.log")
        os.killpg(web.pid, signal.SIGKILL)  # its listeners' polls open, as they always are
        # At once: the polls left open last 4 s at most, and a slow machine's waits below
        # (the process's end, the context's) could outlast them.
        sqs.send_message(QueueUrl=responses, MessageBody="sent once the web tier was killed")
        web.wait(timeout=30)

    def in_flight() -> bool:
        attributes = sqs.get_queue_attributes(QueueUrl=responses, AttributeNames=["All"])["Attributes"]
        return attributes["ApproximateNumberOfMessagesNotVisible"] == "1"

    wait_for(in_flight, 15, "a poll the killed process left open to take the answer", interval=0.05)
    got: list[dict] = []
    deadline = time.monotonic() + 15
    while not got and time.monotonic() < deadline:
        got = sqs.receive_message(QueueUrl=responses, WaitTimeSeconds=1).get("Messages", [])
    assert [m["Body"] for m in got] == ["sent once the web tier was killed"]


# The web tier's line for a connection it cut, a request arriving too slowly (web_tier/slow_clients.py).
HEADERS_CUT = "cut, connection closed: its headers were not all in within WEB_RECEIVE_TIMEOUT"
BODY_CUT = "cut, connection closed: its body came slower than WEB_MIN_RECEIVE_RATE"


def an_upload_cut_short(image: bytes) -> bytes:
    """A POST / of `image` whose body stops 2,000 bytes in, of the 100,000 it says it has."""
    boundary = "b0undary"
    return (f"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="inputFile"; filename="slow.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + image[:2000]


def test_a_client_that_stops_sending_has_its_connection_closed(stack, tmp_path):
    """A client that sends half a request and goes quiet (a slow-loris) would hold a thread
    for as long as it kept the connection open: ~1,024 such connections, no API key
    needed, leave /healthz unanswered. A read that gets nothing for WEB_RECEIVE_TIMEOUT
    ends the connection: in the headers, with nothing; in the body, with a 408 first."""
    with second_web_tier(stack, tmp_path, "slowsender", WEB_RECEIVE_TIMEOUT="1") as (url, _web):
        port = int(url.rsplit(":", 1)[1])
        in_headers, in_body = socket.socket(), socket.socket()
        for quiet in (in_headers, in_body):
            quiet.connect(("127.0.0.1", port))
            quiet.settimeout(60)  # a failure's bound: the server's own is 1 s
        in_headers.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: multip")
        in_body.sendall(an_upload_cut_short(make_image(61)))

        def to_the_end(quiet: socket.socket) -> bytes:
            received = b""
            while chunk := quiet.recv(1 << 16):  # b"": the server closed the connection
                received += chunk
            quiet.close()
            return received

        assert to_the_end(in_headers) == b""
        answer = to_the_end(in_body)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        assert b"the request's body stopped arriving" in answer, answer
        assert answers(f"{url}/healthz")
    # One line for each connection cut so: anyone can open some and go quiet, and a
    # traceback each would fill the log.
    log = (tmp_path / "web.log").read_text()
    assert log.count(f"{HEADERS_CUT} (1 s)") == 1, log
    assert "Traceback" not in log, log


def _to_the_end(sock: socket.socket) -> bytes:
    """What the server sends on `sock` until it closes the connection."""
    received = b""
    while chunk := sock.recv(1 << 16):
        received += chunk
    sock.close()
    return received


def _trickle_until_answered(socks: dict[str, socket.socket], bound_s: float) -> dict[str, bytes]:
    """Send each connection a byte every half second, each of the server's reads getting
    something long before WEB_RECEIVE_TIMEOUT, until the server answers or closes it;
    what it sent on each. Fails if any is still open after `bound_s`."""
    deadline = time.monotonic() + bound_s
    open_socks, received = dict(socks), {}
    while open_socks:
        assert time.monotonic() < deadline, f"still served after {bound_s:.0f} s: {sorted(open_socks)}"
        for sock in open_socks.values():
            with contextlib.suppress(OSError):  # closed by the server: readable, below
                sock.sendall(b"a")
        readable, _, _ = select.select(list(open_socks.values()), [], [], 0.5)
        for name in [name for name, sock in open_socks.items() if sock in readable]:
            received[name] = _to_the_end(open_socks.pop(name))
    return received


def _trickled_request(sock: socket.socket, request: bytes, pieces: int, gap_s: float) -> int | None:
    """Send `request` in `pieces`, `gap_s` apart; the status of its answer, read whole,
    or None if the server closed the connection instead."""
    step = -(-len(request) // pieces)
    try:
        for at in range(0, len(request), step):
            if at:
                time.sleep(gap_s)
            sock.sendall(request[at:at + step])
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        answer.read()
    except (ConnectionError, http.client.RemoteDisconnected):
        return None
    return answer.status


def test_a_client_that_trickles_its_request_has_its_connection_closed(stack, tmp_path):
    """A client that trickles its request, a byte every so often, gets something to each
    read long before WEB_RECEIVE_TIMEOUT, and would hold a thread for as long as it
    likes (a slow-loris): ~1,024 such connections, no API key needed, leave /healthz
    unanswered. A request's headers must all be in within WEB_RECEIVE_TIMEOUT, and its
    body must average WEB_MIN_RECEIVE_RATE once that long has passed: else the connection
    ends, a body's with a 408 first. A connection kept alive between requests is not
    cut meanwhile; its requests share the time for headers."""
    with second_web_tier(stack, tmp_path, "trickler", WEB_RECEIVE_TIMEOUT="3") as (url, _web):
        port = int(url.rsplit(":", 1)[1])
        # Kept alive: two requests whose headers take 0.5 s each, with 3 s between them,
        # idle (gunicorn keeps a connection alive 5 s), are served; a third whose
        # headers take 3 s, 4 s in all on the connection, is cut. (A second each side of
        # the 3 s, for a slow machine's oversleeps.)
        keeper = socket.create_connection(("127.0.0.1", port), timeout=60)
        asked = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
        assert _trickled_request(keeper, asked, pieces=2, gap_s=0.5) == 200
        time.sleep(3)  # 0.5 + 3 + 0.5 s, past WEB_RECEIVE_TIMEOUT if idle time counted
        assert _trickled_request(keeper, asked, pieces=2, gap_s=0.5) == 200
        assert _trickled_request(keeper, asked, pieces=7, gap_s=0.5) is None
        keeper.close()

        in_headers, in_body = (socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2))
        # A header line that never ends (gunicorn refuses one only past 8 KB).
        in_headers.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nX-Trickle: ")
        in_body.sendall(an_upload_cut_short(make_image(62)))
        received = _trickle_until_answered({"headers": in_headers, "body": in_body}, bound_s=60)
        assert received["headers"] == b""
        assert received["body"].startswith(b"HTTP/1.1 408 "), received["body"][:300]
        assert b"the request's body came too slowly" in received["body"], received["body"]
        assert answers(f"{url}/healthz")
    s3, sqs, _ = clients(stack)
    assert s3.list_objects_v2(Bucket="trickler-in-bucket")["KeyCount"] == 0
    assert queue_counts(sqs, "trickler")["req-queue"] == 0
    # One line for each connection cut, saying why.
    log = (tmp_path / "web.log").read_text()
    assert log.count(f"{HEADERS_CUT} (3 s)") == 2, log  # the kept-alive one, and the one that never ends
    assert log.count(f"{BODY_CUT} (2048 bytes/s)") == 1, log
    assert "Traceback" not in log, log


def test_a_client_that_reads_nothing_has_its_connection_closed(stack, tmp_path):
    """gunicorn's threads send with no time limit: a client asking for answers and never
    reading them holds a thread for as long as it likes (100 such connections leave
    /healthz unanswered). A send that makes no progress for WEB_SEND_TIMEOUT ends the
    connection."""
    with second_web_tier(stack, tmp_path, "slowreader", WEB_SEND_TIMEOUT="1") as (url, _web):
        port = int(url.rsplit(":", 1)[1])
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        # The page's largest script, asked for enough times to make ~11 MB of answers: far
        # past what both sockets' buffers hold.
        script = max(PAGE_SCRIPTS.glob("*.js"), key=lambda path: path.stat().st_size)
        asked = -(-11_000_000 // script.stat().st_size)
        reader.sendall(f"GET /static/js/{script.name} HTTP/1.1\r\nHost: test\r\n\r\n".encode() * asked)
        log = tmp_path / "web.log"
        wait_for(lambda: "Socket error processing request" in log.read_text(), 30,
                 "the web tier to give up on the reader")
        reader.settimeout(10)
        received = b""
        while chunk := reader.recv(1 << 16):  # to the end: the server closed the connection
            received += chunk
        reader.close()
        assert 0 < received.count(b"HTTP/1.1 200") < asked
        assert answers(f"{url}/healthz")
