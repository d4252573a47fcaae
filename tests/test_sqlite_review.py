"""A review of the SQLite writers' queue (audit/sqlite_writers.py) and the way
in's thread (audit/sqlite_direct.py), 2026-12-07: each test failed on the
code as reviewed (31029c4), for the reason its docstring gives, and passes
since the fixes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from audit.direct import Prepared
from audit.invite_use import open_invite_by_hash
from audit.schema import invites
from audit.sealing import token_hash
from server.app_keys import DB_ENGINE, DB_STATEMENTS
from tests.support.cli import sqlite_write_lock_held
from tests.support.harness import Harness, new_consult

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

# An invite moved to another consult (as in tests/test_sqlite_direct.py).
_MOVE_INVITE = Prepared(
    invites.update()
    .where(invites.c.token_hash == sa.bindparam("invite_hash"))
    .values(consult_id=sa.bindparam("consult_id", type_=invites.c.consult_id.type))
)

_CONSENT = {"consent": True, "guardian_consent": True}


async def _ticket_answer(harness: Harness, invite_token: str) -> tuple[int, str | None]:
    """A patient's ticket request: its status and its error's code, if any."""
    response = await harness.post(f"/api/invites/{invite_token}/ticket", _CONSENT)
    body = await response.json()
    return response.status, body.get("error", {}).get("code")


async def _owners(harness: Harness) -> dict[str, uuid.UUID]:
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = (await conn.execute(sa.select(invites.c.token_hash, invites.c.consult_id))).all()
    return {row[0]: row[1] for row in rows}


@ON_SQLITE
async def test_a_write_that_waits_past_the_turns_limit_answers_503_database_busy(
    harness: Harness,
) -> None:
    """A burst of this process's own writes keeps a patient's ticket waiting
    for its turn past TURN_WAIT_S: the queue raises a bare
    sqlite3.OperationalError('database is locked') (WriterQueue._acquire), not
    wrapped by SQLAlchemy, which error_middleware's
    ``except (SQLAlchemyError, OSError, TimeoutError)`` does not catch: the
    patient gets a 500 internal_error and the log an 'unhandled error'
    traceback, not the documented 503 database_busy with Retry-After."""
    setup = await new_consult(harness)
    engine = harness.app[DB_ENGINE]
    engine.dialect.writers._wait_s = 0.3  # type: ignore[attr-defined]  # TURN_WAIT_S, shortened for the test
    async with engine.begin() as conn:  # another writer of this process, holding the turn
        await conn.exec_driver_sql("SELECT 1")
        answer = await _ticket_answer(harness, setup.invite_token)
    assert answer == (503, "database_busy")


@ON_SQLITE
async def test_an_engine_write_that_waits_past_the_turns_limit_answers_503_database_busy(
    harness: Harness,
) -> None:
    """The same on the engine's path: the begin event's bare
    sqlite3.OperationalError (SQLAlchemy does not wrap an error raised by a
    'begin' listener, engine/base.py _begin_impl) makes a therapist's new
    consult a 500 internal_error instead of 503 database_busy."""
    await new_consult(harness)  # logged in
    engine = harness.app[DB_ENGINE]
    engine.dialect.writers._wait_s = 0.3  # type: ignore[attr-defined]
    async with engine.begin() as conn:
        await conn.exec_driver_sql("SELECT 1")
        response = await harness.post("/api/consults", {})
        body = await response.json()
    assert response.status == 503, body
    assert body["error"]["code"] == "database_busy"


@ON_SQLITE
@pytest.mark.settings(database_connect_timeout_s="0.3")
async def test_a_failed_write_batch_leaves_no_task_exception_unretrieved(
    harness: Harness, data_dir: Path
) -> None:
    """Another process (a command line's job) holds SQLite's write lock past
    the busy timeout: the patient rightly gets 503 database_busy, but
    SqliteThread._run_batch re-raises the batch's error in its own task, which
    nobody awaits (sqlite_direct.py _run_batch's ``raise``): asyncio reports
    'Task exception was never retrieved' with a traceback, at error level in
    the process log, for every failed batch."""
    setup = await new_consult(harness)
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        with sqlite_write_lock_held(data_dir):
            answer = await _ticket_answer(harness, setup.invite_token)
        assert answer == (503, "database_busy")
        for _ in range(3):
            await asyncio.sleep(0.01)
            gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert [context.get("message") for context in seen] == []


@ON_SQLITE
async def test_a_write_whose_value_cannot_be_sent_fails_alone(harness: Harness) -> None:
    """One call of a turn's write batch fails before SQLite sees it (a value
    its type cannot convert: SQLAlchemy's StatementError, not a DBAPIError,
    so _one's ``except sa.exc.DBAPIError`` lets it out, sqlite_direct.py:211):
    the whole batch is rolled back and every other patient whose write shared
    that loop turn gets the error (a 500) and loses a write that was fine,
    against the batch's promise that 'one that fails fails alone'."""
    single = harness.app[DB_STATEMENTS]
    assert single.threaded
    first = await new_consult(harness, "a@praktijk-noord.example")
    second = await new_consult(harness, "b@praktijk-noord.example")
    first_hash, second_hash = token_hash(first.invite_token), token_hash(second.invite_token)
    async with single.autocommit() as db:
        outcomes = await asyncio.gather(
            db.execute(_MOVE_INVITE, {"invite_hash": first_hash, "consult_id": "not-a-uuid"}),
            db.execute(
                _MOVE_INVITE,
                {"invite_hash": second_hash, "consult_id": uuid.UUID(first.consult_id)},
            ),
            return_exceptions=True,
        )
    assert isinstance(outcomes[0], sa.exc.StatementError), outcomes
    assert outcomes[1] is None, outcomes
    assert (await _owners(harness))[second_hash] == uuid.UUID(first.consult_id)


@ON_SQLITE
async def test_a_write_reported_failed_is_not_committed(harness: Harness) -> None:
    """A call whose error makes SQLite roll back the whole transaction (as it
    may on SQLITE_FULL or SQLITE_IOERR; here a RAISE(ROLLBACK) trigger) leaves
    the batch outside any transaction: _one sees no transaction and skips its
    ROLLBACK TO, the next call's SAVEPOINT opens a transaction of its own and
    its RELEASE commits it, then the batch's COMMIT fails ('no transaction is
    active', sqlite_direct.py:175) and every call is told it failed. The
    third patient gets a 500 although their write is committed; a retry does
    it twice."""
    single = harness.app[DB_STATEMENTS]
    engine = harness.app[DB_ENGINE]
    setups = [await new_consult(harness, f"{n}@praktijk-noord.example") for n in "abc"]
    hashes = [token_hash(setup.invite_token) for setup in setups]
    target = uuid.UUID(setups[0].consult_id)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE TRIGGER review_rollback BEFORE UPDATE OF consult_id ON invites "
            f"WHEN NEW.token_hash = '{hashes[1]}' "
            "BEGIN SELECT RAISE(ROLLBACK, 'refused'); END"
        )
    async with single.autocommit() as db:
        outcomes = await asyncio.gather(
            *(
                db.execute(_MOVE_INVITE, {"invite_hash": invite_hash, "consult_id": target})
                for invite_hash in hashes[1:]
            ),
            return_exceptions=True,
        )
    moved = (await _owners(harness))[hashes[2]] == target
    assert not (isinstance(outcomes[1], BaseException) and moved), (
        f"told {outcomes[1]!r}, yet its write is committed"
    )
    # And the refused call hears its own error, not the batch's COMMIT's.
    assert isinstance(outcomes[0], sa.exc.IntegrityError), outcomes


@ON_SQLITE
async def test_the_thread_connects_again_after_its_connection_breaks_in_a_write(
    harness: Harness,
) -> None:
    """The thread's connection breaks (SQLAlchemy takes 'Cannot operate on a
    closed database' for a disconnect and invalidates it) during a write: in
    SqliteThread._run's except, _in_transaction() asks the invalidated
    Connection for .connection, which raises PendingRollbackError (its
    autobegun transaction was never ended) before self._close() is reached
    (sqlite_direct.py:177-180). The broken connection is kept, and every later
    write and read of the way in fails: no patient gets a ticket or into a
    waiting room until the server restarts. A read batch, by contrast, does
    connect again."""
    single = harness.app[DB_STATEMENTS]
    setup = await new_consult(harness)
    invite_hash = token_hash(setup.invite_token)
    params = {"invite_hash": invite_hash, "consult_id": uuid.UUID(setup.consult_id)}
    async with single.autocommit() as db:
        await db.execute(_MOVE_INVITE, params)  # the thread's connection is made
    thread = single._sqlite
    assert thread is not None
    assert thread._connection is not None
    dbapi_connection = thread._connection.connection.dbapi_connection
    assert dbapi_connection is not None
    dbapi_connection.close()  # broken under it (idle now)
    with pytest.raises(sa.exc.DBAPIError):  # this one fails: the connection is gone
        async with single.autocommit() as db:
            await db.execute(_MOVE_INVITE, params)
    # The next ones are on a new connection: a read (the waiting room), a write.
    async with single.reading() as db:
        assert (await open_invite_by_hash(db, invite_hash, now=harness.clock.now())).token_hash
    async with single.autocommit() as db:
        await db.execute(_MOVE_INVITE, params)


@ON_SQLITE
async def test_a_ticket_asked_for_once_the_thread_has_closed_answers_503_unavailable(
    harness: Harness,
) -> None:
    """At shutdown the way in's thread closes while requests may still come:
    a batch scheduled then failed with the executor's RuntimeError ("cannot
    schedule new futures after shutdown"), a 500 internal_error with an
    "unhandled error" traceback, where every other statement of a server
    going away answers 503 unavailable."""
    setup = await new_consult(harness)
    thread = harness.app[DB_STATEMENTS]._sqlite
    assert thread is not None
    await thread.close()
    assert await _ticket_answer(harness, setup.invite_token) == (503, "unavailable")


@ON_SQLITE
async def test_a_read_sent_while_the_thread_closes_leaves_no_connection_open(
    harness: Harness,
) -> None:
    """A batch sent while ``SqliteThread.close`` runs (a request in the
    shutdown) was queued behind the close in the thread, and ``_run`` found
    no connection and opened a new one, which nobody closed: after
    ``close()`` returned, the thread still held an open SQLite connection,
    and the statement was answered instead of failing as a closed thread's
    statements do (503 unavailable). A closing thread refuses it now."""
    thread = harness.app[DB_STATEMENTS]._sqlite
    assert thread is not None
    # The thread busy a moment (another batch's statement, as in a storm).
    busy = threading.Event()
    held = asyncio.get_running_loop().run_in_executor(thread._thread, busy.wait, 5)
    closing = asyncio.create_task(thread.close())
    await asyncio.sleep(0)  # close() has sent _close to the thread
    late = asyncio.create_task(thread.first(sa.select(sa.literal(1)), {}, writes=False))
    await asyncio.sleep(0.05)  # its batch is sent, behind _close
    busy.set()
    await held
    await closing
    with contextlib.suppress(Exception):
        await late  # answered {'anon_1': 1}, though close() had begun
    assert thread._connection is None, "close() returned with a connection still open"
