"""Decoding: the model sees an upload as a viewer would show it."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from app_tier.images import BadImage, decode, prepare

MAX_PIXELS = 40_000_000


def saved(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode(data, MAX_PIXELS), dtype=np.int16)


@pytest.fixture
def grey8() -> np.ndarray:
    """A greyscale picture using the whole 0-255 range, not symmetric in any way."""
    rng = np.random.default_rng(4)
    ramp = np.linspace(0, 255, 90)[None, :] * np.linspace(0.2, 1, 60)[:, None]
    return np.clip(ramp + rng.integers(0, 40, (60, 90)), 0, 255).astype(np.uint8)


def test_16_bit_samples_are_scaled_not_clipped(grey8):
    as_8 = pixels(saved(Image.fromarray(grey8, "L"), "PNG"))
    deep = Image.fromarray(grey8.astype(np.uint16) * 257)  # the same picture in 16 bits
    assert deep.mode.startswith("I;16")
    for fmt in ("PNG", "TIFF"):
        assert np.array_equal(pixels(saved(deep, fmt)), as_8), fmt


def test_the_worker_reads_only_the_formats_the_web_tier_accepts(grey8):
    """Pillow reads some forty formats; a file of another (here a 16-bit PGM) is not an
    image this service reads, whatever reached the bucket."""
    samples = grey8.astype(">u2") * 4
    pgm = b"P5\n%d %d\n1023\n" % (grey8.shape[1], grey8.shape[0]) + samples.tobytes()
    assert Image.open(io.BytesIO(pgm)).format == "PPM"
    with pytest.raises(BadImage, match="not an image format this service reads"):
        prepare(pgm, 40_000_000)


@pytest.mark.parametrize("full_scale", [1.0, 255.0])
def test_floating_point_samples_are_scaled_from_their_range(grey8, full_scale):
    floats = Image.fromarray(grey8.astype(np.float32) * (full_scale / 255), "F")
    got = pixels(saved(floats, "TIFF"))
    assert np.abs(got - grey8[..., None]).max() <= 1


@pytest.mark.parametrize("odd", [np.inf, -np.inf, np.nan])
def test_a_sample_that_is_no_number_does_not_change_the_others(grey8, odd):
    """One +inf would make the full scale 3.4e38 and the picture black."""
    floats = grey8.astype(np.float32) / 255
    floats[0, 0] = odd
    got = pixels(saved(Image.fromarray(floats, "F"), "TIFF"))
    assert np.abs(got - grey8[..., None])[1:].max() <= 1
    assert (got[0, 0] == (255 if odd == np.inf else 0)).all()


def test_a_photo_stored_sideways_is_turned_upright_by_its_exif_orientation():
    upright = np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    # Orientation 6: the stored pixels need turning 90 degrees clockwise to be shown.
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert np.array_equal(pixels(saved(stored, "PNG", exif=exif)), upright)
    # A large JPEG, decoded at reduced size: turned all the same.
    big = stored.resize((stored.width * 30, stored.height * 30))
    decoded = decode(saved(big, "JPEG", exif=exif), MAX_PIXELS)
    assert decoded.width > decoded.height


def test_damaged_exif_that_viewers_read_does_not_stop_the_image():
    """Pillow's exif_transpose rewrites the EXIF, and fails on some a phone wrote
    (here a resolution of -1/0): the image is still turned, and classified."""
    entries = struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x011A, 10, 1, 38)
    tiff = b"II*\x00" + struct.pack("<IH", 8, 2) + entries + struct.pack("<Iii", 0, -1, 0)
    data = saved(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG", exif=b"Exif\x00\x00" + tiff)
    assert decode(data, MAX_PIXELS).size == (48, 64)


@pytest.mark.parametrize("mode, brightest, full_scale", [
    ("F", 1.0, 1.0), ("F", 1.02, 1.0), ("F", 200.0, 255.0), ("F", 4095.0, 4095.0),
    ("I", 200, 255.0), ("I", 4095, 4095.0),  # 12-bit data in a 32-bit TIFF
])
def test_deep_samples_are_scaled_from_the_range_they_use(grey8, mode, brightest, full_scale):
    """Floats in 0-1 (a little overshoot included) or in 0-255; integers in 0-255 or
    up to their maximum."""
    samples = grey8.astype(np.float32) * (full_scale / 255)
    samples[0, 0] = brightest
    img = Image.fromarray(samples if mode == "F" else samples.astype(np.int32), mode)
    got = pixels(saved(img, "TIFF"))[..., 0]
    want = np.clip(np.asarray(img, dtype=np.float32) * (255 / full_scale) + 0.5, 0, 255).astype(int)
    assert np.abs(got - want).max() <= 1
    assert got.mean() > 60, "scaled from its range, not left nearly black"


def test_a_transparent_grey_in_a_16_bit_png_is_on_white(grey8):
    deep = Image.fromarray(grey8.astype(np.uint16) * 257)
    hidden = int(grey8[0, 0]) * 257
    got = pixels(saved(deep, "PNG", transparency=hidden))
    assert (got[grey8 == grey8[0, 0]] == 255).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_parts_are_on_white(mode):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)  # black, hidden behind alpha 0...
    rgba[:, 15:] = (200, 30, 30, 255)  # ...beside an opaque red half
    img = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("P")
        img.info["transparency"] = img.getpixel((0, 0))
    got = pixels(saved(img, "PNG"))
    assert (got[:, :15] == 255).all(), "the transparent half should be white"
    assert (got[:, 15:] < 255).any(axis=-1).all(), "the opaque half keeps its colour"


def test_an_image_transparent_everywhere_is_shown_by_its_colours_not_as_a_white_square():
    """A 32-bit BMP's fourth byte is often padding, all zero: composited on white, the
    model would see a blank square."""
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:, 15:, 1] = 200, 90
    got = pixels(saved(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.array_equal(got, rgba[..., :3])


@pytest.mark.parametrize(("size", "trimmed"), [((1200, 900), True), ((400, 300), False)])
def test_memory_freed_by_a_large_decode_is_given_back(monkeypatch, size, trimmed):
    """glibc kept what decodes on several threads freed: 8 PNGs of 12 megapixels left
    a process at 1.4 GB for good; given back, at 72 MB (measured, not tested here)."""
    from app_tier import images

    calls = []
    monkeypatch.setattr(images, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    prepare(saved(Image.new("RGBA", size, (9, 99, 199, 128)), "PNG"), MAX_PIXELS)
    prepare(saved(Image.new("RGB", size), "PNG"), MAX_PIXELS)
    assert calls == ([0, 0] if trimmed else [])


@pytest.mark.parametrize("error", [
    struct.error("argument out of range"),  # as Pillow does on some damaged fields
    RuntimeError("Failed to decode frame 0: Decoding of color planes failed"),  # a damaged AVIF
])
def test_any_error_decoding_an_image_is_the_images_fault_not_a_reason_to_retry(monkeypatch, error):
    """Said as any damaged image is, not "image data is corrupt: RuntimeError: ...",
    Python's name for the error, where others read as below."""
    from app_tier.images import BadImage

    def trips(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Image.Image, "convert", trips)
    with pytest.raises(BadImage) as refused:
        decode(saved(Image.new("L", (8, 8)), "PNG"), MAX_PIXELS)  # converted to RGB
    assert str(refused.value) == f"damaged or unreadable image: {error}"


