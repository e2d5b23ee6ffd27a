"""Crashes on the real stack: nothing finished is lost, nothing waiting is stranded."""

from __future__ import annotations

import time

import requests

from tests.conftest import make_image
from tests.integration.conftest import (
    clients,
    live_instances,
    processes,
    reference,
    serving_workers,
    wait_for,
)


def batch_states(stack, batch_id: str) -> dict[str, dict]:
    reply = requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=30)
    return {i["filename"]: i for i in reply.json()["items"]} if reply.status_code == 200 else {}


def test_web_tier_process_killed_mid_batch_loses_nothing(stack, reference_model):
    images = {f"restart_{i:02d}.jpg": make_image(3000 + i) for i in range(12)}
    reply = requests.post(f"{stack.web_url}/api/jobs", timeout=60,
                          files=[("files", (n, d)) for n, d in images.items()])
    assert reply.status_code == 202
    batch_id = reply.json()["batch_id"]

    # gunicorn's worker process holds the result book and the listeners; its
    # master starts a fresh one with an empty book.
    master = [p for p in processes(stack, "gunicorn") if p.children()][0]
    old_worker = master.children()[0]
    old_worker.kill()
    wait_for(lambda: [c for c in master.children() if c.pid != old_worker.pid], 30, "a new web worker")
    wait_for(lambda: requests.get(f"{stack.web_url}/healthz", timeout=5).status_code == 200, 30, "healthz")

    def finished():
        items = batch_states(stack, batch_id)
        return items if len(items) == 12 and all(i["state"] != "queued" for i in items.values()) else None

    items = wait_for(finished, 120, "the batch to finish after the web tier restarted", interval=0.5)
    for name, data in images.items():
        assert items[name]["state"] == "done", items[name]
        assert items[name]["label"] == reference(reference_model, data).label


def test_worker_killed_mid_batch_its_images_are_answered_by_another(stack, reference_model):
    images = {f"crash_{i:02d}.jpg": make_image(4000 + i) for i in range(8)}
    started = time.monotonic()
    reply = requests.post(f"{stack.web_url}/api/jobs", timeout=60,
                          files=[("files", (n, d)) for n, d in images.items()])
    batch_id = reply.json()["batch_id"]

    _, sqs, _ = clients(stack)
    queue_url = sqs.get_queue_url(QueueName=f"{stack.prefix}-req-queue")["QueueUrl"]

    def workers_holding_messages():
        held = int(sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "ApproximateNumberOfMessagesNotVisible"])["Attributes"]["ApproximateNumberOfMessagesNotVisible"])
        serving = serving_workers(stack)
        return serving if held and serving else None

    victims = wait_for(workers_holding_messages, 60, "workers holding messages", interval=0.02)
    for victim in victims:
        victim.kill()  # SIGKILL mid-batch: no warm shutdown, no hand-back

    def finished():
        items = batch_states(stack, batch_id)
        return items if len(items) == 8 and all(i["state"] != "queued" for i in items.values()) else None

    items = wait_for(finished, 120, "the batch to be answered after its worker died", interval=0.5)
    took = time.monotonic() - started
    for name, data in images.items():
        assert items[name]["state"] == "done", items[name]
        assert items[name]["label"] == reference(reference_model, data).label
    # Redelivered after the 12 s visibility timeout, not stranded.
    assert took < 90, took


def test_controller_killed_is_restarted_and_the_fleet_still_follows_the_work(stack, reference_model):
    """A controller crash (SIGKILL) is not the end of the service: the stack restarts it,
    as systemd would, and the new one takes over the fleet from what EC2 shows."""
    old = processes(stack, "controller.py")
    assert len(old) == 1
    old[0].kill()
    new = wait_for(lambda: [p for p in processes(stack, "controller.py") if p.pid != old[0].pid],
                   30, "a restarted controller")
    assert len(new) == 1
    assert any("controller was killed by SIGKILL; restarting it" in line for line in list(stack.output))

    data = make_image(5000)
    reply = requests.post(f"{stack.web_url}/", files={"inputFile": ("after_restart.jpg", data)}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.text == f"after_restart:{reference(reference_model, data).label}"
    _, _, ec2 = clients(stack)
    wait_for(lambda: not live_instances(ec2), 60, "the restarted controller to scale back to zero")
