"""/api/jobs: upload several, follow them, survive duplicates, crashes and restarts."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import threading
import time

import pytest

from common.aws import Aws
from common.failure_tags import DEAD_LETTER_ERROR, failure_from_tags
from common.messages import ClassifyRequest, ClassifyResponse
from tests.conftest import make_image
from tests.unit.conftest import FakeWorker, answer_for, services_of, upload, wait_until
from web_tier import events
from web_tier.api import FILES_PER_CHUNK

pytestmark = pytest.mark.timeout(120)


def items_by_name(client, batch_id: str) -> dict[str, dict]:
    response = client.get(f"/api/jobs/{batch_id}")
    assert response.status_code == 200
    return {i["filename"]: i for i in response.get_json()["items"]}


def all_finished(client, batch_id: str) -> bool:
    return all(i["state"] != "queued" for i in items_by_name(client, batch_id).values())


def test_batch_is_queued_then_done(web_app, web_aws):
    client = web_app.test_client()
    files = [(make_image(10 + n), f"photo_{n}.jpg") for n in range(3)]
    response = upload(client, files)
    assert response.status_code == 202
    body = response.get_json()
    assert [i["filename"] for i in body["items"]] == ["photo_0.jpg", "photo_1.jpg", "photo_2.jpg"]
    assert body["rejected"] == []
    batch_id = body["batch_id"]
    assert response.headers["Location"] == f"/api/jobs/{batch_id}"

    before = client.get(f"/api/jobs/{batch_id}").get_json()
    assert [i["state"] for i in before["items"]] == ["queued"] * 3
    assert set(before["items"][0]) >= {"id", "filename", "state", "label", "score", "top5", "error"}

    worker = FakeWorker(web_aws).start()
    try:
        wait_until(lambda: all_finished(client, batch_id))
    finally:
        worker.stop()
    after = client.get(f"/api/jobs/{batch_id}").get_json()
    assert after["untrained"] is False
    for (data, name), item in zip(files, after["items"], strict=True):
        label, score = answer_for(data)
        assert item["filename"] == name
        assert item["state"] == "done"
        assert item["label"] == label
        assert item["score"] == pytest.approx(score)
        assert item["top5"][0] == {"label": label, "score": pytest.approx(score)}
        assert len(item["top5"]) == 5


def test_upload_objects_and_requests_follow_the_contract(web_client, web_aws):
    response = upload(web_client, [(make_image(20, fmt="PNG"), "Ünïcode name.png")])
    item = response.get_json()["items"][0]
    batch_id = response.get_json()["batch_id"]
    settings = web_aws.settings
    key = f"{batch_id}/{item['id']}/Unicode_name.png"
    head = web_aws.s3.head_object(Bucket=settings.input_bucket, Key=key)
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["original-filename"] == "%C3%9Cn%C3%AFcode%20name.png"
    assert head["Metadata"]["batch-id"] == batch_id
    assert head["Metadata"]["item-id"] == item["id"]
    got = web_aws.sqs.receive_message(QueueUrl=web_aws.request_queue_url, WaitTimeSeconds=1)
    request = ClassifyRequest.from_json(got["Messages"][0]["Body"])
    assert (request.id, request.bucket, request.key, request.filename) == (
        item["id"], settings.input_bucket, key, "Ünïcode name.png")


def test_duplicate_responses_count_once(web_app, fake_worker, web_aws):
    fake_worker.policy = lambda request: "twice"
    client = web_app.test_client()
    batch_id = upload(client, [(make_image(30), "dup.jpg")]).get_json()["batch_id"]
    wait_until(lambda: all_finished(client, batch_id))

    def queue_drained() -> bool:
        attrs = web_aws.sqs.get_queue_attributes(
            QueueUrl=web_aws.response_queue_url, AttributeNames=["All"])["Attributes"]
        return attrs["ApproximateNumberOfMessages"] == attrs["ApproximateNumberOfMessagesNotVisible"] == "0"

    wait_until(lambda: fake_worker.handled == 1 and queue_drained())
    items = client.get(f"/api/jobs/{batch_id}").get_json()["items"]
    assert len(items) == 1
    assert services_of(web_app).book.totals() == {"uploaded": 1, "answered": 1, "failed": 0}


def test_dead_letter_marks_the_item_failed(web_app, web_aws):
    client = web_app.test_client()
    body = upload(client, [(make_image(40), "poison.jpg")]).get_json()
    batch_id = body["batch_id"]
    # As if the request had crashed a worker on every attempt.
    got = web_aws.sqs.receive_message(QueueUrl=web_aws.request_queue_url, WaitTimeSeconds=1)
    message = got["Messages"][0]
    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=message["Body"])
    web_aws.sqs.delete_message(QueueUrl=web_aws.request_queue_url, ReceiptHandle=message["ReceiptHandle"])

    wait_until(lambda: all_finished(client, batch_id))
    failed = items_by_name(client, batch_id)["poison.jpg"]
    assert failed["state"] == "failed"
    assert failed["error"] == DEAD_LETTER_ERROR
    key = ClassifyRequest.from_json(message["Body"]).key

    def marked() -> str | None:
        tag_set = web_aws.s3.get_object_tagging(Bucket=web_aws.settings.input_bucket, Key=key)["TagSet"]
        return failure_from_tags(tag_set)

    # The item is marked failed first, then its input object is tagged (for a rebuilt book).
    wait_until(lambda: marked() == DEAD_LETTER_ERROR)
    wait_until(lambda: web_aws.sqs.get_queue_attributes(
        QueueUrl=web_aws.dead_letter_queue_url, AttributeNames=["All"]
    )["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0")
    attrs = web_aws.sqs.get_queue_attributes(QueueUrl=web_aws.dead_letter_queue_url, AttributeNames=["All"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"


def dead_letter(web_aws, last_attempt=None) -> ClassifyRequest:
    """Move the next request to the dead-letter queue, as SQS does after max_receive_count
    (after `last_attempt(request)`, what the last worker to receive it did). Waited for:
    an upload in another thread (a `POST /` waiting for its answer) may not have sent it
    yet on a loaded machine, where one receive of a second missed it (CI)."""
    messages = wait_until(lambda: web_aws.sqs.receive_message(
        QueueUrl=web_aws.request_queue_url, WaitTimeSeconds=1).get("Messages"))
    message = messages[0]
    if last_attempt is not None:
        last_attempt(ClassifyRequest.from_json(message["Body"]))
    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=message["Body"])
    web_aws.sqs.delete_message(QueueUrl=web_aws.request_queue_url, ReceiptHandle=message["ReceiptHandle"])
    return ClassifyRequest.from_json(message["Body"])


def dead_letters_left(web_aws) -> int:
    """The dead letters still queued, visible or not."""
    attrs = web_aws.sqs.get_queue_attributes(QueueUrl=web_aws.dead_letter_queue_url,
                                             AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_a_dead_letter_whose_object_cannot_be_marked_still_answers_the_client(web_app, web_aws,
                                                                              monkeypatch):
    """S3 refusing the failure tag must not leave POST / waiting: the book is told first,
    and the message stays until the tag is written."""
    from botocore.exceptions import ClientError

    client = web_app.test_client()
    batch_id = upload(client, [(make_image(41), "poison.jpg")]).get_json()["batch_id"]
    tag = web_aws.s3.put_object_tagging
    attempts = []

    def s3_refuses_once(**kwargs):
        attempts.append(kwargs["Key"])
        if len(attempts) == 1:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "S3 hiccup"}},
                              "PutObjectTagging")
        return tag(**kwargs)

    monkeypatch.setattr(web_aws.s3, "put_object_tagging", s3_refuses_once)
    request = dead_letter(web_aws)
    wait_until(lambda: all_finished(client, batch_id))
    assert items_by_name(client, batch_id)["poison.jpg"]["error"] == DEAD_LETTER_ERROR
    wait_until(lambda: attempts)
    assert dead_letters_left(web_aws) == 1  # kept: the lasting record is not written yet
    # SQS hands the message back after its visibility timeout: handled again, it is marked.
    services_of(web_app).listeners.dead_letters.answer(request, first_received=time.time())
    tags = web_aws.s3.get_object_tagging(Bucket=web_aws.settings.input_bucket, Key=request.key)["TagSet"]
    assert failure_from_tags(tags) == DEAD_LETTER_ERROR


@pytest.mark.parametrize("code", ["InvalidTag", "MalformedXML", "InvalidArgument"])
def test_a_dead_letter_whose_mark_s3_refuses_for_good_is_dropped(web_app, web_aws, monkeypatch, code):
    """A refusal no retry changes (a tag S3 will not take) must not keep the message, to
    come back every visibility timeout for the queue's 14 days, each time a traceback."""
    from botocore.exceptions import ClientError

    client = web_app.test_client()
    batch_id = upload(client, [(make_image(42), "poison.jpg")]).get_json()["batch_id"]
    attempts = []

    def s3_refuses(**kwargs):
        attempts.append(kwargs["Key"])
        raise ClientError({"Error": {"Code": code, "Message": "no"}}, "PutObjectTagging")

    monkeypatch.setattr(web_aws.s3, "put_object_tagging", s3_refuses)
    dead_letter(web_aws)
    wait_until(lambda: all_finished(client, batch_id))
    assert items_by_name(client, batch_id)["poison.jpg"]["error"] == DEAD_LETTER_ERROR
    wait_until(lambda: dead_letters_left(web_aws) == 0, why=lambda: f"tagging tried {len(attempts)} times")
    assert len(attempts) == 1


