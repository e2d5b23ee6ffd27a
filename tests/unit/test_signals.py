"""Stop signals are handled without deadlocking, wherever the main thread is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The main thread holds the Event's own lock when the signal comes, as it does inside
# Event.wait(), and as the first handler did when a second signal came inside its
# Event.set() (`timeout make run` signals make and its group at once). A handler that
# called set() itself would wait for that lock for ever.
SCRIPT = """
import os, signal, threading, time
from common.signals import on_signals
stop = threading.Event()
heard = []
on_signals(lambda signum: (heard.append(signum), stop.set()))
with stop._cond:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
heard_first = stop.wait(10)
deadline = time.monotonic() + 10  # the second is relayed after the first's set() returns
while len(heard) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
print(heard_first, heard == [signal.SIGTERM, signal.SIGINT])
"""


def test_a_signal_that_comes_while_the_main_thread_holds_the_events_lock_is_still_heard():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


# gunicorn's worker has its own SIGTERM handler (a graceful stop) on the main thread:
# the web tier adds closing its result book without replacing it.
CHAINED = """
import os, signal, threading
from common.signals import on_signals
on_main = []
signal.signal(signal.SIGTERM, lambda signum, frame: on_main.append(threading.current_thread().name))
relayed = threading.Event()
on_signals(lambda signum: relayed.set(), (signal.SIGTERM,), then_previous=True)
os.kill(os.getpid(), signal.SIGTERM)
print(relayed.wait(10), on_main == ["MainThread"])
"""


def test_the_handler_a_signal_had_before_still_runs_when_asked():
    done = subprocess.run([sys.executable, "-c", CHAINED], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
