"""The WSGI layer in front of the embedded AWS's moto (localaws/moto_middleware.py)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

from localaws import moto_middleware


class FakeAws:
    """A WSGI app that answers every request with how many requests of its kind it has seen."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, environ, start_response):
        action = moto_middleware.aws_action(environ)
        body = environ["wsgi.input"].read()  # the middleware must leave the body readable
        self.seen.append(action)
        start_response("200 OK", [("Content-Type", "text/xml")])
        return [f"{action} #{self.seen.count(action)} {len(body)}".encode()]


def describe(client, filters: str = "tag:Name", region: str = "us-east-1", key: str = "AKIDEXAMPLE") -> str:
    signed = f"AWS4-HMAC-SHA256 Credential={key}/20261123/{region}/ec2/aws4_request, Signature=0"
    return client.post("/", data=f"Action=DescribeInstances&Version=2016-11-15&Filter.1.Name={filters}",
                       headers={"Authorization": signed}).text


def test_describe_instances_is_answered_once_per_change():
    from werkzeug.test import Client

    aws = FakeAws()
    client = Client(moto_middleware.Ec2ReadCache(aws))
    first = describe(client)
    assert first.startswith("DescribeInstances #1 ")
    assert describe(client) == first  # nothing changed: moto is not asked again
    assert describe(client, "instance-state-name").startswith("DescribeInstances #2 ")  # other question
    # The same question from another region, or another account's key, is another question.
    assert describe(client, region="eu-west-1").startswith("DescribeInstances #3 ")
    assert describe(client, key="AKIDOTHER").startswith("DescribeInstances #4 ")
    # SQS (JSON protocol) and S3 calls do not touch EC2.
    client.post("/", headers={"X-Amz-Target": "AmazonSQS.SendMessage"}, data="{}")
    client.put("/bucket/key", data=b"x")
    client.post("/", data="Action=DescribeImages&Version=2016-11-15")
    assert describe(client) == first
    # Any EC2 change, and a moto reset, make the next describe go to moto.
    client.post("/", data="Action=RunInstances&Version=2016-11-15&MinCount=1")
    assert describe(client).startswith("DescribeInstances #5 ")
    client.post("/", data="Action=TerminateInstances&Version=2016-11-15")
    assert describe(client).startswith("DescribeInstances #6 ")
    client.post("/moto-api/reset")
    assert describe(client).startswith("DescribeInstances #7 ")
    assert aws.seen.count("RunInstances") == 1 and aws.seen.count("SendMessage") == 1


class SlowEc2:
    """A WSGI EC2 whose RunInstances is held half done until the test lets it finish."""

    def __init__(self) -> None:
        self.instances = 0
        self.running = threading.Event()
        self.finish = threading.Event()

    def __call__(self, environ, start_response):
        action = moto_middleware.aws_action(environ)
        if action == "RunInstances":
            self.running.set()
            assert self.finish.wait(10)
            self.instances += 1
        start_response("200 OK", [("Content-Type", "text/xml")])
        return [f"{self.instances} instances".encode()]


def test_a_describe_during_a_change_is_not_kept():
    """The CI failure of 2026-11-22: a describe answered mid-launch was served until the next change."""
    from werkzeug.test import Client

    ec2 = SlowEc2()
    cache = moto_middleware.Ec2ReadCache(ec2)
    launch = threading.Thread(
        target=lambda: Client(cache).post("/", data="Action=RunInstances&Version=2016-11-15&MinCount=1"))
    launch.start()
    assert ec2.running.wait(10)
    assert describe(Client(cache)) == "0 instances"  # true while the launch is half done
    ec2.finish.set()
    launch.join(10)
    assert describe(Client(cache)) == "1 instances"


def written_counts(out, expected: dict[str, int]) -> dict[str, int]:
    """Requests by action in the statistics file, once it shows `expected` or the deadline passes."""
    counts: dict[str, int] = {}
    deadline = time.monotonic() + 30  # bounds a failure only: a loaded machine writes late
    while time.monotonic() < deadline and counts != expected:
        time.sleep(0.05)
        if out.exists():
            counts = {k: v["requests"] for k, v in json.loads(out.read_text()).items()}
    return counts


