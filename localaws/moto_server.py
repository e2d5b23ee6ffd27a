"""The embedded AWS's server: moto's, without the costs that grow with traffic and queue depth.

`python -m localaws.moto_server -H host -p port` (as localaws/server.py's start_moto
runs it) serves what `python -m moto.server` serves, changed in three layers:

- localaws/moto_patches.py changes moto's own code: its clock, its SQS counts
  (taken at one instant), its service lookup, EC2's tags and terminated
  instances, where S3 keeps large objects;
- localaws/moto_middleware.py wraps moto's WSGI application: DescribeInstances
  answered once per change to EC2, each service's requests one at a time
  (moto's backends are not thread-safe), a body cut short refused, what a web
  browser sends refused, and for `make bench` the server's CPU per action;
- this module serves the result, with the two changes below.

Each keeps moto's behaviour (see tests/unit/test_moto_patches.py,
test_moto_middleware.py and test_moto_server.py); each made for speed removes a
cost found by profiling the server under the service's own calls (`make bench`,
parts f and h, yappi and py-spy):

1. Werkzeug's development server, which `moto.server` uses, closes every
   connection after one response: each boto3 call opened a new TCP connection
   and the server started a new thread for it. Served by gunicorn instead
   (KeepAliveServer), connections are kept and reused. One difference from
   moto's own handler: like any gunicorn server it drops request headers with
   an underscore in their name (moto's kept S3 metadata keys such as
   x-amz-meta-my_key); this service sends none.
2. Python's full garbage collections walked moto's whole start-up heap
   (~190,000 objects, ~130-190 ms each). The server builds its EC2, SQS and S3
   backends at start (warm_up) and then freezes that heap (common.heap).

Measured on this machine (2 cores) with 300 x (S3 PutObject + SQS
SendMessage): see the commit that introduced each change, and `make bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.errors import HaltServer

from common import cli
from common.config import region_from_env
from common.heap import freeze_startup_heap
from localaws import moto_patches
from localaws.lifeline import stop_when_unheld
from localaws.moto_middleware import STATS_ENV, ActionStats, BrowserGuard, Ec2ReadCache, ServiceLocks


def warm_up(app: Callable, region: str) -> None:
    """Build moto's EC2, SQS and S3 backends now, with one read-only call to each.

    moto builds a backend at its first request (EC2's, with its AMIs and
    instance types, takes over a second), and the heap it allocates lives as
    long as the server: built before the freeze, full collections skip it.
    """
    from werkzeug.test import Client

    client = Client(app)

    def signed(service: str) -> dict[str, str]:
        # moto routes on the credential scope's service and region, and checks no signature.
        return {"Authorization": f"AWS4-HMAC-SHA256 Credential=warmup/20260101/{region}/{service}"
                                 f"/aws4_request, SignedHeaders=host, Signature=0"}

    replies = [
        client.post("/", data="Action=DescribeInstances&Version=2016-11-15",
                    headers={**signed("ec2"), "Content-Type": "application/x-www-form-urlencoded"}),
        client.post("/", data="{}", headers={**signed("sqs"), "X-Amz-Target": "AmazonSQS.ListQueues",
                                             "Content-Type": "application/x-amz-json-1.0"}),
        client.get("/", headers={**signed("s3"), "Host": "s3.amazonaws.com"}),
    ]
    failed = [reply.status for reply in replies if reply.status_code != 200]
    if failed:
        raise RuntimeError(f"moto's warm-up calls failed: {failed}")


def build_app(bind_host: str) -> Callable:
    """moto's WSGI application, patched and warmed up, with the EC2 read cache
    (and CPU statistics if asked), refusing browsers (for a server bound to `bind_host`)."""
    moto_patches.apply()
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    moto_app = DomainDispatcherApplication(create_backend_app)
    warm_up(moto_app, region_from_env(os.environ))
    freeze_startup_heap()
    app: Callable = Ec2ReadCache(ServiceLocks(moto_app))
    stats_path = os.environ.get(STATS_ENV)
    if stats_path:
        app = ActionStats(app, Path(stats_path))
    return BrowserGuard(app, bind_host)


def _end_with_the_worker(arbiter: Any, worker: Any) -> None:
    """gunicorn's child_exit hook: the worker holds every bucket, queue and instance,
    and one that died (the OOM killer) would be replaced by an empty one, the stack running
    on against an AWS that had forgotten everything. So the server ends
    with it, and `make run`, which watches this process, says so and stops. Not while
    gunicorn stops (it has closed its sockets then): that worker was told to exit."""
    if arbiter.LISTENERS:
        raise HaltServer(f"moto's worker (pid {worker.pid}) died: everything it held is gone", 1)


class KeepAliveServer(BaseApplication):
    """moto's application under gunicorn instead of werkzeug's development server.

    Werkzeug's server closes the connection after every response, so each
    boto3 call paid for a new TCP connection and a new server thread. With
    keep-alive, measured here (2 cores, one client, 200 calls of each): CPU per
    call, client + server, PutObject of 60 KB 2.9 -> 1.8 ms, GetObject 2.2 ->
    1.6 ms, SendMessage 2.1 -> 1.6 ms, Receive + Delete 4.8 -> 3.4 ms.

    One process, because moto keeps every bucket, queue and instance in its
    memory; threads, because long polls hold one each for up to 20 s.
    """

    def __init__(self, host: str, port: int, fd: int | None = None) -> None:
        self.host, self.port, self.fd = host, port, fd
        super().__init__()

    def load_config(self) -> None:
        settings = {
            # A socket its starter bound (localaws.server.listening_socket), or its own.
            "bind": f"fd://{self.fd}" if self.fd is not None else f"{self.host}:{self.port}",
            "workers": 1,
            "worker_class": "gthread",
            # Every worker's long poll and the web tier's listeners hold a thread at once.
            "threads": 128,
            "keepalive": 75,
            # Never restart the worker: that would lose every bucket and queue.
            "timeout": 0,
            "max_requests": 0,
            "graceful_timeout": 1,
            # Gunicorn >= 25.1 opens a control socket at one fixed path per user,
            # which the web tier's gunicorn would share.
            "control_socket_disable": True,
            "loglevel": "warning",
            "child_exit": _end_with_the_worker,
        }
        for name, value in settings.items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self) -> Callable:
        return build_app(self.host)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m localaws.moto_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--fd", type=int, metavar="FD",
                        help="serve on this listening socket, bound to --host and --port by the caller")
    parser.add_argument("--lifeline", type=int, metavar="FD",
                        help="stop once no process holds this pipe's write end (localaws.lifeline)")
    args = parser.parse_args(argv)
    if args.lifeline is not None:
        stop_when_unheld(args.lifeline)
    # moto builds some URLs (SQS queue URLs among them) from this.
    os.environ.setdefault("MOTO_PORT", str(args.port))
    KeepAliveServer(args.host, args.port, args.fd).run()


if __name__ == "__main__":
    main(sys.argv[1:])
