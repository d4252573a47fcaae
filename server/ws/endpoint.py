"""The signaling WebSocket at ``/ws``: one participant's socket from the door to its close.

Who may open it is decided in :mod:`server.ws.admission`; the room is joined
here. After the handshake the socket leaves aiohttp's request handler for a
:class:`~server.ws.connection.Connection` of its own; its frames are handled
by a :class:`~server.ws.reader.Conversation`, everything sent goes through
the :class:`~server.ws.outbox.Outbox`, and a therapist's socket is held to
its login session (:mod:`server.ws.session_check`). Whatever ends the
socket, the room hears of it (:meth:`~server.ws.reader.Conversation.ended`).
"""

from __future__ import annotations

from aiohttp import web

from server.app_keys import (
    CLOCK,
    METRICS,
    ROOMS,
    SETTINGS,
    SOCKET_HEARTBEATS,
    TECHNICAL_LOG,
    WEBSOCKETS,
)
from server.web_security import client_address
from server.ws.admission import Refused, admit_connection
from server.ws.connection import Connection
from server.ws.outbox import Outbox
from server.ws.reader import Conversation
from server.ws.session_check import register
from signaling.ports import StateUnavailable
from signaling.protocol import (
    MAX_FRAME_BYTES,
    CloseCode,
    EndReason,
    ErrorCode,
    ProtocolError,
    error_message,
    outbound,
)
from signaling.rooms import RoomClosed
from signaling.turn import ice_servers

routes = web.RouteTableDef()


@routes.get("/ws")
async def signaling_socket(request: web.Request) -> web.StreamResponse:
    """Open the signaling socket of one participant of one consult."""
    technical = request.app[TECHNICAL_LOG].log
    metrics = request.app[METRICS]
    address = client_address(request)
    user_agent = request.headers.get("User-Agent", "")[:300]
    try:
        participant, session = await admit_connection(request)
    except Refused as refused:
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
    # aiohttp refuses a frame of max_msg_size bytes itself (its limit is
    # exclusive); the protocol's is inclusive: a frame of MAX_FRAME_BYTES passes.
    # The heartbeat and the answers to pings are ours, not aiohttp's
    # (server/ws/heartbeat.py, server/ws/connection.py): no timer per socket.
    # No per-message deflate: signaling frames are small, and a zlib context
    # per connection would cost CPU on every message and memory on every socket.
    websocket = web.WebSocketResponse(
        max_msg_size=MAX_FRAME_BYTES + 1, heartbeat=None, autoping=False, compress=False
    )
    await websocket.prepare(request)
    # From here the frames come to the connection; none is handled before it starts.
    connection = Connection.take_over(request, websocket)
    outbox = Outbox(connection, participant.connection_id)
    try:
        first, subscription = await rooms.connect(
            participant,
            ice_servers=servers,
            deliver=outbox.deliver,
            deliver_now=outbox.deliver_now,
        )
    except RoomClosed:
        metrics.record_refused("consult_over")
        outbox.send(outbound("consult-ended", reason=EndReason.CONSULT_OVER))
        await outbox.close(CloseCode.ENDED)
        return _released(request, websocket)
    except StateUnavailable:
        metrics.record_refused("unavailable")
        metrics.record_error(ErrorCode.UNAVAILABLE)
        # Redis is away: the client's usual reconnect tries again shortly.
        outbox.send(
            error_message(
                ProtocolError(
                    ErrorCode.UNAVAILABLE,
                    "the server cannot open the consult right now; trying again",
                )
            )
        )
        await outbox.close(CloseCode.TRY_AGAIN_LATER, b"try again")
        return _released(request, websocket)
    except BaseException:
        connection.transport.abort()
        raise
    metrics.record_opened(participant.role)
    # In the shutdown's, the heartbeat's and the session check's rounds while
    # open; the conversation takes them out again when the socket is gone.
    request.app[WEBSOCKETS].add(connection)
    request.app[SOCKET_HEARTBEATS].add(outbox)
    register(request.app, connection, session)
    conversation = Conversation(request.app, connection, outbox, participant, subscription, session)
    try:
        await outbox.open(first)
    except BaseException:
        connection.transport.abort()
        raise
    finally:
        # Frames are handled from here, and whatever happens the room hears
        # when the socket goes (Conversation.ended).
        connection.start(conversation)
    # The handler's task, the request and aiohttp's protocol object go now;
    # the socket lives on in its connection (server/ws/connection.py).
    return _released(request, websocket)


def _released(request: web.Request, websocket: web.WebSocketResponse) -> web.StreamResponse:
    Connection.release(request, websocket)
    return websocket
