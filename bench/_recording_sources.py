"""The recording benchmark's synthetic consult: a microphone and a camera per
participant, paced like aiortc's tracks."""

from __future__ import annotations

import array
import asyncio
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
from aiortc.mediastreams import (
    MediaStreamError,
    MediaStreamTrack,
    VideoStreamTrack,
)
from av import AudioFrame, VideoFrame

from signaling.protocol import ParticipantRole

WIDTH, HEIGHT, FPS = 640, 480, 30
AUDIO_RATE, AUDIO_SAMPLES = 48000, 960  # what aiortc's Opus decoder hands over
AAC_FRAME_SAMPLES = 1024
# The testsrc2 pattern (moving bars, a counter, a moving gradient) with
# temporal noise of a webcam indoors; 90 pictures = 3 s, played back and forth
# so that the motion has no jump.
CAMERA_GRAPH = f"testsrc2=s={WIDTH}x{HEIGHT}:r={FPS},noise=alls=6:allf=t+u,format=yuv420p"
CAMERA_PICTURES = 90

# --------------------------------------------------------------------------
# Synthetic sources.
# --------------------------------------------------------------------------


def camera_pictures() -> list[tuple[bytes, ...]]:
    """The camera's pictures as plane bytes, rendered once by FFmpeg's lavfi."""
    pictures: list[tuple[bytes, ...]] = []
    with av.open(CAMERA_GRAPH, format="lavfi") as source:
        for frame in source.decode(video=0):
            pictures.append(tuple(bytes(plane) for plane in frame.planes))
            if len(pictures) == CAMERA_PICTURES:
                break
    blank = VideoFrame(width=WIDTH, height=HEIGHT)
    if [len(p) for p in pictures[0]] != [p.buffer_size for p in blank.planes]:
        raise RuntimeError("lavfi's planes are not laid out as a new VideoFrame's")
    return pictures


def voice_samples() -> bytes:
    """Two seconds of a voice-like sound (a 150 Hz tone with harmonics, syllables
    at 4 Hz), s16 stereo interleaved; AAC on silence would cost next to nothing."""
    samples = array.array("h")
    for n in range(2 * AUDIO_RATE):
        t = n / AUDIO_RATE
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)
        value = sum(math.sin(2 * math.pi * 150 * k * t) / k for k in (1, 2, 3, 5))
        sample = int(6000 * envelope * value)
        samples.extend((sample, sample))
    return samples.tobytes()


def picture_at(pictures: list[tuple[bytes, ...]], index: int) -> tuple[bytes, ...]:
    period = 2 * len(pictures) - 2
    step = index % period
    return pictures[step if step < len(pictures) else period - step]


def video_frame(pictures: list[tuple[bytes, ...]], index: int) -> VideoFrame:
    frame = VideoFrame(width=WIDTH, height=HEIGHT)
    for plane, data in zip(frame.planes, picture_at(pictures, index), strict=True):
        plane.update(data)
    return frame


def audio_frame(voice: bytes, index: int) -> AudioFrame:
    frame = AudioFrame(format="s16", layout="stereo", samples=AUDIO_SAMPLES)
    size = AUDIO_SAMPLES * 4
    start = (index * size) % len(voice)
    frame.planes[0].update(voice[start : start + size])
    frame.sample_rate = AUDIO_RATE
    return frame


@dataclass
class Pace:
    """How far behind its real-time schedule a source handed over each frame."""

    lags_s: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, float | int]:
        ordered = sorted(self.lags_s) or [0.0]
        return {
            "produced": len(self.lags_s),
            "lag_p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
            "lag_max_s": round(ordered[-1], 4),
            "backlog_at_stop_s": round(self.lags_s[-1] if self.lags_s else 0.0, 4),
        }


class SyntheticCamera(VideoStreamTrack):
    """640x480 at 30 fps with aiortc's pacing and timestamps (90 kHz)."""

    def __init__(self, pictures: list[tuple[bytes, ...]]) -> None:
        super().__init__()
        self._pictures = pictures
        self.pace = Pace()

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        self.pace.lags_s.append(time.time() - (self._start + pts * float(time_base)))
        frame = video_frame(self._pictures, len(self.pace.lags_s))
        frame.pts, frame.time_base = pts, time_base
        return frame


class SyntheticMicrophone(MediaStreamTrack):
    """20 ms frames of 48 kHz stereo, paced like aiortc's AudioStreamTrack."""

    kind = "audio"

    def __init__(self, voice: bytes) -> None:
        super().__init__()
        self._voice = voice
        self._start: float | None = None
        self._timestamp = 0
        self.pace = Pace()

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        else:
            self._timestamp += AUDIO_SAMPLES
            await asyncio.sleep(self._start + self._timestamp / AUDIO_RATE - time.time())
        self.pace.lags_s.append(time.time() - (self._start + self._timestamp / AUDIO_RATE))
        frame = audio_frame(self._voice, len(self.pace.lags_s))
        frame.pts, frame.time_base = self._timestamp, Fraction(1, AUDIO_RATE)
        return frame


SourceTrack = SyntheticCamera | SyntheticMicrophone


def consult_sources(
    pictures: list[tuple[bytes, ...]], voice: bytes
) -> dict[ParticipantRole, list[SourceTrack]]:
    return {
        role: [SyntheticMicrophone(voice), SyntheticCamera(pictures)]
        for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT)
    }
