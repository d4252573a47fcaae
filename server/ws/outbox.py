"""Everything the server sends on one signaling socket, written as RFC 6455 frames."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from server.ws.connection import CLOSE_HANDSHAKE_S, Connection, control_frame
from signaling.ports import Delivery
from signaling.protocol import CloseCode

# Heartbeat rounds (half a heartbeat each) of silence before a socket is pinged;
# one round more without a frame and it is dropped.
PING_AFTER_ROUNDS = 2


class Outbox:
    """Everything this server sends on one socket, in order.

    Deliveries are written by the publisher's own task, straight to this
    socket: no queue and no task per connection. They wait only until the
    ``welcome`` is out, so it is always the first message. Replies to the
    socket's own messages take the same way, so nothing overtakes.

    Frames written in one turn of the event loop go out together, in one
    system call, when that turn ends: an offer and the trickle candidates
    behind it usually arrive in one read, and are passed on in one write.
    Nothing waits longer than the current turn.

    The frames are made here (:func:`text_frame`) and go to the
    connection's transport; its pings' answers and its close frame go beside
    them (:class:`~server.ws.connection.Connection`), the close frame after
    what is queued here.

    A client that does not read (its send buffer would pass the transport's
    high-water mark) is closed with 1008 rather than waited for; closes run
    in the background, so that the publisher never waits for a closing
    handshake.

    The outbox also keeps the socket's WebSocket heartbeat, without a timer of
    its own: the read loop calls :meth:`heard` on every frame, and one
    periodic round over all sockets (:mod:`server.ws.heartbeat`) calls
    :meth:`beat`, which pings a socket that has been silent and drops one
    that did not answer. An idle socket is a few attributes, no timer.
    """

    __slots__ = (
        "_closing",
        "_connection",
        "_connection_id",
        "_framed_bytes",
        "_frames",
        "_high_water",
        "_loop",
        "_pending",
        "_ready",
        "_transport",
        "quiet",
    )

    def __init__(self, connection: Connection, connection_id: str) -> None:
        self._connection = connection
        self._connection_id = connection_id
        self._ready = False
        self._pending: list[Delivery] = []
        self._closing: asyncio.Task[bool] | None = None
        self._frames: list[bytes] = []
        self._framed_bytes = 0
        # Once the connection is lost its transport reports is_closing().
        transport = connection.transport
        self._transport = transport
        self._high_water = transport.get_write_buffer_limits()[1]
        self._loop = asyncio.get_running_loop()
        # Heartbeat rounds since the last frame from the client.
        self.quiet = 0
        connection.heard = self.heard
        connection.before_close = self.flush

    async def deliver(self, delivery: Delivery) -> None:
        self.deliver_now(delivery)

    def deliver_now(self, delivery: Delivery) -> None:
        """Write ``delivery`` (it never waits: see the class's docstring)."""
        if delivery.connection_id not in (None, self._connection_id):
            return
        if self._closing is not None or self._connection.closed:
            return
        if not self._ready:
            self._pending.append(delivery)
            return
        self._write(delivery.encoded(), close_code=delivery.close_code)

    def send(self, message: dict[str, Any]) -> None:
        """Send one of our own messages (a reply, an error) behind what is queued."""
        if self._closing is None and not self._connection.closed:
            self._write(json.dumps(message))

    async def open(self, first: list[dict[str, Any]]) -> None:
        """Send the first messages, then what arrived meanwhile; from then on write at once."""
        for message in first:
            self._write(json.dumps(message))
        for delivery in self._pending:
            self._write(delivery.encoded(), close_code=delivery.close_code)
        self._pending.clear()
        self._ready = True

    async def close(self, code: CloseCode, message: bytes = b"") -> None:
        """Close after what is queued has gone out."""
        self.flush()
        await self._connection.close(code=code, message=message)

    async def finish(self) -> None:
        """Let a close this outbox started finish its handshake (the peer would see 1006)."""
        if self._closing is not None:
            done, _pending = await asyncio.wait({self._closing}, timeout=CLOSE_HANDSHAKE_S)
            if not done:
                self._closing.cancel()

    def heard(self) -> None:
        """A frame came from the client: it is alive."""
        self.quiet = 0

    def beat(self) -> None:
        """One heartbeat round (every half ``signaling.heartbeat_s``): a socket
        silent for a round is pinged at the next; one still silent a round
        after its ping is dropped, as a peer that is gone (the read loop then
        ends, and the room hears of it)."""
        self.quiet += 1
        if self.quiet == PING_AFTER_ROUNDS:
            if not self._transport.is_closing() and not self._connection.closed:
                self._queue(PING_FRAME)
        elif self.quiet > PING_AFTER_ROUNDS:
            self._transport.close()

    def _queue(self, frame: bytes) -> None:
        if not self._frames:
            self._loop.call_soon(self.flush)
        self._frames.append(frame)
        self._framed_bytes += len(frame)

    def _write(self, text: str, *, close_code: int | None = None) -> None:
        transport = self._transport
        if transport.is_closing():
            return  # gone; the reader notices and the room hears of it
        frame = text_frame(text.encode())
        # Bytes wait in user space only once the kernel's buffer is full,
        # i.e. when the client has stopped reading. A write past the
        # transport's high-water mark would make the publisher (the other
        # participant's task) wait for this client: close it instead.
        queued = transport.get_write_buffer_size() + self._framed_bytes
        if queued > 0 and queued + len(frame) > self._high_water:
            self._close_later(CloseCode.POLICY_VIOLATION)
            return
        self._queue(frame)
        if close_code is not None:
            self._close_later(close_code)

    def flush(self) -> None:
        """Write the queued frames now, in one go."""
        if not self._frames:
            return
        frames, self._frames, self._framed_bytes = self._frames, [], 0
        # After a close frame, nothing else may follow it.
        if self._transport.is_closing() or self._connection.closed:
            return
        self._transport.writelines(frames)

    def _close_later(self, code: int) -> None:
        if self._closing is None:
            self.flush()
            self._closing = asyncio.create_task(self._connection.close(code=code))


# A ping without a payload.
PING_FRAME = control_frame(0x89, b"")


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (RFC 6455, 5.2), as a server sends it:
    FIN set, RSV1 to RSV3 clear (no compression), opcode 1."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload
