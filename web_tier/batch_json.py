"""A batch as GET /api/jobs/<id> answers it, written out a slice of items at a time.

A batch has no size limit, and a whole answer built at once held about three times its
JSON in memory (10,000 items with 1,000-character names: a 13 MB answer, 33 MB at the
peak), for each read at once. Written out in slices, a read holds one slice's worth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from web_tier.results import DONE, Item

ITEMS_PER_SLICE = 500


def batch_untrained(items: Sequence[Item], model_untrained: bool) -> bool:
    """What the batch's results say; before any, what the configured model (or, once
    known, the workers' latest answer) says, so that a batch still queued is not called
    trained."""
    done = [i for i in items if i.state == DONE]
    if done:
        return any(i.untrained for i in done)
    return any(i.shows_untrained(model_untrained) for i in items) or model_untrained


def batch_json_slices(batch_id: str, items: Sequence[Item], model_untrained: bool,
                      dumps: Callable[[Any], str]) -> Iterator[str]:
    """The text of `{"batch_id", "items", "untrained"}`, as `dumps` writes JSON, in
    pieces: the same bytes Flask's jsonify makes of it whole (compact, ending in a
    newline)."""
    # Before the items: read after them, seconds later for a slow client, it could
    # contradict what they said (all queued and untrained, then one done trained).
    untrained = batch_untrained(items, model_untrained)
    yield f'{{"batch_id":{dumps(batch_id)},"items":['
    between = ""
    for piece in slices(items):
        yield between + ",".join(dumps(i.to_json(model_untrained)) for i in piece)
        between = ","
    yield f'],"untrained":{dumps(untrained)}}}\n'


def slices(items: Sequence[Item]) -> Iterator[Sequence[Item]]:
    """`items` ITEMS_PER_SLICE at a time (the CSV's rows too: results_csv.py)."""
    for start in range(0, len(items), ITEMS_PER_SLICE):
        yield items[start:start + ITEMS_PER_SLICE]
