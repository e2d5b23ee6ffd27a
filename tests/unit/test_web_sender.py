"""Group commit of request messages: alone at once, together in batches, failures to their senders."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import random
import threading
import time
from collections import deque

import pytest

from common.sqs import SQS_MAX_BATCH
from tests.conftest import without_credentials
from tests.unit.conftest import wait_until
from web_tier.sender import MAX_SENDS_IN_FLIGHT, BatchingSender, SendError


def _queued(aws) -> list[str]:
    bodies = []
    while True:
        got = aws.sqs.receive_message(QueueUrl=aws.request_queue_url, MaxNumberOfMessages=10,
                                      WaitTimeSeconds=0).get("Messages", [])
        if not got:
            return sorted(bodies)
        bodies += [m["Body"] for m in got]


def _in_threads(send, bodies: list[str]) -> tuple[list[threading.Thread], dict[str, BaseException]]:
    """A thread sending each body, named after it; what each that raised raised."""
    errors: dict[str, BaseException] = {}

    def one(body: str) -> None:
        try:
            send(body)
        except BaseException as exc:  # an Interrupted too
            errors[body] = exc

    threads = [threading.Thread(target=one, args=(b,), name=b) for b in bodies]
    for t in threads:
        t.start()
    return threads, errors


def _batch_sizes(sqs) -> list[int]:
    """Entries in each SendMessageBatch `sqs` makes from now on."""
    sizes: list[int] = []
    sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch",
                             lambda params, **_: sizes.append(len(params["Entries"])))
    return sizes


def test_a_lone_message_is_sent_at_once(web_aws):
    sizes = _batch_sizes(web_aws.sqs)
    sender = BatchingSender(lambda: web_aws.sqs, lambda: web_aws.request_queue_url)
    sender.send("one")
    assert _queued(web_aws) == ["one"]
    assert sizes == [1]


def _first_sends_held(web_aws, first: list[str]) -> tuple[BatchingSender, list[int], threading.Event,
                                                            list[threading.Thread]]:
    """A sender whose first MAX_SENDS_IN_FLIGHT sends, of `first`'s bodies, are held in
    flight until the event returned is set; its batches' sizes, and the senders' threads."""
    release, held = threading.Event(), threading.Semaphore(0)
    sizes = _batch_sizes(web_aws.sqs)

    def hold_the_first_sends(**_):
        if len(sizes) <= MAX_SENDS_IN_FLIGHT:
            held.release()
            assert release.wait(10)

    web_aws.sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch", hold_the_first_sends)
    sender = BatchingSender(lambda: web_aws.sqs, lambda: web_aws.request_queue_url)
    threads = []
    for body in first:  # one at a time: each its own send
        threads += _in_threads(sender.send, [body])[0]
        assert held.acquire(timeout=10)
    return sender, sizes, release, threads


def test_messages_arriving_during_sends_go_out_together(web_aws):
    """While the sends in flight are held, 28 more callers queue; they go out in batches of ten."""
    first = [f"m{n:02d}" for n in range(MAX_SENDS_IN_FLIGHT)]
    sender, sizes, release, first_threads = _first_sends_held(web_aws, first)
    bodies = [f"m{n:02d}" for n in range(MAX_SENDS_IN_FLIGHT, 30)]
    rest, errors = _in_threads(sender.send, bodies)
    wait_until(lambda: len(sender._waiting) == len(bodies))
    release.set()
    for t in first_threads + rest:
        t.join(10)
    assert not errors
    assert sizes[:MAX_SENDS_IN_FLIGHT] == [1] * MAX_SENDS_IN_FLIGHT
    assert sorted(sizes[MAX_SENDS_IN_FLIGHT:]) == [8, SQS_MAX_BATCH, SQS_MAX_BATCH]
    assert _queued(web_aws) == [*first, *bodies]


def test_each_message_of_a_batch_carries_its_own_attributes(web_aws):
    """A dead letter sent again (marked seen before) goes out in a batch with uploads'
    requests, which must not be marked with it."""
    sender, sizes, release, threads = _first_sends_held(
        web_aws, [f"first {n}" for n in range(MAX_SENDS_IN_FLIGHT)])
    marked = {"PriorReceives": {"DataType": "Number", "StringValue": "1"}}
    errors: list[BaseException] = []

    def send(*args) -> None:
        try:
            sender.send(*args)
        except BaseException as exc:
            errors.append(exc)

    threads += [threading.Thread(target=send, args=("plain",)),
                threading.Thread(target=send, args=("marked", marked))]
    for t in threads[-2:]:
        t.start()
    wait_until(lambda: errors or len(sender._waiting) == 2)
    release.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert sizes[MAX_SENDS_IN_FLIGHT:] == [2]
    got = web_aws.sqs.receive_message(QueueUrl=web_aws.request_queue_url, MaxNumberOfMessages=10,
                                      MessageAttributeNames=["All"])["Messages"]
    unmarked = {body: {} for body in [*(f"first {n}" for n in range(MAX_SENDS_IN_FLIGHT)), "plain"]}
    assert {m["Body"]: m.get("MessageAttributes", {}) for m in got} == {**unmarked, "marked": marked}


def test_a_send_that_stalls_holds_up_no_other_upload():
    """With one send in flight at a time, a call stuck in botocore's read timeout (30 s a
    try) would hold every upload of the process behind it (10 POST / of ~0.2 s take 3-4 s
    behind one call slowed by 4 s)."""
    class StallingSqs(FlakySqs):
        def __init__(self) -> None:
            super().__init__()
            self.stalled, self.unstall = threading.Event(), threading.Event()

        def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803
            if Entries[0]["MessageBody"] == "stalls":
                self.stalled.set()
                assert self.unstall.wait(10)
            return super().send_message_batch(QueueUrl, Entries)

    sqs = StallingSqs()
    sender = BatchingSender(lambda: sqs, lambda: "url")
    stalled, _ = _in_threads(sender.send, ["stalls"])
    assert sqs.stalled.wait(10)
    try:
        later, errors = _in_threads(sender.send, ["later"])
        wait_until(lambda: "later" in sqs.accepted, why=lambda: "sent behind the stalled call")
    finally:
        sqs.unstall.set()
        for t in stalled + later:
            t.join(10)
    assert not errors and sorted(sqs.accepted) == ["later", "stalls"]


class FlakySqs:
    """An SQS client that refuses the bodies in `refuse` and fails whole calls `broken` times."""

    def __init__(self, refuse: set[str] = frozenset(), broken: int = 0) -> None:
        self.refuse, self.broken, self.accepted = refuse, broken, []

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803 (boto3's names)
        if self.broken:
            self.broken -= 1
            raise ConnectionError("SQS is down")
        failed = [{"Id": e["Id"], "Code": "InvalidMessageContents", "SenderFault": True}
                  for e in Entries if e["MessageBody"] in self.refuse]
        self.accepted += [e["MessageBody"] for e in Entries if e["MessageBody"] not in self.refuse]
        return {"Successful": [], "Failed": failed}


def test_a_refused_entry_fails_only_its_own_sender():
    sqs = FlakySqs(refuse={"bad"})
    sender = BatchingSender(lambda: sqs, lambda: "url")
    with pytest.raises(SendError, match="InvalidMessageContents"):
        sender.send("bad")
    sender.send("good")
    assert sqs.accepted == ["good"]


def test_a_failed_call_fails_its_batch_and_the_next_batch_still_goes():
    sqs = FlakySqs(broken=1)
    sender = BatchingSender(lambda: sqs, lambda: "url")
    with pytest.raises(SendError) as failed:
        sender.send("lost")
    assert isinstance(failed.value.__cause__, ConnectionError)
    sender.send("next")
    assert sqs.accepted == ["next"]


# SQS's answers a try may end with, by HTTP status.
ANSWERS = {500: b'{"__type": "InternalError", "message": "we failed"}',
           400: b'{"__type": "InvalidParameterValue", "message": "no"}',
           200: b'{"Successful": [], "Failed": [{"Id": "0", "SenderFault": false, "Code": "InternalError"}]}'}


def _tries_end(sqs, outcomes: list):
    """Each try of `sqs`'s SendMessageBatch ends as the next of `outcomes` says, with no
    network: an exception it raises, or an HTTP status it answers (ANSWERS)."""
    from botocore.awsrequest import AWSResponse

    left = deque(outcomes)

    class Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **_):
            yield self.body

    def try_ends(request, **_):
        outcome = left.popleft()
        if isinstance(outcome, BaseException):
            raise outcome
        return AWSResponse(request.url, outcome, {"Content-Type": "application/x-amz-json-1.0"},
                           Raw(ANSWERS[outcome]))

    sqs.meta.events.register("before-send.sqs.SendMessageBatch", try_ends)
    return sqs


def _sqs_whose_tries_end(outcomes: list):
    """A real SQS client (as many tries a call as `outcomes`, botocore's standard mode
    retrying) whose tries end as _tries_end says."""
    import boto3

    from common.aws import client_config
    from common.aws_errors import watch_untold_tries

    sqs = boto3.session.Session().client("sqs", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                                         config=client_config(attempts=len(outcomes)))
    return watch_untold_tries(_tries_end(sqs, outcomes), "SendMessageBatch")


@pytest.mark.parametrize(("tries", "maybe_taken"), [
    # No answer to the first try: SQS may have taken it, whatever the last try says.
    (["read timeout", "refused"], True),
    (["closed", "refused"], True),
    ([500, "refused"], True),
    (["read timeout", 200], True),  # a later try answered, the entry refused
    # No try reached SQS, or SQS refused each: not taken.
    (["refused", "connect timeout"], False),
    ([400], False),
    ([200], False),
])
def test_a_failed_send_says_whether_sqs_may_have_taken_it(tries, maybe_taken):
    """Told "not queued" after a try SQS had taken, refusing the upload and deleting its
    image would have the worker answer "image missing", or answer it after its 503.
    botocore raises only the last try's error."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    url = "http://127.0.0.1:9/"
    made = {"read timeout": ReadTimeoutError(endpoint_url=url),
            "closed": ConnectionClosedError(endpoint_url=url),
            "refused": EndpointConnectionError(endpoint_url=url),
            "connect timeout": ConnectTimeoutError(endpoint_url=url)}
    sqs = _sqs_whose_tries_end([made.get(t, t) for t in tries])
    sender = BatchingSender(lambda: sqs, lambda: "http://127.0.0.1:9/123456789012/requests")
    with pytest.raises(SendError) as failed:
        sender.send("body")
    assert failed.value.maybe_taken is maybe_taken


