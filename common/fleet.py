"""The app-tier fleet as EC2 shows it: instances named app-tier-instance-<n>."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from common.aws import Aws
from common.backoff import next_wait
from common.names import APP_TIER_NAME_PREFIX, PREFIX_TAG, instance_number

log = logging.getLogger(__name__)

# Every state in which an instance is, or may soon be, ours to count or clean up.
WATCHED_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
# Those in which it is, or is about to be, serving (and costing money).
LIVE_STATES = ("pending", "running")

# The tag a worker that has given up for good puts on its own instance, saying why:
# "model-unavailable", "cannot-receive", "cannot-store" or "model-fault" (README,
# Controller). EC2 alone cannot tell such an instance from one that is still booting,
# and would count it as serving until it is terminated.
WORKER_FAILED_TAG = "imgclass:worker-failed"
# The tag a worker puts on its own instance once it has received from the request
# queue. Nothing else tells an instance that will never serve (no credentials, a
# role missing a right, a worker crash-looping, stuck pending) from one still booting.
WORKER_READY_TAG = "imgclass:worker-ready"


@dataclass(frozen=True)
class Instance:
    """One app-tier instance as EC2 lists it, with what its worker's tags say."""

    id: str
    number: int
    state: str
    launched_at: float
    worker_failed: str = ""  # its WORKER_FAILED_TAG: why its worker gave up, "" if it has not
    ready: bool = False  # its worker has received from the request queue (WORKER_READY_TAG)
    image_id: str = ""  # the AMI it runs ("" if not known: one this controller just launched)
    # Seconds since its launch when EC2 listed it, on EC2's own clock (the reply's Date less
    # its LaunchTime), so that a reader's clock being off does not matter; 0 when not
    # known (EC2 sent no Date, or this controller just launched it).
    age_s: float = 0.0
    # The ClientToken of the RunInstances call that started it ("" if none), by which a
    # launch that got no reply finds its instance.
    client_token: str = ""


def scale_in_order(instance: Instance) -> tuple[int, int, float, int]:
    """Sorting key of the order the controller scales in (first first). A pending
    instance holds no work yet, nor does one whose worker has not yet received
    (not ready: booting, or, locally, waiting for a worker process); then the most
    recently launched, which have had the least chance to take a batch; then the
    highest numbers. The local runner, short of worker processes, serves
    instances in the reverse order, so that no busy worker is stopped while an
    instance without one survives it (else a replacement numbered 1 is served,
    then scaled in mid-batch, while instances without workers are kept)."""
    return (0 if instance.state == "pending" else 1, 1 if instance.ready else 0,
            -instance.launched_at, -instance.number)


def ec2_time(reply: Mapping) -> float | None:
    """When EC2 answered `reply`, on EC2's own clock: its HTTP Date header (to the second),
    as a Unix time; None without one (a fake EC2, a proxy that drops it) or if unreadable."""
    date = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        when = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    # RFC 5322's "-0000" zone gives a naive time, still meant as UTC.
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def app_tier_instances(aws: Aws, states: tuple[str, ...] = WATCHED_STATES) -> tuple[Instance, ...]:
    """This deployment's app-tier instances in the given states, ordered by their number."""
    found = []
    paginator = aws.ec2.get_paginator("describe_instances")
    filters = [
        {"Name": "tag:Name", "Values": [f"{APP_TIER_NAME_PREFIX}*"]},
        {"Name": f"tag:{PREFIX_TAG}", "Values": [aws.settings.prefix]},
        {"Name": "instance-state-name", "Values": list(states)},
    ]
    for page in paginator.paginate(Filters=filters):
        answered_at = ec2_time(page)
        for reservation in page["Reservations"]:
            for raw in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
                number = instance_number(tags.get("Name", ""))
                if number is None:
                    continue
                launched_at = raw["LaunchTime"].timestamp()
                found.append(
                    Instance(
                        id=raw["InstanceId"],
                        number=number,
                        state=raw["State"]["Name"],
                        launched_at=launched_at,
                        worker_failed=tags.get(WORKER_FAILED_TAG, ""),
                        ready=WORKER_READY_TAG in tags,
                        image_id=raw.get("ImageId", ""),
                        client_token=raw.get("ClientToken", ""),
                        # Never negative: the Date is truncated to the second.
                        age_s=0.0 if answered_at is None else max(0.0, answered_at - launched_at),
                    )
                )
    return tuple(sorted(found, key=lambda i: (i.number, i.id)))


def report_worker_failed(aws: Aws, instance_id: str, reason: str) -> bool:
    """Tag our own instance as one whose worker has given up; True if EC2 took it.

    Best effort, as the worker is exiting anyway. Without the tag (say, the
    instance role lacks ec2:CreateTags) the controller keeps counting the
    instance as serving until READY_DEADLINE, as it never tags it ready either.
    """
    if not instance_id.startswith("i-"):
        return False  # run by hand, outside any instance: nothing to tag
    try:
        aws.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": WORKER_FAILED_TAG, "Value": reason}])
    except Exception as exc:  # any failure means the same: the report is lost
        log.warning("cannot tag instance %s %s=%s: %s", instance_id, WORKER_FAILED_TAG, reason, exc)
        return False
    return True


def report_worker_ready(aws: Aws, instance_id: str, stopping: threading.Event,
                        max_delay_s: float = 60.0) -> None:
    """Tag our own instance as serving, trying until EC2 takes it or `stopping` is set.

    Without the tag the controller takes the instance for one that never served
    once READY_DEADLINE has passed, and replaces it.
    """
    if not instance_id.startswith("i-"):
        return  # run by hand, outside any instance: nothing to tag
    delay = 0.0
    while not stopping.is_set():
        try:
            aws.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": WORKER_READY_TAG, "Value": "1"}])
            return
        except Exception as exc:  # whatever it is, trying again later is all there is to do
            delay = next_wait(delay, 1.0, max_delay_s)
            log.warning("cannot tag instance %s %s (%s); trying again in %.0f s",
                        instance_id, WORKER_READY_TAG, exc, delay)
        stopping.wait(delay)
