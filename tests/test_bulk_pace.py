"""Bulk jobs give way to signaling (issue 19, goal 1): an admin's access-log
verify and export and the retention purge rest after each piece of work,
so as to be busy at most ``database.bulk_share`` of the time, and give the
same answer as at full speed.

Each test runs on the real databases. The rests themselves are counted by
wrapping :meth:`audit.pace.Pace.rest` (or the purge's ``rest_after``) in the
test's own process: the worker processes that run them for the server
cannot be observed from here, so the walks and the export run in-process
for the counting, and through their workers for the answers."""

from __future__ import annotations

import asyncio
import csv
import io
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import access_log as access_log_module
from audit import chain_walk, export_walk, retention
from audit import pace as pace_module
from audit.access_log import GENESIS_HASH, append_records, verify_chain
from audit.chain_workers import walk_location
from audit.export_workers import exported_chunks
from audit.pace import MAX_REST_S, Pace, rest_after
from audit.schema import access_log
from server import housekeeping
from server.api import admin_access_log
from server.api.admin_access_log import export_spec
from server.app_keys import SETTINGS, WEBSOCKETS
from tests.support.harness import Harness, Sockets, waiting_pair
from tests.support.settings import SettingsFactory
from tests.test_access_coverage import access_log_verify
from tests.test_bulk_jobs_loop import DEFAULTS, NOW, fill_old_records
from tests.test_export_walk import EVERY_RECORD, ORG, odd_record


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


def test_the_rest_makes_the_job_busy_at_most_its_share() -> None:
    assert rest_after(0.1, 0.25) == pytest.approx(0.3)
    assert rest_after(0.2, 0.1) == pytest.approx(1.8)
    assert rest_after(5.0, 1.0) == 0
    # A piece that took long (a lock waited for) never makes the job sleep for minutes.
    assert rest_after(60.0, 0.1) == MAX_REST_S
    for wrong in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share must be more than 0 and at most 1"):
            rest_after(1.0, wrong)


def test_pace_rests_for_the_time_since_its_last_rest() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pace = Pace(0.2, clock=lambda: now[0], sleep=sleep)
    now[0] += 0.05  # a piece of work
    pace.rest()
    now[0] += 0.01
    pace.rest()
    assert slept == [pytest.approx(0.2), pytest.approx(0.04)]
    assert pace.rested_s == pytest.approx(0.24)
    # Busy 0.06 s in 0.30 s: the share.
    assert 0.06 / (now[0] - 100.0) == pytest.approx(0.2)
    full = Pace(1.0, clock=lambda: now[0], sleep=sleep)
    now[0] += 3.0
    full.rest()
    assert len(slept) == 2


