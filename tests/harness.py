"""A test harness around the real app: a manual clock, accounts, enrolment, login."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pyotp
from aiohttp import web
from aiohttp.test_utils import TestClient

from audit.accounts import Organisation, Role, create_organisation, find_account_by_email
from audit.clock import ManualClock
from server.app_keys import DB_ENGINE
from server.auth.admin import Actor, add_account

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
