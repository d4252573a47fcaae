"""The database engine: SQLite by default, PostgreSQL when configured.

Both run SQLAlchemy's asyncio engine. On SQLite the driver is told to leave
transactions to SQLAlchemy, so that schema changes are transactional there
too: a failed migration leaves no half-created schema on either backend.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from audit import sqlite_writers
from audit.errors import DatabaseUnavailable
from config import Settings

SQLITE_FILE_NAME = "videoconsult.db"
# Connections a node holds at most. All of them stay open once made: with
# SQLAlchemy's default (5 kept, 10 more for a burst, each closed when given
# back) every request of a burst beyond the fifth at once made a connection
# and closed it again (issue 19: a quarter of a storm's ticket request).
POOL_SIZE = 15
# A connection's execution option: its transactions only read (see reading()).
_READ_ONLY = "videoconsult_read_only"


def database_url(settings: Settings, data_dir: Path) -> URL:
    """Return the configured URL, or the SQLite file in ``data_dir``."""
    if settings.database.url:
        return make_url(settings.database.url)
    return make_url(f"sqlite+aiosqlite:///{data_dir / SQLITE_FILE_NAME}")


def _queued_writers(url: URL) -> URL:
    # aiosqlite with this process's writers queued (audit/sqlite_writers.py).
    if url.drivername == "sqlite+aiosqlite":
        return url.set(drivername=f"sqlite+{sqlite_writers.DRIVER}")
    return url


def describe_url(url: URL) -> str:
    """Render ``url`` for a message: no password, no driver noise."""
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)


def create_engine(url: URL, *, connect_timeout_s: float) -> AsyncEngine:
    """Create the async engine for ``url`` (nothing is connected yet)."""
    # asyncpg: how long to wait for the connection; sqlite3: for a lock.
    connect_args: dict[str, Any] = {"timeout": connect_timeout_s}
    # hide_parameters: a failing statement's error never carries the values
    # (addresses, names) into a log or a message.
    engine = create_async_engine(
        _queued_writers(url),
        connect_args=connect_args,
        hide_parameters=True,
        pool_size=POOL_SIZE,
        max_overflow=0,
    )
    if url.get_backend_name() == "sqlite":
        _make_sqlite_transactional(engine)
    else:
        _drop_closed_connections(engine)
    return engine


def _drop_closed_connections(engine: AsyncEngine) -> None:
    # Instead of SQLAlchemy's pre-ping, which costs three round trips per
    # checkout with asyncpg (BEGIN, an empty query, ROLLBACK): a pooled
    # connection that the server closed (a restart, an idle timeout) is
    # found closed by asyncpg itself, with no round trip, and replaced. One
    # that breaks unnoticed (a network gone quiet) fails its statement; the
    # pool then drops every connection made before the failure.
    @sa.event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise sa.exc.DisconnectionError("the database closed this connection")


def set_up_sqlite_connection(dbapi_connection: Any) -> None:
    """Every SQLite connection of the application's: the driver leaves
    transactions to the caller, and foreign keys are checked."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # Deleted rows are overwritten with zeros, not left in free pages: a
    # destroyed key (a consult's label, a recording's data key) is then gone
    # from the file too, not only from the table.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _make_sqlite_transactional(engine: AsyncEngine) -> None:
    # The recipe from SQLAlchemy's SQLite dialect notes: pysqlite's own
    # transaction handling skips DDL, so it is switched off and SQLAlchemy
    # emits BEGIN itself. IMMEDIATE takes the write lock at the start: a
    # deferred transaction that reads and then writes gets "database is
    # locked" at once when another writer is busy, instead of waiting its turn.
    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        set_up_sqlite_connection(dbapi_connection)

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        # A read-only one sends no BEGIN: each of its statements is a
        # transaction of its own, holding SQLite's read lock only while it
        # runs, as PostgreSQL's autocommit reads do. A deferred BEGIN would
        # hold the lock to the end of the block, and a COMMIT waits for every
        # reader's lock: a read path waiting between its statements held up
        # every writer's COMMIT (tests/test_sqlite_writers.py).
        if connection.get_execution_options().get(_READ_ONLY, False):
            return
        # Writers take their turn in this process first (audit/sqlite_writers.py).
        writers = getattr(connection.dialect, "writers", None)
        if writers is not None:
            writers.enter(connection.connection)
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            if writers is not None:
                writers.leave(connection.connection)
            raise


