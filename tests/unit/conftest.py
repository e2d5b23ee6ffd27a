"""Fixtures for the web-tier unit tests: moto AWS, an app, a fake worker."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from moto import mock_aws

from common.aws import Aws
from common.config import Settings
from common.failure_tags import failure_tagging
from common.messages import ClassifyRequest, ClassifyResponse, Prediction
from common.output_object import pair_text, result_metadata
from common.provision import provision
from localaws import moto_patches
from tests.conftest import wait_for


@pytest.fixture(autouse=True)
def _moto_counts_a_queue_at_one_instant(request: pytest.FixtureRequest,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process moto counts a queue's messages at one instant, as the embedded
    AWS's does: otherwise a message whose visibility lapses between two counts is in
    neither, and a test waiting for a queue to drain sees it drained. Not for the
    embedded AWS's own tests (test_moto_*.py), which make its changes themselves or
    compare them with moto's own."""
    if request.module.__name__.rsplit(".", 1)[-1].startswith("test_moto_"):
        return
    from moto.sqs import models

    for owner, name in ((models, "unix_time"), (models, "unix_time_millis"),
                        (models.SQSBackend, "get_queue_attributes")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # put back after the test
    moto_patches.sqs_counts_at_one_instant()


def wait_until(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
               why: Callable[[], str] | None = None) -> object:
    """Poll `condition` until it is truthy; fail the test at the deadline (saying `why()`).

    The deadline only bounds a failure's wait: generous, for a loaded CI machine. The
    interval leaves the GIL to the code under test, which many conditions share it with
    (they call the in-process moto that code calls)."""
    return wait_for(condition, timeout, "the condition", interval, why)


def upload(client, files: list[tuple[bytes, str]], headers: dict | None = None, base_url: str | None = None,
           **form):
    """POST /api/jobs of `files` (bytes, name) through a Flask test client."""
    data = {"files": [(io.BytesIO(b), name) for b, name in files], **form}
    where = {"base_url": base_url} if base_url else {}
    return client.post("/api/jobs", data=data, content_type="multipart/form-data", headers=headers or {},
                       **where)


def answer_for(data: bytes) -> tuple[str, float]:
    """The label and score the fake worker gives an image: a function of its bytes."""
    digest = hashlib.sha256(data).hexdigest()
    return f"label-{digest[:10]}", int(digest[10:18], 16) / 0xFFFFFFFF


class FakeWorker:
    """Plays the app tier: reads requests, answers from the image bytes.

    `policy(request)` picks what to do: "ok", "fail", "twice" (same answer
    sent twice), "ignore" (delete the request, never answer), or "mute" and
    "mute-fail" (store the result, or mark the failure, and send nothing, as a
    worker that died before its reply).
    """

    def __init__(self, aws: Aws, untrained: bool = False) -> None:
        self.aws = aws
        self.untrained = untrained
        self.policy: Callable[[ClassifyRequest], str] = lambda request: "ok"
        self.handled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-worker", daemon=True)

    def start(self) -> FakeWorker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        sqs, url = self.aws.sqs, self.aws.request_queue_url
        while not self._stop.is_set():
            # Short polls, so that stop() is immediate.
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            if not messages:
                self._stop.wait(0.02)
            for message in messages:
                # Counted before its answer goes: counted after, a test that read the
                # count once answered could find it one short (seen under load).
                self.handled += 1
                self.handle(ClassifyRequest.from_json(message["Body"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    def response_for(self, request: ClassifyRequest) -> ClassifyResponse:
        data = self.aws.s3.get_object(Bucket=request.bucket, Key=request.key)["Body"].read()
        label, score = answer_for(data)
        others = tuple(Prediction(f"other-{n}", score / (n + 2)) for n in range(4))
        top5 = (Prediction(label, score), *others)
        return ClassifyResponse(id=request.id, filename=request.filename, key=request.key,
                                worker="fake-1", untrained=self.untrained, label=label,
                                score=score, top5=top5)

    def handle(self, request: ClassifyRequest) -> None:
        action = self.policy(request)
        if action == "ignore":
            return
        s3, settings = self.aws.s3, self.aws.settings
        if action in ("fail", "mute-fail"):
            response = ClassifyResponse(id=request.id, filename=request.filename, key=request.key,
                                        worker="fake-1", untrained=self.untrained, error="cannot decode")
            s3.put_object_tagging(Bucket=request.bucket, Key=request.key,
                                  Tagging=failure_tagging("cannot decode", "fake-1"))
        else:
            response = self.response_for(request)
            s3.put_object(Bucket=settings.output_bucket, Key=request.key,
                          Body=pair_text(request.filename, response.label).encode(),
                          Metadata=result_metadata(response))
        if action.startswith("mute"):
            return
        body = response.to_json()
        for _ in range(2 if action == "twice" else 1):
            self.aws.sqs.send_message(QueueUrl=self.aws.response_queue_url, MessageBody=body)


@pytest.fixture
def web_settings() -> Settings:
    return Settings(
        region="us-east-1",
        # Short polls: a listener's long poll (1 s at least) held up each test's end by ~1 s.
        receive_wait_s=0,
        result_timeout_s=20.0,
        max_upload_bytes=300_000,
        max_files_per_request=25,
    )


@pytest.fixture
def web_aws(web_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        aws = Aws(web_settings)
        provision(web_settings, aws)
        yield aws


@pytest.fixture
def make_web_app(web_aws: Aws) -> Iterator[Callable]:
    """Factory for apps on the shared moto AWS; every app is stopped afterwards."""
    made = []

    # Imported here so that other tiers' unit tests never depend on the web tier importing.
    from web_tier import create_app

    def make(settings: Settings | None = None, start_background: bool = True, aws: Aws | None = None,
             **changes):
        settings = replace(settings or web_aws.settings, **changes)
        aws = aws or (web_aws if settings == web_aws.settings else Aws(settings))
        app = create_app(settings, aws=aws, start_background=start_background)
        app.config["TESTING"] = True
        made.append(app)
        return app

    yield make
    for app in made:
        # A listener left polling would take the next test's answers (the moto state is
        # shared): waited for generously, and checked.
        services = services_of(app)
        services.stop(timeout=30)
        assert services.listeners is None or not services.listeners.running, "a listener did not stop"


@pytest.fixture
def web_app(make_web_app):
    return make_web_app()


@pytest.fixture
def web_client(web_app):
    return web_app.test_client()


@pytest.fixture
def fake_worker(web_aws: Aws) -> Iterator[FakeWorker]:
    worker = FakeWorker(web_aws).start()
    yield worker
    worker.stop()


def services_of(app):
    """The web tier's Services object of `app`."""
    from web_tier.services import EXTENSION

    return app.extensions[EXTENSION]
