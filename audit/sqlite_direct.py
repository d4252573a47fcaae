"""A patient's way in on the embedded SQLite: one thread, one plain connection.

Through SQLAlchemy's asyncio layer a statement on SQLite costs about 1.1 ms
of CPU (measured 2026-12-07: the pool's checkout and return, the greenlet
bridge, and aiosqlite's four or so hops to its thread and back for a cursor,
the statement, its rows and the cursor's close), five times what the same
Core statement costs on a plain SQLAlchemy connection in a thread of its own
(about 200 µs, its hop included). Issue 19's admission storm on SQLite, the
default, spent 10 ms of the server's CPU per admission on its five or so
statements.

So :class:`SqliteThread` runs the way in's statements (:mod:`audit.direct`)
in one thread of its own, on a synchronous connection to the same file with
the same settings as the engine's (the same dialect, so the same types in
and out). The calls made within one turn of the event loop go to the
thread together: the reads in one hop, each a transaction of its own; the
writes in one transaction (a group commit), each in a savepoint of its own
so that one the database refuses fails alone, as on PostgreSQL's direct
path each statement stands alone. A batch of writes takes this process's
turn to write (:mod:`audit.sqlite_writers`) first, as every write of the
engine does, and gives it back once its ``COMMIT`` is done. When SQLite
rolls back the whole transaction itself (a full disk), every write of the
batch fails with that error: none of them is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from audit.db import set_up_sqlite_connection
from audit.sqlite_writers import WriterQueue

# How long a closing waits for the batches on their way (as audit/db.py's).
RETURN_WAIT_S = 5.0


class SqliteThread:
    """Single statements on one SQLite file, in a thread of their own."""

    def __init__(self, url: URL, writers: WriterQueue, *, busy_timeout_s: float) -> None:
        self._engine = sa.create_engine(
            url.set(drivername="sqlite+pysqlite"),
            # Made and used in the one thread below only; closed there too.
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
            poolclass=NullPool,
            hide_parameters=True,
        )
        sa.event.listen(self._engine, "connect", _on_connect)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="videoconsult-sqlite")
        self._connection: sa.Connection | None = None
        self._writers = writers
        self._query_loggers: list[Callable[[Any], None]] = []
        # The calls waiting for the thread, and the batches on their way.
        self._reads: list[_Call] = []
        self._writes: list[_Call] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def engine(self) -> sa.Engine:
        """The synchronous engine of the thread's connection (tests listen to it)."""
        return self._engine

    def add_query_logger(self, logger: Callable[[Any], None]) -> None:
        """Have ``logger`` called, in the event loop, with each statement sent
        from now on (a :class:`LoggedStatement`, as asyncpg's ``LoggedQuery``)."""
        self._query_loggers.append(logger)

    def remove_query_logger(self, logger: Callable[[Any], None]) -> None:
        """Stop calling ``logger``."""
        self._query_loggers.remove(logger)

    async def first(
        self, clause: sa.Executable, params: Mapping[str, object], *, writes: bool
    ) -> Mapping[str, Any] | None:
        """The statement's first row (by column name), or None; ``writes``:
        in a write transaction, in this process's turn to write.

        The calls made within one turn of the event loop go together (for
        writes, also those that come while the batch waits for its turn): the
        reads in one hop, the writes in one transaction (one ``COMMIT`` for all: a group
        commit), each write in a savepoint of its own, so that one that fails
        fails alone."""
        if self._closing:
            raise _closed()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Mapping[str, Any] | None] = loop.create_future()
        pending = self._writes if writes else self._reads
        pending.append((clause, params, answer))
        if len(pending) == 1:
            loop.call_soon(self._flush, writes)
        return await answer

    def _flush(self, writes: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._run_batch(writes))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, writes: bool) -> None:
        loop = asyncio.get_running_loop()
        turn = object()
        if writes:
            try:
                # What comes meanwhile joins this batch.
                await self._writers.take(turn)
            except BaseException as err:
                _fail(self._taken(writes), err)
                _reraise_if_cancelled(err)
                return
        calls = self._taken(writes)
        if self._query_loggers:
            # As the thread sends them.
            if writes:
                self._log_text("BEGIN IMMEDIATE")
            for clause, _params, _answer in calls:
                self._log(clause)
        try:
            done = loop.run_in_executor(self._thread, self._run, calls, writes)
        except BaseException as err:  # the thread closed: the server is going away
            self._end_turn(turn, writes)
            # Answered as every statement of a server going away: 503 unavailable.
            _fail(calls, _closed() if isinstance(err, RuntimeError) else err)
            _reraise_if_cancelled(err)
            return
        try:
            # Not cancelled with this task (the loop closing): the COMMIT may
            # be under way, and the turn goes back when the thread is done.
            outcomes = await asyncio.shield(done)
        except asyncio.CancelledError as err:
            done.add_done_callback(lambda _done: self._end_turn(turn, writes))
            _fail(calls, err)
            raise
        except BaseException as err:
            # Each caller has the error; this task ends quietly.
            self._end_turn(turn, writes)
            _fail(calls, err)
            _reraise_if_cancelled(err)
            return
        self._end_turn(turn, writes)
        for (_clause, _params, answer), (row, error) in zip(calls, outcomes, strict=True):
            if answer.done():  # its caller gone
                continue
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(row)

    def _end_turn(self, turn: object, writes: bool) -> None:
        if writes:
            self._writers.leave(turn)

    def _taken(self, writes: bool) -> list[_Call]:
        calls = self._writes if writes else self._reads
        if writes:
            self._writes = []
        else:
            self._reads = []
        return calls

    async def close(self) -> None:
        """Close the connection (in its thread) and the thread; once."""
        if self._closing:
            return
        self._closing = True
        if self._batches:
            await asyncio.wait(self._batches, timeout=RETURN_WAIT_S)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=False)
        self._engine.dispose()

    def _run(self, calls: list[_Call], writes: bool) -> list[_Outcome]:
        connection = self._connection
        if connection is None:
            if self._closing:  # sent before the close, run after it
                raise _closed()
            connection = self._connection = self._engine.connect().execution_options(
                isolation_level="AUTOCOMMIT"
            )
        outcomes: list[_Outcome] = []
        try:
            if writes:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            for clause, params, _answer in calls:
                outcomes.append(_one(connection, clause, params, writes=writes))
            if writes:
                connection.exec_driver_sql("COMMIT")
        except BaseException as err:
            if isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated:
                self._close()  # the next batch connects again
            elif writes and _in_transaction(connection):
                connection.exec_driver_sql("ROLLBACK")
            raise
        return outcomes

    def _log(self, clause: sa.Executable) -> None:
        self._log_text(str(clause.compile(dialect=self._engine.dialect)))  # type: ignore[attr-defined]

    def _log_text(self, query: str) -> None:
        for logger in list(self._query_loggers):
            logger(LoggedStatement(query))

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError, sqlite3.Error):
                connection.close()


