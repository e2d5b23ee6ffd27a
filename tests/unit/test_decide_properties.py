"""The controller's decision, property by property, over thousands of generated rounds.

decide() (controller/policy.py) is a pure function of an observation, the policy and a
snapshot of the loop's memory (a RoundMemory, controller/memory.py, taken by
Controller.step). Each test below draws a few thousand observations with
random.Random(seed): queue depths from 0 to thousands, instances in every EC2 state,
ready or not, failed or not, of this AMI, another or none known, numbers with gaps and
duplicates, launched at tied times; with launch holds, launch backoff, refusals
(keep_last), scale-in windows watched or not, both modes, caps from 0 to 20. Each checks
one promise of the policy's docstrings or README.md's "Controller" section.

A failure names its seed ("<property>-<k>"): DECIDE_SEED=<seed> runs that one case alone (with its
description in the message), DECIDE_CASES=<n> runs more (or fewer) per property.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from controller.memory import RoundMemory
from controller.observe import Instance, Observation
from controller.policy import Decision, Policy, decide, desired_count, target_backlog

CASES = int(os.environ.get("DECIDE_CASES", "2000"))
ONLY_SEED = os.environ.get("DECIDE_SEED")
IMAGE = "ami-new"  # what launches run
STATES = ("pending", "running", "shutting-down", "stopping", "stopped", "terminated")
STATE_WEIGHTS = (3, 8, 2, 1, 2, 1)


@dataclass(frozen=True)
class Case:
    obs: Observation
    policy: Policy
    wanted_recently: int | None = None
    launches_held: bool = False
    launch_at_most: int | None = None
    keep_last: frozenset[str] = frozenset()
    resting: frozenset[str] = frozenset()  # of keep_last, refused too recently to be asked again
    launch_wait_s: float = 0.0
    window_watched: bool = True
    unanswered: frozenset[int] = frozenset()  # numbers whose launch got no reply
    # Whether the loop's memory could have produced these arguments (wanted_recently is at
    # least what this round wants, and at least what is live before a whole window).
    consistent: bool = True
    seed: object = None
    notes: dict = field(default_factory=dict)

    def memory(self) -> RoundMemory:
        return RoundMemory(wanted_recently=self.wanted_recently, launches_held=self.launches_held,
                           launch_at_most=self.launch_at_most,
                           keep_last=self.keep_last, resting=self.resting, launch_wait_s=self.launch_wait_s,
                           window_watched=self.window_watched, unanswered=self.unanswered)

    def decide(self, obs: Observation | None = None, **changes) -> Decision:
        """decide() on this case, with `obs` or any field of its memory changed."""
        return decide(self.obs if obs is None else obs, self.policy, replace(self.memory(), **changes))

    def describe(self) -> str:
        p, o = self.policy, self.obs
        lines = [
            f"seed {self.seed!r}: Policy(max_instances={p.max_instances}, mode={p.mode!r}, "
            f"target_backlog_per_instance={p.target_backlog_per_instance}, acceptable_latency_s="
            f"{p.acceptable_latency_s}, seconds_per_image={p.seconds_per_image}, "
            f"boot_time_s={p.boot_time_s}, "
            f"scale_in_cooldown_s={p.scale_in_cooldown_s}, image_id={p.image_id!r})",
            f"  queue: visible={o.visible} in_flight={o.in_flight} delayed={o.delayed}",
            f"  memory: {self.memory()} (loop-consistent: {self.consistent})",
        ]
        lines += [f"  {i}" for i in o.instances]
        return "\n".join(lines)


def _depth(rng: random.Random) -> int:
    kind = rng.random()
    if kind < 0.4:
        return 0
    if kind < 0.8:
        return rng.randint(1, 25)
    return rng.randint(26, 5000)


def gen_case(seed: object, **force) -> Case:
    """One round as the loop could present it (or, one time in five, with a memory the loop
    could not have, for the promises that hold whatever it is). `force` sets queue depths
    (visible, in_flight, delayed), policy fields, or decide's arguments."""
    rng = random.Random(str(seed))
    policy = Policy(
        max_instances=rng.choice((0, 1, 2, 3, 5, 15, 15, 15, 20, rng.randint(0, 20))),
        mode=rng.choice(("backlog", "latency")),
        target_backlog_per_instance=rng.choice((0.01, 0.5, 1.0, 1.0, 1.0, 2.0, 3.5, 10.0)),
        acceptable_latency_s=rng.choice((0.0, 0.5, 1.0, 3.3, 5.0, 10.0, 30.0)),
        seconds_per_image=rng.choice((0.001, 0.1, 0.5, 0.5, 1.1, 2.0)),
        boot_time_s=rng.choice((0.0, 10.0, 40.0, 40.0, 300.0)),
        scale_in_cooldown_s=rng.choice((0.0, 0.5, 5.0, 60.0)),
        image_id=IMAGE,
    )
    policy = replace(policy, **{k: v for k, v in force.items() if k in Policy.__dataclass_fields__})
    count = rng.choice((0, 0, 1, 2, 3, rng.randint(0, 8), rng.randint(0, 25)))
    top = rng.choice((3, 16, 30))  # numbers drawn from 1..top: duplicates and gaps
    times = [1000.0 + 10 * k for k in range(rng.randint(1, 6))]  # few: launched_at ties
    instances = []
    for k in range(count):
        state = rng.choices(STATES, STATE_WEIGHTS)[0]
        instances.append(Instance(
            id=f"i-{k:04x}{rng.randrange(16**4):04x}",
            number=k + 1 if rng.random() < 0.5 else rng.randint(1, top),
            state=state,
            launched_at=rng.choice(times) if rng.random() < 0.7 else rng.uniform(0, 2000),
            worker_failed=rng.choice(("model-unavailable", "cannot-receive")) if rng.random() < 0.2 else "",
            ready=rng.random() < (0.7 if state == "running" else 0.3),
            image_id=rng.choice(("", IMAGE, IMAGE, "ami-old")),
        ))
    rng.shuffle(instances)  # the loop appends its unlisted launches after EC2's sorted list
    depths = {name: force.get(name, _depth(rng)) for name in ("visible", "in_flight", "delayed")}
    obs = Observation(at=5000.0, clock=777.0, instances=tuple(instances), **depths)

    ids = [i.id for i in instances]
    keep_last = frozenset()
    if ids and rng.random() < 0.2:
        keep_last = frozenset(rng.sample(ids, rng.randint(1, len(ids))))
    if rng.random() < 0.1:
        keep_last |= {"i-gone"}  # one EC2 no longer lists (the loop forgets it; decide must not care)
    consistent = rng.random() < 0.8
    if policy.scale_in_cooldown_s <= 0:
        wanted, watched = None, False  # as Controller.step passes them: no window, never "watched"
    else:
        wanted_now = desired_count(obs, policy)[0]
        watched = rng.random() < 0.7
        wanted = rng.randint(wanted_now, max(wanted_now, policy.max_instances))
        if not watched:
            wanted = max(wanted, len(obs.live))
    if not consistent:
        wanted = rng.choice((None, 0, rng.randint(0, 25)))
        watched = rng.random() < 0.5
    args = {
        "wanted_recently": wanted, "window_watched": watched, "keep_last": frozenset(keep_last),
        # As the loop gives it: some of the refused, those refused within the last minute.
        "resting": frozenset(i for i in keep_last if rng.random() < 0.5),
        "launches_held": rng.random() < 0.15,
        "launch_at_most": rng.choice((None, None, None, 0, 1)),
        "launch_wait_s": rng.choice((0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 30.0)),
        # Listed numbers too: the loop forgets those, but decide must never launch one.
        "unanswered": frozenset(rng.sample(range(1, top + 1), rng.randint(1, 3)))
        if rng.random() < 0.25 else frozenset(),
    }
    args |= {k: v for k, v in force.items() if k in args}
    return Case(obs=obs, policy=policy, consistent=consistent, seed=seed, **args)


