"""The access log: who looked at or changed what, when, and with what outcome.

One access record per read of personal data and per administrative change,
with the fields NEN 7513 asks for; whoever reads or changes something names
its :class:`Actor` and calls :func:`record_access` in the same transaction.
(Not the server's request log, a process-log line per HTTP request with no
personal data and no chain.)

Records are only ever appended, and they form a hash chain: each record
holds the hash of the one before it (``prev_hash``) and its own hash over a
canonical encoding of its fields and ``prev_hash``. Changing, deleting,
inserting or reordering a record breaks the chain at that point;
:func:`verify_chain` finds the first break.

Appends are serialized, so that two appending at once never chain to the
same predecessor: on PostgreSQL by a transaction-level advisory lock (also
across server nodes), on SQLite by its single writer (every transaction
begins IMMEDIATE, see ``audit/db.py``).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.chain_heads import GENESIS_HASH as GENESIS_HASH  # where chains start, for callers
from audit.chain_heads import chain_heads, chain_start, lock_chains
from audit.chain_walk import WalkResult, canonical_text, walk_rows
from audit.chain_workers import SPLIT_OVER, Start, WalkPlan, walk_in_workers, walk_location
from audit.db import reading
from audit.pace import rest_after
from audit.schema import access_log, access_log_checkpoints

if TYPE_CHECKING:
    from audit.accounts import Account


class Outcome(enum.Enum):
    ALLOWED = "allowed"
    REFUSED = "refused"


class ClientType(enum.Enum):
    # The JSON API (a browser page or another HTTP client).
    API = "api"
    # The videoconsult command line, run by the operator.
    CLI = "cli"
    # The signaling WebSocket.
    WEBSOCKET = "websocket"
    # A webhook's message to a practice's record system (the server sent it).
    WEBHOOK = "webhook"


# The actor role of changes made at the command line.
OPERATOR = "operator"
# The actor role of what the server does by itself (the retention purge, webhooks).
SYSTEM = "system"


@dataclass(frozen=True)
class AccessRecord:
    at: datetime
    organisation_id: uuid.UUID | None
    # None for the command line run by the operator, or an unauthenticated caller.
    actor_id: uuid.UUID | None
    actor_role: str
    # A dotted verb, e.g. "account.disable".
    action: str
    object_type: str
    # A pseudonymous id (a UUID), never a name or an address.
    object_id: str | None
    outcome: Outcome
    client_type: ClientType
    # Set on records read back from the log.
    seq: int | None = None
    hash: str | None = None


@dataclass(frozen=True)
class Actor:
    """Who reads or changes something: a professional, or the operator at the command line."""

    account_id: uuid.UUID | None
    role: str
    client_type: ClientType

    @classmethod
    def operator(cls) -> Actor:
        return cls(None, OPERATOR, ClientType.CLI)

    @classmethod
    def api(cls, account: Account) -> Actor:
        """A logged-in professional acting through the HTTP API."""
        return cls(account.id, account.role.value, ClientType.API)


async def record_access(
    conn: AsyncConnection,
    actor: Actor,
    *,
    organisation_id: uuid.UUID | None,
    action: str,
    object_type: str,
    object_id: uuid.UUID | str | None,
    now: datetime,
    outcome: Outcome = Outcome.ALLOWED,
) -> None:
    """Append ``actor``'s access record to the organisation's chain (see :func:`append_access`).

    Must run inside the caller's transaction, the one that makes the change
    or the read: no change without its record, no record without its change.
    (A read may instead be recorded through the group-commit writer,
    :class:`audit.access_writer.AccessLogWriter`, before it is answered.)
    """
    await append_access(
        conn,
        access_record(
            actor,
            organisation_id=organisation_id,
            action=action,
            object_type=object_type,
            object_id=object_id,
            now=now,
            outcome=outcome,
        ),
    )


def access_record(
    actor: Actor,
    *,
    organisation_id: uuid.UUID | None,
    action: str,
    object_type: str,
    object_id: uuid.UUID | str | None,
    now: datetime,
    outcome: Outcome = Outcome.ALLOWED,
) -> AccessRecord:
    """The record of ``actor``'s access, to append."""
    return AccessRecord(
        at=now,
        organisation_id=organisation_id,
        actor_id=actor.account_id,
        actor_role=actor.role,
        action=action,
        object_type=object_type,
        object_id=str(object_id) if object_id else None,
        outcome=outcome,
        client_type=actor.client_type,
    )


# The chain of records that belong to no organisation (the operator's).
INSTALLATION_CHAIN = "installation"


