"""(h) Does moto's SQS bound throughput? Time its calls at several queue depths.

A moto server of our own on a free port, one fresh queue per depth, filled to
that depth; then, from one client, the median time of the calls the pipeline
makes: SendMessage (the web tier, one per image), ReceiveMessage of up to 10
and DeleteMessageBatch (the worker and the web tier's listeners),
SendMessageBatch of 10 (the worker's replies).

Both servers are measured: moto as shipped (`python -m moto.server`) and the
stack's `localaws.moto_fast`, which removes two costs that grow with depth.
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
from pathlib import Path

import boto3
from botocore.config import Config

from localaws.harness import free_port
from localaws.server import wait_until_up

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {"moto": "moto.server", "moto_fast": "localaws.moto_fast"}
DEPTHS = {"moto": (0, 100, 1000), "moto_fast": (0, 100, 1000, 5000)}
MAX_CALLS = 20
MAX_SECONDS_PER_FIGURE = 2.0
BODY = '{"id": "0123456789abcdef0123456789abcdef", "bucket": "b", "key": "k", "filename": "x.jpg"}'


def _client(url: str):
    return boto3.client("sqs", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                        aws_secret_access_key="bench",
                        config=Config(retries={"max_attempts": 1}, read_timeout=120))


def _fill(sqs, url: str, depth: int) -> float:
    """Send batches of 10 until the queue holds `depth` messages; seconds it took."""
    started = time.perf_counter()
    for start in range(0, depth, 10):
        n = min(10, depth - start)
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": BODY} for i in range(n)])
    return time.perf_counter() - started


def _median_ms(fn) -> float:
    """Median of up to MAX_CALLS calls, fewer (at least 3) when each is slow."""
    times: list[float] = []
    started = time.perf_counter()
    def more() -> bool:
        return len(times) < 3 or time.perf_counter() - started < MAX_SECONDS_PER_FIGURE

    while len(times) < MAX_CALLS and more():
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def measure_depth(sqs, url: str, depth: int) -> dict[str, float]:
    out = {"depth": depth, "fill_s": _fill(sqs, url, depth)}

    def receive_only() -> None:
        # Visibility 0: the messages stay visible, so the depth does not change.
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0)

    def receive_and_delete() -> None:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                  VisibilityTimeout=30).get("Messages", [])
        if got:
            sqs.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])

    out["receive10_ms"] = _median_ms(receive_only)
    out["receive10_and_delete_ms"] = _median_ms(receive_and_delete)  # depth drops by <= 200
    out["send_ms"] = _median_ms(lambda: sqs.send_message(QueueUrl=url, MessageBody=BODY))
    out["send_batch10_ms"] = _median_ms(lambda: sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": BODY} for i in range(10)]))
    return out


def measure_server(module: str, depths: tuple[int, ...]) -> list[dict[str, float]]:
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
                # A fresh queue per depth (PurgeQueue is allowed once a minute).
                queue_url = sqs.create_queue(QueueName=f"bench-sqs-{depth}")["QueueUrl"]
                rows.append(measure_depth(sqs, queue_url, depth))
            return rows
        finally:
            moto.terminate()
            moto.wait(timeout=10)


def sqs_ms_per_image(row: dict[str, float], receive_batch: float) -> float:
    """moto time one image costs in SQS calls, with batches of `receive_batch` images.

    Web tier: one SendMessage. Worker: one Receive + DeleteBatch and one
    SendMessageBatch per batch. Web listeners: one Receive + DeleteBatch per
    batch of responses (taken as the same size).
    """
    b = max(1.0, receive_batch)
    return row["send_ms"] + (2 * row["receive10_and_delete_ms"] + row["send_batch10_ms"]) / b


def measure_sqs(needed_images_per_s: float | None = None, receive_batch: float = 10.0) -> dict[str, object]:
    out: dict[str, object] = {"receive_batch_assumed": receive_batch,
                              "needed_images_per_s": needed_images_per_s}
    for name, module in SERVERS.items():
        rows = measure_server(module, DEPTHS[name])
        # The stack's request queue holds about as many messages as requests in flight (<= ~100).
        shallow = next(r for r in rows if r["depth"] == 100)
        per_image = sqs_ms_per_image(shallow, receive_batch)
        summary: dict[str, object] = {"depths": rows, "sqs_ms_per_image_at_depth_100": per_image,
                                      "sqs_bound_images_per_s": 1000 / per_image}
        if needed_images_per_s:
            summary["busy_share_at_needed_rate"] = needed_images_per_s * per_image / 1000
        out[name] = summary
    return out
