"""When failed logins lock an e-mail address or a client address."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta


def lookback(*, window_s: int, lockout_s: int) -> timedelta:
    """How far back failures can still matter: a lock may start a window ago
    and lasts ``lockout_s`` from its last failure."""
    return timedelta(seconds=window_s + lockout_s)


def locked_until(
    failures: Sequence[datetime],
    *,
    now: datetime,
    max_failures: int,
    window_s: int,
    lockout_s: int,
) -> datetime | None:
    """Return until when logins are refused, or None.

    ``failures`` are failure times, oldest first (at least those within
    :func:`lookback`). Whenever ``max_failures`` of them fall within
    ``window_s``, logins are refused for ``lockout_s`` after the last of them.
    """
    window = timedelta(seconds=window_s)
    lockout = timedelta(seconds=lockout_s)
    until: datetime | None = None
    for first, last in zip(failures, failures[max_failures - 1 :], strict=False):
        if last - first <= window and (until is None or last + lockout > until):
            until = last + lockout
    return until if until is not None and until > now else None
