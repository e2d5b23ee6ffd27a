"""The pure part of the benchmark: statistics, targets and their verdicts, the table, the JSON.

Nothing here starts a process or reads the clock, so it is unit-tested
(tests/unit/test_bench_report.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UNTRAINED_NOTE = ("MODEL_WEIGHTS=random: an UNTRAINED ResNet-50 (labels meaningless; the figures are "
                  "about speed, which does not depend on the weights)")
NOISE_NOTE = ("This machine is shared (2 cores): other engineers' tests may run at the same time, so "
              "every figure is noisy; 'others used' shows how much of the machine they took per phase.")


def local_limit(inference: dict[str, Any] | None) -> float | None:
    """The model's images per second at its best batch size: (a)'s limit, if measured."""
    return inference["local_limit"]["images_per_s"] if inference else None


def ratio(part: float | None, whole: float | None) -> float | None:
    """part / whole, or None when either is unknown or the whole is not positive."""
    if part is None or whole is None or whole <= 0:
        return None
    return part / whole


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None
    limit: float
    # "min": measured must be >= limit; "max": measured must be < limit.
    kind: str
    unit: str = ""
    missing: str | None = None  # why there is no figure (a part or phase that failed or did not run)
    # Requests behind the figure that failed or were answered wrongly ("12 failed"): the
    # figure is then not of the work asked for (a request refused at once is fast), so no PASS.
    bad_requests: str | None = None
    # No figure because it never happened within this many units: a "max" target missed.
    more_than: float | None = None
    # What a figure that is there rests on, when not what the target is usually judged
    # against (the model alone measured once only: its measurement after (b) failed).
    note: str | None = None

    @property
    def verdict(self) -> str:
        if self.bad_requests:
            return "FAIL"
        if self.measured is None:
            if self.more_than is not None and self.kind == "max" and self.more_than >= self.limit:
                return "FAIL"
            return "N/A"
        ok = self.measured >= self.limit if self.kind == "min" else self.measured < self.limit
        return "PASS" if ok else "FAIL"

    @property
    def reason(self) -> str | None:
        """What the verdict rests on when not on the figure alone."""
        if self.bad_requests:
            return self.bad_requests
        if self.measured is not None:
            return self.note
        if self.more_than is not None:
            return f"> {self.more_than:g}{(' ' + self.unit) if self.unit else ''}"
        return self.missing

    @property
    def shown(self) -> str:
        return f"{self.verdict} ({self.reason})" if self.reason else self.verdict

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "limit": self.limit, "kind": self.kind,
                "unit": self.unit, "missing": self.missing, "bad_requests": self.bad_requests,
                "more_than": self.more_than, "note": self.note, "verdict": self.verdict,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        """The target to_dict() wrote (its verdict and reason are worked out again)."""
        fields = ("name", "measured", "limit", "kind", "unit", "missing", "bad_requests", "more_than", "note")
        return cls(**{k: d[k] for k in fields if k in d})


def cpu_budget(limit_images_per_s: float | None, cores: int, cpu_s_by_kind: dict[str, float],
               images: int, measured_images_per_s: float | None,
               model_core_ms_per_image: float | None = None) -> dict[str, Any] | None:
    """Core-milliseconds per image, by process kind, and the throughput they allow.

    `model_core_ms_per_image` is the model alone's CPU per image at its limit, as
    measured in (a); without it, it is assumed that the model kept all `cores` busy
    (1000 * cores / limit), which on a shared machine overstates it. Everything
    else on the machine (the embedded AWS, the web tier, the load generator, the
    workers' own I/O) is paid from the same CPU. The model reached the limit with
    the CPU it had; given as much, the stack's CPU per image allows model / total
    of that speed, whatever the code around the model does.
    """
    if not limit_images_per_s or images <= 0 or not cpu_s_by_kind:
        return None
    by_kind = {kind: 1000 * cpu / images for kind, cpu in cpu_s_by_kind.items()}
    total_ms = sum(by_kind.values())
    measured_model = bool(model_core_ms_per_image and model_core_ms_per_image > 0)
    model_ms = model_core_ms_per_image if measured_model else 1000 * cores / limit_images_per_s
    share = ratio(model_ms, total_ms)
    ceiling = None if share is None else limit_images_per_s * share
    return {
        "model_core_ms_per_image": model_ms,
        "model_core_ms_measured": measured_model,
        "model_cores": limit_images_per_s * model_ms / 1000,  # the CPU the model had at its limit
        "core_ms_per_image": by_kind,
        "total_core_ms_per_image": total_ms,
        "ceiling_images_per_s": ceiling,
        "ceiling_over_limit": share,
        "measured_over_ceiling": ratio(measured_images_per_s, ceiling),
    }


def bad_requests(run: Mapping[str, Any] | None) -> str | None:
    """"12 failed, 3 wrong" for a run's summary (bench.endtoend._summary); None when all went well.

    Requests planned that never ended (abandoned in flight) count as failed.
    """
    if not run:
        return None
    ended = sum(run.get(k) or 0 for k in ("correct", "unchecked", "wrong", "failed"))
    failed = (run.get("failed") or 0) + max(0, (run.get("requests") or 0) - ended)
    wrong = run.get("wrong") or 0
    counts = [f"{n} {what}" for n, what in ((failed, "failed"), (wrong, "wrong")) if n]
    return ", ".join(counts) or None


def targets(*, e2e_ratio: float | None, course_average_s: float | None, zero_after_s: float | None,
            low_load_p50_s: float | None, single_image_s: float | None,
            zero_more_than_s: float | None = None, missing: Mapping[str, str | None] | None = None,
            bad: Mapping[str, str | None] | None = None,
            notes: Mapping[str, str | None] | None = None) -> list[Target]:
    """The four targets the benchmark reports on (a missed target never fails the command).

    By target ("e2e_ratio", "course", "zero", "low_load"): `missing` says why a
    figure is None, `bad` the requests behind it that failed or were wrong
    (bad_requests()), `notes` what a figure rests on when not the usual (Target.note).
    `zero_more_than_s`: a fleet was still up this long after the last response,
    when the measuring gave up (zero_after_s is then None).
    """
    why, bad, notes = dict(missing or {}), dict(bad or {}), dict(notes or {})
    over_model = None if low_load_p50_s is None or single_image_s is None else low_load_p50_s - single_image_s
    return [
        Target("end-to-end throughput / in-process limit", e2e_ratio, 0.85, "min", "ratio",
               missing=why.get("e2e_ratio"), bad_requests=bad.get("e2e_ratio"), note=notes.get("e2e_ratio")),
        Target("course average latency, 100 requests at concurrency 100", course_average_s, 1.2, "max", "s",
               missing=why.get("course"), bad_requests=bad.get("course")),
        Target("last response -> zero instances", zero_after_s, 2.0, "max", "s", missing=why.get("zero"),
               bad_requests=bad.get("zero"), more_than=zero_more_than_s if zero_after_s is None else None),
        Target("low-load p50 minus model single-image time", over_model, 0.050, "max", "s",
               missing=why.get("low_load"), bad_requests=bad.get("low_load"), note=notes.get("low_load")),
    ]


# --- printing ------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.0f} ms"
    if unit == "%":
        return f"{value * 100:.0f} %"
    return f"{value:.{digits}f}{(' ' + unit) if unit else ''}"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with a title line, columns padded to their widest cell."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                           strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(header), rule, *[line(r) for r in rows]])


def shown_beside(measured: float, limit: float, digits: int) -> str:
    """`measured` with `digits` decimals, or more where that would show the limit itself:
    84.96 % is not shown "85 %" beside "FAIL" against ">= 85 %"."""
    for more in range(digits, digits + 6):
        if round(measured, more) != round(limit, more) or measured == limit:
            return f"{measured:.{more}f}"
    return repr(measured)


def targets_table(found: Sequence[Target]) -> str:
    rows = []
    for t in found:
        sign = ">=" if t.kind == "min" else "<"
        scale, unit, digits = ((100, "%", 0) if t.unit == "ratio" else (1000, "ms", 0) if t.unit == "s"
                               and t.limit < 0.5 else (1, t.unit, 3))
        limit = f"{sign} {t.limit * scale:g} {unit}"
        measured = "-" if t.measured is None else \
            f"{shown_beside(t.measured * scale, t.limit * scale, digits)} {unit}"
        rows.append([t.name, measured, limit, t.shown])
    return table("Targets (a missed target is reported, never fatal)",
                 ["target", "measured", "target", "verdict"], rows)


# --- JSON ------------------------------------------------------------------------------


REQUIRED_KEYS = ("generated_at", "untrained", "notes", "machine", "inference", "end_to_end", "sqs", "targets")


def document(*, generated_at: str, machine: dict[str, Any], inference: dict[str, Any] | None,
             end_to_end: dict[str, Any] | None, sqs: dict[str, Any] | None, found: Sequence[Target],
             noise: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON written to .bench/latest.json: one key per part, every target with its verdict."""
    doc: dict[str, Any] = {
        "generated_at": generated_at,
        "untrained": True,
        "notes": [UNTRAINED_NOTE, NOISE_NOTE],
        "machine": machine,
        "inference": inference,
        "end_to_end": end_to_end,
        "sqs": sqs,
        "targets": [t.to_dict() for t in found],
        "noise": noise,
    }
    doc.update(extra or {})
    return doc


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
