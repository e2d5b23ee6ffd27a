"""Checking uploads before anything is stored.

The type is decided by the bytes (Pillow), never by the name or the client's
Content-Type, and the pixel count is read from the header only, so a small
file that would decompress into gigabytes is refused before anyone decodes it.
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError, features
from werkzeug.datastructures import FileStorage
from werkzeug.wrappers import Request

from common.config import Settings
from common.names import decode_filename, encode_filename, kept_extension
from common.pillow_errors import plain_reason
from common.pixels import (
    JPEG_SIGNATURE,
    PILLOW_REFUSALS,
    PNG_SIGNATURE,
    JpegLayout,
    parts_refusal,
    pillow_refusal,
    size_refusal,
)

# Pillow format -> Content-Type stored with the object. MPO is what Pillow calls
# many phone-camera JPEGs. The worker decodes with the same Pillow.
FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}
if features.check("avif"):  # in Pillow's own wheels from 11.2 on
    FORMATS["AVIF"] = "image/avif"
_NAMED = [fmt for fmt in FORMATS if fmt != "MPO"]
ACCEPTED = ", ".join(_NAMED[:-1]) + " or " + _NAMED[-1]
# Longer names are cut before their extension (clean_name); storage uses names.safe_filename.
MAX_FILENAME_CHARS = 1024
_CHUNK = 1 << 20
# Room in a request body for the multipart framing and form fields around the files.
FORM_SLACK_BYTES = 1 << 20


class UploadError(Exception):
    """A refused upload: HTTP status, the reason, and the file it concerns."""

    def __init__(self, status: int, reason: str, filename: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.filename = filename

    def to_json(self) -> dict[str, object]:
        return {"error": self.reason, "filename": self.filename}

    def to_text(self) -> str:
        return f"{self.filename}: {self.reason}" if self.filename else self.reason


@dataclass(frozen=True)
class Upload:
    """An accepted image: its original name, bytes and detected type."""

    filename: str
    data: bytes
    content_type: str


# Characters shown as a space: controls, and the line and paragraph separators, which
# end a line as well (U+2028 split POST /'s one-line answer in two).
_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})
# Bidirectional-text controls: shown, "photo\u202egpj.exe" reads as "photoexe.jpg".
_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                                        "\u2066\u2067\u2068\u2069"))


def display_name(storage: FileStorage) -> str:
    """The name shown for a file: as sent, but with control characters (which would
    break the one-line answer of POST /) turned into spaces, and without the
    bidirectional-text controls that make a name read as another."""
    return clean_name(storage.filename or "")


def clean_name(sent: str) -> str:
    """A file name as sent, made fit to show (see display_name); one too long is cut
    before its extension, which POST /'s answer drops."""
    name = "".join(" " if unicodedata.category(c) in _LINE_BREAKING else c
                   for c in sent.translate(_BIDI_CONTROLS))
    name = name.strip()
    if len(name) > MAX_FILENAME_CHARS:
        kept = kept_extension(name)
        name = name[:MAX_FILENAME_CHARS - len(kept)] + kept
    # The output object takes the name from the input object's metadata, which holds
    # it percent-encoded in MAX_META_FILENAME characters (about 300 two-byte or 200
    # three-byte characters): cut here as it would be cut there, the answer, the page
    # and the output object all show one name.
    name = decode_filename(encode_filename(name))
    return name or "upload"


def check_count(files: list[FileStorage], settings: Settings, field: str = "files") -> None:
    """Refuse a request with no file in `field`, or with more than one request may carry."""
    if not files:
        raise UploadError(400, f"no file in the request: send the images as multipart/form-data, "
                               f"in the field '{field}'")
    if len(files) > settings.max_files_per_request:
        raise UploadError(
            413,
            f"too many files in one request: {len(files)} "
            f"(the limit is {settings.max_files_per_request})",
        )


# What a client's token (and POST /'s Idempotency-Key) is made of.
TOKEN_CHARACTER = r"[A-Za-z0-9._:-]"
_TOKEN = re.compile(TOKEN_CHARACTER + "{1,64}")


def form_tokens(request: Request, count: int, field: str = "tokens") -> list[str] | None:
    """The client's token for each of `count` files (one per file, in their order), or None.

    A file sent again under a token its batch holds is not stored again, so a client
    that lost the answer to a request (a connection cut, a web tier restarted) can
    send it again without having anything classified twice.
    """
    tokens = request.form.getlist(field)
    if not tokens:
        return None
    if len(tokens) != count:
        raise UploadError(400, f"{len(tokens)} tokens for {count} files: send one token per file, "
                               "in the order of the files")
    for token in tokens:
        if not _TOKEN.fullmatch(token):
            raise UploadError(400, f"a token is 1 to 64 letters, digits or '._:-', not {token[:70]!r}")
    if len(set(tokens)) != count:
        raise UploadError(400, "two files have the same token: each file needs its own")
    return tokens