def record_hash(fields: dict[str, object], prev_hash: str) -> str:
    """SHA-256 over the canonical encoding of a record's fields and its predecessor's hash.

    Canonical: JSON with sorted keys, no whitespace, ASCII only; times in UTC
    with microseconds, ids as their text. The record's position (``seq``) is
    not part of it: the chain itself fixes the order.
    """
    canonical = json.dumps(
        {**fields, "prev_hash": prev_hash}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _canonical_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_fields(
    *,
    at: datetime,
    organisation_id: uuid.UUID | None,
    actor_id: uuid.UUID | None,
    actor_role: str,
    action: str,
    object_type: str,
    object_id: str | None,
    outcome: str,
    client_type: str,
) -> dict[str, object]:
    return {
        "at": _canonical_time(at),
        "organisation_id": str(organisation_id) if organisation_id else None,
        "actor_id": str(actor_id) if actor_id else None,
        "actor_role": actor_role,
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "outcome": outcome,
        "client_type": client_type,
    }


def chain_of(organisation_id: uuid.UUID | None) -> str:
    """The chain a record belongs to: its organisation's, or the installation's."""
    return str(organisation_id) if organisation_id is not None else INSTALLATION_CHAIN


async def append_access(conn: AsyncConnection, record: AccessRecord) -> None:
    """Append one record to its chain. There is no update or delete counterpart, on purpose.

    Must run inside the caller's transaction (``engine.begin()``): the lock
    and the link to the chain's last record hold until it commits.
    """
    await append_records(conn, [record])


async def append_records(
    conn: AsyncConnection, records: Sequence[AccessRecord], *, wait: bool = True
) -> set[str]:
    """Append records in their order, each to its chain, in the caller's
    transaction; return the chains left out (none when waiting).

    The chains' locks are taken in one order (sorted by name) on every node,
    so that two batches of several chains never deadlock. With ``wait``
    false (PostgreSQL), a chain whose lock another transaction holds is left
    out at once, its records not written, and the others are; on SQLite
    there is one writer, and its lock is waited for as always.
    """
    by_chain: dict[str, list[AccessRecord]] = {}
    for record in records:
        by_chain.setdefault(chain_of(record.organisation_id), []).append(record)
    names = sorted(by_chain)
    held = await lock_chains(conn, names, wait=wait)
    names = [name for name in names if name not in held]
    if not names:
        return held
    rows: list[dict[str, object]] = []
    heads = await chain_heads(conn, names)
    for chain in names:
        seq, prev_hash = heads[chain]
        for record in by_chain[chain]:
            own_hash = _record_hash_fast(record, prev_hash)
            rows.append(
                {
                    "at": record.at,
                    "organisation_id": record.organisation_id,
                    "actor_id": record.actor_id,
                    "actor_role": record.actor_role,
                    "action": record.action,
                    "object_type": record.object_type,
                    "object_id": record.object_id,
                    "outcome": record.outcome.value,
                    "client_type": record.client_type.value,
                    "chain": chain,
                    "seq": seq,
                    "prev_hash": prev_hash,
                    "hash": own_hash,
                }
            )
            seq, prev_hash = seq + 1, own_hash
    await conn.execute(access_log.insert(), rows)
    return held


def _record_hash_fast(record: AccessRecord, prev_hash: str) -> str:
    """:func:`record_hash` of a new record, through the walk's faster encoding."""
    text = canonical_text(
        (
            None,
            _canonical_time(record.at),
            str(record.organisation_id) if record.organisation_id else None,
            str(record.actor_id) if record.actor_id else None,
            record.actor_role,
            record.action,
            record.object_type,
            record.object_id,
            record.outcome.value,
            record.client_type.value,
            prev_hash,
        )
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


class Break(enum.Enum):
    # The record's contents do not match its own hash.
    MODIFIED = "modified"
    # Records are missing before this one.
    DELETED = "deleted"
    # Records before this one do not belong to the chain.
    INSERTED = "inserted"
    # This record follows one that comes later in the log.
    REORDERED = "reordered"


@dataclass(frozen=True)
class ChainBreak:
    chain: str
    seq: int
    kind: Break
    detail: str


@dataclass(frozen=True)
class ChainReport:
    # Records verified (in every chain walked, up to the first break).
    records: int
    chains: int
    broken: ChainBreak | None

    @property
    def intact(self) -> bool:
        return self.broken is None


# Verification reads from a connection (in the caller's transaction, on the
# event loop), or from an engine: then a worker process walks the chains with
# the driver's own rows (audit/chain_walk.py), each batch in a short read
# transaction, so that a long walk never holds the loop nor SQLite's lock.
Source = AsyncConnection | AsyncEngine


@asynccontextmanager
async def _reading(source: Source) -> AsyncIterator[AsyncConnection]:
    if isinstance(source, AsyncEngine):
        # A read (audit.db.reading): on SQLite no BEGIN IMMEDIATE, whose
        # write lock would stop every append while the chains' starts are read.
        async with reading(source) as conn:
            yield conn
    else:
        yield source


async def chains(source: Source) -> list[str]:
    async with _reading(source) as conn:
        found = await conn.execute(
            sa.select(access_log.c.chain)
            .distinct()
            .union(sa.select(access_log_checkpoints.c.chain).distinct())
        )
        return sorted(found.scalars())


async def verify_chain(
    source: Source,
    *,
    chain: str | None = None,
    batch: int = 10_000,
    split_over: int | None = None,
    share: float = 1.0,
    peers: str | None = None,
) -> ChainReport:
    """Walk one chain (or every chain) from its start; report the first broken link.

    Pass the engine for a long walk: it runs in worker processes, never on
    the event loop (:data:`Source`); a chain longer than ``split_over`` in
    parts side by side, unless ``share`` is below 1 (busy at most that share
    of the time, with the paced jobs registered in ``peers``: pace.py)."""
    rest_after(0.0, share)  # refused here, not in the worker
    names = [chain] if chain is not None else await chains(source)
    starts: list[Start] = []
    async with _reading(source) as conn:
        for walked, name in enumerate(names, start=1):
            start = await _start_of(conn, name)
            if isinstance(start, ChainBreak):
                return ChainReport(0, walked, start)
            starts.append(start)
    plan = WalkPlan(batch, SPLIT_OVER if split_over is None else split_over, share, peers)
    walk = functools.partial(_walk, source, plan=plan)
    # The walks stop at the first break: a prefix of the chains' results.
    results = await walk(starts)
    total = 0
    for walked, start in enumerate(starts, start=1):
        if len(results) < walked:
            # The break that stopped the walks was a purge's (walked again
            # below, clean): the chains after it are walked now.
            results += await walk(starts[walked - 1 :])
        result = results[walked - 1]
        while result.problem is not None:
            # A retention purge that committed after the walk read where the
            # chain starts (a new checkpoint, the records before it deleted)
            # is no tampering: the chain is walked again from its new start,
            # which must hold as the first did. A purge in steps moves it once
            # a step; it only ever moves on, so this ends with the purge.
            async with _reading(source) as conn:
                moved = await _start_of(conn, start[0])
            if isinstance(moved, ChainBreak):
                return ChainReport(total, walked, moved)
            if moved[1] <= start[1]:
                break  # not moved on: the problem is the chain's
            start = moved
            (result,) = await walk([start])
        total += result.records
        if result.problem is not None:
            async with _reading(source) as conn:
                broken = await _explain(conn, start[0], result)
            return ChainReport(total, walked, broken)
    return ChainReport(total, len(starts), None)


async def _start_of(conn: AsyncConnection, chain: str) -> tuple[str, int, str] | ChainBreak:
    """Where the walk of ``chain`` starts (:func:`chain_start`), or the break
    when its checkpoint is not accounted for by the purge record that a
    retention purge chains after the records it removed."""
    seq, prev_hash = await chain_start(conn, chain)
    if seq > 1 and not await _purge_recorded(conn, chain, seq - 1):
        detail = (
            f"records up to {seq - 1} are missing: a checkpoint says retention purged "
            "them, but no purge record in the chain says so"
        )
        return ChainBreak(chain, seq, Break.DELETED, detail)
    return chain, seq, prev_hash


# The chained record a retention purge writes after the records it removed
# (its object: "through <seq>").
PURGE_ACTION = "access_log.purge"


async def _walk(source: Source, starts: list[Start], *, plan: WalkPlan) -> list[WalkResult]:
    """Each chain walked from its start: in worker processes for an engine
    (:func:`walk_location`), else on the connection."""
    location = walk_location(source)
    if location is None:
        return [await _walk_on_connection(source, *start, plan.batch) for start in starts]
    assert isinstance(source, AsyncEngine)
    return await walk_in_workers(source, location, starts, plan)


async def _purge_recorded(conn: AsyncConnection, chain: str, through_seq: int) -> bool:
    """Whether the chain holds the purge record of its records up to
    ``through_seq`` (:func:`audit.retention.purge` writes it after them)."""
    found = await conn.scalar(
        sa.select(access_log.c.seq)
        .where(
            access_log.c.object_id == f"through {through_seq}",
            access_log.c.chain == chain,
            access_log.c.action == PURGE_ACTION,
            access_log.c.seq > through_seq,
        )
        .limit(1)
    )
    return found is not None


async def _walk_on_connection(
    source: Source, chain: str, expected_seq: int, prev_hash: str, batch: int
) -> WalkResult:
    """The walk on the event loop, through SQLAlchemy (a connection in a transaction)."""
    count, after = 0, expected_seq - 1
    while True:
        async with _reading(source) as conn:
            rows = (
                await conn.execute(
                    sa.select(*_WALK_COLUMNS)
                    .where(access_log.c.chain == chain, access_log.c.seq > after)
                    .order_by(access_log.c.seq)
                    .limit(batch)
                )
            ).all()
        result = walk_rows([_canonical_row(tuple(row)) for row in rows], expected_seq, prev_hash)
        count += result.records
        if result.problem is not None or len(rows) < batch:
            return replace(result, records=count)
        expected_seq, prev_hash, after = result.next_seq, result.last_hash, rows[-1].seq
        # Let the event loop serve requests in the middle of a long walk.
        await asyncio.sleep(0)


_WALK_COLUMNS = (
    access_log.c.seq,
    access_log.c.at,
    access_log.c.organisation_id,
    access_log.c.actor_id,
    access_log.c.actor_role,
    access_log.c.action,
    access_log.c.object_type,
    access_log.c.object_id,
    access_log.c.outcome,
    access_log.c.client_type,
    access_log.c.prev_hash,
    access_log.c.hash,
)


def _canonical_row(row: tuple[Any, ...]) -> tuple[object, ...]:
    seq, at, org, actor, *rest = row
    return (
        seq,
        _canonical_time(at),
        str(org) if org else None,
        str(actor) if actor else None,
        *rest,
    )


async def _explain(conn: AsyncConnection, chain: str, result: WalkResult) -> ChainBreak:
    if result.problem == "modified":
        detail = "its contents do not match its hash (changed after it was written)"
        return ChainBreak(chain, result.seq, Break.MODIFIED, detail)
    if result.problem == "deleted":
        detail = f"records {result.next_seq} to {result.seq - 1} are missing"
        return ChainBreak(chain, result.seq, Break.DELETED, detail)
    return await _explain_link(conn, chain, result.seq, result.next_seq, result.points_to)


async def _explain_link(
    conn: AsyncConnection, chain: str, seq: int, expected_seq: int, points_to: str
) -> ChainBreak:
    """A record whose predecessor is not the record before it: say what happened."""
    target = await conn.scalar(
        sa.select(access_log.c.seq).where(
            access_log.c.chain == chain, access_log.c.hash == points_to
        )
    )
    if target is not None and target > seq:
        return ChainBreak(
            chain,
            seq,
            Break.REORDERED,
            f"it was written after record {target}, which now follows it",
        )
    if target is not None:
        return ChainBreak(
            chain,
            seq,
            Break.INSERTED,
            f"it was written right after record {target}; the records between do not belong",
        )
    if seq != expected_seq or points_to == GENESIS_HASH:
        missing = f"records {expected_seq} to {seq - 1}" if seq != expected_seq else "records"
        return ChainBreak(
            chain, seq, Break.DELETED, f"the record it follows is gone ({missing} missing)"
        )
    return ChainBreak(
        chain, seq, Break.INSERTED, "it follows a record that was never in the log (inserted)"
    )


async def read_access_log(
    conn: AsyncConnection,
    organisation_id: uuid.UUID,
    *,
    limit: int = 100,
    before_seq: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    actor_id: uuid.UUID | None = None,
    action: str | None = None,
    object_id: str | None = None,
) -> list[AccessRecord]:
    """Return an organisation's records, newest first (older than ``before_seq``, if given).

    The filters narrow it: written at or after ``since`` and before ``until``,
    by ``actor_id``, of ``action`` (or an action under it: "account" takes
    "account.create"), on ``object_id``.
    """
    query = sa.select(access_log).where(access_log.c.chain == chain_of(organisation_id))
    if before_seq is not None:
        query = query.where(access_log.c.seq < before_seq)
    if since is not None:
        query = query.where(access_log.c.at >= since)
    if until is not None:
        query = query.where(access_log.c.at < until)
    if actor_id is not None:
        query = query.where(access_log.c.actor_id == actor_id)
    if action is not None:
        query = query.where(
            (access_log.c.action == action)
            | access_log.c.action.startswith(f"{action}.", autoescape=True)
        )
    if object_id is not None:
        query = query.where(access_log.c.object_id == object_id)
    rows = await conn.execute(query.order_by(access_log.c.seq.desc()).limit(limit))
    return [stored_record(row) for row in rows]


def stored_record(row: sa.Row[Any]) -> AccessRecord:
    """An access record as read back from a row of ``access_log``."""
    return AccessRecord(
        at=row.at,
        organisation_id=row.organisation_id,
        actor_id=row.actor_id,
        actor_role=row.actor_role,
        action=row.action,
        object_type=row.object_type,
        object_id=row.object_id,
        outcome=Outcome(row.outcome),
        client_type=ClientType(row.client_type),
        seq=row.seq,
        hash=row.hash,
    )
