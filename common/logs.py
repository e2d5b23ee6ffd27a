"""Logging set-up, the same for every process the service runs."""

from __future__ import annotations

import logging


def configure(log_format: str, level: int | str = logging.INFO) -> None:
    logging.basicConfig(level=level, format=log_format)
    # botocore says where it found credentials, at INFO, for every client made: noise.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
