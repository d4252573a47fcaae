"""Bulk jobs leave the event loop free: a retention purge and a long
verify, measured with the loop-lag watcher (server/loop_lag.py), on SQLite
and PostgreSQL. Sizes are kept small for a quick suite; the benchmark
(bench/access_chain.py) measures a verify of a million records."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import retention
from audit.access_log import AccessRecord, ClientType, Outcome, append_records, verify_chain
from audit.retention import PurgeReport, Retention, purge
from audit.schema import access_log, access_log_checkpoints
from tests.support.loop_probe import longest_hold

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
DEFAULTS = Retention(consult_days=730, recording_days=30, access_log_days=365)
# A job may hold the loop this long, or three times what the machine at rest
# showed just before (a shared, loaded machine makes the loop's own thread
# wait for a core: 300 ms seen at load 22). A job that did its work on the
# loop would hold it for hundreds of ms per batch on a quiet machine.
MOST_HOLD_S = 0.1


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


def old_record(n: int, at: datetime, organisation_id: uuid.UUID | None = None) -> AccessRecord:
    """An operator's record ``n`` of the installation's chain (or of
    ``organisation_id``'s), written ``at``."""
    return AccessRecord(
        at=at,
        organisation_id=organisation_id,
        actor_id=None,
        actor_role="operator",
        action="account.create",
        object_type="account",
        object_id=str(uuid.UUID(int=n)),
        outcome=Outcome.ALLOWED,
        client_type=ClientType.CLI,
    )


async def fill_old_records(engine: AsyncEngine, count: int) -> None:
    """``count`` records of the installation's chain, two years old and older."""
    start = NOW - timedelta(days=800)
    for first in range(0, count, 2_000):
        async with engine.begin() as conn:
            await append_records(
                conn,
                [
                    old_record(n, start + timedelta(seconds=n))
                    for n in range(first, min(count, first + 2_000))
                ],
            )


async def purge_all(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        report = await purge(conn, now=NOW, defaults=DEFAULTS)
    return report.access_log_records


async def test_a_retention_purge_of_20000_records_never_holds_the_loop(engine: AsyncEngine) -> None:
    await fill_old_records(engine, 20_000)
    purged, held_s, at_rest_s = await longest_hold(purge_all(engine))
    assert purged == 20_000
    assert held_s < max(MOST_HOLD_S, 3 * at_rest_s)
    async with engine.connect() as conn:
        left = await conn.scalar(sa.select(sa.func.count()).select_from(access_log))
    assert left == 1  # the purge's own record
    assert (await verify_chain(engine)).intact


async def test_a_verify_of_20000_records_never_holds_the_loop(engine: AsyncEngine) -> None:
    await fill_old_records(engine, 20_000)
    report, held_s, at_rest_s = await longest_hold(verify_chain(engine))
    assert (report.intact, report.records) == (True, 20_000)
    assert held_s < max(MOST_HOLD_S, 3 * at_rest_s)


async def test_a_large_access_log_purge_commits_in_steps_each_verifiable(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite one transaction holds the write lock until it ends: a purge of
    hundreds of thousands of records in one would hold every append (and so
    every read of personal data) past the busy timeout. The purge deletes at
    most ``STEP`` records of a chain per transaction, each with its checkpoint
    and purge record, so the chain verifies between any two of them."""
    monkeypatch.setattr(retention, "STEP", 1_000)
    await fill_old_records(engine, 2_500)
    after_each: list[tuple[int, bool]] = []

    async def observe(step: PurgeReport) -> None:
        async with engine.connect() as conn:
            left = await conn.scalar(
                sa.select(sa.func.count()).where(access_log.c.action == "account.create")
            )
        after_each.append((int(left or 0), (await verify_chain(engine)).intact))

    report = await retention.purge_in_steps(engine, now=NOW, defaults=DEFAULTS, after_step=observe)
    assert report.access_log_records == 2_500
    assert after_each == [(1_500, True), (500, True), (0, True)]
    async with engine.connect() as conn:
        purged = (
            await conn.execute(
                sa.select(access_log_checkpoints.c.records_purged).order_by(
                    access_log_checkpoints.c.through_seq
                )
            )
        ).scalars()
        assert list(purged) == [1_000, 1_000, 500]
        purge_records = await conn.scalar(
            sa.select(sa.func.count()).where(access_log.c.action == "access_log.purge")
        )
    assert purge_records == 3
    assert (await verify_chain(engine)).intact


async def test_a_purge_in_steps_with_nothing_more_to_do_takes_one_step(
    engine: AsyncEngine,
) -> None:
    await fill_old_records(engine, 10)
    steps: list[int] = []

    async def observe(step: PurgeReport) -> None:
        steps.append(step.access_log_records)

    report = await retention.purge_in_steps(engine, now=NOW, defaults=DEFAULTS, after_step=observe)
    assert (report.access_log_records, steps) == (10, [10])


# SQLite (the file in the data directory): its one writer at a time.
@pytest.mark.parametrize("database_url", [""])
async def test_appends_get_in_between_the_steps_of_a_purge_on_sqlite(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer waiting for SQLite's lock retries every 100 ms at most, and the
    next step of the purge took the lock again within a millisecond of its
    commit: the writer waited for the whole purge, past the busy timeout for a
    long one (bench/purge_steps.py: 300,000 records, one append in 5 s failed
    both ways). The purge pauses between steps on SQLite, and the appends
    waiting get in between."""
    monkeypatch.setattr(retention, "STEP", 2_000)
    await fill_old_records(engine, 10_000)
    appended = 0
    purging = True

    async def appender() -> None:
        nonlocal appended
        while purging:
            async with engine.begin() as conn:
                await append_records(
                    conn,
                    [
                        AccessRecord(
                            at=NOW,
                            organisation_id=None,
                            actor_id=None,
                            actor_role="operator",
                            action="account.read",
                            object_type="account",
                            object_id=str(appended),
                            outcome=Outcome.ALLOWED,
                            client_type=ClientType.CLI,
                        )
                    ],
                )
            appended += 1

    seen: list[int] = []

    async def after_step(step: PurgeReport) -> None:
        seen.append(appended)

    writing = asyncio.create_task(appender())
    try:
        await asyncio.sleep(0.1)
        report = await retention.purge_in_steps(
            engine, now=NOW, defaults=DEFAULTS, after_step=after_step
        )
    finally:
        purging = False
        await writing
    assert report.access_log_records == 10_000
    assert len(seen) == 5
    # Appends went in between (almost) every two steps, not only after the last.
    grew = sum(later > earlier for earlier, later in itertools.pairwise(seen))
    assert grew >= 3, seen
    assert (await verify_chain(engine)).intact
