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
import math
import uuid
from collections import Counter, deque
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.clock import Clock
from audit.db import is_refused_value
from audit.schema import technical_log

RETENTION = timedelta(hours=24)

_log = structlog.get_logger("videoconsult.audit")


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


async def count_expired_technical(conn: AsyncConnection, *, now: datetime) -> int:
    """How many entries :func:`purge_technical_log` would delete now."""
    found = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(technical_log)
        .where(technical_log.c.at <= now - RETENTION)
    )
    return int(found or 0)


# Entries waiting for the writer; beyond this the oldest are dropped (and counted).
MAX_PENDING = 10_000
# Entries the table holds at most (logging.technical_log_max_rows); beyond
# this new ones are dropped until the 24-hour purge makes room.
MAX_ROWS = 500_000
# Entries written per statement: each slice's conversion holds the event loop
# (about 8 µs an entry), and the loop runs between slices.
FLUSH_SLICE = 250


class DropReason(enum.StrEnum):
    """Why technical-log entries were not kept (the metric's ``reason`` label)."""

    # More were waiting for the writer than it keeps (the database away).
    PENDING_FULL = "pending_full"
    # The table holds its most (logging.technical_log_max_rows).
    STORE_FULL = "store_full"
    # A client's reports past its connection's or consult's quota.
    REPORT_QUOTA = "report_quota"
    # The database refused the entry itself, not for being away (a bug): it
    # is dropped so that it does not hold back the entries written with it.
    UNWRITABLE = "unwritable"


# Longest text kept of one value.
MAX_VALUE_CHARS = 500


