"""How an input object is marked failed, so that a batch rebuilt from S3 shows why.

The worker marks an image the model could not take; the web tier marks one whose
request went to the dead-letter queue, and reads the marks back when it rebuilds a
batch. Both write through here, so both write what S3 accepts. So is the mark that
replaces a failure's when the web tier sends the request again, which says how often.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, NamedTuple

from botocore.exceptions import ClientError, ParamValidationError

from common.aws_errors import error_code, is_not_found
from common.config import MARK_DENIED_RETRY_S

log = logging.getLogger(__name__)

# S3 tag values: up to 256 Unicode letters, numbers, spaces and `_ . : / = + - @`,
# counted in UTF-16: a character beyond U+FFFF takes two. One character outside that
# set makes the whole tagging call fail. Those beyond U+FFFF are made spaces in `error`
# (as the characters outside the set are), and escaped in `reason`, so that a tag's
# length in Python characters is S3's.
MAX_ERROR_CHARS = 250
MAX_TAG_CHARS = 256
_BEYOND_BMP = "\U00010000-\U0010ffff"
_OUTSIDE_TAG_SET = re.compile(rf"(?:[^\w.:/=+\-@]|[{_BEYOND_BMP}])+")  # spaces too: runs become one space
# `reason` holds the reason whole, as far as it fits: every character outside the set,
# and "=" itself, as =XX per UTF-8 byte (as quoted-printable does). `error` is for a
# person reading the tags, and for marks written before `reason` was.
_ESCAPED = re.compile(rf"[^\w.:/+\-@ ]|[{_BEYOND_BMP}]")
_ESCAPES = re.compile(r"(?:=[0-9A-F]{2})+")


# Why a request whose every attempt ended unanswered failed: the web tier marks a dead
# letter with it, and a worker a request whose earlier copies (resent by a stopping
# worker, which SQS counts afresh) used up the attempts allowed.
# In the characters a tag value takes, so that a batch rebuilt from S3 shows it the same.
# Not "it failed each time": a worker killed while it held an image it had not begun
# (scale-in, a crash on another image) counts too.
DEAD_LETTER_ERROR = ("could not be processed: no worker answered for it in the attempts allowed - each "
                     "worker holding it crashed or stalled or was stopped. Send it again and check "
                     "the image if it fails again")


# What replaces a failure mark when the web tier sends its request again (web_tier/
# storage.py clear_failed): a mark of no failure, so a batch rebuilt from S3 shows it
# queued. Not an empty tag set, which S3 takes but moto (the embedded AWS) refuses.
# Its `status` is what readers written before it held the count and time look at.
SENT_AGAIN_STATUS = "sent-again"
SENT_AGAIN_COUNT_TAG = "sent-again"
REQUEUED_AT_TAG = "requeued-at"


class SentAgain(NamedTuple):
    """How many times the web tier queued an item again after a dead letter, and when
    the latest was (time.time(); 0.0 if never): a restarted web tier shows the count, and
    still tells a dead letter of a copy sent before then (web_tier/listeners.py)."""

    count: int = 0
    at: float = 0.0


NEVER_SENT_AGAIN = SentAgain()


def sent_again_tagging(sent: SentAgain) -> dict[str, list[dict[str, str]]]:
    """The `Tagging` argument of put_object_tagging that marks an input sent again."""
    return {"TagSet": [{"Key": "status", "Value": SENT_AGAIN_STATUS}, *_sent_again_tags(sent)]}


def _sent_again_tags(sent: SentAgain) -> list[dict[str, str]]:
    # repr: the time exactly, as the request sent again carries it (JSON keeps a float's
    # repr). Rounded up, that request's own dead letter read as an older copy's, ignored.
    return [{"Key": SENT_AGAIN_COUNT_TAG, "Value": str(sent.count)},
            {"Key": REQUEUED_AT_TAG, "Value": repr(sent.at)}]


def sent_again_from_tags(tag_set: list[dict[str, str]]) -> SentAgain:
    """What a sent-again mark says, or a dead letter's failure mark written after one
    (which carries it on); SentAgain() for tags that hold none (no tags, a worker's
    failure mark, a mark written before marks held these) or an unreadable value."""
    found = {tag["Key"]: tag["Value"] for tag in tag_set}
    try:
        count = max(0, int(found.get(SENT_AGAIN_COUNT_TAG, "0")))
        at = float(found.get(REQUEUED_AT_TAG, "0"))
    except ValueError:
        return SentAgain()
    return SentAgain(count, at if math.isfinite(at) and at > 0 else 0.0)


# S3's refusals of a failure mark that no retry changes (the mark is then only missed
# by a batch rebuilt after a restart): a tag it will not take.
TAGGING_REFUSALS = frozenset({"InvalidTag", "MalformedXML", "InvalidArgument"})
# Not among them: AccessDenied. A role or policy just attached takes a while to reach
# every AWS endpoint, and refuses meanwhile: mark_failed raises MarkDenied, and each
# caller tries again until give_up_denied_mark says to stop.
DENIED_CODES = frozenset({"AccessDenied"})


class MarkDenied(Exception):
    """S3 refused a failure mark with AccessDenied: the role lacks s3:PutObjectTagging on
    the input bucket, or was given it too recently to have it everywhere yet. The
    caller decides how long that may last before it gives the mark up."""

    def __init__(self, bucket: str, key: str, exc: ClientError) -> None:
        super().__init__(f"S3 denied tagging {key}: this role needs s3:PutObjectTagging on "
                         f"arn:aws:s3:::{bucket}/* ({exc})")


def mark_failed(s3: Any, bucket: str, key: str, reason: str, worker: str = "",
                sent: SentAgain = NEVER_SENT_AGAIN) -> str | None:
    """Mark the input object failed (see failure_tagging); None once marked, else why it
    will never be: the object is gone, or S3 refuses this mark whatever the retries.
    Raises MarkDenied for AccessDenied, and what trying again may mend (S3 failing or
    throttling), for the caller to retry."""
    try:
        s3.put_object_tagging(Bucket=bucket, Key=key, Tagging=failure_tagging(reason, worker, sent))
    except ClientError as exc:
        if is_not_found(exc) or error_code(exc) in TAGGING_REFUSALS:
            return str(exc)
        if error_code(exc) in DENIED_CODES:
            raise MarkDenied(bucket, key, exc) from exc
        raise
    except ParamValidationError as exc:  # botocore's refusal, not an outage
        return str(exc)
    return None


def give_up_denied_mark(item_id: str, exc: MarkDenied, first_received_s: float | None, now_s: float, *,
                        attempt: int | None = None, last_attempt: bool = False) -> bool:
    """Whether a failure mark S3 denied (MarkDenied) is given up now, rather than tried
    again; if so, logs an error naming the right the role lacks (exc says it).

    Given up MARK_DENIED_RETRY_S after `first_received_s`, the first receive of the
    message that asks for the mark (seconds since the epoch, SQS's clock, as `now_s`
    must be); at once if that is unknown (None), as nothing else would end the retries;
    and at the request's `last_attempt` (a worker's: one more release would send it to
    the dead-letter queue, the reason lost with it). `attempt` is only for the log."""
    long_enough = first_received_s is None or now_s - first_received_s >= MARK_DENIED_RETRY_S
    if not (long_enough or last_attempt):
        return False
    at = f" at attempt {attempt}," if attempt is not None else ""
    log.error("item %s: gave up marking its input failed, still denied%s %s: %s. A batch rebuilt from S3 "
              "after a web-tier restart will show it queued", item_id, at,
              _since_first_receive(first_received_s, now_s), exc)
    return True


def _since_first_receive(first_received_s: float | None, now_s: float) -> str:
    if first_received_s is None:
        return "(the message's first receive unknown)"
    return f"{(now_s - first_received_s) / 60:.0f} min after its message was first received"


def failure_tagging(reason: str, worker: str = "",
                    sent: SentAgain = NEVER_SENT_AGAIN) -> dict[str, list[dict[str, str]]]:
    """The `Tagging` argument of put_object_tagging that marks an input failed, by
    `worker` (the instance that refused it; none for a dead letter), after it was
    `sent` again (a dead letter's: the mark replaces the sent-again mark, whose count a
    batch rebuilt from S3 would lose)."""
    error = _OUTSIDE_TAG_SET.sub(" ", reason).strip()[:MAX_ERROR_CHARS]
    tags = [{"Key": "status", "Value": "failed"}, {"Key": "error", "Value": error},
            {"Key": "reason", "Value": _escape(reason)}]
    if worker:
        tags.append({"Key": "worker", "Value": _escape(worker)})
    if sent.count:
        tags.extend(_sent_again_tags(sent))
    return {"TagSet": tags}


def failure_from_tags(tag_set: list[dict[str, str]]) -> str | None:
    """The error a failure mark holds, or None if these tags do not mark a failure."""
    found = _failure_mark(tag_set)
    if not found:
        return None
    if found.get("reason"):
        return _unescape(found["reason"])
    return found.get("error") or "failed"


def failed_by(tag_set: list[dict[str, str]]) -> str:
    """The worker a failure mark names, or "" (a dead letter, or a mark written before
    marks named one)."""
    return _unescape(_failure_mark(tag_set).get("worker", ""))


def _failure_mark(tag_set: list[dict[str, str]]) -> dict[str, str]:
    """The tags by key if they mark a failure, else none."""
    found = {tag["Key"]: tag["Value"] for tag in tag_set}
    return found if found.get("status") == "failed" else {}


def _unescape(value: str) -> str:
    return _ESCAPES.sub(lambda m: bytes.fromhex(m[0].replace("=", "")).decode(errors="replace"), value)


def _escape(reason: str) -> str:
    """`reason` in the tag set, reversibly, cut (between characters) to fit a tag."""
    pieces, used = [], 0
    for char in reason:
        piece = "".join(f"={byte:02X}" for byte in char.encode()) if _ESCAPED.match(char) else char
        if used + len(piece) > MAX_TAG_CHARS:
            break
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces)
