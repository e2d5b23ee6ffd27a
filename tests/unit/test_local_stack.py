"""The local stack's own decisions: weights for a demo, how many workers fit, and
which of its processes are restarted when they die."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from common.aws import Aws
from common.config import VARIABLES, Settings, local_run_overrides
from controller.lock import EXIT_ANOTHER_CONTROLLER
from localaws.harness import free_port, free_ports
from localaws.kill import group_alive
from localaws.lifeline import Lifeline
from localaws.server import PortInUse
from localaws.stack import (
    GROUP_STOP_S,
    LOCK_RETRY_S,
    MAX_QUICK_EXITS,
    QUICK_EXIT_S,
    RESTART_DELAY_S,
    STARTING_MARK,
    Child,
    RunDirInUse,
    Stack,
    child_env,
    how_it_ended,
    local_model_weights,
    memory_safe_workers,
)
from tests.unit.conftest import wait_until


def test_explicit_weights_always_win(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert local_model_weights({"MODEL_WEIGHTS": "imagenet"}) == ("imagenet", "")


def test_without_cached_weights_the_demo_runs_untrained_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    for unset in ({}, {"MODEL_WEIGHTS": " "}):  # blank is unset, as Settings reads it
        weights, note = local_model_weights(unset)
        assert weights == "random" and "UNTRAINED" in note and str(tmp_path) in note


def test_with_cached_weights_the_demo_uses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5").write_bytes(b"x")
    assert local_model_weights({}) == ("imagenet", "")


def test_local_workers_are_capped_by_memory(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 * 2**30))
    tf = dataclasses.replace(Settings(), model_runtime="tensorflow")
    cap, note = memory_safe_workers(tf, {})
    assert cap == 3 and "LOCAL_MAX_WORKERS=3" in note  # 8 GB * 0.6 / 1.3 GB
    assert memory_safe_workers(Settings(), {})[0] == 8  # OpenVINO: 8 GiB * 0.6 / 0.6 GiB
    assert memory_safe_workers(Settings(), {"LOCAL_MAX_WORKERS": " "})[0] == 8  # blank is unset
    explicit = dataclasses.replace(tf, local_max_workers=12)
    assert memory_safe_workers(explicit, {"LOCAL_MAX_WORKERS": "12"}) == (12, "")  # the operator's call


def test_without_a_readable_meminfo_the_workers_set_are_kept_and_said_so(monkeypatch):
    """psutil raising out of `make run`'s start gives a traceback where a line is due
    (a Linux whose /proc cannot be read)."""
    def unreadable():
        raise FileNotFoundError(2, "No such file or directory", "/proc/meminfo")

    monkeypatch.setattr(psutil, "virtual_memory", unreadable)
    cap, note = memory_safe_workers(dataclasses.replace(Settings(), local_max_workers=6), {})
    assert cap == 6 and "cannot read this machine's free memory" in note and "/proc/meminfo" in note


SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def exited(code: int = 1) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    process.wait(timeout=30)
    return process


def test_a_dead_controller_or_web_tier_is_restarted_after_a_delay(tmp_path):
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    t0 = time.monotonic()
    child = Child("controller", SLEEPER, exited(), started=t0 - 3600)
    stack.children = [child]
    try:
        assert stack.supervise(now=t0) is None
        assert child.process.poll() == 1 and child.restart_at == t0 + RESTART_DELAY_S  # not yet
        assert stack.supervise(now=t0 + RESTART_DELAY_S) is None
        assert child.process.poll() is None and child.process.args == SLEEPER
        assert child.started == t0 + RESTART_DELAY_S and child.restart_at is None
    finally:
        child.process.kill()
        child.process.wait()
        stack.sockets.remove_folder()


# How long the tests below wait for a stand-in to act on a signal, or to be gone: a
# real failure (never asked, never killed) lasts the stand-ins' 120 s sleep, so any
# wait well below that tells it apart. 10 s was tight on a loaded machine: the last
# wait also waits for init to reap the killed worker, which here (PID 1 is not
# systemd) took 1.0-2.2 s in every one of 60 tries, idle or loaded.
STAND_IN_WAIT_S = 60.0

# Stands in for gunicorn's master: starts a worker in its process group that answers
# SIGTERM by writing down that it was asked (as the web tier then answers its waiting
# clients), and stops if its argument says so; then waits to be killed.
WORKER_OF_A_MASTER = """
import os, signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write("asked")
    if sys.argv[2] == "obeys":
        sys.exit(0)
signal.signal(signal.SIGTERM, stop)
# Whole or not at all: the test reads its pid as soon as the file is there.
open(sys.argv[1] + ".pid", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".pid", sys.argv[1] + ".up")
time.sleep(120)
"""
MASTER_WITH_A_WORKER = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {WORKER_OF_A_MASTER!r}, sys.argv[1], sys.argv[2]])
time.sleep(120)
"""


def web_whose_master_was_killed(stack: Stack, asked: Path,
                                worker: str) -> tuple[Child, subprocess.Popen, int]:
    """A "web" child of `stack` whose master was SIGKILLed once its worker was up, and
    the worker's pid (it writes `asked` when it gets SIGTERM; `worker`: "obeys" it or
    "ignores" it)."""
    stack._spawn("web", [sys.executable, "-c", MASTER_WITH_A_WORKER, str(asked), worker])
    (child,) = stack.children
    master = child.process
    try:
        wait_until(lambda: asked.with_name(asked.name + ".up").exists(), STAND_IN_WAIT_S)
    except BaseException:
        os.killpg(master.pid, signal.SIGKILL)
        raise
    master.kill()
    master.wait(10)
    # Read now: a restarted web's own stand-in writes the file again.
    return child, master, int(asked.with_name(asked.name + ".up").read_text())


