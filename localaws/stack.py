"""`make run`: the whole system on the embedded AWS, stopped cleanly by Ctrl-C.

Starts, in order: moto's server (S3, SQS, EC2 on loopback); provisioning of
the buckets and queues; the model's preparation for workers (often the longest
wait: a first conversion to OpenVINO); the local instance runner; the controller;
the web tier under gunicorn. Prints a READY line (both addresses, the logs folder) and
what to export in another shell to use it. A controller
or web tier that dies is restarted, as systemd would on an instance (both
rebuild their state from AWS), and so is a controller that hangs (its watchdog);
one that keeps failing at start, or the death of moto (which holds every queue
and object) or of the runner, stops everything, newest first, as Ctrl-C or
SIGTERM do.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import cli
from common.aws import Aws, keys_in
from common.config import VARIABLES, Settings, local_run_defaults, local_run_overrides, state_dir
from common.file_lock import LockHeld, hold, holder
from common.hosts import on_loopback
from common.logs import configure as configure_logging
from common.provision import provision
from common.signals import STOP_SIGNALS, on_signals
from controller.lock import EXIT_ANOTHER_CONTROLLER, held_by_another
from localaws.kill import (
    end_group,
    end_with_parent,
    ends_with_parent,
    group_alive,
    kill_group,
    signal_group,
    terminate,
)
from localaws.lifeline import Lifeline
from localaws.notify import NotifySocket, NotifySockets
from localaws.runner import InstanceRunner, exit_status, is_stopped
from localaws.server import (
    PortInUse,
    StartInterrupted,
    ensure_ports_differ,
    listening_socket,
    start_moto,
    wait_until_up,
)
from localaws.supervision import Backoff, Watchdog, next_start, watchdog_action
from localaws.terminal import TerminalWatch

log = logging.getLogger("stack")
ROOT = Path(__file__).resolve().parent.parent

# Children that rebuild their state from what AWS holds, so a new one can take over.
RESTARTED = ("controller", "web")
RESTART_DELAY_S = 1.0
# How long what outlives a dead child in its process group (gunicorn's workers, when
# their master was killed) has to stop on SIGTERM before it is killed, as systemd stops
# a unit whose main process died (web_tier's own graceful timeout is 5 s). Killed at
# once, the web tier's waiting clients would get no answer at all.
GROUP_STOP_S = 5.0
# Children that ping a watchdog, as under systemd with WatchdogSec=, and for how
# long they may be silent: one whose pings stop is hung, and is aborted (SIGABRT:
# its stacks go to make run's output), killed if that does not end it within
# ABORT_GRACE_S, and restarted. The controller pings between its rounds and at its
# AWS requests, each attempt of which botocore gives up on within 35 s, retries
# waiting at most 20 s between them (ami/imgclass-controller.service allows 10
# minutes). 2 minutes here: a controller hung for RESULT_TIMEOUT's 5 minutes would
# leave a burst from zero unserved until its POST /s answered 504.
WATCHED = {"controller": 120.0}
# Shorter than the runner's grace (its grace_s, 30 s by default, which is also a
# worker's time to drain on SIGTERM, as EC2's stop gives): the controller has no
# requests in hand to finish, only its few threads' stacks to write.
ABORT_GRACE_S = 5.0
# A child that exits with an error within QUICK_EXIT_S, MAX_QUICK_EXITS times in a row,
# cannot start (a bad setting, a port in use): the stack stops rather than loop, as
# without it the stack is useless. One killed by a signal was stopped from outside
# (kill -9, the OOM killer): it is always restarted. (The runner's workers back off
# instead, and the controller replaces their instances: localaws/runner.py.)
QUICK_EXIT_S = 10.0
MAX_QUICK_EXITS = 3
# A second after any exit, doubling from two after each failed start in a row.
BACKOFF = Backoff(quick_exit_s=QUICK_EXIT_S, first_delay_s=2 * RESTART_DELAY_S, after_run_s=RESTART_DELAY_S)
# A controller that finds another one running for this fleet (controller/lock.py)
# cannot start yet, through nobody's fault here: it is tried again at this pace for
# as long as the other runs, as systemd's Restart=always does on AWS.
LOCK_RETRY_S = 5.0
# How long a stop (Ctrl-C) gives everything before it kills what is left: the web
# tier's 5 s of grace and its listeners' last polls (up to 4 s), with room to spare.
STOP_TIMEOUT_S = 12.0
# In a run's logs folder from its start until it is ready (keep_previous_logs).
STARTING_MARK = ".starting"
# In the run folder, locked by the stack that runs from it, and naming its process id.
RUN_DIR_LOCK = ".lock"


class RunDirInUse(RuntimeError):
    """The run folder cannot be this stack's: another stack runs from it (its logs and web
    journal are there), or it cannot be written."""


class StateDirUnusable(RuntimeError):
    """The state directory cannot be written: no worker could start."""


def ensure_state_dir_writable(state_dir: str) -> None:
    """StateDirUnusable, saying what to do, unless a file can be made in `state_dir`.
    Each worker takes a lock and keeps its journal there, the controller its lock: a
    read-only or full one had the stack say READY, its workers exit at each start, and
    every upload fail, the reason only in the workers' logs."""
    probe = Path(state_dir) / f".writable-{os.getpid()}"
    try:
        os.makedirs(state_dir, exist_ok=True)
        try:
            with open(probe, "wb") as out:
                out.write(b"x" * 4096)  # a block: a full file system refuses it
                out.flush()
                os.fsync(out.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise StateDirUnusable(
            f"cannot write to {state_dir} ({exc.strerror or exc}), where each worker keeps its lock "
            "and journal, and the controller its lock: free some space there, or set XDG_STATE_HOME "
            "to a directory that can be written") from None


def local_model_weights(env: Mapping[str, str]) -> tuple[str, str]:
    """MODEL_WEIGHTS for a local run, and a warning when it had to fall back.

    An explicit MODEL_WEIGHTS always wins. Otherwise the real ImageNet weights
    are used when they are in the Keras cache; on a machine that has never
    downloaded them (and may not be able to), the demo runs the untrained
    network instead, and says so on every page and answer.
    """
    if env.get("MODEL_WEIGHTS", "").strip():  # blank is unset, as Settings reads it
        return env["MODEL_WEIGHTS"], ""
    from app_tier.weights import WEIGHTS_FILE, keras_cache_dir

    if (keras_cache_dir() / WEIGHTS_FILE).is_file():
        return "imagenet", ""
    return "random", (
        f"ImageNet weights are not in {keras_cache_dir()}, so this local run uses an UNTRAINED "
        f"ResNet-50 (MODEL_WEIGHTS=random): its labels are meaningless. Put {WEIGHTS_FILE} there, "
        f"or set MODEL_WEIGHTS=imagenet (downloads it), a file path, or s3://bucket/key."
    )


# Memory budgeted for one local worker: its peak resident memory as `make bench`
# measures it (OpenVINO 490-530 MiB; up to ~625 MB with LOCAL_WORKER_ONE_IMAGE_THREADS=0's
# third compilation, which then eats most of the margin; TensorFlow 0.9-1.0 GiB; README,
# Speed) and a margin.
WORKER_PEAK_BYTES = {"openvino": 0.6 * 2**30, "tensorflow": 1.3 * 2**30}


def memory_safe_workers(settings: Settings, env: Mapping[str, str]) -> tuple[int, str]:
    """How many local worker processes fit in this machine's memory.

    The controller still decides up to MAX_INSTANCES instances, as on AWS; this
    only caps how many of them get a process here. Workers that are draining
    after a scale-in and the warm spares overlap with new ones, hence the margin.
    """
    if env.get("LOCAL_MAX_WORKERS", "").strip():
        return settings.local_max_workers, ""
    import psutil

    per_worker = WORKER_PEAK_BYTES.get(settings.model_runtime, WORKER_PEAK_BYTES["tensorflow"])
    try:
        available = psutil.virtual_memory().available
    except (OSError, psutil.Error) as exc:  # no readable /proc/meminfo (a sandbox)
        return settings.local_max_workers, (f"cannot read this machine's free memory ({exc}): "
                                            f"LOCAL_MAX_WORKERS={settings.local_max_workers}, as set; "
                                            "lower it if workers run out of memory")
    fits = int(available * 0.6 // per_worker)
    cap = max(1, min(settings.local_max_workers, fits))
    if cap < settings.local_max_workers:
        return cap, (f"only {cap} local {settings.model_runtime} workers fit in this machine's memory "
                     f"(~{per_worker / 2**30:.1f} GiB each): LOCAL_MAX_WORKERS={cap}")
    return cap, ""


# Cores at most for which make run suggests the few-core settings (README, Local workers
# and memory): measured on 2, where a burst's fifteen processes loading the model beside
# the one serving made it 2.5 to 3 times slower.
FEW_CORES = 4
FEW_CORES_SETTINGS = "LOCAL_MAX_WORKERS=2 LOCAL_WORKER_ONE_IMAGE_THREADS=0 LOCAL_WARM_SPARES=2"


def usable_cores() -> int | None:
    """The cores this process may run on: a container's CPU set, not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS
        return os.cpu_count()


def few_cores_note(settings: Settings, env: Mapping[str, str], cores: int | None) -> str:
    """A word on the few-core settings, where they would serve bursts faster and the user
    chose no worker count of their own ("" otherwise)."""
    if cores is None or cores > FEW_CORES or env.get("LOCAL_MAX_WORKERS", "").strip() \
            or settings.local_max_workers <= cores:
        return ""
    return (f"this machine has {cores} cores, and a burst starts up to {settings.local_max_workers} "
            "worker processes loading the model beside the one serving (one an instance, as on AWS): "
            f"{FEW_CORES_SETTINGS} make run serves bursts 2.5 to 3 times faster here "
            "(README, Local workers and memory)")


def child_env(settings: Settings, run_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every process of the stack: `environ` (default: this process's)
    pointed at the embedded AWS, with `make run`'s own settings and defaults
    (common/config.py local_run_overrides and local_run_defaults)."""
    env = dict(os.environ if environ is None else environ)
    env.update(
        AWS_ENDPOINT_URL=settings.local_aws_url,
        AWS_DEFAULT_REGION=settings.region,
        AWS_REGION=settings.region,
        APP_PREFIX=settings.prefix,
        WEB_HOST=settings.web_host,
        WEB_PORT=str(settings.web_port),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update(local_run_overrides(settings))
    for name, value in local_run_defaults(settings, run_dir).items():
        env.setdefault(name, value)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# What a program in another shell needs besides the address to act on this stack as its
# own processes do, where set: a dry-run controller without the prefix would look for
# queues that do not exist, without make run's scale-in window (or the user's scaling
# settings) decide otherwise, and without the state directory not be refused as a second
# controller. The variables common/config.py's VARIABLES marks shared.
SHARED_WITH_OTHER_SHELLS = tuple(variable.name for variable in VARIABLES if variable.shared)


def other_shell_line(settings: Settings, env: Mapping[str, str]) -> str:
    """The line `make run` prints for other shells: what to export there."""
    # boto3 and the AWS CLI need a region and some credentials besides the address. Both
    # region variables: an AWS_REGION already exported there wins over AWS_DEFAULT_REGION
    # (common.config.region_from_env), and its fleet and queues are another region's.
    # WEB: the web tier's address, for the README's commands (a port set on make run's
    # command line is not in the other shell's environment).
    exports = {"WEB": settings.web_url,
               "AWS_ENDPOINT_URL": settings.local_aws_url, "AWS_REGION": settings.region,
               "AWS_DEFAULT_REGION": settings.region,
               "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
               **{name: env[name] for name in SHARED_WITH_OTHER_SHELLS if name in env}}
    if "XDG_STATE_HOME" in exports:
        # The one the stack's processes use, the controller's lock in it: a relative one is
        # ignored, as the XDG spec says (common.config.state_dir), not taken from here.
        exports["XDG_STATE_HOME"] = os.path.dirname(state_dir(env))
    # One controller runs at a time: another, started there, only waits for this one's
    # lock; --dry-run shows what it would do with the same settings.
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in exports.items())
    return ("to use it from another shell (README's commands, or what controller.py --dry-run would "
            "do there): export " + assignments)


def embedded_aws_open_warning(host: str) -> str | None:
    """A warning for an embedded AWS listening beyond this machine (None if it is not):
    it checks no credentials, so anyone who reaches it may read every upload and result,
    answer requests in the workers' place, and launch workers on this machine."""
    if on_loopback(host):
        return None
    return (f"the embedded AWS listens on {host or 'every address'} (LOCAL_AWS_HOST) and checks no "
            "credentials: anyone who reaches it may read every upload and result, answer requests "
            "in the workers' place, and launch workers here. Keep it on 127.0.0.1 unless this "
            "machine's network is yours alone")


class ModelUnavailable(RuntimeError):
    """The model could not be prepared: the weights missing or unreadable, say."""


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen
    started: float  # time.monotonic()
    quick_exits: int = 0  # error exits in a row, each soon after its start
    waiting_for_lock: bool = False  # a controller refused, another running for its fleet
    restart_at: float | None = None  # set while it waits to be restarted
    group_kill_at: float | None = None  # what is left of its group is killed then (GROUP_STOP_S)
    # systemd's watchdog, for a child that pings one (see WATCHED).
    notify: NotifySocket | None = None
    abort_sent_at: float | None = None


# Converts and caches the model once, as an AMI bake would (app_tier/__main__.py).
PREPARE_MODEL = [sys.executable, "-m", "app_tier", "--prepare-only"]


def how_it_ended(code: int) -> str:
    """A child's exit status in words: Popen gives -N for a process killed by signal N."""
    if code == 0:
        return "stopped (exit 0)"
    if code < 0:
        return f"was {exit_status(code)}"
    return f"exited with {code}"


class Stack:
    def __init__(self, settings: Settings, run_dir: Path, warm_spares: int,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        # Absolute: the READY line says where the logs are, wherever it is read from.
        self.run_dir = run_dir = run_dir.resolve()
        self.logs = run_dir / "logs"
        # What every child is given (see child_env). This process's own environment is
        # left as it was: the stack's own AWS clients are given the keys from here too.
        self.env = child_env(settings, run_dir, environ)
        self.children: list[Child] = []
        self.runner: InstanceRunner | None = None
        self.runner_thread: threading.Thread | None = None
        self.warm_spares = warm_spares
        # Set on Ctrl-C or SIGTERM: a start under way gives up (see _prepare_model).
        self.stopping = threading.Event()
        # Off with LOCAL_WATCHDOG=0, as the workers' watchdog is.
        self.sockets = NotifySockets(settings.local_watchdog_s) if settings.local_watchdog_s > 0 else None
        self.watchdog_s = dict(WATCHED)  # tests shorten it
        # Held by every child that uses AWS, for the embedded AWS to outlive them all.
        self.lifeline = Lifeline()
        self.run_dir_lock: int | None = None
        # The web tier's listening socket, bound here and given to each of its processes
        # (listening_socket): held across its restarts.
        self.web_listener: socket.socket | None = None

    def start(self) -> None:
        s = self.settings
        self.lock_run_dir()
        ensure_state_dir_writable(state_dir(self.env))  # the one its children will use
        ensure_ports_differ((s.local_aws_host_bare, s.local_aws_port, "LOCAL_AWS_PORT"),
                            (s.web_host_bare, s.web_port, "WEB_PORT"))
        aws_listener = listening_socket(s.local_aws_host_bare, s.local_aws_port, "LOCAL_AWS_PORT")
        try:
            self.web_listener = listening_socket(s.web_host_bare, s.web_port, "WEB_PORT")
            # Only now: a run refused for a port in use (a second `make run` here, say)
            # must leave the running one's logs where they are.
            self.open_logs()
            log.info("starting the embedded AWS on %s", s.local_aws_url)
            if warning := embedded_aws_open_warning(s.local_aws_host_bare):
                log.warning("%s", warning)
            moto = start_moto(s.local_aws_host_bare, s.local_aws_port, self.logs / "moto.log", self.stopping,
                              lifeline_fd=self.lifeline.server_fd, listener=aws_listener)
        finally:
            aws_listener.close()  # moto's now, for as long as it lives (its lifeline's end)
        self.lifeline.close_server_end()
        self.children.append(Child("moto", [], moto, time.monotonic()))
        # Into the embedded AWS whatever the settings say (main points them there; the
        # runner's clients rely on that), with the keys the children are given.
        provision(s, Aws(dataclasses.replace(s, endpoint_url=s.local_aws_url), keys=keys_in(self.env)))
        self._prepare_model()
        self.runner = InstanceRunner(s, env=self.env, log_dir=self.logs, warm_spares=self.warm_spares,
                                     pass_fds=(self.lifeline.holder_fd,))
        self.runner_thread = threading.Thread(target=self.runner.run, name="runner", daemon=True)
        self.runner_thread.start()
        self._spawn("controller", [sys.executable, str(ROOT / "controller.py")])
        gunicorn_conf = str(ROOT / "web_tier" / "gunicorn.conf.py")
        self._spawn("web", [sys.executable, "-m", "gunicorn", "-c", gunicorn_conf,
                            "--bind", f"fd://{self.web_listener.fileno()}", "web_tier:create_app()"])
        wait_until_up(f"{s.web_url}/healthz", self.children[-1].process, timeout_s=60,
                      stopping=self.stopping)
        self.mark_ready()

    def _close_web_listener(self) -> None:
        if self.web_listener is not None:
            self.web_listener.close()
            self.web_listener = None

    def say_what_the_stop_loses(self) -> None:
        """Log the requests still in the embedded AWS's queue, lost with it: it keeps
        nothing across a stop. A client told at the stop that its image is still queued
        (a 503) was told to send it again only if the AWS stops too."""
        s = self.settings
        aws = Aws(dataclasses.replace(s, endpoint_url=s.local_aws_url), keys=keys_in(self.env))
        try:
            # The health checks' client: one try, short timeouts (a stop must not wait).
            lost = aws.queue_depth(aws.queue_url(s.request_queue, probe=True), probe=True).total
        except Exception as exc:  # noqa: BLE001 (only a log line is lost)
            log.info("could not count the requests the stop loses: %s", exc)
            return
        if lost:
            log.warning("%d request(s) still queued are lost: the embedded AWS keeps nothing across a "
                        "stop (send those images again once make run is back)", lost)

    def lock_run_dir(self) -> None:
        """Hold the run folder for this stack's life. A second stack from it would move
        the first one's logs aside (or delete them, were it still starting), and the two
        web tiers would queue each other's journaled uploads into their own AWS."""
        path = self.run_dir / RUN_DIR_LOCK
        try:
            self.run_dir_lock = hold(path)
        except LockHeld:
            raise RunDirInUse(f"another stack (process {holder(path)}) runs from {self.run_dir}, where its "
                              f"logs and web journal are: stop it, or give this one a folder and ports "
                              f"of its own: make run RUN_ARGS='--run-dir {self.run_dir}-2' WEB_PORT=<port> "
                              "LOCAL_AWS_PORT=<port>") from None
        except OSError as exc:  # read-only, full, or not a folder
            raise RunDirInUse(f"cannot use {self.run_dir} for this run's logs and web journal "
                              f"({exc.strerror or exc}): give it a folder that can be written: "
                              f"make run RUN_ARGS='--run-dir <folder>'") from None

    def open_logs(self) -> None:
        """A fresh logs folder for this run, the last run's kept beside it if that run
        became ready (see keep_previous_logs)."""
        keep_previous_logs(self.logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / STARTING_MARK).touch()

    def mark_ready(self) -> None:
        """Say in the logs folder that this run became ready: the next run keeps its logs."""
        (self.logs / STARTING_MARK).unlink(missing_ok=True)

    def _prepare_model(self) -> None:
        """Convert and cache the model once, before any worker needs it (as an AMI bake would)."""
        log.info("preparing the model (%s, weights %s)", self.settings.model_runtime,
                 self.settings.model_weights)
        with open(self.logs / "prepare-model.log", "wb") as out:
            # A session of its own, so that the terminal's Ctrl-C reaches only the stack,
            # which stops it: a preparation cut short is not a model that cannot load.
            process = subprocess.Popen(PREPARE_MODEL, env=self.env,
                                       cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=ends_with_parent())
            while process.poll() is None:
                if self.stopping.wait(0.2):
                    terminate(process, time.monotonic() + 5, "the model's preparation")
                    raise StartInterrupted("stopped while the model was being prepared")
            code = process.returncode
        if code != 0:
            said = (self.logs / "prepare-model.log").read_text()[-2000:]
            if not said.strip():  # it could write nothing: its disk full, most likely
                said = f"(its log is empty: is the disk of {self.logs} full?)"
            raise ModelUnavailable(f"the model could not be loaded: see {self.logs / 'prepare-model.log'}\n"
                                   + said)

    def _spawn(self, name: str, argv: list[str]) -> None:
        process, notify = self._popen(name, argv)
        self.children.append(Child(name, argv, process, time.monotonic(), notify=notify))

    def _restart(self, child: Child, now: float) -> None:
        if child.notify is not None:
            child.notify.close()
        child.process, child.notify = self._popen(child.name, child.argv)
        child.started, child.restart_at, child.abort_sent_at = now, None, None

    def _popen(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, NotifySocket | None]:
        """A child's process, with a watchdog socket of its own if it is WATCHED."""
        watched = self.sockets is not None and name in self.watchdog_s
        notify = self.sockets.new(self.watchdog_s[name]) if watched else None
        env = {**self.env, **notify.env()} if notify is not None else self.env
        fds = (self.lifeline.holder_fd,)
        if name == "web" and self.web_listener is not None:
            fds += (self.web_listener.fileno(),)
        return subprocess.Popen(argv, env=env, cwd=str(ROOT), start_new_session=True,
                                pass_fds=fds, preexec_fn=ends_with_parent()), notify

    def _watch(self, child: Child, now: float) -> None:
        """systemd's watchdog for a live child: abort it once its pings have stopped for
        LOCAL_WATCHDOG seconds, kill it if the abort does not end it."""
        if child.notify is None:
            return
        child.notify.read(now)
        action = watchdog_action(now, started_at=child.started, last_heard=child.notify.last_heard,
                                 watchdog_s=child.notify.watchdog_s, abort_sent_at=child.abort_sent_at,
                                 abort_grace_s=ABORT_GRACE_S)
        if action is Watchdog.ABORT:
            why = ("it is stopped (SIGSTOP?); SIGABRT, then SIGKILL and a restart"
                   if is_stopped(child.process.pid) else
                   "hung; SIGABRT (its threads' stacks follow), then a restart")
            log.error("%s (pid %d) has not pinged its watchdog for %.0f s: %s", child.name, child.process.pid,
                      now - (child.notify.last_heard or now), why)
            signal_group(child.process.pid, signal.SIGABRT)
            child.abort_sent_at = now
        elif action is Watchdog.KILL:
            signal_group(child.process.pid, signal.SIGKILL)

    def supervise(self, now: float | None = None) -> str | None:
        """Restart a controller or web tier that died; what forces a stop, if anything.
        Called every half second: a restart waits out its delay across calls."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            code = child.process.poll()
            if code is None:
                self._watch(child, now)
            elif child.name not in RESTARTED:
                return f"{child.name} {how_it_ended(code)}"
            elif child.restart_at is None:
                problem = self._ended(child, code, now)
                if problem:
                    return problem
            elif now >= child.restart_at:
                self._restart_when_ready(child, now)
        if self.runner_thread is not None and not self.runner_thread.is_alive():
            return "the instance runner stopped"
        return None

    def _ended(self, child: Child, code: int, now: float) -> str | None:
        """When a restarted child that just ended is started again; what forces a stop
        instead, if it keeps failing at start."""
        if child.name == "controller" and code == EXIT_ANOTHER_CONTROLLER:
            # Said once, not at every retry (the controller's own line names the other).
            if not child.waiting_for_lock:
                log.warning("controller: another controller runs for this fleet (named above); "
                            "trying again every %.0f s for as long as that one runs", LOCK_RETRY_S)
            child.waiting_for_lock = True
            child.quick_exits = 0  # not a failed start
            child.restart_at = now + LOCK_RETRY_S
            return None
        child.waiting_for_lock = False
        # Its process group may outlive it (gunicorn's workers, still holding the
        # port): asked to stop, as systemd would, and killed before the restart.
        signal_group(child.process.pid, signal.SIGTERM)
        child.group_kill_at = now + GROUP_STOP_S
        # Only an error exit counts against the next start: exit 0 is a clean stop
        # someone else asked for (a SIGTERM sent to it alone), a signal came from outside.
        child.quick_exits, restart_at = next_start(BACKOFF, child.started, now, code > 0, child.quick_exits)
        if child.quick_exits >= MAX_QUICK_EXITS:
            return f"{child.name} {how_it_ended(code)}, {child.quick_exits} times in a row at start"
        child.restart_at = restart_at
        log.log(logging.WARNING if code == 0 else logging.ERROR, "%s %s; restarting it in %.0f s",
                child.name, how_it_ended(code), child.restart_at - now)
        return None

    def _restart_when_ready(self, child: Child, now: float) -> None:
        """Restart a child whose delay is over, once what is left of its process group
        has stopped, and, for a controller refused for another one, once that one is gone."""
        if child.group_kill_at is not None:
            if group_alive(child.process.pid) and now < child.group_kill_at:
                return  # still stopping (answering its waiting clients)
            kill_group(child.process.pid)
            child.group_kill_at = None
        if child.waiting_for_lock and held_by_another(self.settings):
            # Restarted only to be refused again: two lines on the terminal every
            # LOCK_RETRY_S for as long as the other runs.
            child.restart_at = now + LOCK_RETRY_S
            return
        self._restart(child, now)
        log.info("%s restarted (pid %d)", child.name, child.process.pid)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop everything, newest first; whatever outlives the timeout is killed."""
        deadline = time.monotonic() + timeout_s
        if self.runner is not None:
            # First, or the runner would go on starting workers (each loading the
            # model) for the instances the controller launched while it was stopping.
            self.runner.stopping.set()
        try:
            for child in reversed(self.children):
                if child.name == "moto":
                    continue  # last: the runner and workers still talk to it while stopping
                terminate(child.process, deadline, child.name)
                if child.group_kill_at is not None:  # what outlived it, asked to stop: waited for
                    end_group(child.process.pid, min(deadline, child.group_kill_at))
                if child.name == "web":
                    # New connections refused from now, not queued on the stack's socket
                    # while the rest stops, then reset.
                    self._close_web_listener()
            if self.runner is not None:
                # A round in progress may still start a worker: let it end, so that
                # shutdown() sees every process there is.
                # (Not the thread's end: it waits for shutdown(), see InstanceRunner.run.)
                if self.runner_thread is not None and self.runner_thread.is_alive():
                    self.runner.rounds_over.wait(timeout=max(0.5, deadline - time.monotonic()))
                self.runner.shutdown(timeout_s=max(1.0, deadline - time.monotonic()))
        finally:  # whatever failed above, the embedded AWS is not left running
            for child in self.children:
                if child.name == "moto":
                    if child.process.poll() is None:
                        self.say_what_the_stop_loses()
                    terminate(child.process, time.monotonic() + 2, child.name)
        for child in self.children:
            if child.notify is not None:
                child.notify.close()
        if self.sockets is not None:
            self.sockets.remove_folder()
        self.lifeline.close()
        self._close_web_listener()
        if self.run_dir_lock is not None:
            os.close(self.run_dir_lock)
            self.run_dir_lock = None


def keep_previous_logs(logs: Path) -> None:
    """Move the last run's logs to `<logs>.previous` (replacing the run before), so
    that each run's folder holds its own and the folder does not grow run after run.

    A run that never became ready (its folder still has STARTING_MARK) is deleted
    instead: kept, two failed starts in a row would push out the logs of the last run
    that served, the ones worth comparing with."""
    if (logs / STARTING_MARK).exists():
        shutil.rmtree(logs, ignore_errors=True)
    elif logs.is_dir() and any(logs.iterdir()):
        previous = logs.with_name(logs.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        logs.rename(previous)


def stop_signals() -> tuple[int, ...]:
    """What stops the stack: Ctrl-C and SIGTERM, and SIGHUP, which the terminal `make
    run` runs in sends when it is closed (its default action ended the stack at once,
    leaving its children to end on their own), unless SIGHUP is ignored: `nohup make
    run` asks to outlive the terminal."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (*STOP_SIGNALS, *hangup)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m localaws.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run",
                        help="logs go here, and the web tier's journal unless WEB_JOURNAL_DIR says "
                        "otherwise (default .run/)")
    parser.add_argument("--warm-spares", metavar="N",
                        help="worker processes kept with the model loaded, ready to serve a new "
                        "instance at once (default: LOCAL_WARM_SPARES, else "
                        f"{Settings.local_warm_spares})")
    # Every argument first: else a bad setting's usage line leaves --warm-spares out, and
    # --help gives the setting's error, not the help.
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.warm_spares is not None:
        env["LOCAL_WARM_SPARES"] = args.warm_spares  # checked as the variable is, with its bounds
    try:
        settings = Settings.from_env(env)
    except ValueError as exc:  # names the variable
        said = str(exc)
        if args.warm_spares is not None:
            said = said.replace("LOCAL_WARM_SPARES", "--warm-spares (LOCAL_WARM_SPARES)", 1)
        parser.error(said)
    configure_logging("%(asctime)s %(levelname)s %(name)s %(message)s")
    weights, note = local_model_weights(os.environ)
    settings = dataclasses.replace(settings, endpoint_url=settings.local_aws_url, model_weights=weights)
    if note:
        log.warning(note)
    workers, note = memory_safe_workers(settings, os.environ)
    settings = dataclasses.replace(settings, local_max_workers=workers)
    if note:
        log.warning(note)
    note = few_cores_note(settings, os.environ, usable_cores())
    if note:
        log.info(note)

    stack = Stack(settings, args.run_dir, settings.local_warm_spares,
                  environ={**os.environ, "MODEL_WEIGHTS": weights})
    stop = stack.stopping

    def stop_on_signal(signum: int) -> None:
        if not stop.is_set():  # said once: a second Ctrl-C changes nothing
            log.info("%s: stopping everything this stack started (a few seconds)",
                     signal.Signals(signum).name)
        stop.set()

    signals = stop_signals()
    on_signals(stop_on_signal, signals)
    # Closed, a terminal whose session make leads stops nothing (localaws/terminal.py).
    terminal = TerminalWatch() if signal.SIGHUP in signals else None
    code = 0
    try:
        stack.start()
        untrained = " (MODEL_WEIGHTS=random: labels come from an UNTRAINED model)" \
            if settings.untrained else ""
        print(f"READY web={settings.web_url} aws={settings.local_aws_url}"
              f" logs={stack.logs}{untrained}", flush=True)
        print(other_shell_line(settings, stack.env), flush=True)
        while not stop.wait(0.5):
            if terminal is not None and terminal.lost():
                log.info("the terminal make run was started in is closed: stopping everything")
                break
            problem = stack.supervise()
            if problem:
                log.error("%s; stopping everything", problem)
                code = 1
                break
    except (PortInUse, RunDirInUse, StateDirUnusable) as exc:
        log.error("%s", exc)
        code = 1
    except StartInterrupted as exc:
        log.info("%s", exc)
    except ModelUnavailable as exc:
        # Its log's end says what to do (weights to fetch, or MODEL_WEIGHTS=random): a
        # traceback of the stack before it would only hide that.
        log.error("%s", exc)
        code = 1
    except Exception:
        log.exception("could not start the stack")
        code = 1
    finally:
        stack.stop()
        log.info("stopped")
    return code


if __name__ == "__main__":
    end_with_parent()  # not in main(), which tests call in their own process
    sys.exit(main())
