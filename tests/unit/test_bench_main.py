"""`python -m bench` as a whole: what it keeps, prints and returns when a part fails (no stack started)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench.__main__ as bench_main
from bench import endtoend, inference, printed, report
from bench.deadline import Deadline
from bench.inference import BATCH_SIZES, InferenceResult


def _result(runtime: str, threads: int, images_per_s: float) -> InferenceResult:
    return InferenceResult(runtime=runtime, threads=threads, startup_s=1.0, load_s=0.5, single_image_s=0.04,
                           single_image_after_pause_s=0.05, prepare_s=0.001,
                           throughput=dict.fromkeys(BATCH_SIZES, images_per_s), peak_rss_mb=500.0,
                           labels={"img-0": "tabby"})


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> dict[str, Exception]:
    """The model-alone measurements without a subprocess; a runtime in the dict raises its exception."""
    broken: dict[str, Exception] = {}

    def measure(runtime: str, threads: int, images: Path, **_) -> InferenceResult:
        if runtime in broken:
            raise broken[runtime]
        return _result(runtime, threads, 25.0 if threads == 0 else 11.0)

    monkeypatch.setattr(inference, "measure", measure)
    monkeypatch.setattr(bench_main, "measure", measure)
    monkeypatch.setattr(bench_main, "prepare_model", lambda: None)
    return broken


class _Meter:
    @classmethod
    def start(cls) -> _Meter:
        return cls()

    def stop(self) -> dict[str, float]:
        return {"wall_s": 1.0, "bench_cores": 1.0, "others_cores": 0.0, "loadavg_1m_start": 0.0,
                "loadavg_1m_end": 0.0}


@pytest.fixture
def bench_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(bench_main, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(bench_main, "write_images", lambda folder, count: [])
    monkeypatch.setattr(bench_main, "write_expected", lambda path, labels: path)
    monkeypatch.setattr(bench_main, "NoiseMeter", _Meter)
    return tmp_path


def _previous(path: Path) -> None:
    """A JSON of an earlier run, every part in it."""
    path.write_text(json.dumps({"generated_at": "2026-01-01T00:00:00+00:00",
                                "inference": {"old": True}, "end_to_end": {"old": True},
                                "sqs": {"old": True}, "expected_labels": {}, "noise": {}}))


def test_a_failed_part_keeps_and_prints_the_others_and_fails_the_command(
        fake_model, bench_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    out = bench_dir / "latest.json"
    _previous(out)

    def broken_e2e(*args, **kwargs):
        raise RuntimeError("the stack did not start")

    monkeypatch.setattr(bench_main, "run_e2e", broken_e2e)

    code = bench_main.main(["--only", "inference", "--only", "e2e", "--json", str(out)])

    assert code != 0
    printed = capsys.readouterr().out
    assert "(a) Model alone" in printed  # the figures measured before the failure
    assert "the stack did not start" in printed
    doc = json.loads(out.read_text())
    assert doc["inference"]["local_limit"]["images_per_s"] == 25.0
    # The old end-to-end figures are not passed off as this run's.
    assert doc["end_to_end"] is None
    parts = doc["parts"]
    assert parts["inference"]["source"] == "this run" and parts["inference"]["error"] is None
    assert parts["inference"]["measured_at"]
    assert parts["e2e"]["source"] == "this run" and "the stack did not start" in parts["e2e"]["error"]
    assert parts["sqs"]["source"] == "previous run" and doc["sqs"] == {"old": True}
    names = {t["name"]: t for t in doc["targets"]}
    course = names["course average latency, 100 requests at concurrency 100"]
    assert course["verdict"] == "N/A" and "e2e" in course["reason"]


def test_a_run_without_failures_exits_zero(fake_model, bench_dir: Path):
    out = bench_dir / "latest.json"
    assert bench_main.main(["--only", "inference", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["parts"]["inference"]["source"] == "this run"
    assert doc["parts"]["e2e"]["source"] == "not measured" and doc["end_to_end"] is None


def test_a_measures_two_one_thread_processes_at_once_beside_the_limit(
        fake_model, bench_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Informative: the stack's workers run their batches on one thread each, and two such
    processes got more of 2 cores than (a)'s one process on both."""
    together = threading.Barrier(2, timeout=30)  # both measured at once, or this breaks
    asked: list[tuple] = []

    starts: list[float | None] = []

    def measure(runtime: str, threads: int, images: Path, **kwargs) -> InferenceResult:
        asked.append((runtime, threads, kwargs.get("batch_sizes")))
        starts.append(kwargs.get("start_at"))
        if kwargs.get("batch_sizes") == (8,):
            together.wait()
            return _result(runtime, threads, 14.0 if threading.current_thread().name.endswith("0") else 13.0)
        found = _result(runtime, threads, 25.0 if threads == 0 else 11.0)
        found.throughput[4 if threads == 0 else 8] += 1.0  # all cores do best at 4, one thread at 8
        return found

    monkeypatch.setattr(bench_main, "measure", measure)
    out = bench_dir / "latest.json"
    assert bench_main.main(["--only", "inference", "--json", str(out), "--skip-tensorflow"]) == 0
    doc = json.loads(out.read_text())
    pair = doc["inference"]["side_by_side"]
    assert asked.count(("openvino", 1, (8,))) == 2  # at the one-thread row's best batch
    # One window for both, some seconds ahead: their figures add up.
    pair_starts = [at for at, (_, _, sizes) in zip(starts, asked, strict=True) if sizes == (8,)]
    assert pair_starts[0] == pair_starts[1] and pair_starts[0] > time.time() - 60
    assert (pair["processes"], pair["threads"], pair["batch"], pair["images_per_s"]) == (2, 1, 8, 27.0)
    assert sorted(pair["each_images_per_s"]) == [13.0, 14.0]
    assert "2 one-thread processes side by side, batch 8: 27.0 images/s together" in capsys.readouterr().out


