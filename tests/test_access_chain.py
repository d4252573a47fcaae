"""The access log is a hash chain: every kind of tampering is found, on
SQLite and on PostgreSQL, and concurrent appends keep it whole."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import create_engine, prepare_data_dir, upgrade
from audit.access_log import (
    GENESIS_HASH,
    PURGE_ACTION,
    AccessRecord,
    Break,
    ChainReport,
    ClientType,
    Outcome,
    append_access,
    append_records,
    canonical_fields,
    record_hash,
    verify_chain,
)
from audit.db import database_url as configured_url
from audit.roles import Role
from audit.schema import access_log, access_log_checkpoints
from tests.support.cli import cli_env, run_cli
from tests.support.harness import Harness, new_consult
from tests.support.settings import SettingsFactory

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
# The chain of the organisation every test record belongs to.
CHAIN = str(uuid.UUID(int=1))


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


def a_record(n: int) -> AccessRecord:
    return AccessRecord(
        at=T0 + timedelta(seconds=n),
        organisation_id=uuid.UUID(int=1),
        actor_id=uuid.UUID(int=2),
        actor_role="admin",
        action="account.read",
        object_type="account",
        object_id=str(uuid.UUID(int=100 + n)),
        outcome=Outcome.ALLOWED,
        client_type=ClientType.API,
    )


async def append_many(engine: AsyncEngine, count: int) -> None:
    for n in range(count):
        async with engine.begin() as conn:
            await append_access(conn, a_record(n))


async def sql(engine: AsyncEngine, statement: str, **params: object) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(statement), params)


async def verify(engine: AsyncEngine) -> ChainReport:
    """Every walk: in a worker process from the engine, in parts by workers
    side by side (as a long chain is), paced (an admin's verify: on
    PostgreSQL in windows, a joint every third record) and on the loop in a
    transaction. They must agree."""
    # Small batches: the paging is walked too.
    in_worker = await verify_chain(engine, batch=3)
    in_parts = await verify_chain(engine, batch=3, split_over=1)
    paced = await verify_chain(engine, batch=3, split_over=1, share=0.9)
    async with engine.connect() as conn:
        on_the_loop = await verify_chain(conn, batch=3)
    assert in_worker == in_parts == paced == on_the_loop
    return in_worker


async def row(engine: AsyncEngine, seq: int) -> sa.Row[tuple[object, ...]]:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(access_log).where(access_log.c.seq == seq))).one()


async def test_an_untouched_chain_verifies(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        empty = await verify_chain(conn)
    assert (empty.intact, empty.records, empty.chains) == (True, 0, 0)
    await append_many(engine, 10)
    report = await verify(engine)
    assert report.intact
    assert report.records == 10
    first = await row(engine, 1)
    assert first.prev_hash == GENESIS_HASH
    assert (report.chains, first.chain) == (1, str(uuid.UUID(int=1)))
    # The hash is over the canonical encoding of exactly these fields.
    fields = canonical_fields(
        at=first.at,
        organisation_id=first.organisation_id,
        actor_id=first.actor_id,
        actor_role=first.actor_role,
        action=first.action,
        object_type=first.object_type,
        object_id=first.object_id,
        outcome=first.outcome,
        client_type=first.client_type,
    )
    assert record_hash(fields, GENESIS_HASH) == first.hash


async def test_a_modified_record_is_named(engine: AsyncEngine) -> None:
    await append_many(engine, 8)
    await sql(engine, "UPDATE access_log SET outcome = 'refused' WHERE seq = 5")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (5, Break.MODIFIED)
    assert report.records == 4


async def test_a_modified_time_is_found_too(engine: AsyncEngine) -> None:
    await append_many(engine, 4)
    async with engine.begin() as conn:
        await conn.execute(
            access_log.update().where(access_log.c.seq == 2).values(at=T0 + timedelta(hours=1))
        )
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (2, Break.MODIFIED)


async def test_a_deleted_record_is_named(engine: AsyncEngine) -> None:
    await append_many(engine, 8)
    await sql(engine, "DELETE FROM access_log WHERE seq = 4")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (5, Break.DELETED)
    assert "4" in report.broken.detail


async def test_deleting_the_first_record_is_found(engine: AsyncEngine) -> None:
    await append_many(engine, 3)
    await sql(engine, "DELETE FROM access_log WHERE seq = 1")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (2, Break.DELETED)


async def test_an_inserted_record_is_named(engine: AsyncEngine) -> None:
    # A forger inserts a well-formed record after record 3 (its hash chained
    # to record 3's) and renumbers the rest to make room.
    await append_many(engine, 6)
    three = await row(engine, 3)
    await sql(engine, "UPDATE access_log SET seq = seq + 1000 WHERE seq > 3")
    await sql(engine, "UPDATE access_log SET seq = seq - 999 WHERE seq > 1000")
    forged = a_record(99)
    fields = canonical_fields(
        at=forged.at,
        organisation_id=forged.organisation_id,
        actor_id=forged.actor_id,
        actor_role=forged.actor_role,
        action=forged.action,
        object_type=forged.object_type,
        object_id=forged.object_id,
        outcome=forged.outcome.value,
        client_type=forged.client_type.value,
    )
    async with engine.begin() as conn:
        await conn.execute(
            access_log.insert().values(
                at=forged.at,
                organisation_id=forged.organisation_id,
                actor_id=forged.actor_id,
                actor_role=forged.actor_role,
                action=forged.action,
                object_type=forged.object_type,
                object_id=forged.object_id,
                outcome=forged.outcome.value,
                client_type=forged.client_type.value,
                chain=CHAIN,
                seq=4,
                prev_hash=three.hash,
                hash=record_hash(fields, str(three.hash)),
            )
        )
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (5, Break.INSERTED)
    assert "record 3" in report.broken.detail


async def test_a_record_appended_by_hand_is_found(engine: AsyncEngine) -> None:
    await append_many(engine, 3)
    await sql(
        engine,
        "INSERT INTO access_log (at, actor_role, action, object_type, outcome, client_type,"
        " chain, seq, prev_hash, hash)"
        " VALUES (:at, 'admin', 'x', 'y', 'allowed', 'api', :chain, 4, :prev, :h)",
        at=T0,
        chain=CHAIN,
        prev="f" * 64,
        h="e" * 64,
    )
    report = await verify(engine)
    assert report.broken is not None
    assert report.broken.seq == 4
    assert report.broken.kind in {Break.MODIFIED, Break.INSERTED}


async def test_reordered_records_are_named(engine: AsyncEngine) -> None:
    await append_many(engine, 6)
    await sql(engine, "UPDATE access_log SET seq = 100 WHERE seq = 3")
    await sql(engine, "UPDATE access_log SET seq = 3 WHERE seq = 4")
    await sql(engine, "UPDATE access_log SET seq = 4 WHERE seq = 100")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (3, Break.REORDERED)


async def test_the_first_break_is_the_one_reported(engine: AsyncEngine) -> None:
    await append_many(engine, 9)
    await sql(engine, "DELETE FROM access_log WHERE seq = 7")
    await sql(engine, "UPDATE access_log SET action = 'x' WHERE seq = 3")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (3, Break.MODIFIED)


async def test_a_changed_actor_is_found(engine: AsyncEngine) -> None:
    await append_many(engine, 5)
    async with engine.begin() as conn:
        await conn.execute(
            access_log.update().where(access_log.c.seq == 4).values(actor_id=uuid.UUID(int=3))
        )
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (4, Break.MODIFIED)


async def test_a_record_moved_to_another_chain_is_missed_in_its_own(engine: AsyncEngine) -> None:
    await append_many(engine, 5)
    await sql(engine, "UPDATE access_log SET chain = :other WHERE seq = 5", other="installation")
    report = await verify_chain(engine, chain=CHAIN)
    assert report.intact  # the last record gone: only a checkpoint of the head could tell
    await sql(engine, "UPDATE access_log SET chain = :other WHERE seq = 2", other="installation")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.chain, report.broken.seq, report.broken.kind) == (
        CHAIN,
        3,
        Break.DELETED,
    )


# SQLite only (the empty URL: the file in the data directory, migrated by the
# engine fixture): PostgreSQL keeps a time as a time, not as text.
@pytest.mark.parametrize("database_url", [""])
async def test_a_time_stored_in_another_spelling_of_the_same_moment_verifies(
    engine: AsyncEngine,
) -> None:
    # SQLite keeps times as text; the worker reads the text itself, and must
    # see the same moment SQLAlchemy reads back (no false alarm), and a
    # different moment as a change.
    assert engine.dialect.name == "sqlite"
    await append_many(engine, 4)
    await sql(engine, "UPDATE access_log SET at = '2026-11-23T09:00:02+00:00' WHERE seq = 3")
    assert (await verify(engine)).intact
    # Found in review: 26 characters with a space at [10] were taken for
    # SQLAlchemy's own spelling without looking further.
    await sql(engine, "UPDATE access_log SET at = '2026-11-23 09:00:02.00000Z' WHERE seq = 3")
    assert (await verify(engine)).intact
    await sql(engine, "UPDATE access_log SET at = '2026-11-23 09:00:02.000001' WHERE seq = 3")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (3, Break.MODIFIED)


# SQLite only, as above.
@pytest.mark.parametrize("database_url", [""])
async def test_a_time_that_cannot_be_an_instant_in_utc_is_a_change_not_a_failed_walk(
    engine: AsyncEngine,
) -> None:
    """Found in review: a time of the year 1 with an offset east of UTC has no
    UTC instant in Python (OverflowError); the walk's worker failed on it
    instead of naming the record."""
    await append_many(engine, 4)
    await sql(engine, "UPDATE access_log SET at = '0001-01-01T00:00:00+01:00' WHERE seq = 3")
    # The workers' walks only: SQLAlchemy cannot read such a time back at all.
    for report in (
        await verify_chain(engine, batch=3),
        await verify_chain(engine, batch=3, split_over=1),
    ):
        assert report.broken is not None
        assert (report.broken.seq, report.broken.kind) == (3, Break.MODIFIED)


# SQLite only, as above: PostgreSQL keeps a UUID as a UUID.
@pytest.mark.parametrize("database_url", [""])
async def test_a_uuid_stored_in_another_spelling_verifies_and_a_changed_one_does_not(
    engine: AsyncEngine,
) -> None:
    # The walk hyphenates the 32 hex digits SQLAlchemy writes without asking
    # whether they are hex; the same UUID in capitals is read as SQLAlchemy
    # would (no false alarm), and text that is no UUID, quotes and
    # backslashes included, is a change.
    assert engine.dialect.name == "sqlite"
    await append_many(engine, 5)
    stored = uuid.UUID(int=2).hex
    await sql(engine, "UPDATE access_log SET actor_id = :v WHERE seq = 2", v=stored.upper())
    assert (await verify(engine)).intact
    for changed in [
        '0000000000000000000000000000000"',
        "000000000000000000000000000000\\2",
        "z" * 32,
    ]:
        await sql(engine, "UPDATE access_log SET actor_id = :v WHERE seq = 4", v=changed)
        # The workers' walks only: SQLAlchemy cannot read such a value as a
        # UUID at all (the walk on the loop fails with a ValueError).
        for report in (
            await verify_chain(engine, batch=3),
            await verify_chain(engine, batch=3, split_over=1),
        ):
            assert report.broken is not None, changed
            assert (report.broken.seq, report.broken.kind) == (4, Break.MODIFIED)


# Values whose canonical JSON escapes something (a quote, a backslash, a
# control character, DEL, beyond ASCII): PostgreSQL's own check of a hash
# (audit/chain_walk.py, _POSTGRES_FLAGGED) quotes values as they are, so it
# must leave every such record to the walk. (NUL: SQLite only, below.)
ESCAPED = ['say "hi"', "back\\slash", "tab\there", "del\x7f", "é", "😀"]


async def append_odd(engine: AsyncEngine, count: int, odd: dict[int, str]) -> None:
    """``count`` records, the action of record n (from 1) ``odd[n]`` where given."""
    for n in range(count):
        async with engine.begin() as conn:
            record = a_record(n)
            if n + 1 in odd:
                record = replace(record, action=odd[n + 1])
            await append_access(conn, record)


async def test_records_with_values_to_escape_verify_and_a_change_among_them_is_found(
    engine: AsyncEngine,
) -> None:
    odd = dict(enumerate(ESCAPED + (["nul\x00"] if engine.dialect.name == "sqlite" else []), 2))
    await append_odd(engine, 12, odd)
    report = await verify(engine)
    assert (report.intact, report.records) == (True, 12)
    await sql(engine, "UPDATE access_log SET outcome = 'refused' WHERE seq = 5")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind, report.records) == (5, Break.MODIFIED, 4)


def unescaped_text(stored: sa.Row[tuple[object, ...]]) -> str:
    """A record's text with its values between quotes as they are: what a
    check that skipped the escaping would hash."""
    values = {**canonical_text_fields(stored), "prev_hash": stored.prev_hash}
    return (
        "{"
        + ",".join(
            f'"{key}":' + ("null" if value is None else f'"{value}"')
            for key, value in sorted(values.items())
        )
        + "}"
    )


def canonical_text_fields(stored: sa.Row[tuple[object, ...]]) -> dict[str, object]:
    return canonical_fields(
        at=stored.at if stored.at.tzinfo else stored.at.replace(tzinfo=UTC),
        organisation_id=stored.organisation_id,
        actor_id=stored.actor_id,
        actor_role=stored.actor_role,
        action=stored.action,
        object_type=stored.object_type,
        object_id=stored.object_id,
        outcome=stored.outcome,
        client_type=stored.client_type,
    )


async def hash_over_the_values_unescaped_is_named(engine: AsyncEngine, seq: int) -> None:
    """Give record ``seq`` (the last) a hash over its values unescaped; every
    walk must name it as modified."""
    stored = await row(engine, seq)
    forged = hashlib.sha256(unescaped_text(stored).encode()).hexdigest()
    assert forged != stored.hash
    await sql(engine, "UPDATE access_log SET hash = :h WHERE seq = :s", h=forged, s=seq)
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind, report.records) == (
        seq,
        Break.MODIFIED,
        seq - 1,
    )


@pytest.mark.parametrize("value", ESCAPED)
async def test_a_hash_over_the_values_unescaped_is_a_change(
    engine: AsyncEngine, value: str
) -> None:
    """A record whose hash is over its values between quotes unescaped, not
    over its canonical JSON, is not the record written: the database's own
    check (PostgreSQL) must not take it for whole."""
    await append_odd(engine, 4, {4: value})
    await hash_over_the_values_unescaped_is_named(engine, 4)


async def test_a_link_to_no_hash_with_a_hash_over_it_unescaped_is_a_change(
    engine: AsyncEngine,
) -> None:
    """PostgreSQL's check leaves ``prev_hash`` out of its test for values to
    escape, because a row it passes links to a hash in hex: a ``prev_hash``
    that is no hash breaks that link and must be named."""
    await append_many(engine, 4)
    await sql(engine, "UPDATE access_log SET prev_hash = :p WHERE seq = 4", p='say "hi"')
    await hash_over_the_values_unescaped_is_named(engine, 4)


def forged_over(stored: sa.Row[tuple[object, ...]], at: str) -> str:
    """The hash of a record's canonical text with its time spelt ``at``."""
    fields = {**canonical_text_fields(stored), "at": at, "prev_hash": stored.prev_hash}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


