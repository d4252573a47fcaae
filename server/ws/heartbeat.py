"""The signaling sockets' WebSocket heartbeat: one round for all of them.

aiohttp's own heartbeat keeps a timer per socket (two while a ping waits for
its pong) and re-arms it, through ``call_soon``, on every chunk of data that
arrives. With 10,000 idle sockets that is 10,000 timers in the event loop
and a callback per message. Here every open socket's outbox is in one set
(``SOCKET_HEARTBEATS``, while the socket's handler runs); every
half ``signaling.heartbeat_s`` one round (:func:`beat_sockets`, a periodic
job) walks it: a socket silent for a round is pinged, one silent a round
after its ping is dropped (:meth:`~server.ws.outbox.Outbox.beat`). A silent
peer is pinged after half a heartbeat to one heartbeat of silence and
dropped half a heartbeat after the ping; an idle peer that answers is
pinged once a heartbeat, as with aiohttp's heartbeat.

The sockets are opened with aiohttp's heartbeat and automatic ping answers
off; the read loop answers a client's ping and tells the outbox of every
frame (:mod:`server.ws.reader`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.app_keys import SETTINGS, SOCKET_HEARTBEATS

# Sockets beaten between two yields to the event loop: a round over 10,000
# sockets never holds the loop for long.
ROUND_SLICE = 1000


def round_interval_s(app: web.Application) -> float:
    """Seconds between two heartbeat rounds: half the heartbeat."""
    return app[SETTINGS].signaling.heartbeat_s / 2


async def beat_sockets(app: web.Application) -> None:
    """One heartbeat round over every open signaling socket of this node."""
    registered = app[SOCKET_HEARTBEATS]
    outboxes = list(registered)
    for start in range(0, len(outboxes), ROUND_SLICE):
        if start:
            await asyncio.sleep(0)
        for outbox in outboxes[start : start + ROUND_SLICE]:
            outbox.beat()
