"""The patched moto SQS used by the embedded AWS behaves exactly like moto's own."""

from __future__ import annotations

import time

import boto3
import pytest
from moto import mock_aws
from moto.core import utils
from moto.sqs import models

from localaws import moto_fast


def patched(monkeypatch):
    """moto_fast applied for one test only; monkeypatch puts moto's originals back."""
    original = models.SQSBackend.is_message_valid_based_on_retention_period
    monkeypatch.setattr(models, "unix_time", models.unix_time)
    monkeypatch.setattr(models, "unix_time_millis", models.unix_time_millis)
    monkeypatch.setattr(models.SQSBackend, "is_message_valid_based_on_retention_period", original)
    moto_fast.apply()
    return original


@pytest.fixture(name="patched")
def patched_fixture(monkeypatch):
    return patched(monkeypatch)


def test_unix_time_without_argument_is_now_and_with_one_is_unchanged(patched):
    assert abs(models.unix_time() - time.time()) < 0.01
    assert abs(models.unix_time_millis() - time.time() * 1000) < 10
    some_day = utils.utcnow().replace(year=2020)
    assert models.unix_time(some_day) == utils.unix_time(some_day)


@pytest.mark.parametrize("age_s", [0, 59, 61, 3600])
def test_retention_check_agrees_with_moto(patched, age_s):
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="q", Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="x")
        backend = models.sqs_backends["123456789012"]["us-east-1"]
        message = backend.get_queue("q")._messages[0]
        message.sent_timestamp -= age_s * 1000
        fast = backend.is_message_valid_based_on_retention_period("q", message)
        assert fast == patched(backend, "q", message)
        assert fast == (age_s < 60)


def receive_with_one_expired() -> tuple[list[str], str]:
    """Five messages, the third past its retention period: what a receive returns and counts."""
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="q", Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
        for n in range(5):
            sqs.send_message(QueueUrl=url, MessageBody=str(n))
        backend = models.sqs_backends["123456789012"]["us-east-1"]
        backend.get_queue("q")._messages[2].sent_timestamp -= 120_000
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return [m["Body"] for m in got], attrs["ApproximateNumberOfMessagesNotVisible"]


def test_receive_is_unchanged_by_the_patch(monkeypatch):
    before = receive_with_one_expired()
    patched(monkeypatch)
    after = receive_with_one_expired()
    assert after == before
    assert after[0] == ["0", "1"]  # moto stops at the first expired message
