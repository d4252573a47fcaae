"""The patient's receipt of a consult: its times, and who looked at its record.

A patient has no account; what they hold is a link. Once the consult has
started, and while it is not over, the page of their invite link asks for a
receipt (:func:`issue_receipt`), with the key only the admitted patient's
socket is given (:func:`receipt_key`): a random token (256 bits, URL-safe) of
which only the SHA-256 is kept, in ``receipts``, tied to the consult and to
nothing else. No name, no address, no invite, no time: the row says only
that some link opens this consult's receipt. It goes with the consult's record (foreign key
cascade; the retention purge), and the receipt then no longer opens.

What a receipt shows (:func:`read_receipt`): the consult's status, start,
end and duration; whether it was recorded and whether a recording of it
still exists; and every access record whose object is the consult or one of
its recordings (when, the actor's role and pseudonym: their account's id,
which the practice can look up in its access log, or for a webhook message
the practice's record system took, ``webhook.delivered`` by the system, the
endpoint's id; what was done and the outcome). Nothing of any other consult, and no way to one.

A recording destroyed before its consult's record leaves its id in
``destroyed_recordings`` (written by :func:`audit.recordings.shred`), so
that the receipt can still say the consult was recorded and find the access
records about that recording.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import AccessRecord, stored_record
from audit.consults import Consult, get_consult
from audit.errors import Conflict, NotFound
from audit.schema import access_log, accounts, destroyed_recordings, receipts, recordings
from audit.sealing import keyed_hash, looks_like_token, token_hash

__all__ = [
    "ACCESS_LIMIT",
    "PATIENT_ROLE",
    "RECEIPTS_PER_CONSULT",
    "ConsultNotStarted",
    "Receipt",
    "ReceiptUnknown",
    "issue_receipt",
    "open_receipt",
    "organisation_of",
    "read_receipt",
    "receipt_key",
    "receipt_key_matches",
]

# Live receipts per consult: a patient reloading the page gets a new one
# each time; the oldest beyond this go, so the table stays small.
RECEIPTS_PER_CONSULT = 5
# Access records shown at most (the newest); a consult read this often is
# an anomaly the practice's own access log shows whole.
ACCESS_LIMIT = 500
# The actor role of a patient reading their receipt.
PATIENT_ROLE = "patient"


class ReceiptUnknown(NotFound):
    """No receipt has this token: never issued, or its consult's record is gone."""

    def __init__(self) -> None:
        super().__init__(
            "this receipt is not known: the link is incomplete, or the consult's record"
            " has been deleted at the end of its retention period"
        )


class ConsultNotStarted(Conflict):
    """A receipt is given once the consult has started (the patient admitted)."""

    def __init__(self) -> None:
        super().__init__("the consult has not started; its receipt is given once it has")


@dataclass(frozen=True)
class Receipt:
    consult: Consult
    recorded: bool
    recording_exists: bool
    # The access records about the consult and its recordings, oldest first.
    accesses: list[AccessRecord]
    # More records exist than :data:`ACCESS_LIMIT`; the oldest were left out.
    truncated: bool


def receipt_key(master_key: bytes, consult_id: uuid.UUID) -> str:
    """The key a receipt of the consult is asked for with: the server gives
    it once, to the socket it admits (``admitted``), never to the therapist's,
    who holds the invite link too, nor to a socket that joins the running
    consult later (anyone with the link could open one). Derived, not
    stored: every node makes the same one from the master key."""
    return keyed_hash(master_key, "receipt-key", str(consult_id))


def receipt_key_matches(master_key: bytes, consult_id: uuid.UUID, key: str) -> bool:
    """Whether ``key`` is the consult's receipt key (compared in constant
    time, as bytes: any text a client sends is compared, none raises)."""
    expected = receipt_key(master_key, consult_id).encode()
    return hmac.compare_digest(expected, key.encode("utf-8", "surrogatepass"))


