"""The local instance runner: one process per live instance, stopped as EC2 would stop it."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moto import mock_aws

from app_tier import EXIT_CANNOT_START, EXIT_GAVE_UP
from app_tier.held_journal import held_journal_path
from common.aws import Aws
from common.config import Settings
from common.fleet import WORKER_FAILED_TAG
from controller.act import launch, terminate
from localaws.runner import QUICK_EXIT_S, RESTART_BACKOFF_S, InstanceRunner, ended_after_abort, is_stopped
from tests.conftest import wait_for

# Stands in for `python -m app_tier`: records its instance id and waits.
# "stubborn" ignores SIGTERM, as a hung worker would; "no-abort" ignores SIGABRT, as one
# whose stack dump on it hangs would; "drains" exits 0 on SIGTERM, as a
# serving worker does after its warm shutdown; "no-model" exits at once as a
# worker that cannot load its weights does; "crash" dies at start; a spare says its
# model is loaded, unless "still-loading"; "gives-up" exits as a worker that gave up
# serving does; "pings" says
# READY=1 and pings its watchdog through the worker's own module (common.systemd)
# until a file hang.<pid> appears, then goes silent, as a hang holding Python's lock.
FAKE_WORKER = """
import os, signal, sys, time
if os.environ.get("FAKE_MODE") == "no-model":
    sys.exit(78)
if os.environ.get("FAKE_MODE") == "crash":
    sys.exit(1)
if os.environ.get("FAKE_MODE") == "gives-up":  # as one that served, then gave up
    sys.exit(79)
if os.environ.get("FAKE_MODE") == "load-fails":  # a spare whose load fails once the test says
    while not os.path.exists(os.path.join(os.environ["FAKE_OUT"], f"fail.{os.getpid()}")):
        time.sleep(0.02)
    sys.exit(78)
args = sys.argv[1:]
iid = args[args.index("--instance-id") + 1]
if iid == "-":
    if os.environ.get("FAKE_MODE") != "still-loading":  # as a spare whose model is loaded
        sys.path.insert(0, os.getcwd())
        from app_tier import SPARE_LOADED
        from common import systemd
        systemd.notify("STATUS=" + SPARE_LOADED)
    iid = sys.stdin.readline().strip()
    if not iid:
        sys.exit(0)
if os.environ.get("FAKE_MODE") == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("FAKE_MODE") == "no-abort":
    signal.signal(signal.SIGABRT, signal.SIG_IGN)
if os.environ.get("FAKE_MODE") == "drains":  # as a serving worker's warm shutdown ends
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
out = os.environ["FAKE_OUT"]
open(os.path.join(out, f"{iid}.{os.getpid()}"), "w").close()
if os.environ.get("FAKE_MODE") == "pings":
    sys.path.insert(0, os.getcwd())
    from common import systemd
    systemd.notify("READY=1")
    while not os.path.exists(os.path.join(out, f"hang.{os.getpid()}")):
        systemd.notify("WATCHDOG=1")
        # Four times a period, not the worker's two: a healthy ping a second late on a
        # loaded machine is not what these tests are about.
        time.sleep(systemd.watchdog_interval_s() / 2)
while True:
    time.sleep(0.05)
