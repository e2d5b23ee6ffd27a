"""The web tier's journal: what a killed web tier stored and never queued is queued at the next start."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.aws import Aws
from common.messages import ClassifyRequest
from tests.conftest import make_image
from tests.unit.conftest import FakeWorker, services_of, wait_until
from web_tier.journal import Journal, read_pending

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def request_body(item_id: str, key: str, bucket: str = "imgclass-in-bucket") -> str:
    return ClassifyRequest(id=item_id, bucket=bucket, key=key, filename=key.rsplit("/", 1)[-1],
                           sent_at=1.0).to_json()


def test_a_journal_holds_what_was_begun_and_not_ended(tmp_path):
    journal = Journal(tmp_path)
    journal.begin("a", request_body("a", "b/a/1.jpg"))
    journal.begin("b", request_body("b", "b/b/2.jpg"))
    journal.end("a")
    journal.end("never-begun")  # nothing written for it
    assert journal.pending() == {"b": request_body("b", "b/b/2.jpg")}
    assert read_pending(journal.path.read_bytes()) == journal.pending()


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path):
    whole = request_body("a", "b/a/1.jpg")
    data = f"+ a {whole}\n+ b {request_body('b', 'b/b/2.jpg')[:30]}".encode()
    assert read_pending(data) == {"a": whole}


def test_a_long_journal_is_replaced_by_one_holding_only_what_is_pending(tmp_path):
    journal = Journal(tmp_path, max_lines=10)
    for n in range(20):
        journal.begin(str(n), request_body(str(n), f"b/{n}/x.jpg"))
        if n != 7:
            journal.end(str(n))
    files = list(tmp_path.iterdir())
    assert files == [journal.path]
    assert read_pending(journal.path.read_bytes()) == {"7": request_body("7", "b/7/x.jpg")}
    assert len(journal.path.read_bytes().splitlines()) < 10


def test_a_journal_with_more_pending_than_its_limit_is_not_rewritten_at_every_end(tmp_path, monkeypatch):
    """With more pending than max_lines (an S3 outage's uploads), rewriting every pending
    line at each end, under the lock each upload takes, costs 168 ms an end at 20,000."""
    journal = Journal(tmp_path, max_lines=10)
    for n in range(40):
        journal.begin(str(n), request_body(str(n), f"b/{n}/x.jpg"))
    made = []
    new_file = journal._new_file
    monkeypatch.setattr(journal, "_new_file", lambda: made.append(1) or new_file())
    for n in range(40):
        journal.end(str(n))
        assert read_pending(journal.path.read_bytes()) == {str(m): request_body(str(m), f"b/{m}/x.jpg")
                                                           for m in range(n + 1, 40)}
    assert 1 <= len(made) <= 6  # was 34: one at each end once past 10 lines
    assert list(tmp_path.iterdir()) == [journal.path]


def test_a_write_cut_short_loses_no_other_line(tmp_path, monkeypatch):
    """os.write may take only part of a line (a disk filling up): the rest is written
    after it, and a line cut short by a failure then is skipped alone, not losing the
    next line, appended to it."""
    import web_tier.journal as journal_module

    journal = Journal(tmp_path)
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:7]))  # part of it, then the rest when asked
        if len(calls) == 3:
            return real_write(fd, bytes(data[:9]))
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", write)
    journal.begin("a", request_body("a", "b/a/1.jpg"))
    journal.begin("b", request_body("b", "b/b/2.jpg"))  # cut short: lost, as unwritten
    journal.begin("c", request_body("c", "b/c/3.jpg"))
    assert read_pending(journal.path.read_bytes()) == {"a": request_body("a", "b/a/1.jpg"),
                                                       "c": request_body("c", "b/c/3.jpg")}


def test_a_file_a_killed_process_left_unnamed_is_deleted_once_a_minute_old(tmp_path):
    """Killed between making a new journal and naming it, a process leaves a hidden
    `.<name>.new` file that must not stay for ever."""
    left = tmp_path / ".123-abcdef01.new"
    left.write_bytes(b"")
    fresh = tmp_path / ".124-abcdef02.new"  # one a live process is making right now
    fresh.write_bytes(b"")
    os.utime(left, (1_000_000, 1_000_000))
    journal = Journal(tmp_path)
    assert journal.adopt_orphans() == {}
    assert not left.exists() and fresh.exists()
    assert journal.path.exists()


def test_an_unnamed_file_that_cannot_be_deleted_lets_the_orphans_be_taken_and_keeps_no_descriptor(
        tmp_path, monkeypatch):
    """Its deletion refused (a read-only or foreign file), the error escaped: no dead
    journal was taken that round, and the file's locked descriptor stayed open, so that
    it looked alive to this process for good."""
    left = tmp_path / ".123-abcdef01.new"
    left.write_bytes(b"")
    os.utime(left, (1_000_000, 1_000_000))
    dead = Journal(tmp_path)
    dead.begin("a", request_body("a", "b/a/1.jpg"))
    dead.close()
    unlink = Path.unlink

    def refused(path, missing_ok=False):
        if path == left:
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    journal = Journal(tmp_path)
    opened = set(os.listdir("/proc/self/fd"))
    assert journal.adopt_orphans() == {"a": request_body("a", "b/a/1.jpg")}
    assert set(os.listdir("/proc/self/fd")) <= opened  # none left open on the unnamed file
    monkeypatch.setattr(Path, "unlink", unlink)  # the next round deletes it
    assert journal.adopt_orphans() == {} and not left.exists()


def test_a_live_processs_journal_is_never_taken_and_a_dead_ones_is_taken_once(tmp_path):
    live = Journal(tmp_path)
    live.begin("a", request_body("a", "b/a/1.jpg"))
    starting = Journal(tmp_path)
    assert starting.adopt_orphans() == {}
    assert live.path.exists()

    live.close()  # as at its process's death: the lock goes with the file descriptor
    assert starting.adopt_orphans() == {"a": request_body("a", "b/a/1.jpg")}
    assert not live.path.exists()
    assert starting.pending() == {"a": request_body("a", "b/a/1.jpg")}
    # Now in a live journal: a third process takes nothing.
    assert Journal(tmp_path).adopt_orphans() == {}


def test_a_process_killed_with_sigkill_leaves_its_journal_to_the_next(tmp_path):
    body = request_body("a", "b/a/1.jpg")
    script = (
        "import os, signal, sys; from pathlib import Path; from web_tier.journal import Journal; "
        "j = Journal(Path(sys.argv[1])); j.begin('a', sys.argv[2]); j.begin('b', sys.argv[2]); j.end('b'); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    process = subprocess.run([sys.executable, "-c", script, str(tmp_path), body], cwd=ROOT, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == -9
    assert Journal(tmp_path).adopt_orphans() == {"a": body}


def queued_requests(aws: Aws) -> list[ClassifyRequest]:
    found = []
    while True:
        messages = aws.sqs.receive_message(QueueUrl=aws.request_queue_url, MaxNumberOfMessages=10,
                                           VisibilityTimeout=60).get("Messages", [])
        if not messages:
            return found
        found.extend(ClassifyRequest.from_json(m["Body"]) for m in messages)


def test_a_starting_web_tier_queues_what_a_killed_one_stored_and_never_sent(make_web_app, web_aws, tmp_path):
    s3, settings = web_aws.s3, web_aws.settings
    old = Journal(tmp_path)
    stored = request_body("1" * 32, "b1/i1/stored.jpg")
    never_stored = request_body("2" * 32, "b1/i2/never.jpg")
    answered = request_body("3" * 32, "b1/i3/answered.jpg")
    for body in (stored, never_stored, answered):
        old.begin(json.loads(body)["id"], body)
    s3.put_object(Bucket=settings.input_bucket, Key="b1/i1/stored.jpg", Body=make_image(1))
    s3.put_object(Bucket=settings.input_bucket, Key="b1/i3/answered.jpg", Body=make_image(3))
    s3.put_object(Bucket=settings.output_bucket, Key="b1/i3/answered.jpg", Body=b"answered.jpg,cat")
    old.close()

    app = make_web_app(web_journal_dir=str(tmp_path))  # its listeners started, and the requeue loop
    journal = services_of(app).journal
    wait_until(lambda: not old.path.exists() and journal.pending() == {})
    assert [r.key for r in queued_requests(web_aws)] == ["b1/i1/stored.jpg"]
    assert read_pending(journal.path.read_bytes()) == {}


def test_a_request_that_cannot_be_sent_now_is_sent_at_the_next_round(make_web_app, web_aws, tmp_path):
    web_aws.s3.put_object(Bucket=web_aws.settings.input_bucket, Key="b1/i1/stored.jpg", Body=make_image(1))
    old = Journal(tmp_path)
    old.begin("1" * 32, request_body("1" * 32, "b1/i1/stored.jpg"))
    old.begin("2" * 32, "{not a request}")
    old.close()
    app = make_web_app(web_journal_dir=str(tmp_path), start_background=False)
    submitter, journal = services_of(app).submitter, services_of(app).journal
    send = submitter.requests.send

    def refuse(body: str) -> None:
        raise ConnectionError("SQS is down")

    submitter.requests.send = refuse
    assert submitter.requeue_unsent() == 0
    # Kept, on disk too, for this process's next round or the next process; the
    # line that is no request is dropped, not carried from start to start.
    assert list(journal.pending()) == ["1" * 32]
    assert list(read_pending(journal.path.read_bytes())) == ["1" * 32]

    submitter.requests.send = send
    assert submitter.requeue_unsent() == 1
    assert [r.key for r in queued_requests(web_aws)] == ["b1/i1/stored.jpg"]
    assert journal.pending() == {}


def test_a_requeue_round_that_raises_is_logged_and_the_loop_goes_on(make_web_app, monkeypatch, caplog):
    """The background requeue (web_tier._requeue_unsent): a round that raises is
    logged, and the rounds after it still run, until the app is stopped."""
    import web_tier
    from web_tier.submit import Submitter

    rounds: list[int] = []

    def flaky(self) -> int:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise ConnectionError("S3 is down")
        return 2 if len(rounds) == 2 else 0

    monkeypatch.setattr(web_tier, "REQUEUE_EVERY_S", 0.01)
    monkeypatch.setattr(Submitter, "requeue_unsent", flaky)
    app = make_web_app(start_background=True)
    wait_until(lambda: len(rounds) >= 3, timeout=30, why=lambda: f"{len(rounds)} rounds ran")
    [failed] = [r for r in caplog.records if "could not requeue" in r.getMessage()]
    assert failed.levelname == "ERROR" and failed.exc_info[0] is ConnectionError
    assert "queued 2 uploads stored with no request sent" in caplog.text

    services_of(app).stopped.set()
    loops = [t for t in threading.enumerate() if t.name == "requeue-unsent"]
    for loop in loops:
        loop.join(30)
    assert not any(loop.is_alive() for loop in loops), "the requeue loop did not stop"


def test_a_refused_upload_whose_image_cannot_be_deleted_is_queued_later(make_web_app, web_aws, tmp_path):
    """Stored, its request refused and its deletion too: left so, it would be
    queued for ever (a batch rebuilt from S3 lists it)."""
    app = make_web_app(web_journal_dir=str(tmp_path), start_background=False)
    submitter = services_of(app).submitter
    send = submitter.requests.send

    def refuse(body: str) -> None:
        raise ConnectionError("SQS is down")

    def cannot_delete(**kwargs) -> None:
        raise ConnectionError("S3 is down")

    submitter.requests.send = refuse
    s3 = submitter.aws.probes["s3"]  # the client a refused upload's image is deleted with
    s3.delete_object = cannot_delete

    def upload():
        form = {"files": [(io.BytesIO(make_image(1)), "a.jpg")], "batch_id": "a" * 32, "create": "1",
                "tokens": "0"}
        return app.test_client().post("/api/jobs", data=form, content_type="multipart/form-data")

    reply = upload()
    del s3.delete_object  # the client's own again
    # Accepted: it will be queued. A 503 (with Retry-After, as every 503 refusal has:
    # nothing stored) had it sent again, and, through POST /, classified twice.
    assert reply.status_code == 202 and reply.get_json()["items"][0]["filename"] == "a.jpg"
    assert len(services_of(app).journal.pending()) == 1  # on disk, should this process die
    # Sent again under its token, it is not stored a second time: it will be queued.
    again = upload().get_json()
    assert again["items"][0]["again"] is True
    assert len(services_of(app).journal.pending()) == 1

    submitter.requests.send = send
    assert submitter.requeue_unsent() == 1
    assert [r.filename for r in queued_requests(web_aws)] == ["a.jpg"]
    assert services_of(app).journal.pending() == {}


def _sends_then_says_maybe(submitter) -> None:
    """Its request messages go out, and their sends then fail as one whose first try had
    no answer does: SendError, maybe taken."""
    from web_tier.sender import SendError

    send = submitter.requests.send

    def sent_but_unanswered(body: str) -> None:
        send(body)
        raise SendError("the send failed (ReadTimeoutError)", maybe_taken=True)

    submitter.requests.send = sent_but_unanswered


def test_an_upload_whose_request_sqs_may_hold_is_accepted_and_kept(make_web_app, web_aws, tmp_path,
                                                                   fake_worker):
    """Refused with its image deleted when a send failed after a try SQS had taken, it
    would be answered "image missing" by the worker, a failed item the client was told
    was never stored."""
    fake_worker.stop()  # its message waits in the queue
    app = make_web_app(web_journal_dir=str(tmp_path))
    submitter = services_of(app).submitter
    _sends_then_says_maybe(submitter)
    form = {"files": [(io.BytesIO(make_image(3)), "a.jpg")], "create": "1"}
    reply = app.test_client().post("/api/jobs", data=form, content_type="multipart/form-data")
    assert reply.status_code == 202, reply.get_json()
    batch_id, item = reply.get_json()["batch_id"], reply.get_json()["items"][0]
    key = f"{batch_id}/{item['id']}/a.jpg"
    web_aws.s3.head_object(Bucket=web_aws.settings.input_bucket, Key=key)  # kept
    assert list(services_of(app).journal.pending()) == [item["id"]]  # to be sent again later
    worker = FakeWorker(web_aws).start()
    try:
        wait_until(lambda: app.test_client().get(f"/api/jobs/{batch_id}").get_json()["items"][0]["state"]
                   == "done")
    finally:
        worker.stop()
    assert worker.handled == 1  # the message SQS took
    assert submitter.requeue_unsent() == 0  # answered: not sent again
    assert services_of(app).journal.pending() == {}


def test_a_post_whose_request_sqs_may_hold_gets_its_label(make_web_app, tmp_path, fake_worker):
    """Answered by a worker while its send still failed, the upload must not be answered
    503 "try again" and classified twice when sent again."""
    app = make_web_app(web_journal_dir=str(tmp_path))
    _sends_then_says_maybe(services_of(app).submitter)
    reply = app.test_client().post("/", data={"myfile": (io.BytesIO(make_image(4)), "b.jpg")},
                                   content_type="multipart/form-data")
    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert reply.get_data(as_text=True).startswith("b:label-")
    assert fake_worker.handled == 1


@pytest.mark.parametrize("s3_wrote_it", [True, False])
def test_a_store_that_failed_and_cannot_be_undone_is_queued_later_if_s3_has_it(
        make_web_app, web_aws, tmp_path, monkeypatch, s3_wrote_it):
    """A put that raises may have stored its object (an ambiguous 500, a timeout after
    the write): deleted, nothing is left; when the deletion fails too, the request is
    kept unsent, and queued once S3 answers if the object is there."""
    import web_tier.submit

    app = make_web_app(web_journal_dir=str(tmp_path), start_background=False)
    submitter, journal = services_of(app).submitter, services_of(app).journal
    real_put = web_tier.submit.put_input

    def failing_put(*args, **kwargs):
        if s3_wrote_it:
            real_put(*args, **kwargs)
        raise ConnectionError("S3 is down")

    def cannot_delete(**kwargs) -> None:
        raise ConnectionError("S3 is down")

    monkeypatch.setattr(web_tier.submit, "put_input", failing_put)
    s3 = submitter.aws.probes["s3"]  # the client a refused upload's image is deleted with
    s3.delete_object = cannot_delete
    form = {"files": [(io.BytesIO(make_image(1)), "a.jpg")], "batch_id": "a" * 32, "create": "1"}
    reply = app.test_client().post("/api/jobs", data=form, content_type="multipart/form-data")
    assert reply.status_code == 503
    assert len(journal.pending()) == 1  # on disk, should this process die

    monkeypatch.setattr(web_tier.submit, "put_input", real_put)
    del s3.delete_object  # the client's own again
    assert submitter.requeue_unsent() == int(s3_wrote_it)
    assert [r.filename for r in queued_requests(web_aws)] == (["a.jpg"] if s3_wrote_it else [])
    assert journal.pending() == {}


def test_a_failed_store_that_lands_after_its_deletion_is_queued_later(make_web_app, web_aws, tmp_path,
                                                                       monkeypatch):
    """A put that timed out may still be under way at S3, and land after the delete that
    followed it: the object would stay with its token, and no request ever be sent for it."""
    import web_tier.submit

    app = make_web_app(web_journal_dir=str(tmp_path), start_background=False)
    submitter = services_of(app).submitter
    real_put = web_tier.submit.put_input
    late: list[tuple] = []

    def timed_out(*args, **kwargs):
        late.append((args, kwargs))  # S3 writes it, later
        raise ConnectionError("read timeout")

    monkeypatch.setattr(web_tier.submit, "put_input", timed_out)
    form = {"files": [(io.BytesIO(make_image(2)), "late.jpg")], "batch_id": "b" * 32, "create": "1"}
    reply = app.test_client().post("/api/jobs", data=form, content_type="multipart/form-data")
    assert reply.status_code == 503
    [(args, kwargs)] = late
    real_put(*args, **kwargs)  # the write lands, after the delete
    assert submitter.requeue_unsent() == 1
    assert [r.filename for r in queued_requests(web_aws)] == ["late.jpg"]


def test_an_upload_in_flight_when_its_web_tier_dies_is_queued_by_the_next(make_web_app, web_aws, tmp_path):
    # The first web tier stores the image, then dies before its request is sent.
    dying = make_web_app(web_journal_dir=str(tmp_path), start_background=False)
    sender = services_of(dying).submitter.requests
    stored, never = threading.Event(), threading.Event()

    def die_before_sending(body: str) -> None:
        stored.set()
        never.wait()

    sender.send = die_before_sending
    client = dying.test_client()
    data = {"files": [(io.BytesIO(make_image(9)), "in flight.jpg")]}
    upload = threading.Thread(target=client.post, args=("/api/jobs",),
                              kwargs={"data": data, "content_type": "multipart/form-data"}, daemon=True)
    upload.start()
    assert stored.wait(30)
    services_of(dying).journal.close()  # its death, as far as the journal can tell

    make_web_app(web_journal_dir=str(tmp_path))
    requests = wait_until(lambda: queued_requests(web_aws), timeout=30)
    assert [r.filename for r in requests] == ["in flight.jpg"]
    body = web_aws.s3.get_object(Bucket=web_aws.settings.input_bucket, Key=requests[0].key)["Body"].read()
    assert body == make_image(9)
    never.set()


def test_uploads_queued_or_refused_leave_nothing_pending(make_web_app, tmp_path):
    app = make_web_app(web_journal_dir=str(tmp_path), start_background=False)
    client = app.test_client()
    ok = client.post("/api/jobs", data={"files": [(io.BytesIO(make_image(1)), "a.jpg")]},
                     content_type="multipart/form-data")
    assert ok.status_code == 202

    def refuse(body: str) -> None:
        raise ConnectionError("SQS is down")

    services_of(app).submitter.requests.send = refuse
    refused = client.post("/api/jobs", data={"files": [(io.BytesIO(make_image(2)), "b.jpg")]},
                          content_type="multipart/form-data")
    assert refused.status_code == 503
    journal = services_of(app).journal
    assert journal.pending() == {}
    assert read_pending(journal.path.read_bytes()) == {}


def test_a_journal_is_locked_before_a_starting_process_can_see_it(tmp_path, monkeypatch):
    """Locked only after it had its name, a new journal could be taken for a dead
    one's by a process starting at that moment, and deleted."""
    from web_tier import journal as journal_module

    other = Journal(tmp_path / "other")
    real_flock = journal_module.fcntl.flock
    seen = []

    def flock_while_another_starts(fd, operation):
        if operation == journal_module.fcntl.LOCK_EX:  # a new journal locking itself
            other.directory = tmp_path
            seen.append(other.adopt_orphans())
        return real_flock(fd, operation)

    monkeypatch.setattr(journal_module.fcntl, "flock", flock_while_another_starts)
    journal = Journal(tmp_path)
    journal.begin("a", request_body("a", "b/a/1.jpg"))
    assert seen == [{}]
    assert journal.path.exists()
    assert read_pending(journal.path.read_bytes()) == {"a": request_body("a", "b/a/1.jpg")}


def test_a_journal_that_cannot_write_does_not_fail_the_upload(make_web_app, web_aws, tmp_path, caplog):
    app = make_web_app(web_journal_dir=str(tmp_path), start_background=False)
    journal = services_of(app).journal
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, journal._fd)  # the disk is full from now on
    os.close(full)
    reply = app.test_client().post("/api/jobs", data={"files": [(io.BytesIO(make_image(1)), "a.jpg")]},
                                   content_type="multipart/form-data")
    assert reply.status_code == 202
    assert [r.filename for r in queued_requests(web_aws)] == ["a.jpg"]
    assert "cannot write the journal" in caplog.text


