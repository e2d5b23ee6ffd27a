"""moto's server with two fixes to SQS costs that grow with queue depth.

`python -m localaws.moto_fast -H host -p port` is `python -m moto.server`
after two patches, both keeping moto's behaviour exactly:

1. moto's `unix_time()` builds two datetimes per call (now, and the epoch)
   and subtracts them: ~10 us. SQS calls it twice per queued message
   whenever it counts messages, so each request costs O(depth) of those.
   Without an argument it is simply the current Unix time: `time.time()`.
2. On every message it returns, ReceiveMessage checks the retention period
   by computing *all* the queue's attributes three times (each counting the
   visible, delayed and in-flight messages). The retention period is a plain
   attribute of the queue: read it directly.

Measured with `make bench` (part h), for a receive of 10: about 85 ms at a
depth of 100 and 1 s at 1,000 before, against a few ms after; the web tier's
100 concurrent requests keep ~100 messages queued, and moto serves every
call under one GIL, so this bounded the whole pipeline.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime


def apply() -> None:
    from moto.core import utils
    from moto.sqs import models

    original_unix_time = utils.unix_time

    def unix_time(dt: datetime | None = None) -> float:
        return time.time() if dt is None else original_unix_time(dt)

    def unix_time_millis(dt: datetime | None = None) -> float:
        return unix_time(dt) * 1000.0

    # sqs.models imported both names into its own namespace: patch them there.
    models.unix_time = unix_time
    models.unix_time_millis = unix_time_millis

    def is_message_valid_based_on_retention_period(self, queue_name: str, message) -> bool:
        queue = self.get_queue(queue_name)
        return queue.message_retention_period + message.sent_timestamp / 1000 > unix_time()

    models.SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period


def main(argv: list[str] | None = None) -> None:
    apply()
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
