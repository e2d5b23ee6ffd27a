"""Create the buckets and queues, idempotently: safe to run at every start.

Run it alone with `python -m common.provision` against whatever AWS the
environment points at.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import ClientError

from common import cli
from common.aws import Aws
from common.aws_errors import AWS_ERRORS, error_code
from common.backoff import next_wait
from common.config import RESPONSE_VISIBILITY_TIMEOUT_S, Settings
from common.logs import configure as configure_logging
from common.messages import MAX_MESSAGE_BYTES
from common.sqs import QUEUE_DELETED_RECENTLY_CODES, is_queue_not_there

log = logging.getLogger(__name__)

T = TypeVar("T")

# The contract's MaximumMessageSize: a request is a small pointer to S3, never an image.
REQUEST_QUEUE_MAX_BYTES = MAX_MESSAGE_BYTES


class ProvisionError(RuntimeError):
    """What is in the way of provisioning, said so that the reader can act on it."""


def _ensure_bucket(aws: Aws, name: str) -> None:
    try:
        aws.s3.head_bucket(Bucket=name)
    except ClientError:
        kwargs: dict = {"Bucket": name}
        if aws.settings.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": aws.settings.region}
        try:
            aws.s3.create_bucket(**kwargs)
            log.info("created bucket %s", name)
        except ClientError as exc:
            code = error_code(exc)
            if code == "BucketAlreadyExists":
                # Bucket names are global: the default prefix's are most likely taken.
                raise ProvisionError(f"bucket {name} belongs to another AWS account (bucket names "
                                     f"are global): set APP_PREFIX to a prefix of your own") from exc
            if code != "BucketAlreadyOwnedByYou":
                raise
    # Private and encrypted at rest, whatever the account's defaults are.
    aws.s3.put_public_access_block(
        Bucket=name,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    aws.s3.put_bucket_encryption(
        Bucket=name,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )


# The one lifecycle rule provisioning owns in each bucket; the bucket's other rules,
# an operator's own, are kept as they are.
RETENTION_RULE_ID = "imgclass-retention"


def _apply_retention(aws: Aws, name: str, days: int) -> None:
    """Expire the bucket's objects `days` after they were written (0: keep them)."""
    try:
        current = aws.s3.get_bucket_lifecycle_configuration(Bucket=name)
    except ClientError as exc:
        code = error_code(exc)
        if code == "AccessDenied" and not days:
            # A role made from the policy before RETENTION_DAYS: it never set a rule, and
            # keeping objects asks nothing of it, and a re-run for a queue setting must not fail.
            log.warning("bucket %s: cannot read its lifecycle rules (AccessDenied); leaving them as "
                        "they are (ami/iam-provision-policy.json has the rights now)", name)
            return
        if code == "AccessDenied":
            raise ProvisionError(f"RETENTION_DAYS={days} needs s3:GetLifecycleConfiguration and "
                                 f"s3:PutLifecycleConfiguration on {name} (ami/iam-provision-policy.json)"
                                 ) from exc
        if code != "NoSuchLifecycleConfiguration":
            raise
        current = {}
    rules = current.get("Rules", [])
    others = [rule for rule in rules if rule.get("ID") != RETENTION_RULE_ID]
    # Days in our rule as it was, if there was one.
    was = next((rule.get("Expiration", {}).get("Days") for rule in rules if rule not in others), None)
    # Put back as it was: left out, S3 would reset this bucket-wide setting to its default.
    kept = {key: current[key] for key in ("TransitionDefaultMinimumObjectSize",) if key in current}
    if days:
        ours = {"ID": RETENTION_RULE_ID, "Status": "Enabled", "Filter": {"Prefix": ""},
                "Expiration": {"Days": days},
                # Uploads are single PUTs; a multipart one cut off would be billed for ever.
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}
        aws.s3.put_bucket_lifecycle_configuration(
            Bucket=name, LifecycleConfiguration={"Rules": [*others, ours]}, **kept)
        if was is not None and was != days:
            log.warning("bucket %s: objects expire %d days after they are written, no longer %d "
                        "(RETENTION_DAYS)", name, days, was)
        else:
            log.info("bucket %s: objects expire %d days after they are written", name, days)
    elif len(others) < len(rules):  # ours was there: removed, the others kept
        if others:
            aws.s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": others},
                                                      **kept)
        else:
            aws.s3.delete_bucket_lifecycle(Bucket=name)
        log.warning("bucket %s: objects are now kept for ever, no longer expired%s (RETENTION_DAYS "
                    "is 0 or unset)", name, f" after {was} days" if was is not None else "")


# Every queue is encrypted at rest with SQS's own keys (SSE-SQS): new queues are by
# default now, but not those made before that default, or by other tools.
ENCRYPTED_QUEUE = {"SqsManagedSseEnabled": "true"}


# AWS's CreateQueue reference: "After you create a queue, you must wait at least one
# second after the queue is created to be able to use the queue". Until then SQS may not
# know it, so what uses a queue (its attributes read or set, a redrive policy naming it)
# is tried again while SQS says it is not there, this long at most: a new queue's
# second and a margin, not long enough to keep a queue really missing waiting.
QUEUE_SETTLE_S = 5.0
SETTLE_FIRST_WAIT_S = 0.25
SETTLE_MAX_WAIT_S = 1.0
# Tests put a clock of their own here, and its sleep.
clock = time.monotonic
sleep = time.sleep