def deny_tagging(web_aws, monkeypatch, times: int | None) -> list[str]:
    """S3 answers the web tier's PutObjectTagging with AccessDenied `times` times (None:
    always), as while a role's new policy is still reaching every endpoint; the keys it
    was asked to tag, in order. The dead-letter queue hands a message back after 1 s."""
    from botocore.exceptions import ClientError

    web_aws.sqs.set_queue_attributes(QueueUrl=web_aws.dead_letter_queue_url,
                                     Attributes={"VisibilityTimeout": "1"})
    tag, attempts = web_aws.s3.put_object_tagging, []

    def denied(**kwargs):
        attempts.append(kwargs["Key"])
        if times is None or len(attempts) <= times:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                              "PutObjectTagging")
        return tag(**kwargs)

    monkeypatch.setattr(web_aws.s3, "put_object_tagging", denied)
    return attempts


def test_a_dead_letter_whose_mark_is_denied_for_a_while_is_marked_once_allowed(web_app, web_aws,
                                                                               monkeypatch, caplog):
    """AccessDenied was taken as for ever: on real AWS a policy just attached is denied
    for a while, and the dead letter's item, left unmarked, showed queued for ever in a
    batch rebuilt after a restart."""
    client = web_app.test_client()
    batch_id = upload(client, [(make_image(46), "poison.jpg")]).get_json()["batch_id"]
    attempts = deny_tagging(web_aws, monkeypatch, times=2)
    request = dead_letter(web_aws)
    wait_until(lambda: all_finished(client, batch_id))  # the client is told at once
    assert items_by_name(client, batch_id)["poison.jpg"]["error"] == DEAD_LETTER_ERROR
    wait_until(lambda: dead_letters_left(web_aws) == 0, why=lambda: f"tagging tried {len(attempts)} times")
    tags = web_aws.s3.get_object_tagging(Bucket=web_aws.settings.input_bucket, Key=request.key)["TagSet"]
    assert failure_from_tags(tags) == DEAD_LETTER_ERROR
    assert attempts == [request.key] * 3
    denials = [r for r in caplog.records if "s3:PutObjectTagging" in r.getMessage()]
    assert [r.levelname for r in denials] == ["WARNING", "WARNING"]  # one a retry
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]


def test_a_dead_letter_whose_mark_is_denied_past_the_bound_is_given_up(web_app, web_aws, monkeypatch, caplog):
    """A role that truly lacks s3:PutObjectTagging: tried again until MARK_DENIED_RETRY_S
    after the message's first receive, then given up, the message deleted and the item
    failed as ever, the log saying which right is missing."""
    import common.failure_tags

    client = web_app.test_client()
    batch_id = upload(client, [(make_image(47), "poison.jpg")]).get_json()["batch_id"]
    attempts = deny_tagging(web_aws, monkeypatch, times=None)
    request = dead_letter(web_aws)
    wait_until(lambda: len(attempts) >= 2)  # within the bound: the message came back
    assert dead_letters_left(web_aws) == 1
    assert items_by_name(client, batch_id)["poison.jpg"]["error"] == DEAD_LETTER_ERROR
    monkeypatch.setattr(common.failure_tags, "MARK_DENIED_RETRY_S", 0)  # the bound has passed
    wait_until(lambda: dead_letters_left(web_aws) == 0, why=lambda: f"tagging tried {len(attempts)} times")
    tags = web_aws.s3.get_object_tagging(Bucket=web_aws.settings.input_bucket, Key=request.key)["TagSet"]
    assert failure_from_tags(tags) is None
    assert items_by_name(client, batch_id)["poison.jpg"]["error"] == DEAD_LETTER_ERROR
    [given_up] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "gave up marking its input failed" in given_up
    assert f"s3:PutObjectTagging on arn:aws:s3:::{web_aws.settings.input_bucket}/*" in given_up
    assert not [r for r in caplog.records if r.exc_info]


def test_a_dead_letter_that_fails_other_than_by_aws_is_failed_and_dropped(web_app, web_aws, monkeypatch):
    """Handled again, it fails the same way: such a dead letter would come back every
    30 s for the queue's 14 days, its item queued all along."""
    from botocore.exceptions import ParamValidationError

    import web_tier.dead_letters

    failures = iter([UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
                     ParamValidationError(report="Invalid length for parameter Key")])

    def trips(aws, item):
        raise next(failures)

    monkeypatch.setattr(web_tier.dead_letters, "with_stored_outcome", trips)
    client = web_app.test_client()
    for n in range(2):  # one failure of each kind
        batch_id = upload(client, [(make_image(43 + n), "trips.jpg")]).get_json()["batch_id"]
        dead_letter(web_aws)
        wait_until(lambda b=batch_id: all_finished(client, b))
        assert items_by_name(client, batch_id)["trips.jpg"]["error"] == DEAD_LETTER_ERROR
        wait_until(lambda: dead_letters_left(web_aws) == 0)


def test_a_dead_letter_for_a_deleted_object_is_done_with(web_app, web_aws):
    """An input object already gone (expired, deleted) has nothing to mark: the item
    fails and the message is deleted, rather than coming back for 14 days."""
    client = web_app.test_client()
    batch_id = upload(client, [(make_image(42), "gone.jpg")]).get_json()["batch_id"]
    objects = web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket, Prefix=batch_id)["Contents"]
    web_aws.s3.delete_object(Bucket=web_aws.settings.input_bucket, Key=objects[0]["Key"])
    dead_letter(web_aws)
    wait_until(lambda: all_finished(client, batch_id))
    assert items_by_name(client, batch_id)["gone.jpg"]["error"] == DEAD_LETTER_ERROR
    wait_until(lambda: dead_letters_left(web_aws) == 0)


def test_a_stopping_web_tier_leaves_the_answers_to_the_process_that_serves(make_web_app, web_aws):
    """Its listeners must stop at SIGTERM: during a reload, the answers they would delete
    are the new process's."""
    old = make_web_app()
    services_of(old).book.close()  # SIGTERM
    wait_until(lambda: not services_of(old).listeners.running)
    answer = ClassifyResponse(id="a" * 32, filename="x.jpg", key=f"{'b' * 32}/{'a' * 32}/x.jpg",
                              worker="w", untrained=False, label="cat", score=0.5)
    web_aws.sqs.send_message(QueueUrl=web_aws.response_queue_url, MessageBody=answer.to_json())
    new = make_web_app()
    wait_until(lambda: services_of(new).book.get("a" * 32) is not None)
    assert services_of(old).book.get("a" * 32) is None


def test_a_dead_letter_that_names_no_object_is_dropped_not_retried_for_ever(web_app, web_aws, caplog):
    """A hand-made request with an empty key: S3's client refuses it before sending, and
    the web tier must not log a traceback every 30 s while it stays queued."""
    body = {"id": "x5", "bucket": web_aws.settings.input_bucket, "key": "", "filename": "", "sent_at": 0}
    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=json.dumps(body))
    web_app.test_client()  # the listeners run from here on
    wait_until(lambda: dead_letters_left(web_aws) == 0)
    assert "dropping malformed dead letter" in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "a traceback logged"


def test_a_dead_letters_failure_gives_way_to_another_copy_answered_after_it(web_app, web_aws):
    """A request can be queued twice (a journal's requeue, a hand-back SQS would not
    delete): one copy dead-lettered, the other answered after. The item must not stay
    failed, the label in the output bucket for nobody."""
    client = web_app.test_client()
    data = make_image(44)
    batch_id = upload(client, [(data, "twice.jpg")]).get_json()["batch_id"]
    request = dead_letter(web_aws)
    wait_until(lambda: all_finished(client, batch_id))
    assert items_by_name(client, batch_id)["twice.jpg"]["error"] == DEAD_LETTER_ERROR
    book = services_of(web_app).book
    assert (book.answered, book.failed) == (0, 1)
    failed = book.get(request.id)
    FakeWorker(web_aws).handle(request)  # the other copy
    wait_until(lambda: items_by_name(client, batch_id)["twice.jpg"]["state"] == "done")
    assert items_by_name(client, batch_id)["twice.jpg"]["label"] == answer_for(data)[0]
    assert (book.answered, book.failed) == (1, 0)
    # Replaced, not changed: a reader holding the failed item reads it whole.
    assert (failed.state, failed.error, failed.label) == ("failed", DEAD_LETTER_ERROR, None)
    # A second dead letter of it changes nothing now.
    assert book.fail(request.id, DEAD_LETTER_ERROR, key=request.key) is None


def test_a_dead_letters_failure_rebuilt_from_s3_gives_way_too(make_web_app, web_aws):
    """Read back from the input object's tags after a restart, the failure must not be
    final, the other copy's answer ignored."""
    old = make_web_app()
    client = old.test_client()
    data = make_image(45)
    batch_id = upload(client, [(data, "later.jpg")]).get_json()["batch_id"]
    request = dead_letter(web_aws)
    key = request.key
    wait_until(lambda: failure_from_tags(web_aws.s3.get_object_tagging(
        Bucket=web_aws.settings.input_bucket, Key=key)["TagSet"]) == DEAD_LETTER_ERROR)
    services_of(old).stop(timeout=5)

    fresh = make_web_app().test_client()
    assert items_by_name(fresh, batch_id)["later.jpg"]["state"] == "failed"  # rebuilt from S3
    FakeWorker(web_aws).handle(request)  # the other copy
    wait_until(lambda: items_by_name(fresh, batch_id)["later.jpg"]["state"] == "done")
    # The totals count what this process heard: the answer, not the failure read from S3
    # (else they read failed: -1).
    assert fresh.get("/api/status").get_json()["totals"] == {"uploaded": 0, "answered": 1, "failed": 0}


