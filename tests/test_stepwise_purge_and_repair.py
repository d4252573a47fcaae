"""Found in review of the stepwise retention purge and the repair of cut-short
ends: each a test that failed before its fix.

Real PostgreSQL, SQLite and Redis as the existing tests use them; where a
test stands in for something (a moment of contention, a lost node), it says
so at that line.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import access_log as access_log_module
from audit import retention
from audit.access_log import (
    append_records,
    verify_chain,
)
from audit.consults import mark_ended
from audit.recordings import finish_recording, start_recording
from audit.retention import PurgeReport
from audit.schema import recordings
from server.app_keys import CLUSTER, DB_ENGINE, FILE_STORE, MASTER_KEY, ROOMS
from server.housekeeping import retention_round
from server.jobs import node_round
from tests.support.harness import Harness, Sockets, admitted_pair, new_consult
from tests.support.tcp_proxy import CuttableProxy
from tests.test_bulk_jobs_loop import DEFAULTS, NOW, fill_old_records, old_record
from tests.test_outage import (  # noqa: F401  (fixtures)
    behind_redis_proxy,
    end_cut_short_after_the_room_was_saved_over,
    redis_proxy,
    told_the_end_and_closed,
)


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


# --- 1. A verify that runs while a purge goes through its steps -------------


async def test_a_verify_while_a_purge_in_steps_commits_reports_no_tampering(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge of 200,000 records now commits 10 times (STEP = 20,000), each
    commit moving the chain's start. verify_chain walks again from a moved
    start at most MOVED_STARTS (3) times, which held when a purge committed
    once; a walk of a long chain outlasts a step (0.2 s), so an admin's verify
    during the nightly purge reports records deleted: tampering, to an
    auditor, where there is none.

    STEP is 10 here (100 records, 10 steps) to keep it small; the timing is
    forced: each walk starts reading just after the purge's next step
    committed, as happens when a step commits during a walk's first batches."""
    monkeypatch.setattr(retention, "STEP", 10)
    await fill_old_records(engine, 100)
    committed: asyncio.Queue[PurgeReport] = asyncio.Queue()
    go_on: asyncio.Queue[None] = asyncio.Queue()

    async def after_step(step: PurgeReport) -> None:
        await committed.put(step)
        if step.unfinished:
            await go_on.get()

    purging = asyncio.create_task(
        retention.purge_in_steps(engine, now=NOW, defaults=DEFAULTS, after_step=after_step)
    )
    await committed.get()  # the first step is in
    walk = access_log_module._walk

    async def walk_as_a_step_commits(source: Any, starts: Any, *, plan: Any) -> Any:
        if not purging.done():
            await go_on.put(None)
            await committed.get()  # the purge's next step committed meanwhile
        return await walk(source, starts, plan=plan)

    monkeypatch.setattr(access_log_module, "_walk", walk_as_a_step_commits)
    try:
        report = await verify_chain(engine)
    finally:
        monkeypatch.setattr(access_log_module, "_walk", walk)
        for _ in range(20):
            go_on.put_nowait(None)
        await purging
    assert report.broken is None, report.broken
    assert (await verify_chain(engine)).intact


# --- 2. Files of recordings destroyed by an earlier step --------------------


async def an_expired_recording_and_25_old_records(harness: Harness) -> tuple[uuid.UUID, str]:
    """A recording whose retention is over, and 25 expired access records of
    the installation's chain (three steps of 10); its id and file name."""
    setup = await new_consult(harness)
    consult_id = uuid.UUID(setup.consult_id)
    engine, master = harness.app[DB_ENGINE], harness.app[MASTER_KEY].key
    store = harness.app[FILE_STORE]
    async with engine.begin() as conn:
        recording, writer = await start_recording(
            conn, store, master, consult_id, now=harness.clock.now()
        )
    writer.write(os.urandom(100_000))
    async with engine.begin() as conn:
        await finish_recording(conn, recording.id, writer, now=harness.clock.now())
        file_name = (
            await conn.execute(
                sa.select(recordings.c.file_name).where(recordings.c.id == recording.id)
            )
        ).scalar_one()
        await mark_ended(conn, consult_id, now=harness.clock.now())
    long_ago = harness.clock.now() - timedelta(days=40 * 365)
    async with engine.begin() as conn:
        await append_records(
            conn, [old_record(n, long_ago + timedelta(seconds=n)) for n in range(25)]
        )
    harness.clock.advance(timedelta(days=31).total_seconds())
    assert store.path(file_name).exists()
    return recording.id, file_name


