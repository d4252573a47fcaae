"""The practice's appointment reference for a consult, sealed under a key of its own.

A practice whose settings allow it (``appointment_reference_allowed``) lets
its therapists attach the reference its record system knows the
appointment by (an opaque string, issue 21 item 4), so that the consult's
webhooks can name it. It is given for one consult (DESIGN.md, promise 11)
and kept apart from the consult's record, in ``appointment_references``:
AES-256-GCM under a random data key of its own, that key wrapped by the
master key ring's current key (purpose ``appointment-reference-key``, bound
to the consult's id; ``key_id`` names the ring key, NULL the root), both in
one row; a rotation of the ring re-wraps it (:mod:`audit.keyring`). It is
never in the consult's row, in the outbox's stored data or in a log: the
webhook sender unseals it as it sends a ``consult.started`` or
``consult.ended`` message.

It is kept only while a message may still need it: once the consult is over
and no delivery of its ``consult.started`` or ``consult.ended`` is pending
(delivered, or failed for good), :func:`destroy_spent_references` deletes
the row, key and ciphertext at once. With no endpoint taking those events
that is at the consult's end. The record's own deletion (retention) takes
it along (the foreign key's cascade).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.errors import InvalidValue
from audit.keyring import (
    REFERENCE_KEY_PURPOSE,
    WrappingKey,
    current_wrapping_key,
    with_ring_key,
    wrapping_key,
)
from audit.outbox import DeliveryStatus
from audit.schema import appointment_references, consults, webhook_deliveries, webhook_events
from audit.sealing import SealError, seal_under_own_key, unseal_under_own_key
from audit.webhooks import EventType

__all__ = [
    "MAX_REFERENCE_CHARS",
    "REFERENCE_KEY_PURPOSE",
    "check_reference",
    "destroy_spent_references",
    "read_references",
    "store_reference",
    "unseal_reference",
    "with_reference_ring_key",
]

_REFERENCE_PURPOSE = "appointment-reference"
# Record systems' appointment numbers and UUIDs fit with room to spare.
MAX_REFERENCE_CHARS = 64
# The events whose messages carry the reference.
_CONSULT_EVENTS = (EventType.CONSULT_STARTED.value, EventType.CONSULT_ENDED.value)
# audit.consults.OVER_STATUSES (that module imports this one).
_OVER = ("ended", "not_started")


def check_reference(text: str, *, field: str = "appointment_reference") -> str:
    """``text`` without spaces around it, if it is a usable reference: 1 to 64
    printable characters, not only spaces; :class:`InvalidValue` naming
    ``field`` (never the value) if not. (Spaces around are dropped, so that
    " X " and "X" are one reference, one external id.)"""
    if not 1 <= len(text) <= MAX_REFERENCE_CHARS:
        raise InvalidValue(f"field {field!r} must be 1 to {MAX_REFERENCE_CHARS} characters long")
    if not text.isprintable():
        raise InvalidValue(
            f"field {field!r} must be printable characters only (no control characters, "
            "line breaks or tabs)"
        )
    if not text.strip():
        raise InvalidValue(f"field {field!r} must not be only spaces")
    return text.strip()


async def store_reference(
    conn: AsyncConnection, master_key: bytes | WrappingKey, consult_id: uuid.UUID, reference: str
) -> None:
    """Seal ``reference`` for the consult under a new key of its own.

    ``master_key`` is the ring's current key (:func:`audit.keyring.load_ring`),
    or the root key itself (then the ring is loaded here).
    """
    wrapping = await current_wrapping_key(conn, master_key)
    wrapped_key, sealed = seal_under_own_key(
        wrapping.key,
        REFERENCE_KEY_PURPOSE,
        _REFERENCE_PURPOSE,
        check_reference(reference).encode(),
        bound_to=str(consult_id),
    )
    await conn.execute(
        appointment_references.insert().values(
            consult_id=consult_id,
            wrapped_key=wrapped_key,
            sealed_reference=sealed,
            key_id=wrapping.id,
        )
    )


def with_reference_ring_key(query: sa.Select[Any]) -> sa.Select[Any]:
    """``query``, which reads ``appointment_references``, with the ring key
    its row names (column ``ring_wrapped_key``) for :func:`unseal_reference`."""
    return with_ring_key(query, appointment_references.c.key_id)


def unseal_reference(
    root_key: bytes,
    consult_id: uuid.UUID,
    wrapped_key: bytes,
    sealed: bytes,
    *,
    key_id: str | None,
    ring_wrapped_key: bytes | None,
) -> str | None:
    """The reference of a stored row, with its ``key_id`` and the ring key
    :func:`with_reference_ring_key` joined; None if it does not open (its
    ring key retired, or sealed under another root key: unreadable, as if
    destroyed)."""
    try:
        opened = unseal_under_own_key(
            wrapping_key(root_key, key_id, ring_wrapped_key),
            REFERENCE_KEY_PURPOSE,
            _REFERENCE_PURPOSE,
            wrapped_key,
            sealed,
            bound_to=str(consult_id),
        )
    except SealError:
        return None
    return opened.decode()


async def read_references(
    conn: AsyncConnection, master_key: bytes, consult_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, str]:
    """The references still kept of these consults (those without one are left out)."""
    wanted = list(set(consult_ids))
    if not wanted:
        return {}
    rows = await conn.execute(
        with_reference_ring_key(sa.select(appointment_references)).where(
            appointment_references.c.consult_id.in_(wanted)
        )
    )
    found = {
        row.consult_id: unseal_reference(
            master_key,
            row.consult_id,
            row.wrapped_key,
            row.sealed_reference,
            key_id=row.key_id,
            ring_wrapped_key=row.ring_wrapped_key,
        )
        for row in rows
    }
    return {consult_id: text for consult_id, text in found.items() if text is not None}


async def destroy_spent_references(
    conn: AsyncConnection, consult_ids: Iterable[uuid.UUID] | None = None
) -> int:
    """Delete the references (key and ciphertext) of consults that are over and
    have no ``consult.started``/``consult.ended`` delivery pending; of those
    in ``consult_ids``, or of every consult. Return how many."""
    message_pending = (
        sa.select(webhook_deliveries.c.id)
        .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        .where(
            webhook_events.c.subject_id == appointment_references.c.consult_id,
            webhook_events.c.type.in_(_CONSULT_EVENTS),
            webhook_deliveries.c.status == DeliveryStatus.PENDING.value,
        )
        .exists()
    )
    over = sa.select(consults.c.id).where(consults.c.status.in_(_OVER))
    spent = sa.and_(appointment_references.c.consult_id.in_(over), ~message_pending)
    if consult_ids is not None:
        chosen = list(consult_ids)
        # Two nodes (or two sends of one round) record the last two deliveries
        # at once: each would see the other's still pending and keep the
        # reference. Locking its row first orders them; the second then sees
        # the first's delivery committed (PostgreSQL reads afresh per
        # statement; SQLite has one writer at a time anyway).
        locked = await conn.scalars(
            sa.select(appointment_references.c.consult_id)
            .where(appointment_references.c.consult_id.in_(chosen))
            .with_for_update()
        )
        if not list(locked):
            return 0
        spent = sa.and_(spent, appointment_references.c.consult_id.in_(chosen))
    result = await conn.execute(appointment_references.delete().where(spent))
    return int(result.rowcount or 0)
