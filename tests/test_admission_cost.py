"""What a patient's admission costs the database (issue 19, goal 5: an
admission storm waited on the pool, about 20 round trips an admission).

Counted from the ticket request to ``admitted``, on SQLite and PostgreSQL:
the SQL statements (SQLAlchemy's cursor executes; on PostgreSQL those of
asyncpg's own pool, audit/direct.py, which asyncpg's query logger sees), and
on PostgreSQL also the engine's other round trips (BEGIN, COMMIT, ROLLBACK,
pings). Before this was measured: 8 statements (9 with the webhooks'
outbox), and on PostgreSQL 12 more round trips (a pre-ping of three per
checkout, four transactions' BEGIN and end); then 6 statements and 4 other
round trips. A change that adds one fails here and says which.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sqlalchemy import event

from server.app_keys import DB_ENGINE, DB_STATEMENTS
from server.background import JobName
from tests.support.databases import ASYNCPG_INTROSPECTION
from tests.support.harness import Harness, Sockets, new_consult, receive

# The periodic jobs' tasks are named after their jobs (server/background.py).
PERIODIC_JOBS = {job.value for job in JobName}


def _from_a_periodic_job() -> bool:
    """Whether the statement is a periodic job's, due meanwhile, not the
    admission's (the technical log's flush failed this test once on a busy
    host)."""
    task = asyncio.current_task()
    return task is not None and task.get_name() in PERIODIC_JOBS


async def test_an_admission_takes_five_statements_and_no_other_round_trip(harness: Harness) -> None:
    setup = await new_consult(harness)
    sockets = Sockets(harness)
    therapist = await sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    engine = harness.app[DB_ENGINE]
    single = harness.app[DB_STATEMENTS]
    # Connections made from here on: each gets the query logger.
    await engine.dispose()
    statements: list[str] = []
    through_engine: list[str] = []
    other_round_trips: list[str] = []

    def on_statement(statement: str, *, engine: bool) -> None:
        if not _from_a_periodic_job():
            statements.append(" ".join(statement.split())[:80])
            if engine:
                through_engine.append(statements[-1])

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        on_statement(statement, engine=True)

    def on_round_trip(record: Any) -> None:
        if not _from_a_periodic_job():
            other_round_trips.append(record.query)

    def on_direct(record: Any) -> None:
        on_statement(record.query, engine=False)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        if engine.dialect.name == "postgresql":
            dbapi_connection.driver_connection.add_query_logger(on_round_trip)

    event.listen(engine.sync_engine, "before_cursor_execute", on_execute)
    event.listen(engine.sync_engine, "connect", on_connect)
    single.add_query_logger(on_direct)
    try:
        patient = await sockets.patient(setup.invite_token)
        assert (await receive(patient, "welcome"))["state"] == "waiting"
        await receive(therapist, "patient-waiting")
        await therapist.send_json({"v": 1, "type": "admit"})
        await receive(patient, "admitted")
        await receive(therapist, "peer-joined")
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", on_execute)
        event.remove(engine.sync_engine, "connect", on_connect)
        single.remove_query_logger(on_direct)
        await sockets.close()
    # The ticket: the invite with its consult, and its first use noted; the
    # door: the invite with its consult again; the room: the consult; the
    # start: one UPDATE ... RETURNING, which starts the consult only when its
    # organisation has no webhook endpoint (none here: nothing goes to the
    # outbox, so no transaction is needed). (SQLite's BEGINs are statements too.)
    introspection = [s for s in statements if s.startswith(ASYNCPG_INTROSPECTION)]
    sql = [
        s
        for s in statements
        if not s.startswith("BEGIN") and not s.startswith(ASYNCPG_INTROSPECTION)
    ]
    # asyncpg looks up the array types of the batched reads (audit/direct.py)
    # once per connection, the first time one is used: here at most one
    # look-up (of three statements) for each of the two array types, on a
    # fresh node's first admission; none on a connection that knows them.
    assert len(introspection) <= 6, introspection
    assert len(sql) == 5, sql
    kinds = [s.split()[0] for s in sql]
    assert kinds == ["SELECT", "UPDATE", "SELECT", "SELECT", "UPDATE"], sql
    if engine.dialect.name == "postgresql":
        # Each statement commits on its own: no BEGIN, no COMMIT, no checkout
        # pings (before: BEGIN and COMMIT around the ticket's and the start's),
        # and none went through SQLAlchemy (its layers cost more than the
        # statement: audit/direct.py); asyncpg's pool resets nothing.
        assert single.direct
        assert through_engine == []
        assert other_round_trips == []
    else:
        # On SQLite's thread of their own (audit/sqlite_direct.py), none
        # through SQLAlchemy's asyncio layer: only the two writes take the
        # write lock, each in a transaction of its own; the reads take none.
        assert single.threaded
        assert through_engine == []
        begins = [s for s in statements if s.startswith("BEGIN")]
        assert begins == ["BEGIN IMMEDIATE", "BEGIN IMMEDIATE"], statements


async def test_a_storm_keeps_the_pools_connections(harness: Harness) -> None:
    """Connections made for a burst stay in the pool for the next one. With
    SQLAlchemy's default pool (5 kept, 10 more made for a burst and closed
    when given back), every admission of a storm beyond the fifth at once
    made a connection and closed it: a TCP connect, PostgreSQL's start-up
    and TLS attempt, its type introspection, every statement prepared again
    (py-spy: about a quarter of the ticket request's CPU; an aiosqlite
    connection is a thread). Held at once here as a storm holds them."""
    engine = harness.app[DB_ENGINE]
    made: list[object] = []

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        made.append(dbapi_connection)

    async def hold_at_once(n: int) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(n):
                await stack.enter_async_context(engine.connect())

    await hold_at_once(12)
    event.listen(engine.sync_engine, "connect", on_connect)
    try:
        await hold_at_once(12)
    finally:
        event.remove(engine.sync_engine, "connect", on_connect)
    assert len(made) == 0, f"{len(made)} connections made for the second burst"
