"""The upload page."""

from __future__ import annotations

from flask import Blueprint, render_template

from web_tier.services import services
from web_tier.uploads import ACCEPTED

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    svc = services()
    return render_template("index.html", max_file_mb=f"{svc.settings.max_upload_bytes / 1024**2:g}",
                           accepted=ACCEPTED, untrained=svc.book.untrained)
