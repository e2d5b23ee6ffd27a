"""The rules both tiers apply to an image's bytes (common/image_limits.py), checked through the
web tier's check_image and the worker's prepare."""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app_tier.images import BadImage, decode, prepare
from common.image_limits import MAX_IMAGE_SIDE, MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS, MAX_PNG_CHUNKS
from tests.conftest import jpeg_of_many_scans, make_image
from tests.unit.conftest import upload
from web_tier.image_check import ACCEPTED, FORMATS, check_image
from web_tier.refusals import Refusal

pytestmark = pytest.mark.timeout(120)


def encode(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims another size (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def png_with_bad_header_crc() -> bytes:
    data = bytearray(encode(Image.new("L", (4, 4)), "PNG"))
    data[29] ^= 0xFF  # the IHDR chunk's checksum
    return bytes(data)


def encode_with(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def reencoded(data: bytes, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format=fmt, **options)
    return out.getvalue()


def decodes(data: bytes) -> bool:
    """Whether Pillow decodes every pixel, as the worker must."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:
        return False


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


BAD = [
    pytest.param(b"just some text, not an image", "notes.jpg", 415, "not_an_image", "not an image",
                 id="text-named-jpg"),
    pytest.param(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "doc.png", 415, "not_an_image", "not an image",
                 id="pdf-named-png"),
    pytest.param(encode(Image.new("RGB", (8, 8)), "PPM"), "x.ppm", 415, "unsupported_type",
                 "PPM images are not accepted", id="unaccepted-format"),
    # Its first bytes are also a CUR's: it must not be named a CUR.
    pytest.param(encode(Image.new("RGB", (8, 8)), "TGA"), "x.tga", 415, "unsupported_type",
                 "TGA images are not accepted", id="tga"),
    # Text whose first bytes PPM's reader would look at ("P" and a digit).
    pytest.param(b"P3 notes: install Python 3.11\n", "notes.png", 415, "not_an_image", "not an image",
                 id="text-like-ppm"),
    pytest.param(make_image(1, fmt="PNG")[:200], "cut.png", 422, "unreadable_image",
                 "damaged or unreadable image: the file ends before its image data does (cut short)",
                 id="truncated"),  # Pillow says "Truncated File Read"
    pytest.param(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "logo.svg", 415,
                 "unsupported_type", "SVG images are not accepted", id="svg"),
    pytest.param(png_with_bad_header_crc(), "crc.png", 422, "unreadable_image",
                 "damaged or unreadable image: not a valid PNG file", id="bad-header-checksum"),
    pytest.param(b"\xff\xd8\xff\xe0" + b"\x00" * 40, "stub.jpg", 422, "unreadable_image",
                 "not a valid JPEG file", id="jpeg-stub"),
    pytest.param(make_image(1)[:3000], "half.jpg", 422, "unreadable_image", "JPEG data is truncated",
                 id="truncated-jpeg"),
    pytest.param(make_image(1)[:-2], "no-end.jpg", 422, "unreadable_image", "no end-of-image marker",
                 id="jpeg-without-end"),
    # Garbage mid-file whose bytes read as a segment of 65,535 bytes: the walk jumps past
    # the end-of-image marker, which is there all the same.
    pytest.param(make_image(1)[:2000] + b"\xff\xc4\xff\xff" + make_image(1)[2004:], "garbled.jpg", 422,
                 "unreadable_image", "JPEG data is damaged (its segments do not lead to its end-of-image",
                 id="jpeg-garbled-mid-file"),
    pytest.param(make_image(1, fmt="BMP")[:-1000], "cut.bmp", 422, "unreadable_image",
                 "BMP pixel data is truncated", id="truncated-bmp"),
    pytest.param(b"", "empty.jpg", 400, "empty_file", "empty", id="empty"),
    pytest.param(noise_png(400), "huge.png", 413, "too_large", "larger than the limit", id="too-many-bytes"),
    pytest.param(png_claiming(7000, 7000), "bomb.png", 413, "too_large", "7000x7000", id="too-many-pixels"),
    # Past twice Pillow's own limit, Pillow refuses it; said against the configured limit.
    pytest.param(png_claiming(100_000, 100_000), "megabomb.png", 413, "too_large",
                 "image has 10000000000 pixels, more than the limit of 40000000",
                 id="pillow-bomb-error"),
]


@pytest.mark.parametrize(("data", "name", "status", "code", "reason"), BAD)
def test_bad_upload_is_refused_naming_the_file(web_client, data, name, status, code, reason):
    response = upload(web_client, [(data, name)])
    assert response.status_code == status
    body = response.get_json()
    assert body["filename"] == name
    assert reason in body["error"]
    assert body["code"] == code
    assert body["rejected"] == [{"index": 0, "filename": name, "error": body["error"], "code": code,
                                 "status": status}]
    assert "batch_id" not in body  # nothing stored: no batch to follow
    # The service still answers the next request.
    assert upload(web_client, [(make_image(2), "fine.jpg")]).status_code == 202


@pytest.mark.parametrize("options", [{}, {"progressive": True}], ids=["baseline", "progressive"])
def test_the_upload_check_refuses_a_cut_jpeg_exactly_when_the_decoder_would(web_settings, options):
    whole = reencoded(make_image(5), "JPEG", **options)
    for cut in range(40, len(whole) + 1, 97):
        data = whole[:cut]
        try:
            check_image("cut.jpg", data, web_settings)
            accepted = True
        except Refusal:
            accepted = False
        assert accepted == decodes(data), f"cut at {cut} of {len(whole)} bytes"


@pytest.mark.parametrize("fmt, mode, width, options", [
    ("TIFF", "RGB", 61, {}), ("TIFF", "RGB", 61, {"compression": "tiff_lzw"}),
    ("TIFF", "RGB", 61, {"strip_size": 2048}),
    # A BMP's rows are padded to 4 bytes; the last row's padding may be missing, its pixels not.
    ("BMP", "RGB", 61, {}), ("BMP", "RGB", 64, {}), ("BMP", "RGBA", 61, {}), ("BMP", "P", 61, {}),
    ("BMP", "L", 62, {}), ("BMP", "1", 61, {}), ("BMP", "1", 64, {}),
], ids=["tiff", "tiff-lzw", "tiff-strips", "bmp-padded", "bmp-unpadded", "bmp-32-bit", "bmp-palette",
        "bmp-grey", "bmp-1-bit", "bmp-1-bit-unpadded"])
# Pillow warns when it reads a header cut short; the check refuses such files all the same.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning", "ignore:Truncated File Read:UserWarning")
def test_the_upload_check_refuses_a_cut_tiff_or_bmp_exactly_when_the_decoder_would(web_settings, fmt, mode,
                                                                                   width, options):
    image = Image.open(io.BytesIO(make_image(7, size=(width, 48)))).convert(mode)
    whole = encode_with(image, fmt, **options)
    for cut in [*range(40, len(whole), 331), *range(len(whole) - 8, len(whole) + 1)]:
        data = whole[:cut]
        try:
            check_image(f"cut.{fmt.lower()}", data, web_settings)
            accepted = True
        except Refusal:
            accepted = False
        assert accepted == decodes(data), f"cut at {cut} of {len(whole)} bytes"


def test_bytes_after_a_jpegs_end_do_not_matter(web_settings):
    """As after a phone's motion photo: a video follows the image, markers and all."""
    trailer = b"\x00\x00ftypmp42" + bytes(range(256)) * 40 + b"\xff\xda\x00\x08\xff\xd8"
    for options in ({}, {"progressive": True}):
        data = reencoded(make_image(6), "JPEG", **options) + trailer
        assert decodes(data)
        assert check_image("motion.jpg", data, web_settings).content_type == "image/jpeg"
    whole_bmp = make_image(6, fmt="BMP")
    assert check_image("whole.bmp", whole_bmp, web_settings).content_type == "image/bmp"


def test_a_jpeg_of_too_many_scans_is_refused_as_the_worker_would(web_settings):
    """Each scan is a decode of the whole image: 3,000 of them in 0.3 MB took 20 s."""
    within, beyond = jpeg_of_many_scans(MAX_JPEG_SCANS), jpeg_of_many_scans(MAX_JPEG_SCANS + 1)
    assert decodes(within) and decodes(beyond)  # valid JPEGs, only slow to decode at scale
    assert check_image("ok.jpg", within, web_settings).content_type == "image/jpeg"
    prepare(within, web_settings.max_image_pixels)
    with pytest.raises(Refusal) as refused:
        check_image("slow.jpg", beyond, web_settings)
    assert refused.value.status == 422 and f"drawn in {MAX_JPEG_SCANS + 1} scans" in refused.value.reason
    with pytest.raises(BadImage, match=f"drawn in {MAX_JPEG_SCANS + 1} scans"):
        prepare(beyond, web_settings.max_image_pixels)


def forbid_pillow(monkeypatch) -> None:
    """From here on, a test fails if anything asks Pillow to open a file."""
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("Pillow was asked to read it"))


def test_a_jpeg_of_too_many_segments_is_refused_before_pillow_reads_it(web_settings, monkeypatch):
    """Pillow reads a JPEG's header segment by segment, in Python: a 10 MB upload of
    2.6 million 4-byte comments takes the web tier 12 s of CPU."""
    photo = make_image(6)
    padded = {n: photo[:2] + b"\xff\xfe\x00\x02" * n + photo[2:]
              for n in (MAX_JPEG_SEGMENTS - 20, MAX_JPEG_SEGMENTS + 1, 2_600_000)}
    assert decodes(padded[MAX_JPEG_SEGMENTS + 1])  # a valid JPEG, only slow to read at scale
    assert check_image("ok.jpg", padded[MAX_JPEG_SEGMENTS - 20], web_settings).content_type == "image/jpeg"
    prepare(padded[MAX_JPEG_SEGMENTS - 20], web_settings.max_image_pixels)

    forbid_pillow(monkeypatch)
    for n in (MAX_JPEG_SEGMENTS + 1, 2_600_000):
        with pytest.raises(Refusal) as refused:
            check_image("padded.jpg", padded[n], web_settings)
        assert refused.value.status == 422
        assert f"more than {MAX_JPEG_SEGMENTS} segments" in refused.value.reason
        with pytest.raises(BadImage, match=f"more than {MAX_JPEG_SEGMENTS} segments"):
            prepare(padded[n], web_settings.max_image_pixels)
    # The walk itself stops there, whatever the file's size.
    from common.image_limits import jpeg_layout

    assert jpeg_layout(padded[2_600_000]).segments == MAX_JPEG_SEGMENTS + 1


@pytest.mark.parametrize("pad", [b"\xff", b"\xff\xd0"], ids=["fill", "restart markers"])
def test_a_jpeg_padded_before_its_image_data_is_refused_before_pillow_reads_it(
        web_settings, monkeypatch, pad):
    """Pillow steps over fill bytes and restart markers between a JPEG's header segments
    one at a time, in Python: 9 MB of fill took the web tier 3.1 s of CPU, and the
    segment count never saw them."""
    from common.image_limits import MAX_JPEG_HEADER_PADDING, jpeg_layout

    photo = make_image(7)
    fits = photo[:2] + pad * (MAX_JPEG_HEADER_PADDING // len(pad)) + photo[2:]
    assert check_image("ok.jpg", fits, web_settings).content_type == "image/jpeg"
    prepare(fits, web_settings.max_image_pixels)
    beyond = {n: photo[:2] + pad * n + photo[2:]
              for n in (MAX_JPEG_HEADER_PADDING // len(pad) + 1, 4_500_000)}
    assert decodes(beyond[4_500_000])  # a valid JPEG, only slow to read

    forbid_pillow(monkeypatch)
    for data in beyond.values():
        with pytest.raises(Refusal) as refused:
            check_image("padded.jpg", data, web_settings)
        assert refused.value.status == 422
        assert f"more than {MAX_JPEG_HEADER_PADDING} bytes of padding" in refused.value.reason
        with pytest.raises(BadImage, match="bytes of padding"):
            prepare(data, web_settings.max_image_pixels)
    # Padding in the compressed data is libjpeg's to skip, in C: not counted.
    assert jpeg_layout(photo[:-2] + pad * 100_000 + photo[-2:]).padding == 0


def test_a_png_of_too_many_chunks_is_refused_before_pillow_reads_it(web_settings, monkeypatch):
    """Pillow reads a PNG chunk by chunk, in Python: 800,000 empty chunks in 9.6 MB take
    5.2 s to open."""
    photo = encode(Image.new("RGB", (16, 16), (9, 99, 199)), "PNG")
    empty_chunk = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))

    def padded(chunks: int) -> bytes:  # after the header chunk, before the image data
        return photo[:33] + empty_chunk * chunks + photo[33:]

    fits = padded(MAX_PNG_CHUNKS - 10)
    assert check_image("ok.png", fits, web_settings).content_type == "image/png"
    prepare(fits, web_settings.max_image_pixels)
    forbid_pillow(monkeypatch)
    for chunks in (MAX_PNG_CHUNKS, 800_000):
        with pytest.raises(Refusal) as refused:
            check_image("padded.png", padded(chunks), web_settings)
        assert refused.value.status == 422
        assert f"more than {MAX_PNG_CHUNKS} chunks" in refused.value.reason
        with pytest.raises(BadImage, match=f"more than {MAX_PNG_CHUNKS} chunks"):
            prepare(padded(chunks), web_settings.max_image_pixels)


# Files no reader of this service's formats takes, which other Pillow readers walk in
# Python to their end (10 MB each).
WALKED_TO_THE_END = {
    "eps-comments": b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"%\n" * 5_000_000,
    "ppm-comment": b"P6\n#" + b"x" * 10_000_000,
    "iptc-records": b"\x1c\x01\x00\x00\x00" * 2_000_000,
    "jpeg2000-boxes": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x08free" * 1_250_000,
}


@pytest.mark.parametrize("data", WALKED_TO_THE_END.values(), ids=WALKED_TO_THE_END.keys())
def test_a_file_no_accepted_format_reads_is_named_from_its_header_alone(web_settings, data):
    """Naming the format of a file refused as not accepted gave it to every other Pillow
    reader whole: 10 MB of EPS comment lines took 6.1 s of CPU to refuse, and a few such
    uploads held the web tier's upload memory for minutes (every other upload "busy").
    Counted in Python calls, not timed: a walk to the end makes millions."""
    import sys

    calls = 0

    def count(_frame, event, _arg) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        with pytest.raises(Refusal) as refused:
            check_image("upload.jpg", data, web_settings)
    finally:
        sys.setprofile(None)
    assert refused.value.status in (415, 422), refused.value.reason
    assert calls < 100_000, calls


def test_a_gif_of_too_many_blocks_before_its_image_is_refused_before_pillow_reads_it(web_settings,
                                                                                      monkeypatch):
    """Pillow reads a GIF's extension blocks one by one, in Python: 3.5 million empty
    comments in 10 MB take 0.9 s to open in each tier, and twenty in one request hold
    the web tier for 27 s."""
    from common.image_limits import MAX_GIF_BLOCKS, gif_blocks

    photo = encode(Image.new("RGB", (16, 16), (9, 99, 199)), "GIF")
    colour_table = 3 << ((photo[10] & 7) + 1)
    assert photo[10] & 0x80 and photo[13 + colour_table] in (0x21, 0x2C)  # what follows the header

    def padded(blocks: int, comment: bytes = b"\x21\xfe\x00") -> bytes:  # before the first image
        return photo[:13 + colour_table] + comment * blocks + photo[13 + colour_table:]

    fits = padded(MAX_GIF_BLOCKS - 10)
    assert check_image("ok.gif", fits, web_settings).content_type == "image/gif"
    prepare(fits, web_settings.max_image_pixels)
    # Sub-blocks count too: a comment of 5,001 one-byte pieces is 5,002 blocks.
    assert gif_blocks(padded(1, b"\x21\xfe" + b"\x01x" * 5_001 + b"\x00")) == 5_002 + gif_blocks(photo)
    forbid_pillow(monkeypatch)
    for blocks in (MAX_GIF_BLOCKS + 1, 3_500_000):
        with pytest.raises(Refusal) as refused:
            check_image("padded.gif", padded(blocks), web_settings)
        assert refused.value.status == 422
        assert f"more than {MAX_GIF_BLOCKS} blocks or stray bytes before its image" in refused.value.reason
        with pytest.raises(BadImage, match=f"more than {MAX_GIF_BLOCKS} blocks"):
            prepare(padded(blocks), web_settings.max_image_pixels)
    # The walk itself stops there, whatever the file's size.
    assert gif_blocks(padded(3_500_000)) == MAX_GIF_BLOCKS + 1
    # Pillow skips a byte that starts nothing, one step each: a stray byte in front of
    # the comments, or bytes alone, must not stop the count at 0.
    for stray in (padded(1, b"\x00" + b"\x21\xfe\x00" * 3_500_000), padded(10 * 1024**2, b"\x00")):
        with pytest.raises(Refusal, match=f"more than {MAX_GIF_BLOCKS} blocks"):
            check_image("stray.gif", stray, web_settings)
        with pytest.raises(BadImage, match=f"more than {MAX_GIF_BLOCKS} blocks"):
            prepare(stray, web_settings.max_image_pixels)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_png_of_too_much_packed_metadata_is_refused_before_pillow_unpacks_it(web_settings, monkeypatch):
    """Pillow unpacks each profile and packed text, up to 1 MB apiece: 9,000 profiles in
    9.5 MB take 22 s of CPU, and 24 uploads of 60 packed texts (63 KB each) take the
    web tier from 190 MB to 1.4 GB."""
    photo = encode(Image.new("RGB", (16, 16), (9, 99, 199)), "PNG")

    def packed(kib: int) -> bytes:
        return zlib.compress(b"\0" * kib * 1024, 9)

    def profile(kib: int) -> bytes:
        return png_chunk(b"iCCP", b"icc\0\0" + packed(kib))

    def ztxt(kib: int) -> bytes:
        return png_chunk(b"zTXt", b"Comment\0\0" + packed(kib))

    def itxt(kib: int, flag: bytes = b"\1") -> bytes:  # packed, with a language and a translated keyword
        return png_chunk(b"iTXt", b"XML:com.adobe.xmp\0" + flag + b"\0en\0XMP\0" + packed(kib))

    plain_itxt = png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + b"<x/>" * 100_000)

    def with_chunks(*chunks: bytes) -> bytes:  # after the header chunk, before the image data
        return photo[:33] + b"".join(chunks) + photo[33:]

    # Up to 4 MB unpacked: a profile of 1 MB, texts of 3 MB; plain text is not counted.
    fits = with_chunks(profile(1024), *[ztxt(512)] * 3, *[itxt(512)] * 3, plain_itxt)
    assert check_image("ok.png", fits, web_settings).content_type == "image/png"
    prepare(fits, web_settings.max_image_pixels)
    forbid_pillow(monkeypatch)
    too_much = "the PNG's compressed metadata (colour profile and texts) unpacks to more than 4 MB"
    for chunks, reason in (((profile(1), profile(1)), "the PNG has 2 colour profiles"),
                           ((profile(1024), *[ztxt(512)] * 3, *[itxt(512)] * 3, ztxt(1)), too_much),
                           ((profile(1024), *[itxt(1024)] * 3, itxt(1)), too_much),
                           ([itxt(1024, flag=b"\2")] * 5, too_much),  # Pillow unpacks any flag but 0
                           ([ztxt(1024)] * 60, too_much)):
        with pytest.raises(Refusal) as refused:
            check_image("packed.png", with_chunks(*chunks), web_settings)
        assert refused.value.status == 422 and reason in refused.value.reason, refused.value.reason
        with pytest.raises(BadImage, match=re.escape(reason)):
            prepare(with_chunks(*chunks), web_settings.max_image_pixels)
    # One chunk over Pillow's 1 MB, after the image data: the web tier, which does not
    # decode, would take it, and the worker fail it. Refused by both.
    late = photo[:-12] + ztxt(1536) + photo[-12:]  # before the end chunk
    too_large = "a text or colour-profile chunk that unpacks to more than 1 MB"
    with pytest.raises(Refusal, match=too_large):
        check_image("late.png", late, web_settings)
    with pytest.raises(BadImage, match=too_large):
        prepare(late, web_settings.max_image_pixels)


def test_an_image_of_another_format_holding_one_of_ours_is_refused_unread(web_settings, monkeypatch):
    """Pillow's ICO reader decodes the PNG inside an icon while opening it, past every
    check of ours: a 0.7 MB icon of 178 megapixels takes 2 s and 700 MB, before the web
    tier sees an icon and refuses it (six at once: 3.8 GB). Only the formats this
    service reads are opened; others are named by their first bytes."""
    from PIL import IcoImagePlugin

    inner = encode(Image.new("L", (256, 256)), "PNG")  # a size of 0 in the directory says 256
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 22) + inner
    assert Image.open(io.BytesIO(icon)).format == "ICO"  # what Pillow makes of it
    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "_open", lambda self: pytest.fail("opened as an icon"))
    with pytest.raises(Refusal) as refused:
        check_image("icon.png", icon, web_settings)
    assert refused.value.status == 415 and "ICO images are not accepted" in refused.value.reason
    with pytest.raises(BadImage, match="not an image format this service reads"):
        prepare(icon, web_settings.max_image_pixels)


