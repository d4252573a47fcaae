"""A recorded participant's track: where its frames come from and where
they go in the file, with the clock arithmetic that places them."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from signaling.lipsync import LipSync, SenderReport, earliest_report
from signaling.media_codecs import MediaCodec
from signaling.protocol import ParticipantRole
from signaling.receiver_tap import FrameTap, PictureLossFeedback


class StreamKind(enum.StrEnum):
    """A track's ``kind`` as aiortc gives it; the file holds them in this order."""

    AUDIO = "audio"
    VIDEO = "video"


class Timeline:
    """The recording's start, shared by its streams."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


@dataclass
class ReceivedTrack:
    """One participant's track: its receiver's frames, and its stream in the file."""

    role: ParticipantRole
    kind: StreamKind
    codec: MediaCodec
    # Where keyframe requests go: the track's aiortc receiver.
    receiver: PictureLossFeedback
    tap: FrameTap | None = None
    # The stream's index in the file, from the start on.
    index: int | None = None
    clock_rate: int = 90000
    offset: int | None = None
    last_pts: int | None = None
    awaiting_keyframe: bool = True
    keyframe_asked_at: float = float("-inf")
    keyframe_requests: int = 0
    last_frame_at: float = field(default_factory=time.monotonic)
    frames: int = 0
    dropped: int = 0
    # The tap's report that places frames earliest, chosen when the tap had
    # seen this many reports (it changes only with a new report).
    _placing_report: SenderReport | None = field(default=None, repr=False)
    _placing_chosen_at: int = field(default=0, repr=False)

    @property
    def label(self) -> str:
        return f"{self.role.value} {self.kind}"

    def rebased(self, timestamp: int, timeline: Timeline, *, sync: LipSync | None = None) -> int:
        """``timestamp`` (RTP clock, from the stream's first frame) counted from
        the recording's start; never back in time. The first frame is placed
        when it arrived; with ``sync`` (the participant's), the stream is then
        moved forward whenever it runs ahead of the participant's other
        streams by their sender's reports."""
        if self.offset is None:
            self.offset = round(timeline.elapsed_s() * self.clock_rate) - timestamp
        pts = timestamp + self.offset
        if sync is not None and self.index is not None:
            shift_s = sync.correction_s(self.index, pts / self.clock_rate, self._sender_time_s())
            if shift_s:
                shift = round(shift_s * self.clock_rate)
                self.offset += shift
                pts += shift
        if self.last_pts is not None and pts <= self.last_pts:
            pts = self.last_pts + 1
        self.last_pts = pts
        return pts

    def _sender_time_s(self) -> float | None:
        """When the sender took the frame being handed on, by its wall clock."""
        tap = self.tap
        if tap is None or not tap.sender_reports or tap.rtp_timestamp is None:
            return None
        if self._placing_report is None or self._placing_chosen_at != tap.sender_reports_seen:
            self._placing_report = earliest_report(
                tap.sender_reports, tap.rtp_timestamp, self.clock_rate
            )
            self._placing_chosen_at = tap.sender_reports_seen
        return self._placing_report.sender_time_s(tap.rtp_timestamp, self.clock_rate)
