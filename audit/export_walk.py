"""Exporting an organisation's access log in a worker process, from raw driver rows.

The body of ``GET /api/admin/access-log/export`` (server/api/admin_access_log.py),
made where it cannot hold the server's event loop: this file run as a
script (``python -P export_walk.py``), the export's :class:`ExportSpec` as
JSON on its standard input (the database URL with its password goes
through the pipe, never the command line), the finished CSV or JSON body on
its standard output, a batch at a time. The server copies it to the
response; a full pipe stops the worker until the client reads on.

Like :mod:`audit.chain_walk` it imports only the standard library and
asyncpg (not SQLAlchemy, whose conversion of each value was most of the
loop's cost, nor anything of this project's packages, whose ``__init__``
would pull SQLAlchemy in), and reads with the database's own driver. Each
batch is one short read transaction of its own, newest first by ``seq``,
so appends go on meanwhile, as they did when the server read the batches.
On PostgreSQL the server writes the lines of the records with nothing to
quote or escape itself (:data:`_PG_LINE`); this worker writes the others.

The bytes must be those the server wrote itself before: the records as
``server.api.representations.access_record_json`` gives them (times by
``datetime.isoformat``, so a whole second has no fraction), the CSV by
``csv.writer`` with CRLF line ends, the JSON items by ``json.dumps`` joined
with ",\\n". ``tests/test_export_walk.py`` compares both on SQLite and
PostgreSQL, odd characters included.

A failure exits with status 1 and writes only the error's class to
standard error: its message may hold a stored value (personal data must
not reach the server's log).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import runpy
import sqlite3
import sys
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING or __name__ != "__main__":
    from audit.pace import Pace
else:
    # The worker script (``python -P``): its sibling pace.py run by its path
    # (not a module named "pace" found on sys.path), not through the package,
    # whose __init__ imports SQLAlchemy (0.8 s to start).
    Pace = runpy.run_path(str(Path(__file__).resolve().with_name("pace.py")))["Pace"]

# The columns of the CSV, and the keys of each JSON record, in this order.
COLUMNS = (
    "seq",
    "at",
    "actor_id",
    "actor_role",
    "action",
    "object_type",
    "object_id",
    "outcome",
    "client_type",
    "hash",
)
# The values of audit.access_log.Outcome and ClientType (a test checks that
# they are the same): the server refused a record with another value, so
# the worker does too.
OUTCOMES = frozenset({"allowed", "refused"})
CLIENT_TYPES = frozenset({"api", "cli", "websocket", "webhook"})
JSON_TRAILER = "\n]}\n"
# The highest seq there can be (64-bit integers): the first batch's bound, inclusive.
_LAST_SEQ = 2**63 - 1
_SELECT = (
    "SELECT seq, at, actor_id, actor_role, action, object_type, object_id, outcome,"
    " client_type, hash FROM access_log"
)
# SQLAlchemy's escape character for ``startswith(..., autoescape=True)``.
_ESCAPE = "/"

# A row as read: seq, at, actor_id, actor_role, action, object_type,
# object_id, outcome, client_type, hash; at and actor_id as the driver gives them.
Row = tuple[Any, ...]


@dataclass(frozen=True)
class ExportSpec:
    """What one export reads and how it writes it."""

    backend: str  # "sqlite" or "postgresql"
    # The SQLite file, or a libpq-style URL for asyncpg.
    location: str
    chain: str
    export_format: str  # "csv" or "json"
    batch: int
    # The filters of audit.access_log.read_access_log; times in ISO 8601 with an offset.
    since: str | None = None
    until: str | None = None
    actor_id: str | None = None
    action: str | None = None
    object_id: str | None = None
    # The JSON document up to its records' opening bracket (the server's head).
    json_head: str = ""
    timeout_s: float = 30.0
    # The share of the time the export may keep busy, its database's work
    # included: it rests after each batch (audit/pace.py), sharing it with
    # the machine's other paced jobs registered in ``peers``.
    share: float = 1.0
    peers: str | None = None


def _like_prefix(action: str) -> str:
    """``action.`` as a LIKE pattern's start, escaped as SQLAlchemy's autoescape does."""
    escaped = action.replace(_ESCAPE, _ESCAPE * 2)
    escaped = escaped.replace("%", f"{_ESCAPE}%").replace("_", f"{_ESCAPE}_")
    return f"{escaped}.%"


def _where(spec: ExportSpec, mark: Generator[str]) -> tuple[list[str], list[Any]]:
    """The filters' conditions (with the driver's placeholders from ``mark``) and their values."""
    sql: list[str] = []
    values: list[Any] = []
    sqlite = spec.backend == "sqlite"
    if spec.since is not None:
        sql.append(f"at >= {next(mark)}")
        values.append(_bound_time(spec.since, sqlite))
    if spec.until is not None:
        sql.append(f"at < {next(mark)}")
        values.append(_bound_time(spec.until, sqlite))
    if spec.actor_id is not None:
        sql.append(f"actor_id = {next(mark)}")
        # SQLAlchemy keeps a UUID on SQLite as 32 hex digits.
        actor = uuid.UUID(spec.actor_id)
        values.append(actor.hex if sqlite else actor)
    if spec.action is not None:
        sql.append(f"(action = {next(mark)} OR action LIKE {next(mark)} ESCAPE '{_ESCAPE}')")
        values += [spec.action, _like_prefix(spec.action)]
    if spec.object_id is not None:
        sql.append(f"object_id = {next(mark)}")
        values.append(spec.object_id)
    return sql, values


def _bound_time(text: str, sqlite: bool) -> Any:
    moment = datetime.fromisoformat(text).astimezone(UTC)
    # On SQLite the times are text, compared as SQLAlchemy writes them.
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else moment


def _query(spec: ExportSpec, mark: Generator[str]) -> tuple[str, list[Any]]:
    """One batch's SELECT: the chain's records up to a seq (the 2nd value), newest first."""
    # Only placeholders go into the text; every value is bound.
    conditions = [f"chain = {next(mark)}", f"seq <= {next(mark)}"]
    filters, values = _where(spec, mark)
    sql = " ".join(
        (
            _SELECT,
            "WHERE",
            " AND ".join(conditions + filters),
            "ORDER BY seq DESC LIMIT",
            next(mark),
        )
    )
    return sql, [spec.chain, _LAST_SEQ, *values, spec.batch]


def _sqlite_marks() -> Generator[str]:
    while True:
        yield "?"


def _postgres_marks() -> Generator[str]:
    number = 0
    while True:
        number += 1
        yield f"${number}"


def sqlite_batches(spec: ExportSpec) -> Generator[list[Row]]:
    """The selected records, a batch at a time, each batch one SELECT (one short read)."""
    sql, values = _query(spec, _sqlite_marks())
    # A file URI, quoted (a '#', '?' or '%' in the path would cut it short).
    uri = Path(spec.location).resolve().as_uri() + "?mode=ro"
    pace = Pace(spec.share, peers=spec.peers)
    conn = sqlite3.connect(uri, uri=True, timeout=spec.timeout_s, isolation_level=None)
    try:
        while True:
            batch = conn.execute(sql, values).fetchall()
            yield [_sqlite_row(row) for row in batch]
            if len(batch) < spec.batch:
                return
            values[1] = batch[-1][0] - 1
            pace.rest()  # the batch was read, made lines and written
    finally:
        pace.close()
        conn.close()


def sqlite_lines(spec: ExportSpec) -> Generator[list[str]]:
    """As :func:`postgres_lines`, every line written here: a batch's CSV lines
    as one text, or its JSON items."""
    batches = sqlite_batches(spec)
    try:
        for rows in batches:
            if spec.export_format == "json":
                yield [json_item(row) for row in rows]
            else:
                yield [csv_lines(rows, header=False)]
    finally:
        batches.close()  # its connection, now, also after a failure


def _sqlite_row(row: Row) -> Row:
    return (row[0], _sqlite_time(row[1]), _sqlite_uuid(row[2]), *row[3:])


_SQLALCHEMY_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", re.ASCII)


def _sqlite_time(stored: str) -> str:
    # SQLAlchemy writes "YYYY-MM-DD HH:MM:SS.ffffff" (UTC, no offset); 26
    # characters may also be five digits of a second and a "Z".
    if _SQLALCHEMY_TIME.fullmatch(stored):
        fraction = "" if stored[20:] == "000000" else stored[19:]
        return f"{stored[:10]}T{stored[11:19]}{fraction}+00:00"
    moment = datetime.fromisoformat(stored)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.isoformat()


def _sqlite_uuid(stored: str | None) -> str | None:
    return None if stored is None else str(uuid.UUID(stored))


# On PostgreSQL the server writes each record's CSV line or JSON item itself
# (``concat``, in C), for a record whose values need no quoting in CSV, or
# are printable ASCII without a quote or a backslash for JSON (no escaping),
# and whose outcome and client type are ones the server writes; any other
# record comes as its values, and this worker writes it as before. The time
# as ``datetime.isoformat`` writes it: no fraction on a whole second; a time
# Python cannot hold (before the year 1, 'infinity', after 9999) is left to
# the worker too (``to_char`` has no text for 'infinity' and drops a year's
# era). The patterns are E'' literals: their backslashes are the pattern's,
# whatever ``standard_conforming_strings`` says.
_PG_TIME = (
    "replace(to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'),"
    " '.000000+', '+')"
)
_PG_TEXTS = "concat(actor_role, action, object_type, object_id, outcome, client_type, hash)"
_PG_LINE = {
    "csv": (
        f"CASE WHEN {_PG_TEXTS} !~ E'[\",\\\\r\\\\n]'"
        f" THEN concat(seq, ',', {_PG_TIME}, ',', actor_id, ',', actor_role,"
        " ',', action, ',', object_type, ',', object_id, ',', outcome, ',',"
        " client_type, ',', hash, E'\\r\\n') END"
    ),
    "json": (
        f"CASE WHEN {_PG_TEXTS} !~ E'[^ !#-\\\\[\\\\]-~]' THEN concat('{{\"seq\": ', seq,"
        f' \', "at": "\', {_PG_TIME}, \'", "actor_id": \','
        " coalesce('\"' || actor_id || '\"', 'null'),"
        ' \', "actor_role": "\', actor_role, \'", "action": "\', action,'
        ' \'", "object_type": "\', object_type, \'", "object_id": \','
        " coalesce('\"' || object_id || '\"', 'null'), ', \"outcome\": \"', outcome,"
        ' \'", "client_type": "\', client_type, \'", "hash": "\', hash, \'"}\') END'
    ),
}
# A record's values but its seq (which comes first anyway), when the server wrote no line.
_PG_RAW = COLUMNS[1:]


def _pg_query(spec: ExportSpec) -> tuple[str, list[Any]]:
    """A batch's statement on PostgreSQL: each record's seq and its line, or
    (no line) its values."""
    inner, values = _query(spec, _postgres_marks())
    known = len(values) + 1
    line = _PG_LINE[spec.export_format]
    checked = (
        f"CASE WHEN outcome = ANY(${known}::text[]) AND client_type = ANY(${known + 1}::text[])"
        " AND at >= '0001-01-01 00:00:00+00' AND at < '10000-01-01 00:00:00+00'"
        f" THEN {line} END"
    )
    raw = ", ".join(f"CASE WHEN line IS NULL THEN {column} END" for column in _PG_RAW)
    # Only placeholders and this module's own text go into it; every value is bound.
    sql = " ".join(
        (
            "SELECT seq, line,",
            raw,
            "FROM (SELECT *,",
            checked,
            "AS line FROM (",
            inner,
            # OFFSET 0: not folded into the outer query, which would make
            # each line again for every CASE that asks whether it was made.
            ") AS chosen OFFSET 0) AS written ORDER BY seq DESC",
        )
    )
    return sql, [*values, sorted(OUTCOMES), sorted(CLIENT_TYPES)]


def postgres_lines(spec: ExportSpec) -> Generator[list[str]]:
    """The selected records' CSV lines or JSON items, a batch at a time, each
    batch one statement outside a transaction block."""
    sql, values = _pg_query(spec)
    one = csv_line if spec.export_format == "csv" else json_item
    pace = Pace(spec.share, peers=spec.peers)
    loop = asyncio.new_event_loop()
    try:
        # Imported here: only an export from PostgreSQL needs it.
        import asyncpg

        conn = loop.run_until_complete(asyncpg.connect(spec.location, timeout=spec.timeout_s))
        try:
            while True:
                batch = loop.run_until_complete(conn.fetch(sql, *values))
                yield [
                    row[1]
                    if row[1] is not None
                    else one(
                        (row[0], row[2].astimezone(UTC).isoformat(), _pg_uuid(row[3]), *row[4:])
                    )
                    for row in batch
                ]
                if len(batch) < spec.batch:
                    return
                values[1] = batch[-1][0] - 1
                pace.rest()  # the batch was read, made lines and written
        finally:
            loop.run_until_complete(conn.close())
    finally:
        pace.close()
        loop.close()


def _pg_uuid(value: object) -> str | None:
    return None if value is None else str(value)


def record_values(row: Row) -> list[Any]:
    """A row's values in :data:`COLUMNS` order, as the server's representation gives them."""
    if row[7] not in OUTCOMES or row[8] not in CLIENT_TYPES:
        raise ValueError(f"record {row[0]}: an outcome or client type no record has")
    return list(row)


def csv_lines(batch: list[Row], *, header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(COLUMNS)
    for row in batch:
        writer.writerow(["" if value is None else value for value in record_values(row)])
    return out.getvalue()


def csv_line(row: Row) -> str:
    return csv_lines([row], header=False)


def json_item(row: Row) -> str:
    return json.dumps(dict(zip(COLUMNS, record_values(row), strict=True)))


def export(spec: ExportSpec, out: BinaryIO) -> None:
    """Write the whole body of the export to ``out``, flushed after each batch."""
    batches = sqlite_lines(spec) if spec.backend == "sqlite" else postgres_lines(spec)
    if spec.export_format == "json":
        out.write(spec.json_head.encode())
    first = True
    try:
        for lines in batches:
            if spec.export_format == "csv":
                out.write(((csv_lines([], header=True) if first else "") + "".join(lines)).encode())
            elif lines:
                items = ",\n".join(lines)
                out.write((items if first else ",\n" + items).encode())
            out.flush()
            first = first and not any(lines)
    finally:
        batches.close()  # its connection, now, also after a failure
    if spec.export_format == "json":
        out.write(JSON_TRAILER.encode())
    out.flush()


def main() -> None:
    """The worker: an :class:`ExportSpec` (JSON) on stdin, the body on stdout."""
    # Bulk work gives way: on a busy host the server's event loop (signaling)
    # gets a core before an export does.
    os.nice(10)
    try:
        export(ExportSpec(**json.load(sys.stdin)), sys.stdout.buffer)
    except BaseException as err:
        sys.stderr.write(f"{type(err).__name__}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
