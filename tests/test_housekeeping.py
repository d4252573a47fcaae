"""Expiry: nothing in the technical log is readable after 24 hours, and it is purged."""

from __future__ import annotations

import sqlalchemy as sa

from audit.accounts import Role
from audit.schema import login_failures, sessions, technical_log
from audit.technical_log import read_technical, write_technical
from server.app_keys import DB_ENGINE
from server.housekeeping import purge_expired
from tests.harness import Harness


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
