"""moto's server on loopback, in a process of its own, as the embedded AWS."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.hosts import host_and_port
from localaws.kill import ends_with_parent, kill_and_wait


class StartInterrupted(Exception):
    """A stop was asked for while a server was starting."""


def start_moto(host: str, port: int, log_path: Path, stopping: threading.Event | None = None,
               lifeline_fd: int | None = None, listener: socket.socket | None = None) -> subprocess.Popen:
    """Start moto's server (S3, SQS, EC2 and the rest) and wait until it answers.

    It runs as `localaws.moto_server`: moto's own server with patches that remove
    costs growing with traffic and queue depth (listed in that module). With
    `lifeline_fd` it ends after the last holder of that pipe (localaws.lifeline),
    otherwise with the thread that started it. With `listener` (listening_socket's,
    on `host` and `port`) it serves on that socket rather than binding its own.
    """
    argv = [sys.executable, "-m", "localaws.moto_server", "-H", host, "-p", str(port)]
    fds = []
    if lifeline_fd is not None:
        argv += ["--lifeline", str(lifeline_fd)]
        fds.append(lifeline_fd)
    if listener is not None:
        argv += ["--fd", str(listener.fileno())]
        fds.append(listener.fileno())
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=tuple(fds),
            preexec_fn=ends_with_parent() if lifeline_fd is None else None,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    try:
        # Its start-up builds EC2's, SQS's and S3's backends: ~5 s here, more on a busy machine.
        wait_until_up(f"http://{host_and_port(host, port)}/moto-api/", process, timeout_s=90,
                      stopping=stopping)
    except BaseException:
        # Not yet handed to the caller, who could not stop it: seen left running for
        # hours after a start that timed out on a busy machine.
        kill_and_wait(process)
        raise
    return process


class PortInUse(RuntimeError):
    """The stack cannot listen where its settings say: something already holds the port
    (a second `make run`, say), or the address cannot be listened on at all."""


def listening_socket(host: str, port: int, variable: str) -> socket.socket:
    """A socket bound to `host`:`port` and listening, for a child to serve on (gunicorn's
    `--bind fd://N`), or PortInUse naming `variable`. Taken here, before any child starts,
    the port is this stack's or the start fails. Checked only by connecting to it, a
    second stack starting at the same moment on the same ports (or anything that took a
    port while a first run prepared its model) had the other's answers taken for its own:
    a READY line, and its spare worker on the other's AWS. A port bound but not listening
    ended in a traceback."""
    if port == 0:
        raise PortInUse(f"{variable}=0: the stack needs a port of its own to say where it serves "
                        "(set one that is free)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As gunicorn binds: a port the last run's connections left in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"{host}:{port} is already in use (another `make run`?): stop what "
                            f"listens there, or set {variable} to another port") from None
        # A port below 1024 (EACCES), an address not this machine's (EADDRNOTAVAIL).
        host_variable = variable.replace("_PORT", "_HOST")
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc} (set {host_variable} "
                        f"and {variable} to an address of this machine, and a port from 1024)") from None
    sock.set_inheritable(True)
    return sock


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def ensure_ports_differ(first: tuple[str, int, str], second: tuple[str, int, str]) -> None:
    """Refuse two of the stack's servers one address: each (host, port, variable). The
    first to start would take it, the other could not bind, and the stack say READY while
    the web tier fails its starts, checked through the embedded AWS's answers."""
    (host_a, port_a, var_a), (host_b, port_b, var_b) = first, second
    if port_a == 0 or port_a != port_b:
        return
    if host_a == host_b or host_a in WILDCARD_HOSTS or host_b in WILDCARD_HOSTS:
        raise PortInUse(f"{var_a} and {var_b} are both {port_a}: give the embedded AWS and the web "
                        f"tier ports of their own")


def wait_until_up(url: str, process: subprocess.Popen | None, timeout_s: float,
                  stopping: threading.Event | None = None) -> None:
    """Wait for `url` to answer; raise if `process` exits, the time is up, or `stopping` is set."""
    stopping = stopping or threading.Event()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        if stopping.wait(0.1):
            raise StartInterrupted(f"stopped while waiting for {url} to answer")
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")
