"""Walking an access-log chain fast, in a worker process, from raw driver rows.

The pure part of :func:`audit.access_log.verify_chain`: it imports neither
SQLAlchemy nor aiohttp, so that a worker process starts quickly, and reads
the rows with the database's own driver (``sqlite3``; ``asyncpg`` on a loop
of the worker's own), because SQLAlchemy's conversion of each value (time
text to ``datetime``, UUID hex to ``UUID``) cost a third of a walk.

The worker is this file run as a script (``python -P chain_walk.py``): the
chains to walk as JSON on its standard input, the results as JSON on its
standard output. Not multiprocessing: that would run the parent's main
module again in the worker, and pickle the database password into it;
this file imports only the standard library and asyncpg, so it starts in a
few tens of milliseconds.

Each batch of a chain is read in a short read transaction of its own: a walk
never holds SQLite's lock for long, and appends go on meanwhile.

The canonical encoding here must give the very text of
:func:`audit.access_log.record_hash` (JSON, sorted keys, no whitespace,
ASCII only) for every stored record; ``tests/test_chain_walk.py`` checks
that it does, odd characters included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
import uuid
from collections.abc import Generator, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

# The record's fields and ``prev_hash`` in sorted key order, as json.dumps
# with sort_keys=True writes them.
_CANONICAL = (
    '{"action":%s,"actor_id":%s,"actor_role":%s,"at":%s,"client_type":%s,'
    '"object_id":%s,"object_type":%s,"organisation_id":%s,"outcome":%s,"prev_hash":%s}'
)

# A row as the walk reads it: seq, at (canonical text), organisation_id,
# actor_id (canonical UUID text or None), actor_role, action, object_type,
# object_id, outcome, client_type, prev_hash, hash.
Row = tuple[Any, ...]


def _json(value: str | None) -> str:
    return "null" if value is None else str(encode_basestring_ascii(value))


def canonical_text(row: Row) -> str:
    """The canonical encoding of a row's fields and its ``prev_hash`` (see module docstring)."""
    _seq, at, org, actor, role, action, object_type, object_id, outcome, client, prev = row[:11]
    return _CANONICAL % (
        _json(action),
        _json(actor),
        _json(role),
        _json(at),
        _json(client),
        _json(object_id),
        _json(object_type),
        _json(org),
        _json(outcome),
        _json(prev),
    )


@dataclass(frozen=True)
class WalkSpec:
    """What one walk reads: a chain from ``start_seq`` on, the predecessor's hash given."""

    backend: str  # "sqlite" or "postgresql"
    # The SQLite file, or a libpq-style URL for asyncpg.
    location: str
    chain: str
    start_seq: int
    start_hash: str
    batch: int
    timeout_s: float = 30.0


@dataclass(frozen=True)
class WalkResult:
    """How far a walk got, and the first problem it met (``problem`` None: intact)."""

    records: int
    # Where the walk would go on: the next seq expected, and its predecessor's hash.
    next_seq: int
    last_hash: str
    # "modified", "deleted" (a gap in seq) or "link" (prev_hash is not the
    # hash of the record before: the caller finds out which record it names).
    problem: str | None = None
    seq: int = 0
    points_to: str = ""


def walk_rows(rows: Iterable[Row], expected_seq: int, prev_hash: str) -> WalkResult:
    """Check each row's own hash and its link to the one before; stop at the first break."""
    sha256 = hashlib.sha256
    canonical = canonical_text
    count = 0
    for row in rows:
        seq = row[0]
        if sha256(canonical(row).encode("ascii")).hexdigest() != row[11]:
            return WalkResult(count, expected_seq, prev_hash, "modified", seq)
        if row[10] != prev_hash:
            return WalkResult(count, expected_seq, prev_hash, "link", seq, row[10])
        if seq != expected_seq:
            return WalkResult(count, expected_seq, prev_hash, "deleted", seq)
        prev_hash, expected_seq, count = row[11], seq + 1, count + 1
    return WalkResult(count, expected_seq, prev_hash)


def walk(specs: list[WalkSpec]) -> list[WalkResult]:
    """Read and check chains one after another, up to the first break."""
    results = []
    for spec in specs:
        rows = _sqlite_rows(spec) if spec.backend == "sqlite" else _postgres_rows(spec)
        try:
            result = walk_rows(rows, spec.start_seq, spec.start_hash)
        finally:
            rows.close()  # its connection, now, also when the walk stopped early
        results.append(result)
        if result.problem is not None:
            break
    return results


