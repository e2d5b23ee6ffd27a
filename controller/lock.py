"""One controller per fleet on a machine: a second one would launch past the cap.

Two controllers each count the fleet and each launch what they find missing:
together they go over the cap and launch instances under the same names (18 live
instances, five names twice). So a
controller holds a lock for its whole life, one per fleet (the prefix and the
AWS it talks to), and a second one for the same fleet refuses to start. The
lock is a file under the state directory, locked with flock: the kernel drops
it when its process dies, however it dies, so a controller restarted after a
kill is never shut out by its own past.

It guards one state directory on one machine: a controller run by another user,
or with another XDG_STATE_HOME, takes another lock. Controllers on two machines
need a lease that AWS holds (a conditional write); README, Controller, says to
run exactly one.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.config import Settings
from common.file_lock import HeldLock, LockHeld, hold, holder

# sysexits' EX_TEMPFAIL: it may start once the other has stopped.
EXIT_ANOTHER_CONTROLLER = 75


class AnotherController(Exception):
    """A controller for the same fleet is running on this machine."""


def lock_path(settings: Settings) -> Path:
    return Path(settings.state_dir) / f"{settings.fleet_name}-controller.lock"


def hold_fleet_lock(settings: Settings) -> HeldLock:
    """Lock this fleet for this process's life (the kernel lets go when it ends).

    Raises AnotherController, naming its process, if one already holds it.
    """
    path = lock_path(settings)
    try:
        return HeldLock(path, hold(path))
    except LockHeld:
        where = settings.endpoint_url or f"AWS {settings.region}"
        raise AnotherController(
            f"another controller (pid {holder(path)}) is running for the instances of prefix "
            f"{settings.prefix!r} on {where}: two would launch past the cap. Run exactly one; "
            f"stop that one first (lock: {path})") from None


def held_by_another(settings: Settings) -> bool:
    """Whether the fleet's lock file names a live process other than this one.

    For whoever restarts a controller refused for the lock (the local stack): a
    question that takes no lock, so it never refuses a controller starting at that
    moment. A pid reused since is taken for a holder, and one that names nobody
    for none; either way the controller's own flock decides when it starts.
    """
    pid = holder(lock_path(settings))
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True

