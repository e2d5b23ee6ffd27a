"""boto3 clients configured once, and queue-URL lookups.

Credentials come from boto3's default chain (or keys given to Aws); the endpoint from
`Settings.endpoint_url` or, when that is unset, from boto3 itself (which
honours AWS_ENDPOINT_URL). botocore's "standard" retry mode retries throttling,
timeouts and 5xx answers with backoff.
"""

from __future__ import annotations

import platform
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import boto3
import botocore.session
from botocore.client import BaseClient
from botocore.config import Config
from botocore.utils import parse_timestamp
from dateutil.tz import tzutc

from common.aws_errors import watch_untold_tries
from common.config import Settings

# A fixed User-Agent: botocore otherwise rebuilds its structured one (some thirty
# sanitised parts) twice per call, ~0.3 ms of CPU, about 15 % of a small call's
# client cost, measured against the embedded AWS. It only feeds AWS's usage metrics.
# (boto3 appends its Botocore/<version> to it.)
USER_AGENT = f"imgclass Python/{platform.python_version()}"


# botocore's data loader, shared by every session this process makes. Each session
# otherwise parsed the service models and endpoint rules from JSON again: 180-210 ms
# of CPU per client, against ~30 ms with the loader shared (measured here), in each
# worker's start-up (part of every scale-out) and in every test that makes clients.
# The clients of one boto3 session share the cached models just so. botocore changes
# one thing in them: S3 operations' request paths, at their first call, to the same
# value whichever client makes it (16-32 threads making clients and calls at once: no
# error, and no other model differs from a fresh parse).
_loader_lock = threading.Lock()
_shared_loader = None


# An ISO 8601 time in UTC as AWS writes them in XML and JSON answers
# ("2026-12-02T11:36:54.000Z"), with at most the microseconds datetime holds.
_AWS_UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", re.ASCII)


def parse_aws_timestamp(value: object) -> datetime:
    """botocore's timestamp parser, with AWS's usual form read by datetime itself.

    botocore hands every timestamp to dateutil's general parser: 4.8 % of the web
    tier's CPU in `make bench`, which reads the fleet each second, and ~35 % of the
    client's CPU for a DescribeInstances of 15 instances (measured here: 19 -> 12 ms
    a call); the controller, the web tier and the runner each list the fleet every
    second or more often. The same instant, in tzutc (which dateutil gives too,
    except where the local zone is UTC: tzlocal); anything else (RFC 822 headers,
    epoch seconds, other zones) goes to botocore's parser.
    """
    if isinstance(value, str) and _AWS_UTC_TIME.fullmatch(value):
        try:
            return datetime.fromisoformat(value[:-1]).replace(tzinfo=tzutc())
        except ValueError:  # a leap second, a 30th of February: botocore's answer, or its error
            pass
    return parse_timestamp(value)


def new_session() -> boto3.session.Session:
    """A boto3 session of its own (it looks for credentials afresh), which shares the
    service models this process has parsed already, and reads timestamps fast."""
    global _shared_loader
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_aws_timestamp)
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _shared_loader)
        session = boto3.session.Session(botocore_session=core)
        # boto3 adds its data folder to the loader's search paths at each session: kept
        # once, or the list grew by one a session, and was searched at each load.
        paths = _shared_loader.search_paths
        paths[:] = list(dict.fromkeys(paths))
    return session


# How long a long poll's read may last past the poll's own wait. SQS (and moto) still
# answer a poll its client gave up on, and what it takes stays hidden for the receive's
# lease, with nobody to extend or show it: after a 35 s stall of the embedded AWS, with
# the 30 s read timeout of the other calls, 10 requests would wait 30 s more.
LONG_POLL_READ_SLACK_S = 60.0

# How long a request message's SendMessageBatch may wait for its answer (web_tier/sender.py),
# before botocore tries it again on a fresh connection. SQS answers one in milliseconds, and
# the embedded AWS in at most 2.6 s (p99 2.0) in a run of 1,000 uploads at concurrency 200
# with fifteen workers on 2 cores loaded beyond their count (measured). With the usual 30 s,
# a dead pooled connection held its send slot for 30 s a try, and two of them every upload
# of the process. The cost of a try that SQS did take: the request queued twice, classified
# twice, the first answer kept (as a journal's requeue); should every try fail, the sender
# still knows it may be queued (UNTOLD_TRIES). Not shorter: moto under such a load would
# then be sent each batch again, and each try adds a copy.
SEND_READ_TIMEOUT_S = 5.0

# What an upload's own S3 calls may take (the image's put, and its delete when the
# upload is refused), which its answer waits for: with the usual 30 s read timeout and
# 6 attempts, an S3 that stops answering would hold each upload 6 minutes before its 503,
# long after the page (30 s) and most clients give up. Three tries of
# 10 s each: S3 answers a 10 MB put from EC2 in well under a second.
UPLOAD_READ_TIMEOUT_S = 10.0
UPLOAD_ATTEMPTS = 3

