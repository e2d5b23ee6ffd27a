#!/usr/bin/env python3
"""Load test for the image-classification web tier.

Uploads images concurrently to one web tier, checks every answer, and prints
latency, throughput and correctness:

    python load_test.py --images ./imagenet-100 --num-requests 1000 --concurrency 50 \\
        --expected "Classification Results on ImageNet-100.csv" --json run.json --plot run.png

By default each request is `POST /` with the image in form field `inputFile`,
and the answer is `<name>:<label>`. With `--api jobs` each image is one
`POST /api/jobs` batch whose result is awaited on its event stream
`GET /api/jobs/<id>/events` (or, with `--wait poll`, by polling `GET /api/jobs/<id>`,
which backs off to a poll a second: each latency may then be up to 1 s late); it
names its batch and gives its file a token, so one whose answer was cut off is sent
again without being stored twice. Meanwhile `GET /api/status` is read
every half second to record how many app-tier instances were pending or running.

It only talks to the URL it is given, sends a bounded number of requests, and
gives each one at most `--timeout` seconds. The load is a closed loop: each of the
`--concurrency` senders sends its next request once its last is answered, so the
rate is what the service answers. The run's duration includes the fleet scaling out
from the instances running at its start.

Ctrl-C stops sending and waits for the requests in flight; a second one quits at
once, still printing what was answered so far (and writing --json and --plot).
SIGTERM (`timeout`, a CI job cancelled) quits at once so. One that comes once every
request is over skips the last /api/status sample, and cuts short only a plot being
drawn: the summary and --json are finished.

Exit codes: 0 PASS, 1 FAIL, 2 bad usage or the run could not start, 130 and 143
interrupted by Ctrl-C and SIGTERM; EXIT_CODES below (the end of --help) says each.

The core (`run_load`, `percentile`, `read_expected`, `format_report`) is
importable; `main` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import math
import mimetypes
import os
import re
import signal
import socket
import sys
import threading
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import quote, urlsplit

import requests
import urllib3.response
from urllib3.exceptions import DecodeError, NewConnectionError, ProtocolError, ReadTimeoutError

if TYPE_CHECKING:  # matplotlib is imported only to plot: the script runs without it
    from matplotlib.figure import Figure

DEFAULT_URL = "http://127.0.0.1:8000"
# What the web tier accepts: JPEG (also as .jpe and .jfif, and MPO, the JPEG of 3D
# cameras), PNG, GIF, BMP, WebP, TIFF, AVIF.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".gif", ".bmp", ".webp",
                            ".tif", ".tiff", ".avif"})
# The web tier answers 504 after RESULT_TIMEOUT (300 s by default); waiting a little
# longer lets the report show the server's own answer rather than our give-up.
DEFAULT_TIMEOUT_S = 330.0
MAX_TIMEOUT_S = 86_400.0
# Open files beyond two per request in flight: the status poller's connection, the
# interpreter's own, the JSON and plot written at the end.
OPEN_FILES_SPARE = 64
CONNECT_TIMEOUT_S = 10.0
STATUS_INTERVAL_S = 0.5
STATUS_TIMEOUT_S = 2.0  # each /api/status sample's, read whole
# A fresh web tier's first /api/status waits up to 10 s on AWS (web_tier/status.py
# FIRST_READ_WAIT_S): given 2 s, the key check would take that silence for "no key needed",
# and every upload then be refused with 401.
STATUS_CHECK_TIMEOUT_S = 12.0
FINAL_STATES = ("done", "failed")

# Accepted spellings of the expected-results CSV's two columns (compared lower-cased).
IMAGE_COLUMNS = ("image", "images", "image_name", "filename", "file", "name")
RESULT_COLUMNS = ("results", "result", "label", "labels", "prediction", "class")


class LoadTestError(Exception):
    """A problem with the inputs (no images, unreadable CSV): nothing was sent."""


class UnreadableImage(Exception):
    """One request's image file could not be read (deleted or made unreadable mid-run):
    that request sent nothing; the message is the system's reason."""


# --- configuration ------------------------------------------------------------------


@dataclass
class Config:
    images: Path
    url: str = DEFAULT_URL
    num_requests: int | None = None  # None: one request per image
    concurrency: int = 10
    expected: Path | None = None
    api: str = "form"  # "form": POST / ; "jobs": POST /api/jobs
    wait: str = "sse"  # jobs only: "sse" follows GET /api/jobs/<id>/events, or "poll" GET /api/jobs/<id>
    # POST / only: an Idempotency-Key per image, so that one whose connection was cut
    # is sent again without being classified twice (off by default: the web tier then
    # looks for the key in S3, a cost the benchmark does not want to measure)
    idempotency_keys: bool = False
    api_key: str = ""
    timeout: float = DEFAULT_TIMEOUT_S
    json_path: Path | None = None
    plot_path: Path | None = None
    verbose: bool = False
    quiet: bool = False
    status_interval: float = STATUS_INTERVAL_S


# What --help says after its first line; its lines are kept as they are, as the epilog's.
HOW_IT_LOADS = """\
Send concurrent uploads to the web tier and report latency, throughput and correctness.

The load is a closed loop: each of --concurrency senders sends its next request once
its last is answered, so at most C are in flight and the rate is what the service
answers, not one asked of it. The total duration (and so the throughput and the
course's average) includes the fleet scaling out from the app-tier instances running
at the start (the table says how many those were).
"""

# What --help ends with.
EXIT_CODES = """\
exit codes:
  0    PASS: every request answered, none wrong (with --expected, at least one checked)
  1    a request failed, was wrong or was not sent; or --json or --plot could not be written
  2    bad usage (also an --expected CSV naming none of the images sent), or the run could
       not start: nothing listening at --url, its TLS handshake failed (https:// to a plain
       HTTP port), an API key needed and none given, or the key refused
  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM: what was done is still reported,
       and written to --json and --plot (once every request is over, a plot being drawn
       is cut short)
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _timeout(text: str) -> float:
    value = float(text)
    # A socket's timeout past what the platform's clock holds (inf, 1e10) failed every
    # request with an OverflowError, each counted sent.
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_TIMEOUT_S:g} (a day), "
                                         f"got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="load_test.py",
        description=HOW_IT_LOADS,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the description's and epilog's lines kept
        # Abbreviations would make '--num' ambiguous between the spellings below.
        allow_abbrev=False,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"web tier address (default {DEFAULT_URL})")
    parser.add_argument(
        "--images", "--image_folder", "--image-folder", dest="images", type=Path, required=True,
        metavar="DIR", help="folder of images to upload (the files directly in it; folders not searched)",
    )
    parser.add_argument(
        "--num-requests", "-n", "--num_request", "--num_requests", dest="num_requests",
        type=_positive_int, metavar="N",
        help="requests to send (default: one per image; cycles through the images when larger)",
    )
    parser.add_argument(
        "--concurrency", "-c", type=_positive_int, default=10, metavar="C",
        help="requests in flight at once (default 10); each sender sends its next once its last is answered",
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
        "--wait", choices=("sse", "poll"),
        help="with --api jobs: 'sse' follows GET /api/jobs/<id>/events (default; a stream the web tier "
             "refuses falls back to polling); 'poll' polls GET /api/jobs/<id>, backing off to once a "
             "second, so each latency may be up to 1 s late",
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
        "--timeout", type=_timeout, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
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
        help="print '<file> uploaded!' and 'Classification result: ...' for each request answered, "
             "both once its answer is in (as the course's client printed them), '<file> failed: <why>' "
             "for one that failed, and '<file> not sent: <why>' for one that was not",
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
    if path.exists():
        # Written in place: its folder need not be writable (`--json /dev/stdout` as a
        # user who may not write /dev was refused).
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
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
    for action in parser._actions:
        # Python 3.11's argparse gives an option whose value is `--` (`--num-requests=--`)
        # [] without calling its type: a traceback later (as common/cli.py checks).
        if action.option_strings and action.nargs is None and getattr(args, action.dest, None) == []:
            parser.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
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
    # Stripped, as the web tier strips its own (common/config.py): else " s3cret" cannot
    # be sent, and each upload fails naming the key in the report.
    args.api_key = args.api_key.strip()
    if not re.fullmatch(r"[\x20-\x7e]*", args.api_key):
        # An HTTP header carries printable ASCII: a key pasted with a curly quote or a
        # non-breaking space would crash the key check with a traceback.
        parser.error("the API key (--api-key or $API_KEY) holds a character an HTTP header cannot carry "
                     "(printable ASCII only): type it again")
    return Config(
        images=args.images,
        url=args.url.rstrip("/"),
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        expected=args.expected,
        api=args.api,
        wait=args.wait or "sse",
        idempotency_keys=args.idempotency_keys,
        api_key=args.api_key,
        timeout=args.timeout,
        json_path=args.json_path,
        plot_path=args.plot_path,
        verbose=args.verbose,
        quiet=args.quiet,
    )


# --- inputs -------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, not hidden, in name order (so runs are repeatable)."""
    return scan_folder(folder)[0]


