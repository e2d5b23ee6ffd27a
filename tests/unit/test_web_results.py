"""The result book and the listener loop, without AWS."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from common.config import Settings
from common.messages import ClassifyRequest, ClassifyResponse
from tests.unit.conftest import wait_until
from web_tier.listeners import Listeners
from web_tier.results import Item, ResultBook, batch_id_of, is_service_id

pytestmark = pytest.mark.timeout(30)

BATCH = "b" * 32


def response(item_id: str, label: str = "cat", score: float = 0.9, **kw) -> ClassifyResponse:
    return ClassifyResponse(id=item_id, filename=f"{item_id}.jpg", key=f"{BATCH}/{item_id}/{item_id}.jpg",
                            worker="w1", untrained=False, label=label, score=score, **kw)


def book_with(*ids: str) -> ResultBook:
    book = ResultBook()
    book.add(BATCH, [Item(i, BATCH, f"{i}.jpg", f"{BATCH}/{i}/{i}.jpg") for i in ids])
    return book


def test_first_result_wins():
    book = book_with("a")
    assert book.record(response("a", "cat", 0.9)) is not None
    assert book.record(response("a", "dog", 0.1)) is None
    assert book.fail("a", "too late") is None
    item = book.get("a")
    assert (item.state, item.label, item.score) == ("done", "cat", 0.9)
    assert book.totals() == {"uploaded": 1, "answered": 1, "failed": 0}


def test_a_result_replaces_a_workers_failure_as_in_s3_and_a_failure_never_a_result():
    """Two copies of one request: the first to answer failed (a fault that passed), the
    second classified it. S3 keeps both, and the result wins there (a rebuild shows it
    done): the book must not show failed for good. A failure after a result changes
    nothing, and the totals follow."""
    book = book_with("a", "b")
    inbox = book.subscribe(BATCH)
    failed = book.record(response("a", error="classification failed: glitch", label=None, score=None))
    assert failed is not None and failed.state == "failed"
    done = book.record(response("a", "cat", 0.9))
    assert done is not None and (book.get("a").state, book.get("a").label) == ("done", "cat")
    assert done.event_seq > failed.event_seq  # event streams hear it: a newer number
    assert [inbox.get_nowait().state for _ in range(2)] == ["failed", "done"]
    assert book.record(response("b", "dog", 0.8)) is not None
    assert book.record(response("b", error="classification failed: late", label=None, score=None)) is None
    assert book.get("b").state == "done"
    assert book.totals() == {"uploaded": 2, "answered": 2, "failed": 0}


def test_a_rebuild_showing_a_result_replaces_a_workers_failure():
    """The same through a rebuild from S3: the result stored there wins."""
    book = book_with("a")
    book.record(response("a", error="classification failed: glitch", label=None, score=None))
    stored = Item("a", BATCH, "a.jpg", f"{BATCH}/a/a.jpg", state="done", label="cat", score=0.9)
    book.merge(BATCH, [stored])
    assert (book.get("a").state, book.get("a").label) == ("done", "cat")
    assert book.totals() == {"uploaded": 1, "answered": 1, "failed": 0}


def test_a_batch_in_use_is_kept_at_the_cap_and_let_go_after():
    """A request finding a batch, then adding to it, must find it still there: let go in
    between (a full book), it would be made again without its tokens, and a file sent
    again under one stored twice."""
    book = ResultBook(max_items=1)
    book.add(BATCH, [Item("a", BATCH, "a.jpg", f"{BATCH}/a/a.jpg", token="t-a")])
    book.record(response("a", "cat", 0.9))  # finished whole: the first to forget
    other = "f" * 32
    with book.in_use(BATCH):
        book.add(other, [Item("o", other, "o.jpg", f"{other}/o/o.jpg")])  # over the cap
        assert [i.id for i in book.batch(BATCH)] == ["a"]
        held = book.add(BATCH, [Item("a2", BATCH, "a.jpg", f"{BATCH}/a2/a.jpg", token="t-a")])
        assert [i.id for i in held] == ["a"]  # its token found: not a second item
    book.record(response("o", "dog", 0.9))
    book.add("e" * 32, [Item("e", "e" * 32, "e.jpg", f"{'e' * 32}/e/e.jpg")])
    assert book.batch(BATCH) is None  # no longer in use: forgotten at the cap


def test_a_batch_all_discarded_leaves_nothing_behind():
    """A request whose every file was refused after joining the book must not leave its
    batch's id among those to forget, for good below the cap."""
    book = book_with("a", "b")
    book.discard("a")
    book.discard("b")
    assert book.batch(BATCH) is None and book.totals()["uploaded"] == 0
    assert BATCH not in book._batches and BATCH not in book._maybe_finished


