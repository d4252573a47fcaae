"""Encoded frames out of one aiortc receiver, instead of decoded ones.

aiortc's ``RTCRtpReceiver`` reassembles the encoded frames from RTP (jitter
buffer, depayloading) and puts each, with its codec, into a queue that a
decoder thread empties; the decoder's pictures and sound go to the track.
The recorder needs the frames *before* that decoder, and no decoder at all
(aiortc issue 984: its ``MediaRecorder`` can only decode and encode again).

:func:`tap_receiver` changes one receiver, before it starts receiving: its
decoder queue is replaced by a :class:`FrameTap` that hands every encoded
frame to a callback, in the event loop, as it comes out of the jitter
buffer. The decoder thread aiortc still starts waits on the tap for the
end-of-stream mark only, so it never creates a decoder: no ``VideoFrame``
or ``AudioFrame`` exists for a recording. Its jitter buffer is wrapped too,
to learn the sender's SSRC (for keyframe requests) and when the buffer gave
up on lost packets (the next frames then lean on a picture that never came).

The receiver's handling of RTCP is wrapped as well, to keep the sender's
latest report (:class:`~signaling.lipsync.SenderReport`), and the jitter
buffer tells the tap each frame's RTP timestamp as the sender wrote it
(aiortc rebases it before the decoder queue): together they place the
frame on the sender's wall clock (lip sync, :mod:`signaling.lipsync`).

Nothing else in the process changes: the participants' own aiortc peers
(and the tests' ones) decode as before. This reaches into three private
attributes of aiortc 1.16 (pinned below 2) and wraps its receiver's
``_handle_rtcp_packet``; :func:`tap_receiver` raises
:class:`TapUnavailable`, naming the attribute, if one of them moves, and
``tests/test_recording_passthrough.py`` checks them.
"""

from __future__ import annotations

import asyncio
import collections
import queue
from collections.abc import Callable
from typing import Any, Protocol

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtcpSrPacket

from signaling.lipsync import SenderReport

# aiortc 1.16's names (RTCRtpReceiver.__init__, receive and _handle_rtp_packet).
_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"
_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
# What the DTLS transport calls with each RTCP packet for the receiver.
_HANDLE_RTCP = "_handle_rtcp_packet"

# Sender reports kept per stream: about half a minute of them (a browser sends
# one a second; a clock drift of 50 ppm moves 1.5 ms in that). The earliest
# mapping of these places the frames (signaling.lipsync).
SENDER_REPORTS_KEPT = 30

OnFrame = Callable[[RTCRtpCodecParameters, JitterFrame], None]


class PictureLossFeedback(Protocol):
    """What sends the sender a keyframe request: an ``RTCRtpReceiver``."""

    async def _send_rtcp_pli(self, media_ssrc: int) -> None: ...


class TapUnavailable(RuntimeError):
    """aiortc's receiver no longer looks as this module expects (aiortc changed)."""


class FrameTap:
    """Stands in for a receiver's decoder queue (``queue.Queue``'s ``put``/``get``).

    ``put`` is called in the event loop by the receiver with ``(codec,
    frame)`` for each reassembled frame, and with ``None`` when the receiver
    stops; ``get`` is called by aiortc's decoder thread and returns only that
    ``None``, which ends the thread (and the track) without a decoder ever
    being made.
    """

    def __init__(self, on_frame: OnFrame) -> None:
        self._on_frame = on_frame
        self._end: queue.Queue[None] = queue.Queue()
        self.frames = 0
        # SSRC of the sender's stream (RTCP feedback names it); None until a packet came.
        self.media_ssrc: int | None = None
        # Set when the jitter buffer dropped packets it waited for; the
        # reader clears it.
        self.lost = False
        # The sender's latest RTCP sender reports, newest last.
        self.sender_reports: collections.deque[SenderReport] = collections.deque(
            maxlen=SENDER_REPORTS_KEPT
        )
        # How many sender reports came so far (the deque's length stops growing).
        self.sender_reports_seen = 0
        # The RTP timestamp (as sent) of the frame being handed on; None for
        # frames that did not come through the jitter buffer.
        self.rtp_timestamp: int | None = None
        self._sent_timestamps: dict[int, int] = {}

    def put(self, item: tuple[RTCRtpCodecParameters, JitterFrame] | None) -> None:
        if item is None:
            self._end.put(None)
            return
        self.frames += 1
        codec, frame = item
        self.rtp_timestamp = self._sent_timestamps.pop(id(frame), None)
        self._on_frame(codec, frame)

    def saw_frame(self, frame: JitterFrame) -> None:
        """The jitter buffer put ``frame`` together (its timestamp still as sent)."""
        # Only the frame just completed is waiting: aiortc hands it on (or drops
        # it) before it handles the receiver's next packet.
        self._sent_timestamps = {id(frame): frame.timestamp}

    def saw_sender_report(self, packet: RtcpSrPacket) -> None:
        self.sender_reports.append(
            SenderReport(packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)
        )
        self.sender_reports_seen += 1

    def get(self) -> None:
        return self._end.get()


class _WatchedJitterBuffer:
    """The receiver's jitter buffer, unchanged, telling the tap what it sees."""

    def __init__(self, inner: Any, tap: FrameTap) -> None:
        self._inner = inner
        self._tap = tap

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        self._tap.media_ssrc = packet.ssrc
        picture_lost, frame = self._inner.add(packet)
        if picture_lost:
            self._tap.lost = True
        if frame is not None:
            self._tap.saw_frame(frame)
        return picture_lost, frame

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def tap_receiver(receiver: RTCRtpReceiver, on_frame: OnFrame) -> FrameTap:
    """Make ``receiver`` hand its encoded frames to ``on_frame`` and decode nothing.

    Call before the receiver starts (``receive()``, when the connection
    comes up). Raises :class:`TapUnavailable` if aiortc moved what this
    relies on, or if the receiver has already started.
    """
    for name in (_DECODER_QUEUE, _DECODER_THREAD, _JITTER_BUFFER, _HANDLE_RTCP):
        if not hasattr(receiver, name):
            raise TapUnavailable(
                f"aiortc's RTCRtpReceiver has no {name} any more: the recorder's "
                "pass-through (signaling/receiver_tap.py) must follow aiortc's change"
            )
    if getattr(receiver, _DECODER_THREAD) is not None:
        raise TapUnavailable("the receiver has started decoding already; tap it before")
    if not isinstance(getattr(receiver, _DECODER_QUEUE), queue.Queue):
        raise TapUnavailable("the receiver's decoder queue is not a queue.Queue any more")
    tap = FrameTap(on_frame)
    setattr(receiver, _DECODER_QUEUE, tap)
    setattr(receiver, _JITTER_BUFFER, _WatchedJitterBuffer(getattr(receiver, _JITTER_BUFFER), tap))
    handle_rtcp = getattr(receiver, _HANDLE_RTCP)

    async def watched_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            tap.saw_sender_report(packet)
        await handle_rtcp(packet)

    # The DTLS transport calls it by name on the receiver: the instance's own wins.
    setattr(receiver, _HANDLE_RTCP, watched_rtcp)
    return tap


def request_keyframe(receiver: PictureLossFeedback, tap: FrameTap) -> asyncio.Task[None] | None:
    """Ask the sender for a keyframe (RTCP PLI, RFC 4585 6.3.1); None when its SSRC
    is not known yet (no packet came)."""
    if tap.media_ssrc is None:
        return None
    return asyncio.get_running_loop().create_task(receiver._send_rtcp_pli(tap.media_ssrc))
