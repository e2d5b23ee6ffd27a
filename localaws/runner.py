"""The local instance runner: what EC2 would do with our instances, locally.

moto's EC2 only records instances; nothing runs on them. This runner watches
the app-tier instances in the embedded EC2 and, for each one that is pending
or running, runs one real worker process (`python -m app_tier`), after a
configurable boot delay. When the instance is terminated or disappears, it
sends the worker SIGTERM, then SIGKILL after a grace period, as EC2's
shutdown would. A worker that exits while its instance lives is restarted, as
systemd's Restart=always does on a real instance, unless it exited because it
cannot load the model, or gave up serving and reported its instance failed
(RestartPreventExitStatus there). One that keeps failing
at start waits twice as long before each next start (QUICK_EXIT_S). Like
systemd's watchdog there (WatchdogSec=), the runner kills a worker that has said
it is ready and then stops pinging for LOCAL_WATCHDOG seconds, or that has not said
it is ready within START_TIMEOUT_S (TimeoutStartSec=; a minute for a warm
spare that has said its model is loaded), with SIGABRT (its stacks go to its
log), then SIGKILL if that does not end it, and restarts it.

Warm spares: the runner can keep a few worker processes that have already
loaded the model and wait for an instance id on stdin, the local equivalent of
an EC2 warm pool. A launched instance adopts a spare and starts serving at
once; LOCAL_BOOT_DELAY still simulates a real boot when asked. Spares that keep
dying at start are replaced after the same doubling delay as workers.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app_tier import EXIT_CANNOT_START, EXIT_GAVE_UP, SPARE_LOADED
from app_tier.held import show_held
from app_tier.held_journal import HeldJournal, JournalInUse, held_journal_path, hold_journal_lock
from common.aws import Aws, keys_in
from common.aws_errors import AWS_ERRORS
from common.backoff import next_wait
from common.config import Settings
from common.fleet import LIVE_STATES, Instance, app_tier_instances, report_worker_failed, scale_in_order
from localaws.kill import ask_to_stop, ends_with_parent, kill_and_wait
from localaws.notify import NotifySocket, NotifySockets
from localaws.supervision import Backoff, Watchdog, next_start, watchdog_action

log = logging.getLogger(__name__)

# The line the runner logs when a worker process is given an instance (a spare it
# adopts keeps `--instance-id -` on its command line: only this says which serve),
# and how it is read back (serving_pids; the tests' harness reads the logs by it).
SERVES_LINE = "runner: worker pid %d serves %s (log %s)"
SERVES = re.compile(r"runner: worker pid (\d+) serves (i-\w+)")


def serving_pids(lines: Iterable[str]) -> set[int]:
    """The pids of the worker processes that, by the runner's log `lines`, have served an instance."""
    return {int(m.group(1)) for line in lines if (m := SERVES.search(line))}

RESTART_BACKOFF_S = 1.0
# A worker that ends by itself this soon after it was given its instance failed at
# start (a bad setting, a broken import, a missing dependency), and its next start
# would most likely fail the same way. With the model prepared (make run does it
# first), a worker serves within seconds, even beside others loading on 2 cores, and
# these errors show before that; one that served 20 s did start, and is restarted at
# once. Each failed start in a row doubles the wait before the next, from
# RESTART_BACKOFF_S up to MAX_RESTART_DELAY_S: a start costs seconds of CPU (the model
# runtime's import), so failing workers restarted every second would take the cores the
# rest of the stack serves with, and fill the logs with the same traceback.
QUICK_EXIT_S = 20.0
# Once a minute at most: a cause that goes away (a dependency back) is then picked up
# within a minute; longer would only keep its instance idle for longer.
MAX_RESTART_DELAY_S = 60.0
# A worker killed by one of these was stopped from outside (kill, the OOM killer, the
# soak test's SIGKILLs), which says nothing against its next start: it is restarted at
# once, as are the runner's own watchdog's victims. Any other signal (SIGSEGV, or
# SIGILL from a native library built for another CPU) is a failure of its own.
KILLED_FROM_OUTSIDE = frozenset({-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP})
# As TimeoutStartSec= in ami/imgclass-worker.service (weights may come from S3 there).
START_TIMEOUT_S = 15 * 60.0
# A warm spare that has said its model is loaded is ready within seconds of being
# given an instance. One that is not (stopped, deadlocked while it waited) is
# replaced after this, not after the 15 minutes a cold start may take.
ADOPTED_START_TIMEOUT_S = 60.0
# After a round that failed (EC2 unreadable), the wait before the next: doubled at
# each further failure in a row, up to the most.
FAILED_ROUND_FIRST_WAIT_S, FAILED_ROUND_MAX_WAIT_S = 1.0, 10.0


