"""Where consult rooms keep their state and deliver their messages: the ports.

Three small interfaces, each with an in-process implementation in
:mod:`signaling.inprocess` (one node) and one on Redis in
:mod:`signaling.redis` (several nodes):

- :class:`Broker` delivers messages to the connections of one participant
  of one consult, wherever they are connected.
- :class:`RoomStore` keeps each room's :class:`~signaling.state.RoomState`;
  changes happen under a per-consult lock, so two nodes never interleave a
  read-modify-write.
- :class:`Timers` keeps deadlines (reconnect grace, maximum duration,
  forgetting a room) and hands each due timer out exactly once, to whichever
  node asks first.

Any of them may raise :class:`StateUnavailable`, and nothing else, when the
shared state cannot be reached. No code outside the implementations may
assume that both participants are connected to this process, or that a
deadline lives in this process's memory only. ``tests/test_ports.py`` holds
the contract that both implementations pass.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from signaling.protocol import ParticipantRole
from signaling.state import RoomState

if TYPE_CHECKING:
    from signaling.subscribers import Receivers

__all__ = [
    "Broker",
    "Deliver",
    "DeliverNow",
    "Delivery",
    "RoomStore",
    "StateUnavailable",
    "Subscription",
    "Timers",
]


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
        """The message as JSON text, encoded at most once."""
        return self.text if self.text is not None else json.dumps(self.message)


# Hands one delivery to one connection; awaited by the publisher. It must
# not raise for a connection that went away, and must not wait on a client
# that does not read (the edge closes such a connection instead).
Deliver = Callable[[Delivery], Awaitable[None]]
# The same, for a receiver that never waits at all (a signaling socket's
# outbox): it lets a relay be delivered within the sender's own callback.
DeliverNow = Callable[[Delivery], None]


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
        hint: a broker may then skip the other nodes). A receiver that
        raises stops neither the others nor the sender."""

    def receivers_now(
        self, consult_id: uuid.UUID, role: ParticipantRole, *, where: str | None
    ) -> Receivers | None:
        """Who a delivery to ``role`` in ``consult_id`` reaches at once,
        without waiting, where that can be done here: every receiver on this
        node, each with a ``deliver_now`` (:meth:`Receivers.deliver`), as
        long as they are :attr:`~Receivers.current`. None when it cannot:
        :meth:`publish` instead."""

    async def subscribe(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        deliver: Deliver,
        *,
        deliver_now: DeliverNow | None = None,
    ) -> Subscription:
        """Call ``deliver`` for each delivery to ``role`` in ``consult_id`` from
        now on (or ``deliver_now``, where given, through :meth:`receivers_now`)."""


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

    def peek_now(self, consult_id: uuid.UUID) -> RoomState | None:
        """The room's state, if this node knows it here and now (as :meth:`peek`
        would return it, without waiting); None when it does not."""

    async def forget(self, consult_id: uuid.UUID) -> None:
        """Drop the room altogether."""

    async def consult_ids(self) -> list[uuid.UUID]:
        """Every consult with a room (for the sweep after a node died)."""


class Timers(Protocol):
    """Deadlines by key, each with a JSON payload.

    Times are time-zone aware: a naive one is refused with ValueError (its
    meaning would depend on each node's local zone).
    """

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
