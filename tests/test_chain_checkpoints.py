"""The access log's checkpoints (where a chain goes on after retention purged
its oldest records) and a verify that a purge overlaps.

Found in review: a verify that read where a chain starts just before a purge
committed reported the purged records as deleted (tampering that never
happened); and a checkpoint row put in by hand made the walk skip records
still in the log, a changed one among them (tampering that went unseen).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import audit.access_log as access_log_module
from audit.access_log import (
    INSTALLATION_CHAIN,
    AccessRecord,
    Break,
    ChainReport,
    ClientType,
    Outcome,
    append_records,
    verify_chain,
)
from audit.chain_heads import chain_start
from audit.retention import Retention, _purge_chain, purge
from audit.schema import access_log, access_log_checkpoints

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def installation_record(n: int) -> AccessRecord:
    """An operator's record (the installation's chain), ``n`` seconds after T0."""
    return AccessRecord(
        at=T0 + timedelta(seconds=n),
        organisation_id=None,
        actor_id=None,
        actor_role="operator",
        action="account.read",
        object_type="account",
        object_id=f"object-{n}",
        outcome=Outcome.ALLOWED,
        client_type=ClientType.CLI,
    )


async def hand_made_checkpoint(
    conn: AsyncConnection, *, through: int, deleting: bool, at: datetime = T0
) -> None:
    """A checkpoint row through record ``through`` of the installation's chain,
    put in by hand (no purge made it, so no purge record says so), with the
    records up to it deleted (``deleting``) or left in the log."""
    last = (
        await conn.execute(
            sa.select(access_log.c.hash).where(
                access_log.c.chain == INSTALLATION_CHAIN, access_log.c.seq == through
            )
        )
    ).scalar_one()
    if deleting:
        await conn.execute(
            access_log.delete().where(
                access_log.c.chain == INSTALLATION_CHAIN, access_log.c.seq <= through
            )
        )
    await conn.execute(
        access_log_checkpoints.insert().values(
            chain=INSTALLATION_CHAIN,
            through_seq=through,
            through_hash=last,
            created_at=at,
            records_purged=through,
        )
    )


# SQLite (the file in the data directory): each batch of a walk is a read of its own.
@pytest.mark.parametrize("database_url", [""])
async def test_a_verify_that_a_retention_purge_overlaps_does_not_report_tampering(
    migrated_engine: AsyncEngine,
) -> None:
    """The hourly retention purge and an admin's "Verify the chain" (or the
    nightly `videoconsult audit verify`) overlap: the walk read where the
    chain starts (genesis, no checkpoint yet) before the purge committed, and
    then finds the purged records missing."""
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [installation_record(n) for n in range(20_000)])
    timeline: list[str] = []

    async def walk() -> object:
        report = await verify_chain(engine, batch=1)
        timeline.append("verified")
        return report

    async def purge_meanwhile() -> None:
        await asyncio.sleep(0.05)
        async with engine.begin() as conn:
            report = await purge(
                conn,
                now=T0 + timedelta(days=30),
                defaults=Retention(consult_days=730, recording_days=30, access_log_days=7),
            )
        assert report.access_log_records == 20_000
        timeline.append("purged")

    started = time.monotonic()
    report, _ = await asyncio.gather(walk(), purge_meanwhile())
    assert timeline == ["purged", "verified"], f"no overlap ({time.monotonic() - started:.2f} s)"
    # Nobody touched the log: the purge did what retention asks, and the chain
    # verifies from its checkpoint once the walk starts again.
    assert (await verify_chain(engine)).intact
    assert isinstance(report, ChainReport)
    assert report.broken is None, report.broken


async def test_a_checkpoint_row_does_not_hide_changed_records_that_are_still_in_the_log(
    migrated_engine: AsyncEngine,
) -> None:
    """A checkpoint is only ever written by the purge, which deletes every
    record up to it in the same transaction and chains an ``access_log.purge``
    record saying so. A row put into ``access_log_checkpoints`` by hand (it is
    in no chain, nothing protects it) makes the walk start after it: the
    records before it, still in the log, still read and exported by the
    admin as evidence, are no longer verified at all."""
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [installation_record(n) for n in range(10)])
        await conn.execute(
            sa.text("UPDATE access_log SET outcome = 'refused' WHERE chain = :c AND seq = 3"),
            {"c": INSTALLATION_CHAIN},
        )
    found = await verify_chain(engine)
    assert found.broken is not None  # as it should
    assert found.broken.kind is Break.MODIFIED
    async with engine.begin() as conn:
        await hand_made_checkpoint(conn, through=5, deleting=False)
    async with engine.connect() as conn:
        still_there = await conn.scalar(
            sa.select(sa.func.count()).where(
                access_log.c.chain == INSTALLATION_CHAIN, access_log.c.seq <= 5
            )
        )
    assert still_there == 5  # the changed record 3 is still in the log (and in every export)
    report = await verify_chain(engine)
    assert report.broken is not None, (
        f"verified intact ({report.records} records) with changed record 3 still in the log"
    )


async def test_a_checkpoint_no_purge_record_accounts_for_is_a_deletion(
    migrated_engine: AsyncEngine,
) -> None:
    """Records deleted by hand behind a checkpoint row put in by hand: the
    purge that would have made the checkpoint also chains a record saying
    what it removed, and without it the deletion is reported."""
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [installation_record(n) for n in range(10)])
        await hand_made_checkpoint(conn, through=5, deleting=True)
    report = await verify_chain(engine)
    assert report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (6, Break.DELETED)
    assert "no purge record" in report.broken.detail


async def test_a_real_purge_leaves_a_chain_that_verifies_from_its_checkpoint(
    migrated_engine: AsyncEngine,
) -> None:
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [installation_record(n) for n in range(10)])
        purged = await purge(
            conn,
            now=T0 + timedelta(days=30),
            defaults=Retention(consult_days=730, recording_days=30, access_log_days=7),
        )
    assert purged.access_log_records == 10
    report = await verify_chain(engine)
    assert report.broken is None
    assert report.records == 1  # the purge's own record, after the checkpoint


@pytest.mark.parametrize("database_url", [""])
async def test_a_start_moved_during_a_walk_is_checked_like_the_first(
    migrated_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review of the fix: it refused a checkpoint that no chained purge record accounts for
    (records deleted by hand behind a checkpoint put in by hand) -- but only
    for the start read before the walk. When the walk finds a problem and
    the start has moved, the chain is walked again from the new start
    without that check: the same forged checkpoint, put in while a verify
    runs, makes that verify report the chain intact."""
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [installation_record(n) for n in range(10)])
    real_walk = access_log_module._walk
    walks = 0

    async def forged_meanwhile(*args: Any, **kwargs: Any) -> Any:
        nonlocal walks
        walks += 1
        if walks == 1:
            async with engine.begin() as conn:
                await hand_made_checkpoint(conn, through=5, deleting=True)
        return await real_walk(*args, **kwargs)

    monkeypatch.setattr(access_log_module, "_walk", forged_meanwhile)
    raced = await verify_chain(engine, chain=INSTALLATION_CHAIN)
    monkeypatch.setattr(access_log_module, "_walk", real_walk)
    afterwards = await verify_chain(engine, chain=INSTALLATION_CHAIN)
    assert afterwards.broken is not None  # a verify after the forgery sees it
    assert raced.broken is not None, (
        "the verify that overlapped the forgery reported the chain intact "
        f"({raced.records} records walked)"
    )


