"""The signaling socket's frame writer: its frames as a real client reads them.
(The refusal of a compressed socket is the connection's: tests/test_connection.py.)"""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

from server.ws.connection import Connection
from server.ws.outbox import Outbox
from signaling.ports import Delivery

# Around each boundary of the three length encodings of RFC 6455, 5.2.
SIZES = [0, 1, 125, 126, 127, 65_535, 65_536, 70_000]


async def test_its_frames_reach_a_client_whole_at_every_length_encoding(aiohttp_client) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        websocket = web.WebSocketResponse(compress=False)
        await websocket.prepare(request)
        outbox = Outbox(Connection.take_over(request, websocket), "c1")
        await outbox.open([{"size": size} for size in SIZES[:2]])
        for size in SIZES:
            await outbox.deliver(Delivery({}, text="x" * size))
            # Written when this turn of the loop ends; frames written in one
            # turn past the transport's high-water mark would close the socket.
            await asyncio.sleep(0)
        # For another connection of the same participant: not this socket's.
        await outbox.deliver(Delivery({}, text="not for me", connection_id="c2"))
        outbox.send({"last": True})
        Connection.release(request, websocket)
        return websocket

    app = web.Application()
    app.router.add_get("/ws", handler)
    client = await aiohttp_client(app)
    socket = await client.ws_connect("/ws")
    assert await socket.receive_json(timeout=5) == {"size": 0}
    assert await socket.receive_json(timeout=5) == {"size": 1}
    for size in SIZES:
        message = await socket.receive(timeout=5)
        assert message.type is WSMsgType.TEXT
        assert message.data == "x" * size
    assert await socket.receive_json(timeout=5) == {"last": True}
    await socket.close()
