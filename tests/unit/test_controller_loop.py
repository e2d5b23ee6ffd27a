"""The controller's loop against moto's in-process AWS: launches, names, scale-in, faults.

`Controller.step` is one observe-decide-act round against (mock) EC2 and SQS;
`Controller.run` is the loop that must survive AWS errors. Faults are injected
by wrapping single client methods, so the rest of the AWS stays real.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from moto import mock_aws
from moto.core.botocore_stubber import MockRawResponse

from common.aws import Aws
from common.config import Settings
from common.fleet import WORKER_READY_TAG, report_worker_failed, report_worker_ready
from common.names import ROLE_APP_TIER, ROLE_TAG, instance_name
from common.provision import provision
from controller.act import LaunchCall
from controller.loop import LATE_ROUND_S, Controller, Timings
from controller.main import build_parser, main, settings_from
from controller.policy import BOOTING_FOR_BOOT_TIMES, Decision
from controller.timeline import TIMELINE_FIELDS, plot_timeline
from tests.conftest import client_error, wait_for, without_credentials

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.02
# Short in tests so a few failed rounds take well under a second; the default is 1 s.
TEST_BACKOFF_MIN_S = 0.1
TEST_TIMINGS = Timings(backoff_min_s=TEST_BACKOFF_MIN_S, launch_backoff_min_s=TEST_BACKOFF_MIN_S)


@pytest.fixture(scope="module")
def shared_aws() -> Iterator[Aws]:
    """One mock AWS for the module: building moto's EC2 and botocore's models costs ~1 s each time."""
    # No long-poll wait: the tests receive from the queue themselves.
    settings = Settings(prefix="unit", poll_interval_s=POLL_S, receive_wait_s=0)
    with mock_aws():
        aws = Aws(settings)
        provision(settings, aws)
        yield aws


@pytest.fixture
def aws(shared_aws: Aws) -> Iterator[Aws]:
    """The shared mock AWS, left as each test found it: no live instances, no messages."""
    yield shared_aws
    leftover = [i["InstanceId"] for i in instances(shared_aws, ("pending", "running", "stopped"))]
    if leftover:
        shared_aws.ec2.terminate_instances(InstanceIds=leftover)
    # In-flight messages cannot be received, and moto allows one purge a minute: a new queue.
    shared_aws.sqs.delete_queue(QueueUrl=shared_aws.request_queue_url)
    provision(shared_aws.settings, shared_aws)


@pytest.fixture
def patch(aws: Aws) -> Iterator[pytest.MonkeyPatch]:
    """For faults: undone before `aws` cleans up (the autouse `monkeypatch` is undone after it)."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture
def make_controller(aws: Aws) -> Iterator[Callable[..., Controller]]:
    """Controllers on the shared mock AWS; any still running is stopped afterwards. Keywords
    named as Timings' fields change TEST_TIMINGS; the others are the Controller's."""
    made: list[Controller] = []
    timing_names = {f.name for f in dataclasses.fields(Timings)}

    def make(**kwargs) -> Controller:
        timings = {name: kwargs.pop(name) for name in timing_names & kwargs.keys()}
        controller = Controller(aws.settings, aws, timings=dataclasses.replace(TEST_TIMINGS, **timings),
                                **kwargs)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.stopping.set()


def send(aws: Aws, count: int) -> None:
    for start in range(0, count, 10):
        numbers = range(start, min(count, start + 10))
        entries = [{"Id": str(i), "MessageBody": f"request {i}"} for i in numbers]
        aws.sqs.send_message_batch(QueueUrl=aws.request_queue_url, Entries=entries)


def receive_all(aws: Aws) -> list[str]:
    """Take every visible message (they become in flight); returns the receipt handles."""
    handles: list[str] = []
    while True:
        reply = aws.sqs.receive_message(QueueUrl=aws.request_queue_url, MaxNumberOfMessages=10,
                                        WaitTimeSeconds=0, VisibilityTimeout=60)
        if not reply.get("Messages"):
            return handles
        handles += [m["ReceiptHandle"] for m in reply["Messages"]]


def delete(aws: Aws, handles: list[str]) -> None:
    for handle in handles:
        aws.sqs.delete_message(QueueUrl=aws.request_queue_url, ReceiptHandle=handle)


def instances(aws: Aws, states: tuple[str, ...] = ("pending", "running")) -> list[dict]:
    reply = aws.ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": list(states)}])
    return [i for r in reply["Reservations"] for i in r["Instances"]]


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def names(aws: Aws) -> list[str]:
    return sorted(tags(i)["Name"] for i in instances(aws))


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    # Not faster: conditions list EC2 on the in-process moto, whose GIL the controller
    # under test needs too.
    return wait_for(condition, timeout_s, what, interval=0.05)


# --- one round at a time ------------------------------------------------------------


def test_step_launches_one_named_instance_per_message(aws, make_controller):
    send(aws, 7)
    decision = make_controller().step()
    assert len(decision.launch) == 7
    live = instances(aws)
    assert sorted(tags(i)["Name"] for i in live) == sorted(f"app-tier-instance-{n}" for n in range(1, 8))
    assert all(tags(i)[ROLE_TAG] == ROLE_APP_TIER for i in live)


def test_second_step_counts_what_the_first_launched(aws, make_controller):
    send(aws, 5)
    controller = make_controller()
    controller.step()
    assert controller.step().launch == ()
    assert len(instances(aws)) == 5


def test_launches_are_counted_before_ec2_lists_them(aws, make_controller, patch):
    """Real EC2 may not list a new instance for a while: the controller must not launch it again."""
    send(aws, 5)
    controller = make_controller()
    controller.step()
    empty = {"Reservations": []}
    patch.setattr(aws.ec2, "describe_instances", lambda **kwargs: empty)  # EC2 lags behind
    assert controller.step().launch == ()
    patch.undo()
    assert len(instances(aws)) == 5


def hidden_from_listings(aws: Aws, patch: pytest.MonkeyPatch) -> set[str]:
    """The ids the fleet's DescribeInstances leaves out (add to the set returned), as an
    EC2 replica still behind does."""
    hidden: set[str] = set()
    real = aws.ec2.describe_instances

    def lagging(**kwargs):
        reply = real(**kwargs)
        if any(f["Name"] == "tag:Name" for f in kwargs.get("Filters", [])):
            for reservation in reply["Reservations"]:
                reservation["Instances"] = [i for i in reservation["Instances"]
                                            if i["InstanceId"] not in hidden]
        return reply

    patch.setattr(aws.ec2, "describe_instances", lagging)
    return hidden


def test_a_stale_read_after_ec2_listed_the_launches_launches_nothing_again(aws, make_controller, patch):
    """EC2's reads may lag even after one that listed an instance: forgotten once listed,
    the next stale read would launch all 15 again, 30 billed."""
    hidden = hidden_from_listings(aws, patch)
    send(aws, 15)
    controller = make_controller()
    assert len(controller.step(now=1000.0).launch) == 15
    mine = {i["InstanceId"] for i in instances(aws)}
    hidden |= mine
    assert controller.step(now=1001.0).launch == ()  # not listed yet
    hidden.clear()
    assert controller.step(now=1002.0).launch == ()  # listed
    hidden |= mine
    assert controller.step(now=1003.0).launch == ()  # a replica still behind
    hidden.clear()
    assert len(instances(aws)) == 15


def test_a_launch_ec2_lists_only_after_minutes_is_not_launched_again(aws, make_controller, patch):
    """AWS says its reads may lag by minutes: after 30 s (the memory there was), the
    whole fleet was launched again."""
    hidden = hidden_from_listings(aws, patch)
    send(aws, 3)
    controller = make_controller()
    controller.step(now=1000.0)
    hidden |= {i["InstanceId"] for i in instances(aws)}
    for t in range(5, 295, 5):
        assert controller.step(now=1000.0 + t).launch == (), t
    assert len(instances(aws)) == 3


def test_cap_holds_for_100_messages(aws, make_controller):
    send(aws, 100)
    controller = make_controller()
    assert len(controller.step().launch) == 15
    for _ in range(3):
        assert controller.step().launch == ()
    assert len(instances(aws)) == 15
    assert len(set(names(aws))) == 15


def test_no_work_left_terminates_all(aws, make_controller):
    send(aws, 8)
    controller = make_controller()
    controller.step()
    handles = receive_all(aws)
    assert len(controller.step().terminate) == 0, "in-flight messages are still work"
    delete(aws, handles)
    assert len(controller.step().terminate) == 8
    assert instances(aws) == []


def test_scale_in_waits_out_the_window_and_a_restart_does_not_shorten_it(aws, make_controller):
    """A dip in the backlog terminates nothing within SCALE_IN_COOLDOWN; a controller that
    has just started has not seen the window, so it keeps what is live until it has."""
    from dataclasses import replace

    def windowed() -> Controller:
        controller = make_controller()
        controller.policy = replace(controller.policy, scale_in_cooldown_s=5.0)
        return controller

    t0 = 10_000.0
    send(aws, 8)
    controller = windowed()
    assert len(controller.step(now=t0).launch) == 8
    handles = receive_all(aws)
    delete(aws, handles[:6])  # 6 done, 2 in hand: 2 instances wanted now
    assert controller.step(now=t0 + 1).terminate == ()
    assert controller.step(now=t0 + 4.9).terminate == ()
    assert len(controller.step(now=t0 + 6.5).terminate) == 6
    delete(aws, handles[6:])  # all done
    restarted = windowed()
    assert restarted.step(now=t0 + 20).terminate == ()
    assert restarted.step(now=t0 + 24).terminate == ()
    assert len(restarted.step(now=t0 + 25.1).terminate) == 2
    assert instances(aws) == []


def test_the_scale_in_window_holds_a_peak_its_whole_length_and_no_longer():
    """SCALE_IN_COOLDOWN's length: a tenth of it passes every other test, whose checks
    all fall within a controller's first window."""
    from controller.memory import ScaleInWindow

    window, fleet = 60.0, ScaleInWindow()

    def peak(window_of: ScaleInWindow, at: float, wanted: int) -> int:  # one round's, with 5 live
        window_of.record(at, wanted, window)
        return window_of.peak(at, live=5, window=window)

    assert peak(fleet, 0.0, 5) == 5
    assert not fleet.watched(59.9, window) and fleet.watched(60.0, window)
    assert peak(fleet, 60.0, 5) == 5
    assert peak(fleet, 100.0, 1) == 5  # the dip
    assert peak(fleet, 159.9, 1) == 5  # 5 was wanted until 100
    assert peak(fleet, 160.0, 1) == 1  # a whole window since


def test_polls_further_apart_than_the_window_do_not_shorten_it(aws, make_controller):
    """`make bench` polls every 0.5 s with a 0.5 s window: a round a little late must not
    see an empty window, or one quiet poll between two requests ends the fleet."""
    from dataclasses import replace

    controller = make_controller()
    controller.policy = replace(controller.policy, scale_in_cooldown_s=0.5)
    t0 = 10_000.0
    send(aws, 1)
    controller.step(now=t0)
    controller.step(now=t0 + 0.52)
    delete(aws, receive_all(aws))
    assert controller.step(now=t0 + 1.04).terminate == (), "idle for 0 s so far"
    assert len(controller.step(now=t0 + 1.56).terminate) == 1, "idle for 0.52 s"


def test_new_controller_adopts_the_fleet_from_ec2_tags(aws, make_controller):
    """A restarted controller has no memory; EC2 tags and the queue are all it needs."""
    send(aws, 5)
    make_controller().step()
    send(aws, 3)
    fresh = make_controller()
    assert fresh.step().launch == (6, 7, 8), "numbers 1-5 are taken by live instances"
    send(aws, 20)  # 28 messages: more than the cap
    again = make_controller()
    decision = again.step()
    assert len(decision.launch) == 7
    assert len(instances(aws)) == 15 and len(set(names(aws))) == 15
    delete(aws, receive_all(aws))
    assert len(make_controller().step().terminate) == 15


