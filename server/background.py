"""Background tasks that live exactly as long as the application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

_log = structlog.get_logger("videoconsult.background")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def background_task(name: str, run: Callable[[web.Application], Awaitable[None]]) -> CleanupContext:
    """Return a ``cleanup_ctx`` entry that runs ``run(app)`` while the app runs.

    On cleanup the task is cancelled and awaited, so that it finishes (or
    rolls back) whatever it was writing before the database closes. A task
    that crashed earlier is logged, not re-raised, so the other cleanup
    steps still run. Register it after the resources it uses.
    """

    async def _context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_supervised(name, run, app), name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return _context


async def _supervised(
    name: str, run: Callable[[web.Application], Awaitable[None]], app: web.Application
) -> None:
    try:
        await run(app)
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("background task failed", task=name)