@pytest.mark.parametrize("worker", ["obeys", "ignores"])
def test_what_outlives_a_dead_web_tier_is_asked_to_stop_before_it_is_killed(tmp_path, worker):
    """gunicorn's worker can outlive its killed master: SIGKILLed at once, its waiting
    clients would be left with no answer at all. As systemd stops a unit whose main
    process died: SIGTERM, and SIGKILL only GROUP_STOP_S later."""
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    asked = tmp_path / "asked"
    child, master, pid = web_whose_master_was_killed(stack, asked, worker)
    try:
        t0 = time.monotonic()
        assert stack.supervise(now=t0) is None
        # Asked, not killed.
        wait_until(lambda: asked.exists(), STAND_IN_WAIT_S, why=lambda: worker_state(pid))
        if worker == "ignores":
            # Not restarted while it may still be stopping; then killed, and restarted.
            assert stack.supervise(now=t0 + RESTART_DELAY_S) is None
            assert child.process is master and group_listed(master.pid)
            assert stack.supervise(now=t0 + GROUP_STOP_S) is None
        else:
            wait_until(lambda: not group_listed(master.pid), STAND_IN_WAIT_S, why=lambda: worker_state(pid))
            assert stack.supervise(now=t0 + RESTART_DELAY_S) is None
        assert child.process is not master and child.process.poll() is None
        # Killed, and reaped by init.
        wait_until(lambda: not group_listed(master.pid), STAND_IN_WAIT_S, why=lambda: worker_state(pid))
    finally:
        for leader in (master, child.process):  # the restarted one's worker too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader.pid, signal.SIGKILL)
        child.process.wait()
        stack.sockets.remove_folder()


def test_what_outlives_a_dead_web_tier_does_not_outlive_the_stack(tmp_path, monkeypatch):
    """A stop (Ctrl-C) within the wait that finds the group's leader gone must not leave
    the rest running, the web port held for the next make run."""
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    asked = tmp_path / "asked"
    _, master, pid = web_whose_master_was_killed(stack, asked, "ignores")
    # A stop that waited out the group's own time, not its own timeout, would hang.
    monkeypatch.setattr("localaws.stack.GROUP_STOP_S", 3600.0)
    try:
        assert stack.supervise() is None
        wait_until(lambda: asked.exists(), STAND_IN_WAIT_S, why=lambda: worker_state(pid))
        stopping = threading.Thread(target=stack.stop, kwargs={"timeout_s": 1.0}, daemon=True)
        stopping.start()
        stopping.join(timeout=30)
        assert not stopping.is_alive(), "the stop waited for the group past its own timeout"
        wait_until(lambda: not group_listed(master.pid), STAND_IN_WAIT_S, why=lambda: worker_state(pid))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master.pid, signal.SIGKILL)


