"""Which loads (download and decode) and model calls may run at once, so that a worker's
death can be blamed.

A worker killed outright while loading an image or in a model call (the OOM killer, a
crash in native code) may have been killed by a request in it. Its journal names those
at risk then (`HeldMessages.at_risk`), and its successor counts an attempt against each
of them only, handing the others back untried (`held.show_held`).

Fresh requests (received once) share their risk: they are loaded together, classified
as one batch, and the next batch is loaded while this one is classified. A suspect
(received before: it may have killed a worker already) is loaded alone and classified
alone, and nothing else is loaded or classified meanwhile: a death then is charged to
it alone. So an image that kills workers reaches the dead-letter queue after
MAX_RECEIVE_COUNT deaths, and the requests held beside it are answered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from app_tier.job import Job

# Held around a load or a model call of the jobs it is given: the fetch and model steps
# take the worker's (Worker._at_risk: this gate, and the journal's mark), not a gate of their own.
AtRisk = Callable[[list[Job]], AbstractContextManager[None]]


def suspect(job: Job) -> bool:
    """Whether `job` was received before (by this copy or an earlier one): an attempt
    on it may have killed a worker."""
    return job.receive_count > 1


class RiskGate:
    """Shared by the loads and model calls of fresh requests, taken alone by a
    suspect's. A suspect waiting goes before fresh work that comes after it: a busy
    worker, always decoding one batch or classifying another, would otherwise keep it
    waiting for ever. A thread must not take it again while it holds it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @contextmanager
    def enter(self, jobs: list[Job]) -> Iterator[None]:
        """Hold the gate while `jobs` are loaded or classified: alone for a suspect
        (which must then be the only job), shared otherwise."""
        alone = any(suspect(j) for j in jobs)
        assert not alone or len(jobs) == 1, "a suspect is loaded and classified alone"
        with self._changed:
            if alone:
                self._waiting_alone += 1
                try:
                    self._changed.wait_for(lambda: not self._alone and not self._sharing)
                finally:
                    self._waiting_alone -= 1
                    self._changed.notify_all()  # the fresh work held back for it looks again
                self._alone = True
            else:
                self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
                self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                if alone:
                    self._alone = False
                else:
                    self._sharing -= 1
                self._changed.notify_all()
