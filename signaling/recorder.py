"""The server-side recorder: an aiortc peer per participant, one encrypted file.

Each participant's browser opens a second, send-only peer connection to the
server (``recorder-offer``), carrying its own camera and microphone. The
recorder receives those tracks and writes them with aiortc's
``MediaRecorder`` (PyAV) as matroska into a file-like object that encrypts
as it goes (:class:`audit.filestore.EncryptingWriter`): plaintext media
exists only in memory. The file holds up to four streams, in this order:
therapist audio, therapist video, patient audio, patient video (a
participant without a camera has no video stream).

Two traps of ``MediaRecorder`` (aiortc 1.16, PyAV 18) are handled here,
not hoped away:

- A video stream takes its size from its first frame, when that frame is
  encoded. But the first packet muxed by *any* stream (audio, or another
  party's video) writes the container header and opens every codec; a video
  stream that gets its first frame after that dies on "Cannot change width
  after codec is open", and the file silently holds no video of it. So the
  video streams are sized before the recorder starts (the configured size;
  PyAV scales every frame to it) and MediaRecorder is told they have started
  (:func:`_prepare_video_streams`).
- A stream task that dies for any other reason dies silently too. A
  watchdog notices a stream that stopped asking for frames and reports the
  recording as failed instead of letting it run on without that stream.

Timestamps: RTP timestamps start at random values per stream. Every frame is
rebased so that each stream counts from the moment the recording started,
keeping the RTP spacing between frames; so the streams line up and the
file's duration is the time the recording ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fractions
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRecorder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from audit.filestore import EncryptingWriter
from signaling.protocol import ParticipantRole, PeerConnectionState

_log = structlog.get_logger("videoconsult.recorder")

CONTAINER_FORMAT = "matroska"
MEDIA_TYPE = "video/x-matroska"
# The matroska muxer keeps a whole cluster in memory before writing it
# (by default up to 5 s): a server that dies loses that much. One second.
CONTAINER_OPTIONS = {"cluster_time_limit": "1000"}
# libx264's defaults (preset medium, 40 frames of look-ahead) cost several
# times the CPU and hold frames back, so a stop waits for them; a live
# recording of a consult needs neither.
VIDEO_CODEC_OPTIONS = {"preset": "veryfast", "tune": "zerolatency"}
# How often the watchdog looks at the streams, and how long a stream may go
# without asking for a frame before its task is taken for dead (a live task
# asks again as soon as it has encoded the last frame).
WATCHDOG_INTERVAL_S = 0.5
STALLED_STREAM_S = 3.0
# What the encrypting writer holds in memory goes to disk at least this
# often: a server that dies loses at most this, plus the muxer's cluster.
PENDING_FLUSH_S = 1.0
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)


class RecorderError(Exception):
    """The recorder cannot do what was asked now; the message names the state."""


class InvalidOffer(RecorderError):
    """A recorder offer that does not parse or does not send what a recording needs."""


class StreamKind(enum.StrEnum):
    """A track's ``kind`` as aiortc gives it; the file holds them in this order."""

    AUDIO = "audio"
    VIDEO = "video"


@dataclass(frozen=True)
class RecorderSettings:
    video_width: int
    video_height: int


