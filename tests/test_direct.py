"""A patient's way in runs its statements on asyncpg connections of its own
on PostgreSQL (audit/direct.py; issue 19's admission storm), on the engine on
SQLite: the same answers either way, the engine's errors, a bounded number
of connections, and none left open."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import create_engine
from audit.consults import get_consult_and_label, open_invite, start_consult
from audit.db import is_outage
from audit.direct import OnConnection, Prepared, SingleStatements
from audit.schema import consults, invites
from server.app_keys import DB_ENGINE, DB_STATEMENTS
from tests.support.harness import Harness, new_consult

# A statement that shows which server process answered it.
BACKEND_PID = Prepared(sa.select(sa.func.pg_backend_pid().label("pid")))


@pytest.fixture
async def postgres_engine(migrated_postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(sa.make_url(migrated_postgres_url), connect_timeout_s=5)
    yield engine
    await engine.dispose()


@pytest.fixture
async def single(postgres_engine: AsyncEngine) -> AsyncIterator[SingleStatements]:
    statements = await SingleStatements.open(postgres_engine, connect_timeout_s=5, size=2)
    yield statements
    await statements.close()


async def test_the_way_in_reads_and_writes_the_same_through_the_engine_and_directly(
    harness: Harness,
) -> None:
    setup = await new_consult(harness, display_name="Mevr. Boomklever")
    single = harness.app[DB_STATEMENTS]
    engine = harness.app[DB_ENGINE]
    assert single.direct is (engine.dialect.name == "postgresql")
    consult_id = uuid.UUID(setup.consult_id)
    now = harness.clock.now()
    async with single.reading() as db:
        invite = await open_invite(db, setup.invite_token, now=now)
        consult, label = await get_consult_and_label(db, consult_id)
    async with engine.connect() as conn:
        assert await open_invite(OnConnection(conn), setup.invite_token, now=now) == invite
        assert await get_consult_and_label(OnConnection(conn), consult_id) == (consult, label)
    assert invite.consult_id == consult_id
    assert not invite.consult_started
    assert label is not None
    assert label.consult_id == consult_id
    assert label.therapist_id == setup.therapist.account_id
    # Times come back aware and in UTC on both paths.
    assert consult.created_at.utcoffset() == timedelta(0)

    started = await start_consult(single, consult_id, now=now)
    assert started.started_at == now
    assert started.status.value == "active"
    async with engine.connect() as conn:
        stored = await conn.scalar(
            sa.select(consults.c.started_at).where(consults.c.id == consult_id)
        )
    assert stored == now
    # A second start keeps the first (read as it is).
    assert (await start_consult(single, consult_id, now=now + timedelta(minutes=1))) == started


async def test_a_bad_statement_fails_as_the_engines_would_and_is_no_outage(
    single: SingleStatements,
) -> None:
    missing = Prepared(sa.select(sa.table("no_such_table", sa.column("x"))))
    async with single.reading() as db:
        with pytest.raises(sa.exc.DBAPIError) as failed:
            await db.first(missing, {})
        # The connection still serves the next statement.
        assert await db.first(BACKEND_PID, {}) is not None
    assert type(failed.value.orig).__name__ == "UndefinedTableError"
    assert not is_outage(failed.value)


async def test_an_unreachable_database_is_an_outage() -> None:
    # Port 1 on loopback: nothing listens there.
    engine = create_engine(
        sa.make_url("postgresql+asyncpg://nobody@127.0.0.1:1/none"), connect_timeout_s=2
    )
    statements = await SingleStatements.open(engine, connect_timeout_s=2)
    try:
        with pytest.raises(ConnectionRefusedError) as failed:
            async with statements.reading() as db:
                await db.first(BACKEND_PID, {})
        assert is_outage(failed.value)
        # The failed connect gave its place back: the next one tries again.
        with pytest.raises(ConnectionRefusedError):
            async with statements.reading() as db:
                await db.first(BACKEND_PID, {})
    finally:
        await statements.close()
        await engine.dispose()


async def test_a_connection_the_server_closed_is_made_again(
    single: SingleStatements, postgres_engine: AsyncEngine
) -> None:
    async with single.reading() as db:
        first = await db.first(BACKEND_PID, {})
    assert first is not None
    async with postgres_engine.connect() as conn:
        await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first["pid"]})
    # The server's goodbye reaches the idle connection: asyncpg marks it closed.
    async with asyncio.timeout(5):
        while True:
            async with postgres_engine.connect() as conn:
                gone = await conn.scalar(
                    sa.text("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": first["pid"]},
                )
            if gone:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    async with single.reading() as db:
        again = await db.first(BACKEND_PID, {})
    assert again is not None
    assert again["pid"] != first["pid"]


async def test_at_most_size_connections_and_a_wait_for_one_is_bounded(
    single: SingleStatements, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("audit.direct.ACQUIRE_TIMEOUT_S", 0.2)
    pids: list[int] = []
    both_held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with single.reading() as db:
            row = await db.first(BACKEND_PID, {})
            assert row is not None
            pids.append(row["pid"])
            if len(pids) == 2:
                both_held.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    async with asyncio.timeout(5):
        await both_held.wait()
    # Both of its two connections are in use: a third statement waits, and
    # gives up after the bound (answered 503, as the engine's pool does).
    with pytest.raises(TimeoutError) as waited:
        async with single.reading() as db:
            await db.first(BACKEND_PID, {})
    assert is_outage(waited.value)
    # One waiting while they are given back gets one of the same two.
    waiting = asyncio.create_task(_pid_of(single))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    await asyncio.gather(*holders)
    assert await waiting in pids
    assert len(set(pids)) == 2


async def _pid_of(single: SingleStatements) -> int:
    async with single.reading() as db:
        row = await db.first(BACKEND_PID, {})
    assert row is not None
    pid: int = row["pid"]
    return pid


async def test_a_statement_cancelled_midway_leaves_its_connection_unused(
    single: SingleStatements,
) -> None:
    first = await _pid_of(single)
    slow = Prepared(sa.select(sa.func.pg_sleep(5).label("slept")))

    async def sleeper() -> None:
        async with single.reading() as db:
            await db.first(slow, {})

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The next statement runs at once, on another connection.
    async with asyncio.timeout(2):
        assert await _pid_of(single) != first


async def test_closing_waits_for_connections_in_use_and_then_refuses(
    postgres_engine: AsyncEngine,
) -> None:
    statements = await SingleStatements.open(postgres_engine, connect_timeout_s=5)
    entered = asyncio.Event()

    async def in_use() -> None:
        async with statements.reading() as db:
            entered.set()
            await asyncio.sleep(0.2)
            await db.first(BACKEND_PID, {})

    task = asyncio.create_task(in_use())
    await entered.wait()
    assert await statements.close(wait_s=5) == 0
    await task
    with pytest.raises(sa.exc.DBAPIError, match="closed"):
        async with statements.reading() as db:
            await db.first(BACKEND_PID, {})


async def test_closing_ends_a_connection_kept_past_the_wait(postgres_engine: AsyncEngine) -> None:
    statements = await SingleStatements.open(postgres_engine, connect_timeout_s=5)
    stop = asyncio.Event()

    async def kept() -> None:
        async with statements.reading() as db:
            await db.first(BACKEND_PID, {})
            await stop.wait()

    task = asyncio.create_task(kept())
    await asyncio.sleep(0.1)
    assert await statements.close(wait_s=0.1) == 1
    stop.set()
    await task


def test_a_statement_names_the_parameter_it_was_not_given() -> None:
    by_hash = Prepared(
        sa.select(invites.c.consult_id).where(invites.c.token_hash == sa.bindparam("invite_hash"))
    )
    assert by_hash.arguments({"invite_hash": "h"}) == ["h"]
    with pytest.raises(KeyError, match="invite_hash"):
        by_hash.arguments({})