async def test_a_purge_step_that_fails_leaves_no_file_of_a_destroyed_recording_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step destroys an expired recording's key and commits; the
    file is deleted only after the last step (report.files). When a later
    step failed (on SQLite "database is locked" past the busy timeout: the
    very contention the steps are for; on PostgreSQL a dropped connection),
    purge_in_steps raised, retention_round never reached delete_files, and no
    later purge knew the file (its row is gone): the encrypted media stayed
    on the disk for good. Now the purge ends at the failed step, keeping
    what the steps before did, and the next round goes on.

    Stands in for the database: the second step's transaction fails (a fake
    at the boundary, raising what SQLite raises)."""
    monkeypatch.setattr(retention, "STEP", 10)
    recording_id, file_name = await an_expired_recording_and_25_old_records(harness)
    engine, store = harness.app[DB_ENGINE], harness.app[FILE_STORE]

    real_purge = retention.purge
    calls = 0

    async def second_step_fails(*args: Any, **kwargs: Any) -> PurgeReport:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise sa.exc.OperationalError(
                "BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked")
            )
        return await real_purge(*args, **kwargs)

    monkeypatch.setattr(retention, "purge", second_step_fails)
    stopped = await retention_round(harness.app)
    assert stopped is not None
    # The first step: the recording and 9 access records (10 rows in all).
    assert (stopped.recordings, stopped.access_log_records, stopped.unfinished) == (1, 9, True)
    async with engine.connect() as conn:
        left = await conn.scalar(sa.select(sa.func.count()).where(recordings.c.id == recording_id))
    assert left == 0  # its key is destroyed
    assert not store.path(file_name).exists(), "the destroyed recording's file is left on disk"
    monkeypatch.setattr(retention, "purge", real_purge)
    # The next round (the database answers again) goes on with the log.
    report = await retention_round(harness.app)
    assert report is not None
    assert (report.access_log_records, report.unfinished) == (16, False)
    async with engine.connect() as conn:
        assert (await verify_chain(conn)).intact


async def test_a_purge_cancelled_after_its_first_step_leaves_no_file_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review of the fix above: a shutdown that cancels the purge
    between steps (the server stopping, Ctrl+C on the command line) skipped
    the deletion of the files whose keys the first step destroyed, as the
    failed step did. Each step's files are deleted right after its commit.

    Stands in for the shutdown: the second step is cancelled."""
    monkeypatch.setattr(retention, "STEP", 10)
    _recording_id, file_name = await an_expired_recording_and_25_old_records(harness)
    store = harness.app[FILE_STORE]
    real_purge = retention.purge
    calls = 0

    async def cancelled_at_the_second(*args: Any, **kwargs: Any) -> PurgeReport:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise asyncio.CancelledError
        return await real_purge(*args, **kwargs)

    monkeypatch.setattr(retention, "purge", cancelled_at_the_second)
    with pytest.raises(asyncio.CancelledError):
        await retention_round(harness.app)
    assert calls == 2
    assert not store.path(file_name).exists(), "the destroyed recording's file is left on disk"


# --- 3. The repair that finds a consult over, for the sockets on its node ---


async def test_the_repair_that_finds_the_consult_over_tells_its_sockets(
    redis_proxy: CuttableProxy,  # noqa: F811
    behind_redis_proxy: Harness,  # noqa: F811
    monkeypatch: Any,
) -> None:
    """The end was cut short after the room was saved as over (as in
    test_outage's test of 1e39a22). The missed end is kept in the memory of
    the node that ended (the API's node); when that node restarts before the
    repair (a rolling deploy during the Redis incident), the node holding
    the sockets repairs on its own: Recovery._reassert_room sees the record
    over and calls end() without again=True, finds the room over, returns:
    both stay in a call whose consult is over (the media is peer to peer).
    consult_views.consult_end promises the opposite ("the nodes' repair round
    finds the consult over and closes its participants' sockets").

    Stands in for the restart: the node's missed ends are dropped, and its
    heartbeat is taken to have met the outage (out_of_touch)."""
    harness = behind_redis_proxy
    rooms = harness.app[ROOMS]
    sockets = Sockets(harness)
    try:
        setup, therapist, patient = await admitted_pair(harness, sockets)
        await end_cut_short_after_the_room_was_saved_over(
            harness, redis_proxy, monkeypatch, setup.consult_id
        )
        # The node that held the missed end is gone (restarted).
        rooms.recovery._missed_ends.clear()
        cluster = harness.app[CLUSTER]
        assert cluster is not None
        cluster.out_of_touch = True  # a heartbeat met the outage

        await node_round(harness.app)
        # Told by the repair, which found the record over.
        await told_the_end_and_closed((therapist, patient), None)
    finally:
        await sockets.close()
