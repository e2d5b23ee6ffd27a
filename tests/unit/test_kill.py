"""localaws/kill.py terminate: how the stack stops each of its processes."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from localaws.kill import terminate

# Says it is ready, then sleeps; with "ignore", SIGTERM changes nothing.
CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(120)
"""


def started(how: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", CHILD, how], stdout=subprocess.PIPE,
                               start_new_session=True)
    assert process.stdout.readline() == b"ready\n"
    return process


def test_a_stopped_process_is_continued_so_that_sigterm_ends_it(caplog):
    """SIGSTOPped (by hand, or a debugger), it acts on SIGTERM only once continued: it
    used up the stack's whole stop deadline, then was killed without a word."""
    process = started("default")
    process.send_signal(signal.SIGSTOP)
    with caplog.at_level(logging.WARNING, logger="localaws.kill"):
        terminate(process, time.monotonic() + 10, "web")
    assert process.returncode == -signal.SIGTERM
    assert not caplog.records


def test_a_process_killed_at_the_deadline_is_said_to_be(caplog):
    process = started("ignore")
    with caplog.at_level(logging.WARNING, logger="localaws.kill"):
        terminate(process, time.monotonic() + 0.5, "controller")
    assert process.returncode == -signal.SIGKILL
    (record,) = caplog.records
    assert record.getMessage().startswith(f"controller (pid {process.pid}) had not stopped ")
    assert record.getMessage().endswith(" s after SIGTERM: killed")