"""


def wait_until(predicate, timeout_s: float = 30.0, what: str = "the condition") -> object:
    # Often fast: many predicates step the runner, which a slower poll would slow down.
    return wait_for(predicate, timeout_s, what, interval=0.02)


@pytest.fixture
def world(tmp_path, monkeypatch):
    with mock_aws():
        settings = dataclasses.replace(Settings(), local_boot_delay_s=0.0)
        script = tmp_path / "fake_worker.py"
        script.write_text(FAKE_WORKER)
        out = tmp_path / "started"
        out.mkdir()
        env = {"FAKE_OUT": str(out), "PATH": "/usr/bin:/bin"}
        runners: list[InstanceRunner] = []

        def make(**kw) -> InstanceRunner:
            settings_kw = {k: kw.pop(k) for k in list(kw) if hasattr(settings, k)}
            runner = InstanceRunner(
                dataclasses.replace(settings, **settings_kw), env=dict(env, **kw.pop("env", {})),
                log_dir=tmp_path / "logs", worker_argv=[sys.executable, str(script)], **kw)
            runners.append(runner)
            return runner

        yield settings, Aws(settings), make, out
        for runner in runners:
            runner.shutdown(timeout_s=2)


def started(out: Path) -> list[str]:
    return sorted(p.name.split(".")[0] for p in out.iterdir() if p.name.startswith("i-"))


def test_each_live_instance_gets_one_worker_after_the_boot_delay(world):
    settings, aws, make, out = world
    runner = make(local_boot_delay_s=0.5, warm_spares=0)
    ids = launch(aws, settings, (1, 2))
    runner.step()
    assert runner.workers == {}, "still booting"
    wait_until(lambda: (runner.step(), len(runner.workers) == 2)[1], what="two workers after the boot delay")
    wait_until(lambda: started(out) == sorted(ids.values()), what="workers to start")
    runner.step()
    assert len(runner.workers) == 2 and runner.started_total == 2, "no second process per instance"


def test_short_of_processes_it_serves_the_instances_the_controller_scales_in_last(world, monkeypatch):
    """A replacement numbered 1, launched last, must not be served before older instances
    3 to 15, then scaled in mid-batch while they, without a process, are kept."""
    from common.fleet import Instance
    from localaws import runner as runner_module
    _, _, make, out = world
    fleet = (Instance("i-replacement", number=1, state="running", launched_at=200.0),
             Instance("i-older", number=3, state="running", launched_at=100.0))
    monkeypatch.setattr(runner_module, "app_tier_instances", lambda aws: fleet)
    runner = make(warm_spares=0, local_max_workers=1)
    runner.step()
    assert list(runner.workers) == ["i-older"]
    wait_until(lambda: started(out) == ["i-older"], what="its worker to start")


def test_the_cap_is_said_once_each_time_it_holds_an_instance_back(world, monkeypatch, caplog):
    from common.fleet import Instance
    from localaws import runner as runner_module
    _, _, make, _ = world
    served = Instance("i-served", number=2, state="running", launched_at=100.0)
    waiting = Instance("i-waiting", number=1, state="running", launched_at=200.0)
    fleet = [served, waiting]
    monkeypatch.setattr(runner_module, "app_tier_instances", lambda aws: tuple(fleet))
    runner = make(warm_spares=0, local_max_workers=1)
    caplog.set_level(logging.WARNING, logger="localaws.runner")

    def said() -> int:
        return caplog.text.count("LOCAL_MAX_WORKERS=1 reached")

    runner.step()
    runner.step()
    assert list(runner.workers) == ["i-served"] and said() == 1
    # How many wait, not one id of them, which reads as one where 12 wait.
    assert "LOCAL_MAX_WORKERS=1 reached; 1 instance(s) wait for a free slot: i-waiting" in caplog.text
    fleet.remove(waiting)
    runner.step()
    fleet.append(waiting)
    runner.step()
    assert said() == 2


def stubborn_worker(world) -> tuple[InstanceRunner, str, object]:
    """A runner serving one instance whose worker ignores SIGTERM: (runner, instance id, process)."""
    settings, aws, make, out = world
    runner = make(warm_spares=0, grace_s=0.5, env={"FAKE_MODE": "stubborn"})
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    wait_until(lambda: started(out) == [iid], what="the worker to start")
    return runner, iid, runner.workers[iid].process


def test_a_terminated_instance_gets_sigterm_then_sigkill(world):
    _, aws, _, _ = world
    runner, iid, process = stubborn_worker(world)
    terminate(aws, (iid,))
    runner.step()
    assert iid not in runner.workers
    assert process.poll() is None, "SIGTERM ignored: still alive during the grace period"
    wait_until(lambda: (runner.step(), process.poll() is not None)[1], what="SIGKILL after the grace period")
    assert process.returncode == -9


def test_a_worker_still_stopping_counts_against_local_max_workers(world, caplog):
    """LOCAL_MAX_WORKERS is a memory budget, and a worker finishing its batch after
    SIGTERM holds its model: a burst just after a scale-in must not start a full fleet
    beside the one stopping."""
    settings, aws, make, out = world
    runner = make(warm_spares=0, grace_s=1.0, local_max_workers=1, env={"FAKE_MODE": "stubborn"})
    first = launch(aws, settings, (1,))[1]
    runner.step()
    wait_until(lambda: started(out) == [first], what="the first worker to start")
    stopping = runner.workers[first].process
    terminate(aws, (first,))
    second = launch(aws, settings, (2,))[2]
    runner.step()
    assert runner.workers == {} and stopping.poll() is None
    assert "LOCAL_MAX_WORKERS=1 reached (1 of them stopping); 1 instance(s) wait" in caplog.text
    wait_until(lambda: (runner.step(), second in runner.workers)[1], what="the second worker")
    assert stopping.poll() == -9  # not before the first had ended (SIGKILL, at the end of its grace)


@pytest.mark.parametrize("mode, ended", [("", "killed by SIGTERM"), ("drains", "exit 0"),
                                         ("stubborn", "killed by SIGKILL")])
def test_a_stopped_worker_is_said_how_it_ended_once_reaped(world, caplog, mode, ended):
    """The runner said "SIGTERM to pid N" and never how the worker ended: one stopped
    while loading its model left an empty log and nothing here either."""
    settings, aws, make, out = world
    caplog.set_level(logging.INFO, logger="localaws.runner")
    runner = make(warm_spares=0, grace_s=0.5, env={"FAKE_MODE": mode})
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    wait_until(lambda: started(out) == [iid], what="the worker to start")
    pid = runner.workers[iid].process.pid
    terminate(aws, (iid,))
    said = re.compile(rf"runner: worker pid {pid} of {iid} ended: {ended}, [0-9.]+ s after SIGTERM$", re.M)
    wait_until(lambda: (runner.step(), said.search(caplog.text))[1], what="how the worker ended")
    runner.step()
    runner.step()
    assert len(said.findall(caplog.text)) == 1  # once, not every round after


def test_a_worker_killed_as_its_instance_ends_has_what_it_held_shown_and_its_journal_removed(
        world, tmp_path, caplog):
    """Read only by the next worker on the same instance, which a terminated one never
    has: its requests would wait for their visibility timeout, a minute, the fleet held
    meanwhile, and the file stay in the user's state directory for ever."""
    from common.provision import provision

    caplog.set_level(logging.INFO, logger="localaws.runner")

    settings, aws, make, out = world
    runner = make(warm_spares=0, grace_s=0.2, env={"FAKE_MODE": "stubborn"},
                  state_dir=str(tmp_path / "state"))
    provision(runner.settings)
    queue = Aws(runner.settings).request_queue_url
    aws.sqs.send_message(QueueUrl=queue, MessageBody="held by the killed worker")
    (held,) = aws.sqs.receive_message(QueueUrl=queue, VisibilityTimeout=600)["Messages"]
    iid, other = launch(aws, settings, (1, 2)).values()
    runner.step()
    wait_until(lambda: started(out) == sorted([iid, other]), what="the workers to start")
    journals = {i: held_journal_path(runner.settings, i) for i in (iid, other)}
    journals[iid].parent.mkdir(parents=True, exist_ok=True)
    journals[iid].write_text(json.dumps({"held": [{"receipt": held["ReceiptHandle"],
                                                   "hidden_until": time.time() + 600}]}))
    journals[other].write_text('{"held": []}')
    process = runner.workers[iid].process
    terminate(aws, (iid,))
    wait_until(lambda: (runner.step(), process.poll() is not None)[1], what="SIGKILL after the grace period")
    wait_until(lambda: (runner.step(), not journals[iid].exists())[1], what="its journal to be removed")
    attributes = aws.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "1"  # visible again, at once
    assert journals[other].exists(), "a live instance's journal is its next worker's"
    # A kill mid-write leaves a new version unfinished beside it.
    unfinished = journals[other].with_name(journals[other].name + ".999.tmp")
    unfinished.write_text("")
    # Shut down with the embedded AWS, every instance ends: nothing will read them.
    other_pid = runner.workers[other].process.pid
    runner.shutdown(timeout_s=0.5)
    assert not journals[other].exists() and not unfinished.exists()
    assert re.search(rf"worker pid {other_pid} of {other} ended: [^,]+, with the runner", caplog.text)


