"""The receipts a worker holds, written down for the worker that follows it on its instance.

A worker killed outright (the OOM killer, `kill -9`, a crash in native code) cannot
give back the requests it held: they come back only once their visibility timeout
runs out (a minute by default), and their senders wait that long. Its instance lives
on, and systemd (or the local runner) starts a new worker there within seconds. That
worker reads this file first and makes those messages visible again at once.

Made visible, not handed back as new messages: one of them may be the image that
killed the worker, and its attempt must count (so that it is classified alone next
time, and dead-lettered after MAX_RECEIVE_COUNT), as it would after its timeout.

Each receipt is written with the time until which it is hidden at the latest. One
whose time has passed is left alone: its message is visible again anyway, and another
worker may hold it by now.

One worker serves an instance at a time (its systemd unit; the local runner's one
process per instance), and the next starts only once the last has ended: nothing else
writes the file meanwhile. It is written whole to a new file that then replaces it,
so a kill mid-write leaves the last whole version; it is not fsynced, since it has
to outlive a process, not the machine (a lost instance loses its worker's receipts
with it).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from common.config import Settings

log = logging.getLogger(__name__)

# A message whose time runs out within this is left to its timeout: making it visible
# would win nothing, and its timeout may pass while the call is on its way.
MARGIN_S = 1.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def held_journal_path(settings: Settings, instance_id: str) -> Path | None:
    """Where the worker serving `instance_id` writes what it holds; None without a
    state directory (Settings() in tests)."""
    if not settings.state_dir:
        return None
    return Path(settings.state_dir) / f"{settings.fleet_name}-held-{_UNSAFE.sub('_', instance_id)}.json"


class HeldJournal:
    """The file at `path`. A journal that cannot write (a full disk, a read-only
    directory) says so once and goes on without it: the work matters more than its
    insurance, which was only ever the visibility timeout's head start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._failing = False

    def record(self, hidden_until: Iterable[tuple[str, float]]) -> None:
        """Write what is held now: (receipt, until when it is hidden, in time.time()'s
        seconds). Nothing held: the file is removed."""
        held = [{"receipt": receipt, "hidden_until": round(until, 3)} for receipt, until in hidden_until]
        try:
            if not held:
                self.path.unlink(missing_ok=True)
            else:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._tmp.write_text(json.dumps({"held": held}), encoding="utf-8")
                os.replace(self._tmp, self.path)
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write %s (%s): a worker killed outright here will leave its "
                            "requests to their visibility timeout", self.path, exc)
            self._failing = True
            # The last version names what is no longer held (answered, or hidden for a
            # retry delay): a successor would show those. Removing works on a full disk.
            self._remove_quietly()
            return
        if self._failing:
            log.info("writing %s again", self.path)
        self._failing = False

    def read(self, now: float | None = None) -> list[tuple[str, float]]:
        """What a dead worker left: (receipt, hidden until) for each message still hidden
        by more than MARGIN_S at `now`. A damaged file is removed."""
        now = time.time() if now is None else now
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read %s (%s): the requests it names come back after their "
                        "visibility timeout", self.path, exc)
            return []
        try:
            held = [(str(h["receipt"]), float(h["hidden_until"])) for h in json.loads(text)["held"]]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("%s is not a journal of held messages (%s): ignored; the requests it "
                        "may name come back after their visibility timeout", self.path, exc)
            self.remove()
            return []
        return [(receipt, until) for receipt, until in held if still_hidden(until, now)]

    def remove(self) -> None:
        """Remove the file, and any new version a kill left unfinished."""
        self._remove_quietly()
        for tmp in self.path.parent.glob(f"{glob.escape(self.path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)

    def _remove_quietly(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path, exc)


def still_hidden(until: float, now: float) -> bool:
    """Whether a message hidden until `until` is, at `now`, still hidden by a dead
    worker's receive, safely: not visible again, nor taken by another worker since."""
    return until - MARGIN_S > now