# Together under a load balancer's usual 5 s health-check timeout.
PROBE_CONNECT_TIMEOUT_S = 1.0
PROBE_READ_TIMEOUT_S = 2.5


def client_config(max_pool: int = 32, read_timeout: float = 30.0,
                  connect_timeout: float = 5.0, attempts: int = 6) -> Config:
    """`attempts` counts the first: botocore's `max_attempts` counts only the retries,
    so a health check's "one attempt" as max_attempts=1 would make two, and take 5.05 s
    against an AWS that does not answer, past a load balancer's 5."""
    return Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=max_pool,
        connect_timeout=connect_timeout,
        # Long polls hold a connection for up to 20 s: the read timeout must exceed it.
        read_timeout=read_timeout,
        user_agent=USER_AGENT,
    )


def _naming_the_queue(response: dict, name: str, settings: Settings) -> dict:
    """A missing queue's error response, its message saying which queue, where, and why."""
    where = f"{settings.region}" + (f" at {settings.endpoint_url}" if settings.endpoint_url else "")
    message = (f"no queue {name} in {where}: are APP_PREFIX ({settings.prefix}) and the region those "
               "it was made with? (python -m common.provision makes the queues and buckets)")
    return {**response, "Error": {**response.get("Error", {}), "Message": message}}


def keys_in(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The access key pair `env` sets (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), if both."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    return (key, secret) if key and secret else None


@dataclass
class Aws:
    """A tier's AWS clients (S3, SQS, EC2, separate SQS clients for long polls and for the
    web tier's request messages, and probes for health checks), made at first use, and the
    queue URLs it resolves once."""

    settings: Settings
    max_pool: int = 32
    # An access key pair to sign with instead of boto3's default chain: for `make run`'s
    # own clients, which use the keys of its processes' environment (keys_in), not of its own.
    keys: tuple[str, str] | None = None
    # Queue URLs by name, looked up once (they never change for a queue).
    _queue_urls: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    # Whether HTTP requests wait for its S3 calls (the web tier's lookups of batches and
    # results): then S3 is given up on as an upload's put is, within ~35 s
    # (UPLOAD_READ_TIMEOUT_S, UPLOAD_ATTEMPTS). With the usual 6 tries of 30 s, each
    # lookup of a stalled S3 would hold a thread of the web tier's for minutes.
    requests_wait: bool = False
    # Clients by name, made once they have credentials (see _kept).
    _clients: dict[str, object] = field(default_factory=dict, init=False, repr=False)
    # Called at each HTTP request of every client, those made later too (on_each_request).
    _request_handlers: list[Callable[..., None]] = field(default_factory=list, init=False, repr=False)

    def on_each_request(self, handler: Callable[..., None]) -> None:
        """Call `handler` at each HTTP request (each attempt) of every client of these,
        made already or not: one made without credentials is made again at its next use
        (_kept), and a handler registered on the first client alone would be lost."""
        self._request_handlers.append(handler)
        for client in self._clients.values():
            client.meta.events.register("request-created", handler)  # type: ignore[attr-defined]

    def _kept(self, name: str, service: str, config: Config | None = None) -> BaseClient:
        """The client `name`, made at its first use and kept, once it has credentials.

        botocore looks for credentials once, when it makes a client: one made without
        them fails every call for good. At boot the instance metadata service may miss
        its one 1 s try, or the instance profile be attached after the service started
        (as ami/README suggests for the web instance), and a controller or web tier
        would then fail until restarted by hand. Such a client serves its
        caller (whose call fails, NoCredentialsError), and the next use looks again.
        """
        client = self._clients.get(name)
        if client is None:
            session = new_session()
            # Looked for first, and the session keeps what it finds for the client: looked
            # for after, credentials that came in between kept a client made without them.
            found = self.keys is not None or session.get_credentials() is not None
            keys = {} if self.keys is None else {"aws_access_key_id": self.keys[0],
                                                 "aws_secret_access_key": self.keys[1]}
            client = session.client(
                service,
                region_name=self.settings.region,
                endpoint_url=self.settings.endpoint_url,
                config=config or client_config(self.max_pool),
                **keys,
            )
            for handler in self._request_handlers:
                client.meta.events.register("request-created", handler)
            if found:
                self._clients[name] = client
        return client

    @property
    def s3(self) -> BaseClient:
        return self._kept("s3", "s3", self._bounded_s3_config() if self.requests_wait else None)

    @property
    def sqs(self) -> BaseClient:
        return self._kept("sqs", "sqs")

    @property
    def ec2(self) -> BaseClient:
        return self._kept("ec2", "ec2")

    @property
    def sqs_receive(self) -> BaseClient:
        """The SQS client for long polls (ReceiveMessage): a stall of SQS is waited out,
        not the poll given up on. Its own, so that the other calls still give up after
        the usual read timeout (the heartbeat's slack counts on it)."""
        config = client_config(self.max_pool,
                               read_timeout=self.settings.receive_wait_s + LONG_POLL_READ_SLACK_S)
        return self._kept("sqs-receive", "sqs", config)

    @property
    def sqs_send(self) -> BaseClient:
        """The SQS client for the web tier's request messages, which uploads wait for:
        a call that has had no answer in SEND_READ_TIMEOUT_S is tried again, and its
        tries that leave unknown whether SQS took it are counted (UNTOLD_TRIES)."""
        made_now = "sqs-send" not in self._clients
        client = self._kept("sqs-send", "sqs", client_config(self.max_pool, read_timeout=SEND_READ_TIMEOUT_S))
        return watch_untold_tries(client, "SendMessageBatch") if made_now else client

    @property
    def s3_upload(self) -> BaseClient:
        """The S3 client for an upload's image, which its answer waits for: given up on
        within ~35 s (UPLOAD_READ_TIMEOUT_S, UPLOAD_ATTEMPTS), not minutes."""
        return self._kept("s3-upload", "s3", self._bounded_s3_config())

    def _bounded_s3_config(self) -> Config:
        """S3 given up on within ~35 s, for calls an HTTP request waits for."""
        return client_config(self.max_pool, read_timeout=UPLOAD_READ_TIMEOUT_S, attempts=UPLOAD_ATTEMPTS)

    @property
    def probes(self) -> dict[str, object]:
        """S3 and SQS clients for health checks, which must answer within seconds (a
        load balancer waits ~5 s): one attempt with short timeouts, where the other
        clients' retries may take minutes against an AWS that has stopped answering."""
        config = client_config(10, read_timeout=PROBE_READ_TIMEOUT_S,
                               connect_timeout=PROBE_CONNECT_TIMEOUT_S, attempts=1)
        return {service: self._kept(f"probe-{service}", service, config) for service in ("s3", "sqs")}

    def open(self, *services: str) -> Aws:
        """Create these clients now rather than at first use (each loads its service model)."""
        for service in services:
            if service not in ("s3", "sqs", "ec2", "sqs_receive", "sqs_send", "s3_upload"):
                raise ValueError(f"no client for {service!r}")
            getattr(self, service)
        return self

    def queue_url(self, name: str, probe: bool = False) -> str:
        """The queue's URL, looked up once; with `probe`, through the probe client, so
        that a health check gets an answer within seconds even for its first lookup."""
        if name not in self._queue_urls:
            sqs = self.probes["sqs"] if probe else self.sqs
            try:
                self._queue_urls[name] = sqs.get_queue_url(QueueName=name)["QueueUrl"]
            except sqs.exceptions.QueueDoesNotExist as exc:
                # SQS's "The specified queue does not exist" names no queue: an operator
                # with a wrong APP_PREFIX or region could not tell which is looked for.
                raise type(exc)(_naming_the_queue(exc.response, name, self.settings),
                                exc.operation_name) from None
        return self._queue_urls[name]

    @property
    def request_queue_url(self) -> str:
        return self.queue_url(self.settings.request_queue)

    @property
    def response_queue_url(self) -> str:
        return self.queue_url(self.settings.response_queue)

    @property
    def dead_letter_queue_url(self) -> str:
        return self.queue_url(self.settings.dead_letter_queue)

    def queue_depth(self, url: str, probe: bool = False) -> QueueDepth:
        """What SQS says a queue holds (approximately: its counts lag by a second or so);
        with `probe`, through the probe client (one try, short timeouts)."""
        sqs = self.probes["sqs"] if probe else self.sqs
        reply = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(_DEPTH_ATTRIBUTES.values()))
        attrs = reply["Attributes"]
        return QueueDepth(**{field: int(attrs.get(name, 0)) for field, name in _DEPTH_ATTRIBUTES.items()})


@dataclass(frozen=True)
class QueueDepth:
    visible: int  # waiting to be received
    in_flight: int  # received, not yet deleted (being worked on)
    delayed: int  # sent with a delay that has not yet passed

    @property
    def total(self) -> int:
        return self.visible + self.in_flight + self.delayed


# SQS's name for each of QueueDepth's fields.
_DEPTH_ATTRIBUTES = {"visible": "ApproximateNumberOfMessages",
                     "in_flight": "ApproximateNumberOfMessagesNotVisible",
                     "delayed": "ApproximateNumberOfMessagesDelayed"}
