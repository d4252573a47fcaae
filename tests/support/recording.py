"""A recorded call between aiortc peers with the server's recorder, and reading
the encrypted recording it leaves."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import io
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import sqlalchemy as sa
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack
from av import AudioFrame, VideoFrame

from audit.filestore import Truncated, decrypt_chunks, new_data_key
from audit.recordings import RecordingFile, data_key_of, plaintext
from audit.schema import recordings
from server.app_keys import DB_ENGINE, FILE_STORE, MASTER_KEY
from signaling.protocol import ParticipantRole
from signaling.recorder import ConsultRecorder
from signaling.recording_types import Failure, StopResult
from tests.support.harness import Harness, Sockets, new_consult, receive
from tests.support.webrtc import Peer, Signaller, SyntheticVideo, all_receive_media, opened


class SizedVideo(SyntheticVideo):
    """Synthetic video of a given size (each party's camera differs); ``noisy``
    pictures cost the encoders as much as a real camera's, or more."""

    def __init__(self, width: int, height: int, *, noisy: bool = False) -> None:
        super().__init__()
        self.width, self.height = width, height
        self.noisy = noisy

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=self.width, height=self.height)
        for plane in frame.planes:
            if self.noisy:
                plane.update(os.urandom(plane.buffer_size))
            else:
                plane.update(bytes([(pts // 3000) % 256]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, time_base
        return frame


class RecorderLink:
    """A participant's send-only connection to the server's recorder.

    ``video_codecs``: the only video codecs its offer names (``["H264"]``
    plays a browser without VP8); by default all of aiortc's.
    """

    def __init__(
        self,
        *,
        video: tuple[int, int] | None = (320, 240),
        noisy: bool = False,
        video_codecs: list[str] | None = None,
        tracks: list[MediaStreamTrack] | None = None,
    ) -> None:
        """``tracks``: the microphone and camera to send instead of silence and ``video``."""
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.tracks: list[MediaStreamTrack] = [AudioStreamTrack()]
        if tracks is not None:
            self.tracks = list(tracks)
        elif video is not None:
            self.tracks.append(SizedVideo(*video, noisy=noisy))
        for track in self.tracks:
            self.pc.addTrack(track)
        for transceiver in self.pc.getTransceivers():
            transceiver.direction = "sendonly"
            if transceiver.kind == "video" and video_codecs is not None:
                capabilities = RTCRtpSender.getCapabilities("video")
                assert capabilities is not None
                transceiver.setCodecPreferences(
                    [
                        codec
                        for codec in capabilities.codecs
                        if codec.mimeType.partition("/")[2] in [*video_codecs, "rtx"]
                    ]
                )

    @property
    def camera(self) -> SizedVideo:
        camera = self.tracks[-1]
        assert isinstance(camera, SizedVideo)
        return camera

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    async def close(self) -> None:
        await self.pc.close()
        for track in self.tracks:
            track.stop()


def linked(stack: contextlib.AsyncExitStack, link: RecorderLink) -> RecorderLink:
    stack.push_async_callback(link.close)
    return link


@dataclass
class Call:
    setup: Any
    therapist: Signaller
    patient: Signaller
    stack: contextlib.AsyncExitStack
    # Each side's recorder link, once consent_and_connect made them.
    links: dict[Signaller, RecorderLink] = field(default_factory=dict)


async def start_call(
    harness: Harness, sockets: Sockets, stack: contextlib.AsyncExitStack, **consult: Any
) -> Call:
    """A consult with media flowing between the two aiortc peers."""
    setup = await new_consult(harness, **consult)
    therapist_socket = await sockets.therapist(setup.consult_id)
    welcome = await receive(therapist_socket, "welcome")
    assert welcome["recording"] == "off"
    patient_socket = await sockets.patient(setup.invite_token)
    await receive(patient_socket, "welcome")
    await receive(therapist_socket, "patient-waiting")
    therapist = opened(stack, Peer("therapist"))
    patient = opened(stack, Peer("patient"))
    therapist_signals = opened(stack, Signaller(therapist_socket, therapist))
    patient_signals = opened(stack, Signaller(patient_socket, patient))
    await therapist_signals.send("admit")
    await patient_signals.expect("admitted")
    await therapist_signals.expect("peer-joined")
    await therapist_signals.send("offer", sdp=await therapist.offer())
    await all_receive_media(therapist, patient)
    return Call(setup, therapist_signals, patient_signals, stack)


async def expect_recording(signals: Signaller, state: str) -> dict[str, Any]:
    message = await signals.expect("recording")
    assert message["state"] == state, message
    return message


async def both_see(call: Call, state: str) -> list[dict[str, Any]]:
    return [await expect_recording(side, state) for side in (call.therapist, call.patient)]


async def ask_and_agree(call: Call) -> None:
    """The therapist asks, both see it, the patient agrees, both see ``starting``."""
    await call.therapist.send("record-request")
    for requested in await both_see(call, "requested"):
        assert requested["guardian_required"] is False
    await call.patient.send("record-consent", agree=True)
    await both_see(call, "starting")


async def consent_and_connect(
    call: Call,
    *,
    therapist_video: tuple[int, int] | None = (320, 240),
    patient_video: tuple[int, int] | None = (160, 120),
    noisy: bool = False,
    tracks: Callable[[], list[MediaStreamTrack]] | None = None,
) -> dict[str, Any]:
    """Ask, agree, connect both recorder links; return the ``on`` message.

    ``tracks``: makes each side's microphone and camera instead of silence
    and synthetic video (bench/_signaling_recorders.py replays encoded media).
    """
    await ask_and_agree(call)
    links = {
        side: linked(
            call.stack,
            RecorderLink(video=video, noisy=noisy, tracks=None if tracks is None else tracks()),
        )
        for side, video in ((call.therapist, therapist_video), (call.patient, patient_video))
    }
    offers = {side: await link.offer() for side, link in links.items()}
    # Both offers go out before either answer is read, as two pages do.
    for side, sdp in offers.items():
        await side.send("recorder-offer", sdp=sdp)
    for side, link in links.items():
        await link.accept((await side.expect("recorder-answer"))["sdp"])
    call.links.update(links)
    on = await expect_recording(call.therapist, "on")
    assert (await expect_recording(call.patient, "on"))["recording"] == on["recording"]
    return on


async def recording_row(harness: Harness) -> Any:
    async with harness.app[DB_ENGINE].connect() as conn:
        rows = (await conn.execute(sa.select(recordings))).all()
    assert len(rows) == 1, rows
    return rows[0]


async def finished_recording_row(harness: Harness, *, timeout_s: float = 20) -> Any:
    """The one recording's row once it is no longer "recording": the file is
    closed off the event loop after the stop, later on a busy machine."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    row = await recording_row(harness)
    while row.status == "recording" and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        row = await recording_row(harness)
    return row


def decrypted(harness: Harness, recording_id: uuid.UUID, key: bytes) -> tuple[bytes, str | None]:
    """The file's plaintext, and the truncation message if it has one."""
    store = harness.app[FILE_STORE]
    parts: list[bytes] = []
    try:
        parts.extend(plaintext(store, f"{recording_id}.vcenc", key, recording_id))
    except Truncated as cut:
        return b"".join(parts), str(cut)
    return b"".join(parts), None


async def data_key(harness: Harness, recording_id: uuid.UUID) -> bytes:
    async with harness.app[DB_ENGINE].connect() as conn:
        _name, key = await data_key_of(conn, harness.app[MASTER_KEY].key, recording_id)
    return key


@dataclass
class StreamCount:
    kind: str
    frames: int
    duration_s: float
    width: int | None
    codec: str = ""
    height: int | None = None
    # Whether the stream's first packet is marked a keyframe (and decodes on its own).
    first_is_keyframe: bool = False


def count_streams(media: bytes) -> list[StreamCount]:
    """Decode every packet of every stream, frame by frame (a decode error
    fails); frames, end time and first packet per stream."""
    counts: list[StreamCount] = []
    with av.open(io.BytesIO(media), mode="r") as container:
        streams = list(container.streams)
        frames: Counter[int] = Counter()
        ends: dict[int, float] = {}
        first_key: dict[int, bool] = {}
        for packet in container.demux():
            if packet.size == 0:
                continue
            index = packet.stream.index
            decoded = packet.decode()
            first_key.setdefault(index, bool(packet.is_keyframe) and len(decoded) > 0)
            for frame in decoded:
                frames[index] += 1
                if (
                    isinstance(frame, AudioFrame | VideoFrame)
                    and frame.pts is not None
                    and frame.time_base is not None
                ):
                    end = float(frame.pts * frame.time_base)
                    if isinstance(frame, AudioFrame):
                        end += frame.samples / frame.sample_rate
                    ends[index] = max(ends.get(index, 0.0), end)
        for stream in streams:
            counts.append(
                StreamCount(
                    stream.type,
                    frames[stream.index],
                    ends.get(stream.index, 0.0),
                    getattr(stream.codec_context, "width", None),
                    codec=stream.codec_context.name,
                    height=getattr(stream.codec_context, "height", None),
                    first_is_keyframe=first_key.get(stream.index, False),
                )
            )
    return counts


@dataclass
class DirectRecording:
    """A recording made by a ConsultRecorder alone (no server), and its file."""

    recorder: ConsultRecorder
    result: StopResult
    media: bytes
    truth_s: float
    failures: list[str]


async def record_links(
    links: dict[ParticipantRole, RecorderLink],
    seconds: float,
    *,
    during: Any = None,
    prepare: Callable[[ConsultRecorder], None] | None = None,
) -> DirectRecording:
    """Connect ``links`` to a new ConsultRecorder, record ``seconds`` into an
    encrypting writer in memory, stop; ``during`` (async, optional) runs
    while it records; ``prepare`` is given the recorder once it answered
    the offers (before any media comes)."""
    failures: list[str] = []

    async def failed(failure: Failure, detail: str) -> None:
        failures.append(f"{failure.value}: {detail}")

    recorder = ConsultRecorder(on_failure=failed)
    directory = tempfile.TemporaryDirectory(prefix="vc-test-recording-")
    file = new_recording_file(Path(directory.name))
    try:
        for role, link in links.items():
            await link.accept(await recorder.accept_offer(role, await link.offer()))
        if prepare is not None:
            prepare(recorder)
        await recorder.wait_connected(frozenset(links))
        await recorder.start(file)
        began = loop_time()
        if during is not None:
            await during()
        await asyncio.sleep(max(0.0, seconds - (loop_time() - began)))
        # The frames stop coming when the stop begins; the stop itself then
        # closes the file and remuxes it (its cues).
        truth_s = loop_time() - began
        result = await recorder.stop()
    finally:
        await recorder.stop()
        for link in links.values():
            await link.close()
    with directory:
        media = read_recording_file(file)
    return DirectRecording(recorder, result, media, truth_s, failures)


def read_recording_file(file: RecordingFile) -> bytes:
    """The whole plaintext of a recording's file (raises what decryption raises)."""
    with open(file.path, "rb") as source:
        return b"".join(decrypt_chunks(source, file.data_key, file_id=file.file_id))


def new_recording_file(directory: Path) -> RecordingFile:
    """A recording's file as audit.recordings.begin_recording makes one: new and empty."""
    file_id = uuid.uuid4()
    path = directory / f"{file_id}.vcenc"
    path.touch(mode=0o600, exist_ok=False)
    return RecordingFile(str(path), file_id, new_data_key())


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def grown_to(path: Path, size: int, *, within_s: float) -> None:
    """Poll until the file another process writes has ``size`` bytes."""
    for _ in range(int(within_s / 0.1)):
        if path.exists() and path.stat().st_size >= size:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path.name} stayed under {size} bytes for {within_s:g} s")


def tolerant_counts(media: bytes) -> Counter[str]:
    """Frames per stream kind in media that may end mid-cluster (a cut file)."""
    frames: Counter[str] = Counter()
    with (
        av.open(io.BytesIO(media), mode="r") as container,
        contextlib.suppress(av.error.FFmpegError),
    ):
        for packet in container.demux():
            if packet.size:
                with contextlib.suppress(av.error.FFmpegError):
                    frames[packet.stream.type] += len(packet.decode())
    return frames


def encoded(codec_name: str, size: tuple[int, int], frames: int = 3) -> list[bytes]:
    """Frames encoded by PyAV (in the test: the recorder encodes nothing)."""
    encoder: Any = av.CodecContext.create(codec_name, "w")
    encoder.width, encoder.height = size
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = fractions.Fraction(1, 30)
    if codec_name == "libx264":
        encoder.options = {"tune": "zerolatency", "bframes": "0"}
    out: list[bytes] = []
    for index in range(frames):
        picture = av.VideoFrame(*size, "yuv420p")
        # Its memory comes uninitialised: left so, the pictures differ from
        # one another as noise does, and libvpx cut a scene (a keyframe) in
        # a test process whose heap held old data. The same grey each time.
        for plane in picture.planes:
            plane.update(bytes([128]) * plane.buffer_size)
        picture.pts = index
        out += [bytes(packet) for packet in encoder.encode(picture)]
    out += [bytes(packet) for packet in encoder.encode(None)]
    return out
