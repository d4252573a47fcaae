"""What one signaling socket says: every frame limited, validated, handled."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from audit.db import reading
from audit.practice import recording_allowed_for_consult
from audit.sessions import Session
from server.app_keys import (
    DB_ENGINE,
    METRICS,
    ROOMS,
    SETTINGS,
    SOCKET_HEARTBEATS,
    WEBSOCKETS,
)
from server.ws.connection import Connection
from server.ws.outbox import Outbox
from server.ws.session_check import unregister
from signaling.ports import Subscription
from signaling.protocol import (
    MISBEHAVIOUR,
    RELAYED,
    Bye,
    CloseCode,
    ErrorCode,
    InboundMessage,
    ParticipantRole,
    ProtocolError,
    RecordRequest,
    error_message,
    parse_inbound,
)
from signaling.ratelimit import TokenBucket
from signaling.state import Participant


class Conversation:
    """One participant's frames on one signaling socket: each limited,
    validated and handled, in order (the socket's
    :class:`~server.ws.connection.Connection` calls :meth:`received`).

    Frames are rate-limited per connection (an ``error`` for each one over);
    a frame that is binary, not valid, or not acceptable now gets an
    ``error`` naming the problem and the connection goes on. ``max_refused``
    refusals in a row of frames the client should never have sent
    (:data:`~signaling.protocol.MISBEHAVIOUR`) close it with 1008; a refusal
    of what the room's state does not allow now (the peer away) never does.
    After a ``bye`` the socket is closed (1000). (The connection closes with
    1009 a frame above the protocol's size limit.)

    When the socket is gone, :meth:`ended` lets go of it: out of the
    heartbeat rounds and the session registry, unsubscribed, and the room
    hears of it, whatever ended the socket (a reset, a failing write,
    shutdown), or the peer would wait for a ghost.
    """

    __slots__ = (
        "_app",
        "_bucket",
        "_max_refused",
        "_metrics",
        "_parsed",
        "_refused_in_a_row",
        "_rooms",
        "_route",
        "_session_hash",
        "_subscription",
        "connection",
        "outbox",
        "participant",
    )

    def __init__(
        self,
        app: web.Application,
        connection: Connection,
        outbox: Outbox,
        participant: Participant,
        subscription: Subscription,
        session: Session | None,
    ) -> None:
        limits = app[SETTINGS].signaling
        self._app = app
        self._rooms = app[ROOMS]
        self._metrics = app[METRICS]
        self._max_refused = limits.max_refused
        self.connection = connection
        self.participant = participant
        self.outbox = outbox
        self._subscription = subscription
        self._session_hash = None if session is None else session.id_hash
        self._bucket = TokenBucket(rate=limits.rate_per_s, burst=limits.burst, now=time.monotonic())
        self._refused_in_a_row = 0
        self._route = self._rooms.relay_route(participant)
        # The frame received_now parsed and left to received: not parsed twice.
        self._parsed: tuple[str, InboundMessage] | None = None

    def received_now(self, data: str | bytes) -> bool:
        """Relay a relayed message (offer, answer, candidate) at once, where
        the room can (:meth:`~signaling.rooms.ConsultRooms.relay_route`): no
        task, no await. False for anything else, and for a relay it cannot
        do or refuse here: :meth:`received` then handles the frame."""
        if type(data) is not str:
            return False
        try:
            message = parse_inbound(data)
        except ProtocolError:
            return False
        if message.type not in RELAYED:
            self._parsed = (data, message)
            return False
        received = time.monotonic()
        if not self._bucket.allow(received):
            self._parsed = (data, message)
            return False
        if not self._route(message, data):
            self._bucket.give_back()
            self._parsed = (data, message)
            return False
        self._metrics.record_relayed(message.type, time.monotonic() - received)
        self._refused_in_a_row = 0
        return True

    async def received(self, data: str | bytes) -> None:
        app = self._app
        participant = self.participant
        outbox = self.outbox
        received = time.monotonic()
        parsed, self._parsed = self._parsed, None
        try:
            if not self._bucket.allow(received):
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED, "too many messages; this one was dropped"
                )
            if not isinstance(data, str):
                raise ProtocolError(
                    ErrorCode.INVALID_JSON, "send text frames with JSON, not binary"
                )
            message = parsed[1] if parsed is not None and parsed[0] is data else parse_inbound(data)
            # The therapist's only: the room refuses a patient's as not_allowed.
            if isinstance(message, RecordRequest) and participant.role is ParticipantRole.THERAPIST:
                await check_practice_records(app, participant)
            replies = await self._rooms.handle(participant, message, frame=data)
        except ProtocolError as err:
            if err.code in MISBEHAVIOUR:
                self._refused_in_a_row += 1
            if self._refused_in_a_row >= self._max_refused:
                await outbox.close(CloseCode.POLICY_VIOLATION, b"too many refused messages")
                return
            outbox.send(error_message(err))
            self._metrics.record_error(err.code)
            return
        if message.type in RELAYED:
            self._metrics.record_relayed(message.type, time.monotonic() - received)
        self._refused_in_a_row = 0
        for reply in replies:
            outbox.send(reply)
        if isinstance(message, Bye):
            # Left for good: the socket goes too, so that it neither hears nor
            # speaks for the participant any more (a later connection would
            # not replace it).
            await outbox.close(CloseCode.NORMAL, b"bye")

    async def ended(self) -> None:
        app = self._app
        outbox = self.outbox
        app[SOCKET_HEARTBEATS].discard(outbox)
        unregister(app, self.connection, self._session_hash)
        try:
            await self._subscription.close()
        finally:
            await asyncio.shield(self._rooms.disconnect(self.participant))
            await outbox.finish()
            app[WEBSOCKETS].discard(self.connection)


async def check_practice_records(app: web.Application, participant: Participant) -> None:
    """Refuse a recording request when the consult's practice does not allow
    recording (its admin's setting; the server's recording.enabled aside)."""
    try:
        async with reading(app[DB_ENGINE]) as conn:
            allowed = await recording_allowed_for_consult(conn, participant.consult_id)
    except (SQLAlchemyError, OSError, TimeoutError):
        # The database away for a moment: the request is refused, the call goes on.
        raise ProtocolError(
            ErrorCode.UNAVAILABLE,
            "the practice's settings cannot be read right now; ask again in a moment",
            ref="record-request",
        ) from None
    if not allowed:
        raise ProtocolError(
            ErrorCode.RECORDING_UNAVAILABLE,
            "your practice does not allow recording consults (its admin's setting)",
            ref="record-request",
        )
