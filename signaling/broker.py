"""Where consult rooms keep their state and deliver their messages.

Three small interfaces, each with an in-process implementation here (one
node) and one on Redis in :mod:`signaling.redis_broker` (several nodes):

- :class:`Broker` delivers messages to the connections of one participant
  of one consult, wherever they are connected.
- :class:`RoomStore` keeps each room's state; changes happen under a
  per-consult lock, so two nodes never interleave a read-modify-write.
- :class:`Timers` keeps deadlines (reconnect grace, maximum duration,
  forgetting a room) and hands each due timer out exactly once, to whichever
  node asks first.

No code outside these may assume that both participants are connected to
this process, or that a deadline lives in this process's memory only.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import structlog

from signaling.protocol import ParticipantRole

_log = structlog.get_logger("videoconsult.signaling")


class StateUnavailable(Exception):
    """The shared state (Redis) cannot be reached, or did not answer in time.

    Raised by the Redis implementations instead of the client's own errors;
    nothing was changed. The caller tells the client to try again.
    """


class Delivery(NamedTuple):
    """A message for the connections of one participant.

    A named tuple, not a dataclass: one is made per relayed message, and a
    tuple is the cheapest immutable record to make.
    """

    message: dict[str, Any]
    # Only this connection (e.g. "you were replaced"); None: every connection.
    connection_id: str | None = None
    # Close the receiving connection after delivering, with this code.
    close_code: int | None = None
    # The message already encoded, when the sender has it (a relayed frame):
    # sent as it is instead of encoding ``message`` again.
    text: str | None = None

    def encoded(self) -> str:
        return self.text if self.text is not None else json.dumps(self.message)


# Hands one delivery to one connection; awaited by the publisher. It must
# not raise for a connection that went away, and must not wait on a client
# that does not read (the edge closes such a connection instead).
Deliver = Callable[[Delivery], Awaitable[None]]


class Subscription(Protocol):
    async def close(self) -> None:
        """Stop receiving; idempotent."""


class Broker(Protocol):
    async def publish(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        delivery: Delivery,
        *,
        where: str | None = None,
    ) -> None:
        """Deliver to every subscription of ``role`` in ``consult_id``, on any node.

        ``where``: the node the receiver is on, when the caller knows it (a
        hint: a broker may then skip the other nodes)."""

    async def subscribe(
        self, consult_id: uuid.UUID, role: ParticipantRole, deliver: Deliver
    ) -> Subscription:
        """Call ``deliver`` for each delivery to ``role`` in ``consult_id`` from now on."""


class RoomPhase(enum.Enum):
    # Before admission: the patient may be in the waiting room.
    WAITING = "waiting"
    # The therapist admitted the patient: the consult runs.
    ACTIVE = "active"
    # Ended; kept a while so that late connects and disconnects find it over.
    OVER = "over"


class RecordingPhase(enum.Enum):
    # Not recording, and no request open.
    OFF = "off"
    # The therapist asked; the patient has not answered yet.
    REQUESTED = "requested"
    # The patient agreed; the browsers connect their media to the recorder.
    STARTING = "starting"
    # The recorder writes the file.
    ON = "on"


class Link(enum.Enum):
    # The participant's socket is open.
    CONNECTED = "connected"
    # The socket dropped; the participant is in the reconnect grace period.
    RECONNECTING = "reconnecting"


@dataclass(frozen=True)
class Presence:
    connection_id: str
    link: Link = Link.CONNECTED
    # When the socket dropped (for the end time when nobody comes back).
    left_at: datetime | None = None
    # The server node holding the socket ("" for one node): when that node
    # dies, another one starts this participant's grace period.
    node: str = ""

    @property
    def connected(self) -> bool:
        return self.link is Link.CONNECTED


@dataclass
class RoomState:
    """What a consult room knows beyond the database record."""

    phase: RoomPhase = RoomPhase.WAITING
    therapist: Presence | None = None
    patient: Presence | None = None
    # Shown to the therapist in the waiting room; never stored on disk.
    display_name: str | None = None
    recording: RecordingPhase = RecordingPhase.OFF
    # Keep the room at least until then (a consult booked days ahead); a
    # store whose entries expire keeps it that long past this.
    keep_until: datetime | None = None

    def presence(self, role: ParticipantRole) -> Presence | None:
        return self.therapist if role is ParticipantRole.THERAPIST else self.patient

    def set_presence(self, role: ParticipantRole, presence: Presence | None) -> None:
        if role is ParticipantRole.THERAPIST:
            self.therapist = presence
        else:
            self.patient = presence

    def present(self, role: ParticipantRole) -> bool:
        presence = self.presence(role)
        return presence is not None and presence.connected

    @property
    def patient_waiting(self) -> bool:
        return self.phase is RoomPhase.WAITING and self.present(ParticipantRole.PATIENT)

    def copy(self) -> RoomState:
        return replace(self)


class RoomStore(Protocol):
    def locked(
        self, consult_id: uuid.UUID, *, create: bool = False
    ) -> AbstractAsyncContextManager[RoomState | None]:
        """Yield the room's state under a lock (None if there is no room and
        ``create`` is false); changes are saved when the block ends cleanly."""

    async def peek(self, consult_id: uuid.UUID) -> RoomState | None:
        """The room's state as last saved, without the lock, or None.

        Read it, never change it: it may be the saved state itself (changes
        go through :meth:`locked`)."""

    async def forget(self, consult_id: uuid.UUID) -> None:
        """Drop the room altogether."""

    async def consult_ids(self) -> list[uuid.UUID]:
        """Every consult with a room (for the sweep after a node died)."""


class Timers(Protocol):
    async def schedule(self, key: str, due_at: datetime, payload: dict[str, Any]) -> None:
        """Set (or move) the timer ``key``."""

    async def cancel(self, key: str) -> None:
        """Remove the timer ``key`` if it is set."""

    async def claim_due(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        """Return the timers due at ``now`` and claim them: each is handed out
        once, and again only if its claimer never called :meth:`done` (it
        died), so the actions must be safe to repeat."""

    async def done(self, key: str) -> None:
        """The action of the claimed timer ``key`` is done (unless it was set
        again meanwhile: then the new one stays)."""


class _DirectSubscription:
    def __init__(
        self, owner: InProcessBroker, key: tuple[uuid.UUID, ParticipantRole], deliver: Deliver
    ) -> None:
        self._owner = owner
        self._key = key
        self.deliver = deliver

    async def close(self) -> None:
        subscribers = self._owner._subscribers.get(self._key)
        if subscribers is None:
            return
        subscribers.discard(self)
        if not subscribers:
            del self._owner._subscribers[self._key]


class InProcessBroker:
    """One process: a delivery is handed straight to the receiving connection.

    No queue and no task per connection: the publisher's own task writes to
    the other socket, as a single-process relay should.
    """

    def __init__(self) -> None:
        self._subscribers: defaultdict[
            tuple[uuid.UUID, ParticipantRole], set[_DirectSubscription]
        ] = defaultdict(set)

    async def publish(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        delivery: Delivery,
        *,
        where: str | None = None,
    ) -> None:
        for subscription in list(self._subscribers.get((consult_id, role), ())):
            try:
                await subscription.deliver(delivery)
            except Exception:
                # One broken receiver must not stop the others or the sender.
                _log.exception("delivery failed")

    async def subscribe(
        self, consult_id: uuid.UUID, role: ParticipantRole, deliver: Deliver
    ) -> Subscription:
        subscription = _DirectSubscription(self, (consult_id, role), deliver)
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
            if self._rooms.get(consult_id) is room:
                room.state = working

    async def peek(self, consult_id: uuid.UUID) -> RoomState | None:
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