def worker_state(pid: int) -> str:
    """What became of the stand-in worker (a failure once, cause unknown: this says; a
    state Z is a worker killed that init has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return f"its worker (pid {pid}) is gone"
    state, _parent, group = stat.rsplit(")", 1)[1].split()[:3]
    return f"its worker (pid {pid}) is in state {state}, in group {group}"


def group_listed(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_group_whose_processes_have_all_exited_is_not_waited_for():
    """A process that has exited, but that its parent (or, for an orphan, a slow init)
    has not reaped yet, runs no more: a stop or a web restart waiting for its group does
    not wait for the reaping (a container's init took 1-2 s each time)."""
    running = subprocess.Popen(["sleep", "60"], start_new_session=True)
    exited = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        # Not reaped: this test is its parent and has not waited for it yet.
        wait_until(lambda: "Z" in worker_state(exited.pid), 30, why=lambda: worker_state(exited.pid))
        assert group_listed(exited.pid)  # the kernel still lists it in its group...
        assert not group_alive(exited.pid)  # ...but nothing there is left to stop
        assert group_alive(running.pid)
    finally:
        running.kill()
        running.wait()
        exited.wait()


# Stands in for the controller: pings its watchdog for a while, then hangs.
PINGS_THEN_HANGS = """
import time
from common import systemd
systemd.notify("READY=1")
for _ in range(5):
    systemd.notify("WATCHDOG=1")
    time.sleep(0.1)
time.sleep(120)
"""


def test_a_controller_that_stops_pinging_its_watchdog_is_aborted_and_restarted(tmp_path, caplog):
    """A hung controller (SIGSTOP, a deadlock) unnoticed would launch no instance for a
    growing backlog until continued by hand."""
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    stack.watchdog_s["controller"] = 1.0  # 2 minutes by default
    stack._spawn("controller", [sys.executable, "-c", PINGS_THEN_HANGS])
    (child,) = stack.children
    first = child.process
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.process is first:
            assert stack.supervise() is None
            time.sleep(0.05)
        assert first.returncode == -signal.SIGABRT
        assert f"controller (pid {first.pid}) has not pinged its watchdog" in caplog.text
        assert "s: hung; SIGABRT (its threads' stacks follow)" in caplog.text  # not stopped: hung
        assert child.process.poll() is None  # the new one
    finally:
        for process in (first, child.process):
            process.kill()
            process.wait()
        stack.sockets.remove_folder()


def test_the_log_says_how_a_child_ended(tmp_path, caplog):
    """A web tier stopped cleanly by a SIGTERM sent to it alone is no error; a kill is named."""
    assert how_it_ended(0) == "stopped (exit 0)"
    assert how_it_ended(-9) == "was killed by SIGKILL"
    assert how_it_ended(3) == "exited with 3"
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    now = time.monotonic()
    stack.children = [Child("web", SLEEPER, exited(code=0), started=now - 3600),
                      Child("controller", SLEEPER, exited(code=1), started=now - 3600)]
    with caplog.at_level("INFO", logger="localaws.stack"):
        assert stack.supervise(now=now) is None
    levels = {r.getMessage().split(";")[0]: r.levelname for r in caplog.records}
    assert levels == {"web stopped (exit 0)": "WARNING", "controller exited with 1": "ERROR"}


def test_a_child_that_keeps_dying_at_start_stops_the_stack(tmp_path):
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    now = time.monotonic()
    child = Child("web", [sys.executable, "-c", "raise SystemExit(3)"], exited(code=3), started=now)
    stack.children = [child]
    delays = []
    for _ in range(MAX_QUICK_EXITS - 1):
        assert stack.supervise(now=now) is None
        delays.append(child.restart_at - now)
        now = child.restart_at
        assert stack.supervise(now=now) is None  # restarted ...
        child.process.wait(timeout=30)  # ... and dead again at once
        now += QUICK_EXIT_S / 10
    assert delays == [RESTART_DELAY_S * 2, RESTART_DELAY_S * 4]  # backing off
    problem = stack.supervise(now=now)
    assert problem == f"web exited with 3, {MAX_QUICK_EXITS} times in a row at start"


def test_a_child_killed_again_and_again_at_start_is_still_restarted(tmp_path):
    """Three kill -9s of a controller just restarted must not take the whole service
    down: the rule is for children that cannot start, not for ones killed."""
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    now = time.monotonic()
    killed = subprocess.Popen(SLEEPER)
    killed.kill()
    killed.wait(timeout=30)
    child = Child("controller", SLEEPER, killed, started=now)
    stack.children = [child]
    try:
        for _ in range(MAX_QUICK_EXITS + 1):
            assert stack.supervise(now=now) is None
            assert child.restart_at == now + RESTART_DELAY_S  # no backing off either
            now = child.restart_at
            assert stack.supervise(now=now) is None  # restarted ...
            child.process.kill()  # ... and killed again at once
            child.process.wait(timeout=30)
            now += QUICK_EXIT_S / 10
    finally:
        child.process.kill()
        child.process.wait()
        stack.sockets.remove_folder()


def test_a_controller_refused_for_another_one_running_is_retried_for_as_long(tmp_path, caplog):
    """A controller started by hand may take the lock while the stack's is restarting:
    the stack's must not exit 75 three times and the stack stop everything."""
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    now = time.monotonic()
    refused = [sys.executable, "-c", f"raise SystemExit({EXIT_ANOTHER_CONTROLLER})"]
    child = Child("controller", refused, exited(code=EXIT_ANOTHER_CONTROLLER), started=now)
    stack.children = [child]
    with caplog.at_level("WARNING", logger="localaws.stack"):
        for _ in range(MAX_QUICK_EXITS + 2):
            assert stack.supervise(now=now) is None
            assert child.restart_at == now + LOCK_RETRY_S
            now = child.restart_at
            assert stack.supervise(now=now) is None  # restarted ...
            child.process.wait(timeout=30)  # ... and refused again
    assert caplog.text.count("another controller runs for this fleet") == 1  # not at every retry
    stack.sockets.remove_folder()


def test_a_controller_refused_for_another_one_is_not_restarted_while_that_one_lives(tmp_path, caplog):
    """Restarted every 5 s only to be refused, it would print its refusal and the stack
    its restart, two lines every 5 s for as long as the other runs."""
    from controller.lock import lock_path

    settings = Settings(state_dir=str(tmp_path / "state"))
    stack = Stack(settings, tmp_path, warm_spares=0)
    other = subprocess.Popen(SLEEPER)
    lock = lock_path(settings)
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{other.pid}\n")
    refused = exited(code=EXIT_ANOTHER_CONTROLLER)
    child = Child("controller", [sys.executable, "-c", "pass"], refused, started=time.monotonic())
    stack.children = [child]
    now = time.monotonic()
    try:
        with caplog.at_level("INFO"):
            assert stack.supervise(now=now) is None
            for _ in range(3):
                now = child.restart_at
                assert stack.supervise(now=now) is None
                assert child.process is refused and child.restart_at == now + LOCK_RETRY_S
            assert "restarted" not in caplog.text
            other.kill()
            other.wait()
            assert stack.supervise(now=child.restart_at) is None
            assert child.process is not refused and "controller restarted" in caplog.text
    finally:
        other.kill()
        child.process.wait(timeout=30)
        stack.sockets.remove_folder()


def test_moto_dying_stops_the_stack(tmp_path):
    # moto holds every queue and object: nothing can take over from it.
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    stack.children = [Child("moto", [], exited(code=7), started=0.0)]
    assert stack.supervise() == "moto exited with 7"


def test_stopping_stops_the_runner_launching_before_anything_else(tmp_path, monkeypatch):
    from localaws import stack as stack_module

    stack = Stack(Settings(), tmp_path, warm_spares=0)
    runner_stopped_first: list[bool] = []
    stack.runner = SimpleNamespace(stopping=threading.Event(), shutdown=lambda timeout_s: None)
    real_terminate = stack_module.terminate

    def terminate(process, deadline, name):
        runner_stopped_first.append(stack.runner.stopping.is_set())
        real_terminate(process, deadline, name)

    monkeypatch.setattr(stack_module, "terminate", terminate)
    stack.children = [Child(name, SLEEPER, subprocess.Popen(SLEEPER, start_new_session=True), 0.0)
                      for name in ("moto", "controller", "web")]
    stack.stop(timeout_s=5)
    assert runner_stopped_first == [True, True, True]  # web, controller, then moto
    assert all(child.process.poll() is not None for child in stack.children)


def test_once_the_web_tier_is_stopped_new_connections_are_refused_while_the_rest_stops(tmp_path, monkeypatch):
    """The stack holds the web tier's listening socket (for its restarts): kept open while
    the controller, the workers and the embedded AWS stopped (up to ~15 s), it took new
    connections that no one would serve, then reset them."""
    import errno

    from localaws import stack as stack_module
    from localaws.server import listening_socket

    port = free_port()
    stack = Stack(Settings(web_port=port), tmp_path, warm_spares=0)
    stack.web_listener = listening_socket("127.0.0.1", port, "WEB_PORT")
    connected: dict[str, int] = {}
    real_terminate = stack_module.terminate

    def terminate(process, deadline, name):
        with socket.socket() as client:
            connected[name] = client.connect_ex(("127.0.0.1", port))
        real_terminate(process, deadline, name)

    monkeypatch.setattr(stack_module, "terminate", terminate)
    stack.children = [Child(name, SLEEPER, subprocess.Popen(SLEEPER, start_new_session=True), 0.0)
                      for name in ("moto", "controller", "web")]
    stack.stop(timeout_s=5)
    assert connected == {"web": 0, "controller": errno.ECONNREFUSED, "moto": errno.ECONNREFUSED}
    assert stack.web_listener is None


def start_of_a_run(run_dir: Path, name: str, ready: bool) -> None:
    """The logs folder of a run named `name` (its one log says it) that became ready or not."""
    stack = Stack(Settings(), run_dir, warm_spares=0)
    stack.open_logs()
    (stack.logs / "worker-001.log").write_text(name)
    if ready:
        stack.mark_ready()


def logs_of(run_dir: Path) -> dict[str, str]:
    return {p.name: (p / "worker-001.log").read_text() for p in sorted(run_dir.iterdir())}


def test_each_run_has_its_own_logs_and_the_last_runs_are_kept_once(tmp_path):
    for run in ("first", "second", "third"):
        start_of_a_run(tmp_path, run, ready=True)
    assert logs_of(tmp_path) == {"logs": "third", "logs.previous": "second"}


def test_failed_starts_do_not_push_out_the_logs_of_the_last_run_that_became_ready(tmp_path):
    start_of_a_run(tmp_path, "good", ready=True)
    start_of_a_run(tmp_path, "failed 1", ready=False)
    assert logs_of(tmp_path) == {"logs": "failed 1", "logs.previous": "good"}
    start_of_a_run(tmp_path, "failed 2", ready=False)
    assert logs_of(tmp_path) == {"logs": "failed 2", "logs.previous": "good"}
    start_of_a_run(tmp_path, "good again", ready=True)
    assert logs_of(tmp_path) == {"logs": "good again", "logs.previous": "good"}
    start_of_a_run(tmp_path, "next", ready=False)
    assert logs_of(tmp_path) == {"logs": "next", "logs.previous": "good again"}


def test_a_port_already_in_use_stops_the_stack_before_it_starts_anything(tmp_path):
    """Started anyway, moto would fail to bind while the stack took the other server's
    answers for its own, and provisioned into someone else's AWS."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "moto.log").write_text("the running stack's")
        stack = Stack(Settings(local_aws_port=port), tmp_path, warm_spares=0)
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port} is already in use.*LOCAL_AWS_PORT"):
            stack.start()
        assert stack.children == []
        assert (tmp_path / "logs" / "moto.log").read_text() == "the running stack's"  # left alone


@pytest.mark.parametrize("how", ["bound, not listening", "taken by a stack starting beside"])
def test_a_port_held_otherwise_stops_the_stack_before_it_starts_anything(tmp_path, how):
    """A port bound but not listening ended in gunicorn's traceback; one checked free by
    connecting, then taken by a second stack started at the same moment (or anything
    else while the first prepared its model), gave that stack the first one's answers
    for its own: a READY line, its spare worker on the other's AWS. Each stack now binds
    its ports itself before any child starts, and hands them to moto and gunicorn."""
    from localaws.server import listening_socket

    aws_port, web_port = free_ports(2)
    if how == "bound, not listening":
        holder = socket.socket()
        holder.bind(("127.0.0.1", web_port))
    else:
        holder = listening_socket("127.0.0.1", web_port, "WEB_PORT")  # as the other stack binds it
    with holder:
        stack = Stack(Settings(local_aws_port=aws_port, web_port=web_port), tmp_path, warm_spares=0)
        with pytest.raises(PortInUse, match=f"127.0.0.1:{web_port} is already in use.*WEB_PORT"):
            stack.start()
        assert stack.children == [] and not (tmp_path / "logs").exists()
        # The embedded AWS's port, taken first, was let go.
        listening_socket("127.0.0.1", aws_port, "LOCAL_AWS_PORT").close()


def test_an_address_that_cannot_be_listened_on_is_said_in_one_line_naming_the_variables():
    """Bound by the stack, a port below 1024 or an address not this machine's ended in a
    traceback, before any log was open."""
    from localaws.server import listening_socket

    with pytest.raises(PortInUse, match=r"cannot listen on 192\.0\.2\.1:\d+: .*WEB_HOST and WEB_PORT"):
        listening_socket("192.0.2.1", free_port(), "WEB_PORT")  # TEST-NET-1: never this machine's


def test_a_stack_on_port_0_is_refused_naming_the_variable(tmp_path):
    """It would serve where it cannot say (its READY line and health check at port 0)."""
    stack = Stack(Settings(local_aws_port=free_port(), web_port=0), tmp_path, warm_spares=0)
    with pytest.raises(PortInUse, match="WEB_PORT=0: the stack needs a port of its own"):
        stack.start()
    assert stack.children == []


def test_a_second_stack_from_a_run_folder_in_use_stops_before_it_touches_anything(tmp_path):
    """It would move the first one's logs aside (or delete them, were it still starting),
    and its web tier would queue the first one's journaled uploads into its own AWS."""
    aws_port, web_port = free_ports(2)
    first = Stack(Settings(local_aws_port=aws_port, web_port=web_port), tmp_path, warm_spares=0)
    first.lock_run_dir()
    first.open_logs()
    (first.logs / "moto.log").write_text("the first stack's")
    aws_port, web_port = free_ports(2)
    second = Stack(Settings(local_aws_port=aws_port, web_port=web_port), tmp_path, warm_spares=0)
    with pytest.raises(RunDirInUse, match=f"process {os.getpid()}.*make run RUN_ARGS='--run-dir "
                       f"{tmp_path.resolve()}-2' WEB_PORT=<port> LOCAL_AWS_PORT=<port>"):
        second.start()
    assert second.children == []
    assert (first.logs / "moto.log").read_text() == "the first stack's"
    assert (first.logs / STARTING_MARK).exists()  # left starting, not deleted
    first.stop()  # lets go of the folder
    second.lock_run_dir()
    second.stop()


@pytest.mark.parametrize("web_host", ["127.0.0.1", "0.0.0.0"])
def test_one_port_for_both_servers_stops_the_stack_before_it_starts_anything(tmp_path, web_host):
    """If moto takes the port, gunicorn cannot bind: READY must not be said all the same,
    the web tier's health check answered by the embedded AWS."""
    port = free_port()
    stack = Stack(Settings(local_aws_port=port, web_port=port, web_host=web_host), tmp_path, warm_spares=0)
    with pytest.raises(PortInUse, match=f"LOCAL_AWS_PORT and WEB_PORT are both {port}"):
        stack.start()
    assert stack.children == []


@pytest.mark.parametrize("web_host", ["::1", "[::1]"])
def test_an_ipv6_web_host_is_checked_and_named_as_one_address(tmp_path, web_host):
    """WEB_HOST=[::1] stopped make run with "Name or service not known", and ::1 made
    the URL of its readiness check and READY line http://::1:port."""
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(local_aws_port=free_port(), web_port=port, web_host=web_host)
        assert settings.web_url == f"http://[::1]:{port}"
        stack = Stack(settings, tmp_path, warm_spares=0)
        with pytest.raises(PortInUse, match=f"::1:{port} is already in use"):
            stack.start()
    assert stack.children == []
    assert Settings(web_host="0.0.0.0", web_port=8000).web_url == "http://0.0.0.0:8000"


def test_the_line_for_other_shells_carries_what_a_controller_there_needs(tmp_path, monkeypatch):
    """A dry-run controller from the exported line must look for this stack's prefix's
    queue, not imgclass-req-queue, and decide with make run's 5 s scale-in window."""
    from common.config import region_from_env
    from localaws.stack import SHARED_WITH_OTHER_SHELLS, other_shell_line

    for name in SHARED_WITH_OTHER_SHELLS:
        monkeypatch.delenv(name, raising=False)
    settings = Settings(prefix="mine", local_aws_port=5123, web_port=8123, local_max_workers=2)
    line = other_shell_line(settings, child_env(settings, tmp_path))
    assert line.endswith(": export WEB=http://127.0.0.1:8123 AWS_ENDPOINT_URL=http://127.0.0.1:5123 "
                         "AWS_REGION=us-east-1 "
                         "AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local "
                         "APP_PREFIX=mine SCALE_IN_COOLDOWN=5 READY_DEADLINE=0"), line
    # A shell that had AWS_REGION exported took its region (another fleet, no queues).
    exported = dict(shlex.split(word)[0].split("=", 1) for word in line.split(": export ")[1].split(" "))
    assert region_from_env({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1",
                            **exported}) == "us-east-1"
    monkeypatch.setenv("SCALE_IN_COOLDOWN", "a b")  # the user's, quoted for the shell
    # The state directory (a second controller there is refused) and the user's scaling settings.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MAX_INSTANCES", "4")
    line = other_shell_line(settings, child_env(settings, tmp_path))
    assert "SCALE_IN_COOLDOWN='a b'" in line
    assert f"XDG_STATE_HOME={tmp_path / 'state'} MAX_INSTANCES=4" in line
    # A relative one, which every process ignores (the XDG spec): the one they use instead,
    # or a controller started with the line there took another lock, beside make run's.
    monkeypatch.setenv("XDG_STATE_HOME", "state")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    line = other_shell_line(settings, child_env(settings, tmp_path))
    assert f"XDG_STATE_HOME={tmp_path / 'home' / '.local' / 'state'} MAX_INSTANCES=4" in line
    monkeypatch.setenv("API_KEY", "s3cret")  # a secret the controller does not need: never printed
    assert "s3cret" not in other_shell_line(settings, child_env(settings, tmp_path))


def test_a_controller_in_another_shell_is_given_every_setting_its_options_set():
    """Each of the controller's options is a setting it decides with: one the line for other
    shells left out, a controller there decided otherwise than make run's. Both lists now
    come from common/config.py's VARIABLES; this keeps their flags in step."""
    from controller.main import SETTING_OPTIONS
    from localaws.stack import SHARED_WITH_OTHER_SHELLS

    assert {option.variable for option in SETTING_OPTIONS} <= set(SHARED_WITH_OTHER_SHELLS)


def test_make_runs_help_and_usage_name_every_option_whatever_the_settings(monkeypatch, capsys):
    """A bad setting's usage line includes --warm-spares, and --help gives the help, not
    the setting's error."""
    from localaws.stack import main

    monkeypatch.setenv("RECEIVE_WAIT", "21")
    with pytest.raises(SystemExit) as helped:
        main(["--help"])
    assert helped.value.code == 0 and "--warm-spares N" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main([])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "[--warm-spares N]" in err and "RECEIVE_WAIT must be" in err


def test_servers_on_one_port_of_different_addresses_are_allowed():
    from localaws.server import ensure_ports_differ

    ensure_ports_differ(("127.0.0.1", 8000, "LOCAL_AWS_PORT"), ("127.0.0.2", 8000, "WEB_PORT"))
    ensure_ports_differ(("127.0.0.1", 0, "LOCAL_AWS_PORT"), ("127.0.0.1", 0, "WEB_PORT"))  # any free ones


def test_bad_settings_stop_make_run_with_a_message_naming_the_variable(capsys, monkeypatch):
    from localaws.stack import main

    monkeypatch.setenv("LOCAL_WARM_SPARES", "two")
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    assert "LOCAL_WARM_SPARES must be a whole number, got 'two'" in capsys.readouterr().err


def test_the_warm_spares_option_is_checked_as_its_variable_is(capsys, monkeypatch):
    """--warm-spares 16 was taken (checked only for >= 0) where LOCAL_WARM_SPARES=16 is refused."""
    from localaws.stack import main

    monkeypatch.delenv("LOCAL_WARM_SPARES", raising=False)
    for value, message in (("16", "must be from 0 to 15"), ("-1", "must be from 0 to 15"),
                           ("two", "must be a whole number")):
        with pytest.raises(SystemExit) as stopped:
            main(["--warm-spares", value])
        assert stopped.value.code == 2
        assert f"--warm-spares (LOCAL_WARM_SPARES) {message}" in capsys.readouterr().err


def test_a_stop_while_the_model_is_prepared_is_not_taken_for_a_model_failure(tmp_path, monkeypatch):
    """Ctrl-C reached the preparing process too (the terminal signals its whole group),
    and the stack then said the model could not be loaded, with a traceback."""
    from localaws import stack as stack_module

    monkeypatch.setattr(stack_module, "PREPARE_MODEL", SLEEPER)
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    stack.open_logs()
    spawned: list[psutil.Process] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        spawned.append(psutil.Process(process.pid))
        assert kwargs.get("start_new_session")  # out of the terminal's reach
        stack.stopping.set()  # Ctrl-C, while it runs
        return process

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(stack_module.StartInterrupted, match="stopped while the model was being prepared"):
        stack._prepare_model()
    assert len(spawned) == 1 and not spawned[0].is_running()


def test_a_model_that_cannot_load_stops_make_run_with_what_to_do_not_a_traceback(tmp_path, monkeypatch,
                                                                                   caplog):
    """MODEL_WEIGHTS=imagenet offline: the list of what to do, not the stack's own
    traceback before it."""
    from localaws import stack as stack_module

    say = "print('Do one of these: set MODEL_WEIGHTS=random'); raise SystemExit(3)"
    monkeypatch.setattr(stack_module, "PREPARE_MODEL", [sys.executable, "-c", say])
    for name, port in zip(("LOCAL_AWS_PORT", "WEB_PORT"), free_ports(2), strict=True):
        monkeypatch.setenv(name, str(port))
    monkeypatch.setenv("APP_PREFIX", "nomodel")
    monkeypatch.setattr(stack_module, "configure_logging", lambda *args: None)  # caplog's handler
    with caplog.at_level(logging.INFO):
        assert stack_module.main(["--run-dir", str(tmp_path)]) == 1
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and failed[0].exc_info is None
    assert "the model could not be loaded" in failed[0].getMessage()
    assert "Do one of these: set MODEL_WEIGHTS=random" in failed[0].getMessage()


def test_a_run_folder_that_cannot_be_written_is_said_so_in_a_line(tmp_path):
    """A traceback of the lock's OSError, where a line says what to do."""
    (tmp_path / "file").write_text("")
    stack = Stack(Settings(), tmp_path / "file" / "run", warm_spares=0)
    with pytest.raises(RunDirInUse, match=f"cannot use {tmp_path / 'file' / 'run'} for this run's logs"):
        stack.lock_run_dir()


def test_a_state_directory_that_cannot_be_written_stops_make_run_at_once_saying_so(
        tmp_path, monkeypatch, caplog):
    """Read-only or full, it had the stack say READY while every worker exited at its
    start (no lock, no journal) and every upload failed, the reason in workers' logs only."""
    from localaws import stack as stack_module

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "not-a-folder"))
    for name, port in zip(("LOCAL_AWS_PORT", "WEB_PORT"), free_ports(2), strict=True):
        monkeypatch.setenv(name, str(port))
    started = []
    monkeypatch.setattr(stack_module, "start_moto", lambda *args, **kwargs: started.append(args))
    monkeypatch.setattr(stack_module, "configure_logging", lambda *args: None)  # caplog's handler
    with caplog.at_level(logging.INFO):
        assert stack_module.main(["--run-dir", str(tmp_path / "run")]) == 1
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and failed[0].exc_info is None
    said = failed[0].getMessage()
    assert f"cannot write to {tmp_path / 'not-a-folder' / 'imgclass'}" in said and "XDG_STATE_HOME" in said
    assert started == []  # nothing started


