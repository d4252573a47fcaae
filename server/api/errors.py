"""API errors and the middleware that turns every failure into JSON.

    ApiError                     {"error": {"code": ..., "message": ...}}
     ├── BadRequest        400   malformed request (not JSON, not an object)
     ├── Unauthorized      401   not logged in, or the login failed
     ├── Forbidden         403   logged in, but not allowed (role, Origin)
     ├── NotFoundError     404
     ├── ConflictError     409
     ├── PayloadTooLarge   413
     ├── Unprocessable     422   well-formed, but a field is wrong
     └── TooManyRequests   429   with Retry-After

Domain errors from :mod:`audit` are translated here too (NotFound → 404,
Conflict → 409, InvalidValue → 422), so views raise whichever is natural,
and so is Redis being away (several nodes): 503 ``unavailable`` with
Retry-After, never a 500. A read whose access record could not be written
(AccessLogNotWritten) is not answered: 503 ``access_log_unavailable``, or
``unavailable`` when the cause is the database being away. One
exception to JSON: a browser (Accept names text/html) asking for an unknown
address outside /api/ gets the HTML page "not found" (server/pages.py), not
a JSON body shown raw.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping

import structlog
from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from audit import errors as audit_errors
from audit.db import is_busy, is_outage
from server.not_found import not_found_page, wants_page
from server.outage import DB_OUTAGE
from server.request_log import route_template
from signaling.ports import StateUnavailable

_log = structlog.get_logger("videoconsult.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Retry-After of a 503 while Redis is away.
UNAVAILABLE_RETRY_S = 2


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def headers(self) -> Mapping[str, str]:
        return {}


class BadRequest(ApiError):
    status, code = 400, "malformed_request"


class Unauthorized(ApiError):
    status, code = 401, "not_logged_in"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFoundError(ApiError):
    status, code = 404, "not_found"


class ConflictError(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class RequestTimeout(ApiError):
    status, code = 408, "request_timeout"


class Unprocessable(ApiError):
    status, code = 422, "invalid_field"


class TooManyRequests(ApiError):
    status, code = 429, "too_many_requests"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = max(1, math.ceil(retry_after_s))

    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


_HTTP_CODES = {
    400: "malformed_request",
    401: "not_logged_in",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as ``{"error": {"code", "message"}}``, never a traceback."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err.status, err.code, err.message, err.headers())
    except audit_errors.NotFound as err:
        return error_response(404, "not_found", str(err))
    except audit_errors.Conflict as err:
        return error_response(409, "conflict", str(err))
    except audit_errors.InvalidValue as err:
        return error_response(422, "invalid_field", str(err))
    except audit_errors.AccessLogNotWritten as err:
        if err.__cause__ is not None and is_outage(err.__cause__):
            # The database is away (a restart, a network drop): answered as
            # every request is meanwhile, not as a fault of the log (seen in
            # the PostgreSQL restart drill: a read's record failed with it).
            request.app[DB_OUTAGE].noticed(request.app, err.__cause__)
            return _unavailable()
        # By type only: the cause may be anything the database said.
        _log.warning(
            "access record not written",
            route=route_template(request),
            cause=type(err.__cause__).__name__,
        )
        return error_response(
            503,
            "access_log_unavailable",
            "This could not be recorded in the access log, so it is not shown. "
            "Try again in a moment.",
            {"Retry-After": str(UNAVAILABLE_RETRY_S)},
        )
    except (StateUnavailable, RedisError) as err:
        # By type only: the shared state of several nodes is away for now.
        _log.warning(
            "shared state unavailable", route=route_template(request), error=type(err).__name__
        )
        return _unavailable()
    except (SQLAlchemyError, OSError, TimeoutError) as err:
        if is_busy(err):
            # SQLite's write lock held elsewhere (a command's long write) past
            # database.connect_timeout_s, or this process's writers queued past
            # their turn's limit (audit/sqlite_writers.py): load, not a fault.
            _log.warning("database busy", route=route_template(request))
            return error_response(
                503,
                "database_busy",
                "The database is busy with other writes. Try again in a moment.",
                {"Retry-After": str(UNAVAILABLE_RETRY_S)},
            )
        if not is_outage(err):
            _log.exception("unhandled error", route=route_template(request))
            return error_response(500, "internal_error", "Something went wrong on the server.")
        request.app[DB_OUTAGE].noticed(request.app, err)  # said once per outage
        return _unavailable()
    except web.HTTPException as err:
        if err.status < 400:
            raise
        if err.status == 404 and wants_page(request):
            return not_found_page()
        code = _HTTP_CODES.get(err.status, "http_error")
        headers = {k: v for k, v in err.headers.items() if k in {"Allow", "Retry-After"}}
        return error_response(err.status, code, err.reason, headers)
    except Exception:
        _log.exception("unhandled error", route=route_template(request))
        return error_response(500, "internal_error", "Something went wrong on the server.")


def _unavailable() -> web.Response:
    return error_response(
        503,
        "unavailable",
        "The service cannot do this right now. Try again in a moment.",
        {"Retry-After": str(UNAVAILABLE_RETRY_S)},
    )
