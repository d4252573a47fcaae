"""The signaling WebSocket at ``/ws``: one participant's socket from the door to its close.

Who may open it is decided in :mod:`server.ws.admission`; the room is joined
here, the frames are read in :mod:`server.ws.reader`, everything sent goes
through the :class:`~server.ws.outbox.Outbox`, and a therapist's socket is
held to its login session (:mod:`server.ws.session_check`). Whatever ends the
socket, the room hears of it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.app_keys import CLOCK, METRICS, ROOMS, SETTINGS, SOCKET_HEARTBEATS, TECHNICAL_LOG
from server.web_security import client_address
from server.ws.admission import Refused, admit_connection
from server.ws.outbox import Outbox
from server.ws.reader import read_frames
from server.ws.registry import tracked_websocket
from server.ws.session_check import registered
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
    # (server/ws/heartbeat.py): no timer per socket.
    async with tracked_websocket(
        request, max_msg_size=MAX_FRAME_BYTES + 1, heartbeat_s=None, autoping=False
    ) as websocket:
        outbox = Outbox(request, websocket, participant.connection_id)
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
        # This frame lives as long as the socket: what the opening needed goes
        # now (the client's address and browser, the TURN credentials, the
        # welcome), not at the end of the consult.
        del address, user_agent, servers
        # In the heartbeat rounds while open (server/ws/heartbeat.py).
        heartbeats = request.app[SOCKET_HEARTBEATS]
        try:
            heartbeats.add(outbox)
            async with registered(request, websocket, session):
                await outbox.open(first)
                del first
                await read_frames(request, websocket, outbox, participant)
        finally:
            heartbeats.discard(outbox)
            await subscription.close()
            # Whatever ended the socket (a reset, a failing write, shutdown),
            # the room must hear of it, or the peer waits for a ghost.
            await asyncio.shield(rooms.disconnect(participant))
            await outbox.finish()
    return websocket
