"""A signaling socket that closed is freed at once, not left to the cycle collector.

Found by the soak (bench/soak.py, docs/benchmarks.md "Soak"): aiohttp kept
a reference cycle around every server-side WebSocket, so each closed socket,
with its request, transport and buffers, waited for a full collection, and
the server's memory grew with every consult. The socket has since left
aiohttp's request handler (server/ws/connection.py); its connection, its
outbox and its conversation refer to each other while open, and must let go
of each other when it ends.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from aiohttp import web

from server.ws.connection import Connection
from tests.support.harness import Harness, Sockets, new_consult, receive

OFFER = {"v": 1, "type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\n"}


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    """The cycle collector off: what is freed is freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def server_sockets() -> list[Connection]:
    return [o for o in gc.get_objects() if isinstance(o, Connection)]


def aiohttp_sockets() -> list[web.WebSocketResponse]:
    return [o for o in gc.get_objects() if isinstance(o, web.WebSocketResponse)]


@pytest.mark.usefixtures("no_cycle_collector")
async def test_the_sockets_of_an_ended_consult_are_freed_without_the_cycle_collector(
    sqlite_harness: Harness, sqlite_sockets: Sockets
) -> None:
    setup = await new_consult(sqlite_harness)
    assert server_sockets() == []
    therapist = await sqlite_sockets.therapist(setup.consult_id)
    await receive(therapist, "welcome")
    patient = await sqlite_sockets.patient(setup.invite_token)
    await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    await receive(therapist, "peer-joined")
    await therapist.send_json(OFFER)
    await receive(patient, "offer")
    assert len(server_sockets()) == 2
    # aiohttp's socket objects went when the handshake was done
    # (server/ws/connection.py), by reference counting too.
    assert aiohttp_sockets() == []

    await therapist.send_json({"v": 1, "type": "end"})
    await receive(therapist, "consult-ended")
    await receive(patient, "consult-ended")
    await sqlite_sockets.close()
    for _ in range(100):  # up to 5 s: each socket's end runs once it is closed
        if not server_sockets():
            break
        await asyncio.sleep(0.05)
    assert server_sockets() == []