def test_the_web_tiers_send_client_counts_the_tries_that_had_no_answer(web_aws):
    """Aws.sqs_send is the client the sender is given (services.py): without its watch,
    every failed send read as "not taken"."""
    from botocore.exceptions import ReadTimeoutError

    from common.aws import Aws

    aws = Aws(dataclasses.replace(web_aws.settings, endpoint_url="http://127.0.0.1:9"))
    sqs = _tries_end(aws.sqs_send, [ReadTimeoutError(endpoint_url="http://127.0.0.1:9/"), 400])
    sender = BatchingSender(lambda: sqs, lambda: "http://127.0.0.1:9/123456789012/requests")
    with pytest.raises(SendError) as failed:
        sender.send("body")
    assert failed.value.maybe_taken
    assert aws.sqs_send is sqs  # kept, watched once


def test_a_web_tier_started_without_credentials_sends_once_they_come(web_aws, monkeypatch, tmp_path):
    """Keeping the SQS client of the app's start, made without credentials (the instance
    profile attached later, IMDS missing its try at boot), the sender would fail every
    upload's request until a restart by hand, while S3 and /healthz have recovered."""
    from concurrent.futures import ThreadPoolExecutor

    from botocore.exceptions import NoCredentialsError

    from common.aws import Aws
    from web_tier.results import ResultBook
    from web_tier.services import Services

    url = web_aws.request_queue_url  # made while there were credentials
    without_credentials(monkeypatch, tmp_path)
    aws = Aws(web_aws.settings)
    aws._queue_urls[web_aws.settings.request_queue] = url
    svc = Services(web_aws.settings, aws, ResultBook(), ThreadPoolExecutor(1))
    try:
        with pytest.raises(SendError) as refused:
            svc.submitter.requests.send("before")
        assert isinstance(refused.value.__cause__, NoCredentialsError) and not refused.value.maybe_taken
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "came-later")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "came-later")
        svc.submitter.requests.send("after")
    finally:
        svc.stop()
    assert _queued(web_aws) == ["after"]



