"""Fault drills (issue 17): a single server killed with SIGKILL mid-consult
twenty times in a row, and PostgreSQL restarted under logins, consults and
open consult sockets.

Both drive real ``videoconsult serve`` processes, as a clinic runs them.
The accounts and consults are made through the harness's in-process app,
which then stops: the server process runs alone on its data directory and
database (``tests/test_crash.py`` says why). The node-death and
Redis-restart drills of several nodes are in ``tests/test_multinode.py``.
docs/benchmarks.md ("Fault drills") has the figures of a run.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa
from aiohttp import (
    ClientSession,
    ClientTimeout,
    ClientWebSocketResponse,
    DummyCookieJar,
    WSMsgType,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit.accounts import Role
from audit.clock import ManualClock
from audit.db import SQLITE_FILE_NAME
from audit.schema import consults, login_failures
from server import create_app
from server.alive import last_alive
from server.app_keys import DATA_DIR
from server.auth.totp import STEP_S
from tests.support.cli import cli_env, run_cli
from tests.support.harness import Harness, Professional, new_consult, receive
from tests.support.own_postgres import OwnPostgres
from tests.support.processes import ServerProcess, session_cookie
from tests.support.settings import SettingsFactory

# Process drills: server processes started, killed and waited for, on the
# real clock with grace periods of seconds. In the second step of
# ./scripts/test, as the other multi-node tests: beside one other test of
# that step, never beside the quick tests of the first.
pytestmark = pytest.mark.multinode


@pytest.fixture
def clock() -> ManualClock:
    # The server processes run on the real clock: sessions, invites and TOTP
    # codes made through the harness must be good by that clock too.
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


# --- SIGKILL, twenty times in a row -------------------------------------------

KILLS = 20
# Long enough for both participants of two consults to come back after a
# start on two busy cores (they are back 0.02-0.15 s after /healthz
# answers), short enough that an abandoned consult ends soon: the drill
# waits for one in four cycles.
KILL_GRACE_S = 3
# The cycles in which one more consult runs when the server is killed, and
# nobody comes back to it.
ABANDONED_IN = frozenset(range(0, KILLS, 5))
# How early an end may be: the alive file is touched every 2 s (alive.py),
# a little later on a busy machine.
ALIVE_SLACK_S = 3.0


@dataclass
class Consult:
    id: str
    invite_token: str
    started_at: datetime | None = None
    therapist: ClientWebSocketResponse | None = None
    patient: ClientWebSocketResponse | None = None
    ended_at: datetime | None = None


@dataclass
class KillDrill:
    """One server process on the harness's data directory and SQLite file,
    restarted on them after each kill, and the consults' sockets to it."""

    harness: Harness
    port: int
    log: Path
    http: ClientSession
    cookie: str
    engine: AsyncEngine
    consults: list[Consult]
    server: ServerProcess | None = None
    timings: dict[str, list[float]] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.harness.app[DATA_DIR]

    @property
    def origin(self) -> str:
        assert self.server is not None
        return self.server.origin

    async def start(self) -> float:
        """Start the server; returns when (monotonic) it answered /healthz."""
        self.server = ServerProcess(
            self.data_dir,
            self.port,
            self.log,
            settings={
                "consults_grace_s": str(KILL_GRACE_S),
                "security_client_requests_per_min": "0",
            },
        )
        began = time.monotonic()
        await asyncio.to_thread(self.server.wait_healthy)
        self.timed("start", began)
        return time.monotonic()

    def kill(self) -> None:
        assert self.server is not None
        self.server.kill()

    def timed(self, what: str, since: float) -> None:
        """Keep how long ``what`` took since ``since`` (monotonic), for the figures."""
        self.timings.setdefault(what, []).append(time.monotonic() - since)

    async def therapist(self, consult: Consult) -> dict[str, Any]:
        consult.therapist = await self.http.ws_connect(
            f"{self.origin}/ws?consult={consult.id}",
            headers={"Origin": self.origin, "Cookie": f"vc_session={self.cookie}"},
        )
        return await receive(consult.therapist, "welcome")

    async def patient(self, consult: Consult) -> dict[str, Any]:
        async with self.http.post(
            f"{self.origin}/api/invites/{consult.invite_token}/ticket",
            json={"consent": True},
            headers={"Origin": self.origin},
        ) as answer:
            assert answer.status == 200, await answer.text()
            ticket = (await answer.json())["ticket"]
        consult.patient = await self.http.ws_connect(
            f"{self.origin}/ws?ticket={ticket}", headers={"Origin": self.origin}
        )
        return await receive(consult.patient, "welcome")

    async def admit(self, consult: Consult) -> None:
        """Both in, the patient admitted: the consult runs."""
        assert (await self.therapist(consult))["state"] == "waiting"
        assert (await self.patient(consult))["state"] == "waiting"
        assert consult.therapist is not None
        assert consult.patient is not None
        await receive(consult.therapist, "patient-waiting")
        await consult.therapist.send_json({"v": 1, "type": "admit"})
        await receive(consult.patient, "admitted")
        await receive(consult.therapist, "peer-joined")
        consult.started_at = (await self.record(consult)).started_at
        assert consult.started_at is not None

    async def resume(self, consult: Consult, *, patient_first: bool, cycle: int) -> None:
        """Both participants come back: the consult runs on, nobody is
        admitted again, the therapist's new offer reaches the patient."""
        began = time.monotonic()
        if patient_first:
            welcome = await self.patient(consult)
            assert (welcome["state"], welcome["peer_present"]) == ("active", False), welcome
            welcome = await self.therapist(consult)
            assert (welcome["state"], welcome["peer_present"]) == ("active", True), welcome
            assert consult.patient is not None
            rejoined = await receive(consult.patient, "peer-rejoined")
            assert rejoined["role"] == "therapist"
        else:
            welcome = await self.therapist(consult)
            assert (welcome["state"], welcome["peer_present"]) == ("active", False), welcome
            welcome = await self.patient(consult)
            assert (welcome["state"], welcome["peer_present"]) == ("active", True), welcome
            assert consult.therapist is not None
            rejoined = await receive(consult.therapist, "peer-rejoined")
            assert rejoined["role"] == "patient"
        assert consult.therapist is not None
        assert consult.patient is not None
        sdp = f"v=0 cycle {cycle}"
        await consult.therapist.send_json({"v": 1, "type": "offer", "sdp": sdp})
        assert (await receive(consult.patient, "offer"))["sdp"] == sdp
        await consult.patient.send_json({"v": 1, "type": "answer", "sdp": sdp})
        assert (await receive(consult.therapist, "answer"))["sdp"] == sdp
        self.timed("resume", began)

    async def record(self, consult: Consult) -> Any:
        """The consult's row, read from the SQLite file the server writes."""
        async with self.engine.connect() as conn:
            query = sa.select(consults).where(consults.c.id == uuid.UUID(consult.id))
            return (await conn.execute(query)).one()

    async def active_ids(self) -> set[str]:
        async with self.engine.connect() as conn:
            query = sa.select(consults.c.id).where(consults.c.status == "active")
            return {str(row.id) for row in await conn.execute(query)}


