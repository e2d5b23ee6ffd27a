"""POST /api/jobs/<batch>/items/<item>/again: a dead letter queued again in place, once."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from common.failure_tags import DEAD_LETTER_ERROR, SentAgain, failure_from_tags, sent_again_from_tags
from common.messages import ClassifyRequest, ClassifyResponse
from tests.conftest import make_image
from tests.unit.conftest import FakeWorker, answer_for, services_of, upload, wait_until
from tests.unit.test_web_jobs import dead_letter, dead_letters_left, finish, items_by_name, parse_events_until

pytestmark = pytest.mark.timeout(120)


def again_url(batch_id: str, item_id: str) -> str:
    return f"/api/jobs/{batch_id}/items/{item_id}/again"


def requests_queued(web_aws) -> list[ClassifyRequest]:
    """The requests in the request queue, read (and left there: visible again at once)."""
    got = web_aws.sqs.receive_message(QueueUrl=web_aws.request_queue_url, MaxNumberOfMessages=10,
                                      VisibilityTimeout=0)
    return [ClassifyRequest.from_json(m["Body"]) for m in got.get("Messages", [])]


# A dead letter sent again is marked seen before with one receive (web_tier/submit.py).
SEEN_BEFORE = {"PriorReceives": {"DataType": "Number", "StringValue": "1"}}


def attributes_taken(web_aws) -> dict[str, dict]:
    """The message attributes of each request in the request queue, by id; each taken off
    it (SQS purges a queue once a minute at most)."""
    got = web_aws.sqs.receive_message(QueueUrl=web_aws.request_queue_url, MaxNumberOfMessages=10,
                                      MessageAttributeNames=["All"]).get("Messages", [])
    for m in got:
        web_aws.sqs.delete_message(QueueUrl=web_aws.request_queue_url, ReceiptHandle=m["ReceiptHandle"])
    return {json.loads(m["Body"])["id"]: m.get("MessageAttributes", {}) for m in got}


def failure_mark(web_aws, key: str) -> str | None:
    tags = web_aws.s3.get_object_tagging(Bucket=web_aws.settings.input_bucket, Key=key)["TagSet"]
    return failure_from_tags(tags)


def uploaded_and_failed(app, name: str = "dead.jpg", seed: int = 300) -> tuple[str, dict]:
    """An upload whose request the book has failed as a dead letter (nothing in the
    queues, no mark on its input): its batch id and the item as uploaded."""
    body = upload(app.test_client(), [(make_image(seed), name)]).get_json()
    item = body["items"][0]
    book = services_of(app).book
    key = book.get(item["id"]).key
    book.fail(item["id"], DEAD_LETTER_ERROR, key=key, filename=name)
    return body["batch_id"], item


def test_a_dead_letter_sent_again_is_the_same_item_queued_then_answered(web_app, web_aws):
    client = web_app.test_client()
    data = make_image(301)
    batch_id = upload(client, [(data, "dead.jpg")]).get_json()["batch_id"]
    request = dead_letter(web_aws)
    wait_until(lambda: failure_mark(web_aws, request.key) == DEAD_LETTER_ERROR)
    wait_until(lambda: dead_letters_left(web_aws) == 0)
    assert services_of(web_app).book.totals() == {"uploaded": 1, "answered": 0, "failed": 1}

    response = client.post(again_url(batch_id, request.id))
    assert response.status_code == 202, response.get_json()
    assert response.headers["Location"] == f"/api/jobs/{batch_id}"
    item = response.get_json()["item"]
    assert (item["id"], item["state"], item["error"], item["sent_again"]) == (request.id, "queued", None, 1)
    # The batch holds the one item, queued again, counted queued; its mark is off.
    listed = client.get(f"/api/jobs/{batch_id}").get_json()["items"]
    assert [(i["id"], i["state"]) for i in listed] == [(request.id, "queued")]
    assert services_of(web_app).book.totals() == {"uploaded": 1, "answered": 0, "failed": 0}
    assert failure_mark(web_aws, request.key) is None
    # One new request, for the same id and key.
    assert [(r.id, r.key) for r in requests_queued(web_aws)] == [(request.id, request.key)]

    worker = FakeWorker(web_aws).start()
    try:
        wait_until(lambda: items_by_name(client, batch_id)["dead.jpg"]["state"] == "done")
    finally:
        worker.stop()
    assert items_by_name(client, batch_id)["dead.jpg"]["label"] == answer_for(data)[0]
    assert len(client.get(f"/api/jobs/{batch_id}").get_json()["items"]) == 1
    assert services_of(web_app).book.totals() == {"uploaded": 1, "answered": 1, "failed": 0}


def test_a_second_request_to_send_it_again_sends_nothing(make_web_app, web_aws):
    """Two clicks (two tabs): the first queues it again; the second finds it queued."""
    app = make_web_app(start_background=False)
    client = app.test_client()
    batch_id, item = uploaded_and_failed(app)
    web_aws.sqs.purge_queue(QueueUrl=web_aws.request_queue_url)  # the upload's own request
    assert client.post(again_url(batch_id, item["id"])).status_code == 202
    second = client.post(again_url(batch_id, item["id"]))
    assert second.status_code == 409
    body = second.get_json()
    assert body["code"] == "not_sent_again" and "queued" in body["error"]
    assert (body["item"]["state"], body["item"]["sent_again"]) == ("queued", 1)
    assert len(requests_queued(web_aws)) == 1


def test_only_a_dead_letters_failure_is_sent_again(make_web_app, web_aws):
    app = make_web_app(start_background=False)
    client = app.test_client()
    body = upload(client, [(make_image(302), "queued.jpg"), (make_image(303), "bad.jpg"),
                           (make_image(304), "done.jpg")]).get_json()
    batch_id = body["batch_id"]
    queued, bad, done = (i["id"] for i in body["items"])
    book = services_of(app).book
    book.fail(bad, "cannot decode")  # a worker's failure on the image itself
    finish(app, done, "cat")
    before = client.get(f"/api/jobs/{batch_id}").get_json()
    messages = len(requests_queued(web_aws))
    for item_id, state, name in ((queued, "queued", "queued.jpg"), (bad, "failed", "bad.jpg"),
                                 (done, "done", "done.jpg")):
        refused = client.post(again_url(batch_id, item_id))
        assert refused.status_code == 409, item_id
        assert (refused.get_json()["code"], refused.get_json()["item"]["state"]) == ("not_sent_again", state)
        assert refused.get_json()["filename"] == name  # as every refusal of a file names it
    assert client.get(f"/api/jobs/{batch_id}").get_json() == before
    assert len(requests_queued(web_aws)) == messages

    unknown_item = client.post(again_url(batch_id, "f" * 32))
    assert (unknown_item.status_code, unknown_item.get_json()["code"]) == (404, "unknown_item")
    unknown_batch = client.post(again_url("e" * 32, bad))
    assert (unknown_batch.status_code, unknown_batch.get_json()["code"]) == (404, "unknown_batch")


def test_sending_again_is_a_write_behind_the_api_key(make_web_app):
    app = make_web_app(start_background=False, api_key="s3cret-key")
    client = app.test_client()
    headers = {"X-API-Key": "s3cret-key"}
    body = upload(client, [(make_image(305), "dead.jpg")], headers=headers).get_json()
    item_id = body["items"][0]["id"]
    book = services_of(app).book
    book.fail(item_id, DEAD_LETTER_ERROR, key=book.get(item_id).key)
    refused = client.post(again_url(body["batch_id"], item_id))
    assert (refused.status_code, refused.get_json()["code"]) == (401, "unauthorized")
    assert book.get(item_id).state == "failed"
    assert client.post(again_url(body["batch_id"], item_id), headers=headers).status_code == 202


def sent_again_then_restarted(make_web_app, web_aws, seed: int) -> tuple[str, ClassifyRequest, float]:
    """An upload failed by a dead letter and sent again by a web tier that then stopped:
    its batch id, its first request (a copy of which may still come back dead), and when
    it was sent again. The request sent again waits in the request queue."""
    old = make_web_app()
    client = old.test_client()
    batch_id = upload(client, [(make_image(seed), "dead.jpg")]).get_json()["batch_id"]
    request = dead_letter(web_aws)
    wait_until(lambda: dead_letters_left(web_aws) == 0 and failure_mark(web_aws, request.key))
    assert client.post(again_url(batch_id, request.id)).status_code == 202
    requeued_at = services_of(old).book.get(request.id).requeued_at
    services_of(old).stop(timeout=5)
    return batch_id, request, requeued_at


def input_tags(web_aws, key: str) -> list[dict[str, str]]:
    return web_aws.s3.get_object_tagging(Bucket=web_aws.settings.input_bucket, Key=key)["TagSet"]


def test_a_batch_rebuilt_after_a_restart_shows_the_item_queued_again(make_web_app, web_aws):
    """The mark came off the input object: a restarted web tier does not show it failed.
    Nor sent again 0 times, answered or not: its new mark says how often, and when."""
    batch_id, request, requeued_at = sent_again_then_restarted(make_web_app, web_aws, 306)

    fresh = make_web_app(start_background=False)
    item = items_by_name(fresh.test_client(), batch_id)["dead.jpg"]
    assert (item["state"], item["sent_again"]) == ("queued", 1)
    assert services_of(fresh).book.get(request.id).requeued_at == requeued_at

    worker = FakeWorker(web_aws).start()  # the request sent again; its answer is left unread
    try:
        wait_until(lambda: worker.handled == 1)
    finally:
        worker.stop()
    answered = items_by_name(make_web_app(start_background=False).test_client(), batch_id)["dead.jpg"]
    assert (answered["state"], answered["sent_again"]) == ("done", 1)


def test_a_dead_letter_of_a_copy_sent_before_a_restart_leaves_the_item_queued(make_web_app, web_aws):
    """A web tier restarted since the item was sent again does not hold it: the copy's
    dead letter failed it, and marked its input failed, over the mark that said it was
    sent again, while the new request was under way."""
    batch_id, request, requeued_at = sent_again_then_restarted(make_web_app, web_aws, 308)
    fresh = make_web_app()  # its listeners read the dead letters; nothing rebuilds the batch yet
    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=request.to_json())
    wait_until(lambda: dead_letters_left(web_aws) == 0)
    assert failure_mark(web_aws, request.key) is None
    assert services_of(fresh).book.get(request.id) is None

    # The new request's own dead letter does fail it, and its mark keeps the count.
    again = dead_letter(web_aws)
    assert (again.id, again.sent_at) == (request.id, requeued_at)
    wait_until(lambda: failure_mark(web_aws, request.key) == DEAD_LETTER_ERROR)
    assert sent_again_from_tags(input_tags(web_aws, request.key)) == SentAgain(1, requeued_at)
    # Before any GET rebuilds the batch: the item the dead letter failed says so too, and
    # a later dead letter's mark, written from it, would keep the count.
    learnt = services_of(fresh).book.get(request.id)
    assert (learnt.sent_again, learnt.requeued_at) == (1, requeued_at)
    item = items_by_name(fresh.test_client(), batch_id)["dead.jpg"]
    assert (item["state"], item["sent_again"]) == ("failed", 1)


def tags_refused_to_the_dead_letter_reader(web_aws) -> None:
    """S3 refuses the web tier's dead-letter reader every read of an object's tags, as
    it does a role without s3:GetObjectTagging (the test's own reads still see them)."""
    import threading

    def refuse(**_kwargs):
        if threading.current_thread().name == "web-dead-letters":
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObjectTagging")

    web_aws.s3.meta.events.register("before-call.s3.GetObjectTagging", refuse)


@pytest.mark.parametrize("held", [False, True], ids=["after a restart", "in the book"])
def test_a_dead_letter_whose_input_tags_s3_refuses_fails_the_item_as_before(make_web_app, web_aws, held):
    """Not knowing when the item was sent again (S3 refusing the read, as a role without
    the right does for good), the listener cannot tell a copy sent before: it fails the
    item, and marks it, as it did before the mark said when. The tags were read a second
    time for the outcome stored, whose refusal left the dead letter in its queue, the
    item queued, for the queue's 14 days."""
    if held:
        fresh = make_web_app()
        batch_id = upload(fresh.test_client(), [(make_image(311), "dead.jpg")]).get_json()["batch_id"]
        tags_refused_to_the_dead_letter_reader(web_aws)
        request = dead_letter(web_aws)
    else:
        batch_id, request, _ = sent_again_then_restarted(make_web_app, web_aws, 309)
        tags_refused_to_the_dead_letter_reader(web_aws)
        fresh = make_web_app()
        web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=request.to_json())
    wait_until(lambda: failure_mark(web_aws, request.key) == DEAD_LETTER_ERROR)
    wait_until(lambda: dead_letters_left(web_aws) == 0)
    assert items_by_name(fresh.test_client(), batch_id)["dead.jpg"]["state"] == "failed"


