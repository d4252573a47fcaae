"""The signaling sockets' WebSocket heartbeat: a peer that answers no ping is
closed, one that answers stays, and an idle socket costs no timer of its own
(one periodic round pings them all, docs/benchmarks.md "Lean connections")."""

from __future__ import annotations

import asyncio
import gc
import socket
import time

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.helpers import TimeoutHandle

from server.app_keys import WEBSOCKETS
from tests.support.harness import Harness, Sockets, new_consult, receive

HEARTBEAT_S = 1


def timers() -> int:
    """The event loop's timers alive now (a socket with a timer of its own
    adds one). Not counted: cancelled ones, which wait in the loop's heap for
    a while, and aiohttp's ``TimeoutHandle``s, which are the test client's own
    (one per client socket) and a loaded machine's requests in flight."""
    gc.collect()
    counted = [
        o
        for o in gc.get_objects()
        if isinstance(o, asyncio.TimerHandle)
        and not o.cancelled()
        and not isinstance(getattr(getattr(o, "_callback", None), "__self__", None), TimeoutHandle)
    ]
    return len(counted)


async def closed_within(socket: ClientWebSocketResponse, seconds: float) -> tuple[float, int]:
    """Read (without answering pings) until the server closes the socket; return
    how long it took and how many pings came first. Fails after ``seconds``."""
    started = time.monotonic()
    pings = 0
    while True:
        left = seconds - (time.monotonic() - started)
        assert left > 0, f"still open after {seconds} s ({pings} pings)"
        message = await socket.receive(timeout=left)
        if message.type is WSMsgType.PING:
            pings += 1
        elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return time.monotonic() - started, pings


async def deaf_therapist(harness: Harness) -> ClientWebSocketResponse:
    """A therapist's socket past its welcome whose client answers no ping by itself."""
    setup = await new_consult(harness)
    socket = await harness.client.ws_connect(
        f"/ws?consult={setup.consult_id}", headers=harness.headers, autoping=False
    )
    await receive(socket, "welcome")
    return socket


@pytest.mark.settings(signaling_heartbeat_s=HEARTBEAT_S)
async def test_a_peer_that_answers_no_ping_is_closed(harness: Harness) -> None:
    socket = await deaf_therapist(harness)
    try:
        took_s, pings = await closed_within(socket, 6 * HEARTBEAT_S)
    finally:
        await socket.close()
    assert pings >= 1
    # Rounds every half heartbeat: pinged at the second round after it
    # opened, dropped at the third, so not before a heartbeat has passed
    # (counted here from the welcome, which left a moment after it opened).
    assert took_s >= 0.8 * HEARTBEAT_S


@pytest.mark.settings(signaling_heartbeat_s=HEARTBEAT_S)
async def test_a_silent_peer_that_answers_pings_stays(harness: Harness) -> None:
    sockets = Sockets(harness)
    setup = await new_consult(harness)
    try:
        therapist = await sockets.therapist(setup.consult_id)
        await receive(therapist, "welcome")
        # Four heartbeats of silence; aiohttp's client answers the pings while
        # it waits for a message.
        reading = asyncio.create_task(therapist.receive_json())
        await asyncio.sleep(4 * HEARTBEAT_S)
        assert not reading.done()
        await therapist.send_json({"v": 1, "type": "ping"})
        assert (await asyncio.wait_for(reading, 5))["type"] == "pong"
        assert not therapist.closed
    finally:
        await sockets.close()


@pytest.mark.settings(signaling_heartbeat_s=HEARTBEAT_S)
async def test_a_client_ping_is_answered(harness: Harness) -> None:
    socket = await deaf_therapist(harness)
    try:
        await socket.ping(b"are you there")
        while True:
            message = await socket.receive(timeout=5)
            if message.type is WSMsgType.PONG:
                break
            assert message.type is WSMsgType.PING, message  # the server's own, unanswered
        assert message.data == b"are you there"
    finally:
        await socket.close()


async def test_idle_sockets_hold_no_timer_each(harness: Harness) -> None:
    sockets = Sockets(harness)
    consults = [(await new_consult(harness)).consult_id]
    for _ in range(19):  # the same therapist's
        response = await harness.post("/api/consults", {})
        assert response.status == 201, await response.text()
        consults.append((await response.json())["consult"]["id"])
    before = timers()
    try:
        for consult_id in consults:
            await receive(await sockets.therapist(consult_id), "welcome")
        await asyncio.sleep(0.1)
        # 20 open sockets; a timer each (aiohttp's own heartbeat) would add 20.
        assert timers() - before < 10
    finally:
        await sockets.close()


@pytest.mark.settings(signaling_heartbeat_s=HEARTBEAT_S)
async def test_a_peer_gone_silent_with_bytes_waiting_for_it_is_dropped_all_the_same(
    harness: Harness,
) -> None:
    """Found in review: the heartbeat dropped a silent peer with the
    transport's close(), which waits until what is queued for the peer has
    left. A client that stopped reading (a frozen tab) while bytes still
    waited for it was never dropped, and the room never heard it had gone."""
    sockets = Sockets(harness)
    setup = await new_consult(harness)
    server = harness.client.server
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    try:
        therapist = await sockets.therapist(setup.consult_id)
        await receive(therapist, "welcome")
        ticket = await sockets.ticket(setup.invite_token)
        await asyncio.get_running_loop().sock_connect(raw, (server.host, server.port))
        raw.sendall(
            f"GET /ws?ticket={ticket} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Origin: {harness.headers['Origin']}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await receive(therapist, "patient-waiting")
        port = raw.getsockname()[1]
        [patient] = [
            c for c in harness.app[WEBSOCKETS] if c.transport.get_extra_info("peername")[1] == port
        ]
        # A real network's send buffer, not loopback's megabytes, and a frame
        # of 40 KB (under the outbox's 64 KiB mark) that the kernel cannot
        # take all of: the rest waits in the server, as for a tab that froze.
        patient.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        patient.transport.write(b"\x82\x7e\xa0\x00" + b"\x00" * 40960)
        await asyncio.sleep(0.2)
        assert patient.transport.get_write_buffer_size() > 0
        # Silent from here: pinged at a round, dropped at the next.
        left = await therapist.receive_json(timeout=6 * HEARTBEAT_S)
        assert (left["type"], left["role"]) == ("peer-left", "patient"), left
        for _ in range(100):  # the connection's end is handled just after
            if patient not in harness.app[WEBSOCKETS]:
                break
            await asyncio.sleep(0.02)
        assert patient not in harness.app[WEBSOCKETS]
    finally:
        raw.close()
        await sockets.close()
