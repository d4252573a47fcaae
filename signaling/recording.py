"""Recording with consent: the protocol's side of it, one consult at a time.

The phases (:class:`~signaling.state.RecordingPhase`, kept in the room's
state) and the messages that move between them::

    off ── record-request (therapist) ──▶ requested
    requested ── record-consent agree=false ──▶ off        ("refused")
    requested ── record-consent agree=true ───▶ starting   (consent noted)
    starting ── both recorder connections up ──▶ on        (file opened)
    requested | starting | on ── record-stop, a participant leaving,
        the consult's end, a full disk, a failed recorder ──▶ off

Every change is announced to both participants as a ``recording`` message
with the new ``state``. Nothing is recorded before the consent, and nothing
ever leaves ``off`` except by a new ``record-request``: a participant who
reconnects after a stop finds the recording off.

A refusal is final until the therapist asks again; a guardian's consent is
needed when the consult's invite is for a patient under 16.

The recorder itself (aiortc, PyAV) is :mod:`signaling.recorder`; this
module runs one per recording on this node, each in a worker process of its
own (:mod:`signaling.recorder_proxy`), and stores the file through
:mod:`audit.recordings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.clock import Clock
from audit.consults import latest_invite_guardian_consent
from audit.filestore import StoreError, readable_bytes
from audit.recordings import (
    Consent,
    ConsentBy,
    FileStore,
    RecordingFile,
    StopReason,
    begin_recording,
    finish_recording,
    mark_interrupted,
)
from audit.technical_log import TechnicalLog
from signaling.changes import ChangeThenTell, Send
from signaling.ports import RoomStore
from signaling.protocol import (
    ErrorCode,
    ParticipantRole,
    ProtocolError,
    RecordConsent,
    RecorderOffer,
    RecordingState,
    RecordRequest,
    RecordStop,
    outbound,
)
from signaling.recorder_proxy import WorkerRecorder
from signaling.recording_types import Failure, InvalidOffer, RecorderError
from signaling.scheduling import LoopSlice
from signaling.state import RecordingPhase, RoomPhase

_log = structlog.get_logger("videoconsult.recording")

BOTH = frozenset(ParticipantRole)
# How long a recorder's failure waits for a socket's close that would name
# the stop better (see RecordingControl._failed).
FAILURE_SETTLE_S = 1.0

RecordingMessage = RecordRequest | RecordConsent | RecordStop | RecorderOffer


# The waits before each new try to mark a stopped recording's row finished
# (about two minutes in all): until then its file can be neither downloaded
# nor deleted.
FINISH_RETRIES_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


@dataclass(frozen=True)
class RecordingServices:
    """What recording needs; without it (``recording.enabled = false``) requests are refused."""

    engine: AsyncEngine
    files: FileStore
    root_key: bytes
    start_timeout_s: float
    # Recordings at once on this node (each a worker process receiving two
    # participants' media; docs/recording.md).
    max_concurrent: int = 8
    # The loop's time slice while recordings run here (signaling/scheduling.py); 0: none.
    loop_slice_us: int = 0
    # ... or real-time priority, where the process may (signaling/scheduling.py).
    loop_realtime: bool = False


@dataclass(frozen=True)
class _Question:
    asked_at: datetime
    id: str


@dataclass
class _Live:
    """One recording on this node, from the consent to the stop."""

    recorder: WorkerRecorder
    requested_at: datetime
    consent: Consent | None = None
    offers_in: asyncio.Event = field(default_factory=asyncio.Event)
    starter: asyncio.Task[None] | None = None
    recording_id: uuid.UUID | None = None
    # Past the wait for the pages: the file and its row are being made.
    creating: bool = False
    # The new file, once the recorder is told to write it.
    file: RecordingFile | None = None
    # When both were told "on"; None until then.
    started_at: datetime | None = None


class RecordingControl:
    def __init__(
        self,
        *,
        services: RecordingServices | None,
        engine: AsyncEngine,
        clock: Clock,
        store: RoomStore,
        send: Send,
        technical: TechnicalLog,
    ) -> None:
        self._services = services
        self._engine = engine
        self._clock = clock
        self._store = store
        self._send = send
        # What a change announces goes out once it is saved (signaling.changes).
        self._change = ChangeThenTell(store, send)
        self._technical = technical
        self._live: dict[uuid.UUID, _Live] = {}
        # Held while _live is not empty: the loop before the recorder workers.
        self._loop_slice = LoopSlice(
            services.loop_slice_us if services else 0,
            realtime=services.loop_realtime if services else False,
        )
        # Recordings being stopped: their files finishing, their workers exiting.
        self._finishing: set[asyncio.Future[None]] = set()
        # Set by stop_all (shutdown): a row's finish is tried once more, not
        # waited for.
        self._closing = asyncio.Event()
        # The open question of each consult: when it was asked, and its id,
        # which a consent may name.
        self._questions: dict[uuid.UUID, _Question] = {}

    @property
    def live_count(self) -> int:
        """Recordings running (or starting) on this node."""
        return len(self._live)

    async def handle(
        self, consult_id: uuid.UUID, role: ParticipantRole, message: RecordingMessage
    ) -> list[dict[str, Any]]:
        """Act on one recording message; return replies for the sender."""
        if isinstance(message, RecorderOffer):
            return await self._offer(consult_id, role, message.sdp)
        if isinstance(message, RecordRequest):
            await self._request(consult_id)
        elif isinstance(message, RecordConsent):
            await self._consent(consult_id, message)
        else:
            reason = (
                StopReason.STOPPED_BY_THERAPIST
                if role is ParticipantRole.THERAPIST
                else StopReason.STOPPED_BY_PATIENT
            )
            if not await self.stop(consult_id, reason):
                raise ProtocolError(
                    ErrorCode.RECORDING_STATE, "nothing is being recorded", ref="record-stop"
                )
        return []

    async def _request(self, consult_id: uuid.UUID) -> None:
        if self._services is None:
            raise ProtocolError(
                ErrorCode.RECORDING_UNAVAILABLE,
                "recording is not enabled on this server",
                ref="record-request",
            )
        async with self._change(consult_id) as (state, tell):
            if state is None or state.phase is RoomPhase.OVER:
                raise ProtocolError(
                    ErrorCode.CONSULT_OVER, "the consult is over", ref="record-request"
                )
            if state.phase is not RoomPhase.ACTIVE:
                raise ProtocolError(
                    ErrorCode.NOT_ADMITTED,
                    "the consult has not started: admit the patient first",
                    ref="record-request",
                )
            if not all(state.present(role) for role in ParticipantRole):
                raise ProtocolError(
                    ErrorCode.PEER_ABSENT,
                    "the patient is not connected right now",
                    ref="record-request",
                )
            if state.recording is not RecordingPhase.OFF:
                raise ProtocolError(
                    ErrorCode.RECORDING_STATE,
                    f"recording is {state.recording.value} already",
                    ref="record-request",
                )
            if (
                state.therapist is not None
                and state.patient is not None
                and (state.therapist.node != state.patient.node)
            ):
                # The recorder runs on one node and takes both pages' media
                # there, with the consent it saw itself (docs/scaling.md).
                raise ProtocolError(
                    ErrorCode.RECORDING_UNAVAILABLE,
                    "you and the patient are connected to different server nodes; this "
                    "consult cannot be recorded right now",
                    ref="record-request",
                )
            if len(self._live) >= self._services.max_concurrent:
                raise ProtocolError(
                    ErrorCode.RECORDING_UNAVAILABLE,
                    f"this server records {self._services.max_concurrent} consults at once "
                    "already; try again later",
                    ref="record-request",
                )
            async with self._engine.connect() as conn:
                guardian = await latest_invite_guardian_consent(conn, consult_id)
            state.recording = RecordingPhase.REQUESTED
            request = secrets.token_urlsafe(8)
            self._questions[consult_id] = _Question(self._clock.now(), request)
            tell.both(
                _announcement(RecordingState.REQUESTED, guardian_required=guardian, request=request)
            )

    async def _consent(self, consult_id: uuid.UUID, message: RecordConsent) -> None:
        services = self._services
        async with self._change(consult_id) as (state, tell):
            if state is None or state.recording is not RecordingPhase.REQUESTED:
                raise ProtocolError(
                    ErrorCode.RECORDING_STATE,
                    "no recording request is waiting for an answer",
                    ref="record-consent",
                )
            if message.request is not None and message.request != self._question_id(consult_id):
                raise ProtocolError(
                    ErrorCode.RECORDING_STATE,
                    "this answer is to an earlier question; the therapist has asked again",
                    ref="record-consent",
                )
            if not message.agree:
                state.recording = RecordingPhase.OFF
                self._questions.pop(consult_id, None)
                tell.both(_announcement(RecordingState.REFUSED))
                self._note(consult_id, "recording.refused")
                return
            async with self._engine.connect() as conn:
                guardian = await latest_invite_guardian_consent(conn, consult_id)
            if guardian and message.by != ConsentBy.GUARDIAN.value:
                raise ProtocolError(
                    ErrorCode.GUARDIAN_CONSENT_REQUIRED,
                    "this patient is under 16: a parent or guardian must agree "
                    '(record-consent with "by": "guardian")',
                    ref="record-consent",
                )
            assert services is not None, "a request was made, so recording is enabled"
            if len(self._live) >= services.max_concurrent:
                # Full since the request: the request is gone, both are told
                # (the state change is kept: this block ends cleanly).
                state.recording = RecordingPhase.OFF
                self._questions.pop(consult_id, None)
                tell.both(_announcement(RecordingState.OFF, reason=StopReason.SERVER_BUSY.value))
                return
            now = self._clock.now()
            question = self._questions.pop(consult_id, None)
            live = _Live(
                recorder=WorkerRecorder(
                    on_failure=lambda failure, detail: self._failed(consult_id, failure, detail),
                ),
                requested_at=question.asked_at if question else now,
            )
            # Started now, so that the worker is up by the time the pages'
            # offers come (a Python process with aiortc takes a moment).
            live.recorder.launch()
            live.consent = Consent(live.requested_at, now, ConsentBy(message.by))
            self._live[consult_id] = live
            self._loop_slice.busy(True)
            state.recording = RecordingPhase.STARTING
            live.starter = asyncio.create_task(self._start_when_ready(consult_id, live))
            tell.both(_announcement(RecordingState.STARTING))
        # Not who agreed: support staff read this log, and "a guardian" says the
        # patient is under 16. The recording's row keeps it (consent_by).
        self._note(consult_id, "recording.consented")

    def _question_id(self, consult_id: uuid.UUID) -> str | None:
        question = self._questions.get(consult_id)
        return question.id if question else None

    async def _offer(
        self, consult_id: uuid.UUID, role: ParticipantRole, sdp: str
    ) -> list[dict[str, Any]]:
        live = self._live.get(consult_id)
        state = await self._store.peek(consult_id)
        if live is None or state is None or state.recording is not RecordingPhase.STARTING:
            raise ProtocolError(
                ErrorCode.RECORDING_STATE,
                "no recording is starting: the recorder takes offers only after the "
                "patient's consent",
                ref="recorder-offer",
            )
        try:
            answer = await live.recorder.accept_offer(role, sdp)
        except InvalidOffer as err:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, str(err), ref="recorder-offer") from err
        except RecorderError as err:
            raise ProtocolError(ErrorCode.RECORDING_STATE, str(err), ref="recorder-offer") from err
        if live.recorder.roles == BOTH:
            live.offers_in.set()
        return [outbound("recorder-answer", sdp=answer)]

    async def _start_when_ready(self, consult_id: uuid.UUID, live: _Live) -> None:
        """Open the file and start the recorder once both pages are connected;
        whatever goes wrong, the recording stops and both are told, rather
        than staying "starting"."""
        try:
            await self._start(consult_id, live)
        except Exception:
            _log.exception("recording: the start failed", consult_id=str(consult_id))
            await self.stop(consult_id, StopReason.RECORDER_FAILED)

    async def _start(self, consult_id: uuid.UUID, live: _Live) -> None:
        services = self._services
        assert services is not None
        try:
            # The browsers' time counts from when the worker can take them.
            await live.recorder.ready()
        except (TimeoutError, RecorderError) as err:
            _log.error("recording: the recorder worker did not start", error=str(err))
            await self.stop(consult_id, StopReason.RECORDER_FAILED)
            return
        try:
            async with asyncio.timeout(services.start_timeout_s):
                await live.offers_in.wait()
                await live.recorder.wait_connected(BOTH)
        except TimeoutError:
            self._note(consult_id, "recording.start-timeout")
            await self.stop(consult_id, StopReason.RECORDER_FAILED)
            return
        if self._live.get(consult_id) is not live:
            return  # stopped meanwhile
        live.creating = True
        now = self._clock.now()
        try:
            async with services.engine.begin() as conn:
                recording, file = await begin_recording(
                    conn,
                    services.files,
                    services.root_key,
                    consult_id,
                    now=now,
                    consent=live.consent,
                )
        except OSError as err:
            _log.error("recording: the file store refused a new file", error=err.strerror)
            await self.stop(consult_id, StopReason.STORAGE_FULL)
            return
        live.recording_id = recording.id
        if self._live.get(consult_id) is not live:
            # Stopped while the file was made: both were told off, so nothing
            # may be recorded; the stop leaves the row incomplete, its file empty.
            return
        live.file = file
        try:
            await live.recorder.start(file)
        except OSError as err:
            _log.error("recording: the new file does not open", error=err.strerror)
            await self.stop(consult_id, StopReason.STORAGE_FULL)
            return
        except Exception:
            # Never a silent half-start: both are told, the row is finished.
            _log.exception("recording: the recorder did not start", consult_id=str(consult_id))
            await self.stop(consult_id, StopReason.RECORDER_FAILED)
            return
        async with self._change(consult_id) as (state, tell):
            if state is None or self._live.get(consult_id) is not live:
                return  # stopped meanwhile: the stop finishes the file
            state.recording = RecordingPhase.ON
            live.started_at = now
            tell.both(
                _announcement(
                    RecordingState.ON, started_at=now.isoformat(), recording=str(recording.id)
                )
            )
        _log.info("recording started", consult_id=str(consult_id), recording_id=str(recording.id))

    async def stop(self, consult_id: uuid.UUID, reason: StopReason) -> bool:
        """Stop whatever recording (or request) the consult has; tell both.

        Returns whether there was anything to stop. Safe to call from any
        path (a message, a leave, the end, a failure) and more than once.
        """
        previous = RecordingPhase.OFF
        async with self._store.locked(consult_id) as state:
            if state is not None:
                previous = state.recording
                state.recording = RecordingPhase.OFF
        self._questions.pop(consult_id, None)
        live = self._live.pop(consult_id, None)
        self._loop_slice.busy(bool(self._live))
        if previous is RecordingPhase.OFF and live is None:
            return False
        # Told first: a new request may follow at once, and must not be
        # overtaken by this "off" (the file is finished after).
        for role in ParticipantRole:
            await self._send(
                consult_id, role, _announcement(RecordingState.OFF, reason=reason.value)
            )
        self._note(consult_id, "recording.stopped", {"reason": reason.value})
        if live is not None:
            # A task of its own, kept until done: the file is finished even if
            # the caller is cancelled, and a shutdown waits for it (stop_all).
            finishing = asyncio.ensure_future(self._finish(consult_id, live, reason))
            self._finishing.add(finishing)
            finishing.add_done_callback(self._finishing.discard)
            await asyncio.shield(finishing)
        return True

    async def _finish(self, consult_id: uuid.UUID, live: _Live, reason: StopReason) -> None:
        """Stop the recorder and finish the row; never raises (a stop is part of
        the consult's end, which must go on), marks the row incomplete instead."""
        starter = live.starter
        if starter is not None and starter is not asyncio.current_task():
            if live.creating:
                # The file and its row are being made: let that finish, so
                # that they are closed and marked below, not orphaned.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await starter
            else:
                starter.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await starter
        complete, plaintext_bytes, frames = False, 0, {}
        try:
            # Closes the file (with its final chunk when nothing failed). A
            # recording stopped between making its file and starting the
            # recorder leaves the file empty, and the row incomplete.
            result = await live.recorder.stop()
            complete, plaintext_bytes, frames = (
                result.complete,
                result.plaintext_bytes,
                result.frames,
            )
        except Exception:
            _log.exception("recording: stopping the recorder failed", consult_id=str(consult_id))
        if live.recording_id is None:
            return  # never started: no file, no row
        if live.started_at is None and live.file is not None:
            # Stopped while the recorder was told to start: both were told
            # off, never on, so what it wrote meanwhile goes, and the file is
            # left empty, as a stop before the start leaves it.
            complete, plaintext_bytes, frames = False, 0, {}
            try:
                await asyncio.to_thread(os.truncate, live.file.path, 0)
            except OSError as err:
                _log.error("recording: emptying the file failed", error=err.strerror)
        elif not complete and live.file is not None:
            # Its size is what a download gets, the whole chunks on disk: the
            # recorder's count held bytes a full disk or a killed worker lost.
            with contextlib.suppress(OSError, StoreError):
                plaintext_bytes = await asyncio.to_thread(readable_bytes, live.file.path)
        stopped = functools.partial(
            finish_recording,
            recording_id=live.recording_id,
            writer=None,
            now=self._clock.now(),
            reason=reason,
            complete=complete,
            plaintext_bytes=plaintext_bytes,
        )
        said = {"consult_id": str(consult_id), "recording_id": str(live.recording_id)}
        if not await self._mark_finished(stopped, said):
            # Tried again in the background (a shutdown waits for it, as for
            # this): whoever stopped the recording (a consult's end, a leave)
            # goes on meanwhile.
            later = asyncio.ensure_future(self._mark_finished_later(stopped, said))
            self._finishing.add(later)
            later.add_done_callback(self._finishing.discard)
            return
        _log.info(
            "recording stopped", reason=reason.value, complete=complete, frames=frames, **said
        )

    async def _mark_finished(
        self, stopped: Callable[..., Awaitable[object]], said: dict[str, str]
    ) -> bool:
        """One try to mark the row finished; whether it was."""
        try:
            async with self._engine.begin() as conn:
                await stopped(conn)
        except Exception as err:
            # Another writer holding the database (a long purge), or the
            # database away for a moment: the file is whole.
            _log.warning("recording: marking it finished failed", error=type(err).__name__, **said)
            return False
        return True

    async def _mark_finished_later(
        self, stopped: Callable[..., Awaitable[object]], said: dict[str, str]
    ) -> None:
        for retry_in_s in FINISH_RETRIES_S:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), retry_in_s)
            if await self._mark_finished(stopped, said):
                _log.info("recording stopped; its row marked finished late", **said)
                return
            if self._closing.is_set():
                break
        # The row stays "recording"; the next start marks it incomplete.
        _log.error("recording: marking it finished failed; no more tries", **said)

    async def stop_all(self, reason: StopReason) -> None:
        """Stop every recording of this node, and wait for those already
        stopping (a consult's end) to finish their files and workers (shutdown)."""
        self._closing.set()
        for consult_id in list(self._live):
            try:
                await self.stop(consult_id, reason)
            except Exception:
                _log.exception("recording: stopping failed", consult_id=str(consult_id))
        # Until none is left: a stop may start its row's last try meanwhile.
        while self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    def worker_pid(self, consult_id: uuid.UUID) -> int | None:
        """The process id of the consult's recorder worker, while it has one."""
        live = self._live.get(consult_id)
        return live.recorder.pid if live is not None else None

    def is_active(self, consult_id: uuid.UUID) -> bool:
        """Whether the consult has a recording, or a request, to stop."""
        return consult_id in self._live or consult_id in self._questions

    async def _failed(self, consult_id: uuid.UUID, failure: Failure, detail: str) -> None:
        reason = (
            StopReason.STORAGE_FULL
            if failure is Failure.STORAGE_FULL
            else StopReason.RECORDER_FAILED
        )
        self._note(consult_id, "recording.failed", {"failure": failure.value, "detail": detail})
        live = self._live.get(consult_id)
        if reason is StopReason.RECORDER_FAILED and live is not None:
            # A page that goes (a reload, a closed tab) closes its recorder
            # connection and its socket together, and the recorder's process
            # may be heard first. A moment's wait lets the socket's close stop
            # the recording as what it is (participant_left: "a connection
            # dropped"); only this recording is stopped after it, never one
            # asked for and agreed to meanwhile.
            await asyncio.sleep(FAILURE_SETTLE_S)
            if self._live.get(consult_id) is not live:
                return
        await self.stop(consult_id, reason)

    async def node_lost(self, consult_id: uuid.UUID, *, now: datetime) -> bool:
        """The node that recorded this consult (or was about to) died: the
        recording is off, its row incomplete, and whoever is left is told.
        Returns whether there was one."""
        async with self._change(consult_id) as (state, tell):
            if state is None or state.recording is RecordingPhase.OFF:
                return False
            state.recording = RecordingPhase.OFF
            self._questions.pop(consult_id, None)
            async with self._engine.begin() as conn:
                await mark_interrupted(conn, now=now, consult_id=consult_id)
            tell.both(_announcement(RecordingState.OFF, reason=StopReason.SERVER_RESTART.value))
        self._note(consult_id, "recording.node_lost")
        return True

    def _note(self, consult_id: uuid.UUID, kind: str, detail: dict[str, Any] | None = None) -> None:
        self._technical.log.info(kind, subject=str(consult_id), detail=detail or {})


def _announcement(state: RecordingState, **fields: Any) -> dict[str, Any]:
    """The recording's state, told to both participants."""
    return outbound("recording", state=state, **fields)
