"""The master key ring: the keys that wrap data keys.

A data key is a random key of one record's own: a recording's (its file),
a therapist's label's (:mod:`audit.labels`) or an appointment reference's
(:mod:`audit.references`). Each row names the ring key that wraps its data
key (``key_id``; for labels and references NULL means the root, as rows
older than their ``key_id`` column are).

The configured master key (``security.master_key``) is the ring's root. It
wraps data keys itself until the first rotation, and it seals every key of
the ring (``seal`` with purpose ``master-key``, bound to the key's id), which
is kept in the ``master_keys`` table. The newest ring key is the current one:
new data keys are wrapped by it.

``rotate`` adds a new ring key and re-wraps every data key under it, without
touching the files or the sealed values (a data key is 32 bytes; a file may
be gigabytes). ``retire`` then deletes an old ring key, refused while any
data key still needs it. A retired key is gone: a copy of it (in a memory
dump, say) opens nothing that is still kept.

Key ids are public: a short hash of a key derived from the key, never the
key itself.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.errors import Conflict, NotFound
from audit.schema import appointment_references, consult_labels, master_keys, recordings
from audit.sealing import SealError, derive_key, seal, unseal

RING_KEY_PURPOSE = "master-key"
DATA_KEY_PURPOSE = "recording-key"
# The purposes of labels' and appointment references' data keys as wrapped.
LABEL_KEY_PURPOSE = "label-key"
REFERENCE_KEY_PURPOSE = "appointment-reference-key"
# Tables of records sealed under a key of their own (seal_under_own_key), by
# the purpose of their wrapped data key; each keyed by consult_id.
_OWN_KEY_TABLES = (
    (consult_labels, LABEL_KEY_PURPOSE),
    (appointment_references, REFERENCE_KEY_PURPOSE),
)
RING_KEY_BYTES = 32
# Data keys re-wrapped per transaction: a rotation of many recordings never
# holds one long transaction, and an interrupted one simply runs again.
REWRAP_BATCH = 500


def key_id_of(key: bytes) -> str:
    """A short, public id of a key (which key wrapped a data key)."""
    return hashlib.sha256(derive_key(key, "key-id")).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class WrappingKey:
    """A key of the ring; ``repr`` never shows the key."""

    id: str
    key: bytes

    def __repr__(self) -> str:
        return f"WrappingKey({self.id})"

    def wrap(self, data_key: bytes, *, recording_id: str) -> bytes:
        return seal(self.key, DATA_KEY_PURPOSE, data_key, bound_to=recording_id)

    def unwrap(self, wrapped: bytes, *, recording_id: str) -> bytes:
        return unseal(self.key, DATA_KEY_PURPOSE, wrapped, bound_to=recording_id)


@dataclass(frozen=True)
class KeyRing:
    """Every key of the ring, unsealed; ``current`` wraps new data keys."""

    root_id: str
    current: WrappingKey
    keys: dict[str, WrappingKey] = field(repr=False)

    def get(self, key_id: str) -> WrappingKey:
        try:
            return self.keys[key_id]
        except KeyError:
            raise SealError(
                f"the data key is wrapped by master key {key_id}, which this installation "
                "does not have (retired, or another root key is configured)"
            ) from None


async def load_ring(conn: AsyncConnection, root_key: bytes) -> KeyRing:
    """The ring as it is now; raises :class:`SealError` when a ring key does
    not open with ``root_key`` (another root key is configured)."""
    root = WrappingKey(key_id_of(root_key), root_key)
    keys = {root.id: root}
    current = root
    rows = (
        await conn.execute(
            sa.select(master_keys.c.id, master_keys.c.wrapped_key).order_by(
                master_keys.c.created_at, master_keys.c.id
            )
        )
    ).all()
    for row in rows:
        try:
            key = unseal(root_key, RING_KEY_PURPOSE, row.wrapped_key, bound_to=row.id)
        except SealError:
            raise SealError(
                f"master key {row.id} of the ring does not open with the configured root key "
                f"{root.id} (security.master_key): it was sealed under another root key, "
                "or its row was altered"
            ) from None
        ring_key = WrappingKey(row.id, key)
        keys[ring_key.id] = ring_key
        current = ring_key
    return KeyRing(root.id, current, keys)


def with_ring_key(query: sa.Select[Any], key_id: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """``query`` with the sealed ring key named by ``key_id`` (column
    ``ring_wrapped_key``, NULL for the root or a key not in the ring), by an
    outer join: the ring costs no query of its own. Open with :func:`wrapping_key`."""
    ring_key = master_keys.alias("ring_key")
    return query.outerjoin(ring_key, ring_key.c.id == key_id).add_columns(
        ring_key.c.wrapped_key.label("ring_wrapped_key")
    )


def wrapping_key(root_key: bytes, key_id: str | None, ring_wrapped_key: bytes | None) -> bytes:
    """The key that wraps a row's data key, from its ``key_id`` and the ring
    key :func:`with_ring_key` joined: the root for NULL or the root's id.
    Raises :class:`SealError` when the ring does not have it (retired, or
    another root key is configured)."""
    if key_id is None:
        return root_key
    if ring_wrapped_key is not None:
        return unseal(root_key, RING_KEY_PURPOSE, ring_wrapped_key, bound_to=key_id)
    if key_id == key_id_of(root_key):
        return root_key
    raise SealError(f"master key {key_id} is not in the ring (retired, or another root key)")


async def current_wrapping_key(conn: AsyncConnection, key: bytes | WrappingKey) -> WrappingKey:
    """``key`` if it is a ring key already (the caller loaded the ring), else
    the current key of the ring ``key`` (the root key) seals."""
    return key if isinstance(key, WrappingKey) else (await load_ring(conn, key)).current


@dataclass(frozen=True)
class Rotation:
    new_key_id: str
    # Data keys re-wrapped, by the id of the key that wrapped them before.
    rewrapped: dict[str, int]


async def add_ring_key(conn: AsyncConnection, root_key: bytes, *, now: datetime) -> WrappingKey:
    """Add a new random ring key, sealed by the root; it becomes the current one."""
    key = secrets.token_bytes(RING_KEY_BYTES)
    ring_key = WrappingKey(key_id_of(key), key)
    await conn.execute(
        master_keys.insert().values(
            id=ring_key.id,
            wrapped_key=seal(root_key, RING_KEY_PURPOSE, key, bound_to=ring_key.id),
            created_at=now,
        )
    )
    return ring_key


async def rewrap_all(conn: AsyncConnection, ring: KeyRing) -> Counter[str]:
    """Re-wrap every data key that the current key does not wrap yet (one batch
    of each kind per call of the caller's transaction; see :func:`rotate`).
    Returns the counts by previous key id (the root's for NULL)."""
    moved: Counter[str] = Counter()
    for table, purpose in _OWN_KEY_TABLES:
        moved.update(await _rewrap_own_keys(conn, ring, table, purpose))
    rows = (
        await conn.execute(
            sa.select(recordings.c.id, recordings.c.key_id, recordings.c.wrapped_key)
            .where(recordings.c.key_id != ring.current.id)
            .order_by(recordings.c.id)
            .limit(REWRAP_BATCH)
        )
    ).all()
    for row in rows:
        data_key = ring.get(row.key_id).unwrap(row.wrapped_key, recording_id=str(row.id))
        await conn.execute(
            recordings.update()
            .where(recordings.c.id == row.id, recordings.c.key_id == row.key_id)
            .values(
                key_id=ring.current.id,
                wrapped_key=ring.current.wrap(data_key, recording_id=str(row.id)),
            )
        )
        moved[row.key_id] += 1
    return moved


async def rotate(
    engine: AsyncEngine,
    root_key: bytes,
    *,
    now: datetime,
    note: Callable[[AsyncConnection, WrappingKey], Awaitable[None]] | None = None,
) -> Rotation:
    """Add a new ring key, then re-wrap every data key under it; the files stay as they are.

    The key is added in a transaction of its own (with ``note``, which writes
    the change's access record, so there is no key without its record),
    then the data keys move over a batch per transaction. Interrupted, it
    leaves every data key wrapped by one key of the ring or the other; run it
    again (the key it added is then unused and can be retired).
    """
    async with engine.begin() as conn:
        added = await add_ring_key(conn, root_key, now=now)
        if note is not None:
            await note(conn, added)
    moved = await rewrap_remaining(engine, root_key)
    return Rotation(added.id, dict(moved))


async def rewrap_remaining(engine: AsyncEngine, root_key: bytes) -> Counter[str]:
    """Re-wrap, a batch per transaction, every data key the current key does not
    wrap yet; return the counts by previous key id."""
    total: Counter[str] = Counter()
    while True:
        async with engine.begin() as conn:
            # Loaded per batch: a rotation running at the same time makes
            # a newer key current, and both then move everything to it.
            moved = await rewrap_all(conn, await load_ring(conn, root_key))
        if not moved:
            return total
        total.update(moved)


async def _rewrap_own_keys(
    conn: AsyncConnection, ring: KeyRing, table: sa.Table, purpose: str
) -> Counter[str]:
    """A batch of :func:`rewrap_all` for labels or references; the sealed
    values stay as they are."""
    moved: Counter[str] = Counter()
    rows = (
        await conn.execute(
            sa.select(table.c.consult_id, table.c.key_id, table.c.wrapped_key)
            .where(sa.or_(table.c.key_id.is_(None), table.c.key_id != ring.current.id))
            .order_by(table.c.consult_id)
            .limit(REWRAP_BATCH)
        )
    ).all()
    for row in rows:
        previous = row.key_id or ring.root_id
        bound = str(row.consult_id)
        try:
            data_key = unseal(ring.get(previous).key, purpose, row.wrapped_key, bound_to=bound)
        except SealError as err:
            raise SealError(
                f"a {purpose} in {table.name} does not open with master key {previous}: {err}"
            ) from None
        same = table.c.key_id.is_(None) if row.key_id is None else table.c.key_id == row.key_id
        await conn.execute(
            table.update()
            .where(table.c.consult_id == row.consult_id, same)
            .where(table.c.wrapped_key == row.wrapped_key)
            .values(
                key_id=ring.current.id,
                wrapped_key=seal(ring.current.key, purpose, data_key, bound_to=bound),
            )
        )
        moved[previous] += 1
    return moved


async def key_usage(conn: AsyncConnection, root_id: str) -> dict[str, int]:
    """How many data keys each master key wraps now: recordings', labels' and
    appointment references' (those with no key id under ``root_id``)."""
    usage: Counter[str] = Counter()
    rows = await conn.execute(
        sa.select(recordings.c.key_id, sa.func.count()).group_by(recordings.c.key_id)
    )
    usage.update({key_id: count for key_id, count in rows})
    for table, _purpose in _OWN_KEY_TABLES:
        rows = await conn.execute(
            sa.select(table.c.key_id, sa.func.count()).group_by(table.c.key_id)
        )
        for key_id, count in rows:
            usage[key_id or root_id] += count
    return dict(usage)


async def retire(conn: AsyncConnection, root_key: bytes, key_id: str) -> None:
    """Delete ring key ``key_id``; refused for the root, the current key, or a
    key that still wraps data keys (run a rotation first)."""
    ring = await load_ring(conn, root_key)
    if key_id == ring.root_id:
        raise Conflict(
            f"{key_id} is the configured root key; it seals the ring and cannot be retired"
        )
    if key_id not in ring.keys:
        raise NotFound(f"no master key {key_id} in the ring")
    if key_id == ring.current.id:
        raise Conflict(f"{key_id} is the current master key; rotate first")
    still = (await key_usage(conn, ring.root_id)).get(key_id, 0)
    if still:
        raise Conflict(
            f"master key {key_id} still wraps {still} data keys; "
            "run 'videoconsult keys rotate' first"
        )
    await conn.execute(master_keys.delete().where(master_keys.c.id == key_id))
