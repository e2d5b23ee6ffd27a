#!/usr/bin/env python3
"""Load test for the image-classification web tier.

Uploads images concurrently to one web tier, checks every answer, and prints
latency, throughput and correctness:

    python load_test.py --images ./imagenet-100 --num-requests 1000 --concurrency 50 \\
        --expected "Classification Results on ImageNet-100.csv" --json run.json --plot run.png

By default each request is `POST /` with the image in form field `inputFile`,
and the answer is `<name>:<label>`. With `--api jobs` each image is one
`POST /api/jobs` batch whose result is awaited by polling `GET /api/jobs/<id>`
(or, with `--wait sse`, its event stream); it names its batch and gives its file
a token, so one whose answer was cut off is sent again without being stored
twice. Meanwhile `GET /api/status` is read
every half second to record how many app-tier instances were pending or running.

It only talks to the URL it is given, sends a bounded number of requests, and
gives each one at most `--timeout` seconds. The exit code is 0 when every
request was answered, no answer was wrong and, with --expected, at least one was
checked; 1 otherwise (or when a report asked for with --json or --plot could not
be written); 2 on bad usage (also an --expected CSV naming none of the images sent,
or no API key for a web tier whose /api/status says uploads need one).

Ctrl-C stops sending and waits for the requests in flight; a second one quits at
once, still printing what was answered so far (and writing --json and --plot).
SIGTERM (`timeout`, a CI job cancelled) quits at once so.

The core (`run_load`, `percentile`, `read_expected`, `format_report`) is
importable, from here or from the package `loadtest` (one module per idea);
`main` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest.config import DEFAULT_TIMEOUT_S, DEFAULT_URL, Config, LoadTestError
from loadtest.names import IMAGE_SUFFIXES, image_key, read_expected, scan_folder, sendable_name
from loadtest.outcomes import Outcome, percentile  # noqa: F401 -- percentile: importable here (see above)
from loadtest.plot import write_plot
from loadtest.report import UNTRAINED_WARNING, failure_lines, format_report, result_line, write_json
from loadtest.run import Progress, Terminated, run_load

# --- the command line ---------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="load_test.py",
        description="Send concurrent uploads to the web tier and report latency, throughput "
        "and correctness.",
        # Abbreviations would make '--num' ambiguous between the spellings below.
        allow_abbrev=False,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"web tier address (default {DEFAULT_URL})")
    parser.add_argument(
        "--images", "--image_folder", "--image-folder", dest="images", type=Path, required=True,
        metavar="DIR", help="folder of images to upload (the files directly in it; folders not searched)",
    )
    parser.add_argument(
        "--num-requests", "--num_request", "--num_requests", dest="num_requests",
        type=_positive_int, metavar="N",
        help="requests to send (default: one per image; cycles through the images when larger)",
    )
    parser.add_argument(
        "--concurrency", "-c", type=_positive_int, default=10, metavar="C",
        help="requests in flight at once (default 10)",
    )
    parser.add_argument(
        "--expected", type=Path, metavar="CSV",
        help="expected labels, columns Image,Results (Image = file name without extension)",
    )
    parser.add_argument(
        "--api", choices=("form", "jobs"), default="form",
        help="'form': POST / and wait (default); 'jobs': POST /api/jobs then wait for the item",
    )
    parser.add_argument("--jobs", dest="api", action="store_const", const="jobs", help="same as --api jobs")
    parser.add_argument(
        "--wait", choices=("poll", "sse"),
        help="with --api jobs: poll GET /api/jobs/<id> (default) or follow its event stream",
    )
    parser.add_argument(
        "--idempotency-keys", action="store_true",
        help="POST / only: send each image with an Idempotency-Key, and send it again if its connection "
             "is cut before the answer (without a key, it may be stored already: it is counted failed)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("API_KEY", ""),
        help="sent as X-API-Key (default: $API_KEY, the variable the web tier reads)",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"give up on one request after this long (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", dest="json_path", type=Path, metavar="PATH", help="write a JSON report")
    parser.add_argument(
        "--plot", dest="plot_path", type=Path, metavar="PNG",
        help="draw each request's latency and the app-tier instances over time",
    )
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument(
        "--verbose", "-v", action="store_true",
        help="print '<file> uploaded!' and 'Classification result: ...' for each request, "
             "both once its answer is in (as the course's client printed them)",
    )
    talk.add_argument(
        "--quiet", "-q", action="store_true",
        help="no progress bar and no table: only warnings, each reason requests failed or were "
             "not sent for (with its count), the wrong answers (with their files), and the final RESULT line",
    )
    return parser


def _output_problem(path: Path) -> str | None:
    """Why a report could not be written to `path`, or None if it can."""
    folder = path.parent  # Path("run.json").parent is Path(".")
    if path.is_dir():
        return f"{path} is a folder"
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def _plot_problem(path: Path) -> str | None:
    """Why write_plot could not draw to `path`, or None if it can."""
    try:
        figure = importlib.import_module("matplotlib.figure")
    except ImportError as exc:
        return f"it needs matplotlib, which cannot be imported ({exc})"
    suffix = path.suffix.lower().lstrip(".")
    supported = figure.Figure().canvas.get_supported_filetypes()
    if suffix and suffix not in supported:
        return f"matplotlib cannot write .{suffix} files (it writes {', '.join(sorted(supported))})"
    return None


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not re.match(r"^https?://", args.url):
        parser.error(f"--url must start with http:// or https://, got {args.url!r}")
    try:
        urlsplit(args.url).port  # noqa: B018 -- raises for a port that is not one (':80a', ':99999')
    except ValueError as exc:
        parser.error(f"--url {args.url!r}: {exc}")
    if not urlsplit(args.url).hostname:
        parser.error(f"--url {args.url!r} names no host")
    # Checked now, not when the run is over: a long run should not end in a traceback
    # because of a typo in a folder name or a missing matplotlib.
    for option, path in (("--json", args.json_path), ("--plot", args.plot_path)):
        if path is not None and (problem := _output_problem(path)):
            parser.error(f"cannot write {option} {path}: {problem}")
    if (args.json_path is not None and args.plot_path is not None
            and args.json_path.resolve() == args.plot_path.resolve()):
        # The plot would be written over the JSON report, the run's figures lost.
        parser.error(f"--json and --plot name the same file ({args.json_path}): give each its own")
    if args.plot_path is not None and (problem := _plot_problem(args.plot_path)):
        parser.error(f"cannot draw --plot {args.plot_path}: {problem}")
    if args.wait is not None and args.api != "jobs":
        parser.error("--wait applies to --api jobs (POST / waits for its own answer)")
    if args.idempotency_keys and args.api != "form":
        # Accepted, it changed nothing: a batch sends no key, and needs none.
        parser.error("--idempotency-keys applies to POST / (--api jobs names each upload's batch and "
                     "token, so one cut off is always sent again without being stored twice)")
    return Config(
        images=args.images,
        url=args.url.rstrip("/"),
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        expected=args.expected,
        api=args.api,
        wait=args.wait or "poll",
        idempotency_keys=args.idempotency_keys,
        api_key=args.api_key,
        timeout=args.timeout,
        json_path=args.json_path,
        plot_path=args.plot_path,
        verbose=args.verbose,
        quiet=args.quiet,
    )


# --- inputs -------------------------------------------------------------------------


def say_what_is_left_out(config: Config, images: list[Path], skipped: int, expected: dict[str, str]) -> None:
    """On stderr: the `skipped` entries of the folder that are not sent, and rows of
    `expected` that name none of `images`, each of which a run would otherwise leave out
    without a word (the command's; `make bench` gives run_load a CSV for more images
    than it sends)."""
    if skipped:
        print(f"load_test.py: {skipped} entries of {config.images} left out: not image files "
              f"({', '.join(sorted(IMAGE_SUFFIXES))}) directly in it, or hidden (named .*)",
              file=sys.stderr)
    # The names as sent and judged: a name that is not UTF-8 is sent with U+FFFD.
    unused = len(set(expected) - {image_key(sendable_name(p)) for p in images})
    if unused:
        print(f"load_test.py: {unused} rows of {config.expected} name no image in {config.images}",
              file=sys.stderr)


# --- output -------------------------------------------------------------------------


# Terminal controls (ESC starts every escape sequence) and the characters that make
# text read in another order: a broken or hostile server's answer printed raw could
# clear the screen or retitle the window (reviewer).
_TERMINAL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0))
                     if chr(c) not in "\n\t"}
_TERMINAL_ESCAPES.update({ord(c): f"\\u{ord(c):04x}" for c in
                          "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"})


def for_terminal(text: str) -> str:
    """`text` with control characters written as escapes (newlines and tabs kept)."""
    return text.translate(_TERMINAL_ESCAPES)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """While inside, SIGTERM (`timeout`, `kill`, a CI job cancelled) acts as two Ctrl-Cs
    do: sending stops, the requests in flight are left unanswered, and what was done is
    reported and written at once, as the grace period before a SIGKILL is short.
    Unhandled, it killed the run with no report and no JSON (reviewer)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a handler (a caller running main in a thread)
        return

    def interrupt(signum: int, frame: Any) -> None:
        # Python runs handlers in the main thread: run_load hears it as a KeyboardInterrupt.
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        # None: a handler not set from Python, which cannot be given back; the default then.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Stdout:
    """The run's lines on standard output, until whoever reads them stops (`| head -3`):
    from then on they are dropped, and the run goes on to its report files and exit
    status. A BrokenPipeError from a print ended the run with a traceback, sending
    stopped and no JSON written (reviewer)."""

    def __init__(self) -> None:
        self.gone = False

    def print(self, text: str = "") -> None:
        if self.gone:
            return
        try:
            # Flushed at once: a pipe's buffer flushed only at exit would break there,
            # past any handler.
            print(text, flush=True)
        except BrokenPipeError:
            self.gone = True
            try:
                # Python flushes stdout again at exit, and would report that broken pipe
                # too: what is left in its buffer goes nowhere instead.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):  # a stdout with no file behind it (a test's capture)
                pass


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    out = Stdout()
    try:
        # Read once, here: run_load is given them, so its plan is what the progress bar counts.
        images, skipped = scan_folder(config.images)
        expected = read_expected(config.expected) if config.expected else {}
        say_what_is_left_out(config, images, skipped, expected)
    except LoadTestError as exc:
        print(f"load_test.py: {exc}", file=sys.stderr)
        return 2
    progress = Progress(config.num_requests or len(images), enabled=not config.quiet)

    def print_result(outcome: Outcome) -> None:
        # The course's client printed these two lines per image.
        progress.clear()
        out.print(for_terminal(f"{outcome.file} uploaded!"))
        out.print(for_terminal(f"Classification result: {outcome.body}"))

    try:
        with sigterm_as_ctrl_c():
            report = run_load(config, progress=progress, on_result=print_result if config.verbose else None,
                              images=images, expected=expected)
    except LoadTestError as exc:
        print(f"load_test.py: {exc}", file=sys.stderr)
        return 2

    if config.quiet:
        if report.untrained:
            out.print(UNTRAINED_WARNING)
        for line in failure_lines(report):
            out.print(for_terminal(line))
        out.print(result_line(report))
    else:
        out.print(for_terminal(format_report(report)))
    # The summary is out already: a report that cannot be written (its folder
    # removed during the run, a full disk) is said so, not a traceback.
    written = True
    outputs = (("JSON report", config.json_path, write_json), ("plot", config.plot_path, write_plot))
    for what, path, write in outputs:
        if path is None:
            continue
        try:
            write(report, path)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"load_test.py: cannot write the {what} to {path}: {reason}", file=sys.stderr)
            written = False
    return 0 if report.ok and written else 1


if __name__ == "__main__":
    sys.exit(main())
