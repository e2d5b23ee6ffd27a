"""The benchmark's fleet poller: it counts live instances, asking EC2 what the controller asks."""

from __future__ import annotations

import time

from bench.scaling import FleetPoller
from controller.act import launch
from controller.observe import observe
from tests.unit.conftest import wait_until


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


class _Fleet(FleetPoller):
    """A poller over a pretend fleet of `live` instances: no EC2 call."""

    live = 1

    def count(self) -> int:
        return self.live


def test_fast_wakes_the_poller_out_of_its_slow_wait(web_settings):
    """After the first launch the poller waits a slow interval between polls;
    fast() at the last response must end that wait, or the time to zero counts
    the rest of it (up to ~1 s with the bench's 1 s interval)."""
    poller = _Fleet(web_settings, slow_interval_s=60.0)
    poller.fast(until_launch=True)  # as at the start of a run
    poller.start()
    try:
        wait_until(lambda: poller.samples)  # an instance is seen: the next poll is a minute away
        poller.live = 0
        gone = time.time()
        # Its 10 s are far short of the minute the slow wait would take unwoken.
        zero_at = poller.wait_for_zero(gone, timeout_s=10.0)
        assert zero_at is not None, "fast() did not wake the poller's slow wait"
    finally:
        poller.stop()


def test_stop_ends_a_slow_wait(web_settings):
    poller = _Fleet(web_settings, slow_interval_s=60.0)
    poller.fast(until_launch=True)
    poller.start()
    wait_until(lambda: poller.samples)
    poller.stop()
    assert poller._thread is not None and not poller._thread.is_alive()


def test_wait_for_zero_takes_no_sample_from_before_the_time_asked(web_settings):
    poller = _Fleet(web_settings)
    poller.live = 0
    poller.start()
    try:
        wait_until(lambda: poller.samples)
        after = time.time()
        assert poller.wait_for_zero(after, timeout_s=10.0) >= after
    finally:
        poller.stop()
