"""The benchmark's fleet poller: it counts live instances, asking EC2 what the controller asks."""

from __future__ import annotations

from bench.scaling import FleetPoller
from controller.act import launch
from controller.observe import observe


def _describe_filters(client) -> list:
    seen: list = []
    client.meta.events.register("provide-client-params.ec2.DescribeInstances",
                                lambda params, **_: seen.append(params.get("Filters")))
    return seen


def test_counts_only_pending_and_running_instances(web_aws):
    ids = launch(web_aws, web_aws.settings, (1, 2, 3))
    web_aws.ec2.stop_instances(InstanceIds=[ids[2]])
    web_aws.ec2.terminate_instances(InstanceIds=[ids[3]])
    assert FleetPoller(web_aws.settings).count() == 1


def test_asks_the_question_the_controller_asks(web_aws):
    """So the embedded AWS answers both from one cached DescribeInstances."""
    launch(web_aws, web_aws.settings, (1,))
    poller = FleetPoller(web_aws.settings)
    asked_by_poller, asked_by_controller = _describe_filters(poller.aws.ec2), _describe_filters(web_aws.ec2)
    poller.count()
    observe(web_aws)
    assert asked_by_poller and asked_by_poller == asked_by_controller
