"""Decide: a pure function from an observation and the policy to an action.

Two ways to size the fleet:

backlog (default)
    desired = min(cap, ceil(backlog / target_backlog_per_instance)), where
    backlog = visible + in-flight + delayed messages. Counting in-flight
    messages keeps the fleet from shrinking while requests are worked on (an
    instance removed finishes its batch in hand and hands the rest back).
    Launches are only for visible and delayed messages, though: a new instance
    cannot take one a worker holds. With the defaults (target 1, cap 15), any
    backlog of 15 or more asks for 15.

latency
    AWS's "backlog per instance" target tracking: an instance can hold
    acceptable_latency / seconds_per_image messages and still answer in time,
    so that is its target backlog. And when the instances already running
    would finish the whole backlog before a new one could boot, launching one
    helps nobody, so none is launched.

Only instances that serve count towards the fleet: one whose worker has
given up (it tagged its instance, see common/fleet.py) is cleaned up and
replaced, unless the loop holds launches because workers keep giving up; after
such a hold, one replacement at a time until one serves (RoundMemory.launch_at_most).

Either way the cap is never exceeded (pending instances, and failed ones until
they are gone, count). Scaling out
is immediate; scaling in is not: the fleet shrinks only to the most instances
wanted at any round of the last scale_in_cooldown_s (as Kubernetes' scale-down
stabilisation window does), so a backlog that dips for a moment, or SQS's
approximate counts reading low once, does not terminate instances that are
launched again a round later. Every instance goes once the backlog has been
zero for the whole window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import SCALING_MODES, Settings
from common.fleet import Instance, scale_in_order
from controller.memory import NOTHING_REMEMBERED, RoundMemory
from controller.observe import Observation

# Each Policy field and the Settings field it comes from (Policy.from_settings). A test
# checks every field is here: one missing would keep its default whatever is set.
POLICY_SETTINGS = {
    "max_instances": "max_instances",
    "mode": "scaling_mode",
    "target_backlog_per_instance": "target_backlog_per_instance",
    "acceptable_latency_s": "acceptable_latency_s",
    "seconds_per_image": "seconds_per_image",
    "boot_time_s": "boot_time_s",
    "scale_in_cooldown_s": "scale_in_cooldown_s",
    "image_id": "ami_id",
}

# How long after its launch a running instance whose worker has not said it serves is
# taken for one still booting, in BOOT_TIMEs (see _launches).
BOOTING_FOR_BOOT_TIMES = 2


@dataclass(frozen=True)
class Policy:
    """The settings decide() reads; defaults as Settings'."""

    max_instances: int = Settings.max_instances
    mode: str = Settings.scaling_mode
    target_backlog_per_instance: float = Settings.target_backlog_per_instance
    acceptable_latency_s: float = Settings.acceptable_latency_s
    seconds_per_image: float = Settings.seconds_per_image
    boot_time_s: float = Settings.boot_time_s
    scale_in_cooldown_s: float = Settings.scale_in_cooldown_s
    image_id: str = Settings.ami_id  # what launches run: instances of another go first at scale-in

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(**{name: getattr(settings, setting) for name, setting in POLICY_SETTINGS.items()})

    def __post_init__(self) -> None:
        if self.mode not in SCALING_MODES:
            raise ValueError(f"scaling mode must be one of {SCALING_MODES}, got {self.mode!r}")
        if self.max_instances < 0:
            raise ValueError("max_instances must be 0 or more")
        if self.target_backlog_per_instance <= 0:
            raise ValueError("target backlog per instance must be positive")


def _outdated(instance: Instance, policy: Policy) -> bool:
    """Whether it runs another image than launches do (not known: not outdated)."""
    return bool(instance.image_id) and instance.image_id != policy.image_id


@dataclass(frozen=True)
class Decision:
    """What decide() wants done this round, and why (`reason`, logged)."""

    desired: int
    launch: tuple[int, ...] = ()  # instance numbers n of app-tier-instance-<n> to launch
    terminate: tuple[str, ...] = ()  # ids of live instances the fleet no longer needs
    # ids of ours that serve nobody: stopped, or live with a worker that gave up
    clean_up: tuple[str, ...] = ()
    reason: str = ""

    @property
    def changes_anything(self) -> bool:
        return bool(self.launch or self.terminate or self.clean_up)