def test_a_reader_sees_finished_only_once_every_field_is_written():
    """Readers take no lock: a thread switch in the middle of an update must not
    show a done item without its top 5 or worker (SSE sends each item once)."""
    seen: list[dict] = []

    class Top5(list):
        def __iter__(self):
            seen.append(target.to_json())  # another thread reading mid-update
            return super().__iter__()

    target = Item("a", BATCH, "a.jpg")
    answer = Item("a", BATCH, "a.jpg", state="done", label="cat", score=0.9,
                  top5=Top5([{"label": "cat", "score": 0.9}]), worker="i-1", untrained=True)
    target._apply(answer)
    assert seen, "the update never read top5"
    assert all(s["state"] == "queued" or (s["top5"] and s["worker"] and s["untrained"]) for s in seen)
    assert target.to_json()["state"] == "done" and target.worker == "i-1"


@pytest.mark.parametrize("state, own, model, shown", [
    ("done", False, True, False),   # a label is flagged by its own model, mid-rollout too
    ("done", True, False, True),
    ("failed", True, False, True),  # refused by an untrained worker: said so
    ("failed", False, True, True),  # a dead letter: what the model is known to be
    ("failed", False, False, False),
    ("queued", False, True, True),
])
def test_the_untrained_flag_is_the_labels_own_else_the_workers_or_the_models(state, own, model, shown):
    item = Item("a", BATCH, "a.jpg", state=state, untrained=own)
    # POST / (X-Model-Untrained) and the API show the one answer.
    assert item.shows_untrained(model) is shown
    assert item.to_json(model)["untrained"] is shown


def test_an_outcome_found_in_s3_leaves_the_workers_model_as_the_live_answers_said():
    """A dead letter's result read from S3 may be an older model's: taken for the
    workers', it turned an untrained fleet's X-Model-Untrained and banner off until
    the next live answer."""
    book = book_with("a", "b")
    book.untrained = True  # MODEL_WEIGHTS=random, or the latest live answer
    found = Item("a", BATCH, "a.jpg", state="done", label="tabby", untrained=False)
    assert book.record_item(found) is not None
    assert book.untrained is True
    assert book.get("a").to_json(bool(book.untrained))["untrained"] is False  # the label's own model
    book.record(response("b"))  # a live answer says what the workers run
    assert book.untrained is False


def test_wait_wakes_on_the_result_and_times_out_otherwise():
    book = book_with("a", "b")
    assert book.wait("a", 0.05) is None
    assert book.wait("unknown", 0.05) is None
    threading.Timer(0.05, book.record, args=(response("a"),)).start()
    item = book.wait("a", 10)
    assert item is not None and item.label == "cat"  # timed out, it would be None
    assert book.get("b").state == "queued"
    assert book.get("b").waiter is None, "only an item someone waits on carries an Event"
    # ...until it is woken: kept, each answered POST / would hold ~1.2 KB.
    assert book.get("a").waiter is None


def test_a_result_rebuilt_from_s3_wakes_the_waiter_too():
    book = book_with("a")
    done = Item("a", BATCH, "a.jpg", state="done", label="cat", score=0.5)
    threading.Timer(0.05, book.merge, args=(BATCH, [done])).start()
    item = book.wait("a", 10)
    assert item is not None and item.label == "cat"


def test_unknown_ids_are_kept_but_their_batch_counts_as_unknown():
    book = ResultBook()
    book.record(response("x"))
    assert book.get("x").batch_id == BATCH
    # Only part of the batch is known: a GET must rebuild it from S3.
    assert book.batch(BATCH) is None
    rebuilt = [Item("x", BATCH, "x.jpg"), Item("y", BATCH, "y.jpg")]
    book.merge(BATCH, rebuilt)
    items = book.batch(BATCH)
    assert [(i.id, i.state) for i in items] == [("x", "done"), ("y", "queued")]


def test_a_rebuilt_batch_keeps_upload_order_whatever_was_answered_first():
    book = ResultBook()  # as after a restart: the listener hears of "c" first
    book.record(response("c"))
    book.merge(BATCH, [Item(i, BATCH, f"{i}.jpg") for i in ("a", "b", "c")])
    assert [i.id for i in book.batch(BATCH)] == ["a", "b", "c"]
    assert book.get("c").state == "done"


def test_merge_keeps_results_already_in_memory_and_adopts_new_ones():
    book = book_with("a", "b")
    book.record(response("a", "cat"))
    old_a = Item("a", BATCH, "a.jpg")
    done_b = Item("b", BATCH, "b.jpg", state="failed", error="tagged")
    inbox = book.subscribe(BATCH)
    book.merge(BATCH, [old_a, done_b])
    assert book.get("a").label == "cat"
    assert (book.get("b").state, book.get("b").error) == ("failed", "tagged")
    assert book.wait("b", 0) is not None
    assert inbox.get_nowait().id == "b"