async def issue_receipt(conn: AsyncConnection, consult: Consult) -> str:
    """A new receipt token for the consult (returned once, only its hash kept);
    beyond :data:`RECEIPTS_PER_CONSULT`, the consult's oldest stop working.

    Only for a consult that has started (:class:`ConsultNotStarted`
    otherwise): a receipt then tells nothing the consult's record does not
    (that the patient came); one made while the patient waited would.
    """
    if consult.started_at is None:
        raise ConsultNotStarted()
    token = secrets.token_urlsafe(32)
    await conn.execute(
        receipts.insert().values(token_hash=token_hash(token), consult_id=consult.id)
    )
    kept = (
        sa.select(receipts.c.id)
        .where(receipts.c.consult_id == consult.id)
        .order_by(receipts.c.id.desc())
        .limit(RECEIPTS_PER_CONSULT)
    )
    await conn.execute(
        receipts.delete().where(
            receipts.c.consult_id == consult.id, receipts.c.id.not_in(kept.scalar_subquery())
        )
    )
    return token


async def open_receipt(conn: AsyncConnection, token: str) -> uuid.UUID:
    """The consult of the receipt ``token``; :class:`ReceiptUnknown` if there is none."""
    if not looks_like_token(token):
        raise ReceiptUnknown()
    consult_id: uuid.UUID | None = await conn.scalar(
        sa.select(receipts.c.consult_id).where(receipts.c.token_hash == token_hash(token))
    )
    if consult_id is None:
        raise ReceiptUnknown()
    return consult_id


async def organisation_of(conn: AsyncConnection, consult: Consult) -> uuid.UUID | None:
    """The consult's organisation: its therapist's (None once that account is erased)."""
    if consult.therapist_id is None:
        return None
    found: uuid.UUID | None = await conn.scalar(
        sa.select(accounts.c.organisation_id).where(accounts.c.id == consult.therapist_id)
    )
    return found


async def read_receipt(conn: AsyncConnection, consult_id: uuid.UUID) -> Receipt:
    """What the receipt of ``consult_id`` shows (see the module docstring)."""
    consult = await get_consult(conn, consult_id)
    live = set(
        (
            await conn.execute(
                sa.select(recordings.c.id).where(recordings.c.consult_id == consult_id)
            )
        ).scalars()
    )
    destroyed = set(
        (
            await conn.execute(
                sa.select(destroyed_recordings.c.recording_id).where(
                    destroyed_recordings.c.consult_id == consult_id
                )
            )
        ).scalars()
    )
    accesses, truncated = await _accesses(conn, consult_id, live | destroyed)
    return Receipt(
        consult=consult,
        recorded=bool(live or destroyed),
        recording_exists=bool(live),
        accesses=accesses,
        truncated=truncated,
    )


async def _accesses(
    conn: AsyncConnection, consult_id: uuid.UUID, recording_ids: set[uuid.UUID]
) -> tuple[list[AccessRecord], bool]:
    """The access records naming the consult or one of these recordings as
    their object, oldest first; whether older ones were left out.

    Matched by the object's id in every chain: the ids are random UUIDs, and
    a consult whose therapist was erased has left its organisation's chain
    for the installation's defaults, while its earlier records stay where
    they were written.
    """
    about = sa.and_(
        access_log.c.object_type == "consult", access_log.c.object_id == str(consult_id)
    )
    if recording_ids:
        about = sa.or_(
            about,
            sa.and_(
                access_log.c.object_type == "recording",
                access_log.c.object_id.in_(sorted(str(rid) for rid in recording_ids)),
            ),
        )
    rows = (
        await conn.execute(
            sa.select(access_log)
            .where(about)
            .order_by(access_log.c.at.desc(), access_log.c.id.desc())
            .limit(ACCESS_LIMIT + 1)
        )
    ).all()
    truncated = len(rows) > ACCESS_LIMIT
    records = [stored_record(row) for row in rows[:ACCESS_LIMIT]]
    records.reverse()
    return records, truncated
