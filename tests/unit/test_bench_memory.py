"""The benchmark's memory figures, part (f): exact per-process peaks, and what the sums mean."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.memory import MemorySampler, peak_rss_mb

# Allocates (and writes) 100 MB when told, frees it at once, then waits to be told to exit.
_SPIKE = textwrap.dedent("""
    import sys
    sys.stdin.readline()
    spike = b"x" * (100 * 2**20)
    del spike
    print("freed", flush=True)
    sys.stdin.readline()
""")

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")


def test_a_peak_between_two_samples_is_still_the_process_peak():
    """A sample every 0.2 s misses a spike shorter than that; VmHWM, read at the end, does not."""
    child = subprocess.Popen([sys.executable, "-c", _SPIKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        sampler = MemorySampler(child.pid, interval_s=3600.0).start()  # no sample but the first and last
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "freed"
        mem = sampler.stop()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    kind = mem["by_kind"]["stack/runner"]
    assert kind["max_rss_mb"] >= 100  # the spike, though no sample saw it
    assert kind["peak_sum_mb"] < 100  # the sums are of samples: the spike was gone at both
    assert mem["per_process_peak"] == "VmHWM"
    assert mem["pss_interval_s"] > 0 and kind["peak_pss_sum_mb"] > 0


def test_peak_rss_of_no_process_is_none():
    assert peak_rss_mb(2**22 + 12345) is None
    assert peak_rss_mb(0) is None


def test_the_memory_table_says_what_its_columns_are():
    from bench.printed import memory_table

    mem = {"samples": 10, "interval_s": 0.2, "pss_interval_s": 1.0, "per_process_peak": "VmHWM",
           "peak_total_mb": 900.0, "peak_pss_total_mb": 700.0,
           "by_kind": {"worker": {"processes": 2, "max_rss_mb": 500.0, "peak_sum_mb": 900.0,
                                  "peak_pss_sum_mb": 700.0, "peak_count": 2, "cpu_s": 3.0}}}
    text = memory_table(mem)
    assert "VmHWM" in text and "PSS" in text and "shared" in text
    assert "700 MB" in text
    # A JSON from before these figures still prints.
    old = {"samples": 10, "interval_s": 0.2, "peak_total_mb": 900.0,
           "by_kind": {"worker": {"processes": 2, "max_rss_mb": 500.0, "peak_sum_mb": 900.0,
                                  "peak_count": 2}}}
    assert "500 MB" in memory_table(old)
