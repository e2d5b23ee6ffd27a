"""The images sent and the names they go by: the folder's images, the --expected CSV
keyed by image, and whether an answer's name is the file's own, as the web tier
spells names back."""

from __future__ import annotations

import csv
import re
import unicodedata
from pathlib import Path
from urllib.parse import quote

from loadtest.config import LoadTestError

# What the web tier accepts: JPEG (also as .jpe and .jfif), PNG, GIF, BMP, WebP, TIFF, AVIF.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif",
                            ".tiff", ".avif"})

# Accepted spellings of the expected-results CSV's two columns (compared lower-cased).
IMAGE_COLUMNS = ("image", "images", "image_name", "filename", "file", "name")
RESULT_COLUMNS = ("results", "result", "label", "labels", "prediction", "class")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, not hidden, in name order (so runs are repeatable)."""
    return scan_folder(folder)[0]


def scan_folder(folder: Path) -> tuple[list[Path], int]:
    """list_images's images, and how many other entries the folder holds, from one
    listing (two could disagree about a folder that changes meanwhile)."""
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
        raise LoadTestError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return images, len(entries) - len(images)


def sendable_name(path: Path) -> str:
    """The file's name as it is sent and reported: a name that is not UTF-8 (bytes
    Python keeps as surrogates) has them as U+FFFD. Sent as they were, they stopped
    the whole run with a UnicodeEncodeError, no report written (explorer)."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def image_key(name: str) -> str:
    """'test_00.JPEG', 'dir/test_00' and 'test_00' all become 'test_00'.

    In NFC: a name copied from a Mac spells 'é' as 'e' and a combining accent (NFD),
    which a CSV typed elsewhere spells as one character, and the row went unmatched
    (reviewer)."""
    base = re.split(r"[\\/]", unicodedata.normalize("NFC", name.strip()))[-1]
    stem, dot, suffix = base.rpartition(".")
    if dot and stem and f".{suffix.lower()}" in IMAGE_SUFFIXES:
        return stem
    return base


def read_expected(path: Path) -> dict[str, str]:
    """Expected label per image key from a CSV with a header row.

    The course's file has columns `Image,Results`; other spellings
    (`image,result`, `filename,label`, ...) and a UTF-8 byte-order mark are
    accepted too, and Image may carry an extension. A row without an image or a
    label, or naming an image again with another label, is refused with its line
    number: skipped, it would leave that image "unchecked" and the run a PASS.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
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


# How the web tier spells a file's name back. Copied from the project (the load test
# imports nothing of it); tests/unit/test_load_test.py checks each copy against the
# original.

# requests (urllib3) writes these three characters percent-encoded in a multipart
# header's filename="...", as the HTML standard says.
_MULTIPART_ESCAPES = {ord("\n"): "%0A", ord("\r"): "%0D", ord('"'): "%22"}
_MAX_DISPLAY_NAME = 1024  # web_tier/filenames.py MAX_FILENAME_CHARS
_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})  # web_tier/filenames.py
_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                                        "\u2066\u2067\u2068\u2069"))  # web_tier/filenames.py
_MAX_EXTENSION_CHARS = 16  # common/names.py MAX_EXTENSION_CHARS
_MAX_META_FILENAME = 1800  # common/names.py MAX_META_FILENAME


def received_name(filename: str) -> str:
    """The name the web tier reads for a file uploaded as `filename`.

    Werkzeug reads filename="..." as an HTTP quoted string, so a backslash escapes
    the next character ('back\\slash.jpg' becomes 'backslash.jpg') and %22 is a
    quote; the web tier then drops bidirectional-text controls, turns control
    characters (tab, ...) and line and paragraph separators into spaces, trims the
    ends, and cuts a long name before its extension (web_tier/filenames.py clean_name).
    """
    wire = filename.translate(_MULTIPART_ESCAPES)
    parsed = re.sub(r"\\(.)", r"\1", wire, flags=re.ASCII).replace("%22", '"')
    shown = "".join(" " if unicodedata.category(c) in _LINE_BREAKING else c
                    for c in parsed.translate(_BIDI_CONTROLS))
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
    but it is fetched by its id, and that is trusted instead (see outcomes.judge): accepted
    here, the cleaned name let every all-non-ASCII name ('猫.jpg', '犬.jpg': 'image')
    pass for any other.
    """
    return {name_stem(filename), name_stem(received_name(filename))}


def same_name(answer: str, filename: str) -> bool:
    """Whether `answer` names the file sent as `filename` (an answer for another file
    means the web tier handed one request's result to another)."""
    return answer in answer_names(filename)