def test_tensorflow_failing_keeps_openvino(fake_model, bench_dir: Path, capsys: pytest.CaptureFixture):
    fake_model["tensorflow"] = RuntimeError("tensorflow measurement failed (1)")
    out = bench_dir / "latest.json"

    code = bench_main.main(["--only", "inference", "--json", str(out)])

    assert code != 0  # a measurement failed: say so, even an informative one
    doc = json.loads(out.read_text())
    assert set(doc["inference"]["runs"]) == {"openvino/threads=0", "openvino/threads=1"}
    assert "tensorflow measurement failed" in doc["inference"]["errors"]["tensorflow/threads=0"]
    assert "tensorflow" in doc["parts"]["inference"]["error"]
    assert doc["inference"]["local_limit"]["images_per_s"] == 25.0
    assert "tensorflow measurement failed" in capsys.readouterr().out


class _IdleStack:
    """A stack that starts, stays up and stops, for run_end_to_end's phases (faked)."""

    def __init__(self, run_dir, env_overrides, **kwargs) -> None:
        self.ready_line, self.warm_spares, self.output = "ready", 1, ["line"]
        self.process = SimpleNamespace(poll=lambda: None)

    def start(self, timeout_s: float = 120.0) -> _IdleStack:
        return self

    def stop(self) -> float:
        return 0.1


def test_a_failed_phase_keeps_the_phases_before_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def scaled_run(plan, stack, images, requests, concurrency, phase, memory=False):
        if not memory:
            raise TimeoutError("course: the web tier stopped answering")
        return {"requests": requests, "answered_200": requests, "failed": 0}

    ran: list[str] = []
    monkeypatch.setattr(endtoend, "StackProcess", _IdleStack)
    monkeypatch.setattr(endtoend, "_scaled_run", scaled_run)
    monkeypatch.setattr(endtoend, "_low_load", lambda plan, stack: ran.append("low") or {"requests": 30})
    images = tmp_path / "images"
    images.mkdir()

    out = endtoend.run_end_to_end(endtoend.EndToEndPlan(images=images, expected=None), tmp_path / "run")

    assert out["throughput"] == {"requests": 300, "answered_200": 300, "failed": 0}
    assert "course" not in out and "stopped answering" in out["errors"]["course"]
    assert out["low_load"] == {"requests": 30} and ran == ["low"]  # the stack still up: the next phase ran
    assert out["stack_stop_s"] == 0.1


@pytest.mark.parametrize(("answered", "why"), [(0, "(b) answered none of its 300 requests"),
                                               (149, "(b) answered only 149 of its 300 requests"),
                                               (150, None)])