def test_a_stray_that_cannot_be_terminated_holds_up_nothing(aws, make_controller, caplog):
    """A stopped instance EC2 refuses to terminate (termination protection) is cleaned
    up apart: the round neither fails (which would slow every later round to the error
    backoff) nor skips its launches and terminations, and it is warned about once."""
    send(aws, 1)
    make_controller().step()
    stray = instances(aws)[0]["InstanceId"]
    aws.ec2.stop_instances(InstanceIds=[stray])
    aws.ec2.modify_instance_attribute(InstanceId=stray, DisableApiTermination={"Value": True})
    try:
        send(aws, 2)
        controller = make_controller()
        first = controller.step(now=1000.0)
        assert len(first.launch) == 3 and first.clean_up == (stray,)  # the stopped one serves nobody
        assert len(instances(aws)) == 3
        delete(aws, receive_all(aws))
        assert len(controller.step(now=1001.0).terminate) == 3
        assert instances(aws) == []  # scaled in to zero beside it
        assert controller.step(now=1059.0).clean_up == ()  # refused: asked again a minute later
        assert controller.step(now=1060.5).clean_up == (stray,)
        assert caplog.text.count(f"cannot terminate instance {stray}") == 1
        assert [i["InstanceId"] for i in instances(aws, ("stopped",))] == [stray]
    finally:
        aws.ec2.modify_instance_attribute(InstanceId=stray, DisableApiTermination={"Value": False})
    controller.step(now=1200.0)
    assert instances(aws, ("stopped",)) == []


def test_a_worker_that_gave_up_is_replaced_after_a_hold_that_doubles(aws, make_controller, caplog):
    """A worker that cannot load the model tags its instance: the controller stops
    counting it, terminates it, and launches its replacement only after a hold, longer
    each time workers keep giving up, so that a bad image does not crash-loop the fleet."""
    send(aws, 2)
    controller = make_controller(failure_hold_min_s=10.0, failure_hold_max_s=300.0)
    t = 1000.0
    assert len(controller.step(now=t).launch) == 2
    first = instances(aws)[0]
    assert report_worker_failed(aws, first["InstanceId"], "model-unavailable")

    decision = controller.step(now=t + 1)
    assert decision.clean_up == (first["InstanceId"],) and decision.launch == ()
    assert "launches held" in decision.reason
    assert f"{tags(first)['Name']} ({first['InstanceId']}): model-unavailable" in caplog.text
    assert "launches held for 10s" in caplog.text
    assert len(instances(aws)) == 1
    assert controller.step(now=t + 10).launch == ()  # within the hold
    (replacement,) = controller.step(now=t + 11.5).launch
    assert len(instances(aws)) == 2

    again = next(i for i in instances(aws) if tags(i)["Name"] == f"app-tier-instance-{replacement}")
    report_worker_failed(aws, again["InstanceId"], "model-unavailable")
    controller.step(now=t + 12)
    assert "launches held for 20s" in caplog.text
    assert controller.step(now=t + 31).launch == ()
    assert len(controller.step(now=t + 32.5).launch) == 1
    # Quiet for 5 minutes is no sign of health (see the next test): doubled again.
    fresh = instances(aws)[-1]
    report_worker_failed(aws, fresh["InstanceId"], "model-unavailable")
    controller.step(now=t + 12 + 301)
    assert "launches held for 40s" in caplog.text


def test_the_hold_doubles_for_replacements_that_never_serve_until_one_does(aws, make_controller, caplog):
    """An instance that never serves is given up on only READY_DEADLINE (20 min) after it
    was launched, far apart from the last wave: the hold doubles all the same, or a fleet
    that cannot serve (no role, a crash loop) would be relaunched every 20 minutes for
    ever. It is back to the min once a replacement serves."""
    send(aws, 1)
    controller = make_controller(failure_hold_min_s=10.0, failure_hold_max_s=300.0)
    deadline = aws.settings.ready_deadline_s
    t = 1000.0
    assert len(controller.step(now=t).launch) == 1
    for hold in (10, 20, 40):
        t += deadline + 5
        assert controller.step(now=t).clean_up  # given up on: never served
        assert f"launches held for {hold}s" in caplog.text
        assert controller.step(now=t + hold - 1).launch == ()
        t += hold + 1
        assert len(controller.step(now=t).launch) == 1
    (healthy,) = instances(aws)
    report_worker_ready(aws, healthy["InstanceId"], threading.Event())
    controller.step(now=t + 60)
    report_worker_failed(aws, healthy["InstanceId"], "cannot-receive")
    controller.step(now=t + 3600)
    assert caplog.text.count("launches held for 10s") == 2, caplog.text


def test_a_ready_tag_ec2_refuses_is_tried_again_until_it_is_taken():
    """Given up at the first refusal (a throttle, a role still reaching EC2), the tag
    would be missing for good, and the controller replace a healthy instance once
    READY_DEADLINE passed. Tried again, with waits that grow, until EC2 takes it."""
    calls, waits = [], []
    throttled = ClientError({"Error": {"Code": "RequestLimitExceeded", "Message": "slow down"}}, "CreateTags")

    def create_tags(**kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            raise throttled

    aws = SimpleNamespace(ec2=SimpleNamespace(create_tags=create_tags))
    stopping = SimpleNamespace(is_set=lambda: False, wait=waits.append)  # waits recorded, not slept
    report_worker_ready(aws, "i-0abc", stopping)  # type: ignore[arg-type]
    assert len(calls) == 3 and calls[-1]["Tags"] == [{"Key": WORKER_READY_TAG, "Value": "1"}]
    assert waits == [1.0, 2.0]


def test_a_ready_tag_stops_being_tried_once_the_worker_stops():
    waits = []
    stopping = threading.Event()

    def refused(**kwargs):
        raise EndpointConnectionError(endpoint_url="https://ec2.test")

    def wait(seconds: float) -> None:
        waits.append(seconds)
        stopping.set()

    events = SimpleNamespace(is_set=stopping.is_set, wait=wait)
    report_worker_ready(SimpleNamespace(ec2=SimpleNamespace(create_tags=refused)), "i-0abc", events)  # type: ignore[arg-type]
    assert waits == [1.0]


def test_a_failed_tag_ec2_refuses_is_lost_without_raising(caplog):
    """Best effort: the worker is exiting anyway, and a raise here would skip its exit
    status. The report is said to be lost, and False tells the caller so."""
    def denied(**kwargs):
        raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "no"}}, "CreateTags")

    aws = SimpleNamespace(ec2=SimpleNamespace(create_tags=denied))
    assert report_worker_failed(aws, "i-0abc", "cannot-receive") is False  # type: ignore[arg-type]
    assert "cannot tag instance i-0abc" in caplog.text and "UnauthorizedOperation" in caplog.text


def test_without_ready_tags_the_hold_is_back_to_the_min_after_a_long_quiet(aws, make_controller, caplog):
    """Workers that never say they serve (no worker-ready tags, READY_DEADLINE=0) give no
    evidence of health: the hold must not only grow, up to 5 minutes for any one
    failure, however far apart. Past a quiet longer than a never-serving wave's gap, it
    is back to the min."""
    send(aws, 1)
    controller = make_controller(failure_hold_min_s=10.0, failure_hold_max_s=300.0)
    controller.settings = dataclasses.replace(aws.settings, ready_deadline_s=0)
    quiet_s = 2 * 300.0 + aws.settings.stall_timeout_s

    def launch_and_fail(at: float, failed_at: float) -> None:
        (launched,) = controller.step(now=at).launch
        (instance,) = [i for i in instances(aws) if tags(i)["Name"] == f"app-tier-instance-{launched}"
                       and i["State"]["Name"] in ("pending", "running")]
        report_worker_failed(aws, instance["InstanceId"], "cannot-receive")
        controller.step(now=failed_at)

    launch_and_fail(1000.0, 1100.0)
    assert caplog.text.count("launches held for 10s") == 1
    launch_and_fail(1111.0, 1211.0)  # a replacement failing: doubled
    assert "launches held for 20s" in caplog.text
    launch_and_fail(1232.0, 1211.0 + quiet_s + 1)  # after a long quiet: the min again
    assert caplog.text.count("launches held for 10s") == 2, caplog.text


def test_workers_of_one_wave_failing_in_turn_do_not_lengthen_the_hold(aws, make_controller, caplog):
    send(aws, 3)
    controller = make_controller(failure_hold_min_s=10.0)
    assert len(controller.step(now=1000.0).launch) == 3
    for n, instance in enumerate(instances(aws)):
        report_worker_failed(aws, instance["InstanceId"], "model-unavailable")
        controller.step(now=1001.0 + n)
    assert caplog.text.count("launches held for 10s") == 3 and "held for 20s" not in caplog.text
    assert controller.step(now=1003.0 + 9.9).launch == ()  # the hold runs from the last of them
    # Then one replacement, and the others once it serves (see the next test).
    (trial,) = controller.step(now=1003.0 + 10.1).launch
    assert controller.step(now=1014.0).launch == ()
    (instance,) = [i for i in instances(aws) if tags(i)["Name"] == f"app-tier-instance-{trial}"]
    report_worker_ready(aws, instance["InstanceId"], threading.Event())
    assert len(controller.step(now=1015.0).launch) == 2


def test_a_fleet_that_cannot_serve_costs_one_instance_a_hold_not_a_wave(aws, make_controller, caplog):
    """A bad AMI or weights path: every worker gives up. After each hold, the whole
    backlog's fleet was launched again (the cap's 15, every 5 minutes, all day): now one
    replacement, and the rest only once one serves."""
    send(aws, 40)
    controller = make_controller(failure_hold_min_s=10.0, failure_hold_max_s=300.0)
    t = 1000.0
    launched = len(controller.step(now=t).launch)
    assert launched == 15

    def fail_all() -> None:
        for instance in instances(aws):
            report_worker_failed(aws, instance["InstanceId"], "model-unavailable")

    for hold in (10, 20, 40, 80):
        fail_all()
        t += 1
        controller.step(now=t)
        assert f"launches held for {hold}s" in caplog.text
        t += hold + 1
        decision = controller.step(now=t)
        assert len(decision.launch) == 1, decision
        assert "one replacement at a time until one serves" in decision.reason
        t += 1
        waiting = controller.step(now=t)  # the replacement booting: nothing more
        assert waiting.launch == () and "waiting for the replacement launched to serve" in waiting.reason
        launched += 1
    assert launched == 15 + 4  # where each hold had launched 15 again: 75
    (trial,) = instances(aws)
    report_worker_ready(aws, trial["InstanceId"], threading.Event())
    assert len(controller.step(now=t + 1).launch) == 14  # serving: the fleet the backlog wants


def test_an_instance_that_never_serves_is_replaced_after_the_ready_deadline(aws, make_controller, caplog):
    """A worker that never serves cannot always say so (no credentials, a role missing
    a right, a crash loop): an instance watched for READY_DEADLINE without its worker's
    ready tag is counted as failed, terminated, and replaced after the launch hold.
    One whose worker said it serves stays, however old. The deadline runs on the
    controller's own clock from its launch."""
    send(aws, 2)
    controller = make_controller(failure_hold_min_s=10.0)
    t = 1000.0
    assert len(controller.step(now=t).launch) == 2
    serving, silent = instances(aws)
    report_worker_ready(aws, serving["InstanceId"], threading.Event())
    assert WORKER_READY_TAG in tags(instances(aws)[0])
    deadline = aws.settings.ready_deadline_s
    assert controller.step(now=t + deadline - 5).changes_anything is False  # still booting

    decision = controller.step(now=t + deadline + 5)
    assert decision.clean_up == (silent["InstanceId"],) and decision.launch == ()
    assert f"not serving {deadline:g}s after its launch" in caplog.text
    assert [i["InstanceId"] for i in instances(aws)] == [serving["InstanceId"]]
    assert len(controller.step(now=t + deadline + 16).launch) == 1  # after the hold

    # A new controller (restarted) times the replacement from its launch by EC2's clock, not
    # its own: launched just now, it has its whole deadline still.
    fresh = make_controller()
    assert fresh.step(now=t + 2 * deadline).changes_anything is False


def test_a_step_of_the_wall_clock_neither_fails_a_booting_instance_nor_ends_a_hold(
        aws, make_controller, patch):
    """Durations run on the monotonic clock: the wall clock stepping forward by more than
    READY_DEADLINE (NTP correcting a host whose clock was wrong) fails no booting instance
    and ends no hold; stepping back holds nothing longer. The timeline keeps wall time."""
    wall, mono = 1_700_000_000.0, 50.0
    patch.setattr("controller.observe.time", SimpleNamespace(time=lambda: wall, monotonic=lambda: mono))
    send(aws, 2)
    controller = make_controller(failure_hold_min_s=10.0)
    assert len(controller.step().launch) == 2
    failed, booting = instances(aws)
    report_worker_failed(aws, failed["InstanceId"], "model-unavailable")
    wall, mono = wall + 1, mono + 1
    assert controller.step().clean_up == (failed["InstanceId"],)  # a hold of 10 s begins

    wall, mono = wall + aws.settings.ready_deadline_s + 60, mono + 1
    decision = controller.step()
    assert decision.clean_up == () and "launches held" in decision.reason
    assert booting["InstanceId"] in [i["InstanceId"] for i in instances(aws)]
    assert controller.timeline[-1]["time"] == wall

    wall, mono = wall - 86400, mono + 9  # the hold is over: 10 s after the failure
    assert len(controller.step().launch) == 1


