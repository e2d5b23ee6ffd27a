"""Soak: 1,000 images through /api/jobs while workers are SIGKILLed at random,
and one is stopped (SIGSTOP: a hang that only the runner's watchdog ends).

`make test` runs it last, alone (`make soak` runs only it). Prints a table of
what was injected and what came back.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter

import psutil
import pytest
import requests

from bench.memory import kind_of as process_kind
from tests.conftest import make_image
from tests.integration.conftest import (
    assert_item_matches,
    clients,
    queue_counts,
    references,
    running_stack,
    serving_workers,
    wait_for,
)

# Past its own deadlines (600 s for the answers, then the checks'), to print what is stuck.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(1500)]

IMAGES = 1000
# With 4 workers, each lives ~16 s between kills, and holds up to 20 messages
# for ~6 s on a slow 2-core host (every kill costs all 20 an attempt, and a
# message seen before is classified alone, more slowly): each attempt is then
# killed with p ~ 0.3. Ten attempts make a healthy batch's trip to the dead
# letters ~1e-3 likely over a run's ~150 batches (0.3^10 * 150); with five and a
# kill every 3 s (p ~ 0.4) it happened in 3 runs of 4, whole batches of 10.
KILL_EVERY_S = 4.0
MAX_RECEIVE_COUNT = 10
# The third fault stops its worker instead: its slot stays taken until the
# watchdog's SIGABRT (after WATCHDOG_S) and SIGKILL (30 s later: a stopped
# process cannot act on SIGABRT) end it, and the runner starts another.
HANG_AT_FAULT = 3
WATCHDOG_S = 5
# The runner's word that a worker said READY=1: only then does its watchdog run
# (before, it is TimeoutStartSec's 15 minutes that would end a hang).
READY = re.compile(r"runner: worker pid (\d+) for \S+ is ready")


@pytest.fixture(scope="module")
def soak_stack(tmp_path_factory):
    # Shorter visibility timeout so a killed worker's batch comes back within seconds.
    yield from running_stack(tmp_path_factory, {
        "VISIBILITY_TIMEOUT": "10", "MAX_RECEIVE_COUNT": str(MAX_RECEIVE_COUNT), "LOCAL_MAX_WORKERS": "4",
        "LOCAL_WATCHDOG": str(WATCHDOG_S)})


def kind_of(proc: psutil.Process, root_pid: int) -> str:
    """The process's part of the stack (as `make bench` names them), or "gone"."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "gone"
    if not cmdline:  # a zombie, or a fork not yet exec'd: nothing to measure
        return "gone"
    return process_kind(cmdline, proc.pid == root_pid)


def output_keys(stack, s3) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=f"{stack.prefix}-out-bucket"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def what_is_stuck(stack, s3, sqs, batches: list[str]) -> str:
    """For a failure message: the items still queued, what S3 and SQS hold of them,
    and what the stack logged that was not routine."""
    queued = []
    for b in batches:
        queued += [i for i in requests.get(f"{stack.web_url}/api/jobs/{b}", timeout=30).json()["items"]
                   if i["state"] == "queued"]
    answered = {key.split("/")[1] for key in output_keys(stack, s3)}
    lines = [f"{len(queued)} items still queued; queues: {queue_counts(sqs, stack.prefix)}"]
    lines += [f"  {i['id']} {i['filename']}: {'has' if i['id'] in answered else 'no'} output pair"
              for i in queued[:10]]
    noted = [line for line in stack.output if " WARNING " in line or " ERROR " in line]
    lines += ["stack warnings and errors (last 40):", *noted[-40:]]
    return "\n".join(lines)