_Row = Mapping[str, Any] | None
_Call = tuple[sa.Executable, Mapping[str, object], "asyncio.Future[_Row]"]
# A call's row, or the error it alone met.
_Outcome = tuple[_Row, BaseException | None]


def _one(
    connection: sa.Connection, clause: sa.Executable, params: Mapping[str, object], *, writes: bool
) -> _Outcome:
    if writes:
        connection.exec_driver_sql("SAVEPOINT one_call")
    try:
        result = connection.execute(clause, dict(params))
        row = result.first() if result.returns_rows else None
    except sa.exc.StatementError as err:  # the database's refusal, or a value's
        if isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated:
            raise
        if writes:
            if not _in_transaction(connection):
                # SQLite rolled back the whole transaction (a full disk, an I/O
                # error): the batch's writes before it are gone too.
                raise
            connection.exec_driver_sql("ROLLBACK TO one_call")
            connection.exec_driver_sql("RELEASE one_call")
        return None, err
    if writes:
        connection.exec_driver_sql("RELEASE one_call")
    return (None if row is None else cast(Mapping[str, Any], row._mapping)), None


def _closed() -> sa.exc.OperationalError:
    """What a statement sent after the thread closed fails with: the
    connection gone, as a database going away (``audit.db.is_outage``)."""
    return sa.exc.OperationalError(
        "(the way in's SQLite thread)",
        None,
        sqlite3.OperationalError("the database connection is closed: the server is shutting down"),
        connection_invalidated=True,
    )


def _fail(calls: list[_Call], err: BaseException) -> None:
    for _clause, _params, answer in calls:
        if not answer.done():
            if isinstance(err, asyncio.CancelledError):
                answer.cancel()
            else:
                answer.set_exception(err)


def _in_transaction(connection: sa.Connection) -> bool:
    try:
        dbapi_connection = connection.connection.dbapi_connection
    except sa.exc.SQLAlchemyError:  # invalidated: nothing of it is open
        return False
    return bool(getattr(dbapi_connection, "in_transaction", False))


def _reraise_if_cancelled(err: BaseException) -> None:
    if isinstance(err, asyncio.CancelledError):
        raise err


@dataclass(frozen=True, slots=True)
class LoggedStatement:
    """A statement as a query logger sees it."""

    query: str


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    # As the engine's connections.
    set_up_sqlite_connection(dbapi_connection)
