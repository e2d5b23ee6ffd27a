"""/healthz and /api/status: what operators and the page's status line read."""

from __future__ import annotations

import io
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from common.fleet import WORKER_READY_TAG, report_worker_failed
from common.names import PREFIX_TAG
from tests.conftest import make_image
from tests.unit.conftest import services_of, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def quiet_client(make_web_app):
    return make_web_app(start_background=False).test_client()


def test_healthz_ok(quiet_client):
    response = quiet_client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"ok": True}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def health_clock(make_web_app):
    """A web app without background work, whose /healthz answers are reused by a clock
    the test moves, and the AWS calls its checks make, by name."""
    from web_tier.health_check import HealthCheck, unreachable_part

    app = make_web_app(start_background=False)
    services = services_of(app)
    clock = Clock()
    services.health = HealthCheck(lambda: unreachable_part(services.aws), clock=clock)
    calls: list[str] = []
    for client in services.aws.probes.values():
        client.meta.events.register("before-call", lambda model, **_: calls.append(model.name))
    # A first check also looks the queues' URLs up: not part of what is counted.
    checks = _Checks(calls)
    return app.test_client(), clock, checks


class _Checks:
    """The AWS calls of the checks, without the queues' URLs' one-off lookups."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def names(self) -> list[str]:
        return sorted(name for name in self.calls if name != "GetQueueUrl")

    def __len__(self) -> int:
        return len(self.names())


def test_healthz_503_when_a_queue_is_gone(health_clock, web_aws):
    client, clock, _ = health_clock
    assert client.get("/healthz").status_code == 200
    web_aws.sqs.delete_queue(QueueUrl=web_aws.response_queue_url)
    clock.now += 1.0
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["ok"] is False
    assert "response queue" in body["error"]


def test_unauthenticated_answers_name_the_aws_error_but_not_its_message(quiet_client, web_aws,
                                                                         monkeypatch):
    """AWS's messages can name accounts, roles and ARNs: operators find them in the log."""
    from botocore.exceptions import ClientError

    secret = "User: arn:aws:iam::123456789012:user/ops is not authorized to perform: ec2:Describe"

    def denied(**kwargs):
        raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": secret}}, "Describe")

    monkeypatch.setattr(web_aws.ec2, "describe_instances", denied)
    monkeypatch.setattr(web_aws.probes["s3"], "head_bucket", denied)
    health, status = quiet_client.get("/healthz"), quiet_client.get("/api/status")
    assert "UnauthorizedOperation" in health.text and "UnauthorizedOperation" in status.text
    assert "123456789012" not in health.text + status.text


def test_healthz_503_when_a_bucket_is_gone(quiet_client, web_aws):
    web_aws.s3.delete_bucket(Bucket=web_aws.settings.output_bucket)
    response = quiet_client.get("/healthz")
    assert response.status_code == 503
    assert "output bucket" in response.get_json()["error"]


def test_healthz_asks_aws_once_a_second_at_most_and_reuses_a_failure_too(health_clock, web_aws):
    """Each check is four AWS calls, each billed on AWS, and /healthz needs no key."""
    client, clock, calls = health_clock
    assert client.get("/healthz").status_code == 200
    assert calls.names() == ["GetQueueAttributes", "GetQueueAttributes", "HeadBucket", "HeadBucket"]
    for _ in range(3):
        clock.now += 0.25
        assert client.get("/healthz").status_code == 200
    assert len(calls) == 4
    web_aws.s3.delete_bucket(Bucket=web_aws.settings.output_bucket)
    clock.now += 0.25  # a second after the check ended: asked again
    assert client.get("/healthz").status_code == 503
    assert len(calls) == 8
    web_aws.s3.create_bucket(Bucket=web_aws.settings.output_bucket)
    clock.now += 0.75
    assert client.get("/healthz").status_code == 503  # the failure, reused
    assert len(calls) == 8
    clock.now += 0.25
    assert client.get("/healthz").status_code == 200
    assert len(calls) == 12