def test_a_dead_letter_whose_result_was_stored_but_never_sent_is_answered_with_it(web_app, web_aws):
    """A worker writes the result, then replies: one killed in between, on the last
    attempt, leaves a result in S3 that no response carries. The item must not
    wait for ever, nor be called failed."""
    client = web_app.test_client()
    data = make_image(43)
    batch_id = upload(client, [(data, "answered.jpg")]).get_json()["batch_id"]
    died_before_replying = FakeWorker(web_aws)
    died_before_replying.policy = lambda request: "mute"
    request = dead_letter(web_aws, last_attempt=died_before_replying.handle)
    wait_until(lambda: all_finished(client, batch_id))
    item = items_by_name(client, batch_id)["answered.jpg"]
    assert (item["state"], item["label"]) == ("done", answer_for(data)[0])
    assert item["score"] == pytest.approx(answer_for(data)[1]) and item["worker"] == "fake-1"
    wait_until(lambda: dead_letters_left(web_aws) == 0)
    tags = web_aws.s3.get_object_tagging(Bucket=web_aws.settings.input_bucket, Key=request.key)["TagSet"]
    assert tags == []  # not marked failed: a rebuilt batch shows the result too
    assert services_of(web_app).book.totals() == {"uploaded": 1, "answered": 1, "failed": 0}


def test_a_dead_letter_a_worker_marked_failed_keeps_the_workers_reason(web_app, web_aws):
    client = web_app.test_client()
    batch_id = upload(client, [(make_image(44), "marked.jpg")]).get_json()["batch_id"]
    died_before_replying = FakeWorker(web_aws)
    died_before_replying.policy = lambda request: "mute-fail"
    dead_letter(web_aws, last_attempt=died_before_replying.handle)
    wait_until(lambda: all_finished(client, batch_id))
    item = items_by_name(client, batch_id)["marked.jpg"]
    assert (item["state"], item["error"]) == ("failed", "cannot decode")
    wait_until(lambda: dead_letters_left(web_aws) == 0)


def test_fresh_app_rebuilds_a_batch_from_s3(make_web_app, fake_worker, web_aws):
    old = make_web_app()
    client = old.test_client()
    fake_worker.policy = lambda r: {"bad.jpg": "fail", "pending.jpg": "ignore"}.get(r.filename, "ok")
    files = [(make_image(50), "ok 1.jpg"), (make_image(51), "bad.jpg"), (make_image(52), "pending.jpg"),
             (make_image(53), "δοκιμή.png")]
    batch_id = upload(client, files).get_json()["batch_id"]
    wait_until(lambda: fake_worker.handled == 4)
    wait_until(lambda: sum(i["state"] != "queued" for i in items_by_name(client, batch_id).values()) == 3)
    before = items_by_name(client, batch_id)
    services_of(old).stop(timeout=5)

    fresh = make_web_app(start_background=False).test_client()
    rebuilt = fresh.get(f"/api/jobs/{batch_id}").get_json()
    assert rebuilt["batch_id"] == batch_id
    after = {i["filename"]: i for i in rebuilt["items"]}
    assert set(after) == {"ok 1.jpg", "bad.jpg", "pending.jpg", "δοκιμή.png"}
    assert after["pending.jpg"]["state"] == "queued"
    assert after["bad.jpg"]["state"] == "failed"
    assert after["bad.jpg"]["error"] == "cannot decode"
    # Which worker refused it, kept across the restart, not "".
    assert after["bad.jpg"]["worker"] == before["bad.jpg"]["worker"] == "fake-1"
    for name in ("ok 1.jpg", "δοκιμή.png"):
        assert after[name]["state"] == "done"
        for field in ("id", "label", "worker", "untrained"):
            assert after[name][field] == before[name][field], field
        # The same digits (a client comparing scores across a restart saw them differ).
        assert after[name]["score"] == before[name]["score"]
        assert after[name]["top5"] == before[name]["top5"]
    # Cached: a second GET does not list S3 again.
    web_aws.s3.delete_object(Bucket=web_aws.settings.input_bucket,
                             Key=f"{batch_id}/{after['ok 1.jpg']['id']}/ok_1.jpg")
    assert len(fresh.get(f"/api/jobs/{batch_id}").get_json()["items"]) == 4


def test_a_rebuild_reads_tags_and_results_only_where_s3_has_them(make_web_app, fake_worker, web_aws):
    """Three S3 calls an item make a 150-item batch slow to show after a restart: an
    input object's HEAD counts its tags, and a listing of the output bucket says which
    items have a result, so an item answered (never failed or sent again) costs two
    calls, and one still queued one."""
    from common.failure_tags import SentAgain
    from web_tier.storage import clear_failed

    client = make_web_app().test_client()
    fake_worker.policy = lambda r: {"bad.jpg": "fail", "pending.jpg": "ignore"}.get(r.filename, "ok")
    files = [(make_image(60), "ok.jpg"), (make_image(61), "bad.jpg"), (make_image(62), "pending.jpg"),
             (make_image(63), "again.jpg")]
    batch_id = upload(client, files).get_json()["batch_id"]
    wait_until(lambda: sum(i["state"] != "queued" for i in items_by_name(client, batch_id).values()) == 3)
    again = items_by_name(client, batch_id)["again.jpg"]
    # As a dead letter sent again, then answered, leaves it: tagged and with a result.
    clear_failed(web_aws, f"{batch_id}/{again['id']}/again.jpg", SentAgain(2, 1700000000.0))

    calls: list[tuple[str, str]] = []

    def count(model, params, **_):
        calls.append((model.name, params.get("Bucket", "")))

    web_aws.s3.meta.events.register("before-parameter-build.s3", count)
    try:
        after = {i["filename"]: i for i in make_web_app(start_background=False).test_client()
                 .get(f"/api/jobs/{batch_id}").get_json()["items"]}
    finally:
        web_aws.s3.meta.events.unregister("before-parameter-build.s3", count)
    assert {name: item["state"] for name, item in after.items()} == {
        "ok.jpg": "done", "bad.jpg": "failed", "pending.jpg": "queued", "again.jpg": "done"}
    assert after["bad.jpg"]["error"] == "cannot decode" and after["bad.jpg"]["worker"] == "fake-1"
    assert (after["again.jpg"]["sent_again"], after["again.jpg"]["label"]) == (2, again["label"])
    inputs, outputs = web_aws.settings.input_bucket, web_aws.settings.output_bucket
    assert sorted(calls) == sorted([("ListObjectsV2", inputs), ("ListObjectsV2", outputs)]
                                   + [("HeadObject", inputs)] * 4
                                   + [("GetObjectTagging", inputs)] * 2  # bad.jpg and again.jpg
                                   + [("HeadObject", outputs)] * 2)  # ok.jpg and again.jpg


def test_an_object_deleted_while_its_batch_is_rebuilt_is_left_out(make_web_app, web_aws, monkeypatch):
    """Gone between the listing and its HEAD (an upload refused and its object deleted
    meanwhile), it must not fail the whole rebuild, the batch answered 503."""
    import web_tier.rebuild as rebuild_module

    files = [(make_image(56), "a.jpg"), (make_image(57), "gone.jpg")]
    batch_id = upload(make_web_app(start_background=False).test_client(), files).get_json()["batch_id"]
    real_list = rebuild_module.list_keys

    def list_then_one_is_deleted(aws, batch):
        keys = real_list(aws, batch)
        aws.s3.delete_object(Bucket=aws.settings.input_bucket, Key=keys[1])
        return keys

    monkeypatch.setattr(rebuild_module, "list_keys", list_then_one_is_deleted)
    rebuilt = make_web_app(start_background=False).test_client().get(f"/api/jobs/{batch_id}")
    assert rebuilt.status_code == 200, rebuilt.get_json()
    assert [i["filename"] for i in rebuilt.get_json()["items"]] == ["a.jpg"]

    # Every one gone: no such batch, not an empty one kept in the book.
    def list_then_all_are_deleted(aws, batch):
        keys = real_list(aws, batch)
        for key in keys:
            aws.s3.delete_object(Bucket=aws.settings.input_bucket, Key=key)
        return keys

    monkeypatch.setattr(rebuild_module, "list_keys", list_then_all_are_deleted)
    assert make_web_app(start_background=False).test_client().get(f"/api/jobs/{batch_id}").status_code == 404


def test_a_batch_is_rebuilt_once_however_many_ask_and_holds_up_no_upload(make_web_app, monkeypatch):
    """A page polling a 1,500-item batch across a restart must not start a whole rebuild
    every 2 s on the upload pool: 2-file uploads behind them would take a minute."""
    import web_tier.rebuild as rebuild_module

    old = make_web_app(start_background=False)
    files = [(make_image(54), "a.jpg"), (make_image(55), "b.jpg")]
    batch_id = upload(old.test_client(), files).get_json()["batch_id"]
    fresh = make_web_app(start_background=False)
    svc = services_of(fresh)
    rebuild, calls, release = rebuild_module.rebuild_batch, [], threading.Event()

    def slow_rebuild(aws, batch, pool):
        calls.append(pool)
        assert release.wait(30)
        return rebuild(aws, batch, pool)

    monkeypatch.setattr(rebuild_module, "rebuild_batch", slow_rebuild)
    answers: list[int] = []
    readers = [threading.Thread(target=lambda: answers.append(len(fresh.test_client().get(
        f"/api/jobs/{batch_id}").get_json()["items"]))) for _ in range(5)]
    for reader in readers:
        reader.start()
    wait_until(lambda: calls)
    # Meanwhile a 2-file upload, which runs on the upload pool, is not held up.
    sent = upload(fresh.test_client(), [(make_image(56), "c.jpg"), (make_image(57), "d.jpg")])
    assert sent.status_code == 202
    release.set()
    for reader in readers:
        reader.join(30)
    assert answers == [2] * 5 and len(calls) == 1 and calls[0] is not svc.pool