def test_a_merge_keeps_the_larger_count_and_the_later_time_of_sending_again():
    """After a restart, an item learnt from an answer knows nothing of being sent again,
    which S3 records; one queued again since the rebuild read S3 knows more than S3."""
    from common.failure_tags import DEAD_LETTER_ERROR

    book = ResultBook()
    book.record(response("a"))
    book.fail("b", DEAD_LETTER_ERROR, key=f"{BATCH}/b/b.jpg", filename="b.jpg")
    book.queue_again("b", 200.0)
    book.merge(BATCH, [Item("a", BATCH, "a.jpg", sent_again=2, requeued_at=150.0),
                       Item("b", BATCH, "b.jpg", sent_again=0, requeued_at=0.0)])
    assert (book.get("a").state, book.get("a").sent_again, book.get("a").requeued_at) == ("done", 2, 150.0)
    assert (book.get("b").state, book.get("b").sent_again, book.get("b").requeued_at) == ("queued", 1, 200.0)


def test_closing_the_book_ends_every_wait_and_stream_at_once():
    from web_tier.events import stream

    book = book_with("a")
    waited: list = []
    waiter = threading.Thread(target=lambda: waited.append(book.wait("a", 30)))
    waiter.start()
    wait_until(lambda: book.get("a").waiter is not None)
    events = stream(book, BATCH, lambda: book.batch(BATCH), keepalive_s=30)
    assert next(events).startswith("retry:")
    book.close()
    waiter.join(5)  # far short of its 30 s
    assert waited == [None]
    assert list(events) == [], "the stream ends, without `end`: the browser reconnects elsewhere"
    # A wait begun after the close does not wait either.
    waiter = threading.Thread(target=lambda: waited.append(book.wait("a", 30)), daemon=True)
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive() and waited == [None, None]
    assert book.subscribe(BATCH).get_nowait() is None
    # Answers are still recorded (and stored in S3 by the workers in any case).
    book.record(response("a"))
    assert book.wait("a", 30).label == "cat"


def test_subscribers_get_each_finished_item_once():
    book = book_with("a", "b")
    inbox = book.subscribe(BATCH)
    book.record(response("a"))
    book.record(response("a"))
    book.fail("b", "broken")
    got = [inbox.get_nowait().id for _ in range(inbox.qsize())]
    assert got == ["a", "b"]
    book.unsubscribe(BATCH, inbox)
    assert book._subscribers == {}


def test_memory_is_bounded_by_forgetting_old_finished_batches():
    book = ResultBook(max_items=3)
    first, second = "1" * 32, "2" * 32
    book.add(first, [Item(f"f{n}", first, "x") for n in range(2)])
    for n in range(2):
        book.fail(f"f{n}", "x")
    book.add(second, [Item(f"s{n}", second, "x") for n in range(2)])
    assert book.batch(first) is None
    assert len(book.batch(second)) == 2


def test_eviction_skips_unfinished_batches_and_forgets_only_what_it_must():
    book = ResultBook(max_items=3)
    batches = [str(n) * 32 for n in range(6)]
    book.add(batches[0], [Item("pending", batches[0], "x")])  # oldest, never answered
    for n, batch_id in enumerate(batches[1:], start=1):
        book.add(batch_id, [Item(f"i{n}", batch_id, "x")])
        book.fail(f"i{n}", "x")
    assert len(book._items) == 3
    assert book.get("pending") is not None, "someone may still wait on it"
    assert [b for b in batches if book.batch(b) is not None] == [batches[0], batches[4], batches[5]]


def test_answers_for_keys_outside_any_batch_are_not_kept_or_counted():
    """Anyone allowed to send to the request queue can make one (a key not starting with
    a batch id): kept, no eviction would forget it, and each crowd out real batches and
    swell the totals."""
    book = ResultBook(max_items=2)
    book.add(BATCH, [Item("a", BATCH, "a.jpg")])
    book.fail("a", "x")
    for n in range(5):
        foreign = ClassifyResponse(id=f"{n:032x}", filename="x.jpg", key=f"foreign/{n}.jpg",
                                   worker="w", untrained=False, label="cat", score=0.5)
        assert book.record(foreign) is None
        assert book.fail(f"{n + 10:032x}", "dead letter", key=f"foreign/{n}.jpg") is None
    assert list(book._items) == ["a"]
    assert book.batch(BATCH) is not None
    assert book.totals() == {"uploaded": 1, "answered": 0, "failed": 1}


