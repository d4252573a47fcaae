"""Consult records and their invites, at rest.

A consult record holds who ran it, created, scheduled, started, ended,
duration and status, and nothing else. Its start is set once (when the therapist first
admits the patient) and never moves; its end once. Invites keep only a hash
of their token and go when the consult ends.
"""

from __future__ import annotations

import enum
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.db import after_cursor
from audit.direct import ByKey, OnConnection, Prepared, SingleStatements, Statements
from audit.errors import Conflict, NotFound
from audit.labels import SealedLabel, destroy_label, sealed_label_of, with_sealed_label
from audit.outbox import consult_event
from audit.references import destroy_spent_references
from audit.schema import accounts, consult_labels, consults, invites, webhook_endpoints
from audit.sealing import token_hash
from audit.webhooks import EventType


class ConsultStatus(enum.Enum):
    # Made by the therapist; the patient has not been admitted yet.
    CREATED = "created"
    # The therapist admitted the patient: the consult has started.
    ACTIVE = "active"
    # Started and then ended.
    ENDED = "ended"
    # Closed without ever starting (ended before admission, or abandoned).
    NOT_STARTED = "not_started"


# The statuses of a consult that is over, as stored.
OVER_STATUSES = (ConsultStatus.ENDED.value, ConsultStatus.NOT_STARTED.value)


class InviteProblem(enum.Enum):
    # What is wrong with an invite token; told to the patient in plain words.
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"
    CONSULT_OVER = "consult_over"


class LinkState(enum.Enum):
    # Whether a consult's invite link works, for its therapist's list.
    # It opens the consult now (see audit.invite_use.open_invite).
    LIVE = "live"
    # Revoked, and no new link made since.
    REVOKED = "revoked"
    # Ran out before the patient was admitted.
    EXPIRED = "expired"
    # None at all: the consult is over, or the housekeeping cleared its
    # revoked or expired link away.
    NONE = "none"


class InviteInvalid(NotFound):
    """The invite cannot be used; ``problem`` says why (about this token only)."""

    def __init__(self, problem: InviteProblem) -> None:
        super().__init__(f"this invite link cannot be used ({problem.value})")
        self.problem = problem


@dataclass(frozen=True)
class Consult:
    id: uuid.UUID
    therapist_id: uuid.UUID | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_s: int | None
    status: ConsultStatus
    # The appointment, if the therapist gave one.
    scheduled_at: datetime | None = None

    @property
    def is_over(self) -> bool:
        return self.status in (ConsultStatus.ENDED, ConsultStatus.NOT_STARTED)


@dataclass(frozen=True)
class Invite:
    token_hash: str
    consult_id: uuid.UUID
    expires_at: datetime
    # A parent or guardian consents too (the patient is under 16).
    guardian_consent: bool = False
    # Its consult's appointment and start, as the invite was opened: the
    # waiting room may open later (the patient's page says when).
    scheduled_at: datetime | None = None
    consult_started: bool = False


