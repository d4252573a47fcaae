"""The webhooks' transactional outbox: events written with the change they
tell of, and their deliveries, claimed by one node at a time.

An event is written by the function that makes the change (a consult's
start and end in :mod:`audit.consults`, a recording's end and destruction in
:mod:`audit.recordings`), in the caller's transaction: the event exists if
and only if the change committed. It is written only for an organisation
with an endpoint that takes its type, with one delivery per such endpoint,
due at once.

A node sends what is due in three steps: :func:`claim_due` (a short
transaction: PostgreSQL locks the rows ``FOR UPDATE SKIP LOCKED``, so that
two nodes never claim the same delivery, and moves each one's next attempt
past the time the send may take), the send (no transaction open), and
:func:`record_attempt`. A node that dies between the claim and the record
leaves the delivery due again when its claim runs out: delivery is at least
once, and the receiver tells a repeat by its ``webhook-id`` (the event's id,
the same on every attempt).

A failed attempt is tried again after ``retry_base_s``, doubling with each
failure (at most :data:`MAX_RETRY_WAIT_S` apart), until ``retry_for_s``
after the event; then the delivery is failed. Once no delivery of an event
is pending, its data (times, statuses) and its therapist are cleared: the admin's history of
deliveries keeps only what was sent when, and how it went, until
:func:`purge_history`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import SYSTEM, Actor, ClientType, access_record, append_access
from audit.clock import iso_utc
from audit.schema import (
    accounts,
    consults,
    recordings,
    webhook_deliveries,
    webhook_endpoints,
    webhook_events,
)
from audit.webhooks import EventType

# The longest wait between two attempts at one delivery.
MAX_RETRY_WAIT_S = 3600.0


class DeliveryStatus(enum.StrEnum):
    # Not delivered yet: due at next_attempt_at (or claimed by a node until then).
    PENDING = "pending"
    # The endpoint answered 2xx.
    DELIVERED = "delivered"
    # The retries ran out without a 2xx answer.
    FAILED = "failed"


def webhook_id_of(event_id: uuid.UUID) -> str:
    """A message's ``webhook-id``: its event's id, the same on every attempt."""
    return f"msg_{event_id.hex}"


# A moment as the messages give it: ISO 8601 in UTC, with ``Z``.
iso = iso_utc


async def enqueue(
    conn: AsyncConnection,
    *,
    organisation_id: uuid.UUID,
    event_type: EventType,
    subject_id: uuid.UUID,
    therapist_id: uuid.UUID | None,
    data: Mapping[str, Any],
    now: datetime,
) -> uuid.UUID | None:
    """Write the event for every endpoint of the organisation that takes it, in
    the caller's transaction; return its id, or None when no endpoint takes it."""
    rows = await conn.execute(
        sa.select(webhook_endpoints.c.id, webhook_endpoints.c.events).where(
            webhook_endpoints.c.organisation_id == organisation_id
        )
    )
    targets = [row.id for row in rows if event_type.value in row.events]
    return await _write_event(
        conn,
        targets,
        organisation_id=organisation_id,
        event_type=event_type,
        subject_id=subject_id,
        therapist_id=therapist_id,
        data=data,
        now=now,
    )


async def _write_event(
    conn: AsyncConnection,
    targets: list[uuid.UUID],
    *,
    organisation_id: uuid.UUID,
    event_type: EventType,
    subject_id: uuid.UUID,
    therapist_id: uuid.UUID | None,
    data: Mapping[str, Any],
    now: datetime,
) -> uuid.UUID | None:
    if not targets:
        return None
    event_id = uuid.uuid4()
    await conn.execute(
        webhook_events.insert().values(
            id=event_id,
            organisation_id=organisation_id,
            type=event_type.value,
            subject_id=subject_id,
            therapist_id=therapist_id,
            data=dict(data),
            created_at=now,
        )
    )
    await conn.execute(
        webhook_deliveries.insert(),
        [
            {
                "event_id": event_id,
                "endpoint_id": endpoint_id,
                "status": DeliveryStatus.PENDING.value,
                "attempts": 0,
                "next_attempt_at": now,
            }
            for endpoint_id in targets
        ],
    )
    return event_id