def for_all(name: str, check: Callable[[Case], bool | None], cases: int = CASES, least: float = 0.05,
            **force) -> int:
    """Runs `check` on `cases` generated cases; a failure (or any error) names the seed and
    the case. `check` returns False for a case its promise says nothing about: at least
    `least` of the cases must be checked, lest a generator changed make it vacuous. Returns
    how many were."""
    if ONLY_SEED:
        seeds = [ONLY_SEED] if ONLY_SEED.rsplit("-", 1)[0] == name else []
    else:
        seeds = [f"{name}-{k}" for k in range(cases)]
    checked = 0
    for seed in seeds:
        case = gen_case(seed, **force)
        try:
            checked += check(case) is not False
        except Exception as exc:
            raise AssertionError(f"{type(exc).__name__}: {exc}\n{case.describe()}") from exc
    if not ONLY_SEED:
        assert checked >= least * len(seeds), f"{name}: only {checked} of {len(seeds)} cases checked"
    return checked


# --- helpers: what the promises are stated in ----------------------------------------------

def needed(case: Case) -> int:
    """What the backlog alone calls for: min(cap, ceil(backlog / target))."""
    backlog = case.obs.backlog
    return min(case.policy.max_instances, math.ceil(backlog / target_backlog(case.policy)))


def serving_ids(obs: Observation) -> set[str]:
    return {i.id for i in obs.serving}