def test_healthz_callers_wait_a_bounded_time_for_a_check_that_hangs():
    """A check's calls have short timeouts, but not all of its time is bounded (a DNS
    lookup): its callers meanwhile are answered 503 once they have waited long enough,
    and the check's own answer is kept when it comes."""
    from web_tier.health_check import HealthCheck

    in_check, go_on = threading.Event(), threading.Event()

    def hangs() -> None:
        in_check.set()
        assert go_on.wait(30)

    health = HealthCheck(hangs, wait_s=0.2)
    first: list = []
    checking = threading.Thread(target=lambda: first.append(health.answer()), daemon=True)
    checking.start()
    assert in_check.wait(30)
    assert health.answer() == "AWS unanswered: a check has been running for over 0.2 s"
    go_on.set()
    checking.join(30)
    assert first == [None] and health.answer() is None  # reused, as any answer


def test_healthz_callers_during_a_check_wait_for_its_answer(health_clock, web_aws, monkeypatch):
    client, clock, calls = health_clock
    health = services_of(client.application).health
    probes = services_of(client.application).aws.probes["s3"]
    head_bucket = probes.head_bucket
    in_check, go_on = threading.Event(), threading.Event()

    def held(**kwargs):
        in_check.set()
        assert go_on.wait(30)
        return head_bucket(**kwargs)

    class CountedLock:
        """The check's lock, counting those who came to take it."""

        def __init__(self) -> None:
            self.lock, self.comers = threading.Lock(), 0

        def acquire(self, timeout: float = -1) -> bool:
            self.comers += 1
            return self.lock.acquire(timeout=timeout)

        def release(self) -> None:
            self.lock.release()

    monkeypatch.setattr(probes, "head_bucket", held)
    health._lock = CountedLock()
    answers: list = []
    asking = [threading.Thread(target=lambda: answers.append(client.get("/healthz")), daemon=True)
              for _ in range(3)]
    asking[0].start()
    assert in_check.wait(30)
    for thread in asking[1:]:
        thread.start()
    # The others have come to the check under way, and wait for it.
    wait_until(lambda: health._lock.comers == 3)
    go_on.set()
    for thread in asking:
        thread.join(30)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert calls.names() == ["GetQueueAttributes", "GetQueueAttributes", "HeadBucket", "HeadBucket"]


