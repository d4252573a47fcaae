"""What an admin sets for the practice: its own settings, and a dry run of the
retention purge (how much the next run would remove)."""

from __future__ import annotations

import re

from aiohttp import web
from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.accounts import Role
from audit.db import reading
from audit.practice import (
    MIN_INVITE_VALIDITY_S,
    PracticeSettings,
    practice_settings_of,
    set_practice_settings,
)
from audit.retention import Retention, preview_organisation, retention_of
from server.api.access_records import record_in, record_read
from server.api.admin_views import default_retention
from server.api.body import RequestBody, read_json
from server.api.errors import Unprocessable
from server.api.query import NO_PARAMS, query_params
from server.api.representations import iso, retention_json
from server.app_keys import CLOCK, DB_ENGINE, SETTINGS
from server.auth.sessions import Principal, require_role

routes = web.RouteTableDef()

RETENTION_FIELDS = ("consult_days", "recording_days", "access_log_days")
_DAYS = re.compile(r"[0-9]{1,5}")


class PracticeSettingsBody(RequestBody):
    recording_allowed: bool
    # None: the server's validity.
    invite_validity_s: int | None = Field(ge=MIN_INVITE_VALIDITY_S)
    # Left out: as it is (a client that does not know it changes nothing).
    appointment_reference_allowed: bool | None = None


def _settings_json(request: web.Request, chosen: PracticeSettings) -> dict[str, object]:
    server = request.app[SETTINGS]
    server_validity_s = server.consults.invite_validity_s
    return {
        "recording_allowed": chosen.recording_allowed,
        "invite_validity_s": chosen.invite_validity_s,
        "appointment_reference_allowed": chosen.appointment_reference_allowed,
        "server": {
            "recording_enabled": server.recording.enabled,
            "invite_validity_s": server_validity_s,
            "min_invite_validity_s": MIN_INVITE_VALIDITY_S,
        },
        "in_force": {
            "recording": server.recording.enabled and chosen.recording_allowed,
            "invite_validity_s": chosen.invite_validity(server_validity_s),
        },
    }


async def _record(
    conn: AsyncConnection, request: web.Request, principal: Principal, action: str
) -> None:
    organisation_id = principal.account.organisation_id
    await record_in(
        conn,
        request,
        principal,
        action=action,
        object_id=organisation_id,
        object_type="organisation",
    )


async def _record_read(request: web.Request, principal: Principal, action: str) -> None:
    """The read's record, through the access-log writer: committed before the answer."""
    await record_read(
        request,
        principal,
        action=action,
        object_id=principal.account.organisation_id,
        object_type="organisation",
    )


@routes.get("/api/admin/practice-settings")
async def practice_settings_read(request: web.Request) -> web.Response:
    """The practice's own settings, the server's bounds, and what is in force."""
    principal = await require_role(request, Role.ADMIN, action="practice_settings.read")
    query_params(request, NO_PARAMS)
    async with reading(request.app[DB_ENGINE]) as conn:
        chosen = await practice_settings_of(conn, principal.account.organisation_id)
    await _record_read(request, principal, "practice_settings.read")
    return web.json_response(_settings_json(request, chosen))


@routes.put("/api/admin/practice-settings")
async def practice_settings_update(request: web.Request) -> web.Response:
    """Set the practice's settings; new consults and recording requests follow them."""
    principal = await require_role(request, Role.ADMIN, action="practice_settings.update")
    body = await read_json(request, PracticeSettingsBody)
    server_validity_s = request.app[SETTINGS].consults.invite_validity_s
    if body.invite_validity_s is not None and body.invite_validity_s > server_validity_s:
        raise Unprocessable(
            f"field 'invite_validity_s' must be at most {server_validity_s} "
            "(this server's consults.invite_validity_s), or null for that"
        )
    if "appointment_reference_allowed" in body.model_fields_set and (
        body.appointment_reference_allowed is None
    ):
        raise Unprocessable("field 'appointment_reference_allowed' must be true or false")
    organisation_id = principal.account.organisation_id
    async with request.app[DB_ENGINE].begin() as conn:
        references_allowed = body.appointment_reference_allowed
        if references_allowed is None:
            saved = await practice_settings_of(conn, organisation_id)
            references_allowed = saved.appointment_reference_allowed
        chosen = PracticeSettings(
            body.recording_allowed, body.invite_validity_s, references_allowed
        )
        await set_practice_settings(conn, organisation_id, chosen, now=request.app[CLOCK].now())
        await _record(conn, request, principal, "practice_settings.update")
    return web.json_response(_settings_json(request, chosen))


def _proposed(params: dict[str, str], saved: Retention) -> Retention:
    days = {}
    for name in RETENTION_FIELDS:
        text = params.get(name)
        if text is None:
            days[name] = getattr(saved, name)
        elif not _DAYS.fullmatch(text) or not 1 <= int(text) <= 36500:
            raise Unprocessable(f"parameter '{name}' must be a whole number from 1 to 36500")
        else:
            days[name] = int(text)
    return Retention(**days)


@routes.get("/api/admin/retention/preview")
async def retention_preview(request: web.Request) -> web.Response:
    """What a purge now would remove of the organisation (removing nothing), under
    its retention or under the periods given in the query (to try before setting)."""
    principal = await require_role(request, Role.ADMIN, action="retention.preview")
    params = query_params(request, frozenset(RETENTION_FIELDS))
    organisation_id = principal.account.organisation_id
    now = request.app[CLOCK].now()
    # A dry run reads only. Each count sees its own snapshot, on either
    # database, as statements of a read-committed transaction do.
    async with reading(request.app[DB_ENGINE]) as conn:
        saved = await retention_of(conn, organisation_id, defaults=default_retention(request))
        retention = _proposed(params, saved)
        preview = await preview_organisation(conn, organisation_id, retention, now=now)
    await _record_read(request, principal, "retention.preview")
    return web.json_response(
        {
            "as_of": iso(now),
            "retention": retention_json(retention),
            "consults": preview.consults,
            "recordings": preview.recordings,
            "access_log_records": preview.access_log_records,
        }
    )