def test_the_formats_read_are_the_formats_accepted():
    from common.image_limits import READ_FORMATS
    from web_tier.image_check import FORMATS

    assert set(FORMATS) == {"MPO", *READ_FORMATS}
    assert {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"} <= set(READ_FORMATS)


def float_rgb_tiff(width: int = 2, height: int = 2) -> bytes:
    """An uncompressed TIFF of colour in 32-bit floating point (HDR and scientific
    exports), which Pillow does not read; written here, as Pillow cannot either."""
    pixels = struct.pack(f"<{width * height * 3}f", *[0.5] * (width * height * 3))
    entries, first_extra = 10, 8 + 2 + 10 * 12 + 4
    bits_at, formats_at, data_at = first_extra, first_extra + 6, first_extra + 12

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:  # a SHORT, or a LONG or offset
        inline = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        return struct.pack("<HHI", tag, kind, count) + inline

    directory = b"".join([
        entry(256, 3, 1, width), entry(257, 3, 1, height), entry(258, 3, 3, bits_at), entry(259, 3, 1, 1),
        entry(262, 3, 1, 2), entry(273, 4, 1, data_at), entry(277, 3, 1, 3), entry(278, 3, 1, height),
        entry(279, 4, 1, len(pixels)), entry(339, 3, 3, formats_at)])
    return (b"II*\x00" + struct.pack("<IH", 8, entries) + directory + b"\0\0\0\0"
            + struct.pack("<3H", 32, 32, 32) + struct.pack("<3H", 3, 3, 3) + pixels)


def test_a_valid_tiff_pillow_cannot_read_is_not_called_damaged_alone(web_settings):
    """Floating-point colour is not "not a valid TIFF file": it is valid."""
    with pytest.raises(Refusal) as refused:
        check_image("hdr.tif", float_rgb_tiff(), web_settings)
    assert refused.value.status == 422
    assert "a TIFF of samples this service does not read (such as colour in floating point" \
        in refused.value.reason
    with pytest.raises(Refusal) as damaged:  # a directory of no entries: no size
        check_image("empty.tif", b"II*\x00" + struct.pack("<IHI", 8, 0, 0), web_settings)
    assert damaged.value.reason.endswith("not a valid TIFF file"), damaged.value.reason


def tiff_of_tiles(width: int, height: int, order: str = "<") -> bytes:
    """An uncompressed greyscale TIFF of 1x1 tiles, their offsets and sizes as SHORTs:
    2.56 million of them fit in 10 MB."""
    tiles, entries = width * height, 10
    offsets_at = 10 + 2 + entries * 12 + 4
    sizes_at = offsets_at + 2 * tiles

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack(f"{order}HHI", tag, kind, count) + value

    def short(value: int) -> bytes:
        return struct.pack(f"{order}HH", value, 0)

    def long(value: int) -> bytes:
        return struct.pack(f"{order}I", value)

    directory = struct.pack(f"{order}H", entries) + b"".join([
        entry(256, 4, 1, long(width)), entry(257, 4, 1, long(height)), entry(258, 3, 1, short(8)),
        entry(259, 3, 1, short(1)), entry(262, 3, 1, short(1)), entry(277, 3, 1, short(1)),
        entry(322, 4, 1, long(1)), entry(323, 4, 1, long(1)),
        entry(324, 3, tiles, long(offsets_at)), entry(325, 3, tiles, long(sizes_at))]) + long(0)
    header = (b"II*\x00" if order == "<" else b"MM\x00*") + long(10)
    return (header + b"\x80\x00" + directory + struct.pack(f"{order}{tiles}H", *[8] * tiles)
            + struct.pack(f"{order}{tiles}H", *[1] * tiles))


@pytest.mark.parametrize("order", ["<", ">"])
def test_a_tiff_of_too_many_tiles_is_refused_before_pillow_reads_it(web_settings, monkeypatch, order):
    """Pillow makes an object of each strip or tile as it opens a TIFF: 2.56 million 1x1
    tiles in 10 MB take 4.5 s and ~800 MB to open, 9.7 s in the web tier and 14.6 s in a
    worker."""
    from common.image_limits import MAX_TIFF_PARTS, tiff_layout

    fits = tiff_of_tiles(250, 250, order)  # 62,500 tiles
    assert tiff_layout(fits).parts == 62_500
    assert check_image("ok.tif", fits, web_settings).content_type == "image/tiff"
    assert prepare(fits, web_settings.max_image_pixels).shape == (224, 224, 3)
    forbid_pillow(monkeypatch)
    # Pillow also opens two headers it calls invalid, the magic number's bytes swapped.
    swapped = b"II\x00*" if order == "<" else b"MM*\x00"
    with pytest.raises(Refusal, match="strips or tiles"):
        check_image("odd.tif", swapped + tiff_of_tiles(257, 257, order)[4:], web_settings)
    for side in (257, 1600):
        with pytest.raises(Refusal) as refused:
            check_image("tiles.tif", tiff_of_tiles(side, side, order), web_settings)
        assert refused.value.status == 422
        reason = refused.value.reason
        assert f"{side * side} strips or tiles, more than the limit of {MAX_TIFF_PARTS}" in reason
        with pytest.raises(BadImage, match="strips or tiles"):
            prepare(tiff_of_tiles(side, side, order), web_settings.max_image_pixels)


def tiled_tiff(width: int, length: int, tile: int, payload: int | None = None) -> bytes:
    """A grey TIFF of one deflated tile of `tile` x `tile` zero bytes, or of only `payload`
    zero bytes (a tile too short, for a TIFF refused before its data is read: the whole
    32768x32768 tile took 1 GiB to make and seconds to deflate)."""
    packed = zlib.compress(bytes(tile * tile if payload is None else payload), 9)
    tags = [(256, 4, 1, width), (257, 4, 1, length), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
            (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, 8), (325, 4, 1, len(packed))]
    pad = b"\0" * (len(packed) & 1)
    directory = (struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags)
                 + b"\0" * 4)
    return b"II*\0" + struct.pack("<I", 8 + len(packed) + len(pad)) + packed + pad + directory