def test_a_worker_whose_restart_waits_has_what_it_held_shown_at_once(world, tmp_path):
    """Only its successor showed it: after quick exits in a row, up to a minute later.
    On an instance the unit's ExecStopPost shows it at every stop."""
    from common.provision import provision

    settings, aws, make, out = world
    runner = make(warm_spares=0, env={"FAKE_MODE": "crash"}, state_dir=str(tmp_path / "state"))
    provision(runner.settings)
    queue = Aws(runner.settings).request_queue_url
    aws.sqs.send_message(QueueUrl=queue, MessageBody="held by the crashing worker")
    (held,) = aws.sqs.receive_message(QueueUrl=queue, VisibilityTimeout=600)["Messages"]
    (iid,) = launch(aws, settings, (1,)).values()
    journal = held_journal_path(runner.settings, iid)
    journal.parent.mkdir(parents=True, exist_ok=True)
    entry = {"receipt": held["ReceiptHandle"], "hidden_until": time.time() + 600}
    journal.write_text(json.dumps({"held": [entry]}))

    def restart_waits() -> bool:
        runner.step()
        worker = runner.workers.get(iid)
        return worker is not None and worker.restart_at is not None and worker.restart_at > time.monotonic()

    wait_until(restart_waits, what="a restart that waits")
    assert not journal.exists()
    attributes = aws.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "1"  # visible again, at once


def test_a_worker_that_outlives_sigkill_does_not_hold_up_the_rounds(world, monkeypatch):
    """A debugger attached to a worker keeps it alive after SIGKILL: the runner must not
    wait 5 s for it, then raise, in every round after, so the watchdog never runs and a
    launch waits 7 s for its worker."""
    settings, aws, _, _ = world
    runner, iid, process = stubborn_worker(world)
    kills: list[int] = []
    real_signal = InstanceRunner._signal

    def sigkill_outlived(target, sig):  # as if a debugger held the process
        if sig == signal.SIGKILL:
            kills.append(target.pid)
            return
        real_signal(target, sig)

    waits: list[float | None] = []
    real_wait = process.wait

    def noted_wait(timeout=None):
        waits.append(timeout)
        return real_wait(timeout)

    monkeypatch.setattr(InstanceRunner, "_signal", staticmethod(sigkill_outlived))
    monkeypatch.setattr(process, "wait", noted_wait)
    terminate(aws, (iid,))
    wait_until(lambda: (runner.step(), kills)[1], what="SIGKILL after the grace period")
    second = launch(aws, settings, (2,))[2]
    runner.step()
    assert second in runner.workers
    runner.step()
    assert waits == [], "a round waited for the process that outlived SIGKILL"
    assert kills == [process.pid], "SIGKILL once, not again every round"
    assert process.poll() is None  # still there: reaped by a later round, or killed at shutdown


def test_kill_and_wait_leaves_a_process_that_outlives_sigkill_behind_and_says_so(caplog):
    import subprocess

    from localaws.kill import kill_and_wait

    class Held:  # SIGKILLed, but not gone: as a process a debugger holds
        pid = os.getpid()  # never signalled: killpg is replaced below

        def poll(self):
            return None

        def wait(self, timeout):
            raise subprocess.TimeoutExpired("held", timeout)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "killpg", lambda pgid, sig: None)
        with caplog.at_level(logging.ERROR, logger="localaws.kill"):
            assert kill_and_wait(Held(), wait_s=0.01) is False
    assert "outlived SIGKILL" in caplog.text and "left behind" in caplog.text


def test_a_crashed_worker_is_restarted_like_systemd_would(world):
    settings, aws, make, out = world
    runner = make(warm_spares=0)
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    first = runner.workers[iid].process
    wait_until(lambda: started(out) == [iid], what="the worker to start")
    first.kill()
    first.wait()
    wait_until(lambda: (runner.step(), runner.workers[iid].process is not first)[1], timeout_s=30,
               what="a restart")
    assert runner.workers[iid].restarts == 1
    wait_until(lambda: started(out) == [iid, iid], what="the restarted worker to start")
    # The instance's log is the newest process's.
    assert os.readlink(runner.log_dir / f"{iid}.log") == "worker-002.log"


@pytest.mark.parametrize(("how", "ended_by"), [("silent", -signal.SIGABRT), ("stopped", -signal.SIGABRT)])
def test_a_worker_that_stops_pinging_its_watchdog_is_aborted_and_restarted(world, how, ended_by, caplog):
    """As systemd does with WatchdogSec=: SIGABRT once a ready worker has been silent
    for the watchdog's time (with SIGCONT: a stopped process acts on it only once
    continued), SIGKILL if that does not end it, then a restart."""
    caplog.set_level(logging.INFO, logger="localaws.runner")
    settings, aws, make, out = world
    # A 3 s watchdog over pings every 0.5 s: a loaded machine may hold the pinger back 2 s.
    runner = make(warm_spares=0, local_watchdog_s=3.0, grace_s=0.5, env={"FAKE_MODE": "pings"})
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    first = runner.workers[iid].process
    sockets = runner._notify[first].path.parent
    wait_until(lambda: started(out) == [iid], what="the worker to start")
    # Pinging every 0.5 s, it lives past the watchdog's time since READY: pings heard
    # more than watchdog_s after it, the same process alive throughout (silent, it
    # would have been aborted watchdog_s after READY, and no later ping heard).
    ready_heard: list[float] = []

    def pinged_past_the_watchdog() -> bool:
        runner.step()
        assert runner.workers[iid].process is first and first.poll() is None, "ended while pinging"
        notify = runner._notify[first]
        if notify.last_heard is None:
            return False
        ready_heard[:] = ready_heard or [notify.last_heard]
        return notify.last_heard - ready_heard[0] > notify.watchdog_s

    wait_until(pinged_past_the_watchdog, timeout_s=30, what="pings heard past the watchdog's time")
    assert f"worker pid {first.pid} for {iid} is ready" in caplog.text
    if how == "silent":
        (out / f"hang.{first.pid}").touch()
    else:
        first.send_signal(signal.SIGSTOP)
    wait_until(lambda: (runner.step(), first.poll() is not None)[1], what="the watchdog to end it")
    assert first.returncode == ended_by
    said = "ended: killed by the watchdog's SIGABRT; restarting"
    wait_until(lambda: (runner.step(), said in caplog.text)[1], what="its end said")
    if how == "stopped":  # continued, it acts on SIGABRT at once: not left to the SIGKILL
        assert re.search(rf"\(pid {first.pid}\) has not pinged its watchdog for \d+ s, as it is stopped "
                         r"\(SIGSTOP\?\); SIGABRT", caplog.text)
        assert "outlived SIGABRT" not in caplog.text
    wait_until(lambda: (runner.step(), runner.workers[iid].process is not first)[1], timeout_s=30,
               what="a restart")
    assert runner.workers[iid].restarts == 1
    wait_until(lambda: started(out) == [iid, iid], what="the restarted worker to start")
    runner.shutdown(timeout_s=2)
    assert not sockets.exists()


