"""Data subjects' rights of professionals: everything held about them, and erasure.

Patients have no identity in the system beyond a consult's lifetime (the
waiting-room name lives in memory only, the invite token only as a hash), so
these functions are about professional accounts.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.accounts import Account, ensure_another_active_admin
from audit.db import in_turns
from audit.schema import (
    access_log,
    account_notices,
    accounts,
    consults,
    enrolment_links,
    login_failures,
    organisations,
    recordings,
    sessions,
    technical_log,
    webhook_deliveries,
    webhook_events,
)
from audit.technical_log import RETENTION


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


async def _items(
    conn: AsyncConnection, query: sa.Select[Any], item: Callable[[sa.Row[Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``query``'s rows as JSON-ready items, made a few hundred at a time:
    five years of a therapist's access records (20,000 and more) at once
    held the event loop for a quarter of a second and more."""
    items: list[dict[str, Any]] = []
    async for part in in_turns(await conn.execute(query)):
        items.extend(map(item, part))
    return items


def _consult_item(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "status": row.status,
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "ended_at": _iso(row.ended_at),
        "duration_s": row.duration_s,
    }


def _access_item(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at": _iso(row.at),
        "actor_id": str(row.actor_id) if row.actor_id else None,
        "actor_role": row.actor_role,
        "action": row.action,
        "object_type": row.object_type,
        "object_id": row.object_id,
        "outcome": row.outcome,
        "client_type": row.client_type,
    }


async def export_account(
    conn: AsyncConnection, account: Account, *, login_subject_hash: str, now: datetime
) -> dict[str, Any]:
    """Everything held about ``account``, as JSON-ready data.

    ``login_subject_hash`` is the keyed hash its failed logins are counted
    under (as :func:`erase_account` takes it). Credentials are named, not
    handed out: the password hash and the sealed TOTP secret are said to
    exist, not copied.
    """
    organisation = await conn.scalar(
        sa.select(organisations.c.name).where(organisations.c.id == account.organisation_id)
    )
    own_sessions = await conn.execute(
        sa.select(sessions.c.created_at, sessions.c.last_seen_at)
        .where(sessions.c.account_id == account.id)
        .order_by(sessions.c.created_at)
    )
    own_notices = await conn.execute(
        sa.select(account_notices)
        .where(account_notices.c.account_id == account.id)
        .order_by(account_notices.c.id)
    )
    own_consults = await _items(
        conn,
        sa.select(consults)
        .where(consults.c.therapist_id == account.id)
        .order_by(consults.c.created_at),
        _consult_item,
    )
    own_recordings = await conn.execute(
        sa.select(recordings)
        .join(consults, consults.c.id == recordings.c.consult_id)
        .where(consults.c.therapist_id == account.id)
        .order_by(recordings.c.created_at)
    )
    records = await _items(
        conn,
        sa.select(access_log)
        .where(
            sa.or_(
                access_log.c.actor_id == account.id,
                access_log.c.object_id == str(account.id),
            )
        )
        .order_by(access_log.c.seq),
        _access_item,
    )
    diagnostics = await conn.execute(
        sa.select(technical_log)
        .where(technical_log.c.subject == str(account.id), technical_log.c.at > now - RETENTION)
        .order_by(technical_log.c.id)
    )
    failures = await conn.scalars(
        sa.select(login_failures.c.failed_at)
        .where(login_failures.c.subject_hash == login_subject_hash)
        .order_by(login_failures.c.id)
    )
    return {
        "exported_at": now.isoformat(),
        "account": {
            "id": str(account.id),
            "email": account.email,
            "role": account.role.value,
            "status": account.status.value,
            "organisation": {"id": str(account.organisation_id), "name": organisation},
            "created_at": _iso(account.created_at),
            "enrolled_at": _iso(account.enrolled_at),
            "disabled_at": _iso(account.disabled_at),
            "external_id": account.external_id,
            "credentials": {
                "password_hash_stored": account.password_hash is not None,
                "totp_secret_stored_encrypted": account.totp_secret_sealed is not None,
            },
        },
        "sessions": [
            {"created_at": _iso(row.created_at), "last_seen_at": _iso(row.last_seen_at)}
            for row in own_sessions
        ],
        # Notices waiting for the account holder (a reset of their credentials).
        "notices": [
            {"kind": row.kind, "at": _iso(row.created_at), "by_role": row.by_role}
            for row in own_notices
        ],
        "consults": own_consults,
        # What is known of each recording of one's consults; the media itself
        # is downloaded separately (GET /api/recordings/{id}/download).
        "recordings": [
            {
                "id": str(row.id),
                "consult_id": str(row.consult_id),
                "status": row.status,
                "created_at": _iso(row.created_at),
                "ended_at": _iso(row.ended_at),
                "requested_at": _iso(row.requested_at),
                "consented_at": _iso(row.consented_at),
                "consent_by": row.consent_by,
                "stop_reason": row.stop_reason,
                "plaintext_bytes": row.plaintext_bytes,
            }
            for row in own_recordings
        ],
        "access_log": records,
        "technical_log_last_24_hours": [
            {"at": _iso(row.at), "kind": row.kind, "detail": row.detail} for row in diagnostics
        ],
        # The lockout's count of failed logins at the account's address (kept
        # until they can lock no more). The address and the client's address
        # are held only as keyed hashes, of no use to read, so not copied out.
        "login_failures": [{"failed_at": _iso(failed_at)} for failed_at in failures],
        "webhook_events": await _webhook_events(conn, account),
    }