async def the_workers_walks(engine: AsyncEngine) -> list[ChainReport]:
    return [
        await verify_chain(engine, batch=3),
        await verify_chain(engine, batch=3, split_over=1),
    ]


# PostgreSQL only: SQLite keeps a time as text (its odd spellings above).
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_time_python_cannot_hold_is_a_change_not_a_text_to_hash(
    engine: AsyncEngine,
) -> None:
    """Found in review: ``to_char`` gives no text for 'infinity' (``concat``
    made it "") and drops the era of a year BC, so the server's own check took
    a record with such a time for whole: 'infinity' with a hash over
    ``"at":""``, and a record moved back 4,051 years with its hash as it was."""
    await append_many(engine, 5)
    stored = await row(engine, 3)
    infinite = forged_over(stored, "")
    await sql(engine, "UPDATE access_log SET at = 'infinity', hash = :h WHERE seq = 3", h=infinite)
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind, report.records) == (3, Break.MODIFIED, 2)
    await sql(
        engine,
        "UPDATE access_log SET at = :at, hash = :h WHERE seq = 3",
        at=stored.at,
        h=stored.hash,
    )
    assert (await verify(engine)).intact
    for moved in ("at - interval '4051 years'", "at + interval '8000 years'"):
        await sql(engine, f"UPDATE access_log SET at = {moved} WHERE seq = 3")  # noqa: S608 - constants
        # The workers' walks only: SQLAlchemy cannot read such a time at all.
        for report in await the_workers_walks(engine):
            assert report.broken is not None, moved
            assert (report.broken.seq, report.broken.kind) == (3, Break.MODIFIED)
        await sql(engine, "UPDATE access_log SET at = :at WHERE seq = 3", at=stored.at)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_servers_check_does_not_depend_on_how_it_reads_backslashes(
    engine: AsyncEngine,
) -> None:
    """Found in review: with ``standard_conforming_strings`` off, the test for
    values to escape read its backslashes as escapes and let a quote through."""
    await sql(
        engine,
        "DO $$ BEGIN EXECUTE format("
        "'ALTER DATABASE %I SET standard_conforming_strings = off', current_database()); END $$",
    )
    await engine.dispose()  # new connections, with the database's new setting
    await append_odd(engine, 4, {4: 'say "hi"'})
    await hash_over_the_values_unescaped_is_named(engine, 4)