def test_a_dead_letter_whose_input_tags_s3_fails_to_read_is_left_to_come_back(make_web_app, web_aws,
                                                                              monkeypatch):
    """S3 failing (a 500, a timeout) passes: the dead letter stays in its queue, to come
    back once S3 may answer, rather than fail an item that was queued again since and
    overwrite the mark that says so."""
    from botocore.exceptions import ClientError

    batch_id, request, _ = sent_again_then_restarted(make_web_app, web_aws, 310)
    tried = []

    def s3_fails(aws, key):
        tried.append(key)
        raise ClientError({"Error": {"Code": "InternalError", "Message": "down"},
                           "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObjectTagging")

    monkeypatch.setattr("web_tier.dead_letters.input_tags", s3_fails)
    fresh = make_web_app()
    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=request.to_json())
    wait_until(lambda: tried)
    services_of(fresh).stop(timeout=30)  # no second round: what the first left is what is seen
    assert dead_letters_left(web_aws) == 1
    assert failure_mark(web_aws, request.key) != DEAD_LETTER_ERROR
    assert services_of(fresh).book.get(request.id) is None or \
        services_of(fresh).book.get(request.id).state != "failed"


def test_a_dead_letter_of_a_copy_sent_before_leaves_the_item_queued(web_app, web_aws):
    """The first request's copy dead-lettered again (its message back after a failed
    delete, another copy of it) after the item was sent again: it said nothing of the
    new request, and failed the item, and marked it, while the new one was queued."""
    client = web_app.test_client()
    data = make_image(307)
    batch_id = upload(client, [(data, "dead.jpg")]).get_json()["batch_id"]
    request = dead_letter(web_aws)
    wait_until(lambda: dead_letters_left(web_aws) == 0 and failure_mark(web_aws, request.key))
    assert client.post(again_url(batch_id, request.id)).status_code == 202

    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=request.to_json())
    wait_until(lambda: dead_letters_left(web_aws) == 0)
    assert items_by_name(client, batch_id)["dead.jpg"]["state"] == "queued"
    assert failure_mark(web_aws, request.key) is None
    # The new request's own dead letter does fail it; its mark keeps the count, for a
    # batch rebuilt from S3.
    dead_letter(web_aws)
    wait_until(lambda: items_by_name(client, batch_id)["dead.jpg"]["state"] == "failed")
    requeued_at = services_of(web_app).book.get(request.id).requeued_at
    wait_until(lambda: sent_again_from_tags(input_tags(web_aws, request.key)) == SentAgain(1, requeued_at))


