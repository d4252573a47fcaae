"""The answer to a browser asking for an address that is no page (404).

Apart from :mod:`server.pages`, whose login page needs the session check:
the error middleware uses this, and the session check uses the middleware's
errors.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")

# Paths that are never a page: their errors stay JSON whatever the client accepts.
_NOT_PAGES = ("/api/", "/ws", "/static/", "/healthz", "/readyz", "/metrics")


def wants_page(request: web.Request) -> bool:
    """Whether an error for ``request`` should be an HTML page: a browser
    (its Accept names text/html) asking for something that could be a page."""
    if request.method not in ("GET", "HEAD") or request.path.startswith(_NOT_PAGES):
        return False
    return "text/html" in request.headers.get("Accept", "")


@cache
def _page() -> bytes:
    # Read once, at the first 404: it is part of the install, like the code.
    return (STATIC_DIR / "not-found.html").read_bytes()


def not_found_page() -> web.Response:
    """The page a browser gets for an unknown address (404)."""
    return web.Response(
        status=404,
        body=_page(),
        content_type="text/html",
        charset="utf-8",
    )