def test_a_tiff_whose_tile_is_larger_than_its_image_is_refused_before_pillow_reads_it(web_settings,
                                                                                    monkeypatch):
    """libtiff decodes a whole tile whatever the image's size: an 8x8 image of one
    32768x32768 tile (1 MB of deflated zeros) took a worker 1 GB, past every pixel limit."""
    for fits in (tiled_tiff(20, 20, 32), tiled_tiff(20, 20, 2048)):  # a small image, a usual tile
        assert check_image("ok.tif", fits, web_settings).content_type == "image/tiff"
        assert prepare(fits, web_settings.max_image_pixels).shape == (224, 224, 3)
    forbid_pillow(monkeypatch)  # and so its data is never read: 64 KB of it refused as 1 GiB would be
    bomb = tiled_tiff(8, 8, 32768, payload=64 * 1024)
    with pytest.raises(Refusal) as refused:
        check_image("bomb.tif", bomb, web_settings)
    assert refused.value.status == 422
    assert refused.value.reason == ("the TIFF's tiles (32768x32768) are larger than its image (8x8) "
                                    "and than 2048 pixels a side, which encoders never write")
    with pytest.raises(BadImage, match="larger than its image"):
        prepare(bomb, web_settings.max_image_pixels)


def test_a_bigtiff_of_a_huge_directory_is_refused_before_pillow_reads_it(web_settings, monkeypatch):
    """Pillow reads a TIFF directory's entries one by one, in Python; a BigTIFF's count is
    8 bytes: 500,000 entries in 10 MB took the web tier 1.8 s and a worker 2.6 s."""
    from common.image_limits import MAX_TIFF_ENTRIES

    tags = [(256, 3, 1, 8), (257, 3, 1, 8), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 16, 1, 16), (277, 3, 1, 1), (278, 3, 1, 8), (279, 16, 1, 64)]

    def bigtiff(extra: int) -> bytes:
        entries = (b"".join(struct.pack("<HHQQ", *t) for t in tags)
                   + struct.pack("<HHQQ", 65000, 0, 1, 0) * extra)
        return (b"II+\0" + struct.pack("<HHQ", 8, 0, 80) + bytes(64) + struct.pack("<Q", len(tags) + extra)
                + entries + bytes(8))

    assert check_image("ok.tif", bigtiff(10), web_settings).content_type == "image/tiff"
    forbid_pillow(monkeypatch)
    for extra in (MAX_TIFF_ENTRIES, 500_000):
        said = f"has {len(tags) + extra} entries, more than the {MAX_TIFF_ENTRIES}"
        with pytest.raises(Refusal, match=said):
            check_image("many.tif", bigtiff(extra), web_settings)
        with pytest.raises(BadImage, match="entries, more than"):
            prepare(bigtiff(extra), web_settings.max_image_pixels)


