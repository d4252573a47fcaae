"""A WebSocket after its handshake, taken out of aiohttp's request machinery.

aiohttp runs a WebSocket inside the request handler that accepted it: the
connection's task, the handler's task with every middleware's frame, the
parsed request with its headers and the 101 response all stay alive until
the socket closes, about 16 KB per socket, and every frame wakes the
handler's task through a future (docs/benchmarks.md, "Lean connections").
A signaling socket is open for a whole consult and mostly idle, so here
aiohttp does what it does well, the handshake (:meth:`Connection.take_over`
after ``WebSocketResponse.prepare``), and then lets go of the connection
(:meth:`Connection.release`): the transport is handed to a
:class:`Connection`, an :class:`asyncio.Protocol` of its own, and the
request, the handler's task and aiohttp's protocol object are freed.

The connection parses frames with aiohttp's own (compiled) frame parser
(:class:`_Frames` takes each one as it is parsed),
answers pings, runs the closing handshake, and hands each text or binary
frame, in order, to its :class:`Conversation`. Nothing runs per socket
while it is idle: a frame the conversation can handle without waiting (a
relay within this node) is handled in the read's own callback
(:meth:`Conversation.received_now`); for the others a task is started
while they wait to be handled, and ends when they are done
(:meth:`Connection._work`).

Taking the transport over and letting aiohttp go use aiohttp's private
parts (its protocol's parser, task and transport, the response's queue and
state, the parser's queue class). They are checked at :meth:`take_over` and the version is pinned
(``pyproject.toml``); the tests of this module fail if a new aiohttp
changes them.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http_websocket import WebSocketError, WebSocketReader

_log = structlog.get_logger("videoconsult.server")

# How long a closing handshake may take before the connection is cut.
CLOSE_HANDSHAKE_S = 2.0
# Received frames waiting to be handled, in characters, above which the
# socket is no longer read (TCP then slows the client down); reading goes on
# below half of it. aiohttp's own queue allowed twice its 64 KiB chunk.
INBOX_HIGH_WATER = 128 * 1024

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_PING = WSMsgType.PING
_CLOSE = WSMsgType.CLOSE


class Conversation(Protocol):
    """What a connection's frames are for."""

    def received_now(self, data: str | bytes) -> bool:
        """One frame, handled at once if it can be without waiting (True);
        False leaves it to :meth:`received`. Called only when no frame
        before it is still waiting, so the order holds either way."""

    async def received(self, data: str | bytes) -> None:
        """One text (``str``) or binary (``bytes``) frame; called in order, one at a time."""

    async def ended(self) -> None:
        """The connection is gone and every frame received before has been handled."""


