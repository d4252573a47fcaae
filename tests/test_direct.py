"""A patient's way in runs its statements on asyncpg connections of its own
on PostgreSQL (audit/direct.py; issue 19's admission storm), on a SQLite
connection in a thread of their own on SQLite (audit/sqlite_direct.py): the
same answers either way, the engine's errors, a bounded number
of connections, and none left open."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import create_engine
from audit.consults import (
    InviteInvalid,
    InviteProblem,
    get_consult_and_label,
    start_consult,
)
from audit.db import is_outage
from audit.direct import ByKey, OnConnection, Prepared, SingleStatements
from audit.invite_use import note_invite_used, open_invite, open_invite_by_hash
from audit.schema import consults, invites
from audit.sealing import token_hash
from server.app_keys import DB_ENGINE, DB_STATEMENTS
from tests.support.databases import ASYNCPG_INTROSPECTION
from tests.support.harness import Harness, new_consult

# Batches are asyncpg's: on SQLite each statement runs alone.
ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
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
    assert single.threaded is (engine.dialect.name == "sqlite")
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


async def _pid_of(single: SingleStatements) -> int:
    async with single.reading() as db:
        row = await db.first(BACKEND_PID, {})
    assert row is not None
    pid: int = row["pid"]
    return pid


def _sleeping(seconds: float) -> Prepared:
    """A statement that holds its connection for ``seconds`` and names it."""
    return Prepared(
        sa.select(sa.func.pg_backend_pid().label("pid"), sa.func.pg_sleep(seconds).label("slept"))
    )


async def test_at_most_size_connections_and_a_wait_for_one_is_bounded(
    single: SingleStatements, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("audit.direct.ACQUIRE_TIMEOUT_S", 0.2)

    async def pid_after(seconds: float) -> int:
        async with single.reading() as db:
            row = await db.first(_sleeping(seconds), {})
        assert row is not None
        pid: int = row["pid"]
        return pid

    holders = [asyncio.create_task(pid_after(1.0)) for _ in range(2)]
    await asyncio.sleep(0.1)
    # Both of its two connections are in use: a third statement waits, and
    # gives up after the bound (answered 503, as the engine's pool does).
    with pytest.raises(TimeoutError) as waited:
        await _pid_of(single)
    assert is_outage(waited.value)
    # One waiting while they are given back gets one of the same two.
    waiting = asyncio.create_task(pid_after(0))
    monkeypatch.setattr("audit.direct.ACQUIRE_TIMEOUT_S", 5.0)
    pids = await asyncio.gather(*holders)
    assert len(set(pids)) == 2
    assert await waiting in pids


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


async def test_closing_waits_for_statements_in_flight_and_then_refuses(
    postgres_engine: AsyncEngine,
) -> None:
    statements = await SingleStatements.open(postgres_engine, connect_timeout_s=5)

    async def in_flight() -> Mapping[str, Any] | None:
        async with statements.reading() as db:
            return await db.first(_sleeping(0.3), {})

    task = asyncio.create_task(in_flight())
    await asyncio.sleep(0.1)
    assert await statements.close(wait_s=5) == 0
    assert (await task) is not None
    with pytest.raises(sa.exc.DBAPIError, match="closed"):
        await _pid_of(statements)


async def test_closing_ends_a_statement_that_outlasts_the_wait(
    postgres_engine: AsyncEngine,
) -> None:
    statements = await SingleStatements.open(postgres_engine, connect_timeout_s=5)

    async def in_flight() -> None:
        async with statements.reading() as db:
            await db.first(_sleeping(5), {})

    task = asyncio.create_task(in_flight())
    await asyncio.sleep(0.1)
    assert await statements.close(wait_s=0.1) == 1
    with pytest.raises(sa.exc.DBAPIError) as ended:
        await task
    assert is_outage(ended.value)


async def _invite(harness: Harness, n: int) -> tuple[str, str]:
    """A consult of a therapist of its own (``n``): its id, its invite's hash."""
    setup = await new_consult(harness, f"therapist-{n}@praktijk-noord.example")
    return setup.consult_id, token_hash(setup.invite_token)


@ON_POSTGRESQL
async def test_reads_asked_for_in_one_turn_go_as_one_statement(harness: Harness) -> None:
    single = harness.app[DB_STATEMENTS]
    made = [await _invite(harness, n) for n in range(3)]
    hashes = [h for _c, h in made] + ["0" * 43]
    seen: list[str] = []

    def logger(record: Any) -> None:
        seen.append(record.query)

    single.add_query_logger(logger)
    try:
        async with single.reading() as db:
            answers = await asyncio.gather(
                *(
                    open_invite_by_hash(db, h, now=harness.clock.now())
                    for h in [*hashes, hashes[0]]
                ),
                return_exceptions=True,
            )
    finally:
        single.remove_query_logger(logger)
    queries = [" ".join(query.split()) for query in seen]
    statements = [q for q in queries if not q.startswith(ASYNCPG_INTROSPECTION)]
    assert len(statements) == 1, statements
    assert "ANY" in statements[0]
    # Each caller gets its own invite's answer, the unknown one its refusal.
    for (consult_id, _h), answer in zip(made, answers, strict=False):
        assert not isinstance(answer, BaseException)
        assert str(answer.consult_id) == consult_id
    assert isinstance(answers[3], InviteInvalid)
    assert answers[3].problem is InviteProblem.UNKNOWN
    assert answers[4] == answers[0]