async def consult_event(
    conn: AsyncConnection,
    consult_id: uuid.UUID,
    event_type: EventType,
    *,
    now: datetime,
    end_reason: str | None = None,
) -> uuid.UUID | None:
    """Write ``consult.started`` or ``consult.ended`` for the consult as it now
    stands (nothing for a consult whose therapist was erased: it has no
    organisation any more)."""
    # The consult, its organisation and that organisation's endpoints in one
    # query (a row per endpoint): it runs in every admission's transaction.
    rows = (
        await conn.execute(
            sa.select(
                consults,
                accounts.c.organisation_id,
                webhook_endpoints.c.id.label("endpoint_id"),
                webhook_endpoints.c.events,
            )
            .join(accounts, accounts.c.id == consults.c.therapist_id)
            .outerjoin(
                webhook_endpoints,
                webhook_endpoints.c.organisation_id == accounts.c.organisation_id,
            )
            .where(consults.c.id == consult_id)
        )
    ).all()
    targets = [
        row.endpoint_id
        for row in rows
        if row.endpoint_id is not None and event_type.value in row.events
    ]
    if not targets:
        return None
    row = rows[0]
    data = {
        "consult_id": str(consult_id),
        "scheduled_at": iso(row.scheduled_at),
        "started_at": iso(row.started_at),
        "ended_at": iso(row.ended_at),
        "duration_s": row.duration_s,
        "status": row.status,
    }
    if event_type is EventType.CONSULT_ENDED:
        data["end_reason"] = end_reason
    return await _write_event(
        conn,
        targets,
        organisation_id=row.organisation_id,
        event_type=event_type,
        subject_id=consult_id,
        therapist_id=row.therapist_id,
        data=data,
        now=now,
    )


async def recording_events(
    conn: AsyncConnection,
    recording_ids: list[uuid.UUID],
    event_type: EventType,
    *,
    now: datetime,
) -> None:
    """Write ``recording.available`` or ``recording.deleted`` for each recording
    (still in the table: before it is deleted)."""
    if not recording_ids:
        return
    rows = await conn.execute(
        sa.select(
            recordings.c.id,
            recordings.c.consult_id,
            recordings.c.created_at,
            recordings.c.ended_at,
            recordings.c.status,
            recordings.c.stop_reason,
            consults.c.therapist_id,
            accounts.c.organisation_id,
        )
        .join(consults, consults.c.id == recordings.c.consult_id)
        .join(accounts, accounts.c.id == consults.c.therapist_id)
        .where(recordings.c.id.in_(recording_ids))
    )
    for row in rows.all():
        data: dict[str, Any] = {"recording_id": str(row.id), "consult_id": str(row.consult_id)}
        if event_type is EventType.RECORDING_DELETED:
            data["deleted_at"] = iso(now)
        else:
            data.update(
                started_at=iso(row.created_at),
                ended_at=iso(row.ended_at),
                status=row.status,
                stop_reason=row.stop_reason,
            )
        await enqueue(
            conn,
            organisation_id=row.organisation_id,
            event_type=event_type,
            subject_id=row.id,
            therapist_id=row.therapist_id,
            data=data,
            now=now,
        )


@dataclass(frozen=True)
class DueDelivery:
    """A delivery this node claimed: what to send, and where (the endpoint's id)."""

    id: int
    # This attempt's number, from 1.
    attempt: int
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    event_type: EventType
    # The consult or recording the event is about.
    subject_id: uuid.UUID
    therapist_id: uuid.UUID | None
    data: Mapping[str, Any]
    event_created_at: datetime

    @property
    def webhook_id(self) -> str:
        """The message's ``webhook-id``: the event's, the same on every attempt."""
        return webhook_id_of(self.event_id)

    def message(self, filled_in: Mapping[str, Any]) -> dict[str, Any]:
        """The message's body (Standard Webhooks' ``type``, ``timestamp``, ``data``):
        the stored data and what the sender fills in as it sends (the
        therapist, the appointment reference), which is never stored here."""
        return {
            "type": self.event_type.value,
            "timestamp": iso(self.event_created_at),
            "data": {**self.data, **filled_in},
        }


