"""GET /healthz: can this process reach its queues and buckets?"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from web_tier.refusals import Code
from web_tier.services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    unreachable = services().health.answer()
    if unreachable is not None:
        return jsonify({"ok": False, "error": unreachable, "code": Code.AWS_UNAVAILABLE}), 503
    return jsonify({"ok": True}), 200
