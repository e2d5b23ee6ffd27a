"""How `make bench` prints its figures: a table per part, the lines around them, and
the targets (bench/report.py makes the figures; bench/__main__.py runs the parts)."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.inference import BATCH_SIZES, PAUSE_S
from bench.scaling import FleetPoller


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
    pair = inference.get("side_by_side")
    if pair:
        each = " + ".join(f"{v:.1f}" for v in pair["each_images_per_s"])
        text += (f"\n  {pair['processes']} one-thread processes side by side, batch {pair['batch']}: "
                 f"{pair['images_per_s']:.1f} images/s together ({each}), "
                 f"{report.fmt(report.ratio(pair['images_per_s'], lim['images_per_s']), '%')} of the limit "
                 "(informative: how the stack's workers run their batches)"
                 + (f"; began {pair['started_late_s']:.1f} s late, the windows overlapping less"
                    if (pair.get("started_late_s") or 0) > 0.5 else ""))
    for name, error in (inference.get("errors") or {}).items():
        text += f"\n  {name}: FAILED, {short(error)}"
    return text


def short(error: str, width: int = 160) -> str:
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
        text += f"\n  {phase}: FAILED, {short(error)}"
    return text


def scaling_table(e2e: dict[str, Any]) -> str:
    rows, notes = [], ""
    for key, title in (("throughput", "(b) 300 @ 100"), ("course", "(d) 100 @ 100")):
        s = (e2e.get(key) or {}).get("scaling")
        if not s:
            continue
        if s.get("first_launch_not_measured"):
            notes += f"\n  {title}: first launch not measured: {s['first_launch_not_measured']}"
        rows.append([title, report.fmt(s["first_request_to_first_launch_s"], "s", 2),
                     report.fmt(s["controller_launch_logged_after_s"], "s", 2),
                     report.fmt(s["last_response_to_zero_s"], "s", 2),
                     report.fmt(s["controller_terminate_logged_after_s"], "s", 2), str(s["peak_instances"])])
    header = ["run", "1st request->launch (EC2)", "(controller log)", "last response->0 (EC2)",
              "(controller log)", "peak instances"]
    # It polls fast only until the first launch and from the last response (bench/scaling.py).
    title = (f"(e) Scaling, EC2 polled every ~{FleetPoller.interval_s * 1000:.0f} ms until the first launch "
             f"and from the last response, every {FleetPoller.slow_interval_s:g} s between")
    return report.table(title, header, rows) + notes


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


def noise_table(noise: dict[str, Any], cores: int | None) -> str:
    rows = [[part, report.fmt(n["wall_s"], "s", 0), f"{n['bench_cores']:.2f}", f"{n['others_cores']:.2f}",
             f"{n['loadavg_1m_start']:.1f} -> {n['loadavg_1m_end']:.1f}"] for part, n in noise.items()]
    title = f"Machine noise (cores busy, of {cores})" if cores else "Machine noise (cores busy)"
    return report.table(title, ["part", "wall", "this bench", "others", "load average"], rows)


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
            text += f"\n  {part}: {short(entry['error'])}"
    return text


def _code_text(code: dict[str, Any] | None) -> str:
    if not code or not code.get("commit"):
        return "?"
    return code["commit"][:10] + (" + changes" if code.get("dirty") else "")


def print_figures(doc: dict[str, Any]) -> None:
    inference, e2e, sqs, noise = doc["inference"], doc["end_to_end"], doc["sqs"], doc["noise"]
    limit = report.local_limit(inference)
    e2e_ratio = doc["ratio_e2e_to_limit"]

    tput = (e2e or {}).get("throughput") or {}
    print()
    if inference:
        print(inference_table(inference), "\n")
    if e2e:
        print(e2e_table(e2e), "\n")
        print(f"(c) end-to-end / in-process limit: {report.fmt(e2e_ratio, '%')} "
              f"({tput.get('throughput_images_per_s', 0):.1f} / {limit or 0:.1f} images/s)")
        pair = (inference or {}).get("side_by_side")
        if pair and doc.get("ratio_e2e_to_side_by_side") is not None:
            ratio = report.fmt(doc["ratio_e2e_to_side_by_side"], "%")
            print(f"    Against the model alone in {pair['processes']} one-thread processes side by side "
                  f"({pair['images_per_s']:.1f} images/s): {ratio} (informative; the target is judged "
                  "against (a)'s one process, as the issue defines it).")
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
              f"{report.fmt(single, 'ms')} back-to-back in (a), {report.fmt(paused, 'ms')} "
              f"after a pause of {PAUSE_S * 1000:.0f} ms as between one-at-a-time requests "
              f"(one thread, make run's default a worker: "
              f"{report.fmt(_one_thread_single(inference), 'ms')}; here a lone image uses all cores)")
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
        print(noise_table(noise, (doc.get("machine") or {}).get("cpus")), "\n")
    if doc.get("parts"):
        print(parts_table(doc["parts"]), "\n")
    print(report.targets_table([report.Target.from_dict(t) for t in doc["targets"]]))


def _one_thread_single(inference: dict[str, Any] | None) -> float | None:
    run = ((inference or {}).get("runs") or {}).get("openvino/threads=1")
    return run["single_image_s"] if run else None