def test_a_compaction_that_cannot_write_keeps_the_old_file(tmp_path, monkeypatch):
    journal = Journal(tmp_path, max_lines=4)
    journal.begin("a", request_body("a", "b/a/1.jpg"))
    first = journal.path
    journal.begin("b", request_body("b", "b/b/2.jpg"))
    journal.begin("c", request_body("c", "b/c/3.jpg"))
    real_write = os.write

    def full_disk_for_new_files(fd, data):
        if fd != journal._fd or journal.path != first:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("web_tier.journal.os.write", full_disk_for_new_files)
    journal.end("c")  # the fourth line: compaction, whose new file cannot be written
    monkeypatch.undo()
    assert journal.path == first and first.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert set(read_pending(first.read_bytes())) == {"a", "b"}


def test_a_compacted_file_that_cannot_be_deleted_fails_no_upload_and_keeps_no_descriptor(
        tmp_path, monkeypatch, caplog):
    """Its deletion refused, the error escaped from Journal.end into the upload that
    ended the item, and the old file's descriptor stayed open."""
    journal = Journal(tmp_path, max_lines=4)
    for name in "abc":
        journal.begin(name, request_body(name, f"b/{name}/1.jpg"))
    first, unlink = journal.path, Path.unlink

    def refused(path, missing_ok=False):
        if path == first:
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    opened = set(os.listdir("/proc/self/fd"))
    journal.end("c")  # the fourth line: compaction, whose old file cannot be deleted
    assert journal.path != first and set(read_pending(journal.path.read_bytes())) == {"a", "b"}
    assert len(set(os.listdir("/proc/self/fd")) - opened) <= 1  # the new file's, the old one's closed
    assert "cannot delete the compacted journal" in caplog.text


