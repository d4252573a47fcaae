"""Two server nodes, real ``videoconsult serve`` processes sharing the real
PostgreSQL and Redis: a consult across them, a node killed mid-consult, and
Redis restarted mid-consult (a private ``redis-server`` of the test's own,
never the machine's shared one).

The accounts and the consult are made through an in-process app on the same
database (its clock is the real time; see ``cluster``); the nodes get the
same data directory, hence the same (development) master key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa
from aiohttp import ClientSession, ClientWebSocketResponse

from audit.clock import ManualClock
from audit.roles import Role
from audit.schema import consults
from server import create_app
from server.app_keys import DB_ENGINE
from tests.support.harness import ConsultSetup, Harness, new_consult, receive, wait_until_listening
from tests.support.ports import unused_port
from tests.support.processes import ServerProcess, session_cookie
from tests.support.services import service_unavailable
from tests.support.settings import SettingsFactory
from tests.support.webrtc import Peer, Signaller, all_receive_media, opened

pytestmark = [pytest.mark.webrtc, pytest.mark.multinode]

# cluster.NODE_DEAD_AFTER_S plus a heartbeat or two: by then a killed
# node's participants are in their grace period.
DEATH_NOTICED_S = 8.0
# The grace period of the test whose dead node's therapist never returns:
# short, since the test waits all of it.
NEVER_RETURNS_GRACE_S = 2


@dataclass
class Cluster:
    harness: Harness
    data_dir: Path
    logs: Path
    settings: dict[str, str]
    nodes: list[ServerProcess]

    def start(self, name: str, **extra: str) -> ServerProcess:
        node = ServerProcess(
            self.data_dir,
            unused_port(),
            self.logs / f"{name}.log",
            {**self.settings, **extra},
        )
        self.nodes.append(node)
        return node

    def log_text(self) -> str:
        return "".join(path.read_text() for path in sorted(self.logs.glob("*.log")))


@pytest.fixture
async def cluster(
    make_settings: SettingsFactory,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    data_dir: Path,
    tmp_path: Path,
    aiohttp_client: Any,
) -> AsyncIterator[Cluster]:
    """An app on the shared database for making accounts and consults, and
    the settings every node gets; nodes are started by the test and stopped here."""
    # The nodes run on the real time, so the harness's clock starts there.
    clock = ManualClock(datetime.now(UTC))
    app = create_app(make_settings(database_url=postgres_url), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    logs = tmp_path / "logs"
    logs.mkdir()
    settings = {
        "database_url": postgres_url,
        "redis_url": redis_url,
        "redis_key_prefix": redis_prefix,
    }
    found = Cluster(harness, data_dir, logs, settings, [])
    try:
        yield found
    finally:
        for node in found.nodes:
            node.stop()


def ready(node: ServerProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{node.origin}/readyz", timeout=3) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


async def started(*nodes: ServerProcess) -> None:
    for node in nodes:
        await asyncio.to_thread(node.wait_healthy)
        status, body = await asyncio.to_thread(ready, node)
        assert status == 200, body


async def therapist_socket(
    http: ClientSession, node: ServerProcess, setup: ConsultSetup, cookie: str
) -> ClientWebSocketResponse:
    return await http.ws_connect(
        f"{node.origin}/ws?consult={setup.consult_id}",
        headers={"Origin": node.origin, "Cookie": f"vc_session={cookie}"},
    )


async def patient_socket(
    http: ClientSession,
    node: ServerProcess,
    setup: ConsultSetup,
    *,
    ticket_from: ServerProcess | None = None,
) -> ClientWebSocketResponse:
    issuer = ticket_from or node
    async with http.post(
        f"{issuer.origin}/api/invites/{setup.invite_token}/ticket",
        json={"consent": True},
        headers={"Origin": issuer.origin},
    ) as answer:
        assert answer.status == 200, await answer.text()
        ticket = (await answer.json())["ticket"]
    return await http.ws_connect(
        f"{node.origin}/ws?ticket={ticket}", headers={"Origin": node.origin}
    )


async def consult_rows(harness: Harness) -> list[sa.Row[Any]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return list((await conn.execute(sa.select(consults))).all())


async def test_a_consult_across_two_nodes_survives_the_death_of_one(cluster: Cluster) -> None:
    harness = cluster.harness
    setup = await new_consult(harness)
    cookie = session_cookie(harness)
    node_a, node_b = cluster.start("a"), cluster.start("b")
    await started(node_a, node_b)

    async with contextlib.AsyncExitStack() as stack:
        therapist_http = await stack.enter_async_context(ClientSession())
        patient_http = await stack.enter_async_context(ClientSession())
        # The therapist on node A, the patient on node B (with a ticket made
        # on node A: the page may get it through another node than its socket).
        t_socket = await therapist_socket(therapist_http, node_a, setup, cookie)
        await receive(t_socket, "welcome")
        p_socket = await patient_socket(patient_http, node_b, setup, ticket_from=node_a)
        assert (await receive(p_socket, "welcome"))["state"] == "waiting"
        await receive(t_socket, "patient-waiting")  # from B to A, through Redis

        therapist, patient = opened(stack, Peer("therapist")), opened(stack, Peer("patient"))
        t_signals = opened(stack, Signaller(t_socket, therapist))
        p_signals = opened(stack, Signaller(p_socket, patient))
        await t_signals.send("admit")
        await p_signals.expect("admitted")
        await t_signals.expect("peer-joined")
        await t_signals.send("offer", sdp=await therapist.offer())
        await all_receive_media(therapist, patient)
        [row] = await consult_rows(harness)
        started_at = row.started_at
        assert started_at is not None

        # Node A dies mid-consult; the therapist's page reconnects to node B.
        node_a.kill()
        killed_at = time.monotonic()
        t_socket_again = await therapist_socket(therapist_http, node_b, setup, cookie)
        therapist_again = opened(stack, Peer("therapist, on node B"))
        t_signals_again = opened(stack, Signaller(t_socket_again, therapist_again))
        welcome = await t_signals_again.expect("welcome")
        assert (welcome["state"], welcome["peer_present"]) == ("active", True)
        assert (await p_signals.expect("peer-rejoined"))["role"] == "therapist"
        # A new offer from a new peer connection (aiortc's ICE restart is
        # limited; see test_webrtc), answered by a new one on the patient's side.
        patient_again = opened(stack, Peer("patient, after the therapist moved"))
        p_signals.peer = patient_again
        await therapist.close()
        await patient.close()
        await t_signals_again.send("offer", sdp=await therapist_again.offer())
        await all_receive_media(therapist_again, patient_again)

        # Once node A counts as dead, its sockets' grace periods would start:
        # the therapist is on node B by then, and nobody is told otherwise.
        await asyncio.sleep(max(0.0, DEATH_NOTICED_S - (time.monotonic() - killed_at)))
        p_signals.assert_nothing_unexpected()
        t_signals_again.assert_nothing_unexpected()

        ending = time.monotonic()
        await t_signals_again.send("end")
        assert (await p_signals.expect("consult-ended"))["reason"] == "ended_by_therapist"
        await t_signals_again.expect("consult-ended")
        took = time.monotonic() - ending

    # Exactly one record: the start of the first admission, the end, the duration.
    [row] = await consult_rows(harness)
    assert row.id == uuid.UUID(setup.consult_id)
    assert row.status == "ended"
    assert row.started_at == started_at
    assert row.ended_at is not None
    now = datetime.now(UTC)
    assert abs((now - row.ended_at).total_seconds()) < took + 2
    assert row.duration_s == round((row.ended_at - row.started_at).total_seconds())
    assert node_b.process.poll() is None
    assert "Traceback" not in cluster.log_text()


async def test_a_dead_nodes_participant_who_never_returns_leaves_after_the_grace_period(
    cluster: Cluster,
) -> None:
    harness = cluster.harness
    setup = await new_consult(harness)
    cookie = session_cookie(harness)
    node_a, node_b = (
        cluster.start("a", consults_grace_s=str(NEVER_RETURNS_GRACE_S)),
        cluster.start("b", consults_grace_s=str(NEVER_RETURNS_GRACE_S)),
    )
    await started(node_a, node_b)
    async with ClientSession() as therapist_http, ClientSession() as patient_http:
        t_socket = await therapist_socket(therapist_http, node_a, setup, cookie)
        await receive(t_socket, "welcome")
        p_socket = await patient_socket(patient_http, node_b, setup)
        await receive(p_socket, "welcome")
        await receive(t_socket, "patient-waiting")
        await t_socket.send_json({"v": 1, "type": "admit"})
        await receive(p_socket, "admitted")
        await receive(t_socket, "peer-joined")

        node_a.kill()
        killed = datetime.now(UTC)
        # Node B notices that A stopped beating, and starts the therapist's grace period.
        reconnecting = await receive(p_socket, "peer-reconnecting", timeout_s=DEATH_NOTICED_S + 2)
        assert reconnecting["role"] == "therapist"
        left = await receive(p_socket, "peer-left", timeout_s=NEVER_RETURNS_GRACE_S + 3)
        assert left["role"] == "therapist"
        await p_socket.send_json({"v": 1, "type": "bye"})
        await receive(p_socket, "consult-ended")
        bye = datetime.now(UTC)

    [row] = await consult_rows(harness)
    assert row.status == "ended"
    # The patient stayed until the bye: the consult ended then, not when A died.
    assert row.ended_at is not None
    assert killed < row.ended_at <= bye
    assert row.duration_s == round((row.ended_at - row.started_at).total_seconds())
    assert "Traceback" not in cluster.log_text()


class PrivateRedis:
    """A ``redis-server`` of this test's own on a free port, nothing on disk."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            service_unavailable("redis-server", "the redis-server program is not installed")
        self._command = [
            executable,
            "--port",
            str(unused_port()),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ]
        self.port = int(self._command[2])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until_listening("the private redis-server", self.port, self._process)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def until(condition: Any, *, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        await asyncio.sleep(0.2)


async def receive_after_rejoins(
    socket: ClientWebSocketResponse, kind: str, *, timeout_s: float = 5
) -> Any:
    """The next message of ``kind``, past any ``peer-rejoined``: after Redis
    lost its data the nodes put the rooms back, and say so (docs/scaling.md)."""
    while True:
        message = await socket.receive_json(timeout=timeout_s)
        if message["type"] != "peer-rejoined":
            assert message["type"] == kind, message
            return message


async def test_redis_restarting_mid_consult_degrades_and_recovers(
    cluster: Cluster, private_redis: PrivateRedis
) -> None:
    harness = cluster.harness
    local = await new_consult(harness)
    response = await harness.post("/api/consults", {})
    assert response.status == 201, await response.text()
    created = await response.json()
    across = ConsultSetup(local.therapist, created["consult"]["id"], created["invite_token"])
    cookie = session_cookie(harness)
    node_a = cluster.start("a", redis_url=private_redis.url)
    node_b = cluster.start("b", redis_url=private_redis.url)
    await started(node_a, node_b)
    offer = {"v": 1, "type": "offer", "sdp": "v=0 (not a real offer: relayed as it is)"}

    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(ClientSession()) for _ in range(4)]
        # One consult with both on node A, one with the patient on node B.
        pairs = []
        for setup, patient_node, http in (
            (local, node_a, sessions[:2]),
            (across, node_b, sessions[2:]),
        ):
            t = await therapist_socket(http[0], node_a, setup, cookie)
            await receive(t, "welcome")
            p = await patient_socket(http[1], patient_node, setup)
            await receive(p, "welcome")
            await receive(t, "patient-waiting")
            await t.send_json({"v": 1, "type": "admit"})
            await receive(p, "admitted")
            await receive(t, "peer-joined")
            await t.send_json(offer)
            assert (await receive(p, "offer"))["sdp"] == offer["sdp"]
            pairs.append((t, p))
        (local_t, local_p), (across_t, across_p) = pairs
        rows_before = {row.id: row.started_at for row in await consult_rows(harness)}

        private_redis.kill()
        status, body = await asyncio.to_thread(ready, node_a)
        assert status == 503
        assert body["checks"]["redis"].startswith("unreachable"), body
        # Both participants on node A: relaying goes on without Redis.
        for _ in range(3):
            await local_t.send_json(offer)
            assert (await receive(local_p, "offer"))["sdp"] == offer["sdp"]
        # Across nodes it cannot: the sender is told so, plainly, and goes on.
        await across_t.send_json(offer)
        refused = await receive(across_t, "error")
        assert (refused["code"], refused["ref"]) == ("unavailable", "offer")
        # No new tickets, no new sockets meanwhile: a clear "try again".
        async with sessions[3].post(
            f"{node_a.origin}/api/invites/{across.invite_token}/ticket",
            json={"consent": True},
            headers={"Origin": node_a.origin},
        ) as answer:
            assert answer.status == 503
            assert (await answer.json())["error"]["code"] == "unavailable"
            assert answer.headers["Retry-After"] == "2"
        late = await therapist_socket(sessions[0], node_b, local, cookie)
        assert (await receive(late, "error"))["code"] == "unavailable"
        await late.receive()
        assert late.close_code == 1013  # try again later: the page retries by itself

        # Redis comes back, empty (it keeps nothing on disk): the nodes tell it
        # again who is connected where, and the consult across nodes relays again.
        private_redis.start()

        async def relayed_across() -> bool:
            await across_t.send_json(offer)
            try:
                got = await receive_after_rejoins(across_p, "offer", timeout_s=1)
            except TimeoutError:
                # The refusal went to the therapist's socket: drop it and retry.
                with contextlib.suppress(TimeoutError):
                    while True:
                        await across_t.receive_json(timeout=0.05)
                return False
            return bool(got["sdp"] == offer["sdp"])

        await until(
            relayed_across, timeout_s=20, what="no relay across nodes after Redis came back"
        )
        status, body = await asyncio.to_thread(ready, node_a)
        assert status == 200, body
        await local_t.send_json(offer)
        assert (await receive_after_rejoins(local_p, "offer"))["sdp"] == offer["sdp"]

        for t, p in pairs:
            await t.send_json({"v": 1, "type": "end"})
            await receive(p, "consult-ended")

    rows = await consult_rows(harness)
    assert len(rows) == 2
    for row in rows:
        assert row.status == "ended"
        assert row.started_at == rows_before[row.id]  # the start survived Redis's restart
        assert row.duration_s == round((row.ended_at - row.started_at).total_seconds())
    assert node_a.process.poll() is None
    assert node_b.process.poll() is None
    assert "Traceback" not in cluster.log_text()


