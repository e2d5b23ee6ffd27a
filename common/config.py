"""All configuration, in one place, read from the environment.

Every tier builds one `Settings` with `Settings.from_env()` and passes it down;
no other module reads the service's settings from `os.environ`. VARIABLES names each
variable, the field it sets, its bounds, and whether workers (worker_environment) and
other shells (`make run`) are given it; the table in README.md lists each with its
default. What `make run` gives its processes instead is here too (local_run_overrides,
local_run_defaults).

Read where they are used, as they are not the service's settings:
- other programs' variables: NOTIFY_SOCKET, WATCHDOG_USEC (common/systemd.py),
  KERAS_HOME (app_tier/weights.py), MOTO_PORT, MOTO_S3_DEFAULT_KEY_BUFFER_SIZE
  (localaws/);
- LOG_LEVEL (common/logs.py: logging starts before Settings can fail, to log why);
- the worker's start-up switches INSTANCE_ID (the default of --instance-id) and
  IMGCLASS_CACHE (where it keeps the converted model);
- IMGCLASS_MOTO_STATS, `make bench`'s request for the embedded AWS's CPU time per
  action (localaws/moto_middleware.py);
- whether MODEL_WEIGHTS and LOCAL_MAX_WORKERS were set at all (localaws/stack.py,
  to choose a local default for each).

A default that follows another setting is worked out in from_env (as SCALE_IN_COOLDOWN's and BOOT_TIME's
follow AWS_ENDPOINT_URL); tests that build Settings with dataclasses.replace skip
from_env, so such a default does not follow there: where that matters, keep None and
read it through a property.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from botocore.configloader import load_config
from botocore.exceptions import BotoCoreError

from common.hosts import bare_host, host_and_port

# Pillow's own limit (Image.MAX_IMAGE_PIXELS, which it refuses past twice over): a
# larger MAX_IMAGE_PIXELS would have no effect, so it is refused, not quietly lowered.
PILLOW_MAX_IMAGE_PIXELS = 89_478_485


def _in_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {_shown(low)}" + (f" to {_shown(high)}" if high is not None else " up")
        raise ValueError(f"{name} must be {bounds}, got {_shown(value)}")


def _shown(value: float | None) -> str:
    """A whole number in full (89478485, not 8.94785e+07), any other briefly."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _int(env: Mapping[str, str], name: str, default: int | None,
         low: int | None = None, high: int | None = None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from exc
    _in_range(name, value, low, high)
    return value


def _float(env: Mapping[str, str], name: str, default: float,
           low: float | None = None, high: float | None = None) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value):  # float() takes "nan" and "inf"; no wait can use them
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    _in_range(name, value, low, high)
    return value


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip()
    return raw or default


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(env, name, default).lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {env.get(name)!r}")
    return value


# What a bucket name allows, with room for the longest suffix ("-out-bucket") in its
# 63 characters: found out at start, not when provisioning fails half-way.
_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,50}[a-z0-9])?")
# What an HTTP header's value carries the same through every client and server.
_HEADER_TEXT = re.compile(r"[\x20-\x7e]*")
# botocore's check of a region name (botocore.utils.validate_region_name), made at start
# so that the error names the variable.
_REGION_NAME = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?")
# Starts S3 keeps for itself: such a bucket name is refused (InvalidBucketName).
RESERVED_BUCKET_STARTS = ("xn--", "sthree-", "amzn-s3-demo-")


def _prefix(env: Mapping[str, str]) -> str:
    prefix = _str(env, "APP_PREFIX", Settings.prefix)
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"APP_PREFIX must be 1 to 52 lowercase letters, digits and hyphens, neither "
                         f"first nor last (it names the buckets), got {prefix!r}")
    if prefix.startswith(RESERVED_BUCKET_STARTS):
        raise ValueError(f"APP_PREFIX must not start with {', '.join(RESERVED_BUCKET_STARTS)} (S3 keeps "
                         f"those bucket names for itself), got {prefix!r}")
    return prefix


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list; "sg-1, sg-2" is two items, not "sg-1" and " sg-2"."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


