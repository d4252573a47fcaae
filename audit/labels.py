"""The therapist's label for a patient, sealed under a key of the consult's own.

A label ("Mrs de Vries, 10:30") is personal data given for one consult
(DESIGN.md, promise 11). It is kept apart from the consult's record, in
``consult_labels``: AES-256-GCM under a random data key of its own, and that
key wrapped by the master key (purpose ``label-key``, bound to the consult's
id), both in one row. Deleting the row destroys key and ciphertext at once
(crypto-shredding): :func:`destroy_label` when the consult ends, and the
foreign key's cascade when the record itself goes.

A derived key would not do: it could be derived again from the master key
after the end, so nothing would have been destroyed.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.schema import consult_labels
from audit.sealing import SealError, seal_under_own_key, unseal_under_own_key

__all__ = ["LABEL_KEY_PURPOSE", "destroy_label", "read_labels", "store_label"]

LABEL_KEY_PURPOSE = "label-key"
_LABEL_PURPOSE = "consult-label"


async def store_label(
    conn: AsyncConnection, master_key: bytes, consult_id: uuid.UUID, label: str
) -> None:
    """Seal ``label`` under a new key of the consult's own; replaces an earlier one."""
    wrapped_key, sealed_label = seal_under_own_key(
        master_key, LABEL_KEY_PURPOSE, _LABEL_PURPOSE, label.encode(), bound_to=str(consult_id)
    )
    await destroy_label(conn, consult_id)
    await conn.execute(
        consult_labels.insert().values(
            consult_id=consult_id, wrapped_key=wrapped_key, sealed_label=sealed_label
        )
    )


async def read_labels(
    conn: AsyncConnection, master_key: bytes, consult_ids: list[uuid.UUID]
) -> dict[uuid.UUID, str | None]:
    """The labels of these consults (None where there is none, or it does not open)."""
    labels: dict[uuid.UUID, str | None] = dict.fromkeys(consult_ids)
    if not consult_ids:
        return labels
    rows = await conn.execute(
        sa.select(consult_labels).where(consult_labels.c.consult_id.in_(consult_ids))
    )
    for row in rows:
        try:
            label = unseal_under_own_key(
                master_key,
                LABEL_KEY_PURPOSE,
                _LABEL_PURPOSE,
                row.wrapped_key,
                row.sealed_label,
                bound_to=str(row.consult_id),
            )
        except SealError:
            # Sealed under another master key (restored from elsewhere): the
            # consult stands, its label is unreadable, as if destroyed.
            continue
        labels[row.consult_id] = label.decode()
    return labels


async def destroy_label(conn: AsyncConnection, consult_id: uuid.UUID) -> bool:
    """Delete the consult's label, key and ciphertext; whether there was one."""
    result = await conn.execute(
        consult_labels.delete().where(consult_labels.c.consult_id == consult_id)
    )
    return bool(result.rowcount)
