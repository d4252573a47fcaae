"""The signaling socket after its handshake leaves aiohttp's request handler
(server/ws/connection.py): an open, idle socket keeps no task, no request and
no aiohttp protocol object alive, and still speaks the WebSocket protocol in
full (pings, close handshakes, limits) with the real aiohttp client.

Before this change every open socket kept two tasks (aiohttp's connection task
and the handler's), the parsed request and aiohttp's protocol object until it
closed: the first tests below failed then."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import socket
import struct
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestHandler
from structlog.testing import capture_logs

from server.app_keys import WEBSOCKETS
from server.ws.connection import CLOSE_HANDSHAKE_S, Connection
from server.ws.outbox import Outbox
from signaling.protocol import MAX_FRAME_BYTES
from signaling.relay import Route
from tests.support.harness import Harness, Sockets, admitted_pair, new_consult, receive

pytestmark = pytest.mark.signaling_backends


def alive(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def another_consult(harness: Harness) -> str:
    """A further consult of the therapist logged in (by new_consult)."""
    response = await harness.post("/api/consults", {})
    assert response.status == 201, await response.text()
    return str((await response.json())["consult"]["id"])


async def test_open_idle_sockets_keep_no_task_request_or_aiohttp_protocol(
    harness: Harness, sockets: Sockets
) -> None:
    tasks_before = len(asyncio.all_tasks())
    requests_before = alive(web.Request)
    handlers_before = alive(RequestHandler)
    await new_consult(harness)
    opened = []
    for _ in range(5):
        socket = await sockets.therapist(await another_consult(harness))
        await receive(socket, "welcome")
        opened.append(socket)
    await asyncio.sleep(0.1)  # the handlers' last steps
    assert len(harness.app[WEBSOCKETS]) == 5
    assert len(asyncio.all_tasks()) == tasks_before
    assert alive(web.Request) == requests_before
    assert alive(RequestHandler) == handlers_before
    # And they still work.
    for socket in opened:
        await socket.send_json({"v": 1, "type": "ping"})
        await receive(socket, "pong")


async def test_a_relay_within_this_node_is_handed_on_in_the_reads_own_callback(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The negotiation's hot path: no task started for a relay whose receiver
    # is on this node (before, every frame was handled in a task).
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    tasks_for_frames = 0
    work = Connection._work

    def counted(connection: Connection) -> Any:
        nonlocal tasks_for_frames
        tasks_for_frames += 1
        return work(connection)

    monkeypatch.setattr(Connection, "_work", counted)
    await therapist.send_json({"v": 1, "type": "offer", "sdp": "v=0\r\n"})
    assert (await receive(patient, "offer"))["sender"] == "therapist"
    await patient.send_json({"v": 1, "type": "answer", "sdp": "v=0\r\n"})
    assert (await receive(therapist, "answer"))["sender"] == "patient"
    for n in range(8):
        await therapist.send_json(candidate(n))
        assert (await receive(patient, "candidate"))["candidate"] == candidate(n)["candidate"]
    assert tasks_for_frames == 0
    # Anything else still goes through a task: a ping, and a relay refused.
    await therapist.send_json({"v": 1, "type": "ping"})
    await receive(therapist, "pong")
    await patient.close()
    await receive(therapist, "peer-reconnecting")
    await therapist.send_json(candidate(9))
    assert (await receive(therapist, "error"))["code"] == "peer_absent"
    assert tasks_for_frames == 2


async def test_a_relay_that_fails_in_the_reads_callback_cuts_the_socket_and_the_room_hears(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)

    def broken(*_args: Any) -> bool:
        raise RuntimeError("the relay failed")

    # Every socket's route, the patient's among them.
    monkeypatch.setattr(Route, "__call__", broken)
    with capture_logs() as logs:
        await patient.send_json(candidate(1))
        message = await patient.receive(timeout=5)
        # Cut, not closed with 1011 by the frame parser that called it.
        assert message.type in (WSMsgType.CLOSED, WSMsgType.ERROR)
        assert (await receive(therapist, "peer-reconnecting"))["role"] == "patient"
    failed = [e for e in logs if e["event"].startswith("a signaling frame could not be handled")]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"


async def test_relays_and_other_frames_sent_at_once_keep_their_order(
    harness: Harness, sockets: Sockets
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    for n in range(30):
        await therapist.send_json(candidate(n))
        if n % 7 == 0:
            # Handled in a task: the candidates behind it wait for it.
            await therapist.send_json({"v": 1, "type": "ping"})
    got = [(await receive(patient, "candidate"))["candidate"] for _ in range(30)]
    assert got == [candidate(n)["candidate"] for n in range(30)]
    for _ in range(5):
        await receive(therapist, "pong")


async def test_a_relays_route_is_found_again_when_the_receiver_is_replaced_leaves_or_returns(
    harness: Harness, sockets: Sockets
) -> None:
    # A sender's route (signaling.relay.Route) is kept between relays while
    # the room and the subscriptions stay as they were: each change below
    # must send the next relay to the socket that holds the patient now.
    setup, therapist, laptop = await admitted_pair(harness, sockets)
    await therapist.send_json(candidate(1))
    assert (await receive(laptop, "candidate"))["candidate"] == candidate(1)["candidate"]
    # Replaced by a second device: the next relay goes to the phone.
    phone = await sockets.patient(setup.invite_token)
    await receive(phone, "welcome")
    await receive(laptop, "replaced")
    await receive(therapist, "peer-rejoined")
    await therapist.send_json(candidate(2))
    assert (await receive(phone, "candidate"))["candidate"] == candidate(2)["candidate"]
    # Gone: refused as such, not written to a socket that closed.
    await phone.close()
    await receive(therapist, "peer-reconnecting")
    await therapist.send_json(candidate(3))
    assert (await receive(therapist, "error"))["code"] == "peer_absent"
    # Back: the relay reaches the new socket, and it alone.
    back = await sockets.patient(setup.invite_token)
    await receive(back, "welcome")
    await receive(therapist, "peer-rejoined")
    await therapist.send_json(candidate(4))
    assert (await receive(back, "candidate"))["candidate"] == candidate(4)["candidate"]
    # And the patient's own route, kept from before, the other way.
    await back.send_json(candidate(5))
    assert (await receive(therapist, "candidate"))["candidate"] == candidate(5)["candidate"]


async def test_frames_relayed_from_one_read_leave_in_one_write_when_the_read_is_handled(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    flush = Outbox.flush

    def counted(outbox: Outbox) -> None:
        writes.append(len(outbox._frames))
        flush(outbox)

    monkeypatch.setattr(Outbox, "flush", counted)
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    writes.clear()
    # Ten candidates in one write of the client: one read of the server.
    frames = b"".join(masked(json.dumps(candidate(n))) for n in range(10))
    therapist._writer.transport.write(frames)
    got = [(await receive(patient, "candidate"))["candidate"] for _ in range(10)]
    assert got == [candidate(n)["candidate"] for n in range(10)]
    assert writes == [10]


def masked(text: str) -> bytes:
    """A client's text frame (masked, as RFC 6455 requires), under 126 bytes."""
    mask = b"\x01\x02\x03\x04"
    data = text.encode()
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return bytes([0x81, 0x80 | len(data)]) + mask + body


