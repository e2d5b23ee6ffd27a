"""A batch's results as a CSV file, as the server holds them (GET /api/jobs/<id>/results.csv):
for programs and links. The upload page builds its own from its rows, which also show
the files the server refused."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence

from web_tier.batch_json import slices
from web_tier.results import DONE, FAILED, Item

COLUMNS = ("filename", "state", "label", "score", "error", "untrained")

# A cell a spreadsheet would read as a formula ("=HYPERLINK(...)" as a file name): file
# names are the uploader's to choose, and the CSV is opened by someone else. OWASP's
# advice: start such a cell with a quote, which spreadsheets show as text.
# Excel splits on ";" too where the decimal mark is a comma (German, French, ...), and
# there every ";" of a row may begin a cell, inside quotes or not ("photo;=1+1.jpg" gave
# a cell "=1+1"): what such a cell would start with is quoted as well.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_AFTER_SEMICOLON = re.compile(r";(?=[\"\s]*[=+\-@\t\r])")  # through quotes and spaces too


def results_csv_slices(items: Sequence[Item], model_untrained: bool) -> Iterator[str]:
    """One header row, then a row per item in the batch's order, a slice of rows at a
    time, as the JSON (a batch has no size limit: web_tier/batch_json.py). `untrained` is as
    GET /api/jobs/<id> says it, per item: its labels are then meaningless."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for piece in slices(items):
        writer.writerows(_row(item, model_untrained) for item in piece)
        yield out.getvalue()
        out.seek(0)
        out.truncate()
    if out.tell():
        yield out.getvalue()  # the header of a batch of no items


def _row(item: Item, model_untrained: bool) -> list[str]:
    # The state first, and only the fields it says are final: a result's listener
    # sets the state last (Item._apply), and nothing here takes the book's lock. A
    # dead letter's failure a late answer turns into a result goes through both.
    state = item.state
    done, failed = state == DONE, state == FAILED
    label = (item.label or "") if done else ""
    score = f"{item.score:.6f}" if done and item.score is not None else ""
    error = (item.error or "") if failed else ""
    return [_as_text(item.filename), state, _as_text(label), score, _as_text(error),
            "true" if item.shows_untrained(model_untrained, state) else "false"]


def _as_text(cell: str) -> str:
    cell = _FORMULA_AFTER_SEMICOLON.sub(";'", cell)
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell
