"""The upload page."""

from __future__ import annotations

from flask import Blueprint, render_template

from web_tier.services import services

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    settings = services().settings
    return render_template("index.html", max_file_mb=f"{settings.max_upload_bytes / 1024**2:g}")
