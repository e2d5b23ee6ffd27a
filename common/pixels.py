"""How many pixels an image may have: one rule for the web tier's check and the worker's decoder.

Pillow has a limit of its own (`Image.MAX_IMAGE_PIXELS`, ~89 megapixels), past which
it warns, and past twice which it refuses to open a file. Both tiers make the warning
an error too, so an image the web tier accepts is one every worker can decode, and
the limit that applies is the lower of MAX_IMAGE_PIXELS and Pillow's.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

# Pillow's messages read "Image size (<n> pixels) exceeds limit of <m> pixels, ...".
_PILLOW_SIZE = re.compile(r"\((\d+) pixels\)")


def pixel_limit(configured: int) -> int:
    """The most pixels an image may have here: MAX_IMAGE_PIXELS, or Pillow's lower limit."""
    return min(configured, Image.MAX_IMAGE_PIXELS or configured)


@contextmanager
def pillow_limit_enforced() -> Iterator[None]:
    """Past Pillow's own limit, an error (DecompressionBombWarning) rather than a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def too_many_pixels(exc: Exception, configured: int) -> str:
    """Pillow's refusal of a decompression bomb, said in terms of the limit that applies
    (its own message quotes its internal thresholds, not what this service allows)."""
    size = _PILLOW_SIZE.search(str(exc))
    what = f"{int(size.group(1))} pixels" if size else "too many pixels"
    return f"image has {what}, more than the limit of {pixel_limit(configured)}"
