"""Open WebSockets the application knows about, so shutdown can close them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import WSCloseCode, web

from server.app_keys import WEBSOCKETS


@asynccontextmanager
async def tracked_websocket(
    request: web.Request,
    *,
    max_msg_size: int = 64 * 1024,
    heartbeat_s: float | None = 20.0,
    autoping: bool = True,
) -> AsyncIterator[web.WebSocketResponse]:
    """Accept a WebSocket and keep it in the app's set until the block ends."""
    # No per-message deflate: signaling frames are small, and a zlib context per
    # connection would cost CPU on every message and memory on every socket.
    websocket = web.WebSocketResponse(
        max_msg_size=max_msg_size, heartbeat=heartbeat_s, autoping=autoping, compress=False
    )
    await websocket.prepare(request)
    # The 101's headers (the security headers among them) are sent: they
    # would otherwise be kept, with their parsed forms, for the socket's life.
    websocket.headers.clear()
    sockets = request.app[WEBSOCKETS]
    sockets.add(websocket)
    try:
        yield websocket
    finally:
        sockets.discard(websocket)
        _let_go(request, websocket)


def _let_go(request: web.Request, websocket: web.WebSocketResponse) -> None:
    """Free a finished socket now, not at the cycle collector's next full run.

    aiohttp (3.14) leaves two things behind when a socket is done: the
    socket's data callback on the connection's protocol (socket → request →
    protocol → callback → socket, a reference cycle), and a heartbeat timer
    that a frame arriving during the closing handshake sets again (the loop
    holds the socket until it fires, 20 s later). Every closed socket, with
    its request, transport and buffers, then waited for a full run of the
    cycle collector, which under steady churn comes seldom: the server's
    memory grew by a sixth in a 10-minute soak (bench/soak.py,
    docs/benchmarks.md "Soak"). Both are private to aiohttp, hence the care.
    """
    protocol = request.protocol
    if getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None
    cancel_heartbeat = getattr(websocket, "_cancel_heartbeat", None)
    if callable(cancel_heartbeat):
        cancel_heartbeat()


async def close_websockets(app: web.Application) -> None:
    """on_shutdown hook: close every open WebSocket with 1001 (going away)."""
    sockets = app[WEBSOCKETS]
    open_sockets = list(sockets)
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in open_sockets),
        return_exceptions=True,
    )
