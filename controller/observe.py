"""Observe: what the queues and EC2 say right now. Nothing here decides anything."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.aws import Aws
from common.fleet import LIVE_STATES, Instance, app_tier_instances


@dataclass(frozen=True)
class Observation:
    """One round's view of SQS and EC2, with what only this controller knows (how long
    each instance has gone unready, its launches EC2 does not list yet)."""

    # Wall time (time.time()): the timeline's, and a launch's launched_at, as EC2's LaunchTime.
    at: float
    # Monotonic time (time.monotonic()): every duration is measured on it, as a step of
    # the wall clock (NTP correcting a wrong clock, a hand) would fail every booting
    # instance at once, or end a hold early, or stretch it.
    clock: float
    visible: int
    in_flight: int
    delayed: int
    instances: tuple[Instance, ...]
    # Seconds each live instance whose worker has not said it serves has been silent, on
    # this controller's monotonic clock since it launched it, or since its launch as EC2's
    # own clock gave its age when the controller first saw it (the loop's ReadinessClock):
    # not EC2's LaunchTime against the controller's wall clock, which may be off. An
    # instance it does not name has been silent for longer than anyone knows.
    silent_for: Mapping[str, float] = field(default_factory=dict)

    def silent_s(self, instance: Instance) -> float:
        return self.silent_for.get(instance.id, math.inf)

    @property
    def backlog(self) -> int:
        """Messages still to be answered: waiting, being worked on, or delayed."""
        return self.visible + self.in_flight + self.delayed

    def in_state(self, *states: str) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.state in states)

    @property
    def live(self) -> tuple[Instance, ...]:
        """Instances that are, or are about to be, up (and costing money)."""
        return self.in_state(*LIVE_STATES)

    @property
    def serving(self) -> tuple[Instance, ...]:
        """Live instances that serve, or are about to: all but those whose worker gave up."""
        return tuple(i for i in self.live if not i.worker_failed)

    @property
    def failed(self) -> tuple[Instance, ...]:
        """Live instances whose worker has given up for good: they serve nobody."""
        return tuple(i for i in self.live if i.worker_failed)


def observe(aws: Aws, now: float | None = None) -> Observation:
    """What SQS and EC2 say; `now` (tests) stands for both clocks."""
    depth = aws.queue_depth(aws.request_queue_url)
    instances = app_tier_instances(aws)
    # Read after the fleet: each instance's age is counted to EC2's answer (Instance.age_s),
    # so a clock read before it had a restarted controller take every instance as older
    # by the read's length (minutes, with retries): unready ones given up on that early.
    return Observation(
        at=time.time() if now is None else now,
        clock=time.monotonic() if now is None else now,
        visible=depth.visible,
        in_flight=depth.in_flight,
        delayed=depth.delayed,
        instances=instances,
    )


def terminated(aws: Aws, instance_ids: list[str]) -> set[str]:
    """Those of `instance_ids` that EC2 lists as terminated. A filter, not InstanceIds:
    an id EC2 does not list yet (it is eventually consistent) fails nothing."""
    reply = aws.ec2.describe_instances(Filters=[
        {"Name": "instance-id", "Values": instance_ids},
        {"Name": "instance-state-name", "Values": ["terminated"]},
    ])
    return {i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]}