async def test_logins_lockouts_sessions_and_codes_hold_across_nodes(cluster: Cluster) -> None:
    """Spreading attempts over nodes gains an attacker nothing: every node
    keeps these in the one shared database (docs/scaling.md says why there
    and not in Redis)."""
    harness = cluster.harness
    who = await harness.professional("therapist@praktijk-noord.example", Role.THERAPIST)
    node_a, node_b = cluster.start("a"), cluster.start("b")
    await started(node_a, node_b)

    def login_body(password: str, moment: datetime) -> dict[str, str]:
        return {"email": who.email, "password": password, "code": pyotp.TOTP(who.secret).at(moment)}

    async def post(http: ClientSession, node: ServerProcess, path: str, body: Any) -> Any:
        async with http.post(
            f"{node.origin}{path}", json=body, headers={"Origin": node.origin}
        ) as r:
            return r.status, await r.json() if r.content_type == "application/json" else None

    # Enrolment used the current TOTP step: the next one is good (one step of drift).
    step = datetime.now(UTC) + timedelta(seconds=30)
    async with ClientSession() as first, ClientSession() as second:
        async with first.post(
            f"{node_a.origin}/api/login",
            json=login_body(who.password, step),
            headers={"Origin": node_a.origin},
        ) as answer:
            assert answer.status == 200, await answer.text()
            cookie = answer.cookies["vc_session"].value
        # The same code again, on the other node: a replay, refused.
        status, body = await post(second, node_b, "/api/login", login_body(who.password, step))
        assert (status, body["error"]["code"]) == (401, "login_failed")
        # The session made on A is good on B; ended on B, it is gone on A.
        for node in (node_b, node_a):
            async with second.get(
                f"{node.origin}/api/session", headers={"Cookie": f"vc_session={cookie}"}
            ) as answer:
                assert answer.status == 200
        async with second.post(
            f"{node_b.origin}/api/logout",
            headers={"Origin": node_b.origin, "Cookie": f"vc_session={cookie}"},
        ) as answer:
            assert answer.status == 204
        async with second.get(
            f"{node_a.origin}/api/session", headers={"Cookie": f"vc_session={cookie}"}
        ) as answer:
            assert answer.status == 401

    # Failed logins spread over both nodes lock the account on both. The
    # replayed code above was the first failure; four more make five
    # (accounts.max_failures).
    async with ClientSession() as attacker:
        for attempt in range(4):
            node = (node_a, node_b)[attempt % 2]
            status, _ = await post(attacker, node, "/api/login", login_body("wrong", step))
            assert status == 401
        for node in (node_a, node_b):
            status, body = await post(
                attacker, node, "/api/login", login_body(who.password, step + timedelta(seconds=30))
            )
            assert (status, body["error"]["code"]) == (429, "login_locked")
