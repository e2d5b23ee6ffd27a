"""How large an image may be, and how many pieces its file may hold (a JPEG's
segments and scans, a PNG's chunks, a TIFF's pages, a GIF's blocks), and which formats
are read: one rule for the web tier's check and the worker's decoder.

Pillow has a limit of its own (`Image.MAX_IMAGE_PIXELS`, ~89 megapixels): past it
Pillow only warns, past twice it refuses to open the file. The limit that applies
here is the lower of MAX_IMAGE_PIXELS and Pillow's, checked against the size in
the header as soon as a file is opened, in both tiers, so an image the web tier
accepts is one every worker can decode. (Not by turning Pillow's warning into an
error: `warnings.catch_warnings` changes process-wide state, and threads leaving
it undo each other's filters: one bomb in 6,000 got through 8 threads that way.)
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass

from PIL import Image, features
from PIL.PngImagePlugin import MAX_TEXT_CHUNK
from PIL.TiffImagePlugin import PREFIXES as TIFF_PREFIXES

# Pillow's refusals read "Image size (<n> pixels) exceeds limit of <m> pixels, ...".
_PILLOW_SIZE = re.compile(r"\((\d+) pixels\)")
# What Pillow raises (or, where warnings are made errors, warns) on a decompression bomb.
PILLOW_REFUSALS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def pixel_limit(max_pixels: int) -> int:
    """The most pixels an image may have here: MAX_IMAGE_PIXELS, or Pillow's lower limit
    (Settings.from_env refuses a higher MAX_IMAGE_PIXELS; this is for Settings built
    otherwise, as tests do)."""
    return min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)


def readable_size(n: int) -> str:
    """10485760 -> '10 MB', 20000 -> '19.5 KB' (binary units, as MAX_UPLOAD_BYTES' default)."""
    for unit, size in (("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{round(n / size, 1):g} {unit}"
    return f"{n} bytes"


def too_large(limit: int) -> str:
    """Why a file over MAX_UPLOAD_BYTES is refused, in the page's units and exactly: the
    web tier's refusal, and the worker's answer to a stored object that large."""
    return f"file is larger than the limit of {readable_size(limit)} ({limit} bytes)"


# The longest side an image may have (JPEG's own limit). Pillow keeps a pointer and an
# allocation per row, and resizes row by row: a PNG of 1x40,000,000 pixels, within
# the pixel limit and 151 KB, takes a worker 1.5 GB and 5 s to decode.
MAX_IMAGE_SIDE = 65535


# Formats whose decoding holds several times the image, and what their pixel limit is
# divided by. Pillow copies a WebP frame that libwebp decoded into bytes, then into the
# image: ~15 bytes a pixel, +600 MB at 40 megapixels where an RGB PNG takes +165
# (app_tier.images.prepare, measured). At half the limit, +300 MB.
HEAVY_DECODE_DIVISORS = {"WEBP": 2}


def oversize_refusal(width: int, height: int, max_pixels: int, fmt: str | None = None) -> str | None:
    """Why an image of this size (and Pillow's format name) is refused, or None if it is not."""
    divisor = HEAVY_DECODE_DIVISORS.get(fmt or "", 1)
    limit = pixel_limit(max_pixels) // divisor
    if width * height > limit:
        whose = (f" for a {fmt} image (1/{divisor} of other formats': decoding one takes several "
                 "times the memory)") if divisor > 1 else ""
        return f"image is {width}x{height} pixels, more than the limit of {limit}{whose}"
    if max(width, height) > MAX_IMAGE_SIDE:
        return f"image is {width}x{height} pixels: a side longer than {MAX_IMAGE_SIDE} pixels is refused"
    return None


def pillow_refusal(exc: Exception, max_pixels: int) -> str:
    """Pillow's own refusal of a decompression bomb, said in terms of the limit that
    applies (its message quotes its internal threshold, not what this service allows)."""
    size = _PILLOW_SIZE.search(str(exc))
    what = f"{int(size.group(1))} pixels" if size else "too many pixels"
    return f"image has {what}, more than the limit of {pixel_limit(max_pixels)}"


# A progressive JPEG is drawn in scans, each a pass of the decoder over the whole
# image; encoders write about 10 (mozjpeg up to ~20). A 0.3 MB upload of 3,000 tiny
# scans of a 36-megapixel image takes 20 s to decode (~7 ms a scan, growing with
# their number), and one of 3 MB would outlast STALL_TIMEOUT, three times over
# before its dead letter.
MAX_JPEG_SCANS = 100
# Segments (markers with their data) before a JPEG's end. Photos have a few dozen; an
# ICC profile or XMP split into 64 KB pieces adds one per piece. Each costs Pillow's
# header parser (in Python) ~2.5 us: a 10 MB upload of 2.6 million 4-byte comments
# takes the web tier 12 s of CPU. Counted before Pillow opens a JPEG.
MAX_JPEG_SEGMENTS = 2000
# Bytes between segments before the image data: fill (FF), restart markers (FF D0-D7,
# which belong in compressed data) and stray bytes. Pillow steps over them one at a time
# in Python (~0.3 us each, measured: 9 MB of FF took 3.1 s of CPU) before libjpeg
# takes over at the first scan. Encoders write none, or a few bytes of fill.
MAX_JPEG_HEADER_PADDING = 64 * 1024
# A marker, as libjpeg finds one: FF, then a byte that is not 00 (a stuffed FF in
# compressed data), a restart marker D0-D7 or TEM (01) (no segment follows them),
# or FF (fill before the marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
_NO_LENGTH = frozenset({0xD8, 0xD9})  # start and end of image


@dataclass(frozen=True)
class JpegLayout:
    scans: int  # start-of-scan markers of the first image
    ends: bool  # whether its end-of-image marker is there (the decoder needs it)
    segments: int = 0  # counted up to MAX_JPEG_SEGMENTS + 1, where the walk stops
    padding: int = 0  # bytes between segments before the first scan (MAX_JPEG_HEADER_PADDING)


JPEG_SIGNATURE = b"\xff\xd8\xff"  # a JPEG's, or an MPO's (a JPEG with more images after it)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_layout(data: bytes) -> JpegLayout:
    """A JPEG's first image walked as libjpeg walks it: each segment skipped by its
    length (so the scans of an EXIF thumbnail, or an FF D9 in a comment, are not its
    own), stray bytes between segments skipped, compressed data read to its next
    marker; up to the end-of-image marker, not past it (a phone's motion photo puts
    a video there, whose bytes are any at all), or past MAX_JPEG_SEGMENTS segments or
    MAX_JPEG_HEADER_PADDING bytes of padding."""
    scans, segments, padding, pos = 0, 0, 0, 2
    while (found := _JPEG_MARKER.search(data, pos)) is not None:
        at, marker = found.start(), data[found.start() + 1]
        if not scans:
            padding += at - pos
            if padding > MAX_JPEG_HEADER_PADDING:
                break
        if marker == 0xD9:
            return JpegLayout(scans, ends=True, segments=segments, padding=padding)
        if marker in _NO_LENGTH:
            pos = at + 2
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            break
        scans += marker == 0xDA
        pos = at + 2 + max(2, int.from_bytes(data[at + 2:at + 4], "big"))
    return JpegLayout(scans, ends=False, segments=segments, padding=padding)


def jpeg_refusal(layout: JpegLayout) -> str | None:
    """Why a JPEG of too many segments or scans is refused, or None."""
    if layout.segments > MAX_JPEG_SEGMENTS:
        return (f"the JPEG has more than {MAX_JPEG_SEGMENTS} segments (photos have a few dozen), "
                "more than this service reads")
    if layout.padding > MAX_JPEG_HEADER_PADDING:
        return (f"the JPEG has more than {MAX_JPEG_HEADER_PADDING} bytes of padding before its image "
                "data (encoders write a few), more than this service reads")
    scans = layout.scans
    if scans > MAX_JPEG_SCANS:
        return (f"the JPEG is drawn in {scans} scans, more than the limit of {MAX_JPEG_SCANS} "
                "(photos have about 10): decoding it would take minutes")
    return None


# Chunks in a PNG. Pillow reads each in Python (~6 us apiece, at opening for those
# before the image data, when decoding and checking for the rest): a 9.6 MB PNG of
# 800,000 empty chunks takes 5.2 s to open. Encoders write the image data
# in chunks of 8-64 KB, so 10 MB holds at most ~1,300 of them.
MAX_PNG_CHUNKS = 10_000
# Pillow unpacks each zlib-packed chunk of metadata when it opens a PNG, up to 1 MB
# apiece: a colour profile (iCCP) and text (zTXt, and iTXt when packed). 9,000 profiles
# of 1 MB of zeros, a 9.5 MB upload, take 22 s of CPU to open; 24 uploads of 60 packed
# texts, 63 KB each, take the web tier from 190 MB to 1.4 GB. The format
# allows one profile (a few KB; a printer's, up to ~0.5 MB); encoders pack a few texts
# of some KB (ImageMagick: EXIF, XMP, IPTC). Unpacked here to count, 64 KB at a time.
MAX_PNG_PROFILES = 1
MAX_PNG_UNPACKED_BYTES = 4 * 1024**2
# Pillow refuses one such chunk past this (PngImagePlugin.MAX_TEXT_CHUNK), but only when
# it reads it: one after the image data would pass the web tier's check, which does
# not decode, and fail in the worker.
MAX_PNG_CHUNK_UNPACKED_BYTES = MAX_TEXT_CHUNK
_UNPACK_STEP = 64 * 1024
_PACKED_KINDS = (b"iCCP", b"zTXt", b"iTXt")


@dataclass
class PngLayout:
    chunks: int = 0  # counted up to MAX_PNG_CHUNKS + 1, where the walk stops
    profiles: int = 0
    unpacked_bytes: int = 0  # of its packed metadata, counted up to MAX_PNG_UNPACKED_BYTES + 1
    largest_unpacked: int = 0  # of one chunk, counted up to MAX_PNG_CHUNK_UNPACKED_BYTES + 1


def png_layout(data: bytes) -> PngLayout:
    """The chunks of a PNG up to its end chunk, and what Pillow would unpack of them."""
    layout, pos = PngLayout(), len(PNG_SIGNATURE)
    while pos + 8 <= len(data) and layout.chunks <= MAX_PNG_CHUNKS:
        layout.chunks += 1
        kind, length = data[pos + 4:pos + 8], int.from_bytes(data[pos:pos + 4], "big")
        if kind == b"IEND":
            break
        if kind == b"iCCP":
            layout.profiles += 1
        budget = MAX_PNG_UNPACKED_BYTES + 1 - layout.unpacked_bytes
        if kind in _PACKED_KINDS and budget > 0:
            body = data[pos + 8:pos + 8 + length]
            size = _unpacked_size(_packed_part(kind, body), min(budget, MAX_PNG_CHUNK_UNPACKED_BYTES + 1))
            layout.unpacked_bytes += size
            layout.largest_unpacked = max(layout.largest_unpacked, size)
        pos += 12 + length  # length, type, data, CRC
    return layout


def _packed_part(kind: bytes, body: bytes) -> bytes:
    """The zlib stream in a chunk Pillow unpacks, or b"". Each starts with a keyword
    and a zero byte; then iCCP and zTXt have a method byte, iTXt a flag, a method
    byte, and two texts each ended by a zero byte. Pillow unpacks an iTXt whose flag
    is not 0 (the format says 1; a bomb may say 2) and method 0."""
    start = body.find(b"\0") + 1
    if not start:
        return b""
    if kind in (b"iCCP", b"zTXt"):
        return body[start + 1:]
    if kind == b"iTXt" and body[start:start + 1] not in (b"", b"\0") and body[start + 1:start + 2] == b"\0":
        language_end = body.find(b"\0", start + 2)
        translated_end = body.find(b"\0", language_end + 1) if language_end >= 0 else -1
        return body[translated_end + 1:] if translated_end >= 0 else b""
    return b""


def _unpacked_size(packed: bytes, at_most: int) -> int:
    """How many bytes `packed` unpacks to, counted up to `at_most` (0 if it is not zlib)."""
    unpacker, size = zlib.decompressobj(), 0
    try:
        while packed and size < at_most:
            size += len(unpacker.decompress(packed, _UNPACK_STEP))
            packed = unpacker.unconsumed_tail
    except zlib.error:  # Pillow refuses it, or skips it
        pass
    return min(size, at_most)


def png_refusal(data: bytes) -> str | None:
    """Why a PNG of too many chunks, or of too much packed metadata, is refused, or None
    (for anything else too). Meant to run before Pillow opens it."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    layout = png_layout(data)
    if layout.chunks > MAX_PNG_CHUNKS:
        return (f"the PNG has more than {MAX_PNG_CHUNKS} chunks (encoders write one per 8-64 KB), "
                "more than this service reads")
    if layout.profiles > MAX_PNG_PROFILES:
        return f"the PNG has {layout.profiles} colour profiles (iCCP chunks): the format allows one"
    if layout.largest_unpacked > MAX_PNG_CHUNK_UNPACKED_BYTES:
        return (f"the PNG holds a text or colour-profile chunk that unpacks to more than "
                f"{MAX_PNG_CHUNK_UNPACKED_BYTES // 1024**2} MB, more than this service reads")
    if layout.unpacked_bytes > MAX_PNG_UNPACKED_BYTES:
        return (f"the PNG's compressed metadata (colour profile and texts) unpacks to more than "
                f"{MAX_PNG_UNPACKED_BYTES // 1024**2} MB (photos carry some KB)")
    return None


# Strips or tiles of a TIFF's first image. Pillow makes a Python object of each when it
# opens the file, and the web tier's truncation check walks them: a 10 MB TIFF of 2.56
# million 1x1 tiles takes 4.5 s and ~800 MB to open, 9.7 s in the web tier's check and
# 14.6 s in a worker. Encoders write a strip or tile per 8-64 KB, or a strip
# per row at most: MAX_IMAGE_SIDE rows.
MAX_TIFF_PARTS = 65_536
# Every header Pillow opens as a TIFF: classic, BigTIFF, and two it calls invalid but
# reads all the same (their first two bytes say the byte order): left out, they would
# skip the check.
TIFF_SIGNATURES = tuple(TIFF_PREFIXES)
# Entries of a TIFF's first directory: Pillow reads each in Python as it opens the file.
# A classic TIFF holds 65,535 at most (~0.25 s); a BigTIFF's count is 8 bytes, and 500,000
# entries in 10 MB took 1.8 s in the web tier and 2.6 s in a worker. Encoders write 10-40.
MAX_TIFF_ENTRIES = 65_535
_WIDTH, _LENGTH, _STRIP_OFFSETS, _TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS = 256, 257, 273, 322, 323, 324
# A side a TIFF's tiles may have beyond its image's (tiff_refusal): a tile of 2048x2048
# decodes to 32 MB at most (4 samples of 16 bits).
MAX_TIFF_TILE_SIDE = 2048
# The bytes of a TIFF entry's value types whose first value tiff_layout reads: SHORT,
# LONG, LONG8.
_VALUE_SIZES = {3: 2, 4: 4, 16: 8}


@dataclass(frozen=True)
class TiffLayout:
    """What a TIFF's first directory declares, as far as its entries can be read."""

    entries: int = 0
    parts: int = 0  # strips or tiles (the larger count, if both)
    width: int = 0
    length: int = 0
    tile_width: int = 0
    tile_length: int = 0


def tiff_layout(data: bytes) -> TiffLayout:
    """A TIFF's first directory; zeros where it cannot be read."""
    order = "little" if data[:2] == b"II" else "big"
    if data[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF: 8-byte offsets and counts
        directory, entries_size, count_size, entry_size = int.from_bytes(data[8:16], order), 8, 8, 20
    else:
        directory, entries_size, count_size, entry_size = int.from_bytes(data[4:8], order), 2, 4, 12
    entries = int.from_bytes(data[directory:directory + entries_size], order)
    first = directory + entries_size
    values: dict[int, int] = {}
    parts = 0
    # An entry past the file's end ends the walk: as many as the file can hold, at most.
    # At most the limit's worth too: a directory past it is refused whatever it holds.
    last = min(first + min(entries, MAX_TIFF_ENTRIES + 1) * entry_size, len(data) - entry_size + 1)
    for at in range(first, last, entry_size):
        tag = int.from_bytes(data[at:at + 2], order)
        if tag in (_STRIP_OFFSETS, _TILE_OFFSETS):
            parts = max(parts, int.from_bytes(data[at + 4:at + 4 + count_size], order))
        elif tag in (_WIDTH, _LENGTH, _TILE_WIDTH, _TILE_LENGTH):
            size = _VALUE_SIZES.get(int.from_bytes(data[at + 2:at + 4], order))
            if size is not None:  # its first value, held in the entry itself
                value_at = at + 4 + count_size
                values[tag] = int.from_bytes(data[value_at:value_at + size], order)
    return TiffLayout(entries, parts, values.get(_WIDTH, 0), values.get(_LENGTH, 0),
                      values.get(_TILE_WIDTH, 0), values.get(_TILE_LENGTH, 0))


def tiff_refusal(data: bytes) -> str | None:
    """Why a TIFF of too many strips, tiles or directory entries, or of tiles larger than
    its image, is refused, or None (for anything else too). Meant to run before Pillow
    opens it."""
    if not data.startswith(TIFF_SIGNATURES):
        return None
    layout = tiff_layout(data)
    if layout.parts > MAX_TIFF_PARTS:
        return (f"the TIFF is made of {layout.parts} strips or tiles, more than the limit of "
                f"{MAX_TIFF_PARTS} (encoders write one per 8-64 KB), more than this service reads")
    if layout.entries > MAX_TIFF_ENTRIES:
        return (f"the TIFF's first directory has {layout.entries} entries, more than the "
                f"{MAX_TIFF_ENTRIES} a classic TIFF can hold (encoders write 10-40)")
    # libtiff decodes a whole tile whatever the image's size: an 8x8 image of one
    # 32768x32768 tile (1 MB, deflated zeros) took a worker 1 GB, and its pixel count
    # passed every limit. Encoders write tiles of 256-1024 pixels a side, small images
    # too, or one covering the image (a multiple of 16 a side).
    if layout.width and layout.length and (
            layout.tile_width > max(_rounded_up(layout.width, 16), MAX_TIFF_TILE_SIDE)
            or layout.tile_length > max(_rounded_up(layout.length, 16), MAX_TIFF_TILE_SIDE)):
        return (f"the TIFF's tiles ({layout.tile_width}x{layout.tile_length}) are larger than its "
                f"image ({layout.width}x{layout.length}) and than {MAX_TIFF_TILE_SIDE} pixels a side, "
                "which encoders never write")
    return None


def _rounded_up(value: int, step: int) -> int:
    return -(-value // step) * step


# A BMP compressed with RLE8 or RLE4 (compression 1 or 2) is decoded by Pillow in Python,
# a step per pixel or per row's end: 3.5 KB declaring 65535x610 pixels, a pixel and a
# row's end on each row, took a worker 4.5 s of CPU (the interpreter's lock held). Over
# this many pixels (~0.45 s) such a BMP is refused; uncompressed BMPs are read in C.
MAX_RLE_BMP_PIXELS = 4_000_000
BMP_SIGNATURE = b"BM"


def bmp_refusal(data: bytes) -> str | None:
    """Why an RLE-compressed BMP of too many pixels is refused, or None (for anything else
    too). Meant to run before Pillow opens it."""
    if not data.startswith(BMP_SIGNATURE) or len(data) < 34:
        return None
    if int.from_bytes(data[14:18], "little") < 40:  # an OS/2 header: no compression field
        return None
    width, height = (abs(int.from_bytes(data[at:at + 4], "little", signed=True)) for at in (18, 22))
    if int.from_bytes(data[30:34], "little") in (1, 2) and width * height > MAX_RLE_BMP_PIXELS:
        return (f"an RLE-compressed BMP of more than {MAX_RLE_BMP_PIXELS:,} pixels ({width}x{height}) "
                "is refused: decoding one is slow (save it uncompressed, or as PNG)")
    return None


# Extension blocks and their sub-blocks before a GIF's first image. Pillow reads each
# in Python as it opens the file: a 10 MB GIF of 3.5 million empty comments takes 0.9 s
# to open in each tier, twenty in one request hold the web tier for 27 s.
# Encoders write a few (a loop count, a frame's delay); a colour profile adds one per
# 255 bytes, an XMP packet one per ~60, so a 0.5 MB profile makes ~2,000.
MAX_GIF_BLOCKS = 10_000
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
_GIF_EXTENSION, _GIF_IMAGE, _GIF_TRAILER = 0x21, 0x2C, 0x3B


def gif_blocks(data: bytes) -> int:
    """The extension blocks and sub-blocks before a GIF's first image, and the stray
    bytes between them, as Pillow walks them (a step in Python each: it skips a byte
    that starts nothing, and a walk that stopped there would let 10 MB of them
    through); counted up to MAX_GIF_BLOCKS + 1, where the walk stops."""
    flags = data[10] if len(data) > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global colour table
    blocks = 0
    while pos < len(data) and data[pos] not in (_GIF_IMAGE, _GIF_TRAILER) and blocks <= MAX_GIF_BLOCKS:
        if data[pos] != _GIF_EXTENSION:
            blocks, pos = blocks + 1, pos + 1
            continue
        pos += 2  # the introducer and the extension's label
        while pos < len(data) and blocks <= MAX_GIF_BLOCKS:
            blocks += 1
            size = data[pos]
            pos += 1 + size
            if not size:  # the terminator
                break
    return blocks


def gif_refusal(data: bytes) -> str | None:
    """Why a GIF of too many blocks before its image is refused, or None (for anything
    else too). Meant to run before Pillow opens it."""
    if data.startswith(GIF_SIGNATURES) and gif_blocks(data) > MAX_GIF_BLOCKS:
        return (f"the GIF has more than {MAX_GIF_BLOCKS} blocks or stray bytes before its image "
                "(encoders write a few), more than this service reads")
    return None


def parts_refusal(data: bytes) -> tuple[JpegLayout | None, str | None]:
    """A JPEG's layout (None for any other image), and why an image of too many parts
    for its format (JPEG segments or scans, PNG chunks, GIF blocks, TIFF strips, tiles
    or directory entries, TIFF tiles larger than the image, an RLE BMP's pixels) is
    refused, or None. Cheap, and meant to run before Pillow opens it: Pillow
    reads those parts in Python."""
    jpeg = jpeg_layout(data) if data.startswith(JPEG_SIGNATURE) else None
    if jpeg is not None:
        return jpeg, jpeg_refusal(jpeg)
    return None, png_refusal(data) or gif_refusal(data) or tiff_refusal(data) or bmp_refusal(data)


# The formats both tiers read, by Pillow's names (its JPEG reader also gives MPO, the
# JPEG of many phone cameras; AVIF is in Pillow's own wheels from 11.2 on). Opened
# with only these, Pillow hands no file to another reader: its ICO reader decodes
# the PNG inside a 0.7 MB icon while opening it, 178 megapixels past every check
# here (six at once take the web tier to 3.8 GB), before the web tier sees an icon
# and refuses it.
READ_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", *(("AVIF",) if features.check("avif") else ()))


# What format_not_read gives the other readers: a header names its format well within it,
# and some of them walk whatever they are given in Python (EPS's comment lines, PPM's,
# JPEG 2000's boxes, IPTC's records): 10 MB of EPS comments took 6.1 s of CPU to be
# refused, four in one upload 29 s, and a few such uploads held the web tier's upload
# memory for minutes, every other upload refused "busy".
FORMAT_SNIFF_BYTES = 16 * 1024


def format_not_read(data: bytes) -> str | None:
    """The format of `data` if Pillow reads it and this service does not, by a look at
    its header alone (its first FORMAT_SNIFF_BYTES); None otherwise. Not with ICO's
    reader, which decodes the image inside an icon as it opens it: an icon is named by
    its first bytes."""
    if data[:4] == b"\0\0\1\0":
        return "ICO"
    Image.init()
    others = [fmt for fmt in Image.OPEN if fmt not in ("ICO", *READ_FORMATS)]
    try:
        with Image.open(io.BytesIO(data[:FORMAT_SNIFF_BYTES]), formats=others) as img:
            return img.format
    except Exception:  # noqa: BLE001 (any reader's failure: no format it can name)
        return None
