"""Retention: each organisation's settings, and a purge that deletes exactly
what has expired, keeps the access log verifiable, and runs on one node."""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import verify_chain
from audit.consults import mark_ended
from audit.db import create_engine
from audit.db import database_url as db_url
from audit.retention import PurgeReport, Retention, purge
from audit.roles import Role
from audit.schema import access_log, access_log_checkpoints, consults, technical_log
from audit.technical_log import write_technical
from server.app_keys import DB_ENGINE
from tests.support.cli import cli_env, run_cli, sqlite_write_lock_held
from tests.support.harness import Harness, new_consult
from tests.support.settings import SettingsFactory

DEFAULTS = Retention(consult_days=730, recording_days=30, access_log_days=1825)


async def end_consult(harness: Harness, consult_id: str) -> None:
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, uuid.UUID(consult_id), now=harness.clock.now())


async def consult_ids(harness: Harness) -> set[str]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return {str(i) for i in (await conn.execute(sa.select(consults.c.id))).scalars()}


async def run_purge(harness: Harness, *, dry_run: bool = False) -> PurgeReport:
    async with harness.app[DB_ENGINE].begin() as conn:
        return await purge(conn, now=harness.clock.now(), defaults=DEFAULTS, dry_run=dry_run)


async def test_admins_set_their_organisations_retention(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    shown = await (await harness.client.get("/api/admin/retention")).json()
    assert shown == {"consult_days": 730, "recording_days": 30, "access_log_days": 1825}
    body = {"consult_days": 90, "recording_days": 7, "access_log_days": 3650}
    updated = await harness.client.put("/api/admin/retention", json=body, headers=harness.headers)
    assert updated.status == 200
    assert await (await harness.client.get("/api/admin/retention")).json() == body
    bad = await harness.client.put(
        "/api/admin/retention", json={**body, "consult_days": 0}, headers=harness.headers
    )
    assert bad.status == 422
    assert "consult_days" in (await bad.json())["error"]["message"]
    therapist = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(therapist)
    assert (await harness.client.get("/api/admin/retention")).status == 403
    async with harness.app[DB_ENGINE].connect() as conn:
        actions = list(
            (
                await conn.execute(
                    sa.select(access_log.c.action, access_log.c.outcome).where(
                        access_log.c.action.like("retention.%")
                    )
                )
            ).all()
        )
    assert [tuple(a) for a in actions] == [
        ("retention.read", "allowed"),
        ("retention.update", "allowed"),
        ("retention.read", "allowed"),
        ("retention.read", "refused"),
    ]


async def test_the_purge_deletes_exactly_the_expired_consults(harness: Harness) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    await harness.client.put(
        "/api/admin/retention",
        json={"consult_days": 30, "recording_days": 7, "access_log_days": 3650},
        headers=harness.headers,
    )
    old = await new_consult(harness)
    await end_consult(harness, old.consult_id)
    running = await harness.post("/api/consults", {})  # never ended: kept however old
    running_id = (await running.json())["consult"]["id"]
    harness.clock.advance(29 * 86400)
    await harness.logged_in(old.therapist)  # the session ran out meanwhile
    recent = await harness.post("/api/consults", {})
    recent_id = (await recent.json())["consult"]["id"]
    await end_consult(harness, recent_id)
    # Another organisation with the default (730 days): its old consult stays.
    other = await new_consult(harness, email="zoe@praktijk-zuid.example")
    harness.clock.advance(2 * 86400)

    dry = await run_purge(harness, dry_run=True)
    assert (dry.consults, dry.dry_run) == (1, True)
    assert old.consult_id in await consult_ids(harness)

    report = await run_purge(harness)
    assert report.ran
    assert report.consults == 1
    assert await consult_ids(harness) == {running_id, recent_id, other.consult_id}
    # Its invite went with it.
    gone = await harness.client.get(f"/api/invites/{old.invite_token}")
    assert gone.status == 404


async def test_the_oldest_access_log_records_go_and_the_chain_still_verifies(
    harness: Harness,
) -> None:
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    await harness.client.put(
        "/api/admin/retention",
        json={"consult_days": 730, "recording_days": 7, "access_log_days": 10},
        headers=harness.headers,
    )
    chain = str(admin.organisation.id)
    async with harness.app[DB_ENGINE].connect() as conn:
        before = await conn.scalar(sa.select(sa.func.count()).where(access_log.c.chain == chain))
    harness.clock.advance(11 * 86400)
    await harness.logged_in(admin)  # the session ran out meanwhile
    await harness.client.get("/api/admin/accounts")  # records inside the retention

    report = await run_purge(harness)
    [purged] = [org for org in report.organisations if org.organisation_id == admin.organisation.id]
    assert purged.access_log_records == before
    async with harness.app[DB_ENGINE].connect() as conn:
        remaining = (
            (
                await conn.execute(
                    sa.select(access_log.c.action)
                    .where(access_log.c.chain == chain)
                    .order_by(access_log.c.seq)
                )
            )
            .scalars()
            .all()
        )
        [checkpoint] = (
            await conn.execute(
                sa.select(access_log_checkpoints).where(access_log_checkpoints.c.chain == chain)
            )
        ).all()
        report_chain = await verify_chain(conn, chain=chain)
        everything = await verify_chain(conn)
    assert remaining == ["session.login", "account.list", "access_log.purge"]
    assert (checkpoint.through_seq, checkpoint.records_purged) == (before, before)
    assert report_chain.intact
    assert everything.intact
    # Verified through the API too.
    verified = await (await harness.client.get("/api/admin/access-log/verify")).json()
    assert verified["intact"] is True


async def test_only_one_purge_runs_at_a_time(harness: Harness) -> None:
    await new_consult(harness)
    harness.clock.advance(3000 * 86400)
    engine = harness.app[DB_ENGINE]

    async def one() -> bool:
        async with engine.begin() as conn:
            report = await purge(conn, now=harness.clock.now(), defaults=DEFAULTS)
            await asyncio.sleep(0.2)  # hold the transaction (and its lock) a moment
            return report.ran

    ran = list(await asyncio.gather(one(), one()))
    if engine.dialect.name == "postgresql":
        assert sorted(ran) == [False, True]
    else:
        assert ran == [True, True]  # SQLite: one after the other
    async with engine.connect() as conn:
        assert (await verify_chain(conn)).intact
        purges = await conn.scalar(
            sa.select(sa.func.count()).where(access_log.c.action == "access_log.purge")
        )
    assert purges is not None
    assert purges >= 1


@pytest.mark.slow  # runs the command line in processes of its own
def test_the_command_line_runs_the_purge(data_dir: Path) -> None:
    env = cli_env(data_dir, retention_access_log_days="1")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Noord", env=env).returncode == 0
    dry = run_cli("retention", "run", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert (
        "dry run: would delete 0 recordings, 0 consult records and 0 access-log records in all"
        in dry.stdout
    )
    real = run_cli("retention", "run", env=env)
    assert real.returncode == 0, real.stderr
    assert "deleted 0 recordings, 0 consult records and 0 access-log records in all" in real.stdout
    # Paced, the purge took its part of the share beside a server's jobs on
    # this machine (audit/pace.py Peers), and left when it was done.
    assert os.listdir(data_dir / "bulk-jobs") == []
    assert run_cli("audit", "verify", env=env).returncode == 0


@pytest.mark.slow  # runs the command line in processes of its own
def test_a_dry_run_answers_while_another_connection_holds_the_write_lock(
    data_dir: Path,
) -> None:
    """A dry run only reads (audit.db.reading(): no write lock on SQLite), so
    it neither waits for a writer (a purge, the server) nor holds one up."""
    env = cli_env(data_dir, database_connect_timeout_s="2")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Noord", env=env).returncode == 0
    with sqlite_write_lock_held(data_dir):
        dry = run_cli("retention", "run", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would delete 0 technical-log entries older than 24 hours" in dry.stdout
    assert "dry run: would delete 0 recordings" in dry.stdout


async def technical_kinds(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return sorted((await conn.execute(sa.select(technical_log.c.kind))).scalars())


@pytest.mark.slow  # runs the command line in processes of its own
async def test_the_command_line_purges_the_technical_log_too(
    data_dir: Path, database_url: str, make_settings: SettingsFactory
) -> None:
    env = cli_env(data_dir, database_url=database_url)
    url = db_url(make_settings(database_url=database_url), data_dir)
    engine = create_engine(url, connect_timeout_s=5)
    try:
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            await write_technical(conn, "ice.failed", now=now - timedelta(hours=25))
            await write_technical(conn, "ws.opened", now=now - timedelta(hours=23))
        dry = await asyncio.to_thread(run_cli, "retention", "run", "--dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        assert "would delete 1 technical-log entries older than 24 hours" in dry.stdout
        assert await technical_kinds(engine) == ["ice.failed", "ws.opened"]
        real = await asyncio.to_thread(run_cli, "retention", "run", env=env)
        assert real.returncode == 0, real.stderr
        assert "deleted 1 technical-log entries older than 24 hours" in real.stdout
        assert await technical_kinds(engine) == ["ws.opened"]
    finally:
        await engine.dispose()


async def test_nothing_expires_early(harness: Harness) -> None:
    setup = await new_consult(harness)
    await end_consult(harness, setup.consult_id)
    harness.clock.advance(timedelta(days=729).total_seconds())
    report = await run_purge(harness)
    assert report.consults == 0
    assert setup.consult_id in await consult_ids(harness)
