"""Logging set-up, the same for every process the service runs."""

from __future__ import annotations

import logging
import os
import warnings

AWS_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")


def configure(log_format: str, level: str | None = None) -> None:
    """Log to stderr at `level` (by default LOG_LEVEL's, else INFO), a level's name in
    any case (LOG_LEVEL=debug); at INFO, saying so, if it names none: a misspelt log
    level is no reason not to serve."""
    level = os.environ.get("LOG_LEVEL", "INFO") if level is None else level
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    logging.basicConfig(level=levels.get(name, logging.INFO), format=log_format)
    if name not in levels:
        logging.getLogger(__name__).warning("LOG_LEVEL %r names no level (DEBUG, INFO, WARNING, ERROR, "
                                            "CRITICAL): logging at INFO", level)
    # Library warnings (Pillow's on odd images) as log lines, with the time and process
    # the operator reads everywhere else, not bare lines on stderr.
    logging.captureWarnings(True)
    # Both tiers refuse an image over their pixel limit themselves, from its header, as
    # soon as it is opened (common/image_limits.py): Pillow's own warning for one over
    # its limit only added a line calling a refused upload a "decompression bomb DOS
    # attack". By its text: the controller imports no Pillow.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels")
    # botocore says where it found credentials, at INFO, for every client made: noise.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    # DEBUG is the service's own: at DEBUG the AWS libraries log every request's headers,
    # a live session token among them, megabytes a minute.
    for library in AWS_LIBRARIES:
        if logging.getLogger(library).getEffectiveLevel() < logging.INFO:
            logging.getLogger(library).setLevel(logging.INFO)
