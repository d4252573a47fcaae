"""Bulk jobs paced (audit/pace.py and its callers): what a review of the
change found, each a test that failed before its fix, and the guards it
added ("Guard": passed from the start)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import access_log as access_log_module
from audit import retention
from audit.access_log import Break, ChainReport, append_records, verify_chain
from audit.export_workers import exported_chunks
from audit.schema import access_log
from server.api.admin_access_log import export_spec
from tests.test_access_chain import (
    ESCAPED,
    append_many,
    append_odd,
    sql,
)
from tests.test_bulk_jobs_loop import DEFAULTS, NOW, fill_old_records
from tests.test_export_walk import EVERY_RECORD, ORG, odd_record


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


async def full_and_paced(engine: AsyncEngine, batch: int = 3) -> tuple[ChainReport, ChainReport]:
    full = await verify_chain(engine, batch=batch, share=1.0)
    paced = await verify_chain(engine, batch=batch, share=0.9)
    return full, paced


# ---------------------------------------------------------------------------
# 1. Tamper detection of the paced walk: the same report as the unpaced one.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("moved", ["at - interval '4051 years'", "at + interval '8000 years'"])
async def test_paced_walk_names_a_time_python_cannot_hold_as_the_full_one_does(
    engine: AsyncEngine, moved: str
) -> None:
    """tests/test_access_chain.py's ``the_workers_walks`` leaves the paced
    walk out for times before the year 1 and after 9999."""
    await append_many(engine, 7)
    await sql(engine, f"UPDATE access_log SET at = {moved} WHERE seq = 4")  # noqa: S608
    full, paced = await full_and_paced(engine)
    assert full.broken is not None
    assert (full.broken.seq, full.broken.kind) == (4, Break.MODIFIED)
    assert paced == full


@pytest.mark.parametrize("joint", [3, 4])
async def test_paced_walk_finds_odd_characters_changed_at_a_joint(
    engine: AsyncEngine, joint: int
) -> None:
    odd = {n: value for n, value in enumerate(ESCAPED, 1)}
    await append_odd(engine, 7, odd)
    full, paced = await full_and_paced(engine)
    assert (full.intact, full.records) == (True, 7)
    assert paced == full
    await sql(engine, "UPDATE access_log SET outcome = 'refused' WHERE seq = :s", s=joint)
    full, paced = await full_and_paced(engine)
    assert full.broken is not None
    assert (full.broken.seq, full.broken.kind) == (joint, Break.MODIFIED)
    assert paced == full


async def verify_with_a_purge_before_the_walk(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, share: float
) -> ChainReport:
    """verify_chain with a retention purge committed after it read where the
    chain starts and before its worker reads the records."""
    walk = vars(access_log_module)["walk_in_workers"]
    purged: list[bool] = []

    async def purge_first(*args: Any) -> Any:
        if not purged:
            purged.append(True)
            await retention.purge_in_steps(engine, now=NOW, defaults=DEFAULTS)
        return await walk(*args)

    monkeypatch.setattr(access_log_module, "walk_in_workers", purge_first)
    try:
        return await verify_chain(engine, batch=4, share=share)
    finally:
        monkeypatch.setattr(access_log_module, "walk_in_workers", walk)
        assert purged


async def test_paced_walk_gives_the_full_report_when_a_purge_moved_the_start(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard (passes): the chain is walked again from its new start, paced
    as at full speed."""
    monkeypatch.setattr(retention, "STEP", 10)
    await fill_old_records(engine, 25)
    full = await verify_with_a_purge_before_the_walk(engine, monkeypatch, 1.0)
    await fill_old_records(engine, 25)
    paced = await verify_with_a_purge_before_the_walk(engine, monkeypatch, 0.9)
    assert full.intact
    assert paced.intact


# ---------------------------------------------------------------------------
# 2. The worker scripts' import of their sibling pace.py.
# ---------------------------------------------------------------------------