def target_backlog(policy: Policy) -> float:
    if policy.mode == "latency":
        # Rounded: 3.3 / 1.1 is 2.9999999999999996, and a backlog of 3 would want 2
        # instances, the reason saying "target 3".
        return max(1.0, round(policy.acceptable_latency_s / policy.seconds_per_image, 9))
    return policy.target_backlog_per_instance


def desired_count(obs: Observation, policy: Policy) -> tuple[int, str]:
    """How many instances this observation alone calls for, and why."""
    serving = obs.serving
    if obs.backlog == 0:
        return 0, "no work outstanding"
    target = target_backlog(policy)
    wanted = math.ceil(obs.backlog / target)
    reason = f"backlog {obs.backlog}, target {target:g} per instance"
    # Only receivers drain the queue: EC2 says running some 10-15 s after a launch, the
    # worker serves after BOOT_TIME.
    running = len(receivers(obs))
    if policy.mode == "latency" and 0 < running < wanted:
        drain_s = obs.backlog * policy.seconds_per_image / running
        if drain_s <= policy.boot_time_s and len(serving) < wanted:
            # Launch nothing (pending ones are kept: they boot as the backlog drains).
            wanted = len(serving)
            reason += f"; running instances drain it in {drain_s:.1f}s, within a {policy.boot_time_s:g}s boot"
    if wanted > policy.max_instances:
        reason += f"; capped at {policy.max_instances}"
    return min(policy.max_instances, wanted), reason


def receivers(obs: Observation) -> tuple[Instance, ...]:
    """Running instances whose workers said they serve, and have not given up: each
    long-polls the request queue, and takes what is visible within its poll."""
    return tuple(i for i in obs.serving if i.state == "running" and i.ready)


def untaken_beside_receivers(obs: Observation) -> bool:
    """Whether requests wait visible, none in flight, while receivers run: for long, that
    says they do not receive. Delayed requests (a hand-back's DelaySeconds) are not
    visible, and a pending or booting instance is no receiver."""
    return obs.visible > 0 and obs.in_flight == 0 and bool(receivers(obs))


def not_receiving(obs: Observation, waited_s: float, deadline_s: float) -> Instance | None:
    """The instance to count as not receiving, once requests have waited untaken beside
    receivers for `deadline_s` (0: never), `waited_s` without a break: the oldest. A newer
    one has had less time to go wrong; and taken in turn, a fleet that all stopped
    receiving is replaced oldest first, where the newest would be each replacement again."""
    if deadline_s <= 0 or waited_s < deadline_s or not untaken_beside_receivers(obs):
        return None
    return min(receivers(obs), key=lambda i: (i.launched_at, i.number))


def _free_numbers(taken: set[int], count: int, first: frozenset[int] = frozenset()) -> tuple[int, ...]:
    """`count` numbers no instance listed has, those in `first` first, then the lowest."""
    numbers = sorted(first - taken)[:count]
    n = 1
    while len(numbers) < count:
        if n not in taken and n not in numbers:
            numbers.append(n)
        n += 1
    return tuple(numbers)


def decide(obs: Observation, policy: Policy, memory: RoundMemory = NOTHING_REMEMBERED) -> Decision:
    """What to do now, from what is observed, the policy, and what the loop remembers of
    the rounds before (`memory`; none given, nothing is held back). The fleet shrinks no
    lower than `memory.wanted_recently`; `memory.keep_last` are scaled in only after
    every other. Held or limited launches (`memory.launches_held`, `memory.launch_wait_s`,
    `memory.launch_at_most`) leave the rest of the decision (terminations, clean-ups) as it is."""
    desired, reason = desired_count(obs, policy)
    desired, reason = _held_by_the_window(desired, reason, obs, policy, memory)
    launch: tuple[int, ...] = ()
    victims: tuple[str, ...] = ()
    if desired > len(obs.serving):
        launch, reason = _launches(desired, reason, obs, policy, memory)
    elif desired < len(obs.serving):
        victims = _scale_in_victims(desired, obs, policy, memory)
    # Stopped, or live with a worker that gave up: ours, serving nobody; always cleaned up,
    # but for one EC2 refused to terminate a moment ago (memory.resting).
    useless = tuple(i.id for i in obs.in_state("stopped") + obs.failed if i.id not in memory.resting)
    return Decision(desired, launch=launch, terminate=victims, clean_up=useless, reason=reason)


