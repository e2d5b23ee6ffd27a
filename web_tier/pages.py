"""The upload page."""

from __future__ import annotations

from flask import Blueprint, render_template

from web_tier.services import services
from web_tier.uploads import ACCEPTED

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    svc = services()
    return render_template("index.html", max_file_size=readable_size(svc.settings.max_upload_bytes),
                           max_files=svc.settings.max_files_per_request,
                           accepted=ACCEPTED, untrained=svc.book.untrained)


def readable_size(n: int) -> str:
    """10485760 -> '10 MB', 20000 -> '19.5 KB' (binary units, as MAX_UPLOAD_BYTES' default)."""
    for unit, size in (("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{round(n / size, 1):g} {unit}"
    return f"{n} bytes"
