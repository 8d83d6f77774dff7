"""Who may reach the server: the loopback check (a loopback server answers only Host headers that
name it, and warns when bound elsewhere without a key) and the browser origins allowed by CORS.
Shared by the settings check (camelid.serve.server) and the app's middlewares (camelid.serve.app)."""

from __future__ import annotations

import ipaddress
import re

ORIGIN_RE = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
"""A web origin as browsers send it: scheme, host (a name, IPv4 or bracketed IPv6), port."""


def check_origins(origins) -> list[str]:
    """The --allowed-origins as CORS takes them: "*" or scheme://host[:port], as a browser sends
    its Origin header (no path, no trailing slash); anything else is a ValueError."""
    out = []
    for origin in origins:
        if origin != "*" and not ORIGIN_RE.fullmatch(origin):
            raise ValueError(f"--allowed-origins takes origins such as https://app.example.com or http://localhost:3000 "
                             f"(scheme, host and port, no path) or *, got {origin!r}")
        out.append(origin)
    return out


def is_loopback(host: str) -> bool:
    """"localhost" or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
