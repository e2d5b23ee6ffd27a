"""Draw a controller timeline CSV (see `--timeline`) as a PNG."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_timeline(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot")
    t0 = float(rows[0]["time"])
    t = [float(r["time"]) - t0 for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    top.plot(t, [int(r["visible"]) for r in rows], label="visible")
    top.plot(t, [int(r["in_flight"]) for r in rows], label="in flight")
    top.set_ylabel("messages")
    top.legend(loc="upper right")
    bottom.step(t, [int(r["running"]) for r in rows], where="post", label="running")
    bottom.step(t, [int(r["pending"]) for r in rows], where="post", label="pending")
    bottom.step(t, [int(r["desired"]) for r in rows], where="post", linestyle=":", label="desired")
    bottom.set_ylabel("app-tier instances")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    fig.suptitle("Controller timeline")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