async def dropped(*sockets: ClientWebSocketResponse | None) -> None:
    """Each socket saw its server go (no close frame: the process died)."""
    for socket in sockets:
        assert socket is not None
        message = await socket.receive(timeout=5)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR), message


def utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@pytest.fixture
async def kill_drill(
    sqlite_harness: Harness, free_port: int, tmp_path: Path
) -> AsyncIterator[KillDrill]:
    """The drill's consults, made through the harness, which then stops: two
    that run through every kill, and one for each cycle of ``ABANDONED_IN``."""
    setup = await new_consult(sqlite_harness)
    cookie = session_cookie(sqlite_harness)
    tokens = [(setup.consult_id, setup.invite_token)]
    for _ in range(1 + len(ABANDONED_IN)):
        made = await sqlite_harness.post("/api/consults", {})
        assert made.status == 201, await made.text()
        body = await made.json()
        tokens.append((body["consult"]["id"], body["invite_token"]))
    await sqlite_harness.client.close()
    sqlite_file = sqlite_harness.app[DATA_DIR] / SQLITE_FILE_NAME
    engine = create_async_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    async with ClientSession(cookie_jar=DummyCookieJar()) as http:
        drill = KillDrill(
            sqlite_harness,
            free_port,
            tmp_path / "server.log",
            http,
            cookie,
            engine,
            [Consult(consult_id, token) for consult_id, token in tokens],
        )
        try:
            yield drill
        finally:
            if drill.server is not None:
                drill.server.stop()
            await engine.dispose()


