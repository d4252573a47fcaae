"""The fast chain walk: the same canonical text as the hash chain's own, and
a long verify that leaves the event loop free (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import chain_walk, create_engine, prepare_data_dir, upgrade
from audit.access_log import (
    GENESIS_HASH,
    AccessRecord,
    ClientType,
    Outcome,
    append_records,
    canonical_fields,
    record_hash,
    verify_chain,
)
from audit.chain_walk import canonical_text
from audit.db import database_url as configured_url
from audit.schema import access_log
from tests.support.loop_probe import longest_hold
from tests.support.settings import SettingsFactory

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
ODD_TEXTS = [
    "account.read",
    'a "quoted" verb',
    "back\\slash",
    "tab\tnew\nline",
    "é ü ß",
    "😀",
    "\x00",
]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_the_walks_encoding_is_the_chains_canonical_json(text: str) -> None:
    fields = canonical_fields(
        at=T0,
        organisation_id=uuid.UUID(int=1),
        actor_id=None,
        actor_role=text,
        action=text,
        object_type=text,
        object_id=text,
        outcome=text,
        client_type=text,
    )
    reference = json.dumps({**fields, "prev_hash": text}, sort_keys=True, separators=(",", ":"))
    row = (
        1,
        fields["at"],
        fields["organisation_id"],
        None,
        text,
        text,
        text,
        text,
        text,
        text,
        text,
    )
    assert canonical_text(row) == reference
    # PostgreSQL's walk: the same, the repeated values looked up (twice: made, then found).
    assert chain_walk._postgres_text(row) == reference
    assert chain_walk._postgres_text(row) == reference


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_the_sqlite_walks_text_of_a_stored_row_is_the_chains_canonical_json(text: str) -> None:
    """The SQLite walk makes the text from the row as stored (a time as
    SQLAlchemy writes it, UUIDs as 32 hex digits), the repeated values looked
    up once quoted: the same text, odd characters and nulls included."""
    organisation, actor = uuid.UUID(int=1), uuid.UUID(int=0xABC)
    for actor_id, object_id in ((actor, text), (None, None)):
        fields = canonical_fields(
            at=T0 + timedelta(microseconds=5),
            organisation_id=organisation,
            actor_id=actor_id,
            actor_role=text,
            action=text,
            object_type=text,
            object_id=object_id,
            outcome=text,
            client_type=text,
        )
        reference = json.dumps({**fields, "prev_hash": text}, sort_keys=True, separators=(",", ":"))
        stored = (
            1,
            "2026-12-05 09:00:00.000005",
            organisation.hex,
            None if actor_id is None else actor_id.hex,
            text,
            text,
            text,
            object_id,
            text,
            text,
            text,
            "hash",
        )
        # Twice: made, then looked up.
        assert chain_walk._sqlite_text(stored) == reference
        assert chain_walk._sqlite_text(stored) == reference


# (column of the stored row, a value of another type or spelling): what a
# hand-written change could put there. None in a NOT NULL column included.
ODD_VALUES = [
    (5, 1),
    (5, True),
    (5, 1.0),
    (5, b"consult.read"),
    (5, None),
    (4, None),
    (2, None),
    (2, uuid.UUID(int=1).bytes),
    (2, uuid.UUID(int=1).hex.encode()),
    (1, 0),
    (10, b"0" * 64),
]


@pytest.mark.parametrize(("column", "value"), ODD_VALUES)
def test_a_value_of_another_type_in_a_looked_up_column_is_a_change(
    column: int, value: object
) -> None:
    """Found worth a test in review: the walk looks the repeated values up in
    a dict, whose keys 1, 1.0 and True are one; none of these may match the
    record's hash, whatever was looked up before."""
    organisation, actor = uuid.UUID(int=1), uuid.UUID(int=0xABC)
    fields = canonical_fields(
        at=T0,
        organisation_id=organisation,
        actor_id=actor,
        actor_role="therapist",
        action="consult.read",
        object_type="consult",
        object_id="1",
        outcome="allowed",
        client_type="web",
    )
    stored = (
        1,
        "2026-12-05 09:00:00.000000",
        organisation.hex,
        actor.hex,
        "therapist",
        "consult.read",
        "consult",
        "1",
        "allowed",
        "web",
        "0" * 64,
        record_hash(fields, "0" * 64),
    )

    def walk(row: tuple[object, ...]) -> chain_walk.WalkResult:
        return chain_walk.walk_rows(
            [row], 1, "0" * 64, chain_walk._sqlite_text, chain_walk._sqlite_slow_text
        )

    assert walk(stored).problem is None  # and its values are looked up from now on
    changed = list(stored)
    changed[column] = value
    assert walk(tuple(changed)).problem == "modified"


