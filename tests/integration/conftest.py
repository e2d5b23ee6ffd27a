"""The real stack (moto server, runner, controller, gunicorn web tier) for integration tests."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping

import boto3
import psutil
import pytest
import requests

from localaws.harness import StackProcess
from localaws.stack import STOP_TIMEOUT_S
from tests.conftest import wait_for as wait_for  # the integration tests import it from here

# How long a stopping stack is given before it is killed (its own budget is STOP_TIMEOUT_S).
STOP_GRACE_S = STOP_TIMEOUT_S + 30

# Each integration module's pytestmark (pyproject.toml's default, 120 s, is for unit tests).
# pytest-timeout counts fixtures in a test's time: a stack's start (the model made ready,
# the fleet's first worker) falls in its first test, its stop in its last, and a loaded
# 2-core machine makes both slow. Tests here take seconds to a minute or two: these bound
# only a hang. An AWS alone (moto's server) starts in seconds.
STACK_TIMEOUT = pytest.mark.timeout(900)
AWS_ONLY_TIMEOUT = pytest.mark.timeout(600)


def pytest_collection_modifyitems(items):
    # The tests on the session's stack last: it runs until the session ends, and a module
    # starting a stack of its own after it would run two at once (one at a time: 2 cores).
    items.sort(key=lambda item: "integration" in str(item.fspath) and "stack" in item.fixturenames)
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        # A page module without it would start a stack, then fail without Chromium, not skip.
        if item.fspath.basename.startswith("test_page") and not any(item.iter_markers("needs_tools")):
            raise pytest.UsageError(f"{item.nodeid}: a page test module needs pytestmark = NEEDS_CHROMIUM "
                                    "(tests/integration/page.py)")


def running_stack(tmp_path_factory, overrides: dict[str, str] | None = None):
    """Start a stack; on the way out, check that it stopped in time and left nothing behind."""
    run_dir = tmp_path_factory.mktemp("stack")
    proc = StackProcess(run_dir, env_overrides=overrides or {}).start()
    children = proc.descendants()
    try:
        yield proc
    finally:
        # Its own budget, then its kills, and the interpreter's exit: stop() kills it after that.
        # Far past it: the stack bounds its own stop, and a loaded machine must not make
        # this a test of its speed.
        proc.stop(timeout_s=STOP_GRACE_S)
        deadline = time.monotonic() + 5
        alive = still_running(children)
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = still_running(alive)
        logs = "".join(proc.output[-40:])
        assert not alive, f"processes left behind: {[c.pid for c in alive]}\n{logs}"
        assert proc.process.returncode != -signal.SIGKILL, \
            f"the stack was killed, still running {STOP_GRACE_S:g} s after SIGTERM\n{logs}"
        leaked = os.listdir(proc.tmp_dir)
        assert not leaked, f"temporary files left behind: {sorted(leaked)}"


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running, zombies not counted; one that ends while it
    is looked at (its /proc entry gone between two reads) is not (a flaky failure)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One running stack shared by the pipeline and page tests (a small fleet: 2 cores here)."""
    # A short visibility timeout lets the crash tests see redelivery in seconds;
    # workers extend it while they work, so nothing is redelivered by mistake.
    yield from running_stack(tmp_path_factory, {"MAX_INSTANCES": "4", "VISIBILITY_TIMEOUT": "12"})


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium for a page test (tests/integration/test_page_*.py)."""
    from tests.integration.page import chromium  # not at the top: page.py imports this module

    with chromium(str(tmp_path / "profile")) as driver:
        yield driver


def aws_client(service: str, url: str):
    """A boto3 client for the embedded AWS at `url`, with the test credentials."""
    return boto3.client(service, endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def clients(proc: StackProcess):
    return aws_client("s3", proc.aws_url), aws_client("sqs", proc.aws_url), aws_client("ec2", proc.aws_url)


def answers(url: str) -> bool:
    """Whether a GET of `url` is answered 200 now: a web tier starting may refuse the
    connection, or be too busy to answer within 5 s (a wait_for predicate)."""
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def processes(stack: StackProcess, marker: str) -> list[psutil.Process]:
    """The stack's processes whose command line contains `marker`."""
    found = []
    for proc in stack.descendants():
        try:
            if marker in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


