"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw


def pytest_collection_modifyitems(items):
    """`make test` runs two test processes (pytest-xdist, --dist loadgroup); each group
    runs whole in one of them. Every integration test in one group: each starts a stack
    that wants both cores, and the page and pipeline tests share one (a session fixture,
    which would otherwise start in both processes). A unit module in a group of its own:
    its module fixtures (a loaded model, say) are made once."""
    for item in items:
        path = item.path.as_posix()
        group = "integration" if "/tests/integration/" in path else path
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch):
    """Tests never touch real AWS: dummy credentials and a fixed region."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if not os.environ.get("KEEP_AWS_ENDPOINT_URL"):
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def make_image(seed: int, size: tuple[int, int] = (320, 240), fmt: str = "JPEG") -> bytes:
    """A distinct, photo-like test image: noise, a gradient and shapes, all from `seed`."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    gradient = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
    pixels = (base * 0.5 + gradient * 0.5).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))], fill=color)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def image_bytes():
    return make_image


def jpeg_of_many_scans(scans: int, side: int = 64) -> bytes:
    """A progressive JPEG whose second scan is repeated until it has `scans` in all:
    small, and each scan costs the decoder a pass over the whole image."""
    out = io.BytesIO()
    Image.new("L", (side, side), 128).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    starts = []
    at = data.find(b"\xff\xda")
    while at >= 0:
        starts.append(at)
        at = data.find(b"\xff\xda", at + 2)
    second = data[starts[1]:starts[2]]
    return data[:starts[2]] + second * (scans - len(starts)) + data[starts[2]:]