# The exit statuses a worker is not restarted after, and what each says of it.
NOT_RESTARTED = {
    EXIT_CANNOT_START: "cannot start: a setting is wrong or the model cannot be loaded",
    EXIT_GAVE_UP: "gave up serving and reported its instance failed, for the controller to replace",
}

# The stack's controller and web tier differ (localaws/stack.py): they wait a second
# after any exit and stop the whole stack after three failed starts, as without them
# there is no service. A worker is one of many, and the controller replaces an
# instance whose worker cannot serve: it backs off instead, for as long as its
# instance lives (NOT_RESTARTED aside).
BACKOFF = Backoff(quick_exit_s=QUICK_EXIT_S, first_delay_s=RESTART_BACKOFF_S, max_delay_s=MAX_RESTART_DELAY_S,
                  # Whatever ends them, starts come at most once a backoff.
                  min_interval_s=RESTART_BACKOFF_S)


def _next_start(started_at: float, code: int, now: float, quick_exits: int,
                stopped: bool = False) -> tuple[int, float]:
    """For a process started at `started_at` that ended with `code` at `now`, after
    `quick_exits` failed starts in a row: how many there are in a row now, and when the
    next start is due. One ended from outside or by the runner (`stopped`) did not fail."""
    failed = code not in KILLED_FROM_OUTSIDE and not stopped
    return next_start(BACKOFF, started_at, now, failed, quick_exits)


def exit_status(code: int) -> str:
    """A process's returncode in words: "exit 0", "killed by SIGTERM"."""
    if code >= 0:
        return f"exit {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def ended_after_abort(code: int) -> str:
    """How a worker the watchdog sent SIGABRT to ended, in words. Killed by SIGSEGV
    instead is not said as if it had crashed by itself: faulthandler writing the
    stacks of threads that SIGCONT has woken can crash (after a SIGSTOP)."""
    if code == -signal.SIGABRT:
        return "killed by the watchdog's SIGABRT"
    said = f"{exit_status(code)} after the watchdog's SIGABRT"
    if code < 0 and code not in KILLED_FROM_OUTSIDE:
        said += " (a crash while it wrote its threads' stacks: its log may hold only part of them)"
    return said


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, a debugger): it acts on no signal but
    SIGKILL until continued, and a log that said it "ignored" one would mislead."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # pid (comm) state ...: comm may hold spaces and parentheses, so after the last ')'.
            return stat.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):  # gone, or no /proc (not Linux): not known to be stopped
        return False


@dataclass
class WorkerProcess:
    instance_id: str
    process: subprocess.Popen
    started_at: float
    term_sent_at: float | None = None
    kill_sent_at: float | None = None  # once it outlived the grace period after SIGTERM
    abort_sent_at: float | None = None  # by the watchdog
    ready: bool = False  # it said READY=1
    start_timeout_s: float = START_TIMEOUT_S  # to say it, from started_at
    restarts: int = 0
    quick_exits: int = 0  # failed starts in a row, its own if it has exited (see QUICK_EXIT_S)
    restart_at: float | None = None  # once it has exited: when its successor starts
    given_up: bool = False  # it cannot load the model, or gave up serving: not restarted
    # A spare given the instance before it said its model was loaded: it reads the id
    # only once loaded, so one whose load fails cannot tag the instance itself.
    adopted_loading: bool = False


