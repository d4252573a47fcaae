"""A test harness around the real app: a manual clock, accounts, enrolment, login."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyotp
import sqlalchemy as sa
from aiohttp import ClientSession, ClientWebSocketResponse, web
from aiohttp.test_utils import TestClient

from audit.access_log import Actor
from audit.accounts import Organisation, Role, create_organisation, find_account_by_email
from audit.clock import ManualClock
from audit.keyring import WrappingKey
from audit.receipts import receipt_key
from audit.recordings import StopReason, finish_recording, start_recording
from audit.schema import consults
from server.app_keys import DB_ENGINE, FILE_STORE, MASTER_KEY
from server.auth.admin import add_account

PASSWORD = "correct horse battery staple"


@dataclass
class Professional:
    email: str
    password: str
    secret: str
    organisation: Organisation
    role: Role
    account_id: uuid.UUID


class Harness:
    """Drives one app through its HTTP API like a browser would (same Origin)."""

    def __init__(self, app: web.Application, client: TestClient[Any, Any], clock: ManualClock):
        self.app = app
        self.client = client
        self.clock = clock
        self.origin = str(client.make_url("/")).rstrip("/")
        self._organisations: dict[str, Organisation] = {}

    @property
    def headers(self) -> dict[str, str]:
        return {"Origin": self.origin}

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        if body is None:
            return await self.client.post(path, headers=headers, **kwargs)
        return await self.client.post(path, json=body, headers=headers, **kwargs)

    async def issue_receipt(self, invite_token: str, consult_id: str | uuid.UUID) -> Any:
        """Ask for a receipt as the admitted patient's page does: with the key
        its socket was given (audit.receipts.receipt_key)."""
        key = receipt_key(self.app[MASTER_KEY].key, uuid.UUID(str(consult_id)))
        return await self.post(f"/api/invites/{invite_token}/receipt", {"receipt_key": key})

    async def patch(self, path: str, body: Any) -> Any:
        return await self.client.patch(path, json=body, headers=self.headers)

    async def organisation(self, name: str = "Praktijk Noord") -> Organisation:
        if name not in self._organisations:
            async with self.app[DB_ENGINE].begin() as conn:
                self._organisations[name] = await create_organisation(
                    conn, name, now=self.clock.now()
                )
        return self._organisations[name]

    async def invite(self, email: str, role: Role, organisation: str = "Praktijk Noord") -> str:
        """Create an account as the operator would; return its enrolment token."""
        org = await self.organisation(organisation)
        async with self.app[DB_ENGINE].begin() as conn:
            invitation = await add_account(
                conn,
                Actor.operator(),
                organisation_id=org.id,
                email=email,
                role=role,
                now=self.clock.now(),
                link_ttl_s=3600,
            )
        return invitation.token

    async def session_with_cookie(self, session_id: str) -> Any:
        """GET /api/session presenting exactly this session cookie and no other."""
        self.client.session.cookie_jar.clear()
        return await self.client.get("/api/session", headers={"Cookie": f"vc_session={session_id}"})

    def code(self, secret: str) -> str:
        return pyotp.TOTP(secret).at(self.clock.now())

    async def enrol(self, token: str, password: str = PASSWORD) -> str:
        """Go through enrolment; return the TOTP secret the app would hold."""
        chosen = await self.post(f"/api/enrolment/{token}/password", {"password": password})
        assert chosen.status == 200, await chosen.text()
        secret: str = (await chosen.json())["totp_secret"]
        confirmed = await self.post(f"/api/enrolment/{token}/confirm", {"code": self.code(secret)})
        assert confirmed.status == 200, await confirmed.text()
        # The confirming code is used up; the next login needs the next one.
        self.clock.advance(30)
        return secret

    async def professional(
        self, email: str, role: Role, organisation: str = "Praktijk Noord"
    ) -> Professional:
        token = await self.invite(email, role, organisation)
        secret = await self.enrol(token)
        org = await self.organisation(organisation)
        status = await self.client.get(f"/api/enrolment/{token}")
        assert status.status == 404  # used up
        async with self.app[DB_ENGINE].connect() as conn:
            account = await find_account_by_email(conn, email)
        assert account is not None
        return Professional(email, PASSWORD, secret, org, role, account.id)

    async def login(self, who: Professional, *, code: str | None = None) -> Any:
        body = {"email": who.email, "password": who.password, "code": code or self.code(who.secret)}
        return await self.post("/api/login", body)

    async def logged_in(self, who: Professional) -> None:
        response = await self.login(who)
        assert response.status == 200, await response.text()
        self.clock.advance(30)


@dataclass
class ConsultSetup:
    therapist: Professional
    consult_id: str
    invite_token: str


class Sockets:
    """WebSocket helpers: a therapist's socket (cookie) and patients' (ticket),
    each patient on a client session of its own, like a separate browser."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self._sessions: list[ClientSession] = []
        self._sockets: list[ClientWebSocketResponse] = []

    async def close(self) -> None:
        for websocket in self._sockets:
            await websocket.close()
        for session in self._sessions:
            await session.close()

    async def therapist(self, consult_id: str) -> ClientWebSocketResponse:
        socket = await self.harness.client.ws_connect(
            f"/ws?consult={consult_id}", headers=self.harness.headers
        )
        self._sockets.append(socket)
        return socket

    async def ticket(self, invite_token: str, session: ClientSession | None = None) -> str:
        session = session or await self.session()
        async with session.post(
            f"/api/invites/{invite_token}/ticket",
            json={"consent": True, "guardian_consent": True},
            headers=self.harness.headers,
        ) as response:
            assert response.status == 200, await response.text()
            ticket: str = (await response.json())["ticket"]
        return ticket

    async def session(self) -> ClientSession:
        session = ClientSession(base_url=self.harness.client.make_url("/"))
        self._sessions.append(session)
        return session

    async def patient(self, invite_token: str) -> ClientWebSocketResponse:
        session = await self.session()
        ticket = await self.ticket(invite_token, session)
        socket = await session.ws_connect(f"/ws?ticket={ticket}", headers=self.harness.headers)
        self._sockets.append(socket)
        return socket


