"""(b), (d), (e), (f), (g): the whole stack, driven by the load-test script's core.

One stack (`StackProcess`, the same `python -m localaws.stack` that `make run`
starts) serves every phase in turn, starting each from zero instances. Each
phase's JSON keeps every request's start and latency, and the scaled runs the
fleet's samples too, so that its percentiles and (e) can be checked from it:

  throughput  300 distinct images at concurrency 100 through POST /, with the
              fleet (EC2 polled every ~50 ms around the first launch and the
              return to zero, once a second between) and memory (psutil) sampled,
              and the embedded AWS's CPU counted per API action;
  model now   the model alone again, as (a) measured the limit, the stack idle:
              the machine's speed then, for (c) (when the plan has a probe);
  course      100 requests at concurrency 100: the course's average latency
              (total duration / requests);
  low load    one request at a time, after a warm-up: the p50 latency.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.deadline import Deadline, DeadlinePassed, within
from bench.inference import InferenceResult
from bench.memory import MemorySampler, kind_of
from bench.report import bad_requests
from bench.scaling import FleetPoller, controller_actions, scaling_times
from load_test import Config, Outcome, Report, latency_summary, run_load
from localaws.harness import StackProcess
from localaws.moto_middleware import STATS_ENV, STATS_EVERY_S

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 120.0
# One image takes ~0.1 s one at a time: a stack that does not answer in 10 s is broken,
# and at 120 s each low load's 35 requests one after another would take 70 minutes.
LOW_LOAD_TIMEOUT_S = 10.0
ZERO_TIMEOUT_S = 30.0
STACK_START_TIMEOUT_S = 120.0
STACK_START = "the stack's start"
MOTO_STATS = "moto-stats.json"  # in the run folder: the embedded AWS's CPU by action


def tuned_env() -> tuple[dict[str, str], int]:
    """The local stack's knobs as tuned by this benchmark (environment, warm spares).

    Measured on a 2-core AVX2 machine (see the report of the bench change):
      - LOCAL_MAX_WORKERS = cores: 15 model processes on 2 cores spent the first
        ~10 s of a burst loading models and then contended (5.7 images/s at
        300 @ 100; 2 processes: 9.7). The controller still decides 15 instances;
        the runner gives a process to as many as there are cores.
      - LOCAL_WORKER_THREADS=1, a lone image still on all cores
        (LOCAL_WORKER_ONE_IMAGE_THREADS=0). On a 2-core
        AVX-512 machine (2026-12-05): 30.7-30.9 images/s at 300 @ 100 against
        26.7-27.8 with every call on all cores (two workers' four streams on two
        cores), the low-load p50 the same; one thread for every call, 31.1-32.3,
        but a low-load p50 of 76-78 ms against 52-54. (On the AVX2 machine, before
        lone images had a compilation of their own, every call on all cores had
        won: while one worker waits on S3 and SQS the other computes; 2 x 1 thread
        for every call: 7.8 images/s.)
      - 2 warm spares: both processes are loaded before the first launch.
      - SCALE_IN_COOLDOWN=0.5 with POLL_INTERVAL=0.5: a worker stays up between
        back-to-back single requests (without a cooldown one poll in the gap
        between two requests ends the fleet: low-load p99 1.8 s; with it 0.2 s),
        and the fleet still reaches zero within ~1.5 s of the last answer
        (a 1 s cooldown took 1.6-2.0 s).
    """
    cores = os.cpu_count() or 1
    env = {"LOCAL_MAX_WORKERS": str(cores), "LOCAL_WORKER_THREADS": "1",
           "LOCAL_WORKER_ONE_IMAGE_THREADS": "0", "SCALE_IN_COOLDOWN": "0.5", "POLL_INTERVAL": "0.5"}
    return env, cores


@dataclass
class EndToEndPlan:
    images: Path
    expected: Path | None
    throughput_requests: int = 300
    throughput_concurrency: int = 100
    course_requests: int = 100
    course_concurrency: int = 100
    low_load_requests: int = 30
    low_load_warmup: int = 5
    env: dict[str, str] = field(default_factory=dict)
    warm_spares: int | None = None  # None: the stack's own default
    # The model alone again, as (a) measured the limit, once (b) is over and its fleet
    # gone: the machine's speed drifts by tens of percent within minutes here (its
    # other tenants), so (b) is also compared with the model's speed at that time.
    model_probe: Callable[[], InferenceResult] | None = None
    deadline: Deadline | None = None


def _load(plan: EndToEndPlan, url: str, images: Path, requests: int, concurrency: int, phase: str,
          timeout: float = REQUEST_TIMEOUT_S) -> Report:
    """One load run, stopped at the plan's deadline: its report is then cut_short, and each
    request it left unanswered says "the bench's deadline passed during (b)"."""
    config = Config(images=images, url=url, num_requests=requests, concurrency=concurrency,
                    expected=plan.expected, timeout=timeout, quiet=True)
    if plan.deadline is None:
        return run_load(config)
    return run_load(config, stop_at=plan.deadline.at, stop_reason=plan.deadline.during(PHASE_NAMES[phase]))


def started_requests(report: Report) -> list[Outcome]:
    """The requests the run started: an interrupted run's report also holds those it
    never started, which have no start time."""
    return [o for o in report.outcomes if o.started_s is not None]


def _last_response(report: Report) -> float:
    return report.started_at + max((o.started_s + o.latency_s for o in started_requests(report)), default=0.0)


def _summary(report: Report) -> dict[str, object]:
    statuses: dict[str, int] = {}
    for o in report.outcomes:
        key = str(o.status) if o.status is not None else "none"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": report.planned,
        "concurrency": report.concurrency,
        "answered_200": sum(1 for o in report.outcomes if o.status == 200 and o.answered),
        "failed": report.failed,
        "wrong": report.wrong,
        "correct": report.correct,
        "unchecked": report.unchecked,
        "statuses": statuses,
        "untrained": report.untrained,
        "duration_s": report.duration_s,
        "throughput_images_per_s": report.throughput,
        "latency_s": latency_summary(report.latencies),
        "course_average_latency_s": report.course_average_latency,
        "problems": [f"{o.file}: {o.verdict}: {o.error or o.note}" for o in report.outcomes
                     if o.verdict in ("failed", "wrong", "not sent", "abandoned", "not started")][:5],
        # Set: the run was stopped short (the bench's deadline), its figures those of a part of it.
        "cut_short": report.cut_short,
    }


def _moto_stats(path: Path) -> dict[str, dict[str, float]]:
    """What the embedded AWS has served until now, by action.

    The server writes its statistics every STATS_EVERY_S, so the file can be up
    to that old: wait for a write that comes after this call. A stale snapshot
    before run (b) once put the server's first DescribeInstances of its life
    (~1 s of CPU loading EC2's model) into the run's figures.
    """
    asked = time.time()
    deadline = asked + 3 * STATS_EVERY_S
    while time.time() < deadline:
        try:
            if path.stat().st_mtime > asked:
                break
        except OSError:
            pass
        time.sleep(0.05)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def moto_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Requests and server CPU per action between two snapshots, busiest first."""
    rows = {}
    for action, now in after.items():
        then = before.get(action, {"requests": 0, "cpu_s": 0.0})
        requests, cpu = now["requests"] - then["requests"], now["cpu_s"] - then["cpu_s"]
        if requests:
            rows[action] = {"requests": requests, "cpu_s": round(cpu, 3)}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["cpu_s"]))