@dataclass
class InstanceRunner:
    settings: Settings
    env: dict[str, str]
    log_dir: Path
    poll_s: float = 0.2
    # moto serialises every instance it lists (~4 ms of its CPU each, measured by
    # `make bench`), so polling every 0.2 s with 15 instances live takes a quarter of
    # a core from the embedded AWS the workers depend on. An empty fleet is cheap
    # to list, so a launch is still seen within poll_s; while instances are live,
    # once every busy_poll_s is enough (a real instance boots in ~40 s).
    busy_poll_s: float = 1.0
    grace_s: float = 30.0
    start_timeout_s: float = START_TIMEOUT_S
    adopted_start_timeout_s: float = ADOPTED_START_TIMEOUT_S
    warm_spares: int = 1
    # What an instance runs; tests put a small stand-in here.
    worker_argv: list[str] = field(default_factory=lambda: [sys.executable, "-m", "app_tier"])
    # Descriptors each worker keeps open: the embedded AWS's lifeline (localaws.lifeline).
    pass_fds: tuple[int, ...] = ()
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    # Set by run() once its rounds are over (no worker is started after), and by
    # shutdown() once every process it started is stopped.
    rounds_over: threading.Event = field(default_factory=threading.Event)
    shut_down: threading.Event = field(default_factory=threading.Event)
    # Held by a round while it starts processes, and by shutdown() as it takes its list of
    # them: a round whose EC2 call outlasted the stop's wait for it started workers
    # shutdown() never saw, their notify folder made anew. Never held across an AWS call.
    _round_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _first_seen: dict[str, float] = field(default_factory=dict, init=False)
    _spares: list[subprocess.Popen] = field(default_factory=list, init=False)
    _draining: list[WorkerProcess] = field(default_factory=list, init=False)
    _warned_cap: bool = field(default=False, init=False)
    # Spares back off as workers do (_next_start), in one row for all: a spare that dies
    # by itself soon after its spawn adds a failed start to it; one that lived longer,
    # was killed from outside, or was adopted by an instance ends it.
    _spare_spawned_at: dict[subprocess.Popen, float] = field(default_factory=dict, init=False)
    _spare_quick_exits: int = field(default=0, init=False)
    _spare_due_at: float = field(default=float("-inf"), init=False)  # when the next spare may be spawned
    _spawned: int = field(default=0, init=False)
    _live: int = field(default=0, init=False)
    started_total: int = 0
    # Each process's end of systemd's notification protocol, while it lives.
    _notify: dict[subprocess.Popen, NotifySocket] = field(default_factory=dict, init=False)
    # Each process's log file (named when it starts, before a spare has an instance).
    _logs: dict[subprocess.Popen, Path] = field(default_factory=dict, init=False)

    aws: Aws = field(init=False)
    _sockets: NotifySockets = field(init=False)

    def __post_init__(self) -> None:
        # Signed with the keys it gives its workers, where it gives some: make run does
        # not put them in its own environment (localaws/stack.py).
        self.aws = Aws(self.settings, keys=keys_in(self.env))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._sockets = NotifySockets(self.settings.local_watchdog_s)

    # --- processes -------------------------------------------------------------------
    def _spawn(self, instance_id: str) -> subprocess.Popen:
        self._spawned += 1
        log_path = self.log_dir / f"worker-{self._spawned:03d}.log"
        notify = None
        if self.settings.local_watchdog_s:
            try:
                notify = self._sockets.new()
            except OSError as exc:
                log.warning("runner: no watchdog for this worker: cannot make its socket (%s)", exc)
        try:
            with open(log_path, "ab") as out:
                process = subprocess.Popen(
                    [*self.worker_argv, "--instance-id", instance_id],
                    stdin=subprocess.PIPE if instance_id == "-" else subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**self.env, **(notify.env() if notify else {})},
                    cwd=str(Path(__file__).resolve().parent.parent),
                    # Own process group: Ctrl-C in the terminal must not reach workers
                    # directly; the runner stops them in order.
                    start_new_session=True,
                    pass_fds=self.pass_fds,
                    preexec_fn=ends_with_parent(),
                )
        except BaseException:
            if notify:
                notify.close()
            raise
        if notify:
            self._notify[process] = notify
        self._logs[process] = log_path
        return process

    def _start_worker(self, instance_id: str, restarts: int = 0, quick_exits: int = 0) -> None:
        process = None
        while self._spares and process is None:
            spare = self._spares.pop(0)
            if spare.poll() is not None:
                self._spare_exited(spare, time.monotonic())
                continue
            self._spare_spawned_at.pop(spare, None)
            try:
                spare.stdin.write(f"{instance_id}\n".encode())
                spare.stdin.close()
                process = spare
                # It started; if it fails now, it is as its instance's worker that it backs off.
                self._spare_quick_exits = 0
            except OSError:
                process = None
        start_timeout_s = self.start_timeout_s
        adopted_loading = False
        if process is None:
            process = self._spawn(instance_id)
        elif self._spare_loaded(process):
            start_timeout_s = min(self.start_timeout_s, self.adopted_start_timeout_s)
        else:
            adopted_loading = True
        self.started_total += 1
        self.workers[instance_id] = WorkerProcess(instance_id, process, time.monotonic(), restarts=restarts,
                                                  quick_exits=quick_exits, start_timeout_s=start_timeout_s,
                                                  adopted_loading=adopted_loading)
        log_path = self._logs.pop(process, None)
        log.info(SERVES_LINE, process.pid, instance_id, log_path.name if log_path else "-")
        if log_path is not None:
            self._link_log(instance_id, log_path)

    def _spare_loaded(self, spare: subprocess.Popen) -> bool:
        """Whether the spare said its model is loaded, as of this round's _hear() (a spare
        still loading it may take as long as any worker starting)."""
        notify = self._notify.get(spare)
        return notify is not None and notify.status == SPARE_LOADED

    def _link_log(self, instance_id: str, log_path: Path) -> None:
        """`<instance id>.log` next to the worker's log, so an instance's log is found by
        its id; after a restart it names the newest process's."""
        link = self.log_dir / f"{instance_id}.log"
        try:
            link.unlink(missing_ok=True)
            link.symlink_to(log_path.name)
        except OSError as exc:
            log.warning("runner: cannot link %s to %s (%s)", link.name, log_path.name, exc)

    def _top_up_spares(self, room: int, now: float) -> None:
        alive = []
        for spare in self._spares:
            if spare.poll() is None:
                alive.append(spare)
            else:
                self._spare_exited(spare, now)
        self._spares = alive
        if now < self._spare_due_at:
            return  # left to the round in which it is due: this one goes on
        while len(self._spares) < min(self.warm_spares, room):
            spare = self._spawn("-")
            self._spare_spawned_at[spare] = now
            self._spares.append(spare)

    def _spare_exited(self, spare: subprocess.Popen, now: float) -> None:
        """Said with its log (its traceback is there), and the next spare's delay. The
        runner ends spares only in shutdown(), with signals of KILLED_FROM_OUTSIDE."""
        code = spare.returncode
        log_path = self._logs.pop(spare, None)
        spawned_at = self._spare_spawned_at.pop(spare, now)
        if code == EXIT_CANNOT_START:
            if self.warm_spares:
                log.error("runner: a warm spare cannot start: a setting is wrong or the model cannot be "
                          "loaded (exit %d, see its log); keeping no spares", code)
            self.warm_spares = 0
            return
        self._spare_quick_exits, due_at = _next_start(spawned_at, code, now, self._spare_quick_exits)
        self._spare_due_at = max(self._spare_due_at, due_at)  # another's delay still holds
        log_name = log_path.name if log_path else "-"
        if self._spare_due_at > now:
            log.warning("runner: warm spare pid %d ended: %s (log %s); replacing it in %.0f s "
                        "(%d failed starts in a row)", spare.pid, exit_status(code), log_name,
                        self._spare_due_at - now, self._spare_quick_exits)
        else:
            log.warning("runner: warm spare pid %d ended: %s (log %s); replacing it", spare.pid,
                        exit_status(code), log_name)

    @staticmethod
    def _signal(process: subprocess.Popen, sig: int) -> None:
        if process.poll() is not None:
            return  # reaped: its pid (and process group id) may belong to another process now
        try:
            if sig in (signal.SIGTERM, signal.SIGABRT):
                ask_to_stop(process.pid, sig)
            else:
                os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def _stop_worker(self, worker: WorkerProcess, now: float) -> None:
        if worker.term_sent_at is None:
            log.info("runner: %s is gone, SIGTERM to pid %d", worker.instance_id, worker.process.pid)
            self._signal(worker.process, signal.SIGTERM)
            worker.term_sent_at = now
            self._draining.append(worker)

    def _reap_draining(self, now: float) -> None:
        still = []
        for worker in self._draining:
            code = worker.process.poll()
            if code is not None:
                # Said here, or the log would hold only the SIGTERM: a worker stopped while
                # loading its model ends by the signal, one that served exits after its warm shutdown.
                log.info("runner: worker pid %d of %s ended: %s, %.1f s after SIGTERM", worker.process.pid,
                         worker.instance_id, exit_status(code), now - (worker.term_sent_at or now))
                self._show_held_journal(worker.instance_id)
                continue
            if worker.kill_sent_at is None and now - (worker.term_sent_at or now) > self.grace_s:
                log.warning("runner: pid %d %s SIGTERM for %.0fs, SIGKILL", worker.process.pid,
                            "is stopped (SIGSTOP?) and could not act on" if is_stopped(worker.process.pid)
                            else "ignored", self.grace_s)
                self._signal(worker.process, signal.SIGKILL)
                worker.kill_sent_at = now
            # Reaped by a later round's poll, not waited for here: a process a debugger
            # holds outlives SIGKILL, and the round must go on (the watchdog comes after).
            still.append(worker)
        self._draining = still

    def _show_held_journal(self, instance_id: str) -> None:
        """A worker killed before it handed back (during its warm shutdown, or while it
        waited for a restart) left what it held written down for a successor on its
        instance. Its instance has ended, and none will come; or its successor starts
        only after a backoff. Its requests are made visible here, as the worker's unit
        does on an instance at every stop (ExecStopPost), rather than left to their
        visibility timeout (a minute, and the fleet held for it) or the successor."""
        path = held_journal_path(self.settings, instance_id)
        if path is None:
            return
        try:
            show_held(HeldJournal(path), self.aws, "runner", f"the worker of {instance_id}")
        except Exception:  # the runner's loop must go on: those are left to their timeout
            log.exception("runner: could not make visible again what the worker of %s held", instance_id)
        finally:
            # Shown or not, the journal and the lock file the killed worker left go: its
            # instance has ended (the lock file stayed after a journal shown).
            self._remove_held_journal(instance_id)

    def _remove_held_journal(self, instance_id: str) -> None:
        """A worker killed before it handed back left what it held written down for its
        successor on the instance (app_tier/held_journal.py). The instance has ended, so
        none will come: on EC2 its disk goes with it; here the file would stay for ever."""
        path = held_journal_path(self.settings, instance_id)
        if path is not None:
            try:
                HeldJournal(path).remove()
                hold_journal_lock(path, instance_id).release()  # the lock file a killed worker left
            except JournalInUse:
                pass  # a worker still runs for it: its own stop removes it
            except OSError as exc:  # a state directory read-only or full: kept, not the stop's end
                log.warning("could not remove %s, the journal of %s: %s", path, instance_id, exc)

    def _hear(self) -> None:
        """Take in what every process has sent, so that no socket's queue fills up (a
        full one would block its sender), whatever else this round does."""
        now = time.monotonic()
        for notify in self._notify.values():
            notify.read(now)

    def _watch(self) -> None:
        """systemd's watchdog: abort a worker that was ready and has gone silent, or that
        has not become ready in time; kill one that outlives the abort by the grace period
        (a stopped process cannot act on SIGABRT); the restart follows as for any exit.
        Sockets of ended processes are closed."""
        self._hear()
        now = time.monotonic()
        for worker in self.workers.values():
            notify = self._notify.get(worker.process)
            if notify is None or worker.process.poll() is not None:
                continue
            if notify.last_heard is not None and not worker.ready:
                worker.ready = True
                log.info("runner: worker pid %d for %s is ready (%.1f s after it was given the instance)",
                         worker.process.pid, worker.instance_id, now - worker.started_at)
            action = watchdog_action(now, started_at=worker.started_at, last_heard=notify.last_heard,
                                     watchdog_s=notify.watchdog_s, abort_sent_at=worker.abort_sent_at,
                                     abort_grace_s=self.grace_s, start_timeout_s=worker.start_timeout_s)
            if action is Watchdog.ABORT:
                # Silent once ready, or late never having said it: one or the other.
                why = (f"has not pinged its watchdog for {now - notify.last_heard:.0f} s"
                       if notify.last_heard is not None
                       else f"has not said it is ready in {now - worker.started_at:.0f} s")
                stopped = ", as it is stopped (SIGSTOP?)" if is_stopped(worker.process.pid) else ""
                log.error("runner: the worker for %s (pid %d) %s%s; SIGABRT (its stacks go to its log), "
                          "then a restart", worker.instance_id, worker.process.pid, why, stopped)
                self._signal(worker.process, signal.SIGABRT)
                worker.abort_sent_at = now
            elif action is Watchdog.KILL:
                log.warning("runner: pid %d outlived SIGABRT for %.0fs, SIGKILL",
                            worker.process.pid, self.grace_s)
                self._signal(worker.process, signal.SIGKILL)
        for process in [p for p in self._notify if p.poll() is not None]:
            self._notify.pop(process).close()
        # Those of spares that died and were not told of yet keep their log, to say it.
        for process in [p for p in self._logs if p.poll() is not None and p not in self._spares]:
            del self._logs[process]

    # --- one round ----------------------------------------------------------------------
    def step(self) -> None:
        if self.stopping.is_set():
            return  # shutdown() has taken its list of processes: start none it would miss
        self._hear()  # before the EC2 call, which may fail
        now = time.monotonic()
        # The controller's question (every watched state), so that the embedded AWS
        # answers both from one cached DescribeInstances; live ones kept, by number.
        instances = [i for i in app_tier_instances(self.aws) if i.state in LIVE_STATES]
        if self.stopping.is_set():
            return  # shutdown() came during the EC2 call: what it listed is its to stop
        live = {i.id for i in instances}
        self._live = len(live)
        self._stop_workers_of_gone_instances(live, now)
        self._reap_draining(now)  # may call SQS (a killed worker's journal): not under the lock
        with self._round_lock:  # only what starts processes, which calls nothing slow
            if self.stopping.is_set():
                return  # shutdown() came meanwhile
            self._restart_exited_workers(now)
            self._start_workers_for_new_instances(instances, now)
            self._first_seen = {k: v for k, v in self._first_seen.items() if k in live}
            # Spares only in room under the cap: a spare loading beside a full fleet takes
            # the cores it serves from (kept on top of the cap, spares loaded during every
            # burst of `make bench`: the workers' CPU per image rose from ~149 to 161 ms).
            self._top_up_spares(room=self.settings.local_max_workers - self._holding_models, now=now)
        self._watch()

    @property
    def _holding_models(self) -> int:
        """Worker processes that hold a model, spares aside: those serving, and those
        still finishing their batch after SIGTERM (up to SHUTDOWN_GRACE, or the runner's
        grace), which LOCAL_MAX_WORKERS, a memory budget, must count too: a burst just
        after a scale-in would start a full fleet beside the one stopping."""
        return len(self.workers) + len(self._draining)

    def _stop_workers_of_gone_instances(self, live: set[str], now: float) -> None:
        for iid in list(self.workers):
            if iid not in live:
                self._stop_worker(self.workers.pop(iid), now)
                self._first_seen.pop(iid, None)

    def _restart_exited_workers(self, now: float) -> None:
        """As the worker's systemd unit does (Restart=always, RestartPreventExitStatus
        for a worker that cannot load its model, or that gave up serving: restarting it
        cannot help, and the controller replaces its instance), backing off while it fails at start. A
        restart that must wait is left to the round in which it is due: the exited
        worker keeps its instance's place meanwhile (the instance's end drops it, and
        its restart with it), and this round goes on with the others."""
        for iid, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None or worker.given_up:
                continue
            if code in NOT_RESTARTED:
                log.error("runner: the worker for %s %s (exit %d); not restarting it (see its log)",
                          iid, NOT_RESTARTED[code], code)
                worker.given_up = True
                if code == EXIT_CANNOT_START and worker.adopted_loading:
                    # It failed before it read its instance's id: said for it, or the
                    # controller would count the instance as booting (with READY_DEADLINE
                    # 0, as make run sets it when workers are few, for good).
                    report_worker_failed(self.aws, iid, "model-unavailable")
                continue
            if worker.restart_at is None:
                stopped = worker.abort_sent_at is not None  # by the watchdog
                worker.quick_exits, worker.restart_at = _next_start(worker.started_at, code, now,
                                                                    worker.quick_exits, stopped)
                how = ended_after_abort(code) if stopped else exit_status(code)
                if worker.restart_at > now:
                    log.warning("runner: worker for %s ended: %s; restarting it in %.0f s (restart %d; "
                                "%d failed starts in a row)", iid, how, worker.restart_at - now,
                                worker.restarts + 1, worker.quick_exits)
                    # What it held, visible now rather than once its successor starts (a
                    # minute at most), as the unit's ExecStopPost does on an instance.
                    self._show_held_journal(iid)
                else:
                    log.warning("runner: worker for %s ended: %s; restarting it (restart %d)", iid,
                                how, worker.restarts + 1)
            if now >= worker.restart_at:
                del self.workers[iid]
                self._start_worker(iid, restarts=worker.restarts + 1, quick_exits=worker.quick_exits)

    def _start_workers_for_new_instances(self, instances: list[Instance], now: float) -> None:
        """A worker for each instance that has none, once it has "booted", up to the cap.
        When LOCAL_MAX_WORKERS leaves some without one, those served are the ones the
        controller scales in last."""
        waiting = sorted((i for i in instances if i.id not in self.workers), key=scale_in_order, reverse=True)
        held_back = []
        for iid in [i.id for i in waiting]:
            first = self._first_seen.setdefault(iid, now)
            if now - first < self.settings.local_boot_delay_s:
                continue
            if self._holding_models >= self.settings.local_max_workers:
                held_back.append(iid)
                continue
            self._start_worker(iid)
        if held_back and not self._warned_cap:
            # How many, not one id: 12 waiting would read as one.
            stopping = f" ({len(self._draining)} of them stopping)" if self._draining else ""
            log.warning("runner: LOCAL_MAX_WORKERS=%d reached%s; %d instance(s) wait for a free slot: %s",
                        self.settings.local_max_workers, stopping, len(held_back),
                        ", ".join(held_back[:3]) + (", ..." if len(held_back) > 3 else ""))
        self._warned_cap = bool(held_back)  # said again the next time the cap holds one back

    def run(self) -> None:
        """Rounds until `stopping`; then returns only once shutdown() has stopped every
        process: each is started from this thread, and told to end when its starter
        does (localaws/kill.py ends_with_parent: PR_SET_PDEATHSIG follows the thread,
        not the process). Returning at `stopping`, it would have every worker told SIGTERM
        at once, before the web tier and the controller were stopped."""
        pause_s = self.poll_s
        try:
            while not self.stopping.is_set():
                try:
                    self.step()
                    pause_s = max(self.poll_s, self.busy_poll_s) if self._live else self.poll_s
                except Exception as exc:  # the runner must outlive anything: the stack ends with it
                    pause_s = next_wait(pause_s, FAILED_ROUND_FIRST_WAIT_S, FAILED_ROUND_MAX_WAIT_S)
                    if isinstance(exc, AWS_ERRORS):
                        log.warning("runner: cannot read EC2 (%s); retrying in %.0fs", exc, pause_s)
                    else:
                        log.exception("runner: round failed; retrying in %.0fs", pause_s)
                self.stopping.wait(pause_s)
        finally:
            self.rounds_over.set()
        self.shut_down.wait()

    def shutdown(self, timeout_s: float = 8.0) -> None:
        """Stop every process this runner started, SIGKILL whatever outlives `timeout_s`."""
        try:
            with self._round_lock:  # a round under way ends first, or starts nothing
                self.stopping.set()
                draining = [w.process for w in self._draining]  # told to stop already: waited for
                processes = [w.process for w in self.workers.values()] + self._spares
            for p in processes:
                self._signal(p, signal.SIGTERM)
            processes += draining
            deadline = time.monotonic() + timeout_s
            for p in processes:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    kill_and_wait(p)
            for worker in [*self.workers.values(), *self._draining]:
                # As a scale-in's stop is logged, so that one stopped with the stack says so too.
                code = worker.process.poll()
                log.info("runner: worker pid %d of %s ended: %s, with the runner", worker.process.pid,
                         worker.instance_id, "still running" if code is None else exit_status(code))
                # The embedded AWS ends with the runner, and its instances with it.
                self._remove_held_journal(worker.instance_id)
            self.workers.clear()
            self._draining.clear()
            self._spares.clear()
            self._spare_spawned_at.clear()
            for notify in self._notify.values():
                notify.close()
            self._notify.clear()
            self._sockets.remove_folder()
        finally:
            self.shut_down.set()  # run() returns
