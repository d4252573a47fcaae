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

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(limit):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [results[index] for index in sorted(results)]