@pytest.mark.parametrize("while_", ["reading its outcome", "marking it failed"])
def test_an_item_queued_again_while_a_dead_letter_is_read_stays_queued(web_app, web_aws, monkeypatch, while_):
    """A copy's dead letter read (its S3 reads, then its mark) while POST .../again
    queues the item: the look before them says "not queued again", and the item must not
    be failed while its new request is out, its mark rewritten without the count."""
    import web_tier.dead_letters as dead_letters

    client = web_app.test_client()
    # Failed by a first dead letter whose mark S3 has not taken (denied, and retried).
    batch_id, uploaded = uploaded_and_failed(web_app, seed=312)
    request = requests_queued(web_aws)[0]
    assert request.id == uploaded["id"]
    sent_again = []

    def queue_it_again_first(real):
        def meanwhile(*args, **kwargs):
            if not sent_again:
                sent_again.append(client.post(again_url(batch_id, request.id)).status_code)
            return real(*args, **kwargs)
        return meanwhile

    name = "with_stored_outcome" if while_ == "reading its outcome" else "tag_failed"
    monkeypatch.setattr(dead_letters, name, queue_it_again_first(getattr(dead_letters, name)))
    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=request.to_json())
    wait_until(lambda: dead_letters_left(web_aws) == 0 and sent_again)
    assert sent_again == [202]
    item = items_by_name(client, batch_id)["dead.jpg"]
    assert (item["state"], item["sent_again"]) == ("queued", 1)
    assert failure_mark(web_aws, request.key) is None
    assert sent_again_from_tags(input_tags(web_aws, request.key)).count == 1