class Connection(asyncio.Protocol):
    """One WebSocket connection after its handshake (see the module's docstring).

    Writing is the owner's: frames go to :attr:`transport` (the signaling
    socket's :class:`~server.ws.outbox.Outbox` batches them). ``before_close``
    is called before a close frame is written, so that what was queued goes
    out first. Every chunk of data from the client sets :attr:`quiet` to 0.
    """

    __slots__ = (
        "_close_sent",
        "_conversation",
        "_finished",
        "_inbox",
        "_inbox_size",
        "_loop",
        "_lost",
        "_lost_waiter",
        "_parser",
        "_paused",
        "_queue",
        "_refusing",
        "_timer",
        "_worker",
        "before_close",
        "quiet",
        "transport",
    )

    def __init__(self, transport: asyncio.Transport, max_msg_size: int) -> None:
        self.transport = transport
        self._loop = loop = asyncio.get_running_loop()
        self._queue: _Frames | None = _Frames(self, loop)
        self._parser: Any = WebSocketReader(
            self._queue, max_msg_size, compress=False, decode_text=True
        )
        self._conversation: Conversation | None = None
        self._inbox: list[str | bytes] = []
        self._inbox_size = 0
        self._paused = False
        self._worker: asyncio.Task[None] | None = None
        self._finished: asyncio.Task[None] | None = None
        self._close_sent = False
        # We started closing: no frame is handled any more (RFC 6455, 1.4).
        self._refusing = False
        self._lost = False
        self._lost_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.before_close: Callable[[], None] | None = None
        # Heartbeat rounds since the last data from the client (its owner's
        # heartbeat counts them up; every read sets it back).
        self.quiet = 0

    # -- taking over from aiohttp ------------------------------------------

    @classmethod
    def take_over(cls, request: web.Request, websocket: web.WebSocketResponse) -> Connection:
        """Take the prepared ``websocket``'s connection: from now on its frames come here.

        Frames aiohttp parsed already (during the handshake's write) are kept,
        in order; nothing is handled before :meth:`start`.
        """
        if websocket.compress:
            raise ValueError(
                "the connection writes its own frames: open the socket with compress=False"
            )
        transport = request.transport
        parsed = getattr(getattr(websocket, "_reader", None), "_buffer", None)
        if transport is None or parsed is None:
            raise RuntimeError(
                "the WebSocket is not prepared, or this aiohttp keeps its frames elsewhere"
            )
        connection = cls(transport, websocket._max_msg_size)
        transport.set_protocol(connection)
        # Reading is ours to pause from now on (the inbox's limit), not aiohttp's.
        if not transport.is_reading():
            transport.resume_reading()
        # A client may send frames as soon as it has read the 101; if aiohttp
        # parsed any meanwhile, they are the first.
        while parsed:
            message, _size = parsed.popleft()
            connection._frame(message)
        return connection

    @staticmethod
    def release(request: web.Request, websocket: web.WebSocketResponse) -> None:
        """Let aiohttp forget a connection taken over: its handler may return now.

        Call it last in the handler, with no ``await`` after it. aiohttp's
        protocol object is told the connection is gone (its server stops
        counting it), without closing the transport, which is ours; the
        response counts as closed, so aiohttp writes nothing when the handler
        returns it.
        """
        protocol = request.protocol
        protocol._payload_parser = None
        # Not cancelled as a handler whose client went (aiohttp's test server
        # cancels those): this handler is returning.
        protocol._task_handler = None
        # connection_lost would close the transport it still holds.
        protocol.transport = None
        protocol.connection_lost(None)
        websocket._closed = True
        websocket._eof_sent = True

    def start(self, conversation: Conversation) -> None:
        """Hand every frame, from the first, to ``conversation``."""
        self._conversation = conversation
        if self._inbox:
            self._worker = self._loop.create_task(self._work())
        if self._lost:
            self._finish()

    # -- asyncio.Protocol --------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.quiet = 0
        after = AFTER_READ
        after.reading = True
        try:
            failed, _ = self._parser.feed_data(data)
        finally:
            after.reading = False
            if after.due:
                after.run()
        if failed:
            assert self._queue is not None
            self._fail(self._queue.exception())

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        # The parser's queue refers back to this connection: nothing more is
        # parsed, so both go now, not at the cycle collector's next run.
        self._parser = self._queue = None
        self._close_sent = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        if self._conversation is not None:
            self._finish()

    # -- closing -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """A close frame was sent or received, or the connection is gone."""
        return self._close_sent

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"") -> bool:
        """Close with ``code`` after what is queued, and wait (at most
        :data:`CLOSE_HANDSHAKE_S`) for the client's answer. False if the
        connection was closing already."""
        started = not self._close_sent
        self._refusing = True
        if started:
            self._send_close(code, message)
        if not self._lost:
            if self._lost_waiter is None:
                self._lost_waiter = self._loop.create_future()
            await asyncio.shield(self._lost_waiter)
        return started

    async def finished(self) -> None:
        """Wait until the conversation has ended (see :meth:`Conversation.ended`)."""
        if self._finished is not None:
            await asyncio.shield(self._finished)

    def _send_close(self, code: int, message: bytes) -> None:
        if self.before_close is not None:
            self.before_close()
        self._close_sent = True
        if not self.transport.is_closing():
            self.transport.write(close_frame(code, message))
        # The client did not answer: the connection is cut.
        self._timer = self._loop.call_later(CLOSE_HANDSHAKE_S, self.transport.abort)

    def _close_received(self) -> None:
        # What the client sent before its close frame is still handled.
        if not self._close_sent:
            # Answered with 1000, as aiohttp's own WebSocket did.
            self._send_close(WSCloseCode.OK, b"")
        # The server closes the TCP connection first (RFC 6455, 7.1.1).
        self.transport.close()

    def _fail(self, exc: BaseException | None) -> None:
        """The client broke the protocol (a frame too large, bad UTF-8, a bad opcode)."""
        # The frames before the bad one are still handled, as with aiohttp's socket.
        code = exc.code if isinstance(exc, WebSocketError) else WSCloseCode.INTERNAL_ERROR
        if not self._close_sent:
            self._send_close(code, b"")

    # -- frames in ---------------------------------------------------------

    def _frame(self, message: tuple[WSMsgType, Any, Any]) -> None:
        """One frame, parsed (called by the parser, through :class:`_Frames`)."""
        kind, data, _extra = message
        if kind is _TEXT or kind is _BINARY:
            if self._refusing:
                return
            conversation = self._conversation
            if conversation is not None and self._worker is None and not self._inbox:
                try:
                    if conversation.received_now(data):
                        return
                except Exception:
                    # Inside the parser's call: it would only close with 1011, unlogged.
                    self._handling_failed()
                    return
            self._inbox.append(data)
            self._inbox_size += len(data)
            if self._conversation is not None and self._worker is None:
                self._worker = self._loop.create_task(self._work())
            if self._inbox_size > INBOX_HIGH_WATER and not self._paused:
                self._paused = True
                self.transport.pause_reading()
        elif kind is _PING:
            if self._close_sent:
                pass
            elif (
                self.transport.get_write_buffer_size() > self.transport.get_write_buffer_limits()[1]
            ):
                # Pings from a client that reads nothing: its pongs would
                # pile up without bound (the outbox closes at the same mark).
                self._send_close(WSCloseCode.POLICY_VIOLATION, b"")
            else:
                self.transport.write(control_frame(0x8A, bytes(data)))
        elif kind is _CLOSE:
            self._close_received()
        # A pong only says the client is alive (quiet = 0, in data_received).

    async def _work(self) -> None:
        """Handle the frames waiting, in order; end when none is left."""
        conversation = self._conversation
        assert conversation is not None
        inbox = self._inbox
        try:
            while inbox and not self._refusing:
                data = inbox.pop(0)
                self._inbox_size -= len(data)
                if self._paused and self._inbox_size <= INBOX_HIGH_WATER // 2:
                    self._paused = False
                    if not self._lost:
                        self.transport.resume_reading()
                try:
                    await conversation.received(data)
                except Exception:
                    self._handling_failed()
                    return
        finally:
            self._worker = None

    def _handling_failed(self) -> None:
        """As aiohttp did with a handler that failed: logged, and the
        connection cut (the client sees 1006 and reconnects; the room hears)."""
        _log.exception("a signaling frame could not be handled; the socket is cut")
        self._refusing = True
        self.transport.abort()

    def _finish(self) -> None:
        if self._finished is None:
            self._finished = self._loop.create_task(self._end())

    async def _end(self) -> None:
        conversation = self._conversation
        assert conversation is not None
        worker = self._worker
        if worker is not None:
            await asyncio.wait({worker})
        self._inbox.clear()
        try:
            await conversation.ended()
        except Exception:
            _log.exception("a signaling socket's end could not be handled")
        # The conversation refers to this connection: nothing holds it now.
        self._conversation = None
        self.before_close = None


