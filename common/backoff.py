"""The one rule for waiting between tries of what AWS or the network failed."""

from __future__ import annotations


def next_wait(previous_s: float, first_s: float, max_s: float) -> float:
    """The wait after one more failure in a row: `first_s` after the first (`previous_s`
    0, as after a success), then doubled each time, never over `max_s`."""
    return min(max(previous_s * 2, first_s), max_s)