def test_how_a_worker_the_watchdog_aborted_ended_is_said_so():
    """Killed by SIGSEGV after the watchdog's SIGABRT was said as a crash of its own."""
    assert ended_after_abort(-signal.SIGSEGV) == (
        "killed by SIGSEGV after the watchdog's SIGABRT (a crash while it wrote its threads' stacks: "
        "its log may hold only part of them)")
    assert ended_after_abort(-signal.SIGKILL) == "killed by SIGKILL after the watchdog's SIGABRT"
    assert ended_after_abort(-signal.SIGTERM) == "killed by SIGTERM after the watchdog's SIGABRT"  # outside
    assert ended_after_abort(1) == "exit 1 after the watchdog's SIGABRT"


def test_a_worker_that_never_says_it_is_ready_is_aborted_and_restarted(world, caplog):
    """As systemd does with TimeoutStartSec=: a worker that hangs before READY=1 (this
    stand-in never sends it) would otherwise hold its instance for good."""
    settings, aws, make, out = world
    runner = make(warm_spares=0, start_timeout_s=0.5, grace_s=0.5)
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    first = runner.workers[iid].process
    wait_until(lambda: (runner.step(), first.poll() is not None)[1], what="the start timeout to end it")
    assert first.returncode == -signal.SIGABRT
    assert f"(pid {first.pid}) has not said it is ready" in caplog.text
    wait_until(lambda: (runner.step(), runner.workers[iid].process is not first)[1], timeout_s=30,
               what="a restart")


def test_a_worker_that_outlives_the_watchdogs_sigabrt_is_sigkilled_and_restarted(world, caplog):
    """A worker that does not end on SIGABRT (this stand-in ignores it) is SIGKILLed once
    it has outlived it by the grace period, as systemd does; then restarted."""
    caplog.set_level(logging.INFO, logger="localaws.runner")
    settings, aws, make, out = world
    runner = make(warm_spares=0, start_timeout_s=0.5, grace_s=0.5, env={"FAKE_MODE": "no-abort"})
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    first = runner.workers[iid].process
    # Its file is written once it ignores SIGABRT: no round runs the watchdog before.
    wait_until(lambda: started(out) == [iid], what="the worker to start")
    wait_until(lambda: (runner.step(), runner.workers[iid].abort_sent_at is not None)[1],
               what="the start timeout's SIGABRT")
    assert first.poll() is None, "SIGABRT ignored: still alive during the grace period"
    wait_until(lambda: (runner.step(), first.poll() is not None)[1], what="SIGKILL after the grace period")
    assert first.returncode == -signal.SIGKILL
    assert re.search(rf"pid {first.pid} outlived SIGABRT for \d+s, SIGKILL", caplog.text)
    said = f"worker for {iid} ended: killed by SIGKILL after the watchdog's SIGABRT; restarting it"
    wait_until(lambda: (runner.step(), said in caplog.text)[1], what="its end said")
    wait_until(lambda: (runner.step(), runner.workers[iid].process is not first)[1], timeout_s=30,
               what="a restart")


def test_a_hung_warm_spare_given_an_instance_is_replaced_within_its_short_start_timeout(world, caplog):
    """A stopped spare handed an instance must not have the full cold start's 15 minutes
    to say it is ready: nothing is served meanwhile."""
    settings, aws, make, out = world
    runner = make(warm_spares=1, adopted_start_timeout_s=0.5, grace_s=0.5)
    runner.step()
    (spare,) = runner._spares
    wait_until(lambda: (runner._hear(), runner._spare_loaded(spare))[1], what="the spare to load its model")
    spare.send_signal(signal.SIGSTOP)
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    assert runner.workers[iid].process is spare
    wait_until(lambda: (runner.step(), spare.poll() is not None)[1], what="the start timeout to end it")
    assert f"(pid {spare.pid}) has not said it is ready" in caplog.text
    wait_until(lambda: (runner.step(), runner.workers[iid].process is not spare)[1], timeout_s=30,
               what="a replacement")
    wait_until(lambda: started(out) == [iid], what="the replacement to take the instance")


def test_a_spare_still_loading_its_model_when_adopted_has_a_cold_starts_time(world):
    settings, aws, make, out = world
    runner = make(warm_spares=1, adopted_start_timeout_s=0.5, env={"FAKE_MODE": "still-loading"})
    runner.step()
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    assert runner.workers[iid].start_timeout_s == runner.start_timeout_s > 0.5


def test_a_warm_spare_is_adopted_by_the_next_instance(world):
    settings, aws, make, out = world
    runner = make(warm_spares=1)
    runner.step()
    assert len(runner._spares) == 1 and started(out) == []
    spare_pid = runner._spares[0].pid
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    assert runner.workers[iid].process.pid == spare_pid
    wait_until(lambda: started(out) == [iid], what="the spare to take the instance id")
    assert len(runner._spares) == 1, "a new spare replaces the adopted one"
    # The spare's log, named before it had an instance, is found by the instance's id.
    link = runner.log_dir / f"{iid}.log"
    assert link.is_symlink() and link.resolve() == (runner.log_dir / "worker-001.log").resolve()


