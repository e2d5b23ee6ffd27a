"""Scale-in in the middle of a load loses nothing and strands nothing.

The visibility timeout here is 300 s: a message left in flight by a removed
worker would hold its answer back for five minutes, far past the deadline.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.conftest import make_image
from tests.integration.conftest import clients, live_instances, running_stack, wait_for


@pytest.fixture(scope="module")
def slow_redelivery_stack(tmp_path_factory):
    yield from running_stack(tmp_path_factory, {
        "MAX_INSTANCES": "4", "VISIBILITY_TIMEOUT": "300", "RECEIVE_BATCH": "4"})


def test_instances_removed_mid_load_finish_or_hand_back_their_work(slow_redelivery_stack):
    stack = slow_redelivery_stack
    _, _, ec2 = clients(stack)
    images = {f"scalein_{i:02d}.jpg": make_image(6000 + i) for i in range(40)}
    reply = requests.post(f"{stack.web_url}/api/jobs", timeout=60,
                          files=[("files", (n, d)) for n, d in images.items()])
    assert reply.status_code == 202
    batch_id = reply.json()["batch_id"]

    # Remove instances while they work, as a scale-in decision would.
    removed: list[str] = []

    def scale_in_twice():
        for _ in range(2):
            running = wait_for(lambda: [i for i in live_instances(ec2) if i["State"]["Name"] == "running"
                                        and i["InstanceId"] not in removed] or None,
                               60, "a running instance to remove", interval=0.1)
            victim = running[0]["InstanceId"]
            ec2.terminate_instances(InstanceIds=[victim])
            removed.append(victim)
            time.sleep(1.0)  # let the fleet recover before the next removal

    chaos = threading.Thread(target=scale_in_twice)
    chaos.start()
    started = time.monotonic()

    def finished():
        got = requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=10).json()["items"]
        return got if all(i["state"] != "queued" for i in got) else None

    items = wait_for(finished, 120, "every image answered despite scale-in", interval=0.5)
    chaos.join(timeout=60)
    took = time.monotonic() - started
    assert len(removed) == 2
    assert len(items) == 40 and all(i["state"] == "done" for i in items), items
    assert took < 120, f"{took:.0f}s: something waited out a visibility timeout"
    # No image was answered twice, and none went to the dead letters.
    assert len({i["id"] for i in items}) == 40
    logs = (stack.run_dir / "logs")
    handed_back = sum(p.read_text().count("handing back") for p in logs.glob("worker-*.log"))
    print(f"\nscale-in mid-load: 40 images in {took:.1f}s, 2 instances removed, "
          f"{handed_back} hand-backs logged")