class HeldSqs(FlakySqs):
    """Accepts all; each of its first `held` calls waits for its turn (`let_go`), and
    its next one raises `then` if given."""

    def __init__(self, held: int = MAX_SENDS_IN_FLIGHT, then: BaseException | None = None) -> None:
        super().__init__()
        self.held, self.then = held, then
        self.turns, self.holding = threading.Semaphore(0), threading.Semaphore(0)
        self.calls, self._lock = 0, threading.Lock()  # calls: begun

    def let_go(self, calls: int | None = None) -> None:
        """Let that many held calls go on (all by default)."""
        self.turns.release(self.held if calls is None else calls)

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803
        with self._lock:
            self.calls += 1
            call = self.calls
        if call <= self.held:
            self.holding.release()
            assert self.turns.acquire(timeout=10)
        elif call == self.held + 1 and self.then is not None:
            raise self.then
        with self._lock:
            return super().send_message_batch(QueueUrl, Entries)


def _holding_both_slots(sender: BatchingSender, sqs: HeldSqs) -> list[threading.Thread]:
    """The callers whose sends `sqs` holds, one a slot."""
    threads = []
    for n in range(MAX_SENDS_IN_FLIGHT):
        threads += _in_threads(sender.send, [f"first{n}"])[0]
        assert sqs.holding.acquire(timeout=10)
    return threads


