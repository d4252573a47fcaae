"""Login, logout, the current session, and enrolment."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import Field, StringConstraints

from audit import accounts as stored_accounts
from audit.access_log import Actor, ClientType, record_access
from audit.db import reading
from audit.notices import dismiss_notice, pending_notices
from audit.practice import practice_settings_of
from audit.sealing import TOKEN_PATTERN
from audit.sessions import Session, create_session, end_session
from server.api.body import RequestBody, read_json
from server.api.errors import NotFoundError, TooManyRequests, Unauthorized
from server.api.query import NO_PARAMS, query_params
from server.api.representations import account_json, iso, notice_json, session_json
from server.app_keys import ACCESS_LOG, CLOCK, DB_ENGINE, SETTINGS
from server.auth.enrolment import Enroller
from server.auth.errors import LoginLocked, LoginRefused
from server.auth.login import Authenticator, LoginAttempt
from server.auth.passwords import MAX_PASSWORD_LENGTH
from server.auth.sessions import (
    authenticate,
    clear_session_cookie,
    keep_alive,
    require_login,
    set_session_cookie,
)
from server.services import authenticator, enroller
from server.web_security import client_address

# The actor role of whoever holds an enrolment link (not logged in yet).
LINK_HOLDER = "link_holder"


def _reader(account: stored_accounts.Account, actor_role: str | None) -> Actor:
    """The account holder, or whoever holds its enrolment link (no id yet)."""
    return Actor(
        None if actor_role == LINK_HOLDER else account.id,
        actor_role or account.role.value,
        ClientType.API,
    )


async def _log_read(
    request: web.Request,
    account: stored_accounts.Account,
    action: str,
    *,
    actor_role: str | None = None,
) -> None:
    """One access record for a read of ``account``'s own data that follows a
    change (login, enrolment steps), in a transaction of its own."""
    async with request.app[DB_ENGINE].begin() as conn:
        await record_access(
            conn,
            _reader(account, actor_role),
            organisation_id=account.organisation_id,
            action=action,
            object_type="account",
            object_id=account.id,
            now=request.app[CLOCK].now(),
        )


async def _record_read(
    request: web.Request,
    account: stored_accounts.Account,
    action: str,
    *,
    actor_role: str | None = None,
) -> None:
    """One access record for a read only of ``account``'s own data, through the
    access-log writer (group commit); returns once it is committed."""
    await request.app[ACCESS_LOG].record(
        _reader(account, actor_role),
        organisation_id=account.organisation_id,
        action=action,
        object_type="account",
        object_id=account.id,
        now=request.app[CLOCK].now(),
    )


routes = web.RouteTableDef()

Code = Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]
Password = Annotated[str, Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)]
Email = Annotated[str, Field(min_length=1, max_length=stored_accounts.MAX_EMAIL_LENGTH)]
# Enrolment tokens are 43 URL-safe characters; anything else is not one.

LOGIN_REFUSED = "The e-mail address, password or code is not right."


class LoginBody(RequestBody):
    email: Email
    password: Password
    code: Code


class PasswordBody(RequestBody):
    password: Password


class CodeBody(RequestBody):
    code: Code


@routes.post("/api/login")
async def login(request: web.Request) -> web.Response:
    """Log in with e-mail address, password and TOTP code; start a new session."""
    body = await read_json(request, LoginBody)
    auth: Authenticator = authenticator(request.app)
    attempt = LoginAttempt(body.email, body.password, body.code, client_address(request))
    try:
        account = await auth.login(attempt)
    except LoginLocked as locked:
        raise _locked(locked) from None
    except LoginRefused:
        raise Unauthorized(LOGIN_REFUSED, code="login_failed") from None

    app = request.app
    now = app[CLOCK].now()
    previous = await authenticate(request)
    async with app[DB_ENGINE].begin() as conn:
        # A fresh id at every login: a session id planted before login is worthless.
        if previous is not None:
            await end_session(conn, previous.session.id_hash)
        session_id, session = await create_session(conn, account.id, now=now)
    await _log_read(request, account, "session.login")
    response = web.json_response(await _session_answer(request, account, session))
    set_session_cookie(request, response, session_id)
    return response


@routes.post("/api/logout")
async def logout(request: web.Request) -> web.Response:
    """End the session on the server and drop the cookie (also when none is open)."""
    principal = await authenticate(request)
    if principal is not None:
        async with request.app[DB_ENGINE].begin() as conn:
            await end_session(conn, principal.session.id_hash)
    response = web.Response(status=204)
    clear_session_cookie(request, response)
    return response


@routes.get("/api/session")
async def current_session(request: web.Request) -> web.Response:
    """Who is logged in, and when the session ends if left alone."""
    principal = await require_login(request)
    query_params(request, NO_PARAMS)
    await _record_read(request, principal.account, "session.read")
    return web.json_response(await _session_answer(request, principal.account, principal.session))


@routes.post("/api/session/notices/{notice_id:[0-9]{1,18}}/dismiss")
async def dismiss(request: web.Request) -> web.Response:
    """The account holder has read one of their notices: it goes."""
    account = (await require_login(request)).account
    async with request.app[DB_ENGINE].begin() as conn:
        if not await dismiss_notice(conn, account.id, int(request.match_info["notice_id"])):
            raise NotFoundError("you have no notice with this id", code="notice_not_found")
        await record_access(
            conn,
            Actor.api(account),
            organisation_id=account.organisation_id,
            action="notice.dismiss",
            object_type="account",
            object_id=account.id,
            now=request.app[CLOCK].now(),
        )
    return web.Response(status=204)


@routes.post("/api/session/touch")
async def touch(request: web.Request) -> web.Response:
    """Keep the session alive (the page saw the professional at work); answers nothing else."""
    await keep_alive(request)
    return web.Response(status=204)


async def _session_answer(
    request: web.Request, account: stored_accounts.Account, session: Session
) -> dict[str, object]:
    """The session's answer, at the app's time and with its session settings,
    what the account holder must be told (a reset of their credentials), and
    what the practice lets the pages offer."""
    # Two reads on every page load: no write lock on SQLite, no BEGIN and
    # ROLLBACK on PostgreSQL.
    async with reading(request.app[DB_ENGINE]) as conn:
        notices = await pending_notices(conn, account.id)
        practice = await practice_settings_of(conn, account.organisation_id)
    answer = session_json(
        account, session, settings=request.app[SETTINGS].sessions, now=request.app[CLOCK].now()
    )
    answer["notices"] = [notice_json(notice) for notice in notices]
    # The new-consult form shows its reference field only where it is accepted.
    answer["practice"] = {"appointment_reference_allowed": practice.appointment_reference_allowed}
    return answer


def _locked(locked: LoginLocked) -> TooManyRequests:
    return TooManyRequests(
        "Too many failed attempts. Wait a while before trying again.",
        retry_after_s=locked.retry_after_s,
        code="login_locked",
    )


def _token(request: web.Request) -> str:
    return request.match_info["token"]


@routes.get("/api/enrolment/{token:" + TOKEN_PATTERN + "}")
async def enrolment_status(request: web.Request) -> web.Response:
    """What the link is for: the address and role being enrolled, and until when."""
    link = await enroller(request.app).open(_token(request))
    await _record_read(request, link.account, "enrolment.read", actor_role=LINK_HOLDER)
    return web.json_response(
        {
            "email": link.account.email,
            "role": link.account.role.value,
            "expires_at": iso(link.expires_at),
            "password_chosen": link.pending_password_hash is not None,
            # A re-enrolment after a TOTP reset: the password stays, and is asked for.
            "keeps_password": link.account.password_hash is not None,
        }
    )


@routes.post("/api/enrolment/{token:" + TOKEN_PATTERN + "}/password")
async def enrolment_password(request: web.Request) -> web.Response:
    """Set the password; answer with the new TOTP secret and its QR code (shown once)."""
    body = await read_json(request, PasswordBody)
    service: Enroller = enroller(request.app)
    try:
        setup = await service.choose_password(
            _token(request), body.password, client_address=client_address(request)
        )
    except LoginLocked as locked:
        raise _locked(locked) from None
    link = await service.open(_token(request))
    await _log_read(request, link.account, "enrolment.password", actor_role=LINK_HOLDER)
    return web.json_response(
        {
            "totp_secret": setup.secret,
            "provisioning_uri": setup.provisioning_uri,
            "qr_code": setup.qr_code,
        }
    )


@routes.post("/api/enrolment/{token:" + TOKEN_PATTERN + "}/confirm")
async def enrolment_confirm(request: web.Request) -> web.Response:
    """Confirm one code from the app; the account becomes active and can log in."""
    body = await read_json(request, CodeBody)
    service: Enroller = enroller(request.app)
    account = await service.confirm(_token(request), body.code)
    await _log_read(request, account, "enrolment.confirm", actor_role=LINK_HOLDER)
    return web.json_response({"account": account_json(account)})