def _own_cpu_s() -> float:
    """This process's CPU so far: the load test's threads, and the bench's samplers beside them."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def serving_workers_alive(stack: StackProcess) -> int:
    """The stack's worker processes alive that have served an instance: not the spares."""
    serving = stack.serving_worker_pids()
    alive = 0
    for child in stack.descendants():
        try:
            alive += (child.pid in serving and child.status() != psutil.STATUS_ZOMBIE
                      and kind_of(child.cmdline(), is_root=False) == "worker")
        except psutil.Error:
            continue  # ended while being looked at
    return alive


def wait_for_the_last_fleets_workers(count: Callable[[], int], timeout_s: float) -> bool:
    """Wait until no worker that served the last phase is alive: its fleet is
    terminated in EC2 1-2 s before its workers end (the runner's poll, then their warm
    shutdown), and meanwhile they took the next phase's first requests and handed them
    back, which then waited for a new instance's worker (a low-load p99 of 1.4 s).
    Counting all workers against the warm spares missed it when the fleet's workers
    were as many as the spares (2 and 2: a p99 of 1.2-1.3 s). False if they outlive
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while count() > 0:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _settle(plan: EndToEndPlan, stack: StackProcess) -> None:
    """Wait for the last phase's workers to end (up to ZERO_TIMEOUT_S, cut to the plan's deadline)."""
    timeout_s = within(plan.deadline, ZERO_TIMEOUT_S)
    if not wait_for_the_last_fleets_workers(lambda: serving_workers_alive(stack), timeout_s):
        log.warning("the last phase's workers were still running %.0f s after it", timeout_s)


def _scaled_run(plan: EndToEndPlan, stack: StackProcess, images: Path, requests: int,
                concurrency: int, phase: str, memory: bool = False) -> dict[str, object]:
    """One load run from zero instances, with the fleet watched until it is back to zero
    (or the plan's deadline: each wait is cut to it)."""
    poller = FleetPoller(stack.settings()).start()
    sampler: MemorySampler | None = None
    mem = None
    try:
        if poller.wait_for_zero(time.time(), within(plan.deadline, ZERO_TIMEOUT_S)) is None:
            log.warning("the fleet was not at zero before the run")
        _settle(plan, stack)
        moto_before = _moto_stats(stack.run_dir / MOTO_STATS)
        sampler = MemorySampler(stack.process.pid).start() if memory and stack.process else None
        lines_before = len(stack.output)
        poller.fast(until_launch=True)
        own_cpu = _own_cpu_s()
        report = _load(plan, stack.web_url, images, requests, concurrency, phase)
        own_cpu = _own_cpu_s() - own_cpu
        # Poll fast before anything else here: the fleet may reach zero while the
        # memory sampler stops and moto's figures are read, and a slow poll would
        # see it late.
        poller.fast()
        fast_at = time.time()
        mem = sampler.stop() if sampler else None
        last = _last_response(report)
        # moto's CPU is reported per image of the run, so it is read at the last
        # response, not once the fleet is back at zero: that would add the scale-in,
        # the idle workers' polls and this poller's. The server writes its figures
        # every STATS_EVERY_S, so up to that much after the last response counts.
        moto = moto_delta(moto_before, _moto_stats(stack.run_dir / MOTO_STATS))
        zero_wait = within(plan.deadline, ZERO_TIMEOUT_S)
        zero_at = poller.wait_for_zero(last, zero_wait)
    finally:
        poller.stop()
        if sampler is not None and mem is None:
            sampler.stop()  # the run raised: its thread must not sample through the next phase
    out = _summary(report)
    out["scaling"] = scaling_times(poller.samples, report.started_at, last, zero_at,
                                   controller_actions(stack.output[lines_before:]))
    # How late fast polling began: a zero reached before then is seen only then.
    out["scaling"]["fast_polling_after_last_response_s"] = round(fast_at - last, 3)
    out["scaling"]["fleet_poll_errors"] = poller.errors
    out["scaling"]["fleet_samples"] = len(poller.samples)
    out["scaling"]["samples"] = samples_since(poller.samples, report.started_at)
    if zero_at is None and zero_wait < ZERO_TIMEOUT_S and plan.deadline:
        # Not a fleet that stayed up ZERO_TIMEOUT_S (the target's "> 30 s"): the wait was cut.
        out["scaling"]["zero_not_measured"] = plan.deadline.during(
            f"{PHASE_NAMES[phase]}'s wait for zero instances")
    if mem is not None:
        out["memory"] = mem
    # The load generator shares the cores with the stack, so its CPU is part of the budget.
    out["load_test_cpu_s"] = round(own_cpu, 3)
    out["moto_by_action"] = moto
    out["each_request"] = each_request(report)
    return out


def samples_since(samples: list[tuple[float, int]], start: float) -> list[tuple[float, int]]:
    """The fleet's samples as (seconds since `start`, live instances), from the last one
    before it (the fleet the run found): with each request's times, (e) can be checked
    from the JSON. The fast polls while the fleet settled before the run are left out."""
    before = [i for i, (at, _) in enumerate(samples) if at < start]
    kept = samples[before[-1] if before else 0:]
    return [(round(at - start, 3), live) for at, live in kept]


def without_first(report: Report, count: int) -> Report:
    """The report of the same run as if its first `count` requests had not been sent,
    but for those of them that went wrong (unanswered, or answered wrong): a first
    request after idle that times out is the run's failure too. The requests after them
    stay, started or not (a run cut short says how many never ran). Its duration runs
    from the first of those requests' start to the last one's answer."""
    warmup_ok = ("correct", "unchecked")
    kept = [o for o in report.outcomes if o.index >= count or o.verdict not in warmup_ok]
    timed = [o for o in started_requests(report) if o.index >= count]
    if not timed:
        return dataclasses.replace(report, outcomes=kept, planned=len(kept), duration_s=0.0)
    first = min(o.started_s for o in timed)
    last = max(o.started_s + o.latency_s for o in timed)
    return dataclasses.replace(report, outcomes=kept, planned=len(kept), duration_s=last - first,
                               started_at=report.started_at + first)


def _subset(images: Path, count: int, into: Path) -> Path:
    """A folder holding the first `count` images (the load test sends each image of a folder)."""
    into.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.iterdir())[:count]:
        target = into / path.name
        if not target.exists():
            target.symlink_to(path.resolve())
    return into


