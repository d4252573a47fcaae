"""Web hygiene for every response and every state-changing request.

- Security headers on every response, errors and WebSocket upgrades included.
- A strict Origin check on every state-changing request: the request must say
  it comes from our own origin. Together with ``SameSite=Strict`` cookies this
  keeps another site's page from acting with a professional's session (CSRF).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable

from aiohttp import web

from server.api.errors import Forbidden, Handler, error_response
from server.app_keys import SETTINGS

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# No inline script or style anywhere; media from the camera and peers is
# handled as blobs; nothing may frame the pages.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PERMISSIONS_POLICY = (
    "camera=(self), microphone=(self), display-capture=(self), fullscreen=(self), "
    "geolocation=(), payment=(), usb=(), interest-cohort=()"
)
HSTS = "max-age=63072000; includeSubDomains"


def expected_origin(request: web.Request) -> str | None:
    """Our own origin: the configured public URL, or else (in development) the
    request's own, if its host is a loopback one; None for any other host.

    A Host header is the client's word: believed, another site's page (DNS
    rebinding) or a forged request would pass the Origin check and have
    invite links built on its name.
    """
    configured = request.app[SETTINGS].server.public_origin
    if configured:
        return configured
    if not _loopback(request.url.host):
        return None
    return f"{request.scheme}://{request.host}"


HOST_UNKNOWN = (
    "this server knows its address only from server.public_url; without it, "
    "only localhost is served (set server.public_url to the address people use)"
)


def link_origin(request: web.Request) -> str:
    """The origin to build a link on (invite, enrolment); the Origin check
    has let the request in, so it is known."""
    origin = expected_origin(request)
    if origin is None:
        raise Forbidden(HOST_UNKNOWN, code="host_unknown")
    return origin


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def served_over_tls(request: web.Request) -> bool:
    return request.app[SETTINGS].server.behind_tls or request.secure


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: the same headers on every response."""
    headers = response.headers
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    # Invite and enrolment tokens live in URLs: never send them onwards.
    headers["Referrer-Policy"] = "no-referrer"
    headers["Permissions-Policy"] = PERMISSIONS_POLICY
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.path.startswith("/api/"):
        headers.setdefault("Cache-Control", "no-store")
    if served_over_tls(request):
        headers["Strict-Transport-Security"] = HSTS


@web.middleware
def origin_check_middleware(
    request: web.Request, handler: Handler
) -> Awaitable[web.StreamResponse]:
    """Refuse state-changing requests that do not come from our own origin.

    A safe request is handed on as is, without a coroutine of this
    middleware around it: a signaling socket's handler runs for the whole
    consult, and each frame waiting on it is kept as long (about 0.4 KB per
    open socket, docs/benchmarks.md "Lean connections").
    """
    if request.method in SAFE_METHODS:
        return handler(request)
    return _checked_origin(request, handler)


async def _checked_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None:
        return error_response(
            403, "origin_required", "state-changing requests must carry an Origin header"
        )
    expected = expected_origin(request)
    if expected is None:
        return error_response(403, "host_unknown", HOST_UNKNOWN)
    if origin != expected:
        return error_response(403, "origin_refused", "requests from another site are not accepted")
    return await handler(request)


def client_address(request: web.Request) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy,
    the nearest address in X-Forwarded-For that is not a trusted proxy."""
    remote = request.remote or "unknown"
    networks = request.app[SETTINGS].server.trusted_proxy_networks
    if not networks or not _within(remote, networks):
        return remote
    hops = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", [])
        for hop in header.split(",")
    ]
    for hop in reversed(hops):
        if not _within(hop, networks):
            return hop if _is_address(hop) else remote
    return remote


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _within(text: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(address in network for network in networks)