def after(obs: Observation, decision: Decision) -> Observation:
    """The observation the decision's effects give a round later, the queue as it was:
    those terminated or cleaned up shutting down, those launched pending (of no known AMI,
    not ready), as Controller.step shows them (RecentTerminations, RecentLaunches)."""
    ending = set(decision.terminate) | set(decision.clean_up)
    kept = tuple(replace(i, state="shutting-down") if i.id in ending else i for i in obs.instances)
    launched = tuple(Instance(id=f"i-new{n}", number=n, state="pending", launched_at=obs.at)
                     for n in decision.launch)
    return replace(obs, instances=kept + launched, at=obs.at + 1, clock=obs.clock + 1)


def next_round(case: Case, decision: Decision) -> Case:
    """The next round's case as the loop would make it: the window records what the new
    observation wants, before a whole window counts what is live; a replacement launched
    on trial, still booting, allows no other (LaunchHold.trial_launches)."""
    obs = after(case.obs, decision)
    wanted = case.wanted_recently
    if wanted is not None:
        wanted = max(wanted, desired_count(obs, case.policy)[0])
        if not case.window_watched:
            wanted = max(wanted, len(obs.live))
    on_trial = case.launch_at_most
    if on_trial is not None and decision.launch:
        on_trial = 0
    return replace(case, obs=obs, wanted_recently=wanted, launch_at_most=on_trial)


def readme_scale_in_key(case: Case, i: Instance) -> tuple:
    """README's order of scale-in: refused ones last; then pending first, then those whose
    worker has not yet received, then those of another AMI than AMI_ID, then the most
    recently launched (ties left to the code)."""
    outdated = bool(i.image_id) and i.image_id != case.policy.image_id
    return (i.id in case.keep_last, i.state != "pending", i.ready, not outdated, -i.launched_at)


# --- the properties ------------------------------------------------------------------------

def test_decide_never_raises_and_its_answer_is_well_formed():
    """Any valid observation gets a decision: launches are fresh positive numbers, each once;
    terminations are serving instances, each once; clean-ups exactly the stopped ones and the
    live ones whose worker gave up; never a launch and a termination in one round."""
    def check(case: Case) -> None:
        d = case.decide()
        obs = case.obs
        assert 0 <= d.desired <= case.policy.max_instances, d
        assert isinstance(d.reason, str) and d.reason
        assert len(set(d.launch)) == len(d.launch) and all(n >= 1 for n in d.launch), d.launch
        used = {i.number for i in obs.instances}
        assert not set(d.launch) & used, f"launches a number in use: {sorted(set(d.launch) & used)}"
        assert len(set(d.terminate)) == len(d.terminate), d.terminate
        assert set(d.terminate) <= serving_ids(obs), "terminates one that does not serve"
        assert not set(d.terminate) & case.resting, "asks again one EC2 refused a moment ago"
        want_clean = ({i.id for i in obs.in_state("stopped")} | {i.id for i in obs.failed}) - case.resting
        assert set(d.clean_up) == want_clean and len(d.clean_up) == len(want_clean), d.clean_up
        assert not (d.launch and d.terminate), f"launches and terminates at once: {d}"
        assert d.changes_anything == bool(d.launch or d.terminate or d.clean_up)
    for_all("well-formed", check)