def test_a_preparation_that_wrote_nothing_asks_whether_the_disk_is_full(tmp_path, monkeypatch):
    """A full run folder's disk was said as "the model could not be loaded", its log empty."""
    from localaws import stack as stack_module

    monkeypatch.setattr(stack_module, "PREPARE_MODEL", [sys.executable, "-c", "raise SystemExit(1)"])
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    stack.open_logs()
    with pytest.raises(stack_module.ModelUnavailable,
                       match=f"its log is empty: is the disk of {stack.logs} full"):
        stack._prepare_model()


def test_make_run_leaves_its_own_environment_as_it_found_it(tmp_path, monkeypatch, caplog):
    """It wrote its children's MODEL_WEIGHTS and AWS keys into its own environment too, two
    sources of truth (and a main() called in a test changed the environment of the tests
    after it). Its own AWS clients are given the children's keys instead: provisioning
    here, before the model's preparation fails, needs them."""
    from localaws import stack as stack_module
    from tests.conftest import without_credentials

    monkeypatch.setattr(stack_module, "PREPARE_MODEL", [sys.executable, "-c", "raise SystemExit(3)"])
    for name, port in zip(("LOCAL_AWS_PORT", "WEB_PORT"), free_ports(2), strict=True):
        monkeypatch.setenv(name, str(port))
    monkeypatch.setenv("APP_PREFIX", "ownenv")
    monkeypatch.delenv("MODEL_WEIGHTS", raising=False)
    without_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr(stack_module, "configure_logging", lambda *args: None)  # caplog's handler
    before = dict(os.environ)
    with caplog.at_level(logging.ERROR):
        assert stack_module.main(["--run-dir", str(tmp_path / "run")]) == 1
    assert "the model could not be loaded" in caplog.text, caplog.text  # provisioned first
    assert dict(os.environ) == before