def test_a_second_answer_for_an_item_forgotten_with_its_batch_is_not_kept_or_counted():
    """SQS delivers an answer at least once: counted again, the totals would have more
    answered than uploaded, and an incomplete batch come back, to be listed in S3."""
    book = ResultBook(max_items=2)
    batches = [str(n) * 32 for n in range(3)]
    for n, batch_id in enumerate(batches):
        book.add(batch_id, [Item(f"i{n}", batch_id, "x.jpg", f"{batch_id}/i{n}/x.jpg")])
        assert book.record(dataclasses.replace(response(f"i{n}"), key=f"{batch_id}/i{n}/x.jpg")) is not None
    assert book.batch(batches[0]) is None  # forgotten
    again = dataclasses.replace(response("i0", "dog"), key=f"{batches[0]}/i0/x.jpg")
    assert book.record(again) is None
    assert book.fail("i0", "a dead letter", key=f"{batches[0]}/i0/x.jpg") is None
    assert book.get("i0") is None
    assert book.totals() == {"uploaded": 3, "answered": 3, "failed": 0}
    # An id it never held (answered after a restart) is still kept, for a later read.
    assert book.record(dataclasses.replace(response("new"), key=f"{BATCH}/new/x.jpg")) is not None


def test_a_batch_just_rebuilt_is_not_forgotten_at_once_with_its_tokens():
    """A book full of queued work: the finished batch just rebuilt from S3 is the only
    one it can forget, at once; a resend under a token it held would then find no batch,
    and store its file a second time."""
    book = ResultBook(max_items=2)
    queued = "q" * 32
    book.add(queued, [Item(f"q{n}", queued, "x") for n in range(2)])  # never answered
    rebuilt, done = "r" * 32, Item("r0", "r" * 32, "x", token="0")
    done.state = "done"
    book.merge(rebuilt, [done])
    assert [i.id for i in book.batch(rebuilt)] == ["r0"]
    assert book.add(rebuilt, [Item("r1", rebuilt, "x", token="0")])[0] is done


def test_ids():
    assert is_service_id("0123456789abcdef" * 2)
    assert not is_service_id("0123456789ABCDEF" * 2)
    assert not is_service_id("../" + "a" * 29)
    assert batch_id_of(f"{BATCH}/i/n.jpg") == BATCH
    assert batch_id_of("elsewhere/n.jpg") is None


class RecordingStop(threading.Event):
    """The listeners' stop event, recording each wait on it: the pauses they take."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout=None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


class BrokenSqs:
    """Every call fails, as when the endpoint is down."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def get_queue_url(self, **kw):
        with self.lock:
            self.calls += 1
        raise ConnectionError("endpoint down")


def test_listeners_back_off_on_errors_and_stop_promptly(monkeypatch):
    from common.aws import Aws
    from web_tier import listeners as listeners_module

    # An hour: a stop that did not end the backoff would leave them running.
    monkeypatch.setattr(listeners_module, "MIN_BACKOFF_S", 3600.0)
    monkeypatch.setattr(listeners_module, "MAX_BACKOFF_S", 3600.0)

    sqs = BrokenSqs()
    aws = Aws(Settings())
    aws._clients["sqs"] = aws._clients["sqs-receive"] = sqs  # as if made and kept: no real client is made
    listeners = Listeners(aws, ResultBook(), wait_s=20)
    listeners._stop = stop = RecordingStop()
    listeners.start()
    # Backing off, not spinning: each thread failed once and waits.
    wait_until(lambda: len(stop.waits) >= 3, 10)
    assert stop.waits == [3600.0] * 3 and sqs.calls == 3
    listeners.stop(timeout=5)
    assert not listeners.running


def test_failing_listeners_wait_at_most_5_s_between_polls_and_log_one_traceback(caplog):
    """At 30 s, answers waiting when SQS came back reached their clients up to 30 s late.
    A traceback at every failure (with botocore's chained errors) flooded the log."""
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout=None) -> bool:
            waits.append(timeout)
            if len(waits) == 7:
                self.set()
            return self.is_set()

    def poll() -> None:
        raise ConnectionError("endpoint down")

    listeners = Listeners(SimpleNamespace(), ResultBook(), wait_s=20)  # type: ignore[arg-type]
    listeners._stop = Stop()
    with caplog.at_level("INFO", logger="web_tier.listeners"):
        listeners._run(poll)
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    records = [r for r in caplog.records if r.name == "web_tier.listeners"]
    assert len(records) == 7 and [bool(r.exc_info) for r in records] == [True] + [False] * 6
    assert "failed again (7 in a row): ConnectionError: endpoint down" in records[-1].getMessage()


def test_a_listener_says_when_it_polls_again_after_failures(caplog):
    outcomes = [ConnectionError("down"), ConnectionError("down"), None]
    listeners = Listeners(SimpleNamespace(), ResultBook(), wait_s=20)  # type: ignore[arg-type]
    listeners._stop = SimpleNamespace(is_set=lambda: not outcomes, wait=lambda timeout: False)

    def poll() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    with caplog.at_level("INFO", logger="web_tier.listeners"):
        listeners._run(poll)
    assert "polling again after 2 failed polls" in caplog.text


