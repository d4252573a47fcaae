"""A small pool of asyncpg connections, for statements that each stand alone.

Not asyncpg's ``Pool``: its acquire with a timeout runs in a task of its own
(``wait_for``) and its release in another (``shield``), which cost more than
a short statement (py-spy on issue 19's admission storm: 8 % of the event
loop). Here a free connection is taken and given back without a task or an
await, only a wait for one is bounded, and a connection given back goes to
the one waiting longest. Used by :mod:`audit.direct`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

import asyncpg
import sqlalchemy as sa

__all__ = ["ASYNCPG_ERRORS", "ConnectionPool", "as_sqlalchemy_error"]

# asyncpg's own errors, raised as SQLAlchemy's (as its dialect does), so that
# every handler that tells a database outage from a fault knows them.
ASYNCPG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def as_sqlalchemy_error(err: Exception, sql: str, *, invalidated: bool) -> sa.exc.DBAPIError:
    """``err`` as SQLAlchemy raises it; ``invalidated``: the failure closed
    the connection."""
    # hide_parameters: no value (an invite's hash, an id) in a message or a log.
    return sa.exc.DBAPIError(
        sql, None, err, hide_parameters=True, connection_invalidated=invalidated
    )


class ConnectionPool:
    """asyncpg connections kept open once made, at most ``size``; ``connect``
    makes one. A connection the server closed (a restart, an idle timeout) is
    found closed without a round trip and made again."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int) -> None:
        self._connect = connect
        self._size = size
        self._idle: list[asyncpg.Connection] = []
        self._in_use: set[asyncpg.Connection] = set()
        # Open or being opened, in use or not: never more than size.
        self._count = 0
        # In the order they came: each is handed a connection given back (or
        # None: a place freed, connect or look again).
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._closed = False
        # Set once closed and every connection in use has come back.
        self._all_back = asyncio.Event()

    def all(self) -> list[asyncpg.Connection]:
        return [*self._idle, *self._in_use]

    async def acquire(self, timeout_s: float) -> asyncpg.Connection:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        woken = False
        while True:
            if self._closed:
                closed = asyncpg.InterfaceError("the connections for single statements are closed")
                raise as_sqlalchemy_error(closed, "(connect)", invalidated=False)
            # Those already waiting go first (a connection given back is
            # handed to them); one woken for a freed place takes it.
            if woken or not self._someone_waiting():
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
                        self._hand_on(None)
                        raise
                    self._in_use.add(connection)
                    return connection
            # One bound for the whole wait, however often it is woken.
            deadline = loop.time() + timeout_s if deadline is None else deadline
            handed = await self._wait(deadline)
            if handed is not None:
                return handed
            woken = True

    def _someone_waiting(self) -> bool:
        while self._waiters and self._waiters[0].done():  # timed out or cancelled
            self._waiters.popleft()
        return bool(self._waiters)

    async def _wait(self, deadline: float) -> asyncpg.Connection | None:
        waiter: asyncio.Future[asyncpg.Connection | None]
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed something, but leaving: it goes to the next one.
                handed = waiter.result()
                if handed is None:
                    self._hand_on(None)
                else:
                    self.release(handed)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, connection: asyncpg.Connection, *, broken: bool = False) -> None:
        """Give ``connection`` back; ``broken``: its state is unknown (a
        statement was cancelled midway), so it goes."""
        # Statements here never leave a transaction open; one that did (a bug)
        # must not reach the next user either.
        if broken or self._closed or connection.is_closed() or connection.is_in_transaction():
            self._in_use.discard(connection)
            self._count -= 1
            connection.terminate()
            self._hand_on(None)
        elif not self._hand_on(connection):
            self._in_use.discard(connection)
            self._idle.append(connection)
        if self._closed and not self._in_use:
            self._all_back.set()

    def _hand_on(self, connection: asyncpg.Connection | None) -> bool:
        """Hand ``connection`` (or a freed place) to the first one waiting;
        whether anyone was."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # not timed out or cancelled meanwhile
                waiter.set_result(connection)
                return True
        return False

    async def close(self, wait_s: float) -> int:
        """Close the idle connections, and those in use once they come back
        (up to ``wait_s``); returns how many were still in use then (ended).
        Those waiting for one are refused."""
        self._closed = True
        while self._hand_on(None):
            pass  # each wakes, finds it closed and fails
        idle, self._idle = self._idle, []
        self._count -= len(idle)
        await asyncio.gather(*(_close(connection) for connection in idle))
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
