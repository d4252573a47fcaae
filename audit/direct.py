"""Statements that each stand alone, run by asyncpg itself on PostgreSQL.

A patient's way in (issue 19's admission storm) is five statements, each
whole on its own: the invite checked and its first use noted (the ticket),
the invite checked again (the socket's door), the consult and its label read
(the waiting room), the consult started (``admit``). Through SQLAlchemy's
asyncio layer each cost about 550 µs of the event loop's CPU on a slow
machine (its pool checkout and return, the greenlet bridge around every
call, its result rows), where asyncpg's own prepared statement on a
connection at hand takes about 130, its round trip included.

So :class:`SingleStatements` runs them on asyncpg connections of its own, in
autocommit (as :func:`audit.db.autocommit` does), and on SQLite (no server,
no round trip, the default) on the engine as before. Each statement is a
SQLAlchemy Core statement compiled once (:class:`Prepared`), so the SQL is
the same on both paths. Its errors are raised as SQLAlchemy's
(:class:`sqlalchemy.exc.DBAPIError` around asyncpg's), so that every handler
that tells a database outage from a fault knows them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, cast

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.db import RETURN_WAIT_S, autocommit, reading

# Connections of its own that a node holds at most (besides the engine's
# POOL_SIZE). A statement holds one for a round trip: ten carry thousands a
# second.
DIRECT_POOL_SIZE = 10
# How long a statement waits for a free connection before it fails as the
# engine's pool does (SQLAlchemy's default pool_timeout): answered 503.
ACQUIRE_TIMEOUT_S = 30.0
# Connection options that only SQLAlchemy's dialect takes, not asyncpg.connect.
_DIALECT_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")

_ASYNCPG = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


class Prepared:
    """A Core statement compiled once for asyncpg: its SQL (``$1``, ``$2``...)
    and the names of its parameters in that order. The values a statement
    fixes itself (``status == 'created'``) are kept; the caller gives the
    others by name, as asyncpg takes them (``uuid.UUID``, aware ``datetime``)."""

    __slots__ = ("_fixed", "_names", "clause", "sql")

    def __init__(self, clause: sa.Select[Any] | sa.Update) -> None:
        compiled = clause.compile(dialect=_ASYNCPG)
        self.clause = clause
        self.sql = compiled.string
        # A name used twice is one $n, listed once.
        self._names = list(compiled.positiontup or ())
        self._fixed = {name: value for name, value in compiled.params.items() if value is not None}

    def arguments(self, params: Mapping[str, object]) -> list[object]:
        """The values in the SQL's order; ``KeyError`` names one not given."""
        fixed = self._fixed
        return [fixed[name] if name in fixed else params[name] for name in self._names]


class Statements(Protocol):
    """Where one statement at a time runs."""

    async def first(
        self, statement: Prepared, params: Mapping[str, object]
    ) -> Mapping[str, Any] | None:
        """The statement's first row (by column name), or None without one."""
        ...

    async def execute(self, statement: Prepared, params: Mapping[str, object]) -> None:
        """Run a statement that returns no rows."""
        ...


class OnConnection:
    """:class:`Statements` on a SQLAlchemy connection: SQLite, or a caller's
    own transaction."""

    __slots__ = ("connection",)

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def first(
        self, statement: Prepared, params: Mapping[str, object]
    ) -> Mapping[str, Any] | None:
        row = (await self.connection.execute(statement.clause, dict(params))).first()
        return None if row is None else cast(Mapping[str, Any], row._mapping)

    async def execute(self, statement: Prepared, params: Mapping[str, object]) -> None:
        await self.connection.execute(statement.clause, dict(params))


class _OnAsyncpg:
    __slots__ = ("_connection",)

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    async def first(
        self, statement: Prepared, params: Mapping[str, object]
    ) -> Mapping[str, Any] | None:
        arguments = statement.arguments(params)
        try:
            row: asyncpg.Record | None = await self._connection.fetchrow(statement.sql, *arguments)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            raise _as_sqlalchemy_error(err, statement.sql, self._connection) from err
        # A Record is read by column name as SQLAlchemy's row mapping is.
        return row

    async def execute(self, statement: Prepared, params: Mapping[str, object]) -> None:
        arguments = statement.arguments(params)
        try:
            await self._connection.execute(statement.sql, *arguments)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            raise _as_sqlalchemy_error(err, statement.sql, self._connection) from err


def _as_sqlalchemy_error(
    err: Exception, sql: str, connection: asyncpg.Connection | None
) -> sa.exc.DBAPIError:
    # hide_parameters: no value (an invite's hash, an id) in a message or a log.
    return sa.exc.DBAPIError(
        sql,
        None,
        err,
        hide_parameters=True,
        connection_invalidated=connection is not None and connection.is_closed(),
    )