def rle_bmp(width: int, height: int, body: bytes, bpp: int = 8, compression: int = 1) -> bytes:
    palette = b"".join(struct.pack("<BBBB", i % 256, i * 7 % 256, 255 - i % 256, 0) for i in range(1 << bpp))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, compression, len(body), 2835, 2835,
                       1 << bpp, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def test_an_rle_bmp_of_many_pixels_is_refused_before_pillow_reads_it(web_settings, monkeypatch):
    """Pillow decodes RLE8 and RLE4 BMPs in Python, a step per pixel or row's end: 3.5 KB
    declaring 65535x610 pixels took a worker 4.5 s of CPU, the interpreter's lock held."""
    from common.image_limits import MAX_RLE_BMP_PIXELS

    rows = b"\x01\x03\x00\x00"  # a pixel, then the row's end
    fits = rle_bmp(320, 240, rows * 240 + b"\x00\x01")
    assert check_image("ok.bmp", fits, web_settings).content_type == "image/bmp"
    assert prepare(fits, web_settings.max_image_pixels).shape == (224, 224, 3)
    plain = io.BytesIO()
    Image.new("RGB", (4000, 1001)).save(plain, "BMP")  # uncompressed, past the RLE limit: read in C
    assert check_image("big.bmp", plain.getvalue(), web_settings).content_type == "image/bmp"
    forbid_pillow(monkeypatch)
    for width, height, compression in ((65535, 610, 1), (4000, -1001, 2)):  # RLE4; top-down rows
        slow = rle_bmp(width, height, rows * 10 + b"\x00\x01", bpp=8 if compression == 1 else 4,
                       compression=compression)
        with pytest.raises(Refusal) as refused:
            check_image("slow.bmp", slow, web_settings)
        assert refused.value.status == 422
        assert refused.value.reason.startswith(f"an RLE-compressed BMP of more than {MAX_RLE_BMP_PIXELS:,} "
                                               f"pixels ({width}x{abs(height)}) is refused")
        with pytest.raises(BadImage, match="RLE-compressed BMP"):
            prepare(slow, web_settings.max_image_pixels)


