"""Error answers for programs: every JSON error has a stable `code` (web_tier/refusals.py),
every path under /api answers JSON, and POST / answers JSON to a client that asks for it."""

from __future__ import annotations

import ast
import io
import re
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.conftest import make_image, silent_endpoint
from tests.unit.conftest import answer_for, services_of, upload, wait_until
from web_tier.refusals import SEND_AGAIN, Code, code_of_status

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
JSON = {"Accept": "application/json"}


def post_image(client, data: bytes, name: str, headers: dict | None = None, path: str = "/"):
    return client.post(path, data={"inputFile": (io.BytesIO(data), name)}, content_type="multipart/form-data",
                       headers=headers or {})


def error_of(response) -> dict:
    """The JSON error body, checked for the shape every one has."""
    assert response.is_json, (response.status_code, response.text)
    body = response.get_json()
    assert body["error"] and "filename" in body, body
    assert body["code"] in set(Code), body
    return body


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api"), ("POST", "/api"), ("GET", "/api/"), ("GET", "/api/nope"), ("GET", "/api/job"),
    ("GET", f"/api/jobs/{'ab' * 16}/nope"), ("HEAD", "/api"),
    # Doubled slashes would have Werkzeug's HTML redirect to the path with one.
    ("GET", "/api//status"), ("GET", "/api/jobs//results.csv"), ("GET", "/api/jobs//events"),
    ("POST", f"/api/jobs/{'ab' * 16}//items/x/again")])
def test_every_unknown_path_under_api_is_a_json_404_with_its_code(web_client, method, path):
    """`GET /api` (no slash) is JSON too, not Flask's HTML 404, as /api/... is."""
    response = web_client.open(path, method=method)
    assert response.status_code == 404 and response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"  # every /api answer (README)
    if method != "HEAD":
        assert error_of(response)["code"] == "not_found"


def test_a_method_an_api_path_does_not_take_is_a_json_405_naming_the_others(web_client):
    response = web_client.delete("/api/status")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}


def test_options_answers_the_allowed_methods_as_flask_does(web_client):
    """Flask's own OPTIONS: a 200 with an empty body, and an Allow header that names
    exactly each route's methods (README, Error codes): nothing to add."""
    for path, allowed in (("/api/jobs", {"POST", "OPTIONS"}), ("/", {"GET", "HEAD", "POST", "OPTIONS"}),
                          (f"/api/jobs/{'ab' * 16}", {"GET", "HEAD", "OPTIONS"})):
        response = web_client.options(path)
        assert response.status_code == 200 and response.data == b"", path
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == allowed, path


def test_each_refused_file_of_a_batch_carries_its_code(web_client):
    response = upload(web_client, [(make_image(1), "good.jpg"), (b"nope", "notes.jpg"), (b"", "empty.jpg"),
                                   (b"GIF89a" + b"\0" * 20, "cut.gif")])
    assert response.status_code == 202
    assert [(r["filename"], r["code"], r["status"]) for r in response.get_json()["rejected"]] == [
        ("notes.jpg", "not_an_image", 415), ("empty.jpg", "empty_file", 400),
        ("cut.gif", "unreadable_image", 422)]


def test_a_batch_refused_whole_while_stopping_says_busy_with_retry_after(web_app):
    services_of(web_app).book.close()  # SIGTERM
    response = upload(web_app.test_client(), [(make_image(2), "late.jpg")])
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    body = error_of(response)
    assert body["code"] == "busy" and body["rejected"][0]["code"] == "busy"


def test_an_unknown_batch_and_too_many_event_streams_have_their_codes(web_client, web_app):
    assert error_of(web_client.get(f"/api/jobs/{'ab' * 16}"))["code"] == "unknown_batch"
    assert error_of(web_client.get(f"/api/jobs/{'ab' * 16}/events"))["code"] == "unknown_batch"
    batch_id = upload(web_client, [(make_image(3), "a.jpg")]).get_json()["batch_id"]
    streams = services_of(web_app).event_streams
    while streams.acquire(blocking=False):  # every slot taken
        pass
    response = web_client.get(f"/api/jobs/{batch_id}/events")
    assert response.status_code == 503 and response.headers["Retry-After"] == "10"
    assert error_of(response)["code"] == "busy"


