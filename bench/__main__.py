"""`make bench`: the service's figures on this machine, printed and written to .bench/latest.json.

  (a) the model alone, in fresh processes: throughput per batch size (the
      local limit), single-image time, start-up time, peak RSS; OpenVINO (the
      default runtime) and TensorFlow;
  (b) 300 images at concurrency 100 through the whole embedded stack;
  (c) the ratio (b) / (a);
  (d) the course's average latency: 100 requests at concurrency 100;
  (e) first request -> first launch, last response -> zero instances;
  (f) memory of each kind of process during (b): each one's exact peak
      (VmHWM), the largest RSS and PSS totals (bench/memory.py says which is which);
  (g) p50 latency at low load against the model's single-image time;
  (h) moto's SQS call times at several queue depths, against the needed rate.

The model is UNTRAINED (MODEL_WEIGHTS=random) throughout: the figures are
about speed. Missed targets are reported, never fatal. A part (or a phase of
one) that raises is recorded with its error, the others still run, what was
measured is printed and saved, and the command exits with 1. Use --only to run
some parts (the others are taken from the last .bench/latest.json when there;
"parts" in the JSON says which figures are this run's, and when each was measured).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.endtoend import ZERO_TIMEOUT_S, EndToEndPlan, error_text, run_end_to_end, tuned_env
from bench.images import write_expected, write_images
from bench.inference import BATCH_SIZES, PAUSE_S, InferenceResult, measure, prepare_model
from bench.noise import NoiseMeter
from bench.sqs import measure_sqs
from common.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
PARTS = ("inference", "sqs", "e2e")
FIGURES = {"inference": "inference", "sqs": "sqs", "e2e": "end_to_end"}  # part -> its key in the JSON
IMAGES = 300


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=PARTS,
                   help="run only this part (repeatable); others come from the last JSON")
    p.add_argument("--skip-tensorflow", action="store_true", help="measure OpenVINO only in (a)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the stack under test (tuning experiments)")
    p.add_argument("--warm-spares", type=int, default=None, choices=range(16), metavar="0-15",
                   help="LOCAL_WARM_SPARES for the stack")
    p.add_argument("--untuned", action="store_true",
                   help="run the stack with make run's own defaults, not the benchmark's tuned knobs")
    p.add_argument("--json", type=Path, default=BENCH_DIR / "latest.json", help="where to write the figures")
    args = p.parse_args(argv)
    # Checked now: found when the end-to-end part starts, after minutes of the others,
    # a mistyped --env lost every figure measured so far (reviewer).
    try:
        args.env = _parse_env(args.env)
    except ValueError as exc:
        p.error(str(exc))
    return args


# --- the parts ------------------------------------------------------------------------


def run_inference(images: Path, skip_tf: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The model-alone figures and the labels it gives each image (the answers the stack must give).

    The first measurement is the local limit, which the other parts are compared
    with: if it raises, so does this. The others are informative: their errors are
    kept in "errors", beside the figures measured.
    """
    print("(a) the model alone, each in a fresh process ...", flush=True)
    prepare_model()
    runs: list[InferenceResult] = [measure("openvino", 0, images, labels=True)]
    labels = runs[0].labels
    # What each worker of `make run` runs by default: one thread (LOCAL_WORKER_THREADS=1;
    # the end-to-end runs here give each worker all cores: bench.endtoend.tuned_env).
    informative = [("openvino", 1)] + ([] if skip_tf else [("tensorflow", 0)])
    errors: dict[str, str] = {}
    for runtime, threads in informative:
        try:
            runs.append(measure(runtime, threads, images))
        except Exception as exc:
            logging.exception("the %s measurement failed", runtime)
            errors[f"{runtime}/threads={threads}"] = error_text(exc)
    by_name = {f"{r.runtime}/threads={r.threads}": r.to_dict() for r in runs}
    limit = runs[0]
    return {
        "runs": by_name,
        "errors": errors,
        "local_limit": {"runtime": limit.runtime, "threads": limit.threads, "batch": limit.best_batch,
                        "images_per_s": limit.best_throughput,
                        "core_ms_per_image": limit.core_ms_per_image.get(limit.best_batch)},
        "single_image_s": limit.single_image_s,
        "single_image_after_pause_s": limit.single_image_after_pause_s,
        "distinct_labels": len(set(labels.values())),
    }, labels


