"""What support staff may see: pseudonymous consult metadata and the 24-hour technical log.

Every query here is limited to one organisation (consults join the
therapist's account to find theirs) and returns nothing that names anyone:
no e-mail address, no account id, no invite. A therapist appears only as a
pseudonym (:class:`TherapistPseudonyms`): a keyed hash of the account id
under a key derived from the master key, so it is stable (support can
filter on it and see that two consults were run by the same person) but
cannot be turned back into an account without the server's key, and it
matches no id used anywhere else (admin API, access log, technical log).

A consult's *moment* is when it started, or, for one that never started,
when it was made; date ranges, ordering and the per-day chart use it.
Consults whose therapist was erased have no organisation any more and are
not listed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.consults import ConsultStatus
from audit.errors import NotFound
from audit.schema import accounts, consults, technical_log
from audit.sealing import derive_key
from audit.technical_log import RETENTION, TechnicalEntry, read_technical

PSEUDONYM_PURPOSE = "support-therapist-pseudonym"
# 48 bits: no collision in any realistic organisation, short enough to read
# out on the phone ("T-4F2A91C03B7E").
PSEUDONYM_HEX_DIGITS = 12
PSEUDONYM_PATTERN = re.compile(rf"T-[0-9A-F]{{{PSEUDONYM_HEX_DIGITS}}}")

# The technical-log entry a server node writes as it ends a consult
# (signaling.rooms.Rooms.end), with the detail {"reason": <EndReason>}.
CONSULT_ENDED_KIND = "signaling.consult-ended"

# Upper bounds (exclusive) of the duration chart's buckets, in minutes; the
# last bucket is open-ended. Short consults are told apart finely, long ones
# coarsely: a failed call lasts seconds, a normal one 20 to 50 minutes.
DURATION_BOUNDS_MIN = (5, 10, 15, 20, 30, 45, 60)

# Keys of technical-log details that support never sees, whatever a writer
# put there: the log is for connection problems, not for people. (A bare
# "name" stays: it is how browsers name an error, e.g. NotReadableError.)
_HIDDEN_DETAIL_KEYS = re.compile(
    r"(^|_)(display_name|patient_name|full_name|first_name|last_name|user_name|username"
    r"|email|e_mail|token|ticket|password|secret|sdp|label|reference|external_id)($|_)"
)
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_EMAIL = re.compile(r"[^\s@<>\"']+@[^\s@<>\"']+\.[A-Za-z]{2,}")
REDACTED = "[hidden]"


class TherapistPseudonyms:
    """Pseudonyms of therapists for the support view; see the module docstring."""

    def __init__(self, master_key: bytes) -> None:
        self._key = derive_key(master_key, PSEUDONYM_PURPOSE)

    def of(self, account_id: uuid.UUID) -> str:
        digest = hmac.new(self._key, account_id.bytes, hashlib.sha256).hexdigest()
        return "T-" + digest[:PSEUDONYM_HEX_DIGITS].upper()


@dataclass(frozen=True)
class ConsultFilter:
    """Which consults of one organisation to show; ``None`` means no limit."""

    organisation_id: uuid.UUID
    # The consult's moment is at or after ``since`` and before ``until`` (UTC).
    since: datetime | None = None
    until: datetime | None = None
    status: ConsultStatus | None = None
    # A pseudonym from :class:`TherapistPseudonyms`.
    therapist: str | None = None


@dataclass(frozen=True)
class SupportConsult:
    """A consult as support sees it: times, status and a pseudonym, nothing else."""

    id: uuid.UUID
    status: ConsultStatus
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_s: int | None
    therapist: str | None


@dataclass(frozen=True)
class ConsultPage:
    consults: list[SupportConsult]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class DurationBucket:
    # Minutes; ``upper_min`` is None for the open-ended last bucket.
    lower_min: int
    upper_min: int | None
    count: int


def _moment() -> sa.ColumnElement[datetime]:
    return sa.func.coalesce(consults.c.started_at, consults.c.created_at)


async def _conditions(
    conn: AsyncConnection, pseudonyms: TherapistPseudonyms, which: ConsultFilter
) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = [accounts.c.organisation_id == which.organisation_id]
    if which.since is not None:
        conditions.append(_moment() >= which.since)
    if which.until is not None:
        conditions.append(_moment() < which.until)
    if which.status is not None:
        conditions.append(consults.c.status == which.status.value)
    if which.therapist is not None:
        account_id = await _resolve(conn, pseudonyms, which.organisation_id, which.therapist)
        conditions.append(
            consults.c.therapist_id == account_id if account_id is not None else sa.false()
        )
    return conditions


async def _resolve(
    conn: AsyncConnection, pseudonyms: TherapistPseudonyms, organisation_id: uuid.UUID, name: str
) -> uuid.UUID | None:
    """The organisation's account behind a pseudonym, if any (a keyed hash cannot be
    inverted, so each account's pseudonym is computed; organisations are small)."""
    ids = await conn.scalars(
        sa.select(accounts.c.id).where(accounts.c.organisation_id == organisation_id)
    )
    return next((account_id for account_id in ids if pseudonyms.of(account_id) == name), None)


