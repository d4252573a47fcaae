"""A camera and a microphone that mark the same moments, and finding the
marks again in a recording: to measure how far sound and picture of one
sender lie apart in the file (lip sync).

Both tracks mark every whole second of the wall clock (``time.time()``,
which aiortc's tracks pace themselves by): the picture taken at or just
after it is white (the others black), and the sound of the 20 ms after it
is a loud tone (the rest silence). In the decoded file a white picture's
time and a tone's start should then coincide.
"""

from __future__ import annotations

import array
import asyncio
import fractions
import io
import math
import time
from dataclasses import dataclass

import av
from aiortc.mediastreams import AUDIO_PTIME, MediaStreamTrack
from av import AudioFrame, VideoFrame

from tests.support.webrtc import SyntheticVideo

MARK_EVERY_S = 1.0
SAMPLE_RATE = 48000
TONE_HZ = 1000
TONE_S = 0.020


def marked_pcm(began_s: float, samples: int) -> array.array[int]:
    """The samples from ``began_s`` on (at 48 kHz): a tone for ``TONE_S``
    from each whole second, silence the rest. A tone goes on into the next
    frame when the second falls late in one."""
    pcm = array.array("h", bytes(2 * samples))
    # In samples, to round once: the whole second at or before the frame.
    began = round(began_s * SAMPLE_RATE)
    every = round(MARK_EVERY_S * SAMPLE_RATE)
    tone = round(TONE_S * SAMPLE_RATE)
    for index in range(samples):
        since_mark = (began + index) % every
        if since_mark < tone:
            pcm[index] = int(20000 * math.sin(2 * math.pi * TONE_HZ * since_mark / SAMPLE_RATE))
    return pcm


def _marked(previous_s: float | None, now_s: float) -> bool:
    return previous_s is not None and math.floor(now_s / MARK_EVERY_S) != math.floor(
        previous_s / MARK_EVERY_S
    )


class MarkedVideo(SyntheticVideo):
    """Black pictures, white at each whole second."""

    def __init__(self) -> None:
        super().__init__()
        self._previous_s: float | None = None

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        now_s = time.time()
        luma = 235 if _marked(self._previous_s, now_s) else 16
        self._previous_s = now_s
        frame = VideoFrame(width=160, height=120)
        for index, plane in enumerate(frame.planes):
            plane.update(bytes([luma if index == 0 else 128]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, time_base
        return frame


class MarkedAudio(MediaStreamTrack):
    """Silence, a tone for the 20 ms from each whole second on (as aiortc's
    AudioStreamTrack paces itself, at 48 kHz)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._timestamp = 0

    async def recv(self) -> AudioFrame:
        samples = int(AUDIO_PTIME * SAMPLE_RATE)
        if self._start is None:
            self._start = time.time()
        else:
            self._timestamp += samples
            await asyncio.sleep(self._start + self._timestamp / SAMPLE_RATE - time.time())
        began_s = self._start + self._timestamp / SAMPLE_RATE
        frame = AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(marked_pcm(began_s, samples).tobytes())
        frame.pts = self._timestamp
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


@dataclass(frozen=True)
class Marks:
    video_s: list[float]
    audio_s: list[float]

    def skews_s(self) -> list[float]:
        """For each picture mark, the nearest sound mark's time minus its own
        (positive: the sound comes late)."""
        return [
            min((audio - video for audio in self.audio_s), key=abs)
            for video in self.video_s
            if self.audio_s
        ]


def find_marks(media: bytes, *, audio_index: int, video_index: int) -> Marks:
    """Decode two streams of ``media`` (in the test) and find their marks."""
    video_s: list[float] = []
    audio_s: list[float] = []
    loud = False
    with av.open(io.BytesIO(media), mode="r") as container:
        streams = [container.streams[audio_index], container.streams[video_index]]
        for packet in container.demux(streams):
            for frame in packet.decode():
                if (
                    not isinstance(frame, VideoFrame | AudioFrame)
                    or frame.pts is None
                    or frame.time_base is None
                ):
                    continue
                at_s = float(frame.pts * frame.time_base)
                if isinstance(frame, VideoFrame):
                    luma = bytes(frame.planes[0])[::97]
                    if sum(luma) / len(luma) > 128 and (
                        not video_s or at_s - video_s[-1] > MARK_EVERY_S / 2
                    ):
                        video_s.append(at_s)
                elif isinstance(frame, AudioFrame):
                    assert frame.format.name in ("flt", "fltp"), frame.format.name
                    values = array.array("f", bytes(frame.planes[0]))
                    stride = 1 if frame.format.is_planar else len(frame.layout.channels)
                    samples = values[::stride][: frame.samples]
                    start = next((i for i, value in enumerate(samples) if abs(value) > 0.2), None)
                    if start is not None and not loud:
                        audio_s.append(at_s + start / frame.sample_rate)
                    loud = start is not None
    return Marks(video_s, audio_s)
