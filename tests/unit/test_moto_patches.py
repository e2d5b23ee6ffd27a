"""moto as the embedded AWS patches it (localaws/moto_patches.py) behaves exactly like moto's own."""

from __future__ import annotations

import itertools
import time

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import backends, mock_aws
from moto.core import responses, utils
from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.models.instances import Instance, InstanceBackend
from moto.s3 import models as s3_models
from moto.sqs import models

from localaws import moto_patches

# Its fleets of instances described with and without the patches, in Python: 21 s for one
# test here on a busy machine, too near pyproject's 120 s for a slower one.
pytestmark = pytest.mark.timeout(300)


def patched(monkeypatch):
    """moto_patches applied for one test only; monkeypatch puts moto's originals back."""
    original = models.SQSBackend.is_message_valid_based_on_retention_period
    everything_patched = [
        (models, "unix_time"), (models, "unix_time_millis"),
        (models.SQSBackend, "is_message_valid_based_on_retention_period"),
        (models.SQSBackend, "get_queue_attributes"),
        (models.Queue, "approximate_number_of_messages_delayed"),
        (models.Queue, "approximate_number_of_messages_not_visible"),
        (models.Queue, "messages"),
        (backends, "list_of_moto_modules"),
        (utils, "camelcase_to_underscores"), (responses, "camelcase_to_underscores"),
        (models, "camelcase_to_underscores"), (TaggedEC2Resource, "get_tags"),
        (Instance, "terminate"), (InstanceBackend, "all_reservations"), (InstanceBackend, "run_instances"),
        (s3_models, "get_s3_default_key_buffer_size"),
    ]
    for owner, name in everything_patched:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    moto_patches.apply()
    return original


@pytest.fixture(name="patched")
def patched_fixture(monkeypatch):
    return patched(monkeypatch)


def test_unix_time_without_argument_is_now_and_with_one_is_unchanged(patched):
    before = time.time()
    now, now_ms = models.unix_time(), models.unix_time_millis()
    after = time.time()
    assert before <= now <= after and before * 1000 <= now_ms <= after * 1000
    some_day = utils.utcnow().replace(year=2020)
    assert models.unix_time(some_day) == utils.unix_time(some_day)


@pytest.mark.parametrize("age_s", [0, 59.999, 60, 60.001, 3600])
def test_retention_check_agrees_with_moto(patched, age_s, monkeypatch):
    """On a clock the test holds still (both read models.unix_time), so that the
    period's very edge can be asked."""
    now = 2_000_000_000
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="q", Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="x")
        backend = models.sqs_backends["123456789012"]["us-east-1"]
        message = backend.get_queue("q")._messages[0]
        message.sent_timestamp = (now - age_s) * 1000
        monkeypatch.setattr(models, "unix_time", lambda *at: now)
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


def queue_counts_in_every_state() -> dict[str, str]:
    """Messages visible, received (in flight), delayed and returned to view: moto's counts."""
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="q")["QueueUrl"]
        for n in range(6):
            sqs.send_message(QueueUrl=url, MessageBody=str(n))
        sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=60)
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=3, VisibilityTimeout=60)["Messages"]
        handle = got[0]["ReceiptHandle"]
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0)
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return {k: v for k, v in attrs.items() if k.startswith("ApproximateNumber")}


def test_counts_are_unchanged_by_the_patch(monkeypatch):
    before = queue_counts_in_every_state()
    patched(monkeypatch)
    after = queue_counts_in_every_state()
    assert after == before
    assert after == {"ApproximateNumberOfMessages": "4", "ApproximateNumberOfMessagesNotVisible": "2",
                     "ApproximateNumberOfMessagesDelayed": "1"}


