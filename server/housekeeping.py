"""Periodic clean-up: technical log entries past 24 hours, dead sessions, old
failures, used or expired enrolment links; and the retention purge.

With several nodes (Redis configured) each job runs on one node at a time:
:func:`single_runner` takes a Redis lock with an expiry, ``{prefix}:lock:{job}``,
and a node that finds it taken skips that round.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from redis.exceptions import LockNotOwnedError, RedisError

from audit.accounts import purge_enrolment_links
from audit.consults import (
    abandoned_consults,
    destroy_labels_of_unusable_links,
    purge_expired_invites,
)
from audit.db import reading
from audit.references import destroy_spent_references
from audit.retention import PurgeReport, Retention, purge_in_steps
from audit.sessions import purge_login_failures, purge_sessions
from audit.technical_log import purge_technical_log
from server.app_keys import (
    CHUNK_MAPS,
    CLOCK,
    DB_ENGINE,
    FILE_STORE,
    REDIS,
    ROOMS,
    SETTINGS,
    TECHNICAL_LOG,
)
from server.auth.lockout import lookback
from server.ws.registry import bulk_peers, bulk_share
from signaling.ports import StateUnavailable
from signaling.protocol import EndReason

_log = structlog.get_logger("videoconsult.housekeeping")

# Often enough that nothing outlives its limit by more than a few minutes;
# reads filter by time anyway, so this bounds only what sits on disk.
INTERVAL_S = 300.0
# The first run, after start.
FIRST_RUN_S = 60.0
# The housekeeping lock: a round takes seconds, and if its holder dies the
# lock is gone by the next round, so the 24-hour deletion slips by one
# interval at most.
HOUSEKEEPING_LOCK_S = INTERVAL_S
# The retention purge's lock: ten minutes, far longer than a purge takes
# (batches of a thousand rows), yet a node that dies holding it delays the
# purge by ten minutes at most, nothing against retention counted in days.
# A purge that outlasts it is still alone: PostgreSQL's advisory lock,
# held by its transaction, turns a second purge away.
RETENTION_LOCK_S = 600.0


@contextlib.asynccontextmanager
async def single_runner(
    app: web.Application, job: str, *, ttl_s: float, run_if_unreachable: bool
) -> AsyncIterator[bool]:
    """Yield whether this node runs ``job`` now: the lock of a single-runner job.

    Without Redis (one node) always True. With Redis, True while this node
    holds ``{prefix}:lock:{job}`` (redis-py's lock: it expires after
    ``ttl_s`` should the node die, and is released on exit only if it is
    still this node's), False while another node holds it, and
    ``run_if_unreachable`` when Redis cannot be reached: each job says
    whether running twice at once or not running at all is worse.
    """
    client = app[REDIS]
    if client is None:
        yield True
        return
    lock = client.lock(
        f"{app[SETTINGS].redis.key_prefix}:lock:{job}",
        timeout=ttl_s,
        blocking=False,
        # One lock object per round, used by one task: nothing to share.
        thread_local=False,
    )
    held = False
    try:
        held = bool(await lock.acquire())
        run = held
        if not held:
            _log.info("another node is running this job; skipped", job=job)
    except RedisError as err:
        run = run_if_unreachable
        _log.warning(
            "job lock unavailable: Redis unreachable",
            job=job,
            error=type(err).__name__,
            runs_anyway=run,
        )
    try:
        yield run
    finally:
        if held:
            try:
                await lock.release()
            except LockNotOwnedError:
                _log.warning("job outlasted its lock", job=job, lock_s=ttl_s)
            except RedisError as err:
                # It expires by itself.
                _log.warning("job lock not released", job=job, error=type(err).__name__)


async def purge_expired(app: web.Application) -> dict[str, int]:
    """Delete everything past its time once; return how many rows of each kind."""
    settings = app[SETTINGS]
    now = app[CLOCK].now()
    # The deletions first, in a transaction of their own: ending the
    # abandoned consults goes through the rooms, which may be on a Redis that
    # is away, and must not hold up the 24-hour deletion.
    async with app[DB_ENGINE].begin() as conn:
        counts = {
            "technical_log": await purge_technical_log(conn, now=now),
            "enrolment_links": await purge_enrolment_links(conn, now=now),
            "labels": await destroy_labels_of_unusable_links(conn, now=now),
            # Those whose last message went another way (its endpoint deleted).
            "appointment_references": await destroy_spent_references(conn),
            "invites": await purge_expired_invites(conn, now=now),
            "sessions": await purge_sessions(
                conn,
                now=now,
                idle_timeout_s=settings.sessions.idle_timeout_s,
                absolute_timeout_s=settings.sessions.absolute_timeout_s,
            ),
            "login_failures": await purge_login_failures(
                conn,
                before=now
                - lookback(
                    window_s=settings.accounts.failure_window_s,
                    lockout_s=settings.accounts.lockout_s,
                ),
            ),
        }
    # The table's bound counts from what is left (and what other nodes wrote).
    app[TECHNICAL_LOG].recount()
    async with reading(app[DB_ENGINE]) as conn:
        abandoned = await abandoned_consults(
            conn, now=now, validity_s=settings.consults.invite_validity_s
        )
    ended = 0
    for consult_id in abandoned:
        try:
            await app[ROOMS].end(consult_id, reason=EndReason.NOT_JOINED)
            ended += 1
        except (StateUnavailable, RedisError) as err:
            # The record was ended first, in the database; only telling the
            # room (and a socket still on it) failed. The room's state in
            # Redis expires by itself.
            _log.warning(
                "abandoned consult ended without its room",
                consult_id=str(consult_id),
                error=type(err).__name__,
            )
    counts["abandoned_consults"] = ended
    return counts


async def housekeeping_round(app: web.Application) -> dict[str, int] | None:
    """Purge once unless another node is at it; the counts, or None if skipped.

    When Redis cannot be reached it purges anyway: the deletions are
    idempotent, so two nodes at once only do the work twice, while skipping
    could keep technical logs past their 24 hours for as long as Redis is away.
    """
    async with single_runner(
        app, "housekeeping", ttl_s=HOUSEKEEPING_LOCK_S, run_if_unreachable=True
    ) as mine:
        if not mine:
            return None
        return await purge_expired(app)


async def housekeeping_step(app: web.Application) -> None:
    """The housekeeping job's round: purge, and say how much went."""
    counts = await housekeeping_round(app)
    if counts is not None and any(counts.values()):
        _log.info("purged expired records", **counts)


async def retention_round(app: web.Application) -> PurgeReport | None:
    """Run the retention purge once unless another node holds its Redis lock;
    the report, or None if skipped.

    When Redis cannot be reached it purges anyway, under PostgreSQL's
    advisory lock alone (SQLite is one node): that lock, not Redis's, is
    what keeps two purges from deleting at once (Redis's may run out during
    a long purge), and the files deleted after the commit are only those
    whose keys this purge destroyed. Skipping instead would let a Redis
    outage postpone destruction that is due, which the retention promise
    does not allow.
    """
    settings = app[SETTINGS].retention
    defaults = Retention(settings.consult_days, settings.recording_days, settings.access_log_days)
    async with single_runner(
        app, "retention-purge", ttl_s=RETENTION_LOCK_S, run_if_unreachable=True
    ) as mine:
        if not mine:
            return None

        # In steps (audit.retention.STEP): a long purge never holds SQLite's
        # write lock, which every access record waits for, for long.
        async def delete_files(files: list[str]) -> None:
            # Each step's keys are gone (committed): now their files and
            # cached chunk maps (in a thread: a day's purge may unlink hundreds).
            app[CHUNK_MAPS].discard(files)
            await asyncio.to_thread(app[FILE_STORE].delete_files, files)

        return await purge_in_steps(
            app[DB_ENGINE],
            now=app[CLOCK].now(),
            defaults=defaults,
            delete_files=delete_files,
            share=bulk_share(app),  # while the node has consults, they keep a core
            peers=bulk_peers(app),
        )


async def retention_step(app: web.Application) -> None:
    """The retention job's round, every ``retention.purge_interval_s`` (one
    node at a time; the others find a lock taken and skip): purge, and say
    how much went."""
    report = await retention_round(app)
    if report is not None and (report.recordings or report.consults or report.access_log_records):
        _log.info(
            "retention purge",
            recordings=report.recordings,
            consults=report.consults,
            access_log_records=report.access_log_records,
        )
