"""Bulk jobs leave the event loop free: a retention purge and a long
verify, measured with the loop-lag watcher (server/loop_lag.py), on SQLite
and PostgreSQL. Sizes are kept small for a quick suite; the benchmark
(bench/access_chain.py) measures a verify of a million records."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.access_log import AccessRecord, ClientType, Outcome, append_records, verify_chain
from audit.retention import Retention, purge
from audit.schema import access_log
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


async def fill_old_records(engine: AsyncEngine, count: int) -> None:
    """``count`` records of the installation's chain, two years old and older."""
    start = NOW - timedelta(days=800)
    for first in range(0, count, 2_000):
        async with engine.begin() as conn:
            await append_records(
                conn,
                [
                    AccessRecord(
                        at=start + timedelta(seconds=n),
                        organisation_id=None,
                        actor_id=None,
                        actor_role="operator",
                        action="account.create",
                        object_type="account",
                        object_id=str(uuid.UUID(int=n)),
                        outcome=Outcome.ALLOWED,
                        client_type=ClientType.CLI,
                    )
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
