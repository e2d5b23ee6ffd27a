"""What a run is asked to do: Config and its defaults, and LoadTestError for inputs
a run cannot start from (nothing is sent then)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
# The web tier answers 504 after RESULT_TIMEOUT (300 s by default); waiting a little
# longer lets the report show the server's own answer rather than our give-up.
DEFAULT_TIMEOUT_S = 330.0
STATUS_INTERVAL_S = 0.5


class LoadTestError(Exception):
    """A problem with the inputs (no images, unreadable CSV): nothing was sent."""


@dataclass
class Config:
    images: Path
    url: str = DEFAULT_URL
    num_requests: int | None = None  # None: one request per image
    concurrency: int = 10
    expected: Path | None = None
    api: str = "form"  # "form": POST / ; "jobs": POST /api/jobs
    wait: str = "poll"  # jobs only: "poll" GET /api/jobs/<id>, or "sse" its event stream
    # POST / only: an Idempotency-Key per image, so that one whose connection was cut
    # is sent again without being classified twice (off by default: the web tier then
    # looks for the key in S3, a cost the benchmark does not want to measure)
    idempotency_keys: bool = False
    api_key: str = ""
    timeout: float = DEFAULT_TIMEOUT_S
    json_path: Path | None = None
    plot_path: Path | None = None
    verbose: bool = False
    quiet: bool = False
    status_interval: float = STATUS_INTERVAL_S
