"""The receipts a worker holds, written down for the worker that follows it on its instance.

A worker killed outright (the OOM killer, `kill -9`, a crash in native code) cannot
give back the requests it held: they come back only once their visibility timeout
runs out (a minute by default), and their senders wait that long. Its instance lives
on, and systemd (or the local runner) starts a new worker there within seconds. That
worker reads this file first and makes those messages visible again at once.

Each receipt is written with whether its request was at risk: being loaded (its image
downloaded and decoded) or in a model call at that moment. One that was may be the
image that killed the worker: it is made visible, and its attempt counts (so that it
is loaded and classified alone next time, and dead-lettered after MAX_RECEIVE_COUNT),
as it would after its timeout. The others (received and waiting, decoded and waiting
for the model, classified and being answered) cannot have killed it: they are handed
back untried, sent again as new messages with the receives their earlier copies used,
so that an image that kills workers does not take its batch-mates to the dead-letter
queue with it. For that each entry carries the request as the worker would send it,
and its receive count. An entry without the flag (an older worker's) is taken for at
risk.

Each receipt is written with the time until which it is hidden at the latest. One
whose time has passed is left alone: its message is visible again anyway, and another
worker may hold it by now.

One worker serves an instance at a time (its systemd unit; the local runner's one
process per instance), and the next starts only once the last has ended: nothing else
writes the file meanwhile. Each holds the journal's lock for its life
(`hold_journal_lock`), so that two run by hand under one id (the host name, without
INSTANCE_ID) do not take each other's journal for a dead worker's: the second took
the first's held requests and handed them back, answered twice, and either one's
clean stop deleted the other's journal. It is written whole to a new file that then
replaces it, so a kill mid-write leaves the last whole version; it is not fsynced, since it has
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
from dataclasses import dataclass
from pathlib import Path

from common.config import Settings
from common.file_lock import HeldLock, LockHeld, hold, holder
from common.messages import ClassifyRequest, MessageError

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


def lock_path(journal: Path) -> Path:
    """The file whose lock says a worker serving `journal`'s instance id is running.
    Not the journal itself: replaced at each write, and removed when nothing is held,
    it would lose its lock."""
    return journal.with_suffix(".lock")


class JournalInUse(Exception):
    """A worker running on this machine serves the same instance id: the journal is its."""

    def __init__(self, journal: Path, instance_id: str) -> None:
        self.pid = holder(lock_path(journal))
        super().__init__(f"another worker (pid {self.pid}) serves instance id {instance_id!r} on this "
                         f"machine and keeps {journal.name}: give each worker its own INSTANCE_ID "
                         "(or --instance-id)")


def hold_journal_lock(journal: Path, instance_id: str) -> HeldLock:
    """Lock `journal` for this process's life; raises JournalInUse if a running worker has it."""
    path = lock_path(journal)
    try:
        return HeldLock(path, hold(path))
    except LockHeld:
        raise JournalInUse(journal, instance_id) from None


@dataclass(frozen=True)
class HeldEntry:
    """One message held, as the journal keeps it."""

    receipt: str
    # Until when (time.time()) its message is hidden at the latest.
    hidden_until: float
    # Being loaded or in a model call: a death now may be its doing.
    at_risk: bool = True
    # What a hand-back sends (ClassifyRequest.to_json()); None: it can only be made visible.
    request: str | None = None
    # Receives of the request so far, this one and its earlier copies' included.
    receive_count: int = 1

    @property
    def untried(self) -> bool:
        """Whether its successor hands it back untried, rather than make it visible."""
        return not self.at_risk and self.request is not None


class HeldJournal:
    """The file at `path`. A journal that cannot write (a full disk, a read-only
    directory) says so once and goes on without it: the work matters more than its
    insurance, which was only ever the visibility timeout's head start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._failing = False

    def record(self, entries: Iterable[HeldEntry]) -> None:
        """Write what is held now. Nothing held: the file is removed."""
        held = [{"receipt": e.receipt, "hidden_until": round(e.hidden_until, 3), "at_risk": e.at_risk,
                 "request": e.request, "receive_count": e.receive_count} for e in entries]
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

    def read(self, now: float | None = None) -> list[HeldEntry]:
        """What a dead worker left: each message still hidden by more than MARGIN_S at
        `now`. A damaged file is removed."""
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
            held = [_entry(h) for h in json.loads(text)["held"]]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("%s is not a journal of held messages (%s): ignored; the requests it "
                        "may name come back after their visibility timeout", self.path, exc)
            self.remove()
            return []
        return [e for e in held if still_hidden(e.hidden_until, now)]

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


def _entry(written: dict) -> HeldEntry:
    """An entry as read back. One without the flag or a request to send (an older
    worker's), or whose request or count cannot be read, is at risk: made visible."""
    request = written.get("request")
    count = written.get("receive_count")
    untried = (written.get("at_risk") is False and _is_request(request)
               and isinstance(count, int) and count >= 1)
    return HeldEntry(str(written["receipt"]), float(written["hidden_until"]), at_risk=not untried,
                     request=request if untried else None, receive_count=count if untried else 1)


def _is_request(body: object) -> bool:
    if not isinstance(body, str):
        return False
    try:
        ClassifyRequest.from_json(body)
    except MessageError:
        return False
    return True


def still_hidden(until: float, now: float) -> bool:
    """Whether a message hidden until `until` is, at `now`, still hidden by a dead
    worker's receive, safely: not visible again, nor taken by another worker since."""
    return until - MARGIN_S > now