@pytest.fixture
def rests(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The shares of the rests taken in this process (at share 1 none is)."""
    taken: list[float] = []
    rest = Pace.rest

    def counted(self: Pace) -> None:
        if self.share < 1:
            taken.append(self.share)
        rest(self)

    monkeypatch.setattr(Pace, "rest", counted)
    return taken


async def test_a_paced_walk_rests_between_its_pieces_and_finds_the_same(
    engine: AsyncEngine, rests: list[float]
) -> None:
    """Paced, the walk reads ``batch`` records at a time and checks each
    itself, on PostgreSQL too (there the database checks them at full
    speed, in one statement that keeps its process busy for seconds): a
    rest between batches, none after the last, and the same result."""
    async with engine.begin() as conn:
        await append_records(conn, [odd_record(n, ORG) for n in range(25)])
    location = walk_location(engine)
    assert location is not None
    spec = chain_walk.WalkSpec(*location, str(ORG), 1, GENESIS_HASH, 4)
    # In a thread: the PostgreSQL walk runs a loop of its own, as in its worker.
    (full,) = await asyncio.to_thread(chain_walk.walk, [spec])
    assert rests == []
    (paced,) = await asyncio.to_thread(chain_walk.walk, [replace(spec, share=0.9)])
    assert paced == full
    assert (full.records, full.problem) == (25, None)
    assert rests == [0.9] * 6  # 25 records, 4 at a time: 7 batches
    # The server's verify with its share: the same report, in its worker.
    assert await verify_chain(engine, share=0.9) == await verify_chain(engine)


async def test_a_paced_walk_finds_a_record_changed_at_a_batchs_joint(
    engine: AsyncEngine,
) -> None:
    """A batch's first record is checked against the last of the batch
    before, which another statement read: a change there is found too."""
    async with engine.begin() as conn:
        await append_records(conn, [odd_record(n, ORG) for n in range(12)])
        await conn.execute(
            access_log.update().where(access_log.c.seq == 5).values(outcome="denied")
        )
    full = await verify_chain(engine, batch=4)
    paced = await verify_chain(engine, batch=4, share=0.9)
    assert paced == full
    assert paced.broken is not None
    assert (paced.broken.seq, paced.records) == (5, 4)


async def export_of(engine: AsyncEngine, share: float) -> bytes:
    spec = export_spec(engine, ORG, EVERY_RECORD, "csv", "", batch=4, share=share)
    return b"".join([chunk async for chunk in exported_chunks(spec)])


async def test_a_paced_export_rests_between_batches_and_writes_the_same(
    engine: AsyncEngine, rests: list[float]
) -> None:
    async with engine.begin() as conn:
        await append_records(conn, [odd_record(n, ORG) for n in range(10)])
    # Through the worker, as the server runs it: the same bytes.
    full = await export_of(engine, 1.0)
    assert await export_of(engine, 0.9) == full
    assert len(list(csv.reader(io.StringIO(full.decode())))) == 11  # the header, ten records
    # In this process, to count the rests: 10 records, 4 at a time, 3 batches.
    spec = export_spec(engine, ORG, EVERY_RECORD, "csv", "", batch=4, share=0.9)

    class Sink:
        written = b""

        def write(self, data: bytes) -> None:
            self.written += data

        def flush(self) -> None:
            pass

    sink: Any = Sink()
    await asyncio.to_thread(export_walk.export, spec, sink)
    assert sink.written == full
    assert rests == [0.9, 0.9]


async def test_the_purge_rests_between_its_steps_for_its_share(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retention purge, the server's and the command line's, rests
    between steps for ``share`` (on SQLite at least STEP_PAUSE_S)."""
    monkeypatch.setattr(retention, "STEP", 10)
    await fill_old_records(engine, 35)
    asked: list[tuple[float, float]] = []

    def rest(busy_s: float, share: float) -> float:
        asked.append((busy_s, share))
        return 0.0

    monkeypatch.setattr(pace_module, "rest_after", rest)
    report = await retention.purge_in_steps(engine, now=NOW, defaults=DEFAULTS, share=0.3)
    assert report.access_log_records == 35
    # The share checked first; then four steps of at most ten rows each, a
    # rest after each but the last.
    assert asked[0] == (0.0, 0.3)
    assert [share for _, share in asked[1:]] == [0.3, 0.3, 0.3]
    assert all(busy > 0 for busy, _ in asked[1:])


@pytest.mark.settings(database_bulk_share="0.5")
async def test_the_server_paces_its_bulk_jobs_while_it_has_consults(
    harness: Harness, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``database.bulk_share`` reaches the verify's walk, the export's worker
    and the server's retention purge while a consult's socket is open on
    the node; with none open they run at full speed (nothing waits for a
    core). Each still answers as before. All three share it with the
    machine's other paced jobs in the data dir's ``bulk-jobs``."""
    shares: dict[str, float] = {}
    peers: set[str | None] = set()
    # The names each module imported, wrapped where it calls them.
    walk = vars(access_log_module)["walk_in_workers"]
    export = vars(admin_access_log)["exported_chunks"]
    purge = vars(housekeeping)["purge_in_steps"]

    async def walk_spied(*args: Any) -> Any:
        shares["verify"] = args[-1].share
        peers.add(args[-1].peers)
        return await walk(*args)

    def export_spied(spec: Any) -> Any:
        shares["export"] = spec.share
        peers.add(spec.peers)
        return export(spec)

    async def purge_spied(*args: Any, **kwargs: Any) -> Any:
        shares["retention"] = kwargs["share"]
        peers.add(kwargs["peers"])
        return await purge(*args, **kwargs)

    monkeypatch.setattr(access_log_module, "walk_in_workers", walk_spied)
    monkeypatch.setattr(admin_access_log, "exported_chunks", export_spied)
    monkeypatch.setattr(housekeeping, "purge_in_steps", purge_spied)

    async def run_all() -> dict[str, float]:
        shares.clear()
        verified = await harness.client.get("/api/admin/access-log/verify")
        assert verified.status == 200
        assert (await verified.json())["intact"] is True
        exported = await harness.client.get(
            "/api/admin/access-log/export", params={"format": "json"}
        )
        assert exported.status == 200
        assert (await exported.json())["records"]
        await housekeeping.retention_round(harness.app)
        return dict(shares)

    await waiting_pair(harness, sockets)  # a therapist and a patient connected
    await access_log_verify(harness)  # the admin logs in (the sockets stay open)
    assert harness.app[WEBSOCKETS]
    assert await run_all() == {"verify": 0.5, "export": 0.5, "retention": 0.5}
    assert peers == {str(harness.app[SETTINGS].data_dir / "bulk-jobs")}
    await sockets.close()
    for _ in range(100):
        if not harness.app[WEBSOCKETS]:
            break
        await asyncio.sleep(0.05)
    assert await run_all() == {"verify": 1.0, "export": 1.0, "retention": 1.0}


def test_bulk_jobs_default_to_a_tenth_of_the_time(make_settings: SettingsFactory) -> None:
    assert make_settings().database.bulk_share == 0.1