def _held_by_the_window(desired: int, reason: str, obs: Observation, policy: Policy,
                        memory: RoundMemory) -> tuple[int, str]:
    """`desired`, raised to the most instances wanted within the scale-in window (no
    higher than those serving), and the reason saying so."""
    serving = obs.serving
    wanted_recently = memory.wanted_recently
    if wanted_recently is None or desired >= len(serving) or wanted_recently <= desired:
        return desired, reason
    desired = min(len(serving), wanted_recently, policy.max_instances)
    if memory.window_watched:
        reason += f"; holding {desired}, wanted within the last {policy.scale_in_cooldown_s:g}s"
    else:
        # Not "wanted within the last ...": no round has said so yet (--dry-run --once, say).
        reason += (f"; holding {desired}: this controller has watched for less than the "
                   f"{policy.scale_in_cooldown_s:g}s scale-in window, and scales in only after")
    return desired, reason


def _launches(desired: int, reason: str, obs: Observation, policy: Policy,
              memory: RoundMemory) -> tuple[tuple[int, ...], str]:
    """The numbers to launch towards `desired`, and the reason with what held any back.

    The numbers of `memory.unanswered` come first (the call is then repeated, and EC2
    answers with the instance it may have started): a new number beside one that has
    started would go over the cap (simulated, see tests/unit/test_controller_simulation.py)."""
    serving = obs.serving
    # Failed instances keep their place under the cap until they are gone. So does a
    # launch that got no reply whose number another listed instance holds (one shutting
    # down, say; with a ClientToken that is not the call's, memory.started_by): it cannot
    # be repeated to find out, and may have started an instance EC2 does not list yet.
    # Where EC2 gives no ClientToken, the loop takes the one listed for the call's.
    unrepeatable = len(memory.unanswered & {i.number for i in obs.instances if i.client_token})
    count = min(desired - len(serving), policy.max_instances - len(obs.live) - unrepeatable)
    # Launch only for messages no worker holds (visible or delayed): those in flight are
    # being worked on, or come back visible to a later round. Less a target's worth per
    # instance not yet receiving: pending, or unready for under BOOTING_FOR_BOOT_TIMES
    # boot times (obs.silent_for, on this controller's clock), else one waiting message
    # would launch an instance a round while they boot. Longer, it may never say it
    # serves (an older AMI, a role without ec2:CreateTags), and must not block launches.
    untaken = obs.visible + obs.delayed
    booting_for_s = BOOTING_FOR_BOOT_TIMES * policy.boot_time_s
    not_yet_receiving = sum(1 for i in serving if i.state == "pending"
                            or (not i.ready and obs.silent_s(i) < booting_for_s))
    for_untaken = max(0, math.ceil(untaken / target_backlog(policy)) - not_yet_receiving)
    if count > for_untaken:
        count = for_untaken
        reason += (f"; launching only for the {untaken} not taken ({obs.in_flight} in flight"
                   + (f", {not_yet_receiving} not yet receiving)" if not_yet_receiving else ")"))
    if memory.launches_held:
        return (), reason + "; launches held: workers gave up recently"
    if count > 0 and memory.launch_wait_s > 0:
        return (), reason + f"; launches held: the last failed, next try in {memory.launch_wait_s:.1f}s"
    if memory.launch_at_most is not None and count > memory.launch_at_most:
        count = memory.launch_at_most
        reason += ("; one replacement at a time until one serves (workers gave up)" if count
                   else "; waiting for the replacement launched to serve (workers gave up)")
    if count > 0:
        return _free_numbers({i.number for i in obs.instances}, count, first=memory.unanswered), reason
    return (), reason


def _scale_in_victims(desired: int, obs: Observation, policy: Policy,
                      memory: RoundMemory) -> tuple[str, ...]:
    """The instances to end, to bring those serving down to `desired`."""
    serving = obs.serving

    # Among those that serve, those running another image than launches do first:
    # else, the newest going first, a new AMI would never replace the old fleet without a
    # hand. Not before one pending or not ready, which holds no work (a new image
    # whose workers never serve would then have the old fleet go first).
    def victim_order(i: Instance) -> tuple:
        pending, unready, newest, highest = scale_in_order(i)
        return (i.id in memory.keep_last, pending, unready, not _outdated(i, policy), newest, highest)

    # One EC2 refused to terminate a moment ago is not asked again yet (memory.resting).
    order = sorted((i for i in serving if i.id not in memory.resting), key=victim_order)
    return tuple(i.id for i in order[: len(serving) - desired])
