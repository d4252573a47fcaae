"""What the serving process and the recorder workers share about a recording,
without the media libraries: the recorder's errors and results, and how long
making a file seekable may take.

The recorder (:mod:`signaling.recorder`) and the remux (:mod:`signaling.remux`)
need aiortc and PyAV and run in recorder worker processes only; the process
that serves HTTP and the signaling sockets talks to them through
:mod:`signaling.recorder_proxy` and imports this module instead, so that it
loads no media library (tests/test_serve_footprint.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REMUX_BASE_S",
    "REMUX_MIN_BYTES_PER_S",
    "Failure",
    "InvalidOffer",
    "OnFailure",
    "RecorderError",
    "StopResult",
    "remux_budget_s",
]

# What a remux gets per byte of the file, at least, and its fixed part: it
# needs about 0.06 CPU-s per minute of two 1.5 Mbit/s cameras, but ran at
# only 17-37 MB/s of wall time on a 2-core host with a load of 16
# (docs/recording.md); a third of that is the floor.
REMUX_MIN_BYTES_PER_S = 5_000_000
REMUX_BASE_S = 5.0


def remux_budget_s(plaintext_bytes: int) -> float:
    """How long a remux of a file of ``plaintext_bytes`` may take."""
    return REMUX_BASE_S + plaintext_bytes / REMUX_MIN_BYTES_PER_S


class RecorderError(Exception):
    """The recorder cannot do what was asked now; the message names the state."""


class InvalidOffer(RecorderError):
    """A recorder offer that does not parse or does not send what a recording needs."""


class Failure(enum.Enum):
    STORAGE_FULL = "storage_full"
    RECORDER_FAILED = "recorder_failed"


@dataclass(frozen=True)
class StopResult:
    # Whether the file was closed with its final chunk.
    complete: bool
    plaintext_bytes: int
    # Frames that went into the file, per stream ("therapist video": 150).
    frames: dict[str, int]
    # The container's media type ("video/webm"); None when nothing was started.
    media_type: str | None = None


OnFailure = Callable[[Failure, str], Coroutine[Any, Any, None]]