def test_decide_is_deterministic_and_blind_to_the_order_ec2_lists_instances_in():
    """Same inputs, same decision; listed in another order, the same launches and clean-ups,
    and victims that are the same up to ties of the scale-in order."""
    def check(case: Case) -> None:
        first = case.decide()
        assert case.decide() == first
        assert case.decide(keep_last=frozenset(set(case.keep_last))) == first
        rng = random.Random(str(case.seed))
        shuffled = list(case.obs.instances)
        rng.shuffle(shuffled)
        other = case.decide(obs=replace(case.obs, instances=tuple(shuffled)))
        assert (other.desired, other.launch, set(other.clean_up)) == (first.desired, first.launch,
                                                                      set(first.clean_up))
        by_id = {i.id: i for i in case.obs.instances}

        def keys(d: Decision) -> list:
            return sorted((readme_scale_in_key(case, by_id[v]), -by_id[v].number) for v in d.terminate)
        assert keys(other) == keys(first)
    for_all("determinism", check)


def test_the_cap_is_never_exceeded():
    """"Either way the cap is never exceeded (pending instances, and failed ones until they are
    gone, count)": a launch never takes live instances above MAX_INSTANCES, and after any
    round the fleet that serves is at most the cap (a cap lowered below the fleet trims it)."""
    def check(case: Case) -> None:
        d = case.decide()
        cap, live = case.policy.max_instances, case.obs.live
        if d.launch:
            assert len(live) + len(d.launch) <= cap, f"{len(live)} live + {len(d.launch)} launched > {cap}"
        serving_after = len(case.obs.serving) - len(d.terminate) + len(d.launch)
        # Over it only by those EC2 refused a moment ago (not asked again yet), every other going.
        askable = [i for i in case.obs.serving if i.id not in case.resting]
        assert serving_after <= cap or (not d.launch and len(d.terminate) == len(askable)), (
            f"{serving_after} serving after the round, cap {cap}")
        if d.launch:
            assert serving_after <= d.desired, d
    for_all("cap", check)


def test_held_or_backing_off_launches_launch_nothing_and_change_nothing_else():
    """`launches_held`: launch nothing this round; `launch_wait_s`: launch nothing for this long
    yet. "Held launches leave the rest of the decision (terminations, clean-ups) as it is."""
    def check(case: Case) -> None:
        free = case.decide(launches_held=False, launch_wait_s=0.0, launch_at_most=None)
        for held in (case.decide(launches_held=True, launch_wait_s=0.0),
                     case.decide(launches_held=False, launch_wait_s=case.launch_wait_s or 0.25),
                     case.decide(launches_held=True, launch_wait_s=3.0)):
            assert held.launch == ()
            assert (held.desired, held.terminate, held.clean_up) == (
                free.desired, free.terminate, free.clean_up)
            if free.launch:
                assert "launches held" in held.reason, held.reason
    for_all("held", check)


