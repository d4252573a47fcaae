"""The Broker, RoomStore and Timers in this process's memory: one node.

The default when no Redis is configured; see :mod:`signaling.ports` for
the contracts and :mod:`signaling.redis` for the several-node kind.
"""

from __future__ import annotations

import asyncio
import heapq
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from signaling.ports import Deliver, DeliverNow, Delivery, Subscription
from signaling.protocol import ParticipantRole
from signaling.state import RoomState
from signaling.subscribers import LocalSubscribers, Receivers

__all__ = ["InProcessBroker", "InProcessRoomStore", "InProcessTimers"]


class InProcessBroker:
    """One process: a delivery is handed straight to the receiving connection.

    No queue and no task per connection: the publisher's own task writes to
    the other socket, as a single-process relay should.
    """

    def __init__(self) -> None:
        self._subscribers: LocalSubscribers[tuple[uuid.UUID, ParticipantRole]] = LocalSubscribers()

    async def publish(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        delivery: Delivery,
        *,
        where: str | None = None,
    ) -> None:
        await self._subscribers.deliver((consult_id, role), delivery)

    def receivers_now(
        self, consult_id: uuid.UUID, role: ParticipantRole, *, where: str | None
    ) -> Receivers | None:
        # None connected: as publish, the delivery reaches nobody.
        return self._subscribers.receivers_now((consult_id, role))

    async def subscribe(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        deliver: Deliver,
        *,
        deliver_now: DeliverNow | None = None,
    ) -> Subscription:
        return self._subscribers.add((consult_id, role), deliver, deliver_now)


@dataclass
class _Room:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: RoomState = field(default_factory=RoomState)


class InProcessRoomStore:
    """Each room's state in a dict, with an :class:`asyncio.Lock` per room."""

    def __init__(self) -> None:
        self._rooms: dict[uuid.UUID, _Room] = {}

    @asynccontextmanager
    async def locked(
        self, consult_id: uuid.UUID, *, create: bool = False
    ) -> AsyncIterator[RoomState | None]:
        room = self._rooms.get(consult_id)
        if room is None:
            if not create:
                yield None
                return
            room = self._rooms.setdefault(consult_id, _Room())
        async with room.lock:
            working = room.state.copy()
            yield working
            # Forgotten while this block ran: saving would bring it back.
            if self._rooms.get(consult_id) is room:
                room.state = working

    async def peek(self, consult_id: uuid.UUID) -> RoomState | None:
        return self.peek_now(consult_id)

    def peek_now(self, consult_id: uuid.UUID) -> RoomState | None:
        # No copy: ``locked`` works on a copy and swaps it in, so a saved state
        # is never changed afterwards, and this is the hot path of every relay.
        room = self._rooms.get(consult_id)
        return room.state if room else None

    async def forget(self, consult_id: uuid.UUID) -> None:
        self._rooms.pop(consult_id, None)

    async def consult_ids(self) -> list[uuid.UUID]:
        return list(self._rooms)

    def __len__(self) -> int:
        return len(self._rooms)


class InProcessTimers:
    """Deadlines in a heap: finding the due ones costs O(log n) each, not a
    scan of every timer (thousands of rooms each keep a timer or two)."""

    def __init__(self) -> None:
        self._due: dict[str, tuple[datetime, dict[str, Any], int]] = {}
        # (due at, sequence, key); entries of moved or cancelled timers stay
        # behind until they come up, and are skipped then.
        self._heap: list[tuple[datetime, int, str]] = []
        self._sequence = 0

    async def schedule(self, key: str, due_at: datetime, payload: dict[str, Any]) -> None:
        if due_at.tzinfo is None:
            # Refused here as on Redis, rather than failing in a later claim.
            raise ValueError(f"timer time {due_at.isoformat()} has no time zone")
        self._sequence += 1
        self._due[key] = (due_at, payload, self._sequence)
        heapq.heappush(self._heap, (due_at, self._sequence, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            # Many stale entries: rebuild from the live timers.
            self._heap = [(at, seq, k) for k, (at, _payload, seq) in self._due.items()]
            heapq.heapify(self._heap)

    async def cancel(self, key: str) -> None:
        self._due.pop(key, None)

    async def claim_due(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        due: list[tuple[str, dict[str, Any]]] = []
        while self._heap and self._heap[0][0] <= now:
            _at, sequence, key = heapq.heappop(self._heap)
            live = self._due.get(key)
            if live is not None and live[2] == sequence:
                del self._due[key]
                due.append((key, live[1]))
        return due

    async def done(self, key: str) -> None:
        # Removed when claimed: in one process, nobody dies holding one.
        return None

    def __len__(self) -> int:
        return len(self._due)
