"""POST /: one image in, `<name>:<label>` out, each client its own answer."""

from __future__ import annotations

import contextlib
import io
import threading

import pytest

from tests.conftest import make_image
from tests.unit.conftest import answer_for, services_of, wait_until
from web_tier.form import FORM_SLACK_BYTES

pytestmark = pytest.mark.timeout(120)


def post_image(client, data: bytes, name: str, field: str = "inputFile"):
    return client.post("/", data={field: (io.BytesIO(data), name)}, content_type="multipart/form-data")


def test_round_trip_returns_stem_and_label(web_client, fake_worker):
    data = make_image(1)
    response = post_image(web_client, data, "test_00.JPEG")
    assert response.status_code == 200, response.text
    assert response.mimetype == "text/plain"
    assert response.text.strip() == f"test_00:{answer_for(data)[0]}"
    assert response.headers["X-Model-Untrained"] == "false"


def test_myfile_field_is_accepted(web_client, fake_worker):
    data = make_image(2, fmt="PNG")
    response = post_image(web_client, data, "cat.png", field="myfile")
    assert response.status_code == 200
    assert response.text.strip() == f"cat:{answer_for(data)[0]}"


def test_twenty_concurrent_requests_each_get_their_own_answer(web_app, fake_worker):
    images = {f"img_{n:02d}.jpg": make_image(100 + n) for n in range(20)}
    answers: dict[str, tuple[int, str, str]] = {}
    start = threading.Barrier(len(images))

    def one(name: str, data: bytes) -> None:
        client = web_app.test_client()
        start.wait()
        r = post_image(client, data, name)
        answers[name] = (r.status_code, r.text.strip(), r.headers.get("X-Item-Id", ""))

    threads = [threading.Thread(target=one, args=item) for item in images.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 20
    book = web_app.extensions["imgclass"].book
    for name, data in images.items():
        status, text, item_id = answers[name]
        label, score = answer_for(data)
        assert status == 200
        assert text == f"{name[:-4]}:{label}"
        # The label is unique per image here, and the score too: no answer went to another client.
        assert book.get(item_id).score == pytest.approx(score)
    assert len({text for _, text, _ in answers.values()}) == 20


def test_untrained_answer_is_flagged(web_client, fake_worker):
    fake_worker.untrained = True
    response = post_image(web_client, make_image(3), "a.jpg")
    assert response.status_code == 200
    assert response.headers["X-Model-Untrained"] == "true"


def test_every_answer_says_the_model_is_untrained_refusals_too(make_web_app):
    """README: "in every answer", 504s, 413s and 415s included."""
    untrained = make_web_app(start_background=False, model_weights="random").test_client()
    trained = make_web_app(start_background=False, model_weights="imagenet").test_client()
    for path, data in (("/", {"inputFile": (io.BytesIO(b"not an image"), "a.jpg")}),
                       ("/api/jobs", {"files": (io.BytesIO(b""), "empty.jpg")})):
        refused = untrained.post(path, data=data, content_type="multipart/form-data")
        assert refused.status_code in (400, 415) and refused.headers["X-Model-Untrained"] == "true"
    assert untrained.get("/api/status").headers["X-Model-Untrained"] == "true"
    refused = trained.post("/", data={"inputFile": (io.BytesIO(b"not an image"), "a.jpg")},
                           content_type="multipart/form-data")
    assert refused.status_code == 415 and "X-Model-Untrained" not in refused.headers


def test_an_image_no_worker_answered_says_the_model_is_untrained(make_web_app, web_aws):
    """Dead-lettered, its 422 must not say `X-Model-Untrained: false` while the model is
    untrained and GET /api/jobs says `true` for the same item."""
    from tests.unit.test_web_jobs import dead_letter

    client = make_web_app(model_weights="random").test_client()
    answer: dict = {}
    waiting = threading.Thread(target=lambda: answer.update(r=post_image(client, make_image(6), "lost.jpg")))
    waiting.start()

    def queued() -> int:
        attrs = web_aws.sqs.get_queue_attributes(QueueUrl=web_aws.request_queue_url,
                                                 AttributeNames=["ApproximateNumberOfMessages"])
        return int(attrs["Attributes"]["ApproximateNumberOfMessages"])

    wait_until(lambda: queued() == 1)
    dead_letter(web_aws)
    waiting.join(60)
    assert not waiting.is_alive()
    assert answer["r"].status_code == 422
    assert answer["r"].headers["X-Model-Untrained"] == "true"
    # "Send it again" reads as "upload it again", stored twice: how is said.
    batch_id, item_id = answer["r"].headers["X-Batch-Id"], answer["r"].headers["X-Item-Id"]
    assert answer["r"].text.endswith(f". To send it again without storing it twice: "
                                     f"POST /api/jobs/{batch_id}/items/{item_id}/again")
    page = client.get(f"/answers/{batch_id}")
    assert page.status_code == 422
    assert f"To send it again without storing it twice: the page at /#batches={batch_id}" in page.text


def test_failed_item_is_422_text(web_client, fake_worker):
    fake_worker.policy = lambda request: "fail"
    response = post_image(web_client, make_image(4), "broken.jpg")
    assert response.status_code == 422
    assert response.mimetype == "text/plain"
    assert response.text.strip() == "broken.jpg: cannot decode"
    # As on a 200: where the item is, for GET /api/jobs/<batch>.
    batch = web_client.get(f"/api/jobs/{response.headers['X-Batch-Id']}").get_json()
    assert [(i["id"], i["state"]) for i in batch["items"]] == [(response.headers["X-Item-Id"], "failed")]


def test_an_answer_says_where_its_score_and_top5_are(web_client, fake_worker):
    data = make_image(5)
    response = post_image(web_client, data, "scored.jpg")
    assert response.status_code == 200
    batch = web_client.get(f"/api/jobs/{response.headers['X-Batch-Id']}").get_json()
    (item,) = batch["items"]
    assert item["id"] == response.headers["X-Item-Id"]
    assert item["score"] == pytest.approx(answer_for(data)[1]) and len(item["top5"]) == 5


def test_a_method_not_allowed_names_the_allowed_ones(web_client):
    """The JSON 405 of the API dropped Werkzeug's Allow header."""
    for path, allowed in (("/api/jobs", {"POST"}), ("/api/status", {"GET", "HEAD"})):
        response = web_client.put(path)
        assert response.status_code == 405 and response.is_json
        assert set(response.headers["Allow"].replace(" ", "").split(",")) >= allowed
    # A program's other method on POST /'s path: text, as POST / speaks, not the page's HTML.
    for method in ("PUT", "DELETE", "PATCH"):
        response = web_client.open("/", method=method)
        assert response.status_code == 405 and response.mimetype == "text/plain", method
        assert "POST" in response.headers["Allow"]


def test_result_timeout_counts_from_the_requests_arrival(make_web_app, monkeypatch):
    """Counted from the image being queued, a POST / whose storing took long (S3 or SQS
    failing, retried) would wait RESULT_TIMEOUT more: past a proxy set a little above it,
    its answer is cut off. Here S3 takes 2.5 s of a 3 s RESULT_TIMEOUT."""
    import types

    import web_tier.classify as classify_module
    import web_tier.submit as submit_module

    # A clock of the test's own: what is checked is the time waited for the result,
    # which a busy machine would lengthen on a wall clock.
    now = [1000.0]
    monkeypatch.setattr(classify_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    app = make_web_app(result_timeout_s=3.0, start_background=False)
    put = submit_module.put_input

    def slow_put(*args, **kwargs):
        now[0] += 2.5  # S3 answering late
        return put(*args, **kwargs)

    waits: list[float] = []

    def wait(item_id, timeout):
        waits.append(timeout)
        now[0] += timeout  # no worker runs: each wait runs out
        return None

    monkeypatch.setattr(submit_module, "put_input", slow_put)
    monkeypatch.setattr(services_of(app).book, "wait", wait)
    response = post_image(app.test_client(), make_image(7), "slow.jpg")
    assert response.status_code == 504 and "X-Item-Id" in response.headers
    assert sum(waits) == pytest.approx(0.5), waits  # was 3: counted from the image being stored


def test_no_answer_is_504_and_the_service_keeps_answering(make_web_app, fake_worker):
    app = make_web_app(result_timeout_s=0.5)
    fake_worker.policy = lambda request: "ignore" if request.filename == "lost.jpg" else "ok"
    client = app.test_client()
    response = post_image(client, make_image(5), "lost.jpg")
    assert response.status_code == 504
    assert response.text.startswith("lost.jpg: no result")
    # The caller can still find its image, which stays queued.
    batch_id, item_id = response.headers["X-Batch-Id"], response.headers["X-Item-Id"]
    assert "Retry-After" not in response.headers  # stored: sent again, it would be classified twice (README)
    assert f"/api/jobs/{batch_id}" in response.text
    batch = client.get(f"/api/jobs/{batch_id}").get_json()
    assert [(i["id"], i["filename"], i["state"]) for i in batch["items"]] == [(item_id, "lost.jpg", "queued")]
    # The page's form without JavaScript: its answer page says the image is queued still,
    # at once: that page (not a JSON document) is where its result will be.
    page = client.post("/?answer=page", data={"inputFile": (io.BytesIO(make_image(6)), "lost.jpg")},
                       content_type="multipart/form-data", follow_redirects=True)
    path = page.request.path
    assert page.status_code == 202 and page.mimetype == "text/html" and path.startswith("/answers/")
    assert '<p class="waiting">not classified yet: the image is queued</p>' in page.text
    assert "<title>queued · lost.jpg · Image classification</title>" in page.text
    # It reloads itself only when asked to: each reload takes a keyboard's focus and a
    # screen reader back to the top.
    assert "http-equiv" not in page.text and f'<a href="{path}">Check again</a>' in page.text
    # Each look waits up to 10 s for the label first: "every 5 s" would really be every 15.
    assert f'<a href="{path}?reload=1">look again by itself, 5 s after each answer</a>' in page.text
    reloading = client.get(path + "?reload=1")
    assert reloading.status_code == 202 and '<meta http-equiv="refresh" content="5">' in reloading.text
    assert f'<a href="{path}">Stop reloading</a>' in reloading.text
    # The service still answers; a patient app takes over the response queue.
    services_of(app).stop(timeout=5)
    patient = make_web_app(result_timeout_s=20).test_client()
    data = make_image(6)
    assert post_image(patient, data, "found.jpg").text.strip() == f"found:{answer_for(data)[0]}"


@pytest.mark.parametrize("endpoint_url", [None, "http://127.0.0.1:5000"])
def test_a_waiting_request_answers_503_at_once_when_the_web_tier_stops(make_web_app, fake_worker, web_aws,
                                                                      endpoint_url):
    """Stored and queued, the image needs no second send; unless the AWS it is queued in
    stops too, as the embedded AWS, which keeps nothing, does with `make run`."""
    # Far past the join below: an answer within it was woken by the close, not timed out.
    # The join is long too: on a loaded machine the upload's SQS send can take seconds.
    app = make_web_app(result_timeout_s=600, endpoint_url=endpoint_url, aws=web_aws)
    fake_worker.policy = lambda request: "ignore"
    book = services_of(app).book
    replies = []
    client = app.test_client()
    waiting = threading.Thread(target=lambda: replies.append(post_image(client, make_image(7), "w.jpg")),
                               daemon=True)
    waiting.start()
    wait_until(lambda: book.totals()["uploaded"] == 1)
    book.close()  # what SIGTERM does under gunicorn
    waiting.join(60)
    assert replies, "still waiting"
    reply = replies[0]
    # Stored and queued: no Retry-After, which would invite sending it a second time.
    assert reply.status_code == 503 and "Retry-After" not in reply.headers
    batch_id, item_id = reply.headers["X-Batch-Id"], reply.headers["X-Item-Id"]
    unless = "" if endpoint_url is None else (", unless the AWS at http://127.0.0.1:5000 stops too: "
                                              "make run's embedded AWS keeps nothing across a stop")
    assert reply.text == ("w.jpg: the web tier is stopping; the image is still queued, "
                          f"see /api/jobs/{batch_id} (no need to send it again{unless})")
    assert book.get(item_id).state == "queued"
    # The plain form's answer page says so in a user's words, not an operator's.
    page = client.get(f"/answers/{batch_id}")
    assert page.status_code == 503 and page.mimetype == "text/html"
    assert "the server is restarting; the image is still queued" in page.text and "AWS" not in page.text
    assert "look again by itself, 15 s after each answer" in page.text
    assert '<meta http-equiv="refresh" content="15">' in client.get(f"/answers/{batch_id}?reload=1").text


def test_two_files_to_post_slash_are_refused_naming_them(web_client):
    response = web_client.post("/", data={"inputFile": [(io.BytesIO(make_image(1)), "a.jpg"),
                                                        (io.BytesIO(make_image(2)), "b.jpg")]},
                               content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.text.strip() == ("one file per request here, got 2 (a.jpg, b.jpg); POST several "
                                     "to /api/jobs")


@pytest.mark.parametrize(("where", "field"), [("form", "batch_id"), ("form", "tokens"), ("url", "create")])
def test_batch_fields_sent_to_post_slash_are_refused_not_ignored(web_app, web_aws, where, field):
    """POST / gives its file a batch of its own: a batch_id taken without a word would have
    the client look for its file in the batch it named, where it never is."""
    client = web_app.test_client()
    data = {"inputFile": (io.BytesIO(make_image(1)), "cat.jpg")}
    url = "/"
    if where == "form":
        data[field] = "ab" * 16
    else:
        url = f"/?{field}=1"
    response = client.post(url, data=data, content_type="multipart/form-data")
    assert response.status_code == 400
    # The request refused, not its file: the reason alone, as README says.
    assert response.text == (f"{field} is for POST /api/jobs: POST / puts its one file in a "
                             "batch of its own (to send it again safely, give it an Idempotency-Key header)")
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount") == 0


def test_bad_upload_is_text_naming_the_file(web_client):
    response = post_image(web_client, b"not an image at all", "notes.jpg")
    assert response.status_code == 415
    assert response.mimetype == "text/plain"
    assert response.text.startswith("notes.jpg: ")


def test_missing_file_is_400(web_client):
    response = web_client.post("/", data={}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.mimetype == "text/plain"
    wrong_field = post_image(web_client, make_image(1), "cat.jpg", field="image")
    assert wrong_field.status_code == 400
    # Named, as every refusal of a file is, not "no file".
    assert wrong_field.text == ("cat.jpg: sent in form field 'image': send it in 'inputFile' or 'myfile' "
                                "(curl -F inputFile=@cat.jpg)")
    raw = web_client.post("/", data=make_image(1), content_type="image/jpeg")  # the bytes alone
    assert raw.status_code == 400
    assert raw.text.startswith("no file: send the image as multipart/form-data in form field 'inputFile'")


def test_a_request_queue_that_refuses_the_message_is_a_503(web_app, web_aws):
    client = web_app.test_client()
    web_aws.sqs.delete_queue(QueueUrl=web_aws.request_queue_url)
    response = post_image(client, make_image(3), "lost.jpg")
    assert response.status_code == 503
    assert "could not be stored or queued" in response.text
    assert response.headers["Retry-After"] == "5"  # nothing stored: safe to send again
    assert "X-Batch-Id" not in response.headers and "X-Item-Id" not in response.headers  # (README)
    assert services_of(web_app).book.totals()["uploaded"] == 0  # forgotten: no answer can come
    # Nor is its image left behind, where a batch rebuilt from S3 would show it queued for ever.
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount") == 0


def test_a_body_larger_than_one_file_is_refused_before_it_is_read(web_app, web_settings):
    """POST / takes one file: the app-wide limit is sized for /api/jobs's many."""
    limit = web_settings.max_upload_bytes + FORM_SLACK_BYTES
    assert web_app.config["MAX_CONTENT_LENGTH"] > 2 * limit
    response = post_image(web_app.test_client(), b"\0" * (limit + 1), "huge.jpg")
    assert response.status_code == 413
    # The one file's limit, not the body's (which has room for the form around it).
    max_bytes = web_settings.max_upload_bytes
    assert response.text == (f"huge.jpg: file is larger than the limit of 293 KB ({max_bytes} bytes), or the "
                             f"request holds more than the one file POST / takes (send several to /api/jobs)")


def test_two_files_each_within_the_limit_are_not_said_to_be_one_too_large(web_app, web_settings):
    """Refused unread, the body may be one file too large or several: the answer must not
    name the first of two files within the limit too large, but the one-file rule."""
    half = b"\0" * (web_settings.max_upload_bytes // 2 + FORM_SLACK_BYTES // 2)
    response = web_app.test_client().post("/", data={"inputFile": [(io.BytesIO(half), "small1.jpg"),
                                                                   (io.BytesIO(half), "small2.jpg")]},
                                          content_type="multipart/form-data")
    assert response.status_code == 413
    assert response.text.startswith("small1.jpg: ")
    assert "more than the one file POST / takes (send several to /api/jobs)" in response.text


def test_no_text_answer_ends_with_a_newline(make_web_app, fake_worker):
    """If some answers ended with one and others not, a client comparing the body would
    have to strip some answers only. As the 200, which the contract fixes: none."""
    client = make_web_app().test_client()
    fake_worker.policy = lambda request: "fail" if request.filename == "broken.jpg" else "ok"
    answers = {
        "200": post_image(client, make_image(3), "cat.jpg"),
        "422": post_image(client, make_image(4), "broken.jpg"),
        "400": client.post("/", data={}, content_type="multipart/form-data"),
        "415": post_image(client, b"not an image", "notes.jpg"),
        "405": client.put("/"),
        "401": post_image(make_web_app(start_background=False, api_key="k").test_client(), b"x", "a.jpg"),
    }
    for status, response in answers.items():
        assert str(response.status_code) == status and response.mimetype == "text/plain", response.text
        assert response.text and not response.text.endswith(("\n", "\r")), (status, response.text)


def test_a_stopping_web_tier_stores_no_new_image(web_app, web_aws):
    """Nobody would wait for its answer: it said 503 'still queued' for an image it had
    just stored, inviting a second upload of it. Now nothing is stored, as /api/jobs does."""
    web_app.extensions["imgclass"].book.close()  # SIGTERM
    response = post_image(web_app.test_client(), make_image(6), "late.jpg")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "X-Batch-Id" not in response.headers  # nothing stored (README)
    assert response.text == "late.jpg: not stored: the web tier is stopping; send this file again"
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0


def post_with_key(client, data: bytes, name: str, key: str):
    return client.post("/", data={"inputFile": (io.BytesIO(data), name)}, content_type="multipart/form-data",
                       headers={"Idempotency-Key": key})


def stored_inputs(web_aws) -> list[str]:
    listed = web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("Contents", [])
    return [o["Key"] for o in listed]


def test_sent_again_under_its_idempotency_key_an_image_is_stored_and_classified_once(
        make_web_app, web_aws, fake_worker):
    """A program whose connection was cut before the answer sends the image again: it
    was stored, and classified, twice."""
    data, key = make_image(31), "0f6e2a5c-6a3e-4a5b-9f36-7f3f7d4f0e11"
    before = make_web_app()
    first = post_with_key(before.test_client(), data, "cut.jpg", key)
    assert first.status_code == 200, first.text
    assert post_with_key(before.test_client(), data, "cut.jpg", key).text == first.text
    services_of(before).stop()  # and then a new web tier, which knows it only from S3
    client = make_web_app().test_client()
    again = post_with_key(client, data, "cut.jpg", key)
    assert again.status_code == 200 and again.text == first.text
    assert again.headers["X-Item-Id"] == first.headers["X-Item-Id"]
    assert len(stored_inputs(web_aws)) == 1 and fake_worker.handled == 1
    other = post_with_key(client, make_image(32), "cut.jpg", "another-key-0000001")
    assert other.status_code == 200 and other.headers["X-Item-Id"] != first.headers["X-Item-Id"]


def test_a_full_book_keeps_a_keys_batch_from_its_look_up_to_its_upload(make_web_app, web_aws, fake_worker):
    """A full book let the key's batch go between the look for it and the image's
    adding (its one image answered): the resend was stored and classified again."""
    data, key = make_image(36), "5d0c8f7e-2222-4333-8444-555566667777"
    app = make_web_app()
    first = post_with_key(app.test_client(), data, "cut.jpg", key)
    assert first.status_code == 200, first.text
    svc = services_of(app)
    real_find = svc.rebuilder.find_batch

    def find_then_evict(batch_id):
        found = real_find(batch_id)
        forget_finished_batches(svc.book)  # as a full book does, the batch finished whole
        return found

    svc.rebuilder.find_batch = find_then_evict
    again = post_with_key(app.test_client(), data, "cut.jpg", key)
    assert again.status_code == 200 and again.headers["X-Item-Id"] == first.headers["X-Item-Id"]
    assert len(stored_inputs(web_aws)) == 1 and fake_worker.handled == 1


def forget_finished_batches(book) -> None:
    """What a book past its cap does at each result: it forgets every finished batch
    that no request holds in use."""
    with book._lock:
        limit, book._max_items = book._max_items, 0
        book._evict()
        book._max_items = limit


@pytest.mark.parametrize("asked", ["POST / sent again under its key", "its answer page",
                                   "its answer page, rebuilt from S3"])
def test_an_answered_image_a_full_book_forgets_meanwhile_is_answered_still(make_web_app, fake_worker, asked):
    """Under a backlog past the book's cap, each result forgets the finished batches:
    one forgotten between a request's look-up and its wait must not read as no result in
    300 s (a 504 at once), or as queued on its answer page, or as no such upload."""
    data, key = make_image(37), "6e1d9f8a-3333-4444-8555-666677778888"
    app = make_web_app()
    first = post_with_key(app.test_client(), data, "cut.jpg", key)
    assert first.status_code == 200, first.text
    batch_id = first.headers["X-Batch-Id"]
    if asked == "its answer page, rebuilt from S3":
        services_of(app).stop()
        app = make_web_app()
    book = services_of(app).book
    real_wait, real_merge = book.wait, book.merge

    def forget_then_wait(*args, **kwargs):
        forget_finished_batches(book)
        return real_wait(*args, **kwargs)

    def merge_then_forget(*args, **kwargs):
        merged = real_merge(*args, **kwargs)
        forget_finished_batches(book)
        return merged

    book.wait, book.merge = forget_then_wait, merge_then_forget
    if asked == "POST / sent again under its key":
        again = post_with_key(app.test_client(), data, "cut.jpg", key)
        assert (again.status_code, again.text) == (200, first.text)
    else:
        page = app.test_client().get(f"/answers/{batch_id}")
        assert page.status_code == 200, page.text
        assert f'Label: <span class="label">{first.text.rpartition(":")[2]}</span>' in page.text
    assert fake_worker.handled == 1


def test_idempotency_keys_of_16_and_of_64_characters_are_taken(web_client, fake_worker):
    """The README's 16 to 64, both ends."""
    for n, key in enumerate(("k" * 16, "k" * 64)):
        response = post_with_key(web_client, make_image(40 + n), f"k{n}.jpg", key)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("key, status, says", [
    ("short", 400, "an Idempotency-Key is 16 to 64 letters"),
    ("k" * 65, 400, "an Idempotency-Key is 16 to 64 letters"),
    ("with spaces in it, sixteen+", 400, "an Idempotency-Key is 16 to 64 letters"),
])
def test_a_malformed_idempotency_key_is_refused(web_client, web_aws, key, status, says):
    response = post_with_key(web_client, make_image(33), "k.jpg", key)
    assert response.status_code == status and says in response.text
    assert stored_inputs(web_aws) == []


def test_an_idempotency_key_sent_again_with_another_file_is_a_409(web_client, web_aws, fake_worker):
    key = "3c1b9e0a-1111-4222-8333-444455556666"
    assert post_with_key(web_client, make_image(34), "first.jpg", key).status_code == 200
    clash = post_with_key(web_client, make_image(35), "second.jpg", key)
    assert clash.status_code == 409 and clash.text.startswith("second.jpg: this Idempotency-Key came before")
    # The same name with other bytes is another file too, not given the first one's answer.
    clash = post_with_key(web_client, make_image(35), "first.jpg", key)
    assert clash.status_code == 409 and clash.text.startswith("first.jpg: this Idempotency-Key came before")
    assert len(stored_inputs(web_aws)) == 1


@pytest.mark.parametrize("descriptor", [None, 1030], ids=["low", "past-select's-1024"])
def test_a_request_whose_client_left_stops_waiting_and_gives_its_thread_back(make_web_app, monkeypatch,
                                                                              descriptor):
    """A client that gave up (its own timeout, a proxy's) must not hold a thread until
    RESULT_TIMEOUT: clients sending again on a 5 s timeout would take all 1,024 threads
    and /healthz with them. No worker answers here. A socket numbered 1,024 or more, as
    a busy web tier's are, must not look connected for ever."""
    import os
    import resource
    import socket

    from web_tier import classify as classify_module

    # Checked often, so that the test sees it check a connected client several times.
    monkeypatch.setattr(classify_module, "CLIENT_CHECK_S", 0.01)
    real_client_left = classify_module._client_left
    checks: list[bool] = []

    def client_left() -> bool:
        checks.append(real_client_left())
        return checks[-1]

    monkeypatch.setattr(classify_module, "_client_left", client_left)
    client = make_web_app(start_background=False, result_timeout_s=60).test_client()
    server_side, client_side = socket.socketpair()  # as gunicorn gives the request's socket
    if descriptor is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= descriptor:
            pytest.skip(f"the hard limit on open files ({hard}) is below {descriptor}")
        if soft != resource.RLIM_INFINITY and soft <= descriptor:
            resource.setrlimit(resource.RLIMIT_NOFILE, (descriptor + 1, hard))
        low = server_side.detach()
        os.dup2(low, descriptor)
        os.close(low)
        server_side = socket.socket(fileno=descriptor)
    with server_side:
        answers: list = []
        waiting = threading.Thread(target=lambda: answers.append(client.post(
            "/", data={"inputFile": (io.BytesIO(make_image(6)), "left.jpg")},
            content_type="multipart/form-data", environ_base={"gunicorn.socket": server_side})))
        waiting.start()
        wait_until(lambda: len(checks) >= 3)
        assert waiting.is_alive() and not any(checks)  # it waits: the client is still there
        client_side.close()  # the client gives up
        waiting.join(10)  # far short of RESULT_TIMEOUT's 60 s
    assert not waiting.is_alive()
    assert answers[0].status_code == 499
    assert answers[0].text.startswith("left.jpg: the client left; the image is still queued, see /api/jobs/")


def test_a_client_that_reset_its_connection_has_left(make_web_app):
    """A reset (RST), as proxies and clients that time out often send, is a client gone:
    taken for one still there, its request would hold a thread until RESULT_TIMEOUT."""
    import socket
    import struct

    from web_tier.classify import _client_left

    app = make_web_app(start_background=False)
    with tcp_pair() as (server_side, client_side), \
            app.test_request_context("/", environ_base={"gunicorn.socket": server_side}):
        assert not _client_left()
        client_side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client_side.close()  # closed with no lingering: a reset
        assert wait_until(_client_left, 10)


@contextlib.contextmanager
def tcp_pair():
    """Both ends of a TCP connection on loopback, as gunicorn's socket and its client's."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_side = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    with server_side, client_side:
        yield server_side, client_side


def test_a_client_that_sent_a_byte_after_its_request_and_closed_has_left(make_web_app):
    """A peek read that byte, never the end behind it: such a client held its thread
    until RESULT_TIMEOUT with no socket open (pipelining clients too)."""
    import socket

    from web_tier.classify import _client_left

    app = make_web_app(start_background=False)
    with tcp_pair() as (server_side, client_side), \
            app.test_request_context("/", environ_base={"gunicorn.socket": server_side}):
        client_side.sendall(b"X")
        assert wait_until(lambda: server_side.recv(1, socket.MSG_PEEK) == b"X", 10)  # it is there
        assert not _client_left()  # a byte more, as a pipelined request: still there
        client_side.close()
        assert wait_until(_client_left, 10)


def test_a_file_input_left_blank_is_no_file(web_client):
    """A browser sends an empty part with no file name for a file input left blank: it is
    no file, not an empty one named "upload"."""
    blank = (io.BytesIO(b""), "")
    response = web_client.post("/", data={"inputFile": blank}, content_type="multipart/form-data")
    assert response.status_code == 400 and response.text.startswith("no file: send the image"), response.text
    beside = web_client.post("/api/jobs", data={"files": [(io.BytesIO(make_image(8)), "real.jpg"),
                                                          (io.BytesIO(b""), "")]},
                             content_type="multipart/form-data")
    assert beside.status_code == 202, beside.text
    body = beside.get_json()
    assert [i["filename"] for i in body["items"]] == ["real.jpg"] and body["rejected"] == [], body


def test_a_client_still_connected_is_not_taken_for_one_that_left(make_web_app, fake_worker, monkeypatch):
    import importlib
    import socket

    monkeypatch.setattr(importlib.import_module("web_tier.classify"), "CLIENT_CHECK_S", 0.005)
    client = make_web_app(result_timeout_s=30).test_client()
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        response = client.post("/", data={"inputFile": (io.BytesIO(make_image(7)), "stayed.jpg")},
                               content_type="multipart/form-data",
                               environ_base={"gunicorn.socket": server_side})
    assert response.status_code == 200 and response.text == f"stayed:{answer_for(make_image(7))[0]}"


def test_a_file_still_being_stored_under_its_idempotency_key_is_said_so_in_those_words(
        make_web_app, monkeypatch):
    """The 503 must not speak of a "token", which POST / callers never send."""
    from web_tier.refusals import Code, Refusal
    from web_tier.submit import STILL_STORING

    app = make_web_app(start_background=False)
    still_storing = Refusal(503, STILL_STORING, "k.jpg", code=Code.BUSY)
    monkeypatch.setattr(services_of(app).submitter, "submit",
                        lambda batch_id, uploads, *rest: [still_storing])
    response = app.test_client().post("/", data={"inputFile": (io.BytesIO(make_image(8)), "k.jpg")},
                                      content_type="multipart/form-data",
                                      headers={"Idempotency-Key": "a-key-of-sixteen-or-more"})
    assert response.status_code == 503
    assert "an earlier request with the same Idempotency-Key is storing this file" in response.text


def test_a_waiting_request_holds_neither_its_image_nor_its_spool(make_web_app, web_aws, monkeypatch):
    """Both referenced while POST / waits for its answer, up to RESULT_TIMEOUT, 100
    waiting 9 MB uploads would hold 1 GB, and a descriptor each for those over 500 KB."""
    import gc
    import weakref

    from tests.unit.conftest import FakeWorker
    from web_tier import classify as classify_module

    seen: dict = {}
    real_validate = classify_module.validate

    def recording(storage, settings):
        upload = real_validate(storage, settings)
        seen["upload"], seen["storage"] = weakref.ref(upload), storage
        return upload

    monkeypatch.setattr(classify_module, "validate", recording)
    client = make_web_app(result_timeout_s=30).test_client()
    image = make_image(9)
    waiting = threading.Thread(target=lambda: seen.setdefault("answer", post_image(client, image, "a.jpg")))
    waiting.start()
    # Stored and queued first: the request now waits (its answer 30 s away, no worker
    # running yet). Only then collect, twice a second: collecting every 20 ms from the
    # start walked TensorFlow's heap too, holding the GIL from the very request it
    # waited for, which CI once saw not let go in 20 s.
    def queued() -> int:
        attributes = web_aws.sqs.get_queue_attributes(QueueUrl=web_aws.request_queue_url,
                                                      AttributeNames=["ApproximateNumberOfMessages"])
        return int(attributes["Attributes"]["ApproximateNumberOfMessages"])

    wait_until(lambda: queued() == 1, 20)

    def holders() -> str:
        upload = seen["upload"]()
        if upload is None:
            return ""
        # A running function's local is no referrer gc sees.
        return "held by " + (", ".join(type(r).__name__ for r in gc.get_referrers(upload)) or "a local")

    wait_until(lambda: gc.collect() >= 0 and seen["upload"]() is None, 20, interval=0.5, why=holders)
    assert seen["storage"].stream.closed and "answer" not in seen
    worker = FakeWorker(web_aws).start()
    try:
        waiting.join(20)
    finally:
        worker.stop()
    assert seen["answer"].status_code == 200


# --- the page's form without JavaScript ----------------------------------------------


def test_the_plain_forms_answer_page_waits_seconds_not_the_result_timeout(make_web_app, monkeypatch):
    """Waited for up to RESULT_TIMEOUT, the answer page would leave the browser on the
    form's address: a user who stops or reloads it loses the way to the answer."""
    from web_tier import classify as classify_module

    monkeypatch.setattr(classify_module, "ANSWER_PAGE_WAIT_S", 5.0)
    waits: list[float] = []

    def wait_while_connected(book, item_id, timeout_s):
        waits.append(timeout_s)
        return None, False  # no worker: it stays queued

    monkeypatch.setattr(classify_module, "_wait_while_connected", wait_while_connected)
    client = make_web_app(result_timeout_s=20).test_client()
    stored = client.post("/?answer=page", data={"inputFile": (io.BytesIO(make_image(5)), "q.jpg")},
                         content_type="multipart/form-data")
    page = client.get(stored.location)
    assert page.status_code == 202 and waits == [5.0]
    assert "Check again" in page.text
    # HEAD (a link checker, a chat's preview) reads no label: answered at once.
    assert client.head(stored.location).status_code == 202 and waits == [5.0, 0.0]


def test_without_javascript_the_page_offers_a_plain_form_whose_answer_is_a_page(web_client, fake_worker):
    """With JavaScript off the page would show "Connecting…" for ever and its controls do
    nothing when used: it hides them, and offers a form for one image."""
    page = web_client.get("/").text
    assert 'href="/static/noscript.css"' in page and 'class="status needs-js"' in page
    assert 'id="drop-zone" class="drop-zone needs-js"' in page
    assert '<form method="post" action="/?answer=page" enctype="multipart/form-data">' in page
    assert 'name="inputFile"' in page
    assert web_client.get("/static/noscript.css").text.count(".needs-js { display: none") == 1

    fake_worker.untrained = True
    data = make_image(7)
    stored = web_client.post("/?answer=page", data={"inputFile": (io.BytesIO(data), "<b>cat</b>.jpg")},
                             content_type="multipart/form-data")
    # The answer is a page of its own: reloading it asks again, where reloading the
    # POST's own answer would send the image again.
    assert stored.status_code == 303 and stored.location.startswith("/answers/")
    response = web_client.get(stored.location)
    assert response.status_code == 200 and response.mimetype == "text/html"
    body = response.text
    label, score = answer_for(data)[:2]
    assert f'Label: <span class="label">{label}</span> <span class="score">{score * 100:.1f}%</span>' in body
    assert f"<title>{label} (untrained) · &lt;b&gt;cat&lt;/b&gt;.jpg · Image classification</title>" in body
    assert "&lt;b&gt;cat&lt;/b&gt;.jpg" in body and "<b>cat" not in body  # its name, escaped
    # Untrained, said on the page, not only in a header a person never sees.
    assert "UNTRAINED model" in body and '<span class="untrained-mark">untrained</span>' in body
    assert 'href="/">Classify another image</a>' in body
    assert 'http-equiv="refresh"' not in body  # answered: it reloads itself no more
    assert web_client.get(stored.location).text == body  # a reload
    batch_id = stored.location.removeprefix("/answers/")
    assert len(web_client.get(f"/api/jobs/{batch_id}").get_json()["items"]) == 1

    unknown = web_client.get("/answers/" + "0" * 32)
    assert unknown.status_code == 404 and "no such upload here" in unknown.text
    # Its title says so too: "Upload" reads as the upload page's.
    assert "<title>no such upload here · Image classification</title>" in unknown.text
    # A batch of POST /api/jobs is no one upload: one of its images is not its answer.
    files = [(io.BytesIO(make_image(n)), f"{n}.jpg") for n in (8, 9)]
    batch = web_client.post("/api/jobs", data={"files": files}, content_type="multipart/form-data")
    several = web_client.get(f"/answers/{batch.get_json()['batch_id']}")
    assert several.status_code == 404 and "this is a batch of 2 images, not one upload" in several.text
    assert f"/#batches={batch.get_json()['batch_id']}" in several.text
    # A link there, not an address to copy.
    assert f'<a href="/#batches={batch.get_json()["batch_id"]}">Show them all</a>' in several.text
    assert web_client.get("/answers/nope").status_code == 404
    no_id = web_client.get("/answers/")
    assert no_id.status_code == 404 and "no such upload here" in no_id.text
    # Without the slash too, not Werkzeug's redirect to it: that named whatever host the
    # client said, which a shared cache in front could keep and give to everyone.
    bare = web_client.get("/answers", headers={"Host": "elsewhere.example"})
    assert bare.status_code == 404 and "no such upload here" in bare.text
    assert "Location" not in bare.headers and bare.headers["Cache-Control"] == "no-store"


def test_the_plain_forms_refusals_are_pages_and_say_why(web_client):
    response = web_client.post("/?answer=page", data={"inputFile": (io.BytesIO(b"not an image"), "a.jpg")},
                               content_type="multipart/form-data")
    assert response.status_code in (400, 415) and response.mimetype == "text/html"
    assert '<p class="error">' in response.text and "a.jpg" in response.text
    empty = web_client.post("/?answer=page", data={}, content_type="multipart/form-data")
    assert empty.status_code == 400 and empty.mimetype == "text/html" and '<p class="error">' in empty.text
    # Programs still get their line of text.
    plain = web_client.post("/", data={"inputFile": (io.BytesIO(b"not an image"), "a.jpg")},
                            content_type="multipart/form-data")
    assert plain.mimetype == "text/plain" and plain.text.startswith("a.jpg: ")


def test_without_javascript_a_server_needing_a_key_says_the_form_cannot_send_it(make_web_app):
    client = make_web_app(start_background=False, api_key="s3cret-key").test_client()
    page = client.get("/").text
    assert "requires an API key, which a plain form cannot send" in page
    assert "answer=page" not in page  # no form that could only be refused
    # The address to send to, not "ADDRESS being this page's"; and not "classify one
    # image at a time" just before saying it cannot.
    assert "-F inputFile=@cat.jpg http://localhost/</code>" in page
    assert "one image at a time" not in page
    refused = client.post("/?answer=page", data={"inputFile": (io.BytesIO(make_image(1)), "a.jpg")},
                          content_type="multipart/form-data")
    assert refused.status_code == 401 and refused.mimetype == "text/html"
    # Its title whole: cut at the colon in "Authorization: Bearer", it ends mid-bracket.
    assert ("<title>a valid API key is required (X-API-Key header, or Authorization: Bearer) · "
            "Image classification</title>") in refused.text


@pytest.mark.parametrize(("untrained", "title"), [(True, "tabby (untrained) · cat.jpg"),
                                                  (False, "tabby · cat.jpg")])
def test_the_answer_pages_title_says_a_label_is_untrained_as_the_page_does(web_app, untrained, title):
    """The tab, history and bookmarks show the title alone: it must not read "tabby ·
    cat.jpg" under an untrained model, where the page says UNTRAINED."""
    from web_tier.errors import answer_page

    with web_app.test_request_context("/answers/" + "0" * 32):
        page = answer_page(200, "", "cat.jpg", "tabby", untrained, score=0.5).get_data(as_text=True)
    assert f"<title>{title} · Image classification</title>" in page


@pytest.mark.parametrize(("message", "title"), [
    ("no such upload here: classify the image again", "no such upload here"),
    ("a valid API key is required (X-API-Key header, or Authorization: Bearer)",
     "a valid API key is required (X-API-Key header, or Authorization: Bearer)"),
    ("odd) text: more", "odd) text"),  # a stray ")" counts for nothing
])
def test_a_title_without_a_file_is_the_message_up_to_its_colon_outside_parentheses(message, title):
    from web_tier.errors import _up_to_its_colon

    assert _up_to_its_colon(message) == title


def test_post_answers_and_answer_pages_are_not_kept_by_caches(web_client):
    """They hold a file's name and label (or "still queued", stale once the label comes);
    the page's script and style may be kept."""
    refused = web_client.post("/", data={"inputFile": (io.BytesIO(b""), "")},
                              content_type="multipart/form-data")
    page = web_client.get(f"/answers/{'ab' * 16}")
    assert refused.headers.get("Cache-Control") == page.headers.get("Cache-Control") == "no-store"
    script = web_client.get("/static/style.css")
    assert script.status_code == 200 and script.headers.get("Cache-Control") != "no-store"