def test_a_sent_again_mark_s3_failed_to_put_back_is_put_back_when_the_dead_letter_comes_back(
        web_app, web_aws, monkeypatch):
    """The put-back above failing (S3 down for it): its dead letter stays, and when it
    comes back puts the mark back. Before, it was deleted as a copy sent before the item
    was queued again, and the failure mark stayed: a batch rebuilt after a restart
    showed the item failed while its new request was out, its count lost."""
    import web_tier.dead_letters as dead_letters

    client = web_app.test_client()
    batch_id, uploaded = uploaded_and_failed(web_app, seed=313)
    request = requests_queued(web_aws)[0]
    sent_again, put_backs = [], []
    real_tag_failed, real_clear_failed = dead_letters.tag_failed, dead_letters.clear_failed

    def queued_again_first(*args, **kwargs):
        if not sent_again:
            sent_again.append(client.post(again_url(batch_id, request.id)).status_code)
        return real_tag_failed(*args, **kwargs)

    def failing_once(*args, **kwargs):
        put_backs.append(args[1])
        if len(put_backs) == 1:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "hiccup"}}, "PutObjectTagging")
        return real_clear_failed(*args, **kwargs)

    monkeypatch.setattr(dead_letters, "tag_failed", queued_again_first)
    monkeypatch.setattr(dead_letters, "clear_failed", failing_once)
    # Back in a second, not the queue's 30 s.
    web_aws.sqs.set_queue_attributes(QueueUrl=web_aws.dead_letter_queue_url,
                                     Attributes={"VisibilityTimeout": "1"})
    web_aws.sqs.send_message(QueueUrl=web_aws.dead_letter_queue_url, MessageBody=request.to_json())
    wait_until(lambda: dead_letters_left(web_aws) == 0 and len(put_backs) == 2)
    assert sent_again == [202]
    assert put_backs == [request.key, request.key]
    assert failure_mark(web_aws, request.key) is None
    assert sent_again_from_tags(input_tags(web_aws, request.key)).count == 1
    item = items_by_name(client, batch_id)["dead.jpg"]
    assert (item["state"], item["sent_again"]) == ("queued", 1)


