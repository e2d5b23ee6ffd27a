"""A batch's results as a CSV file: what a person takes away from a batch of hundreds."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from web_tier.results import Item

COLUMNS = ("filename", "state", "label", "score", "error", "untrained")

# A cell a spreadsheet would read as a formula ("=HYPERLINK(...)" as a file name): file
# names are the uploader's to choose, and the CSV is opened by someone else. OWASP's
# advice: start such a cell with a quote, which spreadsheets show as text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def results_csv(items: Iterable[Item], model_untrained: bool) -> str:
    """One header row, then a row per item in the batch's order. `untrained` is as
    GET /api/jobs/<id> says it, per item: its labels are then meaningless."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for item in items:
        # The state first: a result's listener sets it last, once the other fields are
        # final (Item._apply), and nothing here takes the book's lock.
        state = item.state
        score = "" if item.score is None else f"{item.score:.6f}"
        writer.writerow([_as_text(item.filename), state, _as_text(item.label or ""), score,
                         _as_text(item.error or ""),
                         "true" if item.shows_untrained(model_untrained) else "false"])
    return out.getvalue()


def _as_text(cell: str) -> str:
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell
