"""Open signaling sockets the application knows about, so shutdown can close them."""

from __future__ import annotations

import asyncio

from aiohttp import WSCloseCode, web

from server.app_keys import WEBSOCKETS
from server.ws.connection import CLOSE_HANDSHAKE_S, Connection

# How long shutdown waits, past the closing handshakes, for the sockets'
# rooms to hear that they went (a last write each).
FINISH_S = 10.0


async def close_websockets(app: web.Application) -> None:
    """on_shutdown hook: close every open socket with 1001 (going away), and
    wait until each one's room has heard of it, while the database is there."""
    open_now: set[Connection] = app[WEBSOCKETS]
    connections = list(open_now)
    await asyncio.gather(
        *(c.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for c in connections),
        return_exceptions=True,
    )
    if connections:
        finishing = asyncio.gather(*(c.finished() for c in connections), return_exceptions=True)
        await asyncio.wait({finishing}, timeout=CLOSE_HANDSHAKE_S + FINISH_S)