class Wakeups:
    """Watches the sender's wake-ups through the conditions it makes (`condition`, its
    condition factory): the waits begun and ended, and the callers notified that have
    not yet come back from their wait. The caller of body `interrupt` is interrupted as
    it starts to wait. Counted on the sender's lock, which wait and notify hold."""

    def __init__(self, interrupt: str = "") -> None:
        self.interrupt = interrupt
        self.waits = self.wakeups = 0
        self.woken_not_back = 0

    def condition(self, lock) -> threading.Condition:
        return _CountingCondition(lock, self)


class _CountingCondition(threading.Condition):
    def __init__(self, lock, counts: Wakeups) -> None:
        super().__init__(lock)
        self.counts = counts
        self.not_notified = 0  # of its callers in wait(): those notify() would wake

    def wait(self, timeout=None):
        if threading.current_thread().name == self.counts.interrupt:
            raise Interrupted
        self.counts.waits += 1
        self.not_notified += 1
        notified = False
        try:
            notified = super().wait(timeout)
            return notified
        finally:
            self.counts.wakeups += 1
            if notified:
                self.counts.woken_not_back -= 1
            else:  # timed out, or interrupted in the wait: never notified
                self.not_notified -= 1

    def notify(self, n=1):
        woken = min(n, self.not_notified)
        self.not_notified -= woken
        self.counts.woken_not_back += woken
        super().notify(n)


