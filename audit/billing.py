"""A month of consults per therapist, for the practice's billing.

A practice's record system bills video consults by their duration; its
admin exports a month (``GET /api/admin/billing``, ``videoconsult billing
export``). Each row is what the consult's record holds (times, duration,
status) and the therapist whose consult it was: nothing about the patient,
who is not in the record. The practice's appointment reference is added
where it still exists (:mod:`audit.references`: it is kept only until the
consult's messages are delivered), unsealed for the export, whose access
record covers that read. A consult counts in the month of its start, or,
never started, of its appointment, or else of when it was made. A consult
whose therapist was erased belongs to no organisation any more and is in no
export.

Three forms (:class:`ExportFormat`): JSON for programs, with each
therapist's totals; a plain CSV (RFC 4180: commas, UTF-8 without a
byte-order mark), as a program or a careful import reads it; and a CSV made
for a bookkeeper who double-clicks it into Excel in a European locale. No
CSV cell starts a spreadsheet formula.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import enum
import io
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.clock import iso_utc
from audit.consults import ConsultStatus
from audit.db import all_rows
from audit.references import unseal_reference, with_reference_ring_key
from audit.schema import accounts, appointment_references, consults


class ExportFormat(enum.Enum):
    # The rows and each therapist's totals, exact values: for programs.
    JSON = "json"
    # RFC 4180, commas, UTF-8 without a byte-order mark.
    CSV = "csv"
    # A CSV as Excel opens it in NL, DE, FR, BE: with a byte-order mark,
    # semicolons, and the practice's ids as text.
    EXCEL = "excel"


def parse_format(text: str) -> ExportFormat:
    """The export's form by its name; ValueError saying which names there are."""
    try:
        return ExportFormat(text)
    except ValueError:
        names = [member.value for member in ExportFormat]
        raise ValueError(f"{', '.join(names[:-1])} or {names[-1]}") from None


COLUMNS = (
    "therapist_id",
    "therapist",
    "therapist_external_id",
    "consult_id",
    "date",
    "scheduled_at",
    "started_at",
    "ended_at",
    "duration_s",
    "status",
    "appointment_reference",
)


@dataclass(frozen=True)
class BilledConsult:
    therapist_id: uuid.UUID
    therapist: str  # the account's e-mail address, which the admin sees anyway
    consult_id: uuid.UUID
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    duration_s: int | None
    status: ConsultStatus
    # The practice's own reference, while it is kept.
    appointment_reference: str | None = None
    # The record system's id for the therapist, where an admin set one.
    therapist_external_id: str | None = None

    @property
    def counted_at(self) -> datetime:
        """The moment that puts the consult in a month."""
        return self.started_at or self.scheduled_at or self.created_at


_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
FIRST_YEAR, LAST_YEAR = 2000, 2999


def parse_month(text: str) -> date:
    """``YYYY-MM`` as the month's first day; ValueError saying what is expected."""
    found = _MONTH.fullmatch(text)
    if found is None:
        raise ValueError("a month as YYYY-MM, e.g. 2026-11")
    if not FIRST_YEAR <= int(found[1]) <= LAST_YEAR:
        raise ValueError(f"a month from {FIRST_YEAR}-01 to {LAST_YEAR}-12")
    return date(int(found[1]), int(found[2]), 1)


