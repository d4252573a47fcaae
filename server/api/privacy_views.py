"""Data subjects' rights of professionals: export of everything held, and erasure."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from audit.accounts import Role
from audit.db import reading
from audit.subject_rights import erase_account, export_account
from server.api.access_records import record_in, record_read
from server.api.admin_views import ACCOUNT_PATH, own_account
from server.api.query import NO_PARAMS, query_params
from server.app_keys import CLOCK, DB_ENGINE, MASTER_KEY
from server.auth.login import login_subject_hash
from server.auth.sessions import require_login, require_role
from server.ws.session_check import check_therapist_sessions

routes = web.RouteTableDef()


def _as_json(exported: dict[str, Any]) -> bytes:
    return json.dumps(exported, indent=2, ensure_ascii=False).encode()


@routes.get("/api/account/export")
async def account_export(request: web.Request) -> web.Response:
    """Everything held about the logged-in professional, as a JSON download."""
    principal = await require_login(request)
    query_params(request, NO_PARAMS)
    account = principal.account
    app = request.app
    now = app[CLOCK].now()
    # Recorded first (committed, through the access-log writer), so that the
    # export holds its own record; then read without SQLite's write lock.
    await record_read(
        request, principal, action="account.export", object_type="account", object_id=account.id
    )
    subject_hash = login_subject_hash(app[MASTER_KEY].key, account.email)
    async with reading(app[DB_ENGINE]) as conn:
        exported = await export_account(conn, account, login_subject_hash=subject_hash, now=now)
    # In a thread: years of records take a second to put into JSON.
    return web.Response(
        body=await asyncio.to_thread(_as_json, exported),
        content_type="application/json",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="videoconsult-export-{account.id}.json"'
        },
    )


@routes.post(ACCOUNT_PATH + "/erase")
async def account_erase(request: web.Request) -> web.Response:
    """Erase a professional's account on their request: personal data goes, their
    consult records stay unlinked (pseudonymous) until their retention ends."""
    principal = await require_role(request, Role.ADMIN, action="account.erase")
    account = await own_account(request, principal, "account.erase")
    app = request.app
    subject_hash = login_subject_hash(app[MASTER_KEY].key, account.email)
    async with app[DB_ENGINE].begin() as conn:
        erasure = await erase_account(conn, account, login_subject_hash=subject_hash)
        await record_in(
            conn,
            request,
            principal,
            action="account.erase",
            object_type="account",
            object_id=account.id,
        )
    await check_therapist_sessions(app)  # its sockets close now
    return web.json_response(
        {
            "erased": {
                "account_id": str(erasure.account_id),
                "consults_unlinked": erasure.consults_unlinked,
                "sessions_ended": erasure.sessions,
                "enrolment_links": erasure.enrolment_links,
                "login_failures": erasure.login_failures,
                "technical_entries": erasure.technical_entries,
            }
        }
    )
