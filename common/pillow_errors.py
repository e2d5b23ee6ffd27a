"""Pillow's errors on damaged files, said in words the sender of the file can act on.

Both tiers show them: the web tier when it checks an upload, the worker when
only a decode finds the damage. Pillow's own texts name its internals ("decoder
error -2", "Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK").
"""

from __future__ import annotations

import re

_TRUNCATED = "the file ends before its image data does (cut short)"
_DAMAGED = "the compressed image data is damaged"

# A phrase in Pillow's message -> what it means. Pillow's decoder error codes:
# -1 buffer overrun, -2 broken data stream, -9 out of memory (ImageFile.ERRORS).
_PLAIN = (
    ("Truncated File Read", _TRUNCATED),
    ("image file is truncated", _TRUNCATED),
    ("broken data stream", _DAMAGED),
    ("decoder error -2", _DAMAGED),
    ("buffer overrun", _DAMAGED),
    ("decoder error -1", _DAMAGED),  # whole codes only (see plain_reason): -10 is another
    ("could not create decoder object", "the image data is damaged or cut short"),
    ("MAX_TEXT_CHUNK", "it holds a text or colour-profile chunk too large to read (over 1 MB unpacked)"),
)


def plain_reason(exc: BaseException) -> str:
    """What Pillow's error `exc` means for the file, or its own text when it is not one of these."""
    text = str(exc)
    for phrase, meaning in _PLAIN:
        if re.search(re.escape(phrase) + r"(?![0-9])", text):
            return meaning
    return text
