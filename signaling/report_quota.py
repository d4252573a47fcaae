"""How much a client may write to the technical log through ``report``.

A report is a diagnostic from the client's page; anyone with an invite link
can send them, within the rate limit, for as long as the socket stays open.
Without a bound, one socket could write gigabytes a day into the technical
log. Each connection and each consult (on this node) gets a quota of entries
and bytes; beyond it reports are dropped, counted, and said once per
connection.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Quota:
    entries: int
    bytes: int


# A page reports on state changes: a handful per call, a few more when it fails.
PER_CONNECTION = Quota(entries=100, bytes=32 * 1024)
PER_CONSULT = Quota(entries=500, bytes=256 * 1024)


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

    def fits(self, quota: Quota, size: int) -> bool:
        return self.entries < quota.entries and self.bytes + size <= quota.bytes


class ReportQuota:
    def __init__(
        self, *, per_connection: Quota = PER_CONNECTION, per_consult: Quota = PER_CONSULT
    ) -> None:
        self._per_connection = per_connection
        self._per_consult = per_consult
        self._connections: dict[str, _Use] = {}
        self._consults: dict[uuid.UUID, _Use] = {}

    def take(self, consult_id: uuid.UUID, connection_id: str, size: int) -> Verdict:
        """Count a report of ``size`` bytes against both quotas, if it fits in both."""
        connection = self._connections.setdefault(connection_id, _Use())
        consult = self._consults.setdefault(consult_id, _Use())
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