# The scale-in window on real AWS (no AWS_ENDPOINT_URL), where a boot takes ~40 s
# and SQS's approximate counts can read low once: a trickle of requests must not
# end the fleet between two of them. The embedded AWS starts an "instance" in a
# second: none there by default, 5 s under `make run` (local_run_defaults), 0.5 s
# under `make bench`, whose target is zero instances within 2 s.
AWS_SCALE_IN_COOLDOWN_S = 60.0
# A worker's instance on real AWS, from its launch to its first receive: 30-70 s of
# boot, then a worker started from a root volume fresh from the AMI's snapshot (each
# block's first read is slow until read once: AWS's "Initialize Amazon EBS volumes"),
# then its first long poll. Reasoned, not measured (there is no AWS access here):
# counted booting for less, an instance still starting at 80 s would have the
# controller launch again for the messages it is about to take. The
# embedded AWS starts one in a second or two: BOOT_TIME's own default there.
AWS_BOOT_TIME_S = 90.0
SCALING_MODES = ("backlog", "latency")
MODEL_RUNTIMES = ("openvino", "tensorflow")
# After a receive that found nothing with RECEIVE_WAIT=0 (short polling): without it,
# an idle worker or listener asked SQS again as fast as it answered, a core's worth
# of CPU and of paid requests.
SHORT_POLL_PAUSE_S = 0.05
# SQS hides a message for at most 12 hours from its receive, extensions included: a
# worker extending by 43,200 s a second after the receive is refused, and every message
# it holds comes back for another worker. An hour is left for holding them.
MAX_VISIBILITY_TIMEOUT_S = 12 * 3600 - 3600
# A request may wait out one model call that nearly stalls, then take one of its own:
# held, and extended, for up to twice STALL_TIMEOUT. Past SQS's 12 hours its extension is
# refused, and another worker classifies it too. So at most half of what is left for holding.
MAX_STALL_TIMEOUT_S = MAX_VISIBILITY_TIMEOUT_S // 2
# How long a failure mark S3 denies (AccessDenied) is retried, from the first receive of
# the message asking for it (common/failure_tags.py). IAM changes take seconds to minutes
# to arrive: a deploy that attaches the policy as the tiers start loses no mark, and a
# role truly lacking s3:PutObjectTagging costs a dead letter ~30 retries, not SQS's 14
# days. (A dead letter whose attempts took longer, three stalls say, is tried once.)
MARK_DENIED_RETRY_S = 15 * 60
# The least a worker hides a request whose failure mark was denied before its next
# attempt (its retry delay, if longer). At RETRY_DELAY's 5 s, the three attempts of
# MAX_RECEIVE_COUNT were over within 15 s, before many IAM changes arrive; 60 s apart,
# they span two minutes, the client waiting that long for the failure (RESULT_TIMEOUT: 300 s).
MARK_DENIED_RETRY_DELAY_S = 60
# The response queue's visibility timeout. A web process ended outright (SIGKILL, a
# crash) leaves its long polls open on SQS's side for up to their wait (4 s), and SQS
# hands them the answers that arrive meanwhile: hidden for this long, they then reach
# the process that serves on, as late. A listener deletes what it receives within
# milliseconds of the receive; one slower than this only has its answers recorded
# twice (the book ignores the second). Shorter than SQS's default 30 s, so that such
# answers arrive sooner.
RESPONSE_VISIBILITY_TIMEOUT_S = 10
# MODEL_WEIGHTS for ResNet-50 untrained (tests, offline demos): flagged wherever a label shows.
RANDOM_WEIGHTS = "random"


def weights_on_this_host(weights: str) -> bool:
    """Whether MODEL_WEIGHTS names a file of this host's: not `imagenet` (Keras's cache),
    `random`, or an s3:// object."""
    return weights not in ("imagenet", RANDOM_WEIGHTS) and not weights.startswith("s3://")


