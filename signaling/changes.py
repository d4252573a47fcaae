"""Room changes that run to their end, whoever waits for them.

A socket's handler is cancelled when its socket goes; a change to a room it
started must not stop half way (a consult ended for one participant and not
the other). Each change runs as a task of its own, kept here until it is done,
so that shutdown can let the last ones finish (:meth:`Changes.drain`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

_log = structlog.get_logger("videoconsult.signaling")

T = TypeVar("T")


class Changes:
    def __init__(self, *, expected: tuple[type[BaseException], ...]) -> None:
        """``expected``: the errors a change may end with that its caller
        handles (a refused message, say); any other is logged as a failure."""
        self._expected = expected
        self._running: set[asyncio.Task[Any]] = set()

    def start(self, change: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``change`` as a task of its own, kept until it is done."""
        task = asyncio.ensure_future(change)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    async def to_the_end(self, change: Coroutine[Any, Any, T]) -> T:
        """Wait for ``change``; if the waiter is cancelled, the change goes on."""
        return await asyncio.shield(self.start(change))

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Let the changes still running finish (on shutdown, before Redis and
        the database close under them)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, self._expected):
            # Also raised to the caller, if it still waits; said here for when it does not.
            _log.warning("a room change failed", error=type(error).__name__)