def test_an_event_stream_sends_the_item_queued_again_then_its_answer(make_web_app, monkeypatch):
    """An open page hears the item queued again: its stream had sent the failure, and
    with nothing else queued it would have ended."""
    monkeypatch.setattr("web_tier.events.KEEPALIVE_S", 0.5)
    app = make_web_app(start_background=False)
    client = app.test_client()
    batch_id, item = uploaded_and_failed(app)
    chunks = client.get(f"/api/jobs/{batch_id}/events", buffered=False).response
    failed = parse_events_until(chunks, lambda event: "id" in event)
    assert json.loads(failed[-1]["data"])["state"] == "failed"
    assert client.post(again_url(batch_id, item["id"])).status_code == 202
    queued = parse_events_until(chunks, lambda event: "id" in event or "event" in event)
    assert "id" in queued[-1], queued[-1]["raw"]  # not `end`
    # A `queued` event: a client's plain events stay one per finished item (DESIGN.md).
    assert queued[-1].get("event") == "queued", queued[-1]["raw"]
    assert (json.loads(queued[-1]["data"])["state"], json.loads(queued[-1]["data"])["sent_again"]) == (
        "queued", 1)
    finish(app, item["id"], "cat")
    rest = parse_events_until(chunks, lambda event: event.get("event") == "end")
    assert [json.loads(e["data"])["label"] for e in rest if "id" in e] == ["cat"]
    # A client resuming after the failure's event is sent the item as it is now.
    resumed = client.get(f"/api/jobs/{batch_id}/events", headers={"Last-Event-ID": failed[-1]["id"]},
                         buffered=False)
    sent = parse_events_until(resumed.response, lambda event: event.get("event") == "end")
    assert [json.loads(e["data"])["state"] for e in sent if "id" in e] == ["done"]
    resumed.close()