def run_sqs(needed: float | None, receive_batch: float) -> dict[str, Any]:
    print("(h) moto's SQS at several queue depths ...", flush=True)
    return measure_sqs(needed_images_per_s=needed, receive_batch=receive_batch)


def run_e2e(images: Path, expected: Path | None, env: dict[str, str],
            warm_spares: int | None, limit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stack's phases; with `limit` ((a)'s local limit: runtime, threads, batch), the
    model measured so again once (b) is over."""
    print("(b, d-g) the whole stack: 300 @ 100, 100 @ 100, then one at a time ...", flush=True)
    probe = None if limit is None else functools.partial(
        measure, limit["runtime"], limit["threads"], images, batch_sizes=(limit["batch"],))
    plan = EndToEndPlan(images=images, expected=expected, env=env, warm_spares=warm_spares,
                        model_probe=probe)
    return run_end_to_end(plan, BENCH_DIR / "run")


# --- printing -------------------------------------------------------------------------


def inference_table(inference: dict[str, Any]) -> str:
    rows = []
    for name, r in inference["runs"].items():
        per_batch = [f"{r['throughput'][str(b)]:.1f}" for b in BATCH_SIZES]
        rows.append([name, *per_batch, f"{r['best_throughput']:.1f}",
                     report.fmt(r["single_image_s"], "ms"), report.fmt(r["startup_s"], "s", 1),
                     f"{r['peak_rss_mb']:.0f} MB"])
    header = ["runtime", *[f"b={b} img/s" for b in BATCH_SIZES], "best", "1 image", "start-up", "peak RSS"]
    lim = inference["local_limit"]
    text = report.table(
        f"(a) Model alone, in-process (fresh process each). Local limit: {lim['runtime']} threads="
        f"{lim['threads']} batch {lim['batch']} = {lim['images_per_s']:.1f} images/s", header, rows)
    for name, error in (inference.get("errors") or {}).items():
        text += f"\n  {name}: FAILED, {_short(error)}"
    return text


def _short(error: str, width: int = 160) -> str:
    """An error on one line: its first line and, when it has more (a child's stderr), its last."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= width else text[:width - 3] + "..."


def e2e_table(e2e: dict[str, Any]) -> str:
    rows = []
    runs = (("throughput", "(b) 300 @ 100"), ("course", "(d) 100 @ 100"), ("low_load", "(g) 30 @ 1"))
    for key, title in runs:
        r = e2e.get(key)
        if not r:
            continue
        lat = r["latency_s"]
        rows.append([title, f"{r['answered_200']}/{r['requests']}", str(r["failed"]), str(r["wrong"]),
                     report.fmt(r["duration_s"], "s", 1), f"{r['throughput_images_per_s']:.1f}",
                     *[report.fmt(lat[k], "s", 2) for k in ("p50", "p90", "p99", "max")],
                     report.fmt(r["course_average_latency_s"], "s", 3)])
    header = ["run", "200s", "failed", "wrong", "duration", "img/s", "p50", "p90", "p99", "max", "dur/req"]
    text = report.table("End to end: load_test.run_load -> POST / on the embedded stack", header, rows)
    for phase, error in (e2e.get("errors") or {}).items():
        text += f"\n  {phase}: FAILED, {_short(error)}"
    return text


def scaling_table(e2e: dict[str, Any]) -> str:
    rows = []
    for key, title in (("throughput", "(b) 300 @ 100"), ("course", "(d) 100 @ 100")):
        s = (e2e.get(key) or {}).get("scaling")
        if not s:
            continue
        rows.append([title, report.fmt(s["first_request_to_first_launch_s"], "s", 2),
                     report.fmt(s["controller_launch_logged_after_s"], "s", 2),
                     report.fmt(s["last_response_to_zero_s"], "s", 2),
                     report.fmt(s["controller_terminate_logged_after_s"], "s", 2), str(s["peak_instances"])])
    header = ["run", "1st request->launch (EC2)", "(controller log)", "last response->0 (EC2)",
              "(controller log)", "peak instances"]
    return report.table("(e) Scaling, EC2 polled every ~50 ms", header, rows)


def memory_table(mem: dict[str, Any]) -> str:
    # A JSON from before the PSS and VmHWM figures has none: "-" for those.
    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} MB"

    rows = [[kind, str(v["processes"]), str(v["peak_count"]), mb(v["max_rss_mb"]), mb(v["peak_sum_mb"]),
             mb(v.get("peak_pss_sum_mb")), f"{v.get('cpu_s', 0):.1f} s"]
            for kind, v in mem["by_kind"].items()]
    total_cpu = sum(v.get("cpu_s", 0) for v in mem["by_kind"].values())
    rows.append(["all", "", "", "", mb(mem["peak_total_mb"]), mb(mem.get("peak_pss_total_mb")),
                 f"{total_cpu:.1f} s"])
    title = f"(f) Memory during (b), psutil every {mem['interval_s']:g} s ({mem['samples']} samples)"
    text = report.table(title, ["process kind", "seen", "max alive", "max one", "max RSS sum", "max PSS sum",
                                "CPU used"], rows)
    peak = mem.get("per_process_peak", "sampled RSS")
    if peak == "VmHWM":
        one = "each process's own peak over its life (VmHWM; exact if alive at the end of (b))"
    else:
        one = f"each process's largest resident set, from {peak}"
    pss = (f"shared pages split among their processes (memory_full_info, every {mem['pss_interval_s']:g} s):"
           " their real total" if mem.get("pss_interval_s") else "not measured")
    return (f"{text}\n  max one      {one}"
            "\n  max RSS sum  largest total at one sample; shared pages count once per process: overstates"
            f"\n  max PSS sum  {pss}")


