"""Logging set-up, the same for every process the service runs."""

from __future__ import annotations

import logging


def configure(log_format: str, level: str = "INFO") -> None:
    """Log to stderr at `level`, a level's name in any case (LOG_LEVEL=debug); at INFO,
    saying so, if it names none: a misspelt log level is no reason not to serve."""
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    logging.basicConfig(level=levels.get(name, logging.INFO), format=log_format)
    if name not in levels:
        logging.getLogger(__name__).warning("LOG_LEVEL %r names no level (DEBUG, INFO, WARNING, ERROR, "
                                            "CRITICAL): logging at INFO", level)
    # botocore says where it found credentials, at INFO, for every client made: noise.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