def test_instances_beyond_the_local_cap_are_not_taken_for_workers_that_never_serve(monkeypatch, tmp_path):
    """They get no worker process here, so they never tag themselves ready."""
    monkeypatch.delenv("READY_DEADLINE", raising=False)
    assert child_env(Settings(local_max_workers=2), tmp_path)["READY_DEADLINE"] == "0"
    assert "READY_DEADLINE" not in child_env(Settings(local_max_workers=15), tmp_path)
    monkeypatch.setenv("READY_DEADLINE", "600")  # the user's own choice stands
    assert child_env(Settings(local_max_workers=2), tmp_path)["READY_DEADLINE"] == "600"


LOCAL_RUN_VARIABLES = ("WORKER_THREADS", "WORKER_ONE_IMAGE_THREADS", "RECEIVE_WAIT", "READY_DEADLINE",
                       "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WEB_JOURNAL_DIR", "SCALE_IN_COOLDOWN")


def test_make_runs_processes_get_its_own_settings_and_defaults(monkeypatch, tmp_path):
    """What common/config.py says make run gives its processes, they get, and read so."""
    for name in LOCAL_RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    settings = Settings(local_max_workers=2, local_worker_threads=3, local_worker_one_image_threads=2)
    env = child_env(settings, tmp_path)
    assert {name: env[name] for name in LOCAL_RUN_VARIABLES} == {
        "WORKER_THREADS": "3", "WORKER_ONE_IMAGE_THREADS": "2", "RECEIVE_WAIT": "5", "READY_DEADLINE": "0",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local", "WEB_JOURNAL_DIR": str(tmp_path / "web-journal"),
        "SCALE_IN_COOLDOWN": "5"}
    read = Settings.from_env(env)
    assert read.worker_one_image_threads == 2
    assert (read.worker_threads, read.receive_wait_s, read.ready_deadline_s, read.web_journal_dir,
            read.scale_in_cooldown_s) == (3, 5, 0.0, str(tmp_path / "web-journal"), 5.0)