def test_a_batch_rebuilt_from_s3_keeps_the_upload_order(make_web_app):
    # Stored concurrently (so in any order), in more than one chunk of FILES_PER_CHUNK,
    # then more added to the batch by a second request.
    names = [f"{n:02d}_{chr(ord('z') - n)}.jpg" for n in range(FILES_PER_CHUNK + 6)]
    first, then = names[:-3], names[-3:]
    client = make_web_app(start_background=False).test_client()
    sent = upload(client, [(make_image(60 + n), name) for n, name in enumerate(first)]).get_json()
    batch_id = sent["batch_id"]
    files = [(io.BytesIO(make_image(90 + n)), name) for n, name in enumerate(then)]
    more = client.post("/api/jobs", content_type="multipart/form-data",
                       data={"batch_id": batch_id, "files": files})
    assert more.status_code == 202
    fresh = make_web_app(start_background=False).test_client()
    rebuilt = fresh.get(f"/api/jobs/{batch_id}").get_json()["items"]
    assert [i["filename"] for i in rebuilt] == names
    assert [i["id"] for i in rebuilt] == [i["id"] for i in sent["items"] + more.get_json()["items"]]


@pytest.mark.parametrize("weights", ["random", "imagenet"])
def test_a_stored_result_that_does_not_say_its_model_is_flagged_as_the_configured_one(web_aws, weights):
    """An output written by something other than this service's workers (the contract's
    bare `<name>,<label>`): its label is kept, and with MODEL_WEIGHTS=random it is
    flagged untrained rather than passed off as trained."""
    from web_tier.rebuild import with_stored_outcome
    from web_tier.results import Item

    aws = Aws(dataclasses.replace(web_aws.settings, model_weights=weights))
    aws.s3.put_object(Bucket=aws.settings.output_bucket, Key="b/i/cat.jpg", Body=b"cat,tabby")
    aws.s3.put_object(Bucket=aws.settings.output_bucket, Key="b/i/dog.jpg", Body=b"dog,beagle",
                      Metadata={"result": json.dumps({"label": "beagle", "score": 0.5})})
    for key, label in (("b/i/cat.jpg", "tabby"), ("b/i/dog.jpg", "beagle")):
        item = with_stored_outcome(aws, Item(key.split("/")[1], "b", "x", key))
        assert item.label == label
        assert item.untrained is (weights == "random")


def test_answers_after_a_restart_are_kept_for_unknown_ids(make_web_app, web_aws):
    old = make_web_app(start_background=False)
    batch_id = upload(old.test_client(), [(make_image(60), "late.jpg")]).get_json()["batch_id"]
    fresh = make_web_app()  # listens; knows nothing of the batch
    worker = FakeWorker(web_aws).start()
    try:
        wait_until(lambda: services_of(fresh).book.totals()["answered"] == 1)
    finally:
        worker.stop()
    item = items_by_name(fresh.test_client(), batch_id)["late.jpg"]
    assert item["state"] == "done"


def test_unknown_and_malformed_batches_are_404(web_client):
    for batch_id in ("0" * 32, "not-a-batch", "A" * 32, "../../etc/passwd"):
        for suffix in ("", "/events"):
            response = web_client.get(f"/api/jobs/{batch_id}{suffix}")
            assert response.status_code == 404, (batch_id, suffix)
            assert response.is_json
            assert "error" in response.get_json()


def test_chunks_can_join_an_existing_batch(web_client):
    first = upload(web_client, [(make_image(70), "a.jpg")]).get_json()
    second = upload(web_client, [(make_image(71), "b.jpg")], batch_id=first["batch_id"])
    assert second.status_code == 202
    assert second.get_json()["batch_id"] == first["batch_id"]
    assert set(items_by_name(web_client, first["batch_id"])) == {"a.jpg", "b.jpg"}
    unknown = upload(web_client, [(make_image(72), "c.jpg")], batch_id="f" * 32)
    assert unknown.status_code == 404
    # A client making a batch of its own id needs `create` too: said.
    assert unknown.get_json()["error"] == f"no such batch: {'f' * 32} (send create=1 to make it)"



# --- Sending a request again under its tokens ------------------------------------------
def stored_keys(aws: Aws, batch_id: str) -> list[str]:
    listed = aws.s3.list_objects_v2(Bucket=aws.settings.input_bucket, Prefix=f"{batch_id}/")
    return [o["Key"] for o in listed.get("Contents", [])]


def send_with_tokens(client, batch_id: str, files: list[tuple[bytes, str]], tokens: list[str]):
    return upload(client, files, batch_id=batch_id, create="1", tokens=tokens)


def test_a_first_request_sent_again_under_its_tokens_stores_nothing_twice(make_web_app, web_aws):
    """A page whose connection was cut after the server stored its files (a web tier
    killed mid-answer) cannot know they were: it sends them again, under the same batch
    id and tokens, and they are neither stored nor classified twice, nor in a second batch."""
    client = make_web_app(start_background=False).test_client()
    batch_id = "c" * 32
    files = [(make_image(700), "a.jpg"), (make_image(701), "b.jpg")]
    first = send_with_tokens(client, batch_id, files, ["0", "1"])
    assert first.status_code == 202 and first.get_json()["batch_id"] == batch_id
    assert not any(i["again"] for i in first.get_json()["items"])

    again = send_with_tokens(client, batch_id, files, ["0", "1"])
    assert again.status_code == 202
    assert [(i["id"], i["again"]) for i in again.get_json()["items"]] == [
        (i["id"], True) for i in first.get_json()["items"]]
    assert len(stored_keys(web_aws, batch_id)) == 2
    assert len(items_by_name(client, batch_id)) == 2
    queued = web_aws.sqs.get_queue_attributes(QueueUrl=web_aws.request_queue_url,
                                              AttributeNames=["ApproximateNumberOfMessages"])
    assert queued["Attributes"]["ApproximateNumberOfMessages"] == "2"

    # A new token in the same request is stored; the known one is not.
    more = send_with_tokens(client, batch_id, [files[0], (make_image(702), "c.jpg")], ["0", "2"])
    assert [i["again"] for i in more.get_json()["items"]] == [True, False]
    assert len(stored_keys(web_aws, batch_id)) == 3


def test_tokens_are_known_to_a_web_tier_restarted_since(make_web_app, web_aws):
    """The page sends again to whichever web tier answers: one started since finds the
    batch, and the files' tokens, in S3."""
    batch_id = "d" * 32
    files = [(make_image(710), "a.jpg")]
    first = send_with_tokens(make_web_app(start_background=False).test_client(), batch_id, files, ["t-0"])
    fresh = make_web_app(start_background=False).test_client()
    again = send_with_tokens(fresh, batch_id, files, ["t-0"])
    assert again.get_json()["items"][0]["id"] == first.get_json()["items"][0]["id"]
    assert again.get_json()["items"][0]["again"] is True
    assert len(stored_keys(web_aws, batch_id)) == 1


def test_a_batchs_items_say_their_tokens_also_after_a_restart(make_web_app, web_aws):
    """A page reloaded before it heard its files stored finds them by token: by name, one
    the server cleaned (" a.jpg " kept as "a.jpg") was shown twice, failed and done."""
    batch_id = "f" * 32
    files = [(make_image(714), " a\u202e.jpg "), (make_image(715), "b.jpg")]
    client = make_web_app(start_background=False).test_client()
    send_with_tokens(client, batch_id, files, ["0", "1"])
    upload(client, [(make_image(716), "c.jpg")], batch_id=batch_id)  # no token
    fresh = make_web_app(start_background=False).test_client()  # rebuilt from S3
    for web in (client, fresh):
        assert {name: item["token"] for name, item in items_by_name(web, batch_id).items()} == {
            "a.jpg": "0", "b.jpg": "1", "c.jpg": ""}


def test_a_long_name_answered_before_its_batch_was_rebuilt_keeps_its_token(make_web_app, web_aws):
    """A message carries at most 160 bytes of a name. A restarted web tier learns the
    item from its answer, with the name cut: kept when it rebuilds the batch from S3, the
    file sent again under its token would be refused (409) as another file, and the
    batch show the cut name for good."""
    batch_id = "e" * 32
    name = "photo-" + "x" * 300 + ".jpg"
    first = send_with_tokens(make_web_app(start_background=False).test_client(), batch_id,
                             [(make_image(712), name)], ["t-0"])
    item_id = first.get_json()["items"][0]["id"]
    fresh_app = make_web_app(start_background=False)
    answer = ClassifyResponse(id=item_id, filename=name, key=stored_keys(web_aws, batch_id)[0],
                              worker="w", untrained=True, label="cat", score=0.5)
    services_of(fresh_app).book.record(ClassifyResponse.from_json(answer.to_json()))  # as sent: cut

    fresh = fresh_app.test_client()
    again = send_with_tokens(fresh, batch_id, [(make_image(712), name)], ["t-0"])
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["items"][0]["id"] == item_id and again.get_json()["items"][0]["again"] is True
    assert list(items_by_name(fresh, batch_id)) == [name]
    assert len(stored_keys(web_aws, batch_id)) == 1


def test_a_full_request_with_a_token_per_file_is_taken(make_web_app, web_aws):
    """Werkzeug counts a file and its token as two parts: past 549 of the 1,000 files
    allowed, a request with tokens must not be a 413 saying the limit is 1,000."""
    count = 120  # enough for 2 parts a file to pass the old allowance of count + 100
    client = make_web_app(start_background=False, max_files_per_request=count).test_client()
    image = make_image(760, size=(48, 48))
    response = send_with_tokens(client, "9" * 32, [(image, f"f{n}.jpg") for n in range(count)],
                                [str(n) for n in range(count)])
    assert response.status_code == 202, response.get_json()
    assert len(response.get_json()["items"]) == count


def test_a_token_used_again_for_another_file_is_refused_not_taken_for_a_resend(web_client, web_aws):
    """The second file must not be dropped, answered as "again" with the first file's item."""
    batch_id = "8" * 32
    send_with_tokens(web_client, batch_id, [(make_image(770), "first.jpg")], ["x"])
    other = send_with_tokens(web_client, batch_id, [(make_image(771), "second.jpg")], ["x"])
    assert other.status_code == 409
    assert "already names another file in this batch (first.jpg)" in other.get_json()["error"]
    assert len(stored_keys(web_aws, batch_id)) == 1


