"""Outages of PostgreSQL and of Redis. The database away: every request that
needs it answers 503 with Retry-After (never a 500 with a traceback), the
process log says so once, and the service comes back by itself. Redis away:
the consults API goes on without it. Each outage is a TCP proxy to the real
server, cut and restored (stopping the shared server would stop every other
test)."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientWebSocketResponse, WSMsgType
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from structlog.testing import capture_logs
from yarl import URL

from audit.accounts import Role
from audit.db import SQLITE_FILE_NAME, is_outage
from server import create_app
from server.app_keys import CLUSTER, DATA_DIR, ROOMS
from server.background import JobName
from server.jobs import node_round
from signaling.ports import StateUnavailable
from tests.support.harness import (
    Harness,
    Sockets,
    admitted_pair,
    consult_row,
    receive,
    waiting_pair,
)
from tests.support.settings import SettingsFactory
from tests.support.tcp_proxy import CuttableProxy


@pytest.fixture
async def proxy(migrated_postgres_url: str) -> AsyncIterator[CuttableProxy]:
    url = make_url(migrated_postgres_url)
    async with CuttableProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy


def through_proxy(postgres_url: str, proxy: CuttableProxy) -> str:
    """``postgres_url`` reached through ``proxy``, as a setting."""
    proxied = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port)
    return proxied.render_as_string(hide_password=False)


async def test_a_database_outage_answers_503_says_so_once_and_heals(
    proxy: CuttableProxy,
    migrated_postgres_url: str,
    make_settings: SettingsFactory,
    clock: Any,
    aiohttp_client: Any,
) -> None:
    database_url = through_proxy(migrated_postgres_url, proxy)
    app = create_app(make_settings(database_url=database_url), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)
    assert (await harness.client.get("/api/consults")).status == 200

    with capture_logs() as logs:
        await proxy.cut()
        answers = []
        for _ in range(20):
            response = await harness.client.get("/api/consults")
            answers.append((response.status, response.headers.get("Retry-After")))
            assert (await response.json())["error"]["code"] == "unavailable"
        login = await harness.login(anna)
        ready = await harness.client.get("/readyz")
        assert set(answers) == {(503, "2")}
        assert login.status == 503
        assert ready.status == 503
        proxy.restore()
        deadline = time.monotonic() + 15
        while (await harness.client.get("/api/consults")).status != 200:
            assert time.monotonic() < deadline, "the service did not come back"
            await asyncio.sleep(0.5)
        for _ in range(40):  # the probe's line, at most one probe interval later
            if any(entry["event"] == "database is back" for entry in logs):
                break
            await asyncio.sleep(0.1)
    said = [entry["event"] for entry in logs if entry["log_level"] in ("warning", "error")]
    assert (
        said.count("database unavailable: requests that need it answer 503 until it is back") == 1
    ), said
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")], logs
    back = [entry for entry in logs if entry["event"] == "database is back"]
    assert len(back) == 1
    assert back[0]["requests_refused"] >= 21


class _DriverError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (ConnectionResetError(104, "reset by peer"), True),
        (TimeoutError(), True),
        (DBAPIError("SELECT 1", {}, _DriverError("08006")), True),  # connection failure
        (DBAPIError("SELECT 1", {}, _DriverError("57P01")), True),  # admin shutdown
        (DBAPIError("INSERT", {}, _DriverError("23505")), False),  # unique violation: a bug
        (OSError(errno.ENOSPC, "No space left on device"), False),  # the disk, not the database
        (ValueError("bad"), False),
    ],
)
def test_only_an_unreachable_database_counts_as_an_outage(
    error: BaseException, outage: bool
) -> None:
    assert is_outage(error) is outage


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[CuttableProxy]:
    url = URL(redis_url)
    async with CuttableProxy(url.host or "127.0.0.1", url.port or 6379) as proxy:
        yield proxy


@pytest.fixture
async def behind_redis_proxy(
    redis_proxy: CuttableProxy,
    redis_url: str,
    redis_prefix: str,
    migrated_postgres_url: str,
    make_settings: SettingsFactory,
    clock: Any,
    aiohttp_client: Any,
) -> Harness:
    """The app on PostgreSQL, its Redis reached through ``redis_proxy``."""
    proxied = str(URL(redis_url).with_port(redis_proxy.port))
    app = create_app(
        make_settings(
            database_url=migrated_postgres_url, redis_url=proxied, redis_key_prefix=redis_prefix
        ),
        clock=clock,
    )
    return Harness(app, await aiohttp_client(app), clock)


async def test_a_redis_outage_leaves_listing_creating_and_ending_consults_working(
    redis_proxy: CuttableProxy, behind_redis_proxy: Harness
) -> None:
    harness = behind_redis_proxy
    anna = await harness.professional("anna@praktijk-noord.example", Role.THERAPIST)
    await harness.logged_in(anna)
    first = await (await harness.post("/api/consults", {"display_name": "Mevr. de Vries"})).json()
    consult_id = first["consult"]["id"]

    await redis_proxy.cut()
    listing = await harness.client.get("/api/consults")
    assert listing.status == 200
    # The label for the waiting room, from the database (sealed there).
    assert [c["display_name"] for c in (await listing.json())["consults"]] == ["Mevr. de Vries"]
    shown = await harness.client.get(f"/api/consults/{consult_id}")
    assert shown.status == 200
    created = await harness.post("/api/consults", {"display_name": "Dhr. Jansen"})
    assert created.status == 201, await created.text()
    body = await created.json()
    # Kept all the same: the label is sealed in the database, not in Redis.
    assert body["consult"]["display_name"] == "Dhr. Jansen"
    assert body["invite_url"]
    ended = await harness.post(f"/api/consults/{consult_id}/end")
    assert ended.status == 200, await ended.text()
    assert (await ended.json())["consult"]["status"] == "not_started"

    redis_proxy.restore()
    listing = await (await harness.client.get("/api/consults")).json()
    statuses = {c["id"]: c["status"] for c in listing["consults"]}
    assert statuses[consult_id] == "not_started"
    assert statuses[body["consult"]["id"]] == "created"


async def told_the_end_and_closed(
    sockets: tuple[ClientWebSocketResponse, ...], reason: str | None
) -> None:
    """Each socket is told the consult ended (for ``reason``, if given) and
    closed with 4004."""
    for socket in sockets:
        told = await receive(socket, "consult-ended")
        if reason is not None:
            assert told["reason"] == reason
        closing = await socket.receive(timeout=5)
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4004)


async def test_a_consult_ended_while_redis_is_away_closes_its_sockets_once_redis_is_back(
    redis_proxy: CuttableProxy, behind_redis_proxy: Harness
) -> None:
    harness = behind_redis_proxy
    app, clock = harness.app, harness.clock
    sockets = Sockets(harness)
    try:
        setup, therapist, patient = await admitted_pair(harness, sockets)

        await redis_proxy.cut()
        with pytest.raises(StateUnavailable):
            await node_round(app)  # the node notices: out of touch
        clock.advance(60)
        ended = await harness.post(f"/api/consults/{setup.consult_id}/end")
        assert ended.status == 200, await ended.text()
        row = await consult_row(harness, setup.consult_id)
        ended_at = clock.now()
        assert (row.status, row.ended_at) == ("ended", ended_at)
        # The sockets cannot be told yet: the room lives in Redis.
        with pytest.raises(TimeoutError):
            await patient.receive_json(timeout=0.3)

        redis_proxy.restore()
        clock.advance(30)
        await node_round(app)  # the repair round, as the node job runs it
        # Told the end the therapist made (kept for the repair).
        await told_the_end_and_closed((therapist, patient), "ended_by_therapist")
        # The record keeps the end it was given, not the repair's.
        row = await consult_row(harness, setup.consult_id)
        assert (row.status, row.ended_at) == ("ended", ended_at)
    finally:
        await sockets.close()


async def test_rooms_redis_lost_are_put_back_even_if_the_database_was_away_at_first(
    proxy: CuttableProxy,
    redis_proxy: CuttableProxy,
    redis_url: str,
    redis_prefix: str,
    migrated_postgres_url: str,
    make_settings: SettingsFactory,
    clock: Any,
    aiohttp_client: Any,
) -> None:
    """Found in review: Redis restarted (losing its data) while PostgreSQL
    was away for a moment. The node's heartbeat put it back in the list of
    nodes, the repair that followed failed on the database, and since that
    was not Redis's failure the repair was not kept due: no later round made
    it, and the running consult, both participants connected, had no room
    (every offer refused as "the consult is over")."""
    app = create_app(
        make_settings(
            database_url=through_proxy(migrated_postgres_url, proxy),
            redis_url=str(URL(redis_url).with_port(redis_proxy.port)),
            redis_key_prefix=redis_prefix,
        ),
        clock=clock,
    )
    harness = Harness(app, await aiohttp_client(app), clock)
    sockets = Sockets(harness)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        setup, therapist, patient = await admitted_pair(harness, sockets)
        await proxy.cut()
        # Redis restarts: every connection to it cut, and its data gone.
        await redis_proxy.cut()
        async for key in redis.scan_iter(match=f"{redis_prefix}:*"):
            await redis.delete(key)
        redis_proxy.restore()
        with pytest.raises(Exception) as failed:  # noqa: PT011 (what the driver raises)
            await node_round(app)  # the repair meets the database away
        assert is_outage(failed.value)
        proxy.restore()
        await node_round(app)  # the next round, as the node job runs it

        await therapist.send_json({"v": 1, "type": "offer", "sdp": "v=0"})
        assert (await receive(patient, "offer"))["sdp"] == "v=0"
        row = await consult_row(harness, setup.consult_id)
        assert (row.status, row.ended_at) == ("active", None)
    finally:
        proxy.restore()
        redis_proxy.restore()
        await redis.aclose()
        await sockets.close()


@pytest.mark.parametrize("action", ["end", "admit"])
async def test_a_therapists_action_while_the_database_is_away_is_refused_not_cut(
    proxy: CuttableProxy,
    migrated_postgres_url: str,
    make_settings: SettingsFactory,
    clock: Any,
    aiohttp_client: Any,
    action: str,
) -> None:
    """Found in review: with Redis away, ``admit`` and ``end`` are refused
    with ``unavailable`` and the socket stays; with the database away the
    same click cut the therapist's socket (1006), told the patient that the
    therapist had gone, and logged a traceback."""
    database_url = through_proxy(migrated_postgres_url, proxy)
    app = create_app(make_settings(database_url=database_url), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    sockets = Sockets(harness)
    try:
        pair = admitted_pair if action == "end" else waiting_pair
        setup, therapist, patient = await pair(harness, sockets)
        with capture_logs() as logs:
            await proxy.cut()
            await therapist.send_json({"v": 1, "type": action})
            frame = await therapist.receive(timeout=10)
            proxy.restore()
        assert frame.type is WSMsgType.TEXT, (frame.type, frame.data)
        refused = frame.json()
        assert (refused["type"], refused["code"], refused["ref"]) == (
            "error",
            "unavailable",
            action,
        )
        assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")]
        with pytest.raises(TimeoutError):  # the patient heard nothing of it
            await patient.receive_json(timeout=0.5)
        row = await consult_row(harness, setup.consult_id)
        assert row.ended_at is None
        # Back: the same click works.
        await therapist.send_json({"v": 1, "type": action})
        expected = "consult-ended" if action == "end" else "admitted"
        await receive(patient, expected)
    finally:
        proxy.restore()
        await sockets.close()


async def without_the_node_job() -> None:
    """Stop this app's node job: the test runs its rounds itself, so that no
    round of its own meets an outage the test means no heartbeat to see
    (waiting for a heartbeat and cutting just after it was not enough on a
    loaded CI machine)."""
    (job,) = [
        task for task in asyncio.all_tasks() if task.get_name() == JobName.NODE_HEARTBEAT.value
    ]
    job.cancel()
    await asyncio.wait({job})


async def test_a_consult_ended_during_a_redis_blip_no_heartbeat_saw_is_ended_for_its_sockets(
    redis_proxy: CuttableProxy, behind_redis_proxy: Harness
) -> None:
    """Found in review: the end was recorded and answered 200, and the
    node's repair round was to tell the room once Redis was back; but that
    round ran only when the node's own heartbeat had met the outage. A blip
    shorter than a heartbeat left both participants in the call."""
    harness = behind_redis_proxy
    sockets = Sockets(harness)
    try:
        setup, therapist, patient = await admitted_pair(harness, sockets)
        await without_the_node_job()
        await redis_proxy.cut()
        ended = await harness.post(f"/api/consults/{setup.consult_id}/end")
        redis_proxy.restore()
        assert ended.status == 200, await ended.text()
        cluster = harness.app[CLUSTER]
        assert cluster is not None
        assert not cluster.out_of_touch  # no heartbeat met the blip

        await node_round(harness.app)  # the next round, as the node job runs it
        await told_the_end_and_closed((therapist, patient), "ended_by_therapist")
    finally:
        await sockets.close()


async def test_an_admit_while_another_writer_holds_sqlite_is_refused_not_cut(
    make_settings: SettingsFactory, clock: Any, aiohttp_client: Any
) -> None:
    """SQLite's "database is locked" (another writer past the busy timeout: a
    long purge, ``keys rotate``) is answered as the database away is, with
    ``unavailable``, not by cutting the therapist's socket."""
    app = create_app(make_settings(database_connect_timeout_s=0.5), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    sockets = Sockets(harness)
    blocker = sqlite3.connect(Path(app[DATA_DIR]) / SQLITE_FILE_NAME, isolation_level=None)
    try:
        _setup, therapist, patient = await waiting_pair(harness, sockets)
        blocker.execute("BEGIN IMMEDIATE")
        await therapist.send_json({"v": 1, "type": "admit"})
        frame = await therapist.receive(timeout=10)
        blocker.execute("ROLLBACK")
        assert frame.type is WSMsgType.TEXT, (frame.type, frame.data)
        refused = frame.json()
        assert (refused["code"], refused["ref"]) == ("unavailable", "admit")
        await therapist.send_json({"v": 1, "type": "admit"})
        await receive(patient, "admitted")
    finally:
        blocker.close()
        await sockets.close()


async def test_a_repair_that_fails_does_not_keep_the_node_from_claiming_dead_nodes(
    behind_redis_proxy: Harness, redis_url: str, redis_prefix: str, monkeypatch: Any
) -> None:
    """A repair that keeps failing (a missed end the database refuses) fails
    the round, but the round still claims the nodes that died, so their
    participants get their grace periods (found in review)."""
    app = behind_redis_proxy.app
    cluster = app[CLUSTER]
    assert cluster is not None
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await redis.zadd(f"{redis_prefix}:nodes", {"a-node-gone-long-ago": 0})

        async def failing() -> int:
            raise RuntimeError("the repair failed")

        monkeypatch.setattr(app[ROOMS], "reconcile", failing)
        cluster.out_of_touch = True
        with pytest.raises(RuntimeError):
            await node_round(app)
        assert await redis.zscore(f"{redis_prefix}:nodes", "a-node-gone-long-ago") is None
        assert cluster.out_of_touch  # the repair is still due
    finally:
        await redis.aclose()


async def end_cut_short_after_the_room_was_saved_over(
    harness: Harness, redis_proxy: CuttableProxy, monkeypatch: Any, consult_id: str
) -> None:
    """The therapist ends the consult, and Redis goes away right after the
    room was saved as over (before the timers are cancelled and the
    participants told); then Redis is back. The repair is still to run."""
    rooms = harness.app[ROOMS]
    await without_the_node_job()
    cancel = rooms._timers.cancel
    cut = False

    async def cut_first(key: str) -> None:
        nonlocal cut
        if not cut:
            cut = True
            await redis_proxy.cut()
        await cancel(key)

    monkeypatch.setattr(rooms._timers, "cancel", cut_first)
    ended = await harness.post(f"/api/consults/{consult_id}/end")
    assert ended.status == 200, await ended.text()
    assert cut
    monkeypatch.setattr(rooms._timers, "cancel", cancel)
    redis_proxy.restore()


async def test_an_end_cut_short_after_its_room_was_saved_over_is_finished_by_the_repair(
    redis_proxy: CuttableProxy, behind_redis_proxy: Harness, monkeypatch: Any
) -> None:
    """Found in review: the end saved the room as over, then Redis went away
    before the timers were cancelled and the participants told. The repair
    round ended it again, found the room over already, and stopped there:
    both participants stayed in a call whose consult was over."""
    harness = behind_redis_proxy
    sockets = Sockets(harness)
    try:
        setup, therapist, patient = await admitted_pair(harness, sockets)
        await end_cut_short_after_the_room_was_saved_over(
            harness, redis_proxy, monkeypatch, setup.consult_id
        )

        await node_round(harness.app)  # the repair round, as the node job runs it
        await told_the_end_and_closed((therapist, patient), "ended_by_therapist")
    finally:
        await sockets.close()