def run_instance(ec2, name: str, prefix: str = "") -> str:
    tags = [{"Key": "Name", "Value": name}]
    if prefix:
        tags.append({"Key": PREFIX_TAG, "Value": prefix})
    reply = ec2.run_instances(
        # One of moto's built-in images (listing them all is slow).
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t2.micro",
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    return reply["Instances"][0]["InstanceId"]


@pytest.mark.parametrize("files, file_bytes, request_bytes", [
    (25, 300_000, 25 * 300_000 + 2**20),  # web_settings: the files at their limit, and the form's room
    (1000, 10 * 2**20, 2 * 2**30),  # the defaults: capped at 2 GiB, less than 1,000 files of 10 MB
])
def test_status_says_the_upload_limits(make_web_app, files, file_bytes, request_bytes):
    """Else a client could learn them only from a 413."""
    app = make_web_app(start_background=False, max_files_per_request=files, max_upload_bytes=file_bytes)
    limits = app.test_client().get("/api/status").get_json()["limits"]
    assert limits == {"max_upload_bytes": file_bytes, "max_files_per_request": files,
                      "max_request_bytes": request_bytes}
    assert app.config["MAX_CONTENT_LENGTH"] == request_bytes  # what the web tier enforces


def test_status_shape_and_counts(quiet_client, web_aws):
    ours = web_aws.settings.prefix
    serving = run_instance(web_aws.ec2, "app-tier-instance-1", ours)
    broken = run_instance(web_aws.ec2, "app-tier-instance-2", ours)
    assert report_worker_failed(web_aws, broken, "model-unavailable")
    gone = run_instance(web_aws.ec2, "app-tier-instance-3", ours)
    web_aws.ec2.terminate_instances(InstanceIds=[gone])
    run_instance(web_aws.ec2, "web-instance", ours)  # not an app-tier instance
    run_instance(web_aws.ec2, "app-tier-instance-1", "someone-else")  # another deployment's
    upload = {"files": [(io.BytesIO(make_image(1)), "a.jpg"), (io.BytesIO(make_image(2)), "b.jpg")]}
    assert quiet_client.post("/api/jobs", data=upload, content_type="multipart/form-data").status_code == 202

    status = quiet_client.get("/api/status").get_json()
    assert status["queue"] == {"visible": 2, "in_flight": 0, "delayed": 0}
    assert status["responses_waiting"] == 0
    assert status["dead_letter"] == 0
    assert status["instances"]["running"] == 2
    assert status["instances"]["pending"] == 0
    assert status["instances"]["stopping"] == 0
    assert status["instances"]["shutting-down"] == 0
    assert status["instances_total"] == 2
    assert status["workers_failed"] == 1
    assert status["workers_serving"] == 0  # none has said it serves
    web_aws.ec2.create_tags(Resources=[serving], Tags=[{"Key": WORKER_READY_TAG, "Value": "1"}])
    web_aws.ec2.create_tags(Resources=[broken], Tags=[{"Key": WORKER_READY_TAG, "Value": "1"}])
    wait_until(lambda: quiet_client.get("/api/status").get_json()["workers_serving"] == 1,
               why=lambda: "the serving worker counted, not the one that gave up")
    assert status["totals"] == {"uploaded": 2, "answered": 0, "failed": 0}
    # This process's own counts (a restarted web tier starts again): since when.
    assert status["totals_since"] <= status["time"]
    assert status["untrained"] is None
    assert status["api_key_required"] is False
    assert isinstance(status["time"], float)
    assert "errors" not in status


def test_api_answers_are_not_cached(quiet_client):
    """Chrome holds a poll of /api/status behind one still waiting on AWS for 20 s, to
    share its cached answer: the status line would freeze."""
    batch = quiet_client.post("/api/jobs", data={"files": (io.BytesIO(make_image(1)), "a.jpg")},
                              content_type="multipart/form-data").get_json()["batch_id"]
    for path in ("/api/status", f"/api/jobs/{batch}", "/api/jobs/" + "0" * 32):
        assert quiet_client.get(path).headers["Cache-Control"] == "no-store", path


def test_status_is_cheap(quiet_client, web_aws):
    calls = []
    for client in (web_aws.sqs, web_aws.ec2):
        client.meta.events.register("before-call.*.*", lambda model, **kw: calls.append(model.name))
    for _ in range(5):
        assert quiet_client.get("/api/status").status_code == 200
    # Queue URLs are looked up once per process; then four calls, reused for a second.
    assert len([c for c in calls if c != "GetQueueUrl"]) <= 4, calls


def test_status_survives_aws_errors(quiet_client, web_aws):
    web_aws.sqs.delete_queue(QueueUrl=web_aws.request_queue_url)
    response = quiet_client.get("/api/status")
    assert response.status_code == 200
    body = response.get_json()
    assert body["queue"] is None
    assert body["errors"]


def test_s3_failing_while_a_batch_is_rebuilt_is_a_503_not_a_500(quiet_client, web_aws, monkeypatch):
    from botocore.exceptions import ClientError

    def s3_down(**kwargs):
        raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "slow down"}}, "ListObjectsV2")

    monkeypatch.setattr(web_aws.s3, "list_objects_v2", s3_down)
    response = quiet_client.get(f"/api/jobs/{'c' * 32}")  # not in memory: rebuilt from S3
    assert response.status_code == 503
    assert "ServiceUnavailable" in response.get_json()["error"]


@contextmanager
def refresh_stuck_in_aws(client, monkeypatch) -> Iterator[threading.Thread]:
    """A GET /api/status from another thread, its refresh held inside its AWS read
    until the block ends; yields that thread."""
    reader = services_of(client.application).status
    read_aws, entered, release = reader._read_aws, threading.Event(), threading.Event()

    def slow_aws():
        entered.set()
        release.wait(10)
        return read_aws()

    monkeypatch.setattr(reader, "_read_aws", slow_aws)
    refresher = threading.Thread(target=lambda: client.get("/api/status"))
    refresher.start()
    try:
        assert entered.wait(5)
        yield refresher
    finally:
        release.set()
        refresher.join(5)


def test_status_answers_from_the_last_snapshot_while_aws_is_slow(quiet_client, monkeypatch):
    """Pages poll every 2 s: a slow AWS must not pile their requests up behind one refresh."""
    services_of(quiet_client.application).status.cache_s = 0.0  # every read wants a refresh
    assert quiet_client.get("/api/status").status_code == 200  # the first snapshot
    with refresh_stuck_in_aws(quiet_client, monkeypatch) as refresher:
        answer = quiet_client.get("/api/status")  # while the refresh is stuck in AWS
        assert answer.status_code == 200 and "queue" in answer.get_json()
        assert refresher.is_alive(), "the refresh was not waited for"
        assert "errors" not in answer.get_json()  # a moment old: not worth a word
        # Long stuck, the answer says how old its figures are.
        monkeypatch.setattr("web_tier.status.STALE_AFTER_S", 0.0)
        monkeypatch.setattr("web_tier.status.REFRESH_WAIT_S", 0.1)
        stale = quiet_client.get("/api/status").get_json()
        assert any("AWS has not answered for" in e for e in stale["errors"])
        assert stale["read_at"] < stale["time"]


