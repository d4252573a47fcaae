"""The recorder as the signaling process sees it: a worker process per recording.

:class:`WorkerRecorder` has :class:`~signaling.recorder.ConsultRecorder`'s
async interface and runs one in a fresh ``python -m signaling.recorder_worker``
(:mod:`signaling.recorder_worker`), talking to it over its stdin and stdout
(:mod:`signaling.recorder_channel`). So the media (SRTP, the tap, muxing,
encrypting, writing) never holds the event loop that relays the consults,
and a recorder that crashes takes nothing else with it.

Failure modes:

- The worker exits or is killed while recording: ``on_failure`` is called
  with ``recorder_failed``; :meth:`WorkerRecorder.stop` then returns an
  incomplete result (the file ends at its last whole chunk, readable).
- The worker does not answer a stop within ``STOP_TIMEOUT_S``: it is killed,
  and the result is incomplete.
- The signaling process dies: the worker's stdin ends, and it stops the
  recorder and exits by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import structlog

from audit.recordings import RecordingFile
from signaling.protocol import ParticipantRole
from signaling.recorder_channel import (
    MAX_LINE_BYTES,
    ChannelError,
    ErrorKind,
    Event,
    Op,
    decode,
    encode,
    file_to_wire,
    roles_from_wire,
    roles_to_wire,
)
from signaling.recording_types import (
    Failure,
    InvalidOffer,
    OnFailure,
    RecorderError,
    StopResult,
    remux_budget_s,
)

_log = structlog.get_logger("videoconsult.recorder")

# A stop closes the container and the file: well under a second; a worker
# that takes this long is stuck, and is killed.
STOP_TIMEOUT_S = 10.0
# A worker starts in a second or two (its imports); one that is not ready
# after this is taken for failed.
WORKER_START_TIMEOUT_S = 30.0
# After its stdin is closed, how long a worker gets to exit before it is killed.
EXIT_TIMEOUT_S = 5.0
# -P: the server's working directory (its data directory, in the image) is
# not put on the worker's import path; the package is installed.
WORKER_COMMAND = (sys.executable, "-P", "-m", "signaling.recorder_worker")
# What the worker's environment keeps of the server's: what Python, the C
# libraries and the locale read, and nothing else. The server's holds the
# root master key, the database's password and the TURN secret (where the
# deployment puts them); the worker parses media from the network and needs
# none of them (its data key comes over its stdin).
WORKER_ENVIRONMENT = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}
)
WORKER_ENVIRONMENT_PREFIXES = ("LC_", "PYTHON")
# The worker's log lines are redacted on the signaling loop: each is cut to
# this, and no more than this many a second are passed on.
MAX_LOG_LINE_BYTES = 4096
MAX_LOG_LINES_PER_S = 50
_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` a recorder worker is started with."""
    return {
        name: value
        for name, value in environ.items()
        if name in WORKER_ENVIRONMENT or name.startswith(WORKER_ENVIRONMENT_PREFIXES)
    }


class WorkerGone(RecorderError):
    """The recorder worker exited (or could not start); the message says how."""


