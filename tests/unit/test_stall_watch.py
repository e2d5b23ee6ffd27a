"""StallWatch's judgement, with the clock given: no worker, no AWS."""

from __future__ import annotations

import threading
import time

from app_tier.job import Job
from app_tier.stall_watch import FETCH_LOOP, HEARTBEAT_SLACK_S, LOOP_SLACK_S, MAIN_LOOP, StallWatch
from common.messages import ClassifyRequest


def test_the_oldest_call_past_the_stall_timeout_is_the_one_stuck():
    watch = StallWatch(stall_timeout_s=10, heartbeat_period_s=1)
    request = ClassifyRequest("r", "in", "k", "k.jpg")
    decoded, classified = [Job("m1", "r1", request)], [Job("m2", "r2", request)]
    with watch.must_end("decode", decoded, FETCH_LOOP):
        began = time.monotonic()
        done = threading.Event()
        in_model = threading.Event()

        def model_call() -> None:
            with watch.must_end("model call", classified, MAIN_LOOP):
                in_model.set()
                done.wait(10)

        other = threading.Thread(target=model_call)
        other.start()
        try:
            assert in_model.wait(10)
            assert watch.stuck(began + 9) is None, "slow, not stuck"
            stuck = watch.stuck(began + 60)
            assert stuck is not None and stuck.kind == "decode" and stuck.jobs == decoded
            assert stuck.loop == FETCH_LOOP
            assert {c.kind for c in watch.calls_under_way()} == {"decode", "model call"}
        finally:
            done.set()
            other.join(10)
    assert watch.calls_under_way() == [] and watch.stuck(began + 60) is None


def test_a_loop_iteration_is_stuck_only_past_every_bound_and_while_its_loop_runs():
    watch = StallWatch(stall_timeout_s=10, heartbeat_period_s=1)
    watch.tick(FETCH_LOOP)
    began = time.monotonic()
    assert watch.stuck(began + 10 + LOOP_SLACK_S - 1) is None
    stuck = watch.stuck(began + 10 + LOOP_SLACK_S + 1)
    assert stuck is not None and stuck.kind == "fetch loop iteration" and stuck.jobs == []
    assert stuck.loop == FETCH_LOOP
    watch.loop_ended(FETCH_LOOP)
    assert watch.stuck(began + 10 + LOOP_SLACK_S + 1) is None


def test_the_heartbeat_beats_while_it_lives_and_its_rounds_end_in_time():
    watch = StallWatch(stall_timeout_s=10, heartbeat_period_s=5)
    watch.beat()
    now = time.monotonic()
    alive = threading.current_thread()
    assert watch.beats(alive, now)
    assert not watch.beats(alive, now + 5 + HEARTBEAT_SLACK_S + 1), "a round blocked"
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join(10)
    assert not watch.beats(dead, now)
