"""The control loop: observe, decide, act, once a poll interval.

Each round observes SQS and EC2 afresh (controller/observe.py), so a controller that
is killed and started again adopts the fleet it finds. To that it adds what only this
controller has seen: its memory between rounds (controller/memory.py, which says what
a restart loses). It decides with a pure function of the observation, the policy and
a snapshot of that memory (controller/policy.py), then acts (controller/act.py).
Besides, for people only: the last round's log summary, the last TIMELINE_ROUNDS
rounds (Controller.timeline), and with --timeline every round on disk
(controller/timeline.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from botocore.exceptions import ClientError

from common import systemd
from common.aws import Aws
from common.aws_errors import AWS_ERRORS, error_code
from common.backoff import next_wait
from common.config import Settings
from common.fleet import LIVE_STATES
from common.names import instance_name
from common.signals import on_signals
from controller.act import LaunchCall, LaunchError, launch, render_user_data, terminate
from controller.memory import (
    REFUSAL_RETRY_S,
    LaunchBackoff,
    LaunchHold,
    ProgressWatch,
    ReadinessClock,
    RecentLaunches,
    RecentTerminations,
    Refusals,
    RoundMemory,
    ScaleInWindow,
    UnansweredLaunches,
    started_by,
)
from controller.observe import Observation, observe, terminated
from controller.policy import Decision, Policy, decide, desired_count, not_receiving, untaken_beside_receivers
from controller.timeline import TimelineFile

log = logging.getLogger(__name__)

# EC2's refusals that concern one instance of a TerminateInstances call, not the call.
ONE_INSTANCE_ERRORS = frozenset({
    "OperationNotPermitted", "UnauthorizedOperation", "IncorrectInstanceState",
    "InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed",
})
# Of those, the ones the next round would get too (protection, a right missing): that
# instance is asked again only a minute later (Refusals). EC2 not listing a new instance
# yet, or one in a state of passage, is asked again at the next round.
LASTING_REFUSALS = frozenset({"OperationNotPermitted", "UnauthorizedOperation"})
# Rounds kept in memory (a day at a 1 s poll would be 86,400 of them).
TIMELINE_ROUNDS = 1000
# The least time between two of the watchdog pings sent at AWS requests (run).
PING_ON_REQUEST_EVERY_S = 1.0
# A round that begins, or takes, this much later than planned is said so: the fleet
# follows the queue that much later, and silence in the log would not say why.
LATE_ROUND_S = 5.0
# Two looks at the progress deadline's wait further apart than this (or than this many
# poll intervals, if longer) break it: nobody watched in between (ProgressWatch.waited).
PROGRESS_LOOK_GAP_S = 30.0
PROGRESS_LOOK_GAP_POLLS = 3


def describe_action(decision: Decision) -> str:
    """The timeline's and the log's word for what a decision does: "launch 2", or "-"."""
    action = []
    if decision.launch:
        action.append(f"launch {len(decision.launch)}")
    if decision.terminate:
        action.append(f"terminate {len(decision.terminate)}")
    if decision.clean_up:
        action.append(f"clean up {len(decision.clean_up)}")
    return " + ".join(action) or "-"


def _failed(obs: Observation, reasons: Mapping[str, str]) -> Observation:
    """The observation with the instances `reasons` names counted as failed, each for its
    reason (a worker's own failed tag, if it has one since, says more)."""
    if not reasons:
        return obs
    return replace(obs, instances=tuple(replace(i, worker_failed=i.worker_failed or reasons[i.id])
                                        if i.id in reasons else i for i in obs.instances))


@dataclass(frozen=True)
class Timings:
    """How long the controller waits after something fails (Settings holds the rest)."""

    # After a failed round, wait this long, doubling per further failure up to the max.
    # The max stays short so that the fleet follows the queue soon after AWS recovers.
    backoff_min_s: float = 1.0
    backoff_max_s: float = 10.0
    # When a worker gives up (it cannot load the model), a replacement would most
    # likely do the same: launches wait this long, doubling while workers keep giving
    # up, as Kubernetes backs off a crash-looping container, until a replacement serves.
    failure_hold_min_s: float = 10.0
    failure_hold_max_s: float = 300.0
    # After a launch fails, launches (only) wait this long, doubling per further failure
    # up to the max, back to none once one succeeds. The max stays short so that the
    # fleet scales out soon after capacity returns.
    launch_backoff_min_s: float = 1.0
    launch_backoff_max_s: float = 30.0


@dataclass
class Controller:
    """Observes, decides and acts, a round each poll interval (`run`, `step`)."""

    settings: Settings
    aws: Aws
    dry_run: bool = False
    timeline_path: Path | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    timings: Timings = Timings()

    policy: Policy = field(init=False)  # from settings

    # --- memory between rounds: all of it may be lost (see controller/memory.py) -------
    scale_in_window: ScaleInWindow = field(default_factory=ScaleInWindow, init=False)
    recent_launches: RecentLaunches = field(default_factory=RecentLaunches, init=False)
    launch_hold: LaunchHold = field(default_factory=LaunchHold, init=False)
    readiness: ReadinessClock = field(default_factory=ReadinessClock, init=False)
    refusals: Refusals = field(default_factory=Refusals, init=False)
    recent_terminations: RecentTerminations = field(default_factory=RecentTerminations, init=False)
    unanswered: UnansweredLaunches = field(default_factory=UnansweredLaunches, init=False)
    launch_backoff: LaunchBackoff = field(default_factory=LaunchBackoff, init=False)
    progress: ProgressWatch = field(default_factory=ProgressWatch, init=False)
    # Live after the last round, less what it terminated: one gone by the next was ended
    # by someone else, said so (a hand, EC2 itself), where the log only launched again.
    _live_after_last_round: frozenset[str] = field(default=frozenset(), init=False)
    # For people only, never for deciding: the last round's log summary (a round that
    # changes nothing is not logged again), and the last rounds, for tests and a look
    # in a debugger (--timeline keeps them all on disk, in _timeline_file).
    _last_summary: tuple | None = field(default=None, init=False)
    timeline: deque[dict] = field(default_factory=lambda: deque(maxlen=TIMELINE_ROUNDS))
    _timeline_file: TimelineFile | None = field(default=None, init=False)
    # When the watchdog was last pinged (monotonic), to ping at most once a second.
    _pinged_at: float = field(default=-math.inf, init=False)

    def __post_init__(self) -> None:
        self.policy = Policy.from_settings(self.settings)
        render_user_data(self.settings)  # fail at start, not at the first launch
        if self.timeline_path:
            self._timeline_file = TimelineFile(self.timeline_path)

    # --- one round -----------------------------------------------------------------
    def step(self, now: float | None = None) -> Decision:
        """One round: observe (with this controller's memory), decide, act; the decision.
        `now` (tests) stands in for both clocks."""
        # Observe: what EC2 and SQS show, with what only this controller has seen (its
        # launches EC2 does not list yet, how long an instance has gone unready).
        began = time.monotonic()

        def clock() -> float:
            """The round's clock now: monotonic time, or a test's `now` moved on since then."""
            return time.monotonic() if now is None else now + (time.monotonic() - began)

        obs = self._with_unlisted_launches(observe(self.aws, now))
        self.recent_terminations.forget_old(obs.clock)
        obs = self._with_ready_deadline(self.recent_terminations.applied(obs))
        obs = self._with_progress_deadline(obs)
        self._note_ended_by_others(obs)
        self.refusals.keep_listed({i.id for i in obs.instances})
        # Remember what the next rounds need of this one: the scale-in window's counts,
        # and workers giving up (the launch hold). Both update this controller's memory.
        wanted_recently = self._note_wanted(obs)
        launches_held = self._note_worker_failures(obs)
        # Decide, with a pure function of all that and a snapshot of the memory; then act.
        memory = RoundMemory(
            wanted_recently=wanted_recently,
            window_watched=self.scale_in_window.watched(obs.clock, self.policy.scale_in_cooldown_s),
            launches_held=launches_held,
            launch_at_most=self.launch_hold.trial_launches(obs),
            launch_wait_s=self.launch_backoff.remaining(obs.clock),
            keep_last=self.refusals.lasting,
            resting=self.refusals.resting(obs.clock),
            unanswered=frozenset(self.unanswered.calls()),
        )
        decision = decide(obs, self.policy, memory)
        self._record(obs, decision)
        acting = decision.changes_anything and not self.dry_run
        try:
            if acting:
                self._act(decision, obs, clock)
        finally:
            # Those it asked to end are its own doing, whether or not the answer came (a
            # round that fails after its terminations take effect must not blame "someone").
            asked_to_end = {*decision.terminate, *decision.clean_up} if acting else set()
            # This round's launches among them (EC2 listed none of them yet).
            launched = {i.id for i in self.recent_launches.instances() if i.state in LIVE_STATES}
            self._live_after_last_round = frozenset({i.id for i in obs.live} | launched) - asked_to_end
        return decision

    def _with_unlisted_launches(self, obs: Observation) -> Observation:
        """The observation, with this controller's recent launches that EC2 does not list
        yet (RecentLaunches, each as EC2 last listed it), less those EC2 lists terminated.
        What EC2 lists now updates that memory first."""
        # A launch that got no reply, now listed, is kept as an answered one is: a lagging
        # read that leaves it out must not have its number launched again.
        unanswered = self.unanswered.calls()
        for instance in obs.instances:
            call = unanswered.get(instance.number)
            if call is not None and started_by(call, instance.number, instance):
                self.recent_launches.take_listed(instance, obs.clock)
        self.unanswered.keep_unlisted(obs.instances, obs.clock)
        recent, listed = self.recent_launches, {i.id: i for i in obs.instances}
        recent.take_in(listed, obs.clock)
        unlisted = recent.unlisted(listed)
        if not unlisted:
            return obs
        # One that went straight to terminated (no capacity, a volume it could not
        # encrypt, a hand), or has ended since, is not listed in a watched state: counted
        # until the memory ran out, it would hold up its replacement and stand in for a
        # scale-in victim.
        ended = terminated(self.aws, [i.id for i in unlisted])
        for iid in ended:
            recent.forget(iid)
        return replace(obs, instances=obs.instances + tuple(i for i in unlisted if i.id not in ended))

    def _with_ready_deadline(self, obs: Observation) -> Observation:
        """The observation, with how long each instance whose worker has not said it
        serves has been silent (obs.silent_for, on the ReadinessClock), and each silent for
        longer than READY_DEADLINE counted as failed: it never will serve (see common/fleet.py)."""
        deadline = self.settings.ready_deadline_s
        silent = [i for i in obs.live if not i.ready and not i.worker_failed]
        self.readiness.watch({i.id: i.age_s for i in silent}, obs.clock)
        obs = replace(obs, silent_for={i.id: self.readiness.silent_for(i.id, obs.clock) for i in silent})
        if deadline <= 0:
            return obs
        overdue = {iid for iid, silent_s in obs.silent_for.items() if silent_s > deadline}
        if not overdue:
            return obs
        reason = f"not serving {deadline:g}s after its launch"
        return _failed(obs, dict.fromkeys(overdue, reason))

    def _with_progress_deadline(self, obs: Observation) -> Observation:
        """The observation, with the instances counted as not receiving (ProgressWatch)
        failed, and the oldest of those whose workers said they serve too once requests
        have waited PROGRESS_DEADLINE visible with none in flight: they do not receive,
        and its ready tag would have it counted as serving for good."""
        watch = self.progress
        watch.keep_listed({i.id for i in obs.instances})
        watch.progressed(obs.in_flight)
        obs = _failed(obs, watch.counted)
        deadline = watch.deadline(self.settings.progress_deadline_s)
        longest_gap_s = max(PROGRESS_LOOK_GAP_S, PROGRESS_LOOK_GAP_POLLS * self.settings.poll_interval_s)
        waited_s = watch.waited(deadline > 0 and untaken_beside_receivers(obs), obs.clock, longest_gap_s)
        stuck = not_receiving(obs, waited_s, deadline)
        if stuck is None:
            return obs
        # Said by the log line of workers that gave up (_note_worker_failures), as is
        # READY_DEADLINE's reason.
        reason = (f"not receiving: {obs.visible} request(s) waited {waited_s:.0f}s with none in flight "
                  "while its worker said it serves")
        watch.count(stuck.id, reason, obs.clock)
        return _failed(obs, {stuck.id: reason})

    def _note_ended_by_others(self, obs: Observation) -> None:
        """Says which instances live after the last round are not now, ended by someone
        else (by hand, another program, EC2), and remembers those ending (RecentTerminations)."""
        gone = sorted(self._live_after_last_round - {i.id for i in obs.live})
        if gone:
            # Those ending are remembered as this controller's own terminations are: a
            # later read still listing one running would have it stand in for its replacement,
            # which would be scaled in. Only those EC2 lists ending (shutting down,
            # as a hand's termination is for a while) or ended: one a lagging read merely
            # left out is still running.
            listed = {i.id for i in obs.instances}
            ending = {i.id for i in obs.in_state("shutting-down")} & set(gone)
            unlisted = [iid for iid in gone if iid not in listed]
            for iid in ending | (terminated(self.aws, unlisted) if unlisted else set()):
                self.recent_terminations.note(iid, obs.clock)
        if gone and self.dry_run:
            # Beside a live fleet, another controller does the acting: no cause for alarm.
            log.info("controller: %d instance(s) ended since the last round (dry run: by whoever acts): %s",
                     len(gone), ", ".join(gone))
        elif gone:
            log.warning("controller: %d instance(s) ended since the last round, not by this controller: %s "
                        "(terminated by hand or another program, or by EC2: no capacity, a failed host); "
                        "replaced if the queue needs them", len(gone), ", ".join(gone))

    def _note_wanted(self, obs: Observation) -> int | None:
        """Records in the scale-in window how many instances this round wants; returns the
        most wanted at any round of the last scale_in_cooldown_s (RoundMemory.wanted_recently;
        None without a window). A controller that has not yet watched for a whole window (it
        has just been restarted) counts what is live as wanted: it scales out, not in."""
        window = self.policy.scale_in_cooldown_s
        if window <= 0:
            return None
        self.scale_in_window.record(obs.clock, desired_count(obs, self.policy)[0], window)
        return self.scale_in_window.peak(obs.clock, len(obs.live), window)

    def _note_worker_failures(self, obs: Observation) -> bool:
        """Records in the launch hold the workers that have given up, and logs those new this
        round; returns whether launches are held now (RoundMemory.launches_held)."""
        hold, timings = self.launch_hold, self.timings
        # Quiet for longer than a wave of instances that never serve takes to fail again.
        slowest_wave = max(self.settings.ready_deadline_s, self.settings.stall_timeout_s)
        quiet_s = 2 * timings.failure_hold_max_s + slowest_wave
        new = hold.note_failures(obs, timings.failure_hold_min_s, timings.failure_hold_max_s, quiet_s)
        if new:
            log.error(
                "controller: %d worker(s) gave up or failed: %s; their instances are %s, and "
                "launches held for %.0fs (see the worker's log, and ami/README.md)", len(new),
                ", ".join(f"{instance_name(i.number)} ({i.id}): {i.worker_failed}" for i in new),
                "left (dry run)" if self.dry_run else "terminated", hold.hold_s,
            )
        return hold.holds(obs.clock)

    def _act(self, decision: Decision, obs: Observation, clock: Callable[[], float]) -> None:
        """Carries the decision out; `clock()` is the round's clock (obs.clock's) now."""
        # Terminations first: they are what a scale-in waits on, and launches can take
        # long (botocore retrying RunInstances). A termination EC2 fails (throttled, a 5xx,
        # a code of its own) fails the round, but after the launches: raised at once, it
        # would hold every launch, round after round, while requests wait.
        failed: Exception | None = None
        for ids, why in ((decision.terminate, "the fleet no longer needs it"),
                         (decision.clean_up, "it serves nobody (stopped, or its worker gave up)")):
            try:
                self._terminate(ids, why, obs.clock)
            except AWS_ERRORS as exc:
                failed = failed or exc
        if decision.launch:
            self._launch(decision.launch, obs, clock)
        if failed is not None:
            raise failed

    def _launch(self, numbers: tuple[int, ...], obs: Observation, clock: Callable[[], float]) -> None:
        try:
            ids = launch(self.aws, self.settings, numbers, self.unanswered.calls())
        except LaunchError as exc:
            # Not raised: failing the round would slow every round, scale-in too, to
            # the loop's error backoff for as long as capacity or the quota is short.
            # The spent calls first: a new call of the same number that got no reply
            # takes its place (unanswered).
            self.unanswered.forget(exc.spent)
            self._remember(exc.launched, obs, exc.unanswered)
            # Timed from now: a launch can fail slowly (botocore retrying RunInstances
            # for seconds), and timed from the observation, the wait could pass before
            # the call returns; timed from before it, a slow SQS would lengthen it.
            failed_at = clock()
            wait = self.launch_backoff.failed(failed_at, self.timings.launch_backoff_min_s,
                                              self.timings.launch_backoff_max_s)
            log.warning("controller: %s; launches held, next try in %.1fs", exc, wait)
            return
        self.launch_backoff.succeeded()
        self._remember(ids, obs)

    def _terminate(self, instance_ids: tuple[str, ...], why: str, clock: float) -> None:
        """Terminate these instances; one that EC2 refuses for a reason of its own fails
        nothing else.

        One call for all of them, as a scale-in usually is. If EC2 refuses it for one
        instance (a protected one fails the whole call), one call each. An instance EC2
        will not terminate (termination protection, say) stays round after round;
        failing the round for it would slow every later round to the error backoff and
        hold up scaling in and out alike. Any other error (throttling, say) fails the
        round: calling once per instance would only add to it."""
        if not instance_ids:
            return
        try:
            terminate(self.aws, instance_ids)
            refused: set[str] = set()
        except ClientError as exc:
            if error_code(exc) not in ONE_INSTANCE_ERRORS:
                raise
            refused = {iid for iid in instance_ids if not self._terminate_one(iid, why, clock)}
        for iid in instance_ids:
            if iid not in refused:
                self.recent_launches.forget(iid)
                self.refusals.forget(iid)
                self.recent_terminations.note(iid, clock)

    def _terminate_one(self, iid: str, why: str, clock: float) -> bool:
        try:
            terminate(self.aws, (iid,))
        except ClientError as exc:
            if error_code(exc) not in ONE_INSTANCE_ERRORS:
                raise
            lasting = error_code(exc) in LASTING_REFUSALS
            if self.refusals.note(iid, clock, lasting):
                when = f"each {REFUSAL_RETRY_S:.0f}s" if lasting else "at the next round"
                log.warning("controller: cannot terminate instance %s (%s): %s; it is asked again %s "
                            "while it is not needed, and warned about once", iid, exc, why, when)
            return False
        return True

    def _remember(self, launched: dict[int, str], obs: Observation,
                  unanswered: dict[int, LaunchCall] | None = None) -> None:
        """The launches that were answered, and the calls that got no reply (to repeat)."""
        self.unanswered.note(launched, unanswered or {}, obs.clock)
        self.recent_launches.add(launched, obs.at, obs.clock)
        for iid in launched.values():
            self.readiness.launched(iid, obs.clock)

    def _record(self, obs: Observation, decision: Decision) -> None:
        """The round in the timeline (and the --timeline CSV), and in the log if it is news."""
        pending, running = len(obs.in_state("pending")), len(obs.in_state("running"))
        row = {
            "time": round(obs.at, 3), "visible": obs.visible, "in_flight": obs.in_flight,
            "delayed": obs.delayed, "pending": pending, "running": running,
            "desired": decision.desired, "action": describe_action(decision), "reason": decision.reason,
        }
        self.timeline.append(row)
        if self._timeline_file:
            self._timeline_file.write(row)
        self._log_round(obs, decision, pending, running, row["action"])

    def _log_round(self, obs: Observation, decision: Decision, pending: int, running: int,
                   action: str) -> None:
        summary = (obs.backlog, pending, running, decision.desired, action)
        # Every launch and terminate, and each change of the picture; a stopped instance
        # EC2 will not terminate is cleaned up every round, but logged only once.
        if decision.launch or decision.terminate or summary != self._last_summary:
            log.info(
                "backlog=%d (visible %d, in flight %d, delayed %d) pending=%d running=%d desired=%d "
                "action=%s%s [%s]",
                obs.backlog, obs.visible, obs.in_flight, obs.delayed, pending, running,
                decision.desired, action, " (dry run)" if self.dry_run else "", decision.reason,
            )
        self._last_summary = summary

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Poll until stopped; any error is logged and the round retried with backoff.

        The controller must outlive AWS trouble (throttling that outlasted botocore's
        own retries, timeouts, an endpoint that is briefly down): dying would leave the
        fleet unmanaged, so nothing escapes the loop. Launches that fail (no capacity,
        a quota reached) fail no round: only launches back off (Controller._launch).
        """
        backoff = 0.0
        self.log_settings()
        # Run by systemd with WatchdogSec= (or by make run): started now, and alive for as
        # long as its rounds make progress: it pings at each round and at its AWS requests,
        # once a second at most (each attempt is bounded by botocore's timeouts, where a
        # round of calls retried for minutes each is slow, not hung). One that hangs (a
        # deadlock, a name lookup that never returns) stops pinging and is restarted; a new
        # one adopts the fleet.
        self.aws.on_each_request(self._ping_on_request)
        systemd.notify("READY=1")
        due = time.monotonic()  # when this round was meant to begin
        while not self.stopping.is_set():
            started = time.monotonic()
            if started - due > LATE_ROUND_S:
                log.warning("controller: this round began %.0fs late (this process was stopped, or "
                            "starved of CPU): the fleet followed the queue that much later", started - due)
            self._ping_watchdog()
            try:
                self.step()
                took = time.monotonic() - started
                if took > LATE_ROUND_S:
                    log.warning("controller: this round took %.0fs (AWS slow to answer): the fleet "
                                "followed the queue that much later", took)
                backoff = 0.0
            except Exception as exc:
                # Doubling from at least backoff_min_s: never faster than that while
                # AWS is failing, however short the poll interval.
                backoff = next_wait(backoff, max(self.timings.backoff_min_s, self.settings.poll_interval_s),
                                    self.timings.backoff_max_s)
                # AWS's errors: one warning line each. (A failed launch, LaunchError, ends
                # no round: Controller._launch backs off launches only.)
                if isinstance(exc, AWS_ERRORS):
                    log.warning("controller: %s; next try in %.1fs", exc, backoff)
                else:  # a surprise: keep the traceback, but keep running too
                    log.exception("controller: unexpected error; next try in %.1fs", backoff)
                due = time.monotonic() + backoff
                self._wait(backoff)
                continue
            due = max(time.monotonic(), started + self.settings.poll_interval_s)
            self._wait(due - time.monotonic())
        log.info("controller: stopped (instances are left as they are, for the next controller to adopt; "
                 "make run's stack ends its own)")

    def log_settings(self) -> None:
        """The settings every decision is made with (a --once round's too)."""
        s = self.settings
        # Which queue and fleet, where: a wrong APP_PREFIX or region shows in nothing else.
        where = s.region + (f" at {s.endpoint_url}" if s.endpoint_url else "")
        p = self.policy
        # The mode's own inputs too: the latency mode's are in nothing else logged.
        mode = (f"backlog, {p.target_backlog_per_instance:g} message(s) per instance" if p.mode == "backlog"
                else f"latency, {p.acceptable_latency_s:g}s acceptable, {p.seconds_per_image:g}s an image, "
                     f"{p.boot_time_s:g}s to boot")
        log.info("controller: prefix %s in %s, cap %d, mode %s, poll every %.1fs, scale-in window %gs, "
                 "ready deadline %gs, progress deadline %gs%s", s.prefix, where, p.max_instances, mode,
                 s.poll_interval_s, p.scale_in_cooldown_s, s.ready_deadline_s, s.progress_deadline_s,
                 " (dry run)" if self.dry_run else "")

    def _wait(self, seconds: float) -> None:
        """Wait until the next round or a stop, pinging the watchdog meanwhile if there is one."""
        interval = systemd.watchdog_interval_s()
        deadline = time.monotonic() + seconds
        while not self.stopping.wait(max(0.0, min(deadline - time.monotonic(), interval or seconds))):
            if time.monotonic() >= deadline:
                return
            self._ping_watchdog()

    def _ping_watchdog(self) -> None:
        if systemd.watchdog_interval_s() is not None:
            systemd.ping_watchdog()
            self._pinged_at = time.monotonic()

    def _ping_on_request(self, **_event: object) -> None:
        # A round makes a handful of requests in well under a second: one ping a second
        # is plenty against a watchdog of minutes.
        if time.monotonic() - self._pinged_at >= PING_ON_REQUEST_EVERY_S:
            self._ping_watchdog()

    def install_signal_handlers(self) -> None:
        on_signals(lambda _signum: self.stopping.set())