def test_idle_listeners_short_polling_pause_between_empty_receives_and_stop_at_once(monkeypatch):
    """wait_s=0 (RECEIVE_WAIT=0): idle listeners asked SQS again as fast as it answered."""
    from web_tier import listeners as listeners_module

    # An hour: a stop that did not end the pause would leave them running.
    monkeypatch.setattr(listeners_module, "SHORT_POLL_PAUSE_S", 3600.0)
    calls = []
    sqs = SimpleNamespace(receive_message=lambda **kw: calls.append(kw["WaitTimeSeconds"]) or {})
    aws = SimpleNamespace(sqs=sqs, sqs_receive=sqs, response_queue_url="responses",
                          dead_letter_queue_url="dead")
    listeners = Listeners(aws, ResultBook(), wait_s=0)  # type: ignore[arg-type]
    listeners._stop = stop = RecordingStop()
    listeners.start()
    try:
        # Each thread's one receive, then its pause: spinning made thousands of receives.
        wait_until(lambda: len(stop.waits) >= 3, 10)
        assert stop.waits == [3600.0] * 3 and calls == [0] * 3
    finally:
        listeners.stop(timeout=5)
    assert not listeners.running  # the hour's pause ended by the stop


def test_malformed_responses_are_dropped_not_retried_forever():
    deleted = []
    sqs = SimpleNamespace(
        receive_message=lambda **kw: {"Messages": [{"Body": "garbage", "ReceiptHandle": "r1"},
                                                   {"Body": response("a").to_json(), "ReceiptHandle": "r2"}]},
        delete_message_batch=lambda QueueUrl, Entries: deleted.extend(Entries) or {"Successful": []},
    )
    aws = SimpleNamespace(sqs=sqs, sqs_receive=sqs, response_queue_url="q")
    book = book_with("a")
    Listeners(aws, book).poll_responses()  # type: ignore[arg-type]
    assert [e["ReceiptHandle"] for e in deleted] == ["r1", "r2"]
    assert book.get("a").state == "done"


def test_a_closing_books_listeners_leave_what_they_receive_and_stop():
    """After SIGTERM they must not go on taking answers from the shared queues, recording
    them in the closed book and deleting them: during a reload the new process's answers
    would be lost to it, its items queued for ever."""
    dead_letter = ClassifyRequest(id="d" * 32, bucket="in", key=f"{BATCH}/{'d' * 32}/d.jpg", filename="d.jpg")
    bodies = {"responses": response("a").to_json(), "dead": dead_letter.to_json()}
    deleted, handed_back = [], []
    sqs = SimpleNamespace(
        receive_message=lambda QueueUrl, **kw: {
            "Messages": [{"Body": bodies[QueueUrl], "ReceiptHandle": QueueUrl}]},
        delete_message_batch=lambda QueueUrl, Entries: deleted.extend(Entries) or {},
        change_message_visibility_batch=lambda QueueUrl, Entries: handed_back.extend(
            (e["ReceiptHandle"], e["VisibilityTimeout"]) for e in Entries) or {},
    )
    aws = SimpleNamespace(sqs=sqs, sqs_receive=sqs, response_queue_url="responses",
                          dead_letter_queue_url="dead")
    book = book_with("a", "d" * 32)
    book.close()  # SIGTERM, with a receive in flight
    listeners = Listeners(aws, book)  # type: ignore[arg-type]
    listeners.poll_responses()
    listeners.poll_dead_letters()
    assert deleted == []
    assert handed_back == [("responses", 0), ("dead", 0)]  # visible again at once
    assert book.get("a").state == book.get("d" * 32).state == "queued"

    listeners.start()
    wait_until(lambda: not listeners.running)


def test_listeners_told_to_stop_leave_what_their_last_polls_receive():
    """gunicorn's worker_exit waits for the last polls whatever stopped the process; a
    stop other than SIGTERM (Ctrl-C, a worker timeout) does not close the book, and those
    polls' answers would be recorded in a dying process and deleted."""
    deleted, handed_back = [], []
    sqs = SimpleNamespace(
        receive_message=lambda **kw: {"Messages": [{"Body": response("a").to_json(), "ReceiptHandle": "r"}]},
        delete_message_batch=lambda QueueUrl, Entries: deleted.extend(Entries) or {},
        change_message_visibility_batch=lambda QueueUrl, Entries: handed_back.extend(
            (e["ReceiptHandle"], e["VisibilityTimeout"]) for e in Entries) or {},
    )
    book = book_with("a")
    listeners = Listeners(SimpleNamespace(sqs=sqs, sqs_receive=sqs, response_queue_url="q"), book)  # type: ignore[arg-type]
    listeners.stop()  # the book left open
    listeners.poll_responses()  # the poll in flight when told
    assert deleted == [] and handed_back == [("r", 0)]
    assert book.get("a").state == "queued"


