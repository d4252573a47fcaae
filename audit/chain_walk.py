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

On SQLite each batch of a chain is read in a short read transaction of its
own and every row checked here: a walk never holds SQLite's lock for long,
and appends go on meanwhile. On PostgreSQL the server checks each record's
hash itself, in one snapshot, and sends only the rows this walk must look at
(:data:`_POSTGRES_FLAGGED`); appends go on meanwhile there too. A paced walk
(``share`` below 1, audit/pace.py) rests after each batch, and on PostgreSQL
reads every row, a batch a statement, and checks it here, as on SQLite.

The canonical encoding here must give the very text of
:func:`audit.access_log.record_hash` (JSON, sorted keys, no whitespace,
ASCII only) for every stored record; ``tests/test_chain_walk.py`` checks
that it does, odd characters included.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import runpy
import sqlite3
import sys
import uuid
from collections.abc import Callable, Generator, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __name__ != "__main__":
    from audit.pace import Pace
else:
    # The worker script (``python -P``): its sibling pace.py run by its path
    # (not a module named "pace" found on sys.path), not through the package,
    # whose __init__ imports SQLAlchemy (0.8 s to start).
    Pace = runpy.run_path(str(Path(__file__).resolve().with_name("pace.py")))["Pace"]

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


def canonical_text(row: Row) -> str:
    """The canonical encoding of a row's fields and its ``prev_hash`` (see module docstring)."""
    _seq, at, org, actor, role, action, object_type, object_id, outcome, client, prev = row[:11]
    q = encode_basestring_ascii
    return _CANONICAL % (
        q(action),
        "null" if actor is None else q(actor),
        q(role),
        q(at),
        q(client),
        "null" if object_id is None else q(object_id),
        q(object_type),
        "null" if org is None else q(org),
        q(outcome),
        q(prev),
    )


def _hash_matches(row: Row, text_of: Callable[[Row], str] = canonical_text) -> bool:
    try:
        text = text_of(row)
    except TypeError:  # a value of the wrong type (written by hand): not the record's
        return False
    return bool(_sha256(text.encode("ascii")).hexdigest() == row[11])


_sha256 = hashlib.sha256


@dataclass(frozen=True)
class WalkSpec:
    """What one walk reads: a chain from ``start_seq`` on, the predecessor's hash given."""

    backend: str  # "sqlite" or "postgresql"
    # The SQLite file, or a libpq-style URL for asyncpg.
    location: str
    chain: str
    start_seq: int
    # None: a later part of a long chain, walked beside the part before it;
    # its first link is checked when the parts are joined (:func:`join`).
    start_hash: str | None
    batch: int
    # The first seq not to walk (None: to the end of the chain).
    end_seq: int | None = None
    timeout_s: float = 30.0
    # The share of the time the walk may keep busy, its database's work
    # included (audit/pace.py): below 1, it rests after each batch, and on
    # PostgreSQL the worker checks every row itself.
    share: float = 1.0
    # The directory where the machine's paced jobs share ``share`` (audit/pace.py).
    peers: str | None = None


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
    # The first row walked, for joining parts (None: there was none).
    first_seq: int | None = None
    first_prev_hash: str | None = None


def walk_rows(
    rows: Iterable[Row],
    expected_seq: int,
    prev_hash: str | None,
    text_of: Callable[[Row], str] = canonical_text,
    slow_text_of: Callable[[Row], str] | None = None,
) -> WalkResult:
    """Check each row's own hash and its link to the one before; stop at the first break.

    ``text_of`` makes a row's canonical text the fast way (the usual
    spellings); when its hash does not match, ``slow_text_of`` makes it again
    the slow way (values spelt unusually, read as SQLAlchemy would), and only
    if that does not match either is the record modified. ``prev_hash`` None
    takes the first row's link on trust (see :attr:`WalkSpec.start_hash`).
    """
    count = 0
    first_seq: int | None = None
    first_prev: str | None = None
    sha256 = _sha256
    for row in rows:
        seq = row[0]
        if first_seq is None:
            first_seq, first_prev = seq, row[10]
            prev_hash = row[10] if prev_hash is None else prev_hash
        # _hash_matches(row, text_of), inline: a million times a walk.
        try:
            intact = sha256(text_of(row).encode("ascii")).hexdigest() == row[11]
        except TypeError:  # a value of the wrong type (written by hand): not the record's
            intact = False
        if not intact and (slow_text_of is None or not _hash_matches(row, slow_text_of)):
            return WalkResult(
                count, expected_seq, str(prev_hash), "modified", seq, "", first_seq, first_prev
            )
        if row[10] != prev_hash:
            return WalkResult(
                count, expected_seq, str(prev_hash), "link", seq, row[10], first_seq, first_prev
            )
        if seq != expected_seq:
            return WalkResult(
                count, expected_seq, str(prev_hash), "deleted", seq, "", first_seq, first_prev
            )
        prev_hash, expected_seq, count = row[11], seq + 1, count + 1
    return WalkResult(count, expected_seq, str(prev_hash), None, 0, "", first_seq, first_prev)


