"""Offers, answers and candidates from one participant to the other: the
negotiation's hot path, and the only messages the server passes on."""

from __future__ import annotations

from typing import Any

import msgspec

from signaling.ports import Broker, Delivery, RoomStore
from signaling.protocol import (
    RELAYED,
    VERSION,
    ErrorCode,
    InboundMessage,
    ProtocolError,
    outbound,
)
from signaling.state import Participant, RoomPhase, RoomState
from signaling.subscribers import Receivers


class Relay:
    """Relays through the room's state (``store``) and the ``broker``."""

    __slots__ = ("_broker", "_store")

    def __init__(self, store: RoomStore, broker: Broker) -> None:
        self._store = store
        self._broker = broker

    async def __call__(
        self, participant: Participant, message: InboundMessage, frame: str | None
    ) -> None:
        """Pass ``message`` to the other participant, on whichever node; raise
        :class:`ProtocolError` where the room does not allow it now."""
        state = await self._store.peek(participant.consult_id)
        if state is None or state.phase is RoomPhase.OVER:
            raise ProtocolError(ErrorCode.CONSULT_OVER, "the consult is over", ref=message.type)
        if state.phase is not RoomPhase.ACTIVE:
            raise ProtocolError(
                ErrorCode.NOT_ADMITTED,
                "the consult has not started: the therapist admits the patient first",
                ref=message.type,
            )
        receiver = state.presence(participant.other)
        if receiver is None or not receiver.connected:
            raise ProtocolError(
                ErrorCode.PEER_ABSENT,
                "the other participant is not connected right now",
                ref=message.type,
            )
        await self._broker.publish(
            participant.consult_id,
            participant.other,
            relayed(participant, message, frame),
            where=receiver.node,
        )

    def route(self, participant: Participant) -> Route:
        """Where ``participant``'s relays go at once (see :class:`Route`)."""
        return Route(self._store, self._broker, participant)


class Route:
    """One participant's relays, delivered at once, without waiting, where
    that can be done: the room's state known here, the relay acceptable, and
    the receiver on this node with a receiver that never waits (its socket's
    outbox). No task and no await between the sender's read and the
    receiver's write.

    What that takes is worked out once and kept while the room's state is
    the same object (a saved state is never changed: a change saves a new
    one) and no subscription came or went (:attr:`Receivers.current`): a
    relay then costs a lookup and the receiver's write.
    """

    __slots__ = ("_broker", "_consult", "_participant", "_receivers", "_state", "_store")

    def __init__(self, store: RoomStore, broker: Broker, participant: Participant) -> None:
        self._store = store
        self._broker = broker
        self._participant = participant
        self._consult = str(participant.consult_id)
        self._state: RoomState | None = None
        self._receivers: Receivers | None = None

    def __call__(self, message: InboundMessage, frame: str) -> bool:
        """Relay ``message`` at once if it can be; False when it cannot
        (nothing was sent): the caller then takes :meth:`Relay.__call__`,
        which also refuses it where it is not acceptable."""
        if message.consult is not None and message.consult != self._consult:
            return False
        participant = self._participant
        state = self._store.peek_now(participant.consult_id)
        receivers = self._receivers
        if (
            state is not self._state
            or receivers is None
            or receivers.owner.version != receivers.version  # not receivers.current
        ):
            receivers = self._find(state)
            if receivers is None:
                return False
        # relayed(), inline: the hot path. The named tuple made as a tuple:
        # Delivery(...) runs a Python __new__, twice as long.
        sender = participant.sender_field
        kind = message.type
        envelope = _ENVELOPES.get((kind, sender)) or _envelope(kind, participant)
        text = frame.rstrip()[:-1] + sender
        receivers.deliver(_new_tuple(Delivery, (envelope, None, None, text)))
        return True

    def _find(self, state: RoomState | None) -> Receivers | None:
        self._state = state
        self._receivers = None
        if state is None or state.phase is not RoomPhase.ACTIVE:
            return None
        participant = self._participant
        receiver = state.presence(participant.other)
        if receiver is None or not receiver.connected:
            return None
        self._receivers = self._broker.receivers_now(
            participant.consult_id, participant.other, where=receiver.node
        )
        return self._receivers


def relayed(participant: Participant, message: InboundMessage, frame: str | None) -> Delivery:
    """What the other participant receives of a relayed message."""
    if frame is None:
        fields = msgspec.structs.asdict(message)
        del fields["v"], fields["consult"]
        return Delivery(outbound(message.type, sender=participant.role.value, **fields))
    # The frame is a validated JSON object with no "sender" field (unknown
    # fields are refused), so adding one before its closing brace keeps it
    # valid: a 3 KB SDP is not decoded and encoded again. ``message`` then
    # holds only the envelope, for logs and tests.
    return Delivery(
        _envelope(message.type, participant),
        text=frame.rstrip()[:-1] + participant.sender_field,
    )


def _envelope(kind: str, sender: Participant) -> dict[str, Any]:
    """The envelope of a relayed frame: one shared dict per type and sender's
    role (deliveries are never changed), not a new one per message."""
    key = (kind, sender.sender_field)
    envelope = _ENVELOPES.get(key)
    if envelope is None:
        envelope = {"v": VERSION, "type": kind, "sender": sender.role.value}
        if kind in RELAYED:
            _ENVELOPES[key] = envelope
    return envelope


# By type and the sender's ``sender_field`` (a string: hashed once).
_ENVELOPES: dict[tuple[str, str], dict[str, Any]] = {}
_new_tuple = tuple.__new__