def test_one_count_of_a_queue_is_taken_at_one_instant(patched, monkeypatch):
    """A message whose visibility lapses while GetQueueAttributes is answered is counted
    once, visible or in flight: counted at two instants, it was in neither, and a queue
    holding work read as empty. The clock moves a second at each reading, and the lapse
    is put after each reading in turn."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="q")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="x")
        sqs.receive_message(QueueUrl=url, VisibilityTimeout=30)
        backend = models.sqs_backends["123456789012"]["us-east-1"]
        message = backend.get_queue("q")._messages[0]
        start = time.time()
        counted = []
        for lapse_after in range(30):
            message.visible_at = (start + lapse_after + 0.5) * 1000
            for asked in (names, ["All"]):
                readings = itertools.count()
                with monkeypatch.context() as clock:
                    clock.setattr(time, "time", lambda readings=readings: start + next(readings))
                    attrs = backend.get_queue_attributes("q", asked)
                counted.append(int(attrs[names[0]]) + int(attrs[names[1]]))
    assert counted == [1] * len(counted)


def test_service_lookup_and_names_are_unchanged(monkeypatch):
    modules = sorted(backends.list_of_moto_modules())
    names = ["MaximumMessageSize", "ApproximateNumberOfMessagesNotVisible", "QueueArn", "theNewAttribute", ""]
    converted = [utils.camelcase_to_underscores(n) for n in names]
    patched(monkeypatch)
    assert sorted(backends.list_of_moto_modules()) == modules
    assert {"s3", "sqs", "ec2"} <= set(modules)
    assert [responses.camelcase_to_underscores(n) for n in names] == converted


def fleet_described(monkeypatch) -> tuple[list, list, int]:
    """A fleet as the controller leaves it after many scale-ins: instances live and
    terminated, tagged, and an image tagged too. What tag-filtered describes return,
    every tag, and how many searches of every tag the describes made."""
    from moto.ec2.models.tags import TagBackend

    searches = []
    search = TagBackend.describe_tags
    monkeypatch.setattr(TagBackend, "describe_tags", lambda *a, **k: searches.append(1) or search(*a, **k))
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        ec2.create_tags(Resources=[image], Tags=[{"Key": "Name", "Value": "app-tier-instance-1"}])
        ids = []
        for n in range(30):
            tags = [{"Key": "Name", "Value": f"app-tier-instance-{n % 3 + 1}"},
                    {"Key": "imgclass:prefix", "Value": "p" if n % 2 else "q"}]
            ids += [i["InstanceId"] for i in ec2.run_instances(
                ImageId=image, MinCount=1, MaxCount=1,
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])["Instances"]]
        ec2.terminate_instances(InstanceIds=ids[:20])
        described = []
        searches.clear()
        for filters in ([{"Name": "tag:Name", "Values": ["app-tier-instance-*"]},
                         {"Name": "tag:imgclass:prefix", "Values": ["p"]}],
                        [{"Name": "tag-key", "Values": ["imgclass:prefix"]},
                         {"Name": "instance-state-name", "Values": ["running"]}]):
            found = ec2.describe_instances(Filters=filters)["Reservations"]
            described.append(sorted((i["InstanceId"], i["State"]["Name"], sorted(map(str, i["Tags"])))
                                    for r in found for i in r["Instances"]))
        made = len(searches)
        return described, ec2.describe_tags()["Tags"], made


def test_tag_filters_find_the_same_instances_looked_up_by_id(monkeypatch):
    """A search of every tag of every resource for each instance and filter makes each
    describe slower, quadratically, as terminated instances pile up."""
    *before, searches_before = fleet_described(monkeypatch)
    patched(monkeypatch)
    *after, searches_after = fleet_described(monkeypatch)
    assert len(before[0][0]) == 15 and len(before[0][1]) == 10  # all "p"; those running
    assert [[i[0] for i in d] for d in after[0]] != [[i[0] for i in d] for d in before[0]]  # new ids
    assert [sorted(i[1:] for i in d) for d in after[0]] == [sorted(i[1:] for i in d) for d in before[0]]
    assert len(after[1]) == len(before[1])
    assert searches_before > 30 and searches_after == 0


def test_a_terminated_instance_is_shown_for_an_hour_then_forgotten_with_its_tags(monkeypatch):
    """moto kept every one, and each made every call that finds instances slower."""
    patched(monkeypatch)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        tagged = [{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "app-tier-instance-1"}]}]
        ended, live = (ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=tagged)
                       ["Instances"][0]["InstanceId"] for _ in range(2))
        ec2.terminate_instances(InstanceIds=[ended])

        def shown() -> dict[str, str]:
            found = ec2.describe_instances()["Reservations"]
            return {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}

        assert shown() == {ended: "terminated", live: "running"}
        monkeypatch.setattr(moto_patches, "TERMINATED_KEPT_S", -1.0)  # as if an hour had passed
        assert shown() == {live: "running"}
        tags = {t["ResourceId"] for t in ec2.describe_tags()["Tags"]}
        assert live in tags and ended not in tags


def test_a_launch_repeated_with_its_client_token_launches_nothing_more(monkeypatch):
    """As on EC2: the controller repeats a launch that got no answer with its token, and
    botocore one answered late; moto made a second instance each time, past the cap."""
    patched(monkeypatch)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

        def launch(**token: str) -> list[str]:
            answer = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, **token)
            return [i["InstanceId"] for i in answer["Instances"]]

        first = launch(ClientToken="launch-1")
        assert launch(ClientToken="launch-1") == first
        other = launch(ClientToken="launch-2")
        untokened = [launch(), launch()]  # no token: a launch each, as EC2
        found = [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
        assert sorted(found) == sorted(first + other + untokened[0] + untokened[1])
        assert len(set(found)) == 4
        # Its instance terminated, the token is refused, as EC2 has since January 2025.
        ec2.terminate_instances(InstanceIds=first)
        with pytest.raises(ClientError) as refused:
            launch(ClientToken="launch-1")
        assert refused.value.response["Error"]["Code"] == "IdempotentInstanceTerminated"
        assert launch(ClientToken="launch-2") == other


def test_an_object_as_large_as_an_upload_is_kept_in_memory_not_in_a_hidden_file(monkeypatch):
    """moto kept each object over ~5 MB in a deleted temporary file, open for good."""
    monkeypatch.delenv("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", raising=False)

    def spilled(size: int) -> bool:
        with mock_aws():
            s3 = boto3.client("s3", region_name="us-east-1")
            s3.create_bucket(Bucket="bucket")
            s3.put_object(Bucket="bucket", Key="k", Body=b"x" * size)
            key = s3_models.s3_backends["123456789012"]["aws"].buckets["bucket"].keys["k"]
            return key._value_buffer._rolled

    assert spilled(8 * 1024**2)  # moto's own
    patched(monkeypatch)
    assert not spilled(8 * 1024**2)
    assert spilled(moto_patches.S3_OBJECT_IN_MEMORY_BYTES + 1)
