"""The access log is a hash chain: every kind of tampering is found, on
SQLite and on PostgreSQL, and concurrent appends keep it whole."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import create_engine, prepare_data_dir, upgrade
from audit.access_log import (
    GENESIS_HASH,
    AccessRecord,
    Break,
    ChainReport,
    ClientType,
    Outcome,
    append_access,
    canonical_fields,
    record_hash,
    verify_chain,
)
from audit.db import database_url as configured_url
from audit.schema import access_log
from tests.conftest import SettingsFactory
from tests.harness import Harness, new_consult
from tests.test_cli import cli_env, run_cli

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture
async def engine(make_settings: SettingsFactory, database_url: str) -> AsyncIterator[AsyncEngine]:
    settings = make_settings(database_url=database_url)
    engine = create_engine(
        configured_url(settings, prepare_data_dir(settings.data_dir)),
        connect_timeout_s=settings.database.connect_timeout_s,
    )
    await upgrade(engine)
    yield engine
    await engine.dispose()


def a_record(n: int) -> AccessRecord:
    return AccessRecord(
        at=T0 + timedelta(seconds=n),
        organisation_id=uuid.UUID(int=1),
        actor_id=uuid.UUID(int=2),
        actor_role="admin",
        action="account.read",
        object_type="account",
        object_id=str(uuid.UUID(int=100 + n)),
        outcome=Outcome.ALLOWED,
        client_type=ClientType.API,
    )


async def append_many(engine: AsyncEngine, count: int) -> None:
    for n in range(count):
        async with engine.begin() as conn:
            await append_access(conn, a_record(n))


async def sql(engine: AsyncEngine, statement: str, **params: object) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(statement), params)


async def verify(engine: AsyncEngine) -> ChainReport:
    async with engine.connect() as conn:
        return await verify_chain(conn, batch=3)  # small batches: the paging is walked too


async def row(engine: AsyncEngine, seq: int) -> sa.Row[tuple[object, ...]]:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(access_log).where(access_log.c.seq == seq))).one()


async def test_an_untouched_chain_verifies(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        empty = await verify_chain(conn)
    assert (empty.intact, empty.records, empty.last_hash) == (True, 0, GENESIS_HASH)
    await append_many(engine, 10)
    report = await verify(engine)
    assert report.intact
    assert report.records == 10
    first, last = await row(engine, 1), await row(engine, 10)
    assert first.prev_hash == GENESIS_HASH
    assert report.last_hash == last.hash
    # The hash is over the canonical encoding of exactly these fields.
    fields = canonical_fields(
        at=first.at,
        organisation_id=first.organisation_id,
        actor_id=first.actor_id,
        actor_role=first.actor_role,
        action=first.action,
        object_type=first.object_type,
        object_id=first.object_id,
        outcome=first.outcome,
        client_type=first.client_type,
    )
    assert record_hash(fields, GENESIS_HASH) == first.hash


async def test_a_modified_record_is_named(engine: AsyncEngine) -> None:
    await append_many(engine, 8)
    await sql(engine, "UPDATE access_log SET outcome = 'refused' WHERE seq = 5")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (5, Break.MODIFIED)
    assert report.records == 4


async def test_a_modified_time_is_found_too(engine: AsyncEngine) -> None:
    await append_many(engine, 4)
    async with engine.begin() as conn:
        await conn.execute(
            access_log.update().where(access_log.c.seq == 2).values(at=T0 + timedelta(hours=1))
        )
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (2, Break.MODIFIED)


async def test_a_deleted_record_is_named(engine: AsyncEngine) -> None:
    await append_many(engine, 8)
    await sql(engine, "DELETE FROM access_log WHERE seq = 4")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (5, Break.DELETED)
    assert "4" in report.broken.detail


async def test_deleting_the_first_record_is_found(engine: AsyncEngine) -> None:
    await append_many(engine, 3)
    await sql(engine, "DELETE FROM access_log WHERE seq = 1")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (2, Break.DELETED)


async def test_an_inserted_record_is_named(engine: AsyncEngine) -> None:
    # A forger inserts a well-formed record after record 3 (its hash chained
    # to record 3's) and renumbers the rest to make room.
    await append_many(engine, 6)
    three = await row(engine, 3)
    await sql(engine, "UPDATE access_log SET seq = seq + 1000 WHERE seq > 3")
    await sql(engine, "UPDATE access_log SET seq = seq - 999 WHERE seq > 1000")
    forged = a_record(99)
    fields = canonical_fields(
        at=forged.at,
        organisation_id=forged.organisation_id,
        actor_id=forged.actor_id,
        actor_role=forged.actor_role,
        action=forged.action,
        object_type=forged.object_type,
        object_id=forged.object_id,
        outcome=forged.outcome.value,
        client_type=forged.client_type.value,
    )
    async with engine.begin() as conn:
        await conn.execute(
            access_log.insert().values(
                at=forged.at,
                organisation_id=forged.organisation_id,
                actor_id=forged.actor_id,
                actor_role=forged.actor_role,
                action=forged.action,
                object_type=forged.object_type,
                object_id=forged.object_id,
                outcome=forged.outcome.value,
                client_type=forged.client_type.value,
                seq=4,
                prev_hash=three.hash,
                hash=record_hash(fields, str(three.hash)),
            )
        )
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (5, Break.INSERTED)
    assert "record 3" in report.broken.detail


async def test_a_record_appended_by_hand_is_found(engine: AsyncEngine) -> None:
    await append_many(engine, 3)
    await sql(
        engine,
        "INSERT INTO access_log (at, actor_role, action, object_type, outcome, client_type,"
        " seq, prev_hash, hash) VALUES (:at, 'admin', 'x', 'y', 'allowed', 'api', 4, :prev, :h)",
        at=T0,
        prev="f" * 64,
        h="e" * 64,
    )
    report = await verify(engine)
    assert report.broken is not None
    assert report.broken.seq == 4
    assert report.broken.kind in {Break.MODIFIED, Break.INSERTED}


async def test_reordered_records_are_named(engine: AsyncEngine) -> None:
    await append_many(engine, 6)
    await sql(engine, "UPDATE access_log SET seq = 100 WHERE seq = 3")
    await sql(engine, "UPDATE access_log SET seq = 3 WHERE seq = 4")
    await sql(engine, "UPDATE access_log SET seq = 4 WHERE seq = 100")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (3, Break.REORDERED)


async def test_the_first_break_is_the_one_reported(engine: AsyncEngine) -> None:
    await append_many(engine, 9)
    await sql(engine, "DELETE FROM access_log WHERE seq = 7")
    await sql(engine, "UPDATE access_log SET action = 'x' WHERE seq = 3")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (3, Break.MODIFIED)


async def test_hundreds_of_concurrent_appends_leave_a_whole_chain(engine: AsyncEngine) -> None:
    async def one(n: int) -> None:
        async with engine.begin() as conn:
            await append_access(conn, a_record(n))

    await asyncio.gather(*(one(n) for n in range(300)))
    report = await verify(engine)
    assert report.intact, report.broken
    assert report.records == 300


async def test_records_the_app_writes_form_a_chain(harness: Harness) -> None:
    setup = await new_consult(harness)
    await harness.client.get("/api/consults")
    await harness.client.get(f"/api/consults/{setup.consult_id}")
    await harness.client.get(f"/api/consults/{uuid.uuid4()}")
    from server.app_keys import DB_ENGINE

    async with harness.app[DB_ENGINE].connect() as conn:
        report = await verify_chain(conn)
        actions = (await conn.execute(sa.select(access_log.c.action))).scalars().all()
    assert report.intact, report.broken
    assert report.records == len(actions) >= 3
    assert "consult.read" in actions


async def test_records_from_before_the_chain_are_chained_by_the_migration(
    make_settings: SettingsFactory, database_url: str
) -> None:
    settings = make_settings(database_url=database_url)
    engine = create_engine(
        configured_url(settings, prepare_data_dir(settings.data_dir)),
        connect_timeout_s=settings.database.connect_timeout_s,
    )
    try:
        await upgrade(engine, to="0004")
        for n in range(5):
            await sql(
                engine,
                "INSERT INTO access_log (at, organisation_id, actor_id, actor_role, action,"
                " object_type, object_id, outcome, client_type)"
                " VALUES (:at, NULL, NULL, 'operator', 'account.create', 'account', :object,"
                " 'allowed', 'cli')",
                at=T0 + timedelta(minutes=n),
                object=str(uuid.UUID(int=n)),
            )
        await upgrade(engine)
        await append_many(engine, 2)
        async with engine.connect() as conn:
            report = await verify_chain(conn)
        assert report.intact, report.broken
        assert report.records == 7
    finally:
        await engine.dispose()


def test_the_command_line_verifies_and_names_the_break(data_dir: Path) -> None:
    env = cli_env(data_dir)
    assert run_cli("db", "upgrade", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Noord", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Zuid", env=env).returncode == 0
    intact = run_cli("audit", "verify", env=env)
    assert intact.returncode == 0, intact.stderr
    assert "access log intact: 2 records" in intact.stdout

    import sqlite3

    [database] = list(data_dir.glob("*.db")) or list(data_dir.glob("*.sqlite*"))
    with sqlite3.connect(database) as db:
        db.execute("UPDATE access_log SET actor_role = 'admin' WHERE seq = 2")
    broken = run_cli("audit", "verify", env=env)
    assert broken.returncode == 1
    assert "access log BROKEN at record 2 (modified)" in broken.stdout
    assert "Traceback" not in broken.stderr