@dataclass(frozen=True)
class Settings:
    """Every setting of every tier, with production's defaults: Settings() in tests,
    Settings.from_env() in the programs. Each field read from the environment has its
    variable, bounds and readers in VARIABLES below; the README's Configuration table
    lists them (a test keeps the three in step)."""

    # --- where AWS is -----------------------------------------------------
    region: str = "us-east-1"
    # None means "whatever boto3 resolves": real AWS, or AWS_ENDPOINT_URL.
    endpoint_url: str | None = None

    # --- names (one prefix changes them all) -------------------------------
    prefix: str = "imgclass"

    # --- controller --------------------------------------------------------
    max_instances: int = 15
    ami_id: str = "ami-0abcdef1234567890"
    # t2.small (2 GiB): a TensorFlow ResNet-50 worker peaks near 1 GiB (README,
    # Speed), which with the OS does not fit t2.micro's 1 GiB.
    instance_type: str = "t2.small"
    key_name: str = ""
    security_group_ids: tuple[str, ...] = ()
    # Where instances go, spread by instance number (and so across Availability
    # Zones, if the subnets are in several); none: the default VPC's default subnet,
    # which an account or region without a default VPC does not have.
    subnet_ids: tuple[str, ...] = ()
    instance_profile: str = ""
    poll_interval_s: float = 1.0
    # Messages one instance is expected to hold: desired = ceil(backlog / target).
    target_backlog_per_instance: float = 1.0
    scaling_mode: str = "backlog"  # "backlog" or "latency"
    acceptable_latency_s: float = 10.0
    seconds_per_image: float = 0.5
    boot_time_s: float = 40.0
    scale_in_cooldown_s: float = 0.0
    # A worker tags its instance once it has received from the request queue
    # (common/fleet.py). An instance the controller has watched this long without
    # the tag never will (no credentials, a role missing a right, a crash loop,
    # stuck pending): it is counted as failed, terminated and replaced after a hold.
    # The worker unit's TimeoutStartSec (15 min, weights downloaded and converted
    # included) plus a boot. 0: off (workers from an AMI older than the tag).
    ready_deadline_s: float = 1200.0
    # A worker that said it serves can stop receiving later (its instance hung or cut
    # off, its worker crash-looping since) and still count as serving. Requests visible
    # for this long with none in flight while such instances run say so: the oldest is
    # counted as failed and replaced, one a deadline. Longer than a working worker takes
    # to receive what is visible (its long poll, RECEIVE_WAIT's 20 s, a restart of a few
    # seconds) plus a few polls, and than the minute SQS's approximate counts may take to
    # settle; short enough that the request waiting is answered within RESULT_TIMEOUT's
    # 300 s after a boot. Reasoned, not measured on AWS. 0: off.
    progress_deadline_s: float = 120.0

    # Days S3 keeps uploads and results (a lifecycle rule, set by common/provision.py);
    # 0: for ever. A batch whose objects expired is gone: its link answers 404.
    retention_days: int = 0

    # --- app tier (worker) -------------------------------------------------
    model_weights: str = "imagenet"
    model_runtime: str = "openvino"  # or "tensorflow"
    receive_batch: int = 10
    receive_wait_s: int = 20  # each long poll's wait: the workers' (the web tier's listeners cap it at 4 s)
    visibility_timeout_s: int = 60  # at most MAX_VISIBILITY_TIMEOUT_S
    max_receive_count: int = 3
    # A failed attempt is tried again after this, doubled at each further attempt.
    retry_delay_s: int = 5
    shutdown_grace_s: float = 20.0
    # A model call or image decode longer than this means the worker is stuck, not
    # slow: it gives its messages back and exits to be restarted. A t2 instance out
    # of CPU credits runs at its baseline (a t2.small 20 % of a vCPU, a t2.micro 10 %): a batch of
    # 10 can take a minute there.
    stall_timeout_s: float = 300.0
    worker_threads: int = 0  # 0 = the runtime decides (all of the instance's vCPUs)
    # A model call of one image (OpenVINO only); 0 = all vCPUs; None (unset) = as worker_threads.
    worker_one_image_threads: int | None = None

    # --- web tier ------------------------------------------------------------
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    max_files_per_request: int = 1000
    # The workers' limits as much as the web tier's: each process reads its own, so give
    # both tiers one value (the controller hands its own to the workers: worker_environment).
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    result_timeout_s: float = 300.0
    # An answer whose sending makes no progress this long ends its connection, and so does
    # a request whose headers or body stop arriving this long, or whose headers take
    # longer than this in all (web_tier/slow_clients.py).
    send_timeout_s: float = 30.0
    receive_timeout_s: float = 60.0
    # Bytes a second a request body must average once its first receive_timeout_s are
    # over, or it is cut (408): else a client trickling a byte a minute holds a thread
    # for as long as it likes. 2 KiB/s is below the slowest mobile uplinks still in use
    # (GPRS sends 3-5 KB/s), a 10 MB photo at it taking 85 minutes; holding all 1,024
    # threads with bodies then costs 2 MiB/s of upload, not a byte a minute each (the
    # limit is per connection: reconnecting is another matter, README). 0: no floor.
    min_receive_rate: int = 2048
    # Bytes the uploads' temporary files may hold on disk at once (web_tier/spool.py): two
    # requests at the 2 GiB a request may be. The web instance's 16 GiB root disk holds the
    # system, the venv (~0.2 GB) and the journal beside them.
    web_spool_bytes: int = 4 * 1024**3
    api_key: str = field(default="", repr=False)  # a secret: never in a log line
    # This machine's own files for the service: the controller's lock (controller/lock.py)
    # and, unless WEB_JOURNAL_DIR says otherwise, the web tier's journal. "": none
    # (Settings() in tests); from the environment, the user's state directory.
    state_dir: str = ""
    # Where the web tier records uploads stored but not yet queued (web_tier/journal.py).
    web_journal_dir: str = ""

    # --- embedded AWS ----------------------------------------------------------
    local_aws_host: str = "127.0.0.1"
    local_aws_port: int = 5000
    local_boot_delay_s: float = 0.0
    local_max_workers: int = 15
    # Worker processes kept with the model loaded, so that a launched instance serves at once.
    local_warm_spares: int = 1
    local_worker_threads: int = 1
    local_worker_one_image_threads: int | None = None  # None: as local_worker_threads
    # As WatchdogSec= in ami/imgclass-worker.service; 0: no watchdog.
    local_watchdog_s: float = 60.0

    @property
    def web_host_bare(self) -> str:
        """WEB_HOST without the brackets an IPv6 address may be written in ("[::1]")."""
        return bare_host(self.web_host)

    @property
    def web_address(self) -> str:
        """WEB_HOST:WEB_PORT as a bind address or in a URL: an IPv6 address bracketed,
        whether given bare or so (gunicorn cannot parse a bare "::")."""
        return host_and_port(self.web_host, self.web_port)

    @property
    def web_url(self) -> str:
        return f"http://{self.web_address}"

    # Names ----------------------------------------------------------------------
    @property
    def input_bucket(self) -> str:
        return f"{self.prefix}-in-bucket"

    @property
    def output_bucket(self) -> str:
        return f"{self.prefix}-out-bucket"

    @property
    def request_queue(self) -> str:
        return f"{self.prefix}-req-queue"

    @property
    def response_queue(self) -> str:
        return f"{self.prefix}-resp-queue"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}-req-dlq"

    @property
    def fleet_name(self) -> str:
        return fleet_name(self.prefix, self.endpoint_url, self.region)

    @property
    def local_aws_host_bare(self) -> str:
        """LOCAL_AWS_HOST without the brackets an IPv6 address may be written in, as web_host_bare."""
        return bare_host(self.local_aws_host)

    @property
    def local_aws_url(self) -> str:
        """The embedded AWS's address: an IPv6 one bracketed, as a URL needs it."""
        return f"http://{host_and_port(self.local_aws_host, self.local_aws_port)}"

    @property
    def untrained(self) -> bool:
        """Whether the configured weights are untrained (MODEL_WEIGHTS=random)."""
        return self.model_weights == RANDOM_WEIGHTS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every setting of VARIABLES from `env` (os.environ if None), checked."""
        env = os.environ if env is None else env
        if env.get("API_KEY") and not env["API_KEY"].strip():
            # Read as unset, it would leave every write open, with no word.
            raise ValueError("API_KEY is set but holds only spaces: set the key, or unset it to leave "
                             "writes open")
        if not _HEADER_TEXT.fullmatch(env.get("API_KEY", "").strip()):
            # gunicorn reads a header's bytes as Latin-1: "clé" sent by a UTF-8 client never
            # matches, and a key past Latin-1 no browser can send. The load
            # test refuses such a key too. Not shown: it is a secret.
            raise ValueError("API_KEY holds a character an HTTP header cannot carry: use printable "
                             "ASCII only")
        # The variables VARIABLES marks by_hand, each read from more than its own text.
        endpoint_url = _endpoint_url(env)
        prefix = _prefix(env)
        region = region_from_env(env)
        if not _REGION_NAME.fullmatch(region):
            raise ValueError(f"the region (AWS_REGION, AWS_DEFAULT_REGION or the AWS profile's) must be a "
                             f"region's name, such as us-east-1, got {region!r}")
        state = state_dir(env)
        # Defaults that follow other settings (see the module's docstring).
        follow = {
            "scale_in_cooldown_s": cls.scale_in_cooldown_s if endpoint_url else AWS_SCALE_IN_COOLDOWN_S,
            "boot_time_s": cls.boot_time_s if endpoint_url else AWS_BOOT_TIME_S,
            "web_journal_dir": os.path.join(state, f"{fleet_name(prefix, endpoint_url, region)}-web-journal"),
        }
        read = {variable.setting: variable.read(env, follow.get(variable.setting,
                                                                getattr(cls, variable.setting)))
                for variable in VARIABLES if not variable.by_hand}
        return cls(region=region, endpoint_url=endpoint_url, prefix=prefix, state_dir=state, **read)


@dataclass(frozen=True)
class Variable:
    """One environment variable of the service's: the Settings field it sets, how its
    text is read (kind, and the bounds or choices it must keep to), and who else is
    given it."""

    setting: str  # the Settings field
    name: str
    kind: type  # int, float, str, or tuple (a comma-separated list)
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()  # a str kind: one of these, any case
    # Given to every worker instance (worker_environment): a setting the app tier reads,
    # so that workers on EC2 run as the controller is configured.
    worker: bool = False
    # Printed by `make run` for other shells to export, where set (localaws/stack.py).
    shared: bool = False
    # Read by from_env itself, from more than this variable's text; the table says
    # only its name and who is given it.
    by_hand: bool = False

    def read(self, env: Mapping[str, str], default: object) -> object:
        """This variable's value in `env`, else `default`; ValueError, naming it, if out of bounds."""
        if self.kind is int:
            return _int(env, self.name, default, self.low, self.high)
        if self.kind is float:
            return _float(env, self.name, default, self.low, self.high)
        if self.kind is tuple:
            return _list(env, self.name)
        if self.choices:
            return _choice(env, self.name, default, self.choices)
        return _str(env, self.name, default)

    def text(self, settings: Settings) -> str:
        """The setting's value in `settings`, written as this variable's text (a worker's
        environment): a float to 6 significant digits, as the user-data has it."""
        value = getattr(settings, self.setting)
        if value is None:  # AWS_ENDPOINT_URL unset
            return ""
        if isinstance(value, float):
            return f"{value:g}"  # 20, not 20.0
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