def _model_now(plan: EndToEndPlan, stack: StackProcess) -> dict[str, object]:
    """The model alone, in a fresh process, with the stack idle (no fleet, no workers)."""
    assert plan.model_probe is not None
    _settle(plan, stack)
    found = plan.model_probe()
    return {"runtime": found.runtime, "threads": found.threads, "batch": found.best_batch,
            "images_per_s": found.best_throughput, "single_image_s": found.single_image_s,
            "single_image_after_pause_s": found.single_image_after_pause_s,
            "core_ms_per_image": found.core_ms_per_image.get(found.best_batch)}


def _low_load(plan: EndToEndPlan, stack: StackProcess) -> dict[str, object]:
    """One request at a time; the first `low_load_warmup` (the fleet's scale-out) not counted,
    unless they went wrong.

    One run, not a warm-up run and then another: the pause between two runs
    can outlast the scale-in cooldown (0.5 s here), and the measured requests
    then waited for a launch (seen once: p99 0.88 s against 0.09 s).
    """
    _settle(plan, stack)
    report = _load(plan, stack.web_url, plan.images, plan.low_load_warmup + plan.low_load_requests, 1,
                   "low_load", timeout=LOW_LOAD_TIMEOUT_S)
    measured = without_first(report, plan.low_load_warmup)
    out = _summary(measured)
    out["warmup_requests"] = plan.low_load_warmup
    out["each_request"] = each_request(measured)
    return out