async def new_consult(
    harness: Harness, email: str = "therapist@praktijk-noord.example", **body: Any
) -> ConsultSetup:
    therapist = await harness.professional(email, Role.THERAPIST)
    await harness.logged_in(therapist)
    response = await harness.post("/api/consults", body)
    assert response.status == 201, await response.text()
    created = await response.json()
    return ConsultSetup(therapist, created["consult"]["id"], created["invite_token"])


async def receive(socket: ClientWebSocketResponse, kind: str, *, timeout_s: float = 5) -> Any:
    """The next message of ``kind``; fails on anything else first."""
    message = await socket.receive_json(timeout=timeout_s)
    assert message["type"] == kind, message
    return message


async def stored_recording(
    harness: Harness,
    consult_id: str | uuid.UUID,
    media: bytes | Iterable[bytes],
    *,
    complete: bool = True,
    wrapping: WrappingKey | None = None,
) -> uuid.UUID:
    """A recording of ``media`` in the app's file store, as the recorder makes one:
    finished (``complete``), or cut off like a writer that died (incomplete).
    ``wrapping`` is a ring key to wrap its data key (default: the current one)."""
    engine = harness.app[DB_ENGINE]
    async with engine.begin() as conn:
        recording, writer = await start_recording(
            conn,
            harness.app[FILE_STORE],
            wrapping or harness.app[MASTER_KEY].key,
            uuid.UUID(str(consult_id)),
            now=harness.clock.now(),
        )
    for piece in [media] if isinstance(media, bytes) else media:
        writer.write(piece)
    if not complete:
        writer.abort()
    harness.clock.advance(60)
    async with engine.begin() as conn:
        await finish_recording(
            conn,
            recording.id,
            writer,
            now=harness.clock.now(),
            reason=StopReason.STOPPED_BY_THERAPIST,
            complete=complete,
        )
    return recording.id


def wait_until_listening(
    name: str, port: int, process: subprocess.Popen[Any], *, timeout_s: float = 10
) -> None:
    """Until ``process`` (a server a test started) accepts TCP connections on
    127.0.0.1:``port``; fails the test if it exits or takes longer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} did not listen on port {port} within {timeout_s:g} s")


async def consult_row(harness: Harness, consult_id: str) -> sa.Row[tuple[object, ...]]:
    async with harness.app[DB_ENGINE].connect() as conn:
        return (
            await conn.execute(sa.select(consults).where(consults.c.id == uuid.UUID(consult_id)))
        ).one()


async def waiting_pair(harness: Harness, sockets: Sockets, **body: Any):
    """A new consult with its therapist connected and its patient in the waiting room."""
    setup = await new_consult(harness, **body)
    therapist = await sockets.therapist(setup.consult_id)
    welcome = await receive(therapist, "welcome")
    assert welcome["role"] == "therapist"
    patient = await sockets.patient(setup.invite_token)
    assert (await receive(patient, "welcome"))["state"] == "waiting"
    await receive(therapist, "patient-waiting")
    return setup, therapist, patient


async def admitted_pair(harness: Harness, sockets: Sockets, **body: Any):
    """As :func:`waiting_pair`, and the therapist has admitted the patient."""
    setup, therapist, patient = await waiting_pair(harness, sockets, **body)
    await therapist.send_json({"v": 1, "type": "admit"})
    await receive(patient, "admitted")
    await receive(therapist, "peer-joined")
    return setup, therapist, patient