def test_make_run_keeps_the_users_own_values_except_worker_threads(monkeypatch, tmp_path):
    """WORKER_THREADS and WORKER_ONE_IMAGE_THREADS are their LOCAL_ variables in make run;
    every other value set stands, an empty one too (the children read it as production's
    default)."""
    mine = {"WORKER_THREADS": "8", "WORKER_ONE_IMAGE_THREADS": "4", "RECEIVE_WAIT": "",
            "READY_DEADLINE": "600",
            "AWS_ACCESS_KEY_ID": "AKIAMINE", "AWS_SECRET_ACCESS_KEY": "secret",
            "WEB_JOURNAL_DIR": str(tmp_path / "mine"), "SCALE_IN_COOLDOWN": "0"}
    for name, value in mine.items():
        monkeypatch.setenv(name, value)
    env = child_env(Settings(local_max_workers=2, local_worker_threads=1), tmp_path)
    assert {name: env[name] for name in LOCAL_RUN_VARIABLES} == {**mine, "WORKER_THREADS": "1",
                                                                 "WORKER_ONE_IMAGE_THREADS": "1"}


def test_make_runs_lone_images_have_the_threads_it_is_told():
    """LOCAL_WORKER_THREADS's by default, as every call of make run's many workers has;
    all cores (0) only when told, as make bench does with a worker per core."""
    assert local_run_overrides(Settings())["WORKER_ONE_IMAGE_THREADS"] == "1"
    assert local_run_overrides(Settings(local_worker_threads=2))["WORKER_ONE_IMAGE_THREADS"] == "2"
    overrides = local_run_overrides(Settings(local_worker_threads=1, local_worker_one_image_threads=0))
    assert (overrides["WORKER_THREADS"], overrides["WORKER_ONE_IMAGE_THREADS"]) == ("1", "0")


