"""A run's report told: the summary table, the RESULT line, a quiet run's reasons,
and the JSON file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from loadtest.outcomes import Report

UNTRAINED_WARNING = (
    "WARNING: the service said its model is UNTRAINED (MODEL_WEIGHTS=random): "
    "its labels are meaningless, and 'wrong' counts say nothing about accuracy."
)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def result_line(report: Report) -> str:
    if report.ok:
        late = (f"; {report.answered_later} of them read from /api/jobs after a 503 or 504 said "
                "the image was queued") if report.answered_later else ""
        checked = report.correct + report.wrong
        unchecked = (f"; {report.unchecked} not in the expected CSV, so unchecked"
                     if checked and report.unchecked else "")  # a CSV that names only some images
        return f"RESULT: PASS ({report.answered} answered, none failed or wrong{late}{unchecked})"
    reasons = [f"{report.failed} failed", f"{report.wrong} wrong"]
    if report.abandoned:
        reasons.append(f"{report.abandoned} abandoned in flight")
    if report.not_sent:
        reasons.append(f"{report.not_sent} not sent")
    if report.interrupted:
        reasons.append("interrupted")
    if report.checked_nothing:
        reasons.append("none checked: the expected CSV names no image answered")
    return f"RESULT: FAIL ({', '.join(reasons)})"


def failure_lines(report: Report, limit: int = 5) -> list[str]:
    """Why requests failed, or were not sent, one line per distinct reason with how
    many it stopped, the commonest first, then the wrong answers, one line each with
    its file: what a quiet run says beside its RESULT line."""
    lines = []
    for verdict in ("failed", "not sent"):
        stopped = sorted((o for o in report.outcomes if o.verdict == verdict), key=lambda o: o.index)
        reasons = Counter(o.error or "no reason given" for o in stopped)  # ties: the first to fail first
        common = reasons.most_common()
        lines += [f"{count} {verdict}: {reason}" for reason, count in common[:limit]]
        rest = common[limit:]
        if rest:
            lines.append(f"... and {sum(count for _, count in rest)} {verdict} for {len(rest)} other "
                         "reasons (run without -q, or see --json)")
    # Each wrong answer with its file, as the table shows it: "4 wrong" alone left a quiet
    # run's user no way to find which images, short of --json (reviewer).
    wrong = sorted((o for o in report.outcomes if o.verdict == "wrong"), key=lambda o: o.index)
    lines += [f"{o.file}: wrong: answered {o.body!r}, {o.note or 'wrong'}" for o in wrong[:limit]]
    if len(wrong) > limit:
        lines.append(f"... and {len(wrong) - limit} more wrong (run without -q, or see --json)")
    return lines


def format_report(report: Report, max_problems: int = 10) -> str:
    """The summary table printed at the end of a run."""
    stats = report.latency_stats()
    endpoint = "POST /" if report.api == "form" else "POST /api/jobs"
    checked = report.correct + report.wrong
    rows = [
        ("sent", f"{report.sent}" + (f" of {report.planned}" if report.sent != report.planned else "")),
        ("answered", f"{report.answered}"),
        ("failed", f"{report.failed}  (HTTP errors, timeouts)"),
        ("wrong", f"{report.wrong}  (of {checked} checked; {report.unchecked} unchecked)"),
        ("total duration", _seconds(report.duration_s)),
        ("throughput", f"{report.throughput:.2f} images/s"),
        ("latency p50", _seconds(stats["p50"])),
        ("latency p90", _seconds(stats["p90"])),
        ("latency p99", _seconds(stats["p99"])),
        ("latency max", _seconds(stats["max"])),
        ("latency mean", _seconds(stats["mean"])),
        ("average latency (course)", _seconds(report.course_average_latency) + "  (duration / requests)"),
    ]
    if report.not_sent:
        never_started = report.not_sent - report.unreached
        why = [f"{report.unreached} never connected: refused or unreachable"] if report.unreached else []
        why += [f"{never_started} not started: the run was interrupted"] if never_started else []
        rows.insert(3, ("not sent", f"{report.not_sent}  ({'; '.join(why)})"))
    if report.abandoned:
        rows.insert(3, ("abandoned", f"{report.abandoned}  (in flight at the second Ctrl-C)"))
    if report.answered_later:
        rows.insert(2, ("answered later", f"{report.answered_later}  (a 503 or 504 said the image was "
                                          "queued: its result was read from /api/jobs)"))
    if report.resent:
        resent = [o for o in report.outcomes if o.resent]
        cut_off_too = report.api == "jobs" or report.idempotency_keys
        why = "refused or cut-off connections" if cut_off_too else "refused connections"
        why = f"{why}, 503 'not stored': a web tier restarting"
        if all(o.verdict == "not sent" for o in resent):
            # Not one of them ever reached a web tier: none restarted, it stayed away.
            why = "connections refused or not made: refused or unreachable to the end"
        rows.insert(1, ("sent again", f"{len(resent)} requests, {report.resent} times in all  ({why})"))
    if report.peak_instances is not None:
        rows.append(("peak app-tier instances", f"{report.peak_instances}"))
    width = max(len(name) for name, _ in rows)
    in_flight = min(report.concurrency, report.planned)
    concurrency = f"concurrency {report.concurrency}"
    if in_flight < report.concurrency:
        concurrency += f" (at most {in_flight} in flight: {report.planned} requests)"
    lines = [f"Load test: {endpoint} on {report.url}, {concurrency}", ""]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]

    problems = sorted((o for o in report.outcomes if o.verdict in ("failed", "wrong", "not sent")),
                      key=lambda o: o.index)
    if problems:
        lines += ["", "Problems:"]
        for o in problems[:max_problems]:
            detail = o.error if o.verdict != "wrong" else f"answered {o.body!r}, {o.note or 'wrong'}"
            lines.append(f"  {o.file}: {o.verdict}: {detail}")
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems} more (see --json)")
    lines.append("")
    if report.untrained:
        lines.append(UNTRAINED_WARNING)
    lines.append(result_line(report))
    return "\n".join(lines)


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