def test_shutdown_leaves_no_process(world):
    settings, aws, make, out = world
    runner = make(warm_spares=1, env={"FAKE_MODE": "stubborn"})
    launch(aws, settings, (1, 2))
    runner.step()
    processes = [w.process for w in runner.workers.values()] + list(runner._spares)
    runner.shutdown(timeout_s=0.5)
    assert all(p.poll() is not None for p in processes)


def test_shutdown_does_not_signal_a_worker_already_stopping_again(world, monkeypatch):
    """A worker draining after its instance ended had SIGTERM a second time at the stack's
    stop: it logged the signal twice, and, its warm shutdown done, was said "killed by
    SIGTERM" by the second."""
    settings, aws, make, out = world
    runner = make(warm_spares=0, env={"FAKE_MODE": "stubborn"})  # drains for as long as it likes
    (iid,) = launch(aws, settings, (1,)).values()
    runner.step()
    wait_until(lambda: started(out) == [iid], what="the worker to start")
    draining = runner.workers[iid].process
    terminate(aws, (iid,))
    wait_until(lambda: (runner.step(), draining in [w.process for w in runner._draining])[1],
               what="the worker told to stop")
    sent: list[tuple[int, int]] = []
    real_signal = runner._signal
    monkeypatch.setattr(runner, "_signal", lambda process, sig: sent.append((process.pid, sig))
                        or real_signal(process, sig))
    runner.shutdown(timeout_s=0.5)
    assert (draining.pid, signal.SIGTERM) not in sent, sent
    assert draining.poll() is not None  # killed once its time was up


def test_workers_outlive_the_runners_rounds_until_its_shutdown(world):
    """Each worker is told to end when the thread that started it does (PR_SET_PDEATHSIG
    follows the thread): if the runner's thread returned as its rounds ended, every
    worker would have SIGTERM at once, before the web tier and the controller are
    stopped. It waits for shutdown(), which stops them."""
    import threading

    settings, aws, make, out = world
    class ShutDown(threading.Event):
        """Says when run() has come to wait for shutdown() (and not returned)."""

        def __init__(self) -> None:
            super().__init__()
            self.awaited = threading.Event()

        def wait(self, timeout: float | None = None) -> bool:
            self.awaited.set()
            return super().wait(timeout)

    runner = make(warm_spares=0, env={"FAKE_MODE": "drains"}, poll_s=0.05)
    runner.shut_down = ShutDown()
    thread = threading.Thread(target=runner.run, name="runner", daemon=True)
    thread.start()
    launch(aws, settings, (1,))
    wait_until(lambda: started(out), what="a worker for the instance")
    worker = next(iter(runner.workers.values())).process
    runner.stopping.set()
    assert runner.rounds_over.wait(10)
    assert runner.shut_down.awaited.wait(10), "run() returned without waiting for shutdown()"
    assert thread.is_alive() and worker.poll() is None
    runner.shutdown(timeout_s=5)
    assert worker.poll() == 0  # its warm shutdown, once
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_nothing_is_started_once_shutdown_has_begun(world):
    """A round that runs after shutdown() took its list would leave a worker behind."""
    settings, aws, make, out = world
    runner = make(warm_spares=1)
    runner.step()
    runner.shutdown(timeout_s=1)
    launch(aws, settings, (1,))
    runner.step()
    assert runner.workers == {} and runner._spares == []
    assert started(out) == []



def test_a_round_whose_ec2_call_outlasts_the_shutdown_starts_nothing(world, monkeypatch):
    """A stop waits for the rounds a while, then shuts down: a round stuck in its EC2 call
    (the embedded AWS paused) then started workers shutdown() never saw, each left
    running until the stack's end, their logs and notify folder left behind."""
    import localaws.runner as runner_module

    settings, aws, make, out = world
    runner = make(warm_spares=1)
    launch(aws, settings, (1,))
    real = runner_module.app_tier_instances

    def answered_after_the_shutdown(client):
        answer = real(client)
        runner.shutdown(timeout_s=1)  # as the stack's stop, from its own thread, meanwhile
        return answer

    monkeypatch.setattr(runner_module, "app_tier_instances", answered_after_the_shutdown)
    runner.step()
    assert runner.workers == {} and runner._spares == [] and runner._notify == {}
    assert started(out) == [] and not list((runner.log_dir).glob("worker-*.log"))


def test_the_runner_asks_ec2_what_the_controller_asks(world):
    """So the embedded AWS answers both from one cached DescribeInstances, as for the
    benchmark's fleet poller (tests/unit/test_bench_fleet.py)."""
    from common.fleet import app_tier_instances

    settings, aws, make, out = world
    runner = make()
    launch(aws, settings, (1,))
    asked: dict[str, list] = {"runner": [], "controller": []}
    for who, client in (("runner", runner.aws.ec2), ("controller", aws.ec2)):
        client.meta.events.register("provide-client-params.ec2.DescribeInstances",
                                    lambda params, who=who, **_: asked[who].append(params.get("Filters")))
    runner.step()
    app_tier_instances(aws)  # what controller.observe asks
    assert asked["runner"] and asked["runner"] == asked["controller"]
    assert len(runner.workers) == 1


def test_the_runner_reads_ec2_with_the_keys_it_gives_its_workers(world, monkeypatch, tmp_path):
    """make run gives its keys to its children, not to its own environment (localaws/stack.py):
    the runner, in make run's process, signs with those of the environment it is given."""
    from tests.conftest import without_credentials

    settings, aws, make, out = world
    iid = launch(aws, settings, (1,))[1]
    without_credentials(monkeypatch, tmp_path)
    runner = make(warm_spares=0, env={"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"})
    runner.step()  # raised NoCredentialsError
    assert list(runner.workers) == [iid]


def exits_and_is_not_restarted(runner, iid: str, code: int) -> None:
    """The worker for `iid` exits with `code`, and is not started again well past when a
    restart would have come."""
    runner.step()
    worker = runner.workers[iid]
    wait_until(lambda: worker.process.poll() is not None, what="the worker to exit")
    assert worker.process.returncode == code
    deadline = time.monotonic() + 3 * RESTART_BACKOFF_S
    while time.monotonic() < deadline:
        runner.step()
        time.sleep(0.05)
    assert runner.workers[iid] is worker and worker.given_up and runner.started_total == 1


