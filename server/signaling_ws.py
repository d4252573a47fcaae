"""The signaling WebSocket at ``/ws``: authentication at the door, then the protocol.

Who may open it:
- a therapist, by the session cookie, for one of their own consults
  (``/ws?consult=<id>``);
- a patient, by a single-use ticket made from their invite
  (``/ws?ticket=<ticket>``), the invite checked again at every (re)connect.
Either way the upgrade request must come from our own origin: a cookie
alone must not let another site's page act as the therapist.

Inside, every frame is size-limited (1009 above 64 KiB), rate-limited per
connection (throttled with an ``error``, closed with 1008 when it goes on),
and validated; a bad frame gets an ``error`` naming the problem and the
connection goes on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from audit.consults import InviteInvalid, get_consult, open_invite_by_hash
from audit.errors import NotFound
from audit.roles import Role
from audit.sessions import Session, live_sessions
from server.app_keys import (
    CLOCK,
    DB_ENGINE,
    METRICS,
    ROOMS,
    SETTINGS,
    TECHNICAL_LOG,
    THERAPIST_SOCKETS,
    TICKETS,
)
from server.auth.sessions import authenticate
from server.web_security import client_address, expected_origin
from server.websockets import tracked_websocket
from signaling.ports import Delivery, StateUnavailable
from signaling.protocol import (
    MAX_FRAME_BYTES,
    RELAYED,
    CloseCode,
    EndReason,
    ErrorCode,
    ParticipantRole,
    ProtocolError,
    error_message,
    outbound,
    parse_inbound,
)
from signaling.ratelimit import TokenBucket
from signaling.rooms import Participant, RoomClosed
from signaling.turn import ice_servers

routes = web.RouteTableDef()

# How long a closing handshake the server started may take.
CLOSE_HANDSHAKE_S = 2.0
# How often the therapists' sockets are checked against their login sessions.
SESSION_CHECK_S = 10.0
# Sessions looked up per query.
SESSION_CHECK_BATCH = 500


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@routes.get("/ws")
async def signaling_socket(request: web.Request) -> web.StreamResponse:
    """Open the signaling socket of one participant of one consult."""
    technical = request.app[TECHNICAL_LOG].log
    metrics = request.app[METRICS]
    address = client_address(request)
    user_agent = request.headers.get("User-Agent", "")[:300]
    try:
        participant, session = await _admit_connection(request)
    except _Refused as refused:
        metrics.record_refused(refused.code)
        # For support: why a patient's browser could not get in (24 hours).
        technical.info(
            "signaling.refused", reason=refused.code, address=address, user_agent=user_agent
        )
        return web.json_response(
            {"error": {"code": refused.code, "message": refused.message}}, status=refused.status
        )
    technical.info(
        "signaling.client",
        subject=str(participant.consult_id),
        role=participant.role.value,
        connection=participant.connection_id,
        address=address,
        user_agent=user_agent,
    )
    settings = request.app[SETTINGS]
    rooms = request.app[ROOMS]
    now = request.app[CLOCK].now()
    servers = ice_servers(
        stun_urls=settings.turn.stun_url_list,
        turn_urls=settings.turn.turn_url_list,
        secret=settings.turn.secret.get_secret_value(),
        pseudonym=participant.connection_id,
        now=now,
        ttl_s=settings.turn.credential_ttl_s,
    )
    async with tracked_websocket(
        request, max_msg_size=MAX_FRAME_BYTES, heartbeat_s=settings.signaling.heartbeat_s
    ) as websocket:
        outbox = _Outbox(request, websocket, participant.connection_id)
        try:
            first, subscription = await rooms.connect(
                participant, ice_servers=servers, deliver=outbox.deliver
            )
        except RoomClosed:
            metrics.record_refused("consult_over")
            await websocket.send_json(outbound("consult-ended", reason=EndReason.CONSULT_OVER))
            await websocket.close(code=CloseCode.ENDED)
            return websocket
        except StateUnavailable:
            metrics.record_refused("unavailable")
            metrics.record_error(ErrorCode.UNAVAILABLE)
            # Redis is away: the client's usual reconnect tries again shortly.
            await websocket.send_json(
                error_message(
                    ProtocolError(
                        ErrorCode.UNAVAILABLE,
                        "the server cannot open the consult right now; trying again",
                    )
                )
            )
            await websocket.close(code=CloseCode.TRY_AGAIN_LATER, message=b"try again")
            return websocket
        metrics.record_opened(participant.role)
        try:
            async with _registered(request, websocket, session):
                await outbox.open(first)
                await _read(request, websocket, outbox, participant)
        finally:
            await subscription.close()
            # Whatever ended the socket (a reset, a failing write, shutdown),
            # the room must hear of it, or the peer waits for a ghost.
            await asyncio.shield(rooms.disconnect(participant))
            await outbox.finish()
    return websocket


async def _admit_connection(request: web.Request) -> tuple[Participant, Session | None]:
    if request.headers.get("Origin") != expected_origin(request):
        raise _Refused(403, "origin_refused", "the socket must be opened from our own pages")
    app = request.app
    connection_id = secrets.token_urlsafe(12)
    ticket = request.query.get("ticket")
    if ticket is not None:
        try:
            grant = await app[TICKETS].claim(ticket[:100], now=app[CLOCK].now())
        except (StateUnavailable, RedisError):
            raise _Refused(
                503, "unavailable", "the server cannot check the ticket right now; try again"
            ) from None
        if grant is None:
            raise _Refused(401, "ticket_invalid", "the ticket is unknown, used or expired")
        try:
            async with app[DB_ENGINE].connect() as conn:
                await open_invite_by_hash(conn, grant.invite_hash, now=app[CLOCK].now())
        except InviteInvalid as err:
            raise _Refused(403, f"invite_{err.problem.value}", str(err)) from None
        return Participant(grant.consult_id, ParticipantRole.PATIENT, connection_id), None

    principal = await authenticate(request)
    if principal is None:
        raise _Refused(401, "not_logged_in", "log in, or use the ticket of an invite")
    if principal.account.role is not Role.THERAPIST:
        raise _Refused(403, "forbidden", "only the consult's therapist may join it")
    try:
        consult_id = uuid.UUID(request.query.get("consult", ""))
        async with app[DB_ENGINE].connect() as conn:
            consult = await get_consult(conn, consult_id, therapist_id=principal.account.id)
    except (ValueError, NotFound):
        raise _Refused(404, "not_found", "no such consult") from None
    if consult.is_over:
        raise _Refused(409, "consult_over", "the consult has ended")
    return (
        Participant(consult.id, ParticipantRole.THERAPIST, connection_id),
        principal.session,
    )


async def _read(
    request: web.Request,
    websocket: web.WebSocketResponse,
    outbox: _Outbox,
    participant: Participant,
) -> None:
    rooms = request.app[ROOMS]
    metrics = request.app[METRICS]
    limits = request.app[SETTINGS].signaling
    bucket = TokenBucket(rate=limits.rate_per_s, burst=limits.burst, now=time.monotonic())
    refused_in_a_row = 0
    async for frame in websocket:
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
            replies = await rooms.handle(participant, message, frame=frame.data)
        except ProtocolError as err:
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


class _Outbox:
    """Everything this server sends on one socket, in order.

    Deliveries are written by the publisher's own task, straight to this
    socket: no queue and no task per connection. They wait only until the
    ``welcome`` is out, so it is always the first message. Replies to the
    socket's own messages take the same way, so nothing overtakes.

    Frames written in one turn of the event loop go out together, in one
    system call, when that turn ends: an offer and the trickle candidates
    behind it usually arrive in one read, and are passed on in one write.
    Nothing waits longer than the current turn.

    A client that does not read (its send buffer would pass the transport's
    high-water mark) is closed with 1008 rather than waited for; closes run
    in the background, so that the publisher never waits for a closing
    handshake.
    """

    def __init__(
        self, request: web.Request, websocket: web.WebSocketResponse, connection_id: str
    ) -> None:
        self._websocket = websocket
        self._connection_id = connection_id
        self._ready = False
        self._pending: list[Delivery] = []
        self._closing: asyncio.Task[bool] | None = None
        self._frames: list[bytes] = []
        self._framed_bytes = 0
        # The connection's transport outlives the socket object's use of it;
        # once the connection is lost it reports is_closing().
        transport = request.transport
        assert transport is not None, "a prepared WebSocket has a transport"
        self._transport = transport
        self._high_water = transport.get_write_buffer_limits()[1]
        self._loop = asyncio.get_running_loop()

    async def deliver(self, delivery: Delivery) -> None:
        if delivery.connection_id not in (None, self._connection_id):
            return
        if self._closing is not None or self._websocket.closed:
            return
        if not self._ready:
            self._pending.append(delivery)
            return
        self._write(delivery.encoded(), close_code=delivery.close_code)

    def send(self, message: dict[str, Any]) -> None:
        """Send one of our own messages (a reply, an error) behind what is queued."""
        if self._closing is None and not self._websocket.closed:
            self._write(json.dumps(message))

    async def open(self, first: list[dict[str, Any]]) -> None:
        """Send the first messages, then what arrived meanwhile; from then on write at once."""
        for message in first:
            self._write(json.dumps(message))
        for delivery in self._pending:
            self._write(delivery.encoded(), close_code=delivery.close_code)
        self._pending.clear()
        self._ready = True

    async def close(self, code: CloseCode, message: bytes = b"") -> None:
        """Close after what is queued has gone out."""
        self.flush()
        await self._websocket.close(code=code, message=message)

    async def finish(self) -> None:
        """Let a close this outbox started finish its handshake (the peer would see 1006)."""
        if self._closing is not None:
            done, _pending = await asyncio.wait({self._closing}, timeout=CLOSE_HANDSHAKE_S)
            if not done:
                self._closing.cancel()

    def _write(self, text: str, *, close_code: int | None = None) -> None:
        transport = self._transport
        if transport.is_closing():
            return  # gone; the reader notices and the room hears of it
        frame = _text_frame(text.encode())
        # Bytes wait in user space only once the kernel's buffer is full,
        # i.e. when the client has stopped reading. A write past the
        # transport's high-water mark would make the publisher (the other
        # participant's task) wait for this client: close it instead.
        queued = transport.get_write_buffer_size() + self._framed_bytes
        if queued > 0 and queued + len(frame) > self._high_water:
            self._close_later(CloseCode.POLICY_VIOLATION)
            return
        if not self._frames:
            self._loop.call_soon(self.flush)
        self._frames.append(frame)
        self._framed_bytes += len(frame)
        if close_code is not None:
            self._close_later(close_code)

    def flush(self) -> None:
        """Write the queued frames now, in one go."""
        if not self._frames:
            return
        frames, self._frames, self._framed_bytes = self._frames, [], 0
        # After aiohttp sent a close frame, nothing else may follow it.
        if self._transport.is_closing() or self._websocket.closed:
            return
        self._transport.writelines(frames)

    def _close_later(self, code: int) -> None:
        if self._closing is None:
            self.flush()
            self._closing = asyncio.create_task(self._websocket.close(code=code))


def _text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (RFC 6455, 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


@asynccontextmanager
async def _registered(
    request: web.Request, websocket: web.WebSocketResponse, session: Session | None
) -> AsyncIterator[None]:
    """Keep a therapist's socket in the registry the session check walks."""
    if session is None:
        yield
        return
    registry = request.app[THERAPIST_SOCKETS]
    registry.setdefault(session.id_hash, set()).add(websocket)
    try:
        yield
    finally:
        sockets = registry.get(session.id_hash)
        if sockets is not None:
            sockets.discard(websocket)
            if not sockets:
                del registry[session.id_hash]


async def check_therapist_sessions(app: web.Application) -> int:
    """Close the therapist sockets whose login session ended (logout, disabled
    account, absolute timeout) with ``SESSION_ENDED`` (4002), and keep the others' sessions alive:
    an open consult socket counts as activity. Returns how many were closed.

    One query per batch of sessions, however many sockets are open.
    """
    registry = app[THERAPIST_SOCKETS]
    hashes = list(registry)
    settings = app[SETTINGS].sessions
    now = app[CLOCK].now()
    live: set[str] = set()
    for start in range(0, len(hashes), SESSION_CHECK_BATCH):
        async with app[DB_ENGINE].begin() as conn:
            live |= await live_sessions(
                conn,
                hashes[start : start + SESSION_CHECK_BATCH],
                now=now,
                idle_timeout_s=settings.idle_timeout_s,
                absolute_timeout_s=settings.absolute_timeout_s,
            )
    closed = 0
    for id_hash in hashes:
        if id_hash in live:
            continue
        for websocket in list(registry.get(id_hash, ())):
            await websocket.close(code=CloseCode.SESSION_ENDED, message=b"session ended")
            closed += 1
    return closed