def shadowing_pace(tmp_path: Path) -> Path:
    """A directory with a module ``pace`` that is not audit/pace.py (as the
    PyPI distribution "pace" would put one in site-packages)."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "pace.py").write_text(
        "class Pace:\n"
        "    def __init__(self, share, **kwargs):\n"
        "        raise RuntimeError('not audit/pace.py')\n"
    )
    return other


async def test_a_module_named_pace_on_the_path_does_not_replace_the_walks_pace(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the worker appended its own directory to the END of
    sys.path and imported ``pace``: a module of that name anywhere before it
    (a PYTHONPATH entry, the user's or the system's site-packages) was
    imported instead of audit/pace.py. Every walk builds a Pace, so even the
    full-speed verify (``videoconsult audit verify``) broke. The worker now
    runs its sibling pace.py by its path."""
    await append_many(engine, 7)
    monkeypatch.setenv("PYTHONPATH", str(shadowing_pace(tmp_path)))
    full = await verify_chain(engine, batch=3, share=1.0)
    assert (full.intact, full.records) == (True, 7)
    paced = await verify_chain(engine, batch=3, share=0.5)
    assert paced == full


async def test_a_module_named_pace_on_the_path_does_not_replace_the_exports_pace(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine.begin() as conn:
        await append_records(conn, [odd_record(n, ORG) for n in range(5)])
    spec = export_spec(engine, ORG, EVERY_RECORD, "csv", "", batch=2, share=0.5)
    before = b"".join([chunk async for chunk in exported_chunks(spec)])
    monkeypatch.setenv("PYTHONPATH", str(shadowing_pace(tmp_path)))
    after = b"".join([chunk async for chunk in exported_chunks(spec)])
    assert after == before


async def test_the_worker_finds_its_pace_from_another_working_directory(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard (passes): ``-P`` keeps a pace.py in the working directory out."""
    await append_many(engine, 4)
    monkeypatch.chdir(shadowing_pace(tmp_path))
    report = await verify_chain(engine, batch=3, share=0.5)
    assert (report.intact, report.records) == (True, 4)


# ---------------------------------------------------------------------------
# 3. The purge's rests.
# ---------------------------------------------------------------------------


async def test_a_shutdown_during_the_purges_rest_stops_it_at_once_keeping_its_step(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard (passes): a rest of up to MAX_REST_S is cancelled at once, and
    what the step before committed (its files deleted) stays done."""
    monkeypatch.setattr(retention, "STEP", 10)
    await fill_old_records(engine, 25)
    deleted: list[list[str]] = []
    stepped = asyncio.Event()

    async def after_step(_: Any) -> None:
        stepped.set()

    async def delete_files(files: list[str]) -> None:
        deleted.append(files)

    # A tiny share: the rest after the first step is the longest (10 s).
    task = asyncio.ensure_future(
        retention.purge_in_steps(
            engine,
            now=NOW,
            defaults=DEFAULTS,
            after_step=after_step,
            delete_files=delete_files,
            share=0.0001,
        )
    )
    await asyncio.wait_for(stepped.wait(), 30)
    await asyncio.sleep(0.2)  # in the rest now
    task.cancel()
    began = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.get_running_loop().time() - began < 1.0
    assert await count_records(engine) == 25 - 10 + 1  # one step, its purge record


# ---------------------------------------------------------------------------
# 4. Share validation.
# ---------------------------------------------------------------------------


async def test_a_purge_with_an_invalid_share_is_refused_before_it_deletes(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "STEP", 10)
    await fill_old_records(engine, 25)
    before = await count_records(engine)
    with pytest.raises(ValueError, match="share"):
        await retention.purge_in_steps(engine, now=NOW, defaults=DEFAULTS, share=0.0)
    # Found in review: the ValueError came after the first step committed:
    # ten records (and their recordings' keys, had there been any) gone.
    assert await count_records(engine) == before, "the purge deleted before it checked its share"


async def count_records(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(access_log)) or 0)


async def test_a_verify_or_export_with_an_invalid_share_is_refused_in_the_server(
    engine: AsyncEngine,
) -> None:
    """Found in review: the worker refused it, and the server saw a
    DatabaseError ("the walk failed") instead of the caller's mistake."""
    for wrong in (0.0, 2.0):
        with pytest.raises(ValueError, match="share must be more than 0 and at most 1"):
            await verify_chain(engine, share=wrong)
        with pytest.raises(ValueError, match="share must be more than 0 and at most 1"):
            export_spec(engine, ORG, EVERY_RECORD, "csv", "", share=wrong)
