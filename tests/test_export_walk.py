"""The access-log export in a worker process (audit/export_walk.py): the very
bytes the server wrote itself, on SQLite and PostgreSQL, odd characters and
every filter included; a worker that fails after some batches; and a client
that goes away leaves no worker behind. (A failing worker through the API:
tests/test_admin_console_api.py.)"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import create_engine, export_walk, prepare_data_dir
from audit.access_log import (
    AccessRecord,
    ClientType,
    Outcome,
    append_records,
    chain_of,
    read_access_log,
)
from audit.db import database_url as configured_url
from audit.errors import DatabaseError
from audit.export_walk import CLIENT_TYPES, OUTCOMES
from audit.export_workers import exported_chunks
from audit.roles import Role
from audit.schema import access_log
from server.api.admin_access_log import LogFilter, export_spec
from server.api.representations import access_record_json
from server.app_keys import DATA_DIR, DB_ENGINE
from tests.support.harness import Harness, Professional
from tests.support.processes import ServerProcess, session_cookie
from tests.support.settings import SettingsFactory

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
ORG = uuid.UUID(int=7)
OTHER_ORG = uuid.UUID(int=8)
# Short enough for every column (actor_role holds 16); PostgreSQL's text
# holds no NUL, so none here.
ODD_TEXTS = [
    "admin",
    "account",
    'a "quoted" one',
    "back\\slash",
    "comma, semi;",
    "tab\tnew\nline\r\n",
    "é ü ß",
    "😀",
]
ACTIONS = ["account.read", "ab_c.read", "abxc.read", "ab_c", "consult.end", 'odd "verb"\n.x']
EVERY_RECORD = LogFilter(since=None, until=None, actor_id=None, action=None, object_id=None)
FILTERS: list[dict[str, Any]] = [
    {},
    {"since": T0 + timedelta(seconds=5), "until": T0 + timedelta(seconds=11)},
    {"actor_id": uuid.UUID(int=101)},
    # An underscore is a LIKE wildcard: "abxc.read" must not match "ab_c".
    {"action": "ab_c"},
    {"object_id": ODD_TEXTS[1]},
]


def csv_header() -> list[str]:
    """The CSV's columns as the server wrote them: its representation's keys."""
    return list(access_record_json(odd_record(0, ORG)))


def test_the_worker_knows_every_outcome_and_client_type() -> None:
    assert {outcome.value for outcome in Outcome} == OUTCOMES
    assert {client.value for client in ClientType} == CLIENT_TYPES


def odd_record(n: int, organisation_id: uuid.UUID) -> AccessRecord:
    text = ODD_TEXTS[n % len(ODD_TEXTS)]
    return AccessRecord(
        # Every other one on a whole second: isoformat() writes no fraction then.
        at=T0 + timedelta(seconds=n, microseconds=0 if n % 2 else 1_001 * n),
        organisation_id=organisation_id,
        actor_id=None if n % 3 == 0 else uuid.UUID(int=100 + n % 2),
        actor_role=text,
        action=ACTIONS[n % len(ACTIONS)],
        object_type=text,
        object_id=None if n % 4 == 0 else text,
        outcome=list(Outcome)[n % len(Outcome)],
        client_type=list(ClientType)[n % len(ClientType)],
    )


async def server_export(
    engine: AsyncEngine, export_format: str, batch: int, head: str, **filters: Any
) -> bytes:
    """The export as the server made it itself before the worker (commit
    b70269b): ``read_access_log``'s records, batch by batch, through
    ``access_record_json``."""
    parts = [head.encode()] if export_format == "json" else []
    before: int | None = None
    first = True
    while True:
        async with engine.connect() as conn:
            found = await read_access_log(conn, ORG, limit=batch, before_seq=before, **filters)
        rows = [access_record_json(entry) for entry in found]
        if export_format == "csv":
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\r\n")
            if first:
                writer.writerow(csv_header())
            for row in rows:
                writer.writerow(["" if row[name] is None else row[name] for name in csv_header()])
            parts.append(out.getvalue().encode())
        elif rows:
            items = ",\n".join(json.dumps(row) for row in rows)
            parts.append((items if first else ",\n" + items).encode())
        first = first and not found
        if len(found) < batch:
            break
        before = found[-1].seq
    if export_format == "json":
        parts.append(b"\n]}\n")
    return b"".join(parts)


async def worker_export(
    engine: AsyncEngine, export_format: str, batch: int, head: str, **filters: Any
) -> bytes:
    spec = export_spec(engine, ORG, replace(EVERY_RECORD, **filters), export_format, head, batch)
    return b"".join([chunk async for chunk in exported_chunks(spec)])


async def test_the_worker_writes_the_servers_own_export_byte_for_byte(
    migrated_engine: AsyncEngine,
) -> None:
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [odd_record(n, OTHER_ORG) for n in range(5)])
        await append_records(conn, [odd_record(n, ORG) for n in range(24)])
    head = json.dumps({"organisation_id": str(ORG), "filters": {"x": "é"}})[:-1] + ', "r": [\n'
    whole: set[bytes] = set()
    # 4: batches cut the records; 24: one full batch, then an empty one.
    for batch in (4, 24):
        for export_format in ("csv", "json"):
            for filters in FILTERS:
                expected = await server_export(engine, export_format, batch, head, **filters)
                got = await worker_export(engine, export_format, batch, head, **filters)
                assert got == expected, (export_format, batch, filters)
                whole.add(expected)
    # Each filter chose other records (and none of the other organisation).
    assert len(whole) == 2 * len(FILTERS)
    exported = json.loads(await worker_export(engine, "json", 4, '{"records": [\n'))
    assert len(exported["records"]) == 24
    by_action = json.loads((await worker_export(engine, "json", 4, "[", action="ab_c"))[:-2])
    assert {record["action"] for record in by_action} == {"ab_c", "ab_c.read"}


async def test_a_worker_that_fails_raises_after_the_chunks_it_wrote(
    migrated_engine: AsyncEngine,
) -> None:
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [odd_record(n, ORG) for n in range(10)])
        await conn.execute(
            access_log.update().where(access_log.c.seq == 1).values(client_type="fax")
        )
    spec = export_spec(engine, ORG, EVERY_RECORD, "csv", "", batch=4)
    chunks: list[bytes] = []

    async def read_all() -> None:
        async for chunk in exported_chunks(spec):
            chunks.append(chunk)

    with pytest.raises(DatabaseError, match=r"exit status 1\): ValueError$"):
        await read_all()
    assert b"".join(chunks).count(b"\r\n") >= 1 + 8  # the header and two whole batches


def export_workers(parent: int) -> list[int]:
    """The export workers of process ``parent`` that still exist (zombies too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"export_walk.py" in command:
            found.append(int(entry.name))
    return found


async def until(condition: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def fill_fast(harness: Harness, admin: Professional, count: int) -> None:
    """``count`` records of the admin's organisation, older than any, unchained (by hand)."""
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(
            access_log.insert(),
            [
                {
                    "at": T0,
                    "organisation_id": admin.organisation.id,
                    "actor_id": admin.account_id,
                    "actor_role": "admin",
                    "action": "account.read",
                    "object_type": "account",
                    "object_id": str(uuid.UUID(int=n)),
                    "outcome": "allowed",
                    "client_type": "api",
                    "chain": chain_of(admin.organisation.id),
                    "seq": -n,
                    "prev_hash": "0" * 64,
                    "hash": f"{n:064x}",
                }
                for n in range(1, count + 1)
            ],
        )


@pytest.mark.slow
async def test_a_client_that_goes_away_leaves_no_worker_behind(
    sqlite_harness: Harness, free_port: int, tmp_path: Path
) -> None:
    """On a ``videoconsult serve`` of its own: aiohttp's test server cancels a
    handler whose client left, the real one lets its next write fail."""
    # The server process runs on the real clock: the session must be fresh by it.
    sqlite_harness.clock.advance((datetime.now(UTC) - sqlite_harness.clock.now()).total_seconds())
    admin = await sqlite_harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await sqlite_harness.logged_in(admin)
    # 100,000 records (about 25 MB of CSV), more than the socket's and the
    # pipe's buffers hold: the worker is still writing when the client leaves.
    await fill_fast(sqlite_harness, admin, 100_000)
    cookie = session_cookie(sqlite_harness)
    await sqlite_harness.client.close()
    log = tmp_path / "server.log"
    server = ServerProcess(sqlite_harness.app[DATA_DIR], free_port, log)
    try:
        await asyncio.to_thread(server.wait_healthy)
        async with aiohttp.ClientSession(headers={"Cookie": f"vc_session={cookie}"}) as client:
            answer = await client.get(f"{server.origin}/api/admin/access-log/export")
            assert answer.status == 200
            assert await answer.content.read(1024)
            assert await until(lambda: export_workers(server.process.pid) != [])
            # The database's location goes through the pipe, never the command line.
            [worker] = export_workers(server.process.pid)
            command = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")[:-1]
            assert command[1:] == [b"-P", os.fsencode(export_walk.__file__)]
            answer.close()  # the connection, with most of the export unread
            gone = await until(lambda: export_workers(server.process.pid) == [])
            assert gone, export_workers(server.process.pid)
            # The server goes on answering.
            again = await client.get(f"{server.origin}/api/admin/access-log?object=none")
            assert again.status == 200
    finally:
        server.stop()
    # Found here: the failed write (a ConnectionResetError) reached the error
    # middleware, which took it for the database being away.
    logged = log.read_text()
    assert "database unavailable" not in logged
    assert "unhandled error" not in logged


async def test_postgresql_writes_the_lines_of_plain_records_itself(
    make_settings: SettingsFactory, migrated_postgres_url: str
) -> None:
    """The server makes the CSV line or JSON item of a record with nothing to
    quote or escape; the worker writes only the others (byte for byte the
    same: the test above)."""
    import asyncpg

    settings = make_settings(database_url=migrated_postgres_url, database_connect_timeout_s=30)
    engine = create_engine(
        configured_url(settings, prepare_data_dir(settings.data_dir)), connect_timeout_s=30
    )
    plain = [
        replace(
            odd_record(n, ORG),
            actor_role="admin",
            object_type="account",
            action="a.read",
            object_id=f"x-{n}",
        )
        for n in range(6)
    ]
    try:
        async with engine.begin() as conn:
            await append_records(conn, [*plain, odd_record(2, ORG), odd_record(5, ORG)])
        location = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(location)
        try:
            for export_format in ("csv", "json"):
                spec = export_walk.ExportSpec(
                    "postgresql", location, chain_of(ORG), export_format, 100
                )
                sql, values = export_walk._pg_query(spec)
                rows = await conn.fetch(sql, *values)
                # Newest first: the two odd records, then the six plain ones.
                assert [row["line"] is None for row in rows] == [True] * 2 + [False] * 6
        finally:
            await conn.close()
    finally:
        await engine.dispose()


async def one_plain_record(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await append_records(
            conn,
            [replace(odd_record(1, ORG), actor_role="admin", object_type="account", object_id="x")],
        )


async def test_a_record_at_the_last_possible_seq_is_exported(migrated_engine: AsyncEngine) -> None:
    """Found in review: the first batch read the records below the highest
    seq there can be, so a record there was left out."""
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [odd_record(n, ORG) for n in range(3)])
        await conn.execute(access_log.update().where(access_log.c.seq == 3).values(seq=2**63 - 1))
    for export_format in ("csv", "json"):
        expected = await server_export(engine, export_format, 2, "[")
        assert str(2**63 - 1).encode() in expected
        assert await worker_export(engine, export_format, 2, "[") == expected


# SQLite only (the empty URL): PostgreSQL keeps a time as a time.
@pytest.mark.parametrize("database_url", [""])
async def test_a_sqlite_time_in_another_spelling_is_exported_as_the_server_read_it(
    migrated_engine: AsyncEngine,
) -> None:
    """Found in review (as in the chain's walk): 26 characters with a space
    were taken for SQLAlchemy's own spelling without looking further."""
    engine = migrated_engine
    await one_plain_record(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE access_log SET at = '2026-11-23 09:00:02.00000Z'"))
    expected = await server_export(engine, "csv", 10, "")
    assert b"2026-11-23T09:00:02+00:00" in expected
    assert await worker_export(engine, "csv", 10, "") == expected


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgresql_leaves_times_python_cannot_hold_to_the_worker(
    migrated_engine: AsyncEngine,
) -> None:
    """Found in review: the server's line wrote 'infinity' as an empty time
    and a year BC without its era; the server's own export wrote the first
    as the latest time Python holds and refused the second."""
    engine = migrated_engine
    await one_plain_record(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE access_log SET at = 'infinity'"))
    for export_format in ("csv", "json"):
        expected = await server_export(engine, export_format, 10, "[")
        assert b"9999-12-31T23:59:59.999999+00:00" in expected
        assert await worker_export(engine, export_format, 10, "[") == expected
    for moved in ("2026-01-01 00:00:00+00 BC", "10000-01-01 00:00:00+00"):
        async with engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE access_log SET at = CAST(CAST(:at AS text) AS timestamptz)"),
                {"at": moved},
            )
        for export_format in ("csv", "json"):
            with pytest.raises(DatabaseError):
                await worker_export(engine, export_format, 10, "[")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgresql_escapes_as_the_server_did_whatever_it_reads_backslashes_as(
    migrated_engine: AsyncEngine,
) -> None:
    """Found in review: with ``standard_conforming_strings`` off, the test for
    values to escape read its backslashes as escapes and let a quote through."""
    engine = migrated_engine
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET"
                " standard_conforming_strings = off', current_database()); END $$"
            )
        )
        await append_records(conn, [odd_record(n, ORG) for n in range(8)])
    await engine.dispose()  # new connections, with the database's new setting
    for export_format in ("csv", "json"):
        expected = await server_export(engine, export_format, 3, "[")
        assert await worker_export(engine, export_format, 3, "[") == expected
