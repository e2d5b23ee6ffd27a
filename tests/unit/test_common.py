"""Shared pieces: names, the message format, configuration, provisioning."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import unicodedata
import zlib
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    ReadTimeoutError,
)
from moto import mock_aws

from common.aws import USER_AGENT, Aws, QueueDepth
from common.aws_errors import is_callers_fault, is_outage
from common.config import MARK_DENIED_RETRY_S, Settings
from common.failure_tags import (
    DEAD_LETTER_ERROR,
    MAX_ERROR_CHARS,
    MarkDenied,
    SentAgain,
    failed_by,
    failure_from_tags,
    failure_tagging,
    give_up_denied_mark,
    sent_again_from_tags,
    sent_again_tagging,
)
from common.messages import (
    MAX_ID_BYTES,
    MAX_KEY_BYTES,
    ClassifyRequest,
    ClassifyResponse,
    MessageError,
    Prediction,
)
from common.names import instance_name, instance_number, object_key, safe_filename, stem
from common.output_object import label_of, pair_text, read_result_metadata, result_metadata
from common.provision import ProvisionError, provision
from common.provision import main as provision_main
from common.sqs import VisibilityFailure, change_visibility
from tests.conftest import silent_endpoint, without_credentials


@pytest.mark.parametrize("original, safe", [
    ("cat.jpg", "cat.jpg"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system32.png", "system32.png"),
    ("<script>alert(1)</script>.png", "script_.png"),
    ("Café déjà vu.JPEG", "Cafe_deja_vu.JPEG"),
    ("..", "image"),
    (".hidden.png", "hidden.png"),
    ("猫.jpg", "image.jpg"),
    ("Ω.JPEG", "image.JPEG"),
    ("猫", "image"),
    (".png", "image.png"),
    ("a,b\nc.jpg", "a_b_c.jpg"),
])
def test_safe_filename(original, safe):
    assert safe_filename(original) == safe


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_client_makes_as_many_attempts_as_it_is_given(attempts):
    """The health checks' clients must give up after one attempt, within a load
    balancer's 5 s; botocore's max_attempts counts retries only, and they made two."""
    from common.aws import client_config

    with silent_endpoint() as (url, accepted):
        settings = dataclasses.replace(Settings(), endpoint_url=url)
        config = client_config(1, read_timeout=0.3, connect_timeout=0.3, attempts=attempts)
        with pytest.raises(Exception, match="Read timeout"):
            Aws(settings)._kept("s3", "s3", config).head_bucket(Bucket="b")
        assert len(accepted) == attempts
    probe = Aws(settings).probes["sqs"].meta.config
    assert probe.retries["total_max_attempts"] == 1


def test_long_polls_wait_out_a_stall_that_other_calls_give_up_on():
    """A receive given up on after 30 s would still take messages when SQS (or moto)
    comes back, hidden for the lease with nobody to extend them: 10 requests waiting 30 s
    more. The other calls keep the usual read timeout (the heartbeat's slack)."""
    from common.aws import LONG_POLL_READ_SLACK_S

    aws = Aws(dataclasses.replace(Settings(), receive_wait_s=20)).open("sqs", "sqs_receive")
    assert aws.sqs_receive.meta.config.read_timeout == 20 + LONG_POLL_READ_SLACK_S >= 60
    assert aws.sqs.meta.config.read_timeout == 30.0
    assert aws.sqs_receive is aws.sqs_receive and aws.sqs_receive is not aws.sqs


def _answered(code: str, status: int) -> ClientError:
    answer = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(answer, "ReceiveMessage")


@pytest.mark.parametrize("exc, callers", [
    (_answered("AccessDenied", 403), True),  # a right it lacks: no wait cures it
    (_answered("AWS.SimpleQueueService.NonExistentQueue", 400), True),
    (NoCredentialsError(), True),
    (RuntimeError("a bug"), True),
    (_answered("ThrottlingException", 400), False),  # AWS busy: it passes
    (_answered("SlowDown", 503), False),
    (_answered("InternalError", 500), False),
    (EndpointConnectionError(endpoint_url="https://aws.test"), False),
    (ReadTimeoutError(endpoint_url="https://aws.test"), False),
])
def test_a_failed_call_is_the_callers_fault_only_where_no_wait_cures_it(exc, callers):
    assert is_callers_fault(exc) is callers


@pytest.mark.parametrize("exc, outage", [
    (_answered("SlowDown", 503), True),
    (_answered("ThrottlingException", 400), True),
    (EndpointConnectionError(endpoint_url="https://aws.test"), True),
    (ReadTimeoutError(endpoint_url="https://aws.test"), True),
    (ConnectionClosedError(endpoint_url="https://aws.test"), True),
    (_answered("AccessDenied", 403), False),
    (NoCredentialsError(), False),
    (ParamValidationError(report="Key: too long"), False),  # a fault in the code
    (NoRegionError(), False),
    (RuntimeError("a bug"), False),
])
def test_an_outage_is_aws_failing_or_not_answering_not_a_refusal_or_a_fault(exc, outage):
    """What the web tier logs in one line rather than with a traceback (submit.py)."""
    assert is_outage(exc) is outage


def test_safe_filename_keeps_extension_of_long_names():
    name = safe_filename("x" * 300 + ".jpeg")
    assert len(name) == 100 and name.endswith(".jpeg")
    # Up to 10 characters is an extension; more is part of the name, cut with it.
    assert safe_filename("x" * 300 + "." + "e" * 10).endswith("x." + "e" * 10)
    assert safe_filename("x" * 300 + "." + "e" * 11) == "x" * 100


def test_object_key_has_no_path_tricks():
    key = object_key("b" * 32, "i" * 32, "../../../etc/passwd")
    assert key == f"{'b' * 32}/{'i' * 32}/passwd"


def test_names():
    assert instance_name(7) == "app-tier-instance-7"
    assert instance_number("app-tier-instance-12") == 12
    assert instance_number("web-instance") is None
    assert instance_number("app-tier-instance-x") is None
    assert instance_number("app-tier-instance-²") is None  # a digit to isdigit, not to int()
    assert instance_number("app-tier-instance-١") is None  # Arabic-Indic one: not our naming
    assert stem("test_00.JPEG") == "test_00" and stem("noext") == "noext" and stem(".rc") == ".rc"


@pytest.mark.parametrize(("sent", "answered"), [
    ("a.b.JPEG", "a.b"), ("..", ".."), ("...", "..."), ("a..jpg", "a."),
    # A path (programs may send one): only its last part can have an extension.
    ("../../etc/passwd", "../../etc/passwd"), ("photos.v2/cat", "photos.v2/cat"),
    ("photos.v2/cat.jpg", "photos.v2/cat"), ("dir.d\\x", "dir.d\\x"), ("dir/.rc", "dir/.rc"),
])
def test_stem_strips_only_the_file_names_own_extension(sent, answered):
    assert stem(sent) == answered


def test_messages_stay_under_1kb_even_with_hostile_names():
    request = ClassifyRequest(id="a" * 64, bucket="b" * 63, key="k" * 300, filename="猫" * 300)
    assert len(request.to_json().encode()) < 1024
    back = ClassifyRequest.from_json(request.to_json())
    assert back.id == request.id and back.filename.startswith("猫")
    top5 = tuple(Prediction("x" * 40, 0.1) for _ in range(5))
    response = ClassifyResponse(id="a" * 64, filename="名" * 300, key="k" * 300, worker="i-" + "0" * 17,
                                untrained=True, label="x" * 40, score=0.123456789, top5=top5)
    assert len(response.to_json().encode()) < 1024
    assert ClassifyResponse.from_json(response.to_json()).score == pytest.approx(0.123456789, abs=1e-9)


@pytest.mark.parametrize(("field", "longest"), [("id", 64), ("bucket", 63), ("key", 300)])
def test_requests_whose_names_an_answer_could_not_carry_are_refused(field, longest):
    fields = {"id": "a" * 32, "bucket": "b" * 20, "key": "k" * 166, "filename": "f.jpg"}
    longest_name = "a" * longest if field == "id" else "é" * (longest // 2)  # an id is ASCII
    assert ClassifyRequest.from_json(ClassifyRequest(**{**fields, field: longest_name}).to_json())
    body = ClassifyRequest(**{**fields, field: "\n" * (longest // 2 + 1)}).to_json()
    with pytest.raises(MessageError, match=f"{field} is longer than {longest} bytes"):
        ClassifyRequest.from_json(body)


@pytest.mark.parametrize("field", ["id", "bucket", "key"])
@pytest.mark.parametrize("breaking", ["\n", "\r", "\x1b", "\x85", "\u2028", "\u2029", "\x00"])
def test_names_that_would_break_a_log_line_are_refused(field, breaking):
    """The tiers log ids and keys as they are: whoever may send to the queues could
    otherwise write lines of their own into the logs."""
    fields = {"id": "a" * 32, "bucket": "b" * 20, "key": "batch/item/cat.jpg", "filename": "f\n.jpg"}
    assert ClassifyRequest.from_json(ClassifyRequest(**fields).to_json()).filename == "f\n.jpg"
    forged = ClassifyRequest(**{**fields, field: f"{fields[field]}{breaking}2026-12-06 ERROR forged"})
    with pytest.raises(MessageError, match=f"{field} holds a control character or a line break"):
        ClassifyRequest.from_json(forged.to_json())
    if field == "id":
        answer = ClassifyResponse(id=forged.id, filename="f.jpg", key="k", worker="w", untrained=True,
                                  error="bad")
        with pytest.raises(MessageError, match="id holds a control character"):
            ClassifyResponse.from_json(answer.to_json())


@pytest.mark.parametrize("made_up", ["a b", "é" * 4, "../x", "a/b", "<script>"])
def test_ids_are_letters_digits_and_four_marks(made_up):
    """An item id is 32 hex digits from the web tier; a request with another is not one."""
    fields = {"bucket": "b", "key": "k", "filename": "f.jpg"}
    assert ClassifyRequest.from_json(ClassifyRequest(id="A-z_0.9:", **fields).to_json()).id == "A-z_0.9:"
    with pytest.raises(MessageError, match="id is made of letters, digits and '._:-' only"):
        ClassifyRequest.from_json(ClassifyRequest(id=made_up, **fields).to_json())


@pytest.mark.parametrize("name", ["\x01" * 200 + ".jpg", '"' * 300 + ".jpg", "\\" * 300, "é\x1f" * 150])
def test_names_that_json_escapes_still_fit_in_a_message(name):
    """Quotes take 2 bytes in JSON and control characters 6: the cut must count them."""
    request = ClassifyRequest(id="a" * 32, bucket="b" * 63, key="k" * 166, filename=name)
    back = ClassifyRequest.from_json(request.to_json())
    assert name.startswith(back.filename) and len(back.filename) >= 26
    response = ClassifyResponse(id="a" * 32, filename=name, key="k" * 166, worker="i-" + "0" * 17,
                                untrained=True, label="x" * 40, score=0.5,
                                top5=tuple(Prediction("x" * 40, 0.1) for _ in range(5)))
    assert name.startswith(ClassifyResponse.from_json(response.to_json()).filename)


def _in_s3_tag_set(char: str) -> bool:
    # S3's rule for tag values: Unicode letters, numbers and spaces, and _ . : / = + - @
    return unicodedata.category(char)[0] in "LNZ" or char in "_.:/=+-@"


@pytest.mark.parametrize("reason, kept", [
    ("image is 10000x10000 pixels, more than the limit of 178956970",
     "image is 10000x10000 pixels more than the limit of 178956970"),
    ("cannot identify <script>alert('x')</script>\nin 'é.jpg'",
     "cannot identify script alert x /script in é.jpg"),
    ("タイムアウト: 30 s", "タイムアウト: 30 s"),
    ("x" * 400, "x" * MAX_ERROR_CHARS),
    ("%%%", ""),
    # Letters beyond U+FFFF (mathematical, CJK extension B): two of S3's 256 each.
    ("\U0001d400\U00020000 " * 100, ""),
])
def test_a_failure_mark_holds_only_what_s3_takes_in_a_tag(reason, kept):
    tag_set = failure_tagging(reason)["TagSet"]
    error = {tag["Key"]: tag["Value"] for tag in tag_set}["error"]
    assert error == kept
    for tag in tag_set:
        # S3 counts a tag's characters in UTF-16 (its "Managing object tags" page).
        utf16_units = len(tag["Value"].encode("utf-16-le")) // 2
        assert utf16_units <= 256 and all(_in_s3_tag_set(c) for c in tag["Value"]), tag
    # As written before the `reason` tag was: its `error` is what reads back.
    old = [tag for tag in tag_set if tag["Key"] != "reason"]
    assert failure_from_tags(old) == (kept or "failed")


@pytest.mark.parametrize("reason", [
    "cannot decode: image file is truncated (cut short)",
    "MODEL_WEIGHTS=random =41 \"quoted\"\nnext line\ttab",
    "タイムアウト: 30 s 😀 e\u0301",
    "\U0001d400 \U00020000",
    "",
])
def test_a_failure_mark_reads_back_the_reason_as_it_was(reason):
    """Rebuilt after a restart, "…(cut short)" must not read "…cut short"."""
    assert failure_from_tags(failure_tagging(reason)["TagSet"]) == (reason or "failed")


def test_a_reason_too_long_for_a_tag_reads_back_cut_between_characters():
    reason = "(é) " * 100
    back = failure_from_tags(failure_tagging(reason)["TagSet"])
    assert reason.startswith(back) and len(back) > 40 and "\ufffd" not in back


@pytest.mark.parametrize("worker", ["i-0123456789abcdef0", "worker 7 (é, <x>)", ""])
def test_a_failure_mark_names_the_worker_that_wrote_it(worker):
    tag_set = failure_tagging("cannot decode", worker)["TagSet"]
    assert failed_by(tag_set) == worker
    for tag in tag_set:
        assert len(tag["Value"]) <= 256 and all(_in_s3_tag_set(c) for c in tag["Value"]), tag
    assert failure_from_tags(tag_set) == "cannot decode"


@pytest.mark.parametrize("sent", [SentAgain(1, 1767225600.1234567), SentAgain(12, 1767225600.0),
                                  SentAgain(3, 1767225600.0009999)])
def test_a_sent_again_mark_reads_back_its_count_and_its_time_exactly(sent):
    """Exactly: the request sent again carries the same time (sent_at), and one read
    back later than it made that request's own dead letter an older copy's, ignored."""
    tag_set = sent_again_tagging(sent)["TagSet"]
    assert sent_again_from_tags(tag_set) == sent
    assert {"Key": "status", "Value": "sent-again"} in tag_set  # all that older readers look at
    assert failure_from_tags(tag_set) is None
    for tag in tag_set:
        assert len(tag["Value"]) <= 256 and all(_in_s3_tag_set(c) for c in tag["Value"]), tag


def test_a_dead_letters_failure_mark_carries_on_how_often_it_was_sent_again():
    sent = SentAgain(2, 1767225600.5)
    tag_set = failure_tagging(DEAD_LETTER_ERROR, sent=sent)["TagSet"]
    assert failure_from_tags(tag_set) == DEAD_LETTER_ERROR
    assert sent_again_from_tags(tag_set) == sent
    assert len(tag_set) <= 10  # S3's limit an object
    # Never sent again: the mark as it was.
    never = failure_tagging(DEAD_LETTER_ERROR)["TagSet"]
    assert [tag["Key"] for tag in never] == ["status", "error", "reason"]


@pytest.mark.parametrize("tag_set, sent", [
    ([], SentAgain()),
    ([{"Key": "status", "Value": "sent-again"}], SentAgain()),  # written before it held the count
    (failure_tagging("cannot decode", "w1")["TagSet"], SentAgain()),
    ([{"Key": "sent-again", "Value": "twice"}, {"Key": "requeued-at", "Value": "1767225600.5"}], SentAgain()),
    ([{"Key": "sent-again", "Value": "2"}, {"Key": "requeued-at", "Value": "nan"}], SentAgain(2, 0.0)),
])
def test_tags_say_an_item_was_sent_again_only_as_far_as_they_can_be_read(tag_set, sent):
    assert sent_again_from_tags(tag_set) == sent


def test_tags_without_a_failure_mark_say_nothing():
    assert failure_from_tags([]) is None
    assert failed_by([{"Key": "status", "Value": "ok"}, {"Key": "worker", "Value": "w"}]) == ""
    assert failure_from_tags([{"Key": "status", "Value": "ok"}, {"Key": "error", "Value": "x"}]) is None


FIRST = 1_700_000_000.0  # a first receive, seconds since the epoch


@pytest.mark.parametrize("first_received, now, last_attempt, given_up", [
    (FIRST, FIRST, False, False),  # just denied: IAM may not have reached every endpoint
    (FIRST, FIRST + MARK_DENIED_RETRY_S - 1, False, False),
    (FIRST, FIRST + MARK_DENIED_RETRY_S, False, True),  # the bound reached
    (FIRST, FIRST + 10 * MARK_DENIED_RETRY_S, False, True),
    (FIRST, FIRST - 60, False, False),  # this host's clock behind SQS's: not yet
    (FIRST, FIRST, True, True),  # a worker's last attempt: released, it would be a dead letter
    (None, FIRST, False, True),  # no first receive: nothing else would end the retries
    (None, FIRST, True, True),
])
def test_when_a_denied_failure_mark_is_given_up(caplog, first_received, now, last_attempt, given_up):
    """The one policy both tiers follow; giving up is an error log naming the right the role lacks."""
    denied = MarkDenied("in-bucket", "b/k.jpg", ClientError({"Error": {"Code": "AccessDenied"}},
                                                            "PutObjectTagging"))
    with caplog.at_level(logging.ERROR):
        verdict = give_up_denied_mark("item-1", denied, first_received, now,
                                      attempt=2, last_attempt=last_attempt)
    assert verdict is given_up
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == given_up
    for message in logged:
        assert message.startswith("item item-1: gave up marking its input failed, still denied at attempt 2,")
        assert "s3:PutObjectTagging on arn:aws:s3:::in-bucket/*" in message


@pytest.mark.parametrize("filename, text", [
    ("test_00.JPEG", "test_00.JPEG,cat"),
    ("a, b.jpg", '"a, b.jpg",cat'),
    ('say "cheese".png', '"say ""cheese"".png",cat'),
    ("line\nbreak.jpg", '"line\nbreak.jpg",cat'),
    ("猫.jpg", "猫.jpg,cat"),
])
def test_the_output_pair_is_one_csv_record_and_its_label_reads_back(filename, text):
    assert pair_text(filename, "cat") == text
    assert next(csv.reader(io.StringIO(text))) == [filename, "cat"]
    assert label_of(text) == "cat"


def test_the_result_a_worker_stores_in_metadata_reads_back_whole():
    response = ClassifyResponse(id="i", filename="cat.jpg", key="k", worker="i-1", untrained=True,
                                label="tabby", score=0.75,
                                top5=(Prediction("tabby", 0.75), Prediction("tiger_cat", 0.25)))
    metadata = result_metadata(response)
    assert len(json.dumps(metadata)) < 2048  # S3's limit on user metadata
    assert read_result_metadata(metadata, untrained=False) == {
        "label": "tabby", "score": 0.75, "worker": "i-1", "untrained": True,
        "top5": [{"label": "tabby", "score": 0.75}, {"label": "tiger_cat", "score": 0.25}]}


@pytest.mark.parametrize("raw", ["", "not json", "[1, 2]", '{"top5": [1]}', '{"top5": [["a", "x"]]}',
                                 '{"label": "a", "score": 1' + "0" * 400 + "}",
                                 '{"label": "a", "score": NaN}', '{"label": "a", "top5": [["a", 1e999]]}'])
def test_metadata_without_a_readable_result_reads_as_none(raw):
    """The caller then reads the label from the object's text. A JSON list made the web
    tier answer 500 (AttributeError was not caught)."""
    assert read_result_metadata({"result": raw} if raw else {}, untrained=False) is None


def test_error_response_round_trip():
    r = ClassifyResponse(id="1", filename="f", key="k", worker="w", untrained=False, error="bad " * 200)
    back = ClassifyResponse.from_json(r.to_json())
    assert not back.ok and back.error.startswith("bad")


@pytest.mark.parametrize("body", ["", "not json", "{}", json.dumps({"id": 1}), "[1]", "[" * 1000])
def test_foreign_messages_are_refused(body):
    """1,000 "[" fit in a request message, and exhaust json's recursion."""
    with pytest.raises(MessageError):
        ClassifyRequest.from_json(body)
    with pytest.raises(MessageError):
        ClassifyResponse.from_json(body)


HUGE = int("1" + "0" * 400)  # float() of it overflows


@pytest.mark.parametrize("number", [HUGE, float("nan"), float("inf")], ids=["400 digits", "nan", "inf"])
def test_messages_whose_numbers_are_not_finite_numbers_are_foreign(number):
    """A 400-digit sent_at raises OverflowError, not MessageError: the worker's receive
    would fail with it, and the nine requests received with it come back and fail again
    until all are dead letters."""
    request = json.loads(ClassifyRequest(id="x", bucket="b", key="k", filename="f.jpg").to_json())
    with pytest.raises(MessageError):
        ClassifyRequest.from_json(json.dumps({**request, "sent_at": number}))
    response = json.loads(ClassifyResponse(id="x", filename="f", key="k", worker="w", untrained=True,
                                           label="cat", score=0.5, top5=(Prediction("cat", 0.5),)).to_json())
    for change in ({"finished_at": number}, {"score": number}, {"top5": [["cat", number]]}):
        with pytest.raises(MessageError):
            ClassifyResponse.from_json(json.dumps({**response, **change}))


def test_messages_of_another_version_are_read_while_a_rollout_mixes_them():
    """Fields a reader does not know are ignored, and sent_at, which nothing reads, may be
    missing: required, a version without it would have every request deleted by the
    workers of the one before."""
    request = json.loads(ClassifyRequest(id="x", bucket="b", key="k", filename="f.jpg").to_json())
    del request["sent_at"]
    assert ClassifyRequest.from_json(json.dumps({**request, "v": 2, "priority": 5})).key == "k"
    response = json.loads(ClassifyResponse(id="x", filename="f", key="k", worker="w", untrained=True,
                                           label="cat", score=0.5).to_json())
    assert ClassifyResponse.from_json(json.dumps({**response, "v": 2, "model": "resnet50"})).label == "cat"


def test_a_response_whose_label_or_error_is_not_one_string_is_foreign():
    """A label of 123 taken as it is makes the batch's CSV fail with a 500, every time.
    Neither is recorded as done without a label."""
    response = json.loads(ClassifyResponse(id="x", filename="f", key="k", worker="w", untrained=True,
                                           label="cat", score=0.5, top5=(Prediction("cat", 0.5),)).to_json())
    assert ClassifyResponse.from_json(json.dumps(response)).label == "cat"
    for change in ({"label": 123}, {"label": ["cat"]}, {"label": None}, {"error": "bad"}, {"error": {}}):
        with pytest.raises(MessageError):
            ClassifyResponse.from_json(json.dumps({**response, **change}))
    failed = {**response, "error": "bad"}
    del failed["label"]
    assert ClassifyResponse.from_json(json.dumps(failed)).error == "bad"


def sqs_takes(body: str) -> bool:
    """Whether SQS takes `body`: only these characters may be in a message."""
    return all(c in "\t\n\r" or 0x20 <= ord(c) <= 0xD7FF or 0xE000 <= ord(c) <= 0xFFFD or ord(c) >= 0x10000
               for c in body)


def test_answers_to_names_with_characters_sqs_refuses_raw_carry_them_escaped():
    """U+FFFE and U+FFFF, sent escaped in a request (which SQS takes), would come back raw
    in its answer, which SQS refuses: the answers of its batch-mates would fail with it."""
    body = json.dumps({"v": 1, "id": "x", "bucket": "b", "key": "k\uffff", "filename": "f\ufffe.jpg",
                       "sent_at": 1.0})
    request = ClassifyRequest.from_json(body)
    assert sqs_takes(request.to_json())
    for answer in (ClassifyResponse(id=request.id, filename=request.filename, key=request.key, worker="i-1",
                                    untrained=True, error="bad \uffff"),
                   ClassifyResponse(id=request.id, filename=request.filename, key=request.key, worker="i-1",
                                    untrained=True, label="cat", score=0.5)):
        assert sqs_takes(answer.to_json())
        back = ClassifyResponse.from_json(answer.to_json())
        assert (back.filename, back.key) == ("f\ufffe.jpg", "k\uffff")
    # Cut as escaped: the longest name, key and error still make an answer under the limit.
    longest = ClassifyResponse(id="i" * MAX_ID_BYTES, filename="\uffff" * 200, key="k" * MAX_KEY_BYTES,
                               worker="i-0123456789abcdef0", untrained=True, error="\ufffe" * 200)
    assert len(longest.to_json().encode()) < 1024 and sqs_takes(longest.to_json())


@pytest.mark.parametrize("change", [{"key": ""}, {"bucket": ""}, {"id": ["x5"]}, {"id": 5},
                                    {"filename": None}])
def test_requests_that_name_nothing_are_refused(change):
    """A dead letter with an empty key would make the web tier log a traceback every 30 s
    for ever (S3's client refuses an empty key before sending)."""
    body = json.loads(ClassifyRequest(id="x", bucket="b", key="k", filename="f.jpg").to_json())
    ClassifyRequest.from_json(json.dumps(body))  # as sent, it is a request
    with pytest.raises(MessageError):
        ClassifyRequest.from_json(json.dumps({**body, **change}))


@pytest.mark.parametrize("field_name", ["key", "filename", "bucket", "id"])
def test_messages_with_text_utf8_cannot_carry_are_refused(field_name):
    """An escaped lone surrogate loads as a str no encoder takes: in a key it would raise
    in the worker's S3 call and fail the 9 good requests received with it."""
    request = json.loads(ClassifyRequest(id="x", bucket="b", key="k", filename="f.jpg").to_json())
    body = json.dumps({**request, field_name: "a\ud800b"})  # json.dumps escapes it: "a\\ud800b"
    with pytest.raises(MessageError):
        ClassifyRequest.from_json(body)
    response = json.loads(ClassifyResponse(id="x", filename="f", key="k", worker="w", untrained=True,
                                           label="cat", score=0.5).to_json())
    with pytest.raises(MessageError):
        ClassifyResponse.from_json(json.dumps({**response, "label": "\udfff", field_name: "a\ud800b"}))


def test_responses_need_a_text_id():
    body = json.loads(ClassifyResponse(id="x", filename="f", key="k", worker="w", untrained=True,
                                       error="e").to_json())
    with pytest.raises(MessageError):
        ClassifyResponse.from_json(json.dumps({**body, "id": ["x"]}))


@pytest.mark.parametrize("prefix", ["MyApp", "my_app", "-app", "app-", "a" * 53, "app.v2"])
def test_a_prefix_no_bucket_name_can_carry_is_refused_at_start(prefix):
    """An uppercase prefix would fail only at bucket creation."""
    with pytest.raises(ValueError, match="APP_PREFIX must be 1 to 52 lowercase letters"):
        Settings.from_env({"APP_PREFIX": prefix})


@pytest.mark.parametrize("prefix", ["xn--app", "sthree-app", "amzn-s3-demo-app"])
def test_a_prefix_s3_keeps_for_itself_is_refused_at_start(prefix):
    """Taken, it would fail at provisioning with S3's bare InvalidBucketName."""
    with pytest.raises(ValueError, match="APP_PREFIX must not start with xn--, sthree-"):
        Settings.from_env({"APP_PREFIX": prefix})


def test_a_prefix_any_bucket_name_can_carry_is_taken():
    for prefix in ("a", "my-app-2", "a" * 52):
        assert Settings.from_env({"APP_PREFIX": prefix}).output_bucket == f"{prefix}-out-bucket"


def test_an_image_limit_past_pillows_own_is_refused_not_quietly_lowered():
    """MAX_IMAGE_PIXELS=500000000 started without a word and refused at 89 megapixels."""
    from PIL import Image

    from common.config import PILLOW_MAX_IMAGE_PIXELS

    assert PILLOW_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    limit = str(PILLOW_MAX_IMAGE_PIXELS)
    assert Settings.from_env({"MAX_IMAGE_PIXELS": limit}).max_image_pixels == PILLOW_MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=f"MAX_IMAGE_PIXELS must be from 1 to {limit}, got 500000000"):
        Settings.from_env({"MAX_IMAGE_PIXELS": "500000000"})


def test_settings_from_env():
    s = Settings.from_env({"APP_PREFIX": "demo", "MAX_INSTANCES": "3", "AWS_REGION": "eu-west-1",
                           "SECURITY_GROUP_IDS": "sg-1, sg-2,", "API_KEY": "s3cret",
                           "SUBNET_IDS": "subnet-a,subnet-b",
                           "SCALING_MODE": "Latency", "MODEL_RUNTIME": " TensorFlow"})
    assert (s.input_bucket, s.output_bucket) == ("demo-in-bucket", "demo-out-bucket")
    assert (s.request_queue, s.response_queue, s.dead_letter_queue) == (
        "demo-req-queue", "demo-resp-queue", "demo-req-dlq")
    assert s.max_instances == 3 and s.region == "eu-west-1" and s.security_group_ids == ("sg-1", "sg-2")
    assert s.subnet_ids == ("subnet-a", "subnet-b")
    assert s.api_key == "s3cret" and "s3cret" not in repr(s)
    assert (s.scaling_mode, s.model_runtime) == ("latency", "tensorflow")
    with pytest.raises(ValueError, match="MAX_INSTANCES"):
        Settings.from_env({"MAX_INSTANCES": "many"})
    assert Settings.from_env({"API_KEY": " key\n"}).api_key == "key"  # as pasted from a file


def test_the_web_journal_is_in_the_users_state_directory_unless_set():
    assert Settings().web_journal_dir == ""  # tests: none
    home = Settings.from_env({"HOME": "/home/u"})
    assert home.state_dir == "/home/u/.local/state/imgclass"
    assert home.web_journal_dir == f"/home/u/.local/state/imgclass/{home.fleet_name}-web-journal"
    xdg = Settings.from_env({"HOME": "/home/u", "XDG_STATE_HOME": "/state", "APP_PREFIX": "demo"})
    assert xdg.web_journal_dir == f"/state/imgclass/{xdg.fleet_name}-web-journal"
    assert Settings.from_env({"WEB_JOURNAL_DIR": "/var/lib/web"}).web_journal_dir == "/var/lib/web"
    # One fleet's files are never another's: the same prefix on the embedded AWS and on AWS.
    local = Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"})
    assert home.fleet_name.startswith("imgclass-") and xdg.fleet_name.startswith("demo-")
    assert len({home.fleet_name, local.fleet_name, xdg.fleet_name}) == 3
    assert local.web_journal_dir != home.web_journal_dir


@pytest.mark.parametrize("env, says", [
    # Read as unset, it left every write open, with no word.
    ({"API_KEY": "   "}, "API_KEY is set but holds only spaces"),
    # Never matched from a UTF-8 client (gunicorn reads headers as Latin-1).
    ({"API_KEY": "clé"}, "API_KEY holds a character an HTTP header cannot carry"),
    ({"API_KEY": "key\u2019s"}, "API_KEY holds a character an HTTP header cannot carry"),
    # Taken as set: a cooldown of 0 and another fleet's files, then "Invalid endpoint".
    ({"AWS_ENDPOINT_URL": " "}, "AWS_ENDPOINT_URL must be an http:// or https:// address"),
    ({"AWS_ENDPOINT_URL": "localhost:5000"}, "AWS_ENDPOINT_URL must be an http:// or https:// address"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000\n"}, "AWS_ENDPOINT_URL must be"),
    # boto3 sends SQS's calls there; the fleet was taken for AWS's (its lock, a 60 s cooldown).
    ({"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:5000"}, "AWS_ENDPOINT_URL_SQS set without AWS_ENDPOINT_URL"),
    # botocore's InvalidRegionError at each tier's first client, the variable unnamed.
    ({"AWS_REGION": "us east 1"}, "must be a region's name"),
    ({"AWS_DEFAULT_REGION": "eu_west_1"}, "must be a region's name"),
])
def test_settings_that_would_fail_later_or_open_the_api_are_refused_at_the_start(env, says):
    """Taken, each would fail later, or leave the API open."""
    with pytest.raises(ValueError, match=re.escape(says)):
        Settings.from_env(env)


def test_spaces_around_a_region_are_not_its_name_and_a_relative_state_home_is_ignored():
    """Only spaces is unset, as for every setting; XDG_STATE_HOME relative is ignored, as
    the XDG spec says: else the controller's lock and the journals follow the directory
    each process starts in, and two controllers started in two take two locks."""
    assert Settings.from_env({"AWS_REGION": " eu-west-1 "}).region == "eu-west-1"
    assert Settings.from_env({"AWS_REGION": "  ", "AWS_DEFAULT_REGION": "eu-north-1"}).region == "eu-north-1"
    relative = Settings.from_env({"HOME": "/home/u", "XDG_STATE_HOME": "state"})
    assert relative.state_dir == "/home/u/.local/state/imgclass"
    assert Settings.from_env({"API_KEY": ""}).api_key == ""  # empty: unset, as before


def test_on_aws_the_fleet_shrinks_only_after_a_minute_by_default():
    """A boot takes ~40 s there: a trickle of requests must not end the fleet between two."""
    assert Settings.from_env({}).scale_in_cooldown_s == 60
    assert Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"}).scale_in_cooldown_s == 0
    assert Settings.from_env({"SCALE_IN_COOLDOWN": "5"}).scale_in_cooldown_s == 5


def test_on_aws_an_instance_counts_as_booting_for_longer_by_default():
    """Boot, then a worker read from a volume fresh from its snapshot: still starting at
    80 s (two BOOT_TIMEs of 40), its messages had another instance launched for them."""
    assert Settings.from_env({}).boot_time_s == 90
    assert Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"}).boot_time_s == 40
    assert Settings.from_env({"BOOT_TIME": "120"}).boot_time_s == 120


@pytest.mark.parametrize(("name", "value", "says"), [
    ("RECEIVE_WAIT", "30", "RECEIVE_WAIT must be from 0 to 20, got 30"),  # SQS's long-poll limit
    ("RECEIVE_BATCH", "0", "RECEIVE_BATCH must be from 1 to 10, got 0"),
    ("MAX_UPLOAD_BYTES", "-5", "MAX_UPLOAD_BYTES must be from 1 up, got -5"),
    ("POLL_INTERVAL", "0", "POLL_INTERVAL must be from 0.01 to 3600, got 0"),
    ("RESULT_TIMEOUT", "inf", "RESULT_TIMEOUT must be a finite number, got 'inf'"),
    ("SCALE_IN_COOLDOWN", "nan", "SCALE_IN_COOLDOWN must be a finite number, got 'nan'"),
    ("RESULT_TIMEOUT", "1e10", "RESULT_TIMEOUT must be from 0.1 to 3600, got 1e+10"),  # too long to wait on
    ("SHUTDOWN_GRACE", "30", "SHUTDOWN_GRACE must be from 0 to 25, got 30"),  # systemd kills at 30
    ("VISIBILITY_TIMEOUT", "1", "VISIBILITY_TIMEOUT must be from 5 to 39600, got 1"),
    # SQS refuses to hide a message over 12 hours from its receive: the first extension failed.
    ("VISIBILITY_TIMEOUT", "43200", "VISIBILITY_TIMEOUT must be from 5 to 39600, got 43200"),
    ("RETRY_DELAY", "7200", "RETRY_DELAY must be from 0 to 3600, got 7200"),  # the worker's cap
    ("STALL_TIMEOUT", "0", "STALL_TIMEOUT must be from 1 to 19800, got 0"),
    # Held for up to twice it: beyond SQS's 12 hours from the receive, another worker takes it.
    ("STALL_TIMEOUT", "21600", "STALL_TIMEOUT must be from 1 to 19800, got 21600"),
    ("MODEL_RUNTIME", "onnx", "MODEL_RUNTIME must be one of openvino, tensorflow, got 'onnx'"),
    ("SCALING_MODE", "fast", "SCALING_MODE must be one of backlog, latency, got 'fast'"),
    ("LOCAL_WARM_SPARES", "two", "LOCAL_WARM_SPARES must be a whole number, got 'two'"),
    ("LOCAL_WARM_SPARES", "-1", "LOCAL_WARM_SPARES must be from 0 to 15, got -1"),
    ("READY_DEADLINE", "-1", "READY_DEADLINE must be from 0 up, got -1"),
    ("LOCAL_MAX_WORKERS", "0", "LOCAL_MAX_WORKERS must be from 1 up, got 0"),
])
def test_settings_out_of_range_are_refused_naming_the_variable(name, value, says):
    with pytest.raises(ValueError) as refused:
        Settings.from_env({name: value})
    assert str(refused.value) == says


def test_queue_depth_tells_waiting_in_flight_and_delayed_apart():
    with mock_aws():
        settings = Settings()
        provision(settings)
        aws = Aws(settings)
        url = aws.request_queue_url
        for n in range(3):
            aws.sqs.send_message(QueueUrl=url, MessageBody=str(n))
        aws.sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=60)
        aws.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)
        assert aws.queue_depth(url) == QueueDepth(visible=2, in_flight=1, delayed=1)
        assert aws.queue_depth(aws.response_queue_url) == QueueDepth(0, 0, 0)


def test_a_missing_queue_is_named_with_the_prefix_and_region_it_was_looked_for_with():
    """SQS's "The specified queue does not exist" named nothing: a controller started
    with a wrong APP_PREFIX retried it for ever, and its operator could not tell why."""
    with mock_aws():
        provision(Settings())
        aws = Aws(Settings(prefix="wrongpfx"))
        with pytest.raises(ClientError) as missing:
            aws.queue_url(aws.settings.request_queue)
        assert missing.value.response["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
        assert isinstance(missing.value, aws.sqs.exceptions.QueueDoesNotExist)  # still caught as it was
        assert ("no queue wrongpfx-req-queue in us-east-1: are APP_PREFIX (wrongpfx) and the region those "
                "it was made with?") in str(missing.value)


def test_provision_is_idempotent_private_encrypted_and_has_a_dead_letter_queue():
    with mock_aws():
        settings = Settings()
        first = provision(settings)
        assert provision(settings) == first
        aws = Aws(settings)
        for bucket in (settings.input_bucket, settings.output_bucket):
            rules = aws.s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
            assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
            block = aws.s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
            assert all(block.values())
        for url in first.values():
            encrypted = aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["SqsManagedSseEnabled"])
            assert encrypted["Attributes"]["SqsManagedSseEnabled"] == "true"
        attrs = aws.sqs.get_queue_attributes(QueueUrl=first["request"], AttributeNames=["All"])["Attributes"]
        assert attrs["MaximumMessageSize"] == "1024"
        redrive = json.loads(attrs["RedrivePolicy"])
        assert redrive["deadLetterTargetArn"].endswith(settings.dead_letter_queue)
        assert int(redrive["maxReceiveCount"]) == 3


def test_provision_outside_us_east_1_makes_its_buckets_in_its_region():
    """S3 refuses a bucket outside us-east-1 made without its region's LocationConstraint
    (IllegalLocationConstraintException), as moto does: every region but one."""
    with mock_aws():
        settings = dataclasses.replace(Settings(), region="eu-west-1")
        provision(settings)
        s3 = Aws(settings).s3
        for bucket in (settings.input_bucket, settings.output_bucket):
            assert s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] == "eu-west-1"


def test_a_bucket_name_taken_by_another_account_is_said_so_naming_app_prefix(monkeypatch, capsys):
    """Bucket names are global: on AWS, the default prefix's are most likely taken."""
    def refused(code: str, operation: str):
        def call(**_kwargs):
            raise ClientError({"Error": {"Code": code, "Message": "..."}}, operation)
        return call

    with mock_aws():
        aws = Aws(Settings())
        monkeypatch.setattr(aws.s3, "head_bucket", refused("403", "HeadBucket"))
        monkeypatch.setattr(aws.s3, "create_bucket", refused("BucketAlreadyExists", "CreateBucket"))
        with pytest.raises(ProvisionError, match="imgclass-in-bucket belongs to another .*APP_PREFIX"):
            provision(Settings(), aws)
    monkeypatch.setenv("MAX_RECEIVE_COUNT", "0")  # and a bad setting, without a traceback
    assert provision_main([]) == 2
    assert "MAX_RECEIVE_COUNT must be from 1" in capsys.readouterr().err


def test_provision_without_credentials_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    """Not botocore's traceback."""
    without_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert provision_main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m common.provision: AWS refused or could not be reached: ") and \
        "Unable to locate credentials" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["--help"], ["--dry-run"]])
def test_provision_takes_no_arguments_and_makes_nothing_when_given_one(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps its help to the terminal's width
    with mock_aws():
        with pytest.raises(SystemExit) as exited:
            provision_main(argv)
        assert exited.value.code == (0 if argv == ["--help"] else 2)
        assert Aws(Settings()).s3.list_buckets()["Buckets"] == []
    assert "two buckets and three queues" in capsys.readouterr().out or argv != ["--help"]


def test_provision_expires_objects_after_retention_days_keeping_the_buckets_other_rules(caplog):
    """Uploads and results kept for ever let anyone with a batch's link read them back
    years later. RETENTION_DAYS sets one rule of ours; 0 removes it."""
    from common.provision import RETENTION_RULE_ID

    def rules(aws, bucket):
        try:
            return {r["ID"]: r for r in aws.s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
        except ClientError:
            return {}

    with mock_aws():
        settings = dataclasses.replace(Settings(), retention_days=30)
        provision(settings)
        aws = Aws(settings)
        theirs = {"ID": "operators-own", "Status": "Enabled", "Filter": {"Prefix": "old/"},
                  "Expiration": {"Days": 1}}
        mine = rules(aws, settings.input_bucket)[RETENTION_RULE_ID]
        aws.s3.put_bucket_lifecycle_configuration(Bucket=settings.input_bucket,
                                                  LifecycleConfiguration={"Rules": [theirs, mine]})
        caplog.clear()
        provision(dataclasses.replace(settings, retention_days=7))
        assert f"bucket {settings.input_bucket}: objects expire 7 days after they are written, no longer 30" \
            in caplog.text
        for bucket in (settings.input_bucket, settings.output_bucket):
            assert rules(aws, bucket)[RETENTION_RULE_ID]["Expiration"] == {"Days": 7}
        assert "operators-own" in rules(aws, settings.input_bucket)
        # The bucket-wide setting an operator chose is put back with the rules, not reset.
        get, put = aws.s3.get_bucket_lifecycle_configuration, aws.s3.put_bucket_lifecycle_configuration
        puts = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(aws.s3, "get_bucket_lifecycle_configuration", lambda **kw: {
                **get(**kw), "TransitionDefaultMinimumObjectSize": "varies_by_storage_class"})
            patch.setattr(aws.s3, "put_bucket_lifecycle_configuration", lambda **kw: puts.append(kw) or put(
                **{k: v for k, v in kw.items() if k != "TransitionDefaultMinimumObjectSize"}))
            provision(dataclasses.replace(settings, retention_days=7), aws)
        assert puts and {p["TransitionDefaultMinimumObjectSize"] for p in puts} == {"varies_by_storage_class"}
        caplog.clear()
        provision(Settings())  # 0: kept for ever; the operator's rule stays
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"bucket {settings.input_bucket}: objects are now kept for ever, no longer expired after 7 " \
            "days" in said[0], said
        assert set(rules(aws, settings.input_bucket)) == {"operators-own"}
        assert rules(aws, settings.output_bucket) == {}
        assert Settings.from_env({"RETENTION_DAYS": "30"}).retention_days == 30
        with pytest.raises(ValueError, match="RETENTION_DAYS"):
            Settings.from_env({"RETENTION_DAYS": "-1"})


def test_provision_under_a_role_without_the_lifecycle_rights_still_works_unless_asked_to_expire(monkeypatch):
    """A provision role made before RETENTION_DAYS cannot read lifecycle rules: a re-run
    to change a queue setting must not fail with a traceback, before the queues."""
    from common.provision import ProvisionError

    def denied(**_kwargs):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "not authorized"}},
                          "GetBucketLifecycleConfiguration")

    with mock_aws():
        aws = Aws(Settings())
        monkeypatch.setattr(aws.s3, "get_bucket_lifecycle_configuration", denied)
        assert set(provision(Settings(), aws)) == {"request", "response", "dead_letter"}
        with pytest.raises(ProvisionError, match="RETENTION_DAYS=7 needs s3:GetLifecycleConfiguration"):
            provision(dataclasses.replace(Settings(), retention_days=7), aws)


def test_provision_applies_changed_settings_to_the_queues_that_exist(caplog):
    """CreateQueue refuses an existing queue with other attributes; provisioning again
    after VISIBILITY_TIMEOUT, RECEIVE_WAIT or MAX_RECEIVE_COUNT changed must not. Each
    change is said: a re-run without the controller's settings would silently put a
    MAX_RECEIVE_COUNT of 5 back to 3."""
    with mock_aws():
        first = provision(Settings())
        caplog.clear()
        assert provision(Settings()) == first
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing changed
        # One made before SSE-SQS was the default, or by another tool: encrypted now.
        Aws(Settings()).sqs.set_queue_attributes(QueueUrl=first["request"],
                                                 Attributes={"SqsManagedSseEnabled": "false"})
        changed = dataclasses.replace(Settings(), visibility_timeout_s=90, receive_wait_s=5,
                                      max_receive_count=7)
        assert provision(changed) == first
        attrs = Aws(changed).sqs.get_queue_attributes(
            QueueUrl=first["request"], AttributeNames=["All"])["Attributes"]
        assert (attrs["VisibilityTimeout"], attrs["ReceiveMessageWaitTimeSeconds"]) == ("90", "5")
        assert attrs["SqsManagedSseEnabled"] == "true"
        assert int(json.loads(attrs["RedrivePolicy"])["maxReceiveCount"]) == 7
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        request = Settings().request_queue
        for change in ("VisibilityTimeout changed from 60 to 90", "ReceiveMessageWaitTimeSeconds changed "
                       "from 20 to 5", "SqsManagedSseEnabled changed from false to true", "RedrivePolicy"):
            assert any(f"queue {request}: {change}" in line for line in said), (change, said)
        assert any('"maxReceiveCount": "7"' in line for line in said), said
        assert len(said) == 4, said


class SettleTime:
    """provision's clock and its sleep: a sleep moves the clock on, at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def settle_time(monkeypatch) -> SettleTime:
    from common import provision as provision_module

    fake = SettleTime()
    monkeypatch.setattr(provision_module, "clock", lambda: fake.now)
    monkeypatch.setattr(provision_module, "sleep", fake.sleep)
    return fake


def sqs_refusal(code: str, message: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, operation)


NOT_THERE = ("AWS.SimpleQueueService.NonExistentQueue", "The specified queue does not exist.")
DELETED_RECENTLY = ("You must wait 60 seconds after deleting a queue before you can create another queue "
                    "with the same name.")


@pytest.mark.parametrize(("code", "message", "not_there"), [
    (*NOT_THERE, True),
    ("QueueDoesNotExist", "The specified queue does not exist.", True),
    ("NonExistentQueue", "", True),
    # Real SQS, of a redrive policy naming a queue it does not know (yet).
    ("InvalidParameterValue", 'Value {"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:dlq",'
                              '"maxReceiveCount":"3"} for parameter RedrivePolicy is invalid. Reason: Dead '
                              "letter target does not exist.", True),
    ("InvalidAttributeValue", "Value {} for parameter RedrivePolicy is invalid. Reason: Dead letter target "
                              "does not exist.", True),
    # Another InvalidParameterValue: no wait mends it.
    ("InvalidParameterValue", "Value {} for parameter RedrivePolicy is invalid. Reason: Invalid value for "
                              "maxReceiveCount: 0, valid values are from 1 to 1000 both inclusive.", False),
    ("InvalidParameterValue", "Dead letter target does not exist.", False),  # not said of a redrive policy
    ("AWS.SimpleQueueService.QueueDeletedRecently", DELETED_RECENTLY, False),
    ("AccessDenied", "The specified queue does not exist.", False),
])
def test_a_queue_sqs_does_not_know_yet_is_told_by_real_sqss_answers_and_by_motos(code, message, not_there):
    from common.sqs import is_queue_not_there

    assert is_queue_not_there(code, message) is not_there


def test_provision_waits_for_a_queue_it_just_created_to_be_usable(monkeypatch, settle_time):
    """AWS: a queue may be used a second after it is created. Reading the new dead-letter
    queue's ARN, and naming it in the request queue's redrive policy, are tried again while
    SQS does not know it; and nothing waits once it does."""
    with mock_aws():
        aws = Aws(Settings())
        read, create = aws.sqs.get_queue_attributes, aws.sqs.create_queue
        refused = {"read": 0, "create": 0}

        def read_unknown_once(**kwargs):
            if kwargs.get("AttributeNames") == ["QueueArn"] and not refused["read"]:
                refused["read"] += 1
                raise sqs_refusal(*NOT_THERE, "GetQueueAttributes")
            return read(**kwargs)

        def target_unknown_twice(**kwargs):
            policy = kwargs.get("Attributes", {}).get("RedrivePolicy")
            if policy and refused["create"] < 2:
                refused["create"] += 1
                raise sqs_refusal("InvalidParameterValue", f"Value {policy} for parameter RedrivePolicy is "
                                  "invalid. Reason: Dead letter target does not exist.", "CreateQueue")
            return create(**kwargs)

        monkeypatch.setattr(aws.sqs, "get_queue_attributes", read_unknown_once)
        monkeypatch.setattr(aws.sqs, "create_queue", target_unknown_twice)
        urls = provision(Settings(), aws)
        assert refused == {"read": 1, "create": 2}
        assert settle_time.slept == [0.25, 0.25, 0.5]  # each use's own backoff
        redrive = json.loads(read(QueueUrl=urls["request"], AttributeNames=["RedrivePolicy"])["Attributes"][
            "RedrivePolicy"])
        assert redrive["deadLetterTargetArn"].endswith(Settings().dead_letter_queue)
        assert provision(Settings(), aws) == urls
        assert len(settle_time.slept) == 3


def test_provision_gives_up_on_a_queue_sqs_still_does_not_know_after_a_few_seconds(monkeypatch, settle_time):
    from common.provision import QUEUE_SETTLE_S

    with mock_aws():
        aws = Aws(Settings())
        read, tries = aws.sqs.get_queue_attributes, []

        def never_known(**kwargs):
            if kwargs.get("AttributeNames") == ["QueueArn"]:
                tries.append(settle_time.now)
                raise sqs_refusal(*NOT_THERE, "GetQueueAttributes")
            return read(**kwargs)

        monkeypatch.setattr(aws.sqs, "get_queue_attributes", never_known)
        with pytest.raises(ClientError) as refused:
            provision(Settings(), aws)
    assert refused.value.response["Error"]["Code"] == NOT_THERE[0]
    assert settle_time.slept == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert len(tries) == 7 and tries[-1] <= QUEUE_SETTLE_S


@pytest.mark.parametrize("code", ["AWS.SimpleQueueService.QueueDeletedRecently", "QueueDeletedRecently"])
def test_provision_right_after_a_queue_was_deleted_says_to_wait_a_minute(code, monkeypatch, settle_time,
                                                                          capsys):
    """SQS refuses for 60 s to make a queue of a deleted one's name: said in one line,
    not waited on, nor shown as AWS out of reach."""
    from common import provision as provision_module

    def deleted_recently(**_kwargs):
        raise sqs_refusal(code, DELETED_RECENTLY, "CreateQueue")

    dead_letter_queue = Settings().dead_letter_queue
    says = (f"queue {dead_letter_queue} was deleted less than 60 s ago (QueueDeletedRecently), and SQS makes "
            "no queue of that name until then: wait 60 s after deleting a queue before provisioning again")
    with mock_aws():
        aws = Aws(Settings())
        monkeypatch.setattr(aws.sqs, "create_queue", deleted_recently)
        with pytest.raises(ProvisionError) as refused:
            provision(Settings(), aws)
        assert str(refused.value) == says
        monkeypatch.setattr(provision_module, "Aws", lambda _settings: aws)
        assert provision_main([]) == 2
    assert capsys.readouterr().err == f"python -m common.provision: {says}\n"
    assert settle_time.slept == []


def test_aws_opens_clients_ahead_of_use_and_refuses_unknown_services():
    aws = Aws(Settings(region="us-east-1"))
    assert aws._clients == {}
    assert aws.open("s3", "sqs") is aws
    assert set(aws._clients) == {"s3", "sqs"}
    with pytest.raises(ValueError, match="lambda"):
        aws.open("lambda")


def test_a_client_made_before_there_were_credentials_finds_them_at_its_next_use(monkeypatch, tmp_path):
    """botocore looks for credentials once, when it makes a client: one made while the
    instance metadata service missed its one try at boot, or before the instance
    profile was attached, would fail every call until the process is restarted by hand."""
    from botocore.exceptions import NoCredentialsError

    with mock_aws():
        without_credentials(monkeypatch, tmp_path)
        aws = Aws(Settings(region="us-east-1"))
        with pytest.raises(NoCredentialsError):
            aws.sqs.list_queues()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "came-later")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "came-later")
        aws.sqs.list_queues()
        assert aws.sqs is aws.sqs  # kept, now that it has them


def test_a_handler_of_each_request_is_called_by_clients_made_after_credentials_came(monkeypatch, tmp_path):
    """The controller pings its watchdog at each AWS request: registered on the client it
    had at start, made without credentials, the ping was lost with that client."""
    with mock_aws():
        without_credentials(monkeypatch, tmp_path)
        aws = Aws(Settings(region="us-east-1"))
        assert aws.ec2 is not aws.ec2  # not kept yet
        requests: list[str] = []
        aws.on_each_request(lambda **event: requests.append(event["event_name"]))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "came-later")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "came-later")
        aws.sqs.list_queues()
        aws.ec2.describe_instances()
        assert requests == ["request-created.sqs.ListQueues", "request-created.ec2.DescribeInstances"]
        aws.on_each_request(lambda **event: requests.append("second"))  # the kept ones get it too
        aws.sqs.list_queues()
        assert requests[2:] == ["request-created.sqs.ListQueues", "second"]


def test_clients_of_later_sessions_parse_no_service_model_again(monkeypatch):
    """Each client has a session of its own (its own credentials lookup); the service
    models and endpoint rules parsed for the first are not parsed again for the next."""
    import botocore.loaders

    from common.aws import new_session

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    Aws(Settings(region="us-east-1")).open("s3", "sqs")  # whatever this process had not parsed yet
    parsed: list[str] = []
    real = botocore.loaders.JSONFileLoader.load_file
    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file",
                        lambda self, path: parsed.append(path) or real(self, path))
    aws = Aws(Settings(region="us-east-1")).open("s3", "sqs")
    assert aws.s3 is not aws.sqs and parsed == []
    # boto3 adds its data folder to the loader at each session: once is kept.
    paths = new_session()._session.get_component("data_loader").search_paths
    for _ in range(3):
        new_session()
    assert paths == list(dict.fromkeys(paths)) and len(paths) == len(set(paths))


AWS_TIMES = [
    "2026-12-02T11:36:54.000Z", "2026-12-02T11:36:54Z", "2026-12-02T11:36:54.1Z",
    "2026-12-02T11:36:54.123456Z", "2024-02-29T00:00:00Z",
    # botocore's parser reads these: nanoseconds, RFC 822 (S3's headers), epoch seconds,
    # another zone, a lower-case z, other digits.
    "2026-12-02T11:36:54.1234567Z", "Wed, 02 Dec 2026 11:36:54 GMT", "1700000000", 1700000000,
    "2026-12-02T11:36:54+02:00", "2026-12-02T11:36:54.000z", "٢٠٢٦-12-02T11:36:54Z",
]


@pytest.mark.parametrize("value", AWS_TIMES)
def test_timestamps_read_as_botocore_reads_them(value):
    from botocore.utils import parse_timestamp

    from common.aws import parse_aws_timestamp

    ours, theirs = parse_aws_timestamp(value), parse_timestamp(value)
    assert ours == theirs and ours.utcoffset() == theirs.utcoffset()


@pytest.mark.parametrize("value", ["2026-02-30T00:00:00Z", "2026-12-02T25:00:00Z", "garbage"])
def test_timestamps_botocore_refuses_are_refused(value):
    from botocore.utils import parse_timestamp

    from common.aws import parse_aws_timestamp

    with pytest.raises(ValueError):
        parse_timestamp(value)
    with pytest.raises(ValueError):
        parse_aws_timestamp(value)


def test_clients_read_aws_timestamps_without_dateutil(monkeypatch):
    """The fleet listing, each second in the controller, the web tier and the runner,
    spent a third of its client CPU in dateutil's general parser."""
    import boto3
    import dateutil.parser

    calls: list[str] = []
    real = dateutil.parser.parse
    monkeypatch.setattr(dateutil.parser, "parse",
                        lambda text, *a, **k: calls.append(text) or real(text, *a, **k))
    with mock_aws():
        aws = Aws(Settings(region="us-east-1"))
        image = aws.ec2.describe_images()["Images"][0]["ImageId"]
        aws.ec2.run_instances(ImageId=image, MinCount=3, MaxCount=3)
        calls.clear()
        ours = aws.ec2.describe_instances()["Reservations"][0]["Instances"]
        assert calls == []
        plain_ec2 = boto3.client("ec2", region_name="us-east-1")
        plain = plain_ec2.describe_instances()["Reservations"][0]["Instances"]
        assert calls  # the same answer, through botocore's own parser
    assert [i["LaunchTime"] for i in ours] == [i["LaunchTime"] for i in plain]



@pytest.mark.parametrize(("headers", "at"), [
    ({"date": "Wed, 02 Dec 2026 11:36:54 GMT"}, 1796211414.0),
    ({"date": "Wed, 02 Dec 2026 11:36:54 -0000"}, 1796211414.0),  # naive, still UTC
    ({"date": "Wed, 02 Dec 2026 12:36:54 +0100"}, 1796211414.0),
    ({"date": "garbage"}, None), ({"date": ""}, None), ({}, None),
])
def test_ec2s_time_is_its_replys_date_or_none(headers, at):
    from common.fleet import ec2_time

    assert ec2_time({"ResponseMetadata": {"HTTPHeaders": headers}}) == at
    assert ec2_time({"Reservations": []}) is None  # a fake EC2 without any metadata


def test_instances_are_listed_with_their_age_on_ec2s_clock(monkeypatch):
    """moto's in-process EC2 sends a Date, as AWS does: an instance's age is that Date
    less its LaunchTime, never less than none (the Date is truncated to the second),
    and 0 without a Date."""
    from datetime import UTC, datetime

    from common.fleet import app_tier_instances
    from common.names import PREFIX_TAG, instance_name

    with mock_aws():
        aws = Aws(Settings(region="us-east-1", prefix="age"))
        image = aws.ec2.describe_images()["Images"][0]["ImageId"]
        tags = [{"Key": "Name", "Value": instance_name(1)}, {"Key": PREFIX_TAG, "Value": "age"}]
        aws.ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1,
                              TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
        [instance] = app_tier_instances(aws)
        assert instance.age_s >= 0
        real = aws.ec2.describe_instances

        def answered(date: str | None, launched: datetime):
            def describe(**kwargs):
                reply = real(**kwargs)
                reply["Reservations"][0]["Instances"][0]["LaunchTime"] = launched
                if date is None:
                    del reply["ResponseMetadata"]["HTTPHeaders"]["date"]
                else:
                    reply["ResponseMetadata"]["HTTPHeaders"]["date"] = date
                return reply
            return describe

        # Times of EC2's own, fixed: the reader's clock plays no part.
        def launched_at(second: int, microsecond: int = 0) -> datetime:
            return datetime(2026, 12, 2, 11, 36, second, microsecond, tzinfo=UTC)

        dated = "Wed, 02 Dec 2026 11:36:54 GMT"
        for date, launched, age in ((dated, launched_at(12), 42.0), (dated, launched_at(54, 600_000), 0.0),
                                    (None, launched_at(12), 0.0)):
            monkeypatch.setattr(aws.ec2, "describe_instances", answered(date, launched))
            assert app_tier_instances(aws)[0].age_s == age, (date, launched)


def test_aws_clients_send_the_fixed_user_agent():
    # The fixed string spares botocore rebuilding its structured one on every call.
    sent: list[str] = []
    with mock_aws():
        aws = Aws(Settings(region="us-east-1"))
        aws.sqs.meta.events.register(
            "before-send", lambda request, **_: sent.append(request.headers["User-Agent"])
        )
        aws.sqs.list_queues()
    agents = [agent.decode() if isinstance(agent, bytes) else agent for agent in sent]
    assert agents and all(agent.startswith(USER_AGENT + " ") for agent in agents), agents


def test_logging_set_up_keeps_botocores_credential_chatter_out(monkeypatch, caplog):
    import logging

    import boto3

    from common.logs import configure

    chatter = logging.getLogger("botocore.credentials")
    monkeypatch.setattr(chatter, "level", logging.NOTSET)  # as in a fresh process
    configure("%(message)s")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with caplog.at_level(logging.INFO):
        boto3.session.Session().client("sqs", region_name="us-east-1")
    assert not [r for r in caplog.records if "Found credentials" in r.getMessage()]


@pytest.mark.parametrize(("level", "effective", "warned"), [
    ("debug", "DEBUG", False), (" Warning ", "WARNING", False), ("verbose", "INFO", True)])
def test_a_log_level_is_taken_in_any_case_and_a_wrong_one_does_not_stop_the_process(level, effective, warned):
    """LOG_LEVEL=debug must not end the worker with a traceback, restarted for ever."""
    code = ("import logging, sys; from common.logs import configure; configure('%(levelname)s %(message)s', "
            "sys.argv[1]); print(logging.getLevelName(logging.getLogger().level))")
    done = subprocess.run([sys.executable, "-c", code, level], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    assert done.stdout.strip() == effective
    assert ("names no level" in done.stderr) == warned, done.stderr


def test_every_process_takes_its_log_level_from_LOG_LEVEL_and_logs_library_warnings():
    """The web tier and the controller log at the LOG_LEVEL set, not INFO, and Pillow's
    warnings reach the web tier's stderr formatted, not as bare lines."""
    code = ("import logging, warnings; from common.logs import configure; configure('LOG %(levelname)s "
            "%(message)s'); print(logging.getLevelName(logging.getLogger().level)); "
            "warnings.warn('odd image')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=True,
                          env={**os.environ, "LOG_LEVEL": "warning"})
    assert done.stdout.strip() == "WARNING"
    assert done.stderr.startswith("LOG WARNING "), done.stderr
    assert "UserWarning: odd image" in done.stderr


def test_pillows_warning_for_an_image_the_tiers_refuse_anyway_is_not_logged():
    """An upload of 12000x12000 pixels is refused (413) by the tiers' own limit, and
    Pillow's "could be decompression bomb DOS attack" warning added a line of alarm."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # Its header alone: 12000x12000 pixels, 8-bit RGB (what Pillow opens).
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    code = ("import io, sys, warnings; from PIL import Image; from common.logs import configure; "
            "configure('LOG %(levelname)s %(message)s'); "
            f"image = Image.open(io.BytesIO({png!r})); print(image.size); warnings.warn('odd image')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    assert done.stdout.strip() == "(12000, 12000)"
    assert "UserWarning: odd image" in done.stderr  # other warnings are still logged
    assert "decompression bomb" not in done.stderr, done.stderr


def test_at_debug_the_aws_libraries_stay_at_info_as_they_would_log_session_tokens():
    code = ("import logging; from common.logs import configure; configure('%(message)s', 'debug'); "
            "print(logging.getLogger('botocore.endpoint').isEnabledFor(logging.DEBUG), "
            "logging.getLogger('web_tier').isEnabledFor(logging.DEBUG))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    assert done.stdout.split() == ["False", "True"]


def test_tests_run_in_the_fixed_region_whatever_the_shell_says():
    """tests/conftest.py: a developer's AWS_REGION (read before AWS_DEFAULT_REGION)
    must not move the tests to another region."""
    import boto3

    assert Settings.from_env().region == "us-east-1"
    assert boto3.session.Session().region_name == "us-east-1"


def test_region_comes_from_the_aws_profile_when_no_variable_names_one(tmp_path):
    """`aws configure` writes the region into the profile, not the environment: boto3
    uses it, and so must the clients made with Settings.region."""
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-west-3\n\n[profile work]\nregion = ap-south-1\n")
    base = {"AWS_CONFIG_FILE": str(config), "HOME": str(tmp_path)}
    assert Settings.from_env(base).region == "eu-west-3"
    assert Settings.from_env({**base, "AWS_PROFILE": "work"}).region == "ap-south-1"
    # botocore reads AWS_DEFAULT_PROFILE first.
    both = {**base, "AWS_PROFILE": "nobody", "AWS_DEFAULT_PROFILE": "work"}
    assert Settings.from_env(both).region == "ap-south-1"
    # The variables still come first, as in boto3.
    assert Settings.from_env({**base, "AWS_DEFAULT_REGION": "us-west-2"}).region == "us-west-2"
    # ~/.aws/config when AWS_CONFIG_FILE is unset.
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\nregion = sa-east-1\n")
    assert Settings.from_env({"HOME": str(tmp_path)}).region == "sa-east-1"


def test_an_endpoint_in_the_aws_profile_is_the_services_as_boto3_takes_it(tmp_path):
    """boto3 sends every call to a profile's endpoint_url: not read, the fleet was taken
    for AWS's (another fleet's files, a 60 s cooldown) while it talked to another."""
    config = tmp_path / "config"
    config.write_text("[default]\nendpoint_url = http://127.0.0.1:5000\n\n"
                      "[profile bad]\nendpoint_url = localhost:5000\n\n"
                      "[profile split]\nservices = local\n\n[services local]\nsqs =\n"
                      "  endpoint_url = http://127.0.0.1:5000\n")
    base = {"AWS_CONFIG_FILE": str(config), "HOME": str(tmp_path)}
    local = Settings.from_env(base)
    assert local.endpoint_url == "http://127.0.0.1:5000"
    assert local == Settings.from_env({**base, "AWS_ENDPOINT_URL": "http://127.0.0.1:5000"})
    # The variable first, as in boto3; and an endpoint ignored, as boto3 ignores it.
    assert Settings.from_env({**base, "AWS_ENDPOINT_URL": "http://[::1]:5000"}).endpoint_url == "http://[::1]:5000"
    assert Settings.from_env({**base, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}).endpoint_url is None
    with pytest.raises(ValueError, match=re.escape("endpoint_url in the AWS profile 'bad' must be an http://")):
        Settings.from_env({**base, "AWS_PROFILE": "bad"})
    with pytest.raises(ValueError, match="the AWS profile 'split' names endpoints by service"):
        Settings.from_env({**base, "AWS_PROFILE": "split"})


def test_region_is_the_default_without_a_readable_profile(tmp_path):
    (tmp_path / "bad").write_text("[default\nregion = eu-west-3\n")  # no closing bracket
    for env in ({"AWS_CONFIG_FILE": str(tmp_path / "missing")}, {"AWS_CONFIG_FILE": str(tmp_path / "bad")},
                {"AWS_CONFIG_FILE": str(tmp_path / "bad"), "AWS_PROFILE": "nobody"}):
        assert Settings.from_env({"HOME": str(tmp_path), **env}).region == Settings.region


def test_change_visibility_goes_in_tens_and_a_failed_call_fails_only_its_own():
    calls = []

    def change_message_visibility_batch(QueueUrl, Entries):
        calls.append([e["ReceiptHandle"] for e in Entries])
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "down"}},
                              "ChangeMessageVisibilityBatch")
        return {"Failed": [{"Id": e["Id"], "SenderFault": True, "Code": "ReceiptHandleIsInvalid"}
                           for e in Entries if e["ReceiptHandle"] == "r3"]}

    sqs = type("Sqs", (), {"change_message_visibility_batch": staticmethod(change_message_visibility_batch)})
    failures = change_visibility(sqs, "q", [(f"r{n}", 0) for n in range(23)])
    assert [len(c) for c in calls] == [10, 10, 3]
    assert failures[0] == VisibilityFailure("r3", "ReceiptHandleIsInvalid", "ReceiptHandleIsInvalid")
    assert [f.receipt_handle for f in failures[1:]] == [f"r{n}" for n in range(10, 20)]
    assert "ServiceUnavailable" in failures[1].reason
    assert failures[1].code == "ServiceUnavailable"  # the call's own error, for each of its entries


# What real SQS answers ChangeMessageVisibility(Batch) with for a receipt gone stale.
STALE_ON_AWS = ("Value AQEBtwvU5vdRPF3mBg== for parameter ReceiptHandle is invalid. Reason: Message does not "
                "exist or is not available for visibility timeout change.")


@pytest.mark.parametrize(("code", "message", "stale"), [
    ("ReceiptHandleIsInvalid", "The input receipt handle is invalid.", True),  # moto: a deleted message
    ("MessageNotInflight", "The specified message isn't in flight.", True),
    ("AWS.SimpleQueueService.MessageNotInflight", "", True),
    # Real SQS: deleted, or received again since by another receive.
    ("InvalidParameterValue", STALE_ON_AWS, True),
    ("InvalidParameterValue", STALE_ON_AWS.upper().replace(" FOR ", "  for\n"), True),
    ("InvalidParameterValue", "Value AQEB for parameter ReceiptHandle is invalid. Reason: The receipt handle "
                              "has expired.", True),
    # Another InvalidParameterValue: the message may still be this receipt's.
    ("InvalidParameterValue", "Value 43200 for parameter VisibilityTimeout is invalid. Reason: Total "
                              "VisibilityTimeout for the message is beyond the limit [43200 seconds].",
     False),
    ("InvalidParameterValue", "Visibility timeout invalid", False),  # moto's, for a batch entry
    ("InvalidParameterValue", "Value AQEB for parameter ReceiptHandle is invalid. Reason: something else.",
     False),
    ("InvalidParameterValue", "Message does not exist or is not available for visibility timeout change.",
     False),  # not said of the receipt
    ("ServiceUnavailable", STALE_ON_AWS, False),
    ("", "", False),
])
def test_a_stale_receipt_is_told_by_real_sqss_answers_and_by_motos(code, message, stale):
    from common.sqs import is_stale_receipt

    assert is_stale_receipt(code, message) is stale
    assert VisibilityFailure("r", message or code, code).stale is stale


def test_waits_between_failed_tries_start_at_the_first_double_and_stop_at_the_most():
    from common.backoff import next_wait

    waits, wait = [], 0.0
    for _ in range(6):
        wait = next_wait(wait, 1.0, 10.0)
        waits.append(wait)
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert next_wait(0.0, 20.0, 10.0) == 10.0  # a first wait over the most is held to it


def test_the_readme_table_names_every_variable_of_the_settings_table_and_no_other():
    """config.py's docstring promises the README lists each variable. Both ways: a row
    for a variable no longer read misleads as much."""
    from common.config import VARIABLES

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    # A table row's first cell names its variables ("| `WEB_HOST`, `WEB_PORT` | ...").
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", " ".join(cells)))
    # AWS_REGION's other name (region_from_env), and the variables read where they are
    # used, not into Settings (config.py's docstring): the README's last five rows.
    elsewhere = {"AWS_DEFAULT_REGION", "INSTANCE_ID", "IMGCLASS_CACHE", "LOG_LEVEL", "KERAS_HOME",
                 "GUNICORN_CMD_ARGS"}
    table = {variable.name for variable in VARIABLES}
    assert sorted(table - named) == [], "in VARIABLES, not in README's table"
    assert sorted(named - elsewhere - table) == [], "in README's table, not in VARIABLES"
    # What from_env reads by hand is in the table too: a variable read past it is in neither.
    source = (root / "common" / "config.py").read_text(encoding="utf-8")
    read = set(re.findall(r'env(?:\.get\(|\[|, )"([A-Z][A-Z0-9_]+)"', source))
    assert "AWS_ENDPOINT_URL" in read, "the pattern no longer finds how config.py reads the environment"
    # Other programs' variables, read to find what they point at, not the service's settings.
    others = {"AWS_CONFIG_FILE", "AWS_DEFAULT_PROFILE", "AWS_PROFILE", "HOME", "AWS_DEFAULT_REGION",
              "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"}
    assert sorted(read - others - table) == []


# The variables from_env reads by hand: text in the environment, and the setting it makes.
BY_HAND = {"AWS_ENDPOINT_URL": ("http://10.0.0.5:5000", "http://10.0.0.5:5000"),
           "AWS_REGION": ("ap-southeast-2", "ap-southeast-2"),
           "APP_PREFIX": ("myapp", "myapp"),
           "XDG_STATE_HOME": ("/srv/state", "/srv/state/imgclass")}


def other_than_the_default(variable, default) -> str:
    """Text for `variable` that it reads as a value other than `default`, within its bounds,
    written as Variable.text writes it."""
    if variable.choices:
        return next(choice for choice in variable.choices if choice != default)
    if variable.kind is tuple:
        return "sg-1,sg-2"
    if variable.kind is str:
        return f"{default}-other" if default else "other"
    if default is None:  # unset: as another setting (WORKER_ONE_IMAGE_THREADS)
        default = variable.low or 0
    step = 1 if variable.kind is int else 0.5
    value = default + step if variable.high is None or default + step <= variable.high else default - step
    return str(value) if variable.kind is int else f"{value:g}"


def test_every_variable_sets_its_setting_and_a_workers_comes_back_to_the_worker_as_it_was(tmp_path):
    """A setting added to Settings but not read, or given to workers under another name or
    in a form their parser reads otherwise, kept its default where it was meant to change."""
    from common.config import VARIABLES, worker_environment

    home = {"HOME": str(tmp_path)}  # no ~/.aws/config of this machine's to pick a region from
    defaults = Settings.from_env(home)
    assert {variable.name for variable in VARIABLES if variable.by_hand} == set(BY_HAND)
    # Each setting has its variable: a field without one is never set outside tests.
    assert {variable.setting for variable in VARIABLES} == {f.name for f in dataclasses.fields(Settings)}
    env = {variable.name: BY_HAND[variable.name][0] if variable.by_hand
           else other_than_the_default(variable, getattr(defaults, variable.setting))
           for variable in VARIABLES}
    settings = Settings.from_env({**home, **env})
    for variable in VARIABLES:
        value = getattr(settings, variable.setting)
        assert value != getattr(defaults, variable.setting), variable.name
        wanted = BY_HAND[variable.name][1] if variable.by_hand else env[variable.name]
        assert variable.text(settings) == wanted, variable.name

    given = worker_environment(settings)
    assert set(given) == {variable.name for variable in VARIABLES if variable.worker}
    worker = Settings.from_env({**home, **given})
    for variable in VARIABLES:
        if variable.worker:
            assert given[variable.name] == env[variable.name], variable.name
            assert getattr(worker, variable.setting) == getattr(settings, variable.setting), variable.name


@pytest.mark.parametrize("entry, said", [
    (("max_instances", "MAX_WORKERS", int), "setting max_instances"),  # a second entry for a field
    (("instances", "MAX_INSTANCES", int), "name MAX_INSTANCES"),  # one variable for two fields
    (("max_instance", "MAX_INSTANCE", int), "no Settings field max_instance"),  # a misspelt field
])
def test_the_table_of_variables_refuses_a_duplicate_or_a_field_settings_has_not(entry, said):
    from common.config import VARIABLES, Variable, _checked

    with pytest.raises(ValueError, match=said):
        _checked((*VARIABLES, Variable(*entry)))
    assert _checked(VARIABLES) == VARIABLES


@pytest.mark.parametrize("main, argv", [
    ("localaws.stack", ["--warm-spares=--"]),  # not an AttributeError's traceback
    ("controller.main", ["--poll-interval=--"]),  # "got '[]'"
    ("bench.__main__", ["--warm-spares=--"]),
])
def test_an_option_given_double_dash_as_its_value_is_a_usage_error(main, argv, capsys):
    """Python 3.11's argparse gives `--option=--` [] without calling the option's type."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(main).main(argv)
    assert exc.value.code == 2
    assert f"argument {argv[0].split('=')[0]}" in capsys.readouterr().err