def join(parts: list[WalkResult]) -> WalkResult:
    """One chain's result from the results of its consecutive parts."""
    joined = parts[0]
    for later in parts[1:]:
        if joined.problem is not None:
            break
        if later.first_seq is None:
            continue  # nothing in this part's range: the next one joins on
        # A break at the later part's first row: counted up to the joint.
        at_joint = replace(
            later, records=joined.records, next_seq=joined.next_seq, last_hash=joined.last_hash
        )
        if later.problem == "modified" and later.seq == later.first_seq:
            return at_joint
        if later.first_prev_hash != joined.last_hash:
            return replace(
                at_joint, problem="link", seq=later.first_seq, points_to=str(later.first_prev_hash)
            )
        if later.first_seq != joined.next_seq:
            return replace(at_joint, problem="deleted", seq=later.first_seq)
        joined = replace(later, records=joined.records + later.records)
    return joined


def walk(specs: list[WalkSpec]) -> list[WalkResult]:
    """Read and check chains (or parts) one after another, up to the first break."""
    results: list[WalkResult] = []
    share = min((spec.share for spec in specs), default=1.0)
    with Pace(share, peers=specs[0].peers if specs else None) as pace:
        for spec in specs:
            if results:
                pace.rest()  # after the chain before, not after the last
            walked = (
                _sqlite_walk(spec, pace) if spec.backend == "sqlite" else _postgres_walk(spec, pace)
            )
            results.append(walked)
            if walked.problem is not None:
                break
    return results


# --------------------------------------------------------------------------
# SQLite: the values as stored by SQLAlchemy (times as UTC text without an
# offset, UUIDs as 32 hex digits), made canonical here.
# --------------------------------------------------------------------------

# The rows as stored, made canonical in Python (:func:`_sqlite_text`): SQLite's
# own string functions did it in C, but a row's concatenations there cost
# more than the few slices here (docs/benchmarks.md, "Access log").
_SQLITE_QUERY = (
    "SELECT seq, at, organisation_id, actor_id, actor_role, action, object_type,"
    " object_id, outcome, client_type, prev_hash, hash"
    " FROM access_log WHERE chain = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)
# The highest seq there can be (SQLite's and PostgreSQL's integers are
# 64-bit): the last one a walk to the end of its chain reads.
_LAST_SEQ = 2**63 - 1


def _last_seq(spec: WalkSpec) -> int:
    """The last seq of ``spec``'s range (inclusive, so that no seq is beyond it)."""
    return _LAST_SEQ if spec.end_seq is None else spec.end_seq - 1


def _sqlite_walk(spec: WalkSpec, pace: Pace) -> WalkResult:
    batches = _sqlite_batches(spec, pace)
    try:
        # Row by row in C: no generator resumed per row.
        rows = itertools.chain.from_iterable(batches)
        return walk_rows(rows, spec.start_seq, spec.start_hash, _sqlite_text, _sqlite_slow_text)
    finally:
        batches.close()  # its connection, now, also when the walk stopped early


def _sqlite_batches(spec: WalkSpec, pace: Pace) -> Generator[list[Row]]:
    # A file URI, quoted: a '#', '?' or '%' in the data directory's path
    # would otherwise cut it short (and SQLite make an empty database).
    uri = Path(spec.location).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=spec.timeout_s, isolation_level=None)
    end = _last_seq(spec)
    try:
        after = spec.start_seq - 1
        while True:
            # One SELECT, one short implicit read transaction.
            batch = conn.execute(_SQLITE_QUERY, (spec.chain, after, end, spec.batch)).fetchall()
            yield batch
            if len(batch) < spec.batch:
                return
            after = batch[-1][0]
            pace.rest()
    finally:
        conn.close()


