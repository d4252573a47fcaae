"""Resources that live as long as the application: each a ``cleanup_ctx`` entry.

Order matters: ``create_app`` registers them so that teardown runs in
reverse (background tasks first, then Redis, then the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import structlog
from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from audit import load_master_key, open_database, prepare_data_dir
from audit.clock import Clock
from audit.errors import SchemaOutOfDate
from audit.migrate import ensure_current
from audit.recordings import FileStore, StopReason, mark_interrupted
from audit.technical_log import TechnicalLog
from config import Settings
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
from signaling.inprocess import InProcessBroker, InProcessRoomStore, InProcessTimers
from signaling.ports import StateUnavailable
from signaling.recorder import RecorderSettings
from signaling.recording import RecordingServices
from signaling.redis import RedisBroker, RedisNodes, RedisRoomStore, RedisTimers
from signaling.rooms import ENDED_ROOM_KEPT, ConsultRooms, RoomSettings
from signaling.tickets import InProcessTicketStore, RedisTicketStore

_log = structlog.get_logger("videoconsult.server")

# How often due room timers are looked for: a grace period ends at most this
# much late.
TIMER_POLL_S = 0.25
# Connections per node to Redis at most: deliveries share pipelines, and
# room changes and timers take one each while in flight (about 26 for 200
# busy consults in docs/benchmarks.md); far more only when Redis is slow.
REDIS_MAX_CONNECTIONS = 2000
# Another interval for the timer task (tests on a manual clock fire the
# timers themselves, and set it to hours).
ROOM_TIMER_POLL = web.AppKey("room_timer_poll_s", float)
# Longest wait between looks for due timers while Redis is away.
TIMER_BACKOFF_MAX_S = 5.0
# Each node's heartbeat; a node silent for NODE_DEAD_AFTER_S is dead, and its
# participants' grace periods start (well inside consults.grace_s, 30 s).
NODE_BEAT_S = 1.0
NODE_DEAD_AFTER_S = 5.0
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
    """The consult rooms: in-process for one node, on Redis when it is configured.

    One node: recordings left "recording" by a server that died are marked
    incomplete first, since nothing writes them any more. With Redis, another
    node may be writing them, so that is left alone (docs/scaling.md).
    """
    settings = app[SETTINGS]
    client = app[REDIS]
    node_id = secrets.token_hex(6)
    heartbeat: asyncio.Task[None] | None = None
    cluster: tuple[RedisBroker, RedisNodes, RedisRoomStore] | None = None
    broker: InProcessBroker | RedisBroker
    store: InProcessRoomStore | RedisRoomStore
    timers: InProcessTimers | RedisTimers
    if client is None:
        async with app[DB_ENGINE].begin() as conn:
            interrupted = await mark_interrupted(conn, now=app[CLOCK].now())
        if interrupted:
            _log.warning(
                "recordings interrupted by the last shutdown marked incomplete",
                count=len(interrupted),
            )
        broker, store, timers = InProcessBroker(), InProcessRoomStore(), InProcessTimers()
        app[TICKETS] = InProcessTicketStore()
    else:
        prefix = settings.redis.key_prefix
        cluster = (
            RedisBroker(client, prefix=prefix, node_id=node_id),
            RedisNodes(
                client,
                prefix=prefix,
                node_id=node_id,
                dead_after=timedelta(seconds=NODE_DEAD_AFTER_S),
            ),
            RedisRoomStore(client, prefix=prefix, state_ttl=room_state_ttl(settings)),
        )
        broker, store = cluster[0], cluster[2]
        broker.watch_rooms(store)
        timers = RedisTimers(client, prefix=prefix)
        app[TICKETS] = RedisTicketStore(client, prefix=prefix)
    app[ROOMS] = ConsultRooms(
        engine=app[DB_ENGINE],
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
        recording=recording_services(app),
        node_id=node_id if client is not None else "",
    )
    if cluster is not None:
        # At once if Redis answers, so the first socket can subscribe;
        # otherwise run_node keeps trying.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await cluster[0].start()
        heartbeat = asyncio.create_task(
            run_node(app[ROOMS], *cluster, app[CLOCK]), name="node-heartbeat"
        )
        _log.info("signaling on Redis: several nodes", node=node_id)
    try:
        yield
    finally:
        # Normally done on shutdown already (stop_recordings); this is the last net.
        await app[ROOMS].recording.stop_all(StopReason.SERVER_RESTART)
        await app[ROOMS].drain()
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster[0].close()
            with contextlib.suppress(StateUnavailable):
                await cluster[1].leave()


def room_state_ttl(settings: Settings) -> timedelta:
    """How long Redis keeps a room's state past its last change: longer than
    any room lives (an invite's validity, then the longest consult, then the
    hour an ended room is kept), so that only a dead node's leftovers expire."""
    consults = settings.consults
    return timedelta(seconds=consults.invite_validity_s + consults.max_duration_s) + (
        ENDED_ROOM_KEPT
    )


async def run_node(
    rooms: ConsultRooms,
    broker: RedisBroker,
    nodes: RedisNodes,
    store: RedisRoomStore,
    clock: Clock,
) -> None:
    """This node's part in the cluster, every NODE_BEAT_S: its heartbeat, the
    grace periods of dead nodes' participants, and telling Redis again what
    it lost (after a Redis restart, or after this node was taken for dead).

    Redis trouble is logged once when it starts and once when it ends."""
    await broker.start_when_reachable()
    trouble = False
    while True:
        try:
            if await nodes.beat(clock.now()) or trouble:
                repaired = await rooms.reconcile()
                if repaired:
                    _log.info("rooms told Redis again who is connected here", rooms=repaired)
            for node, last_seen in await nodes.claim_dead(clock.now()):
                lost = 0
                for consult_id in await store.consult_ids():
                    lost += await rooms.node_lost(consult_id, node, last_seen=last_seen)
                _log.warning("a node stopped answering; its participants may reconnect", lost=lost)
            if trouble:
                _log.info("Redis is back")
            trouble = False
        except StateUnavailable as err:
            if not trouble:
                _log.warning("Redis unavailable; this node carries on alone", error=str(err))
            trouble = True
        except Exception:
            _log.exception("node heartbeat failed; trying again")
        await asyncio.sleep(NODE_BEAT_S)


async def stop_recordings(app: web.Application) -> None:
    """On shutdown, before the sockets close: finish every recording cleanly."""
    await app[ROOMS].recording.stop_all(StopReason.SERVER_RESTART)


async def run_room_timers(app: web.Application) -> None:
    """Background task: act on due grace periods and maximum durations.

    While Redis is away, looked for less often (backing off to 5 s), and
    said once rather than four times a second."""
    every_s = app.get(ROOM_TIMER_POLL, TIMER_POLL_S)
    poll_s = every_s
    while True:
        try:
            await app[ROOMS].fire_due_timers()
            if poll_s != every_s:
                _log.info("room timers running again")
            poll_s = every_s
        except StateUnavailable:
            if poll_s == every_s:
                _log.warning("room timers wait for Redis")
            poll_s = max(every_s, min(poll_s * 2, TIMER_BACKOFF_MAX_S))
        except Exception:
            _log.exception("room timers failed; trying again")
        await asyncio.sleep(poll_s)
