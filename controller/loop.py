"""The control loop: observe, decide, act, once a poll interval.

What the fleet is and what it has to do lives in EC2 (instances and their tags) and
SQS (queue depths), observed afresh each round, so a controller that is killed and
started again adopts the fleet it finds. Between rounds it remembers only this, each
in a small dataclass below that says what a restart loses:

(1) ScaleInWindow: how many instances each round of the scale-in window wanted, and
    when this controller began watching;
(2) RecentLaunches: instances it launched in the last few minutes, counted as EC2 last
    listed them whenever its eventually consistent DescribeInstances leaves them out,
    so that a launch is not repeated for the same work;
(3) LaunchHold: when workers last gave up and for how long launches are held after
    it, with the failed instances already seen and those there were when the hold
    began (a later wave lengthens the hold, the same one does not);
(4) ReadinessClock: when it first saw each instance whose worker has not yet said it
    serves, on its own monotonic clock (EC2's launch time would do, but for a
    controller whose clock is off);
(5) Refusals: instances EC2 refused to terminate, kept for last when scaling in;
(6) UnansweredLaunches: launches that got no reply in the last few minutes, repeated
    as they were (same ClientToken) so that EC2 returns the instance it may have started;
(7) LaunchBackoff: when a launch last failed (no capacity, a quota reached), and how
    long launches wait after it;
(8) RecentTerminations: instances it terminated in the last few minutes, taken as
    shutting down while a lagging DescribeInstances still lists them running.
Losing them on restart costs little: a restarted controller keeps what is live for
one window before it scales in, takes the failed instances it finds as new failures,
gives a silent instance a whole READY_DEADLINE again, learns of a protected instance
at its next refusal, and counts an instance it terminated while EC2 still lists it;
only a restart while EC2 does not yet list a launch, or within minutes of a launch
that got no reply, could launch once more, and a failing launch is tried again at once.
Besides, for people only: the last round's log summary and the last TIMELINE_ROUNDS
rounds (Controller.timeline).
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from common import systemd
from common.aws import Aws, error_code
from common.backoff import next_wait
from common.config import Settings
from common.fleet import LIVE_STATES
from common.names import instance_name
from common.signals import on_signals
from controller.act import LaunchCall, LaunchError, launch, render_user_data, terminate
from controller.observe import Instance, Observation, observe, terminated
from controller.policy import Decision, Policy, decide, desired_count

log = logging.getLogger(__name__)

# As long as EC2's DescribeInstances may lag behind a launch: AWS says minutes, even after
# a read that listed it (https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html).
EC2_LAG_S = 300.0
# Long enough for EC2 to list an instance that a call without a reply started.
UNANSWERED_LAUNCH_MEMORY_S = 300.0
# Errors AWS is known to give: one warning line each. (A failed launch, LaunchError, ends
# no round: Controller._act backs off launches only.)
EXPECTED_ERRORS = (BotoCoreError, ClientError)
# EC2's refusals that concern one instance of a TerminateInstances call, not the call.
ONE_INSTANCE_ERRORS = frozenset({
    "OperationNotPermitted", "UnauthorizedOperation", "IncorrectInstanceState",
    "InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed",
})
# Rounds kept in memory (a day at a 1 s poll would be 86,400 of them).
TIMELINE_ROUNDS = 1000
# A round that begins, or takes, this much later than planned is said so: the fleet
# follows the queue that much later, and the log's silence did not say why (reviewer).
LATE_ROUND_S = 5.0
# `reason`: why, as the log says it: `desired` alone can read as under-provisioning
# (15 desired, none launched, for requests all in flight: reviewer).
TIMELINE_FIELDS = ("time", "visible", "in_flight", "delayed", "pending", "running", "desired", "action",
                   "reason")


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


@dataclass
class ScaleInWindow:
    """How many instances each round of the scale-in window wanted, and when this
    controller began watching: the fleet shrinks only to the most wanted at any round of
    the window. Lost on restart, it is rebuilt by watching: until a restarted controller
    has watched a whole window, it counts what is live as wanted, so it scales out, not in."""

    started_at: float | None = None
    # (time, instances wanted) of each round within the window.
    rounds: deque[tuple[float, int]] = field(default_factory=deque)

    def watched(self, at: float, window: float) -> bool:
        """Whether this controller has watched a whole window by `at`."""
        return self.started_at is not None and at - self.started_at >= window

    def record(self, at: float, wanted: int, window: float) -> None:
        """Remembers that the round at `at` wanted `wanted` instances; forgets the rounds
        the `window` no longer needs."""
        if self.started_at is None:
            self.started_at = at
        self.rounds.append((at, wanted))
        # A round's count holds until the next round: keep the one in force when the
        # window began, or polls further apart than the window would shorten it to
        # nothing (and one quiet poll between two requests would end the fleet).
        cutoff = at - window
        while len(self.rounds) > 1 and self.rounds[1][0] <= cutoff:
            self.rounds.popleft()

    def peak(self, at: float, live: int, window: float) -> int:
        """The most instances wanted at any round recorded in the last `window` seconds,
        or `live` if more, before a whole window has been watched."""
        peak = max((count for _, count in self.rounds), default=0)
        return peak if self.watched(at, window) else max(peak, live)


@dataclass
class RecentLaunches:
    """Instances this controller launched in the last EC2_LAG_S, each as EC2
    last listed it (pending until it does): one that a round's eventually consistent
    DescribeInstances leaves out is counted as last seen, so that a launch is not repeated
    for the same work. Kept after EC2 lists it: forgotten then, a read from a replica
    still behind launched the whole fleet again, up to twice the cap (reviewer). Lost on
    restart; a restart while EC2 lags could launch once more."""

    # Each with the monotonic time of its launch; its launched_at is wall time, as EC2's.
    by_id: dict[str, tuple[Instance, float]] = field(default_factory=dict)

    def add(self, launched: dict[int, str], at: float, clock: float) -> None:
        for n, iid in launched.items():
            self.by_id[iid] = (Instance(id=iid, number=n, state="pending", launched_at=at), clock)

    def take_in(self, listed: Mapping[str, Instance], clock: float) -> None:
        """Remembers each as EC2 lists it now; forgets those launched too long ago."""
        self.by_id = {iid: (listed.get(iid, inst), t) for iid, (inst, t) in self.by_id.items()
                      if clock - t < EC2_LAG_S}

    def unlisted(self, listed: Mapping[str, Instance]) -> tuple[Instance, ...]:
        """Those EC2 does not list now, as it last did."""
        return tuple(inst for iid, (inst, _) in self.by_id.items() if iid not in listed)

    def take_listed(self, instance: Instance, clock: float) -> None:
        """Remembers a launch whose call got no reply, as EC2 now lists it."""
        self.by_id[instance.id] = (instance, clock)

    def instances(self) -> tuple[Instance, ...]:
        return tuple(inst for inst, _ in self.by_id.values())

    def forget(self, iid: str) -> None:
        self.by_id.pop(iid, None)


@dataclass
class UnansweredLaunches:
    """Launch calls that got no reply (botocore's retries spent) in the last
    UNANSWERED_LAUNCH_MEMORY_S: each may have started its instance, which EC2 does not list
    yet, so its number looks free. The next launch of that number repeats the call, with
    its ClientToken, so that EC2 returns that instance rather than start a second of the
    same name. Lost on restart, a restart within those minutes could launch it twice."""

    by_number: dict[int, tuple[LaunchCall, float]] = field(default_factory=dict)

    def calls(self) -> dict[int, LaunchCall]:
        """The calls to repeat, by instance number."""
        return {n: call for n, (call, _) in self.by_number.items()}

    def keep_unlisted(self, listed: set[int], at: float) -> None:
        """Forgets the calls made too long before `at`, and the numbers EC2 lists an
        instance of: the call started it, or another did. Kept, the call was repeated at
        that number's next launch, after its instance had gone: EC2 then answers with the
        terminated one (reviewer)."""
        self.by_number = {n: (call, t) for n, (call, t) in self.by_number.items()
                          if n not in listed and at - t < UNANSWERED_LAUNCH_MEMORY_S}

    def note(self, answered: dict[int, str], unanswered: dict[int, LaunchCall], at: float) -> None:
        for n in answered:
            self.by_number.pop(n, None)
        for n, call in unanswered.items():
            self.by_number[n] = (call, at)


@dataclass
class LaunchHold:
    """Workers that gave up, and for how long launches are held after it: a replacement
    would most likely give up too, so launches wait, as Kubernetes backs off a crash-looping
    container. Lost on restart, it is rebuilt from the failed instances EC2 still lists:
    all are new to a restarted controller, which holds for the shortest hold from then
    (a hold doubled by earlier waves is forgotten)."""

    hold_s: float = 0.0
    last_failure_at: float = float("-inf")
    # The failed instances of the last round: a failure is new if it was not among them.
    failed_seen: set[str] = field(default_factory=set)
    # Instances there were when the hold last began: failures among them are of the same
    # wave, and do not lengthen the hold; only a replacement that fails again does.
    present_at_failure: set[str] = field(default_factory=set)

    def note_failures(self, obs: Observation, min_s: float, max_s: float, quiet_s: float) -> list[Instance]:
        """Takes in this round's failed instances; returns those that failed since the last.
        The hold is min_s once an instance launched since it began serves, or after
        `quiet_s` without a failure; else doubled (at most max_s) by a new wave."""
        # Reset on evidence of health: an instance that never serves is given up on only
        # READY_DEADLINE after its launch (a worker that never receives, STALL_TIMEOUT
        # after), so the waves of a fleet that cannot serve come that far apart, and a
        # quiet of max_s reset the hold for each. A replacement serving shows that
        # launching works again; the quiet, longer than any such wave's gap, is for
        # workers that never say they serve (no worker-ready tags, READY_DEADLINE=0),
        # whose hold otherwise only grew, up to max_s for any one failure (reviewer).
        healthy = any(i.ready and i.id not in self.present_at_failure for i in obs.serving)
        if healthy or obs.clock - self.last_failure_at > quiet_s:
            self.hold_s = 0.0
        failed = {i.id: i for i in obs.instances if i.worker_failed}
        new = [i for iid, i in failed.items() if iid not in self.failed_seen]
        self.failed_seen = set(failed)
        if new:
            if not self.hold_s:
                self.hold_s = min_s
                self.present_at_failure = {i.id for i in obs.instances}
            elif any(i.id not in self.present_at_failure for i in new):
                self.hold_s = min(self.hold_s * 2, max_s)
                self.present_at_failure = {i.id for i in obs.instances}
            self.last_failure_at = obs.clock
        return new

    def holds(self, clock: float) -> bool:
        return clock - self.last_failure_at < self.hold_s


@dataclass
class LaunchBackoff:
    """After a launch failed (no capacity in any subnet, a quota reached, throttling), how
    long launches wait: each would most likely fail too. Only launches wait: the round goes
    on, so that terminations and clean-ups keep the poll interval (scale-in to zero
    within seconds) rather than the loop's error backoff. Lost on restart, a restarted
    controller tries at once, and backs off from the shortest wait again."""

    wait_s: float = 0.0
    failed_at: float = float("-inf")

    def failed(self, clock: float, min_s: float, max_s: float) -> float:
        """Notes a failure at `clock`; returns how long launches now wait (doubled, at
        least min_s, at most max_s)."""
        self.wait_s = next_wait(self.wait_s, min_s, max_s)
        self.failed_at = clock
        return self.wait_s

    def succeeded(self) -> None:
        self.wait_s = 0.0

    def remaining(self, clock: float) -> float:
        """Seconds until launches may be tried again (0: now)."""
        return max(0.0, self.failed_at + self.wait_s - clock)


@dataclass
class ReadinessClock:
    """When this controller first saw each live instance whose worker has not yet said it
    serves, on its own monotonic clock (EC2's launch time would do, but for a controller
    whose clock is off, and a step of the wall clock would fail them all at once): one
    silent for READY_DEADLINE is counted as failed. Lost on restart, it starts
    again: a restarted controller gives each silent instance a whole READY_DEADLINE again."""

    first_seen: dict[str, float] = field(default_factory=dict)

    def watch(self, silent: list[str], at: float) -> None:
        """Keeps to the instances silent now, seen first at `at` unless seen before."""
        self.first_seen = {iid: self.first_seen.get(iid, at) for iid in silent}

    def launched(self, iid: str, at: float) -> None:
        self.first_seen[iid] = at

    def silent_for(self, iid: str, at: float) -> float:
        return at - self.first_seen[iid]


@dataclass
class RecentTerminations:
    """Instances this controller had terminated in the last EC2_LAG_S: one that a lagging
    DescribeInstances still lists as pending or running is taken as shutting down, as it
    is. Counted as live, it held back a round's launches, and the next round blamed
    "someone else" for its end (reviewer). Lost on restart, such an instance may be
    counted for a round or two."""

    by_id: dict[str, float] = field(default_factory=dict)  # the monotonic time of the call

    def note(self, iid: str, clock: float) -> None:
        self.by_id[iid] = clock

    def forget_old(self, clock: float) -> None:
        """Forgets those terminated too long before `clock` for a read to lag behind."""
        self.by_id = {iid: t for iid, t in self.by_id.items() if clock - t < EC2_LAG_S}

    def applied(self, obs: Observation) -> Observation:
        """The observation with those still listed live shown shutting down."""
        if not any(i.id in self.by_id for i in obs.live):
            return obs
        return replace(obs, instances=tuple(
            replace(i, state="shutting-down") if i.id in self.by_id and i.state in LIVE_STATES else i
            for i in obs.instances))


@dataclass
class Refusals:
    """Instances EC2 refused to terminate (termination protection, say): each warned about
    once, and the last chosen to scale in, so that the others go instead. Lost on restart,
    each is learnt again at its next refusal, and warned about once more."""

    ids: set[str] = field(default_factory=set)

    def note(self, iid: str) -> bool:
        """Remembers a refusal; whether it is the first for that instance."""
        first = iid not in self.ids
        self.ids.add(iid)
        return first

    def forget(self, iid: str) -> None:
        self.ids.discard(iid)

    def keep_listed(self, listed: set[str]) -> None:
        """Forgets those EC2 no longer lists (terminated another way): what is kept must
        be what an observation can still confirm."""
        self.ids &= listed


@dataclass
class Controller:
    """Observes, decides and acts, a round each poll interval (`run`, `step`)."""

    settings: Settings
    aws: Aws
    dry_run: bool = False
    timeline_path: Path | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    # --- tunables (Settings holds the rest) --------------------------------------------
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

    policy: Policy = field(init=False)  # from settings

    # --- memory between rounds: all of it may be lost (see the module docstring) -------
    scale_in_window: ScaleInWindow = field(default_factory=ScaleInWindow, init=False)
    recent_launches: RecentLaunches = field(default_factory=RecentLaunches, init=False)
    launch_hold: LaunchHold = field(default_factory=LaunchHold, init=False)
    readiness: ReadinessClock = field(default_factory=ReadinessClock, init=False)
    refusals: Refusals = field(default_factory=Refusals, init=False)
    recent_terminations: RecentTerminations = field(default_factory=RecentTerminations, init=False)
    unanswered: UnansweredLaunches = field(default_factory=UnansweredLaunches, init=False)
    launch_backoff: LaunchBackoff = field(default_factory=LaunchBackoff, init=False)
    # For people only, never for deciding: the last round's log summary (a round that
    # changes nothing is not logged again), and the last rounds, for tests and a look
    # in a debugger (--timeline keeps them all on disk).
    _last_summary: tuple | None = field(default=None, init=False)
    # Live after the last round, less what it terminated: one gone by the next was ended
    # by someone else, said so (a hand, EC2 itself), where the log only launched again.
    _live_after_last_round: frozenset[str] = field(default=frozenset(), init=False)
    _timeline_failed: bool = field(default=False, init=False)  # warned about once
    timeline: deque[dict] = field(default_factory=lambda: deque(maxlen=TIMELINE_ROUNDS))

    def __post_init__(self) -> None:
        self.policy = Policy.from_settings(self.settings)
        render_user_data(self.settings)  # fail at start, not at the first launch
        if self.timeline_path:
            # Added to, not written over: a controller restarted (systemd, its watchdog)
            # had erased the rounds before it, those an operator wants after a crash
            # (reviewer). A file of other columns is started afresh.
            try:
                with self.timeline_path.open(newline="") as fh:
                    first = next(csv.reader(fh), None)
            except FileNotFoundError:
                first = None
            if first != list(TIMELINE_FIELDS):
                with self.timeline_path.open("w", newline="") as fh:
                    csv.writer(fh).writerow(TIMELINE_FIELDS)

    # --- one round -----------------------------------------------------------------
    def step(self, now: float | None = None) -> Decision:
        # Observe: what EC2 and SQS show, with what only this controller has seen (its
        # launches EC2 does not list yet, how long an instance has gone unready).
        began = time.monotonic()

        def clock() -> float:
            """The round's clock now: monotonic time, or a test's `now` moved on since then."""
            return time.monotonic() if now is None else now + (time.monotonic() - began)

        obs = self._with_recent_launches(observe(self.aws, now))
        self.recent_terminations.forget_old(obs.clock)
        obs = self._with_readiness(self.recent_terminations.applied(obs))
        self._take_in_what_others_ended(obs)
        self.refusals.keep_listed({i.id for i in obs.instances})
        # Remember what the next rounds need of this one: the scale-in window's counts,
        # and workers giving up (the launch hold). Both update this controller's memory.
        wanted_recently = self._wanted_recently(obs)
        launches_held = self._launches_held(obs)
        # Decide, with a pure function of all that; then act.
        watched = self.scale_in_window.watched(obs.clock, self.policy.scale_in_cooldown_s)
        decision = decide(obs, self.policy, wanted_recently, launches_held,
                          keep_last=frozenset(self.refusals.ids),
                          launch_wait_s=self.launch_backoff.remaining(obs.clock), window_watched=watched,
                          unanswered=frozenset(self.unanswered.calls()))
        self._record(obs, decision)
        acting = decision.changes_anything and not self.dry_run
        try:
            if acting:
                self._act(decision, obs, clock)
        finally:
            # Those it asked to end are its own doing, whether or not the answer came (a
            # round failed after its terminations took effect blamed "someone": reviewer).
            asked_to_end = {*decision.terminate, *decision.clean_up} if acting else set()
            # This round's launches among them (EC2 listed none of them yet).
            launched = {i.id for i in self.recent_launches.instances() if i.state in LIVE_STATES}
            self._live_after_last_round = frozenset({i.id for i in obs.live} | launched) - asked_to_end
        return decision

    def _take_in_what_others_ended(self, obs: Observation) -> None:
        """Instances live after the last round and not now, ended by someone else: said,
        and those ending remembered (RecentTerminations)."""
        gone = sorted(self._live_after_last_round - {i.id for i in obs.live})
        if gone:
            # Those ending are remembered as this controller's own terminations are: a
            # later read still listing one running had it stand in for its replacement,
            # which was scaled in (reviewer). Only those EC2 lists ending (shutting down,
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

    def _wanted_recently(self, obs: Observation) -> int | None:
        """Records what this round wants; returns the most instances wanted at any round
        of the last scale_in_cooldown_s (None without a window). A controller that has not
        yet watched for a whole window (it has just been restarted) counts what is live as
        wanted: it scales out, not in."""
        window = self.policy.scale_in_cooldown_s
        if window <= 0:
            return None
        self.scale_in_window.record(obs.clock, desired_count(obs, self.policy)[0], window)
        return self.scale_in_window.peak(obs.clock, len(obs.live), window)

    def _with_readiness(self, obs: Observation) -> Observation:
        """The observation, with each instance watched for READY_DEADLINE without its
        worker saying it serves counted as failed: it never will (see common/fleet.py)."""
        deadline = self.settings.ready_deadline_s
        silent = [i for i in obs.live if not i.ready and not i.worker_failed]
        self.readiness.watch([i.id for i in silent], obs.clock)
        if deadline <= 0:
            return obs
        overdue = {i.id for i in silent if self.readiness.silent_for(i.id, obs.clock) > deadline}
        if not overdue:
            return obs
        reason = f"not serving {deadline:g}s after it was first seen"
        return replace(obs, instances=tuple(replace(i, worker_failed=reason) if i.id in overdue else i
                                            for i in obs.instances))

    def _launches_held(self, obs: Observation) -> bool:
        """Whether workers gave up recently enough that launching more is held."""
        hold = self.launch_hold
        # Quiet for longer than a wave of instances that never serve takes to fail again.
        slowest_wave = max(self.settings.ready_deadline_s, self.settings.stall_timeout_s)
        quiet_s = 2 * self.failure_hold_max_s + slowest_wave
        new = hold.note_failures(obs, self.failure_hold_min_s, self.failure_hold_max_s, quiet_s)
        if new:
            log.error(
                "controller: %d worker(s) gave up: %s; their instances are %s, and "
                "launches held for %.0fs (see the worker's log, and ami/README.md)", len(new),
                ", ".join(f"{instance_name(i.number)} ({i.id}): {i.worker_failed}" for i in new),
                "left (dry run)" if self.dry_run else "terminated", hold.hold_s,
            )
        return hold.holds(obs.clock)

    def _with_recent_launches(self, obs: Observation) -> Observation:
        # A launch that got no reply, now listed, is remembered as answered ones are:
        # forgotten once listed, a later read lagging behind left it out, and its number
        # was launched again, a second instance of one name (simulated).
        unanswered = self.unanswered.calls()
        for instance in obs.instances:
            if instance.number in unanswered:
                self.recent_launches.take_listed(instance, obs.clock)
        self.unanswered.keep_unlisted({i.number for i in obs.instances}, obs.clock)
        recent, listed = self.recent_launches, {i.id: i for i in obs.instances}
        recent.take_in(listed, obs.clock)
        unlisted = recent.unlisted(listed)
        if not unlisted:
            return obs
        # One that went straight to terminated (no capacity, a volume it could not
        # encrypt, a hand), or has ended since, is not listed in a watched state: counted
        # until the memory ran out, it held up its replacement and stood in for a
        # scale-in victim.
        ended = terminated(self.aws, [i.id for i in unlisted])
        for iid in ended:
            recent.forget(iid)
        return replace(obs, instances=obs.instances + tuple(i for i in unlisted if i.id not in ended))

    def _act(self, decision: Decision, obs: Observation, clock: Callable[[], float]) -> None:
        """Carries the decision out; `clock()` is the round's clock (obs.clock's) now."""
        # Terminations first: they are what a scale-in waits on, and launches can take
        # long (botocore retrying RunInstances).
        self._terminate(decision.terminate, "the fleet no longer needs it", obs.clock)
        self._terminate(decision.clean_up, "it serves nobody (stopped, or its worker gave up)", obs.clock)
        if decision.launch:
            try:
                ids = launch(self.aws, self.settings, decision.launch, self.unanswered.calls())
            except LaunchError as exc:
                # Not raised: failing the round would slow every round, scale-in too, to
                # the loop's error backoff for as long as capacity or the quota is short.
                self._remember(exc.launched, obs, exc.unanswered)
                # Timed from now: a launch can fail slowly (botocore retrying RunInstances
                # for seconds), and timed from the observation, the wait had passed before
                # the call returned; timed from before it, a slow SQS lengthened it.
                failed_at = clock()
                wait = self.launch_backoff.failed(failed_at, self.launch_backoff_min_s,
                                                  self.launch_backoff_max_s)
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
        round as before: calling once per instance would only add to it."""
        if not instance_ids:
            return
        try:
            terminate(self.aws, instance_ids)
            refused: set[str] = set()
        except ClientError as exc:
            if error_code(exc) not in ONE_INSTANCE_ERRORS:
                raise
            refused = {iid for iid in instance_ids if not self._terminate_one(iid, why)}
        for iid in instance_ids:
            if iid not in refused:
                self.recent_launches.forget(iid)
                self.refusals.forget(iid)
                self.recent_terminations.note(iid, clock)

    def _terminate_one(self, iid: str, why: str) -> bool:
        try:
            terminate(self.aws, (iid,))
        except ClientError as exc:
            if error_code(exc) not in ONE_INSTANCE_ERRORS:
                raise
            if self.refusals.note(iid):
                log.warning("controller: cannot terminate instance %s (%s): %s; it is tried "
                            "again while it is not needed, and warned about once", iid, exc, why)
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
        if self.timeline_path:
            self._write_timeline(row)
        self._log_round(obs, decision, pending, running, row["action"])

    def _write_timeline(self, row: dict) -> None:
        """A row on disk, for people only: a disk full or gone is warned about once, and
        tried again each round, but never fails the round, which would stop the acting."""
        try:
            with self.timeline_path.open("a", newline="") as fh:
                csv.writer(fh).writerow([row[k] for k in TIMELINE_FIELDS])
        except OSError as exc:
            if not self._timeline_failed:
                log.warning("controller: cannot write the timeline (%s); the fleet is managed "
                            "all the same", exc)
            self._timeline_failed = True

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
        a quota reached) fail no round: only launches back off (Controller._act).
        """
        backoff = 0.0
        self.log_settings()
        # Run by systemd with WatchdogSec= (or by make run): started now, and alive for as
        # long as its rounds end. One that hangs (a deadlock, a call that never returns)
        # stops pinging and is restarted; a new controller adopts the fleet.
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
                backoff = next_wait(backoff, max(self.backoff_min_s, self.settings.poll_interval_s),
                                    self.backoff_max_s)
                if isinstance(exc, EXPECTED_ERRORS):
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
        """The settings every decision is made with (a --once round's too: reviewer)."""
        s = self.settings
        # Which queue and fleet, where: a wrong APP_PREFIX or region showed in nothing here.
        where = s.region + (f" at {s.endpoint_url}" if s.endpoint_url else "")
        p = self.policy
        # The mode's own inputs too: the latency mode's were in nothing logged (reviewer).
        mode = (f"backlog, {p.target_backlog_per_instance:g} message(s) per instance" if p.mode == "backlog"
                else f"latency, {p.acceptable_latency_s:g}s acceptable, {p.seconds_per_image:g}s an image, "
                     f"{p.boot_time_s:g}s to boot")
        log.info("controller: prefix %s in %s, cap %d, mode %s, poll every %.1fs, scale-in window %gs, "
                 "ready deadline %gs%s", s.prefix, where, p.max_instances, mode, s.poll_interval_s,
                 p.scale_in_cooldown_s, s.ready_deadline_s, " (dry run)" if self.dry_run else "")

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
            systemd.notify("WATCHDOG=1")

    def install_signal_handlers(self) -> None:
        on_signals(lambda _signum: self.stopping.set())
