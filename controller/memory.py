"""What the controller remembers between rounds, and the snapshot of it decide() reads.

What the fleet is and what it has to do lives in EC2 (instances and their tags) and
SQS (queue depths), observed afresh each round, so a controller that is killed and
started again adopts the fleet it finds. Between rounds it remembers only this, each
in a small dataclass below that says what a restart loses:

(1) ScaleInWindow: how many instances each round of the scale-in window wanted, and
    when this controller began watching;
(2) RecentLaunches: instances it launched in the last few minutes, counted as EC2 last
    listed them whenever its eventually consistent DescribeInstances leaves them out,
    so that a launch is not repeated for the same work;
(3) UnansweredLaunches: launches that got no reply in the last few minutes, repeated
    as they were (same ClientToken) so that EC2 returns the instance it may have started;
(4) LaunchHold: when workers last gave up and for how long launches are held after
    it, with the failed instances already seen and those there were when the hold
    began (a later wave lengthens the hold, the same one does not);
(5) LaunchBackoff: when a launch last failed (no capacity, a quota reached), and how
    long launches wait after it;
(6) ReadinessClock: since when each instance whose worker has not yet said it serves
    has been silent, on its own monotonic clock, from its launch call or from EC2's
    age of the instance when it first saw it (not EC2's launch time against its own
    wall clock, which may be off);
(7) RecentTerminations: instances it terminated in the last few minutes, taken as
    shutting down while a lagging DescribeInstances still lists them running;
(8) Refusals: instances EC2 refused to terminate, those refused for good kept for last
    when scaling in.
(9) ProgressWatch: since when requests have waited visible with none in flight while
    instances whose workers said they serve run, and the instances counted as not
    receiving for it.
Losing them on restart costs little: a restarted controller keeps what is live for
one window before it scales in, takes the failed instances it finds as new failures,
times a silent instance from its launch by EC2's clock (from when it first sees it if
EC2's reply gives no time), learns of a protected instance at its next refusal, and
counts an instance it terminated while EC2 still lists it, and times requests waiting
untaken from its first round;
only a restart while EC2 does not yet list a launch, or within minutes of a launch
that got no reply, could launch once more, and a failing launch is tried again at once.

The loop (controller/loop.py) updates them as it observes and acts. decide()
(controller/policy.py) reads none of them: each round it is given a RoundMemory, a
frozen snapshot of what they say, so that it stays a pure function of its inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from common.backoff import next_wait
from common.fleet import LIVE_STATES
from controller.act import LaunchCall
from controller.observe import Instance, Observation

# As long as EC2's DescribeInstances may lag behind a launch: AWS says minutes, even after
# a read that listed it (https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html).
EC2_LAG_S = 300.0
# Long enough for EC2 to list an instance that a call without a reply started.
UNANSWERED_LAUNCH_MEMORY_S = 300.0
# ProgressWatch: at most 16 deadlines (32 minutes at the default 120 s) between counts
# while nothing is received. A 20-minute outage of the workers' receives then costs 3
# instances (counted at 2, 6 and 14 minutes), not 10.
PROGRESS_DEADLINE_DOUBLINGS = 4
# How long an instance EC2 refused to terminate is left before it is asked again (Refusals).
REFUSAL_RETRY_S = 60.0


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
    still behind would launch the whole fleet again, up to twice the cap. Lost on
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

    def keep_unlisted(self, listed: Iterable[Instance], at: float) -> None:
        """Forgets the calls made too long before `at`, and those whose instance EC2
        lists (started_by): once listed, its instance is counted as any listed one is, and
        there is nothing left to repeat."""
        listed = list(listed)
        self.by_number = {n: (call, t) for n, (call, t) in self.by_number.items()
                          if at - t < UNANSWERED_LAUNCH_MEMORY_S
                          and not any(started_by(call, n, i) for i in listed)}

    def forget(self, numbers: Iterable[int]) -> None:
        """Forgets the calls of these numbers: EC2 refused them as their instances',
        terminated (act.py _run_again_or_anew), so there is nothing left to repeat."""
        for n in numbers:
            self.by_number.pop(n, None)

    def note(self, answered: dict[int, str], unanswered: dict[int, LaunchCall], at: float) -> None:
        for n in answered:
            self.by_number.pop(n, None)
        for n, call in unanswered.items():
            self.by_number[n] = (call, at)


def started_by(call: LaunchCall, number: int, instance: Instance) -> bool:
    """Whether `instance` is the one the launch `call` of `number` started: its ClientToken
    says so. Not any instance of the number: a lagging read listing an earlier one,
    shutting down, would have the call forgotten, and its instance, unlisted, launched
    beside: over the cap, and later a second of its name (simulated). One listed with no
    token (launched by hand) is taken for it by its number alone."""
    if instance.number != number:
        return False
    return not instance.client_token or instance.client_token == call.token


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
        # quiet of max_s would reset the hold for each. A replacement serving shows that
        # launching works again; the quiet, longer than any such wave's gap, is for
        # workers that never say they serve (no worker-ready tags, READY_DEADLINE=0),
        # whose hold otherwise only grows, up to max_s for any one failure.
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

    def trial_launches(self, obs: Observation) -> int | None:
        """How many instances this round may launch once the hold has run out, until a
        replacement serves (None: as many as the work wants): none while one launched
        since the last wave is still live, neither serving nor given up; else one. So
        a fleet that cannot serve (a bad AMI or weights path) costs an instance a hold,
        not a whole backlog's wave each time (the cap's, 15, every 5 minutes)."""
        if not self.hold_s:
            return None
        on_trial = any(i.id not in self.present_at_failure for i in obs.serving)
        return 0 if on_trial else 1


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
    """Since when each live instance whose worker has not yet said it serves has been
    silent, on this controller's monotonic clock: from its launch call for one it launched;
    for one it first sees launched (after a restart, or by another), from its age on EC2's
    own clock then (Instance.age_s). Not EC2's LaunchTime against the controller's wall
    clock: a controller whose clock is off would misjudge every age, and a step of the wall
    clock would fail them all at once. One silent for READY_DEADLINE is counted as failed.
    Lost on restart, it is rebuilt from EC2's ages; without them (EC2 sent no Date), a
    restarted controller gives each silent instance a whole READY_DEADLINE again."""

    first_seen: dict[str, float] = field(default_factory=dict)

    def watch(self, silent: Mapping[str, float], at: float) -> None:
        """Keeps to the instances silent now (id: age on EC2's clock, see Instance.age_s);
        one not seen before is taken as launched `age` before `at`."""
        self.first_seen = {iid: self.first_seen.get(iid, at - age) for iid, age in silent.items()}

    def launched(self, iid: str, at: float) -> None:
        self.first_seen[iid] = at

    def silent_for(self, iid: str, at: float) -> float:
        return at - self.first_seen[iid]


@dataclass
class RecentTerminations:
    """Instances this controller had terminated in the last EC2_LAG_S: one that a lagging
    DescribeInstances still lists as pending or running is taken as shutting down, as it
    is. Counted as live, it would hold back a round's launches, and the next round blame
    "someone else" for its end. Lost on restart, such an instance may be
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
    """Instances EC2 refused to terminate, each warned about once. One refused for good
    (termination protection, say) is the last chosen to scale in, so that the others go
    instead, and tried again only REFUSAL_RETRY_S after its last refusal: else it makes a
    call and a log line every round, 86,400 a day at a 1 s poll. One refused for a moment
    (EC2 not listing a new instance yet) keeps its place and is asked again at the next
    round: put last, that new, idle instance was kept while busy ones went in its place.
    Lost on restart, each is learnt again at its next refusal, and warned about once more."""

    # id -> the round's clock at its last refusal; None for a refusal that may pass at the
    # next round (EC2 not listing a new instance yet), which is asked again at once.
    refused_at: dict[str, float | None] = field(default_factory=dict)

    @property
    def ids(self) -> set[str]:
        return set(self.refused_at)

    @property
    def lasting(self) -> frozenset[str]:
        """Those refused for good, as far as anyone knows: scaled in only after every other."""
        return frozenset(iid for iid, at in self.refused_at.items() if at is not None)

    def note(self, iid: str, clock: float, lasting: bool) -> bool:
        """Remembers a refusal at `clock` (`lasting`: one the next round would get too);
        whether it is the first for that instance."""
        first = iid not in self.refused_at
        self.refused_at[iid] = clock if lasting else None
        return first

    def forget(self, iid: str) -> None:
        self.refused_at.pop(iid, None)

    def keep_listed(self, listed: set[str]) -> None:
        """Forgets those EC2 no longer lists (terminated another way): what is kept must
        be what an observation can still confirm."""
        self.refused_at = {iid: at for iid, at in self.refused_at.items() if iid in listed}

    def resting(self, clock: float) -> frozenset[str]:
        """Those refused less than REFUSAL_RETRY_S ago: not to be asked again yet."""
        return frozenset(iid for iid, at in self.refused_at.items()
                         if at is not None and clock - at < REFUSAL_RETRY_S)


@dataclass
class ProgressWatch:
    """Since when, on this controller's monotonic clock, requests have waited visible with
    none in flight while instances whose workers said they serve run, and the instances
    counted as not receiving for it (id: why), until EC2 no longer lists them. A working
    worker long-polls the queue, and takes a visible request within its poll; its ready
    tag stays whatever befalls it after. Counted, one is failed in the observation
    (Observation.failed) as a READY_DEADLINE one is: terminated, and replaced after the
    launch hold. Each one counted with no request seen in flight since doubles the next
    wait (up to PROGRESS_DEADLINE_DOUBLINGS times): receives failing for AWS's or the
    network's fault (an SQS outage, a broken endpoint or NAT in the workers' subnet,
    GetQueueAttributes still answered) look the same, and a fleet counted one every
    deadline would be replaced whole after every outage, which the worker itself never
    gives up on. Lost on restart, the wait is timed from the restarted controller's first
    round, at the deadline. An instance counted stays counted while EC2 lists it (one
    EC2 refused to terminate too)."""

    waiting_since: float | None = None
    counted: dict[str, str] = field(default_factory=dict)
    counted_without_progress: int = 0
    last_look: float | None = None  # the clock of the last round that looked (waited)

    def deadline(self, base_s: float) -> float:
        """The wait before the next count: `base_s` (PROGRESS_DEADLINE), doubled for each
        counted since a request was last seen in flight."""
        return base_s * 2 ** min(self.counted_without_progress, PROGRESS_DEADLINE_DOUBLINGS)

    def progressed(self, in_flight: int) -> None:
        """Takes in the requests in flight now: any says a worker receives."""
        if in_flight > 0:
            self.counted_without_progress = 0

    def waited(self, waiting: bool, clock: float, longest_gap_s: float) -> float:
        """Takes in whether requests wait untaken now (at `clock`); returns for how long
        they have, without a break (0: not waiting). Looks more than `longest_gap_s` apart
        (rounds that failed: AWS throttling or out of reach; a controller paused) are a
        break too: unwatched, the workers may have taken and answered many requests, and
        two looks that each saw one waiting had a healthy instance counted."""
        unwatched = self.last_look is not None and clock - self.last_look > longest_gap_s
        self.last_look = clock
        if not waiting:
            self.waiting_since = None
            return 0.0
        if self.waiting_since is None or unwatched:
            self.waiting_since = clock
        return clock - self.waiting_since

    def count(self, iid: str, why: str, clock: float) -> None:
        """Counts `iid` as not receiving; the next is counted only a whole deadline on, as
        its replacement (or the others) may well be receiving by then."""
        self.counted[iid] = why
        self.waiting_since = clock
        self.counted_without_progress += 1

    def keep_listed(self, listed: set[str]) -> None:
        """Forgets those EC2 no longer lists (ended)."""
        self.counted = {iid: why for iid, why in self.counted.items() if iid in listed}


@dataclass(frozen=True)
class RoundMemory:
    """What decide() reads of the memory above, taken once a round (Controller.step).
    Frozen, so that a decision is a function of the observation, the policy and this
    alone. The defaults hold nothing back: no scale-in window, no hold, no refusal."""

    # The most instances wanted at any round of the last scale_in_cooldown_s (None: no
    # window): the fleet shrinks no lower (ScaleInWindow.peak).
    wanted_recently: int | None = None
    # Whether wanted_recently comes from a whole window of rounds, or counts what is live
    # as wanted (a controller started less than a window ago: ScaleInWindow.watched).
    window_watched: bool = True
    # Launch nothing this round: workers have been giving up (LaunchHold).
    launches_held: bool = False
    # Launch no more than this many this round (None: no limit): after such a hold, one
    # replacement at a time until one serves (LaunchHold.trial_launches).
    launch_at_most: int | None = None
    # Launch nothing for this long yet: the last launch failed (LaunchBackoff).
    launch_wait_s: float = 0.0
    # Ids chosen to scale in only after every other: EC2 refused to terminate them for
    # good, not for a moment (Refusals.lasting).
    keep_last: frozenset[str] = frozenset()
    # Of those, the ones not chosen at all this round: refused too recently (Refusals.resting).
    resting: frozenset[str] = frozenset()
    # Numbers whose launch got no reply, launched first when launching (UnansweredLaunches).
    unanswered: frozenset[int] = frozenset()


# decide()'s memory when it is given none (as in its tests): nothing held back.
NOTHING_REMEMBERED = RoundMemory()
