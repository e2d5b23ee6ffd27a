"""(a) The model alone, in a fresh process: the local limit and the model's own times.

Each measurement runs in a subprocess of its own (`python -m bench.inference`),
so that its start-up time (process start to first prediction) and its peak
resident memory are those of a clean worker-like process, and one runtime's
threads and caches never touch another's figures.

The child measures, on real test images already decoded to model input:
  - single-image time: the median of 15 batch-1 calls, after a warm-up, in
    three rounds (before, between and after the batch sizes), the best kept,
    or the batch-1 throughput run's time per image where that is shorter;
  - throughput at each batch size: images per second over at least
    `min_seconds` of back-to-back calls (in two interleaved rounds, the
    better kept), and the process's CPU per image in the round kept;
  - optionally, the top-1 label of every image in a folder (the answers the
    stack must give), and the time to decode one image (`prepare`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import cli

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZES = (1, 2, 4, 8, 10)
# Between two calls when one request at a time comes through the stack (its ~110 ms
# less the model's ~45, here): measured in a traced stack, the model took 63 ms there
# (median) against 39 back-to-back.
PAUSE_S = 0.07
ROUNDS = 2
MEASURE_TIMEOUT_S = 240.0


@dataclass
class InferenceResult:
    runtime: str
    threads: int
    startup_s: float  # process start -> first prediction on a real image
    load_s: float  # the classifier's own load time (inside start-up)
    single_image_s: float  # one image back to back: see single_image_time
    # The same after a pause of PAUSE_S before each call, as one request at a time
    # finds the model: idle, its threads asleep and its caches cooled.
    single_image_after_pause_s: float
    prepare_s: float  # median decode + resize of one test image
    throughput: dict[int, float]  # batch size -> images/s
    peak_rss_mb: float
    labels: dict[str, str] = field(default_factory=dict)  # image stem -> top-1 label
    scores: dict[str, float] = field(default_factory=dict)
    # Batch size -> the process's core-ms per image in the throughput run kept. The
    # limit's images/s alone does not say how many cores the model had: on a shared
    # machine others take some, and 1000 * cores / limit then overstates the model's
    # cost (71.5 core-ms stated, where the workers in (b), decoding and S3 included,
    # took 53.3 per image). Empty in figures from before it was measured.
    core_ms_per_image: dict[int, float] = field(default_factory=dict)
    # With a start time given (measure's `start_at`), how late the throughput window began:
    # processes measured side by side share one window, so their figures add up.
    started_late_s: float | None = None

    @property
    def best_batch(self) -> int:
        return max(self.throughput, key=lambda b: self.throughput[b])

    @property
    def best_throughput(self) -> float:
        return self.throughput[self.best_batch]

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("labels")
        out.pop("scores")
        out["throughput"] = {str(b): v for b, v in self.throughput.items()}
        out["core_ms_per_image"] = {str(b): v for b, v in self.core_ms_per_image.items()}
        out["best_batch"] = self.best_batch
        out["best_throughput"] = self.best_throughput
        return out


# --- parent side -----------------------------------------------------------------


def measure(runtime: str, threads: int, images: Path, *, labels: bool = False,
            min_seconds: float = 2.5, timeout_s: float = MEASURE_TIMEOUT_S,
            batch_sizes: Sequence[int] = BATCH_SIZES, start_at: float | None = None) -> InferenceResult:
    """Run one measurement in a fresh `python -m bench.inference` process; its
    throughput at each of `batch_sizes`. With `start_at` (a wall-clock time), one
    round of `min_seconds` that begins then, rather than the better of ROUNDS."""
    env = dict(os.environ, MODEL_WEIGHTS="random", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "bench.inference", "--runtime", runtime, "--threads", str(threads),
            "--images", str(images), "--min-seconds", str(min_seconds),
            "--batches", ",".join(str(b) for b in batch_sizes)]
    if labels:
        argv.append("--labels")
    if start_at is not None:
        argv += ["--start-at", repr(start_at)]
    argv += ["--t0", repr(time.time())]
    done = subprocess.run(argv, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{runtime} measurement failed ({done.returncode}):\n{done.stderr[-3000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    raw["throughput"] = {int(b): v for b, v in raw["throughput"].items()}
    raw["core_ms_per_image"] = {int(b): v for b, v in (raw.get("core_ms_per_image") or {}).items()}
    return InferenceResult(**raw)


def prepare_model(timeout_s: float = 300.0) -> None:
    """Convert and cache the OpenVINO IR first, so no measurement includes a conversion."""
    env = dict(os.environ, MODEL_WEIGHTS="random", MODEL_RUNTIME="openvino", TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-m", "app_tier", "--prepare-only"], cwd=str(ROOT), env=env,
                   check=True, capture_output=True, timeout=timeout_s)


# --- child side ------------------------------------------------------------------


def single_image_time(round_medians: list[float], batch1_images_per_s: float | None) -> float:
    """The model's own time for one image back to back: the best of the rounds' medians
    and of the batch-1 throughput run, which makes the same calls. On a shared machine
    a burst of others' work can spoil all three short rounds (2026-12-02: 137 ms, while
    batch 1 ran at 15.8 images/s, 63 ms each), and low load's margin over the model
    then looked 74 ms smaller than it was."""
    candidates = list(round_medians)
    if batch1_images_per_s:
        candidates.append(1.0 / batch1_images_per_s)
    return min(candidates)


def process_cpu_s() -> float:
    """This process's CPU seconds so far, every thread's: OpenVINO's own threads
    do the model's work, and a thread's clock would miss them."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed_calls(fn: Callable[[np.ndarray], object], batch: np.ndarray, min_seconds: float,
                 min_calls: int = 2) -> tuple[int, float, float]:
    """Calls, wall seconds and process CPU seconds of back-to-back `fn(batch)`."""
    cpu, calls, started = process_cpu_s(), 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        fn(batch)
        calls += 1
    return calls, time.perf_counter() - started, process_cpu_s() - cpu


