"""The master key ring: the keys that wrap recordings' data keys.

The configured master key (``security.master_key``) is the ring's root. It
wraps data keys itself until the first rotation, and it seals every key of
the ring (``seal`` with purpose ``master-key``, bound to the key's id), which
is kept in the ``master_keys`` table. The newest ring key is the current one:
new recordings' data keys are wrapped by it.

``rotate`` adds a new ring key and re-wraps every data key under it, without
touching the files (a data key is 32 bytes; a file may be gigabytes).
``retire`` then deletes an old ring key, refused while any data key still
needs it. A retired key is gone: a copy of it (in a memory dump, say) opens
nothing that is still kept.

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

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.errors import Conflict, NotFound
from audit.schema import master_keys, recordings
from audit.sealing import SealError, derive_key, seal, unseal

RING_KEY_PURPOSE = "master-key"
DATA_KEY_PURPOSE = "recording-key"
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
    per call of the caller's transaction; see :func:`rotate`). Returns the
    counts by previous key id."""
    moved: Counter[str] = Counter()
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


async def key_usage(conn: AsyncConnection) -> dict[str, int]:
    """How many data keys each master key wraps now."""
    rows = await conn.execute(
        sa.select(recordings.c.key_id, sa.func.count()).group_by(recordings.c.key_id)
    )
    return {key_id: count for key_id, count in rows}


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
    still = (await key_usage(conn)).get(key_id, 0)
    if still:
        raise Conflict(
            f"master key {key_id} still wraps {still} data keys; "
            "run 'videoconsult keys rotate' first"
        )
    await conn.execute(master_keys.delete().where(master_keys.c.id == key_id))
