"""The benchmark's images: distinct, photo-like JPEGs made from seeds, and their expected labels."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import make_image


def write_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[Path]:
    """`count` distinct JPEGs named bench_0000.jpg ... in `folder` (made once, then reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"bench_{seed:04d}.jpg"
        if not path.exists():
            path.write_bytes(make_image(seed, size))
        paths.append(path)
    return paths


def write_expected(path: Path, labels: dict[str, str]) -> Path:
    """The load test's expected-results CSV (columns Image,Results)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image", "Results"])
        for stem, label in sorted(labels.items()):
            writer.writerow([stem, label])
    return path
