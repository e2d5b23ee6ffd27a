"""localaws/terminal.py: a stack sees the terminal it was started in closed, even when
its session's leader (make) passes no signal on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from localaws.terminal import TerminalWatch, controlling_terminal
from tests.conftest import terminal_session, wait_for


def test_the_terminal_is_read_after_a_command_name_that_holds_parentheses(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("4242 (make (run) x) S 1 4242 4242 34816 4242 4194560 0 0\n")
    assert controlling_terminal(stat) == 34816
    stat.write_text("4242 (python) S 1 4242 4242 0 -1 4194560 0 0\n")
    assert controlling_terminal(stat) == 0
    assert not TerminalWatch(stat).lost()  # none at the start: nothing to lose
    assert controlling_terminal(tmp_path / "none") is None
    stat.write_text("garbled")
    assert controlling_terminal(stat) is None


def text_once_written(path: Path, deadline: float) -> str:
    """What another process wrote to `path`, once it holds something (or "" at `deadline`):
    the file exists from its open, a moment before the text is in it."""
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.05)
    return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux's /proc says which terminal")
def test_a_process_under_a_make_that_passes_no_hangup_on_sees_its_terminal_closed(tmp_path):
    """As `xterm -e make run`: the terminal's session is led by a process that hears the
    hangup and only waits for its child (GNU make), which hears nothing."""
    said = tmp_path / "said"
    watcher = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from localaws.terminal import TerminalWatch
        watch = TerminalWatch()
        open({str(said)!r} + ".started", "w").write(str(watch._had))
        deadline = time.monotonic() + 15  # within the test's own
        while not watch.lost() and time.monotonic() < deadline:
            time.sleep(0.05)
        open({str(said)!r}, "w").write("lost" if watch.lost() else "kept")
    """)
    leader = ("import signal, subprocess, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
              f"sys.exit(subprocess.call([sys.executable, '-c', {watcher!r}]))")
    with terminal_session(leader) as terminal:  # its leader as make is
        deadline = time.monotonic() + 30  # bounds a failure only
        started = Path(f"{said}.started")
        assert text_once_written(started, deadline) == "True", "the watcher had the terminal at its start"
        terminal.close()
        assert text_once_written(said, deadline) == "lost"


def test_the_stack_gets_sigterm_when_the_make_that_started_it_is_killed(tmp_path):
    """kill -9 of make (an IDE's stop button) left the whole stack serving, its ports held."""
    heard = tmp_path / "heard"
    child = textwrap.dedent(f"""
        import signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from localaws.kill import end_with_parent
        signal.signal(signal.SIGTERM, lambda *_: open({str(heard)!r}, "w").write("SIGTERM") or sys.exit(0))
        end_with_parent()
        open({str(heard)!r} + ".ready", "w").close()
        time.sleep(30)
    """)
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               f"subprocess.call([sys.executable, '-c', {child!r}])"])
    try:
        wait_for(Path(f"{heard}.ready").exists, 30, "the child to ask for its signal", interval=0.05)
        parent.kill()
        parent.wait()
        assert text_once_written(heard, time.monotonic() + 30) == "SIGTERM"
    finally:
        parent.kill()
        parent.wait()