def test_tiff_layout_reads_bigtiff_and_stops_at_the_files_end():
    from common.image_limits import tiff_layout

    lzw, big = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (640, 4800)).save(lzw, "TIFF", compression="tiff_lzw")  # libtiff: ~64 KB strips
    Image.new("RGB", (640, 4800)).save(big, "TIFF", big_tiff=True)  # one strip
    assert tiff_layout(lzw.getvalue()).parts == 142
    assert big.getvalue().startswith(b"II+\x00") and tiff_layout(big.getvalue()).parts == 1
    cut = tiff_of_tiles(300, 300)[:200]  # its directory whole, its offsets gone
    assert tiff_layout(cut).parts == 90_000
    assert tiff_layout(b"II*\x00\xff\xff\xff\x7f").parts == 0  # a directory past the end


def test_a_webp_is_held_to_half_the_pixel_limit_as_its_decoding_takes_several_times_the_memory(
        web_settings):
    """A 1.6 KB lossless WebP of 40 megapixels takes a worker +600 MB to decode, where a
    PNG of the same size takes +165."""
    limited = dataclasses.replace(web_settings, max_image_pixels=1_000_000)
    image = Image.new("RGB", (1000, 600), (9, 9, 9))  # 600,000 pixels
    for fmt, refused in (("PNG", False), ("WEBP", True)):
        data = encode(image, fmt)
        if not refused:
            assert check_image("ok.png", data, limited).content_type == "image/png"
            prepare(data, limited.max_image_pixels)
            continue
        with pytest.raises(Refusal) as refusal:
            check_image("big.webp", data, limited)
        assert refusal.value.status == 413
        assert "more than the limit of 500000 for a WEBP image" in refusal.value.reason
        with pytest.raises(BadImage, match="limit of 500000 for a WEBP image"):
            prepare(data, limited.max_image_pixels)
    assert check_image("ok.webp", encode(Image.new("RGB", (700, 700)), "WEBP"), limited)  # 490,000


