"""Where consult rooms keep their state and deliver their messages.

Three small interfaces, each with an in-process implementation here; the
Redis implementations (several nodes) come later and slot in behind them:

- :class:`Broker` delivers messages to the connections of one participant
  of one consult, wherever they are connected.
- :class:`RoomStore` keeps each room's state; changes happen under a
  per-consult lock, so two nodes never interleave a read-modify-write.
- :class:`Timers` keeps deadlines (reconnect grace, maximum duration) and
  hands each due timer out exactly once, to whichever node asks first.

No code outside these may assume that both participants are connected to
this process, or that a deadline lives in this process's memory only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from signaling.protocol import ParticipantRole

# Messages waiting for a slow connection; beyond this it is dropped (closed).
SUBSCRIPTION_QUEUE_LIMIT = 256


@dataclass(frozen=True)
class Delivery:
    """A message for the connections of one participant."""

    message: dict[str, Any]
    # Only this connection (e.g. "you were replaced"); None: every connection.
    connection_id: str | None = None
    # Close the receiving connection after delivering, with this code.
    close_code: int | None = None


class Subscription(Protocol):
    async def get(self) -> Delivery:
        """Wait for the next delivery."""

    async def close(self) -> None:
        """Stop receiving; idempotent."""


class Broker(Protocol):
    async def publish(
        self, consult_id: uuid.UUID, role: ParticipantRole, delivery: Delivery
    ) -> None:
        """Deliver to every subscription of ``role`` in ``consult_id``, on any node."""

    async def subscribe(self, consult_id: uuid.UUID, role: ParticipantRole) -> Subscription:
        """Start receiving deliveries for ``role`` in ``consult_id``."""


@dataclass
class Presence:
    connection_id: str
    # False while the participant is in its reconnect grace period.
    connected: bool = True


@dataclass
class RoomState:
    """What a consult room knows beyond the database record."""

    therapist: Presence | None = None
    patient: Presence | None = None
    # The patient is in the waiting room (connected, not yet admitted).
    patient_waiting: bool = False
    admitted: bool = False
    # Shown to the therapist in the waiting room; never stored on disk.
    display_name: str | None = None
    over: bool = False

    def presence(self, role: ParticipantRole) -> Presence | None:
        return self.therapist if role is ParticipantRole.THERAPIST else self.patient

    def set_presence(self, role: ParticipantRole, presence: Presence | None) -> None:
        if role is ParticipantRole.THERAPIST:
            self.therapist = presence
        else:
            self.patient = presence


class RoomStore(Protocol):
    def locked(self, consult_id: uuid.UUID) -> Any:
        """Async context manager yielding the room's state under a lock; changes
        made to it are saved when the block ends without an error."""

    async def peek(self, consult_id: uuid.UUID) -> RoomState:
        """A copy of the room's state, without the lock."""

    async def discard(self, consult_id: uuid.UUID) -> None:
        """Forget the room (the consult is over)."""


class Timers(Protocol):
    async def schedule(self, key: str, due_at: datetime, payload: dict[str, Any]) -> None:
        """Set (or move) the timer ``key``."""

    async def cancel(self, key: str) -> None:
        """Remove the timer ``key`` if it is set."""

    async def claim_due(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        """Return the timers due at ``now`` and remove them: each is handed out once."""


class _QueueSubscription:
    def __init__(self, owner: InProcessBroker, key: tuple[uuid.UUID, ParticipantRole]) -> None:
        self._owner = owner
        self._key = key
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=SUBSCRIPTION_QUEUE_LIMIT)

    async def get(self) -> Delivery:
        return await self.queue.get()

    async def close(self) -> None:
        self._owner._subscribers[self._key].discard(self)
        if not self._owner._subscribers[self._key]:
            del self._owner._subscribers[self._key]


class InProcessBroker:
    """One process: deliveries go straight into the subscribers' queues."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[
            tuple[uuid.UUID, ParticipantRole], set[_QueueSubscription]
        ] = defaultdict(set)

    async def publish(
        self, consult_id: uuid.UUID, role: ParticipantRole, delivery: Delivery
    ) -> None:
        for subscription in list(self._subscribers.get((consult_id, role), ())):
            try:
                subscription.queue.put_nowait(delivery)
            except asyncio.QueueFull:
                # A connection that does not read is closed, not waited for:
                # one stuck client must not hold up the consult.
                subscription.queue.get_nowait()
                subscription.queue.put_nowait(
                    Delivery({"v": 1, "type": "error", "code": "too_slow"}, close_code=1008)
                )

    async def subscribe(self, consult_id: uuid.UUID, role: ParticipantRole) -> Subscription:
        subscription = _QueueSubscription(self, (consult_id, role))
        self._subscribers[(consult_id, role)].add(subscription)
        return subscription


@dataclass
class _Room:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: RoomState = field(default_factory=RoomState)


class InProcessRoomStore:
    def __init__(self) -> None:
        self._rooms: dict[uuid.UUID, _Room] = {}

    @asynccontextmanager
    async def locked(self, consult_id: uuid.UUID) -> AsyncIterator[RoomState]:
        room = self._rooms.setdefault(consult_id, _Room())
        async with room.lock:
            working = _copy(room.state)
            yield working
            room.state = working

    async def peek(self, consult_id: uuid.UUID) -> RoomState:
        room = self._rooms.get(consult_id)
        return _copy(room.state) if room else RoomState()

    async def discard(self, consult_id: uuid.UUID) -> None:
        self._rooms.pop(consult_id, None)


def _copy(state: RoomState) -> RoomState:
    return RoomState(
        therapist=Presence(**vars(state.therapist)) if state.therapist else None,
        patient=Presence(**vars(state.patient)) if state.patient else None,
        patient_waiting=state.patient_waiting,
        admitted=state.admitted,
        display_name=state.display_name,
        over=state.over,
    )


class InProcessTimers:
    def __init__(self) -> None:
        self._due: dict[str, tuple[datetime, dict[str, Any]]] = {}

    async def schedule(self, key: str, due_at: datetime, payload: dict[str, Any]) -> None:
        self._due[key] = (due_at, payload)

    async def cancel(self, key: str) -> None:
        self._due.pop(key, None)

    async def claim_due(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        due = [(key, payload) for key, (at, payload) in self._due.items() if at <= now]
        for key, _payload in due:
            del self._due[key]
        return due