class Timeline:
    """The recording's start, shared by its streams."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


class RecordedTrack(MediaStreamTrack):
    """One participant's track as the recorder sees it: rebased timestamps,
    and counts of what went into the file."""

    def __init__(
        self, source: MediaStreamTrack, *, role: ParticipantRole, timeline: Timeline
    ) -> None:
        super().__init__()
        self.kind = source.kind
        self.role = role
        self._source = source
        self._timeline = timeline
        self._offset: int | None = None
        self._last_pts: int | None = None
        self.frames = 0
        # Whether MediaRecorder's task is waiting in recv() now, and when it
        # last got a frame: a task that neither waits nor came back is dead.
        self.in_recv = False
        self.last_return = time.monotonic()

    @property
    def label(self) -> str:
        return f"{self.role.value} {self.kind}"

    async def recv(self) -> AudioFrame | VideoFrame:
        self.in_recv = True
        try:
            received = await self._source.recv()
            if not isinstance(received, AudioFrame | VideoFrame):
                raise MediaStreamError("the recorder takes decoded audio and video frames only")
            frame: AudioFrame | VideoFrame = self._rebased(received)
            self.frames += 1
            return frame
        finally:
            self.in_recv = False
            self.last_return = time.monotonic()

    def _rebased(self, frame: Any) -> Any:
        time_base = frame.time_base
        if frame.pts is None or time_base is None:
            raise MediaStreamError("a received frame has no timestamp")
        if self._offset is None:
            self._offset = round(self._timeline.elapsed_s() / time_base) - frame.pts
        pts = frame.pts + self._offset
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        frame.pts = self._last_pts = pts
        return frame

    def stop(self) -> None:
        super().stop()
        self._source.stop()


class _GuardedSink:
    """What PyAV writes to: the encrypting writer, on a disk that may fill up.

    A failed write (ENOSPC, EIO) is reported once through ``on_error`` and
    every later write is dropped, so that PyAV finishes its work without
    crashing; the file then ends at its last whole chunk and reads as
    truncated.
    """

    def __init__(self, writer: EncryptingWriter, on_error: Callable[[OSError], None]) -> None:
        self._writer = writer
        self._on_error = on_error
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        def write() -> None:
            self._writer.write(data)

        self._guarded(write)
        return len(data)

    def flush(self) -> None:
        self._guarded(self._writer.flush)

    def write_pending(self) -> None:
        self._guarded(self._writer.write_pending)

    def _guarded(self, action: Callable[[], None]) -> None:
        if self.error is None:
            try:
                action()
            except OSError as err:
                self.error = err
                self._on_error(err)


def open_recorder(
    sink: Any, tracks: list[RecordedTrack], settings: RecorderSettings
) -> MediaRecorder:
    """A MediaRecorder writing ``tracks`` (in this order) as matroska into ``sink``;
    call ``start()`` on it."""
    media = MediaRecorder(sink, format=CONTAINER_FORMAT, options=CONTAINER_OPTIONS)
    for track in tracks:
        media.addTrack(track)
    _prepare_video_streams(media, settings)
    return media


def _prepare_video_streams(media: MediaRecorder, settings: RecorderSettings) -> None:
    """Size the video streams and tune their encoders before anything is muxed.

    MediaRecorder has no parameters for either, so this reaches into its
    private per-track contexts (aiortc is pinned below 2; tests/test_recording.py
    fails loudly if the attribute moves). Marking a context started keeps
    MediaRecorder from resizing the stream at its first frame, which is what
    kills a stream whose codec another stream's first packet already opened.
    """
    contexts = media._MediaRecorder__tracks  # type: ignore[attr-defined]
    for track, context in contexts.items():
        if track.kind != StreamKind.VIDEO:
            continue
        context.stream.width = settings.video_width
        context.stream.height = settings.video_height
        context.stream.codec_context.options = dict(VIDEO_CODEC_OPTIONS)
        context.started = True


class Failure(enum.Enum):
    STORAGE_FULL = "storage_full"
    RECORDER_FAILED = "recorder_failed"


@dataclass(frozen=True)
class StopResult:
    # Whether the file was closed with its final chunk.
    complete: bool
    plaintext_bytes: int
    # Frames that went into the file, per stream ("therapist video": 150).
    frames: dict[str, int]


OnFailure = Callable[[Failure, str], Coroutine[Any, Any, None]]


class ConsultRecorder:
    """One consult's recording: a receive-only peer connection per participant
    and one ``MediaRecorder`` writing into the encrypting writer.

    Call :meth:`accept_offer` for each participant, then :meth:`start` once
    both are connected (:meth:`wait_connected`), and :meth:`stop` at the
    end. ``on_failure`` is called (at most once) when the disk fills up or
    a stream or connection fails; the caller then stops the recorder.
    """

    def __init__(self, *, settings: RecorderSettings, on_failure: OnFailure) -> None:
        self._settings = settings
        self._on_failure = on_failure
        self._peers: dict[ParticipantRole, RTCPeerConnection] = {}
        self._tracks: dict[ParticipantRole, list[MediaStreamTrack]] = {}
        self._connected: dict[ParticipantRole, asyncio.Event] = {}
        self._recorded: list[RecordedTrack] = []
        self._media: MediaRecorder | None = None
        self._sink: _GuardedSink | None = None
        self._writer: EncryptingWriter | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._failure_reported = False
        self._stopped = False
        self._background: set[asyncio.Task[None]] = set()

    @property
    def roles(self) -> frozenset[ParticipantRole]:
        """The participants whose offers were answered (not those still being
        answered: two pages usually offer within milliseconds of each other)."""
        return frozenset(self._tracks)

    async def accept_offer(self, role: ParticipantRole, offer_sdp: str) -> str:
        """Answer a participant's recorder offer; return the answer's SDP.

        Raises :class:`RecorderError` for a second offer of the same
        participant, an offer after the start, or an offer without audio.
        """
        if self._stopped or self._media is not None:
            raise RecorderError("the recording has already started; no more offers now")
        if role in self._peers:
            raise RecorderError(f"the {role.value}'s recorder connection is already set up")
        # No STUN or TURN of our own: the browser reaches the server's host
        # addresses directly or through its own TURN relay.
        peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tracks: list[MediaStreamTrack] = []
        connected = asyncio.Event()
        peer.on("track", tracks.append)

        @peer.on("connectionstatechange")
        def _state_changed() -> None:
            state = PeerConnectionState(peer.connectionState)
            if state is PeerConnectionState.CONNECTED:
                connected.set()
            elif state.is_over and self._peers.get(role) is peer:
                self._report(Failure.RECORDER_FAILED, f"the {role.value}'s connection {state}")

        self._peers[role] = peer
        try:
            try:
                await peer.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as err:
                # aiortc's parser raises what it happens to raise (ValueError,
                # KeyError, ...); to the client it is one thing: a bad offer.
                problem = str(err)[:200] or type(err).__name__
                raise InvalidOffer(f"the recorder offer's SDP is not usable: {problem}") from err
            kinds = sorted(track.kind for track in tracks)
            if kinds not in (["audio"], ["audio", "video"]):
                raise InvalidOffer(
                    "a recorder offer sends one microphone and at most one camera; "
                    f"this one sends {kinds or 'nothing'}"
                )
            try:
                await peer.setLocalDescription(await peer.createAnswer())
            except Exception as err:
                raise InvalidOffer(
                    f"the recorder cannot answer this offer: {str(err)[:200] or type(err).__name__}"
                ) from err
        except BaseException:
            del self._peers[role]
            await peer.close()
            raise
        self._tracks[role] = tracks
        self._connected[role] = connected
        return str(peer.localDescription.sdp)

    async def wait_connected(self, roles: frozenset[ParticipantRole]) -> None:
        """Return once the recorder connections of ``roles`` are connected."""
        for role in roles:
            await self._connected[role].wait()

    async def start(self, writer: EncryptingWriter) -> None:
        """Start writing every received track into ``writer``."""
        if self._media is not None or self._stopped:
            raise RecorderError("the recorder has already started or stopped")
        self._writer = writer
        self._sink = _GuardedSink(
            writer, lambda err: self._report(Failure.STORAGE_FULL, err.strerror or str(err))
        )
        timeline = Timeline()
        for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT):
            for kind in StreamKind:
                self._recorded += [
                    RecordedTrack(track, role=role, timeline=timeline)
                    for track in self._tracks.get(role, [])
                    if track.kind == kind
                ]
        self._media = open_recorder(self._sink, self._recorded, self._settings)
        await self._media.start()
        self._watchdog = asyncio.create_task(self._watch())

    async def stop(self) -> StopResult:
        """Stop recording and close everything; idempotent. The writer is
        closed (final chunk) when nothing failed."""
        if self._stopped:
            return self._result(complete=False)
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._watchdog
        complete = self._media is not None
        if self._media is not None:
            try:
                # Cancels the stream tasks, flushes the encoders, closes the container.
                await self._media.stop()
            except Exception:
                _log.exception("recorder: closing the container failed")
                complete = False
        if self._writer is not None and complete and self._sink and self._sink.error is None:
            try:
                self._writer.close()
            except OSError:
                complete = False
        else:
            complete = False
        for track in self._recorded:
            track.stop()
        if self._writer is not None and not complete:
            # No final chunk: the file reads as truncated, up to its last whole chunk.
            self._writer.abort()
        await asyncio.gather(*(peer.close() for peer in self._peers.values()))
        return self._result(complete=complete)

    def _result(self, *, complete: bool) -> StopResult:
        return StopResult(
            complete=complete,
            plaintext_bytes=self._writer.plaintext_bytes if self._writer else 0,
            frames={track.label: track.frames for track in self._recorded},
        )

    async def _watch(self) -> None:
        flushed = time.monotonic()
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            try:
                if now - flushed >= PENDING_FLUSH_S and self._sink is not None:
                    self._sink.write_pending()
                    flushed = now
            except Exception as err:
                # Not silently: a watchdog that died would flush and watch no more.
                self._report(Failure.RECORDER_FAILED, f"writing failed: {type(err).__name__}")
                return
            for track in self._recorded:
                if not track.in_recv and now - track.last_return > STALLED_STREAM_S:
                    self._report(
                        Failure.RECORDER_FAILED, f"the {track.label} stream stopped being written"
                    )
                    return

    def _report(self, failure: Failure, detail: str) -> None:
        if self._failure_reported or self._stopped:
            return
        self._failure_reported = True
        _log.warning("recorder failed", failure=failure.value, detail=detail)
        task = asyncio.get_running_loop().create_task(self._on_failure(failure, detail))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