def test_a_finished_send_wakes_only_its_own_callers_and_the_next_sender():
    """One condition for all would wake every waiting caller at the end of every send:
    with 800 waiting (a big upload), ~1 ms of CPU a message. Each caller is woken when
    its message is done, or when it is the next to send."""
    wakeups = Wakeups()
    sqs = HeldSqs(held=1000)
    sender = BatchingSender(lambda: sqs, lambda: "url", condition=wakeups.condition)
    first = _holding_both_slots(sender, sqs)
    bodies = [f"m{n:02d}" for n in range(40)]
    rest, errors = _in_threads(sender.send, bodies)
    wait_until(lambda: wakeups.waits == len(bodies), why=lambda: f"{wakeups.waits} waiting")

    def settled() -> bool:
        """Every caller woken has looked, and waits again, sends or has returned."""
        return wakeups.woken_not_back == 0

    # The calls go on one at a time, each once the wake-ups of the last have played out.
    threads, let_go = first + rest, 0
    while True:
        wait_until(lambda n=let_go: sqs.calls > n or not any(t.is_alive() for t in threads))
        if sqs.calls == let_go:
            break  # every caller has returned
        wait_until(settled)
        sqs.let_go(1)
        let_go += 1
    assert not errors and sorted(sqs.accepted) == sorted([*bodies, "first0", "first1"])
    # Once when its message is done, and at most twice a send to start the next (the
    # old code, each caller then waiting at each send's end: 96 for 6 sends).
    assert wakeups.wakeups <= len(bodies) + 2 * sqs.calls, (wakeups.wakeups, sqs.calls)


class Interrupted(BaseException):
    """As a signal's exception, or SystemExit, raised in a caller's thread."""


def test_an_interrupted_send_fails_its_batch_mates():
    """Interrupted, the sending caller left its batch-mates returning as if SQS had
    taken their messages."""
    sqs = HeldSqs(then=Interrupted())
    sender = BatchingSender(lambda: sqs, lambda: "url")
    first = _holding_both_slots(sender, sqs)
    bodies = ["a", "b", "c"]
    rest, errors = _in_threads(sender.send, bodies)
    wait_until(lambda: len(sender._waiting) == len(bodies))
    sqs.let_go()  # the next send, of all three, is interrupted
    for t in first + rest:
        t.join(10)
    assert sorted(sqs.accepted) == ["first0", "first1"]
    assert sorted(errors) == bodies
    interrupted = [b for b in bodies if isinstance(errors[b], Interrupted)]
    assert len(interrupted) == 1  # the caller that sent them; its batch-mates hear why:
    assert all(isinstance(errors[b], SendError) for b in bodies if b not in interrupted)


def test_a_caller_interrupted_while_waiting_takes_its_message_back():
    """Left waiting, the message of a caller who heard an error was sent by the next."""
    sqs = HeldSqs()
    sender = BatchingSender(lambda: sqs, lambda: "url", condition=Wakeups(interrupt="gone").condition)
    first = _holding_both_slots(sender, sqs)
    gone, errors = _in_threads(sender.send, ["gone"])
    gone[0].join(10)
    stays, more_errors = _in_threads(sender.send, ["stays"])
    wait_until(lambda: len(sender._waiting) == 1)
    sqs.let_go()
    for t in first + stays:
        t.join(10)
    assert isinstance(errors["gone"], Interrupted) and not more_errors
    assert sorted(sqs.accepted) == ["first0", "first1", "stays"]


class ChaosSqs:
    """Accepts, refuses some entries, fails whole calls or is interrupted in them, at
    random; records what it did with each body, and checks the sender's rules as it goes."""

    REFUSE, FAIL, INTERRUPT = 0.05, 0.08, 0.02  # of entries; of calls; of calls

    def __init__(self, seed: int) -> None:
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.outcome: dict[str, str] = {}  # body -> accepted, refused, call failed, interrupted
        self.in_flight = self.most_in_flight = 0
        self.broken: list[str] = []  # the rules seen broken
        self.sending = threading.local()  # the body each caller is sending (its thread)

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803
        bodies = [e["MessageBody"] for e in Entries]
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            draw, pause = self.rng.random(), self.rng.choice([0, 0, 0, 0.0005, 0.002])
            refused = {b for b in bodies if self.rng.random() < self.REFUSE}
            if not 1 <= len(bodies) <= SQS_MAX_BATCH:
                self.broken.append(f"a batch of {len(bodies)}")
            if self.sending.body in self.outcome:
                self.broken.append(f"{self.sending.body}'s caller sent {bodies} after its own was sent")
            for b in bodies:
                if b in self.outcome:
                    self.broken.append(f"{b} sent twice")
        time.sleep(pause)  # a call's own latency, to mix the callers' turns
        with self.lock:
            self.in_flight -= 1
            outcome = ("call failed" if draw < self.FAIL else
                       "interrupted" if draw < self.FAIL + self.INTERRUPT else None)
            for b in bodies:
                self.outcome[b] = outcome or ("refused" if b in refused else "accepted")
        if outcome == "call failed":
            raise ConnectionError("SQS is down")
        if outcome == "interrupted":
            raise Interrupted
        return {"Successful": [], "Failed": [{"Id": e["Id"], "Code": "InvalidMessageContents"}
                                            for e in Entries if e["MessageBody"] in refused]}