def test_aws_failing_and_an_unexpected_error_have_their_codes(make_web_app, monkeypatch):
    app = make_web_app(start_background=False)
    client = app.test_client()
    rebuilder = services_of(app).rebuilder

    def aws_fails(batch_id):
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"}}, "ListObjectsV2")

    monkeypatch.setattr(rebuilder, "find_batch", aws_fails)
    response = client.get(f"/api/jobs/{'ab' * 16}")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert error_of(response)["code"] == "aws_unavailable"

    def breaks(batch_id):
        raise RuntimeError("a bug")

    monkeypatch.setattr(rebuilder, "find_batch", breaks)
    response = client.get(f"/api/jobs/{'ab' * 16}")
    assert response.status_code == 500 and error_of(response)["code"] == "internal"
    assert "Retry-After" not in response.headers


def test_an_s3_that_stopped_answering_refuses_an_upload_after_a_few_tries_not_minutes(monkeypatch):
    """With the usual 6 tries of 30 s for an upload's put, then as many for its delete,
    an S3 that stops answering would hold each upload 6 minutes before its 503, long
    after the page (30 s) and most clients give up. So UPLOAD_ATTEMPTS tries of the put,
    and one of the delete."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import common.aws
    from common.aws import UPLOAD_ATTEMPTS, Aws
    from common.config import Settings
    from web_tier.image_check import Upload
    from web_tier.refusals import Refusal
    from web_tier.results import ResultBook
    from web_tier.submit import Submitter

    monkeypatch.setattr(common.aws, "UPLOAD_READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(common.aws, "PROBE_READ_TIMEOUT_S", 0.3)
    with silent_endpoint() as (url, accepted), ThreadPoolExecutor(2) as pool:
        aws = Aws(dataclasses.replace(Settings(), endpoint_url=url), keys=("testing", "testing"))
        submitter = Submitter(aws, ResultBook(), pool, requests=None)
        [outcome] = submitter.submit("ab" * 16, [Upload("cat.jpg", make_image(1), "image/jpeg")])
        assert isinstance(outcome, Refusal) and outcome.code == Code.AWS_UNAVAILABLE
        assert len(accepted) == UPLOAD_ATTEMPTS + 1 < 6


def test_a_batch_looked_up_in_an_s3_that_stopped_answering_is_answered_503_after_a_few_tries(
        web_aws, monkeypatch):
    """A batch this process does not hold is looked for in S3, and the request waits:
    with the usual 6 tries of 30 s, each such request to a stalled S3 (any id will do,
    no key needed) held a thread of the web tier's for minutes. The web tier's S3
    client gives up as an upload's put does, after UPLOAD_ATTEMPTS tries."""
    import dataclasses

    import common.aws
    from common.aws import UPLOAD_ATTEMPTS
    from web_tier import create_app

    monkeypatch.setattr(common.aws, "UPLOAD_READ_TIMEOUT_S", 0.3)
    with silent_endpoint() as (url, accepted):
        app = create_app(dataclasses.replace(web_aws.settings, endpoint_url=url), start_background=False)
        response = app.test_client().get(f"/api/jobs/{'cd' * 16}")
        assert response.status_code == 503 and error_of(response)["code"] == "aws_unavailable"
        assert len(accepted) == UPLOAD_ATTEMPTS < 6