def _sqlite_text(raw: Row) -> str:
    """A stored row's canonical text, for the spellings SQLAlchemy writes:
    times as ``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC), UUIDs as 32 hex digits.

    Anything else comes out spelt as stored, so its hash does not match and
    :func:`_sqlite_slow_text` reads it as SQLAlchemy would. Every value is
    JSON-quoted, so a text that matches the hash decodes to the record's
    very values, whatever was stored.
    """
    at = raw[1]
    if type(at) is str and len(at) == 26 and at[10] == " ":
        at = f"{at[:10]}T{at[11:]}+00:00"
    return _looked_up_text(raw, at, _UUIDS)


def _looked_up_text(row: Row, at: Any, uuids: _Quoted) -> str:
    """:func:`canonical_text` of ``row`` with the time ``at``, the values a
    chain repeats (its organisation, the staff, the actions) quoted once and
    looked up (the UUID columns in ``uuids``)."""
    _seq, _at, org, actor, role, action, object_type, object_id, outcome, client, prev = row[:11]
    q = encode_basestring_ascii
    repeated = _REPEATED
    return _CANONICAL % (
        repeated[action],
        uuids[actor],
        repeated[role],
        q(at),
        repeated[client],
        "null" if object_id is None else q(object_id),
        repeated[object_type],
        uuids[org],
        repeated[outcome],
        q(prev),
    )


class _Quoted(dict[Any, str]):
    """Values and their canonical JSON, made on first use; at most
    :data:`_QUOTED_AT_MOST` kept (a chain of odd values forgets them), none
    longer than :data:`_QUOTED_LONGEST` (SQLite does not hold a column to
    its declared length: a million-character action written by hand is
    quoted, not kept)."""

    def __init__(self, canonical: Callable[[Any], Any]) -> None:
        super().__init__()
        self._canonical = canonical

    def __missing__(self, value: Any) -> str:
        canonical = self._canonical(value)
        quoted = "null" if canonical is None else encode_basestring_ascii(canonical)
        if len(quoted) > _QUOTED_LONGEST:
            return quoted
        if len(self) >= _QUOTED_AT_MOST:
            self.clear()
        self[value] = quoted
        return quoted


def _hyphens(stored: Any) -> Any:
    if type(stored) is str and len(stored) == 32:
        return f"{stored[:8]}-{stored[8:12]}-{stored[12:16]}-{stored[16:20]}-{stored[20:]}"
    return stored


_QUOTED_AT_MOST = 10_000
# The longest text kept (quoted; the looked-up columns are declared 64 at most).
_QUOTED_LONGEST = 200
# Texts as they are (an action, a role; PostgreSQL's UUIDs as text; None: null).
_REPEATED = _Quoted(lambda value: value)
# The UUID columns (None: JSON's null).
_UUIDS = _Quoted(_hyphens)


def _sqlite_slow_text(raw: Row) -> str:
    return canonical_text(_sqlite_canonical(raw))


def _sqlite_canonical(raw: Row) -> Row:
    return (
        raw[0],
        _sqlite_time(raw[1]),
        _sqlite_uuid(raw[2]),
        _sqlite_uuid(raw[3]),
        *raw[4:],
    )


_SQLALCHEMY_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", re.ASCII)


def _sqlite_time(stored: object) -> object:
    # SQLAlchemy writes "YYYY-MM-DD HH:MM:SS.ffffff" (UTC); anything else is
    # parsed as SQLAlchemy would read it back (26 characters may also be
    # five digits of a second and a "Z").
    if isinstance(stored, str) and _SQLALCHEMY_TIME.fullmatch(stored):
        return f"{stored[:10]}T{stored[11:]}+00:00"
    if isinstance(stored, str):
        try:
            moment = datetime.fromisoformat(stored)
            moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
            return moment.astimezone(UTC).isoformat(timespec="microseconds")
        except (ValueError, OverflowError):
            # Unreadable, or no instant in UTC (the year 1 east of UTC): the
            # record's hash will not match.
            return stored
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
# PostgreSQL: the server checks every record's hash itself, in C, on the
# cores its backends run on, and sends the walk only the rows it must look
# at (the range's first, and any whose hash, link or seq did not check out).
# --------------------------------------------------------------------------