async def test_a_server_killed_twenty_times_mid_consult_loses_no_consult(
    kill_drill: KillDrill,
) -> None:
    drill = kill_drill
    first, second, *spare = drill.consults
    abandoned: list[Consult] = []
    chance = random.Random(17)  # when in a cycle the kill lands: varied, yet repeatable
    await drill.start()
    await drill.admit(first)
    await drill.admit(second)
    began = time.monotonic()
    for cycle in range(KILLS):
        left_alone = None
        if cycle in ABANDONED_IN:
            left_alone = spare.pop(0)
            await drill.admit(left_alone)
            abandoned.append(left_alone)
        await asyncio.sleep(chance.uniform(0, 1))
        drill.kill()
        killed_at = datetime.now(UTC)
        await dropped(first.therapist, first.patient, second.therapist, second.patient)
        # The process is dead: nothing touches the alive file any more.
        seen = last_alive(drill.data_dir)
        assert seen is not None
        assert killed_at - timedelta(seconds=ALIVE_SLACK_S) <= seen <= killed_at

        restarted_at = datetime.now(UTC)
        healthy = await drill.start()
        await drill.resume(first, patient_first=False, cycle=cycle)
        await drill.resume(second, patient_first=cycle % 2 == 1, cycle=cycle)
        for running in (first, second):
            record = await drill.record(running)
            assert record.status == "active"
            assert utc(record.started_at) == running.started_at  # the start never moves

        if left_alone is not None:
            waited = time.monotonic()
            record = await drill.record(left_alone)
            while record.status == "active":
                assert time.monotonic() - healthy < KILL_GRACE_S + 3, (
                    f"cycle {cycle}: the consult nobody came back to still runs"
                )
                await asyncio.sleep(0.2)
                record = await drill.record(left_alone)
            drill.timed("abandoned end seen", waited)
            assert record.status == "ended"
            # Ended when the server was last alive, not at the restart; or at
            # its start, if that was later (admitted after the last touch).
            assert left_alone.started_at is not None
            end = max(seen, left_alone.started_at)
            assert utc(record.ended_at) == end, (record.ended_at, seen)
            assert utc(record.ended_at) < restarted_at
            assert utc(record.started_at) == left_alone.started_at
            assert record.duration_s == round((end - left_alone.started_at).total_seconds())
            left_alone.ended_at = end
        # Nothing runs that nobody is in.
        assert await drill.active_ids() == {first.id, second.id}, f"cycle {cycle}"
    drilled_s = time.monotonic() - began

    # The two consults end as they normally do: the therapist ends one in
    # the consult, the other through the API.
    assert first.therapist is not None
    assert second.therapist is not None
    await first.therapist.send_json({"v": 1, "type": "end"})
    for socket in (first.therapist, first.patient):
        assert socket is not None
        assert (await receive(socket, "consult-ended"))["reason"] == "ended_by_therapist"
    async with drill.http.post(
        f"{drill.origin}/api/consults/{second.id}/end",
        headers={"Origin": drill.origin, "Cookie": f"vc_session={drill.cookie}"},
    ) as answer:
        assert answer.status == 200, await answer.text()
    for socket in (second.therapist, second.patient):
        assert socket is not None
        assert (await receive(socket, "consult-ended"))["reason"] == "ended_by_therapist"

    assert await drill.active_ids() == set()
    for consult in (first, second, *abandoned):
        record = await drill.record(consult)
        assert record.status == "ended"
        assert utc(record.started_at) == consult.started_at
        if consult.ended_at is not None:
            assert utc(record.ended_at) == consult.ended_at  # ended once, never again
    assert drill.server is not None
    drill.server.stop()
    log = drill.log.read_text()
    assert "Traceback" not in log
    # One end each, for the reason it had.
    ends = re.findall(r"consult ended\s.*?consult_id=(\S+)\s.*?reason=(\S+)", log)
    reasons = {consult.id: "both_left" for consult in abandoned}
    reasons |= {first.id: "ended_by_therapist", second.id: "ended_by_therapist"}
    assert sorted(ends) == sorted(reasons.items()), ends
    print(
        f"\n{KILLS} kills in {drilled_s:.1f} s;",
        ", ".join(
            f"{what}: median {sorted(times)[len(times) // 2]:.2f} s, max {max(times):.2f} s"
            for what, times in drill.timings.items()
        ),
    )


