"""Lip sync: one sender's sound and picture lie together in the file, however
late one of them arrived, by the sender's RTCP reports.

A real aiortc sender marks the same moments in sound and picture
(tests/support/markers.py); the recorder's receiver of the sound is made to
get every packet 300 ms late (a fake at the transport boundary: aiortc's
DTLS transport hands the receiver its packets by calling
``_handle_rtp_packet``, which the test wraps). The file is decoded in the
test and the marks' times compared. Without the sender's reports the sound
lies 300 ms late, which the second test shows: the measurement sees it.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import pytest
from aiortc.rtp import RtcpSenderInfo, RtcpSrPacket

from signaling.lipsync import LipSync, SenderReport, earliest_sender_time_s
from signaling.media_codecs import MediaCodec
from signaling.protocol import ParticipantRole
from signaling.receiver_tap import SENDER_REPORTS_KEPT, FrameTap
from signaling.recorded_track import ReceivedTrack, StreamKind
from signaling.recorder import ConsultRecorder
from tests.support.markers import (
    MARK_EVERY_S,
    SAMPLE_RATE,
    TONE_S,
    MarkedAudio,
    MarkedVideo,
    find_marks,
    marked_pcm,
)
from tests.support.recording import RecorderLink, record_links

THERAPIST = ParticipantRole.THERAPIST
SOUND_LATE_S = 0.3
# The bound; the marks themselves are exact to a picture (33 ms).
LIP_SYNC_S = 0.080
RECORD_S = 8.0
# aiortc sends its first sender report 0.5 to 1.5 s after its first packet
# (later on a busy machine): marks before then are placed by arrival.
SETTLED_S = 3.0


def sound_arrives_late(recorder: ConsultRecorder) -> None:
    loop = asyncio.get_running_loop()
    held: set[asyncio.Future[Any]] = set()
    for track in recorder.tracks:
        if track.kind != "audio":
            continue
        receiver: Any = track.receiver
        handle = receiver._handle_rtp_packet

        async def late(packet: Any, arrival_time_ms: int, handle: Any = handle) -> None:
            def deliver() -> None:
                task = asyncio.ensure_future(handle(packet, arrival_time_ms=arrival_time_ms))
                held.add(task)
                task.add_done_callback(held.discard)

            loop.call_later(SOUND_LATE_S, deliver)

        receiver._handle_rtp_packet = late


async def recorded_skews() -> list[float]:
    link = RecorderLink(tracks=[MarkedAudio(), MarkedVideo()])
    recording = await record_links({THERAPIST: link}, RECORD_S, prepare=sound_arrives_late)
    assert recording.failures == []
    marks = find_marks(recording.media, audio_index=0, video_index=1)
    assert marks.audio_s, marks
    assert marks.video_s, marks
    # The sound's last 300 ms never reached the recorder before the stop.
    settled = [
        skew
        for video_s, skew in zip(marks.video_s, marks.skews_s(), strict=True)
        if SETTLED_S <= video_s <= marks.audio_s[-1] + MARK_EVERY_S / 2
    ]
    assert len(settled) >= 3, marks
    print("skews of the settled marks (s):", settled, "all:", marks)
    return settled


@pytest.mark.webrtc
@pytest.mark.recorder
async def test_a_senders_sound_and_picture_lie_together_though_the_sound_came_late() -> None:
    skews = await recorded_skews()
    assert all(abs(skew) < LIP_SYNC_S for skew in skews), skews


@pytest.mark.webrtc
@pytest.mark.recorder
async def test_without_the_senders_reports_the_late_sound_lies_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(LipSync, "correction_s", lambda *_args: 0.0)
    skews = await recorded_skews()
    assert abs(statistics.median(skews) - SOUND_LATE_S) < LIP_SYNC_S, skews


def test_a_sender_report_places_timestamps_on_the_senders_clock_across_the_wrap() -> None:
    report = SenderReport(ntp_timestamp=(1000 << 32) + (1 << 31), rtp_timestamp=2**32 - 4800)
    assert report.sender_time_s(2**32 - 4800, 48000) == 1000.5
    # 9600 ticks later, past the wrap of the 32-bit timestamp.
    assert report.sender_time_s(4800, 48000) == pytest.approx(1000.7)
    assert report.sender_time_s(2**32 - 9600, 48000) == pytest.approx(1000.4)


def test_a_stream_that_runs_early_is_moved_forward_and_never_back() -> None:
    sync = LipSync()
    # Audio (stream 0) is placed 0.3 s after its sender's time; video (1) 0.0.
    assert sync.correction_s(0, 10.3, 10.0) == 0.0
    assert sync.correction_s(1, 10.0, 10.0) == pytest.approx(0.3)
    # Now in step: no more corrections, also not for audio.
    assert sync.correction_s(1, 10.333, 10.033) == 0.0
    assert sync.correction_s(0, 10.32, 10.02) == 0.0
    # Without a report, nothing moves.
    assert sync.correction_s(1, 5.0, None) == 0.0
    # A drift within the tolerance is left alone.
    assert sync.correction_s(1, 11.28, 11.0) == 0.0
    # A report that puts a stream seconds away is wrong, not followed.
    assert sync.correction_s(1, 20.0, 25.0) == 0.0
    assert sync.refused == 1


def test_of_a_senders_reports_the_one_that_puts_a_frame_earliest_counts() -> None:
    """A report written while the sender was held up 200 ms says its frames
    were taken 200 ms later than they were; the earlier report knows better."""
    on_time = SenderReport(ntp_timestamp=100 << 32, rtp_timestamp=0)
    held_up = SenderReport(ntp_timestamp=(101 << 32) + int(0.2 * 2**32), rtp_timestamp=48000)
    assert held_up.sender_time_s(96000, 48000) == pytest.approx(102.2)
    assert earliest_sender_time_s([on_time, held_up], 96000, 48000) == pytest.approx(102.0)


def sender_report(seconds: float, rtp_timestamp: int) -> RtcpSrPacket:
    info = RtcpSenderInfo(
        ntp_timestamp=int(seconds * 2**32),
        rtp_timestamp=rtp_timestamp,
        packet_count=0,
        octet_count=0,
    )
    return RtcpSrPacket(ssrc=1, sender_info=info)


def test_a_track_places_its_frames_by_the_earliest_report_it_has_seen() -> None:
    """The track keeps the report it places frames by until the next report
    comes (choosing among 30 for every frame cost the recorder a tenth of
    its time); each new report may take over, and one that falls out of the
    tap's window no longer counts."""
    tap = FrameTap(lambda _codec, _frame: None)
    track = ReceivedTrack(
        role=THERAPIST,
        kind=StreamKind.AUDIO,
        codec=MediaCodec.OPUS,
        receiver=None,  # type: ignore[arg-type]  # placing frames sends no feedback
        tap=tap,
        clock_rate=48000,
    )
    tap.rtp_timestamp = 96000
    assert track._sender_time_s() is None  # no report yet
    tap.saw_sender_report(sender_report(101.2, 48000))  # held up 200 ms
    assert track._sender_time_s() == pytest.approx(102.2)
    tap.saw_sender_report(sender_report(100.0, 0))  # on time: takes over
    assert track._sender_time_s() == pytest.approx(102.0)
    tap.saw_sender_report(sender_report(102.5, 96000))  # held up 500 ms: ignored
    tap.rtp_timestamp = 144000
    assert track._sender_time_s() == pytest.approx(103.0)
    # The on-time report leaves the window; the best of the rest counts.
    for _ in range(SENDER_REPORTS_KEPT):
        tap.saw_sender_report(sender_report(103.1, 144000))  # held up 100 ms
    assert track._sender_time_s() == pytest.approx(103.1)