class _AfterRead:
    """What is to be done when a read's callback ends: the outboxes written
    to while its frames were handled flush then, each in one system call,
    rather than in a callback of their own later in the loop's turn."""

    __slots__ = ("due", "reading")

    def __init__(self) -> None:
        # A read's callback is running: writes wait for its end.
        self.reading = False
        self.due: list[Callable[[], None]] = []

    def run(self) -> None:
        due, self.due = self.due, []
        for job in due:
            try:
                job()
            except Exception:
                _log.exception("a write after a read failed")


# One per process: one read's callback runs at a time.
AFTER_READ = _AfterRead()


class _Frames(WebSocketDataQueue):
    """Where aiohttp's frame parser puts each frame: straight to the connection.

    aiohttp's own queue keeps the frames for a task to read; here each one is
    handed on as it is parsed, so nothing is queued and no task waits."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection, loop: asyncio.AbstractEventLoop) -> None:
        # The queue asks its protocol to pause only when frames pile up in it:
        # none ever does here.
        super().__init__(connection, 2**16, loop=loop)  # type: ignore[arg-type]
        self._connection = connection

    def feed_data(self, data: Any, size: int) -> None:
        self._connection._frame(data)


def control_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked control frame (RFC 6455, 5.5): FIN set, at most 125 bytes."""
    payload = payload[:125]
    return struct.pack("!BB", opcode, len(payload)) + payload


def close_frame(code: int, message: bytes) -> bytes:
    """A close frame with ``code`` and a reason of at most 123 bytes."""
    return control_frame(0x88, struct.pack("!H", code) + message[:123])
