"""Scale-in in the middle of a load, and workers killed outright, lose nothing and
strand nothing.

The visibility timeout here is 300 s: a message left in flight by a removed or
killed worker would hold its answer back for five minutes, far past the deadline.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import requests

from tests.conftest import make_image
from tests.integration.conftest import (
    STACK_TIMEOUT,
    clients,
    journaled_receipts,
    live_instances,
    requests_shown_again,
    running_stack,
    serving_workers,
    wait_for,
)

pytestmark = STACK_TIMEOUT


@pytest.fixture(scope="module")
def slow_redelivery_stack(tmp_path_factory):
    yield from running_stack(tmp_path_factory, {
        "MAX_INSTANCES": "4", "VISIBILITY_TIMEOUT": "300", "RECEIVE_BATCH": "4"})


def finished_items_or_all(stack, batch_id: str) -> list[dict]:
    """The batch's items as they are now."""
    return requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=10).json()["items"]


def finished_items(stack, batch_id: str) -> list[dict] | None:
    """The batch's items once none is still queued."""
    got = requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=10).json()["items"]
    return got if all(i["state"] != "queued" for i in got) else None


def test_instances_removed_mid_load_finish_or_hand_back_their_work(slow_redelivery_stack):
    """Each instance is removed while it holds requests; every image is still answered,
    its result stored once, well within the visibility timeout (300 s): none was
    stranded with it. (A request delivered again after its result was stored finds it
    and stores no second one: the versions count stores, not model calls.)"""
    stack = slow_redelivery_stack
    s3, _, ec2 = clients(stack)
    out_bucket = f"{stack.prefix}-out-bucket"
    # Each write of a result kept: an image whose result was stored twice leaves two versions.
    s3.put_bucket_versioning(Bucket=out_bucket, VersioningConfiguration={"Status": "Enabled"})
    images = {f"scalein_{i:02d}.jpg": make_image(6000 + i) for i in range(60)}
    reply = requests.post(f"{stack.web_url}/api/jobs", timeout=60,
                          files=[("files", (n, d)) for n, d in images.items()])
    assert reply.status_code == 202
    batch_id = reply.json()["batch_id"]

    # Remove instances while they hold requests, as a scale-in decision would.
    removed: list[str] = []

    def holding_instance() -> str | None:
        running = [i["InstanceId"] for i in live_instances(ec2)
                   if i["State"]["Name"] == "running" and i["InstanceId"] not in removed]
        return next((i for i in running if journaled_receipts(stack, i)), None)

    def scale_in_twice():
        for _ in range(2):
            victim = wait_for(holding_instance, 60, "a running instance holding requests", interval=0.05)
            ec2.terminate_instances(InstanceIds=[victim])
            removed.append(victim)

    chaos = threading.Thread(target=scale_in_twice)
    chaos.start()
    started = time.monotonic()

    # Well within the 300 s timeout: a request stranded with a removed instance waits it out.
    items = wait_for(lambda: finished_items(stack, batch_id), 120, "every image answered despite scale-in",
                     interval=0.5)
    chaos.join(timeout=60)
    took = time.monotonic() - started
    assert len(removed) == 2
    assert len(items) == 60 and all(i["state"] == "done" for i in items), items
    for victim in removed:  # a warm shutdown each: the batch in hand finished, the rest handed back
        wait_for(lambda v=victim: f"worker {v}: stopped after" in logs_now(stack), 60, f"{victim} to stop")
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=out_bucket)
    versions = Counter(v["Key"] for page in pages for v in page.get("Versions", [])
                       if v["Key"].rsplit("/", 1)[-1] in images)
    assert len(versions) == 60 and set(versions.values()) == {1}, \
        {key: n for key, n in versions.items() if n > 1}
    handed_back = logs_now(stack).count("handing back")
    print(f"\nscale-in mid-load: 60 images in {took:.1f}s, 2 instances removed while holding "
          f"requests, {handed_back} hand-backs logged")


def logs_now(stack) -> str:
    """What the stack's workers have logged so far."""
    return "".join(p.read_text() for p in (stack.run_dir / "logs").glob("worker-*.log"))


def test_workers_killed_outright_have_their_requests_shown_again_by_their_successors(slow_redelivery_stack):
    """SIGKILL: no hand-back. The worker restarted on each instance makes what the
    killed one held visible again at once (app_tier/held_journal.py), instead of
    leaving it to the visibility timeout (300 s here).

    Up to one receive's worth (RECEIVE_BATCH=4) for each worker killed may still wait
    out the timeout, whatever the successors do: a receive SQS answered and the worker
    never read, or, likelier here, the killed worker's long poll, which the embedded
    AWS goes on serving after the kill, and which takes requests as they are shown
    again (4 were left in half of the runs here). The kill comes once the queue is
    empty and the journals hold as many receipts as are in flight; a first version,
    which waited for every image, failed in a fresh-clone run."""
    stack = slow_redelivery_stack
    _, sqs, _ = clients(stack)
    queue_url = sqs.get_queue_url(QueueName=f"{stack.prefix}-req-queue")["QueueUrl"]
    # More than four workers hold (two batches of RECEIVE_BATCH=4 each): the queue is
    # empty while they still work, and no receive can take anything more.
    images = {f"killed_{i:02d}.jpg": make_image(6100 + i) for i in range(40)}
    reply = requests.post(f"{stack.web_url}/api/jobs", timeout=60,
                          files=[("files", (n, d)) for n, d in images.items()])
    assert reply.status_code == 202
    batch_id = reply.json()["batch_id"]

    def serving_workers_holding_all_in_flight():
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        visible = int(attributes["ApproximateNumberOfMessages"])
        in_flight = int(attributes["ApproximateNumberOfMessagesNotVisible"])
        held = journaled_receipts(stack)
        serving = serving_workers(stack)
        return serving if visible == 0 and in_flight and held >= in_flight and serving else None

    victims = wait_for(serving_workers_holding_all_in_flight, 60, "every request held and written down",
                       interval=0.02)
    for victim in victims:
        victim.kill()
    killed_at = time.monotonic()
    unread_at_most = 4 * len(victims)  # one receive each, read by no worker

    def only_the_unread_left():
        """Every image answered but at most the unread: those left are in flight,
        held by no worker (no journal names them), and the queue holds nothing else."""
        items = finished_items_or_all(stack, batch_id)
        left = len([i for i in items if i["state"] == "queued"])
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        settled = (int(attributes["ApproximateNumberOfMessages"]) == 0
                   and int(attributes["ApproximateNumberOfMessagesNotVisible"]) == left
                   and journaled_receipts(stack) == 0)
        return items if left == 0 or (left <= unread_at_most and settled) else None

    # Well within the 300 s timeout: without the journals every request in flight waits it out.
    items = wait_for(only_the_unread_left, 60, "every journaled request answered", interval=0.5)
    took = time.monotonic() - killed_at
    done = [i for i in items if i["state"] != "queued"]
    assert all(i["state"] == "done" for i in done), done
    shown = requests_shown_again(stack)
    assert shown >= 1, "no successor made anything visible: nothing tested"
    print(f"\n{len(victims)} workers killed holding messages: {shown} shown again by their successors "
          f"or the runner; {len(done)} of {len(images)} answered {took:.1f}s after the kill, "
          f"{len(images) - len(done)} left to the timeout (unread at the kill)")