def test_the_quoted_values_kept_for_the_walk_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of all-different values (written by hand) does not grow the
    worker without end: the looked-up values are forgotten past a bound."""
    monkeypatch.setattr(chain_walk, "_QUOTED_AT_MOST", 50)
    quoted = chain_walk._Quoted(lambda value: value)
    for n in range(500):
        assert quoted[f"action {n}"] == f'"action {n}"'
        assert len(quoted) <= 50
    assert quoted[None] == "null"
    # A long value (SQLite keeps any length) is quoted and not kept.
    quoted.clear()
    long = "x" * 1_000_000
    assert quoted[long] == f'"{long}"'
    assert long not in quoted


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


async def fill(engine: AsyncEngine, count: int, per_transaction: int = 2_000) -> None:
    for start in range(0, count, per_transaction):
        async with engine.begin() as conn:
            await append_records(
                conn,
                [
                    AccessRecord(
                        at=T0 + timedelta(milliseconds=n),
                        organisation_id=uuid.UUID(int=1),
                        actor_id=uuid.UUID(int=2),
                        actor_role="admin",
                        action="account.read",
                        object_type="account",
                        object_id=str(uuid.UUID(int=n)),
                        outcome=Outcome.ALLOWED,
                        client_type=ClientType.API,
                    )
                    for n in range(start, min(count, start + per_transaction))
                ],
            )


# Slow: two 20,000-record walks and the rests after them, some 10 s a
# database. The quick check keeps the promise itself in
# test_bulk_jobs_loop.py::test_a_verify_of_20000_records_never_holds_the_loop;
# this one also shows that a walk on the loop would have been caught.
@pytest.mark.slow
async def test_a_verify_from_the_engine_leaves_the_event_loop_free(engine: AsyncEngine) -> None:
    # 20,000 records: the walk on the loop holds it for the whole batch of
    # 20,000 (about 0.1 s on PostgreSQL at 6 µs a record, more on SQLite; a
    # batch of 10,000 left too thin a margin over a loaded machine's pauses
    # once the walk got faster); the worker's walk only for moments.
    # Relative, not 10 ms: on a shared, loaded machine the loop's thread
    # itself waits for a core now and then (118 ms seen at load 22; see
    # tests/support/loop_probe.py); the benchmark measures the hold on a
    # 1,000,000-record walk.
    await fill(engine, 20_000)
    async with engine.connect() as conn:
        on_loop, on_the_loop, _ = await longest_hold(verify_chain(conn, batch=20_000))
    in_worker, in_a_worker, at_rest = await longest_hold(verify_chain(engine, batch=10_000))
    for report in (on_loop, in_worker):
        assert (report.intact, report.records) == (True, 20_000)
    assert in_a_worker * 3 < on_the_loop
    assert in_a_worker < max(0.1, 3 * at_rest)


async def test_a_verify_from_the_engine_reads_a_data_directory_with_odd_characters(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """Found in review: the worker opened SQLite by a URI built from the bare
    path, so '#' cut it there and an empty database was made instead."""
    settings = make_settings(database_url="", data_dir=str(tmp_path / "praktijk #2 50%"))
    engine = create_engine(
        configured_url(settings, prepare_data_dir(settings.data_dir)), connect_timeout_s=30
    )
    try:
        await upgrade(engine)
        await fill(engine, 10)
        report = await verify_chain(engine)
        assert (report.intact, report.records) == (True, 10)
    finally:
        await engine.dispose()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["praktijk #2 50%"]


async def test_postgresql_checks_the_hashes_itself_and_sends_the_walk_only_the_odd_rows(
    make_settings: SettingsFactory, migrated_postgres_url: str
) -> None:
    """The server makes and hashes each record's text (audit/chain_walk.py,
    _POSTGRES_FLAGGED): the walk reads only the range's first row, the
    records with values to escape, and the breaks; the rest it counts."""
    import asyncpg

    settings = make_settings(database_url=migrated_postgres_url, database_connect_timeout_s=30)
    engine = create_engine(
        configured_url(settings, prepare_data_dir(settings.data_dir)), connect_timeout_s=30
    )
    chain = str(uuid.UUID(int=1))
    location = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def flagged() -> list[int]:
        conn = await asyncpg.connect(location)
        try:
            rows = await conn.fetch(chain_walk._POSTGRES_FLAGGED, chain, 1, 2**63 - 1)
        finally:
            await conn.close()
        return [row["seq"] for row in rows]

    async def walked() -> chain_walk.WalkResult:
        # As the worker walks (its own event loop): in a thread of its own here.
        spec = chain_walk.WalkSpec("postgresql", location, chain, 1, GENESIS_HASH, 2)
        [result] = await asyncio.to_thread(chain_walk.walk, [spec])
        return result

    try:
        await fill(engine, 40)
        async with engine.begin() as conn:
            await append_records(conn, [odd_record("é"), odd_record('say "hi"')])
        await fill(engine, 3)
        assert await flagged() == [1, 41, 42]
        async with engine.connect() as conn:
            last_hash = str(
                await conn.scalar(sa.select(access_log.c.hash).where(access_log.c.seq == 45))
            )
        assert await walked() == chain_walk.WalkResult(
            45, 46, last_hash, first_seq=1, first_prev_hash=GENESIS_HASH
        )
        async with engine.begin() as conn:
            await conn.execute(sa.text("UPDATE access_log SET outcome = 'denied' WHERE seq = 25"))
        assert await flagged() == [1, 25, 41, 42]
        broken = await walked()
        assert (broken.problem, broken.seq, broken.records, broken.next_seq) == (
            "modified",
            25,
            24,
            25,
        )
    finally:
        await engine.dispose()


def odd_record(action: str) -> AccessRecord:
    return AccessRecord(
        at=T0,
        organisation_id=uuid.UUID(int=1),
        actor_id=None,
        actor_role="admin",
        action=action,
        object_type="account",
        object_id=None,
        outcome=Outcome.ALLOWED,
        client_type=ClientType.API,
    )
