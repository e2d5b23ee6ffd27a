"""Turning uploaded bytes into ResNet-50 input, and saying clearly why when we can't."""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError, features

from common.image_limits import (
    HEAVY_DECODE_DIVISORS,
    PILLOW_REFUSALS,
    READ_FORMATS,
    oversize_refusal,
    parts_refusal,
    pillow_refusal,
)
from common.pillow_errors import plain_reason

INPUT_SIZE = (224, 224)
# Above this, after `draft`, decoding takes some 30 MB or more (RGB, 3 bytes a pixel,
# and Pillow's working copies): see `prepare`.
LARGE_IMAGE_PIXELS = 4_000_000
# Where open_image notes, in an image's `info`, the pixels decoding it holds when
# that is more than its size after `draft`.
_HELD_WHOLE = "imgclass.held_whole"
# After decoding more pixels than this, give the memory freed back (release_freed_memory).
TRIM_AFTER_PIXELS = 1_000_000
# Modes whose samples go past 8 bits: 16-bit greyscale PNGs and TIFFs ("I;16*"; Pillow
# may read them as "I" too), 32-bit integer and floating-point TIFFs.
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes whose samples can be averaged before they are converted to RGB, to the same
# effect (Image.reduce refuses 16-bit and 1-bit ones). Not 32-bit integers: reduce sums
# them in 32 bits, which wrap (2**31 - 10 came out -10); nor floats, whose brightest
# sample sets their scale and whose NaN would blacken a whole box (_to_8_bits); nor
# CMYK or YCbCr, whose conversions are not linear: each is
# reduced once converted.
_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa"})
# CMYK that its profile converts, reduced first all the same: see load_rgb.
CMYK_BY_PROFILE = _REDUCIBLE_MODES | {"CMYK"}
# A large image is reduced by box averaging until its sides are within this factor of
# the model's input; `to_input`'s resize does the rest. Pillow's `reducing_gap` says 3
# is "indistinguishable from" resizing in one go, but on fine periodic textures 3 let
# moire through that 6 does not (4032 px, period 7: 10.2 against 0.6 off a Lanczos
# resize, where resizing whole gives 1.4); memory is the same either way.
REDUCING_GAP = 6
# Deep samples are scaled to 8 bits this many at a time (as float32: 4 MB).
_SCALING_SAMPLES = 1 << 20
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the turn that shows the image upright (as ImageOps.exif_transpose,
# which also rewrites the EXIF and so fails on some damaged EXIF that viewers read).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# ImageNet channel means in BGR order: Keras's "caffe" preprocessing for ResNet-50.
_BGR_MEANS = np.array([103.939, 116.779, 123.68], dtype=np.float32)
# Pillow's wheels carry littlecms; one built without it reads profiles, cannot apply them.
_HAVE_LCMS = features.check("littlecms2")
# The pixels a colour profile of each kind describes, by the mode Pillow decodes them in
# (a PNG's palette, and a JPEG's YCbCr once decoded, are RGB), and the profile's colour
# space (ICC's signature) that must say the same.
_PROFILE_KINDS = {
    **dict.fromkeys(("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "YCbCr"), "RGB"),
    **dict.fromkeys(("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"), "L"),
    "CMYK": "CMYK",
}
_PROFILE_SPACES = {"RGB": "RGB", "L": "GRAY", "CMYK": "CMYK"}
# Where load_rgb notes, in its result's `info`, the profile (and kind) whose colours its
# pixels are still in, for to_input to convert once they are few.
_PROFILED = "imgclass.profiled"
# Transforms kept, by profile: building one takes 4-8 ms, and photos come with a few
# profiles over and over (every iPhone sends the same Display P3). None: nothing to do.
_TRANSFORMS_KEPT = 16
_transforms: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
_transforms_lock = threading.Lock()
# Topics already warned of: see _warn_once.
_said: set[str] = set()

log = logging.getLogger(__name__)


class BadImage(ValueError):
    """The bytes are not an image this service can classify; the message says why."""


@contextmanager
def _bad_image_errors(max_pixels: int) -> Iterator[None]:
    """Pillow's many errors on hostile or damaged files, as BadImage saying which."""
    try:
        yield
    except BadImage:
        raise
    except PILLOW_REFUSALS as exc:
        raise BadImage(pillow_refusal(exc, max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image format this service reads") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"damaged or unreadable image: {plain_reason(exc)}") from exc
    except MemoryError:
        raise  # may pass once other decodes end: not the image's fault
    except Exception as exc:
        # Decoding the same bytes fails the same way every time: retrying such an
        # image (struct.error, ZeroDivisionError... from a damaged file's fields)
        # would only walk it to the dead-letter queue.
        # Said as other damaged images are, without Python's name for the error (a
        # damaged AVIF's RuntimeError).
        raise BadImage(f"damaged or unreadable image: {plain_reason(exc)}") from exc


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only: refuse what is too large, and ask for the smallest decode.

    `Image.draft` lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale,
    which skips most of the decoding work for photos far bigger than 224x224;
    `size` is then the reduced size (see `decoding_pixels` for what decoding holds).
    """
    if not data:
        raise BadImage("the file is empty")
    # Before Pillow reads a JPEG's or PNG's header, part by part in Python.
    jpeg, too_slow = parts_refusal(data)
    if too_slow:
        raise BadImage(too_slow)
    with _bad_image_errors(max_pixels):
        img = Image.open(io.BytesIO(data), formats=READ_FORMATS)
        too_large = oversize_refusal(*img.size, max_pixels, img.format)
        if too_large:
            raise BadImage(too_large)
        width, height = img.size
        img.draft("RGB", INPUT_SIZE)
        # libjpeg keeps the coefficients of a JPEG drawn in more than one scan (any
        # progressive one, and a baseline one whose scans split its colours) for the
        # whole image, whatever the scale: see decoding_pixels.
        if jpeg is not None and (jpeg.scans > 1 or img.info.get("progressive")):
            img.info[_HELD_WHOLE] = width * height
    return img


def decoding_pixels(img: Image.Image) -> int:
    """The pixels decoding an image opened by `open_image` holds at once: its size
    after `draft`, but the whole image's for a JPEG of several scans (40 megapixels,
    progressive: +230-307 MB where a baseline JPEG drafted to the same size takes
    +3 MB, and eight decoded side by side take a worker from 0.5 to 3 GB;
    24 megapixels in 3 baseline scans: +73 MB against +5). Counted as an
    RGB PNG's: a WebP's twice (HEAVY_DECODE_DIVISORS), as decoding one holds ~15
    bytes a pixel (eight of 3.9 megapixels side by side: +424 MB)."""
    return img.info.get(_HELD_WHOLE, img.width * img.height) * HEAVY_DECODE_DIVISORS.get(img.format or "", 1)


def load_rgb(img: Image.Image, max_pixels: int) -> Image.Image:
    """Decode the pixels of an image opened by `open_image` as 8-bit RGB, as a viewer
    shows them: turned upright by its EXIF orientation (phones store photos sideways
    and say so there), transparent parts on white, and samples deeper than 8 bits
    scaled to 0-255 (Pillow's own conversion clips them: a 16-bit photo came out
    nearly all white, a floating-point one all black).

    A large image is first reduced (`_reduced`), and each step's input is closed
    (its pixels freed) as soon as the next exists, `img` too: at full size every
    copy of a 40-megapixel RGBA image is 160 MB, and keeping them all took a worker
    +918 MB; freed, +480; reduced first, +323 (measured).

    Pixels that an embedded colour profile describes (Display P3 from iPhones, Adobe
    RGB from cameras, a grey profile) are left in its colours, and the profile noted in
    the result: to_input converts them to sRGB, as ImageNet's photos were, once
    resized to 50,000 pixels (~1.2 ms). CMYK is converted here, by its profile where
    it has one: Pillow's own conversion, which multiplies channels, is the only other
    way to RGB."""
    icc = img.info.get("icc_profile")
    if not isinstance(icc, bytes | bytearray):
        icc = None  # a TIFF's ICC tag written as text or numbers: no profile to apply
    kind = _PROFILE_KINDS.get(img.mode) if icc else None
    rgb = _decoded_rgb(img, max_pixels, icc if kind == "CMYK" else None)
    if kind in ("RGB", "L"):
        rgb.info[_PROFILED] = (icc, kind)
    return rgb


def _decoded_rgb(img: Image.Image, max_pixels: int, cmyk_profile: bytes | None) -> Image.Image:
    """load_rgb's pixels: see there."""
    with _bad_image_errors(max_pixels):
        # Decoded first, here: a PNG's EXIF is read by decoding, and _orientation,
        # which must swallow EXIF's own errors, would swallow a damaged decode's too,
        # leaving half-decoded pixels that the conversions below take as they are.
        img.load()
        turn = _UPRIGHT.get(_orientation(img))
        img = _reduced(img)
        if turn is not None:
            img = _instead(img, img.transpose(turn))
        if img.mode in _HIGH_DEPTH_MODES:
            img = _reduced(_instead(img, _to_8_bits(img)))
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img if img.mode == "RGBA" else _reduced(_instead(img, img.convert("RGBA")))
            if rgba.getextrema()[3][1] == 0:
                # Transparent everywhere: nothing to see, on white a blank square. A
                # 32-bit BMP's fourth byte, say, is often zero padding, not alpha.
                return _instead(rgba, rgba.convert("RGB"))
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            on_white = Image.alpha_composite(white, rgba)
            white.close()
            rgba.close()
            return _instead(on_white, on_white.convert("RGB"))
        if img.mode == "RGB":
            return img
        if img.mode == "CMYK" and cmyk_profile is not None:
            # Reduced first, unlike Pillow's own conversion: a profile's transform costs
            # ~25 ns a pixel, and a 40-megapixel CMYK TIFF would take 4 s of a worker's CPU at
            # full size (an upload anyone can repeat). Inks averaged in boxes convert to
            # slightly other colours than averaged conversions only where the box spans an
            # edge, and the sides stay REDUCING_GAP times the model's input.
            reduced = _reduced(img, CMYK_BY_PROFILE)
            return _instead(reduced, _in_srgb(reduced, cmyk_profile, "CMYK"))
        return _reduced(_instead(img, img.convert("RGB")))


def _reduced(img: Image.Image, reducible: frozenset[str] = _REDUCIBLE_MODES) -> Image.Image:
    """`img` made smaller, each side by a whole factor of its own (the model's input is
    square whatever the image), its pixels averaged in boxes, while each side stays at
    least REDUCING_GAP times the input's; `img` itself where that would change what
    it shows (see _REDUCIBLE_MODES): a palette's indices, or a colour key (PNG's tRNS)
    that averaged pixels would no longer match, are reduced once converted."""
    across = max(1, img.width // (INPUT_SIZE[0] * REDUCING_GAP))
    down = max(1, img.height // (INPUT_SIZE[1] * REDUCING_GAP))
    if across * down < 2 or img.mode not in reducible or "transparency" in img.info:
        return img
    if img.mode in ("RGBA", "LA") and 2 * img.getextrema()[-1][1] < across * down:
        # Transparent everywhere, or so nearly that every box would average to alpha 0:
        # load_rgb shows the colours of the one and composites the other on white, and
        # reduce's premultiplying by alpha would make both black.
        return img
    # Whole boxes only: a last box of the few pixels left over would count in the
    # resize as a whole one, and skew the edge. At most a box's width lost.
    whole_boxes = (0, 0, img.width - img.width % across, img.height - img.height % down)
    # Image.reduce averages RGBA and LA premultiplied by alpha, as compositing needs.
    return _instead(img, img.reduce((across, down), box=whole_boxes))


def _instead(old: Image.Image, new: Image.Image) -> Image.Image:
    """`new`, once `old`'s pixels are freed."""
    if new is not old:
        old.close()
    return new


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright). EXIF that viewers tolerate can be damaged
    in ways Pillow's parser trips on: such an image is shown as stored."""
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001  (Pillow raises many kinds on damaged EXIF)
        return 1


def _to_8_bits(img: Image.Image) -> Image.Image:
    """A greyscale image of more than 8 bits a sample, scaled to 8 bits from the
    range its kind implies: 0-65535 for 16-bit samples; 0-1 for floating point
    (with room for overshoot), else 0-255 when the samples fit, else their maximum
    (12-bit data in a 32-bit TIFF). A transparent grey (PNG's tRNS) stays transparent.

    Samples are read and scaled a band of rows at a time: as float32, a whole
    40-megapixel image is 160 MB, and one copy of it took a 16-bit PNG to +518 MB."""
    width, height = img.size
    rows = max(1, _SCALING_SAMPLES // max(1, width))
    bands = [(top, min(top + rows, height)) for top in range(0, height, rows)]

    def samples_of(top: int, bottom: int) -> np.ndarray:
        return np.asarray(img.crop((0, top, width, bottom)))

    if img.mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        # The range from finite samples: one +inf would make the full scale 3.4e38 (nan_to_num's
        # largest float) and the whole picture black. NaN is black, inf white.
        brightest = 0.0
        for band in bands:
            raw = samples_of(*band)
            brightest = max(brightest, float(raw.max(initial=0, where=np.isfinite(raw))))
        full_scale = 1.0 if img.mode == "F" and brightest <= 1.5 else max(255.0, brightest)
    transparent = img.info.get("transparency")
    keyed = isinstance(transparent, int)
    scaled = np.empty((height, width), dtype=np.uint8)
    alpha = np.empty((height, width), dtype=np.uint8) if keyed else None
    for top, bottom in bands:
        raw = samples_of(top, bottom)
        if alpha is not None:
            alpha[top:bottom] = np.where(raw == transparent, np.uint8(0), np.uint8(255))
        samples = raw.astype(np.float32)
        np.nan_to_num(samples, copy=False, nan=0.0, posinf=full_scale, neginf=0.0)
        samples *= 255.0 / full_scale
        samples += 0.5
        scaled[top:bottom] = np.clip(samples, 0, 255, out=samples)
    if alpha is not None:
        return Image.merge("LA", (Image.fromarray(scaled, "L"), Image.fromarray(alpha, "L")))
    return Image.fromarray(scaled, "L")


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to an RGB image no larger than needed for a 224x224 input."""
    return load_rgb(open_image(data, max_pixels), max_pixels)


def to_input(img: Image.Image) -> np.ndarray:
    """A 224x224x3 float32 array in ResNet-50's (caffe) preprocessing, in sRGB's
    colours if load_rgb noted a profile for its pixels."""
    resized = img.resize(INPUT_SIZE, Image.Resampling.BILINEAR)
    profiled = img.info.get(_PROFILED)
    if profiled is not None:
        resized = _in_srgb(resized, *profiled)
    rgb = np.asarray(resized)
    # From uint8 to the float result in one pass per channel, into the BGR order the
    # weights want: the same values as converting first and subtracting after, at
    # 0.12 ms an image, against 0.35 for one strided subtraction of all three
    # and 1.0 converting first.
    out = np.empty(rgb.shape, dtype=np.float32)
    for bgr in range(3):
        np.subtract(rgb[..., 2 - bgr], _BGR_MEANS[bgr], out=out[..., bgr], dtype=np.float32)
    return out


def _in_srgb(img: Image.Image, icc: bytes, kind: str) -> Image.Image:
    """`img`, whose pixels profile `icc` describes as of mode `kind`, in sRGB's colours
    (RGB); as Pillow converts it where that profile changes nothing or cannot be used:
    a profile must never cost an image its classification."""
    transform = _transform(icc, kind)
    if transform is not None:
        try:
            # load_rgb's grey pixels come as RGB, each channel the same: as L, the same.
            return transform.apply(img if img.mode == kind else img.convert(kind))
        except MemoryError:
            raise  # may pass once other decodes end: not the image's fault
        except Exception as exc:  # noqa: BLE001  (littlecms's refusals come as several kinds)
            _warn_once("applying", "a colour profile could not be applied (%s): pixels taken as sRGB", exc)
    return img if img.mode == "RGB" else img.convert("RGB")


def _transform(icc: bytes, kind: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from pixels of mode `kind` in profile `icc` to sRGB, built once
    and kept (_TRANSFORMS_KEPT); None where there is nothing to do (see _built)."""
    if not _HAVE_LCMS:
        _warn_once("littlecms", "Pillow has no littlecms2: images' colour profiles are ignored, "
                                "their pixels taken as sRGB")
        return None
    key = (hashlib.sha256(icc).digest(), kind)
    with _transforms_lock:
        if key in _transforms:
            _transforms.move_to_end(key)
            return _transforms[key]
    # Built outside the lock: other threads' images need not wait. Two threads may
    # build the same one at once; the last kept.
    transform = _built(icc, kind)
    with _transforms_lock:
        _transforms[key] = transform
        while len(_transforms) > _TRANSFORMS_KEPT:
            _transforms.popitem(last=False)
    return transform


def _built(icc: bytes, kind: str) -> ImageCms.ImageCmsTransform | None:
    """A new transform, or None: for a profile that is damaged, that littlecms refuses,
    or that describes other pixels than these (a grey profile in a colour image), the
    pixels are used as they are; for one whose conversion changes nothing (sRGB's, in
    its many versions), so as to skip converting each image (~1.2 ms at 224x224)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = source.profile.xcolor_space.strip()
        if space != _PROFILE_SPACES[kind]:
            _warn_once("mismatch", "an image's colour profile is for %s, not %s pixels: ignored", space, kind)
            return None
        # NOCACHE: without it, littlecms keeps the last pixel converted in the transform,
        # which the decoding threads share.
        transform = ImageCms.buildTransform(source, _srgb_profile(), kind, "RGB",
                                            flags=ImageCms.Flags.NOCACHE)
        if kind != "CMYK" and _changes_nothing(transform, kind):
            return None
        return transform
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (damaged profiles fail in many ways)
        _warn_once("refused", "an image's colour profile could not be used (%s): pixels taken as sRGB", exc)
        return None


@cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _changes_nothing(transform: ImageCms.ImageCmsTransform, kind: str) -> bool:
    """Whether `transform` leaves every sample within 1 of what it was, tried on a
    grid of colours (18 levels a channel) and on every grey."""
    levels = np.arange(0, 256, 15, dtype=np.uint8)
    if kind == "RGB":
        grid = np.stack(np.meshgrid(levels, levels, levels), axis=-1).reshape(-1, 3)
        greys = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        samples = np.concatenate([grid, greys])[None]
        probe = Image.fromarray(samples, "RGB")
    else:
        samples = np.arange(256, dtype=np.uint8)[None, :, None]
        probe = Image.fromarray(samples[..., 0], "L")
    converted = np.asarray(transform.apply(probe), dtype=np.int16)
    return bool(np.abs(converted - samples).max() <= 1)


def _warn_once(topic: str, message: str, *args: object) -> None:
    """`message` as a warning the first time for its topic, in debug after: a stream
    of images with damaged profiles must not flood the log."""
    level = logging.DEBUG if topic in _said else logging.WARNING
    _said.add(topic)
    log.log(level, message, *args)


def prepare(data: bytes, max_pixels: int, large: threading.Semaphore | None = None,
            watch: Callable[[], AbstractContextManager] = nullcontext) -> np.ndarray:
    """Bytes of an upload to one model input, or BadImage.

    Images that stay large after `draft` (a 40-megapixel PNG of 130 KB takes
    +160 MB to decode, +320 MB with transparency, +330 MB for 16-bit grey with a
    transparent value), and large JPEGs of several scans, are decoded only while holding
    `large`, so that a batch of them cannot run a small instance out of memory
    all at once. Pillow's work runs inside `watch()` (the worker times it), the
    wait for `large` not.
    """
    with watch():
        img = open_image(data, max_pixels)
    pixels = decoding_pixels(img)
    is_large = large is not None and pixels > LARGE_IMAGE_PIXELS
    try:
        with large if is_large else nullcontext(), watch():
            return to_input(load_rgb(img, max_pixels))
    finally:
        if pixels > TRIM_AFTER_PIXELS:
            img.close()  # its pixels, before they are given back
            release_freed_memory()


def release_freed_memory() -> None:
    """Give the memory freed by a large decode back to the system (glibc's malloc_trim).

    Decodes run on several threads, each with an arena of glibc's own, which keeps
    what a decode frees for later: 8 PNGs of 12 megapixels leave a process at
    1.4 GB resident, for good, where a worker budgets 0.6 GiB. Where
    there is no glibc (macOS, musl), there is nothing to do."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


_malloc_trim = _find_malloc_trim()


def warm_up() -> None:
    """Decode one tiny JPEG now. A process's first decode loads PIL's format
    plugins and numpy's code paths (measured: ~30 ms of CPU), which a newly
    launched instance's first request would otherwise wait for."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    prepare(buffer.getvalue(), max_pixels=64)
