"""(f) Peak resident memory of each kind of process in the stack, sampled with psutil.

The same samples also give the CPU time each kind used (the last reading of
each process), which shows where the machine's two cores went during a run.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import psutil

KINDS = ("moto", "web", "controller", "stack/runner", "worker")


def kind_of(cmdline: list[str], is_root: bool) -> str:
    """Which part of the stack a process is, from its command line."""
    if is_root:
        return "stack/runner"  # the runner is a thread of the stack process
    text = " ".join(cmdline)
    if "moto.server" in text or "moto_server" in text or "moto_fast" in text:
        return "moto"
    if "gunicorn" in text:
        return "web"
    if "controller.py" in text or "controller.main" in text:
        return "controller"
    if "app_tier" in text:
        return "worker"
    return "other"


@dataclass
class KindPeak:
    processes: int = 0  # distinct processes seen
    max_rss_mb: float = 0.0  # the largest single process
    peak_sum_mb: float = 0.0  # the largest total at one instant
    peak_count: int = 0  # most processes of this kind alive at one instant
    cpu_s: float = 0.0  # CPU time used while sampled (user + system)

    def to_dict(self) -> dict[str, float]:
        return {"processes": self.processes, "max_rss_mb": self.max_rss_mb,
                "peak_sum_mb": self.peak_sum_mb, "peak_count": self.peak_count, "cpu_s": self.cpu_s}


@dataclass
class MemorySampler:
    """Samples RSS of a process tree every `interval_s` in a thread, between start() and stop()."""

    root_pid: int
    interval_s: float = 0.2
    peaks: dict[str, KindPeak] = field(default_factory=lambda: defaultdict(KindPeak))
    peak_total_mb: float = 0.0
    samples: int = 0
    _seen: dict[int, str] = field(default_factory=dict)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)
    _cpu_first: dict[int, float] = field(default_factory=dict)
    _cpu_last: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for proc in self._tree():
            # Keep one Process object per pid: psutil caches its identity (create time).
            proc = self._procs.setdefault(proc.pid, proc)
            try:
                if proc.pid not in self._seen:
                    self._seen[proc.pid] = kind_of(proc.cmdline(), proc.pid == self.root_pid)
                    self.peaks[self._seen[proc.pid]].processes += 1
                rss_mb = proc.memory_info().rss / 2**20
                times = proc.cpu_times()
                cpu = times.user + times.system
                # A process first seen now started now (or before the run): count from here.
                self._cpu_first.setdefault(proc.pid, cpu if self.samples == 0 else 0.0)
                self._cpu_last[proc.pid] = cpu
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            kind = self._seen[proc.pid]
            peak = self.peaks[kind]
            peak.max_rss_mb = max(peak.max_rss_mb, rss_mb)
            sums[kind] += rss_mb
            counts[kind] += 1
        for kind, total in sums.items():
            peak = self.peaks[kind]
            peak.peak_sum_mb = max(peak.peak_sum_mb, total)
            peak.peak_count = max(peak.peak_count, counts[kind])
        self.peak_total_mb = max(self.peak_total_mb, sum(sums.values()))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, object]:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for pid, last in self._cpu_last.items():
            self.peaks[self._seen[pid]].cpu_s += last - self._cpu_first.get(pid, 0.0)
        return {
            "samples": self.samples,
            "interval_s": self.interval_s,
            "peak_total_mb": self.peak_total_mb,
            "by_kind": {k: self.peaks[k].to_dict() for k in sorted(self.peaks, key=_kind_order)},
        }


def _kind_order(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)