def test_a_moto_that_does_not_come_up_in_time_is_not_left_running(tmp_path, monkeypatch):
    """The caller never gets the process to stop: start_moto must stop it itself."""
    from localaws import server

    started: list[subprocess.Popen] = []

    def too_slow(url, process, timeout_s, stopping=None):
        started.append(process)
        raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")

    monkeypatch.setattr(server, "wait_until_up", too_slow)
    with pytest.raises(TimeoutError):
        server.start_moto("127.0.0.1", 1, tmp_path / "moto.log")
    (process,) = started
    assert process.poll() is not None


def test_a_stop_while_a_server_starts_ends_the_wait_at_once():
    """make run waited out moto's start (up to 90 s on a busy machine) before it heard Ctrl-C."""
    from localaws import server

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there once closed
    stopping = threading.Event()
    stopping.set()
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            # An hour: a wait that heard the stop only at its timeout would hang the test.
            server.wait_until_up(f"http://127.0.0.1:{port}/", None, timeout_s=3600, stopping=stopping)
        except BaseException as exc:  # handed to the test
            raised.append(exc)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    waiting.join(timeout=30)
    assert not waiting.is_alive(), "the wait did not hear the stop"
    (exc,) = raised
    assert isinstance(exc, server.StartInterrupted) and "stopped while waiting for" in str(exc), exc


def test_the_stack_stops_on_a_hangup_unless_run_under_nohup():
    import signal

    from localaws.stack import stop_signals

    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert set(stop_signals()) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        assert set(stop_signals()) == {signal.SIGINT, signal.SIGTERM}
    finally:
        signal.signal(signal.SIGHUP, before)


def test_the_harness_picks_different_ports_even_where_the_system_reuses_a_released_one(monkeypatch):
    """The integration harness picked its web and moto ports one after the other: the
    system may give a port let go to the next bind, and both servers then got one."""
    from localaws import harness

    bound: set[int] = set()

    class ReusingSocket:
        """Hands out the lowest port not bound now, as a system may."""

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            bound.discard(self.port)

        def bind(self, address) -> None:
            self.port = min(set(range(40000, 40010)) - bound)
            bound.add(self.port)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(harness.socket, "socket", ReusingSocket)
    web, aws = harness.free_ports(2)
    assert web != aws
    process = harness.StackProcess(run_dir=None)  # type: ignore[arg-type]
    assert process.web_port != process.aws_port


# Stands in for `python -m localaws.stack`: says what the stack says of a port taken
# before it bound it, or READY, as its WEB_PORT is the taken one or not.
FAKE_STACK = """
import os, sys, time
if os.environ["WEB_PORT"] == sys.argv[1]:
    print(f"stack: 127.0.0.1:{sys.argv[1]} is already in use (another `make run`?)", flush=True)
    sys.exit(1)
print(f"READY web=http://127.0.0.1:{os.environ['WEB_PORT']}", flush=True)
time.sleep(60)
"""


def test_the_harness_starts_a_stack_again_on_other_ports_when_one_was_taken_before_it_bound_it(
        tmp_path, monkeypatch):
    """Its ports are found free, then let go until the stack binds them: another test
    process's stack, or an outgoing connection's local port, may take one between."""
    from localaws import harness
    from localaws.server import listening_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as refused:  # what the harness looks for is what the stack says
            listening_socket("127.0.0.1", port, "WEB_PORT")
        assert harness.PORT_IN_USE in str(refused.value)
    chosen = iter([[port, free_port()]])
    monkeypatch.setattr(harness, "free_ports", lambda count: next(chosen, None) or free_ports(count))
    real_popen = subprocess.Popen
    starts = []

    def fake_stack(argv, **kwargs):
        starts.append(kwargs["env"]["WEB_PORT"])
        return real_popen([sys.executable, "-c", FAKE_STACK, str(port)], **kwargs)

    monkeypatch.setattr(harness.subprocess, "Popen", fake_stack)
    stack = harness.StackProcess(run_dir=tmp_path, warm_spares=0)
    assert stack.web_port == port
    try:
        stack.start(timeout_s=30)
        assert starts[0] == str(port) and len(starts) == 2
        assert stack.web_port != port and starts[1] == str(stack.web_port)
        assert stack.ready_line == f"READY web=http://127.0.0.1:{stack.web_port}"
        assert stack.output == [stack.ready_line + "\n"]  # the failed start's lines are not this one's
    finally:
        stack.stop()
    # Ports a test set are its own: not changed, the failure said.
    stack = harness.StackProcess(run_dir=tmp_path, warm_spares=0,
                                 env_overrides={"WEB_PORT": str(port), "LOCAL_AWS_PORT": str(free_port())})
    with pytest.raises(harness.PortTaken, match="is already in use"):
        stack.start(timeout_s=30)


def test_a_relative_run_dir_is_shown_and_used_as_an_absolute_path(tmp_path, monkeypatch):
    """`--run-dir rd2` must not print logs=rd2/logs in the READY line."""
    monkeypatch.chdir(tmp_path)
    stack = Stack(Settings(), Path("rd2"), 0)
    assert stack.logs == tmp_path / "rd2" / "logs" and stack.logs.is_absolute()


# A stand-in for the embedded AWS: it waits on its lifeline and says how it ended.
LIFELINE_SERVER = """
import signal, sys, time
from localaws.lifeline import stop_when_unheld
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
stop_when_unheld(int(sys.argv[1]), outlive_s=float(sys.argv[2]), poll_s=0.05)
print("watching", flush=True)
time.sleep(60)
"""


def _lifeline_server(fd: int, outlive_s: float) -> list[str]:
    return [sys.executable, "-c", LIFELINE_SERVER, str(fd), str(outlive_s)]