async def claim_due(
    conn: AsyncConnection,
    *,
    now: datetime,
    lease_s: float,
    limit: int,
    per_endpoint: int | None = None,
    in_flight: Mapping[uuid.UUID, int] | None = None,
) -> list[DueDelivery]:
    """Claim up to ``limit`` due deliveries for this node for ``lease_s``,
    the longest due first.

    With ``per_endpoint``, no endpoint gets more than that many on their way
    at once, counting the node's ``in_flight`` sends (by endpoint id): a
    backlog for one endpoint leaves the others their turn. Commit at once:
    the claim is what keeps other nodes from sending them.
    """
    is_due = sa.and_(
        webhook_deliveries.c.status == DeliveryStatus.PENDING.value,
        webhook_deliveries.c.next_attempt_at <= now,
    )
    longest_due_first = (webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.id)
    due = sa.select(webhook_deliveries.c.id).where(is_due).order_by(*longest_due_first)
    if per_endpoint is None:
        due = due.limit(limit)
    else:
        room = {endpoint: per_endpoint - sending for endpoint, sending in (in_flight or {}).items()}
        due = due.where(
            webhook_deliveries.c.id.in_(_within_room(is_due, per_endpoint, room, limit))
        )
    # SQLite has no row locks (and needs none: one writer at a time). On
    # PostgreSQL, what another node is claiming at this moment is skipped: a
    # claim may then find less than there is, and the next finds the rest.
    ids = list(await conn.scalars(due.with_for_update(skip_locked=True)))
    if not ids:
        return []
    await conn.execute(
        webhook_deliveries.update()
        .where(webhook_deliveries.c.id.in_(ids))
        .values(
            attempts=webhook_deliveries.c.attempts + 1,
            next_attempt_at=now + timedelta(seconds=lease_s),
            last_attempt_at=now,
        )
    )
    rows = await conn.execute(
        sa.select(
            webhook_deliveries.c.id,
            webhook_deliveries.c.attempts,
            webhook_deliveries.c.endpoint_id,
            webhook_events.c.id.label("event_id"),
            webhook_events.c.type,
            webhook_events.c.subject_id,
            webhook_events.c.therapist_id,
            webhook_events.c.data,
            webhook_events.c.created_at,
        )
        .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        .where(webhook_deliveries.c.id.in_(ids))
        .order_by(webhook_deliveries.c.id)
    )
    return [
        DueDelivery(
            id=row.id,
            attempt=row.attempts,
            endpoint_id=row.endpoint_id,
            event_id=row.event_id,
            event_type=EventType(row.type),
            subject_id=row.subject_id,
            therapist_id=row.therapist_id,
            data=row.data,
            event_created_at=row.created_at,
        )
        for row in rows
    ]


def _within_room(
    is_due: sa.ColumnElement[bool], per_endpoint: int, room: Mapping[uuid.UUID, int], limit: int
) -> sa.Select[tuple[uuid.UUID]]:
    """The ids of the ``limit`` longest-due deliveries that fit each
    endpoint's ``room`` (``per_endpoint`` where it names none).

    The window function ranks each endpoint's due deliveries in a subquery
    of its own: PostgreSQL locks rows only where no window function is."""
    columns = webhook_deliveries.c
    ranked = (
        sa.select(
            columns.id,
            columns.next_attempt_at,
            sa.func.row_number()
            .over(partition_by=columns.endpoint_id, order_by=(columns.next_attempt_at, columns.id))
            .label("rank"),
            columns.endpoint_id,
        )
        .where(is_due)
        .subquery()
    )
    allowed: sa.ColumnElement[int] | int = per_endpoint
    if room:
        allowed = sa.case(
            {endpoint: max(0, left) for endpoint, left in room.items()},
            value=ranked.c.endpoint_id,
            else_=per_endpoint,
        )
    return (
        sa.select(ranked.c.id)
        .where(ranked.c.rank <= allowed)
        .order_by(ranked.c.next_attempt_at, ranked.c.id)
        .limit(limit)
    )


def next_attempt(
    delivery: DueDelivery, *, now: datetime, retry_base_s: float, retry_for_s: float
) -> datetime | None:
    """When to try a delivery again after its failed attempt; None: give up."""
    deadline = delivery.event_created_at + timedelta(seconds=retry_for_s)
    if now >= deadline:
        return None
    # The exponent is capped too: a delivery failing for a day must not overflow.
    wait_s = min(MAX_RETRY_WAIT_S, retry_base_s * 2.0 ** min(delivery.attempt - 1, 32))
    return min(now + timedelta(seconds=wait_s), deadline)


