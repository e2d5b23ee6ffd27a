"""The name an uploaded file is known by: as sent, made fit to show in one line."""

from __future__ import annotations

import unicodedata

from werkzeug.datastructures import FileStorage

from common.names import decode_filename, encode_filename, kept_extension

# Longer names are cut before their extension (clean_name); storage uses names.safe_filename.
MAX_FILENAME_CHARS = 1024

# Characters shown as a space: controls, and the line and paragraph separators, which
# end a line as well (U+2028 split POST /'s one-line answer in two).
_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})
# Dropped: bidirectional-text controls (shown, "photo\u202egpj.exe" reads as
# "photoexe.jpg"), and characters that show nothing at all (a byte-order mark, zero-width
# spaces, a soft hyphen, Hangul fillers, the other format characters), with which two
# names that look alike differ (a BOM kept in the middle of results.csv). Among them the
# tag characters, which carry ASCII unseen ("cat\U000e0041\U000e0042.jpg" showed as
# "cat.jpg"): the flags of England, Scotland and Wales, written with them, lose them and
# show a black flag. Not the zero-width joiners, which emoji and some scripts are written
# with, nor variation selectors (an emoji's look).
DROPPED_CHARACTERS = ("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                      "\u00ad\u180e\u200b\u2060\u2061\u2062\u2063\u2064\ufeff"
                      "\u115f\u1160\u3164\uffa0\u206a\u206b\u206c\u206d\u206e\u206f"
                      "\ufff9\ufffa\ufffb" + "".join(map(chr, range(0x1D173, 0x1D17B)))
                      + "".join(map(chr, range(0x1BCA0, 0x1BCA4))) + "\U000e0001"
                      + "".join(map(chr, range(0xE0020, 0xE0080))))
_DROPPED = dict.fromkeys(map(ord, DROPPED_CHARACTERS))


def display_name(storage: FileStorage) -> str:
    """The name shown for a file: as sent, but with control characters (which would
    break the one-line answer of POST /) turned into spaces, and without the
    bidirectional-text controls that make a name read as another, or characters that
    show nothing (DROPPED_CHARACTERS)."""
    return clean_name(storage.filename or "")


def clean_name(sent: str) -> str:
    """A file name as sent, made fit to show (see display_name); one too long is cut
    before its extension, which POST /'s answer drops."""
    name = "".join(" " if unicodedata.category(c) in _LINE_BREAKING else c
                   for c in sent.translate(_DROPPED))
    name = name.strip()
    if len(name) > MAX_FILENAME_CHARS:
        kept = kept_extension(name)
        name = name[:MAX_FILENAME_CHARS - len(kept)] + kept
    # The output object takes the name from the input object's metadata, which holds
    # it percent-encoded in MAX_META_FILENAME characters (about 290 two-byte or 190
    # three-byte characters): cut here as it would be cut there, the answer, the page
    # and the output object all show one name.
    name = decode_filename(encode_filename(name))
    return name or "upload"
