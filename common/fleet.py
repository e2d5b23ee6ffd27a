"""The app-tier fleet as EC2 shows it: instances named app-tier-instance-<n>."""

from __future__ import annotations

from dataclasses import dataclass

from common.aws import Aws
from common.names import APP_TIER_NAME_PREFIX, PREFIX_TAG, instance_number

# Every state in which an instance is, or may soon be, ours to count or clean up.
WATCHED_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
# Those in which it is, or is about to be, serving (and costing money).
LIVE_STATES = ("pending", "running")


@dataclass(frozen=True)
class Instance:
    id: str
    number: int
    state: str
    launched_at: float


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
        for reservation in page["Reservations"]:
            for raw in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
                number = instance_number(tags.get("Name", ""))
                if number is None:
                    continue
                found.append(
                    Instance(
                        id=raw["InstanceId"],
                        number=number,
                        state=raw["State"]["Name"],
                        launched_at=raw["LaunchTime"].timestamp(),
                    )
                )
    return tuple(sorted(found, key=lambda i: (i.number, i.id)))
