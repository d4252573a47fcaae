"""The clock, as a protocol: the system clock in service, a manual one in tests.

Every rule that depends on time (lockouts, session timeouts, link expiry,
the 24-hour technical log) asks a :class:`Clock`, so tests move time forward
instead of sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


def iso_utc(moment: datetime | None) -> str | None:
    """A moment as ISO 8601 in UTC with ``Z`` (the form of exports and
    webhook messages, read by other systems); None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Clock(Protocol):
    def now(self) -> datetime:
        """Return the current time, timezone-aware, in UTC."""


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to; starts at ``start`` (default: now)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self._now += timedelta(seconds=seconds)
