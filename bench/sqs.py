"""(h) Does moto's SQS bound throughput? Time its calls at several queue depths.

A moto server of our own on a free port, one fresh queue per depth, filled to
that depth; then, from one client, the median time of the calls the pipeline
makes: SendMessageBatch of 1 and of 10 (the web tier group-commits its request
messages, one to ten a call, see web_tier/sender.py; the worker's replies),
ReceiveMessage of up to 10 and DeleteMessageBatch (the worker and the web
tier's listeners). The queue is kept at its depth throughout: what a timed
call took or added is put back or taken away after it, untimed.

Both servers are measured: moto as shipped (`python -m moto.server`) and the
stack's `localaws.moto_server`, which removes two costs that grow with depth.
moto serves requests in one Python process, its calls effectively serialised
by the GIL, so 1 / (time per call) is roughly the most calls per second it
can give all clients together.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3
from botocore.client import BaseClient
from botocore.config import Config

from bench.deadline import Deadline, DeadlinePassed
from localaws.harness import free_port
from localaws.server import wait_until_up

ROOT = Path(__file__).resolve().parent.parent
# "moto_fast" is the name the stack's server had: kept as the figures' key, so that a run
# with --only still shows part (h) taken from an earlier run's .bench/latest.json.
SERVERS = {"moto": "moto.server", "moto_fast": "localaws.moto_server"}
DEPTHS = {"moto": (0, 100, 1000), "moto_fast": (0, 100, 1000, 5000)}
MAX_CALLS = 20
MAX_SECONDS_PER_FIGURE = 2.0
BODY = '{"id": "0123456789abcdef0123456789abcdef", "bucket": "b", "key": "k", "filename": "x.jpg"}'


def _client(url: str) -> BaseClient:
    return boto3.client("sqs", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                        aws_secret_access_key="bench",
                        config=Config(retries={"max_attempts": 1}, read_timeout=120))


def _send(sqs: BaseClient, url: str, n: int) -> int:
    """One SendMessageBatch of `n` (1-10) messages; how many it added."""
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": BODY} for i in range(n)])
    return n


def _receive_and_delete(sqs: BaseClient, url: str, n: int = 10) -> int:
    """One receive of up to `n` and, if it got any, one DeleteMessageBatch; how many it took."""
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=n, WaitTimeSeconds=0,
                              VisibilityTimeout=30).get("Messages", [])
    if got:
        sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])
    return len(got)


def _add(sqs: BaseClient, url: str, count: int) -> None:
    for start in range(0, count, 10):
        _send(sqs, url, min(10, count - start))


def _remove(sqs: BaseClient, url: str, count: int) -> None:
    while count > 0:
        took = _receive_and_delete(sqs, url, min(10, count))
        if not took:
            return
        count -= took


def _fill(sqs: BaseClient, url: str, depth: int) -> float:
    """Send batches of 10 until the queue holds `depth` messages; seconds it took."""
    started = time.perf_counter()
    _add(sqs, url, depth)
    return time.perf_counter() - started


def _median_ms(fn: Callable[[], int], restore: Callable[[int], None] | None = None) -> float:
    """Median time of up to MAX_CALLS calls, fewer (at least 3) when each is slow.

    `restore(what fn returned)` runs after each call, outside its time: it puts
    the queue back at its depth (the time budget counts it, to bound the run).
    """
    times: list[float] = []
    started = time.perf_counter()
    def more() -> bool:
        return len(times) < 3 or time.perf_counter() - started < MAX_SECONDS_PER_FIGURE

    while len(times) < MAX_CALLS and more():
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        if restore is not None:
            restore(result)
    return statistics.median(times) * 1000


def measure_depth(sqs: BaseClient, url: str, depth: int) -> dict[str, float]:
    """Median ms of each call the pipeline makes, on a queue kept at `depth` messages."""
    out = {"depth": depth, "fill_s": _fill(sqs, url, depth)}

    def receive_only() -> int:
        # Visibility 0: the messages stay visible, so the depth does not change.
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0)
        return 0

    taken: list[int] = []

    def receive_and_delete() -> int:
        taken.append(_receive_and_delete(sqs, url))
        return taken[-1]

    out["receive10_ms"] = _median_ms(receive_only)
    # Without the refill, 20 calls of 10 emptied a queue of 100 halfway, and half
    # the samples were of empty receives, which are faster.
    out["receive10_and_delete_ms"] = _median_ms(receive_and_delete, lambda n: _add(sqs, url, n))
    out["receive10_and_delete_messages"] = statistics.mean(taken)  # 10, but 0 on an empty queue
    out["send_batch1_ms"] = _median_ms(lambda: _send(sqs, url, 1), lambda n: _remove(sqs, url, n))
    out["send_batch10_ms"] = _median_ms(lambda: _send(sqs, url, 10), lambda n: _remove(sqs, url, n))
    return out


def measure_server(module: str, depths: tuple[int, ...],
                   deadline: Deadline | None = None) -> list[dict[str, float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-moto-") as tmp, open(Path(tmp) / "moto.log", "wb") as log:
        moto = subprocess.Popen([sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)],
                                cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_up(f"{url}/moto-api/", moto, timeout_s=30)
            sqs = _client(url)
            rows = []
            for depth in depths:
                # Checked at each depth, a step of seconds: started just before the bench's
                # deadline, the whole part (~50 s) ended close to its tenth minute.
                if deadline is not None and deadline.passed():
                    raise DeadlinePassed(deadline.during(f"(h), {module} at depth {depth}"))
                # A fresh queue per depth (PurgeQueue is allowed once a minute).
                queue_url = sqs.create_queue(QueueName=f"bench-sqs-{depth}")["QueueUrl"]
                rows.append(measure_depth(sqs, queue_url, depth))
            return rows
        finally:
            moto.terminate()
            moto.wait(timeout=10)


def send_batch_ms(row: dict[str, float], entries: float) -> float:
    """ms of one SendMessageBatch of `entries` (1-10), between the two measured sizes.

    A batch call costs a fixed part and a part per entry: a straight line
    through the calls of 1 and of 10.
    """
    n = min(10.0, max(1.0, entries))
    return row["send_batch1_ms"] + (row["send_batch10_ms"] - row["send_batch1_ms"]) * (n - 1) / 9


def sqs_ms_per_image(row: dict[str, float], receive_batch: float, send_batch: float = 10.0) -> float:
    """moto time one image costs in SQS calls, with batches of `receive_batch` images
    received and `send_batch` request messages per web-tier send.

    Web tier: one SendMessageBatch per `send_batch` uploads (its group commit).
    Worker: one Receive + DeleteBatch and one SendMessageBatch of replies per
    batch. Web listeners: one Receive + DeleteBatch per batch of responses
    (taken as the same size).
    """
    b, s = max(1.0, receive_batch), min(10.0, max(1.0, send_batch))
    return (send_batch_ms(row, s) / s
            + (2 * row["receive10_and_delete_ms"] + send_batch_ms(row, b)) / b)


def measure_sqs(needed_images_per_s: float | None = None, receive_batch: float = 10.0,
                send_batch: float = 10.0, deadline: Deadline | None = None) -> dict[str, object]:
    """Both servers' call times at each depth, and the images/s their SQS calls allow at depth 100.

    `send_batch` is 10 by default, as `receive_batch`: a lone upload goes out in
    a batch of one, but at the bound moto is busy, each send takes long, and the
    uploads arriving meanwhile fill the next batch (given 10 or more in flight,
    as in the bench). Well below the bound batches are smaller: the README's
    run (b) sent 300 request messages in ~95 calls.
    """
    out: dict[str, object] = {"receive_batch_assumed": receive_batch, "send_batch_assumed": send_batch,
                              "needed_images_per_s": needed_images_per_s}
    for name, module in SERVERS.items():
        rows = measure_server(module, DEPTHS[name], deadline)
        # The stack's request queue holds about as many messages as requests in flight (<= ~100).
        shallow = next(r for r in rows if r["depth"] == 100)
        per_image = sqs_ms_per_image(shallow, receive_batch, send_batch)
        summary: dict[str, object] = {"depths": rows, "sqs_ms_per_image_at_depth_100": per_image,
                                      "sqs_bound_images_per_s": 1000 / per_image}
        if needed_images_per_s:
            summary["busy_share_at_needed_rate"] = needed_images_per_s * per_image / 1000
        out[name] = summary
    return out
