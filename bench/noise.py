"""How much of the machine other programs used while a phase ran.

Other engineers may be running tests on this machine at the same time, so
every figure is noisy. For each phase we record the CPU time the whole machine
spent busy and the CPU time this benchmark's own processes spent (this process
and every child it has reaped, which includes the stack and its workers once
stopped), and report the difference as the share of the machine's cores that
others used.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) \
        + getattr(t, "steal", 0.0)


def _own_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class NoiseMeter:
    """Start with `NoiseMeter.start()`; `stop()` after every child of the phase has exited."""

    started: float
    busy0: float
    own0: float
    load0: float

    @classmethod
    def start(cls) -> NoiseMeter:
        return cls(time.monotonic(), _machine_busy_s(), _own_s(), os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.started, 1e-9)
        cores = psutil.cpu_count() or 1
        busy, own = _machine_busy_s() - self.busy0, _own_s() - self.own0
        return {
            "wall_s": wall,
            "machine_busy_cores": busy / wall,
            "bench_cores": own / wall,
            # Clamped at 0: live children's time is only counted once they are reaped.
            "others_cores": max(0.0, busy - own) / wall,
            "others_share": max(0.0, busy - own) / (wall * cores),
            "loadavg_1m_start": self.load0,
            "loadavg_1m_end": os.getloadavg()[0],
        }