def test_a_controller_whose_clock_is_ahead_of_ec2s_does_not_launch_a_round_for_one_message(
        aws, make_controller, patch):
    """An instance launched for one waiting message beside a busy worker counts as
    booting, and launches no other, for two BOOT_TIMEs of the controller's own clock.
    Against EC2's LaunchTime, a controller whose clock runs a minute ahead would take
    it for an old instance that never serves, and launch one a round."""
    wall, mono = time.time() + 3600, 50.0
    patch.setattr("controller.observe.time", SimpleNamespace(time=lambda: wall, monotonic=lambda: mono))
    send(aws, 1)
    controller = make_controller()
    assert len(controller.step().launch) == 1
    report_worker_ready(aws, instances(aws)[0]["InstanceId"], threading.Event())
    send(aws, 10)
    receive_all(aws)  # 11 in flight: the busy worker's
    send(aws, 1)
    wall, mono = wall + 1, mono + 1
    assert len(controller.step().launch) == 1  # for the one no worker holds
    for _ in range(5):
        wall, mono = wall + 1, mono + 1
        decision = controller.step()
        assert decision.launch == (), decision.reason
        assert "1 not yet receiving" in decision.reason


def ec2_answering_later(aws: Aws, patch: pytest.MonkeyPatch, seconds: float) -> None:
    """DescribeInstances answering as EC2 would `seconds` later by its own clock (the Date
    of its reply), as after a controller's downtime: every instance listed is that much older."""
    real = aws.ec2.describe_instances

    def later(**kwargs):
        reply = real(**kwargs)
        headers = reply["ResponseMetadata"]["HTTPHeaders"]
        answered_at = parsedate_to_datetime(headers["date"]).timestamp()
        headers["date"] = formatdate(answered_at + seconds, usegmt=True)
        return reply

    patch.setattr(aws.ec2, "describe_instances", later)


def launch_one_beside_a_busy_worker(aws: Aws, controller: Controller) -> str:
    """A worker serving, busy with 11 messages, and an instance launched for a 12th: its id.
    The new one stays silent (no worker says it serves) and the 12th waits untaken."""
    send(aws, 1)
    assert len(controller.step(now=1000.0).launch) == 1
    busy = instances(aws)[0]["InstanceId"]
    report_worker_ready(aws, busy, threading.Event())
    send(aws, 10)
    receive_all(aws)
    send(aws, 1)
    assert len(controller.step(now=1001.0).launch) == 1
    return next(i["InstanceId"] for i in instances(aws) if i["InstanceId"] != busy)


def test_a_restarted_controller_times_a_silent_instance_from_its_launch_by_ec2s_clock(
        aws, make_controller, patch):
    """A restarted controller has forgotten when it saw each instance: it takes how long
    ago EC2 launched one by EC2's own clock (its reply's Date less LaunchTime). Timed from
    its own first sight, one silent since long before held back launches for the messages
    no worker holds for two more BOOT_TIMEs (a restart a round held them back for good)."""
    launch_one_beside_a_busy_worker(aws, make_controller())
    booting_for_s = BOOTING_FOR_BOOT_TIMES * aws.settings.boot_time_s
    ec2_answering_later(aws, patch, booting_for_s + 60)
    # Its clock decades behind EC2's (now=5000.0): only EC2's own is read.
    decision = make_controller().step(now=5000.0)
    assert len(decision.launch) == 1, decision.reason


def test_a_restarted_controller_counts_a_recent_launch_as_booting_for_what_is_left_of_its_boot(
        aws, make_controller, patch):
    """An instance a previous controller launched a BOOT_TIME ago is still booting after a
    restart, and not for two BOOT_TIMEs more: only until two have passed since its launch."""
    launch_one_beside_a_busy_worker(aws, make_controller())
    boot_s = aws.settings.boot_time_s
    ec2_answering_later(aws, patch, boot_s)
    restarted = make_controller()
    for now in (5000.0, 5000.0 + boot_s - 5):
        decision = restarted.step(now=now)
        assert decision.launch == () and "1 not yet receiving" in decision.reason, decision.reason
    decision = restarted.step(now=5000.0 + boot_s + 5)
    assert len(decision.launch) == 1, decision.reason


def test_a_restarted_controller_fails_an_instance_silent_past_the_ready_deadline_at_once(
        aws, make_controller, patch, caplog):
    """An instance silent for longer than READY_DEADLINE since EC2 launched it is counted
    as failed by a restarted controller at once, not given a whole deadline again."""
    send(aws, 1)
    assert len(make_controller().step(now=1000.0).launch) == 1
    silent = instances(aws)[0]["InstanceId"]
    deadline = aws.settings.ready_deadline_s
    ec2_answering_later(aws, patch, deadline + 60)
    decision = make_controller().step(now=5000.0)
    assert decision.clean_up == (silent,), decision.reason
    assert f"not serving {deadline:g}s after its launch" in caplog.text


def test_a_restarted_controller_counts_an_instances_age_to_ec2s_answer_not_to_before_its_read(
        aws, make_controller, patch):
    """EC2 says how old an instance is when it answers; the round's clock, read before a
    DescribeInstances that took a minute (botocore's retries), had a restarted controller
    take every instance as a minute older from its next round on: one 30 s short of
    READY_DEADLINE was given up on at once."""
    send(aws, 1)
    assert len(make_controller().step(now=1000.0).launch) == 1
    deadline = aws.settings.ready_deadline_s
    ec2_answering_later(aws, patch, deadline - 30)
    clock = [time.monotonic()]
    patch.setattr("controller.observe.time", SimpleNamespace(time=time.time, monotonic=lambda: clock[0]))
    answering = aws.ec2.describe_instances

    def taking_a_minute(**kwargs):
        clock[0] += 60
        return answering(**kwargs)

    patch.setattr(aws.ec2, "describe_instances", taking_a_minute)
    restarted = make_controller()
    decision = restarted.step()
    assert decision.clean_up == (), decision.reason
    patch.setattr(aws.ec2, "describe_instances", answering)
    clock[0] += 1
    decision = restarted.step()
    assert decision.clean_up == (), decision.reason


def test_ready_deadline_0_counts_no_silent_instance_as_failed(aws, make_controller):
    """Workers from an AMI older than the ready tag never set it: READY_DEADLINE=0."""
    send(aws, 1)
    controller = make_controller()
    controller.settings = dataclasses.replace(aws.settings, ready_deadline_s=0)
    controller.step(now=1000.0)
    assert controller.step(now=1000.0 + 10 * 86400).changes_anything is False


def watched(controller: Controller, start: float, end: float, every: float = 10.0) -> list[Decision]:
    """Rounds from `start` to `end` (both), `every` seconds apart: looks close enough that
    the progress deadline's wait is watched between them (ProgressWatch.waited)."""
    decisions, now = [], start
    while now < end:
        decisions.append(controller.step(now=now))
        now += every
    return [*decisions, controller.step(now=end)]


def stalled_controller(aws: Aws, **settings: float) -> Controller:
    """A controller on the shared mock AWS with these settings changed (its policy too)."""
    return Controller(dataclasses.replace(aws.settings, **settings), aws, timings=TEST_TIMINGS)


def test_a_ready_instance_that_stops_receiving_is_replaced_after_the_progress_deadline(aws, caplog):
    """A reviewer's case: one request launches one instance, whose worker tags it ready and
    then receives nothing (the instance hung or cut off, the worker crash-looping since).
    Its tag stays, so it counted as serving for good: desired 1 == serving 1, nothing
    launched or terminated in 2 simulated hours, the request waiting all the while.
    Requests visible for PROGRESS_DEADLINE with none in flight beside it have it counted
    as failed: terminated at once, and replaced after the launch hold."""
    controller = stalled_controller(aws, ready_deadline_s=1200, scale_in_cooldown_s=60)
    deadline = controller.settings.progress_deadline_s
    send(aws, 1)
    t = 1000.0
    assert len(controller.step(now=t).launch) == 1
    (hung,) = [i["InstanceId"] for i in instances(aws)]
    report_worker_ready(aws, hung, threading.Event())
    # The wait is timed from the first round that sees it ready.
    for decision in watched(controller, t + 1, t + deadline):
        assert not decision.changes_anything and decision.desired == 1, decision.reason
    decision = controller.step(now=t + 1 + deadline)
    assert decision.clean_up == (hung,) and decision.launch == (), decision.reason  # held
    assert (f"{instance_name(1)} ({hung}): not receiving: 1 request(s) waited {deadline:.0f}s with none "
            "in flight while its worker said it serves") in caplog.text
    assert instances(aws) == []
    hold_s = TEST_TIMINGS.failure_hold_min_s
    assert len(controller.step(now=t + 1 + deadline + hold_s + 1).launch) == 1
    assert aws.queue_depth(aws.request_queue_url).visible == 1  # for the replacement


def test_instances_that_stop_receiving_are_counted_in_turn_the_oldest_first_each_wait_doubled(aws):
    """Taken in turn, not all at once (the others may be receiving by the next), and the
    oldest first: a replacement, the newest, is not counted again and again. With nothing
    received since a count, the next wait is twice as long: receives failing for AWS's
    fault (an outage, the workers' subnet cut off) look the same, and counting one every
    deadline replaced a whole healthy fleet after every outage."""
    controller = stalled_controller(aws)
    deadline = controller.settings.progress_deadline_s
    send(aws, 2)
    t = 1000.0
    assert len(controller.step(now=t).launch) == 2
    first, second = (i["InstanceId"] for i in sorted(instances(aws), key=lambda i: tags(i)["Name"]))
    for iid in (first, second):
        report_worker_ready(aws, iid, threading.Event())
    assert all(d.clean_up == () for d in watched(controller, t + 1, t + deadline))
    assert controller.step(now=t + 1 + deadline).clean_up == (first,)
    replacement = controller.step(now=t + 1 + deadline + 11).launch  # after the hold
    assert len(replacement) == 1
    # The replacement boots (moto's never says it serves): nothing received, the other is
    # counted two deadlines on.
    assert all(d.clean_up == () for d in watched(controller, t + 1 + deadline + 21, t + 1 + 3 * deadline - 1))
    assert controller.step(now=t + 1 + 3 * deadline).clean_up == (second,)


def one_ready_instance(aws: Aws, t: float) -> tuple[Controller, str]:
    """A stalled controller (stalled_controller) that launched one instance at `t` for a
    request, and saw it ready at `t` + 1; and that instance's id."""
    controller = stalled_controller(aws)
    send(aws, 1)
    controller.step(now=t)
    (ready,) = [i["InstanceId"] for i in instances(aws)]
    report_worker_ready(aws, ready, threading.Event())
    controller.step(now=t + 1)
    return controller, ready


def test_the_progress_deadline_runs_only_while_requests_wait_untaken_and_afresh_after_a_restart(aws):
    """A request taken (in flight) breaks the wait; a restarted controller, which has not
    seen it begin, times it from its own first round."""
    t = 1000.0
    controller, ready = one_ready_instance(aws, t)
    deadline = controller.settings.progress_deadline_s
    (handle,) = receive_all(aws)
    assert all(d.clean_up == () for d in watched(controller, t + 2, t + 1 + deadline))  # it took the request
    aws.sqs.change_message_visibility(QueueUrl=aws.request_queue_url, ReceiptHandle=handle,
                                      VisibilityTimeout=0)  # and gave it back
    assert all(d.clean_up == () for d in watched(controller, t + deadline + 2, t + 2 * deadline + 1))
    restarted = stalled_controller(aws)
    # Where the first would count it: the restarted one times the wait from its first round.
    assert all(d.clean_up == () for d in watched(restarted, t + 2 * deadline + 2, t + 3 * deadline + 1))
    assert restarted.step(now=t + 3 * deadline + 2).clean_up == (ready,)


def test_a_wait_nobody_watched_is_no_wait(aws):
    """Two looks that each saw a request waiting, a deadline apart with no look between
    (rounds failing while AWS throttled or was out of reach, a controller paused), had a
    healthy instance counted as not receiving: its worker may have taken and answered
    many requests meanwhile. The wait starts again at the first look after such a gap."""
    t = 1000.0
    controller, ready = one_ready_instance(aws, t)
    deadline = controller.settings.progress_deadline_s
    assert controller.step(now=t + 2 + deadline).clean_up == ()  # unwatched since t + 1
    assert all(d.clean_up == () for d in watched(controller, t + 12 + deadline, t + 1 + 2 * deadline))
    assert controller.step(now=t + 2 + 2 * deadline).clean_up == (ready,)  # watched a whole deadline


