"""The app-tier instances pending or running over a run, read from the web tier's
GET /api/status while it goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from loadtest.client import new_session
from loadtest.config import Config


def instance_count(status: Any) -> int | None:
    """App-tier instances pending or running in a `/api/status` answer."""
    instances = status.get("instances") if isinstance(status, dict) else None
    if isinstance(instances, dict):
        if "pending" not in instances and "running" not in instances:
            # {} while AWS cannot be read (or before it first is): unknown, not none running.
            return None
        return sum(int(instances.get(state) or 0) for state in ("pending", "running"))
    if isinstance(instances, int):
        return instances
    return None


class StatusPoller:
    """Reads GET /api/status every `interval` seconds while the run goes on.

    A web tier without /api/status just yields no samples; the load test does
    not depend on it.
    """

    def __init__(self, config: Config, on_answer: Callable[[], None] | None = None) -> None:
        self.url = f"{config.url}/api/status"
        self.on_answer = on_answer  # called for each answer, whatever it says: the web tier is up
        self.interval = config.status_interval
        self.t0 = 0.0
        self.samples: list[tuple[float, int]] = []
        self._session = new_session(config.api_key)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-poller", daemon=True)

    def sample(self) -> None:
        try:
            resp = self._session.get(self.url, timeout=2.0, allow_redirects=False)
            if self.on_answer:
                self.on_answer()
            count = instance_count(resp.json()) if resp.status_code == 200 else None
        except (requests.RequestException, ValueError, TypeError):
            # TypeError: a malformed answer ({"pending": []}); raised, it ended this thread
            # and, from the last sample, the run, in a traceback without a report.
            return
        if count is not None:
            self.samples.append((time.monotonic() - self.t0, count))

    def _loop(self) -> None:
        # The first sample at once, so even a short run has a starting point; taken
        # here rather than before the run, as /api/status may take up to 2 s.
        self.sample()
        while not self._done.wait(self.interval):
            self.sample()

    def start(self, t0: float) -> None:
        """Sample from now on; times are seconds since `t0` (time.monotonic)."""
        self.t0 = t0
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop sampling; with `wait`, take one last sample, so the run's end has one."""
        self._done.set()
        if not wait:
            return  # the thread ends after the sample it may be taking
        self._thread.join(timeout=5.0)
        self.sample()
        self._session.close()