def month_bounds(first_day: date, zone: tzinfo) -> tuple[datetime, datetime]:
    """The month that ``first_day`` starts, in ``zone``, as [since, until) in UTC."""
    after = date(first_day.year + first_day.month // 12, first_day.month % 12 + 1, 1)
    return (
        datetime(first_day.year, first_day.month, 1, tzinfo=zone).astimezone(UTC),
        datetime(after.year, after.month, 1, tzinfo=zone).astimezone(UTC),
    )


async def month_of_consults(
    conn: AsyncConnection,
    organisation_id: uuid.UUID,
    master_key: bytes,
    *,
    since: datetime,
    until: datetime,
    therapist_id: uuid.UUID | None = None,
) -> list[BilledConsult]:
    """The organisation's consults counted in [since, until), by therapist, then in time."""
    counted_at = sa.func.coalesce(
        consults.c.started_at, consults.c.scheduled_at, consults.c.created_at
    )
    query: sa.Select[Any] = (
        sa.select(
            accounts.c.id.label("therapist_id"),
            accounts.c.email,
            accounts.c.external_id,
            consults.c.id,
            consults.c.created_at,
            consults.c.scheduled_at,
            consults.c.started_at,
            consults.c.ended_at,
            consults.c.duration_s,
            consults.c.status,
            appointment_references.c.wrapped_key,
            appointment_references.c.sealed_reference,
            appointment_references.c.key_id,
        )
        .join(accounts, accounts.c.id == consults.c.therapist_id)
        .outerjoin(appointment_references, appointment_references.c.consult_id == consults.c.id)
    )
    query = (
        with_reference_ring_key(query)
        .where(accounts.c.organisation_id == organisation_id, counted_at >= since)
        .where(counted_at < until)
        .order_by(accounts.c.email, counted_at, consults.c.id)
    )
    if therapist_id is not None:
        query = query.where(accounts.c.id == therapist_id)
    # A month of a large practice is tens of thousands of rows: made a few
    # hundred at a time, the loop free in between.
    rows = await all_rows(await conn.execute(query))
    # Unsealing is some 13 µs a reference: a month of a large practice's
    # consults would hold the loop for tens of milliseconds.
    return await asyncio.to_thread(_billed, rows, master_key)


def _billed(rows: Sequence[sa.Row[Any]], master_key: bytes) -> list[BilledConsult]:
    return [
        BilledConsult(
            therapist_id=row.therapist_id,
            therapist=row.email,
            consult_id=row.id,
            created_at=row.created_at,
            scheduled_at=row.scheduled_at,
            started_at=row.started_at,
            ended_at=row.ended_at,
            duration_s=row.duration_s,
            status=ConsultStatus(row.status),
            appointment_reference=(
                None
                if row.sealed_reference is None
                else unseal_reference(
                    master_key,
                    row.id,
                    row.wrapped_key,
                    row.sealed_reference,
                    key_id=row.key_id,
                    ring_wrapped_key=row.ring_wrapped_key,
                )
            ),
            therapist_external_id=row.external_id,
        )
        for row in rows
    ]


def row_of(entry: BilledConsult, zone: tzinfo) -> dict[str, Any]:
    """One consult as a row of the export (``date`` in the export's time zone)."""
    return {
        "therapist_id": str(entry.therapist_id),
        "therapist": entry.therapist,
        "therapist_external_id": entry.therapist_external_id,
        "consult_id": str(entry.consult_id),
        "date": entry.counted_at.astimezone(zone).date().isoformat(),
        "scheduled_at": iso_utc(entry.scheduled_at),
        "started_at": iso_utc(entry.started_at),
        "ended_at": iso_utc(entry.ended_at),
        "duration_s": entry.duration_s,
        "status": entry.status.value,
        "appointment_reference": entry.appointment_reference,
    }


def totals(entries: list[BilledConsult]) -> list[dict[str, Any]]:
    """Per therapist: how many consults, how many were held, and their seconds."""
    by_therapist: dict[uuid.UUID, dict[str, Any]] = {}
    for entry in entries:
        total = by_therapist.setdefault(
            entry.therapist_id,
            {
                "therapist_id": str(entry.therapist_id),
                "therapist": entry.therapist,
                "therapist_external_id": entry.therapist_external_id,
                "consults": 0,
                "held": 0,
                "duration_s": 0,
            },
        )
        total["consults"] += 1
        if entry.started_at is not None:
            total["held"] += 1
            total["duration_s"] += entry.duration_s or 0
    return list(by_therapist.values())


def as_json(document: dict[str, Any], entries: list[BilledConsult], zone: tzinfo) -> bytes:
    """``document`` with the therapists' totals and the rows, as JSON bytes;
    blocking for a big month."""
    whole = {
        **document,
        "therapists": totals(entries),
        "consults": [row_of(entry, zone) for entry in entries],
    }
    return json.dumps(whole).encode()


def as_csv(
    entries: list[BilledConsult], zone: tzinfo, export_format: ExportFormat = ExportFormat.CSV
) -> bytes:
    """The export as CSV (a header, then a row a consult), plain or for Excel;
    blocking for a big month."""
    if export_format is ExportFormat.JSON:
        raise ValueError("as_csv makes CSV; the JSON is as_json's")
    excel = export_format is ExportFormat.EXCEL
    out = io.StringIO()
    # Excel splits a file it opens at the list separator of the machine's
    # locale: a semicolon wherever the decimal separator is a comma (NL, DE,
    # FR, BE). No column holds a fraction, so no decimal separator is needed.
    writer = csv.writer(out, delimiter=";" if excel else ",", lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for entry in entries:
        row = row_of(entry, zone)
        writer.writerow([_cell(row[name], as_text=excel and name in _IDS) for name in COLUMNS])
    if excel:
        # Without a byte-order mark Excel reads UTF-8 as Windows-1252 ("MÃ¼ller").
        # (A "sep=;" line would name the separator for any locale, but then
        # Excel ignores the mark.)
        return codecs.BOM_UTF8 + out.getvalue().encode()
    return out.getvalue().encode()


# The practice's own ids: Excel would make 123 of "00123", 1,23457E+19 of a long
# number and a date of "1-2". ="…" is a text constant to it, shown as written
# (64 characters at most, well within its 255 for a constant).
_IDS = frozenset({"therapist_external_id", "appointment_reference"})
# OWASP, CSV injection: a spreadsheet runs a cell that starts with one of
# these as a formula. The e-mail address, the external id and the appointment
# reference are the only text here.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# ... also after a separator inside a value: Excel in a semicolon locale splits
# the plain CSV at each ";" (a quote counts only at a field's start), and one
# in a comma locale splits at ",", so what follows one starts a cell of its own.
_SEPARATED_FORMULA = re.compile(r"(?<=[,;])(?=[=+\-@\t\r])")


def _cell(value: object, *, as_text: bool) -> str:
    if value is None:
        return ""
    text = str(value)
    if text.startswith(_FORMULA_STARTS):
        # A quote before it makes it text. Kept inside ="…" too, so that the
        # cell is still text once a bookkeeper saves the sheet as CSV again.
        text = f"'{text}"
    if as_text:
        return '="' + text.replace('"', '""') + '"'
    return _SEPARATED_FORMULA.sub("'", text)
