"""The server's CPU per relayed frame on one node, without the network's noise.

    .venv/bin/python bench/relay_path.py [--frames 200000] [--runs 5] [--profile]

The real parts of the hot path, in one process on uvloop: a sender's
:class:`~server.ws.connection.Connection` is fed masked client frames
(``data_received``, as the transport would), its
:class:`~server.ws.reader.Conversation` relays each through the real
:class:`~signaling.relay.Relay`, in-process room store and broker, to the
receiver's :class:`~server.ws.outbox.Outbox`, whose connection writes to one
end of a socket pair; the other end is read and thrown away. Each frame is
fed alone and the loop turns once after it, as in a strict ping-pong: the
outbox's flush and its ``write(2)`` are in the figure, the sender's
``read(2)`` and the poll are not.

The mix is the ping-pong benchmark's (bench/signaling_load.py --shape
pingpong): per negotiation an offer and an answer of 3.8 KB and 16
candidates of about 250 B. Reported: µs of this process's CPU per frame,
median of the runs. Not a test; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from server.metrics import Metrics
from server.ws.connection import Connection
from server.ws.outbox import Outbox
from server.ws.reader import Conversation
from signaling.inprocess import InProcessBroker, InProcessRoomStore
from signaling.protocol import ParticipantRole
from signaling.ratelimit import TokenBucket
from signaling.relay import Relay
from signaling.state import Participant, Presence, RoomPhase

SDP = "v=0\r\n" + "a=candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host\r\n" * 62


def masked(text: str) -> bytes:
    """One client text frame (masked, as RFC 6455 requires of clients)."""
    payload = text.encode()
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    size = len(payload)
    if size < 126:
        header = bytes([0x81, 0x80 | size])
    else:
        header = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    return header + key + body


def negotiation() -> list[bytes]:
    frames = [masked(json.dumps({"v": 1, "type": "offer", "sdp": SDP}))]
    frames.append(masked(json.dumps({"v": 1, "type": "answer", "sdp": SDP})))
    for i in range(16):
        candidate = (
            f"candidate:{i} 1 udp 2122260223 192.0.2.{i} 544{i:02d} typ host generation 0"
            " ufrag abcd network-id 1 network-cost 10 " + "x" * 90
        )
        frames.append(
            masked(
                json.dumps(
                    {
                        "v": 1,
                        "type": "candidate",
                        "candidate": candidate,
                        "sdpMid": "0",
                        "sdpMLineIndex": 0,
                    }
                )
            )
        )
    return frames


async def _transport(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> asyncio.Transport:
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
    return transport


class _Conversation(Conversation):
    __slots__ = ()

    async def ended(self) -> None:
        """Nothing to let go of: no app, no heartbeat round, no session registry."""


async def setup(loop: asyncio.AbstractEventLoop) -> tuple[Connection, socket.socket, socket.socket]:
    consult_id = uuid.uuid4()
    store, broker = InProcessRoomStore(), InProcessBroker()
    async with store.locked(consult_id, create=True) as state:
        assert state is not None
        state.phase = RoomPhase.ACTIVE
        state.therapist = Presence("t")
        state.patient = Presence("p")
    relay = Relay(store, broker)
    rooms = SimpleNamespace(relay_route=relay.route)
    metrics = Metrics()

    a_server, a_client = socket.socketpair()
    b_server, b_client = socket.socketpair()
    b_client.setblocking(False)
    sender = Connection(await _transport(loop, a_server), 1 << 20)
    receiver = Connection(await _transport(loop, b_server), 1 << 20)
    sender.transport.set_protocol(sender)
    receiver.transport.set_protocol(receiver)
    outbox = Outbox(receiver, "p")
    await outbox.open([])
    await broker.subscribe(
        consult_id, ParticipantRole.PATIENT, outbox.deliver, deliver_now=outbox.deliver_now
    )
    therapist = Participant(consult_id, ParticipantRole.THERAPIST, "t")
    conversation = object.__new__(_Conversation)
    for name, value in {
        "_app": None,
        "_rooms": rooms,
        "_metrics": metrics,
        "_max_refused": 10,
        "connection": sender,
        "participant": therapist,
        "outbox": Outbox(sender, "t"),
        "_subscription": None,
        "_session_hash": None,
        "_bucket": TokenBucket(rate=1e9, burst=10**9, now=time.monotonic()),
        "_refused_in_a_row": 0,
        "_route": relay.route(therapist),
        "_parsed": None,
    }.items():
        setattr(conversation, name, value)
    sender.start(conversation)
    return sender, b_client, a_client


async def run(n: int, profile: bool) -> float:
    loop = asyncio.get_running_loop()
    sender, drain, _keep = await setup(loop)
    frames = negotiation()
    turn = asyncio.sleep
    profiler = cProfile.Profile() if profile else None
    # Warm up.
    for i in range(2000):
        sender.data_received(frames[i % len(frames)])
        await turn(0)
        while True:
            try:
                drain.recv(1 << 16)
            except BlockingIOError:
                break
    got = 0
    started = time.process_time()
    if profiler:
        profiler.enable()
    for i in range(n):
        sender.data_received(frames[i % len(frames)])
        await turn(0)
        if i % 8 == 7:
            while True:
                try:
                    got += len(drain.recv(1 << 16))
                except BlockingIOError:
                    break
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    spent = time.process_time() - started
    if got == 0:
        raise SystemExit("nothing was relayed")
    return spent / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="one run under cProfile")
    args = parser.parse_args()
    if args.profile:
        uvloop.run(run(args.frames // 4, True))
        return
    figures = [uvloop.run(run(args.frames, False)) for _ in range(args.runs)]
    print("µs of CPU per relayed frame:", ", ".join(f"{f:.2f}" for f in figures))
    print(f"median {statistics.median(figures):.2f}")


if __name__ == "__main__":
    main()
