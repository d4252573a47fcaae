"""Where access-log chains continue, and their locks (PostgreSQL: advisory
locks per chain, taken in one order on every node).

Used by :func:`audit.access_log.append_records` and the chain's verify. On
PostgreSQL the group-commit writer locks and finds the heads of any number
of chains with one statement of one shape each (the chains as an array):
built once, nothing per batch (building a statement per chain cost a
quarter of the writer's CPU; docs/benchmarks.md, "Access log").
"""

from __future__ import annotations

import functools
import hashlib

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.schema import access_log, access_log_checkpoints

# The predecessor of the first record of a chain.
GENESIS_HASH = "0" * 64


@functools.lru_cache(maxsize=4096)
def lock_key(chain: str) -> int:
    """A signed 64-bit advisory-lock key per chain."""
    digest = hashlib.sha256(f"videoconsult-access-log:{chain}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def lock_chains(conn: AsyncConnection, names: list[str], *, wait: bool) -> set[str]:
    """Lock the chains, in this order, for the transaction; return those held
    by another transaction (only without ``wait``; on SQLite, none: its one
    writer is the lock)."""
    if conn.dialect.name != "postgresql":
        return set()
    if not wait:
        # One statement of one shape for any number of chains (an array of
        # keys): nothing built per batch. Trying never waits, so the order
        # does not matter here.
        # Two chains whose keys collide share the lock, and its answer.
        by_key: dict[int, list[str]] = {}
        for name in names:
            by_key.setdefault(lock_key(name), []).append(name)
        got = await conn.execute(_TRY_LOCKS, {"keys": list(by_key)})
        return {name for key, locked in got if not locked for name in by_key[key]}
    # The select list is evaluated left to right: the locks in this order.
    await conn.execute(
        sa.select(*(sa.func.pg_advisory_xact_lock(lock_key(name)) for name in names))
    )
    return set()


async def chain_heads(conn: AsyncConnection, names: list[str]) -> dict[str, tuple[int, str]]:
    """Where each (locked) chain continues: its next seq and the hash it
    chains to. One statement for any number of chains: a batch of records of
    many organisations costs no more round trips than one (on PostgreSQL one
    statement of one shape, the chains as an array)."""
    if conn.dialect.name == "postgresql":
        found = (await conn.execute(_HEADS, {"names": names})).all()
    else:
        last_of_each = [
            sa.select(access_log.c.chain, access_log.c.seq, access_log.c.hash)
            .where(access_log.c.chain == name)
            .order_by(access_log.c.seq.desc())
            .limit(1)
            .subquery()
            for name in names
        ]
        found = (
            await conn.execute(sa.union_all(*(sa.select(last) for last in last_of_each)))
        ).all()
    heads = {chain: (seq + 1, last_hash) for chain, seq, last_hash in found}
    for name in names:
        if name not in heads:
            # No record: where it starts, a checkpoint's query alone.
            heads[name] = await chain_start(conn, name, empty=True)
    return heads


# PostgreSQL: each chain's last record, for an array of chains.
_HEAD_NAMES = (
    sa.func.unnest(sa.bindparam("names", type_=postgresql.ARRAY(sa.String())))
    .table_valued(sa.column("chain", sa.String()))
    .render_derived(name="n")
)
_HEAD = (
    sa.select(access_log.c.seq, access_log.c.hash)
    .where(access_log.c.chain == _HEAD_NAMES.c.chain)
    .order_by(access_log.c.seq.desc())
    .limit(1)
    .lateral("head")
)
_HEADS = sa.select(_HEAD_NAMES.c.chain, _HEAD.c.seq, _HEAD.c.hash).select_from(
    _HEAD_NAMES.join(_HEAD, sa.true())
)
# PostgreSQL: each chain's lock tried, for an array of lock keys.
_LOCK_KEYS = (
    sa.func.unnest(sa.bindparam("keys", type_=postgresql.ARRAY(sa.BigInteger())))
    .table_valued(sa.column("key", sa.BigInteger()))
    .render_derived(name="k")
)
_TRY_LOCKS = sa.select(_LOCK_KEYS.c.key, sa.func.pg_try_advisory_xact_lock(_LOCK_KEYS.c.key))


async def chain_start(conn: AsyncConnection, chain: str, *, empty: bool = False) -> tuple[int, str]:
    """Where a chain (re)starts: after its newest checkpoint (records purged by
    retention) whose records are gone, or at the beginning.

    A purge deletes every record up to its checkpoint in the checkpoint's
    transaction; a checkpoint with records of its range still in the log is
    not a purge's (a row put in by hand), and the walk goes over those
    records instead of starting after them."""
    # "Its records are gone": the chain's lowest record is past it. So the
    # newest checkpoint below that record, in two statements however many
    # checkpoints a chain has gathered (one per purge and step).
    lowest = (
        None
        if empty  # the caller found no record of the chain, in this transaction
        else await conn.scalar(
            sa.select(sa.func.min(access_log.c.seq)).where(access_log.c.chain == chain)
        )
    )
    newest = sa.select(
        access_log_checkpoints.c.through_seq, access_log_checkpoints.c.through_hash
    ).where(access_log_checkpoints.c.chain == chain)
    if lowest is not None:
        newest = newest.where(access_log_checkpoints.c.through_seq < lowest)
    found = (
        await conn.execute(newest.order_by(access_log_checkpoints.c.through_seq.desc()).limit(1))
    ).first()
    if found is not None:
        return int(found.through_seq) + 1, str(found.through_hash)
    return 1, GENESIS_HASH
