"""Periodic clean-up: technical log entries past 24 hours, dead sessions, old
failures, used or expired enrolment links."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from audit.accounts import purge_enrolment_links
from audit.consults import abandoned_consults, purge_expired_invites
from audit.recordings import FileStore
from audit.retention import Retention, purge
from audit.sessions import purge_login_failures, purge_sessions
from audit.technical_log import purge_technical_log
from server.app_keys import CLOCK, DATA_DIR, DB_ENGINE, ROOMS, SETTINGS
from server.auth.lockout import lookback

_log = structlog.get_logger("videoconsult.housekeeping")

# Often enough that nothing outlives its limit by more than a few minutes;
# reads filter by time anyway, so this bounds only what sits on disk.
INTERVAL_S = 300.0
# The first run, after start.
FIRST_RUN_S = 60.0


async def purge_expired(app: web.Application) -> dict[str, int]:
    """Delete everything past its time once; return how many rows of each kind."""
    settings = app[SETTINGS]
    now = app[CLOCK].now()
    async with app[DB_ENGINE].connect() as conn:
        abandoned = await abandoned_consults(
            conn, now=now, validity_s=settings.consults.invite_validity_s
        )
    for consult_id in abandoned:
        await app[ROOMS].end(consult_id, reason="not_joined")
    async with app[DB_ENGINE].begin() as conn:
        return {
            "technical_log": await purge_technical_log(conn, now=now),
            "enrolment_links": await purge_enrolment_links(conn, now=now),
            "abandoned_consults": len(abandoned),
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


async def run_housekeeping(app: web.Application) -> None:
    """Background task: purge every few minutes, the first time a little after
    start (not at once: a start should not wait on it, and what it removes is
    already hidden from every read)."""
    await asyncio.sleep(FIRST_RUN_S)
    while True:
        try:
            counts = await purge_expired(app)
            if any(counts.values()):
                _log.info("purged expired records", **counts)
        except Exception:
            _log.exception("housekeeping failed; trying again later")
        await asyncio.sleep(INTERVAL_S)


def recording_store(app: web.Application) -> FileStore:
    return FileStore(app[DATA_DIR] / "recordings")


async def run_retention_purge(app: web.Application) -> None:
    """Background task: the retention purge, every ``retention.purge_interval_s``
    after start (one node at a time; the others find the lock taken and skip)."""
    settings = app[SETTINGS].retention
    defaults = Retention(settings.consult_days, settings.recording_days, settings.access_log_days)
    while True:
        # First a full interval: nothing is so urgent that a start should wait
        # on it, and several nodes starting together do not all try at once.
        await asyncio.sleep(settings.purge_interval_s)
        try:
            async with app[DB_ENGINE].begin() as conn:
                report = await purge(conn, now=app[CLOCK].now(), defaults=defaults)
            # The keys are gone (committed); now the files.
            recording_store(app).delete_files(report.files)
            if report.recordings or report.consults or report.access_log_records:
                _log.info(
                    "retention purge",
                    recordings=report.recordings,
                    consults=report.consults,
                    access_log_records=report.access_log_records,
                )
        except Exception:
            _log.exception("retention purge failed; trying again later")