def test_an_image_with_a_side_over_65535_pixels_is_refused_in_both_tiers(web_settings):
    """Within the pixel limit, a PNG of 1x40,000,000 (151 KB) takes a worker 1.5 GB and
    5 s: Pillow keeps a pointer and an allocation per row."""
    def one_pixel_wide(height: int) -> bytes:
        return encode(Image.new("L", (1, height), 200), "PNG")

    assert check_image("tall.png", one_pixel_wide(MAX_IMAGE_SIDE), web_settings).content_type == "image/png"
    prepare(one_pixel_wide(MAX_IMAGE_SIDE), web_settings.max_image_pixels)
    taller = one_pixel_wide(MAX_IMAGE_SIDE + 1)
    with pytest.raises(Refusal) as refused:
        check_image("taller.png", taller, web_settings)
    assert refused.value.status == 413
    assert refused.value.reason == (f"image is 1x{MAX_IMAGE_SIDE + 1} pixels: "
                                    "a side longer than 65535 pixels is refused")
    with pytest.raises(BadImage, match="a side longer than 65535 pixels"):
        prepare(taller, web_settings.max_image_pixels)


def test_scans_are_counted_as_the_decoder_reads_them(web_settings):
    """An FF D9 in a comment, or a stray byte between segments, must not hide 3,000 scans
    from a count that stops at either; the worker takes 16 s on such a file."""
    from common.image_limits import jpeg_layout

    def jpeg_scan_count(data: bytes) -> int:
        return jpeg_layout(data).scans

    assert jpeg_scan_count(make_image(6)) == 1  # baseline: one scan
    progressive = reencoded(make_image(6), "JPEG", progressive=True)
    assert jpeg_scan_count(progressive) == progressive.count(b"\xff\xda") > 1
    many = jpeg_of_many_scans(MAX_JPEG_SCANS + 1)
    second_scan = many.index(b"\xff\xda", many.index(b"\xff\xda") + 2)
    after_app0 = 4 + int.from_bytes(many[4:6], "big")
    hidden = {
        "a comment holding FF D9": many[:second_scan] + b"\xff\xfe\x00\x04\xff\xd9" + many[second_scan:],
        "a stray byte between segments": many[:after_app0] + b"\x00" + many[after_app0:],
    }
    for how, data in hidden.items():
        assert decodes(data), how
        assert jpeg_scan_count(data) == MAX_JPEG_SCANS + 1, how
        with pytest.raises(Refusal, match="scans"):
            check_image("slow.jpg", data, web_settings)