def moto_table(by_action: dict[str, Any], images: int, moto_process_cpu_s: float | None = None) -> str:
    """The embedded AWS's CPU by API action: its request handlers' thread time only.

    With `moto_process_cpu_s` (the moto processes' CPU during (b), from (f)), the rest
    of their CPU is shown as a row of its own: the handlers' sum was a third less than
    it, and read alone it passed for all the embedded AWS cost."""

    def per_image(cpu_s: float) -> str:
        return f"{1000 * cpu_s / max(images, 1):.1f} ms"

    rows = [[action, str(v["requests"]), f"{v['cpu_s']:.2f} s", f"{1000 * v['cpu_s'] / v['requests']:.1f} ms",
             per_image(v["cpu_s"])] for action, v in by_action.items()]
    total = sum(v["cpu_s"] for v in by_action.values())
    rows.append(["all", str(sum(v["requests"] for v in by_action.values())), f"{total:.2f} s", "",
                 per_image(total)])
    if moto_process_cpu_s is not None:
        outside = moto_process_cpu_s - total
        rows.append(["outside the handlers (HTTP serving, ...)", "",
                     f"{outside:.2f} s", "", per_image(outside)])
        rows.append(["moto processes, as in (f)", "", f"{moto_process_cpu_s:.2f} s", "",
                     per_image(moto_process_cpu_s)])
    text = report.table("(b) The embedded AWS's handler CPU during (b), by API action",
                        ["action", "requests", "CPU", "per request", "per image"], rows)
    text += ("\n  handler CPU  each request handler's own thread time (time.thread_time), from the "
             "statistics written\n               before (b) to the first written after its last response: "
             "up to 1 s past it")
    if moto_process_cpu_s is not None:
        text += ("\n  outside      gunicorn's HTTP serving, the statistics writer, the rest: the moto "
                 "processes' CPU in (f)\n               (the start of (b) to its last response) less the "
                 "handlers'; the windows differ by up to ~1 s")
    return text


