"""Writers on the embedded SQLite take turns in arrival order (audit/sqlite_writers.py).

Found by the admission storm on SQLite (issue 19, 2026-12-07): the benchmark's
setup makes its consults 32 at once, and some of them failed with a 500,
"database is locked": SQLite's busy timeout is a retry loop in each
connection's thread, with no queue, so one writer can lose every race for
the timeout's whole length. A failure under load is also no reason for a
500 with a traceback in the process log: the database is busy, not broken.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import create_engine
from audit.clock import ManualClock
from audit.db import reading
from server import create_app
from server.process_log import configure_process_logging
from tests.support.cli import sqlite_write_lock_held
from tests.support.databases import copy_sqlite_template
from tests.support.harness import Harness, new_consult
from tests.support.settings import SettingsFactory

# Each writer holds the write lock this long: an event loop busy with other
# requests between a transaction's statements, as under a burst.
HOLD_S = 0.05
WRITERS = 12
# What each writer is willing to wait in SQLite's own busy timeout: far less
# than the WRITERS * HOLD_S the last of them waits for its turn.
BUSY_TIMEOUT_S = 0.2


@asynccontextmanager
async def table_t(
    tmp_path: Path, columns: str, *, busy_timeout_s: float
) -> AsyncIterator[AsyncEngine]:
    """An engine on a SQLite file of its own with one table, ``t``."""
    engine = create_engine(
        make_url(f"sqlite+aiosqlite:///{tmp_path / 'writers.db'}"), connect_timeout_s=busy_timeout_s
    )
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f"CREATE TABLE t ({columns})")
        yield engine
    finally:
        await engine.dispose()


async def cancelled_while_it_runs(engine: AsyncEngine, statement: str) -> None:
    """A write transaction (one row written) cancelled while ``statement``, a
    slow one, runs in aiosqlite's thread."""
    started = asyncio.Event()

    async def transaction() -> None:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            started.set()
            await conn.exec_driver_sql(statement)

    task = asyncio.create_task(transaction())
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_burst_of_writers_all_commit_each_in_its_turn(tmp_path: Path) -> None:
    async with table_t(
        tmp_path, "writer INTEGER, step INTEGER", busy_timeout_s=BUSY_TIMEOUT_S
    ) as engine:

        async def writer(n: int) -> None:
            async with engine.begin() as conn:
                await conn.exec_driver_sql("INSERT INTO t VALUES (?, 1)", (n,))
                await asyncio.sleep(HOLD_S)
                await conn.exec_driver_sql("INSERT INTO t VALUES (?, 2)", (n,))

        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(writer(n) for n in range(WRITERS)), return_exceptions=True
        )
        took = time.monotonic() - started
        failed = [repr(outcome) for outcome in outcomes if outcome is not None]
        assert failed == [], f"{len(failed)} of {WRITERS} writers failed: {failed[:2]}"
        async with engine.connect() as conn:
            rows = (await conn.exec_driver_sql("SELECT writer, step FROM t ORDER BY rowid")).all()
        # One transaction after the other: each writer's two rows side by side.
        assert [tuple(row) for row in rows[0::2]] == [(row[0], 1) for row in rows[0::2]]
        assert [tuple(row) for row in rows[1::2]] == [(row[0], 2) for row in rows[0::2]]
        assert sorted(row[0] for row in rows) == sorted(list(range(WRITERS)) * 2)
        assert took >= WRITERS * HOLD_S


async def test_a_cancelled_writer_lets_the_next_one_in(tmp_path: Path) -> None:
    async with table_t(tmp_path, "n INTEGER", busy_timeout_s=5) as engine:
        inside = asyncio.Event()

        async def stuck() -> None:
            async with engine.begin() as conn:
                await conn.exec_driver_sql("INSERT INTO t VALUES (1)")
                inside.set()
                await asyncio.Event().wait()  # a request whose client went away

        task = asyncio.create_task(stuck())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(2):
            async with engine.begin() as conn:
                await conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT n FROM t")).scalars().all() == [2]


async def test_a_writer_cancelled_in_the_middle_of_a_statement_lets_the_next_one_in(
    tmp_path: Path,
) -> None:
    """Cancelled while its statement runs (a request gone, the server shutting
    down), a transaction's connection is not rolled back but terminated: its
    turn must end with it, or every later write waits for the turn (seen: a
    server's shutdown that hung, its last writes waiting)."""
    async with table_t(tmp_path, "n INTEGER", busy_timeout_s=5) as engine:
        # A write that runs for about a second in aiosqlite's thread.
        await cancelled_while_it_runs(
            engine,
            "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL"
            " SELECT x + 1 FROM c WHERE x < 2000000) SELECT x FROM c",
        )
        async with asyncio.timeout(10):
            async with engine.begin() as conn:
                await conn.exec_driver_sql("INSERT INTO t VALUES (-1)")
        async with engine.connect() as conn:
            # The cancelled transaction left nothing.
            assert (await conn.exec_driver_sql("SELECT n FROM t")).scalars().all() == [-1]