@pytest.mark.parametrize("failing", ["open", "rename"])
def test_a_compaction_whose_new_file_cannot_be_made_keeps_the_old_one(tmp_path, monkeypatch, caplog, failing):
    """The new file not made (no room for it, or its rename refused): the old journal,
    which holds every pending request, stays in use, nothing half-made is left, and
    the log says so; the next compaction is tried once as many lines again are written."""
    journal = Journal(tmp_path, max_lines=4)
    for item in "abc":
        journal.begin(item, request_body(item, f"b/{item}/1.jpg"))
    first = journal.path
    real = getattr(os, failing)

    def refused(path, *args, **kwargs):
        if str(path).endswith(".new"):
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, failing, refused)
    journal.end("c")  # the fourth line: a compaction, whose new file cannot be made
    journal.begin("d", request_body("d", "b/d/1.jpg"))  # still written, to the old file
    monkeypatch.undo()
    assert journal.path == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert set(read_pending(first.read_bytes())) == set(journal.pending()) == {"a", "b", "d"}
    assert f"cannot start a new journal in {tmp_path}" in caplog.text and f"{first} grows on" in caplog.text

    journal.end("a")
    journal.begin("e", request_body("e", "b/e/1.jpg"))
    journal.end("b")  # four lines since the failure: compacted this time
    assert journal.path != first and not first.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.path.name]
    assert set(read_pending(journal.path.read_bytes())) == {"d", "e"}