def test_progress_deadline_0_counts_no_ready_instance_as_not_receiving(aws):
    controller = stalled_controller(aws, progress_deadline_s=0)
    send(aws, 1)
    controller.step(now=1000.0)
    report_worker_ready(aws, instances(aws)[0]["InstanceId"], threading.Event())
    controller.step(now=1001.0)
    assert controller.step(now=1000.0 + 10 * 86400).changes_anything is False


def test_a_launch_that_terminates_before_ec2_lists_it_is_not_counted(aws, make_controller, patch):
    """An instance that goes straight to terminated (no capacity, say) is never listed
    as pending or running: its replacement is launched at the next round."""
    send(aws, 1)
    controller = make_controller()
    real_describe = aws.ec2.describe_instances

    def lagging(**kwargs):  # EC2 lists nothing as pending or running yet
        if any(f["Name"] == "tag:Name" for f in kwargs.get("Filters", [])):
            return {"Reservations": []}
        return real_describe(**kwargs)

    patch.setattr(aws.ec2, "describe_instances", lagging)
    assert len(controller.step().launch) == 1
    assert controller.step().launch == ()  # counted while EC2 lags
    aws.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in instances(aws)])
    assert len(controller.step().launch) == 1


def test_one_instance_ec2_will_not_terminate_fails_no_other_scale_in(aws, make_controller, caplog):
    """Refused, it goes last, and is asked again only a minute after its refusal: asked
    every round, one EC2 refuses for good (termination protection) costs a call and a log
    line a round, 86,400 a day at a 1 s poll."""
    send(aws, 3)
    controller = make_controller()
    controller.step(now=1000.0)
    # The highest number, of those launched together: the first chosen to go.
    protected = max(instances(aws), key=lambda i: int(tags(i)["Name"].rsplit("-", 1)[1]))["InstanceId"]
    aws.ec2.modify_instance_attribute(InstanceId=protected, DisableApiTermination={"Value": True})
    calls = []
    real_terminate = aws.ec2.terminate_instances
    aws.ec2.terminate_instances = lambda **kw: calls.append(kw["InstanceIds"]) or real_terminate(**kw)
    try:
        handles = receive_all(aws)
        delete(aws, handles[:1])  # two messages left: two instances wanted
        assert controller.step(now=1001.0).terminate == (protected,)
        assert len(instances(aws)) == 3
        # Refused once, it goes last: another instance goes instead.
        (victim,) = controller.step(now=1002.0).terminate
        assert victim != protected and len(instances(aws)) == 2
        delete(aws, handles[1:])
        # Nothing left: the other goes; the refused one waits its minute, unasked.
        (other,) = controller.step(now=1003.0).terminate
        assert other != protected and [i["InstanceId"] for i in instances(aws)] == [protected]
        asked = len(calls)
        records = len(caplog.records)
        for now in (1004.0, 1030.0, 1060.0):
            assert controller.step(now=now).terminate == ()
        assert len(calls) == asked and len(caplog.records) == records  # no call, no line
        assert controller.step(now=1061.5).terminate == (protected,)  # a minute on: asked again
        assert [i["InstanceId"] for i in instances(aws)] == [protected]
        assert caplog.text.count(f"cannot terminate instance {protected}") == 1
    finally:
        aws.ec2.modify_instance_attribute(InstanceId=protected, DisableApiTermination={"Value": False})
        aws.ec2.terminate_instances = real_terminate
    controller.step(now=1200.0)
    assert instances(aws) == []


def test_a_refused_instance_terminated_another_way_is_forgotten(aws, make_controller):
    send(aws, 2)
    controller = make_controller()
    controller.step()
    protected = instances(aws)[0]["InstanceId"]
    aws.ec2.modify_instance_attribute(InstanceId=protected, DisableApiTermination={"Value": True})
    delete(aws, receive_all(aws))
    controller.step()  # both go, but EC2 refuses one
    assert controller.refusals.ids == {protected}
    aws.ec2.modify_instance_attribute(InstanceId=protected, DisableApiTermination={"Value": False})
    aws.ec2.terminate_instances(InstanceIds=[protected])  # by hand
    controller.step()
    assert controller.refusals.ids == set()


def test_a_refusal_that_may_pass_is_asked_again_next_round_not_put_last(aws, make_controller, patch, caplog):
    """EC2 not listing a new instance yet (InvalidInstanceID.NotFound) refuses it for a
    moment only: the next round asks for that same instance again, as the warning says.
    Put last, as a protected one is, it was kept, idle, while busy ready instances were
    terminated in its place."""
    send(aws, 2)
    controller = make_controller()
    assert len(controller.step(now=1000.0).launch) == 2
    ready = sorted(i["InstanceId"] for i in instances(aws))
    for iid in ready:
        report_worker_ready(aws, iid, threading.Event())
    busy = receive_all(aws)  # both ready instances hold a message each
    send(aws, 1)
    assert len(controller.step(now=1001.0).launch) == 1
    (new,) = {i["InstanceId"] for i in instances(aws)} - set(ready)
    delete(aws, receive_all(aws))  # the third message answered: two instances wanted
    refused_once = Flaky(aws.ec2.terminate_instances,
                         failing_with("InvalidInstanceID.NotFound", "TerminateInstances"),
                         lambda n, kwargs: n < 2)  # the call for all, then the one alone
    patch.setattr(aws.ec2, "terminate_instances", refused_once)
    assert controller.step(now=1002.0).terminate == (new,)
    assert f"cannot terminate instance {new}" in caplog.text and "at the next round" in caplog.text
    assert controller.step(now=1003.0).terminate == (new,)
    assert sorted(i["InstanceId"] for i in instances(aws)) == ready
    delete(aws, busy)


def test_a_throttled_scale_in_fails_the_round_rather_than_call_once_per_instance(aws, make_controller,
                                                                                 patch):
    send(aws, 3)
    controller = make_controller()
    controller.step()
    delete(aws, receive_all(aws))
    throttled = Flaky(aws.ec2.terminate_instances, failing_with("RequestLimitExceeded", "TerminateInstances"),
                      lambda n, kwargs: True)
    patch.setattr(aws.ec2, "terminate_instances", throttled)
    with pytest.raises(ClientError, match="RequestLimitExceeded"):
        controller.step()
    assert len(throttled.calls) == 1
    patch.undo()
    assert len(controller.step().terminate) == 3 and instances(aws) == []


def test_a_throttle_while_asking_each_instance_alone_fails_the_round(aws, make_controller, patch):
    """One protected instance fails the whole call, and each is then asked alone. A
    throttle or an outage meanwhile is no refusal of that instance's: noted as one, the
    instance would be asked again only a minute later, and go last at every scale-in."""
    send(aws, 2)
    controller = make_controller()
    controller.step()
    protected, other = sorted(i["InstanceId"] for i in instances(aws))
    aws.ec2.modify_instance_attribute(InstanceId=protected, DisableApiTermination={"Value": True})
    real = aws.ec2.terminate_instances

    def terminate(**kwargs):
        if kwargs["InstanceIds"] == [other]:
            raise failing_with("RequestLimitExceeded", "TerminateInstances")()
        return real(**kwargs)

    patch.setattr(aws.ec2, "terminate_instances", terminate)
    delete(aws, receive_all(aws))
    try:
        with pytest.raises(ClientError, match="RequestLimitExceeded"):
            controller.step()
        assert other not in controller.refusals.ids
    finally:
        aws.ec2.modify_instance_attribute(InstanceId=protected, DisableApiTermination={"Value": False})
    patch.undo()


@pytest.mark.parametrize("code", ["RequestLimitExceeded", "UnsupportedOperation", "InternalError"])
def test_a_termination_ec2_fails_holds_up_no_launch(aws, make_controller, patch, code):
    """Terminations that come first and raise would let a stopped instance EC2 will not
    end (a code of its own, throttling, an outage of TerminateInstances alone) hold every
    launch, round after round, with requests waiting and nothing live."""
    send(aws, 1)
    make_controller().step()
    stray = instances(aws)[0]["InstanceId"]
    aws.ec2.stop_instances(InstanceIds=[stray])
    failing = Flaky(aws.ec2.terminate_instances, failing_with(code, "TerminateInstances"),
                    lambda n, kwargs: True)
    patch.setattr(aws.ec2, "terminate_instances", failing)
    send(aws, 4)
    controller = make_controller()
    with pytest.raises(ClientError, match=code):
        controller.step()
    assert failing.calls  # it was asked
    assert len(instances(aws)) == 5  # the round's launches, all the same
    with pytest.raises(ClientError, match=code):
        controller.step()
    assert len(instances(aws)) == 5  # counted: not launched again
    patch.undo()
    assert controller.step().clean_up == (stray,)
    assert instances(aws, ("stopped",)) == []


def test_a_worker_run_by_hand_tags_nothing(aws):
    assert not report_worker_failed(aws, "my-laptop", "model-unavailable")


class Killed(BaseException):
    """SIGKILL, as far as the code under test can tell: nothing after it runs."""


def test_killed_between_decision_and_terminate(aws, make_controller, patch):
    send(aws, 4)
    make_controller().step()
    delete(aws, receive_all(aws))

    def die(*args, **kwargs):
        raise Killed

    dying = make_controller()
    patch.setattr("controller.loop.terminate", die)
    with pytest.raises(Killed):
        dying.step()
    patch.undo()
    assert len(instances(aws)) == 4
    decision = make_controller().step()
    assert len(decision.terminate) == 4 and decision.launch == ()
    assert instances(aws) == []


def test_killed_mid_launch_the_next_controller_launches_only_the_rest(aws, make_controller, patch):
    real = aws.ec2.run_instances
    done: list[int] = []
    lock = threading.Lock()

    def run_three_then_die(**kwargs):
        with lock:
            if len(done) >= 3:
                raise Killed
            done.append(1)
        return real(**kwargs)

    patch.setattr(aws.ec2, "run_instances", run_three_then_die)
    send(aws, 8)
    with pytest.raises(Killed):
        make_controller().step()
    patch.undo()
    assert len(instances(aws)) == 3
    assert len(make_controller().step().launch) == 5
    assert len(names(aws)) == len(set(names(aws))) == 8


def test_dry_run_logs_and_acts_on_nothing(aws, make_controller, caplog):
    caplog.set_level(logging.INFO, logger="controller")
    send(aws, 4)
    decision = make_controller(dry_run=True).step()
    assert len(decision.launch) == 4
    assert instances(aws) == []
    lines = [r.getMessage() for r in caplog.records if "action=launch 4" in r.getMessage()]
    assert lines and "(dry run)" in lines[0], caplog.text

    make_controller().step()  # a real fleet of 4
    delete(aws, receive_all(aws))
    caplog.clear()
    assert len(make_controller(dry_run=True).step().terminate) == 4
    assert len(instances(aws)) == 4
    assert "action=terminate 4 (dry run)" in caplog.text


def test_one_log_line_per_change(aws, make_controller, caplog):
    caplog.set_level(logging.INFO, logger="controller")
    send(aws, 3)
    controller = make_controller()
    for _ in range(4):
        controller.step()
    decisions = [r for r in caplog.records if "backlog=" in r.getMessage()]
    # The launch, then one line when EC2 first lists the instances; nothing for the quiet rounds.
    assert len(decisions) <= 2, caplog.text
    assert sum("action=launch 3" in r.getMessage() for r in decisions) == 1


def test_a_controller_started_less_than_a_window_ago_says_why_it_holds_the_fleet(aws):
    controller = Controller(dataclasses.replace(aws.settings, scale_in_cooldown_s=60.0), aws)
    launched = controller.step(now=1000.0)
    assert not launched.launch  # an empty queue, an empty fleet
    send(aws, 2)
    controller.step(now=1001.0)
    delete(aws, receive_all(aws))
    held = controller.step(now=1002.0)
    assert held.terminate == () and "watched for less than the 60s scale-in window" in held.reason
    later = controller.step(now=1061.0)  # a whole window watched: the rounds decide
    assert "watched for less" not in later.reason


