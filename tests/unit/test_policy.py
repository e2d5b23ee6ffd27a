"""The controller's pure decision, table by table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.memory import PROGRESS_DEADLINE_DOUBLINGS, ProgressWatch, RoundMemory
from controller.observe import Instance, Observation
from controller.policy import Policy, decide, desired_count, not_receiving, untaken_beside_receivers


def obs(visible=0, in_flight=0, delayed=0, pending=0, running=0, stopped=0, shutting=0, at=1000.0,
        booting=0):
    """`running` instances serve (their workers have said so); `booting` ones run, their
    workers not yet serving."""
    instances, n = [], 0
    for state, count, ready in (("pending", pending, False), ("running", running, True),
                                ("running", booting, False), ("stopped", stopped, False),
                                ("shutting-down", shutting, False)):
        for _ in range(count):
            n += 1
            instances.append(Instance(id=f"i-{n:04d}", number=n, state=state, launched_at=float(n),
                                      ready=ready))
    return Observation(at=at, clock=at, visible=visible, in_flight=in_flight, delayed=delayed,
                       instances=tuple(instances))


BACKLOG = Policy()


@pytest.mark.parametrize(
    "name, observation, launches, terminates, desired",
    [
        ("idle stays at zero", obs(), 0, 0, 0),
        ("first message launches one", obs(visible=1), 1, 0, 1),
        ("burst of 100 reaches exactly the cap", obs(visible=100), 15, 0, 15),
        ("burst of 15 gives 15", obs(visible=15), 15, 0, 15),
        ("trickle of 3 gives 3", obs(visible=3), 3, 0, 3),
        ("pending instances count: no double launch", obs(visible=5, pending=5), 0, 0, 5),
        ("pending + running count toward the target", obs(visible=4, in_flight=4, pending=2, running=4),
         2, 0, 8),
        ("in-flight work keeps instances", obs(in_flight=6, running=6), 0, 0, 6),
        ("delayed messages count", obs(delayed=2), 2, 0, 2),
        ("cap never exceeded with pending", obs(visible=100, pending=10, running=5), 0, 0, 15),
        ("above the cap is trimmed", obs(visible=100, running=17), 0, 2, 15),
        ("drain: backlog shrinks, fleet shrinks", obs(visible=0, in_flight=4, running=10), 0, 6, 4),
        ("all done: terminate all", obs(running=15), 0, 15, 0),
        ("stopped strays are not counted", obs(visible=1, running=1, stopped=2), 0, 0, 1),
        ("shutting-down ones are not capacity", obs(visible=2, shutting=2), 2, 0, 2),
        # A new instance cannot take what a worker holds (else 7 launch as the fleet
        # ends, its workers still answering what they have taken; kept for the cooldown).
        ("in flight alone launches nothing", obs(in_flight=7, shutting=7), 0, 0, 7),
        ("launches are for what no worker took", obs(visible=5, in_flight=20, running=1), 5, 0, 15),
        ("delayed ones are not taken", obs(delayed=2, in_flight=9, running=1), 2, 0, 11),
    ],
)
def test_backlog_policy(name, observation, launches, terminates, desired):
    decision = decide(observation, BACKLOG)
    assert (len(decision.launch), len(decision.terminate), decision.desired) == (
        launches, terminates, desired), name


@pytest.mark.parametrize("observation", [obs(visible=1, running=1, stopped=2),
                                         obs(visible=3, running=1, stopped=2), obs(stopped=2, running=1)])
def test_stopped_strays_are_cleaned_up_apart_from_scaling(observation):
    decision = decide(observation, BACKLOG)
    strays = {i.id for i in observation.in_state("stopped")}
    assert set(decision.clean_up) == strays and not strays & set(decision.terminate)
    assert decision.changes_anything


def failed(observation: Observation, count: int) -> Observation:
    """The same observation with the workers of its first `count` live instances given up."""
    from dataclasses import replace

    ids = {i.id for i in observation.live[:count]}
    return replace(observation, instances=tuple(
        replace(i, worker_failed="model-unavailable") if i.id in ids else i for i in observation.instances))


def test_an_instance_whose_worker_gave_up_is_cleaned_up_and_replaced():
    observation = failed(obs(visible=3, running=3), 1)
    decision = decide(observation, BACKLOG)
    assert decision.clean_up == ("i-0001",) and decision.terminate == ()
    assert len(decision.launch) == 1 and decision.desired == 3
    assert 1 not in decision.launch  # its name stays taken until it is gone


def test_failed_instances_keep_their_place_under_the_cap_until_gone():
    observation = failed(obs(visible=100, running=15), 2)
    decision = decide(observation, BACKLOG)
    assert decision.launch == () and set(decision.clean_up) == {"i-0001", "i-0002"}
    # A round later they are shutting down, and replaced.
    gone = obs(visible=100, running=13, shutting=2)
    assert len(decide(gone, BACKLOG).launch) == 2


def test_held_launches_launch_nothing_but_still_clean_up_and_scale_in():
    held = decide(failed(obs(visible=5, running=2), 2), BACKLOG, RoundMemory(launches_held=True))
    assert held.launch == () and set(held.clean_up) == {"i-0001", "i-0002"}
    assert "launches held" in held.reason
    assert len(decide(obs(visible=1, running=3), BACKLOG, RoundMemory(launches_held=True)).terminate) == 2
    # Launches backing off after a failed one: the same, said with the wait (once decided
    # outside decide(), which a test of it could not see).
    backing_off = decide(failed(obs(visible=5, running=2), 2), BACKLOG, RoundMemory(launch_wait_s=2.5))
    assert backing_off.launch == () and set(backing_off.clean_up) == {"i-0001", "i-0002"}
    assert "launches held: the last failed, next try in 2.5s" in backing_off.reason
    assert len(decide(obs(visible=5, running=2), BACKLOG, RoundMemory(launch_wait_s=0)).launch) == 3


def test_scale_in_never_picks_a_failed_instance_as_a_victim():
    decision = decide(failed(obs(in_flight=1, running=3), 1), BACKLOG)
    assert decision.clean_up == ("i-0001",)
    assert len(decision.terminate) == 1 and "i-0001" not in decision.terminate


def test_launch_numbers_fill_gaps_and_never_reuse_a_live_name():
    observation = Observation(at=0, clock=0, visible=4, in_flight=0, delayed=0, instances=(
        Instance("i-a", 1, "running", 0), Instance("i-b", 3, "pending", 0),
        Instance("i-c", 4, "shutting-down", 0)))
    assert decide(observation, BACKLOG).launch == (2, 5)


def test_scale_in_removes_pending_first_then_newest():
    observation = Observation(at=0, clock=0, visible=0, in_flight=1, delayed=0, instances=(
        Instance("i-old", 1, "running", 10), Instance("i-new", 2, "running", 20),
        Instance("i-pend", 3, "pending", 5)))
    assert decide(observation, BACKLOG).terminate == ("i-pend", "i-new")


def test_cooldown_holds_instances_until_it_has_passed():
    policy = Policy(scale_in_cooldown_s=5)
    assert decide(obs(running=3), policy, RoundMemory(wanted_recently=3)).terminate == ()
    assert len(decide(obs(running=3), policy, RoundMemory(wanted_recently=0)).terminate) == 3


def test_the_fleet_shrinks_only_to_the_most_wanted_within_the_window():
    policy = Policy(scale_in_cooldown_s=60)
    held = decide(obs(visible=2, running=8), policy, RoundMemory(wanted_recently=6))
    assert held.desired == 6 and len(held.terminate) == 2 and "holding 6" in held.reason
    assert decide(obs(visible=2, running=8), policy, RoundMemory(wanted_recently=9)).terminate == ()
    # A controller started less than a window ago says so, not "wanted within the last 60s"
    # (which --dry-run --once would give for what is only live).
    young = decide(obs(running=8), policy, RoundMemory(wanted_recently=8, window_watched=False))
    assert young.terminate == () and "watched for less than the 60s scale-in window" in young.reason
    assert "wanted within" not in young.reason
    # Scaling out never waits, and the cap still trims.
    assert len(decide(obs(visible=12, running=8), policy, RoundMemory(wanted_recently=8)).launch) == 4
    # Not even for a peak above what is wanted now: a recent burst of 10 does not hold
    # the fleet at 2 while 5 are wanted.
    grow = decide(obs(visible=5, running=2), policy, RoundMemory(wanted_recently=10))
    assert grow.desired == 5 and grow.launch == (3, 4, 5)
    assert len(decide(obs(visible=100, running=17), policy, RoundMemory(wanted_recently=17)).terminate) == 2


def test_target_backlog_per_instance():
    assert desired_count(obs(visible=25), Policy(target_backlog_per_instance=10))[0] == 3
    # The cap, when it limits, is in the reason: "backlog 17, target 1" reads as 17 wanted.
    assert desired_count(obs(visible=17), Policy(target_backlog_per_instance=1)) == \
        (15, "backlog 17, target 1 per instance; capped at 15")
    assert "capped" not in desired_count(obs(visible=15), Policy(target_backlog_per_instance=1))[1]


def test_latency_mode_target_follows_from_acceptable_latency():
    # 10 s acceptable at 0.5 s an image: one instance may hold 20 messages.
    policy = Policy(mode="latency", acceptable_latency_s=10, seconds_per_image=0.5, boot_time_s=0)
    assert desired_count(obs(visible=100), policy)[0] == 5
    assert desired_count(obs(visible=1000), policy)[0] == 15


def test_latency_mode_does_not_launch_what_could_not_boot_in_time():
    # Two running instances clear 30 images in 30*0.5/2 = 7.5 s, before a 40 s boot.
    policy = Policy(mode="latency", acceptable_latency_s=5, seconds_per_image=0.5, boot_time_s=40)
    small = decide(obs(visible=30, running=2), policy)
    assert small.launch == ()
    # Drained just as a boot would end (160*0.5/2 = 40 s): no launch either; a moment
    # longer, and instances are launched.
    assert decide(obs(visible=160, running=2), policy).launch == ()
    assert len(decide(obs(visible=162, running=2), policy).launch) > 0
    # A burst they could not clear before a boot does launch more.
    large = decide(obs(visible=400, running=2), policy)
    assert len(large.launch) > 0


def test_latency_mode_counts_on_no_instance_whose_worker_is_still_starting():
    """One instance EC2 calls running, its worker not serving yet, holds a backlog of 60
    at one instance, as it did a moment before, pending: it must not get two more."""
    policy = Policy(mode="latency", acceptable_latency_s=10, seconds_per_image=0.5, boot_time_s=40)
    for starting in (obs(visible=60, pending=1), obs(visible=60, booting=1)):
        assert decide(starting, policy).launch == (2, 3), starting
    assert decide(obs(visible=60, running=1), policy).launch == ()  # it drains them in 30 s


def test_latency_mode_stopping_launches_keeps_no_more_than_the_backlog_wants():
    """25 images at 10 an instance want 3; two running clear them before a boot, so not
    every instance there is (5, the 3 pending included) is kept."""
    policy = Policy(mode="latency", acceptable_latency_s=5, seconds_per_image=0.5, boot_time_s=40)
    decision = decide(obs(visible=25, running=2, pending=3), policy)
    assert decision.desired == 3 and decision.launch == ()
    assert len(decision.terminate) == 2
    assert "drain" not in decision.reason  # the rule changed nothing: not given as a reason


def test_scale_in_takes_an_instance_whose_worker_has_not_received_before_one_that_has():
    """A worker not yet ready (booting; locally, waiting for a process) holds no work;
    a ready one launched later may hold a batch."""
    booting = Instance(id="i-boot", number=2, state="running", launched_at=100.0)
    serving = Instance(id="i-busy", number=1, state="running", launched_at=200.0, ready=True)
    observation = Observation(at=1000.0, clock=1000.0, visible=0, in_flight=1, delayed=0,
                              instances=(booting, serving))
    assert decide(observation, BACKLOG).terminate == ("i-boot",)


def test_scale_in_takes_instances_of_an_older_image_first_once_they_serve():
    """If the newest went first, a fleet half on a new AMI would lose its new instances
    at each scale-in, and the old ones run on for good without a hand."""
    new = Policy(image_id="ami-new")
    old_ready = Instance("i-old", 1, "running", 10.0, ready=True, image_id="ami-old")
    new_ready = Instance("i-new", 2, "running", 20.0, ready=True, image_id="ami-new")
    new_booting = Instance("i-boot", 3, "running", 30.0, image_id="ami-new")
    pending = Instance("i-pend", 4, "pending", 40.0, image_id="ami-new")
    unknown = Instance("i-just", 5, "running", 50.0, ready=True)  # just launched: its image not listed yet

    def victims(*instances: Instance, wanted: int) -> tuple[str, ...]:
        observation = Observation(at=1000.0, clock=1000.0, visible=0, in_flight=wanted, delayed=0,
                                  instances=instances)
        return decide(observation, new).terminate

    assert victims(old_ready, new_ready, wanted=1) == ("i-old",)
    # A pending or booting one holds nothing yet: it still goes first; then the old
    # image (but a new image whose workers never serve must not keep the old fleet going).
    assert victims(old_ready, new_booting, pending, wanted=0) == ("i-pend", "i-boot", "i-old")
    assert victims(old_ready, unknown, new_ready, wanted=2) == ("i-old",)
    # All on one image: as before, the newest first.
    assert victims(new_ready, unknown, wanted=1) == ("i-just",)


def test_workers_that_never_say_they_serve_hold_back_launches_only_while_they_could_be_booting():
    """Launches for the messages no worker holds count those launched and not yet
    receiving; counted for good, the workers of an older AMI (READY_DEADLINE=0), which
    never say they serve, would hold back every launch."""
    silent = obs(visible=5, in_flight=100, booting=5)
    assert len(decide(silent, BACKLOG).launch) == 5  # silent for longer than anyone knows
    seen_for = {i.id: BACKLOG.boot_time_s * 2 + 1 for i in silent.instances}
    assert len(decide(replace(silent, silent_for=seen_for), BACKLOG).launch) == 5
    # Within two BOOT_TIMEs of their launch as the loop times it (silent_for, on the
    # controller's own clock), whatever EC2's LaunchTime says (a controller's clock may be off).
    just_seen = replace(silent, silent_for={i.id: BACKLOG.boot_time_s * 2 - 1 for i in silent.instances})
    assert decide(just_seen, BACKLOG).launch == ()
    assert len(decide(obs(visible=5, in_flight=100, pending=5, at=1000.0), BACKLOG).launch) == 0


def test_latency_mode_launches_from_zero():
    policy = Policy(mode="latency", boot_time_s=1000)
    assert len(decide(obs(visible=1), policy).launch) == 1


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        Policy(mode="vibes")
    with pytest.raises(ValueError):
        Policy(target_backlog_per_instance=0)


def test_a_latency_target_that_floats_just_under_a_whole_number_is_that_number():
    """3.3 / 1.1 is 2.9999999999999996: a backlog of 3 must not want only 2 instances."""
    from dataclasses import replace

    policy = replace(BACKLOG, mode="latency", acceptable_latency_s=3.3, seconds_per_image=1.1)
    decision = decide(obs(visible=3), policy)
    assert decision.desired == 1 and "target 3" in decision.reason


def test_requests_untaken_beside_receivers_for_the_deadline_count_the_oldest_receiver():
    waiting = obs(visible=2, running=3)
    assert untaken_beside_receivers(waiting)
    assert not_receiving(waiting, waited_s=119.9, deadline_s=120) is None
    assert not_receiving(waiting, waited_s=120, deadline_s=120).id == "i-0001"  # launched first
    assert not_receiving(waiting, waited_s=10_000, deadline_s=0) is None  # 0: off


@pytest.mark.parametrize("name, observation", [
    ("a request in flight: a worker receives", obs(visible=2, in_flight=1, running=2)),
    ("nothing visible", obs(running=2)),
    ("delayed requests are not visible yet", obs(delayed=3, running=2)),
    ("pending instances do not receive yet", obs(visible=2, pending=2)),
    ("booting ones neither", obs(visible=2, booting=2)),
    ("nor ones ending", obs(visible=2, shutting=2)),
])
def test_requests_that_wait_for_no_receiver_count_no_instance(name, observation):
    assert not untaken_beside_receivers(observation), name
    assert not_receiving(observation, waited_s=10_000, deadline_s=120) is None, name


def test_an_instance_already_counted_failed_is_no_receiver():
    observation = failed(obs(visible=2, running=2), 1)
    counted = not_receiving(observation, waited_s=120, deadline_s=120)
    assert counted is not None and counted.id == "i-0002"
    assert untaken_beside_receivers(failed(obs(visible=2, running=2), 2)) is False


def test_the_progress_watch_doubles_its_deadline_for_each_count_until_a_request_is_in_flight():
    watch = ProgressWatch()
    assert watch.deadline(120.0) == 120.0
    for n in range(1, 7):
        watch.count(f"i-{n:04d}", "not receiving", 1000.0 * n)
        watch.progressed(0)  # nothing in flight: no worker receives
        assert watch.deadline(120.0) == 120.0 * 2 ** min(n, PROGRESS_DEADLINE_DOUBLINGS)
    assert watch.deadline(120.0) == 1920.0  # 32 minutes at most
    watch.progressed(1)  # a request in flight: a worker receives
    assert watch.deadline(120.0) == 120.0


def test_the_progress_watch_times_an_unbroken_wait_and_the_next_count_a_whole_deadline_on():
    watch = ProgressWatch()
    gap = 200.0  # looks further apart than this break the wait (see the next test)
    assert watch.waited(True, 1000.0, gap) == 0.0
    assert watch.waited(True, 1100.0, gap) == 100.0
    assert watch.waited(False, 1101.0, gap) == 0.0  # broken: from the start again
    assert watch.waited(True, 1102.0, gap) == 0.0
    assert watch.waited(True, 1222.0, gap) == 120.0
    watch.count("i-0001", "not receiving", 1222.0)
    assert watch.waited(True, 1300.0, gap) == 78.0
    watch.keep_listed({"i-0002"})  # i-0001 ended
    assert watch.counted == {}


def test_the_progress_watch_takes_a_gap_between_looks_for_a_break():
    watch = ProgressWatch()
    assert watch.waited(True, 1000.0, 30.0) == 0.0
    assert watch.waited(True, 1030.0, 30.0) == 30.0  # 30 s apart: still watched
    assert watch.waited(True, 1060.5, 30.0) == 0.0  # further apart: from the start again
    assert watch.waited(True, 1070.0, 30.0) == 9.5
