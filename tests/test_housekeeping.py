"""Expiry: nothing in the technical log is readable after 24 hours, and it is purged;
with several nodes, each clean-up job runs on one node at a time."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from structlog.testing import capture_logs

from audit.accounts import Role
from audit.clock import ManualClock
from audit.consults import create_consult, mark_ended
from audit.schema import consults, login_failures, sessions, technical_log
from audit.technical_log import read_technical, write_technical
from config import Settings
from server import create_app
from server.app_keys import DB_ENGINE, REDIS, SETTINGS
from server.housekeeping import (
    HOUSEKEEPING_LOCK_S,
    RETENTION_LOCK_S,
    housekeeping_round,
    purge_expired,
    retention_round,
    single_runner,
)
from server.resources import ROOM_TIMER_POLL
from tests.support.harness import Harness, new_consult
from tests.support.settings import SettingsFactory


async def count(harness: Harness, table: sa.Table) -> int:
    async with harness.app[DB_ENGINE].connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


async def test_technical_log_is_unreadable_after_24_hours_even_before_the_purge(
    harness: Harness,
) -> None:
    engine = harness.app[DB_ENGINE]
    async with engine.begin() as conn:
        await write_technical(
            conn, "ice.failed", now=harness.clock.now(), detail={"client_address": "203.0.113.7"}
        )
    harness.clock.advance(23 * 3600)
    async with engine.connect() as conn:
        assert [e.kind for e in await read_technical(conn, now=harness.clock.now())] == [
            "ice.failed"
        ]
    harness.clock.advance(3600)
    async with engine.connect() as conn:
        assert await read_technical(conn, now=harness.clock.now()) == []
    assert await count(harness, technical_log) == 1  # still on disk: the purge has not run

    purged = await purge_expired(harness.app)
    assert purged["technical_log"] == 1
    assert await count(harness, technical_log) == 0


async def test_purge_removes_dead_sessions_and_old_failures_and_keeps_live_ones(
    harness: Harness,
) -> None:
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)
    await harness.post(
        "/api/login", {"email": anna.email, "password": "wrong password!!", "code": "123456"}
    )
    assert await count(harness, sessions) == 1
    assert await count(harness, login_failures) == 1

    harness.clock.advance(10 * 60)
    await purge_expired(harness.app)
    assert await count(harness, sessions) == 1  # idle for 10 minutes: still alive
    assert await count(harness, login_failures) == 1  # may still count towards a lock

    harness.clock.advance(25 * 60)
    purged = await purge_expired(harness.app)
    assert purged["sessions"] == 1
    assert purged["login_failures"] == 1
    assert await count(harness, sessions) == 0
    assert await count(harness, login_failures) == 0


async def test_used_and_expired_enrolment_links_are_purged_with_their_pending_secrets(
    harness: Harness,
) -> None:
    from audit.schema import enrolment_links

    await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)  # used link
    pending = await harness.invite("bram@praktijk-noord.example", Role.SUPPORT)
    await harness.post(f"/api/enrolment/{pending}/password", {"password": "x" * 8 + "abcd"})
    live = await harness.invite("cees@praktijk-noord.example", Role.SUPPORT)
    # The server's own housekeeping may run meanwhile (it starts with the app),
    # so look at what is left rather than at who purged it.
    await purge_expired(harness.app)
    assert await count(harness, enrolment_links) == 2  # the used one went
    assert (await harness.client.get(f"/api/enrolment/{live}")).status == 200
    harness.clock.advance(3601)  # the harness's links live an hour
    await purge_expired(harness.app)
    assert await count(harness, enrolment_links) == 0
    assert (await harness.client.get(f"/api/enrolment/{live}")).status == 404


async def test_an_invite_left_behind_by_an_ended_consult_is_purged(harness: Harness) -> None:
    from audit.schema import invites

    therapist = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    now = harness.clock.now()
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(conn, therapist_id=therapist.account_id, now=now)
        await mark_ended(conn, consult.id, now=now)
        # As a link reissued while the consult was being ended would leave it
        # (or one from before invites went with the end): live, first used.
        await conn.execute(
            invites.insert().values(
                token_hash="0" * 64,
                consult_id=consult.id,
                created_at=now,
                expires_at=now + timedelta(days=1),
                first_used_at=now,
                guardian_consent=True,
            )
        )
    purged = await purge_expired(harness.app)
    assert purged["invites"] == 1
    assert await count(harness, invites) == 0


async def test_a_link_reissued_after_a_revoke_and_a_purge_still_asks_for_the_guardian(
    harness: Harness,
) -> None:
    # Found in review: the purge deleted a revoked invite at once, and with
    # it the only record that the patient is under 16; the link reissued
    # afterwards no longer asked for a guardian. The latest invite of a
    # consult that is not over stays (dead or alive); older dead ones go.
    from audit.schema import invites

    setup = await new_consult(harness, guardian_consent=True)
    path = f"/api/consults/{setup.consult_id}/invite"
    assert (await harness.client.delete(path, headers=harness.headers)).status == 204
    await purge_expired(harness.app)
    assert await count(harness, invites) == 1

    reissued = await harness.post(path, {})
    assert reissued.status == 200, await reissued.text()
    link = (await reissued.json())["invite_token"]
    answer = await harness.client.get(f"/api/invites/{link}")
    assert (await answer.json())["guardian_consent"] is True
    harness.clock.advance(1)
    assert (await harness.post(path, {})).status == 200  # the second link revoked
    purged = await purge_expired(harness.app)
    assert purged["invites"] == 2  # the first two; the live one stays
    assert await count(harness, invites) == 1


# Several nodes: each job on one node at a time, under a Redis lock.


async def _node(settings: Settings, clock: ManualClock, aiohttp_client: Any) -> Harness:
    app = create_app(settings, clock=clock)
    app[ROOM_TIMER_POLL] = 3600.0  # as in the harness: no timer task racing the test
    return Harness(app, await aiohttp_client(app), clock)


@pytest.fixture
async def nodes(
    make_settings: SettingsFactory,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    clock: ManualClock,
    aiohttp_client: Any,
) -> list[Harness]:
    """Two nodes of one deployment: one PostgreSQL database, one Redis prefix."""
    settings = make_settings(
        database_url=postgres_url, redis_url=redis_url, redis_key_prefix=redis_prefix
    )
    return [await _node(settings, clock, aiohttp_client) for _ in range(2)]


@pytest.fixture
async def cut_off(
    make_settings: SettingsFactory, postgres_url: str, clock: ManualClock, aiohttp_client: Any
) -> Harness:
    """A node whose Redis cannot be reached (nothing listens on port 1)."""
    settings = make_settings(
        database_url=postgres_url,
        redis_url="redis://127.0.0.1:1/0",
        redis_connect_timeout_s=0.2,
    )
    return await _node(settings, clock, aiohttp_client)


def lock_key(harness: Harness, job: str) -> str:
    return f"{harness.app[SETTINGS].redis.key_prefix}:lock:{job}"


def redis_of(harness: Harness) -> Redis:
    client = harness.app[REDIS]
    assert client is not None
    return client


async def unstarted_consult(harness: Harness) -> uuid.UUID:
    """A consult made now, never joined (straight in the database: making one
    through the API needs the rooms, and so Redis)."""
    therapist = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    async with harness.app[DB_ENGINE].begin() as conn:
        consult = await create_consult(
            conn, therapist_id=therapist.account_id, now=harness.clock.now()
        )
    return consult.id


async def expired_consult(harness: Harness) -> uuid.UUID:
    """A consult ended longer ago than the default retention (730 days)."""
    consult_id = await unstarted_consult(harness)
    async with harness.app[DB_ENGINE].begin() as conn:
        await mark_ended(conn, consult_id, now=harness.clock.now())
    harness.clock.advance(731 * 86400)
    return consult_id


async def consult_count(harness: Harness) -> int:
    return await count(harness, consults)


async def old_technical_entry(harness: Harness) -> None:
    async with harness.app[DB_ENGINE].begin() as conn:
        await write_technical(conn, "ice.failed", now=harness.clock.now())
    harness.clock.advance(25 * 3600)


async def test_of_two_nodes_trying_at_once_only_one_runs_the_job(nodes: list[Harness]) -> None:
    decided: list[bool] = []
    both_decided = asyncio.Event()

    async def attempt(node: Harness) -> bool:
        async with single_runner(
            node.app, "retention-purge", ttl_s=RETENTION_LOCK_S, run_if_unreachable=False
        ) as mine:
            decided.append(mine)
            if len(decided) == 2:
                both_decided.set()
            # The one that runs keeps the lock until the other has decided.
            if mine:
                await asyncio.wait_for(both_decided.wait(), timeout=5)
            return mine

    assert sorted(await asyncio.gather(*(attempt(node) for node in nodes))) == [False, True]
    # Released afterwards: the next round runs.
    assert await redis_of(nodes[0]).exists(lock_key(nodes[0], "retention-purge")) == 0
    async with single_runner(
        nodes[1].app, "retention-purge", ttl_s=RETENTION_LOCK_S, run_if_unreachable=False
    ) as mine:
        assert mine


async def test_the_retention_purge_skips_while_another_node_holds_its_lock(
    nodes: list[Harness],
) -> None:
    first, second = nodes
    await expired_consult(first)
    async with single_runner(
        first.app, "retention-purge", ttl_s=RETENTION_LOCK_S, run_if_unreachable=False
    ) as mine:
        assert mine
        pttl = await redis_of(first).pttl(lock_key(first, "retention-purge"))
        assert 0 < pttl <= RETENTION_LOCK_S * 1000
        assert await retention_round(second.app) is None
        assert await consult_count(second) == 1  # the purge did not run
    report = await retention_round(second.app)
    assert report is not None
    assert report.consults == 1
    assert await consult_count(second) == 0


async def test_housekeeping_skips_while_another_node_holds_its_lock(
    nodes: list[Harness],
) -> None:
    first, second = nodes
    await old_technical_entry(first)
    async with single_runner(
        first.app, "housekeeping", ttl_s=HOUSEKEEPING_LOCK_S, run_if_unreachable=False
    ) as mine:
        assert mine
        assert await housekeeping_round(second.app) is None
        assert await count(second, technical_log) == 1
    purged = await housekeeping_round(second.app)
    assert purged is not None
    assert purged["technical_log"] == 1
    assert await count(second, technical_log) == 0


async def test_the_lock_of_a_node_that_died_runs_out_and_its_late_release_frees_nothing(
    nodes: list[Harness],
) -> None:
    first, second = nodes
    job = "retention-purge"
    # A holder that never comes back: entered, not left (until the end).
    dead = single_runner(first.app, job, ttl_s=0.3, run_if_unreachable=False)
    assert await dead.__aenter__()
    async with single_runner(second.app, job, ttl_s=0.3, run_if_unreachable=False) as mine:
        assert not mine
    # Redis's own clock expires it (the manual clock cannot): wait, briefly.
    client = redis_of(second)
    for _ in range(100):
        if not await client.exists(lock_key(second, job)):
            break
        await asyncio.sleep(0.05)
    async with single_runner(second.app, job, ttl_s=60, run_if_unreachable=False) as mine:
        assert mine
        with capture_logs() as logs:
            await dead.__aexit__(None, None, None)
        assert [entry["event"] for entry in logs] == ["job outlasted its lock"]
        # The late release left the new holder's lock alone.
        assert 0 < await client.pttl(lock_key(second, job)) <= 60_000
        async with single_runner(first.app, job, ttl_s=60, run_if_unreachable=False) as again:
            assert not again


async def test_without_redis_the_retention_purge_runs_under_the_database_lock(
    cut_off: Harness,
) -> None:
    await expired_consult(cut_off)
    with capture_logs() as logs:
        report = await retention_round(cut_off.app)
    assert report is not None
    assert report.ran  # it took PostgreSQL's advisory lock
    assert report.consults == 1
    assert await consult_count(cut_off) == 0
    [warning] = [
        entry for entry in logs if entry["event"] == "job lock unavailable: Redis unreachable"
    ]
    assert warning["job"] == "retention-purge"
    assert warning["runs_anyway"] is True


async def test_without_redis_housekeeping_still_deletes_the_technical_log(
    cut_off: Harness,
) -> None:
    # An abandoned consult too: ending it needs its room, on the Redis that
    # is away, and that must not hold up the deletions.
    consult_id = await unstarted_consult(cut_off)
    await old_technical_entry(cut_off)  # 25 hours: older than an invite lives
    with capture_logs() as logs:
        purged = await housekeeping_round(cut_off.app)
    assert purged is not None
    assert purged["technical_log"] == 1
    assert purged["abandoned_consults"] == 0  # its room could not be told
    assert await count(cut_off, technical_log) == 0
    async with cut_off.app[DB_ENGINE].connect() as conn:
        status = await conn.scalar(sa.select(consults.c.status).where(consults.c.id == consult_id))
    assert status == "not_started"  # the record is ended all the same
    events = [entry["event"] for entry in logs]
    assert "job lock unavailable: Redis unreachable" in events
    assert "abandoned consult ended without its room" in events


async def test_a_job_that_must_not_run_twice_skips_without_redis(cut_off: Harness) -> None:
    async with single_runner(cut_off.app, "some-job", ttl_s=60, run_if_unreachable=False) as mine:
        assert not mine


async def test_one_node_without_redis_always_runs_its_jobs(harness: Harness) -> None:
    assert harness.app[REDIS] is None
    for _ in range(2):  # nothing is held or left behind
        async with single_runner(
            harness.app, "retention-purge", ttl_s=60, run_if_unreachable=False
        ) as mine:
            assert mine
    assert await housekeeping_round(harness.app) is not None
    assert await retention_round(harness.app) is not None
