"""The session cookie and the logged-in account of a request.

Sessions live on the server (:mod:`audit.sessions`); the cookie holds only a
random id. Every authenticated request checks the idle and absolute
timeouts and the account's status, so a disabled account is out at once.

The check is a read (:func:`audit.db.reading`); a session in use is marked
seen at most once every :data:`TOUCH_EVERY_S` (a tenth of the idle timeout if
that is shorter), so most requests write nothing for their session: no
SQLite write lock, no PostgreSQL commit. The idle timeout counts from the
last mark, so an idle session ends up to that step early, never late. The
pages' own keep-alive (``POST /api/session/touch``) marks it every time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from aiohttp import web

from audit.access_log import Actor, Outcome, record_access
from audit.accounts import Account, AccountStatus, Role, get_account
from audit.db import reading
from audit.errors import NotFound
from audit.sealing import looks_like_token
from audit.sessions import (
    Session,
    end_session,
    find_session,
    touch_session,
)
from config import SessionSettings
from server.api.errors import Forbidden, Unauthorized
from server.app_keys import CLOCK, DB_ENGINE, SETTINGS
from server.web_security import served_over_tls

# The __Host- prefix (over TLS) pins the cookie to this exact host and path.
COOKIE_NAME = "vc_session"
TLS_COOKIE_NAME = "__Host-vc_session"
# A session in use is marked seen at most this often (see the module's text).
TOUCH_EVERY_S = 60


@dataclass(frozen=True)
class Principal:
    """Who is making the request."""

    account: Account
    session: Session


PRINCIPAL = web.RequestKey("principal", Principal)
_CHECKED = web.RequestKey("session_checked", bool)


def cookie_name(request: web.Request) -> str:
    return TLS_COOKIE_NAME if served_over_tls(request) else COOKIE_NAME


def set_session_cookie(request: web.Request, response: web.StreamResponse, session_id: str) -> None:
    settings = request.app[SETTINGS]
    response.set_cookie(
        cookie_name(request),
        session_id,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=served_over_tls(request),
        max_age=settings.sessions.absolute_timeout_s,
    )


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    # Browsers ignore a __Host- cookie without Secure, deletion included.
    response.del_cookie(
        cookie_name(request),
        path="/",
        secure=served_over_tls(request),
        httponly=True,
        samesite="Strict",
    )


def session_expired(session: Session, *, now: datetime, settings: SessionSettings) -> bool:
    idle_end = session.last_seen_at + timedelta(seconds=settings.idle_timeout_s)
    absolute_end = session.created_at + timedelta(seconds=settings.absolute_timeout_s)
    return now >= idle_end or now >= absolute_end


def session_ends_at(session: Session, *, settings: SessionSettings) -> datetime:
    """When the session ends if nothing else happens (idle or absolute, earlier)."""
    idle_end = session.last_seen_at + timedelta(seconds=settings.idle_timeout_s)
    absolute_end = session.created_at + timedelta(seconds=settings.absolute_timeout_s)
    return min(idle_end, absolute_end)


def touch_due(session: Session, *, now: datetime, settings: SessionSettings) -> bool:
    """Whether a request now marks the session seen (see the module's text)."""
    step_s = min(TOUCH_EVERY_S, settings.idle_timeout_s / 10)
    return now - session.last_seen_at >= timedelta(seconds=step_s)


async def authenticate(request: web.Request) -> Principal | None:
    """Return the logged-in account of this request, or None; checked once per request."""
    if request.get(_CHECKED):
        return request.get(PRINCIPAL)
    request[_CHECKED] = True
    session_id = request.cookies.get(cookie_name(request))
    if not session_id or not looks_like_token(session_id):
        return None  # not one of ours, whatever its bytes
    app = request.app
    now = app[CLOCK].now()
    settings = app[SETTINGS].sessions
    account: Account | None = None
    async with reading(app[DB_ENGINE]) as conn:
        session = await find_session(conn, session_id)
        if session is None:
            return None
        if not session_expired(session, now=now, settings=settings):
            try:
                account = await get_account(conn, session.account_id)
            except NotFound:
                return None
    if account is None or account.status is not AccountStatus.ACTIVE:
        async with app[DB_ENGINE].begin() as conn:
            await end_session(conn, session.id_hash)
        return None
    if touch_due(session, now=now, settings=settings):
        async with app[DB_ENGINE].begin() as conn:
            await touch_session(conn, session, now=now)
        session = replace(session, last_seen_at=now)
    principal = Principal(account, session)
    request[PRINCIPAL] = principal
    return principal


async def require_login(request: web.Request) -> Principal:
    """Return the principal of a live session, any role; else 401."""
    principal = await authenticate(request)
    if principal is None:
        raise Unauthorized("not logged in (or the session timed out)")
    return principal


async def keep_alive(request: web.Request) -> None:
    """Mark the session seen now, whenever it was last (the page's explicit
    keep-alive, ``POST /api/session/touch``); 401 if there is none."""
    principal = await require_login(request)
    now = request.app[CLOCK].now()
    if principal.session.last_seen_at < now:
        async with request.app[DB_ENGINE].begin() as conn:
            await touch_session(conn, principal.session, now=now)
        seen = replace(principal.session, last_seen_at=now)
        request[PRINCIPAL] = replace(principal, session=seen)


async def require_role(request: web.Request, *roles: Role, action: str) -> Principal:
    """Return the principal if logged in with one of ``roles``; else 401 or 403.

    A refusal for the wrong role is written to the access log as ``action``.
    """
    principal = await require_login(request)
    if principal.account.role not in roles:
        app = request.app
        async with app[DB_ENGINE].begin() as conn:
            await record_access(
                conn,
                Actor.api(principal.account),
                organisation_id=principal.account.organisation_id,
                action=action,
                object_type="endpoint",
                object_id=None,
                now=app[CLOCK].now(),
                outcome=Outcome.REFUSED,
            )
        allowed = " or ".join(role.value for role in roles)
        raise Forbidden(f"this needs the role {allowed}")
    return principal
