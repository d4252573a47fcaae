"""Bulk work that leaves the machine to signaling: a duty cycle.

A bulk job the server runs for a request (an access-log verify, an export)
or on a schedule (the retention purge) does its work in pieces; after each
piece it rests so that, over the job, it is busy at most ``share`` of the
wall time. "Busy" is the piece's wall time: it includes the database's work
that the piece waited for, which a worker's niceness cannot lower (the
database's processes are not the server's). PostgreSQL's autovacuum gives
way the same way (``autovacuum_vacuum_cost_delay``).

Only the standard library: the worker scripts (``chain_walk.py``,
``export_walk.py``) import this file by its path, without the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# The longest rest after one piece: a piece that took long (a slow disk,
# a lock waited for) must not make the job sleep for minutes.
MAX_REST_S = 10.0


def rest_after(busy_s: float, share: float) -> float:
    """How long to rest after ``busy_s`` of work to be busy ``share`` of the time."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be more than 0 and at most 1, not {share!r}")
    return min(MAX_REST_S, max(0.0, busy_s) * (1 - share) / share)


class Pace:
    """Call :meth:`rest` between the pieces of a job (in a worker process or
    a thread): it sleeps long enough for the job to be busy at most ``share``
    of the time since it began. ``share`` 1: it never sleeps."""

    def __init__(
        self,
        share: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        rest_after(0.0, share)  # validates
        self.share = share
        self._clock = clock
        self._sleep = sleep
        self._since = clock()
        self.rested_s = 0.0

    def rest(self) -> None:
        if self.share >= 1:
            return
        pause = rest_after(self._clock() - self._since, self.share)
        if pause > 0:
            self._sleep(pause)
            self.rested_s += pause
        self._since = self._clock()