class _Connections:
    """asyncpg connections kept open for single statements, at most ``size``.

    Not asyncpg's ``Pool``: its acquire with a timeout runs in a task of its
    own (``wait_for``) and its release in another (``shield``), which cost
    more than the statement (py-spy on the storm: 8 % of the loop); here a
    free connection is taken and given back without a task, and only a wait
    for one is bounded. A connection the server closed (a restart, an idle
    timeout) is found closed without a round trip and made again.
    """

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int) -> None:
        self._connect = connect
        self._size = size
        self._idle: list[asyncpg.Connection] = []
        self._in_use: set[asyncpg.Connection] = set()
        # Open or being opened, in use or not: never more than size.
        self._count = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        # Set once closed and every connection in use has come back.
        self._all_back = asyncio.Event()

    def all(self) -> list[asyncpg.Connection]:
        return [*self._idle, *self._in_use]

    async def acquire(self, timeout_s: float) -> asyncpg.Connection:
        if self._closed:
            closed = asyncpg.InterfaceError("the connections for single statements are closed")
            raise _as_sqlalchemy_error(closed, "(connect)", None)
        while True:
            while self._idle:
                connection = self._idle.pop()
                if not connection.is_closed():
                    self._in_use.add(connection)
                    return connection
                self._count -= 1
            if self._count < self._size:
                self._count += 1
                try:
                    connection = await self._connect()
                except BaseException:
                    self._count -= 1
                    self._wake_one()
                    raise
                self._in_use.add(connection)
                return connection
            await self._wait(timeout_s)

    async def _wait(self, timeout_s: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but leaving: the next one goes instead
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, connection: asyncpg.Connection, *, broken: bool = False) -> None:
        """Give ``connection`` back; ``broken``: its state is unknown (a
        statement was cancelled midway), so it goes."""
        self._in_use.discard(connection)
        # Statements here never leave a transaction open; one that did (a bug)
        # must not reach the next user either.
        if broken or self._closed or connection.is_closed() or connection.is_in_transaction():
            self._count -= 1
            connection.terminate()
        else:
            self._idle.append(connection)
        self._wake_one()
        if self._closed and not self._in_use:
            self._all_back.set()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self, wait_s: float) -> int:
        """Close the idle connections, and those in use once they come back
        (up to ``wait_s``); returns how many were still in use then (ended)."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._count -= len(idle)
        for connection in idle:
            await _close(connection)
        if self._in_use:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._all_back.wait()
        left = list(self._in_use)
        for connection in left:
            connection.terminate()
        return len(left)


async def _close(connection: asyncpg.Connection) -> None:
    try:
        await connection.close(timeout=1.0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        connection.terminate()


class SingleStatements:
    """Where a patient's way in runs its statements: asyncpg connections of
    its own on PostgreSQL, ``engine`` on SQLite. Made by :meth:`open`, closed
    by :meth:`close`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._connections: _Connections | None = None
        self._query_loggers: list[Callable[[Any], None]] = []

    @classmethod
    async def open(
        cls, engine: AsyncEngine, *, connect_timeout_s: float, size: int = DIRECT_POOL_SIZE
    ) -> SingleStatements:
        """Ready for ``engine``'s database; nothing is connected until the
        first statement, as with the engine (an unreachable database stops no
        start)."""
        single = cls(engine)
        if engine.dialect.name != "postgresql":
            return single
        _args, options = engine.dialect.create_connect_args(engine.url)
        for name in _DIALECT_ONLY:
            options.pop(name, None)

        async def connect() -> asyncpg.Connection:
            try:
                connection = await asyncpg.connect(**options, timeout=connect_timeout_s)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as err:
                raise _as_sqlalchemy_error(err, "(connect)", None) from err
            for logger in single._query_loggers:
                connection.add_query_logger(logger)
            return connection

        single._connections = _Connections(connect, size)
        return single

    def add_query_logger(self, logger: Callable[[Any], None]) -> None:
        """Have ``logger`` called with each statement run here from now on
        (asyncpg's ``LoggedQuery``; tests count an admission's statements)."""
        self._query_loggers.append(logger)
        for connection in self._connections.all() if self._connections else ():
            connection.add_query_logger(logger)

    def remove_query_logger(self, logger: Callable[[Any], None]) -> None:
        """Stop calling ``logger``."""
        self._query_loggers.remove(logger)
        for connection in self._connections.all() if self._connections else ():
            connection.remove_query_logger(logger)

    @property
    def direct(self) -> bool:
        """Whether statements go to asyncpg connections of their own (PostgreSQL)."""
        return self._connections is not None

    async def close(self, *, wait_s: float = RETURN_WAIT_S) -> int:
        """Close the connections, waiting up to ``wait_s`` for those in use;
        returns how many were still in use then."""
        if self._connections is None:
            return 0
        return await self._connections.close(wait_s)

    def reading(self) -> AbstractAsyncContextManager[Statements]:
        """For statements that only read (on SQLite: no write lock)."""
        return self._session(writes=False)

    def autocommit(self) -> AbstractAsyncContextManager[Statements]:
        """For statements that each write whole on their own (on SQLite: one
        transaction with its write lock from the start, as
        :func:`audit.db.autocommit`)."""
        return self._session(writes=True)

    @asynccontextmanager
    async def _session(self, *, writes: bool) -> AsyncIterator[Statements]:
        connections = self._connections
        if connections is None:
            opened = autocommit(self.engine) if writes else reading(self.engine)
            async with opened as connection:
                yield OnConnection(connection)
            return
        direct = await connections.acquire(ACQUIRE_TIMEOUT_S)
        try:
            yield _OnAsyncpg(direct)
        except asyncio.CancelledError:
            # Perhaps midway through a statement (a socket gone while its door
            # was checked): asyncpg's state for it is unknown, so no reuse.
            connections.release(direct, broken=True)
            raise
        except BaseException:
            connections.release(direct)
            raise
        connections.release(direct)
