"""Lip sync: a participant's sound and picture placed by their sender's clock.

Each stream's RTP timestamps run on a clock of their own (48 kHz for Opus,
90 kHz for video) from a random origin, and the recorder places each
stream's first frame at the moment it arrived. Sound and picture of one
browser then start apart by however much longer one of them took to
arrive (the network, a jitter buffer, a picture that waits for its
keyframe). The sender says how its streams' clocks line up: each RTCP
sender report (RFC 3550 6.4.1) pairs an RTP timestamp with the sender's
wall-clock time (NTP), the same wall clock for all of its streams.

:class:`SenderReport` maps a stream's RTP timestamp to that wall clock;
:class:`LipSync` (one per participant) compares, for every frame, where
the file places it with when its sender says it was taken, and moves a
stream that runs early *forward*, never back: the file's timestamps only
grow, and a stream moved forward has a gap of the size of the correction
(a picture shown a little longer, a moment of silence) once, after which
the two stay together. Pure code: no aiortc, no sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# How far apart a participant's streams may drift before one is moved:
# below what anyone notices (lip sync is felt from about 45 ms of sound
# ahead of picture, ITU-R BT.1359), above the jitter of the reports.
SYNC_TOLERANCE_S = 0.025
# A correction larger than this is not a late stream but a sender whose
# reports are wrong (a clock that jumped): it is not followed.
MAX_CORRECTION_S = 2.0
_NTP_FRACTION = 2**32


@dataclass(frozen=True)
class SenderReport:
    """What an RTCP sender report says about one stream: an NTP time and the
    RTP timestamp that belongs to it."""

    ntp_timestamp: int  # 64-bit NTP (32.32 fixed point)
    rtp_timestamp: int

    def sender_time_s(self, rtp_timestamp: int, clock_rate: int) -> float:
        """The sender's wall-clock time (seconds) of a frame with ``rtp_timestamp``."""
        # RTP timestamps wrap at 2**32: the frame is within half of that of the report.
        ticks = (rtp_timestamp - self.rtp_timestamp + 2**31) % 2**32 - 2**31
        return self.ntp_timestamp / _NTP_FRACTION + ticks / clock_rate


def earliest_report(
    reports: Iterable[SenderReport], rtp_timestamp: int, clock_rate: int
) -> SenderReport:
    """The report that puts the frame with ``rtp_timestamp`` earliest.

    A sender's report pairs an RTP timestamp with the wall-clock time it
    wrote the report, or (aiortc) sent the stream's last packet: never
    before the frame was taken, later by however long the sender was held
    up. The earliest mapping of the last few is the least held up, so it
    changes seldom, where the latest would swing with every busy moment of
    the sender and move its streams back and forth.

    Which report that is does not depend on the frame: a stream's reports
    and frames lie within minutes of one another, far inside the half of
    the RTP clock's range (hours) within which the mappings only shift
    together. A caller may keep it until the next report comes.
    """
    return min(reports, key=lambda report: report.sender_time_s(rtp_timestamp, clock_rate))


def earliest_sender_time_s(
    reports: Iterable[SenderReport], rtp_timestamp: int, clock_rate: int
) -> float:
    """The frame's time by the report that puts it earliest (:func:`earliest_report`)."""
    return earliest_report(reports, rtp_timestamp, clock_rate).sender_time_s(
        rtp_timestamp, clock_rate
    )


@dataclass
class LipSync:
    """One participant's streams kept on their sender's clock.

    For each stream, the skew is where the file places a frame minus when its
    sender took it; streams of one sender in sync have the same skew.
    """

    tolerance_s: float = SYNC_TOLERANCE_S
    # Stream (its index in the file) -> its latest skew, for streams with a report.
    skews: dict[int, float] = field(default_factory=dict)
    corrections: int = 0
    refused: int = 0

    def correction_s(self, stream: int, placed_s: float, sender_time_s: float | None) -> float:
        """How far to move ``stream`` forward from this frame on (0.0: it is in
        step with the participant's other streams, or its sender has not
        reported yet); ``placed_s``: where the file puts the frame."""
        if sender_time_s is None:
            return 0.0
        skew = placed_s - sender_time_s
        self.skews[stream] = skew
        latest = max(self.skews.values())
        if latest - skew <= self.tolerance_s:
            return 0.0
        if latest - skew > MAX_CORRECTION_S:
            self.refused += 1
            return 0.0
        self.skews[stream] = latest
        self.corrections += 1
        return latest - skew
