"""Offers, answers and candidates from one participant to the other: the
negotiation's hot path, and the only messages the server passes on."""

from __future__ import annotations

from signaling.ports import Broker, Delivery, RoomStore
from signaling.protocol import (
    VERSION,
    ErrorCode,
    InboundMessage,
    ProtocolError,
    outbound,
)
from signaling.state import Participant, RoomPhase


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

    def now(self, participant: Participant, message: InboundMessage, frame: str) -> bool:
        """Relay ``message`` at once, without waiting, where that can be done:
        the room's state known here, the relay acceptable, and the receiver
        on this node with a receiver that never waits (its socket's outbox).
        False when it cannot (nothing was sent): the caller then takes the
        way above, which also refuses it where it is not acceptable.

        No task and no await between the sender's read and the receiver's
        write.
        """
        if message.consult is not None and message.consult != str(participant.consult_id):
            return False
        state = self._store.peek_now(participant.consult_id)
        if state is None or state.phase is not RoomPhase.ACTIVE:
            return False
        receiver = state.presence(participant.other)
        if receiver is None or not receiver.connected:
            return False
        return self._broker.publish_now(
            participant.consult_id,
            participant.other,
            relayed(participant, message, frame),
            where=receiver.node,
        )


def relayed(participant: Participant, message: InboundMessage, frame: str | None) -> Delivery:
    """What the other participant receives of a relayed message."""
    if frame is None:
        fields = message.model_dump(exclude={"v", "type", "consult"})
        return Delivery(outbound(message.type, sender=participant.role.value, **fields))
    # The frame is a validated JSON object with no "sender" field (unknown
    # fields are refused), so adding one before its closing brace keeps it
    # valid: a 3 KB SDP is not decoded and encoded again. ``message`` then
    # holds only the envelope, for logs and tests.
    return Delivery(
        {"v": VERSION, "type": message.type, "sender": participant.role.value},
        text=frame.rstrip()[:-1] + participant.sender_field,
    )
