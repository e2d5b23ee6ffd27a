"""(f) Peak resident memory of each kind of process in the stack.

Three figures, as they mean different things:
  - each process's own peak: VmHWM in /proc/<pid>/status (Linux), the exact
    high-water mark of its resident set over its life so far, read at every
    sample and once more at stop() while the processes still run; where it
    cannot be read, the largest RSS sampled;
  - the largest RSS total at one sample (every `interval_s`): pages shared
    between processes (libraries, a model file mapped by several workers)
    count once per process, so it overstates what they take together;
  - the largest PSS total (psutil's memory_full_info, every `pss_interval_s`):
    a shared page split among the processes that share it, so the sum is what
    they take together. Reading it walks each process's page tables (~1 ms for
    a 500 MB worker here), hence less often than RSS.

The same samples also give the CPU time each kind used (the last reading of
each process), which shows where the machine's two cores went during a run.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psutil

KINDS = ("moto", "web", "controller", "stack/runner", "worker")


def kind_of(cmdline: list[str], is_root: bool) -> str:
    """Which part of the stack a process is, from its command line."""
    if is_root:
        return "stack/runner"  # the runner is a thread of the stack process
    text = " ".join(cmdline)
    if "moto.server" in text or "moto_server" in text:
        return "moto"
    if "gunicorn" in text:
        return "web"
    if "controller.py" in text or "controller.main" in text:
        return "controller"
    if "app_tier" in text:
        return "worker"
    return "other"


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set so far (VmHWM), in MiB; None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class KindPeak:
    processes: int = 0  # distinct processes seen
    max_rss_mb: float = 0.0  # the largest single process's own peak (see peak_rss_mb)
    peak_sum_mb: float = 0.0  # the largest RSS total at one sample
    peak_pss_sum_mb: float = 0.0  # the largest PSS total at one PSS sample
    peak_count: int = 0  # most processes of this kind alive at one instant
    cpu_s: float = 0.0  # CPU time used while sampled (user + system)

    def to_dict(self) -> dict[str, float]:
        return {"processes": self.processes, "max_rss_mb": self.max_rss_mb,
                "peak_sum_mb": self.peak_sum_mb, "peak_pss_sum_mb": self.peak_pss_sum_mb,
                "peak_count": self.peak_count, "cpu_s": self.cpu_s}


@dataclass
class MemorySampler:
    """Samples the memory of a process tree in a thread, between start() and stop() (see above)."""

    root_pid: int
    interval_s: float = 0.2
    pss_interval_s: float = 1.0
    peaks: dict[str, KindPeak] = field(default_factory=lambda: defaultdict(KindPeak))
    peak_total_mb: float = 0.0
    peak_pss_total_mb: float = 0.0
    samples: int = 0
    pss_samples: int = 0
    _pss_at: float | None = None  # monotonic time of the last PSS sample
    _pss_failed: bool = False  # memory_full_info was refused: RSS only from then on
    _hwm_pids: set[int] = field(default_factory=set)  # processes whose VmHWM could be read
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

    def sample(self, final: bool = False) -> None:
        now = time.monotonic()
        with_pss = not self._pss_failed and (final or self._pss_at is None
                                            or now - self._pss_at >= self.pss_interval_s)
        sums: dict[str, float] = defaultdict(float)
        pss_sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for proc in self._tree():
            # Keep one Process object per pid: psutil caches its identity (create time).
            proc = self._procs.setdefault(proc.pid, proc)
            try:
                if proc.pid not in self._seen:
                    self._seen[proc.pid] = kind_of(proc.cmdline(), proc.pid == self.root_pid)
                    self.peaks[self._seen[proc.pid]].processes += 1
                rss_mb = proc.memory_info().rss / 2**20
                pss_mb = self._pss_mb(proc) if with_pss else None
                times = proc.cpu_times()
                cpu = times.user + times.system
                # A process first seen now started now (or before the run): count from here.
                self._cpu_first.setdefault(proc.pid, cpu if self.samples == 0 else 0.0)
                self._cpu_last[proc.pid] = cpu
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            kind = self._seen[proc.pid]
            peak = self.peaks[kind]
            hwm = peak_rss_mb(proc.pid)
            if hwm is not None:
                self._hwm_pids.add(proc.pid)
            peak.max_rss_mb = max(peak.max_rss_mb, rss_mb, hwm or 0.0)
            sums[kind] += rss_mb
            if pss_mb is not None:
                pss_sums[kind] += pss_mb
            counts[kind] += 1
        for kind, total in sums.items():
            peak = self.peaks[kind]
            peak.peak_sum_mb = max(peak.peak_sum_mb, total)
            peak.peak_count = max(peak.peak_count, counts[kind])
        self.peak_total_mb = max(self.peak_total_mb, sum(sums.values()))
        if with_pss and not self._pss_failed:
            for kind, total in pss_sums.items():
                self.peaks[kind].peak_pss_sum_mb = max(self.peaks[kind].peak_pss_sum_mb, total)
            self.peak_pss_total_mb = max(self.peak_pss_total_mb, sum(pss_sums.values()))
            self.pss_samples += 1
            self._pss_at = now
        self.samples += 1

    def _pss_mb(self, proc: psutil.Process) -> float | None:
        try:
            return proc.memory_full_info().pss / 2**20
        except (psutil.AccessDenied, AttributeError):
            # No PSS here (another OS, or smaps refused): a partial sum would mislead.
            self._pss_failed = True
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, object]:
        """The figures; call it while the processes still run (their exact peaks are read now)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.sample(final=True)
        for pid, last in self._cpu_last.items():
            self.peaks[self._seen[pid]].cpu_s += last - self._cpu_first.get(pid, 0.0)
        if self._hwm_pids and self._hwm_pids >= set(self._seen):
            per_process = "VmHWM"
        else:
            per_process = "VmHWM where readable, else sampled RSS" if self._hwm_pids else "sampled RSS"
        return {
            "samples": self.samples,
            "interval_s": self.interval_s,
            "per_process_peak": per_process,
            "peak_total_mb": self.peak_total_mb,
            "pss_samples": self.pss_samples,
            "pss_interval_s": self.pss_interval_s,
            "peak_pss_total_mb": None if self._pss_failed else self.peak_pss_total_mb,
            "by_kind": {k: self.peaks[k].to_dict() for k in sorted(self.peaks, key=_kind_order)},
        }


def _kind_order(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)