def test_a_worker_that_cannot_load_its_model_is_not_restarted(world, caplog):
    """As systemd's RestartPreventExitStatus on an instance: it would only fail again."""
    settings, aws, make, out = world
    runner = make(warm_spares=1, env={"FAKE_MODE": "no-model"})
    iid = launch(aws, settings, (1,))[1]
    exits_and_is_not_restarted(runner, iid, EXIT_CANNOT_START)
    assert runner.warm_spares == 0 and runner._spares == []  # spares would fail the same way
    # Once for the worker, once for spares.
    assert caplog.text.count("cannot start: a setting is wrong or the model cannot") == 2


def test_a_spare_whose_model_fails_to_load_once_adopted_has_its_instance_reported_failed(world):
    """It reads its instance's id only once its model is loaded: one whose load failed
    after it was given the instance exited 78 without the tag a worker started with the
    id puts, and the controller counted the instance as booting (for good, with
    READY_DEADLINE 0). The runner says it for it."""
    settings, aws, make, out = world
    runner = make(warm_spares=1, env={"FAKE_MODE": "load-fails"})
    runner.step()
    (spare,) = runner._spares
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    assert runner.workers[iid].process is spare
    (out / f"fail.{spare.pid}").touch()
    wait_until(lambda: (runner.step(), runner.workers[iid].given_up)[1], what="the spare to exit")
    reply = aws.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [iid]}])
    assert {t["Key"]: t["Value"] for t in reply["Tags"]}.get(WORKER_FAILED_TAG) == "model-unavailable"


def test_a_worker_that_gave_up_serving_is_not_restarted(world, caplog):
    """As systemd's RestartPreventExitStatus on an instance: it has reported its instance
    failed, and restarted it took batches again only to release them, each costing its
    requests an attempt, until the controller replaced the instance."""
    settings, aws, make, out = world
    runner = make(warm_spares=0, env={"FAKE_MODE": "gives-up"})
    iid = launch(aws, settings, (1,))[1]
    exits_and_is_not_restarted(runner, iid, EXIT_GAVE_UP)
    assert "gave up serving" in caplog.text


def test_a_spare_that_dies_at_start_is_replaced_at_most_once_a_backoff(world, caplog):
    settings, aws, make, out = world
    caplog.set_level(logging.WARNING, logger="localaws.runner")
    runner = make(warm_spares=1, poll_s=0.01, env={"FAKE_MODE": "crash"})
    runner.step()
    first = runner._spares[0]
    started = time.monotonic()
    wait_until(lambda: (runner.step(), runner._spawned >= 3)[1], timeout_s=20, what="two replacements")
    # Each replacement waited a backoff after its predecessor died (not one per 0.01 s poll).
    assert first.returncode == 1
    assert time.monotonic() - started >= 2 * RESTART_BACKOFF_S
    # Said with the log its traceback is in, even when it died after that round's top-up.
    assert f"spare pid {first.pid} ended: exit 1 (log worker-001.log); replacing it in 1 s" in caplog.text


def test_an_unexpected_error_does_not_end_the_runner(world, monkeypatch):
    """The stack stops when its runner thread ends: a round that fails is retried."""
    import threading

    settings, aws, make, out = world
    runner = make(warm_spares=0, poll_s=0.01)
    spawn = runner._spawn
    failures: list[str] = []

    def fork_fails_once(instance_id):
        if not failures:
            failures.append(instance_id)
            raise OSError(11, "Resource temporarily unavailable")
        return spawn(instance_id)

    monkeypatch.setattr(runner, "_spawn", fork_fails_once)
    iid = launch(aws, settings, (1,))[1]
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: started(out) == [iid], what="the worker to start after the failed round")
        assert thread.is_alive() and failures == [iid]
    finally:
        runner.stopping.set()
        thread.join(timeout=5)


def test_a_reaped_worker_is_never_signalled(world, monkeypatch):
    """Its pid, and so its process group id, may belong to another process by now."""
    import os

    settings, aws, make, out = world
    runner = make(warm_spares=0)
    iid = launch(aws, settings, (1,))[1]
    runner.step()
    process = runner.workers[iid].process
    process.kill()
    process.wait()
    signalled: list[int] = []
    monkeypatch.setattr(os, "killpg", lambda pid, sig: signalled.append(pid))
    terminate(aws, (iid,))
    runner.step()
    runner.shutdown(timeout_s=1)
    assert signalled == []


def test_notification_sockets_leave_a_long_tmpdir_for_tmp(tmp_path, monkeypatch):
    """A socket's path is limited to 104-108 bytes; TMPDIR under a test's or a run's
    folder (or macOS's /var/folders/...) can be longer than that."""
    import tempfile

    from localaws.notify import NotifySockets

    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    sockets = NotifySockets(watchdog_s=1.0)
    notify = sockets.new()
    try:
        assert notify.path.parent.parent == Path("/tmp") and len(str(notify.path)) < 104
    finally:
        notify.close()
        sockets.remove_folder()
    assert not notify.path.parent.exists()