def test_a_request_sqs_does_not_take_is_sent_by_the_requeue(make_web_app, web_aws, monkeypatch):
    """The mark is off and the item queued when the send fails: as an upload stored with
    no request, its request is journaled and sent by requeue_unsent (at start, each
    minute, and by the next process if this one is killed)."""
    app = make_web_app(start_background=False)
    batch_id, item = uploaded_and_failed(app)
    web_aws.sqs.purge_queue(QueueUrl=web_aws.request_queue_url)
    submitter = services_of(app).submitter
    monkeypatch.setattr(submitter.requests, "send", sqs_down)
    assert app.test_client().post(again_url(batch_id, item["id"])).status_code == 202
    assert requests_queued(web_aws) == []
    monkeypatch.undo()
    assert submitter.requeue_unsent() == 1
    # Marked seen before as when sent at once: its input's tags say it was sent again.
    assert attributes_taken(web_aws) == {item["id"]: SEEN_BEFORE}


def test_an_uploads_request_sent_late_is_not_marked_seen_before(make_web_app, web_aws, monkeypatch):
    """requeue_unsent marks only a request sent again (its input's tags say so): an
    upload's own first request, sent late, has had no receive."""
    app = make_web_app(start_background=False)
    submitter = services_of(app).submitter
    monkeypatch.setattr(submitter.requests, "send", sqs_down)
    # Its image not deleted either: accepted, and queued late (Submitter._refuse).
    monkeypatch.setattr(submitter, "_unstore", lambda key: False)
    answer = upload(app.test_client(), [(make_image(306), "late.jpg")])
    assert answer.status_code == 202, answer.get_data(as_text=True)
    item = answer.get_json()["items"][0]
    assert requests_queued(web_aws) == []
    monkeypatch.undo()
    assert submitter.requeue_unsent() == 1
    assert attributes_taken(web_aws) == {item["id"]: {}}


def sqs_down(body: str, attributes: dict | None = None) -> None:
    raise OSError("down")


def test_a_dead_letter_sent_again_is_marked_seen_before(make_web_app, web_aws):
    """So that a worker tries it alone at once: its image may be what crashed the workers
    its dead-lettered copy met. With MAX_RECEIVE_COUNT 1, no attempt is spared for it:
    unmarked, as before."""
    app = make_web_app(start_background=False)
    batch_id, item = uploaded_and_failed(app)
    web_aws.sqs.purge_queue(QueueUrl=web_aws.request_queue_url)  # the upload's own request
    assert app.test_client().post(again_url(batch_id, item["id"])).status_code == 202
    assert attributes_taken(web_aws) == {item["id"]: SEEN_BEFORE}

    one_attempt = make_web_app(start_background=False, max_receive_count=1)
    batch_id, item = uploaded_and_failed(one_attempt, seed=305)
    attributes_taken(web_aws)  # the upload's own request
    assert one_attempt.test_client().post(again_url(batch_id, item["id"])).status_code == 202
    assert attributes_taken(web_aws) == {item["id"]: {}}