def _checked(variables: tuple[Variable, ...]) -> tuple[Variable, ...]:
    """`variables`, if each names a Settings field, and no two the same field or variable."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    for attribute in ("setting", "name"):
        seen = [getattr(variable, attribute) for variable in variables]
        twice = sorted({value for value in seen if seen.count(value) > 1})
        if twice:
            raise ValueError(f"VARIABLES: more than one entry for {attribute} {', '.join(twice)}")
    unknown = [variable.setting for variable in variables if variable.setting not in fields]
    if unknown:
        raise ValueError(f"VARIABLES: no Settings field {', '.join(unknown)}")
    return variables


# Every environment variable the service reads into Settings, in one place: a new setting
# is a Settings field and a line here. The README's Configuration table lists each (a
# test keeps them in step). Not here: the variables the module's docstring names, read
# where they are used, and AWS_DEFAULT_REGION, which stands in for AWS_REGION (region_from_env).
VARIABLES = _checked((
    # --- read by hand in from_env --------------------------------------------------
    Variable("endpoint_url", "AWS_ENDPOINT_URL", str, by_hand=True, worker=True),
    # Also AWS_DEFAULT_REGION, and the AWS profile's region: region_from_env.
    Variable("region", "AWS_REGION", str, by_hand=True, worker=True),
    # Checked as the bucket names it makes allow: _prefix.
    Variable("prefix", "APP_PREFIX", str, by_hand=True, worker=True, shared=True),
    # The directory is imgclass/ in it, or in ~/.local/state: state_dir.
    Variable("state_dir", "XDG_STATE_HOME", str, by_hand=True, shared=True),

    # --- controller ---------------------------------------------------------------
    Variable("max_instances", "MAX_INSTANCES", int, low=0, shared=True),
    Variable("ami_id", "AMI_ID", str),
    Variable("instance_type", "INSTANCE_TYPE", str),
    Variable("key_name", "KEY_NAME", str),
    Variable("security_group_ids", "SECURITY_GROUP_IDS", tuple),
    Variable("subnet_ids", "SUBNET_IDS", tuple),
    Variable("instance_profile", "INSTANCE_PROFILE", str),
    Variable("poll_interval_s", "POLL_INTERVAL", float, low=0.01, high=3600, shared=True),
    Variable("target_backlog_per_instance", "TARGET_BACKLOG_PER_INSTANCE", float, low=0.01, shared=True),
    Variable("scaling_mode", "SCALING_MODE", str, choices=SCALING_MODES, shared=True),
    Variable("acceptable_latency_s", "ACCEPTABLE_LATENCY", float, low=0, shared=True),
    Variable("seconds_per_image", "SECONDS_PER_IMAGE", float, low=0.001, shared=True),
    # Its default follows AWS_ENDPOINT_URL (from_env).
    Variable("boot_time_s", "BOOT_TIME", float, low=0, shared=True),
    # Its default follows AWS_ENDPOINT_URL (from_env).
    Variable("scale_in_cooldown_s", "SCALE_IN_COOLDOWN", float, low=0, shared=True),
    Variable("ready_deadline_s", "READY_DEADLINE", float, low=0, shared=True),
    Variable("progress_deadline_s", "PROGRESS_DEADLINE", float, low=0, shared=True),
    Variable("retention_days", "RETENTION_DAYS", int, low=0, high=36500),

    # --- app tier (worker) --------------------------------------------------------
    Variable("model_weights", "MODEL_WEIGHTS", str, worker=True),
    Variable("model_runtime", "MODEL_RUNTIME", str, choices=MODEL_RUNTIMES, worker=True),
    # SQS's own limits.
    Variable("receive_batch", "RECEIVE_BATCH", int, low=1, high=10, worker=True),
    Variable("receive_wait_s", "RECEIVE_WAIT", int, low=0, high=20, worker=True),
    # What the worker extends each message it holds to, again every third of its
    # receive lease (app_tier.fetch.RECEIVE_LEASE_S, or this if less): shorter
    # than a batch takes, and a message being worked on shows up for another worker.
    Variable("visibility_timeout_s", "VISIBILITY_TIMEOUT", int, low=5, high=MAX_VISIBILITY_TIMEOUT_S,
             worker=True),
    # The worker's count of a handed-back copy's attempts must be the queue's redrive limit.
    Variable("max_receive_count", "MAX_RECEIVE_COUNT", int, low=1, high=1000, worker=True),
    # The worker caps every retry delay at an hour (app_tier.held.MAX_RETRY_DELAY_S).
    Variable("retry_delay_s", "RETRY_DELAY", int, low=0, high=3600, worker=True),
    # Below systemd's TimeoutStopSec (30 s, ami/imgclass-worker.service), which
    # kills the worker: the hand-back after the grace period needs the rest.
    Variable("shutdown_grace_s", "SHUTDOWN_GRACE", float, low=0, high=25, worker=True),
    Variable("stall_timeout_s", "STALL_TIMEOUT", float, low=1, high=MAX_STALL_TIMEOUT_S, worker=True),
    Variable("worker_threads", "WORKER_THREADS", int, low=0, worker=True),
    Variable("worker_one_image_threads", "WORKER_ONE_IMAGE_THREADS", int, low=0, worker=True),

    # --- web tier -----------------------------------------------------------------
    Variable("web_host", "WEB_HOST", str),
    Variable("web_port", "WEB_PORT", int, low=0, high=65535),
    # The workers' limit too: a stored object larger than this is answered too large, unread.
    Variable("max_upload_bytes", "MAX_UPLOAD_BYTES", int, low=1, worker=True),
    Variable("max_files_per_request", "MAX_FILES_PER_REQUEST", int, low=1),
    # The workers' limit as much as the web tier's.
    Variable("max_image_pixels", "MAX_IMAGE_PIXELS", int, low=1, high=PILLOW_MAX_IMAGE_PIXELS, worker=True),
    Variable("result_timeout_s", "RESULT_TIMEOUT", float, low=0.1, high=3600),
    Variable("send_timeout_s", "WEB_SEND_TIMEOUT", float, low=1, high=3600),
    Variable("receive_timeout_s", "WEB_RECEIVE_TIMEOUT", float, low=1, high=3600),
    Variable("min_receive_rate", "WEB_MIN_RECEIVE_RATE", int, low=0, high=100_000_000),
    Variable("web_spool_bytes", "WEB_SPOOL_BYTES", int, low=1),
    Variable("api_key", "API_KEY", str),
    # Its default follows XDG_STATE_HOME and the fleet (from_env).
    Variable("web_journal_dir", "WEB_JOURNAL_DIR", str),

    # --- embedded AWS ---------------------------------------------------------------
    Variable("local_aws_host", "LOCAL_AWS_HOST", str),
    Variable("local_aws_port", "LOCAL_AWS_PORT", int, low=0, high=65535),
    Variable("local_boot_delay_s", "LOCAL_BOOT_DELAY", float, low=0),
    # 0 would serve nothing: every upload would stay queued.
    Variable("local_max_workers", "LOCAL_MAX_WORKERS", int, low=1),
    Variable("local_warm_spares", "LOCAL_WARM_SPARES", int, low=0, high=15),
    Variable("local_worker_threads", "LOCAL_WORKER_THREADS", int, low=0),
    Variable("local_worker_one_image_threads", "LOCAL_WORKER_ONE_IMAGE_THREADS", int, low=0),
    Variable("local_watchdog_s", "LOCAL_WATCHDOG", float, low=0),
))
VARIABLE_OF_SETTING = {variable.setting: variable for variable in VARIABLES}


def worker_environment(settings: Settings) -> dict[str, str]:
    """The settings a worker reads, as the environment its instance is given (the
    user-data's {{NAME}}s, controller/act.py): the controller's own, so that workers
    on EC2 run as configured here."""
    return {variable.name: variable.text(settings) for variable in VARIABLES if variable.worker}


# --- `make run` ---------------------------------------------------------------------
# The embedded stack (localaws/stack.py) runs every process on one machine, where
# some of the defaults above do not fit: these are what it gives the processes it
# starts instead. (It also picks MODEL_WEIGHTS, and caps LOCAL_MAX_WORKERS, from what
# this machine holds: localaws/stack.py's local_model_weights and memory_safe_workers.)


def local_run_overrides(settings: Settings) -> dict[str, str]:
    """Variables `make run` sets for its processes over whatever the environment says."""
    return {
        # Many workers share this machine's cores: one thread each by default, a lone
        # image too (all cores for it suit only a few workers: README, Model).
        "WORKER_THREADS": str(settings.local_worker_threads),
        "WORKER_ONE_IMAGE_THREADS": str(settings.local_worker_threads
                                        if settings.local_worker_one_image_threads is None
                                        else settings.local_worker_one_image_threads),
    }


def local_run_defaults(settings: Settings, run_dir: Path) -> dict[str, str]:
    """Variables `make run` sets for its processes only where the environment does not
    set them (one set, even empty, is the user's choice and stands). `run_dir`: the
    run's folder (make run's --run-dir)."""
    defaults = {
        # Shorter long polls than production's 20 s: an idle local worker that is
        # told to stop then exits within seconds (each poll is free here).
        "RECEIVE_WAIT": "5",
        # A short scale-in window: without one, a request every 2 s launched and ended
        # an instance for each (p50 1.43 s, every one waiting for a launch), and a burst
        # 1.5 s after the fleet reached zero started it all again from cold (with
        # 10 s: p50 0.23 s). The fleet still reaches zero ~5 s after the last
        # answer. `make bench` sets its own 0.5 s, for its 2-second target.
        "SCALE_IN_COOLDOWN": "5",
    }
    if settings.local_max_workers < settings.max_instances:
        # Instances beyond the local cap get no worker and never say they serve: a
        # limit of this machine, not a failure for the controller to replace them for.
        defaults["READY_DEADLINE"] = "0"
    # moto accepts any credentials; set harmless ones only where none are set,
    # so that a developer's real keys are never sent anywhere by accident.
    defaults["AWS_ACCESS_KEY_ID"] = "local"
    defaults["AWS_SECRET_ACCESS_KEY"] = "local"
    # The web tier's journal with the run's other files, not in the user's state
    # directory. The embedded AWS starts empty at every run: what a journal from
    # the last run holds is found not stored, and dropped.
    defaults["WEB_JOURNAL_DIR"] = str(run_dir / "web-journal")
    return defaults


def region_from_env(env: Mapping[str, str]) -> str:
    """The region boto3 would use: AWS_REGION, else AWS_DEFAULT_REGION, else the
    region of the AWS profile in use (`aws configure` writes it there), else the default.
    Spaces around are not the name's, and only spaces are unset, as for every setting."""
    return ((env.get("AWS_REGION") or "").strip() or (env.get("AWS_DEFAULT_REGION") or "").strip()
            or _profile_region(env) or Settings.region)


def _endpoint_url(env: Mapping[str, str]) -> str | None:
    """AWS_ENDPOINT_URL, checked; None when unset (AWS itself). boto3 reads the variable
    itself too, as it is: one of spaces counted as set (a cooldown of 0, another fleet's
    files) and failed at the first client, so it is refused here."""
    raw, named = env.get("AWS_ENDPOINT_URL"), "AWS_ENDPOINT_URL"
    if not raw:
        per_service = sorted(name for name, value in env.items()
                             if name.startswith("AWS_ENDPOINT_URL_") and value.strip())
        if per_service:
            # boto3 would send those services' calls there while this took the fleet for
            # AWS's: its name (the controller's lock, the journals) and a 60 s cooldown.
            raise ValueError(f"{', '.join(per_service)} set without AWS_ENDPOINT_URL: this service talks "
                             "to one AWS, real or embedded; set AWS_ENDPOINT_URL to it")
        raw, named = _profile_endpoint_url(env)
        if not raw:
            return None
    parts = urlsplit(raw.strip())
    if raw != raw.strip() or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{named} must be an http:// or https:// address with a host, and "
                         f"nothing around it (unset it for AWS), got {raw!r}")
    return raw


