"""Start and stop the whole local stack from another program (tests, `make bench`).

It runs `python -m localaws.stack` exactly as `make run` does, on free ports,
with its own name prefix and run directory, and waits for its READY line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psutil

from common.config import Settings
from localaws.kill import ends_with_parent
from localaws.runner import serving_pids

ROOT = Path(__file__).resolve().parent.parent


# How many times a stack whose port was taken before it bound it is started on others.
PORT_ATTEMPTS = 3
# What the stack says then (localaws/server.py, listening_socket).
PORT_IN_USE = "is already in use"


class PortTaken(RuntimeError):
    """The stack stopped at its start: a port chosen for it was taken before it bound it."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different free ports on loopback. All are bound before any is let go:
    one after the other, the system could hand out the same port twice."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@dataclass
class StackProcess:
    run_dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    warm_spares: int = 1
    process: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)
    ready_line: str = ""

    def __post_init__(self) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.env = dict(os.environ)
        self.env.update(
            APP_PREFIX=self.prefix, MODEL_WEIGHTS="random", PYTHONUNBUFFERED="1", AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        )
        self.env.pop("AWS_ENDPOINT_URL", None)
        self._choose_ports()
        self.env.update(self.env_overrides)

    def _choose_ports(self) -> None:
        self.web_port, self.aws_port = free_ports(2)
        self.env.update(WEB_PORT=str(self.web_port), LOCAL_AWS_PORT=str(self.aws_port))

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def aws_url(self) -> str:
        return f"http://127.0.0.1:{self.aws_port}"

    def settings(self) -> Settings:
        env = dict(self.env, AWS_ENDPOINT_URL=self.aws_url)
        return Settings.from_env(env)

    @property
    def tmp_dir(self) -> Path:
        """TMPDIR of every process of the stack, so a test can see what they leave."""
        return self.run_dir / "tmp"

    def start(self, timeout_s: float = 120.0) -> StackProcess:
        """The stack started and ready. Its ports were free when chosen, and are let go
        until it binds them: taken meanwhile (another test process's stack, or an
        outgoing connection's local port), the stack stops at once saying so, and is
        started again on others (but for ports the test set itself)."""
        chosen = not {"WEB_PORT", "LOCAL_AWS_PORT"} & set(self.env_overrides)
        attempts = 1
        while True:
            try:
                return self._start(timeout_s)
            except PortTaken:
                if attempts == PORT_ATTEMPTS or not chosen:
                    raise
            attempts += 1
            self._choose_ports()

    def _start(self, timeout_s: float) -> StackProcess:
        self.output = []
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.env["TMPDIR"] = str(self.tmp_dir)
        # The controller's lock with the run's files: a test stack killed at its end
        # would leave one in the user's state directory every time.
        self.env["XDG_STATE_HOME"] = str(self.run_dir / "state")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localaws.stack", "--run-dir", str(self.run_dir),
             "--warm-spares", str(self.warm_spares)],
            cwd=str(ROOT), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=ends_with_parent(),  # a test run killed takes its stacks with it
        )
        ready = threading.Event()
        process, output = self.process, self.output  # this start's: a retry's are new

        def pump() -> None:
            assert process.stdout
            # Also kept in a file: the web tier, controller and runner log only here, and
            # a failed test's run directory should say what they did. The pipe is read
            # whatever becomes of the file: unread, it would block the stack's logging.
            kept = self._open_log()
            for line in process.stdout:
                output.append(line)
                if line.startswith("READY "):
                    self.ready_line = line.strip()
                    ready.set()
                if kept is not None:
                    try:
                        kept.write(line)
                        kept.flush()
                    except OSError:
                        kept = None
            if kept is not None:
                kept.close()

        pumping = threading.Thread(target=pump, daemon=True)
        pumping.start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pumping.join(5)  # what it said last, read to its end
                said = "".join(output[-60:])
                if PORT_IN_USE in said:
                    raise PortTaken("a port of the stack was taken before it bound it:\n" + said)
                raise RuntimeError("stack did not become ready:\n" + said)
        return self

    def _open_log(self) -> TextIO | None:
        try:
            return open(self.run_dir / "stack.log", "a", encoding="utf-8")  # noqa: SIM115 (the pump's)
        except OSError:
            return None

    def serving_worker_pids(self) -> set[int]:
        """The worker processes that have served an instance, by the runner's word."""
        return serving_pids(list(self.output))

    def descendants(self) -> list[psutil.Process]:
        if not self.process:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 15.0) -> float:
        """SIGTERM the stack as Ctrl-C would; returns how long it took to exit."""
        if not self.process or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started
