"""Resources that live as long as the application: each a ``cleanup_ctx`` entry,
start-up before its ``yield`` and tear-down after.

Order matters: ``create_app`` registers them so that teardown runs in
reverse (background jobs first, then Redis, then the database). A tear-down
of several steps runs them all and then raises what failed, as aiohttp's
cleanup does across the entries (:func:`~server.background.run_all`).
"""

from __future__ import annotations

import contextlib
import functools
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import structlog
from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from audit import load_master_key, open_database, prepare_data_dir
from audit.access_writer import AccessLogWriter
from audit.chunk_maps import ChunkMapCache
from audit.consults import running_consults
from audit.db import RETURN_WAIT_S, close_engine, reading
from audit.direct import SingleStatements
from audit.errors import SchemaOutOfDate
from audit.migrate import ensure_current
from audit.receipts import receipt_key
from audit.recordings import FileStore, StopReason, mark_interrupted
from audit.technical_log import TechnicalLog
from config import Settings
from server.alive import last_alive, touch_alive
from server.app_keys import (
    ACCESS_LOG,
    CHUNK_MAPS,
    CLOCK,
    CLUSTER,
    DATA_DIR,
    DB_ENGINE,
    DB_STATEMENTS,
    FILE_STORE,
    MASTER_KEY,
    REDIS,
    ROOMS,
    SETTINGS,
    TECHNICAL_LOG,
    TICKETS,
)
from server.background import run_all
from server.cluster import Cluster
from signaling.deadlines import ENDED_ROOM_KEPT
from signaling.inprocess import InProcessBroker, InProcessRoomStore, InProcessTimers
from signaling.ports import Broker, RoomStore, StateUnavailable, Timers
from signaling.recording import RecordingServices
from signaling.rooms import ConsultRooms, RoomSettings
from signaling.tickets import InProcessTicketStore
from signaling.waiting_label import WaitingLabels

_log = structlog.get_logger("videoconsult.server")

# Connections per node to Redis at most: deliveries share pipelines, and
# room changes and timers take one each while in flight (about 26 for 200
# busy consults in docs/benchmarks.md); far more only when Redis is slow.
REDIS_MAX_CONNECTIONS = 2000
# Another interval for the room-timers job (tests on a manual clock fire the
# timers themselves, and set it to hours).
ROOM_TIMER_POLL = web.AppKey("room_timer_poll_s", float)


async def data_dir_context(app: web.Application) -> AsyncIterator[None]:
    """Check the data directory and load (in development: make) the master key."""
    settings = app[SETTINGS]
    data_dir = prepare_data_dir(settings.data_dir)
    app[DATA_DIR] = data_dir
    app[FILE_STORE] = FileStore.in_data_dir(data_dir)
    app[CHUNK_MAPS] = ChunkMapCache()
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
    app[DB_STATEMENTS] = statements = await SingleStatements.open(
        engine, connect_timeout_s=settings.database.connect_timeout_s
    )
    app[ACCESS_LOG] = writer = AccessLogWriter(engine)
    try:
        yield
    finally:
        await writer.close()
        direct_in_use = 0
        try:
            direct_in_use = await statements.close()
        finally:
            # The engine is closed even when the direct connections' close failed.
            still_in_use = direct_in_use + await close_engine(engine)
        if still_in_use:
            _log.warning(
                "database connections still in use at shutdown",
                connections=still_in_use,
                waited_s=RETURN_WAIT_S,
            )


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
    # A blocking pool: under load a command waits (up to the timeout) for a
    # free connection. redis-py's default pool holds 100 and fails at once
    # when they are busy, which a node took for "Redis unreachable" at a
    # few hundred consults (docs/benchmarks.md, "Several nodes").
    pool = BlockingConnectionPool.from_url(
        settings.redis.url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=settings.redis.connect_timeout_s,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        socket_timeout=settings.redis.connect_timeout_s,
    )
    client: Redis = Redis.from_pool(pool)
    app[REDIS] = client
    try:
        yield
    finally:
        await client.aclose()


async def technical_log_context(app: web.Application) -> AsyncIterator[None]:
    """The technical log's sink; what is still pending is written before the
    database closes (a failure there is raised, not swallowed)."""
    technical = TechnicalLog(app[CLOCK], max_rows=app[SETTINGS].logging.technical_log_max_rows)
    app[TECHNICAL_LOG] = technical
    yield
    await technical.flush(app[DB_ENGINE])


