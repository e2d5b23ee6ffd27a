"""Whether the terminal `make run` was started in has been closed.

Closing a terminal sends SIGHUP to its session's leader only. When that is the shell,
the shell passes it on to its jobs, and the stack stops (stack.stop_signals). When it
is `make` itself (`ssh -t host make run`, `xterm -e make run`, an IDE's terminal), make
passes on nothing but waits for the stack, which went on serving with no terminal and
no one to stop it: every process alive, its ports held. The kernel does take the
terminal away from every process of the session, though: the stack watches for that.
Linux only (/proc); elsewhere nothing is watched.
"""

from __future__ import annotations

from pathlib import Path


def controlling_terminal(stat: Path = Path("/proc/self/stat")) -> int | None:
    """This process's controlling terminal as the kernel numbers it (0: none), or None
    where that cannot be read."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    # Fields after the command's name, which is in parentheses and may hold anything:
    # state, ppid, pgrp, session, tty_nr (proc(5)).
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[4])
    except (IndexError, ValueError):
        return None


class TerminalWatch:
    """Says once the terminal this process had when the watch began is gone."""

    def __init__(self, stat: Path = Path("/proc/self/stat")) -> None:
        self._stat = stat
        self._had = bool(controlling_terminal(stat))

    def lost(self) -> bool:
        return self._had and controlling_terminal(self._stat) == 0
