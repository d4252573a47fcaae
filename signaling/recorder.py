"""The server-side recorder: an aiortc peer per participant, one encrypted file.

Each participant's browser opens a second, send-only peer connection to the
server (``recorder-offer``), carrying its own camera and microphone. The
recorder copies the encoded frames it receives, unchanged, into one file:
WebM (VP8 and Opus) or, when a browser offers only H.264, Matroska. Nothing
is decoded and nothing is encoded (:mod:`signaling.receiver_tap` takes the
frames from aiortc's receivers before their decoder, :mod:`signaling.muxer`
writes them with PyAV), and the file goes into a file-like object that
encrypts as it goes (:class:`audit.filestore.EncryptingWriter`): plaintext
media exists only in memory. The file holds up to four streams, in this
order: therapist audio, therapist video, patient audio, patient video (a
participant without a camera has no video stream).

Keyframes: a video stream starts at its first keyframe. When the recording
starts, and whenever a stream waits for a keyframe (at the start, and after
packets were lost for good), each sender is asked for one (RTCP PLI, again
every second until it comes); the frames before it are dropped, since they
would not decode.

Timestamps: each stream's RTP timestamps (aiortc counts them from the
stream's first frame) are rebased so that the stream counts from the moment
the recording started, keeping the RTP spacing between frames; so the
streams line up and the file's duration is the time the recording ran.

The interface (:class:`ConsultRecorder`) is a handful of async methods that
take and return strings, bytes and small dataclasses (the file to write is
a :class:`~audit.recordings.RecordingFile`: a path, an id and a key), so
that it can move behind a process boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from aiortc.sdp import SessionDescription

from audit.filestore import EncryptingWriter
from audit.recordings import RecordingFile
from signaling.lipsync import LipSync
from signaling.media_codecs import (
    Container,
    MediaCodec,
    container_for,
    is_keyframe,
    picture_size,
)
from signaling.muxer import PacketMuxer, StreamSpec
from signaling.protocol import ParticipantRole, PeerConnectionState
from signaling.receiver_tap import FrameTap, request_keyframe, tap_receiver
from signaling.recorded_track import ReceivedTrack, StreamKind, Timeline
from signaling.recording_types import (
    Failure,
    InvalidOffer,
    OnFailure,
    RecorderError,
    StopResult,
    remux_budget_s,
)
from signaling.remux import RemuxError, make_seekable

_log = structlog.get_logger("videoconsult.recorder")

# How often the watchdog looks at the streams, and how long all of one
# participant's streams may bring no frame before the recording is taken for
# failed (their media is gone). One quiet stream (a static shared screen
# sends no new pictures) leaves a gap, not a failure; a muted camera or
# microphone still sends (black pictures, silence).
WATCHDOG_INTERVAL_S = 0.5
STALLED_STREAM_S = 10.0
# What the encrypting writer holds in memory goes to disk at least this
# often: a server that dies loses at most this, plus the muxer's cluster.
PENDING_FLUSH_S = 1.0
# A sender that was asked for a keyframe and sent none is asked again after this.
KEYFRAME_REQUEST_INTERVAL_S = 1.0
# The video codecs the recorder copies, in order of preference: VP8 fits WebM.
VIDEO_CODECS = (MediaCodec.VP8, MediaCodec.H264)


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


def _offered_video_codecs(offer_sdp: str) -> set[MediaCodec]:
    """The video codecs of ours an offer sends with (empty: no video, or none we copy)."""
    offered: set[MediaCodec] = set()
    for media in SessionDescription.parse(offer_sdp).media:
        if media.kind == "video":
            for codec in media.rtp.codecs:
                with contextlib.suppress(ValueError):
                    offered.add(MediaCodec.from_mime_type(codec.mimeType))
    return offered


def _preferences(kind: str, codec: MediaCodec) -> list[RTCRtpCodecCapability]:
    """aiortc's capabilities of ``codec`` (every H.264 profile), and RTX for video."""
    capabilities = RTCRtpReceiver.getCapabilities(kind)
    assert capabilities is not None
    wanted = [c for c in capabilities.codecs if c.mimeType.lower() == f"{kind}/{codec.value}"]
    retransmission = [c for c in capabilities.codecs if c.mimeType.lower() == f"{kind}/rtx"]
    return wanted + retransmission


