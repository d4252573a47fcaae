"""Work over many rooms at once, but not all at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


async def each_at_most(
    limit: int, items: Iterable[Item], work: Callable[[Item], Awaitable[Result]]
) -> list[Result]:
    """Await ``work(item)`` for every item, at most ``limit`` at a time, and
    return the results in the items' order.

    The first failure cancels the work still running and is raised as itself
    (not wrapped in an exception group), so that callers catch what the work
    raises; what had finished by then stays done.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    queue = iter(enumerate(items))
    results: dict[int, Result] = {}

    async def worker() -> None:
        # One shared iterator: each worker takes the next item when it is free.
        for index, item in queue:
            results[index] = await work(item)

    workers = [asyncio.ensure_future(worker()) for _ in range(limit)]
    # Not an asyncio.TaskGroup: on Python 3.11 one whose child fails while
    # the body waits leaves the caller's Task.cancelling() raised for good
    # (found in review: the background jobs took that for a stop).
    try:
        done, _running = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # Cancelled, or one failed: the work still running is cancelled too.
        for worker_task in workers:
            worker_task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    for finished in done:
        if not finished.cancelled() and (error := finished.exception()) is not None:
            raise error from None
    return [results[index] for index in sorted(results)]
