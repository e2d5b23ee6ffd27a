"""The benchmark's SQS figures, part (h): measured at the stated depth, charged as the pipeline calls."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from bench import sqs as bench_sqs


@pytest.fixture
def sqs(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    # Every call of each figure, whatever this machine's speed: the queue is
    # drained (or overfilled) only after enough calls. Five receives of 10 are
    # more than a queue of 30 holds, as the bench's 20 are at depth 100.
    monkeypatch.setattr(bench_sqs, "MAX_SECONDS_PER_FIGURE", 600.0)
    monkeypatch.setattr(bench_sqs, "MAX_CALLS", 5)
    with mock_aws():
        yield boto3.client("sqs", region_name="us-east-1")


def _depth(sqs, url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessages"])


def _calls(sqs) -> list[tuple[str, dict]]:
    """(operation, parsed reply) of every call `sqs` makes from now on."""
    seen: list[tuple[str, dict]] = []
    sqs.meta.events.register("after-call.sqs.*", lambda parsed, model, **_: seen.append((model.name, parsed)))
    return seen


def test_the_queue_stays_at_its_depth_while_each_call_is_timed(sqs):
    """At depth 100, the bench's 20 receives of 10 with deletes emptied the queue
    after 10 calls: half of that figure's samples were empty receives."""
    url = sqs.create_queue(QueueName="bench-sqs-30")["QueueUrl"]
    calls = _calls(sqs)

    row = bench_sqs.measure_depth(sqs, url, 30)

    receives = [reply.get("Messages", []) for name, reply in calls if name == "ReceiveMessage"]
    # The timed receives (receive only, then receive + delete), then those that
    # take back what each timed send added: none finds the queue empty.
    timed = [len(got) for got in receives[:bench_sqs.MAX_CALLS * 2]]
    assert timed == [10] * bench_sqs.MAX_CALLS * 2
    assert all(receives)
    assert not any(name == "SendMessage" for name, _ in calls)  # the pipeline sends in batches
    assert _depth(sqs, url) == 30
    assert row["receive10_and_delete_messages"] == 10
    assert {"send_batch1_ms", "send_batch10_ms", "receive10_ms", "receive10_and_delete_ms"} <= set(row)


def test_an_empty_queue_stays_empty(sqs):
    url = sqs.create_queue(QueueName="bench-sqs-0")["QueueUrl"]
    row = bench_sqs.measure_depth(sqs, url, 0)
    assert _depth(sqs, url) == 0
    assert row["receive10_and_delete_messages"] == 0  # so its figure is an empty receive's, and says so


def test_the_web_tier_send_is_charged_as_its_group_commit_sends():
    """web_tier/sender.py sends request messages with SendMessageBatch, up to 10 a
    call; no SendMessage per image."""
    row = {"send_batch1_ms": 5.0, "send_batch10_ms": 8.0, "receive10_and_delete_ms": 9.0}
    # Batches of 10 everywhere: a tenth of a batch of 10 for the request, a tenth of
    # the worker's receive + delete, its reply batch and the listener's receive + delete.
    assert bench_sqs.sqs_ms_per_image(row, 10, 10) == pytest.approx(0.8 + (18.0 + 8.0) / 10)
    # A lone upload goes out in a batch of one.
    assert bench_sqs.sqs_ms_per_image(row, 10, 1) == pytest.approx(5.0 + (18.0 + 8.0) / 10)
    # In between, a batch call costs a fixed part and a part per entry.
    assert bench_sqs.send_batch_ms(row, 4) == pytest.approx(6.0)
    assert bench_sqs.sqs_ms_per_image(row, 4, 4) == pytest.approx(6.0 / 4 + (18.0 + 6.0) / 4)


def test_sqs_table_says_what_was_measured_and_reads_an_older_json():
    from bench.printed import sqs_table

    depth = {"depth": 100, "send_batch1_ms": 5.0, "send_batch10_ms": 8.0, "receive10_ms": 4.0,
             "receive10_and_delete_ms": 9.0, "receive10_and_delete_messages": 10.0}
    figures = {"receive_batch_assumed": 10.0, "send_batch_assumed": 10.0, "needed_images_per_s": None,
               "moto_fast": {"depths": [depth], "sqs_ms_per_image_at_depth_100": 3.4,
                             "sqs_bound_images_per_s": 294.0}}
    text = sqs_table(figures)
    assert "send batch 1" in text and "kept at its depth" in text
    assert "web-tier sends of 10" in text and "~294 images/s" in text
    # The JSON of an earlier run (SendMessage per image, no batch assumed) still prints.
    old = {"depth": 100, "send_ms": 6.0, "send_batch10_ms": 8.0, "receive10_ms": 4.0,
           "receive10_and_delete_ms": 9.0}
    figures = {"receive_batch_assumed": 10.0, "needed_images_per_s": None,
               "moto": {"depths": [old], "sqs_ms_per_image_at_depth_100": 9.4,
                        "sqs_bound_images_per_s": 106.0}}
    assert "web-tier sends of ?" in sqs_table(figures)


def test_no_depth_is_measured_past_the_bench_deadline(monkeypatch: pytest.MonkeyPatch):
    """(h) started just before the deadline ran its ~50 s to the end, close to the
    bench's tenth minute: each depth, a step of seconds, checks it."""
    from types import SimpleNamespace

    from bench.deadline import Deadline, DeadlinePassed

    deadline = Deadline()
    measured: list[int] = []

    def measure_depth(sqs, url: str, depth: int) -> dict[str, float]:
        measured.append(depth)
        deadline.started -= 3600  # the deadline passes while the first depth is measured
        return {"depth": depth}

    server = SimpleNamespace(terminate=lambda: None, wait=lambda timeout=None: 0)
    monkeypatch.setattr(bench_sqs.subprocess, "Popen", lambda *args, **kwargs: server)
    monkeypatch.setattr(bench_sqs, "wait_until_up", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_sqs, "_client", lambda url: SimpleNamespace(
        create_queue=lambda QueueName: {"QueueUrl": QueueName}))
    monkeypatch.setattr(bench_sqs, "measure_depth", measure_depth)

    with pytest.raises(DeadlinePassed, match=r"during \(h\), moto.server at depth 100 \(9 min"):
        bench_sqs.measure_sqs(deadline=deadline)
    assert measured == [0]