# --------------------------------------------------------------------------
# SQLite: the values as stored by SQLAlchemy (times as UTC text without an
# offset, UUIDs as 32 hex digits), made canonical here.
# --------------------------------------------------------------------------

_SQLITE_QUERY = (
    "SELECT seq, at, organisation_id, actor_id, actor_role, action, object_type,"
    " object_id, outcome, client_type, prev_hash, hash FROM access_log"
    " WHERE chain = ? AND seq > ? ORDER BY seq LIMIT ?"
)


def _sqlite_rows(spec: WalkSpec) -> Generator[Row]:
    conn = sqlite3.connect(
        f"file:{spec.location}?mode=ro", uri=True, timeout=spec.timeout_s, isolation_level=None
    )
    try:
        after = spec.start_seq - 1
        while True:
            # One SELECT, one short implicit read transaction.
            batch = conn.execute(_SQLITE_QUERY, (spec.chain, after, spec.batch)).fetchall()
            for raw in batch:
                yield _sqlite_canonical(raw)
            if len(batch) < spec.batch:
                return
            after = batch[-1][0]
    finally:
        conn.close()


def _sqlite_canonical(raw: Row) -> Row:
    return (
        raw[0],
        _sqlite_time(raw[1]),
        _sqlite_uuid(raw[2]),
        _sqlite_uuid(raw[3]),
        *raw[4:],
    )


def _sqlite_time(stored: object) -> object:
    # SQLAlchemy writes "YYYY-MM-DD HH:MM:SS.ffffff" (UTC); anything else is
    # parsed as SQLAlchemy would read it back.
    if isinstance(stored, str) and len(stored) == 26 and stored[10] == " ":
        return f"{stored[:10]}T{stored[11:]}+00:00"
    if isinstance(stored, str):
        try:
            moment = datetime.fromisoformat(stored)
        except ValueError:
            return stored  # unreadable: the record's hash will not match
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
        return moment.astimezone(UTC).isoformat(timespec="microseconds")
    return stored


def _sqlite_uuid(stored: object) -> object:
    if stored is None or not isinstance(stored, str):
        return stored
    if len(stored) == 32 and stored == stored.lower():
        return f"{stored[:8]}-{stored[8:12]}-{stored[12:16]}-{stored[16:20]}-{stored[20:]}"
    try:
        return str(uuid.UUID(stored))
    except ValueError:
        return stored


# --------------------------------------------------------------------------
# PostgreSQL: the server makes the values canonical text (it runs on another
# core), in one REPEATABLE READ snapshot read through a cursor.
# --------------------------------------------------------------------------

_POSTGRES_QUERY = (
    "SELECT seq,"
    " to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'),"
    " organisation_id::text, actor_id::text, actor_role, action, object_type,"
    " object_id, outcome, client_type, prev_hash, hash FROM access_log"
    " WHERE chain = $1 AND seq >= $2 ORDER BY seq"
)


def _postgres_rows(spec: WalkSpec) -> Generator[Row]:
    # A loop of this worker's own: the rows come in batches, and the hashing
    # of one batch runs while the next is on its way would need threads; a
    # batch of 10,000 takes a few ms to fetch, so plain alternation it is.
    loop = asyncio.new_event_loop()
    try:
        # Imported here: only the worker needs it.
        import asyncpg

        conn = loop.run_until_complete(asyncpg.connect(spec.location, timeout=spec.timeout_s))
        try:
            transaction = conn.transaction(isolation="repeatable_read", readonly=True)
            loop.run_until_complete(transaction.start())
            cursor = loop.run_until_complete(
                conn.cursor(_POSTGRES_QUERY, spec.chain, spec.start_seq)
            )
            while True:
                batch = loop.run_until_complete(cursor.fetch(spec.batch))
                yield from (tuple(record) for record in batch)
                if len(batch) < spec.batch:
                    break
            loop.run_until_complete(transaction.rollback())
        finally:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()


def main() -> None:
    """The worker: chains to walk (a JSON list of :class:`WalkSpec`) on stdin,
    their results (a JSON list of :class:`WalkResult`) on stdout."""
    specs = [WalkSpec(**spec) for spec in json.load(sys.stdin)]
    json.dump([asdict(result) for result in walk(specs)], sys.stdout)


if __name__ == "__main__":
    main()
