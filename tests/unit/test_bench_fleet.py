"""The benchmark's fleet poller: it counts live instances, asking EC2 what the controller asks."""

from __future__ import annotations

import pytest
from moto import mock_aws

from bench.scaling import FleetPoller
from common.aws import Aws
from common.config import Settings
from common.provision import provision
from controller.act import launch
from controller.observe import observe


def _describe_filters(client) -> list:
    seen: list = []
    client.meta.events.register("provide-client-params.ec2.DescribeInstances",
                                lambda params, **_: seen.append(params.get("Filters")))
    return seen


@pytest.fixture
def aws(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        aws = Aws(Settings())
        provision(aws.settings, aws)
        yield aws


def test_counts_only_pending_and_running_instances(aws):
    ids = launch(aws, aws.settings, (1, 2, 3))
    aws.ec2.stop_instances(InstanceIds=[ids[2]])
    aws.ec2.terminate_instances(InstanceIds=[ids[3]])
    assert FleetPoller(aws.settings).count() == 1


def test_asks_the_question_the_controller_asks(aws):
    """So the embedded AWS answers both from one cached DescribeInstances."""
    launch(aws, aws.settings, (1,))
    poller = FleetPoller(aws.settings)
    asked_by_poller, asked_by_controller = _describe_filters(poller.aws.ec2), _describe_filters(aws.ec2)
    poller.count()
    observe(aws)
    assert asked_by_poller and asked_by_poller == asked_by_controller
