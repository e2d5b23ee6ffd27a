"""The two SQS message kinds, as JSON under 1 KB each.

A request names an image already stored in the input bucket; a response carries
the label (or an error) for exactly one request id. File names are cut so that a
300-character Unicode name cannot push a message over the request queue's
1024-byte limit. A request sent again as a new message may carry one message
attribute, PriorReceives (see PRIOR_RECEIVES_ATTRIBUTE).

While a rollout runs old and new code side by side, each reads the other's
messages: a reader ignores fields it does not know and gives those it needs not
a default when they are missing; only the fields every version needs are required.
("v" is written for a reader that will need it; none reads it yet.)
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field

MAX_MESSAGE_BYTES = 1024
_FILENAME_BYTES = 160
_ERROR_BYTES = 200


# SQS takes in a body only #x9, #xA, #xD, #x20-#xD7FF, #xE000-#xFFFD and
# #x10000-#x10FFFF. json escapes control characters and refuses nothing else; the
# surrogates never reach it (_loads). These two it writes as they are: a request that
# names its file with one (sent escaped, which SQS takes) would get an answer SQS
# refuses, and its batch-mates' answers would fail with it.
_SQS_ESCAPES = {0xFFFE: "\\ufffe", 0xFFFF: "\\uffff"}


def _json_text(value: object) -> str:
    """`value` as JSON that SQS takes, UTF-8 as it is where SQS allows it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(_SQS_ESCAPES)


def _json_bytes(text: str) -> int:
    """The UTF-8 bytes `text` takes inside a message: a quote takes 2, a control
    character 6, and so do U+FFFE and U+FFFF (escaped for SQS)."""
    return len(_json_text(text).encode("utf-8")) - 2


def clip_for_json(text: str, limit: int) -> str:
    """`text` cut, without splitting a character, to take at most `limit` UTF-8
    bytes inside a JSON message (see _json_bytes)."""
    raw = text.encode("utf-8")
    if len(raw) > limit:
        text = raw[:limit].decode("utf-8", errors="ignore")
    while _json_bytes(text) > limit:
        text = text[:-1]  # rare: names full of quotes, backslashes or control characters
    return text


def _encode(payload: dict) -> str:
    body = _json_text(payload)
    size = len(body.encode("utf-8"))
    if size >= MAX_MESSAGE_BYTES:
        raise ValueError(f"message is {size} bytes, the limit is {MAX_MESSAGE_BYTES}")
    return body


class MessageError(ValueError):
    """A message body that is not one of ours."""


# What parsing a body that is not one of ours can raise. RecursionError: deeply
# nested JSON (1,000 "[" fit in a request message) exhausts json's recursion.
# ArithmeticError: float() of a 400-digit integer overflows (see finite_number).
_NOT_A_MESSAGE = (ValueError, KeyError, TypeError, RecursionError, ArithmeticError)


def _text_or_none(data: dict, key: str) -> str | None:
    """A text field that may be missing. A label of 123, taken as it is, would fail
    every download of its batch's CSV."""
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key} is not a string: {value!r:.40}")
    return value


def finite_number(value: object) -> float:
    """A finite number. JSON's integers have no bound: one of 400 digits in a request's
    sent_at raises OverflowError, which must be taken for a foreign message, or it fails
    the receive of the nine requests that came with it, over and over. NaN
    and Infinity load too, and are not numbers any client can read back."""
    number = float(value)  # type: ignore[arg-type]  # TypeError for what is not a number
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r:.40}")
    return number


def _loads(body: str):
    """The JSON of a message body, all of whose text UTF-8 can carry. An escaped lone
    surrogate ("\\ud800") loads as a str that no encoder takes: a request naming its key
    so would raise in the worker's S3 call and fail the nine good requests received with
    it, and one naming its file so would fail their replies."""
    data = json.loads(body)
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError, a ValueError
    return data


# The longest names a message may carry, in bytes as JSON carries them. The web tier's
# are far shorter (32-character ids, keys of at most 166); with these, the answer to
# any request fits in a message too. An answer echoing a 900-byte key would not, and
# would fail the replies of every request received with it.
MAX_ID_BYTES = 64
MAX_BUCKET_BYTES = 63  # S3's own limit
MAX_KEY_BYTES = 300
# What an id is made of: the web tier's are 32 hex digits.
_ID = re.compile(r"[A-Za-z0-9._:-]+")
# Characters that end or break a log line: the C0 and C1 controls, and the line and
# paragraph separators.
_LINE_BREAKING = frozenset(("Cc", "Zl", "Zp"))