def test_launches_on_trial_after_a_hold_are_at_most_the_limit_and_change_nothing_else():
    """`launch_at_most`: one replacement at a time after a hold, until one serves. The
    launches are the first of those the round would make otherwise, and the rest of the
    decision is as it is."""
    def check(case: Case) -> bool | None:
        free = case.decide(launch_at_most=None)
        if not free.launch:
            return False
        for most in (0, 1):
            limited = case.decide(launch_at_most=most)
            assert limited.launch == free.launch[:most], (limited, free)
            assert (limited.desired, limited.terminate, limited.clean_up) == (
                free.desired, free.terminate, free.clean_up)
            if len(free.launch) > most:
                assert "until one serves" in limited.reason or "to serve" in limited.reason, limited.reason
        return None
    for_all("trial", check, launches_held=False, launch_wait_s=0.0)


def test_only_messages_no_worker_holds_launch_instances():
    """"They do not launch instances ... launches are for the visible and delayed ones":
    each round launches at most ceil((visible + delayed) / target), none for in-flight alone."""
    def check(case: Case) -> None:
        d = case.decide()
        untaken = case.obs.visible + case.obs.delayed
        assert len(d.launch) <= math.ceil(untaken / target_backlog(case.policy)), d
    for_all("untaken", check)
    for_all("in-flight-only", lambda case: _assert_no_launch(case.decide()), visible=0, delayed=0)


def _assert_no_launch(d: Decision) -> None:
    assert d.launch == (), d


def test_scaling_out_is_immediate():
    """"Scaling out is immediate": with messages waiting, room under the cap, launches not
    held, and fewer serving than the backlog needs, a round launches (in latency mode, unless
    the ready instances drain the backlog before a boot)."""
    def check(case: Case) -> None:
        obs, policy = case.obs, case.policy
        if case.launches_held or case.launch_wait_s > 0 or obs.visible + obs.delayed == 0:
            return False
        if case.launch_at_most is not None:  # one replacement at a time after a hold (see "trial")
            return False
        if len(obs.live) >= policy.max_instances or len(obs.serving) >= needed(case):
            return False
        running = sum(1 for i in obs.serving if i.state == "running" and i.ready)
        if policy.mode == "latency" and running and \
                obs.backlog * policy.seconds_per_image / running <= policy.boot_time_s:
            return False
        d = case.decide()
        room = min(needed(case) - len(obs.serving), policy.max_instances - len(obs.live),
                   math.ceil((obs.visible + obs.delayed) / target_backlog(policy)))
        # Each round launches at most ceil((visible + delayed) / target); all of that at once
        # when no instance launched earlier is still to take a message (pending, not ready).
        assert len(d.launch) <= room, f"launched {len(d.launch)}, room for {room}: {d}"
        if all(i.state == "running" and i.ready for i in obs.serving):
            assert len(d.launch) == room, f"launched {len(d.launch)}, room for {room}: {d}"
    for_all("scale-out", check)


def test_latency_mode_launches_nothing_the_ready_instances_drain_before_a_boot():
    """"when the serving instances (running, their workers ready) would drain the backlog
    before a new one could boot, none is launched"."""
    def check(case: Case) -> None:
        obs, policy = case.obs, case.policy
        running = sum(1 for i in obs.serving if i.state == "running" and i.ready)
        if not (running and obs.backlog * policy.seconds_per_image / running <= policy.boot_time_s):
            return False
        assert case.decide().launch == ()
    for_all("latency-drain", check, mode="latency")


def test_scale_in_never_leaves_fewer_than_the_backlog_or_the_window_needs():
    """desired = min(cap, ceil(backlog / target)), in-flight messages counted ("keeps the fleet
    from shrinking while requests are still being worked on"), and "the fleet shrinks only to
    the most instances wanted at any round of the last scale_in_cooldown_s"."""
    def check(case: Case) -> None:
        d = case.decide()
        if not d.terminate:
            return False
        left = len(case.obs.serving) - len(d.terminate)
        assert left >= needed(case), f"{left} left serving, the backlog needs {needed(case)}"
        if case.wanted_recently is not None:
            floor = min(len(case.obs.serving), case.wanted_recently, case.policy.max_instances)
            assert left >= floor, f"{left} left serving, the window holds {floor}"
        # Down to what is wanted, but for those EC2 refused a moment ago (not asked again yet).
        askable = [i for i in case.obs.serving if i.id not in case.resting]
        assert len(d.terminate) == min(len(case.obs.serving) - d.desired, len(askable)), d
    for_all("scale-in-floor", check)