def _once_there(what: str, call: Callable[[], T]) -> T:
    """`call()`, tried again for up to QUEUE_SETTLE_S while SQS says a queue it uses is
    not there (is_queue_not_there): one just created, here or by a run beside this one.
    No wait where SQS knows its queues at once, as the embedded AWS does."""
    deadline = clock() + QUEUE_SETTLE_S
    wait = 0.0
    while True:
        try:
            return call()
        except ClientError as exc:
            code = error_code(exc)
            if not is_queue_not_there(code, str(exc.response.get("Error", {}).get("Message") or "")):
                raise
            wait = next_wait(wait, SETTLE_FIRST_WAIT_S, SETTLE_MAX_WAIT_S)
            if clock() + wait > deadline:
                raise
            log.info("%s: SQS does not know a queue it uses yet (%s); trying again in %.2f s",
                     what, code, wait)
            sleep(wait)


def _ensure_queue(aws: Aws, name: str, attributes: dict[str, str]) -> str:
    return _once_there(f"queue {name}", lambda: _make_or_update_queue(aws, name, attributes))


def _make_or_update_queue(aws: Aws, name: str, attributes: dict[str, str]) -> str:
    # CreateQueue refuses an existing queue whose attributes differ (QueueAlreadyExists),
    # so a changed setting (VISIBILITY_TIMEOUT, say) is applied to the queue that exists.
    attributes = {**attributes, **ENCRYPTED_QUEUE}
    try:
        url = aws.sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except aws.sqs.exceptions.QueueDoesNotExist:
        try:
            return aws.sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        except ClientError as exc:
            if error_code(exc) in QUEUE_DELETED_RECENTLY_CODES:
                # No retry: SQS makes the name again only a minute after the delete.
                raise ProvisionError(f"queue {name} was deleted less than 60 s ago (QueueDeletedRecently), "
                                     f"and SQS makes no queue of that name until then: wait 60 s after "
                                     f"deleting a queue before provisioning again") from exc
            raise
    current = aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(attributes))["Attributes"]
    # Said, not done silently: a re-run from a shell without the controller's settings
    # puts a MAX_RECEIVE_COUNT of 5 back to 3, the workers still told 5.
    for key, value in attributes.items():
        if key in current and _comparable(current[key]) != _comparable(value):
            log.warning("queue %s: %s changed from %s to %s", name, key, current[key], value)
    aws.sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url


def _comparable(value: str) -> object:
    """An attribute's value, a JSON policy's key order and number types aside."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return {k: str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else str(parsed)


def provision(settings: Settings, aws: Aws | None = None) -> dict[str, str]:
    """Make sure every bucket and queue exists with the right settings."""
    aws = aws or Aws(settings)
    for bucket in (settings.input_bucket, settings.output_bucket):
        _ensure_bucket(aws, bucket)
        _apply_retention(aws, bucket, settings.retention_days)

    dlq_url = _ensure_queue(aws, settings.dead_letter_queue, {"MessageRetentionPeriod": "1209600"})
    dlq_arn = _once_there(f"queue {settings.dead_letter_queue}", lambda: aws.sqs.get_queue_attributes(
        QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"])
    req_url = _ensure_queue(
        aws,
        settings.request_queue,
        {
            "MaximumMessageSize": str(REQUEST_QUEUE_MAX_BYTES),
            "VisibilityTimeout": str(settings.visibility_timeout_s),
            "ReceiveMessageWaitTimeSeconds": str(settings.receive_wait_s),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(settings.max_receive_count)}
            ),
        },
    )
    resp_url = _ensure_queue(aws, settings.response_queue,
                             {"VisibilityTimeout": str(RESPONSE_VISIBILITY_TIMEOUT_S)})
    log.info("provisioned %s, %s and three queues", settings.input_bucket, settings.output_bucket)
    return {"request": req_url, "response": resp_url, "dead_letter": dlq_url}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Arguments are refused, not ignored: `--help` made buckets and queues.
    parser = cli.ArgumentParser(
        prog="python -m common.provision",
        description="Create (or bring up to date) the service's two buckets and three queues, in "
        "the AWS the environment points at (the default credential chain; AWS_ENDPOINT_URL for "
        "the embedded AWS). Safe to run again: what exists is kept, and the queues take the "
        "current settings. Names from APP_PREFIX, region from AWS_REGION; the request queue's "
        "VISIBILITY_TIMEOUT, RECEIVE_WAIT and MAX_RECEIVE_COUNT, and the buckets' "
        "RETENTION_DAYS, from the environment too. "
        "Prints the queues' URLs as JSON.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    configure_logging("%(asctime)s %(name)s %(message)s")
    try:
        urls = provision(Settings.from_env())
    except (ValueError, ProvisionError) as exc:
        print(f"python -m common.provision: {exc}", file=sys.stderr)
        return 2
    except AWS_ERRORS as exc:  # no credentials, a region AWS does not know...
        print(f"python -m common.provision: AWS refused or could not be reached: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(urls, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
