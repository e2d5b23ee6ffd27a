"""How many pixels an image may have: one rule for the web tier's check and the worker's decoder.

Pillow has a limit of its own (`Image.MAX_IMAGE_PIXELS`, ~89 megapixels): past it
Pillow only warns, past twice it refuses to open the file. The limit that applies
here is the lower of MAX_IMAGE_PIXELS and Pillow's, checked against the size in
the header as soon as a file is opened, in both tiers, so an image the web tier
accepts is one every worker can decode. (Not by turning Pillow's warning into an
error: `warnings.catch_warnings` changes process-wide state, and threads leaving
it undo each other's filters: one bomb in 6,000 got through 8 threads that way.)
"""

from __future__ import annotations

import re

from PIL import Image

# Pillow's refusals read "Image size (<n> pixels) exceeds limit of <m> pixels, ...".
_PILLOW_SIZE = re.compile(r"\((\d+) pixels\)")
# What Pillow raises (or, where warnings are made errors, warns) on a decompression bomb.
PILLOW_REFUSALS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def pixel_limit(configured: int) -> int:
    """The most pixels an image may have here: MAX_IMAGE_PIXELS, or Pillow's lower limit."""
    return min(configured, Image.MAX_IMAGE_PIXELS or configured)


def size_refusal(width: int, height: int, configured: int) -> str | None:
    """Why an image of this size is refused, or None if it is not."""
    limit = pixel_limit(configured)
    if width * height > limit:
        return f"image is {width}x{height} pixels, more than the limit of {limit}"
    return None


def pillow_refusal(exc: Exception, configured: int) -> str:
    """Pillow's own refusal of a decompression bomb, said in terms of the limit that
    applies (its message quotes its internal threshold, not what this service allows)."""
    size = _PILLOW_SIZE.search(str(exc))
    what = f"{int(size.group(1))} pixels" if size else "too many pixels"
    return f"image has {what}, more than the limit of {pixel_limit(configured)}"