def sqs_table(sqs: dict[str, Any]) -> str:
    # A JSON from before the queue was kept at its depth has other keys: "-" for those.
    keys = ("send_batch1_ms", "send_batch10_ms", "receive10_ms", "receive10_and_delete_ms",
            "receive10_and_delete_messages")
    rows = []
    for server in ("moto", "moto_fast"):
        for d in (sqs.get(server) or {}).get("depths", []):
            rows.append([server, str(d["depth"]), *[report.fmt(d.get(k), digits=1) for k in keys]])
    title = ("(h) moto SQS: median ms per call from one client, the queue kept at its depth "
             "(moto = as shipped; moto_fast = what the stack runs)")
    header = ["server", "queue depth", "send batch 1", "send batch 10", "receive 10",
              "receive 10 + delete", "(messages taken)"]
    text = report.table(title, header, rows)
    needed = sqs.get("needed_images_per_s")

    def batches(kind: str) -> str:
        assumed = sqs.get(f"{kind}_batch_assumed")
        return "?" if assumed is None else f"{assumed:g}"

    for server in ("moto", "moto_fast"):
        s = sqs.get(server)
        if not s:
            continue
        text += (f"\n  {server}: SQS calls cost ~{s['sqs_ms_per_image_at_depth_100']:.1f} ms of moto "
                 f"per image at depth 100 (receives of {batches('receive')}, web-tier sends of "
                 f"{batches('send')}) -> at most ~{s['sqs_bound_images_per_s']:.0f} images/s from SQS alone")
        if needed:
            text += f"; at the local limit ({needed:.1f}/s) moto is busy {s['busy_share_at_needed_rate']:.0%}"
    return text + ("\n  (S3 and EC2 calls come on top, in the same moto process: see the CPU column of (f).)")


def noise_table(noise: dict[str, Any]) -> str:
    rows = [[part, report.fmt(n["wall_s"], "s", 0), f"{n['bench_cores']:.2f}", f"{n['others_cores']:.2f}",
             f"{n['loadavg_1m_start']:.1f} -> {n['loadavg_1m_end']:.1f}"] for part, n in noise.items()]
    return report.table("Machine noise (cores busy, of 2)", ["part", "wall", "this bench", "others",
                                                              "load average"], rows)


# --- main -----------------------------------------------------------------------------


