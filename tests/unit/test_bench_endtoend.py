"""The benchmark's end-to-end run: what it counts into the run's figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from bench import endtoend
from bench.deadline import Deadline
from load_test import Outcome, Report, judge
from localaws.harness import StackProcess
from tests.unit.conftest import wait_until


class _Moto:
    """The embedded AWS's statistics: requests and CPU served so far, by action."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, float]] = {}

    def serve(self, action: str, requests: int) -> None:
        entry = self.totals.setdefault(action, {"requests": 0, "cpu_s": 0.0})
        entry["requests"] += requests
        entry["cpu_s"] = round(entry["cpu_s"] + requests * 0.002, 3)

    def snapshot(self, path: Path) -> dict[str, dict[str, float]]:
        return {action: dict(entry) for action, entry in self.totals.items()}


class StubPoller:
    """What the scaled runs use of FleetPoller, polling nothing: a test's subclass says
    what it saw, and when the fleet was at zero."""

    def __init__(self, settings) -> None:
        self.samples: list[tuple[float, int]] = []
        self.errors = 0

    def start(self) -> StubPoller:
        return self

    def fast(self, until_launch: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass


def quiet_stack(run_dir: Path) -> SimpleNamespace:
    """A stand-in of a StackProcess with no process, no output and no workers, for the
    scaled run's own bookkeeping."""
    return SimpleNamespace(settings=lambda: None, run_dir=run_dir, process=None, output=[],
                           web_url="http://127.0.0.1:1", warm_spares=1, descendants=list,
                           serving_worker_pids=set)


def test_moto_figures_stop_at_the_last_response(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """They are per image of the run: the scale-in to zero (and the polls that
    watch for it) after the last response are not part of it."""
    moto = _Moto()

    class Poller(StubPoller):
        """Sees the fleet reach zero a second after it is asked, the controller
        having terminated the instances meanwhile."""

        def wait_for_zero(self, after: float, timeout_s: float) -> float:
            moto.serve("TerminateInstances", 1)
            moto.serve("DescribeInstances (cached)", 20)
            self.samples.append((after + 1.0, 0))
            return after + 1.0

    def load(plan, url, images, requests, concurrency, phase) -> Report:
        moto.serve("SendMessageBatch", requests)
        outcomes = [Outcome(i, f"{i}.jpg", 0.0, 0.5, status=200) for i in range(requests)]
        return Report(url, "form", concurrency, requests, started_at=1000.0, duration_s=0.5,
                      outcomes=outcomes)

    monkeypatch.setattr(endtoend, "FleetPoller", Poller)
    monkeypatch.setattr(endtoend, "_load", load)
    monkeypatch.setattr(endtoend, "_moto_stats", moto.snapshot)
    stack = quiet_stack(tmp_path)
    plan = endtoend.EndToEndPlan(images=tmp_path, expected=None)

    out = endtoend._scaled_run(plan, stack, tmp_path, requests=10, concurrency=10, phase="throughput")

    assert out["moto_by_action"] == {"SendMessageBatch": {"requests": 10, "cpu_s": 0.02}}
    assert out["scaling"]["last_response_to_zero_s"] == pytest.approx(1.0)


def test_a_phase_waits_for_the_last_fleets_workers_to_end():
    """The last phase's fleet was terminated in EC2 1-2 s before its workers ended;
    meanwhile they took the next phase's first requests, and handed them back: the wait
    for a new instance's worker fell into its measured ones (a low-load p99 of 1.4 s)."""
    alive = iter([2, 1, 0, 0])
    seen: list[int] = []

    def count() -> int:
        seen.append(next(alive))
        return seen[-1]

    assert endtoend.wait_for_the_last_fleets_workers(count, timeout_s=10)
    assert seen == [2, 1, 0]
    assert not endtoend.wait_for_the_last_fleets_workers(lambda: 1, timeout_s=0.3)


def test_the_workers_waited_for_are_those_that_served_not_the_spares(tmp_path: Path):
    """Workers were counted against the warm spares: with as many serving as there are
    spares (2 and 2), the wait ended at once, and the next phase's requests went to
    workers about to stop (a low-load p99 of 1.2-1.3 s)."""
    sleeper = "import time; time.sleep(60)"
    spawn = ("import subprocess, sys, time; "
             f"[subprocess.Popen([sys.executable, '-c', {sleeper!r}, a]) for a in sys.argv[1:]]; "
             "time.sleep(60)")
    stack_like = subprocess.Popen([sys.executable, "-c", spawn, "-m app_tier", "-m app_tier", "gunicorn"])
    root = psutil.Process(stack_like.pid)
    try:
        # Each child's own command line: one not exec'd yet still shows its parent's.
        wait_until(lambda: [c.cmdline()[2:3] for c in root.children(recursive=True)] == [[sleeper]] * 3)
        stack = StackProcess(run_dir=tmp_path)
        stack.process = stack_like
        workers = [c for c in root.children(recursive=True) if "app_tier" in " ".join(c.cmdline())]
        gunicorn = [c for c in root.children(recursive=True) if "gunicorn" in " ".join(c.cmdline())]
        assert endtoend.serving_workers_alive(stack) == 0  # spares, as far as the runner said
        stack.output.append(f"INFO localaws.runner runner: worker pid {workers[0].pid} serves i-0abc\n")
        stack.output.append(f"INFO localaws.runner runner: worker pid {gunicorn[0].pid} serves i-0def\n")
        assert endtoend.serving_workers_alive(stack) == 1  # a worker's pid only
        workers[0].kill()
        wait_until(lambda: endtoend.serving_workers_alive(stack) == 0)
    finally:
        for child in root.children(recursive=True):
            child.kill()
        stack_like.kill()
        stack_like.wait()
    assert endtoend.serving_workers_alive(StackProcess(run_dir=tmp_path)) == 0  # not started


def judged(report: Report) -> Report:
    """`report` with each request judged, with no expected labels."""
    for outcome in report.outcomes:
        judge(outcome, {})
    return report


def test_a_phases_problems_name_requests_never_sent_too():
    """The load test counts them apart from the failed: the bench's
    examples of what went wrong had left them out."""
    outcomes = [Outcome(index=0, file="a.jpg", started_s=0.0, reached=True, label="cat", answer_name="a"),
                Outcome(index=1, file="b.jpg", started_s=0.0, error="cannot connect: refused")]
    report = judged(Report(url="http://x", api="form", concurrency=1, planned=2, started_at=0.0,
                           duration_s=1.0, outcomes=outcomes))
    assert endtoend._summary(report)["problems"] == ["b.jpg: not sent: cannot connect: refused"]


def test_a_scaled_run_keeps_each_request_and_the_fleets_samples(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path):
    """(b)'s and (d)'s p50, p99 and (e) could not be checked from the JSON: it kept
    neither the requests' times nor the fleet's."""

    class Poller(StubPoller):
        def __init__(self, settings) -> None:
            super().__init__(settings)
            # Fast polls while the last fleet settled, then the run from 1000.0: a launch, zero again.
            self.samples = [(990.0 + i * 0.05, 0) for i in range(100)]
            self.samples += [(999.98, 0), (1000.3, 1), (1001.3, 2), (1002.0, 0)]

        def wait_for_zero(self, after: float, timeout_s: float) -> float:
            return 1002.0

    def load(plan, url, images, requests, concurrency, phase) -> Report:
        outcomes = [Outcome(i, f"{i}.jpg", 0.1 * (requests - i), 0.5, status=200) for i in range(requests)]
        outcomes[1].error = "HTTP 503"
        return Report(url, "form", concurrency, requests, started_at=1000.0, duration_s=1.5,
                      outcomes=outcomes)

    monkeypatch.setattr(endtoend, "FleetPoller", Poller)
    monkeypatch.setattr(endtoend, "_load", load)
    monkeypatch.setattr(endtoend, "_moto_stats", lambda path: {})
    stack = quiet_stack(tmp_path)

    out = endtoend._scaled_run(endtoend.EndToEndPlan(images=tmp_path, expected=None), stack, tmp_path,
                               requests=3, concurrency=3, phase="throughput")

    assert out["each_request"] == [{"started_s": 0.1, "latency_s": 0.5, "error": None},
                                   {"started_s": 0.2, "latency_s": 0.5, "error": "HTTP 503"},
                                   {"started_s": 0.3, "latency_s": 0.5, "error": None}]
    # From the fleet the run found on: the settling's fast polls left out.
    assert out["scaling"]["samples"] == [(-0.02, 0), (0.3, 1), (1.3, 2), (2.0, 0)]
    assert out["scaling"]["fleet_samples"] == 104
    assert endtoend.samples_since([(5.0, 1)], 1.0) == [(4.0, 1)]
    assert endtoend.samples_since([], 1.0) == []


def test_low_load_gives_each_request_a_short_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """One image takes ~0.1 s: at the 120 s the loaded runs allow, a stack that answers
    nothing would keep low load's 35 requests, one after another, for 70 minutes."""
    asked = []

    def run_load(config, **_) -> Report:
        asked.append(config)
        outcomes = [Outcome(i, f"{i}.jpg", 0.2 * i, 0.1, status=200) for i in range(config.num_requests)]
        return Report(config.url, "form", 1, config.num_requests, started_at=1000.0, duration_s=7.0,
                      outcomes=outcomes)

    monkeypatch.setattr(endtoend, "run_load", run_load)
    monkeypatch.setattr(endtoend, "_settle", lambda stack, timeout_s=None: None)
    stack = SimpleNamespace(web_url="http://127.0.0.1:1")

    out = endtoend._low_load(endtoend.EndToEndPlan(images=tmp_path, expected=None), stack)

    assert [(c.num_requests, c.concurrency, c.timeout) for c in asked] == [(35, 1, 10.0)]
    assert out["requests"] == 30 and out["warmup_requests"] == 5


def test_a_warmup_request_that_fails_is_counted_by_the_low_load_figures():
    """The first requests after idle are left out of low load's latencies (the fleet's
    scale-out), but one of them that timed out is exactly what low load must show: it
    was dropped, and the run said 0 failed."""
    outcomes = [Outcome(0, "0.jpg", 0.0, 10.0, error="timed out after 10 s", reached=True)]
    outcomes += [Outcome(i, f"{i}.jpg", 10.0 + 0.2 * i, 0.1, status=200, answer_name=str(i), label="ant",
                         reached=True) for i in range(1, 35)]
    report = judged(Report("http://x", "form", 1, 35, started_at=0.0, duration_s=17.0, outcomes=outcomes))
    measured = endtoend._summary(endtoend.without_first(report, 5))
    assert (measured["requests"], measured["failed"], measured["answered_200"]) == (31, 1, 30)
    assert measured["problems"] == ["0.jpg: failed: timed out after 10 s"]
    assert measured["latency_s"]["max"] < 1  # the answered measured requests' latencies alone


def test_a_low_load_run_cut_short_counts_the_requests_it_never_started():
    """35 planned, cut short after 10 answers, one in flight: 24 never ran, and low load
    said it had planned 6 requests."""
    outcomes = [Outcome(i, f"{i}.jpg", 0.2 * i, 0.1, status=200, answer_name=str(i), label="ant",
                        reached=True) for i in range(10)]
    outcomes += [Outcome(10, "10.jpg", 2.0, 0.5, error="abandoned", reached=None)]
    outcomes += [Outcome(i, f"{i}.jpg", None) for i in range(11, 35)]
    report = judged(Report("http://x", "form", 1, 35, started_at=0.0, duration_s=2.5, outcomes=outcomes))
    for outcome in outcomes[10:]:
        outcome.verdict = "abandoned" if outcome.started_s is not None else "not started"
    measured = endtoend.without_first(report, 5)
    assert measured.planned == 30 and endtoend._summary(measured)["answered_200"] == 5
    assert measured.not_sent == 24


def test_a_load_run_under_way_at_the_deadline_is_stopped_then_and_the_fleet_not_waited_for(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A phase started just before the bench's deadline ran to its end: against a broken
    stack, (b)'s 300 requests at 120 s each went ~6 minutes past it, and the bench past 10."""
    deadline = Deadline()
    at = deadline.at
    asked: list[dict] = []
    zero_waits: list[float] = []

    class Poller(StubPoller):
        def wait_for_zero(self, after: float, timeout_s: float) -> None:
            zero_waits.append(timeout_s)  # the fleet never reaches zero

    def run_load(config, **kwargs) -> Report:
        asked.append(kwargs)
        deadline.started -= 3600  # the deadline passes during the run: the load test stops it then
        left = kwargs["stop_reason"]
        outcomes = [Outcome(0, "0.jpg", 0.0, 0.5, status=200),
                    Outcome(1, "1.jpg", 0.1, error=f"in flight when {left}", verdict="abandoned",
                            reached=None),
                    Outcome(2, "2.jpg", None, error=f"not started: {left}", verdict="not started")]
        return Report(config.url, "form", 2, 3, started_at=1000.0, duration_s=1.0, outcomes=outcomes,
                      cut_short=left)

    monkeypatch.setattr(endtoend, "FleetPoller", Poller)
    monkeypatch.setattr(endtoend, "run_load", run_load)
    monkeypatch.setattr(endtoend, "_moto_stats", lambda path: {})
    stack = quiet_stack(tmp_path)
    plan = endtoend.EndToEndPlan(images=tmp_path, expected=None, deadline=deadline)

    out = endtoend._scaled_run(plan, stack, tmp_path, requests=3, concurrency=2, phase="throughput")

    why = "the bench's deadline passed during (b) (9 min from its start)"
    assert asked == [{"stop_at": at, "stop_reason": why}]
    assert out["cut_short"] == why and out["answered_200"] == 1
    assert [r["error"] for r in out["each_request"]] == [None, f"in flight when {why}"]
    assert zero_waits[-1] == 0.0  # past the deadline: no 30 s wait for a fleet at zero
    assert out["scaling"]["last_response_to_zero_s"] is None
    assert out["scaling"]["zero_not_measured"] == \
        "the bench's deadline passed during (b)'s wait for zero instances (9 min from its start)"
