"""Every periodic job of the application: what it does, how often, how patiently.

Each is run by :func:`server.background.periodic`, registered by
``create_app`` after the resources it uses. The steps of the housekeeping,
the retention purge and the session check live with their subject; the
small ones are here.
"""

from __future__ import annotations

import asyncio
import functools

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from server import alive, housekeeping, webhooks
from server.app_keys import CLOCK, CLUSTER, DB_ENGINE, ROOMS, SETTINGS, TECHNICAL_LOG
from server.background import Job, JobName
from server.cluster import NODE_BEAT_S, NODE_DEAD_AFTER_S
from server.resources import ROOM_TIMER_POLL
from server.ws.heartbeat import beat_sockets, round_interval_s
from server.ws.session_check import check_therapist_sessions
from signaling.concurrency import each_at_most
from signaling.ports import StateUnavailable
from signaling.recovery import REPAIR_CONCURRENCY

_log = structlog.get_logger("videoconsult.server")

# How often the technical log's pending entries are written.
TECHNICAL_FLUSH_S = 1.0
# How often due room timers are looked for: a grace period ends at most this
# much late.
TIMER_POLL_S = 0.25
# Longest wait between looks for due timers while they fail (Redis away).
TIMER_BACKOFF_MAX_S = 5.0
# What a node's heartbeat waits at most after a failure: well inside
# NODE_DEAD_AFTER_S, so that a passing failure does not make it dead.
NODE_BACKOFF_MAX_S = 2.0
assert NODE_BACKOFF_MAX_S < NODE_DEAD_AFTER_S
# Failures that are Redis being away, not a bug: said once, not each round.
REDIS_AWAY = (StateUnavailable, RedisError, OSError, TimeoutError)


async def write_technical_log(app: web.Application) -> None:
    """Write the technical log's pending entries.

    Shielded: the job is cancelled at shutdown, and a write cut in half
    seems to leave SQLite's write lock held for a while: the last write
    (``technical_log_context``, which raises its failure) once waited for
    it in vain, under load. Finished, the write just happens to be early.
    """
    await asyncio.shield(app[TECHNICAL_LOG].flush(app[DB_ENGINE]))


async def fire_room_timers(app: web.Application) -> None:
    """Act on due grace periods and maximum durations."""
    await app[ROOMS].fire_due_timers()


async def node_round(app: web.Application) -> None:
    """This node's part in the cluster: its heartbeat, the grace periods of
    dead nodes' participants, and telling Redis again what it lost (after a
    Redis restart, or after this node was taken for dead). The broker is
    subscribed first if it could not be at start (Redis away)."""
    cluster, rooms, clock = app[CLUSTER], app[ROOMS], app[CLOCK]
    assert cluster is not None, "the node job runs only with Redis"
    try:
        if not cluster.broker.started:
            await cluster.broker.start()
        if await cluster.nodes.beat():
            # Redis did not know this node: a repair is due, and stays due
            # until one succeeds (the beat has put the node back, so the next
            # beat would not say so again if the repair fails on the database).
            cluster.out_of_touch = True
        repair_failed: Exception | None = None
        if cluster.out_of_touch or rooms.recovery.due:
            try:
                repaired = await rooms.reconcile()
            except StateUnavailable:
                raise
            except Exception as err:
                # Raised after the claims below: a repair that keeps failing
                # (the database refusing a missed end) must not keep the dead
                # nodes' participants from their grace periods.
                repair_failed = err
            else:
                cluster.out_of_touch = False
                if repaired:
                    _log.info("rooms told Redis again who is connected here", rooms=repaired)
        for node, last_seen in await cluster.nodes.claim_dead(clock.now()):
            drop = functools.partial(rooms.node_lost, node=node, last_seen=last_seen)
            consult_ids = await cluster.rooms.consult_ids()
            lost = sum(await each_at_most(REPAIR_CONCURRENCY, consult_ids, drop))
            _log.warning("a node stopped answering; its participants may reconnect", lost=lost)
        if repair_failed is not None:
            raise repair_failed
    except StateUnavailable:
        cluster.out_of_touch = True
        raise


JOBS = (
    # Pending entries wait in memory while the database is away: tried again
    # within half a minute.
    Job(JobName.TECHNICAL_LOG, write_technical_log, TECHNICAL_FLUSH_S, backoff_max_s=30.0),
    # Not at once: a start should not wait on it, and what it removes is
    # already hidden from every read.
    Job(
        JobName.HOUSEKEEPING,
        housekeeping.housekeeping_step,
        housekeeping.INTERVAL_S,
        first_after_s=housekeeping.FIRST_RUN_S,
        backoff_max_s=housekeeping.INTERVAL_S,
    ),
    # First a full interval: nothing is so urgent that a start should wait on
    # it, and several nodes starting together do not all try at once.
    Job(
        JobName.RETENTION,
        housekeeping.retention_step,
        lambda app: app[SETTINGS].retention.purge_interval_s,
    ),
    Job(
        JobName.ROOM_TIMERS,
        fire_room_timers,
        lambda app: app.get(ROOM_TIMER_POLL, TIMER_POLL_S),
        first_after_s=0.0,
        backoff_max_s=TIMER_BACKOFF_MAX_S,
        expected=REDIS_AWAY,
    ),
    Job(
        JobName.SESSION_CHECKS,
        check_therapist_sessions,
        lambda app: app[SETTINGS].sessions.socket_check_s,
    ),
    # The signaling sockets' WebSocket pings, all in one round.
    Job(JobName.SOCKET_HEARTBEATS, beat_sockets, round_interval_s),
    # When this server was last alive: where a killed server's consults end.
    Job(JobName.ALIVE, alive.beat, alive.ALIVE_BEAT_S, first_after_s=alive.ALIVE_BEAT_S),
    Job(
        JobName.NODE_HEARTBEAT,
        node_round,
        NODE_BEAT_S,
        first_after_s=0.0,
        backoff_max_s=NODE_BACKOFF_MAX_S,
        expected=REDIS_AWAY,
        runs_if=lambda app: app[CLUSTER] is not None,
    ),
    # The webhooks' outbox: what is due is sent, on every node (the claim
    # keeps two from sending one delivery).
    Job(
        JobName.WEBHOOKS,
        webhooks.deliver_due,
        lambda app: app[SETTINGS].webhooks.poll_interval_s,
        backoff_max_s=60.0,
    ),
    Job(JobName.WEBHOOK_HISTORY, webhooks.purge_webhook_history, webhooks.HISTORY_PURGE_INTERVAL_S),
)
