"""The upload page."""

from __future__ import annotations

from flask import Blueprint, render_template

from web_tier.services import services
from web_tier.uploads import ACCEPTED, readable_size

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    svc = services()
    return render_template("index.html", max_file_size=readable_size(svc.settings.max_upload_bytes),
                           max_files=svc.settings.max_files_per_request,
                           accepted=ACCEPTED, untrained=svc.book.untrained)