@pytest.mark.parametrize("seed", range(3))
def test_many_callers_and_failures_lose_duplicate_and_strand_nothing(seed):
    """48 threads each send 25 messages while SQS fails at random: every message is
    sent at most once, its caller hears its outcome, and every caller is done by the
    deadline; at most MAX_SENDS_IN_FLIGHT calls at a time, each of 1-10 messages, and
    none from a caller whose own message had gone out already."""
    sqs = ChaosSqs(seed)
    sender = BatchingSender(lambda: sqs, lambda: "url")
    heard: dict[str, str] = {}

    def caller(n: int) -> None:
        for m in range(25):
            body = sqs.sending.body = f"t{n:02d}-{m:02d}"
            try:
                sender.send(body)
                heard[body] = "accepted"
            except SendError as exc:
                heard[body] = ("interrupted" if "interrupted" in str(exc) else
                               "call failed" if isinstance(exc.__cause__, ConnectionError) else "refused")
            except Interrupted:
                heard[body] = "interrupted"

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(48)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"{len(stuck)} callers still waiting, {len(sender._waiting)} messages untaken"
    assert not sqs.broken, sqs.broken[:5]
    assert sqs.most_in_flight <= MAX_SENDS_IN_FLIGHT
    assert len(heard) == 48 * 25
    # Each caller heard what SQS did with its message, unless it was interrupted (in its
    # own send of others', its own in another's: not known), and only then was one not sent.
    told = {b: o for b, o in heard.items() if o != "interrupted"}
    assert told == {b: o for b, o in sqs.outcome.items() if b in told}
    assert set(heard) - set(sqs.outcome) <= set(heard) - set(told)
    assert sender._waiting == deque() and sender._sends_in_flight == 0