def test_scans_are_counted_up_to_the_images_end_not_in_a_motion_photos_video(web_settings):
    video = b"\x00\x00ftypmp42" + b"\xff\xda\x00\x08" * (2 * MAX_JPEG_SCANS)
    data = reencoded(make_image(6), "JPEG", progressive=True) + video
    assert check_image("motion.jpg", data, web_settings).content_type == "image/jpeg"


def test_real_decompression_bomb_is_refused(web_client):
    bomb = encode(Image.new("L", (7000, 7000)), "PNG")  # 49 Mpx of zeros, tens of KB
    response = upload(web_client, [(bomb, "zeros.png")])
    assert response.status_code == 413
    assert response.get_json()["filename"] == "zeros.png"


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "MPO"])
def test_every_accepted_format(web_client, fmt):
    data = encode(Image.open(io.BytesIO(make_image(5, size=(64, 48)))).convert("RGB"), fmt)
    response = upload(web_client, [(data, f"x.{fmt.lower()}")])
    assert response.status_code == 202
    assert fmt in ACCEPTED and fmt in web_client.get("/").get_data(as_text=True)  # the page says so
    assert decode(data, 40_000_000).size == (64, 48)  # and the worker reads it


@pytest.mark.parametrize("brands, kind", [
    (b"heic\x00\x00\x00\x00mif1heic", "HEIC"),
    (b"mif1\x00\x00\x00\x00mif1heic", "HEIC"),  # the main brand is generic: the others say
    (b"mif1\x00\x00\x00\x00mif1msf1", "HEIF"),
])
def test_heic_photos_are_refused_by_name_not_called_not_an_image(web_client, brands, kind):
    heic = (8 + len(brands)).to_bytes(4, "big") + b"ftyp" + brands + bytes(200)
    response = upload(web_client, [(heic, "IMG_0001.HEIC")])
    assert response.status_code == 415
    assert response.get_json()["error"] == f"{kind} images are not accepted; send {ACCEPTED}"


