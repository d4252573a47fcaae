"""SQLite's writers of one process, let in one at a time in the order they came.

SQLite has one write lock per file. A connection that finds it taken sleeps
in its own thread and tries again (the driver's busy timeout), with no queue:
under a burst of writes (32 consults made at once, issue 19) a writer can
lose every race for the timeout's whole length and fail with "database is
locked" while the others get through. The writers of this process therefore
queue in the event loop, first come first served, and a writer's
``BEGIN IMMEDIATE`` is sent only when the one before has committed or rolled
back. The busy timeout is left for other processes (the command line's
jobs), which the queue does not see.

The dialect is SQLAlchemy's aiosqlite one with the queue's exits added where
a transaction ends: after the commit or the rollback, and when a connection
is closed or terminated (a cancelled request's connection is rolled back,
closed or terminated by the pool, so the queue never stays held by a writer
that went away). A terminated connection's statement is stopped and its
transaction rolled back first, so that SQLite's lock goes with it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet

# The URL's driver name for the dialect below (``sqlite+<this>``).
DRIVER = "aiosqlite_queued"
# How long a writer waits for its turn at most, as a connection waits for the
# pool (SQLAlchemy's default): past it, the database is busy, not locked up.
TURN_WAIT_S = 30.0


class WriterQueue:
    """This process's write transactions on one SQLite file, one at a time."""

    def __init__(self, wait_s: float = TURN_WAIT_S) -> None:
        self._wait_s = wait_s
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The DB-API connection whose transaction holds the turn.
        self._holder: Any = None

    def enter(self, connection: Any) -> None:
        """Wait for the turn (from SQLAlchemy's greenlet); ``database is
        locked`` after ``wait_s``, as SQLite says it."""
        dbapi_connection = _unwrapped(connection)
        if self._holder is dbapi_connection:  # its own transaction never ended
            return
        await_(self.take(dbapi_connection))

    async def take(self, owner: object) -> None:
        """Wait for the turn, for ``owner`` (a transaction's own token, given
        to :meth:`leave`); SQLAlchemy's ``OperationalError`` around SQLite's
        ``database is locked`` after ``wait_s``."""
        await self._acquire()
        self._holder = owner

    def leave(self, connection: Any) -> None:
        """Let the next writer in, if ``connection`` (or the owner given to
        :meth:`take`) holds the turn."""
        if self._holder is not _unwrapped(connection):
            return
        self._holder = None
        lock, loop = self._lock, self._loop
        assert lock is not None
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            lock.release()
        elif not loop.is_closed():
            # The pool closing a connection it found abandoned, from the
            # garbage collector, in whatever thread that runs.
            loop.call_soon_threadsafe(lock.release)

    async def _acquire(self) -> None:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            # One engine may serve several loops one after another (a command's
            # asyncio.run, the tests): the queue belongs to the loop of the day.
            self._lock, self._loop, self._holder = asyncio.Lock(), loop, None
        try:
            async with asyncio.timeout(self._wait_s):
                await self._lock.acquire()
        except TimeoutError:
            # As SQLAlchemy would raise SQLite's own: every handler of a busy
            # database knows it (a 503 database_busy, not a fault).
            raise sa.exc.OperationalError(
                "(waiting for this process's turn to write)",
                None,
                sqlite3.OperationalError("database is locked"),
            ) from None


def _unwrapped(connection: Any) -> Any:
    # SQLAlchemy hands the dialect the pool's proxy of a connection or the
    # DB-API connection itself, depending on the call.
    return getattr(connection, "dbapi_connection", connection)


class QueuedWritersDialect(SQLiteDialect_aiosqlite):
    """aiosqlite, with this process's write transactions queued (above)."""

    # Its statements compile as aiosqlite's do: SQLAlchemy's cache applies.
    supports_statement_cache = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writers = WriterQueue()

    def do_commit(self, dbapi_connection: Any) -> None:
        try:
            super().do_commit(dbapi_connection)  # type: ignore[no-untyped-call]
        finally:
            self.writers.leave(dbapi_connection)

    def do_rollback(self, dbapi_connection: Any) -> None:
        try:
            super().do_rollback(dbapi_connection)  # type: ignore[no-untyped-call]
        finally:
            self.writers.leave(dbapi_connection)

    def do_close(self, dbapi_connection: Any) -> None:
        try:
            super().do_close(dbapi_connection)  # type: ignore[no-untyped-call]
        finally:
            self.writers.leave(dbapi_connection)

    def do_terminate(self, dbapi_connection: Any) -> None:
        # A connection cancelled in the middle of a statement is terminated,
        # neither rolled back nor closed (SQLAlchemy's asyncio pool).
        try:
            _stop_and_roll_back(dbapi_connection)
        finally:
            try:
                super().do_terminate(dbapi_connection)
            finally:
                self.writers.leave(dbapi_connection)


def _stop_and_roll_back(dbapi_connection: Any) -> None:
    """Stop what the connection's thread runs and roll its transaction back,
    before the connection is closed.

    Closing leaves a connection whose statement has not finished alive, with
    its transaction and SQLite's locks, until the garbage collector frees
    the statement's cursor: a cancelled read inside a write transaction
    kept every other writer out meanwhile (a cancelled write does not:
    SQLite rolls back a stopped write's transaction itself).
    """
    aio: Any = getattr(_unwrapped(dbapi_connection), "_connection", None)  # aiosqlite's
    raw = getattr(aio, "_connection", None)  # sqlite3's; None once closed
    if not isinstance(raw, sqlite3.Connection):
        return
    # Thread-safe: the statement running in aiosqlite's thread stops at once.
    raw.interrupt()
    if in_greenlet():
        # Queued behind the stopped statement, in the same thread.
        with contextlib.suppress(sqlite3.Error, ValueError):
            await_(asyncio.shield(aio.rollback()))


registry.register(f"sqlite.{DRIVER}", __name__, QueuedWritersDialect.__name__)