def each_request(report: Report) -> list[dict[str, object]]:
    """Each request's start (since the run's), latency and error, in the order they
    started: for a p99 one slow request makes, the JSON says which (a run's 1.18 s
    could not be traced to any)."""
    return [{"started_s": round(o.started_s, 4), "latency_s": round(o.latency_s, 4), "error": o.error}
            for o in sorted(started_requests(report), key=lambda o: o.started_s)]


PHASE_NAMES = {"throughput": "(b)", "course": "(d)", "low_load": "(g)"}


def unanswered(phase: str, summary: dict[str, Any]) -> str | None:
    """Why the phases after this one are not run, when its requests say the stack is not
    answering (none, or under half, answered): each of theirs would wait out its
    timeout as well. None for a phase without requests (the model alone)."""
    requests = summary.get("requests") or 0
    if requests <= 0:
        return None
    answered = summary.get("answered_200") or 0
    if answered == 0:
        return f"{PHASE_NAMES.get(phase, phase)} answered none of its {requests} requests"
    if 2 * answered < requests:
        return f"{PHASE_NAMES.get(phase, phase)} answered only {answered} of its {requests} requests"
    return None


def cut_short_reason(summary: dict[str, Any] | None) -> str | None:
    """Why a phase's figures are of part of its requests (the bench's deadline passed
    during it), with the requests it left unanswered; None if it ran to its end."""
    cut = (summary or {}).get("cut_short")
    return f"{cut}: {bad_requests(summary) or 'none left unanswered'}" if cut else None