def _of_organisation() -> sa.Select[Any]:
    return sa.select(
        consults.c.id,
        consults.c.status,
        consults.c.created_at,
        consults.c.started_at,
        consults.c.ended_at,
        consults.c.duration_s,
        consults.c.therapist_id,
    ).select_from(consults.join(accounts, consults.c.therapist_id == accounts.c.id))


def _support_consult(row: sa.Row[Any], pseudonyms: TherapistPseudonyms) -> SupportConsult:
    return SupportConsult(
        id=row.id,
        status=ConsultStatus(row.status),
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        duration_s=row.duration_s,
        therapist=pseudonyms.of(row.therapist_id) if row.therapist_id is not None else None,
    )


async def list_consults(
    conn: AsyncConnection,
    pseudonyms: TherapistPseudonyms,
    which: ConsultFilter,
    *,
    page: int,
    per_page: int,
) -> ConsultPage:
    """One page of the organisation's consults, newest moment first (then by id,
    so that pages never overlap or skip a consult when moments are equal)."""
    conditions = await _conditions(conn, pseudonyms, which)
    total = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(consults.join(accounts, consults.c.therapist_id == accounts.c.id))
        .where(*conditions)
    )
    rows = await conn.execute(
        _of_organisation()
        .where(*conditions)
        .order_by(_moment().desc(), consults.c.id.desc())
        .limit(per_page)
        .offset((page - 1) * per_page)
    )
    return ConsultPage(
        [_support_consult(row, pseudonyms) for row in rows], int(total or 0), page, per_page
    )


async def get_consult(
    conn: AsyncConnection,
    pseudonyms: TherapistPseudonyms,
    organisation_id: uuid.UUID,
    consult_id: uuid.UUID,
) -> SupportConsult:
    """The consult, if it belongs to the organisation; else :class:`NotFound`."""
    row = (
        await conn.execute(
            _of_organisation().where(
                consults.c.id == consult_id, accounts.c.organisation_id == organisation_id
            )
        )
    ).first()
    if row is None:
        raise NotFound("no such consult")
    return _support_consult(row, pseudonyms)


async def therapists(
    conn: AsyncConnection, pseudonyms: TherapistPseudonyms, organisation_id: uuid.UUID
) -> list[str]:
    """Pseudonyms of the organisation's accounts that ran a consult, sorted (an
    order that says nothing about who they are)."""
    ids = await conn.scalars(
        sa.select(consults.c.therapist_id)
        .distinct()
        .select_from(consults.join(accounts, consults.c.therapist_id == accounts.c.id))
        .where(accounts.c.organisation_id == organisation_id)
    )
    return sorted(pseudonyms.of(account_id) for account_id in ids)


async def consults_per_day(
    conn: AsyncConnection,
    pseudonyms: TherapistPseudonyms,
    which: ConsultFilter,
    *,
    first_day: date,
    last_day: date,
    zone: tzinfo,
) -> list[tuple[date, int]]:
    """How many consults had their moment on each day from ``first_day`` to
    ``last_day`` (both included, days in ``zone``), zeros included.

    ``which.since``/``until`` should span those days; the counting is done
    here rather than in SQL because SQLite cannot group by a local day.
    """
    conditions = await _conditions(conn, pseudonyms, which)
    moments = await conn.scalars(
        sa.select(_moment())
        .select_from(consults.join(accounts, consults.c.therapist_id == accounts.c.id))
        .where(*conditions)
    )
    counted = Counter(moment.astimezone(zone).date() for moment in moments)
    days = (last_day - first_day).days + 1
    return [
        (first_day + timedelta(days=offset), counted[first_day + timedelta(days=offset)])
        for offset in range(max(0, days))
    ]