# --- PostgreSQL restarted under logins and consults ---------------------------


class WallClock(ManualClock):
    """The real time, for the harness that makes the accounts next to a
    server process: the TOTP step an enrolment claims is a real one, and the
    drill's logins use later ones. ``advance`` changes nothing."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def advance(self, seconds: float) -> None:
        pass


# Accounts to log in with: each logs in once per 30-second TOTP step at most
# (a used step is refused, docs/accounts.md), so the drill takes turns.
DRILL_ACCOUNTS = 40
PROBE_ACCOUNTS = 6
# How long the load runs before, between and after the restarts.
CALM_S = 2.5
# The round of the therapists' session check, the one part of a consult
# socket that needs the database (sessions.socket_check_s, 10 s by default:
# the drill's server checks more often, so the outage can be shorter).
SESSION_CHECK_S = 2
# How long PostgreSQL stays away in the restart with a pause: longer than the
# session check's round, so it surely meets the database away (and must not
# close the sockets for it).
DOWN_S = SESSION_CHECK_S + 2
# How soon after PostgreSQL is back a login must work again.
BACK_WITHIN_S = 5.0


class Codes:
    """A login code for some account: each TOTP step once per account, never
    again, even when the login that used it was answered 503 (it may have
    been claimed before the database went)."""

    def __init__(self, accounts: list[Professional]) -> None:
        enrolled = int(time.time()) // STEP_S  # each enrolment claimed this step at most
        self._last = {who.email: enrolled for who in accounts}
        self._accounts = {who.email: who for who in accounts}

    async def take(self, stop: asyncio.Event | None = None) -> tuple[Professional, str] | None:
        while stop is None or not stop.is_set():
            current = int(time.time()) // STEP_S
            for email, last in sorted(self._last.items(), key=lambda item: item[1]):
                step = max(last + 1, current)
                if step <= current + 1:  # within the one step of drift the server allows
                    self._last[email] = step
                    who = self._accounts[email]
                    return who, pyotp.TOTP(who.secret).generate_otp(step)
            await asyncio.sleep(0.5)
        return None


@dataclass
class Answered:
    what: str
    path: str
    status: int
    retry_after: str | None
    error: str | None
    at: float


@dataclass
class Load:
    """Logins, consults made and ended, and listings, against one server
    process, with every answer kept."""

    origin: str
    http: ClientSession
    codes: Codes
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    answers: list[Answered] = field(default_factory=list)
    created: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    sessions: list[str] = field(default_factory=list)

    async def call(
        self, what: str, method: str, path: str, *, cookie: str | None = None, body: Any = None
    ) -> tuple[int, Any, str | None]:
        headers = {"Origin": self.origin}
        if cookie is not None:
            headers["Cookie"] = f"vc_session={cookie}"
        async with self.http.request(
            method, f"{self.origin}{path}", json=body, headers=headers
        ) as answer:
            data = await answer.json() if answer.content_type == "application/json" else None
            error = data.get("error", {}).get("code") if isinstance(data, dict) else None
            self.answers.append(
                Answered(
                    what,
                    path,
                    answer.status,
                    answer.headers.get("Retry-After"),
                    error,
                    time.monotonic(),
                )
            )
            session = answer.cookies.get("vc_session")
            return answer.status, data, session.value if session is not None else None

    async def login(self, stop: asyncio.Event | None = None) -> str | None:
        """One login; the new session's cookie when it worked."""
        taken = await self.codes.take(stop)
        if taken is None:
            return None
        who, code = taken
        body = {"email": who.email, "password": who.password, "code": code}
        status, _, cookie = await self.call("login", "POST", "/api/login", body=body)
        if status != 200:
            return None
        assert cookie is not None
        self.sessions.append(cookie)
        return cookie

    async def logging_in(self) -> None:
        while not self.stop.is_set():
            await self.login(self.stop)
            await asyncio.sleep(0.2)

    async def consulting(self, cookie: str) -> None:
        """Make consults and end them, and list them, as a therapist's page would."""
        unended: set[str] = set()  # made by this therapist, not yet answered as ended
        while not self.stop.is_set():
            status, body, _ = await self.call(
                "create", "POST", "/api/consults", cookie=cookie, body={"display_name": "Drill"}
            )
            if status == 201:
                self.created.add(body["consult"]["id"])
                unended.add(body["consult"]["id"])
            for consult_id in sorted(unended):
                status, body, _ = await self.call(
                    "end", "POST", f"/api/consults/{consult_id}/end", cookie=cookie
                )
                if status == 200:
                    assert body["consult"]["ended_at"] is not None
                    self.ended.add(consult_id)
                    unended.discard(consult_id)
            await self.call("list", "GET", "/api/consults", cookie=cookie)
            await asyncio.sleep(0.05)


