"""The local stack's own decisions: weights for a demo, and how many workers fit."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import psutil

from common.config import Settings
from localaws.stack import local_model_weights, memory_safe_workers


def test_explicit_weights_always_win(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert local_model_weights({"MODEL_WEIGHTS": "imagenet"}) == ("imagenet", "")


def test_without_cached_weights_the_demo_runs_untrained_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    weights, note = local_model_weights({})
    assert weights == "random" and "UNTRAINED" in note and str(tmp_path) in note


def test_with_cached_weights_the_demo_uses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5").write_bytes(b"x")
    assert local_model_weights({}) == ("imagenet", "")


def test_local_workers_are_capped_by_memory(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 * 2**30))
    tf = dataclasses.replace(Settings(), model_runtime="tensorflow")
    cap, note = memory_safe_workers(tf, {})
    assert cap == 3 and "LOCAL_MAX_WORKERS=3" in note  # 8 GB * 0.6 / 1.3 GB
    assert memory_safe_workers(Settings(), {})[0] == 9  # OpenVINO: 8 GB * 0.6 / 0.5 GB
    explicit = dataclasses.replace(tf, local_max_workers=12)
    assert memory_safe_workers(explicit, {"LOCAL_MAX_WORKERS": "12"}) == (12, "")  # the operator's call
