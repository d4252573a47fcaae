"""The read loop of one signaling socket: every frame limited, validated, handled."""

from __future__ import annotations

import time

from aiohttp import WSMsgType, web
from sqlalchemy.exc import SQLAlchemyError

from audit.db import reading
from audit.practice import recording_allowed_for_consult
from server.app_keys import DB_ENGINE, METRICS, ROOMS, SETTINGS
from server.ws.outbox import Outbox
from signaling.protocol import (
    MISBEHAVIOUR,
    RELAYED,
    Bye,
    CloseCode,
    ErrorCode,
    ParticipantRole,
    ProtocolError,
    RecordRequest,
    error_message,
    parse_inbound,
)
from signaling.ratelimit import TokenBucket
from signaling.state import Participant


async def read_frames(
    request: web.Request,
    websocket: web.WebSocketResponse,
    outbox: Outbox,
    participant: Participant,
) -> None:
    """Handle the socket's frames until it closes.

    Frames are rate-limited per connection (an ``error`` for each one over);
    a frame that is binary, not valid, or not acceptable now gets an
    ``error`` naming the problem and the connection goes on. ``max_refused``
    refusals in a row of frames the client should never have sent
    (:data:`~signaling.protocol.MISBEHAVIOUR`) close it with 1008; a refusal
    of what the room's state does not allow now (the peer away) never does.
    After a ``bye`` the socket is closed (1000). (aiohttp closes with 1009 a
    frame above the socket's size limit.) Every frame, pings and pongs too,
    tells the outbox the client is alive (the heartbeat); a ping is answered.
    """
    rooms = request.app[ROOMS]
    metrics = request.app[METRICS]
    limits = request.app[SETTINGS].signaling
    bucket = TokenBucket(rate=limits.rate_per_s, burst=limits.burst, now=time.monotonic())
    refused_in_a_row = 0
    async for frame in websocket:
        outbox.heard()
        if frame.type is WSMsgType.PING:
            outbox.pong(frame.data)
            continue
        if frame.type is WSMsgType.PONG:
            continue
        received = time.monotonic()
        try:
            if not bucket.allow(received):
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED, "too many messages; this one was dropped"
                )
            if frame.type is not WSMsgType.TEXT:
                raise ProtocolError(
                    ErrorCode.INVALID_JSON, "send text frames with JSON, not binary"
                )
            message = parse_inbound(frame.data)
            # The therapist's only: the room refuses a patient's as not_allowed.
            if isinstance(message, RecordRequest) and participant.role is ParticipantRole.THERAPIST:
                await check_practice_records(request.app, participant)
            replies = await rooms.handle(participant, message, frame=frame.data)
        except ProtocolError as err:
            if err.code in MISBEHAVIOUR:
                refused_in_a_row += 1
            if refused_in_a_row >= limits.max_refused:
                await outbox.close(CloseCode.POLICY_VIOLATION, b"too many refused messages")
                return
            outbox.send(error_message(err))
            metrics.record_error(err.code)
            continue
        if message.type in RELAYED:
            metrics.record_relayed(message.type, time.monotonic() - received)
        refused_in_a_row = 0
        for reply in replies:
            outbox.send(reply)
        if isinstance(message, Bye):
            # Left for good: the socket goes too, so that it neither hears nor
            # speaks for the participant any more (a later connection would
            # not replace it).
            await outbox.close(CloseCode.NORMAL, b"bye")
            return


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
