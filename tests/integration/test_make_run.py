"""`make run` itself: READY line, a working page, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import requests

from localaws.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_serves_and_ctrl_c_stops_everything_within_10s(tmp_path):
    web, aws = free_port(), free_port()
    env = dict(os.environ, WEB_PORT=str(web), LOCAL_AWS_PORT=str(aws), APP_PREFIX="makerun",
               MODEL_WEIGHTS="random", TMPDIR=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("AWS_ENDPOINT_URL", None)
    make = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
        page = requests.get(f"http://127.0.0.1:{web}/", timeout=10)
        assert page.status_code == 200 and 'type="file"' in page.text
        everything = psutil.Process(make.pid).children(recursive=True)
        assert len(everything) >= 4  # stack, moto, controller, gunicorn (+ its worker, spares)

        started = time.monotonic()
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        make.wait(timeout=15)
        took = time.monotonic() - started

        def alive() -> list[int]:
            return [p.pid for p in everything if p.is_running() and p.status() != "zombie"]

        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and alive():
            time.sleep(0.05)
        left = alive()
        assert not left, f"left behind: {left}"
        assert took < 10, f"took {took:.1f}s to stop"
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