def _previous(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise ValueError(f"--env wants NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def code_version(root: Path = ROOT) -> dict[str, Any]:
    """The commit checked out and whether the tree differs from it (None each when git cannot say):
    figures measured by uncommitted code are not those of any commit."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Untracked files (a scratch script, a reviewer's notes) change no figure.
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _carried(part: str, previous: dict[str, Any]) -> dict[str, Any]:
    """What the previous JSON says of a part this run does not measure."""
    if previous.get(FIGURES[part]) is None:
        return {"source": "not measured", "measured_at": None, "error": None}
    # A JSON from before "parts" does not say when: None.
    entry = dict((previous.get("parts") or {}).get(part) or {"measured_at": None, "error": None})
    entry["source"] = "previous run"
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parts = set(args.only or PARTS)
    previous = _previous(args.json)
    started = time.monotonic()
    code = code_version()
    print(f"make bench: {report.UNTRAINED_NOTE}.\n{report.NOISE_NOTE}\n", flush=True)

    images = BENCH_DIR / "images"
    write_images(images, IMAGES)
    noise: dict[str, Any] = dict(previous.get("noise") or {})

    figures: dict[str, Any] = {
        "inference": previous.get("inference"), "expected_labels": previous.get("expected_labels") or {},
        "end_to_end": previous.get("end_to_end"), "sqs": previous.get("sqs"), "noise": noise,
        "parts": {part: _carried(part, previous) for part in PARTS}, "code": code,
    }

    def save() -> None:
        # After every part, so that an interrupted run keeps what it measured.
        report.write_json(_document(figures, started), args.json)

    def e2e() -> dict[str, Any]:
        labels = figures["expected_labels"]
        expected = write_expected(BENCH_DIR / "expected.csv", labels) if labels else None
        env, spares = ({}, None) if args.untuned else tuned_env()
        env.update(args.env)
        spares = args.warm_spares if args.warm_spares is not None else spares
        return run_e2e(images, expected, env, spares, limit=(figures["inference"] or {}).get("local_limit"))

    def inference() -> dict[str, Any]:
        figures["inference"], figures["expected_labels"] = None, {}  # this run's, or none
        found, figures["expected_labels"] = run_inference(images, args.skip_tensorflow)
        return found

    measure_part = {
        "inference": inference,
        "e2e": e2e,
        "sqs": lambda: run_sqs(_limit(figures["inference"]),
                               receive_batch=float(Settings.from_env().receive_batch)),
    }
    for part in ("inference", "e2e", "sqs"):  # e2e checks its answers against inference's labels
        if part not in parts:
            continue
        key = FIGURES[part]
        entry = {"source": "this run", "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "code": code, "error": None}
        meter = NoiseMeter.start()
        at = time.monotonic()
        try:
            figures[key] = measure_part[part]()
            entry["error"] = _inner_errors(figures[key])
        except Exception as exc:
            # The figures of a part that failed are not this run's: never carry the last run's on.
            logging.exception("part %s failed", part)
            figures[key] = None
            entry["error"] = error_text(exc)
            print(f"{part}: FAILED, {_short(entry['error'])}", flush=True)
        entry["seconds"] = round(time.monotonic() - at, 1)
        noise[part] = meter.stop()
        figures["parts"][part] = entry
        save()

    doc = _document(figures, started)
    report.write_json(doc, args.json)
    print_figures(doc)
    failed = [part for part in sorted(parts) if figures["parts"][part]["error"]]
    print(f"\nwritten to {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}"
          f" in {time.monotonic() - started:.0f} s. {report.UNTRAINED_NOTE}.")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see 'parts' above and in the JSON)")
    return 1 if failed else 0


def _inner_errors(figures: dict[str, Any] | None) -> str | None:
    """The errors a part kept beside its figures (a phase or an informative run), as one string."""
    errors = (figures or {}).get("errors") or {}
    return "; ".join(f"{name}: {error}" for name, error in errors.items()) or None


def _limit(inference: dict[str, Any] | None) -> float | None:
    return inference["local_limit"]["images_per_s"] if inference else None


def _missing(figures: dict[str, Any], part: str, phase: str | None = None) -> str | None:
    """Why a part's figure (or one phase's) is not there, for a target's N/A; None when it is."""
    entry = figures["parts"][part]
    found = figures[FIGURES[part]]
    if found is None:
        return f"{part} failed: {_short(entry['error'], 80)}" if entry.get("error") \
            else f"{part} not measured"
    if phase is not None and phase not in found:
        error = (found.get("errors") or {}).get(phase)
        return f"{part} {phase} failed: {_short(error, 80)}" if error else f"{part} {phase} not measured"
    return None


def _first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


def _bad_in_phases(e2e: dict[str, Any] | None, phases: tuple[tuple[str, str], ...]) -> str | None:
    """"3 failed in (b); 1 wrong in (d)": each phase's bad requests, named by its part
    (the first phase's alone had hidden the other's)."""
    named = [f"{bad} in {name}" for name, phase in phases
             if (bad := report.bad_requests((e2e or {}).get(phase)))]
    return "; ".join(named) or None


def _document(figures: dict[str, Any], started: float) -> dict[str, Any]:
    inference, e2e = figures["inference"], figures["end_to_end"]
    limit = _limit(inference)
    tput = (e2e or {}).get("throughput") or {}
    e2e_ratio = report.ratio(tput.get("throughput_images_per_s"), limit)
    now = (e2e or {}).get("model_now") or {}
    limit_now = now.get("images_per_s")
    # The targets are judged against the model at its best of the two measurements:
    # against (a) alone, an (a) slowed by others' work flattered (c) (59 % shown, 50 %
    # against the model measured again: reviewer), and the low-load target likewise.
    e2e_ratio_now = report.ratio(tput.get("throughput_images_per_s"), limit_now)
    judged_ratio = _lower(e2e_ratio, e2e_ratio_now)
    single_image_s = _lower((inference or {}).get("single_image_s"), now.get("single_image_s"))
    budget = report.cpu_budget(limit, psutil.cpu_count() or 1, _cpu_by_kind(tput), tput.get("requests") or 0,
                               tput.get("throughput_images_per_s"),
                               model_core_ms_per_image=((inference or {}).get("local_limit") or {}).get(
                                   "core_ms_per_image"))
    # A run whose fleet never reached zero within ZERO_TIMEOUT_S has None here: a miss,
    # unlike a run that is not there at all.
    scaled = [((e2e or {}).get(k) or {}).get("scaling") for k in ("throughput", "course")]
    zero_after = [s.get("last_response_to_zero_s") for s in scaled if s]
    never_zero = any(s is None for s in zero_after)
    # A fleet that never left zero is "at zero" at once: that passed the target without
    # scaling anything. (A JSON without the figure is taken to have launched.)
    idle = [name for name, s in zip(("(b)", "(d)"), scaled, strict=True)
            if s and s.get("peak_instances") == 0]
    zero_missing = _first_reason(_missing(figures, "e2e", "throughput"), _missing(figures, "e2e", "course"),
                                 f"no instance launched in {' and '.join(idle)}" if idle else None)
    found = report.targets(
        e2e_ratio=judged_ratio,
        course_average_s=((e2e or {}).get("course") or {}).get("course_average_latency_s"),
        zero_after_s=None if idle or never_zero or len(zero_after) < len(scaled) else max(zero_after),
        zero_more_than_s=ZERO_TIMEOUT_S if never_zero and not idle else None,
        low_load_p50_s=(((e2e or {}).get("low_load") or {}).get("latency_s") or {}).get("p50"),
        single_image_s=single_image_s,
        missing={
            "e2e_ratio": _first_reason(_missing(figures, "inference"),
                                       _missing(figures, "e2e", "throughput")),
            "course": _missing(figures, "e2e", "course"),
            "zero": zero_missing,
            "low_load": _first_reason(_missing(figures, "e2e", "low_load"), _missing(figures, "inference")),
        },
        bad={**{target: report.bad_requests((e2e or {}).get(phase)) for target, phase in
                (("e2e_ratio", "throughput"), ("course", "course"), ("low_load", "low_load"))},
             # The fleet's time to zero after requests that failed is not that after the work.
             "zero": _bad_in_phases(e2e, (("(b)", "throughput"), ("(d)", "course")))},
    )
    return report.document(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                 "python": platform.python_version(), "platform": platform.platform()},
        inference=inference, end_to_end=e2e, sqs=figures["sqs"], found=found, noise=figures["noise"],
        extra={"ratio_e2e_to_limit": e2e_ratio, "ratio_e2e_judged": judged_ratio,
               "single_image_judged_s": single_image_s,
               "ratio_e2e_to_limit_now": e2e_ratio_now,
               "cpu_budget": budget, "code": figures.get("code"),
               "parts": figures["parts"],
               "expected_labels": figures["expected_labels"], "bench_seconds": time.monotonic() - started},
    )


