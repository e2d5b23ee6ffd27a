"""Names of things in AWS that more than one tier must agree on."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote

APP_TIER_NAME_PREFIX = "app-tier-instance-"
# Tags every app-tier instance also carries: the fleet's queries select by the prefix,
# so that they never confuse ours with another deployment's (another APP_PREFIX) that
# shares the Name pattern, and the IAM policies (ami/) by both.
ROLE_TAG = "imgclass:role"
ROLE_APP_TIER = "app-tier"
PREFIX_TAG = "imgclass:prefix"

# The name as uploaded, in the input object's metadata (percent-encoded: S3 metadata
# is ASCII). A request message carries it cut to 160 bytes to fit SQS's 1 KB; the
# worker takes it whole from here for the output object. S3 allows 2 KB of user
# metadata per object, names and values together; this field's name and the others
# take up to 242 bytes. Room is left for each name's "x-amz-meta-" too (55 bytes for
# the five): S3 does not count it, but a store that does would refuse names near the limit.
# A non-ASCII character takes 6 to 12 encoded (up to ~290 two-byte characters fit,
# ~190 three-byte, 145 four-byte); the web tier cuts every name it keeps to what fits
# (web_tier/filenames.py clean_name), so the output object names it as the answer did.
ORIGINAL_FILENAME_META = "original-filename"
MAX_META_FILENAME = 1740
MAX_EXTENSION_CHARS = 16

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_SAFE_NAME = 100


def instance_name(n: int) -> str:
    return f"{APP_TIER_NAME_PREFIX}{n}"


def instance_number(name: str) -> int | None:
    """The n of `app-tier-instance-<n>`, or None for any other name."""
    if not name.startswith(APP_TIER_NAME_PREFIX):
        return None
    tail = name[len(APP_TIER_NAME_PREFIX):]
    # isdecimal, not isdigit: isdigit accepts '²', which int() refuses.
    return int(tail) if tail.isascii() and tail.isdecimal() else None


def safe_filename(original: str) -> str:
    """A name that is safe as an S3 key part, a path part and in CSV.

    Keeps the base name only (no directories, from either slash), folds accents
    to ASCII, replaces everything else outside [A-Za-z0-9._-] with '_', strips
    leading dots so it is never hidden or '..', and keeps the extension when
    cutting long names. A name of which only the extension survives (猫.jpg)
    becomes image.<extension>.
    """
    base = re.split(r"[\\/]", original)[-1]
    folded = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    safe = _SAFE.sub("_", folded)
    name, dot, ext = safe.rpartition(".")
    if dot and ext.strip("_") and not name.strip("._"):
        safe = f"image.{ext}"
    safe = safe.strip("._") or "image"
    if len(safe) > _MAX_SAFE_NAME:
        stem, dot, ext = safe.rpartition(".")
        if dot and 0 < len(ext) <= 10:
            safe = stem[: _MAX_SAFE_NAME - len(ext) - 1] + "." + ext
        else:
            safe = safe[:_MAX_SAFE_NAME]
    return safe


def object_key(batch_id: str, item_id: str, original_filename: str) -> str:
    """Key of an upload in the input bucket; its result uses the same key in the output bucket."""
    return f"{batch_id}/{item_id}/{safe_filename(original_filename)}"


def stored_name(key: str) -> str:
    """The safe file name at the end of an object key."""
    return key.rsplit("/", 1)[-1]


def stem(filename: str) -> str:
    """File name without its extension: 'test_00.JPEG' -> 'test_00'.

    Only the last path component can have one (programs may send a path:
    'photos.v2/cat' stays whole), and not from a leading dot ('.rc', '..')."""
    cut = max(filename.rfind("/"), filename.rfind("\\")) + 1
    folder, name = filename[:cut], filename[cut:]
    head, dot, _ = name.rpartition(".")
    return folder + head if dot and head.strip(".") else filename


def kept_extension(name: str) -> str:
    """What a name cut short keeps at its end: its extension ('.jpg'), or '' when it
    has none (or one too long to be one)."""
    head, dot, extension = name.rpartition(".")
    return dot + extension if head and len(extension) <= MAX_EXTENSION_CHARS else ""


def encode_filename(original: str) -> str:
    """`original` percent-encoded for S3 metadata; one too long is cut before its
    extension, so that the output object still names an image file."""
    encoded = quote(original, safe="")
    if len(encoded) <= MAX_META_FILENAME:
        return encoded
    kept = kept_extension(original)
    room = MAX_META_FILENAME - len(quote(kept, safe=""))
    body = []
    for char in original[:len(original) - len(kept)]:  # whole characters: never half of one
        encoded_char = quote(char, safe="")
        if len(encoded_char) > room:
            break
        body.append(encoded_char)
        room -= len(encoded_char)
    return "".join(body) + quote(kept, safe="")


def decode_filename(encoded: str) -> str:
    return unquote(encoded, errors="replace")


def original_filename(metadata: dict[str, str]) -> str | None:
    """The name as uploaded, from an input object's metadata; None when it has none."""
    encoded = metadata.get(ORIGINAL_FILENAME_META)
    return decode_filename(encoded) if encoded else None
