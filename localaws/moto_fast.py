"""moto's server without the costs that grow with traffic and queue depth.

`python -m localaws.moto_fast -H host -p port` serves what `python -m
moto.server` serves, after the changes below. Each keeps moto's behaviour
exactly (see tests/unit/test_moto_fast.py); each removes a cost found by
profiling the server under the service's own calls (`make bench`, parts f
and h, yappi and py-spy):

1. `unix_time()` built two datetimes per call and subtracted them (~10 us);
   SQS calls it twice per queued message whenever it counts messages.
   Without an argument it is simply `time.time()`.
2. ReceiveMessage checked each returned message's retention period by
   computing *all* the queue's attributes (three O(depth) counts). The
   retention period is a plain attribute of the queue: read it directly.
3. Counting visible, in-flight and delayed messages (GetQueueAttributes, and
   SendMessage, which builds all attributes to read one FIFO setting) read
   the clock once per message through two properties: read it once per count.
4. Every request looked up its service by listing moto's package directory
   (~175 `isdir` calls per request, ~28 % of the server's CPU): list it once.
5. `camelcase_to_underscores`, a pure function of a handful of strings, ran
   character by character thousands of times a second: memoise it.
6. DescribeInstances cost ~50 ms of server CPU with 15 instances (moto's
   generic serializer walks the whole Instance shape), and the runner, the
   controller and the benchmark each ask every second: measured by the action
   statistics below, it was 73 % of the server's CPU during `make bench`.
   Its responses are kept until the next EC2 call that is not a Describe
   (every change to instances comes through one) or the next moto-api call
   (a reset): the same answers, computed once per change.
7. Werkzeug's development server, which `moto.server` uses, closes every
   connection after one response: each boto3 call opened a new TCP connection
   and the server started a new thread for it. Served by gunicorn instead
   (KeepAliveServer), connections are kept and reused. One difference from
   moto's own handler: like any gunicorn server it drops request headers with
   an underscore in their name (moto's kept S3 metadata keys such as
   x-amz-meta-my_key); this service sends none.
8. Python's full garbage collections walked moto's whole start-up heap
   (~190,000 objects, ~130-190 ms each). The server builds its EC2, SQS and S3
   backends at start (warm_up) and then freezes that heap (common.heap).
9. An instance's tags were found by a search of every tag of every resource
   (describe_tags with the instance's id as a pattern), once per instance and
   per tag filter of a DescribeInstances: the terminated instances moto keeps
   made each uncached call slower, quadratically (~60 ms with 200, 1 s with
   800: a day of scaling to zero and back). They are looked up by id,
   and, as on EC2, a terminated instance is gone an hour after its end:
   measured in-process, a describe of 800 instances, 785 of them terminated,
   took 1,295 ms, 69 ms with the lookup by id.
10. moto keeps each S3 object over ~5 MB in a deleted temporary file, open for
   as long as the server runs (a descriptor and hidden disk space per large
   photo): objects up to S3_OBJECT_IN_MEMORY_BYTES stay in memory.

Three changes are for correctness. The first: one GetQueueAttributes counts
visible and in-flight messages at one instant (sqs_counts_at_one_instant); moto
reads the clock for each count, and a message whose visibility lapsed between
them was in neither. The second: when a client dies mid-upload,
moto stores the part of the body that arrived, an image cut short that
nobody sent. Like S3, a request whose body is shorter than its Content-Length
is refused here (IncompleteBody, S3's code, whatever the service) and changes
nothing. The third adds a cost: moto's backends are not thread-safe,
and gunicorn serves them from many threads. SQS's DeleteMessage rebuilds a
queue's message list and assigns it back, so a message sent meanwhile is lost
(193 of 2,300 in a run of concurrent batch sends, receives and
deletes), and two deletes at once can bring a deleted message back to be
classified twice. Each service's requests run one at a time
(ServiceLocks); an SQS long poll lets go while it waits, as its queue's
condition variable shares the SQS lock. Measured with 1,200 calls from 4
clients, three rounds each way: 3.07-3.25 ms of server CPU a call against
3.02-3.20 without the locks, no difference beyond the noise (the GIL already
ran them one at a time).

Measured on this machine (2 cores) with 300 x (S3 PutObject + SQS
SendMessage): see the commit that introduced each patch, and `make bench`.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.errors import HaltServer

from common import cli
from common.config import region_from_env
from common.heap import freeze_startup_heap
from localaws.lifeline import stop_when_unheld

# When set, the server writes its CPU time per API action to this JSON file
# every STATS_EVERY_S seconds (`make bench` reads it).
STATS_ENV = "IMGCLASS_MOTO_STATS"
STATS_EVERY_S = 1.0
# Set in the WSGI environ when Ec2ReadCache answered, so the statistics can tell.
CACHE_HIT = "imgclass.cache_hit"
# In a SigV4 Authorization header: access key (so account), date, region and service.
_CREDENTIAL_SCOPE = re.compile(r"Credential=([^,\s]+)")


def apply() -> None:
    """The changes of the module's docstring made to moto's own code, in this process;
    build_app and KeepAliveServer make the others (6-8, the locks, the body check)."""
    for patch in (sqs_counts_at_one_instant, _sqs_reads_the_clock_once, _sqs_long_polls_let_sends_in,
                  _services_listed_once, _names_converted_once, _ec2_tags_found_by_id,
                  _ec2_forgets_terminated_instances, _s3_objects_stay_in_memory):
        patch()


class _Instant(threading.local):
    """The time a GetQueueAttributes is answered at, in the thread answering it."""

    now: float | None = None


_instant = _Instant()


def sqs_counts_at_one_instant() -> None:
    """Change 1 (SQS's clock read as time.time()) and the first change for correctness
    (one GetQueueAttributes counting every message at one instant).

    moto reads the clock anew for each count (and, asked for named attributes, builds
    them all once per name), so a message whose visibility timeout lapses between the
    count of visible messages and that of in-flight ones is in neither: a queue holding
    work reads as empty, which a controller or a test waiting for a drained queue takes
    at its word. Real SQS's counts are approximate, but do not lose a message so.
    The unit tests' in-process moto gets this change too (tests/unit/conftest.py)."""
    from moto.core import utils
    from moto.sqs import models

    original_unix_time = utils.unix_time

    def unix_time(dt: datetime | None = None) -> float:
        if dt is not None:
            return original_unix_time(dt)
        return time.time() if _instant.now is None else _instant.now

    def unix_time_millis(dt: datetime | None = None) -> float:
        return unix_time(dt) * 1000.0

    # sqs.models imported both names into its own namespace: patch them there.
    models.unix_time = unix_time
    models.unix_time_millis = unix_time_millis

    answer = models.SQSBackend.get_queue_attributes
    if getattr(answer, "at_one_instant", False):
        return

    @functools.wraps(answer)
    def get_queue_attributes(self: models.SQSBackend, queue_name: str,
                             attribute_names: list[str]) -> dict[str, Any]:
        outer = _instant.now  # moto's own checks may ask within an answer: one instant still
        if outer is None:
            _instant.now = time.time()
        try:
            return answer(self, queue_name, attribute_names)
        finally:
            _instant.now = outer

    get_queue_attributes.at_one_instant = True
    models.SQSBackend.get_queue_attributes = get_queue_attributes


def _sqs_reads_the_clock_once() -> None:
    """Changes 2-3: the clock read once per count, and a receive's retention check
    reading the queue's one attribute."""
    from moto.sqs import models

    # models.unix_time* looked up at each call: whichever clock sqs_counts_at_one_instant set.
    def is_message_valid_based_on_retention_period(self: models.SQSBackend, queue_name: str,
                                                    message: models.Message) -> bool:
        queue = self.get_queue(queue_name)
        return queue.message_retention_period + message.sent_timestamp / 1000 > models.unix_time()

    models.SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period

    # Message.visible is `now > visible_at`, Message.delayed is `now < delayed_until`.
    def count_delayed(self: models.Queue) -> int:
        now = models.unix_time_millis()
        return sum(1 for m in self._messages if now < m.delayed_until)

    def count_not_visible(self: models.Queue) -> int:
        now = models.unix_time_millis()
        return sum(1 for m in self._messages if not now > m.visible_at)

    def visible_messages(self: models.Queue) -> list:
        now = models.unix_time_millis()
        return [m for m in self._messages if now > m.visible_at and not now < m.delayed_until]

    models.Queue.approximate_number_of_messages_delayed = property(count_delayed)
    models.Queue.approximate_number_of_messages_not_visible = property(count_not_visible)
    models.Queue.messages = property(visible_messages)


def _sqs_long_polls_let_sends_in() -> None:
    """A long poll waits on its queue's condition variable: built on the lock that
    serialises SQS requests (ServiceLocks), the wait lets the sends it waits for in."""
    from moto.sqs import models

    original_queue_init = models.Queue.__init__

    def queue_init(self: models.Queue, *args: Any, **kwargs: Any) -> None:
        original_queue_init(self, *args, **kwargs)
        self._messages_lock = threading.Condition(SERVICE_LOCKS["sqs"])

    models.Queue.__init__ = queue_init


def _services_listed_once() -> None:
    """Change 4."""
    from moto import backends

    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules


def _names_converted_once() -> None:
    """Change 5."""
    from moto.core import responses, utils
    from moto.sqs import models

    fast_camel = functools.lru_cache(maxsize=4096)(utils.camelcase_to_underscores)
    for module in (utils, responses, models):
        module.camelcase_to_underscores = fast_camel


def _ec2_tags_found_by_id() -> None:
    """Change 9: describe_tags(resource-id=[id]) matched a pattern made of the id against
    every tag of every resource, for each instance and each tag filter."""
    from moto.ec2.models.core import TaggedEC2Resource
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    def get_tags(self: TaggedEC2Resource) -> list[dict[str, str]]:
        if not self.id:
            return []
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
        return [{"resource_id": self.id, "key": key, "value": value, "resource_type": kind}
                for key, value in self.ec2_backend.tags.get(self.id, {}).items()]

    TaggedEC2Resource.get_tags = get_tags


def _ec2_forgets_terminated_instances() -> None:
    """Change 9, as EC2: a terminated instance is gone TERMINATED_KEPT_S after its end."""
    from moto.ec2.models.instances import Instance, InstanceBackend

    original_terminate = Instance.terminate

    def terminate(self: Instance) -> Any:  # moto's InstanceState
        previous = original_terminate(self)
        self.imgclass_terminated_at = time.time()
        return previous

    original_all_reservations = InstanceBackend.all_reservations

    def all_reservations(self: InstanceBackend, filters: Any = None) -> list:
        forget_terminated(self, time.time() - TERMINATED_KEPT_S)
        return original_all_reservations(self, filters)

    Instance.terminate = terminate
    InstanceBackend.all_reservations = all_reservations


def _s3_objects_stay_in_memory() -> None:
    """Change 10."""
    from moto.s3 import models as s3_models

    def key_buffer_size() -> int:
        return int(os.environ.get("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", S3_OBJECT_IN_MEMORY_BYTES))

    s3_models.get_s3_default_key_buffer_size = key_buffer_size


# moto keeps an object over ~5 MB in a deleted temporary file, open for as long as the
# server runs: each photo of 5-10 MB held a descriptor and disk space (or RAM, where
# /tmp is a tmpfs) that neither `du` nor `ls` showed. The embedded AWS keeps
# everything in memory anyway: objects up to this size stay there.
S3_OBJECT_IN_MEMORY_BYTES = 64 * 1024**2


# As EC2 shows a terminated instance for about an hour, then never again. moto kept
# every one, and each made every call that finds instances slower.
TERMINATED_KEPT_S = 3600.0


def forget_terminated(backend: Any, before: float) -> None:
    """Drop the reservations whose instances were all terminated before `before`
    (a Unix time), and their tags."""
    for reservation_id, reservation in list(backend.reservations.items()):
        ended = [getattr(i, "imgclass_terminated_at", None) for i in reservation.instances]
        if ended and all(at is not None and at < before for at in ended):
            del backend.reservations[reservation_id]
            for instance in reservation.instances:
                backend.tags.pop(instance.id, None)


def aws_action(environ: dict[str, Any]) -> str:
    """The AWS action a request asks for, e.g. "SendMessage", "RunInstances", "S3 PUT object"."""
    target = environ.get("HTTP_X_AMZ_TARGET")  # SQS's JSON protocol
    if target:
        return target.rsplit(".", 1)[-1]
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/moto-api"):
        return "moto-api"
    if is_query_protocol(environ):
        # EC2's query protocol: Action=... in the form body; put the body back.
        for pair in request_body(environ).split(b"&"):
            if pair.startswith(b"Action="):
                return pair[7:].decode("ascii", "replace")
    kind = "object" if path.strip("/").count("/") else "bucket"
    return f"S3 {environ.get('REQUEST_METHOD')} {kind}"


def is_query_protocol(environ: dict[str, Any]) -> bool:
    """EC2's protocol (SQS's is JSON, with a target header; S3's is REST)."""
    return (environ.get("REQUEST_METHOD") == "POST" and environ.get("PATH_INFO", "/") == "/"
            and not environ.get("HTTP_X_AMZ_TARGET"))


def read_all(result: Iterable[bytes]) -> bytes:
    """A WSGI response's body, closing it as WSGI requires."""
    try:
        return b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def request_body(environ: dict[str, Any]) -> bytes:
    """Read the body once and leave it in place for the application."""
    cached = environ.get("imgclass.body")
    if cached is None:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        cached = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(cached)
        environ["imgclass.body"] = cached
    return cached


# One lock per service that the stack uses: requests of one service run one at a
# time, those of different services side by side. SQS's is re-entrant, as a queue's
# condition variable takes it again inside a request (see apply).
SERVICE_LOCKS: dict[str, Any] = {"sqs": threading.RLock(), "s3": threading.Lock(), "ec2": threading.Lock()}


def aws_service(environ: dict[str, Any]) -> str:
    """The service a signed request is for, from its SigV4 credential scope
    (<key>/<date>/<region>/<service>/aws4_request); "" when unsigned (moto-api)."""
    scope = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
    parts = scope.group(1).split("/") if scope else []
    return parts[3] if len(parts) == 5 else ""


def incomplete_body(start_response: Callable) -> Iterable[bytes]:
    """S3's answer to a body shorter than its Content-Length: a client that died
    mid-upload. moto would store what arrived, an object that was never sent."""
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>IncompleteBody</Code><Message>'
            b"You did not provide the number of bytes specified by the Content-Length HTTP header."
            b"</Message></Error>")
    start_response("400 Bad Request",
                   [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class ServiceLocks:
    """WSGI middleware: each service's requests one at a time (see the module's notes).

    The body is read before the lock is taken, so a slow upload holds up nobody,
    and the whole response is built under it."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        lock = SERVICE_LOCKS.get(aws_service(environ))
        if lock is None:
            return self.app(environ, start_response)
        # A chunked body (no Content-Length) is left for moto to read.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length and len(request_body(environ)) < length:
            return incomplete_body(start_response)
        with lock:
            return [read_all(self.app(environ, start_response))]


class Ec2ReadCache:
    """WSGI middleware: DescribeInstances answered from the last identical one until EC2 changes."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.generation = 0
        self.answers: dict[tuple[str, bytes], tuple[str, list, bytes]] = {}
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        action = aws_action(environ)
        if action != "DescribeInstances":
            if action == "moto-api" or (is_query_protocol(environ) and not action.startswith("Describe")):
                # A change to EC2 (or a reset): forget every answer once it is done, so that
                # a Describe that ran while it was half done cannot be kept.
                self._forget()
                try:
                    return [read_all(self.app(environ, start_response))]
                finally:
                    self._forget()
            return self.app(environ, start_response)
        # The same question from another region or account is another question; those
        # are named only in the signature's credential scope, not in the body.
        scope = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        key = (scope.group(1) if scope else "", request_body(environ))
        with self.lock:
            generation, hit = self.generation, self.answers.get(key)
        if hit is not None:
            environ[CACHE_HIT] = True
            status, headers, body = hit
            start_response(status, headers)
            return [body]
        captured: list = []

        def capture(status: str, headers: list, exc_info: Any = None) -> Callable:
            captured[:] = [status, headers]
            return start_response(status, headers, exc_info)

        body = read_all(self.app(environ, capture))
        if captured and captured[0].startswith("200"):
            with self.lock:
                if self.generation == generation:
                    self.answers[key] = (captured[0], captured[1], body)
        return [body]

    def _forget(self) -> None:
        with self.lock:
            self.generation += 1
            self.answers.clear()


class ActionStats:
    """WSGI middleware: requests and server CPU seconds per AWS action, written to a file.

    CPU is the handling thread's own CPU time (`time.thread_time`), so time
    spent waiting for the GIL or for a long-poll is not counted.
    """

    def __init__(self, app: Callable, path: Path) -> None:
        self.app = app
        self.path = path
        self.totals: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._write_loop, name="moto-stats", daemon=True).start()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        started = time.thread_time()
        action = aws_action(environ)
        body = read_all(self.app(environ, start_response))
        spent = time.thread_time() - started
        if environ.get(CACHE_HIT):
            action += " (cached)"
        with self.lock:
            entry = self.totals.setdefault(action, [0, 0.0])
            entry[0] += 1
            entry[1] += spent
        return [body]

    def _write_loop(self) -> None:
        while True:
            time.sleep(STATS_EVERY_S)
            with self.lock:
                snapshot = {action: {"requests": int(n), "cpu_s": round(cpu, 4)}
                            for action, (n, cpu) in self.totals.items()}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot, indent=1, sort_keys=True))
            tmp.replace(self.path)


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


def build_app() -> Callable:
    """moto's WSGI application, patched and warmed up, with the EC2 read cache
    (and CPU statistics if asked)."""
    apply()
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    moto_app = DomainDispatcherApplication(create_backend_app)
    warm_up(moto_app, region_from_env(os.environ))
    freeze_startup_heap()
    app: Callable = Ec2ReadCache(ServiceLocks(moto_app))
    stats_path = os.environ.get(STATS_ENV)
    if stats_path:
        app = ActionStats(app, Path(stats_path))
    return app


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

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        super().__init__()

    def load_config(self) -> None:
        settings = {
            "bind": f"{self.host}:{self.port}",
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
        return build_app()


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m localaws.moto_fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--lifeline", type=int, metavar="FD",
                        help="stop once no process holds this pipe's write end (localaws.lifeline)")
    args = parser.parse_args(argv)
    if args.lifeline is not None:
        stop_when_unheld(args.lifeline)
    # moto builds some URLs (SQS queue URLs among them) from this.
    os.environ.setdefault("MOTO_PORT", str(args.port))
    KeepAliveServer(args.host, args.port).run()


if __name__ == "__main__":
    main(sys.argv[1:])
