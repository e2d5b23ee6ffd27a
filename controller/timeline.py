"""The controller's timeline CSV (`--timeline`): a row a round (TimelineFile), and drawn
as a PNG (plot_timeline, for `--plot`). For people only: nothing decides on it."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# `reason`: why, as the log says it: `desired` alone can read as under-provisioning
# (15 desired, none launched, for requests all in flight).
TIMELINE_FIELDS = ("time", "visible", "in_flight", "delayed", "pending", "running", "desired", "action",
                   "reason")


@dataclass
class TimelineFile:
    """The CSV a controller adds a row to each round. A file it cannot start is an
    OSError at once (the command line's usage error); a row it cannot add later is
    warned about once, and tried again each round."""

    path: Path
    _failed: bool = field(default=False, init=False)  # warned about once

    def __post_init__(self) -> None:
        # Added to, not written over: a controller restarted (systemd, its watchdog)
        # would erase the rounds before it, those an operator wants after a crash.
        # A file of other columns is started afresh, as is one not even text (a PNG
        # given for the CSV, the two paths swapped), which had the controller stop at
        # start on a decoding error that named no file.
        try:
            with self.path.open(newline="", encoding="utf-8") as fh:
                first = next(csv.reader(fh), None)
        except (FileNotFoundError, UnicodeDecodeError, csv.Error):
            first = None
        if first != list(TIMELINE_FIELDS):
            with self.path.open("w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(TIMELINE_FIELDS)

    def write(self, row: Mapping[str, object]) -> None:
        """A row on disk, for people only: a disk full or gone is warned about once, and
        tried again each round, but never fails the round, which would stop the acting."""
        try:
            with self.path.open("a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow([row[k] for k in TIMELINE_FIELDS])
        except OSError as exc:
            if not self._failed:
                log.warning("controller: cannot write the timeline (%s); the fleet is managed "
                            "all the same", exc)
            self._failed = True


def plot_timeline(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open(encoding="utf-8") as fh:
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
