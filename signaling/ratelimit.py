"""A token bucket per connection: steady rate, short bursts."""

from __future__ import annotations


class TokenBucket:
    """Allows ``rate`` messages per second on average and bursts of ``burst``.

    Time is passed in (monotonic seconds), so it is tested without sleeping.
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, *, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def allow(self, now: float) -> bool:
        """Take one token if there is one."""
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """Return the token just taken: the message it was for will be counted again."""
        self._tokens = min(self._burst, self._tokens + 1.0)
