"""A worker killed outright: the next worker on its instance shows what it held at once."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time

import pytest
from moto import mock_aws

from app_tier.held_journal import HeldEntry, HeldJournal, held_journal_path
from app_tier.worker import Worker
from common.aws import Aws
from common.config import Settings
from common.provision import provision
from common.sqs import VisibilityFailure
from tests.conftest import make_image
from tests.unit.test_worker import MeanClassifier, crash, depth, responses, upload


@pytest.fixture
def aws_env(tmp_path):
    with mock_aws():
        # A timeout far past the test: a message seen again came back by the journal.
        settings = dataclasses.replace(Settings(), receive_wait_s=0, visibility_timeout_s=600,
                                       max_receive_count=3, retry_delay_s=0, state_dir=str(tmp_path))
        provision(settings)
        yield settings, Aws(settings)


def killed_in(worker: Worker, jobs: list) -> None:
    """The worker is killed in a decode or a model call of `jobs`: it never ends (kept
    with the worker: a context collected would end)."""
    worker.never_ended = worker.held.at_risk(jobs)
    worker.never_ended.__enter__()


def test_the_next_worker_on_an_instance_shows_what_a_killed_one_held(aws_env, caplog):
    settings, aws = aws_env
    for i in range(3):
        upload(settings, aws, f"held_{i}.jpg", make_image(100 + i), f"held-{i}")
    killed = Worker(settings, aws, MeanClassifier(), "i-0123")
    held = killed.fetch().jobs
    assert len(held) == 3
    killed_in(killed, held[:1])
    assert depth(aws, aws.request_queue_url) == (0, 3)
    # Dropped without a word, as SIGKILL would. A worker on another instance has no claim.
    Worker(settings, aws, MeanClassifier(), "i-other").held.show_what_the_last_worker_held()
    assert depth(aws, aws.request_queue_url) == (0, 3)

    successor = Worker(settings, aws, MeanClassifier(), "i-0123")
    with caplog.at_level(logging.INFO, logger="app_tier.held"):
        successor.held.show_what_the_last_worker_held()
    assert depth(aws, aws.request_queue_url) == (3, 0)
    assert ("made 3 request(s) visible again that the worker before it here held when it ended: 1 being "
            "loaded or in a model call, as used attempts, 2 handed back untried") in caplog.text
    batch = successor.fetch()
    # The receive of the one being classified counted as an attempt: if it killed the
    # worker, it is known as such. The others could not have: theirs did not count.
    assert {j.request.id: j.receive_count for j in batch.jobs} == {held[0].request.id: 2,
                                                                   held[1].request.id: 1,
                                                                   held[2].request.id: 1}
    successor.process(batch)
    assert set(responses(aws)) == {"held-0", "held-1", "held-2"}
    assert depth(aws, aws.request_queue_url) == (0, 0)
    # Nothing held: no file left to mislead a later worker.
    assert not held_journal_path(settings, "i-0123").exists()


def test_the_successor_hands_back_what_was_not_at_risk_with_the_receives_it_used(aws_env, caplog):
    """Both were received before (a worker died with them). The one in the model call
    when this worker was killed is made visible, its receive counted; its batch-mate
    waiting for its turn is sent again untried, as a new message that carries the
    receives its earlier copies used (PriorReceives), and its old copy deleted."""
    settings, aws = aws_env
    upload(settings, aws, "a.jpg", make_image(110), "a")
    upload(settings, aws, "b.jpg", make_image(111), "b")
    crash(aws, Worker(settings, aws, MeanClassifier(), "i-crashed").fetch())
    killed = Worker(settings, aws, MeanClassifier(), "i-risk")
    held = {j.request.id: j for j in killed.fetch().jobs}
    assert {i: j.receive_count for i, j in held.items()} == {"a": 2, "b": 2}
    killed_in(killed, [held["a"]])
    Worker(settings, aws, MeanClassifier(), "i-risk").held.show_what_the_last_worker_held()
    assert depth(aws, aws.request_queue_url) == (2, 0)  # b's old copy is gone
    got = aws.sqs.receive_message(QueueUrl=aws.request_queue_url, MaxNumberOfMessages=10,
                                  MessageSystemAttributeNames=["ApproximateReceiveCount"],
                                  MessageAttributeNames=["All"])["Messages"]
    seen = {json.loads(m["Body"])["id"]: m for m in got}
    assert seen["a"]["MessageId"] == held["a"].message_id
    assert seen["a"]["Attributes"]["ApproximateReceiveCount"] == "3"
    assert "MessageAttributes" not in seen["a"]
    assert seen["b"]["MessageId"] != held["b"].message_id
    assert seen["b"]["Attributes"]["ApproximateReceiveCount"] == "1"
    assert seen["b"]["MessageAttributes"]["PriorReceives"]["StringValue"] == "1"
    assert json.loads(seen["b"]["Body"]) == json.loads(held["b"].request.to_json())


def test_an_entry_an_older_worker_wrote_is_taken_for_at_risk(aws_env, tmp_path):
    """Written without the flag (and the request to send): made visible, its receive
    counted, as every entry was before."""
    settings, aws = aws_env
    upload(settings, aws, "old.jpg", make_image(120), "old")
    (job,) = Worker(settings, aws, MeanClassifier(), "i-old").fetch().jobs
    path = held_journal_path(settings, "i-old")
    path.write_text(json.dumps({"held": [{"receipt": job.receipt, "hidden_until": job.hidden_until}]}))
    assert HeldJournal(path).read(now=0) == [HeldEntry(job.receipt, job.hidden_until, at_risk=True)]
    successor = Worker(settings, aws, MeanClassifier(), "i-old")
    successor.held.show_what_the_last_worker_held()
    assert [(j.message_id, j.receive_count) for j in successor.fetch().jobs] == [(job.message_id, 2)]
    # Without the flag, a request to send is not enough; nor is a request that cannot be read.
    journal = HeldJournal(tmp_path / "other.json")
    journal.path.write_text(json.dumps({"held": [{"receipt": "r", "hidden_until": 2e9, "receive_count": 1,
                                                  "request": job.request_body}]}))
    assert journal.read(now=0) == [HeldEntry("r", 2e9, at_risk=True)]
    journal.record([HeldEntry("r", 2e9, at_risk=False, request='{"id": 3}', receive_count=1)])
    assert journal.read(now=0) == [HeldEntry("r", 2e9, at_risk=True)]


def test_the_journal_follows_what_is_held(aws_env):
    settings, aws = aws_env
    for i in range(2):
        upload(settings, aws, f"f_{i}.jpg", make_image(200 + i), f"f-{i}")
    worker = Worker(settings, aws, MeanClassifier(), "i-follow")
    path = held_journal_path(settings, "i-follow")
    batch = worker.fetch()
    written = json.loads(path.read_text())["held"]
    assert sorted(h["receipt"] for h in written) == sorted(j.receipt for j in batch.jobs)
    first = written[0]["hidden_until"]
    worker.held.extend()
    assert json.loads(path.read_text())["held"][0]["hidden_until"] >= first
    worker.held.forget(batch.jobs[:1])
    assert [h["receipt"] for h in json.loads(path.read_text())["held"]] == [batch.jobs[1].receipt]
    worker.process(dataclasses.replace(batch, jobs=batch.jobs[1:]))
    assert not path.exists()


def test_answered_since_is_left_alone(aws_env, caplog):
    """A receipt whose message was answered and deleted (the kill came between the
    delete and the journal's write) fails to change, and that is all."""
    settings, aws = aws_env
    upload(settings, aws, "gone.jpg", make_image(300), "gone")
    worker = Worker(settings, aws, MeanClassifier(), "i-gone")
    batch = worker.fetch()
    path = held_journal_path(settings, "i-gone")
    saved = path.read_text()
    worker.process(batch)
    path.write_text(saved)
    with caplog.at_level(logging.INFO, logger="app_tier.held"):
        Worker(settings, aws, MeanClassifier(), "i-gone").held.show_what_the_last_worker_held()
    assert "made 0 request(s) visible again" in caplog.text
    assert "1 of them could not be" in caplog.text
    assert depth(aws, aws.request_queue_url) == (0, 0)
    assert not path.exists()


def test_a_worker_killed_as_it_gives_requests_back_leaves_them_in_its_journal(aws_env, monkeypatch):
    """Forgotten first, then made visible: killed in between (systemd's kill at the end
    of a stop's grace), the journal would no longer name them, and they stay hidden for
    the rest of their timeout."""
    settings, aws = aws_env
    upload(settings, aws, "tried.jpg", make_image(310), "tried")
    worker = Worker(settings, aws, MeanClassifier(), "i-killed")
    batch = worker.fetch()
    path = held_journal_path(settings, "i-killed")

    class Killed(BaseException):
        pass

    def killed_at_the_change(**kwargs):
        raise Killed

    monkeypatch.setattr(aws.sqs, "change_message_visibility_batch", killed_at_the_change)
    with pytest.raises(Killed):
        worker.held.make_visible_as_tried(batch.jobs)  # a give-up's first step
    monkeypatch.undo()
    assert [h["receipt"] for h in json.loads(path.read_text())["held"]] == [batch.jobs[0].receipt]
    Worker(settings, aws, MeanClassifier(), "i-killed").held.show_what_the_last_worker_held()
    assert depth(aws, aws.request_queue_url) == (1, 0)


def test_read_skips_what_is_visible_again_by_now(tmp_path):
    path = tmp_path / "held.json"
    journal = HeldJournal(path)
    future = HeldEntry("future", 1100.0, at_risk=False, receive_count=2,
                       request='{"id": "i", "bucket": "b", "key": "k", "filename": "f"}')
    journal.record([HeldEntry("past", 1000.0), HeldEntry("at-the-margin", 1000.5), future])
    assert journal.read(now=1000.0) == [future]
    journal.remove()
    assert not path.exists()
    assert journal.read(now=1000.0) == []


@pytest.mark.parametrize("text", ["{not json", '{"held": 3}', '{"other": []}',
                                  '{"held": [{"receipt": "r"}]}'])
def test_a_damaged_journal_is_ignored_and_removed(tmp_path, caplog, text):
    path = tmp_path / "held.json"
    path.write_text(text)
    assert HeldJournal(path).read(now=0) == []
    assert "is not a journal of held messages" in caplog.text
    assert not path.exists()


def test_a_journal_that_cannot_be_read_is_said_so_and_left_for_another_look(tmp_path, caplog):
    """A file the worker cannot read (its permissions, an I/O error) is no damaged one:
    its requests come back after their visibility timeout, said so, and the file is kept
    (removed, a successor able to read it would find nothing)."""
    path = tmp_path / "held.json"
    path.mkdir()  # reading it fails with an OSError other than FileNotFoundError
    assert HeldJournal(path).read(now=0) == []
    assert f"cannot read {path}" in caplog.text and "visibility timeout" in caplog.text
    assert path.exists()


def test_remove_takes_a_version_a_kill_left_unfinished_too(tmp_path):
    path = tmp_path / "held.json"
    path.write_text('{"held": []}')
    unfinished = tmp_path / "held.json.4242.tmp"
    unfinished.write_text('{"he')
    other = tmp_path / "held2.json.4242.tmp"
    other.write_text("")
    HeldJournal(path).remove()
    assert not path.exists() and not unfinished.exists()
    assert other.exists(), "another journal's"


def test_a_failed_write_leaves_no_older_version_behind(tmp_path, caplog):
    """The older version names messages answered or hidden for a retry delay since:
    a successor must not show them."""
    path = tmp_path / "held.json"
    journal = HeldJournal(path)
    journal.record([HeldEntry("answered-since", 2e9)])
    journal._tmp.mkdir()  # the next write cannot make its new version
    journal.record([HeldEntry("held-now", 2e9)])
    assert "cannot write" in caplog.text
    assert not path.exists()


def test_an_extension_that_failed_is_not_written_as_one(aws_env, monkeypatch):
    """The message may be visible, or another worker's, by the time a successor reads
    the journal: it must not show it by a receipt that is stale (moto takes any receipt
    a message ever had)."""
    settings, aws = aws_env
    upload(settings, aws, "x.jpg", make_image(400), "x")
    worker = Worker(settings, aws, MeanClassifier(), "i-ext")
    worker.fetch()
    path = held_journal_path(settings, "i-ext")
    (before,) = json.loads(path.read_text())["held"]
    from app_tier import held as held_module

    monkeypatch.setattr(held_module, "change_visibility", lambda _sqs, _url, changes: [
        VisibilityFailure(receipt, "network down") for receipt, _ in changes])
    monkeypatch.setattr(held_module, "wall_clock", lambda: before["hidden_until"] + 100)
    worker.held.extend()
    assert json.loads(path.read_text())["held"] == [before]
    monkeypatch.undo()
    worker.held.extend()
    (after,) = json.loads(path.read_text())["held"]
    assert after["hidden_until"] > before["hidden_until"]


def test_the_successor_looks_at_the_clock_again_before_each_call(aws_env, monkeypatch):
    """botocore's retries of one call may take long enough for the next ones'
    messages to be visible again, or another worker's."""
    settings, aws = aws_env
    HeldJournal(held_journal_path(settings, "i-slow")).record([HeldEntry(f"r{i}", 1005.0) for i in range(15)])
    from app_tier import held as held_module

    clock = {"now": 1000.0}
    calls = []

    def slow_change(_sqs, _url, changes):
        calls.append(len(changes))
        clock["now"] += 10  # the first call's retries outlast every message's time
        return []

    monkeypatch.setattr(held_module, "change_visibility", slow_change)
    monkeypatch.setattr(held_module, "wall_clock", lambda: clock["now"])
    Worker(settings, aws, MeanClassifier(), "i-slow").held.show_what_the_last_worker_held()
    assert calls[0] == 10 and sum(calls) == 10
    assert not held_journal_path(settings, "i-slow").exists()


def test_the_successor_shows_them_once_ready_and_before_its_first_receive(aws_env, monkeypatch):
    """Ready first: SQS slow to answer must not look like a worker that never started
    (the runner aborts one not ready in time). Before the first receive: after it, the
    journal is this worker's own."""
    settings, aws = aws_env
    worker = Worker(settings, aws, MeanClassifier(), "i-order")
    said = []
    monkeypatch.setattr("app_tier.worker.systemd.notify", lambda state: said.append(state))
    monkeypatch.setattr(worker, "fetch", lambda: said.append("receive"))

    def show():
        said.append("show")
        worker.stopping.set()

    monkeypatch.setattr(worker.held, "show_what_the_last_worker_held", show)
    worker.run()
    assert said == ["READY=1", "show"]


def test_a_successor_that_cannot_reach_aws_to_show_them_says_so_and_serves_on(aws_env, monkeypatch, caplog):
    """Not exit 1 with a traceback, restarted to fail alike while the journal lasts."""
    from botocore.exceptions import EndpointConnectionError

    settings, aws = aws_env
    upload(settings, aws, "held.jpg", make_image(330), "held-2")
    assert len(Worker(settings, aws, MeanClassifier(), "i-0999").fetch().jobs) == 1

    def unreachable(*_args, **_kwargs):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    monkeypatch.setattr("app_tier.held.show_held", unreachable)
    successor = Worker(settings, aws, MeanClassifier(), "i-0999")
    with caplog.at_level(logging.WARNING, logger="app_tier.held"):
        successor.held.show_what_the_last_worker_held()
    assert "could not make visible again what the worker before it held" in caplog.text


def test_a_journal_that_cannot_write_warns_once_and_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    journal = HeldJournal(blocker / "held.json")
    journal.record([HeldEntry("r", 1.0)])
    journal.record([HeldEntry("r", 2.0)])
    assert caplog.text.count("cannot write") == 1
    blocker.unlink()
    with caplog.at_level(logging.INFO):
        journal.record([HeldEntry("r", 3.0)])
    assert "writing" in caplog.text and (blocker / "held.json").exists()


def test_journal_path_is_per_fleet_and_instance_and_safe(tmp_path):
    settings = dataclasses.replace(Settings(), state_dir=str(tmp_path))
    assert held_journal_path(Settings(), "i-1") is None  # no state directory: no journal
    hostile = held_journal_path(settings, "../../etc/passwd")
    assert hostile == tmp_path / f"{settings.fleet_name}-held-.._.._etc_passwd.json"
    other_fleet = dataclasses.replace(settings, prefix="other")
    assert held_journal_path(settings, "i-1") != held_journal_path(other_fleet, "i-1")


def test_a_stop_while_the_successor_shows_them_leaves_the_journal_to_the_next(aws_env):
    """The grace period's give-up forgets nothing held (nothing is yet): the file it
    would have rewritten empty, and so removed, names what the next worker must show."""
    settings, aws = aws_env
    path = held_journal_path(settings, "i-stop")
    HeldJournal(path).record([HeldEntry("r", 2e9)])
    worker = Worker(settings, aws, MeanClassifier(), "i-stop")
    worker.held.forget([])
    worker.held.hand_back_all()
    assert path.exists()


def test_a_stopped_workers_unit_shows_what_it_held_without_loading_a_model(aws_env, monkeypatch, caplog):
    """ExecStopPost: a worker SIGKILLed as its instance shuts down has no successor there
    to read its journal, and its requests waited for their visibility timeout."""
    from app_tier import __main__ as worker_main

    settings, aws = aws_env
    upload(settings, aws, "held.jpg", make_image(300), "held-0")
    killed = Worker(settings, aws, MeanClassifier(), "i-0456")
    assert len(killed.fetch().jobs) == 1 and depth(aws, aws.request_queue_url) == (0, 1)
    monkeypatch.setattr(worker_main.Settings, "from_env", classmethod(lambda cls: settings))
    monkeypatch.setattr("app_tier.model.load_classifier", lambda *a, **k: pytest.fail("a model was loaded"))
    with caplog.at_level(logging.INFO, logger="app_tier.held"):
        assert worker_main.main(["--instance-id", "i-0456", "--show-held-only"]) == 0
    assert depth(aws, aws.request_queue_url) == (1, 0)
    assert "made 1 request(s) visible again" in caplog.text
    assert not held_journal_path(settings, "i-0456").exists()
    # After a clean stop there is no journal: nothing to do, and nothing asked of AWS.
    monkeypatch.setattr(worker_main, "Aws", lambda *a: pytest.fail("AWS was asked"))
    assert worker_main.main(["--instance-id", "i-0456", "--show-held-only"]) == 0


def test_a_restarted_worker_shows_what_its_predecessor_held_before_loading_its_model(
        aws_env, monkeypatch, caplog):
    """Shown by Worker.run, they would wait for the model to load too."""
    from app_tier import __main__ as worker_main

    settings, aws = aws_env
    upload(settings, aws, "held.jpg", make_image(301), "held-1")
    killed = Worker(settings, aws, MeanClassifier(), "i-0789")
    assert len(killed.fetch().jobs) == 1 and depth(aws, aws.request_queue_url) == (0, 1)
    monkeypatch.setattr(worker_main.Settings, "from_env", classmethod(lambda cls: settings))
    seen_at_load = []

    def load_classifier(*args, **kwargs):
        seen_at_load.append(depth(aws, aws.request_queue_url))
        raise SystemExit(9)  # enough: what came before the load is the question

    monkeypatch.setattr("app_tier.model.load_classifier", load_classifier)
    with pytest.raises(SystemExit):
        worker_main.main(["--instance-id", "i-0789"])
    assert seen_at_load == [(1, 0)]
    assert not held_journal_path(settings, "i-0789").exists()


def test_a_receive_hides_what_it_takes_only_for_a_lease_which_the_heartbeat_extends(aws_env, monkeypatch):
    """A worker killed with a long poll open never sees what that poll takes, nor can its
    journal name it: requests sent after its death would wait the whole visibility
    timeout. They wait the receive's lease; what a worker holds, the heartbeat keeps
    hidden for the timeout."""
    from app_tier import fetch

    settings, aws = aws_env  # a visibility timeout of 600 s
    monkeypatch.setattr(fetch, "RECEIVE_LEASE_S", 6)  # a loaded machine's stall before depth() below
    for i in range(2):
        upload(settings, aws, f"lease_{i}.jpg", make_image(400 + i), f"lease-{i}")
    killed = Worker(settings, aws, MeanClassifier(), "i-0789")

    def dies(jobs, hidden_s):  # killed as its receive returned: nothing held, nothing journaled
        raise SystemExit

    monkeypatch.setattr(killed.held, "hold", dies)
    with pytest.raises(SystemExit):
        killed.fetch()
    assert depth(aws, aws.request_queue_url) == (0, 2)
    deadline = time.monotonic() + 15
    while depth(aws, aws.request_queue_url) != (2, 0):
        assert time.monotonic() < deadline, "the receive hid them for longer than its lease"
        time.sleep(0.1)

    serving = Worker(settings, aws, MeanClassifier(), "i-0790")
    batch = serving.fetch()  # extended at once, beside the downloads: no heartbeat needed
    assert len(batch.jobs) == 2
    assert all(j.hidden_until > time.time() + 500 for j in batch.jobs)
    time.sleep(fetch.RECEIVE_LEASE_S + 0.5)  # past the lease: hidden by the extension, for the timeout
    assert depth(aws, aws.request_queue_url) == (0, 2)


def test_requests_another_worker_took_are_not_handed_back(aws_env, caplog):
    """A worker paused past its messages' visibility finds them answered by another on
    its return: handed back as new messages, they would be classified again."""
    settings, aws = aws_env
    upload(settings, aws, "taken.jpg", make_image(500), "taken-0")
    paused = Worker(settings, aws, MeanClassifier(), "i-0800")
    (job,) = paused.fetch().jobs
    # Its visibility lapses while it is paused, and another worker answers the request.
    aws.sqs.change_message_visibility(QueueUrl=aws.request_queue_url, ReceiptHandle=job.receipt,
                                      VisibilityTimeout=0)
    other = Worker(settings, aws, MeanClassifier(), "i-0801")
    other.process(other.fetch())
    assert set(responses(aws)) == {"taken-0"} and depth(aws, aws.request_queue_url) == (0, 0)
    with caplog.at_level(logging.WARNING, logger="app_tier.held"):
        paused.held.extend()  # its heartbeat, once it runs again
    assert "1 request(s) held here are no longer this worker's" in caplog.text
    paused.held.hand_back_all()  # told to stop
    assert depth(aws, aws.request_queue_url) == (0, 0)


def test_a_request_another_worker_received_is_taken_as_theirs_on_real_sqss_answer(aws_env, monkeypatch,
                                                                                   caplog):
    """Real SQS refuses a receipt made stale by another receive with InvalidParameterValue,
    not moto's ReceiptHandleIsInvalid, and moto takes the stale receipt: SQS's answer is
    stubbed. Kept as this worker's, the request was extended in vain at every heartbeat,
    and handed back at a stop: queued twice, classified once more."""
    settings, aws = aws_env
    for name in ("a", "b"):
        upload(settings, aws, f"{name}.jpg", make_image(ord(name), size=(64, 64)), name)
    paused = Worker(settings, aws, MeanClassifier(), "i-0805")
    jobs = {j.request.id: j for j in paused.fetch().jobs}
    # Visible again while this worker was paused, and received by another worker.
    aws.sqs.change_message_visibility(QueueUrl=aws.request_queue_url, ReceiptHandle=jobs["a"].receipt,
                                      VisibilityTimeout=0)
    (other,) = aws.sqs.receive_message(QueueUrl=aws.request_queue_url, MaxNumberOfMessages=1)["Messages"]
    assert other["MessageId"] == jobs["a"].message_id
    change, asked = aws.sqs.change_message_visibility_batch, []

    def as_real_sqs_answers(QueueUrl, Entries):
        asked.extend(e["ReceiptHandle"] for e in Entries)
        stale = [e for e in Entries if e["ReceiptHandle"] == jobs["a"].receipt]
        reply = change(QueueUrl=QueueUrl, Entries=[e for e in Entries if e not in stale])
        return {"Successful": reply.get("Successful", []), "Failed": [
            {"Id": e["Id"], "SenderFault": True, "Code": "InvalidParameterValue",
             "Message": f"Value {e['ReceiptHandle']} for parameter ReceiptHandle is invalid. Reason: Message "
                        "does not exist or is not available for visibility timeout change."} for e in stale]}

    monkeypatch.setattr(aws.sqs, "change_message_visibility_batch", as_real_sqs_answers)
    with caplog.at_level(logging.WARNING, logger="app_tier.held"):
        paused.held.extend()  # its heartbeat, once it runs again
    assert "1 request(s) held here are no longer this worker's" in caplog.text
    assert len(paused.held) == 1
    asked.clear()
    paused.held.extend()  # the next heartbeat: only its own
    assert asked == [jobs["b"].receipt]
    paused.held.hand_back_all()  # told to stop: "b" queued again, "a" left to the other worker
    assert depth(aws, aws.request_queue_url) == (1, 1)


def test_a_request_another_worker_took_is_handed_back_when_received_here_again(aws_env, monkeypatch):
    """Dropped as another worker's, its id must leave those being answered here: else this
    worker, receiving it again later, takes it for one being answered, and a stop does
    not hand it back: it waits out its visibility timeout."""
    from common.sqs import VisibilityFailure

    settings, aws = aws_env
    upload(settings, aws, "again.jpg", make_image(501), "again-0")
    paused = Worker(settings, aws, MeanClassifier(), "i-0810")
    (job,) = paused.fetch().jobs
    paused.held.mark_answering([job])  # paused as it answered it
    with monkeypatch.context() as patched:  # received by another worker since: SQS refuses the receipt
        patched.setattr(paused.held, "_change_visibility", lambda hidden_for, warn=True: [
            VisibilityFailure(j.receipt, "gone", "ReceiptHandleIsInvalid") for j, _ in hidden_for])
        paused.held.extend()
    assert not len(paused.held)
    # Let go by the other worker: visible, and received here again.
    aws.sqs.change_message_visibility(QueueUrl=aws.request_queue_url, ReceiptHandle=job.receipt,
                                      VisibilityTimeout=0)
    (again,) = paused.fetch().jobs
    assert again.message_id == job.message_id
    paused.held.hand_back_all()  # told to stop
    assert depth(aws, aws.request_queue_url) == (1, 0)


def test_requests_being_answered_stay_in_the_journal_and_are_not_handed_back(aws_env, monkeypatch):
    """Forgotten once their results are stored, they would be left by a worker killed
    before its deletes to the visibility timeout, and classified again after it. Held
    until deleted; and a stop meanwhile (the grace timer) must still not hand them back."""
    settings, aws = aws_env
    upload(settings, aws, "answering.jpg", make_image(320), "answering")
    worker = Worker(settings, aws, MeanClassifier(), "i-answering")
    batch = worker.fetch()
    path = held_journal_path(settings, "i-answering")
    seen = {}
    reply = worker.replies.send

    def reply_as_the_stop_comes(answers):
        seen["journal"] = [h["receipt"] for h in json.loads(path.read_text())["held"]]
        worker.held.hand_back_all()
        seen["queue"] = depth(aws, aws.request_queue_url)
        return reply(answers)

    monkeypatch.setattr(worker.replies, "send", reply_as_the_stop_comes)
    worker.process(batch)
    assert seen == {"journal": [batch.jobs[0].receipt], "queue": (0, 1)}
    assert list(responses(aws)) == ["answering"]
    assert depth(aws, aws.request_queue_url) == (0, 0) and not len(worker.held) and not path.exists()


class Killed(BaseException):
    """A worker's death, as far as a test can have one (see kill)."""


class Gone:
    def __getattr__(self, name):
        raise Killed  # a dead worker calls nothing


def kill(worker: Worker) -> None:
    """What SIGKILL (the OOM killer, a crash in native code) leaves of a worker: its
    journal as it is now, and nothing done after. The unwinding that follows here
    neither writes the journal nor calls AWS."""
    worker.held._journal = None
    worker.held.aws = Gone()
    raise Killed


@pytest.mark.parametrize("where", ["model call", "decode", "download"])
def test_an_image_that_kills_workers_is_dead_lettered_alone(aws_env, monkeypatch, where):
    """Its batch-mates are answered. Made visible with it after each death, each receive
    an attempt, and dead-lettered with it after MAX_RECEIVE_COUNT deaths, they would
    share its fate: a suspect classified alone must not kill its worker before a
    batch-mate's answer goes out, nor decodes of suspects run beside each other."""
    from app_tier.fetch import Fetcher
    from app_tier.images import prepare

    settings, aws = aws_env
    images = {str(i): make_image(500 + i) for i in range(4)}
    for item, data in images.items():
        upload(settings, aws, f"{item}.jpg", data, item)
    poison = images["0"]
    poison_mean = float(prepare(poison, settings.max_image_pixels).mean())
    serving: list[Worker] = []

    class KillingClassifier(MeanClassifier):
        def classify(self, batch):
            if where == "model call" and any(abs(float(row.mean()) - poison_mean) < 1e-6 for row in batch):
                kill(serving[-1])
            return super().classify(batch)

    def killing_prepare(data, *args, **kwargs):
        if where == "decode" and data == poison:
            kill(serving[-1])
        return prepare(data, *args, **kwargs)

    real_download = Fetcher._download

    def killing_download(self, job):  # a request may name an object too large to hold
        if where == "download" and job.request.id == "0":
            kill(serving[-1])
        return real_download(self, job)

    monkeypatch.setattr("app_tier.fetch.prepare", killing_prepare)
    monkeypatch.setattr(Fetcher, "_download", killing_download)
    kills = 0
    for _restart in range(10):
        worker = Worker(settings, Aws(settings), KillingClassifier(), "i-poison")
        serving.append(worker)
        worker.held.show_what_the_last_worker_held()  # the restarted worker's first step
        try:
            batch = worker.fetch()
            if not batch.jobs:
                break
            worker.process(batch)
        except Killed:
            kills += 1
    assert kills == settings.max_receive_count
    dead = aws.sqs.receive_message(QueueUrl=aws.dead_letter_queue_url, MaxNumberOfMessages=10)["Messages"]
    assert [json.loads(m["Body"])["id"] for m in dead] == ["0"]
    answers = responses(aws)
    assert set(answers) == {"1", "2", "3"} and all(a.ok for a in answers.values())
    assert depth(aws, aws.request_queue_url) == (0, 0)


def test_a_call_that_ends_leaves_the_at_risk_mark_of_a_later_call_on_the_copy_received_again(
        aws_env, monkeypatch):
    """A model call on a message let go meanwhile and received again: the next attempt's
    call marks its copy too, and the first call's end must not take that mark off while
    the second runs (by message id it did: a kill then was not counted against the image)."""
    from tests.unit.test_worker import release_with_a_receive_between

    settings, aws = aws_env
    upload(settings, aws, "a.jpg", make_image(1, size=(64, 64)), "a")
    worker = Worker(settings, aws, MeanClassifier(), "i-calls")
    first = worker.fetch()
    journal = HeldJournal(held_journal_path(settings, "i-calls"))

    def marked() -> list[tuple[str, bool]]:
        return [(e.receipt, e.at_risk) for e in journal.read(now=0)]

    with worker.held.at_risk(first.jobs):  # the first attempt's call
        again = release_with_a_receive_between(worker, first, monkeypatch)
        [job] = again.jobs
        assert marked() == [(job.receipt, True)]  # the first call's mark, carried
        second_call = worker.held.at_risk(again.jobs)
        second_call.__enter__()
    assert marked() == [(job.receipt, True)]  # the second call still runs
    second_call.__exit__(None, None, None)
    assert marked() == [(job.receipt, False)]


def test_an_old_copy_a_successor_could_not_delete_is_hidden_no_longer_than_the_queues_timeout(aws_env,
                                                                                               monkeypatch):
    """Handed back, its delete failed: the old copy comes back and is answered twice. A
    queue set to a short timeout gets it back as soon, not after HANDING_BACK_S."""
    settings = dataclasses.replace(aws_env[0], visibility_timeout_s=5)
    aws = Aws(settings)
    upload(settings, aws, "a.jpg", make_image(120), "a")
    upload(settings, aws, "b.jpg", make_image(121), "b")
    assert len(Worker(settings, aws, MeanClassifier(), "i-short").fetch().jobs) == 2  # killed holding both
    hidden_for = []
    change = aws.sqs.change_message_visibility_batch

    def recorded_change(**kwargs):
        hidden_for.extend(e["VisibilityTimeout"] for e in kwargs["Entries"])
        return change(**kwargs)

    def failed_delete(**kwargs):
        return {"Successful": [], "Failed": [{"Id": e["Id"], "SenderFault": False, "Code": "InternalError",
                                              "Message": "injected"} for e in kwargs["Entries"]]}

    monkeypatch.setattr(aws.sqs, "change_message_visibility_batch", recorded_change)
    monkeypatch.setattr(aws.sqs, "delete_message_batch", failed_delete)
    Worker(settings, aws, MeanClassifier(), "i-short").held.show_what_the_last_worker_held()
    assert hidden_for == [5, 5]
    assert depth(aws, aws.request_queue_url) == (2, 2)  # the new copies, and the old ones hidden


def test_a_second_worker_under_the_same_instance_id_refuses_and_leaves_the_first_ones_journal(
        aws_env, monkeypatch, capfd, caplog):
    """Two workers run by hand without INSTANCE_ID both serve as the host's name: the
    second took the first's live journal for a dead worker's and handed back the
    requests it held (answered twice), and either's clean stop deleted the other's
    journal. The second now refuses to start, in one line, with the status its
    supervisor does not restart (78); the unit's --show-held-only leaves it alone too."""
    import os

    from app_tier import EXIT_CANNOT_START
    from app_tier import __main__ as worker_main
    from common.file_lock import hold

    settings, aws = aws_env
    upload(settings, aws, "held.jpg", make_image(302), "held-3")
    first = Worker(settings, aws, MeanClassifier(), "vm")
    assert len(first.fetch().jobs) == 1 and depth(aws, aws.request_queue_url) == (0, 1)
    journal = held_journal_path(settings, "vm")
    assert journal.exists()
    monkeypatch.setattr(worker_main.Settings, "from_env", classmethod(lambda cls: settings))
    monkeypatch.setattr("app_tier.model.load_classifier", lambda *a, **k: pytest.fail("a model was loaded"))
    first_process = hold(journal.with_suffix(".lock"))  # as the first worker's process holds it, for its life
    try:
        assert worker_main.main(["--instance-id", "vm"]) == EXIT_CANNOT_START
        said = capfd.readouterr().err.strip()
        assert "\n" not in said and "'vm'" in said and "INSTANCE_ID" in said, said
        assert f"pid {os.getpid()}" in said, said
        with caplog.at_level(logging.WARNING, logger="app_tier"):
            assert worker_main.main(["--instance-id", "vm", "--show-held-only"]) == 0
        assert "left" in caplog.text and "INSTANCE_ID" in caplog.text
        assert journal.exists() and depth(aws, aws.request_queue_url) == (0, 1)  # still the first's
    finally:
        os.close(first_process)
    # Once the first has ended (killed: its lock file left behind), its journal is shown as before.
    assert worker_main.main(["--instance-id", "vm", "--show-held-only"]) == 0
    assert depth(aws, aws.request_queue_url) == (1, 0) and not journal.exists()
    assert not journal.with_suffix(".lock").exists()


def test_a_worker_holds_its_journals_lock_while_it_serves_and_removes_it_when_it_ends(
        aws_env, monkeypatch):
    import os

    from app_tier import EXIT_GAVE_UP
    from app_tier import __main__ as worker_main
    from common.file_lock import LockHeld, lock_file
    from tests.unit.test_worker import FaultyModel, instance_tags

    settings, aws = aws_env
    instance_id = aws.ec2.run_instances(ImageId=settings.ami_id, MinCount=1,
                                        MaxCount=1)["Instances"][0]["InstanceId"]
    upload(settings, aws, "a.jpg", make_image(303, size=(64, 64)), "a")
    lock = held_journal_path(settings, instance_id).with_suffix(".lock")
    locked_while_serving: list[bool] = []

    class Watching(FaultyModel):  # fails whatever its input: the worker gives up, and main() returns
        def classify(self, batch):
            try:
                fd = lock_file(lock, os.O_RDWR)
            except LockHeld:
                locked_while_serving.append(True)
            else:
                locked_while_serving.append(False)
                if fd is not None:
                    os.close(fd)
            return super().classify(batch)

    monkeypatch.setattr(worker_main.Settings, "from_env", classmethod(lambda cls: settings))
    monkeypatch.setattr(worker_main, "freeze_startup_heap", lambda: None)
    monkeypatch.setattr("app_tier.model.load_classifier", lambda *args: Watching(faults=10_000))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert worker_main.main(["--instance-id", instance_id]) == EXIT_GAVE_UP
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert instance_tags(aws, instance_id)
    assert locked_while_serving and all(locked_while_serving), locked_while_serving
    assert not lock.exists()


def test_the_runner_removes_a_killed_workers_lock_file_once_its_journal_is_shown(aws_env):
    """Shown (its requests made visible), the journal went, and the lock file stayed in
    the stack's state folder, one for each worker killed there."""
    import os
    from types import SimpleNamespace

    from common.file_lock import hold
    from localaws.runner import InstanceRunner

    settings, aws = aws_env
    upload(settings, aws, "held.jpg", make_image(304), "held-4")
    assert len(Worker(settings, aws, MeanClassifier(), "i-killed").fetch().jobs) == 1
    journal = held_journal_path(settings, "i-killed")
    os.close(hold(journal.with_suffix(".lock")))  # as a worker killed outright leaves it
    runner = SimpleNamespace(settings=settings, aws=aws)
    runner._remove_held_journal = lambda iid: InstanceRunner._remove_held_journal(runner, iid)
    InstanceRunner._show_held_journal(runner, "i-killed")
    assert depth(aws, aws.request_queue_url) == (1, 0)
    assert not journal.exists() and not journal.with_suffix(".lock").exists()