def test_a_file_sent_again_under_its_token_is_the_same_file_whatever_its_names_unicode_form(web_client,
                                                                                           web_aws):
    """macOS's disk gives names decomposed (e + U+0301), other clients composed (U+00E9):
    the same file sent again with its token was refused 409 as another file, and its
    client, told to give it a token of its own, had it classified twice."""
    batch_id = "6" * 32
    image = make_image(774)
    first = send_with_tokens(web_client, batch_id, [(image, "caf\u00e9.jpg")], ["x"])
    again = send_with_tokens(web_client, batch_id, [(image, "cafe\u0301.jpg")], ["x"])
    assert first.status_code == again.status_code == 202, again.get_json()
    assert again.get_json()["items"][0]["id"] == first.get_json()["items"][0]["id"]
    assert len(stored_keys(web_aws, batch_id)) == 1


def test_a_token_used_again_for_other_contents_under_the_same_name_is_refused(make_web_app, web_aws):
    """A file edited and sent again, or another's upload planted under a guessable token,
    must not be answered with the first file's item, and dropped. Also when the batch
    is rebuilt from S3 by a web tier started since."""
    batch_id = "7" * 32
    client = make_web_app(start_background=False).test_client()
    send_with_tokens(client, batch_id, [(make_image(772), "same.jpg")], ["x"])
    fresh = make_web_app(start_background=False).test_client()
    # One restarted since, that heard the item's answer before it rebuilt the batch: the
    # item it learnt from the answer had no digest, and the check let anything through.
    answered_first = make_web_app(start_background=False)
    item_id = items_by_name(client, batch_id)["same.jpg"]["id"]
    answer = ClassifyResponse(id=item_id, filename="same.jpg", key=stored_keys(web_aws, batch_id)[0],
                              worker="w", untrained=True, label="cat", score=0.5)
    services_of(answered_first).book.record(ClassifyResponse.from_json(answer.to_json()))
    for web in (client, fresh, answered_first.test_client()):
        other = send_with_tokens(web, batch_id, [(make_image(773), "same.jpg")], ["x"])
        assert other.status_code == 409, other.get_json()
        assert "already names another file of this name, with other contents" in other.get_json()["error"]
        assert send_with_tokens(web, batch_id, [(make_image(772), "same.jpg")], ["x"]).status_code == 202
    assert len(stored_keys(web_aws, batch_id)) == 1


@pytest.mark.parametrize(("form", "says"), [
    ({"tokens": ["0"]}, "1 token for 2 files"),
    ({"tokens": ["0", "0"]}, "two files have the same token (a.jpg and this one)"),
    ({"tokens": ["0", "a b"]}, "a token is 1 to 64"),
    ({"tokens": ["0", "x" * 65]}, "a token is 1 to 64"),
    ({"batch_id": "not-hex", "create": "1"}, "32 lowercase hexadecimal"),
    # No batch has such an id: not a 404 saying to send create=1, which is then refused.
    ({"batch_id": "A" * 32}, "32 lowercase hexadecimal"),
    # Only the first counted: files meant for the second batch went to the first.
    ({"batch_id": ["a" * 32, "b" * 32], "create": "1"}, "one batch_id per request: this one has 2"),
    ({"batch_id": "a" * 32, "create": ["1", "1"]}, "one create per request"),
])
def test_bad_tokens_and_batch_ids_are_refused_and_nothing_is_stored(web_client, web_aws, form, says):
    response = upload(web_client, [(make_image(720), "a.jpg"), (make_image(721), "b.jpg")], **form)
    assert response.status_code == 400
    assert says in response.get_json()["error"]
    if "token" in says and "64" not in says:  # named, as every refusal of a file is
        assert response.get_json()["filename"] == "b.jpg"
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0


@pytest.mark.parametrize("query", ["batch_id=" + "9" * 32, "create=1", "tokens=a"])
def test_batch_fields_in_the_url_are_refused_not_ignored(web_client, web_aws, query):
    """`?batch_id=...` must not be ignored: in a new batch, the client would never look
    for the files."""
    data = {"files": [(io.BytesIO(make_image(722)), "a.jpg")]}
    response = web_client.post(f"/api/jobs?{query}", data=data, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "form fields, not in the URL" in response.get_json()["error"]
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0


class HeldPut:
    """The web tier's S3 puts, each held until `release` is set; then it stores, or fails."""

    def __init__(self, monkeypatch, fail: bool = False) -> None:
        import web_tier.submit

        self.real = web_tier.submit.put_input
        self.storing, self.release = threading.Event(), threading.Event()

        def held(*args, **kwargs):
            self.storing.set()
            assert self.release.wait(30)
            if fail:
                raise OSError("S3 down")
            return self.real(*args, **kwargs)

        monkeypatch.setattr(web_tier.submit, "put_input", held)
        self.undo = lambda: monkeypatch.setattr(web_tier.submit, "put_input", self.real)


def send_in_background(app, batch_id: str, files, tokens: list[str]) -> tuple[threading.Thread, dict]:
    """Send with tokens from another thread; the answer lands in the dict under "r"."""
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(
        r=send_with_tokens(app.test_client(), batch_id, files, tokens)))
    thread.start()
    return thread, answer


def test_a_file_still_being_stored_under_a_token_is_refused_for_now_not_taken_as_stored(
        make_web_app, web_aws, monkeypatch):
    """Sent again while the first request still stores it, the file may yet fail there:
    taken as stored, it would be answered with an item that never comes. It is refused
    with a 503 (to send again), and once stored, found."""
    app = make_web_app(start_background=False)
    batch_id, files = "e" * 32, [(make_image(730), "slow.jpg")]
    put = HeldPut(monkeypatch)
    sender, first = send_in_background(app, batch_id, files, ["0"])
    assert put.storing.wait(30)
    meanwhile = send_with_tokens(app.test_client(), batch_id, files, ["0"])
    put.release.set()
    sender.join(30)
    assert meanwhile.status_code == 503 and meanwhile.headers["Retry-After"]
    assert meanwhile.get_json()["rejected"][0]["status"] == 503
    assert first["r"].status_code == 202
    later = send_with_tokens(app.test_client(), batch_id, files, ["0"])
    assert later.get_json()["items"][0] == {**first["r"].get_json()["items"][0], "again": True}
    assert len(stored_keys(web_aws, batch_id)) == 1


def test_a_file_sent_again_while_its_first_storing_fails_is_not_taken_as_stored(
        make_web_app, web_aws, monkeypatch):
    """The resend finds the first request's item under the token; if the first then
    fails, the resend must not answer with that item, which was never stored: the page
    would show it queued for ever."""
    app = make_web_app(start_background=False)
    svc = services_of(app)
    batch_id, files = "b" * 32, [(make_image(750), "a.jpg")]
    put = HeldPut(monkeypatch, fail=True)
    sender, first = send_in_background(app, batch_id, files, ["0"])
    assert put.storing.wait(30)
    real_add = svc.book.add

    def add_then_let_the_first_fail(batch, items, *rest):
        held = real_add(batch, items, *rest)  # finds the first request's item under the token
        put.release.set()
        sender.join(30)  # which has now failed, and left the book
        return held

    monkeypatch.setattr(svc.book, "add", add_then_let_the_first_fail)
    resent = send_with_tokens(app.test_client(), batch_id, files, ["0"])
    assert first["r"].status_code == 503
    assert resent.status_code == 503, resent.get_json()
    monkeypatch.setattr(svc.book, "add", real_add)
    put.undo()
    stored = send_with_tokens(app.test_client(), batch_id, files, ["0"])
    assert stored.status_code == 202 and stored.get_json()["items"][0]["again"] is False
    assert len(stored_keys(web_aws, batch_id)) == 1


def test_a_token_whose_file_could_not_be_stored_is_free_to_send_again(make_web_app, web_aws, monkeypatch):
    import web_tier.submit

    client = make_web_app(start_background=False).test_client()
    batch_id = "f" * 32
    files = [(make_image(740), "a.jpg")]
    real_put = web_tier.submit.put_input
    monkeypatch.setattr(web_tier.submit, "put_input",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("S3 down")))
    assert send_with_tokens(client, batch_id, files, ["0"]).status_code == 503
    monkeypatch.setattr(web_tier.submit, "put_input", real_put)
    again = send_with_tokens(client, batch_id, files, ["0"])
    assert again.status_code == 202 and again.get_json()["items"][0]["again"] is False
    assert len(stored_keys(web_aws, batch_id)) == 1


def test_a_store_that_fails_after_s3_wrote_the_object_leaves_nothing_to_adopt(
        make_web_app, web_aws, monkeypatch):
    """S3 may store the object and the put still fail (an ambiguous 500, a timeout after
    the write): the 503 says nothing was stored, so the object, left there with its
    token, must not be adopted by the resend, answered "again" with an item no request
    was ever sent for: queued for ever."""
    import web_tier.submit

    client = make_web_app(start_background=False).test_client()
    batch_id, files = "e" * 32, [(make_image(743), "a.jpg")]
    real_put = web_tier.submit.put_input

    def store_then_fail(*args, **kwargs):
        real_put(*args, **kwargs)
        raise ConnectionError("read timeout after the object was written")

    monkeypatch.setattr(web_tier.submit, "put_input", store_then_fail)
    refused = send_with_tokens(client, batch_id, files, ["0"])
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert stored_keys(web_aws, batch_id) == []  # as the 503 says
    monkeypatch.setattr(web_tier.submit, "put_input", real_put)
    again = send_with_tokens(client, batch_id, files, ["0"])
    assert again.status_code == 202 and again.get_json()["items"][0]["again"] is False
    got = web_aws.sqs.receive_message(QueueUrl=web_aws.request_queue_url, MaxNumberOfMessages=10)
    assert [ClassifyRequest.from_json(m["Body"]).id for m in got["Messages"]] == [
        again.get_json()["items"][0]["id"]]


