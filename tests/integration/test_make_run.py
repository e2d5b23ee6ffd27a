"""`make run` itself: READY line, a working page, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from localaws.harness import StackProcess, free_ports
from localaws.stack import STARTING_MARK, STOP_TIMEOUT_S
from tests.conftest import make_image, terminal_session
from tests.integration.conftest import STACK_TIMEOUT, serving_workers, still_running, wait_for

pytestmark = STACK_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_serves_and_ctrl_c_stops_everything(tmp_path):
    web, aws = free_ports(2)
    env = dict(os.environ, WEB_PORT=str(web), LOCAL_AWS_PORT=str(aws), APP_PREFIX="makerun",
               MODEL_WEIGHTS="random", TMPDIR=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("AWS_ENDPOINT_URL", None)
    # A run folder of its own: a developer's `make run` may hold the checkout's .run.
    run_dir = tmp_path / "run"
    make = subprocess.Popen(["make", "-s", "run", f"RUN_ARGS=--run-dir {run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        ready = ""
        while time.monotonic() < deadline and make.poll() is None:
            line = make.stdout.readline()
            if line.startswith("READY "):
                ready = line.strip()
                break
        assert ready.startswith(f"READY web=http://127.0.0.1:{web} aws=http://127.0.0.1:{aws}"), ready
        assert "UNTRAINED" in ready
        # Ready: its logs become logs.previous at the next run, not replaced as a failed start's.
        assert (run_dir / "logs").is_dir() and not (run_dir / "logs" / STARTING_MARK).exists()
        page = requests.get(f"http://127.0.0.1:{web}/", timeout=10)
        assert page.status_code == 200 and 'type="file"' in page.text
        everything = psutil.Process(make.pid).children(recursive=True)
        assert len(everything) >= 4  # stack, moto, controller, gunicorn (+ its worker, spares)

        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        try:
            # The stack's own budget, whose end kills what is left, and make's exit: past
            # it, the budget's kills did not work (README: about 15 s under full load).
            make.wait(timeout=STOP_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make run was still running {STOP_TIMEOUT_S + 10:g} s after Ctrl-C")

        def alive() -> list[int]:
            return [p.pid for p in still_running(everything)]

        deadline = time.monotonic() + 30  # make ends after the stack has waited for them
        while time.monotonic() < deadline and alive():
            time.sleep(0.05)
        left = alive()
        assert not left, f"left behind: {left}"
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)


def test_a_stack_killed_outright_takes_every_process_it_started_with_it():
    """kill -9 (or the OOM killer) gives the stack no chance to stop its children: they
    must end themselves, or the next `make run` finds its ports in use."""
    # A stack killed outright cannot remove its watchdog sockets' folder, so the test
    # does: the run directory is short, for the folder to be made in its TMPDIR, not in
    # /tmp (where it goes when TMPDIR is too long), among other test processes' folders.
    # A failure leaves the run directory (/tmp/killed-*) with the stack's logs.
    run_dir = Path(tempfile.mkdtemp(prefix="killed-", dir="/tmp"))
    stack = StackProcess(run_dir, env_overrides={"MAX_INSTANCES": "2", "MODEL_WEIGHTS": "random"})
    stack.start()
    try:
        images = [("files", (f"orphan_{i}.jpg", make_image(7000 + i))) for i in range(30)]
        reply = requests.post(f"{stack.web_url}/api/jobs", files=images, timeout=60)
        assert reply.status_code == 202, reply.text
        # Busy: a worker serving an instance (started by the runner's thread, which
        # ends with the stack) as well as moto, the controller, the web tier and spares.
        serving = wait_for(lambda: serving_workers(stack), 90, "a worker serving an instance")
        everything = stack.descendants()
        names = " ".join(" ".join(p.cmdline()) for p in everything)
        for part in ("localaws.moto_server", "controller.py", "gunicorn"):
            assert part in names, f"{part} not running: {names}"
        assert {p.pid for p in serving} <= {p.pid for p in everything}
        killed_at = len(stack.output)
        moto_pid = next(p.pid for p in everything if "localaws.moto_server" in " ".join(p.cmdline()))
    finally:
        stack.process.kill()
        stack.process.wait()

    def left() -> list[str]:
        names = []
        for p in still_running(everything):
            with contextlib.suppress(psutil.NoSuchProcess):  # ended since
                names.append(" ".join(p.cmdline()[:4]))
        return names

    # Each stops as on Ctrl-C (a worker ends its batch first), and the embedded AWS
    # after the last of them, or seen gone in the same look: their last calls reach it.
    # (By the time of each look, not of each process within it: one full run had the
    # embedded AWS "first" by 3 microseconds, as the look happened to list it.)
    ended_in: dict[int, int] = {}  # the look that first found it gone
    deadline, look = time.monotonic() + 45, 0
    while time.monotonic() < deadline:
        look += 1
        alive = {p.pid for p in still_running(everything)}
        ended_in.update({p.pid: look for p in everything if p.pid not in alive | set(ended_in)})
        if not alive:
            break
        time.sleep(0.05)
    try:
        assert not left(), f"left behind by a stack killed outright: {left()}"
        others = [at for pid, at in ended_in.items() if pid != moto_pid]
        assert moto_pid in ended_in and max(others) <= ended_in[moto_pid], "the embedded AWS ended first"
        after_kill = "".join(stack.output[killed_at:])
        assert "Traceback" not in after_kill and "Could not connect" not in after_kill, after_kill[-3000:]
        worker_logs = "".join(log.read_text() for log in (run_dir / "logs").glob("worker-*.log"))
        assert "Could not connect" not in worker_logs, worker_logs[-3000:]
    finally:
        for p in still_running(everything):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()  # not to be left by a failure either
        sockets_here = list(stack.tmp_dir.glob("imgclass-notify-*"))
        for folder in sockets_here:
            shutil.rmtree(folder, ignore_errors=True)
    assert sockets_here, "the watchdog sockets' folder was made outside the run directory"
    for port in (stack.web_port, stack.aws_port):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free for the next run
    shutil.rmtree(run_dir, ignore_errors=True)  # kept when the test fails: its logs say why


def test_a_stack_whose_terminal_is_closed_stops_as_on_ctrl_c(tmp_path):
    """Closing the terminal sends SIGHUP, whose default action ended the stack at once."""
    stack = StackProcess(tmp_path / "run", env_overrides={"MODEL_WEIGHTS": "random"}, warm_spares=0)
    stack.start()
    everything = stack.descendants()
    stack.process.send_signal(signal.SIGHUP)
    try:
        code = stack.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # What it was still waiting for: a full run's timeout (15 s then) said nothing.
        waiting = [" ".join(p.cmdline()[:4]) for p in still_running(everything)]
        raise AssertionError(f"not stopped 30 s after SIGHUP; still running: {waiting}\n"
                             + "".join(stack.output[-30:])) from None
    finally:
        if stack.process.poll() is None:
            stack.process.kill()
    assert code == 0, "".join(stack.output[-20:])
    wait_for(lambda: any(line.rstrip().endswith(" stopped") for line in stack.output), 5,
             "the stack's last line, 'stopped'")
    assert not still_running(everything)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux's /proc says which terminal")
def test_a_stack_whose_terminal_closes_under_a_make_that_passes_no_hangup_on_stops(tmp_path):
    """`xterm -e make run`, `ssh -t host make run`: the terminal's session is make's, which
    hears the hangup, passes it to nobody and waits for the stack. The stack served on,
    every process alive, its ports held, with no terminal to stop it from."""
    web, aws = free_ports(2)
    run_dir, log = tmp_path / "run", tmp_path / "stack.log"
    env = dict(os.environ, WEB_PORT=str(web), LOCAL_AWS_PORT=str(aws), APP_PREFIX="hangup",
               MODEL_WEIGHTS="random", LOCAL_WARM_SPARES="0", LOCAL_MAX_WORKERS="1",
               XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("AWS_ENDPOINT_URL", None)
    # As make: hears SIGHUP (a handler), passes it on to nobody, waits for its child. The
    # stack's output to a file: written to the closed terminal, it could fail on its own.
    stack = [str(ROOT / ".venv" / "bin" / "python"), "-m", "localaws.stack", "--run-dir", str(run_dir)]
    leader = ("import signal, subprocess, sys; signal.signal(signal.SIGHUP, lambda *_: None); "
              f"out = open({str(log)!r}, 'w'); "
              f"sys.exit(subprocess.call({stack!r}, cwd={str(ROOT)!r}, stdout=out, stderr=out))")
    with terminal_session(leader, env) as terminal:
        wait_for(lambda: "READY " in log.read_text() if log.exists() else False, 180, "the stack ready")
        everything = psutil.Process(terminal.pid).children(recursive=True)
        assert len(everything) >= 4  # the stack, moto, controller, gunicorn
        terminal.close()
        wait_for(lambda: not still_running(everything), STOP_TIMEOUT_S + 15,
                 "every process of the stack ended")
        said = log.read_text()
        assert "the terminal make run was started in is closed: stopping everything" in said, said[-3000:]
        assert said.rstrip().endswith(" stopped"), said[-3000:]