class ConsultRecorder:
    """One consult's recording: a receive-only peer connection per participant,
    their encoded frames copied into one file through the encrypting writer.

    Call :meth:`accept_offer` for each participant, then :meth:`start` once
    both are connected (:meth:`wait_connected`), and :meth:`stop` at the
    end. ``on_failure`` is called (at most once) when the disk fills up or
    a stream or connection fails; the caller then stops the recorder.
    """

    def __init__(self, *, on_failure: OnFailure) -> None:
        self._on_failure = on_failure
        self._peers: dict[ParticipantRole, RTCPeerConnection] = {}
        self._tracks: dict[ParticipantRole, list[ReceivedTrack]] = {}
        self._connected: dict[ParticipantRole, asyncio.Event] = {}
        self._recorded: list[ReceivedTrack] = []
        self._muxer: PacketMuxer | None = None
        self._sink: _GuardedSink | None = None
        self._writer: EncryptingWriter | None = None
        self._file: RecordingFile | None = None
        self._plaintext_bytes: int | None = None
        self._timeline: Timeline | None = None
        self._lip_sync: dict[ParticipantRole, LipSync] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._failure_reported = False
        self._stopped = False
        self._background: set[asyncio.Task[None]] = set()
        # Keyframe requests on their way (RTCP PLI).
        self._requests: set[asyncio.Task[None]] = set()
        self.container: Container | None = None

    @property
    def roles(self) -> frozenset[ParticipantRole]:
        """The participants whose offers were answered (not those still being
        answered: two pages usually offer within milliseconds of each other)."""
        return frozenset(self._tracks)

    @property
    def plaintext_bytes(self) -> int:
        """The bytes of the file handed to the encrypting writer so far."""
        return self._writer.plaintext_bytes if self._writer else 0

    @property
    def tracks(self) -> list[ReceivedTrack]:
        """Every participant's received tracks, in the file's order once started."""
        return self._recorded or [t for ts in self._tracks.values() for t in ts]

    async def accept_offer(self, role: ParticipantRole, offer_sdp: str) -> str:
        """Answer a participant's recorder offer; return the answer's SDP.

        Raises :class:`RecorderError` for a second offer of the same
        participant, an offer after the start, or an offer without audio.
        """
        if self._stopped or self._muxer is not None:
            raise RecorderError("the recording has already started; no more offers now")
        if role in self._peers:
            raise RecorderError(f"the {role.value}'s recorder connection is already set up")
        # No STUN or TURN of our own: the browser reaches the server's host
        # addresses directly or through its own TURN relay.
        peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        connected = asyncio.Event()

        @peer.on("connectionstatechange")
        def _state_changed() -> None:
            state = PeerConnectionState(peer.connectionState)
            if state is PeerConnectionState.CONNECTED:
                connected.set()
            elif state.is_over and self._peers.get(role) is peer:
                self._report(Failure.RECORDER_FAILED, f"the {role.value}'s connection {state}")

        self._peers[role] = peer
        try:
            tracks = await self._negotiate(role, peer, offer_sdp)
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

    async def _negotiate(
        self, role: ParticipantRole, peer: RTCPeerConnection, offer_sdp: str
    ) -> list[ReceivedTrack]:
        """Take the offer with the codecs the recorder copies (Opus; VP8, else
        H.264) and tap each receiver; return the participant's tracks."""
        try:
            offered = _offered_video_codecs(offer_sdp)
            video = next((codec for codec in VIDEO_CODECS if codec in offered), None)
            # Made before the offer is applied, so that the answer names only
            # the codecs the file can hold (the offer's transceivers take these).
            peer.addTransceiver("audio", direction="recvonly").setCodecPreferences(
                _preferences("audio", MediaCodec.OPUS)
            )
            if video is not None:
                peer.addTransceiver("video", direction="recvonly").setCodecPreferences(
                    _preferences("video", video)
                )
            await peer.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as err:
            # aiortc's parser raises what it happens to raise (ValueError,
            # KeyError, ...); to the client it is one thing: a bad offer.
            problem = str(err)[:200] or type(err).__name__
            raise InvalidOffer(f"the recorder offer's SDP is not usable: {problem}") from err
        tracks: list[ReceivedTrack] = []
        for transceiver in peer.getTransceivers():
            receiver = transceiver.receiver
            if receiver.track is None or transceiver.direction == "inactive":
                continue
            kind = StreamKind(receiver.track.kind)
            if kind is StreamKind.VIDEO and video is None:
                raise InvalidOffer("the recorder offer sends video in neither VP8 nor H.264")
            track = ReceivedTrack(
                role=role,
                kind=kind,
                codec=MediaCodec.OPUS if kind is StreamKind.AUDIO else video or MediaCodec.VP8,
                receiver=receiver,
                clock_rate=48000 if kind is StreamKind.AUDIO else 90000,
                awaiting_keyframe=kind is StreamKind.VIDEO,
            )
            track.tap = tap_receiver(receiver, self._frame_handler(track))
            tracks.append(track)
        kinds = sorted(track.kind.value for track in tracks)
        if kinds not in (["audio"], ["audio", "video"]):
            raise InvalidOffer(
                "a recorder offer sends one microphone and at most one camera; "
                f"this one sends {kinds or 'nothing'}"
            )
        return tracks

    def add_source(self, track: ReceivedTrack) -> FrameTap:
        """Record ``track`` from the frames handed to the returned tap rather than
        from an aiortc receiver (the benchmark's pre-encoded media, tests); before
        the start only."""
        if self._muxer is not None or self._stopped:
            raise RecorderError("the recording has already started; no more tracks now")
        track.tap = FrameTap(self._frame_handler(track))
        self._tracks.setdefault(track.role, []).append(track)
        return track.tap

    async def wait_connected(self, roles: frozenset[ParticipantRole]) -> None:
        """Return once the recorder connections of ``roles`` are connected."""
        for role in roles:
            await self._connected[role].wait()

    async def start(self, file: RecordingFile) -> None:
        """Start writing every received track into ``file`` (encrypted as it goes).

        Raises OSError when the file cannot be opened (the disk or the store
        is gone), :class:`RecorderError` when started or stopped already.
        """
        if self._muxer is not None or self._stopped:
            raise RecorderError("the recorder has already started or stopped")
        writer = self._writer = file.open_writer()
        self._file = file
        self._sink = _GuardedSink(
            writer, lambda err: self._report(Failure.STORAGE_FULL, err.strerror or str(err))
        )
        for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT):
            for kind in StreamKind:
                self._recorded += [t for t in self._tracks.get(role, []) if t.kind is kind]
        for index, track in enumerate(self._recorded):
            track.index = index
            track.last_frame_at = time.monotonic()
        self.container = container_for({track.codec for track in self._recorded})
        self._timeline = Timeline()
        self._lip_sync = {role: LipSync() for role in self._tracks}
        self._muxer = PacketMuxer(
            self._sink,
            [StreamSpec(track.codec, track.clock_rate) for track in self._recorded],
            self.container,
        )
        for track in self._recorded:
            if track.kind is StreamKind.VIDEO:
                self._ask_keyframe(track)
        self._watchdog = asyncio.create_task(self._watch())

    def _frame_handler(self, track: ReceivedTrack) -> Callable[[RTCRtpCodecParameters, Any], None]:
        def on_frame(codec: RTCRtpCodecParameters, frame: JitterFrame) -> None:
            # Called by aiortc's receiver, in the event loop: never raise into it.
            if self._muxer is None or self._stopped or self._failure_reported:
                return  # before the start nothing is recorded; after a failure nothing more
            if self._sink is not None and self._sink.error is not None:
                return
            try:
                self._write(track, codec, frame)
            except Exception as err:
                _log.exception("recorder: a frame could not be written", stream=track.label)
                self._report(
                    Failure.RECORDER_FAILED,
                    f"the {track.label} stream could not be written: {type(err).__name__}",
                )

        return on_frame

    def _write(
        self, track: ReceivedTrack, codec: RTCRtpCodecParameters, frame: JitterFrame
    ) -> None:
        assert self._muxer is not None
        assert self._timeline is not None
        assert track.index is not None
        if codec.name.lower() != track.codec.value:
            raise RecorderError(f"the {track.label} came as {codec.name}, not {track.codec.value}")
        track.last_frame_at = time.monotonic()
        keyframe = is_keyframe(track.codec, frame.data)
        if track.kind is StreamKind.VIDEO:
            assert track.tap is not None
            if track.tap.lost:
                # The jitter buffer gave up on lost packets: what follows leans
                # on a picture the file would not have.
                track.tap.lost = False
                track.awaiting_keyframe = True
            if track.awaiting_keyframe:
                if not keyframe:
                    track.dropped += 1
                    self._ask_keyframe(track)
                    return
                track.awaiting_keyframe = False
                self._muxer.set_size(track.index, picture_size(track.codec, frame.data))
        pts = track.rebased(frame.timestamp, self._timeline, sync=self._lip_sync[track.role])
        self._muxer.add(track.index, frame.data, pts, keyframe=keyframe)
        track.frames += 1

    def _ask_keyframe(self, track: ReceivedTrack) -> None:
        now = time.monotonic()
        if track.tap is None or now - track.keyframe_asked_at < KEYFRAME_REQUEST_INTERVAL_S:
            return
        task = request_keyframe(track.receiver, track.tap)
        if task is None:
            return  # no packet yet: the first one that comes asks
        track.keyframe_asked_at = now
        track.keyframe_requests += 1
        self._requests.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A request that did not go out (the connection is closing) is
            # not worth more: the next one follows within a second.
            _log.info("recorder: a keyframe request failed", error=repr(task.exception()))

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
        complete = self._muxer is not None
        if self._muxer is not None:
            try:
                # Writes what the muxer holds and the container's end.
                self._muxer.close()
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
        if self._writer is not None and not complete:
            # No final chunk: the file reads as truncated, up to its last whole chunk.
            self._writer.abort()
        await asyncio.gather(*(peer.close() for peer in self._peers.values()))
        for task in list(self._requests):
            task.cancel()
        for role, sync in self._lip_sync.items():
            _log.info(
                "recorder: lip sync",
                role=role.value,
                corrections=sync.corrections,
                refused=sync.refused,
            )
        if complete:
            await self._make_seekable()
        return self._result(complete=complete)

    async def _make_seekable(self) -> None:
        """Give the whole file its duration and cues (a remux, off the loop);
        a remux that fails leaves the streamed file, which plays but seeks slowly."""
        assert self._file is not None
        assert self._writer is not None
        assert self.container is not None
        try:
            self._plaintext_bytes = await asyncio.to_thread(
                make_seekable,
                self._file,
                self.container.muxer,
                deadline_s=remux_budget_s(self._writer.plaintext_bytes),
            )
        except RemuxError as err:
            _log.warning("recorder: the file stays without cues", error=str(err))

    def _result(self, *, complete: bool) -> StopResult:
        return StopResult(
            complete=complete,
            plaintext_bytes=self._plaintext_bytes
            if self._plaintext_bytes is not None
            else self._writer.plaintext_bytes
            if self._writer
            else 0,
            frames={track.label: track.frames for track in self._recorded},
            media_type=self.container.media_type if self.container else None,
        )

    async def _watch(self) -> None:
        flushed = time.monotonic()
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            try:
                if self._muxer is not None:
                    self._muxer.poll()
                if now - flushed >= PENDING_FLUSH_S and self._sink is not None:
                    self._sink.write_pending()
                    flushed = now
            except Exception as err:
                # Not silently: a watchdog that died would flush and watch no more.
                self._report(Failure.RECORDER_FAILED, f"writing failed: {type(err).__name__}")
                return
            for role, tracks in self._tracks.items():
                if tracks and all(now - t.last_frame_at > STALLED_STREAM_S for t in tracks):
                    self._report(
                        Failure.RECORDER_FAILED,
                        f"no media came from the {role.value} for {STALLED_STREAM_S:g} s",
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