def _name(data: dict, field_name: str, max_bytes: int) -> str:
    """A field that names something (an id, a bucket, a key): a string, not empty, of
    at most `max_bytes` in the message, with no character that breaks a log line.

    Turned into text with str(), a list id or an empty key made a request that
    S3 refused before sending it, over and over, and a dead letter that the web
    tier could never settle. The tiers log these names as they are: with a line
    feed in one, whoever may send to the queues could write lines of their own into
    the logs (the web tier's keys are made safe: common/names.py)."""
    value = data[field_name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field_name} must be a non-empty string, not {value!r:.40}")
    if _json_bytes(value) > max_bytes:
        raise ValueError(f"{field_name} is longer than {max_bytes} bytes")
    if any(unicodedata.category(char) in _LINE_BREAKING for char in value):
        raise ValueError(f"{field_name} holds a control character or a line break: {value!r:.80}")
    return value


def _id(data: dict) -> str:
    """A message's id: a name (_name) of letters, digits and '._:-' only."""
    value = _name(data, "id", MAX_ID_BYTES)
    if not _ID.fullmatch(value):
        raise ValueError(f"id is made of letters, digits and '._:-' only, not {value!r:.80}")
    return value


@dataclass(frozen=True)
class ClassifyRequest:
    id: str
    bucket: str
    key: str
    filename: str
    sent_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        payload = asdict(self)
        payload["filename"] = clip_for_json(self.filename, _FILENAME_BYTES)
        payload["v"] = 1
        return _encode(payload)

    @classmethod
    def from_json(cls, body: str) -> ClassifyRequest:
        try:
            data = _loads(body)
            if not isinstance(data["filename"], str):
                raise TypeError("filename must be a string")
            return cls(
                id=_id(data),
                bucket=_name(data, "bucket", MAX_BUCKET_BYTES),
                key=_name(data, "key", MAX_KEY_BYTES),
                filename=data["filename"],
                # Not required. Read only to tell a dead letter of a copy sent before its item was
                # queued again (web_tier/listeners.py); copies (a hand-back) keep the first's.
                sent_at=finite_number(data.get("sent_at", 0.0)),
            )
        except _NOT_A_MESSAGE as exc:
            raise MessageError(f"not a classify request: {exc}") from exc


# A message's MessageAttributes, as boto3 takes them: {name: {"DataType": ..., "StringValue": ...}}.
MessageAttributes = dict[str, dict[str, str]]

# A request sent again as a new message (a stopping worker's hand-back, a dead letter sent
# again from the web tier) has its receive count started afresh by SQS; this attribute
# carries the receives its earlier copies used, so that one that crashed a worker before
# is still known as such (app_tier/held.py reads it). It is the sender's word: anyone
# allowed to send to the queue may set it, and so have a request classified alone (as one
# seen before is), which costs only batching.
PRIOR_RECEIVES_ATTRIBUTE = "PriorReceives"


def prior_receives_attribute(receives: int) -> MessageAttributes:
    """The MessageAttributes of a request resent after `receives` earlier receives."""
    if receives <= 0:
        return {}
    return {PRIOR_RECEIVES_ATTRIBUTE: {"DataType": "Number", "StringValue": str(receives)}}


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


def wire_score(score: float) -> float:
    """A score as every answer carries it: float32 scores survive a JSON round trip
    exactly at 9 significant digits, and the same digits everywhere (the response, the
    output object, a batch rebuilt from S3) let clients compare scores across them."""
    return float(f"{score:.9g}")


@dataclass(frozen=True)
class ClassifyResponse:
    id: str
    filename: str
    key: str
    worker: str
    untrained: bool
    label: str | None = None
    score: float | None = None
    top5: tuple[Prediction, ...] = ()
    error: str | None = None
    finished_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        payload = {
            "v": 1,
            "id": self.id,
            "filename": clip_for_json(self.filename, _FILENAME_BYTES),
            "key": self.key,
            "worker": self.worker,
            "untrained": self.untrained,
            "finished_at": self.finished_at,
        }
        if self.error is not None:
            payload["error"] = clip_for_json(self.error, _ERROR_BYTES)
        else:
            payload["label"] = self.label
            # None: a result stored without its score (not by this service's workers), resent.
            payload["score"] = None if self.score is None else wire_score(self.score)
            payload["top5"] = [[p.label, wire_score(p.score)] for p in self.top5]
        return _encode(payload)

    @classmethod
    def from_json(cls, body: str) -> ClassifyResponse:
        try:
            data = _loads(body)
            return cls(
                id=_id(data),
                filename=str(data["filename"]),
                key=str(data.get("key", "")),
                worker=str(data.get("worker", "")),
                untrained=bool(data.get("untrained", False)),
                label=_text_or_none(data, "label"),
                score=None if data.get("score") is None else finite_number(data["score"]),
                top5=tuple(Prediction(str(lbl), finite_number(s)) for lbl, s in data.get("top5", [])),
                error=_text_or_none(data, "error"),
                finished_at=finite_number(data.get("finished_at", 0.0)),
            )._with_one_outcome()
        except _NOT_A_MESSAGE as exc:
            raise MessageError(f"not a classify response: {exc}") from exc

    def _with_one_outcome(self) -> ClassifyResponse:
        # Neither, the item was recorded done without a label; both, done with an error.
        if (self.label is None) == (self.error is None):
            raise ValueError("a response carries either a label or an error")
        return self