def test_a_hand_back_sqs_partly_refuses_is_said(caplog):
    """SQS's Failed entries went unread: the log said every message was handed back."""
    caplog.set_level(logging.INFO, logger="web_tier.listeners")
    sqs = SimpleNamespace(
        receive_message=lambda **kw: {"Messages": [{"Body": response(i).to_json(), "ReceiptHandle": f"r-{i}"}
                                                   for i in ("a", "b")]},
        change_message_visibility_batch=lambda QueueUrl, Entries: {
            "Successful": [{"Id": Entries[0]["Id"]}],
            "Failed": [{"Id": Entries[1]["Id"], "SenderFault": True, "Code": "ReceiptHandleIsInvalid",
                        "Message": "ReceiptHandleIsInvalid"}]},
    )
    book = book_with("a", "b")
    book.close()
    Listeners(SimpleNamespace(sqs=sqs, sqs_receive=sqs, response_queue_url="q"), book).poll_responses()  # type: ignore[arg-type]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "could not hand back 1 of 2 messages" in warning and "ReceiptHandleIsInvalid" in warning
    assert "handed back 1 messages received while stopping" in caplog.text


def test_an_event_id_covers_every_item_that_finished_before_it(monkeypatch):
    """An event's id says every item finished up to it has been sent, so a client
    resuming from it is sent only later ones. Reading the items' states one by one, the
    stream would send y first if x and y finished while it was between them, and a
    client that resumed from y's id never get x."""
    from web_tier.events import stream

    book = book_with("x", "y")
    finisher = threading.Thread(target=lambda: (book.record(response("x")), book.record(response("y"))))
    real = Item.is_finished
    looks_at_x: list[bool] = []

    def is_finished_racing(item: Item) -> bool:
        finished = real.fget(item)
        if item.id == "x" and not finished:
            looks_at_x.append(finished)
        if len(looks_at_x) == 2 and finisher.ident is None:
            # Both finish now, between the stream's look at x and at y in its second
            # check of the whole batch for its end (the first found x queued, looked no
            # further, and waited out one keep-alive interval: nothing was published).
            finisher.start()
            finisher.join(30)  # no lock is held here: the stream reads is_finished outside the book's
            assert real.fget(book_items["y"]), "both must finish here, or the race is not tested"
        return finished

    book_items = {i.id: i for i in book.batch(BATCH)}
    monkeypatch.setattr(Item, "is_finished", property(is_finished_racing))
    # A short keep-alive interval: the second check comes after the first one's wait.
    events = [e for e in stream(book, BATCH, lambda: book.batch(BATCH), keepalive_s=0.1)
              if e.startswith("id:")]
    finisher.join(5)
    sent_seqs = [int(e.split("\n")[0].split(".")[1]) for e in events]
    assert sent_seqs == [1, 2], "each event must come after every item that finished before it"


def test_a_rebuild_takes_the_whole_name_s3_holds_but_not_a_cleaned_one():
    """S3's name replaces an answer's cut one; a name rebuilt from the key (an object
    without the name in its metadata) is cleaned, and must not replace a real one."""
    book = ResultBook()
    long_name = "x" * 200 + ".jpg"
    book.record(ClassifyResponse(id="cut", filename=long_name[:160], key=f"{BATCH}/cut/x.jpg", worker="w",
                                 untrained=False, label="cat", score=0.5))
    book.record(ClassifyResponse(id="real", filename="café.jpg", key=f"{BATCH}/real/caf_.jpg", worker="w",
                                 untrained=False, label="cat", score=0.5))
    book.merge(BATCH, [Item("cut", BATCH, long_name, f"{BATCH}/cut/x.jpg"),
                       Item("real", BATCH, "caf_.jpg", f"{BATCH}/real/caf_.jpg")])
    assert book.get("cut").filename == long_name
    assert book.get("real").filename == "café.jpg"


def test_an_item_that_joins_the_batch_finished_is_sent_in_its_place():
    """An answer for an item this process did not upload (after a restart) joins its
    batch finished. Joining between the stream's read of the batch and of what had
    finished, it must not be sent after an item that finished later."""
    from web_tier.events import stream

    book = book_with("w")
    reads = []

    def items():
        snapshot = book.batch(BATCH)
        reads.append(len(snapshot))
        if len(reads) == 2:  # the loop's first read: z joins (finished), then w finishes
            book.record(response("z"))
            book.record(response("w"))
        return snapshot

    events = [e for e in stream(book, BATCH, items, keepalive_s=5) if e.startswith("id:")]
    assert [int(e.split("\n")[0].split(".")[1]) for e in events] == [1, 2]