def test_a_batch_of_which_nothing_was_stored_is_gone_at_once(make_web_app, web_aws, monkeypatch):
    """Not 200 with no items until the next restart, which the page does not drop (it
    drops a batch on 404): such batches would pile up in an outage."""
    import web_tier.submit

    client = make_web_app(start_background=False).test_client()
    batch_id = "e" * 32
    monkeypatch.setattr(web_tier.submit, "put_input",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("S3 down")))
    files = [(make_image(741), "a.jpg"), (make_image(742), "b.jpg")]
    refused = upload(client, files, batch_id=batch_id, create="1")
    assert refused.status_code == 503
    assert client.get(f"/api/jobs/{batch_id}").status_code == 404


# --- Server-Sent Events --------------------------------------------------------------

def finish(app, item_id: str, label: str, key: str = "", name: str = "x.jpg") -> None:
    services_of(app).book.record(ClassifyResponse(
        id=item_id, filename=name, key=key, worker="w", untrained=True, label=label, score=0.5))


def test_a_full_book_keeps_a_batch_between_two_chunks_of_one_request(make_web_app, web_aws):
    """A full book must not forget a batch between two chunks of one request (its first
    chunk all answered): the second chunk would make it again, complete, with only its
    own file, and the first chunk's tokens forgotten: a GET shows 1 file of 17, and a
    resend of the others stores them twice. In use by the request, it is kept."""
    app = make_web_app(start_background=False, max_files_per_request=FILES_PER_CHUNK + 1)
    svc = services_of(app)
    real_submit, calls = svc.submitter.submit, []

    def submit_then_evict(batch_id, uploads, *rest):
        outcomes = real_submit(batch_id, uploads, *rest)
        if not calls:
            for item in outcomes:  # answered, as a worker does: stored, then replied
                web_aws.s3.put_object(Bucket=web_aws.settings.output_bucket, Key=item.key,
                                      Body=f"{item.filename},cat".encode())
                finish(app, item.id, "cat", key=item.key)
            with svc.book._lock:  # as a full book does, once a batch's items are all finished
                limit, svc.book._max_items = svc.book._max_items, 0
                svc.book._evict()
                svc.book._max_items = limit
        calls.append(len(uploads))
        return outcomes

    svc.submitter.submit = submit_then_evict
    batch_id = "c" * 32
    files = [(make_image(90 + n), f"f{n:02d}.jpg") for n in range(FILES_PER_CHUNK + 1)]
    tokens = [f"t{n}" for n in range(len(files))]
    sent = upload(app.test_client(), files, batch_id=batch_id, create="1", tokens=tokens)
    assert sent.status_code == 202 and calls == [FILES_PER_CHUNK, 1]
    assert len(sent.get_json()["items"]) == len(files)
    listed = app.test_client().get(f"/api/jobs/{batch_id}").get_json()["items"]
    assert [i["filename"] for i in listed] == [name for _, name in files]
    assert [i["state"] for i in listed] == ["done"] * FILES_PER_CHUNK + ["queued"]
    # The first file sent again under its token: the one stored, not a second.
    again = upload(app.test_client(), files[:1], batch_id=batch_id, tokens="t0").get_json()
    assert again["items"][0]["again"] is True
    assert len(app.test_client().get(f"/api/jobs/{batch_id}").get_json()["items"]) == len(files)
    finish(app, listed[-1]["id"], "cat")
    with svc.book._lock:  # no longer in use, and finished whole: a full book lets it go
        limit, svc.book._max_items = svc.book._max_items, 0
        svc.book._evict()
        svc.book._max_items = limit
    assert svc.book.batch(batch_id) is None


def test_a_batch_all_refused_by_an_untrained_worker_says_untrained(make_web_app):
    """Its items say so (Item.shows_untrained), and the batch must too."""
    app = make_web_app(start_background=False)
    client = app.test_client()
    body = upload(client, [(make_image(60), "one.jpg")]).get_json()
    book = services_of(app).book
    book.record(ClassifyResponse(id=body["items"][0]["id"], filename="one.jpg", key="", worker="w",
                                 untrained=True, error="damaged"))
    book.untrained = False  # the workers' latest answer: a trained model (a rollout)
    batch = client.get(f"/api/jobs/{body['batch_id']}").get_json()
    assert batch["items"][0]["untrained"] is True and batch["untrained"] is True


def parse_events(chunks) -> list[dict]:
    """Read SSE blocks from a streamed response until `end`."""
    return parse_events_until(chunks, lambda event: event.get("event") == "end")


def parse_events_until(chunks, last) -> list[dict]:
    """Read SSE blocks from a streamed response until one that is `last(block)`; the
    stream can be read on after it (a block is read whole, and the chunks are its own)."""
    out, buffer = [], ""
    for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            out.append({**fields, "raw": block})
            if last(fields):
                return out
    return out


def test_events_replay_finished_items_then_end(make_web_app):
    app = make_web_app(start_background=False)
    client = app.test_client()
    body = upload(client, [(make_image(80), "one.jpg"), (make_image(81), "two.jpg")]).get_json()
    for n, item in enumerate(body["items"]):
        finish(app, item["id"], f"L{n}")
    response = client.get(f"/api/jobs/{body['batch_id']}/events", buffered=False)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    got = parse_events(response.response)
    data = [json.loads(e["data"]) for e in got if "id" in e]
    assert [(d["id"], d["label"], d["state"]) for d in data] == [
        (body["items"][0]["id"], "L0", "done"), (body["items"][1]["id"], "L1", "done")]
    book = services_of(app).book
    assert [e["id"] for e in got if "id" in e] == [f"{book.epoch}.1", f"{book.epoch}.2"]  # finish order
    assert got[-1]["event"] == "end"
    response.close()


def test_a_batch_forgotten_as_its_stream_starts_is_read_again_not_ended_empty(make_web_app, fake_worker):
    """The book forgets finished batches beyond its cap: one forgotten between the
    stream's check and its start must not read as no items, the stream ending at once,
    as if the batch were empty."""
    app = make_web_app()
    client = app.test_client()
    files = [(make_image(82), "one.jpg"), (make_image(83), "two.jpg")]
    batch_id = upload(client, files).get_json()["batch_id"]
    wait_until(lambda: all(i["state"] == "done" for i in items_by_name(client, batch_id).values()))
    book = services_of(app).book
    subscribe = book.subscribe

    def forgotten_first(batch: str):
        book._max_items = 0  # the cap reached: the finished batch is forgotten
        book._evict()
        book._max_items = 100_000
        assert book.batch(batch_id) is None
        return subscribe(batch)

    book.subscribe = forgotten_first
    response = client.get(f"/api/jobs/{batch_id}/events", buffered=False)
    got = parse_events(response.response)
    assert sorted(json.loads(e["data"])["filename"] for e in got if "id" in e) == ["one.jpg", "two.jpg"]
    assert got[-1]["event"] == "end"
    response.close()


def test_a_stream_sends_the_late_answer_that_replaces_a_dead_letter(make_web_app, monkeypatch):
    """An item failed by a dead letter is replaced if a copy of its request is answered
    later: a stream that knew the item sent would leave the page's row "failed" while
    GET /api/jobs says "done". A client reconnecting after the failure (its
    Last-Event-ID) is sent the answer too."""
    monkeypatch.setattr("web_tier.events.KEEPALIVE_S", 0.5)
    app = make_web_app(start_background=False)
    client = app.test_client()
    body = upload(client, [(make_image(84), "a.jpg"), (make_image(85), "b.jpg")]).get_json()
    (a, b), batch_id = [i["id"] for i in body["items"]], body["batch_id"]
    book = services_of(app).book
    chunks = client.get(f"/api/jobs/{batch_id}/events", buffered=False).response
    book.fail(a, DEAD_LETTER_ERROR)
    failed = parse_events_until(chunks, lambda event: "id" in event)
    assert json.loads(failed[-1]["data"])["state"] == "failed"
    # Sent as it arrives, b still queued: not held back until a quiet interval ends.
    finish(app, a, "cat")
    answered = parse_events_until(chunks, lambda event: True)
    assert "id" in answered[0], answered[0]["raw"]
    assert (json.loads(answered[0]["data"])["id"], json.loads(answered[0]["data"])["label"]) == (a, "cat")
    finish(app, b, "dog")
    rest = parse_events(chunks)
    assert [json.loads(e["data"])["label"] for e in rest if "id" in e] == ["dog"]
    assert rest[-1]["event"] == "end"
    resumed = client.get(f"/api/jobs/{batch_id}/events", headers={"Last-Event-ID": failed[-1]["id"]},
                         buffered=False)
    again = [json.loads(e["data"]) for e in parse_events(resumed.response) if "id" in e]
    assert sorted((i["id"], i["state"]) for i in again) == sorted([(a, "done"), (b, "done")])
    resumed.close()


def events_then_dropped(client, url: str, items: int) -> list[dict]:
    """The events of a stream of `url` read until `items` items came, the stream then
    dropped (as a browser's connection is)."""
    opened = client.get(url, buffered=False)
    chunks = iter(opened.response)
    seen = []
    while len([c for c in seen if b"data: " in c]) < items:
        seen.append(next(chunks))
    opened.close()
    return parse_events(seen)


