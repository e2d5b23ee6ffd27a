"""The output object's text: `<image file name>,<label>`, one CSV record.

The name is the one the image was uploaded with. Quoted only when it needs to be
(a comma, a quote or a line break in it), so the usual `test_00.JPEG,cat` reads
the same to a person, to `split(",")` and to any CSV reader.
"""

from __future__ import annotations

import csv
import io


def pair_text(filename: str, label: str) -> str:
    out = io.StringIO()
    # The record's own terminator is dropped after: given as "", the writer would
    # no longer quote a line break inside a name.
    csv.writer(out, lineterminator="\r\n").writerow([filename, label])
    return out.getvalue().removesuffix("\r\n")


def label_of(text: str) -> str:
    """The label in an output object's text (its last field)."""
    fields = next(csv.reader(io.StringIO(text)), [])
    return fields[-1].strip() if fields else ""
