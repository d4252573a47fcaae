"""Account administration for admins, limited to their own organisation."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web
from pydantic import Field

from audit.access_log import Actor, Outcome
from audit.accounts import (
    Account,
    Role,
    get_account,
    last_logins,
    list_accounts,
    parse_role,
    set_external_id,
)
from audit.db import reading
from audit.errors import Conflict, NotFound
from audit.notices import NoticeKind, pending_notices
from audit.references import check_reference
from audit.retention import Retention, retention_of, set_retention
from server.api.access_records import record_api_access, record_in, record_read
from server.api.body import RequestBody, read_json
from server.api.errors import ConflictError, NotFoundError
from server.api.query import NO_PARAMS, query_params
from server.api.representations import (
    account_json,
    invitation_json,
    retention_json,
)
from server.app_keys import CLOCK, DB_ENGINE, SETTINGS
from server.auth.admin import (
    AccountChange,
    add_account,
    change_account,
    change_role,
    reset_account_totp,
)
from server.auth.sessions import Principal, require_role
from server.web_security import link_origin
from server.ws.session_check import check_therapist_sessions

routes = web.RouteTableDef()

ACCOUNT_PATH = "/api/admin/accounts/{account_id}"


class NewAccountBody(RequestBody):
    email: str
    role: str


class RoleBody(RequestBody):
    role: str


class ExternalIdBody(RequestBody):
    # The record system's id for the person; null clears it.
    external_id: str | None


def _account_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["account_id"])
    except ValueError:
        raise NotFoundError("no such account") from None


async def own_account(request: web.Request, principal: Principal, action: str) -> Account:
    """The account named in the path, if it is in the admin's organisation (else 404).

    A miss is recorded as a refused access through the access-log writer
    (nothing was changed, so nothing else is to commit with it), before the
    error that follows is answered.
    """
    account_id = _account_id(request)
    organisation_id = principal.account.organisation_id
    try:
        async with reading(request.app[DB_ENGINE]) as conn:
            return await get_account(conn, account_id, organisation_id=organisation_id)
    except NotFound:
        await record_read(
            request,
            principal,
            action=action,
            object_type="account",
            object_id=account_id,
            outcome=Outcome.REFUSED,
        )
        raise


@routes.get("/api/admin/accounts")
async def accounts_list(request: web.Request) -> web.Response:
    """List the organisation's accounts."""
    principal = await require_role(request, Role.ADMIN, action="account.list")
    query_params(request, NO_PARAMS)
    organisation_id = principal.account.organisation_id
    async with reading(request.app[DB_ENGINE]) as conn:
        found = await list_accounts(conn, organisation_id)
        logins = await last_logins(conn, organisation_id)
    await record_read(
        request, principal, action="account.list", object_type="organisation", object_id=None
    )
    # The day only: when exactly is in the access log, for whoever must know.
    return web.json_response(
        {
            "accounts": [
                {
                    **account_json(account),
                    "last_login_on": None
                    if account.id not in logins
                    else logins[account.id].date().isoformat(),
                }
                for account in found
            ]
        }
    )


@routes.post("/api/admin/accounts")
async def accounts_create(request: web.Request) -> web.Response:
    """Create an account; the answer holds its one-time enrolment link."""
    principal = await require_role(request, Role.ADMIN, action="account.create")
    body = await read_json(request, NewAccountBody)
    role = parse_role(body.role)
    app = request.app
    organisation_id = principal.account.organisation_id
    try:
        async with app[DB_ENGINE].begin() as conn:
            invitation = await add_account(
                conn,
                Actor.api(principal.account),
                organisation_id=organisation_id,
                email=body.email,
                role=role,
                now=app[CLOCK].now(),
                link_ttl_s=app[SETTINGS].accounts.enrolment_link_ttl_s,
            )
    except Conflict:
        # Login names are unique in the whole installation, so this answer can
        # tell an admin that an address is in use elsewhere: keep a record.
        async with app[DB_ENGINE].begin() as conn:
            await record_in(
                conn,
                request,
                principal,
                action="account.create",
                object_type="account",
                object_id=None,
                outcome=Outcome.REFUSED,
            )
        raise
    # The QR code takes 10-20 ms to draw: in a thread, not on the loop.
    answer = await asyncio.to_thread(invitation_json, invitation, origin=link_origin(request))
    return web.json_response(answer, status=201)


@routes.get(ACCOUNT_PATH)
async def account_show(request: web.Request) -> web.Response:
    principal = await require_role(request, Role.ADMIN, action="account.read")
    query_params(request, NO_PARAMS)
    account = await own_account(request, principal, "account.read")
    await record_read(
        request, principal, action="account.read", object_type="account", object_id=account.id
    )
    return web.json_response({"account": account_json(account)})


@routes.patch(ACCOUNT_PATH)
async def account_set_role(request: web.Request) -> web.Response:
    """Change an account's role (never the organisation's last active admin)."""
    principal = await require_role(request, Role.ADMIN, action="account.set-role")
    body = await read_json(request, RoleBody)
    role = parse_role(body.role)
    account = await own_account(request, principal, "account.set-role")
    async with request.app[DB_ENGINE].begin() as conn:
        changed = await change_role(
            conn, Actor.api(principal.account), account, role, now=request.app[CLOCK].now()
        )
    # Its sessions ended with the change: its consult sockets close now, not
    # at the next periodic check.
    await check_therapist_sessions(request.app)
    return web.json_response({"account": account_json(changed)})