async def durations(
    conn: AsyncConnection, pseudonyms: TherapistPseudonyms, which: ConsultFilter
) -> list[int]:
    """The durations in seconds of the matching consults that have one (ended ones)."""
    conditions = await _conditions(conn, pseudonyms, which)
    found = await conn.scalars(
        sa.select(consults.c.duration_s)
        .select_from(consults.join(accounts, consults.c.therapist_id == accounts.c.id))
        .where(*conditions, consults.c.duration_s.is_not(None))
    )
    return list(found)


def duration_histogram(durations_s: Sequence[int]) -> list[DurationBucket]:
    """Count durations into the buckets of :data:`DURATION_BOUNDS_MIN` (all of them, zeros too)."""
    lowers = (0, *DURATION_BOUNDS_MIN)
    uppers: tuple[int | None, ...] = (*DURATION_BOUNDS_MIN, None)
    counts = [0] * len(lowers)
    for seconds in durations_s:
        index = next(
            (i for i, upper in enumerate(DURATION_BOUNDS_MIN) if seconds < upper * 60),
            len(DURATION_BOUNDS_MIN),
        )
        counts[index] += 1
    return [
        DurationBucket(lower, upper, count)
        for lower, upper, count in zip(lowers, uppers, counts, strict=True)
    ]


async def technical_log_of(
    conn: AsyncConnection, consult_id: uuid.UUID, *, now: datetime, limit: int
) -> list[TechnicalEntry]:
    """The consult's technical-log entries of the last 24 hours, newest first,
    with anything that could name a person hidden.

    The 24-hour cut-off is :func:`audit.technical_log.read_technical`'s, applied
    in its query. The caller checks first that the consult is the asker's.
    """
    entries = await read_technical(conn, now=now, subject=str(consult_id), limit=limit)
    return [
        TechnicalEntry(entry.at, entry.kind, entry.subject, _hide_personal(entry.detail))
        for entry in entries
    ]


async def end_reasons(
    conn: AsyncConnection, consult_ids: Sequence[uuid.UUID], *, now: datetime
) -> dict[uuid.UUID, str]:
    """How these consults ended, where the technical log still says: the
    ``reason`` of each one's end entry of the last 24 hours (the cut-off of
    :func:`audit.technical_log.read_technical`). The consult record keeps only
    its times, so an end older than that has none here."""
    if not consult_ids:
        return {}
    rows = await conn.execute(
        sa.select(technical_log.c.subject, technical_log.c.detail)
        .where(
            technical_log.c.kind == CONSULT_ENDED_KIND,
            technical_log.c.subject.in_([str(consult_id) for consult_id in consult_ids]),
            technical_log.c.at > now - RETENTION,
        )
        .order_by(technical_log.c.id)
    )
    reasons: dict[uuid.UUID, str] = {}
    for row in rows:
        reason = row.detail.get("reason") if isinstance(row.detail, Mapping) else None
        if isinstance(reason, str):
            reasons[uuid.UUID(row.subject)] = reason
    return reasons


def _hide_personal(detail: Mapping[str, Any]) -> dict[str, Any]:
    """Hide names, addresses, tokens and SDP, should a writer ever log them.

    Defence in depth: the writers log connection states, a client address and
    a browser; this keeps a mistake there from reaching support staff.
    """
    return {
        key: REDACTED if _hidden_key(key) else _hide_value(value) for key, value in detail.items()
    }


def _hidden_key(key: str) -> bool:
    """``displayName``, ``display-name`` and ``Display_Name`` all count as ``display_name``."""
    snake = _CAMEL_HUMP.sub("_", key).replace("-", "_").lower()
    return _HIDDEN_DETAIL_KEYS.search(snake) is not None


def _hide_value(value: Any) -> Any:
    if isinstance(value, str):
        return _EMAIL.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return _hide_personal(value)
    if isinstance(value, list):
        return [_hide_value(item) for item in value]
    return value
