"""Consult rooms: the waiting room, admission, relay, reconnects, the end.

:class:`ConsultRooms` is told about connections (``connect``,
``disconnect``) and their messages (``handle``) by the WebSocket edge, which
has already authenticated them. Replies to the sender come back as return
values; everything for the other participant goes through the
:class:`~signaling.broker.Broker`, so the two may be connected to different
server nodes. Deadlines go through :class:`~signaling.broker.Timers`.

The therapist's client is always the one that makes offers: after an
admission (``peer-joined``) and after either side reconnects
(``peer-rejoined``, or a ``welcome`` that says the peer is there).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.clock import Clock
from audit.consults import mark_ended, mark_started
from audit.technical_log import write_technical
from signaling.broker import Broker, Delivery, Presence, RoomStore, Subscription, Timers
from signaling.protocol import (
    RELAYED,
    THERAPIST_ONLY,
    Admit,
    Bye,
    Deny,
    End,
    ErrorCode,
    InboundMessage,
    ParticipantRole,
    Ping,
    ProtocolError,
    outbound,
)

_log = structlog.get_logger("videoconsult.signaling")

# WebSocket close codes of the protocol (4000-4999 are the application's).
CLOSE_NORMAL = 1000
CLOSE_REPLACED = 4001
CLOSE_DENIED = 4003
CLOSE_ENDED = 4004


@dataclass(frozen=True)
class Participant:
    """One authenticated connection of one participant of one consult."""

    consult_id: uuid.UUID
    role: ParticipantRole
    # A random id per connection: tells a reconnect from the connection it replaces.
    connection_id: str


@dataclass(frozen=True)
class RoomSettings:
    grace_s: int
    max_duration_s: int
    heartbeat_s: float


class ConsultRooms:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        clock: Clock,
        broker: Broker,
        store: RoomStore,
        timers: Timers,
        settings: RoomSettings,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._broker = broker
        self._store = store
        self._timers = timers
        self._settings = settings

    async def connect(
        self, participant: Participant, *, ice_servers: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], Subscription]:
        """Join the room; return the first messages for this connection and its subscription."""
        # Subscribe before anything is announced, so no reply can be missed.
        subscription = await self._broker.subscribe(participant.consult_id, participant.role)
        role, other = participant.role, participant.role.other
        to_self: list[dict[str, Any]] = []
        async with self._store.locked(participant.consult_id) as state:
            previous = state.presence(role)
            rejoined = previous is not None
            if previous is not None and previous.connected:
                # The same participant on a second device: the newer one wins.
                await self._send(
                    participant.consult_id,
                    role,
                    outbound("replaced"),
                    connection_id=previous.connection_id,
                    close_code=CLOSE_REPLACED,
                )
            state.set_presence(role, Presence(participant.connection_id))
            await self._timers.cancel(_grace_key(participant.consult_id, role))
            peer = state.presence(other)
            peer_present = peer is not None and peer.connected

            if role is ParticipantRole.PATIENT and not state.admitted:
                state.patient_waiting = True
                await self._send(
                    participant.consult_id,
                    other,
                    outbound("patient-waiting", display_name=state.display_name),
                )
            elif state.admitted and rejoined and peer_present:
                await self._send(
                    participant.consult_id, other, outbound("peer-rejoined", role=role.value)
                )

            to_self.append(
                outbound(
                    "welcome",
                    protocol=1,
                    role=role.value,
                    consult=str(participant.consult_id),
                    connection=participant.connection_id,
                    state="active" if state.admitted else "waiting",
                    peer_present=peer_present,
                    ice_servers=ice_servers,
                    heartbeat_s=self._settings.heartbeat_s,
                    grace_s=self._settings.grace_s,
                )
            )
            if role is ParticipantRole.THERAPIST and state.patient_waiting:
                to_self.append(outbound("patient-waiting", display_name=state.display_name))
        await self._note(participant, "signaling.connected", rejoined=rejoined)
        return to_self, subscription

    async def handle(
        self, participant: Participant, message: InboundMessage
    ) -> list[dict[str, Any]]:
        """Act on one valid message; return replies for the sender.

        Raises :class:`ProtocolError` for messages that are valid but not
        acceptable now (wrong consult, wrong role, not admitted).
        """
        if message.consult is not None and message.consult != str(participant.consult_id):
            raise ProtocolError(
                ErrorCode.NOT_IN_CONSULT,
                "this connection belongs to another consult",
                ref=message.type,
            )
        if isinstance(message, Ping):
            return [outbound("pong")]
        if message.type in THERAPIST_ONLY and participant.role is not ParticipantRole.THERAPIST:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED,
                f"only the therapist may send {message.type}",
                ref=message.type,
            )
        if isinstance(message, Admit):
            return await self._admit(participant)
        if isinstance(message, Deny):
            return await self._deny(participant)
        if isinstance(message, End):
            await self.end(participant.consult_id, reason="ended_by_therapist")
            return []
        if isinstance(message, Bye):
            await self._leave(participant, grace=False)
            return []
        if message.type in RELAYED:
            await self._relay(participant, message)
            return []
        raise AssertionError(f"unhandled message type {message.type}")  # pragma: no cover

    async def disconnect(self, participant: Participant) -> None:
        """The connection went away: start the grace period, or leave the waiting room."""
        await self._leave(participant, grace=True)

    async def fire_due_timers(self) -> int:
        """Act on every due timer (grace periods, maximum duration); return how many."""
        due = await self._timers.claim_due(self._clock.now())
        for key, payload in due:
            consult_id = uuid.UUID(payload["consult"])
            if key.startswith("max:"):
                await self.end(consult_id, reason="max_duration")
            else:
                await self._grace_over(
                    consult_id, ParticipantRole(payload["role"]), payload["connection"]
                )
        return len(due)

    async def prepare(self, consult_id: uuid.UUID, *, display_name: str | None) -> None:
        """Open the room of a new consult with the therapist's name for the patient."""
        async with self._store.locked(consult_id) as state:
            state.display_name = display_name

    async def end(self, consult_id: uuid.UUID, *, reason: str) -> None:
        """End the consult for both: record the end, tell them, close their sockets."""
        async with self._engine.begin() as conn:
            await mark_ended(conn, consult_id, now=self._clock.now())
        async with self._store.locked(consult_id) as state:
            state.over = True
        for role in ParticipantRole:
            await self._send(
                consult_id, role, outbound("consult-ended", reason=reason), close_code=CLOSE_ENDED
            )
            await self._timers.cancel(_grace_key(consult_id, role))
        await self._timers.cancel(_max_key(consult_id))
        await self._store.discard(consult_id)
        _log.info("consult ended", consult_id=str(consult_id), reason=reason)

    async def _admit(self, participant: Participant) -> list[dict[str, Any]]:
        consult_id = participant.consult_id
        async with self._store.locked(consult_id) as state:
            patient = state.patient
            if not state.patient_waiting or patient is None or not patient.connected:
                raise ProtocolError(
                    ErrorCode.NO_PATIENT_WAITING,
                    "no patient is waiting to be admitted",
                    ref="admit",
                )
            state.patient_waiting = False
            state.admitted = True
            now = self._clock.now()
            async with self._engine.begin() as conn:
                consult = await mark_started(conn, consult_id, now=now)
            started = consult.started_at or now
            await self._timers.schedule(
                _max_key(consult_id),
                started + timedelta(seconds=self._settings.max_duration_s),
                {"consult": str(consult_id)},
            )
            await self._send(consult_id, ParticipantRole.PATIENT, outbound("admitted"))
        return [outbound("peer-joined", role=ParticipantRole.PATIENT.value)]

    async def _deny(self, participant: Participant) -> list[dict[str, Any]]:
        consult_id = participant.consult_id
        async with self._store.locked(consult_id) as state:
            if not state.patient_waiting or state.patient is None:
                raise ProtocolError(
                    ErrorCode.NO_PATIENT_WAITING, "no patient is waiting to be denied", ref="deny"
                )
            state.patient_waiting = False
            state.patient = None
            await self._send(
                consult_id, ParticipantRole.PATIENT, outbound("denied"), close_code=CLOSE_DENIED
            )
        return []

    async def _relay(self, participant: Participant, message: InboundMessage) -> None:
        state = await self._store.peek(participant.consult_id)
        if not state.admitted:
            raise ProtocolError(
                ErrorCode.NOT_ADMITTED,
                "the consult has not started: the therapist admits the patient first",
                ref=message.type,
            )
        peer = state.presence(participant.role.other)
        if peer is None or not peer.connected:
            raise ProtocolError(
                ErrorCode.PEER_ABSENT,
                "the other participant is not connected right now",
                ref=message.type,
            )
        fields = message.model_dump(exclude={"v", "type", "consult"}, exclude_none=False)
        await self._send(
            participant.consult_id,
            participant.role.other,
            outbound(message.type, sender=participant.role.value, **fields),
        )

    async def _leave(self, participant: Participant, *, grace: bool) -> None:
        consult_id, role, other = participant.consult_id, participant.role, participant.role.other
        end_now = False
        async with self._store.locked(consult_id) as state:
            presence = state.presence(role)
            if (
                state.over
                or presence is None
                or presence.connection_id != participant.connection_id
            ):
                return  # a replaced connection, or already gone
            if not state.admitted:
                state.set_presence(role, None)
                if role is ParticipantRole.PATIENT:
                    state.patient_waiting = False
                    await self._send(consult_id, other, outbound("peer-left", role=role.value))
            elif grace:
                presence.connected = False
                deadline = self._clock.now() + timedelta(seconds=self._settings.grace_s)
                await self._timers.schedule(
                    _grace_key(consult_id, role),
                    deadline,
                    {
                        "consult": str(consult_id),
                        "role": role.value,
                        "connection": participant.connection_id,
                    },
                )
                await self._send(
                    consult_id,
                    other,
                    outbound("peer-reconnecting", role=role.value, grace_s=self._settings.grace_s),
                )
            else:
                state.set_presence(role, None)
                await self._send(consult_id, other, outbound("peer-left", role=role.value))
                end_now = state.presence(other) is None
        await self._note(participant, "signaling.disconnected", grace=grace)
        if end_now:
            await self.end(consult_id, reason="both_left")

    async def _grace_over(
        self, consult_id: uuid.UUID, role: ParticipantRole, connection_id: str
    ) -> None:
        end_now = False
        async with self._store.locked(consult_id) as state:
            presence = state.presence(role)
            if state.over or presence is None or presence.connected:
                return  # came back in time
            if presence.connection_id != connection_id:
                return
            state.set_presence(role, None)
            await self._send(consult_id, role.other, outbound("peer-left", role=role.value))
            other = state.presence(role.other)
            end_now = other is None or not other.connected
        if end_now:
            await self.end(consult_id, reason="both_left")

    async def _send(
        self,
        consult_id: uuid.UUID,
        role: ParticipantRole,
        message: dict[str, Any],
        *,
        connection_id: str | None = None,
        close_code: int | None = None,
    ) -> None:
        await self._broker.publish(
            consult_id, role, Delivery(message, connection_id=connection_id, close_code=close_code)
        )

    async def _note(self, participant: Participant, kind: str, **detail: Any) -> None:
        async with self._engine.begin() as conn:
            await write_technical(
                conn,
                kind,
                now=self._clock.now(),
                subject=str(participant.consult_id),
                detail={"role": participant.role.value, **detail},
            )


def _grace_key(consult_id: uuid.UUID, role: ParticipantRole) -> str:
    return f"grace:{consult_id}:{role.value}"


def _max_key(consult_id: uuid.UUID) -> str:
    return f"max:{consult_id}"
