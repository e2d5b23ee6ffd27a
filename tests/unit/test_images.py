"""Decoding: the model sees an upload as a viewer would show it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app_tier.images import decode

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


@pytest.mark.parametrize("full_scale", [1.0, 255.0])
def test_floating_point_samples_are_scaled_from_their_range(grey8, full_scale):
    floats = Image.fromarray(grey8.astype(np.float32) * (full_scale / 255), "F")
    got = pixels(saved(floats, "TIFF"))
    assert np.abs(got - grey8[..., None]).max() <= 1


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