# The query: a record's canonical text as PostgreSQL makes it, each value
# between quotes as it is, is the canonical JSON only for values of
# printable ASCII without a quote or a backslash (nothing to escape: the
# regular expression below), so a record with any other value (accents, a
# quote, a control character) is flagged (``ok`` false) and this walk makes
# its text as record_hash does; so is a record whose hash does not match.
# Times and UUIDs are the server's own canonical text (``to_char``,
# ``uuid::text``): printable ASCII always. ``prev_hash`` is left out of the
# expression (a tenth of the query's time): a row not flagged has the link
# to its predecessor, whose hash is hex, either as the server made it (not
# flagged) or as this walk checked it (flagged); the range's first row is
# always flagged. A time Python cannot hold (before the year 1, 'infinity',
# after 9999) has no canonical text: such a record is flagged, and its time
# reaches this walk as NULL (``to_char`` would drop a year's era), so it is
# a change. The regular expression is an E'' literal: its backslashes are
# the pattern's, whatever ``standard_conforming_strings`` says.
_POSTGRES_FLAGGED = """
SELECT seq,
    CASE WHEN at >= '0001-01-01 00:00:00+00' AND at < '10000-01-01 00:00:00+00'
        THEN to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') END,
    organisation_id::text, actor_id::text, actor_role, action, object_type,
    object_id, outcome, client_type, prev_hash, hash, ok, lag_seq, lag_hash
FROM (
    SELECT seq, at, organisation_id, actor_id, actor_role, action, object_type,
        object_id, outcome, client_type, prev_hash, hash,
        lag(seq) OVER in_order AS lag_seq, lag(hash) OVER in_order AS lag_hash,
        at >= '0001-01-01 00:00:00+00' AND at < '10000-01-01 00:00:00+00'
        AND concat(action, actor_role, client_type, object_id, object_type, outcome)
            !~ E'[^ !#-\\\\[\\\\]-~]'
        AND encode(sha256(convert_to(concat(
            '{"action":"', action,
            '","actor_id":', coalesce('"' || actor_id || '"', 'null'),
            ',"actor_role":"', actor_role,
            '","at":"', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
            '","client_type":"', client_type,
            '","object_id":', coalesce('"' || object_id || '"', 'null'),
            ',"object_type":"', object_type,
            '","organisation_id":', coalesce('"' || organisation_id || '"', 'null'),
            ',"outcome":"', outcome,
            '","prev_hash":"', prev_hash, '"}'
        ), 'UTF8')), 'hex') = hash AS ok
    FROM access_log WHERE chain = $1 AND seq >= $2 AND seq <= $3
    WINDOW in_order AS (ORDER BY seq)
) AS walked
WHERE ok IS NOT TRUE OR lag_seq IS NULL OR prev_hash <> lag_hash OR seq <> lag_seq + 1
ORDER BY seq
"""
# A paced walk's rows, ``batch`` at a time, each checked by the worker: the
# columns of :data:`_POSTGRES_FLAGGED` without the server's checks.
_POSTGRES_ROWS = """
SELECT seq,
    CASE WHEN at >= '0001-01-01 00:00:00+00' AND at < '10000-01-01 00:00:00+00'
        THEN to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') END,
    organisation_id::text, actor_id::text, actor_role, action, object_type,
    object_id, outcome, client_type, prev_hash, hash
FROM access_log WHERE chain = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4
"""
_POSTGRES_LAST = (
    "SELECT seq, hash FROM access_log WHERE chain = $1 AND seq >= $2 AND seq <= $3"
    " ORDER BY seq DESC LIMIT 1"
)


def _postgres_walk(spec: WalkSpec, pace: Pace) -> WalkResult:
    """The walk of one range on PostgreSQL, in one REPEATABLE READ snapshot:
    the flagged rows (:data:`_POSTGRES_FLAGGED`) checked here, one by one,
    as :func:`walk_rows` checks every row; the rows between them the server
    found whole, linked and in sequence. Paced (``share`` below 1), every
    row is read and checked here instead (:func:`_postgres_rows_walk`)."""
    # A loop of this worker's own, for asyncpg.
    loop = asyncio.new_event_loop()
    try:
        # Imported here: only the worker needs it.
        import asyncpg

        conn = loop.run_until_complete(asyncpg.connect(spec.location, timeout=spec.timeout_s))
        try:
            if pace.share < 1:
                # Each batch a statement of its own, as on SQLite: no snapshot
                # held, nor a transaction left idle, through minutes of rests.
                return _postgres_rows_walk(loop, conn, spec, pace)
            transaction = conn.transaction(isolation="repeatable_read", readonly=True)
            loop.run_until_complete(transaction.start())
            result = _postgres_flagged_walk(loop, conn, spec)
            loop.run_until_complete(transaction.rollback())
            return result
        finally:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()


