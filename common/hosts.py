"""Host names as a Host header or a bind address carries them: the web tier's and the
embedded AWS's checks against requests from a browser (DNS rebinding) read them alike."""

from __future__ import annotations

import ipaddress


def header_host(header: str) -> str:
    """A Host header's name, lowercase, without its port or an IPv6 address's brackets:
    "127.0.0.1:5000" -> "127.0.0.1", "[::1]:5000" -> "::1", "Example.com" -> "example.com"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def bare_host(host: str) -> str:
    """A host as written, without the brackets an IPv6 address may be written in:
    "[::1]" -> "::1"."""
    return host.removeprefix("[").removesuffix("]")


def host_and_port(host: str, port: int) -> str:
    """`host`:`port` as a bind address or in a URL: an IPv6 address bracketed, whether
    given bare or so (gunicorn cannot parse a bare "::", nor botocore such a URL)."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_address(host: str) -> bool:
    """Whether `host` is an IP address, not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def on_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, as WEB_HOST or a Host header has it) is
    this machine's loopback: `localhost`, or a loopback address. Not any name that
    starts with "127." (127.attacker.test is not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
