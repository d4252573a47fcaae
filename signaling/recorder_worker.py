"""A recorder worker: one recording's :class:`~signaling.recorder.ConsultRecorder`
in a process of its own (``python -m signaling.recorder_worker``).

Started by :class:`signaling.recorder_proxy.WorkerRecorder`, one per
recording. It reads requests from stdin and writes replies and events to
what was its stdout (:mod:`signaling.recorder_channel`); file descriptor 1
is pointed at stderr first, so that nothing a library prints can garble the
channel. It logs JSON lines to stderr, which the parent reads and writes
into the server's process log (codes and figures only, no personal data).

The worker binds its own UDP ports for the recorder's ICE (the answers it
gives carry its candidates). When stdin ends (the parent stopped it, or
died) it stops the recorder, closing the file as far as it got, and exits:
no orphan goes on recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import structlog

from signaling.protocol import ParticipantRole
from signaling.recorder import ConsultRecorder
from signaling.recorder_channel import (
    MAX_LINE_BYTES,
    ChannelError,
    ErrorKind,
    Event,
    Op,
    decode,
    encode,
    file_from_wire,
    roles_from_wire,
    roles_to_wire,
)
from signaling.recording_types import Failure, InvalidOffer, RecorderError

_log = structlog.get_logger("videoconsult.recorder_worker")

# How often the parent hears how much reached the file.
PROGRESS_INTERVAL_S = 1.0


def _configure_logging() -> None:
    """JSON lines on stderr; aiortc's and aioice's chatter (addresses) left out."""
    handler = logging.StreamHandler(sys.stderr)
    logging.basicConfig(handlers=[handler], level=logging.WARNING, force=True)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class Worker:
    """Serves one recorder over the channel until stdin ends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._recorder = ConsultRecorder(on_failure=self._failed)
        self._requests: set[asyncio.Task[None]] = set()

    def _send(self, message: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode(message))

    async def _failed(self, failure: Failure, detail: str) -> None:
        self._send({"event": Event.FAILURE, "failure": failure.value, "detail": detail})

    async def serve(self) -> None:
        progress = asyncio.create_task(self._report_progress())
        self._send({"event": Event.READY})
        try:
            while line := await self._reader.readline():
                try:
                    message = decode(line)
                except ChannelError as err:
                    _log.error("recorder worker: a bad request", error=str(err))
                    continue
                task = asyncio.create_task(self._handle(message))
                self._requests.add(task)
                task.add_done_callback(self._requests.discard)
        finally:
            progress.cancel()
            # The parent has gone, or is done: close the file as far as it got.
            await self._recorder.stop()
            for task in list(self._requests):
                task.cancel()

    async def _handle(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        try:
            result = await self._perform(message)
        except InvalidOffer as err:
            reply = _error(ErrorKind.INVALID_OFFER, str(err))
        except RecorderError as err:
            reply = _error(ErrorKind.RECORDER_ERROR, str(err))
        except OSError as err:
            reply = _error(ErrorKind.OS_ERROR, str(err), errno=err.errno, strerror=err.strerror)
        except Exception as err:
            _log.exception("recorder worker: a request failed", op=str(message.get("op")))
            reply = _error(ErrorKind.INTERNAL, type(err).__name__)
        else:
            reply = {"ok": result}
        self._send({"id": request_id, **reply})

    async def _perform(self, message: dict[str, Any]) -> Any:
        try:
            op = Op(str(message.get("op")))
        except ValueError as err:
            raise ChannelError(f"no such operation: {message.get('op')!r}") from err
        recorder = self._recorder
        if op is Op.ACCEPT_OFFER:
            role = ParticipantRole(message["role"])
            sdp = await recorder.accept_offer(role, str(message["sdp"]))
            return {"sdp": sdp, "roles": roles_to_wire(recorder.roles)}
        if op is Op.WAIT_CONNECTED:
            await recorder.wait_connected(roles_from_wire(message["roles"]))
            return None
        if op is Op.START:
            await recorder.start(file_from_wire(message["file"]))
            assert recorder.container is not None
            return {"media_type": recorder.container.media_type}
        result = await recorder.stop()
        return {
            "complete": result.complete,
            "plaintext_bytes": result.plaintext_bytes,
            "frames": result.frames,
            "media_type": result.media_type,
        }

    async def _report_progress(self) -> None:
        reported = 0
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            written = self._recorder.plaintext_bytes
            if written != reported:
                reported = written
                self._send({"event": Event.PROGRESS, "plaintext_bytes": written})


def _error(kind: ErrorKind, message: str, **fields: Any) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message, **fields}}


async def _main() -> None:
    loop = asyncio.get_running_loop()
    # The channel is what stdout was; stdout itself now goes to stderr.
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, channel)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    _log.info("recorder worker started", pid=os.getpid())
    try:
        await Worker(reader, writer).serve()
    finally:
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
    _log.info("recorder worker done", pid=os.getpid())


def _run(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop where it is installed (it is, on Linux), as the server runs:
    the worker's loop handles every RTP packet of four streams."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main)
        return
    uvloop.run(main)


def main() -> None:
    _configure_logging()
    # A service manager's SIGTERM reaches every process of the service at
    # once; the server then stops each recording over the channel, which
    # closes its file whole. The worker ends when its stdin does (or is
    # killed by the server when it hangs).
    for ignored in (signal.SIGTERM, signal.SIGINT):
        signal.signal(ignored, signal.SIG_IGN)
    # What the imports made lives as long as the worker: out of the garbage
    # collector's sight, so that its full passes walk only the recording's objects.
    gc.freeze()
    _run(_main())
    sys.stderr.flush()
    # The file is closed and the parent told: nothing is left to tidy, and
    # the interpreter's own shutdown (aiortc's threads, the modules) would
    # keep the parent waiting for the recording's end.
    os._exit(0)


if __name__ == "__main__":
    main()
