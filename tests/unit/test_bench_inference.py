"""Part (a)'s child: the CPU the model costs per image, beside its throughput (no model loaded)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import inference


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_cpu_of_timed_calls_counts_every_thread_of_the_process():
    """OpenVINO computes in threads of its own: the calling thread's clock would miss them."""

    def model(batch: object) -> None:
        worker = threading.Thread(target=_spin, args=(0.1,))
        worker.start()
        worker.join()

    calls, elapsed, cpu_s = inference._timed_calls(model, None, min_seconds=0.0, min_calls=2)

    assert calls == 2 and elapsed > 0
    # At least the 0.2 s the other threads spun (the calling thread's clock would say ~0);
    # no upper bound: anything else running in this process adds to it.
    assert cpu_s >= 0.19


def test_the_core_ms_per_image_are_those_of_the_round_whose_throughput_is_kept(
        monkeypatch: pytest.MonkeyPatch):
    # (calls, wall s, CPU s) by round, for batch 8: round 1 is faster and costlier per image.
    timed = iter([(10, 1.0, 1.6), (8, 1.0, 1.0)])
    monkeypatch.setattr(inference, "_timed_calls", lambda fn, batch, seconds: next(timed))
    rounds: list[int] = []

    throughput, core_ms = inference.throughput_rounds(lambda batch: None, {8: "batch"}, 2.0,
                                                      between=lambda: rounds.append(1))

    assert throughput == {8: pytest.approx(80.0)}
    assert core_ms == {8: pytest.approx(20.0)}  # 1.6 s over 80 images, not round 2's 15.6
    assert rounds == [1, 1]


def test_the_core_ms_per_image_reach_the_parent_by_batch_size(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path):
    child = {"runtime": "openvino", "threads": 0, "startup_s": 1.0, "load_s": 0.5, "single_image_s": 0.02,
             "single_image_after_pause_s": 0.03, "prepare_s": 0.002, "throughput": {"8": 50.0},
             "peak_rss_mb": 500.0, "labels": {}, "scores": {}, "core_ms_per_image": {"8": 36.5}}
    monkeypatch.setattr(inference.subprocess, "run",
                        lambda argv, **kwargs: SimpleNamespace(returncode=0, stdout=json.dumps(child),
                                                               stderr=""))

    found = inference.measure("openvino", 0, tmp_path, batch_sizes=(8,))

    assert found.core_ms_per_image == {8: 36.5}
    assert found.to_dict()["core_ms_per_image"] == {"8": 36.5}
    # A child's output from before the figure (or a test's fake one) still loads.
    del child["core_ms_per_image"]
    assert inference.measure("openvino", 0, tmp_path).core_ms_per_image == {}


def test_a_threads_row_runs_every_call_on_those_threads_a_lone_image_too(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path):
    """threads=1 is make run's default worker: a lone image on every core would time
    another worker than the one the row names."""
    loaded: list[tuple] = []

    class Loaded(Exception):
        pass

    def load_classifier(*args: object, **kwargs: object) -> None:
        loaded.append((args, kwargs))
        raise Loaded

    monkeypatch.setattr("app_tier.model.load_classifier", load_classifier)
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(Loaded):
        inference._child(SimpleNamespace(images=tmp_path, runtime="openvino", threads=1))
    assert loaded == [(("random", "openvino", 1), {"one_image_threads": 1})]
