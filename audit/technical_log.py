"""The technical log: connection diagnostics and failed logins, for 24 hours.

Entries may hold personal data (a client address, a browser), so no entry
older than :data:`RETENTION` is ever returned, whether or not the purge has
run yet, and :func:`purge_technical_log` deletes them. The audit issue adds
the structlog sink and the support view on top of these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

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
