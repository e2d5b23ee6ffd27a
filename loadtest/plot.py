"""A run drawn: each request's latency over the run, above the app-tier instances."""

from __future__ import annotations

from pathlib import Path

from loadtest.outcomes import Report


def write_plot(report: Report, path: Path) -> None:
    """Latency of each request against its send time, above instances over time."""
    # Imported here so the rest of the script works where matplotlib is missing;
    # Figure without pyplot draws with the Agg canvas and needs no display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    # Okabe-Ito colours and a marker each: told apart without colour vision too.
    styles = {"correct": ("#009E73", "o"), "unchecked": ("#0072B2", "o"),
              "wrong": ("#E69F00", "^"), "failed": ("#D55E00", "x"), "not sent": ("#000000", "s")}
    for verdict, (colour, marker) in styles.items():
        points = [(o.started_s, o.latency_s) for o in report.outcomes if o.verdict == verdict]
        if points:
            xs, ys = zip(*points, strict=True)
            top.scatter(xs, ys, s=12, color=colour, marker=marker, alpha=0.7,
                        label=f"{verdict} ({len(points)})")
    top.set_ylabel("latency (s)")
    top.set_title(
        f"{report.sent} requests, concurrency {report.concurrency}, "
        f"{report.throughput:.2f} images/s" + ("  [UNTRAINED MODEL]" if report.untrained else "")
    )
    if report.outcomes:
        # Beside the plot, not on it: the slowest requests tend to sit in its top left.
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    top.grid(alpha=0.3)

    if report.instance_samples:
        ts, counts = zip(*report.instance_samples, strict=True)
        bottom.step(ts, counts, where="post", color="tab:purple")
        bottom.set_ylim(bottom=0, top=max(counts) + 1)
    else:
        bottom.text(0.5, 0.5, "no /api/status data", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylabel("app-tier instances\n(pending + running)")
    bottom.set_xlabel("seconds since the run began (a request's point: when it was sent)")
    bottom.grid(alpha=0.3)
    # A path without a suffix is written as a PNG at that path (matplotlib would add ".png").
    fig.savefig(path, dpi=100, format=None if Path(path).suffix else "png")