# How long a shutdown waits for connections still in use (a room change the
# shutdown outlasted) before it closes the pool.
RETURN_WAIT_S = 5.0


async def close_engine(engine: AsyncEngine, *, wait_s: float = RETURN_WAIT_S) -> int:
    """Close ``engine``'s connections once those still in use come back.

    ``dispose()`` alone closes the idle ones only: a connection that a task
    still used went back afterwards into the pool that was let go, and nobody
    closed it (the garbage collector later found it open). Returns how many
    were still in use after ``wait_s``: those are left to their tasks.
    """
    pool = engine.pool
    in_use = pool.checkedout() if isinstance(pool, QueuePool) else 0
    deadline = asyncio.get_running_loop().time() + wait_s
    while in_use > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        in_use = pool.checkedout() if isinstance(pool, QueuePool) else 0
    await engine.dispose()
    return in_use


# How many rows of a large result are made into Python objects at a time
# (SQLAlchemy's conversion, a few microseconds a row) before the event loop
# gets its other work in: 500 rows hold it a few milliseconds.
ROWS_PER_TURN = 500


async def in_turns(result: sa.Result[Any] | sa.ScalarResult[Any]) -> AsyncIterator[list[Any]]:
    """A buffered result's rows (or scalars), :data:`ROWS_PER_TURN` at a time,
    the event loop free for its other work after each part (and what the
    caller did with it): for results whose size grows with what is stored
    (years of records), where ``.all()`` would hold the loop for the whole
    of the conversion at once."""
    for part in result.partitions(ROWS_PER_TURN):
        yield list(part)
        await asyncio.sleep(0)


async def all_rows(result: sa.Result[Any] | sa.ScalarResult[Any]) -> list[Any]:
    """Every row (or scalar) of a buffered result, made as :func:`in_turns` makes them."""
    return [row async for part in in_turns(result) for row in part]


def after_cursor(
    when: sa.ColumnElement[Any],
    ident: sa.ColumnElement[Any],
    cursor_when: Any,
    cursor_id: uuid.UUID,
) -> sa.ColumnElement[bool]:
    """The rows after the cursor's row in a list ordered by ``when``, latest
    first, and equal times by ``ident``: a page of a list read by key (the
    therapist's consults, their recordings), which new rows do not shift."""
    return sa.or_(when < cursor_when, sa.and_(when == cursor_when, ident > cursor_id))


@asynccontextmanager
async def reading(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reads that write nothing: every read-only path (a
    patient's admission, a join, the API's lists and details, /readyz).

    On PostgreSQL it runs in autocommit: no BEGIN and no ROLLBACK, two round
    trips fewer than ``engine.connect()``; each statement sees its own
    snapshot, as it does in a read-committed transaction (this engine's
    level), so several reads agree no less than they did in one. On SQLite
    it sends no BEGIN either: each statement is a transaction of its own,
    which takes no write lock and holds the read lock only while it runs.
    Reads go side by side, and beside a writer, and a writer's COMMIT (which
    waits for every reader) never waits for a read path between its
    statements. Writing through it is a mistake.
    """
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        else:
            await conn.execution_options(**{_READ_ONLY: True})
        yield conn


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for statements that are each whole on their own (a read,
    a write in one statement): a patient's ticket, a consult's start.

    On PostgreSQL every statement commits by itself: no BEGIN and no COMMIT,
    two round trips fewer than ``engine.begin()``, with the same guarantees
    as a read-committed transaction's statements one after the other (each
    sees its own snapshot; nothing ties them together). On SQLite, where a
    BEGIN costs no round trip, one transaction as ``engine.begin()``: its
    write lock from the start. Statements that must stand or fall together
    belong in ``engine.begin()``.
    """
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn
    else:
        async with engine.begin() as conn:
            yield conn


