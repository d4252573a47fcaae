"""A single server killed (SIGKILL) mid-consult: the consult resumes for its
participants, or ends when nobody comes back; it never stays running for good.

The harness makes the consult and stops; the server then runs as its own
process on the harness's data directory and SQLite file, alone, as it would
in a clinic (the harness's app would otherwise say it is alive there too).
The fault drill in ``tests/test_drills.py`` does this twenty times in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import ClientSession, ClientWebSocketResponse
from sqlalchemy.ext.asyncio import create_async_engine

from audit.clock import ManualClock
from audit.db import SQLITE_FILE_NAME
from audit.schema import consults
from server.app_keys import DATA_DIR
from tests.support.harness import ConsultSetup, Harness, new_consult, receive
from tests.support.processes import ServerProcess, session_cookie

pytestmark = pytest.mark.multinode

# The participants are back well under a second after /healthz answers; the
# consult nobody returns to is waited for this long.
GRACE_S = 3


@pytest.fixture
def clock() -> ManualClock:
    # The server process runs on the real clock: sessions and invites made
    # through the harness must be fresh by that clock too.
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


class Clinic:
    """A therapist's and a patient's sockets to one server process."""

    def __init__(self, cookie: str, setup: ConsultSetup, stack: contextlib.AsyncExitStack):
        self.setup = setup
        self.cookie = cookie
        self.stack = stack
        self.server: ServerProcess | None = None

    @property
    def origin(self) -> str:
        assert self.server is not None
        return self.server.origin

    async def therapist(self) -> ClientWebSocketResponse:
        http = await self.stack.enter_async_context(ClientSession())
        return await http.ws_connect(
            f"{self.origin}/ws?consult={self.setup.consult_id}",
            headers={"Origin": self.origin, "Cookie": f"vc_session={self.cookie}"},
        )

    async def patient(self) -> ClientWebSocketResponse:
        http = await self.stack.enter_async_context(ClientSession())
        async with http.post(
            f"{self.origin}/api/invites/{self.setup.invite_token}/ticket",
            json={"consent": True},
            headers={"Origin": self.origin},
        ) as answer:
            assert answer.status == 200, await answer.text()
            ticket = (await answer.json())["ticket"]
        return await http.ws_connect(
            f"{self.origin}/ws?ticket={ticket}", headers={"Origin": self.origin}
        )


@contextlib.asynccontextmanager
async def running_consult(
    harness: Harness, port: int, log: Path
) -> AsyncIterator[tuple[Clinic, ServerProcess]]:
    """A consult admitted on a server process; the server is stopped at the end."""
    setup = await new_consult(harness)
    cookie = session_cookie(harness)
    await harness.client.close()
    async with contextlib.AsyncExitStack() as stack:
        clinic = Clinic(cookie, setup, stack)
        server = start(harness, port, log)
        clinic.server = server
        try:
            await asyncio.to_thread(server.wait_healthy)
            therapist = await clinic.therapist()
            await receive(therapist, "welcome")
            patient = await clinic.patient()
            await receive(patient, "welcome")
            await receive(therapist, "patient-waiting")
            await therapist.send_json({"v": 1, "type": "admit"})
            await receive(patient, "admitted")
            await receive(therapist, "peer-joined")
            yield clinic, server
        finally:
            assert clinic.server is not None
            clinic.server.stop()


def start(harness: Harness, port: int, log: Path) -> ServerProcess:
    return ServerProcess(
        harness.app[DATA_DIR], port, log, settings={"consults_grace_s": str(GRACE_S)}
    )


async def consult_record(harness: Harness, consult_id: str) -> Any:
    """The consult's row, read from the SQLite file (the harness's app has stopped)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{harness.app[DATA_DIR] / SQLITE_FILE_NAME}")
    try:
        async with engine.connect() as conn:
            query = sa.select(consults).where(consults.c.id == uuid.UUID(consult_id))
            return (await conn.execute(query)).one()
    finally:
        await engine.dispose()


def utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def test_a_killed_servers_consult_resumes_for_both_participants(
    sqlite_harness: Harness, free_port: int, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    async with running_consult(sqlite_harness, free_port, log) as (clinic, server):
        started = (await consult_record(sqlite_harness, clinic.setup.consult_id)).started_at
        server.kill()
        clinic.server = start(sqlite_harness, free_port, log)
        await asyncio.to_thread(clinic.server.wait_healthy)

        therapist = await clinic.therapist()
        welcome = await receive(therapist, "welcome")
        assert welcome["state"] == "active"  # not the waiting room again
        assert welcome["peer_present"] is False
        patient = await clinic.patient()
        assert (await receive(patient, "welcome"))["state"] == "active"
        await receive(therapist, "peer-rejoined")
        # The therapist's new offer reaches the patient: no admission again.
        await therapist.send_json({"v": 1, "type": "offer", "sdp": "v=0 resumed"})
        offer = await receive(patient, "offer")
        assert offer["sdp"] == "v=0 resumed"
        record = await consult_record(sqlite_harness, clinic.setup.consult_id)
        assert record.status == "active"
        assert utc(record.started_at) == utc(started)  # the start never moves


async def test_a_killed_servers_consult_nobody_returns_to_ends_when_last_seen(
    sqlite_harness: Harness, free_port: int, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    async with running_consult(sqlite_harness, free_port, log) as (clinic, server):
        server.kill()
        killed = datetime.now(UTC)
        await asyncio.sleep(3)  # down a while: the end is not the restart
        restarted = datetime.now(UTC)
        clinic.server = start(sqlite_harness, free_port, log)
        await asyncio.to_thread(clinic.server.wait_healthy)
        deadline = time.monotonic() + GRACE_S + 10
        record = await consult_record(sqlite_harness, clinic.setup.consult_id)
        while record.status == "active" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            record = await consult_record(sqlite_harness, clinic.setup.consult_id)
        assert record.status == "ended", "the consult stayed running without participants"
        ended = utc(record.ended_at)
        # When the server was last alive, not when it came back.
        assert killed - timedelta(seconds=3) <= ended <= killed + timedelta(seconds=1)
        assert ended < restarted
        # Nobody can join an ended consult.
        refused = await (await clinic.stack.enter_async_context(ClientSession())).get(
            f"{clinic.origin}/ws?consult={clinic.setup.consult_id}",
            headers={"Origin": clinic.origin, "Cookie": f"vc_session={clinic.cookie}"},
        )
        assert refused.status == 409