def test_under_a_backlog_past_the_cap_eviction_looks_only_at_finished_batches(monkeypatch):
    """With more items queued than the cap nothing can be forgotten, and eviction walking
    every batch at each upload and each result costs ~130 ms apiece under the book's lock
    at 100,000. It looks only at batches that may have finished now."""
    book = ResultBook(max_items=1_000)
    ids = [f"{n:032x}" for n in range(3_000)]
    for batch_id in ids:
        book.add(batch_id, [Item(f"i{batch_id}", batch_id, "x")])
    looked = []
    finished = Item.is_finished

    monkeypatch.setattr(Item, "is_finished",
                        property(lambda item: looked.append(item) or finished.fget(item)))
    for batch_id in ids[::-30]:  # 100 results, newest first
        book.fail(f"i{batch_id}", "x")
    for batch_id in ids[-50:]:  # and uploads to new batches
        book.add(batch_id[::-1], [Item(f"j{batch_id}", batch_id[::-1], "x")])
    assert len(looked) < 2_000, len(looked)  # a walk of the book is 3,000 a time
    # The finished batches were forgotten, as far as the cap asked; the queued ones kept.
    assert all(book.batch(b) is None for b in ids[::-30])
    assert all(book.get(f"i{b}") is not None for b in ids if b not in ids[::-30])


def test_one_large_batch_past_the_cap_is_not_walked_at_each_result(monkeypatch):
    """A page adding chunk after chunk to one batch: each result must not make eviction
    look at all of its items, ~8 ms under the lock at 110,000."""
    book = ResultBook(max_items=1_000)
    big = "b" * 32
    book.add(big, [Item(f"i{n}", big, "x") for n in range(3_000)])
    looked = []
    finished = Item.is_finished
    monkeypatch.setattr(Item, "is_finished",
                        property(lambda item: looked.append(item) or finished.fget(item)))
    for n in range(100):
        book.fail(f"i{n}", "x")
    assert len(looked) < 1_000, len(looked)  # one look at the batch is 3,000
    assert len(book.batch(big)) == 3_000  # nothing of it forgotten: it is not finished


def test_eviction_never_forgets_an_item_still_queued_whatever_the_order():
    """Random uploads, results, rebuilds, discards and reads on a small book: every item
    still queued stays, and after each change that evicts, the book is within its cap
    or holds no finished batch it could forget."""
    import random

    rng = random.Random(1234)
    book = ResultBook(max_items=20)
    batches = [f"{n:032x}" for n in range(12)]
    queued: set[str] = set()
    evictions = 0
    for step in range(3_000):
        batch_id = rng.choice(batches)
        action, keep = rng.random(), None
        if action < 0.35:
            items = [Item(f"{step}-{k}", batch_id, "x") for k in range(rng.randint(1, 3))]
            book.add(batch_id, items)
            queued.update(i.id for i in items)
            keep = batch_id
        elif action < 0.7 and queued:
            item_id = rng.choice(sorted(queued))
            book.fail(item_id, "x", key=f"{book.get(item_id).batch_id}/{item_id}/x")
            queued.discard(item_id)
            keep = ""
        elif action < 0.8:
            done = Item(f"r{step}", batch_id, "x")
            done.state = "done"
            book.merge(batch_id, [done])
            keep = batch_id
        elif action < 0.9 and queued:
            item_id = rng.choice(sorted(queued))
            book.discard(item_id)
            queued.discard(item_id)
        else:
            book.batch(batch_id)
        assert all(book.get(i) is not None for i in queued), step
        if keep is None or len(book._items) <= 20:
            continue
        forgettable = [b for b, batch in book._batches.items() if b != keep
                       and all(book._items[i].is_finished for i in batch.item_ids if i in book._items)]
        assert not forgettable, (step, forgettable)
        evictions += 1
    assert evictions > 100  # the cap was passed often enough to test something


def test_a_stream_looks_at_its_whole_batch_only_when_it_may_be_done():
    """Looking at the whole batch after each item that finished, 64 streams of a
    4,000-item batch would take most of a core, and slow every other request. In
    between, each item comes from the book's publication alone. Items finish one at a
    time here, each read from the stream before the next finishes."""
    from web_tier.events import stream

    ids = [f"i{n:04d}" for n in range(1_000)]
    book = book_with(*ids)
    looks = []

    def items():
        looks.append(1)
        return book.batch(BATCH)

    events = stream(book, BATCH, items, keepalive_s=30)
    assert next(events).startswith("retry:")
    sent = []
    for item_id in ids:
        book.record(response(item_id))
        sent.append(next(events))
    assert next(events).startswith("event: end")
    assert [json.loads(e.split("data: ", 1)[1])["id"] for e in sent] == ids
    assert len(looks) <= 3, f"{len(looks)} looks at the whole batch for {len(ids)} items"


