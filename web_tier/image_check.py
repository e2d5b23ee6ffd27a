"""Checking an uploaded image's bytes before anything is stored.

The type is decided by the bytes (Pillow), never by the name or the client's
Content-Type, and the pixel count is read from the header only, so a small
file that would decompress into gigabytes is refused before anyone decodes it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, TiffImagePlugin, UnidentifiedImageError
from werkzeug.datastructures import FileStorage

from common.config import Settings
from common.image_limits import (
    JPEG_SIGNATURE,
    PILLOW_REFUSALS,
    PNG_SIGNATURE,
    READ_FORMATS,
    JpegLayout,
    format_not_read,
    oversize_refusal,
    parts_refusal,
    pillow_refusal,
)
from common.pillow_errors import plain_reason
from web_tier.filenames import display_name
from web_tier.form import read_limited
from web_tier.refusals import Code, Refusal

# Pillow format -> Content-Type stored with the object. FORMATS: those both tiers read
# (common/image_limits.py), and MPO, the JPEG of many phone cameras, which Pillow's JPEG
# reader gives. The worker decodes with the same Pillow.
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
}
FORMATS = {fmt: CONTENT_TYPES[fmt] for fmt in ("MPO", *READ_FORMATS)}
# A file of an accepted type that cannot be read (cut short, damaged, or built to be
# slow to read) is 422 (Unprocessable Content), as the worker's answer for an image it cannot decode; 415 is
# for what is not an image of an accepted type: both tiers give the same reasons the same code.
UNREADABLE = 422
ACCEPTED = ", ".join(READ_FORMATS[:-1]) + " or " + READ_FORMATS[-1]


@dataclass(frozen=True)
class Upload:
    """An accepted image: its original name, bytes and detected type."""

    filename: str
    data: bytes
    content_type: str


def validate(storage: FileStorage, settings: Settings) -> Upload:
    """Read and check one uploaded file; raise Refusal naming it if refused."""
    name = display_name(storage)
    data = read_limited(storage, settings.max_upload_bytes)
    return check_image(name, data, settings)


def check_image(name: str, data: bytes, settings: Settings) -> Upload:
    """Accept `data` only if it is a whole, reasonably sized image of a known type."""
    if not data:
        raise Refusal(400, "file is empty", name, code=Code.EMPTY_FILE)
    # JPEGs and PNGs are walked before Pillow reads them, part by part in Python; a
    # JPEG once, for this and the truncation check below. The worker applies the same
    # rules (common/image_limits.py).
    jpeg, too_slow = parts_refusal(data)
    if too_slow:
        raise Refusal(UNREADABLE, too_slow, name, code=Code.UNREADABLE_IMAGE)
    try:
        with Image.open(io.BytesIO(data), formats=READ_FORMATS) as img:
            fmt = img.format or ""
            if fmt not in FORMATS:
                raise Refusal(415, f"{fmt or 'this'} images are not accepted; send {ACCEPTED}", name,
                              code=Code.UNSUPPORTED_TYPE)
            # The worker's decoder applies the same rule (common/image_limits.py).
            pixel_refusal = oversize_refusal(*img.size, settings.max_image_pixels, fmt)
            if pixel_refusal:
                raise Refusal(413, pixel_refusal, name, code=Code.TOO_LARGE)
            cut_short = _truncation(img, data, jpeg)
            if cut_short:
                raise Refusal(UNREADABLE, f"damaged or unreadable image: {cut_short}", name,
                              code=Code.UNREADABLE_IMAGE)
            # Checks PNG's chunks and checksums without decoding pixels; for most
            # other formats it does little, hence the check above.
            img.verify()
    except Refusal:
        raise
    except PILLOW_REFUSALS as exc:
        raise Refusal(413, pillow_refusal(exc, settings.max_image_pixels), name,
                      code=Code.TOO_LARGE) from exc
    except UnidentifiedImageError as exc:
        kind = _signature(data) or format_not_read(data)
        if kind and kind not in FORMATS:  # an image, in a format this service does not read
            raise Refusal(415, f"{kind} images are not accepted; send {ACCEPTED}", name,
                          code=Code.UNSUPPORTED_TYPE) from exc
        if kind == "TIFF" and _samples_not_read(data):  # valid, and not "not a valid TIFF"
            raise Refusal(UNREADABLE, "unreadable image: a TIFF of samples this service does not read "
                                      "(such as colour in floating point or 32-bit integers)",
                          name, code=Code.UNREADABLE_IMAGE) from exc
        if kind:  # it starts like one, but Pillow could not read even its header
            raise Refusal(UNREADABLE, f"damaged or unreadable image: not a valid {kind} file",
                          name, code=Code.UNREADABLE_IMAGE) from exc
        raise Refusal(415, f"not an image (the content is not {ACCEPTED})", name,
                      code=Code.NOT_AN_IMAGE) from exc
    except Exception as exc:  # Pillow raises many kinds of errors on damaged files
        raise Refusal(UNREADABLE, f"damaged or unreadable image: {plain_reason(exc)}", name,
                      code=Code.UNREADABLE_IMAGE) from exc
    return Upload(name, data, FORMATS[fmt])


def _truncation(img: Image.Image, data: bytes, jpeg: JpegLayout | None) -> str | None:
    """Why `data` is visibly cut short, or None. Cheap checks, no decoding: a full
    decode here would cost the web tier up to ~50 ms of CPU for a 12-megapixel
    JPEG, and the worker refuses whatever these miss. `jpeg`: a JPEG's layout."""
    # Pillow's decoder needs the end-of-image marker (without it the worker refuses
    # the image as truncated); bytes after it, such as a motion photo's video, do not matter.
    if jpeg is not None and not jpeg.ends:
        if data.endswith(b"\xff\xd9"):  # it ends as a whole JPEG does: damaged, not cut short
            return "the JPEG data is damaged (its segments do not lead to its end-of-image marker)"
        return "the JPEG data is truncated (it has no end-of-image marker)"
    if img.format == "TIFF" and _tiff_data_ends(img) > len(data):
        return "the TIFF image data is truncated"
    if img.format == "BMP" and _bmp_data_ends(img, data) > len(data):
        return "the BMP pixel data is truncated"
    return None


def _bmp_data_ends(img: Image.Image, data: bytes) -> int:
    """Where an uncompressed BMP's pixels end, as its header says: the last row's
    padding to 4 bytes is left out, as the decoder does not need it. 0 for others."""
    tile = img.tile[0] if len(img.tile) == 1 else None
    stride = tile.args[1] if tile and isinstance(tile.args, tuple) and len(tile.args) > 1 else 0
    if tile is None or tile.codec_name != "raw" or not isinstance(stride, int) or stride <= 0:
        return 0
    # Bits per pixel: where the header puts them, in OS/2's 12-byte header or the later ones.
    at = 24 if int.from_bytes(data[14:18], "little") == 12 else 28
    bits = int.from_bytes(data[at:at + 2], "little")
    x0, y0, x1, y1 = tile.extents
    return tile.offset + stride * (y1 - y0 - 1) + -(-(x1 - x0) * bits // 8)


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


def _samples_not_read(tiff: bytes) -> bool:
    """Whether Pillow refuses this TIFF for the layout of its samples (floating-point
    colour, say), which it says apart from damage."""
    try:
        TiffImagePlugin.TiffImageFile(io.BytesIO(tiff)).close()
    except SyntaxError as exc:
        return "unknown pixel mode" in str(exc)
    except Exception:  # noqa: BLE001 (damage of any other kind)
        return False
    return False


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