def test_timeline_csv_and_plot(aws, make_controller, tmp_path):
    csv_path, png_path = tmp_path / "timeline.csv", tmp_path / "timeline.png"
    controller = make_controller(timeline_path=csv_path)
    send(aws, 3)
    controller.step()
    controller.step()
    delete(aws, receive_all(aws))
    controller.step()
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == TIMELINE_FIELDS
    assert [r["action"] for r in rows] == ["launch 3", "-", "terminate 3"]
    assert [int(r["visible"]) for r in rows] == [3, 3, 0]
    assert rows[0]["reason"].startswith("backlog 3, target 1 per instance")
    plot_timeline(csv_path, png_path)
    data = png_path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    # A controller started again adds to it: restarted, one had erased what came before.
    make_controller(timeline_path=csv_path).step()
    with csv_path.open() as fh:
        assert [r["action"] for r in csv.DictReader(fh)] == ["launch 3", "-", "terminate 3", "-"]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")  # another program's columns: started afresh
    make_controller(timeline_path=other)
    assert other.read_text().splitlines() == [",".join(TIMELINE_FIELDS)]
    png_path.write_bytes(data)  # not even text (the two paths swapped): started afresh too
    make_controller(timeline_path=png_path)
    assert png_path.read_text().splitlines() == [",".join(TIMELINE_FIELDS)]


def test_a_timeline_that_cannot_be_written_is_warned_about_once_and_stops_nothing(aws, make_controller,
                                                                                   tmp_path, caplog):
    folder = tmp_path / "gone"
    folder.mkdir()
    controller = make_controller(timeline_path=folder / "timeline.csv")
    (folder / "timeline.csv").unlink()
    folder.rmdir()  # a disk unmounted, a directory cleaned up under it
    send(aws, 3)
    assert len(controller.step().launch) == 3
    assert len(instances(aws)) == 3
    controller.step()
    assert caplog.text.count("cannot write the timeline") == 1, caplog.text
    assert len(controller.timeline) == 2


# --- the loop under faults ------------------------------------------------------------


class Flaky:
    """Wraps a client method: calls for which `fails(call_number, kwargs)` is true raise `error()`."""

    def __init__(self, real: Callable, error: Callable[[], Exception],
                 fails: Callable[[int, dict], bool]) -> None:
        self.real, self.error, self.fails = real, error, fails
        self.calls: list[tuple[float, bool]] = []  # (monotonic time, failed)
        self.lock = threading.Lock()

    def __call__(self, **kwargs):
        with self.lock:
            number = len(self.calls)
            failed = self.fails(number, kwargs)
            self.calls.append((time.monotonic(), failed))
        if failed:
            raise self.error()
        return self.real(**kwargs)

    @property
    def failures(self) -> list[float]:
        return [t for t, failed in self.calls if failed]


def failing_with(code: str, operation: str, status: int | None = None) -> Callable[[], Exception]:
    """A maker of the error `operation` fails with (client_error), for a fault injected."""
    return lambda: client_error(code, operation, status)


def start(controller: Controller) -> threading.Thread:
    thread = threading.Thread(target=controller.run, name="controller", daemon=True)
    thread.start()
    return thread


def stop(controller: Controller, thread: threading.Thread) -> None:
    controller.stopping.set()
    thread.join(30)  # a bound on a failure's wait only: a round under way ends first
    assert not thread.is_alive(), "run() did not stop"


FAULTS = {
    "ec2-capacity": ("ec2", "run_instances", failing_with("InsufficientInstanceCapacity", "RunInstances")),
    "ec2-throttled": ("ec2", "run_instances", failing_with("RequestLimitExceeded", "RunInstances")),
    "ec2-describe-timeout": ("ec2", "describe_instances",
                             lambda: ReadTimeoutError(endpoint_url="http://ec2.test")),
    "sqs-endpoint-down": ("sqs", "get_queue_attributes",
                          lambda: EndpointConnectionError(endpoint_url="http://sqs.test")),
    "sqs-throttled": ("sqs", "get_queue_attributes",
                      failing_with("ThrottlingException", "GetQueueAttributes")),
    "unexpected": ("ec2", "terminate_instances", lambda: RuntimeError("something nobody expected")),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_run_survives_faults_with_backoff(aws, make_controller, patch, caplog, fault):
    service, method, error = FAULTS[fault]
    client = getattr(aws, service)
    flaky = Flaky(getattr(client, method), error, lambda number, kwargs: number < 3)
    patch.setattr(client, method, flaky)
    caplog.set_level(logging.INFO, logger="controller")
    if method == "terminate_instances":  # the fault hits scale-in: start with a fleet and no work
        send(aws, 4)
        make_controller().step()
        delete(aws, receive_all(aws))
        want = 0
    else:
        # One launch per round for run_instances faults (launches run in parallel), so
        # that three failed calls are three failed launches (which back off launches only).
        want = 1 if method == "run_instances" else 6
        send(aws, want)
    controller = make_controller()
    thread = start(controller)
    try:
        # 10 s once came within 0.3 s on a loaded core: the deadline bounds only a failure.
        wait_until(lambda: len(flaky.failures) == 3 and len(instances(aws)) == want, 60,
                   f"{want} instances after 3 failures")
    finally:
        stop(controller, thread)
    # Backed off, doubling: 0.1 s, then 0.2 s between the failed calls; no spinning at the
    # 20 ms poll interval (which would have made ~15 calls in the same time).
    gaps = [b - a for a, b in zip(flaky.failures, flaky.failures[1:], strict=False)]
    assert gaps[0] >= TEST_BACKOFF_MIN_S * 0.9 and gaps[1] >= 2 * TEST_BACKOFF_MIN_S * 0.9, gaps
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3, caplog.text
    assert all("next try in" in r.getMessage() for r in warnings)
    if fault == "unexpected":
        assert all(r.exc_info for r in warnings), "a surprise is logged with its traceback"
    assert len(set(names(aws))) == len(names(aws)) == want


def test_launch_backoff_is_timed_from_when_the_failed_launch_returned(aws, make_controller, patch):
    """A launch that fails slowly (botocore retrying a throttled RunInstances for seconds)
    holds the next launch for the backoff after it returned, not after the round began:
    timed from the round, the backoff had passed before the call returned."""
    real = aws.ec2.run_instances
    calls: list[tuple[float, float]] = []  # (started, returned), monotonic

    def slow_then_fails(**kwargs):
        started = time.monotonic()
        try:
            if not calls:
                time.sleep(3 * TEST_BACKOFF_MIN_S)
            if len(calls) < 2:
                raise failing_with("RequestLimitExceeded", "RunInstances")()
            return real(**kwargs)
        finally:
            calls.append((started, time.monotonic()))

    patch.setattr(aws.ec2, "run_instances", slow_then_fails)
    send(aws, 1)
    controller = make_controller()
    thread = start(controller)
    try:
        wait_until(lambda: len(instances(aws)) == 1, 10, "an instance after 2 failed launches")
    finally:
        stop(controller, thread)
    (_, first_returned), (second_started, second_returned), (third_started, _) = calls[:3]
    assert second_started - first_returned >= TEST_BACKOFF_MIN_S, calls
    assert third_started - second_returned >= 2 * TEST_BACKOFF_MIN_S, calls


def test_launch_backoff_is_not_lengthened_by_a_slow_observation(aws, make_controller, patch):
    """Timed from before the round's observation, a failed launch's backoff would be
    longer by as long as SQS takes to give the queue's depth: seconds, when it is slow."""
    real_depth = aws.queue_depth
    clock = [1000.0]  # the controller's monotonic clock, moved on only by the slow calls
    fake_time = SimpleNamespace(time=time.time, monotonic=lambda: clock[0])
    patch.setattr("controller.loop.time", fake_time)
    patch.setattr("controller.observe.time", fake_time)

    def slow_depth(url):
        clock[0] += 1.5
        return real_depth(url)

    def fails(**kwargs):
        clock[0] += 2.0  # botocore retrying
        raise failing_with("RequestLimitExceeded", "RunInstances")()

    patch.setattr(aws, "queue_depth", slow_depth)
    patch.setattr(aws.ec2, "run_instances", fails)
    send(aws, 1)
    controller = make_controller()
    controller.step()
    # From the failed call's return: timed from before the observation, or from it, it
    # would be 3.5 s or 2 s older.
    assert controller.launch_backoff.failed_at == clock[0] == 1003.5


def test_partial_launch_failure_keeps_the_successes(aws, make_controller, patch, caplog):
    """InsufficientInstanceCapacity on some launches: the rest count, the next round adds the remainder."""
    failing = {"app-tier-instance-3", "app-tier-instance-7", "app-tier-instance-11"}

    def capacity_short(number: int, kwargs: dict) -> bool:
        name = kwargs["TagSpecifications"][0]["Tags"][0]["Value"]
        return number < 15 and name in failing  # only in the first round of 15

    flaky = Flaky(aws.ec2.run_instances, failing_with("InsufficientInstanceCapacity", "RunInstances"),
                  capacity_short)
    patch.setattr(aws.ec2, "run_instances", flaky)
    caplog.set_level(logging.INFO, logger="controller")
    send(aws, 100)
    controller = make_controller()
    began = time.monotonic()
    assert len(controller.step(now=1000.0).launch) == 15
    # The launch backoff is timed from when the failed launch returned: 15 launches took
    # over a second on a loaded machine, and a fixed second after was still in it.
    after_backoff = 1000.0 + (time.monotonic() - began) + 1.0
    assert "3 of 15 launch(es) failed" in caplog.text
    assert len(instances(aws)) == 12
    # Even if EC2 lags and lists none of the 12 that did start, they are remembered.
    real_describe = aws.ec2.describe_instances
    patch.setattr(aws.ec2, "describe_instances", lambda **kwargs: {"Reservations": []})
    assert sorted(controller.step(now=after_backoff).launch) == [3, 7, 11]
    patch.setattr(aws.ec2, "describe_instances", real_describe)
    assert controller.step(now=after_backoff + 1.0).launch == ()
    assert names(aws) == sorted(f"app-tier-instance-{n}" for n in range(1, 16))
    assert len(flaky.calls) == 18, "15, then only the 3 that failed"


def test_partial_launch_failure_in_run_reaches_the_cap(aws, make_controller, patch, caplog):
    def every_third_of_first_round(number: int, kwargs: dict) -> bool:
        return number < 15 and number % 3 == 0

    flaky = Flaky(aws.ec2.run_instances, failing_with("InsufficientInstanceCapacity", "RunInstances"),
                  every_third_of_first_round)
    patch.setattr(aws.ec2, "run_instances", flaky)
    caplog.set_level(logging.INFO, logger="controller")
    send(aws, 100)
    controller = make_controller()
    thread = start(controller)
    try:
        # Generous deadlines: in-process moto lists 15 instances slowly on a busy machine.
        wait_until(lambda: len(instances(aws)) == 15, 30, "15 instances")
        rounds = len(controller.timeline)
        wait_until(lambda: len(controller.timeline) >= rounds + 5, 30, "5 more rounds")
    finally:
        stop(controller, thread)
    assert len(flaky.calls) == 20, "15 in the first round, then only the 5 that failed"
    assert len(set(names(aws))) == 15
    assert "InsufficientInstanceCapacity" in caplog.text


def zone_short(aws: Aws, full: set[str], code: str = "InsufficientInstanceCapacity",
               status: int = 400) -> Flaky:
    """run_instances failing with `code` (and HTTP `status`) in the subnets `full`; moto
    has none of these subnets, so a launch let through goes to its default one."""
    real = aws.ec2.run_instances

    def launch(**kwargs):
        kwargs.pop("SubnetId")
        return real(**kwargs)

    def refusal() -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "not in this zone now"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "RunInstances")

    return Flaky(launch, refusal, lambda n, kwargs: kwargs["SubnetId"] in full)


# EC2 sends InsufficientInstanceCapacity as a 500: taken for "no reply", it would be
# repeated in its full subnet round after round, the next never tried.
@pytest.mark.parametrize(("code", "status"), [("InsufficientInstanceCapacity", 500),
                                              ("InsufficientInstanceCapacity", 400), ("Unsupported", 400)])
def test_a_launch_a_zone_cannot_take_is_tried_in_the_other_subnets(aws, make_controller, patch, code, status):
    """As an Auto Scaling group does: else the numbers whose subnet is in that zone would
    fail round after round (the policy always picks the lowest free numbers)."""
    controller = make_controller()
    controller.settings = dataclasses.replace(aws.settings, subnet_ids=("subnet-a", "subnet-b", "subnet-c"))
    flaky = zone_short(aws, {"subnet-a"}, code, status)
    patch.setattr(aws.ec2, "run_instances", flaky)
    send(aws, 6)
    assert len(controller.step().launch) == 6
    assert len(instances(aws)) == 6
    assert len(flaky.failures) == 2, "the two numbers that start in subnet-a, once each"


