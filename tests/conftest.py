"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image, ImageDraw

# `make test` runs two test processes (pytest-xdist, --dist loadscope), each taking
# whole groups: every integration test in one group, as each starts a stack that wants
# both cores, and the page and pipeline tests share one (a session fixture, which would
# otherwise start in both processes); each unit module in a group of its own, so that
# its module fixtures (a loaded model, say) are made once. The groups are made here, in
# the scheduler: xdist's own xdist_group marks are lost on pytest 9.2 (pytest-xdist
# issue 1386), and every test would be scheduled alone, two stacks at once.
INTEGRATION = "tests/integration/"


def group_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return INTEGRATION if path.startswith(INTEGRATION) else path


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_tools(*programs, why): runs programs pip cannot install "
                            "(see pytest_runtest_setup)")
    processes = getattr(config.option, "numprocesses", None)
    if processes and config.getvalue("dist") not in ("loadscope", "each"):
        # Any other mode spreads a group over both processes: two stacks at once.
        raise pytest.UsageError("with -n, use --dist loadscope --no-loadscope-reorder (as make test does)")


# The programs a few tests run that pip cannot install (Chromium, node, bsdtar: `make
# browser-deps` installs them, as root). Without one such a test is skipped, as on a
# laptop; with REQUIRE_TEST_TOOLS=1, as .ci/run sets it, it fails instead: CI whose
# install of them failed would stay green, those tests skipped unseen.
REQUIRE_TEST_TOOLS = "REQUIRE_TEST_TOOLS"


@pytest.hookimpl(tryfirst=True)  # before the fixtures: the page tests' starts a whole stack
def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_tools"):
        missing = [program for program in mark.args if shutil.which(program) is None]
        if not missing:
            continue
        why = f"needs {', '.join(missing)}: {mark.kwargs['why']} (make browser-deps installs it, as root)"
        if os.environ.get(REQUIRE_TEST_TOOLS) == "1":
            pytest.fail(f"{why}; {REQUIRE_TEST_TOOLS}=1 makes that a failure, not a skip", pytrace=False)
        pytest.skip(why)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's: absent when it is not installed or loaded
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByGroup(config, log)


# The test processes each group ran in, as the controlling process hears of them:
# a group split over two fails the run, lest the grouping be lost unseen again.
_processes_by_group: dict[str, set[str]] = {}


def pytest_runtest_logreport(report):
    node = getattr(report, "node", None)  # set by xdist, in the controlling process only
    if node is not None and report.when == "call":
        _processes_by_group.setdefault(group_of(report.nodeid), set()).add(node.gateway.id)


def pytest_sessionfinish(session):
    split = {group: sorted(ids) for group, ids in _processes_by_group.items() if len(ids) > 1}
    # Only a run that would pass: a test process that crashed (its group then goes on
    # in another) has failed it already, and an interrupted run keeps its own status.
    if split and session.exitstatus == pytest.ExitCode.OK:
        session.config.get_terminal_writer().line(f"\ntest groups split across processes: {split}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="session")
def _state_in_a_folder_of_the_runs(tmp_path_factory):
    """The journals, locks and sockets of every process the tests start, in a folder of
    this run's (each test process its own): in the user's own (~/.local/state/imgclass)
    each run left a web tier's journal folder, and a killed worker's lock."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _model_caches_in_a_folder_of_the_runs(tmp_path_factory):
    """The converted model (IMGCLASS_CACHE), Keras's home and matplotlib's, for every
    process the tests start, in a folder of this run's, shared by its test processes (a
    file lock makes them convert once): in the user's own (~/.cache/imgclass, ~/.keras)
    a run left 100 MB, and how long the next took hung on what an earlier one had left."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # each test process's is a folder of the run's
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGCLASS_CACHE", str(shared / "imgclass-cache"))
        patch.setenv("KERAS_HOME", str(shared / "keras"))
        patch.setenv("MPLCONFIGDIR", str(shared / "matplotlib"))  # its font cache (the load test's --plot)
        yield


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch):
    """Tests never touch real AWS: dummy credentials and a fixed region."""
    # AWS_REGION comes before AWS_DEFAULT_REGION, for boto3 and for Settings.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    # Nor a profile's settings from the developer's own files.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if not os.environ.get("KEEP_AWS_ENDPOINT_URL"):
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def without_credentials(monkeypatch, tmp_path) -> None:
    """No AWS credentials anywhere boto3 looks: environment, files, instance metadata."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def wait_for(predicate: Callable[[], object], timeout_s: float = 30.0, what: str = "the condition",
             interval: float = 0.2, why: Callable[[], str] | None = None) -> object:
    """Poll `predicate` until it returns something truthy, and return that; fail after
    `timeout_s`, naming `what` (and saying `why()`, worked out only then). The deadline
    only bounds a failure's wait: generous, for a loaded CI machine. Looked at once more
    at the deadline: a poll that slept past it would otherwise fail what had come true
    meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = f": {why()}" if why is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{said}")
        time.sleep(interval)