def test_a_journal_that_cannot_be_read_does_not_stop_the_others_being_taken(tmp_path):
    """A directory named like a journal (or a file another user's web tier left)
    made the whole call fail, after it had deleted the journals before it."""
    dead = Journal(tmp_path)
    dead.begin("a", request_body("a", "b/a/1.jpg"))
    dead.close()
    (tmp_path / "zzz-unreadable.journal").mkdir()
    assert Journal(tmp_path).adopt_orphans() == {"a": request_body("a", "b/a/1.jpg")}
    assert not dead.path.exists()


def test_a_dead_journal_not_copied_whole_is_left_for_later(tmp_path):
    dead = Journal(tmp_path)
    dead.begin("a", request_body("a", "b/a/1.jpg"))
    dead.close()
    starting = Journal(tmp_path)
    full = os.open("/dev/full", os.O_WRONLY)
    saved = os.dup(starting._fd)
    os.dup2(full, starting._fd)  # the disk is full
    assert starting.adopt_orphans() == {}
    assert dead.path.exists() and starting.pending() == {}
    os.dup2(saved, starting._fd)  # it has room again
    os.close(full)
    os.close(saved)
    assert starting.adopt_orphans() == {"a": request_body("a", "b/a/1.jpg")}
    assert not dead.path.exists()
    assert read_pending(starting.path.read_bytes()) == {"a": request_body("a", "b/a/1.jpg")}