def test_a_zones_refusal_is_not_retried_by_botocore(aws, make_controller):
    """EC2's InsufficientInstanceCapacity, a 500, retried 5 times in the same full subnet,
    each retry taking 14 of the EC2 client's 500 retry tokens: a shortage would drain
    them, and a blip of DescribeInstances then fail its round."""
    from botocore.awsrequest import AWSResponse

    body = (b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>'
            b"InsufficientInstanceCapacity</Code><Message>none in this zone</Message></Error></Errors>"
            b"<RequestID>r</RequestID></Response>")

    class Raw:
        def stream(self, **_kwargs):
            yield body

    sent = []

    def no_capacity(request, **_kwargs):
        sent.append(request)
        return AWSResponse(request.url, 500, {}, Raw())

    aws.ec2.meta.events.register_first("before-send.ec2.RunInstances", no_capacity)
    try:
        send(aws, 1)
        make_controller().step()
    finally:
        aws.ec2.meta.events.unregister("before-send.ec2.RunInstances", no_capacity)
    # Once (moto, which botocore asks too, launched one behind the answer given here).
    assert [r.headers["amz-sdk-request"] for r in sent] == [b"attempt=1; max=6"]


def test_a_throttled_launch_is_repeated_with_its_token(aws, make_controller, patch, caplog):
    """EC2 throttles RunInstances (a 503) before it looks at the token: an earlier
    attempt of botocore's, timed out, may have launched, so the call is repeated as it
    was, where a zone's 500 is not."""
    controller = make_controller()
    throttled = failing_with("RequestLimitExceeded", "RunInstances", 503)
    patch.setattr(aws.ec2, "run_instances", Flaky(aws.ec2.run_instances, throttled, lambda n, kwargs: True))
    send(aws, 2)
    controller.step()
    assert "2 of 2 launch(es) failed" in caplog.text
    assert set(controller.unanswered.by_number) == {1, 2}


def a_launch_left_unanswered(aws: Aws, controller: Controller, patch) -> LaunchCall:
    """A round whose one launch is throttled (a 503: it may have launched), at 1000 s:
    the call the controller remembers, to repeat."""
    throttled = Flaky(aws.ec2.run_instances, failing_with("RequestLimitExceeded", "RunInstances", 503),
                      lambda n, kwargs: True)
    patch.setattr(aws.ec2, "run_instances", throttled)
    send(aws, 1)
    controller.step(now=1000.0)
    [unanswered] = controller.unanswered.calls().values()
    return unanswered


def ec2_of_2025(unanswered: LaunchCall, new_call) -> tuple[object, list[str]]:
    """RunInstances as EC2 answers it since January 2025: the repeat of `unanswered`
    refused (IdempotentInstanceTerminated), any other call answered by `new_call`; and the
    ClientTokens it was sent, in order."""
    tokens = []

    def run_instances(**kwargs):
        tokens.append(kwargs["ClientToken"])
        if kwargs["ClientToken"] == unanswered.token:
            raise failing_with("IdempotentInstanceTerminated", "RunInstances", 400)()
        return new_call(**kwargs)

    return run_instances, tokens


def test_a_repeated_launch_whose_instance_has_terminated_is_made_anew(aws, make_controller, patch, caplog):
    """Since January 2025 EC2 refuses a ClientToken whose instance has terminated
    (IdempotentInstanceTerminated), where it returned that instance: a call that got no
    reply, whose instance ended before EC2 listed it, failed at each repeat for the 5
    minutes it is remembered, that number not launched, every launch backing off."""
    caplog.set_level(logging.INFO, logger="controller.act")
    controller = make_controller()
    real = aws.ec2.run_instances
    unanswered = a_launch_left_unanswered(aws, controller, patch)
    run_instances, tokens = ec2_of_2025(unanswered, real)
    patch.setattr(aws.ec2, "run_instances", run_instances)
    assert controller.step(now=1060.0).launch == (1,)
    assert tokens[0] == unanswered.token and len(tokens) == 2 and tokens[1] != unanswered.token
    assert names(aws) == ["app-tier-instance-1"]
    assert controller.unanswered.calls() == {}
    assert "launching anew" in caplog.text


@pytest.mark.parametrize("new_call_fails", ["no capacity", "no reply"])
def test_a_repeated_launch_refused_for_a_terminated_instance_is_not_repeated_again(
        aws, make_controller, patch, new_call_fails):
    """The call refused so has nothing left to repeat, whatever becomes of the new one:
    kept, each launch of that number for minutes sent its token first again. A new call
    that gets no reply is the one to repeat."""
    controller = make_controller()
    unanswered = a_launch_left_unanswered(aws, controller, patch)
    code = "InsufficientInstanceCapacity" if new_call_fails == "no capacity" else "InternalError"

    def new_call_failing(**kwargs):
        raise failing_with(code, "RunInstances", 500)()

    run_instances, tokens = ec2_of_2025(unanswered, new_call_failing)
    patch.setattr(aws.ec2, "run_instances", run_instances)
    controller.step(now=1060.0)
    assert tokens[0] == unanswered.token and len(tokens) == 2
    if new_call_fails == "no capacity":
        assert controller.unanswered.calls() == {}
    else:
        assert [call.token for call in controller.unanswered.calls().values()] == [tokens[1]]


def test_a_launch_refused_for_a_reason_of_its_own_is_not_tried_in_the_other_subnets(aws, make_controller,
                                                                                   patch, caplog):
    """Only a zone's shortage moves a launch to the next subnet: a wrong AMI, a right
    missing or a throttle would fail there too, each try a call more against EC2's rate
    limits (and a throttle's call, repeated elsewhere, could launch twice)."""
    controller = make_controller()
    controller.settings = dataclasses.replace(aws.settings, subnet_ids=("subnet-a", "subnet-b", "subnet-c"))
    flaky = zone_short(aws, {"subnet-a"}, "InvalidAMIID.NotFound")
    patch.setattr(aws.ec2, "run_instances", flaky)
    send(aws, 6)
    controller.step()
    assert len(flaky.calls) == 6, "each number once: the two that start in subnet-a fail there"
    assert len(flaky.failures) == 2 and len(instances(aws)) == 4
    assert "2 of 6 launch(es) failed" in caplog.text and "InvalidAMIID.NotFound" in caplog.text


def test_a_launch_no_subnet_can_take_fails(aws, make_controller, patch, caplog):
    controller = make_controller()
    controller.settings = dataclasses.replace(aws.settings, subnet_ids=("subnet-a", "subnet-b"))
    flaky = zone_short(aws, {"subnet-a", "subnet-b"})
    patch.setattr(aws.ec2, "run_instances", flaky)
    send(aws, 2)
    controller.step()
    assert "2 of 2 launch(es) failed" in caplog.text
    assert len(flaky.calls) == 4 and instances(aws) == []


def test_a_launch_whose_reply_was_lost_is_repeated_with_its_token_and_subnet(aws, make_controller, patch,
                                                                            caplog):
    """EC2 started the instance, but its reply was lost (botocore's retries exhausted):
    the next launch of that number repeats the call, so that EC2 returns that instance
    rather than start a second app-tier-instance-1. (moto ignores ClientToken: the
    tokens sent are what is checked here.)"""
    controller = make_controller()
    controller.settings = dataclasses.replace(aws.settings, subnet_ids=("subnet-a", "subnet-b"))
    real_run, real_describe = aws.ec2.run_instances, aws.ec2.describe_instances
    calls: list[tuple[str, str]] = []

    def reply_lost(**kwargs):
        calls.append((kwargs["ClientToken"], kwargs.pop("SubnetId")))
        if len(calls) == 1:  # number 1 starts in subnet-b, which is full this once
            raise failing_with("InsufficientInstanceCapacity", "RunInstances")()
        reply = real_run(**kwargs)
        if len(calls) == 2:  # started in subnet-a, but nobody heard so
            raise ReadTimeoutError(endpoint_url="http://ec2.test")
        return reply

    def lagging(**kwargs):  # EC2 does not list it yet: number 1 looks free
        if any(f["Name"] == "tag:Name" for f in kwargs.get("Filters", [])):
            return {"Reservations": []}
        return real_describe(**kwargs)

    patch.setattr(aws.ec2, "run_instances", reply_lost)
    patch.setattr(aws.ec2, "describe_instances", lagging)
    send(aws, 1)
    controller.step(now=1000.0)
    assert re.search("ReadTimeout|Read timeout", caplog.text), caplog.text
    assert controller.step(now=1001.0).launch == (1,)
    assert calls[2] == calls[1] and calls[1][0] != calls[0][0], calls
    # Answered, the call is not repeated again.
    aws.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in instances(aws)])
    assert controller.step(now=1002.0).launch == (1,)
    assert calls[3][0] not in {token for token, _ in calls[:3]}


def test_a_lost_launch_reply_is_forgotten_once_ec2_lists_its_instance(aws, make_controller, patch, caplog):
    """Remembered until answered or 5 minutes old, the call would be repeated at the
    number's next launch after its instance has gone (terminated, scaled in), and EC2
    answers a repeated token with that terminated instance, not a new one."""
    controller = make_controller()
    real_run = aws.ec2.run_instances
    tokens: list[str] = []

    def reply_lost(**kwargs):
        tokens.append(kwargs["ClientToken"])
        reply = real_run(**kwargs)
        if len(tokens) == 1:
            raise ReadTimeoutError(endpoint_url="http://ec2.test")
        return reply

    patch.setattr(aws.ec2, "run_instances", reply_lost)
    send(aws, 1)
    controller.step(now=1000.0)
    assert "launch(es) failed" in caplog.text
    assert controller.step(now=1001.0).launch == ()  # EC2 lists it: number 1 is taken
    aws.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in instances(aws)])
    assert controller.step(now=1002.0).launch == (1,)
    assert tokens[1] != tokens[0]


def test_a_failing_launch_backs_off_launches_only(aws, make_controller, patch, caplog):
    """No capacity, or a quota reached: the round goes on (it raises nothing, its
    clean-ups are done), and launches wait 1 s, doubling while they keep failing, at
    most 30 s, back to 1 s once one succeeds; one warning line per failure says when."""
    send(aws, 1)
    make_controller().step()
    stray = instances(aws)[0]["InstanceId"]
    aws.ec2.stop_instances(InstanceIds=[stray])  # serves nobody: cleaned up, replaced
    quota = {"reached": True}
    flaky = Flaky(aws.ec2.run_instances, failing_with("VcpuLimitExceeded", "RunInstances"),
                  lambda n, kwargs: quota["reached"])
    patch.setattr(aws.ec2, "run_instances", flaky)
    controller = make_controller(launch_backoff_min_s=1.0, launch_backoff_max_s=30.0)

    # A failure is timed when the launch call returned: the round's own (real) time is
    # added to its `now`. So each step below that expects launches again comes that
    # long after the hold (a fixed second was too little on a busy machine).
    def step(now: float):
        began = time.monotonic()
        return controller.step(now=now), time.monotonic() - began

    t = 1000.0
    decision, took = step(t)
    assert decision.clean_up == (stray,) and len(decision.launch) == 1
    assert instances(aws, ("stopped",)) == [] and len(flaky.calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "VcpuLimitExceeded" in warnings[0], warnings
    assert "launches held, next try in 1.0s" in warnings[0]
    for wait in (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0):
        held = controller.step(now=t + wait - 0.01)
        assert held.launch == () and "launches held" in held.reason, held
        t += wait + took + 0.01
        decision, took = step(t)
        assert len(decision.launch) == 1
        assert f"next try in {min(2 * wait, 30.0):.1f}s" in caplog.text
    assert len(flaky.calls) == 8
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 8

    quota["reached"] = False  # a launch that succeeds ends the backoff
    t += 30.0 + took + 0.01
    assert len(controller.step(now=t).launch) == 1 and len(instances(aws)) == 1
    aws.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in instances(aws)])
    quota["reached"] = True
    t += 1.0
    decision, took = step(t)
    assert len(decision.launch) == 1
    assert caplog.text.count("next try in 1.0s") == 2
    assert len(controller.step(now=t + 1.0 + took + 0.01).launch) == 1


