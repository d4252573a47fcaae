"""The signaling socket's frame writer: its frames as a real client reads them,
and its refusal of a socket whose frames it cannot write."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import WSMsgType, web

from server.app_keys import WEBSOCKETS
from server.ws.outbox import Outbox
from server.ws.registry import tracked_websocket
from signaling.ports import Delivery

# Around each boundary of the three length encodings of RFC 6455, 5.2.
SIZES = [0, 1, 125, 126, 127, 65_535, 65_536, 70_000]


async def test_its_frames_reach_a_client_whole_at_every_length_encoding(aiohttp_client) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        async with tracked_websocket(request, heartbeat_s=None) as websocket:
            outbox = Outbox(request, websocket, "c1")
            await outbox.open([{"size": size} for size in SIZES[:2]])
            for size in SIZES:
                await outbox.deliver(Delivery({}, text="x" * size))
                # Written when this turn of the loop ends; frames written in one
                # turn past the transport's high-water mark would close the socket.
                await asyncio.sleep(0)
            # For another connection of the same participant: not this socket's.
            await outbox.deliver(Delivery({}, text="not for me", connection_id="c2"))
            outbox.send({"last": True})
            await websocket.receive()
        return websocket

    app = web.Application()
    app[WEBSOCKETS] = set()
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


async def test_it_refuses_a_socket_with_per_message_compression(aiohttp_client) -> None:
    refusals: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        websocket = web.WebSocketResponse(compress=True)
        await websocket.prepare(request)
        try:
            Outbox(request, websocket, str(uuid.uuid4()))
        except ValueError as err:
            refusals.append(str(err))
        await websocket.close()
        return websocket

    app = web.Application()
    app.router.add_get("/ws", handler)
    client = await aiohttp_client(app)
    socket = await client.ws_connect("/ws", compress=15)
    assert socket.compress == 15  # negotiated: the outbox's frames would be wrong here
    await socket.receive(timeout=5)
    assert refusals == ["the outbox writes its own frames: open the socket with compress=False"]
