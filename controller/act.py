"""Act: carry out a decision against EC2.

Terminating is safe to repeat. A launch is safe across botocore's retries of one
call (its ClientToken), not across rounds: the loop remembers its recent launches
until EC2 lists them (controller/loop.py), so that a round does not launch again."""

from __future__ import annotations

import logging
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import ClientError

from common.aws import Aws, error_code
from common.config import Settings
from common.names import PREFIX_TAG, ROLE_APP_TIER, ROLE_TAG, instance_name

log = logging.getLogger(__name__)

# RunInstances' errors that concern one zone or subnet, not the launch: another may take it.
ZONE_ERRORS = frozenset({"InsufficientInstanceCapacity", "Unsupported", "InsufficientFreeAddressesInSubnet"})

USER_DATA_TEMPLATE = Path(__file__).resolve().parent.parent / "ami" / "user-data.sh"


# What a value may hold to go into the boot script's single quotes and systemd's
# environment file unchanged.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._:/@+,=-]*")


def worker_settings(settings: Settings) -> dict[str, str]:
    """The settings a worker reads, as the environment its instance is given: the
    controller's own, so that workers on EC2 run as configured here."""
    return {
        "AWS_REGION": settings.region,
        "APP_PREFIX": settings.prefix,
        "MODEL_WEIGHTS": settings.model_weights,
        "MODEL_RUNTIME": settings.model_runtime,
        "WORKER_THREADS": str(settings.worker_threads),
        "RECEIVE_BATCH": str(settings.receive_batch),
        "RECEIVE_WAIT": str(settings.receive_wait_s),
        "VISIBILITY_TIMEOUT": str(settings.visibility_timeout_s),
        "RETRY_DELAY": str(settings.retry_delay_s),
        "SHUTDOWN_GRACE": f"{settings.shutdown_grace_s:g}",
        "STALL_TIMEOUT": f"{settings.stall_timeout_s:g}",
        "MAX_IMAGE_PIXELS": str(settings.max_image_pixels),
        "AWS_ENDPOINT_URL": settings.endpoint_url or "",
    }


def render_user_data(settings: Settings) -> str:
    """The boot script that starts the worker service on a real instance (see ami/)."""
    text = USER_DATA_TEMPLATE.read_text(encoding="utf-8")
    for name, value in worker_settings(settings).items():
        if not _PLAIN_VALUE.fullmatch(value):
            raise ValueError(f"{name}={value!r} cannot be passed to instances: use only letters, "
                             f"digits and . _ : / @ + , = -")
        text = text.replace("{{" + name + "}}", value)
    return text


class LaunchError(RuntimeError):
    """Some launches failed; `launched` maps each number that did launch to its instance id."""

    def __init__(self, launched: dict[int, str], errors: list[Exception]) -> None:
        super().__init__(
            f"{len(errors)} of {len(errors) + len(launched)} launch(es) failed "
            f"({len(launched)} succeeded): {errors[0]}"
        )
        self.launched = launched
        self.errors = errors


def launch(aws: Aws, settings: Settings, numbers: tuple[int, ...]) -> dict[int, str]:
    """Launch one instance per number, named app-tier-instance-<n>; returns number -> id.

    One RunInstances call per instance, because each needs its own Name tag at
    launch; the calls run in parallel so that 15 take about as long as one.
    """
    # As text: boto3 base64-encodes UserData itself, and a script encoded here too
    # reached the instance still encoded, which cloud-init does not run.
    user_data = render_user_data(settings)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_launch_one, aws, settings, n, user_data) for n in numbers]
    ids: dict[int, str] = {}
    errors: list[Exception] = []
    for n, future in zip(numbers, futures, strict=True):
        try:
            ids[n] = future.result()
        except Exception as exc:  # reported together below; the loop retries with backoff
            errors.append(exc)
    if errors:
        raise LaunchError(ids, errors)
    return ids


def _launch_one(aws: Aws, settings: Settings, n: int, user_data: str) -> str:
    """Launch number n in its own subnet, spreading the fleet over the zones; where its
    zone cannot take it, in the next subnet, as an Auto Scaling group does: else the same
    numbers (the policy picks the lowest free ones) would fail there round after round."""
    subnets: list[str | None] = list(settings.subnet_ids) or [None]
    start = n % len(subnets)
    subnets = subnets[start:] + subnets[:start]
    for subnet in subnets[:-1]:
        try:
            return _run_instance(aws, settings, n, user_data, subnet)
        except ClientError as exc:
            if error_code(exc) not in ZONE_ERRORS:
                raise
            log.info("controller: %s not launched in %s (%s): trying the next subnet",
                     instance_name(n), subnet, error_code(exc))
    return _run_instance(aws, settings, n, user_data, subnets[-1])


def _run_instance(aws: Aws, settings: Settings, n: int, user_data: str, subnet: str | None) -> str:
    kwargs: dict = {
        "ImageId": settings.ami_id,
        "InstanceType": settings.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": user_data,
        # The same token on botocore's retries makes a retried launch idempotent.
        "ClientToken": f"{settings.prefix}-{n}-{uuid.uuid4().hex}"[:64],
        "TagSpecifications": [
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "Name", "Value": instance_name(n)},
                    {"Key": ROLE_TAG, "Value": ROLE_APP_TIER},
                    {"Key": PREFIX_TAG, "Value": settings.prefix},
                ],
            }
        ],
        "InstanceInitiatedShutdownBehavior": "terminate",
        # IMDSv2 only, whatever the AMI says (one made by hand, without Packer's
        # imds_support, says nothing) or the account's default is; one hop: a worker
        # runs no containers, which would need two.
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 1},
    }
    if settings.key_name:
        kwargs["KeyName"] = settings.key_name
    if settings.security_group_ids:
        kwargs["SecurityGroupIds"] = list(settings.security_group_ids)
    if subnet:
        kwargs["SubnetId"] = subnet
    if settings.instance_profile:
        kwargs["IamInstanceProfile"] = {"Name": settings.instance_profile}
    return aws.ec2.run_instances(**kwargs)["Instances"][0]["InstanceId"]


def terminate(aws: Aws, instance_ids: tuple[str, ...]) -> None:
    if instance_ids:
        aws.ec2.terminate_instances(InstanceIds=list(instance_ids))