def test_thousand_images_with_workers_killed_at_random(soak_stack, reference_model):
    stack = soak_stack
    s3, sqs, _ = clients(stack)
    rng = random.Random(546)
    stop = threading.Event()
    kills: list[int] = []
    hung: list[psutil.Process] = []
    memory: dict[str, list[tuple[float, int]]] = {}

    def chaos():
        while not stop.wait(KILL_EVERY_S):
            victims = [v for v in serving_workers(stack) if v not in hung]
            hang = len(kills) + 1 == HANG_AT_FAULT and not hung
            if hang:
                ready = {int(m.group(1)) for line in list(stack.output) if (m := READY.search(line))}
                victims = [v for v in victims if v.pid in ready]
            if victims:
                victim = rng.choice(victims)
                try:
                    if hang:
                        victim.suspend()
                        hung.append(victim)
                    else:
                        victim.kill()
                        kills.append(victim.pid)
                except psutil.Error:
                    pass

    def sample_memory():
        while not stop.wait(1.0):
            per_kind: Counter = Counter()
            for proc in [psutil.Process(stack.process.pid), *stack.descendants()]:
                kind = kind_of(proc, stack.process.pid)
                if kind == "gone":  # exited between the listing and now
                    continue
                try:
                    per_kind[kind] = max(per_kind[kind], proc.memory_info().rss)
                except psutil.Error:
                    continue
            for kind, rss in per_kind.items():
                memory.setdefault(kind, []).append((time.monotonic(), rss))

    # Upload in chunks, as the page does.
    started = time.monotonic()
    batches = []
    for chunk in range(0, IMAGES, 50):
        files = [("files", (f"soak_{i:04d}.jpg", make_image(10_000 + i, size=(160, 120))))
                 for i in range(chunk, min(IMAGES, chunk + 50))]
        reply = requests.post(f"{stack.web_url}/api/jobs", files=files, timeout=60)
        assert reply.status_code == 202, reply.text
        batches.append(reply.json()["batch_id"])

    # Count Server-Sent Events per item: a duplicate answer would show here.
    events: Counter = Counter()

    def listen(batch_id: str):
        with requests.get(f"{stack.web_url}/api/jobs/{batch_id}/events", stream=True, timeout=600) as r:
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    item = json.loads(line[5:])
                    if "id" in item:
                        events[item["id"]] += 1
                if line == "event: end":
                    return

    listeners = [threading.Thread(target=listen, args=(b,), daemon=True) for b in batches]
    for t in listeners:
        t.start()
    threads = [threading.Thread(target=chaos, daemon=True),
               threading.Thread(target=sample_memory, daemon=True)]
    for t in threads:
        t.start()

    def all_done():
        states = Counter()
        for b in batches:
            for item in requests.get(f"{stack.web_url}/api/jobs/{b}", timeout=30).json()["items"]:
                states[item["state"]] += 1
        return states if states["queued"] == 0 else None

    try:
        states = wait_for(all_done, 600, "every item to be answered", interval=2.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{what_is_stuck(stack, s3, sqs, batches)}") from None
    finally:
        stop.set()
    for t in listeners:
        t.join(timeout=30)
    duration = time.monotonic() - started

    out_keys = output_keys(stack, s3)
    duplicated = sum(1 for n in events.values() if n > 1)
    lost = IMAGES - states["done"] - states["failed"]
    print(f"\n soak: 1,000 images, workers SIGKILLed every {KILL_EVERY_S:.0f}s")
    print(f" {'faults injected (worker SIGKILLs)':40} {len(kills):>8}")
    print(f" {'faults injected (worker SIGSTOPs)':40} {len(hung):>8}")
    print(f" {'requests sent':40} {IMAGES:>8}")
    print(f" {'answered (done)':40} {states['done']:>8}")
    print(f" {'answered (failed)':40} {states['failed']:>8}")
    print(f" {'lost':40} {lost:>8}")
    print(f" {'duplicated (SSE events per item > 1)':40} {duplicated:>8}")
    print(f" {'output pairs':40} {len(out_keys):>8}")
    print(f" {'duration, s':40} {duration:>8.1f}")
    for kind, samples in sorted(memory.items()):
        print(f" {'peak RSS ' + kind + ', MB':40} {max(r for _, r in samples) / 2**20:>8.0f}")

    # A few: a fast run (45 s here, 8 kills) can end after a handful of 4 s periods.
    assert len(kills) >= 3, "the chaos thread must actually have killed workers"
    assert len(hung) == 1, "the chaos thread must have stopped a worker"
    wait_for(lambda: any(f"(pid {hung[0].pid}) has not pinged its watchdog" in line
                         for line in list(stack.output)), 60, "the runner to see the hung worker")
    # SIGABRT waits in a stopped process; the runner's SIGKILL follows after its grace,
    # which a fast run's last answer may come before.
    wait_for(lambda: not hung[0].is_running() or hung[0].status() == "zombie", 90,
             "the watchdog to end the hung worker")
    assert states["done"] == IMAGES and lost == 0
    assert duplicated == 0 and len(events) == IMAGES
    assert len(out_keys) == len(set(out_keys)) == IMAGES
    # Each answer is its own image's: a sample of 50, spread over the run, by scores and
    # top 5 (the labels alone are nearly all alike with untrained weights).
    items = {item["filename"]: item for b in batches
             for item in requests.get(f"{stack.web_url}/api/jobs/{b}", timeout=30).json()["items"]}
    sample = {f"soak_{i:04d}.jpg": make_image(10_000 + i, size=(160, 120)) for i in range(0, IMAGES, 20)}
    for name, ref in references(reference_model, sample).items():
        assert_item_matches(items[name], ref, name)
    wait_for(lambda: queue_counts(sqs, stack.prefix) == {"req-queue": 0, "resp-queue": 0, "req-dlq": 0},
             60, "every queue to be empty")
    # Long-lived processes must not grow without bound: the last third of the
    # run may not use much more memory than the first third did.
    for kind in ("web", "controller"):
        samples = [r for _, r in memory.get(kind, [])]
        third = max(1, len(samples) // 3)
        assert max(samples[-third:]) < 1.5 * max(samples[:third]) + 50 * 2**20, kind