def test_an_image_of_exactly_the_pixel_limit_is_taken_by_both_tiers(web_settings):
    """MAX_IMAGE_PIXELS is the most allowed: at it, both tiers take the image; a row
    more, both refuse it."""
    limited = dataclasses.replace(web_settings, max_image_pixels=1_000_000)
    at_limit = encode(Image.new("RGB", (1000, 1000), (9, 9, 9)), "PNG")
    assert check_image("at.png", at_limit, limited).content_type == "image/png"
    prepare(at_limit, limited.max_image_pixels)
    over = encode(Image.new("RGB", (1000, 1001), (9, 9, 9)), "PNG")
    with pytest.raises(Refusal) as refusal:
        check_image("over.png", over, limited)
    assert refusal.value.status == 413
    with pytest.raises(BadImage):
        prepare(over, limited.max_image_pixels)


# Pillow warns past its own limit; the service refuses such images all the same.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_past_pillows_own_pixel_limit_is_refused_at_upload_as_the_worker_would(make_web_app):
    """With MAX_IMAGE_PIXELS raised above Pillow's limit, Pillow only warns, and the web
    tier accepted images that every worker then refused."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    assert pillow_limit is not None
    width = 10_000
    height = pillow_limit // width + 100  # over Pillow's limit, under twice it (its hard error)
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")
    client = make_web_app(max_image_pixels=4 * pillow_limit, start_background=False).test_client()
    response = upload(client, [(out.getvalue(), "huge.png")])
    assert response.status_code == 413, response.get_json()
    # MAX_IMAGE_PIXELS is higher: the limit that applies, and is quoted, is Pillow's.
    assert response.get_json()["error"] == (
        f"image is {width}x{height} pixels, more than the limit of {pillow_limit}")


# Pillow warns past its own limit; the service refuses such images all the same.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_holds_in_every_thread_at_once(web_settings):
    """Pillow's limit is not enforced by making its warning an error in a
    warnings.catch_warnings block: that is process-wide state, which threads leaving the
    block undo for each other, and one bomb in thousands gets through."""
    from concurrent.futures import ThreadPoolExecutor

    pillow_limit = Image.MAX_IMAGE_PIXELS
    assert pillow_limit is not None
    settings = dataclasses.replace(web_settings, max_image_pixels=4 * pillow_limit)
    bomb = png_claiming(10_000, 10_000)  # over Pillow's limit, under twice it

    def refused(_: int) -> bool:
        try:
            check_image("bomb.png", bomb, settings)
        except Refusal as exc:
            return exc.status == 413
        return False

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(refused, range(4000)))