async def check_connection(engine: AsyncEngine, *, timeout_s: float) -> None:
    """Run ``SELECT 1``; raise :class:`DatabaseUnavailable` naming the cause.

    The exception's ``reason`` is one of a few fixed phrases, fit to show to
    anyone (``/readyz``); its message adds the URL and the driver's words.
    """
    try:
        async with asyncio.timeout(timeout_s):
            # A read: on SQLite it waits for no writer (a long purge would
            # make the database look unreachable to /readyz).
            async with reading(engine) as connection:
                await connection.execute(sa.text("SELECT 1"))
    except TimeoutError:
        reason = detail = f"no answer within {timeout_s:g} s"
    except (OSError, ValueError, TypeError, sa.exc.SQLAlchemyError) as err:
        reason, detail = _classify(err), first_line(err)
    else:
        return
    raise DatabaseUnavailable(
        f"cannot reach the database at {describe_url(engine.url)}: {detail}", reason=reason
    )


# PostgreSQL's SQLSTATE codes for the failures a person can act on.
_SQLSTATE_REASONS = {
    "28P01": "login refused (wrong password)",
    "28000": "login refused",
    "3D000": "database does not exist",
    "57P03": "database is starting up or shutting down",
    "53300": "too many connections",
}


def _classify(err: BaseException) -> str:
    for cause in _chain(err):
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate in _SQLSTATE_REASONS:
            return _SQLSTATE_REASONS[sqlstate]
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name not found"
        if isinstance(cause, OSError):
            return "network error"
        if isinstance(cause, ValueError | TypeError):
            return "the database URL is not usable"
    return "database error"


# SQLSTATE classes and codes that mean the database is away, not that the
# request was wrong: connection exceptions, and the server shutting down,
# restarting or out of connections.
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def is_outage(err: BaseException) -> bool:
    """Whether ``err`` says the database cannot be reached now (refused,
    dropped, timed out, shutting down), as opposed to a bug or a bad query."""
    if isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated:
        return True
    for cause in _chain(err):
        # Connections refused, reset or timed out, a name that does not
        # resolve; not any OSError (a full disk is no database outage).
        if isinstance(
            cause, ConnectionError | TimeoutError | sa.exc.TimeoutError | socket.gaierror
        ):
            return True
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_OUTAGE_SQLSTATES):
            return True
        if type(cause).__name__ in {"ConnectionDoesNotExistError", "InterfaceError"} and (
            "closed" in str(cause) or "connection" in str(cause).lower()
        ):
            return True
    return False


def is_refused_value(err: BaseException) -> bool:
    """Whether ``err`` is the database refusing the values themselves (a data
    exception or a broken constraint: SQLSTATE classes 22 and 23), or the
    driver failing to convert one: the same statement fails again with the
    same values, whether or not the database is there."""
    if isinstance(err, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    for cause in _chain(err):
        if isinstance(cause, sqlite3.DataError | sqlite3.IntegrityError):
            return True
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(("22", "23")):
            return True
    # A bind value that could not be converted (SQLAlchemy's StatementError
    # around the conversion's own error, before anything was sent).
    return type(err) is sa.exc.StatementError and isinstance(err.orig, ValueError | TypeError)


def is_busy(err: BaseException) -> bool:
    """Whether ``err`` is SQLite's "database is locked": another connection
    held the write lock for longer than this one was willing to wait."""
    return any(
        isinstance(cause, sqlite3.OperationalError) and str(cause) == "database is locked"
        for cause in _chain(err)
    )


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return seen


def first_line(err: BaseException) -> str:
    """The first line of the innermost driver error, without SQL or links."""
    innermost = _chain(err)[-1]
    lines = str(innermost).strip().splitlines()
    return (lines[0] if lines else type(innermost).__name__)[:300]


async def save_organisation_row(
    conn: AsyncConnection,
    table: sa.Table,
    organisation_id: uuid.UUID,
    values: Mapping[str, object],
) -> None:
    """Set an organisation's one row of ``table`` (keyed by ``organisation_id``)
    to ``values``, making it when the organisation has none yet. Two first
    saves at once: the second's insert fails on the key, and it updates."""
    where = table.c.organisation_id == organisation_id
    updated = await conn.execute(table.update().where(where).values(**values))
    if updated.rowcount:
        return
    try:
        async with conn.begin_nested():
            await conn.execute(table.insert().values(organisation_id=organisation_id, **values))
    except sa.exc.IntegrityError:
        await conn.execute(table.update().where(where).values(**values))