def test_a_worker_tries_a_dead_letter_sent_again_alone_at_once(make_web_app, web_aws):
    """Its first attempt shares no model call, so that should its image crash the worker
    again, no batch-mate loses an attempt to it; and it is tried, not taken for one
    whose attempts are used up."""
    from app_tier.worker import Worker
    from tests.unit.test_worker import MeanClassifier

    app = make_web_app(start_background=False)
    batch_id, item = uploaded_and_failed(app)
    web_aws.sqs.purge_queue(QueueUrl=web_aws.request_queue_url)
    fresh = upload(app.test_client(), [(make_image(306), "fresh.jpg")]).get_json()["items"][0]
    assert app.test_client().post(again_url(batch_id, item["id"])).status_code == 202

    model = MeanClassifier()
    worker = Worker(web_aws.settings, web_aws, model, "i-again")
    batch = worker.fetch()
    assert {j.request.id: (j.receive_count, j.attempts_used_up) for j in batch.jobs} == {
        item["id"]: (2, False), fresh["id"]: (1, False)}
    worker.process(batch)
    assert model.calls == 2  # each alone
    got = web_aws.sqs.receive_message(QueueUrl=web_aws.response_queue_url, MaxNumberOfMessages=10)
    answers = [ClassifyResponse.from_json(m["Body"]) for m in got["Messages"]]
    assert sorted((a.id, a.ok) for a in answers) == sorted([(item["id"], True), (fresh["id"], True)])


def test_a_mark_s3_will_not_take_off_leaves_it_failed_and_sends_nothing(make_web_app, web_aws, monkeypatch):
    from botocore.exceptions import ClientError

    app = make_web_app(start_background=False)
    client = app.test_client()
    batch_id, item = uploaded_and_failed(app)
    web_aws.sqs.purge_queue(QueueUrl=web_aws.request_queue_url)

    def s3_fails(**kwargs):
        raise ClientError({"Error": {"Code": "InternalError", "Message": "down"}}, "PutObjectTagging")

    monkeypatch.setattr(web_aws.s3, "put_object_tagging", s3_fails)
    refused = client.post(again_url(batch_id, item["id"]))
    assert (refused.status_code, refused.get_json()["code"]) == (503, "aws_unavailable")
    assert refused.headers["Retry-After"]
    assert refused.get_json()["item"]["state"] == "failed"
    # Nothing sent: not counted as sent again (it said 1, the count of a send undone).
    assert refused.get_json()["item"]["sent_again"] == 0
    assert services_of(app).book.totals()["failed"] == 1
    assert services_of(app).submitter.requeue_unsent() == 0
    assert requests_queued(web_aws) == []


def test_an_image_gone_from_the_input_bucket_is_not_sent_again(make_web_app, web_aws):
    app = make_web_app(start_background=False)
    client = app.test_client()
    batch_id, item = uploaded_and_failed(app)
    key = services_of(app).book.get(item["id"]).key
    web_aws.s3.delete_object(Bucket=web_aws.settings.input_bucket, Key=key)
    refused = client.post(again_url(batch_id, item["id"]))
    assert (refused.status_code, refused.get_json()["code"]) == (409, "not_sent_again")
    assert "no longer in the input bucket" in refused.get_json()["error"]
    assert (items_by_name(client, batch_id)["dead.jpg"]["state"],
            items_by_name(client, batch_id)["dead.jpg"]["sent_again"]) == ("failed", 0)


def test_an_item_forgotten_meanwhile_is_unknown_not_a_conflict(make_web_app, web_aws, monkeypatch):
    """Evicted between the batch's lookup and its queuing again, it is 404 `unknown_item`,
    as the README says, not 409 "no such item"."""
    app = make_web_app(start_background=False)
    batch_id, item = uploaded_and_failed(app)
    book = services_of(app).book

    def evicted_first(item_id, at):
        book.discard(item_id)
        return None

    monkeypatch.setattr(book, "queue_again", evicted_first)
    answer = app.test_client().post(again_url(batch_id, item["id"]))
    assert answer.status_code == 404 and answer.get_json()["code"] == "unknown_item", answer.get_json()
    assert len(requests_queued(web_aws)) == 1  # the upload's own: nothing sent again
