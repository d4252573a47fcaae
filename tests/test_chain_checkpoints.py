"""The access log's checkpoints (where a chain goes on after retention purged
its oldest records) and a verify that a purge overlaps.

Found in review: a verify that read where a chain starts just before a purge
committed reported the purged records as deleted (tampering that never
happened); and a checkpoint row put in by hand made the walk skip records
still in the log, a changed one among them (tampering that went unseen).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

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
from audit.retention import Retention, purge
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
        five = (
            await conn.execute(
                sa.select(access_log.c.hash).where(
                    access_log.c.chain == INSTALLATION_CHAIN, access_log.c.seq == 5
                )
            )
        ).scalar_one()
        await conn.execute(
            access_log_checkpoints.insert().values(
                chain=INSTALLATION_CHAIN,
                through_seq=5,
                through_hash=five,
                created_at=T0,
                records_purged=5,
            )
        )
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
        five = (
            await conn.execute(
                sa.select(access_log.c.hash).where(
                    access_log.c.chain == INSTALLATION_CHAIN, access_log.c.seq == 5
                )
            )
        ).scalar_one()
        await conn.execute(
            access_log.delete().where(
                access_log.c.chain == INSTALLATION_CHAIN, access_log.c.seq <= 5
            )
        )
        await conn.execute(
            access_log_checkpoints.insert().values(
                chain=INSTALLATION_CHAIN,
                through_seq=5,
                through_hash=five,
                created_at=T0,
                records_purged=5,
            )
        )
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
