"""The web tier's request sender under many callers: CPU per message and calls made.

`python -m bench.sender [--threads 800] [--messages 5] [--call-ms 5]`: `--threads`
callers each send `--messages` messages one after the other (a closed loop, as the
upload threads of a big batch do), against a fake SQS whose SendMessageBatch takes
`--call-ms` of wall time and no CPU. So what is measured is the sender's own cost:
its locking and wake-ups, not botocore's. Not part of `make bench`: it prints
figures for a change to web_tier/sender.py, measured before and after.
"""

from __future__ import annotations

import argparse
import threading
import time

from common import cli
from web_tier.sender import BatchingSender


class SleepingSqs:
    """Accepts every message after `call_s` of sleep; counts calls and entries."""

    def __init__(self, call_s: float) -> None:
        self.call_s, self.calls, self.entries = call_s, 0, 0
        self._lock = threading.Lock()

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803 (boto3's names)
        time.sleep(self.call_s)
        with self._lock:
            self.calls += 1
            self.entries += len(Entries)
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}


def run(threads: int, messages: int, call_ms: float) -> dict[str, float]:
    sqs = SleepingSqs(call_ms / 1000)
    sender = BatchingSender(lambda: sqs, lambda: "url")
    start = threading.Barrier(threads + 1)

    def caller(n: int) -> None:
        start.wait()
        for m in range(messages):
            sender.send(f"{n}-{m}")

    workers = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    start.wait()
    for t in workers:
        t.join()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    total = threads * messages
    assert sqs.entries == total, (sqs.entries, total)
    return {"messages": total, "calls": sqs.calls, "per_call": total / sqs.calls,
            "cpu_ms_per_message": 1000 * cpu / total, "wall_s": wall, "messages_per_s": total / wall}


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m bench.sender", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=800, help="callers at once (default 800)")
    p.add_argument("--messages", type=int, default=5, help="messages each caller sends (default 5)")
    p.add_argument("--call-ms", type=float, default=5.0, help="wall time of one SendMessageBatch (default 5)")
    p.add_argument("--repeat", type=int, default=3, help="runs, each printed (default 3)")
    args = p.parse_args(argv)
    for _ in range(args.repeat):
        r = run(args.threads, args.messages, args.call_ms)
        print(f"{args.threads} threads: {r['messages']} messages in {r['calls']} calls "
              f"({r['per_call']:.1f} a call), {r['cpu_ms_per_message']:.3f} ms CPU a message, "
              f"{r['messages_per_s']:.0f} messages/s, {r['wall_s']:.2f} s")


if __name__ == "__main__":
    main()
