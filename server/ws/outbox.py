"""Everything the server sends on one signaling socket, written as RFC 6455 frames."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from server.ws.connection import AFTER_READ, CLOSE_HANDSHAKE_S, Connection, control_frame
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

    Frames written while one read is handled go out together, in one system
    call, when the read's callback ends (:data:`~server.ws.connection.AFTER_READ`):
    an offer and the trickle candidates behind it usually arrive in one
    read, and are passed on in one write. Frames written elsewhere (a task,
    a timer) go out when the current turn of the event loop ends. Nothing
    waits longer than that.

    The frames are made here (:meth:`_write`) and go to the
    connection's transport; its pings' answers and its close frame go beside
    them (:class:`~server.ws.connection.Connection`), the close frame after
    what is queued here.

    A client that does not read (its send buffer would pass the transport's
    high-water mark) is closed with 1008 rather than waited for; closes run
    in the background, so that the publisher never waits for a closing
    handshake.

    The outbox also keeps the socket's WebSocket heartbeat, without a timer of
    its own: every read of the connection sets its ``quiet`` back to 0, and one
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
        connection.before_close = self.flush

    async def deliver(self, delivery: Delivery) -> None:
        self.deliver_now(delivery)

    def deliver_now(self, delivery: Delivery) -> None:
        """Write ``delivery`` (it never waits: see the class's docstring)."""
        connection_id = delivery.connection_id
        if connection_id is not None and connection_id != self._connection_id:
            return
        if self._closing is not None or self._connection.closed:
            return
        if not self._ready:
            self._pending.append(delivery)
            return
        text = delivery.text
        self._write(
            json.dumps(delivery.message) if text is None else text,
            close_code=delivery.close_code,
        )

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

    def beat(self) -> None:
        """One heartbeat round (every half ``signaling.heartbeat_s``): a socket
        silent for a round is pinged at the next; one still silent a round
        after its ping is dropped, as a peer that is gone (the read loop then
        ends, and the room hears of it)."""
        connection = self._connection
        connection.quiet += 1
        if connection.quiet == PING_AFTER_ROUNDS:
            if not self._transport.is_closing() and not self._connection.closed:
                # A heartbeat round runs in a timer, never within a read.
                if not self._frames:
                    self._loop.call_soon(self.flush)
                self._frames.append(PING_FRAME)
                self._framed_bytes += len(PING_FRAME)
        elif connection.quiet > PING_AFTER_ROUNDS:
            # Gone: abort, not close. A close waits until what is queued for
            # the peer has left, which a client that stopped reading (a frozen
            # tab) never lets happen; the room would never hear it went.
            self._transport.abort()

    def _write(self, text: str, *, close_code: int | None = None) -> None:
        # The hot path of every relayed message: one unmasked, unfragmented
        # text frame (RFC 6455, 5.2), as a server sends it: FIN set, RSV1 to
        # RSV3 clear (no compression), opcode 1.
        transport = self._transport
        if transport.is_closing():
            return  # gone; the reader notices and the room hears of it
        payload = text.encode()
        size = len(payload)
        if size < 126:
            frame = _SHORT_HEADERS[size] + payload
        elif size < 1 << 16:
            frame = _MEDIUM_HEADER(0x81, 126, size) + payload
        else:
            frame = _LONG_HEADER(0x81, 127, size) + payload
        size = len(frame)
        # Bytes wait in user space only once the kernel's buffer is full,
        # i.e. when the client has stopped reading. A write past the
        # transport's high-water mark would make the publisher (the other
        # participant's task) wait for this client: close it instead.
        queued = transport.get_write_buffer_size() + self._framed_bytes
        if queued > 0 and queued + size > self._high_water:
            self._close_later(CloseCode.POLICY_VIOLATION)
            return
        frames = self._frames
        if not frames:
            if AFTER_READ.reading:
                AFTER_READ.due.append(self.flush)
            else:
                self._loop.call_soon(self.flush)
        frames.append(frame)
        self._framed_bytes += size
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
        if len(frames) == 1:
            self._transport.write(frames[0])
        else:
            self._transport.writelines(frames)

    def _close_later(self, code: int) -> None:
        if self._closing is None:
            self.flush()
            self._closing = asyncio.create_task(self._connection.close(code=code))


# A ping without a payload.
PING_FRAME = control_frame(0x89, b"")
# The header of a text frame of each size below 126 bytes, and the two
# longer forms (a 16-bit size, a 64-bit one).
_SHORT_HEADERS = tuple(struct.pack("!BB", 0x81, size) for size in range(126))
_MEDIUM_HEADER = struct.Struct("!BBH").pack
_LONG_HEADER = struct.Struct("!BBQ").pack