@routes.put(ACCOUNT_PATH + "/external-id")
async def account_set_external_id(request: web.Request) -> web.Response:
    """Set or clear the account's external id: its webhooks then name the
    therapist by it instead of the pseudonym."""
    action = "account.set-external-id"
    principal = await require_role(request, Role.ADMIN, action=action)
    body = await read_json(request, ExternalIdBody)
    external_id = body.external_id
    if external_id is not None:
        external_id = check_reference(external_id, field="external_id")
    account = await own_account(request, principal, action)
    async with request.app[DB_ENGINE].begin() as conn:
        changed = await set_external_id(conn, account, external_id)
        await record_in(
            conn, request, principal, action=action, object_type="account", object_id=account.id
        )
    return web.json_response({"account": account_json(changed)})


async def _change(request: web.Request, change: AccountChange) -> web.Response:
    action = f"account.{change.value}"
    principal = await require_role(request, Role.ADMIN, action=action)
    account = await own_account(request, principal, action)
    async with request.app[DB_ENGINE].begin() as conn:
        changed = await change_account(
            conn, Actor.api(principal.account), account, change, now=request.app[CLOCK].now()
        )
    if change is AccountChange.DISABLE:
        await check_therapist_sessions(request.app)  # its sockets close now
    return web.json_response({"account": account_json(changed)})


@routes.post(ACCOUNT_PATH + "/disable")
async def account_disable(request: web.Request) -> web.Response:
    """Disable the account; its sessions end at once."""
    return await _change(request, AccountChange.DISABLE)


@routes.post(ACCOUNT_PATH + "/enable")
async def account_enable(request: web.Request) -> web.Response:
    return await _change(request, AccountChange.ENABLE)


@routes.post(ACCOUNT_PATH + "/reset-totp")
async def account_reset_totp(request: web.Request) -> web.Response:
    """Forget the TOTP secret: the user enrols again through the new link."""
    principal = await require_role(request, Role.ADMIN, action="account.reset-totp")
    account = await own_account(request, principal, "account.reset-totp")
    app = request.app
    if await _reset_by_operator(app, account):
        # No password since the console's full reset: a link of the admin's
        # own would set one, and make the admin the account.
        await record_api_access(
            request,
            principal,
            action="account.reset-totp",
            object_type="account",
            object_id=account.id,
            outcome=Outcome.REFUSED,
        )
        raise ResetByOperator(
            "this account was reset from the console (password and app); only the "
            "console issues its enrolment link again (videoconsult user reset)"
        )
    async with app[DB_ENGINE].begin() as conn:
        invitation = await reset_account_totp(
            conn,
            Actor.api(principal.account),
            account,
            now=app[CLOCK].now(),
            link_ttl_s=app[SETTINGS].accounts.enrolment_link_ttl_s,
        )
    await check_therapist_sessions(app)  # its sockets close now
    answer = await asyncio.to_thread(invitation_json, invitation, origin=link_origin(request))
    return web.json_response(answer)


class ResetByOperator(ConflictError):
    code = "reset_by_operator"


async def _reset_by_operator(app: web.Application, account: Account) -> bool:
    """Whether the account waits for the holder to use the console's full-reset link."""
    if account.password_hash is not None:
        return False
    async with reading(app[DB_ENGINE]) as conn:
        notices = await pending_notices(conn, account.id)
    return any(notice.kind is NoticeKind.RESET for notice in notices)


class RetentionBody(RequestBody):
    consult_days: int = Field(ge=1, le=36500)
    recording_days: int = Field(ge=1, le=36500)
    access_log_days: int = Field(ge=1, le=36500)


def default_retention(request: web.Request) -> Retention:
    settings = request.app[SETTINGS].retention
    return Retention(settings.consult_days, settings.recording_days, settings.access_log_days)


@routes.get("/api/admin/retention")
async def retention_read(request: web.Request) -> web.Response:
    """The organisation's retention, in days (the installation's defaults until set)."""
    principal = await require_role(request, Role.ADMIN, action="retention.read")
    query_params(request, NO_PARAMS)
    organisation_id = principal.account.organisation_id
    async with reading(request.app[DB_ENGINE]) as conn:
        retention = await retention_of(conn, organisation_id, defaults=default_retention(request))
    await record_read(
        request,
        principal,
        action="retention.read",
        object_id=organisation_id,
        object_type="organisation",
    )
    return web.json_response(retention_json(retention))


@routes.put("/api/admin/retention")
async def retention_update(request: web.Request) -> web.Response:
    """Set the organisation's retention; the next purge applies it."""
    principal = await require_role(request, Role.ADMIN, action="retention.update")
    body = await read_json(request, RetentionBody)
    organisation_id = principal.account.organisation_id
    retention = Retention(body.consult_days, body.recording_days, body.access_log_days)
    now = request.app[CLOCK].now()
    async with request.app[DB_ENGINE].begin() as conn:
        await set_retention(conn, organisation_id, retention, now=now)
        await record_in(
            conn,
            request,
            principal,
            action="retention.update",
            object_id=organisation_id,
            object_type="organisation",
        )
    return web.json_response(retention_json(retention))