@pytest.mark.parametrize("database_url", [""])
async def test_a_purge_during_a_walk_of_several_chains_is_walked_again_not_a_crash(
    migrated_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review of the fix: it walked a chain again when a purge moved its start meanwhile.
    With an engine the chains are walked in worker processes
    (walk_in_workers), which stop at the first break and return fewer
    results than chains. When the re-walk of that chain is clean, the loop
    goes on to ``zip(starts, results, strict=True)``, which has no result
    for the next chain: ValueError, instead of verifying the rest (without
    strict it would report chains never walked as intact)."""
    engine = migrated_engine
    organisation = uuid.UUID(int=1)  # its chain sorts before "installation"
    async with engine.begin() as conn:
        records = [installation_record(n) for n in range(10)]
        records += [
            dataclasses.replace(installation_record(n), organisation_id=organisation)
            for n in range(10)
        ]
        await append_records(conn, records)
    real_walk = access_log_module._walk
    walks = 0

    async def purged_meanwhile(*args: Any, **kwargs: Any) -> Any:
        nonlocal walks
        walks += 1
        if walks == 1:  # the hourly retention purge commits during the walk
            async with engine.begin() as conn:
                await _purge_chain(
                    conn,
                    organisation,
                    datetime(2100, 1, 1, tzinfo=UTC),
                    now=datetime.now(UTC),
                    dry_run=False,
                    progress=None,
                )
        return await real_walk(*args, **kwargs)

    monkeypatch.setattr(access_log_module, "_walk", purged_meanwhile)
    report = await verify_chain(engine)
    assert report.broken is None
    assert report.chains == 2


async def test_where_a_chain_starts_is_read_in_two_statements_however_many_checkpoints(
    migrated_engine: AsyncEngine,
) -> None:
    """Every hourly purge (and every step of a long one) leaves a checkpoint;
    finding where a chain starts read every one of them and looked for
    records behind each. It reads the chain's lowest record and the newest
    checkpoint before it, whatever the number of checkpoints."""
    engine = migrated_engine
    async with engine.begin() as conn:
        await append_records(conn, [installation_record(n) for n in range(30)])
    for through in range(5, 30, 5):
        async with engine.begin() as conn:
            await hand_made_checkpoint(conn, through=through, deleting=True)
    # One more, beyond the records still there (a hand-made one: not a start).
    async with engine.begin() as conn:
        await append_records(conn, [installation_record(n) for n in range(30, 40)])
        await hand_made_checkpoint(conn, through=35, deleting=False)
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        async with engine.connect() as conn:
            seq, _ = await chain_start(conn, INSTALLATION_CHAIN)
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert seq == 26  # after the newest checkpoint whose records are gone
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) <= 2