def test_the_embedded_aws_stops_once_the_last_holder_of_its_lifeline_is_gone():
    lifeline = Lifeline()
    root = str(Path(__file__).resolve().parents[2])
    server = subprocess.Popen(_lifeline_server(lifeline.server_fd, 60), pass_fds=(lifeline.server_fd,),
                              cwd=root, stdout=subprocess.PIPE, text=True)
    holder = subprocess.Popen(["sleep", "60"], pass_fds=(lifeline.holder_fd,))
    try:
        assert server.stdout.readline() == "watching\n"  # else the wait below proves nothing
        lifeline.close()  # the stack gone: the holder keeps the server
        with pytest.raises(subprocess.TimeoutExpired):
            server.wait(timeout=1.0)
        holder.kill()
        holder.wait()
        assert server.wait(timeout=10) == 7  # stopped by its SIGTERM, gracefully
    finally:
        for process in (server, holder):
            process.kill()
            process.wait()
        server.stdout.close()


def test_the_embedded_aws_does_not_wait_for_ever_on_a_holder_that_never_ends(tmp_path):
    """A worker stopped with SIGSTOP holds the lifeline for ever: the server stops
    `outlive_s` after its parent, the stack, died."""
    lifeline = Lifeline()
    root = str(Path(__file__).resolve().parents[2])
    pid_file = tmp_path / "server.pid"
    # The stack: starts the server, waits until it watches (as the stack waits for
    # the embedded AWS to answer), says its pid, and dies.
    stack = [sys.executable, "-c",
             "import subprocess, sys; p = subprocess.Popen(sys.argv[2:], pass_fds=(int(sys.argv[5]),), "
             "stdout=subprocess.PIPE); p.stdout.readline(); open(sys.argv[1], 'w').write(str(p.pid))",
             str(pid_file), *_lifeline_server(lifeline.server_fd, 0.5)]
    try:
        subprocess.run(stack, pass_fds=(lifeline.server_fd,), cwd=root, check=True, timeout=30)
        server = psutil.Process(int(pid_file.read_text()))

        def ended() -> bool:
            try:
                return server.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(ended, timeout=10)
        # Not the lifeline's end: held by us all along, its read end sees no end of file.
        assert select.select([lifeline.server_fd], [], [], 0)[0] == []
    finally:
        lifeline.close()


def test_a_stop_says_how_many_queued_requests_the_embedded_aws_loses(tmp_path, monkeypatch, caplog):
    """A client told at the stop that its image is still queued cannot know that make run's
    AWS keeps nothing; the terminal says how many such requests were lost."""
    import localaws.stack

    counts = {"ApproximateNumberOfMessages": "5", "ApproximateNumberOfMessagesNotVisible": "2",
              "ApproximateNumberOfMessagesDelayed": "0"}

    class Sqs:
        def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict:
            if counts is None:
                raise ConnectionError("the embedded AWS does not answer")
            return {"Attributes": {name: counts[name] for name in AttributeNames}}

    class FakeAws(Aws):
        @property
        def probes(self) -> dict[str, object]:
            return {"sqs": Sqs()}

        def queue_url(self, name: str, probe: bool = False) -> str:
            assert probe, "a stop must not wait out the usual client's retries"
            return f"http://127.0.0.1:1/{name}"

        @property
        def sqs(self) -> None:
            raise AssertionError("a stop must not wait out the usual client's retries")

    monkeypatch.setattr(localaws.stack, "Aws", FakeAws)
    stack = Stack(Settings(), tmp_path, warm_spares=0)
    with caplog.at_level(logging.INFO, logger="stack"):
        stack.say_what_the_stop_loses()
        assert "7 request(s) still queued are lost" in caplog.text
        caplog.clear()
        counts.update(dict.fromkeys(counts, "0"))
        stack.say_what_the_stop_loses()
        assert "lost" not in caplog.text
        counts = None
        stack.say_what_the_stop_loses()  # no answer: one line, and the stop goes on
        assert "could not count the requests the stop loses" in caplog.text


@pytest.mark.parametrize(("host", "warned"), [
    ("0.0.0.0", True), ("::", True), ("10.0.1.5", True), ("127.0.0.1", False), ("localhost", False),
    ("::1", False),
])
def test_an_embedded_aws_open_beyond_this_machine_is_warned_of(host, warned):
    """It checks no credentials: anyone who reaches it may read every upload."""
    from localaws.stack import embedded_aws_open_warning

    warning = embedded_aws_open_warning(host)
    assert (warning is not None) == warned
    if warned:
        assert f"listens on {host} (LOCAL_AWS_HOST) and checks no credentials" in warning


def test_make_run_suggests_the_few_core_settings_only_where_they_help_and_none_were_chosen():
    """On 2 cores a burst's fifteen processes loading the model made `make run` 2.5 to 3
    times slower than the few-core settings, which the README names only in passing."""
    from localaws.stack import FEW_CORES_SETTINGS, few_cores_note

    settings = Settings(local_max_workers=15)
    note = few_cores_note(settings, {}, 2)
    assert note.startswith("this machine has 2 cores, and a burst starts up to 15 worker processes")
    assert f"{FEW_CORES_SETTINGS} make run serves bursts 2.5 to 3 times faster" in note
    # The settings named are the README's, and each is one of the service's variables.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert FEW_CORES_SETTINGS in readme.replace("\n", " ")
    names = {word.split("=")[0] for word in FEW_CORES_SETTINGS.split()}
    assert names <= {variable.name for variable in VARIABLES}
    assert few_cores_note(settings, {"LOCAL_MAX_WORKERS": "15"}, 2) == ""  # chosen
    assert few_cores_note(settings, {}, 16) == ""  # cores enough
    assert few_cores_note(settings, {}, None) == ""  # unknown
    assert few_cores_note(Settings(local_max_workers=2), {}, 2) == ""  # memory capped it already


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_embedded_aws_is_given_an_address_a_url_can_hold(host):
    """LOCAL_AWS_HOST=::1 ended make run in a traceback, "Invalid endpoint: http://::1:5000"."""
    settings = Settings(local_aws_host=host, local_aws_port=5123)
    assert settings.local_aws_url == "http://[::1]:5123"
    assert settings.local_aws_host_bare == "::1"  # what a socket binds
    assert Settings(local_aws_host="127.0.0.1", local_aws_port=5123).local_aws_url == "http://127.0.0.1:5123"
