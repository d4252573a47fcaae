"""The therapist's label for a patient, sealed under a key of the consult's own.

A label ("Mrs de Vries, 10:30") is personal data given for one consult
(DESIGN.md, promise 11). It is kept apart from the consult's record, in
``consult_labels``: AES-256-GCM under a random data key of its own, and that
key wrapped by the master key ring's current key (purpose ``label-key``,
bound to the consult's id; the row's ``key_id`` names the ring key, NULL the
root), both in one row. Deleting the row destroys key and ciphertext at once
(crypto-shredding): :func:`destroy_label` when the consult ends, and the
foreign key's cascade when the record itself goes. A rotation of the ring
re-wraps the key (:func:`audit.keyring.rewrap_all`), so that once the old
ring key is retired, a backup taken while the label lived opens with no key
still kept.

A derived key would not do: it could be derived again from the master key
after the end, so nothing would have been destroyed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.keyring import (
    LABEL_KEY_PURPOSE,
    WrappingKey,
    current_wrapping_key,
    with_ring_key,
    wrapping_key,
)
from audit.schema import consult_labels
from audit.sealing import SealError, seal_under_own_key, unseal_under_own_key

__all__ = [
    "LABEL_KEY_PURPOSE",
    "SealedLabel",
    "destroy_label",
    "read_labels",
    "sealed_label_of",
    "store_label",
    "with_sealed_label",
]

_LABEL_PURPOSE = "consult-label"


async def store_label(
    conn: AsyncConnection, master_key: bytes | WrappingKey, consult_id: uuid.UUID, label: str
) -> None:
    """Seal ``label`` under a new key of the consult's own; replaces an earlier one.

    ``master_key`` is the ring's current key (:func:`audit.keyring.load_ring`),
    or the root key itself (then the ring is loaded here).
    """
    wrapping = await current_wrapping_key(conn, master_key)
    wrapped_key, sealed_label = seal_under_own_key(
        wrapping.key, LABEL_KEY_PURPOSE, _LABEL_PURPOSE, label.encode(), bound_to=str(consult_id)
    )
    await destroy_label(conn, consult_id)
    await conn.execute(
        consult_labels.insert().values(
            consult_id=consult_id,
            wrapped_key=wrapped_key,
            sealed_label=sealed_label,
            key_id=wrapping.id,
        )
    )


@dataclass(frozen=True, repr=False)
class SealedLabel:
    """A label as stored, with the ring key that wraps its key as stored, read
    along with its consult; opened only where it is shown (``repr`` shows
    nothing of it)."""

    consult_id: uuid.UUID
    wrapped_key: bytes
    sealed_label: bytes
    key_id: str | None
    ring_wrapped_key: bytes | None
    # Whom it is shown to, the consult's therapist, and the organisation whose
    # access log records each showing (read where the query has them).
    therapist_id: uuid.UUID | None = None
    organisation_id: uuid.UUID | None = None

    def open(self, root_key: bytes) -> str | None:
        """The label; None if it does not open (its ring key retired, or
        sealed under another root key: unreadable, as if destroyed)."""
        try:
            label = unseal_under_own_key(
                wrapping_key(root_key, self.key_id, self.ring_wrapped_key),
                LABEL_KEY_PURPOSE,
                _LABEL_PURPOSE,
                self.wrapped_key,
                self.sealed_label,
                bound_to=str(self.consult_id),
            )
        except SealError:
            return None
        return label.decode()


def with_sealed_label(query: sa.Select[Any], consult_id: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """``query`` with the sealed label of the consult ``consult_id`` names, if
    it has one, and its ring key (outer joins: the label costs no query of
    its own); read the rows with :func:`sealed_label_of`."""
    query = query.outerjoin(consult_labels, consult_labels.c.consult_id == consult_id)
    return with_ring_key(
        query.add_columns(
            consult_labels.c.consult_id.label("label_consult_id"),
            consult_labels.c.wrapped_key.label("label_wrapped_key"),
            consult_labels.c.sealed_label.label("label_sealed"),
            consult_labels.c.key_id.label("label_key_id"),
        ),
        consult_labels.c.key_id,
    )


def sealed_label_of(row: sa.Row[Any] | Mapping[str, Any]) -> SealedLabel | None:
    """The label of a row of a :func:`with_sealed_label` query (a row, or its
    mapping by column name); None without one."""
    m = row._mapping if isinstance(row, sa.Row) else row
    if m["label_consult_id"] is None:
        return None
    return SealedLabel(
        m["label_consult_id"],
        m["label_wrapped_key"],
        m["label_sealed"],
        m["label_key_id"],
        m["ring_wrapped_key"],
        m.get("therapist_id"),
        m.get("therapist_organisation_id"),
    )


async def read_labels(
    conn: AsyncConnection, root_key: bytes, consult_ids: list[uuid.UUID]
) -> dict[uuid.UUID, str | None]:
    """The labels of these consults (None where there is none, or it does not open)."""
    labels: dict[uuid.UUID, str | None] = dict.fromkeys(consult_ids)
    if not consult_ids:
        return labels
    rows = await conn.execute(
        with_ring_key(sa.select(consult_labels), consult_labels.c.key_id).where(
            consult_labels.c.consult_id.in_(consult_ids)
        )
    )
    for row in rows:
        sealed = SealedLabel(
            row.consult_id, row.wrapped_key, row.sealed_label, row.key_id, row.ring_wrapped_key
        )
        labels[row.consult_id] = sealed.open(root_key)
    return labels


async def destroy_label(conn: AsyncConnection, consult_id: uuid.UUID) -> bool:
    """Delete the consult's label, key and ciphertext; whether there was one."""
    result = await conn.execute(
        consult_labels.delete().where(consult_labels.c.consult_id == consult_id)
    )
    return bool(result.rowcount)
