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
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from audit.consults import InviteInvalid, get_consult, open_invite_by_hash
from audit.errors import NotFound
from audit.roles import Role
from audit.sessions import Session
from server.app_keys import CLOCK, DB_ENGINE, ROOMS, SETTINGS, TICKETS
from server.auth.sessions import authenticate, session_still_valid
from server.web_security import expected_origin
from server.websockets import tracked_websocket
from signaling.broker import Subscription
from signaling.protocol import (
    MAX_FRAME_BYTES,
    ErrorCode,
    ParticipantRole,
    ProtocolError,
    error_message,
    outbound,
    parse_inbound,
)
from signaling.ratelimit import TokenBucket
from signaling.rooms import CLOSE_ENDED, Participant, RoomClosed
from signaling.turn import ice_servers

_log = structlog.get_logger("videoconsult.signaling")

routes = web.RouteTableDef()

# How long a closing handshake the server started may take.
CLOSE_HANDSHAKE_S = 2.0
# How often a therapist's socket checks that the login session still holds.
SESSION_CHECK_S = 10.0
# The login session ended (logout, account disabled, timeout): log in again.
CLOSE_SESSION_ENDED = 4002


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@routes.get("/ws")
async def signaling_socket(request: web.Request) -> web.StreamResponse:
    """Open the signaling socket of one participant of one consult."""
    try:
        participant, session = await _admit_connection(request)
    except _Refused as refused:
        return web.json_response(
            {"error": {"code": refused.code, "message": refused.message}}, status=refused.status
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
        try:
            first, subscription = await rooms.connect(participant, ice_servers=servers)
        except RoomClosed:
            await websocket.send_json(outbound("consult-ended", reason="consult_over"))
            await websocket.close(code=CLOSE_ENDED)
            return websocket
        try:
            async with (
                _forwarding(websocket, subscription, participant),
                _watching_session(request, websocket, session),
            ):
                for message in first:
                    await websocket.send_json(message)
                await _read(request, websocket, participant)
        finally:
            # Whatever ended the socket (a reset, a failing write, shutdown),
            # the room must hear of it, or the peer waits for a ghost.
            await asyncio.shield(rooms.disconnect(participant))
    return websocket


async def _admit_connection(request: web.Request) -> tuple[Participant, Session | None]:
    if request.headers.get("Origin") != expected_origin(request):
        raise _Refused(403, "origin_refused", "the socket must be opened from our own pages")
    app = request.app
    connection_id = secrets.token_urlsafe(12)
    ticket = request.query.get("ticket")
    if ticket is not None:
        grant = await app[TICKETS].claim(ticket[:100], now=app[CLOCK].now())
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
    request: web.Request, websocket: web.WebSocketResponse, participant: Participant
) -> None:
    rooms = request.app[ROOMS]
    limits = request.app[SETTINGS].signaling
    bucket = TokenBucket(rate=limits.rate_per_s, burst=limits.burst, now=time.monotonic())
    refused_in_a_row = 0
    async for frame in websocket:
        try:
            if not bucket.allow(time.monotonic()):
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
                await websocket.close(
                    code=WSCloseCode.POLICY_VIOLATION, message=b"too many refused messages"
                )
                return
            if websocket.closed:
                return
            await websocket.send_json(error_message(err))
            continue
        refused_in_a_row = 0
        for reply in replies:
            await websocket.send_json(reply)


@asynccontextmanager
async def _forwarding(
    websocket: web.WebSocketResponse, subscription: Subscription, participant: Participant
) -> AsyncIterator[None]:
    """Forward the broker's deliveries to the socket while the block runs."""

    closing = asyncio.Event()

    async def forward() -> None:
        while True:
            delivery = await subscription.get()
            if delivery.connection_id not in (None, participant.connection_id):
                continue
            if websocket.closed:
                return
            await websocket.send_str(delivery.encoded())
            if delivery.close_code is not None:
                closing.set()
                await websocket.close(code=delivery.close_code)
                return

    task = asyncio.create_task(forward())
    try:
        yield
    finally:
        if closing.is_set():
            # The reader stops as soon as the close begins; let the close
            # handshake finish rather than cut it off (the peer would see 1006).
            await asyncio.wait({task}, timeout=CLOSE_HANDSHAKE_S)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except ConnectionError:
            _log.info("forwarding stopped: connection lost")
        await subscription.close()


@asynccontextmanager
async def _watching_session(
    request: web.Request, websocket: web.WebSocketResponse, session: Session | None
) -> AsyncIterator[None]:
    """For a therapist: close the socket once the login session ends (logout,
    disabled account, absolute timeout), checked every SESSION_CHECK_S."""
    if session is None:
        yield
        return

    async def watch() -> None:
        while True:
            await asyncio.sleep(SESSION_CHECK_S)
            if not await session_still_valid(request.app, session):
                await websocket.close(code=CLOSE_SESSION_ENDED, message=b"session ended")
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
