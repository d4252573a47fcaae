"""The technical log: connection diagnostics and failed logins, for 24 hours.

Entries may hold personal data (a client address, a browser), so no entry
older than :data:`RETENTION` is ever returned, whether or not the purge has
run yet, and :func:`purge_technical_log` deletes them.

:class:`TechnicalLog` is the structlog sink for diagnostics: events logged on
its logger go to this table (in batches, by :meth:`TechnicalLog.flush`),
never to the process log on stdout, which carries no personal data.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.clock import Clock
from audit.schema import technical_log

RETENTION = timedelta(hours=24)


@dataclass(frozen=True)
class TechnicalEntry:
    at: datetime
    kind: str
    subject: str | None
    detail: Mapping[str, Any]


async def write_technical(
    conn: AsyncConnection,
    kind: str,
    *,
    now: datetime,
    subject: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append one diagnostic entry. ``subject`` is a pseudonymous id, if any."""
    await conn.execute(
        technical_log.insert().values(at=now, kind=kind, subject=subject, detail=dict(detail or {}))
    )


async def read_technical(
    conn: AsyncConnection, *, now: datetime, subject: str | None = None, limit: int = 200
) -> list[TechnicalEntry]:
    """Return entries of the last 24 hours, newest first."""
    query = sa.select(technical_log).where(technical_log.c.at > now - RETENTION)
    if subject is not None:
        query = query.where(technical_log.c.subject == subject)
    rows = await conn.execute(query.order_by(technical_log.c.id.desc()).limit(limit))
    return [TechnicalEntry(row.at, row.kind, row.subject, row.detail) for row in rows]


async def purge_technical_log(conn: AsyncConnection, *, now: datetime) -> int:
    """Delete entries older than 24 hours; return how many."""
    result = await conn.execute(technical_log.delete().where(technical_log.c.at <= now - RETENTION))
    return result.rowcount


# Entries waiting for the writer; beyond this the oldest are dropped (and counted).
MAX_PENDING = 10_000
# Longest text kept of one value.
MAX_VALUE_CHARS = 500


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    if isinstance(value, uuid.UUID | datetime):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key)[:64]: _json_value(item) for key, item in list(value.items())[:50]}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value[:50]]
    return str(value)[:MAX_VALUE_CHARS]


class TechnicalLog:
    """The structlog sink of the technical log.

    ``log.info("ice-state", subject=consult_id, state="failed")`` keeps an
    entry (kind ``ice-state``, the subject's pseudonymous id, the other
    fields as its detail, the time from ``clock``) until :meth:`flush`
    writes everything pending in one transaction. Nothing reaches stdout.
    """

    def __init__(self, clock: Clock, *, max_pending: int = MAX_PENDING) -> None:
        self._clock = clock
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self.dropped = 0
        self.log: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
            None,
            processors=[self._keep],
            wrapper_class=structlog.make_filtering_bound_logger(0),
            cache_logger_on_first_use=False,
        )

    def _keep(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> Mapping[str, Any]:
        kind = str(event.pop("event", "event"))[:64]
        subject = event.pop("subject", None)
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(
            {
                "at": self._clock.now(),
                "kind": kind,
                "subject": None if subject is None else str(subject)[:64],
                "detail": {str(key)[:64]: _json_value(value) for key, value in event.items()},
            }
        )
        raise structlog.DropEvent

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self, engine: AsyncEngine) -> int:
        """Write the pending entries; return how many. On failure they stay pending."""
        if not self._pending:
            return 0
        rows = list(self._pending)
        self._pending.clear()
        try:
            async with engine.begin() as conn:
                await conn.execute(technical_log.insert(), rows)
        except BaseException:
            # Back in front of what arrived meanwhile, as far as there is room.
            room = max(0, (self._pending.maxlen or 0) - len(self._pending))
            keep = rows[max(0, len(rows) - room) :] if room else []
            self.dropped += len(rows) - len(keep)
            self._pending.extendleft(reversed(keep))
            raise
        return len(rows)
