"""Operations endpoints: liveness (``/healthz``), readiness (``/readyz``) and
this node's Prometheus metrics (``/metrics``, in :data:`metrics_routes`, served
when ``metrics.enabled``)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from audit import DatabaseUnavailable, check_connection
from config.settings import Network
from server.api.errors import Forbidden
from server.app_keys import DB_ENGINE, METRICS, REDIS, ROOMS, SETTINGS, TECHNICAL_LOG

routes = web.RouteTableDef()
metrics_routes = web.RouteTableDef()
# Headers with which a proxy says it passed a request on.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


@routes.get("/healthz")
async def healthz(_request: web.Request) -> web.Response:
    """Answer 200 while the process runs; checks nothing else on purpose."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Answer 200 when the database (and Redis, if configured) answer; else 503."""
    checks: dict[str, str] = {}
    database_ok = await _check_database(request.app, checks)
    redis_ok = await _check_redis(request.app, checks)
    ready = database_ok and redis_ok
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return web.json_response(body, status=200 if ready else 503)


async def _check_database(app: web.Application, checks: dict[str, str]) -> bool:
    timeout_s = app[SETTINGS].database.connect_timeout_s
    try:
        await check_connection(app[DB_ENGINE], timeout_s=timeout_s)
    except DatabaseUnavailable as err:
        checks["database"] = f"unreachable: {err.reason}"
        return False
    checks["database"] = "ok"
    return True


async def _check_redis(app: web.Application, checks: dict[str, str]) -> bool:
    client = app[REDIS]
    if client is None:
        checks["redis"] = "not configured"
        return True
    timeout_s = app[SETTINGS].redis.connect_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    except TimeoutError:
        checks["redis"] = f"unreachable: no answer within {timeout_s:g} s"
        return False
    except (RedisError, OSError) as err:
        checks["redis"] = f"unreachable: {type(err).__name__}"
        return False
    checks["redis"] = "ok"
    return True


@metrics_routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """This node's metrics in the Prometheus text format, for clients in
    ``metrics.allowed_networks`` or with ``metrics.token``; 403 for others."""
    if not scrape_allowed(request):
        # Without saying why: a scanner learns nothing of the networks or the token.
        raise Forbidden("not allowed")
    app = request.app
    body = await app[METRICS].render(app[ROOMS], app[REDIS], app[TECHNICAL_LOG])
    return web.Response(
        body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
    )


def scrape_allowed(request: web.Request) -> bool:
    """Whether the request carries the metrics token, or comes straight from
    an allowed network."""
    settings = request.app[SETTINGS].metrics
    token = settings.token.get_secret_value()
    if token and _bearer_matches(request, token):
        return True
    # The direct peer counts, never X-Forwarded-For: a reverse proxy inside
    # the allowed networks (often on loopback, next to the server) passes on
    # anyone's request, and X-Forwarded-For says whatever the client wrote.
    # A request that says it was passed on therefore gets in by the token only.
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    return _within(request.remote, settings.networks)


def _bearer_matches(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time, so the token cannot be guessed a character at a time.
    return hmac.compare_digest(
        presented.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    )


def _within(remote: str | None, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False  # a Unix socket, or no peer at all
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
        address = address.ipv4_mapped
    return any(address in network for network in networks)