def test_failing_launches_slow_no_scale_in(aws, make_controller, patch):
    """Every launch failing (InsufficientInstanceCapacity in every zone) does not put the
    loop into its error backoff: once the work is done, the fleet goes at the next poll."""
    send(aws, 2)
    make_controller().step()
    assert len(instances(aws)) == 2
    flaky = Flaky(aws.ec2.run_instances, failing_with("InsufficientInstanceCapacity", "RunInstances"),
                  lambda n, kwargs: True)
    patch.setattr(aws.ec2, "run_instances", flaky)
    send(aws, 3)  # 5 wanted: 3 launches that fail
    # An error backoff far above the deadlines: the old loop slept it after each failed
    # launch, and the deadlines still leave a loaded machine room (3 s was tight).
    controller = make_controller(backoff_min_s=60.0, backoff_max_s=60.0)
    thread = start(controller)
    try:
        wait_until(lambda: flaky.calls, 20, "a failed launch")
        rounds = len(controller.timeline)
        wait_until(lambda: len(controller.timeline) >= rounds + 3, 20, "3 more rounds")
        delete(aws, receive_all(aws))
        wait_until(lambda: instances(aws) == [], 20, "scale-in to zero")
    finally:
        stop(controller, thread)


def test_default_backoff_is_at_least_a_second(aws, patch):
    """With the shipped settings a failing AWS is asked at most once a second, not once a poll."""
    flaky = Flaky(aws.sqs.get_queue_attributes,
                  lambda: EndpointConnectionError(endpoint_url="http://sqs.test"), lambda n, kw: True)
    patch.setattr(aws.sqs, "get_queue_attributes", flaky)
    controller = Controller(aws.settings, aws)  # poll 20 ms, default backoff
    thread = start(controller)
    try:
        # The gap between the calls' own start times: a sleep and a count had 0.09 s of
        # margin, which one stall of this thread could use up.
        wait_until(lambda: len(flaky.calls) >= 2, 30, "the second call")
    finally:
        stop(controller, thread)
    (first, _), (second, _) = flaky.calls[:2]
    assert second - first >= 0.99, flaky.calls


def test_botocore_retries_throttling_by_itself(aws, make_controller):
    """RequestLimitExceeded on the wire: the client's standard retry mode retries it, no error reaches us.

    (A read is throttled here, not RunInstances: under mock_aws moto still carries
    out a request whose answer a hook replaces, and it ignores ClientToken.)
    """
    attempts = {"n": 0}

    def throttle_first(request, **kwargs):
        attempts["n"] += 1
        if attempts["n"] == 1:
            body = ("<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit "
                    "exceeded.</Message></Error></Errors><RequestID>r1</RequestID></Response>")
            return AWSResponse(request.url, 503, {}, MockRawResponse(body))
        return None  # moto answers

    event = "before-send.ec2.DescribeInstances"
    aws.ec2.meta.events.register_first(event, throttle_first)
    try:
        send(aws, 1)
        assert make_controller().step().launch == (1,)
    finally:
        aws.ec2.meta.events.unregister(event, throttle_first)
    assert attempts["n"] == 2
    assert len(instances(aws)) == 1


def test_a_round_that_begins_late_or_takes_long_is_said(make_controller, monkeypatch, caplog):
    """A controller stopped for 40 s, or AWS stalled for 18 s: its log must not have a gap
    with no word of why the fleet did not follow the queue meanwhile."""
    controller = make_controller()
    clock = [1000.0]
    monkeypatch.setattr("controller.loop.time.monotonic", lambda: clock[0])
    # Each round's own time, and how much longer than asked its wait before the next lasts.
    rounds = iter([(0.1, 0.0), (LATE_ROUND_S + 1, 0.0), (0.1, LATE_ROUND_S + 3), (0.1, 0.0)])
    overslept = 0.0

    def step(now=None):
        nonlocal overslept
        took, overslept = next(rounds, (0.0, 0.0))
        if not took:
            controller.stopping.set()
        clock[0] += took

    def wait(seconds):
        clock[0] += seconds + overslept

    monkeypatch.setattr(controller, "step", step)
    monkeypatch.setattr(controller, "_wait", wait)
    with caplog.at_level(logging.WARNING, logger="controller.loop"):
        controller.run()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    later = "the fleet followed the queue that much later"
    assert said == [f"controller: this round took {LATE_ROUND_S + 1:.0f}s (AWS slow to answer): {later}",
                    f"controller: this round began {LATE_ROUND_S + 3:.0f}s late (this process was stopped, "
                    f"or starved of CPU): {later}"]


def test_instances_ended_by_someone_else_are_said(aws, make_controller, caplog):
    """15 instances terminated behind its back: more than a bare "launch 15" in the log."""
    send(aws, 3)
    controller = make_controller()
    controller.step()
    mine = sorted(i["InstanceId"] for i in instances(aws))
    aws.ec2.terminate_instances(InstanceIds=mine[:2])
    with caplog.at_level(logging.WARNING, logger="controller.loop"):
        controller.step()
    said = [r.getMessage() for r in caplog.records if "not by this controller" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("controller: 2 instance(s) ended since the last round, "
                                                 f"not by this controller: {', '.join(mine[:2])} ")
    # What it terminates itself is not said so.
    caplog.clear()
    delete(aws, receive_all(aws))
    assert len(controller.step().terminate) == 3  # the third, and the two launched again
    with caplog.at_level(logging.WARNING, logger="controller.loop"):
        controller.step()
    assert "not by this controller" not in caplog.text and instances(aws) == []


def test_instances_it_terminated_that_ec2_still_lists_running_are_not_counted(aws, make_controller, patch,
                                                                             caplog):
    """EC2's reads lag after a TerminateInstances too: counted as serving, they would hold
    back the launches a new burst needs, and once gone be blamed on someone else."""
    send(aws, 4)
    controller = make_controller()
    controller.step(now=1000.0)
    real = aws.ec2.describe_instances
    before = real(InstanceIds=[i["InstanceId"] for i in instances(aws)])
    delete(aws, receive_all(aws))
    assert len(controller.step(now=1001.0).terminate) == 4

    def stale(**kwargs):  # the fleet as it was before the scale-in
        return before if any(f["Name"] == "tag:Name" for f in kwargs.get("Filters", [])) else real(**kwargs)

    patch.setattr(aws.ec2, "describe_instances", stale)
    send(aws, 4)
    assert len(controller.step(now=1002.0).launch) == 4
    patch.undo()
    with caplog.at_level(logging.WARNING, logger="controller.loop"):
        assert controller.step(now=1003.0).launch == ()
    assert "not by this controller" not in caplog.text and len(instances(aws)) == 4


def three_launched_one_ended_by_hand(aws: Aws, make_controller: Callable[..., Controller]) -> tuple:
    """A controller that launched 3, one of them since terminated by hand: the controller,
    the real describe_instances, its listing from before, and the ended instance's id."""
    send(aws, 3)
    controller = make_controller()
    controller.step(now=1000.0)
    real = aws.ec2.describe_instances
    before = real(InstanceIds=[i["InstanceId"] for i in instances(aws)])
    ended = sorted(i["InstanceId"] for i in instances(aws))[0]
    aws.ec2.terminate_instances(InstanceIds=[ended])
    return controller, real, before, ended


def test_an_instance_ended_by_someone_else_that_ec2_still_lists_running_is_not_counted(
        aws, make_controller, patch):
    """Ended by a hand, then listed running by a read still behind: it must not stand in
    for its replacement, which the controller would scale in, then launch again."""
    controller, real, before, ended = three_launched_one_ended_by_hand(aws, make_controller)
    assert len(controller.step(now=1001.0).launch) == 1  # its replacement

    def stale(**kwargs):  # the fleet as it was before the hand ended one
        return before if any(f["Name"] == "tag:Name" for f in kwargs.get("Filters", [])) else real(**kwargs)

    patch.setattr(aws.ec2, "describe_instances", stale)
    decision = controller.step(now=1002.0)
    assert (decision.launch, decision.terminate) == ((), ())
    patch.undo()
    assert len(instances(aws)) == 3


def test_an_instance_someone_else_ended_seen_shutting_down_is_not_counted_when_listed_running_again(
        aws, make_controller, patch):
    """On EC2 a hand's termination is first listed shutting-down, for tens of seconds
    (moto ends it at once): remembered only once listed terminated, it would be forgotten
    before a read still behind lists it running."""
    controller, real, before, ended = three_launched_one_ended_by_hand(aws, make_controller)
    shutting = copy.deepcopy(before)
    for reservation in shutting["Reservations"]:
        for instance in reservation["Instances"]:
            if instance["InstanceId"] == ended:
                instance["State"] = {"Code": 32, "Name": "shutting-down"}
    replies = iter([shutting, before])  # shutting down, then a read still behind

    def lagging(**kwargs):
        if any(f["Name"] == "tag:Name" for f in kwargs.get("Filters", [])):
            return next(replies)
        return {"Reservations": []}  # nor listed terminated yet

    patch.setattr(aws.ec2, "describe_instances", lagging)
    assert len(controller.step(now=1001.0).launch) == 1  # its replacement
    patch.setattr(aws.ec2, "describe_instances", lambda **kwargs: (
        lagging(**kwargs) if any(f["Name"] == "tag:Name" for f in kwargs.get("Filters", []))
        else real(**kwargs)))
    decision = controller.step(now=1002.0)
    assert (decision.launch, decision.terminate) == ((), ())


def test_a_dry_run_beside_a_live_fleet_says_what_ended_without_alarm(aws, make_controller, caplog):
    """In a dry run another controller does the acting: its scale-ins are not warned of
    as instances ended behind this one's back."""
    send(aws, 2)
    make_controller().step()  # the live controller launches
    watching = make_controller(dry_run=True)
    watching.step()
    aws.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in instances(aws)])
    with caplog.at_level(logging.INFO, logger="controller.loop"):
        watching.step()
    said = [r for r in caplog.records if "ended since the last round" in r.getMessage()]
    assert [(r.levelno, "(dry run: by whoever acts)" in r.getMessage()) for r in said] == \
        [(logging.INFO, True)]


def test_instances_it_terminated_in_a_round_that_then_failed_are_not_blamed_on_others(
        aws, make_controller, patch, caplog):
    """Its terminations took effect, their answer was lost: the next round must not blame
    "someone else" for them."""
    send(aws, 3)
    controller = make_controller()
    controller.step()
    delete(aws, receive_all(aws))
    real = aws.ec2.terminate_instances

    def answer_lost(**kwargs):
        real(**kwargs)
        raise ReadTimeoutError(endpoint_url="http://ec2.test")

    patch.setattr(aws.ec2, "terminate_instances", answer_lost)
    with pytest.raises(ReadTimeoutError):
        controller.step()
    patch.setattr(aws.ec2, "terminate_instances", real)
    with caplog.at_level(logging.WARNING, logger="controller.loop"):
        controller.step()
    assert instances(aws) == [] and "not by this controller" not in caplog.text


# --- the command line ---------------------------------------------------------------------


def test_on_aws_the_controller_will_not_launch_workers_without_credentials(capsys, monkeypatch):
    """Without an instance profile a worker has no credentials and never serves."""
    for name in ("AWS_ENDPOINT_URL", "INSTANCE_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--once"])
    assert stopped.value.code == 2
    assert "INSTANCE_PROFILE is not set" in capsys.readouterr().err


@pytest.mark.parametrize("weights", ["/home/me/resnet50.h5", "weights.h5"])
def test_on_aws_the_controller_will_not_send_its_workers_a_path_on_this_host(weights, capsys, monkeypatch):
    """The instances have no such file: every worker would exit, round after round."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("INSTANCE_PROFILE", "imgclass-worker")
    monkeypatch.setenv("AMI_ID", "ami-0123456789abcdef0")
    monkeypatch.setenv("MODEL_WEIGHTS", weights)
    with pytest.raises(SystemExit) as stopped:
        main(["--once"])
    assert stopped.value.code == 2
    assert f"MODEL_WEIGHTS={weights} is a file on this host" in capsys.readouterr().err


def test_on_aws_the_controller_will_not_launch_the_placeholder_image(capsys, monkeypatch):
    """Every launch of it would fail, round after round."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AMI_ID", raising=False)
    monkeypatch.setenv("INSTANCE_PROFILE", "imgclass-worker")
    with pytest.raises(SystemExit) as stopped:
        main(["--once"])
    assert stopped.value.code == 2
    assert "AMI_ID is not set (the default ami-0abcdef1234567890 is a placeholder)" in capsys.readouterr().err


def test_once_without_credentials_says_so_in_one_line(capsys, monkeypatch, tmp_path):
    without_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached: no credentials
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # its lock, not in the user's state directory
    assert main(["--once"]) == 1
    assert capsys.readouterr().err.strip() == "python controller.py: Unable to locate credentials"


def test_a_bad_scaling_mode_in_the_environment_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("SCALING_MODE", "fastest")
    with pytest.raises(SystemExit) as stopped:
        main(["--once"])
    assert stopped.value.code == 2
    assert "SCALING_MODE must be one of backlog, latency, got 'fastest'" in capsys.readouterr().err