def a_few(names: list[str]) -> str:
    """The first three of `names`, for a terminal, and "..." if there are more."""
    return ", ".join(for_terminal(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")


def scan_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """list_images's images, and the names of the folder's other entries (sorted), from
    one listing (two could disagree about a folder that changes meanwhile)."""
    if not folder.is_dir():
        raise LoadTestError(f"{folder} is not a folder")
    try:
        entries = list(folder.iterdir())
        # Hidden files are skipped, as the upload page skips them: macOS's "._cat.jpg"
        # beside cat.jpg holds the file's metadata, not an image.
        images = sorted((p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                         and not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as exc:  # a folder that cannot be listed (no permission): a usage error, not a traceback
        raise LoadTestError(f"cannot list {folder}: {exc.strerror or exc}") from exc
    if not images:
        # Its subfolders named: it looks in none, which would leave a folder of folders a puzzle.
        inside = sorted(sendable_name(p) for p in entries if p.is_dir() and not p.name.startswith("."))
        named = a_few(inside)
        raise LoadTestError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}"
                            + (f" (subfolders are not looked in: {named})" if inside else ""))
    sent = set(images)
    return images, sorted(sendable_name(p) for p in entries if p not in sent)


def open_files_warning(concurrency: int) -> str | None:
    """Raises this process's limit on open files as far as `concurrency` needs and the
    hard limit allows; a warning if that is still too few, else None. At the usual
    1,024, -c 500 and more failed requests with "Too many open files", each tried again
    for 30 s as if the server could not be reached."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return None
    # A connection to send on, one to follow (--jobs), a file read at a time, and a spare.
    needed = 2 * concurrency + OPEN_FILES_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft >= needed:
        return None
    return (f"--concurrency {concurrency} needs about {needed} open files and this process may open "
            f"{soft} (ulimit -n): some requests may fail with 'Too many open files'; lower -c or "
            "raise the hard limit")


def say_what_is_left_out(config: Config, images: list[Path], skipped: list[str],
                         expected: dict[str, str]) -> None:
    """On stderr: the `skipped` entries of the folder, which are not sent, and rows of
    `expected` that name none of `images`, each of which a run would otherwise leave out
    without a word (the command's; `make bench` gives run_load a CSV for more images
    than it sends)."""
    if skipped:
        # A few named: the count alone would leave the user to guess which.
        named = a_few(skipped)
        print(f"load_test.py: {len(skipped)} entries of {config.images} left out ({named}): not image "
              f"files ({', '.join(sorted(IMAGE_SUFFIXES))}) directly in it, or hidden (named .*)",
              file=sys.stderr)
    # The names as sent and judged: a name that is not UTF-8 is sent with U+FFFD.
    unused = sorted(set(expected) - {image_key(sendable_name(p)) for p in images})
    if unused:
        # A few named, as the entries left out are: the count alone left the user to search the CSV.
        named = a_few(unused)
        print(f"load_test.py: {len(unused)} rows of {config.expected} name no image in {config.images} "
              f"({named})", file=sys.stderr)


def sendable_name(path: Path) -> str:
    """The file's name as it is sent and reported: a name that is not UTF-8 (bytes
    Python keeps as surrogates) has them as U+FFFD. Sent as they are, they would stop
    the whole run with a UnicodeEncodeError, no report written."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def image_key(name: str) -> str:
    """'test_00.JPEG', 'dir/test_00' and 'test_00' all become 'test_00'.

    In NFC: a name copied from a Mac spells 'é' as 'e' and a combining accent (NFD),
    which a CSV typed elsewhere spells as one character, and the row would go unmatched.
    Without spaces at either end of the stem: a CSV's cells are read stripped, so that
    ' trail .jpg' could otherwise be named by no row (and the web tier trims names too)."""
    base = re.split(r"[\\/]", unicodedata.normalize("NFC", name.strip()))[-1]
    stem, dot, suffix = base.rpartition(".")
    if dot and stem.strip() and f".{suffix.lower()}" in IMAGE_SUFFIXES:
        return stem.strip()
    return base.strip()


def read_expected(path: Path) -> dict[str, str]:
    """Expected label per image key from a CSV with a header row.

    The course's file has columns `Image,Results`; other spellings
    (`image,result`, `filename,label`, ...) and a UTF-8 byte-order mark are
    accepted too, and Image may carry an extension. A row without an image or a
    label, or naming an image again with another label, is refused with its line
    number: skipped, it would leave that image "unchecked" and the run a PASS. So is
    one with more cells than the header (a name with an unquoted comma).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            # A space after a comma is no part of the cell: `img0, "shield"` kept its quotes
            # (a label '"shield"', counted wrong), and `"a", "b, c"` read as 3 cells.
            reader = csv.reader(fh, skipinitialspace=True)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LoadTestError(f"cannot read {path} as a UTF-8 CSV: {exc}") from exc
    if not rows:
        raise LoadTestError(f"{path} is empty")
    header = [cell.strip().lower() for cell in rows[0][1]]
    image_col = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
    result_col = next((header.index(c) for c in RESULT_COLUMNS if c in header), None)
    if image_col is None or result_col is None:
        raise LoadTestError(f"{path}: expected a header with columns Image,Results, found {rows[0][1]}")
    expected: dict[str, str] = {}
    for line, row in rows[1:]:
        # Up to its last cell that holds anything: a spreadsheet's trailing commas are no cells.
        used = max(i for i, cell in enumerate(row) if cell.strip()) + 1
        if used > len(header):
            # A name with an unquoted comma: its tail would be taken for the label.
            raise LoadTestError(f"{path}, line {line}: {used} cells where the header has {len(header)} "
                                f"({row[:used]}): a name with a comma is written in quotes (\"a, b.jpg\")")
        cells = [row[col].strip() if col < len(row) else "" for col in (image_col, result_col)]
        if not all(cells):
            raise LoadTestError(f"{path}, line {line}: no {'image' if not cells[0] else 'label'} in {row}")
        key, label = image_key(cells[0]), cells[1]
        if key in expected and not same_label(expected[key], label):
            raise LoadTestError(f"{path}, line {line}: {key} is expected as {expected[key]!r} "
                                f"above and as {label!r} here")
        expected[key] = label
    return expected


def same_label(a: str, b: str) -> bool:
    """Keras writes 'great_white_shark', other lists 'great white shark': both are one label."""

    def norm(label: str) -> str:
        return " ".join(label.replace("_", " ").split()).casefold()

    return norm(a) == norm(b)


# How the web tier spells a file's name back. Copied from the project (this script
# is one file that imports nothing of it); tests/unit/test_load_test.py checks each
# copy against the original.

# requests (urllib3) writes these three characters percent-encoded in a multipart
# header's filename="...", as the HTML standard says.
_MULTIPART_ESCAPES = {ord("\n"): "%0A", ord("\r"): "%0D", ord('"'): "%22"}
_MAX_DISPLAY_NAME = 1024  # web_tier/filenames.py MAX_FILENAME_CHARS
_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})  # web_tier/filenames.py
# web_tier/filenames.py DROPPED_CHARACTERS: the bidirectional-text controls, and
# characters that show nothing (a BOM, a zero-width space, a soft hyphen, tag characters, ...).
_DROPPED_CHARACTERS = ("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                       "\u00ad\u180e\u200b\u2060\u2061\u2062\u2063\u2064\ufeff"
                       "\u115f\u1160\u3164\uffa0\u206a\u206b\u206c\u206d\u206e\u206f"
                       "\ufff9\ufffa\ufffb" + "".join(map(chr, range(0x1D173, 0x1D17B)))
                       + "".join(map(chr, range(0x1BCA0, 0x1BCA4))) + "\U000e0001"
                       + "".join(map(chr, range(0xE0020, 0xE0080))))
_DROPPED = dict.fromkeys(map(ord, _DROPPED_CHARACTERS))
_MAX_EXTENSION_CHARS = 16  # common/names.py MAX_EXTENSION_CHARS
_MAX_META_FILENAME = 1740  # common/names.py MAX_META_FILENAME


def received_name(filename: str) -> str:
    """The name the web tier reads for a file uploaded as `filename`.

    Werkzeug reads filename="..." as an HTTP quoted string, so a backslash escapes
    the next character ('back\\slash.jpg' becomes 'backslash.jpg') and %22 is a
    quote; the web tier then drops bidirectional-text controls and characters that
    show nothing (a BOM, a zero-width space, a soft hyphen), turns control
    characters (tab, ...) and line and paragraph separators into spaces, trims the
    ends, and cuts a long name before its extension (web_tier/filenames.py clean_name).
    """
    wire = filename.translate(_MULTIPART_ESCAPES)
    parsed = re.sub(r"\\(.)", r"\1", wire, flags=re.ASCII).replace("%22", '"')
    shown = "".join(" " if unicodedata.category(c) in _LINE_BREAKING else c
                    for c in parsed.translate(_DROPPED))
    shown = shown.strip()
    if len(shown) > _MAX_DISPLAY_NAME:
        kept = _kept_extension(shown)
        shown = shown[:_MAX_DISPLAY_NAME - len(kept)] + kept
    return _fit_metadata(shown) or "upload"


def _kept_extension(name: str) -> str:
    # common/names.py kept_extension
    head, dot, extension = name.rpartition(".")
    return dot + extension if head and len(extension) <= _MAX_EXTENSION_CHARS else ""


def _fit_metadata(name: str) -> str:
    # common/names.py encode_filename, decoded: the name cut, in whole characters and
    # before its extension, to what S3 metadata holds percent-encoded.
    if len(quote(name, safe="")) <= _MAX_META_FILENAME:
        return name
    kept = _kept_extension(name)
    room, body = _MAX_META_FILENAME - len(quote(kept, safe="")), []
    for char in name[:len(name) - len(kept)]:
        size = len(quote(char, safe=""))
        if size > room:
            break
        body.append(char)
        room -= size
    return "".join(body) + kept


def name_stem(filename: str) -> str:
    """The web tier's stem (common/names.py): 'a.b.JPEG' -> 'a.b', '.jpg' -> '.jpg',
    'photos.v2/cat' -> 'photos.v2/cat'."""
    cut = max(filename.rfind("/"), filename.rfind("\\")) + 1
    folder, name = filename[:cut], filename[cut:]
    head, dot, _ = name.rpartition(".")
    return folder + head if dot and head.strip(".") else filename


def answer_names(filename: str) -> set[str]:
    """Every name (without extension) POST / may answer for a file sent as `filename`:
    the name as the web tier read it (its answer is always that request's own), and
    the name exactly as sent, for a tier that keeps it.

    An item read from /api/jobs may carry other spellings (cut to fit a queue
    message, or the cleaned name it was stored under, for a batch rebuilt from S3),
    but it is fetched by its id, and that is trusted instead (see judge): accepted
    here, the cleaned name let every all-non-ASCII name ('猫.jpg', '犬.jpg': 'image')
    pass for any other.
    """
    return {name_stem(filename), name_stem(received_name(filename))}


def same_name(answer: str, filename: str) -> bool:
    """Whether `answer` names the file sent as `filename` (an answer for another file
    means the web tier handed one request's result to another)."""
    return answer in answer_names(filename)


# --- statistics ---------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100), interpolating linearly between ranks.

    Same definition as numpy's default: for [1, 2, 3, 4] the 50th is 2.5.
    None for no values.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 (numpy's linear definition), max and mean, in the units given; None when empty."""
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


# --- results ------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one request."""

    index: int
    file: str
    started_s: float | None  # since the run began (None: never started, the run interrupted first)
    latency_s: float = 0.0
    status: int | None = None
    answer_name: str | None = None
    label: str | None = None
    error: str | None = None  # set: the request failed (HTTP error, timeout, bad answer)
    untrained: bool = False
    # "correct", "wrong", "unchecked", "failed" (it reached the web tier), "not sent" (it never
    # did), or, in an interrupted run, "abandoned" (in flight when it quit) or "not started"
    verdict: str = "unchecked"
    expected: str | None = None
    note: str | None = None  # why a verdict is "wrong"
    resent: int = 0  # times sent again (see RESEND_WINDOW_S)
    via: str | None = None  # where its answer was read, when not from its own response
    # How its result was awaited, when not in its own response: "events" (its stream) or
    # "poll" (GET /api/jobs/<id>, up to 1 s between polls: its latency that much late).
    awaited: str | None = None
    by_id: bool = False  # its answer is the item fetched by its id: its name is not checked
    unreadable: bool = False  # not sent as its file could not be read, not for want of a connection
    # It reached the web tier: answered, or cut off once connected (never, if every
    # attempt was refused, timed out connecting or failed its TLS handshake).
    # None: not known (an attempt under way; abandoned in flight then, the report cannot
    # tell how far it had got).
    reached: bool | None = False

    @property
    def answered(self) -> bool:
        return self.error is None

    @property
    def body(self) -> str:
        return f"{self.answer_name}:{self.label}" if self.answered else f"ERROR {self.error}"


def judge(outcome: Outcome, expected: dict[str, str]) -> None:
    """Set the outcome's verdict against the expected labels."""
    if not outcome.answered:
        # One that never reached the web tier is counted not sent, not also failed: a
        # server gone for good would make "failed" count requests no server ever saw.
        outcome.verdict = "failed" if outcome.reached else "not sent"
        return
    outcome.expected = expected.get(image_key(outcome.file))
    if (outcome.answer_name is not None and not outcome.by_id
            and not same_name(outcome.answer_name, outcome.file)):
        # An answer naming another image was handed to the wrong request.
        outcome.verdict = "wrong"
        outcome.note = f"answer is for {outcome.answer_name!r}"
        if outcome.answer_name in (outcome.file, received_name(outcome.file)):
            # Another server's, most likely: "is for 'a.jpg'", said of a.jpg, reads as a contradiction.
            outcome.note = (f"answer names the file with its extension ({outcome.answer_name!r}), where "
                            "POST / answers '<name without extension>:<label>'")
    elif outcome.expected is None:
        outcome.verdict = "unchecked"
    elif same_label(outcome.label or "", outcome.expected):
        outcome.verdict = "correct"
    else:
        outcome.verdict = "wrong"
        outcome.note = f"expected {outcome.expected!r}"


@dataclass
class Report:
    url: str
    api: str
    concurrency: int
    planned: int
    started_at: float  # wall clock, seconds since the epoch
    duration_s: float
    outcomes: list[Outcome]
    # (seconds since the run began, app-tier instances pending or running)
    instance_samples: list[tuple[float, int]] = field(default_factory=list)
    interrupted_by: str | None = None  # "SIGINT" (Ctrl-C), "SIGTERM", or None: not interrupted
    # One that came only once every request was over, while the last /api/status sample
    # was taken: that sample is skipped, no request lost to it, and the run not said
    # interrupted; the command still exits as the signal says (130, 143).
    signal_after_sending: str | None = None
    # Why the run was stopped short by run_load's `stop_at` (a caller's time limit), not by
    # a signal: its requests in flight abandoned, the rest not started; None if it was not.
    cut_short: str | None = None
    idempotency_keys: bool = False  # uploads cut off mid-request were sent again too
    # Answers were to be checked against an --expected CSV: a run that checked none is no PASS.
    checked_against_csv: bool = False
    wait: str | None = None  # --api jobs: how results were awaited ("sse" or "poll")

    @property
    def interrupted(self) -> bool:
        return self.interrupted_by is not None

    def _count(self, verdict: str) -> int:
        return sum(1 for o in self.outcomes if o.verdict == verdict)

    @property
    def sent(self) -> int:
        """Requests sent: those that reached the web tier (answered or not), and those
        abandoned in flight (which may have). One that never connected sent nothing."""
        return sum(1 for o in self.outcomes if o.reached or o.verdict == "abandoned")

    @property
    def abandoned(self) -> int:
        """Requests in flight when the run quit (a second Ctrl-C, SIGTERM), left unanswered."""
        return self._count("abandoned")

    @property
    def not_sent(self) -> int:
        """Requests that never reached the web tier: never connected (see `unreached`),
        or never started (the run interrupted first)."""
        return self.planned - self.sent

    @property
    def unreached(self) -> int:
        """Requests tried that never connected (refused, unreachable, failed TLS)."""
        return self._count("not sent") - self.unreadable

    @property
    def unreadable(self) -> int:
        """Requests not sent as their file could not be read (deleted mid-run)."""
        return sum(1 for o in self.outcomes if o.verdict == "not sent" and o.unreadable)

    @property
    def answered(self) -> int:
        return sum(1 for o in self.outcomes if o.answered)

    @property
    def failed(self) -> int:
        """Requests that reached the web tier and got no usable answer (never more than `sent`)."""
        return self._count("failed")

    @property
    def wrong(self) -> int:
        return self._count("wrong")

    @property
    def correct(self) -> int:
        return self._count("correct")

    @property
    def unchecked(self) -> int:
        return self._count("unchecked")

    @property
    def untrained(self) -> bool:
        """Labels came from an untrained model. Every answer of such a service says so, its
        refusals too: a run with no label (all 401s) must not warn of labels it never had."""
        return any(o.untrained and o.answered for o in self.outcomes)

    @property
    def resent(self) -> int:
        """Times requests that reached the web tier were sent again. One that never connected
        was only tried again: its tries would make "sent again" count requests never sent."""
        return sum(o.resent for o in self.outcomes if o.reached)

    @property
    def answered_later(self) -> int:
        """Answered from /api/jobs, after a 503 or 504 said the image was queued."""
        return sum(1 for o in self.outcomes if o.via and o.answered)

    @property
    def polled(self) -> int:
        """Answered requests whose result was polled for: their latencies may be up to 1 s late."""
        return sum(1 for o in self.outcomes if o.awaited == "poll" and o.answered)

    @property
    def latencies(self) -> list[float]:
        # Failures are left out: a timeout's "latency" is only how long we waited.
        return [o.latency_s for o in self.outcomes if o.answered]

    def latency_stats(self) -> dict[str, float | None]:
        return latency_summary(self.latencies)

    @property
    def throughput(self) -> float:
        """Answered images per second of wall-clock time."""
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def course_average_latency(self) -> float | None:
        """The course's figure: total duration divided by the number of requests sent
        that ended (None when nothing was answered: it would measure only how fast they
        failed; abandoned ones did not end within the duration, and those never sent
        were not requests the web tier saw: counted, a dead web tier made it look fast)."""
        ended = self.sent - self.abandoned
        return self.duration_s / ended if self.answered and ended else None

    @property
    def peak_instances(self) -> int | None:
        return max((n for _, n in self.instance_samples), default=None)

    @property
    def lowest_instances(self) -> int | None:
        """The fewest seen: a fleet that scales in to 0 and out again mid-run peaks where
        it began, and its table would say nothing of the gap."""
        return min((n for _, n in self.instance_samples), default=None)

    @property
    def instances_at_start(self) -> int | None:
        """The first sample's count: the fleet a run before this one left may be the peak
        (a 1-request run after a bigger one may see 7)."""
        return self.instance_samples[0][1] if self.instance_samples else None

    @property
    def checked_nothing(self) -> bool:
        """An --expected CSV was given, and not one answer was checked against it."""
        return self.checked_against_csv and self.correct + self.wrong == 0

    @property
    def ok(self) -> bool:
        return (
            not self.interrupted
            and self.cut_short is None
            and self.sent == self.planned
            and self.failed == 0
            and self.wrong == 0
            and not self.checked_nothing
        )

    def to_dict(self, with_requests: bool = True) -> dict[str, Any]:
        summary = {
            "url": self.url,
            "api": self.api,
            "wait": self.wait,
            "idempotency_keys": self.idempotency_keys,
            "concurrency": self.concurrency,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "planned": self.planned,
            "sent": self.sent,
            "not_sent": self.not_sent,
            "answered": self.answered,
            "failed": self.failed,
            "wrong": self.wrong,
            "correct": self.correct,
            "unchecked": self.unchecked,
            "throughput_images_per_s": self.throughput,
            "latency_s": self.latency_stats(),
            "course_average_latency_s": self.course_average_latency,
            "untrained": self.untrained,
            "peak_instances": self.peak_instances,
            "instances_at_start": self.instances_at_start,
            "lowest_instances": self.lowest_instances,
            "interrupted": self.interrupted,
            "interrupted_by": self.interrupted_by,
            "cut_short": self.cut_short,
            "abandoned": self.abandoned,
            "answered_later": self.answered_later,  # the table's "answered later"
            "polled": self.polled,  # the table's "awaited by polling"
            "resent": self.resent,
            "ok": self.ok,
            "instances": [{"t_s": t, "pending_running": n} for t, n in self.instance_samples],
        }
        if with_requests:
            summary["requests"] = list(self.request_rows())
        return summary

    def request_rows(self) -> Iterator[dict[str, Any]]:
        """Each request's row of the JSON report, in the order they were planned."""
        for o in sorted(self.outcomes, key=lambda o: o.index):
            yield {
                "index": o.index,
                "file": o.file,
                "started_s": o.started_s,
                # None for one that never ended: its 0.0 read as an instant answer. The
                # Outcome keeps 0.0, which bench/endtoend.py adds to started_s.
                "latency_s": None if o.verdict in ("abandoned", "not started") else o.latency_s,
                "status": o.status,
                "answer": o.answer_name,
                "label": o.label,
                "expected": o.expected,
                "verdict": o.verdict,
                "error": o.error,
                "note": o.note,
                "untrained": o.untrained,
                "resent": o.resent,
                "via": o.via,
                "awaited": o.awaited,
                "reached": o.reached,
            }


# --- talking to the web tier ----------------------------------------------------------


# What a web tier starting or stopping (or a proxy in front of it) answers meanwhile.
RESTARTING_STATUSES = (502, 503, 504)
# A web tier restarting refuses connections for a moment, and one stopping answers
# an upload it did not store with 503 and Retry-After: nothing was stored either way,
# so the upload is sent again (with --api jobs, or --idempotency-keys, also one cut
# off mid-request: its batch id and token, or its key, keep it from being stored
# twice), for up to this long (`make run` restarts a web tier within about a second,
# systemd after its RestartSec).
RESEND_WINDOW_S = 30.0
FIRST_RESEND_DELAY_S = 0.25
# How long before its request's deadline the last poll of /api/jobs goes out: time for
# one GET of a batch to be answered by a web tier that is not overloaded.
POLL_MARGIN_S = 0.05


class RequestFailed(Exception):
    """One request did not get a usable answer; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def new_session(api_key: str = "") -> requests.Session:
    """A Session that talks straight to the URL it is given.

    No proxy from the environment (the run would measure the proxy) and no
    ~/.netrc credentials: `trust_env` off. It also spares requests reading the
    whole environment on every call, measured at 0.35 ms of the load test's
    ~1.45 ms CPU per upload (300 uploads at concurrency 100, 2 cores).
    """
    session = requests.Session()
    session.trust_env = False
    if api_key:
        session.headers["X-API-Key"] = api_key
    return session


def connection_error(exc: requests.ConnectionError, url: str) -> str:
    """What went wrong with the connection, in one line: whether it could not be made
    (nothing listening, a wrong address) or was closed before the answer came (the
    web tier stopped or crashed mid-request, the image perhaps already queued)."""
    if isinstance(exc, requests.ConnectTimeout):
        return f"cannot connect to {url}: no connection within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, requests.exceptions.SSLError):
        # Not said to be closed, with "the image may be stored": it sent nothing.
        return (f"cannot connect to {url}: the TLS handshake failed (https:// to a plain HTTP port, "
                "or a certificate not trusted)")
    text = str(exc)
    # urllib3's message nests three exceptions; the errno text is the useful part.
    errno_text = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if any(sign in text for sign in ("NewConnectionError", "Failed to establish", "Failed to resolve")):
        return f"cannot connect to {url}" + (f": {errno_text[0]}" if errno_text else "")
    why = errno_text[0] if errno_text else "closed without a response"
    return f"the connection to {url} closed before the answer came: {why}"


def refused(exc: BaseException) -> bool:
    """Whether a connection error is a refused connection (nothing listening), which
    sent nothing; urllib3 keeps the OS's error a few causes down."""
    return _in_chain(exc, ConnectionRefusedError)


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc`, or an error it was raised from or wraps, is a `kind`."""
    pending, seen = [exc], set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, kind):
            return True
        links = (error.__cause__, error.__context__, getattr(error, "reason", None), *error.args)
        pending += [link for link in links if isinstance(link, BaseException)]
    return False


def never_connected(exc: BaseException) -> bool:
    """Whether a connection error came before any connection was made, so nothing was
    sent: refused, not made within CONNECT_TIMEOUT_S (a ConnectTimeout, which is a
    Timeout too, and would be reported as the whole --timeout and never sent again), or
    a name that did not resolve."""
    return isinstance(exc, requests.ConnectTimeout) or refused(exc) or _in_chain(exc, NewConnectionError)


def not_stored(resp: requests.Response) -> bool:
    """A 503 with Retry-After: the web tier stored nothing and says to send again
    (without it, a 503 may mean the image is queued: sent again, it would be classified twice)."""
    return resp.status_code == 503 and "Retry-After" in resp.headers


def retry_after_s(resp: requests.Response, default: float) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "")))
    except ValueError:  # an HTTP date: not what the web tier sends
        return default


def check_reachable(url: str) -> None:
    """Fail at once when nothing listens at `url` (a typo, a stack not started), rather
    than send every request into the resend window."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise LoadTestError(f"cannot connect to {url}: {why} (is the web tier running?)") from exc


def web_tier_status(url: str) -> dict | None:
    """What GET /api/status of the web tier at `url` answers; None for no such page, no
    answer in time, or not JSON (another server). LoadTestError when the TLS handshake
    fails: every request would fail so."""
    with new_session() as session:
        try:
            resp = session.get(f"{url}/api/status", timeout=STATUS_CHECK_TIMEOUT_S, allow_redirects=False)
            status = resp.json() if resp.status_code == 200 else None
        except requests.exceptions.SSLError as exc:
            raise LoadTestError(connection_error(exc, url)) from exc
        except (requests.RequestException, ValueError):
            return None
    return status if isinstance(status, dict) else None


def api_key_required(status: dict | None) -> bool:
    """Whether the web tier says (in its /api/status answer, `status`) that uploads need
    an API key. Unknown (None: another server, or none in time) counts as no: the run's
    failures then say why."""
    return status is not None and status.get("api_key_required") is True


def api_key_refused(url: str, api_key: str) -> bool:
    """Whether the web tier at `url` refuses `api_key`, asked with a POST /api/jobs of an
    empty form: the web tier checks the key before it reads anything (create_job's
    require_api_key), answering 401 for a wrong one, else 400 (no file), storing nothing.
    Unknown (no answer in time) counts as no, as in api_key_required."""
    empty_form = {"Content-Type": "multipart/form-data; boundary=none"}
    with new_session(api_key) as session:
        try:
            resp = session.post(f"{url}/api/jobs", data=b"", headers=empty_form,
                                timeout=STATUS_CHECK_TIMEOUT_S, allow_redirects=False)
        except requests.RequestException:
            return False
    return resp.status_code == 401


# Failures among which web_tier_restarting picks the ones that are no answer yet.
MAYBE_RESTARTING = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, RequestFailed)


def web_tier_restarting(exc: Exception) -> bool:
    """Whether a failed GET of an accepted item means only that the web tier is
    restarting (refused, cut off, 502-504): the item is kept, and the next one answers."""
    if isinstance(exc, RequestFailed):
        return exc.status in RESTARTING_STATUSES
    return isinstance(exc, MAYBE_RESTARTING)


def _error_text(resp: requests.Response) -> str:
    """The reason a JSON error answer gives (its "error", after the "filename" it names,
    as POST / words its errors), else its text, shortened."""
    try:
        answer = resp.json()
        reason, filename = answer.get("error"), answer.get("filename")
    except (ValueError, AttributeError):
        reason = filename = None
    if not (isinstance(reason, str) and reason):
        return _short(resp.text)
    if isinstance(filename, str) and filename and not reason.startswith(f"{filename}: "):
        # POST / names the file in its errors; --jobs failures do too, or they would
        # say nothing of which images failed.
        reason = f"{filename}: {reason}"
    return _short(reason)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# No answer of the web tier's is near this: POST / answers one line, GET /api/jobs/<id>
# a batch of at most MAX_FILES_PER_REQUEST items (1,000, ~500 KB), an event one item.
MAX_ANSWER_BYTES = 16 * 1024**2
MAX_EVENT_LINE_BYTES = 1024**2
_READ_BYTES = 64 * 1024


def _chunks_within(resp: requests.Response, deadline: float) -> Iterator[bytes]:
    """A streamed answer's bytes as they come, raising requests.Timeout once `deadline`
    passes. requests' read timeout bounds each read, not the answer: a server sending a
    byte a second would hold a request for ever, past --timeout. urllib3's errors
    are raised as requests' (as requests itself does)."""
    while True:
        if time.monotonic() >= deadline:
            raise requests.Timeout()
        try:
            chunk = resp.raw.read1(_READ_BYTES, decode_content=True)
        except ReadTimeoutError as exc:
            raise requests.ReadTimeout(exc) from exc
        except DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        except (ProtocolError, OSError) as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        if not chunk:
            return
        yield chunk


def read_within(resp: requests.Response, deadline: float) -> requests.Response:
    """`resp` (sent with stream=True), its body read whole by `deadline` (else
    requests.Timeout, and the connection dropped), as requests would have read it."""
    body = bytearray()
    try:
        for chunk in _chunks_within(resp, deadline):
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise RequestFailed(f"an answer of more than {MAX_ANSWER_BYTES} bytes: not the web tier's",
                                    resp.status_code)
    except BaseException:
        resp.close()
        raise
    resp._content = bytes(body)  # what .content, .text and .json() read
    return resp


def lines_within(resp: requests.Response, deadline: float) -> Iterator[str]:
    """An event stream's lines as they come, by `deadline` (see _chunks_within). A line
    past MAX_EVENT_LINE_BYTES is no event of the web tier's: a line that never ends would
    keep a whole core busy re-splitting it."""
    pending = b""
    for chunk in _chunks_within(resp, deadline):
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) > MAX_EVENT_LINE_BYTES:
            raise RequestFailed(f"an event line of more than {MAX_EVENT_LINE_BYTES} bytes: "
                                "not the web tier's")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", errors="replace")


# Terminal controls (ESC starts every escape sequence) and the characters that make
# text read in another order: a broken or hostile server's answer printed raw could
# clear the screen or retitle the window.
_TERMINAL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0))
                     if chr(c) not in "\n\t"}
_TERMINAL_ESCAPES.update({ord(c): f"\\u{ord(c):04x}" for c in
                          "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"})


def for_terminal(text: str) -> str:
    """`text` with control characters written as escapes (newlines and tabs kept)."""
    return text.translate(_TERMINAL_ESCAPES)


class Client:
    """Sends one image per call; each worker thread keeps its own Session.

    A Session per thread reuses that thread's keep-alive connection for every
    request it sends, and Sessions are not documented as thread-safe.
    """

    def __init__(self, config: Config, stop: threading.Event, abandon: threading.Event | None = None) -> None:
        self.config = config
        self.stop = stop  # set: send nothing new (the first Ctrl-C); requests in flight go on
        # Set: stop waiting for the requests in flight (the second Ctrl-C, or the run over).
        self.abandon = abandon or threading.Event()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        # Since when every connection has been refused, not made in time, or (for an
        # upload that may be sent again) cut off before its answer (None: the last was
        # answered, or the web tier answered something since): such a request is sent
        # again until RESEND_WINDOW_S from then, not for a window of its own (a dead
        # server would take 50 minutes to report at -c 10, and so would one that cuts
        # every connection).
        self._refused_since: float | None = None
        # The outcome of each thread's latest request, as it stands, by index: what a run
        # that quits reports of those in flight (whether each reached the web tier) is
        # read from it. Kept once it ends, until its thread's next: one that ends as the
        # run quits (woken from its back-off) may come too late to be recorded.
        self._live: dict[int, Outcome] = {}

    def in_flight(self) -> dict[int, Outcome]:
        """The outcomes, as they stand, of the requests being sent (and of each thread's
        last, if it ended), by index."""
        with self._lock:
            return dict(self._live)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = new_session(self.config.api_key)
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def send(self, index: int, path: Path, t0: float) -> Outcome:
        """Send `path` once and wait for its answer; never raises for a failed request."""
        start = time.monotonic()
        outcome = Outcome(index=index, file=sendable_name(path), started_s=start - t0)
        with self._lock:
            self._live.pop(getattr(self._local, "index", None), None)
            self._live[index] = outcome
        self._local.index = index
        deadline = start + self.config.timeout
        try:
            if self.config.api == "jobs":
                self._via_jobs(path, deadline, outcome)
            else:
                self._via_form(path, deadline, outcome)
        except RequestFailed as exc:
            outcome.error, outcome.status = str(exc), exc.status or outcome.status
        except requests.ConnectionError as exc:  # before Timeout: a ConnectTimeout is both
            outcome.error = connection_error(exc, self.config.url)
            if outcome.resent:
                # Tried, not "sent": one never connected sent nothing (not a "not sent" line
                # reading "sent 17 times more").
                tries = (f"sent {outcome.resent} times more" if outcome.reached
                         else f"tried {outcome.resent + 1} times")
                outcome.error += f" ({tries}, for up to {RESEND_WINDOW_S:g} s)"
            elif (self.config.api == "form" and not self.config.idempotency_keys
                  and not outcome.error.startswith("cannot connect")):
                outcome.error += " (the image may be stored; --idempotency-keys sends such uploads again)"
        except requests.Timeout:
            outcome.error = f"timeout after {self.config.timeout:g} s"
            if outcome.reached and outcome.status is None:
                # Given up on while the upload waited for its answer: the web tier may have
                # stored it and may still classify it, as with a connection cut at that point.
                # Not "--idempotency-keys sends it again": no upload is sent again past --timeout.
                outcome.error += " (the image may be stored)"
            elif self.config.api == "jobs" and outcome.status in (200, 201, 202):
                # Accepted, then waited for: the web tier holds it, and classifies it still.
                outcome.error += " (the image is stored, and queued: its result will be at /api/jobs)"
        except requests.RequestException as exc:
            outcome.error = f"{type(exc).__name__}: {_short(str(exc))}"
        except UnreadableImage as exc:
            # Said as such: counted with those that never connected, a file deleted mid-run
            # would read "refused or unreachable".
            outcome.error, outcome.unreadable = f"could not read the file: {exc}", True
        except Exception as exc:  # a failed request, whatever it was: never the whole run
            outcome.error = f"{type(exc).__name__}: {_short(str(exc))}"
        outcome.latency_s = time.monotonic() - start
        return outcome

    def _timeout(self, deadline: float) -> tuple[float, float]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise requests.Timeout()
        return (min(CONNECT_TIMEOUT_S, remaining), remaining)

    def _upload(self, path: Path) -> tuple[str, bytes, str]:
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise UnreadableImage(exc.strerror or str(exc)) from exc
        return (sendable_name(path), content, mime)

    def server_answered(self) -> None:
        """The web tier answered something (any HTTP response, to any request, the status
        poller's too): it is up, so a refusal from now on starts a new window. Only POST
        answers counted, and a POST / waits minutes for one under a backlog: a second
        brief outage 30 s after a first failed its uploads at once, none sent again."""
        self._refused_for(False)

    def _refused_for(self, refused_now: bool) -> float:
        """Note whether the server refused (or cut off) this connection; how long it has
        refused or cut off every one since (0 once one was answered)."""
        now = time.monotonic()
        with self._lock:
            if not refused_now:
                self._refused_since = None
                return 0.0
            if self._refused_since is None:
                self._refused_since = now
            return now - self._refused_since

    def _post(self, endpoint: str, files: dict, deadline: float, outcome: Outcome,
              form: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> requests.Response:
        """POST an upload; sent again while nothing was stored, or, with a `form` naming a
        batch and a token or an Idempotency-Key in `headers`, after any connection
        failure (see RESEND_WINDOW_S)."""
        stored_once = form is not None or headers is not None
        # The window runs from the first failed attempt, not from the first send: a POST /
        # waits for its classification, which under a backlog takes longer than the
        # window, and one cut off after that would never be sent again.
        give_up: float | None = None
        delay = FIRST_RESEND_DELAY_S
        unstored: requests.Response | None = None  # the last 503 that said nothing was stored
        while True:
            failure: requests.ConnectionError | None = None
            refused_since: float | None = None  # since when every connection has failed
            if unstored is not None and time.monotonic() >= deadline:
                # Its answer is the reason: "timeout (the image may be stored)" said the
                # opposite of what every answer had said.
                return unstored
            # Outside the try: its Timeout, the deadline past before sending, sent nothing, and
            # would be counted as reached by `except Exception` below (--timeout 0.001).
            timeout = self._timeout(deadline)
            if not outcome.reached:
                # Not known while the attempt goes: it may be uploading (see unfinished_outcomes).
                outcome.reached = None
            try:
                # Only ever talk to the URL we were given: no redirects.
                resp = read_within(self._session().post(
                    f"{self.config.url}{endpoint}", files=files, data=form, headers=headers,
                    timeout=timeout, allow_redirects=False, stream=True), deadline)
            except requests.ConnectionError as exc:
                handshake_failed = isinstance(exc, requests.exceptions.SSLError)
                was_refused = never_connected(exc)
                # A failed handshake sent nothing either.
                outcome.reached = outcome.reached or not (was_refused or handshake_failed)
                if handshake_failed:
                    # A handshake that failed fails again (https:// to a plain HTTP port, a
                    # certificate not trusted): tried again, 2 requests took 28.6 s to say so.
                    raise
                if not was_refused and not stored_once:
                    raise  # cut off mid-request: the image may be stored already
                failure, wait = exc, delay
                # Cut off too, not only refused: a server that cuts every connection
                # gave each request a window of its own (-n 4 -c 2 took 59.8 s).
                refused_since = time.monotonic() - self._refused_for(True)
            except Exception:
                outcome.reached = True  # connected: its answer timed out, or was not the web tier's
                raise
            else:
                outcome.reached = True
                self.server_answered()
                if resp.status_code in RESTARTING_STATUSES:
                    # A web tier stopping closes each connection after its answer: kept for
                    # the next request, it could be closed under it, the request unanswered
                    # and, without a key, not sent again.
                    self._session().close()
                if not not_stored(resp):
                    return resp
                # Never less than our own back-off: Retry-After: 0 drew 2412 POSTs in 3 s.
                unstored, wait = resp, max(retry_after_s(resp, delay), delay)
            now = time.monotonic()
            if give_up is None:  # the first failed attempt
                give_up = min(deadline, now + RESEND_WINDOW_S)
            if refused_since is not None:
                # One window for all: since the server began refusing (or cutting off)
                # every connection.
                give_up = min(give_up, refused_since + RESEND_WINDOW_S)
            # Sending stopped (the first Ctrl-C), before or during the wait: this one is
            # not sent again. Looked at only after the wait, it was POSTed once more.
            if self.stop.is_set() or now + wait >= give_up or self.stop.wait(wait):
                if failure is not None:
                    raise failure
                return resp
            outcome.resent += 1
            delay = min(2 * delay, 2.0)

    def _via_form(self, path: Path, deadline: float, outcome: Outcome) -> None:
        key = {"Idempotency-Key": str(uuid.uuid4())} if self.config.idempotency_keys else None
        resp = self._post("/", {"inputFile": self._upload(path)}, deadline, outcome, headers=key)
        outcome.status = resp.status_code
        # UTF-8, as the contract's answer is: requests reads text/plain without a charset
        # as ISO-8859-1, and '猫:tabby' became an answer for another file.
        body = resp.content.decode("utf-8", errors="replace").strip()
        outcome.untrained = resp.headers.get("X-Model-Untrained", "").strip().lower() == "true"
        batch_id, item_id = resp.headers.get("X-Batch-Id"), resp.headers.get("X-Item-Id")
        if resp.status_code in (503, 504) and batch_id and item_id:
            # Stored and queued, its answer not waited for (a web tier stopping, or past
            # RESULT_TIMEOUT): the answer says where its result will be, so follow it there.
            outcome.via = f"/api/jobs/{batch_id}, after HTTP {resp.status_code}"
            item = self._wait_poll(self._session(), batch_id, item_id, deadline, outcome)
            self._take_item(item, path, outcome)
            return
        if resp.status_code != 200:
            raise RequestFailed(f"HTTP {resp.status_code}: {_short(body)}", resp.status_code)
        content_type = resp.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() == "text/html":
            # Another server's page (a proxy's, a login's): one line holding a colon read
            # as '<name>:<label>', and was counted wrong rather than failed.
            raise RequestFailed(f"not a classification answer: an HTML page ({_short(content_type)})", 200)
        # Labels never hold ':', file names might: split at the last one. The answer is
        # one line: a page, or another server's XML, that happens to hold a colon is not one.
        name, colon, label = body.rpartition(":")
        if not colon or not label or "\n" in body or "\r" in body:
            raise RequestFailed(f"not a classification answer: {_short(body)!r} "
                                "(expected one line, <name>:<label>)", 200)
        outcome.answer_name, outcome.label = name, label

    def _via_jobs(self, path: Path, deadline: float, outcome: Outcome) -> None:
        session = self._session()
        once = {"batch_id": uuid.uuid4().hex, "create": "1", "tokens": "0"}  # stored once, however often sent
        resp = self._post("/api/jobs", {"files": self._upload(path)}, deadline, outcome, once)
        outcome.status = resp.status_code
        if resp.status_code not in (200, 201, 202):
            raise RequestFailed(f"HTTP {resp.status_code}: {_error_text(resp)}", resp.status_code)
        try:
            batch = resp.json()
            batch_id, item_id = batch["batch_id"], batch["items"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RequestFailed(f"malformed job answer {_short(resp.text)!r}", resp.status_code) from exc

        if self.config.wait == "sse":
            item = self._wait_sse(session, batch_id, item_id, deadline, outcome)
        else:
            item = self._wait_poll(session, batch_id, item_id, deadline, outcome)
        self._take_item(item, path, outcome)

    @staticmethod
    def _take_item(item: dict, path: Path, outcome: Outcome) -> None:
        """The outcome of an item read from /api/jobs, once finished."""
        outcome.untrained = bool(item.get("untrained"))
        if item.get("state") != "done":
            # Named as POST / names the file of an image the worker could not classify.
            name = str(item.get("filename") or sendable_name(path))
            why = _short(f"{name}: {item.get('error')}")
            raise RequestFailed(f"item failed: {why}", outcome.status)
        # The web tier's own stem, as POST / answers: image_key would also cut at a
        # backslash, which is part of the name here.
        outcome.answer_name = name_stem(str(item.get("filename") or sendable_name(path)))
        outcome.label = str(item.get("label"))
        outcome.by_id = True

    def _fetch_item(self, session: requests.Session, batch_id: str, item_id: str, deadline: float) -> dict:
        resp = read_within(session.get(f"{self.config.url}/api/jobs/{batch_id}", stream=True,
                                       timeout=self._timeout(deadline), allow_redirects=False), deadline)
        self.server_answered()
        if resp.status_code != 200:
            # The server's reason too: a 404 "no such batch" after the stack was restarted.
            raise RequestFailed(f"GET /api/jobs/{batch_id}: HTTP {resp.status_code}: {_error_text(resp)}",
                                resp.status_code)
        try:
            items = resp.json()["items"]
            return next(i for i in items if i.get("id") == item_id)
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            raise RequestFailed(f"GET /api/jobs/{batch_id}: item {item_id} missing") from exc

    def _wait_poll(self, session: requests.Session, batch_id: str, item_id: str, deadline: float,
                   outcome: Outcome | None = None) -> dict:
        if outcome is not None:
            # The table says how many latencies the back-off below may have made late.
            outcome.awaited = "poll"
        # Start quick (a warm fleet answers in well under a second), then back off
        # so a thousand waiting requests do not flood the web tier.
        delay = 0.05
        unanswered: Exception | None = None  # the last poll the web tier did not answer
        while True:
            try:
                item = self._fetch_item(session, batch_id, item_id, deadline)
                unanswered = None
            except MAYBE_RESTARTING as exc:
                if not web_tier_restarting(exc):
                    raise
                if (isinstance(exc, requests.ConnectionError) and never_connected(exc)
                        and self._refused_for(True) >= RESEND_WINDOW_S):
                    # A web tier gone for good, as an upload refused as long finds: each
                    # request in flight waited out its whole --timeout (330 s) to say so.
                    why = connection_error(exc, self.config.url)
                    raise RequestFailed(f"GET /api/jobs/{batch_id}: {why}; "
                                        f"every connection refused for {RESEND_WINDOW_S:g} s") from exc
                # The web tier restarting (refused, cut off, a 502, 503 or 504): the item was
                # accepted and is kept in S3, and a new web tier answers for it.
                item, delay, unanswered = {}, max(delay, 0.5), exc
            if item.get("state") in FINAL_STATES:
                return item
            # The next poll waits at most until just before the deadline: skipped whenever
            # the backed-off delay (up to 1 s) went past it, a result that came in the
            # request's last moments would count failed ("timeout after 0.3 s").
            left = deadline - time.monotonic() - POLL_MARGIN_S
            if left <= 0:
                if unanswered is not None:
                    why = (connection_error(unanswered, self.config.url)
                           if isinstance(unanswered, requests.ConnectionError) else _short(str(unanswered)))
                    raise RequestFailed(f"no answer in time; the last poll: {why}")
                raise requests.Timeout()
            if self.abandon.wait(min(delay, left)):
                raise RequestFailed("abandoned: the run stopped waiting for it")
            delay = min(delay * 1.5, 1.0)

    def _wait_sse(self, session: requests.Session, batch_id: str, item_id: str, deadline: float,
                  outcome: Outcome | None = None) -> dict:
        url = f"{self.config.url}/api/jobs/{batch_id}/events"
        if outcome is not None:
            outcome.awaited = "events"  # until it falls back to polling, which says so
        try:
            return self._wait_stream(session, url, batch_id, item_id, deadline, outcome)
        except MAYBE_RESTARTING as exc:
            if not web_tier_restarting(exc):
                raise
            # The web tier restarting: polling waits for the next one (see _wait_poll).
            return self._wait_poll(session, batch_id, item_id, deadline, outcome)

    def _wait_stream(self, session: requests.Session, url: str, batch_id: str, item_id: str,
                     deadline: float, outcome: Outcome | None = None) -> dict:
        with session.get(url, stream=True, timeout=self._timeout(deadline), allow_redirects=False) as resp:
            self.server_answered()
            if resp.status_code == 200:
                item = self._follow_events(resp, session, batch_id, item_id, deadline)
                if item is not None:
                    return item
            elif resp.status_code in RESTARTING_STATUSES:
                # The web tier caps the event streams open at once and answers the rest
                # 503 "poll GET /api/jobs/<id> instead" (and one restarting, 502 to 504):
                # the item itself is fine. The short body is read so the connection is
                # kept for the polls.
                read_within(resp, deadline)
            else:
                read_within(resp, deadline)  # an error's body too: by the deadline
                raise RequestFailed(f"GET /api/jobs/{batch_id}/events: HTTP {resp.status_code}: "
                                    f"{_error_text(resp)}", resp.status_code)
        # No stream to spare, or the server closed it early: poll instead.
        return self._wait_poll(session, batch_id, item_id, deadline, outcome)

    def _follow_events(
        self, resp: requests.Response, session: requests.Session, batch_id: str, item_id: str, deadline: float
    ) -> dict | None:
        """The item once an event says it finished; None if the stream ends first."""
        # The stream is open, so no event can be missed from here on; the item
        # may already have finished before it opened, though.
        item = self._fetch_item(session, batch_id, item_id, deadline)
        if item.get("state") in FINAL_STATES:
            return item
        for line in lines_within(resp, deadline):
            if self.abandon.is_set():
                raise RequestFailed("abandoned: the run stopped waiting for it")
            if time.monotonic() >= deadline:
                raise requests.Timeout()
            if not line or not line.startswith("data:"):
                continue
            event = _parse_event(line[5:])
            if event.get("id") == item_id and event.get("state") in FINAL_STATES:
                return event
            # An event we cannot read on its own is still a sign to look again.
            item = self._fetch_item(session, batch_id, item_id, deadline)
            if item.get("state") in FINAL_STATES:
                return item
        return None


def _parse_event(data: str) -> dict:
    try:
        event = json.loads(data)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


def instance_count(status: Any) -> int | None:
    """App-tier instances pending or running in a `/api/status` answer."""
    instances = status.get("instances") if isinstance(status, dict) else None
    if isinstance(instances, dict):
        if "pending" not in instances and "running" not in instances:
            # {} while AWS cannot be read (or before it first is): unknown, not none running.
            return None
        return sum(int(instances.get(state) or 0) for state in ("pending", "running"))
    if isinstance(instances, int):
        return instances
    return None


# The most a status's `read_at` may lie behind its answer and still be believed: past it,
# the clocks of the two hosts disagree (figures are kept for a second or two).
MAX_STATUS_AGE_S = 60.0


def figures_time(status: dict, asked_at: float, answered_at: float) -> float:
    """When a /api/status answer's figures were read, on the run's clock: the web tier
    answers from a snapshot up to a second old, or older when AWS is slow, and says
    when it read it (`read_at`, its wall clock). Without it, or a believable one,
    when it was asked."""
    read_at = status.get("read_at")
    if isinstance(read_at, (int, float)) and not isinstance(read_at, bool):
        age = time.time() - read_at
        if 0.0 <= age <= MAX_STATUS_AGE_S:
            return max(0.0, answered_at - age)
    return asked_at


class StatusPoller:
    """Reads GET /api/status every `interval` seconds while the run goes on.

    A web tier without /api/status just yields no samples; the load test does
    not depend on it.
    """

    def __init__(self, config: Config, on_answer: Callable[[], None] | None = None) -> None:
        self.url = f"{config.url}/api/status"
        self.on_answer = on_answer  # called for each answer, whatever it says: the web tier is up
        self.interval = config.status_interval
        self.t0 = 0.0
        self.samples: list[tuple[float, int]] = []
        self.failure: str | None = None  # why the last sample failed (None: it did not)
        self._session = new_session(config.api_key)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-poller", daemon=True)

    def sample(self) -> None:
        asked_at = time.monotonic() - self.t0  # the answer may take seconds under load
        try:
            resp = self._session.get(self.url, timeout=STATUS_TIMEOUT_S, allow_redirects=False, stream=True)
            if self.on_answer:
                self.on_answer()
            # Read within a size cap and a deadline: a server answering without end would
            # fill the memory, or hold the last sample (on the main thread) for ever.
            read_within(resp, time.monotonic() + STATUS_TIMEOUT_S)
            status = resp.json() if resp.status_code == 200 else None
            count = instance_count(status)
            if count is not None:
                self.samples.append((figures_time(status, asked_at, time.monotonic() - self.t0), count))
        except Exception as exc:
            # Whatever is wrong with the answer is a failed sample, not the run's end: a
            # TypeError ({"pending": []}), an OverflowError ({"pending": 1e999}), each
            # raised, ended this thread and, from the last sample, the run, in a
            # traceback without a report.
            self.failure = f"{type(exc).__name__}: {_short(str(exc))}"
            return
        self.failure = None

    def _loop(self) -> None:
        # The first sample at once, so even a short run has a starting point; taken
        # here rather than before the run, as /api/status may take up to 2 s.
        self.sample()
        while not self._done.wait(self.interval):
            self.sample()

    def start(self, t0: float) -> None:
        """Sample from now on; times are seconds since `t0` (time.monotonic)."""
        self.t0 = t0
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop sampling; with `wait`, take one last sample, so the run's end has one."""
        self._done.set()
        if not wait:
            return  # the thread ends after the sample it may be taking
        self._thread.join(timeout=5.0)
        self.sample()
        self._session.close()


# --- running ------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr; on a non-terminal, a line per 10 %."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.stream.isatty()
        self._last_tenth = 0
        self._t0 = time.monotonic()
        self.began = False  # whether the requests began (start): the command says what an interrupt lost

    def start(self, t0: float) -> None:
        """Count the rate from `t0` (time.monotonic), when the requests begin: counted from
        the bar's making, it took in the checks before them (the key check waits up to 12 s)."""
        self._t0 = t0
        self.began = True

    def update(self, done: int, failed: int, wrong: int, not_sent: int = 0) -> None:
        if not self.enabled:
            return
        filled = self.WIDTH * done // self.total
        # Answered a second, as the summary's throughput: failures that come at once (a
        # server refusing) would have the bar show a rate the run never had.
        rate = (done - failed - not_sent) / max(time.monotonic() - self._t0, 1e-9)
        line = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}"
            f"  failed {failed}  wrong {wrong}" + (f"  not sent {not_sent}" if not_sent else "")
            + f"  {rate:.1f} answered/s"
        )
        if self.tty:
            # Cleared to the end: a shorter line (a rate of "9.9/s" after "10.0/s") left the
            # old line's last characters behind it.
            self.stream.write("\r" + line + "\033[K")
        else:
            tenth = 10 * done // self.total
            if tenth == self._last_tenth:
                return
            self._last_tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Senders:
    """`concurrency` threads working through the plan, each outcome added to a list.

    Not a ThreadPoolExecutor: Python joins its threads when the interpreter exits,
    so after a second Ctrl-C the process would still wait for every request in
    flight (up to --timeout). These threads are daemons; once the report is
    printed nothing waits for them.

    The outcomes are read, never taken: the caller says how many it has recorded
    (`results_from`). A Ctrl-C lands between any two steps of the main thread; one
    that came after an outcome was taken from a queue and before it was counted would
    lose it, and the wait for the requests in flight never end.
    """

    def __init__(self, client: Client, plan: Sequence[Path], concurrency: int, stop: threading.Event) -> None:
        self._client = client
        self._stop = stop
        self._plan = plan
        self._taken = 0  # how many requests of the plan were taken, in order (under the lock)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        # Each request taken from the plan adds one Outcome here (changed under the lock),
        # or the exception that ended its thread there.
        self._results: list[Outcome] = []
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._work, name=f"load-{n}", daemon=True)
            for n in range(min(concurrency, len(plan)))
        ]
        self._t0 = 0.0
        # When each request taken from the plan was taken (time.monotonic), by index: the
        # plan is taken in order (changed under the lock).
        self._taken_at: list[float] = []

    def start(self, t0: float) -> None:
        self._t0 = t0
        for thread in self._threads:
            thread.start()

    def _next(self) -> tuple[int, Path] | None:
        # Checked and counted under the lock: once the stop event is set and the
        # lock taken, `started` is final.
        with self._lock:
            if self._stop.is_set() or self._taken >= len(self._plan):
                return None
            self._taken_at.append(time.monotonic())
            self._taken += 1
            return self._taken - 1, self._plan[self._taken - 1]

    def _work(self) -> None:
        try:
            while (job := self._next()) is not None:
                self._add(self._client.send(job[0], job[1], self._t0))
        except BaseException as exc:  # send handles failed requests: this is a bug, shown by the caller
            self._add(exc)

    def _add(self, result: Outcome | BaseException) -> None:
        with self._arrived:
            (self._errors if isinstance(result, BaseException) else self._results).append(result)
            self._arrived.notify_all()

    def finished(self, recorded: int) -> bool:
        """Whether the caller, having recorded `recorded` outcomes, has them all: the plan
        sent and answered or, once the stop event is set, the requests in flight."""
        with self._lock:
            no_more = self._stop.is_set() or self._taken >= len(self._plan)
            return no_more and recorded == len(self._taken_at)

    def results_from(self, recorded: int, timeout_s: float = 0.0, *, raising: bool = True) -> list[Outcome]:
        """The outcomes after the first `recorded`, waiting up to `timeout_s` for one if
        there is none yet; with `raising`, first the exception that ended a sender (a bug:
        send handles failed requests), if one did. Timed: Ctrl-C interrupts a wait only if
        the kernel hands SIGINT to this thread; handed to a sender, it is acted on at the
        next timeout."""
        with self._arrived:
            if len(self._results) <= recorded and not self._errors and timeout_s > 0:
                self._arrived.wait(timeout_s)
            if raising and self._errors:
                raise self._errors[0]
            return self._results[recorded:]

    def in_flight(self) -> int:
        """Requests taken from the plan whose outcome is not in yet (one in but not yet
        recorded is not in flight, or the first Ctrl-C's count has them twice)."""
        with self._lock:
            return len(self._taken_at) - len(self._results) - len(self._errors)

    def taken_at(self) -> list[float]:
        """When each request taken from the plan was taken, by index (final once the
        stop event is set)."""
        with self._lock:
            return list(self._taken_at)


class Plan(Sequence[Path]):
    """The image each of `total` requests sends, in order: `images` over and over.
    Worked out by index, not stored: a list of -n 20,000,000 took 2.2 GB before the
    first request. Indexed by int only: nothing slices it."""

    def __init__(self, images: Sequence[Path], total: int) -> None:
        self.images, self.total = images, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> Path:
        if not 0 <= index < self.total:
            raise IndexError(index)
        return self.images[index % len(self.images)]

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(self.total))


def plan_requests(config: Config, images: list[Path], expected: dict[str, str]) -> Plan:
    """The image each request sends, in order: the folder's images over and over, up to
    --num-requests (all of them once without it). Raises LoadTestError when an
    --expected CSV names none of the images sent."""
    total = config.num_requests if config.num_requests is not None else len(images)
    plan = Plan(images, total)
    sending = {sendable_name(p) for p in images[:total]}  # as judge names them
    if config.expected and not any(image_key(name) in expected for name in sending):
        # Every answer would be "unchecked", and the run a PASS that checked nothing. The
        # images sent, not those in the folder: --num-requests may send only a few of them.
        which = (f"the {len(images)} images in {config.images}" if len(sending) == len(images) else
                 f"the {len(sending)} images --num-requests {total} sends of the {len(images)} "
                 f"in {config.images}")
        named = ", ".join(sorted(expected)[:3]) or "none"
        raise LoadTestError(f"{config.expected} names none of {which} (it names {named}"
                            f"{', ...' if len(expected) > 3 else ''})")
    return plan


def unfinished_outcomes(plan: Sequence[Path], taken_at: Sequence[float], t0: float,
                        recorded: set[int], cut_short: str | None = None,
                        live: Mapping[int, Outcome] | None = None) -> list[Outcome]:
    """An outcome for each request of `plan` an interrupted run has none for, so that its
    report holds every one, the abandoned and those never started too: one taken from
    the plan (at `taken_at[index]`) was in flight when the
    run quit, the others were never started. `cut_short`: why the run was stopped, when
    not by a signal, which each of their errors then says. `live`: the outcomes, as they
    stood, of the requests in flight (Client.in_flight), by index: one that had never
    connected (each attempt refused, waiting to try again) is not sent, not abandoned."""
    in_flight = f"in flight when {cut_short}" if cut_short else "in flight when the run quit"
    not_started = f"not started: {cut_short}" if cut_short else "not started: the run was interrupted first"
    now = time.monotonic()
    rest = []
    for index, path in enumerate(plan):
        if index in recorded:
            continue
        if index < len(taken_at):
            seen = live.get(index) if live is not None else None
            if seen is not None and seen.reached is False:
                # Counted abandoned, so sent, these made `sent` count requests no server
                # saw (24 where 20 reached it).
                tries = seen.resent + 1
                rest.append(Outcome(index=index, file=sendable_name(path), started_s=taken_at[index] - t0,
                                    latency_s=now - taken_at[index], resent=seen.resent,
                                    error=f"{in_flight}: it had never connected (tried {tries} "
                                          f"time{'s' if tries > 1 else ''})",
                                    verdict="not sent", reached=False))
                continue
            # None: not known how far it had got (it may be uploading), so it may be stored.
            reached = True if seen is not None and seen.reached else None
            rest.append(Outcome(index=index, file=sendable_name(path), started_s=taken_at[index] - t0,
                                resent=seen.resent if seen is not None else 0,
                                error=f"{in_flight} (the image may be stored)",
                                verdict="abandoned", reached=reached))
        else:
            rest.append(Outcome(index=index, file=sendable_name(path), started_s=None,
                                error=not_started, verdict="not started"))
    return rest


def check_server(config: Config) -> None:
    """LoadTestError unless `config.url` can be driven: reachable, with a key it takes
    if it requires one (said before the run, not as every request refused 401). A
    server that does not answer as this service's web tier warns, and is driven all
    the same."""
    if not hasattr(urllib3.response.HTTPResponse, "read1"):
        # Every request would fail with an AttributeError (some distributions ship 1.26).
        raise LoadTestError("this script needs urllib3 2.2 or later: pip install 'urllib3>=2.2'")
    check_reachable(config.url)
    status = web_tier_status(config.url)
    if status is None or "queue" not in status:
        # Run all the same (another server of the course's POST / may be driven on
        # purpose), but said: the page's address with a path, or the embedded AWS's,
        # would have every request fail, or upload the images to S3.
        print(f"load_test.py: warning: {config.url}/api/status does not answer as this service's web "
              "tier does: is --url the web tier's address?", file=sys.stderr)
    # Else every upload is refused with a 401, and a quiet run said only how many failed.
    if api_key_required(status):
        if not config.api_key:
            raise LoadTestError(f"{config.url} requires an API key (its /api/status says so): "
                                "give it with --api-key KEY or as $API_KEY")
        if api_key_refused(config.url, config.api_key):
            raise LoadTestError(f"the API key was refused by {config.url} (HTTP 401 to an empty POST "
                                "/api/jobs): check --api-key or $API_KEY")


def run_load(
    config: Config,
    progress: Progress | None = None,
    on_result: Callable[[Outcome], None] | None = None,
    *,
    images: list[Path] | None = None,
    expected: dict[str, str] | None = None,
    stop_at: float | None = None,
    stop_reason: str = "the run's time limit passed",
) -> Report:
    """Send the planned requests with `config.concurrency` in flight; return the report.

    `images` and `expected`: what list_images and read_expected gave for `config.images`
    and `config.expected`, if the caller has read them already (main, for its progress
    bar): read again, a folder changed in between would make the plan disagree with
    the progress total. Left out, they are read here.

    `on_result` is called in the calling thread for each finished request.
    A Ctrl-C (KeyboardInterrupt, also from `on_result`) stops sending; requests
    in flight are waited for (each is bounded by the timeout). A second one stops
    waiting: the report holds what was answered, the rest in flight as abandoned,
    and the threads still waiting for them are left to end with the process
    (those polling /api/jobs stop at their next poll).
    Either way the report says it was interrupted, and holds the requests never
    started as "not started".

    `stop_at` (a time.monotonic() instant) ends the run then as a second Ctrl-C would,
    for a caller that must end by a deadline (`make bench`): each request's --timeout
    alone let a run at -c 100 of a server answering nothing last three timeouts. Its
    report is then `cut_short`, by `stop_reason`, which the requests it left say too.
    """
    if images is None:
        images = list_images(config.images)
    if expected is None:
        expected = read_expected(config.expected) if config.expected else {}
    plan = plan_requests(config, images, expected)
    check_server(config)
    return LoadRun(config, plan, expected, progress, on_result, stop_at, stop_reason).run()


class LoadRun:
    """One run of run_load: its senders, status poller and outcomes, and how a Ctrl-C,
    a SIGTERM or the caller's deadline (`stop_at`) end it."""

    def __init__(self, config: Config, plan: Plan, expected: dict[str, str],
                 progress: Progress | None, on_result: Callable[[Outcome], None] | None,
                 stop_at: float | None, stop_reason: str) -> None:
        self.config, self.plan, self.expected = config, plan, expected
        self.progress, self.on_result = progress, on_result
        self.stop_at, self.stop_reason = stop_at, stop_reason
        self.stop, self.abandon = threading.Event(), threading.Event()
        self.client = Client(config, self.stop, self.abandon)
        self.senders = Senders(self.client, plan, config.concurrency, self.stop)
        self.poller = StatusPoller(config, on_answer=self.client.server_answered)
        self.outcomes: list[Outcome] = []
        # Running counts for the progress line: counting all outcomes again for each
        # result made a 20,000-request run spend seconds of the main thread on it.
        self.problems = {"failed": 0, "wrong": 0, "not sent": 0}
        self.interrupted_by: str | None = None
        self.cut_short: str | None = None
        self.signal_after_sending: str | None = None
        self.duration_s = 0.0

    def run(self) -> Report:
        # The clock starts as the first requests go: nothing slow comes in between.
        started_at = time.time()
        t0 = time.monotonic()
        try:
            try:
                self._send_all(t0)
            except KeyboardInterrupt as first:
                # All of the handling is inside this try: a second Ctrl-C may come at
                # any moment, even before the message is out.
                try:
                    self._wait_for_those_in_flight(first)
                except KeyboardInterrupt as second:
                    self._quit(second)
        finally:
            self._end(t0)
        # Nothing is waited for any more: an interrupt from now on is noted, not raised. Raised, a
        # third Ctrl-C (or a SIGTERM just after the second) while the requests left are
        # recorded (seconds, for a plan of millions) lost the whole report.
        heard: list[str] = []
        with interrupts_noted(heard):
            report = self._report(started_at, t0)
        if heard:
            if report.interrupted_by is None:
                report.signal_after_sending = report.signal_after_sending or heard[0]
            elif "SIGTERM" in heard:
                report.interrupted_by = "SIGTERM"  # as a SIGTERM after a Ctrl-C: the latter made it quit
        return report

    def _report(self, started_at: float, t0: float) -> Report:
        outcomes = self.outcomes
        if self.interrupted_by is not None or self.cut_short is not None:
            outcomes += unfinished_outcomes(self.plan, self.senders.taken_at(), t0,
                                            {o.index for o in outcomes},
                                            None if self.interrupted_by else self.cut_short,
                                            self.client.in_flight())
        config = self.config
        return Report(
            url=config.url,
            api=config.api,
            concurrency=config.concurrency,
            planned=len(self.plan),
            started_at=started_at,
            duration_s=self.duration_s,
            outcomes=outcomes,
            instance_samples=list(self.poller.samples),
            interrupted_by=self.interrupted_by,
            signal_after_sending=self.signal_after_sending,
            cut_short=self.cut_short,
            idempotency_keys=config.idempotency_keys,
            checked_against_csv=config.expected is not None,
            wait=config.wait if config.api == "jobs" else None,
        )

    def _send_all(self, t0: float) -> None:
        if self.progress:
            self.progress.start(t0)
        self.poller.start(t0)
        self.senders.start(t0)
        self._record_all()
        if self._out_of_time() and not self.senders.finished(len(self.outcomes)):
            # As a second Ctrl-C: what is in flight is not waited for.
            self.cut_short = self.stop_reason
            self.stop.set()
            self._record_all(wait=False)

    def _wait_for_those_in_flight(self, first: KeyboardInterrupt) -> None:
        """After a first Ctrl-C: nothing more is sent, and the requests in flight are
        waited for. A SIGTERM, or the caller's time running out, goes on as a second."""
        self.interrupted_by = signal_of(first)
        self.stop.set()
        if self.progress:
            self.progress.clear()
        if isinstance(first, Terminated):
            raise KeyboardInterrupt  # waits for nothing: as a second Ctrl-C
        print(
            f"\ninterrupted: waiting for {self.senders.in_flight()} requests in flight "
            "(Ctrl-C again to quit)",
            file=sys.stderr,
        )
        self._record_all()
        if self._out_of_time() and not self.senders.finished(len(self.outcomes)):
            raise KeyboardInterrupt  # the caller's time is up: as a second Ctrl-C

    def _quit(self, second: KeyboardInterrupt) -> None:
        """After a second Ctrl-C: what is in flight is left unanswered."""
        if isinstance(second, Terminated):
            self.interrupted_by = "SIGTERM"  # a Ctrl-C, then SIGTERM: the latter made it quit
        self._record_all(wait=False)
        # Every request taken from the plan is either recorded or abandoned: one
        # whose outcome came a moment too late for the report (or was handed out
        # as this Ctrl-C came) is abandoned, not lost from both.
        abandoned = len(self.senders.taken_at()) - len(self.outcomes)
        print(f"\nquitting: {abandoned} requests in flight left unanswered", file=sys.stderr)

    def _end(self, t0: float) -> None:
        self.stop.set()
        # Requests still waiting (a second Ctrl-C) stop polling: each is counted abandoned
        # already, and would otherwise poll the web tier until its timeout.
        self.abandon.set()
        self.duration_s = time.monotonic() - t0
        try:
            # An interrupted run waits for nothing more, not even a slow /api/status.
            self.poller.stop(wait=self.interrupted_by is None and self.cut_short is None)
        except KeyboardInterrupt as late:
            # Every request is over: an interrupt now cuts short the last status sample
            # (up to 7 s), not the report. Raised, it would lose the whole report, and the
            # command say "interrupted before any request was sent".
            if self.interrupted_by is None:
                self.signal_after_sending = signal_of(late)
            elif isinstance(late, Terminated):
                self.interrupted_by = "SIGTERM"  # as a SIGTERM after a Ctrl-C above: the latter made it quit
            self.poller.stop(wait=False)
        self.client.close()
        if self.progress:
            self.progress.close()

    def _record(self, outcome: Outcome, notify: bool = True) -> None:
        judge(outcome, self.expected)  # again, harmlessly, if a Ctrl-C came before the append
        self.outcomes.append(outcome)  # the count of those recorded: see Senders.results_from
        if outcome.verdict in self.problems:
            self.problems[outcome.verdict] += 1
        if notify and self.on_result:
            self.on_result(outcome)
        if notify and self.progress:
            self.progress.update(len(self.outcomes), self.problems["failed"], self.problems["wrong"],
                                 not_sent=self.problems["not sent"])

    def _record_all(self, wait: bool = True) -> None:
        """Records the outcomes not yet recorded; with `wait`, until every request taken
        from the plan has one (or, once stopped, those in flight), or `stop_at` passes."""
        while True:
            # Quitting (not `wait`), the report is printed even after a sender's bug.
            for outcome in self.senders.results_from(len(self.outcomes), timeout_s=0.2 if wait else 0,
                                                     raising=wait):
                self._record(outcome, notify=wait)
            if not wait or self.senders.finished(len(self.outcomes)) or self._out_of_time():
                return

    def _out_of_time(self) -> bool:
        return self.stop_at is not None and time.monotonic() >= self.stop_at


# --- output -------------------------------------------------------------------------


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
    if report.cut_short:
        reasons.append(f"stopped: {report.cut_short}")
    if report.checked_nothing:
        reasons.append("none checked: the expected CSV names no image answered")
    return f"RESULT: FAIL ({', '.join(reasons)})"


BATCH_IN_URL = re.compile(r"/api/jobs/[0-9a-f]{32}")


def failure_lines(report: Report, limit: int = 5) -> list[str]:
    """Why requests failed, or were not sent, one line per distinct reason with how
    many it stopped, the commonest first, then the wrong answers, one line each with
    its file: what a quiet run says beside its RESULT line."""
    lines = []
    for verdict in ("failed", "not sent"):
        stopped = sorted((o for o in report.outcomes if o.verdict == verdict), key=lambda o: o.index)
        # One cause, one line: each error names its own batch, which would make as many
        # "reasons" as requests. Ties: the first to fail first.
        reasons = Counter(BATCH_IN_URL.sub("/api/jobs/<batch>", o.error or "no reason given")
                          for o in stopped)
        common = reasons.most_common()
        lines += [f"{count} {verdict}: {reason}" for reason, count in common[:limit]]
        rest = common[limit:]
        if rest:
            lines.append(f"... and {sum(count for _, count in rest)} {verdict} for {len(rest)} other "
                         "reasons (see --json for each request)")
    # Each wrong answer with its file, as the table shows it: "4 wrong" alone leaves a quiet
    # run's user no way to find which images, short of --json.
    wrong = sorted((o for o in report.outcomes if o.verdict == "wrong"), key=lambda o: o.index)
    lines += [f"{o.file}: wrong: answered {o.body!r}, {o.note or 'wrong'}" for o in wrong[:limit]]
    if len(wrong) > limit:
        lines.append(f"... and {len(wrong) - limit} more wrong (see --json for each request)")
    return lines


def format_report(report: Report, max_problems: int = 10) -> str:
    """The summary table printed at the end of a run."""
    rows = _report_rows(report)
    width = max(len(name) for name, _ in rows)
    lines = [_report_heading(report), ""]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += _problem_lines(report, max_problems)
    lines.append("")
    if report.untrained:
        lines.append(UNTRAINED_WARNING)
    lines.append(result_line(report))
    return "\n".join(lines)


def _report_heading(report: Report) -> str:
    endpoint = "POST /" if report.api == "form" else "POST /api/jobs"
    in_flight = min(report.concurrency, report.planned)
    concurrency = f"concurrency {report.concurrency}"
    if in_flight < report.concurrency:
        requests_planned = f"{report.planned} request" + ("s" if report.planned > 1 else "")
        concurrency += f" (at most {in_flight} in flight: {requests_planned})"
    return f"Load test: {endpoint} on {report.url}, {concurrency}"


def _report_rows(report: Report) -> list[tuple[str, str]]:
    """The table's rows, in order; those of what did not happen are left out."""
    stats = report.latency_stats()
    checked = report.correct + report.wrong
    # The percentiles are of the answered alone: a run with 131 of 150 timed out would say
    # "latency max 0.888 s", read as the run's worst.
    of = f" ({report.answered} answered)" if report.answered < report.planned else ""
    # The course's figure divides by every request that ended, failed or not.
    failed_in_it = report.failed and report.course_average_latency is not None
    course = "duration / requests" + (f", the {report.failed} failed included" if failed_in_it else "")
    sent = f"{report.sent}" + (f" of {report.planned}" if report.sent != report.planned else "")
    rows = [("sent", sent)]
    if report.resent:
        rows.append(_resent_row(report))
    rows.append(("answered", f"{report.answered}"))
    if report.answered_later:
        rows.append(("answered later", f"{report.answered_later}  (a 503 or 504 said the image was "
                                       "queued: its result was read from /api/jobs)"))
    rows.append(("failed", f"{report.failed}  (HTTP errors, timeouts)"))
    if report.abandoned:
        # SIGTERM quits at once too: "at the second Ctrl-C" may say what never happened.
        rows.append(("abandoned", f"{report.abandoned}  (in flight when the run quit)"))
    if report.not_sent:
        rows.append(_not_sent_row(report))
    rows += [
        ("wrong", f"{report.wrong}  (of {checked} checked; {report.unchecked} unchecked)"),
        ("total duration", _seconds(report.duration_s)),
        ("throughput", f"{report.throughput:.2f} images/s"),
        (f"latency p50{of}", _seconds(stats["p50"])),
        (f"latency p90{of}", _seconds(stats["p90"])),
        (f"latency p99{of}", _seconds(stats["p99"])),
        (f"latency max{of}", _seconds(stats["max"])),
        (f"latency mean{of}", _seconds(stats["mean"])),
    ]
    if report.polled:
        rows.append(_polled_row(report))
    rows.append(("average latency (course)", f"{_seconds(report.course_average_latency)}  ({course})"))
    if report.peak_instances is not None:
        rows.append(_instances_row(report))
    return rows


def _resent_row(report: Report) -> tuple[str, str]:
    resent = [o for o in report.outcomes if o.reached and o.resent]
    cut_off_too = report.api == "jobs" or report.idempotency_keys
    why = "refused or cut-off connections" if cut_off_too else "refused connections"
    why = f"{why}, 503 'not stored': a web tier restarting"
    return ("sent again", f"{len(resent)} requests, {report.resent} times in all  ({why})")


def _not_sent_row(report: Report) -> tuple[str, str]:
    never_started = report.not_sent - report.unreached - report.unreadable
    tries = sum(o.resent for o in report.outcomes if o.verdict == "not sent")
    why = [f"{report.unreached} never connected: refused or unreachable"
           + (f", tried again {tries} times in all" if tries else "")] if report.unreached else []
    why += [f"{report.unreadable} whose file could not be read"] if report.unreadable else []
    why += [f"{never_started} not started: the run was interrupted"] if never_started else []
    return ("not sent", f"{report.not_sent}  ({'; '.join(why)})")


def _polled_row(report: Report) -> tuple[str, str]:
    # Polls back off to one a second, so these latencies include up to that much of
    # waiting for the next poll: with --wait poll a p50 read 2.63 s against 2.20 s by events.
    if report.api == "form":
        how = "a 503 or 504 said the image was queued"
    elif report.wait == "poll":
        how = "--wait poll; the default, --wait sse, follows each result's events"
    else:
        how = "their event streams were refused or cut off"
    return ("awaited by polling", f"{report.polled} of {report.answered} answered  "
                                  f"(their latencies may be up to 1 s late: {how})")


def _instances_row(report: Report) -> tuple[str, str]:
    # The first reading may come seconds in (a fresh web tier has no figures yet).
    first_at = report.instance_samples[0][0]
    late = first_at > 2 * STATUS_INTERVAL_S
    when = f"at the first reading, {first_at:.0f} s in" if late else "at start"
    at_first = f"{report.instances_at_start} {when}"
    if report.lowest_instances < report.instances_at_start:
        at_first += f", {report.lowest_instances} at the lowest"
    return ("peak app-tier instances", f"{report.peak_instances} ({at_first})")


def _problem_lines(report: Report, max_problems: int) -> list[str]:
    problems = sorted((o for o in report.outcomes if o.verdict in ("failed", "wrong", "not sent")),
                      key=lambda o: o.index)
    if not problems:
        return []
    lines = ["", "Problems:"]
    for o in problems[:max_problems]:
        detail = o.error if o.verdict != "wrong" else f"answered {o.body!r}, {o.note or 'wrong'}"
        lines.append(f"  {o.file}: {o.verdict}: {detail}")
    if len(problems) > max_problems:
        lines.append(f"  ... and {len(problems) - max_problems} more (see --json)")
    return lines


def write_json(report: Report, path: Path) -> None:
    """The report, each request's row on a line of its own, written as made: made whole
    (to_dict), 200,000 requests' rows took ~700 MB to write, two million's ~7 GB."""
    summary = json.dumps({**report.to_dict(with_requests=False), "requests": []}, indent=2)
    assert summary.endswith('"requests": []\n}')
    with path.open("w", encoding="utf-8") as f:
        f.write(summary[:-len("[]\n}")] + "[")
        for n, row in enumerate(report.request_rows()):
            f.write(("," if n else "") + "\n    " + json.dumps(row))
        f.write("\n  ]\n}\n")


def plot_title(report: Report) -> str:
    """What the plot says of its run, lest an interrupted one's look like a whole run's.
    What it says beside the figures goes on a line of its own: on one, an interrupted
    untrained run's title would be wider than the figure, and lose its start."""
    title = f"{report.sent} requests, concurrency {report.concurrency}, {report.throughput:.2f} images/s"
    notes = []
    if report.interrupted:
        notes.append(f"[interrupted: {report.not_sent} not sent, {report.abandoned} abandoned]")
    if report.untrained:
        notes.append("[UNTRAINED MODEL]")
    return "\n".join([title, "  ".join(notes)] if notes else [title])


def write_plot(report: Report, path: Path) -> None:
    """Latency of each request against its send time, above instances over time."""
    # A path without a suffix is written as a PNG at that path (matplotlib would add ".png").
    plot_figure(report).savefig(path, dpi=100, format=None if Path(path).suffix else "png")


def plot_figure(report: Report) -> Figure:
    """The figure write_plot writes."""
    # Imported here so the rest of the script works where matplotlib is missing;
    # Figure without pyplot draws with the Agg canvas and needs no display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    # Okabe-Ito colours and a marker each: told apart without colour vision too.
    styles = {"correct": ("#009E73", "o"), "unchecked": ("#0072B2", "o"),
              "wrong": ("#E69F00", "^"), "failed": ("#D55E00", "x"), "not sent": ("#000000", "s")}
    plotted = False
    for verdict, (colour, marker) in styles.items():
        points = [(o.started_s, o.latency_s) for o in report.outcomes if o.verdict == verdict]
        if points:
            xs, ys = zip(*points, strict=True)
            top.scatter(xs, ys, s=12, color=colour, marker=marker, alpha=0.7,
                        label=f"{verdict} ({len(points)})")
            plotted = True
    top.set_ylabel("latency (s)")
    top.set_title(plot_title(report))
    # Only with a point drawn: a run of abandoned and unstarted requests alone plots none,
    # and matplotlib then printed "No artists with labels found to put in legend".
    if plotted:
        # Beside the plot, not on it: the slowest requests tend to sit in its top left.
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    top.grid(alpha=0.3)

    if report.instance_samples:
        ts, counts = zip(*report.instance_samples, strict=True)
        # Drawn to the run's end at the last count seen: a sample is up to a second old,
        # and the line stopped before the last answers.
        if ts[-1] < report.duration_s:
            ts, counts = (*ts, report.duration_s), (*counts, counts[-1])
        bottom.step(ts, counts, where="post", color="tab:purple")
        bottom.set_ylim(bottom=0, top=max(counts) + 1)
    else:
        bottom.text(0.5, 0.5, "no /api/status data", ha="center", va="center", transform=bottom.transAxes)
    # Instances are whole: 12, not 12.5. (Those wider ticks, with no legend beside the
    # top plot, would leave the label below half off the figure.)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_ylabel("app-tier instances\n(pending + running)")
    bottom.set_xlabel("seconds since the run began (a request's point: when it was sent)")
    bottom.grid(alpha=0.3)
    return fig


def signal_exit_code(signal_name: str) -> int:
    """What a shell says of a command the signal ended: 128 + its number (130 for SIGINT,
    143 for SIGTERM), not 1, as a failed one exits."""
    return 128 + signal.Signals[signal_name]


class Terminated(KeyboardInterrupt):
    """SIGTERM, heard as a Ctrl-C that waits for nothing (see interrupts_heard)."""


def signal_of(interrupt: KeyboardInterrupt) -> str:
    """The signal an interrupt came by: "SIGTERM" (a Terminated) or "SIGINT" (Ctrl-C)."""
    return "SIGTERM" if isinstance(interrupt, Terminated) else "SIGINT"


@contextlib.contextmanager
def signal_handlers(handlers: dict[signal.Signals, Any]) -> Iterator[None]:
    """While inside, `handlers` (by signal) are the process's; those found are given back
    after. In the main thread only: only it may set a handler (a caller running main in a
    thread), and only it hears one raised."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler not set from Python, which cannot be given back; the default then.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def interrupts_heard() -> Iterator[None]:
    """While inside, SIGINT is a KeyboardInterrupt, and SIGTERM (`timeout`, `kill`, a CI
    job cancelled) acts as two Ctrl-Cs do: sending stops, the requests in flight are left
    unanswered, and what was done is reported and written at once, as the grace period
    before a SIGKILL is short. Unhandled, SIGTERM would kill the run with no report and
    no JSON. Both handlers found are given back after."""
    def interrupt(signum: int, frame: Any) -> None:
        # Python runs handlers in the main thread: run_load hears it as a KeyboardInterrupt.
        raise Terminated

    with signal_handlers({signal.SIGTERM: interrupt,
                          # A shell starting a background job without job control (a script's
                          # `&`) makes it ignore SIGINT, and Python keeps that: `kill -INT` would
                          # do nothing.
                          signal.SIGINT: signal.default_int_handler}):
        yield


@contextlib.contextmanager
def interrupts_noted(heard: list[str]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM are added to `heard` ("SIGINT", "SIGTERM") rather
    than raised: what is done inside is finished whatever comes. The handlers found (see
    interrupts_heard) are given back after."""
    def note(signum: int, frame: Any) -> None:
        heard.append(signal.Signals(signum).name)

    with signal_handlers({signal.SIGINT: note, signal.SIGTERM: note}):
        yield


class Stdout:
    """The run's lines on standard output, until whoever reads them stops (`| head -3`):
    from then on they are dropped, and the run goes on to its report files and exit
    status. A BrokenPipeError from a print would end the run with a traceback, sending
    stopped and no JSON written."""

    def __init__(self) -> None:
        self.gone = False

    def print(self, text: str = "") -> None:
        if self.gone:
            return
        try:
            try:
                # Flushed at once: a pipe's buffer flushed only at exit would break there,
                # past any handler.
                print(text, flush=True)
            except UnicodeEncodeError:
                # A stdout that cannot spell a file name (PYTHONIOENCODING=cp1252, a Latin-1
                # locale): raised, it ended the run mid-way, with no report and no JSON.
                # Nothing of the line was written: encoding comes first.
                print(spellable(text, sys.stdout), flush=True)
        except OSError:  # a broken pipe; a full disk (> /dev/full): the report files matter more
            self.gone = True
            try:
                # Python flushes stdout again at exit, and would report that broken pipe
                # too: what is left in its buffer goes nowhere instead.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):  # a stdout with no file behind it (a test's capture)
                pass


def spellable(text: str, stream: TextIO) -> str:
    """`text` with what `stream`'s encoding cannot spell written as escapes ('\\u732b')."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


class Stderr:
    """Standard error while the command runs (sys.stderr is this: its messages, the
    progress bar, a thread's traceback), until whoever reads it stops (`2>&1 | head -2`)
    or it cannot be written (`2> /dev/full`): from then on what is written to it is
    dropped, and the run goes on to its report files and exit status. A BrokenPipeError
    from the progress bar would stop sending on the main thread: exit 1, no JSON."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
            except OSError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError:
                self._drop()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name: str) -> Any:  # the rest of a stream's attributes (encoding, fileno, ...)
        return getattr(self.stream, name)

    def _drop(self) -> None:
        self.gone = True
        try:
            # Python flushes stderr again at exit, and would exit 120 on that failure too:
            # what is left in its buffer goes nowhere instead.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass  # a stderr with no file behind it (a test's capture)


@contextlib.contextmanager
def stderr_guarded() -> Iterator[None]:
    """While inside, sys.stderr is a Stderr over the one found, given back after."""
    found = sys.stderr
    if found is None:  # pythonw: no stderr at all
        yield
        return
    sys.stderr = Stderr(found)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stderr = found


def main(argv: Sequence[str] | None = None) -> int:
    # Heard from the start: a run started in the background ignores SIGINT, and SIGTERM
    # kills it without a word, until the handlers are set, and reading a large folder or
    # CSV on a busy machine can take seconds (a `kill -INT` then would do nothing).
    with interrupts_heard(), stderr_guarded():
        try:
            return run(argv)
        except KeyboardInterrupt as exc:  # during the checks before the first request: nothing to report
            print("\nload_test.py: interrupted before any request was sent", file=sys.stderr)
            return signal_exit_code(signal_of(exc))


def run(argv: Sequence[str] | None) -> int:
    """The load test, once the signals are heard (main)."""
    config = parse_args(argv)
    out = Stdout()
    if warning := open_files_warning(config.concurrency):
        print(f"load_test.py: warning: {warning}", file=sys.stderr)
    try:
        # Read once, here: run_load is given them, so its plan is what the progress bar counts.
        images, skipped = scan_folder(config.images)
        expected = read_expected(config.expected) if config.expected else {}
        say_what_is_left_out(config, images, skipped, expected)
    except LoadTestError as exc:
        print(f"load_test.py: {exc}", file=sys.stderr)
        return 2
    progress = Progress(config.num_requests or len(images), enabled=not config.quiet)
    untrained_said = False

    def print_result(outcome: Outcome) -> None:
        nonlocal untrained_said
        progress.clear()
        if outcome.untrained and not untrained_said:
            # Before the first such label, not only in the summary: the course's lines
            # carry no mark, and output cut short (`| head`) may never reach it.
            untrained_said = True
            out.print(UNTRAINED_WARNING)
        if not outcome.reached:
            # Never connected, or its file unreadable: "uploaded!" would say what never happened.
            out.print(for_terminal(f"{outcome.file} not sent: {outcome.error}"))
            return
        if not outcome.answered:
            # Not in the course's two lines: a program counting "Classification result:"
            # lines would count a failure as a result.
            out.print(for_terminal(f"{outcome.file} failed: {outcome.error}"))
            return
        # The course's client printed these two lines per image answered.
        out.print(for_terminal(f"{outcome.file} uploaded!"))
        out.print(for_terminal(f"Classification result: {outcome.body}"))

    try:
        report = run_load(config, progress=progress, on_result=print_result if config.verbose else None,
                          images=images, expected=expected)
        return give_report(config, report, out)
    except LoadTestError as exc:
        print(f"load_test.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if not progress.began:
            raise  # during the checks before the first request: main says so
        # Only in a moment's window: between the last status sample and the report's
        # making, or between give_report's steps.
        print("\nload_test.py: interrupted as the run ended: its report may be missing or incomplete",
              file=sys.stderr)
        return signal_exit_code(signal_of(exc))


def give_report(config: Config, report: Report, out: Stdout) -> int:
    """Prints the report and writes its files (run); the command's exit status."""
    # Every request is over: an interrupt from now on loses none of the report. The
    # summary and the JSON (quick) are finished whatever comes; only the plot (seconds
    # of matplotlib) is cut short by one that comes while it is drawn. Raised, such an
    # interrupt would lose the whole report.
    heard = [report.signal_after_sending] if report.signal_after_sending else []
    with interrupts_noted(heard):
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
        written = write_report_file("JSON report", report, config.json_path, write_json)
        if heard and not report.interrupted:
            skipped = " (its last /api/status sample skipped)" if report.signal_after_sending else ""
            print(f"load_test.py: {heard[0]} once every request was over: the report is whole{skipped}",
                  file=sys.stderr)
    if config.plot_path is not None:
        try:
            written = write_report_file("plot", report, config.plot_path, write_plot) and written
        except KeyboardInterrupt as exc:
            heard.append(signal_of(exc))
            # Nothing half written, nor an earlier run's plot, left to be taken for this run's.
            with contextlib.suppress(OSError):
                config.plot_path.unlink(missing_ok=True)
            print(f"\nload_test.py: the plot was not written to {config.plot_path}: interrupted "
                  f"({heard[-1]})", file=sys.stderr)
    if report.interrupted_by is not None:
        return signal_exit_code(report.interrupted_by)
    if heard:
        return signal_exit_code(heard[0])
    return 0 if report.ok and written else 1


def write_report_file(what: str, report: Report, path: Path | None,
                      write: Callable[[Report, Path], None]) -> bool:
    """`write(report, path)` unless `path` is None; False, said on stderr, when it cannot
    be written (its folder removed during the run, a full disk), rather than a traceback."""
    if path is None:
        return True
    try:
        write(report, path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"load_test.py: cannot write the {what} to {path}: {reason}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