# How often workers_held looks at the workers it holds (each one continued by another is
# stopped again), and every how many such looks it looks for new ones.
HOLD_AGAIN_S = 0.004
NEW_WORKER_ROUNDS = 5


@contextlib.contextmanager
def workers_held(stack: StackProcess) -> Iterator[list[psutil.Process]]:
    """Every worker process of the stack stopped (SIGSTOP) for the block, and any the
    runner starts meanwhile (an instance launched for the work held back, a new spare)
    as soon as it is seen, long before it has loaded its model: nothing is classified
    until the block ends, when all are continued (SIGCONT), whatever happened in it.
    For a test that needs work unfinished at some moment. Keep the block short: the
    runner's watchdog aborts a worker silent for LOCAL_WATCHDOG (60 s).

    One continued by another (the runner stops a worker whose instance the controller
    ended with SIGTERM then SIGCONT, as systemd does) is stopped again at the next look,
    every HOLD_AGAIN_S. Left running, a worker of the last test's fleet, scaled in during
    the block, took the request its long poll had been given while held, and classified
    it before its SIGTERM's handler ran: the idle-stream test then failed now and then,
    the page rightly no longer polling a batch done."""
    held: list[psutil.Process] = []
    lock = threading.Lock()  # no SIGSTOP once the SIGCONTs have begun
    done = threading.Event()

    def hold_new() -> None:
        with lock:
            if done.is_set():
                return
            for proc in processes(stack, "-m app_tier"):
                if proc not in held:
                    with contextlib.suppress(psutil.Error):  # ended meanwhile
                        proc.suspend()
                        held.append(proc)

    def hold_again() -> None:
        with lock:
            if done.is_set():
                return
            for proc in held:
                with contextlib.suppress(psutil.Error):  # ended meanwhile
                    if proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                        proc.suspend()

    def keep_holding() -> None:
        # Looking for new workers reads every process's /proc entries (milliseconds);
        # looking at those held, a file each.
        for round_ in itertools.count(1):
            if done.wait(HOLD_AGAIN_S):
                return
            hold_again()
            if round_ % NEW_WORKER_ROUNDS == 0:
                hold_new()

    hold_new()  # those running now, before the block begins
    threading.Thread(target=keep_holding, daemon=True).start()
    try:
        yield held
    finally:
        with lock:
            done.set()
            for proc in held:
                with contextlib.suppress(psutil.Error):
                    proc.resume()


def serving_workers(stack: StackProcess) -> list[psutil.Process]:
    """Worker processes serving an instance, by the runner's own word.

    An adopted warm spare still has `--instance-id -` on its command line, so the
    command line cannot say which workers serve; the runner's log line can.
    """
    pids = stack.serving_worker_pids()
    return [proc for proc in processes(stack, "app_tier") if proc.pid in pids]


def journaled_receipts(stack: StackProcess, instance_id: str = "*") -> int:
    """Receipts the stack's workers (or the worker of `instance_id`) have written down
    as held (app_tier/held_journal.py)."""
    count = 0
    for path in (stack.run_dir / "state" / "imgclass").glob(f"*-held-{instance_id}.json"):
        try:
            count += len(json.loads(path.read_text())["held"])
        except FileNotFoundError:
            pass  # removed since it was listed: nothing held there now
    return count


def serving_workers_once_some_hold_messages(stack: StackProcess) -> list[psutil.Process]:
    """The serving workers, as soon as the request queue has messages in flight held by
    them, written down in their journals (a worker killed between its receive and that
    write leaves its successor nothing to show), polled as often as SQS answers: for a
    kill that must come mid-batch."""
    _, sqs, _ = clients(stack)
    queue_url = sqs.get_queue_url(QueueName=f"{stack.prefix}-req-queue")["QueueUrl"]

    def held_and_serving():
        held = int(sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "ApproximateNumberOfMessagesNotVisible"])["Attributes"]["ApproximateNumberOfMessagesNotVisible"])
        serving = serving_workers(stack)
        return serving if held and serving and journaled_receipts(stack) else None

    return wait_for(held_and_serving, 60, "workers holding messages", interval=0.02)