def test_the_mode_option_is_checked_as_its_variable_is(capsys, monkeypatch):
    """SCALING_MODE=LATENCY is accepted: so is --mode LATENCY (argparse's choices refused it)."""
    monkeypatch.delenv("SCALING_MODE", raising=False)
    args = build_parser(Settings()).parse_args(["--mode", "LATENCY"])
    assert settings_from(args, {}).scaling_mode == "latency"
    with pytest.raises(SystemExit) as stopped:
        main(["--mode", "fastest", "--once"])
    assert stopped.value.code == 2
    assert "--mode (SCALING_MODE) must be one of backlog, latency, got 'fastest'" in capsys.readouterr().err


def test_what_stops_a_controller_on_aws_is_said_all_at_once_and_nothing_on_the_embedded_one(tmp_path):
    from controller.main import problems_on_aws

    weights = tmp_path / "resnet50.h5"
    weights.write_bytes(b"w")
    bare = Settings(model_weights=str(weights))
    assert [p.split(" ")[0] for p in problems_on_aws(bare)] == [
        "INSTANCE_PROFILE", f"MODEL_WEIGHTS={weights}", "AMI_ID"]
    assert problems_on_aws(dataclasses.replace(bare, endpoint_url="http://127.0.0.1:5000")) == []
    ready = dataclasses.replace(bare, instance_profile="imgclass-worker", model_weights="imagenet",
                    ami_id="ami-0123456789abcdef1")
    assert problems_on_aws(ready) == []


def test_the_controller_runs_from_its_own_folder_as_from_the_root():
    """DESIGN.md: `python controller.py` from `controller/` or the root; from the folder
    it must not be "can't open file"."""
    from_root, from_folder = (
        subprocess.run([sys.executable, "controller.py", "--help"], cwd=cwd, capture_output=True,
                       text=True, timeout=30, check=True).stdout
        for cwd in (ROOT, ROOT / "controller"))
    assert from_folder == from_root and "--max-instances" in from_folder


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "controller.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    parser = build_parser(Settings())
    options = [a for a in parser._actions if a.option_strings]
    assert {o for a in options for o in a.option_strings} >= {
        "--max-instances", "--poll-interval", "--mode", "--target-backlog", "--acceptable-latency",
        "--seconds-per-image", "--boot-time", "--scale-in-cooldown", "--dry-run", "--once",
        "--timeline", "--plot",
    }
    for action in options:
        assert action.help, f"{action.option_strings} has no help text"
        for option in action.option_strings:
            assert option in out, f"{option} missing from --help"


def test_each_setting_option_sets_its_variable_and_the_policy_reads_every_setting_it_names():
    """An option missing from the table of variables would be parsed and dropped, and a
    Policy field left out of policy_from keep its default whatever is set: no other test
    sees either."""
    from controller.main import SETTING_OPTIONS
    from controller.policy import POLICY_SETTINGS, Policy

    given = {"--max-instances": "7", "--poll-interval": "2.5", "--mode": "latency", "--target-backlog": "3",
             "--acceptable-latency": "11", "--seconds-per-image": "0.7", "--boot-time": "33",
             "--scale-in-cooldown": "9"}
    assert {option.flag for option in SETTING_OPTIONS} == set(given)
    args = build_parser(Settings()).parse_args([word for pair in given.items() for word in pair])
    settings = settings_from(args, {})
    for option in SETTING_OPTIONS:
        assert getattr(settings, option.setting) == option.kind(given[option.flag]), option.flag
    assert set(POLICY_SETTINGS) == {f.name for f in dataclasses.fields(Policy)}
    policy = Policy.from_settings(settings)
    assert dataclasses.astuple(policy) == (7, "latency", 3.0, 11.0, 0.7, 33.0, 9.0, settings.ami_id)


def test_options_override_the_environment_and_are_checked_like_it():
    env = {"POLL_INTERVAL": "3", "MAX_INSTANCES": "4", "APP_PREFIX": "demo"}
    args = build_parser(Settings.from_env(env)).parse_args(["--max-instances", "7"])
    settings = settings_from(args, env)
    assert (settings.max_instances, settings.poll_interval_s, settings.prefix) == (7, 3.0, "demo")
    for option, value in (("--poll-interval", "0"), ("--poll-interval", "inf"), ("--max-instances", "-1")):
        with pytest.raises(ValueError):
            settings_from(build_parser(Settings()).parse_args([option, value]), {})


def test_an_option_replaces_a_wrong_variable_and_a_wrong_variable_is_named_as_such(capsys, monkeypatch):
    """MAX_INSTANCES=many in the environment must not stop a controller started with
    --max-instances 3, which replaces it."""
    env = {"MAX_INSTANCES": "many", "POLL_INTERVAL": "2"}
    settings = settings_from(build_parser(Settings()).parse_args(["--max-instances", "3"]), env)
    assert (settings.max_instances, settings.poll_interval_s) == (3, 2.0)
    monkeypatch.setenv("POLL_INTERVAL", "0")  # not given as an option: its variable is named alone
    with pytest.raises(SystemExit) as stopped:
        main(["--once", "--max-instances", "2"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "error: POLL_INTERVAL must be from 0.01" in err and "--poll-interval" not in err.split("error:")[1]


def test_help_shows_the_environments_values_as_defaults():
    out = subprocess.run([sys.executable, "controller.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True, env={**os.environ, "MAX_INSTANCES": "9"}).stdout
    assert "(MAX_INSTANCES, default 9)" in " ".join(out.split())


def test_a_bad_option_stops_the_controller_with_a_usage_error(capsys, monkeypatch):
    with pytest.raises(SystemExit) as stopped:
        main(["--poll-interval", "0", "--once"])
    assert stopped.value.code == 2
    assert "error: --poll-interval (POLL_INTERVAL) must be from 0.01" in capsys.readouterr().err
    monkeypatch.setenv("MAX_INSTANCES", "many")  # the environment's, too: no traceback
    with pytest.raises(SystemExit) as stopped:
        main(["--once"])
    assert stopped.value.code == 2
    assert "MAX_INSTANCES must be a whole number" in capsys.readouterr().err


def test_the_controller_pings_its_watchdog_through_its_rounds_and_waits(aws, patch, tmp_path):
    """Run by systemd with WatchdogSec= (ami/imgclass-controller.service) or by make run: a
    controller that hangs stops pinging and is restarted. It pings between rounds too, so
    that a long poll interval or backoff is not taken for a hang."""
    import socket

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        patch.setenv("NOTIFY_SOCKET", str(path))
        patch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
        patch.delenv("WATCHDOG_PID", raising=False)
        # One round, then pings only from the wait for the next, a minute away.
        controller = Controller(dataclasses.replace(aws.settings, poll_interval_s=60.0), aws)
        thread = start(controller)
        try:
            heard = [listener.recv(64) for _ in range(6)]  # each within 5 s
        finally:
            stop(controller, thread)
    assert heard[0] == b"READY=1" and set(heard[1:]) == {b"WATCHDOG=1"}


def test_the_controller_pings_its_watchdog_at_each_aws_request_of_a_round(aws, patch, tmp_path):
    """A round's calls, each retried by botocore for minutes at worst, could together
    outlast WatchdogSec with no ping: a controller slow for AWS's sake taken for a hung
    one and restarted, forgetting the launches EC2 does not list yet."""
    import socket

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        patch.setenv("NOTIFY_SOCKET", str(path))
        patch.setenv("WATCHDOG_USEC", str(600 * 10**6))  # no ping from the wait for 300 s
        patch.delenv("WATCHDOG_PID", raising=False)
        patch.setattr("controller.loop.PING_ON_REQUEST_EVERY_S", 0.0)  # else one a second
        controller = Controller(dataclasses.replace(aws.settings, poll_interval_s=60.0), aws)
        first_round_done = threading.Event()
        real_step = controller.step

        def step(*args, **kwargs):
            try:
                return real_step(*args, **kwargs)
            finally:
                first_round_done.set()

        patch.setattr(controller, "step", step)
        thread = start(controller)
        try:
            # The round's end waited for, not guessed from 2 s of silence: its datagrams
            # are all in the socket by then, and the next round a minute away.
            assert first_round_done.wait(30), "the first round did not end"
            listener.setblocking(False)
            heard = []
            with suppress(BlockingIOError):
                while True:
                    heard.append(listener.recv(64))
        finally:
            stop(controller, thread)
    assert heard[0] == b"READY=1" and set(heard[1:]) == {b"WATCHDOG=1"}
    # One as the round began, and one for each of its requests: the queue's depth and the fleet.
    assert len(heard[1:]) >= 3, heard


def test_the_pings_at_aws_requests_come_once_a_second_at_most(aws, patch):
    """A round makes a handful of requests in well under a second; a ping each is no
    more alive than one, and each costs a datagram make run's stack must read."""
    pinged: list[float] = []
    patch.setattr("controller.loop.systemd.watchdog_interval_s", lambda: 300.0)
    patch.setattr("controller.loop.systemd.ping_watchdog", lambda: pinged.append(time.monotonic()))
    clock = [1000.0]
    patch.setattr("controller.loop.time.monotonic", lambda: clock[0])
    controller = Controller(aws.settings, aws)
    for step_s in (0.0, 0.3, 0.3, 0.3, 0.2, 0.5):  # requests at 1000, 1000.3, ... 1001.6
        clock[0] += step_s
        controller._ping_on_request()
    assert pinged == pytest.approx([1000.0, 1001.1])


def test_once_exits_1_when_a_launch_fails(aws, patch, monkeypatch, capsys, tmp_path, caplog):
    """A failed launch no longer fails the round (launches back off alone), but a
    script running --once must still learn of it from the exit status."""
    monkeypatch.setenv("APP_PREFIX", aws.settings.prefix)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # its lock, not in the user's state directory
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the mock's AWS, as on AWS:
    monkeypatch.setenv("INSTANCE_PROFILE", "imgclass-worker")
    monkeypatch.setenv("AMI_ID", "ami-12345678")
    send(aws, 1)
    patch.setattr(aws.ec2, "run_instances", Flaky(aws.ec2.run_instances,
                                                  failing_with("VcpuLimitExceeded", "RunInstances"),
                                                  lambda n, kwargs: True))
    patch.setattr("controller.main.Aws.open", lambda self, *services: aws)
    with caplog.at_level(logging.INFO, logger="controller.loop"):
        assert main(["--once"]) == 1
    assert "a launch failed" in capsys.readouterr().err
    # The settings it decided with, as a running controller logs them.
    said = ("controller: prefix unit in us-east-1, cap 15, mode backlog, 1 message(s) per instance, "
            "poll every 1.0s, scale-in window 60s, ready deadline 1200s")
    assert said in caplog.text
    assert instances(aws) == []


def test_timeline_and_plot_paths_that_cannot_be_written_are_usage_errors_not_tracebacks(
        capsys, monkeypatch, tmp_path):
    """--timeline's header is written at start, without a traceback; --plot is checked
    writable at start too, not found unwritable at exit, after a run of hours."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    for argv, says in ((["--timeline", str(tmp_path / "none" / "t.csv")], "--timeline"),
                       (["--timeline", str(tmp_path)], "--timeline"),
                       (["--timeline", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "none" / "p.png")],
                        f"--plot {tmp_path / 'none' / 'p.png'}: no folder")):
        with pytest.raises(SystemExit) as stopped:
            main(["--dry-run", "--once", *argv])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {says}" in err and "Traceback" not in err, err
    # A venv of the tiers' packages alone (make runtime-venv) has no matplotlib.
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as stopped:
        main(["--dry-run", "--once", "--timeline", str(tmp_path / "t.csv"),
              "--plot", str(tmp_path / "p.png")])
    assert stopped.value.code == 2 and "--plot needs matplotlib" in capsys.readouterr().err


def test_a_plot_that_cannot_be_drawn_at_exit_says_so_in_one_line(aws, capsys, monkeypatch, tmp_path):
    import controller.timeline

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setenv("APP_PREFIX", aws.settings.prefix)  # the shared mock AWS's queues
    monkeypatch.setattr(controller.timeline, "plot_timeline",
                        lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    code = main(["--dry-run", "--once", "--timeline", str(tmp_path / "t.csv"),
                 "--plot", str(tmp_path / "p.png")])
    assert code == 1
    assert "could not draw" in capsys.readouterr().err


def test_no_instance_to_launch_is_warned_about(aws, caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setenv("APP_PREFIX", aws.settings.prefix)
    with caplog.at_level(logging.WARNING):
        assert main(["--dry-run", "--once", "--max-instances", "0"]) == 0
    assert "MAX_INSTANCES is 0: no instance will be launched" in caplog.text
