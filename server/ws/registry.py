"""Open signaling sockets the application knows about, so shutdown can close
them and bulk jobs can give way to them."""

from __future__ import annotations

import asyncio

from aiohttp import WSCloseCode, web

from audit.pace import PEERS_DIR
from server.app_keys import SETTINGS, WEBSOCKETS
from server.ws.connection import CLOSE_HANDSHAKE_S, Connection

# How long shutdown waits, past the closing handshakes, for the sockets'
# rooms to hear that they went (a last write each).
FINISH_S = 10.0


def bulk_share(app: web.Application) -> float:
    """The share of the time a bulk job the node runs now may keep busy
    (audit/pace.py): ``database.bulk_share`` while signaling sockets are
    open on the node (consults, waiting rooms), full speed (1) while none
    is: then nothing on the node waits for a core."""
    return app[SETTINGS].database.bulk_share if app[WEBSOCKETS] else 1.0


def bulk_peers(app: web.Application) -> str:
    """Where the node's paced bulk jobs register to share ``database.bulk_share``
    between them (audit/pace.py ``Peers``): in the data dir, as the command
    line's purge does on the same machine."""
    return str(app[SETTINGS].data_dir / PEERS_DIR)


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
