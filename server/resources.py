"""Resources that live as long as the application: each a ``cleanup_ctx`` entry.

Order matters: ``create_app`` registers them so that teardown runs in
reverse (background tasks first, then Redis, then the database).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from redis.asyncio import Redis

from audit import load_master_key, open_database, prepare_data_dir
from audit.errors import SchemaOutOfDate
from audit.migrate import ensure_current
from server.app_keys import DATA_DIR, DB_ENGINE, MASTER_KEY, REDIS, SETTINGS

_log = structlog.get_logger("videoconsult.server")


async def data_dir_context(app: web.Application) -> AsyncIterator[None]:
    """Check the data directory and load (in development: make) the master key."""
    settings = app[SETTINGS]
    data_dir = prepare_data_dir(settings.data_dir)
    app[DATA_DIR] = data_dir
    master_key = load_master_key(settings, data_dir)
    app[MASTER_KEY] = master_key
    if master_key.dev_key_file is not None:
        _log.warning(
            "DEVELOPMENT MASTER KEY IN USE: generated into the data directory; for "
            "development only. Set VIDEOCONSULT_SECURITY_MASTER_KEY before real use.",
            key_file=str(master_key.dev_key_file),
        )
    yield


async def database_context(app: web.Application) -> AsyncIterator[None]:
    """Open the database (migrating it if so configured); dispose it last."""
    settings = app[SETTINGS]
    engine = await open_database(
        settings, app[DATA_DIR], migrate=settings.database.migrate_on_start
    )
    if not settings.database.migrate_on_start:
        try:
            await ensure_current(engine)
        except SchemaOutOfDate:
            await engine.dispose()
            raise
    app[DB_ENGINE] = engine
    try:
        yield
    finally:
        await engine.dispose()


async def redis_context(app: web.Application) -> AsyncIterator[None]:
    """Create the Redis client when one is configured.

    An unreachable Redis does not stop the start: ``/readyz`` reports it, and
    the client reconnects on its own when Redis is back.
    """
    settings = app[SETTINGS]
    if not settings.redis.url:
        app[REDIS] = None
        yield
        return
    client: Redis = Redis.from_url(
        settings.redis.url,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        socket_timeout=settings.redis.connect_timeout_s,
    )
    app[REDIS] = client
    try:
        yield
    finally:
        await client.aclose()