def _profile_endpoint_url(env: Mapping[str, str]) -> tuple[str | None, str]:
    """The AWS profile's `endpoint_url` (boto3 sends every call there too), and how to
    name it; None when it has none or says to ignore it. Not read, it was taken for
    AWS: another fleet's name and files, a 60 s cooldown against the embedded AWS."""
    profile_name, profile = _profile(env)
    named = f"endpoint_url in the AWS profile {profile_name!r}"
    ignored = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or profile.get("ignore_configured_endpoint_urls")
    if str(ignored).strip().lower() == "true":  # botocore's reading of it
        return None, named
    if profile.get("services"):
        # Its own endpoint for each service: boto3's, where this one talks to one AWS.
        raise ValueError(f"the AWS profile {profile_name!r} names endpoints by service (services = "
                         f"{profile['services']}): this service talks to one AWS, real or embedded; "
                         f"set AWS_ENDPOINT_URL to it, or AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true for AWS")
    return profile.get("endpoint_url") or None, named


def _profile_region(env: Mapping[str, str]) -> str | None:
    """The `region` of the AWS profile: clients are made with Settings.region, so
    without this a user of a profile in another region talked to us-east-1."""
    return _profile(env)[1].get("region") or None


def _profile(env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """AWS_PROFILE's name (else the default profile's) and its settings in
    AWS_CONFIG_FILE (else ~/.aws/config), read from `env` alone; none if unreadable."""
    home = env.get("HOME") or os.path.expanduser("~")
    path = env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
    profile = env.get("AWS_DEFAULT_PROFILE") or env.get("AWS_PROFILE") or "default"  # botocore's order
    try:
        profiles = load_config(os.path.expanduser(path)).get("profiles", {})
    except BotoCoreError:  # no such file, or one botocore cannot parse: boto3 would not use it either
        return profile, {}
    return profile, profiles.get(profile, {})


def state_dir(env: Mapping[str, str]) -> str:
    """The service's directory in the user's state directory (XDG_STATE_HOME, else ~/.local/state)."""
    home = env.get("HOME") or os.path.expanduser("~")
    # A relative one is ignored, as the XDG spec says: the controller's lock and the
    # journals would follow the directory each process started in.
    xdg = env.get("XDG_STATE_HOME") or ""
    return os.path.join(xdg if os.path.isabs(xdg) else os.path.join(home, ".local", "state"), "imgclass")


def fleet_name(prefix: str, endpoint_url: str | None, region: str) -> str:
    """`<prefix>-<12 hex digits>`, one per fleet: the prefix and the AWS (endpoint and
    region) it lives in.
    Names this machine's files for it, so that a fleet on the embedded AWS and one
    on AWS under the same prefix never read each other's."""
    # The region too: the embedded AWS, like AWS, keeps each region's queues apart.
    where = f"{_same_endpoint(endpoint_url) if endpoint_url else 'aws'} {region}"
    return f"{prefix}-{hashlib.sha256(f'{where} {prefix}'.encode()).hexdigest()[:12]}"


# Names of this machine's loopback: one embedded AWS, however its address is written.
_LOOPBACK = {"localhost", "ip6-localhost"}


def _same_endpoint(url: str) -> str:
    """`url` written one way for all the ways of writing one endpoint: any case, with
    or without a trailing slash or a default port, any address of this machine's own."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    except ValueError:  # not a port: boto3 will say so; the text is all there is
        return url
    return f"{scheme}://{_same_host(host)}:{port}{parts.path.rstrip('/')}"


def _same_host(host: str) -> str:
    """127.0.0.1 for every way of writing an address of this machine (localhost, ::1,
    127.1, ::ffff:127.0.0.1, and 0.0.0.0 or ::, which a client's connect takes for
    its own machine): a second controller given 0.0.0.0 would take no lock of its own,
    and the two run the fleet past the cap. No DNS: names stay as written."""
    if host in _LOOPBACK:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the short forms inet_aton reads, as connect does: 127.1, 0x7f.0.0.1
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return "127.0.0.1" if address.is_loopback or address.is_unspecified else str(address)