def test_a_decode_out_of_memory_is_not_the_images_fault(monkeypatch):
    """Memory may come back once the other decodes end: taken for a damaged image, the
    image would fail for good; raised, the worker releases it for another attempt."""
    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "convert", no_memory)
    with pytest.raises(MemoryError):
        decode(saved(Image.new("L", (8, 8)), "PNG"), MAX_PIXELS)  # converted to RGB


def _png_with_huge_text() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (2 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)  # small once packed
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def test_a_png_text_over_pillows_limit_is_refused_before_pillow_reads_it():
    with pytest.raises(BadImage, match="a text or colour-profile chunk that unpacks to more than 1 MB"):
        prepare(_png_with_huge_text(), 40_000_000)


def _jpeg_with_damaged_data() -> bytes:
    from tests.conftest import make_image

    good = bytearray(make_image(7))
    start = good.index(b"\xff\xda")  # start of scan: the compressed data follows
    for i in range(start + 40, len(good) - 40, 7):
        good[i] = 0xFF  # an FF followed by a byte that is no marker: a broken stream
    return bytes(good)


def _png_with_damaged_data() -> bytes:
    """Zeros inside the deflate stream, the chunk's CRC made right again (so that only
    decoding finds it): the EXIF read that comes first must not swallow the decoder's
    error, or the half-decoded pixels are classified."""
    import zlib

    rng = np.random.default_rng(0)
    data = bytearray(saved(Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)), "PNG",
                           compress_level=1))
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    body = at + 8  # the chunk's type, then its data, then its CRC
    data[body + length // 3:body + length // 3 + 64] = bytes(64)
    data[body + length:body + length + 4] = struct.pack(">I", zlib.crc32(bytes(data[at + 4:body + length])))
    return bytes(data)


@pytest.mark.parametrize(("make", "says"), [
    (_jpeg_with_damaged_data, "the compressed image data is damaged"),
    (_png_with_damaged_data, "the compressed image data is damaged"),
])
def test_damage_is_said_in_plain_words_not_pillows(make, says):
    """Pillow's texts named its internals ('Decompressed data too large for
    PngImagePlugin.MAX_TEXT_CHUNK', 'broken data stream when reading image file')."""
    with pytest.raises(BadImage) as refused:
        prepare(make(), 40_000_000)
    assert str(refused.value) == f"damaged or unreadable image: {says}"


def test_only_the_pillow_errors_known_are_reworded():
    from common.pillow_errors import plain_reason

    assert plain_reason(OSError("decoder error -2")) == "the compressed image data is damaged"
    # (common/image_limits.py refuses a PNG of such a chunk first: test_image_rules.py)
    assert plain_reason(ValueError("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK")) == \
        "it holds a text or colour-profile chunk too large to read (over 1 MB unpacked)"
    assert plain_reason(OSError("decoder error -10")) == "decoder error -10"  # not -1
    assert plain_reason(ValueError("something new")) == "something new"


def test_a_jpeg_of_several_scans_counts_as_decoded_whole(monkeypatch):
    """libjpeg keeps a multi-scan JPEG's coefficients for the whole image, whatever the
    draft: a baseline one in 3 scans of 24 megapixels takes +73 MB where one scan takes
    +5 MB. Such a JPEG must wait its turn as a large image does."""
    from app_tier import images
    from common.image_limits import JpegLayout

    photo = Image.new("RGB", (3000, 2000), (10, 200, 30))
    baseline, progressive = saved(photo, "JPEG"), saved(photo, "JPEG", progressive=True)
    assert images.decoding_pixels(images.open_image(baseline, MAX_PIXELS)) == 375 * 250  # drafted to 1/8
    assert images.decoding_pixels(images.open_image(progressive, MAX_PIXELS)) == 3000 * 2000
    # jpegtran -scans writes a baseline JPEG in several scans; Pillow cannot.
    monkeypatch.setattr("common.image_limits.jpeg_layout",
                        lambda data: JpegLayout(scans=3, ends=True, segments=12))
    assert images.decoding_pixels(images.open_image(baseline, MAX_PIXELS)) == 3000 * 2000


def test_a_webp_counts_as_the_memory_its_decoding_holds():
    """Decoding a WebP holds ~15 bytes a pixel, twice an RGB PNG's: eight of 3.9
    megapixels decoded side by side take a worker +424 MB. Counted twice, one over
    2 megapixels waits its turn as a large PNG does."""
    from app_tier import images

    pixels = 1500 * 1400
    webp = saved(Image.new("RGB", (1500, 1400), (10, 200, 30)), "WEBP", lossless=True)
    png = saved(Image.new("RGB", (1500, 1400), (10, 200, 30)), "PNG")
    assert images.decoding_pixels(images.open_image(png, MAX_PIXELS)) == pixels
    assert images.decoding_pixels(images.open_image(webp, MAX_PIXELS)) == 2 * pixels
    assert pixels < images.LARGE_IMAGE_PIXELS < 2 * pixels


def test_decoding_frees_each_steps_input_and_copies_no_rgb_image(monkeypatch):
    """At full size each copy of a 40-megapixel RGBA image is 160 MB: keeping every
    step's takes a worker +918 MB where freeing them takes +460 (measured)."""
    from app_tier.images import load_rgb, open_image

    closed: list[tuple[str, tuple[int, int]]] = []
    close = Image.Image.close

    def recording(self):
        closed.append((self.mode, self.size))
        return close(self)

    rgb = open_image(saved(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"), MAX_PIXELS)
    assert load_rgb(rgb, MAX_PIXELS) is rgb  # already RGB: not copied
    monkeypatch.setattr(Image.Image, "close", recording)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turned first
    turned = open_image(saved(Image.new("RGBA", (40, 30), (10, 20, 30, 128)), "PNG", exif=exif.tobytes()),
                        MAX_PIXELS)
    out = load_rgb(turned, MAX_PIXELS)
    assert out.mode == "RGB" and out.size == (30, 40)
    # The decoded image, the turned one, the white ground and the composite: each freed.
    assert closed.count(("RGBA", (40, 30))) == 1 and closed.count(("RGBA", (30, 40))) == 3, closed


def _photo_like(width: int, height: int) -> np.ndarray:
    """Smooth shapes with fine noise: what box averaging and resampling treat differently."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.dstack([128 + 100 * np.sin(x / 60) * np.cos(y / 40), 128 + 100 * np.sin((x + y) / 90),
                     ((x // 80 + y // 80) % 2) * 200.0])
    return np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)


def test_a_large_image_is_reduced_before_it_is_converted_and_looks_the_same(monkeypatch):
    """A 40-megapixel RGBA PNG was converted and composited at full size, 160 MB a copy:
    +480 MB and 1.9 s of CPU; reduced first, +323 MB and 1.0 s (float TIFF: +680 MB
    and 1.6 s, now +162 MB and 0.24 s). What the model sees barely changes."""
    from app_tier.images import INPUT_SIZE

    width, height = 2800, 2700
    rgb = _photo_like(width, height)
    alpha = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    whole = Image.alpha_composite(white, rgba).convert("RGB").resize(INPUT_SIZE, Image.Resampling.BILINEAR)

    composited: list[tuple[int, int]] = []
    composite = Image.alpha_composite
    monkeypatch.setattr(Image, "alpha_composite", lambda a, b: composited.append(a.size) or composite(a, b))
    got = decode(saved(rgba, "PNG", compress_level=1), MAX_PIXELS)

    # Halved (both sides stay at least 6 x 224), then composited on white.
    assert composited == [(1400, 1350)] and got.size == (1400, 1350)
    seen = np.asarray(got.resize(INPUT_SIZE, Image.Resampling.BILINEAR), dtype=np.int16)
    difference = np.abs(seen - np.asarray(whole, dtype=np.int16))
    assert difference.mean() < 0.5 and difference.max() <= 4, (difference.mean(), difference.max())


def test_a_large_image_with_a_colour_key_is_reduced_only_once_its_key_is_applied():
    """Averaged, pixels of a PNG's transparent colour (tRNS) would no longer match it."""
    index = np.zeros((2800, 2800), dtype=np.uint8)
    index[:, 1400:] = 1
    keyed = Image.fromarray(index, "L").convert("P")
    keyed.putpalette([10, 20, 30, 200, 50, 0] + [0] * 762)
    got = pixels(saved(keyed, "PNG", transparency=0))
    assert got.shape[:2] == (1400, 1400)  # reduced by 2
    assert (got[:, :690] == 255).all() and (got[:, 710:] == (200, 50, 0)).all()


def test_deep_samples_scaled_a_band_of_rows_at_a_time_are_scaled_alike(grey8, monkeypatch):
    """As float32 a whole 40-megapixel image is 160 MB: scaled in bands of rows, the
    brightest sample of any band still sets the range of all."""
    from app_tier import images

    floats = grey8.astype(np.float32) * (1000 / 255)  # 0-1000: the range is the brightest sample
    whole = pixels(saved(Image.fromarray(floats, "F"), "TIFF"))
    monkeypatch.setattr(images, "_SCALING_SAMPLES", 200)  # bands of 2 rows
    assert np.array_equal(pixels(saved(Image.fromarray(floats, "F"), "TIFF")), whole)
    assert whole.max() == 255


SIDE = 2800  # reduced by 2 (6 x 224 = 1344)


def _stripes(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Columns alternating between two values: what averaging before converting gets wrong."""
    out = np.empty((SIDE, SIDE) + np.shape(first), dtype=np.asarray(first).dtype)
    out[:, 0::2], out[:, 1::2] = first, second
    return out


def _int32_ramp() -> Image.Image:
    ramp = np.tile(np.linspace(0, 2**30, SIDE).astype(np.int32), (SIDE, 1))
    return Image.fromarray(ramp, "I")


def _float_with_hot_pixels_and_no_data() -> Image.Image:
    samples = np.full((SIDE, SIDE), 0.5, dtype=np.float32)
    samples[::400, ::400] = 2.0  # 49 hot pixels set the range, in the whole image
    samples[1::100, 1::10] = np.nan  # "no data": one black pixel each, not a black box
    return Image.fromarray(samples, "F")


def _transparent_everywhere() -> Image.Image:
    rgba = np.random.default_rng(8).integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # a 32-bit BMP's padding byte, say: its colours are what it shows
    return Image.fromarray(rgba, "RGBA")


def _nearly_transparent_everywhere() -> Image.Image:
    rgba = np.full((SIDE, SIDE, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[::2, ::2, 3] = 1  # alpha 1 in one pixel of each 2 x 2 box: each averages to 0
    return Image.fromarray(rgba, "RGBA")


def _framed(width: int, height: int) -> Image.Image:
    framed = np.zeros((height, width), dtype=np.uint8)
    framed[1:-1, 1:-1] = 255
    return Image.fromarray(framed, "L")


@pytest.mark.parametrize(("image", "fmt", "options"), [
    (_int32_ramp, "TIFF", {}),  # reduce sums 32-bit integers in 32 bits: they wrapped
    (_float_with_hot_pixels_and_no_data, "TIFF", {}),  # box averages set the range; NaN blackened boxes
    (_transparent_everywhere, "PNG", {}),  # premultiplied by alpha 0: black
    (_nearly_transparent_everywhere, "PNG", {}),  # every box alpha 0: black, not on white
    (lambda: _framed(4 * 6 * 224 + 1, 1400), "PNG", {}),  # a last box of 1 pixel skewed the edge
    (lambda: Image.fromarray(_stripes(np.array([255, 255, 255, 255], np.uint8), np.zeros(4, np.uint8)),
                             "CMYK"), "TIFF", {}),  # converted by multiplying channels
    (lambda: Image.fromarray(_stripes(np.uint8(0), np.uint8(100)), "L"), "PNG", {"transparency": 0}),
    (lambda: Image.fromarray(_stripes(np.zeros(3, np.uint8), np.array([9, 99, 199], np.uint8)), "RGB"),
     "PNG", {"transparency": (0, 0, 0)}),
])
def test_a_large_image_reduced_first_looks_as_it_would_whole(monkeypatch, image, fmt, options):
    """Reduced before converting, each of these would come out another picture."""
    from app_tier import images

    data = saved(image(), fmt, **options)
    reduced = prepare(data, MAX_PIXELS)
    monkeypatch.setattr(images, "REDUCING_GAP", 10**6)  # never reduced before converting
    whole = prepare(data, MAX_PIXELS)
    difference = np.abs(reduced - whole)
    assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())


def test_a_long_thin_image_is_reduced_along_its_length():
    """The model's input is square whatever the image: a 40,000 x 1,000 RGBA image must
    be reduced though its short side is short, or it costs +480 MB."""
    rgba = np.zeros((300, 2 * 6 * 224 + 100, 4), dtype=np.uint8)
    rgba[..., 1:] = 200
    assert decode(saved(Image.fromarray(rgba, "RGBA"), "PNG"), MAX_PIXELS).size == (1394, 300)


# Colour profiles. Pillow makes only sRGB and LAB ones, so the others are written here:
# ICC v2, the few tags a matrix/curve (RGB, grey) or table (CMYK) profile needs.
_D50 = (0.9642, 1.0, 0.8249)
# Adobe RGB (1998): its primaries adapted to D50, as its profile stores them, and gamma 563/256.
_ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
_ADOBE_GAMMA = 563 / 256
_SRGB_D50 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + struct.pack(">3i", *(round(v * 65536) for v in (x, y, z)))


def _gamma(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _icc(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    tags = {b"wtpt": _xyz(*_D50), **tags}
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags.items():
        table += struct.pack(">4sII", signature, offset + len(body), len(data))
        body += data + bytes(-len(data) % 4)
    header = bytearray(128)
    struct.pack_into(">I4sI4s4s4s", header, 0, 128 + 4 + len(table) + len(body), b"none", 0x02100000,
                     device_class, space, pcs)
    header[36:40] = b"acsp"
    struct.pack_into(">3i", header, 68, *(round(v * 65536) for v in _D50))
    return bytes(header) + struct.pack(">I", len(tags)) + table + body


def _adobe_rgb_profile(gamma: float = _ADOBE_GAMMA) -> bytes:
    curve = _gamma(gamma)
    return _icc(b"mntr", b"RGB ", b"XYZ ", {
        b"rXYZ": _xyz(*_ADOBE_RGB[0]), b"gXYZ": _xyz(*_ADOBE_RGB[1]), b"bXYZ": _xyz(*_ADOBE_RGB[2]),
        b"rTRC": curve, b"gTRC": curve, b"bTRC": curve})


def _grey_profile() -> bytes:
    """Grey of gamma 1.8, as Macs once had: its middle greys are sRGB's lighter ones."""
    return _icc(b"mntr", b"GRAY", b"XYZ ", {b"kTRC": _gamma(1.8)})


# The CMYK profile's inks, as sRGB: each corner of its table is the product of the inks
# laid down there. Pillow's own conversion takes cyan for (0, 255, 255).
_INKS = np.array([(0, 160, 225), (225, 0, 130), (255, 235, 0), (40, 40, 40)], dtype=np.float64) / 255


def _cmyk_profile() -> bytes:
    """A printer's profile in its simplest form: CMYK to Lab by a 2x2x2x2 table."""
    from PIL import ImageCms

    corners = np.array([np.prod([_INKS[i] if on else np.ones(3) for i, on in enumerate(ink)], axis=0)
                        for ink in np.ndindex(2, 2, 2, 2)])  # cyan varies slowest, as ICC's tables
    srgb = Image.fromarray(np.round(corners * 255).astype(np.uint8)[None], "RGB")
    lab = np.array(ImageCms.applyTransform(srgb, ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")))
    lab[..., 1:] ^= 0x80  # Pillow's a* and b* are signed; ICC's 8-bit table adds 128
    identity, unit = bytes(range(256)), struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)
    table = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + unit + identity * 4 + lab.tobytes() + identity * 3
    return _icc(b"prtr", b"CMYK", b"Lab ", {b"A2B0": table})


def _srgb_from_adobe(rgb: np.ndarray) -> np.ndarray:
    linear = (rgb / 255.0) ** _ADOBE_GAMMA
    xyz = linear @ np.array(_ADOBE_RGB)
    srgb = np.clip(xyz @ np.linalg.inv(np.array(_SRGB_D50)), 0, 1)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return encoded * 255


def _seen(data: bytes) -> np.ndarray:
    """The RGB pixels in the model's input (prepare's, caffe-style: BGR less the means)."""
    from app_tier.images import _BGR_MEANS

    return (prepare(data, MAX_PIXELS) + _BGR_MEANS)[..., ::-1].astype(np.float64)


def _patches() -> Image.Image:
    """Four flat colours, their centres far from JPEG's blur at the edges."""
    rgb = np.zeros((224, 224, 3), dtype=np.uint8)
    colours = [(40, 170, 50), (200, 70, 40), (50, 90, 190), (128, 128, 128)]
    for (top, left), colour in zip([(0, 0), (0, 112), (112, 0), (112, 112)], colours, strict=True):
        rgb[top:top + 112, left:left + 112] = colour
    return Image.fromarray(rgb)


_CENTRES = (slice(40, 72), slice(152, 184))
_SAVE_OPTIONS = {"JPEG": {"quality": 95, "subsampling": 0}, "PNG": {}, "TIFF": {}, "WEBP": {"lossless": True}}


@pytest.fixture
def fresh_transforms(monkeypatch):
    """No transform cached by an earlier test, and none left for a later one."""
    from app_tier import images

    monkeypatch.setattr(images, "_transforms", type(images._transforms)())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
def test_a_wide_gamut_photo_is_shown_in_srgb_colours(fmt, fresh_transforms):
    """Adobe RGB's (or an iPhone's Display P3) pixels read as if sRGB: greens dulled,
    every colour shifted. Converted by the profile, they are what a viewer shows."""
    options = _SAVE_OPTIONS[fmt]
    naive = _seen(saved(_patches(), fmt, **options))  # the same pixels, no profile
    assert np.abs(naive - np.asarray(_patches())).max() <= 3  # ... nor any change
    got = _seen(saved(_patches(), fmt, icc_profile=_adobe_rgb_profile(), **options))
    want = _srgb_from_adobe(naive)
    for rows in _CENTRES:
        for columns in _CENTRES:
            assert np.abs(got[rows, columns] - want[rows, columns]).max() <= 2.5, (fmt, rows, columns)
    green = (slice(40, 72), slice(40, 72))
    assert np.abs(got[green] - naive[green]).max() > 25, "Adobe RGB's green is well outside sRGB's"


@pytest.mark.parametrize("step", ["buildTransform", "apply"])
def test_a_colour_profile_out_of_memory_is_not_taken_for_a_profile_to_ignore(monkeypatch, fresh_transforms,
                                                                             step):
    """A profile that cannot be used is ignored, the pixels taken as sRGB; memory running
    out while building or applying its transform is no such profile: ignored, the image
    would be classified in the wrong colours for want of memory, not of a good profile."""
    from PIL import ImageCms

    def no_memory(*args, **kwargs):
        raise MemoryError

    if step == "apply":
        monkeypatch.setattr(ImageCms.ImageCmsTransform, "apply", no_memory)
    else:
        monkeypatch.setattr(ImageCms, "buildTransform", no_memory)
    with pytest.raises(MemoryError):
        _seen(saved(_patches(), "PNG", icc_profile=_adobe_rgb_profile()))


def test_a_grey_image_is_shown_by_its_grey_profile(fresh_transforms):
    ramp = np.tile(np.arange(224, dtype=np.uint8), (224, 1))
    got = _seen(saved(Image.fromarray(ramp, "L"), "PNG", icc_profile=_grey_profile()))
    linear = (ramp / 255.0) ** 1.8
    want = 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    assert np.abs(got - want[..., None]).max() <= 2
    assert got[0, 100, 0] > 115, "grey 100 of gamma 1.8 is sRGB's 119"


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_shown_by_its_profile_not_by_multiplying_channels(fmt, fresh_transforms):
    cmyk = np.zeros((224, 224, 4), dtype=np.uint8)
    cmyk[:, 112:, 0] = 255  # cyan beside paper white
    got = _seen(saved(Image.fromarray(cmyk, "CMYK"), fmt, icc_profile=_cmyk_profile(),
                      **({"quality": 95} if fmt == "JPEG" else {})))
    assert np.abs(got[100:124, 20:90] - 255).max() <= 3
    # Within the 8-bit table's precision (Lab in steps of 0.4-1): not (0, 255, 255).
    assert np.abs(got[100:124, 134:204] - _INKS[0] * 255).max() <= 10, got[112, 160]


@pytest.mark.parametrize("make", [
    lambda: bytes(600),  # no profile at all
    lambda: _adobe_rgb_profile()[:200],  # cut short
    lambda: _adobe_rgb_profile()[:128] + bytes(400),  # a header, then nothing
    _grey_profile,  # a grey profile for colour pixels
    _cmyk_profile,  # CMYK's for RGB
])
def test_a_profile_that_cannot_be_used_leaves_the_pixels_as_they_are(make, fresh_transforms):
    profile = make()
    plain = _seen(saved(_patches(), "PNG"))
    assert np.array_equal(_seen(saved(_patches(), "PNG", icc_profile=profile)), plain)
    assert np.array_equal(_seen(saved(_patches(), "JPEG", icc_profile=profile, quality=95)),
                          _seen(saved(_patches(), "JPEG", quality=95)))


def test_a_transform_is_built_once_for_the_images_that_share_a_profile(monkeypatch, fresh_transforms):
    """Building one takes milliseconds, and every iPhone sends the same profile."""
    from PIL import ImageCms

    built = []
    build = ImageCms.buildTransform
    monkeypatch.setattr(ImageCms, "buildTransform", lambda *args, **kw: built.append(1) or build(*args, **kw))
    first = _seen(saved(_patches(), "PNG", icc_profile=_adobe_rgb_profile()))
    again = _seen(saved(_patches(), "JPEG", icc_profile=_adobe_rgb_profile(), quality=95))
    assert len(built) == 1
    green = (slice(40, 72), slice(40, 72))
    assert np.abs(again - _seen(saved(_patches(), "JPEG", quality=95)))[green].max(axis=-1).min() > 25
    assert np.abs(first - again)[green].max() <= 3  # converted alike


def test_only_the_transforms_of_the_last_few_profiles_are_kept(monkeypatch, fresh_transforms):
    from PIL import ImageCms

    from app_tier import images

    monkeypatch.setattr(images, "_TRANSFORMS_KEPT", 2)
    built = []
    build = ImageCms.buildTransform
    monkeypatch.setattr(ImageCms, "buildTransform", lambda *args, **kw: built.append(1) or build(*args, **kw))
    gammas = (1.8, 2.0, 2.2, 1.8)  # the first forgotten by the time it comes again
    for gamma in gammas:
        _seen(saved(_patches(), "PNG", icc_profile=_adobe_rgb_profile(gamma)))
    assert len(built) == 4 and len(images._transforms) == 2


def test_an_srgb_profile_costs_no_conversion(monkeypatch, fresh_transforms):
    """Most photos say they are sRGB: converting them would change nothing, for some 1.5 ms each."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = saved(_patches(), "PNG", icc_profile=srgb)
    plain = _seen(saved(_patches(), "PNG"))
    assert np.array_equal(_seen(tagged), plain)  # the profile recognised, once
    monkeypatch.setattr(ImageCms.ImageCmsTransform, "apply", lambda *args: pytest.fail("converted"))
    assert np.array_equal(_seen(tagged), plain)


def test_without_littlecms_profiles_are_ignored_with_one_warning(monkeypatch, fresh_transforms, caplog):
    from app_tier import images

    monkeypatch.setattr(images, "_HAVE_LCMS", False)
    monkeypatch.setattr(images, "_said", set())
    plain = _seen(saved(_patches(), "PNG"))
    for _ in range(2):
        assert np.array_equal(_seen(saved(_patches(), "PNG", icc_profile=_adobe_rgb_profile())), plain)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "littlecms" in r.getMessage()]
    assert len(warned) == 1


def test_a_large_cmyk_image_is_reduced_before_its_profile_converts_it(fresh_transforms, monkeypatch):
    """The transform costs ~25 ns a pixel: at full size a 40-megapixel CMYK TIFF took a
    worker 4 s. Reduced first (to REDUCING_GAP times the input), it costs ~50 ms, and its
    flat colours come out as at full size."""
    from app_tier import images

    sizes = []
    real = images._in_srgb
    monkeypatch.setattr(images, "_in_srgb", lambda img, *a: sizes.append(img.size) or real(img, *a))
    side = images.INPUT_SIZE[0] * images.REDUCING_GAP * 2
    cmyk = np.zeros((side, side, 4), dtype=np.uint8)
    cmyk[:, side // 2:, 0] = 255  # cyan beside paper white
    got = _seen(saved(Image.fromarray(cmyk, "CMYK"), "TIFF", icc_profile=_cmyk_profile()))
    assert sizes == [(side // 2, side // 2)]
    assert np.abs(got[100:124, 20:90] - 255).max() <= 3
    assert np.abs(got[100:124, 134:204] - _INKS[0] * 255).max() <= 10, got[112, 160]


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # Pillow, writing the odd tag
@pytest.mark.parametrize("tag_type, value", [(2, "not a profile at all"), (3, (1, 2, 3, 4)), (4, 5)])
@pytest.mark.parametrize("mode", ["RGB", "CMYK"])
def test_a_tiff_icc_tag_that_is_not_bytes_is_no_profile(tag_type, value, mode, fresh_transforms):
    """Pillow gives a TIFF's ICC tag written as text or numbers as str or int: hashing
    it raised TypeError, and the image was released until it was a dead letter."""
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[34675] = value
    tags.tagtype[34675] = tag_type
    pixels = Image.fromarray(np.full((64, 64, len(mode)), 100, np.uint8), mode)
    buffer = io.BytesIO()
    pixels.save(buffer, "TIFF", tiffinfo=tags)
    plain = io.BytesIO()
    pixels.save(plain, "TIFF")
    assert np.array_equal(prepare(buffer.getvalue(), MAX_PIXELS), prepare(plain.getvalue(), MAX_PIXELS))
