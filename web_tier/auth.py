"""Who may upload: the optional API key that guards the upload endpoints, and no
browser request sent from another site."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any

from flask import current_app, request

from web_tier.refusals import UploadError
from web_tier.services import services

# What a refusal says: both headers a key may come in.
KEY_REQUIRED = "a valid API key is required (X-API-Key header, or Authorization: Bearer)"


# What browsers say of a request's origin (Fetch Metadata): from the page itself, or
# typed in by the user. Programs send no such header.
SAME_SITE_ORIGINS = ("same-origin", "none")


def refuse_cross_site_writes() -> None:
    """Refuse a browser's POST sent by another site's page: without an API key, any page
    a user visited could upload through their browser, to a `make run` on their own
    machine too (reviewer). A cross-site form needs no preflight, and reads nothing back,
    but its upload is made. Run before every request (create_app)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    site = request.headers.get("Sec-Fetch-Site", "none").strip().lower()
    if site not in SAME_SITE_ORIGINS:
        raise UploadError(403, f"a browser request from another site ({site}) is refused: upload "
                               "from this service's own page, or from a program")


def presented_key() -> str:
    key = request.headers.get("X-API-Key", "")
    if not key:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
    return key


def key_ok(expected: str) -> bool:
    """True when no key is configured, or the request carries the right one."""
    if not expected:
        return True
    # compare_digest: the time taken must not reveal how much of a guess was right.
    return hmac.compare_digest(presented_key().encode(), expected.encode())


def require_api_key(on_refusal: Callable[[], Any]) -> Callable:
    """Decorator: run the view only with a valid key, else answer `on_refusal()`."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not key_ok(services().settings.api_key):
                refusal = current_app.make_response(on_refusal())
                # A 401 names the scheme that would do (RFC 9110); X-API-Key works too.
                refusal.headers["WWW-Authenticate"] = 'Bearer realm="imgclass"'
                return refusal
            return view(*args, **kwargs)

        return wrapped

    return decorate