async def record_attempt(
    conn: AsyncConnection,
    delivery: DueDelivery,
    *,
    status_code: int | None,
    error: str | None,
    now: datetime,
    retry_base_s: float,
    retry_for_s: float,
) -> DeliveryStatus | None:
    """Record how the attempt went (a 2xx ``status_code`` is success); return
    the delivery's status now, or None when nothing was recorded: a failure
    is recorded only if no other node took the delivery over meanwhile (its
    claim ran out), a success only if it is not finished already."""
    delivered = status_code is not None and 200 <= status_code < 300
    values: dict[str, Any] = {"last_status_code": status_code, "last_error": error}
    where = [
        webhook_deliveries.c.id == delivery.id,
        webhook_deliveries.c.status == DeliveryStatus.PENDING.value,
    ]
    if delivered:
        status = DeliveryStatus.DELIVERED
    else:
        where.append(webhook_deliveries.c.attempts == delivery.attempt)
        again = next_attempt(delivery, now=now, retry_base_s=retry_base_s, retry_for_s=retry_for_s)
        status = DeliveryStatus.PENDING if again is not None else DeliveryStatus.FAILED
        values["next_attempt_at"] = again
    if status is not DeliveryStatus.PENDING:
        values.update(status=status.value, finished_at=now, next_attempt_at=None)
    updated = await conn.execute(webhook_deliveries.update().where(*where).values(**values))
    if not updated.rowcount:
        return None
    if status is not DeliveryStatus.PENDING:
        await _clear_finished_event(conn, delivery.event_id)
    return status


# The access record of a message an endpoint took (a 2xx answer): it told the
# practice's record system the consult's times and the therapist's pseudonym
# or external id (and the appointment reference), a disclosure of personal
# data, which the access log holds as every read of it (DESIGN, promise 6).
DELIVERED_ACTION = "webhook.delivered"
# What a message is about, as the access log and the patient's receipt name it.
_OBJECT_TYPES = {
    EventType.CONSULT_STARTED: "consult",
    EventType.CONSULT_ENDED: "consult",
    EventType.RECORDING_AVAILABLE: "recording",
    EventType.RECORDING_DELETED: "recording",
}


async def record_disclosure(
    conn: AsyncConnection,
    delivery: DueDelivery,
    *,
    endpoint_id: uuid.UUID,
    organisation_id: uuid.UUID,
    now: datetime,
) -> None:
    """Append the access record of ``delivery``'s message, taken by the
    endpoint, in the caller's transaction (the one that records the
    attempt): the system sent it (role ``system``, client ``webhook``), and
    the actor's id is the endpoint's, never its URL; the object is the
    consult or recording the message is about, so that the patient's
    receipt lists it. One per 2xx answer: a message sent twice (at least
    once: a node's claim ran out) and taken twice is two disclosures."""
    await append_access(
        conn,
        access_record(
            Actor(endpoint_id, SYSTEM, ClientType.WEBHOOK),
            organisation_id=organisation_id,
            action=DELIVERED_ACTION,
            object_type=_OBJECT_TYPES[delivery.event_type],
            object_id=delivery.subject_id,
            now=now,
        ),
    )


async def _clear_finished_event(conn: AsyncConnection, event_id: uuid.UUID) -> None:
    pending = (
        sa.select(webhook_deliveries.c.id)
        .where(
            webhook_deliveries.c.event_id == event_id,
            webhook_deliveries.c.status == DeliveryStatus.PENDING.value,
        )
        .exists()
    )
    await conn.execute(
        webhook_events.update()
        .where(webhook_events.c.id == event_id, ~pending)
        .values(data={}, therapist_id=None)
    )


async def purge_history(conn: AsyncConnection, *, before: datetime) -> int:
    """Delete deliveries finished before ``before``, and the events left with
    none; return how many deliveries."""
    result = await conn.execute(
        webhook_deliveries.delete().where(
            webhook_deliveries.c.status != DeliveryStatus.PENDING.value,
            webhook_deliveries.c.finished_at < before,
        )
    )
    orphaned = ~(
        sa.select(webhook_deliveries.c.id)
        .where(webhook_deliveries.c.event_id == webhook_events.c.id)
        .exists()
    )
    await conn.execute(webhook_events.delete().where(orphaned))
    return int(result.rowcount or 0)


async def forget_subjects(
    conn: AsyncConnection, subject_ids: list[uuid.UUID], types: tuple[EventType, ...]
) -> int:
    """Delete the events of ``types`` about these consults or recordings, with
    their deliveries (pending ones too): for the retention purge, so that the
    webhooks' history names nothing whose record is destroyed. Returns how many."""
    if not subject_ids:
        return 0
    result = await conn.execute(
        webhook_events.delete().where(
            webhook_events.c.subject_id.in_(subject_ids),
            webhook_events.c.type.in_([kind.value for kind in types]),
        )
    )
    return int(result.rowcount or 0)