def _json_value(value: Any) -> Any:
    """``value`` as JSON both databases store: NaN and the infinities (no JSON;
    PostgreSQL refuses them) become null, text that is not UTF-8 (a header
    aiohttp read with surrogate escapes) gets replacement characters."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT:
            return value
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _utf8(value[:MAX_VALUE_CHARS])
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    if isinstance(value, uuid.UUID | datetime):
        return str(value)
    if isinstance(value, Mapping):
        return {_utf8(str(key)[:64]): _json_value(item) for key, item in list(value.items())[:50]}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value[:50]]
    return _utf8(str(value)[:MAX_VALUE_CHARS])


# Integers kept as they are; larger ones as floats (what a JSON reader makes
# of them), and beyond a float's range as null.
_MAX_EXACT_INT = 2**63


def _utf8(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="replace").decode()
    return text


class TechnicalLog:
    """The structlog sink of the technical log.

    ``log.info("ice-state", subject=consult_id, state="failed")`` keeps an
    entry (kind ``ice-state``, the subject's pseudonymous id, the other
    fields as its detail, the time from ``clock``) until :meth:`flush`
    writes everything pending in one transaction. Nothing reaches stdout.
    """

    def __init__(
        self, clock: Clock, *, max_pending: int = MAX_PENDING, max_rows: int = MAX_ROWS
    ) -> None:
        self._clock = clock
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self.dropped: Counter[DropReason] = Counter()
        self._max_rows = max_rows
        # Rows in the table as far as this node knows: counted at the first
        # write and after each purge (recount), then counted along.
        self._stored: int | None = None
        self._full = False
        # The bound logger itself, not structlog.wrap_logger's lazy proxy: the
        # proxy builds a new bound logger for every entry (an entry took 17.3
        # µs with it, 10.6 without; a patient's way in writes several).
        # (structlog types the class as a protocol, without its constructor.)
        bound_logger: Any = structlog.make_filtering_bound_logger(0)
        self.log: structlog.typing.FilteringBoundLogger = bound_logger(None, [self._keep], {})

    def _keep(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> Mapping[str, Any]:
        kind = _utf8(str(event.pop("event", "event"))[:64])
        subject = event.pop("subject", None)
        if len(self._pending) == self._pending.maxlen:
            self.dropped[DropReason.PENDING_FULL] += 1
        self._pending.append(
            {
                "at": self._clock.now(),
                "kind": kind,
                "subject": None if subject is None else _utf8(str(subject)[:64]),
                "detail": {
                    _utf8(str(key)[:64]): _json_value(value) for key, value in event.items()
                },
            }
        )
        raise structlog.DropEvent

    @property
    def pending(self) -> int:
        return len(self._pending)

    def recount(self) -> None:
        """The table changed under this node (a purge): count its rows again."""
        self._stored = None

    async def flush(self, engine: AsyncEngine) -> int:
        """Write the pending entries, as far as the table has room; return how
        many were written. While the database is away they stay pending; an
        entry it refuses for itself is dropped (:attr:`DropReason.UNWRITABLE`)
        and the others are written."""
        if not self._pending:
            return 0
        rows = list(self._pending)
        self._pending.clear()
        try:
            async with engine.begin() as conn:
                if self._stored is None:
                    self._stored = await conn.scalar(
                        sa.select(sa.func.count()).select_from(technical_log)
                    )
                rows = self._within_bound(rows)
                # A slice at a time: a backlog of thousands (an admission
                # storm) in one statement held the loop for all of them.
                for start in range(0, len(rows), FLUSH_SLICE):
                    await conn.execute(technical_log.insert(), rows[start : start + FLUSH_SLICE])
        except Exception as err:
            if not is_refused_value(err):
                self._put_back(rows)
                raise
            # Not the database away: one of the entries is one it will not
            # take. Each is tried on its own, so that it holds back no other.
            return await self._one_by_one(engine, rows, err)
        except BaseException:
            self._put_back(rows)
            raise
        self._count_stored(len(rows))
        return len(rows)

    async def _one_by_one(
        self, engine: AsyncEngine, rows: list[dict[str, Any]], first: Exception
    ) -> int:
        """Each row in a transaction of its own; a row the database refuses is
        dropped and counted. An outage midway keeps the rest pending, and what
        was written or dropped before it is counted all the same. (Rows of a
        table whose id sequence fell behind, after a restore without
        ``setval``, are refused too: said in the process log, not hidden.)"""
        written = refused = 0
        try:
            for at, row in enumerate(rows):
                try:
                    async with engine.begin() as conn:
                        await conn.execute(technical_log.insert(), [row])
                except Exception as err:
                    if not is_refused_value(err):
                        self._put_back(rows[at:])
                        raise
                    refused += 1
                    self.dropped[DropReason.UNWRITABLE] += 1
                    continue
                except BaseException:
                    self._put_back(rows[at:])
                    raise
                written += 1
                self._count_stored(1)
        finally:
            if refused:
                # The error's kind only: its text may quote the entry's values.
                _log.error(
                    "technical log: entries the database refused were dropped",
                    dropped=refused,
                    written=written,
                    error=type(first).__name__,
                )
        return written

    def _count_stored(self, added: int) -> None:
        # None means "count again" (a purge ran meanwhile: recount); the next
        # flush's count then includes what was just written.
        if self._stored is not None:
            self._stored += added

    def _put_back(self, rows: list[dict[str, Any]]) -> None:
        """``rows`` back in front of what arrived meanwhile, as far as there is room."""
        room = max(0, (self._pending.maxlen or 0) - len(self._pending))
        keep = rows[max(0, len(rows) - room) :] if room else []
        self.dropped[DropReason.PENDING_FULL] += len(rows) - len(keep)
        self._pending.extendleft(reversed(keep))

    def _within_bound(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        room = max(0, self._max_rows - (self._stored or 0))
        if len(rows) <= room:
            if self._full and room > 0:
                self._full = False
                _log.info("technical log has room again", rows=self._stored)
            return rows
        self.dropped[DropReason.STORE_FULL] += len(rows) - room
        if not self._full:
            self._full = True
            _log.warning(
                "technical log full: new entries are dropped until the 24-hour purge "
                "makes room (logging.technical_log_max_rows; "
                "metric videoconsult_technical_log_dropped_total)",
                max_rows=self._max_rows,
            )
        return rows[:room]