@pytest.mark.parametrize("late_in_frame_s", [0.0, 0.01, 0.0199, 0.019999])
def test_each_mark_sounds_for_its_whole_tone_whatever_the_frames_phase(
    late_in_frame_s: float,
) -> None:
    """The microphone's frames start at whatever phase its first frame had;
    a mark that falls at a frame's last sample still sounds for ``TONE_S``
    (it once sounded for the rest of that frame only, so a stream whose
    phase put every mark there had no mark Opus kept: CI saw no sound
    marks at all)."""
    samples = SAMPLE_RATE // 50
    # Frames of 20 ms from a start that puts the whole second
    # ``late_in_frame_s`` into a frame.
    began_s = 1000.0 - late_in_frame_s - samples / SAMPLE_RATE * 3
    pcm: list[int] = []
    for index in range(8):
        pcm.extend(marked_pcm(began_s + index * samples / SAMPLE_RATE, samples))
    loud = [i for i, value in enumerate(pcm) if value]
    first_s = began_s + loud[0] / SAMPLE_RATE
    assert first_s == pytest.approx(1000.0, abs=1.5 / SAMPLE_RATE)
    assert (loud[-1] - loud[0] + 1) / SAMPLE_RATE == pytest.approx(TONE_S, abs=2 / SAMPLE_RATE)
