"""Act: carry out a decision against EC2.

Terminating is safe to repeat. A launch is safe across botocore's retries of one
call (its ClientToken), not across rounds: the loop remembers its recent launches
for minutes, as EC2 last listed them (controller/memory.py), so that a round does not
launch again, and a call that got no reply, to repeat it as it was (LaunchCall)."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from common.aws import Aws
from common.aws_errors import error_code
from common.config import Settings, worker_environment
from common.names import PREFIX_TAG, ROLE_APP_TIER, ROLE_TAG, instance_name

log = logging.getLogger(__name__)

# RunInstances' errors that concern one zone or subnet, not the launch: another may take it.
ZONE_ERRORS = frozenset({"InsufficientInstanceCapacity", "Unsupported", "InsufficientFreeAddressesInSubnet"})
# EC2's answer (since January 2025; it returned the instance before) to a token whose
# instance has terminated: that call's instance is gone, and a new call may launch.
TOKEN_OF_A_TERMINATED_INSTANCE = "IdempotentInstanceTerminated"

USER_DATA_TEMPLATE = Path(__file__).resolve().parent.parent / "ami" / "user-data.sh"


# What a value may hold to go into the boot script's single quotes and systemd's
# environment file unchanged (brackets: an IPv6 address in a URL, http://[::1]:5000).
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._:/@+,=\[\]-]*")


def render_user_data(settings: Settings) -> str:
    """The boot script that starts the worker service on a real instance (see ami/)."""
    text = USER_DATA_TEMPLATE.read_text(encoding="utf-8")
    for name, value in worker_environment(settings).items():
        if not _PLAIN_VALUE.fullmatch(value):
            raise ValueError(f"{name}={value!r} cannot be passed to instances: use only letters, "
                             f"digits and . _ : / @ + , = - [ ]")
        text = text.replace("{{" + name + "}}", value)
    return text


@dataclass(frozen=True)
class LaunchCall:
    """What makes a RunInstances call of one number the same call again: repeated with
    the same ClientToken and subnet, EC2 returns the instance it started, if it did (or
    refuses it, TOKEN_OF_A_TERMINATED_INSTANCE, if that has terminated)."""

    token: str
    subnet: str | None

    @classmethod
    def new(cls, settings: Settings, n: int, subnet: str | None) -> LaunchCall:
        return cls(f"{settings.prefix}-{n}-{uuid.uuid4().hex}"[:64], subnet)


class NoReply(Exception):
    """A RunInstances call that got no answer (botocore's retries spent): it may have
    started its instance."""

    def __init__(self, call: LaunchCall, cause: Exception) -> None:
        # "may have launched": a throttled call (a 503) was answered, but an earlier
        # attempt of botocore's may have launched all the same.
        super().__init__(f"RunInstances may have launched (repeated with its token): {cause}")
        self.call = call


class LaunchError(RuntimeError):
    """Some launches failed; `launched` maps each number that did launch to its instance id,
    `unanswered` each that got no reply to the call to repeat, and `spent` holds the
    numbers whose call to repeat EC2 refused as its instance's, terminated: nothing is
    left to repeat."""

    def __init__(self, launched: dict[int, str], errors: list[Exception],
                 unanswered: dict[int, LaunchCall], spent: frozenset[int] = frozenset()) -> None:
        super().__init__(
            f"{len(errors)} of {len(errors) + len(launched)} launch(es) failed "
            f"({len(launched)} succeeded): {errors[0]}"
        )
        self.launched = launched
        self.errors = errors
        self.unanswered = unanswered
        self.spent = spent


def launch(aws: Aws, settings: Settings, numbers: tuple[int, ...],
           again: Mapping[int, LaunchCall] | None = None) -> dict[int, str]:
    """Launch one instance per number, named app-tier-instance-<n>; returns number -> id.
    `again`: calls of some of these numbers that got no reply, repeated as they were.

    One RunInstances call per instance, because each needs its own Name tag at
    launch; the calls run in parallel so that 15 take about as long as one.
    """
    again = again or {}
    aws.ec2.meta.events.register_first("needs-retry.ec2.RunInstances", _zone_errors_are_answers,
                                       unique_id="imgclass-zone-errors-are-answers")
    # As text: boto3 base64-encodes UserData itself, and a script encoded here too
    # reached the instance still encoded, which cloud-init does not run.
    user_data = render_user_data(settings)
    spent: set[int] = set()  # added to by the launches' threads (_run_again_or_anew)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_launch_one, aws, settings, n, user_data, again.get(n), spent)
                   for n in numbers]
    ids: dict[int, str] = {}
    errors: list[Exception] = []
    unanswered: dict[int, LaunchCall] = {}
    for n, future in zip(numbers, futures, strict=True):
        try:
            ids[n] = future.result()
        except Exception as exc:  # reported together below; the loop retries with backoff
            errors.append(exc)
            if isinstance(exc, NoReply):
                unanswered[n] = exc.call
    if errors:
        raise LaunchError(ids, errors, unanswered, frozenset(spent))
    return ids


def _zone_errors_are_answers(response: tuple | None = None, **_kwargs: object) -> None:
    """botocore's needs-retry hook, run before its retry handler: a zone's refusal is
    EC2's answer, not a fault, whatever its status. InsufficientInstanceCapacity comes
    as a 500, which botocore would retry 5 times in the same full subnet, each retry taking
    14 of the EC2 client's 500 retry tokens: a shortage would drain them, and a blip of any
    other call then fail its round. Seen as a 400, it is not retried, and
    the launch goes on to the next subnet at once."""
    if response is None:
        return
    http_response, parsed = response
    error = (parsed or {}).get("Error")
    if isinstance(error, dict) and error.get("Code") in ZONE_ERRORS:
        http_response.status_code = 400


def _launch_one(aws: Aws, settings: Settings, n: int, user_data: str, again: LaunchCall | None,
                spent: set[int]) -> str:
    """Launch number n in its own subnet, spreading the fleet over the zones; where its
    zone cannot take it, in the next subnet, as an Auto Scaling group does: else the same
    numbers (the policy picks the lowest free ones) would fail there round after round.
    A call that got no reply (`again`) is repeated first, in its subnet with its token."""
    subnets: list[str | None] = list(settings.subnet_ids) or [None]
    start = n % len(subnets)
    subnets = subnets[start:] + subnets[:start]
    if again:
        subnets = [again.subnet] + [s for s in subnets if s != again.subnet]
    # A token of its own in each subnet: the same one with other parameters is refused.
    calls = [again if again and again.subnet == subnet else LaunchCall.new(settings, n, subnet)
             for subnet in subnets]
    for call in calls[:-1]:
        try:
            return _run_again_or_anew(aws, settings, n, user_data, call, again, spent)
        except ClientError as exc:
            if error_code(exc) not in ZONE_ERRORS:
                raise
            log.info("controller: %s not launched in %s (%s): trying the next subnet",
                     instance_name(n), call.subnet, error_code(exc))
    return _run_again_or_anew(aws, settings, n, user_data, calls[-1], again, spent)


def _run_again_or_anew(aws: Aws, settings: Settings, n: int, user_data: str, call: LaunchCall,
                       again: LaunchCall | None, spent: set[int]) -> str:
    """Run `call`; if it is the repeat of one that got no reply (`again`) whose instance
    has terminated since, a new call in its subnet (and `n` in `spent`, the old call
    to be forgotten whatever the new one's fate): else that number could not be launched
    until the unanswered call is forgotten (minutes), each try backing off every launch."""
    try:
        return _run_instance(aws, settings, n, user_data, call)
    except ClientError as exc:
        if call is not again or error_code(exc) != TOKEN_OF_A_TERMINATED_INSTANCE:
            raise
    spent.add(n)
    log.info("controller: %s: the launch that got no reply started an instance that has terminated "
             "since; launching anew", instance_name(n))
    return _run_instance(aws, settings, n, user_data, LaunchCall.new(settings, n, call.subnet))


def _run_instance(aws: Aws, settings: Settings, n: int, user_data: str, call: LaunchCall) -> str:
    kwargs: dict = {
        "ImageId": settings.ami_id,
        "InstanceType": settings.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": user_data,
        # The same token on botocore's retries, and on a repeat of a call that got no
        # reply, makes the launch idempotent.
        "ClientToken": call.token,
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
    if call.subnet:
        kwargs["SubnetId"] = call.subnet
    if settings.instance_profile:
        # As the console and the CLI show it, either: an ARN given as a Name failed every launch.
        key = "Arn" if settings.instance_profile.startswith("arn:") else "Name"
        kwargs["IamInstanceProfile"] = {key: settings.instance_profile}
    try:
        return aws.ec2.run_instances(**kwargs)["Instances"][0]["InstanceId"]
    except (ClientError, BotoConnectionError, HTTPClientError) as exc:
        if not _may_have_launched(exc):
            raise
        raise NoReply(call, exc) from exc


def _may_have_launched(exc: Exception) -> bool:
    """A timeout, a lost connection, or EC2 failing (5xx), after botocore's retries: any
    of its attempts may have launched (the last one's error says nothing of the others)."""
    if isinstance(exc, ClientError):
        # A zone's errors say it started nothing, though EC2 sends InsufficientInstanceCapacity
        # as a 500: taken for "no reply", a zone's shortage would never be tried in the next
        # subnet. Every attempt carried the same ClientToken, which EC2 answers
        # with the instance it started before it looks for capacity. Not so throttling (a
        # 503), which comes before the token is looked at: an earlier attempt, timed out,
        # may have launched.
        if error_code(exc) in (*ZONE_ERRORS, TOKEN_OF_A_TERMINATED_INSTANCE):
            return False  # answers: nothing was started (the token's instance has ended)
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return True


def terminate(aws: Aws, instance_ids: tuple[str, ...]) -> None:
    if instance_ids:
        aws.ec2.terminate_instances(InstanceIds=list(instance_ids))