def test_an_item_a_rebuild_adds_finished_is_published_to_streams_in_its_place():
    """A rebuild from S3 numbers the finished items it adds; unpublished, a stream sent
    them only at its next look at the whole batch, after items that finished later."""
    book = book_with("a")
    inbox = book.subscribe(BATCH)
    book.merge(BATCH, [Item("a", BATCH, "a.jpg", f"{BATCH}/a/a.jpg"),
                       Item("s3", BATCH, "s3.jpg", f"{BATCH}/s3/s3.jpg", state="done", label="cat")])
    book.record(response("a"))
    published = [inbox.get(timeout=1), inbox.get(timeout=1)]
    assert [(i.id, i.event_seq) for i in published] == [("s3", 1), ("a", 2)]


def _events_of(stream, until_id: str | None = None) -> list[tuple[str, str, str]]:
    """(event id, item id, state) of each item event `stream` sends, up to the one for
    item `until_id`, or to `end`."""
    got = []
    for chunk in stream:
        fields = dict(line.split(": ", 1) for line in chunk.strip().splitlines() if ": " in line)
        if fields.get("event") == "end":
            return got
        if "data" in fields and "id" in fields:
            body = json.loads(fields["data"])
            got.append((fields["id"], body["id"], body["state"]))
            if body["id"] == until_id:
                return got
    return got


def test_a_stream_resumed_after_an_item_queued_again_misses_no_outcome():
    """An item queued again and finished in place would let a stream that read it queued
    send its outcome under the later number, and a client resuming from it never hear of
    an item finished in between."""
    from common.failure_tags import DEAD_LETTER_ERROR
    from web_tier import events

    book = book_with("a", "x", "y")
    book.record(response("a"))
    book.fail("x", DEAD_LETTER_ERROR, key=f"{BATCH}/x/x.jpg", filename="x.jpg")
    assert book.queue_again("x", time.time()) is not None
    first = events.stream(book, BATCH, lambda: book.batch(BATCH), keepalive_s=0.2, max_s=30)
    heard = _events_of(first, until_id="a")
    # Paused there (a slow socket), while y and then x are answered.
    book.record(response("y"))
    book.record(response("x"))
    heard += _events_of(first, until_id="x")
    first.close()
    resumed = events.stream(book, BATCH, lambda: book.batch(BATCH), keepalive_s=0.2, max_s=30,
                            last_event_id=heard[-1][0])
    heard += _events_of(resumed)
    finals = {(item, state) for _, item, state in heard if state == "done"}
    assert finals == {("a", "done"), ("x", "done"), ("y", "done")}, heard
    numbers = [int(event_id.split(".")[1]) for event_id, _, _ in heard]
    assert numbers == sorted(numbers), heard  # each id: every change up to it was sent


def test_a_wait_on_an_item_queued_again_gets_its_answer():
    """Answered, an item queued again is a new item (see the test above): a wait on it
    (the no-JavaScript answer page's) must get that one, not the one it waited on."""
    from common.failure_tags import DEAD_LETTER_ERROR

    book = book_with("x")
    book.fail("x", DEAD_LETTER_ERROR, key=f"{BATCH}/x/x.jpg", filename="x.jpg")
    assert book.queue_again("x", time.time()) is not None
    got = _waited_while_answered(book, "x", "cat")
    assert got is not None and (got.state, got.label) == ("done", "cat")


def _waited_while_answered(book: ResultBook, item_id: str, label: str) -> Item | None:
    """What a wait on the item gets when a worker answers it with `label` meanwhile."""
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(book.wait(item_id, 20)))
    waiting.start()
    wait_until(lambda: book.get(item_id).waiter is not None, 10)
    book.record(response(item_id, label))
    waiting.join(20)
    assert got, "the wait did not end"
    return got[0]


def test_a_wait_gets_the_answer_that_woke_it_even_if_its_batch_is_forgotten_at_once():
    """The answer that finishes an item queued again is a new item; if it also finishes
    the oldest batch past the cap, eviction forgets it under the same lock. The wait
    then found no item in the book and fell back to the one it had waited on, still
    queued: "not answered yet" for an image that was answered."""
    from common.failure_tags import DEAD_LETTER_ERROR

    book = ResultBook(max_items=1)
    book.add(BATCH, [Item("x", BATCH, "x.jpg", f"{BATCH}/x/x.jpg")])
    book.fail("x", DEAD_LETTER_ERROR, key=f"{BATCH}/x/x.jpg", filename="x.jpg")
    assert book.queue_again("x", time.time()) is not None
    other = "c" * 32  # a newer batch, still queued: the book is past its cap of 1
    book.add(other, [Item("y", other, "y.jpg", f"{other}/y/y.jpg")])
    got = _waited_while_answered(book, "x", "cat")
    assert book.get("x") is None, "forgotten as it finished: what this test is about"
    assert got is not None and (got.state, got.label) == ("done", "cat")
