"""Group commit of request messages: alone at once, together in batches, failures to their senders."""

from __future__ import annotations

import threading

import pytest

from common.aws import SQS_MAX_BATCH
from tests.conftest import without_credentials
from tests.unit.conftest import wait_until
from web_tier.sender import BatchingSender, SendError


def _queued(aws) -> list[str]:
    bodies = []
    while True:
        got = aws.sqs.receive_message(QueueUrl=aws.request_queue_url, MaxNumberOfMessages=10,
                                      WaitTimeSeconds=0).get("Messages", [])
        if not got:
            return sorted(bodies)
        bodies += [m["Body"] for m in got]


def _in_threads(send, bodies: list[str]) -> tuple[list[threading.Thread], dict[str, Exception]]:
    errors: dict[str, Exception] = {}

    def one(body: str) -> None:
        try:
            send(body)
        except Exception as exc:
            errors[body] = exc

    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    return threads, errors


def _batch_sizes(sqs) -> list[int]:
    """Entries in each SendMessageBatch `sqs` makes from now on."""
    sizes: list[int] = []
    sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch",
                             lambda params, **_: sizes.append(len(params["Entries"])))
    return sizes


def test_a_lone_message_is_sent_at_once(web_aws):
    sizes = _batch_sizes(web_aws.sqs)
    sender = BatchingSender(lambda: web_aws.sqs, lambda: web_aws.request_queue_url)
    sender.send("one")
    assert _queued(web_aws) == ["one"]
    assert sizes == [1]


def test_messages_arriving_during_a_send_go_out_together(web_aws):
    """While the first send is held, 29 more callers queue; they go out in batches of ten."""
    release, held = threading.Event(), threading.Event()
    sizes = _batch_sizes(web_aws.sqs)

    def hold_first(**_):
        if len(sizes) == 1:
            held.set()
            assert release.wait(10)

    web_aws.sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch", hold_first)
    sender = BatchingSender(lambda: web_aws.sqs, lambda: web_aws.request_queue_url)
    first, _ = _in_threads(sender.send, ["m00"])
    assert held.wait(10)
    bodies = [f"m{n:02d}" for n in range(1, 30)]
    rest, errors = _in_threads(sender.send, bodies)
    wait_until(lambda: len(sender._waiting) == len(bodies))
    release.set()
    for t in first + rest:
        t.join(10)
    assert not errors
    assert sizes == [1, SQS_MAX_BATCH, SQS_MAX_BATCH, 9]
    assert _queued(web_aws) == ["m00", *bodies]


class FlakySqs:
    """An SQS client that refuses the bodies in `refuse` and fails whole calls `broken` times."""

    def __init__(self, refuse: set[str] = frozenset(), broken: int = 0) -> None:
        self.refuse, self.broken, self.accepted = refuse, broken, []

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803 (boto3's names)
        if self.broken:
            self.broken -= 1
            raise ConnectionError("SQS is down")
        failed = [{"Id": e["Id"], "Code": "InvalidMessageContents", "SenderFault": True}
                  for e in Entries if e["MessageBody"] in self.refuse]
        self.accepted += [e["MessageBody"] for e in Entries if e["MessageBody"] not in self.refuse]
        return {"Successful": [], "Failed": failed}


def test_a_refused_entry_fails_only_its_own_sender():
    sqs = FlakySqs(refuse={"bad"})
    sender = BatchingSender(lambda: sqs, lambda: "url")
    with pytest.raises(SendError, match="InvalidMessageContents"):
        sender.send("bad")
    sender.send("good")
    assert sqs.accepted == ["good"]


def test_a_failed_call_fails_its_batch_and_the_next_batch_still_goes():
    sqs = FlakySqs(broken=1)
    sender = BatchingSender(lambda: sqs, lambda: "url")
    with pytest.raises(ConnectionError):
        sender.send("lost")
    sender.send("next")
    assert sqs.accepted == ["next"]


def test_a_web_tier_started_without_credentials_sends_once_they_come(web_aws, monkeypatch, tmp_path):
    """Its sender kept the SQS client of the app's start: made without credentials (the
    instance profile attached later, IMDS missing its try at boot), it failed every
    upload's request until a restart by hand, while S3 and /healthz had recovered
    (reviewer)."""
    from concurrent.futures import ThreadPoolExecutor

    from botocore.exceptions import NoCredentialsError

    from common.aws import Aws
    from web_tier.results import ResultBook
    from web_tier.services import Services

    url = web_aws.request_queue_url  # made while there were credentials
    without_credentials(monkeypatch, tmp_path)
    aws = Aws(web_aws.settings)
    aws._queue_urls[web_aws.settings.request_queue] = url
    svc = Services(web_aws.settings, aws, ResultBook(), ThreadPoolExecutor(1))
    try:
        with pytest.raises(NoCredentialsError):
            svc.submitter.requests.send("before")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "came-later")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "came-later")
        svc.submitter.requests.send("after")
    finally:
        svc.stop()
    assert _queued(web_aws) == ["after"]
