"""The admin's view of an endpoint's deliveries (the webhooks' outbox,
:mod:`audit.outbox`): which event, when, and how it went."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.outbox import DeliveryStatus, webhook_id_of
from audit.schema import webhook_deliveries, webhook_endpoints, webhook_events
from audit.webhooks import EventType


@dataclass(frozen=True)
class DeliveryEntry:
    """One delivery as the admin sees it: which event, when, how it went."""

    id: int
    webhook_id: str
    event_type: EventType
    subject_id: uuid.UUID
    event_at: datetime
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    finished_at: datetime | None


async def recent_deliveries(
    conn: AsyncConnection,
    endpoint_id: uuid.UUID,
    *,
    status: DeliveryStatus | None = None,
    limit: int = 100,
) -> list[DeliveryEntry]:
    """The endpoint's deliveries (of ``status``, if given), newest event first."""
    query = (
        sa.select(webhook_deliveries, webhook_events.c.type, webhook_events.c.subject_id)
        .add_columns(webhook_events.c.created_at.label("event_at"))
        .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        .where(webhook_deliveries.c.endpoint_id == endpoint_id)
        .order_by(webhook_events.c.created_at.desc(), webhook_deliveries.c.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(webhook_deliveries.c.status == status.value)
    rows = await conn.execute(query)
    return [
        DeliveryEntry(
            id=row.id,
            webhook_id=webhook_id_of(row.event_id),
            event_type=EventType(row.type),
            subject_id=row.subject_id,
            event_at=row.event_at,
            status=DeliveryStatus(row.status),
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            last_attempt_at=row.last_attempt_at,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            finished_at=row.finished_at,
        )
        for row in rows
    ]


async def delivery_counts(
    conn: AsyncConnection, organisation_id: uuid.UUID
) -> dict[uuid.UUID, dict[str, int]]:
    """Per endpoint of the organisation, how many deliveries are in each status."""
    rows = await conn.execute(
        sa.select(webhook_deliveries.c.endpoint_id, webhook_deliveries.c.status, sa.func.count())
        .join(webhook_endpoints, webhook_endpoints.c.id == webhook_deliveries.c.endpoint_id)
        .where(webhook_endpoints.c.organisation_id == organisation_id)
        .group_by(webhook_deliveries.c.endpoint_id, webhook_deliveries.c.status)
    )
    counts: dict[uuid.UUID, dict[str, int]] = {}
    for endpoint_id, status, count in rows:
        counts.setdefault(endpoint_id, {kind.value: 0 for kind in DeliveryStatus})[status] = count
    return counts
