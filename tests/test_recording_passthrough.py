"""The pass-through recorder: the browsers' encoded frames, copied into the file.

Real aiortc peers send to a ``ConsultRecorder`` (no server around it, see
tests/test_recording.py for the whole consult); the decrypted file is opened
with PyAV and decoded frame by frame *in the test*. The recorder itself
must never decode or encode: aiortc's decoder factory is made to fail for
the length of a recording whose only receivers are the recorder's.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import aiortc.rtcrtpreceiver
import av
import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from audit.media_types import MATROSKA, WEBM, media_format
from signaling.media_codecs import MediaCodec, is_keyframe, picture_size, sps_picture_size
from signaling.protocol import ParticipantRole
from signaling.receiver_tap import TapUnavailable, tap_receiver
from signaling.recorded_track import ReceivedTrack, StreamKind
from signaling.recorder import ConsultRecorder
from tests.support.recording import (
    RecorderLink,
    count_streams,
    encoded,
    new_recording_file,
    read_recording_file,
    record_links,
)

pytestmark = [pytest.mark.webrtc, pytest.mark.recorder]

THERAPIST, PATIENT = ParticipantRole.THERAPIST, ParticipantRole.PATIENT


async def test_no_decoder_or_encoder_runs_for_a_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    """The links only send (their encoders run, in the test); the recorder is the
    only receiver here, so any decoder aiortc makes would be the recorder's."""
    decoders: list[str] = []

    def no_decoder(codec: Any) -> Any:
        decoders.append(codec.mimeType)
        raise AssertionError(f"the recorder made a {codec.mimeType} decoder")

    monkeypatch.setattr(aiortc.rtcrtpreceiver, "get_decoder", no_decoder)
    recording = await record_links(
        {THERAPIST: RecorderLink(video=(320, 240)), PATIENT: RecorderLink(video=(160, 120))}, 3.0
    )
    assert decoders == []
    assert recording.failures == []
    assert recording.result.complete
    # Every frame the receivers reassembled went to the tap, none to a decoder.
    taps = [track.tap for track in recording.recorder.tracks]
    assert all(tap is not None and tap.frames > 0 for tap in taps)
    # The file's streams were made without codec contexts: no encoder to open.
    muxer = recording.recorder._muxer
    assert muxer is not None
    assert [stream.codec_context for stream in muxer._streams] == [None] * 4
    # And what was copied decodes (here, in the test).
    streams = count_streams(recording.media)
    assert all(stream.frames > 30 for stream in streams), streams


async def test_a_browser_that_offers_only_h264_is_recorded_in_matroska() -> None:
    recording = await record_links(
        {
            THERAPIST: RecorderLink(video=(320, 240)),
            PATIENT: RecorderLink(video=(176, 144), video_codecs=["H264"]),
        },
        3.0,
    )
    assert recording.failures == []
    assert recording.result.media_type == "video/x-matroska"
    assert media_format(recording.media) == MATROSKA
    streams = count_streams(recording.media)
    assert [s.codec for s in streams] == ["opus", "vp8", "opus", "h264"]
    assert [(s.width, s.height) for s in streams if s.kind == "video"] == [(320, 240), (176, 144)]
    for stream in streams:
        assert stream.first_is_keyframe, streams
        assert stream.frames > 30, streams
        assert abs(stream.duration_s - recording.truth_s) < 0.5, (streams, recording.truth_s)


async def test_vp8_is_preferred_when_the_browser_offers_h264_first() -> None:
    link = RecorderLink(video_codecs=["H264", "VP8"])
    recording = await record_links({THERAPIST: link}, 1.5)
    assert media_format(recording.media) == WEBM
    assert [s.codec for s in count_streams(recording.media)] == ["opus", "vp8"]


async def test_a_camera_that_changes_its_size_mid_recording_leaves_a_file_that_decodes() -> None:
    link = RecorderLink(video=(320, 240))

    async def smaller_after_a_while() -> None:
        await asyncio.sleep(1.5)
        # As a browser does when the bandwidth drops: a smaller picture,
        # which starts with a keyframe.
        link.camera.width, link.camera.height = 160, 120

    recording = await record_links({THERAPIST: link}, 3.5, during=smaller_after_a_while)
    assert recording.failures == []
    sizes: list[tuple[int, int]] = []
    with av.open(io.BytesIO(recording.media), mode="r") as container:
        video = container.streams.video[0]
        for packet in container.demux(video):
            for frame in packet.decode():
                if not sizes or sizes[-1] != (frame.width, frame.height):
                    sizes.append((frame.width, frame.height))
    assert sizes == [(320, 240), (160, 120)]


# -- keyframes, without the network ------------------------------------------------------