def test_status_after_an_idle_spell_says_its_figures_are_old_without_blaming_aws(quiet_client, monkeypatch):
    """An hour without a reader, then two at once: the second must not be told "AWS has
    not answered for 3600 s" while the first's refresh has only just asked; and told
    nothing, its hour-old figures would look current."""
    reader = services_of(quiet_client.application).status
    assert quiet_client.get("/api/status").status_code == 200
    reader._cached = (reader._cached[0] - 3600, reader._cached[1])  # an hour ago
    monkeypatch.setattr("web_tier.status.REFRESH_WAIT_S", 0.1)
    with refresh_stuck_in_aws(quiet_client, monkeypatch):
        errors = quiet_client.get("/api/status").get_json()["errors"]
    assert len(errors) == 1
    stale = r"AWS has not answered for \d\.\d s: these figures are 360\d s old"
    assert re.fullmatch(stale, errors[0]), errors


def test_a_refresh_whose_thread_could_not_start_is_tried_again_at_the_next_read(quiet_client, monkeypatch):
    """Under a process or memory limit a thread may not start: the refresh must not be
    taken for under way for good, every later read waiting, then blaming AWS."""
    reader = services_of(quiet_client.application).status
    reader.cache_s = 0.0  # every read wants a refresh
    start = threading.Thread.start

    def refused(thread):
        if thread.name == "status-refresh":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refused)
    assert quiet_client.get("/api/status").status_code == 500
    monkeypatch.setattr(threading.Thread, "start", start)
    answer = quiet_client.get("/api/status").get_json()
    assert "queue" in answer and "errors" not in answer, answer


def test_what_a_snapshot_says_of_its_age_while_aws_is_asked():
    from web_tier.status import STALE_AFTER_S, staleness
    fresh, stale = 100.0 - STALE_AFTER_S / 2, 100.0 - STALE_AFTER_S - 1
    assert staleness(fresh, None, 100.0) == "" and staleness(stale, None, 100.0) == ""  # AWS not asked
    assert staleness(fresh, 99.0, 100.0) == ""  # fresh, and asked a moment ago
    assert staleness(fresh, 80.0, 100.0) == "AWS has not answered for 20 s: these figures are 2 s old"
    assert staleness(40.0, 99.5, 100.0) == "AWS has not answered for 0.5 s: these figures are 60 s old"
    assert staleness(None, 99.5, 100.0) == "AWS has not answered for 0.5 s: there are no figures yet"


