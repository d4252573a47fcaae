"""Liveness and readiness: ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.exceptions import RedisError

from audit import DatabaseUnavailable, check_connection
from server.app_keys import DB_ENGINE, REDIS, SETTINGS

routes = web.RouteTableDef()


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