def _lower(*values: float | None) -> float | None:
    """The lowest of the figures measured (None if none was)."""
    return min((v for v in values if v is not None), default=None)


def _cpu_by_kind(run: dict[str, Any]) -> dict[str, float]:
    """CPU seconds per process kind during a run, the load generator included."""
    kinds = {kind: v["cpu_s"] for kind, v in ((run.get("memory") or {}).get("by_kind") or {}).items()}
    if kinds and run.get("load_test_cpu_s") is not None:
        kinds["load test and bench"] = run["load_test_cpu_s"]  # its samplers run in that process
    return kinds


def budget_line(budget: dict[str, Any] | None) -> str:
    """Why (c) is what it is: where each image's core-milliseconds go during (b)."""
    if not budget:
        return "(c) CPU per image: not measured"
    parts = ", ".join(f"{kind} {ms:.1f}" for kind, ms in
                      sorted(budget["core_ms_per_image"].items(), key=lambda kv: -kv[1]))
    ceiling = report.fmt(budget["ceiling_images_per_s"], digits=1)
    # A JSON from before the model's CPU was measured has no flag: it was assumed then.
    how = "measured in (a)" if budget.get("model_core_ms_measured") else "assumed: all cores busy"
    cores = budget.get("model_cores")
    had = "" if cores is None else f" ({cores:.2f} cores)"
    return (f"    CPU per image during (b), core-ms: {parts} = {budget['total_core_ms_per_image']:.1f} "
            f"(the model alone at its limit: {budget['model_core_ms_per_image']:.1f}, {how}).\n"
            f"    With the CPU the model had at its limit{had}, that allows at most {ceiling} images/s "
            f"= {report.fmt(budget['ceiling_over_limit'], '%')} of the limit; (b) reached "
            f"{report.fmt(budget['measured_over_ceiling'], '%')} of that ceiling.")


def model_now_line(now: dict[str, Any], limit: float | None, ratio_now: float | None) -> str:
    """(c) against the model measured again just after (b): the machine's speed then."""
    drift = report.fmt(report.ratio(now["images_per_s"], limit), "%")
    return (f"    The model alone again just after (b), the stack idle: {now['images_per_s']:.1f} "
            f"images/s at batch {now['batch']} ({drift} of its speed in (a)); (b) was "
            f"{report.fmt(ratio_now, '%')} of that.")