def client_error(code: str, operation: str, status: int | None = None) -> ClientError:
    """The error an AWS call `operation` fails with, as botocore raises it (and its HTTP
    status, where the code under test looks at it)."""
    response: dict = {"Error": {"Code": code, "Message": f"injected {code}"}}
    if status is not None:
        response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, operation)


def make_image(seed: int, size: tuple[int, int] = (320, 240), fmt: str = "JPEG") -> bytes:
    """A distinct, photo-like test image: noise, a gradient and shapes, all from `seed`."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    gradient = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
    pixels = (base * 0.5 + gradient * 0.5).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))], fill=color)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def image_bytes():
    return make_image


def jpeg_of_many_scans(scans: int, side: int = 64) -> bytes:
    """A progressive JPEG whose second scan is repeated until it has `scans` in all:
    small, and each scan costs the decoder a pass over the whole image."""
    out = io.BytesIO()
    Image.new("L", (side, side), 128).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    starts = []
    at = data.find(b"\xff\xda")
    while at >= 0:
        starts.append(at)
        at = data.find(b"\xff\xda", at + 2)
    second = data[starts[1]:starts[2]]
    return data[:starts[2]] + second * (scans - len(starts)) + data[starts[2]:]


PAGE_SCRIPTS = Path(__file__).parents[1] / "web_tier" / "static" / "js"


def page_script_source() -> str:
    """The upload page's scripts (its ES modules, web_tier/static/js), one after the other."""
    return "\n".join(path.read_text() for path in sorted(PAGE_SCRIPTS.glob("*.js")))


@contextmanager
def silent_endpoint() -> Iterator[tuple[str, list[socket.socket]]]:
    """An endpoint that takes connections and never answers, as an AWS that has stopped
    answering: its URL, and the connections it has taken (one per attempt of a call)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(silent.accept()[0])  # and never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{silent.getsockname()[1]}", accepted
    finally:
        silent.close()
        for connection in accepted:
            connection.close()


def loopback_listener() -> socket.socket:
    """A socket listening on a free loopback port, for a child to serve on (moto_server's
    `--fd N`, gunicorn's `--bind fd://N`, with pass_fds), as the stack does
    (localaws.server.listening_socket). A port found free, let go and bound by the child
    seconds later could be taken in between by another test's server on the machine."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class Terminal:
    """A terminal (a pty) whose session `python -c <leader>` leads (terminal_session)."""

    def __init__(self, pid: int, master: int) -> None:
        self.pid = pid  # the leader's
        self._master = master

    def close(self) -> None:
        """Closes the terminal, as a window closed does: its session's leader hears SIGHUP."""
        if self._master != -1:
            os.close(self._master)
            self._master = -1


@contextmanager
def terminal_session(leader: str, env: dict[str, str] | None = None) -> Iterator[Terminal]:
    """A new terminal whose session is led by `python -c leader` (in `env`), as make leads
    `xterm -e make run`'s. Afterwards the terminal is closed, and the leader and all it
    started are killed."""
    import signal
    import sys

    import psutil

    pid, master = os.forkpty()
    if pid == 0:
        try:
            os.execve(sys.executable, [sys.executable, "-c", leader], os.environ if env is None else env)
        finally:
            os._exit(127)
    terminal = Terminal(pid, master)
    try:
        yield terminal
    finally:
        terminal.close()
        try:
            for process in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        except psutil.NoSuchProcess:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
