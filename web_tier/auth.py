"""Who may upload: the optional API key that guards the upload endpoints, and no
browser request sent from another site."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import current_app, request

from common.hosts import header_host, on_loopback
from web_tier.refusals import Code, Refusal
from web_tier.services import services

# What a refusal says: both headers a key may come in.
KEY_REQUIRED = "a valid API key is required (X-API-Key header, or Authorization: Bearer)"


# What browsers say of a request's origin (Fetch Metadata): from the page itself, or
# typed in by the user. Programs send no such header.
SAME_SITE_ORIGINS = ("same-origin", "none")
DEFAULT_PORTS = {"http": 80, "https": 443}


def open_to_anyone(web_host: str, api_key: str | None) -> str | None:
    """A warning for a web tier served beyond this machine with no API key (None if it is
    not): anyone who reaches it may upload, and so launch up to MAX_INSTANCES instances."""
    if api_key or on_loopback(web_host):
        return None
    return (f"the web tier listens on {web_host or 'every address'} with no API_KEY: anyone who "
            "reaches it may upload, and scale the fleet out. Set API_KEY (and serve it behind TLS, "
            "README: On real AWS), or listen on 127.0.0.1 behind a proxy that checks who calls")


def refuse_cross_site_writes() -> None:
    """Refuse a browser's POST sent by another site's page: without an API key, any page
    a user visits could upload through their browser, to a `make run` on their own
    machine too. A cross-site form needs no preflight, and reads nothing back,
    but its upload is made. Run before every request (create_app)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    fetch_site = request.headers.get("Sec-Fetch-Site")
    site = site_by_origin() if fetch_site is None else fetch_site.strip().lower()
    if site not in SAME_SITE_ORIGINS:
        raise Refusal(403, f"a browser request from another site ({site}) is refused: upload "
                           "from this service's own page, or from a program", code=Code.FORBIDDEN)
    settings = services().settings
    # A page of another site whose name was made to point at 127.0.0.1 (DNS rebinding)
    # is same-origin with it, sends no Sec-Fetch-Site over plain HTTP, and may send any
    # header but Host, which gives it away. A browser's POST always carries Origin;
    # a program's, or a proxy's over HTTPS, passes.
    # (Bracketed too: "[::1]" read as a name would turn this off.)
    if fetch_site is None and "Origin" in request.headers and on_loopback(settings.web_host_bare) \
            and not on_loopback(header_host(request.host)):
        raise Refusal(403, f"this web tier listens on {settings.web_host} only, and the browser's "
                           f"request names {request.host}: open the page as localhost or 127.0.0.1 (a "
                           "proxy in front over plain HTTP: README, Who may upload)",
                      code=Code.FORBIDDEN)


def site_by_origin() -> str:
    """What Sec-Fetch-Site would say, judged by Origin: browsers send Sec-Fetch-Site only
    to origins they trust (HTTPS, localhost), and a page elsewhere over plain HTTP,
    on a LAN address or a name, could upload through a visitor's browser. A
    request without Origin, a program's, is "none"."""
    origin = request.headers.get("Origin")
    if origin is None:
        return "none"
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:  # a bracketed host or a port that is none: no origin a browser sends
        return "cross-site"
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return "cross-site"  # "null": a sandboxed frame, a file, a redirect
    ours = {request.host.lower()}
    # A proxy in front keeps the name the browser used here (a cross-site page cannot
    # set it: the header would need a preflight, which this service does not answer).
    ours.update(h.strip().lower() for h in request.headers.get("X-Forwarded-Host", "").split(","))
    theirs = {parts.netloc} if port else {parts.netloc, f"{parts.netloc}:{DEFAULT_PORTS[parts.scheme]}"}
    return "same-origin" if ours & theirs else "cross-site"


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