def _why_not_run(plan: EndToEndPlan, stack: StackProcess) -> str | None:
    """Why no phase is started now: the stack gone, or the bench out of time."""
    exited = stack.process.poll() if stack.process else None
    if exited is not None:
        return f"the stack exited (code {exited})"
    return plan.deadline.passed() if plan.deadline else None


def error_text(exc: BaseException) -> str:
    """An exception as one JSON string: its type and message."""
    return f"{type(exc).__name__}: {exc}"


def run_end_to_end(plan: EndToEndPlan, run_dir: Path) -> dict[str, object]:
    """Start the stack, run the three phases, stop it; the figures of each phase.

    A phase that raises leaves its key out and its error in "errors", and the
    phases after it still run while the stack is up: one failure does not
    throw away the figures already measured. Those after a phase that had under
    half its requests answered, or past the plan's deadline, are not run: each
    is in "errors" with the reason. One under way at the deadline is stopped there
    (its figures, of part of its requests, are kept with "cut_short" set) and is in
    "errors" too.
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    kwargs = {} if plan.warm_spares is None else {"warm_spares": plan.warm_spares}
    env = {STATS_ENV: str(run_dir / MOTO_STATS), **plan.env}
    stack = StackProcess(run_dir, env_overrides=env, **kwargs)
    started = time.monotonic()
    try:
        stack.start(timeout_s=within(plan.deadline, STACK_START_TIMEOUT_S))
    except RuntimeError as exc:
        if plan.deadline and plan.deadline.passed():
            raise DeadlinePassed(f"{plan.deadline.during(STACK_START)}: {exc}") from exc
        raise
    out: dict[str, object] = {"stack_start_s": time.monotonic() - started, "ready_line": stack.ready_line,
                              "env": dict(plan.env), "warm_spares": stack.warm_spares}
    errors: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            scratch = Path(tmp)
            phases = {
                "throughput": lambda: _scaled_run(plan, stack, plan.images, plan.throughput_requests,
                                                  plan.throughput_concurrency, "throughput", memory=True),
                "model_now": lambda: _model_now(plan, stack),
                "course": lambda: _scaled_run(plan, stack,
                                              _subset(plan.images, plan.course_requests, scratch / "course"),
                                              plan.course_requests, plan.course_concurrency, "course"),
                "low_load": lambda: _low_load(plan, stack),
            }
            if plan.model_probe is None:
                del phases["model_now"]
            why_not: str | None = None  # set: this phase and those after it are not run
            for name, phase in phases.items():
                why_not = why_not or _why_not_run(plan, stack)
                if why_not:
                    errors[name] = f"not run: {why_not}"
                    continue
                try:
                    out[name] = phase()
                except Exception as exc:
                    log.exception("end-to-end phase %s failed", name)
                    errors[name] = error_text(exc)
                    continue
                cut = cut_short_reason(out[name])
                if cut:
                    # Its figures are of part of its requests: the phase failed. The phases
                    # after it are not run for the deadline, not for the requests it left.
                    errors[name] = cut
                    continue
                why_not = unanswered(name, out[name])
    finally:
        try:
            out["stack_stop_s"] = stack.stop()
        except Exception as exc:
            log.exception("stopping the stack failed")
            errors["stop"] = error_text(exc)
        out["stack_log_tail"] = [line.rstrip() for line in stack.output[-15:]]
        if errors:
            out["errors"] = errors
    return out