def read_limited(storage: FileStorage, limit: int) -> bytes:
    """The file's bytes, refusing it as soon as it passes `limit`."""
    name = display_name(storage)
    buf = io.BytesIO()
    while True:
        chunk = storage.stream.read(_CHUNK)
        if not chunk:
            break
        buf.write(chunk)
        if buf.tell() > limit:
            raise UploadError(413, too_large(limit), name)
    return buf.getvalue()


def check_image(name: str, data: bytes, settings: Settings) -> Upload:
    """Accept `data` only if it is a whole, reasonably sized image of a known type."""
    if not data:
        raise UploadError(400, "file is empty", name)
    # JPEGs and PNGs are walked before Pillow reads them, part by part in Python; a
    # JPEG once, for this and the truncation check below. The worker applies the same
    # rules (common/pixels.py).
    jpeg, too_slow = parts_refusal(data)
    if too_slow:
        raise UploadError(415, too_slow, name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            if fmt not in FORMATS:
                raise UploadError(415, f"{fmt or 'this'} images are not accepted; send {ACCEPTED}", name)
            # The worker's decoder applies the same rule (common/pixels.py).
            too_large = size_refusal(*img.size, settings.max_image_pixels)
            if too_large:
                raise UploadError(413, too_large, name)
            cut_short = _truncation(img, data, jpeg)
            if cut_short:
                raise UploadError(415, f"damaged or unreadable image: {cut_short}", name)
            # Checks PNG's chunks and checksums without decoding pixels; for most
            # other formats it does little, hence the check above.
            img.verify()
    except UploadError:
        raise
    except PILLOW_REFUSALS as exc:
        raise UploadError(413, pillow_refusal(exc, settings.max_image_pixels), name) from exc
    except UnidentifiedImageError as exc:
        kind = _signature(data)
        if kind and kind not in FORMATS:  # an image, in a format this service does not read
            raise UploadError(415, f"{kind} images are not accepted; send {ACCEPTED}", name) from exc
        if kind:  # it starts like one, but Pillow could not read even its header
            raise UploadError(415, f"damaged or unreadable image: not a valid {kind} file", name) from exc
        raise UploadError(415, f"not an image (the content is not {ACCEPTED})", name) from exc
    except Exception as exc:  # Pillow raises many kinds of errors on damaged files
        raise UploadError(415, f"damaged or unreadable image: {plain_reason(exc)}", name) from exc
    return Upload(name, data, FORMATS[fmt])


def readable_size(n: int) -> str:
    """10485760 -> '10 MB', 20000 -> '19.5 KB' (binary units, as MAX_UPLOAD_BYTES' default)."""
    for unit, size in (("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{round(n / size, 1):g} {unit}"
    return f"{n} bytes"


def too_large(limit: int) -> str:
    """Why a file over the size limit is refused, in the page's units and exactly."""
    return f"file is larger than the limit of {readable_size(limit)} ({limit} bytes)"


def _truncation(img: Image.Image, data: bytes, jpeg: JpegLayout | None) -> str | None:
    """Why `data` is visibly cut short, or None. Cheap checks, no decoding: a full
    decode here would cost the web tier up to ~50 ms of CPU for a 12-megapixel
    JPEG, and the worker refuses whatever these miss. `jpeg`: a JPEG's layout."""
    # Pillow's decoder needs the end-of-image marker (without it the worker refuses
    # the image as truncated); bytes after it, such as a motion photo's video, do not matter.
    if jpeg is not None and not jpeg.ends:
        return "the JPEG data is truncated (it has no end-of-image marker)"
    if img.format == "TIFF" and _tiff_data_ends(img) > len(data):
        return "the TIFF image data is truncated"
    for tile in img.tile:  # uncompressed rows of a known size (BMP)
        stride = tile.args[1] if isinstance(tile.args, tuple) and len(tile.args) > 1 else 0
        if tile.codec_name == "raw" and isinstance(stride, int) and stride > 0:
            rows = tile.extents[3] - tile.extents[1]
            # The last row's padding (up to 3 bytes) may be missing: the decoder does
            # not need it. (Up to 3 bytes of its pixels missing pass here, then.)
            if tile.offset + stride * rows - 3 > len(data):
                return f"the {img.format} pixel data is truncated"
    return None


def _tiff_data_ends(img: Image.Image) -> int:
    """Where the first image's last strip or tile ends, as its header says."""
    tags = getattr(img, "tag_v2", {})
    offsets = tags.get(273) or tags.get(324) or ()  # strip offsets, or tile offsets
    counts = tags.get(279) or tags.get(325) or ()  # and their byte counts
    offsets = offsets if isinstance(offsets, tuple) else (offsets,)
    counts = counts if isinstance(counts, tuple) else (counts,)
    return max((int(o) + int(c) for o, c in zip(offsets, counts, strict=False)), default=0)


# How each accepted format's files begin (WEBP: "RIFF", a size, then "WEBP").
_SIGNATURES = (
    (JPEG_SIGNATURE, "JPEG"), (PNG_SIGNATURE, "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


# ISO media files (HEIF, AVIF) say what they hold in an `ftyp` box at byte 4: a main
# brand, then compatible ones. The most specific brand found names the format.
_ISO_BRANDS = ((b"avif", "AVIF"), (b"avis", "AVIF"), (b"heic", "HEIC"), (b"heix", "HEIC"),
               (b"hevc", "HEIC"), (b"heim", "HEIC"), (b"heis", "HEIC"), (b"mif1", "HEIF"), (b"msf1", "HEIF"))


def _signature(data: bytes) -> str | None:
    """The image format whose signature `data` starts with, if any."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        box = data[8:min(int.from_bytes(data[:4], "big"), 64)]
        brands = {box[i:i + 4] for i in range(0, len(box) - 3, 4)}  # main, version, compatible
        return next((kind for brand, kind in _ISO_BRANDS if brand in brands), None)
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


def validate(storage: FileStorage, settings: Settings) -> Upload:
    """Read and check one uploaded file; raise UploadError naming it if refused."""
    name = display_name(storage)
    data = read_limited(storage, settings.max_upload_bytes)
    return check_image(name, data, settings)


def form_files(request: Request, fields: Iterable[str]) -> list[FileStorage]:
    """The files sent in these form fields, or UploadError for a form that could not be read.

    A multipart body of which nothing could be read is said to be so: Werkzeug
    drops the whole form when, say, a file name is not UTF-8, and "no file"
    would then mislead. So are files sent in other fields beside these, which
    would otherwise be dropped without a word.
    """
    fields = tuple(fields)
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ("", "identity"):  # Werkzeug reads a body as it comes
        raise UploadError(415, f"a body in Content-Encoding {coding[:32]!r} is not read: send the form "
                               "as it is (images are compressed already)")
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if request.mimetype == "multipart/form-data" and request.content_length is None and not chunked:
        # (HTTP/1.0 without a length): Werkzeug reads nothing, and "no file" would mislead.
        raise UploadError(411, "the request has no Content-Length (and is not chunked): its form "
                               "cannot be read")
    # (An empty one, as `curl -F files=` sends, carries nothing to lose.)
    texts = [name for name in fields if any(request.form.getlist(name))]
    if texts:
        # A part without a filename is a text field: curl -F 'files=<cat.jpg' sends
        # the file's bytes so, and Werkzeug keeps it apart from the files.
        raise UploadError(400, f"form field {texts[0]!r} holds text, not a file: send each image "
                               f"as a file (curl -F {texts[0]}=@cat.jpg)")
    files = _real_files(f for name in fields for f in request.files.getlist(name))
    if (not files and request.mimetype == "multipart/form-data" and (request.content_length or chunked)
            and not request.files and not request.form):
        raise UploadError(400, "the multipart form could not be read: is every file name UTF-8, "
                               "and the body well formed?")
    # Werkzeug files a part with no name= under None.
    elsewhere = sorted((name for name in request.files if name not in fields
                        and _real_files(request.files.getlist(name))), key=lambda name: name or "")
    if files and elsewhere:
        raise UploadError(400, f"files in {_field(elsewhere[0])} too: send them all in "
                               + " or ".join(repr(f) for f in fields))
    if elsewhere:  # only there: named, as every refusal of a file is
        stray = _real_files(request.files.getlist(elsewhere[0]))[0]
        raise UploadError(400, f"sent in {_field(elsewhere[0])}: send it in "
                               + " or ".join(repr(f) for f in fields)
                               + f" (curl -F {fields[0]}=@cat.jpg)", display_name(stray))
    return files


def _field(name: str | None) -> str:
    return f"form field {name[:64]!r}" if name else "a form part with no name"


def _real_files(files: Iterable[FileStorage]) -> list[FileStorage]:
    """Drop the empty part a browser sends for a file input left blank."""
    out = []
    for f in files:
        if not f.filename:
            empty = not f.stream.read(1)
            f.stream.seek(0)
            if empty:
                continue
        out.append(f)
    return out
