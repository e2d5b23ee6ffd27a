"""What an AWS call's failure means: whose fault it is, what it may be shown as, and
whether AWS may have done the work all the same."""

from __future__ import annotations

import threading

from botocore.client import BaseClient
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

# What a call to AWS raises when it fails, after botocore's retries: AWS's refusal
# (ClientError), or no answer at all (no credentials, a timeout, a lost connection:
# BotoCoreError).
AWS_ERRORS = (BotoCoreError, ClientError)


def error_code(exc: ClientError) -> str:
    """AWS's error code ("NoSuchKey", "Throttling"...), or "" if the answer had none."""
    return str(exc.response.get("Error", {}).get("Code") or "")


# AWS's answers that say it is busy, not that the caller is wrong.
THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "RequestThrottled", "SlowDown",
                              "RequestLimitExceeded", "TooManyRequestsException"})


def is_callers_fault(exc: BaseException) -> bool:
    """Whether a failed call is the caller's own doing, which no wait cures: a right,
    credentials or a resource it lacks (AWS refusing the request), or a fault in its
    process. Not so a throttle, AWS failing (5xx), a timeout or a lost connection: they
    pass."""
    if isinstance(exc, NoCredentialsError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 400
        return status < 500 and error_code(exc) not in THROTTLING_CODES
    return not isinstance(exc, BotoCoreError)


def is_outage(exc: BaseException) -> bool:
    """Whether a failed call is AWS failing or not answering (no connection, a timeout,
    a connection lost, a 5xx, a throttle), as in an outage, which fails every call
    alike. Not a refusal of the caller's, nor a fault in its process (a parameter
    botocore refuses, no region, credentials half set)."""
    if isinstance(exc, ClientError):
        return not is_callers_fault(exc)
    return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError))


# S3 saying an object (or its bucket) is not there: GetObject says NoSuchKey, HeadObject
# only its status, 404 (NotFound in some clients' words).
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


def is_not_found(exc: ClientError) -> bool:
    return error_code(exc) in NOT_FOUND_CODES


class _UntoldTries(threading.local):
    """This thread's count of tries, of the calls watch_untold_tries watches, that ended
    with no word of whether AWS did the work: no answer came (a read timeout, a
    connection lost once the request was out), or AWS failed (a 5xx). A call that then
    fails whole may still have been done by one of them: botocore raises only its last
    try's error."""

    count = 0


UNTOLD_TRIES = _UntoldTries()

# A try that failed so cannot have reached AWS: no connection was made.
_NEVER_SENT = (EndpointConnectionError, ConnectTimeoutError)


def _count_untold(response_dict: dict | None = None, exception: BaseException | None = None, **_) -> None:
    if exception is not None:
        if not isinstance(exception, _NEVER_SENT):
            UNTOLD_TRIES.count += 1
    elif response_dict is not None and response_dict.get("status_code", 0) >= 500:
        UNTOLD_TRIES.count += 1


def watch_untold_tries(client: BaseClient, operation: str) -> BaseClient:
    """Have each try of `operation` through `client` that leaves unknown whether AWS did
    it counted in UNTOLD_TRIES (in the calling thread: botocore tries in the caller's)."""
    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"response-received.{service}.{operation}", _count_untold,
                                unique_id=f"imgclass-untold-{service}-{operation}")
    return client


def error_reason(exc: BaseException) -> str:
    """A short reason for an AWS failure, fit to show an unauthenticated caller: AWS's
    error code or the kind of failure, never its message, which can name accounts,
    roles and ARNs (log the whole error where it is handled)."""
    if isinstance(exc, ClientError):
        return error_code(exc) or "ClientError"
    return type(exc).__name__