def consult_of(row: sa.Row[tuple[object, ...]] | Mapping[str, object]) -> Consult:
    """The consult of a row (or its mapping by column name) with the consult's columns."""
    m: Mapping[Any, Any] = row._mapping if isinstance(row, sa.Row) else row
    return Consult(
        id=m["id"],
        therapist_id=m["therapist_id"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        ended_at=m["ended_at"],
        duration_s=m["duration_s"],
        status=ConsultStatus(m["status"]),
        scheduled_at=m["scheduled_at"],
    )


async def create_consult(
    conn: AsyncConnection,
    *,
    therapist_id: uuid.UUID,
    now: datetime,
    scheduled_at: datetime | None = None,
) -> Consult:
    consult_id = uuid.uuid4()
    await conn.execute(
        consults.insert().values(
            id=consult_id,
            therapist_id=therapist_id,
            created_at=now,
            status=ConsultStatus.CREATED.value,
            scheduled_at=scheduled_at,
        )
    )
    return await get_consult(conn, consult_id)


async def get_consult(
    conn: AsyncConnection, consult_id: uuid.UUID, *, therapist_id: uuid.UUID | None = None
) -> Consult:
    """Return the consult; with ``therapist_id``, only if it is that therapist's."""
    query = sa.select(consults).where(consults.c.id == consult_id)
    if therapist_id is not None:
        query = query.where(consults.c.therapist_id == therapist_id)
    row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound("no such consult")
    return consult_of(row)


# Read as every patient joins (issue 19's storm): compiled once, as the
# invite's statements below are (audit.direct).
def _consult_and_label(where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    return (
        with_sealed_label(sa.select(consults), consults.c.id)
        # The therapist's organisation: its access log records the label's showing.
        .outerjoin(accounts, accounts.c.id == consults.c.therapist_id)
        .add_columns(accounts.c.organisation_id.label("therapist_organisation_id"))
        .where(where)
    )


_CONSULT_AND_LABEL = Prepared(
    _consult_and_label(consults.c.id == sa.bindparam("consult_id")),
    # Many patients joining at once: their consults in one statement.
    batch=ByKey(
        _consult_and_label(
            consults.c.id == sa.any_(sa.bindparam("consult_ids", type_=ARRAY(sa.Uuid())))
        ),
        key_param="consult_id",
        keys_param="consult_ids",
        key_column="id",
    ),
)


async def get_consult_and_label(
    db: Statements, consult_id: uuid.UUID
) -> tuple[Consult, SealedLabel | None]:
    """The consult and its therapist's label as stored (None without one), in
    one query; the label knows its therapist and their organisation."""
    row = await db.first(_CONSULT_AND_LABEL, {"consult_id": consult_id})
    if row is None:
        raise NotFound("no such consult")
    return consult_of(row), sealed_label_of(row)


# When a consult happens, as far as its therapist's list is concerned: its
# appointment, else when it was made.
CONSULT_TIME: Final = sa.func.coalesce(consults.c.scheduled_at, consults.c.created_at)


async def list_consults(
    conn: AsyncConnection,
    therapist_id: uuid.UUID,
    *,
    limit: int,
    older_than: uuid.UUID | None = None,
) -> list[Consult]:
    """The therapist's own consults by :data:`CONSULT_TIME`, latest first (ties
    by id): at most ``limit``, and with ``older_than`` (one of them) those
    that follow it in that order. NotFound when ``older_than`` is not one of
    the therapist's consults."""
    mine = consults.c.therapist_id == therapist_id
    when = CONSULT_TIME
    query = sa.select(consults).where(mine)
    if older_than is not None:
        cursor = (
            await conn.execute(sa.select(when).where(consults.c.id == older_than, mine))
        ).scalar()
        if cursor is None:
            raise NotFound("no such consult")
        query = query.where(after_cursor(when, consults.c.id, cursor, older_than))
    rows = await conn.execute(query.order_by(when.desc(), consults.c.id).limit(limit))
    return [consult_of(row) for row in rows]


# Starts a consult whose organisation has no webhook endpoint (most): then
# nothing goes to the outbox, and the start is this one statement. An endpoint
# made meanwhile is as one made just after the start, as in a transaction.
def _start_without_endpoints_where(
    consult_id: sa.ColumnElement[Any], started_at: sa.ColumnElement[Any]
) -> sa.Update:
    return (
        consults.update()
        .where(
            consults.c.id == consult_id,
            consults.c.started_at.is_(None),
            consults.c.status == ConsultStatus.CREATED.value,
            ~sa.select(webhook_endpoints.c.id)
            .join(accounts, accounts.c.organisation_id == webhook_endpoints.c.organisation_id)
            .where(accounts.c.id == consults.c.therapist_id)
            .exists(),
        )
        .values(started_at=started_at, status=ConsultStatus.ACTIVE.value)
        .returning(*consults.c)
    )


# Many admissions at once: their starts in one statement, each consult with
# its own time (unnest of the two arrays, side by side).
_STARTS = (
    sa.func.unnest(
        sa.bindparam("consult_ids", type_=ARRAY(sa.Uuid())),
        sa.bindparam("started_ats", type_=ARRAY(sa.DateTime(timezone=True))),
    )
    .table_valued("id", "at", name="starts")
    .render_derived()
)
_START_WITHOUT_ENDPOINTS = Prepared(
    _start_without_endpoints_where(
        sa.bindparam("consult_id"),
        sa.bindparam("started_at_now", type_=consults.c.started_at.type),
    ),
    batch=ByKey(
        _start_without_endpoints_where(_STARTS.c.id, _STARTS.c.at),
        key_param="consult_id",
        keys_param="consult_ids",
        key_column="id",
        per_key={"started_ats": "started_at_now"},
    ),
)


async def start_consult(
    single: SingleStatements, consult_id: uuid.UUID, *, now: datetime
) -> Consult:
    """:func:`mark_started` in a transaction of its own: for a consult whose
    organisation has no webhook endpoint, one statement on the way in's own
    path (:class:`SingleStatements`: asyncpg on PostgreSQL with no BEGIN or
    COMMIT, SQLite's thread; each admission of issue 19's storm)."""
    engine = single.engine
    on_its_own = single.direct or single.threaded
    if on_its_own:
        async with single.autocommit() as db:
            started = await _start_without_endpoints(db, consult_id, now)
        if started is not None:
            return started
    async with engine.begin() as conn:
        # The statement above found it started, over, or with endpoints.
        return await _mark_started(conn, consult_id, now=now, plain_first=not on_its_own)


async def mark_started(conn: AsyncConnection, consult_id: uuid.UUID, *, now: datetime) -> Consult:
    """Set the start once; a later admission (after a reconnect) keeps the first.

    The first also writes ``consult.started`` to the webhooks' outbox, in the
    caller's transaction.
    """
    return await _mark_started(conn, consult_id, now=now, plain_first=True)


async def _start_without_endpoints(
    db: Statements, consult_id: uuid.UUID, now: datetime
) -> Consult | None:
    row = await db.first(
        _START_WITHOUT_ENDPOINTS, {"consult_id": consult_id, "started_at_now": now}
    )
    return None if row is None else consult_of(row)


async def _mark_started(
    conn: AsyncConnection, consult_id: uuid.UUID, *, now: datetime, plain_first: bool
) -> Consult:
    if plain_first:
        started = await _start_without_endpoints(OnConnection(conn), consult_id, now)
        if started is not None:
            return started
    # Started earlier or over, or its organisation has endpoints.
    row = (
        await conn.execute(
            consults.update()
            .where(
                consults.c.id == consult_id,
                consults.c.started_at.is_(None),
                consults.c.status == ConsultStatus.CREATED.value,
            )
            .values(started_at=now, status=ConsultStatus.ACTIVE.value)
            .returning(*consults.c)
        )
    ).first()
    if row is None:  # started earlier, or over: read as it is
        return await get_consult(conn, consult_id)
    await consult_event(conn, consult_id, EventType.CONSULT_STARTED, now=now)
    return consult_of(row)


async def mark_ended(
    conn: AsyncConnection, consult_id: uuid.UUID, *, now: datetime, end_reason: str | None = None
) -> Consult:
    """Close the consult once: ended with its duration, or never started.

    A started consult never ends before its start: an end time from before
    it (where a killed server's consults end is when it was last alive, up
    to 2 s before a consult it admitted just then) is its start.

    Its invites and the therapist's label (key and ciphertext) are deleted
    with it, in the caller's transaction: whether a guardian had to consent,
    when the link was first used and who the patient is are kept no longer
    than the consult runs, and its link is then unknown. Ending an ended
    consult changes nothing but to delete an invite (or label) made meanwhile.
    The first end writes ``consult.ended`` (with ``end_reason``, the signaling
    protocol's) to the webhooks' outbox, in the caller's transaction; the
    practice's appointment reference is destroyed then, or once the last
    message about the consult is delivered (:mod:`audit.references`).
    """
    await conn.execute(invites.delete().where(invites.c.consult_id == consult_id))
    await destroy_label(conn, consult_id)
    consult = await get_consult(conn, consult_id)
    if consult.is_over:
        return consult
    if consult.started_at is None:
        values: dict[str, object] = {
            "ended_at": now,
            "status": ConsultStatus.NOT_STARTED.value,
        }
    else:
        ended_at = max(now, consult.started_at)
        duration = round((ended_at - consult.started_at).total_seconds())
        values = {
            "ended_at": ended_at,
            "duration_s": duration,
            "status": ConsultStatus.ENDED.value,
        }
    ended = await conn.execute(
        consults.update()
        .where(consults.c.id == consult_id, consults.c.ended_at.is_(None))
        .values(**values)
    )
    if ended.rowcount:
        await consult_event(
            conn, consult_id, EventType.CONSULT_ENDED, now=now, end_reason=end_reason
        )
    # The appointment reference goes now, unless a message still to be sent needs it.
    await destroy_spent_references(conn, [consult_id])
    return await get_consult(conn, consult_id)


async def issue_invite(
    conn: AsyncConnection,
    consult: Consult,
    *,
    now: datetime,
    expires_at: datetime,
    guardian_consent: bool = False,
) -> tuple[str, Invite]:
    """Make a new invite for the consult; earlier ones stop working.

    Returns the token (shown once, never stored) and the invite.
    """
    if consult.is_over:
        raise Conflict("the consult is over; it needs no invite")
    await conn.execute(
        invites.update()
        .where(invites.c.consult_id == consult.id, invites.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    # 256 bits, URL-safe; only the hash is kept.
    token = secrets.token_urlsafe(32)
    invite = Invite(token_hash(token), consult.id, expires_at, guardian_consent)
    await conn.execute(
        invites.insert().values(
            token_hash=invite.token_hash,
            consult_id=consult.id,
            created_at=now,
            expires_at=expires_at,
            guardian_consent=guardian_consent,
        )
    )
    return token, invite


async def revoke_invites(conn: AsyncConnection, consult_id: uuid.UUID, *, now: datetime) -> int:
    result = await conn.execute(
        invites.update()
        .where(invites.c.consult_id == consult_id, invites.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return result.rowcount


async def latest_invite_guardian_consent(conn: AsyncConnection, consult_id: uuid.UUID) -> bool:
    """Whether the consult's most recent invite (live or not) asked for a guardian's consent."""
    found = await conn.scalar(
        sa.select(invites.c.guardian_consent)
        .where(invites.c.consult_id == consult_id)
        .order_by(invites.c.created_at.desc())
        .limit(1)
    )
    return bool(found)


def invite_expiry(*, now: datetime, scheduled_at: datetime | None, validity_s: int) -> datetime:
    """An invite is good until ``validity_s`` after creation or after the scheduled time."""
    base = max(now, scheduled_at) if scheduled_at is not None else now
    return base + timedelta(seconds=validity_s)


async def purge_expired_invites(conn: AsyncConnection, *, now: datetime) -> int:
    """Delete invites that expired or were revoked, or whose consult is over
    (one reissued while the consult was being ended); the consult keeps its
    record.

    An expired invite of a running consult stays until the consult ends: its
    admitted patient may still come back with it (see :func:`audit.invite_use.open_invite`).
    So does the latest invite of a consult not over, dead or alive: it says
    whether the patient is under 16 (:func:`latest_invite_guardian_consent`),
    for the recording's consent and for a link reissued later.
    """
    running = sa.select(consults.c.id).where(consults.c.status == ConsultStatus.ACTIVE.value)
    consult_over = (
        sa.select(consults.c.id)
        .where(
            consults.c.id == invites.c.consult_id,
            consults.c.status.in_(OVER_STATUSES),
        )
        .exists()
    )
    newer = invites.alias("newer")
    superseded = (
        sa.select(newer.c.token_hash)
        .where(
            newer.c.consult_id == invites.c.consult_id, newer.c.created_at > invites.c.created_at
        )
        .exists()
    )
    dead = sa.or_(
        sa.and_(invites.c.expires_at <= now, invites.c.consult_id.not_in(running)),
        invites.c.revoked_at.is_not(None),
    )
    result = await conn.execute(
        invites.delete().where(sa.or_(consult_over, sa.and_(dead, superseded)))
    )
    return result.rowcount


async def running_consults(conn: AsyncConnection) -> list[tuple[uuid.UUID, datetime]]:
    """The consults that have started and not ended, with their start."""
    rows = await conn.execute(
        sa.select(consults.c.id, consults.c.started_at).where(
            consults.c.status == ConsultStatus.ACTIVE.value
        )
    )
    return [(row.id, row.started_at) for row in rows]


async def abandoned_consults(
    conn: AsyncConnection, *, now: datetime, validity_s: int
) -> list[uuid.UUID]:
    """Consults never started that can no longer be joined: no live invite,
    and made longer ago than an invite lives. The caller ends them (as
    never started) through the rooms, so connected sockets hear of it."""
    live_invite = (
        sa.select(invites.c.token_hash)
        .where(
            invites.c.consult_id == consults.c.id,
            invites.c.expires_at > now,
            invites.c.revoked_at.is_(None),
        )
        .exists()
    )
    rows = await conn.scalars(
        sa.select(consults.c.id).where(
            consults.c.status == ConsultStatus.CREATED.value,
            consults.c.created_at <= now - timedelta(seconds=validity_s),
            ~live_invite,
        )
    )
    return list(rows)


async def live_invite_expiry(
    conn: AsyncConnection, consult_id: uuid.UUID, *, now: datetime
) -> datetime | None:
    """The expiry of the consult's live invite, if it has one."""
    expiry: datetime | None = await conn.scalar(
        sa.select(sa.func.max(invites.c.expires_at)).where(
            invites.c.consult_id == consult_id,
            invites.c.expires_at > now,
            invites.c.revoked_at.is_(None),
        )
    )
    if expiry is not None and expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=UTC)  # SQLite's aggregate loses the column type
    return expiry


async def link_states(
    conn: AsyncConnection, of: list[Consult], *, now: datetime
) -> dict[uuid.UUID, LinkState]:
    """Whether each consult's link works, judged as :func:`audit.invite_use.open_invite` judges it.

    At most one of a consult's invites is unrevoked (:func:`issue_invite`);
    without one, a revoked invite still stored means the link was revoked.
    """
    states = {consult.id: LinkState.NONE for consult in of}
    open_ones = {consult.id: consult for consult in of if not consult.is_over}
    if not open_ones:
        return states
    rows = await conn.execute(
        sa.select(invites.c.consult_id, invites.c.expires_at, invites.c.revoked_at).where(
            invites.c.consult_id.in_(list(open_ones))
        )
    )
    for row in rows:
        consult = open_ones[row.consult_id]
        if row.revoked_at is not None:
            if states[consult.id] is LinkState.NONE:
                states[consult.id] = LinkState.REVOKED
        elif row.expires_at <= now and consult.started_at is None:
            states[consult.id] = LinkState.EXPIRED
        else:
            states[consult.id] = LinkState.LIVE
    return states


async def destroy_labels_of_unusable_links(conn: AsyncConnection, *, now: datetime) -> int:
    """Delete the labels of consults not started whose link no longer works
    (run out unused or revoked, by whichever validity made it: the server's
    or the practice's); how many. A link reissued later gets no label back."""
    live_invite = (
        sa.select(invites.c.token_hash)
        .where(
            invites.c.consult_id == consult_labels.c.consult_id,
            invites.c.expires_at > now,
            invites.c.revoked_at.is_(None),
        )
        .exists()
    )
    not_started = sa.select(consults.c.id).where(consults.c.status == ConsultStatus.CREATED.value)
    result = await conn.execute(
        consult_labels.delete().where(consult_labels.c.consult_id.in_(not_started), ~live_invite)
    )
    return int(result.rowcount or 0)