async def test_a_record_at_the_last_possible_seq_is_walked(engine: AsyncEngine) -> None:
    """Found in review: the walks' open end was the highest seq itself,
    excluded, so a record moved there was never read."""
    await append_many(engine, 5)
    await sql(engine, "UPDATE access_log SET seq = 9223372036854775807 WHERE seq = 5")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind, report.records) == (2**63 - 1, Break.DELETED, 4)


async def test_hundreds_of_concurrent_appends_leave_a_whole_chain(engine: AsyncEngine) -> None:
    async def one(n: int) -> None:
        async with engine.begin() as conn:
            await append_access(conn, a_record(n))

    await asyncio.gather(*(one(n) for n in range(300)))
    report = await verify(engine)
    assert report.intact, report.broken
    assert report.records == 300


async def test_records_the_app_writes_form_a_chain(harness: Harness) -> None:
    setup = await new_consult(harness)
    await harness.client.get("/api/consults")
    await harness.client.get(f"/api/consults/{setup.consult_id}")
    await harness.client.get(f"/api/consults/{uuid.uuid4()}")
    from server.app_keys import DB_ENGINE

    async with harness.app[DB_ENGINE].connect() as conn:
        report = await verify_chain(conn)
        actions = (await conn.execute(sa.select(access_log.c.action))).scalars().all()
    assert report.intact, report.broken
    assert report.records == len(actions) >= 3
    assert "consult.read" in actions


