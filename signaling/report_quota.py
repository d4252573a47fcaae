"""How much a client may write to the technical log through ``report``.

A report is a diagnostic from the client's page; anyone with an invite link
can send them, within the rate limit, for as long as the socket stays open.
Without a bound, one socket could write gigabytes a day into the technical
log. Each connection and each consult (on this node) gets a quota of entries
and bytes; beyond it reports are dropped, counted, and said once per
connection.

A consult is forgotten when it ends on this node, or once no report came for
it for a day (it ended on another node, or was left): by then what it wrote
has left the technical log, which keeps 24 hours.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Quota:
    entries: int
    bytes: int


# A page reports on state changes: a handful per call, a few more when it fails.
PER_CONNECTION = Quota(entries=100, bytes=32 * 1024)
PER_CONSULT = Quota(entries=500, bytes=256 * 1024)
# A consult without a report for this long is forgotten: the technical log's 24 hours.
IDLE_FORGET_S = 24 * 3600.0
# How often at most the consults are looked through for idle ones.
SWEEP_EVERY_S = 600.0


class Verdict(enum.Enum):
    KEEP = "keep"
    # Over the quota, the first time for this connection: say so, once.
    FIRST_DROP = "first_drop"
    DROP = "drop"


@dataclass
class _Use:
    entries: int = 0
    bytes: int = 0
    over: bool = False
    last_at: float = 0.0

    def fits(self, quota: Quota, size: int) -> bool:
        return self.entries < quota.entries and self.bytes + size <= quota.bytes


class ReportQuota:
    def __init__(
        self,
        *,
        per_connection: Quota = PER_CONNECTION,
        per_consult: Quota = PER_CONSULT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_connection = per_connection
        self._per_consult = per_consult
        self._clock = clock
        self._connections: dict[str, _Use] = {}
        self._consults: dict[uuid.UUID, _Use] = {}
        self._next_sweep = clock() + SWEEP_EVERY_S

    @property
    def tracked_consults(self) -> int:
        return len(self._consults)

    def take(self, consult_id: uuid.UUID, connection_id: str, size: int) -> Verdict:
        """Count a report of ``size`` bytes against both quotas, if it fits in both."""
        now = self._clock()
        if now >= self._next_sweep:
            self._forget_idle(now)
        connection = self._connections.setdefault(connection_id, _Use())
        consult = self._consults.setdefault(consult_id, _Use())
        consult.last_at = now
        if connection.fits(self._per_connection, size) and consult.fits(self._per_consult, size):
            for use in (connection, consult):
                use.entries += 1
                use.bytes += size
            return Verdict.KEEP
        if connection.over:
            return Verdict.DROP
        connection.over = True
        return Verdict.FIRST_DROP

    def forget_connection(self, connection_id: str) -> None:
        self._connections.pop(connection_id, None)

    def forget_consult(self, consult_id: uuid.UUID) -> None:
        self._consults.pop(consult_id, None)

    def _forget_idle(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY_S
        idle = [cid for cid, use in self._consults.items() if now - use.last_at >= IDLE_FORGET_S]
        for consult_id in idle:
            del self._consults[consult_id]
