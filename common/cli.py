"""The command lines' argument parser."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, but an option given `--` as its value (`--port=--`) is a usage error.

    Python 3.11's argparse gives such an option [] without calling its type, and the
    command would fail later with a traceback instead of exit code 2.
    load_test.py, a file of its own, has the same check."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if _emptied(action, parsed):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return parsed, extras


def _emptied(action: argparse.Action, parsed: Any) -> bool:
    """An option that takes one value, left [] (see ArgumentParser)."""
    return (bool(action.option_strings) and action.nargs is None and action.default != []
            and getattr(parsed, action.dest, None) == [])
