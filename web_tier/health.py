"""GET /healthz: can this process reach its queues and buckets?"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from common.aws_errors import error_reason
from web_tier.refusals import Code
from web_tier.services import services

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    aws = services().aws
    # Short timeouts, no retries: an AWS that does not answer is a 503 within seconds.
    # The queues' URLs too, where this process has not looked them up yet.
    sqs, s3 = aws.probes["sqs"], aws.probes["s3"]
    checks = [
        ("request queue", lambda: sqs.get_queue_attributes(
            QueueUrl=aws.queue_url(aws.settings.request_queue, probe=True), AttributeNames=["QueueArn"])),
        ("response queue", lambda: sqs.get_queue_attributes(
            QueueUrl=aws.queue_url(aws.settings.response_queue, probe=True), AttributeNames=["QueueArn"])),
        ("input bucket", lambda: s3.head_bucket(Bucket=aws.settings.input_bucket)),
        ("output bucket", lambda: s3.head_bucket(Bucket=aws.settings.output_bucket)),
    ]
    for name, check in checks:
        try:
            check()
        except Exception as exc:
            log.warning("healthz: %s unreachable: %s", name, exc)
            return jsonify({"ok": False, "error": f"{name} unreachable: {error_reason(exc)}",
                            "code": Code.AWS_UNAVAILABLE}), 503
    return jsonify({"ok": True}), 200