async def test_a_read_cancelled_inside_a_write_transaction_leaves_no_lock(
    tmp_path: Path,
) -> None:
    """A *read* cancelled while it runs inside a write transaction: its
    connection is terminated, and the unfinished statement kept the closed
    connection (and its transaction, SQLite's write lock) alive until the
    garbage collector freed the cursor. Every later write, of any process,
    got "database is locked" meanwhile. A write in its place did not (SQLite
    rolls back a write statement's transaction when it is stopped)."""
    async with table_t(tmp_path, "n INTEGER", busy_timeout_s=1) as engine:
        # A read that runs for seconds in aiosqlite's thread.
        await cancelled_while_it_runs(
            engine,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL"
            " SELECT x + 1 FROM c WHERE x < 20000000) SELECT count(*) FROM c",
        )
        # Another process's write, as the webhooks job's or a command's.
        other = sqlite3.connect(tmp_path / "writers.db", isolation_level=None, timeout=2)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO t VALUES (-2)")
            other.execute("COMMIT")
        finally:
            other.close()
        async with asyncio.timeout(10):
            async with engine.begin() as conn:
                await conn.exec_driver_sql("INSERT INTO t VALUES (-1)")
        async with engine.connect() as conn:
            # The cancelled transaction left nothing.
            rows = (await conn.exec_driver_sql("SELECT n FROM t ORDER BY n")).scalars().all()
            assert rows == [-2, -1]


async def test_a_write_lock_held_elsewhere_answers_503_database_busy(
    make_settings: SettingsFactory,
    sqlite_template: Path,
    data_dir: Path,
    clock: ManualClock,
    aiohttp_client: Any,
) -> None:
    """Another process (a command line's job) holds the write lock past the
    busy timeout: the request is refused as a busy database, to be tried
    again, and no traceback goes to the process log."""
    copy_sqlite_template(sqlite_template, data_dir)
    settings = make_settings(database_connect_timeout_s=0.3)
    app = create_app(settings, clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    await new_consult(harness)
    log = io.StringIO()
    configure_process_logging(level="info", log_format="json", stream=log)
    with sqlite_write_lock_held(data_dir):
        response = await harness.post("/api/consults", {})
        body = await response.json()
    assert response.status == 503, body
    assert body["error"]["code"] == "database_busy"
    assert response.headers["Retry-After"] == "2"
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    assert [line for line in lines if line.get("level") == "error"] == []
    busy = [line for line in lines if line.get("event") == "database busy"]
    assert len(busy) == 1, lines
    assert "exception" not in busy[0]
    # Once the lock is free, the same request goes through.
    assert (await harness.post("/api/consults", {})).status == 201


async def test_the_queue_is_only_for_writers(tmp_path: Path) -> None:
    """A reading transaction takes no turn: it goes on beside a writer."""
    async with table_t(tmp_path, "n INTEGER", busy_timeout_s=5) as engine:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        async with engine.begin() as writer:
            await writer.exec_driver_sql("UPDATE t SET n = 2")
            async with asyncio.timeout(2), reading(engine) as reader:
                assert (await reader.execute(sa.text("SELECT n FROM t"))).scalar_one() == 1


async def test_a_reader_between_its_statements_holds_up_no_commit(tmp_path: Path) -> None:
    """A read path that waits between its statements (an ``await`` for
    something else, its event loop busy) keeps no lock meanwhile, as on
    PostgreSQL: a writer's COMMIT, which on SQLite waits for every reader's
    lock, goes through at once. CI saw a COMMIT fail with "database is
    locked" after a reader held its lock for over 10 s (2026-12-07); while
    ``reading()`` was a deferred transaction, any such wait held it."""
    async with table_t(tmp_path, "n INTEGER", busy_timeout_s=0.3) as engine:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        async with reading(engine) as reader:
            assert (await reader.execute(sa.text("SELECT n FROM t"))).scalar_one() == 1
            async with asyncio.timeout(2), engine.begin() as writer:
                await writer.exec_driver_sql("UPDATE t SET n = 2")
            # Each statement sees what was committed before it, as on PostgreSQL.
            assert (await reader.execute(sa.text("SELECT n FROM t"))).scalar_one() == 2