def test_action_stats_counts_requests_and_writes_them(tmp_path):
    from werkzeug.test import Client

    out = tmp_path / "stats.json"
    with contextlib.closing(moto_middleware.ActionStats(FakeAws(), out)) as stats:
        client = Client(stats)
        for _ in range(3):
            client.post("/", headers={"X-Amz-Target": "AmazonSQS.ReceiveMessage"}, data="{}")
        client.get("/bucket/some/key")
        expected = {"ReceiveMessage": 3, "S3 GET object": 1}
        assert written_counts(out, expected) == expected
    assert "moto-stats" not in [thread.name for thread in threading.enumerate()]  # closed, not left running


def test_action_stats_tells_cached_describes_apart(tmp_path):
    from werkzeug.test import Client

    out = tmp_path / "stats.json"
    cached = moto_middleware.Ec2ReadCache(FakeAws())
    with contextlib.closing(moto_middleware.ActionStats(cached, out)) as stats:
        client = Client(stats)
        for _ in range(3):
            describe(client)
        expected = {"DescribeInstances": 1, "DescribeInstances (cached)": 2}
        assert written_counts(out, expected) == expected



def test_a_body_cut_short_by_a_dead_client_stores_nothing(monkeypatch):
    """A client killed mid-upload: gunicorn hands moto what arrived, and moto
    stored it as the object. S3 refuses the request (IncompleteBody)."""
    import io

    from werkzeug.test import EnvironBuilder

    called = []

    def moto_app(environ, start_response):
        called.append(environ["wsgi.input"].read())
        start_response("200 OK", [])
        return [b""]

    app = moto_middleware.ServiceLocks(moto_app)
    headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=k/20260101/us-east-1/s3/aws4_request, X=y"}
    cut = EnvironBuilder(method="PUT", path="/bucket/key", headers=headers).get_environ()
    cut.update({"CONTENT_LENGTH": "100", "wsgi.input": io.BytesIO(b"x" * 40)})
    statuses = []
    body = b"".join(app(cut, lambda status, headers: statuses.append(status)))
    assert statuses == ["400 Bad Request"] and b"<Code>IncompleteBody</Code>" in body
    assert called == []

    whole = EnvironBuilder(method="PUT", path="/bucket/key", headers=headers).get_environ()
    whole.update({"CONTENT_LENGTH": "100", "wsgi.input": io.BytesIO(b"x" * 100)})
    b"".join(app(whole, lambda status, headers: statuses.append(status)))
    assert statuses[-1] == "200 OK" and called == [b"x" * 100]


def guarded(bind_host: str = "127.0.0.1"):
    from werkzeug.test import Client

    aws = FakeAws()
    return aws, Client(moto_middleware.BrowserGuard(aws, bind_host))


def test_what_a_web_browser_sends_is_refused_and_never_reaches_moto():
    """Any page open in the developer's browser could otherwise read the uploads, answer in
    the workers' place or reset everything: moto takes any credentials, any origin."""
    aws, client = guarded()
    program = {"Host": "127.0.0.1:5000"}
    assert client.post("/moto-api/reset", headers=program).status_code == 200  # as the tests ask
    for browser in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Mode": "no-cors"}, {"Sec-Fetch-Dest": "image"}):
        for method in ("GET", "POST", "OPTIONS"):  # OPTIONS: a CORS preflight
            reply = client.open("/moto-api/reset", method=method, headers={**program, **browser})
            assert reply.status_code == 403, (method, browser)
            assert "Access-Control-Allow-Origin" not in reply.headers
            assert reply.text.startswith("the embedded AWS refuses this request: it comes from a web browser")
    assert aws.seen == ["moto-api"]


def test_a_host_other_than_the_servers_is_refused_unless_it_is_bound_to_every_address():
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1."""
    aws, client = guarded()
    for host in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "bucket.localhost:5000", "127.0.0.1"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:5000", "127.0.0.1.evil.example", "localhost.evil.example:5000"):
        reply = client.get("/", headers={"Host": host})
        assert reply.status_code == 403 and "names the host" in reply.text, host
    assert len(aws.seen) == 5
    # Bound to every address: any address, and of names its own and localhost's only.
    import socket

    _, anywhere = guarded("0.0.0.0")
    for host in ("10.0.0.7:5000", "[fe80::1]:5000", "localhost:5000", f"{socket.gethostname()}:5000"):
        assert anywhere.get("/", headers={"Host": host}).status_code == 200, host
    assert anywhere.get("/", headers={"Host": "evil.example:5000"}).status_code == 403
    assert anywhere.get("/", headers={"Host": "10.0.0.7:5000", "Origin": "http://x"}).status_code == 403
    _, v6 = guarded("[::1]")
    assert v6.get("/", headers={"Host": "[::1]:5000"}).status_code == 200

