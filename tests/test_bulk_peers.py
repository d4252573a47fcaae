"""The paced bulk jobs of one machine share ``database.bulk_share`` between
them (audit/pace.py ``Peers``), as autovacuum's workers share one cost
limit: a verify, an export and a purge at once are together busy at most
the share, not three times it. On SQLite and PostgreSQL, the real worker
processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from contextlib import aclosing
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import append_records
from audit.export_workers import exported_chunks
from audit.pace import Pace
from server.api.admin_access_log import export_spec
from tests.support.access_records import consult_read
from tests.test_export_walk import EVERY_RECORD, ORG, T0


def test_paced_jobs_on_one_machine_share_the_share(tmp_path: Path) -> None:
    peers = str(tmp_path / "bulk-jobs")
    first = Pace(0.3, peers=peers)
    assert first.part() == pytest.approx(0.3)
    with Pace(0.3, peers=peers) as second:
        assert first.part() == pytest.approx(0.15)
        assert second.part() == pytest.approx(0.15)
        # A job at full speed is not paced and takes no part.
        with Pace(1.0, peers=peers) as unpaced:
            assert first.part() == pytest.approx(0.15)
            assert unpaced.part() == 1.0
    assert first.part() == pytest.approx(0.3)
    first.close()
    assert os.listdir(peers) == []


def test_a_rest_is_for_the_jobs_part_of_the_share(tmp_path: Path) -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    peers = str(tmp_path / "bulk-jobs")
    with Pace(0.2, peers=peers, clock=lambda: now[0], sleep=sleep) as pace:
        now[0] += 0.1
        pace.rest()  # alone: busy 0.1 s of 0.5
        with Pace(0.2, peers=peers):
            now[0] += 0.1
            pace.rest()  # one of two: busy 0.1 s of 1.0
    assert slept == [pytest.approx(0.4), pytest.approx(0.9)]


def test_a_job_in_another_process_counts_until_that_process_dies(tmp_path: Path) -> None:
    """A job's file counts while its process holds it locked. A worker killed
    mid-job (its client went away: the export's worker is SIGKILLed) leaves
    its file behind, unlocked: the next count drops it."""
    peers = tmp_path / "bulk-jobs"
    code = (
        "import sys, time; from audit.pace import Peers; Peers(sys.argv[1]); "
        "print('ready', flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(peers)], stdout=subprocess.PIPE, text=True
    ) as other:
        try:
            assert other.stdout is not None
            assert other.stdout.readline() == "ready\n"
            (theirs,) = os.listdir(peers)
            assert theirs.startswith(f"{other.pid}-")
            with Pace(0.3, peers=str(peers)) as pace:
                assert pace.part() == pytest.approx(0.15)
                other.kill()
                other.wait()
                assert pace.part() == pytest.approx(0.3)
                assert theirs not in os.listdir(peers)
        finally:
            other.kill()
    assert os.listdir(peers) == []


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


async def test_a_paced_exports_worker_takes_its_part_while_it_works(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """The worker process registers while it exports and leaves when done;
    the server's process registers nothing for it."""
    async with engine.begin() as conn:
        await append_records(
            conn,
            [
                consult_read(n, T0 + timedelta(seconds=n), ORG, uuid.UUID(int=n))
                for n in range(3_000)
            ],
        )
    peers = tmp_path / "bulk-jobs"
    spec = export_spec(engine, ORG, EVERY_RECORD, "csv", "", batch=500, share=0.9, peers=str(peers))
    seen: set[str] = set()
    size = 0
    async with aclosing(exported_chunks(spec)) as chunks:
        async for chunk in chunks:
            size += len(chunk)
            # 3,000 lines outgrow the pipe: the worker waits for this read.
            seen.update(os.listdir(peers))
            await asyncio.sleep(0)
    assert size > 300_000
    pids = {int(name.partition("-")[0]) for name in seen}
    assert len(pids) == 1
    assert os.getpid() not in pids
    assert os.listdir(peers) == []
