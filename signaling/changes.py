"""Room changes that run to their end, whoever waits for them.

A socket's handler is cancelled when its socket goes; a change to a room it
started must not stop half way (a consult ended for one participant and not
the other). Each change runs as a task of its own, kept here until it is done,
so that shutdown can let the last ones finish (:meth:`Changes.drain`).

What a change tells the participants goes out once its new state is saved
(:class:`ChangeThenTell`): a participant may act on a message the moment it
arrives, and what it does then may read the saved state without the room's
lock (a relay asks whether the peer is connected, an offer to the recorder
whether a recording is starting). On Redis the save is a round trip after
the change's block; a message told from inside the block was acted on
against the old state (found by the soak, docs/benchmarks.md "Soak").
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, Protocol, TypeVar

import structlog

from signaling.ports import RoomStore
from signaling.protocol import CloseCode, ParticipantRole
from signaling.state import RoomState

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


class Send(Protocol):
    async def __call__(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        message: dict[str, Any],
        *,
        connection_id: str | None = None,
        close_code: CloseCode | None = None,
    ) -> None: ...


class _Told(NamedTuple):
    role: ParticipantRole
    message: dict[str, Any]
    connection_id: str | None
    close_code: CloseCode | None


class Tell:
    """What one change tells the participants, in order, until it is saved."""

    def __init__(self) -> None:
        self.told: list[_Told] = []

    def __call__(
        self,
        role: ParticipantRole,
        message: dict[str, Any],
        *,
        connection_id: str | None = None,
        close_code: CloseCode | None = None,
    ) -> None:
        self.told.append(_Told(role, message, connection_id, close_code))

    def both(self, message: dict[str, Any]) -> None:
        for role in ParticipantRole:
            self(role, message)


class ChangeThenTell:
    """A room's state under its lock, and a :class:`Tell` whose messages are
    sent once the block has ended and its change is saved. A block that
    raises saves nothing and tells nothing."""

    def __init__(self, store: RoomStore, send: Send) -> None:
        self._store = store
        self._send = send

    @asynccontextmanager
    async def __call__(
        self, consult_id: uuid.UUID, *, create: bool = False
    ) -> AsyncIterator[tuple[RoomState | None, Tell]]:
        tell = Tell()
        async with self._store.locked(consult_id, create=create) as state:
            yield state, tell
        for told in tell.told:
            await self._send(
                consult_id,
                told.role,
                told.message,
                connection_id=told.connection_id,
                close_code=told.close_code,
            )