def model_now_single_line(now: dict[str, Any]) -> str:
    return (f"    The model's single image just after (b): {report.fmt(now['single_image_s'], 'ms')} "
            f"back-to-back, {report.fmt(now['single_image_after_pause_s'], 'ms')} after the pause")


def parts_table(parts: dict[str, Any]) -> str:
    rows = []
    for part, entry in parts.items():
        measured = entry["source"] != "not measured"
        failed = "FAILED" if entry.get("error") else ""
        rows.append([part, entry["source"], entry.get("measured_at") or "?" if measured else "",
                     _code_text(entry.get("code")) if measured else "", failed])
    text = report.table("Parts: whose figures these are", ["part", "figures from", "measured at", "code", ""],
                        rows)
    for part, entry in parts.items():
        if entry.get("error"):
            text += f"\n  {part}: {_short(entry['error'])}"
    return text


def _code_text(code: dict[str, Any] | None) -> str:
    if not code or not code.get("commit"):
        return "?"
    return code["commit"][:10] + (" + changes" if code.get("dirty") else "")


def print_figures(doc: dict[str, Any]) -> None:
    inference, e2e, sqs, noise = doc["inference"], doc["end_to_end"], doc["sqs"], doc["noise"]
    limit = _limit(inference)
    e2e_ratio = doc["ratio_e2e_to_limit"]

    tput = (e2e or {}).get("throughput") or {}
    print()
    if inference:
        print(inference_table(inference), "\n")
    if e2e:
        print(e2e_table(e2e), "\n")
        print(f"(c) end-to-end / in-process limit: {report.fmt(e2e_ratio, '%')} "
              f"({tput.get('throughput_images_per_s', 0):.1f} / {limit or 0:.1f} images/s)")
        now = e2e.get("model_now")
        if now:
            print(model_now_line(now, limit, doc.get("ratio_e2e_to_limit_now")))
        judged, single_judged = doc.get("ratio_e2e_judged"), doc.get("single_image_judged_s")
        print(f"    The target is judged against the faster of the two: {report.fmt(judged, '%')}; the "
              f"low-load one against the shorter single-image time: {report.fmt(single_judged, 'ms')}.")
        print(budget_line(doc.get("cpu_budget")))
        low = ((e2e.get("low_load") or {}).get("latency_s") or {}).get("p50")
        single = (inference or {}).get("single_image_s")
        paused = (inference or {}).get("single_image_after_pause_s")
        print(f"(g) low-load p50 {report.fmt(low, 'ms')} vs model single-image time "
              f"{report.fmt(single, 'ms')} back-to-back (the target's), {report.fmt(paused, 'ms')} "
              f"after a pause of {PAUSE_S * 1000:.0f} ms as between one-at-a-time requests "
              f"(one thread, make run's default a worker: "
              f"{report.fmt(_one_thread_single(inference), 'ms')}; here each worker uses all cores)")
        if now:
            print(model_now_single_line(now))
        print()
        print(scaling_table(e2e), "\n")
        if tput.get("memory"):
            print(memory_table(tput["memory"]), "\n")
        if tput.get("moto_by_action"):
            moto_cpu = (((tput.get("memory") or {}).get("by_kind") or {}).get("moto") or {}).get("cpu_s")
            print(moto_table(tput["moto_by_action"], tput.get("requests") or 0, moto_cpu), "\n")
        print(f"stack env overrides: {e2e.get('env') or 'none'}, warm spares {e2e.get('warm_spares')}\n")
    if sqs:
        print(sqs_table(sqs), "\n")
    if noise:
        print(noise_table(noise), "\n")
    if doc.get("parts"):
        print(parts_table(doc["parts"]), "\n")
    print(report.targets_table([report.Target.from_dict(t) for t in doc["targets"]]))



def _one_thread_single(inference: dict[str, Any] | None) -> float | None:
    run = ((inference or {}).get("runs") or {}).get("openvino/threads=1")
    return run["single_image_s"] if run else None


if __name__ == "__main__":
    sys.exit(main())
