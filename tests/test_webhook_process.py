"""Webhooks from a server process killed with SIGKILL (issue 21, "How it is
checked"): an event committed to the outbox is delivered after the restart,
once; and one whose send reached the receiver before the kill is sent again
after the restart with the same ``webhook-id``, which the receiver dedupes.

The harness registers the endpoint and makes the consult, then stops; the
server runs as its own process on the harness's data directory and
database (SQLite or PostgreSQL), with the real clock, and a real receiver
verifies every message with ``standardwebhooks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import ClientSession, ClientWebSocketResponse

from audit.accounts import Role
from audit.clock import ManualClock
from audit.db import create_engine, database_url
from audit.schema import webhook_deliveries
from config import Settings
from server.app_keys import DATA_DIR
from tests.support.harness import ConsultSetup, Harness, new_consult, receive
from tests.support.ports import unused_port
from tests.support.processes import ServerProcess, session_cookie
from tests.support.webhooks import Receiver

pytestmark = [pytest.mark.multinode, pytest.mark.settings(webhooks_allow_http_loopback="true")]

GRACE_S = "3"


@pytest.fixture
def clock() -> ManualClock:
    # The server process runs on the real clock: sessions and links made
    # through the harness must be fresh by that clock too.
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = unused_port()
    found = Receiver(port)
    await found.start()
    yield found
    await found.stop()


async def prepared(harness: Harness, receiver: Receiver) -> tuple[ConsultSetup, str]:
    """An endpoint for every event, and a therapist's consult; the harness stops."""
    admin = await harness.professional("admin@praktijk-noord.example", Role.ADMIN)
    await harness.logged_in(admin)
    answer = await harness.post(
        "/api/admin/webhooks",
        {"url": receiver.url, "events": ["consult.started", "consult.ended"]},
    )
    assert answer.status == 201, await answer.text()
    receiver.secret = (await answer.json())["secret"]
    setup = await new_consult(harness)
    cookie = session_cookie(harness)
    await harness.client.close()
    return setup, cookie


def serve(harness: Harness, settings: Settings, port: int, log: Path, **more: str) -> ServerProcess:
    return ServerProcess(
        harness.app[DATA_DIR],
        port,
        log,
        settings={
            "database_url": settings.database.url,
            "webhooks_allow_http_loopback": "true",
            "consults_grace_s": GRACE_S,
            **more,
        },
    )


async def admit(
    server: ServerProcess, setup: ConsultSetup, cookie: str, stack: contextlib.AsyncExitStack
) -> None:
    """The patient admitted on ``server``: the consult's start is committed."""
    origin = {"Origin": server.origin}
    http = await stack.enter_async_context(ClientSession(server.origin))
    therapist: ClientWebSocketResponse = await http.ws_connect(
        f"/ws?consult={setup.consult_id}", headers={**origin, "Cookie": f"vc_session={cookie}"}
    )
    await receive(therapist, "welcome")
    patient_http = await stack.enter_async_context(ClientSession(server.origin))
    ticket = await patient_http.post(
        f"/api/invites/{setup.invite_token}/ticket", json={"consent": True}, headers=origin
    )
    assert ticket.status == 200, await ticket.text()
    patient = await patient_http.ws_connect(
        f"/ws?ticket={(await ticket.json())['ticket']}", headers=origin
    )
    await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")


async def deliveries(settings: Settings) -> list[Any]:
    """The deliveries' rows, read from the database (no app of the test's runs)."""
    engine = create_engine(database_url(settings, settings.data_dir), connect_timeout_s=5)
    try:
        async with engine.connect() as conn:
            return list(await conn.execute(sa.select(webhook_deliveries)))
    finally:
        await engine.dispose()


async def recorded_as_delivered(settings: Settings, *, count: int) -> None:
    """Until the server has recorded ``count`` deliveries as delivered."""
    statuses: list[str] = []
    for _ in range(50):  # 10 s
        statuses = [row.status for row in await deliveries(settings)]
        if statuses == ["delivered"] * count:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the deliveries are {statuses}, not {count} delivered")


async def test_an_event_committed_before_a_kill_is_delivered_after_the_restart_once(
    harness: Harness, harness_settings: Settings, free_port: int, tmp_path: Path, receiver: Receiver
) -> None:
    setup, cookie = await prepared(harness, receiver)
    log = tmp_path / "server.log"
    # Its first round of deliveries is an hour away: killed before any send.
    server = serve(harness, harness_settings, free_port, log, webhooks_poll_interval_s="3600")
    try:
        await asyncio.to_thread(server.wait_healthy)
        async with contextlib.AsyncExitStack() as stack:
            await admit(server, setup, cookie, stack)
            server.kill()
        (waiting,) = await deliveries(harness_settings)
        assert waiting.status == "pending"
        assert waiting.attempts == 0  # committed, never sent
        assert receiver.received == []

        server = serve(harness, harness_settings, free_port, log, webhooks_poll_interval_s="0.2")
        await asyncio.to_thread(server.wait_healthy)
        await receiver.wait_for(lambda r: bool(r.of_type("consult.started")), timeout_s=30)
        # Nobody came back: the consult ends after the grace period, told too.
        await receiver.wait_for(lambda r: bool(r.of_type("consult.ended")), timeout_s=60)
        await recorded_as_delivered(harness_settings, count=2)
    finally:
        server.stop()
    (started,) = receiver.of_type("consult.started")
    assert started["data"]["consult_id"] == setup.consult_id
    assert receiver.repeats() == {}  # once
    assert receiver.refused == []


async def test_a_send_cut_off_by_a_kill_is_sent_again_with_the_same_webhook_id(
    harness: Harness, harness_settings: Settings, free_port: int, tmp_path: Path, receiver: Receiver
) -> None:
    setup, cookie = await prepared(harness, receiver)
    log = tmp_path / "server.log"
    # The claim of the send the kill cuts off runs out 1 + 1 s after it was
    # made (by default 10 + 10 s): the restarted server may send it again.
    quick = {
        "webhooks_poll_interval_s": "0.2",
        "webhooks_timeout_s": "1",
        "webhooks_claim_margin_s": "1",
    }
    server = serve(harness, harness_settings, free_port, log, **quick)

    def kill_the_sender(_message: object) -> None:
        # The message arrived; the server dies before it hears the answer.
        if len(receiver.received) == 1:
            server.process.send_signal(signal.SIGKILL)

    receiver.on_message = kill_the_sender
    try:
        await asyncio.to_thread(server.wait_healthy)
        async with contextlib.AsyncExitStack() as stack:
            await admit(server, setup, cookie, stack)
            await receiver.wait_for(lambda r: len(r.received) == 1, timeout_s=30)
            await asyncio.to_thread(server.process.wait, 10)
        server.kill()
        (claimed,) = await deliveries(harness_settings)
        assert claimed.status == "pending"  # sent, but its answer never recorded
        assert claimed.attempts == 1

        server = serve(harness, harness_settings, free_port, log, **quick)
        await asyncio.to_thread(server.wait_healthy)
        # Sent again once the dead node's claim runs out (timeout + margin).
        await receiver.wait_for(lambda r: bool(r.repeats()), timeout_s=60)
    finally:
        server.stop()
    first = receiver.received[0]
    assert receiver.repeats() == {first.webhook_id: 2}  # the same id both times
    (started,) = receiver.of_type("consult.started")  # deduplicated: one
    assert started["data"]["consult_id"] == setup.consult_id