@dataclass
class HeldConsult:
    """A running consult whose participants keep signaling: an offer and an
    answer, over and over; when each round trip was done."""

    therapist: ClientWebSocketResponse
    patient: ClientWebSocketResponse
    trips: list[float] = field(default_factory=list)

    async def relay(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sdp = f"v=0 {len(self.trips)}"
            await self.therapist.send_json({"v": 1, "type": "offer", "sdp": sdp})
            assert (await receive(self.patient, "offer"))["sdp"] == sdp
            await self.patient.send_json({"v": 1, "type": "answer", "sdp": sdp})
            assert (await receive(self.therapist, "answer"))["sdp"] == sdp
            self.trips.append(time.monotonic())
            await asyncio.sleep(0.1)


async def hold_consult(load: Load, cookie: str) -> HeldConsult:
    """A consult made, joined and admitted on the server."""
    status, body, _ = await load.call("create", "POST", "/api/consults", cookie=cookie, body={})
    assert status == 201, body
    origin = load.origin
    therapist = await load.http.ws_connect(
        f"{origin}/ws?consult={body['consult']['id']}",
        headers={"Origin": origin, "Cookie": f"vc_session={cookie}"},
    )
    await receive(therapist, "welcome")
    status, ticket, _ = await load.call(
        "ticket", "POST", f"/api/invites/{body['invite_token']}/ticket", body={"consent": True}
    )
    assert status == 200, ticket
    patient = await load.http.ws_connect(
        f"{origin}/ws?ticket={ticket['ticket']}", headers={"Origin": origin}
    )
    await receive(patient, "welcome")
    await receive(therapist, "patient-waiting")
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    await receive(therapist, "peer-joined")
    return HeldConsult(therapist, patient)


@pytest.fixture
async def drill_accounts(
    own_postgres: OwnPostgres, make_settings: SettingsFactory, data_dir: Path, aiohttp_client: Any
) -> list[Professional]:
    """The schema made as an operator makes it (``videoconsult db upgrade``),
    then the drill's therapists, enrolled through an in-process app that then stops."""
    migrated = await asyncio.to_thread(
        run_cli, "db", "upgrade", env=cli_env(data_dir, database_url=own_postgres.url)
    )
    assert migrated.returncode == 0, migrated.stderr
    clock = WallClock()
    app = create_app(make_settings(database_url=own_postgres.url), clock=clock)
    harness = Harness(app, await aiohttp_client(app), clock)
    accounts = [
        await harness.professional(f"therapist{n}@praktijk-noord.example", Role.THERAPIST)
        for n in range(DRILL_ACCOUNTS)
    ]
    await harness.client.close()
    return accounts


async def restarts(postgres: OwnPostgres, probe: Load) -> list[tuple[str, float, float, float]]:
    """PostgreSQL stopped a while, restarted (``fast``) and restarted with
    no shutdown at all (``immediate``: crash recovery), calm in between.
    For each: how, when it went, when it was back, and how long after that
    a login worked again."""
    done = []
    await asyncio.sleep(CALM_S)
    for how in ("stopped a while", "fast", "immediate"):
        went = time.monotonic()
        if how == "stopped a while":
            await asyncio.to_thread(postgres.stop, "fast")
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(postgres.start)
        else:
            await asyncio.to_thread(postgres.restart, how)
        up = time.monotonic()
        # Logins work again at once: no stale connection is handed out.
        while await probe.login() is None:
            assert time.monotonic() - up < BACK_WITHIN_S, f"no login within {BACK_WITHIN_S} s"
            await asyncio.sleep(0.2)
        done.append((how, went, up, time.monotonic() - up))
        await asyncio.sleep(CALM_S)
    return done


async def test_postgresql_restarted_under_logins_and_consults_loses_nothing(
    own_postgres: OwnPostgres,
    drill_accounts: list[Professional],
    data_dir: Path,
    free_port: int,
    tmp_path: Path,
) -> None:
    log = tmp_path / "server.log"
    server = ServerProcess(
        data_dir,
        free_port,
        log,
        settings={
            "database_url": own_postgres.url,
            "security_client_requests_per_min": "0",
            "sessions_socket_check_s": str(SESSION_CHECK_S),
        },
    )
    try:
        await asyncio.to_thread(server.wait_healthy)
        async with ClientSession(
            cookie_jar=DummyCookieJar(), timeout=ClientTimeout(total=30)
        ) as http:
            # Some accounts kept for the logins that say the database is back:
            # the load may have used every other account's codes for now.
            load = Load(server.origin, http, Codes(drill_accounts[PROBE_ACCOUNTS:]))
            probe = Load(server.origin, http, Codes(drill_accounts[:PROBE_ACCOUNTS]))
            therapists = [cookie for _ in range(3) if (cookie := await load.login())]
            assert len(therapists) == 3, load.answers
            held = [await hold_consult(load, therapists[0]) for _ in range(2)]
            work = [
                *(asyncio.create_task(load.logging_in()) for _ in range(2)),
                *(asyncio.create_task(load.consulting(cookie)) for cookie in therapists[1:]),
                *(asyncio.create_task(consult.relay(load.stop)) for consult in held),
            ]
            try:
                outages = await restarts(own_postgres, probe)
            finally:
                load.stop.set()
                results = await asyncio.gather(*work, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            answers = load.answers + probe.answers

            # No answer but what was asked for, or 503 with Retry-After.
            expected = {"login": 200, "create": 201, "end": 200, "list": 200, "ticket": 200}
            wrong = [a for a in answers if a.status not in (expected[a.what], 503)]
            assert not wrong, wrong
            refused = [a for a in answers if a.status == 503]
            assert refused, "the drill never met the database away"
            unlike = [a for a in refused if not (a.retry_after and a.error == "unavailable")]
            assert not unlike, unlike
            # Signaling needs no database: the consults went on throughout.
            for consult in held:
                assert max(b - a for a, b in pairwise(consult.trips)) < 2.0
                for _, went, up, _ in outages:
                    if up - went > 1:
                        assert any(went < trip < up for trip in consult.trips), (went, up)
                assert not consult.therapist.closed
                assert not consult.patient.closed
            # What was answered as done was done.
            engine = create_async_engine(own_postgres.url)
            try:
                async with engine.connect() as conn:
                    query = sa.select(consults.c.id, consults.c.ended_at)
                    ended_at = {str(row.id): row.ended_at for row in await conn.execute(query)}
                    counted = sa.select(sa.func.count()).select_from(login_failures)
                    failures = await conn.scalar(counted)
            finally:
                await engine.dispose()
            assert load.created <= set(ended_at)
            assert all(ended_at[consult_id] is not None for consult_id in load.ended)
            for cookie in load.sessions + probe.sessions:
                status, _, _ = await load.call("session", "GET", "/api/session", cookie=cookie)
                assert status == 200
            # The consults held through it all end as usual.
            for consult in held:
                await consult.therapist.send_json({"v": 1, "type": "end"})
                for socket in (consult.therapist, consult.patient):
                    ended = await receive(socket, "consult-ended")
                    assert ended["reason"] == "ended_by_therapist"
    finally:
        server.stop()
    # The access log's hash chains are whole.
    verified = await asyncio.to_thread(
        run_cli, "audit", "verify", env=cli_env(data_dir, database_url=own_postgres.url)
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    said = log.read_text()
    # Said once per outage at most, never with a traceback; the therapists'
    # session check met the database away, and waited.
    assert "Traceback" not in said
    assert 1 <= said.count("database unavailable: requests that need it answer 503") <= 3
    assert re.search(r"background job waits; trying again .*job=session-checks", said)
    counts: dict[str, dict[int, int]] = {}
    for answer in answers:
        counts.setdefault(answer.what, {}).setdefault(answer.status, 0)
        counts[answer.what][answer.status] += 1
    print(
        f"\nanswers {counts}; login attempts left counted as failed: {failures};",
        "; ".join(
            f"{how}: away {up - went:.2f} s, a login worked {back:.2f} s later"
            for how, went, up, back in outages
        ),
    )