def recording_services(app: web.Application) -> RecordingServices | None:
    """What the recorder needs, or None when recording is switched off."""
    settings = app[SETTINGS]
    if not settings.recording.enabled:
        return None
    return RecordingServices(
        engine=app[DB_ENGINE],
        files=app[FILE_STORE],
        root_key=app[MASTER_KEY].key,
        start_timeout_s=settings.recording.start_timeout_s,
        max_concurrent=settings.recording.max_concurrent,
        loop_slice_us=settings.recording.loop_slice_us,
        loop_realtime=settings.recording.loop_realtime,
    )


async def signaling_context(app: web.Application) -> AsyncIterator[None]:
    """The consult rooms: in-process for one node, on Redis when it is configured.

    One node: recordings left "recording" by a server that died are marked
    incomplete first, since nothing writes them any more. With Redis, another
    node may be writing them, so that is left alone (docs/scaling.md).
    """
    settings = app[SETTINGS]
    client = app[REDIS]
    cluster: Cluster | None = None
    if client is None:
        async with app[DB_ENGINE].begin() as conn:
            interrupted = await mark_interrupted(conn, now=app[CLOCK].now())
        if interrupted:
            _log.warning(
                "recordings interrupted by the last shutdown marked incomplete",
                count=len(interrupted),
            )
        rooms = _rooms(app, InProcessBroker(), InProcessRoomStore(), InProcessTimers())
        app[TICKETS] = InProcessTicketStore()
    else:
        cluster = Cluster.on(
            client,
            prefix=settings.redis.key_prefix,
            node_id=secrets.token_hex(6),
            state_ttl=room_state_ttl(settings),
        )
        rooms = _rooms(app, cluster.broker, cluster.rooms, cluster.timers, node_id=cluster.node_id)
        app[TICKETS] = cluster.tickets
    app[ROOMS] = rooms
    app[CLUSTER] = cluster
    if cluster is not None:
        # At once if Redis answers, so the first socket can subscribe;
        # otherwise the node job keeps trying.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await cluster.broker.start()
        _log.info("signaling on Redis: several nodes", node=cluster.node_id)
    await resume_running_consults(app)
    yield
    touch_alive(app[DATA_DIR])  # a clean stop: its consults were last seen now
    teardown = [
        # Normally done on shutdown already (stop_recordings); this is the last net.
        lambda: rooms.recording.stop_all(StopReason.SERVER_RESTART),
        rooms.drain,
    ]
    if cluster is not None:
        teardown.append(cluster.close)
    await run_all(teardown)


async def resume_running_consults(app: web.Application) -> None:
    """The consults a server that died left running resume: their participants
    may come back within the grace period, or they end when it was last alive."""
    now = app[CLOCK].now()
    last_seen = min(last_alive(app[DATA_DIR]) or now, now)
    touch_alive(app[DATA_DIR])
    async with reading(app[DB_ENGINE]) as conn:
        running = await running_consults(conn)
    if not running:
        return
    try:
        resumed = await app[ROOMS].recovery.resume(running, last_seen=last_seen)
    except (StateUnavailable, RedisError, OSError, TimeoutError):
        # Their rooms are on a Redis that is away: its nodes' repairs and
        # a later start take them up.
        _log.warning("running consults not looked at: Redis is away", count=len(running))
        return
    if resumed:
        _log.warning(
            "consults left running by a server that stopped resume; they end "
            "unless their participants come back within the grace period",
            count=resumed,
            last_seen=last_seen.isoformat(),
        )


def _rooms(
    app: web.Application,
    broker: Broker,
    store: RoomStore,
    timers: Timers,
    *,
    node_id: str = "",
) -> ConsultRooms:
    settings = app[SETTINGS]
    return ConsultRooms(
        statements=app[DB_STATEMENTS],
        clock=app[CLOCK],
        broker=broker,
        store=store,
        timers=timers,
        settings=RoomSettings(
            grace_s=settings.consults.grace_s,
            max_duration_s=settings.consults.max_duration_s,
            heartbeat_s=settings.signaling.heartbeat_s,
        ),
        technical=app[TECHNICAL_LOG],
        labels=WaitingLabels(app[MASTER_KEY].key, app[ACCESS_LOG], app[CLOCK]),
        recording=recording_services(app),
        node_id=node_id,
        receipt_key=functools.partial(receipt_key, app[MASTER_KEY].key),
    )


def room_state_ttl(settings: Settings) -> timedelta:
    """How long Redis keeps a room's state past its last change: longer than
    any room lives (an invite's validity, then the longest consult, then the
    hour an ended room is kept), so that only a dead node's leftovers expire."""
    consults = settings.consults
    return timedelta(seconds=consults.invite_validity_s + consults.max_duration_s) + (
        ENDED_ROOM_KEPT
    )


async def stop_recordings(app: web.Application) -> None:
    """On shutdown, before the sockets close: finish every recording cleanly."""
    await app[ROOMS].recording.stop_all(StopReason.SERVER_RESTART)
