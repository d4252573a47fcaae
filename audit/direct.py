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
no round trip, the default) on a plain connection in a thread of their own
(:mod:`audit.sqlite_direct`: through the engine a statement cost five times
as much there). Each statement is a SQLAlchemy Core statement compiled once
(:class:`Prepared`), so the SQL is the same on every path. Its errors are raised as SQLAlchemy's
(:class:`sqlalchemy.exc.DBAPIError` around asyncpg's), so that every handler
that tells a database outage from a fault knows them.

Under load many patients ask at once, and each round trip costs the loop a
write and a read system call besides asyncpg's work. A statement marked
with a :data:`Batch` gathers the calls made within one turn of the event
loop and runs them as one: the reads of many keys as one ``= ANY(...)``
query (:class:`ByKey`), the writes as one pipelined ``executemany``
(:class:`AllAtOnce`). Each call still gets its own answer, checked by its
caller as before; a call alone in its turn waits one turn more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.connection_pool import ASYNCPG_ERRORS, ConnectionPool, as_sqlalchemy_error
from audit.db import RETURN_WAIT_S, autocommit, reading
from audit.sqlite_direct import SqliteThread

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

    __slots__ = ("_fixed", "_names", "batch", "clause", "sql")

    def __init__(self, clause: sa.Select[Any] | sa.Update, *, batch: Batch | None = None) -> None:
        compiled = clause.compile(dialect=_ASYNCPG)
        self.clause = clause
        # How its calls within one turn of the event loop go as one (asyncpg only).
        self.batch = batch
        self.sql = compiled.string
        # A name used twice is one $n, listed once.
        self._names = list(compiled.positiontup or ())
        self._fixed = {name: value for name, value in compiled.params.items() if value is not None}

    def arguments(self, params: Mapping[str, object]) -> list[object]:
        """The values in the SQL's order; ``KeyError`` names one not given."""
        fixed = self._fixed
        return [fixed[name] if name in fixed else params[name] for name in self._names]


class ByKey:
    """A statement by one key, batched: the calls within one turn of the event
    loop go as one statement, ``many``, which takes their keys as one array
    (``keys_param``) and returns each row with its key (``key_column``); each
    call gets the row of its key (``key_param``), or None. ``per_key`` names
    more arrays, each of one value per key (its first call's): array
    parameter → the call's parameter."""

    __slots__ = ("key_column", "key_param", "keys_param", "many", "per_key")

    def __init__(
        self,
        many: sa.Select[Any] | sa.Update,
        *,
        key_param: str,
        keys_param: str,
        key_column: str,
        per_key: Mapping[str, str] | None = None,
    ) -> None:
        self.many = Prepared(many)
        self.key_param, self.keys_param, self.key_column = key_param, keys_param, key_column
        self.per_key = dict(per_key or {})


class AllAtOnce:
    """A write that returns nothing, batched: the calls within one turn of the
    event loop go in one round trip (asyncpg's ``executemany``, pipelined and
    all or nothing)."""

    __slots__ = ()


Batch = ByKey | AllAtOnce


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


class SingleStatements:
    """Where a patient's way in runs its statements: asyncpg connections of
    its own on PostgreSQL, a thread of its own on a SQLite file, ``engine``
    otherwise (an in-memory SQLite). Made by :meth:`open`, closed by
    :meth:`close`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._connections: ConnectionPool | None = None
        # SQLite's file, when statements go to a thread of their own there.
        self._sqlite: SqliteThread | None = None
        self._query_loggers: list[Callable[[Any], None]] = []
        self._loop = asyncio.get_running_loop()
        # The calls of each batched statement waiting for this turn's batch.
        self._pending: dict[Prepared, _Pending] = {}
        self._batches: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls, engine: AsyncEngine, *, connect_timeout_s: float, size: int = DIRECT_POOL_SIZE
    ) -> SingleStatements:
        """Ready for ``engine``'s database; nothing is connected until the
        first statement, as with the engine (an unreachable database stops no
        start)."""
        single = cls(engine)
        writers = getattr(engine.dialect, "writers", None)
        if engine.dialect.name == "sqlite" and writers is not None and _is_file(engine):
            single._sqlite = SqliteThread(engine.url, writers, busy_timeout_s=connect_timeout_s)
            return single
        if engine.dialect.name != "postgresql":
            return single
        _args, options = engine.dialect.create_connect_args(engine.url)
        # The URL's cache size (0 behind pgbouncer's transaction mode) holds here too.
        cache_size = options.get("prepared_statement_cache_size")
        for name in _DIALECT_ONLY:
            options.pop(name, None)
        if cache_size is not None:
            options["statement_cache_size"] = cache_size

        async def connect() -> asyncpg.Connection:
            try:
                connection = await asyncpg.connect(**options, timeout=connect_timeout_s)
            except ASYNCPG_ERRORS as err:
                raise as_sqlalchemy_error(err, "(connect)", invalidated=False) from err
            for logger in single._query_loggers:
                connection.add_query_logger(logger)
            return connection

        single._connections = ConnectionPool(connect, size)
        return single

    def add_query_logger(self, logger: Callable[[Any], None]) -> None:
        """Have ``logger`` called with each statement run here from now on
        (asyncpg's ``LoggedQuery``, or its like on SQLite's thread; tests count
        an admission's statements)."""
        self._query_loggers.append(logger)
        if self._sqlite is not None:
            self._sqlite.add_query_logger(logger)
        for connection in self._connections.all() if self._connections else ():
            connection.add_query_logger(logger)

    def remove_query_logger(self, logger: Callable[[Any], None]) -> None:
        """Stop calling ``logger``."""
        self._query_loggers.remove(logger)
        if self._sqlite is not None:
            self._sqlite.remove_query_logger(logger)
        for connection in self._connections.all() if self._connections else ():
            connection.remove_query_logger(logger)

    @property
    def direct(self) -> bool:
        """Whether statements go to asyncpg connections of their own (PostgreSQL)."""
        return self._connections is not None

    @property
    def threaded(self) -> bool:
        """Whether statements go to a SQLite connection in a thread of their own."""
        return self._sqlite is not None

    @property
    def thread_engine(self) -> sa.Engine | None:
        """On SQLite, the synchronous engine of that thread's connection."""
        return None if self._sqlite is None else self._sqlite.engine

    async def close(self, *, wait_s: float = RETURN_WAIT_S) -> int:
        """Close the connections, waiting up to ``wait_s`` for those in use;
        returns how many were still in use then."""
        if self._sqlite is not None:
            await self._sqlite.close()
            return 0
        if self._connections is None:
            return 0
        if self._batches:
            await asyncio.wait(self._batches, timeout=wait_s)
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
        if self._sqlite is not None:
            yield _Threaded(self._sqlite, writes=writes)
            return
        if self._connections is None:
            opened = autocommit(self.engine) if writes else reading(self.engine)
            async with opened as connection:
                yield OnConnection(connection)
            return
        # No connection is held between statements: each takes one for its
        # round trip, or joins its turn's batch.
        yield _Direct(self)

    async def one(
        self, statement: Prepared, params: Mapping[str, object], *, rows: bool
    ) -> Mapping[str, Any] | None:
        """Run ``statement`` on a connection of its own: its first row (if
        ``rows``), or None."""
        arguments = statement.arguments(params)
        if rows:
            row: Mapping[str, Any] | None = await self._round_trip(
                statement.sql, lambda connection: connection.fetchrow(statement.sql, *arguments)
            )
            return row
        await self._round_trip(
            statement.sql, lambda connection: connection.execute(statement.sql, *arguments)
        )
        return None

    async def _round_trip(
        self, sql: str, call: Callable[[asyncpg.Connection], Awaitable[Any]]
    ) -> Any:
        connections = self._connections
        assert connections is not None
        connection = await connections.acquire(ACQUIRE_TIMEOUT_S)
        try:
            result = await call(connection)
        except asyncio.CancelledError:
            # Midway through the round trip (a socket gone while its door was
            # checked): asyncpg's state for it is unknown, so no reuse.
            connections.release(connection, broken=True)
            raise
        except ASYNCPG_ERRORS as err:
            # Whether the failure closed it, before release ends it anyway.
            invalidated = connection.is_closed()
            connections.release(connection)
            raise as_sqlalchemy_error(err, sql, invalidated=invalidated) from err
        except BaseException:
            connections.release(connection)
            raise
        connections.release(connection)
        return result

    async def batched(
        self, statement: Prepared, params: Mapping[str, object]
    ) -> Mapping[str, Any] | None:
        """Join ``statement``'s batch of this turn of the loop; its row, if any."""
        pending = self._pending.get(statement)
        if pending is None:
            pending = self._pending[statement] = _Pending()
            self._loop.call_soon(self._flush, statement)
        answer: asyncio.Future[Mapping[str, Any] | None] = self._loop.create_future()
        batch = statement.batch
        if isinstance(batch, ByKey):
            key = params[batch.key_param]
            if key not in pending.by_key:
                pending.by_key[key] = []
                pending.first_params[key] = params
            pending.by_key[key].append(answer)
        else:
            pending.calls.append((statement.arguments(params), answer))
        return await answer

    def _flush(self, statement: Prepared) -> None:
        pending = self._pending.pop(statement)
        task = self._loop.create_task(self._run(statement, pending))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run(self, statement: Prepared, pending: _Pending) -> None:
        batch = statement.batch
        try:
            if isinstance(batch, ByKey):
                many = batch.many
                # In one order (see below): a batch that writes locks its rows so.
                keys = sorted(pending.by_key, key=repr)
                values: dict[str, object] = {batch.keys_param: keys}
                for array, param in batch.per_key.items():
                    values[array] = [pending.first_params[key][param] for key in keys]
                arguments = many.arguments(values)
                rows = await self._round_trip(
                    many.sql, lambda connection: connection.fetch(many.sql, *arguments)
                )
                found = {row[batch.key_column]: row for row in rows}
                for key, answers in pending.by_key.items():
                    _answer(answers, found.get(key))
            else:
                # In one order, whatever the order of asking: two batches at once
                # (the next turn's, another node's) then lock the same rows in the
                # same order and cannot deadlock.
                calls = sorted((arguments for arguments, _answer_to in pending.calls), key=repr)
                await self._round_trip(
                    statement.sql, lambda connection: connection.executemany(statement.sql, calls)
                )
                _answer([answer for _arguments, answer in pending.calls], None)
        except asyncio.CancelledError:
            # The batch itself was cancelled (the loop shutting down): so are its calls.
            for answer in pending.answers():
                answer.cancel()
            raise
        except BaseException as err:
            for answer in pending.answers():
                if not answer.done():
                    answer.set_exception(err)


@dataclass
class _Pending:
    """The calls of one batched statement waiting for their batch."""

    by_key: dict[object, list[asyncio.Future[Mapping[str, Any] | None]]] = field(
        default_factory=dict
    )
    calls: list[tuple[list[object], asyncio.Future[Mapping[str, Any] | None]]] = field(
        default_factory=list
    )
    # ByKey: the parameters of each key's first call.
    first_params: dict[object, Mapping[str, object]] = field(default_factory=dict)

    def answers(self) -> list[asyncio.Future[Mapping[str, Any] | None]]:
        keyed = [answer for answers in self.by_key.values() for answer in answers]
        return [*keyed, *(answer for _arguments, answer in self.calls)]


def _answer(
    answers: list[asyncio.Future[Mapping[str, Any] | None]], row: Mapping[str, Any] | None
) -> None:
    for answer in answers:
        if not answer.done():  # not cancelled meanwhile (its request gone)
            answer.set_result(row)


class _Direct:
    """:class:`Statements` on asyncpg connections (see :class:`SingleStatements`)."""

    __slots__ = ("_single",)

    def __init__(self, single: SingleStatements) -> None:
        self._single = single

    async def first(
        self, statement: Prepared, params: Mapping[str, object]
    ) -> Mapping[str, Any] | None:
        if statement.batch is not None:
            return await self._single.batched(statement, params)
        return await self._single.one(statement, params, rows=True)

    async def execute(self, statement: Prepared, params: Mapping[str, object]) -> None:
        if statement.batch is not None:
            await self._single.batched(statement, params)
        else:
            await self._single.one(statement, params, rows=False)


class _Threaded:
    """:class:`Statements` on SQLite's thread (see :class:`SqliteThread`):
    each read on its own; the writes of one turn in one transaction, each in
    a savepoint of its own."""

    __slots__ = ("_sqlite", "_writes")

    def __init__(self, sqlite: SqliteThread, *, writes: bool) -> None:
        self._sqlite, self._writes = sqlite, writes

    async def first(
        self, statement: Prepared, params: Mapping[str, object]
    ) -> Mapping[str, Any] | None:
        # A read takes no write lock, in a session that writes too.
        writes = self._writes and not statement.clause.is_select
        return await self._sqlite.first(statement.clause, params, writes=writes)

    async def execute(self, statement: Prepared, params: Mapping[str, object]) -> None:
        await self.first(statement, params)


def _is_file(engine: AsyncEngine) -> bool:
    # An in-memory database is one per connection: only the engine's own.
    database = engine.url.database
    return (
        bool(database) and database != ":memory:" and not str(database).startswith("file::memory")
    )
