"""The request log: one process-log line per HTTP request, without personal data.

Route templates, never paths or addresses. Not to be confused with the access
log (:mod:`audit.access_log`), the hash-chained record of who read personal data.
"""

from __future__ import annotations

import logging

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# The logger keeps its first name: log pipelines select these lines by it.
_LOGGER_NAME = "videoconsult.access"
_log = structlog.get_logger(_LOGGER_NAME)


class RequestLogger(AbstractAccessLogger):
    """Log method, route template, status and duration of each request.

    aiohttp's default request log (its "access log") writes the client address and the full path;
    paths carry invite tokens, so only the matched route's template
    (``/invite/{token}``) is logged, and no address at all.
    """

    @property
    def enabled(self) -> bool:
        # Asked by aiohttp once per connection: below the level (a deployment
        # at "warning") no request's line is built at all, nor its time taken
        # (structlog runs its processors before the level drops a line).
        return logging.getLogger(_LOGGER_NAME).isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        _log.info(
            "request",
            method=request.method,
            route=route_template(request),
            status=response.status,
            duration_ms=round(time * 1000, 1),
        )


def route_template(request: web.BaseRequest) -> str:
    """The matched route's template, or "(no route)" for requests that never
    reached the router (malformed requests answered by the HTTP parser)."""
    if not isinstance(request, web.Request):
        return "(no route)"
    try:
        resource = request.match_info.route.resource
    except (AssertionError, AttributeError):
        return "(no route)"
    return resource.canonical if resource is not None else "(no route)"