def requests_shown_again(stack: StackProcess) -> int:
    """How many requests killed workers held have been made visible again (or handed
    back) so far: by their successors (the workers' logs), or by the runner (the stack's)."""
    logged = "".join(p.read_text() for p in (stack.run_dir / "logs").glob("worker-*.log"))
    logged += "".join(list(stack.output))
    return sum(int(n) for n in re.findall(r"made (\d+) request\(s\) visible again", logged))


def live_instances(ec2) -> list[dict]:
    reply = ec2.describe_instances(Filters=[
        {"Name": "tag:Name", "Values": ["app-tier-instance-*"]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i for r in reply["Reservations"] for i in r["Instances"]]


def queue_counts(sqs, prefix: str) -> dict[str, int]:
    out = {}
    for suffix in ("req-queue", "resp-queue", "req-dlq"):
        url = sqs.get_queue_url(QueueName=f"{prefix}-{suffix}")["QueueUrl"]
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        out[suffix] = int(attrs["ApproximateNumberOfMessages"]) + int(
            attrs["ApproximateNumberOfMessagesNotVisible"])
    return out


@pytest.fixture(scope="session")
def reference_model():
    """The same network the workers run, called directly in the test."""
    from app_tier.model import load_classifier

    return load_classifier("random", os.environ.get("MODEL_RUNTIME", "openvino"), threads=1)


def reference(model, data: bytes):
    import numpy as np

    from app_tier.images import prepare

    return model.classify(np.stack([prepare(data, 40_000_000)]))[0]


# Batch size changes float32 sums in the last digits (measured: 3e-6 at a score of 0.57).
SCORE_TOLERANCE = 1e-5


def references(model, images: Mapping[str, bytes], top1_only: bool = False) -> dict:
    """Each image's answer from the reference model, checked to be told apart from the
    others' by its scores. Untrained weights give nearly every image the same label
    ("ant" for 15 of the page tests' 19 images), so a check of labels alone could not
    see one file shown with another's answer, or one fixed answer for all. The page
    shows the top-1 score alone (`data-score`): `top1_only` asks that one to differ."""
    refs = {name: reference(model, data) for name, data in images.items()}
    scores = {name: [ref.score] if top1_only else [p.score for p in ref.top5] for name, ref in refs.items()}
    for a, b in itertools.combinations(sorted(scores), 2):
        gap = max(abs(x - y) for x, y in zip(scores[a], scores[b], strict=True))
        assert gap > 2 * SCORE_TOLERANCE, f"{a} and {b} score alike: {scores[a]}, {scores[b]}"
    return refs


def assert_matches(ref, label, score, top5_labels, top5_scores, name):
    assert label == ref.label, name
    assert abs(score - ref.score) <= SCORE_TOLERANCE, (name, score, ref.score)
    assert top5_labels == [p.label for p in ref.top5], name
    for got, want in zip(top5_scores, [p.score for p in ref.top5], strict=True):
        assert abs(got - want) <= SCORE_TOLERANCE, name


def assert_item_matches(item: dict, ref, name: str) -> None:
    """An item of `GET /api/jobs/<batch id>` is `ref`'s answer: label, score and top 5."""
    assert_matches(ref, item["label"], item["score"], [p["label"] for p in item["top5"]],
                   [p["score"] for p in item["top5"]], name)


def assert_row_shows(row, ref, name: str) -> None:
    """A page row shows `ref`'s answer: its label, and its score (`data-score`, 6 decimals)."""
    assert row.get_attribute("data-label") == ref.label, name
    score = float(row.get_attribute("data-score"))
    assert abs(score - ref.score) <= SCORE_TOLERANCE, (name, score, ref.score)