def candidate(n: int) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "candidate",
        "candidate": f"candidate:{n} 1 udp 1 127.0.0.1 {n} typ host",
    }


async def test_a_clients_ping_is_answered_with_its_payload(
    harness: Harness, sockets: Sockets
) -> None:
    setup = await new_consult(harness)
    socket = await harness.client.ws_connect(
        f"/ws?consult={setup.consult_id}", headers=harness.headers, autoping=False
    )
    await receive(socket, "welcome")
    await socket.ping(b"are you there")
    message = await socket.receive(timeout=5)
    assert (message.type, message.data) == (WSMsgType.PONG, b"are you there")
    await socket.close()


async def test_a_client_that_closes_gets_the_closing_handshake_and_leaves_the_room(
    harness: Harness, sockets: Sockets
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    assert await patient.close(code=4000)
    # The server answered the close frame (aiohttp's client waits for it).
    assert patient.close_code == 1000
    assert (await receive(therapist, "peer-reconnecting"))["role"] == "patient"
    async with asyncio.timeout(5):
        while len(harness.app[WEBSOCKETS]) != 1:  # noqa: ASYNC110 (its end comes right after)
            await asyncio.sleep(0.01)


async def test_a_bye_sent_just_before_the_close_is_still_handled(
    harness: Harness, sockets: Sockets
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    await patient.send_json({"v": 1, "type": "bye"})
    await patient.close()
    # A bye is leaving for good: peer-left, not the grace of a dropped socket.
    assert (await receive(therapist, "peer-left"))["role"] == "patient"


async def test_a_frame_over_the_limit_closes_with_1009_and_the_room_hears(
    harness: Harness, sockets: Sockets
) -> None:
    _setup, therapist, patient = await admitted_pair(harness, sockets)
    await patient.send_str("x" * (MAX_FRAME_BYTES + 1))
    message = await patient.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE
    assert message.data == 1009
    assert (await receive(therapist, "peer-reconnecting"))["role"] == "patient"


class Echo:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.gone = asyncio.Event()

    def received_now(self, data: str | bytes) -> bool:
        return False

    async def received(self, data: str | bytes) -> None:
        assert isinstance(data, str)
        self.connection.transport.write(b"\x81" + bytes([len(data)]) + data.encode())

    async def ended(self) -> None:
        self.gone.set()


ECHOES = web.AppKey("echoes", list[Echo])


def echo_app() -> web.Application:
    echoes: list[Echo] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        websocket = web.WebSocketResponse(compress=False)
        await websocket.prepare(request)
        connection = Connection.take_over(request, websocket)
        echo = Echo(connection)
        echoes.append(echo)
        connection.start(echo)
        Connection.release(request, websocket)
        return websocket

    app = web.Application()
    app[ECHOES] = echoes
    app.router.add_get("/echo", handler)
    return app


async def test_many_frames_in_one_read_are_handled_in_order(aiohttp_client: Any) -> None:
    app = echo_app()
    client = await aiohttp_client(app)
    socket = await client.ws_connect("/echo")
    words = [f"w{n}" for n in range(200)]
    for word in words:
        await socket.send_str(word)
    got = [(await socket.receive(timeout=5)).data for _ in words]
    assert got == words
    await socket.close()
    await asyncio.wait_for(app[ECHOES][0].gone.wait(), 5)


async def test_a_compressed_socket_is_refused(aiohttp_client: Any) -> None:
    refusals: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        websocket = web.WebSocketResponse(compress=True)
        await websocket.prepare(request)
        try:
            Connection.take_over(request, websocket)
        except ValueError as err:
            refusals.append(str(err))
        await websocket.close()
        return websocket

    app = web.Application()
    app.router.add_get("/ws", handler)
    client = await aiohttp_client(app)
    socket = await client.ws_connect("/ws", compress=15)
    assert socket.compress == 15  # negotiated: our frames would be wrong here
    await socket.receive(timeout=5)
    assert refusals == ["the connection writes its own frames: open the socket with compress=False"]


async def test_frames_sent_with_the_upgrade_request_are_handled_in_order(
    aiohttp_client: Any,
) -> None:
    # A client should wait for the 101 (RFC 6455, 4.1); one that sends its
    # first frames with the upgrade request has them parsed by aiohttp during
    # the handshake, and the connection takes them over, first and in order.
    app = echo_app()
    client = await aiohttp_client(app)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + masked("first")
        + masked("second")
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    frames = await asyncio.wait_for(reader.readexactly(2 * (2 + 5) + 1), 5)
    assert frames == b"\x81\x05first\x81\x06second"
    writer.close()
    await asyncio.wait_for(app[ECHOES][0].gone.wait(), 5)


async def raw_client(client: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client of the echo app on a bare TCP connection, past its 101."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_a_client_that_never_answers_the_close_is_cut_after_the_handshake_time(
    aiohttp_client: Any,
) -> None:
    app = echo_app()
    client = await aiohttp_client(app)
    reader, writer = await raw_client(client)
    async with asyncio.timeout(5):
        while not app[ECHOES]:  # noqa: ASYNC110 (the handler's last step)
            await asyncio.sleep(0.01)
    (echo,) = app[ECHOES]
    loop = asyncio.get_running_loop()
    started = loop.time()
    closing = asyncio.create_task(echo.connection.close(code=4001, message=b"test"))
    # The close frame: 4001 and its reason.
    assert await asyncio.wait_for(reader.readexactly(8), 5) == b"\x88\x06\x0f\xa1test"
    # The client does not answer: the server cuts the connection.
    assert await asyncio.wait_for(reader.read(), CLOSE_HANDSHAKE_S + 3) == b""
    assert loop.time() - started >= CLOSE_HANDSHAKE_S - 0.1
    assert await asyncio.wait_for(closing, 1) is True
    await asyncio.wait_for(echo.gone.wait(), 5)
    writer.close()


async def test_text_that_is_not_utf8_closes_with_1007(aiohttp_client: Any) -> None:
    app = echo_app()
    client = await aiohttp_client(app)
    reader, writer = await raw_client(client)
    mask = b"\x00\x00\x00\x00"
    writer.write(bytes([0x81, 0x80 | 2]) + mask + b"\xff\xfe")
    # The close frame: 1007, as docs/protocol.md says.
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x88\x02\x03\xef"
    writer.close()


async def test_a_fragmented_control_frame_closes_with_1002(aiohttp_client: Any) -> None:
    app = echo_app()
    client = await aiohttp_client(app)
    reader, writer = await raw_client(client)
    # A ping without FIN: control frames may not be fragmented (RFC 6455, 5.5).
    writer.write(bytes([0x09, 0x80]) + b"\x00\x00\x00\x00")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x88\x02\x03\xea"
    writer.close()


def _masked_ping(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return struct.pack("!BB", 0x89, 0x80 | len(payload)) + mask + body


async def test_a_ping_flood_from_a_client_that_never_reads_is_cut_off(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    """Found in review: pongs were written past the outbox's high-water mark,
    and a client sending pings and reading nothing made the node hold its
    pongs without bound (each ping also counted as a sign of life)."""
    harness = sqlite_harness
    setup = await new_consult(harness)
    ticket = await sqlite_sockets.ticket(setup.invite_token)
    server = harness.client.server
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=raw)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws?ticket={ticket} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Origin: {harness.headers['Origin']}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await writer.drain()
        assert b" 101 " in await asyncio.wait_for(reader.readline(), 5)
        ping = _masked_ping(b"x" * 125)
        for _ in range(100):  # the handler goes on after the 101: its room, its welcome
            if harness.app[WEBSOCKETS]:
                break
            await asyncio.sleep(0.02)
        [connection] = harness.app[WEBSOCKETS]
        most = 0
        for _ in range(64):  # 8 MB of pings, nothing read
            if writer.transport.is_closing():
                break
            writer.write(ping * 1000)
            await asyncio.sleep(0.01)
            if not connection.transport.is_closing():
                most = max(most, connection.transport.get_write_buffer_size())
        assert most <= 1024 * 1024, f"{most} bytes of pongs held for a client that reads nothing"
        assert connection.closed  # closed with 1008, and cut after the close handshake's wait
        await asyncio.sleep(CLOSE_HANDSHAKE_S + 0.5)
        assert connection not in harness.app[WEBSOCKETS]
    finally:
        writer.close()