class FakeReceiver:
    """What the recorder uses of a receiver once tapped: keyframe requests."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    async def _send_rtcp_pli(self, media_ssrc: int) -> None:
        self.requests.append(media_ssrc)


VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)


def vp8_frame(*, key: bool, size: tuple[int, int] = (320, 240)) -> bytes:
    """The first bytes of a VP8 frame: enough for what the recorder reads of it."""
    if not key:
        return b"\x01" + bytes(20)
    width, height = size
    return (
        b"\x10\x00\x00\x9d\x01\x2a"
        + width.to_bytes(2, "little")
        + height.to_bytes(2, "little")
        + bytes(20)
    )


async def test_video_starts_at_a_keyframe_and_after_loss_waits_for_the_next(
    tmp_path: Path,
) -> None:
    recorder = ConsultRecorder(on_failure=lambda failure, detail: asyncio.sleep(0))
    receiver = FakeReceiver()
    track = ReceivedTrack(
        role=THERAPIST,
        kind=StreamKind.VIDEO,
        codec=MediaCodec.VP8,
        receiver=receiver,
    )
    tap = recorder.add_source(track)
    tap.media_ssrc = 1234  # as if a packet had come
    file = new_recording_file(tmp_path)
    await recorder.start(file)
    await asyncio.sleep(0)
    assert receiver.requests == [1234]  # asked at the start

    timestamp = 0

    def frame(**kwargs: Any) -> None:
        nonlocal timestamp
        timestamp += 3000
        tap.put((VP8, JitterFrame(vp8_frame(**kwargs), timestamp)))

    frame(key=False)
    frame(key=False)
    assert (track.frames, track.dropped) == (0, 2)
    frame(key=True)
    frame(key=False)
    assert (track.frames, track.dropped) == (2, 2)
    # The jitter buffer gave up on lost packets: wait for the next keyframe, and ask.
    tap.lost = True
    track.keyframe_asked_at = float("-inf")
    frame(key=False)
    await asyncio.sleep(0)
    assert (track.frames, track.dropped) == (2, 3)
    assert receiver.requests == [1234, 1234]
    frame(key=True, size=(160, 120))
    frame(key=False)
    assert track.frames == 4
    result = await recorder.stop()
    assert result.complete
    media = read_recording_file(file)
    with av.open(io.BytesIO(media), mode="r") as container:
        (video,) = container.streams.video
        # The header's size is the first keyframe's.
        assert (video.codec_context.width, video.codec_context.height) == (320, 240)
        packets = [p for p in container.demux(video) if p.size]
    assert [p.is_keyframe for p in packets] == [True, False, True, False]
    times = [float((p.pts or 0) * (p.time_base or 0)) for p in packets]
    assert times == sorted(times)
    assert times[1] - times[0] == pytest.approx(3000 / 90000, abs=0.002)


def video_track() -> ReceivedTrack:
    return ReceivedTrack(
        role=THERAPIST, kind=StreamKind.VIDEO, codec=MediaCodec.VP8, receiver=FakeReceiver()
    )


async def started_with(track: ReceivedTrack, directory: Path) -> tuple[ConsultRecorder, list[str]]:
    failures: list[str] = []

    async def failed(failure: Any, detail: str) -> None:
        failures.append(f"{failure.value}: {detail}")

    recorder = ConsultRecorder(on_failure=failed)
    recorder.add_source(track)
    await recorder.start(new_recording_file(directory))
    return recorder, failures


async def test_a_stream_that_stops_bringing_frames_fails_the_recording(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("signaling.recorder.STALLED_STREAM_S", 0.6)
    recorder, failures = await started_with(video_track(), tmp_path)
    try:
        for _ in range(40):
            if failures:
                break
            await asyncio.sleep(0.1)
        assert failures == ["recorder_failed: no media came from the therapist for 0.6 s"]
    finally:
        await recorder.stop()


async def test_one_quiet_stream_leaves_a_gap_and_the_recording_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A static shared screen sends no new pictures for a while: the therapist's
    # audio still comes, so their media is not gone.
    monkeypatch.setattr("signaling.recorder.STALLED_STREAM_S", 0.6)
    failures: list[str] = []

    async def failed(failure: Any, detail: str) -> None:
        failures.append(f"{failure.value}: {detail}")

    recorder = ConsultRecorder(on_failure=failed)
    opus = RTCRtpCodecParameters(
        mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111
    )
    audio = recorder.add_source(
        ReceivedTrack(
            role=THERAPIST,
            kind=StreamKind.AUDIO,
            codec=MediaCodec.OPUS,
            receiver=FakeReceiver(),
            clock_rate=48000,
        )
    )
    recorder.add_source(video_track())
    await recorder.start(new_recording_file(tmp_path))
    try:
        for number in range(75):  # 1.5 s of 20 ms audio frames
            audio.put((opus, JitterFrame(data=b"\xfc" + bytes(40), timestamp=number * 960)))
            await asyncio.sleep(0.02)
        assert failures == []
    finally:
        result = await recorder.stop()
    assert result.frames["therapist audio"] >= 60
    assert result.frames["therapist video"] == 0


async def test_a_frame_that_cannot_be_written_fails_the_recording_at_once(
    tmp_path: Path,
) -> None:
    track = video_track()
    recorder, failures = await started_with(track, tmp_path)
    try:
        assert track.tap is not None
        # Negotiated VP8, and H.264 comes: never into the VP8 stream.
        h264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)
        track.tap.put((h264, JitterFrame(b"\x00\x00\x00\x01\x65" + bytes(20), 0)))
        await asyncio.sleep(0)
        assert failures == [
            "recorder_failed: the therapist video stream could not be written: RecorderError"
        ]
        # Nothing more is written after a failure; the caller stops the recorder.
        track.tap.put((VP8, JitterFrame(vp8_frame(key=True), 3000)))
        assert track.frames == 0
    finally:
        result = await recorder.stop()
    assert result.frames == {"therapist video": 0}


# -- what the recorder reads of encoded frames ----------------------------------------


def test_vp8_keyframes_and_their_size_are_read_from_the_frame() -> None:
    first, *rest = encoded("libvpx", (322, 182))
    assert is_keyframe(MediaCodec.VP8, first)
    assert picture_size(MediaCodec.VP8, first) == (322, 182)
    assert not any(is_keyframe(MediaCodec.VP8, frame) for frame in rest)
    assert picture_size(MediaCodec.VP8, rest[0]) is None


def test_h264_idr_frames_and_their_cropped_size_are_read_from_the_frame() -> None:
    first, *rest = encoded("libx264", (322, 182))
    assert is_keyframe(MediaCodec.H264, first)
    # 322x182 is coded as 336x192 macroblocks and cropped back.
    assert picture_size(MediaCodec.H264, first) == (322, 182)
    assert not any(is_keyframe(MediaCodec.H264, frame) for frame in rest)
    assert sps_picture_size(b"\x67") is None  # cut short: unknown, not an error


def test_opus_frames_are_all_keyframes() -> None:
    assert is_keyframe(MediaCodec.OPUS, b"\xfc\xff\xfe")


def test_the_media_type_follows_the_files_own_header() -> None:
    webm = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04\x42\xf3\x81\x08"
    assert media_format(webm + b"\x42\x82\x84webm") == WEBM
    assert media_format(webm + b"\x42\x82\x88matroska") == MATROSKA
    assert media_format(b"not a recording") == MATROSKA  # as every earlier recording


# -- aiortc's private parts, which the tap relies on (aiortc is pinned below 2) ------------


async def test_the_tap_finds_what_it_needs_in_aiortcs_receiver() -> None:
    """If this fails, aiortc moved the decoder queue, thread or jitter buffer:
    signaling/receiver_tap.py must follow, or the recorder gets no frames."""
    peer = RTCPeerConnection()
    try:
        receiver = peer.addTransceiver("video", direction="recvonly").receiver
        tap = tap_receiver(receiver, lambda codec, frame: None)
        assert receiver._RTCRtpReceiver__decoder_queue is tap  # type: ignore[attr-defined]
        assert receiver._RTCRtpReceiver__decoder_thread is None  # type: ignore[attr-defined]
        jitter = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        assert jitter.capacity == 512  # the wrapper passes the real buffer through
        assert callable(receiver._send_rtcp_pli)
        assert "decoder_worker" in vars(aiortc.rtcrtpreceiver)
    finally:
        await peer.close()


def test_a_receiver_without_those_parts_is_refused_loudly() -> None:
    with pytest.raises(TapUnavailable, match="__decoder_queue"):
        tap_receiver(object(), lambda codec, frame: None)  # type: ignore[arg-type]


async def test_a_receiver_that_started_decoding_cannot_be_tapped() -> None:
    peer = RTCPeerConnection()
    try:
        receiver: RTCRtpReceiver = peer.addTransceiver("audio").receiver
        receiver._RTCRtpReceiver__decoder_thread = object()  # type: ignore[attr-defined]
        with pytest.raises(TapUnavailable, match="started"):
            tap_receiver(receiver, lambda codec, frame: None)
        receiver._RTCRtpReceiver__decoder_thread = None  # type: ignore[attr-defined]
    finally:
        await peer.close()