@contextmanager
def aws_hanging(reader, monkeypatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """`reader`'s AWS reads hang until the block ends; yields (entered, left)."""
    entered, left, release = threading.Event(), threading.Event(), threading.Event()

    def hang():
        entered.set()
        release.wait(30)
        left.set()
        return {}

    monkeypatch.setattr(reader, "_read_aws", hang)
    try:
        yield entered, left
    finally:
        release.set()


def test_a_read_that_begins_a_refresh_does_not_wait_as_long_as_aws_hangs(quiet_client, monkeypatch):
    """Reading AWS itself, it would wait as long as AWS does not answer (40 s)."""
    reader = services_of(quiet_client.application).status
    reader.cache_s = 0.0  # every read wants a refresh
    assert quiet_client.get("/api/status").status_code == 200
    monkeypatch.setattr("web_tier.status.REFRESH_WAIT_S", 0.2)
    with aws_hanging(reader, monkeypatch) as (entered, left):
        answer = quiet_client.get("/api/status").get_json()
        assert not left.is_set(), "answered only once AWS had"
        # The refresh's thread may start late on a loaded machine: it need not have begun
        # within REFRESH_WAIT_S for the answer to come, only to begin at all.
        assert entered.wait(30), "no refresh was begun"
        assert answer["queue"] is not None  # from the last snapshot


def test_the_first_read_of_an_aws_that_hangs_says_so(quiet_client, monkeypatch):
    reader = services_of(quiet_client.application).status
    monkeypatch.setattr("web_tier.status.FIRST_READ_WAIT_S", 2.0)
    monkeypatch.setattr("web_tier.status.STALE_AFTER_S", 0.1)
    waits: list[float] = []
    wait_for = reader._refreshed.wait_for

    def recording_wait_for(predicate, timeout=None):
        waits.append(timeout)
        return wait_for(predicate, timeout)

    monkeypatch.setattr(reader._refreshed, "wait_for", recording_wait_for)
    with aws_hanging(reader, monkeypatch) as (_, left):
        answer = quiet_client.get("/api/status").get_json()
        assert not left.is_set()
        # The reads after it wait no longer, not each its own 10 s.
        later = quiet_client.get("/api/status").get_json()
        assert not left.is_set()
    assert waits == [2.0, 0.0]
    assert answer["queue"] is None and answer["read_at"] is None
    assert any("there are no figures yet" in e for e in answer["errors"])
    assert any("there are no figures yet" in e for e in later["errors"])


@pytest.mark.parametrize("weights, flagged", [("random", True), ("imagenet", None)])
def test_untrained_is_said_from_the_start_when_configured(make_web_app, weights, flagged):
    # Before any worker has answered, the configured weights decide: with `random`
    # the page's banner and /api/status say "untrained" from the first look.
    client = make_web_app(model_weights=weights, start_background=False).test_client()
    assert client.get("/api/status").get_json()["untrained"] is flagged
    page = client.get("/").get_data(as_text=True)
    banner = re.search(r'<div id="untrained-banner"[^>]*>', page).group(0)
    assert ("hidden" not in banner) is bool(flagged)


@pytest.mark.parametrize("urls_known", [True, False])
def test_healthz_is_a_503_within_seconds_when_aws_does_not_answer(web_settings, monkeypatch, urls_known):
    """A health check that hangs (botocore would retry for minutes) tells a load
    balancer nothing: one that does not hear from AWS in seconds says so. So does
    the first one of a web tier that has not looked its queues up yet (it hung)."""
    from common.aws import Aws
    from web_tier import create_app

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        settings = replace(web_settings, endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}")
        aws = Aws(settings)
        for name in (settings.request_queue, settings.response_queue) if urls_known else ():
            aws._queue_urls[name] = f"{settings.endpoint_url}/123456789012/{name}"  # as a running tier has
        app = create_app(settings, aws=aws, start_background=False)
        responses: list = []
        asking = threading.Thread(target=lambda: responses.append(app.test_client().get("/healthz")),
                                  daemon=True)
        asking.start()
        # A hang guard only: the other clients' 30 s read timeout, let alone their retries,
        # would outlast it.
        asking.join(20)
        services_of(app).stop()
        assert not asking.is_alive()
        # One attempt: botocore's max_attempts=1 made two, 5.05 s, past a load balancer's 5.
        silent.setblocking(False)
        connections = 0
        while True:
            try:
                silent.accept()[0].close()
            except BlockingIOError:
                break
            connections += 1
    assert connections == 1
    (response,) = responses
    assert response.status_code == 503
    assert response.get_json()["error"] == "request queue unreachable: ReadTimeoutError"


def test_gunicorn_admits_no_more_connections_than_it_has_files_for():
    """gthread's accept() dies on EMFILE, taking every waiting POST / with it: with a
    soft limit of 1,024 open files, 2,000 connections let 1,100 slow clients kill it."""
    import resource
    import runpy
    from pathlib import Path

    conf = runpy.run_path(str(Path(__file__).parents[2] / "web_tier" / "gunicorn.conf.py"))
    connection_limits = conf["connection_limits"]
    for files in (256, 1024, 4096, 100_000):
        connections, threads = connection_limits(files)
        # A descriptor per connection, and one more per thread serving an upload (its spool).
        assert connections + threads + conf["FILES_KEPT_FOR_OTHER_USES"] <= max(files, 128 + 512)
        assert threads <= connections
    assert connection_limits(1024) == (256, 256)
    assert connection_limits(4096) == (2000, 1024)
    # Loading the configuration raised this process's soft limit as far as allowed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= min(conf["WANTED_OPEN_FILES"], hard)
    assert conf["worker_connections"] == connection_limits(conf["raise_open_files_limit"]())[0]


def test_a_wrong_setting_stops_the_web_tier_in_one_line_with_a_status_its_unit_does_not_restart_on():
    """Not a 17-line traceback and exit 1, which the unit restarts every second."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.unit.test_ami import unit_settings

    root = Path(__file__).parents[2]
    env = {**os.environ, "RESULT_TIMEOUT": "0", "WEB_PORT": "0"}
    refused = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "web_tier/gunicorn.conf.py",
                              "web_tier:create_app()"], cwd=root, env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.stderr.strip().startswith("web tier: RESULT_TIMEOUT must be"), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert unit_settings("imgclass-web.service")["RestartPreventExitStatus"] == [str(refused.returncode)]
    assert refused.returncode == 2


@pytest.mark.parametrize(("options", "refusal"), [
    ("-w 3", "gunicorn must run 1 worker process, not 3"),
    ("-k sync --threads 1", "gunicorn's worker class must be gthread, not SyncWorker"),
    ("-k gthread", "gunicorn's worker class must be gunicorn.conf.py's WebWorker, not ThreadWorker"),
    ("--preload", "gunicorn must not preload the app"),
])
def test_gunicorn_options_that_would_split_or_serialise_the_web_tier_stop_it_at_start(options, refusal):
    """GUNICORN_CMD_ARGS overrides gunicorn.conf.py: with -w 4, an answer one process's
    listener took would be lost to the POST / waiting in another, which answers 504."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "GUNICORN_CMD_ARGS": options, "WEB_PORT": "0"}
    refused = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "web_tier/gunicorn.conf.py",
                              "web_tier:create_app()"], cwd=Path(__file__).parents[2], env=env,
                             capture_output=True, text=True, timeout=60)
    said = [line for line in refused.stderr.splitlines() if line.startswith("web tier: ")]
    assert [line.removeprefix("web tier: ").startswith(refusal) for line in said] == [True], refused.stderr
    assert "Listening at" not in refused.stderr
    assert refused.returncode == 2


