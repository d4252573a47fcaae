"""The recording benchmark's synthetic consult: a microphone and a camera per
participant, sending *encoded* frames (VP8, Opus) at real-time pace, as the
recorder's receivers hand them over after the jitter buffer.

The media is encoded once, before any measurement (in the child, outside
its meter): a camera of 640x480 at 30 fps, VP8 at about 1.5 Mbit/s (what a
browser sends on a good link), a keyframe every 6 s; and a voice-like sound
as 20 ms Opus frames. Each source then replays its frames on the schedule a
browser sends them, with RTP-like timestamps, into a callback.
"""

from __future__ import annotations

import array
import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from signaling.media_codecs import MediaCodec
from signaling.protocol import ParticipantRole

WIDTH, HEIGHT, FPS = 640, 480, 30
VIDEO_BITRATE = 1_500_000
AUDIO_RATE, AUDIO_SAMPLES = 48000, 960  # 20 ms Opus frames, as browsers send
# The testsrc2 pattern (moving bars, a counter, a moving gradient) with
# temporal noise of a webcam indoors; 90 pictures = 3 s, played back and forth
# so that the motion has no jump, 180 frames encoded (a keyframe starts each loop).
CAMERA_GRAPH = f"testsrc2=s={WIDTH}x{HEIGHT}:r={FPS},noise=alls=6:allf=t+u,format=yuv420p"
CAMERA_PICTURES = 90
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def camera_frames() -> list[bytes]:
    """The camera's VP8 frames: 180 pictures (6 s) from lavfi, the first a keyframe,
    at about :data:`VIDEO_BITRATE`."""
    pictures: list[av.VideoFrame] = []
    with av.open(CAMERA_GRAPH, format="lavfi") as source:
        for frame in source.decode(video=0):
            pictures.append(frame)
            if len(pictures) == CAMERA_PICTURES:
                break
    looped = pictures + pictures[-2:0:-1]
    # FFmpeg's libvpx overshoots the rate it is given on this noisy picture
    # (about twice): encode once more, told what makes the rate come out right.
    told = VIDEO_BITRATE
    for _ in range(3):
        frames = _vp8(looped, told)
        rate = sum(map(len, frames)) * 8 * FPS / len(frames)
        if abs(rate - VIDEO_BITRATE) < 0.1 * VIDEO_BITRATE:
            break
        told = round(told * VIDEO_BITRATE / rate)
    return frames


def _vp8(pictures: list[av.VideoFrame], bit_rate: int) -> list[bytes]:
    encoder: Any = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    encoder.time_base = Fraction(1, FPS)
    encoder.bit_rate = bit_rate
    encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    frames: list[bytes] = []
    for index, picture in enumerate(pictures):
        picture.pts = index
        frames += [bytes(packet) for packet in encoder.encode(picture)]
    frames += [bytes(packet) for packet in encoder.encode(None)]
    return frames


def voice_frames() -> list[bytes]:
    """Two seconds of a voice-like sound (a 150 Hz tone with harmonics, syllables
    at 4 Hz) as 20 ms Opus frames, stereo."""
    samples = array.array("h")
    for n in range(2 * AUDIO_RATE):
        t = n / AUDIO_RATE
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)
        value = sum(math.sin(2 * math.pi * 150 * k * t) / k for k in (1, 2, 3, 5))
        sample = int(6000 * envelope * value)
        samples.extend((sample, sample))
    voice = samples.tobytes()
    encoder: Any = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = AUDIO_RATE, "stereo", "s16"
    encoder.bit_rate = 32000
    frames: list[bytes] = []
    size = AUDIO_SAMPLES * 4
    for index in range(len(voice) // size):
        sound = av.AudioFrame(format="s16", layout="stereo", samples=AUDIO_SAMPLES)
        sound.planes[0].update(voice[index * size : (index + 1) * size])
        sound.sample_rate, sound.pts = AUDIO_RATE, index * AUDIO_SAMPLES
        frames += [bytes(packet) for packet in encoder.encode(sound)]
    return frames


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


# A receiver tap's ``put``: (codec, frame), as aiortc's receiver hands them over.
Deliver = Callable[[tuple[RTCRtpCodecParameters, JitterFrame]], None]


class EncodedSource:
    """One track's encoded frames, handed to ``deliver`` on a browser's schedule."""

    def __init__(self, kind: str, frames: list[bytes]) -> None:
        self.kind = kind
        self.codec = MediaCodec.VP8 if kind == "video" else MediaCodec.OPUS
        self._frames = frames
        self._parameters = VP8 if kind == "video" else OPUS
        self._interval_s = 1 / FPS if kind == "video" else AUDIO_SAMPLES / AUDIO_RATE
        self._step = 90000 // FPS if kind == "video" else AUDIO_SAMPLES
        self.pace = Pace()

    async def run(self, deliver: Deliver) -> None:
        """Hand over frames until cancelled."""
        start = time.monotonic()
        index = 0
        while True:
            due = start + index * self._interval_s
            await asyncio.sleep(due - time.monotonic())
            self.pace.lags_s.append(time.monotonic() - due)
            data = self._frames[index % len(self._frames)]
            deliver((self._parameters, JitterFrame(data, index * self._step)))
            index += 1


def consult_sources(
    video: list[bytes], audio: list[bytes]
) -> dict[ParticipantRole, list[EncodedSource]]:
    return {
        role: [EncodedSource("audio", audio), EncodedSource("video", video)]
        for role in (ParticipantRole.THERAPIST, ParticipantRole.PATIENT)
    }


class ReplayTrack(MediaStreamTrack):
    """Encoded frames replayed at real-time pace as ``av.Packet``s (aiortc's
    sender packs them into RTP without an encoder), from the first frame (a
    keyframe) once ``go`` is set."""

    def __init__(self, kind: str, frames: list[bytes], go: asyncio.Event) -> None:
        super().__init__()
        self.kind = kind
        self._frames = frames
        self._go = go
        self._clock = 90000 if kind == "video" else AUDIO_RATE
        self._step = 90000 // FPS if kind == "video" else AUDIO_SAMPLES
        self._start: float | None = None
        self._index = 0

    @property
    def sent(self) -> int:
        """Frames handed to the sender so far."""
        return self._index

    async def recv(self) -> Any:  # an av.Packet, which aiortc packs unencoded
        if self._start is None:
            await self._go.wait()
            self._start = time.monotonic()
        await asyncio.sleep(self._start + self._index * self._step / self._clock - time.monotonic())
        packet = av.Packet(self._frames[self._index % len(self._frames)])
        packet.pts = self._index * self._step
        packet.time_base = Fraction(1, self._clock)
        self._index += 1
        return packet