def _postgres_flagged_walk(
    loop: asyncio.AbstractEventLoop, conn: Any, spec: WalkSpec
) -> WalkResult:
    """The server checks every record; the walk looks at those it flags."""
    bounds = (spec.chain, spec.start_seq, _last_seq(spec))
    cursor = loop.run_until_complete(conn.cursor(_POSTGRES_FLAGGED, *bounds))

    def flagged() -> Generator[Row]:
        while True:
            batch = loop.run_until_complete(cursor.fetch(spec.batch))
            yield from batch
            if len(batch) < spec.batch:
                return

    result = walk_flagged(flagged(), spec.start_seq, spec.start_hash)
    if result.problem is None:
        last = loop.run_until_complete(conn.fetchrow(_POSTGRES_LAST, *bounds))
        result = walk_on_to(result, last)
    return result


def _postgres_rows_walk(
    loop: asyncio.AbstractEventLoop, conn: Any, spec: WalkSpec, pace: Pace
) -> WalkResult:
    """Paced: every record read and checked here, ``batch`` at a time with a
    rest after each. The hashing is the worker's (at niceness 10, it gives a
    core to the server's loop at once), not the database's (whose process
    would keep it for milliseconds: docs/benchmarks.md)."""
    end = _last_seq(spec)

    def batches() -> Generator[list[Row]]:
        after = spec.start_seq - 1
        while True:
            batch = loop.run_until_complete(
                conn.fetch(_POSTGRES_ROWS, spec.chain, after, end, spec.batch)
            )
            yield batch
            if len(batch) < spec.batch:
                return
            after = batch[-1][0]
            pace.rest()

    rows = itertools.chain.from_iterable(batches())
    return walk_rows(rows, spec.start_seq, spec.start_hash, _postgres_text)


def walk_flagged(flagged: Iterable[Row], expected_seq: int, prev_hash: str | None) -> WalkResult:
    """:func:`walk_rows` over the rows a database flagged, in order: each a
    stored row (as :func:`_postgres_text` reads it) with the database's own
    hash check and its predecessor's seq and hash (None: the range's first
    row). Every row between two flagged ones is whole, linked and in
    sequence; those after the last one are added by :func:`walk_on_to`."""
    count = 0
    first_seq: int | None = None
    first_prev: str | None = None
    for row in flagged:
        before_seq, before_hash = row[13], row[14]
        if before_seq is not None:  # the whole rows since the last flagged one
            count += before_seq - expected_seq + 1
            expected_seq, prev_hash = before_seq + 1, before_hash
        one = walk_rows([tuple(row)[:12]], expected_seq, prev_hash, _postgres_text)
        if first_seq is None:
            first_seq, first_prev = one.first_seq, one.first_prev_hash
        if one.problem is not None:
            return replace(one, records=count, first_seq=first_seq, first_prev_hash=first_prev)
        count, expected_seq, prev_hash = count + 1, one.next_seq, one.last_hash
    return WalkResult(count, expected_seq, str(prev_hash), None, 0, "", first_seq, first_prev)


def walk_on_to(result: WalkResult, last: Row | None) -> WalkResult:
    """An unbroken :func:`walk_flagged` carried on to the range's last row
    (its seq and hash), through the whole rows after the last flagged one."""
    if last is None or last[0] < result.next_seq:
        return result
    return replace(
        result,
        records=result.records + last[0] - result.next_seq + 1,
        next_seq=last[0] + 1,
        last_hash=last[1],
    )


def _postgres_text(row: Row) -> str:
    """:func:`canonical_text` of a row the server spelt canonically, the
    values a chain repeats looked up once quoted (see :func:`_looked_up_text`)."""
    return _looked_up_text(row, row[1], _REPEATED)


def main() -> None:
    """The worker: chains to walk (a JSON list of :class:`WalkSpec`) on stdin,
    their results (a JSON list of :class:`WalkResult`) on stdout."""
    # Bulk work gives way: on a busy host the server's event loop (signaling)
    # gets a core before a verify does.
    os.nice(10)
    specs = [WalkSpec(**spec) for spec in json.load(sys.stdin)]
    json.dump([asdict(result) for result in walk(specs)], sys.stdout)


if __name__ == "__main__":
    main()
