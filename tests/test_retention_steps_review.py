"""Found in review of the retention purge in steps (audit.retention.purge_in_steps):
each test failed before its fix, for the reason in its docstring.

Real SQLite and PostgreSQL as the existing tests use them; where a test
stands in for something (the moment a shutdown lands), it says so at that
line.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import retention
from audit.access_log import append_records, verify_chain
from audit.consults import mark_ended
from audit.retention import PurgeReport
from audit.schema import consults, organisations, recordings
from server.app_keys import DB_ENGINE, FILE_STORE
from server.housekeeping import retention_round
from tests.support.harness import Harness, new_consult
from tests.test_bulk_jobs_loop import DEFAULTS, NOW, old_record
from tests.test_stepwise_purge_and_repair import an_expired_recording_and_25_old_records


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


# --- 1. A shutdown that lands while a step commits ---------------------------


async def test_a_purge_cancelled_while_its_step_commits_leaves_no_file_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's jobs are cancelled at shutdown (server/jobs.py; Ctrl+C
    does the same to the CLI's asyncio.run). A cancellation that reaches the
    purge while it awaits a step's COMMIT (``async with engine.begin()`` in
    purge_in_steps) does not stop the COMMIT (aiosqlite runs it in its own
    thread; asyncpg has sent it): the keys are destroyed, but CancelledError
    leaves purge_in_steps before ``delete_files(step.files)``, and no later
    purge knows the files (their rows are gone). The encrypted media stays
    on the disk for good.

    Stands in for the shutdown's timing: the task is cancelled from the
    engine's "commit" event of the purge's first step, i.e. just before the
    driver's COMMIT is awaited."""
    monkeypatch.setattr(retention, "STEP", 10)
    recording_id, file_name = await an_expired_recording_and_25_old_records(harness)
    engine, store = harness.app[DB_ENGINE], harness.app[FILE_STORE]
    purging: asyncio.Task[Any] | None = None
    cancelled = 0

    def on_commit(conn: Any) -> None:
        nonlocal cancelled
        # The first commit made while the round runs: its first step's.
        if purging is not None and not purging.done() and not cancelled:
            cancelled += 1
            purging.cancel()  # the shutdown, landing as the step commits

    sa.event.listen(engine.sync_engine, "commit", on_commit)
    try:
        purging = asyncio.create_task(retention_round(harness.app))
        with pytest.raises(asyncio.CancelledError):
            await purging
    finally:
        sa.event.remove(engine.sync_engine, "commit", on_commit)
    assert cancelled == 1
    async with engine.connect() as conn:
        left = await conn.scalar(sa.select(sa.func.count()).where(recordings.c.id == recording_id))
    assert left == 0, "the step did not commit: nothing to show"  # its key is destroyed
    assert not store.path(file_name).exists(), (
        "the destroyed recording's file is left on disk, and no later purge knows it"
    )


# --- 2. One step of many organisations' chains --------------------------------


async def test_one_step_deletes_no_more_than_step_access_records_in_all(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STEP bounds a step per chain, not per transaction: each step takes up
    to STEP records of *every* organisation's chain, in one transaction that
    holds SQLite's write lock throughout. The reason for the steps (a step
    of 10,000 takes ~0.3 s, every append waits at most 5 s) fails with the
    number of organisations: 20 organisations with a backlog (an admin
    lowering access_log_days, the first purge after an upgrade) make each
    step 200,000 records, ~6 s, and reads of personal data fail with 503, as
    with the one transaction before.

    STEP is 10 here: three organisations with 15 expired records each."""
    monkeypatch.setattr(retention, "STEP", 10)
    long_ago = NOW - timedelta(days=800)
    orgs = [uuid.uuid4() for _ in range(3)]
    async with engine.begin() as conn:
        for n, org in enumerate(orgs):
            await conn.execute(
                organisations.insert().values(id=org, name=f"org {n}", created_at=long_ago)
            )
        await append_records(
            conn,
            [
                old_record(i, long_ago + timedelta(seconds=i), org)
                for org in orgs
                for i in range(15)
            ],
        )
    steps: list[int] = []

    async def after_step(step: PurgeReport) -> None:
        steps.append(step.access_log_records)

    report = await retention.purge_in_steps(
        engine, now=NOW, defaults=DEFAULTS, after_step=after_step
    )
    assert report.access_log_records == 45
    assert (await verify_chain(engine)).intact
    assert max(steps) <= retention.STEP, (
        f"one transaction deleted {max(steps)} access records (steps: {steps}), STEP is "
        f"{retention.STEP}: the write lock is held for STEP x organisations"
    )


# --- 3. A backlog of consult records ------------------------------------------


async def test_a_backlog_of_consult_records_goes_in_steps_too(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step destroyed every expired consult record (with its
    invites and receipts) in its one transaction, however many: a practice
    that shortens consult_days from two years to one lets tens of thousands
    go at once, and on SQLite every append waits for all of them. Consult
    records count against a step's limit as access records do."""
    monkeypatch.setattr(retention, "STEP", 10)
    engine = harness.app[DB_ENGINE]
    setup = await new_consult(harness)
    ids = [uuid.UUID(setup.consult_id)]
    for _ in range(24):
        created = await harness.post("/api/consults", {})
        assert created.status == 201, await created.text()
        ids.append(uuid.UUID((await created.json())["consult"]["id"]))
    async with engine.begin() as conn:
        for consult_id in ids:
            await mark_ended(conn, consult_id, now=harness.clock.now())
    harness.clock.advance(timedelta(days=3000).total_seconds())
    steps: list[int] = []

    async def after_step(step: PurgeReport) -> None:
        steps.append(step.consults + step.recordings + step.access_log_records)

    report = await retention.purge_in_steps(
        engine, now=harness.clock.now(), defaults=DEFAULTS, after_step=after_step
    )
    assert report.consults == 25
    assert max(steps) <= retention.STEP, steps
    async with engine.connect() as conn:
        left = await conn.scalar(sa.select(sa.func.count()).select_from(consults))
        assert left == 0
        assert (await verify_chain(conn)).intact