class FakeProcess:
    """A worker process that the test ends by setting its returncode (as Popen's after poll)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = io.BytesIO()  # a spare's: where its instance id is written

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


def run_on_a_clock(world, monkeypatch, caplog, fleet: list, warm_spares: int):
    """A runner on a clock the test moves, spawning FakeProcesses: (runner, spawned processes,
    advance(seconds) stepping every 0.25 s)."""
    from localaws import runner as runner_module

    _, _, make, _ = world
    monkeypatch.setattr(runner_module, "app_tier_instances", lambda aws: tuple(fleet))
    now = [1000.0]
    # Only monotonic: a round that slept (time.sleep) would fail here, not block.
    monkeypatch.setattr(runner_module, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    runner = make(warm_spares=warm_spares)
    spawned: list[tuple[float, FakeProcess]] = []

    def spawn(instance_id: str) -> FakeProcess:
        spawned.append((now[0], FakeProcess(pid=100_000 + len(spawned))))
        return spawned[-1][1]

    monkeypatch.setattr(runner, "_spawn", spawn)
    monkeypatch.setattr(runner, "_signal", lambda process, sig: None)  # never a real pid
    caplog.set_level(logging.INFO, logger="localaws.runner")

    def advance(seconds: float, exit_code: int | None = 1, after_s: float = 0.0,
                spares_only: bool = False) -> None:
        """Step the runner for `seconds`; each process (each spare not yet adopted, if
        `spares_only`) exits with `exit_code` once `after_s` old."""
        end = now[0] + seconds
        while now[0] < end:
            now[0] += 0.25
            serving = [w.process for w in runner.workers.values()]
            for born, process in spawned:
                if (process.returncode is None and exit_code is not None and now[0] - born >= after_s
                        and not (spares_only and process in serving)):
                    process.returncode = exit_code
            runner.step()

    runner.step()
    assert len(spawned) == 1
    return runner, spawned, advance


@pytest.fixture
def clocked(world, monkeypatch, caplog):
    """A runner serving the one instance of `fleet` with FakeProcesses, on a clock the test
    moves: (runner, fleet, spawned processes, advance(seconds) stepping every 0.25 s)."""
    from common.fleet import Instance

    fleet = [Instance("i-looping", number=1, state="running", launched_at=100.0)]
    runner, spawned, advance = run_on_a_clock(world, monkeypatch, caplog, fleet, warm_spares=0)
    return runner, fleet, spawned, advance


@pytest.fixture
def spare_clocked(world, monkeypatch, caplog):
    """As `clocked`, with no instance yet and one warm spare."""
    fleet: list = []
    runner, spawned, advance = run_on_a_clock(world, monkeypatch, caplog, fleet, warm_spares=1)
    assert runner._spares == [spawned[0][1]]
    return runner, fleet, spawned, advance


def gaps(spawned: list[tuple[float, FakeProcess]]) -> list[float]:
    return [b[0] - a[0] for a, b in itertools.pairwise(spawned)]


def test_a_worker_that_keeps_failing_at_start_is_restarted_after_a_doubling_delay(clocked, caplog):
    """A bad setting or a broken import made a worker exit at once, restarted once a
    second for ever: a core of a 2-core machine, and a flood of tracebacks."""
    runner, _, spawned, advance = clocked
    advance(400)
    delays = [float(d) for d in re.findall(r"ended: exit 1; restarting it in (\d+) s", caplog.text)]
    assert delays[:8] == [1, 2, 4, 8, 16, 32, 60, 60], "doubling from a second, up to a minute"
    assert len(delays) == sum(p.returncode is not None for _, p in spawned), "said once an exit"
    for gap, delay in zip(gaps(spawned), delays, strict=False):  # the last restart may be due later
        assert delay <= gap <= delay + 0.5
    assert runner.workers["i-looping"].restarts == len(spawned) - 1


def test_a_worker_waiting_out_its_delay_holds_up_no_other_instance(clocked):
    from common.fleet import Instance

    runner, fleet, spawned, advance = clocked
    advance(4)  # restarted after 1 s, then after 2: now 4 s to wait
    assert len(spawned) == 3
    fleet.append(Instance("i-other", number=2, state="running", launched_at=200.0))
    advance(0.25, exit_code=None)
    assert "i-other" in runner.workers and len(spawned) == 4


def test_a_worker_that_ran_for_a_while_is_restarted_at_once_and_its_backoff_reset(clocked, caplog):
    runner, _, spawned, advance = clocked
    advance(4)  # restarted after 1 s, then after 2: now 4 s to wait
    assert len(spawned) == 3
    advance(40, after_s=QUICK_EXIT_S + 1)  # the next ones each serve a while, then exit
    assert gaps(spawned)[3] == QUICK_EXIT_S + 1, "restarted in the round that saw it exit"
    assert "ended: exit 1; restarting it (restart 4)" in caplog.text
    caplog.clear()
    advance(3)
    assert re.findall(r"restarting it in (\d+) s", caplog.text) == ["1", "2"], "counted from one again"


def test_a_worker_killed_from_outside_is_restarted_at_once_however_young(clocked, caplog):
    """The soak test SIGKILLs workers every few seconds: their replacements must not wait."""
    runner, _, spawned, advance = clocked
    for _ in range(5):
        count = len(spawned)
        advance(2, exit_code=None)
        advance(0.25, exit_code=-signal.SIGKILL)
        assert len(spawned) == count + 1
    assert "restarting it in" not in caplog.text


def test_a_worker_waiting_to_be_restarted_is_not_once_its_instance_is_terminated(clocked, caplog):
    runner, fleet, spawned, advance = clocked
    advance(4)  # restarted after 1 s and 2 s; exited again: waits 4 s
    assert "restarting it in 4 s" in caplog.text
    advance(3.5, exit_code=None)  # the restart is due in the next round
    count = len(spawned)
    fleet.clear()  # terminated: gone from what the runner lists
    advance(10)
    assert len(spawned) == count and runner.workers == {}


def spare_delays(text: str) -> list[float]:
    said = re.findall(r"spare pid \d+ ended: exit 1 \(log [^)]*\); replacing it in (\d+) s", text)
    return [float(d) for d in said]


def test_a_spare_that_keeps_failing_at_start_is_replaced_after_a_doubling_delay(spare_clocked, caplog):
    """With a bad setting or a broken import, each new warm spare died at start and was
    replaced once a second for ever, unsaid but for its traceback in a new log."""
    runner, _, spawned, advance = spare_clocked
    advance(400)
    delays = spare_delays(caplog.text)
    assert delays[:8] == [1, 2, 4, 8, 16, 32, 60, 60], "doubling from a second, up to a minute"
    assert len(delays) == sum(p.returncode is not None for _, p in spawned), "said once a death"
    for gap, delay in zip(gaps(spawned), delays, strict=False):  # the last one may be due later
        assert delay <= gap <= delay + 0.5


def test_an_instance_launched_while_spares_back_off_is_served_at_once(spare_clocked):
    from common.fleet import Instance

    runner, fleet, spawned, advance = spare_clocked
    advance(4)  # replaced after 1 s, then after 2: now 4 s to wait
    assert len(spawned) == 3 and runner._spares == []
    fleet.append(Instance("i-new", number=1, state="running", launched_at=200.0))
    advance(0.25, exit_code=None)
    assert runner.workers["i-new"].process is spawned[-1][1] and len(spawned) == 4


def test_a_spare_that_lived_a_while_resets_the_spares_backoff(spare_clocked, caplog):
    runner, _, spawned, advance = spare_clocked
    advance(4)  # replaced after 1 s, then after 2: now 4 s to wait
    assert len(spawned) == 3
    advance(40, after_s=QUICK_EXIT_S + 1)  # the next ones each live a while, then exit
    assert gaps(spawned)[3] == QUICK_EXIT_S + 1, "replaced in the round that saw it exit"
    assert re.search(r"warm spare pid \d+ ended: exit 1 \(log [^)]*\); replacing it$", caplog.text, re.M)
    caplog.clear()
    advance(3)
    assert spare_delays(caplog.text) == [1, 2], "counted from one again"


def test_a_spare_adopted_by_an_instance_resets_the_spares_backoff(spare_clocked, caplog):
    from common.fleet import Instance

    runner, fleet, spawned, advance = spare_clocked
    advance(4)  # replaced after 1 s, then after 2: now 4 s to wait
    advance(4, exit_code=None)  # its replacement lives
    (spare,) = runner._spares
    fleet.append(Instance("i-new", number=1, state="running", launched_at=200.0))
    advance(0.25, exit_code=None)
    assert runner.workers["i-new"].process is spare and len(runner._spares) == 1, "adopted, and replaced"
    caplog.clear()
    advance(3, spares_only=True)
    assert spare_delays(caplog.text) == [1, 2], "counted from one again"
    assert runner.workers["i-new"].process is spare


def test_a_spare_killed_from_outside_is_replaced_at_once_however_young(spare_clocked, caplog):
    runner, _, spawned, advance = spare_clocked
    for _ in range(5):
        count = len(spawned)
        advance(2, exit_code=None)
        advance(0.25, exit_code=-signal.SIGKILL)
        assert len(spawned) == count + 1 and len(runner._spares) == 1
    assert "replacing it in" not in caplog.text


def test_a_workers_delay_stays_a_minute_however_long_its_starts_keep_failing(clocked, caplog):
    """2 ** 1024 s does not fit in a float: after ~17 hours of failed starts (60 s apart)
    every round raised OverflowError, and no instance had its worker started or stopped."""
    runner, _, spawned, advance = clocked
    runner.workers["i-looping"].quick_exits = 2000  # as after 2000 failed starts in a row
    advance(61)
    assert re.findall(r"restarting it in (\d+) s \(restart \d+; (\d+) failed", caplog.text)[:2] == [
        ("60", "2001"), ("60", "2002")]


def test_the_spares_delay_stays_a_minute_however_long_their_starts_keep_failing(spare_clocked, caplog):
    runner, _, spawned, advance = spare_clocked
    runner._spare_quick_exits = 2000  # as after 2000 failed starts in a row
    advance(61)
    assert spare_delays(caplog.text)[:2] == [60, 60]


def test_a_stopped_process_is_told_apart():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not is_stopped(sleeper.pid)
        sleeper.send_signal(signal.SIGSTOP)
        wait_until(lambda: is_stopped(sleeper.pid), what="the process to stop")
        sleeper.send_signal(signal.SIGCONT)
        wait_until(lambda: not is_stopped(sleeper.pid), what="the process to go on")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not is_stopped(sleeper.pid)  # gone


def test_a_worker_given_an_instance_is_found_in_the_runners_log_by_its_line(world):
    """The harness tells serving workers from spares by that line: written and read in one
    place, a reworded log line cannot leave it finding none."""
    from localaws.runner import SERVES_LINE, serving_pids

    assert serving_pids(["noise", "INFO " + SERVES_LINE % (4321, "i-0abc123", "worker-007.log")]) == {4321}


def test_failed_rounds_wait_longer_each_time_up_to_the_most(world, monkeypatch):
    """EC2 unreadable: the runner tries again after twice its pause, at least 1 s (its
    poll of no live worker, 0.2 s, gives 1 s), doubling at each failure, to 10 s."""
    from botocore.exceptions import EndpointConnectionError

    _, _, make, _ = world
    runner = make(warm_spares=0)
    waits: list[float] = []

    def step():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    def wait(seconds):
        waits.append(seconds)
        if len(waits) == 6:
            runner.stopping.set()
        return runner.stopping.is_set()

    monkeypatch.setattr(runner, "step", step)
    monkeypatch.setattr(runner.stopping, "wait", wait)
    runner.shut_down.set()  # nothing started: run() need not wait for a stop
    runner.run()
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_the_socket_folders_of_stacks_killed_outright_are_removed_by_the_next(monkeypatch):
    """A stack killed with kill -9 cannot remove its watchdog sockets' folder: two were
    left in /tmp at each such kill. The next stack's removes those no live process holds
    (by the lock in each, not by a pid, which another PID namespace's stack would reuse),
    and leaves one just made, which its maker may not have locked yet."""
    import tempfile

    from common.file_lock import hold
    from localaws.notify import OWNER_LOCK, NotifySockets

    short = Path(tempfile.mkdtemp(dir="/tmp"))  # a socket's path must stay short (above)
    monkeypatch.setattr(tempfile, "tempdir", str(short))

    def folder(name: str, age_s: float) -> Path:
        made = short / f"imgclass-notify-{name}"
        (made / "sub").mkdir(parents=True)
        (made / OWNER_LOCK).write_text("12345\n")
        os.utime(made / OWNER_LOCK, (time.time() - age_s,) * 2)
        return made

    abandoned, fresh, held = folder("gone", 3600), folder("new", 1), folder("live", 3600)
    live_lock = hold(held / OWNER_LOCK)
    os.utime(held / OWNER_LOCK, (time.time() - 3600,) * 2)
    unlocked = short / "imgclass-notify-old"  # made before folders were locked: not judged
    unlocked.mkdir()
    sockets = NotifySockets(watchdog_s=1.0)
    notify = sockets.new()
    try:
        assert not abandoned.exists() and fresh.exists() and held.exists() and unlocked.exists()
        assert (notify.path.parent / OWNER_LOCK).exists()
    finally:
        notify.close()
        sockets.remove_folder()
        os.close(live_lock)
        shutil.rmtree(short)