def test_a_stream_resumed_with_last_event_id_sends_only_what_finished_after_it(make_web_app):
    """A browser reconnects every MAX_STREAM_S and after a drop, with the last id it saw:
    it was sent every finished item again. Items finish in any order: the ids follow
    that order, so that each covers every item before it."""
    app = make_web_app(start_background=False)
    client = app.test_client()
    body = upload(client, [(make_image(70 + n), f"{n}.jpg") for n in range(3)]).get_json()
    first, second, third = (item["id"] for item in body["items"])
    url = f"/api/jobs/{body['batch_id']}/events"
    finish(app, third, "c")  # the last uploaded finishes first
    finish(app, first, "a")
    events_seen = events_then_dropped(client, url, 2)  # dropped, with `second` still queued
    assert [json.loads(e["data"])["id"] for e in events_seen if "id" in e] == [third, first]
    last_id = [e["id"] for e in events_seen if "id" in e][-1]

    finish(app, second, "b")
    resumed = parse_events(client.get(url, headers={"Last-Event-ID": last_id}, buffered=False).response)
    assert [json.loads(e["data"])["id"] for e in resumed if "id" in e] == [second]
    assert resumed[-1]["event"] == "end"
    # An id from another process (a restart numbers anew), or a made-up one: everything.
    # (Digits Python's int() refuses, or too many for it, must not be a 500.)
    epoch = last_id.split(".")[0]
    for foreign in ("0123abcd.2", "nonsense", "", f"{epoch}.\u00b2", f"{epoch}." + "9" * 5000):
        again = parse_events(client.get(url, headers={"Last-Event-ID": foreign}, buffered=False).response)
        assert [json.loads(e["data"])["id"] for e in again if "id" in e] == [third, first, second]


def test_a_stream_opened_after_an_event_id_sends_only_what_finished_after_it(make_web_app):
    """A page opens a new stream once its last one ended (`end`, then more files joined
    the batch), and an EventSource sends no Last-Event-ID for a new stream: each would be
    sent the whole batch again. `?after=<id>` says what it saw, as Last-Event-ID does,
    which is taken first when both come (it is the later)."""
    app = make_web_app(start_background=False)
    client = app.test_client()
    body = upload(client, [(make_image(75 + n), f"{n}.jpg") for n in range(3)]).get_json()
    first, second, third = (item["id"] for item in body["items"])
    url = f"/api/jobs/{body['batch_id']}/events"
    finish(app, first, "a")
    finish(app, second, "b")
    last_id = [e["id"] for e in events_then_dropped(client, url, 2) if "id" in e][-1]

    finish(app, third, "c")

    def ids(query: str, headers: dict | None = None) -> list[str]:
        events_sent = parse_events(client.get(url + query, headers=headers or {}, buffered=False).response)
        assert events_sent[-1]["event"] == "end"
        return [json.loads(e["data"])["id"] for e in events_sent if "id" in e]

    assert ids(f"?after={last_id}") == [third]
    assert ids("?after=nonsense", {"Last-Event-ID": last_id}) == [third]
    # An id of another batch's, later than this one's (the numbers run across batches),
    # or one never sent: everything, not nothing but `end`.
    other = upload(client, [(make_image(78), "other.jpg")]).get_json()
    finish(app, other["items"][0]["id"], "d")
    other_url = f"/api/jobs/{other['batch_id']}/events"
    other_id = [e["id"] for e in events_then_dropped(client, other_url, 1) if "id" in e][-1]
    never = f"{last_id.split('.')[0]}.999999"
    for foreign in (other_id, never):
        assert ids(f"?after={foreign}") == [first, second, third]
        assert ids("", {"Last-Event-ID": foreign}) == [first, second, third]
    # An id from another process (a restart numbers anew), or none: everything.
    for foreign in ("0123abcd.2", "nonsense", "", f"{last_id.split('.')[0]}.\u00b2"):
        assert ids(f"?after={foreign}") == [first, second, third]


def test_events_push_items_as_they_finish(make_web_app, monkeypatch):
    monkeypatch.setattr(events, "KEEPALIVE_S", 0.05)
    app = make_web_app(start_background=False)
    client = app.test_client()
    body = upload(client, [(make_image(90), "early.jpg"), (make_image(91), "late.jpg")]).get_json()
    early, late = body["items"]
    finish(app, early["id"], "first")
    response = client.get(f"/api/jobs/{body['batch_id']}/events", buffered=False)
    chunks = iter(response.response)
    seen: list[str] = []
    # Read until the early item and a keep-alive have arrived, then finish the late one.
    while not (any(early["id"] in s for s in seen) and any(s.startswith(":") for s in seen)):
        seen.append(next(chunks).decode())
    threading.Thread(target=finish, args=(app, late["id"], "second")).start()
    rest = parse_events(chunks)
    pushed = [json.loads(e["data"]) for e in rest if "id" in e]
    assert [(p["id"], p["label"]) for p in pushed] == [(late["id"], "second")]
    assert rest[-1]["event"] == "end"
    assert all(early["id"] not in e["raw"] for e in rest)
    response.close()


def test_event_streams_are_capped_and_give_their_thread_back(make_web_app):
    """Each stream holds a thread: past the cap the answer is 503 (the page then polls)."""
    app = make_web_app(start_background=False)
    services_of(app).event_streams = threading.BoundedSemaphore(1)
    client = app.test_client()
    batch_id = upload(client, [(make_image(95), "slow.jpg")]).get_json()["batch_id"]
    first = client.get(f"/api/jobs/{batch_id}/events", buffered=False)
    next(iter(first.response))  # open: it holds the only slot until its batch is done
    second = client.get(f"/api/jobs/{batch_id}/events", buffered=False)
    assert second.status_code == 503 and second.headers["Retry-After"]
    assert "poll" in second.get_json()["error"]
    first.close()
    third = client.get(f"/api/jobs/{batch_id}/events", buffered=False)
    assert third.status_code == 200
    third.close()
    for _ in range(3):  # a HEAD never starts the body, and must give its slot back too
        head = client.head(f"/api/jobs/{batch_id}/events")
        assert head.status_code == 200
        head.close()
    fourth = client.get(f"/api/jobs/{batch_id}/events", buffered=False)
    assert fourth.status_code == 200
    fourth.close()


def test_an_event_stream_ends_after_its_time_limit(make_web_app):
    """Without `end`: the browser reconnects, and an abandoned stream frees its thread."""
    app = make_web_app(start_background=False)
    client = app.test_client()
    batch_id = upload(client, [(make_image(96), "never.jpg")]).get_json()["batch_id"]
    book = services_of(app).book
    chunks: list[str] = []
    streaming = threading.Thread(target=lambda: chunks.extend(events.stream(
        book, batch_id, lambda: book.batch(batch_id), keepalive_s=0.05, max_s=0.3)), daemon=True)
    streaming.start()
    streaming.join(10)  # a hang guard: nothing else ends it, its batch never done
    assert not streaming.is_alive()
    assert chunks[0].startswith("retry:") and any(c.startswith(":") for c in chunks)
    assert not any("event: end" in c for c in chunks)



def test_long_names_survive_in_s3_metadata_within_its_2kb(web_aws):
    from common.names import decode_filename
    from web_tier.filenames import MAX_FILENAME_CHARS
    from web_tier.storage import put_input, read_stored_upload

    whole = ("\u00e9" * 289 + ".jpg", "x" * (MAX_FILENAME_CHARS - 4) + ".png")  # was cut at 166 and 1000
    for name in (*whole, "\U0001f600" * 600):
        key = f"{'a' * 32}/{'b' * 32}/x.jpg"
        put_input(web_aws, key, b"data", "image/jpeg", filename=name, batch_id="a" * 32, item_id="b" * 32,
                  token="t" * 64, digest="d" * 64)  # the longest token a client may send
        meta = web_aws.s3.head_object(Bucket=web_aws.settings.input_bucket, Key=key)["Metadata"]
        # Within 2 KB even counting each name's "x-amz-meta-", which S3 does not.
        assert sum(len(f"x-amz-meta-{k}".encode()) + len(v.encode()) for k, v in meta.items()) <= 2048
        kept, token, digest, tagged = read_stored_upload(web_aws, key)
        assert (token, digest, tagged) == ("t" * 64, "d" * 64, False)
        assert name.startswith(kept) and decode_filename(meta["original-filename"]) == kept
        if name in whole:
            assert kept == name


def test_a_name_too_long_for_s3_metadata_keeps_its_extension_and_whole_characters():
    from common.names import MAX_META_FILENAME, decode_filename, encode_filename

    name = "\U0001f600" * 600 + ".jpeg"  # 12 encoded characters each
    encoded = encode_filename(name)
    kept = decode_filename(encoded)
    assert len(encoded) <= MAX_META_FILENAME
    assert kept.endswith("\U0001f600.jpeg") and "\ufffd" not in kept and len(kept) < len(name)


def test_a_stop_during_a_large_upload_stores_no_more_and_answers_at_once(make_web_app, web_aws):
    """gunicorn kills the process `graceful_timeout` after SIGTERM: an upload still storing
    files then got no answer, and a file killed between its S3 put and its message stayed
    queued for ever. Now the files not yet stored are refused with the request's answer."""
    app = make_web_app(start_background=False, max_files_per_request=FILES_PER_CHUNK * 3)
    svc = services_of(app)
    real_submit = svc.submitter.submit

    def submit_then_told_to_stop(batch_id, uploads, *rest):
        outcomes = real_submit(batch_id, uploads, *rest)
        svc.book.close()  # SIGTERM, while the first chunk was being stored
        return outcomes

    svc.submitter.submit = submit_then_told_to_stop
    files = [(make_image(70 + n), f"f{n:02d}.jpg") for n in range(FILES_PER_CHUNK * 2 + 1)]
    response = upload(app.test_client(), files)
    assert response.status_code == 202
    body = response.get_json()
    assert [i["filename"] for i in body["items"]] == [name for _, name in files[:FILES_PER_CHUNK]]
    assert [r["filename"] for r in body["rejected"]] == [name for _, name in files[FILES_PER_CHUNK:]]
    assert {(r["status"], r["error"]) for r in body["rejected"]} == {
        (503, "not stored: the web tier is stopping; send this file again")}
    stored = web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0)
    queued = web_aws.sqs.get_queue_attributes(QueueUrl=web_aws.request_queue_url,
                                              AttributeNames=["ApproximateNumberOfMessages"])
    assert stored == int(queued["Attributes"]["ApproximateNumberOfMessages"]) == FILES_PER_CHUNK

    # Told to stop before anything was stored: a 503 for the whole request.
    refused = upload(app.test_client(), files[:2])
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert "batch_id" not in refused.get_json()


