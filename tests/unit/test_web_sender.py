"""Group commit of request messages: alone at once, together in batches, failures to their senders."""

from __future__ import annotations

import threading

import pytest

from common.aws import SQS_MAX_BATCH
from tests.conftest import without_credentials
from tests.unit.conftest import wait_until
from web_tier.sender import MAX_SENDS_IN_FLIGHT, BatchingSender, SendError


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


def test_messages_arriving_during_sends_go_out_together(web_aws):
    """While the sends in flight are held, 28 more callers queue; they go out in batches of ten."""
    release, held = threading.Event(), threading.Semaphore(0)
    sizes = _batch_sizes(web_aws.sqs)

    def hold_the_first_sends(**_):
        if len(sizes) <= MAX_SENDS_IN_FLIGHT:
            held.release()
            assert release.wait(10)

    web_aws.sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch", hold_the_first_sends)
    sender = BatchingSender(lambda: web_aws.sqs, lambda: web_aws.request_queue_url)
    first = [f"m{n:02d}" for n in range(MAX_SENDS_IN_FLIGHT)]
    first_threads = []
    for body in first:  # one at a time: each its own send
        first_threads += _in_threads(sender.send, [body])[0]
        assert held.acquire(timeout=10)
    bodies = [f"m{n:02d}" for n in range(MAX_SENDS_IN_FLIGHT, 30)]
    rest, errors = _in_threads(sender.send, bodies)
    wait_until(lambda: len(sender._waiting) == len(bodies))
    release.set()
    for t in first_threads + rest:
        t.join(10)
    assert not errors
    assert sizes[:MAX_SENDS_IN_FLIGHT] == [1] * MAX_SENDS_IN_FLIGHT
    assert sorted(sizes[MAX_SENDS_IN_FLIGHT:]) == [8, SQS_MAX_BATCH, SQS_MAX_BATCH]
    assert _queued(web_aws) == [*first, *bodies]


def test_a_send_that_stalls_holds_up_no_other_upload():
    """With one send in flight at a time, a call stuck in botocore's read timeout (30 s a
    try) held every upload of the process behind it (reviewer: 10 POST / of ~0.2 s took 3-4 s
    behind one call slowed by 4 s)."""
    class StallingSqs(FlakySqs):
        def __init__(self) -> None:
            super().__init__()
            self.stalled, self.unstall = threading.Event(), threading.Event()

        def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803
            if Entries[0]["MessageBody"] == "stalls":
                self.stalled.set()
                assert self.unstall.wait(10)
            return super().send_message_batch(QueueUrl, Entries)

    sqs = StallingSqs()
    sender = BatchingSender(lambda: sqs, lambda: "url")
    stalled, _ = _in_threads(sender.send, ["stalls"])
    assert sqs.stalled.wait(10)
    try:
        later, errors = _in_threads(sender.send, ["later"])
        wait_until(lambda: "later" in sqs.accepted, timeout=5, why=lambda: "sent behind the stalled call")
    finally:
        sqs.unstall.set()
        for t in stalled + later:
            t.join(10)
    assert not errors and sorted(sqs.accepted) == ["later", "stalls"]


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