class WorkerRecorder:
    """One recording's recorder in a worker process of its own.

    :meth:`launch` starts the worker (at the consent, so that its start-up
    overlaps with the pages making their offers); the first request starts
    it otherwise. Then as :class:`~signaling.recorder.ConsultRecorder`.
    """

    def __init__(self, *, on_failure: OnFailure) -> None:
        self._on_failure = on_failure
        self._launch: asyncio.Task[asyncio.subprocess.Process] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._roles: frozenset[ParticipantRole] = frozenset()
        self._plaintext_bytes = 0
        self._ready = asyncio.Event()
        self._failure_reported = False
        self._stopping: asyncio.Task[StopResult] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.media_type: str | None = None

    @property
    def roles(self) -> frozenset[ParticipantRole]:
        """The participants whose offers were answered."""
        return self._roles

    @property
    def pid(self) -> int | None:
        """The worker's process id, once it runs."""
        return self._process.pid if self._process is not None else None

    def launch(self) -> None:
        """Start the worker process, unless started already (needs a running loop)."""
        if self._launch is None:
            self._launch = asyncio.get_running_loop().create_task(self._spawn())

    async def _spawn(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *WORKER_COMMAND,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=MAX_LINE_BYTES,
            env=worker_environment(os.environ),
            # Its own session: a Ctrl-C at the server's terminal reaches the
            # server, which stops the recording cleanly, not the worker.
            start_new_session=True,
        )
        self._process = process
        assert process.stdout is not None
        assert process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_replies(process.stdout)),
            asyncio.create_task(self._forward_log(process.stderr, process.pid)),
        ]
        _log.info("recorder worker started", worker_pid=process.pid)
        return process

    async def _worker(self) -> asyncio.subprocess.Process:
        self.launch()
        assert self._launch is not None
        try:
            return await asyncio.shield(self._launch)
        except OSError as err:
            raise WorkerGone(f"the recorder worker did not start: {err.strerror}") from err

    async def ready(self) -> None:
        """Return once the worker reads requests; raise :class:`WorkerGone` if it
        exited first, TimeoutError if it is not up within ``WORKER_START_TIMEOUT_S``."""
        async with asyncio.timeout(WORKER_START_TIMEOUT_S):
            await self._worker()
            waiter = asyncio.create_task(self._ready.wait())
            try:
                await asyncio.wait({waiter, self._readers[0]}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if not self._ready.is_set():
            raise WorkerGone("the recorder worker exited before it was ready")

    async def _call(self, op: Op, **fields: Any) -> Any:
        process = await self._worker()
        if process.returncode is not None or process.stdin is None:
            raise WorkerGone(f"the recorder worker has exited (code {process.returncode})")
        request_id = next(self._ids)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            process.stdin.write(encode({"id": request_id, "op": op, **fields}))
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            return await reply
        finally:
            self._pending.pop(request_id, None)

    async def accept_offer(self, role: ParticipantRole, offer_sdp: str) -> str:
        """Answer a participant's recorder offer (in the worker); return the answer's SDP."""
        result = await self._call(Op.ACCEPT_OFFER, role=role.value, sdp=offer_sdp)
        self._roles = roles_from_wire(result["roles"])
        return str(result["sdp"])

    async def wait_connected(self, roles: frozenset[ParticipantRole]) -> None:
        """Return once the recorder connections of ``roles`` are connected."""
        await self._call(Op.WAIT_CONNECTED, roles=roles_to_wire(roles))

    async def start(self, file: RecordingFile) -> None:
        """Start writing into ``file``; the data key crosses only the worker's stdin."""
        result = await self._call(Op.START, file=file_to_wire(file))
        self.media_type = result["media_type"]

    async def stop(self) -> StopResult:
        """Stop the recording and the worker; idempotent. Incomplete when the
        worker was gone, failed to answer in time, or never started."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop())
        return await asyncio.shield(self._stopping)

    async def _stop(self) -> StopResult:
        incomplete = StopResult(False, self._plaintext_bytes, {}, self.media_type)
        if self._launch is None:
            return incomplete
        try:
            await self._worker()
        except WorkerGone:
            return incomplete
        result = incomplete
        try:
            # The worker remuxes a whole file before it answers (its cues).
            async with asyncio.timeout(STOP_TIMEOUT_S + remux_budget_s(self._plaintext_bytes)):
                reply = await self._call(Op.STOP)
            result = StopResult(
                complete=bool(reply["complete"]),
                plaintext_bytes=int(reply["plaintext_bytes"]),
                frames=dict(reply["frames"]),
                media_type=reply["media_type"],
            )
        except TimeoutError:
            _log.error("recorder worker did not stop in time; killed", worker_pid=self.pid)
            self._kill()
        except RecorderError as err:
            _log.warning("recorder worker: the stop failed", error=str(err), worker_pid=self.pid)
        await self._shut_down()
        return result

    async def _shut_down(self) -> None:
        """Close the worker's stdin (it exits), kill it if it does not."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            self._kill()
            await process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def _kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)

    async def _read_replies(self, stdout: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                # A line longer than any of ours: the channel is broken, and
                # a worker that cannot be understood is not left running.
                _log.error("recorder worker: an overlong reply; killed", worker_pid=self.pid)
                self._kill()
                break
            if not line:
                break
            try:
                message = decode(line)
            except ChannelError as err:
                _log.error("recorder worker: a bad reply", error=str(err))
                continue
            try:
                self._take(message)
            except (KeyError, ValueError, TypeError) as err:
                # A reply of the wrong shape is one bad reply, not the end of
                # the reader (which fails the waiting calls when the worker goes).
                _log.error("recorder worker: a bad reply", error=type(err).__name__)
        assert self._process is not None
        code = await self._process.wait()
        gone = WorkerGone(f"the recorder worker exited (code {code})")
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(gone)
        if self._stopping is None:
            _log.error("recorder worker exited", worker_pid=self._process.pid, code=code)
            self._report(Failure.RECORDER_FAILED, f"the recorder worker exited (code {code})")

    def _take(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == Event.READY:
            self._ready.set()
        elif event == Event.PROGRESS:
            self._plaintext_bytes = int(message["plaintext_bytes"])
        elif event == Event.FAILURE:
            self._report(Failure(message["failure"]), str(message.get("detail", "")))
        else:
            reply = self._pending.get(message.get("id", -1))
            if reply is None or reply.done():
                return
            if "error" in message:
                reply.set_exception(_raised(message["error"]))
            else:
                reply.set_result(message.get("ok"))

    def _report(self, failure: Failure, detail: str) -> None:
        if self._failure_reported or self._stopping is not None:
            return
        self._failure_reported = True
        task = asyncio.get_running_loop().create_task(self._on_failure(failure, detail))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _forward_log(self, stderr: asyncio.StreamReader, worker_pid: int) -> None:
        """The worker's log lines, into this process's log (and its redaction).

        Each line is cut to :data:`MAX_LOG_LINE_BYTES` (the redaction runs on
        the signaling loop), and at most :data:`MAX_LOG_LINES_PER_S` a second
        are passed on; the rest are counted and said once a second. The
        reading never stops while the worker lives: a full pipe would block
        the worker's own writes.
        """
        second, passed, dropped = 0, 0, 0
        while True:
            try:
                line = await stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            now = int(time.monotonic())
            if not line or now != second:
                if dropped:
                    _log.warning(
                        "recorder worker: log lines dropped", worker_pid=worker_pid, lines=dropped
                    )
                second, passed, dropped = now, 0, 0
            if not line:
                return
            if passed >= MAX_LOG_LINES_PER_S:
                dropped += 1
                continue
            passed += 1
            try:
                _pass_on(line[:MAX_LOG_LINE_BYTES], worker_pid)
            except Exception as err:  # one odd line never ends the forwarding
                _log.warning("recorder worker: a log line not passed on", error=type(err).__name__)


def _pass_on(line: bytes, worker_pid: int) -> None:
    try:
        fields = json.loads(line)
        event = str(fields.pop("event"))
        level = str(fields.pop("level", "info"))
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not one of its structlog lines (a traceback at exit, a library's
        # print), or one cut short: passed on as text.
        fields, event, level = {"line": line.decode(errors="replace")[:500]}, "", "warning"
        event = "recorder worker output"
    fields.pop("worker_pid", None)
    method = getattr(_log, level if level in _LEVELS else "info")
    method(event, worker_pid=worker_pid, **fields)


def _raised(error: dict[str, Any]) -> Exception:
    """The exception a worker's error reply stands for."""
    message = str(error.get("message", ""))
    kind = error.get("kind")
    if kind == ErrorKind.INVALID_OFFER:
        return InvalidOffer(message)
    if kind == ErrorKind.OS_ERROR:
        return OSError(error.get("errno"), error.get("strerror") or message)
    return RecorderError(message)