async def test_records_from_before_the_chain_are_chained_by_the_migration(
    make_settings: SettingsFactory, empty_database_url: str
) -> None:
    settings = make_settings(database_url=empty_database_url)
    engine = create_engine(
        configured_url(settings, prepare_data_dir(settings.data_dir)),
        connect_timeout_s=settings.database.connect_timeout_s,
    )
    try:
        await upgrade(engine, to="0004")
        for n in range(5):
            await sql(
                engine,
                "INSERT INTO access_log (at, organisation_id, actor_id, actor_role, action,"
                " object_type, object_id, outcome, client_type)"
                " VALUES (:at, NULL, NULL, 'operator', 'account.create', 'account', :object,"
                " 'allowed', 'cli')",
                at=T0 + timedelta(minutes=n),
                object=str(uuid.UUID(int=n)),
            )
        await upgrade(engine)
        await append_many(engine, 2)
        async with engine.connect() as conn:
            report = await verify_chain(conn)
        assert report.intact, report.broken
        assert report.records == 7
    finally:
        await engine.dispose()


@pytest.mark.slow  # runs the command line in processes of its own
def test_the_command_line_verifies_and_names_the_break(data_dir: Path) -> None:
    env = cli_env(data_dir)
    assert run_cli("db", "upgrade", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Noord", env=env).returncode == 0
    assert run_cli("org", "add", "Praktijk Zuid", env=env).returncode == 0
    intact = run_cli("audit", "verify", env=env)
    assert intact.returncode == 0, intact.stderr
    assert "access log intact: 2 records in 2 chains" in intact.stdout

    import sqlite3

    [database] = list(data_dir.glob("*.db")) or list(data_dir.glob("*.sqlite*"))
    with sqlite3.connect(database) as db:
        [chain] = db.execute(
            "SELECT chain FROM access_log WHERE action = 'organisation.create' LIMIT 1 OFFSET 1"
        ).fetchone()
        db.execute("UPDATE access_log SET actor_role = 'admin' WHERE chain = ?", (chain,))
    broken = run_cli("audit", "verify", env=env)
    assert broken.returncode == 1
    assert f"access log BROKEN in chain {chain} at record 1 (modified)" in broken.stdout
    assert "Traceback" not in broken.stderr


async def test_each_organisation_has_its_own_chain(engine: AsyncEngine) -> None:
    other = uuid.UUID(int=7)
    for n in range(6):
        record = a_record(n)
        if n % 2:
            record = AccessRecord(**{**record.__dict__, "organisation_id": other})
        async with engine.begin() as conn:
            await append_access(conn, record)
    async with engine.connect() as conn:
        report = await verify_chain(conn)
        seqs = (
            await conn.execute(
                sa.select(access_log.c.chain, access_log.c.seq).order_by(access_log.c.id)
            )
        ).all()
    assert (report.intact, report.records, report.chains) == (True, 6, 2)
    assert [tuple(row) for row in seqs] == [
        (CHAIN, 1),
        (str(other), 1),
        (CHAIN, 2),
        (str(other), 2),
        (CHAIN, 3),
        (str(other), 3),
    ]
    # Tampering with one organisation's chain shows in that chain only.
    await sql(engine, "DELETE FROM access_log WHERE chain = :c AND seq = 2", c=str(other))
    async with engine.connect() as conn:
        mine = await verify_chain(conn, chain=CHAIN)
        theirs = await verify_chain(conn, chain=str(other))
    assert mine.intact
    assert theirs.broken is not None
    assert (theirs.broken.chain, theirs.broken.seq, theirs.broken.kind) == (
        str(other),
        3,
        Break.DELETED,
    )


async def test_a_chain_continues_from_a_checkpoint_after_its_oldest_records_go(
    engine: AsyncEngine,
) -> None:
    # What the retention purge does: delete a chain's oldest records, leave
    # a checkpoint with the last purged record's position and hash, and
    # chain a record saying so.
    await append_many(engine, 6)
    three = await row(engine, 3)
    async with engine.begin() as conn:
        await conn.execute(
            access_log_checkpoints.insert().values(
                chain=CHAIN,
                through_seq=3,
                through_hash=three.hash,
                created_at=T0,
                records_purged=3,
            )
        )
        await conn.execute(
            access_log.delete().where(access_log.c.chain == CHAIN, access_log.c.seq <= 3)
        )
        await append_access(
            conn,
            replace(
                a_record(6), action=PURGE_ACTION, object_type="access_log", object_id="through 3"
            ),
        )
    report = await verify(engine)
    assert (report.intact, report.records) == (True, 4)
    # Appends go on after it, and deleting past the checkpoint is still found.
    await append_many(engine, 1)
    await sql(engine, "DELETE FROM access_log WHERE seq = 4")
    report = await verify(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (5, Break.DELETED)


async def test_admins_read_and_verify_their_organisations_log(harness: Harness) -> None:
    from server.app_keys import DB_ENGINE

    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    for _ in range(3):
        await harness.client.get("/api/admin/accounts")
    page = await (await harness.client.get("/api/admin/access-log")).json()
    actions = [record["action"] for record in page["records"]]
    assert actions[:4] == ["account.list", "account.list", "account.list", "session.login"]
    assert page["next_before"] is None
    assert all(len(record["hash"]) == 64 for record in page["records"])
    # Found by tests/test_api_fuzz.py: "²" passed str.isdigit() and int() failed on it (500).
    for before in ("soon", "0", "²", "1²", "١٢", "-1", " 1", "1" * 19):
        bad = await harness.client.get("/api/admin/access-log", params={"before": before})
        assert bad.status == 422, before
        assert (await bad.json())["error"]["code"] == "invalid_field"
    verified = await (await harness.client.get("/api/admin/access-log/verify")).json()
    assert verified["intact"] is True
    async with harness.app[DB_ENGINE].begin() as conn:
        await conn.execute(
            sa.text("UPDATE access_log SET action = 'account.read' WHERE action = 'account.list'")
        )
    verified = await (await harness.client.get("/api/admin/access-log/verify")).json()
    assert verified["intact"] is False
    assert verified["broken"]["kind"] == "modified"
    assert verified["broken"]["chain"] == str(admin.organisation.id)


async def test_a_long_verify_from_the_engine_does_not_hold_up_appends(
    engine: AsyncEngine,
) -> None:
    # Each batch is read in its own short transaction: an append that comes
    # in meanwhile is written before the walk ends (on SQLite a single long
    # read would hold the write lock all along). 400 one-record batches: the
    # walk lasts far longer than the 20 ms before the append, however fast the
    # machine (with 40, a fast run finished the walk first now and then).
    # Written in one transaction: the walk is what must take long, not this.
    async with engine.begin() as conn:
        await append_records(conn, [a_record(n) for n in range(400)])
    order: list[str] = []

    async def walk() -> ChainReport:
        report = await verify_chain(engine, batch=1)
        order.append("verified")
        return report

    async def append_meanwhile() -> None:
        await asyncio.sleep(0.02)
        async with engine.begin() as conn:
            await append_access(conn, a_record(99))
        order.append("appended")

    report, _ = await asyncio.gather(walk(), append_meanwhile())
    assert order == ["appended", "verified"]
    assert report.intact