class StallingSqsEndpoint:
    """SQS on loopback whose first call is never answered, as on a dead pooled connection
    (until `stop`); it accepts every message of the later ones."""

    def __init__(self) -> None:
        self.calls, self.accepted, self.stopping = 0, [], threading.Event()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                entries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["Entries"]
                endpoint.calls += 1  # (one handler at a time but the stalled one)
                if endpoint.calls == 1:
                    endpoint.stopping.wait(60)
                    return  # closes the connection, unanswered
                endpoint.accepted += [e["MessageBody"] for e in entries]
                answer = json.dumps({"Successful": [
                    {"Id": e["Id"], "MessageId": f"m{n}", "MD5OfMessageBody": hashlib.md5(
                        e["MessageBody"].encode()).hexdigest()} for n, e in enumerate(entries)]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_stalled_send_is_tried_again_within_seconds(web_settings, monkeypatch):
    """A dead pooled connection holds its send for botocore's read timeout, 30 s a try:
    two of them would hold every upload of the process. The web tier's sender gives up on
    a call unanswered after SEND_READ_TIMEOUT_S, and botocore tries it again."""
    from concurrent.futures import ThreadPoolExecutor

    from common import aws as aws_module
    from common.aws import Aws
    from web_tier.results import ResultBook
    from web_tier.services import Services

    # Seconds, as made: far short of botocore's 30 s a try. 2 s here, not 5 (3 s less to
    # wait), and still time for the second try's answer on a loaded machine (late, it
    # would be tried a third time).
    assert aws_module.SEND_READ_TIMEOUT_S == 5.0
    read_timeout_s = 2.0
    monkeypatch.setattr(aws_module, "SEND_READ_TIMEOUT_S", read_timeout_s)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    endpoint = StallingSqsEndpoint()
    settings = dataclasses.replace(web_settings, endpoint_url=endpoint.url)
    aws = Aws(settings)
    aws._queue_urls[settings.request_queue] = f"{endpoint.url}/123456789012/requests"
    svc = Services(settings, aws, ResultBook(), ThreadPoolExecutor(1))
    sending, errors = _in_threads(svc.submitter.requests.send, ["stalled"])
    try:
        # The first try, the second's backoff (<= 1 s); short of botocore's 30 s a try.
        sending[0].join(read_timeout_s + 10)
        assert not sending[0].is_alive(), "still waiting on the stalled call"
    finally:
        endpoint.stop()
        svc.stop()
        sending[0].join(60)
    # Sent again once the stalled call was given up on, not answered by it.
    assert not errors and endpoint.accepted == ["stalled"] and endpoint.calls == 2


class GatedLock:
    """A lock whose acquire, by the threads named in `gates`, first waits for the gate:
    to let another caller take the lock ahead of a woken one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        gate = self.gates.get(threading.current_thread().name)
        if gate is not None and blocking:
            assert gate.wait(10)
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()


class GatedSqs:
    """Accepts all; a call whose first body has an event in `holds` waits for it."""

    def __init__(self) -> None:
        self.holds: dict[str, threading.Event] = {}
        self.calls: list[list[str]] = []

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803
        bodies = [e["MessageBody"] for e in Entries]
        self.calls.append(bodies)
        hold = self.holds.get(bodies[0])
        if hold is not None:
            assert hold.wait(30)
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}


def test_a_free_slot_is_used_while_the_oldest_callers_own_send_is_under_way():
    """A caller may send the ten oldest messages, not its own: its message can then be
    the oldest waiting while it sends. Woken as the oldest's caller when a slot comes
    free, it cannot act on it, and the slot must not sit idle behind its send, however
    long that stalls."""
    sqs = GatedSqs()
    sender = BatchingSender(lambda: sqs, lambda: "queue")
    sender._lock = GatedLock()
    holds = {body: threading.Event() for body in ("x1", "x2", "w01", "w11")}
    sqs.holds.update(holds)
    _in_threads(sender.send, ["x1"])
    wait_until(lambda: len(sqs.calls) == 1)
    _in_threads(sender.send, ["x2"])
    wait_until(lambda: len(sqs.calls) == 2)  # both slots held
    for n in range(1, 21):
        _in_threads(sender.send, [f"w{n:02d}"])
        wait_until(lambda n=n: len(sender._waiting) == n)
    # x1's send ends and wakes w01, which is slow to take the lock: A, just arrived,
    # takes the slot and sends w01-w10, ahead of its own message.
    sender._lock.gates["w01"] = w01_late = threading.Event()
    holds["x1"].set()
    wait_until(lambda: len(sender._waiting) == 20 and sender._sends_in_flight == 1)
    _in_threads(sender.send, ["A"])
    wait_until(lambda: len(sqs.calls) == 3)
    assert sqs.calls[2] == [f"w{n:02d}" for n in range(1, 11)]
    w01_late.set()
    holds["x2"].set()  # w11 sends w11-w20: A's own message is the oldest waiting
    wait_until(lambda: len(sqs.calls) == 4)
    assert sqs.calls[3][0] == "w11" and [m.body for m in sender._waiting] == ["A"]
    threads, errors = _in_threads(sender.send, ["B", "C"])
    wait_until(lambda: len(sender._waiting) == 3)
    holds["w11"].set()  # a slot is free while A's send (w01-w10) still stalls
    try:
        wait_until(lambda: len(sqs.calls) == 5, 10,
                   why=lambda: f"a slot free for 10 s, waiting {[m.body for m in sender._waiting]}")
        assert sqs.calls[4] == ["A", "B", "C"]
        for t in threads:
            t.join(10)
        assert not errors and not any(t.is_alive() for t in threads)
    finally:
        holds["w01"].set()
