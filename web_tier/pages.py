"""The upload page."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from common.image_limits import readable_size, too_large
from web_tier.form import FORM_SLACK_BYTES
from web_tier.image_check import ACCEPTED
from web_tier.services import services

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    svc = services()
    limit = svc.settings.max_upload_bytes
    # The page sends no file the server would refuse for its size, nor a request it
    # would refuse whole: one 2.2 GB file would fail the 8 photos sent with it.
    return render_template("index.html", max_file_size=readable_size(limit), max_file_bytes=limit,
                           too_large=too_large(limit), max_files=svc.settings.max_files_per_request,
                           max_chunk_bytes=current_app.config["MAX_CONTENT_LENGTH"] - FORM_SLACK_BYTES,
                           accepted=ACCEPTED, untrained=svc.book.untrained,
                           api_key_required=bool(svc.settings.api_key))