def test_a_batch_says_its_model_is_untrained_before_any_result(make_web_app):
    """It said false while every item was still queued, the page's banner saying otherwise."""
    app = make_web_app(start_background=False, model_weights="random")
    client = app.test_client()
    batch_id = upload(client, [(make_image(90), "early.jpg")]).get_json()["batch_id"]
    body = client.get(f"/api/jobs/{batch_id}").get_json()
    assert [i["state"] for i in body["items"]] == ["queued"] and body["untrained"] is True
    # Its item too, without a label yet: not false beside the batch's true.
    assert body["items"][0]["untrained"] is True


def test_a_finished_batch_says_what_its_own_results_say(web_app, fake_worker):
    """Not what the latest answer of any batch said."""
    client = web_app.test_client()
    batch_id = upload(client, [(make_image(91), "trained.jpg")]).get_json()["batch_id"]
    wait_until(lambda: all_finished(client, batch_id))
    services_of(web_app).book.untrained = True  # another batch's answer, from an untrained model
    assert client.get(f"/api/jobs/{batch_id}").get_json()["untrained"] is False


def test_a_batchs_results_download_as_csv_each_row_as_the_api_says(web_app, web_aws):
    client = web_app.test_client()
    files = [(make_image(910), "cat, with comma.jpg"), (make_image(911), "=HYPERLINK(1).jpg"),
             (make_image(912), "fails.jpg"), (make_image(913), "queued.jpg")]
    batch_id = upload(client, files).get_json()["batch_id"]
    worker = FakeWorker(web_aws, untrained=True)
    worker.policy = lambda request: {"fails.jpg": "fail", "queued.jpg": "ignore"}.get(request.filename, "ok")
    worker.start()
    try:
        wait_until(lambda: worker.handled == 4 and sum(
            i["state"] != "queued" for i in items_by_name(client, batch_id).values()) == 3)
    finally:
        worker.stop()

    response = client.get(f"/api/jobs/{batch_id}/results.csv")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == f'attachment; filename="results-{batch_id}.csv"'
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert rows[0] == ["filename", "state", "label", "score", "error", "untrained"]
    api = client.get(f"/api/jobs/{batch_id}").get_json()["items"]
    assert len(rows) == 1 + len(api)
    for row, item in zip(rows[1:], api, strict=True):
        shown = item["filename"] if not item["filename"].startswith("=") else "'" + item["filename"]
        assert row[:3] == [shown, item["state"], item["label"] or ""]
        assert row[3] == ("" if item["score"] is None else f"{item['score']:.6f}")
        assert row[4] == (item["error"] or "") and row[5] == "true"  # the labels are meaningless
    by_name = {row[0]: row for row in rows[1:]}
    # A name a spreadsheet would run as a formula is shown as text.
    assert by_name["'=HYPERLINK(1).jpg"][1] == "done"
    assert by_name["fails.jpg"][1:3] == ["failed", ""] and by_name["fails.jpg"][4] == "cannot decode"
    assert by_name["queued.jpg"][1:4] == ["queued", "", ""]
    assert by_name["cat, with comma.jpg"][1] == "done"


def test_the_csv_of_an_unknown_batch_is_a_404(web_client):
    response = web_client.get(f"/api/jobs/{'0' * 32}/results.csv")
    assert response.status_code == 404
    assert response.get_json()["error"] == f"no such batch: {'0' * 32}"


@pytest.mark.parametrize("path", ["/api/jobs/{}", "/api/jobs/{}/results.csv", "/api/jobs/{}/events"])
def test_a_batch_id_of_another_form_is_said_to_be_one(web_client, path):
    """An id in capitals is not "no such batch" here, nor "32 lowercase hexadecimal
    digits" as a form field."""
    batch_id = "A" * 32
    response = web_client.get(path.format(batch_id))
    assert response.status_code == 404
    assert response.get_json()["error"] == (f"no such batch: {batch_id} (a batch's id is 32 lowercase "
                                            "hexadecimal digits, a UUID4's without hyphens)")


@pytest.fixture
def large_batch(web_app):
    """A batch of 1,201 items in the book (two slices of 500 and one of 201), a third
    each queued, classified and failed, names needing JSON's and CSV's escapes."""
    from web_tier.batch_json import ITEMS_PER_SLICE
    from web_tier.results import Item

    assert ITEMS_PER_SLICE == 500
    batch_id = "ab" * 16
    states = [{}, {"state": "done", "label": "ant", "score": 0.25, "untrained": True,
                   "top5": [{"label": "ant", "score": 0.25}]}, {"state": "failed", "error": "cannot decode"}]
    items = [Item(id=f"{n:032x}", batch_id=batch_id, filename=f'n{n} "é", \u2028.jpg', **states[n % 3])
             for n in range(1201)]
    services_of(web_app).book.add(batch_id, items)
    return web_app.test_client(), batch_id, items


def test_a_large_batch_is_written_out_a_slice_of_items_at_a_time(large_batch):
    """A batch has no size limit: read whole, 10,000 items held ~33 MB a read."""
    from flask import jsonify

    client, batch_id, items = large_batch
    response = client.get(f"/api/jobs/{batch_id}", buffered=False)
    assert response.status_code == 200 and response.mimetype == "application/json"
    pieces = list(response.response)
    response.close()
    assert len(pieces) == 5  # the head, the three slices, the tail
    body = b"".join(pieces).decode()
    with client.application.app_context():
        model_untrained = bool(services_of(client.application).book.untrained)
        # Its results are flagged untrained: so is the batch.
        whole = {"batch_id": batch_id, "items": [i.to_json(model_untrained) for i in items],
                 "untrained": True}
        assert body == jsonify(whole).get_data(as_text=True)  # the bytes jsonify would make
    assert [i["id"] for i in json.loads(body)["items"]] == [i.id for i in items]


def test_a_large_batchs_csv_is_written_out_a_slice_of_rows_at_a_time(large_batch):
    client, batch_id, items = large_batch
    response = client.get(f"/api/jobs/{batch_id}/results.csv", buffered=False)
    pieces = list(response.response)
    response.close()
    assert len(pieces) == 3  # the header with the first slice, then the other two
    model_untrained = bool(services_of(client.application).book.untrained)
    whole = io.StringIO()
    writer = csv.writer(whole, lineterminator="\r\n")
    writer.writerow(["filename", "state", "label", "score", "error", "untrained"])
    for i in items:
        writer.writerow([i.filename, i.state, i.label or "", "" if i.score is None else f"{i.score:.6f}",
                         i.error or "", "true" if i.shows_untrained(model_untrained) else "false"])
    assert b"".join(pieces).decode() == whole.getvalue()


def test_the_csv_of_an_empty_batch_is_its_header():
    from web_tier.results_csv import results_csv_slices

    assert "".join(results_csv_slices([], model_untrained=False)) == (
        "filename,state,label,score,error,untrained\r\n")


def test_a_csv_cell_a_spreadsheet_splitting_on_semicolons_would_begin_with_a_formula_is_text():
    """Excel splits a CSV on ";" where the decimal mark is a comma (German, French, ...):
    a name with semicolons, unquoted, gave it cells "=1+1" and "=cmd|..."."""
    from web_tier.results import Item
    from web_tier.results_csv import results_csv_slices

    hostile = "photo;=1+1;=cmd|' /C calc'!A0;.jpg"
    quoted = 'd; "=HYPERLINK(1)".jpg'  # a cell Excel begins at the ";" and reads through the quote
    items = [Item(id="a", batch_id=None, filename=hostile, state="done", label="cat", score=0.5),
             Item(id="q", batch_id=None, filename=quoted, state="done", label="cat", score=0.5),
             Item(id="b", batch_id=None, filename="plain.jpg", state="done", label="dog", score=0.25)]
    text = "".join(results_csv_slices(items, model_untrained=False))
    for delimiter in (",", ";", "\t"):
        for row in csv.reader(io.StringIO(text), delimiter=delimiter):
            formulas = [cell for cell in row if cell.lstrip('" ').startswith(("=", "+", "-", "@"))]
            assert not formulas, (delimiter, row)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1:] == [["photo;'=1+1;'=cmd|' /C calc'!A0;.jpg", "done", "cat", "0.500000", "", "false"],
                        ['d;\' "=HYPERLINK(1)".jpg', "done", "cat", "0.500000", "", "false"],
                        ["plain.jpg", "done", "dog", "0.250000", "", "false"]]


def test_a_csv_row_shows_only_what_its_state_says_is_final():
    """Read without the book's lock while a listener fills an item in: its state is set
    last, so a row read in between must not mix a result into a queued or failed row."""
    from web_tier.results import Item
    from web_tier.results_csv import results_csv_slices

    filling = Item(id="a", batch_id=None, filename="a.jpg", label="cat", score=0.5)  # still queued
    turning = Item(id="b", batch_id=None, filename="b.jpg", state="failed", error=None, label="dog",
                   score=0.25)  # a dead letter, its late result half applied
    text = "".join(results_csv_slices([filling, turning], model_untrained=True))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1:] == [["a.jpg", "queued", "", "", "", "true"], ["b.jpg", "failed", "", "", "", "true"]]