async def _webhook_events(conn: AsyncConnection, account: Account) -> list[dict[str, Any]]:
    """The outbox's events linked to ``account``: messages to the practice's
    systems that will name its therapist (by external id or pseudonym, filled
    in as they are sent). The link is cleared once none of an event's
    deliveries is pending, so these are the ones still to go (or whose
    endpoint was deleted, until the history's purge)."""
    events = (
        await conn.execute(
            sa.select(webhook_events)
            .where(webhook_events.c.therapist_id == account.id)
            .order_by(webhook_events.c.created_at, webhook_events.c.id)
        )
    ).all()
    if not events:
        return []
    deliveries = await conn.execute(
        sa.select(webhook_deliveries)
        .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        .where(webhook_events.c.therapist_id == account.id)
        .order_by(webhook_deliveries.c.id)
    )
    # Where and how it goes; the endpoint's URL and secret are the practice's.
    by_event: dict[uuid.UUID, list[dict[str, Any]]] = {event.id: [] for event in events}
    for row in deliveries:
        by_event.setdefault(row.event_id, []).append(
            {
                "endpoint_id": str(row.endpoint_id),
                "status": row.status,
                "attempts": row.attempts,
                "last_attempt_at": _iso(row.last_attempt_at),
                "next_attempt_at": _iso(row.next_attempt_at),
            }
        )
    return [
        {
            "id": str(event.id),
            "type": event.type,
            # The consult or recording the message is about.
            "about": str(event.subject_id),
            "created_at": _iso(event.created_at),
            "data": event.data,
            "deliveries": by_event[event.id],
        }
        for event in events
    ]


@dataclass(frozen=True)
class Erasure:
    account_id: uuid.UUID
    consults_unlinked: int
    sessions: int
    enrolment_links: int
    login_failures: int
    technical_entries: int


async def erase_account(
    conn: AsyncConnection, account: Account, *, login_subject_hash: str
) -> Erasure:
    """Remove the account and everything personal about it; keep its consult
    records, unlinked from it (pseudonymous), until their retention ends.

    The access log keeps its records (it is append-only and hash-chained);
    they name the account only by its id, which after this resolves to no one.
    Refuses (Conflict) to erase an organisation's last active admin.
    """
    await ensure_another_active_admin(conn, account)
    unlinked = await conn.execute(
        consults.update().where(consults.c.therapist_id == account.id).values(therapist_id=None)
    )
    ended = await conn.execute(sessions.delete().where(sessions.c.account_id == account.id))
    links = await conn.execute(
        enrolment_links.delete().where(enrolment_links.c.account_id == account.id)
    )
    await conn.execute(account_notices.delete().where(account_notices.c.account_id == account.id))
    failures = await conn.execute(
        login_failures.delete().where(login_failures.c.subject_hash == login_subject_hash)
    )
    entries = await conn.execute(
        technical_log.delete().where(technical_log.c.subject == str(account.id))
    )
    await conn.execute(accounts.delete().where(accounts.c.id == account.id))
    return Erasure(
        account_id=account.id,
        consults_unlinked=unlinked.rowcount,
        sessions=ended.rowcount,
        enrolment_links=links.rowcount,
        login_failures=failures.rowcount,
        technical_entries=entries.rowcount,
    )