def test_a_phase_the_stack_hardly_answered_ends_the_phases(answered: int, why: str | None,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A stack whose workers never answer would still run every phase, each request
    waiting out its timeout: over an hour in all."""
    ran: list[str] = []

    def scaled_run(plan, stack, images, requests, concurrency, phase, memory=False):
        ran.append("throughput" if memory else "course")
        return {"requests": requests, "answered_200": answered if memory else requests,
                "failed": requests - answered if memory else 0}

    monkeypatch.setattr(endtoend, "StackProcess", _IdleStack)
    monkeypatch.setattr(endtoend, "_scaled_run", scaled_run)
    monkeypatch.setattr(endtoend, "_settle", lambda stack, timeout_s=None: None)
    monkeypatch.setattr(endtoend, "_low_load", lambda plan, stack: ran.append("low") or {"requests": 30})
    probe = lambda: ran.append("model") or _result("openvino", 0, 16.0)  # noqa: E731
    images = tmp_path / "images"
    images.mkdir()

    out = endtoend.run_end_to_end(endtoend.EndToEndPlan(images=images, expected=None, model_probe=probe),
                                  tmp_path / "run")

    assert out["stack_stop_s"] == 0.1
    if why is None:  # half answered: on with the next
        assert ran == ["throughput", "model", "course", "low"] and "errors" not in out
        return
    assert ran == ["throughput"]
    assert out["errors"] == dict.fromkeys(("model_now", "course", "low_load"), f"not run: {why}")
    figures = {"inference": {"local_limit": {"images_per_s": 20.0}, "single_image_s": 0.04},
               "expected_labels": {}, "sqs": None, "noise": {}, "end_to_end": out,
               "parts": {part: {"source": "this run", "measured_at": "now", "error": None}
                         for part in bench_main.PARTS}}
    targets = {t["name"]: t for t in bench_main._document(figures, 0.0)["targets"]}
    course = targets["course average latency, 100 requests at concurrency 100"]
    assert course["verdict"] == "N/A" and course["reason"] == f"e2e course failed: not run: {why}"


def test_no_phase_starts_past_the_deadline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    ran: list[str] = []

    def scaled_run(plan, stack, images, requests, concurrency, phase, memory=False):
        ran.append("throughput" if memory else "course")
        plan.deadline.started -= 3600  # the phase took an hour
        return {"requests": requests, "answered_200": requests, "failed": 0}

    monkeypatch.setattr(endtoend, "StackProcess", _IdleStack)
    monkeypatch.setattr(endtoend, "_scaled_run", scaled_run)
    monkeypatch.setattr(endtoend, "_low_load", lambda plan, stack: ran.append("low") or {"requests": 30})
    images = tmp_path / "images"
    images.mkdir()
    plan = endtoend.EndToEndPlan(images=images, expected=None, deadline=Deadline())

    out = endtoend.run_end_to_end(plan, tmp_path / "run")

    assert ran == ["throughput"] and out["stack_stop_s"] == 0.1
    why = "not run: the bench's deadline passed (9 min from its start)"
    assert out["errors"] == {"course": why, "low_load": why}


def test_past_the_deadline_the_bench_starts_no_part_and_says_why(
        fake_model, bench_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """(a)'s own timeouts alone allow 17 minutes, and a broken stack's over an hour:
    the bench must end within 10."""
    deadlines: list[Deadline] = []

    class Recorded(Deadline):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            deadlines.append(self)

    def measure(runtime: str, threads: int, images: Path, **_) -> InferenceResult:
        deadlines[0].started -= 3600  # the first measurement took an hour
        return _result(runtime, threads, 25.0)

    started: list[str] = []
    monkeypatch.setattr(bench_main, "Deadline", Recorded)
    monkeypatch.setattr(bench_main, "measure", measure)
    monkeypatch.setattr(bench_main, "run_e2e", lambda *args, **kwargs: started.append("e2e"))
    monkeypatch.setattr(bench_main, "run_sqs", lambda *args, **kwargs: started.append("sqs"))
    out = bench_dir / "latest.json"
    _previous(out)

    code = bench_main.main(["--json", str(out)])

    assert code == 1 and started == []
    why = "not run: the bench's deadline passed (9 min from its start)"
    doc = json.loads(out.read_text())
    assert doc["inference"]["local_limit"]["images_per_s"] == 25.0
    assert doc["inference"]["errors"] == {"openvino/threads=1": why, "tensorflow/threads=0": why,
                                          bench_main.SIDE_BY_SIDE: why}
    assert doc["end_to_end"] is None and doc["sqs"] is None  # not the previous run's either
    assert doc["parts"]["e2e"]["error"] == why and doc["parts"]["sqs"]["error"] == why
    assert set(doc["noise"]) == {"inference"}
    course = {t["name"]: t for t in doc["targets"]}["course average latency, 100 requests at concurrency 100"]
    assert course["verdict"] == "N/A" and course["reason"] == f"e2e failed: {why}"
    assert f"e2e: FAILED, {why}" in capsys.readouterr().out


def test_a_phase_the_deadline_stopped_fails_and_its_targets_say_why_never_pass(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A phase under way at the deadline is stopped there (bench.endtoend._load): what it
    measured is of part of its requests, and must not pass a target as if it were whole."""
    why = "the bench's deadline passed during (b) (9 min from its start)"
    ran: list[str] = []

    def scaled_run(plan, stack, images, requests, concurrency, phase, memory=False):
        ran.append(phase)
        plan.deadline.started -= 3600  # the deadline passed during it
        # 250 answered fast before it, the other 50 left unanswered by the load test.
        return {**_run(), "requests": 300, "answered_200": 250, "unchecked": 250,
                "throughput_images_per_s": 30.0, "cut_short": why,
                "scaling": {"last_response_to_zero_s": None, "peak_instances": 2,
                            "zero_not_measured": "the bench's deadline passed during (b)'s wait for zero"}}

    monkeypatch.setattr(endtoend, "StackProcess", _IdleStack)
    monkeypatch.setattr(endtoend, "_scaled_run", scaled_run)
    monkeypatch.setattr(endtoend, "_low_load", lambda plan, stack: ran.append("low") or {"requests": 30})
    probe = lambda: ran.append("model") or _result("openvino", 0, 16.0)  # noqa: E731
    images = tmp_path / "images"
    images.mkdir()
    plan = endtoend.EndToEndPlan(images=images, expected=None, model_probe=probe,
                                 deadline=Deadline())

    out = endtoend.run_end_to_end(plan, tmp_path / "run")

    assert ran == ["throughput"] and out["stack_stop_s"] == 0.1
    later = "not run: the bench's deadline passed (9 min from its start)"
    assert out["errors"] == {"throughput": f"{why}: 50 failed", "model_now": later, "course": later,
                             "low_load": later}
    figures = {"inference": {"local_limit": {"images_per_s": 20.0}, "single_image_s": 0.04},
               "expected_labels": {}, "sqs": None, "noise": {}, "end_to_end": out,
               "parts": {part: {"source": "this run", "measured_at": "now", "error": None}
                         for part in bench_main.PARTS}}
    doc = bench_main._document(figures, 0.0)
    shown = {t["name"]: report.Target.from_dict(t).shown for t in doc["targets"]}
    # 30 images/s against a limit of 20 would be a PASS, on the 250 answered before the deadline.
    assert shown["end-to-end throughput / in-process limit"] == f"FAIL ({why}: 50 failed)"
    # Not "> 30 s": the fleet was not waited for.
    assert shown["last response -> zero instances"] == f"FAIL ({why}: 50 failed)"
    course = shown["course average latency, 100 requests at concurrency 100"]
    assert course == f"N/A (e2e course failed: {later})"
    out["throughput"]["latency_s"] = dict.fromkeys(("p50", "p90", "p99", "max"), 0.5)
    assert f"throughput: FAILED, {why}: 50 failed" in printed.e2e_table(out)


def test_a_model_measurement_under_way_at_the_deadline_is_stopped_then(
        fake_model, bench_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Each measurement's own timeout (4 min) let one started just before the deadline
    run past the tenth minute."""
    deadlines: list[Deadline] = []

    class Recorded(Deadline):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            deadlines.append(self)

    given: list[tuple[str, int, float]] = []

    def measure(runtime: str, threads: int, images: Path, *, timeout_s: float, **_) -> InferenceResult:
        given.append((runtime, threads, timeout_s))
        deadline = deadlines[0]
        if threads == 0 and runtime == "openvino":
            deadline.started -= deadline.seconds - 60  # a minute left once the limit is measured
            return _result(runtime, threads, 25.0)
        deadline.started -= 3600  # the time given ran out: its process killed
        raise subprocess.TimeoutExpired(["python", "-m", "bench.inference"], timeout_s)

    monkeypatch.setattr(bench_main, "Deadline", Recorded)
    monkeypatch.setattr(bench_main, "measure", measure)
    out = bench_dir / "latest.json"

    code = bench_main.main(["--only", "inference", "--json", str(out)])

    assert code == 1
    assert [(runtime, threads) for runtime, threads, _ in given] == [("openvino", 0), ("openvino", 1)]
    assert given[0][2] == inference.MEASURE_TIMEOUT_S and 0 < given[1][2] <= 60
    doc = json.loads(out.read_text())
    assert doc["inference"]["errors"] == {
        "openvino/threads=1": "DeadlinePassed: the bench's deadline passed during (a) openvino/threads=1 "
                              "(9 min from its start)",
        "tensorflow/threads=0": "not run: the bench's deadline passed (9 min from its start)",
        bench_main.SIDE_BY_SIDE: "not run: the bench's deadline passed (9 min from its start)"}


def _run(failed: int = 0, wrong: int = 0, zero_s: float | None = 1.0) -> dict:
    """A phase's summary as endtoend._summary writes it, 100 requests."""
    return {"requests": 100, "answered_200": 100 - failed, "failed": failed, "wrong": wrong,
            "correct": 0, "unchecked": 100 - failed - wrong, "throughput_images_per_s": 20.0,
            "duration_s": 1.0, "course_average_latency_s": 0.01, "latency_s": {"p50": 0.08},
            "scaling": {"last_response_to_zero_s": zero_s}}


def test_targets_see_failed_requests_and_a_fleet_never_at_zero():
    inference_figures = {"local_limit": {"images_per_s": 20.0}, "single_image_s": 0.04}
    figures = {"inference": inference_figures, "expected_labels": {}, "sqs": None, "noise": {},
               "end_to_end": {"throughput": _run(zero_s=None), "course": _run(failed=90),
                              "low_load": _run(wrong=1)},
               "parts": {part: {"source": "this run", "measured_at": "now", "error": None}
                         for part in bench_main.PARTS}}

    doc = bench_main._document(figures, 0.0)

    shown = [report_target.shown for report_target in map(report.Target.from_dict, doc["targets"])]
    # The fleet's time to zero after (d)'s 90 failures is not that after its work.
    assert shown == ["PASS", "FAIL (90 failed)", "FAIL (90 failed in (d))", "FAIL (1 wrong)"]
    figures["end_to_end"]["course"] = _run()
    doc = bench_main._document(figures, 0.0)
    assert report.Target.from_dict(doc["targets"][2]).shown == "FAIL (> 30 s)"


def _zero_target(figures: dict) -> report.Target:
    targets = {t["name"]: t for t in bench_main._document(figures, 0.0)["targets"]}
    return report.Target.from_dict(targets["last response -> zero instances"])


def test_the_zero_target_needs_instances_launched_and_requests_answered():
    """A fleet must be seen to launch: a run that never left zero, or whose requests
    failed, would pass "last response -> zero" at once."""
    figures = figures_with_the_model_twice(8, 20.0, 0.04, {"images_per_s": 15.0, "single_image_s": 0.04,
                                                           "single_image_after_pause_s": 0.05})
    e2e = figures["end_to_end"]
    for phase in ("throughput", "course"):
        e2e[phase]["scaling"] = {"last_response_to_zero_s": 1.2, "peak_instances": 2}
    assert _zero_target(figures).shown == "PASS"

    e2e["course"]["scaling"] = {"last_response_to_zero_s": 0.05, "peak_instances": 0}
    zero = _zero_target(figures)
    assert zero.shown == "N/A (no instance launched in (d))" and zero.measured is None

    e2e["course"]["scaling"]["peak_instances"] = 2
    e2e["throughput"].update(failed=3, answered_200=97, unchecked=97)
    assert _zero_target(figures).shown == "FAIL (3 failed in (b))"
    e2e["course"].update(wrong=1, unchecked=99)
    # Both phases' are named: the first's alone had hidden the second's.
    assert _zero_target(figures).shown == "FAIL (3 failed in (b); 1 wrong in (d))"
    e2e["throughput"].update(failed=0, answered_200=100, unchecked=100)
    assert _zero_target(figures).shown == "FAIL (1 wrong in (d))"


def test_a_phase_whose_fleet_never_reached_zero_fails_the_zero_target_whatever_the_other_did():
    """(b) launching nothing must not make the target N/A ("no instance launched in (b)")
    where (d)'s fleet is still up 30 s after its last answer: that is a miss."""
    figures = figures_with_the_model_twice(8, 20.0, 0.04, {"images_per_s": 15.0, "single_image_s": 0.04,
                                                           "single_image_after_pause_s": 0.05})
    e2e = figures["end_to_end"]
    e2e["throughput"]["scaling"] = {"last_response_to_zero_s": 0.05, "peak_instances": 0}
    e2e["course"]["scaling"] = {"last_response_to_zero_s": None, "peak_instances": 2}
    assert _zero_target(figures).shown == "FAIL (> 30 s)"
    e2e["throughput"]["scaling"], e2e["course"]["scaling"] = e2e["course"]["scaling"], \
        e2e["throughput"]["scaling"]
    assert _zero_target(figures).shown == "FAIL (> 30 s)"


def _git(folder: Path, *args: str) -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_code_version_is_the_commit_and_whether_the_tree_differs(tmp_path: Path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert bench_main.code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "notes.txt").write_text("untracked: changes no figure\n")
    assert bench_main.code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bench_main.code_version(tmp_path) == {"commit": head, "dirty": True}


def test_code_version_without_git_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert bench_main.code_version(tmp_path) == {"commit": None, "dirty": None}  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert bench_main.code_version(tmp_path) == {"commit": None, "dirty": None}


def test_the_json_says_which_code_measured_each_part(fake_model, bench_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    out = bench_dir / "latest.json"
    _previous(out)
    version = {"commit": "abc123", "dirty": True}
    monkeypatch.setattr(bench_main, "code_version", lambda root=None: version)

    bench_main.main(["--only", "inference", "--json", str(out)])

    doc = json.loads(out.read_text())
    assert doc["code"] == version
    assert doc["parts"]["inference"]["code"] == version and doc["parts"]["inference"]["measured_at"]
    assert "code" not in doc["parts"]["sqs"]  # the previous JSON did not say which code measured it


def test_the_model_is_measured_again_after_the_throughput_run(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path):
    """The machine's speed drifts by tens of percent within minutes: (c) also compares
    (b) with the model measured right after it, with the stack idle."""
    ran: list[str] = []

    def scaled_run(plan, stack, images, requests, concurrency, phase, memory=False):
        ran.append("throughput" if memory else "course")
        return {"requests": requests, "answered_200": requests, "failed": 0}

    def probe() -> InferenceResult:
        ran.append("model")
        return _result("openvino", 0, 16.0)

    monkeypatch.setattr(endtoend, "StackProcess", _IdleStack)
    monkeypatch.setattr(endtoend, "_scaled_run", scaled_run)
    monkeypatch.setattr(endtoend, "_settle", lambda stack, timeout_s=None: ran.append("settle"))
    monkeypatch.setattr(endtoend, "_low_load", lambda plan, stack: ran.append("low") or {"requests": 30})
    images = tmp_path / "images"
    images.mkdir()

    out = endtoend.run_end_to_end(endtoend.EndToEndPlan(images=images, expected=None, model_probe=probe),
                                  tmp_path / "run")

    assert ran == ["throughput", "settle", "model", "course", "low"]  # its workers gone first
    assert out["model_now"]["images_per_s"] == 16.0 and out["model_now"]["single_image_s"] == 0.04
    ran.clear()
    out = endtoend.run_end_to_end(endtoend.EndToEndPlan(images=images, expected=None), tmp_path / "run")
    assert ran == ["throughput", "course", "low"] and "model_now" not in out and "errors" not in out


def figures_with_the_model_twice(batch: int, limit: float, single_s: float, now: dict) -> dict:
    """A run's figures: (b) at 12 images/s, the model at `limit` images/s and `single_s`
    in (a), then as `now` says ("images_per_s", "single_image_s"...) just after (b)."""
    return {"inference": {"local_limit": {"images_per_s": limit, "runtime": "openvino", "threads": 0,
                                          "batch": batch},
                          "single_image_s": single_s, "runs": {}},
            "expected_labels": {}, "sqs": None, "noise": {},
            "end_to_end": {"throughput": {**_run(), "throughput_images_per_s": 12.0}, "course": _run(),
                           "low_load": _run(),
                           "model_now": {"runtime": "openvino", "threads": 0, "batch": batch, **now}},
            "parts": {part: {"source": "this run", "measured_at": "now", "error": None}
                      for part in bench_main.PARTS}}


def test_c_is_also_given_against_the_model_measured_just_after_b():
    figures = figures_with_the_model_twice(8, 20.0, 0.04, {
        "images_per_s": 15.0, "single_image_s": 0.061, "single_image_after_pause_s": 0.07})

    doc = bench_main._document(figures, 0.0)

    assert doc["ratio_e2e_to_limit"] == pytest.approx(0.6)  # against (a)
    assert doc["ratio_e2e_to_limit_now"] == pytest.approx(0.8)
    now = figures["end_to_end"]["model_now"]
    assert "15.0 images/s at batch 8 (75 % of its speed in (a)); (b) was 80 % of that" in \
        printed.model_now_line(now, 20.0, doc["ratio_e2e_to_limit_now"])
    assert "single image just after (b): 61 ms back-to-back, 70 ms after the pause" in \
        printed.model_now_single_line(now)


def test_the_targets_are_judged_against_the_faster_of_the_two_model_measurements():
    """An (a) slowed by others' work can make (c) read 59 % where the model measured
    again gives 50 %: the target takes the harder of the two, as the low-load one."""
    figures = figures_with_the_model_twice(1, 20.0, 0.05, {
        "images_per_s": 24.0, "single_image_s": 0.03, "single_image_after_pause_s": 0.04})

    doc = bench_main._document(figures, 0.0)

    assert doc["ratio_e2e_to_limit"] == pytest.approx(0.6)  # against (a), as printed beside it
    assert doc["ratio_e2e_judged"] == pytest.approx(0.5)
    targets = {t["name"]: t for t in doc["targets"]}
    assert targets["end-to-end throughput / in-process limit"]["measured"] == pytest.approx(0.5)
    # Low-load p50 80 ms: 50 over the 30 ms measured after (b), not 30 over (a)'s 50 ms.
    assert targets["low-load p50 minus model single-image time"]["measured"] == pytest.approx(0.05)


def test_g_does_not_call_as_time_the_targets_when_the_target_took_the_other(capsys: pytest.CaptureFixture):
    """(g) must not label (a)'s single-image time "the target's" where the target took
    the shorter one measured just after (b)."""
    figures = figures_with_the_model_twice(1, 20.0, 0.05, {
        "images_per_s": 24.0, "single_image_s": 0.03, "single_image_after_pause_s": 0.04})
    for phase in ("throughput", "course", "low_load"):
        figures["end_to_end"][phase]["latency_s"] = dict.fromkeys(("p50", "p90", "p99", "max"), 0.08)
        figures["end_to_end"][phase]["scaling"] = {
            "first_request_to_first_launch_s": 0.3, "controller_launch_logged_after_s": 0.3,
            "last_response_to_zero_s": 0.7, "controller_terminate_logged_after_s": 0.6, "peak_instances": 2}

    printed.print_figures(bench_main._document(figures, 0.0))

    lines = capsys.readouterr().out.splitlines()
    low_load = next(line for line in lines if line.startswith("(g) low-load"))
    assert "50 ms back-to-back in (a)" in low_load and "the target's" not in low_load
    assert any("the low-load one against the shorter single-image time: 30 ms" in line for line in lines)


def test_targets_judged_against_a_alone_say_the_second_measurement_failed():
    """The model measured again after (b) failing, the targets fall back on (a) alone,
    and say so."""
    figures = figures_with_the_model_twice(8, 20.0, 0.04, {})
    e2e = figures["end_to_end"]
    del e2e["model_now"]
    e2e["errors"] = {"model_now": "RuntimeError: openvino measurement failed (1)"}

    targets = {t["name"]: report.Target.from_dict(t) for t in bench_main._document(figures, 0.0)["targets"]}

    why = "against (a) alone: e2e model_now failed: RuntimeError: openvino measurement failed (1)"
    ratio = targets["end-to-end throughput / in-process limit"]
    assert ratio.measured == pytest.approx(0.6) and ratio.shown == f"FAIL ({why})"
    low_load = targets["low-load p50 minus model single-image time"]
    assert low_load.measured == pytest.approx(0.04) and low_load.shown == f"PASS ({why})"
    # Both measurements there: no word.
    figures = figures_with_the_model_twice(8, 20.0, 0.04, {"images_per_s": 15.0, "single_image_s": 0.04})
    assert [t["reason"] for t in bench_main._document(figures, 0.0)["targets"]] == [None] * 4


def test_the_budget_takes_the_models_cpu_per_image_measured_in_a():
    figures = figures_with_the_model_twice(8, 20.0, 0.04, {
        "images_per_s": 15.0, "single_image_s": 0.061, "single_image_after_pause_s": 0.07})
    figures["inference"]["local_limit"]["core_ms_per_image"] = 50.0
    # 100 images, 10 s of CPU in all: 100 core-ms per image.
    figures["end_to_end"]["throughput"].update(
        memory={"by_kind": {"worker": {"cpu_s": 8.0}, "moto": {"cpu_s": 1.5}}}, load_test_cpu_s=0.5)

    budget = bench_main._document(figures, 0.0)["cpu_budget"]

    assert budget["model_core_ms_measured"] is True and budget["model_core_ms_per_image"] == 50.0
    assert budget["total_core_ms_per_image"] == pytest.approx(100.0)
    assert budget["ceiling_over_limit"] == pytest.approx(0.5)
    assert budget["ceiling_images_per_s"] == pytest.approx(10.0)

    del figures["inference"]["local_limit"]["core_ms_per_image"]  # an older JSON's (a)
    assert bench_main._document(figures, 0.0)["cpu_budget"]["model_core_ms_measured"] is False


def test_the_limit_and_the_model_measured_again_keep_their_cpu_per_image(
        fake_model, bench_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def measure(runtime: str, threads: int, images: Path, **_) -> InferenceResult:
        found = _result(runtime, threads, 25.0)
        found.core_ms_per_image = dict.fromkeys(BATCH_SIZES, 70.0) | {found.best_batch: 60.0}
        return found

    monkeypatch.setattr(bench_main, "measure", measure)
    limit = bench_main.run_inference(tmp_path, skip_tf=True)[0]["local_limit"]
    assert limit["core_ms_per_image"] == 60.0  # at the limit's batch size

    monkeypatch.setattr(endtoend, "_settle", lambda stack, timeout_s=None: None)
    plan = endtoend.EndToEndPlan(images=tmp_path, expected=None,
                                 model_probe=lambda: measure("openvino", 0, tmp_path))
    assert endtoend._model_now(plan, None)["core_ms_per_image"] == 60.0


def test_the_e2e_part_measures_the_model_at_the_limits_settings(fake_model, bench_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    asked: list[tuple] = []

    def measure(runtime, threads, images, **kwargs) -> InferenceResult:
        asked.append((runtime, threads, kwargs.get("batch_sizes")))
        return _result(runtime, threads, 25.0)

    def run_end_to_end(plan, run_dir):
        plan.model_probe()
        return {"throughput": _run()}

    monkeypatch.setattr(bench_main, "measure", measure)
    monkeypatch.setattr(bench_main, "run_end_to_end", run_end_to_end)
    monkeypatch.setattr(printed, "print_figures", lambda doc: None)
    out = bench_dir / "latest.json"
    out.write_text(json.dumps({"inference": {"local_limit": {"runtime": "openvino", "threads": 0, "batch": 8,
                                                              "images_per_s": 20.0}}}))

    bench_main.main(["--only", "e2e", "--json", str(out)])

    assert asked == [("openvino", 0, (8,))]


def test_a_measurement_can_be_asked_for_some_batch_sizes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    ran: list[list[str]] = []

    def run(argv, **kwargs):
        ran.append(argv)
        result = _result("openvino", 0, 20.0)
        raw = {**result.__dict__, "throughput": {"8": 20.0}}
        return SimpleNamespace(returncode=0, stdout=json.dumps(raw), stderr="")

    monkeypatch.setattr(inference.subprocess, "run", run)
    found = inference.measure("openvino", 0, tmp_path, batch_sizes=(8,))
    assert found.throughput == {8: 20.0} and ran[0][ran[0].index("--batches") + 1] == "8"
    inference.measure("openvino", 0, tmp_path)
    assert ran[1][ran[1].index("--batches") + 1] == ",".join(map(str, BATCH_SIZES))
    with pytest.raises(SystemExit):
        inference.main(["--runtime", "openvino", "--images", str(tmp_path), "--t0", "0", "--batches", "0"])


@pytest.mark.parametrize("argv", [["--env", "FOO"], ["--env", "=1"], ["--warm-spares", "-1"],
                                  ["--warm-spares", "16"]])
def test_bad_options_are_usage_errors_before_anything_is_measured(argv, capsys: pytest.CaptureFixture):
    """A wrong --env must be found at the start, not when the end-to-end part starts,
    minutes in, losing the figures measured before it; --warm-spares -1 is refused."""
    with pytest.raises(SystemExit) as stopped:
        bench_main.parse_args(argv)
    assert stopped.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert bench_main.parse_args(["--env", "A=b=c", "--warm-spares", "0"]).env == {"A": "b=c"}


def test_a_phase_the_deadline_stopped_with_none_left_unanswered_says_so():
    """Cut between two requests (one at a time), nothing is unanswered: its reason must
    not read "...: None"."""
    run = {"cut_short": "the bench's deadline passed during (g)", "requests": 3, "correct": 3}
    assert bench_main._cut_short({"low_load": run}, ("low_load",)) == \
        "the bench's deadline passed during (g): none left unanswered"