def test_scale_in_goes_in_the_readme_order():
    """"Which instances go at a scale-in: pending ones first, then those whose worker has not
    yet received (they hold no work), then those running another image than AMI_ID, then the
    most recently launched"; refused ones (keep_last) "only after every other"."""
    def check(case: Case) -> None:
        d = case.decide()
        if not d.terminate:
            return False
        victims = set(d.terminate)
        kept = [i for i in case.obs.serving if i.id not in victims and i.id not in case.resting]
        gone = [i for i in case.obs.serving if i.id in victims]
        if kept:
            worst_gone = max(gone, key=lambda i: readme_scale_in_key(case, i))
            best_kept = min(kept, key=lambda i: readme_scale_in_key(case, i))
            assert readme_scale_in_key(case, worst_gone) <= readme_scale_in_key(case, best_kept), (
                f"{worst_gone} went before {best_kept}")
    for_all("order", check)


def test_every_instance_goes_once_the_backlog_has_been_zero_for_the_whole_window():
    """"Every instance goes once the backlog has been zero for the whole window": no launch,
    every live instance terminated or cleaned up (refused ones tried again), stopped ones too."""
    def check(case: Case) -> None:
        d = case.decide()
        assert d.launch == () and d.desired == 0
        ending = set(d.terminate) | set(d.clean_up)
        ending_or_due = {i.id for i in case.obs.live} | {i.id for i in case.obs.in_state("stopped")}
        resting = case.resting & ending_or_due  # asked again a minute after its refusal
        assert ending_or_due == ending | resting
        assert not ending & resting
    for_all("to-zero", check, visible=0, in_flight=0, delayed=0, wanted_recently=0, window_watched=True)
    for_all("to-zero-no-window", check, visible=0, in_flight=0, delayed=0, scale_in_cooldown_s=0.0,
            wanted_recently=None, window_watched=False)


def test_a_controller_that_has_not_watched_a_whole_window_scales_out_not_in():
    """"A restarted controller, which has not watched a whole window yet, keeps what is live
    until it has" (the loop passes at least what is live as wanted_recently)."""
    def check(case: Case) -> None:
        if case.wanted_recently is None or case.window_watched or not case.consistent:
            return False
        d = case.decide()
        cap = case.policy.max_instances
        # Only the cap trims it (a lowered cap is no scale-in the window holds back).
        assert len(d.terminate) <= max(0, len(case.obs.serving) - cap), d
    for_all("young", check, scale_in_cooldown_s=60.0)


def test_more_work_never_gives_a_smaller_fleet():
    """Monotone: one more waiting message never launches fewer nor terminates more."""
    def check(case: Case) -> None:
        d = case.decide()
        for more in (replace(case.obs, visible=case.obs.visible + 1),
                     replace(case.obs, delayed=case.obs.delayed + 7),
                     replace(case.obs, in_flight=case.obs.in_flight + 3)):
            e = case.decide(obs=more)
            assert e.desired >= d.desired and len(e.launch) >= len(d.launch), (d, e)
            assert len(e.terminate) <= len(d.terminate), (d, e)
        # A higher cap never launches fewer; a higher peak of the window never ends more.
        higher = replace(case, policy=replace(case.policy, max_instances=case.policy.max_instances + 1))
        assert len(higher.decide().launch) >= len(d.launch)
        if case.wanted_recently is not None:
            assert len(case.decide(wanted_recently=case.wanted_recently + 1).terminate) <= len(d.terminate)
    for_all("monotone", check)