def test_sigttin_does_not_give_the_web_tier_a_second_process():
    """gunicorn's SIGTTIN adds a worker process at run time, past the check at start: a
    second process's listener took a third of the answers, each POST / waiting for one
    answered 504 after RESULT_TIMEOUT."""
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    from gunicorn.arbiter import Arbiter

    conf = runpy.run_path(str(Path(__file__).parents[2] / "web_tier" / "gunicorn.conf.py"))
    arbiter = Arbiter.__new__(Arbiter)  # its worker count and the hook, as gunicorn runs them
    arbiter._num_workers = None
    logged: list[str] = []
    arbiter.log = SimpleNamespace(error=lambda message, *args: logged.append(message % args))
    arbiter.cfg = SimpleNamespace(nworkers_changed=conf["nworkers_changed"])
    arbiter.num_workers = conf["workers"]  # as Arbiter.setup does
    assert arbiter.num_workers == 1 and logged == []
    arbiter.num_workers += 1  # as Arbiter.handle_ttin does, before it forks the difference
    assert arbiter.num_workers == 1
    assert [line.startswith("web tier: SIGTTIN ignored: gunicorn must run 1 worker process, not 2")
            for line in logged] == [True], logged
    arbiter.num_workers = 0  # SIGWINCH, daemonized: its workers stop
    assert arbiter.num_workers == 0 and len(logged) == 1
    arbiter._num_workers = None  # -w 3 at start: on_starting's refusal, not a SIGTTIN's
    arbiter.num_workers = 3
    assert len(logged) == 1


def test_an_ipv6_web_host_is_bound_as_one(monkeypatch):
    import runpy
    from pathlib import Path

    for host in ("::", "[::]"):
        monkeypatch.setenv("WEB_HOST", host)
        conf = runpy.run_path(str(Path(__file__).parents[2] / "web_tier" / "gunicorn.conf.py"))
        assert conf["bind"] == "[::]:8000"


@pytest.mark.parametrize(("host", "key", "warned"), [
    ("0.0.0.0", None, True), ("::", "", True), ("10.0.1.5", None, True), ("web.example.com", None, True),
    ("0.0.0.0", "a-long-secret", False), ("127.0.0.1", None, False), ("localhost", None, False),
    ("::1", None, False),
])
def test_a_web_tier_open_beyond_this_machine_without_an_api_key_is_warned_of(host, key, warned):
    """Anyone who reaches it may upload, and scale the fleet out to MAX_INSTANCES."""
    from web_tier.auth import open_to_anyone

    warning = open_to_anyone(host, key)
    assert (warning is not None) == warned
    if warned:
        assert "with no API_KEY: anyone who reaches it may upload" in warning