@pytest.mark.parametrize("failure", ["outage", "bug"])
def test_an_upload_refused_for_an_aws_outage_is_logged_in_one_line_a_bug_with_its_traceback(
        web_aws, monkeypatch, caplog, failure):
    """An outage fails every file of a request alike: a traceback each (~190 lines a
    file, its put's and its delete's) would fill the log. A fault in the code keeps its
    traceback, to be found."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from botocore.exceptions import EndpointConnectionError

    import web_tier.submit
    from web_tier.image_check import Upload
    from web_tier.refusals import Refusal
    from web_tier.results import ResultBook
    from web_tier.submit import Submitter

    raised = (EndpointConnectionError(endpoint_url="http://s3.example:443") if failure == "outage"
              else RuntimeError("a bug"))

    def fails(*args, **kwargs):
        raise raised

    monkeypatch.setattr(web_tier.submit, "put_input", fails)
    monkeypatch.setattr(web_aws.probes["s3"], "delete_object", fails)
    caplog.set_level(logging.INFO, logger="web_tier.submit")
    uploads = [Upload(f"cat{n}.jpg", make_image(n), "image/jpeg") for n in range(3)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = Submitter(web_aws, ResultBook(), pool, requests=None).submit("ab" * 16, uploads)
    assert all(isinstance(o, Refusal) and o.code == Code.AWS_UNAVAILABLE for o in outcomes)
    said = [r for r in caplog.records if r.getMessage().startswith(("could not submit", "could not delete"))]
    assert len(said) == 6 and all(r.levelname == "ERROR" for r in said)
    if failure == "outage":
        assert all(r.exc_info is None for r in said)
        assert all("EndpointConnectionError: Could not connect" in r.getMessage() for r in said)
    else:
        assert all(r.exc_info and r.exc_info[1] is raised for r in said)


def test_healthz_says_aws_unavailable(web_client, web_aws):
    web_aws.sqs.delete_queue(QueueUrl=web_aws.request_queue_url)
    response = web_client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["ok"] is False and response.get_json()["code"] == "aws_unavailable"


@pytest.mark.parametrize(("accept", "mimetype"), [
    (None, "text/plain"),
    ("*/*", "text/plain"),  # curl's, requests'
    ("application/json", "application/json"),
    ("application/json, text/plain", "text/plain"),  # no preference: the contract's text
    ("text/plain;q=0.5, application/json", "application/json"),
    ("application/*", "application/json"),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "text/plain"),  # a browser's
    ("text/html;q=0.9, application/json", "application/json"),
])
def test_post_slash_answers_json_only_to_a_client_that_prefers_it(web_client, accept, mimetype):
    headers = {"Accept": accept} if accept else {}
    response = web_client.post("/", data={}, content_type="multipart/form-data", headers=headers)
    assert response.status_code == 400 and response.mimetype == mimetype
    if mimetype == "application/json":
        assert error_of(response)["code"] == "bad_request"


def test_the_plain_forms_page_stays_a_page_whatever_it_accepts(web_client):
    response = post_image(web_client, b"not an image", "notes.jpg", JSON, path="/?answer=page")
    assert response.status_code == 415 and response.mimetype == "text/html"


def test_post_slash_in_json_answers_each_refusal_with_its_code(make_web_app, fake_worker, web_settings):
    client = make_web_app().test_client()
    keyed = make_web_app(start_background=False, api_key="k").test_client()
    fake_worker.policy = lambda request: "fail" if request.filename == "broken.jpg" else "ok"
    huge = b"\0" * (web_settings.max_upload_bytes * 2 + (2 << 20))
    two = [(io.BytesIO(make_image(1)), "a.jpg"), (io.BytesIO(make_image(2)), "b.jpg")]
    answers = {
        ("422", "classification_failed"): post_image(client, make_image(4), "broken.jpg", JSON),
        ("400", "no_file"): client.post("/", data={"note": "x"}, content_type="multipart/form-data",
                                        headers=JSON),
        ("400", "too_many_files"): client.post("/", data={"inputFile": two},
                                               content_type="multipart/form-data", headers=JSON),
        ("400", "bad_request"): post_image(client, make_image(5), "k.jpg",
                                           {**JSON, "Idempotency-Key": "short"}),
        ("415", "not_an_image"): post_image(client, b"not an image", "notes.jpg", JSON),
        ("413", "too_large"): post_image(client, huge, "huge.jpg", JSON),
        ("405", "method_not_allowed"): client.put("/", headers=JSON),
        ("401", "unauthorized"): post_image(keyed, make_image(6), "a.jpg", JSON),
        ("403", "forbidden"): post_image(client, make_image(6), "a.jpg",
                                         {**JSON, "Sec-Fetch-Site": "cross-site"}),
    }
    for (status, code), response in answers.items():
        assert str(response.status_code) == status, (code, response.text)
        assert error_of(response)["code"] == code, response.text
    failed = answers["422", "classification_failed"]
    assert (failed.get_json()["batch_id"], failed.get_json()["id"]) == (
        failed.headers["X-Batch-Id"], failed.headers["X-Item-Id"])  # stored: where it is
    # Its item says the code too; an item not failed has none.
    items = client.get(f"/api/jobs/{failed.get_json()['batch_id']}").get_json()["items"]
    assert [(item["state"], item["code"]) for item in items] == [("failed", "classification_failed")]
    answered = post_image(client, make_image(9), "fine.jpg", JSON)
    assert answered.status_code == 200 and answered.get_json()["code"] is None
    assert "batch_id" not in answers["415", "not_an_image"].get_json()  # nothing stored
    assert answers["413", "too_large"].get_json()["filename"] == "huge.jpg"
    assert answers["401", "unauthorized"].headers["WWW-Authenticate"]


def test_post_slash_in_json_answers_its_label_as_the_api_shows_the_item(web_client, fake_worker):
    data = make_image(7)
    response = post_image(web_client, data, "cat.jpg", JSON)
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    label, score = answer_for(data)
    assert (body["filename"], body["state"], body["label"]) == ("cat.jpg", "done", label)
    assert body["score"] == pytest.approx(score)
    assert (body["batch_id"], body["id"]) == (response.headers["X-Batch-Id"], response.headers["X-Item-Id"])
    # The same item GET /api/jobs/<batch_id> shows.
    assert web_client.get(f"/api/jobs/{body['batch_id']}").get_json()["items"] == [
        {k: v for k, v in body.items() if k != "batch_id"}]
    # Without Accept, the contract's line still.
    assert post_image(web_client, data, "cat.jpg").text == f"cat:{label}"


def test_post_slash_in_json_says_what_was_stored_and_what_to_send_again(make_web_app, fake_worker, web_aws):
    """timeout and still_queued: stored, not to be sent again (no Retry-After); busy and
    aws_unavailable: nothing stored, to be sent again (Retry-After)."""
    app = make_web_app(result_timeout_s=0.5)
    fake_worker.policy = lambda request: "ignore"
    client = app.test_client()
    timeout = post_image(client, make_image(8), "lost.jpg", JSON)
    assert timeout.status_code == 504 and error_of(timeout)["code"] == "timeout"
    assert "Retry-After" not in timeout.headers and timeout.headers["X-Batch-Id"]
    assert (error_of(timeout)["batch_id"], error_of(timeout)["id"]) == (
        timeout.headers["X-Batch-Id"], timeout.headers["X-Item-Id"])

    patient = make_web_app(result_timeout_s=30)
    book = services_of(patient).book
    replies = []
    waiting = threading.Thread(target=lambda: replies.append(
        post_image(patient.test_client(), make_image(9), "w.jpg", JSON)))
    waiting.start()
    wait_until(lambda: book.totals()["uploaded"] == 1)
    book.close()  # SIGTERM
    waiting.join(10)
    assert replies, "still waiting"
    assert replies[0].status_code == 503 and error_of(replies[0])["code"] == "still_queued"
    assert "Retry-After" not in replies[0].headers and replies[0].headers["X-Batch-Id"]
    assert error_of(replies[0])["batch_id"] == replies[0].headers["X-Batch-Id"]

    stopping = post_image(patient.test_client(), make_image(10), "late.jpg", JSON)
    assert stopping.status_code == 503 and error_of(stopping)["code"] == "busy"
    assert stopping.headers["Retry-After"] == "5"

    fake_worker.stop()  # (it reads the queue deleted next)
    web_aws.sqs.delete_queue(QueueUrl=web_aws.request_queue_url)
    unqueued = post_image(client, make_image(11), "unqueued.jpg", JSON)
    assert unqueued.status_code == 503 and error_of(unqueued)["code"] == "aws_unavailable"
    assert unqueued.headers["Retry-After"] == "5"


def test_werkzeugs_own_refusals_have_a_code_by_their_status():
    assert [code_of_status(s) for s in (400, 404, 405, 413, 416, 431, 500, 501)] == [
        "bad_request", "not_found", "method_not_allowed", "request_too_large", "bad_request", "bad_request",
        "internal", "internal"]


def test_every_refusal_the_web_tier_makes_names_its_code():
    """A code is required (a refusal without one would fail at the moment it is made):
    found here for every path, tested or not."""
    missing = []
    for source in sorted((ROOT / "web_tier").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Refusal" \
                    and not any(k.arg == "code" for k in node.keywords):
                missing.append(f"{source.name}:{node.lineno}")
    assert not missing


def test_the_readme_lists_every_code_and_which_to_send_again():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Error codes.**"):]
    section = section[:section.index("\n\n**")]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \|[^|]*\|[^|]*\| (yes|no)[^|]*\|$", section, re.M))
    assert set(rows) == {c.value for c in Code}
    assert {code for code, again in rows.items() if again == "yes"} == {c.value for c in SEND_AGAIN}


def test_post_slash_says_a_dead_letter_is_one_to_send_again_by_its_code(web_app, web_aws):
    """A dead letter (no worker answered it in the attempts allowed) must not share
    `classification_failed`, the code README says not to send again, which an image the
    model cannot read gets: a program could tell the two apart only by the prose. It has
    a code of its own, with where the item is, to queue it again."""
    from common.failure_tags import DEAD_LETTER_ERROR
    from tests.unit.test_web_jobs import dead_letter

    answers: list = []
    waiting = threading.Thread(target=lambda: answers.append(
        post_image(web_app.test_client(), make_image(8), "dead.jpg", JSON)))
    waiting.start()
    request = dead_letter(web_aws)
    waiting.join(30)
    response = answers[0]
    assert response.status_code == 422 and error_of(response)["code"] == "dead_letter"
    body = response.get_json()
    assert (body["id"], response.headers["X-Item-Id"]) == (request.id, request.id)
    assert body["batch_id"] == response.headers["X-Batch-Id"]
    assert body["error"] == (f"{DEAD_LETTER_ERROR}. To send it again without storing it twice: "
                             f"POST /api/jobs/{body['batch_id']}/items/{request.id}/again")
    assert Code.DEAD_LETTER not in SEND_AGAIN  # not as it is: queued again in place, by its item
    # The batch's item says so too, for a program that follows GET /api/jobs.
    items = web_app.test_client().get(f"/api/jobs/{body['batch_id']}").get_json()["items"]
    assert [(item["state"], item["code"]) for item in items] == [("failed", "dead_letter")]


class BodyThatStops(io.BytesIO):
    """A request body whose reading fails part of the way, as gunicorn's does once the
    receive timeout (web_tier/slow_clients.py) ends a read that got nothing."""

    def __init__(self, data: bytes, stop_at: int, error: OSError | None = None) -> None:
        super().__init__(data)
        self.stop_at = stop_at
        self.error = error or BlockingIOError(11, "Resource temporarily unavailable")

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.stop_at:
            raise self.error
        wanted = size if size is not None and size >= 0 else self.stop_at
        return super().read(min(wanted, self.stop_at - self.tell()))

    def readinto(self, buffer) -> int:  # Werkzeug's LimitedStream reads so
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


@pytest.mark.parametrize("path", ["/", "/api/jobs"])
def test_a_body_that_stops_arriving_is_answered_408_nothing_stored(web_app, web_aws, path):
    """Werkzeug's generic 400 ("the browser (or proxy) sent a request that this server
    could not understand") said neither what happened nor that nothing was stored."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app
    from werkzeug.wrappers import Response

    field = "inputFile" if path == "/" else "files"
    environ = EnvironBuilder(path=path, method="POST",
                             data={field: (io.BytesIO(make_image(71)), "cut.jpg")}).get_environ()
    body = environ["wsgi.input"].read()
    environ["wsgi.input"] = BodyThatStops(body, len(body) // 2)
    response = Response(*run_wsgi_app(web_app, environ, buffered=True))
    text = response.get_data(as_text=True)
    assert response.status_code == 408, text
    assert "the request's body stopped arriving before its end; nothing was stored" in text
    assert response.headers.get("Retry-After") == "5"
    if path == "/api/jobs":
        assert response.get_json()["code"] == Code.REQUEST_TIMEOUT
    listed = web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0)
    assert listed == 0


def test_a_body_too_slow_is_answered_408_saying_so_nothing_stored(web_app, web_aws):
    """A body cut for averaging under WEB_MIN_RECEIVE_RATE (web_tier/slow_clients.py) did
    not stop: the 408 says what it did, and that a faster link is what it needs."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app
    from werkzeug.wrappers import Response

    from web_tier.slow_clients import ClientTooSlow

    environ = EnvironBuilder(path="/", method="POST",
                             data={"inputFile": (io.BytesIO(make_image(72)), "slow.jpg")}).get_environ()
    body = environ["wsgi.input"].read()
    environ["wsgi.input"] = BodyThatStops(body, len(body) // 2, ClientTooSlow(110, "too slow"))
    response = Response(*run_wsgi_app(web_app, environ, buffered=True))
    text = response.get_data(as_text=True)
    settings = web_aws.settings
    assert response.status_code == 408, text
    said = (f"the request's body came too slowly (under {settings.min_receive_rate} bytes a second after "
            f"its first {settings.receive_timeout_s:g} s); nothing was stored")
    assert text.startswith(said), text
    assert response.headers.get("Retry-After") == "5"
    assert web_aws.s3.list_objects_v2(Bucket=settings.input_bucket).get("KeyCount", 0) == 0
