"""An access log without personal data: route templates, never paths or addresses."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_log = structlog.get_logger("videoconsult.access")


class RouteAccessLogger(AbstractAccessLogger):
    """Log method, route template, status and duration of each request.

    aiohttp's default access log writes the client address and the full path;
    paths carry invite tokens, so only the matched route's template
    (``/invite/{token}``) is logged, and no address at all.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        resource = getattr(getattr(request, "match_info", None), "route", None)
        template = getattr(getattr(resource, "resource", None), "canonical", None)
        _log.info(
            "request",
            method=request.method,
            route=template or "(no route)",
            status=response.status,
            duration_ms=round(time * 1000, 1),
        )