def test_only_instances_that_serve_count_towards_the_fleet():
    """"Only instances that serve count towards the fleet": one more instance that serves
    nobody (its worker gave up, or stopped, shutting down, stopping, terminated) changes
    neither what is wanted nor the scale-in; a failed live one is cleaned up and takes a
    place under the cap until it is gone (one launch fewer at most), the others take none."""
    def check(case: Case) -> None:
        d = case.decide()
        rng = random.Random(str(case.seed))
        for state in STATES:
            extra = Instance(id="i-extra", number=rng.randint(1, 30), state=state, launched_at=1.0,
                             ready=rng.random() < 0.5, image_id=rng.choice(("", IMAGE, "ami-old")),
                             worker_failed="" if state in ("pending", "running") and rng.random() < 0.1
                             else "model-unavailable")
            if extra.state in ("pending", "running") and not extra.worker_failed:
                continue
            e = case.decide(obs=replace(case.obs, instances=case.obs.instances + (extra,)))
            assert (e.desired, e.terminate) == (d.desired, d.terminate), (state, d, e)
            assert extra.number not in e.launch
            if state in ("pending", "running", "stopped"):
                assert set(e.clean_up) == set(d.clean_up) | {"i-extra"}
            else:
                assert e.clean_up == d.clean_up
            if state in ("pending", "running"):
                assert len(d.launch) - 1 <= len(e.launch) <= len(d.launch), (d, e)
            else:
                assert len(e.launch) == len(d.launch), (d, e)
    for_all("bystanders", check)


def test_deciding_again_on_its_own_effects_asks_for_nothing_more_when_nothing_is_in_flight():
    """No flapping: the next round, the queue as it was and the decision's effects seen (its
    launches pending, its victims and clean-ups shutting down), launches and terminates
    nothing, but for the room under the cap that failed instances leave once gone (they
    "count until they are gone")."""
    def check(case: Case) -> None:
        if not case.consistent:
            return False
        first = case.decide()
        second = next_round(case, first).decide()
        assert second.terminate == (), f"then terminates {second.terminate} after {first}"
        freed = len(case.obs.failed)
        assert len(second.launch) <= freed, f"then launches {second.launch} more after {first}"
        assert not (first.terminate and second.launch), (first, second)
    for_all("no-flap", check, in_flight=0)


def test_deciding_again_on_its_own_effects_asks_for_nothing_more():
    """As above, with messages in flight."""
    def check(case: Case) -> None:
        if not case.consistent:
            return False
        first = case.decide()
        second = next_round(case, first).decide()
        assert second.terminate == ()
        assert len(second.launch) <= len(case.obs.failed), f"then launches {second.launch} more after {first}"
    for_all("no-flap-in-flight", check)


def test_one_waiting_message_beside_busy_workers_launches_one_instance_not_one_a_round():
    """One visible message beside 20 in flight on one busy ready worker: one instance is
    launched for it. The next rounds, while it boots (40 s on AWS, a round a second), that
    message is still visible, and each launched another, up to the cap: the README's
    "launched 7 instances that found nothing to do", a round at a time."""
    policy = Policy()  # backlog mode, target 1, cap 15, no window
    instances = (Instance(id="i-busy", number=1, state="running", launched_at=0.0, ready=True),)
    launched = 0
    for _ in range(5):
        obs = Observation(at=0.0, clock=0.0, visible=1, in_flight=20, delayed=0, instances=instances)
        d = decide(obs, policy)
        launched += len(d.launch)
        instances += tuple(Instance(id=f"i-{n}", number=n, state="pending", launched_at=1.0)
                           for n in d.launch)
    assert launched == 1, f"{launched} instances launched for one waiting message"


def test_the_numbers_of_launches_without_reply_are_launched_first():
    """Their calls are repeated (EC2 answers with the instance each may have started):
    a lower free number launched beside one went over the cap (simulated)."""
    def check(case: Case) -> bool | None:
        d = case.decide()
        listed = {i.number for i in case.obs.instances}
        repeatable = sorted(case.unanswered - listed)
        if not d.launch or not repeatable:
            return False
        assert d.launch[:len(repeatable)] == tuple(repeatable[:len(d.launch)]), (d, case.unanswered)
        assert not set(d.launch) & listed and len(set(d.launch)) == len(d.launch), d
    for_all("unanswered-first", check, least=0.01)
