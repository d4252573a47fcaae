"""Resources that live as long as the application: each a ``cleanup_ctx`` entry.

Order matters: ``create_app`` registers them so that teardown runs in
reverse (background tasks first, then Redis, then the database).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from redis.asyncio import Redis

from audit import load_master_key, open_database, prepare_data_dir
from audit.errors import SchemaOutOfDate
from audit.migrate import ensure_current
from audit.recordings import FileStore, StopReason, mark_interrupted
from audit.technical_log import TechnicalLog
from server.app_keys import (
    CLOCK,
    DATA_DIR,
    DB_ENGINE,
    MASTER_KEY,
    REDIS,
    ROOMS,
    SETTINGS,
    TECHNICAL_LOG,
    TICKETS,
)
from signaling.broker import InProcessBroker, InProcessRoomStore, InProcessTimers
from signaling.recorder import RecorderSettings
from signaling.recording import RecordingServices
from signaling.rooms import ConsultRooms, RoomSettings
from signaling.tickets import InProcessTicketStore

_log = structlog.get_logger("videoconsult.server")

# How often due room timers are looked for: a grace period ends at most this
# much late.
TIMER_POLL_S = 0.25
# How often the technical log's pending entries are written.
TECHNICAL_FLUSH_S = 1.0


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


async def technical_log_context(app: web.Application) -> AsyncIterator[None]:
    """The technical log's sink; what is still pending is written before the database closes."""
    technical = TechnicalLog(app[CLOCK])
    app[TECHNICAL_LOG] = technical
    try:
        yield
    finally:
        try:
            await technical.flush(app[DB_ENGINE])
        except Exception:
            _log.exception("technical log: last entries not written")


async def run_technical_log_writer(app: web.Application) -> None:
    """Background task: write the technical log's pending entries every second."""
    technical = app[TECHNICAL_LOG]
    while True:
        await asyncio.sleep(TECHNICAL_FLUSH_S)
        try:
            await technical.flush(app[DB_ENGINE])
        except Exception:
            _log.exception("technical log: writing failed; trying again")


def recording_services(app: web.Application) -> RecordingServices | None:
    """What the recorder needs, or None when recording is switched off."""
    settings = app[SETTINGS]
    if not settings.recording.enabled:
        return None
    return RecordingServices(
        engine=app[DB_ENGINE],
        files=FileStore(app[DATA_DIR] / "recordings"),
        root_key=app[MASTER_KEY].key,
        recorder=RecorderSettings(
            video_width=settings.recording.video_width,
            video_height=settings.recording.video_height,
        ),
        start_timeout_s=settings.recording.start_timeout_s,
        max_concurrent=settings.recording.max_concurrent,
    )


async def signaling_context(app: web.Application) -> AsyncIterator[None]:
    """The consult rooms on the in-process broker (Redis across nodes comes later).

    Recordings left "recording" by a server that died are marked incomplete
    first: nothing writes them any more (one node; see docs/recording.md).
    """
    settings = app[SETTINGS]
    async with app[DB_ENGINE].begin() as conn:
        interrupted = await mark_interrupted(conn, now=app[CLOCK].now())
    if interrupted:
        _log.warning(
            "recordings interrupted by the last shutdown marked incomplete",
            count=len(interrupted),
        )
    app[ROOMS] = ConsultRooms(
        engine=app[DB_ENGINE],
        clock=app[CLOCK],
        broker=InProcessBroker(),
        store=InProcessRoomStore(),
        timers=InProcessTimers(),
        settings=RoomSettings(
            grace_s=settings.consults.grace_s,
            max_duration_s=settings.consults.max_duration_s,
            heartbeat_s=settings.signaling.heartbeat_s,
        ),
        technical=app[TECHNICAL_LOG],
        recording=recording_services(app),
    )
    app[TICKETS] = InProcessTicketStore()
    try:
        yield
    finally:
        # Normally done on shutdown already (stop_recordings); this is the last net.
        await app[ROOMS].recording.stop_all(StopReason.SERVER_RESTART)


async def stop_recordings(app: web.Application) -> None:
    """On shutdown, before the sockets close: finish every recording cleanly."""
    await app[ROOMS].recording.stop_all(StopReason.SERVER_RESTART)


async def run_room_timers(app: web.Application) -> None:
    """Background task: act on due grace periods and maximum durations."""
    while True:
        try:
            await app[ROOMS].fire_due_timers()
        except Exception:
            _log.exception("room timers failed; trying again")
        await asyncio.sleep(TIMER_POLL_S)
