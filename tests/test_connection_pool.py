"""The direct connections' pool (audit/connection_pool.py): which connection
goes to whom, and when. Its connections here are stand-ins, because the order
of events must be exact; tests/test_direct.py runs it on real PostgreSQL
connections (the bound, a server-closed connection, a cancelled statement,
closing with statements in flight)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from audit.connection_pool import ConnectionPool


class _StandIn:
    """A stand-in for an asyncpg connection, for the pool's bookkeeping alone
    (which connection goes to whom, and when): the real connections are in
    the tests above; here the order of events must be exact."""

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def is_in_transaction(self) -> bool:
        return False

    def terminate(self) -> None:
        self.closed = True

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - asyncpg's signature
        self.closed = True


def _stand_in_pool(size: int) -> tuple[ConnectionPool, list[_StandIn]]:
    made: list[_StandIn] = []

    async def connect() -> Any:
        made.append(_StandIn())
        return made[-1]

    return ConnectionPool(connect, size), made


async def test_a_connection_given_back_goes_to_the_one_waiting_longest() -> None:
    pool, made = _stand_in_pool(1)
    held = await pool.acquire(5)
    first = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    second = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    pool.release(held)
    # A newcomer asking now waits behind both.
    newcomer = asyncio.create_task(pool.acquire(5))
    assert await first is held
    assert not second.done()
    pool.release(held)
    assert await second is held
    pool.release(held)
    assert await newcomer is held
    assert len(made) == 1


async def test_a_waiter_leaving_as_it_is_handed_a_connection_passes_it_on() -> None:
    pool, _made = _stand_in_pool(1)
    held = await pool.acquire(5)
    leaving = asyncio.create_task(pool.acquire(5))
    staying = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    pool.release(held)  # handed to `leaving`...
    leaving.cancel()  # ...which goes before it runs again
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await staying is held


async def test_a_wait_timed_out_before_a_connection_came_back_fails_as_a_timeout() -> None:
    pool, _made = _stand_in_pool(1)
    held = await pool.acquire(5)
    late = asyncio.create_task(pool.acquire(0.05))
    await asyncio.sleep(0.1)  # its wait runs out...
    pool.release(held)  # ...and the connection comes back before it runs again
    with pytest.raises(TimeoutError):
        await late
    assert await pool.acquire(5) is held


async def test_closing_refuses_those_waiting_and_opens_nothing_more() -> None:
    pool, made = _stand_in_pool(1)
    held = await pool.acquire(5)
    waiting = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    closing = asyncio.create_task(pool.close(wait_s=5))
    with pytest.raises(sa.exc.DBAPIError, match="closed"):
        await waiting
    pool.release(held)
    assert await closing == 0
    assert held.closed
    assert len(made) == 1