def throughput_rounds(fn: Callable[[Any], Any], batches: Mapping[int, Any], min_seconds: float,
                      rounds: int = ROUNDS, between: Callable[[], Any] = lambda: None,
                      ) -> tuple[dict[int, float], dict[int, float]]:
    """Images/s and core-ms per image at each batch size, over `rounds` interleaved rounds
    of `min_seconds / rounds` each, `between()` after each round.

    The batch sizes are interleaved and the better round kept: on a shared machine a
    burst of someone else's work then spoils one round, not a batch size. The CPU is
    the kept round's, so that the two figures describe the same calls.
    """
    throughput: dict[int, float] = {}
    core_ms: dict[int, float] = {}
    for _round in range(rounds):
        for size, batch in batches.items():
            fn(batch)  # a new shape may cost a first call
            calls, elapsed, cpu_s = _timed_calls(fn, batch, min_seconds / rounds)
            images_per_s = calls * size / elapsed
            if images_per_s > throughput.get(size, 0.0):
                throughput[size] = images_per_s
                core_ms[size] = 1000 * cpu_s / (calls * size)
        between()
    return throughput, core_ms


def _child(args: argparse.Namespace) -> dict:
    import numpy as np

    from app_tier.images import prepare
    from app_tier.model import load_classifier
    from common.config import Settings

    max_pixels = Settings.max_image_pixels  # the default, as the workers measured against have it
    files = sorted(p for p in args.images.iterdir() if p.is_file())
    # Every call on `threads`, a lone image too: threads=1 is make run's default worker
    # (common/config.py local_run_overrides).
    classifier = load_classifier("random", args.runtime, args.threads, one_image_threads=args.threads)
    raw = files[0].read_bytes()
    first = prepare(raw, max_pixels)[None]
    classifier.classify(first)
    startup = time.time() - args.t0

    prepare_times = []
    pixels = []
    for path in files[:max(BATCH_SIZES)]:
        data = path.read_bytes()
        t = time.perf_counter()
        pixels.append(prepare(data, max_pixels))
        prepare_times.append(time.perf_counter() - t)
    pool = np.stack(pixels)

    for _ in range(3):  # warm-up
        classifier.probabilities(pool[:1])

    def single_image_round(calls: int = 15, pause_s: float = 0.0) -> float:
        times = []
        for i in range(calls):
            time.sleep(pause_s)
            t = time.perf_counter()
            classifier.probabilities(pool[i % len(pool):][:1])
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    singles = [single_image_round()]
    batches = {size: np.ascontiguousarray(np.resize(pool, (size, *pool.shape[1:]))) for size in args.batches}
    started_late_s = None
    if args.start_at is not None:
        started_late_s = max(0.0, time.time() - args.start_at)
        time.sleep(max(0.0, args.start_at - time.time()))
    throughput, core_ms = throughput_rounds(classifier.probabilities, batches, args.min_seconds,
                                            rounds=1 if args.start_at is not None else ROUNDS,
                                            between=lambda: singles.append(single_image_round()))
    after_pause = min(single_image_round(pause_s=PAUSE_S) for _ in range(2))

    labels, scores = {}, {}
    if args.labels:
        for start in range(0, len(files), 10):
            chunk = files[start:start + 10]
            batch = np.stack([prepare(p.read_bytes(), max_pixels) for p in chunk])
            for path, result in zip(chunk, classifier.classify(batch), strict=True):
                labels[path.stem] = result.label
                scores[path.stem] = result.score

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return asdict(InferenceResult(
        runtime=args.runtime, threads=args.threads, startup_s=startup, load_s=classifier.load_seconds,
        single_image_s=single_image_time(singles, throughput.get(1)), single_image_after_pause_s=after_pause,
        prepare_s=statistics.median(prepare_times),
        throughput=throughput, peak_rss_mb=peak_kb / 1024, labels=labels, scores=scores,
        core_ms_per_image=core_ms, started_late_s=started_late_s,
    ))


def _batch_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(part) for part in text.split(","))
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive: {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m bench.inference")
    parser.add_argument("--runtime", choices=("openvino", "tensorflow"), required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--min-seconds", type=float, default=2.5)
    parser.add_argument("--batches", type=_batch_sizes, default=BATCH_SIZES,
                        help="the batch sizes to measure, comma-separated (default: all)")
    parser.add_argument("--labels", action="store_true", help="also print the top-1 label of every image")
    parser.add_argument("--start-at", type=float, help="wall-clock time to begin one throughput round at "
                        "(processes measured side by side)")
    parser.add_argument("--t0", type=float, required=True, help="wall-clock time the parent started us")
    args = parser.parse_args(argv)
    result = _child(args)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
