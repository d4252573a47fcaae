"""Encoded frames into a WebM or Matroska file, unchanged (PyAV, no codecs).

:class:`PacketMuxer` writes the frames it is given as ``av.Packet``\\ s with
``OutputContainer.mux``; its streams are made with ``add_mux_stream``, which
creates no codec context, so no encoder or decoder is ever opened.

The container's header names each video stream's picture size, and the
header goes out with the first packet. So the muxer holds every packet
until each video stream has told its size (from its first keyframe,
:meth:`PacketMuxer.set_size`), or until :data:`HOLD_LIMIT_S` passed (a
camera that sends no keyframe then gets :data:`~signaling.media_codecs.FALLBACK_SIZE`
in the header; decoders take the size from the stream). A picture size that
changes later needs nothing: each keyframe carries its own.
"""

from __future__ import annotations

import fractions
import time
from dataclasses import dataclass
from typing import Any

import av

from signaling.media_codecs import FALLBACK_SIZE, Container, MediaCodec

# The matroska muxer keeps a whole cluster in memory before writing it
# (by default up to 5 s): a server that dies loses that much. One second.
CONTAINER_OPTIONS = {"cluster_time_limit": "1000"}
# How long packets wait for every camera's first keyframe before the header
# is written without one's size.
HOLD_LIMIT_S = 5.0
AUDIO_RATE = 48000


@dataclass(frozen=True)
class StreamSpec:
    """One stream of the file: the codec of what it holds and its clock (RTP's)."""

    codec: MediaCodec
    clock_rate: int


@dataclass(frozen=True)
class _Held:
    index: int
    data: bytes
    pts: int
    keyframe: bool


class PacketMuxer:
    """Write encoded frames of ``streams`` (in this order) into ``sink`` as ``container``.

    ``sink`` is a non-seekable file-like object (``write``); :meth:`close`
    writes the rest and the container's end, and raises what PyAV raises.
    """

    def __init__(
        self,
        sink: Any,
        streams: list[StreamSpec],
        container: Container,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self._sink = sink
        self._specs = streams
        self._format = container
        self._clock = clock
        self._created = clock()
        self._sizes: dict[int, tuple[int, int]] = {}
        self._held: list[_Held] = []
        self._output: Any = None
        self._streams: list[Any] = []
        self._time_bases = [fractions.Fraction(1, spec.clock_rate) for spec in streams]
        self.packets = [0] * len(streams)
        self.keyframes = [0] * len(streams)

    @property
    def header_written(self) -> bool:
        return self._output is not None

    def set_size(self, index: int, size: tuple[int, int] | None) -> None:
        """A video stream's picture size, from its first keyframe (None: unknown)."""
        self._sizes.setdefault(index, size or FALLBACK_SIZE)

    def add(self, index: int, data: bytes, pts: int, *, keyframe: bool) -> None:
        """Mux one encoded frame of stream ``index``; ``pts`` in that stream's clock
        (also its dts: WebRTC's encoders send no B-frames)."""
        if self._output is None:
            self._held.append(_Held(index, data, pts, keyframe))
            self._open_when_ready()
        else:
            self._mux(index, data, pts, keyframe)

    def poll(self) -> None:
        """Write the header and what is held once the hold limit has passed
        (called now and then, so that a silent camera does not hold the rest)."""
        if self._output is None and self._held:
            self._open_when_ready()

    def close(self) -> None:
        """Write what is held and the container's end (an empty file is still a
        valid container)."""
        if self._output is None:
            self._open_when_ready(now=True)
        self._output.close()

    def _open_when_ready(self, *, now: bool = False) -> None:
        waiting = [
            index
            for index, spec in enumerate(self._specs)
            if spec.codec.is_video and index not in self._sizes
        ]
        if waiting and not now and self._clock() - self._created < HOLD_LIMIT_S:
            return
        for index in waiting:
            self.set_size(index, None)
        self._open()
        held, self._held = self._held, []
        # In time order across the streams, as they would have come.
        held.sort(key=lambda item: item.pts * self._time_bases[item.index])
        for item in held:
            self._mux(item.index, item.data, item.pts, item.keyframe)

    def _open(self) -> None:
        output = av.open(
            self._sink, mode="w", format=self._format.muxer, options=dict(CONTAINER_OPTIONS)
        )
        for index, spec in enumerate(self._specs):
            if spec.codec.is_video:
                width, height = self._sizes[index]
                stream = output.add_mux_stream(spec.codec.value, width=width, height=height)
            else:
                stream = output.add_mux_stream(spec.codec.value, rate=AUDIO_RATE)
            stream.time_base = self._time_bases[index]
            self._streams.append(stream)
        self._output = output

    def _mux(self, index: int, data: bytes, pts: int, keyframe: bool) -> None:
        packet = av.Packet(data)
        packet.stream = self._streams[index]
        packet.time_base = self._time_bases[index]
        packet.pts = packet.dts = pts
        packet.is_keyframe = keyframe
        self._output.mux(packet)
        self.packets[index] += 1
        self.keyframes[index] += keyframe