@ON_POSTGRESQL
async def test_writes_asked_for_in_one_turn_go_in_one_round_trip(harness: Harness) -> None:
    single = harness.app[DB_STATEMENTS]
    made = [await _invite(harness, n) for n in range(4)]
    now = harness.clock.now()
    async with single.reading() as db:
        invites_now = [await open_invite_by_hash(db, h, now=now) for _c, h in made]
    seen: list[str] = []

    def logger(record: Any) -> None:
        seen.append(" ".join(record.query.split()))

    single.add_query_logger(logger)
    try:
        async with single.autocommit() as db:
            await asyncio.gather(*(note_invite_used(db, invite, now=now) for invite in invites_now))
    finally:
        single.remove_query_logger(logger)
    if single.direct:
        # One pipelined round trip for the four (asyncpg's executemany).
        assert [q.split()[0] for q in seen] == ["UPDATE"], seen
    else:
        # SQLite's thread: the four in one transaction, one COMMIT for all.
        assert single.threaded
        assert [q.split()[0] for q in seen] == ["BEGIN", *["UPDATE"] * 4], seen
    async with harness.app[DB_ENGINE].connect() as conn:
        used = await conn.scalars(
            sa.select(invites.c.first_used_at).where(
                invites.c.token_hash.in_([h for _c, h in made])
            )
        )
        assert list(used) == [now] * 4


@ON_POSTGRESQL
async def test_starts_asked_for_in_one_turn_go_as_one_statement_each_at_its_time(
    harness: Harness,
) -> None:
    single = harness.app[DB_STATEMENTS]
    consult_ids = [uuid.UUID((await _invite(harness, n))[0]) for n in range(3)]
    now = harness.clock.now()
    seen: list[str] = []

    def logger(record: Any) -> None:
        seen.append(" ".join(record.query.split()))

    single.add_query_logger(logger)
    try:
        started = await asyncio.gather(
            *(
                start_consult(single, consult_id, now=now + timedelta(seconds=n))
                for n, consult_id in enumerate(consult_ids)
            )
        )
    finally:
        single.remove_query_logger(logger)
    statements = [q for q in seen if not q.startswith(ASYNCPG_INTROSPECTION)]
    assert [q.split()[0] for q in statements] == ["UPDATE"], statements
    assert [c.id for c in started] == consult_ids
    assert [c.started_at for c in started] == [now + timedelta(seconds=n) for n in range(3)]
    async with harness.app[DB_ENGINE].connect() as conn:
        stored = dict(
            (
                await conn.execute(
                    sa.select(consults.c.id, consults.c.started_at).where(
                        consults.c.id.in_(consult_ids)
                    )
                )
            ).all()
        )
    assert [stored[c] for c in consult_ids] == [c.started_at for c in started]


@ON_POSTGRESQL
async def test_a_failed_batch_fails_each_caller_and_a_cancelled_one_spares_the_others(
    harness: Harness,
) -> None:
    single = harness.app[DB_STATEMENTS]
    no_table = sa.table("no_such_table", sa.column("k"))
    broken = Prepared(
        sa.select(no_table.c.k).where(no_table.c.k == sa.bindparam("k")),
        batch=ByKey(
            sa.select(no_table.c.k).where(
                no_table.c.k == sa.any_(sa.bindparam("ks", type_=ARRAY(sa.String())))
            ),
            key_param="k",
            keys_param="ks",
            key_column="k",
        ),
    )
    async with single.reading() as db:
        failed = await asyncio.gather(
            *(db.first(broken, {"k": str(n)}) for n in range(3)), return_exceptions=True
        )
    assert all(isinstance(f, sa.exc.DBAPIError) for f in failed), failed
    assert not any(is_outage(f) for f in failed if isinstance(f, BaseException))

    _consult_id, invite_hash = await _invite(harness, 0)
    async with single.reading() as db:
        gone = asyncio.create_task(open_invite_by_hash(db, invite_hash, now=harness.clock.now()))
        kept = asyncio.create_task(open_invite_by_hash(db, invite_hash, now=harness.clock.now()))
        await asyncio.sleep(0)
        gone.cancel()
        assert (await kept).token_hash == invite_hash
    assert gone.cancelled()


def test_a_statement_names_the_parameter_it_was_not_given() -> None:
    by_hash = Prepared(
        sa.select(invites.c.consult_id).where(invites.c.token_hash == sa.bindparam("invite_hash"))
    )
    assert by_hash.arguments({"invite_hash": "h"}) == ["h"]
    with pytest.raises(KeyError, match="invite_hash"):
        by_hash.arguments({})
